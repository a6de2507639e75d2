//! One clamp rule and one NaN rule on every path that stores an output.
//!
//! `Activation` is documented as PyTorch's `min(max(x, lo), hi)`: with
//! `min > max` every element becomes `max`, and a NaN (from the input or the
//! bias) stays NaN through `Relu`, `Relu6` and `Clamp`; a `Clamp` with a NaN
//! bound is refused with `ConvError::InvalidActivation`. Each rule is
//! checked on every algorithm and `Auto`, every ISA under test, both GEMM
//! backends (the `matrixmultiply` backend applies the clamp in a pass after
//! the product), both threading modes, the one-shot forward and plans
//! (`forward` and `forward_in`), and on the native engine also with a forced
//! small blocking (the clamp belongs to the last K block only). The shapes
//! give output planes with full and partial register tiles of every kernel
//! (AVX-512 rows 32 wide with a 16-wide narrow edge tile and peeled dot
//! product columns, AVX-512's 32 × 8 column kernel for plans with few
//! output pixels, AVX2 16, portable 8) and output rows with full and
//! partial vectors of the SIMD direct kernel (16 or 8 lanes), so a vector
//! store, a masked store and a scalar edge store all meet each rule.

mod common;

use common::{
    algorithms, assert_mentions, conv_bound, conv_reference, engine_combos, workspace, Rng,
};
use cpuconv::gemm::kernels::kernel_info_for_shape;
use cpuconv::testing::{isas_under_test, Blocking};
use cpuconv::{
    Activation, Conv2d, Conv2dParams, ConvError, ForwardOptions, GemmBackend, Isa, Padding,
};

/// Blocks small enough that the GEMMs below span several K blocks (K = 27
/// and more), several MC blocks (up to 95 rows) and several NC blocks.
const SMALL: Blocking = Blocking {
    mc: 8,
    kc: 8,
    nc: 32,
};

/// Shapes whose outputs end mid-tile and mid-vector on every path; the
/// comment gives the GEMM (`M × K × N` per image and group) and the output
/// width the SIMD direct kernel vectorises.
fn shapes() -> Vec<(&'static str, Conv2dParams)> {
    vec![
        // 5 × 27 × 333 (333 = 10·32 + 13: AVX-512's narrow edge tile;
        // 20·16 + 13; 41·8 + 5); rows of 37 = 2·16 + 5 = 4·8 + 5.
        (
            "dense 3x3",
            Conv2dParams::new(1, 3, (9, 37), 5, (3, 3)).padding(Padding::symmetric(1, 1)),
        ),
        // 64 × 108 × 49: one-shot Im2col on AVX-512 peels the 49th column
        // off as a dot product; a plan takes the 32 × 8 column kernel
        // (6 full column tiles and 1 partial), or AVX2's 16 × 6 (8 and 1).
        (
            "7x7 plane",
            Conv2dParams::new(2, 12, (7, 7), 64, (3, 3)).padding(Padding::symmetric(1, 1)),
        ),
        // 95 × 45 × 7: plans on AVX-512 take the column kernel with 2 full
        // and 1 partial (31-row) tile, on AVX2 5 full and 1 of 15 rows (7 =
        // 6 + 1 columns); 95 = 15·6 + 5 on the 6-row kernels.
        (
            "95 channels",
            Conv2dParams::new(1, 5, (3, 9), 95, (3, 3)).stride(2, 1),
        ),
        // 40 × 16 × 50, the input planes read as B: 50 = 3·16 + 2, two
        // peeled columns on AVX-512.
        ("pointwise", Conv2dParams::new(2, 16, (5, 10), 40, (1, 1))),
        // Depthwise (Auto: the SIMD direct kernel): rows of 19 = 16 + 3 =
        // 2·8 + 3.
        (
            "depthwise",
            Conv2dParams::new(1, 8, (11, 19), 8, (3, 3))
                .padding(Padding::symmetric(1, 1))
                .groups(8),
        ),
        // 4 groups of 2 → 3 channels, 5×5, stride 2: rows of 18 = 16 + 2.
        (
            "grouped strided",
            Conv2dParams::new(1, 8, (13, 35), 12, (5, 5))
                .stride(2, 2)
                .padding(Padding::symmetric(2, 2))
                .groups(4),
        ),
    ]
}

