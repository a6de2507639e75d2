//! Instrumentation for tests and the `cpuconv` tool: evidence of which
//! kernels really ran, and a blocking override that makes small problems
//! cross every cache-block edge. Not part of the supported API.
//!
//! The evidence is kept per thread: a kernel records itself on the thread
//! that runs it, only once it has been chosen and is about to compute (never
//! on a path that falls back to scalar code). [`traced`] reads the calling
//! thread's records before and after a closure, so tests running in
//! parallel cannot lend each other evidence. Work that a call hands to other
//! rayon threads is recorded there, not here: tests that want evidence run
//! the call with `Parallelism::Sequential`.

use crate::arch::Isa;
use std::cell::Cell;

/// What kernels ran on one thread (while [`traced`] watched it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTrace {
    /// Macro-kernel blocks (one packed A block × one B block) the native
    /// GEMM ran, per [`Isa`] (indexed as [`Isa::ALL`]).
    pub gemm_blocks: [u64; 3],
    /// Jobs the SIMD direct convolution ran on an ISA kernel, per [`Isa`].
    pub direct_simd_jobs: [u64; 3],
    /// Of those blocks, the ones that ran on a path's column kernel (tiles
    /// vectorised down the columns of C).
    pub column_kernel_blocks: u64,
    /// GEMM blocks at depth `pc > 0`: the problem crossed a KC edge.
    pub kc_edges: u64,
    /// GEMM blocks whose rows start past the task's first row block: an MC edge.
    pub mc_edges: u64,
    /// GEMM blocks whose columns start past the task's first column block:
    /// an NC edge (or, where the rows fit one MC block, an edge of the
    /// narrower B blocks that path uses).
    pub nc_edges: u64,
    /// Weight-gradient calls that ran on padded input bands, with no
    /// column matrix (`conv::grad_weight_bands`).
    pub grad_weight_bands: u64,
    /// Depthwise weight-gradient jobs that ran with channels in lanes
    /// (`conv::direct_simd::backward`).
    pub grad_weight_lanes: u64,
    /// Depthwise forward blocks that ran with channels in lanes
    /// (`conv::direct_simd::lanes`).
    pub forward_lanes: u64,
}

impl KernelTrace {
    /// Whether the native GEMM ran at least one block on `isa`.
    pub fn gemm_ran_on(&self, isa: Isa) -> bool {
        self.gemm_blocks[isa.index()] > 0
    }

    /// Whether the SIMD direct convolution ran at least one job on `isa`.
    pub fn direct_simd_ran_on(&self, isa: Isa) -> bool {
        self.direct_simd_jobs[isa.index()] > 0
    }

    /// Whether any kernel (GEMM or SIMD direct) ran on `isa`.
    pub fn ran_on(&self, isa: Isa) -> bool {
        self.gemm_ran_on(isa) || self.direct_simd_ran_on(isa)
    }

    fn since(&self, before: &KernelTrace) -> KernelTrace {
        let sub = |a: [u64; 3], b: [u64; 3]| std::array::from_fn(|i| a[i] - b[i]);
        KernelTrace {
            gemm_blocks: sub(self.gemm_blocks, before.gemm_blocks),
            direct_simd_jobs: sub(self.direct_simd_jobs, before.direct_simd_jobs),
            column_kernel_blocks: self.column_kernel_blocks - before.column_kernel_blocks,
            kc_edges: self.kc_edges - before.kc_edges,
            mc_edges: self.mc_edges - before.mc_edges,
            nc_edges: self.nc_edges - before.nc_edges,
            grad_weight_bands: self.grad_weight_bands - before.grad_weight_bands,
            grad_weight_lanes: self.grad_weight_lanes - before.grad_weight_lanes,
            forward_lanes: self.forward_lanes - before.forward_lanes,
        }
    }
}

thread_local! {
    static TRACE: Cell<KernelTrace> = const {
        Cell::new(KernelTrace {
            gemm_blocks: [0; 3],
            direct_simd_jobs: [0; 3],
            column_kernel_blocks: 0,
            kc_edges: 0,
            mc_edges: 0,
            nc_edges: 0,
            grad_weight_bands: 0,
            grad_weight_lanes: 0,
            forward_lanes: 0,
        })
    };
}

fn update(f: impl FnOnce(&mut KernelTrace)) {
    TRACE.with(|cell| {
        let mut t = cell.get();
        f(&mut t);
        cell.set(t);
    });
}

/// Runs `f` and returns what kernels ran on this thread meanwhile.
pub fn traced<R>(f: impl FnOnce() -> R) -> (R, KernelTrace) {
    let before = TRACE.with(Cell::get);
    let r = f();
    let after = TRACE.with(Cell::get);
    (r, after.since(&before))
}

