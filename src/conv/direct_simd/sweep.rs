//! The 3×3 row sweep for single-channel jobs (depthwise layers) at stride
//! 1 or 2: a strip of up to `N` vectors across the row, swept down the
//! whole plane with three rows of accumulators in a ring.
//!
//! Each input row is loaded once per kernel column and vector (`3N` loads;
//! at horizontal stride 2 two loads and three shuffles give a vector's
//! three kernel columns) and feeds the output rows whose windows cover it
//! (three at vertical stride 1, one or two at stride 2); the oldest is then
//! complete, stored and restarted from the bias. Against the [3×3 register
//! tile](super::three), which covers `RB` rows of one vector and then
//! starts over, the sweep:
//!
//! * keeps `3N` chains of dependent FMAs in flight across `N` vectors, and
//!   an input row's FMAs wait only on the previous row's, where the tile's
//!   rows wait in program order behind one vector's loads;
//! * builds the weights, masks and addresses once per strip, and loads no
//!   halo rows twice: the tile rebuilds them for every block of `RB` rows
//!   and vector, and loads `SH·(RB − 1) + 3` input rows for `RB` output
//!   rows.
//!
//! Loads of a strip with an edge vector (padding at either end, or a short
//! last vector) are whole vectors wherever every lane lies inside the
//! channel's plane (the merge-masked FMAs then drop the lanes outside the
//! row, which hold real input of the neighbouring rows, never padding), and
//! masked only on the rows where a whole vector would leave it: the last
//! row or two, or on planes narrower than a vector's reach (33 floats at
//! stride 2) most rows, which is one reason planes that small put channels
//! in lanes instead (`lanes_apply`).
//!
//! The bias is where each accumulator starts, not added after the taps as
//! in the tile: the same sum in another order.
//!
//! The weight gradient sweeps the same way ([`weight_sweep3`]): the ring
//! holds grad-output rows instead of accumulators, and each tap keeps one
//! accumulator per vector of the strip (strips of up to two vectors, nine
//! taps each), summed over every image and row.
//!
//! Measured against the tile (1 thread AVX-512, Zen 5, plans, GFLOP/s, the
//! tile → the sweep, same build, two runs): 144×56² (MobileNetV2) 93–97 →
//! 127–139, 32×112² 106–108 → 123–124, 192×28² 82–84 → 118–126, 16 planes
//! of 64×56 with no padding (in L2, every vector interior) 127 → 162–165,
//! 384×14² 68–69 → 88–89; at stride 2, 96×112² 46 → 53–55, 64×64² 52 →
//! 62–63, 32×200×40 39 → 51. It also takes most layers from channels in
//! lanes ([`FORWARD_BELOW_SWEEP`](super::lanes::FORWARD_BELOW_SWEEP) and
//! [`FORWARD_STRIDED_BELOW_SWEEP`](super::lanes::FORWARD_STRIDED_BELOW_SWEEP)).
//!
//! At vertical stride 2 the ring has two rows, not three (an input row
//! meets at most two output rows), and the steps unroll by four. Summing
//! each kernel column in its own accumulator there (to break an output
//! row's chain of nine dependent FMAs into three) measured slower: 44–46
//! against 49–51 in alternating binaries (144×56²/2, 96×112²/2), and 55–57
//! once the unused accumulators were gone from the code.

use super::backward::WeightJob;
use super::simd::{fma_tap, load_interior, opaque, Simd};
use super::{ColPlan, ColVec, Geo, Job};

/// Most vectors a strip covers: three accumulators each, beside the nine
/// weights, in 32 vector registers.
pub(super) const MAX_SWEEP_VECS: usize = 4;

/// Whether the sweep takes a 3×3 job at stride 1 or 2 (vertical dilation
/// 1, which the caller checks): one input channel, on an ISA with the
/// registers for it.
#[inline(always)]
pub(super) fn sweep_takes<S: Simd>(job: &Job<'_>) -> bool {
    S::SWEEP_VECS > 0 && job.geo.cg == 1
}

