//! The textbook lowering: per image and group, build the column matrix
//! `[C/g·R·S, OH·OW]` explicitly; `gemm_lowering` multiplies the group's
//! weights `[K/g, C/g·R·S]` by it.

use crate::geometry::ConvGeometry;
use std::ops::Range;

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
    // Unsigned steps throughout: the geometry keeps every extent within
    // `isize`, but a stride plus a padding need not be.
    // First o with o·stride + offset ≥ 0.
    let lo = if offset >= 0 {
        0
    } else {
        offset.unsigned_abs().div_ceil(stride)
    };
    // First o with o·stride + offset ≥ in_len.
    let hi = match usize::try_from(offset) {
        Ok(ahead) => in_len.saturating_sub(ahead).div_ceil(stride),
        Err(_) => in_len
            .saturating_add(offset.unsigned_abs())
            .div_ceil(stride),
    };
    let hi = hi.min(out_len);
    (lo.min(hi), hi)
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

/// The weight tap `(c, r, s)` behind one row `kk = (c·R + r)·S + s` of the
/// column matrix. Packing walks consecutive rows, so it steps the tap with
/// [`ColumnTap::next`] instead of dividing `kk` again for every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColumnTap {
    c: usize,
    r: usize,
    s: usize,
}

impl ColumnTap {
    /// The tap of row `kk`.
    pub(crate) fn of_row(g: &ConvGeometry, kk: usize) -> ColumnTap {
        let (r_len, s_len) = (g.kernel_h, g.kernel_w);
        ColumnTap {
            c: kk / (r_len * s_len),
            r: (kk / s_len) % r_len,
            s: kk % s_len,
        }
    }

    /// The tap of the next row.
    pub(crate) fn next(self, g: &ConvGeometry) -> ColumnTap {
        let ColumnTap {
            mut c,
            mut r,
            mut s,
        } = self;
        s += 1;
        if s == g.kernel_w {
            s = 0;
            r += 1;
            if r == g.kernel_h {
                r = 0;
                c += 1;
            }
        }
        ColumnTap { c, r, s }
    }
}

/// Fills `out` with columns `j0..j0 + out.len()` of the column-matrix row
/// of weight tap `tap`, for one image group (`image` is `[C/g, H, W]`).
/// Both lowerings fill rows with it, stepping the tap: the explicit one
/// whole rows, the implicit one the columns of one block.
pub(crate) fn im2col_row(
    g: &ConvGeometry,
    image: &[f32],
    tap: ColumnTap,
    j0: usize,
    out: &mut [f32],
) {
    let (dy, dx) = window_offset(g, tap.r, tap.s);
    let channel = &image[tap.c * g.in_plane()..][..g.in_plane()];
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
            match g.stride_w {
                1 => {
                    // An element loop, not `copy_from_slice`: runs are short
                    // (one output row), and a vectorised loop beats a
                    // `memcpy` call.
                    for (x, &v) in interior.iter_mut().zip(&src[iw0..]) {
                        *x = v;
                    }
                }
                2 => copy_every_second(interior, &src[iw0..][..2 * interior.len() - 1]),
                sw => {
                    for (x, &v) in interior.iter_mut().zip(src[iw0..].iter().step_by(sw)) {
                        *x = v;
                    }
                }
            }
        }
        oh += 1;
        ow0 = 0;
    }
}

/// Fills `rows` consecutive rows of the column matrix from tap `first`,
/// `columns` (`j0..j0 + nc`) of each, into `dst` (row `p` at `dst[p·ld..]`,
/// `ld ≥ nc`; the floats past `nc` are left alone).
///
/// The rows of taps `(c, r, s − σ)` and `(c, r, s)`, with `σ` the stride in
/// width, hold the same input pixels shifted by the dilation: inside each
/// output row, `row_s[j] = row_{s−σ}[j + δ]` with `δ = (dx_s − dx_{s−σ})/σ`
/// (±the dilation). Such a row is one contiguous copy of that earlier row,
/// then only the `|δ|` positions per output row whose neighbour lies in
/// another output row (or outside this block) are recomputed; every other
/// row goes through [`im2col_row`]. A 3×3 window builds two of every three
/// rows this way at stride 1 and one of three at stride 2; the 7×7/2 stem
/// five of seven.
/// Measured against building every row with [`im2col_row`] (implicit
/// plans, 1 thread AVX-512, one process, alternating), at stride 1:
/// r50_3x3 +5.5–7.7%, batch16 +6.7%, r50_deep +4.6%, 3×3 layers on 14² and
/// 7² planes +7%; at stride 2, against shifting only at stride 1:
/// r50_conv1 (7×7/2) +13%, r50_3x3_s2 +4–5%.
pub(crate) fn im2col_rows(
    g: &ConvGeometry,
    image: &[f32],
    first: ColumnTap,
    columns: Range<usize>,
    ld: usize,
    rows: usize,
    dst: &mut [f32],
) {
    let (j0, nc) = (columns.start, columns.len());
    let mut tap = first;
    for p in 0..rows {
        let (done, rest) = dst.split_at_mut(p * ld);
        let earlier = p.checked_sub(g.stride_w).map(|q| &done[q * ld..][..nc]);
        im2col_row_after(g, image, tap, j0, earlier, &mut rest[..nc]);
        tap = tap.next(g);
    }
}

