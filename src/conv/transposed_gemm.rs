//! Transposed convolution as GEMM + col2im: per image and group,
//!
//! ```text
//! col (C_out/g·R·S × H·W) = W_gᵀ (C_out/g·R·S × C_in/g) · x_{n,g} (C_in/g × H·W)
//! y_{n,g} = act(bias + col2im(col))
//! ```
//!
//! The input is B as it lies (row-major planes, never packed), and `W_gᵀ`
//! can be packed once in a plan; the price is the column matrix of one image
//! group and `col2im`'s one add per `2·C_in/g` FLOPs. Where the input planes
//! are small and the input channels many (a GAN's or a decoder's first
//! upsampling layers), that beats the sub-pixel phases of `phases.rs`, whose
//! stride-1 convolutions then run on planes too small for the implicit
//! GEMM's packing to pay; `ConvTranspose2d`'s `Auto` and the input
//! gradient's pick between them. Where the kernel is as large as the
//! stride (no dilation or padding) no two taps meet: col2im becomes a
//! scatter of each chunk into the output, and GEMM + scatter beats the
//! phases there too.

use super::phases::{TransposedAxis, TransposedGeometry};
use super::scratch::Scratch;
use super::ForwardOptions;
use crate::arch::Isa;
use crate::error::ConvError;
use crate::gemm::engine::select_kernel;
use crate::gemm::engine::{
    gemm_with_epilogue, ASource, Epilogue, PackedA, StridedC, StridedMatrix,
};
use crate::gemm::{Activation, GemmBackend};
use std::ops::Range;

/// `W_gᵀ` of every group: either read through the weight tensor as it lies
/// (`[C_in, C_out/g, R, S]`: group `g`'s block, column-major as
/// `C_out/g·R·S × C_in/g`), or packed for the selected kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TransposedWeights<'a> {
    Raw(&'a [f32]),
    /// Per group, [`PackedA`] panels of `C_out/g·R·S × C_in/g` for a kernel
    /// with `mr` rows, groups one after another.
    Packed {
        data: &'a [f32],
        mr: usize,
    },
}

impl TransposedWeights<'_> {
    /// The rows of group `grp`'s `W_gᵀ` for its output channels `chans`
    /// (`chans.len()·R·S` rows from `chans.start·R·S`). Packed weights are
    /// cut between panels only (see [`channel_align`]).
    fn group_channels(
        &self,
        tg: &TransposedGeometry,
        grp: usize,
        chans: Range<usize>,
    ) -> ASource<'_, f32> {
        let (rows, depth) = (gemm_rows(tg), tg.in_per_group());
        let window = tg.h.kernel * tg.w.kernel;
        let (r0, r1) = (chans.start * window, chans.end * window);
        match *self {
            TransposedWeights::Raw(w) => ASource::Strided(StridedMatrix {
                ptr: w[grp * depth * rows + r0..][..depth * rows - r0].as_ptr(),
                rs: 1,
                cs: rows as isize,
            }),
            TransposedWeights::Packed { data, mr } => {
                assert!(
                    r0 % mr == 0 && (r1 % mr == 0 || r1 == rows),
                    "packed weights are cut between panels"
                );
                let len = PackedA::<f32>::packed_len(rows, depth, mr);
                let part = PackedA::<f32>::packed_len(r1 - r0, depth, mr);
                ASource::Packed(PackedA::from_panels(
                    &data[grp * len + r0 * depth..][..part],
                    r1 - r0,
                    depth,
                    mr,
                ))
            }
        }
    }

    /// All of group `grp`'s `W_gᵀ`.
    fn group(&self, tg: &TransposedGeometry, grp: usize) -> ASource<'_, f32> {
        self.group_channels(tg, grp, 0..tg.out_per_group())
    }
}

/// Whether GEMM + col2im beats the sub-pixel phases for `tg` (small groups,
/// at most 16 channels per group in and out, go to the phases and their
/// SIMD direct kernels either way): when a group has fewer than 16 output
/// channels (each phase's GEMM would have fewer rows than the micro-kernel's
/// tile), or when an input plane has fewer pixels than a group has input
/// channels (each phase's GEMM would have too few columns to repay packing
/// them, and the weights, gathered per call, outweigh the pixels). Measured
/// (Zen 5, AVX-512, 1 thread, GFLOP/s, phases vs GEMM + col2im), transposed
/// plans: dcgan_b8 (8² planes, 256 channels) 154 vs 180, gan_up_k4s2 (16²,
/// 128) 163 vs 156, unet_up_k2s2 215 vs 188, fcn_up_k3s2 155 vs 112; input
/// gradients: r50_deep (7², 512) 45 vs 117, r50_last1x1 (7², 2048) 70 vs
/// 132, the 3-channel stem r50_conv1 40 vs 95, r50_3x3_s2 (28², 128) 167
/// vs 142, r50_3x3 201 vs 167. It also wins wherever the taps are disjoint
/// ([`taps_disjoint`]: no col2im, one scatter): 1 thread AVX-512 Zen 5,
/// binaries alternating, three rounds, GFLOP/s, phases against GEMM +
/// scatter: unet_up_k2s2's plan 186–196 vs 203–212; the input gradient of
/// 2×2/2 from 64 to 128 channels on 56² 162 vs 188, of 4×4/4 from 96 to 192
/// on 56² 149–151 vs 147–148.
pub(crate) fn gemm_col2im_wins(tg: &TransposedGeometry) -> bool {
    let (cout_g, cin_g) = (tg.out_per_group(), tg.in_per_group());
    let small_groups = cout_g <= 16 && cin_g <= 16;
    !small_groups && (cout_g < 16 || tg.h.input * tg.w.input < cin_g || taps_disjoint(tg))
}

/// Whether col2im is the identity: a 1×1 kernel at stride 1 with no offset
/// and the output as large as the input. The GEMM then writes the output in
/// place, with bias and activation in its store, one GEMM per image and
/// group.
fn col2im_is_identity(tg: &TransposedGeometry) -> bool {
    let identity =
        |a: &TransposedAxis| a.kernel == 1 && a.stride == 1 && a.offset == 0 && a.output == a.input;
    identity(&tg.h) && identity(&tg.w)
}

/// Whether every output pixel takes exactly one tap (and one input pixel)
/// per input channel: the kernel as large as the stride along both axes,
/// no dilation or offset, the output exactly `σ·` the input (the decoder's
/// k2s2 upsampling, or the input gradient of a k×k/k patch embedding).
/// The column matrix then holds each output pixel once, and is scattered
/// into the planes ([`scatter_disjoint`]) instead of added into zeroed
/// sub-planes and interleaved.
pub(crate) fn taps_disjoint(tg: &TransposedGeometry) -> bool {
    let disjoint = |a: &TransposedAxis| {
        a.kernel == a.stride && a.dilation == 1 && a.offset == 0 && a.output == a.input * a.stride
    };
    disjoint(&tg.h) && disjoint(&tg.w) && !col2im_is_identity(tg)
}

