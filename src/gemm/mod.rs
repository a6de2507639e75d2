//! Single-precision GEMM: `C ← α·A·B + β·C` over general-stride views.
//!
//! Two engines sit behind one entry point:
//!
//! * [`GemmBackend::Native`] (the default): our BLIS-style engine. A is packed
//!   into MR-row panels, B into NR-column panels (both zero-filled at the
//!   edges), and a per-ISA micro-kernel computes full MR×NR tiles. Blocking
//!   comes from the cache sizes the OS reports; threads come from rayon.
//! * [`GemmBackend::Matrixmultiply`]: the `matrixmultiply` crate, kept as the
//!   baseline to compare against. Its built-in threading is process-global, so
//!   we thread it ourselves by splitting C into column blocks.
//!
//! BLAS semantics hold on both: with `β = 0`, C is never read (NaN or garbage
//! in C cannot leak into the result); with `α = 0`, A and B are never read;
//! `k = 0` scales C by β.
//!
//! Inside the crate, the convolution (and every operator after it) reaches
//! the same engines through one internal interface, the `engine` module:
//! pre-packed A, B sources, workspace bounds and a fused epilogue.
//!
//! ```
//! use cpuconv::gemm::{sgemm, GemmOptions, MatMut, MatRef};
//! // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
//! let a = [1.0, 2.0, 3.0, 4.0];
//! let b = [5.0, 6.0, 7.0, 8.0];
//! let mut c = [f32::NAN; 4]; // β = 0: never read
//! sgemm(
//!     1.0,
//!     MatRef::row_major(&a, 2, 2),
//!     MatRef::row_major(&b, 2, 2),
//!     0.0,
//!     MatMut::row_major(&mut c, 2, 2),
//!     &GemmOptions::default(),
//! )
//! .unwrap();
//! assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
//! ```

pub mod cache;
pub mod cache_model;
mod driver;
mod element;
pub(crate) mod engine;
pub mod kernels;
mod matrixmultiply;
mod pack;
pub(crate) mod transpose;

use crate::error::GemmError;
use std::num::NonZeroUsize;

pub use crate::arch::{isa, Isa};

/// Which engine computes a GEMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmBackend {
    /// cpuconv's own packed SIMD engine.
    #[default]
    Native,
    /// The `matrixmultiply` crate (the baseline).
    Matrixmultiply,
}

/// How many threads a GEMM or convolution may use.
///
/// Work runs in the caller's *current* rayon pool: wrap the call in
/// `pool.install(|| ...)` to choose the pool. Calling from inside a rayon
/// worker is fine. Problems too small to amortise the fork-join run on the
/// calling thread regardless of this setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Parallelism {
    /// Only the calling thread.
    Sequential,
    /// Every thread of the current rayon pool.
    #[default]
    Rayon,
    /// At most this many threads of the current rayon pool.
    RayonCapped(NonZeroUsize),
}

impl Parallelism {
    /// The most threads this setting allows in the current rayon pool.
    pub fn max_threads(self) -> usize {
        match self {
            Parallelism::Sequential => 1,
            Parallelism::Rayon => rayon::current_num_threads().max(1),
            Parallelism::RayonCapped(cap) => cap.get().min(rayon::current_num_threads().max(1)),
        }
    }

    /// `Sequential` for 1, otherwise `RayonCapped(n)`; 0 means the whole pool.
    pub fn threads(n: usize) -> Parallelism {
        match n {
            0 => Parallelism::Rayon,
            1 => Parallelism::Sequential,
            n => Parallelism::RayonCapped(NonZeroUsize::new(n).expect("n > 1")),
        }
    }
}

