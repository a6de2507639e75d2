//! The general register tile: `KB` output channels (1 to 4, one group) ×
//! `RB` output rows × one vector, for any kernel, stride and dilation.

use super::simd::{fma_tap, load_tap, opaque, store_tile, TileAt};
use super::{Geo, Job, Simd};

/// Every tile of one job with the general tile: `KB = job.kb` channels ×
/// `RB` rows × one vector, row blocks swept one vector at a time. `SW` is the
/// horizontal stride when it is 1 or 2, and 0 for any other (read from the
/// geometry).
///
/// # Safety
/// The buffers match the geometry as [`check_job`](super::check_job)
/// checks; `out` holds the unit's `kb` output planes; `KB == job.kb`.
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
        for (v, cv) in job.cols.vecs.iter().enumerate() {
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
