//! The SIMD direct weight gradient, for depthwise and small-group
//! convolutions:
//!
//! ```text
//! dW[k, c, tap(r, s)] = Σ_n Σ_{oh, ow} dY[n, k, oh, ow] · X[n, group(k)·C/g + c, oh·σh + r·dh − top, ow·σw + s·dw − left]
//! ```
//!
//! over the input pixels that are real (padding taps contribute nothing, as
//! in the reference `conv2d_backward_weight_direct`). A GEMM lowering
//! (`dY · im2col(X)ᵀ`) has `M = K/g` and `N = C/g·R·S` per group, far too
//! small for depthwise layers; this path vectorises along the output width
//! instead, as the forward does:
//!
//! * A register tile is `KB` output channels (1, 2 or 4, all in one group) ×
//!   `TB` taps of one input channel, each tap's accumulator a vector of `L`
//!   lanes (16 for AVX-512, 8 for AVX2 and the portable `wide::f32x8` path).
//!   The tile sweeps the whole batch, every output row, one vector of `L`
//!   consecutive outputs at a time: it loads the `KB` grad-output vectors
//!   once, and for each tap the input vector that tap read in the forward
//!   (one load feeding `KB` FMAs). Only when the sweep is done is each
//!   accumulator reduced across its lanes, in a fixed pairwise order, and
//!   written (or added, with `accumulate`) to its weight element — one
//!   horizontal sum per weight element, never one per pixel.
//! * Taps are split into blocks of at most `TB` (balanced: 9 taps at most 5
//!   per block give 4 + 5), and a group's output channels into tiles of 4,
//!   2 and 1, each ISA choosing `TB` for each `KB` so that the accumulators,
//!   the grad-output vectors and one input vector fit in its registers.
//! * Each output row splits into vectors as in the forward's `ColPlan`: the
//!   *interior* vectors, whose every lane reads inside the input row for
//!   every kernel column, load plainly; the edge vectors (left and right
//!   padding, the short vector at the end of a row) load and accumulate only
//!   their in-bounds lanes (merge-masked FMAs, so an infinite gradient never
//!   meets a padding zero). Taps whose input row lies in the vertical padding
//!   are skipped for that output row. Horizontal stride 1 loads contiguous
//!   vectors, stride 2 loads two and keeps the even lanes, larger strides
//!   gather, with the forward's helpers.
//!
//! * Stride-1 layers whose output rows are as wide as the input rows
//!   ('same' padding along the width) with rows shorter than a few vectors
//!   take the *flattened* sweep instead ([`FlatPlan`]): a vector is `L`
//!   consecutive pixels of the flattened plane, whatever rows it spans, and
//!   each tap reads one contiguous input vector at a fixed offset; a lane
//!   mask per vector and tap (built once per call) drops the lanes whose
//!   input pixel is padding. Rows of 7, 14, 28 or 56 pixels no longer leave
//!   most vectors short or at an edge.
//! * In the flattened sweep, the *middle* vectors (every lane a real pixel
//!   of an output row whose taps all read real input rows) run in one loop
//!   with no per-vector choice of path: whole input loads and merge-masked
//!   FMAs whose masks depend only on the kernel column, so a 3-wide kernel
//!   loads three masks per vector, not one per tap. Only the vectors of the
//!   top and bottom rows and at the tensor's ends go one at a time. The
//!   masks are built per run of lanes within an output row (the plan of
//!   the 144×56² layer cost 17 µs per call when built lane by lane, 3 µs
//!   now).
//! * The lanes of the accumulators are summed once per job; AVX-512 sums
//!   sixteen accumulators at once with shuffles, in the scalar order.
//!
//! Measured on Zen 5 (1 thread, median GFLOP/s, against the forward
//! `DirectSimd` plan in the same process), before the flattened sweep →
//! after: MobileNetV2 depthwise 144×56² 3×3 on AVX-512 38–43 → 45–47
//! (forward 81–89, 0.55×), AVX2 (row sweep, no flat) 42–45 (forward 50–53, 0.85×);
//! the 4-channel groups of 128×28² (32 groups) on AVX-512 40–46 → 75
//! (forward 118–135), on AVX2 39 → 33 (row sweep; an unexplained loss,
//! still open); 960×7² depthwise on AVX-512 10 → 11 (forward 28); the
//! stride-2 576×14² layer (row sweep) about 5, a third of the forward.
//! The middle loop then took 144×56² from 40–42 to 62–64 (alternating
//! binaries; forward 74–81 in the same runs, about 0.8×) and the 4-channel
//! groups of 128×28² from 51–57 to 57–67; 960×7² stayed at 7–9 (4 vectors
//! per plane, at most one of them a middle one). A vector of the middle
//! loop is then bound by its loads (one input vector per tap, most of them
//! across two cache lines): a bare loop of nine unaligned loads and FMAs
//! per vector reaches about 115 GFLOP/s on this machine, deriving the
//! column taps of a kernel row from two loads with `valignd` 139 (not
//! taken: the Simd trait has no such shuffle yet). Depthwise layers on
//! small planes or at stride 2 were bound by per-job work (one job per
//! channel of 49 pixels, a horizontal sum per tap): they now put channels
//! in lanes (next section).
//!
//! * Where the ISA has the registers (AVX-512, and AVX2 one vector a strip), every job of a 3×3 layer
//!   with dilation 1, strides up to 2 and one output channel per group takes
//!   the forward's [row sweep](super::sweep) instead of the tile and the
//!   flattened sweep: grad-output rows ride in a ring of three, each input
//!   row is loaded once per kernel column and vector and meets every
//!   grad-output row whose window covers it, nine accumulators per vector.
//!   1 thread, GFLOP/s, before → after: 144×56² 76 → 103, 32×112² 60 →
//!   113–116, 192×28² 58 → 105, 256×16² 37 → 80, 96×112²/2 20 → 51; and
//!   taking over from channels in lanes (`GRAD_WEIGHT_BELOW_SWEEP`)
//!   384×14² 26–33 → 62–64, 144×56²/2 20–24 → 48–49. On AVX2: 144×56²
//!   49–51 → 62–65, 32×112² 52 → 71–73, 384×14² 21 → 28, 144×56²/2 18 →
//!   29, 96×112²/2 26 → 33–35.
//!
//! # Channels in lanes: depthwise layers on small or strided planes
//!
//! With pixels in lanes, a plane of 7² or 14² pixels is a handful of
//! vectors, most of them at an edge, and each channel's job ends in a
//! horizontal sum per tap; at stride 2 each input vector is a
//! de-interleaving load. Depthwise layers (one input and one output channel
//! per group) whose output rows are narrower than 16 or strided, and whose
//! transposed planes fit 256 KiB per block, take [`Pass::run_lanes`]
//! instead: `L` channels at a time, each image's planes of the block are
//! transposed (the ISA's `L × L` transposing load) so that a pixel's `L`
//! channels are one aligned vector, and each tap's accumulator is a vector
//! of `L` channels: per output pixel one grad-output load, then per tap one
//! input load and one FMA, at any stride, with no masks (a tap whose input
//! pixel is padding is skipped for that pixel, for all lanes at once) and
//! no horizontal sum. Measured (1 thread, GFLOP/s, alternating binaries,
//! pixels in lanes → channels in lanes, the forward plan beside):
//!
//! | layer | AVX-512 | forward | AVX2 | portable |
//! |---|---|---|---|---|
//! | 960×7² 3×3 | 8.8 → 32 | 23–25 | 6–8 → 15 | 1.7 → 9.6 |
//! | 576×14² 3×3/2 | 4.0 → 28 | 12–14 | 3.8 → 9.7 | 1.7 → 6.7 |
//! | 384×14² 3×3 | 27 → 44–51 | 47–59 | 18–22 → 18–19 | 3.2 → 12.8 |
//! | 144×56² 3×3/2 | 12.8 → 30 | 21 | 8–10 → 10–12 | |
//!
//! Rows of 28 and 56 keep the flattened sweep (channels in lanes measured
//! 49 against 53 on 192×28², 55 against 65 on 144×56²), and planes whose
//! block exceeds the budget (32×112² at stride 2) the row sweep.
//!
//! # Order of the sums and threads
//!
//! Every weight element's sum is formed by one accumulator in one fixed
//! order: images, then output rows, then vectors along the row, lane by
//! lane, then the lanes pairwise; with channels in lanes, images, then the
//! output pixels in row order. That order depends on the ISA (the lane
//! count) and the geometry but on nothing else: not on which other channels
//! or taps share the tile, nor on the threads. Threads split the output
//! channels into contiguous ranges (each owning the contiguous slice of
//! `grad_weight` that holds its channels' `C/g·R·S` weights, halved with
//! `rayon::join` as the forward splits its output), so every element is
//! computed by exactly one thread and the result is bitwise identical run
//! to run and for any thread count. Nothing is allocated beyond the column
//! plan (one entry per output vector and kernel column, allocated fallibly)
//! and, with channels in lanes, one workspace per thread from its pool
//! (the block's transposed planes; when it cannot be had, the thread takes
//! the per-channel jobs instead).

