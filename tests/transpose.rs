//! The transposed convolution (`ConvTranspose2d`: PyTorch
//! `nn.ConvTranspose2d`, ONNX `ConvTranspose`):
//!
//! * the ONNX backend node test cases of `ConvTranspose` (the basic case,
//!   `pads`, `output_shape`, `output_padding`, `kernel_shape`, `dilations`,
//!   `auto_pad = SAME_UPPER`), reproduced from the operator's documentation
//!   and asserted exactly, plus `SAME_LOWER` and a grouped case worked by
//!   hand, through every algorithm, `forward`, `forward_with`,
//!   `forward_to_vec` and a plan;
//! * PyTorch's output-size formula on a table, the seed example by hand with
//!   bias and activations, and `ConvMode::Convolution` flipping the kernel;
//! * equality with `Conv2d::backward_input` of the matching convolution;
//! * a property test of every algorithm, every engine combination and plans
//!   against the `Direct` reference (itself checked against an f64
//!   evaluation of the definition written here), with kernel evidence;
//! * one test per error;
//! * the adjoint identity `⟨convT(x, w), y⟩ = ⟨x, conv(y, w)⟩`.
//!
//! Error bounds. Every random value lies in `[-1, 1)`. An output element is
//! an f32 sum of at most `T = (C_in/g)·R·S` products plus the bias, so with
//! `M = Σ |terms|` (computed in f64 from the definition) any summation order
//! is within `(T + 1)·ε·M` of the exact value, and two such results within
//! twice that: `common::conv_bound(T, M)`. Activations are clamps, hence
//! 1-Lipschitz, so the bound holds after them too.

mod common;

use common::{
    adjoint_tolerance, algorithms, assert_mentions, bits, conv_bound, dot, engine_combos,
    proptest_config, to_f64, Rng,
};
use cpuconv::testing::traced;
use cpuconv::{
    Activation, Algorithm, BackwardOptions, Conv2d, Conv2dParams, ConvError, ConvMode,
    ConvTranspose2d, ConvTranspose2dParams, ForwardOptions, GemmBackend, OnnxAutoPad, Padding,
    Parallelism, TransposePadding,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// --- running one case every way ------------------------------------------------------------

/// The output of `t` on `(x, w, bias)` with `activation`, computed by every
/// algorithm through `forward_with`, `forward` / `forward_to_vec` (when no
/// activation) and a plan, each labelled. Output buffers start as NaN, so
/// an element left unwritten shows.
fn every_way(
    t: &ConvTranspose2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
) -> Vec<(String, Vec<f32>)> {
    let len: usize = t.output_shape().iter().product();
    let mut out = Vec::new();
    for algorithm in algorithms() {
        let options = ForwardOptions::new(algorithm).activation(activation);
        let mut y = vec![f32::NAN; len];
        t.forward_with(x, w, bias, &mut y, &options)
            .unwrap_or_else(|e| panic!("{algorithm:?} forward_with: {e}"));
        out.push((format!("{algorithm:?} forward_with"), y));
        if activation == Activation::None {
            let mut y = vec![f32::NAN; len];
            t.forward(x, w, bias, &mut y, algorithm)
                .unwrap_or_else(|e| panic!("{algorithm:?} forward: {e}"));
            out.push((format!("{algorithm:?} forward"), y));
            let y = t
                .forward_to_vec(x, w, bias, algorithm)
                .unwrap_or_else(|e| panic!("{algorithm:?} forward_to_vec: {e}"));
            out.push((format!("{algorithm:?} forward_to_vec"), y));
        }
        let plan = t
            .plan(w, bias, &options)
            .unwrap_or_else(|e| panic!("{algorithm:?} plan: {e}"));
        let mut y = vec![f32::NAN; len];
        plan.forward(x, &mut y)
            .unwrap_or_else(|e| panic!("{algorithm:?} plan.forward: {e}"));
        out.push((format!("{algorithm:?} plan"), y));
    }
    out
}

/// Every way of [`every_way`] gives exactly `want` (small integers or
/// halves: every sum is exact in f32, whatever the order).
fn assert_exact(
    t: &ConvTranspose2d,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    want: &[f32],
) {
    assert_eq!(
        t.output_shape().iter().product::<usize>(),
        want.len(),
        "{t:?}"
    );
    for (how, got) in every_way(t, x, w, bias, activation) {
        assert_eq!(got, want, "{how} of {t:?}");
    }
}

// --- ONNX ConvTranspose node tests -----------------------------------------------------------

/// The input of most ONNX cases, `(1, 1, 3, 3)`: `0..=8` row-major.
const X9: [f32; 9] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];

/// The ONNX cases' weight, `(1, 2, 3, 3)`: all ones.
const ONES_1X2X3X3: [f32; 18] = [1.0; 18];

/// Both output channels of a `(1, 2, …)` ONNX result are the same plane.
fn two_channels(plane: &[f32]) -> Vec<f32> {
    [plane, plane].concat()
}

/// Every way of [`every_way`] gives exactly both channels of `plane` for
/// the ONNX input [`X9`] and weight [`ONES_1X2X3X3`], no bias, no
/// activation.
fn assert_onnx(t: &ConvTranspose2d, plane: &[f32]) {
    assert_exact(
        t,
        &X9,
        &ONES_1X2X3X3,
        None,
        Activation::None,
        &two_channels(plane),
    );
}

/// Each output channel of ONNX `test_convtranspose`, `(1, 2, 5, 5)`: the
/// 3×3 ones kernel over 0..=8.
#[rustfmt::skip]
const ONNX_BASIC: [f32; 25] = [
    0.0, 1.0, 3.0, 3.0, 2.0,
    3.0, 8.0, 15.0, 12.0, 7.0,
    9.0, 21.0, 36.0, 27.0, 15.0,
    9.0, 20.0, 33.0, 24.0, 13.0,
    6.0, 13.0, 21.0, 15.0, 8.0,
];

/// ONNX `test_convtranspose`: no attributes, 3×3 ones kernel over 0..=8,
/// output `(1, 2, 5, 5)`.
#[test]
fn onnx_convtranspose_basic() {
    let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
        .build()
        .unwrap();
    assert_eq!(t.output_shape(), [1, 2, 5, 5]);
    assert_eq!(t.weight_shape(), [1, 2, 3, 3]);
    assert_onnx(&t, &ONNX_BASIC);
}

/// ONNX `test_convtranspose_pads`: strides `[3, 2]`, pads `[1, 2, 1, 2]`
/// (`[top, left, bottom, right]`), output `(1, 2, 7, 3)`.
#[test]
fn onnx_convtranspose_pads() {
    #[rustfmt::skip]
    let plane = [
        1.0, 1.0, 3.0,
        1.0, 1.0, 3.0,
        7.0, 4.0, 9.0,
        7.0, 4.0, 9.0,
        7.0, 4.0, 9.0,
        13.0, 7.0, 15.0,
        13.0, 7.0, 15.0,
    ];
    let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
        .stride(3, 2)
        .padding(Padding::onnx_pads([1, 2, 1, 2]))
        .build()
        .unwrap();
    assert_eq!(t.output_shape(), [1, 2, 7, 3]);
    assert_eq!(t.padding(), Padding::explicit(1, 1, 2, 2));
    assert_onnx(&t, &plane);
}

/// The `(1, 2, 10, 8)` result shared by ONNX `test_convtranspose_pad`,
/// `test_convtranspose_output_shape` and `test_convtranspose_kernel_shape`
/// (strides `[3, 2]`): the full 9×7 output of the stride, then one more row
/// and column that no input reaches.
#[rustfmt::skip]
const ONNX_10X8: [f32; 80] = [
    0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0,
    0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0,
    0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0,
    3.0, 3.0, 7.0, 4.0, 9.0, 5.0, 5.0, 0.0,
    3.0, 3.0, 7.0, 4.0, 9.0, 5.0, 5.0, 0.0,
    3.0, 3.0, 7.0, 4.0, 9.0, 5.0, 5.0, 0.0,
    6.0, 6.0, 13.0, 7.0, 15.0, 8.0, 8.0, 0.0,
    6.0, 6.0, 13.0, 7.0, 15.0, 8.0, 8.0, 0.0,
    6.0, 6.0, 13.0, 7.0, 15.0, 8.0, 8.0, 0.0,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
];

