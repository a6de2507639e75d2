//! Property test: every algorithm agrees with `Algorithm::Direct` (and Direct
//! with an independent f64 reference) on random descriptors, on every ISA this
//! CPU supports, both GEMM backends and both threading modes, through the
//! one-shot forward and through plans (`forward`, and `forward_in` with a
//! caller's workspace), with up to 64 channels per group; and, with a forced
//! small cache blocking, the GEMM lowerings cross every KC, MC and NC block
//! edge, which the kernel trace confirms block by block.
//!
//! Error bound. Let `K = (C/groups)·R·S` be the GEMM depth and, for one output
//! element, `M = Σ_taps |x·w| + |bias|`. Any order of `K + 1` f32 additions of
//! the products (plus the bias) is within `γ_{K+1}·M ≈ (K+1)·ε·M` of the exact
//! sum (ε = `f32::EPSILON`), and the clamp of an activation is 1-Lipschitz, so
//! two such results differ by at most
//!
//! ```text
//! |got − want| ≤ 2·(K + 1)·ε·M + 1e-6
//! ```
//!
//! computed per element by [`reference`] over the same taps. The same bound is
//! used between Direct and the f64 reference.

mod common;

use common::{
    algorithms, column_block, engine_combos, proptest_cases, sequential_blocks, tiled_columns,
    with_blocking, workspace, AOperand, BlockCounts, GemmCall, Rng,
};
use cpuconv::gemm::kernels::kernel_info_for_operands;
use cpuconv::testing::{isas_under_test, traced, Blocking, KernelTrace};
use cpuconv::{
    Activation, Algorithm, Conv2d, Conv2dParams, ConvError, ConvMode, ForwardOptions, GemmBackend,
    Isa, Padding, Parallelism,
};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use std::cell::Cell;
use std::ops::RangeInclusive;

/// One random convolution problem.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    channels_per_group: usize,
    groups: usize,
    out_per_group: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    padding: Padding,
    input: (usize, usize),
    bias: bool,
    mode: ConvMode,
    activation: Activation,
    seed: u64,
}

impl Case {
    fn params(&self) -> Conv2dParams {
        Conv2dParams::new(
            self.batch,
            self.channels_per_group * self.groups,
            self.input,
            self.out_per_group * self.groups,
            self.kernel,
        )
        .stride(self.stride.0, self.stride.1)
        .dilation(self.dilation.0, self.dilation.1)
        .padding(self.padding)
        .groups(self.groups)
        .mode(self.mode)
    }
}

fn activation_strategy() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        Just(Activation::Relu6),
        (-1.5f32..0.25, 0.0f32..1.5).prop_map(|(min, w)| Activation::Clamp { min, max: min + w }),
    ]
}

/// Channels per group: 1 a third of the time (depthwise when both are 1).
fn per_group() -> BoxedStrategy<usize> {
    prop_oneof![1 => Just(1usize), 2 => 1usize..=8].boxed()
}

/// Channels per group for the wide cases: up to 64, with 64 itself and
/// 15–17 (around `Auto`'s switch from the SIMD direct kernel to the GEMM
/// at 16 channels per group) drawn often.
fn wide_per_group() -> BoxedStrategy<usize> {
    prop_oneof![2 => 9usize..=64, 1 => Just(64usize), 1 => 15usize..=17].boxed()
}

/// The ranges one family of cases draws from.
struct Shapes {
    batch: RangeInclusive<usize>,
    channels: fn() -> BoxedStrategy<usize>,
    groups: RangeInclusive<usize>,
    kernel: RangeInclusive<usize>,
    stride: RangeInclusive<usize>,
    dilation: RangeInclusive<usize>,
    padding: RangeInclusive<usize>,
    input: RangeInclusive<usize>,
}

fn shaped_cases(s: Shapes) -> impl Strategy<Value = Case> {
    (
        (s.batch, (s.channels)(), s.groups, (s.channels)()),
        (
            (s.kernel.clone(), s.kernel),
            (s.stride.clone(), s.stride),
            (s.dilation.clone(), s.dilation),
        ),
        (
            s.padding.clone(),
            s.padding.clone(),
            s.padding.clone(),
            s.padding,
        ),
        (s.input.clone(), s.input),
        (
            any::<bool>(),
            prop_oneof![
                Just(ConvMode::CrossCorrelation),
                Just(ConvMode::Convolution)
            ],
            activation_strategy(),
            any::<u64>(),
        ),
        // One case in eight is an unpadded stride-1 1×1 convolution, the
        // shape where the input planes are the GEMM's B as they stand
        // (otherwise only 1 in ~57 600 draws).
        prop::bool::weighted(0.125),
    )
        .prop_map(
            |(
                (batch, channels_per_group, groups, out_per_group),
                (kernel, stride, dilation),
                (top, bottom, left, right),
                input,
                (bias, mode, activation, seed),
                pointwise,
            )| {
                let (kernel, stride, padding) = if pointwise {
                    ((1, 1), (1, 1), Padding::ZERO)
                } else {
                    (kernel, stride, Padding::explicit(top, bottom, left, right))
                };
                Case {
                    batch,
                    channels_per_group,
                    groups,
                    out_per_group,
                    kernel,
                    stride,
                    dilation,
                    padding,
                    input,
                    bias,
                    mode,
                    activation,
                    seed,
                }
            },
        )
}

