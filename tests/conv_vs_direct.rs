//! Property test: every algorithm agrees with `Algorithm::Direct` (and Direct
//! with an independent f64 reference) on random descriptors, on every ISA this
//! CPU supports, both GEMM backends and both threading modes.
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

use common::{engine_combos, proptest_cases, Rng};
use cpuconv::testing::{isas_under_test, traced, KernelTrace};
use cpuconv::{
    Activation, Algorithm, Conv2d, Conv2dParams, ConvError, ConvMode, ForwardOptions, GemmBackend,
    Isa, Padding, Parallelism,
};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};

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
fn per_group() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(1usize), 2 => 1usize..=8]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..=3, per_group(), 1usize..=4, per_group()),
        (
            (1usize..=5, 1usize..=5),
            (1usize..=3, 1usize..=3),
            (1usize..=3, 1usize..=3),
        ),
        (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3),
        (1usize..=24, 1usize..=24),
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

fn algorithms() -> Vec<Algorithm> {
    let mut v = Algorithm::CONCRETE.to_vec();
    v.push(Algorithm::Auto);
    v
}

/// The kernels a call must have run on the calling thread: a sequential
/// call of a GEMM lowering on the native backend runs the forced ISA's GEMM
/// blocks, and one of `DirectSimd` its SIMD jobs (evidence is kept per
/// thread, so threaded calls prove nothing here).
fn check_evidence(
    conv: &Conv2d,
    options: &ForwardOptions,
    trace: &KernelTrace,
) -> Result<(), TestCaseError> {
    if options.parallelism != Parallelism::Sequential {
        return Ok(());
    }
    let isa = options.isa.expect("the tests force an ISA");
    let resolved = match options.algorithm {
        Algorithm::Auto => conv.auto_algorithm(),
        a => a,
    };
    match resolved {
        Algorithm::Im2col | Algorithm::Implicit if options.backend == GemmBackend::Native => {
            prop_assert!(
                trace.gemm_ran_on(isa),
                "{:?}: no {} GEMM block ran",
                options,
                isa
            );
        }
        Algorithm::DirectSimd => {
            prop_assert!(
                trace.direct_simd_ran_on(isa),
                "{:?}: no {} SIMD job ran",
                options,
                isa
            );
        }
        _ => {}
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

    // Every algorithm, ISA, backend and threading mode against Direct.
    let mut out = vec![0.0f32; g.output_len()];
    for algorithm in algorithms() {
        for (isa, backend, parallelism) in engine_combos() {
            let options = ForwardOptions::new(algorithm)
                .parallelism(parallelism)
                .backend(backend)
                .activation(act)
                .isa(Some(isa));
            out.fill(f32::NAN);
            let (result, trace) =
                traced(|| conv.forward_with(&input, &weight, bias, &mut out, &options));
            result.map_err(|e| TestCaseError::fail(format!("{options:?}: {e}")))?;
            check_evidence(&conv, &options, &trace)?;
            compare(
                &format!("{options:?} vs direct"),
                &out,
                |i| direct[i] as f64,
                &magnitude,
                gemm_k,
            )?;
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
