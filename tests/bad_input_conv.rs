//! Every way a convolution descriptor, a padding rule, a `forward` call or a
//! plan can be refused: each test asserts the error variant with its
//! payload, and that the `Display` message names the offending value(s).
//! Nothing may panic, and sizes too large for memory are errors, not
//! aborts.
//! (`sgemm`'s refusals are in `bad_input_gemm.rs`.)

mod common;

use common::{algorithms, assert_mentions, in_child_process, try_workspace, workspace};
use cpuconv::{
    Algorithm, Conv2d, Conv2dParams, ConvError, ForwardOptions, OnnxAutoPad, Padding, PaddingSpec,
    Parallelism,
};

/// A valid baseline: N=2, C=4, 8×8 input, K=6, 3×3 kernel (output 2×6×6×6).
fn base() -> Conv2dParams {
    Conv2dParams::new(2, 4, (8, 8), 6, (3, 3))
}

/// Builds `p`, expecting an error; returns it with its message.
fn build_err(p: Conv2dParams) -> (ConvError, String) {
    match p.build() {
        Ok(c) => panic!("{p:?} should be rejected, built {:?}", c.geometry()),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

// --- zero dimensions, one per parameter ---------------------------------------

fn check_zero_dimension(p: Conv2dParams, name: &str) {
    let (e, msg) = build_err(p);
    assert!(
        matches!(e, ConvError::ZeroDimension { name: n } if n == name),
        "{e:?}"
    );
    assert_mentions(&msg, &[name, "0"]);
}

#[test]
fn zero_batch() {
    check_zero_dimension(Conv2dParams { batch: 0, ..base() }, "batch");
}

#[test]
fn zero_in_channels() {
    check_zero_dimension(
        Conv2dParams {
            in_channels: 0,
            ..base()
        },
        "in_channels",
    );
}

#[test]
fn zero_input_height() {
    check_zero_dimension(
        Conv2dParams {
            input_size: (0, 8),
            ..base()
        },
        "input height",
    );
}

#[test]
fn zero_input_width() {
    check_zero_dimension(
        Conv2dParams {
            input_size: (8, 0),
            ..base()
        },
        "input width",
    );
}

#[test]
fn zero_out_channels() {
    check_zero_dimension(
        Conv2dParams {
            out_channels: 0,
            ..base()
        },
        "out_channels",
    );
}

#[test]
fn zero_kernel_height() {
    check_zero_dimension(
        Conv2dParams {
            kernel_size: (0, 3),
            ..base()
        },
        "kernel height",
    );
}

#[test]
fn zero_kernel_width() {
    check_zero_dimension(
        Conv2dParams {
            kernel_size: (3, 0),
            ..base()
        },
        "kernel width",
    );
}

#[test]
fn zero_dimensions_with_same_padding_do_not_panic() {
    // The padding rules subtract 1 from the kernel size and divide by the
    // stride: a zero must be reported before they run.
    for spec in [
        PaddingSpec::TorchSame,
        PaddingSpec::OnnxAuto(OnnxAutoPad::SameUpper),
        PaddingSpec::OnnxAuto(OnnxAutoPad::SameLower),
    ] {
        let (e, _) = build_err(
            Conv2dParams {
                kernel_size: (0, 0),
                ..base()
            }
            .padding(spec),
        );
        assert!(matches!(e, ConvError::ZeroDimension { .. }), "{e:?}");
        let (e, _) = build_err(
            Conv2dParams {
                input_size: (0, 0),
                ..base()
            }
            .padding(spec),
        );
        assert!(matches!(e, ConvError::ZeroDimension { .. }), "{e:?}");
        let (e, _) = build_err(base().stride(0, 0).padding(spec));
        assert!(matches!(e, ConvError::ZeroStride { .. }), "{e:?}");
        let (e, _) = build_err(base().dilation(0, 1).padding(spec));
        assert!(matches!(e, ConvError::ZeroDilation { .. }), "{e:?}");
    }
}

// --- stride, dilation, groups ----------------------------------------------------

#[test]
fn zero_stride() {
    let (e, msg) = build_err(base().stride(0, 2));
    assert_eq!(e, ConvError::ZeroStride { h: 0, w: 2 });
    assert_mentions(&msg, &["stride", "(0, 2)"]);
    let (e, msg) = build_err(base().stride(3, 0));
    assert_eq!(e, ConvError::ZeroStride { h: 3, w: 0 });
    assert_mentions(&msg, &["stride", "(3, 0)"]);
}

#[test]
fn zero_dilation() {
    let (e, msg) = build_err(base().dilation(0, 2));
    assert_eq!(e, ConvError::ZeroDilation { h: 0, w: 2 });
    assert_mentions(&msg, &["dilation", "(0, 2)"]);
    let (e, msg) = build_err(base().dilation(2, 0));
    assert_eq!(e, ConvError::ZeroDilation { h: 2, w: 0 });
    assert_mentions(&msg, &["dilation", "(2, 0)"]);
}

#[test]
fn zero_groups() {
    let (e, msg) = build_err(base().groups(0));
    assert_eq!(e, ConvError::ZeroGroups);
    assert_mentions(&msg, &["groups", "0"]);
}

#[test]
fn groups_not_dividing_in_channels() {
    // C = 4, K = 6, groups = 3: 3 divides K but not C.
    let (e, msg) = build_err(base().groups(3));
    assert_eq!(
        e,
        ConvError::GroupsMismatch {
            groups: 3,
            in_channels: 4,
            out_channels: 6
        }
    );
    assert_mentions(&msg, &["groups = 3", "in_channels = 4", "out_channels = 6"]);
}

#[test]
fn groups_not_dividing_out_channels() {
    // C = 4, K = 6, groups = 4: 4 divides C but not K.
    let (e, msg) = build_err(base().groups(4));
    assert_eq!(
        e,
        ConvError::GroupsMismatch {
            groups: 4,
            in_channels: 4,
            out_channels: 6
        }
    );
    assert_mentions(&msg, &["groups = 4", "in_channels = 4", "out_channels = 6"]);
}

#[test]
fn groups_larger_than_channels() {
    let (e, msg) = build_err(base().groups(12));
    assert_eq!(
        e,
        ConvError::GroupsMismatch {
            groups: 12,
            in_channels: 4,
            out_channels: 6
        }
    );
    assert_mentions(&msg, &["12"]);
}

// --- buffer lengths ------------------------------------------------------------------

/// The valid baseline and correctly sized buffers for it.
fn base_buffers() -> (Conv2d, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let conv = base().build().unwrap();
    assert_eq!(conv.input_shape(), [2, 4, 8, 8]);
    assert_eq!(conv.weight_shape(), [6, 4, 3, 3]);
    assert_eq!(conv.output_shape(), [2, 6, 6, 6]);
    let input = vec![0.5; 2 * 4 * 8 * 8]; // 512
    let weight = vec![0.25; 6 * 4 * 3 * 3]; // 216
    let bias = vec![1.0; 6];
    let output = vec![0.0; 2 * 6 * 6 * 6]; // 432
    (conv, input, weight, bias, output)
}

/// Runs every algorithm through every entry point (one-shot, and a plan's
/// `forward` and `forward_in`, or the plan itself for a bad weight or bias)
/// and expects the same `BufferLength` error from each, without touching
/// the output.
fn check_buffer_error(
    conv: &Conv2d,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    expected: ConvError,
    needles: &[&str],
) {
    let before = output.to_vec();
    let bad_operand = matches!(
        expected,
        ConvError::BufferLength {
            buffer: "weight" | "bias",
            ..
        }
    );
    for a in algorithms() {
        let e = conv
            .forward(input, weight, bias, output, a)
            .expect_err("must be rejected");
        assert_eq!(e, expected, "{a:?}");
        assert_mentions(&e.to_string(), needles);
        let options = ForwardOptions::new(a);
        let e = conv
            .forward_with(input, weight, bias, output, &options)
            .expect_err("must be rejected");
        assert_eq!(e, expected, "{a:?}");
        assert_eq!(output, &before[..], "a rejected call wrote the output");
        if output.len() == conv.geometry().output_len() {
            let e = conv
                .forward_to_vec(input, weight, bias, a)
                .expect_err("must be rejected");
            assert_eq!(e, expected, "{a:?}");
        }
        if bad_operand {
            let e = conv
                .plan(weight, bias, &options)
                .expect_err("the plan must be refused");
            assert_eq!(e, expected, "plan {a:?}");
        } else {
            let plan = conv.plan(weight, bias, &options).unwrap();
            let e = plan.forward(input, output).expect_err("must be rejected");
            assert_eq!(e, expected, "plan.forward {a:?}");
            let e = plan
                .forward_in(input, output, &mut workspace(&plan))
                .expect_err("must be rejected");
            assert_eq!(e, expected, "plan.forward_in {a:?}");
            assert_eq!(output, &before[..], "a rejected plan wrote the output");
        }
    }
}

#[test]
fn input_length_wrong() {
    let (conv, input, weight, bias, mut output) = base_buffers();
    for len in [0, 511, 513] {
        check_buffer_error(
            &conv,
            &input.iter().copied().cycle().take(len).collect::<Vec<_>>(),
            &weight,
            Some(&bias),
            &mut output,
            ConvError::BufferLength {
                buffer: "input",
                expected: 512,
                actual: len,
            },
            &["input", "512", &len.to_string()],
        );
    }
}

#[test]
fn weight_length_wrong() {
    let (conv, input, weight, bias, mut output) = base_buffers();
    check_buffer_error(
        &conv,
        &input,
        &weight[..215],
        Some(&bias),
        &mut output,
        ConvError::BufferLength {
            buffer: "weight",
            expected: 216,
            actual: 215,
        },
        &["weight", "216", "215"],
    );
    // A weight laid out as [K, C, R, S] for groups = 1 given to a grouped
    // descriptor ([K, C/2, R, S]) is too long.
    let grouped = Conv2dParams::new(2, 4, (8, 8), 6, (3, 3))
        .groups(2)
        .build()
        .unwrap();
    check_buffer_error(
        &grouped,
        &input,
        &weight,
        Some(&bias),
        &mut output,
        ConvError::BufferLength {
            buffer: "weight",
            expected: 108,
            actual: 216,
        },
        &["weight", "108", "216"],
    );
}

#[test]
fn bias_length_wrong() {
    let (conv, input, weight, _, mut output) = base_buffers();
    for len in [0usize, 5, 7] {
        let bias = vec![1.0; len];
        check_buffer_error(
            &conv,
            &input,
            &weight,
            Some(&bias),
            &mut output,
            ConvError::BufferLength {
                buffer: "bias",
                expected: 6,
                actual: len,
            },
            &["bias", "6", &len.to_string()],
        );
    }
}

#[test]
fn output_length_wrong() {
    let (conv, input, weight, bias, _) = base_buffers();
    for len in [0usize, 431, 433] {
        let mut output = vec![7.0; len];
        check_buffer_error(
            &conv,
            &input,
            &weight,
            Some(&bias),
            &mut output,
            ConvError::BufferLength {
                buffer: "output",
                expected: 432,
                actual: len,
            },
            &["output", "432", &len.to_string()],
        );
    }
}

#[test]
fn correct_buffers_are_accepted() {
    let (conv, input, weight, bias, mut output) = base_buffers();
    conv.forward(&input, &weight, Some(&bias), &mut output, Algorithm::Auto)
        .unwrap();
    // Every output sums 4·3·3 = 36 taps of 0.5·0.25, plus bias 1: 5.5.
    assert!(output.iter().all(|&v| v == 5.5), "{output:?}");
}

// --- kernel larger than the input ------------------------------------------------------

#[test]
fn kernel_larger_than_input_height() {
    // Kernel 3 with dilation 2 spans 2·(3−1)+1 = 5 rows; the input has 4.
    let (e, msg) = build_err(Conv2dParams::new(1, 1, (4, 9), 1, (3, 3)).dilation(2, 1));
    assert_eq!(
        e,
        ConvError::KernelLargerThanInput {
            axis: "height",
            effective_kernel: 5,
            padded_input: 4
        }
    );
    assert_mentions(&msg, &["height", "5", "4"]);
}

#[test]
fn kernel_larger_than_padded_input_width() {
    // Width: kernel 7 over 3 + 1 + 2 = 6 padded columns.
    let (e, msg) = build_err(
        Conv2dParams::new(1, 1, (9, 3), 1, (1, 7)).padding(Padding::explicit(0, 0, 1, 2)),
    );
    assert_eq!(
        e,
        ConvError::KernelLargerThanInput {
            axis: "width",
            effective_kernel: 7,
            padded_input: 6
        }
    );
    assert_mentions(&msg, &["width", "7", "6"]);
    // One more column of padding makes it fit exactly: a 9×1 output.
    let conv = Conv2dParams::new(1, 1, (9, 3), 1, (1, 7))
        .padding(Padding::explicit(0, 0, 2, 2))
        .build()
        .unwrap();
    assert_eq!(conv.output_shape(), [1, 1, 9, 1]);
}

#[test]
fn huge_dilation_that_fits_is_kernel_larger_than_input() {
    let (e, msg) = build_err(base().dilation(1 << 40, 1));
    assert_eq!(
        e,
        ConvError::KernelLargerThanInput {
            axis: "height",
            effective_kernel: (2usize << 40) + 1,
            padded_input: 8
        }
    );
    assert_mentions(&msg, &[&((2usize << 40) + 1).to_string()]);
}

// --- PyTorch "same" with a stride ---------------------------------------------------------

#[test]
fn torch_same_with_stride() {
    let (e, msg) = build_err(base().padding(PaddingSpec::TorchSame).stride(2, 1));
    assert_eq!(e, ConvError::SameWithStride { h: 2, w: 1 });
    assert_mentions(&msg, &["same", "(2, 1)"]);
    let (e, msg) = build_err(base().padding(PaddingSpec::TorchSame).stride(1, 3));
    assert_eq!(e, ConvError::SameWithStride { h: 1, w: 3 });
    assert_mentions(&msg, &["(1, 3)"]);
}

// --- overflow ---------------------------------------------------------------------------------

fn check_overflow(p: Conv2dParams, what: &str) {
    let (e, msg) = build_err(p);
    assert_eq!(
        e,
        ConvError::Overflow {
            what: match what {
                "input length" => "input length",
                "output length" => "output length",
                "weight length" => "weight length",
                "dilated kernel size" => "dilated kernel size",
                "padded input size" => "padded input size",
                "PyTorch same padding" => "PyTorch same padding",
                "ONNX SAME padding" => "ONNX SAME padding",
                "FLOP count" => "FLOP count",
                other => panic!("unknown {other}"),
            }
        },
        "{p:?}"
    );
    assert_mentions(&msg, &[what, "overflow"]);
}

#[test]
fn overflow_input_length() {
    // N·C·H·W = (usize::MAX / 2)·4·1·1 overflows.
    check_overflow(
        Conv2dParams::new(usize::MAX / 2, 4, (1, 1), 1, (1, 1)),
        "input length",
    );
}

#[test]
fn overflow_output_length() {
    // The input (1·1·2^31·2^31 = 2^62) fits, the output (4·2^62) does not.
    check_overflow(
        Conv2dParams::new(1, 1, (1 << 31, 1 << 31), 4, (1, 1)),
        "output length",
    );
}

#[test]
fn overflow_weight_length() {
    // K·C·R·S = 2^40 · 2^30 · 1 overflows; input 2^30 and output 2^40 fit.
    check_overflow(
        Conv2dParams::new(1, 1 << 30, (1, 1), 1 << 40, (1, 1)),
        "weight length",
    );
}

#[test]
fn overflow_flop_count() {
    // Input 2^32·2^14·2^14 = 2^60, weight 2^32·2^7·2^7 = 2^46 and output
    // (2^14 − 2^7 + 1)^2 < 2^28 all fit, but 2·output·(C·R·S) ≈ 2^75 does not.
    check_overflow(
        Conv2dParams::new(1, 1 << 32, (1 << 14, 1 << 14), 1, (1 << 7, 1 << 7)),
        "FLOP count",
    );
}

#[test]
fn overflow_dilated_kernel() {
    // d·(R−1)+1 with d = isize::MAX and R = 5 overflows usize.
    let big = isize::MAX as usize;
    check_overflow(
        Conv2dParams::new(1, 1, (8, 8), 1, (5, 1)).dilation(big, 1),
        "dilated kernel size",
    );
    check_overflow(
        Conv2dParams::new(1, 1, (8, 8), 1, (1, 5)).dilation(1, big),
        "dilated kernel size",
    );
}

/// Every per-axis value and padded extent above `isize::MAX` is refused by
/// name (PyTorch's sizes are `i64`): the kernels form offsets in `isize`.
/// Regressions: a horizontal stride of 2^63 gave `[0, 0]` on the GEMM
/// lowerings (and a panic in im2col's range arithmetic) where Direct gave
/// `[10, 30]`; a dilation of `usize::MAX/3` with ONNX SAME_LOWER padding
/// panicked on a subtraction overflow in debug builds.
#[test]
fn values_above_isize_max_are_too_large() {
    let cases = [
        (
            Conv2dParams::new(1, 1, (2, 2), 1, (1, 1)).stride(1, 1 << 63),
            "horizontal stride",
            1usize << 63,
        ),
        (
            Conv2dParams::new(1, 1, (2, 2), 1, (1, 1)).stride(usize::MAX, 1),
            "vertical stride",
            usize::MAX,
        ),
        (
            base().dilation(usize::MAX, 1),
            "vertical dilation",
            usize::MAX,
        ),
        (
            base().dilation(1, usize::MAX / 2 + 1),
            "horizontal dilation",
            usize::MAX / 2 + 1,
        ),
        (
            base().padding(Padding::explicit(0, 0, 1 << 63, 0)),
            "padded input width",
            (1 << 63) + 8,
        ),
        (
            Conv2dParams::new(1, 1, (1, 1), 1, (3, 1))
                .dilation(usize::MAX / 3, 1)
                .padding(OnnxAutoPad::SameLower),
            "padded input height",
            2 * (usize::MAX / 3) + 1,
        ),
    ];
    for (p, what, value) in cases {
        let (e, msg) = build_err(p);
        assert_eq!(e, ConvError::TooLarge { what, value }, "{p:?}");
        assert_mentions(&msg, &[what, &value.to_string(), "isize::MAX"]);
    }
    // Just inside the limit the stride is accepted and every algorithm
    // agrees with the definition: one output column per row.
    let conv = Conv2dParams::new(1, 1, (2, 2), 1, (1, 1))
        .stride(1, isize::MAX as usize)
        .build()
        .unwrap();
    for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
        let out = conv
            .forward_to_vec(&[1.0, 2.0, 3.0, 4.0], &[10.0], None, algorithm)
            .unwrap();
        assert_eq!(out, [10.0, 30.0], "{algorithm:?}");
    }
}

/// Padding just inside the limit: no overflow panic in any algorithm's
/// offset arithmetic (tests build with overflow checks), and the window
/// that meets the input is computed.
#[test]
fn padding_near_isize_max_computes() {
    let pad = (isize::MAX as usize) - 8;
    let conv = Conv2dParams::new(1, 1, (2, 2), 1, (1, 1))
        .padding(Padding::explicit(0, 0, pad, 0))
        .stride(1, pad)
        .build()
        .unwrap();
    assert_eq!(conv.output_shape(), [1, 1, 2, 2]);
    for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
        let out = conv
            .forward_to_vec(&[1.0, 2.0, 3.0, 4.0], &[10.0], None, algorithm)
            .unwrap();
        // Column 0 reads padding, column 1 reads input column pad − pad = 0.
        assert_eq!(out, [0.0, 10.0, 0.0, 30.0], "{algorithm:?}");
    }
}

