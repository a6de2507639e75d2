//! SIMD direct convolution for depthwise and small-group convolutions.
//!
//! When a group has only a few input and output channels (depthwise: one of
//! each; ResNeXt: 4 or so), lowering onto a GEMM leaves the GEMM with a tiny
//! M and K per group, and the packing dominates. This path computes the
//! definition directly instead, vectorised along the output width with `L`
//! lanes (16 for AVX-512, 8 for AVX2 and the portable `wide::f32x8` path):
//!
//! * The general register tile is `KB` output channels (1 to 4, all in one
//!   group) × `RB` output rows × one vector of `L` consecutive outputs. For
//!   each input channel of the group and each kernel tap it loads one input
//!   vector per row and broadcasts one weight per channel, so every load
//!   feeds `KB` FMAs and every broadcast `RB`.
//! * Single-channel 3×3 jobs with vertical dilation 1, stride 1 or 2 and
//!   horizontal stride 1 or 2 (depthwise MobileNet layers) take a tile that
//!   keeps all nine weights in registers and loads each input row of the
//!   block once per kernel column, feeding every output row whose window
//!   covers it (about 3 FMAs per load instead of 1).
//! * An output row is split, per kernel column, with [`valid_range`] into
//!   the vectors whose every lane reads inside the input row (the *interior*:
//!   plain loads, no checks) and the *edge* vectors at the left and right
//!   padding and at the end of the row, which load and accumulate only their
//!   in-bounds lanes (AVX-512 masked loads and merge-masked FMAs; AVX2
//!   `maskload` and a blend; lane-wise selects in the portable path). Tile
//!   rows whose window leaves the input vertically skip those kernel rows.
//!   Padding taps are therefore skipped exactly as the reference skips them,
//!   never multiplied by zero (an infinite weight meets only real input).
//! * Horizontal stride 1 loads contiguous vectors; stride 2 loads two and
//!   keeps the even lanes with a permute; larger strides gather.
//! * The bias is added after the taps and the activation applied with
//!   `max(lo, v)` then `min(hi, v)`, so NaN passes through as in
//!   `clamp_keep_nan`.
//!
//! Work is split over `(image, chunk of up to 4 output channels)` units, in
//! output order, so a thread's contiguous range of units writes a contiguous
//! slice of the output.
//!
//! Each ISA's operations implement [`Simd`] on a zero-sized token; the
//! generic tile code is `#[inline(always)]` all the way down into one
//! `#[target_feature]` function per tile shape ([`Simd::general`],
//! [`Simd::three`]), so the intrinsics inline there.
//!
//! This file holds the dispatch (entry point, units, threads, the kernel of
//! each ISA); `simd.rs` the [`Simd`] trait and the steps both tiles share;
//! `general.rs` and `three.rs` the two register tiles; `avx512.rs`,
//! `avx2.rs` and `portable.rs` each ISA's operations and tile heights.

use super::im2col::valid_range;
use crate::gemm::kernels::{clamp_isa, record_call, Isa};
use crate::gemm::{Activation, Parallelism};
use crate::geometry::ConvGeometry;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod general;
mod portable;
mod simd;
mod three;

use general::run_general;
use simd::Simd;
use three::run_three;

/// Most output channels one register tile covers.
const MAX_KB: usize = 4;

/// Below this many FLOPs per thread, a fork-join costs more than it saves.
const MIN_FLOPS_PER_THREAD: u64 = 1 << 20;

/// `output = act(conv(input, weight) + bias)`, exactly what
/// [`conv2d_direct`](super::direct::conv2d_direct) computes (up to the order
/// of the additions), for any geometry; fast for depthwise and small-group
/// convolutions. Slices must have the lengths `g` requires (checked by the
/// caller). `isa` is clamped to the CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_grouped_direct(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    activation: Activation,
    isa: Isa,
    par: Parallelism,
) {
    let isa = clamp_isa(isa);
    record_call(isa);
    if !offsets_fit(g) {
        // Padding or strides near `usize::MAX`: the kernels' signed offset
        // arithmetic could overflow, so take the reference loops instead.
        super::direct::conv2d_direct(g, input, weight, bias, output, activation);
        return;
    }
    let kernel = Kernel::for_isa(isa);
    forward_with(g, input, weight, bias, output, activation, kernel, par);
}

