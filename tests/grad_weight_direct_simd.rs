//! `Algorithm::DirectSimd` for the weight gradient against the `Direct`
//! reference:
//!
//! * a property test on random shapes (stride and dilation 1–3 per axis,
//!   asymmetric padding, depthwise and 2–8 channels per group in and out,
//!   batch 1–3, widths around every multiple of the vector width, both
//!   modes), on every ISA under test, accumulate on and off, 1 and 2
//!   threads; sequential calls show in the kernel trace that the forced
//!   ISA's SIMD direct kernel ran; repeated calls and the threaded call give
//!   bitwise the same result as the sequential one;
//! * hand-picked shapes: the MobileNet depthwise layers, the suite's grouped
//!   layer, large groups (32 channels per group, correct if slow), kernels
//!   larger than a tile's taps, a padding that swallows whole rows;
//! * `Conv2d::backward` with only the weight (and bias) gradient.
//!
//! Tolerance, as in `tests/backward.rs`: a weight-gradient element is an f32
//! sum of `T = N·OH·OW` products, so with `M` the sum of its terms'
//! magnitudes both results are within `(T + 1)·ε·M` of the exact value and
//! differ by at most twice that; accumulating adds the rounding of one more
//! addition, `ε·(|start| + |result|)`. `M` is computed by the Direct pass on
//! `|x|` and `|dy|`.
//!
//! The timing harness (`#[ignore]`, run with `--release -- --ignored
//! --nocapture timing`) compares this pass with the forward `DirectSimd` on
//! the same layers.

mod common;

use common::grads::assert_close;
use common::{bits, proptest_cases, Rng};
use cpuconv::testing::{isas_under_test, traced};
use cpuconv::{
    Algorithm, BackwardOptions, Conv2d, Conv2dParams, ConvError, ConvMode, ForwardOptions, Grads,
    Isa, Padding, Parallelism,
};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};

/// One random problem.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    /// Input and output channels per group, groups.
    cg: usize,
    kg: usize,
    groups: usize,
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    stride: (usize, usize),
    dilation: (usize, usize),
    /// Top, bottom, left, right.
    pad: (usize, usize, usize, usize),
    mode: ConvMode,
    seed: u64,
}

impl Case {
    fn params(&self) -> Conv2dParams {
        let (t, b, l, r) = self.pad;
        Conv2dParams::new(
            self.batch,
            self.cg * self.groups,
            (self.h, self.w),
            self.kg * self.groups,
            (self.r, self.s),
        )
        .stride(self.stride.0, self.stride.1)
        .dilation(self.dilation.0, self.dilation.1)
        .padding(Padding::explicit(t, b, l, r))
        .groups(self.groups)
        .mode(self.mode)
    }
}

/// Output widths that hit every edge of an 8- and a 16-lane vector: one
/// short of, at and one past each multiple, plus a few odd ones.
fn widths() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..=5,
        prop::sample::select(vec![7usize, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40]),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let channels = prop_oneof![
        // Depthwise.
        (Just(1usize), Just(1usize), 1usize..=6),
        // Small groups, 2–8 channels per group in and out.
        (2usize..=8, 2usize..=8, 1usize..=3),
        // One side single.
        (1usize..=3, 1usize..=5, 1usize..=3),
    ];
    (
        (1usize..=3, channels, 1usize..=9, widths()),
        (
            1usize..=4,
            1usize..=4,
            1usize..=3,
            1usize..=3,
            1usize..=3,
            1usize..=3,
        ),
        (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |((batch, (cg, kg, groups), h, ow), (r, s, sh, sw, dh, dw), pad, conv, seed)| {
                // An input width whose output is about `ow` wide.
                let span = (s - 1) * dw + 1;
                let w = ((ow.max(1) - 1) * sw + span)
                    .saturating_sub(pad.2 + pad.3)
                    .max(1);
                Case {
                    batch,
                    cg,
                    kg,
                    groups,
                    h,
                    w,
                    r,
                    s,
                    stride: (sh, sw),
                    dilation: (dh, dw),
                    pad,
                    mode: if conv {
                        ConvMode::Convolution
                    } else {
                        ConvMode::CrossCorrelation
                    },
                    seed,
                }
            },
        )
}

fn options(algorithm: Algorithm) -> BackwardOptions {
    BackwardOptions::new(algorithm)
}

