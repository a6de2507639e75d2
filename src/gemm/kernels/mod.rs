//! Micro-kernels — the only ISA-specific code of the GEMM — and the runtime
//! dispatch that picks one.
//!
//! Every micro-kernel computes one full `MR × NR` tile `A_panel · B_panel`
//! (`kc` steps of `MR` values of A and `NR` values of B, packed or, for a
//! row-major operand the driver reads in place, strided; see
//! `MicroKernelFn`) and applies the tile epilogue (α, β, bias, clamp) on
//! the way out. Only the store is partial at a matrix edge.
//!
//! Each path has a row kernel, vectorised along the rows of C (B loaded as
//! vectors, A broadcast). The two x86 paths also have a column kernel,
//! vectorised down the columns of C, for pre-packed A and a C with few
//! columns, where row tiles would be mostly padding
//! ([`kernel_info_for_shape`]).
//!
//! Which paths the CPU can run is [`crate::arch`]'s business; a `Kernel`
//! is only ever built here, for a path `clamp_isa` admitted, so holding one
//! means its instructions are safe to execute.

use super::cache::{cache_hierarchy, CacheHierarchy};
use super::cache_model::ModelBlocking;
use super::element::Element;
use crate::arch::clamp_isa;
pub use crate::arch::Isa;
use crate::testing::Blocking;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[doc(hidden)]
pub mod peak;
pub(crate) mod portable;

/// What the epilogue of one tile does: `C = clamp(α·acc + β·C + bias[row])`.
///
/// `beta == 0` means C is not read. `bias` is null or points at the bias of the
/// tile's first row. `clamp` is `None` for no activation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileEpilogue<T = f32> {
    pub alpha: T,
    pub beta: T,
    pub bias: *const T,
    pub clamp: Option<(T, T)>,
}

/// A micro-kernel: `kc` steps over panels `a` and `b`, then the epilogue
/// into the `rows × cols` corner (`rows ≤ MR`, `cols ≤ NR`) of the tile at `c`.
///
/// Value `(i, p)` of the A panel is at `a + i·ars + p·acs`: `(1, MR)` for a
/// packed panel, `(row stride, 1)` when the driver lets a kernel with
/// [`Kernel::a_strided`] read a row-major A in place. Step `p` of the B
/// panel is the `NR` floats at `b + p·ldb`: `ldb = NR` for a packed panel,
/// or B's row stride when the driver lets the kernel read a row-major B in
/// place.
///
/// # Safety
/// `a + i·ars + p·acs` is readable for every `i < MR`, `p < kc`, and
/// `b + p·ldb` holds `NR` readable floats for every `p < kc` (f32
/// alignment is enough for both);
/// `c.offset(i·rsc + j·csc)` is writable (and readable unless `beta == 0`) for
/// `i < rows, j < cols`; `bias`, when set, holds `rows` values; the CPU
/// supports the kernel's ISA.
pub(crate) type MicroKernelFn<T = f32> = unsafe fn(
    kc: usize,
    a: *const T,
    ars: usize,
    acs: usize,
    b: *const T,
    ldb: usize,
    c: *mut T,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue<T>,
);

/// Dot products of `rows` rows of a row-major A (`lda` apart) with one
/// contiguous column of `k` values, into `out[..rows]`.
///
/// # Safety
/// `a + i·lda + p` is readable for `i < rows`, `p < k`; `b` holds `k`
/// floats; `out` holds `rows`; the CPU supports the kernel's ISA.
pub(crate) type DotKernelFn<T = f32> =
    unsafe fn(k: usize, a: *const T, lda: usize, rows: usize, b: *const T, out: &mut [T]);

