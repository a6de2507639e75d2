//! Channels in lanes, for depthwise layers on small or strided planes.
//!
//! With pixels in lanes (the rest of this module), a 7² or 14² plane is a
//! handful of vectors, most of them at an edge and all of them one job's
//! worth of setup, and a horizontal stride of 2 makes every input vector a
//! de-interleaving load. Here a block of `L` depthwise channels of one
//! image is transposed instead (the ISA's `L × L` transposing load), so
//! that each pixel's `L` channels are one aligned vector of a workspace:
//!
//! * **Forward** ([`forward_lanes`]): per output pixel, one FMA per tap of
//!   the tap's weight vector (the block's `L` weights of that tap) with the
//!   input pixel the tap reads, `P` pixels at a time so that `P`
//!   accumulators hide the FMA latency and each weight vector (held in
//!   registers for a 3×3 kernel) feeds `P` FMAs; then the bias, the
//!   activation, and the block's output pixels transposed back into its
//!   planes. Any stride costs the same: a strided tap is just another
//!   pixel's vector.
//! * **Weight gradient** (`backward.rs`, `weight_lanes`): per output pixel
//!   one FMA per tap into that tap's accumulator, lane `j` summing channel
//!   `j`: no horizontal sum at the end.
//!
//! A tap whose input pixel is padding is skipped for that pixel, in every
//! lane at once (the lanes are channels, which share the geometry): no
//! masks, and padding is never multiplied, as in the reference. The
//! forward takes the pixels in groups that share their real taps (a
//! [`Schedule`], built once per plan), each group's taps with no checks.
//!
//! Which layers: [`lanes_apply`]. Measured: the table in the module
//! documentation of `backward.rs` for the weight gradient, [`forward_lanes`]
//! for the forward.

use super::simd::Simd;
use super::Geo;
use crate::conv::scratch::{line_offset, LINE_FLOATS};
use crate::conv::try_with_capacity;
use crate::ConvError;
use std::ops::Range;

/// Which depthwise layers put channels in lanes, by the width of their
/// output rows: [`forward_rule`] or [`grad_weight_rule`].
#[derive(Clone, Copy, Debug)]
pub(super) struct LanesRule {
    /// Rows narrower than this.
    pub(super) below: usize,
    /// And every strided layer, whatever its rows.
    pub(super) strided: bool,
}

/// Whether a depthwise layer puts channels in lanes: one input and one
/// output channel per group, output rows the `rule` takes (the layers where
/// pixels in lanes lose to per-job and edge work), and the block's two
/// transposed planes within 256 KiB (half the smallest L2 of the CPUs the
/// crate is measured on, so that the block stays in L2 while its taps sweep
/// it). `lanes` is the ISA's `L`.
pub(super) fn lanes_apply(geo: &Geo, lanes: usize, rule: LanesRule) -> bool {
    let bytes = (geo.in_plane + geo.out_plane)
        .saturating_mul(lanes)
        .saturating_mul(std::mem::size_of::<f32>());
    let small = geo.out_w < rule.below;
    let strided = rule.strided && (geo.stride_h > 1 || geo.stride_w > 1);
    geo.cg == 1 && geo.kg == 1 && (small || strided) && bytes <= LANES_BYTES
}

/// The most bytes a block's two transposed planes may take: half the
/// smallest L2 of the CPUs the crate is measured on.
const LANES_BYTES: usize = 256 << 10;

/// The weight gradient's stride-1 rows narrower than this put channels in
/// lanes. Rows of 28 and 56 keep pixels in lanes: 1 thread AVX-512,
/// GFLOP/s, channels in lanes against the flattened sweep, 49 against 53
/// on 192×28², 55 against 65 on 144×56²; rows of 14 gain (384×14², 27 →
/// 44–51).
pub(super) const GRAD_WEIGHT_BELOW: usize = 16;

/// As [`GRAD_WEIGHT_BELOW`] for the 3×3 layers the kernel's
/// [row sweep](super::sweep) takes, at any stride (strided layers no longer
/// go in lanes whatever their width). 1 thread AVX-512, Zen 5, GFLOP/s,
/// channels in lanes → the sweep, two runs: 512×8² 27–29 → 26–27, 384×10²
/// 30–31 → 38–39, 384×12² 30–33 → 49–52, 384×14² 26–33 → 62–64; at stride
/// 2, rows of 7 (576×14²) 22–23 → 15, of 10 (384×20²) 22–24 → 20–25, of 12
/// (384×24²) 22–23 → 26–31, of 14 (576×28²) 21–22 → 37–38, of 28 (144×56²,
/// 192×56²) 20–24 → 48–49.
pub(super) const GRAD_WEIGHT_BELOW_SWEEP: usize = 10;

/// The [`LanesRule`] of the weight gradient: [`GRAD_WEIGHT_BELOW_SWEEP`]
/// where the kernel sweeps (`sweeps`: it has the row sweep and the layer is
/// 3×3 with dilation 1 and strides up to 2), else [`GRAD_WEIGHT_BELOW`] and
/// every strided layer.
pub(super) fn grad_weight_rule(sweeps: bool) -> LanesRule {
    if sweeps {
        LanesRule {
            below: GRAD_WEIGHT_BELOW_SWEEP,
            strided: false,
        }
    } else {
        LanesRule {
            below: GRAD_WEIGHT_BELOW,
            strided: true,
        }
    }
}

/// The forward's stride-1 rows narrower than this put channels in lanes
/// where the per-channel jobs run on the 3×3 tile (see [`forward_rule`]).
pub(super) const FORWARD_BELOW: usize = 22;

/// As [`FORWARD_BELOW`] where single-channel 3×3 jobs take the
/// [row sweep](super::sweep), which keeps pixels in lanes ahead down to
/// rows of 14 (1 thread AVX-512, Zen 5, plans, GFLOP/s, channels in lanes
/// → the sweep, same build, two runs): 3×3 512×8² 77–78 → 35–37,
/// 384×10² 79–80 → 57–58, 384×12² 81–82 → 75, 384×14² 77 → 88–89,
/// 256×16² 76 → 104–105, 256×20² 71 → 89–90, 256×24² 71 → 105–109.
pub(super) const FORWARD_BELOW_SWEEP: usize = 14;

/// As [`FORWARD_BELOW_SWEEP`] for the strided layers the sweep takes
/// (strides up to 2), which otherwise all put channels in lanes. 1 thread
/// AVX-512, Zen 5, plans, GFLOP/s, channels in lanes → the sweep, two runs,
/// by the width of the output rows: 7 (576×14²/2) 45 → 19, 10 (384×20²/2)
/// 40–41 → 32, 12 (384×24²/2) 36–37 → 40, 14 (576×28²/2) 32 → 47, 28
/// (192×56²/2) 32–34 → 54–55.
pub(super) const FORWARD_STRIDED_BELOW_SWEEP: usize = 12;

