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
//!   covers it (about 3 FMAs per load instead of 1); where the ISA has the
//!   registers (AVX-512; AVX2 for one vector at a time) and the job one
//!   input channel, a row sweep (`sweep.rs`) takes them instead: a strip of
//!   up to 4 vectors down the whole plane, a ring of accumulator rows.
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
//! * Depthwise layers on small planes or at a stride put **channels in
//!   lanes** instead (`lanes.rs`): a block of `L` channels is transposed so
//!   that each pixel's channels are one vector, and each output pixel is
//!   one FMA per tap, with no edge vectors and no strided loads.
//! * The bias is added after the taps and the activation applied with
//!   `max(lo, v)` then `min(hi, v)`, so NaN passes through as in
//!   `clamp_keep_nan`.
//!
//! Work is split over `(image, chunk of up to 4 output channels)` units, in
//! output order, so a thread's contiguous range of units writes a contiguous
//! slice of the output. Everything a call needs besides its tensors (the
//! weights gathered per chunk in the order the tiles read them, the column
//! plan, the kernel) is a [`Prepared`], built once by a plan; units are
//! index arithmetic and the threads split the output with `rayon::join`, so
//! running a `Prepared` allocates nothing, except that channels in lanes
//! take one workspace per thread (two transposed planes of a block) from the
//! thread's pool (`conv::scratch`): allocated once per thread, and when it
//! cannot be, that thread runs its blocks as the per-channel jobs.
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
use super::scratch::Scratch;
use super::try_with_capacity;
use crate::arch::{clamp_isa, Isa};
use crate::error::ConvError;
use crate::gemm::{Activation, Parallelism};
use crate::geometry::ConvGeometry;
use crate::testing::record_direct_simd_jobs;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod backward;
mod dense;
mod general;
mod lanes;
mod portable;
mod simd;
mod sweep;
mod three;

pub(crate) use backward::backward_weight;
pub(crate) use dense::{
    flattens as dense_flattens, one_row_fills_the_tile as dense_one_row_fills_the_tile,
    outgrows_gemm_tile as dense_outgrows_gemm_tile,
    repays_packing_per_call as dense_repays_packing_per_call, weight_filler as dense_weight_filler,
    DensePrepared,
};
use general::run_general;
use simd::Simd;
use three::run_three;

/// Most output channels one register tile covers.
const MAX_KB: usize = 4;

/// Below this many FLOPs per thread, a fork-join costs more than it saves.
/// These kernels run at 20–130 GFLOP/s, not a GEMM's 200+, so 2^17 FLOPs
/// is still a few microseconds per thread. Measured at 2 threads (Zen 5,
/// GFLOP/s, 2^20 → 2^17, the same build otherwise, alternating): depthwise
/// 96×28² forward 62–75 → 111–131 and weight gradient 43–53 → 79–97,
/// 128×14² 31–56 → 58–78 and 22–31 → 40–53, 576×14²/2 21–24 → 22–34 and
/// 17–22 → 23–33, 144×56²/2 25–27 → 42–47; layers of about 2^17 FLOPs
/// (64×14²) stay on one thread.
const MIN_FLOPS_PER_THREAD: u64 = 1 << 17;

/// `output = act(conv(input, weight) + bias)`, exactly what
/// [`conv2d_direct`](super::direct::conv2d_direct) computes (up to the order
/// of the additions), for any geometry; fast for depthwise and small-group
/// convolutions. Slices must have the lengths `g` requires (checked by the
/// caller). `isa` is clamped to the CPU. Prepares the convolution for this
/// one call; a plan keeps a [`Prepared`] instead.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    activation: Activation,
    isa: Isa,
    par: Parallelism,
) -> Result<(), ConvError> {
    match Prepared::new(g, weight, activation, isa)? {
        Some(prepared) => prepared.run(input, bias, output, par),
        None => super::direct::conv2d_direct(g, input, weight, bias, output, activation),
    }
    Ok(())
}

