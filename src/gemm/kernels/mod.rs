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
//! vectors, A broadcast); AVX-512 has two, `8 × 32` and `8 × 48`, the
//! wider one only on CPUs where it measured faster ([`wide_tiles`]) and for
//! C widths it tiles no worse ([`wide_tiles_pay`]). The two x86 paths also
//! have a column kernel, vectorised down the columns of C, for pre-packed A
//! and a C with few columns, where row tiles would be mostly padding
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
    /// Rows of A per L3 block where C has more rows than `mc`, in the
    /// tall-A order (the MR loop outside the NR loop over B blocks of half
    /// of L2; see [`crate::gemm::cache_model`]); 0 where the driver keeps
    /// the classic nest at every height.
    pub tall_mc: usize,
}

/// Row counts below a register tile that have their own kernels: those of
/// AVX-512's 8-row tiles (the only path with them).
const SHORT_ROWS: usize = 7;

/// Right-edge kernels a row kernel may have besides its full tile: AVX-512's
/// 8 × 48 has two (16 and 32 columns), its 8 × 32 one.
const MAX_EDGES: usize = 2;

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
    /// Kernels for right-edge tiles of at most `.0` columns, narrowest
    /// first, reading the same packed panels, where the full tile would be
    /// mostly padding.
    edges: [Option<(usize, MicroKernelFn<T>)>; MAX_EDGES],
    /// The kernel honours any A strides (`ars`, `acs`), so the driver may
    /// hand it a row-major A in place; otherwise A must be packed.
    a_strided: bool,
    /// The kernels for the one or two columns of C just past a multiple of
    /// the narrow width, which tiles would pad to a whole vector.
    dot: Option<DotKernels<T>>,
    /// The tiles for a bottom-edge panel of `r < mr` real rows, at
    /// `[e][r − 1]`: `e` indexes `edges`, and the full tile follows the
    /// last edge kernel.
    short: Option<[[MicroKernelFn<T>; SHORT_ROWS]; MAX_EDGES + 1]>,
}

impl<T> Kernel<T> {
    /// Register tile and blocking.
    #[inline]
    pub(crate) fn info(&self) -> &KernelInfo {
        &self.info
    }

