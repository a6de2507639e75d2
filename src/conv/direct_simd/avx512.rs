//! AVX-512F operations of the SIMD direct convolution: 16 lanes, masked
//! loads and merge-masked FMAs for the edge vectors.

use super::backward::{
    run_lanes_job, run_weight_job, weight_flat, weight_lanes, weight_three, weight_tile, FlatPlan,
    GradWeight, LanesJob, WeightJob,
};
use super::dense::{dense_row, run_row, DenseRow, DenseRows, DenseShape};
use super::lanes::{forward_lanes, LanesForward};
use super::{run_general, run_job, run_three, Job, Simd};
use core::arch::x86_64::*;

/// Token for the AVX-512F + FMA operations; only its `Simd::general` and
/// `Simd::three` make one, inside their `#[target_feature]` functions.
#[derive(Clone, Copy)]
pub(super) struct Avx512 {
    _private: (),
}

/// Lane indices `0..16`.
#[inline(always)]
fn lane_index(_: Avx512) -> __m512i {
    // SAFETY: the token proves the CPU supports AVX-512F.
    unsafe { _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) }
}

/// Gather offsets `stride·j`, or `None` where they do not fit in `i32`.
#[inline(always)]
fn gather_index(s: Avx512, stride: usize) -> Option<__m512i> {
    let stride = i32::try_from(stride).ok().filter(|&v| v <= i32::MAX / 16)?;
    // SAFETY: the token proves the CPU supports AVX-512F.
    Some(unsafe { _mm512_mullo_epi32(lane_index(s), _mm512_set1_epi32(stride)) })
}

