//! AVX2 + FMA operations of the SIMD direct convolution: 8 lanes;
//! `maskload`/masked gathers and a blend after the FMA for the edge vectors.

use super::backward::{
    run_lanes_job, run_weight_job, weight_flat, weight_lanes, weight_three, weight_tile, FlatPlan,
    GradWeight, LanesJob, WeightJob,
};
use super::dense::{dense_row, run_row, DenseRow, DenseRows, DenseShape};
use super::lanes::{forward_lanes, LanesForward};
use super::{run_general, run_job, run_three, Job, Simd};
use core::arch::x86_64::*;

/// Token for the AVX2 + FMA operations; only its `Simd::general` and
/// `Simd::three` make one, inside their `#[target_feature]` functions.
#[derive(Clone, Copy)]
pub(super) struct Avx2 {
    _private: (),
}

/// Lane indices `0..8`.
#[inline(always)]
fn lane_index(_: Avx2) -> __m256i {
    // SAFETY: the token proves the CPU supports AVX2.
    unsafe { _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) }
}

/// Gather offsets `stride·j`, or `None` where they do not fit in `i32`.
#[inline(always)]
fn gather_index(s: Avx2, stride: usize) -> Option<__m256i> {
    let stride = i32::try_from(stride).ok().filter(|&v| v <= i32::MAX / 8)?;
    // SAFETY: the token proves the CPU supports AVX2.
    Some(unsafe { _mm256_mullo_epi32(lane_index(s), _mm256_set1_epi32(stride)) })
}