/// Every output row of a single-channel 3×3 job with vertical dilation 1
/// and stride `SH` × `SW` (each 1 or 2): the row split into strips of up to
/// `S::SWEEP_VECS` vectors, each swept down the plane.
///
/// # Safety
/// As [`run_general`](super::run_general) with `KB = 1`; the job has one
/// input channel, a 3×3 kernel, vertical dilation 1 and that stride.
#[inline(always)]
pub(super) unsafe fn run_sweep3<S: Simd, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    debug_assert!(geo.r_len == 3 && geo.s_len == 3 && geo.dil_h == 1 && geo.cg == 1);
    debug_assert!((geo.stride_h, geo.stride_w) == (SH, SW) && SH <= 2 && SW <= 2);
    let out = out.as_mut_ptr();
    let count = job.cols.vecs.len();
    let width = S::SWEEP_VECS.clamp(1, MAX_SWEEP_VECS);
    let mut v0 = 0;
    while v0 < count {
        // Strips as even as the width allows: 7 vectors go 4 + 3, and 9 go
        // 3 + 3 + 3 rather than 4 + 4 + 1.
        let strips_left = (count - v0).div_ceil(width);
        let n = (count - v0).div_ceil(strips_left);
        // SAFETY: (each) forwarded contract; vectors v0..v0 + n exist. (The
        // guards leave out the strips wider than the ISA's: n ≤ width.)
        unsafe {
            match n {
                2 if width >= 2 => strip::<S, 2, SW, SH>(s, job, v0, out),
                3 if width >= 3 => strip::<S, 3, SW, SH>(s, job, v0, out),
                4.. if width >= 4 => strip::<S, 4, SW, SH>(s, job, v0, out),
                _ => strip::<S, 1, SW, SH>(s, job, v0, out),
            }
        }
        v0 += n;
    }
}

/// One strip of `N` vectors, starting at vector `v0` of the column plan.
///
/// # Safety
/// As [`run_sweep3`]; vectors `v0..v0 + N` exist; `out` points at the
/// unit's output plane.
#[inline(always)]
unsafe fn strip<S: Simd, const N: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    v0: usize,
    out: *mut f32,
) {
    let (vecs, masks) = strip_plan::<S, N>(s, job.cols, v0);
    // SAFETY: (both) forwarded contract; an interior strip's every lane
    // reads inside its row for every kernel column.
    unsafe {
        if vecs.iter().all(|cv| cv.interior) {
            sweep::<S, N, false, SW, SH>(s, job, &vecs, &masks, out)
        } else {
            sweep::<S, N, true, SW, SH>(s, job, &vecs, &masks, out)
        }
    }
}

/// Vectors `v0..v0 + N` of the column plan, and per vector and kernel
/// column the mask of its lanes that read inside the row.
#[inline(always)]
fn strip_plan<S: Simd, const N: usize>(
    s: S,
    cols: &ColPlan,
    v0: usize,
) -> ([ColVec; N], [[S::M; 3]; N]) {
    let vecs: [ColVec; N] = core::array::from_fn(|i| cols.vecs[v0 + i]);
    let mut masks = [[s.mask(0, S::LANES); 3]; N];
    for (i, m) in masks.iter_mut().enumerate() {
        for (si, m) in m.iter_mut().enumerate() {
            let (lo, hi) = cols.ranges[(v0 + i) * 3 + si];
            *m = s.mask(lo, hi);
        }
    }
    (vecs, masks)
}

/// Per vector of a strip, its first input column at kernel column 0 from
/// the row start (negative under left padding), and the strip's
/// [`Strip::span`].
#[inline(always)]
fn strip_columns<S: Simd, const N: usize, const SW: usize>(
    geo: &Geo,
    vecs: &[ColVec; N],
) -> ([isize; N], (isize, isize)) {
    let col: [isize; N] =
        core::array::from_fn(|i| (vecs[i].ow0 * SW) as isize - geo.pad_left as isize);
    let reach = (SW * (S::LANES - 1) + 2 * geo.dil_w + 1) as isize;
    (col, (col[0], col[N - 1] + reach))
}