/// A convolution made ready for the SIMD kernels, once: the weights gathered
/// in the order the tiles read them, how every output row splits into
/// vectors, and the kernel of the ISA. Running it allocates nothing.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    geo: Geo,
    cols: ColPlan,
    /// Every chunk's weights (see [`gather_weights`]).
    weights: Vec<f32>,
    /// With channels in lanes ([`lanes::lanes_apply`]), every block's
    /// weights and the order of its output pixels; units are then blocks of
    /// `L` channels.
    lanes: Option<LanesPrepared>,
    kernel: Kernel,
    /// FLOPs of one call, which decide how many threads pay.
    flops: u64,
}

impl Prepared {
    /// Prepares `weight` (PyTorch layout) for the kernels of `isa` (clamped
    /// to the CPU), or `None` when padding or strides near `usize::MAX`
    /// could overflow the kernels' signed offset arithmetic: the reference
    /// loops must take such a geometry.
    pub(crate) fn new(
        g: &ConvGeometry,
        weight: &[f32],
        activation: Activation,
        isa: Isa,
    ) -> Result<Option<Prepared>, ConvError> {
        if !offsets_fit(g) {
            return Ok(None);
        }
        Prepared::with_kernel(g, weight, activation, Kernel::for_isa(isa)).map(Some)
    }

    /// [`Prepared::new`] on a chosen kernel, once the geometry is known to
    /// suit the kernels.
    fn with_kernel(
        g: &ConvGeometry,
        weight: &[f32],
        activation: Activation,
        kernel: Kernel,
    ) -> Result<Prepared, ConvError> {
        let geo = Geo::new(g, activation);
        // The sweep's own rows for channels in lanes were measured with 16
        // lanes; with 8 (AVX2, one vector a strip) channels in lanes keeps
        // its rows: 1 thread, GFLOP/s, lanes → sweep, 384×14² 49–51 →
        // 23–27, 144×56²/2 30 → 22–24.
        let rule = lanes::forward_rule(&geo, kernel.sweeps && kernel.lanes >= 16);
        let lanes = if lanes::lanes_apply(&geo, kernel.lanes, rule) && kernel.lanes_allowed() {
            let weights = lanes_weights(&geo, weight, kernel.lanes)?;
            let finite = super::all_finite(&weights);
            Some(LanesPrepared {
                plan: lanes::LanesPlan::new(&geo, kernel.lanes, finite)?,
                weights,
            })
        } else {
            None
        };
        Ok(Prepared {
            cols: ColPlan::new(&geo, kernel.lanes)?,
            weights: gather_weights(&geo, weight)?,
            lanes,
            geo,
            kernel,
            flops: g.flops(),
        })
    }

    /// `output = act(conv(input, weight) + bias)` with the prepared weights,
    /// on up to the threads `par` allows. Slices must have the lengths the
    /// geometry requires (checked by the caller; a wrong one panics).
    pub(crate) fn run(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        par: Parallelism,
    ) {
        let threads = thread_count(self.flops, self.units(), par);
        self.run_tasks(0..threads, threads, input, bias, output);
    }

    /// Units: per image, per group, per chunk of up to `MAX_KB` channels;
    /// with channels in lanes, per image, per block of `L` channels.
    fn units(&self) -> usize {
        self.geo.batch * self.chunks()
    }

    /// Chunks (or blocks) per image.
    fn chunks(&self) -> usize {
        if self.lanes.is_some() {
            (self.geo.groups * self.geo.kg).div_ceil(self.kernel.lanes)
        } else {
            self.geo.chunks()
        }
    }

    /// Unit `u`, in output order: image, then chunk (or block).
    fn unit(&self, u: usize) -> Unit {
        if self.lanes.is_none() {
            return self.chunk_unit(u);
        }
        let blocks = self.chunks();
        let k0 = u % blocks * self.kernel.lanes;
        Unit {
            n: u / blocks,
            k0,
            kb: self.kernel.lanes.min(self.geo.groups * self.geo.kg - k0),
        }
    }

    /// Chunk `u` of the batch in output order (image, then chunk), whether
    /// or not the units are blocks.
    fn chunk_unit(&self, u: usize) -> Unit {
        let chunks = self.geo.chunks();
        let (k0, kb) = self.geo.chunk(u % chunks);
        Unit {
            n: u / chunks,
            k0,
            kb,
        }
    }