impl Simd for Avx2 {
    const LANES: usize = 8;
    // One vector a strip: three accumulators (three grad-output rows and
    // nine tap sums for the weight gradient) and nine weights in 16
    // registers. 1 thread, GFLOP/s, the tiles → the sweep: forward 144×56²
    // 51 → 63–68, 32×112² 53 → 74, 192×28² 36 → 43, 96×112²/2 27 → 38;
    // weight gradient 144×56² 49–51 → 62–65, 32×112² 52 → 71–73.
    const SWEEP_VECS: usize = 1;
    type V = __m256;
    /// All-ones in the lanes of the set.
    type M = __m256i;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX2 and FMA (contract).
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { run_general::<Self, KB, RB, SW>(s, job, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX2 and FMA (contract).
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { run_three::<Self, RB, SW, SH>(s, job, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_forward(job: &LanesForward<'_>, work: &mut [f32], out: &mut [f32]) {
        // The token is sound: as `general`.
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { forward_lanes::<Self, 9>(s, job, work, out) }
    }

    #[inline(always)]
    fn zero(self) -> __m256 {
        // SAFETY: the token proves the CPU supports AVX2 and FMA (all methods below).
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: as `zero`.
        unsafe { _mm256_set1_ps(x) }
    }

    #[inline(always)]
    fn mask(self, lo: usize, hi: usize) -> __m256i {
        // SAFETY: as `zero`. lo ≤ hi ≤ 8, so both fit in i32.
        unsafe {
            let idx = lane_index(self);
            let from_lo = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(lo as i32 - 1));
            let below_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), idx);
            _mm256_and_si256(from_lo, below_hi)
        }
    }

    #[inline(always)]
    fn mask_bits(self, bits: u32) -> __m256i {
        // SAFETY: as `zero`.
        unsafe {
            let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), bit);
            _mm256_cmpeq_epi32(set, bit)
        }
    }

    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: as `zero`.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    fn fma_masked(self, a: __m256, b: __m256, c: __m256, m: __m256i) -> __m256 {
        // SAFETY: as `zero`.
        unsafe { _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c), _mm256_castsi256_ps(m)) }
    }

    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: as `zero`.
        unsafe { _mm256_add_ps(a, b) }
    }

    #[inline(always)]
    fn clamp(self, v: __m256, lo: __m256, hi: __m256) -> __m256 {
        // SAFETY: as `zero`. max(lo, v) and min(hi, v) return v when v is NaN.
        unsafe { _mm256_min_ps(hi, _mm256_max_ps(lo, v)) }
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        // SAFETY: p[0..8] is readable (contract); AVX as `zero`.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn load_stride2(self, p: *const f32) -> __m256 {
        // SAFETY: p[0..15] is readable (contract): the loads read p[0..8]
        // and p[7..15]; p[15] is never touched. Two plain loads rather than
        // a masked one, as on the AVX-512 path.
        unsafe {
            let a = _mm256_loadu_ps(p);
            let b = _mm256_loadu_ps(p.add(7));
            // [a0 a2 b1 b3 | a4 a6 b5 b7] = [p0 p2 p8 p10 | p4 p6 p12 p14],
            // then 64-bit pieces in order 0 2 1 3.
            let mixed = _mm256_shuffle_ps::<0b11_01_10_00>(a, b);
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                mixed,
            )))
        }
    }

    /// Per 4 columns, the two 4×4 blocks of rows 0..4 and 4..8 loaded into
    /// the 128-bit halves of four vectors (a load and an insert from memory
    /// each), then a 4×4 transpose within the halves: no gathers, which
    /// AMD's cores run slowly (the transposes of channels in lanes).
    #[inline(always)]
    unsafe fn load_transposed(self, p: *const f32, stride: usize, out: &mut [__m256]) {
        // Loops, not closures: a closure is a function of its own, without
        // the target features of the kernel these intrinsics inline into.
        // SAFETY: the 8 rows of 8 floats are readable (contract); the
        // intrinsics need AVX, which the token proves.
        unsafe {
            for a in 0..2 {
                let mut u = [_mm256_setzero_ps(); 4];
                for (i, v) in u.iter_mut().enumerate() {
                    let at = p.add(i * stride + 4 * a);
                    let lo = _mm256_castps128_ps256(_mm_loadu_ps(at));
                    *v = _mm256_insertf128_ps::<1>(lo, _mm_loadu_ps(at.add(4 * stride)));
                }
                let t0 = _mm256_castps_pd(_mm256_unpacklo_ps(u[0], u[1]));
                let t1 = _mm256_castps_pd(_mm256_unpackhi_ps(u[0], u[1]));
                let t2 = _mm256_castps_pd(_mm256_unpacklo_ps(u[2], u[3]));
                let t3 = _mm256_castps_pd(_mm256_unpackhi_ps(u[2], u[3]));
                out[4 * a] = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
                out[4 * a + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
                out[4 * a + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
                out[4 * a + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
            }
        }
    }

    #[inline(always)]
    unsafe fn load_strided(self, p: *const f32, stride: usize) -> __m256 {
        match gather_index(self, stride) {
            // SAFETY: each p[stride·j] is readable (contract), and those are
            // exactly the addresses the gather reads.
            Some(idx) => unsafe { _mm256_i32gather_ps::<4>(p, idx) },
            None => {
                let mut lanes = [0.0f32; 8];
                for (j, x) in lanes.iter_mut().enumerate() {
                    // SAFETY: p[stride·j] is readable (contract).
                    *x = unsafe { *p.add(j * stride) };
                }
                // SAFETY: reads the 8 floats of a local array; AVX as `zero`.
                unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
            }
        }
    }

    #[inline(always)]
    unsafe fn load_masked(self, p: *const f32, stride: usize, m: __m256i) -> __m256 {
        if stride == 1 {
            // SAFETY: the lanes of m are readable (contract); `maskload`
            // neither reads nor faults on the others, wherever `p` points.
            return unsafe { _mm256_maskload_ps(p, m) };
        }
        if stride == 2 {
            // SAFETY: as `zero`.
            let bits = unsafe { _mm256_movemask_ps(_mm256_castsi256_ps(m)) } as u32;
            if bits == 0 {
                return self.zero();
            }
            // Lanes lo..hi read p[2·lo ..= 2·hi − 2]: load that run with two
            // masked loads and keep the even positions, as `load_stride2`.
            let (lo, hi) = (bits.trailing_zeros(), 32 - bits.leading_zeros());
            let (first, end) = (2 * lo as usize, 2 * hi as usize - 1);
            let (ma, mb) = (
                self.mask(first.min(8), end.min(8)),
                self.mask(first.saturating_sub(8).min(8), end.saturating_sub(8)),
            );
            // SAFETY: p[first..end] is readable (contract: the lanes of m and
            // everything between them); `maskload` reads only those positions
            // and never faults on the others, wherever `p` points.
            return unsafe {
                let a = _mm256_maskload_ps(p, ma);
                let b = _mm256_maskload_ps(p.wrapping_add(8), mb);
                let mixed = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                    mixed,
                )))
            };
        }
        match gather_index(self, stride) {
            // SAFETY: as above: a masked gather reads only the lanes of m.
            Some(idx) => unsafe {
                _mm256_mask_i32gather_ps::<4>(self.zero(), p, idx, _mm256_castsi256_ps(m))
            },
            None => {
                let mut bits = [0i32; 8];
                // SAFETY: writes 8 i32 into a local array; AVX as `zero`.
                unsafe { _mm256_storeu_si256(bits.as_mut_ptr().cast(), m) };
                let lanes: [f32; 8] = core::array::from_fn(|j| {
                    if bits[j] != 0 {
                        // SAFETY: lane j is in m, so p[stride·j] is readable;
                        // wrapping_add because `p` may lie outside the allocation.
                        unsafe { *p.wrapping_add(j * stride) }
                    } else {
                        0.0
                    }
                });
                // SAFETY: reads the 8 floats of a local array; AVX as `zero`.
                unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
            }
        }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256, n: usize) {
        if n >= 8 {
            // SAFETY: p[0..8] is writable (contract); AVX as `zero`.
            unsafe { _mm256_storeu_ps(p, v) };
            return;
        }
        // A masked store is slow on AMD: go through memory for the tail.
        let mut lanes = [0.0f32; 8];
        // SAFETY: writes the 8 floats of a local array; AVX as `zero`.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        // SAFETY: p[0..n] is writable (contract) and does not overlap `lanes`.
        unsafe { core::ptr::copy_nonoverlapping(lanes.as_ptr(), p, n) };
    }
}

