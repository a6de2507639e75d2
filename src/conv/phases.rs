//! Transposed convolution (and so the input gradient of a convolution) as
//! a handful of ordinary stride-1 convolutions, one per sub-pixel phase, run
//! on the forward machinery (implicit GEMM, SIMD direct, plans, threads,
//! every ISA): the zeros a stride would insert between input pixels are
//! never multiplied.
//!
//! Along one axis, a transposed convolution with stride σ, dilation d and
//! offset p writes
//!
//! ```text
//! y[o] = Σ_{i, u : i·σ + u·d − p = o} x[i] · w[u]
//! ```
//!
//! Output `o = φ + σ·q` of phase `φ ∈ 0..σ` only meets the window offsets
//! `u` with `φ + p − u·d ≡ 0 (mod σ)`, and each such tap reads
//! `x[q + e_u]` with `e_u = (φ + p − u·d)/σ`. Taken in decreasing `u`, the
//! `e_u` rise by `d/gcd(σ, d)`: phase `φ` is a stride-1 cross-correlation of
//! `x` with the sub-kernel of those taps, dilation `d/gcd(σ, d)`, padding
//! `−e_{u_max}` before. The two axes are independent, so there are σ_h·σ_w
//! phases, each a [`Conv2d`] built from the transposed convolution's numbers,
//! whose weights are the matching taps gathered and transposed
//! (`[C_out, C_in/g, R', S']`).
//!
//! Where a phase would need negative padding (padding beyond the kernel's
//! reach, or an output larger than the input reaches) its convolution
//! computes a few rows or columns more and the scatter skips them. A phase
//! with no tap at all gets `act(bias)`.
//!
//! A stride-1 transposed convolution whose one phase lines up with the
//! output writes the output in place; otherwise each phase of one image is
//! computed into a scratch plane (`C_out · ⌈H/σ_h⌉ · ⌈W/σ_w⌉` floats at most)
//! and scattered.

use super::gemm_lowering::{forward_gemm, packed_group_len, Lowering, Weights};
use super::scratch::Scratch;
use super::{try_with_capacity, Algorithm, Conv2d, ForwardOptions};
use crate::error::ConvError;
use crate::gemm::engine::select_kernel;
use crate::gemm::kernels::prefetch_read;
use crate::gemm::{Activation, GemmBackend, Parallelism};
use crate::geometry::{Conv2dParams, ConvGeometry, ConvMode, Padding};
use rayon::prelude::*;

/// One axis of a transposed convolution: `y[o] = Σ x[i]·w[u]` over
/// `i·stride + u·dilation − offset = o`, for `i < input`, `u < kernel`,
/// `o < output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TransposedAxis {
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub offset: isize,
}

/// A whole transposed convolution: input `[N, C_in, H_in, W_in]`, weight
/// `[C_in, C_out/groups, R, S]` (window offset `(u, v)` multiplies the
/// weight tap `mode` maps it to), output `[N, C_out, H_out, W_out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TransposedGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub h: TransposedAxis,
    pub w: TransposedAxis,
    pub mode: ConvMode,
}

impl TransposedGeometry {
    /// The transposed convolution whose output is `g`'s input gradient:
    /// `grad_output` is its input.
    pub(crate) fn grad_input_of(g: &ConvGeometry) -> TransposedGeometry {
        let axis = |input, output, kernel, stride, dilation, before: usize| TransposedAxis {
            input,
            output,
            kernel,
            stride,
            dilation,
            // The geometry keeps every padding within isize.
            offset: before as isize,
        };
        TransposedGeometry {
            batch: g.batch,
            in_channels: g.out_channels,
            out_channels: g.in_channels,
            groups: g.groups,
            h: axis(
                g.out_h,
                g.in_h,
                g.kernel_h,
                g.stride_h,
                g.dilation_h,
                g.padding.top,
            ),
            w: axis(
                g.out_w,
                g.in_w,
                g.kernel_w,
                g.stride_w,
                g.dilation_w,
                g.padding.left,
            ),
            mode: g.mode,
        }
    }

    pub(crate) fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    pub(crate) fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    pub(crate) fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.h.input * self.w.input
    }

    pub(crate) fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.h.output * self.w.output
    }

    pub(crate) fn weight_len(&self) -> usize {
        self.in_channels * self.out_per_group() * self.h.kernel * self.w.kernel
    }

    /// The weight tap that window offset `(u, v)` multiplies.
    pub(crate) fn weight_tap(&self, u: usize, v: usize) -> (usize, usize) {
        match self.mode {
            ConvMode::CrossCorrelation => (u, v),
            ConvMode::Convolution => (self.h.kernel - 1 - u, self.w.kernel - 1 - v),
        }
    }
}

/// Phase `phase` of one axis, as a stride-1 convolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AxisPhase {
    /// First output of the phase; the others follow every `stride`.
    pub phase: usize,
    /// Outputs of the phase (`⌈(output − phase)/stride⌉`).
    pub len: usize,
    /// Window offsets `u` of the taps the phase meets, in the order of the
    /// sub-kernel (decreasing `u`, increasing input index).
    pub taps: Vec<usize>,
    /// The sub-kernel's dilation, `d/gcd(σ, d)`.
    pub dilation: usize,
    /// Padding of the phase's convolution before and after the input.
    pub pad_before: usize,
    pub pad_after: usize,
    /// Outputs of the phase's convolution before the first real one.
    pub skip: usize,
    /// Outputs of the phase's convolution (`skip + len` or a few more).
    pub conv_len: usize,
}

