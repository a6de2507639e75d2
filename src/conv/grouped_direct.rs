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

use super::im2col::valid_range;
use crate::arch::{clamp_isa, Isa};
use crate::gemm::{Activation, Parallelism};
use crate::geometry::ConvGeometry;
use crate::testing::record_direct_simd_jobs;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

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
pub(super) struct Geo {
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
pub(super) struct ColVec {
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
pub(super) struct ColPlan {
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
pub(super) struct Job<'a> {
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
            "grouped direct: job buffers do not match the geometry"
        );
        #[cfg(test)]
        if let Some(run) = self.test_run {
            run(job, out);
            return;
        }
        record_direct_simd_jobs(self.isa, 1);
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

/// The vector operations the generic kernel is written in, on a zero-sized
/// token that only exists where the CPU supports the ISA (so the arithmetic
/// is safe to call; only memory access is `unsafe`). Every operation is
/// `#[inline(always)]` so that it compiles inside the caller's
/// `#[target_feature]` functions: [`Simd::general`] and [`Simd::three`].
pub(super) trait Simd: Copy {
    /// Lanes per vector.
    const LANES: usize;
    /// A vector of `LANES` floats.
    type V: Copy;
    /// A set of lanes.
    type M: Copy;

    /// [`run_general`] with this ISA's operations, compiled with its target
    /// features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`run_general`] otherwise.
    unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    );

    /// [`run_three`] with this ISA's operations, compiled with its target
    /// features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`run_three`] otherwise.
    unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    );

    /// All zeros.
    fn zero(self) -> Self::V;
    /// `x` in every lane.
    fn splat(self, x: f32) -> Self::V;
    /// Lanes `lo..hi` (`lo ≤ hi ≤ LANES`; empty when equal).
    fn mask(self, lo: usize, hi: usize) -> Self::M;
    /// `a·b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a·b + c` in the lanes of `m`, `c` elsewhere.
    fn fma_masked(self, a: Self::V, b: Self::V, c: Self::V, m: Self::M) -> Self::V;
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `min(max(v, lo), hi)`, NaN passing through (as `clamp_keep_nan`).
    fn clamp(self, v: Self::V, lo: Self::V, hi: Self::V) -> Self::V;

    /// `p[0..LANES]`.
    ///
    /// # Safety
    /// `p[0..LANES]` is readable.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// `p[2·j]` for each lane `j`.
    ///
    /// # Safety
    /// `p[0..2·LANES − 1]` is readable.
    unsafe fn load_stride2(self, p: *const f32) -> Self::V;
    /// `p[stride·j]` for each lane `j`.
    ///
    /// # Safety
    /// Each `p[stride·j]`, `j < LANES`, is readable.
    unsafe fn load_strided(self, p: *const f32, stride: usize) -> Self::V;
    /// `p[stride·j]` in the lanes `j` of `m`, 0 elsewhere; other lanes are
    /// not read.
    ///
    /// # Safety
    /// `p[stride·j]` is readable for each lane `j` of `m` (for stride 2, so
    /// is everything between the first and last of them); `p` itself may lie
    /// outside the allocation (implementations offset it only with wrapping
    /// arithmetic, or let the hardware skip the masked-off lanes).
    unsafe fn load_masked(self, p: *const f32, stride: usize, m: Self::M) -> Self::V;
    /// Writes the first `n` lanes (`1 ≤ n ≤ LANES`) to `p[0..n]`.
    ///
    /// # Safety
    /// `p[0..n]` is writable.
    unsafe fn store(self, p: *mut f32, v: Self::V, n: usize);
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
pub(super) unsafe fn run_job<
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

/// Every tile of one job with the general tile: `KB = job.kb` channels ×
/// `RB` rows × one vector, row blocks swept one vector at a time. `SW` is the
/// horizontal stride when it is 1 or 2, and 0 for any other (read from the
/// geometry).
///
/// # Safety
/// The buffers match the geometry as [`Kernel::run`] checks; `out` holds the
/// unit's `kb` output planes; `KB == job.kb`.
#[inline(always)]
pub(super) unsafe fn run_general<S: Simd, const KB: usize, const RB: usize, const SW: usize>(
    s: S,
    job: &Job<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    let out = out.as_mut_ptr();
    let bias = job.bias.map(|b| {
        let mut v = [0.0f32; KB];
        v.copy_from_slice(&b[..KB]);
        v
    });
    let mut oh0 = 0;
    while oh0 < geo.out_h {
        let rows = (geo.out_h - oh0).min(RB);
        for (v, cv) in job.plan.vecs.iter().enumerate() {
            let t = TileAt::new(job, oh0, rows, v, cv);
            let acc = if cv.interior {
                // SAFETY: forwarded contract; the vector is interior.
                unsafe { tile::<S, KB, RB, SW, false>(s, job, &t) }
            } else {
                // SAFETY: forwarded contract.
                unsafe { tile::<S, KB, RB, SW, true>(s, job, &t) }
            };
            // SAFETY: `out` holds the unit's KB planes (contract).
            unsafe { store_tile(s, geo, &t, &acc, bias.as_ref(), out) };
        }
        oh0 += rows;
    }
}

/// Every tile of a single-channel job with a 3×3 kernel, vertical dilation 1
/// and vertical stride `SH` (1 or 2): row blocks of `RB`, the last, short
/// one with a tile of 4 or 8 rows where that is enough (rows past the end are
/// computed and dropped).
///
/// # Safety
/// As [`run_general`] with `KB = 1`, and the kernel, dilation and stride
/// described.
#[inline(always)]
pub(super) unsafe fn run_three<S: Simd, const RB: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    let out = out.as_mut_ptr();
    let bias = job.bias.map(|b| [b[0]]);
    let mut oh0 = 0;
    while oh0 < geo.out_h {
        let rows = (geo.out_h - oh0).min(RB);
        // SAFETY (all three): forwarded contract; rows ≤ the tile's rows.
        unsafe {
            if rows <= 4 && RB > 4 {
                row_block3::<S, 4, SW, SH>(s, job, oh0, rows, bias.as_ref(), out);
            } else if rows <= 8 && RB > 8 {
                row_block3::<S, 8, SW, SH>(s, job, oh0, rows, bias.as_ref(), out);
            } else {
                row_block3::<S, RB, SW, SH>(s, job, oh0, rows, bias.as_ref(), out);
            }
        }
        oh0 += rows;
    }
}

