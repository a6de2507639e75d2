//! AVX-512F micro-kernels: `MR × 32` and `MR × 48` tiles with C
//! vectorised along its rows, and `32 × 8` tiles vectorised down its
//! columns (see [`kernel_columns`]).
//!
//! Each k-step loads one row of the B panel (two or three zmm) and, for
//! each of the MR rows, broadcasts one A value and issues one FMA per B
//! vector, so the tile lives in `2·MR` or `3·MR` zmm accumulators. Zen 5
//! and Skylake-X retire two 512-bit FMAs per cycle with 4-cycle latency, so
//! at least 8 independent accumulators are needed to saturate them;
//! `MR = 8` gives 16 or 24.
//!
//! Which of the two row tiles a CPU runs is measured per vendor (`MR`'s
//! and [`NR_WIDE`]'s comments); the choice is `kernels::wide_tiles`.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::{
    run_steps_prefetching_c, store_columns_scalar, store_tile_scalar, TileEpilogue,
    A_COLUMN_PREFETCH_STEPS,
};

/// Columns of a B panel: two zmm registers.
pub(crate) const NR: usize = 32;

/// Columns of the wide tile's B panel: three zmm registers, 24
/// accumulators.
///
/// Measured on an Intel Xeon (family 6 model 167, AVX-512; 1 thread,
/// `sgemm` row-major, one process per tile alternating, three rounds, best /
/// median GFLOP/s, 8×32 → 8×48): 960³ 139/135 → 147/145, 1024³ 140/133 →
/// 143/142, 2048³ 130/130 → 139/138, 512³ 144/143 → 147/146, 64×576×3136
/// 127/126 → 137/135, 192×576×3136 136/135 → 140/138, 256×2304×196
/// 135/133 → 142/141, 128×1152×784 128/127 → 136/136, 64×147×12544
/// 116/114 → 129/128. Zen 5 ran it slower (`MR`'s table), so only Intel
/// CPUs take it by default.
pub(crate) const NR_WIDE: usize = 48;

/// Whether `ldb` is the row stride of a packed panel of either row tile
/// rather than of a B read in place. An in-place B whose rows happen to be
/// 32 or 48 floats apart is taken for a panel: it only loses the B
/// prefetch, which rows that close do not need.
fn is_panel_stride(ldb: usize) -> bool {
    ldb == NR || ldb == NR_WIDE
}

/// Rows of an A panel.
///
/// Tiles tried on a Zen 5 (1 thread, GFLOP/s of the whole GEMM, best of
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
/// 8×32 wins there, and 8 divides every channel count of the convolution
/// suite, so no A-panel rows are wasted on convolution weights. On Intel
/// 8×48 wins ([`NR_WIDE`]); both tiles keep `MR = 8`, so A panels packed
/// for one serve the other.
pub(crate) const MR: usize = 8;

/// The dispatched `MR × 32` micro-kernel (also the `MR × 48` tile's edge
/// for 17–32 columns); see [`super::MicroKernelFn`].
///
/// # Safety
/// As [`super::MicroKernelFn`]; the CPU supports AVX-512F.
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
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded; dispatch only selects this kernel when AVX-512F is present.
    unsafe { kernel_mr::<MR, 2>(kc, a, ars, acs, b, ldb, c, rsc, csc, rows, cols, epilogue) }
}

/// The `MR × 48` tile over 48-wide B panels ([`NR_WIDE`]).
///
/// # Safety
/// As [`kernel`], with `ldb ≥ 48` floats between B's k-steps.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_wide(
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
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded; dispatch only selects this kernel when AVX-512F is present.
    unsafe { kernel_mr::<MR, 3>(kc, a, ars, acs, b, ldb, c, rsc, csc, rows, cols, epilogue) }
}

/// Columns the narrow kernel computes: one zmm.
pub(crate) const NR_NARROW: usize = 16;

/// `MR × 16` over the same 32- or 48-wide B panels, for a right-edge panel
/// with at most 16 real columns (e.g. 196 = 6·32 + 4 output pixels of a
/// 14×14 layer): half the FMAs of the full kernel on a mostly-zero panel.
///
/// # Safety
/// As [`kernel`], with `cols ≤ 16`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_narrow(
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
    epilogue: &TileEpilogue,
) {
    // SAFETY: forwarded; of the NR floats per B step this kernel reads the
    // first 16.
    unsafe { kernel_mr::<MR, 1>(kc, a, ars, acs, b, ldb, c, rsc, csc, rows, cols, epilogue) }
}

