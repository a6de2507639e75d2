//! The 3×3 row sweep for single-channel jobs at stride 1 (depthwise
//! layers): a strip of up to `N` vectors across the row, swept down the
//! whole plane with three rows of accumulators in a ring.
//!
//! Each input row is loaded once per kernel column and vector (`3N` loads)
//! and feeds the three output rows whose windows cover it (`9N` FMAs); the
//! oldest of the three is then complete, stored and restarted from the
//! bias. Against the [3×3 register tile](super::three), which covers `RB`
//! rows of one vector and then starts over, the sweep:
//!
//! * keeps `3N` chains of dependent FMAs in flight across `N` vectors, and
//!   an input row's FMAs wait only on the previous row's, where the tile's
//!   rows wait in program order behind one vector's loads;
//! * builds the weights, masks and addresses once per strip, and loads no
//!   halo rows twice: the tile rebuilds them for every block of `RB` rows
//!   and vector, and loads `RB + 2` input rows for `RB` output rows.
//!
//! Loads of a strip with an edge vector (padding at either end, or a short
//! last vector) are whole vectors wherever every lane lies inside the
//! channel's plane (the merge-masked FMAs then drop the lanes outside the
//! row, which hold real input of the neighbouring rows, never padding), and
//! masked only on the rows where a whole vector would leave the plane.
//!
//! The bias is where each accumulator starts, not added after the taps as
//! in the tile: the same sum in another order.
//!
//! Measured against the tile (1 thread AVX-512, Zen 5, plans, GFLOP/s, the
//! tile → the sweep, same build, two runs): 144×56² (MobileNetV2) 93–97 →
//! 127–129, 32×112² 106–108 → 123–124, 192×28² 82–84 → 118–126, 16 planes
//! of 64×56 with no padding (in L2, every vector interior) 127 → 162–165,
//! 384×14² 68–69 → 88–89. It also takes rows from 14 wide from channels in
//! lanes ([`FORWARD_BELOW_SWEEP`](super::lanes::FORWARD_BELOW_SWEEP)).

use super::simd::{fma_tap, opaque, Simd};
use super::{ColVec, Job};

/// Most vectors a strip covers: three accumulators each, beside the nine
/// weights, in 32 vector registers.
pub(super) const MAX_SWEEP_VECS: usize = 4;

/// Whether the sweep takes a 3×3 job at stride 1 (vertical dilation 1,
/// which the caller checks): one input channel, on an ISA with the
/// registers for it.
#[inline(always)]
pub(super) fn sweep_takes<S: Simd>(job: &Job<'_>) -> bool {
    S::SWEEP_VECS > 0 && job.geo.cg == 1
}

