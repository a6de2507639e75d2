//! Padding rules against hand-computed values. Each case shows the arithmetic;
//! both the resolved `Conv2d::padding()` and `output_shape()` are checked, and
//! a few cases also run a forward pass to check where the zeros really go.

use cpuconv::{Algorithm, Conv2dParams, ConvError, OnnxAutoPad, Padding, PaddingSpec};

/// Builds a 1-image, 1-channel convolution and checks its padding and output.
fn check(
    input: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    spec: impl Into<PaddingSpec>,
    padding: Padding,
    out: (usize, usize),
) {
    let spec = spec.into();
    let p = Conv2dParams::new(1, 1, input, 1, kernel)
        .stride(stride.0, stride.1)
        .dilation(dilation.0, dilation.1)
        .padding(spec);
    let conv = p.build().unwrap_or_else(|e| panic!("{p:?}: {e}"));
    assert_eq!(conv.padding(), padding, "{p:?}");
    assert_eq!(conv.output_shape(), [1, 1, out.0, out.1], "{p:?}");
    assert_eq!(conv.geometry().padding, padding);
    // `resolve` on its own agrees with the built descriptor.
    assert_eq!(spec.resolve(input, kernel, stride, dilation), Ok(padding));
}

fn pad(top: usize, bottom: usize, left: usize, right: usize) -> Padding {
    Padding {
        top,
        bottom,
        left,
        right,
    }
}

// --- constructors -------------------------------------------------------------------

#[test]
fn padding_constructors() {
    assert_eq!(Padding::ZERO, pad(0, 0, 0, 0));
    assert_eq!(Padding::default(), Padding::ZERO);
    assert_eq!(Padding::symmetric(1, 2), pad(1, 1, 2, 2));
    assert_eq!(Padding::explicit(1, 2, 3, 4), pad(1, 2, 3, 4));
    // ONNX order: [x1_begin (top), x2_begin (left), x1_end (bottom), x2_end (right)].
    assert_eq!(Padding::onnx_pads([1, 2, 3, 4]), pad(1, 3, 2, 4));
    assert_eq!(PaddingSpec::default(), PaddingSpec::Explicit(Padding::ZERO));
    assert_eq!(
        PaddingSpec::from(Padding::symmetric(1, 1)),
        PaddingSpec::Explicit(pad(1, 1, 1, 1))
    );
    assert_eq!(
        PaddingSpec::from(OnnxAutoPad::SameLower),
        PaddingSpec::OnnxAuto(OnnxAutoPad::SameLower)
    );
}

// --- PyTorch ------------------------------------------------------------------------------

#[test]
fn torch_symmetric_padding() {
    // padding=(1, 2) on a 5×7 input, 3×5 kernel:
    //   OH = (5 + 1 + 1 − 3) / 1 + 1 = 5,  OW = (7 + 2 + 2 − 5) / 1 + 1 = 7.
    check(
        (5, 7),
        (3, 5),
        (1, 1),
        (1, 1),
        Padding::symmetric(1, 2),
        pad(1, 1, 2, 2),
        (5, 7),
    );
    // padding=(3, 3), 7×7 kernel, stride 2 on 224×224 (ResNet stem):
    //   OH = ⌊(224 + 6 − 7) / 2⌋ + 1 = ⌊223 / 2⌋ + 1 = 112.
    check(
        (224, 224),
        (7, 7),
        (2, 2),
        (1, 1),
        Padding::symmetric(3, 3),
        pad(3, 3, 3, 3),
        (112, 112),
    );
    // padding=(0, 1), 3×3, stride (2, 3), dilation (1, 2) on 9×10:
    //   effective kernel (3, 2·2+1 = 5);
    //   OH = ⌊(9 − 3) / 2⌋ + 1 = 4,  OW = ⌊(10 + 2 − 5) / 3⌋ + 1 = ⌊7/3⌋ + 1 = 3.
    check(
        (9, 10),
        (3, 3),
        (2, 3),
        (1, 2),
        Padding::symmetric(0, 1),
        pad(0, 0, 1, 1),
        (4, 3),
    );
}

