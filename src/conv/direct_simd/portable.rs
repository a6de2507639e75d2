//! Portable operations of the SIMD direct convolution on `wide::f32x8`:
//! what every target without AVX2 runs. Edge vectors load lane by lane and
//! keep the padding lanes with a select.

use super::backward::{
    run_lanes_job, run_weight_job, weight_flat, weight_lanes, weight_three, weight_tile, FlatPlan,
    GradWeight, LanesJob, WeightJob,
};
use super::dense::{dense_row, run_row, DenseRow, DenseRows, DenseShape};
use super::lanes::{forward_lanes, LanesForward};
use super::{run_general, run_job, Job, Simd};
use wide::{f32x8, CmpGe, CmpGt, CmpLt};

cfg_if::cfg_if! {
    if #[cfg(target_arch = "aarch64")] {
        // 32 128-bit registers: sixteen `f32x8`.
        const R1: usize = 8;
        const R2: usize = 4;
        const R3: usize = 3;
        const R4: usize = 2;
    } else {
        // SSE2's 16 128-bit registers: eight `f32x8`.
        const R1: usize = 4;
        const R2: usize = 2;
        const R3: usize = 1;
        const R4: usize = 1;
    }
}

/// Token for the portable operations (any CPU).
#[derive(Clone, Copy)]
pub(super) struct Portable;

/// Lanes `lo..hi` of a vector: the range for loads, and an all-ones lane
/// mask for selects.
#[derive(Clone, Copy)]
pub(super) struct Lanes {
    lo: usize,
    hi: usize,
    select: f32x8,
}

impl Simd for Portable {
    const LANES: usize = 8;
    type V = f32x8;
    type M = Lanes;

    unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { run_general::<Self, KB, RB, SW>(Portable, job, out) }
    }

    unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "aarch64")]
        // SAFETY: forwarded contract (a single-channel 3×3 job); the
        // portable path needs no CPU feature.
        unsafe {
            super::run_three::<Self, RB, SW, SH>(Portable, job, out)
        }
        // Elsewhere `f32x8` is two of only sixteen 128-bit registers, too few
        // for the 3×3 tile's nine weights: the general tile does the job.
        #[cfg(not(target_arch = "aarch64"))]
        // SAFETY: forwarded contract (a single-channel job, which the general
        // tile handles whatever its kernel); no CPU feature needed.
        unsafe {
            run_general::<Self, 1, R1, SW>(Portable, job, out)
        }
    }

    unsafe fn lanes_forward(job: &LanesForward<'_>, work: &mut [f32], out: &mut [f32]) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { forward_lanes::<Self, 9>(Portable, job, work, out) }
    }

    #[inline(always)]
    fn zero(self) -> f32x8 {
        f32x8::ZERO
    }

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }

    #[inline(always)]
    fn mask(self, lo: usize, hi: usize) -> Lanes {
        let idx = f32x8::from([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let select = idx.cmp_ge(f32x8::splat(lo as f32)) & idx.cmp_lt(f32x8::splat(hi as f32));
        Lanes { lo, hi, select }
    }

    #[inline(always)]
    fn mask_bits(self, bits: u32) -> Lanes {
        let bits = bits & 0xff;
        let lane = |j: u32| {
            if bits & (1 << j) != 0 {
                f32::from_bits(u32::MAX)
            } else {
                0.0
            }
        };
        let select = f32x8::from(core::array::from_fn::<f32, 8, _>(|j| lane(j as u32)));
        let (lo, hi) = if bits == 0 {
            (0, 0)
        } else {
            (
                bits.trailing_zeros() as usize,
                32 - bits.leading_zeros() as usize,
            )
        };
        Lanes { lo, hi, select }
    }

    #[inline(always)]
    fn fma(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn fma_masked(self, a: f32x8, b: f32x8, c: f32x8, m: Lanes) -> f32x8 {
        m.select.blend(a.mul_add(b, c), c)
    }

    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }

    #[inline(always)]
    fn clamp(self, v: f32x8, lo: f32x8, hi: f32x8) -> f32x8 {
        // As `clamp_keep_nan`: comparisons with NaN are false, so NaN stays.
        let v = v.cmp_lt(lo).blend(lo, v);
        v.cmp_gt(hi).blend(hi, v)
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> f32x8 {
        // SAFETY: p[0..8] is readable (contract); unaligned read of an array.
        f32x8::from(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }

    #[inline(always)]
    unsafe fn load_stride2(self, p: *const f32) -> f32x8 {
        // SAFETY: forwarded: p[2·j], j < 8, lie in p[0..15], readable.
        unsafe { self.load_strided(p, 2) }
    }

    #[inline(always)]
    unsafe fn load_strided(self, p: *const f32, stride: usize) -> f32x8 {
        let mut lanes = [0.0f32; 8];
        for (j, x) in lanes.iter_mut().enumerate() {
            // SAFETY: p[stride·j] is readable (contract).
            *x = unsafe { *p.add(stride * j) };
        }
        f32x8::from(lanes)
    }

    #[inline(always)]
    unsafe fn load_masked(self, p: *const f32, stride: usize, m: Lanes) -> f32x8 {
        let mut lanes = [0.0f32; 8];
        for (j, x) in lanes.iter_mut().enumerate().take(m.hi).skip(m.lo) {
            // SAFETY: lane j is in m, so p[stride·j] is readable (contract);
            // wrapping_add because `p` itself may lie outside the allocation.
            *x = unsafe { *p.wrapping_add(stride * j) };
        }
        f32x8::from(lanes)
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: f32x8, n: usize) {
        let lanes = v.to_array();
        // SAFETY: p[0..n] is writable (contract), n ≤ 8, no overlap with `lanes`.
        unsafe { core::ptr::copy_nonoverlapping(lanes.as_ptr(), p, n.min(8)) };
    }
}

/// Runs one unit on the portable path.
///
/// # Safety
/// The buffers match the geometry as `check_job` checks (no CPU feature is
/// needed).
pub(super) unsafe fn run(job: &Job<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract; the portable path needs no CPU feature.
    unsafe { run_job::<Portable, R1, R2, R3, R4, 8>(job, out) }
}

cfg_if::cfg_if! {
    if #[cfg(target_arch = "aarch64")] {
        /// Most taps per grad-weight tile of 1, 2 and 4 output channels:
        /// sixteen `f32x8` registers, as AVX2.
        pub(super) const WEIGHT_TAPS: [usize; 3] = [9, 5, 2];
    } else {
        /// Most taps per grad-weight tile of 1, 2 and 4 output channels:
        /// SSE2's eight `f32x8` registers hold 4 accumulators, the
        /// grad-output vectors and one input vector.
        pub(super) const WEIGHT_TAPS: [usize; 3] = [4, 2, 1];
    }
}

/// Grad weight: no row takes the flattened sweep (masked FMAs are selects
/// here, as AVX2's blends, where it lost before the flat sweep had its
/// middle loop; not measured since).
pub(super) const WEIGHT_FLAT_ROWS: std::ops::Range<usize> = 0..0;

impl GradWeight for Portable {
    unsafe fn weight_tile<const KB: usize, const TB: usize, const SW: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { weight_tile::<Self, KB, TB, SW>(Portable, job, out) }
    }

    unsafe fn weight_three<const RB: usize, const SW: usize, const SH: usize>(
        job: &WeightJob<'_>,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { weight_three::<Self, RB, SW, SH>(Portable, job, out) }
    }

    unsafe fn weight_flat<const KB: usize, const TB: usize>(
        job: &WeightJob<'_>,
        flat: &FlatPlan,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { weight_flat::<Self, KB, TB>(Portable, job, flat, out) }
    }

    unsafe fn weight_lanes<const TB: usize, const FULL: bool>(
        job: &LanesJob<'_>,
        work: &mut [f32],
        sums: &mut [f32],
    ) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { weight_lanes::<Self, TB, FULL>(Portable, job, work, sums) }
    }
}