/// What every row step of a strip reads.
struct Strip<'a, S: Simd, const N: usize> {
    /// The channel's plane.
    chan: *const f32,
    /// Per vector, its first input column at kernel column 0, from the row
    /// start (negative under left padding).
    col: [isize; N],
    /// Per vector and kernel column, the lanes that read inside the row.
    masks: &'a [[S::M; 3]; N],
    /// `[r][s]`.
    w: [[S::V; 3]; 3],
    /// The bias in every lane (zero without one).
    bias: S::V,
    /// Row offsets (from a row's start) of the first and one past the last
    /// float a whole-vector load of the strip reads.
    span: (isize, isize),
}

/// Sweeps one strip down the plane. `EDGE`: some vector of the strip has
/// lanes outside the row for some kernel column.
///
/// # Safety
/// As [`strip`]; without `EDGE`, every vector is interior.
#[inline(always)]
unsafe fn sweep<S: Simd, const N: usize, const EDGE: bool, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    vecs: &[ColVec; N],
    masks: &[[S::M; 3]; N],
    out: *mut f32,
) {
    let geo = job.geo;
    let mut w = [[s.zero(); 3]; 3];
    for (w, &x) in w.iter_mut().flatten().zip(&job.weights[..9]) {
        *w = s.splat(x);
    }
    let (col, span) = strip_columns::<S, N, SW>(geo, vecs);
    let st = Strip::<S, N> {
        chan: job.input[..geo.in_plane].as_ptr(),
        col,
        masks,
        w,
        bias: s.splat(job.bias.map_or(0.0, |b| b[0])),
        span,
    };
    let clamp = geo.clamp.map(|(lo, hi)| (s.splat(lo), s.splat(hi)));
    // Step t reads input row t − pad_top (when it exists) into the output
    // rows (t − r)/SH whose kernel row r meets it, then stores row
    // (t − 2)/SH where that is whole: output row oh lives in ring slot
    // oh mod ring (`ring_len`), and the steps are unrolled by ring·SH so
    // that every slot index is a constant. Slots of the rows before 0
    // (t < r) gather garbage and are restarted before any real row takes
    // them.
    let steps = SH * (geo.out_h - 1) + 3;
    let mut acc = [[st.bias; N]; 3];
    let mut t = 0;
    macro_rules! steps {
        ($($k:literal)*) => {$(
            if $k < ring_len::<SH>() * SH && t + $k < steps {
                // SAFETY: forwarded contract.
                unsafe {
                    step::<S, N, EDGE, SW, SH, $k>(s, job, &st, vecs, clamp, t + $k, &mut acc, out)
                };
            }
        )*};
    }
    while t < steps {
        steps!(0 1 2 3 4 5);
        t += ring_len::<SH>() * SH;
    }
}

/// Rows in the ring at vertical stride `SH`: the rows one input row meets
/// (three at stride 1, two at stride 2).
const fn ring_len<const SH: usize>() -> usize {
    if SH == 1 {
        3
    } else {
        2
    }
}

/// The ring slot of the row kernel row `r` meets at step `t`, where `t ≡ k
/// (mod ring·SH)`, or `None` where `SH` does not divide `t − r`.
const fn slot<const SH: usize>(k: usize, r: usize) -> Option<usize> {
    let period = ring_len::<SH>() * SH;
    let d = (k + period - r) % period;
    if d.is_multiple_of(SH) {
        Some(d / SH)
    } else {
        None
    }
}

/// Step `t` of a sweep (`t mod ring·SH == K`): input row `t − pad_top` into
/// the accumulator rows that need it, then output row `(t − 2)/SH`, where
/// that is whole, stored and its slot restarted.
///
/// # Safety
/// As [`sweep`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<
    S: Simd,
    const N: usize,
    const EDGE: bool,
    const SW: usize,
    const SH: usize,
    const K: usize,