use super::super::try_with_capacity;
use super::lanes::{
    aligned, grad_weight_rule, lanes_apply, planes_to_lanes, workspace_len, TapGrid,
};
use super::simd::{fma_tap, load_tap, Simd};
use super::{offsets_fit, thread_count, ColPlan, ColVec, Geo};
use crate::arch::{clamp_isa, Isa};
use crate::conv::scratch::Scratch;
use crate::error::ConvError;
use crate::gemm::{Activation, Parallelism};
use crate::geometry::ConvGeometry;
use crate::testing::{record_direct_simd_jobs, record_grad_weight_lanes};
use std::ops::Range;

/// `grad_weight = ∂L/∂weight` (summed over the batch) for `grad_output`,
/// what [`conv2d_backward_weight_direct`](super::super::direct::conv2d_backward_weight_direct)
/// computes up to the order of the additions, for any geometry; fast for
/// depthwise and small-group convolutions. With `accumulate` the gradient is
/// added to what `grad_weight` holds, otherwise it replaces it. Slices must
/// have the lengths `g` requires (checked by the caller; a wrong one
/// panics). `isa` is clamped to the CPU.
///
/// Deterministic: bitwise identical results run to run and for every
/// `parallelism` (each weight element is summed by one thread in a fixed
/// order; see the module documentation).
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the column plan (about `OW/L·S` entries)
/// cannot be allocated; `grad_weight` is then untouched.
pub(crate) fn backward_weight(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    accumulate: bool,
    isa: Isa,
    parallelism: Parallelism,
) -> Result<(), ConvError> {
    assert!(
        input.len() == g.input_len()
            && grad_output.len() == g.output_len()
            && grad_weight.len() == g.weight_len(),
        "direct SIMD grad weight: buffers do not match the geometry"
    );
    if !offsets_fit(g) {
        // Padding or strides near `usize::MAX`: the kernels' signed offsets
        // could overflow, so the reference loops take it.
        super::super::direct::conv2d_backward_weight_direct(
            g,
            input,
            grad_output,
            grad_weight,
            accumulate,
        );
        return Ok(());
    }
    let kernel = WeightKernel::for_isa(isa);
    let geo = Geo::new(g, Activation::None);
    let cols = ColPlan::new(&geo, kernel.lanes)?;
    // The row sweep takes every job of a single-channel 3×3 layer where the
    // kernel has it (`weight_three`), so no flattened plan is built there.
    let sweeps = kernel.sweeps
        && geo.kg == 1
        && (geo.r_len, geo.s_len, geo.dil_h, geo.dil_w) == (3, 3, 1, 1)
        && geo.stride_h <= 2
        && geo.stride_w <= 2;
    let flat = if sweeps {
        None
    } else {
        FlatPlan::new(&geo, kernel.lanes, kernel.flat_rows.clone())?
    };
    let pass = Pass {
        geo: &geo,
        cols: &cols,
        flat: flat.as_ref(),
        input,
        grad_output,
        accumulate,
        lanes: lanes_apply(&geo, kernel.lanes, grad_weight_rule(sweeps)),
        kernel,
    };
    let channels = geo.groups * geo.kg;
    let threads = thread_count(g.flops(), channels, parallelism);
    pass.run_tasks(0..threads, threads, grad_weight);
    Ok(())
}

/// The grad-weight kernel of one ISA.
#[derive(Clone, Debug)]
struct WeightKernel {
    lanes: usize,
    /// Single-channel 3×3 jobs take the [row sweep](super::sweep).
    sweeps: bool,
    isa: Isa,
    /// Most taps per tile of 1, 2 and 4 output channels.
    taps: [usize; 3],
    /// Output row widths that take the flattened sweep (when it applies,
    /// see [`FlatPlan`]).
    flat_rows: Range<usize>,
    run: RunWeight,
    run_lanes: RunLanes,
}

/// A kernel's entry point for one job (see `run_weight` in each ISA's file).
type RunWeight = unsafe fn(&WeightJob<'_>, &mut [f32]);

/// A kernel's entry point for one channels-in-lanes job (see
/// `run_weight_lanes` in each ISA's file).
type RunLanes = unsafe fn(&LanesJob<'_>, &mut [f32], &mut [f32]);

impl WeightKernel {
    /// The kernel of `isa`, clamped to what the CPU supports.
    fn for_isa(isa: Isa) -> WeightKernel {
        let isa = clamp_isa(isa);
        type Entry = (usize, usize, [usize; 3], Range<usize>, RunWeight, RunLanes);
        let (lanes, sweep_vecs, taps, flat_rows, run, run_lanes): Entry = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (
                super::avx512::Avx512::LANES,
                super::avx512::Avx512::SWEEP_VECS,
                super::avx512::WEIGHT_TAPS,
                super::avx512::WEIGHT_FLAT_ROWS,
                super::avx512::run_weight,
                super::avx512::run_weight_lanes,
            ),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (
                super::avx2::Avx2::LANES,
                super::avx2::Avx2::SWEEP_VECS,
                super::avx2::WEIGHT_TAPS,
                super::avx2::WEIGHT_FLAT_ROWS,
                super::avx2::run_weight,
                super::avx2::run_weight_lanes,
            ),
            _ => (
                super::portable::Portable::LANES,
                super::portable::Portable::SWEEP_VECS,
                super::portable::WEIGHT_TAPS,
                super::portable::WEIGHT_FLAT_ROWS,
                super::portable::run_weight,
                super::portable::run_weight_lanes,
            ),
        };
        WeightKernel {
            lanes,
            sweeps: sweep_vecs > 0,
            isa,
            taps,
            flat_rows,
            run,
            run_lanes,
        }
    }

    /// Most taps per tile of `kb` (1, 2 or 4) output channels.
    fn taps_for(&self, kb: usize) -> usize {
        match kb {
            1 => self.taps[0],
            2 => self.taps[1],
            _ => self.taps[2],
        }
    }
}

/// One call: the tensors, the plan of the output rows and the kernel.
struct Pass<'a> {
    geo: &'a Geo,
    cols: &'a ColPlan,
    flat: Option<&'a FlatPlan>,
    input: &'a [f32],
    grad_output: &'a [f32],
    accumulate: bool,
    kernel: WeightKernel,
    /// Whether the channels go in lanes ([`lanes_apply`]).
    lanes: bool,
}

impl Pass<'_> {
    /// Runs tasks `tasks` of `threads` into `out`, the weights of the first
    /// task's first output channel onwards. Task `t` takes output channels
    /// `K·t/threads..K·(t+1)/threads`, a contiguous slice of the weights;
    /// the tasks are halved with `rayon::join` until one is left. Nothing is
    /// allocated: `join` keeps its jobs on the stack.
    fn run_tasks(&self, tasks: Range<usize>, threads: usize, out: &mut [f32]) {
        let channels = self.geo.groups * self.geo.kg;
        let first = |t: usize| channels * t / threads;
        if tasks.len() <= 1 {
            self.run_channels(first(tasks.start)..first(tasks.end), out);
            return;
        }
        let mid = tasks.start + tasks.len() / 2;
        let split = (first(mid) - first(tasks.start)) * self.geo.taps();
        let (left, right) = out.split_at_mut(split);
        rayon::join(
            || self.run_tasks(tasks.start..mid, threads, left),
            || self.run_tasks(mid..tasks.end, threads, right),
        );
    }

    /// The weights of output channels `ks` into `out`, which starts at the
    /// first one's: tiles of 4, 2 or 1 channels of one group (as the kernel
    /// allows), each through every input channel of the group and every
    /// block of taps.
    fn run_channels(&self, ks: Range<usize>, out: &mut [f32]) {
        if self.lanes && self.run_lanes(ks.clone(), out) {
            return;
        }
        let geo = self.geo;
        let per_k = geo.taps();
        let rs = geo.r_len * geo.s_len;
        let mut ran = 0u64;
        let mut k = ks.start;
        while k < ks.end {
            let group = k / geo.kg;
            let left = ks.end.min((group + 1) * geo.kg) - k;
            let kb = if left >= 4 && self.kernel.taps[2] > 0 {
                4
            } else if left >= 2 && self.kernel.taps[1] > 0 {
                2
            } else {
                1
            };
            let tb_max = self.kernel.taps_for(kb);
            let blocks = rs.div_ceil(tb_max);
            let mine = &mut out[(k - ks.start) * per_k..][..kb * per_k];
            for c in 0..geo.cg {
                for b in 0..blocks {
                    let t0 = rs * b / blocks;
                    let t1 = rs * (b + 1) / blocks;
                    let job = WeightJob {
                        geo,
                        cols: self.cols,
                        flat: self.flat,
                        input: self.input,
                        grad_output: self.grad_output,
                        in_c: group * geo.cg + c,
                        c,
                        k0: k,
                        kb,
                        taps: t0..t1,
                        accumulate: self.accumulate,
                    };
                    check_weight_job(&job, mine);
                    // SAFETY: the kernel's ISA was clamped to what the CPU
                    // supports (`for_isa`), so it has the features `run` is
                    // compiled for; the job's buffers and ranges match the
                    // geometry (checked above).
                    unsafe { (self.kernel.run)(&job, mine) };
                    ran += 1;
                }
            }
            k += kb;
        }
        if ran > 0 {
            record_direct_simd_jobs(self.kernel.isa, ran);
        }
    }
}