/// Runs one channels-in-lanes grad-weight job on the portable path.
///
/// # Safety
/// The job passes `check_lanes_job` (no CPU feature is needed).
pub(super) unsafe fn run_weight_lanes(job: &LanesJob<'_>, work: &mut [f32], sums: &mut [f32]) {
    // SAFETY: forwarded contract; the portable path needs no CPU feature.
    unsafe { run_lanes_job::<Portable, { WEIGHT_TAPS[0] }>(job, work, sums) }
}

/// Runs one grad-weight job on the portable path.
///
/// # Safety
/// The job passes `check_weight_job` (no CPU feature is needed).
pub(super) unsafe fn run_weight(job: &WeightJob<'_>, out: &mut [f32]) {
    // SAFETY: forwarded contract; the portable path needs no CPU feature.
    unsafe {
        run_weight_job::<Portable, { WEIGHT_TAPS[0] }, { WEIGHT_TAPS[1] }, { WEIGHT_TAPS[2] }, 4>(
            job, out,
        )
    }
}

cfg_if::cfg_if! {
    if #[cfg(target_arch = "aarch64")] {
        /// The dense tile on sixteen `f32x8` registers, as AVX2.
        pub(super) const DENSE: DenseShape = DenseShape {
            lanes: 8,
            widths: &[12, 6],
        };
        const DENSE_P: (usize, usize) = (12, 6);
    } else {
        /// The dense tile on SSE2's eight `f32x8` registers: one channel
        /// vector, six accumulators.
        pub(super) const DENSE: DenseShape = DenseShape {
            lanes: 8,
            widths: &[6],
        };
        const DENSE_P: (usize, usize) = (6, 1);
    }
}

impl DenseRows for Portable {
    unsafe fn dense_row<const F: usize, const P: usize>(row: &DenseRow<'_>) {
        // SAFETY: forwarded contract; the portable path needs no CPU feature.
        unsafe { dense_row::<Self, F, P>(Portable, row) }
    }
}

/// Runs one dense row with `f` channel vectors on the portable path.
///
/// # Safety
/// As [`dense_row`]; `f` is within [`DENSE`]'s widths.
pub(super) unsafe fn run_dense_row(f: usize, row: &DenseRow<'_>) {
    // SAFETY: forwarded contract.
    unsafe { run_row::<Portable, { DENSE_P.0 }, { DENSE_P.1 }, 1, 1>(f, row) }
}