/// [`im2col_row`] for tap `tap`, given `earlier`, the same columns of the
/// row `stride_w` rows before it (tap order), when the caller still has it:
/// then a row that is a shift of it is built as one (see [`im2col_rows`]).
pub(crate) fn im2col_row_after(
    g: &ConvGeometry,
    image: &[f32],
    tap: ColumnTap,
    j0: usize,
    earlier: Option<&[f32]>,
    out: &mut [f32],
) {
    let shifted = match earlier {
        Some(earlier) if tap.s >= g.stride_w => shift_row(g, image, tap, j0, earlier, out),
        _ => false,
    };
    if !shifted {
        im2col_row(g, image, tap, j0, out);
    }
}

/// Row `tap` (with `tap.s ≥ σ`, the stride in width) from `earlier`, the
/// row of tap `(c, r, s − σ)` over the same columns; see [`im2col_rows`].
/// Returns `false`, writing nothing, where the shift would not pay (a shift
/// as wide as an output row or as the block).
fn shift_row(
    g: &ConvGeometry,
    image: &[f32],
    tap: ColumnTap,
    j0: usize,
    earlier: &[f32],
    out: &mut [f32],
) -> bool {
    let sw = g.stride_w;
    let (dy, dx) = window_offset(g, tap.r, tap.s);
    let (_, dx_earlier) = window_offset(g, tap.r, tap.s - sw);
    let step = dx - dx_earlier;
    if step % sw as isize != 0 {
        return false;
    }
    let delta = step / sw as isize;
    let (nc, shift) = (out.len(), delta.unsigned_abs());
    if shift == 0 || shift >= g.out_w || shift >= nc {
        return false;
    }
    if delta > 0 {
        out[..nc - shift].copy_from_slice(&earlier[shift..]);
    } else {
        out[shift..].copy_from_slice(&earlier[..nc - shift]);
    }
    // The value of output column j of this row, from its definition.
    let channel = &image[tap.c * g.in_plane()..][..g.in_plane()];
    let exact = |j: usize| {
        let (oh, ow) = ((j0 + j) / g.out_w, (j0 + j) % g.out_w);
        let (ih, iw) = ((oh * g.stride_h) as isize + dy, (ow * sw) as isize + dx);
        if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
            0.0
        } else {
            channel[ih as usize * g.in_w + iw as usize]
        }
    };
    // The block edge the copy could not reach, then the positions next to
    // each output-row boundary, whose copied neighbour belongs to the
    // adjacent output row.
    let edge = if delta > 0 { nc - shift..nc } else { 0..shift };
    for j in edge {
        out[j] = exact(j);
    }
    let first_row_end = (j0 / g.out_w + 1) * g.out_w;
    for boundary in (first_row_end..j0 + nc).step_by(g.out_w) {
        // Columns [boundary − shift, boundary) when reading ahead, or
        // [boundary, boundary + shift) when reading behind.
        let start = if delta > 0 {
            boundary - shift
        } else {
            boundary
        };
        for j in (start.max(j0)..(start + shift).min(j0 + nc)).map(|x| x - j0) {
            out[j] = exact(j);
        }
    }
    true
}

/// Outputs per fixed-size gather in [`copy_every_second`].
const CHUNK: usize = 16;

