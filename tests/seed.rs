//! The classic hand-worked example and small variants of it, asserted exactly
//! (every value is a small integer, so every path must get it bit-for-bit) on
//! every algorithm, every ISA this CPU supports, both GEMM backends and both
//! threading modes.

mod common;

use cpuconv::testing::isas_under_test;
use cpuconv::{
    Activation, Algorithm, Conv2dParams, ConvMode, ForwardOptions, GemmBackend, Padding,
    Parallelism,
};

/// The 3×3 input image, row-major:
///
/// ```text
/// 1 0 1
/// 2 1 0
/// 0 1 1
/// ```
const X: [f32; 9] = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];

/// The identity-diagonal 2×2 kernel `[[1, 0], [0, 1]]`.
const DIAG: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

/// A kernel with no symmetry, so a flip is visible: `[[1, 2], [3, 4]]`.
const K1234: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// Every concrete algorithm plus `Auto`; new algorithms join through
/// `Algorithm::CONCRETE`.
fn algorithms() -> Vec<Algorithm> {
    let mut v = Algorithm::CONCRETE.to_vec();
    v.push(Algorithm::Auto);
    v
}

/// Runs `params` on every algorithm × ISA × backend × threading mode and
/// asserts the output shape and every value exactly.
fn check_everywhere(
    params: Conv2dParams,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    expected_shape: [usize; 4],
    expected: &[f32],
) {
    let conv = params.build().expect("valid descriptor");
    assert_eq!(conv.output_shape(), expected_shape, "{params:?}");
    assert_eq!(
        expected.len(),
        expected_shape.iter().product::<usize>(),
        "test table is inconsistent"
    );
    let isas = isas_under_test();
    assert!(!isas.is_empty());
    for algorithm in algorithms() {
        for &isa in &isas {
            for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
                for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
                    let options = ForwardOptions::new(algorithm)
                        .parallelism(parallelism)
                        .backend(backend)
                        .activation(activation)
                        .isa(Some(isa));
                    // Garbage in the output buffer must be overwritten.
                    let mut out = vec![f32::NAN; expected.len()];
                    conv.forward_with(input, weight, bias, &mut out, &options)
                        .unwrap_or_else(|e| panic!("{options:?}: {e}"));
                    assert_eq!(out, expected, "{params:?} {options:?}");
                }
            }
        }
        if activation == Activation::None {
            let out = conv
                .forward_to_vec(input, weight, bias, algorithm)
                .expect("forward_to_vec");
            assert_eq!(out, expected, "{params:?} forward_to_vec {algorithm:?}");
        }
    }
}

fn seed_params() -> Conv2dParams {
    Conv2dParams::new(1, 1, (3, 3), 1, (2, 2))
}

#[test]
fn classic_example() {
    // out[y][x] = X[y][x]·1 + X[y+1][x+1]·1
    //   (0,0): X00 + X11 = 1 + 1 = 2     (0,1): X01 + X12 = 0 + 0 = 0
    //   (1,0): X10 + X21 = 2 + 1 = 3     (1,1): X11 + X22 = 1 + 1 = 2
    check_everywhere(
        seed_params(),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[2.0, 0.0, 3.0, 2.0],
    );
}

#[test]
fn classic_example_with_bias() {
    // Every value of [[2, 0], [3, 2]] plus 0.5 (exact in binary).
    check_everywhere(
        seed_params(),
        &X,
        &DIAG,
        Some(&[0.5]),
        Activation::None,
        [1, 1, 2, 2],
        &[2.5, 0.5, 3.5, 2.5],
    );
}

#[test]
fn explicit_symmetric_zero_padding_is_the_default() {
    check_everywhere(
        seed_params().padding(Padding::ZERO).stride(1, 1),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[2.0, 0.0, 3.0, 2.0],
    );
}

#[test]
fn true_convolution_of_a_point_symmetric_kernel_is_unchanged() {
    // ConvMode::Convolution flips the kernel by 180°: the first input pixel of
    // a window pairs with w[1][1], i.e. the kernel used is
    //   [[w11, w10], [w01, w00]] = [[1, 0], [0, 1]]
    // — the identity-diagonal kernel is its own 180° rotation, so the answer is
    // the cross-correlation one, [[2, 0], [3, 2]] (not [[1, 2], [2, 1]]).
    check_everywhere(
        seed_params().mode(ConvMode::Convolution),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[2.0, 0.0, 3.0, 2.0],
    );
}