/// The [`LanesRule`] of the forward. Where the kernel has the row sweep
/// (`sweeps`) and the layer is one it takes (3×3, vertical dilation 1,
/// strides up to 2): rows narrower than [`FORWARD_BELOW_SWEEP`], or at a
/// stride [`FORWARD_STRIDED_BELOW_SWEEP`]. Otherwise every strided layer,
/// and rows narrower than [`FORWARD_BELOW`] for kernels up to 3 wide, any
/// row for wider ones (within the workspace bound). Pixels in lanes pay per row for the vectors at its
/// edges, and a wider kernel has more of them; channels in lanes pay a
/// transpose per pixel whatever the kernel. Measured with the 3×3 tile (1
/// thread AVX-512, Zen 5, plans, GFLOP/s, pixels in lanes → channels in
/// lanes, two alternating runs): 3×3 384×14² 36–54 → 45–59, 256×20² 36–54
/// → 57–59, 256×24² 65–69 → 57–61, 192×28² 68–70 → 48–56; 5×5 480×14²
/// 27–34 → 64–84, 240×28² 30–38 → 83–100; 7×7 768×14² 46–48 → 100–111,
/// 384×28² 48–50 → 128–133.
pub(super) fn forward_rule(geo: &Geo, sweeps: bool) -> LanesRule {
    let swept = sweeps
        && (geo.r_len, geo.s_len, geo.dil_h) == (3, 3, 1)
        && geo.stride_h <= 2
        && geo.stride_w <= 2;
    if swept {
        let strided = geo.stride_h > 1 || geo.stride_w > 1;
        return LanesRule {
            below: if strided {
                FORWARD_STRIDED_BELOW_SWEEP
            } else {
                FORWARD_BELOW_SWEEP
            },
            strided: false,
        };
    }
    LanesRule {
        below: if geo.s_len > 3 {
            usize::MAX
        } else {
            FORWARD_BELOW
        },
        strided: true,
    }
}

/// Floats of the workspace one block needs for `lanes` lanes: both planes
/// transposed, and room to start them on a 64-byte line.
pub(super) fn workspace_len(geo: &Geo, lanes: usize) -> Option<usize> {
    (geo.in_plane + geo.out_plane)
        .checked_mul(lanes)?
        .checked_add(LINE_FLOATS)
}

/// The part of `work` (from [`workspace_len`]) that starts on a 64-byte
/// line, `(in_plane + out_plane)·L` floats.
pub(super) fn aligned<'a>(work: &'a mut [f32], geo: &Geo, lanes: usize) -> &'a mut [f32] {
    let skip = line_offset(work);
    &mut work[skip..][..(geo.in_plane + geo.out_plane) * lanes]
}

/// `dst[p·L + j] = src[j·lds + p]` for the `rows ≤ L` planes of `src` and
/// their first `len` pixels: `L × L` blocks through the ISA's transposing
/// load where all `L` rows exist, element by element otherwise. Lanes past
/// `rows` are left as they were.
///
/// # Safety
/// `src[j·lds + p]` is readable and `dst[p·L + j]` writable for `j < rows`,
/// `p < len`, and `dst` holds `len·L` floats.
#[inline(always)]
pub(super) unsafe fn planes_to_lanes<S: Simd>(
    s: S,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    dst: *mut f32,
) {
    let l = S::LANES;
    let whole = if rows == l { len / l * l } else { 0 };
    let mut v = [s.zero(); 16];
    let v = &mut v[..l];
    for p in (0..whole).step_by(l) {
        // SAFETY: rows == L and p + L ≤ len: every element read exists
        // (contract), and pixels p..p + L of dst are writable.
        unsafe {
            s.load_transposed(src.add(p), lds, v);
            for (i, &x) in v.iter().enumerate() {
                s.store(dst.add((p + i) * l), x, l);
            }
        }
    }
    for p in whole..len {
        for j in 0..rows {
            // SAFETY: j < rows, p < len (contract).
            unsafe { *dst.add(p * l + j) = *src.add(j * lds + p) };
        }
    }
}

/// [`planes_to_lanes`] into a plane whose rows are `pitch ≥ width` pixels
/// apart: source pixel `p` (of rows `width` long) goes to pixel
/// `(p / width)·pitch + p % width` of `dst`. (The step to the next pixel
/// checks for a row's end; [`planes_to_lanes`], contiguous, does without:
/// with it, 576×14² 3×3/2 lost 3–10%.)
///
/// # Safety
/// `src[j·lds + p]` is readable for `j < rows`, `p < len`; `dst` holds the
/// pixels those go to, `L` floats each.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn planes_to_padded_lanes<S: Simd>(
    s: S,
    src: *const f32,
    lds: usize,
    rows: usize,
    len: usize,
    width: usize,
    pitch: usize,
    dst: *mut f32,
) {
    let l = S::LANES;
    let whole = if rows == l { len / l * l } else { 0 };
    let mut v = [s.zero(); 16];
    let v = &mut v[..l];
    // The destination pixel of source pixel p, stepped without divisions.
    let (mut at, mut col) = (0usize, 0usize);
    let mut next = || {
        let here = at;
        col += 1;
        at += 1;
        if col == width {
            col = 0;
            at += pitch - width;
        }
        here
    };
    for p in (0..whole).step_by(l) {
        // SAFETY: rows == L and p + L ≤ len: every element read exists
        // (contract).
        unsafe { s.load_transposed(src.add(p), lds, v) };
        for &x in v.iter() {
            // SAFETY: the pixel source p + i goes to is writable (contract).
            unsafe { s.store(dst.add(next() * l), x, l) };
        }
    }
    for p in whole..len {
        let to = next();
        for j in 0..rows {
            // SAFETY: j < rows, p < len (contract).
            unsafe { *dst.add(to * l + j) = *src.add(j * lds + p) };
        }
    }
}