/// The 3×3 tiles of output rows `oh0..oh0 + rows` (`rows ≤ RB`), one vector
/// at a time, stored through the epilogue.
///
/// # Safety
/// As [`run_three`]; `out` points at the unit's output plane.
#[inline(always)]
unsafe fn row_block3<S: Simd, const RB: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    oh0: usize,
    rows: usize,
    bias: Option<&[f32; 1]>,
    out: *mut f32,
) {
    for (v, cv) in job.plan.vecs.iter().enumerate() {
        let t = TileAt::new(job, oh0, rows, v, cv);
        let acc = if cv.interior {
            // SAFETY: forwarded contract; the vector is interior.
            unsafe { tile3::<S, RB, SW, SH, false>(s, job, &t) }
        } else {
            // SAFETY: forwarded contract.
            unsafe { tile3::<S, RB, SW, SH, true>(s, job, &t) }
        };
        // SAFETY: `out` holds the unit's plane (contract).
        unsafe { store_tile(s, job.geo, &t, &[acc], bias, out) };
    }
}

/// Where one register tile sits.
struct TileAt<'a> {
    /// First output row.
    oh0: usize,
    /// Output rows of the tile, `1..=RB`.
    rows: usize,
    cv: ColVec,
    /// Per kernel column, the lanes that read inside the input row.
    ranges: &'a [(usize, usize)],
}