/// ONNX `test_convtranspose_pad`: strides `[3, 2]`, output_padding
/// `[1, 1]`: the extra row and column at the end, no input reaching them,
/// hold 0 (and `act(bias)` with a bias: checked with bias 0.5 and Relu6).
#[test]
fn onnx_convtranspose_output_padding() {
    let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
        .stride(3, 2)
        .output_padding(1, 1)
        .build()
        .unwrap();
    assert_eq!(t.output_shape(), [1, 2, 10, 8]);
    assert_eq!(t.output_padding(), (1, 1));
    assert_onnx(&t, &ONNX_10X8);
    let want = two_channels(&ONNX_10X8);
    let biased: Vec<f32> = want.iter().map(|v| (v + 0.5).min(6.0)).collect();
    assert_exact(
        &t,
        &X9,
        &ONES_1X2X3X3,
        Some(&[0.5, 0.5]),
        Activation::Relu6,
        &biased,
    );
}

/// ONNX `test_convtranspose_kernel_shape`: strides `[3, 2]`, output_shape
/// `[10, 8]`, kernel_shape `[3, 3]` (the weight's own, so nothing to set)
/// and output_padding `[1, 1]`: the full output is exactly 10×8, nothing
/// removed.
#[test]
fn onnx_convtranspose_kernel_shape() {
    for extra_at_end in [false, true] {
        let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
            .stride(3, 2)
            .output_padding(1, 1)
            .padding(TransposePadding::OnnxOutputShape {
                size: (10, 8),
                extra_at_end,
            })
            .build()
            .unwrap();
        assert_eq!(t.output_shape(), [1, 2, 10, 8]);
        assert_eq!(t.padding(), Padding::ZERO);
        assert_onnx(&t, &ONNX_10X8);
    }
}

/// ONNX `test_convtranspose_output_shape`: strides `[3, 2]`, output_shape
/// `[10, 8]`, no output_padding. The full output is 9×7, so ONNX's
/// `total_padding = 9 − 10 = −1` per axis; the ONNX test expects the 10×8
/// result above, the extra row and column (beyond the full output) at the
/// end, holding 0.
#[test]
fn onnx_convtranspose_output_shape() {
    let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
        .stride(3, 2)
        .padding(TransposePadding::OnnxOutputShape {
            size: (10, 8),
            extra_at_end: false,
        })
        .build()
        .expect("ONNX test_convtranspose_output_shape must build");
    assert_eq!(t.output_shape(), [1, 2, 10, 8]);
    assert_onnx(&t, &ONNX_10X8);
}

/// ONNX `test_convtranspose_dilations`: x `[[3, 8, 1], [9, 5, 7], [3, 2,
/// 6]]`, W `[[7, 2], [1, 9]]`, dilations `[2, 2]`, output `(1, 1, 5, 5)`.
#[test]
fn onnx_convtranspose_dilations() {
    let x = [3.0, 8.0, 1.0, 9.0, 5.0, 7.0, 3.0, 2.0, 6.0];
    let w = [7.0, 2.0, 1.0, 9.0];
    #[rustfmt::skip]
    let want = [
        21.0, 56.0, 13.0, 16.0, 2.0,
        63.0, 35.0, 67.0, 10.0, 14.0,
        24.0, 22.0, 76.0, 76.0, 21.0,
        9.0, 5.0, 88.0, 45.0, 63.0,
        3.0, 2.0, 33.0, 18.0, 54.0,
    ];
    let t = ConvTranspose2dParams::new(1, 1, (3, 3), 1, (2, 2))
        .dilation(2, 2)
        .build()
        .unwrap();
    assert_eq!(t.output_shape(), [1, 1, 5, 5]);
    assert_exact(&t, &x, &w, None, Activation::None, &want);
}

/// The full 7×7 output of the 3×3 ones kernel over 0..=8 at stride 2 (each
/// input pixel stamps a 3×3 block of itself; neighbouring stamps overlap
/// on every even row and column), by hand: column-expanded input rows
/// `r0 = [0, 0, 1, 1, 3, 2, 2]`, `r1 = [3, 3, 7, 4, 9, 5, 5]`,
/// `r2 = [6, 6, 13, 7, 15, 8, 8]`, and the rows are `r0, r0, r0 + r1, r1,
/// r1 + r2, r2, r2`.
#[rustfmt::skip]
const FULL_STRIDE2: [[f32; 7]; 7] = [
    [0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0],
    [0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0],
    [3.0, 3.0, 8.0, 5.0, 12.0, 7.0, 7.0],
    [3.0, 3.0, 7.0, 4.0, 9.0, 5.0, 5.0],
    [9.0, 9.0, 20.0, 11.0, 24.0, 13.0, 13.0],
    [6.0, 6.0, 13.0, 7.0, 15.0, 8.0, 8.0],
    [6.0, 6.0, 13.0, 7.0, 15.0, 8.0, 8.0],
];

/// ONNX `test_convtranspose_autopad_same`: auto_pad `SAME_UPPER`, strides
/// `[2, 2]`: `3·2 = 6` outputs per axis out of the full 7, the one removed
/// at the end. The ONNX expected rows are asserted literally; `SAME_LOWER`
/// (removing the first row and column instead) and `VALID` (the full
/// output) are checked against the full output above.
#[test]
fn onnx_convtranspose_autopad_same() {
    #[rustfmt::skip]
    let upper = [
        0.0, 0.0, 1.0, 1.0, 3.0, 2.0,
        0.0, 0.0, 1.0, 1.0, 3.0, 2.0,
        3.0, 3.0, 8.0, 5.0, 12.0, 7.0,
        3.0, 3.0, 7.0, 4.0, 9.0, 5.0,
        9.0, 9.0, 20.0, 11.0, 24.0, 13.0,
        6.0, 6.0, 13.0, 7.0, 15.0, 8.0,
    ];
    let window = |r0: usize, c0: usize, n: usize| -> Vec<f32> {
        FULL_STRIDE2[r0..r0 + n]
            .iter()
            .flat_map(|row| row[c0..c0 + n].iter().copied())
            .collect()
    };
    assert_eq!(window(0, 0, 6), upper);
    for (auto, want, padding, size) in [
        (
            OnnxAutoPad::SameUpper,
            window(0, 0, 6),
            Padding::explicit(0, 1, 0, 1),
            6,
        ),
        (
            OnnxAutoPad::SameLower,
            window(1, 1, 6),
            Padding::explicit(1, 0, 1, 0),
            6,
        ),
        (OnnxAutoPad::Valid, window(0, 0, 7), Padding::ZERO, 7),
    ] {
        let t = ConvTranspose2dParams::new(1, 1, (3, 3), 2, (3, 3))
            .stride(2, 2)
            .padding(auto)
            .build()
            .unwrap();
        assert_eq!(t.output_shape(), [1, 2, size, size], "{auto:?}");
        assert_eq!(t.padding(), padding, "{auto:?}");
        assert_onnx(&t, &want);
    }
}

/// The ONNX cases have no `group` example; this one is worked by hand. Two
/// groups of one input channel and two output channels each, weight
/// `[2, 2, 3, 3]`: group 0's kernels are ones and twos, group 1's are
/// threes and fours, and group 1's input is twice group 0's. Output channel
/// `c` is then `k_c · m · basic`, with `basic` the plane of
/// `onnx_convtranspose_basic`, `k = 1, 2, 3, 4` and `m = 1, 1, 2, 2`; any
/// cross-group term would break the pattern.
#[test]
fn grouped_transpose_by_hand() {
    let basic = ONNX_BASIC;
    let x: Vec<f32> = X9
        .iter()
        .copied()
        .chain(X9.iter().map(|v| 2.0 * v))
        .collect();
    let w: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|&k| [k; 9])
        .collect();
    let want: Vec<f32> = [1.0f32, 2.0, 6.0, 8.0]
        .iter()
        .flat_map(|&f| basic.iter().map(move |v| f * v))
        .collect();
    let t = ConvTranspose2dParams::new(1, 2, (3, 3), 4, (3, 3))
        .groups(2)
        .build()
        .unwrap();
    assert_eq!(t.weight_shape(), [2, 2, 3, 3]);
    assert_eq!(t.output_shape(), [1, 4, 5, 5]);
    assert_exact(&t, &x, &w, None, Activation::None, &want);
}

// --- PyTorch semantics -----------------------------------------------------------------------

