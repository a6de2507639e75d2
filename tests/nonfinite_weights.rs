//! Non-finite weights, against the documented rule that a tap falling in the
//! padding contributes nothing, whatever its weight (as the reference loops,
//! the SIMD direct kernels and PyTorch's default CPU path compute it).
//!
//! * A weight tap that is `+∞`, `−∞` or NaN and only ever meets zero
//!   padding leaves every output finite and equal to Direct's on every
//!   algorithm, ISA, backend, threading mode and entry point (one-shot,
//!   plan `forward`, plan `forward_in`): the GEMM lowerings, which would
//!   multiply the column matrix's zeros (`0 × ∞ = NaN`), hand such a call
//!   to `DirectSimd`, and the kernel trace shows it.
//! * An infinite tap that meets real input gives `±∞` (or NaN where `+∞`
//!   and `−∞` meet, or `∞` meets a real 0) in exactly the outputs the
//!   definition says, with the same sign on every path, even when the
//!   padding-only taps are NaN at the same time.
//! * Without padding the GEMM lowerings keep running (the trace shows their
//!   blocks) and agree with Direct on the same classification.
//!
//! The oracle is `common::conv_reference`, an f64 loop over the definition
//! that skips padding taps; finite outputs must lie within
//! `common::conv_bound` of it.

mod common;

use common::{algorithms, conv_bound, conv_reference, engine_combos, workspace, Rng};
use cpuconv::testing::{traced, Blocking, KernelTrace};
use cpuconv::{
    Algorithm, Conv2d, Conv2dParams, ConvGeometry, ConvMode, ForwardOptions, GemmBackend, Isa,
    Padding, Parallelism,
};

const BAD: [f32; 3] = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];

/// Padded convolutions where some taps only ever meet padding.
fn padded_shapes() -> Vec<(&'static str, Conv2dParams)> {
    vec![
        // A one-row image under a 3×3 window with padding 1: kernel rows 0
        // and 2 only meet the padding rows. 37 output columns.
        (
            "one-row image",
            Conv2dParams::new(2, 3, (1, 37), 4, (3, 3)).padding(Padding::symmetric(1, 1)),
        ),
        // A two-column image under a 5×5 window with padding 2: kernel
        // columns 0 and 4 only meet padding (in every row vector's edge
        // lanes of the SIMD kernel).
        (
            "two-column image",
            Conv2dParams::new(1, 4, (9, 2), 6, (5, 5)).padding(Padding::symmetric(2, 2)),
        ),
        // Dilated by the image size and padded by it on every side: only
        // the centre tap ever meets the image; a 5×19 output.
        (
            "dilated by the image",
            Conv2dParams::new(1, 3, (5, 19), 5, (3, 3))
                .dilation(5, 19)
                .padding(Padding::symmetric(5, 19)),
        ),
        // Depthwise (Auto picks the SIMD direct kernel anyway).
        (
            "depthwise one-row",
            Conv2dParams::new(1, 8, (1, 21), 8, (3, 3))
                .padding(Padding::symmetric(1, 1))
                .groups(8),
        ),
        // Depthwise rows narrower than 14: channels in lanes, whose edge
        // pixels skip their padding taps.
        (
            "depthwise in lanes",
            Conv2dParams::new(1, 20, (1, 7), 20, (3, 3))
                .padding(Padding::symmetric(1, 1))
                .groups(20),
        ),
        // Only top padding: window row 0 is padding-only; in true
        // convolution that is weight row 1 (the kernel is flipped).
        (
            "flipped, top padding",
            Conv2dParams::new(1, 2, (1, 17), 3, (2, 3))
                .padding(Padding::explicit(1, 0, 1, 1))
                .mode(ConvMode::Convolution),
        ),
        // Stride 2 with two rows of top padding: window rows 0 and 1 only
        // meet padding.
        (
            "strided",
            Conv2dParams::new(1, 3, (2, 23), 4, (3, 3))
                .stride(2, 2)
                .padding(Padding::explicit(2, 0, 1, 1)),
        ),
    ]
}