/// The tiles of one, two and three zmm (`V = 1, 2, 3`, in that order) for a
/// bottom-edge A panel of `R < MR` real rows, entry `R − 1`: the rows past
/// the matrix are padding, whose FMAs a full tile would run anyway (147 =
/// 18·8 + 3 rows, r50_conv1's grad input and weight gradient: 5 of 8 rows
/// in the last panel).
pub(crate) const KERNELS_SHORT: [[super::MicroKernelFn; super::SHORT_ROWS]; 3] = [
    [
        kernel_mr::<1, 1>,
        kernel_mr::<2, 1>,
        kernel_mr::<3, 1>,
        kernel_mr::<4, 1>,
        kernel_mr::<5, 1>,
        kernel_mr::<6, 1>,
        kernel_mr::<7, 1>,
    ],
    [
        kernel_mr::<1, 2>,
        kernel_mr::<2, 2>,
        kernel_mr::<3, 2>,
        kernel_mr::<4, 2>,
        kernel_mr::<5, 2>,
        kernel_mr::<6, 2>,
        kernel_mr::<7, 2>,
    ],
    [
        kernel_mr::<1, 3>,
        kernel_mr::<2, 3>,
        kernel_mr::<3, 3>,
        kernel_mr::<4, 3>,
        kernel_mr::<5, 3>,
        kernel_mr::<6, 3>,
        kernel_mr::<7, 3>,
    ],
];

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
    // SAFETY: forwarded; no peeled columns are read or written.
    unsafe {
        kernel_mr_with_columns::<R, V, 0>(
            kc,
            a,
            ars,
            acs,
            b,
            ldb,
            c,
            rsc,
            csc,
            rows,
            cols,
            ep,
            core::ptr::null(),
            0,
            &mut [0.0; 32],
        )
    }
}

/// [`super::TileWithColumnsFn`] for this path: the tile of one, two or
/// three zmm that `cols` needs, with one or two peeled columns.
///
/// # Safety
/// As [`super::TileWithColumnsFn`]; the CPU supports AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_with_columns(
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
    columns: *const f32,
    ld: usize,
    count: usize,
    out: &mut [f32; 32],
) {
    debug_assert_eq!(
        ars, 1,
        "peeled columns ride along only with contiguous A columns"
    );
    macro_rules! run {
        ($v:literal, $p:literal) => {
            // SAFETY: forwarded; a tile of `V` zmm reads the first 16·V of
            // the panel's floats per B step, and `cols ≤ 16·V` of them are
            // C's.
            unsafe {
                kernel_mr_with_columns::<MR, $v, $p>(
                    kc, a, ars, acs, b, ldb, c, rsc, csc, rows, cols, ep, columns, ld, out,
                )
            }
        };
    }
    match (cols.div_ceil(16), count) {
        (0 | 1, 1) => run!(1, 1),
        (0 | 1, _) => run!(1, 2),
        (2, 1) => run!(2, 1),
        (2, _) => run!(2, 2),
        (_, 1) => run!(3, 1),
        (_, _) => run!(3, 2),
    }
}

/// How many k-steps ahead a kernel reading B in place prefetches B's rows.
/// Those rows lie a row of B apart (3136 floats for a 1×1 layer on a 56²
/// plane), beyond the reach of Intel's L1 stride prefetcher (2 KiB), and
/// each step needs a new pair of lines. Measured, 1 thread AVX-512, Xeon
/// (family 6 model 167, L2 2 MiB), one process, without and with, best
/// GFLOP/s (`sgemm`, row-major): 64×576×3136 145 → 164, 64×147×12544
/// 130 → 135, 64×256×3136 147 → 163, 128×512×1000 142 → 152, 512³ 174 →
/// 187, 256×2304×196 154 → 162; 4, 6, 8 or 12 steps ahead within 2% of
/// each other. The forward of r50_1x1 (B: the input planes, 3136 floats
/// apart) 151 → 168; the suite's other forward and gradient passes moved
/// within noise.
const B_PREFETCH_STEPS: usize = 8;