/// `dst[i] ← src[2·i]` (`src.len() == 2·dst.len() − 1`), in gathers of a
/// fixed 31 → 16 floats, the last one overlapping its predecessor, rather
/// than a strided loop of runtime length, which the compiler leaves scalar:
/// r50_3x3_s2 (Implicit plan, 1 thread AVX-512) 1.52 → 1.39 ms per call.
/// (The same chunking of the stride-1 copy measured no faster than its
/// element loop, which stays.)
#[inline]
fn copy_every_second(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let chunk = |dst: &mut [f32], src: &[f32], at: usize| {
        let to: &mut [f32; CHUNK] = (&mut dst[at..at + CHUNK]).try_into().expect("chunk");
        let from: &[f32; 2 * CHUNK - 1] = src[2 * at..2 * at + 2 * CHUNK - 1]
            .try_into()
            .expect("chunk");
        for (i, x) in to.iter_mut().enumerate() {
            *x = from[2 * i];
        }
    };
    if n < CHUNK {
        for (i, x) in dst.iter_mut().enumerate() {
            *x = src[2 * i];
        }
        return;
    }
    for at in (0..n - CHUNK).step_by(CHUNK) {
        chunk(dst, src, at);
    }
    chunk(dst, src, n - CHUNK);
}

/// Fills `col` (`[C/g·R·S] × [OH·OW]`, row-major) from the channels of one
/// group of one image (`image` is `[C/g, H, W]`).
pub(crate) fn im2col_group(g: &ConvGeometry, image: &[f32], col: &mut [f32]) {
    let n = g.out_plane();
    im2col_rows(
        g,
        image,
        ColumnTap::of_row(g, 0),
        0..n,
        n,
        col.len() / n.max(1),
        col,
    );
}

#[cfg(test)]
mod tests {
    use super::{im2col_group, im2col_row, im2col_rows, valid_range, ColumnTap};
    use crate::arch::Isa;
    use crate::conv::phases::TransposedGeometry;
    use crate::conv::transposed_gemm::{col2im, interleave, PlaneLayout};
    use crate::geometry::ConvGeometry;
    use crate::{Conv2dParams, ConvMode, Padding};