/// Every output row of a single-channel 3×3 job at stride 1 and vertical
/// dilation 1: the row split into strips of up to `S::SWEEP_VECS` vectors,
/// each swept down the plane.
///
/// # Safety
/// As [`run_general`](super::run_general) with `KB = 1`; the job has one
/// input channel, a 3×3 kernel, stride 1 and vertical dilation 1.
#[inline(always)]
pub(super) unsafe fn run_sweep3<S: Simd>(s: S, job: &Job<'_>, out: &mut [f32]) {
    let geo = job.geo;
    debug_assert!(geo.r_len == 3 && geo.s_len == 3 && geo.dil_h == 1 && geo.cg == 1);
    debug_assert!(geo.stride_h == 1 && geo.stride_w == 1);
    let out = out.as_mut_ptr();
    let count = job.cols.vecs.len();
    let width = S::SWEEP_VECS.clamp(1, MAX_SWEEP_VECS);
    let mut v0 = 0;
    while v0 < count {
        // Strips as even as the width allows: 7 vectors go 4 + 3, and 9 go
        // 3 + 3 + 3 rather than 4 + 4 + 1.
        let strips_left = (count - v0).div_ceil(width);
        let n = (count - v0).div_ceil(strips_left);
        // SAFETY: (each) forwarded contract; vectors v0..v0 + n exist.
        unsafe {
            match n {
                1 => strip::<S, 1>(s, job, v0, out),
                2 => strip::<S, 2>(s, job, v0, out),
                3 => strip::<S, 3>(s, job, v0, out),
                _ => strip::<S, 4>(s, job, v0, out),
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
unsafe fn strip<S: Simd, const N: usize>(s: S, job: &Job<'_>, v0: usize, out: *mut f32) {
    let vecs: [ColVec; N] = core::array::from_fn(|i| job.cols.vecs[v0 + i]);
    let mut masks = [[s.mask(0, S::LANES); 3]; N];
    for (i, m) in masks.iter_mut().enumerate() {
        for (si, m) in m.iter_mut().enumerate() {
            let (lo, hi) = job.cols.ranges[(v0 + i) * 3 + si];
            *m = s.mask(lo, hi);
        }
    }
    // SAFETY: (both) forwarded contract; an interior strip's every lane
    // reads inside its row for every kernel column.
    unsafe {
        if vecs.iter().all(|cv| cv.interior) {
            sweep::<S, N, false>(s, job, &vecs, &masks, out)
        } else {
            sweep::<S, N, true>(s, job, &vecs, &masks, out)
        }
    }
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
unsafe fn sweep<S: Simd, const N: usize, const EDGE: bool>(
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
    let col: [isize; N] = core::array::from_fn(|i| vecs[i].ow0 as isize - geo.pad_left as isize);
    let reach = (2 * geo.dil_w + S::LANES) as isize;
    let st = Strip::<S, N> {
        chan: job.input[..geo.in_plane].as_ptr(),
        col,
        masks,
        w,
        bias: s.splat(job.bias.map_or(0.0, |b| b[0])),
        span: (col[0], col[N - 1] + reach),
    };
    let clamp = geo.clamp.map(|(lo, hi)| (s.splat(lo), s.splat(hi)));
    // Step t reads input row t − pad_top (when it exists) into output rows
    // t, t − 1 and t − 2 (kernel rows 0, 1 and 2), then stores row t − 2:
    // output row oh lives in ring slot oh mod 3.
    let steps = geo.out_h + 2;
    let mut acc = [[st.bias; N]; 3];
    let mut t = 0;
    macro_rules! step {
        ($k:literal) => {
            if t + $k < steps {
                // SAFETY: forwarded contract.
                unsafe { step::<S, N, EDGE, $k>(s, job, &st, vecs, clamp, t + $k, &mut acc, out) };
            }
        };
    }
    while t < steps {
        step!(0);
        step!(1);
        step!(2);
        t += 3;
    }
}

/// Step `t` of a sweep (`t mod 3 == K`): input row `t − pad_top` into the
/// three accumulator rows that need it, then output row `t − 2` stored and
/// its slot restarted.
///
/// # Safety
/// As [`sweep`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<S: Simd, const N: usize, const EDGE: bool, const K: usize>(
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
    let ih = t as isize - geo.pad_top as isize;
    if ih >= 0 && ih < geo.in_h as isize {
        let start = ih * geo.in_w as isize;
        let row = opaque(st.chan.wrapping_offset(start));
        let loose = start + st.span.0 >= 0 && start + st.span.1 <= geo.in_plane as isize;
        // SAFETY: (both) row ih is inside the plane; every lane a masked
        // load reads is inside the row (the masks), and with `loose` every
        // lane of every whole-vector load is inside the plane (`span`).
        unsafe {
            if !EDGE || loose {
                row_taps::<S, N, EDGE, K, true>(s, geo.dil_w, st, row, acc)
            } else {
                row_taps::<S, N, EDGE, K, false>(s, geo.dil_w, st, row, acc)
            }
        }
    }
    let done = (K + 1) % 3;
    if t >= 2 && t - 2 < geo.out_h {
        let at = (t - 2) * geo.out_w;
        for (cv, &a) in vecs.iter().zip(&acc[done]) {
            let v = match clamp {
                Some((lo, hi)) => s.clamp(a, lo, hi),
                None => a,
            };
            // SAFETY: row t − 2 < out_h, lanes ow0..ow0 + lanes ≤ out_w:
            // inside the unit's plane (contract).
            unsafe { s.store(out.add(at + cv.ow0), v, cv.lanes) };
        }
    }
    acc[done] = [st.bias; N];
}

/// One input row's taps: for each kernel column and vector, one load into
/// the three accumulators whose rows it meets (`K`: the slot of kernel row
/// 0). `WHOLE` loads whole vectors, otherwise only each vector's lanes
/// inside the row.
///
/// # Safety
/// `row` is an input row of the strip's plane; with `WHOLE` every lane of
/// every load lies inside the plane (or, without edges, inside the row);
/// otherwise the lanes of each mask lie inside the row.
#[inline(always)]
unsafe fn row_taps<S: Simd, const N: usize, const EDGE: bool, const K: usize, const WHOLE: bool>(
    s: S,
    dil_w: usize,
    st: &Strip<'_, S, N>,
    row: *const f32,
    acc: &mut [[S::V; N]; 3],
) {
    // Kernel row r feeds output row t − r: slot (K + 3 − r) mod 3.
    let (r0, r1, r2) = (K, (K + 2) % 3, (K + 1) % 3);
    // `v` indexes four arrays, three rows of `acc` among them.
    #[allow(clippy::needless_range_loop)]
    for si in 0..3 {
        for v in 0..N {
            let p = row.wrapping_offset(st.col[v] + (si * dil_w) as isize);
            let m = st.masks[v][si];
            // SAFETY: the contract, for this vector and kernel column.
            let x = unsafe {
                if WHOLE {
                    s.load(p)
                } else {
                    s.load_masked(p, 1, m)
                }
            };
            acc[r0][v] = fma_tap::<S, EDGE>(s, st.w[0][si], x, acc[r0][v], m);
            acc[r1][v] = fma_tap::<S, EDGE>(s, st.w[1][si], x, acc[r1][v], m);
            acc[r2][v] = fma_tap::<S, EDGE>(s, st.w[2][si], x, acc[r2][v], m);
        }
    }
}