/// Writes the chunk of the column matrix `col` (the input rows
/// `input_rows`, see [`col2im`]) of a [`taps_disjoint`] transposed
/// convolution into the output planes `image`, with `bias` (one value per
/// plane): output row `i·σ_h + u` takes, for each column phase `v`, the
/// row of the tap that window offset `(u, v)` pairs with, its columns
/// `σ_w` apart (at σ_w = 2, two rows zipped into one).
fn scatter_disjoint(
    tg: &TransposedGeometry,
    col: &[f32],
    input_rows: Range<usize>,
    image: &mut [f32],
    bias: Option<&[f32]>,
) {
    let (sh, sw, w_in, out_w) = (tg.h.stride, tg.w.stride, tg.w.input, tg.w.output);
    let cols = input_rows.len() * w_in;
    let taps = sh * sw;
    for (c, plane) in image.chunks_exact_mut(tg.h.output * out_w).enumerate() {
        let b = bias.map_or(0.0, |b| b[c]);
        let tap_row = |u: usize, v: usize, k: usize| {
            let (r, s) = tg.weight_tap(u, v);
            &col[(c * taps + r * sw + s) * cols + k * w_in..][..w_in]
        };
        for (k, i) in input_rows.clone().enumerate() {
            for u in 0..sh {
                let out_row = &mut plane[(i * sh + u) * out_w..][..out_w];
                if sw == 2 {
                    let (even, odd) = (tap_row(u, 0, k), tap_row(u, 1, k));
                    for ((x, &e), &o) in out_row.chunks_exact_mut(2).zip(even).zip(odd) {
                        x[0] = e + b;
                        x[1] = o + b;
                    }
                    continue;
                }
                for v in 0..sw {
                    let lane = out_row[v..].iter_mut().step_by(sw);
                    lane.zip(tap_row(u, v, k)).for_each(|(x, &t)| *x = t + b);
                }
            }
        }
    }
}

/// Rows of each group's GEMM: `C_out/g·R·S`.
pub(crate) fn gemm_rows(tg: &TransposedGeometry) -> usize {
    tg.out_per_group() * tg.h.kernel * tg.w.kernel
}

/// `W_gᵀ` of every group packed for a kernel with `mr` rows (a plan's
/// weights), into memory asked for fallibly.
pub(crate) fn pack_weights(
    tg: &TransposedGeometry,
    weight: &[f32],
    mr: usize,
) -> Result<Vec<f32>, ConvError> {
    let (rows, depth) = (gemm_rows(tg), tg.in_per_group());
    let len = PackedA::<f32>::packed_len(rows, depth, mr);
    let mut packed = super::zeroed("plan weights", len * tg.groups)?;
    for (grp, dst) in packed.chunks_exact_mut(len).enumerate() {
        // Group `grp`'s `W_gᵀ` lies column-major in the weight tensor.
        let block = &weight[grp * depth * rows..][..depth * rows];
        PackedA::pack_column_major(block, rows, depth, mr, dst);
    }
    Ok(packed)
}

crate::arch::with_isa_features! {
    /// [`col2im_body`] with the adds vectorised for `isa`. 1 thread, Zen 5,
    /// one process: r50_conv1's input gradient, its whole column matrix in
    /// one call, 241–261 µs compiled for the x86-64 baseline (the portable
    /// path), 169–175 µs for AVX-512; within the chunked call, 354–366 →
    /// 231–249 µs.
    pub(crate) fn col2im(
        tg: &TransposedGeometry,
        col: &mut [f32],
        input_rows: Range<usize>,
        image: &mut [f32],
        layout: PlaneLayout,
    ) = col2im_body;
}

/// Adds the column matrix of one image group (`col`, `C_out/g·R·S × H·W`,
/// row `(c·R + r)·S + s` holding what weight tap `(r, s)` of output channel
/// `c` contributes at each input pixel) into that group's output planes
/// (`image`, laid out as `layout` says): input pixel `(i, j)` reaches output
/// `(i·σ_h + u·d_h − p_h, j·σ_w + v·d_w − p_w)` through window offset
/// `(u, v)`, the offset `mode` pairs with tap `(r, s)`; outputs beyond the
/// edges are dropped. `col` may hold only the input rows `input_rows`
/// (each of its rows then `input_rows.len()·W` long); the elements whose
/// output falls outside may be overwritten with `-0.0`.
///
/// Where the layout's rows are as wide as the input's (see
/// [`PlaneLayout::spans`]), a tap's pixels land a fixed distance apart
/// from where they lie in `col`, so each tap is one contiguous add over all
/// its rows: the columns that would fall off a row's ends first become
/// `-0.0` (adding it changes no float, not even a `-0.0`), and the add
/// wraps them into the neighbouring row. Row by row, the adds of 14- or
/// 112-float rows cost more in loop overhead and scalar remainders than in
/// adds: 1 thread AVX-512 Zen 5, col2im of r50_deep's grad input took
/// 115–125 µs, r50_3x3_s2's 220–226 µs and r50_conv1's 163–165 µs of a
/// 1.2–1.4 ms call.
#[inline(always)]
fn col2im_body(
    tg: &TransposedGeometry,
    col: &mut [f32],
    input_rows: Range<usize>,
    image: &mut [f32],
    layout: PlaneLayout,
) {
    let (h, w) = (&tg.h, &tg.w);
    let first_row = input_rows.start;
    let plane = input_rows.len() * w.input;
    if plane == 0 {
        return;
    }
    let out_plane = layout.channel_len();
    let taps = h.kernel * w.kernel;
    // Per tap (the same for every channel): where its pixels land.
    let tap_spans: Vec<Option<TapSpan>> = if layout.spans(tg) {
        (0..taps)
            .map(|tap| TapSpan::new(tg, &layout, tap, &input_rows))
            .collect()
    } else {
        Vec::new()
    };
    for (m, row) in col.chunks_exact_mut(plane).enumerate() {
        let (c, tap) = (m / taps, m % taps);
        let dst = &mut image[c * out_plane..][..out_plane];
        if let Some(span) = tap_spans.get(tap) {
            if let Some(span) = span {
                span.add(row, first_row, w.input, dst);
            }
            continue;
        }
        // The weight tap and its window offset map to each other both ways.
        let (u, v) = tg.weight_tap(tap / w.kernel, tap % w.kernel);
        let col_shift = (v * w.dilation) as isize - w.offset;
        // Input columns whose output column is inside: j·σ_w + col_shift in 0..W_out.
        let (j_lo, j_hi) = super::im2col::valid_range(w.input, w.stride, col_shift, w.output);
        if j_lo == j_hi {
            continue;
        }
        for (i, src) in (first_row..).zip(row.chunks_exact(w.input)) {
            let o = (i * h.stride + u * h.dilation) as isize - h.offset;
            if o < 0 || o >= h.output as isize {
                continue;
            }
            let o = o as usize;
            let first = ((j_lo * w.stride) as isize + col_shift) as usize;
            let src = &src[j_lo..j_hi];
            if !layout.is_plane() {
                // Column phase `first mod σ_w`: its outputs are contiguous.
                let (phase, start) = (first % w.stride, first / w.stride);
                let at = layout.row_offset(o % layout.row_phases, phase, o / layout.row_phases);
                add_assign(&mut dst[at + start..][..src.len()], src);
                continue;
            }
            let out_row = &mut dst[o * w.output..][..w.output];
            match w.stride {
                1 => add_assign(&mut out_row[first..][..src.len()], src),
                sw => {
                    for (x, &v) in out_row[first..].iter_mut().step_by(sw).zip(src) {
                        *x += v;
                    }
                }
            }
        }
    }
}