/// A tile ([`MicroKernelFn`], same arguments up to `epilogue`) that also
/// accumulates C's `count` (1 or 2) peeled columns for the same micro-panel
/// of A, whose columns are contiguous (`ars == 1`: a packed panel, or a
/// column-major A read in place): column `q`'s B values are at
/// `columns + q·ld + p` for `p < kc`, and `out[16·q + i]` receives
/// `Σ_p A(i, p)·B(p, q)` for the MR rows, unscaled (the caller stores them
/// through the tile's epilogue).
///
/// # Safety
/// As [`MicroKernelFn`], and `ars == 1`; `columns + q·ld + p` is readable
/// for `q < count`, `p < kc`; `out` holds 32 values.
pub(crate) type TileWithColumnsFn<T = f32> = unsafe fn(
    kc: usize,
    a: *const T,
    ars: usize,
    acs: usize,
    b: *const T,
    ldb: usize,
    c: *mut T,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue<T>,
    columns: *const T,
    ld: usize,
    count: usize,
    out: &mut [T; 32],
);

/// The kernels that finish C's peeled columns, one per layout of the A
/// micro-panel: rows contiguous (a row-major A read in place) go to dot
/// products along `k`; columns contiguous (a packed panel, or a
/// column-major A read in place) ride along with the tile just before the
/// peeled columns, one more FMA per k-step on A values the tile loads anyway.
#[derive(Debug)]
pub(crate) struct DotKernels<T = f32> {
    /// Rows contiguous: vectors along `k`, one sum per row.
    pub(crate) rows: DotKernelFn<T>,
    /// Columns contiguous: the tile and the peeled columns in one pass.
    pub(crate) with_tile: TileWithColumnsFn<T>,
}

// Function pointers are `Copy` whatever `T` is; a derive would ask `T: Copy`.
impl<T> Clone for DotKernels<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DotKernels<T> {}

/// Register tile and cache blocking of one micro-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// The path.
    pub isa: Isa,
    /// Rows of C per micro-tile (rows of an A panel).
    pub mr: usize,
    /// Columns of C per micro-tile (columns of a B panel).
    pub nr: usize,
    /// Rows of A packed per L2 block.
    pub mc: usize,
    /// Depth of one packed block.
    pub kc: usize,
    /// Columns of B packed per L3 block.
    pub nc: usize,
}

/// Row counts below a register tile that have their own kernels: those of
/// AVX-512's 8-row tile (the only path with them).
const SHORT_ROWS: usize = 7;

/// A micro-kernel and the blocking that feeds it. Its fields are private to
/// this module: a `Kernel` exists only for a path the CPU supports (built by
/// [`kernel_for`] after `clamp_isa`), so the rest of the crate may call its
/// functions without re-checking the CPU.
///
/// The element type is a parameter so that the driver is written once for
/// every type; only `f32` kernels exist today.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel<T = f32> {
    info: KernelInfo,
    func: MicroKernelFn<T>,
    /// A kernel for right-edge tiles of at most `.0` columns, reading the
    /// same packed panels, where the full tile would be mostly padding.
    narrow: Option<(usize, MicroKernelFn<T>)>,
    /// The kernel honours any A strides (`ars`, `acs`), so the driver may
    /// hand it a row-major A in place; otherwise A must be packed.
    a_strided: bool,
    /// The kernels for the one or two columns of C just past a multiple of
    /// the narrow width, which tiles would pad to a whole vector.
    dot: Option<DotKernels<T>>,
    /// The narrow and the full tile for a bottom-edge panel of `r < mr`
    /// real rows, at `[narrow or full][r − 1]`.
    short: Option<[[MicroKernelFn<T>; SHORT_ROWS]; 2]>,
}

impl<T> Kernel<T> {
    /// Register tile and blocking.
    #[inline]
    pub(crate) fn info(&self) -> &KernelInfo {
        &self.info
    }

    /// The narrow right-edge kernel and the widest tile it serves.
    #[inline]
    pub(crate) fn narrow(&self) -> Option<(usize, MicroKernelFn<T>)> {
        self.narrow
    }

    /// Whether the kernel reads a row-major A in place.
    #[inline]
    pub(crate) fn a_strided(&self) -> bool {
        self.a_strided
    }

    /// Whether this is a path's column kernel (tiles vectorised down the
    /// columns of C), the one kernel that reads only packed A.
    #[inline]
    pub(crate) fn is_column_kernel(&self) -> bool {
        !self.a_strided
    }

    /// The dot-product kernels for peeled columns.
    #[inline]
    pub(crate) fn dot(&self) -> Option<DotKernels<T>> {
        self.dot
    }

