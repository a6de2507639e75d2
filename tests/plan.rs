//! Plans: pre-packed weights give the same values as the one-shot forward,
//! across many calls and from many threads at once.

use cpuconv::testing::isas_under_test;
use cpuconv::{
    Activation, Algorithm, Conv2d, Conv2dParams, ConvMode, ForwardOptions, Isa, Padding,
    Parallelism,
};

/// Deterministic values in [-1, 1).
fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Input and weights for `conv` (bias-free), and the reference output.
fn reference_case(conv: &Conv2d) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = conv.geometry();
    let x = data(g.input_len(), 4);
    let w = data(g.weight_len(), 5);
    let mut want = vec![0.0; g.output_len()];
    conv.forward_with(
        &x,
        &w,
        None,
        &mut want,
        &ForwardOptions::new(Algorithm::Direct),
    )
    .unwrap();
    (x, w, want)
}

/// Every value of `got` within 1e-4 (relative, plus absolute) of `want`.
fn assert_close(want: &[f32], got: &[f32], what: &str) {
    for (i, (a, c)) in want.iter().zip(got).enumerate() {
        assert!(
            (a - c).abs() <= 1e-4 * (1.0 + a.abs()),
            "{what} [{i}]: {a} vs {c}"
        );
    }
}

fn shapes() -> Vec<Conv2dParams> {
    vec![
        // Dense 3×3 with padding, an odd number of output channels.
        Conv2dParams::new(2, 6, (13, 11), 10, (3, 3)).padding(Padding::symmetric(1, 1)),
        // Strided, dilated, asymmetric padding, flipped kernel.
        Conv2dParams::new(1, 4, (17, 9), 9, (2, 3))
            .stride(2, 1)
            .dilation(2, 2)
            .padding(Padding::explicit(0, 2, 1, 3))
            .mode(ConvMode::Convolution),
        // Grouped.
        Conv2dParams::new(1, 8, (10, 10), 12, (3, 3))
            .groups(4)
            .padding(Padding::symmetric(1, 1)),
        // Unpadded 1×1: the input planes are B directly.
        Conv2dParams::new(2, 16, (7, 7), 40, (1, 1)),
        // Few output pixels, many channels: the pre-packed weights take the
        // column kernel, AVX-512's 32 × 8 (49 = 6·8 + 1 columns; 7 columns
        // and 95 = 2·32 + 31 rows) or AVX2's 16 × 6 (49 = 8·6 + 1; 7 = 6 +
        // 1 and 95 = 5·16 + 15), while the one-shot forward runs the row
        // kernel.
        Conv2dParams::new(2, 12, (7, 7), 64, (3, 3)).padding(Padding::symmetric(1, 1)),
        Conv2dParams::new(1, 5, (3, 9), 95, (3, 3)).stride(2, 1),
        // Right-edge column tiles of 2, 3 and 4 real columns on AVX-512
        // (50, 51 and 36 output pixels), 2, 3, 4 and 5 on AVX2 (50, 51, 52
        // and 53; 36 is whole 6-column tiles), each with its own number of
        // k-chains; k = 5, 6 and 7 leave k-steps over after the chained
        // rounds.
        Conv2dParams::new(1, 6, (5, 10), 64, (1, 1)),
        Conv2dParams::new(1, 7, (3, 17), 64, (1, 1)),
        Conv2dParams::new(2, 6, (6, 6), 64, (1, 1)),
        Conv2dParams::new(1, 5, (4, 13), 64, (1, 1)),
        Conv2dParams::new(1, 7, (1, 53), 64, (1, 1)),
        // k = 96·9 = 864, deeper than any KC: the second K block adds to C
        // (β = 1), through whole 8- or 6-column rows and the 1-column edge.
        Conv2dParams::new(1, 96, (7, 7), 64, (3, 3)).padding(Padding::symmetric(1, 1)),
    ]
}