/// Where one tap's pixels land in a [`PlaneLayout`] whose rows are as wide
/// as the input's ([`PlaneLayout::spans`]): input pixel `(i, j)` at
/// `shift + i·W + j` of its channel, for rows `i_lo..i_hi` (of the chunk)
/// and columns `j_lo..j_hi`.
#[derive(Clone, Copy, Debug)]
struct TapSpan {
    i_lo: usize,
    i_hi: usize,
    j_lo: usize,
    j_hi: usize,
    shift: isize,
}

impl TapSpan {
    /// The span of weight tap `tap` over the input rows `rows`, if any of
    /// its pixels lands inside.
    fn new(
        tg: &TransposedGeometry,
        layout: &PlaneLayout,
        tap: usize,
        rows: &Range<usize>,
    ) -> Option<TapSpan> {
        let (h, w) = (&tg.h, &tg.w);
        let (u, v) = tg.weight_tap(tap / w.kernel, tap % w.kernel);
        let col_shift = (v * w.dilation) as isize - w.offset;
        let row_shift = (u * h.dilation) as isize - h.offset;
        let (j_lo, j_hi) = super::im2col::valid_range(w.input, w.stride, col_shift, w.output);
        let (i_lo, i_hi) = super::im2col::valid_range(h.input, h.stride, row_shift, h.output);
        let (i_lo, i_hi) = (i_lo.max(rows.start), i_hi.min(rows.end));
        if j_lo == j_hi || i_lo >= i_hi {
            return None;
        }
        // Output row i·σ_h + row_shift is row i + a of row phase φ_h;
        // column j·σ_w + col_shift is column j + b of column phase φ_w.
        let (sh, sw) = (h.stride as isize, w.stride as isize);
        let (phi_h, a) = (row_shift.rem_euclid(sh), row_shift.div_euclid(sh));
        let (phi_w, b) = (col_shift.rem_euclid(sw), col_shift.div_euclid(sw));
        let base = layout.row_offset(phi_h as usize, phi_w as usize, 0) as isize;
        Some(TapSpan {
            i_lo,
            i_hi,
            j_lo,
            j_hi,
            shift: base + a * layout.width as isize + b,
        })
    }

    /// Adds this tap's row of the column matrix (`row`, input rows from
    /// `first_row` on, `width` floats each) into its channel `dst`, as one
    /// contiguous add: the columns outside `j_lo..j_hi` become `-0.0` first.
    #[inline(always)]
    fn add(&self, row: &mut [f32], first_row: usize, width: usize, dst: &mut [f32]) {
        let rows = &mut row[(self.i_lo - first_row) * width..(self.i_hi - first_row) * width];
        if self.j_lo > 0 || self.j_hi < width {
            for r in rows.chunks_exact_mut(width) {
                r[..self.j_lo].fill(-0.0);
                r[self.j_hi..].fill(-0.0);
            }
        }
        let src = &rows[self.j_lo..rows.len() - (width - self.j_hi)];
        // Rows i_lo + a ..= i_hi − 1 + a and columns j_lo + b ..< j_hi + b
        // of the sub-plane are output positions (valid_range), so the span
        // starts and ends inside it.
        let at = (self.shift + (self.i_lo * width + self.j_lo) as isize) as usize;
        add_assign(&mut dst[at..][..src.len()], src);
    }
}

/// `dst += src`. (Written as sixteen-float chunks, this compiled to
/// gathers and scatters across the chunks, four to seven times slower.)
#[inline(always)]
fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (x, &v) in dst.iter_mut().zip(src) {
        *x += v;
    }
}

/// How [`col2im`] lays out each output channel: as the plane
/// (`phases == row_phases == 1`), or, for a stride above 1, as
/// `σ_h·σ_w` sub-planes one after another, sub-plane `(φ_h, φ_w)` holding
/// output rows `φ_h + σ_h·q` (`height = ⌈H_out/σ_h⌉` of them) and of each
/// its columns `φ_w + σ_w·q` (`width = ⌈W_out/σ_w⌉` floats), so that each
/// input row adds into contiguous memory rather than every σ_w-th float,
/// and a tap's consecutive input rows into consecutive rows
/// ([`interleave`] then writes the planes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlaneLayout {
    phases: usize,
    row_phases: usize,
    width: usize,
    height: usize,
}

impl PlaneLayout {
    /// The plain output plane.
    pub(crate) fn plane(tg: &TransposedGeometry) -> PlaneLayout {
        PlaneLayout {
            phases: 1,
            row_phases: 1,
            width: tg.w.output,
            height: tg.h.output,
        }
    }

    /// Sub-planes for a stride above 1, else the plane.
    pub(crate) fn phased(tg: &TransposedGeometry) -> PlaneLayout {
        if tg.w.stride > 1 || tg.h.stride > 1 {
            PlaneLayout {
                phases: tg.w.stride,
                row_phases: tg.h.stride,
                width: tg.w.output.div_ceil(tg.w.stride),
                height: tg.h.output.div_ceil(tg.h.stride),
            }
        } else {
            PlaneLayout::plane(tg)
        }
    }

    /// Floats of one output channel.
    pub(crate) fn channel_len(&self) -> usize {
        self.phases * self.row_phases * self.height * self.width
    }

