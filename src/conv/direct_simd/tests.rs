//! The SIMD direct kernels against the reference `conv2d_direct`, on every
//! ISA this CPU supports, sequential and threaded.

use super::{forward, Prepared};
use crate::conv::direct::conv2d_direct;
use crate::gemm::{Activation, Parallelism};
use crate::geometry::{Conv2dParams, ConvGeometry, ConvMode, Padding};
use crate::testing::{isas_under_test, traced};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    /// Uniform in `[-1, 1)`.
    fn value(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn fill(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.value()).collect()
    }
}

/// One problem: a geometry plus the options of the call.
#[derive(Clone, Copy, Debug)]
struct Case {
    p: Conv2dParams,
    bias: bool,
    activation: Activation,
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::None,
    Activation::Relu,
    Activation::Relu6,
    Activation::Clamp {
        min: -0.5,
        max: 0.25,
    },
];

#[allow(clippy::too_many_arguments)]
fn params(
    batch: usize,
    (cg, kg, groups): (usize, usize, usize),
    (h, w): (usize, usize),
    (r, s): (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    padding: Padding,
    mode: ConvMode,
) -> Conv2dParams {
    Conv2dParams::new(batch, cg * groups, (h, w), kg * groups, (r, s))
        .stride(stride.0, stride.1)
        .dilation(dilation.0, dilation.1)
        .padding(padding)
        .groups(groups)
        .mode(mode)
}

/// `|got − want| ≤ 1e-5·(Σ|x·w| + |b|) + 1e-6` per element, where `scale`
/// holds `Σ|x·w| + |b|`; non-finite values must match in kind.
fn check(case: &Case, what: &str, got: &[f32], want: &[f32], scale: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(scale).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= 1e-5 * m + 1e-6
        };
        assert!(
            ok,
            "{what}: element {i}: got {g}, want {w} (scale {m})\ncase {case:?}"
        );
    }
}

/// Runs `case` on every ISA and both threading modes against the reference.
fn run_case(case: &Case, rng: &mut Rng) {
    let g: ConvGeometry = ConvGeometry::new(&case.p).expect("valid case");
    let input = rng.fill(g.input_len());
    let weight = rng.fill(g.weight_len());
    let bias = case.bias.then(|| rng.fill(g.out_channels));
    run_with(case, &g, &input, &weight, bias.as_deref());
}

/// The reference output of `case` and, per element, the scale [`check`]
/// takes: `Σ|x·w| + |b|`, the reference on absolute values, no activation.
fn reference(
    case: &Case,
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let mut want = vec![0.0; g.output_len()];
    conv2d_direct(g, input, weight, bias, &mut want, case.activation);
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let mut scale = vec![0.0; g.output_len()];
    let abs_bias = bias.map(abs);
    conv2d_direct(
        g,
        &abs(input),
        &abs(weight),
        abs_bias.as_deref(),
        &mut scale,
        Activation::None,
    );
    (want, scale)
}

fn run_with(case: &Case, g: &ConvGeometry, input: &[f32], weight: &[f32], bias: Option<&[f32]>) {
    let (want, scale) = reference(case, g, input, weight, bias);
    for isa in isas_under_test() {
        for par in [Parallelism::Sequential, Parallelism::threads(3)] {
            let mut got = vec![f32::NAN; g.output_len()];
            let (result, trace) =
                traced(|| forward(g, input, weight, bias, &mut got, case.activation, isa, par));
            result.unwrap();
            // Work handed to other threads is recorded there.
            if par == Parallelism::Sequential {
                // Geometry beyond the kernels' offsets takes the reference
                // loops, and must not count as a SIMD run.
                let simd = super::offsets_fit(g);
                assert_eq!(trace.direct_simd_ran_on(isa), simd, "{isa}: {trace:?}");
            }
            check(case, &format!("{isa} {par:?}"), &got, &want, &scale);
        }
    }
}

#[test]
fn depthwise_3x3_every_width() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for w in 1..=40 {
        for (h, stride) in [(1, 1), (5, 1), (9, 2), (7, 3)] {
            let p = params(
                1,
                (1, 1, 3),
                (h, w),
                (3, 3),
                (stride, stride),
                (1, 1),
                Padding::symmetric(1, 1),
                ConvMode::CrossCorrelation,
            );
            let case = Case {
                p,
                bias: w % 2 == 0,
                activation: ACTIVATIONS[w % 4],
            };
            run_case(&case, &mut rng);
        }
    }
}

