//! How the loop nest is shared out over threads.
//!
//! Threads split C into a grid of `tm × tn` blocks aligned to the register
//! tile; each thread runs the whole nest on its block with its own packing
//! buffers. The grid shape minimises repacking: splitting rows makes every
//! thread pack all of its B columns, splitting columns makes every thread
//! pack all of its A rows, so the cheaper one wins.

use super::macro_kernel::PeeledColumns;
use super::{gemm_block, gemm_shared_b};
use crate::gemm::element::Element;
use crate::gemm::engine::{ASource, BSource, Epilogue, PackBuffers, StridedC};
use crate::gemm::kernels::{Kernel, KernelInfo};
use crate::gemm::pack::with_pack_buffers;
use crate::gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds per thread, waking another thread costs more
/// than it saves (a rayon fork-join is a few microseconds; 2^19 FMAs take
/// about 4 µs on one Zen 5 core).
const MIN_FMAS_PER_THREAD: u64 = 1 << 19;

/// How much more work per thread a call from outside the rayon pool needs
/// before it wakes the pool's threads.
const OUTSIDE_POOL_FACTOR: u64 = 8;

/// The panel width (columns) in which `run_tasks` counts whether C has too
/// few columns to split between threads.
const SHARED_B_PANEL_COLUMNS: usize = 32;

/// Multiply-adds each thread must have in one KC × NC block of B before
/// sharing B pays for the two fork-joins per block it costs (one to pack
/// the block, one to compute on it) against the grid split's one per call.
/// Measured on an Intel Xeon (2 threads, AVX-512, one process alternating
/// with and without the rule, medians, GFLOP/s; sharing → grid): sgemm
/// 64×576×196 (3.2 M per block) 79 → 167, 128×1152×196 152 → 168,
/// 256×2304×196 (12.8 M) 179 → 238, 512×4608×49 180 → 207; 2048×512×49
/// (25.7 M, still shared) 201 → 214 and the suite's forward and gradient
/// passes (r50_conv1, r50_3x3, r50_3x3_s2, r50_deep, r50_last1x1, 1024 → 256
/// 1×1 on 14²) within noise or up to 8% faster. Each fork-join cost 8–40 µs
/// there (rayon waking a worker), 16 M multiply-adds about 80 µs a thread.
const MIN_SHARED_B_BLOCK_FMAS: u64 = 1 << 24;

/// Whether sharing B's blocks between `threads` pays on this problem:
/// each thread's part of a block ([`MIN_SHARED_B_BLOCK_FMAS`]).
fn shared_b_blocks_pay(m: usize, k: usize, n: usize, threads: usize, info: &KernelInfo) -> bool {
    let kc = super::blocking::block_depth(k, info);
    let rows = m.div_ceil(threads) as u64;
    rows.saturating_mul(n.min(info.nc) as u64)
        .saturating_mul(kc as u64)
        >= MIN_SHARED_B_BLOCK_FMAS
}

/// How many threads a problem of this size deserves under `par`.
pub(crate) fn thread_count(m: usize, n: usize, k: usize, par: Parallelism) -> usize {
    let max = par.max_threads();
    if max <= 1 {
        return 1;
    }
    let work = (m as u64).saturating_mul(n as u64).saturating_mul(k as u64);
    // A call from outside the pool hands its tasks to sleeping workers and
    // waits to be woken itself: a round trip of tens of microseconds, not a
    // fork-join's few (128³ from the main thread: 102 GFLOP/s on two
    // threads of the global pool, 243 on one).
    let per_thread = if rayon::current_thread_index().is_some() {
        MIN_FMAS_PER_THREAD
    } else {
        MIN_FMAS_PER_THREAD * OUTSIDE_POOL_FACTOR
    };
    let by_work = (work / per_thread).max(1);
    max.min(usize::try_from(by_work).unwrap_or(usize::MAX))
}

/// Picks the `tm × tn = threads` grid (or fewer, where a side has too few
/// panels) that repacks least: each row split repacks B (`k·n` elements) and
/// each column split repacks A (`m·k`, or nothing when A is pre-packed).
pub(super) fn thread_grid(
    m: usize,
    n: usize,
    threads: usize,
    info: &KernelInfo,
    a_prepacked: bool,
) -> (usize, usize) {
    let (mp, np) = (m.div_ceil(info.mr), n.div_ceil(info.nr));
    let mut best = (1, 1);
    let mut best_cost = (usize::MAX, u64::MAX);
    for tm in 1..=threads {
        if !threads.is_multiple_of(tm) {
            continue;
        }
        let tn = threads / tm;
        // Fewer tasks than asked when a side runs out of panels.
        let (tm_eff, tn_eff) = (tm.min(mp), tn.min(np));
        let idle = threads - tm_eff * tn_eff;
        let a_cost = if a_prepacked {
            0
        } else {
            tn_eff as u64 * m as u64
        };
        let cost = tm_eff as u64 * n as u64 + a_cost;
        if (idle, cost) < best_cost {
            best_cost = (idle, cost);
            best = (tm_eff, tn_eff);
        }
    }
    best
}

/// The `part`-th of `parts` contiguous ranges of `0..len`, cut on multiples
/// of `unit` and as even as that allows.
pub(crate) fn split_range(len: usize, unit: usize, parts: usize, part: usize) -> (usize, usize) {
    let units = len.div_ceil(unit);
    let (base, extra) = (units / parts, units % parts);
    let start = part * base + part.min(extra);
    let count = base + usize::from(part < extra);
    ((start * unit).min(len), ((start + count) * unit).min(len))
}