    /// The micro-kernel for a tile of `rows` real rows and `cols` columns:
    /// the narrow one where the columns fit it, and one computing only the
    /// real rows where the path has it.
    #[inline]
    pub(crate) fn for_tile(&self, rows: usize, cols: usize) -> MicroKernelFn<T> {
        let narrow = matches!(self.narrow, Some((width, _)) if cols <= width);
        if let Some(short) = self.short.filter(|_| rows < self.info.mr) {
            if let Some(&f) = short[usize::from(!narrow)].get(rows.wrapping_sub(1)) {
                return f;
            }
        }
        match self.narrow {
            Some((_, f)) if narrow => f,
            _ => self.func,
        }
    }

    /// This kernel with blocks of depth `kc` (a multiple of 8, at least 8).
    pub(crate) fn with_kc(mut self, kc: usize) -> Kernel<T> {
        self.info.kc = kc.next_multiple_of(8).max(8);
        self
    }

    /// This kernel with blocks of at most `mc` rows (a whole number of
    /// register tiles, at least one).
    pub(crate) fn with_mc(mut self, mc: usize) -> Kernel<T> {
        let mr = self.info.mr;
        self.info.mc = (mc / mr * mr).max(mr);
        self
    }

    /// This kernel with its cache blocking replaced by `b` (rounded up to
    /// whole register tiles, KC to a multiple of 8; see [`Blocking`]).
    pub(crate) fn with_blocking(mut self, b: Blocking) -> Kernel<T> {
        let KernelInfo { mr, nr, .. } = self.info;
        self.info.mc = b.mc.max(1).next_multiple_of(mr);
        self.info.kc = b.kc.max(1).next_multiple_of(8);
        self.info.nc = b.nc.max(1).next_multiple_of(nr);
        self
    }
}

/// Cache blocking for an `mr × nr` kernel: the analytical model of
/// [`crate::gemm::cache_model`] on the detected caches.
pub(crate) fn blocking(isa: Isa, mr: usize, nr: usize, caches: &CacheHierarchy) -> KernelInfo {
    let model = model_blocking(isa, mr, nr, caches);
    KernelInfo {
        isa,
        mr,
        nr,
        mc: model.mc,
        kc: model.kc,
        nc: model.nc,
    }
}

/// The model's derivation for an `mr × nr` f32 kernel of path `isa`.
pub fn model_blocking(isa: Isa, mr: usize, nr: usize, caches: &CacheHierarchy) -> ModelBlocking {
    // f32 lanes of the path's vectors (`wide::f32x8` on the portable path).
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 | Isa::Portable => 8,
    };
    ModelBlocking::derive(caches, mr, nr, std::mem::size_of::<f32>(), lanes)
}

fn build_kernel(isa: Isa) -> Kernel {
    let caches = cache_hierarchy();
    let (mr, nr, func): (usize, usize, MicroKernelFn) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (avx512::MR, avx512::NR, avx512::kernel),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (avx2::MR, avx2::NR, avx2::kernel),
        _ => (portable::MR, portable::NR, portable::kernel),
    };
    let narrow: Option<(usize, MicroKernelFn)> = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some((avx512::NR_NARROW, avx512::kernel_narrow)),
        _ => None,
    };
    let dot: Option<DotKernels> = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(DotKernels {
            rows: avx512::dot_rows,
            with_tile: avx512::kernel_with_columns,
        }),
        _ => None,
    };
    let short: Option<[[MicroKernelFn; SHORT_ROWS]; 2]> = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(avx512::KERNELS_SHORT),
        _ => None,
    };
    Kernel {
        info: blocking(isa, mr, nr, caches),
        func,
        narrow,
        a_strided: true,
        dot,
        short,
    }
}

/// The kernel of a supported path, built once per path.
pub(crate) fn kernel_for(isa: Isa) -> &'static Kernel {
    static TABLE: [OnceLock<Kernel>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let isa = clamp_isa(isa);
    TABLE[isa.index()].get_or_init(|| build_kernel(isa))
}

