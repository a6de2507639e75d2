//! The GEMM as the crate's operators see it: the one interface that
//! convolution (and the coming backward, transposed and other element-type
//! paths) builds on. Everything an operator needs is named here, and an
//! operator imports nothing else from the GEMM but the public API types
//! (`GemmOptions`, `Parallelism`, `Activation`, …):
//!
//! * A: a strided matrix, packed block by block as the loops reach it, or a
//!   [`PackedA`] packed once ahead of time (weights reused across calls).
//! * B: any [`BSource`]: a strided matrix ([`StridedMatrix`]) or a view
//!   that computes B's values as they are packed.
//! * C: a [`StridedC`] destination, written through an [`Epilogue`] (bias
//!   per row, clamp) as tiles are stored.
//! * Workspace: per-task [`PackBuffers`], bounded by [`pack_bounds`]
//!   whatever the problem size.
//! * [`gemm_with_epilogue`]: `C ← act(α·A·B + β·C + bias)`.
//!
//! The element type is a parameter of every operand type, and of the
//! driver's loop nest behind them; the entry point, which picks the
//! micro-kernels, is `f32` only today, as the kernels are.

pub(crate) use super::driver::{pack_bounds, peels_with_a_in_place, B_ROW_ALIGN};
pub(crate) use super::element::Element;
pub(crate) use super::kernels::KernelInfo;
pub(crate) use super::pack::PackBuffers;

use super::kernels::select;
use super::{driver, matrixmultiply, GemmBackend, GemmOptions, Isa};
use crate::testing::Blocking;

/// A read-only matrix as a pointer with element strides: element `(i, j)`
/// at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StridedMatrix<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> StridedMatrix<T> {
    /// The same memory viewed transposed.
    #[inline]
    pub(crate) fn t(self) -> Self {
        StridedMatrix {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether the matrix is column-major (unit row stride, columns further
    /// apart): each k-step of an A panel is then one contiguous run.
    #[inline]
    pub(crate) fn is_column_major(&self) -> bool {
        self.rs == 1 && self.cs > 1
    }
}

/// C: a writable matrix as a pointer with element strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StridedC<T> {
    pub ptr: *mut T,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: these are views the GEMM's callers vouch for (see `sgemm_raw`):
// a StridedMatrix is read-only and stays valid and unmodified for the whole
// call, on every thread; C is written only in disjoint blocks, one per task.
unsafe impl<T: Sync> Send for StridedMatrix<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for StridedMatrix<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for StridedC<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for StridedC<T> {}

/// A, packed ahead of time for one kernel (a convolution plan's weights):
/// `rows.div_ceil(mr)` panels of `depth × mr`, panel `q` at
/// `panels[q·depth·mr..]`, value `(i, p)` of a panel at `p·mr + i`, rows
/// past `rows` zero.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackedA<'a, T> {
    panels: &'a [T],
    rows: usize,
    depth: usize,
    mr: usize,
}

impl<'a, T: Element> PackedA<'a, T> {
    /// Elements the panels of a `rows × depth` A take for a kernel with
    /// `mr` rows.
    pub(crate) fn packed_len(rows: usize, depth: usize, mr: usize) -> usize {
        rows.div_ceil(mr) * mr * depth
    }

    /// Packs the row-major `rows × depth` matrix `a` into the first
    /// [`PackedA::packed_len`] elements of `dst`.
    ///
    /// # Panics
    /// When `a` is shorter than `rows·depth` or `dst` than the packed length.
    pub(crate) fn pack(a: &[T], rows: usize, depth: usize, mr: usize, dst: &'a mut [T]) -> Self {
        Self::pack_dense(a, depth, 1, rows, depth, mr, dst)
    }

    /// Packs the column-major `rows × depth` matrix `a` (row `i` of column
    /// `p` at `a[p·rows + i]`) as [`PackedA::pack`] packs a row-major one:
    /// each k-step of a panel is one contiguous copy.
    ///
    /// # Panics
    /// As [`PackedA::pack`].
    pub(crate) fn pack_column_major(
        a: &[T],
        rows: usize,
        depth: usize,
        mr: usize,
        dst: &'a mut [T],
    ) -> Self {
        Self::pack_dense(a, 1, rows, rows, depth, mr, dst)
    }

    /// [`PackedA::pack`] of the `rows × depth` matrix that fills
    /// `a[..rows·depth]` with strides `rs` and `cs` (one of them 1, the
    /// other the extent of the other axis).
    fn pack_dense(
        a: &[T],
        rs: usize,
        cs: usize,
        rows: usize,
        depth: usize,
        mr: usize,
        dst: &'a mut [T],
    ) -> Self {
        debug_assert!((rs, cs) == (depth, 1) || (rs, cs) == (1, rows));
        let len = Self::packed_len(rows, depth, mr);
        assert!(
            a.len() >= rows * depth,
            "A holds {} of {rows}×{depth}",
            a.len()
        );
        let dst = &mut dst[..len];
        // SAFETY: `a` holds the rows × depth block at these strides (checked
        // above: the last element is at (rows − 1)·rs + (depth − 1)·cs <
        // rows·depth), and dst holds exactly the packed length.
        unsafe {
            super::pack::pack_a_strided(a.as_ptr(), rs as isize, cs as isize, rows, depth, mr, dst)
        };
        Self::from_panels(dst, rows, depth, mr)
    }

    /// Panels [`PackedA::pack`] wrote earlier (stored in a plan, say).
    ///
    /// # Panics
    /// When `panels` is not the packed length.
    pub(crate) fn from_panels(panels: &'a [T], rows: usize, depth: usize, mr: usize) -> Self {
        assert_eq!(
            panels.len(),
            Self::packed_len(rows, depth, mr),
            "packed A of {rows}×{depth} for mr = {mr}"
        );
        PackedA {
            panels,
            rows,
            depth,
            mr,
        }
    }

    /// Rows of A.
    #[inline]
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Depth (columns of A), the step from one panel to the next over `mr`.
    #[inline]
    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// Rows per panel: the MR of the kernel it was packed for.
    #[inline]
    pub(crate) fn mr(&self) -> usize {
        self.mr
    }

    /// The first panel.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *const T {
        self.panels.as_ptr()
    }
}