    /// Where unit `u`'s first output plane starts; the output's length for
    /// `u == units()`.
    fn unit_start(&self, u: usize) -> usize {
        let unit = self.unit(u);
        (unit.n * self.geo.groups * self.geo.kg + unit.k0) * self.geo.out_plane
    }

    /// Runs tasks `tasks` of `threads` into `out`, which starts at the first
    /// task's first unit. Task `t` takes units `U·t/threads..U·(t+1)/threads`
    /// of the `U`, so a task writes one contiguous slice of the output; the
    /// tasks are halved with `rayon::join` until one is left, splitting the
    /// output where the second half's units start. Nothing is allocated:
    /// `join` keeps its jobs on the stack.
    fn run_tasks(
        &self,
        tasks: Range<usize>,
        threads: usize,
        input: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let first_unit = |t: usize| self.units() * t / threads;
        if tasks.len() <= 1 {
            let units = first_unit(tasks.start)..first_unit(tasks.end);
            self.run_units(units, input, bias, out);
            return;
        }
        let mid = tasks.start + tasks.len() / 2;
        let split = self.unit_start(first_unit(mid)) - self.unit_start(first_unit(tasks.start));
        let (left, right) = out.split_at_mut(split);
        rayon::join(
            || self.run_tasks(tasks.start..mid, threads, input, bias, left),
            || self.run_tasks(mid..tasks.end, threads, input, bias, right),
        );
    }

    /// Runs `units` in order into `out`, which starts at the first unit's
    /// planes.
    fn run_units(&self, units: Range<usize>, input: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
        if let Some(lanes) = &self.lanes {
            self.run_blocks(lanes, units, input, bias, out, None);
            return;
        }
        self.run_chunks(units, input, bias, out);
    }

    /// As [`Prepared::run`] on the calling thread only, channels in lanes
    /// working in `scratch` (grown, fallibly, where shorter than
    /// [`Prepared::scratch_len`]) instead of the thread's pool: a plan's
    /// `forward_in` with the caller's workspace.
    pub(crate) fn run_in(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let units = 0..self.units();
        match &self.lanes {
            Some(lanes) => self.run_blocks(lanes, units, input, bias, output, Some(scratch)),
            None => self.run_chunks(units, input, bias, output),
        }
    }

    /// Floats of workspace one thread needs: a block's two transposed
    /// planes with channels in lanes, else none.
    pub(crate) fn scratch_len(&self) -> usize {
        match &self.lanes {
            Some(lanes) => lanes.plan.workspace_len().unwrap_or(0),
            None => 0,
        }
    }