/// The inverse of [`planes_to_lanes`]: `dst[j·ldd + p] = src[p·L + j]` for
/// the first `rows ≤ L` lanes and `len` pixels.
///
/// # Safety
/// `src` holds `len·L` floats; `dst[j·ldd + p]` is writable for `j < rows`,
/// `p < len`.
#[inline(always)]
pub(super) unsafe fn lanes_to_planes<S: Simd>(
    s: S,
    src: *const f32,
    rows: usize,
    len: usize,
    dst: *mut f32,
    ldd: usize,
) {
    let l = S::LANES;
    let whole = len / l * l;
    let mut v = [s.zero(); 16];
    let v = &mut v[..l];
    for p in (0..whole).step_by(l) {
        // SAFETY: pixels p..p + L of src exist (p + L ≤ len); the first
        // `rows` output planes are writable at p..p + L (contract).
        unsafe {
            s.load_transposed(src.add(p * l), l, v);
            for (j, &x) in v.iter().enumerate().take(rows) {
                s.store(dst.add(j * ldd + p), x, l);
            }
        }
    }
    for p in whole..len {
        for j in 0..rows {
            // SAFETY: j < rows, p < len (contract).
            unsafe { *dst.add(j * ldd + p) = *src.add(p * l + j) };
        }
    }
}

/// Where each tap of a block of taps reads, and which output pixels read
/// only real input pixels through all of them.
pub(super) struct TapGrid<const TB: usize> {
    /// Window offsets `r·dh` and `s·dw` of each tap.
    pub(super) dr: [usize; TB],
    pub(super) dc: [usize; TB],
    /// Each tap's input vector's offset, in floats, from the vector of the
    /// unpadded pixel `(oh·σh, ow·σw)`.
    pub(super) off: [isize; TB],
    /// Output columns whose every tap reads a real input column.
    pub(super) cols: Range<usize>,
    /// Least and greatest vertical offsets.
    dr_lo: usize,
    dr_hi: usize,
}

impl<const TB: usize> TapGrid<TB> {
    /// The grid of the taps `taps` (flattened `r·S + s` in window order, at
    /// most `TB` of them) with `l` lanes per pixel.
    #[inline(always)]
    pub(super) fn new(geo: &Geo, taps: Range<usize>, l: usize) -> TapGrid<TB> {
        let (mut dr, mut dc, mut off) = ([0usize; TB], [0usize; TB], [0isize; TB]);
        let count = taps.len().min(TB);
        for (i, tap) in taps.enumerate().take(TB) {
            dr[i] = tap / geo.s_len * geo.dil_h;
            dc[i] = tap % geo.s_len * geo.dil_w;
            off[i] = ((dr[i] * geo.in_w + dc[i]) * l) as isize;
        }
        let lo_hi = |v: &[usize]| {
            let lo = v.iter().copied().min().unwrap_or(0);
            (lo, v.iter().copied().max().unwrap_or(0))
        };
        let (dr_lo, dr_hi) = lo_hi(&dr[..count]);
        let (dc_lo, dc_hi) = lo_hi(&dc[..count]);
        let (sw, pl) = (geo.stride_w, geo.pad_left);
        let ow_lo = pl.saturating_sub(dc_lo).div_ceil(sw).min(geo.out_w);
        let ow_hi = (geo.in_w + pl)
            .saturating_sub(dc_hi)
            .div_ceil(sw)
            .clamp(ow_lo, geo.out_w);
        TapGrid {
            dr,
            dc,
            off,
            cols: ow_lo..ow_hi,
            dr_lo,
            dr_hi,
        }
    }

    /// Whether output row `oh` reads a real input row through every tap.
    #[inline(always)]
    pub(super) fn row_real(&self, geo: &Geo, oh: usize) -> bool {
        let ih0 = (oh * geo.stride_h) as isize - geo.pad_top as isize;
        ih0 + self.dr_lo as isize >= 0 && ih0 + (self.dr_hi as isize) < geo.in_h as isize
    }

    /// The input pixel tap `t` reads for output pixel `(oh, ow)`, if real.
    #[inline(always)]
    pub(super) fn pixel(&self, geo: &Geo, t: usize, oh: usize, ow: usize) -> Option<usize> {
        let ih = (oh * geo.stride_h + self.dr[t]) as isize - geo.pad_top as isize;
        let iw = (ow * geo.stride_w + self.dc[t]) as isize - geo.pad_left as isize;
        let real = ih >= 0 && ih < geo.in_h as isize && iw >= 0 && iw < geo.in_w as isize;
        real.then(|| ih as usize * geo.in_w + iw as usize)
    }

    /// The vector offset of the unpadded pixel `(oh·σh, ow·σw)` (possibly
    /// outside the plane; only offset with wrapping arithmetic).
    #[inline(always)]
    pub(super) fn origin(&self, geo: &Geo, oh: usize, ow: usize, l: usize) -> isize {
        let ih0 = (oh * geo.stride_h) as isize - geo.pad_top as isize;
        let iw0 = (ow * geo.stride_w) as isize - geo.pad_left as isize;
        (ih0 * geo.in_w as isize + iw0) * l as isize
    }
}

/// One forward job: a block of up to `L` depthwise channels of one image.
pub(super) struct LanesForward<'a> {
    pub(super) geo: &'a Geo,
    /// The block's input planes, `[channels][H·W]`.
    pub(super) input: &'a [f32],
    /// The block's weights, `[R·S][L]` in window order (mirrored for true
    /// convolution), lanes past `channels` zero.
    pub(super) weights: &'a [f32],
    /// The block's biases, lanes past `channels` zero.
    pub(super) bias: [f32; 16],
    /// Channels in the block, `1..=L`.
    pub(super) channels: usize,
    pub(super) lanes: usize,
    /// How the block's pixels are laid out and visited ([`LanesPlan::new`]
    /// of this geometry and `lanes`).
    pub(super) plan: &'a LanesPlan,
}

/// Panics unless `job`, `work` and `out` are what [`forward_lanes`] reads
/// and writes.
pub(super) fn check_forward(job: &LanesForward<'_>, work: &[f32], out: &[f32]) {
    let geo = job.geo;
    assert!(
        (1..=job.lanes).contains(&job.channels)
            && job.lanes <= 16
            && job.input.len() >= job.channels * geo.in_plane
            && job.weights.len() >= geo.r_len * geo.s_len * job.lanes
            && out.len() >= job.channels * geo.out_plane
            && job.plan.fits(geo, job.lanes, work.len()),
        "direct SIMD: lanes job does not match the geometry"
    );
}

/// Output pixels per group of the forward ([`Schedule`]).
const P: usize = 8;