/// Checks `DirectSimd` against `Direct` on one convolution with random data
/// from `seed`, on every ISA under test, accumulate off and on, 1 and 2
/// threads, with the trace and bitwise reproducibility.
fn check_conv(conv: &Conv2d, seed: u64, what: &str) -> Result<(), TestCaseError> {
    let g = *conv.geometry();
    let mut rng = Rng::new(seed);
    let x = rng.vec(g.input_len());
    let dy = rng.vec(g.output_len());
    let start = rng.vec(g.weight_len());
    let zeros = vec![0.0; g.weight_len()];
    let terms = g.batch * g.out_h * g.out_w;

    let direct = options(Algorithm::Direct);
    let mut want = vec![0.0; g.weight_len()];
    conv.backward_weight(&x, &dy, &mut want, &direct).unwrap();
    let mut want_acc = start.clone();
    conv.backward_weight(&x, &dy, &mut want_acc, &direct.accumulate(true))
        .unwrap();
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
    let mut mag = vec![0.0; g.weight_len()];
    conv.backward_weight(&abs(&x), &abs(&dy), &mut mag, &direct)
        .unwrap();

    for isa in isas_under_test() {
        let seq = options(Algorithm::DirectSimd)
            .isa(isa)
            .parallelism(Parallelism::Sequential);
        let what = format!("{what} {isa:?}");
        let mut dw = vec![f32::NAN; g.weight_len()];
        let (r, trace) = traced(|| conv.backward_weight(&x, &dy, &mut dw, &seq));
        r.unwrap();
        prop_assert!(
            trace.direct_simd_ran_on(isa),
            "{what}: no {isa:?} SIMD direct kernel in {trace:?}"
        );
        assert_close(
            &format!("grad weight {what}"),
            &dw,
            &want,
            &mag,
            &zeros,
            terms,
        )?;

        // Run to run and across thread counts: bitwise the same.
        let mut again = vec![f32::NAN; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut again, &seq).unwrap();
        prop_assert_eq!(bits(&again), bits(&dw), "{}: second call differs", what);
        let two = seq.parallelism(Parallelism::threads(2));
        let mut threaded = vec![f32::NAN; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut threaded, &two).unwrap();
        prop_assert_eq!(bits(&threaded), bits(&dw), "{}: 2 threads differ", what);

        for par in [Parallelism::Sequential, Parallelism::threads(2)] {
            let mut acc = start.clone();
            conv.backward_weight(&x, &dy, &mut acc, &seq.parallelism(par).accumulate(true))
                .unwrap();
            assert_close(
                &format!("accumulated grad weight {what} {par:?}"),
                &acc,
                &want_acc,
                &mag,
                &start,
                terms,
            )?;
            // Accumulating is the overwriting result added once.
            let sum: Vec<f32> = start.iter().zip(&dw).map(|(a, b)| a + b).collect();
            prop_assert_eq!(
                bits(&acc),
                bits(&sum),
                "{}: accumulate is not start + dW",
                what
            );
        }
    }
    Ok(())
}

/// Depthwise 3×3 with dilation 1 and strides 1–2 (the row sweep on
/// AVX-512, the row-block tile elsewhere): heights around every block of 4
/// and 8 rows, asymmetric padding.
fn depthwise3_strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..=3, 1usize..=4, 1usize..=20, widths()),
        (1usize..=2, 1usize..=2),
        (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((batch, groups, h, ow), (sh, sw), pad, conv, seed)| {
            let w = ((ow.max(1) - 1) * sw + 3)
                .saturating_sub(pad.2 + pad.3)
                .max(1);
            Case {
                batch,
                cg: 1,
                kg: 1,
                groups,
                h,
                w,
                r: 3,
                s: 3,
                stride: (sh, sw),
                dilation: (1, 1),
                pad,
                mode: if conv {
                    ConvMode::Convolution
                } else {
                    ConvMode::CrossCorrelation
                },
                seed,
            }
        })
}

