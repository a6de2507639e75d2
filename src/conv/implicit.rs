//! Implicit GEMM: the GEMM's B-packing reads the input through an im2col
//! *view*, so the `[C/g·R·S, OH·OW]` column matrix never exists. The only
//! extra memory is the packing panels of each thread (bounded by the
//! blocking: `KC × NC` of B plus `MC × KC` of A), whatever the image size or
//! batch.

use super::im2col::{valid_range, window_offset};
use crate::gemm::pack::BSource;
use crate::geometry::ConvGeometry;

/// The column matrix of one group of one image, never materialised: element
/// `(row, col)` with `row = (c·R + r)·S + s` and `col = oh·OW + ow` is the input
/// pixel that weight tap `(c, r, s)` meets at output `(oh, ow)`, or 0 in the
/// padding.
pub(crate) struct Im2colView<'a> {
    pub g: &'a ConvGeometry,
    /// The group's channels of one image: `[C/g, H, W]`.
    pub image: &'a [f32],
}

impl BSource for Im2colView<'_> {
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
    ) {
        let g = self.g;
        let (taps, s_len) = (g.kernel_h * g.kernel_w, g.kernel_w);
        let in_plane = g.in_plane();
        for (q, panel) in dst
            .chunks_exact_mut(kc * nr)
            .take(nc.div_ceil(nr))
            .enumerate()
        {
            let col0 = j0 + q * nr;
            let width = nr.min(nc - q * nr);
            if width < nr {
                panel.fill(0.0);
            }
            // The panel's columns, cut into runs that share an output row.
            let mut col = col0;
            while col < col0 + width {
                let (oh, ow0) = (col / g.out_w, col % g.out_w);
                let run = (g.out_w - ow0).min(col0 + width - col);
                let lane0 = col - col0;
                for (p, row) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
                    let kk = k0 + p;
                    let c = kk / taps;
                    let (r, s) = ((kk / s_len) % g.kernel_h, kk % s_len);
                    let (dy, dx) = window_offset(g, r, s);
                    let out = &mut row[lane0..lane0 + run];
                    let ih = (oh * g.stride_h) as isize + dy;
                    if ih < 0 || ih >= g.in_h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &self.image[c * in_plane + ih as usize * g.in_w..][..g.in_w];
                    // Outputs ow0..ow0+run whose input column is in bounds.
                    let (lo, hi) = valid_range(ow0 + run, g.stride_w, dx, g.in_w);
                    let (lo, hi) = (lo.max(ow0), hi.max(ow0));
                    out[..lo - ow0].fill(0.0);
                    out[hi - ow0..].fill(0.0);
                    let iw0 = (lo * g.stride_w) as isize + dx;
                    if lo < hi {
                        let interior = &mut out[lo - ow0..hi - ow0];
                        if g.stride_w == 1 {
                            interior.copy_from_slice(&src[iw0 as usize..][..hi - lo]);
                        } else {
                            for (i, x) in interior.iter_mut().enumerate() {
                                *x = src[iw0 as usize + i * g.stride_w];
                            }
                        }
                    }
                }
                col += run;
            }
        }
    }
}