#[test]
fn torch_valid() {
    // No padding: OH = 5 − 3 + 1 = 3, OW = 7 − 5 + 1 = 3.
    check(
        (5, 7),
        (3, 5),
        (1, 1),
        (1, 1),
        PaddingSpec::TorchValid,
        Padding::ZERO,
        (3, 3),
    );
    // Stride 2: OH = ⌊(5 − 3) / 2⌋ + 1 = 2, OW = ⌊(7 − 5) / 2⌋ + 1 = 2.
    check(
        (5, 7),
        (3, 5),
        (2, 2),
        (1, 1),
        PaddingSpec::TorchValid,
        Padding::ZERO,
        (2, 2),
    );
}

#[test]
fn torch_same_odd_kernel() {
    // Kernel 3: total = d·(k − 1) = 2 -> top 1, bottom 1; OH = 6 + 2 − 3 + 1 = 6.
    check(
        (6, 9),
        (3, 3),
        (1, 1),
        (1, 1),
        PaddingSpec::TorchSame,
        pad(1, 1, 1, 1),
        (6, 9),
    );
    // Kernel 5×1: totals 4 and 0.
    check(
        (6, 9),
        (5, 1),
        (1, 1),
        (1, 1),
        PaddingSpec::TorchSame,
        pad(2, 2, 0, 0),
        (6, 9),
    );
}

#[test]
fn torch_same_even_kernel() {
    // Kernel 4: total = 3 -> top ⌊3/2⌋ = 1, bottom 3 − 1 = 2 (extra at the end);
    // OH = 6 + 3 − 4 + 1 = 6.
    check(
        (6, 9),
        (4, 4),
        (1, 1),
        (1, 1),
        PaddingSpec::TorchSame,
        pad(1, 2, 1, 2),
        (6, 9),
    );
    // Kernel 2: total 1 -> (0, 1).
    check(
        (5, 5),
        (2, 2),
        (1, 1),
        (1, 1),
        PaddingSpec::TorchSame,
        pad(0, 1, 0, 1),
        (5, 5),
    );
}

#[test]
fn torch_same_dilated() {
    // Kernel 3, dilation 2: total = 2·(3 − 1) = 4 -> (2, 2); effective kernel 5,
    // OH = 6 + 4 − 5 + 1 = 6.
    check(
        (6, 9),
        (3, 3),
        (1, 1),
        (2, 2),
        PaddingSpec::TorchSame,
        pad(2, 2, 2, 2),
        (6, 9),
    );
    // Mixed: kernel (4, 3), dilation (1, 3): totals 3 and 3·2 = 6 -> (1, 2), (3, 3).
    check(
        (6, 9),
        (4, 3),
        (1, 1),
        (1, 3),
        PaddingSpec::TorchSame,
        pad(1, 2, 3, 3),
        (6, 9),
    );
    // Dilation 3 with kernel 2: total 3 -> (1, 2).
    check(
        (7, 7),
        (2, 2),
        (1, 1),
        (3, 3),
        PaddingSpec::TorchSame,
        pad(1, 2, 1, 2),
        (7, 7),
    );
}

#[test]
fn torch_same_output_equals_input_everywhere() {
    for h in 1..=9 {
        for k in 1..=6 {
            for d in 1..=3 {
                let conv = Conv2dParams::new(1, 1, (h, h + 1), 1, (k, k))
                    .dilation(d, d)
                    .padding(PaddingSpec::TorchSame)
                    .build()
                    .unwrap();
                assert_eq!(conv.output_shape(), [1, 1, h, h + 1], "h {h} k {k} d {d}");
                let p = conv.padding();
                let total = d * (k - 1);
                assert_eq!((p.top, p.bottom), (total / 2, total - total / 2));
                assert_eq!((p.left, p.right), (total / 2, total - total / 2));
            }
        }
    }
}

#[test]
fn torch_same_rejects_stride() {
    for (sh, sw) in [(2, 1), (1, 2), (2, 2), (3, 5)] {
        let e = Conv2dParams::new(1, 1, (8, 8), 1, (3, 3))
            .stride(sh, sw)
            .padding(PaddingSpec::TorchSame)
            .build()
            .unwrap_err();
        assert_eq!(e, ConvError::SameWithStride { h: sh, w: sw });
        assert!(e.to_string().contains(&format!("({sh}, {sw})")), "{e}");
        assert_eq!(
            PaddingSpec::TorchSame.resolve((8, 8), (3, 3), (sh, sw), (1, 1)),
            Err(ConvError::SameWithStride { h: sh, w: sw })
        );
    }
}