#[test]
fn reference_layers() {
    let mut rng = Rng(42);
    let layers = [
        // MobileNetV2 depthwise, stride 1 and 2.
        params(
            1,
            (1, 1, 144),
            (56, 56),
            (3, 3),
            (1, 1),
            (1, 1),
            Padding::symmetric(1, 1),
            ConvMode::CrossCorrelation,
        ),
        params(
            1,
            (1, 1, 96),
            (28, 28),
            (3, 3),
            (2, 2),
            (1, 1),
            Padding::symmetric(1, 1),
            ConvMode::CrossCorrelation,
        ),
        // ResNeXt-style: 4 in, 4 out per group.
        params(
            1,
            (4, 4, 32),
            (28, 28),
            (3, 3),
            (1, 1),
            (1, 1),
            Padding::symmetric(1, 1),
            ConvMode::CrossCorrelation,
        ),
        // Depthwise 5×5 with a channel multiplier, batch 2, flipped.
        params(
            2,
            (1, 2, 8),
            (17, 23),
            (5, 5),
            (1, 1),
            (1, 1),
            Padding::symmetric(2, 2),
            ConvMode::Convolution,
        ),
    ];
    for (i, p) in layers.into_iter().enumerate() {
        let case = Case {
            p,
            bias: i % 2 == 0,
            activation: ACTIVATIONS[i % 4],
        };
        run_case(&case, &mut rng);
    }
}

#[test]
fn random_geometries() {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut ran = 0;
    while ran < 600 {
        let cg = [1, 1, 2, 3, 4, 8][rng.range(0, 5)];
        let kg = [1, 1, 2, 3, 4, 5, 8][rng.range(0, 6)];
        let groups = rng.range(1, 4);
        let kernel = (rng.range(1, 5), rng.range(1, 5));
        let stride = (rng.range(1, 3), rng.range(1, 3));
        let dilation = (rng.range(1, 2), rng.range(1, 2));
        let padding = Padding::explicit(
            rng.range(0, 3),
            rng.range(0, 3),
            rng.range(0, 3),
            rng.range(0, 3),
        );
        let input = (rng.range(1, 12), rng.range(1, 40));
        let mode = if rng.range(0, 1) == 0 {
            ConvMode::CrossCorrelation
        } else {
            ConvMode::Convolution
        };
        let p = params(
            rng.range(1, 2),
            (cg, kg, groups),
            input,
            kernel,
            stride,
            dilation,
            padding,
            mode,
        );
        if ConvGeometry::new(&p).is_err() {
            continue;
        }
        let case = Case {
            p,
            bias: rng.range(0, 1) == 1,
            activation: ACTIVATIONS[rng.range(0, 3)],
        };
        run_case(&case, &mut rng);
        ran += 1;
    }
}

#[test]
fn large_strides_gather() {
    let mut rng = Rng(7);
    for (sw, w) in [(3, 50), (4, 70), (5, 90), (7, 130)] {
        let p = params(
            1,
            (2, 3, 2),
            (6, w),
            (2, 3),
            (2, sw),
            (1, 2),
            Padding::explicit(1, 0, 3, 2),
            ConvMode::Convolution,
        );
        let case = Case {
            p,
            bias: true,
            activation: Activation::Relu6,
        };
        run_case(&case, &mut rng);
    }
}

/// NaN inputs propagate as in the reference, and non-finite weights meet
/// only the taps the reference multiplies: padding taps are skipped, never
/// multiplied by zero.
#[test]
fn non_finite_values_match_the_reference() {
    let mut rng = Rng(99);
    for (stride, pad) in [(1, 1), (2, 2), (3, 1)] {
        let p = params(
            1,
            (2, 2, 3),
            (9, 37),
            (3, 3),
            (stride, stride),
            (1, 1),
            Padding::symmetric(pad, pad),
            ConvMode::CrossCorrelation,
        );
        let g = ConvGeometry::new(&p).unwrap();
        let mut input = rng.fill(g.input_len());
        let mut weight = rng.fill(g.weight_len());
        input[5] = f32::NAN;
        input[g.in_plane() + 40] = f32::NAN;
        weight[0] = f32::INFINITY;
        weight[g.gemm_k() + 8] = f32::NEG_INFINITY;
        for activation in ACTIVATIONS {
            let case = Case {
                p,
                bias: true,
                activation,
            };
            let bias = rng.fill(g.out_channels);
            run_with(&case, &g, &input, &weight, Some(&bias));
        }
    }
}