>(
    s: S,
    job: &Job<'_>,
    st: &Strip<'_, S, N>,
    vecs: &[ColVec; N],
    clamp: Option<(S::V, S::V)>,
    t: usize,
    acc: &mut [[S::V; N]; 3],
    out: *mut f32,
) {
    let geo = job.geo;
    if let Some((row, loose)) = input_row(geo, st.chan, st.span, t) {
        // SAFETY: (both) the row is inside the plane; every lane a masked
        // load reads is inside the row (the masks), and with `loose` every
        // lane of every whole-vector load is inside the plane (`span`).
        unsafe {
            if !EDGE || loose {
                row_taps::<S, N, EDGE, SW, SH, K, true>(s, geo.dil_w, st, row, acc)
            } else {
                row_taps::<S, N, EDGE, SW, SH, K, false>(s, geo.dil_w, st, row, acc)
            }
        }
    }
    let Some(done) = (const { slot::<SH>(K, 2) }) else {
        return;
    };
    if t >= 2 && (t - 2) / SH < geo.out_h {
        let at = (t - 2) / SH * geo.out_w;
        for (cv, &a) in vecs.iter().zip(&acc[done]) {
            let v = match clamp {
                Some((lo, hi)) => s.clamp(a, lo, hi),
                None => a,
            };
            // SAFETY: row (t − 2)/SH < out_h, lanes ow0..ow0 + lanes ≤ out_w:
            // inside the unit's plane (contract).
            unsafe { s.store(out.add(at + cv.ow0), v, cv.lanes) };
        }
    }
    acc[done] = [st.bias; N];
}

/// One input row's taps: for each vector and kernel column, one load into
/// the accumulators whose rows it meets (`K`: the step modulo ring·SH).
/// `WHOLE` loads whole vectors, otherwise only each vector's lanes inside
/// the row.
///
/// # Safety
/// `row` is an input row of the strip's plane; with `WHOLE` every lane of
/// every load lies inside the plane (or, without edges, inside the row);
/// otherwise the lanes of each mask lie inside the row.
#[inline(always)]
unsafe fn row_taps<
    S: Simd,
    const N: usize,
    const EDGE: bool,
    const SW: usize,
    const SH: usize,
    const K: usize,
    const WHOLE: bool,
>(
    s: S,
    dil_w: usize,
    st: &Strip<'_, S, N>,
    row: *const f32,
    acc: &mut [[S::V; N]; 3],
) {
    let slots = const { [slot::<SH>(K, 0), slot::<SH>(K, 1), slot::<SH>(K, 2)] };
    if SW == 2 {
        for v in 0..N {
            let p = row.wrapping_offset(st.col[v]);
            // SAFETY: the contract, for this vector.
            let xs = unsafe { load_columns::<S, SW, WHOLE>(s, p, dil_w, &st.masks[v]) };
            for (si, &x) in xs.iter().enumerate() {
                taps::<S, N, EDGE>(s, st, &slots, v, si, x, acc);
            }
        }
        return;
    }
    // Kernel column outermost: consecutive FMAs go to different vectors
    // (1 thread AVX-512, 144×56²: 124 GFLOP/s with the vector outermost,
    // 127–139 so).
    for si in 0..3 {
        for v in 0..N {
            let p = row.wrapping_offset(st.col[v]).wrapping_add(si * dil_w);
            // SAFETY: the contract, for this vector and kernel column.
            let x = unsafe {
                if WHOLE {
                    load_interior::<S, SW>(s, p, SW)
                } else {
                    s.load_masked(p, SW, st.masks[v][si])
                }
            };
            taps::<S, N, EDGE>(s, st, &slots, v, si, x, acc);
        }
    }
}

/// Input row `t − pad_top` of `plane` where it exists, and whether every
/// lane of the strip's whole-vector loads (`span`, from the row's start)
/// stays inside the plane.
#[inline(always)]
fn input_row(
    geo: &Geo,
    plane: *const f32,
    span: (isize, isize),
    t: usize,
) -> Option<(*const f32, bool)> {
    let ih = t as isize - geo.pad_top as isize;
    if ih < 0 || ih >= geo.in_h as isize {
        return None;
    }
    let start = ih * geo.in_w as isize;
    let loose = start + span.0 >= 0 && start + span.1 <= geo.in_plane as isize;
    Some((opaque(plane.wrapping_offset(start)), loose))
}