impl Pass<'_> {
    /// The weights of depthwise output channels `ks` into `out` (as
    /// [`Pass::run_channels`]), channels in lanes: blocks of `L` channels,
    /// each image's planes of the block transposed so that a pixel's `L`
    /// channels are one vector, then one [`weight_lanes`] job per block of
    /// taps. Returns false, with nothing written, when the workspace cannot
    /// be allocated (the caller then takes the per-channel jobs).
    fn run_lanes(&self, ks: Range<usize>, out: &mut [f32]) -> bool {
        let geo = self.geo;
        let lanes = self.kernel.lanes;
        let rs = geo.r_len * geo.s_len;
        let len = workspace_len(geo, lanes).and_then(|n| n.checked_add(rs * lanes));
        let Some(Ok(mut work)) = len.map(|n| Scratch::any("depthwise grad weight", n)) else {
            return false;
        };
        let at = work.len() - rs * lanes;
        let (work, sums) = work.split_at_mut(at);
        let work = aligned(work, geo, lanes);
        let tb = self.kernel.taps[0];
        let blocks = rs.div_ceil(tb);
        let mut ran = 0u64;
        let mut k0 = ks.start;
        while k0 < ks.end {
            let nb = lanes.min(ks.end - k0);
            sums.fill(0.0);
            for n in 0..geo.batch {
                // Depthwise: channel k of the output reads channel k of the input.
                let x = &self.input[(n * geo.groups + k0) * geo.in_plane..][..nb * geo.in_plane];
                let dy = &self.grad_output[(n * geo.groups + k0) * geo.out_plane..]
                    [..nb * geo.out_plane];
                for b in 0..blocks {
                    let taps = rs * b / blocks..rs * (b + 1) / blocks;
                    let job = LanesJob {
                        geo,
                        x,
                        dy,
                        channels: nb,
                        fill: b == 0,
                        lanes,
                        taps: taps.clone(),
                    };
                    let sums = &mut sums[taps.start * lanes..taps.end * lanes];
                    check_lanes_job(&job, work, sums);
                    // SAFETY: the kernel's ISA was clamped to what the CPU
                    // supports (`for_isa`); the job, work and sums match
                    // the geometry (checked above).
                    unsafe { (self.kernel.run_lanes)(&job, work, sums) };
                    ran += 1;
                }
            }
            for j in 0..nb {
                let w = &mut out[(k0 - ks.start + j) * rs..][..rs];
                for tap in 0..rs {
                    let (wr, ws) = geo.weight_tap(tap / geo.s_len, tap % geo.s_len);
                    let dst = &mut w[wr * geo.s_len + ws];
                    let sum = sums[tap * lanes + j];
                    *dst = if self.accumulate { *dst + sum } else { sum };
                }
            }
            k0 += nb;
        }
        if ran > 0 {
            record_direct_simd_jobs(self.kernel.isa, ran);
            record_grad_weight_lanes(ran);
        }
        true
    }
}

/// One channels-in-lanes job: a block of up to `L` depthwise channels of
/// one image and a block of taps.
pub(super) struct LanesJob<'a> {
    geo: &'a Geo,
    /// The block's input planes, `[channels][H·W]`.
    x: &'a [f32],
    /// The block's grad-output planes, `[channels][OH·OW]`.
    dy: &'a [f32],
    /// Channels in the block, `1..=L`.
    channels: usize,
    /// Whether to transpose the planes into the workspace first (the first
    /// tap block of each image); later blocks find them there.
    fill: bool,
    lanes: usize,
    /// The taps of the job (flattened `r·S + s` in the forward's window
    /// order).
    taps: Range<usize>,
}

/// Panics unless `job`, `work` and `sums` are what the lanes kernels read
/// and write: the contract of every kernel.
fn check_lanes_job(job: &LanesJob<'_>, work: &[f32], sums: &[f32]) {
    let geo = job.geo;
    assert!(
        (1..=job.lanes).contains(&job.channels)
            && job.x.len() >= job.channels * geo.in_plane
            && job.dy.len() >= job.channels * geo.out_plane
            && work.len() >= (geo.in_plane + geo.out_plane) * job.lanes
            && sums.len() >= job.taps.len() * job.lanes
            && !job.taps.is_empty()
            && job.taps.end <= geo.r_len * geo.s_len,
        "direct SIMD grad weight: lanes job does not match the geometry"
    );
}

/// The channels-in-lanes tile: lane `j` of accumulator `t` sums, for
/// channel `j` of the block and the job's tap `t`, the products of every
/// grad-output pixel with the input pixel the tap reads, pixel after pixel
/// in row order (one FMA per pixel and tap, no horizontal sum). Each tap
/// whose input pixel is padding is skipped, so the sums are the reference's
/// (an infinity never meets a padding zero). Pixels whose every tap reads a
/// real input pixel take a loop with no checks. `work` holds the block's
/// planes transposed (`[H·W][L]` then `[OH·OW][L]`: each pixel's channels
/// one vector), written here first when `job.fill`; `sums` (`[tap][L]`)
/// holds the sums so far and receives them: the images of a batch add in
/// order.
///
/// # Safety
/// The job, `work` and `sums` pass [`check_lanes_job`]; `job.lanes == S::LANES`;
/// the job has at most `TB` taps, exactly `TB` with `FULL`; `S`'s
/// operations are supported by the CPU.
#[inline(always)]
pub(super) unsafe fn weight_lanes<S: Simd, const TB: usize, const FULL: bool>(
    s: S,
    job: &LanesJob<'_>,
    work: &mut [f32],
    sums: &mut [f32],
) {
    let geo = job.geo;
    let l = S::LANES;
    debug_assert_eq!(job.lanes, l);
    let (x, dy) = work.split_at_mut(geo.in_plane * l);
    if job.fill {
        let rows = job.channels;
        // SAFETY: the block's planes hold rows·plane floats and the
        // workspace plane·L (contract).
        unsafe {
            planes_to_lanes(
                s,
                job.x.as_ptr(),
                geo.in_plane,
                rows,
                geo.in_plane,
                x.as_mut_ptr(),
            );
            planes_to_lanes(
                s,
                job.dy.as_ptr(),
                geo.out_plane,
                rows,
                geo.out_plane,
                dy.as_mut_ptr(),
            );
        }
    }
    let count = if FULL { TB } else { job.taps.len().min(TB) };
    let grid = TapGrid::<TB>::new(geo, job.taps.clone(), l);
    let mut acc = [s.zero(); TB];
    for (t, a) in acc.iter_mut().enumerate().take(count) {
        // SAFETY: sums holds count·L floats (contract).
        *a = unsafe { s.load(sums.as_ptr().add(t * l)) };
    }
    let x = x.as_ptr();
    for oh in 0..geo.out_h {
        let interior = if grid.row_real(geo, oh) {
            grid.cols.clone()
        } else {
            0..0
        };
        // SAFETY: oh < out_h: the row's out_w vectors lie in dy.
        let dy_row = unsafe { dy.as_ptr().add(oh * geo.out_w * l) };
        for ow in 0..geo.out_w {
            // SAFETY: ow < out_w: inside the row.
            let d = unsafe { s.load(dy_row.add(ow * l)) };
            if interior.contains(&ow) {
                // Every tap reads a real pixel.
                let base = x.wrapping_offset(grid.origin(geo, oh, ow, l));
                for (t, a) in acc.iter_mut().enumerate() {
                    if !FULL && t >= count {
                        break;
                    }
                    // SAFETY: a real input pixel's vector, inside x.
                    let xv = unsafe { s.load(base.wrapping_offset(grid.off[t])) };
                    *a = s.fma(d, xv, *a);
                }
            } else {
                for (t, a) in acc.iter_mut().enumerate() {
                    if !FULL && t >= count {
                        break;
                    }
                    if let Some(px) = grid.pixel(geo, t, oh, ow) {
                        // SAFETY: a real input pixel's vector, inside x.
                        let xv = unsafe { s.load(x.add(px * l)) };
                        *a = s.fma(d, xv, *a);
                    }
                }
            }
        }
    }
    for (t, &a) in acc.iter().enumerate().take(count) {
        // SAFETY: sums holds count·L floats (contract).
        unsafe { s.store(sums.as_mut_ptr().add(t * l), a, l) };
    }
}

/// One tile's work: the weights of output channels `k0..k0 + kb` (one
/// group) for input channel `c` of the group and the taps `taps` (flattened
/// `r·S + s` in the forward's window order).
pub(super) struct WeightJob<'a> {
    pub(super) geo: &'a Geo,
    pub(super) cols: &'a ColPlan,
    /// The flattened sweep's masks, when the geometry allows it.
    flat: Option<&'a FlatPlan>,
    /// The whole input, `[N, C, H, W]`.
    pub(super) input: &'a [f32],
    /// The whole grad output, `[N, K, OH, OW]`.
    pub(super) grad_output: &'a [f32],
    /// The input channel read: `group·C/g + c`.
    pub(super) in_c: usize,
    /// The input channel within the group.
    pub(super) c: usize,
    /// First output channel.
    pub(super) k0: usize,
    /// Output channels of the tile: 1, 2 or 4.
    kb: usize,
    /// The taps of the tile.
    taps: Range<usize>,
    pub(super) accumulate: bool,
}