/// Every height for the 3×3 tiles (full row blocks of 8 or 12 and the short
/// last blocks of 4 and 8), both vertical strides, several channels per
/// group, interior and edge vectors.
#[test]
fn three_by_three_every_height() {
    let mut rng = Rng(3);
    for h in 1..=30 {
        for (stride, cg, w) in [(1, 1, 37), (2, 1, 45), (1, 3, 19), (2, 2, 33)] {
            let p = params(
                1,
                (cg, 1, 2),
                (h, w),
                (3, 3),
                (stride, stride),
                (1, 1 + h % 2),
                Padding::explicit(h % 3, 1, 1, h % 2),
                if h % 4 == 0 {
                    ConvMode::Convolution
                } else {
                    ConvMode::CrossCorrelation
                },
            );
            if ConvGeometry::new(&p).is_err() {
                continue;
            }
            let case = Case {
                p,
                bias: h % 2 == 1,
                activation: ACTIVATIONS[h % 4],
            };
            run_case(&case, &mut rng);
        }
    }
}

/// Padding so large that the kernels' offsets would not fit in `isize`
/// still gives the reference's answer, through the reference loops: no
/// kernel is prepared, so none runs or records a call.
#[test]
fn absurd_padding_falls_back() {
    let mut rng = Rng(5);
    let huge = usize::MAX / 4;
    let p = params(
        1,
        (1, 1, 2),
        (3, 4),
        (2, 2),
        (huge, huge),
        (1, 1),
        Padding::explicit(huge - 1, 0, huge - 1, 0),
        ConvMode::CrossCorrelation,
    );
    let g = ConvGeometry::new(&p).unwrap();
    let input = rng.fill(g.input_len());
    let weight = rng.fill(g.weight_len());
    let bias = rng.fill(g.out_channels);
    let mut want = vec![0.0; g.output_len()];
    conv2d_direct(
        &g,
        &input,
        &weight,
        Some(&bias),
        &mut want,
        Activation::None,
    );
    for isa in isas_under_test() {
        assert!(Prepared::new(&g, &weight, Activation::None, isa)
            .unwrap()
            .is_none());
        let mut got = vec![f32::NAN; g.output_len()];
        let par = Parallelism::Sequential;
        forward(
            &g,
            &input,
            &weight,
            Some(&bias),
            &mut got,
            Activation::None,
            isa,
            par,
        )
        .unwrap();
        assert_eq!(got, want, "{isa}");
    }
}

/// A kernel that runs the generic tile code on plain arrays and checks every
/// address it reads or writes against the job's buffers (the group's input
/// channels, the unit's output planes), panicking before any access outside
/// them: a test of the bounds reasoning the SIMD kernels share.
mod checked {
    use super::super::{run_general, run_job, run_three, Job, Simd};
    use crate::gemm::clamp_keep_nan;
    use std::cell::Cell;

    thread_local! {
        /// Input start, input end, output start, output end of the running job.
        static BOUNDS: Cell<[usize; 4]> = const { Cell::new([0; 4]) };
    }

    fn check(p: *const f32, write: bool) {
        let [in_lo, in_hi, out_lo, out_hi] = BOUNDS.get();
        let (lo, hi) = if write {
            (out_lo, out_hi)
        } else {
            (in_lo, in_hi)
        };
        let a = p.addr();
        assert!(
            a >= lo && a + 4 <= hi && (a - lo).is_multiple_of(4),
            "{} outside the job's buffer: {a:#x} not in {lo:#x}..{hi:#x}",
            if write { "write" } else { "read" }
        );
    }

