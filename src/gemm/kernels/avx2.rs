//! AVX2 + FMA micro-kernels: `6 × 16` tiles with C vectorised along its
//! rows (BLIS's Haswell sgemm shape), and `16 × 6` tiles vectorised down
//! its columns (see [`kernel_columns`]).
//!
//! Twelve ymm accumulators, two for the B row and one for the A broadcast fill
//! 15 of the 16 ymm registers; two FMA pipes at 4–5 cycles latency need 8–10
//! independent accumulators, so 12 keeps them busy.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::{
    run_steps_prefetching_c, store_columns_scalar, store_tile_scalar, TileEpilogue,
    A_COLUMN_PREFETCH_STEPS,
};

/// Columns of a B panel: two ymm registers.
pub(crate) const NR: usize = 16;
/// Rows of an A panel.
pub(crate) const MR: usize = 6;

/// The dispatched micro-kernel; see [`super::MicroKernelFn`].
///
/// # Safety
/// As [`super::MicroKernelFn`]; the CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel(
    kc: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    if ars == 1 {
        // SAFETY: forwarded; A's steps are contiguous: a packed panel
        // (`acs = MR`) or a column-major A read in place.
        unsafe {
            if acs == MR {
                accumulate_contiguous_a::<false>(kc, a, MR, b, ldb, c, rsc, csc, rows, &mut acc)
            } else {
                accumulate_contiguous_a::<true>(kc, a, acs, b, ldb, c, rsc, csc, rows, &mut acc)
            }
        }
    } else {
        let a_rows: [*const f32; MR] = core::array::from_fn(|i| a.wrapping_add(i * ars));
        let (mut ak, mut bp) = (0, b);
        let step = |acc: &mut [[__m256; 2]; MR]| {
            // SAFETY: the panels hold kc steps of MR (A) and 16 (B) floats,
            // and the caller runs at most kc steps.
            unsafe {
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a_rows[i].add(ak));
                    row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                }
                ak += acs;
                bp = bp.add(ldb);
            }
        };
        // SAFETY: the step runs kc times.
        unsafe { run_steps_prefetching_c::<_, 1>(kc, c, rsc, csc, rows, 4 * NR, &mut acc, step) };
    }

    if csc != 1 || cols != NR {
        let mut tile = [0.0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: tile has MR rows of NR floats.
            unsafe {
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), row[0]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), row[1]);
            }
        }
        // SAFETY: forwarded contract.
        unsafe { store_tile_scalar(&tile, NR, c, rsc, csc, rows, cols, ep) };
        return;
    }

    let alpha = _mm256_set1_ps(ep.alpha);
    let beta = _mm256_set1_ps(ep.beta);
    let read_c = ep.beta != 0.0;
    for (i, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: row i < rows, all 16 columns valid, unit column stride.
        unsafe {
            let cp = c.offset(i as isize * rsc);
            let bias = if ep.bias.is_null() {
                None
            } else {
                Some(_mm256_set1_ps(*ep.bias.add(i)))
            };
            for (h, &acc_h) in row.iter().enumerate() {
                let dst = cp.add(8 * h);
                let mut v = _mm256_mul_ps(acc_h, alpha);
                if read_c {
                    v = _mm256_fmadd_ps(beta, _mm256_loadu_ps(dst), v);
                }
                if let Some(bv) = bias {
                    v = _mm256_add_ps(v, bv);
                }
                if let Some((lo, hi)) = ep.clamp {
                    // max(lo, v) / min(hi, v) return v when v is NaN.
                    v = _mm256_max_ps(_mm256_set1_ps(lo), v);
                    v = _mm256_min_ps(_mm256_set1_ps(hi), v);
                }
                _mm256_storeu_ps(dst, v);
            }
        }
    }
}