/// Where A comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ASource<'a, T> {
    /// A strided matrix, packed block by block as the loops reach it (or,
    /// where a packed block would serve few tiles, read in place).
    Strided(StridedMatrix<T>),
    /// Already packed for the selected kernel.
    Packed(PackedA<'a, T>),
}

impl<T> ASource<'_, T> {
    /// Whether every k-step of a panel of A has its rows contiguous: a
    /// packed A, or a column-major one (unit row stride, columns further
    /// apart), which the driver packs for a column kernel with one
    /// contiguous copy per k-step.
    pub(crate) fn columns_contiguous(&self) -> bool {
        match *self {
            ASource::Packed(_) => true,
            ASource::Strided(ref a) => a.is_column_major(),
        }
    }
}

/// Where the GEMM's B comes from: a strided matrix, or a view that computes
/// B's values (from an image, say) as the driver asks for blocks of them.
pub(crate) trait BSource<T: Element>: Sync {
    /// Packs rows `k0..k0+kc` and columns `j0..j0+nc` of B into
    /// `nc.div_ceil(nr)` panels of `kc × nr`, panel `q` at `dst[q·kc·nr..]`,
    /// zero-filling the columns past `nc` in the last panel.
    ///
    /// `staging` is scratch the source may use as it likes: in buffers sized
    /// by [`pack_bounds`] it already holds room for two rows of a block
    /// (`2·nc` elements), so a source that needs no more never allocates.
    ///
    /// # Safety
    /// The block lies inside B, and `dst` holds `nc.div_ceil(nr)·kc·nr` elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [T],
        staging: &mut Vec<T>,
    );

    /// For a source that can produce whole rows of a block more cheaply than
    /// panels: writes rows `k0..k0+kc`, columns `j0..j0+nc` of B into `dst`
    /// as a row-major block, row `p` at `dst[p·ld..]`, zero in columns
    /// `nc..ld`, for the micro-kernels to read in place, and returns `true`.
    /// The driver asks only where each panel would serve few tiles (C's rows
    /// fit one MC block), so packing would cost more than it saves. Returns
    /// `false`, writing nothing, for a source with no cheaper way to do that
    /// than packing (the default).
    ///
    /// # Safety
    /// The block lies inside B, `ld ≥ nc`, and `dst` holds `kc·ld` elements.
    unsafe fn write_rows(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        ld: usize,
        dst: &mut [T],
    ) -> bool {
        let _ = (k0, kc, j0, nc, ld, dst);
        false
    }

    /// The source as a strided matrix, if it is one: the driver then reads
    /// it in place where that pays, and transposes the problem for a
    /// column-major C; other backends may need it.
    fn as_strided(&self) -> Option<StridedMatrix<T>> {
        None
    }
}

/// Bias per row of C and the activation's clamp, applied as tiles are stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<T> {
    /// Null, or `m` values.
    pub bias: *const T,
    /// `(lo, hi)` or `None`.
    pub clamp: Option<(T, T)>,
}

impl<T> Epilogue<T> {
    /// Plain GEMM: no bias, no activation.
    pub const NONE: Epilogue<T> = Epilogue {
        bias: std::ptr::null(),
        clamp: None,
    };
}

// SAFETY: the bias is read-only for the whole call (see `gemm_with_epilogue`).
unsafe impl<T: Sync> Send for Epilogue<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Epilogue<T> {}