/// The path's kernel vectorised down the columns of C, where it has one.
fn column_kernel_for(isa: Isa) -> Option<&'static Kernel> {
    match clamp_isa(isa) {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            static COLUMNS: OnceLock<Kernel> = OnceLock::new();
            Some(COLUMNS.get_or_init(|| {
                column_kernel(
                    Isa::Avx512,
                    avx512::MR_COLUMNS,
                    avx512::NR_COLUMNS,
                    avx512::kernel_columns,
                )
            }))
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            static COLUMNS: OnceLock<Kernel> = OnceLock::new();
            Some(COLUMNS.get_or_init(|| {
                column_kernel(
                    Isa::Avx2,
                    avx2::MR_COLUMNS,
                    avx2::NR_COLUMNS,
                    avx2::kernel_columns,
                )
            }))
        }
        _ => None,
    }
}

/// A column kernel of path `isa` (one `clamp_isa` admitted): packed A only,
/// no edge kernels of its own.
#[cfg(target_arch = "x86_64")]
fn column_kernel(isa: Isa, mr: usize, nr: usize, func: MicroKernelFn) -> Kernel {
    Kernel {
        info: blocking(isa, mr, nr, cache_hierarchy()),
        func,
        narrow: None,
        a_strided: false,
        dot: None,
        short: None,
    }
}

/// Multiply-adds a kernel spends on an `m × n` C, padding included.
/// In `u128`, saturating: a plan may describe a far larger output than it
/// will ever run on, and the public `kernel_info_for_shape` takes any sizes.
fn padded_work(kernel: &Kernel, m: usize, n: usize) -> u128 {
    let KernelInfo { mr, nr, .. } = kernel.info;
    let rem = n % nr;
    let last = match kernel.narrow {
        Some((width, _)) if rem > 0 && rem <= width => width,
        _ if rem > 0 => nr,
        _ => 0,
    };
    let rows = (m as u128).div_ceil(mr as u128) * mr as u128;
    rows.saturating_mul((n - rem) as u128 + last as u128)
}

/// The kernel of path `isa` for an `m × n` C: the row kernel, unless A
/// comes pre-packed and the path's column kernel wastes at least 10% less
/// on padding (C with few columns, such as the 49 of a 7×7 output plane: 64
/// padded columns in AVX-512's 32-wide or AVX2's 16-wide row tiles, 56 in
/// 8-wide or 54 in 6-wide column tiles). The margin covers the column
/// kernel's transposing epilogue. Measured on AVX2 (Zen 3, plans, Auto,
/// GFLOP/s, five alternating rounds, row tiles → column tiles): 1 thread,
/// 512 → 2048 1×1 on 7² 72.7 → 85.3, 2048 → 512 on 7² 69.6 → 82.8, 1024 →
/// 2048 1×1/2 on 14² 67.8 → 75.5, 160 → 960 on 7² 67.6 → 81.3; 2 threads
/// 96–104 → 125–137 on the same layers.
///
/// Only where A's panels come with their rows contiguous (`a_columns`): a
/// pre-packed A (convolution plans), or a column-major one (the input
/// gradient's and the transposed convolution's `Wᵀ`, read through the
/// weight tensor), whose panels the driver packs with one contiguous copy
/// per k-step. Measured for the latter (Zen 3, AVX2, 1 thread, the input
/// gradient with `Auto`, one process, alternating with the row kernel,
/// best GFLOP/s): 512 → 2048 1×1 on 7² 59.5 → 71.6, 2048 → 512 55.7 →
/// 72.3, 160 → 960 49.5 → 59.6, 960 → 160 63.9 → 72.2, 512 → 2048 on 6²
/// 58.1 → 72.6; 2 threads 112 → 136 and 108 → 146 on the first two.
/// Reading those panels in place instead ran 17–25% slower than the copy
/// (their k-steps a power-of-two column stride apart). Packing the column
/// kernel's 16- or 32-row panels from a row-major A per call costs more
/// than the padding saves (2048×512×49, 1 thread: packing A takes 40% of
/// the time against 15% for 8-row panels, 131 against 167 GFLOP/s).
pub(crate) fn kernel_for_shape(isa: Isa, m: usize, n: usize, a_columns: bool) -> &'static Kernel {
    let rows = kernel_for(isa);
    match column_kernel_for(isa) {
        Some(columns)
            if a_columns
                && padded_work(columns, m, n).saturating_mul(10)
                    <= padded_work(rows, m, n).saturating_mul(9) =>
        {
            columns
        }
        _ => rows,
    }
}