/// The forward of one block (see the module documentation), into `out`
/// (the block's `channels` output planes). `TB` taps have their weight
/// vectors held in registers when the kernel has exactly that many (`TB =
/// 9`: 3×3); other kernels load them per pixel group.
///
/// Measured (1 thread AVX-512, Zen 5, shared machine, GFLOP/s of the
/// planned forward, the two builds alternating, three runs each; pixels in
/// lanes → channels in lanes): 960×7² 3×3 21–24 → 37–42, 576×14² 3×3/2
/// 13 → 23–33, 192×28² 3×3/2 24–28 → 28–32, 144×56² 3×3/2 21–22 → 25–30,
/// 672×7² 5×5 17–19 → 29–31, 240×28² 5×5/2 20–24 → 33–44. In one run
/// against onnxruntime 1.32 (`vs_onnxruntime.py`), 960×7² went from 0.66×
/// to 1.02–1.9× and 576×14²/2 from 0.59× to 1.1–2.2× (ORT's own figure
/// moved by half between runs). Edge pixels were then summed one at a
/// time, one FMA chain each; running them in groups by class
/// ([`Schedule`]) gave, the same way (1 thread, two runs each, GFLOP/s):
/// AVX-512 672×7² 5×5 38–39 → 57–58, 960×7² 3×3 40 → 52, 576×14² 3×3/2
/// 29–31 → 41–43, 192×28² 3×3/2 29–31 → 32–34; AVX2 the same layers 18 →
/// 28, 15–16 → 21, 9.6 → 12.3–12.6, 11.4 → 12.5–12.9. Groups of 8 pixels
/// against 4: 3×3 on 7² 45 → 51–54, 5×5 on 7² 58–60 → 52–56 (more of
/// its classes are small), hence 4 for a class's last group of up to 4.
///
/// # Safety
/// `job`, `work` and `out` pass [`check_forward`]; `job.lanes == S::LANES`;
/// `S`'s operations are supported by the CPU.
#[inline(always)]
pub(super) unsafe fn forward_lanes<S: Simd, const TB: usize>(
    s: S,
    job: &LanesForward<'_>,
    work: &mut [f32],
    out: &mut [f32],
) {
    let geo = job.geo;
    let l = S::LANES;
    debug_assert_eq!(job.lanes, l);
    let taps = geo.r_len * geo.s_len;
    let plan = job.plan;
    let sweep_geo = &plan.sweep;
    let (x, y) = work.split_at_mut(sweep_geo.in_plane * l);
    let (top, left) = plan.padded.unwrap_or((0, 0));
    if plan.padded.is_none() {
        // SAFETY: the block's planes hold channels·plane floats and the
        // workspace plane·L (contract).
        unsafe {
            planes_to_lanes(
                s,
                job.input.as_ptr(),
                geo.in_plane,
                job.channels,
                geo.in_plane,
                x.as_mut_ptr(),
            );
        }
    } else {
        // SAFETY: the block's planes hold channels·plane floats; the
        // workspace holds the sweep's plane, in which real row `ih` is row
        // `top + ih` from column `left` (contract: `plan` fits).
        unsafe {
            planes_to_padded_lanes(
                s,
                job.input.as_ptr(),
                geo.in_plane,
                job.channels,
                geo.in_plane,
                geo.in_w,
                sweep_geo.in_w,
                x.as_mut_ptr().add((top * sweep_geo.in_w + left) * l),
            );
        }
    }
    let x = x.as_ptr();
    let w = job.weights.as_ptr();
    // SAFETY: the job's bias holds 16 ≥ L floats.
    let bias = unsafe { s.load(job.bias.as_ptr()) };
    let clamp = geo.clamp.map(|(lo, hi)| (s.splat(lo), s.splat(hi)));
    let finish = |v: S::V| {
        let v = s.add(v, bias);
        match clamp {
            Some((lo, hi)) => s.clamp(v, lo, hi),
            None => v,
        }
    };
    let schedule = &plan.schedule;
    if taps == TB {
        let mut wv = [s.zero(); TB];
        for (t, v) in wv.iter_mut().enumerate() {
            // SAFETY: t < R·S: inside the block's weights (contract).
            *v = unsafe { s.load(w.add(t * l)) };
        }
        let grid = TapGrid::<TB>::new(sweep_geo, 0..taps, l);
        // SAFETY: forwarded contract.
        unsafe { sweep::<S, TB, true>(s, sweep_geo, schedule, &grid, &wv, w, x, y, &finish) };
    } else {
        let grid = TapGrid::<TB>::new(sweep_geo, 0..0, l);
        let wv = [s.zero(); TB];
        // SAFETY: forwarded contract.
        unsafe { sweep::<S, TB, false>(s, sweep_geo, schedule, &grid, &wv, w, x, y, &finish) };
    }
    // SAFETY: y holds out_plane·L floats; the block's `channels` output
    // planes are `out` (contract).
    unsafe {
        lanes_to_planes(
            s,
            y.as_ptr(),
            job.channels,
            geo.out_plane,
            out.as_mut_ptr(),
            geo.out_plane,
        );
    }
}

/// Every output pixel of a block into `y` (`[OH·OW][L]`): the schedule's
/// groups in order, each `P` pixels with `P` accumulators through its
/// rectangle of taps, with no checks. `HELD`: the `TB` weight vectors are
/// `wv` (the kernel has exactly `TB` taps), used for the groups whose
/// rectangle is the whole kernel; otherwise a tap's vector is loaded once
/// per group.
///
/// # Safety
/// As [`forward_lanes`]: `x` the block's input pixels (`[H·W][L]`), `y`
/// `OH·OW·L` writable floats, `w` the `[R·S][L]` weights; `schedule` built
/// for this geometry and `L`; `grid` holds every tap of the kernel when
/// `HELD`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sweep<S: Simd, const TB: usize, const HELD: bool>(
    s: S,
    geo: &Geo,
    schedule: &Schedule,
    grid: &TapGrid<TB>,
    wv: &[S::V; TB],
    w: *const f32,
    x: *const f32,
    y: &mut [f32],
    finish: &impl Fn(S::V) -> S::V,
) {
    let y = y.as_mut_ptr();
    for g in &schedule.groups {
        // A class's last group of at most P/2 pixels runs P/2 chains, not P
        // with half of them repeating a pixel.
        if g.slide {
            // SAFETY: forwarded contract; the group is a slide group (built
            // only for 16 lanes: see `Schedule::new`).
            unsafe {
                if g.len == P {
                    group_slide::<S, P>(s, geo, schedule, g, w, x, y, finish)
                } else {
                    group_slide::<S, { P / 2 }>(s, geo, schedule, g, w, x, y, finish)
                }
            };
        } else if g.len <= P / 2 {
            // SAFETY: forwarded contract.
            unsafe {
                group::<S, TB, HELD, { P / 2 }>(s, geo, schedule, g, grid, wv, w, x, y, finish)
            };
        } else {
            // SAFETY: forwarded contract.
            unsafe { group::<S, TB, HELD, P>(s, geo, schedule, g, grid, wv, w, x, y, finish) };
        }
    }
}

/// The most kernel columns a slide group takes.
const SLIDE_COLS: usize = 8;