/// Unpadded convolutions: every tap meets real input.
fn unpadded_shapes() -> Vec<(&'static str, Conv2dParams)> {
    vec![
        ("3x3", Conv2dParams::new(2, 4, (6, 21), 5, (3, 3))),
        // The input planes are the GEMM's B as they stand.
        ("pointwise", Conv2dParams::new(1, 6, (5, 10), 40, (1, 1))),
        (
            "strided dilated",
            Conv2dParams::new(1, 3, (11, 30), 7, (3, 2))
                .stride(2, 3)
                .dilation(2, 1),
        ),
    ]
}

/// Whether window offset `r` of an axis meets the image for some output.
fn offset_meets_image(
    r: usize,
    out: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    len: usize,
) -> bool {
    (0..out).any(|o| {
        let i = (o * stride + r * dilation) as isize - pad as isize;
        i >= 0 && i < len as isize
    })
}

/// Weight indices (into `[K, C/g, R, S]`) of every tap that only ever
/// meets padding: a window row or column that never lands on the image,
/// mapped to its weight tap (flipped for true convolution).
fn padding_only_taps(g: &ConvGeometry) -> Vec<usize> {
    let mut taps = Vec::new();
    for r in 0..g.kernel_h {
        for s in 0..g.kernel_w {
            let row =
                offset_meets_image(r, g.out_h, g.stride_h, g.dilation_h, g.padding.top, g.in_h);
            let col =
                offset_meets_image(s, g.out_w, g.stride_w, g.dilation_w, g.padding.left, g.in_w);
            if row && col {
                continue;
            }
            let (wr, ws) = g.weight_tap(r, s);
            for k in 0..g.out_channels {
                for c in 0..g.channels_per_group() {
                    taps.push(
                        ((k * g.channels_per_group() + c) * g.kernel_h + wr) * g.kernel_w + ws,
                    );
                }
            }
        }
    }
    taps
}

/// Checks `got` against the reference: NaN where it is NaN, the same
/// infinity where it is infinite, and within the bound elsewhere.
fn check(what: &str, got: &[f32], value: &[f64], magnitude: &[f64], gemm_k: usize) {
    assert_eq!(got.len(), value.len(), "{what}");
    for (i, (&v, &want)) in got.iter().zip(value).enumerate() {
        if want.is_nan() {
            assert!(v.is_nan(), "{what}: element {i} is {v}, want NaN");
        } else if want.is_infinite() {
            assert_eq!(v as f64, want, "{what}: element {i}");
        } else {
            let tol = conv_bound(gemm_k, magnitude[i]);
            assert!(
                v.is_finite() && (v as f64 - want).abs() <= tol,
                "{what}: element {i} is {v}, want {want} (±{tol})"
            );
        }
    }
}

/// What a sequential call must have run: `DirectSimd` where `resolved` is
/// it (no GEMM block), the native GEMM where it is a GEMM lowering on the
/// native backend (no SIMD direct job); nothing on another ISA.
fn check_trace(what: &str, resolved: Algorithm, isa: Isa, backend: GemmBackend, t: &KernelTrace) {
    let blocks: u64 = t.gemm_blocks.iter().sum();
    let jobs: u64 = t.direct_simd_jobs.iter().sum();
    match resolved {
        Algorithm::DirectSimd | Algorithm::DirectDense => {
            assert!(
                t.direct_simd_ran_on(isa),
                "{what}: no {isa} SIMD job: {t:?}"
            );
            assert_eq!(blocks, 0, "{what}: GEMM blocks ran: {t:?}");
        }
        Algorithm::Im2col | Algorithm::Implicit if backend == GemmBackend::Native => {
            assert!(t.gemm_ran_on(isa), "{what}: no {isa} GEMM block: {t:?}");
            assert_eq!(jobs, 0, "{what}: SIMD direct jobs ran: {t:?}");
        }
        _ => assert_eq!(blocks + jobs, 0, "{what}: {t:?}"),
    }
    for other in Isa::ALL.into_iter().filter(|&o| o != isa) {
        assert!(!t.ran_on(other), "{what}: {other} ran: {t:?}");
    }
}