#[test]
fn cross_correlation_with_an_asymmetric_kernel() {
    // W = [[1, 2], [3, 4]]:
    // out[y][x] = 1·X[y][x] + 2·X[y][x+1] + 3·X[y+1][x] + 4·X[y+1][x+1]
    //   (0,0): 1·1 + 2·0 + 3·2 + 4·1 = 1 + 0 + 6 + 4 = 11
    //   (0,1): 1·0 + 2·1 + 3·1 + 4·0 = 0 + 2 + 3 + 0 = 5
    //   (1,0): 1·2 + 2·1 + 3·0 + 4·1 = 2 + 2 + 0 + 4 = 8
    //   (1,1): 1·1 + 2·0 + 3·1 + 4·1 = 1 + 0 + 3 + 4 = 8
    check_everywhere(
        seed_params(),
        &X,
        &K1234,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[11.0, 5.0, 8.0, 8.0],
    );
}

#[test]
fn true_convolution_flips_an_asymmetric_kernel() {
    // Flipped kernel [[4, 3], [2, 1]]: in[y][x] pairs with w[1][1] = 4.
    // out[y][x] = 4·X[y][x] + 3·X[y][x+1] + 2·X[y+1][x] + 1·X[y+1][x+1]
    //   (0,0): 4·1 + 3·0 + 2·2 + 1·1 = 4 + 0 + 4 + 1 = 9
    //   (0,1): 4·0 + 3·1 + 2·1 + 1·0 = 0 + 3 + 2 + 0 = 5
    //   (1,0): 4·2 + 3·1 + 2·0 + 1·1 = 8 + 3 + 0 + 1 = 12
    //   (1,1): 4·1 + 3·0 + 2·1 + 1·1 = 4 + 0 + 2 + 1 = 7
    check_everywhere(
        seed_params().mode(ConvMode::Convolution),
        &X,
        &K1234,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[9.0, 5.0, 12.0, 7.0],
    );
}

#[test]
fn true_convolution_picks_the_opposite_corner() {
    // W = [[1, 0], [0, 0]]: cross-correlation reads the top-left pixel of each
    // window, X[y][x] -> [[1, 0], [2, 1]]; flipped, the 1 sits at w[1][1]'s
    // place, so convolution reads the bottom-right pixel X[y+1][x+1]
    // -> [[X11, X12], [X21, X22]] = [[1, 0], [1, 1]].
    let w = [1.0, 0.0, 0.0, 0.0];
    check_everywhere(
        seed_params(),
        &X,
        &w,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[1.0, 0.0, 2.0, 1.0],
    );
    check_everywhere(
        seed_params().mode(ConvMode::Convolution),
        &X,
        &w,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[1.0, 0.0, 1.0, 1.0],
    );
}

#[test]
fn padding_one() {
    // Padding 1 on every side gives the 5×5 image P:
    //   0 0 0 0 0
    //   0 1 0 1 0
    //   0 2 1 0 0
    //   0 0 1 1 0
    //   0 0 0 0 0
    // OH = OW = (3 + 1 + 1 − 2) / 1 + 1 = 4; out[y][x] = P[y][x] + P[y+1][x+1]:
    //   y=0: P00+P11=1, P01+P12=0, P02+P13=1, P03+P14=0
    //   y=1: P10+P21=2, P11+P22=2, P12+P23=0, P13+P24=1
    //   y=2: P20+P31=0, P21+P32=3, P22+P33=2, P23+P34=0
    //   y=3: P30+P41=0, P31+P42=0, P32+P43=1, P33+P44=1
    // (the interior 2×2 is the unpadded answer [[2, 0], [3, 2]]).
    #[rustfmt::skip]
    let expected = [
        1.0, 0.0, 1.0, 0.0,
        2.0, 2.0, 0.0, 1.0,
        0.0, 3.0, 2.0, 0.0,
        0.0, 0.0, 1.0, 1.0,
    ];
    check_everywhere(
        seed_params().padding(Padding::symmetric(1, 1)),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 4, 4],
        &expected,
    );
}

