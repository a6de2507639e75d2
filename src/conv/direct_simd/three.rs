//! The 3×3 register tile for single-channel jobs with vertical dilation 1
//! and stride 1 or 2 (depthwise MobileNet layers): all nine weights in
//! registers, each input row loaded once per kernel column.
//!
//! Tried against this tile and not taken (Zen 5, AVX-512, 1 thread, plans,
//! GFLOP/s, the tile's figure in the same runs after the arrow):
//!
//! * The grad weight's flattened sweep for the forward (a vector is 16
//!   consecutive pixels of the flattened plane, one whole load and one
//!   merge-masked FMA per tap, no vector wasted on a row's tail):
//!   144×56² 60–65 → 87–92, 8×56² 52–61 → 93–98, 192×28² 52–54 → 85–87,
//!   32×112² 64–65 → 101–106, with four vectors' accumulators interleaved
//!   or not. Nine loads a vector, most across two lines, against this
//!   tile's three per input row shared by up to three output rows.
//! * At stride 2, the last vector of a row moved back to end at the row's
//!   end (full width, overlapping its neighbour, so that it reads inside
//!   the row and takes the interior loads): 192×56²/2 33 → 38, still no
//!   faster than channels in lanes (33–37), which that layer takes; on
//!   planes with no padding at all the tile reaches only 47–55 there
//!   (28 or 32 outputs a row: short row blocks).

use super::simd::{fma_tap, load_interior, load_tap, opaque, store_tile, TileAt};
use super::sweep::{run_sweep3, sweep_takes};
use super::{Geo, Job, Simd};

/// Every tile of a single-channel job with a 3×3 kernel, vertical dilation 1
/// and vertical stride `SH` (1 or 2): row blocks of `RB`, the last, short
/// one with a tile of 4 or 8 rows where that is enough (rows past the end are
/// computed and dropped).
///
/// # Safety
/// As [`run_general`](super::run_general) with `KB = 1`, and the kernel,
/// dilation and stride described.
#[inline(always)]
pub(super) unsafe fn run_three<S: Simd, const RB: usize, const SW: usize, const SH: usize>(
    s: S,
    job: &Job<'_>,
    out: &mut [f32],
) {
    let geo = job.geo;
    if (SW == 1 || SW == 2) && sweep_takes::<S>(job) {
        // SAFETY: forwarded contract; one input channel (`sweep_takes`).
        return unsafe { run_sweep3::<S, SW, SH>(s, job, out) };
    }
    let out = out.as_mut_ptr();
    let bias = job.bias.map(|b| [b[0]]);
    let mut oh0 = 0;
    while oh0 < geo.out_h {
        let rows = (geo.out_h - oh0).min(RB);
        // SAFETY: (all three calls) forwarded contract; rows ≤ the tile's rows.
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
    for (v, cv) in job.cols.vecs.iter().enumerate() {
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
    // An edge vector's lanes outside the row still lie inside the channel's
    // plane when the block's first row does not start it and its last row
    // does not end it: then whole-vector loads are safe, and the masked
    // FMAs alone drop those lanes (they hold real input of the neighbouring
    // rows, never a padding value). Zen 5 runs the masked loads far slower
    // than plain ones: 96 channels of 112² at stride 2, half of whose
    // vectors are edges, ran at 28 GFLOP/s with masked loads.
    let reach = (S::LANES - 1) * geo.stride_w + 1;
    let first = ih0 * geo.in_w as isize + col0;
    let end =
        (ih0 + span as isize - 1) * geo.in_w as isize + col0 + (2 * geo.dil_w + reach) as isize;
    let spans_inside = first >= 0 && end <= geo.in_plane as isize;
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
        if all_rows && EDGE && spans_inside {
            // SAFETY: every input row of the block is inside the channel, and
            // so is every lane of every load (`spans_inside`).
            unsafe {
                rows3::<S, RB, SW, SH, true, false, true>(s, geo, base, ih0, &w, &masks, &mut acc)
            };
        } else if all_rows {
            // SAFETY: every input row of the block is inside the channel.
            unsafe {
                rows3::<S, RB, SW, SH, EDGE, false, false>(s, geo, base, ih0, &w, &masks, &mut acc)
            };
        } else {
            // SAFETY: forwarded contract.
            unsafe {
                rows3::<S, RB, SW, SH, EDGE, true, false>(s, geo, base, ih0, &w, &masks, &mut acc)
            };
        }
    }
    acc
}

/// The input rows of one channel into a 3×3 tile. `CHECK` skips input rows
/// outside the input; without it all of them must be inside. `LOOSE` (an
/// edge vector) loads whole vectors and masks only the FMAs.
///
/// # Safety
/// As [`tile3`]; `base` is lane 0 of input row `ih0` at kernel column 0;
/// without `CHECK`, input rows `ih0..ih0 + SH·(RB−1) + 3` are inside the
/// channel; with `LOOSE`, every lane of every whole-vector load (kernel
/// columns 0..3 of those rows) is inside the channel.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows3<
    S: Simd,
    const RB: usize,
    const SW: usize,
    const SH: usize,
    const EDGE: bool,
    const CHECK: bool,
    const LOOSE: bool,
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
        if (!CHECK || (ih >= 0 && ih < in_h)) && SW == 2 && (LOOSE || !EDGE) && dw == 1 {
            // SAFETY: as below; the three kernel columns read p[0..2L + 1].
            // (Its FMAs repeat the loop below: one loop after either kind of
            // load, all loads first, ran 96×112²/2 at 30–31 GFLOP/s, not
            // 36–40.)
            let xs = unsafe { s.load_stride2_three(p) };
            for (si, &x) in xs.iter().enumerate() {
                for (r, w_r) in w.iter().enumerate() {
                    if tt >= r && (tt - r).is_multiple_of(SH) && (tt - r) / SH < RB {
                        let i = (tt - r) / SH;
                        acc[i] = fma_tap::<S, EDGE>(s, w_r[si], x, acc[i], masks[si]);
                    }
                }
            }
        } else if !CHECK || (ih >= 0 && ih < in_h) {
            for si in 0..3 {
                // SAFETY: input row ih is inside the channel (contract
                // without CHECK, else checked above), and for kernel column si
                // the lanes of masks[si] (every lane of an interior vector;
                // none when the range is empty) read columns inside 0..in_w
                // (`ranges`); with LOOSE every lane reads inside the channel
                // (contract), and the masked FMAs drop those outside the row.
                let x = unsafe {
                    if LOOSE {
                        load_interior::<S, SW>(s, p.wrapping_add(si * dw), sw)
                    } else {
                        load_tap::<S, SW, EDGE>(s, p.wrapping_add(si * dw), sw, masks[si])
                    }
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