/// PyTorch's `H_out = (H − 1)·s − 2p + d·(k − 1) + output_padding + 1`, on
/// a table worked by hand (`output_padding` below `max(s, d)`, including
/// dilation above the stride), each row on the height with another on the
/// width.
#[test]
fn pytorch_output_size_formula() {
    // (H, k, s, p, d, output_padding, H_out by hand)
    let table: [(usize, usize, usize, usize, usize, usize, usize); 9] = [
        (16, 4, 2, 1, 1, 0, 32), // 15·2 − 2 + 3 + 1
        (5, 3, 2, 1, 1, 1, 10),  // 8 − 2 + 2 + 1 + 1
        (3, 3, 1, 0, 2, 1, 8),   // 2 + 4 + 1 + 1: dilation 2 > stride 1
        (4, 2, 1, 0, 3, 2, 9),   // 3 + 3 + 2 + 1: output_padding 2 < d = 3
        (7, 5, 3, 2, 2, 2, 25),  // 18 − 4 + 8 + 2 + 1
        (1, 1, 1, 0, 1, 0, 1),   // a pointwise kernel on one pixel
        (2, 3, 4, 0, 1, 3, 10),  // 4 + 2 + 3 + 1: output_padding 3 < s = 4
        (6, 4, 3, 3, 1, 0, 13),  // 15 − 6 + 3 + 1
        (2, 4, 2, 2, 3, 2, 10),  // 2 − 4 + 9 + 2 + 1: dilation 3 > stride 2
    ];
    for (i, a) in table.iter().enumerate() {
        let b = table[(i + 4) % table.len()];
        let t = ConvTranspose2dParams::new(2, 3, (a.0, b.0), 5, (a.1, b.1))
            .stride(a.2, b.2)
            .padding(Padding::symmetric(a.3, b.3))
            .dilation(a.4, b.4)
            .output_padding(a.5, b.5)
            .build()
            .unwrap_or_else(|e| panic!("{a:?} × {b:?}: {e}"));
        assert_eq!(t.output_shape(), [2, 5, a.6, b.6], "{a:?} × {b:?}");
        assert_eq!(t.input_shape(), [2, 3, a.0, b.0]);
        assert_eq!(t.weight_shape(), [3, 5, a.1, b.1]);
        assert_eq!(t.padding(), Padding::symmetric(a.3, b.3));
        // 2·N·C_in·H·W·(C_out/g)·R·S.
        assert_eq!(t.flops(), (2 * 2 * 3 * a.0 * b.0 * 5 * a.1 * b.1) as u64);
    }
}

/// The seed example's transpose: each pixel of `[[1, 2], [3, 4]]` stamps
/// the kernel `[[1, 0], [0, 1]]` at its own position, so
/// `y = [[1, 2, 0], [3, 1 + 4, 2], [0, 3, 4]]`. With bias −2.5:
/// `[[−1.5, −0.5, −2.5], [0.5, 2.5, −0.5], [−2.5, 0.5, 1.5]]`, then Relu
/// or Clamp(−1, 1) element by element; every value is exact.
#[test]
fn seed_example_with_bias_and_activations() {
    let t = ConvTranspose2dParams::new(1, 1, (2, 2), 1, (2, 2))
        .build()
        .unwrap();
    let x = [1.0, 2.0, 3.0, 4.0];
    let w = [1.0, 0.0, 0.0, 1.0];
    assert_exact(
        &t,
        &x,
        &w,
        None,
        Activation::None,
        &[1.0, 2.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0],
    );
    let b = [-2.5];
    assert_exact(
        &t,
        &x,
        &w,
        Some(&b),
        Activation::None,
        &[-1.5, -0.5, -2.5, 0.5, 2.5, -0.5, -2.5, 0.5, 1.5],
    );
    assert_exact(
        &t,
        &x,
        &w,
        Some(&b),
        Activation::Relu,
        &[0.0, 0.0, 0.0, 0.5, 2.5, 0.0, 0.0, 0.5, 1.5],
    );
    assert_exact(
        &t,
        &x,
        &w,
        Some(&b),
        Activation::Clamp {
            min: -1.0,
            max: 1.0,
        },
        &[-1.0, -0.5, -1.0, 0.5, 1.0, -0.5, -1.0, 0.5, 1.0],
    );
}

/// `ConvMode::Convolution` flips the kernel. With x `[[1, 2], [3, 4]]` and
/// w `[[1, 2], [3, 4]]`, cross-correlation stamps `x[i][j]·w` at `(i, j)`:
///
/// ```text
/// [[1,      2 + 2,              4    ],       [[1,  4,  4],
///  [3 + 3,  4 + 6 + 6 + 4,      8 + 8],   =    [6, 20, 16],
///  [9,      12 + 12,            16   ]]        [9, 24, 16]]
/// ```
///
/// and true convolution stamps the flipped `[[4, 3], [2, 1]]`:
///
/// ```text
/// [[4,       3 + 8,             6    ],       [[ 4, 11,  6],
///  [2 + 12,  1 + 4 + 9 + 16,    2 + 12],  =    [14, 30, 14],
///  [6,       3 + 8,             4    ]]        [ 6, 11,  4]]
/// ```
#[test]
fn convolution_mode_flips_the_kernel() {
    let x = [1.0, 2.0, 3.0, 4.0];
    let w = [1.0, 2.0, 3.0, 4.0];
    let base = ConvTranspose2dParams::new(1, 1, (2, 2), 1, (2, 2));
    let xcorr = base.build().unwrap();
    assert_exact(
        &xcorr,
        &x,
        &w,
        None,
        Activation::None,
        &[1.0, 4.0, 4.0, 6.0, 20.0, 16.0, 9.0, 24.0, 16.0],
    );
    let conv = base.mode(ConvMode::Convolution).build().unwrap();
    assert_exact(
        &conv,
        &x,
        &w,
        None,
        Activation::None,
        &[4.0, 11.0, 6.0, 14.0, 30.0, 14.0, 6.0, 11.0, 4.0],
    );
    // And it is cross-correlation with the flipped kernel.
    assert_exact(
        &xcorr,
        &x,
        &[4.0, 3.0, 2.0, 1.0],
        None,
        Activation::None,
        &[4.0, 11.0, 6.0, 14.0, 30.0, 14.0, 6.0, 11.0, 4.0],
    );
}

/// ONNX `auto_pad = SAME_UPPER` / `SAME_LOWER` asks for `input·stride`
/// outputs per axis (the operator's documentation, and the type's own:
/// "keep `input·stride` outputs per axis"). With a kernel smaller than the
/// stride the full output is shorter than that: stride 2, kernel 1, input 3
/// gives a full output of 5, and ONNX's `output_shape` is still 6 (its
/// `total_padding` is −1; ONNX Runtime clamps it to 0 and keeps 6 outputs).
/// Only the shape is asserted: where the extra output goes differs between
/// the ONNX reference (floor division) and ONNX Runtime.
#[test]
fn onnx_same_with_kernel_smaller_than_stride_keeps_input_times_stride() {
    for auto in [OnnxAutoPad::SameUpper, OnnxAutoPad::SameLower] {
        let t = ConvTranspose2dParams::new(1, 1, (3, 3), 1, (1, 1))
            .stride(2, 2)
            .padding(auto)
            .build()
            .unwrap();
        assert_eq!(t.output_shape(), [1, 1, 6, 6], "{auto:?}");
    }
}

// --- random cases ----------------------------------------------------------------------------

/// How a random case removes outputs.
#[derive(Clone, Copy, Debug)]
enum PadChoice {
    Explicit(Padding),
    Auto(OnnxAutoPad),
    /// ONNX `output_shape` of `full − shrink` per axis (at least 1).
    OutputShape {
        shrink: (usize, usize),
        extra_at_end: bool,
    },
}

/// One random small transposed convolution.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    in_per_group: usize,
    out_per_group: usize,
    groups: usize,
    input: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    /// Reduced below `max(stride, dilation)` (or below the stride, for
    /// the tests that need the matching convolution) by `output_padding`.
    raw_output_padding: (usize, usize),
    below_stride: bool,
    pad: PadChoice,
    mode: ConvMode,
    bias: bool,
    activation: Activation,
    seed: u64,
}

/// One axis of a case: `(input, kernel, stride, dilation, output_padding)`.
type Axis = (usize, usize, usize, usize, usize);

impl Case {
    fn axis(&self, index: usize) -> Axis {
        let pick = |p: (usize, usize)| if index == 0 { p.0 } else { p.1 };
        let (s, d) = (pick(self.stride), pick(self.dilation));
        let limit = if self.below_stride { s } else { s.max(d) };
        (
            pick(self.input),
            pick(self.kernel),
            s,
            d,
            pick(self.raw_output_padding) % limit,
        )
    }

    /// The same case with output padding below the stride, so that the
    /// matching convolution exists.
    fn below_stride(mut self) -> Case {
        self.below_stride = true;
        self
    }

    fn output_padding(&self) -> (usize, usize) {
        (self.axis(0).4, self.axis(1).4)
    }

    fn in_channels(&self) -> usize {
        self.in_per_group * self.groups
    }

    fn out_channels(&self) -> usize {
        self.out_per_group * self.groups
    }

    fn padding(&self) -> TransposePadding {
        match self.pad {
            PadChoice::Explicit(p) => TransposePadding::Explicit(p),
            PadChoice::Auto(a) => TransposePadding::OnnxAuto(a),
            PadChoice::OutputShape {
                shrink,
                extra_at_end,
            } => {
                let size = |i: usize, s: usize| full(self.axis(i)).saturating_sub(s).max(1);
                TransposePadding::OnnxOutputShape {
                    size: (size(0, shrink.0), size(1, shrink.1)),
                    extra_at_end,
                }
            }
        }
    }