/// The algorithm a call asked to run `algorithm` must run: `Auto` resolved,
/// and for a padded convolution with a non-finite weight the GEMM
/// lowerings and `DirectDense` replaced by `DirectSimd`.
fn expected_algorithm(conv: &Conv2d, algorithm: Algorithm, isa: Isa, nonfinite: bool) -> Algorithm {
    let a = match algorithm {
        Algorithm::Auto => conv.auto_algorithm_for(isa),
        a => a,
    };
    let padded = conv.padding() != Padding::ZERO;
    let multiplies_padding = matches!(
        a,
        Algorithm::Im2col | Algorithm::Implicit | Algorithm::DirectDense
    );
    if nonfinite && padded && multiplies_padding {
        Algorithm::DirectSimd
    } else {
        a
    }
}

/// Runs every path on `weight` and checks each output against the
/// reference (and the kernels each sequential call ran).
fn check_every_path(name: &str, conv: &Conv2d, input: &[f32], weight: &[f32], bias: &[f32]) {
    let g = *conv.geometry();
    let (value, magnitude) = conv_reference(&g, input, weight, Some(bias));
    let nonfinite = weight.iter().any(|w| !w.is_finite());
    let mut out = vec![0.0f32; g.output_len()];
    for algorithm in algorithms() {
        for (isa, backend, parallelism) in engine_combos() {
            let resolved = expected_algorithm(conv, algorithm, isa, nonfinite);
            let base = ForwardOptions::new(algorithm)
                .parallelism(parallelism)
                .backend(backend)
                .isa(isa);
            // On the native engine also with blocks small enough that the
            // GEMMs span several K, M and N blocks.
            let mut variants = vec![base];
            if backend == GemmBackend::Native {
                variants.push(base.blocking(Blocking {
                    mc: 8,
                    kc: 8,
                    nc: 32,
                }));
            }
            for options in variants {
                let sequential = parallelism == Parallelism::Sequential;
                let what = format!("{name} {options:?}");
                out.fill(-7.0);
                let (r, t) =
                    traced(|| conv.forward_with(input, weight, Some(bias), &mut out, &options));
                r.unwrap_or_else(|e| panic!("{what}: {e}"));
                check(
                    &format!("forward_with {what}"),
                    &out,
                    &value,
                    &magnitude,
                    g.gemm_k(),
                );
                if sequential {
                    check_trace(&what, resolved, isa, backend, &t);
                }

                let plan = conv
                    .plan(weight, Some(bias), &options)
                    .unwrap_or_else(|e| panic!("plan {what}: {e}"));
                assert_eq!(plan.algorithm(), resolved, "plan {what}");
                out.fill(-7.0);
                let (r, t) = traced(|| plan.forward(input, &mut out));
                r.unwrap_or_else(|e| panic!("plan.forward {what}: {e}"));
                check(
                    &format!("plan.forward {what}"),
                    &out,
                    &value,
                    &magnitude,
                    g.gemm_k(),
                );
                if sequential {
                    check_trace(&what, resolved, isa, backend, &t);
                }
                let mut ws = workspace(&plan);
                out.fill(-7.0);
                let (r, t) = traced(|| plan.forward_in(input, &mut out, &mut ws));
                r.unwrap_or_else(|e| panic!("plan.forward_in {what}: {e}"));
                check(
                    &format!("plan.forward_in {what}"),
                    &out,
                    &value,
                    &magnitude,
                    g.gemm_k(),
                );
                // forward_in runs on the calling thread whatever the setting.
                check_trace(&what, resolved, isa, backend, &t);
            }
        }
    }
}