    /// Element `(kk, j)` of the column matrix, straight from its definition.
    fn column_element(g: &ConvGeometry, image: &[f32], kk: usize, j: usize) -> f32 {
        let (rs, s_len) = (g.kernel_h * g.kernel_w, g.kernel_w);
        let (c, r, s) = (kk / rs, (kk / s_len) % g.kernel_h, kk % s_len);
        let (r, s) = g.weight_tap(r, s);
        let (oh, ow) = (j / g.out_w, j % g.out_w);
        let ih = (oh * g.stride_h + r * g.dilation_h) as isize - g.padding.top as isize;
        let iw = (ow * g.stride_w + s * g.dilation_w) as isize - g.padding.left as isize;
        if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
            0.0
        } else {
            image[c * g.in_plane() + ih as usize * g.in_w + iw as usize]
        }
    }

    /// Every row and every column window of the row filler, for output rows
    /// 1–81 wide (shorter and longer than the stride-2 gather's 16
    /// outputs), strides 1–3 (each has its own copy loop), padding,
    /// dilation and both modes; also the stepped taps the implicit packing
    /// walks.
    #[test]
    fn rows_match_the_definition() {
        for in_w in [1, 6, 16, 17, 31, 40, 45, 81] {
            for stride in 1..=3 {
                for (pad, dilation, mode) in [
                    (0, 1, ConvMode::CrossCorrelation),
                    (1, 1, ConvMode::CrossCorrelation),
                    (2, 2, ConvMode::Convolution),
                ] {
                    let p = Conv2dParams::new(1, 2, (4, in_w), 1, (2, 3))
                        .stride(stride, stride)
                        .dilation(dilation, dilation)
                        .padding(Padding::explicit(pad, 1, pad, 0))
                        .mode(mode);
                    let Ok(g) = ConvGeometry::new(&p) else {
                        continue;
                    };
                    let image: Vec<f32> = (0..g.input_len()).map(|i| i as f32 + 1.0).collect();
                    let n = g.out_plane();
                    let mut tap = ColumnTap::of_row(&g, 0);
                    for kk in 0..g.gemm_k() {
                        assert_eq!(tap, ColumnTap::of_row(&g, kk));
                        for (j0, len) in [
                            (0, n),
                            (1, n - 1),
                            (n / 3, n - n / 3),
                            (n / 2, n.div_ceil(4)),
                        ] {
                            let mut got = vec![f32::NAN; len];
                            im2col_row(&g, &image, ColumnTap::of_row(&g, kk), j0, &mut got);
                            let mut stepped = vec![f32::NAN; len];
                            im2col_row(&g, &image, tap, j0, &mut stepped);
                            for (j, (&a, &b)) in got.iter().zip(&stepped).enumerate() {
                                let want = column_element(&g, &image, kk, j0 + j);
                                assert_eq!(a, want, "{p:?} row {kk} column {}", j0 + j);
                                assert_eq!(b, want, "{p:?} row {kk} column {} (stepped)", j0 + j);
                            }
                        }
                        tap = tap.next(&g);
                    }
                }
            }
        }
    }

    /// Blocks of consecutive rows, where most rows of a window are shifted
    /// copies of an earlier row with the output-row boundaries recomputed:
    /// every window of columns (mid-row starts, blocks shorter than the
    /// shift, a whole plane), dilations 1–3 (shifts of 1–3), strides 1–3,
    /// both modes (shifts forward and back), asymmetric padding, output
    /// rows narrower than the shift, and blocks starting at any tap.
    #[test]
    fn row_blocks_match_the_definition() {
        let windows = [
            // (width, dilation, stride): shifts of 1–3 at stride 1, then
            // strides 2 and 3, whose shifts skip `stride` rows back.
            (2, 1, 1),
            (3, 1, 1),
            (3, 2, 1),
            (5, 1, 1),
            (2, 3, 1),
            (3, 1, 2),
            (5, 1, 2),
            (7, 1, 2),
            (5, 2, 2),
            (4, 1, 3),
            (7, 1, 3),
        ];
        for in_w in [1, 2, 3, 5, 9, 16, 23, 31] {
            for (kw, dilation, stride) in windows {
                for (left, right) in [(0, 0), (1, 1), (2, 0), (0, 3)] {
                    for mode in [ConvMode::CrossCorrelation, ConvMode::Convolution] {
                        let p = Conv2dParams::new(1, 2, (3, in_w), 1, (2, kw))
                            .stride(1, stride)
                            .dilation(1, dilation)
                            .padding(Padding::explicit(1, 0, left, right))
                            .mode(mode);
                        let Ok(g) = ConvGeometry::new(&p) else {
                            continue;
                        };
                        let image: Vec<f32> = (0..g.input_len()).map(|i| i as f32 + 1.0).collect();
                        let (n, k) = (g.out_plane(), g.gemm_k());
                        for k0 in [0, 1, kw - 1] {
                            for (j0, nc) in [(0, n), (1, n - 1), (n / 2, n.div_ceil(3)), (n - 1, 1)]
                            {
                                if nc == 0 || k0 >= k {
                                    continue;
                                }
                                let (rows, ld) = (k - k0, nc + 3);
                                let mut block = vec![f32::NAN; rows * ld];
                                im2col_rows(
                                    &g,
                                    &image,
                                    ColumnTap::of_row(&g, k0),
                                    j0..j0 + nc,
                                    ld,
                                    rows,
                                    &mut block,
                                );
                                for (q, row) in block.chunks_exact(ld).enumerate() {
                                    for (j, &got) in row[..nc].iter().enumerate() {
                                        let want = column_element(&g, &image, k0 + q, j0 + j);
                                        assert_eq!(
                                            got,
                                            want,
                                            "{p:?} row {} column {}",
                                            k0 + q,
                                            j0 + j
                                        );
                                    }
                                    assert!(
                                        row[nc..].iter().all(|x| x.is_nan()),
                                        "{p:?}: wrote past nc"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// col2im and the phase interleave compute the same floats on every
    /// path the CPU supports (each output is the same adds in the same
    /// order; only the vector width differs), on rows wide enough for the
    /// vector loops and their remainders: strides 1, 2 (the pairwise
    /// interleave, odd and even widths) and 3, padding, dilation.
    #[test]
    fn col2im_and_interleave_agree_on_every_path() {
        for (w, (sh, sw), (kh, kw), dil, pad) in [
            (70, (1, 1), (3, 3), 1, 1),
            (67, (2, 2), (3, 3), 1, 1),
            (68, (2, 2), (7, 7), 1, 3),
            (53, (1, 3), (2, 3), 2, 0),
            (41, (3, 2), (3, 2), 1, 2),
        ] {
            let p = Conv2dParams::new(1, 3, (9, w), 2, (kh, kw))
                .stride(sh, sw)
                .dilation(dil, dil)
                .padding(Padding::symmetric(pad, pad));
            let g = ConvGeometry::new(&p).unwrap();
            let tg = TransposedGeometry::grad_input_of(&g);
            let c: Vec<f32> = (0..g.gemm_k() * g.out_plane())
                .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
                .collect();
            let bias = [0.25, -1.5, 3.0];
            let run = |isa: Isa| {
                let mut plane = vec![0.5f32; g.input_len()];
                col2im(
                    isa,
                    &tg,
                    &mut c.clone(),
                    0..g.out_h,
                    &mut plane,
                    PlaneLayout::plane(&tg),
                );
                let layout = PlaneLayout::phased(&tg);
                let mut phased = vec![0.0f32; g.in_channels * layout.channel_len()];
                col2im(isa, &tg, &mut c.clone(), 0..g.out_h, &mut phased, layout);
                let mut out = vec![f32::NAN; g.input_len()];
                interleave(isa, &tg, &phased, layout, Some(&bias), &mut out);
                (plane, out)
            };
            let portable = run(Isa::Portable);
            assert!(portable.1.iter().all(|v| v.is_finite()), "{p:?}");
            for isa in crate::arch::supported_isas() {
                assert_eq!(run(isa), portable, "{isa} {p:?}");
            }
        }
    }

    /// col2im over chunks of input rows (as the GEMM + col2im lowering
    /// calls it) adds the same floats as over the whole matrix, and the
    /// sub-plane layout (one contiguous add per tap where its rows are as
    /// wide as the input's) the same as the plane (row by row): "same"
    /// padding at stride 1 and 2 (spans), asymmetric padding and a stride
    /// the width does not divide (rows), on every path.
    #[test]
    fn col2im_in_chunks_and_spans_agree_with_rows() {
        for (h, w, (sh, sw), (kh, kw), dil, pad, spans) in [
            (14, 14, (1, 1), (3, 3), 1, 1, true),
            (12, 18, (2, 2), (3, 3), 1, 1, true),
            (16, 16, (2, 2), (7, 7), 1, 3, true),
            (13, 15, (1, 2), (3, 3), 2, 2, true),
            (11, 13, (2, 3), (3, 2), 1, 0, false),
        ] {
            let p = Conv2dParams::new(1, 3, (h, w), 2, (kh, kw))
                .stride(sh, sw)
                .dilation(dil, dil)
                .padding(Padding::symmetric(pad, pad));
            let g = ConvGeometry::new(&p).unwrap();
            let tg = TransposedGeometry::grad_input_of(&g);
            let layout = PlaneLayout::phased(&tg);
            assert_eq!(layout.spans(&tg), spans, "{p:?}");
            let c: Vec<f32> = (0..g.gemm_k() * g.out_plane())
                .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
                .collect();
            // From the definition: input pixel (i, j) of tap (r, s) adds
            // into the output pixel its window offset reaches.
            let mut want = vec![0.0f32; g.input_len()];
            let (kk, plane_len) = (g.kernel_h * g.kernel_w, g.out_plane());
            for (m, row) in c.chunks_exact(plane_len).enumerate() {
                let (ch, tap) = (m / kk, m % kk);
                let (r, s) = (tap / g.kernel_w, tap % g.kernel_w);
                for (q, &v) in row.iter().enumerate() {
                    let y = ((q / g.out_w) * sh + r * dil) as isize - pad as isize;
                    let x = ((q % g.out_w) * sw + s * dil) as isize - pad as isize;
                    if (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
                        want[(ch * h + y as usize) * w + x as usize] += v;
                    }
                }
            }
            for isa in crate::arch::supported_isas() {
                let mut plane = vec![0.0f32; g.input_len()];
                let mut phased = vec![0.0f32; g.in_channels * layout.channel_len()];
                for rows in [0..2, 2..3, 3..g.out_h] {
                    let part: Vec<f32> = c
                        .chunks_exact(g.out_plane())
                        .flat_map(|row| &row[rows.start * g.out_w..rows.end * g.out_w])
                        .copied()
                        .collect();
                    let by_rows = PlaneLayout::plane(&tg);
                    col2im(
                        isa,
                        &tg,
                        &mut part.clone(),
                        rows.clone(),
                        &mut plane,
                        by_rows,
                    );
                    col2im(isa, &tg, &mut part.clone(), rows, &mut phased, layout);
                }
                let mut out = vec![f32::NAN; g.input_len()];
                interleave(isa, &tg, &phased, layout, None, &mut out);
                assert_eq!(out, plane, "{isa} {p:?}");
                let max_err = plane
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(max_err < 1e-5, "{isa} {p:?}: {max_err}");
            }
        }
    }

    /// col2im is the exact adjoint of im2col: `⟨im2col(x), c⟩ = ⟨x,
    /// col2im(c)⟩` on small integers (every product and sum exact in f32),
    /// across strides, asymmetric padding, dilation, both modes and more
    /// than one channel; and col2im writes nothing but the pixels windows
    /// read (a pixel no window reads keeps its value).
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        for (h, w) in [(1, 1), (4, 5), (7, 6)] {
            for (kh, kw) in [(1, 1), (2, 3), (3, 2)] {
                for (sh, sw) in [(1, 1), (2, 1), (1, 3), (3, 2)] {
                    for (dh, dw) in [(1, 1), (2, 1), (1, 2)] {
                        for (top, bottom, left, right) in [(0, 0, 0, 0), (1, 0, 2, 1), (0, 2, 1, 0)]
                        {
                            for mode in [ConvMode::CrossCorrelation, ConvMode::Convolution] {
                                let p = Conv2dParams::new(1, 2, (h, w), 1, (kh, kw))
                                    .stride(sh, sw)
                                    .dilation(dh, dw)
                                    .padding(Padding::explicit(top, bottom, left, right))
                                    .mode(mode);
                                let Ok(g) = ConvGeometry::new(&p) else {
                                    continue;
                                };
                                let x: Vec<f32> =
                                    (0..g.input_len()).map(|i| (i % 7) as f32 - 3.0).collect();
                                let len = g.gemm_k() * g.out_plane();
                                let c: Vec<f32> = (0..len).map(|i| (i % 5) as f32 - 2.0).collect();
                                let mut col = vec![f32::NAN; len];
                                im2col_group(&g, &x, &mut col);
                                let mut back = vec![0.0f32; g.input_len()];
                                let tg = TransposedGeometry::grad_input_of(&g);
                                let isa = crate::isa();
                                col2im(
                                    isa,
                                    &tg,
                                    &mut c.clone(),
                                    0..g.out_h,
                                    &mut back,
                                    PlaneLayout::plane(&tg),
                                );
                                // The column-phase layout, interleaved, adds
                                // the same terms in the same order.
                                let phased_layout = PlaneLayout::phased(&tg);
                                let mut phased =
                                    vec![0.0f32; g.in_channels * phased_layout.channel_len()];
                                col2im(
                                    isa,
                                    &tg,
                                    &mut c.clone(),
                                    0..g.out_h,
                                    &mut phased,
                                    phased_layout,
                                );
                                let mut again = vec![f32::NAN; g.input_len()];
                                interleave(isa, &tg, &phased, phased_layout, None, &mut again);
                                assert_eq!(again, back, "{p:?}");
                                let lhs: f32 = col.iter().zip(&c).map(|(a, b)| a * b).sum();
                                let rhs: f32 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
                                assert_eq!(lhs, rhs, "{p:?}");
                                // Untouched pixels keep their value: each
                                // pixel's sum is over the elements that read it.
                                let mut marked = vec![0.5f32; g.input_len()];
                                col2im(
                                    isa,
                                    &tg,
                                    &mut vec![1.0; len],
                                    0..g.out_h,
                                    &mut marked,
                                    PlaneLayout::plane(&tg),
                                );
                                for (i, &m) in marked.iter().enumerate() {
                                    let reads = (0..g.gemm_k())
                                        .flat_map(|kk| (0..g.out_plane()).map(move |j| (kk, j)))
                                        .filter(|&(kk, j)| {
                                            let mut unit = vec![0.0; g.input_len()];
                                            unit[i] = 1.0;
                                            column_element(&g, &unit, kk, j) == 1.0
                                        })
                                        .count();
                                    assert_eq!(m, 0.5 + reads as f32, "{p:?} pixel {i}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

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