/// Elements one task's [`PackBuffers`] need for a problem (see
/// [`pack_bounds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackBounds {
    /// A panels (0 for a pre-packed A).
    pub a: usize,
    /// B panels, or rows of B written for reading in place.
    pub b: usize,
    /// Staging for the B source: two rows of a block.
    pub staging: usize,
}

impl<T: Element> PackBuffers<T> {
    /// Bytes [`PackBuffers::reserve`] allocates for `bounds` on fresh
    /// buffers (the panels' aligned starts and whole last lines included),
    /// which is what [`PackBuffers::bytes`] then reports.
    pub(crate) fn bytes_for(bounds: PackBounds) -> usize {
        use super::pack::AlignedBuf;
        AlignedBuf::<T>::allocation_for(bounds.a)
            .saturating_add(AlignedBuf::<T>::allocation_for(bounds.b))
            .saturating_add(bounds.staging)
            .saturating_mul(std::mem::size_of::<T>())
    }

    /// Grows the buffers to hold `bounds`, so that no problem within them
    /// allocates.
    pub(crate) fn reserve(&mut self, bounds: PackBounds) {
        self.a.get(bounds.a);
        self.b.get(bounds.b);
        self.staging
            .reserve_exact(bounds.staging.saturating_sub(self.staging.len()));
    }
}

/// The register tile and blocking the native engine uses for an `m × n` C:
/// of the requested path (clamped to the CPU) or of the active one, with the
/// blocking forced by `blocking` if set, for an A pre-packed or column-major
/// (`a_columns`, see [`ASource::columns_contiguous`]) or not. A [`PackedA`]
/// must be packed for its `mr`.
pub(crate) fn select_kernel(
    requested: Option<Isa>,
    m: usize,
    n: usize,
    a_columns: bool,
    blocking: Option<Blocking>,
) -> KernelInfo {
    *select(requested, m, n, a_columns, blocking, None).info()
}

/// `C ← act(α·A·B + β·C + bias)` with bias per row of C: the entry point
/// every GEMM-based path goes through, `sgemm` included.
///
/// # Safety
/// As [`super::sgemm_raw`]; `a` and `b` describe readable memory for `m × k`
/// and `k × n`, and `epilogue.bias`, when set, holds at least `m` values.
/// With `bufs`, the native engine packs into them on the calling thread only.
///
/// # Panics
/// When a packed A is not `m × k`, or (native engine) was packed for
/// another kernel than the one selected for this problem.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_with_epilogue<B: BSource<f32>>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &ASource<'_, f32>,
    b: &B,
    beta: f32,
    c: StridedC<f32>,
    epilogue: &Epilogue<f32>,
    options: &GemmOptions,
    bufs: Option<&mut PackBuffers<f32>>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let ASource::Packed(packed) = a {
        // Panels for another shape would be read out of bounds.
        assert_eq!((packed.rows(), packed.depth()), (m, k), "packed A's shape");
    }
    match options.backend {
        GemmBackend::Native => {
            // The kernel for the problem the driver runs, and the A it reads:
            // `Cᵀ = Bᵀ·Aᵀ` for a column-major C.
            let (rows, columns, driver_a) = match (a, b.as_strided()) {
                (ASource::Strided(_), Some(bs)) if driver::computes_transposed(&c, epilogue) => {
                    (n, m, ASource::Strided(bs.t()))
                }
                _ => (m, n, *a),
            };
            let mut kernel = select(
                options.isa,
                rows,
                columns,
                driver_a.columns_contiguous(),
                options.blocking,
                options.wide_tile,
            );
            if options.blocking.is_none() {
                kernel = driver::with_column_major_depth(&driver_a, kernel, columns);
            }
            // SAFETY: forwarded.
            unsafe {
                driver::gemm(
                    m,
                    k,
                    n,
                    alpha,
                    a,
                    b,
                    beta,
                    c,
                    epilogue,
                    &kernel,
                    options.parallelism,
                    bufs,
                )
            }
        }
        GemmBackend::Matrixmultiply => {
            // SAFETY: forwarded.
            unsafe {
                matrixmultiply::gemm_matrixmultiply(
                    m, k, n, alpha, a, b, beta, c, epilogue, options,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_a_is_zero_padded_panels_of_mr_rows() {
        // A 3 × 2 A in panels of 2 rows: [a00 a10 a01 a11], [a20 0 a21 0].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0f32];
        let mut dst = vec![f32::NAN; PackedA::<f32>::packed_len(3, 2, 2)];
        let packed = PackedA::pack(&a, 3, 2, 2, &mut dst);
        assert_eq!((packed.rows(), packed.depth(), packed.mr()), (3, 2, 2));
        assert_eq!(dst, [1.0, 3.0, 2.0, 4.0, 5.0, 0.0, 6.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "packed A of 3×2 for mr = 2")]
    fn packed_a_refuses_panels_of_another_shape() {
        PackedA::from_panels(&[0.0f32; 6], 3, 2, 2);
    }
}