/// Engine and threading for one GEMM call, built with `default()` and the
/// chained setters so that later versions can add options.
///
/// ```
/// use cpuconv::{GemmBackend, GemmOptions, Parallelism};
/// let options = GemmOptions::default()
///     .backend(GemmBackend::Native)
///     .parallelism(Parallelism::threads(2));
/// assert_eq!(options.isa, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct GemmOptions {
    /// Which engine computes the product.
    pub backend: GemmBackend,
    /// How many threads it may use.
    pub parallelism: Parallelism,
    /// Force a micro-kernel path for this call (clamped to what the CPU
    /// supports); `None` uses [`isa()`].
    pub isa: Option<Isa>,
    /// Tests only: cache blocking in place of the cache model's.
    #[doc(hidden)]
    pub blocking: Option<crate::testing::Blocking>,
    /// Tests only: AVX-512's `8 × 48` (`Some(true)`) or `8 × 32` row tile
    /// in place of the CPU's and the shape's choice
    /// ([`kernels::wide_tiles`]).
    #[doc(hidden)]
    pub wide_tile: Option<bool>,
}

impl GemmOptions {
    /// Sets the engine.
    pub fn backend(mut self, backend: GemmBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets how many threads the call may use.
    pub fn parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Forces a micro-kernel path (clamped to what the CPU supports).
    pub fn isa(mut self, isa: impl Into<Option<Isa>>) -> Self {
        self.isa = isa.into();
        self
    }

    /// Tests only: forces the cache blocking.
    #[doc(hidden)]
    pub fn blocking(mut self, blocking: crate::testing::Blocking) -> Self {
        self.blocking = Some(blocking);
        self
    }

    /// Tests only: forces AVX-512's row tile (`true`: `8 × 48`).
    #[doc(hidden)]
    pub fn wide_tile(mut self, wide: impl Into<Option<bool>>) -> Self {
        self.wide_tile = wide.into();
        self
    }
}

/// A non-linearity applied to every output element as it is stored.
///
/// One rule on every algorithm, ISA and tile (interior, edge, strided),
/// PyTorch's: the clamp is `min(max(x, lo), hi)`, so when `min > max` every
/// element becomes `max` (as `torch.clamp` does), and a NaN input stays NaN
/// through `Relu`, `Relu6` and `Clamp` (as `torch.relu`, `relu6` and `clamp`
/// propagate it). A NaN bound is refused when a convolution or plan is
/// asked for it ([`crate::ConvError::InvalidActivation`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `min(max(x, min), max)`: every element is `max` when `min > max`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

impl Activation {
    /// The `(lo, hi)` clamp this activation is, or `None` for the identity.
    pub(crate) fn bounds(self) -> Option<(f32, f32)> {
        match self {
            Activation::None => None,
            Activation::Relu => Some((0.0, f32::INFINITY)),
            Activation::Relu6 => Some((0.0, 6.0)),
            Activation::Clamp { min, max } => Some((min, max)),
        }
    }

    /// `Err` naming the bounds when a `Clamp` bound is NaN.
    pub(crate) fn validate(self) -> Result<(), crate::ConvError> {
        match self {
            Activation::Clamp { min, max } if min.is_nan() || max.is_nan() => {
                Err(crate::ConvError::InvalidActivation { min, max })
            }
            _ => Ok(()),
        }
    }

    /// Applies the activation to one value, as every path's store does.
    ///
    /// ```
    /// use cpuconv::Activation;
    /// assert_eq!(Activation::Relu6.apply(7.5), 6.0);
    /// assert!(Activation::Relu.apply(f32::NAN).is_nan());
    /// // min > max: everything becomes max, as torch.clamp does.
    /// assert_eq!(Activation::Clamp { min: 2.0, max: 1.0 }.apply(-5.0), 1.0);
    /// ```
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self.bounds() {
            None => x,
            Some((lo, hi)) => clamp_keep_nan(x, lo, hi),
        }
    }
}

/// `min(max(x, lo), hi)` with NaN in `x` kept: what the vector stores
/// compute (`max(lo, x)` then `min(hi, ·)`, the x86 forms returning their
/// second operand on NaN). With `lo > hi` the result is `hi`.
#[inline]
pub(crate) fn clamp_keep_nan<T: PartialOrd>(x: T, lo: T, hi: T) -> T {
    let v = if x < lo { lo } else { x };
    if v > hi {
        hi
    } else {
        v
    }
}