/// The k-steps of [`kernel`] where A's MR values of step `p` are the MR
/// floats at `a + p·a_step`, walked by one pointer: a packed panel
/// (`a_step = MR`, four steps to an iteration) or a column-major A read in
/// place (`COLUMN_MAJOR`: one step an iteration, the step
/// [`A_COLUMN_PREFETCH_STEPS`] ahead prefetched). See
/// `avx512::accumulate_contiguous_a` for both.
///
/// # Safety
/// As [`kernel`], with `ars = 1` and `acs = a_step` (`MR` unless
/// `COLUMN_MAJOR`); the CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn accumulate_contiguous_a<const COLUMN_MAJOR: bool>(
    kc: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    acc: &mut [[__m256; 2]; MR],
) {
    // A compile-time constant for a packed panel, so that its four steps'
    // addresses fold into offsets.
    let a_step = if COLUMN_MAJOR { a_step } else { MR };
    let a_ahead = A_COLUMN_PREFETCH_STEPS * a_step;
    let (mut ap, mut bp) = (a, b);
    let step = |acc: &mut [[__m256; 2]; MR]| {
        // SAFETY: A holds kc steps of MR floats, a_step apart, and B kc
        // steps of 16; the caller runs at most kc steps. A prefetch never
        // faults, whatever the address.
        unsafe {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            if COLUMN_MAJOR {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(a_ahead).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
            ap = ap.add(a_step);
            bp = bp.add(ldb);
        }
    };
    // SAFETY: the step runs kc times.
    unsafe {
        if COLUMN_MAJOR {
            run_steps_prefetching_c::<_, 1>(kc, c, rsc, csc, rows, 4 * NR, acc, step)
        } else {
            run_steps_prefetching_c::<_, 4>(kc, c, rsc, csc, rows, 4 * NR, acc, step)
        }
    };
}

/// Rows of the column kernel's tile: two ymm down a column of C.
pub(crate) const MR_COLUMNS: usize = 16;
/// Columns of the column kernel's tile: one broadcast of B each.
pub(crate) const NR_COLUMNS: usize = 6;

/// `16 × 6` tiles vectorised down the columns of C, for a C with few
/// columns: 49 columns (a 7×7 output plane) cost 64 in 16-wide row tiles,
/// about 49 here (eight tiles of 6 and one of 1).
///
/// Each k-step loads 16 values of the A panel (two ymm) and broadcasts the
/// 6 values of the B panel: 12 accumulators, as in the row kernel, and the
/// same loads per FMA. The epilogue applies α and the bias down the
/// columns, transposes each 8-row half in registers ([`transpose_8x8`],
/// two columns of zeros) and finishes β·C and the clamp on the rows of C:
/// a 4- and a 2-float store per row of a whole tile, masked stores at a
/// right edge.
///
/// # Safety
/// As [`kernel`], for a packed 16-row A panel (`ars = 1`, `acs = 16`: its
/// k-steps are loaded as vectors) and a 6-column B panel.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_columns(
    kc: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    // The A panel's k-steps are read as vectors: packed layout only.
    debug_assert!(
        ars == 1 && acs == MR_COLUMNS,
        "column kernel needs packed A"
    );
    // A right-edge tile with few real columns broadcasts only those, with
    // k split over independent chains so that at least 8 accumulators
    // still hide the FMA latency.
    // SAFETY: (each arm) forwarded; at most NR_COLUMNS columns of each B
    // step are read.
    let acc = unsafe {
        match cols {
            1 => accumulate_columns::<1, 4>(kc, a, b, ldb, c, rsc, csc, rows),
            2 => accumulate_columns::<2, 2>(kc, a, b, ldb, c, rsc, csc, rows),
            3 => accumulate_columns::<3, 2>(kc, a, b, ldb, c, rsc, csc, rows),
            4 => accumulate_columns::<4, 1>(kc, a, b, ldb, c, rsc, csc, rows),
            _ => accumulate_columns::<NR_COLUMNS, 1>(kc, a, b, ldb, c, rsc, csc, rows),
        }
    };

    if csc != 1 {
        let mut columns = [0.0f32; MR_COLUMNS * NR_COLUMNS];
        for (j, col) in acc.iter().enumerate() {
            for (h, x) in col.iter().enumerate() {
                // SAFETY: 8 floats at j·16 + 8h, inside `columns`.
                unsafe { _mm256_storeu_ps(columns.as_mut_ptr().add(j * MR_COLUMNS + 8 * h), *x) };
            }
        }
        // SAFETY: forwarded contract; `columns` holds NR_COLUMNS columns
        // of MR_COLUMNS ≥ rows values.
        unsafe { store_columns_scalar(&columns, MR_COLUMNS, c, rsc, csc, rows, cols, ep) };
        return;
    }

    let alpha = _mm256_set1_ps(ep.alpha);
    let beta = _mm256_set1_ps(ep.beta);
    let read_c = ep.beta != 0.0;
    let col_mask = lane_mask(cols);
    for h in 0..2 {
        let first = 8 * h;
        if first >= rows {
            break;
        }
        let here = (rows - first).min(8);
        let bias = if ep.bias.is_null() {
            _mm256_setzero_ps()
        } else {
            // SAFETY: bias holds `rows` values; masked lanes are not read.
            unsafe { _mm256_maskload_ps(ep.bias.add(first), lane_mask(here)) }
        };
        let mut x = [_mm256_setzero_ps(); 8];
        for (xj, col) in x.iter_mut().zip(acc.iter()) {
            *xj = _mm256_fmadd_ps(col[h], alpha, bias);
        }
        for (i, &row) in transpose_8x8(x).iter().enumerate().take(here) {
            // SAFETY: row first + i < rows of the tile, columns < cols ≤ 6:
            // the 4 + 2 floats of a whole row, or the masked lanes of an
            // edge row, are inside C's valid corner.
            unsafe {
                let dst = c.offset((first + i) as isize * rsc);
                let mut v = row;
                if cols == NR_COLUMNS {
                    if read_c {
                        let lo = _mm_loadu_ps(dst);
                        let hi = _mm_castsi128_ps(_mm_loadl_epi64(dst.add(4).cast()));
                        v = _mm256_fmadd_ps(beta, _mm256_set_m128(hi, lo), v);
                    }
                    v = clamp(v, ep.clamp);
                    _mm_storeu_ps(dst, _mm256_castps256_ps128(v));
                    let hi = _mm256_extractf128_ps::<1>(v);
                    _mm_storel_epi64(dst.add(4).cast(), _mm_castps_si128(hi));
                } else {
                    if read_c {
                        v = _mm256_fmadd_ps(beta, _mm256_maskload_ps(dst, col_mask), v);
                    }
                    v = clamp(v, ep.clamp);
                    _mm256_maskstore_ps(dst, col_mask, v);
                }
            }
        }
    }
}