    fn params(&self) -> ConvTranspose2dParams {
        let op = self.output_padding();
        ConvTranspose2dParams::new(
            self.batch,
            self.in_channels(),
            self.input,
            self.out_channels(),
            self.kernel,
        )
        .stride(self.stride.0, self.stride.1)
        .dilation(self.dilation.0, self.dilation.1)
        .output_padding(op.0, op.1)
        .padding(self.padding())
        .groups(self.groups)
        .mode(self.mode)
    }

    /// `(begin, end)` removed on axis `index`, from the PyTorch / ONNX
    /// rules written out here (not the library's): explicit values as
    /// given; `VALID` nothing; `SAME_*` the excess over `input·stride`
    /// split evenly, the odd one at the end for `SAME_UPPER`; `output_shape`
    /// the excess over the size split as the ONNX equations say, more at the
    /// end for `SAME_UPPER` (`extra_at_end`), more at the beginning
    /// otherwise.
    /// `(begin, end, size)` of one axis: what is removed from the full
    /// output and what is kept; an ONNX size above the full output keeps
    /// it all and extends it at the end. `None` when the padding removes
    /// the whole axis.
    fn resolved_axis(&self, index: usize) -> Option<(usize, usize, usize)> {
        let a = self.axis(index);
        let f = full(a);
        let keep = |size: usize, more_at_end: bool| {
            if size > f {
                return (0, 0, size);
            }
            let total = f - size;
            if more_at_end {
                (total / 2, total - total / 2, size)
            } else {
                (total - total / 2, total / 2, size)
            }
        };
        let (begin, end, size) = match (self.pad, self.padding()) {
            (PadChoice::Explicit(p), _) => {
                let (b, e) = if index == 0 {
                    (p.top, p.bottom)
                } else {
                    (p.left, p.right)
                };
                if b + e >= f {
                    return None;
                }
                (b, e, f - b - e)
            }
            (PadChoice::Auto(OnnxAutoPad::Valid), _) => (0, 0, f),
            (PadChoice::Auto(same), _) => keep(a.0 * a.2, same == OnnxAutoPad::SameUpper),
            (_, TransposePadding::OnnxOutputShape { size, extra_at_end }) => {
                keep(if index == 0 { size.0 } else { size.1 }, extra_at_end)
            }
            _ => unreachable!(),
        };
        Some((begin, end, size))
    }

    /// The resolved padding and output size, or `None` when the padding
    /// removes a whole axis.
    fn resolved(&self) -> Option<(Padding, (usize, usize))> {
        let (top, bottom, oh) = self.resolved_axis(0)?;
        let (left, right, ow) = self.resolved_axis(1)?;
        Some((Padding::explicit(top, bottom, left, right), (oh, ow)))
    }
}

/// `stride·(input − 1) + output_padding + dilation·(kernel − 1) + 1`.
fn full((input, kernel, stride, dilation, op): Axis) -> usize {
    stride * (input - 1) + op + dilation * (kernel - 1) + 1
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let pad = prop_oneof![
        3 => (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3)
            .prop_map(|(t, b, l, r)| PadChoice::Explicit(Padding::explicit(t, b, l, r))),
        1 => prop_oneof![
            Just(OnnxAutoPad::SameUpper),
            Just(OnnxAutoPad::SameLower),
            Just(OnnxAutoPad::Valid)
        ]
        .prop_map(PadChoice::Auto),
        1 => ((0usize..=3, 0usize..=3), any::<bool>())
            .prop_map(|(shrink, extra_at_end)| PadChoice::OutputShape { shrink, extra_at_end }),
    ];
    let activation = prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        Just(Activation::Relu6),
        Just(Activation::Clamp {
            min: -0.5,
            max: 0.75
        }),
    ];
    (
        (1usize..=2, 1usize..=4, 1usize..=4, 1usize..=3),
        ((1usize..=7, 1usize..=7), (1usize..=4, 1usize..=4)),
        (
            (1usize..=3, 1usize..=3),
            (1usize..=3, 1usize..=3),
            (0usize..3, 0usize..3),
        ),
        pad,
        (
            prop_oneof![
                Just(ConvMode::CrossCorrelation),
                Just(ConvMode::Convolution)
            ],
            any::<bool>(),
            activation,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (batch, in_per_group, out_per_group, groups),
                (input, kernel),
                (stride, dilation, raw_output_padding),
                pad,
                (mode, bias, activation, seed),
            )| Case {
                batch,
                in_per_group,
                out_per_group,
                groups,
                input,
                kernel,
                stride,
                dilation,
                raw_output_padding,
                below_stride: false,
                pad,
                mode,
                bias,
                activation,
                seed,
            },
        )
}

/// Builds the case, checking the shape and the resolved padding against
/// [`Case::resolved`]; a case whose padding removes a whole axis must be
/// refused with `PaddingRemovesOutput`, and is rejected.
fn build(case: &Case) -> Result<ConvTranspose2d, TestCaseError> {
    let built = case.params().build();
    match (case.resolved(), built) {
        (Some((padding, (oh, ow))), Ok(t)) => {
            prop_assert_eq!(t.padding(), padding, "{:?}", case);
            prop_assert_eq!(
                t.output_shape(),
                [case.batch, case.out_channels(), oh, ow],
                "{:?}",
                case
            );
            prop_assert_eq!(
                t.weight_shape(),
                [
                    case.in_channels(),
                    case.out_per_group,
                    case.kernel.0,
                    case.kernel.1
                ]
            );
            prop_assert_eq!(t.output_padding(), case.output_padding());
            Ok(t)
        }
        (None, Err(ConvError::PaddingRemovesOutput { .. })) => {
            Err(TestCaseError::reject("padding removes the output"))
        }
        (want, got) => panic!("{case:?}: expected {want:?}, built {got:?}"),
    }
}

/// Per output element (`[N, C_out, OH, OW]`) of the transposed convolution:
/// the value in f64 before the activation, `M = Σ |x·w| + |bias|`, and
/// whether any tap reached it. Written as a scatter (each input pixel
/// stamps its kernel), not the library's gather, from the case's own
/// numbers and the padding `pad` that removes `(top, left)` first.
struct Reference {
    value: Vec<f64>,
    magnitude: Vec<f64>,
    reached: bool,
}