/// Panics unless `job`'s buffers and ranges are what its geometry says the
/// kernels read and write (`out` holding the weights of `kb` output
/// channels from `k0`): the contract of every kernel.
fn check_weight_job(job: &WeightJob<'_>, out: &[f32]) {
    let geo = job.geo;
    let (channels_in, channels_out) = (geo.groups * geo.cg, geo.groups * geo.kg);
    assert!(
        job.input.len() >= geo.batch * channels_in * geo.in_plane
            && job.grad_output.len() >= geo.batch * channels_out * geo.out_plane
            && job.in_c == (job.k0 / geo.kg) * geo.cg + job.c
            && job.c < geo.cg
            && (job.k0 + job.kb - 1) / geo.kg == job.k0 / geo.kg
            && job.k0 + job.kb <= channels_out
            && out.len() >= job.kb * geo.taps()
            && matches!(job.kb, 1 | 2 | 4)
            && job.taps.start < job.taps.end
            && job.taps.end <= geo.r_len * geo.s_len
            && job.cols.vecs.len() * geo.s_len == job.cols.ranges.len()
            && job.flat.is_none_or(|f| {
                f.vecs == geo.out_plane.div_ceil(f.lanes)
                    && f.masks.len() == f.vecs * geo.r_len * geo.s_len
                    && f.middle.end <= f.vecs
                    && f.lanes <= 32
                    && geo.stride_h == 1
                    && geo.stride_w == 1
                    && geo.out_w == geo.in_w
            }),
        "direct SIMD grad weight: job does not match the geometry"
    );
}

/// The grad-weight tile of an ISA, compiled with its target features.
pub(super) trait GradWeight: Simd {
    /// [`weight_tile`] with this ISA's operations, compiled with its target
    /// features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`weight_tile`] otherwise.
    unsafe fn weight_tile<const KB: usize, const TB: usize, const SW: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    );

    /// [`weight_three`] with this ISA's operations, compiled with its
    /// target features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`weight_three`] otherwise.
    unsafe fn weight_three<const RB: usize, const SW: usize, const SH: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    );

    /// [`weight_flat`] with this ISA's operations, compiled with its target
    /// features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`weight_flat`] otherwise.
    unsafe fn weight_flat<const KB: usize, const TB: usize>(
        job: &WeightJob<'_>,
        flat: &FlatPlan,
        out: &mut [f32],
    );

    /// [`weight_lanes`] with this ISA's operations, compiled with its
    /// target features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`weight_lanes`] otherwise.
    unsafe fn weight_lanes<const TB: usize, const FULL: bool>(
        job: &LanesJob<'_>,
        work: &mut [f32],
        sums: &mut [f32],
    );
}

/// Runs one channels-in-lanes job on ISA `S` with tap blocks of at most
/// `TB` taps.
///
/// # Safety
/// The CPU supports `S`'s ISA; the job, `work` and `sums` pass
/// [`check_lanes_job`] and the job has at most `TB` taps.
#[inline(always)]
pub(super) unsafe fn run_lanes_job<S: GradWeight, const TB: usize>(
    job: &LanesJob<'_>,
    work: &mut [f32],
    sums: &mut [f32],
) {
    assert!(
        job.taps.len() <= TB,
        "direct SIMD grad weight: too many taps"
    );
    // SAFETY: forwarded contract; FULL only with TB taps.
    unsafe {
        if job.taps.len() == TB {
            S::weight_lanes::<TB, true>(job, work, sums);
        } else {
            S::weight_lanes::<TB, false>(job, work, sums);
        }
    }
}

/// Runs one job on ISA `S`: the tile for its channel count (`TB1`, `TB2`,
/// `TB4` taps for 1, 2 and 4 channels, as each ISA fits them in its
/// registers) and the load for the horizontal stride; the jobs of a 3×3
/// kernel with dilation 1 and strides 1 or 2 in a layer of one output
/// channel per group (depthwise MobileNet layers) take the
/// [`weight_three`] tile of `R3` output rows instead.
///
/// # Safety
/// The CPU supports `S`'s ISA; the job and `out` pass
/// [`check_weight_job`], and its taps are at most the tile's for `job.kb`.
#[inline(always)]
pub(super) unsafe fn run_weight_job<
    S: GradWeight,
    const TB1: usize,
    const TB2: usize,
    const TB4: usize,
    const R3: usize,
>(
    job: &WeightJob<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    if let Some(flat) = job.flat {
        macro_rules! flat {
            ($kb:literal, $tb:ident) => {{
                assert!(
                    job.taps.len() <= $tb,
                    "direct SIMD grad weight: too many taps"
                );
                // SAFETY: forwarded contract; KB == job.kb, taps ≤ TB, and
                // the job's flat plan passed `check_weight_job`.
                unsafe { S::weight_flat::<$kb, $tb>(job, flat, out) }
            }};
        }
        return match job.kb {
            1 => flat!(1, TB1),
            2 => flat!(2, TB2),
            _ => flat!(4, TB4),
        };
    }
    // Only where every job is single-channel (one output channel per
    // group): the tile sums in its own order, and a layer with more
    // channels per group runs single-channel jobs only where a thread's
    // range of channels ends mid-group, which would make the result depend
    // on the thread count.
    let three = geo.kg == 1
        && (geo.r_len, geo.s_len, geo.dil_h, geo.dil_w) == (3, 3, 1, 1)
        && job.taps == (0..9);
    if three {
        match (geo.stride_h, geo.stride_w) {
            // SAFETY: forwarded contract; a single-channel job of all nine
            // taps of a 3×3 kernel with dilation 1 and the strides named.
            (1, 1) => return unsafe { S::weight_three::<R3, 1, 1>(job, out) },
            // SAFETY: as above.
            (1, 2) => return unsafe { S::weight_three::<R3, 2, 1>(job, out) },
            // SAFETY: as above.
            (2, 1) => return unsafe { S::weight_three::<R3, 1, 2>(job, out) },
            // SAFETY: as above.
            (2, 2) => return unsafe { S::weight_three::<R3, 2, 2>(job, out) },
            _ => {}
        }
    }
    macro_rules! tile {
        ($kb:literal, $tb:ident) => {{
            assert!(
                job.taps.len() <= $tb,
                "direct SIMD grad weight: too many taps"
            );
            match job.geo.stride_w {
                // SAFETY: forwarded contract; KB == job.kb, taps ≤ TB.
                1 => unsafe { S::weight_tile::<$kb, $tb, 1>(job, out) },
                // SAFETY: as above.
                2 => unsafe { S::weight_tile::<$kb, $tb, 2>(job, out) },
                // SAFETY: as above.
                _ => unsafe { S::weight_tile::<$kb, $tb, 0>(job, out) },
            }
        }};
    }
    match job.kb {
        1 => tile!(1, TB1),
        2 => tile!(2, TB2),
        _ => tile!(4, TB4),
    }
}

/// The taps of a tile as its sweep reads them.
struct Taps<const TB: usize> {
    /// Taps in the tile (`1..=TB`); the rest are never read.
    count: usize,
    /// Vertical offset `r·dh` of each tap.
    dy: [usize; TB],
    /// Horizontal offset `s·dw − left` of each tap (negative in the left padding).
    dx: [isize; TB],
    /// Kernel column `s` of each tap (its entry in the column plan).
    s: [usize; TB],
}

