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
//! masks, and padding is never multiplied, as in the reference. Pixels
//! whose every tap reads a real input pixel take a loop with no checks.
//!
//! Which layers: [`lanes_apply`]. Measured: the table in the module
//! documentation of `backward.rs` for the weight gradient, [`forward_lanes`]
//! for the forward.

use super::simd::Simd;
use super::Geo;
use std::ops::Range;

/// Whether a depthwise layer puts channels in lanes: one input and one
/// output channel per group, output rows narrower than `below` or strided
/// (the layers where pixels in lanes lose to per-job and edge work), and
/// the block's two transposed planes within 256 KiB (half the smallest L2
/// of the CPUs the crate is measured on, so that the block stays in L2
/// while its taps sweep it). `lanes` is the ISA's `L`; `below` is
/// [`GRAD_WEIGHT_BELOW`] or [`FORWARD_BELOW`].
pub(super) fn lanes_apply(geo: &Geo, lanes: usize, below: usize) -> bool {
    let bytes = (geo.in_plane + geo.out_plane)
        .saturating_mul(lanes)
        .saturating_mul(std::mem::size_of::<f32>());
    let small = geo.out_w < below;
    let strided = geo.stride_h > 1 || geo.stride_w > 1;
    geo.cg == 1 && geo.kg == 1 && (small || strided) && bytes <= 256 << 10
}

/// The weight gradient's stride-1 rows narrower than this put channels in
/// lanes. Rows of 28 and 56 keep pixels in lanes: 1 thread AVX-512,
/// GFLOP/s, channels in lanes against the flattened sweep, 49 against 53
/// on 192×28², 55 against 65 on 144×56²; rows of 14 gain (384×14², 27 →
/// 44–51).
pub(super) const GRAD_WEIGHT_BELOW: usize = 16;

/// The forward's stride-1 rows narrower than this put channels in lanes:
/// rows of 7 gain (960×7², 10 → 17–18% of the FMA peak, 1 thread AVX-512),
/// rows of 14 lose a little (384×14², 25% → 23–24%).
pub(super) const FORWARD_BELOW: usize = 14;

/// Floats of the workspace one block needs for `lanes` lanes: both planes
/// transposed, and room to start them on a 64-byte line.
pub(super) fn workspace_len(geo: &Geo, lanes: usize) -> Option<usize> {
    (geo.in_plane + geo.out_plane)
        .checked_mul(lanes)?
        .checked_add(64 / std::mem::size_of::<f32>())
}

/// The part of `work` (from [`workspace_len`]) that starts on a 64-byte
/// line, `(in_plane + out_plane)·L` floats.
pub(super) fn aligned<'a>(work: &'a mut [f32], geo: &Geo, lanes: usize) -> &'a mut [f32] {
    let skip = work
        .as_ptr()
        .align_offset(64)
        .min(64 / std::mem::size_of::<f32>());
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
            && work.len() >= (geo.in_plane + geo.out_plane) * job.lanes
            && out.len() >= job.channels * geo.out_plane,
        "direct SIMD: lanes job does not match the geometry"
    );
}