/// Runs `conv` on every path (algorithm and `Auto` × ISA × backend ×
/// threading × entry point, and the native engine again with [`SMALL`]
/// blocks) with `activation`, handing each output to `check` with a
/// description. Every call must succeed.
fn for_every_path(
    conv: &Conv2d,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    mut check: impl FnMut(&str, &[f32]),
) {
    let mut out = vec![0.0f32; conv.geometry().output_len()];
    for algorithm in algorithms() {
        for (isa, backend, parallelism) in engine_combos() {
            let base = ForwardOptions::new(algorithm)
                .parallelism(parallelism)
                .backend(backend)
                .activation(activation)
                .isa(isa);
            let mut variants = vec![base];
            if backend == GemmBackend::Native {
                variants.push(base.blocking(SMALL));
            }
            for options in variants {
                out.fill(-7.0);
                conv.forward_with(input, weight, bias, &mut out, &options)
                    .unwrap_or_else(|e| panic!("forward_with {options:?}: {e}"));
                check(&format!("forward_with {options:?}"), &out);
                let plan = conv
                    .plan(weight, bias, &options)
                    .unwrap_or_else(|e| panic!("plan {options:?}: {e}"));
                out.fill(-7.0);
                plan.forward(input, &mut out)
                    .unwrap_or_else(|e| panic!("plan.forward {options:?}: {e}"));
                check(&format!("plan.forward {options:?}"), &out);
                let mut ws = workspace(&plan);
                out.fill(-7.0);
                plan.forward_in(input, &mut out, &mut ws)
                    .unwrap_or_else(|e| panic!("plan.forward_in {options:?}: {e}"));
                check(&format!("plan.forward_in {options:?}"), &out);
            }
        }
    }
}

/// The column kernels the shapes are meant to reach really serve their
/// plans (the other edges are plain arithmetic on the widths).
#[test]
fn shapes_reach_the_column_kernel() {
    for (isa, rows) in [(Isa::Avx512, 32), (Isa::Avx2, 16)] {
        if isas_under_test().contains(&isa) {
            // Plans of "7x7 plane" and "95 channels".
            assert_eq!(kernel_info_for_shape(isa, 64, 49).mr, rows, "{isa}");
            assert_eq!(kernel_info_for_shape(isa, 95, 7).mr, rows, "{isa}");
        }
    }
}

/// `Clamp { min, max }` with `min > max` gives exactly `max` for every
/// element, whatever the value before it (finite values of either sign
/// here); equal bounds give that value.
#[test]
fn clamp_with_min_above_max_gives_max_everywhere() {
    let clamps = [
        (2.0f32, -1.0f32),
        (0.5, 0.25),
        (f32::INFINITY, f32::NEG_INFINITY),
        (1e30, -1e30),
        (3.0, 3.0),
    ];
    for (name, params) in shapes() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(11);
        let input = rng.vec(g.input_len());
        let weight = rng.vec(g.weight_len());
        let bias = rng.vec(g.out_channels);
        for (min, max) in clamps {
            let activation = Activation::Clamp { min, max };
            assert_eq!(activation.apply(-5.0), max);
            assert_eq!(activation.apply(5.0), max);
            for_every_path(
                &conv,
                &input,
                &weight,
                Some(&bias),
                activation,
                |what, out| {
                    if let Some(i) = out.iter().position(|v| v.to_bits() != max.to_bits()) {
                        panic!(
                            "{name} {activation:?} {what}: element {i} is {}, want {max}",
                            out[i]
                        );
                    }
                },
            );
        }
    }
}