/// [`forward_grouped_direct`] on a chosen kernel, once the geometry is known
/// to suit the kernels.
#[allow(clippy::too_many_arguments)]
fn forward_with(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    activation: Activation,
    kernel: Kernel,
    par: Parallelism,
) {
    let geo = Geo::new(g, activation);
    let plan = ColPlan::new(&geo, kernel.lanes);
    let units = units(g);
    let threads = thread_count(g, units.len(), par);
    let shared = Shared {
        geo: &geo,
        plan: &plan,
        input,
        weight,
        bias,
        kernel,
    };
    if threads <= 1 {
        run_units(&shared, &units, output);
        return;
    }
    // Contiguous ranges of units write contiguous ranges of the output.
    let mut tasks = Vec::with_capacity(threads);
    let mut rest = output;
    let mut done = 0;
    for t in 0..threads {
        let hi = units.len() * (t + 1) / threads;
        let (lo, span) = (done, &units[done..hi]);
        let len: usize = span.iter().map(|u| u.kb * geo.out_plane).sum();
        let (mine, tail) = rest.split_at_mut(len);
        rest = tail;
        tasks.push((&units[lo..hi], mine));
        done = hi;
    }
    tasks
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(span, out)| run_units(&shared, span, out));
}

/// Whether every offset the kernels form fits comfortably in `isize`: a
/// padded input plane (rows times row length), and a padded row plus a
/// vector's span of strided or dilated columns. Always true for geometry
/// whose padding is not absurd.
fn offsets_fit(g: &ConvGeometry) -> bool {
    let limit = (isize::MAX / 8) as usize;
    let padded = |n: usize, a: usize, b: usize| n.checked_add(a)?.checked_add(b);
    let rows = padded(g.in_h, g.padding.top, g.padding.bottom)
        .and_then(|h| h.checked_add(g.stride_h.checked_mul(16)?))
        .and_then(|h| h.checked_add(g.dilation_h.checked_mul(g.kernel_h)?))
        .and_then(|h| h.checked_mul(g.in_w.max(1)));
    let cols = padded(g.in_w, g.padding.left, g.padding.right)
        .and_then(|w| w.checked_add(g.stride_w.checked_mul(64)?))
        .and_then(|w| w.checked_add(g.dilation_w.checked_mul(g.kernel_w)?));
    rows.is_some_and(|v| v <= limit) && cols.is_some_and(|v| v <= limit)
}

/// Threads for a call: no more than `par` allows, than there are units, or
/// than the work pays for.
fn thread_count(g: &ConvGeometry, units: usize, par: Parallelism) -> usize {
    let max = par.max_threads();
    if max <= 1 {
        return 1;
    }
    let by_work = usize::try_from(g.flops() / MIN_FLOPS_PER_THREAD).unwrap_or(usize::MAX);
    max.min(units).min(by_work).max(1)
}

/// One unit of work: output channels `k0..k0 + kb` (inside one group) of image `n`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    n: usize,
    k0: usize,
    kb: usize,
}

/// Every unit, in output order: image, then channel.
fn units(g: &ConvGeometry) -> Vec<Unit> {
    let kg = g.out_channels_per_group();
    let mut units = Vec::new();
    for n in 0..g.batch {
        for group in 0..g.groups {
            let mut k = group * kg;
            let end = k + kg;
            while k < end {
                let kb = (end - k).min(MAX_KB);
                units.push(Unit { n, k0: k, kb });
                k += kb;
            }
        }
    }
    units
}

/// What every unit of a call shares.
struct Shared<'a> {
    geo: &'a Geo,
    plan: &'a ColPlan,
    input: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    kernel: Kernel,
}