#[test]
fn nonfinite_taps_that_meet_only_padding_contribute_nothing() {
    for (name, params) in padded_shapes() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let taps = padding_only_taps(&g);
        assert!(!taps.is_empty(), "{name}: no padding-only tap");
        assert!(taps.len() < g.weight_len(), "{name}: every tap is padding");
        let mut rng = Rng::new(3);
        let input = rng.vec(g.input_len());
        let finite = rng.vec(g.weight_len());
        let bias = rng.vec(g.out_channels);
        let mut zeroed = finite.clone();
        for &t in &taps {
            zeroed[t] = 0.0;
        }
        let direct_zeroed = conv
            .forward_to_vec(&input, &zeroed, Some(&bias), Algorithm::Direct)
            .unwrap();
        for bad in BAD {
            let mut weight = finite.clone();
            for &t in &taps {
                weight[t] = bad;
            }
            // Direct skips the padding taps: bit for bit the result of
            // zero weights there.
            let direct = conv
                .forward_to_vec(&input, &weight, Some(&bias), Algorithm::Direct)
                .unwrap();
            assert!(
                direct
                    .iter()
                    .zip(&direct_zeroed)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {bad}: Direct differs from zero padding taps"
            );
            check_every_path(&format!("{name} {bad}"), &conv, &input, &weight, &bias);
        }
    }
}

/// One tap of output channel 0 that meets real input made infinite (or
/// NaN): that channel's outputs are ±∞ by the sign of the pixel it meets
/// (NaN where it meets NaN or a real 0), the other channels stay finite, on
/// every path; with the padding-only taps NaN at the same time, nothing
/// changes.
#[test]
fn nonfinite_taps_that_meet_real_input_give_the_same_infinities_everywhere() {
    for (name, params) in padded_shapes().into_iter().chain(unpadded_shapes()) {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let padding_taps = padding_only_taps(&g);
        // The first tap of output channel 0 that is not padding-only.
        let tap = (0..g.gemm_k())
            .find(|t| !padding_taps.contains(t))
            .expect("a tap that meets the image");
        let mut rng = Rng::new(9);
        let input = rng.vec(g.input_len());
        let finite = rng.vec(g.weight_len());
        let bias = rng.vec(g.out_channels);
        for bad in BAD {
            for poison_padding in [false, true] {
                if poison_padding && padding_taps.is_empty() {
                    continue;
                }
                let mut weight = finite.clone();
                weight[tap] = bad;
                if poison_padding {
                    for &t in &padding_taps {
                        weight[t] = f32::NAN;
                    }
                }
                let (value, _) = conv_reference(&g, &input, &weight, Some(&bias));
                let plane = g.out_plane();
                let channel = |i: usize| (i / plane) % g.out_channels;
                // Channel 0 non-finite everywhere the tap meets the image,
                // with both signs of infinity for an infinite tap (the
                // pixels are random in [−1, 1)); every other channel finite.
                assert!(value
                    .iter()
                    .enumerate()
                    .all(|(i, v)| channel(i) == 0 || v.is_finite()));
                let hit = value.iter().filter(|v| !v.is_finite()).count();
                assert!(hit > 0, "{name}: the tap meets nothing");
                if !bad.is_nan() {
                    assert!(value.contains(&f64::INFINITY), "{name}: no +∞");
                    assert!(value.contains(&f64::NEG_INFINITY), "{name}: no −∞");
                }
                let what = format!("{name} tap {tap} = {bad}, padding NaN: {poison_padding}");
                check_every_path(&what, &conv, &input, &weight, &bias);
            }
        }
    }
}

/// Without padding nothing can meet a zero of the column matrix that is
/// not a real pixel, so the GEMM lowerings keep computing calls with
/// infinite and NaN weights (the traces in `check_every_path` show their
/// blocks and the plans keep their algorithm) and agree with Direct.
#[test]
fn unpadded_convolutions_keep_the_gemm_lowerings() {
    for (name, params) in unpadded_shapes() {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        assert!(padding_only_taps(&g).is_empty());
        let mut rng = Rng::new(13);
        let input = rng.vec(g.input_len());
        let mut weight = rng.vec(g.weight_len());
        let bias = rng.vec(g.out_channels);
        // +∞ in channel 0, −∞ in channel 1, NaN in the last channel.
        let k = g.gemm_k();
        weight[k / 2] = f32::INFINITY;
        weight[k + k / 3] = f32::NEG_INFINITY;
        weight[(g.out_channels - 1) * k] = f32::NAN;
        for algorithm in [Algorithm::Im2col, Algorithm::Implicit] {
            assert_eq!(
                expected_algorithm(&conv, algorithm, cpuconv::isa(), true),
                algorithm
            );
        }
        check_every_path(name, &conv, &input, &weight, &bias);
    }
}