/// The three kernel columns of one vector whose kernel column 0 starts at
/// `p`: whole vectors with `WHOLE` (at horizontal stride 2 and dilation 1
/// from one pair of loads), otherwise only each column's lanes of `masks`.
///
/// # Safety
/// With `WHOLE` every lane of the three loads is readable; otherwise the
/// lanes of each column's mask.
#[inline(always)]
unsafe fn load_columns<S: Simd, const SW: usize, const WHOLE: bool>(
    s: S,
    p: *const f32,
    dil_w: usize,
    masks: &[S::M; 3],
) -> [S::V; 3] {
    if WHOLE && SW == 2 && dil_w == 1 {
        // SAFETY: the three kernel columns read p[0..2L + 1] (contract).
        return unsafe { s.load_stride2_three(p) };
    }
    // A loop, not `array::from_fn`: a closure moving vectors may be left
    // out of line, outside the ISA's target features.
    let mut xs = [s.zero(); 3];
    for (si, x) in xs.iter_mut().enumerate() {
        let p = p.wrapping_add(si * dil_w);
        // SAFETY: the contract, for this kernel column.
        *x = unsafe {
            if WHOLE {
                load_interior::<S, SW>(s, p, SW)
            } else {
                s.load_masked(p, SW, masks[si])
            }
        };
    }
    xs
}

/// Input vector `x` (vector `v`, kernel column `si`) into the accumulator
/// of each kernel row that meets an output row at this step.
#[inline(always)]
fn taps<S: Simd, const N: usize, const EDGE: bool>(
    s: S,
    st: &Strip<'_, S, N>,
    slots: &[Option<usize>; 3],
    v: usize,
    si: usize,
    x: S::V,
    acc: &mut [[S::V; N]; 3],
) {
    let m = st.masks[v][si];
    for (r, slot) in slots.iter().enumerate() {
        if let &Some(j) = slot {
            acc[j][v] = fma_tap::<S, EDGE>(s, st.w[r][si], x, acc[j][v], m);
        }
    }
}

/// Most vectors a weight-gradient strip covers: nine accumulators each (one
/// per tap) and three grad-output rows, in 32 vector registers.
const MAX_WEIGHT_SWEEP_VECS: usize = 2;

/// The weight gradient of a single-channel 3×3 job with dilation 1 and
/// stride `SH` × `SW` (each 1 or 2), by the same sweep as the forward: per
/// strip of up to two vectors, the grad-output rows ride in the ring (each
/// loaded once), every input row is loaded once per kernel column and
/// vector and meets each grad-output row whose window covers it, and the
/// nine taps' accumulators (one per vector of the strip) sum over every
/// image and row. Each tap then sums its accumulators in a fixed order
/// (strips, then vectors within a strip, then the lanes pairwise), so the
/// result depends on the geometry and the ISA but not on the threads.
///
/// # Safety
/// As [`weight_tile`](super::backward::weight_tile) with `KB = 1`, and the
/// kernel, dilation and strides described; the job holds the nine taps.
#[inline(always)]
pub(super) unsafe fn weight_sweep3<S: Simd, const SW: usize, const SH: usize>(
    s: S,
    job: &WeightJob<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    debug_assert!((geo.r_len, geo.s_len, geo.dil_h, geo.dil_w) == (3, 3, 1, 1));
    debug_assert!((geo.stride_h, geo.stride_w) == (SH, SW) && SH <= 2 && SW <= 2);
    let count = job.cols.vecs.len();
    let mut total = [s.zero(); 9];
    let mut v0 = 0;
    while v0 < count {
        let n = (count - v0).min(MAX_WEIGHT_SWEEP_VECS.min(S::SWEEP_VECS).max(1));
        // SAFETY: (both) forwarded contract; vectors v0..v0 + n exist.
        unsafe {
            if n == 1 || S::SWEEP_VECS < 2 {
                weight_strip::<S, 1, SW, SH>(s, job, v0, &mut total);
            } else {
                weight_strip::<S, 2, SW, SH>(s, job, v0, &mut total);
            }
        }
        v0 += n;
    }
    let mut sums = [0.0f32; 9];
    s.reduce_lanes(&total, &mut sums);
    for (i, &sum) in sums.iter().enumerate() {
        let (wr, ws) = geo.weight_tap(i / 3, i % 3);
        let dst = &mut out[job.c * 9 + wr * 3 + ws];
        *dst = if job.accumulate { *dst + sum } else { sum };
    }
}