/// A read-only matrix view: `rows × cols` elements of `data`, element
/// `(i, j)` at `data[offset + i·row_stride + j·col_stride]` (`offset` is 0
/// unless given with [`MatRef::with_offset`], which negative strides need).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> MatRef<'a> {
    /// A view with element (0, 0) at `data[0]` and arbitrary non-negative
    /// strides (zero or transposed). Bounds are checked when the view is used.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        Self::with_offset(data, 0, rows, cols, row_stride, col_stride)
    }

    /// A view with element (0, 0) at `data[offset]`, so strides may be
    /// negative (a reversed or flipped matrix). Bounds are checked when the
    /// view is used.
    ///
    /// ```
    /// use cpuconv::gemm::MatRef;
    /// // [1 2 3] read backwards as the row [3 2 1].
    /// let v = MatRef::with_offset(&[1.0, 2.0, 3.0], 2, 1, 3, 3, -1);
    /// # let _ = v;
    /// ```
    pub fn with_offset(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        MatRef {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols as isize, 1)
    }

    /// A dense column-major `rows × cols` matrix.
    pub fn col_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows as isize)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self::with_offset(
            self.data,
            self.offset,
            self.cols,
            self.rows,
            self.col_stride,
            self.row_stride,
        )
    }
}

/// A mutable matrix view; see [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> MatMut<'a> {
    /// A view with element (0, 0) at `data[0]` and non-negative strides. It
    /// must not map two elements to one location; that and the bounds are
    /// checked when the view is used.
    pub fn new(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        Self::with_offset(data, 0, rows, cols, row_stride, col_stride)
    }

    /// A view with element (0, 0) at `data[offset]`; strides may be negative.
    pub fn with_offset(
        data: &'a mut [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        MatMut {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols as isize, 1)
    }

    /// A dense column-major `rows × cols` matrix.
    pub fn col_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows as isize)
    }
}

/// Smallest and largest element offsets a `rows × cols` view touches, or
/// `None` when the arithmetic overflows. Requires `rows, cols > 0`.
fn offset_span(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(isize, isize)> {
    let r = isize::try_from(rows - 1).ok()?.checked_mul(rs)?;
    let c = isize::try_from(cols - 1).ok()?.checked_mul(cs)?;
    Some((
        r.min(0).checked_add(c.min(0))?,
        r.max(0).checked_add(c.max(0))?,
    ))
}

/// Checks that every element of the view lies inside a slice of `len`
/// elements, element (0, 0) being at `offset`.
#[allow(clippy::too_many_arguments)]
fn check_view(
    matrix: &'static str,
    offset: usize,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    len: usize,
) -> Result<(), GemmError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let overflow = GemmError::Overflow {
        what: "matrix view offsets",
    };
    let (lo, hi) = offset_span(rows, cols, rs, cs).ok_or(overflow.clone())?;
    let base = isize::try_from(offset).map_err(|_| overflow.clone())?;
    let (lo, hi) = (
        lo.checked_add(base).ok_or(overflow.clone())?,
        hi.checked_add(base).ok_or(overflow)?,
    );
    if lo < 0 || hi as usize >= len {
        return Err(GemmError::OutOfBounds {
            matrix,
            min_offset: lo,
            max_offset: hi,
            len,
        });
    }
    Ok(())
}