    /// The narrowest right-edge kernel and the widest tile it serves.
    #[inline]
    pub(crate) fn narrow(&self) -> Option<(usize, MicroKernelFn<T>)> {
        self.edges[0]
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
    /// the narrowest edge kernel the columns fit, and one computing only
    /// the real rows where the path has it.
    #[inline]
    pub(crate) fn for_tile(&self, rows: usize, cols: usize) -> MicroKernelFn<T> {
        let edge = self.edge_for(cols);
        if let Some(short) = self.short.filter(|_| rows < self.info.mr) {
            if let Some(&f) = short[edge].get(rows.wrapping_sub(1)) {
                return f;
            }
        }
        match self.edges.get(edge) {
            Some(&Some((_, f))) => f,
            _ => self.func,
        }
    }

    /// The index in `edges` of the narrowest edge kernel that serves `cols`
    /// columns, or the number of edge kernels (the full tile).
    #[inline]
    fn edge_for(&self, cols: usize) -> usize {
        let mut index = 0;
        for &(width, _) in self.edges.iter().flatten() {
            if cols <= width {
                return index;
            }
            index += 1;
        }
        index
    }

    /// Columns the tile that `cols` columns run on computes, padding
    /// included: the narrowest edge kernel's width they fit, or NR.
    fn padded_columns(&self, cols: usize) -> usize {
        match self.edges.get(self.edge_for(cols)) {
            Some(&Some((width, _))) => width,
            _ => self.info.nr,
        }
    }

    /// This kernel with blocks of depth `kc` (a multiple of 8, at least 8).
    pub(crate) fn with_kc(mut self, kc: usize) -> Kernel<T> {
        self.info.kc = kc.next_multiple_of(8).max(8);
        self
    }

    /// This kernel with blocks of at most `mc` rows (a whole number of
    /// register tiles, at least one), in the classic nest at every height:
    /// the blocks of an A read in place, which must stay in L2.
    pub(crate) fn with_mc(mut self, mc: usize) -> Kernel<T> {
        let mr = self.info.mr;
        self.info.mc = (mc / mr * mr).max(mr);
        self.info.tall_mc = 0;
        self
    }

    /// This kernel with its cache blocking replaced by `b` (rounded up to
    /// whole register tiles, KC to a multiple of 8; see [`Blocking`]).
    pub(crate) fn with_blocking(mut self, b: Blocking) -> Kernel<T> {
        let KernelInfo { mr, nr, .. } = self.info;
        self.info.mc = b.mc.max(1).next_multiple_of(mr);
        self.info.kc = b.kc.max(1).next_multiple_of(8);
        self.info.nc = b.nc.max(1).next_multiple_of(nr);
        // The loop nest stays the model's; its tall-A blocks take the
        // forced MC, so that small problems cross their edges too.
        if self.info.tall_mc > 0 {
            self.info.tall_mc = self.info.mc;
        }
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
        tall_mc: model.tall_mc,
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

/// The row kernel of path `isa` (one `clamp_isa` admitted), the wide
/// tile where the path has one and `wide` asks for it.
fn build_kernel(isa: Isa, wide: bool) -> Kernel {
    let caches = cache_hierarchy();
    let (mr, nr, func): (usize, usize, MicroKernelFn) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if wide => (avx512::MR, avx512::NR_WIDE, avx512::kernel_wide),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (avx512::MR, avx512::NR, avx512::kernel),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (avx2::MR, avx2::NR, avx2::kernel),
        _ => (portable::MR, portable::NR, portable::kernel),
    };
    let edges: [Option<(usize, MicroKernelFn)>; MAX_EDGES] = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if wide => [
            Some((avx512::NR_NARROW, avx512::kernel_narrow)),
            Some((avx512::NR, avx512::kernel)),
        ],
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => [Some((avx512::NR_NARROW, avx512::kernel_narrow)), None],
        _ => [None; MAX_EDGES],
    };
    let dot: Option<DotKernels> = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(DotKernels {
            rows: avx512::dot_rows,
            with_tile: avx512::kernel_with_columns,
        }),
        _ => None,
    };
    let short: Option<[[MicroKernelFn; SHORT_ROWS]; MAX_EDGES + 1]> = match isa {
        // One, two and three zmm: the 8 × 48 tile's edges and full tile.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if wide => Some(avx512::KERNELS_SHORT),
        // The 8 × 32 tile's narrow edge and full tile; the third entry,
        // past its last edge plus one, is never indexed.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let [one, two, _] = avx512::KERNELS_SHORT;
            Some([one, two, two])
        }
        _ => None,
    };
    Kernel {
        info: blocking(isa, mr, nr, caches),
        func,
        edges,
        a_strided: true,
        dot,
        short,
    }
}

/// The row kernel of a supported path, built once per path: on AVX-512,
/// the `8 × 32` tile.
pub(crate) fn kernel_for(isa: Isa) -> &'static Kernel {
    static TABLE: [OnceLock<Kernel>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let isa = clamp_isa(isa);
    TABLE[isa.index()].get_or_init(|| build_kernel(isa, false))
}

/// The path's wide row kernel (AVX-512's `8 × 48`), where it has one and
/// this CPU runs it ([`wide_tiles`]).
fn wide_kernel_for(isa: Isa) -> Option<&'static Kernel> {
    wide_kernel(isa).filter(|_| wide_tiles())
}

/// The path's wide row kernel, where it has one, whether or not this CPU
/// runs it by default.
fn wide_kernel(isa: Isa) -> Option<&'static Kernel> {
    match clamp_isa(isa) {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            static WIDE: OnceLock<Kernel> = OnceLock::new();
            Some(WIDE.get_or_init(|| build_kernel(Isa::Avx512, true)))
        }
        _ => None,
    }
}

/// Whether this CPU, where it has AVX-512, runs its `8 × 48` row tile
/// (where it pays, [`wide_tiles_pay`]) besides the `8 × 32`: on Intel
/// CPUs, where it measured 2–15% faster (`avx512::NR_WIDE`), not on AMD's (Zen 5: 4–11%
/// slower, `avx512::MR`), nor where the vendor is unknown.
/// `CPUCONV_AVX512_TILE=8x32` or `8x48` overrides the choice (read once per
/// process); `.ci/run` runs the convolution tests on each tile that way,
/// and the GEMM tests force each per call (`GemmOptions::wide_tile`).
pub fn wide_tiles() -> bool {
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        let by_vendor = crate::arch::vendor() == crate::arch::Vendor::Intel;
        match std::env::var("CPUCONV_AVX512_TILE") {
            Err(_) => by_vendor,
            Ok(value) => match value.trim() {
                "" => by_vendor,
                "8x32" => false,
                "8x48" => true,
                other => {
                    eprintln!(
                        "cpuconv: CPUCONV_AVX512_TILE={other:?} is not one of 8x32, 8x48; \
                         using {}",
                        if by_vendor { "8x48" } else { "8x32" }
                    );
                    by_vendor
                }
            },
        }
    })
}