/// The kernel for an `m × n` C: of the requested path (clamped to the CPU)
/// or of the active one, with the blocking forced by `blocking` if set;
/// `a_columns` as for [`kernel_for_shape`].
pub(crate) fn select(
    requested: Option<Isa>,
    m: usize,
    n: usize,
    a_columns: bool,
    blocking: Option<Blocking>,
) -> Kernel {
    let kernel = *kernel_for_shape(requested.unwrap_or_else(crate::isa), m, n, a_columns);
    match blocking {
        Some(b) => kernel.with_blocking(b),
        None => kernel,
    }
}

/// Register tile and blocking of a path (clamped to what the CPU supports).
pub fn kernel_info(isa: Isa) -> KernelInfo {
    kernel_for(isa).info
}

/// Register tile and blocking of the column kernel of a path (clamped to
/// what the CPU supports), where it has one: AVX-512's `32 × 8`, AVX2's
/// `16 × 6`. Plans take it where C has few columns
/// ([`kernel_info_for_shape`]).
pub fn column_kernel_info(isa: Isa) -> Option<KernelInfo> {
    column_kernel_for(isa).map(|k| k.info)
}

/// Register tile and blocking the GEMM uses for an `m × n` C on path `isa`
/// with A pre-packed (as a convolution plan does) or column-major:
/// [`kernel_info`]'s, or that of the path's column kernel (AVX-512: `32 × 8`
/// tiles vectorised down the columns of C, AVX2: `16 × 6`) when C has so
/// few columns that row tiles would be mostly padding.
pub fn kernel_info_for_shape(isa: Isa, m: usize, n: usize) -> KernelInfo {
    kernel_for_shape(isa, m, n, true).info
}

/// How many k-steps before the end of a tile's loop the x86 kernels
/// prefetch its C tile. 128 steps are about 1000 cycles at two FMAs per
/// cycle, longer than a memory access, while the A and B panels stream only
/// 20 KiB through L1 in that time, too little to evict the tile again.
/// Measured at 2048³ (1 thread AVX-512, near-best of 30 runs): prefetching
/// at the start of the loop 81% of peak, 32 steps before the end 86%, 128
/// steps within noise of that or up to 3% better. Those runs still had the
/// masked epilogue, which waited on C far longer; since the AVX-512
/// epilogue stores whole rows unmasked, no prefetch, 32, 64, 128, 256 or
/// 512 steps are all within ±2% of each other (one process, alternating,
/// 1024³, 2048³ and the im2col shapes), and 128 stays.
#[cfg(target_arch = "x86_64")]
const PREFETCH_C_STEPS: usize = 128;

/// Runs a tile's `kc` k-steps on the accumulators `acc`, prefetching its C tile (`rows` rows of
/// `row_bytes`, unit column stride) [`PREFETCH_C_STEPS`] steps before the
/// end: prefetched at the start, it would be evicted by the A and B panels
/// streaming through L1, and each tile of a β = 1 pass would wait on C.
///
/// The accumulators go to `step` by reference on each call rather than
/// being captured, so that they stay in registers across both loops.
///
/// # Safety
/// `step` may run `kc` times.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_steps_prefetching_c<T>(
    kc: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    row_bytes: usize,
    acc: &mut T,
    mut step: impl FnMut(&mut T),
) {
    let tail = kc.min(PREFETCH_C_STEPS);
    for _ in 0..kc - tail {
        step(acc);
    }
    if csc == 1 {
        for i in 0..rows {
            let row = c.wrapping_offset(i as isize * rsc).cast_const();
            prefetch_read(row);
            prefetch_read(row.wrapping_add(row_bytes / 4 - 1));
        }
    }
    for _ in 0..tail {
        step(acc);
    }
}