/// A slide group (`Q` consecutive pixels of one row, stride 1, no
/// dilation): per kernel row, the `Q + cols − 1` input vectors its taps read
/// are loaded once and each tap's FMAs take theirs from registers, where
/// [`group`] loads a vector per tap and pixel (a 7-wide kernel: 14 loads a
/// kernel row for 8 pixels, not 56). Each pixel sums its taps in window
/// order, as [`group`] does.
///
/// # Safety
/// As [`sweep`]; `g.slide`, `g.len == Q`, `Q ≤ P`, and the rectangle at
/// most [`SLIDE_COLS`] wide.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group_slide<S: Simd, const Q: usize>(
    s: S,
    geo: &Geo,
    schedule: &Schedule,
    g: &PixelGroup,
    w: *const f32,
    x: *const f32,
    y: *mut f32,
    finish: &impl Fn(S::V) -> S::V,
) {
    let l = S::LANES;
    let rect = &schedule.rects[g.rect];
    let cols = rect.cols.len();
    debug_assert!(g.slide && g.len == Q && cols <= SLIDE_COLS);
    let mut row = x.wrapping_offset(g.base[0]);
    let mut w_row = w.wrapping_add((rect.rows.start * geo.s_len + rect.cols.start) * l);
    let mut acc = [s.zero(); Q];
    for _ in rect.rows.clone() {
        let mut xs = [s.zero(); P + SLIDE_COLS - 1];
        for (j, v) in xs.iter_mut().enumerate() {
            if j < Q + cols - 1 {
                // SAFETY: vector j is what pixel p reads through tap c for
                // some p < Q, c < cols with p + c = j: a real (or zeroed
                // padding) input pixel of the rectangle, inside x.
                *v = unsafe { s.load(row.wrapping_add(j * l)) };
            }
        }
        for c in 0..SLIDE_COLS {
            if c < cols {
                // SAFETY: tap (r, c) of the rectangle is inside the kernel.
                let wt = unsafe { s.load(w_row.add(c * l)) };
                for (p, a) in acc.iter_mut().enumerate() {
                    *a = s.fma(wt, xs[p + c], *a);
                }
            }
        }
        row = row.wrapping_offset(schedule.row_step);
        w_row = w_row.wrapping_add(geo.s_len * l);
    }
    for (&a, &q) in acc.iter().zip(&g.pixel) {
        // SAFETY: q < OH·OW (the schedule): inside y.
        unsafe { s.store(y.add(q * l), finish(a), l) };
    }
}

/// The first `Q` pixels of group `g` (of which it stores `g.len`), as
/// [`sweep`].
///
/// # Safety
/// As [`sweep`]; `Q ≤ P`, `g.len ≤ Q`, `y` the block's `OH·OW·L` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group<S: Simd, const TB: usize, const HELD: bool, const Q: usize>(
    s: S,
    geo: &Geo,
    schedule: &Schedule,
    g: &PixelGroup,
    grid: &TapGrid<TB>,
    wv: &[S::V; TB],
    w: *const f32,
    x: *const f32,
    y: *mut f32,
    finish: &impl Fn(S::V) -> S::V,
) {
    let l = S::LANES;
    let (row_step, col_step) = (schedule.row_step, schedule.col_step);
    let rect = &schedule.rects[g.rect];
    let base: [*const f32; Q] = std::array::from_fn(|p| x.wrapping_offset(g.base[p]));
    let mut acc = [s.zero(); Q];
    if HELD && rect.whole {
        for (&wt, &off) in wv.iter().zip(&grid.off) {
            for (a, b) in acc.iter_mut().zip(&base) {
                // SAFETY: the group's rectangle is the whole kernel and
                // every tap reads a real input pixel's vector for each of
                // its pixels (the schedule), inside x.
                let xv = unsafe { s.load(b.wrapping_offset(off)) };
                *a = s.fma(wt, xv, *a);
            }
        }
    } else {
        // The rectangle's taps as one loop, stepping to the next kernel row
        // without a branch: a loop per kernel row exits after a trip count
        // that changes from class to class, a misprediction per row.
        let cols = rect.cols.len();
        let (x_wrap, w_wrap) = (
            row_step - (cols as isize - 1) * col_step,
            ((geo.s_len - cols + 1) * l) as isize,
        );
        let mut wt_at = (rect.rows.start * geo.s_len + rect.cols.start) * l;
        let (mut off, mut c) = (0isize, 0usize);
        for _ in 0..rect.rows.len() * cols {
            // SAFETY: tap (r, c) of the rectangle is inside the kernel: its
            // weights are inside w.
            let wt = unsafe { s.load(w.add(wt_at)) };
            for (a, b) in acc.iter_mut().zip(&base) {
                // SAFETY: every tap of the rectangle reads a real input
                // pixel's vector for each pixel of the group (the schedule),
                // inside x.
                let xv = unsafe { s.load(b.wrapping_offset(off)) };
                *a = s.fma(wt, xv, *a);
            }
            c += 1;
            // All ones at a row's last column, else zero.
            let end = ((c == cols) as isize).wrapping_neg();
            off += col_step + (end & (x_wrap - col_step));
            wt_at = wt_at.wrapping_add((l as isize + (end & (w_wrap - l as isize))) as usize);
            c &= !(end as usize);
        }
    }
    for (&a, &q) in acc.iter().zip(&g.pixel).take(g.len) {
        // SAFETY: q < OH·OW (the schedule): inside y.
        unsafe { s.store(y.add(q * l), finish(a), l) };
    }
}

/// How [`forward_lanes`] lays out and visits a block, chosen once per
/// prepared convolution.
///
/// Either the block's plane as it is, its pixels visited by a [`Schedule`]
/// of classes (each class's taps skip its padding), or, where every weight
/// is finite, the plane inside a zero-padded one that the workspace keeps
/// (its border zeroed once per call): then every pixel runs every tap,
/// padding included (a finite weight times zero adds nothing and cannot
/// make a NaN), in one class. The second runs more FMAs and fewer, fuller
/// groups; [`LanesPlan::new`] counts both and keeps the cheaper. With a
/// weight infinite or NaN, padding must never be multiplied (the
/// reference skips it), and only the first is used.
///
/// Measured (1 thread, plans, GFLOP/s, as is → padded, three alternating
/// runs): AVX-512 672×7² 5×5 61–65 → 89–94, 960×7² 3×3 52–53 → 52–61,
/// 192×28² 3×3/2 31–34 → 34–35, 768×14² 7×7 99–102 → 109–114, where the
/// counts pick padded; 576×14² 3×3/2 42–43 → 36–39 and 384×28² 7×7 104–105
/// → 99, where they pick as is. AVX2 672×7² 5×5 19–20 → 27–31.
#[derive(Clone, Debug)]
pub(super) struct LanesPlan {
    /// The geometry the sweep runs on: the layer's, or (padded) that of the
    /// zero-padded plane with no padding.
    sweep: Geo,
    /// With the zero-padded plane: the rows and columns of zeros above and
    /// left of the real plane.
    padded: Option<(usize, usize)>,
    schedule: Schedule,
}