/// Whether `(i, j) ↦ i·rs + j·cs` is one-to-one on `rows × cols`. Two
/// elements collide iff `di·rs = −dj·cs` for some `(di, dj) ≠ 0` with
/// `|di| < rows` and `|dj| < cols`; the smallest such step is
/// `(|cs|/g, |rs|/g)` with `g = gcd(|rs|, |cs|)`.
fn view_is_injective(rows: usize, cols: usize, rs: isize, cs: isize) -> bool {
    if rows <= 1 || cols <= 1 {
        // One line of elements: only a zero stride along it collides.
        return (rows <= 1 || rs != 0) && (cols <= 1 || cs != 0);
    }
    let (r, c) = (rs.unsigned_abs(), cs.unsigned_abs());
    if r == 0 || c == 0 {
        return false;
    }
    let g = gcd(r, c);
    !(c / g < rows && r / g < cols)
}

/// Greatest common divisor (`gcd(a, 0) = a`).
pub(crate) fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Safe GEMM: `C ← α·A·B + β·C`, where A is `m × k`, B is `k × n` and C is
/// `m × n`. Checks that the shapes agree, that every view stays inside its
/// slice, and that C has no two elements in one place.
pub fn sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: MatMut<'_>,
    options: &GemmOptions,
) -> Result<(), GemmError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.rows != m || c.cols != n {
        return Err(GemmError::DimensionMismatch {
            a: (a.rows, a.cols),
            b: (b.rows, b.cols),
            c: (c.rows, c.cols),
        });
    }
    check_view(
        "a",
        a.offset,
        m,
        k,
        a.row_stride,
        a.col_stride,
        a.data.len(),
    )?;
    check_view(
        "b",
        b.offset,
        k,
        n,
        b.row_stride,
        b.col_stride,
        b.data.len(),
    )?;
    check_view(
        "c",
        c.offset,
        m,
        n,
        c.row_stride,
        c.col_stride,
        c.data.len(),
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if !view_is_injective(m, n, c.row_stride, c.col_stride) {
        return Err(GemmError::OverlappingOutput {
            row_stride: c.row_stride,
            col_stride: c.col_stride,
        });
    }
    // Views with k = 0 are never read, and their offset may sit anywhere.
    let origin = |data_len: usize, offset: usize| offset.min(data_len.saturating_sub(1));
    let (oa, ob) = (
        origin(a.data.len(), a.offset),
        origin(b.data.len(), b.offset),
    );
    // SAFETY: every (i, j) of each view was checked to lie inside its slice,
    // relative to its (0, 0) offset (A and B are not read when k = 0); C is
    // injective, exclusively borrowed, and cannot alias the shared A and B.
    unsafe {
        sgemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr().wrapping_add(oa),
            a.row_stride,
            a.col_stride,
            b.data.as_ptr().wrapping_add(ob),
            b.row_stride,
            b.col_stride,
            beta,
            c.data.as_mut_ptr().add(c.offset),
            c.row_stride,
            c.col_stride,
            options,
        );
    }
    Ok(())
}

/// Raw GEMM over pointers and element strides, in the form of
/// `matrixmultiply::sgemm` and BLAS: `C ← α·A·B + β·C` with A `m × k`,
/// B `k × n`, C `m × n`.
///
/// # Safety
/// * For every `i < m, p < k`, `a.offset(i·rsa + p·csa)` is valid for reads;
///   likewise B for `p < k, j < n`; when `k = 0` or `α = 0` they are not read.
/// * For every `i < m, j < n`, `c.offset(i·rsc + j·csc)` is valid for reads and
///   writes, no two `(i, j)` share a location, and C overlaps neither A nor B.
/// * No other thread accesses C during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_raw(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    options: &GemmOptions,
) {
    let c = engine::StridedC {
        ptr: c,
        rs: rsc,
        cs: csc,
    };
    let a = engine::ASource::Strided(engine::StridedMatrix {
        ptr: a,
        rs: rsa,
        cs: csa,
    });
    let b = engine::StridedMatrix {
        ptr: b,
        rs: rsb,
        cs: csb,
    };
    // SAFETY: forwarded from this function's contract.
    unsafe {
        engine::gemm_with_epilogue(
            m,
            k,
            n,
            alpha,
            &a,
            &b,
            beta,
            c,
            &engine::Epilogue::NONE,
            options,
            None,
        )
    }
}