    /// Whether this is the plain plane (no sub-planes to interleave).
    pub(crate) fn is_plane(&self) -> bool {
        self.phases == 1 && self.row_phases == 1
    }

    /// Where row `q` of sub-plane `(φ_h, φ_w)` starts in a channel.
    fn row_offset(&self, phi_h: usize, phi_w: usize, q: usize) -> usize {
        ((phi_h * self.phases + phi_w) * self.height + q) * self.width
    }

    /// Whether every tap adds one contiguous span ([`col2im_body`]): the
    /// sub-planes (or the plane) split both strides and their rows are as
    /// wide as the input's, as where "same" padding halves (or keeps) the
    /// plane (r50_conv1, r50_3x3_s2, r50_deep's grad inputs).
    pub(crate) fn spans(&self, tg: &TransposedGeometry) -> bool {
        self.phases == tg.w.stride && self.row_phases == tg.h.stride && self.width == tg.w.input
    }
}

crate::arch::with_isa_features! {
    /// Writes channels laid out as `layout`'s sub-planes into the output
    /// planes `image`, adding `bias`: [`interleave_body`] vectorised for
    /// `isa`.
    pub(crate) fn interleave(
        tg: &TransposedGeometry,
        phased: &[f32],
        layout: PlaneLayout,
        bias: Option<&[f32]>,
        image: &mut [f32],
    ) = interleave_body;
}

/// See [`interleave`]. Two phases (stride 2, the common case) are zipped
/// pairwise, which vectorises into interleaving stores; more take a
/// strided store per phase. r50_3x3_s2's input gradient through
/// `Algorithm::Im2col` (1 thread, Zen 5) spent 330–430 µs here with a
/// strided store per phase, 43–62 µs pairwise (r50_conv1's: 78–122 → 11–16
/// µs), the same on the portable and the AVX-512 path.
#[inline(always)]
fn interleave_body(
    tg: &TransposedGeometry,
    phased: &[f32],
    layout: PlaneLayout,
    bias: Option<&[f32]>,
    image: &mut [f32],
) {
    let (rows, out_w) = (tg.h.output, tg.w.output);
    let channel = layout.channel_len();
    for (c, (src, dst)) in phased
        .chunks_exact(channel)
        .zip(image.chunks_exact_mut(rows * out_w))
        .enumerate()
    {
        let b = bias.map_or(0.0, |b| b[c]);
        for (o, out_row) in dst.chunks_exact_mut(out_w).enumerate() {
            let (phi_h, q) = (o % layout.row_phases, o / layout.row_phases);
            let phase_row =
                |phase: usize| &src[layout.row_offset(phi_h, phase, q)..][..layout.width];
            if layout.phases == 1 {
                for (x, &v) in out_row.iter_mut().zip(phase_row(0)) {
                    *x = v + b;
                }
                continue;
            }
            if layout.phases == 2 {
                let (even, odd) = (phase_row(0), phase_row(1));
                let mut pairs = out_row.chunks_exact_mut(2);
                for ((x, &e), &d) in (&mut pairs).zip(even).zip(odd) {
                    x[0] = e + b;
                    x[1] = d + b;
                }
                if let [last] = pairs.into_remainder() {
                    *last = even[out_w / 2] + b;
                }
                continue;
            }
            // Phases past the row's width (a row narrower than σ_w) are empty.
            for phase in 0..layout.phases.min(out_w) {
                let from = phase_row(phase);
                for (x, &v) in out_row[phase..].iter_mut().step_by(layout.phases).zip(from) {
                    *x = v + b;
                }
            }
        }
    }
}

/// [`col2im`] on up to `threads` threads, the output channels split in
/// halves with `rayon::join`: each channel's plane is written by one thread,
/// its adds in the same order whatever the split, so the result does not
/// depend on the thread count.
pub(crate) fn col2im_split(
    isa: Isa,
    tg: &TransposedGeometry,
    col: &mut [f32],
    input_rows: Range<usize>,
    image: &mut [f32],
    layout: PlaneLayout,
    threads: usize,
) {
    on_channel_halves(
        col,
        image,
        layout.channel_len(),
        threads,
        &|col, image, _| col2im(isa, tg, col, input_rows.clone(), image, layout),
    );
}

/// `f(col, image, c0)` over the output channels of `image` (planes of
/// `channel_len` floats, their rows of the column matrix in `col`), split
/// in halves with `rayon::join` down to one part per thread (`threads`
/// parts at most); `c0` is the part's first channel. Each channel is one
/// part's whole, whatever the split.
fn on_channel_halves(
    col: &mut [f32],
    image: &mut [f32],
    channel_len: usize,
    threads: usize,
    f: &(impl Fn(&mut [f32], &mut [f32], usize) + Sync),
) {
    fn go(
        col: &mut [f32],
        image: &mut [f32],
        channel_len: usize,
        c0: usize,
        threads: usize,
        f: &(impl Fn(&mut [f32], &mut [f32], usize) + Sync),
    ) {
        let channels = image.len() / channel_len;
        if threads <= 1 || channels < 2 {
            return f(col, image, c0);
        }
        let half = channels / 2;
        let rows = col.len() / channels * half;
        let (col_a, col_b) = col.split_at_mut(rows);
        let (img_a, img_b) = image.split_at_mut(half * channel_len);
        let rest = threads - threads / 2;
        rayon::join(
            || go(col_a, img_a, channel_len, c0, threads / 2, f),
            || go(col_b, img_b, channel_len, c0 + half, rest, f),
        );
    }
    go(col, image, channel_len, 0, threads, f);
}

/// Runs `tg` as GEMM + col2im on `input` into `output` (every element
/// written), with bias and activation. Threads split a group's output
/// channels where each gets at least [`MIN_CHANNELS_PER_THREAD`] (each
/// then runs every chunk for its channels, in its own part of the column
/// matrix); otherwise, where each thread gets a chunk (`col_chunk_rows`
/// cuts at least one per thread), they share the chunks out by input rows ([`ChunkRun::split_rows`]), and
/// else share each chunk's GEMM and col2im. r50_deep's grad input (256
/// channels), 2 threads AVX-512 Zen 5, six alternating runs: shared chunks
/// 355–371 GFLOP/s, split channels 369–392. Lengths are checked by the
/// caller.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the column matrix of one image group
/// cannot be allocated (before anything is written).
pub(crate) fn transposed_gemm(
    tg: &TransposedGeometry,
    input: &[f32],
    weights: TransposedWeights<'_>,
    bias: Option<&[f32]>,
    output: &mut [f32],
    options: &ForwardOptions,
) -> Result<(), ConvError> {
    let chunk_rows = col_chunk_rows(tg, options);
    let split_rows = row_parts_pay(tg, options.parallelism.max_threads());
    transposed_gemm_in_chunks(
        tg, input, weights, bias, output, options, chunk_rows, split_rows,
    )
}