/// The k-steps of [`kernel_mr_with_columns`] into `acc`; with `B_IN_PLACE`
/// (B's rows are `ldb` apart, not a packed panel) each step also prefetches
/// B's row [`B_PREFETCH_STEPS`] ahead.
///
/// # Safety
/// As [`kernel_mr_with_columns`].
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn accumulate<const R: usize, const V: usize, const P: usize, const B_IN_PLACE: bool>(
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
    columns: *const f32,
    ld: usize,
    acc: &mut ([[__m512; V]; R], [__m512; P]),
) {
    if P == 0 && ars == 1 {
        // SAFETY: forwarded; A's steps are contiguous: a packed panel
        // (`acs = R`) or a column-major A read in place.
        unsafe {
            if acs == R {
                accumulate_contiguous_a::<R, V, P, B_IN_PLACE, false>(
                    kc, a, R, b, ldb, c, rsc, csc, rows, acc,
                )
            } else {
                accumulate_contiguous_a::<R, V, P, B_IN_PLACE, true>(
                    kc, a, acs, b, ldb, c, rsc, csc, rows, acc,
                )
            }
        };
        return;
    }
    let a_rows: [*const f32; R] = core::array::from_fn(|i| a.wrapping_add(i * ars));
    let (mut ak, mut bp, mut colp) = (0, b, columns);
    let a_mask: __mmask16 = ((1u32 << R.min(16)) - 1) as u16;
    // One k-step: V vector loads of B, R broadcasts of A, R·V FMAs; with
    // peeled columns, one vector of A and P more FMAs.
    let step = |(acc, peeled): &mut ([[__m512; V]; R], [__m512; P])| {
        // SAFETY: the panels hold kc steps of R (A) and 16·V (B) floats, and
        // the caller runs at most kc steps. A packed B is 64-byte aligned,
        // so its unaligned loads cost nothing extra; an in-place B may not be.
        // With P > 0, A's R values of this step are contiguous (ars == 1)
        // and each peeled column holds kc values.
        unsafe {
            let bv: [__m512; V] = core::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
            if B_IN_PLACE {
                // A prefetch never faults, whatever the address.
                let ahead = bp.wrapping_add(B_PREFETCH_STEPS * ldb);
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * v).cast());
                }
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a_rows[i].add(ak));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(ai, bv[v], *x);
                }
            }
            if P > 0 {
                // A plain 256-bit load for an 8-row panel: a masked load
                // costs far more than its lanes on Zen 5 (see finish_store).
                let column = if R == 8 {
                    _mm512_castps256_ps512(_mm256_loadu_ps(a.add(ak)))
                } else {
                    _mm512_maskz_loadu_ps(a_mask, a.add(ak))
                };
                for (q, x) in peeled.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(column, _mm512_set1_ps(*colp.add(q * ld)), *x);
                }
                colp = colp.add(1);
            }
            ak += acs;
            bp = bp.add(ldb);
        }
    };
    // SAFETY: the step runs kc times.
    unsafe { run_steps_prefetching_c::<_, 1>(kc, c, rsc, csc, rows, 4 * 16 * V, acc, step) };
}

/// [`accumulate`] where A's R values of step `p` are the R floats at
/// `a + p·a_step`, walked by one pointer: a packed panel (`a_step = R`,
/// `COLUMN_MAJOR` false) or a column-major A read in place (`a_step` its
/// column stride).
///
/// A packed panel runs four steps to an iteration, so that every load of a
/// step is that pointer or B's plus a constant offset. The general loop
/// keeps a pointer per row of A and adds the step to each, nine integer
/// operations a step beside the FMAs. Measured, 1 thread AVX-512, Intel
/// Xeon (family 6 model 167), one process alternating with the general
/// loop, median of 7 rounds (GFLOP/s, `sgemm` row-major): 64³ 119.9 →
/// 129.4, 512³ 150.4 → 156.1, 1024³ 141.4 → 151.3, 128×1152×784 142.1 →
/// 154.5, 64×576×3136 134.6 → 141.2, 64×147×12544 131.1 → 139.8, 128³,
/// 256³ and 256×2304×196 within 1%; the plan forward of r50_1x1 141.6 →
/// 147.4, r50_conv1 and batch16 within 1.5%. AVX2 (the same loop in its
/// kernel): 256³ 95.7 → 105.4, 1024³ 94.7 → 98.2, 64×147×12544 64.5 →
/// 79.5.
///
/// A column-major A runs one step an iteration and prefetches the step
/// [`A_COLUMN_PREFETCH_STEPS`] ahead: its steps lie a column apart, too
/// far for the hardware prefetchers to follow, and each is a cache line of
/// its own.
///
/// # Safety
/// As [`accumulate`], with `ars = 1`, `P = 0` and `acs = a_step` (`R`
/// unless `COLUMN_MAJOR`).
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn accumulate_contiguous_a<
    const R: usize,
    const V: usize,
    const P: usize,
    const B_IN_PLACE: bool,
    const COLUMN_MAJOR: bool,
