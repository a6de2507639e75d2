//! The textbook lowering: per image and group, build the column matrix
//! `[C/g·R·S, OH·OW]` explicitly; `gemm_lowering` multiplies the group's
//! weights `[K/g, C/g·R·S]` by it.

use crate::geometry::ConvGeometry;

/// The outputs `o` in `0..out_len` whose input position `o·stride + offset`
/// lies in `0..in_len`: a contiguous range `lo..hi` (empty as `lo == hi`).
/// Every loop that walks an output row splits it into left padding, this
/// interior, and right padding with it, so the interior needs no bounds checks.
pub(crate) fn valid_range(
    out_len: usize,
    stride: usize,
    offset: isize,
    in_len: usize,
) -> (usize, usize) {
    let s = stride as isize;
    // First o with o·s + offset ≥ 0.
    let lo = if offset >= 0 {
        0
    } else {
        (-offset + s - 1) / s
    };
    // First o with o·s + offset ≥ in_len.
    let room = in_len as isize - offset;
    let hi = if room <= 0 { 0 } else { (room + s - 1) / s };
    let hi = (hi as usize).min(out_len);
    ((lo as usize).min(hi), hi)
}

/// Row `(c, r, s)` of the column matrix reads input offset `(r', s')` of each
/// window, where `(r, s)` is the weight tap that multiplies it; for
/// cross-correlation they coincide, for true convolution they mirror.
/// `weight_tap` is an involution, so it maps taps to offsets too.
#[inline]
pub(crate) fn window_offset(g: &ConvGeometry, r: usize, s: usize) -> (isize, isize) {
    let (ro, so) = g.weight_tap(r, s);
    (
        (ro * g.dilation_h) as isize - g.padding.top as isize,
        (so * g.dilation_w) as isize - g.padding.left as isize,
    )
}

/// Fills `out` with columns `j0..j0 + out.len()` of row `kk` of the column
/// matrix of one image group (`image` is `[C/g, H, W]`). Both lowerings call
/// it: the explicit one for whole rows, the implicit one for the columns of
/// one packing block.
pub(crate) fn im2col_row(g: &ConvGeometry, image: &[f32], kk: usize, j0: usize, out: &mut [f32]) {
    let (r_len, s_len) = (g.kernel_h, g.kernel_w);
    let c = kk / (r_len * s_len);
    let (r, s) = ((kk / s_len) % r_len, kk % s_len);
    let (dy, dx) = window_offset(g, r, s);
    let channel = &image[c * g.in_plane()..][..g.in_plane()];
    // Output columns whose input column is in bounds for this tap.
    let (w_lo, w_hi) = valid_range(g.out_w, g.stride_w, dx, g.in_w);
    // One division to find where the segment starts; after that each run
    // ends at an output row boundary, so the position just advances.
    let (mut oh, mut ow0) = (j0 / g.out_w, j0 % g.out_w);
    let mut rest = out;
    while !rest.is_empty() {
        let run = (g.out_w - ow0).min(rest.len());
        let (seg, tail) = rest.split_at_mut(run);
        rest = tail;
        let ih = (oh * g.stride_h) as isize + dy;
        let (lo, hi) = (w_lo.clamp(ow0, ow0 + run), w_hi.clamp(ow0, ow0 + run));
        if ih < 0 || ih >= g.in_h as isize || lo == hi {
            seg.fill(0.0);
        } else {
            let src = &channel[ih as usize * g.in_w..][..g.in_w];
            seg[..lo - ow0].fill(0.0);
            seg[hi - ow0..].fill(0.0);
            let interior = &mut seg[lo - ow0..hi - ow0];
            let iw0 = ((lo * g.stride_w) as isize + dx) as usize;
            if g.stride_w == 1 {
                // An element loop, not `copy_from_slice`: runs are short (one
                // output row), and a vectorised loop beats a `memcpy` call.
                for (x, &v) in interior.iter_mut().zip(&src[iw0..]) {
                    *x = v;
                }
            } else {
                for (x, &v) in interior
                    .iter_mut()
                    .zip(src[iw0..].iter().step_by(g.stride_w))
                {
                    *x = v;
                }
            }
        }
        oh += 1;
        ow0 = 0;
    }
}

/// Fills `col` (`[C/g·R·S] × [OH·OW]`, row-major) from the channels of one
/// group of one image (`image` is `[C/g, H, W]`).
pub(crate) fn im2col_group(g: &ConvGeometry, image: &[f32], col: &mut [f32]) {
    for (kk, row) in col.chunks_exact_mut(g.out_plane()).enumerate() {
        im2col_row(g, image, kk, 0, row);
    }
}

#[cfg(test)]
mod tests {
    use super::valid_range;

    /// Brute force: the outputs whose input position is in bounds.
    fn brute(out_len: usize, stride: usize, offset: isize, in_len: usize) -> (usize, usize) {
        let ok: Vec<usize> = (0..out_len)
            .filter(|&o| {
                let p = (o * stride) as isize + offset;
                p >= 0 && p < in_len as isize
            })
            .collect();
        match (ok.first(), ok.last()) {
            (Some(&a), Some(&b)) => (a, b + 1),
            _ => (0, 0),
        }
    }

    #[test]
    fn valid_range_matches_brute_force() {
        for out_len in 0..8 {
            for stride in 1..4 {
                for offset in -9..9 {
                    for in_len in 1..8 {
                        let (lo, hi) = valid_range(out_len, stride, offset, in_len);
                        let (blo, bhi) = brute(out_len, stride, offset, in_len);
                        if bhi == 0 {
                            assert_eq!(lo, hi, "{out_len} {stride} {offset} {in_len}");
                        } else {
                            assert_eq!(
                                (lo, hi),
                                (blo, bhi),
                                "{out_len} {stride} {offset} {in_len}"
                            );
                        }
                    }
                }
            }
        }
    }
}