#[test]
fn asymmetric_padding() {
    // Padding top 1, bottom 0, left 0, right 1 (P is 4 rows × 4 columns):
    //   0 0 0 0
    //   1 0 1 0
    //   2 1 0 0
    //   0 1 1 0
    // OH = (3 + 1 − 2) + 1 = 3, OW = (3 + 1 − 2) + 1 = 3;
    // out[y][x] = P[y][x] + P[y+1][x+1]:
    //   y=0: 0+0=0, 0+1=1, 0+0=0
    //   y=1: 1+1=2, 0+0=0, 1+0=1
    //   y=2: 2+1=3, 1+1=2, 0+0=0
    #[rustfmt::skip]
    let expected = [
        0.0, 1.0, 0.0,
        2.0, 0.0, 1.0,
        3.0, 2.0, 0.0,
    ];
    check_everywhere(
        seed_params().padding(Padding::explicit(1, 0, 0, 1)),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 3, 3],
        &expected,
    );
}

#[test]
fn stride_two_with_padding_one() {
    // The padded image P of `padding_one`, windows every 2 pixels:
    // OH = OW = ⌊(5 − 2) / 2⌋ + 1 = 2; window origins (0|2, 0|2) in P:
    //   (0,0): P00 + P11 = 0 + 1 = 1     (0,1): P02 + P13 = 0 + 1 = 1
    //   (1,0): P20 + P31 = 0 + 0 = 0     (1,1): P22 + P33 = 1 + 1 = 2
    // (the even-indexed entries of the padding-1 answer).
    check_everywhere(
        seed_params().padding(Padding::symmetric(1, 1)).stride(2, 2),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 2, 2],
        &[1.0, 1.0, 0.0, 2.0],
    );
}

#[test]
fn stride_two_without_padding() {
    // OH = OW = ⌊(3 − 2) / 2⌋ + 1 = 1: only the window at (0,0), X00 + X11 = 2.
    check_everywhere(
        seed_params().stride(2, 2),
        &X,
        &DIAG,
        None,
        Activation::None,
        [1, 1, 1, 1],
        &[2.0],
    );
}

#[test]
fn anisotropic_stride() {
    // Stride (1, 2) over the unpadded image: OH = 2, OW = ⌊(3 − 2) / 2⌋ + 1 = 1.
    // With W = [[1, 2], [3, 4]] the windows at (0,0) and (1,0) give 11 and 8
    // (see `cross_correlation_with_an_asymmetric_kernel`).
    check_everywhere(
        seed_params().stride(1, 2),
        &X,
        &K1234,
        None,
        Activation::None,
        [1, 1, 2, 1],
        &[11.0, 8.0],
    );
}

#[test]
fn dilation_two() {
    // Dilation 2 spreads the 2×2 kernel over a 3×3 window: one output,
    //   1·X00 + 2·X02 + 3·X20 + 4·X22 = 1·1 + 2·1 + 3·0 + 4·1 = 7.
    check_everywhere(
        seed_params().dilation(2, 2),
        &X,
        &K1234,
        None,
        Activation::None,
        [1, 1, 1, 1],
        &[7.0],
    );
}

#[test]
fn groups_and_batch() {
    // Two images, two channels, two groups of a 1×1 kernel: output channel 0
    // is 2·(input channel 0), output channel 1 is −1·(input channel 1), plus
    // bias [1, 0.5].
    // Planes: image 0 = [X, X + 1], image 1 = [−X, 2·X].
    let planes: [Vec<f32>; 4] = [
        X.to_vec(),
        X.iter().map(|v| v + 1.0).collect(),
        X.iter().map(|v| -v).collect(),
        X.iter().map(|v| 2.0 * v).collect(),
    ];
    let input: Vec<f32> = planes.concat();
    let weight = [2.0, -1.0];
    let bias = [1.0, 0.5];
    let expected: Vec<f32> = input
        .chunks(9)
        .enumerate()
        .flat_map(|(plane, ch)| {
            let k = plane % 2;
            ch.iter()
                .map(move |&v| v * weight[k] + bias[k])
                .collect::<Vec<_>>()
        })
        .collect();
    check_everywhere(
        Conv2dParams::new(2, 2, (3, 3), 2, (1, 1)).groups(2),
        &input,
        &weight,
        Some(&bias),
        Activation::None,
        [2, 2, 3, 3],
        &expected,
    );
}