>(
    kc: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    acc: &mut ([[__m512; V]; R], [__m512; P]),
) {
    // A compile-time constant for a packed panel, so that its four steps'
    // addresses fold into offsets.
    let a_step = if COLUMN_MAJOR { a_step } else { R };
    let a_ahead = A_COLUMN_PREFETCH_STEPS * a_step;
    let (mut ap, mut bp) = (a, b);
    let step = |(acc, _): &mut ([[__m512; V]; R], [__m512; P])| {
        // SAFETY: A holds kc steps of R floats, a_step apart, and B kc
        // steps of 16·V; the caller runs at most kc steps. A prefetch never
        // faults, whatever the address.
        unsafe {
            let bv: [__m512; V] = core::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
            if B_IN_PLACE {
                let ahead = bp.wrapping_add(B_PREFETCH_STEPS * ldb);
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * v).cast());
                }
            }
            if COLUMN_MAJOR {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(a_ahead).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(ai, bv[v], *x);
                }
            }
            ap = ap.add(a_step);
            bp = bp.add(ldb);
        }
    };
    // SAFETY: the step runs kc times.
    unsafe {
        if COLUMN_MAJOR {
            run_steps_prefetching_c::<_, 1>(kc, c, rsc, csc, rows, 4 * 16 * V, acc, step)
        } else {
            run_steps_prefetching_c::<_, 4>(kc, c, rsc, csc, rows, 4 * 16 * V, acc, step)
        }
    };
}

/// [`kernel_mr`] that also accumulates `P` peeled columns of C (see
/// [`super::TileWithColumnsFn`]): each k-step loads the micro-panel's
/// column of A (the R values the tile broadcasts one by one, contiguous
/// where `ars == 1`) as one vector and adds its product with each peeled
/// column's B value, in `P` more accumulators. 49 columns with A
/// column-major then cost a full and a narrow tile plus one FMA a step,
/// not two full tiles; a separate dot-product pass over the same
/// micro-panel measured slower than the tiles it replaced, its A lines
/// (2 KiB apart, read in place) having left L1.
///
/// # Safety
/// As [`kernel`]; with `P > 0`, also `ars == 1`, `R ≤ 16`, and
/// `columns + q·ld + p` readable for `q < P`, `p < kc`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel_mr_with_columns<const R: usize, const V: usize, const P: usize>(
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
    columns: *const f32,
    ld: usize,
    out: &mut [f32; 32],
) {
    let mut acc = ([[_mm512_setzero_ps(); V]; R], [_mm512_setzero_ps(); P]);
    // SAFETY: forwarded.
    unsafe {
        if is_panel_stride(ldb) {
            accumulate::<R, V, P, false>(
                kc, a, ars, acs, b, ldb, c, rsc, csc, rows, columns, ld, &mut acc,
            )
        } else {
            accumulate::<R, V, P, true>(
                kc, a, ars, acs, b, ldb, c, rsc, csc, rows, columns, ld, &mut acc,
            )
        }
    };
    let (acc, peeled) = acc;
    for (q, x) in peeled.iter().enumerate() {
        // SAFETY: `out` holds 32 floats and q < P ≤ 2.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * q), *x) };
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
                    let product = _mm512_mul_ps(row[h], alpha);
                    finish_store(cp.add(16 * h), mask, product, read_c, beta, bias, ep.clamp);
                }
            }
        }
    }
}