/// Asks for the cache line holding `p` to be brought into L1 ahead of its
/// use: a hint for the portable parts of the GEMM (packing), which compiles
/// to nothing on targets without a stable prefetch instruction.
#[inline(always)]
pub(crate) fn prefetch_read<T>(p: *const T) {
    cfg_if::cfg_if! {
        if #[cfg(target_arch = "x86_64")] {
            // SAFETY: a prefetch never faults, whatever the address; SSE is
            // part of the x86_64 baseline.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
        } else {
            let _ = p;
        }
    }
}

/// The epilogue of one element, written once for every scalar path:
/// `*dst = clamp(product + β·*dst + bias)`, where `product` is α·(A·B) and C
/// is not read when `β = 0`.
///
/// # Safety
/// `dst` is valid for writes, and for reads unless `beta == 0`.
#[inline(always)]
pub(crate) unsafe fn store_scalar<T: Element>(
    dst: *mut T,
    product: T,
    beta: T,
    bias: T,
    clamp: Option<(T, T)>,
) {
    let mut v = product;
    if beta != T::ZERO {
        // SAFETY: C is readable when beta != 0 (contract).
        v = v + beta * unsafe { *dst };
    }
    v = v + bias;
    if let Some((lo, hi)) = clamp {
        v = super::clamp_keep_nan(v, lo, hi);
    }
    // SAFETY: writable (contract).
    unsafe { *dst = v };
}

/// Writes the `rows × cols` corner of a computed tile (`tile[i·stride + j]`)
/// to C through the epilogue, one element at a time. Kernels use it for any
/// tile their vector store cannot handle (a partial tile, or C with a
/// non-unit column stride), so edge handling is written once.
///
/// # Safety
/// As [`MicroKernelFn`] for `c`, `rsc`, `csc`, `rows`, `cols` and `epilogue`;
/// `tile` holds `rows` rows of `stride` values.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_tile_scalar(
    tile: &[f32],
    stride: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded contract.
    unsafe {
        store_scalar_each(c, rsc, csc, rows, cols, epilogue, |i, j| {
            tile[i * stride + j]
        })
    };
}

/// [`store_tile_scalar`] for a tile kept column by column: element `(i, j)`
/// at `columns[j·height + i]`, as the column kernels hold it.
///
/// # Safety
/// As [`store_tile_scalar`]; `columns` holds `cols` columns of `height ≥
/// rows` values.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_columns_scalar(
    columns: &[f32],
    height: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded contract.
    unsafe {
        store_scalar_each(c, rsc, csc, rows, cols, epilogue, |i, j| {
            columns[j * height + i]
        })
    };
}

/// The scalar store of both layouts: `value(i, j)` is the tile's product
/// at row `i`, column `j`.
///
/// # Safety
/// As [`store_tile_scalar`] for `c`, `rsc`, `csc`, `rows`, `cols` and
/// `epilogue`.
#[inline(always)]
unsafe fn store_scalar_each(
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue,
    value: impl Fn(usize, usize) -> f32,
) {
    for i in 0..rows {
        let bias = if epilogue.bias.is_null() {
            0.0
        } else {
            // SAFETY: bias holds `rows` values (contract).
            unsafe { *epilogue.bias.add(i) }
        };
        for j in 0..cols {
            // SAFETY: (i, j) is inside the tile's valid corner (contract);
            // C is readable when beta != 0.
            unsafe {
                store_scalar(
                    c.offset(i as isize * rsc + j as isize * csc),
                    epilogue.alpha * value(i, j),
                    epilogue.beta,
                    bias,
                    epilogue.clamp,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by the conv fuzz target): choosing the kernel of a
    /// plan whose output plane has 2^62 pixels overflowed the padded-work
    /// product.
    #[test]
    fn kernel_choice_on_huge_planes_does_not_overflow() {
        for isa in Isa::ALL {
            for (m, n) in [(1, 1usize << 62), (usize::MAX, usize::MAX), (1 << 40, 49)] {
                let info = kernel_info_for_shape(isa, m, n);
                assert!(info.mr > 0 && info.nr > 0);
            }
        }
    }
}
