//! `Algorithm::Implicit` for grad weight (`Conv2d::backward_weight`)
//! against the `Direct` reference:
//!
//! * a property test on random shapes (stride, asymmetric padding,
//!   dilation, groups, batch, both modes) on every ISA under test, both
//!   GEMM backends, 1 and 2 threads, accumulate on and off, with small
//!   forced blockings so that every block edge is crossed; on sequential
//!   native calls the kernel trace shows the forced ISA's GEMM ran. The
//!   tolerance is `tests/backward.rs`'s for `Im2col`
//!   (`common::grads::assert_close`, where it is derived): per element
//!   `2·(T + 1)·ε·M` with `T = N·OH·OW` terms and `M` the sum of their
//!   magnitudes (Direct on `|x|`, `|dy|`), plus `ε·(|start| + |want|)` for
//!   the final add when accumulating;
//! * bitwise reproducibility: two runs give the same bits, and so do 1 and
//!   2 threads (the threads split dW, never the sum over the batch);
//! * a timing harness (`#[ignore]`, run with `--release`), Implicit against
//!   Im2col and the forward plan on the suite's layers.

mod common;

use common::grads::{assert_close, build, cases, weight_magnitudes, Case, Shapes};
use common::{bits, proptest_config, Rng};
use cpuconv::gemm::kernels::kernel_info;
use cpuconv::testing::{isas_under_test, traced, Blocking};
use cpuconv::{
    Algorithm, BackwardOptions, Conv2dParams, ConvMode, ForwardOptions, GemmBackend, Isa, Padding,
    Parallelism,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::time::Instant;

/// Shapes a little larger than `tests/backward.rs`'s, so that several tap,
/// channel and depth blocks occur under the small forced blockings (an MC
/// of 8 rows, a KC of 8–24, an NC of one or two panels).
fn case_strategy() -> impl Strategy<Value = Case> {
    cases(Shapes {
        batch: 1..=3,
        channels_per_group: 1..=6,
        groups: 1..=2,
        out_per_group: 1..=40,
        input: 1..=14,
        blocking: prop_oneof![
            Just(None),
            (1usize..=16, 8usize..=24, 1usize..=64).prop_map(|(mc, kc, nc)| Some(Blocking {
                mc,
                kc,
                nc
            })),
        ]
        .boxed(),
        ..Shapes::small()
    })
}

/// Implicit against Direct for `case` on every ISA, both backends, 1 and
/// 2 threads, accumulate on and off; the trace shows the forced ISA ran;
/// 1 and 2 threads give the same bits, and so does a second run. With
/// `force_bands`, the band path wherever the shape allows it, on every ISA.
fn check_against_direct(case: &Case, force_bands: bool) -> Result<(), TestCaseError> {
    let conv = build(case)?;
    let g = *conv.geometry();
    let mut rng = Rng::new(case.seed);
    let x = rng.vec(g.input_len());
    let dy = rng.vec(g.output_len());
    let start = rng.vec(g.weight_len());
    let zeros = vec![0.0; g.weight_len()];
    let reference = BackwardOptions::new(Algorithm::Direct);
    let magnitude = weight_magnitudes(&conv, &x, &dy);
    let mut want = vec![0.0; g.weight_len()];
    conv.backward_weight(&x, &dy, &mut want, &reference)
        .unwrap();
    let mut want_acc = start.clone();
    conv.backward_weight(&x, &dy, &mut want_acc, &reference.accumulate(true))
        .unwrap();
    let terms = g.batch * g.out_h * g.out_w;

    for isa in isas_under_test() {
        for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
            let mut first: Option<Vec<u32>> = None;
            for threads in [1, 2] {
                let mut o = BackwardOptions::new(Algorithm::Implicit)
                    .isa(isa)
                    .backend(backend)
                    .parallelism(Parallelism::threads(threads))
                    .force_bands(force_bands);
                if let Some(b) = case.blocking {
                    o = o.blocking(b);
                }
                let what = format!("{case:?} {isa:?} {backend:?} {threads} threads");
                let mut dw = vec![f32::NAN; g.weight_len()];
                let ((), trace) = traced(|| conv.backward_weight(&x, &dy, &mut dw, &o).unwrap());
                assert_close(
                    &format!("grad weight {what}"),
                    &dw,
                    &want,
                    &magnitude,
                    &zeros,
                    terms,
                )?;
                if backend == GemmBackend::Native && threads == 1 {
                    prop_assert!(
                        trace.gemm_ran_on(isa),
                        "{what}: no {isa:?} GEMM in {trace:?}"
                    );
                }
                let mut again = vec![f32::NAN; g.weight_len()];
                conv.backward_weight(&x, &dy, &mut again, &o).unwrap();
                prop_assert_eq!(bits(&again), bits(&dw), "{}: a second run differs", what);
                match &first {
                    None => first = Some(bits(&dw)),
                    Some(one) => {
                        prop_assert_eq!(one, &bits(&dw), "{}: 1 and 2 threads differ", what)
                    }
                }
                let mut acc = start.clone();
                conv.backward_weight(&x, &dy, &mut acc, &o.accumulate(true))
                    .unwrap();
                assert_close(
                    &format!("accumulated grad weight {what}"),
                    &acc,
                    &want_acc,
                    &magnitude,
                    &start,
                    terms,
                )?;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(64))]

    /// Implicit against Direct on every ISA, both backends, 1 and 2
    /// threads, accumulate on and off; the trace shows the forced ISA ran;
    /// 1 and 2 threads give the same bits, and so does a second run.
    #[test]
    fn implicit_matches_direct(case in case_strategy()) {
        check_against_direct(&case, false)?;
    }
}

/// The unpadded stride-1 1×1 kernel, whose chunks read the input planes in
/// place (one image each), on every ISA and backend, 1 and 2 threads,
/// several images, planes that do and do not fill whole chunks, groups,
/// accumulate on and off, with and without a small forced blocking.
#[test]
fn pointwise_matches_direct() {
    for (batch, c, hw, k, groups) in [
        (1, 3, (5, 7), 5, 1),
        (3, 16, (9, 9), 24, 2),
        (2, 40, (4, 13), 33, 1),
        (4, 8, (1, 1), 8, 4),
    ] {
        for blocking in [
            None,
            Some(Blocking {
                mc: 8,
                kc: 8,
                nc: 16,
            }),
        ] {
            let case = Case {
                batch,
                channels_per_group: c / groups,
                groups,
                out_per_group: k / groups,
                kernel: (1, 1),
                stride: (1, 1),
                dilation: (1, 1),
                padding: Padding::ZERO,
                input: hw,
                mode: ConvMode::CrossCorrelation,
                blocking,
                seed: (batch * 1000 + c) as u64,
            };
            check_against_direct(&case, false).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

// --- timing ------------------------------------------------------------------------------

/// `(name, [N, C, H, W], K, kernel, stride, pad, dilation)`.
type Layer = (&'static str, [usize; 4], usize, usize, usize, usize, usize);

/// The layers of `tools/src/suite.rs` that lower to a GEMM, plus the
/// 512-channel 7² stage-5 3×3 and a 64-channel batch of 16.
#[rustfmt::skip]
const LAYERS: &[Layer] = &[
    ("r50_conv1",   [1,   3, 224, 224],   64, 7, 2, 3, 1),
    ("r50_3x3",     [1,  64,  56,  56],   64, 3, 1, 1, 1),
    ("r50_1x1",     [1, 256,  56,  56],   64, 1, 1, 0, 1),
    ("r50_3x3_s2",  [1, 128,  56,  56],  128, 3, 2, 1, 1),
    ("r50_deep",    [1, 256,  14,  14],  256, 3, 1, 1, 1),
    ("r50_deep7",   [1, 512,   7,   7],  512, 3, 1, 1, 1),
    ("r50_last1x1", [1, 512,   7,   7], 2048, 1, 1, 0, 1),
    ("dilated",     [1,  64,  56,  56],   64, 3, 1, 2, 2),
    ("batch16",     [16, 32,  32,  32],   64, 3, 1, 1, 1),
    ("batch16_64",  [16, 64,  28,  28],   64, 3, 1, 1, 1),
];

/// Median seconds of `runs` calls of each candidate, the candidates
/// interleaved call by call.
fn medians(runs: usize, candidates: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut times = vec![Vec::with_capacity(runs); candidates.len()];
    for f in candidates.iter_mut() {
        f();
    }
    for _ in 0..runs {
        for (f, t) in candidates.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f();
            t.push(start.elapsed().as_secs_f64());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// GFLOP/s (the forward's FLOPs) of grad weight Implicit and Im2col and of
/// the forward plan (Implicit), per layer. `GW_ISA` (avx512, avx2,
/// portable), `GW_THREADS` (default 1), `GW_RUNS` (default 15) and
/// `GW_LAYERS` (comma-separated names) choose what runs:
///
/// Shapes the band path takes (`conv::grad_weight_bands`: at least 16
/// input channels per group, a depth `N·OH·OW` of at least 384, junk
/// columns at most 1/8 of the depth) and some just outside it: strides 1–2,
/// dilations 1–2, asymmetric padding, both modes, 1–2 groups, batches
/// crossing images, forced blockings whose KC cuts a chunk into one output
/// row or less.
fn band_case_strategy() -> impl Strategy<Value = Case> {
    cases(Shapes {
        batch: 1..=2,
        channels_per_group: 16..=20,
        groups: 1..=2,
        out_per_group: 1..=36,
        kernel: 1..=3,
        stride: 1..=2,
        dilation: 1..=2,
        padding: 0..=2,
        input: 16..=30,
        blocking: prop_oneof![
            Just(None),
            (8usize..=32, 8usize..=40, 1usize..=64).prop_map(|(mc, kc, nc)| Some(Blocking {
                mc,
                kc,
                nc
            })),
        ]
        .boxed(),
    })
}

proptest! {
    #![proptest_config(proptest_config(12))]

    /// The band path against Direct, with everything `implicit_matches_direct`
    /// checks (every ISA, both backends, 1 and 2 threads, accumulate, the
    /// same bits from 1 and 2 threads and from a second run).
    #[test]
    fn bands_match_direct(case in band_case_strategy()) {
        check_against_direct(&case, true)?;
    }
}

/// Layers the band path must take (the trace shows it ran) and get right,
/// forced on every ISA: the 56² 3×3 layer scaled down, stride 2, dilation
/// 2 with asymmetric padding, convolution mode with groups, a batch whose
/// images each span several chunks under a small KC, and stride 3 across.
/// Unforced, the bands run only on kernel tiles whose B rows are a pair
/// of cache lines (32 floats: AVX-512), the column chunk elsewhere.
#[test]
fn bands_run_and_match_direct() {
    let layers = [
        Conv2dParams::new(1, 16, (24, 24), 24, (3, 3)).padding(Padding::symmetric(1, 1)),
        Conv2dParams::new(1, 24, (48, 46), 16, (3, 3))
            .stride(2, 2)
            .padding(Padding::symmetric(1, 1)),
        Conv2dParams::new(2, 16, (20, 40), 8, (3, 3))
            .dilation(2, 2)
            .padding(Padding::explicit(2, 1, 0, 3)),
        Conv2dParams::new(1, 32, (28, 28), 40, (3, 2))
            .groups(2)
            .mode(ConvMode::Convolution)
            .padding(Padding::explicit(0, 1, 1, 0)),
        Conv2dParams::new(5, 16, (12, 20), 12, (2, 2)).stride(1, 2),
        // Stride 3 across with dilation 2, stride 2 down, padding on three
        // sides: the band's rows hold every column, read every third float.
        Conv2dParams::new(2, 16, (23, 61), 16, (4, 3))
            .stride(2, 3)
            .dilation(1, 2)
            .padding(Padding::explicit(2, 0, 1, 3)),
    ];
    for (i, params) in layers.into_iter().enumerate() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(40 + i as u64);
        let x = rng.vec(g.input_len());
        let dy = rng.vec(g.output_len());
        let mut want = vec![0.0; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut want, &BackwardOptions::new(Algorithm::Direct))
            .unwrap();
        let magnitude = weight_magnitudes(&conv, &x, &dy);
        let zeros = vec![0.0; g.weight_len()];
        for isa in isas_under_test() {
            for blocking in [
                None,
                Some(Blocking {
                    mc: 8,
                    kc: 16,
                    nc: 32,
                }),
            ] {
                for force in [true, false] {
                    let mut o = BackwardOptions::new(Algorithm::Implicit)
                        .isa(isa)
                        .parallelism(Parallelism::Sequential)
                        .force_bands(force);
                    if let Some(b) = blocking {
                        o = o.blocking(b);
                    }
                    let mut dw = vec![f32::NAN; g.weight_len()];
                    let ((), trace) =
                        traced(|| conv.backward_weight(&x, &dy, &mut dw, &o).unwrap());
                    let what = format!("layer {i} {isa:?} {blocking:?} forced {force}");
                    // AVX-512's tiles (32 or 48 columns); see `bands_pay_on`.
                    let bands = force || kernel_info(isa).nr >= 32;
                    assert_eq!(
                        trace.grad_weight_bands,
                        u64::from(bands),
                        "{what}: {trace:?}"
                    );
                    assert_close(
                        &what,
                        &dw,
                        &want,
                        &magnitude,
                        &zeros,
                        g.batch * g.out_h * g.out_w,
                    )
                    .unwrap();
                }
            }
        }
    }
}

/// An infinity in the input keeps the band path out (its junk would
/// multiply the infinity by zero into taps that never read it): every
/// element of dW that Direct computes finite is finite and close, the
/// others are infinite or NaN as Direct's are.
#[test]
fn non_finite_input_leaves_no_nan_in_taps_that_never_read_it() {
    let conv = Conv2dParams::new(1, 16, (24, 24), 8, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let mut rng = Rng::new(7);
    let mut x = rng.vec(g.input_len());
    // Last column of row 5 of channel 3: taps with s = 0 never read it.
    x[3 * 24 * 24 + 5 * 24 + 23] = f32::INFINITY;
    let dy = rng.vec(g.output_len());
    let mut want = vec![0.0; g.weight_len()];
    conv.backward_weight(&x, &dy, &mut want, &BackwardOptions::new(Algorithm::Direct))
        .unwrap();
    let finite = want.iter().filter(|v| v.is_finite()).count();
    assert!(
        finite > 0 && finite < want.len(),
        "{finite} finite of {}",
        want.len()
    );
    for isa in isas_under_test() {
        let o = BackwardOptions::new(Algorithm::Implicit)
            .isa(isa)
            .parallelism(Parallelism::Sequential)
            .force_bands(true);
        let mut dw = vec![0.0; g.weight_len()];
        let ((), trace) = traced(|| conv.backward_weight(&x, &dy, &mut dw, &o).unwrap());
        assert_eq!(trace.grad_weight_bands, 0, "{isa:?}: {trace:?}");
        assert!(trace.gemm_ran_on(isa), "{isa:?}: {trace:?}");
        for (i, (&got, &exp)) in dw.iter().zip(&want).enumerate() {
            if exp.is_finite() {
                assert!(
                    (got - exp).abs() <= 1e-3 * (1.0 + exp.abs()),
                    "{isa:?}: dW[{i}] = {got}, want {exp}"
                );
            } else {
                assert!(!got.is_finite(), "{isa:?}: dW[{i}] = {got}, want {exp}");
            }
        }
    }
}

/// `cargo test --release --test grad_weight -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing() {
    let isa = std::env::var("GW_ISA")
        .ok()
        .and_then(|s| Isa::from_name(&s))
        .unwrap_or_else(cpuconv::isa);
    let threads: usize = std::env::var("GW_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let runs: usize = std::env::var("GW_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let only = std::env::var("GW_LAYERS").ok();
    let par = Parallelism::threads(threads);
    println!("isa {isa:?}, {threads} thread(s), median of {runs}; GFLOP/s");
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>7}",
        "layer", "implicit", "im2col", "forward", "ratio"
    );
    for &(name, [n, c, h, w], k, r, s, p, d) in LAYERS {
        if let Some(only) = &only {
            if !only.split(',').any(|x| x == name) {
                continue;
            }
        }
        let conv = Conv2dParams::new(n, c, (h, w), k, (r, r))
            .stride(s, s)
            .padding(Padding::explicit(p, p, p, p))
            .dilation(d, d)
            .build()
            .unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(7);
        let x = rng.vec(g.input_len());
        let wt = rng.vec(g.weight_len());
        let dy = rng.vec(g.output_len());
        let mut dw = vec![0.0; g.weight_len()];
        let mut dw2 = vec![0.0; g.weight_len()];
        let mut y = vec![0.0; g.output_len()];
        let implicit = BackwardOptions::new(Algorithm::Implicit)
            .isa(isa)
            .parallelism(par);
        let im2col = BackwardOptions::new(Algorithm::Im2col)
            .isa(isa)
            .parallelism(par);
        let plan = conv
            .plan(
                &wt,
                None,
                &ForwardOptions::new(Algorithm::Implicit)
                    .isa(isa)
                    .parallelism(par),
            )
            .unwrap();
        if std::env::var("GW_ONLY_IMPLICIT").is_ok() {
            let t = medians(
                runs,
                &mut [&mut || conv.backward_weight(&x, &dy, &mut dw, &implicit).unwrap()],
            );
            println!("{name:<12} {:>9.1}", conv.flops() as f64 / t[0] / 1e9);
            continue;
        }
        let t = medians(
            runs,
            &mut [
                &mut || conv.backward_weight(&x, &dy, &mut dw, &implicit).unwrap(),
                &mut || conv.backward_weight(&x, &dy, &mut dw2, &im2col).unwrap(),
                &mut || plan.forward(&x, &mut y).unwrap(),
            ],
        );
        let gf = |t: f64| conv.flops() as f64 / t / 1e9;
        println!(
            "{name:<12} {:>9.1} {:>9.1} {:>9.1} {:>7.2}",
            gf(t[0]),
            gf(t[1]),
            gf(t[2]),
            t[2] / t[0]
        );
    }
}