/// `clamp(v + β·C + bias)` into the lanes of `dst` that `mask` selects; C
/// is read only when `read_c`.
///
/// A whole row (all 16 lanes, or the low 8 of a column-kernel row) goes
/// through plain loads and stores: on Zen 5 a masked load or store costs
/// far more than its lanes even with every lane selected, and keeping them
/// off the interior tiles took 1 thread AVX-512 1024³ from 211 to 229
/// GFLOP/s and 2048³ from 212 to 233 (β = 0; β = 1: 202 → 228 and 206 → 233),
/// measured in one process, alternating the two.
///
/// # Safety
/// The selected lanes of `dst` are writable, and readable when `read_c`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish_store(
    dst: *mut f32,
    mask: __mmask16,
    v: __m512,
    read_c: bool,
    beta: __m512,
    bias: Option<__m512>,
    clamp: Option<(f32, f32)>,
) {
    const ALL: __mmask16 = 0xffff;
    const LOW_HALF: __mmask16 = 0x00ff;
    let mut v = v;
    if read_c {
        // SAFETY: the selected lanes are readable when read_c (contract);
        // the unmasked loads read exactly the selected lanes.
        let c = unsafe {
            match mask {
                ALL => _mm512_loadu_ps(dst),
                LOW_HALF => _mm512_castps256_ps512(_mm256_loadu_ps(dst)),
                _ => _mm512_maskz_loadu_ps(mask, dst),
            }
        };
        v = _mm512_fmadd_ps(beta, c, v);
    }
    if let Some(b) = bias {
        v = _mm512_add_ps(v, b);
    }
    if let Some((lo, hi)) = clamp {
        // max(lo, v) / min(hi, v) return v when v is NaN.
        v = _mm512_max_ps(_mm512_set1_ps(lo), v);
        v = _mm512_min_ps(_mm512_set1_ps(hi), v);
    }
    // SAFETY: the selected lanes are writable (contract), and the unmasked
    // stores write exactly those.
    unsafe {
        match mask {
            ALL => _mm512_storeu_ps(dst, v),
            LOW_HALF => _mm256_storeu_ps(dst, _mm512_castps512_ps256(v)),
            _ => _mm512_mask_storeu_ps(dst, mask, v),
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

/// Rows of the column kernel's tile: two zmm down a column of C.
pub(crate) const MR_COLUMNS: usize = 32;
/// Columns of the column kernel's tile: one broadcast of B each.
pub(crate) const NR_COLUMNS: usize = 8;

/// `32 × 8` tiles vectorised down the columns of C, for a C with few
/// columns: 49 columns (a 7×7 output plane) cost 64 in 32-wide row tiles
/// but 56 in 8-wide column tiles.
///
/// Each k-step loads 32 values of the A panel (two zmm) and broadcasts the 8
/// values of the B panel, so the tile lives in 16 accumulators, one per
/// (column, half). The epilogue applies α and the bias down the columns,
/// transposes the tile in registers (three shuffle stages per 16 × 8 half)
/// and finishes β·C and the clamp on the rows of C, with row stores masked
/// only at a right edge.
///
/// # Safety
/// As [`kernel`], for a packed 32-row A panel (`ars = 1`, `acs = 32`: its
/// k-steps are loaded as vectors) and an 8-column B panel.
#[target_feature(enable = "avx512f,fma")]
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
    // k split over independent chains so that 8 accumulators still hide
    // the FMA latency: 49 = 6·8 + 1 columns then cost about 49, not 56.
    // SAFETY: (each arm) forwarded; `cols ≤ NB` columns of each B step are read.
    let acc = unsafe {
        match cols {
            1 => accumulate_columns::<1, 4>(kc, a, b, ldb, c, rsc, csc, rows),
            2 => accumulate_columns::<2, 2>(kc, a, b, ldb, c, rsc, csc, rows),
            3 | 4 => accumulate_columns::<4, 1>(kc, a, b, ldb, c, rsc, csc, rows),
            _ => accumulate_columns::<NR_COLUMNS, 1>(kc, a, b, ldb, c, rsc, csc, rows),
        }
    };

    if csc != 1 {
        // SAFETY: forwarded contract.
        unsafe { store_columns_strided(&acc, c, rsc, csc, rows, cols, ep) };
        return;
    }

    // α·acc + bias, down the columns, where the bias is a vector.
    let alpha = _mm512_set1_ps(ep.alpha);
    let row_masks: [__mmask16; 2] = core::array::from_fn(|h| {
        let here = rows.saturating_sub(16 * h).min(16);
        ((1u32 << here) - 1) as u16
    });
    let bias: [__m512; 2] = core::array::from_fn(|h| {
        if ep.bias.is_null() {
            _mm512_setzero_ps()
        } else {
            // SAFETY: bias holds `rows` values; masked lanes are not read.
            unsafe { _mm512_maskz_loadu_ps(row_masks[h], ep.bias.add(16 * h)) }
        }
    });
    let col_mask: __mmask16 = ((1u32 << cols) - 1) as u16;
    let beta = _mm512_set1_ps(ep.beta);
    let read_c = ep.beta != 0.0;
    // One row of the tile, in the low 8 lanes of `v`, through β·C and the
    // clamp into row `i` of C.
    let store_row = |v: __m512, i: usize| {
        if i >= rows {
            return;
        }
        // SAFETY: row i < rows of the tile; lanes past `cols` are masked.
        unsafe {
            let dst = c.offset(i as isize * rsc);
            finish_store(dst, col_mask, v, read_c, beta, None, ep.clamp);
        }
    };
    // Lane indices that interleave the 128-bit lanes of two vectors:
    // [x.0, y.0, x.2, y.2] and [x.1, y.1, x.3, y.3].
    let even_lanes = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    let odd_lanes = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for h in 0..2 {
        if 16 * h >= rows {
            break;
        }
        let x: [__m512; NR_COLUMNS] =
            core::array::from_fn(|j| _mm512_fmadd_ps(acc[j][h], alpha, bias[h]));
        // Stage 1: within each 128-bit lane, interleave column pairs.
        let t: [__m512; NR_COLUMNS] = core::array::from_fn(|q| {
            let (x0, x1) = (x[q / 2 * 2], x[q / 2 * 2 + 1]);
            if q % 2 == 0 {
                _mm512_unpacklo_ps(x0, x1)
            } else {
                _mm512_unpackhi_ps(x0, x1)
            }
        });
        // Stage 2: lane row r of columns 0–3 (u[r]) and 4–7 (u[4 + r]);
        // 128-bit lane l of each holds tile row 4l + r.
        let u: [__m512; NR_COLUMNS] = core::array::from_fn(|q| {
            let (half, r) = (q / 4, q % 4);
            let (lo, hi) = (t[4 * half + r / 2], t[4 * half + 2 + r / 2]);
            if r % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(lo, hi)
            } else {
                _mm512_shuffle_ps::<0xEE>(lo, hi)
            }
        });
        // Stage 3: whole rows of 8: rows (r, r + 8) and (r + 4, r + 12).
        for r in 0..4 {
            let pair_low = _mm512_permutex2var_ps(u[r], even_lanes, u[4 + r]);
            let pair_high = _mm512_permutex2var_ps(u[r], odd_lanes, u[4 + r]);
            let base = 16 * h;
            store_row(pair_low, base + r);
            store_row(
                _mm512_shuffle_f32x4::<0xEE>(pair_low, pair_low),
                base + r + 8,
            );
            store_row(pair_high, base + r + 4);
            store_row(
                _mm512_shuffle_f32x4::<0xEE>(pair_high, pair_high),
                base + r + 12,
            );
        }
    }
}

/// The k loop of [`kernel_columns`] for the first `NB` columns of the B
/// panel, over `CH` chains of k-steps (step `p` goes to chain `p mod CH`,
/// summed at the end). Returns the tile's columns, `acc[j][h]` = column `j`,
/// rows `16h..16h+16`, zero past `NB`.
///
/// # Safety
/// As [`kernel_columns`]; `NB ≤ 8`.
#[target_feature(enable = "avx512f,fma")]
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
) -> [[__m512; 2]; NR_COLUMNS] {
    let mut chains = [[[_mm512_setzero_ps(); 2]; NB]; CH];
    let (mut ap, mut bp) = (a, b);
    // SAFETY: (both loops) the panels hold kc steps of 32 (A) and at least
    // NB (B) floats, and the two loops run kc steps in all. A pre-packed A
    // may be only f32-aligned, hence the unaligned loads.
    let mut one_step = |acc: &mut [[__m512; 2]; NB]| unsafe {
        let av = [_mm512_loadu_ps(ap), _mm512_loadu_ps(ap.add(16))];
        for (j, col) in acc.iter_mut().enumerate() {
            let bj = _mm512_set1_ps(*bp.add(j));
            col[0] = _mm512_fmadd_ps(av[0], bj, col[0]);
            col[1] = _mm512_fmadd_ps(av[1], bj, col[1]);
        }
        ap = ap.add(MR_COLUMNS);
        bp = bp.add(ldb);
    };
    for _ in 0..kc % CH {
        one_step(&mut chains[0]);
    }
    let steps = |chains: &mut [[[__m512; 2]; NB]; CH]| {
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
                    _mm512_add_ps(sum, chain[j][h])
                })
            } else {
                _mm512_setzero_ps()
            }
        })
    })
}