/// Runs the loop nest over all of C: on the calling thread in the caller's
/// `bufs`, or split over threads, each packing into its own buffers. With
/// `peel`, the tiles cover C's first `n` columns and the peeled columns
/// after them are finished next to the tiles.
///
/// # Safety
/// As [`super::gemm`], past its degenerate cases: `m`, `n`, `k` > 0; a
/// `Packed` A was packed for `kernel`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_tasks<T: Element, B: BSource<T>>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &ASource<'_, T>,
    b: &B,
    beta: T,
    c: StridedC<T>,
    ep: &Epilogue<T>,
    peel: Option<PeeledColumns<T>>,
    kernel: &Kernel<T>,
    par: Parallelism,
    bufs: Option<&mut PackBuffers<T>>,
) {
    if let Some(bufs) = bufs {
        // The caller's buffers serve one thread: this call runs on the
        // calling thread only.
        // SAFETY: forwarded; the single task covers all of C.
        unsafe { gemm_block(0, m, 0, n, k, alpha, a, b, beta, c, ep, peel, kernel, bufs) };
        return;
    }
    let threads = thread_count(m, n, k, par);
    // Panels of at most 32 columns, the widest tile the threshold below was
    // set on, so that AVX-512's 8 × 48 tile splits C's columns wherever its
    // 8 × 32 does (Intel Xeon, 2 threads, sgemm 196×2304×256, GFLOP/s
    // medians: 8 × 32 split by columns 195–249; 8 × 48 sharing B over six
    // panels 194–206, split by columns 247–267).
    let panel = kernel.info().nr.min(SHARED_B_PANEL_COLUMNS);
    let (mp, np) = (m.div_ceil(kernel.info().mr), n.div_ceil(panel));
    if threads > 1
        && np < 4 * threads
        && mp >= 2 * threads
        && shared_b_blocks_pay(m, k, n, threads, kernel.info())
    {
        // Too few column panels to share out evenly: share B instead.
        // SAFETY: forwarded.
        unsafe { gemm_shared_b(m, k, n, alpha, a, b, beta, c, ep, peel, kernel, threads) };
        return;
    }
    let prepacked = matches!(a, ASource::Packed(_));
    let (tm, tn) = thread_grid(m, n, threads, kernel.info(), prepacked);
    // Column blocks may end mid-panel where a narrow kernel finishes the
    // partial panel at half cost: 196 columns split 112 + 84 (3.5 and 3
    // panels of work) instead of 128 + 68 (4 and 3).
    let column_unit = kernel.narrow().map_or(kernel.info().nr, |(width, _)| width);
    let task = |t: usize| {
        let (m0, m1) = split_range(m, kernel.info().mr, tm, t / tn);
        let (n0, n1) = split_range(n, column_unit, tn, t % tn);
        if m0 < m1 && n0 < n1 {
            with_pack_buffers(|bufs| {
                // SAFETY: tasks cover disjoint blocks of C; the rest is forwarded.
                unsafe {
                    gemm_block(
                        m0, m1, n0, n1, k, alpha, a, b, beta, c, ep, peel, kernel, bufs,
                    )
                };
            });
        }
    };
    if tm * tn == 1 {
        task(0);
    } else {
        (0..tm * tn).into_par_iter().with_max_len(1).for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_range_covers_everything_once() {
        for len in [0usize, 1, 7, 32, 33, 1000] {
            for parts in 1..6 {
                let mut next = 0;
                for p in 0..parts {
                    let (a, b) = split_range(len, 8, parts, p);
                    assert_eq!(a, next.min(len));
                    assert!(a % 8 == 0 || a == len);
                    next = b;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn grid_prefers_the_long_side() {
        let info = KernelInfo {
            isa: crate::arch::Isa::Portable,
            mr: 8,
            nr: 32,
            mc: 64,
            kc: 64,
            nc: 256,
            tall_mc: 0,
        };
        // Few rows, many columns: split the columns.
        assert_eq!(thread_grid(64, 3136, 2, &info, false), (1, 2));
        // Many rows, few columns: split the rows.
        assert_eq!(thread_grid(2048, 49, 2, &info, false), (2, 1));
        // One panel each way: only one task has work.
        assert_eq!(thread_grid(8, 32, 4, &info, false), (1, 1));
    }

    /// Each thread's part of a KC × NC block: 1024 rows × 49 columns × 512
    /// deep per thread shares B; 32 rows × 196 × 288 (64×576×196 on two
    /// threads) splits the grid, and so does a KC block cut short by k.
    #[test]
    fn shared_b_needs_enough_work_per_block() {
        let info = KernelInfo {
            isa: crate::arch::Isa::Avx512,
            mr: 8,
            nr: 32,
            mc: 896,
            kc: 512,
            nc: 1024,
            tall_mc: 0,
        };
        assert!(shared_b_blocks_pay(2048, 512, 49, 2, &info));
        assert!(!shared_b_blocks_pay(64, 576, 196, 2, &info));
        assert!(!shared_b_blocks_pay(256, 2304, 196, 2, &info));
        assert!(!shared_b_blocks_pay(2048, 64, 49, 2, &info));
        // 683 rows a thread × 100 × 552: the shared path's test shape.
        assert!(shared_b_blocks_pay(2049, 1100, 100, 3, &info));
        assert!(shared_b_blocks_pay(
            usize::MAX,
            usize::MAX,
            usize::MAX,
            2,
            &info
        ));
    }
}
