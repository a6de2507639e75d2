//! The backward passes lowered onto the GEMM the textbook way
//! ([`Algorithm::Im2col`](super::Algorithm::Im2col)), per image and group,
//! through the same interface as the forward (`gemm_with_epilogue` over
//! strided views, with the column matrix of `im2col.rs`):
//!
//! ```text
//! grad weight   dW_g (K/g × C/g·R·S) = Σ_n dY_{n,g} (K/g × OH·OW) · col(X_{n,g})ᵀ
//! ```
//!
//! (The input gradient's `Im2col`, `col2im(W_gᵀ·dY)`, is the transposed
//! convolution's GEMM + col2im in `transposed_gemm.rs`.)
//!
//! Row `(c·R + r)·S + s` of the column matrix holds what weight tap
//! `(c, r, s)` multiplies (in both modes: `im2col.rs` mirrors the window for
//! true convolution), so `dY · colᵀ` is already in weight layout and
//! `Wᵀ · dY` already in column layout: no flips here.

use super::gemm_lowering::column_matrix;
use super::im2col::im2col_group;
use super::BackwardOptions;
use crate::error::ConvError;
use crate::gemm::engine::StridedMatrix;
use crate::geometry::ConvGeometry;

/// `grad_weight` (overwritten, or added to with `accumulate`) from
/// `input` and `grad_output`; lengths checked by the caller.
///
/// Images run one after another into the same weight block (β = 1 after the
/// first), so the sum over the batch has a fixed order whatever the
/// threads: the parallelism is inside each GEMM.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the column matrix cannot be allocated.
pub(crate) fn backward_weight_im2col(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
) -> Result<(), ConvError> {
    let mut col = Vec::new();
    column_matrix(&mut col, g.gemm_k() * g.out_plane())?;
    let plane = g.out_plane() as isize;
    super::grad_weight::by_images(g, input, grad_output, grad_weight, options, |image| {
        im2col_group(g, image, &mut col);
        // colᵀ: the kk × plane column matrix read as plane × kk.
        StridedMatrix {
            ptr: col.as_ptr(),
            rs: plane,
            cs: 1,
        }
        .t()
    })
}