/// [`kernel_columns`]'s epilogue for a C with non-unit column stride,
/// through the scalar store.
///
/// # Safety
/// As [`kernel`] for `c`, `rsc`, `csc`, `rows`, `cols` and `ep`.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn store_columns_strided(
    acc: &[[__m512; 2]; NR_COLUMNS],
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    let mut columns = [0.0f32; MR_COLUMNS * NR_COLUMNS];
    for (j, col) in acc.iter().enumerate() {
        for (h, x) in col.iter().enumerate() {
            // SAFETY: 16 floats at j·32 + 16h, inside `columns`.
            unsafe { _mm512_storeu_ps(columns.as_mut_ptr().add(j * MR_COLUMNS + 16 * h), *x) };
        }
    }
    // SAFETY: forwarded contract; `columns` holds NR_COLUMNS columns of
    // MR_COLUMNS ≥ rows values.
    unsafe { store_columns_scalar(&columns, MR_COLUMNS, c, rsc, csc, rows, cols, ep) };
}

/// Dot products of `rows` rows of a row-major A (`lda` apart) with one
/// contiguous column `b` of `k` values: `out[i] = Σ_p a[i·lda + p]·b[p]`.
///
/// The driver peels the last one or two columns of a C whose width is just
/// past a multiple of 16 off the GEMM and computes them here: 49 columns cost
/// four 16-wide vectors per row in tiles, but three plus two dot products.
///
/// # Safety
/// `a + i·lda + p` is readable for `i < rows`, `p < k`; `b` holds `k`
/// floats; `out` holds `rows`; the CPU supports AVX-512F.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn dot_rows(
    k: usize,
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    out: &mut [f32],
) {
    // Four rows at a time: four independent FMA chains, each B vector
    // loaded once for all four.
    const G: usize = 4;
    let full = k / 16 * 16;
    let tail: __mmask16 = ((1u32 << (k - full)) - 1) as u16;
    for i0 in (0..rows).step_by(G) {
        let group = G.min(rows - i0);
        let row_ptrs: [*const f32; G] =
            core::array::from_fn(|r| a.wrapping_add((i0 + r.min(group - 1)) * lda));
        let mut acc = [_mm512_setzero_ps(); G];
        // SAFETY: p + 16 ≤ full ≤ k for every load below, and the masked
        // tail reads only p < k; rows past `group` repeat the last row.
        unsafe {
            for p in (0..full).step_by(16) {
                let bv = _mm512_loadu_ps(b.add(p));
                for (x, row) in acc.iter_mut().zip(row_ptrs) {
                    *x = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(p)), bv, *x);
                }
            }
            if tail != 0 {
                let bv = _mm512_maskz_loadu_ps(tail, b.add(full));
                for (x, row) in acc.iter_mut().zip(row_ptrs) {
                    *x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row.add(full)), bv, *x);
                }
            }
        }
        for (r, x) in acc.iter().enumerate().take(group) {
            out[i0 + r] = _mm512_reduce_add_ps(*x);
        }
    }
}