/// A NaN in the input or the bias reaches exactly the outputs whose sum
/// includes it, on every path, and no activation clamps it away, not even
/// a clamp with `min > max`; every other element is the activation of the
/// convolution (exactly `max` for `min > max`).
#[test]
fn nan_propagates_through_every_activation_on_every_path() {
    let activations = [
        Activation::None,
        Activation::Relu,
        Activation::Relu6,
        Activation::Clamp {
            min: -0.25,
            max: 0.25,
        },
        Activation::Clamp {
            min: 1.0,
            max: -1.0,
        },
    ];
    for (name, params) in shapes() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(23);
        let mut input = rng.vec(g.input_len());
        let weight = rng.vec(g.weight_len());
        let mut bias = rng.vec(g.out_channels);
        // NaN at the first pixel (a left edge and the first tile), the last
        // pixel (a right edge, the last partial tile or vector) and one in
        // the middle of another channel; and in the bias of channel 1.
        let (h, w) = (g.in_h, g.in_w);
        let last = input.len() - 1;
        input[0] = f32::NAN;
        input[last] = f32::NAN;
        let c_mid = g.in_channels / 2;
        input[(c_mid * h + h / 2) * w + w / 2] = f32::NAN;
        bias[1] = f32::NAN;
        let (value, magnitude) = conv_reference(&g, &input, &weight, Some(&bias));
        let nan_outputs = value.iter().filter(|v| v.is_nan()).count();
        assert!(
            nan_outputs > 0 && nan_outputs < value.len(),
            "{name}: {nan_outputs} NaN outputs of {}",
            value.len()
        );
        for activation in activations {
            for_every_path(
                &conv,
                &input,
                &weight,
                Some(&bias),
                activation,
                |what, out| {
                    for (i, (&got, &want)) in out.iter().zip(&value).enumerate() {
                        let what = || format!("{name} {activation:?} {what}: element {i}");
                        if want.is_nan() {
                            assert!(got.is_nan(), "{}: {got}, want NaN", what());
                            continue;
                        }
                        assert!(!got.is_nan(), "{}: NaN, want {want}", what());
                        match activation {
                            Activation::Clamp { min, max } if min > max => {
                                assert_eq!(got, max, "{}", what());
                            }
                            _ => {
                                let want = activation.apply(want as f32) as f64;
                                let tol = conv_bound(g.gemm_k(), magnitude[i]);
                                assert!(
                                    (got as f64 - want).abs() <= tol,
                                    "{}: {got}, want {want} (±{tol})",
                                    what()
                                );
                            }
                        }
                    }
                },
            );
        }
    }
}

/// A `Clamp` with a NaN bound has no order: every algorithm, engine and
/// entry point refuses it with `InvalidActivation` naming the bounds, and
/// leaves the output alone.
#[test]
fn clamp_with_a_nan_bound_is_refused() {
    let (name, params) = &shapes()[0];
    let conv = params.build().unwrap();
    let g = *conv.geometry();
    let mut rng = Rng::new(5);
    let input = rng.vec(g.input_len());
    let weight = rng.vec(g.weight_len());
    let bias = rng.vec(g.out_channels);
    for (min, max) in [(f32::NAN, 1.0f32), (-1.0, f32::NAN), (f32::NAN, f32::NAN)] {
        let activation = Activation::Clamp { min, max };
        let is_refusal = |e: &ConvError| {
            matches!(*e, ConvError::InvalidActivation { min: a, max: b }
                if a.to_bits() == min.to_bits() && b.to_bits() == max.to_bits())
        };
        for algorithm in algorithms() {
            for (isa, backend, parallelism) in engine_combos() {
                let options = ForwardOptions::new(algorithm)
                    .parallelism(parallelism)
                    .backend(backend)
                    .activation(activation)
                    .isa(isa);
                let mut out = vec![-7.0f32; g.output_len()];
                let e = conv
                    .forward_with(&input, &weight, Some(&bias), &mut out, &options)
                    .expect_err("a NaN bound must be refused");
                assert!(is_refusal(&e), "{name} {options:?}: {e:?}");
                assert_mentions(&e.to_string(), &["NaN", "Clamp"]);
                assert!(
                    out.iter().all(|&v| v == -7.0),
                    "{options:?} wrote the output"
                );
                let e = conv
                    .plan(&weight, Some(&bias), &options)
                    .expect_err("a plan with a NaN bound must be refused");
                assert!(is_refusal(&e), "plan {options:?}: {e:?}");
            }
        }
    }
}