/// Runs `units` in order into `out`, which starts at the first unit's planes.
fn run_units(sh: &Shared<'_>, units: &[Unit], out: &mut [f32]) {
    let geo = sh.geo;
    let taps = geo.cg * geo.r_len * geo.s_len;
    let group_in = geo.cg * geo.in_plane;
    let mut scratch = vec![0.0f32; taps * MAX_KB];
    let mut rest = out;
    for u in units {
        let (mine, tail) = rest.split_at_mut(u.kb * geo.out_plane);
        rest = tail;
        let group = u.k0 / geo.kg;
        let image_group = (u.n * geo.groups + group) * group_in;
        let mut bias = [0.0f32; MAX_KB];
        if let Some(b) = sh.bias {
            bias[..u.kb].copy_from_slice(&b[u.k0..u.k0 + u.kb]);
        }
        // Weights of the unit in the order the tile reads them: for each
        // input channel and input offset (r, s), the `kb` weights that meet it.
        let wt = &mut scratch[..taps * u.kb];
        let raw = &sh.weight[u.k0 * taps..(u.k0 + u.kb) * taps];
        for c in 0..geo.cg {
            for r in 0..geo.r_len {
                for s in 0..geo.s_len {
                    let (wr, ws) = geo.weight_tap(r, s);
                    let dst = ((c * geo.r_len + r) * geo.s_len + s) * u.kb;
                    for kk in 0..u.kb {
                        wt[dst + kk] = raw[kk * taps + (c * geo.r_len + wr) * geo.s_len + ws];
                    }
                }
            }
        }
        let job = Job {
            geo,
            plan: sh.plan,
            input: &sh.input[image_group..image_group + group_in],
            weights: wt,
            bias: sh.bias.map(|_| bias),
            kb: u.kb,
        };
        sh.kernel.run(&job, mine);
    }
}

/// The geometry as the kernels use it.
struct Geo {
    cg: usize,
    kg: usize,
    groups: usize,
    r_len: usize,
    s_len: usize,
    in_h: usize,
    in_w: usize,
    in_plane: usize,
    out_h: usize,
    out_w: usize,
    out_plane: usize,
    stride_h: usize,
    stride_w: usize,
    dil_h: usize,
    dil_w: usize,
    pad_top: usize,
    pad_left: usize,
    flipped: bool,
    clamp: Option<(f32, f32)>,
}

impl Geo {
    fn new(g: &ConvGeometry, activation: Activation) -> Geo {
        Geo {
            cg: g.channels_per_group(),
            kg: g.out_channels_per_group(),
            groups: g.groups,
            r_len: g.kernel_h,
            s_len: g.kernel_w,
            in_h: g.in_h,
            in_w: g.in_w,
            in_plane: g.in_plane(),
            out_h: g.out_h,
            out_w: g.out_w,
            out_plane: g.out_plane(),
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            dil_h: g.dilation_h,
            dil_w: g.dilation_w,
            pad_top: g.padding.top,
            pad_left: g.padding.left,
            flipped: g.mode == crate::geometry::ConvMode::Convolution,
            clamp: activation.bounds(),
        }
    }

    /// As [`ConvGeometry::weight_tap`].
    fn weight_tap(&self, r: usize, s: usize) -> (usize, usize) {
        if self.flipped {
            (self.r_len - 1 - r, self.s_len - 1 - s)
        } else {
            (r, s)
        }
    }
}

/// One vector of outputs along a row.
#[derive(Clone, Copy, Debug)]
struct ColVec {
    /// First output column.
    ow0: usize,
    /// Outputs in the vector (`L`, or fewer at the end of a row).
    lanes: usize,
    /// Every lane reads inside the input row for every kernel column.
    interior: bool,
}

/// How every output row splits into vectors, and for each vector and kernel
/// column the lanes that read inside the input row. The same for every row,
/// channel and image.
struct ColPlan {
    vecs: Vec<ColVec>,
    /// `ranges[v·S + s]`: lanes `lo..hi` of vector `v` whose input column
    /// `(ow0 + j)·stride + s·dilation − pad_left` is in `0..in_w`.
    ranges: Vec<(usize, usize)>,
}

impl ColPlan {
    fn new(geo: &Geo, lanes: usize) -> ColPlan {
        let count = geo.out_w.div_ceil(lanes);
        let mut vecs = Vec::with_capacity(count);
        let mut ranges = Vec::with_capacity(count * geo.s_len);
        for v in 0..count {
            let ow0 = v * lanes;
            let n = (geo.out_w - ow0).min(lanes);
            let mut interior = n == lanes;
            for s in 0..geo.s_len {
                let offset = (ow0 * geo.stride_w + s * geo.dil_w) as isize - geo.pad_left as isize;
                let range = valid_range(n, geo.stride_w, offset, geo.in_w);
                interior &= range == (0, lanes);
                ranges.push(range);
            }
            vecs.push(ColVec {
                ow0,
                lanes: n,
                interior,
            });
        }
        ColPlan { vecs, ranges }
    }
}