/// What a group costs beyond its FMAs, in FMAs: loading its offsets,
/// finishing and storing its pixels. A rough figure, not tuned: with it the
/// counts pick the layout that measured faster on each layer of the table
/// in [`LanesPlan`]'s documentation.
const GROUP_COST: usize = 16;

impl LanesPlan {
    /// The plan for `geo` with `l` lanes; `finite`: whether every weight
    /// is finite. `OutOfMemory` where a schedule cannot be had.
    pub(super) fn new(geo: &Geo, l: usize, finite: bool) -> Result<LanesPlan, ConvError> {
        let schedule = Schedule::new(geo, l)?;
        let plain = LanesPlan {
            sweep: geo.clone(),
            padded: None,
            schedule,
        };
        let Some(padded) = finite.then(|| padded_geo(geo)).flatten() else {
            return Ok(plain);
        };
        // The padded plane within the bound channels in lanes keep to.
        let bytes = (padded.in_plane + padded.out_plane)
            .saturating_mul(l)
            .saturating_mul(std::mem::size_of::<f32>());
        if bytes > LANES_BYTES {
            return Ok(plain);
        }
        let schedule = Schedule::new(&padded, l)?;
        if schedule.cost() >= plain.schedule.cost() {
            return Ok(plain);
        }
        Ok(LanesPlan {
            sweep: padded,
            padded: Some((geo.pad_top, geo.pad_left)),
            schedule,
        })
    }

    /// Floats of workspace a block needs ([`workspace_len`] of the sweep's
    /// geometry).
    pub(super) fn workspace_len(&self) -> Option<usize> {
        workspace_len(&self.sweep, self.schedule.lanes())
    }

    /// Readies the 64-byte aligned workspace (from [`aligned`] of
    /// [`LanesPlan::sweep_geo`]) for the call's blocks: zeroes the padded
    /// plane, whose border no block writes.
    pub(super) fn ready(&self, work: &mut [f32]) {
        if self.padded.is_some() {
            let plane = self.sweep.in_plane * self.schedule.lanes();
            work[..plane].fill(0.0);
        }
    }

    /// The geometry the workspace is laid out for.
    pub(super) fn sweep_geo(&self) -> &Geo {
        &self.sweep
    }

    /// Whether the plan was made for `geo` and `l` lanes and a workspace of
    /// `len` floats holds what the sweep reads and writes.
    fn fits(&self, geo: &Geo, l: usize, len: usize) -> bool {
        let s = &self.sweep;
        let (top, left) = self.padded.unwrap_or((0, 0));
        let inside = top + geo.in_h <= s.in_h && left + geo.in_w <= s.in_w;
        self.schedule.built_for == (s.in_h, s.in_w, s.out_h, s.out_w, l)
            && (s.out_h, s.out_w, s.r_len, s.s_len) == (geo.out_h, geo.out_w, geo.r_len, geo.s_len)
            && (s.stride_h, s.stride_w, s.dil_h, s.dil_w)
                == (geo.stride_h, geo.stride_w, geo.dil_h, geo.dil_w)
            && inside
            && len >= (s.in_plane + s.out_plane) * l
    }
}

/// `geo` over its input plane zero-padded as far as any tap reads, with no
/// padding; `None` where it has no padding to remove.
fn padded_geo(geo: &Geo) -> Option<Geo> {
    let reach = |out: usize, stride: usize, taps: usize, dil: usize| {
        (out.checked_sub(1)?)
            .checked_mul(stride)?
            .checked_add((taps - 1).checked_mul(dil)?)?
            .checked_add(1)
    };
    let hp = reach(geo.out_h, geo.stride_h, geo.r_len, geo.dil_h)?.max(geo.pad_top + geo.in_h);
    let wp = reach(geo.out_w, geo.stride_w, geo.s_len, geo.dil_w)?.max(geo.pad_left + geo.in_w);
    if hp == geo.in_h && wp == geo.in_w {
        return None;
    }
    Some(Geo {
        in_h: hp,
        in_w: wp,
        in_plane: hp.checked_mul(wp)?,
        pad_top: 0,
        pad_left: 0,
        ..geo.clone()
    })
}

/// The order in which [`forward_lanes`] visits a block's output pixels,
/// built once per prepared convolution and shared by every block.
///
/// The pixels are taken by class: the output rows whose real kernel rows
/// (those reading a real input row) are the same, times the output
/// columns whose real kernel columns are the same ([`TapRuns`]). A class's
/// pixels share one rectangle of taps, so a group of `P` of them (in
/// row-major order, across output rows) runs the rectangle's taps with no
/// checks and `P` independent FMA chains; the last group of a class
/// repeats its last pixel and stores only its own. Each pixel sums its real
/// taps in window order from zero, as the reference does, and padding is
/// never multiplied.
///
/// Taken pixel by pixel, an edge pixel is one chain of dependent FMAs with
/// a loop exit per kernel row whose trip count changes from pixel to pixel,
/// and on a 7² plane most pixels are edge pixels.
#[derive(Clone, Debug)]
pub(super) struct Schedule {
    groups: Vec<PixelGroup>,
    rects: Vec<TapRect>,
    /// Offsets, in floats, of one kernel row and one kernel column.
    row_step: isize,
    col_step: isize,
    /// What it was built for: `(in_h, in_w, out_h, out_w, L)`.
    built_for: (usize, usize, usize, usize, usize),
}

/// Up to `P` output pixels of one class.
#[derive(Clone, Debug)]
struct PixelGroup {
    /// The class's rectangle, an index into [`Schedule::rects`].
    rect: usize,
    /// Pixels stored, `1..=P`.
    len: usize,
    /// Each pixel's index `oh·OW + ow` (the last repeated past `len`).
    pixel: [usize; P],
    /// Offset, in floats, of the input vector each pixel reads through the
    /// rectangle's first tap.
    base: [isize; P],
    /// Whether the group is `len` (4 or 8) consecutive pixels of one row of
    /// a stride-1, undilated layer, none repeated: a kernel row's taps then
    /// read `len + cols − 1` consecutive input vectors ([`group_slide`]).
    slide: bool,
}

/// The kernel rows and columns whose taps read real input for a class.
#[derive(Clone, Debug)]
struct TapRect {
    rows: Range<usize>,
    cols: Range<usize>,
    /// Whether it is the whole kernel.
    whole: bool,
}