    /// Runs `units`, blocks of `L` depthwise channels, in order into `out`
    /// with channels in lanes, each block's planes transposed in a
    /// workspace: `caller`'s (grown where shorter) or one from the thread's
    /// pool. When none can be had, the blocks' channels run as chunks of
    /// one channel instead.
    fn run_blocks(
        &self,
        lanes: &LanesPrepared,
        units: Range<usize>,
        input: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        caller: Option<&mut Vec<f32>>,
    ) {
        let geo = &self.geo;
        let l = self.kernel.lanes;
        let taps = geo.taps();
        let need = lanes.plan.workspace_len();
        let mut pooled: Option<Scratch>;
        let buffer: Option<&mut [f32]> = match (need, caller) {
            (None, _) => None,
            (Some(need), Some(v)) => {
                let grown = v.len() >= need || v.try_reserve(need - v.len()).is_ok();
                grown.then(|| {
                    if v.len() < need {
                        v.resize(need, 0.0);
                    }
                    &mut v[..need]
                })
            }
            (Some(need), None) => {
                pooled = Scratch::any("depthwise forward", need).ok();
                pooled.as_deref_mut()
            }
        };
        let Some(work) = buffer else {
            self.run_blocks_as_chunks(units, input, bias, out);
            return;
        };
        let work = lanes::aligned(work, lanes.plan.sweep_geo(), l);
        lanes.plan.ready(work);
        let run: unsafe fn(&lanes::LanesForward<'_>, &mut [f32], &mut [f32]) = match self.kernel.isa
        {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::Avx512::lanes_forward,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::Avx2::lanes_forward,
            _ => portable::Portable::lanes_forward,
        };
        let mut rest = out;
        let mut ran = 0;
        for u in units {
            let Unit { n, k0, kb } = self.unit(u);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(kb * geo.out_plane);
            rest = tail;
            let mut b = [0.0f32; 16];
            if let Some(bias) = bias {
                b[..kb].copy_from_slice(&bias[k0..k0 + kb]);
            }
            let job = lanes::LanesForward {
                geo,
                input: &input[(n * geo.groups + k0) * geo.in_plane..][..kb * geo.in_plane],
                weights: &lanes.weights[k0 / l * taps * l..][..taps * l],
                bias: b,
                channels: kb,
                lanes: l,
                plan: &lanes.plan,
            };
            lanes::check_forward(&job, work, mine);
            // SAFETY: the kernel's ISA was clamped to what the CPU supports
            // (`for_isa`), so it has the features `run` is compiled for; the
            // job, workspace and output match the geometry (checked above).
            unsafe { run(&job, work, mine) };
            ran += 1;
        }
        record_direct_simd_jobs(self.kernel.isa, ran);
        crate::testing::record_forward_lanes(ran);
    }

    /// [`Prepared::run_blocks`]'s fallback: the blocks' channels as chunks
    /// of one channel (a depthwise chunk is a channel, so blocks `units`
    /// are chunks `N·K`-indexed from the first block's first channel to the
    /// last block's end), with [`Prepared::run_chunks`]'s jobs.
    fn run_blocks_as_chunks(
        &self,
        units: Range<usize>,
        input: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let chunk = |u: usize| {
            let Unit { n, k0, .. } = self.unit(u);
            n * self.geo.chunks() + k0
        };
        let end = if units.end == self.units() {
            self.geo.batch * self.geo.chunks()
        } else {
            chunk(units.end)
        };
        self.run_chunks(chunk(units.start)..end, input, bias, out);
    }

    /// Runs `units` (chunks of up to `MAX_KB` channels) in order into
    /// `out`, which starts at the first unit's planes.
    fn run_chunks(
        &self,
        units: Range<usize>,
        input: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let geo = &self.geo;
        let taps = geo.taps();
        let group_in = geo.cg * geo.in_plane;
        let mut rest = out;
        let jobs = units.map(|u| {
            let Unit { n, k0, kb } = self.chunk_unit(u);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(kb * geo.out_plane);
            rest = tail;
            let image_group = (n * geo.groups + k0 / geo.kg) * group_in;
            let job = Job {
                geo,
                cols: &self.cols,
                input: &input[image_group..][..group_in],
                weights: &self.weights[k0 * taps..][..kb * taps],
                bias: bias.map(|b| {
                    let mut v = [0.0f32; MAX_KB];
                    v[..kb].copy_from_slice(&b[k0..k0 + kb]);
                    v
                }),
                kb,
            };
            (job, mine)
        });
        self.kernel.run_jobs(jobs);
    }
}

/// What a depthwise layer with channels in lanes prepares once.
#[derive(Clone, Debug)]
struct LanesPrepared {
    /// Every block's weights ([`lanes_weights`]).
    weights: Vec<f32>,
    /// How a block's pixels are laid out and visited, the same for every
    /// block.
    plan: lanes::LanesPlan,
}

/// The weights of a depthwise layer with channels in lanes: per block of
/// `lanes` channels, `[R·S][lanes]` in window order (the tap mirrored for
/// true convolution), lanes past the last channel zero.
fn lanes_weights(geo: &Geo, weight: &[f32], lanes: usize) -> Result<Vec<f32>, ConvError> {
    let taps = geo.taps();
    let channels = geo.groups * geo.kg;
    let blocks = channels.div_ceil(lanes);
    let mut out = try_with_capacity("depthwise weights", blocks * taps * lanes)?;
    out.resize(blocks * taps * lanes, 0.0);
    for k in 0..channels {
        let (block, j) = (k / lanes, k % lanes);
        for r in 0..geo.r_len {
            for s in 0..geo.s_len {
                let (wr, ws) = geo.weight_tap(r, s);
                out[(block * taps + r * geo.s_len + s) * lanes + j] =
                    weight[k * taps + wr * geo.s_len + ws];
            }
        }
    }
    Ok(out)
}

/// The weights in the order the tiles read them, gathered once: for each
/// chunk `k0..k0 + kb` of a group's output channels, at `k0·taps`,
/// `[cg][R][S][kb]`: for each input channel and input offset `(r, s)`, the
/// `kb` weights that meet it (the tap mirrored for true convolution).
fn gather_weights(geo: &Geo, weight: &[f32]) -> Result<Vec<f32>, ConvError> {
    let taps = geo.taps();
    // Chunks follow each other in channel order and each is written in
    // order, so pushing fills the buffer front to back, with no zeroing
    // first (it matters to the un-planned forward, which gathers per call).
    let mut gathered = try_with_capacity("gathered weights", geo.groups * geo.kg * taps)?;
    for chunk in 0..geo.chunks() {
        let (k0, kb) = geo.chunk(chunk);
        debug_assert_eq!(gathered.len(), k0 * taps);
        let raw = &weight[k0 * taps..][..kb * taps];
        if kb == 1 {
            // One channel (depthwise layers): its own layout, or for true
            // convolution each input channel's R·S taps reversed, since
            // `weight_tap` mirrors both axes. A copy, not a loop per tap.
            if geo.flipped {
                for taps_c in raw.chunks_exact(geo.r_len * geo.s_len) {
                    gathered.extend(taps_c.iter().rev());
                }
            } else {
                gathered.extend_from_slice(raw);
            }
            continue;
        }
        for c in 0..geo.cg {
            for r in 0..geo.r_len {
                for s in 0..geo.s_len {
                    let (wr, ws) = geo.weight_tap(r, s);
                    let tap = (c * geo.r_len + wr) * geo.s_len + ws;
                    gathered.extend((0..kb).map(|kk| raw[kk * taps + tap]));
                }
            }
        }
    }
    Ok(gathered)
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

/// Threads for a call of `flops` in `units` units: no more than `par`
/// allows, than there are units, or than the work pays for.
pub(super) fn thread_count(flops: u64, units: usize, par: Parallelism) -> usize {
    let max = par.max_threads();
    if max <= 1 {
        return 1;
    }
    let by_work = usize::try_from(flops / MIN_FLOPS_PER_THREAD).unwrap_or(usize::MAX);
    max.min(units).min(by_work).max(1)
}

/// One unit of work: output channels `k0..k0 + kb` (inside one group) of image `n`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    n: usize,
    k0: usize,
    kb: usize,
}

/// The geometry as the kernels use it.
#[derive(Clone, Debug)]
struct Geo {
    batch: usize,
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
            batch: g.batch,
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