/// [`transposed_gemm`] with the column matrix built `chunk_rows` input rows
/// at a time, its chunks split by input rows where the threads do not
/// split the channels if `split_rows`.
#[allow(clippy::too_many_arguments)]
fn transposed_gemm_in_chunks(
    tg: &TransposedGeometry,
    input: &[f32],
    weights: TransposedWeights<'_>,
    bias: Option<&[f32]>,
    output: &mut [f32],
    options: &ForwardOptions,
    chunk_rows: usize,
    split_rows: bool,
) -> Result<(), ConvError> {
    let (rows, depth) = (gemm_rows(tg), tg.in_per_group());
    let plane = tg.h.input * tg.w.input;
    let out_plane = tg.h.output * tg.w.output;
    let cout_g = tg.out_per_group();
    let in_place = col2im_is_identity(tg);
    let disjoint = taps_disjoint(tg);
    let isa = options.resolved_isa();
    // At a stride above 1, col2im adds into sub-planes (column phases),
    // contiguous, which are then interleaved into the planes: r50_conv1's
    // grad input spent 0.83 ms adding to every other float.
    let layout = if in_place || disjoint {
        PlaneLayout::plane(tg)
    } else {
        PlaneLayout::phased(tg)
    };
    let mut phased = Scratch::zeroed(
        "transposed convolution sub-planes",
        if !layout.is_plane() {
            tg.out_channels * layout.channel_len()
        } else {
            0
        },
    )?;
    let threads = options.parallelism.max_threads();
    let split = !in_place && splits_channels(tg, &weights, threads);
    // Each chunk's GEMM writes the whole of its part (β = 0); split over
    // channels, each thread writes the rows of its own channels.
    let mut col = Scratch::any(
        "im2col column matrix",
        if in_place {
            0
        } else {
            rows * chunk_rows * tg.w.input
        },
    )?;
    // Split over input rows instead (see `ChunkRun::split_rows`; col2im
    // only, as a scatter writes rather than adds): each further part's
    // column matrix and private planes of one group.
    let row_parts = if in_place || disjoint || split || !split_rows {
        1
    } else {
        row_parts(tg, chunk_rows, threads)
    };
    let group_len = cout_g * layout.channel_len();
    let mut parts = Scratch::any(
        "transposed convolution row parts",
        (row_parts - 1) * (col.len() + group_len),
    )?;
    // A pointwise layer whose planes have fewer pixels than a group has
    // output channels, with raw weights, runs `yᵀ = xᵀ·W_g` (see
    // `pointwise_swapped`) into this, then transposes it into the planes.
    let swapped_weights = match weights {
        TransposedWeights::Raw(w) if in_place && 0 < plane && plane < cout_g => Some(w),
        _ => None,
    };
    let mut swapped = Scratch::any(
        "transposed convolution swapped product",
        if swapped_weights.is_some() {
            plane * cout_g
        } else {
            0
        },
    )?;
    let gemm_opts = options.gemm_options(options.parallelism);
    for (n, image) in output
        .chunks_exact_mut(tg.out_channels * out_plane)
        .enumerate()
    {
        if in_place {
            for grp in 0..tg.groups {
                let x = &input[(n * tg.in_channels + grp * depth) * plane..][..depth * plane];
                let y = &mut image[grp * cout_g * out_plane..][..cout_g * out_plane];
                if let Some(w) = swapped_weights {
                    let w = &w[grp * depth * rows..][..depth * rows];
                    let bias = bias.map(|b| &b[grp * cout_g..][..cout_g]);
                    let product = &mut swapped[..plane * cout_g];
                    pointwise_swapped(isa, x, w, plane, bias, options, y, product);
                    continue;
                }
                let b = StridedMatrix {
                    ptr: x.as_ptr(),
                    rs: plane as isize,
                    cs: 1,
                };
                let c = StridedC {
                    ptr: y.as_mut_ptr(),
                    rs: out_plane as isize,
                    cs: 1,
                };
                let epilogue = Epilogue {
                    bias: bias.map_or(std::ptr::null(), |b| b[grp * cout_g..].as_ptr()),
                    clamp: options.activation.bounds(),
                };
                // SAFETY: A is the group's C_out/g × C_in/g transposed weight
                // block, B its C_in/g input planes, C its C_out/g output
                // planes of the same H·W pixels (exclusively borrowed); the
                // bias has C_out/g values from the group's first; β = 0.
                unsafe {
                    gemm_with_epilogue(
                        rows,
                        depth,
                        plane,
                        1.0,
                        &weights.group(tg, grp),
                        &b,
                        0.0,
                        c,
                        &epilogue,
                        &gemm_opts,
                        None,
                    )
                };
            }
            continue;
        }
        if !layout.is_plane() {
            phased.fill(0.0);
        } else if !disjoint {
            for (c, y) in image.chunks_exact_mut(out_plane).enumerate() {
                y.fill(bias.map_or(0.0, |b| b[c]));
            }
        }
        let channel_len = layout.channel_len();
        for grp in 0..tg.groups {
            let x = &input[(n * tg.in_channels + grp * depth) * plane..][..depth * plane];
            let y = if !layout.is_plane() {
                &mut phased[grp * cout_g * channel_len..][..cout_g * channel_len]
            } else {
                &mut image[grp * cout_g * out_plane..][..cout_g * out_plane]
            };
            let run = ChunkRun {
                tg,
                isa,
                x,
                chunk_rows,
                layout,
                finish: if disjoint {
                    ChunkFinish::Scatter(bias.map(|b| &b[grp * cout_g..][..cout_g]))
                } else {
                    ChunkFinish::Col2im
                },
            };
            if split {
                run.split_channels(&weights, grp, 0..cout_g, y, &mut col, options, threads);
            } else if row_parts > 1 {
                let a = weights.group(tg, grp);
                run.split_rows(&a, y, &mut col, &mut parts, row_parts, options);
            } else {
                let a = weights.group(tg, grp);
                run.chunks(&a, 0..cout_g, y, &mut col, &gemm_opts, threads);
            }
        }
        if !layout.is_plane() {
            interleave(isa, tg, &phased, layout, bias, image);
        }
        if options.activation != Activation::None {
            for y in image.iter_mut() {
                *y = options.activation.apply(*y);
            }
        }
    }
    Ok(())
}