/// Runs one unit on the AVX2 path.
///
/// Tile heights, measured on this Zen 5 (1 thread): the 3×3 depthwise tile
/// reaches 41 GFLOP/s with 4 rows, 44 with 6 and 48 with 8 (the compiler
/// keeps some weights in memory operands); the general tile for 4 channels
/// 53 with 2 rows but 42 with 4, where 16 accumulators no longer fit in the
/// 16 registers.
///
/// # Safety
/// The CPU supports AVX2 and FMA; the buffers match the geometry as
/// `check_job` checks.
pub(super) unsafe fn run(job: &Job<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe { run_job::<Avx2, 8, 4, 3, 2, 8>(job, out) }
}

/// Most taps per grad-weight tile of 1, 2 and 4 output channels: with 16
/// registers, 9, 10 and 8 accumulators, plus the grad-output vectors and
/// one input vector.
pub(super) const WEIGHT_TAPS: [usize; 3] = [9, 5, 2];

/// Grad weight: rows of two to eight vectors take the flattened sweep.
/// Its masked FMAs cost a blend each, paid only on the vectors of the top
/// and bottom rows since its middle loop masks by kernel column; narrower
/// rows keep the row sweep. Measured (1 thread, GFLOP/s, alternating
/// binaries, row sweep → flat): 144×56² depthwise 3×3 41 → 50, the
/// 4-channel groups of 128×28² 30 → 34, 960×7² depthwise 11.9 → 9.0 (so
/// rows of 7 stay on the row sweep).
pub(super) const WEIGHT_FLAT_ROWS: std::ops::Range<usize> = 16..64;

impl GradWeight for Avx2 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weight_tile<const KB: usize, const TB: usize, const SW: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: this function only runs where the CPU supports
        // AVX2 and FMA (contract).
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_tile::<Self, KB, TB, SW>(s, job, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn weight_three<const RB: usize, const SW: usize, const SH: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_three::<Self, RB, SW, SH>(s, job, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn weight_flat<const KB: usize, const TB: usize>(
        job: &WeightJob<'_>,
        flat: &FlatPlan,
        out: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { weight_flat::<Self, KB, TB>(s, job, flat, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn weight_lanes<const TB: usize, const FULL: bool>(
        job: &LanesJob<'_>,
        work: &mut [f32],
        sums: &mut [f32],
    ) {
        // The token is sound: as `weight_tile`.
        let s = Avx2 { _private: () };
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
    unsafe { run_lanes_job::<Avx2, { WEIGHT_TAPS[0] }>(job, work, sums) }
}

/// Runs one grad-weight job on the AVX2 path.
///
/// # Safety
/// The CPU supports AVX2 and FMA; the job passes `check_weight_job`.
pub(super) unsafe fn run_weight(job: &WeightJob<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe {
        run_weight_job::<Avx2, { WEIGHT_TAPS[0] }, { WEIGHT_TAPS[1] }, { WEIGHT_TAPS[2] }, 4>(
            job, out,
        )
    }
}

/// The dense tile on 16 registers: 12 accumulators for one channel vector,
/// 12 for two, each beside the weight vectors and a broadcast.
pub(super) const DENSE: DenseShape = DenseShape {
    lanes: 8,
    widths: &[12, 6],
};

impl DenseRows for Avx2 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dense_row<const F: usize, const P: usize>(row: &DenseRow<'_>) {
        // The token is sound: this function only runs where the CPU supports
        // AVX2 and FMA (contract).
        let s = Avx2 { _private: () };
        // SAFETY: forwarded contract.
        unsafe { dense_row::<Self, F, P>(s, row) }
    }
}

/// Runs one dense row with `f` channel vectors on this path.
///
/// # Safety
/// As [`dense_row`], and the CPU supports AVX2 and FMA; `f` is within [`DENSE`]'s widths.
pub(super) unsafe fn run_dense_row(f: usize, row: &DenseRow<'_>) {
    // SAFETY: forwarded contract.
    unsafe { run_row::<Avx2, 12, 6, 1, 1>(f, row) }
}