fn reference(
    case: &Case,
    pad: Padding,
    out: (usize, usize),
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
) -> Reference {
    let (h, wd) = case.input;
    let (r_len, s_len) = case.kernel;
    let (cin, cout) = (case.in_channels(), case.out_channels());
    let (cin_g, cout_g) = (case.in_per_group, case.out_per_group);
    let len = case.batch * cout * out.0 * out.1;
    let (mut value, mut magnitude) = (vec![0.0f64; len], vec![0.0f64; len]);
    let mut reached = false;
    for n in 0..case.batch {
        for ci in 0..cin {
            let grp = ci / cin_g;
            for i in 0..h {
                for j in 0..wd {
                    let xv = f64::from(x[((n * cin + ci) * h + i) * wd + j]);
                    for c in 0..cout_g {
                        let co = grp * cout_g + c;
                        for u in 0..r_len {
                            let oh =
                                (i * case.stride.0 + u * case.dilation.0) as i64 - pad.top as i64;
                            if oh < 0 || oh >= out.0 as i64 {
                                continue;
                            }
                            for v in 0..s_len {
                                let ow = (j * case.stride.1 + v * case.dilation.1) as i64
                                    - pad.left as i64;
                                if ow < 0 || ow >= out.1 as i64 {
                                    continue;
                                }
                                let (r, s) = match case.mode {
                                    ConvMode::CrossCorrelation => (u, v),
                                    ConvMode::Convolution => (r_len - 1 - u, s_len - 1 - v),
                                };
                                let wv = f64::from(w[((ci * cout_g + c) * r_len + r) * s_len + s]);
                                let o =
                                    ((n * cout + co) * out.0 + oh as usize) * out.1 + ow as usize;
                                value[o] += xv * wv;
                                magnitude[o] += (xv * wv).abs();
                                reached = true;
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(b) = bias {
        let plane = out.0 * out.1;
        for (o, (v, m)) in value.iter_mut().zip(&mut magnitude).enumerate() {
            let bv = f64::from(b[(o / plane) % cout]);
            *v += bv;
            *m += bv.abs();
        }
    }
    Reference {
        value,
        magnitude,
        reached,
    }
}

/// `|got − want| ≤ conv_bound(T, M)` per element, `T = (C_in/g)·R·S`.
fn assert_close(
    what: &str,
    got: &[f32],
    want: &[f64],
    magnitude: &[f64],
    terms: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}", what);
    for (i, ((&g, &e), &m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let tol = conv_bound(terms, m);
        prop_assert!(
            (f64::from(g) - e).abs() <= tol,
            "{}: element {}: {} vs {}, tolerance {:e}",
            what,
            i,
            g,
            e,
            tol
        );
    }
    Ok(())
}

/// Random `(x, w, bias)` for a built case.
fn tensors(case: &Case, t: &ConvTranspose2d) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let mut rng = Rng::new(case.seed);
    let x = rng.vec(t.input_shape().iter().product());
    let w = rng.vec(t.weight_shape().iter().product());
    let b = case.bias.then(|| rng.vec(case.out_channels()));
    (x, w, b)
}

/// The body of [`every_algorithm_matches_direct`] for one case.
fn check_every_algorithm(case: &Case) -> Result<(), TestCaseError> {
    let t = build(case)?;
    let (x, w, b) = tensors(case, &t);
    let b = b.as_deref();
    let [_, _, oh, ow] = t.output_shape();
    let r = reference(case, t.padding(), (oh, ow), &x, &w, b);
    let act = case.activation;
    let terms = case.in_per_group * case.kernel.0 * case.kernel.1;
    let exact: Vec<f64> = r
        .value
        .iter()
        .map(|&v| f64::from(act.apply(v as f32)))
        .collect();
    let len = r.value.len();

    // Direct against the definition; the activation is applied to the
    // f64 value rounded once (within ε·M of it), which the bound's
    // factor 2 covers.
    let options = ForwardOptions::new(Algorithm::Direct).activation(act);
    let mut direct = vec![f32::NAN; len];
    t.forward_with(&x, &w, b, &mut direct, &options).unwrap();
    assert_close(
        &format!("Direct {case:?}"),
        &direct,
        &exact,
        &r.magnitude,
        terms,
    )?;
    let direct64 = to_f64(&direct);
    let plan = t.plan(&w, b, &options).unwrap();
    prop_assert_eq!(plan.algorithms(), vec![Some(Algorithm::Direct)]);
    let mut y = vec![f32::NAN; len];
    plan.forward(&x, &mut y).unwrap();
    prop_assert_eq!(&y, &direct, "Direct plan");

    if act == Activation::None {
        for algorithm in algorithms() {
            let y = t.forward_to_vec(&x, &w, b, algorithm).unwrap();
            assert_close(
                &format!("{algorithm:?} forward_to_vec {case:?}"),
                &y,
                &direct64,
                &r.magnitude,
                terms,
            )?;
            let mut y = vec![f32::NAN; len];
            t.forward(&x, &w, b, &mut y, algorithm).unwrap();
            assert_close(
                &format!("{algorithm:?} forward {case:?}"),
                &y,
                &direct64,
                &r.magnitude,
                terms,
            )?;
        }
    }

    for algorithm in [
        Algorithm::Implicit,
        Algorithm::DirectSimd,
        Algorithm::DirectDense,
        Algorithm::Im2col,
        Algorithm::Auto,
    ] {
        for (isa, backend, par) in engine_combos() {
            let what = format!("{case:?} {algorithm:?} {isa:?} {backend:?} {par:?}");
            let options = ForwardOptions::new(algorithm)
                .activation(act)
                .isa(isa)
                .backend(backend)
                .parallelism(par);
            let mut y = vec![f32::NAN; len];
            let (result, trace) = traced(|| t.forward_with(&x, &w, b, &mut y, &options));
            result.unwrap();
            assert_close(&what, &y, &direct64, &r.magnitude, terms)?;

            let plan = t.plan(&w, b, &options).unwrap();
            let mut from_plan = vec![f32::NAN; len];
            let (result, plan_trace) = traced(|| plan.forward(&x, &mut from_plan));
            result.unwrap();
            assert_close(
                &format!("plan {what}"),
                &from_plan,
                &direct64,
                &r.magnitude,
                terms,
            )?;

            let sequential = backend == GemmBackend::Native && par == Parallelism::Sequential;
            if sequential && r.reached {
                for (how, tr) in [("forward_with", &trace), ("plan", &plan_trace)] {
                    match algorithm {
                        Algorithm::Implicit | Algorithm::Im2col => prop_assert!(
                            tr.gemm_ran_on(isa),
                            "{} {}: no {:?} GEMM in {:?}",
                            how,
                            what,
                            isa,
                            tr
                        ),
                        Algorithm::DirectSimd | Algorithm::DirectDense => prop_assert!(
                            tr.direct_simd_ran_on(isa),
                            "{} {}: no {:?} SIMD direct in {:?}",
                            how,
                            what,
                            isa,
                            tr
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(256))]

    /// `Direct` against the f64 scatter reference; every other algorithm,
    /// through `forward_with` and through a plan, on every engine
    /// combination, against `Direct`; `forward`, `forward_to_vec` with the
    /// default options. On sequential native calls the trace shows the
    /// forced ISA's kernels ran (GEMM for `Implicit` and `Im2col`, the SIMD
    /// direct kernels for `DirectSimd`) whenever some tap reaches the output.
    #[test]
    fn every_algorithm_matches_direct(case in case_strategy()) {
        check_every_algorithm(&case)?;
    }

    /// The same on cases whose taps are disjoint (kernel = stride, no
    /// dilation, padding or output padding: the decoder's k2s2), which the
    /// GEMM path scatters instead of running col2im; rare in the general
    /// strategy.
    #[test]
    fn disjoint_taps_match_direct(case in case_strategy(), k in (1usize..=3, 1usize..=3)) {
        let case = Case {
            kernel: k,
            stride: k,
            dilation: (1, 1),
            raw_output_padding: (0, 0),
            pad: PadChoice::Explicit(Padding::ZERO),
            ..case
        };
        check_every_algorithm(&case)?;
    }

    /// The same on pointwise, stride-1 cases whose planes have fewer pixels
    /// than a group has output channels, which GEMM + col2im with raw
    /// weights (one image) runs as `yᵀ = xᵀ·W_g` and transposes, adding the
    /// bias and the activation on the way; rare in the general strategy.
    #[test]
    fn pointwise_on_planes_smaller_than_the_channels_match_direct(
        case in case_strategy(),
        out_per_group in 4usize..=12,
        input in (1usize..=3, 1usize..=2),
    ) {
        let case = Case {
            kernel: (1, 1),
            stride: (1, 1),
            dilation: (1, 1),
            raw_output_padding: (0, 0),
            pad: PadChoice::Explicit(Padding::ZERO),
            out_per_group,
            input,
            ..case
        };
        check_every_algorithm(&case)?;
    }

    /// `ConvTranspose2d::forward` (no bias, no activation) equals
    /// `backward_input` of the matching convolution (input = the transposed
    /// output, same stride, resolved padding, dilation, groups, mode; the
    /// weight tensor `[C_in, C_out/g, R, S]` is that convolution's `[K,
    /// C/g, R, S]`), algorithm by algorithm, and both match the reference.
    #[test]
    fn equals_backward_input_of_the_matching_convolution(case in case_strategy()) {
        let case = case.below_stride();
        let t = build(&case)?;
        let (x, w, _) = tensors(&case, &t);
        let conv = matching_conv(&t, &case);
        let [_, _, oh, ow] = t.output_shape();
        let r = reference(&case, t.padding(), (oh, ow), &x, &w, None);
        let terms = case.in_per_group * case.kernel.0 * case.kernel.1;
        let len = r.value.len();
        for algorithm in algorithms() {
            let what = format!("{case:?} {algorithm:?}");
            let mut y = vec![f32::NAN; len];
            t.forward(&x, &w, None, &mut y, algorithm).unwrap();
            let mut dx = vec![f32::NAN; len];
            conv.backward_input(&w, &x, &mut dx, &BackwardOptions::new(algorithm)).unwrap();
            assert_close(&format!("transposed {what}"), &y, &r.value, &r.magnitude, terms)?;
            assert_close(&format!("backward_input {what}"), &dx, &r.value, &r.magnitude, terms)?;
            assert_close(&format!("transposed vs backward_input {what}"), &y, &to_f64(&dx), &r.magnitude, terms)?;
        }
    }

    /// `⟨convT(x, w), y⟩ = ⟨x, conv(y, w)⟩` with the matching forward
    /// convolution, in f64 over the f32 results. Both sides share the
    /// magnitude `S = Σ_taps |x|·|w|·|y|`; the transposed convolution's
    /// error is at most `(T_t + 1)·ε·S` (`T_t = (C_in/g)·R·S`), the
    /// convolution's `(T_f + 1)·ε·S` (`T_f = (C_out/g)·R·S`), plus the f64
    /// sums.
    #[test]
    fn adjoint_identity(case in case_strategy()) {
        let case = case.below_stride();
        let t = build(&case)?;
        let (x, w, _) = tensors(&case, &t);
        let conv = matching_conv(&t, &case);
        let [_, _, oh, ow] = t.output_shape();
        let r = reference(&case, t.padding(), (oh, ow), &x, &w, None);
        let mut rng = Rng::new(case.seed ^ 0xAD70_1A7E);
        let y = rng.vec(r.value.len());
        let magnitude: f64 = y.iter().zip(&r.magnitude).map(|(&y, m)| f64::from(y).abs() * m).sum();
        let k = case.kernel.0 * case.kernel.1;
        let (t_t, t_f) = (case.in_per_group * k, case.out_per_group * k);
        let tol = adjoint_tolerance(t_t, t_f, magnitude, r.value.len() + x.len());
        for algorithm in [Algorithm::Direct, Algorithm::Auto] {
            let ty = t.forward_to_vec(&x, &w, None, algorithm).unwrap();
            let cy = conv.forward_to_vec(&y, &w, None, algorithm).unwrap();
            let lhs = dot(&ty, &y);
            let rhs = dot(&x, &cy);
            prop_assert!(
                (lhs - rhs).abs() <= tol,
                "{:?} {:?}: ⟨convT(x, w), y⟩ = {} vs ⟨x, conv(y, w)⟩ = {}, difference {:e} above {:e}",
                case, algorithm, lhs, rhs, (lhs - rhs).abs(), tol
            );
        }
    }
}

/// The convolution whose input gradient `t` is: input `[N, C_out, OH, OW]`
/// (the transposed output), `C_in` output channels, the same kernel,
/// stride, resolved padding, dilation, groups and mode. With output padding
/// below the stride its output is exactly `t`'s input.
fn matching_conv(t: &ConvTranspose2d, case: &Case) -> Conv2d {
    let [n, cout, oh, ow] = t.output_shape();
    let conv = Conv2dParams::new(n, cout, (oh, ow), case.in_channels(), case.kernel)
        .stride(case.stride.0, case.stride.1)
        .padding(t.padding())
        .dilation(case.dilation.0, case.dilation.1)
        .groups(case.groups)
        .mode(case.mode)
        .build()
        .unwrap_or_else(|e| panic!("{case:?}: the matching convolution: {e}"));
    assert_eq!(conv.output_shape(), t.input_shape(), "{case:?}");
    assert_eq!(conv.weight_shape(), t.weight_shape(), "{case:?}");
    conv
}

// --- errors ----------------------------------------------------------------------------------

/// A grouped, strided transposed convolution with output padding: input
/// `[2, 4, 3, 2]`, weight `[4, 3, 3, 2]`, output `[2, 6, 7, 6]`.
fn base() -> ConvTranspose2dParams {
    ConvTranspose2dParams::new(2, 4, (3, 2), 6, (3, 2))
        .groups(2)
        .stride(2, 3)
        .output_padding(1, 2)
        .padding(Padding::explicit(1, 0, 0, 1))
}

fn build_err(p: ConvTranspose2dParams) -> ConvError {
    match p.build() {
        Ok(t) => panic!("{p:?} built {t:?}"),
        Err(e) => e,
    }
}

#[test]
fn zero_sizes_are_refused() {
    type Set = fn(&mut ConvTranspose2dParams);
    let cases: [(Set, &str); 7] = [
        (|p| p.batch = 0, "batch"),
        (|p| p.in_channels = 0, "in_channels"),
        (|p| p.out_channels = 0, "out_channels"),
        (|p| p.input_size.0 = 0, "input height"),
        (|p| p.input_size.1 = 0, "input width"),
        (|p| p.kernel_size.0 = 0, "kernel_size"),
        (|p| p.kernel_size.1 = 0, "kernel_size"),
    ];
    for (set, name) in cases {
        let mut p = base();
        set(&mut p);
        let e = build_err(p);
        assert_eq!(e, ConvError::ZeroDimension { name }, "{p:?}");
        assert_mentions(&e.to_string(), &[name, "0"]);
    }
}

#[test]
fn zero_stride_is_refused() {
    for (h, w) in [(0, 2), (2, 0), (0, 0)] {
        let e = build_err(base().stride(h, w));
        assert_eq!(e, ConvError::ZeroStride { h, w });
        assert_mentions(&e.to_string(), &["stride", &format!("({h}, {w})")]);
    }
}

#[test]
fn zero_dilation_is_refused() {
    for (h, w) in [(0, 1), (1, 0)] {
        let e = build_err(base().dilation(h, w));
        assert_eq!(e, ConvError::ZeroDilation { h, w });
        assert_mentions(&e.to_string(), &["dilation", &format!("({h}, {w})")]);
    }
}

#[test]
fn zero_groups_are_refused() {
    let e = build_err(base().groups(0));
    assert_eq!(e, ConvError::ZeroGroups);
    assert_mentions(&e.to_string(), &["groups", "0"]);
}

/// Groups must divide C_in (4) and C_out (6).
#[test]
fn groups_must_divide_both_channel_counts() {
    for groups in [3, 4, 5] {
        let e = build_err(base().groups(groups));
        assert_eq!(
            e,
            ConvError::GroupsMismatch {
                groups,
                in_channels: 4,
                out_channels: 6
            }
        );
        assert_mentions(&e.to_string(), &[&format!("groups = {groups}"), "4", "6"]);
    }
}

/// Output padding must stay below `max(stride, dilation)` on each axis:
/// equal to it is refused, one below is accepted (also where the dilation
/// is the larger), whatever the padding rule.
#[test]
fn output_padding_too_large_is_refused() {
    let p = ConvTranspose2dParams::new(1, 2, (4, 4), 2, (3, 3))
        .stride(2, 1)
        .dilation(1, 3);
    // Height: stride 2, dilation 1; width: stride 1, dilation 3.
    p.output_padding(1, 2).build().expect("below the limits");
    for padding in [
        TransposePadding::Explicit(Padding::ZERO),
        TransposePadding::OnnxAuto(OnnxAutoPad::SameUpper),
        TransposePadding::OnnxOutputShape {
            size: (4, 4),
            extra_at_end: false,
        },
    ] {
        for (op, axis, value, stride, dilation) in
            [((2, 0), "height", 2, 2, 1), ((0, 3), "width", 3, 1, 3)]
        {
            let e = build_err(p.padding(padding).output_padding(op.0, op.1));
            assert_eq!(
                e,
                ConvError::OutputPaddingTooLarge {
                    axis,
                    output_padding: value,
                    stride,
                    dilation
                },
                "{padding:?}"
            );
            assert_mentions(
                &e.to_string(),
                &[
                    "output_padding",
                    axis,
                    &format!("{axis} {value}"),
                    &format!("stride {stride}"),
                    &format!("dilation {dilation}"),
                ],
            );
        }
    }
}

/// ONNX `output_shape` in `1..=full` (here `full` = 7, or 8 with output
/// padding 1): 0 and anything above `full` are refused, naming the axis,
/// the request and `full`. (Above `full` is what the library documents;
/// ONNX's own `test_convtranspose_output_shape` asks for it to extend the
/// output instead: see the ignored `onnx_convtranspose_output_shape`.)
#[test]
fn unreachable_output_shape_is_refused() {
    let p = ConvTranspose2dParams::new(1, 1, (3, 3), 1, (3, 3)).stride(2, 2);
    let shape = |h, w| TransposePadding::OnnxOutputShape {
        size: (h, w),
        extra_at_end: false,
    };
    for (size, axis) in [((0, 5), "height"), ((5, 0), "width")] {
        let e = build_err(p.padding(shape(size.0, size.1)));
        assert_eq!(
            e,
            ConvError::UnreachableOutputShape {
                axis,
                requested: 0,
                full: 7
            }
        );
        assert_mentions(&e.to_string(), &["output_shape", &format!("{axis} 0"), "7"]);
    }
    // Every other size is reached: by padding up to the full output (7),
    // by extending it at the end beyond.
    for size in [(1, 1), (7, 7), (1, 7), (8, 5), (7, 100)] {
        let t = p.padding(shape(size.0, size.1)).build().unwrap();
        assert_eq!(t.output_shape(), [1, 1, size.0, size.1]);
    }
}

/// Outputs beyond the full output (an ONNX `output_shape` above it) meet no
/// input: they hold `act(bias)` on every algorithm.
#[test]
fn output_shape_above_full_holds_the_bias() {
    let t = ConvTranspose2dParams::new(1, 2, (3, 3), 2, (3, 3))
        .stride(2, 2)
        .padding(TransposePadding::OnnxOutputShape {
            size: (9, 8),
            extra_at_end: true,
        })
        .build()
        .unwrap();
    assert_eq!(t.padding(), Padding::ZERO);
    let x = vec![1.0; 2 * 9];
    let w = vec![0.5; 2 * 2 * 9];
    let bias = [-0.25, 3.0];
    for algorithm in [
        Algorithm::Direct,
        Algorithm::Implicit,
        Algorithm::DirectSimd,
        Algorithm::Auto,
    ] {
        let options = ForwardOptions::new(algorithm).activation(Activation::Relu);
        let mut y = vec![f32::NAN; 2 * 9 * 8];
        t.forward_with(&x, &w, Some(&bias), &mut y, &options)
            .unwrap();
        for (c, &b) in bias.iter().enumerate() {
            let plane = &y[c * 72..][..72];
            for oh in 0..9 {
                for ow in 0..8 {
                    if oh >= 7 || ow >= 7 {
                        assert_eq!(
                            plane[oh * 8 + ow],
                            b.max(0.0),
                            "{algorithm:?} {c} {oh} {ow}"
                        );
                    }
                }
            }
            // (0, 0) meets one tap of each input channel: 2·0.5 + bias.
            assert_eq!(plane[0], (1.0 + b).max(0.0), "{algorithm:?}");
        }
    }
}

/// Explicit padding that removes all of an axis's `full` outputs (7 here):
/// exactly `full`, more, and a sum that overflows (reported as
/// `usize::MAX`).
#[test]
fn padding_that_removes_the_output_is_refused() {
    let p = ConvTranspose2dParams::new(1, 1, (3, 3), 1, (3, 3)).stride(2, 2);
    p.padding(Padding::explicit(3, 3, 6, 0))
        .build()
        .expect("one output left");
    for (pad, axis, padding) in [
        (Padding::explicit(3, 4, 0, 0), "height", 7),
        (Padding::explicit(0, 0, 5, 9), "width", 14),
        (Padding::explicit(usize::MAX, 1, 0, 0), "height", usize::MAX),
        (Padding::explicit(0, 0, 1, usize::MAX), "width", usize::MAX),
    ] {
        let e = build_err(p.padding(pad));
        assert_eq!(
            e,
            ConvError::PaddingRemovesOutput {
                axis,
                full: 7,
                padding
            }
        );
        assert_mentions(
            &e.to_string(),
            &[&format!("padding {padding}"), axis, "7 outputs"],
        );
    }
}

/// `Err(BufferLength)` naming `buffer` with the expected and given lengths.
fn expect_length_error(
    result: Result<(), ConvError>,
    buffer: &str,
    expected: usize,
    actual: usize,
) {
    match result {
        Err(e @ ConvError::BufferLength { .. }) => {
            assert_eq!(
                e,
                ConvError::BufferLength {
                    buffer: match buffer {
                        "input" => "input",
                        "weight" => "weight",
                        "bias" => "bias",
                        _ => "output",
                    },
                    expected,
                    actual
                }
            );
            assert_mentions(
                &e.to_string(),
                &[buffer, &expected.to_string(), &actual.to_string()],
            );
        }
        other => panic!("{buffer} of {actual}: expected BufferLength, got {other:?}"),
    }
}

/// Each buffer one element short and one too long, through every call that
/// takes it (`forward`, `forward_with`, `forward_to_vec`, `plan`,
/// `plan.forward`): a `BufferLength` naming it, and the output untouched.
#[test]
fn bad_buffer_lengths_are_named() {
    let t = base().build().unwrap();
    assert_eq!(t.output_shape(), [2, 6, 7, 6]);
    let (il, wl, bl, ol) = (2 * 4 * 3 * 2, 4 * 3 * 3 * 2, 6, 2 * 6 * 7 * 6);
    let mut rng = Rng::new(5);
    let (x, w, b) = (rng.vec(il), rng.vec(wl), rng.vec(bl));
    let options = ForwardOptions::default().activation(Activation::Relu);
    for algorithm in algorithms() {
        for delta in [-1isize, 1] {
            let resize = |v: &[f32]| -> Vec<f32> {
                let mut v = v.to_vec();
                v.resize((v.len() as isize + delta) as usize, 0.5);
                v
            };
            let (xb, wb, bb) = (resize(&x), resize(&w), resize(&b));
            let len = |n: usize| (n as isize + delta) as usize;
            let mut out = vec![7.0; ol];
            let mut out_bad = vec![7.0; len(ol)];
            let o = options.algorithm(algorithm);
            let fwd = |x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]| {
                t.forward(x, w, Some(b), y, algorithm)
            };
            expect_length_error(fwd(&xb, &w, &b, &mut out), "input", il, len(il));
            expect_length_error(fwd(&x, &wb, &b, &mut out), "weight", wl, len(wl));
            expect_length_error(fwd(&x, &w, &bb, &mut out), "bias", bl, len(bl));
            expect_length_error(fwd(&x, &w, &b, &mut out_bad), "output", ol, len(ol));
            let with = |x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]| {
                t.forward_with(x, w, Some(b), y, &o)
            };
            expect_length_error(with(&xb, &w, &b, &mut out), "input", il, len(il));
            expect_length_error(with(&x, &wb, &b, &mut out), "weight", wl, len(wl));
            expect_length_error(with(&x, &w, &bb, &mut out), "bias", bl, len(bl));
            expect_length_error(with(&x, &w, &b, &mut out_bad), "output", ol, len(ol));
            let to_vec = |x: &[f32], w: &[f32], b: &[f32]| {
                t.forward_to_vec(x, w, Some(b), algorithm).map(drop)
            };
            expect_length_error(to_vec(&xb, &w, &b), "input", il, len(il));
            expect_length_error(to_vec(&x, &wb, &b), "weight", wl, len(wl));
            expect_length_error(to_vec(&x, &w, &bb), "bias", bl, len(bl));
            let plan = |w: &[f32], b: &[f32]| t.plan(w, Some(b), &o).map(drop);
            expect_length_error(plan(&wb, &b), "weight", wl, len(wl));
            expect_length_error(plan(&w, &bb), "bias", bl, len(bl));
            let plan = t.plan(&w, Some(&b), &o).unwrap();
            expect_length_error(plan.forward(&xb, &mut out), "input", il, len(il));
            expect_length_error(plan.forward(&x, &mut out_bad), "output", ol, len(ol));
            assert!(
                out.iter().chain(&out_bad).all(|&v| v == 7.0),
                "{algorithm:?}: a refused call wrote its output"
            );
        }
    }
}

/// A NaN clamp bound is refused by `forward_with` and `plan` on every
/// algorithm, naming both bounds, with the output untouched.
#[test]
fn nan_clamp_bound_is_refused() {
    let t = base().build().unwrap();
    let mut rng = Rng::new(6);
    let x = rng.vec(t.input_shape().iter().product());
    let w = rng.vec(t.weight_shape().iter().product());
    let ol = t.output_shape().iter().product();
    for (min, max) in [(f32::NAN, 1.0), (-1.0, f32::NAN)] {
        let act = Activation::Clamp { min, max };
        for algorithm in algorithms() {
            let o = ForwardOptions::new(algorithm).activation(act);
            let mut out = vec![7.0; ol];
            for (how, result) in [
                ("forward_with", t.forward_with(&x, &w, None, &mut out, &o)),
                ("plan", t.plan(&w, None, &o).map(drop)),
            ] {
                let e = result.expect_err(how);
                assert!(
                    matches!(e, ConvError::InvalidActivation { min: a, max: b }
                        if a.to_bits() == min.to_bits() && b.to_bits() == max.to_bits()),
                    "{algorithm:?} {how}: {e:?}"
                );
                assert_mentions(
                    &e.to_string(),
                    &["Clamp", "NaN", &format!("{min}"), &format!("{max}")],
                );
            }
            assert!(out.iter().all(|&v| v == 7.0), "{algorithm:?}");
        }
    }
}

/// Sizes past `isize::MAX` or `usize` are errors, never panics or
/// wrapped arithmetic: a stride above `isize::MAX`; a full output that
/// overflows `usize`; one above `isize::MAX`; an output buffer whose length
/// overflows; a FLOP count that overflows `u64`.
#[test]
fn huge_sizes_are_errors_not_panics() {
    let big = isize::MAX as usize;
    let one = |input, kernel| ConvTranspose2dParams::new(1, 1, input, 1, kernel);
    let cases = [
        (
            one((3, 1), (2, 1)).stride(usize::MAX, 1),
            ConvError::TooLarge {
                what: "vertical stride",
                value: usize::MAX,
            },
        ),
        (
            // (2^63 − 1)·2 + 1·1 + 1 overflows.
            one((3, 1), (2, 1)).stride(big, 1),
            ConvError::Overflow {
                what: "transposed convolution output size",
            },
        ),
        (
            // 2^62·2 + 1 = 2^63 + 1 outputs.
            one((1, 3), (1, 1)).stride(1, 1 << 62),
            ConvError::TooLarge {
                what: "output width",
                value: (1 << 63) + 1,
            },
        ),
        (
            // (2^32 + 1)² output elements.
            one((3, 3), (1, 1)).stride(1 << 31, 1 << 31),
            ConvError::Overflow {
                what: "transposed convolution buffer length",
            },
        ),
        (
            // 2·2^32·2^32 FLOPs; every buffer fits.
            one((1 << 16, 1 << 16), (1 << 16, 1 << 16)),
            ConvError::Overflow {
                what: "transposed convolution FLOP count",
            },
        ),
    ];
    for (p, want) in cases {
        let e = build_err(p);
        assert_eq!(e, want, "{p:?}");
        match &want {
            ConvError::TooLarge { what, value } => {
                assert_mentions(&e.to_string(), &[what, &value.to_string(), "isize::MAX"])
            }
            ConvError::Overflow { what } => assert_mentions(&e.to_string(), &[what, "overflow"]),
            _ => unreachable!(),
        }
    }
}

/// Two layers larger than the random cases (deep enough GEMMs to cross
/// register tiles and split across threads: a 2× upsampling 4×4 kernel and
/// a grouped, dilated one with output padding and ONNX `SAME_LOWER`),
/// every algorithm on every engine combination and through plans, against
/// the f64 reference.
#[test]
fn larger_layers_match_the_reference() {
    let layer = |in_per_group, out_per_group, groups, input, kernel, stride, dilation, pad| Case {
        batch: 2,
        in_per_group,
        out_per_group,
        groups,
        input,
        kernel,
        stride,
        dilation,
        raw_output_padding: (1, 1),
        below_stride: false,
        pad,
        mode: ConvMode::CrossCorrelation,
        bias: true,
        activation: Activation::Relu,
        seed: 0x1A46_E000 + in_per_group as u64,
    };
    for case in [
        layer(
            40,
            24,
            1,
            (9, 11),
            (4, 4),
            (2, 2),
            (1, 1),
            PadChoice::Explicit(Padding::symmetric(1, 1)),
        ),
        layer(
            12,
            8,
            3,
            (7, 6),
            (3, 2),
            (2, 3),
            (3, 2),
            PadChoice::Auto(OnnxAutoPad::SameLower),
        ),
    ] {
        let t = build(&case).unwrap_or_else(|e| panic!("{case:?}: {e}"));
        let (x, w, b) = tensors(&case, &t);
        let b = b.as_deref();
        let [_, _, oh, ow] = t.output_shape();
        let r = reference(&case, t.padding(), (oh, ow), &x, &w, b);
        let exact: Vec<f64> = r
            .value
            .iter()
            .map(|&v| f64::from(case.activation.apply(v as f32)))
            .collect();
        let terms = case.in_per_group * case.kernel.0 * case.kernel.1;
        for algorithm in algorithms() {
            for (isa, backend, par) in engine_combos() {
                let what = format!("{case:?} {algorithm:?} {isa:?} {backend:?} {par:?}");
                let o = ForwardOptions::new(algorithm)
                    .activation(case.activation)
                    .isa(isa)
                    .backend(backend)
                    .parallelism(par);
                let mut y = vec![f32::NAN; exact.len()];
                t.forward_with(&x, &w, b, &mut y, &o).unwrap();
                assert_close(&what, &y, &exact, &r.magnitude, terms).unwrap();
                let mut y = vec![f32::NAN; exact.len()];
                t.plan(&w, b, &o).unwrap().forward(&x, &mut y).unwrap();
                assert_close(&format!("plan {what}"), &y, &exact, &r.magnitude, terms).unwrap();
            }
        }
    }
}

/// The thread count changes who computes what, never the arithmetic: the
/// GEMMs split their output, col2im and the phases' store split output
/// channels (GEMM + col2im splits a group's channels whole where there are
/// enough), and column phases run whole on one thread. So one, two and
/// three threads give the same bits, through plans and one-shot calls, on
/// the phases (stride 2 with unequal and equal phases) and on GEMM +
/// col2im. (The one exception is not among these layers: a group with too
/// few output channels to split, on planes of at least a row per thread,
/// splits the column matrix's chunks by input rows, and where two threads'
/// rows meet the sums change order; the crate's
/// `chunks_split_by_rows_or_channels_match_the_definition` tests it.)
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let layers = [
        // (N, C_in, H, C_out, k, s, p, op)
        (1, 24, 9, 20, 3, 2, 1, 1),
        (1, 32, 8, 16, 4, 2, 1, 0),
        (2, 40, 5, 8, 3, 1, 1, 0),
        // Enough output channels for the threads to split them (GEMM +
        // col2im), packed panels cut every 8 channels (3×3, MR 8).
        (2, 12, 6, 56, 3, 1, 1, 0),
    ];
    for (n, cin, h, cout, k, s, p, op) in layers {
        let t = ConvTranspose2dParams::new(n, cin, (h, h), cout, (k, k))
            .stride(s, s)
            .padding(Padding::symmetric(p, p))
            .output_padding(op, op)
            .build()
            .unwrap();
        let mut rng = Rng::new(5);
        let x = rng.vec(t.input_shape().iter().product());
        let w = rng.vec(t.weight_shape().iter().product());
        let b = rng.vec(cout);
        let len: usize = t.output_shape().iter().product();
        for algorithm in [Algorithm::Implicit, Algorithm::Im2col, Algorithm::Auto] {
            let run = |threads: usize, planned: bool| {
                let options = ForwardOptions::new(algorithm)
                    .parallelism(Parallelism::threads(threads))
                    .activation(Activation::Relu);
                let mut y = vec![0.0; len];
                if planned {
                    let plan = t.plan(&w, Some(&b), &options).unwrap();
                    plan.forward(&x, &mut y).unwrap();
                } else {
                    t.forward_with(&x, &w, Some(&b), &mut y, &options).unwrap();
                }
                bits(&y)
            };
            for planned in [false, true] {
                let one = run(1, planned);
                for threads in [2, 3] {
                    assert_eq!(
                        one,
                        run(threads, planned),
                        "{:?} {algorithm:?} planned {planned}, {threads} threads",
                        (n, cin, h, cout, k, s, p, op)
                    );
                }
            }
        }
    }
}

/// GEMM + col2im on layers whose column matrix spans several chunks of
/// input rows (1024 or 2304 rows of 40- or 14-pixel input rows: a chunk of
/// L2 holds a few), with padding so that the chunks' windows
/// overlap in the output: equal to `Direct` on every ISA, engine and
/// threading mode, one-shot (a batch of two packs the weights once) and
/// through a plan. The second
/// layer's chunks would be narrow enough for another micro-kernel than the
/// weights were packed for (the column kernel): no chunking there.
#[test]
fn im2col_over_chunks_of_input_rows_matches_direct() {
    for (batch, c_in, (h, w), c_out, k, stride) in
        [(1, 3, (9, 40), 64, 4, 2), (2, 4, (14, 14), 256, 3, 1)]
    {
        let t = ConvTranspose2dParams::new(batch, c_in, (h, w), c_out, (k, k))
            .stride(stride, stride)
            .padding(Padding::symmetric(1, 1))
            .build()
            .unwrap();
        let x: Vec<f32> = (0..batch * c_in * h * w)
            .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let wt: Vec<f32> = (0..c_in * c_out * k * k)
            .map(|i| ((i * 11) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..c_out).map(|i| i as f32 * 0.01).collect();
        let want = t
            .forward_to_vec(&x, &wt, Some(&b), Algorithm::Direct)
            .unwrap();
        for (isa, backend, par) in engine_combos() {
            let options = ForwardOptions::new(Algorithm::Im2col)
                .isa(isa)
                .backend(backend)
                .parallelism(par);
            let mut got = vec![f32::NAN; want.len()];
            t.forward_with(&x, &wt, Some(&b), &mut got, &options)
                .unwrap();
            let mut planned = vec![f32::NAN; want.len()];
            t.plan(&wt, Some(&b), &options)
                .unwrap()
                .forward(&x, &mut planned)
                .unwrap();
            for (i, &e) in want.iter().enumerate() {
                // At most 4 input channels × 9 taps of |x·w| ≤ 1/4 each.
                assert!(
                    (got[i] - e).abs() <= 1e-5,
                    "{par:?} [{i}]: {} vs {e}",
                    got[i]
                );
                assert!(
                    (planned[i] - e).abs() <= 1e-5,
                    "plan {par:?} [{i}]: {} vs {e}",
                    planned[i]
                );
            }
        }
    }
}