/// One image group of a pointwise, stride-1 transposed convolution (or
/// input gradient) as `yᵀ = xᵀ·W_g` (`plane × C_out/g`, into `product`),
/// transposed into the output planes `y` with the bias and activation:
/// `x` holds the group's `C_in/g` input planes of `plane` pixels, `w` its
/// weight block (`C_in/g × C_out/g`, row-major). The usual `y = W_gᵀ·x`
/// reads `W_gᵀ` column-major, and a GEMM packs such an A slowly when it is
/// large and serves few column panels; here the weights are B, packed row
/// by row, and A is the small `xᵀ`. Intel Xeon, AVX-512, 1 thread, sgemm
/// with A column-major, median GFLOP/s: 512 × 2048 × 49 104–107 against
/// 135–137 for 49 × 2048 × 512, 1024 × 256 × 196 97–121 against 149–151,
/// 256 × 1024 × 196 134–136 against 144; with more pixels than channels
/// the usual order wins (512 × 128 × 784 160–166 against 155–157).
#[allow(clippy::too_many_arguments)]
fn pointwise_swapped(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    plane: usize,
    bias: Option<&[f32]>,
    options: &ForwardOptions,
    y: &mut [f32],
    product: &mut [f32],
) {
    let channels = y.len() / plane.max(1);
    let depth = x.len() / plane.max(1);
    let a = ASource::Strided(StridedMatrix {
        ptr: x.as_ptr(),
        rs: 1,
        cs: plane as isize,
    });
    let b = StridedMatrix {
        ptr: w.as_ptr(),
        rs: channels as isize,
        cs: 1,
    };
    let c = StridedC {
        ptr: product.as_mut_ptr(),
        rs: channels as isize,
        cs: 1,
    };
    // SAFETY: A is xᵀ (`plane × depth`, column-major over the group's
    // input planes), B the `depth × channels` weight block, C the
    // `plane × channels` product (exclusively borrowed); β = 0.
    unsafe {
        gemm_with_epilogue(
            plane,
            depth,
            channels,
            1.0,
            &a,
            &b,
            0.0,
            c,
            &Epilogue::NONE,
            &options.gemm_options(options.parallelism),
            None,
        )
    };
    crate::gemm::transpose::transpose_on(isa, product, channels, plane, channels, y, plane);
    let act = options.activation;
    if bias.is_none() && act == Activation::None {
        return;
    }
    for (c, row) in y.chunks_exact_mut(plane).enumerate() {
        let b = bias.map_or(0.0, |b| b[c]);
        for v in row {
            *v = act.apply(*v + b);
        }
    }
}

/// Channels of a group per thread below which the threads share each
/// chunk's GEMM and col2im instead of splitting the channels (with 3 output
/// channels, r50_conv1's grad input, a split would run 1 against 2).
const MIN_CHANNELS_PER_THREAD: usize = 8;

/// Whether the threads split a group's output channels, each running the
/// chunks' GEMMs and col2im for its own channels from start to end (one
/// fork per image and group), rather than sharing every chunk's GEMM and
/// col2im (two fork-joins per chunk). Where packed weights could not be
/// cut at a panel boundary near the middle, they share.
fn splits_channels(
    tg: &TransposedGeometry,
    weights: &TransposedWeights<'_>,
    threads: usize,
) -> bool {
    let cout_g = tg.out_per_group();
    threads > 1
        && cout_g >= MIN_CHANNELS_PER_THREAD * threads
        && channel_align(tg, weights) <= cout_g / (2 * threads)
}

/// Channel counts at which a group's rows of `W_gᵀ` can be cut: packed
/// panels of `mr` rows are cut between panels only.
fn channel_align(tg: &TransposedGeometry, weights: &TransposedWeights<'_>) -> usize {
    match *weights {
        TransposedWeights::Raw(_) => 1,
        TransposedWeights::Packed { mr, .. } => {
            let window = tg.h.kernel * tg.w.kernel;
            mr / crate::gemm::gcd(window, mr).max(1)
        }
    }
}

/// What the chunk loop of one image and group reads.
struct ChunkRun<'a> {
    tg: &'a TransposedGeometry,
    isa: Isa,
    /// The group's input planes.
    x: &'a [f32],
    chunk_rows: usize,
    layout: PlaneLayout,
    finish: ChunkFinish<'a>,
}

/// How a chunk of the column matrix reaches the output.
#[derive(Clone, Copy)]
enum ChunkFinish<'a> {
    /// Added where it lands ([`col2im`]), into planes that already hold the
    /// bias or into zeroed sub-planes.
    Col2im,
    /// Scattered, with the group's bias if any, for a [`taps_disjoint`]
    /// convolution ([`scatter_disjoint`]).
    Scatter(Option<&'a [f32]>),
}