impl TransposedAxis {
    /// Phase `phase < stride` of this axis.
    pub(crate) fn phase(&self, phase: usize) -> AxisPhase {
        let len = self.output.saturating_sub(phase).div_ceil(self.stride);
        let (sigma, d) = (self.stride as i128, self.dilation as i128);
        let base = phase as i128 + self.offset as i128;
        let taps: Vec<usize> = (0..self.kernel)
            .rev()
            .filter(|&u| (base - u as i128 * d).rem_euclid(sigma) == 0)
            .collect();
        let dilation = self.dilation / crate::gemm::gcd(self.stride, self.dilation);
        let mut out = AxisPhase {
            phase,
            len,
            taps,
            dilation,
            pad_before: 0,
            pad_after: 0,
            skip: 0,
            conv_len: 0,
        };
        let Some(&u_max) = out.taps.first() else {
            return out;
        };
        if len == 0 {
            return out;
        }
        // Input index of the first tap for the phase's first output.
        let first = (base - u_max as i128 * d) / sigma;
        let reach = (dilation * (out.taps.len() - 1)) as i128;
        let pad_before = (-first).max(0);
        let skip = first.max(0);
        let input = self.input as i128;
        let pad_after = (skip + len as i128 + reach - input - pad_before).max(0);
        let conv_len = input + pad_before + pad_after - reach;
        // Every term is bounded by a kernel reach or an extent the caller
        // validated, so these fit usize.
        out.pad_before = pad_before as usize;
        out.pad_after = pad_after as usize;
        out.skip = skip as usize;
        out.conv_len = conv_len as usize;
        out
    }

    /// Whether the phase's convolution is the whole axis, in place.
    fn in_place(&self, p: &AxisPhase) -> bool {
        self.stride == 1 && p.skip == 0 && p.conv_len == p.len
    }
}

/// One sub-pixel phase of a transposed convolution.
#[derive(Clone, Debug)]
pub(crate) struct Phase {
    pub rows: AxisPhase,
    pub cols: AxisPhase,
    /// The phase's convolution (`None` when no tap reaches it); its batch is
    /// the whole batch when it writes in place, else 1 (one image at a time
    /// through the scratch plane).
    pub conv: Option<Conv2d>,
    pub in_place: bool,
}

impl Phase {
    /// Floats of scratch one image of this phase needs (0 in place).
    fn scratch_len(&self) -> usize {
        match &self.conv {
            Some(conv) if !self.in_place => conv.geometry().output_len(),
            _ => 0,
        }
    }
}

/// The phases of `tg`, with an output pixel (`len > 0` on both axes).
pub(crate) fn phases(tg: &TransposedGeometry) -> Result<Vec<Phase>, ConvError> {
    let mut out = Vec::new();
    for ph in 0..tg.h.stride.min(tg.h.output) {
        for pw in 0..tg.w.stride.min(tg.w.output) {
            let (rows, cols) = (tg.h.phase(ph), tg.w.phase(pw));
            let in_place = tg.h.in_place(&rows) && tg.w.in_place(&cols);
            let conv = if rows.taps.is_empty() || cols.taps.is_empty() {
                None
            } else {
                let batch = if in_place { tg.batch } else { 1 };
                let params = Conv2dParams::new(
                    batch,
                    tg.in_channels,
                    (tg.h.input, tg.w.input),
                    tg.out_channels,
                    (rows.taps.len(), cols.taps.len()),
                )
                .padding(Padding::explicit(
                    rows.pad_before,
                    rows.pad_after,
                    cols.pad_before,
                    cols.pad_after,
                ))
                .dilation(rows.dilation, cols.dilation)
                .groups(tg.groups);
                Some(params.build()?)
            };
            out.push(Phase {
                rows,
                cols,
                conv,
                in_place,
            });
        }
    }
    Ok(out)
}