/// Whether `8 × 48` tiles (edges of 16 and 32 columns) cost less than
/// `8 × 32` tiles (edge of 16) on a C of `n` columns, on a CPU that runs
/// the wide tile ([`wide_tiles`]). Both pad C to whole zmm, so what differs
/// is which tiles the zmm fall into. Each tile is costed per k-step in
/// hundredths of a two-zmm tile: the one-zmm edge 62 (its 8 broadcasts
/// weigh on 8 FMAs: load-bound, 1.25× a full tile per column), two zmm 100,
/// three zmm 143 (0.95× per column: what the wide tile measured on whole
/// GEMMs, `avx512::NR_WIDE`). So 64 columns take two 32-wide tiles
/// (200 against 143 + 62), 96 or 3136 the wide ones.
///
/// The one or two columns just past a multiple of 16 that the driver
/// finishes as dot products (both tiles have the same one-zmm edge, so the
/// same peel) are left out: 49 columns are 48 in tiles, one wide tile
/// (143) against a 32-wide and a 16-wide one (162). Costing all 49 picked
/// the narrow tiles: 1 thread, Intel Xeon (family 6 model 167), `sgemm`
/// row-major, one process each alternating, three rounds, best GFLOP/s,
/// 2048×512×49 119–125 on them against 142–155 with the wide tile forced,
/// 256×512×49 126–134 against 153–161.
pub fn wide_tiles_pay(n: usize) -> bool {
    // In u128: a plan may describe a far larger output than it will ever
    // run on (`padded_work` likewise).
    const ONE: u128 = 62;
    const TWO: u128 = 100;
    const THREE: u128 = 143;
    const ZMM: usize = 16;
    let zmm = ((n - columns_past_edges(n, ZMM)) as u128).div_ceil(ZMM as u128);
    let narrow = zmm / 2 * TWO + zmm % 2 * ONE;
    let wide = zmm / 3 * THREE + [0, ONE, TWO][(zmm % 3) as usize];
    wide < narrow
}