/// Output pixels per group of the forward's interior loop.
const P: usize = 4;

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
/// moved by half between runs); 5×5 kernels on 7² and 14² planes stay at
/// about half of ORT's (their pixels are mostly edge pixels, summed one
/// FMA chain at a time).
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
    let (x, y) = work.split_at_mut(geo.in_plane * l);
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
    let held = taps == TB;
    let mut wv = [s.zero(); TB];
    if held {
        for (t, v) in wv.iter_mut().enumerate() {
            // SAFETY: t < R·S: inside the block's weights (contract).
            *v = unsafe { s.load(w.add(t * l)) };
        }
    }
    if held {
        let grid = TapGrid::<TB>::new(geo, 0..taps, l);
        // SAFETY: forwarded contract.
        unsafe { sweep::<S, TB, true>(s, geo, &grid, &wv, w, x, y, &finish) };
    } else {
        // All taps in one grid: the offsets are per tap, not per register.
        let grid = TapGrid::<64>::new(geo, 0..taps.min(64), l);
        if taps <= 64 {
            // SAFETY: forwarded contract.
            unsafe { sweep::<S, 64, false>(s, geo, &grid, &[s.zero(); 64], w, x, y, &finish) };
        } else {
            // SAFETY: forwarded contract.
            unsafe { sweep_any(s, geo, w, x, y, &finish) };
        }
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

/// Every output pixel of a block into `y` (`[OH·OW][L]`): interior pixels
/// `P` at a time with no checks, the others one at a time skipping their
/// padding taps. `HELD`: the `TB` weight vectors are `wv` (the kernel has
/// exactly `TB` taps); otherwise they are loaded from `w` per tap.
///
/// # Safety
/// As [`forward_lanes`]: `x` the block's input pixels (`[H·W][L]`), `y`
/// `OH·OW·L` writable floats, `w` the `[R·S][L]` weights; `grid` holds
/// every tap of the kernel (`R·S ≤ TB`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sweep<S: Simd, const TB: usize, const HELD: bool>(
    s: S,
    geo: &Geo,
    grid: &TapGrid<TB>,
    wv: &[S::V; TB],
    w: *const f32,
    x: *const f32,
    y: &mut [f32],
    finish: &impl Fn(S::V) -> S::V,
) {
    let l = S::LANES;
    let taps = geo.r_len * geo.s_len;
    let weight = |t: usize| {
        if HELD {
            wv[t]
        } else {
            // SAFETY: t < R·S: inside the weights (contract).
            unsafe { s.load(w.add(t * l)) }
        }
    };
    let y = y.as_mut_ptr();
    for oh in 0..geo.out_h {
        let row = oh * geo.out_w;
        let interior = if grid.row_real(geo, oh) {
            grid.cols.clone()
        } else {
            0..0
        };
        let mut ow = 0;
        while ow < geo.out_w {
            if ow == interior.start && interior.len() >= P {
                let end = interior.start + interior.len() / P * P;
                while ow < end {
                    let mut acc = [s.zero(); P];
                    let mut base = [x; P];
                    for (p, b) in base.iter_mut().enumerate() {
                        *b = x.wrapping_offset(grid.origin(geo, oh, ow + p, l));
                    }
                    for t in 0..TB {
                        if t >= taps {
                            break;
                        }
                        let wt = weight(t);
                        for (a, b) in acc.iter_mut().zip(&base) {
                            // SAFETY: an interior pixel's every tap reads a
                            // real input pixel's vector, inside x.
                            let xv = unsafe { s.load(b.wrapping_offset(grid.off[t])) };
                            *a = s.fma(wt, xv, *a);
                        }
                    }
                    for (p, &a) in acc.iter().enumerate() {
                        // SAFETY: pixel row + ow + p < OH·OW: inside y.
                        unsafe { s.store(y.add((row + ow + p) * l), finish(a), l) };
                    }
                    ow += P;
                }
                continue;
            }
            let mut acc = s.zero();
            if HELD {
                // Weights in registers: a check per tap, the loop unrolled.
                for (t, &wt) in wv.iter().enumerate() {
                    if let Some(px) = grid.pixel(geo, t, oh, ow) {
                        // SAFETY: a real input pixel's vector, inside x.
                        let xv = unsafe { s.load(x.add(px * l)) };
                        acc = s.fma(wt, xv, acc);
                    }
                }
            } else {
                // Only the kernel rows and columns that read real input, as
                // ranges: no check per tap.
                let (rows, cols) = (
                    real_taps(
                        oh * geo.stride_h,
                        geo.pad_top,
                        geo.dil_h,
                        geo.r_len,
                        geo.in_h,
                    ),
                    real_taps(
                        ow * geo.stride_w,
                        geo.pad_left,
                        geo.dil_w,
                        geo.s_len,
                        geo.in_w,
                    ),
                );
                for r in rows {
                    let ih = oh * geo.stride_h + r * geo.dil_h - geo.pad_top;
                    for c in cols.clone() {
                        let iw = ow * geo.stride_w + c * geo.dil_w - geo.pad_left;
                        // SAFETY: (ih, iw) is a real input pixel (its tap is
                        // in the ranges), its vector inside x.
                        let xv = unsafe { s.load(x.add((ih * geo.in_w + iw) * l)) };
                        acc = s.fma(weight(r * geo.s_len + c), xv, acc);
                    }
                }
            }
            // SAFETY: pixel row + ow < OH·OW: inside y.
            unsafe { s.store(y.add((row + ow) * l), finish(acc), l) };
            ow += 1;
        }
    }
}

/// [`sweep`] for kernels of more than 64 taps: one pixel at a time, over
/// the taps that read real input.
///
/// # Safety
/// As [`sweep`].
#[inline(always)]
unsafe fn sweep_any<S: Simd>(
    s: S,
    geo: &Geo,
    w: *const f32,
    x: *const f32,
    y: &mut [f32],
    finish: &impl Fn(S::V) -> S::V,
) {
    let l = S::LANES;
    for oh in 0..geo.out_h {
        let rows = real_taps(
            oh * geo.stride_h,
            geo.pad_top,
            geo.dil_h,
            geo.r_len,
            geo.in_h,
        );
        for ow in 0..geo.out_w {
            let cols = real_taps(
                ow * geo.stride_w,
                geo.pad_left,
                geo.dil_w,
                geo.s_len,
                geo.in_w,
            );
            let mut acc = s.zero();
            for r in rows.clone() {
                let ih = oh * geo.stride_h + r * geo.dil_h - geo.pad_top;
                for c in cols.clone() {
                    let iw = ow * geo.stride_w + c * geo.dil_w - geo.pad_left;
                    let px = ih * geo.in_w + iw;
                    // SAFETY: a real input pixel's vector, inside x; tap
                    // r·S + c < R·S inside the weights (contract).
                    let (xv, wt) = unsafe {
                        (
                            s.load(x.add(px * l)),
                            s.load(w.add((r * geo.s_len + c) * l)),
                        )
                    };
                    acc = s.fma(wt, xv, acc);
                }
            }
            // SAFETY: pixel oh·OW + ow < OH·OW: inside y.
            unsafe { s.store(y[(oh * geo.out_w + ow) * l..].as_mut_ptr(), finish(acc), l) };
        }
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