// --- ONNX ---------------------------------------------------------------------------------------

/// ONNX SAME_*: out = ⌈in/s⌉, total = max(0, (out − 1)·s + d·(k − 1) + 1 − in);
/// UPPER puts ⌈total/2⌉ at the end, LOWER at the beginning.
fn check_onnx_axis(
    input: usize,
    k: usize,
    s: usize,
    d: usize,
    upper: (usize, usize),
    lower: (usize, usize),
) {
    let out = input.div_ceil(s);
    // Same rule along the height (width 1×1 trivially) and along the width.
    check(
        (input, 3),
        (k, 1),
        (s, 1),
        (d, 1),
        OnnxAutoPad::SameUpper,
        pad(upper.0, upper.1, 0, 0),
        (out, 3),
    );
    check(
        (input, 3),
        (k, 1),
        (s, 1),
        (d, 1),
        OnnxAutoPad::SameLower,
        pad(lower.0, lower.1, 0, 0),
        (out, 3),
    );
    check(
        (3, input),
        (1, k),
        (1, s),
        (1, d),
        OnnxAutoPad::SameUpper,
        pad(0, 0, upper.0, upper.1),
        (3, out),
    );
    check(
        (3, input),
        (1, k),
        (1, s),
        (1, d),
        OnnxAutoPad::SameLower,
        pad(0, 0, lower.0, lower.1),
        (3, out),
    );
}

#[test]
fn onnx_same_stride_one() {
    // H=5, k=3, s=1: out 5, total = 4·1 + 3 − 5 = 2 -> (1, 1) both ways.
    check_onnx_axis(5, 3, 1, 1, (1, 1), (1, 1));
    // H=7, k=4, s=1: out 7, total = 6 + 4 − 7 = 3 -> UPPER (1, 2), LOWER (2, 1).
    check_onnx_axis(7, 4, 1, 1, (1, 2), (2, 1));
    // H=4, k=1, s=1: total = 3 + 1 − 4 = 0.
    check_onnx_axis(4, 1, 1, 1, (0, 0), (0, 0));
    // H=6, k=3, d=2, s=1: effective 5, total = 5 + 5 − 6 = 4 -> (2, 2).
    check_onnx_axis(6, 3, 1, 2, (2, 2), (2, 2));
    // H=2, k=6, s=1: total = 1 + 6 − 2 = 5 -> UPPER (2, 3), LOWER (3, 2).
    check_onnx_axis(2, 6, 1, 1, (2, 3), (3, 2));
}

#[test]
fn onnx_same_stride_two() {
    // H=5, k=3, s=2: out ⌈5/2⌉ = 3, total = max(0, (3−1)·2 + 3 − 5) = 2 -> (1, 1).
    check_onnx_axis(5, 3, 2, 1, (1, 1), (1, 1));
    // H=6, k=3, s=2: out 3, total = max(0, 2·2 + 3 − 6) = 1 -> UPPER (0, 1), LOWER (1, 0).
    check_onnx_axis(6, 3, 2, 1, (0, 1), (1, 0));
    // H=7, k=4, s=2: out 4, total = 3·2 + 4 − 7 = 3 -> UPPER (1, 2), LOWER (2, 1).
    check_onnx_axis(7, 4, 2, 1, (1, 2), (2, 1));
    // H=8, k=2, s=2: out 4, total = 3·2 + 2 − 8 = 0.
    check_onnx_axis(8, 2, 2, 1, (0, 0), (0, 0));
    // H=8, k=4, s=2: out 4, total = 6 + 4 − 8 = 2 -> (1, 1).
    check_onnx_axis(8, 4, 2, 1, (1, 1), (1, 1));
    // H=9, k=3, d=2, s=2: effective 5, out 5, total = 4·2 + 5 − 9 = 4 -> (2, 2).
    check_onnx_axis(9, 3, 2, 2, (2, 2), (2, 2));
}