/// One tile: `KB` output channels × the job's taps of one input channel,
/// swept over the batch and every output row, then reduced and written to
/// `out` (the weights of the job's `KB` channels). `SW` is the horizontal
/// stride when it is 1 or 2, and 0 for any other (read from the geometry).
///
/// # Safety
/// The job and `out` pass [`check_weight_job`]; `KB == job.kb`; the job has
/// at most `TB` taps; `S`'s operations are supported by the CPU.
#[inline(always)]
pub(super) unsafe fn weight_tile<S: Simd, const KB: usize, const TB: usize, const SW: usize>(
    s: S,
    job: &WeightJob<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    let mut taps = Taps::<TB> {
        count: job.taps.len(),
        dy: [0; TB],
        dx: [0; TB],
        s: [0; TB],
    };
    for (i, tap) in job.taps.clone().enumerate().take(TB) {
        let (r, col) = (tap / geo.s_len, tap % geo.s_len);
        taps.dy[i] = r * geo.dil_h;
        taps.dx[i] = (col * geo.dil_w) as isize - geo.pad_left as isize;
        taps.s[i] = col;
    }
    let channels_in = geo.groups * geo.cg;
    let channels_out = geo.groups * geo.kg;
    let mut acc = [[s.zero(); TB]; KB];
    for n in 0..geo.batch {
        let x = job.input[(n * channels_in + job.in_c) * geo.in_plane..][..geo.in_plane].as_ptr();
        let dy = job.grad_output[(n * channels_out + job.k0) * geo.out_plane..]
            [..KB * geo.out_plane]
            .as_ptr();
        for oh in 0..geo.out_h {
            // Per tap, the input row this output row reads and whether it
            // is a real row; lane 0 of vector 0 in it (possibly out of
            // bounds, so only offset with wrapping arithmetic).
            let mut rows = [x; TB];
            let mut ok = [false; TB];
            let mut all = taps.count == TB;
            for t in 0..TB {
                if t < taps.count {
                    let ih = (oh * geo.stride_h + taps.dy[t]) as isize - geo.pad_top as isize;
                    ok[t] = ih >= 0 && ih < geo.in_h as isize;
                    rows[t] = x.wrapping_offset(ih * geo.in_w as isize + taps.dx[t]);
                }
                all &= ok[t];
            }
            // SAFETY: oh < out_h, so the row lies inside each of the KB
            // planes `dy` spans.
            let dy_row = unsafe { dy.add(oh * geo.out_w) };
            let sweep = Sweep {
                geo,
                cols: job.cols,
                taps: &taps,
                rows: &rows,
                ok: &ok,
                dy_row,
            };
            // SAFETY: forwarded contract; without CHECK every tap is in the
            // tile and reads a real row.
            unsafe {
                if all {
                    sweep_row::<S, KB, TB, SW, false>(s, &sweep, &mut acc);
                } else {
                    sweep_row::<S, KB, TB, SW, true>(s, &sweep, &mut acc);
                }
            }
        }
    }
    write_sums(s, job, acc, taps.count, out);
}

/// Reduces each accumulator of a tile (`acc[kk][t]`: output channel
/// `k0 + kk`, the job's tap `t < count`) across its lanes and writes (or
/// adds, with `accumulate`) the sums to their weights in `out`.
#[inline(always)]
fn write_sums<S: Simd, const KB: usize, const TB: usize>(
    s: S,
    job: &WeightJob<'_>,
    acc: [[S::V; TB]; KB],
    count: usize,
    out: &mut [f32],
) {
    let geo = job.geo;
    let per_k = geo.taps();
    let rs = geo.r_len * geo.s_len;
    let count = count.min(TB);
    for (kk, acc) in acc.into_iter().enumerate() {
        // All TB accumulators (those past `count` are zeros, their sums
        // unused): a constant length, so no copy of a runtime length (a
        // memcpy and memset call per reduction) around the shuffles.
        let mut sums = [0.0f32; TB];
        s.reduce_lanes(&acc, &mut sums);
        for (t, &sum) in sums.iter().enumerate().take(count) {
            let tap = job.taps.start + t;
            let (wr, ws) = geo.weight_tap(tap / geo.s_len, tap % geo.s_len);
            let dst = &mut out[kk * per_k + job.c * rs + wr * geo.s_len + ws];
            *dst = if job.accumulate { *dst + sum } else { sum };
        }
    }
}

/// One output row of one image, as [`sweep_row`] reads it.
struct Sweep<'a, const TB: usize> {
    geo: &'a Geo,
    cols: &'a ColPlan,
    taps: &'a Taps<TB>,
    /// Per tap, lane 0 of the row's vector 0 (possibly out of bounds).
    rows: &'a [*const f32; TB],
    /// Per tap, whether its input row is real (false past `taps.count`).
    ok: &'a [bool; TB],
    /// The output row in the first of the `KB` grad-output planes.
    dy_row: *const f32,
}

/// Every vector of one output row into the tile's accumulators. `CHECK`
/// skips the taps that are not `ok`; without it every one of the `TB` taps
/// must be.
///
/// # Safety
/// As [`weight_tile`]; `w.dy_row` is an output row of the first of `KB`
/// planes `out_plane` apart; each `ok` tap's row is a real input row.
#[inline(always)]
unsafe fn sweep_row<
    S: Simd,
    const KB: usize,
    const TB: usize,
    const SW: usize,
    const CHECK: bool,
>(
    s: S,
    w: &Sweep<'_, TB>,
    acc: &mut [[S::V; TB]; KB],
) {
    for (v, cv) in w.cols.vecs.iter().enumerate() {
        let ranges = &w.cols.ranges[v * w.geo.s_len..][..w.geo.s_len];
        // SAFETY: forwarded contract; an interior vector reads in bounds in
        // every lane for every kernel column.
        unsafe {
            if cv.interior {
                vector::<S, KB, TB, SW, CHECK, false>(s, w, cv, ranges, acc);
            } else {
                vector::<S, KB, TB, SW, CHECK, true>(s, w, cv, ranges, acc);
            }
        }
    }
}

/// One vector of outputs: `KB` grad-output loads, then per tap one input
/// load feeding `KB` FMAs. `EDGE` loads and accumulates only the lanes that
/// read inside the input row (`ranges`, per kernel column).
///
/// # Safety
/// As [`sweep_row`]; `EDGE` is false only for an interior vector.
#[inline(always)]
unsafe fn vector<
    S: Simd,
    const KB: usize,
    const TB: usize,
    const SW: usize,
    const CHECK: bool,
    const EDGE: bool,
>(
    s: S,
    w: &Sweep<'_, TB>,
    cv: &ColVec,
    ranges: &[(usize, usize)],
    acc: &mut [[S::V; TB]; KB],
) {
    let geo = w.geo;
    let sw = if SW == 0 { geo.stride_w } else { SW };
    let mut dyv = [s.zero(); KB];
    let full = s.mask(0, cv.lanes);
    for (kk, d) in dyv.iter_mut().enumerate() {
        // SAFETY: lanes ow0..ow0 + lanes ≤ out_w of the row of plane kk <
        // KB are inside the grad output (contract); a short vector loads
        // only those lanes.
        *d = unsafe {
            let p = w.dy_row.add(kk * geo.out_plane + cv.ow0);
            if cv.lanes == S::LANES {
                s.load(p)
            } else {
                s.load_masked(p, 1, full)
            }
        };
    }
    let col = cv.ow0 * sw;
    for t in 0..TB {
        if CHECK && !w.ok[t] {
            continue;
        }
        let (lo, hi) = if EDGE {
            ranges[w.taps.s[t]]
        } else {
            (0, S::LANES)
        };
        if EDGE && lo == hi {
            continue;
        }
        let p = w.rows[t].wrapping_add(col);
        // SAFETY: tap t reads a real input row (no CHECK: contract; else
        // ok[t]); for its kernel column the lanes lo..hi read columns inside
        // 0..in_w (`ranges`; every lane of an interior vector), so they are
        // readable. An edge vector's taps that read in bounds in every lane
        // take the plain load and FMA.
        unsafe {
            if (lo, hi) == (0, S::LANES) {
                feed::<S, KB, TB, SW, false>(s, p, sw, (lo, hi), &dyv, t, acc);
            } else {
                feed::<S, KB, TB, SW, true>(s, p, sw, (lo, hi), &dyv, t, acc);
            }
        }
    }
}

/// One tap of one vector: loads the input vector at `p` (only lanes
/// `lo..hi` with `MASKED`) and adds its products with the `KB` grad-output
/// vectors into the tap's accumulators.
///
/// # Safety
/// `p[stride·j]` is readable for the lanes `j` in `lo..hi` (every lane
/// without `MASKED`, where `lo..hi` is all of them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn feed<S: Simd, const KB: usize, const TB: usize, const SW: usize, const MASKED: bool>(
    s: S,
    p: *const f32,
    stride: usize,
    (lo, hi): (usize, usize),
    dyv: &[S::V; KB],
    t: usize,
    acc: &mut [[S::V; TB]; KB],
) {
    let m = s.mask(lo, hi);
    // SAFETY: forwarded contract.
    let x = unsafe { load_tap::<S, SW, MASKED>(s, p, stride, m) };
    for (acc, &d) in acc.iter_mut().zip(dyv) {
        acc[t] = fma_tap::<S, MASKED>(s, d, x, acc[t], m);
    }
}