/// One strip of `N` vectors from vector `v0`, over every image, added to
/// `total` (per tap, vector by vector).
///
/// # Safety
/// As [`weight_sweep3`]; vectors `v0..v0 + N` exist.
#[inline(always)]
unsafe fn weight_strip<S: Simd, const N: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &WeightJob<'_>,
    v0: usize,
    total: &mut [S::V; 9],
) {
    let (vecs, masks) = strip_plan::<S, N>(s, job.cols, v0);
    // SAFETY: (both) forwarded contract; an interior strip's every lane
    // reads inside its row for every kernel column, and its vectors are
    // whole.
    let acc = unsafe {
        if vecs.iter().all(|cv| cv.interior) {
            weight_sweep::<S, N, false, SW, SH>(s, job, &vecs, &masks)
        } else {
            weight_sweep::<S, N, true, SW, SH>(s, job, &vecs, &masks)
        }
    };
    for acc in &acc {
        for (t, a) in total.iter_mut().zip(acc.iter().flatten()) {
            *t = s.add(*t, *a);
        }
    }
}

/// The strip's accumulators, `[vector][r][s]`, over every image.
///
/// # Safety
/// As [`weight_strip`]; without `EDGE`, every vector is interior.
#[inline(always)]
unsafe fn weight_sweep<
    S: Simd,
    const N: usize,
    const EDGE: bool,
    const SW: usize,
    const SH: usize,
>(
    s: S,
    job: &WeightJob<'_>,
    vecs: &[ColVec; N],
    masks: &[[S::M; 3]; N],
) -> [[[S::V; 3]; 3]; N] {
    let geo = job.geo;
    let (col, span) = strip_columns::<S, N, SW>(geo, vecs);
    let (channels_in, channels_out) = (geo.groups * geo.cg, geo.groups * geo.kg);
    let mut acc = [[[s.zero(); 3]; 3]; N];
    for n in 0..geo.batch {
        let x = &job.input[(n * channels_in + job.in_c) * geo.in_plane..][..geo.in_plane];
        let dy = &job.grad_output[(n * channels_out + job.k0) * geo.out_plane..][..geo.out_plane];
        let ws = WeightStrip::<S, N> {
            x: x.as_ptr(),
            dy: dy.as_ptr(),
            col,
            masks,
            vecs,
            span,
        };
        // Step t reads input row t − pad_top into the taps of kernel row r
        // for each grad-output row (t − r)/SH it meets; grad-output row oh
        // lives in ring slot oh mod ring (`ring_len`), loaded at the step it
        // first meets.
        let steps = SH * (geo.out_h - 1) + 3;
        let mut ring = [[s.zero(); N]; 3];
        let mut t = 0;
        macro_rules! steps {
            ($($k:literal)*) => {$(
                if $k < ring_len::<SH>() * SH && t + $k < steps {
                    // SAFETY: forwarded contract.
                    unsafe {
                        weight_step::<S, N, EDGE, SW, SH, $k>(s, geo, &ws, t + $k, &mut ring, &mut acc)
                    };
                }
            )*};
        }
        while t < steps {
            steps!(0 1 2 3 4 5);
            t += ring_len::<SH>() * SH;
        }
    }
    acc
}

/// What every step of a weight-gradient strip reads, for one image.
struct WeightStrip<'a, S: Simd, const N: usize> {
    /// The image's input plane.
    x: *const f32,
    /// The image's grad-output plane.
    dy: *const f32,
    /// As [`Strip::col`].
    col: [isize; N],
    /// As [`Strip::masks`].
    masks: &'a [[S::M; 3]; N],
    vecs: &'a [ColVec; N],
    /// As [`Strip::span`].
    span: (isize, isize),
}

/// Step `t` of a weight-gradient sweep (`t mod ring·SH == K`): the grad-output
/// row that kernel row 0 meets first into its ring slot, then input row
/// `t − pad_top` into the taps.
///
/// # Safety
/// As [`weight_sweep`]; `ws` holds one image's planes.
#[inline(always)]
unsafe fn weight_step<
    S: Simd,
    const N: usize,
    const EDGE: bool,
    const SW: usize,
    const SH: usize,
    const K: usize,