#[test]
fn onnx_same_larger_strides() {
    // H=5, k=1, s=3: out 2, total = max(0, 3 + 1 − 5) = max(0, −1) = 0.
    check_onnx_axis(5, 1, 3, 1, (0, 0), (0, 0));
    // H=10, k=3, d=2, s=3: effective 5, out 4, total = 3·3 + 5 − 10 = 4 -> (2, 2).
    check_onnx_axis(10, 3, 3, 2, (2, 2), (2, 2));
    // H=10, k=4, s=3: out 4, total = 9 + 4 − 10 = 3 -> UPPER (1, 2), LOWER (2, 1).
    check_onnx_axis(10, 4, 3, 1, (1, 2), (2, 1));
    // H=1, k=5, s=4: out 1, total = 0 + 5 − 1 = 4 -> (2, 2).
    check_onnx_axis(1, 5, 4, 1, (2, 2), (2, 2));
}

#[test]
fn onnx_same_both_axes_at_once() {
    // Input 6×7, kernel 3×4, stride (2, 1):
    //   height: out 3, total = 2·2 + 3 − 6 = 1 -> UPPER (0, 1), LOWER (1, 0)
    //   width:  out 7, total = 6 + 4 − 7 = 3 -> UPPER (1, 2), LOWER (2, 1)
    check(
        (6, 7),
        (3, 4),
        (2, 1),
        (1, 1),
        OnnxAutoPad::SameUpper,
        pad(0, 1, 1, 2),
        (3, 7),
    );
    check(
        (6, 7),
        (3, 4),
        (2, 1),
        (1, 1),
        OnnxAutoPad::SameLower,
        pad(1, 0, 2, 1),
        (3, 7),
    );
}

#[test]
fn onnx_same_output_is_ceil_of_input_over_stride() {
    for h in 1..=12 {
        for k in 1..=5 {
            for s in 1..=4 {
                for d in 1..=2 {
                    for mode in [OnnxAutoPad::SameUpper, OnnxAutoPad::SameLower] {
                        let conv = Conv2dParams::new(1, 1, (h, h), 1, (k, k))
                            .stride(s, s)
                            .dilation(d, d)
                            .padding(mode)
                            .build()
                            .unwrap_or_else(|e| panic!("h {h} k {k} s {s} d {d}: {e}"));
                        let out = h.div_ceil(s);
                        assert_eq!(
                            conv.output_shape(),
                            [1, 1, out, out],
                            "h {h} k {k} s {s} d {d}"
                        );
                        let p = conv.padding();
                        let total = ((out - 1) * s + d * (k - 1) + 1).saturating_sub(h);
                        assert_eq!(p.top + p.bottom, total);
                        let (small, large) = (total / 2, total - total / 2);
                        let expect = if mode == OnnxAutoPad::SameUpper {
                            (small, large)
                        } else {
                            (large, small)
                        };
                        assert_eq!((p.top, p.bottom), expect);
                        assert_eq!((p.left, p.right), expect);
                    }
                }
            }
        }
    }
}

#[test]
fn onnx_valid() {
    // VALID is no padding: OH = ⌊(5 − 3) / 2⌋ + 1 = 2, OW = ⌊(7 − 3) / 2⌋ + 1 = 3.
    check(
        (5, 7),
        (3, 3),
        (2, 2),
        (1, 1),
        OnnxAutoPad::Valid,
        Padding::ZERO,
        (2, 3),
    );
    check(
        (5, 7),
        (3, 3),
        (1, 1),
        (1, 1),
        PaddingSpec::OnnxAuto(OnnxAutoPad::Valid),
        Padding::ZERO,
        (3, 5),
    );
}

#[test]
fn onnx_explicit_pads_order() {
    // pads = [top 1, left 2, bottom 3, right 4] on 5×5 with a 3×3 kernel:
    //   OH = 5 + 1 + 3 − 3 + 1 = 7,  OW = 5 + 2 + 4 − 3 + 1 = 9.
    check(
        (5, 5),
        (3, 3),
        (1, 1),
        (1, 1),
        Padding::onnx_pads([1, 2, 3, 4]),
        pad(1, 3, 2, 4),
        (7, 9),
    );
    // Stride 2: OH = ⌊(9 − 3) / 2⌋ + 1 = 4, OW = ⌊(11 − 3) / 2⌋ + 1 = 5.
    check(
        (5, 5),
        (3, 3),
        (2, 2),
        (1, 1),
        Padding::onnx_pads([1, 2, 3, 4]),
        pad(1, 3, 2, 4),
        (4, 5),
    );
}

// --- where the zeros go (forward passes) ---------------------------------------------------------

const X: [f32; 9] = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];