impl<'a> TileAt<'a> {
    /// The tile of rows `oh0..oh0 + rows` at vector `v` of the plan.
    #[inline(always)]
    fn new(job: &Job<'a>, oh0: usize, rows: usize, v: usize, cv: &ColVec) -> TileAt<'a> {
        let s_len = job.geo.s_len;
        TileAt {
            oh0,
            rows,
            cv: *cv,
            ranges: &job.plan.ranges[v * s_len..(v + 1) * s_len],
        }
    }
}

/// One interior vector load with the stride `SW` stands for.
///
/// # Safety
/// `p[stride·j]` is readable for every lane `j`.
#[inline(always)]
unsafe fn load_interior<S: Simd, const SW: usize>(s: S, p: *const f32, stride: usize) -> S::V {
    // SAFETY: lanes 0..L at stride `stride` are readable (contract); for
    // stride 2 that is the whole run p[0..2L−1], which `load_stride2` reads.
    unsafe {
        match SW {
            1 => s.load(p),
            2 => s.load_stride2(p),
            _ => s.load_strided(p, stride),
        }
    }
}

/// One tap into one accumulator: `acc += w·x` over the lanes the tap reads.
/// `EDGE` loads and accumulates only the lanes of `m`.
///
/// # Safety
/// `EDGE`: `p[stride·j]` is readable for each lane `j` of `m`; otherwise for
/// every lane.
#[inline(always)]
unsafe fn load_tap<S: Simd, const SW: usize, const EDGE: bool>(
    s: S,
    p: *const f32,
    stride: usize,
    m: S::M,
) -> S::V {
    // SAFETY: forwarded contract.
    unsafe {
        if EDGE {
            s.load_masked(p, stride, m)
        } else {
            load_interior::<S, SW>(s, p, stride)
        }
    }
}

/// `acc + w·x`, on the lanes of `m` only for `EDGE`.
#[inline(always)]
fn fma_tap<S: Simd, const EDGE: bool>(s: S, w: S::V, x: S::V, acc: S::V, m: S::M) -> S::V {
    if EDGE {
        s.fma_masked(w, x, acc, m)
    } else {
        s.fma(w, x, acc)
    }
}

/// The general register tile: `KB` channels × `t.rows` rows × one vector,
/// through every input channel and kernel tap. `EDGE` tiles read and
/// accumulate only the in-bounds lanes of each tap; interior tiles read every
/// lane unchecked. Taps in the padding are skipped, never multiplied by zero,
/// as in the reference.
///
/// # Safety
/// As [`run_general`]; `EDGE` is false only for an interior vector.
#[inline(always)]
unsafe fn tile<S: Simd, const KB: usize, const RB: usize, const SW: usize, const EDGE: bool>(
    s: S,
    job: &Job<'_>,
    t: &TileAt<'_>,
) -> [[S::V; RB]; KB] {
    let geo = job.geo;
    // Input column of lane 0 at kernel column 0; negative in the left padding.
    let col0 = (t.cv.ow0 * geo.stride_w) as isize - geo.pad_left as isize;
    let in_h = geo.in_h as isize;
    let weights = &job.weights[..geo.cg * geo.r_len * geo.s_len * KB];
    let mut acc = [[s.zero(); RB]; KB];
    for c in 0..geo.cg {
        let chan = job.input[c * geo.in_plane..(c + 1) * geo.in_plane].as_ptr();
        for r in 0..geo.r_len {
            // Input row of tile row 0 for this kernel row.
            let ih0 = (t.oh0 * geo.stride_h + r * geo.dil_h) as isize - geo.pad_top as isize;
            let ih_last = ih0 + ((t.rows - 1) * geo.stride_h) as isize;
            if ih_last < 0 || ih0 >= in_h {
                continue;
            }
            let row = KernelRow {
                // Lane 0 of tile row 0 at kernel column 0. It may lie outside
                // the channel, so it is only offset with wrapping arithmetic;
                // each access is argued in bounds on its own.
                base: chan.wrapping_offset(ih0 * geo.in_w as isize + col0),
                weights: &weights[(c * geo.r_len + r) * geo.s_len * KB..][..geo.s_len * KB],
                ih0,
            };
            if t.rows == RB && ih0 >= 0 && ih_last < in_h {
                // SAFETY: every row of the tile is in bounds; forwarded contract.
                unsafe { kernel_row::<S, KB, RB, SW, EDGE, false>(s, geo, t, &row, &mut acc) };
            } else {
                // SAFETY: forwarded contract.
                unsafe { kernel_row::<S, KB, RB, SW, EDGE, true>(s, geo, t, &row, &mut acc) };
            }
        }
    }
    acc
}

/// One kernel row of one input channel, as [`kernel_row`] reads it.
struct KernelRow<'a> {
    /// Lane 0 of tile row 0 at kernel column 0 (possibly out of bounds).
    base: *const f32,
    /// `[S][KB]` weights of this kernel row.
    weights: &'a [f32],
    /// Input row of tile row 0.
    ih0: isize,
}

/// Every kernel column of one kernel row into the general tile. `CHECK`
/// skips the tile rows whose input row is outside the input (or past
/// `t.rows`); without it every row must be in bounds.
///
/// # Safety
/// As [`tile`]; without `CHECK`, all `RB` tile rows read input rows inside
/// the channel.
#[inline(always)]
unsafe fn kernel_row<
    S: Simd,
    const KB: usize,
    const RB: usize,
    const SW: usize,
    const EDGE: bool,
    const CHECK: bool,