>(
    s: S,
    geo: &Geo,
    ws: &WeightStrip<'_, S, N>,
    t: usize,
    ring: &mut [[S::V; N]; 3],
    acc: &mut [[[S::V; 3]; 3]; N],
) {
    if let Some(j) = const { slot::<SH>(K, 0) } {
        let oh = t / SH;
        if oh < geo.out_h {
            let start = oh * geo.out_w;
            let whole = !EDGE || start + ws.vecs[N - 1].ow0 + S::LANES <= geo.out_plane;
            for (d, cv) in ring[j].iter_mut().zip(ws.vecs) {
                let p = ws.dy.wrapping_add(start + cv.ow0);
                // SAFETY: row oh < out_h; lanes ow0..ow0 + lanes ≤ out_w are
                // inside it, and with `whole` every lane of the vector is
                // inside the plane (the lanes past the row are never used:
                // the masks hold only lanes below `lanes`).
                *d = unsafe {
                    if whole || cv.lanes == S::LANES {
                        s.load(p)
                    } else {
                        s.load_masked(p, 1, s.mask(0, cv.lanes))
                    }
                };
            }
        }
    }
    let Some((row, loose)) = input_row(geo, ws.x, ws.span, t) else {
        return;
    };
    // Every kernel row that has a grad-output row here has a real one: the
    // rows before 0 (t < 2) and past the end only at the plane's ends.
    let inside = t >= 2 && t / SH < geo.out_h;
    // SAFETY: (all) row ih is inside the plane; every lane a masked load
    // reads is inside the row (the masks), and with `loose` every lane of
    // every whole-vector load is inside the plane (`span`).
    unsafe {
        match (!EDGE || loose, inside) {
            (true, true) => {
                weight_taps::<S, N, EDGE, SW, SH, K, true, false>(s, geo, ws, t, row, ring, acc)
            }
            (true, false) => {
                weight_taps::<S, N, EDGE, SW, SH, K, true, true>(s, geo, ws, t, row, ring, acc)
            }
            (false, true) => {
                weight_taps::<S, N, EDGE, SW, SH, K, false, false>(s, geo, ws, t, row, ring, acc)
            }
            (false, false) => {
                weight_taps::<S, N, EDGE, SW, SH, K, false, true>(s, geo, ws, t, row, ring, acc)
            }
        }
    }
}

/// One input row into the taps: for each vector and kernel column, one
/// load, and per kernel row `r` that meets a grad-output row here, one FMA
/// with that row into tap `(r, s)`. `WHOLE` as in [`row_taps`]; `CHECK`
/// skips the kernel rows whose grad-output row is outside the plane.
///
/// # Safety
/// As [`row_taps`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weight_taps<
    S: Simd,
    const N: usize,
    const EDGE: bool,
    const SW: usize,
    const SH: usize,
    const K: usize,
    const WHOLE: bool,
    const CHECK: bool,
>(
    s: S,
    geo: &Geo,
    ws: &WeightStrip<'_, S, N>,
    t: usize,
    row: *const f32,
    ring: &[[S::V; N]; 3],
    acc: &mut [[[S::V; 3]; 3]; N],
) {
    let slots = const { [slot::<SH>(K, 0), slot::<SH>(K, 1), slot::<SH>(K, 2)] };
    // With CHECK, the kernel rows whose grad-output row (t − r)/SH is real.
    let real: [bool; 3] = core::array::from_fn(|r| !CHECK || (t >= r && (t - r) / SH < geo.out_h));
    for v in 0..N {
        let p = row.wrapping_offset(ws.col[v]);
        // SAFETY: the contract, for this vector.
        let xs = unsafe { load_columns::<S, SW, WHOLE>(s, p, 1, &ws.masks[v]) };
        for (si, &x) in xs.iter().enumerate() {
            let m = ws.masks[v][si];
            for (r, slot) in slots.iter().enumerate() {
                if let &Some(j) = slot {
                    if real[r] {
                        acc[v][r][si] = fma_tap::<S, EDGE>(s, ring[j][v], x, acc[v][r][si], m);
                    }
                }
            }
        }
    }
}