/// `max(lo, v)` then `min(hi, v)`, which return `v` when it is NaN; `v`
/// itself without a clamp.
#[target_feature(enable = "avx")]
#[inline]
fn clamp(v: __m256, bounds: Option<(f32, f32)>) -> __m256 {
    match bounds {
        Some((lo, hi)) => _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v)),
        None => v,
    }
}

/// A mask of the first `n ≤ 8` lanes for `maskload` / `maskstore`.
#[target_feature(enable = "avx2")]
#[inline]
fn lane_mask(n: usize) -> __m256i {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes)
}

/// The k loop of [`kernel_columns`] for the first `NB` columns of the B
/// panel, over `CH` chains of k-steps (step `p` goes to chain `p mod CH`,
/// summed at the end). Returns the tile's columns, `acc[j][h]` = column `j`,
/// rows `8h..8h+8`, zero past `NB`.
///
/// # Safety
/// As [`kernel_columns`]; `NB ≤ 6`.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_columns<const NB: usize, const CH: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
) -> [[__m256; 2]; NR_COLUMNS] {
    let mut chains = [[[_mm256_setzero_ps(); 2]; NB]; CH];
    let (mut ap, mut bp) = (a, b);
    // SAFETY: (both loops) the panels hold kc steps of 16 (A) and at least
    // NB (B) floats, and the two loops run kc steps in all. A pre-packed A
    // may be only f32-aligned, hence the unaligned loads.
    let mut one_step = |acc: &mut [[__m256; 2]; NB]| unsafe {
        let av = [_mm256_loadu_ps(ap), _mm256_loadu_ps(ap.add(8))];
        for (j, col) in acc.iter_mut().enumerate() {
            let bj = _mm256_broadcast_ss(&*bp.add(j));
            col[0] = _mm256_fmadd_ps(av[0], bj, col[0]);
            col[1] = _mm256_fmadd_ps(av[1], bj, col[1]);
        }
        ap = ap.add(MR_COLUMNS);
        bp = bp.add(ldb);
    };
    for _ in 0..kc % CH {
        one_step(&mut chains[0]);
    }
    let steps = |chains: &mut [[[__m256; 2]; NB]; CH]| {
        for chain in chains.iter_mut() {
            one_step(chain);
        }
    };
    // SAFETY: kc / CH rounds of CH steps.
    unsafe {
        run_steps_prefetching_c::<_, 1>(
            kc / CH,
            c,
            rsc,
            csc,
            rows,
            4 * NR_COLUMNS,
            &mut chains,
            steps,
        )
    };
    core::array::from_fn(|j| {
        core::array::from_fn(|h| {
            if j < NB {
                chains[1..].iter().fold(chains[0][j][h], |sum, chain| {
                    _mm256_add_ps(sum, chain[j][h])
                })
            } else {
                _mm256_setzero_ps()
            }
        })
    })
}

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`, both
/// multiples of 8, in 8×8 tiles: eight row loads, 24 in-register shuffles
/// (unpack, shuffle within 128-bit halves, then swap halves) and eight
/// column stores, against two loads and stores and one shuffle more per
/// 16 floats in 4×4 tiles. Sixteen columns (a cache line of each source
/// row) at a time over all the rows, as [`crate::gemm::transpose`] does.
///
/// # Safety
/// `src[r·lds + c]` is readable and `dst[c·ldd + r]` writable for `r <
/// rows`, `c < cols`; `rows` and `cols` are multiples of 8; the CPU
/// supports AVX.
#[target_feature(enable = "avx")]
pub(crate) unsafe fn transpose_tiles_8x8(
    src: *const f32,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ldd: usize,
) {
    debug_assert!(rows.is_multiple_of(8) && cols.is_multiple_of(8));
    for c_block in (0..cols).step_by(16) {
        let c_end = (c_block + 16).min(cols);
        for r0 in (0..rows).step_by(8) {
            for c0 in (c_block..c_end).step_by(8) {
                // SAFETY: rows r0..r0 + 8 and columns c0..c0 + 8 are inside
                // the region the caller vouches for, in both matrices.
                unsafe {
                    let rows: [*const f32; 8] =
                        core::array::from_fn(|i| src.add((r0 + i) * lds + c0));
                    tile_8x8(rows, dst.add(c0 * ldd + r0), ldd);
                }
            }
        }
    }
}