    /// Reads `p`, after checking it.
    fn read(p: *const f32) -> f32 {
        check(p, false);
        // SAFETY: `check` proved p inside the job's input slice.
        unsafe { *p }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Checked<const L: usize>;

    impl<const L: usize> Simd for Checked<L> {
        const LANES: usize = L;
        // As AVX-512 and AVX2.
        const SWEEP_VECS: usize = if L == 16 {
            super::super::sweep::MAX_SWEEP_VECS
        } else {
            1
        };
        type V = [f32; L];
        /// Bit `j`: lane `j` is in the mask.
        type M = u64;

        unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
            job: &Job<'_>,
            out: &mut [f32],
        ) {
            // SAFETY: every access is checked.
            unsafe { run_general::<Self, KB, RB, SW>(Checked, job, out) }
        }

        unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
            job: &Job<'_>,
            out: &mut [f32],
        ) {
            // SAFETY: every access is checked.
            unsafe { run_three::<Self, RB, SW, SH>(Checked, job, out) }
        }

        unsafe fn lanes_forward(
            _job: &super::super::lanes::LanesForward<'_>,
            _work: &mut [f32],
            _out: &mut [f32],
        ) {
            unreachable!(
                "the bounds-checking kernel runs per-channel jobs only (Kernel::lanes_allowed)"
            )
        }

        fn zero(self) -> [f32; L] {
            [0.0; L]
        }

        fn splat(self, x: f32) -> [f32; L] {
            [x; L]
        }

        fn mask(self, lo: usize, hi: usize) -> u64 {
            assert!(lo <= hi && hi <= L && L < 64, "mask {lo}..{hi}");
            ((1u64 << hi) - 1) & !((1u64 << lo) - 1)
        }

        fn mask_bits(self, bits: u32) -> u64 {
            u64::from(bits) & ((1u64 << L) - 1)
        }

        fn fma(self, a: [f32; L], b: [f32; L], c: [f32; L]) -> [f32; L] {
            core::array::from_fn(|j| a[j] * b[j] + c[j])
        }

        fn fma_masked(self, a: [f32; L], b: [f32; L], c: [f32; L], m: u64) -> [f32; L] {
            core::array::from_fn(|j| {
                if m & (1 << j) != 0 {
                    a[j] * b[j] + c[j]
                } else {
                    c[j]
                }
            })
        }

        fn add(self, a: [f32; L], b: [f32; L]) -> [f32; L] {
            core::array::from_fn(|j| a[j] + b[j])
        }

        fn clamp(self, v: [f32; L], lo: [f32; L], hi: [f32; L]) -> [f32; L] {
            core::array::from_fn(|j| clamp_keep_nan(v[j], lo[j], hi[j]))
        }

        unsafe fn load(self, p: *const f32) -> [f32; L] {
            core::array::from_fn(|j| read(p.wrapping_add(j)))
        }

        unsafe fn load_stride2(self, p: *const f32) -> [f32; L] {
            // The SIMD versions read the whole run p[0..2L − 1].
            for j in 0..2 * L - 1 {
                check(p.wrapping_add(j), false);
            }
            core::array::from_fn(|j| read(p.wrapping_add(2 * j)))
        }

        unsafe fn load_strided(self, p: *const f32, stride: usize) -> [f32; L] {
            core::array::from_fn(|j| read(p.wrapping_add(stride * j)))
        }

        unsafe fn load_masked(self, p: *const f32, stride: usize, m: u64) -> [f32; L] {
            let (lo, hi) = (m.trailing_zeros() as usize, 64 - m.leading_zeros() as usize);
            if stride == 2 && m != 0 {
                // The SIMD versions read the run between the first and last lane.
                for j in 2 * lo..2 * hi - 1 {
                    check(p.wrapping_add(j), false);
                }
            }
            core::array::from_fn(|j| {
                if m & (1 << j) != 0 {
                    read(p.wrapping_add(stride * j))
                } else {
                    0.0
                }
            })
        }

        unsafe fn store(self, p: *mut f32, v: [f32; L], n: usize) {
            assert!((1..=L).contains(&n));
            for (j, &x) in v.iter().enumerate().take(n) {
                let q = p.wrapping_add(j);
                check(q, true);
                // SAFETY: `check` proved q inside the unit's output slice.
                unsafe { *q = x };
            }
        }
    }

    /// What `Kernel::test_run` holds.
    pub(super) type RunFn = fn(&Job<'_>, &mut [f32]);

    /// Runs one job with 16 lanes and the AVX-512 tile heights.
    pub(super) fn run16(job: &Job<'_>, out: &mut [f32]) {
        set_bounds(job, out);
        // SAFETY: every access is checked.
        unsafe { run_job::<Checked<16>, 8, 6, 4, 4, 12>(job, out) }
    }

    /// Runs one job with 8 lanes and the AVX2 tile heights.
    pub(super) fn run8(job: &Job<'_>, out: &mut [f32]) {
        set_bounds(job, out);
        // SAFETY: every access is checked.
        unsafe { run_job::<Checked<8>, 8, 4, 3, 2, 8>(job, out) }
    }

    fn set_bounds(job: &Job<'_>, out: &[f32]) {
        let (i, o) = (job.input.as_ptr_range(), out.as_ptr_range());
        BOUNDS.set([i.start.addr(), i.end.addr(), o.start.addr(), o.end.addr()]);
    }
}