/// Floats of scratch a call needs: one image of every phase of the row
/// phase with the largest outputs (its column phases are stored together).
pub(crate) fn scratch_len(tg: &TransposedGeometry, phases: &[Phase]) -> usize {
    phases
        .chunks(column_phases(tg))
        .map(|group| group.iter().map(Phase::scratch_len).sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// Column phases per row phase (`phases` lists them row phase by row phase).
fn column_phases(tg: &TransposedGeometry) -> usize {
    tg.w.stride.min(tg.w.output).max(1)
}

/// The phase's weights `[C_out, C_in/g, R', S']`, from the transposed
/// convolution's `[C_in, C_out/g, R, S]`, into `dst` (exactly that long).
///
/// A transpose of the two channel axes: input channels are taken in blocks
/// of [`GATHER_BLOCK`], so the rows read for one output channel (a whole
/// weight row apart, often a multiple of 4 KiB, which maps them all to the
/// same few cache sets) stay few enough to remain in L1 while every output
/// channel of the group takes its taps from them. Measured on r50_deep's
/// 512 × 512 × 3 × 3 weights (Zen 5): the unblocked loop took longer than
/// the whole grad-input GEMM.
pub(crate) fn gather_weights(
    tg: &TransposedGeometry,
    phase: &Phase,
    weight: &[f32],
    dst: &mut [f32],
) {
    let (cin_g, cout_g) = (tg.in_per_group(), tg.out_per_group());
    let taps = tap_offsets(tg, phase);
    let nt = taps.len();
    let window = tg.h.kernel * tg.w.kernel;
    debug_assert_eq!(dst.len(), tg.out_channels * cin_g * nt);
    for grp in 0..tg.groups {
        for k0 in (0..cin_g).step_by(GATHER_BLOCK) {
            let k1 = (k0 + GATHER_BLOCK).min(cin_g);
            for c in 0..cout_g {
                let co = grp * cout_g + c;
                for k in k0..k1 {
                    let from = &weight[(((grp * cin_g + k) * cout_g + c) * window)..][..window];
                    let to = &mut dst[(co * cin_g + k) * nt..][..nt];
                    for (x, &t) in to.iter_mut().zip(&taps) {
                        *x = from[t];
                    }
                }
            }
        }
    }
}

/// The phase's weights packed for a GEMM kernel with `mr` rows, in the
/// layout `Weights::Packed` reads (per group, `⌈(C_out/g)/mr⌉` panels of
/// `C_in/g·R'·S' × mr`), from [`weights_by_tap`]: each step copies one
/// input channel's `mr` consecutive output channels of one tap (a
/// contiguous run) into one contiguous stretch of a panel.
///
/// The panels are filled a block of input channels at a time, every panel
/// of the thread's share from the same block, so each block of the source
/// is read from cache by all of them. Filling one panel over its whole
/// depth before the next reads a `mr`-float sliver of every input
/// channel's row per panel, a page apart for wide layers: r50_last1x1's
/// grad input (2048 × 512 weights) spent 0.7 ms gathering, more than its
/// GEMM.
fn gather_packed(
    tg: &TransposedGeometry,
    phase: &Phase,
    by_tap: &[f32],
    mr: usize,
    dst: &mut [f32],
    threads: usize,
) {
    // Input channels per block: their source rows (`C_out/g·R·S` floats
    // each) fill at most a quarter of L2.
    let row_bytes = (tg.out_per_group() * tg.h.kernel * tg.w.kernel)
        .saturating_mul(std::mem::size_of::<f32>())
        .max(1);
    let block = (crate::gemm::cache::cache_hierarchy().l2.per_core() / 4 / row_bytes).max(1);
    gather_packed_in_blocks(tg, phase, by_tap, mr, dst, threads, block);
}

/// [`gather_packed`] a `block` of input channels at a time.
fn gather_packed_in_blocks(
    tg: &TransposedGeometry,
    phase: &Phase,
    by_tap: &[f32],
    mr: usize,
    dst: &mut [f32],
    threads: usize,
    block: usize,
) {
    let (cin_g, cout_g) = (tg.in_per_group(), tg.out_per_group());
    let taps = tap_offsets(tg, phase);
    let depth = cin_g * taps.len();
    let panels = cout_g.div_ceil(mr);
    let total = tg.groups * panels;
    let dst = &mut dst[..total * depth * mr];
    if total == 0 || depth == 0 {
        return;
    }
    // Panels `first..` of the packed weights (group-major), whole.
    let fill = |first: usize, part: &mut [f32]| {
        for k0 in (0..cin_g).step_by(block) {
            let ks = k0..(k0 + block).min(cin_g);
            for (j, panel) in part.chunks_exact_mut(depth * mr).enumerate() {
                let (grp, q) = ((first + j) / panels, (first + j) % panels);
                let rows = mr.min(cout_g - q * mr);
                copy_by_tap(
                    tg,
                    &taps,
                    by_tap,
                    grp,
                    q * mr..q * mr + rows,
                    mr,
                    ks.clone(),
                    panel,
                );
            }
        }
    };
    let per_thread = total.div_ceil(threads.max(1));
    if threads > 1 && total > 1 {
        // The panels are independent: the gather runs on the call's threads
        // rather than alone before them.
        dst.par_chunks_mut(per_thread * depth * mr)
            .enumerate()
            .for_each(|(t, part)| fill(t * per_thread, part));
    } else {
        fill(0, dst);
    }
}

/// Input channels `ks` of one panel (see [`pack_phase_panel`]) copied from
/// [`weights_by_tap`]: per input channel and tap, one contiguous run of
/// the group's output channels `channels`, lanes past them zero.
#[allow(clippy::too_many_arguments)]
fn copy_by_tap(
    tg: &TransposedGeometry,
    taps: &[usize],
    by_tap: &[f32],
    grp: usize,
    channels: std::ops::Range<usize>,
    width: usize,
    ks: std::ops::Range<usize>,
    panel: &mut [f32],
) {
    let (cin_g, cout_g) = (tg.in_per_group(), tg.out_per_group());
    let window = tg.h.kernel * tg.w.kernel;
    let (nt, rows) = (taps.len(), channels.len());
    for k in ks {
        let from = &by_tap[(grp * cin_g + k) * cout_g * window..][..cout_g * window];
        let to = &mut panel[k * nt * width..][..nt * width];
        for (lane, &tap) in to.chunks_exact_mut(width).zip(taps) {
            let (real, pad) = lane.split_at_mut(rows);
            real.copy_from_slice(&from[tap * cout_g + channels.start..][..rows]);
            pad.fill(0.0);
        }
    }
}

/// The weight `[C_in, C_out/g, R, S]` with each input channel's block
/// transposed to `[R·S, C_out/g]` (SIMD tiles): every window tap's output
/// channels one contiguous run, which each phase's panels then copy whole.
/// Built once per call for all the phases (and for the GEMM's packed
/// panels); packing each phase from the weight itself, a tap at a time at a
/// stride of `R·S` floats (or transposing all taps per phase), took
/// r50_3x3_s2's grad input about 300 µs of 1.4 ms. A single phase's dense
/// panels skip it (see [`pack_phase_panel`]).
pub(crate) fn weights_by_tap(
    tg: &TransposedGeometry,
    weight: &[f32],
) -> Result<Scratch, ConvError> {
    let window = tg.h.kernel * tg.w.kernel;
    let block = tg.out_per_group() * window;
    let mut by_tap = Scratch::any("transposed convolution weights by tap", weight.len())?;
    for (from, to) in weight
        .chunks_exact(block)
        .zip(by_tap.chunks_exact_mut(block))
    {
        crate::gemm::transpose::transpose(
            from,
            window,
            tg.out_per_group(),
            window,
            to,
            tg.out_per_group(),
        );
    }
    Ok(by_tap)
}

/// One panel of a phase's weights, packed from `source`: for the output
/// channels `channels` of group `grp` (at most `width`), the value that
/// input channel `k` gives sub-kernel tap `t` of output channel
/// `channels.start + lane` at `(k·T + t)·width + lane`, lanes past the
/// channels zero. The layout of a GEMM A panel of `width` rows and of a
/// dense-tile block alike.
///
/// From [`weights_by_tap`], each tap is one contiguous copy. From the
/// weight itself, each input channel's rows for `channels` (one contiguous
/// `rows × R·S` run of the weight) are transposed into an L1-sized staging
/// `[R·S][width]` (zero past `rows`), whose tap rows are copied in the
/// sub-kernel's order: one pass over the weights instead of two, for a
/// single phase (stride 1), which reads every tap; phases of a larger
/// stride share one [`weights_by_tap`] instead of each transposing every
/// tap. r50_deep's grad input on the dense tile (1 thread AVX-512, Zen 5,
/// medians of ~300 calls in one run, binaries alternating): weights ready
/// in 215–226 → 164–178 µs, of a 1.0–1.2 ms call. A pointwise kernel's
/// rows are copied whole (a `rows × 1` transpose a row moved one float at a
/// time: r50_last1x1's grad input on the dense tile ran at 74–81 GFLOP/s,
/// copied 130–161).
fn pack_phase_panel(
    tg: &TransposedGeometry,
    taps: &[usize],
    source: PanelSource<'_>,
    grp: usize,
    channels: std::ops::Range<usize>,
    width: usize,
    panel: &mut [f32],
) {
    let (cin_g, cout_g) = (tg.in_per_group(), tg.out_per_group());
    let window = tg.h.kernel * tg.w.kernel;
    let (nt, rows) = (taps.len(), channels.len());
    let weight = match source {
        PanelSource::ByTap(by_tap) => {
            copy_by_tap(tg, taps, by_tap, grp, channels, width, 0..cin_g, panel);
            return;
        }
        PanelSource::Weight(weight) => weight,
    };
    if window == 1 {
        // A pointwise kernel's rows are the panel's rows already.
        for (k, lane) in panel.chunks_exact_mut(width).take(cin_g).enumerate() {
            let (real, pad) = lane.split_at_mut(rows);
            real.copy_from_slice(&weight[(grp * cin_g + k) * cout_g + channels.start..][..rows]);
            pad.fill(0.0);
        }
        return;
    }
    let mut stage = vec![0.0f32; window * width];
    let run_len = rows * window;
    for k in 0..cin_g {
        let first = ((grp * cin_g + k) * cout_g + channels.start) * window;
        let ahead = weight
            .as_ptr()
            .wrapping_add(first + PREFETCH_CHANNELS_AHEAD * cout_g * window);
        for line in (0..run_len + 15).step_by(16) {
            prefetch_read(ahead.wrapping_add(line));
        }
        let from = &weight[first..][..run_len];
        crate::gemm::transpose::transpose(from, window, rows, window, &mut stage, width);
        let to = &mut panel[k * nt * width..][..nt * width];
        for (lane, &tap) in to.chunks_exact_mut(width).zip(taps) {
            lane.copy_from_slice(&stage[tap * width..][..width]);
        }
    }
}

/// Input channels ahead whose run of the weight [`pack_phase_panel`] asks
/// for while it transposes the current one: the runs lie `C_out/g·R·S`
/// floats apart (9 KB for 256 channels at 3×3), too far for the hardware's
/// stride prefetcher, and a large layer's weights come from L3. Zen 3
/// AVX2, grad input on the dense tile, one process, without and with
/// alternating call by call, best / median GFLOP/s: r50_deep 83.6 → 85.1 /
/// 79.7 → 81.7 (again 82.1 → 84.3 / 67.5 → 70.1; 2 threads 145 → 153 /
/// 106 → 110), 512 → 512 on 14² 80.2 → 82.7 / 75.8 → 80.4; r50_3x3,
/// batch16 and 128 → 128 on 28² (weights ≤ 600 KB) within 0.5%. Eight
/// ahead measured the same as four.
const PREFETCH_CHANNELS_AHEAD: usize = 4;

/// Where a phase's panels are packed from (see [`pack_phase_panel`]).
#[derive(Clone, Copy)]
enum PanelSource<'a> {
    /// The weight itself.
    Weight(&'a [f32]),
    /// [`weights_by_tap`].
    ByTap(&'a [f32]),
}

/// Where a call's dense panels come from: [`weights_by_tap`] where the
/// call built it (several phases), the weight itself otherwise.
fn panel_source<'a>(by_tap: Option<&'a [f32]>, weight: &'a [f32]) -> PanelSource<'a> {
    by_tap.map_or(PanelSource::Weight(weight), PanelSource::ByTap)
}

/// The phase's weights for the dense tile (see
/// `DensePrepared::with_weights`), each block packed from `source`.
fn dense_filler<'a>(
    tg: &'a TransposedGeometry,
    phase: &Phase,
    source: PanelSource<'a>,
) -> impl Fn(usize, std::ops::Range<usize>, usize, &mut [f32]) + Sync + 'a {
    let taps = tap_offsets(tg, phase);
    move |grp, channels, block, panel| {
        pack_phase_panel(tg, &taps, source, grp, channels, block, panel)
    }
}

/// `r·S + s` of the weight tap behind each tap of the phase's sub-kernel,
/// in the sub-kernel's row-major order.
fn tap_offsets(tg: &TransposedGeometry, phase: &Phase) -> Vec<usize> {
    phase
        .rows
        .taps
        .iter()
        .flat_map(|&u| {
            phase.cols.taps.iter().map(move |&v| {
                let (r, s) = tg.weight_tap(u, v);
                r * tg.w.kernel + s
            })
        })
        .collect()
}

/// Input channels per block of [`gather_weights`].
const GATHER_BLOCK: usize = 16;

/// Stores one image of the row phase `group` (its column phases, in
/// order): output row `φ_h + σ_h·q` takes column `φ_w + σ_w·j` from column
/// phase `φ_w`'s convolution output (laid out one after another in
/// `scratch`, as [`run_phases`] leaves them), or `value(c)` where no tap
/// reaches that phase. Each output row is written once, front to back: at
/// stride 2 the two phases' rows are interleaved in one pass. Storing each
/// phase on its own, with every other float skipped, took 7–18% of a call;
/// interleaving took the transposed suite's plans (1 thread AVX-512, one
/// process) from 199 to 210 GFLOP/s on unet_up_k2s2 and from 136 to 153 on
/// fcn_up_k3s2, the others within noise.
fn store_row_phase(
    tg: &TransposedGeometry,
    group: &[Phase],
    scratch: &[f32],
    value: &impl Fn(usize) -> f32,
    image: &mut [f32],
    c0: usize,
) {
    let (oh, ow) = (tg.h.output, tg.w.output);
    let rows = &group[0].rows;
    // Each column phase's plane, if it has one.
    let mut offset = 0;
    let planes: Vec<Option<&[f32]>> = group
        .iter()
        .map(|p| {
            let len = p.scratch_len();
            let plane = (len > 0).then(|| &scratch[offset..offset + len]);
            offset += len;
            plane
        })
        .collect();
    for (c, out_plane) in (c0..).zip(image.chunks_exact_mut(oh * ow)) {
        let fill = value(c);
        // The row of column phase `i` for output row `q` of this row phase.
        let src = |i: usize, q: usize| -> Option<&[f32]> {
            let (p, plane) = (&group[i], planes[i]?);
            let cols = &p.cols;
            let plane_len = rows.conv_len * cols.conv_len;
            Some(&plane[c * plane_len + (rows.skip + q) * cols.conv_len + cols.skip..][..cols.len])
        };
        for q in 0..rows.len {
            let dst = &mut out_plane[(rows.phase + q * tg.h.stride) * ow..][..ow];
            match (tg.w.stride, group.len()) {
                (1, 1) => match src(0, q) {
                    Some(row) => dst.copy_from_slice(row),
                    None => dst.fill(fill),
                },
                (2, 2) if planes[0].is_some() && planes[1].is_some() => {
                    let (even, odd) = (src(0, q).unwrap_or(&[]), src(1, q).unwrap_or(&[]));
                    let mut pairs = dst.chunks_exact_mut(2);
                    for ((pair, &e), &o) in (&mut pairs).zip(even).zip(odd) {
                        pair[0] = e;
                        pair[1] = o;
                    }
                    if let [last] = pairs.into_remainder() {
                        *last = even[even.len() - 1];
                    }
                }
                (sw, _) => {
                    for (i, p) in group.iter().enumerate() {
                        let lane = dst[p.cols.phase..].iter_mut().step_by(sw);
                        match src(i, q) {
                            Some(row) => lane.zip(row).for_each(|(x, &v)| *x = v),
                            None => lane.for_each(|x| *x = fill),
                        }
                    }
                }
            }
        }
    }
}

/// [`store_row_phase`] on up to `threads` threads, the output channels
/// (from `c0`) split in halves with `rayon::join`.
fn store_split(
    tg: &TransposedGeometry,
    group: &[Phase],
    scratch: &[f32],
    value: &(impl Fn(usize) -> f32 + Sync),
    image: &mut [f32],
    c0: usize,
    threads: usize,
) {
    let out_plane = tg.h.output * tg.w.output;
    let channels = image.len() / out_plane;
    if threads <= 1 || channels < 2 {
        return store_row_phase(tg, group, scratch, value, image, c0);
    }
    let half = channels / 2;
    let (a, b) = image.split_at_mut(half * out_plane);
    rayon::join(
        || store_split(tg, group, scratch, value, a, c0, threads / 2),
        || {
            store_split(
                tg,
                group,
                scratch,
                value,
                b,
                c0 + half,
                threads - threads / 2,
            )
        },
    );
}

/// The loop every transposed call runs, with `run(i, x, y, parallelism)`
/// computing phase `i`'s convolution of `x` into `y`: a single in-place
/// phase straight into the output; otherwise row phase by row phase and
/// image by image, the column phases into `scratch` (sized by
/// [`scratch_len`]), then stored by [`store_row_phase`]. With more than one
/// thread, column phases of equal work run side by side, the threads shared
/// out among them (a phase then needs no synchronisation inside its GEMM;
/// unet_up_k2s2 at 2 threads: 339 → 416 GFLOP/s), and the store splits the
/// channels. `value(c)` is what an output no tap reaches
/// holds.
#[allow(clippy::too_many_arguments)]
fn run_phases(
    tg: &TransposedGeometry,
    phases: &[Phase],
    input: &[f32],
    output: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
    value: impl Fn(usize) -> f32 + Sync,
    run: impl Fn(usize, &[f32], &mut [f32], Parallelism) -> Result<(), ConvError> + Sync,
) -> Result<(), ConvError> {
    if let [phase] = phases {
        if phase.in_place && phase.conv.is_some() {
            return run(0, input, output, Parallelism::threads(threads));
        }
    }
    let image_in = tg.in_channels * tg.h.input * tg.w.input;
    let image_out = tg.out_channels * tg.h.output * tg.w.output;
    let per_group = column_phases(tg);
    for (first, group) in (0..).step_by(per_group).zip(phases.chunks(per_group)) {
        for (x, y) in input
            .chunks_exact(image_in)
            .zip(output.chunks_exact_mut(image_out))
        {
            // Each phase's slice of the scratch.
            let mut jobs = Vec::with_capacity(group.len());
            let mut rest = &mut scratch[..];
            for (i, phase) in group.iter().enumerate() {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(phase.scratch_len());
                rest = tail;
                if !mine.is_empty() {
                    jobs.push((first + i, mine));
                }
            }
            // Side by side only when the phases are equal work (as many
            // taps each): unequal ones, run side by side, left a thread idle
            // (fcn_up_k3s2 at 2 threads: 244 → 199 GFLOP/s).
            let taps = |i: usize| phases[i].rows.taps.len() * phases[i].cols.taps.len();
            let balanced = jobs.iter().all(|(i, _)| taps(*i) == taps(jobs[0].0));
            if threads > 1 && jobs.len() > 1 && balanced {
                let each = Parallelism::threads((threads / jobs.len()).max(1));
                jobs.into_par_iter()
                    .with_max_len(1)
                    .try_for_each(|(i, y)| run(i, x, y, each))?;
            } else {
                for (i, y) in jobs {
                    run(i, x, y, Parallelism::threads(threads))?;
                }
            }
            store_split(tg, group, scratch, &value, y, 0, threads);
        }
    }
    Ok(())
}

/// Runs `tg` on `input` into `output` (every element written) with the
/// phases' convolutions run as `options` say (algorithm, threads, ISA,
/// backend; bias and activation fused into each phase's store). Lengths are
/// checked by the caller.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the gathered weights or the scratch
/// planes cannot be allocated (before anything is written), or what a
/// phase's convolution returns.
pub(crate) fn transposed_forward(
    tg: &TransposedGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    options: &ForwardOptions,
) -> Result<(), ConvError> {
    options.activation.validate()?;
    let phases = phases(tg)?;
    let isa = options.resolved_isa();
    // Each phase's algorithm, where its weights go in `gathered`, and, for
    // the GEMM lowerings on the native engine, the kernel they are packed for.
    let mut runs = Vec::with_capacity(phases.len());
    let mut weights_len = 0;
    // One pass over the weights for every phase's check, one transpose for
    // every phase's packing.
    let finite = std::cell::OnceCell::new();
    let mut by_tap = None;
    // A pointwise kernel's weight is its own `weights_by_tap` (each
    // `[C_out/g, 1]` block transposed is itself): transposing it anyway, a
    // float at a time, took r50_last1x1's grad input on the implicit GEMM
    // down to 50 GFLOP/s.
    let pointwise = tg.h.kernel * tg.w.kernel == 1;
    for phase in &phases {
        let Some(conv) = &phase.conv else {
            runs.push(None);
            continue;
        };
        let algorithm = conv.resolve_algorithm_with(options.algorithm, isa, || {
            *finite.get_or_init(|| super::all_finite_on(weight, options.parallelism.max_threads()))
        });
        let g = conv.geometry();
        let packed_mr = (matches!(algorithm, Algorithm::Im2col | Algorithm::Implicit)
            && options.backend == GemmBackend::Native)
            .then(|| {
                select_kernel(
                    Some(isa),
                    g.out_channels_per_group(),
                    g.out_plane(),
                    true,
                    options.blocking,
                )
                .mr
            });
        // A single phase's dense tile packs straight from `weight`.
        let dense_from_weight = algorithm == Algorithm::DirectDense && phases.len() == 1;
        let packs = algorithm == Algorithm::DirectDense || packed_mr.is_some();
        if packs && !dense_from_weight && !pointwise && by_tap.is_none() {
            by_tap = Some(weights_by_tap(tg, weight)?);
        }
        let dense = if algorithm == Algorithm::DirectDense {
            use super::direct_simd::DensePrepared;
            let fill = dense_filler(tg, phase, panel_source(by_tap.as_deref(), weight));
            let (act, threads) = (options.activation, options.parallelism.max_threads());
            // A phase through the scratch planes runs once per image: its
            // weights are packed once for all of them.
            if phase.in_place || tg.batch == 1 {
                DensePrepared::for_one_call(g, act, isa, threads, &fill)?
            } else {
                DensePrepared::with_weights(g, act, isa, threads, &fill)?
            }
        } else {
            None
        };
        let len = match (&dense, packed_mr) {
            (Some(_), _) => 0,
            (None, Some(mr)) => g.groups * packed_group_len(g, mr),
            (None, None) => g.weight_len(),
        };
        runs.push(Some((
            algorithm,
            packed_mr,
            weights_len..weights_len + len,
            dense,
        )));
        weights_len += len;
    }
    let by_tap = by_tap.as_deref().or(pointwise.then_some(weight));
    // Every float is written by the gather below (panels' padding lanes
    // included): zeroing 4 MB first cost r50_last1x1's grad input ~10%.
    let mut gathered = Scratch::any("transposed convolution phase weights", weights_len)?;
    let scratch_len = scratch_len(tg, &phases);
    let mut scratch = Scratch::zeroed("transposed convolution phase planes", scratch_len)?;
    let threads = options.parallelism.max_threads();
    for (phase, run) in phases.iter().zip(&runs) {
        if let Some((_, packed_mr, range, None)) = run {
            let dst = &mut gathered[range.clone()];
            match packed_mr {
                Some(mr) => gather_packed(tg, phase, by_tap.unwrap_or_default(), *mr, dst, threads),
                None => gather_weights(tg, phase, weight, dst),
            }
        }
    }
    let act = options.activation;
    let value = |c: usize| act.apply(bias.map_or(0.0, |b| b[c]));
    run_phases(
        tg,
        &phases,
        input,
        output,
        &mut scratch,
        threads,
        value,
        |i, x, y, parallelism| {
            let (Some(conv), Some((algorithm, packed_mr, range, dense))) =
                (&phases[i].conv, &runs[i])
            else {
                return Ok(());
            };
            if let Some(dense) = dense {
                let source = panel_source(by_tap, weight);
                let fill = dense_filler(tg, &phases[i], source);
                return dense.run_once(x, bias, y, parallelism, &fill);
            }
            let opts = ForwardOptions {
                algorithm: *algorithm,
                isa: Some(isa),
                parallelism,
                ..*options
            };
            let weights = &gathered[range.clone()];
            match *packed_mr {
                Some(mr) => {
                    let lowering = match algorithm {
                        Algorithm::Im2col => Lowering::Explicit,
                        _ => Lowering::Implicit,
                    };
                    let packed = Weights::Packed { data: weights, mr };
                    forward_gemm(conv.geometry(), x, packed, bias, y, &opts, lowering, None)
                }
                None => conv.forward_with(x, weights, bias, y, &opts),
            }
        },
    )
}

/// A transposed convolution's phases bound to their weights: each phase's
/// gathered weights live in a [`super::Conv2dPlan`].
#[derive(Clone, Debug)]
pub(crate) struct PlannedPhases {
    tg: TransposedGeometry,
    phases: Vec<Phase>,
    plans: Vec<Option<super::Conv2dPlan>>,
    bias: Option<Vec<f32>>,
    activation: Activation,
    scratch_len: usize,
    /// `options.parallelism.max_threads()` when planned.
    threads: usize,
}

impl PlannedPhases {
    pub(crate) fn new(
        tg: &TransposedGeometry,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
    ) -> Result<PlannedPhases, ConvError> {
        options.activation.validate()?;
        // The phases' plans are not measured: a transposed plan ignores
        // the effort (the phases run together, not as the layers they are).
        let options = &ForwardOptions {
            effort: super::PlanEffort::Estimate,
            ..*options
        };
        let phases = phases(tg)?;
        let scratch_len = scratch_len(tg, &phases);
        let mut gathered = Vec::new();
        let mut plans = Vec::with_capacity(phases.len());
        for phase in &phases {
            plans.push(match &phase.conv {
                Some(conv) => {
                    let len = tg.in_channels
                        * tg.out_per_group()
                        * phase.rows.taps.len()
                        * phase.cols.taps.len();
                    gathered.resize(len, 0.0);
                    gather_weights(tg, phase, weight, &mut gathered);
                    Some(conv.plan(&gathered, bias, options)?)
                }
                None => None,
            });
        }
        let bias = match bias {
            Some(b) => {
                let mut v = try_with_capacity("bias", b.len())?;
                v.extend_from_slice(b);
                Some(v)
            }
            None => None,
        };
        Ok(PlannedPhases {
            tg: *tg,
            phases,
            plans,
            bias,
            activation: options.activation,
            scratch_len,
            threads: options.parallelism.max_threads(),
        })
    }

    /// The phases' algorithms, in phase order (`None` for a phase no tap
    /// reaches).
    pub(crate) fn algorithms(&self) -> impl Iterator<Item = Option<super::Algorithm>> + '_ {
        self.plans.iter().map(|p| p.as_ref().map(|p| p.algorithm()))
    }

    pub(crate) fn forward(&self, input: &[f32], output: &mut [f32]) -> Result<(), ConvError> {
        let mut scratch = Scratch::zeroed("transposed convolution phase planes", self.scratch_len)?;
        let (act, bias) = (self.activation, self.bias.as_deref());
        let value = |c: usize| act.apply(bias.map_or(0.0, |b| b[c]));
        run_phases(
            &self.tg,
            &self.phases,
            input,
            output,
            &mut scratch,
            self.threads,
            value,
            // The plans carry their own parallelism; side by side, each
            // uses what the rayon pool has free.
            |i, x, y, _| match &self.plans[i] {
                Some(plan) => plan.forward(x, y),
                None => Ok(()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every phase output, every tap: the phase's convolution reads exactly
    /// the inputs the definition pairs with it.
    #[test]
    fn axis_phases_pair_the_same_terms_as_the_definition() {
        for input in 1..6 {
            for kernel in 1..5 {
                for stride in 1..4 {
                    for dilation in 1..4 {
                        for offset in -3isize..6 {
                            for output in 1..12 {
                                let axis = TransposedAxis {
                                    input,
                                    output,
                                    kernel,
                                    stride,
                                    dilation,
                                    offset,
                                };
                                check_axis(&axis);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The phases against the definition on small 2-D shapes whose axes
    /// cover every case of `phase` (taps or none, skipped outputs, padding
    /// after, outputs the input never reaches), with bias and an
    /// activation, run on the default forward path and through a plan.
    #[test]
    fn transposed_forward_matches_the_definition() {
        use super::super::direct::transposed_direct;
        use super::super::Algorithm;
        let axes = [
            // input, output, kernel, stride, dilation, offset
            (3, 5, 3, 1, 1, 1),
            (3, 4, 1, 1, 1, 2),
            (2, 7, 3, 2, 1, 0),
            (3, 6, 4, 2, 1, 1),
            (2, 9, 2, 3, 2, -1),
            (4, 3, 2, 2, 3, 4),
            (3, 8, 3, 2, 2, 1),
        ];
        let axis = |(input, output, kernel, stride, dilation, offset)| TransposedAxis {
            input,
            output,
            kernel,
            stride,
            dilation,
            offset,
        };
        let mut seed = 1u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &h in &axes {
            for &w in &axes {
                for (groups, cin_g, cout_g) in [(1, 2, 3), (2, 1, 2)] {
                    for mode in [ConvMode::CrossCorrelation, ConvMode::Convolution] {
                        let tg = TransposedGeometry {
                            batch: 2,
                            in_channels: groups * cin_g,
                            out_channels: groups * cout_g,
                            groups,
                            h: axis(h),
                            w: axis(w),
                            mode,
                        };
                        let x: Vec<f32> = (0..tg.input_len()).map(|_| next()).collect();
                        let wt: Vec<f32> = (0..tg.weight_len()).map(|_| next()).collect();
                        let b: Vec<f32> = (0..tg.out_channels).map(|_| next()).collect();
                        let act = Activation::Clamp {
                            min: -0.3,
                            max: 0.4,
                        };
                        let mut want = vec![0.0; tg.output_len()];
                        transposed_direct(&tg, &x, &wt, Some(&b), act, &mut want);
                        for algorithm in [Algorithm::Implicit, Algorithm::DirectSimd] {
                            let options = ForwardOptions::new(algorithm).activation(act);
                            let mut got = vec![f32::NAN; tg.output_len()];
                            transposed_forward(&tg, &x, &wt, Some(&b), &mut got, &options).unwrap();
                            let planned = PlannedPhases::new(&tg, &wt, Some(&b), &options).unwrap();
                            let mut from_plan = vec![f32::NAN; tg.output_len()];
                            planned.forward(&x, &mut from_plan).unwrap();
                            for (i, ((&a, &p), &e)) in
                                got.iter().zip(&from_plan).zip(&want).enumerate()
                            {
                                // At most T = 2·4·4 terms, each below 1/4: both
                                // sides lie within (T + 1)·ε·8 ≈ 3.2e-5 of
                                // the exact sum.
                                let tol = 2.0 * 33.0 * 8.0 * f32::EPSILON;
                                assert!(
                                    (a - e).abs() <= tol,
                                    "{tg:?} {algorithm:?} [{i}] {a} vs {e}"
                                );
                                assert!(
                                    (p - e).abs() <= tol,
                                    "{tg:?} {algorithm:?} plan [{i}] {p} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The packed phase weights do not depend on how many input channels
    /// a block of the gather holds, nor on the threads: every block size
    /// from one channel up, 1 and 3 threads, against one block of all.
    #[test]
    fn gathered_panels_do_not_depend_on_the_blocking() {
        let axis = |kernel, stride| TransposedAxis {
            input: 4,
            output: 4 * stride,
            kernel,
            stride,
            dilation: 1,
            offset: 0,
        };
        for (groups, cin_g, cout_g, kernel, stride) in [(1, 5, 19, 1, 1), (2, 7, 9, 3, 2)] {
            let tg = TransposedGeometry {
                batch: 1,
                in_channels: groups * cin_g,
                out_channels: groups * cout_g,
                groups,
                h: axis(kernel, stride),
                w: axis(kernel, 1),
                mode: ConvMode::CrossCorrelation,
            };
            let weight: Vec<f32> = (0..tg.weight_len()).map(|i| i as f32 + 1.0).collect();
            let by_tap = weights_by_tap(&tg, &weight).unwrap();
            for phase in phases(&tg).unwrap().iter().filter(|p| p.conv.is_some()) {
                let mr = 8;
                let len = groups * cout_g.div_ceil(mr) * cin_g * tap_offsets(&tg, phase).len() * mr;
                let mut want = vec![f32::NAN; len];
                gather_packed_in_blocks(&tg, phase, &by_tap, mr, &mut want, 1, cin_g);
                assert!(want.iter().all(|x| x.is_finite()), "every float written");
                for block in 1..cin_g {
                    for threads in [1, 3] {
                        let mut got = vec![f32::NAN; len];
                        gather_packed_in_blocks(&tg, phase, &by_tap, mr, &mut got, threads, block);
                        assert_eq!(got, want, "{tg:?} block {block}, {threads} threads");
                    }
                }
            }
        }
    }

    fn check_axis(axis: &TransposedAxis) {
        // (output, input, tap) triples of the definition.
        let mut want = Vec::new();
        for i in 0..axis.input {
            for u in 0..axis.kernel {
                let o = (i * axis.stride + u * axis.dilation) as isize - axis.offset;
                if (0..axis.output as isize).contains(&o) {
                    want.push((o as usize, i, u));
                }
            }
        }
        let mut got = Vec::new();
        for phase in 0..axis.stride.min(axis.output) {
            let p = axis.phase(phase);
            if p.taps.is_empty() || p.len == 0 {
                continue;
            }
            assert!(p.conv_len >= p.skip + p.len, "{axis:?} {p:?}");
            let padded = axis.input + p.pad_before + p.pad_after;
            assert_eq!(
                p.conv_len,
                padded - p.dilation * (p.taps.len() - 1),
                "{axis:?}"
            );
            for q in 0..p.len {
                let j = p.skip + q;
                for (t, &u) in p.taps.iter().enumerate() {
                    let i = (j + t * p.dilation) as isize - p.pad_before as isize;
                    if (0..axis.input as isize).contains(&i) {
                        got.push((p.phase + q * axis.stride, i as usize, u));
                    }
                }
            }
        }
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "{axis:?}");
    }
}