impl Schedule {
    /// The schedule of `geo` for `l` lanes, or `OutOfMemory`.
    pub(super) fn new(geo: &Geo, l: usize) -> Result<Schedule, ConvError> {
        let rect_count = TapRuns::rows(geo).count() * TapRuns::cols(geo).count();
        let mut rects = try_with_capacity("depthwise schedule", rect_count)?;
        let mut groups = try_with_capacity("depthwise schedule", geo.out_plane / P + rect_count)?;
        let row_step = (geo.dil_h * geo.in_w * l) as isize;
        let col_step = (geo.dil_w * l) as isize;
        // Kernels wider than 3 (whose weights are not held in registers)
        // at stride 1 take consecutive pixels of a row ([`group_slide`]),
        // with 16 lanes only: that tile holds 8 accumulators and 15 input
        // vectors, which 16-register files (8 lanes: AVX2) would spill, and
        // the runs alone lost there (672×7² 5×5, 46 → 39 GFLOP/s).
        let slide = l >= 16
            && geo.s_len > 3
            && geo.s_len <= SLIDE_COLS
            && geo.stride_w == 1
            && geo.dil_w == 1;
        for (ohs, rows) in TapRuns::rows(geo) {
            for (ows, cols) in TapRuns::cols(geo) {
                let first = rows.start as isize * row_step + cols.start as isize * col_step;
                let whole = rows.len() == geo.r_len && cols.len() == geo.s_len;
                let rect = rects.len();
                rects.push(TapRect {
                    rows: rows.clone(),
                    cols,
                    whole,
                });
                let count = ohs.len() * ows.len();
                let pixel_at = |oh: usize, ow: usize| {
                    let ih = (oh * geo.stride_h) as isize - geo.pad_top as isize;
                    let iw = (ow * geo.stride_w) as isize - geo.pad_left as isize;
                    (ih * geo.in_w as isize + iw) * l as isize + first
                };
                if slide && ows.len() >= P / 2 {
                    // Each row in runs of P (or P/2) consecutive pixels, the
                    // last run overlapping the one before rather than short.
                    let q = if ows.len() >= P { P } else { P / 2 };
                    for oh in ohs.clone() {
                        let mut start = 0;
                        while start < ows.len() {
                            let at = start.min(ows.len() - q);
                            let ow = |p: usize| ows.start + at + p.min(q - 1);
                            groups.push(PixelGroup {
                                rect,
                                len: q,
                                pixel: std::array::from_fn(|p| oh * geo.out_w + ow(p)),
                                base: std::array::from_fn(|p| pixel_at(oh, ow(p))),
                                slide: true,
                            });
                            start = at + q;
                        }
                    }
                    continue;
                }
                // Pixel i of the class, in row-major order.
                let at = |i: usize| (ohs.start + i / ows.len(), ows.start + i % ows.len());
                for start in (0..count).step_by(P) {
                    let len = (count - start).min(P);
                    let pixel = |p: usize| at(start + p.min(len - 1));
                    groups.push(PixelGroup {
                        rect,
                        len,
                        pixel: std::array::from_fn(|p| {
                            let (oh, ow) = pixel(p);
                            oh * geo.out_w + ow
                        }),
                        base: std::array::from_fn(|p| {
                            let (oh, ow) = pixel(p);
                            pixel_at(oh, ow)
                        }),
                        slide: false,
                    });
                }
            }
        }
        Ok(Schedule {
            groups,
            rects,
            row_step,
            col_step,
            built_for: (geo.in_h, geo.in_w, geo.out_h, geo.out_w, l),
        })
    }
}

impl Schedule {
    /// The lanes `L` it was built for.
    fn lanes(&self) -> usize {
        self.built_for.4
    }

    /// FMAs the sweep runs per lane, plus [`GROUP_COST`] per group.
    fn cost(&self) -> usize {
        self.groups
            .iter()
            .map(|g| {
                let rect = &self.rects[g.rect];
                let chains = if g.len <= P / 2 { P / 2 } else { P };
                chains * rect.rows.len() * rect.cols.len() + GROUP_COST
            })
            .sum()
    }
}

/// Consecutive output rows (or columns) whose real kernel rows (columns)
/// are the same, as `(outputs, taps)` ranges, in order. The range of real
/// taps moves monotonically with the output index, so there are at most
/// `2·R + 1` runs.
struct TapRuns {
    at: usize,
    len: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    taps: usize,
    size: usize,
}

impl TapRuns {
    /// The runs of output rows.
    fn rows(geo: &Geo) -> TapRuns {
        TapRuns {
            at: 0,
            len: geo.out_h,
            stride: geo.stride_h,
            pad: geo.pad_top,
            dil: geo.dil_h,
            taps: geo.r_len,
            size: geo.in_h,
        }
    }

    /// The runs of output columns.
    fn cols(geo: &Geo) -> TapRuns {
        TapRuns {
            at: 0,
            len: geo.out_w,
            stride: geo.stride_w,
            pad: geo.pad_left,
            dil: geo.dil_w,
            taps: geo.s_len,
            size: geo.in_w,
        }
    }
}

impl Iterator for TapRuns {
    type Item = (Range<usize>, Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let real = |o: usize| real_taps(o * self.stride, self.pad, self.dil, self.taps, self.size);
        if self.at >= self.len {
            return None;
        }
        let start = self.at;
        let taps = real(start);
        let mut end = start + 1;
        while end < self.len && real(end) == taps {
            end += 1;
        }
        self.at = end;
        Some((start..end, taps))
    }
}

/// The kernel offsets `k` (of `len`) whose input index `at + k·dil − pad`
/// lies in `0..size`: one range, since the index grows with `k`.
#[inline(always)]
fn real_taps(at: usize, pad: usize, dil: usize, len: usize, size: usize) -> Range<usize> {
    // at + k·dil ≥ pad  ⇔  k ≥ ⌈(pad − at)/dil⌉;  at + k·dil < size + pad  ⇔
    // k < ⌈(size + pad − at)/dil⌉.
    let (lo, hi) = (pad.saturating_sub(at), (size + pad).saturating_sub(at));
    // Undilated kernels (nearly all) skip the divisions.
    let (lo, hi) = if dil == 1 {
        (lo, hi)
    } else {
        (lo.div_ceil(dil), hi.div_ceil(dil))
    };
    let lo = lo.min(len);
    lo..hi.clamp(lo, len)
}

#[cfg(test)]
mod tests {
    use super::{Schedule, P};
    use crate::conv::direct_simd::Geo;
    use crate::gemm::Activation;
    use crate::geometry::{Conv2dParams, ConvGeometry, Padding};