>(
    s: S,
    geo: &Geo,
    t: &TileAt<'_>,
    row: &KernelRow<'_>,
    acc: &mut [[S::V; RB]; KB],
) {
    let sw = if SW == 0 { geo.stride_w } else { SW };
    let row_step = (geo.stride_h * geo.in_w) as isize;
    let mut ok = [true; RB];
    if CHECK {
        for (i, ok) in ok.iter_mut().enumerate() {
            let ih = row.ih0 + (i * geo.stride_h) as isize;
            *ok = i < t.rows && ih >= 0 && ih < geo.in_h as isize;
        }
    }
    for (si, w_s) in row.weights.chunks_exact(KB).enumerate() {
        let (lo, hi) = if EDGE { t.ranges[si] } else { (0, S::LANES) };
        if lo == hi {
            continue;
        }
        let m = s.mask(lo, hi);
        let p = row.base.wrapping_add(si * geo.dil_w);
        let mut wv = [s.zero(); KB];
        for (w, &x) in wv.iter_mut().zip(w_s) {
            *w = s.splat(x);
        }
        // Lane 0 of tile row i, advanced one input row step per tile row.
        let mut pi = p;
        for (i, &ok) in ok.iter().enumerate() {
            if !CHECK || ok {
                // SAFETY: row i reads an input row inside the channel (no
                // CHECK: contract; else ok[i]); for kernel column si the lanes
                // of m read columns inside 0..in_w (`ranges`; every lane of an
                // interior vector), so they are readable.
                let x = unsafe { load_tap::<S, SW, EDGE>(s, pi, sw, m) };
                for (acc, &w) in acc.iter_mut().zip(&wv) {
                    acc[i] = fma_tap::<S, EDGE>(s, w, x, acc[i], m);
                }
            }
            pi = opaque(pi.wrapping_offset(row_step));
        }
    }
}

/// Runs `$body` with `$i` bound to each of `0..$n` as a literal, for
/// `$n ≤ 18`: a loop the compiler cannot decline to unroll.
macro_rules! unroll_to_17 {
    ($i:ident < $n:expr => $body:block) => {
        unroll_to_17!(@each $i, $n, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17)
    };
    (@each $i:ident, $n:expr, $body:block, $($k:literal)*) => {
        debug_assert!($n <= 18);
        $(
            if $k < $n {
                let $i: usize = $k;
                $body
            }
        )*
    };
}

/// The 3×3 register tile for one output channel and vertical dilation 1:
/// `RB` rows × one vector, vertical stride `SH`. Each input row the block
/// touches is loaded once per kernel column and feeds every output row whose
/// window covers it, with all nine weights in registers.
///
/// # Safety
/// As [`run_three`]; `EDGE` is false only for an interior vector.
#[inline(always)]
unsafe fn tile3<S: Simd, const RB: usize, const SW: usize, const SH: usize, const EDGE: bool>(
    s: S,
    job: &Job<'_>,
    t: &TileAt<'_>,
) -> [S::V; RB] {
    let geo = job.geo;
    debug_assert!(geo.r_len == 3 && geo.s_len == 3 && geo.dil_h == 1);
    debug_assert_eq!(geo.stride_h, SH);
    let col0 = (t.cv.ow0 * geo.stride_w) as isize - geo.pad_left as isize;
    // Input rows the block reads: tile row i with kernel row r reads row
    // ih0 + SH·i + r.
    let span = SH * (RB - 1) + 3;
    let ih0 = (t.oh0 * SH) as isize - geo.pad_top as isize;
    let all_rows = ih0 >= 0 && ih0 + span as isize <= geo.in_h as isize;
    let mut masks = [s.mask(0, S::LANES); 3];
    if EDGE {
        for (m, &(lo, hi)) in masks.iter_mut().zip(t.ranges) {
            *m = s.mask(lo, hi);
        }
    }
    let weights = &job.weights[..geo.cg * 9];
    let mut acc = [s.zero(); RB];
    for c in 0..geo.cg {
        let chan = job.input[c * geo.in_plane..(c + 1) * geo.in_plane].as_ptr();
        let mut w = [[s.zero(); 3]; 3];
        for (w, &x) in w.iter_mut().flatten().zip(&weights[c * 9..c * 9 + 9]) {
            *w = s.splat(x);
        }
        // Lane 0 of the block's first input row at kernel column 0 (possibly
        // out of bounds: only wrapping offsets until a lane is known inside).
        let base = chan.wrapping_offset(ih0 * geo.in_w as isize + col0);
        // Rows past `t.rows` accumulate whatever in-bounds input they meet
        // and are never stored.
        if all_rows {
            // SAFETY: every input row of the block is inside the channel.
            unsafe { rows3::<S, RB, SW, SH, EDGE, false>(s, geo, base, ih0, &w, &masks, &mut acc) };
        } else {
            // SAFETY: forwarded contract.
            unsafe { rows3::<S, RB, SW, SH, EDGE, true>(s, geo, base, ih0, &w, &masks, &mut acc) };
        }
    }
    acc
}