/// Mostly few channels on images up to 24×24; one case in eight has 9–64
/// channels per group on images up to 8×8 with kernels up to 3×3, so that
/// a case costs at most about 64·576·100 multiply-adds per image and group.
fn case_strategy() -> impl Strategy<Value = Case> {
    prop_oneof![
        7 => shaped_cases(Shapes {
            batch: 1..=3,
            channels: per_group,
            groups: 1..=4,
            kernel: 1..=5,
            stride: 1..=3,
            dilation: 1..=3,
            padding: 0..=3,
            input: 1..=24,
        }),
        1 => shaped_cases(Shapes {
            batch: 1..=2,
            channels: wide_per_group,
            groups: 1..=2,
            kernel: 1..=3,
            stride: 1..=2,
            dilation: 1..=2,
            padding: 0..=1,
            input: 1..=8,
        }),
    ]
}

/// Per output element (`[N, K, OH, OW]` order): the exact-ish value in f64
/// (before the activation) and `M = Σ_taps |x|·|w| + |bias|`, computed
/// straight from the definition, independently of the library.
fn reference(
    case: &Case,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>, [usize; 2]) {
    let (n_img, cg, g, kg) = (
        case.batch,
        case.channels_per_group,
        case.groups,
        case.out_per_group,
    );
    let (c_all, k_all) = (cg * g, kg * g);
    let (h, w) = case.input;
    let (r_len, s_len) = case.kernel;
    let (sh, sw) = case.stride;
    let (dh, dw) = case.dilation;
    let p = case.padding;
    let oh_len = (h + p.top + p.bottom - (dh * (r_len - 1) + 1)) / sh + 1;
    let ow_len = (w + p.left + p.right - (dw * (s_len - 1) + 1)) / sw + 1;
    let mut value = Vec::with_capacity(n_img * k_all * oh_len * ow_len);
    let mut magnitude = Vec::with_capacity(value.capacity());
    for n in 0..n_img {
        for k in 0..k_all {
            let grp = k / kg;
            for oh in 0..oh_len {
                for ow in 0..ow_len {
                    let (mut acc, mut mag) = (0.0f64, 0.0f64);
                    for c in 0..cg {
                        for r in 0..r_len {
                            for s in 0..s_len {
                                let iy = (oh * sh + r * dh) as isize - p.top as isize;
                                let ix = (ow * sw + s * dw) as isize - p.left as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let x = input[((n * c_all + grp * cg + c) * h + iy as usize) * w
                                    + ix as usize] as f64;
                                // True convolution pairs window offset (r, s)
                                // with the mirrored tap.
                                let (wr, ws) = match case.mode {
                                    ConvMode::CrossCorrelation => (r, s),
                                    ConvMode::Convolution => (r_len - 1 - r, s_len - 1 - s),
                                };
                                let wv = weight[((k * cg + c) * r_len + wr) * s_len + ws] as f64;
                                acc += x * wv;
                                mag += (x * wv).abs();
                            }
                        }
                    }
                    if let Some(b) = bias {
                        acc += b[k] as f64;
                        mag += (b[k] as f64).abs();
                    }
                    value.push(acc);
                    magnitude.push(mag);
                }
            }
        }
    }
    (value, magnitude, [oh_len, ow_len])
}

/// `2·(K + 1)·ε·M + 1e-6`, see the module comment.
fn bound(gemm_k: usize, magnitude: f64) -> f64 {
    2.0 * (gemm_k + 1) as f64 * f32::EPSILON as f64 * magnitude + 1e-6
}

/// What a call must have run, from the kernels it recorded on the calling
/// thread (evidence is kept per thread, so only a call that ran entirely
/// here proves anything: `sequential`). A GEMM lowering on the native
/// backend runs the forced ISA's GEMM blocks and no SIMD direct job; on
/// the `matrixmultiply` backend no native block at all; `DirectSimd` and
/// `DirectDense` run the forced ISA's SIMD jobs and no GEMM; `Direct` no kernel. Nothing
/// runs on another ISA.
fn check_evidence(
    what: &str,
    resolved: Algorithm,
    isa: Isa,
    backend: GemmBackend,
    sequential: bool,
    trace: &KernelTrace,
) -> Result<(), TestCaseError> {
    if !sequential {
        return Ok(());
    }
    let gemm_blocks: u64 = trace.gemm_blocks.iter().sum();
    let simd_jobs: u64 = trace.direct_simd_jobs.iter().sum();
    match resolved {
        Algorithm::Im2col | Algorithm::Implicit if backend == GemmBackend::Native => {
            prop_assert!(
                trace.gemm_ran_on(isa),
                "{}: no {} GEMM block ran",
                what,
                isa
            );
            prop_assert_eq!(simd_jobs, 0, "{}: SIMD direct jobs ran", what);
        }
        Algorithm::Im2col | Algorithm::Implicit => {
            prop_assert_eq!(gemm_blocks, 0, "{}: native blocks on matrixmultiply", what);
            prop_assert_eq!(simd_jobs, 0, "{}: SIMD direct jobs ran", what);
        }
        Algorithm::DirectSimd | Algorithm::DirectDense => {
            prop_assert!(
                trace.direct_simd_ran_on(isa),
                "{}: no {} SIMD job ran",
                what,
                isa
            );
            prop_assert_eq!(gemm_blocks, 0, "{}: GEMM blocks ran", what);
        }
        _ => {
            prop_assert_eq!(
                gemm_blocks + simd_jobs,
                0,
                "{}: {:?} ran kernels: {:?}",
                what,
                resolved,
                trace
            );
        }
    }
    for other in Isa::ALL.into_iter().filter(|&o| o != isa) {
        prop_assert!(!trace.ran_on(other), "{}: {} ran: {:?}", what, other, trace);
    }
    Ok(())
}