#[test]
fn overflow_padding() {
    check_overflow(
        base().padding(Padding::explicit(usize::MAX, 1, 0, 0)),
        "padded input size",
    );
    check_overflow(
        base().padding(Padding::explicit(0, 0, usize::MAX - 8, 1)),
        "padded input size",
    );
}

#[test]
fn overflow_in_same_padding_rules() {
    let big = isize::MAX as usize;
    check_overflow(
        Conv2dParams::new(1, 1, (8, 8), 1, (5, 1))
            .padding(PaddingSpec::TorchSame)
            .dilation(big, 1),
        "PyTorch same padding",
    );
    check_overflow(
        Conv2dParams::new(1, 1, (8, 8), 1, (5, 1))
            .padding(OnnxAutoPad::SameUpper)
            .dilation(big, 1),
        "ONNX SAME padding",
    );
    check_overflow(
        Conv2dParams::new(1, 1, (8, 8), 1, (1, 5))
            .padding(OnnxAutoPad::SameLower)
            .dilation(1, big),
        "ONNX SAME padding",
    );
}

#[test]
fn extreme_values_never_panic() {
    // A grid of hostile values: every build must return, Ok or Err.
    let big = [0, 1, 2, usize::MAX / 4, usize::MAX / 2, usize::MAX];
    let mut errors = 0usize;
    for &n in &big {
        for &hw in &big {
            for &k in &[1usize, 3, usize::MAX] {
                for &s in &[1usize, 2, usize::MAX] {
                    for &d in &[1usize, usize::MAX] {
                        for spec in [
                            PaddingSpec::Explicit(Padding::symmetric(1, 1)),
                            PaddingSpec::Explicit(Padding::symmetric(usize::MAX, 0)),
                            PaddingSpec::TorchValid,
                            PaddingSpec::TorchSame,
                            PaddingSpec::OnnxAuto(OnnxAutoPad::SameUpper),
                            PaddingSpec::OnnxAuto(OnnxAutoPad::SameLower),
                            PaddingSpec::OnnxAuto(OnnxAutoPad::Valid),
                        ] {
                            let p = Conv2dParams::new(n, 2, (hw, hw), 2, (k, k))
                                .stride(s, s)
                                .dilation(d, d)
                                .padding(spec);
                            match std::panic::catch_unwind(|| p.build()) {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => {
                                    errors += 1;
                                    assert!(!e.to_string().is_empty());
                                }
                                Err(_) => panic!("build panicked on {p:?}"),
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(errors > 0);
}

// --- padding rules on their own -----------------------------------------------------------

/// `PaddingSpec::resolve` is public: a zero stride, size or dilation must be
/// an error from every rule, never a division by zero or a `k − 1`
/// underflow.
#[test]
fn padding_resolve_refuses_zero_sizes_and_strides() {
    let specs = [
        PaddingSpec::Explicit(Padding::symmetric(1, 1)),
        PaddingSpec::TorchValid,
        PaddingSpec::TorchSame,
        PaddingSpec::OnnxAuto(OnnxAutoPad::SameUpper),
        PaddingSpec::OnnxAuto(OnnxAutoPad::SameLower),
        PaddingSpec::OnnxAuto(OnnxAutoPad::Valid),
    ];
    // (input, kernel, stride, dilation) and the error each must give.
    let cases = [
        (
            (7, 7),
            (3, 3),
            (0, 1),
            (1, 1),
            ConvError::ZeroStride { h: 0, w: 1 },
        ),
        (
            (7, 7),
            (3, 3),
            (2, 0),
            (1, 1),
            ConvError::ZeroStride { h: 2, w: 0 },
        ),
        (
            (7, 7),
            (0, 3),
            (1, 1),
            (1, 1),
            ConvError::ZeroDimension {
                name: "kernel height",
            },
        ),
        (
            (7, 7),
            (3, 0),
            (2, 2),
            (1, 1),
            ConvError::ZeroDimension {
                name: "kernel width",
            },
        ),
        (
            (0, 7),
            (3, 3),
            (2, 2),
            (1, 1),
            ConvError::ZeroDimension {
                name: "input height",
            },
        ),
        (
            (7, 0),
            (3, 3),
            (1, 1),
            (1, 1),
            ConvError::ZeroDimension {
                name: "input width",
            },
        ),
        (
            (7, 7),
            (3, 3),
            (1, 1),
            (1, 0),
            ConvError::ZeroDilation { h: 1, w: 0 },
        ),
        // Everything zero: the first zero in the documented order.
        (
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
            ConvError::ZeroDimension {
                name: "input height",
            },
        ),
    ];
    for spec in specs {
        for (input, kernel, stride, dilation, expected) in cases.clone() {
            let r = std::panic::catch_unwind(|| spec.resolve(input, kernel, stride, dilation));
            match r {
                Err(_) => panic!(
                    "{spec:?}.resolve({input:?}, {kernel:?}, {stride:?}, {dilation:?}) panicked"
                ),
                Ok(r) => assert_eq!(
                    r,
                    Err(expected.clone()),
                    "{spec:?} {input:?} {kernel:?} {stride:?} {dilation:?}"
                ),
            }
        }
    }
}

// --- sizes too large for memory -------------------------------------------------------------

/// A valid geometry whose tensors are far larger than memory: a short
/// input is a `BufferLength` error on every entry point, found before any
/// allocation is attempted (not a "capacity overflow" panic).
#[test]
fn huge_valid_geometry_with_a_short_input_is_a_length_error() {
    let conv = Conv2dParams::new(1 << 62, 1, (1, 1), 1, (1, 1))
        .build()
        .expect("2^62 images of one pixel is a valid geometry");
    let g = *conv.geometry();
    assert_eq!((g.input_len(), g.output_len()), (1 << 62, 1 << 62));
    let expected = ConvError::BufferLength {
        buffer: "input",
        expected: 1 << 62,
        actual: 1,
    };
    let mut out = [0.0f32; 1];
    for a in algorithms() {
        let r = std::panic::catch_unwind(|| conv.forward_to_vec(&[1.0], &[2.0], None, a));
        assert_eq!(r.expect("no panic"), Err(expected.clone()), "{a:?}");
        let options = ForwardOptions::new(a);
        assert_eq!(
            conv.forward_with(&[1.0], &[2.0], None, &mut out, &options),
            Err(expected.clone()),
            "{a:?}"
        );
        let plan = conv.plan(&[2.0], None, &options).expect("one weight fits");
        assert_eq!(plan.forward(&[1.0], &mut out), Err(expected.clone()));
        assert_eq!(
            plan.forward_in(&[1.0], &mut out, &mut workspace(&plan)),
            Err(expected.clone())
        );
    }
    assert_eq!(out, [0.0]);
}

/// `forward_to_vec` allocates the output itself: when that needs more bytes
/// than `isize::MAX` (an output of (2^31 + 1)² floats from a one-pixel image
/// padded by 2^30 on every side, a valid geometry), the allocation is
/// refused with `OutOfMemory` on every algorithm, deterministically
/// whatever the machine's memory (no allocator is asked).
#[test]
fn forward_to_vec_refuses_an_output_beyond_isize_max_bytes() {
    let conv = Conv2dParams::new(1, 1, (1, 1), 1, (1, 1))
        .padding(Padding::symmetric(1 << 30, 1 << 30))
        .build()
        .expect("a valid geometry");
    let len = conv.geometry().output_len();
    assert_eq!(len, ((1usize << 31) + 1) * ((1 << 31) + 1));
    for a in algorithms() {
        let r = std::panic::catch_unwind(|| conv.forward_to_vec(&[1.0], &[2.0], None, a));
        let e = r
            .expect("no panic")
            .expect_err("the output cannot be allocated");
        assert!(
            matches!(e, ConvError::OutOfMemory { what: "output", bytes } if bytes >= len),
            "{a:?}: {e:?}"
        );
        assert_mentions(&e.to_string(), &["output", "allocate"]);
    }
}

/// Whether this machine refuses an allocation of `bytes` up front: Linux
/// with heuristic (0) or strict (2) overcommit refuses a request above
/// RAM + swap. With overcommit always on (1), or elsewhere, a huge request
/// may be granted lazily and only fail when touched, which no library can
/// turn into an error.
fn allocation_refused_up_front(bytes: u64) -> bool {
    let Ok(mode) = std::fs::read_to_string("/proc/sys/vm/overcommit_memory") else {
        return false;
    };
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return false;
    };
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX / 2048)
    };
    let total = (kib("MemTotal:") + kib("SwapTotal:")).saturating_mul(1024);
    matches!(mode.trim(), "0" | "2") && bytes > 2 * total
}

/// A 512×512 kernel with padding 512 on a 1×1 image: the im2col column
/// matrix would be 262144 × 514² floats (about 277 GB), far past memory.
/// The explicit lowering must say `OutOfMemory`, on the one-shot forward
/// and on a plan, rather than abort the process. Runs in a child process,
/// so that an abort fails this test alone.
#[test]
fn im2col_column_matrix_beyond_memory_is_out_of_memory() {
    let conv = Conv2dParams::new(1, 1, (1, 1), 1, (512, 512))
        .padding(Padding::symmetric(512, 512))
        .build()
        .unwrap();
    let g = *conv.geometry();
    assert_eq!((g.out_h, g.out_w), (514, 514));
    let column_bytes = (g.gemm_k() * g.out_plane() * 4) as u64;
    assert_eq!(column_bytes, 262_144 * 514 * 514 * 4);
    if !allocation_refused_up_front(column_bytes) {
        println!("skipped: this machine may grant {column_bytes} bytes lazily");
        return;
    }
    in_child_process(
        "im2col_column_matrix_beyond_memory_is_out_of_memory",
        || {
            let input = [1.0f32];
            let weight = vec![0.5f32; g.weight_len()];
            let mut out = vec![-7.0f32; g.output_len()];
            let options =
                ForwardOptions::new(Algorithm::Im2col).parallelism(Parallelism::Sequential);
            let is_oom = |e: &ConvError| {
                matches!(*e, ConvError::OutOfMemory { what: "im2col column matrix", bytes }
                if bytes as u64 == column_bytes)
            };
            let e = conv
                .forward_with(&input, &weight, None, &mut out, &options)
                .expect_err("the column matrix cannot be allocated");
            assert!(is_oom(&e), "{e:?}");
            assert_mentions(
                &e.to_string(),
                &["im2col column matrix", &column_bytes.to_string()],
            );
            let plan = conv.plan(&weight, None, &options).unwrap();
            let e = plan
                .forward(&input, &mut out)
                .expect_err("nor through a plan");
            assert!(is_oom(&e), "plan: {e:?}");
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The same column matrix is what a plan's workspace for `forward_in`
/// holds: asking for that workspace must be refused, not abort
/// (regression: `workspace()` reserved it infallibly and aborted).
#[test]
fn im2col_plan_workspace_beyond_memory_is_out_of_memory() {
    let conv = Conv2dParams::new(1, 1, (1, 1), 1, (512, 512))
        .padding(Padding::symmetric(512, 512))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let column_bytes = (g.gemm_k() * g.out_plane() * 4) as u64;
    if !allocation_refused_up_front(column_bytes) {
        println!("skipped: this machine may grant {column_bytes} bytes lazily");
        return;
    }
    in_child_process(
        "im2col_plan_workspace_beyond_memory_is_out_of_memory",
        || {
            let weight = vec![0.5f32; g.weight_len()];
            let options = ForwardOptions::new(Algorithm::Im2col);
            let plan = conv.plan(&weight, None, &options).unwrap();
            assert!(plan.workspace_bytes_per_thread() as u64 >= column_bytes);
            let e = try_workspace(&plan).expect_err("the workspace cannot be allocated");
            assert!(
                matches!(e, ConvError::OutOfMemory { bytes, .. } if bytes as u64 >= column_bytes),
                "{e:?}"
            );
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

// --- every fallible entry point -------------------------------------------------------------

/// Every public function that can be given bad input returns `Err` for it
/// and does not panic: an inventory, one bad call per entry point (the
/// tests above go through each error in detail; `sgemm`'s are in
/// `bad_input_gemm.rs`).
#[test]
fn every_public_entry_point_refuses_bad_input_with_an_error() {
    use cpuconv::{Activation, ConvGeometry};
    let (conv, input, weight, bias, output) = base_buffers();
    let nan_clamp = ForwardOptions::default().activation(Activation::Clamp {
        min: f32::NAN,
        max: 1.0,
    });
    let plan = conv
        .plan(&weight, Some(&bias), &ForwardOptions::default())
        .unwrap();
    let mut ws = workspace(&plan);
    type Call<'a> = Box<dyn FnMut() -> Result<(), ConvError> + 'a>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "Conv2dParams::build",
            Box::new(|| base().stride(0, 1).build().map(drop)),
        ),
        (
            "ConvGeometry::new",
            Box::new(|| ConvGeometry::new(&base().groups(0)).map(drop)),
        ),
        (
            "PaddingSpec::resolve",
            Box::new(|| {
                PaddingSpec::TorchSame
                    .resolve((8, 8), (3, 3), (0, 0), (1, 1))
                    .map(drop)
            }),
        ),
        (
            "Conv2d::forward",
            Box::new(|| {
                conv.forward(
                    &input[1..],
                    &weight,
                    None,
                    &mut output.clone(),
                    Algorithm::Auto,
                )
            }),
        ),
        (
            "Conv2d::forward_with",
            Box::new(|| {
                conv.forward_with(
                    &input,
                    &weight,
                    Some(&bias),
                    &mut output.clone(),
                    &nan_clamp,
                )
            }),
        ),
        (
            "Conv2d::forward_to_vec",
            Box::new(|| {
                conv.forward_to_vec(&input, &weight[1..], None, Algorithm::Implicit)
                    .map(drop)
            }),
        ),
        (
            "Conv2d::plan",
            Box::new(|| conv.plan(&weight, Some(&bias), &nan_clamp).map(drop)),
        ),
        (
            "Conv2dPlan::forward",
            Box::new(|| plan.forward(&input, &mut output.clone()[1..])),
        ),
        (
            "Conv2dPlan::forward_in",
            Box::new(|| plan.forward_in(&input[..7], &mut output.clone(), &mut ws)),
        ),
    ];
    for (name, mut call) in calls {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut call)) {
            Err(_) => panic!("{name} panicked on bad input"),
            Ok(Ok(())) => panic!("{name} accepted bad input"),
            Ok(Err(e)) => assert!(!e.to_string().is_empty(), "{name}"),
        }
    }
}

/// Regression (found by the conv fuzz target): an `Im2col` plan whose
/// column matrix has 2^62 + 1 floats made `workspace_bytes_per_thread`
/// overflow. The plan is refused when it is made, naming the workspace;
/// other algorithms on the same geometry still plan, and report their size.
#[test]
fn plan_whose_workspace_bytes_overflow_is_refused() {
    let conv = Conv2dParams::new(1, 1, (1, 1), 1, (1, 1))
        .padding(Padding::explicit(1 << 62, 0, 0, 0))
        .build()
        .unwrap();
    assert_eq!(conv.output_shape(), [1, 1, (1 << 62) + 1, 1]);
    for isa in cpuconv::testing::isas_under_test() {
        let options = ForwardOptions::new(Algorithm::Im2col).isa(isa);
        let e = conv.plan(&[1.0], None, &options).unwrap_err();
        assert_eq!(
            e,
            ConvError::Overflow {
                what: "workspace size"
            }
        );
        assert!(e.to_string().contains("workspace size"), "{e}");
        let plan = conv
            .plan(&[1.0], None, &ForwardOptions::new(Algorithm::Direct))
            .unwrap();
        assert_eq!(plan.workspace_bytes_per_thread(), 0);
    }
}