/// The depthwise 3×3 tile: one output channel, all nine taps (dilation 1,
/// vertical stride `SH` and horizontal stride `SW`, each 1 or 2), nine
/// accumulators. Output rows go in blocks of `RB`: per vector, the block's
/// `RB` grad-output vectors are loaded once, then each input row the block
/// reads is loaded once per kernel column and feeds every output row of the
/// block whose window covers it (about `3/SH` FMAs per load instead of 1).
/// Each accumulator still sums in a fixed order: images, row blocks,
/// vectors, then output rows.
///
/// # Safety
/// As [`weight_tile`] with `KB = 1`, and the kernel, dilation and strides
/// described; the job holds the nine taps.
#[inline(always)]
pub(super) unsafe fn weight_three<S: Simd, const RB: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &WeightJob<'_>,
    out: &mut [f32],
) {
    if S::SWEEP_VECS > 0 {
        // SAFETY: forwarded contract.
        return unsafe { super::sweep::weight_sweep3::<S, SW, SH>(s, job, out) };
    }
    let geo = job.geo;
    let channels_in = geo.groups * geo.cg;
    let channels_out = geo.groups * geo.kg;
    // Input rows one block of RB output rows reads.
    let span = (RB - 1) * SH + 3;
    let mut acc = [[s.zero(); 3]; 3];
    for n in 0..geo.batch {
        let x = job.input[(n * channels_in + job.in_c) * geo.in_plane..][..geo.in_plane].as_ptr();
        let dy = job.grad_output[(n * channels_out + job.k0) * geo.out_plane..][..geo.out_plane]
            .as_ptr();
        let mut oh0 = 0;
        while oh0 < geo.out_h {
            let rows = (geo.out_h - oh0).min(RB);
            let ih0 = (oh0 * SH) as isize - geo.pad_top as isize;
            let block = Block3 {
                geo,
                cols: job.cols,
                // Row ih0, lane 0 of vector 0 at kernel column 0 (possibly
                // out of bounds: only offset with wrapping arithmetic).
                base: x.wrapping_offset(ih0 * geo.in_w as isize - geo.pad_left as isize),
                ih0,
                rows,
                // SAFETY: oh0 < out_h: a row of the plane.
                dy_row: unsafe { dy.add(oh0 * geo.out_w) },
            };
            let inside = rows == RB && ih0 >= 0 && ih0 + span as isize <= geo.in_h as isize;
            // SAFETY: forwarded contract; without CHECK the block has RB
            // rows and reads only real input rows.
            unsafe {
                if inside {
                    block3::<S, RB, SW, SH, false>(s, &block, &mut acc);
                } else {
                    block3::<S, RB, SW, SH, true>(s, &block, &mut acc);
                }
            }
            oh0 += rows;
        }
    }
    let rs = geo.r_len * geo.s_len;
    // A loop, not `array::from_fn`: a closure moving vectors may be left out
    // of line, outside the ISA's target features.
    let mut flat = [s.zero(); 9];
    for (i, f) in flat.iter_mut().enumerate() {
        *f = acc[i / 3][i % 3];
    }
    let mut sums = [0.0f32; 9];
    s.reduce_lanes(&flat, &mut sums);
    for r in 0..3 {
        for c in 0..3 {
            let sum = sums[r * 3 + c];
            let (wr, ws) = geo.weight_tap(r, c);
            let dst = &mut out[job.c * rs + wr * geo.s_len + ws];
            *dst = if job.accumulate { *dst + sum } else { sum };
        }
    }
}

/// One block of output rows of the 3×3 tile.
struct Block3<'a> {
    geo: &'a Geo,
    cols: &'a ColPlan,
    /// Input row `ih0`, lane 0 of vector 0 at kernel column 0 (possibly out
    /// of bounds).
    base: *const f32,
    /// The first input row the block reads (negative in the top padding).
    ih0: isize,
    /// Output rows in the block, `1..=RB`.
    rows: usize,
    /// The block's first output row in the grad-output plane.
    dy_row: *const f32,
}

/// Every vector of one row block into the nine accumulators. `CHECK` skips
/// the input rows outside the input and the tile rows past `b.rows`.
///
/// # Safety
/// As [`weight_three`]; without `CHECK` the block has `RB` rows and every
/// input row it reads is real.
#[inline(always)]
unsafe fn block3<S: Simd, const RB: usize, const SW: usize, const SH: usize, const CHECK: bool>(
    s: S,
    b: &Block3<'_>,
    acc: &mut [[S::V; 3]; 3],
) {
    for (v, cv) in b.cols.vecs.iter().enumerate() {
        let ranges = &b.cols.ranges[v * 3..][..3];
        // SAFETY: forwarded contract; an interior vector reads in bounds in
        // every lane for every kernel column.
        unsafe {
            if cv.interior {
                vector3::<S, RB, SW, SH, CHECK, false>(s, b, cv, ranges, acc);
            } else {
                vector3::<S, RB, SW, SH, CHECK, true>(s, b, cv, ranges, acc);
            }
        }
    }
}

/// One vector of the 3×3 tile over a row block: `RB` grad-output loads,
/// then each input row once per kernel column into every accumulator whose
/// tap meets it.
///
/// # Safety
/// As [`block3`]; `EDGE` is false only for an interior vector.
#[inline(always)]
unsafe fn vector3<
    S: Simd,
    const RB: usize,
    const SW: usize,
    const SH: usize,
    const CHECK: bool,
    const EDGE: bool,
>(
    s: S,
    b: &Block3<'_>,
    cv: &ColVec,
    ranges: &[(usize, usize)],
    acc: &mut [[S::V; 3]; 3],
) {
    let geo = b.geo;
    let mut d = [s.zero(); RB];
    let short = s.mask(0, cv.lanes);
    for (i, d) in d.iter_mut().enumerate() {
        if CHECK && i >= b.rows {
            break;
        }
        // SAFETY: row oh0 + i < out_h (i < rows), lanes ow0..ow0 + lanes ≤
        // out_w: inside the plane; a short vector loads only those lanes.
        *d = unsafe {
            let p = b.dy_row.add(i * geo.out_w + cv.ow0);
            if cv.lanes == S::LANES {
                s.load(p)
            } else {
                s.load_masked(p, 1, short)
            }
        };
    }
    let col = cv.ow0 * SW;
    let in_w = geo.in_w as isize;
    for j in 0..(RB - 1) * SH + 3 {
        if CHECK {
            let ih = b.ih0 + j as isize;
            if ih < 0 || ih >= geo.in_h as isize {
                continue;
            }
        }
        let row = b.base.wrapping_offset(j as isize * in_w).wrapping_add(col);
        for (sc, &(lo, hi)) in ranges.iter().enumerate() {
            let (lo, hi) = if EDGE { (lo, hi) } else { (0, S::LANES) };
            if EDGE && lo == hi {
                continue;
            }
            let p = row.wrapping_add(sc);
            // SAFETY: input row ih0 + j is real (no CHECK: contract; else
            // checked above); for kernel column sc the lanes lo..hi read
            // columns inside 0..in_w (`ranges`; every lane of an interior
            // vector), so they are readable. An edge vector's columns that
            // read in bounds in every lane take the plain load and FMA.
            unsafe {
                if (lo, hi) == (0, S::LANES) {
                    feed3::<S, RB, SW, SH, CHECK, false>(s, p, (lo, hi), &d, j, sc, b.rows, acc);
                } else {
                    feed3::<S, RB, SW, SH, CHECK, true>(s, p, (lo, hi), &d, j, sc, b.rows, acc);
                }
            }
        }
    }
}

/// One input row `j` of a block at kernel column `sc`: loads it (only lanes
/// `lo..hi` with `MASKED`) and adds its products with the grad-output
/// vectors of every tile row whose window covers it.
///
/// # Safety
/// `p[SW·j]` is readable for the lanes `j` in `lo..hi` (every lane without
/// `MASKED`, where `lo..hi` is all of them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn feed3<
    S: Simd,
    const RB: usize,
    const SW: usize,
    const SH: usize,
    const CHECK: bool,
    const MASKED: bool,
>(
    s: S,
    p: *const f32,
    (lo, hi): (usize, usize),
    d: &[S::V; RB],
    j: usize,
    sc: usize,
    rows: usize,
    acc: &mut [[S::V; 3]; 3],
) {
    let m = s.mask(lo, hi);
    // SAFETY: forwarded contract.
    let x = unsafe { load_tap::<S, SW, MASKED>(s, p, SW, m) };
    for (i, &d) in d.iter().enumerate() {
        // Output row i reads input row j through kernel row j − i·SH.
        if j < i * SH || j - i * SH >= 3 || (CHECK && i >= rows) {
            continue;
        }
        let r = j - i * SH;
        acc[r][sc] = fma_tap::<S, MASKED>(s, d, x, acc[r][sc], m);
    }
}

/// Most mask entries (output vectors × kernel taps) a [`FlatPlan`] may
/// hold; larger planes sweep row by row (their rows are long enough that
/// edge vectors are few).
const MAX_FLAT_MASKS: usize = 1 << 15;

/// The flattened sweep of stride-1 layers whose output rows are as wide as
/// the input rows ('same' padding along the width): grad-output pixel `p`
/// (flattened `oh·W + ow`) meets, through tap `(r, s)`, input pixel
/// `p + (r·dh − top)·W + s·dw − left` of the flattened input plane, so a
/// vector of `L` consecutive pixels, whatever rows it spans, reads one
/// contiguous input vector per tap. Per vector and tap a lane mask says
/// which lanes read a real input pixel (inside the input row and plane):
/// the others are never accumulated. Rows of 7, 14 or 56 pixels no longer
/// leave most vectors short.
#[derive(Debug)]
pub(super) struct FlatPlan {
    lanes: usize,
    /// Vectors per plane, `⌈OH·OW/L⌉`.
    vecs: usize,
    /// `masks[v·R·S + tap]`: bit `j` set when lane `j` of vector `v` is a
    /// real output pixel whose tap reads a real input pixel.
    masks: Vec<u32>,
    /// The vectors whose every lane is a real output pixel whose taps all
    /// read real input rows (the plane's rows away from the vertical
    /// padding): their masks depend on the kernel column only, so
    /// `masks[v·R·S + c]` (kernel row 0) is column `c`'s for every row.
    middle: Range<usize>,
}