    /// The schedule visits every output pixel once (twice where runs of
    /// consecutive pixels overlap), and each group runs, for every pixel it
    /// holds, exactly that pixel's real taps (the
    /// reference's window minus its padding), each at the offset of the
    /// input pixel the tap reads.
    #[test]
    fn schedule_runs_each_pixel_through_exactly_its_real_taps() {
        // (plane, kernel, stride, dilation, padding top/bottom/left/right)
        let cases = [
            ((7, 7), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
            ((7, 7), (5, 5), (1, 1), (1, 1), (2, 2, 2, 2)),
            ((14, 14), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
            ((9, 11), (3, 5), (3, 2), (2, 1), (0, 3, 4, 1)),
            ((3, 2), (7, 6), (1, 1), (1, 1), (3, 3, 3, 3)),
            ((5, 6), (2, 3), (1, 2), (3, 2), (6, 0, 0, 5)),
            ((1, 1), (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
            ((14, 14), (7, 7), (1, 1), (1, 1), (3, 3, 3, 3)),
            ((12, 21), (5, 5), (1, 1), (1, 1), (2, 1, 0, 2)),
        ];
        let mut slides = 0;
        for (plane, kernel, stride, dil, (t, b, l, r)) in cases {
            let p = Conv2dParams::new(1, 4, plane, 4, kernel)
                .stride(stride.0, stride.1)
                .dilation(dil.0, dil.1)
                .padding(Padding::explicit(t, b, l, r))
                .groups(4);
            let g = ConvGeometry::new(&p).unwrap();
            let geo = Geo::new(&g, Activation::None);
            let lanes = 16;
            let sched = Schedule::new(&geo, lanes).unwrap();
            let mut seen = vec![0usize; geo.out_plane];
            let mut seen_slide = vec![0usize; geo.out_plane];
            for group in &sched.groups {
                assert!((1..=P).contains(&group.len));
                for &q in &group.pixel[..group.len] {
                    seen[q] += 1;
                    seen_slide[q] += group.slide as usize;
                }
                if group.slide {
                    // Consecutive pixels of one row, consecutive vectors.
                    assert!(group.len == P || group.len == P / 2);
                    assert_eq!(geo.stride_w, 1);
                    for p in 1..group.len {
                        assert_eq!(group.pixel[p], group.pixel[0] + p);
                        assert_eq!(group.pixel[p] / geo.out_w, group.pixel[0] / geo.out_w);
                        assert_eq!(group.base[p], group.base[0] + (p * lanes) as isize);
                    }
                }
                let rect = &sched.rects[group.rect];
                assert_eq!(
                    rect.whole,
                    rect.rows == (0..geo.r_len) && rect.cols == (0..geo.s_len)
                );
                for (&q, &base) in group.pixel.iter().zip(&group.base) {
                    let (oh, ow) = (q / geo.out_w, q % geo.out_w);
                    for rr in 0..geo.r_len {
                        for cc in 0..geo.s_len {
                            let ih = (oh * geo.stride_h + rr * geo.dil_h) as isize - t as isize;
                            let iw = (ow * geo.stride_w + cc * geo.dil_w) as isize - l as isize;
                            let real = (0..geo.in_h as isize).contains(&ih)
                                && (0..geo.in_w as isize).contains(&iw);
                            let run = rect.rows.contains(&rr) && rect.cols.contains(&cc);
                            assert_eq!(real, run, "{plane:?} {kernel:?} pixel {q} tap {rr},{cc}");
                            if run {
                                let off = base
                                    + (rr - rect.rows.start) as isize * sched.row_step
                                    + (cc - rect.cols.start) as isize * sched.col_step;
                                let want = (ih * geo.in_w as isize + iw) * lanes as isize;
                                assert_eq!(off, want);
                            }
                        }
                    }
                }
            }
            // Once each, or twice where a row's last run of consecutive
            // pixels overlaps the one before (the same sums, stored again).
            let once = seen
                .iter()
                .zip(&seen_slide)
                .all(|(&n, &sl)| n == 1 || (n == 2 && sl == 2));
            assert!(once, "{plane:?} {kernel:?}: {seen:?}");
            slides += sched.groups.iter().filter(|g| g.slide).count();
        }
        assert!(slides > 0, "no case has runs of consecutive pixels");
    }
}

#[cfg(test)]
mod plan_tests {
    use super::{padded_geo, LanesPlan};
    use crate::conv::direct_simd::Geo;
    use crate::gemm::Activation;
    use crate::geometry::{Conv2dParams, ConvGeometry, Padding};

    fn geo(plane: usize, kernel: usize, stride: usize, pad: Padding) -> Geo {
        let p = Conv2dParams::new(1, 16, (plane, plane), 16, (kernel, kernel))
            .stride(stride, stride)
            .padding(pad)
            .groups(16);
        Geo::new(&ConvGeometry::new(&p).unwrap(), Activation::None)
    }

    /// The zero-padded plane reaches as far as any tap reads and no
    /// further, and the plan takes it only with finite weights, where its
    /// count is lower (a 5×5 kernel on 7²: 7 groups against 26).
    #[test]
    fn padded_plane_only_with_finite_weights_and_where_it_counts_lower() {
        // 7² with 5×5, padding 2: 11² read.
        let g = geo(7, 5, 1, Padding::symmetric(2, 2));
        let p = padded_geo(&g).unwrap();
        assert_eq!((p.in_h, p.in_w, p.pad_top, p.pad_left), (11, 11, 0, 0));
        assert_eq!((p.out_h, p.out_w), (7, 7));
        assert!(LanesPlan::new(&g, 16, true).unwrap().padded == Some((2, 2)));
        assert!(LanesPlan::new(&g, 16, false).unwrap().padded.is_none());
        // 14² at stride 2, padding 1: the last row and column of bottom and
        // right padding are never read.
        let g = geo(14, 3, 2, Padding::symmetric(1, 1));
        let p = padded_geo(&g).unwrap();
        assert_eq!((p.in_h, p.in_w), (15, 15));
        // Asymmetric: only what is read.
        let g = geo(9, 3, 1, Padding::explicit(2, 0, 0, 1));
        let p = padded_geo(&g).unwrap();
        assert_eq!((p.in_h, p.in_w, p.out_h, p.out_w), (11, 10, 9, 8));
        // No padding: nothing to pad.
        assert!(padded_geo(&geo(9, 3, 1, Padding::symmetric(0, 0))).is_none());
        let plan = LanesPlan::new(&geo(9, 3, 1, Padding::symmetric(0, 0)), 16, true).unwrap();
        assert!(plan.padded.is_none());
    }
}