impl ChunkRun<'_> {
    /// The chunks' GEMMs (`a`: the rows of `W_gᵀ` of the group's output
    /// channels `chans`, whose planes or sub-planes `y` holds) and their
    /// col2im (or scatter) into `y`, on up to `threads` threads; `col`
    /// holds `chans.len()·R·S × chunk_rows·W` floats.
    fn chunks(
        &self,
        a: &ASource<'_, f32>,
        chans: Range<usize>,
        y: &mut [f32],
        col: &mut [f32],
        gemm_opts: &crate::GemmOptions,
        threads: usize,
    ) {
        self.chunks_of_rows(a, chans, 0..self.tg.h.input, y, col, gemm_opts, threads);
    }

    /// [`ChunkRun::chunks`] for the input rows `input_rows` only (from a
    /// chunk's first row).
    #[allow(clippy::too_many_arguments)]
    fn chunks_of_rows(
        &self,
        a: &ASource<'_, f32>,
        chans: Range<usize>,
        input_rows: Range<usize>,
        y: &mut [f32],
        col: &mut [f32],
        gemm_opts: &crate::GemmOptions,
        threads: usize,
    ) {
        let tg = self.tg;
        let (depth, plane) = (tg.in_per_group(), tg.h.input * tg.w.input);
        let rows = chans.len() * tg.h.kernel * tg.w.kernel;
        for i0 in input_rows.clone().step_by(self.chunk_rows) {
            let i1 = (i0 + self.chunk_rows).min(input_rows.end);
            let cols = (i1 - i0) * tg.w.input;
            let b = StridedMatrix {
                ptr: self.x[i0 * tg.w.input..].as_ptr(),
                rs: plane as isize,
                cs: 1,
            };
            let c = StridedC {
                ptr: col.as_mut_ptr(),
                rs: cols as isize,
                cs: 1,
            };
            // SAFETY: A is `rows` rows of the group's C_out/g·R·S × C_in/g
            // transposed weight block (raw or packed for the selected
            // kernel), B the input rows i0..i1 of the group's C_in/g planes
            // (`cols` floats from row i0 of each), C the front of the column
            // matrix `col` holds (rows × cols, exclusively ours); β = 0, so
            // C is only written.
            unsafe {
                gemm_with_epilogue(
                    rows,
                    depth,
                    cols,
                    1.0,
                    a,
                    &b,
                    0.0,
                    c,
                    &Epilogue::NONE,
                    gemm_opts,
                    None,
                )
            };
            let part = &mut col[..rows * cols];
            match self.finish {
                ChunkFinish::Scatter(bias) => {
                    let bias = bias.map(|b| &b[chans.clone()]);
                    on_channel_halves(
                        part,
                        y,
                        tg.h.output * tg.w.output,
                        threads,
                        &|col, y, c0| scatter_disjoint(tg, col, i0..i1, y, bias.map(|b| &b[c0..])),
                    );
                }
                ChunkFinish::Col2im => {
                    col2im_split(self.isa, tg, part, i0..i1, y, self.layout, threads)
                }
            }
        }
    }

    /// [`ChunkRun::chunks`] for all of the group's output channels (`a`,
    /// their planes or sub-planes in `y`), with the chunks shared out in
    /// `parts` runs of consecutive input rows, one per thread, each running
    /// its GEMMs on its own thread. Part 0 adds into `y` and uses `col`;
    /// each further part adds into planes of its own (zeroed first) with a
    /// column matrix of its own, both from `spare` (`parts − 1` times
    /// `col.len() + y.len()` floats), which are then added into `y` in part
    /// order. Where the group has too few output channels to split them
    /// (the 3-channel stem's input gradient), sharing every chunk's GEMM
    /// and col2im instead cost two fork-joins per chunk and ran no faster
    /// on 2 threads than on 1.
    ///
    /// Bitwise identical from run to run; an output that two parts reach
    /// (rows where their input rows' windows meet) sums their terms in
    /// another order than one thread does.
    fn split_rows(
        &self,
        a: &ASource<'_, f32>,
        y: &mut [f32],
        col: &mut [f32],
        spare: &mut [f32],
        parts: usize,
        options: &ForwardOptions,
    ) {
        use rayon::prelude::*;
        let tg = self.tg;
        let chans = 0..tg.out_per_group();
        let chunks = tg.h.input.div_ceil(self.chunk_rows);
        // Part `t`'s input rows: whole chunks, as evenly shared as they go.
        let rows_of = |t: usize| {
            let first = |t: usize| (chunks * t / parts * self.chunk_rows).min(tg.h.input);
            first(t)..first(t + 1)
        };
        let (col_len, y_len) = (col.len(), y.len());
        let gemm_opts = options.gemm_options(crate::Parallelism::threads(1));
        let mut own: Vec<(&mut [f32], &mut [f32])> = vec![(col, y)];
        for part in spare.chunks_exact_mut(col_len + y_len).take(parts - 1) {
            let (c, planes) = part.split_at_mut(col_len);
            own.push((c, planes));
        }
        own.par_iter_mut().enumerate().for_each(|(t, (c, planes))| {
            if t > 0 {
                planes.fill(0.0);
            }
            self.chunks_of_rows(a, chans.clone(), rows_of(t), planes, c, &gemm_opts, 1);
        });
        let (first, rest) = own.split_at_mut(1);
        for (_, planes) in rest {
            add_assign(first[0].1, planes);
        }
    }

    /// [`ChunkRun::chunks`] for output channels `chans` of group `grp`
    /// (their planes or sub-planes in `y`, their rows of the column
    /// matrix in `col`), split in halves with `rayon::join` down to one
    /// thread each, at multiples of [`channel_align`]. Each channel's rows
    /// go through the same GEMM and col2im steps whatever the split, so the
    /// result does not depend on the thread count.
    #[allow(clippy::too_many_arguments)]
    fn split_channels(
        &self,
        weights: &TransposedWeights<'_>,
        grp: usize,
        chans: Range<usize>,
        y: &mut [f32],
        col: &mut [f32],
        options: &ForwardOptions,
        threads: usize,
    ) {
        let tg = self.tg;
        let window = tg.h.kernel * tg.w.kernel;
        let align = channel_align(tg, weights);
        let half = (chans.len() * (threads / 2) / threads.max(1)) / align * align;
        if threads > 1 && half > 0 && half < chans.len() {
            let mid = chans.start + half;
            let (ya, yb) = y.split_at_mut(half * self.layout.channel_len());
            let (ca, cb) = col.split_at_mut(half * window * self.chunk_rows * tg.w.input);
            rayon::join(
                || {
                    self.split_channels(
                        weights,
                        grp,
                        chans.start..mid,
                        ya,
                        ca,
                        options,
                        threads / 2,
                    )
                },
                || {
                    let rest = threads - threads / 2;
                    self.split_channels(weights, grp, mid..chans.end, yb, cb, options, rest)
                },
            );
            return;
        }
        let a = weights.group_channels(tg, grp, chans.clone());
        let gemm_opts = options.gemm_options(crate::Parallelism::threads(threads));
        self.chunks(&a, chans, y, col, &gemm_opts, threads);
    }
}

/// How many runs of chunks [`ChunkRun::split_rows`] shares a group's
/// chunks out in on `threads` threads (1: it does not): one per thread,
/// where each gets a chunk ([`transposed_gemm`] asks for it only where
/// [`row_parts_pay`]).
fn row_parts(tg: &TransposedGeometry, chunk_rows: usize, threads: usize) -> usize {
    let chunks = tg.h.input.div_ceil(chunk_rows.max(1));
    if threads > 1 && chunks >= threads {
        threads
    } else {
        1
    }
}

/// The fewest multiply-adds of one image group's GEMMs per thread for
/// which [`ChunkRun::split_rows`] runs: a part costs a fork and an add of
/// its planes, and a rayon fork-join alone takes 8–40 µs on a shared VM
/// (2²² multiply-adds take 30–50 µs on one AVX-512 core at 60–70% of its
/// peak). Smaller groups keep one thread's order.
const MIN_ROW_PART_FMAS: usize = 1 << 22;

/// Whether a group's GEMMs give each of `threads` threads at least
/// [`MIN_ROW_PART_FMAS`].
fn row_parts_pay(tg: &TransposedGeometry, threads: usize) -> bool {
    let fmas = gemm_rows(tg)
        .saturating_mul(tg.in_per_group())
        .saturating_mul(tg.h.input)
        .saturating_mul(tg.w.input);
    threads > 1 && fmas / threads >= MIN_ROW_PART_FMAS
}