    /// Weights of one output channel: `cg·R·S`.
    fn taps(&self) -> usize {
        self.cg * self.r_len * self.s_len
    }

    /// Chunks of up to `MAX_KB` output channels in one image: `⌈kg/MAX_KB⌉`
    /// per group.
    fn chunks(&self) -> usize {
        self.groups * self.kg.div_ceil(MAX_KB)
    }

    /// Chunk `i` of an image, in channel order: its first output channel
    /// and its channel count (`MAX_KB`, or what is left of the group).
    fn chunk(&self, i: usize) -> (usize, usize) {
        let per_group = self.kg.div_ceil(MAX_KB);
        let (group, j) = (i / per_group, i % per_group);
        let k0 = group * self.kg + j * MAX_KB;
        (k0, (self.kg - j * MAX_KB).min(MAX_KB))
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
#[derive(Clone, Debug)]
struct ColPlan {
    vecs: Vec<ColVec>,
    /// `ranges[v·S + s]`: lanes `lo..hi` of vector `v` whose input column
    /// `(ow0 + j)·stride + s·dilation − pad_left` is in `0..in_w`.
    ranges: Vec<(usize, usize)>,
}

impl ColPlan {
    /// # Errors
    /// [`ConvError::OutOfMemory`] for an output row too long to describe
    /// (a plan may be made for a shape far larger than memory).
    fn new(geo: &Geo, lanes: usize) -> Result<ColPlan, ConvError> {
        let count = geo.out_w.div_ceil(lanes);
        let mut vecs = try_with_capacity("column plan", count)?;
        let mut ranges = try_with_capacity("column plan", count.saturating_mul(geo.s_len))?;
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
        Ok(ColPlan { vecs, ranges })
    }
}

/// One unit, ready for a kernel.
struct Job<'a> {
    geo: &'a Geo,
    cols: &'a ColPlan,
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
#[derive(Clone, Copy, Debug)]
struct Kernel {
    lanes: usize,
    /// Single-channel 3×3 jobs at strides up to 2 take the
    /// [row sweep](sweep).
    sweeps: bool,
    isa: Isa,
    /// Tests: run every job with this instead (a bounds-checking kernel).
    #[cfg(test)]
    test_run: Option<fn(&Job<'_>, &mut [f32])>,
}

impl Kernel {
    /// Whether channels may go in lanes: always, except under a test's
    /// bounds-checking kernel, which checks the per-channel jobs.
    fn lanes_allowed(&self) -> bool {
        #[cfg(test)]
        if self.test_run.is_some() {
            return false;
        }
        true
    }

    /// The kernel of `isa`, clamped to what the CPU supports.
    fn for_isa(isa: Isa) -> Kernel {
        let isa = clamp_isa(isa);
        let (lanes, sweep_vecs) = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (avx512::Avx512::LANES, avx512::Avx512::SWEEP_VECS),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (avx2::Avx2::LANES, avx2::Avx2::SWEEP_VECS),
            _ => (portable::Portable::LANES, portable::Portable::SWEEP_VECS),
        };
        Kernel {
            lanes,
            sweeps: sweep_vecs > 0,
            isa,
            #[cfg(test)]
            test_run: None,
        }
    }

    /// Runs each job into its output, the unit's `kb` output planes, and
    /// records one call on the ISA when any ran: the evidence tests read that
    /// a SIMD path really computed (once per run, not per job, which can be
    /// as small as one 7×7 plane).
    fn run_jobs<'a>(&self, jobs: impl Iterator<Item = (Job<'a>, &'a mut [f32])>) {
        #[cfg(test)]
        if let Some(run) = self.test_run {
            for (job, out) in jobs {
                check_job(&job, out);
                run(&job, out);
            }
            return;
        }
        let run: unsafe fn(&Job<'_>, &mut [f32]) = match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::run,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::run,
            _ => portable::run,
        };
        let mut ran = 0;
        for (job, out) in jobs {
            check_job(&job, out);
            // SAFETY: `isa` was clamped to what the CPU supports
            // (`for_isa`), so it has the features `run` is compiled for
            // (AVX-512F and FMA, AVX2 and FMA, or none); the job's buffers
            // match the geometry (checked above).
            unsafe { run(&job, out) };
            ran += 1;
        }
        record_direct_simd_jobs(self.isa, ran);
    }
}

/// Panics unless `job`'s buffers hold what its geometry says the kernels
/// read and write: the contract of every kernel.
fn check_job(job: &Job<'_>, out: &[f32]) {
    assert!(
        job.input.len() >= job.geo.cg * job.geo.in_plane
            && job.weights.len() >= job.geo.taps() * job.kb
            && out.len() >= job.kb * job.geo.out_plane
            && (1..=MAX_KB).contains(&job.kb),
        "direct SIMD: job buffers do not match the geometry"
    );
}

/// Runs one job on ISA `S`: picks the register tile for the unit's channel
/// count and kernel, and the load for the horizontal stride. Each ISA passes
/// its tile heights: `R1..R4` rows for the general tile of 1 to 4 output
/// channels, `R3X3` for the 3×3 tile at vertical stride 1 (at most 16; the
/// stride-2 tile has 8 rows).
///
/// # Safety
/// The CPU supports `S`'s ISA; the buffers match the geometry as
/// [`check_job`] checks; `out` holds the unit's `kb` output planes.
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