impl FlatPlan {
    /// The plan for `geo` with `lanes` lanes, or `None` when the flattened
    /// sweep does not apply (strides other than 1, output rows narrower or
    /// wider than input rows), the row width is outside `rows`, or the plane is
    /// large.
    ///
    /// # Errors
    /// [`ConvError::OutOfMemory`] when the masks cannot be allocated.
    fn new(geo: &Geo, lanes: usize, rows: Range<usize>) -> Result<Option<FlatPlan>, ConvError> {
        let taps = geo.r_len * geo.s_len;
        if (geo.stride_h, geo.stride_w) != (1, 1)
            || geo.out_w != geo.in_w
            || !rows.contains(&geo.out_w)
            || lanes > 32
            || geo.r_len > 64
            || geo.s_len > 64
        {
            return Ok(None);
        }
        let vecs = geo.out_plane.div_ceil(lanes);
        let entries = match vecs.checked_mul(taps) {
            Some(n) if n <= MAX_FLAT_MASKS => n,
            _ => return Ok(None),
        };
        let mut masks = try_with_capacity("flat grad-weight plan", entries)?;
        // The output rows (columns) whose input row (column) through kernel
        // row r (column c) is real: one range each, so a vector's mask is
        // built per run of lanes within one output row, not per lane.
        let real = |out: usize, len: usize, offset: usize, pad: usize| {
            let lo = pad.saturating_sub(offset).min(out);
            let hi = (len + pad).saturating_sub(offset).clamp(lo, out);
            lo..hi
        };
        let (rows, cols) = (geo.r_len.min(64), geo.s_len.min(64));
        let mut row_real: [Range<usize>; 64] = std::array::from_fn(|_| 0..0);
        let mut col_real: [Range<usize>; 64] = std::array::from_fn(|_| 0..0);
        for (r, range) in row_real[..rows].iter_mut().enumerate() {
            *range = real(geo.out_h, geo.in_h, r * geo.dil_h, geo.pad_top);
        }
        for (c, range) in col_real[..cols].iter_mut().enumerate() {
            *range = real(geo.out_w, geo.in_w, c * geo.dil_w, geo.pad_left);
        }
        let mut row_bits = [0u32; 64];
        let mut col_bits = [0u32; 64];
        let w = geo.out_w;
        // The output pixel the next vector starts at.
        let (mut oh, mut ow) = (0, 0);
        for v in 0..vecs {
            let first = v * lanes;
            let end = (first + lanes).min(geo.out_plane);
            row_bits[..rows].fill(0);
            col_bits[..cols].fill(0);
            let mut p = first;
            while p < end {
                // Lanes p − first.. hold output row oh from column ow on.
                let run = (w - ow).min(end - p);
                let lane = p - first;
                let ones = |n: usize| ((1u64 << n) - 1) as u32;
                for (bits, range) in row_bits[..rows].iter_mut().zip(&row_real) {
                    if range.contains(&oh) {
                        *bits |= ones(run) << lane;
                    }
                }
                for (bits, range) in col_bits[..cols].iter_mut().zip(&col_real) {
                    let (a, b) = (range.start.max(ow), range.end.min(ow + run));
                    if a < b {
                        *bits |= ones(b - a) << (lane + a - ow);
                    }
                }
                p += run;
                ow += run;
                if ow == w {
                    (oh, ow) = (oh + 1, 0);
                }
            }
            for &rb in &row_bits[..rows] {
                masks.extend(col_bits[..cols].iter().map(|&cb| rb & cb));
            }
        }
        // Output rows where every kernel row reads a real input row, and
        // the whole vectors inside them.
        let rows_real = row_real[..rows]
            .iter()
            .fold(0..geo.out_h, |a, r| a.start.max(r.start)..a.end.min(r.end));
        let first = (rows_real.start * w).div_ceil(lanes);
        let middle = first..(rows_real.end * w / lanes).max(first);
        Ok(Some(FlatPlan {
            lanes,
            vecs,
            masks,
            middle,
        }))
    }
}

/// The flattened tile (see [`FlatPlan`]): `KB` output channels × the job's
/// taps, each accumulator a vector of `L` lanes, swept over the batch and
/// the flattened grad-output plane one vector at a time: `KB` grad-output
/// loads, then per tap one input load feeding `KB` merge-masked FMAs. The
/// input vector is loaded whole when it lies inside the input tensor (lanes
/// outside the tap's mask read neighbouring rows or planes and are never
/// accumulated), and otherwise only over the lanes between the mask's
/// first and last (all inside the channel's plane). Each accumulator sums
/// in a fixed order: images, vectors, then its lanes pairwise.
///
/// # Safety
/// The job and `out` pass [`check_weight_job`] with `flat` its plan;
/// `KB == job.kb`; the job has at most `TB` taps; `S`'s operations are
/// supported by the CPU.
#[inline(always)]
pub(super) unsafe fn weight_flat<S: Simd, const KB: usize, const TB: usize>(
    s: S,
    job: &WeightJob<'_>,
    flat: &FlatPlan,
    out: &mut [f32],
) {
    let geo = job.geo;
    let lanes = S::LANES;
    debug_assert_eq!(flat.lanes, lanes);
    let rs = geo.r_len * geo.s_len;
    let count = job.taps.len().min(TB);
    // Per tap, the offset of the input pixel it reads from the grad-output
    // pixel's flattened index.
    let mut off = [0isize; TB];
    for (i, tap) in job.taps.clone().enumerate().take(TB) {
        let (r, c) = (tap / geo.s_len, tap % geo.s_len);
        let dy = (r * geo.dil_h) as isize - geo.pad_top as isize;
        let dx = (c * geo.dil_w) as isize - geo.pad_left as isize;
        off[i] = dy * geo.in_w as isize + dx;
    }
    let channels_in = geo.groups * geo.cg;
    let channels_out = geo.groups * geo.kg;
    // Whole-vector loads must start in 0..=last of the input tensor.
    let last = job.input.len() as isize - lanes as isize;
    // The vectors whose every tap loads whole: all of them unless the
    // channel's plane is the first or last of the tensor.
    let (min_off, max_off) = (off[..count].iter().min(), off[..count].iter().max());
    let (min_off, max_off) = (*min_off.unwrap_or(&0), *max_off.unwrap_or(&0));
    let cols3 = geo.s_len == 3 && job.taps.start.is_multiple_of(3) && count.is_multiple_of(3);
    let mut acc = [[s.zero(); TB]; KB];
    for n in 0..geo.batch {
        let x_start = (n * channels_in + job.in_c) * geo.in_plane;
        let x = job.input[x_start..][..geo.in_plane].as_ptr();
        let dy = job.grad_output[(n * channels_out + job.k0) * geo.out_plane..]
            [..KB * geo.out_plane]
            .as_ptr();
        // The middle vectors that load whole in every tap take the masked
        // loop; the others (top and bottom rows, the tensor's ends) go one
        // at a time.
        let whole_from = (-min_off - x_start as isize).max(0) as usize;
        let whole_to = last - max_off - x_start as isize;
        let whole =
            whole_from.div_ceil(lanes)..usize::try_from(whole_to).map_or(0, |t| t / lanes + 1);
        let start = flat.middle.start.max(whole.start).min(flat.vecs);
        let mid = start..flat.middle.end.min(whole.end).max(start);
        let mut v = 0;
        while v < flat.vecs {
            if v == mid.start && mid.len() >= 2 {
                let run = FlatMiddle {
                    vecs: mid.clone(),
                    masks: &flat.masks,
                    taps: job.taps.start..job.taps.start + count,
                    rs,
                    off: &off,
                    x,
                    dy,
                    out_plane: geo.out_plane,
                };
                // SAFETY: forwarded contract; the vectors are middle ones
                // of the plan that load whole in every tap (the ranges
                // above). Three columns per kernel row when the job's taps
                // are whole kernel rows of a 3-wide kernel.
                unsafe {
                    match (cols3, count == TB) {
                        (true, true) => flat_middle::<S, KB, TB, 3, true>(s, &run, &mut acc),
                        (true, false) => flat_middle::<S, KB, TB, 3, false>(s, &run, &mut acc),
                        (false, true) => flat_middle::<S, KB, TB, 0, true>(s, &run, &mut acc),
                        (false, false) => flat_middle::<S, KB, TB, 0, false>(s, &run, &mut acc),
                    }
                }
                v = mid.end;
                continue;
            }
            let p = v * lanes;
            let at = (x_start + p) as isize;
            let f = FlatVec {
                p,
                n_lanes: (geo.out_plane - p).min(lanes),
                masks: &flat.masks[v * rs + job.taps.start..][..count],
                off: &off,
                x,
                dy,
                out_plane: geo.out_plane,
            };
            // SAFETY: forwarded contract; WHOLE only where every tap's
            // vector lies inside the input tensor (checked).
            unsafe {
                if at + min_off >= 0 && at + max_off <= last {
                    flat_vector::<S, KB, TB, true>(s, &f, &mut acc);
                } else {
                    flat_vector::<S, KB, TB, false>(s, &f, &mut acc);
                }
            }
            v += 1;
        }
    }
    write_sums(s, job, acc, count, out);
}