/// Input rows per chunk of the column matrix, which stays in L2 between
/// the GEMM that writes it and the col2im (or scatter) that reads it: as
/// many as keep a chunk
/// (`C_out/g·R·S` rows of that many input rows' pixels) within half of L2,
/// at least one, and never so few that the chunk's GEMM would select
/// another micro-kernel than the whole plane's. r50_conv1's grad input (147 rows, 112-pixel input rows)
/// wrote and re-read its whole 7.4 MB column matrix through L3 before:
/// the GEMM took 1.3 ms and col2im 0.93 ms of the call (Zen 5, 1 thread).
fn col_chunk_rows(tg: &TransposedGeometry, options: &ForwardOptions) -> usize {
    let rows = gemm_rows(tg);
    let row_bytes = rows
        .saturating_mul(tg.w.input)
        .saturating_mul(std::mem::size_of::<f32>())
        .max(1);
    let mut chunk = (crate::gemm::cache::cache_hierarchy().l2.per_core() / 2 / row_bytes)
        .clamp(1, tg.h.input.max(1));
    // Threads that cannot split a group's output channels split the chunks
    // ([`ChunkRun::split_rows`]): at least one each.
    let threads = options.parallelism.max_threads();
    if tg.out_per_group() < MIN_CHANNELS_PER_THREAD * threads && row_parts_pay(tg, threads) {
        chunk = chunk.min(tg.h.input.div_ceil(threads).max(1));
    }
    if chunk >= tg.h.input {
        return tg.h.input.max(1);
    }
    // Weights packed once (a plan's, or a batch's) are packed for the
    // kernel of the whole plane; chunks whose narrower GEMMs would select
    // another kernel (the column kernel, say) are not taken.
    let isa = options.resolved_isa();
    let mr = |n: usize| select_kernel(Some(isa), rows, n, true, options.blocking).mr;
    let whole = mr(tg.h.input * tg.w.input);
    let last = match tg.h.input % chunk {
        0 => chunk,
        r => r,
    };
    if mr(chunk * tg.w.input) == whole && mr(last * tg.w.input) == whole {
        chunk
    } else {
        tg.h.input
    }
}

/// [`transposed_gemm`] with raw weights, packed first when more than one
/// image will use them (the native engine packs a raw A again in every
/// GEMM, one per image and group).
///
/// # Errors
/// As [`transposed_gemm`], and [`ConvError::OutOfMemory`] for the packed
/// weights.
pub(crate) fn transposed_gemm_raw(
    tg: &TransposedGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    options: &ForwardOptions,
) -> Result<(), ConvError> {
    // One GEMM per image, group and chunk of rows: a raw A would be packed
    // again in each.
    let gemms = if col2im_is_identity(tg) {
        tg.batch
    } else {
        tg.batch * tg.h.input.div_ceil(col_chunk_rows(tg, options))
    };
    if gemms == 1 || options.backend != GemmBackend::Native {
        return transposed_gemm(
            tg,
            input,
            TransposedWeights::Raw(weight),
            bias,
            output,
            options,
        );
    }
    let isa = options.resolved_isa();
    let plane = tg.h.input * tg.w.input;
    let mr = select_kernel(Some(isa), gemm_rows(tg), plane, true, options.blocking).mr;
    let packed = pack_weights(tg, weight, mr)?;
    let options = ForwardOptions {
        isa: Some(isa),
        ..*options
    };
    let weights = TransposedWeights::Packed { data: &packed, mr };
    transposed_gemm(tg, input, weights, bias, output, &options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::direct::transposed_direct;

    /// GEMM + col2im against the definition with the column matrix in
    /// chunks of 1 to 3 input rows, on 1 to 3 threads: the 3-channel
    /// groups run their chunks split by input rows on 2 or more threads
    /// (two parts meeting at every kind of seam), the 24-channel group
    /// splits its channels; a run repeated gives the same bits. On every
    /// path the CPU runs (the GEMM's kernels and col2im's adds per ISA).
    #[test]
    fn chunks_split_by_rows_or_channels_match_the_definition() {
        let axis = |input, kernel, stride, dilation, offset| {
            let reach = (input - 1) * stride + (kernel - 1) * dilation + 1;
            TransposedAxis {
                input,
                output: reach - 2 * offset as usize,
                kernel,
                stride,
                dilation,
                offset,
            }
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let cases = [
            // (channels in, out, groups, h, w)
            (4, 3, 1, axis(9, 7, 2, 1, 3), axis(6, 7, 2, 1, 3)),
            (4, 3, 1, axis(8, 3, 1, 1, 1), axis(5, 3, 1, 1, 1)),
            (2, 6, 2, axis(10, 3, 2, 2, 1), axis(4, 2, 3, 1, 0)),
            (5, 24, 1, axis(7, 3, 2, 1, 1), axis(5, 3, 2, 1, 1)),
        ];
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (cin, cout, groups, h, w) in cases {
            let tg = TransposedGeometry {
                batch: 2,
                in_channels: cin,
                out_channels: cout,
                groups,
                h,
                w,
                mode: crate::ConvMode::CrossCorrelation,
            };
            let x: Vec<f32> = (0..tg.input_len()).map(|_| next()).collect();
            let wt: Vec<f32> = (0..tg.weight_len()).map(|_| next()).collect();
            let b: Vec<f32> = (0..cout).map(|_| next()).collect();
            let mut want = vec![0.0; tg.output_len()];
            transposed_direct(&tg, &x, &wt, Some(&b), Activation::None, &mut want);
            // Terms per output: at most C_in/g·R·S, each below 1/4.
            let terms = (tg.in_per_group() * h.kernel * w.kernel) as f32;
            let tol = (terms + 1.0) * 8.0 * f32::EPSILON;
            for isa in crate::testing::isas_under_test() {
                for chunk_rows in 1..=3 {
                    for threads in 1..=3 {
                        let options = ForwardOptions::new(super::super::Algorithm::Im2col)
                            .isa(isa)
                            .parallelism(crate::Parallelism::threads(threads));
                        let run = || {
                            let mut got = vec![f32::NAN; tg.output_len()];
                            pool.install(|| {
                                transposed_gemm_in_chunks(
                                    &tg,
                                    &x,
                                    TransposedWeights::Raw(&wt),
                                    Some(&b),
                                    &mut got,
                                    &options,
                                    chunk_rows,
                                    true,
                                )
                            })
                            .unwrap();
                            got
                        };
                        let got = run();
                        for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - e).abs() <= tol,
                                "{tg:?} {isa:?} chunks of {chunk_rows}, {threads} threads: [{i}] {g} vs {e}"
                            );
                        }
                        assert_eq!(
                            got,
                            run(),
                            "{tg:?} {isa:?} {chunk_rows} rows, {threads} threads"
                        );
                    }
                }
            }
        }
    }
}