/// Of a C `n` columns wide, the one or two just past a multiple of an edge
/// tile `width` columns wide, which the driver finishes as dot products
/// where the kernel has them (`driver::macro_kernel::peeled_columns`), and
/// which [`wide_tiles_pay`] leaves out of its costs: 0 for a C no wider
/// than one edge tile, or ending on or well past a multiple of it.
pub(crate) fn columns_past_edges(n: usize, width: usize) -> usize {
    if n > width && n % width <= 2 {
        n % width
    } else {
        0
    }
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
        edges: [None; MAX_EDGES],
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
    let last = if rem > 0 {
        kernel.padded_columns(rem)
    } else {
        0
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
///
/// `wide` forces AVX-512's row tile (tests: `GemmOptions::wide_tile`).
pub(crate) fn kernel_for_shape(
    isa: Isa,
    m: usize,
    n: usize,
    a_columns: bool,
    wide: Option<bool>,
) -> &'static Kernel {
    let rows = row_kernel_for_shape(isa, n, wide);
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

/// The row kernel of path `isa` for a C of `n` columns: the wide tile where
/// the CPU runs it and it pays on `n` ([`wide_tiles_pay`]), else the path's
/// row kernel; `wide` forces the choice where the path has both.
fn row_kernel_for_shape(isa: Isa, n: usize, wide: Option<bool>) -> &'static Kernel {
    let chosen = match wide {
        None => wide_kernel_for(isa).filter(|_| wide_tiles_pay(n)),
        Some(true) => wide_kernel(isa),
        Some(false) => None,
    };
    chosen.unwrap_or_else(|| kernel_for(isa))
}

/// The kernel for an `m × n` C: of the requested path (clamped to the CPU)
/// or of the active one, with the blocking forced by `blocking` if set;
/// `a_columns` and `wide` as for [`kernel_for_shape`].
pub(crate) fn select(
    requested: Option<Isa>,
    m: usize,
    n: usize,
    a_columns: bool,
    blocking: Option<Blocking>,
    wide: Option<bool>,
) -> Kernel {
    let isa = requested.unwrap_or_else(crate::isa);
    let kernel = *kernel_for_shape(isa, m, n, a_columns, wide);
    match blocking {
        Some(b) => kernel.with_blocking(b),
        None => kernel,
    }
}

/// Register tile and blocking of a path's widest row kernel (clamped to
/// what the CPU supports): on AVX-512, `8 × 48` where the CPU runs it
/// ([`wide_tiles`]), else `8 × 32`. A C narrower than it may take a
/// narrower one ([`kernel_info_for_operands`]).
pub fn kernel_info(isa: Isa) -> KernelInfo {
    wide_kernel_for(isa).unwrap_or_else(|| kernel_for(isa)).info
}

/// Register tile and blocking of a path's narrower row kernel, where the
/// CPU runs two (clamped to what the CPU supports): AVX-512's `8 × 32` next
/// to its `8 × 48` ([`wide_tiles`]), for C widths the wide tile pads worse
/// ([`wide_tiles_pay`]).
pub fn narrower_row_kernel_info(isa: Isa) -> Option<KernelInfo> {
    wide_kernel_for(isa).map(|_| kernel_for(isa).info)
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
    kernel_info_for_operands(isa, m, n, true)
}

/// Register tile and blocking the GEMM uses for an `m × n` C on path
/// `isa`, with A's panels reaching the kernel with their rows contiguous
/// (`a_columns`: pre-packed, or column-major) or not: the column kernel is
/// eligible only in the first case ([`kernel_info_for_shape`]); AVX-512's
/// row tile is `8 × 48` or `8 × 32` by `n` in both ([`wide_tiles`]).
pub fn kernel_info_for_operands(isa: Isa, m: usize, n: usize, a_columns: bool) -> KernelInfo {
    kernel_info_for_tile(isa, m, n, a_columns, None)
}

/// Tests only: [`kernel_info_for_operands`] with AVX-512's row tile forced
/// by `wide` (`Some(true)`: `8 × 48`, `Some(false)`: `8 × 32`), as
/// `GemmOptions::wide_tile` forces it.
#[doc(hidden)]
pub fn kernel_info_for_tile(
    isa: Isa,
    m: usize,
    n: usize,
    a_columns: bool,
    wide: Option<bool>,
) -> KernelInfo {
    kernel_for_shape(isa, m, n, a_columns, wide).info
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

/// How many k-steps ahead the x86 row kernels prefetch a column-major A
/// they read in place. Its steps lie a column apart, each on a line of
/// its own, where no hardware prefetcher follows them. Measured, 1 thread
/// AVX-512, Intel Xeon (family 6 model 167), `sgemm` with A column-major,
/// one process alternating, median of 11 rounds, GFLOP/s without → with:
/// 512×2048×64 104 → 127, 2048×512×32 81 → 107, 1024×1024×96 106 → 138,
/// 3136×576×64 107 → 122, 784×1152×128 117 → 145; AVX2 on the same CPU
/// 86 → 88, 66 → 74, 74 → 88, 74 → 84, 91 → 100. 4, 16 and 32 steps ahead
/// ran 0.93–1.0× of 8. With the prefetch, reading such an A in place beat
/// packing it on every one of these shapes (packed: 0.60–0.97×).
#[cfg(target_arch = "x86_64")]
pub(crate) const A_COLUMN_PREFETCH_STEPS: usize = 8;

/// Runs a tile's `kc` k-steps on the accumulators `acc`, prefetching its C tile (`rows` rows of
/// `row_bytes`, unit column stride) [`PREFETCH_C_STEPS`] steps before the
/// end: prefetched at the start, it would be evicted by the A and B panels
/// streaming through L1, and each tile of a β = 1 pass would wait on C.
///
/// The accumulators go to `step` by reference on each call rather than
/// being captured, so that they stay in registers across both loops.
/// `UNROLL` steps run per iteration of the first loop: 4 for a packed A
/// panel, whose step addresses then fold into constant offsets; 1 where A
/// or B is read in place, whose steps need every register already.
///
/// # Safety
/// `step` may run `kc` times.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_steps_prefetching_c<T, const UNROLL: usize>(
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
    let body = kc - tail;
    for _ in 0..body / UNROLL {
        for _ in 0..UNROLL {
            step(acc);
        }
    }
    for _ in 0..body % UNROLL {
        step(acc);
    }
    if csc == 1 {
        for i in 0..rows {
            let row = c.wrapping_offset(i as isize * rsc).cast_const();
            prefetch_read(row);
            prefetch_read(row.wrapping_add(row_bytes / 4 - 1));
        }
    }
    for _ in 0..tail / UNROLL {
        for _ in 0..UNROLL {
            step(acc);
        }
    }
    for _ in 0..tail % UNROLL {
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

    /// The driver peels one or two columns just past a multiple of the
    /// edge tile's width, never a C no wider than one edge tile.
    #[test]
    fn the_columns_past_edges_are_one_or_two_past_a_multiple() {
        let cases = [
            (16, 0),
            (17, 1),
            (18, 2),
            (19, 0),
            (32, 0),
            (49, 1),
            (50, 2),
            (51, 0),
        ];
        for (n, past) in cases {
            assert_eq!(columns_past_edges(n, 16), past, "{n}");
        }
        // No wider than one edge tile: nothing to peel.
        assert_eq!(columns_past_edges(1, 16), 0);
        assert_eq!(columns_past_edges(2, 16), 0);
        assert_eq!(columns_past_edges(7, 6), 1);
    }

    /// The wide tile takes C widths it covers with fewer one-zmm edges or
    /// enough three-zmm tiles to make up for one; 8 × 32 keeps the rest.
    #[test]
    fn wide_tiles_pay_where_their_edges_cost_no_more() {
        // 17, 18, 33, 34, 65 and 66: the columns past 16, 32 and 64 are
        // peeled, so the tiles see 16, 32 and 64; 49 and 50: they see 48.
        let narrow_wins = [1, 16, 17, 18, 32, 33, 34, 64, 65, 66];
        let wide_wins = [48, 49, 50, 80, 96, 112, 128, 196, 256, 784, 3136];
        for n in narrow_wins {
            assert!(!wide_tiles_pay(n), "{n}");
        }
        for n in wide_wins {
            assert!(wide_tiles_pay(n), "{n}");
        }
        // Past a handful of panels the wide tile always pays.
        assert!((96..5000).all(wide_tiles_pay));
        assert!(wide_tiles_pay(usize::MAX));
    }

    /// The 8 × 48 kernel serves 1–16 columns with its one-zmm edge, 17–32
    /// with its two-zmm edge (the 8 × 32 tile's full kernel), and 33–48
    /// with the full tile; the 8 × 32 kernel has only the first edge.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_avx512_tile_picks_the_narrowest_edge() {
        if !Isa::Avx512.is_supported() {
            return;
        }
        let wide = wide_kernel(Isa::Avx512).expect("AVX-512 has a wide tile");
        let base = kernel_for(Isa::Avx512);
        assert_eq!((wide.info.nr, base.info.nr), (48, 32));
        for (cols, edge, padded) in [
            (1, 0, 16),
            (16, 0, 16),
            (17, 1, 32),
            (32, 1, 32),
            (33, 2, 48),
            (48, 2, 48),
        ] {
            assert_eq!(wide.edge_for(cols), edge, "{cols}");
            assert_eq!(wide.padded_columns(cols), padded, "{cols}");
        }
        for (cols, edge, padded) in [(1, 0, 16), (16, 0, 16), (17, 1, 32), (32, 1, 32)] {
            assert_eq!(base.edge_for(cols), edge, "{cols}");
            assert_eq!(base.padded_columns(cols), padded, "{cols}");
        }
        assert_eq!(wide.narrow().map(|(w, _)| w), Some(16));
        // 100 = 2·48 + 4 columns: the last four pad to one zmm on either
        // tile; 2048 rows are whole panels.
        assert_eq!(padded_work(wide, 2048, 100), 2048 * 112);
        assert_eq!(padded_work(base, 2048, 100), 2048 * 112);
        assert_eq!(padded_work(wide, 2048, 120), 2048 * 128);
    }

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