/// The input rows of one channel into a 3×3 tile. `CHECK` skips input rows
/// outside the input; without it all of them must be inside.
///
/// # Safety
/// As [`tile3`]; `base` is lane 0 of input row `ih0` at kernel column 0;
/// without `CHECK`, input rows `ih0..ih0 + SH·(RB−1) + 3` are inside the
/// channel.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows3<
    S: Simd,
    const RB: usize,
    const SW: usize,
    const SH: usize,
    const EDGE: bool,
    const CHECK: bool,
>(
    s: S,
    geo: &Geo,
    base: *const f32,
    ih0: isize,
    w: &[[S::V; 3]; 3],
    masks: &[S::M; 3],
    acc: &mut [S::V; RB],
) {
    let sw = if SW == 0 { geo.stride_w } else { SW };
    let (in_h, in_w, dw) = (geo.in_h as isize, geo.in_w as isize, geo.dil_w);
    let span = SH * (RB - 1) + 3;
    const { assert!(SH * (RB - 1) + 3 <= 18) };
    // Unrolled so that every accumulator index is a constant and the tile
    // stays in registers.
    let mut p = base;
    unroll_to_17!(tt < span => {
        if tt > 0 {
            p = opaque(p.wrapping_offset(in_w));
        }
        let ih = ih0 + tt as isize;
        if !CHECK || (ih >= 0 && ih < in_h) {
            for si in 0..3 {
                // SAFETY: input row ih is inside the channel (contract
                // without CHECK, else checked above), and for kernel column si
                // the lanes of masks[si] (every lane of an interior vector;
                // none when the range is empty) read columns inside 0..in_w
                // (`ranges`).
                let x = unsafe {
                    load_tap::<S, SW, EDGE>(s, p.wrapping_add(si * dw), sw, masks[si])
                };
                for (r, w_r) in w.iter().enumerate() {
                    // Tile row i meets this input row with kernel row r when
                    // SH·i + r == tt.
                    if tt >= r && (tt - r).is_multiple_of(SH) && (tt - r) / SH < RB {
                        let i = (tt - r) / SH;
                        acc[i] = fma_tap::<S, EDGE>(s, w_r[si], x, acc[i], masks[si]);
                    }
                }
            }
        }
    });
}

/// `p`, hidden from the optimiser so that it keeps a running row pointer
/// instead of rebuilding every row's address from spilled products.
#[inline(always)]
fn opaque(p: *const f32) -> *const f32 {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let mut addr = p.addr();
        // SAFETY: an empty asm block that only passes an integer through a
        // register: no memory access, no stack use, no other effect.
        unsafe {
            core::arch::asm!("/* {0} */", inout(reg) addr, options(pure, nomem, nostack, preserves_flags))
        };
        // The same address, with `p`'s provenance.
        p.with_addr(addr)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    p
}

/// Adds the bias, applies the activation and stores the first `t.rows` rows
/// of a tile.
///
/// # Safety
/// `out` points at the unit's `KB` output planes.
#[inline(always)]
unsafe fn store_tile<S: Simd, const KB: usize, const RB: usize>(
    s: S,
    geo: &Geo,
    t: &TileAt<'_>,
    acc: &[[S::V; RB]; KB],
    bias: Option<&[f32; KB]>,
    out: *mut f32,
) {
    for (kk, acc) in acc.iter().enumerate() {
        for (i, &a) in acc.iter().enumerate().take(t.rows) {
            let mut v = a;
            if let Some(b) = bias {
                v = s.add(v, s.splat(b[kk]));
            }
            if let Some((lo, hi)) = geo.clamp {
                v = s.clamp(v, s.splat(lo), s.splat(hi));
            }
            let at = kk * geo.out_plane + (t.oh0 + i) * geo.out_w + t.cv.ow0;
            // SAFETY: channel kk < KB of the unit's planes, row oh0 + i <
            // out_h, lanes ow0..ow0 + lanes ≤ out_w: inside `out` (contract).
            unsafe { s.store(out.add(at), v, t.cv.lanes) };
        }
    }
}

#[cfg(test)]
mod tests;