/// Plans of every algorithm on every ISA against the one-shot forward of
/// the same options, and against the Direct reference.
#[test]
fn plan_matches_one_shot_forward_on_every_isa_and_algorithm() {
    for params in shapes() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let x = data(g.input_len(), 1);
        let w = data(g.weight_len(), 2);
        let b = data(g.out_channels, 3);
        let reference = [Activation::None, Activation::Relu6].map(|activation| {
            let opts = ForwardOptions::new(Algorithm::Direct).activation(activation);
            let mut out = vec![0.0; g.output_len()];
            conv.forward_with(&x, &w, Some(&b), &mut out, &opts)
                .unwrap();
            out
        });
        for isa in isas_under_test() {
            for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
                for (activation, reference) in [Activation::None, Activation::Relu6]
                    .into_iter()
                    .zip(&reference)
                {
                    let opts = ForwardOptions::new(algorithm)
                        .isa(Some(isa))
                        .activation(activation)
                        .parallelism(Parallelism::Sequential);
                    let mut want = vec![0.0; g.output_len()];
                    conv.forward_with(&x, &w, Some(&b), &mut want, &opts)
                        .unwrap();
                    let plan = conv.plan(&w, Some(&b), &opts).unwrap();
                    // Reused across calls: every call gives the same values.
                    for call in 0..5 {
                        let mut got = vec![f32::NAN; g.output_len()];
                        plan.forward(&x, &mut got).unwrap();
                        for (i, (a, c)) in want.iter().zip(&got).enumerate() {
                            assert!(
                                (a - c).abs() <= 1e-5 * (1.0 + a.abs()),
                                "{params:?} {isa} {algorithm:?} call {call} [{i}]: {a} vs {c}"
                            );
                        }
                        // And the reference: the plan's kernels (the column
                        // kernels on few-column shapes) against Direct.
                        assert_close(
                            reference,
                            &got,
                            &format!("{params:?} {isa} {algorithm:?} {activation:?} vs Direct"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn one_plan_serves_many_threads_at_once() {
    let conv = Conv2dParams::new(1, 32, (28, 28), 48, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let w = data(g.weight_len(), 5);
    let b = data(g.out_channels, 6);
    let opts = ForwardOptions::new(Algorithm::Implicit);
    let plan = conv.plan(&w, Some(&b), &opts).unwrap();
    let inputs: Vec<Vec<f32>> = (0..6).map(|t| data(g.input_len(), 100 + t)).collect();
    let expected: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| {
            conv.forward_to_vec(x, &w, Some(&b), Algorithm::Direct)
                .unwrap()
        })
        .collect();
    std::thread::scope(|scope| {
        for (x, want) in inputs.iter().zip(&expected) {
            let plan = &plan;
            scope.spawn(move || {
                for _ in 0..20 {
                    let mut got = vec![0.0; g.output_len()];
                    plan.forward(x, &mut got).unwrap();
                    let worst = want
                        .iter()
                        .zip(&got)
                        .map(|(a, c)| (a - c).abs())
                        .fold(0.0f32, f32::max);
                    // K_gemm = 288 taps of |x·w| ≤ 1: 2·288·ε·288 ≈ 2e-2 is the
                    // worst-case bound; observed errors are ~1e-5.
                    assert!(worst < 1e-3, "max error {worst}");
                }
            });
        }
    });
}

#[test]
fn plan_rejects_wrong_buffers() {
    let conv = Conv2dParams::new(1, 2, (5, 5), 3, (3, 3)).build().unwrap();
    let g = *conv.geometry();
    let opts = ForwardOptions::default();
    assert!(conv
        .plan(&vec![0.0; g.weight_len() - 1], None, &opts)
        .is_err());
    assert!(conv
        .plan(&vec![0.0; g.weight_len()], Some(&[0.0; 2]), &opts)
        .is_err());
    let plan = conv.plan(&vec![0.0; g.weight_len()], None, &opts).unwrap();
    let mut out = vec![0.0; g.output_len()];
    assert!(plan
        .forward(&vec![0.0; g.input_len() + 1], &mut out)
        .is_err());
    assert!(plan
        .forward(&vec![0.0; g.input_len()], &mut out[1..])
        .is_err());
}

/// A plan whose GEMM reads its weights in place to finish the plane's last
/// column as dot products (AVX-512, a 1×1 layer on a 7×7 plane: 49 = 48 + 1
/// columns) keeps them as given; where B is the implicit view (3×3) or the
/// path has no dot kernel, they are packed. Values match the reference on
/// 1 and 3 threads either way.
#[test]
fn plans_read_weights_in_place_where_the_gemm_peels_columns() {
    let pointwise = Conv2dParams::new(1, 64, (7, 7), 96, (1, 1))
        .build()
        .unwrap();
    let dense = Conv2dParams::new(1, 64, (7, 7), 96, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    for (conv, algorithm) in [
        (pointwise, Algorithm::Implicit),
        (pointwise, Algorithm::Im2col),
        (dense, Algorithm::Implicit),
    ] {
        let g = *conv.geometry();
        let (x, w, want) = reference_case(&conv);
        for isa in isas_under_test() {
            for threads in [1, 3] {
                let opts = ForwardOptions::new(algorithm)
                    .isa(Some(isa))
                    .parallelism(Parallelism::threads(threads));
                let plan = conv.plan(&w, None, &opts).unwrap();
                let in_place = isa == cpuconv::Isa::Avx512 && g.kernel_h == 1;
                assert_eq!(
                    plan.weights_prepacked(),
                    !in_place,
                    "{isa} {algorithm:?} {}×{}",
                    g.kernel_h,
                    g.kernel_w
                );
                let mut got = vec![f32::NAN; g.output_len()];
                plan.forward(&x, &mut got).unwrap();
                assert_close(
                    &want,
                    &got,
                    &format!("{isa} {algorithm:?} {threads} threads"),
                );
            }
        }
    }
}

/// `Auto` resolves for the path a plan runs, not only the CPU's best: a 1×1
/// layer on a 7² plane goes to the dense tile only on AVX-512, whose tile
/// outgrows its GEMM's micro-tile; a plan forced onto AVX2 or the portable
/// kernels keeps it on the implicit GEMM, and gives the forward's values.
#[test]
fn auto_follows_the_forced_isa_on_pointwise_layers() {
    let conv = Conv2dParams::new(1, 512, (7, 7), 256, (1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let (x, w, want) = reference_case(&conv);
    for isa in isas_under_test() {
        let opts = ForwardOptions::new(Algorithm::Auto)
            .isa(Some(isa))
            .parallelism(Parallelism::Sequential);
        let plan = conv.plan(&w, None, &opts).unwrap();
        let expected = if isa == Isa::Avx512 {
            Algorithm::DirectDense
        } else {
            Algorithm::Implicit
        };
        assert_eq!(plan.algorithm(), expected, "{isa}");
        assert_eq!(plan.isa(), isa);
        let mut got = vec![f32::NAN; g.output_len()];
        plan.forward(&x, &mut got).unwrap();
        assert_close(&want, &got, &isa.to_string());
    }
}
