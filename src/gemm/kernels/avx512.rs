//! AVX-512F micro-kernel: `MR × 32` tiles, C vectorised along its rows.
//!
//! Each k-step loads one 32-wide row of the B panel (two zmm) and, for each of
//! the MR rows, broadcasts one A value and issues two FMAs, so the tile lives
//! in `2·MR` zmm accumulators. Zen 5 and Skylake-X retire two 512-bit FMAs per
//! cycle with 4-cycle latency, so at least 8 independent accumulators are
//! needed to saturate them; `MR = 8` gives 16 and `MR = 12` gives 24.
//!
//! Tile sizes measured here (Zen 5, 1 thread, square 1024 and the im2col
//! shapes, `cpuconv gemm`) are recorded in `MR`'s comment.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::{store_tile_scalar, TileEpilogue};

/// Columns of a B panel: two zmm registers.
pub(crate) const NR: usize = 32;

/// Rows of an A panel.
///
/// Tiles tried on this Zen 5 (1 thread, GFLOP/s of the whole GEMM, best of
/// a few runs on a shared machine; shapes M×K×N, FMA peak ≈ 259):
///
/// | tile   | acc | 64×192×256 (in cache) | 1024³ | 64×576×3136 |
/// |--------|-----|-----------------------|-------|-------------|
/// | 8×32   | 16  | 208                   | 223   | 192         |
/// | 8×48   | 24  | 185                   | 199   | 185         |
/// | 6×64   | 24  | 199                   | 200   | 184         |
/// | 12×32  | 24  | 165                   | 193   | 159         |
/// | 14×32  | 28  | 168                   | 170   | 166         |
///
/// 8×32 wins, and 8 divides every channel count of the convolution suite, so
/// no A-panel rows are wasted on convolution weights.
pub(crate) const MR: usize = 8;

/// The dispatched micro-kernel; see [`super::MicroKernelFn`].
///
/// # Safety
/// As [`super::MicroKernelFn`]; the CPU supports AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded; dispatch only selects this kernel when AVX-512F is present.
    unsafe { kernel_mr::<MR, 2>(kc, a, b, ldb, c, rsc, csc, rows, cols, epilogue) }
}

/// How many k-steps before the end of the loop the C tile is prefetched.
/// 128 steps are about 1000 cycles at two FMAs per cycle, longer than a
/// memory access, while the A and B panels stream only 20 KiB through L1 in
/// that time, too little to evict the tile again. Measured at 2048³
/// (1 thread, near-best of 30 runs): prefetching at the start of the loop
/// 81%, 32 steps before the end 86%, 128 steps within noise of that or up
/// to 3% better.
const PREFETCH_C_STEPS: usize = 128;

/// Columns the narrow kernel computes: one zmm.
pub(crate) const NR_NARROW: usize = 16;

/// `MR × 16` over the same 32-wide B panels, for a right-edge panel with at
/// most 16 real columns (e.g. 196 = 6·32 + 4 output pixels of a 14×14 layer):
/// half the FMAs of the full kernel on a mostly-zero panel.
///
/// # Safety
/// As [`kernel`], with `cols ≤ 16`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_narrow(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded; of the NR floats per B step this kernel reads the
    // first 16.
    unsafe { kernel_mr::<MR, 1>(kc, a, b, ldb, c, rsc, csc, rows, cols, epilogue) }
}

/// `R × 16·V` kernel for any `R ≤ 16`, `V ≤ 4`.
///
/// # Safety
/// As [`kernel`].
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn kernel_mr<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let (mut ap, mut bp) = (a, b);
    // One k-step: V vector loads of B, R broadcasts of A, R·V FMAs.
    let mut step = |acc: &mut [[__m512; V]; R]| {
        // SAFETY: the panels hold kc steps of R (A) and 16·V (B) floats, and
        // the caller runs at most kc steps. A packed B is 64-byte aligned,
        // so its unaligned loads cost nothing extra; an in-place B may not be.
        unsafe {
            let bv: [__m512; V] = core::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(ai, bv[v], *x);
                }
            }
            ap = ap.add(R);
            bp = bp.add(ldb);
        }
    };
    let tail = kc.min(PREFETCH_C_STEPS);
    for _ in 0..kc - tail {
        step(&mut acc);
    }
    // Pull the C tile into L1 a few hundred cycles before the epilogue
    // reads it. Prefetched at the start, it would be evicted again by the
    // A and B panels streaming through L1 (tens of KiB), and each tile of a
    // β = 1 pass would wait on C from L3 or memory.
    if csc == 1 {
        for i in 0..rows {
            // SAFETY: prefetch never faults; the address is inside row i of the tile.
            unsafe {
                let row = c.offset(i as isize * rsc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(4 * 16 * V - 4));
            }
        }
    }
    for _ in 0..tail {
        step(&mut acc);
    }

    if csc != 1 {
        // SAFETY: forwarded contract.
        unsafe { store_acc_strided(&acc, c, rsc, csc, rows, cols, ep) };
        return;
    }

    // Unit column stride: vector epilogue, masked on a right edge. The row
    // loop has a constant trip count so that it unrolls and the
    // accumulators stay in registers (a loop that breaks at `rows` spills
    // all of them to the stack first).
    let masks: [__mmask16; V] = core::array::from_fn(|v| {
        let here = cols.saturating_sub(16 * v).min(16);
        ((1u32 << here) - 1) as u16
    });
    let alpha = _mm512_set1_ps(ep.alpha);
    let beta = _mm512_set1_ps(ep.beta);
    let read_c = ep.beta != 0.0;
    for (i, row) in acc.iter().enumerate() {
        if i < rows {
            // SAFETY: row i < rows of the tile; masked lanes beyond `cols`
            // are neither read nor written.
            unsafe {
                let cp = c.offset(i as isize * rsc);
                let bias = if ep.bias.is_null() {
                    None
                } else {
                    Some(_mm512_set1_ps(*ep.bias.add(i)))
                };
                for (h, &mask) in masks.iter().enumerate() {
                    if mask == 0 {
                        continue;
                    }
                    let dst = cp.add(16 * h);
                    let mut v = _mm512_mul_ps(row[h], alpha);
                    if read_c {
                        v = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mask, dst), v);
                    }
                    if let Some(bv) = bias {
                        v = _mm512_add_ps(v, bv);
                    }
                    if let Some((lo, hi)) = ep.clamp {
                        // max(lo, v) / min(hi, v) return v when v is NaN.
                        v = _mm512_max_ps(_mm512_set1_ps(lo), v);
                        v = _mm512_min_ps(_mm512_set1_ps(hi), v);
                    }
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

/// The epilogue for a C with non-unit column stride, through a scalar
/// store; out of line, so that its 4 KiB staging tile does not weigh on the
/// frame of every kernel call.
///
/// # Safety
/// As [`kernel`] for `c`, `rsc`, `csc`, `rows`, `cols` and `ep`.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn store_acc_strided<const R: usize, const V: usize>(
    acc: &[[__m512; V]; R],
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    let nr = 16 * V;
    let mut tile = [0.0f32; 16 * 64];
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            // SAFETY: tile has room for 16 rows of 64; R ≤ 16 and V ≤ 4.
            unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add(i * nr + 16 * v), *x) };
        }
    }
    // SAFETY: forwarded contract.
    unsafe { store_tile_scalar(&tile, nr, c, rsc, csc, rows, cols, ep) };
}