impl Simd for Avx512 {
    const LANES: usize = 16;
    const SWEEP_VECS: usize = super::sweep::MAX_SWEEP_VECS;
    type V = __m512;
    type M = __mmask16;

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX-512F and FMA (contract).
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { run_general::<Self, KB, RB, SW>(s, job, out) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX-512F and FMA (contract).
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { run_three::<Self, RB, SW, SH>(s, job, out) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn lanes_forward(job: &LanesForward<'_>, work: &mut [f32], out: &mut [f32]) {
        // The token is sound: as `general`.
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { forward_lanes::<Self, 9>(s, job, work, out) }
    }

    #[inline(always)]
    fn zero(self) -> __m512 {
        // SAFETY: the token proves the CPU supports AVX-512F (all methods below).
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: as `zero`.
        unsafe { _mm512_set1_ps(x) }
    }

    #[inline(always)]
    fn mask(self, lo: usize, hi: usize) -> __mmask16 {
        let below = |n: usize| ((1u32 << n) - 1) as u16;
        below(hi) & !below(lo)
    }

    #[inline(always)]
    fn mask_bits(self, bits: u32) -> __mmask16 {
        bits as u16
    }

    #[inline(always)]
    fn reduce_lanes(self, v: &[__m512], out: &mut [f32]) {
        // Sixteen vectors at a time: four levels of shuffles and adds, each
        // adding lane j to lane j + 8, then j + 4, j + 2, j + 1 of every
        // vector (the order of the scalar pairwise sum), which leave vector
        // i's sum in lane `LANE_OF[i]`.
        const LANE_OF: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
        for (v, out) in v.chunks(16).zip(out.chunks_mut(16)) {
            // Plain loops, no closures: a closure holding an intrinsic may
            // be left out of line, compiled without AVX-512, and called per
            // operation (with one codegen unit and LTO this made the sum
            // 20× slower than the sweep it ends).
            let mut a = [self.zero(); 16];
            for (a, &v) in a.iter_mut().zip(v) {
                *a = v;
            }
            // SAFETY: as `zero`; the store writes the 16 floats of a local array.
            let sums = unsafe {
                let mut b = [self.zero(); 8];
                for (i, b) in b.iter_mut().enumerate() {
                    let (x, y) = (a[2 * i], a[2 * i + 1]);
                    *b = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x44>(x, y),
                        _mm512_shuffle_f32x4::<0xEE>(x, y),
                    );
                }
                let mut c = [self.zero(); 4];
                for (i, c) in c.iter_mut().enumerate() {
                    let (x, y) = (b[2 * i], b[2 * i + 1]);
                    *c = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(x, y),
                        _mm512_shuffle_f32x4::<0xDD>(x, y),
                    );
                }
                let mut d = [self.zero(); 2];
                for (i, d) in d.iter_mut().enumerate() {
                    let (x, y) = (c[2 * i], c[2 * i + 1]);
                    *d = _mm512_add_ps(
                        _mm512_shuffle_ps::<0x44>(x, y),
                        _mm512_shuffle_ps::<0xEE>(x, y),
                    );
                }
                let e = _mm512_add_ps(
                    _mm512_shuffle_ps::<0x88>(d[0], d[1]),
                    _mm512_shuffle_ps::<0xDD>(d[0], d[1]),
                );
                let idx = _mm512_loadu_si512(LANE_OF.as_ptr().cast());
                let mut sums = [0.0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_permutexvar_ps(idx, e));
                sums
            };
            out.copy_from_slice(&sums[..out.len()]);
        }
    }

    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: as `zero`.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    fn fma_masked(self, a: __m512, b: __m512, c: __m512, m: __mmask16) -> __m512 {
        // SAFETY: as `zero`.
        unsafe { _mm512_mask3_fmadd_ps(a, b, c, m) }
    }

    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: as `zero`.
        unsafe { _mm512_add_ps(a, b) }
    }

    #[inline(always)]
    fn clamp(self, v: __m512, lo: __m512, hi: __m512) -> __m512 {
        // SAFETY: as `zero`. max(lo, v) and min(hi, v) return v when v is NaN.
        unsafe { _mm512_min_ps(hi, _mm512_max_ps(lo, v)) }
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        // SAFETY: p[0..16] is readable (contract); AVX-512F as `zero`.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load_stride2(self, p: *const f32) -> __m512 {
        // SAFETY: p[0..31] is readable (contract): the loads read p[0..16]
        // and p[15..31]; p[31] is never touched. Two plain loads rather
        // than one masked one, which Zen 5 runs far slower.
        unsafe {
            let a = _mm512_loadu_ps(p);
            let b = _mm512_loadu_ps(p.add(15));
            // Even positions 0..14 from `a`; 16..30 are lanes 1, 3, .., 15 of `b`.
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31);
            _mm512_permutex2var_ps(a, even, b)
        }
    }

    #[inline(always)]
    unsafe fn load_stride2_three(self, p: *const f32) -> [__m512; 3] {
        // Two loads and a broadcast for the three kernel columns, not six
        // loads: p[2], p[4], .., p[32] is the even run shifted by one lane
        // with p[32] after it. (The same on AVX2, with a rotate and a blend,
        // measured no change on Zen 5: its AVX2 tile is bound elsewhere.)
        // SAFETY: p[0..33] is readable (contract): the loads read p[0..16],
        // p[16..32] and p[32].
        unsafe {
            let a = _mm512_loadu_ps(p);
            let b = _mm512_loadu_ps(p.add(16));
            let last = _mm512_set1_ps(*p.add(32));
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let x0 = _mm512_permutex2var_ps(a, even, b);
            let x2 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(last),
                _mm512_castps_si512(x0),
            ));
            [x0, _mm512_permutex2var_ps(a, odd, b), x2]
        }
    }

    #[inline(always)]
    unsafe fn load_strided(self, p: *const f32, stride: usize) -> __m512 {
        match gather_index(self, stride) {
            // SAFETY: each p[stride·j] is readable (contract), and those are
            // exactly the addresses the gather reads.
            Some(idx) => unsafe { _mm512_i32gather_ps::<4>(idx, p) },
            None => {
                let mut lanes = [0.0f32; 16];
                for (j, x) in lanes.iter_mut().enumerate() {
                    // SAFETY: p[stride·j] is readable (contract).
                    *x = unsafe { *p.add(j * stride) };
                }
                // SAFETY: reads the 16 floats of a local array; AVX-512F as `zero`.
                unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
            }
        }
    }

    #[inline(always)]
    unsafe fn load_masked(self, p: *const f32, stride: usize, m: __mmask16) -> __m512 {
        if stride == 1 {
            // SAFETY: the lanes of m are readable (contract); a masked load
            // neither reads nor faults on the others, wherever `p` points.
            return unsafe { _mm512_maskz_loadu_ps(m, p) };
        }
        if stride == 2 {
            if m == 0 {
                return self.zero();
            }
            // Lanes lo..hi read p[2·lo ..= 2·hi − 2]: load that run with two
            // masked loads and keep the even positions.
            let (lo, hi) = (m.trailing_zeros(), 16 - m.leading_zeros());
            let run = ((1u64 << (2 * hi - 1)) - 1) as u32 & !((1u32 << (2 * lo)) - 1);
            // SAFETY: p[2·lo ..= 2·hi − 2] is readable (contract: the lanes of
            // m and everything between them); the masked loads read only those
            // positions and never fault on the others, wherever `p` points.
            return unsafe {
                let a = _mm512_maskz_loadu_ps(run as u16, p);
                let b = _mm512_maskz_loadu_ps((run >> 16) as u16, p.wrapping_add(16));
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                _mm512_permutex2var_ps(a, even, b)
            };
        }
        match gather_index(self, stride) {
            // SAFETY: as above: a masked gather reads only the lanes of m.
            Some(idx) => unsafe { _mm512_mask_i32gather_ps::<4>(self.zero(), m, idx, p) },
            None => {
                let lanes: [f32; 16] = core::array::from_fn(|j| {
                    if m & (1 << j) != 0 {
                        // SAFETY: lane j is in m, so p[stride·j] is readable;
                        // wrapping_add because `p` may lie outside the allocation.
                        unsafe { *p.wrapping_add(j * stride) }
                    } else {
                        0.0
                    }
                });
                // SAFETY: reads the 16 floats of a local array; AVX-512F as `zero`.
                unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
            }
        }
    }

    /// Sixteen row loads and four stages of shuffles (64 in all) instead
    /// of sixteen gathers: the dense tile's store of its channel-major sums
    /// (measured with the store skipped, it took up to a fifth of a
    /// few-tap layer such as the 7×7/2 stem with gathers).
    #[inline(always)]
    unsafe fn load_transposed(self, p: *const f32, stride: usize, out: &mut [__m512]) {
        // Loops, not closures: a closure is a function of its own, without
        // the target features of the kernel these intrinsics inline into.
        // SAFETY: the 16 rows of 16 floats are readable (contract); the
        // shuffles need AVX-512F, which the token proves.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(p.add(j * stride));
            }
            // Within 128-bit lanes: rows 2i, 2i+1 interleaved by element.
            let mut a = [_mm512_setzero_ps(); 16];
            for i in 0..8 {
                a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // b[4i + e], lane L: rows 4i..4i+4 of column 4L + e.
            let mut b = [_mm512_setzero_ps(); 16];
            for i in 0..4 {
                for h in 0..2 {
                    let x = _mm512_castps_pd(a[4 * i + h]);
                    let y = _mm512_castps_pd(a[4 * i + 2 + h]);
                    b[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
                    b[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
                }
            }
            // Column 4L + e gathers lane L of b[e], b[4 + e], b[8 + e], b[12 + e].
            for e in 0..4 {
                let t0 = _mm512_shuffle_f32x4::<0x44>(b[e], b[4 + e]);
                let t1 = _mm512_shuffle_f32x4::<0xEE>(b[e], b[4 + e]);
                let t2 = _mm512_shuffle_f32x4::<0x44>(b[8 + e], b[12 + e]);
                let t3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + e], b[12 + e]);
                out[e] = _mm512_shuffle_f32x4::<0x88>(t0, t2);
                out[4 + e] = _mm512_shuffle_f32x4::<0xDD>(t0, t2);
                out[8 + e] = _mm512_shuffle_f32x4::<0x88>(t1, t3);
                out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(t1, t3);
            }
        }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512, n: usize) {
        // SAFETY: p[0..n] is writable (contract); the masked store writes
        // only lanes 0..n.
        unsafe {
            if n >= 16 {
                _mm512_storeu_ps(p, v);
            } else {
                _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v);
            }
        }
    }
}