/// `dst[c·ldd + r] = src[starts[r] + c]` for `r < starts.len()` (a multiple
/// of 8) and `c < cols` (at least 8): rows that start anywhere, eight at a
/// time in 8×8 tiles; a width that is not a multiple of 8 ends with a tile
/// that overlaps the one before it (it writes the same floats again).
///
/// # Safety
/// `src[starts[r] + c]` is readable and `dst[c·ldd + r]` writable for `r <
/// starts.len()`, `c < cols`; `starts.len()` is a multiple of 8, `cols ≥
/// 8`; the CPU supports AVX.
#[target_feature(enable = "avx")]
pub(crate) unsafe fn transpose_rows_at_8x8(
    src: *const f32,
    starts: &[usize],
    cols: usize,
    dst: *mut f32,
    ldd: usize,
) {
    debug_assert!(starts.len().is_multiple_of(8) && cols >= 8);
    for (g, group) in starts.chunks_exact(8).enumerate() {
        let r0 = 8 * g;
        let mut c0 = 0;
        loop {
            let c = c0.min(cols - 8);
            // SAFETY: rows r0..r0 + 8 and columns c..c + 8 ≤ cols are
            // inside the region the caller vouches for.
            unsafe {
                let rows: [*const f32; 8] = core::array::from_fn(|i| src.add(group[i] + c));
                tile_8x8(rows, dst.add(c * ldd + r0), ldd);
            }
            c0 += 8;
            if c0 >= cols {
                break;
            }
        }
    }
}

/// One 8×8 tile: `dst[e·ldd + i] = rows[i][e]` for `i, e < 8`.
///
/// # Safety
/// Each `rows[i]` is readable for 8 floats, `dst[e·ldd + i]` writable; the
/// CPU supports AVX.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn tile_8x8(rows: [*const f32; 8], dst: *mut f32, ldd: usize) {
    // SAFETY: the caller's contract covers every load and store.
    unsafe {
        // Loops, not `from_fn` closures, so that the intrinsics inline here
        // with this function's features.
        let mut r = [_mm256_setzero_ps(); 8];
        for (v, &row) in r.iter_mut().zip(rows.iter()) {
            *v = _mm256_loadu_ps(row);
        }
        for (e, v) in transpose_8x8(r).iter().enumerate() {
            _mm256_storeu_ps(dst.add(e * ldd), *v);
        }
    }
}

/// The 8×8 transpose in registers: lane `i` of `out[e]` is lane `e` of
/// `r[i]`. Eight unpacks, eight in-half shuffles, eight half swaps.
#[target_feature(enable = "avx")]
#[inline]
fn transpose_8x8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved by element, in each half.
    let mut t = [_mm256_setzero_ps(); 8];
    for p in 0..4 {
        t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    // Quads: u[4g + e] holds, in each half, column e (and e + 4 in the
    // high half) of rows 4g..4g + 4.
    let mut u = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let (lo, hi) = (4 * g, 4 * g + 1);
        let (lo2, hi2) = (4 * g + 2, 4 * g + 3);
        u[4 * g] = _mm256_shuffle_ps::<0x44>(t[lo], t[lo2]);
        u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(t[lo], t[lo2]);
        u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(t[hi], t[hi2]);
        u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(t[hi], t[hi2]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for e in 0..4 {
        out[e] = _mm256_permute2f128_ps::<0x20>(u[e], u[4 + e]);
        out[4 + e] = _mm256_permute2f128_ps::<0x31>(u[e], u[4 + e]);
    }
    out
}