/// Records one GEMM macro-kernel block about to run on `isa` (on its
/// column kernel where `columns`), and which block edges it lies past.
#[inline]
pub(crate) fn record_gemm_block(
    isa: Isa,
    columns: bool,
    past_kc: bool,
    past_mc: bool,
    past_nc: bool,
) {
    update(|t| {
        t.gemm_blocks[isa.index()] += 1;
        t.column_kernel_blocks += u64::from(columns);
        t.kc_edges += u64::from(past_kc);
        t.mc_edges += u64::from(past_mc);
        t.nc_edges += u64::from(past_nc);
    });
}

/// Records one weight-gradient call that ran on padded input bands.
#[inline]
pub(crate) fn record_grad_weight_bands() {
    update(|t| t.grad_weight_bands += 1);
}

/// Records `jobs` channels-in-lanes grad-weight jobs about to run.
#[inline]
pub(crate) fn record_grad_weight_lanes(jobs: u64) {
    update(|t| t.grad_weight_lanes += jobs);
}

/// Records `blocks` depthwise forward blocks about to run with channels in
/// lanes.
#[inline]
pub(crate) fn record_forward_lanes(blocks: u64) {
    update(|t| t.forward_lanes += blocks);
}

/// Records `jobs` SIMD direct-convolution jobs about to run on `isa`.
#[inline]
pub(crate) fn record_direct_simd_jobs(isa: Isa, jobs: u64) {
    update(|t| t.direct_simd_jobs[isa.index()] += jobs);
}

/// Cache blocking forced on a GEMM (or on the GEMMs of a convolution) in
/// place of what the cache model derives: tests use tiny blocks so that
/// small problems cross every MC, KC and NC edge. Values are rounded to what
/// the kernel needs (MC and NC up to whole register tiles; KC up to a
/// multiple of 8) and are at least one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Blocking {
    /// Rows of A per packed block.
    pub mc: usize,
    /// Depth of a block.
    pub kc: usize,
    /// Columns of B per packed block.
    pub nc: usize,
}

/// The paths a test should exercise: every one this CPU supports. When
/// `CPUCONV_REQUIRE_ISAS` lists paths (comma-separated names, as
/// `CPUCONV_ISA` takes them), each must be among them: a test that would
/// otherwise skip a listed path panics instead, so a CI machine without,
/// say, AVX-512 says so rather than passing on the paths it has.
///
/// # Panics
/// When `CPUCONV_REQUIRE_ISAS` names a path this CPU cannot run, or a name
/// that is no path.
pub fn isas_under_test() -> Vec<Isa> {
    let supported = crate::arch::supported_isas();
    if let Ok(list) = std::env::var("CPUCONV_REQUIRE_ISAS") {
        if let Err(e) = check_required(&list, &supported) {
            panic!("CPUCONV_REQUIRE_ISAS={list:?}: {e}");
        }
    }
    supported
}

/// `Err` naming the first entry of the comma-separated `list` that is not a
/// path or not in `supported`.
fn check_required(list: &str, supported: &[Isa]) -> Result<(), String> {
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match Isa::from_name(name) {
            None => return Err(format!("{name:?} is not one of avx512, avx2, portable")),
            Some(isa) if !supported.contains(&isa) => {
                return Err(format!(
                    "{isa} is required but this CPU cannot run it, so the tests of that path \
                     cannot run here"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_isas_must_be_supported() {
        let avx2_machine = [Isa::Portable, Isa::Avx2];
        assert!(check_required("portable,avx2", &avx2_machine).is_ok());
        assert!(check_required(" avx2 , ", &avx2_machine).is_ok());
        assert!(check_required("", &avx2_machine).is_ok());
        let e = check_required("portable,avx2,avx512", &avx2_machine).unwrap_err();
        assert!(e.contains("avx512 is required"), "{e}");
        assert!(check_required("sse4", &avx2_machine).is_err());
    }

    #[test]
    fn traces_count_only_this_threads_kernels() {
        let ((), outer) = traced(|| {
            record_gemm_block(Isa::Avx2, false, true, false, true);
            std::thread::spawn(|| record_direct_simd_jobs(Isa::Portable, 5))
                .join()
                .unwrap();
        });
        assert!(outer.gemm_ran_on(Isa::Avx2));
        assert!(!outer.direct_simd_ran_on(Isa::Portable));
        assert_eq!((outer.kc_edges, outer.mc_edges, outer.nc_edges), (1, 0, 1));
    }
}