/// Runs one unit on the AVX-512 path.
///
/// Tile heights, measured on this Zen 5 (1 thread, best of several runs on
/// a shared machine): the 3×3 depthwise tile (mbv2 `144×56×56`) reaches
/// 78 GFLOP/s with 8 rows and 83 with 12; the general tile for 4 channels
/// (ResNeXt `128×28×28`, 32 groups) 100 with 2 rows, 130 with 4 and 107
/// with 6 (spills). With 32 registers, 1 to 4 channels take 8, 6, 4 and 4
/// rows.
///
/// # Safety
/// The CPU supports AVX-512F and FMA; the buffers match the geometry as
/// `check_job` checks.
pub(super) unsafe fn run(job: &Job<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe { run_job::<Avx512, 8, 6, 4, 4, 12>(job, out) }
}

/// Most taps per grad-weight tile of 1, 2 and 4 output channels: with 32
/// registers, 16, 18 and 20 accumulators, plus the grad-output vectors and
/// one input vector.
pub(super) const WEIGHT_TAPS: [usize; 3] = [9, 9, 3];

/// Grad weight: output rows narrower than four vectors take the flattened
/// sweep (masked FMAs cost nothing extra here). Measured (1 thread,
/// GFLOP/s, row sweep → flat): 144×56² depthwise 3×3 39 → 47, the 4-channel
/// groups of 128×28² 45 → 60.
pub(super) const WEIGHT_FLAT_ROWS: std::ops::Range<usize> = 0..64;