fn run_all(p: Conv2dParams, input: &[f32], weight: &[f32], expected: &[f32]) {
    let conv = p.build().unwrap();
    let mut algorithms = Algorithm::CONCRETE.to_vec();
    algorithms.push(Algorithm::Auto);
    for a in algorithms {
        let out = conv.forward_to_vec(input, weight, None, a).unwrap();
        assert_eq!(out, expected, "{p:?} {a:?}");
    }
}

#[test]
fn onnx_pads_place_zeros_on_the_right_sides() {
    // A 1×1 kernel of 1 copies the padded input: pads [top 1, left 0,
    // bottom 0, right 2] on [[1, 2], [3, 4]] give a 3×4 output
    //   0 0 0 0
    //   1 2 0 0
    //   3 4 0 0
    #[rustfmt::skip]
    let expected = [
        0.0, 0.0, 0.0, 0.0,
        1.0, 2.0, 0.0, 0.0,
        3.0, 4.0, 0.0, 0.0,
    ];
    run_all(
        Conv2dParams::new(1, 1, (2, 2), 1, (1, 1)).padding(Padding::onnx_pads([1, 0, 0, 2])),
        &[1.0, 2.0, 3.0, 4.0],
        &[1.0],
        &expected,
    );
}

#[test]
fn same_upper_and_lower_shift_the_image() {
    // Kernel 2×2 = [[1, 0], [0, 0]] reads the top-left pixel of each window.
    // 3×3 input, k=2, s=1: total = 2 + 2 − 3 = 1.
    // SAME_UPPER pads (0, 1): out[y][x] = X[y][x] -> the input itself.
    let w = [1.0, 0.0, 0.0, 0.0];
    run_all(
        Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).padding(OnnxAutoPad::SameUpper),
        &X,
        &w,
        &X,
    );
    // SAME_LOWER pads (1, 0): out[y][x] = X[y−1][x−1], zero on row/col 0:
    //   0 0 0
    //   0 1 0
    //   0 2 1
    #[rustfmt::skip]
    let lower = [
        0.0, 0.0, 0.0,
        0.0, 1.0, 0.0,
        0.0, 2.0, 1.0,
    ];
    run_all(
        Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).padding(OnnxAutoPad::SameLower),
        &X,
        &w,
        &lower,
    );
    // PyTorch "same" with an even kernel puts the extra at the end, like
    // SAME_UPPER.
    run_all(
        Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).padding(PaddingSpec::TorchSame),
        &X,
        &w,
        &X,
    );
}

#[test]
fn same_upper_stride_two_values() {
    // 4×4 input 1..=16, k=3, s=2, SAME_UPPER: out 2, total = 2 + 3 − 4 = 1 ->
    // (0, 1) on both axes. Kernel of ones sums each window of P
    // (P = input with one zero row below and one zero column right):
    //   (0,0): rows 0–2, cols 0–2: 1+2+3 + 5+6+7 + 9+10+11 = 54
    //   (0,1): rows 0–2, cols 2–3 (+pad): 3+4 + 7+8 + 11+12 = 45
    //   (1,0): rows 2–3 (+pad), cols 0–2: 9+10+11 + 13+14+15 = 72
    //   (1,1): rows 2–3, cols 2–3: 11+12 + 15+16 = 54
    let input: Vec<f32> = (1..=16).map(|v| v as f32).collect();
    run_all(
        Conv2dParams::new(1, 1, (4, 4), 1, (3, 3))
            .stride(2, 2)
            .padding(OnnxAutoPad::SameUpper),
        &input,
        &[1.0; 9],
        &[54.0, 45.0, 72.0, 54.0],
    );
    // SAME_LOWER pads (1, 0): windows start at −1 and 1:
    //   (0,0): rows 0–1, cols 0–1: 1+2 + 5+6 = 14
    //   (0,1): rows 0–1, cols 1–3: 2+3+4 + 6+7+8 = 30
    //   (1,0): rows 1–3, cols 0–1: 5+6 + 9+10 + 13+14 = 57
    //   (1,1): rows 1–3, cols 1–3: 6+7+8 + 10+11+12 + 14+15+16 = 99
    run_all(
        Conv2dParams::new(1, 1, (4, 4), 1, (3, 3))
            .stride(2, 2)
            .padding(OnnxAutoPad::SameLower),
        &input,
        &[1.0; 9],
        &[14.0, 30.0, 57.0, 99.0],
    );
}