/// The output of the bounds-checking kernels with 16 and 8 lanes (the
/// AVX-512 and AVX2 tile heights and sweep widths), one thread, channels
/// never in lanes: every read and write of every job checked.
fn run_checked(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
) -> [(usize, Vec<f32>); 2] {
    use super::Kernel;
    use crate::gemm::Isa;
    let runs: [(usize, checked::RunFn); 2] = [(16, checked::run16), (8, checked::run8)];
    runs.map(|(lanes, run)| {
        let kernel = Kernel {
            lanes,
            sweeps: true,
            isa: Isa::Portable,
            test_run: Some(run),
        };
        let mut got = vec![f32::NAN; g.output_len()];
        Prepared::with_kernel(g, weight, activation, kernel)
            .unwrap()
            .run(input, bias, &mut got, Parallelism::Sequential);
        (lanes, got)
    })
}

/// The generic tile code never reads outside the unit's input group or
/// writes outside its output planes, on random geometries, with 16 and 8
/// lanes; and it computes the reference's values.
#[test]
fn every_access_in_bounds() {
    let mut rng = Rng(0xb0_b5_ca_fe);
    let mut ran = 0;
    while ran < 300 {
        let cg = [1, 1, 2, 3, 4][rng.range(0, 4)];
        let kg = [1, 1, 2, 3, 4, 5][rng.range(0, 5)];
        let three = rng.range(0, 1) == 0;
        let kernel = if three {
            (3, 3)
        } else {
            (rng.range(1, 5), rng.range(1, 5))
        };
        let stride = (rng.range(1, 3), rng.range(1, 3));
        let dilation = (if three { 1 } else { rng.range(1, 2) }, rng.range(1, 2));
        let padding = Padding::explicit(
            rng.range(0, 3),
            rng.range(0, 3),
            rng.range(0, 3),
            rng.range(0, 3),
        );
        let p = params(
            1,
            (cg, kg, rng.range(1, 3)),
            (rng.range(1, 30), rng.range(1, 40)),
            kernel,
            stride,
            dilation,
            padding,
            ConvMode::CrossCorrelation,
        );
        let Ok(g) = ConvGeometry::new(&p) else {
            continue;
        };
        let input = rng.fill(g.input_len());
        let weight = rng.fill(g.weight_len());
        let bias = rng.fill(g.out_channels);
        let mut want = vec![0.0; g.output_len()];
        conv2d_direct(
            &g,
            &input,
            &weight,
            Some(&bias),
            &mut want,
            Activation::Relu6,
        );
        for (lanes, got) in run_checked(&g, &input, &weight, Some(&bias), Activation::Relu6) {
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "{lanes} lanes, element {i}: {a} vs {b}, {p:?}"
                );
            }
        }
        ran += 1;
    }
}

