//! AVX2 + FMA micro-kernel: `6 × 16` tiles (BLIS's Haswell sgemm shape).
//!
//! Twelve ymm accumulators, two for the B row and one for the A broadcast fill
//! 15 of the 16 ymm registers; two FMA pipes at 4–5 cycles latency need 8–10
//! independent accumulators, so 12 keeps them busy.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::{run_steps_prefetching_c, store_tile_scalar, TileEpilogue};

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
    let a_rows: [*const f32; MR] = core::array::from_fn(|i| a.wrapping_add(i * ars));
    let (mut ak, mut bp) = (0, b);
    let step = |acc: &mut [[__m256; 2]; MR]| {
        // SAFETY: the panels hold kc steps of MR (A) and 16 (B) floats, and
        // the caller runs at most kc steps.
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
    unsafe { run_steps_prefetching_c(kc, c, rsc, csc, rows, 4 * NR, &mut acc, step) };

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