/// The middle vectors of the flattened sweep, as [`flat_middle`] reads
/// them.
struct FlatMiddle<'a, const TB: usize> {
    /// The vectors, all middle ones of the plan that load whole.
    vecs: Range<usize>,
    /// The plan's masks.
    masks: &'a [u32],
    /// The job's taps (at most `TB`).
    taps: Range<usize>,
    /// Taps per vector in `masks`, `R·S`.
    rs: usize,
    /// Per tap, the input pixel's offset from the grad-output pixel's index.
    off: &'a [isize; TB],
    /// The channel's input plane.
    x: *const f32,
    /// The first of the `KB` grad-output planes.
    dy: *const f32,
    out_plane: usize,
}

/// The middle vectors into the tile's accumulators, with no per-vector
/// choice of path (the loop that bounds the depthwise sweep): per vector
/// `KB` grad-output loads, then per tap one whole input load feeding `KB`
/// merge-masked FMAs. With `COLS = 3` (the job's taps are whole rows of a
/// 3-wide kernel) the vector's three column masks are loaded once and tap
/// `t` takes column `t mod 3`'s; with `COLS = 0` each tap loads its own.
/// `FULL`: the job has all `TB` taps (a constant trip count). The same sums
/// in the same order as [`flat_vector`].
///
/// # Safety
/// As [`weight_flat`]; every vector of `r.vecs` is a middle vector of the
/// plan whose every tap's input vector lies inside the input tensor;
/// `r.taps` has at most `TB` taps, exactly `TB` with `FULL`, whole kernel
/// rows with `COLS = 3`.
#[inline(always)]
unsafe fn flat_middle<
    S: Simd,
    const KB: usize,
    const TB: usize,
    const COLS: usize,
    const FULL: bool,
>(
    s: S,
    r: &FlatMiddle<'_, TB>,
    acc_out: &mut [[S::V; TB]; KB],
) {
    // A local copy the loop keeps in registers.
    let mut acc = *acc_out;
    let count = if FULL { TB } else { r.taps.len().min(TB) };
    let mut at = [r.x; TB];
    for (a, &o) in at.iter_mut().zip(r.off) {
        *a = r.x.wrapping_offset(o);
    }
    let none = s.mask_bits(0);
    let masks = &r.masks[r.vecs.start * r.rs..r.vecs.end * r.rs];
    for (v, masks) in r.vecs.clone().zip(masks.chunks_exact(r.rs)) {
        let p = v * S::LANES;
        let cols = if COLS == 3 {
            let [a, b, c] = masks[..3] else {
                unreachable!("a 3-wide kernel has three columns")
            };
            [s.mask_bits(a), s.mask_bits(b), s.mask_bits(c)]
        } else {
            [none; 3]
        };
        let mut dyv = [s.zero(); KB];
        for (kk, d) in dyv.iter_mut().enumerate() {
            // SAFETY: a middle vector is L real pixels, so lanes p..p + L of
            // plane kk < KB lie in the grad output.
            *d = unsafe { s.load(r.dy.add(kk * r.out_plane + p)) };
        }
        for (t, &a) in at.iter().enumerate() {
            if !FULL && t >= count {
                break;
            }
            let m = if COLS == 3 {
                cols[t % 3]
            } else {
                s.mask_bits(masks[r.taps.start + t])
            };
            // SAFETY: the tap's input vector lies inside the input tensor
            // (contract); lanes outside its mask are never accumulated.
            let xv = unsafe { s.load(a.wrapping_add(p)) };
            for (acc, &d) in acc.iter_mut().zip(&dyv) {
                acc[t] = s.fma_masked(d, xv, acc[t], m);
            }
        }
    }
    *acc_out = acc;
}

/// One vector of the flattened sweep, as [`flat_vector`] reads it.
struct FlatVec<'a, const TB: usize> {
    /// The vector's first flattened grad-output pixel.
    p: usize,
    /// Real pixels in the vector (`L`, or fewer at the end of the plane).
    n_lanes: usize,
    /// Per tap of the job, the lanes that read a real input pixel.
    masks: &'a [u32],
    /// Per tap, the input pixel's offset from the grad-output pixel's index.
    off: &'a [isize; TB],
    /// The channel's input plane.
    x: *const f32,
    /// The first of the `KB` grad-output planes.
    dy: *const f32,
    out_plane: usize,
}

/// One vector of the flattened sweep into the tile's accumulators (the
/// vectors [`flat_middle`] does not take). `WHOLE`: every tap's input
/// vector lies inside the input tensor (plain loads).
///
/// # Safety
/// As [`weight_flat`]; `f` describes a vector of the plan, `f.masks` has
/// one entry per tap of the job (at most `TB`); `WHOLE` only as described.
#[inline(always)]
unsafe fn flat_vector<S: Simd, const KB: usize, const TB: usize, const WHOLE: bool>(
    s: S,
    f: &FlatVec<'_, TB>,
    acc: &mut [[S::V; TB]; KB],
) {
    let mut dyv = [s.zero(); KB];
    for (kk, d) in dyv.iter_mut().enumerate() {
        // SAFETY: pixels p..p + n_lanes ≤ out_plane of plane kk < KB lie in
        // the grad output (contract); a short vector loads only those lanes.
        *d = unsafe {
            let q = f.dy.add(kk * f.out_plane + f.p);
            if f.n_lanes == S::LANES {
                s.load(q)
            } else {
                s.load_masked(q, 1, s.mask(0, f.n_lanes))
            }
        };
    }
    for t in 0..TB {
        if t >= f.masks.len() {
            break;
        }
        let bits = f.masks[t];
        let q = f.x.wrapping_offset(f.p as isize + f.off[t]);
        // SAFETY: with WHOLE the tap's vector lies inside the input tensor
        // (contract). Otherwise the lanes from the mask's first to its last
        // read flattened input pixels between two real pixels of this
        // channel's plane, so inside the plane; the masked load reads only
        // those (none for an empty mask).
        let xv = unsafe {
            if WHOLE {
                s.load(q)
            } else if bits == 0 {
                continue;
            } else {
                let lo = bits.trailing_zeros() as usize;
                let hi = 32 - bits.leading_zeros() as usize;
                s.load_masked(q, 1, s.mask(lo, hi))
            }
        };
        let m = s.mask_bits(bits);
        for (a, &d) in acc.iter_mut().zip(&dyv) {
            a[t] = s.fma_masked(d, xv, a[t], m);
        }
    }
}

#[cfg(test)]
mod flat_plan_tests {
    use super::{FlatPlan, Geo};
    use crate::gemm::Activation;
    use crate::geometry::{Conv2dParams, Padding};

    /// The plan's masks are the definition, lane by lane: lane `j` of vector
    /// `v` is set for tap `(r, c)` when pixel `v·L + j` is a real output
    /// pixel whose input pixel through that tap is real.
    #[test]
    fn masks_are_the_per_lane_definition() {
        // (H, W, R, S, dilation, top, bottom, left, right)
        let shapes = [
            (56, 56, 3, 3, 1, 1, 1, 1, 1),
            (7, 7, 3, 3, 1, 1, 1, 1, 1),
            (5, 3, 3, 3, 1, 1, 1, 1, 1),
            (14, 14, 5, 5, 2, 4, 4, 4, 4),
            (9, 12, 3, 5, 1, 0, 2, 3, 1),
            (6, 20, 2, 4, 3, 3, 0, 0, 9),
            (1, 40, 1, 7, 1, 0, 0, 3, 3),
            (30, 1, 7, 1, 1, 3, 3, 0, 0),
        ];
        for lanes in [8, 16] {
            for &(h, w, r, s, d, top, bottom, left, right) in &shapes {
                let g = Conv2dParams::new(1, 2, (h, w), 2, (r, s))
                    .dilation(d, d)
                    .padding(Padding::explicit(top, bottom, left, right))
                    .build()
                    .unwrap();
                let g = *g.geometry();
                assert_eq!(g.out_w, w, "the flat sweep needs 'same' widths");
                let geo = Geo::new(&g, Activation::None);
                let plan = FlatPlan::new(&geo, lanes, 0..usize::MAX).unwrap().unwrap();
                let taps = r * s;
                for v in 0..plan.vecs {
                    for tap in 0..taps {
                        let mut want = 0u32;
                        for j in 0..lanes {
                            let p = v * lanes + j;
                            let (oh, ow) = (p / w, p % w);
                            let ih = (oh + tap / s * d) as isize - top as isize;
                            let iw = (ow + tap % s * d) as isize - left as isize;
                            let real = p < g.out_h * w
                                && (0..h as isize).contains(&ih)
                                && (0..w as isize).contains(&iw);
                            want |= u32::from(real) << j;
                        }
                        assert_eq!(
                            plan.masks[v * taps + tap],
                            want,
                            "{h}×{w} {r}×{s} d{d} pads {top},{bottom},{left},{right} \
                             lanes {lanes} vector {v} tap {tap}"
                        );
                    }
                }
            }
        }
    }
}