/// Asserts `got` is within the bound of `want`, element by element.
fn compare(
    what: &str,
    got: &[f32],
    want: impl Fn(usize) -> f64,
    magnitude: &[f64],
    gemm_k: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), magnitude.len(), "{}: length", what);
    for (i, &v) in got.iter().enumerate() {
        let (want, tol) = (want(i), bound(gemm_k, magnitude[i]));
        prop_assert!(
            (v as f64 - want).abs() <= tol,
            "{}: element {} is {}, want {} (±{})",
            what,
            i,
            v,
            want,
            tol
        );
    }
    Ok(())
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let conv: Conv2d = match case.params().build() {
        Ok(c) => c,
        Err(ConvError::KernelLargerThanInput { .. }) => {
            return Err(TestCaseError::reject("kernel larger than the padded input"))
        }
        Err(e) => return Err(TestCaseError::fail(format!("{case:?}: {e}"))),
    };
    let g = *conv.geometry();
    let mut rng = Rng::new(case.seed);
    let input = rng.vec(g.input_len());
    let weight = rng.vec(g.weight_len());
    let bias_vec = rng.vec(g.out_channels);
    let bias = case.bias.then_some(&bias_vec[..]);
    let (value, magnitude, [oh, ow]) = reference(case, &input, &weight, bias);
    prop_assert_eq!(
        conv.output_shape(),
        [case.batch, g.out_channels, oh, ow],
        "output shape"
    );
    let gemm_k = g.gemm_k();
    let act = case.activation;

    // The oracle: Direct against the f64 reference.
    let mut direct = vec![f32::NAN; g.output_len()];
    conv.forward_with(
        &input,
        &weight,
        bias,
        &mut direct,
        &ForwardOptions::new(Algorithm::Direct).activation(act),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    compare(
        "direct vs f64 reference",
        &direct,
        |i| act.apply(value[i] as f32) as f64,
        &magnitude,
        gemm_k,
    )?;

    // Every algorithm, ISA, backend and threading mode against Direct: the
    // one-shot forward, a plan's forward, and its forward_in with a
    // caller's workspace (which runs on the calling thread only).
    let mut out = vec![0.0f32; g.output_len()];
    for algorithm in algorithms() {
        for (isa, backend, parallelism) in engine_combos() {
            // `Auto` resolves for the path the call is forced onto.
            let resolved = match algorithm {
                Algorithm::Auto => conv.auto_algorithm_for(isa),
                a => a,
            };
            let options = ForwardOptions::new(algorithm)
                .parallelism(parallelism)
                .backend(backend)
                .activation(act)
                .isa(Some(isa));
            let sequential = parallelism == Parallelism::Sequential;
            let check = |what: &str, out: &[f32], trace: &KernelTrace, sequential: bool| {
                let what = format!("{what} {options:?}");
                check_evidence(&what, resolved, isa, backend, sequential, trace)?;
                compare(
                    &format!("{what} vs direct"),
                    out,
                    |i| direct[i] as f64,
                    &magnitude,
                    gemm_k,
                )
            };

            out.fill(f32::NAN);
            let (result, trace) =
                traced(|| conv.forward_with(&input, &weight, bias, &mut out, &options));
            result.map_err(|e| TestCaseError::fail(format!("{options:?}: {e}")))?;
            check("forward_with", &out, &trace, sequential)?;

            let plan = conv
                .plan(&weight, bias, &options)
                .map_err(|e| TestCaseError::fail(format!("plan {options:?}: {e}")))?;
            prop_assert_eq!(plan.algorithm(), resolved, "plan {:?}", options);
            prop_assert_eq!(plan.isa(), isa, "plan {:?}", options);
            out.fill(f32::NAN);
            let (result, trace) = traced(|| plan.forward(&input, &mut out));
            result.map_err(|e| TestCaseError::fail(format!("plan {options:?}: {e}")))?;
            check("plan.forward", &out, &trace, sequential)?;

            let mut ws = workspace(&plan);
            out.fill(f32::NAN);
            let (result, trace) = traced(|| plan.forward_in(&input, &mut out, &mut ws));
            result.map_err(|e| TestCaseError::fail(format!("forward_in {options:?}: {e}")))?;
            check("plan.forward_in", &out, &trace, true)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: proptest_cases(512),
        max_global_rejects: 1 << 14,
        // Failing seeds go to tests/conv_vs_direct.proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_algorithm_matches_direct(case in case_strategy()) {
        run_case(&case)?;
    }
}

/// Fixed regression shapes worth keeping whatever the random draw: depthwise,
/// 1×1 (the pointwise fast path), big padding, stride larger than the
/// kernel, a single output pixel, and a shape big enough to thread.
#[test]
fn fixed_shapes_match_direct() {
    let base = Case {
        batch: 1,
        channels_per_group: 1,
        groups: 1,
        out_per_group: 1,
        kernel: (3, 3),
        stride: (1, 1),
        dilation: (1, 1),
        padding: Padding::ZERO,
        input: (8, 8),
        bias: true,
        mode: ConvMode::CrossCorrelation,
        activation: Activation::None,
        seed: 7,
    };
    let cases = [
        // Depthwise 3×3, 4 groups, stride 2, padding 1.
        Case {
            groups: 4,
            stride: (2, 2),
            padding: Padding::symmetric(1, 1),
            input: (9, 7),
            ..base.clone()
        },
        // Pointwise 1×1: the input plane is the GEMM's B.
        Case {
            channels_per_group: 8,
            out_per_group: 5,
            kernel: (1, 1),
            input: (5, 13),
            ..base.clone()
        },
        // Pointwise again, batched and grouped, with an activation.
        Case {
            batch: 3,
            channels_per_group: 4,
            groups: 2,
            out_per_group: 6,
            kernel: (1, 1),
            input: (6, 5),
            activation: Activation::Clamp {
                min: -0.5,
                max: 0.5,
            },
            ..base.clone()
        },
        // 1×1 with padding: not the identity layout.
        Case {
            channels_per_group: 3,
            out_per_group: 4,
            kernel: (1, 1),
            padding: Padding::explicit(1, 0, 0, 2),
            input: (4, 6),
            ..base.clone()
        },
        // 1×1 with stride: not the identity layout.
        Case {
            channels_per_group: 3,
            out_per_group: 4,
            kernel: (1, 1),
            stride: (2, 3),
            input: (7, 11),
            ..base.clone()
        },
        // Stride larger than the kernel, asymmetric padding, true convolution.
        Case {
            channels_per_group: 2,
            out_per_group: 3,
            kernel: (2, 3),
            stride: (3, 3),
            padding: Padding::explicit(3, 0, 1, 2),
            mode: ConvMode::Convolution,
            input: (10, 10),
            activation: Activation::Relu6,
            ..base.clone()
        },
        // Padding wider than the input.
        Case {
            kernel: (5, 5),
            padding: Padding::symmetric(3, 3),
            input: (1, 2),
            ..base.clone()
        },
        // Dilated kernel that exactly covers the input: one output pixel.
        Case {
            channels_per_group: 3,
            out_per_group: 2,
            kernel: (3, 2),
            dilation: (3, 5),
            input: (7, 6),
            ..base.clone()
        },
        // Big enough for the GEMM to split across threads (K = 288).
        Case {
            batch: 2,
            channels_per_group: 32,
            out_per_group: 40,
            kernel: (3, 3),
            padding: Padding::symmetric(1, 1),
            input: (24, 24),
            activation: Activation::Relu,
            ..base.clone()
        },
    ];
    for case in &cases {
        run_case(case).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
}

/// Every ISA the property test claims to cover really ran a native GEMM when
/// forced through `ForwardOptions::isa`.
#[test]
fn every_supported_isa_really_runs() {
    // A dense layer (the GEMM lowerings) and a depthwise one (DirectSimd).
    let dense = Conv2dParams::new(1, 8, (12, 12), 16, (3, 3)).padding(Padding::symmetric(1, 1));
    let depthwise = Conv2dParams::new(1, 8, (12, 12), 8, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .groups(8);
    let mut ran = Vec::new();
    for (params, algorithms) in [
        (
            dense,
            &[Algorithm::Im2col, Algorithm::Implicit, Algorithm::Auto][..],
        ),
        (depthwise, &[Algorithm::DirectSimd, Algorithm::Auto][..]),
    ] {
        let conv = params.build().unwrap();
        let g = conv.geometry();
        let mut rng = Rng::new(42);
        let input = rng.vec(g.input_len());
        let weight = rng.vec(g.weight_len());
        let mut reference_out = vec![0.0; g.output_len()];
        conv.forward(&input, &weight, None, &mut reference_out, Algorithm::Direct)
            .unwrap();
        for isa in isas_under_test() {
            for &algorithm in algorithms {
                let options = ForwardOptions::new(algorithm)
                    .parallelism(Parallelism::Sequential)
                    .isa(isa);
                let mut out = vec![f32::NAN; g.output_len()];
                let (result, trace) =
                    traced(|| conv.forward_with(&input, &weight, None, &mut out, &options));
                result.unwrap();
                assert!(
                    trace.ran_on(isa),
                    "{algorithm:?} with {isa} forced ran no {isa} kernel: {trace:?}"
                );
                for other in Isa::ALL.into_iter().filter(|&o| o != isa) {
                    assert!(
                        !trace.ran_on(other),
                        "{algorithm:?} forced to {isa} ran {other}"
                    );
                }
                for (a, b) in out.iter().zip(&reference_out) {
                    assert!((a - b).abs() <= 1e-4, "{isa} {algorithm:?}: {a} vs {b}");
                }
                ran.push(format!("{isa} {}", algorithm.name()));
            }
        }
    }
    println!("conv kernels that ran: {}", ran.join(", "));
}

/// Depthwise layers on small or strided planes run with channels in lanes
/// (the kernel trace shows it on every ISA), one-shot and planned, and
/// match the reference: a partial block, a batch, stride 2, kernels whose
/// weights are held in registers (3×3), loaded per tap (7×7) and beyond 64
/// taps (11×11), dilation, asymmetric padding, the
/// convolution mode, bias and every activation.
#[test]
fn depthwise_channels_in_lanes_match_direct() {
    let dw = |n: usize, c: usize, h: usize, w: usize, k: (usize, usize)| {
        Conv2dParams::new(n, c, (h, w), c, k).groups(c)
    };
    let layers = [
        dw(2, 37, 7, 7, (3, 3)).padding(Padding::symmetric(1, 1)),
        dw(1, 20, 14, 14, (3, 3))
            .stride(2, 2)
            .padding(Padding::symmetric(1, 1)),
        dw(1, 17, 15, 13, (3, 3)).stride(2, 1),
        dw(1, 9, 12, 12, (7, 7)).padding(Padding::symmetric(3, 3)),
        dw(1, 5, 13, 13, (11, 11)).padding(Padding::symmetric(5, 5)),
        dw(1, 18, 23, 29, (5, 5)).padding(Padding::explicit(2, 1, 2, 3)),
        dw(2, 11, 9, 13, (3, 5))
            .dilation(2, 2)
            .padding(Padding::explicit(0, 3, 4, 1))
            .mode(ConvMode::Convolution),
    ];
    let activations = [
        Activation::None,
        Activation::Relu,
        Activation::Relu6,
        Activation::Clamp {
            min: -0.3,
            max: 0.2,
        },
    ];
    for (i, params) in layers.into_iter().enumerate() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(7 + i as u64);
        let input = rng.vec(g.input_len());
        let weight = rng.vec(g.weight_len());
        let bias = rng.vec(g.out_channels);
        let activation = activations[i % activations.len()];
        let direct = ForwardOptions::new(Algorithm::Direct).activation(activation);
        let mut want = vec![0.0; g.output_len()];
        conv.forward_with(&input, &weight, Some(&bias), &mut want, &direct)
            .unwrap();
        for isa in isas_under_test() {
            let options = ForwardOptions::new(Algorithm::DirectSimd)
                .parallelism(Parallelism::Sequential)
                .activation(activation)
                .isa(isa);
            let mut out = vec![f32::NAN; g.output_len()];
            let (result, trace) =
                traced(|| conv.forward_with(&input, &weight, Some(&bias), &mut out, &options));
            result.unwrap();
            assert!(
                trace.forward_lanes > 0,
                "layer {i} {isa}: channels not in lanes: {trace:?}"
            );
            let plan = conv.plan(&weight, Some(&bias), &options).unwrap();
            let mut planned = vec![f32::NAN; g.output_len()];
            plan.forward(&input, &mut planned).unwrap();
            let two = options.parallelism(Parallelism::threads(2));
            let mut threaded = vec![f32::NAN; g.output_len()];
            conv.forward_with(&input, &weight, Some(&bias), &mut threaded, &two)
                .unwrap();
            for (j, ((&a, &p), (&t, &b))) in out
                .iter()
                .zip(&planned)
                .zip(threaded.iter().zip(&want))
                .enumerate()
            {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "layer {i} {isa} output {j}: {a} vs {b}"
                );
                assert_eq!(
                    a.to_bits(),
                    p.to_bits(),
                    "layer {i} {isa} output {j}: plan differs"
                );
                assert_eq!(
                    a.to_bits(),
                    t.to_bits(),
                    "layer {i} {isa} output {j}: 2 threads differ"
                );
            }
        }
    }
}

#[test]
fn edge_vectors_take_no_lanes_from_the_neighbouring_rows() {
    // An edge vector of the 3×3 depthwise tile may load whole vectors that
    // reach into the previous or next input row and drop those lanes in its
    // masked FMAs. A NaN in every row's last column (then first column)
    // must reach exactly the outputs whose window covers it: a lane taken
    // from the neighbouring row would carry it to the other edge. Planes
    // tall enough for row blocks away from the plane's first and last rows,
    // at strides 1 and 2 (a plane too large for channels in lanes) and a
    // dilated column.
    let dw = |c: usize, h: usize, w: usize| Conv2dParams::new(1, c, (h, w), c, (3, 3)).groups(c);
    let layers = [
        dw(3, 40, 37).padding(Padding::symmetric(1, 1)),
        dw(3, 70, 66).stride(2, 2).padding(Padding::symmetric(1, 1)),
        dw(2, 41, 35)
            .dilation(1, 2)
            .padding(Padding::explicit(1, 1, 0, 3)),
    ];
    for (i, params) in layers.into_iter().enumerate() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(17 + i as u64);
        let weight = rng.vec(g.weight_len());
        for column in [g.in_w - 1, 0] {
            let mut input = rng.vec(g.input_len());
            for row in input.chunks_exact_mut(g.in_w) {
                row[column] = f32::NAN;
            }
            let mut want = vec![0.0; g.output_len()];
            let direct = ForwardOptions::new(Algorithm::Direct);
            conv.forward_with(&input, &weight, None, &mut want, &direct)
                .unwrap();
            assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| !v.is_nan()));
            for isa in isas_under_test() {
                let options = ForwardOptions::new(Algorithm::DirectSimd)
                    .parallelism(Parallelism::Sequential)
                    .isa(isa);
                let mut out = vec![0.0; g.output_len()];
                conv.forward_with(&input, &weight, None, &mut out, &options)
                    .unwrap();
                for (j, (&a, &b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        a.is_nan() == b.is_nan() && (a.is_nan() || (a - b).abs() <= 1e-4),
                        "layer {i} {isa}, NaN in column {column}, output {j}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn dense_tiles_store_at_every_output_offset() {
    // The output is a slice 0–16 floats into a buffer, so its rows start
    // anywhere in a line (rows and planes here are whole vectors long, so
    // every row of a block starts at the same place): every offset matches
    // Direct, with bias and an activation, writes nothing outside the
    // slice, and gives the bits of the offset-0 result.
    let conv = Conv2dParams::new(2, 8, (16, 16), 40, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let mut rng = Rng::new(91);
    let input = rng.vec(g.input_len());
    let weight = rng.vec(g.weight_len());
    let bias = rng.vec(g.out_channels);
    let activation = Activation::Clamp {
        min: -0.5,
        max: 0.75,
    };
    let direct = ForwardOptions::new(Algorithm::Direct).activation(activation);
    let mut want = vec![0.0; g.output_len()];
    conv.forward_with(&input, &weight, Some(&bias), &mut want, &direct)
        .unwrap();
    for isa in isas_under_test() {
        let options = ForwardOptions::new(Algorithm::DirectDense)
            .parallelism(Parallelism::Sequential)
            .activation(activation)
            .isa(isa);
        let mut store = vec![f32::NAN; g.output_len() + 16];
        let mut first: Option<Vec<f32>> = None;
        for offset in 0..=16 {
            store.fill(f32::NAN);
            let out = &mut store[offset..offset + g.output_len()];
            let (result, trace) =
                traced(|| conv.forward_with(&input, &weight, Some(&bias), out, &options));
            result.unwrap();
            assert!(
                trace.direct_simd_ran_on(isa),
                "{isa}: no dense jobs: {trace:?}"
            );
            for (j, (&a, &b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "{isa} output at +{offset}, {j}: {a} vs {b}"
                );
            }
            assert!(
                store[..offset]
                    .iter()
                    .chain(&store[offset + g.output_len()..])
                    .all(|v| v.is_nan()),
                "{isa} at +{offset}: a store outside the output"
            );
            let out = store[offset..offset + g.output_len()].to_vec();
            match &first {
                None => first = Some(out),
                Some(f) => assert!(
                    f.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa} at +{offset}: differs from +0"
                ),
            }
        }
    }
}

/// A NaN in the input reaches exactly the outputs whose window covers it, on
/// every path, and no activation clamps it away (`Activation::apply` keeps
/// NaN, and the kernels are documented to match).
#[test]
fn nan_input_propagates_through_every_path_and_activation() {
    // 1×2×6×7 input, 3 output channels, 3×3 kernel, padding 1: NaN at
    // channel 1, (2, 4). Output (oh, ow) reads rows oh−1..=oh+1 and columns
    // ow−1..=ow+1, so the NaN reaches oh ∈ 1..=3, ow ∈ 3..=5 of every channel.
    let conv = Conv2dParams::new(1, 2, (6, 7), 3, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let mut rng = Rng::new(17);
    let mut input = rng.vec(g.input_len());
    input[(6 + 2) * 7 + 4] = f32::NAN;
    let weight = rng.vec(g.weight_len());
    let bias = rng.vec(3);
    let activations = [
        Activation::None,
        Activation::Relu,
        Activation::Relu6,
        Activation::Clamp {
            min: -0.25,
            max: 0.25,
        },
    ];
    let mut out = vec![0.0f32; g.output_len()];
    for activation in activations {
        for algorithm in algorithms() {
            for (isa, backend, parallelism) in engine_combos() {
                let options = ForwardOptions::new(algorithm)
                    .parallelism(parallelism)
                    .backend(backend)
                    .activation(activation)
                    .isa(Some(isa));
                out.fill(0.0);
                conv.forward_with(&input, &weight, Some(&bias), &mut out, &options)
                    .unwrap();
                for k in 0..3 {
                    for oh in 0..6 {
                        for ow in 0..7 {
                            let v = out[(k * 6 + oh) * 7 + ow];
                            let reached = (1..=3).contains(&oh) && (3..=5).contains(&ow);
                            assert_eq!(
                                v.is_nan(),
                                reached,
                                "{options:?}: out[{k}][{oh}][{ow}] = {v}"
                            );
                        }
                    }
                }
            }
        }
    }
}

// --- forced small blocking: the lowerings cross every cache-block edge --------------------

/// Convolutions whose GEMMs (`K/g × (C/g)·R·S × OH·OW` per image and
/// group) reach past blocks of 8–24 rows or depth and 32–96 columns: up to
/// 40 output and 16 input channels per group, kernels up to 3×3, images of
/// 5×5 to 18×18 (at most 40·144·484 multiply-adds per image and group).
fn blocked_case_strategy() -> impl Strategy<Value = (Case, Blocking)> {
    (
        shaped_cases(Shapes {
            batch: 1..=2,
            channels: || prop_oneof![1 => 1usize..=4, 2 => 5usize..=16].boxed(),
            groups: 1..=2,
            kernel: 1..=3,
            stride: 1..=2,
            dilation: 1..=2,
            padding: 0..=2,
            input: 5..=18,
        }),
        prop_oneof![1 => 1usize..=8, 3 => 9usize..=40],
        (
            prop::sample::select(vec![8usize, 16, 24]),
            prop::sample::select(vec![8usize, 16, 24]),
            prop::sample::select(vec![32usize, 64, 96]),
        ),
    )
        .prop_map(|(case, out_per_group, (mc, kc, nc))| {
            (
                Case {
                    out_per_group,
                    ..case
                },
                Blocking { mc, kc, nc },
            )
        })
}

/// The GEMM each (image, group) pair of `conv` runs when `resolved` is a
/// GEMM lowering on the native backend, with the kernel it runs on: raw
/// weights (row-major, read as a strided A) and the row kernel for a
/// one-shot forward; for a plan, weights packed for the kernel
/// `kernel_info_for_shape` picks (on AVX-512 the 32 × 8 column kernel when
/// the output plane has few pixels). B is strided for the explicit column
/// matrix and for an unpadded stride-1 1×1 convolution (the input planes),
/// otherwise the implicit im2col view.
fn lowered_gemm(
    conv: &Conv2d,
    resolved: Algorithm,
    isa: Isa,
    blocking: Blocking,
    planned: bool,
) -> Option<(cpuconv::gemm::kernels::KernelInfo, GemmCall)> {
    let g = conv.geometry();
    if !matches!(resolved, Algorithm::Im2col | Algorithm::Implicit) {
        return None;
    }
    let (m, k, n) = (g.out_channels_per_group(), g.gemm_k(), g.out_plane());
    let info = kernel_info_for_operands(isa, m, n, planned);
    let call = GemmCall {
        m,
        k,
        n,
        alpha_nonzero: true,
        a: if planned {
            AOperand::Packed
        } else {
            AOperand::Strided {
                rs: k as isize,
                cs: 1,
            }
        },
        b_strided: resolved == Algorithm::Im2col || g.is_pointwise_identity(),
    };
    Some((with_blocking(info, blocking), call))
}

/// Runs `case` sequentially on the native engine with `blocking` forced,
/// through the GEMM lowerings and `Auto`, one-shot and planned (`forward`
/// and `forward_in`), on every ISA: values against Direct, and the GEMM
/// blocks that ran against those the driver's loop nest must run for every
/// (image, group) pair ([`sequential_blocks`]): a KC edge iff the depth
/// exceeds KC, an MC edge iff the output channels per group exceed MC, an
/// NC edge iff the output plane exceeds the column block.
fn run_blocked_case(
    case: &Case,
    blocking: Blocking,
    stats: &Cell<[u32; 5]>,
) -> Result<(), TestCaseError> {
    let conv: Conv2d = match case.params().build() {
        Ok(c) => c,
        Err(ConvError::KernelLargerThanInput { .. }) => {
            return Err(TestCaseError::reject("kernel larger than the padded input"))
        }
        Err(e) => return Err(TestCaseError::fail(format!("{case:?}: {e}"))),
    };
    let g = *conv.geometry();
    let mut rng = Rng::new(case.seed);
    let input = rng.vec(g.input_len());
    let weight = rng.vec(g.weight_len());
    let bias_vec = rng.vec(g.out_channels);
    let bias = case.bias.then_some(&bias_vec[..]);
    let (value, magnitude, _) = reference(case, &input, &weight, bias);
    let act = case.activation;
    let mut direct = vec![f32::NAN; g.output_len()];
    conv.forward_with(
        &input,
        &weight,
        bias,
        &mut direct,
        &ForwardOptions::new(Algorithm::Direct).activation(act),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    compare(
        "direct vs f64 reference",
        &direct,
        |i| act.apply(value[i] as f32) as f64,
        &magnitude,
        g.gemm_k(),
    )?;
    let pairs = (g.batch * g.groups) as u64;
    let mut out = vec![0.0f32; g.output_len()];
    for isa in isas_under_test() {
        for algorithm in [Algorithm::Im2col, Algorithm::Implicit, Algorithm::Auto] {
            let options = ForwardOptions::new(algorithm)
                .parallelism(Parallelism::Sequential)
                .activation(act)
                .isa(isa)
                .blocking(blocking);
            let resolved = match algorithm {
                Algorithm::Auto => conv.auto_algorithm_for(isa),
                a => a,
            };
            let plan = conv
                .plan(&weight, bias, &options)
                .map_err(|e| TestCaseError::fail(format!("plan {options:?}: {e}")))?;
            let mut ws = workspace(&plan);
            for entry in ["forward_with", "plan.forward", "plan.forward_in"] {
                out.fill(f32::NAN);
                let (result, trace) = traced(|| match entry {
                    "forward_with" => conv.forward_with(&input, &weight, bias, &mut out, &options),
                    "plan.forward" => plan.forward(&input, &mut out),
                    _ => plan.forward_in(&input, &mut out, &mut ws),
                });
                let what = format!("{entry} {options:?}");
                result.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
                compare(&what, &out, |i| direct[i] as f64, &magnitude, g.gemm_k())?;
                check_evidence(&what, resolved, isa, GemmBackend::Native, true, &trace)?;
                let got = BlockCounts::of_trace(&trace, isa);
                let Some((info, call)) =
                    lowered_gemm(&conv, resolved, isa, blocking, entry != "forward_with")
                else {
                    prop_assert_eq!(got, BlockCounts::default(), "{}", what);
                    continue;
                };
                let what = format!("{what} {info:?} {call:?}: {trace:?}");
                prop_assert_eq!(got.kc_edges > 0, call.k > info.kc, "KC edge: {}", what);
                prop_assert_eq!(got.mc_edges > 0, call.m > info.mc, "MC edge: {}", what);
                prop_assert_eq!(
                    got.nc_edges > 0,
                    tiled_columns(&info, &call) > column_block(&info, &call),
                    "NC edge: {}",
                    what
                );
                prop_assert_eq!(
                    got,
                    sequential_blocks(&info, &call).times(pairs),
                    "{}",
                    what
                );
                let mut s = stats.get();
                s[0] += 1;
                s[1] += u32::from(got.kc_edges > 0);
                s[2] += u32::from(got.mc_edges > 0);
                s[3] += u32::from(got.nc_edges > 0);
                s[4] += u32::from(got.kc_edges > 0 && got.mc_edges > 0 && got.nc_edges > 0);
                stats.set(s);
            }
        }
    }
    Ok(())
}

#[test]
fn lowerings_with_small_blocks_cross_every_edge() {
    let cases = proptest_cases(512);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        max_global_rejects: 1 << 14,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    });
    let stats = Cell::new([0u32; 5]);
    if let Err(e) = runner.run(&blocked_case_strategy(), |(case, blocking)| {
        run_blocked_case(&case, blocking, &stats)
    }) {
        panic!("{e}");
    }
    let [runs, kc, mc, nc, all] = stats.get();
    println!("GEMM runs {runs}, crossing KC {kc}, MC {mc}, NC {nc}, all three {all}");
    if cases >= 64 {
        for (edge, count, floor) in [
            ("KC", kc, 8),
            ("MC", mc, 8),
            ("NC", nc, 8),
            ("all", all, 16),
        ] {
            assert!(
                count * floor >= runs,
                "only {count} of {runs} GEMM runs crossed {edge}"
            );
        }
    }
}

#[test]
fn dense_tiles_take_every_tap_count() {
    // The tile runs its taps four at a time where it has two or more
    // channel vectors and a stride of 1 or 2, then one at a time: tap
    // counts (input channels × 3 × 3, or × 1 × 3) leaving every remainder
    // of four, at strides 1 to 3, with 16 and 13 output channels, match
    // Direct on every ISA (a dropped remainder tap or a weight step out of
    // line shows in every output).
    let mut rng = Rng::new(17);
    for (channels, kernel) in [
        (1, (3, 3)),
        (2, (3, 3)),
        (3, (3, 3)),
        (4, (3, 3)),
        (1, (1, 3)),
        (5, (1, 3)),
    ] {
        for stride in 1..=3 {
            for out_channels in [16, 13] {
                let conv = Conv2dParams::new(1, channels, (9, 23), out_channels, kernel)
                    .stride(stride, stride)
                    .padding(Padding::symmetric(1, 1))
                    .build()
                    .unwrap();
                let g = *conv.geometry();
                let input = rng.vec(g.input_len());
                let weight = rng.vec(g.weight_len());
                let bias = rng.vec(g.out_channels);
                let mut want = vec![0.0; g.output_len()];
                let direct = ForwardOptions::new(Algorithm::Direct);
                conv.forward_with(&input, &weight, Some(&bias), &mut want, &direct)
                    .unwrap();
                for isa in isas_under_test() {
                    let options = ForwardOptions::new(Algorithm::DirectDense)
                        .parallelism(Parallelism::Sequential)
                        .isa(isa);
                    let mut out = vec![f32::NAN; g.output_len()];
                    conv.forward_with(&input, &weight, Some(&bias), &mut out, &options)
                        .unwrap();
                    for (j, (&a, &b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4,
                            "{isa}, {channels} channels {kernel:?} /{stride} → {out_channels}, output {j}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