impl GradWeight for Avx512 {
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn weight_tile<const KB: usize, const TB: usize, const SW: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX-512F and FMA (contract).
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_tile::<Self, KB, TB, SW>(s, job, out) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn weight_three<const RB: usize, const SW: usize, const SH: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_three::<Self, RB, SW, SH>(s, job, out) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn weight_flat<const KB: usize, const TB: usize>(
        job: &WeightJob<'_>,
        flat: &FlatPlan,
        out: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_flat::<Self, KB, TB>(s, job, flat, out) }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn weight_lanes<const TB: usize, const FULL: bool>(
        job: &LanesJob<'_>,
        work: &mut [f32],
        sums: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_lanes::<Self, TB, FULL>(s, job, work, sums) }
    }
}

/// Runs one channels-in-lanes grad-weight job on this path.
///
/// # Safety
/// The CPU supports the path's features; the job passes `check_lanes_job`.
pub(super) unsafe fn run_weight_lanes(job: &LanesJob<'_>, work: &mut [f32], sums: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe { run_lanes_job::<Avx512, { WEIGHT_TAPS[0] }>(job, work, sums) }
}

/// Runs one grad-weight job on the AVX-512 path.
///
/// # Safety
/// The CPU supports AVX-512F and FMA; the job passes `check_weight_job`.
pub(super) unsafe fn run_weight(job: &WeightJob<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe {
        run_weight_job::<Avx512, { WEIGHT_TAPS[0] }, { WEIGHT_TAPS[1] }, { WEIGHT_TAPS[2] }, 8>(
            job, out,
        )
    }
}

/// The dense tile on 32 registers: the widest tile of `F` = 1 to 4 channel
/// vectors keeps 12, 24, 24 and 24 accumulators beside the `F` weight vectors
/// and a broadcast (4 × 7 spills; see the module doc of `dense`).
pub(super) const DENSE: DenseShape = DenseShape {
    lanes: 16,
    widths: &[12, 8, 8, 6],
};

impl DenseRows for Avx512 {
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn dense_row<const F: usize, const P: usize>(row: &DenseRow<'_>) {
        // The token is sound: this function only runs where the CPU supports
        // AVX-512F and FMA (contract).
        let s = Avx512 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { dense_row::<Self, F, P>(s, row) }
    }
}

/// Runs one dense row with `f` channel vectors on this path.
///
/// # Safety
/// As [`dense_row`], and the CPU supports AVX-512F and FMA; `f` is within [`DENSE`]'s widths.
pub(super) unsafe fn run_dense_row(f: usize, row: &DenseRow<'_>) {
    // SAFETY: forwarded contract.
    unsafe { run_row::<Avx512, 12, 8, 8, 6>(f, row) }
}

#[cfg(test)]
impl Avx512 {
    /// Tests: runs `f` with a token, when the CPU supports AVX-512F and FMA
    /// (otherwise not at all).
    pub(super) fn with(f: impl FnOnce(Avx512)) {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // The token is sound: the CPU supports both (checked above).
            f(Avx512 { _private: () });
        }
    }
}