/// The 3×3 row sweep under the bounds-checking kernels with AVX-512's 16
/// lanes (strips of 1 to 4 vectors) and AVX2's 8 (strips of one): rows of
/// one to five strips (short last vectors), every stride of 1 and 2, up to 2 padding on each side,
/// horizontal dilation 1 and 2, planes from one row up, both modes, bias
/// and the activations; every read and write is checked, every value
/// against the reference.
#[test]
fn sweep_every_width_and_padding() {
    let mut rng = Rng(0x5eed_cafe);
    let mut ran = 0;
    let widths = [1, 3, 15, 16, 17, 31, 33, 48, 56, 64, 65, 80, 97, 112, 145];
    for (i, &w) in widths.iter().enumerate() {
        for (h, top, bottom) in [
            (1, 1, 1),
            (2, 0, 2),
            (3, 2, 0),
            (7, 1, 1),
            (12, 0, 0),
            (5, 2, 2),
        ] {
            let pads = [(1, 1, 1), (0, 0, 1), (2, 1, 1), (0, 2, 2), (2, 2, 2)];
            for ((left, right, dil), stride) in pads
                .into_iter()
                .flat_map(|pad| [(1, 1), (2, 2), (1, 2), (2, 1)].map(|stride| (pad, stride)))
            {
                let mode = if (i + h) % 3 == 0 {
                    ConvMode::Convolution
                } else {
                    ConvMode::CrossCorrelation
                };
                let padding = Padding::explicit(top, bottom, left, right);
                let p = params(
                    2,
                    (1, 1, 3),
                    (h, w),
                    (3, 3),
                    stride,
                    (1, dil),
                    padding,
                    mode,
                );
                let Ok(g) = ConvGeometry::new(&p) else {
                    continue;
                };
                let case = Case {
                    p,
                    bias: (w + h + stride.0) % 2 == 0,
                    activation: ACTIVATIONS[(w + left + dil + stride.1) % 4],
                };
                let input = rng.fill(g.input_len());
                let weight = rng.fill(g.weight_len());
                let bias = case.bias.then(|| rng.fill(g.out_channels));
                let (want, scale) = reference(&case, &g, &input, &weight, bias.as_deref());
                for (lanes, got) in
                    run_checked(&g, &input, &weight, bias.as_deref(), case.activation)
                {
                    check(&case, &format!("sweep, {lanes} lanes"), &got, &want, &scale);
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 1600, "only {ran} geometries");
}

/// Any number of threads gives the sequential result bit for bit: the tasks'
/// output slices, cut where their first units start, tile the output
/// exactly, with units of 4 and of fewer channels (6 per group), several
/// groups and images.
#[test]
fn threads_split_the_output_exactly() {
    let mut rng = Rng(11);
    let p = params(
        3,
        (2, 6, 5),
        (64, 48),
        (3, 3),
        (1, 1),
        (1, 1),
        Padding::symmetric(1, 1),
        ConvMode::CrossCorrelation,
    );
    let g = ConvGeometry::new(&p).unwrap();
    let input = rng.fill(g.input_len());
    let weight = rng.fill(g.weight_len());
    let bias = rng.fill(g.out_channels);
    let prepared = Prepared::new(&g, &weight, Activation::Relu, crate::isa())
        .unwrap()
        .unwrap();
    let mut want = vec![f32::NAN; g.output_len()];
    prepared.run(&input, Some(&bias), &mut want, Parallelism::Sequential);
    for threads in [2, 3, 5, 7] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let par = Parallelism::Rayon;
        let split = pool.install(|| super::thread_count(prepared.flops, prepared.units(), par));
        assert_eq!(split, threads);
        let mut got = vec![f32::NAN; g.output_len()];
        pool.install(|| prepared.run(&input, Some(&bias), &mut got, par));
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{threads} threads"
        );
    }
}

/// AVX-512's shuffle reduction adds in the order of the scalar pairwise sum
/// (the trait's default): bitwise the same sums, for 1 to 20 vectors.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_reduce_lanes_is_the_pairwise_sum() {
    use super::avx512::Avx512;
    use super::simd::Simd;
    if !isas_under_test().contains(&crate::gemm::Isa::Avx512) {
        return;
    }
    let mut rng = 0x1234_5678_u64;
    let mut next = move || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        // Values of very different magnitudes, so the order shows.
        let m = (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        m * [1.0, 1e-4, 1e4, 3.0][(rng >> 20) as usize % 4]
    };
    for n in 1..=20 {
        let lanes: Vec<[f32; 16]> = (0..n).map(|_| core::array::from_fn(|_| next())).collect();
        let want: Vec<f32> = lanes
            .iter()
            .map(|l| {
                let mut v = *l;
                let mut w = 16;
                while w > 1 {
                    w /= 2;
                    for j in 0..w {
                        v[j] += v[j + w];
                    }
                }
                v[0]
            })
            .collect();
        let mut got = vec![f32::NAN; n];
        Avx512::with(|s| {
            // SAFETY: reads 16 floats of each local array.
            let v: Vec<_> = lanes
                .iter()
                .map(|l| unsafe { s.load(l.as_ptr()) })
                .collect();
            s.reduce_lanes(&v, &mut got);
        });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{n} vectors");
    }
}