/// One unit, ready for a kernel.
struct Job<'a> {
    geo: &'a Geo,
    plan: &'a ColPlan,
    /// The group's `cg` input channels of one image.
    input: &'a [f32],
    /// `[cg][R][S][kb]`: the weight each output channel gives input offset
    /// `(r, s)` of channel `c` (the tap already mirrored for true convolution).
    weights: &'a [f32],
    bias: Option<[f32; MAX_KB]>,
    /// Output channels of the unit, `1..=MAX_KB`.
    kb: usize,
}

/// The kernel of one ISA.
#[derive(Clone, Copy)]
struct Kernel {
    lanes: usize,
    isa: Isa,
    /// Tests: run every job with this instead (a bounds-checking kernel).
    #[cfg(test)]
    test_run: Option<fn(&Job<'_>, &mut [f32])>,
}

impl Kernel {
    fn for_isa(isa: Isa) -> Kernel {
        let lanes = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::Avx512::LANES,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::Avx2::LANES,
            _ => portable::Portable::LANES,
        };
        Kernel {
            lanes,
            isa,
            #[cfg(test)]
            test_run: None,
        }
    }

    /// Runs `job` into `out`, the unit's `kb` output planes.
    fn run(&self, job: &Job<'_>, out: &mut [f32]) {
        assert!(
            job.input.len() >= job.geo.cg * job.geo.in_plane
                && job.weights.len() >= job.geo.cg * job.geo.r_len * job.geo.s_len * job.kb
                && out.len() >= job.kb * job.geo.out_plane
                && (1..=MAX_KB).contains(&job.kb),
            "direct SIMD: job buffers do not match the geometry"
        );
        #[cfg(test)]
        if let Some(run) = self.test_run {
            run(job, out);
            return;
        }
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was clamped to what the CPU supports, so it has
            // AVX-512F and FMA; the buffers match the geometry (checked above).
            Isa::Avx512 => unsafe { avx512::run(job, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, with AVX2 and FMA.
            Isa::Avx2 => unsafe { avx2::run(job, out) },
            _ => portable::run(job, out),
        }
    }
}

/// Runs one job on ISA `S`: picks the register tile for the unit's channel
/// count and kernel, and the load for the horizontal stride. Each ISA passes
/// its tile heights: `R1..R4` rows for the general tile of 1 to 4 output
/// channels, `R3X3` for the 3×3 tile at vertical stride 1 (at most 16; the
/// stride-2 tile has 8 rows).
///
/// # Safety
/// The CPU supports `S`'s ISA; the buffers match the geometry as
/// [`Kernel::run`] checks; `out` holds the unit's `kb` output planes.
#[inline(always)]
unsafe fn run_job<
    S: Simd,
    const R1: usize,
    const R2: usize,
    const R3: usize,
    const R4: usize,
    const R3X3: usize,
>(
    job: &Job<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    macro_rules! general {
        ($kb:literal, $rb:ident) => {
            match geo.stride_w {
                // SAFETY: forwarded contract, and KB == job.kb.
                1 => unsafe { S::general::<$kb, $rb, 1>(job, out) },
                // SAFETY: as above.
                2 => unsafe { S::general::<$kb, $rb, 2>(job, out) },
                // SAFETY: as above.
                _ => unsafe { S::general::<$kb, $rb, 0>(job, out) },
            }
        };
    }
    macro_rules! three {
        ($rb:ident, $sh:literal) => {
            if geo.stride_w == 1 {
                // SAFETY: forwarded contract; a single-channel job with a
                // 3×3 kernel, vertical dilation 1, vertical stride SH and
                // horizontal stride SW (here 1).
                unsafe { S::three::<$rb, 1, $sh>(job, out) }
            } else {
                // SAFETY: as above, with horizontal stride 2.
                unsafe { S::three::<$rb, 2, $sh>(job, out) }
            }
        };
    }
    // Vertical stride 2 reads 2·RB + 1 input rows: 8 rows at most.
    const R3X3_S2: usize = 8;
    let three = job.kb == 1
        && (geo.r_len, geo.s_len, geo.dil_h) == (3, 3, 1)
        && (geo.stride_w == 1 || geo.stride_w == 2);
    match (job.kb, three, geo.stride_h) {
        (_, true, 1) => three!(R3X3, 1),
        (_, true, 2) => three!(R3X3_S2, 2),
        (1, ..) => general!(1, R1),
        (2, ..) => general!(2, R2),
        (3, ..) => general!(3, R3),
        _ => general!(4, R4),
    }
}

#[cfg(test)]
mod tests;