/// Stride 1 with output rows as wide as the input rows (left + right
/// padding = `(S − 1)·dw`, split any way): the flattened sweep, whose
/// vectors span several rows. Planes of 1 to 20 rows of widths around every
/// vector edge and below a vector, any kernel, dilation and top/bottom
/// padding; depthwise and 2–8 channels per group.
fn flat_strategy() -> impl Strategy<Value = Case> {
    let channels = prop_oneof![
        (Just(1usize), Just(1usize), 1usize..=6),
        (2usize..=8, 2usize..=8, 1usize..=3),
        (1usize..=3, 1usize..=5, 1usize..=3),
    ];
    (
        (1usize..=3, channels, 1usize..=20, widths()),
        (1usize..=4, 1usize..=4, 1usize..=3, 1usize..=3),
        (0usize..=3, 0usize..=3, 0usize..=12),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, (cg, kg, groups), h, w),
                (r, s, dh, dw),
                (top, bottom, split),
                conv,
                seed,
            )| {
                let span = (s - 1) * dw;
                let left = split.min(span);
                Case {
                    batch,
                    cg,
                    kg,
                    groups,
                    h,
                    w,
                    r,
                    s,
                    stride: (1, 1),
                    dilation: (dh, dw),
                    pad: (top, bottom, left, span - left),
                    mode: if conv {
                        ConvMode::Convolution
                    } else {
                        ConvMode::CrossCorrelation
                    },
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: proptest_cases(256),
        max_global_rejects: 1 << 14,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn direct_simd_grad_weight_matches_direct(case in case_strategy()) {
        let conv = match case.params().build() {
            Ok(conv) => conv,
            Err(ConvError::KernelLargerThanInput { .. }) => {
                return Err(TestCaseError::reject("empty output"))
            }
            Err(e) => panic!("{case:?}: {e}"),
        };
        check_conv(&conv, case.seed, &format!("{case:?}"))?;
    }

    #[test]
    fn direct_simd_grad_weight_flat_matches_direct(case in flat_strategy()) {
        let conv = match case.params().build() {
            Ok(conv) => conv,
            Err(ConvError::KernelLargerThanInput { .. }) => {
                return Err(TestCaseError::reject("empty output"))
            }
            Err(e) => panic!("{case:?}: {e}"),
        };
        prop_assert_eq!(conv.geometry().out_w, case.w);
        check_conv(&conv, case.seed, &format!("{case:?}"))?;
    }

    #[test]
    fn direct_simd_grad_weight_depthwise_3x3_matches_direct(case in depthwise3_strategy()) {
        let conv = match case.params().build() {
            Ok(conv) => conv,
            Err(ConvError::KernelLargerThanInput { .. }) => {
                return Err(TestCaseError::reject("empty output"))
            }
            Err(e) => panic!("{case:?}: {e}"),
        };
        check_conv(&conv, case.seed, &format!("{case:?}"))?;
    }
}

fn depthwise(n: usize, c: usize, hw: usize, k: usize, stride: usize, pad: usize) -> Conv2d {
    Conv2dParams::new(n, c, (hw, hw), c, (k, k))
        .stride(stride, stride)
        .padding(Padding::symmetric(pad, pad))
        .groups(c)
        .build()
        .unwrap()
}

fn run(conv: &Conv2d, what: &str) {
    check_conv(conv, 0x5eed, what).unwrap_or_else(|e| panic!("{e}"));
}

/// The MobileNet depthwise layers (scaled down in channels), stride 1 and
/// 2, both modes.
#[test]
fn depthwise_layers() {
    run(&depthwise(1, 6, 56, 3, 1, 1), "dw 56² 3×3");
    run(&depthwise(2, 5, 14, 3, 2, 1), "dw 14² 3×3/2");
    run(&depthwise(1, 4, 7, 3, 1, 1), "dw 7² 3×3");
    run(&depthwise(1, 3, 19, 5, 2, 2), "dw 19² 5×5/2");
    let conv = Conv2dParams::new(1, 3, (33, 33), 3, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .groups(3)
        .mode(ConvMode::Convolution)
        .build()
        .unwrap();
    run(&conv, "dw convolution mode");
}

/// Depthwise layers on small or strided planes put channels in lanes: a
/// block count that leaves a partial block, a batch, stride 2, a kernel
/// with more taps than a tile holds, dilation, asymmetric padding and the
/// convolution mode; the kernel trace shows the path ran on every ISA.
#[test]
fn depthwise_channels_in_lanes() {
    let layers = [
        ("37 channels 7² 3×3, batch 2", depthwise(2, 37, 7, 3, 1, 1)),
        ("20 channels 14² 3×3/2", depthwise(1, 20, 14, 3, 2, 1)),
        ("9 channels 12² 7×7", depthwise(1, 9, 12, 7, 1, 3)),
        (
            "11 channels 9×13 3×5 d2 asymmetric, convolution",
            Conv2dParams::new(2, 11, (9, 13), 11, (3, 5))
                .dilation(2, 2)
                .padding(Padding::explicit(0, 3, 4, 1))
                .groups(11)
                .mode(ConvMode::Convolution)
                .build()
                .unwrap(),
        ),
        (
            "17 channels 15² 3×3/2 no padding",
            depthwise(1, 17, 15, 3, 2, 0),
        ),
    ];
    for (what, conv) in &layers {
        run(conv, what);
        let g = *conv.geometry();
        let x = vec![0.5; g.input_len()];
        let dy = vec![0.25; g.output_len()];
        for isa in isas_under_test() {
            let mut dw = vec![0.0; g.weight_len()];
            let opts = options(Algorithm::DirectSimd)
                .isa(isa)
                .parallelism(Parallelism::Sequential);
            let (r, trace) = traced(|| conv.backward_weight(&x, &dy, &mut dw, &opts));
            r.unwrap();
            assert!(
                trace.grad_weight_lanes > 0,
                "{what} {isa:?}: channels not in lanes: {trace:?}"
            );
        }
    }
}

/// The suite's grouped layer's shape (4 channels per group), fewer groups;
/// larger groups; kernels with more taps than any tile holds.
#[test]
fn groups_and_large_kernels() {
    let grouped = |c: usize, k: usize, groups: usize, hw: usize, kern: usize| {
        Conv2dParams::new(2, c, (hw, hw), k, (kern, kern))
            .padding(Padding::symmetric(kern / 2, kern / 2))
            .groups(groups)
            .build()
            .unwrap()
    };
    run(&grouped(16, 16, 4, 28, 3), "4 per group");
    run(&grouped(32, 24, 2, 12, 3), "16 → 12 per group");
    run(&grouped(64, 64, 2, 9, 3), "32 per group");
    run(&grouped(6, 9, 3, 20, 7), "7×7, 2 → 3 per group");
    run(&grouped(3, 3, 3, 23, 5), "5×5 depthwise");
}

/// A padding larger than the kernel's reach: whole output rows and columns
/// read only padding, and their taps contribute nothing (an infinite
/// gradient there must not turn into NaN).
#[test]
fn padding_only_outputs_contribute_nothing() {
    let conv = Conv2dParams::new(1, 2, (5, 20), 2, (3, 3))
        .padding(Padding::explicit(4, 3, 5, 6))
        .groups(2)
        .build()
        .unwrap();
    run(&conv, "wide padding");
    let g = *conv.geometry();
    let x = vec![1.0; g.input_len()];
    // dY is infinite exactly where the whole window is padding.
    let mut dy = vec![0.5; g.output_len()];
    for n_k in 0..g.out_channels {
        for oh in 0..g.out_h {
            for ow in 0..g.out_w {
                let rows = (oh..oh + 3).any(|ih| (4..4 + 5).contains(&ih));
                let cols = (ow..ow + 3).any(|iw| (5..5 + 20).contains(&iw));
                if !rows || !cols {
                    dy[(n_k * g.out_h + oh) * g.out_w + ow] = f32::INFINITY;
                }
            }
        }
    }
    for isa in isas_under_test() {
        let mut want = vec![0.0; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut want, &options(Algorithm::Direct))
            .unwrap();
        let mut got = vec![f32::NAN; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut got, &options(Algorithm::DirectSimd).isa(isa))
            .unwrap();
        assert!(want.iter().all(|v| v.is_finite()), "{want:?}");
        assert_eq!(bits(&got), bits(&want), "{isa:?}");
    }
}

/// `Conv2d::backward` runs `DirectSimd` for the weight gradient, alone or
/// with the input gradient.
#[test]
fn backward_with_direct_simd() {
    let conv = depthwise(2, 3, 10, 3, 1, 1);
    let g = *conv.geometry();
    let mut rng = Rng::new(7);
    let (x, w, dy) = (
        rng.vec(g.input_len()),
        rng.vec(g.weight_len()),
        rng.vec(g.output_len()),
    );
    let o = options(Algorithm::DirectSimd);
    let mut want = vec![0.0; g.weight_len()];
    conv.backward_weight(&x, &dy, &mut want, &o).unwrap();
    let (mut dw, mut db) = (vec![0.0; g.weight_len()], vec![0.0; g.out_channels]);
    let grads = Grads {
        weight: Some(&mut dw),
        bias: Some(&mut db),
        ..Grads::default()
    };
    conv.backward(&x, &w, &dy, grads, &o).unwrap();
    assert_eq!(bits(&dw), bits(&want));
    let mut want_db = vec![0.0; g.out_channels];
    conv.backward_bias(&dy, &mut want_db).unwrap();
    assert_eq!(bits(&db), bits(&want_db));

    // With the input gradient too: the phases run it on the SIMD direct
    // kernels, and both match their single calls.
    let mut want_dx = vec![0.0; g.input_len()];
    conv.backward_input(&w, &dy, &mut want_dx, &o).unwrap();
    let mut dx = vec![0.0; g.input_len()];
    let mut dw = vec![0.0; g.weight_len()];
    let grads = Grads {
        input: Some(&mut dx),
        weight: Some(&mut dw),
        ..Grads::default()
    };
    conv.backward(&x, &w, &dy, grads, &o).unwrap();
    assert_eq!(bits(&dx), bits(&want_dx));
    assert_eq!(bits(&dw), bits(&want));
}

// --- timing ------------------------------------------------------------------------------

/// Median seconds of `reps` calls of `f` (after one warm-up call).
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

/// GFLOP/s (FLOPs = `Conv2d::flops()`) of this pass and of the forward
/// `DirectSimd` plan on the same layers, 1 and 2 threads, AVX-512 and AVX2,
/// interleaved round by round in one process; prints a table. Run with
/// `cargo test --release --test grad_weight_direct_simd -- --ignored
/// --nocapture timing`.
#[test]
#[ignore]
fn timing() {
    let layers: Vec<(&str, Conv2d)> = vec![
        ("mbv2_dw 1×144×56² 3×3 p1", depthwise(1, 144, 56, 3, 1, 1)),
        ("dw_s2 1×576×14² 3×3/2 p1", depthwise(1, 576, 14, 3, 2, 1)),
        ("dw_7 1×960×7² 3×3 p1", depthwise(1, 960, 7, 3, 1, 1)),
        (
            "grouped 1×128×28² →128 3×3 p1 g32",
            Conv2dParams::new(1, 128, (28, 28), 128, (3, 3))
                .padding(Padding::symmetric(1, 1))
                .groups(32)
                .build()
                .unwrap(),
        ),
    ];
    let reps: usize = std::env::var("TIMING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(41);
    let rounds = 5;
    println!("| layer | ISA | threads | grad weight GFLOP/s | forward GFLOP/s | ratio |");
    println!("|---|---|---|---|---|---|");
    for (name, conv) in &layers {
        let g = *conv.geometry();
        let mut rng = Rng::new(1);
        let (x, w, dy) = (
            rng.vec(g.input_len()),
            rng.vec(g.weight_len()),
            rng.vec(g.output_len()),
        );
        let mut dw = vec![0.0; g.weight_len()];
        let mut y = vec![0.0; g.output_len()];
        for isa in [Isa::Avx512, Isa::Avx2] {
            if !isas_under_test().contains(&isa) {
                continue;
            }
            for threads in [1, 2] {
                let par = Parallelism::threads(threads);
                let o = options(Algorithm::DirectSimd).isa(isa).parallelism(par);
                let fo = ForwardOptions::new(Algorithm::DirectSimd)
                    .isa(isa)
                    .parallelism(par);
                let plan = conv.plan(&w, None, &fo).expect("forward plan");
                let mut ws = plan.workspace().expect("workspace");
                let (mut back, mut fwd) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    back.push(median_secs(reps, || {
                        conv.backward_weight(&x, &dy, &mut dw, &o).unwrap()
                    }));
                    fwd.push(median_secs(reps, || {
                        plan.forward_in(&x, &mut y, &mut ws).unwrap()
                    }));
                }
                back.sort_by(f64::total_cmp);
                fwd.sort_by(f64::total_cmp);
                let gf = |s: f64| conv.flops() as f64 / s / 1e9;
                let (b, f) = (gf(back[rounds / 2]), gf(fwd[rounds / 2]));
                println!(
                    "| {name} | {isa:?} | {threads} | {b:.1} | {f:.1} | {:.2} |",
                    b / f
                );
            }
        }
    }
}