/// W = [[4, −3], [−2, 1]] gives outputs of both signs:
/// out[y][x] = 4·X[y][x] − 3·X[y][x+1] − 2·X[y+1][x] + 1·X[y+1][x+1]
///   (0,0): 4·1 − 3·0 − 2·2 + 1·1 = 4 − 0 − 4 + 1 = 1
///   (0,1): 4·0 − 3·1 − 2·1 + 1·0 = 0 − 3 − 2 + 0 = −5
///   (1,0): 4·2 − 3·1 − 2·0 + 1·1 = 8 − 3 − 0 + 1 = 6
///   (1,1): 4·1 − 3·0 − 2·1 + 1·1 = 4 − 0 − 2 + 1 = 3
/// and with bias 1: [2, −4, 7, 4].
const SIGNED: [f32; 4] = [4.0, -3.0, -2.0, 1.0];

#[test]
fn activations_on_negative_outputs() {
    let cases: [(Activation, Option<f32>, [f32; 4]); 8] = [
        (Activation::None, None, [1.0, -5.0, 6.0, 3.0]),
        (Activation::None, Some(1.0), [2.0, -4.0, 7.0, 4.0]),
        // max(x, 0)
        (Activation::Relu, None, [1.0, 0.0, 6.0, 3.0]),
        (Activation::Relu, Some(1.0), [2.0, 0.0, 7.0, 4.0]),
        // min(max(x, 0), 6): 7 -> 6
        (Activation::Relu6, None, [1.0, 0.0, 6.0, 3.0]),
        (Activation::Relu6, Some(1.0), [2.0, 0.0, 6.0, 4.0]),
        // min(max(x, −1), 3)
        (
            Activation::Clamp {
                min: -1.0,
                max: 3.0,
            },
            Some(1.0),
            [2.0, -1.0, 3.0, 3.0],
        ),
        // min(max(x, −4.5), 2.5): −5 -> −4.5, 6 -> 2.5
        (
            Activation::Clamp {
                min: -4.5,
                max: 2.5,
            },
            None,
            [1.0, -4.5, 2.5, 2.5],
        ),
    ];
    for (activation, bias, expected) in cases {
        let bias = bias.map(|b| [b]);
        check_everywhere(
            seed_params(),
            &X,
            &SIGNED,
            bias.as_ref().map(|b| &b[..]),
            activation,
            [1, 1, 2, 2],
            &expected,
        );
    }
}

#[test]
fn activation_apply_matches_its_definition() {
    assert_eq!(Activation::None.apply(-3.0), -3.0);
    assert_eq!(Activation::Relu.apply(-3.0), 0.0);
    assert_eq!(Activation::Relu.apply(7.0), 7.0);
    assert_eq!(Activation::Relu6.apply(7.0), 6.0);
    assert_eq!(Activation::Relu6.apply(-0.5), 0.0);
    let c = Activation::Clamp {
        min: -1.0,
        max: 3.0,
    };
    assert_eq!(c.apply(-2.0), -1.0);
    assert_eq!(c.apply(2.0), 2.0);
    assert_eq!(c.apply(9.0), 3.0);
    assert!(c.apply(f32::NAN).is_nan(), "NaN passes through");
}

#[test]
fn algorithm_names_round_trip() {
    for a in algorithms() {
        assert_eq!(Algorithm::from_name(a.name()), Some(a));
    }
    assert_eq!(Algorithm::from_name("  IM2COL "), Some(Algorithm::Im2col));
    assert_eq!(Algorithm::from_name("winograd-but-not-really"), None);
}

#[test]
fn every_algorithm_runs_with_default_options() {
    let conv = seed_params().build().unwrap();
    for a in algorithms() {
        let mut out = [f32::NAN; 4];
        conv.forward(&X, &DIAG, None, &mut out, a).unwrap();
        assert_eq!(out, [2.0, 0.0, 3.0, 2.0], "{a:?}");
        let mut out = [f32::NAN; 4];
        conv.forward_with(&X, &DIAG, None, &mut out, &ForwardOptions::new(a))
            .unwrap();
        assert_eq!(out, [2.0, 0.0, 3.0, 2.0], "{a:?}");
    }
}
