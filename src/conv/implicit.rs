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
        let panels = nc.div_ceil(nr);
        let panel_len = kc * nr;
        if !nc.is_multiple_of(nr) {
            dst[(panels - 1) * panel_len..panels * panel_len].fill(0.0);
        }
        // Row p of every panel comes from one input channel and one kernel
        // tap, so decode the tap once per row and sweep the panels.
        for p in 0..kc {
            let kk = k0 + p;
            let c = kk / taps;
            let (r, s) = ((kk / s_len) % g.kernel_h, kk % s_len);
            let (dy, dx) = window_offset(g, r, s);
            let channel = &self.image[c * g.in_plane()..][..g.in_plane()];
            // Output columns whose input column is in bounds, for this tap.
            let (w_lo, w_hi) = valid_range(g.out_w, g.stride_w, dx, g.in_w);
            let mut col = j0;
            let end = j0 + nc;
            while col < end {
                let (oh, ow0) = (col / g.out_w, col % g.out_w);
                let run = (g.out_w - ow0).min(end - col);
                let lane = (col - j0) % nr;
                let q = (col - j0) / nr;
                // A run may cross a panel boundary: cut it there too.
                let run = run.min(nr - lane);
                let out = &mut dst[q * panel_len + p * nr + lane..][..run];
                let ih = (oh * g.stride_h) as isize + dy;
                if ih < 0 || ih >= g.in_h as isize {
                    out.fill(0.0);
                } else {
                    let src = &channel[ih as usize * g.in_w..][..g.in_w];
                    let (lo, hi) = (w_lo.clamp(ow0, ow0 + run), w_hi.clamp(ow0, ow0 + run));
                    let iw0 = (lo * g.stride_w) as isize + dx;
                    for x in &mut out[..lo - ow0] {
                        *x = 0.0;
                    }
                    for x in &mut out[hi - ow0..] {
                        *x = 0.0;
                    }
                    if lo < hi {
                        let interior = &mut out[lo - ow0..hi - ow0];
                        if g.stride_w == 1 {
                            let from = &src[iw0 as usize..][..interior.len()];
                            for (x, &v) in interior.iter_mut().zip(from) {
                                *x = v;
                            }
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
