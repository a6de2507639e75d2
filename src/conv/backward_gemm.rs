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
use crate::gemm::engine::{gemm_with_epilogue, ASource, Epilogue, StridedC, StridedMatrix};
use crate::gemm::GemmOptions;
use crate::geometry::ConvGeometry;

/// The options of every GEMM of a backward call: the GEMM threads itself
/// (the passes run one GEMM at a time, see the callers).
fn gemm_options(options: &BackwardOptions) -> GemmOptions {
    GemmOptions {
        backend: options.backend,
        parallelism: options.parallelism,
        isa: options.isa,
        blocking: None,
    }
}

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
    let (cg, kg, kk, plane) = (
        g.channels_per_group(),
        g.out_channels_per_group(),
        g.gemm_k(),
        g.out_plane(),
    );
    if g.batch == 0 || plane == 0 {
        // No term at all: the gradient is 0 (or what is already there).
        if !options.accumulate {
            grad_weight.fill(0.0);
        }
        return Ok(());
    }
    let gemm_opts = gemm_options(options);
    let mut col = Vec::new();
    column_matrix(&mut col, kk * plane)?;
    for grp in 0..g.groups {
        let dw = &mut grad_weight[grp * kg * kk..][..kg * kk];
        for n in 0..g.batch {
            let image =
                &input[(n * g.in_channels + grp * cg) * g.in_plane()..][..cg * g.in_plane()];
            im2col_group(g, image, &mut col);
            let dy = &grad_output[(n * g.out_channels + grp * kg) * plane..][..kg * plane];
            let a = ASource::Strided(StridedMatrix {
                ptr: dy.as_ptr(),
                rs: plane as isize,
                cs: 1,
            });
            // colᵀ: the kk × plane column matrix read as plane × kk.
            let b = StridedMatrix {
                ptr: col.as_ptr(),
                rs: plane as isize,
                cs: 1,
            }
            .t();
            let c = StridedC {
                ptr: dw.as_mut_ptr(),
                rs: kk as isize,
                cs: 1,
            };
            let beta = if n == 0 && !options.accumulate {
                0.0
            } else {
                1.0
            };
            // SAFETY: A is this image-group's kg × plane block of
            // `grad_output`, B the plane × kk transpose of `col` (kk × plane
            // floats, filled above), C the group's kg × kk block of
            // `grad_weight`, exclusively borrowed; with β = 0 C is not read.
            unsafe {
                gemm_with_epilogue(
                    kg,
                    plane,
                    kk,
                    1.0,
                    &a,
                    &b,
                    beta,
                    c,
                    &Epilogue::NONE,
                    &gemm_opts,
                    None,
                )
            };
        }
    }
    Ok(())
}
