//! Planning by measurement (`PlanEffort::Measure`) and the wisdom: measured
//! plans compute what the reference computes, pick one of their candidates
//! (on an AVX-512 CPU, the AVX2 kernels among them unless a path is
//! forced), and their choices survive an export and an import; malformed
//! wisdom is a `ConvError`, never a panic; `Estimate` plans are what they
//! were.
//!
//! The wisdom is one store per process and the tests of this file run on
//! parallel threads: each test plans its own layer shapes (no two tests
//! share one), and the tests that read the store's state or empty it hold
//! `STORE` while they do.

mod common;

use common::{conv_bound, conv_reference, Rng};
use cpuconv::{
    wisdom, Algorithm, ChoiceSource, Conv2d, Conv2dParams, ConvError, ConvTranspose2d,
    ConvTranspose2dParams, ForwardOptions, Isa, Padding, Parallelism, PlanEffort,
};
use std::sync::{Mutex, MutexGuard, PoisonError};

static STORE: Mutex<()> = Mutex::new(());

fn hold_store() -> MutexGuard<'static, ()> {
    STORE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pool of `threads` threads, so thread caps do not depend on the machine.
fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn measure() -> ForwardOptions {
    ForwardOptions::new(Algorithm::Auto).effort(PlanEffort::Measure)
}

/// The algorithms a Measure plan of `conv` under `Auto` may pick: Auto's
/// own and every fast path (not the reference loops, unless Auto picks them).
fn allowed(conv: &Conv2d, algorithm: Algorithm) -> bool {
    algorithm == conv.auto_algorithm()
        || (algorithm != Algorithm::Direct && Algorithm::CONCRETE.contains(&algorithm))
}

/// Plans `conv` with `options` on `w`, `b` and checks it on `x` against the
/// definition (and Direct's output), within `conv_bound`.
fn check_plan(conv: &Conv2d, options: &ForwardOptions, seed: u64) -> cpuconv::PlanChoice {
    let g = *conv.geometry();
    let mut rng = Rng::new(seed);
    let x = rng.vec(g.input_len());
    let w = rng.vec(g.weight_len());
    let b = rng.vec(g.out_channels);
    let plan = conv.plan(&w, Some(&b), options).unwrap();
    let mut got = vec![f32::NAN; g.output_len()];
    plan.forward(&x, &mut got).unwrap();
    let direct = conv
        .forward_to_vec(&x, &w, Some(&b), Algorithm::Direct)
        .unwrap();
    let (want, magnitude) = conv_reference(&g, &x, &w, Some(&b));
    let k = g.channels_per_group() * g.kernel_h * g.kernel_w;
    for i in 0..got.len() {
        let tol = conv_bound(k, magnitude[i]);
        assert!(
            (f64::from(got[i]) - want[i]).abs() <= tol
                && (f64::from(got[i]) - f64::from(direct[i])).abs() <= tol,
            "{:?}: output {i}: {} vs reference {} (direct {}), tolerance {tol}",
            plan.choice(),
            got[i],
            want[i],
            direct[i]
        );
    }
    assert_eq!(plan.algorithm(), plan.choice().algorithm);
    assert_eq!(plan.isa(), plan.choice().isa);
    plan.choice()
}

/// The paths a Measure plan with the path left open may run: this CPU's,
/// and AVX2 where that is AVX-512.
fn open_paths() -> Vec<Isa> {
    match this_isa() {
        Isa::Avx512 if Isa::Avx2.is_supported() => vec![Isa::Avx512, Isa::Avx2],
        isa => vec![isa],
    }
}

/// Layers of every kind Auto distinguishes, each shape used by this test only.
fn layers() -> Vec<Conv2d> {
    [
        // Dense 3×3 (DirectDense's), padded.
        Conv2dParams::new(1, 16, (9, 11), 24, (3, 3)).padding(Padding::symmetric(1, 1)),
        // 1×1 (Implicit's).
        Conv2dParams::new(2, 40, (6, 6), 48, (1, 1)),
        // Depthwise (DirectSimd's), strided, flipped.
        Conv2dParams::new(1, 12, (13, 10), 12, (3, 3))
            .groups(12)
            .stride(2, 1)
            .padding(Padding::explicit(1, 0, 2, 1))
            .mode(cpuconv::ConvMode::Convolution),
        // Tiny (Direct's).
        Conv2dParams::new(1, 1, (5, 5), 2, (2, 2)),
    ]
    .into_iter()
    .map(|p| p.build().unwrap())
    .collect()
}

#[test]
fn measured_plans_match_the_reference_and_pick_a_candidate() {
    // The second plan of each layer must find the first's choice.
    let _store = hold_store();
    for threads in [1, 2] {
        pool(threads).install(|| {
            for (i, conv) in layers().iter().enumerate() {
                let choice = check_plan(conv, &measure(), 10 + i as u64);
                assert!(
                    matches!(choice.source, ChoiceSource::Measured | ChoiceSource::Wisdom),
                    "{choice:?}"
                );
                assert!(allowed(conv, choice.algorithm), "{choice:?}");
                assert!(
                    choice.threads == 1 || choice.threads == threads,
                    "{choice:?}"
                );
                assert!(open_paths().contains(&choice.isa), "{choice:?}");
                // A second plan of the layer agrees with the first.
                let again = check_plan(conv, &measure(), 20 + i as u64);
                assert_eq!(again.source, ChoiceSource::Wisdom);
                assert_eq!(
                    (again.algorithm, again.threads, again.isa),
                    (choice.algorithm, choice.threads, choice.isa)
                );
            }
        });
    }
}

#[test]
fn estimate_plans_are_unchanged() {
    let shapes = [
        Conv2dParams::new(1, 16, (9, 12), 24, (3, 3)).padding(Padding::symmetric(1, 1)),
        Conv2dParams::new(2, 40, (6, 7), 48, (1, 1)),
        Conv2dParams::new(1, 12, (13, 11), 12, (3, 3)).groups(12),
        Conv2dParams::new(1, 1, (5, 6), 2, (2, 2)),
    ];
    pool(2).install(|| {
        for p in shapes {
            let conv = p.build().unwrap();
            for options in [
                ForwardOptions::new(Algorithm::Auto),
                ForwardOptions::new(Algorithm::Auto).effort(PlanEffort::Estimate),
            ] {
                let choice = check_plan(&conv, &options, 3);
                assert_eq!(choice.algorithm, conv.auto_algorithm());
                assert_eq!(choice.threads, 2);
                assert_eq!(choice.isa, this_isa());
                assert_eq!(choice.source, ChoiceSource::Estimate);
            }
        }
    });
}

#[test]
fn an_explicit_algorithm_is_honoured() {
    let conv = Conv2dParams::new(1, 16, (9, 13), 24, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    for algorithm in [Algorithm::Im2col, Algorithm::DirectSimd] {
        let options = measure().algorithm(algorithm);
        // One thread allowed and the path forced: nothing to measure.
        let options_1 = options.parallelism(Parallelism::Sequential);
        let choice = check_plan(&conv, &options_1.isa(this_isa()), 4);
        assert_eq!(
            (choice.algorithm, choice.threads, choice.source),
            (algorithm, 1, ChoiceSource::Estimate)
        );
        // The path left open: measured where there are two.
        let choice = check_plan(&conv, &options_1, 4);
        assert_eq!((choice.algorithm, choice.threads), (algorithm, 1));
        assert!(open_paths().contains(&choice.isa), "{choice:?}");
        let source = if open_paths().len() > 1 {
            ChoiceSource::Measured
        } else {
            ChoiceSource::Estimate
        };
        assert_eq!(choice.source, source);
        // Two: the thread split is measured, the algorithm kept.
        let choice = pool(2).install(|| check_plan(&conv, &options, 5));
        assert_eq!(choice.algorithm, algorithm);
        assert!(matches!(
            choice.source,
            ChoiceSource::Measured | ChoiceSource::Wisdom
        ));
    }
}

#[test]
fn the_wisdom_round_trips() {
    let _store = hold_store();
    let conv = Conv2dParams::new(1, 24, (10, 10), 32, (3, 3))
        .stride(2, 2)
        .build()
        .unwrap();
    let choice = pool(2).install(|| check_plan(&conv, &measure(), 6));
    assert_eq!(choice.source, ChoiceSource::Measured);
    let text = wisdom::export();
    assert!(text.starts_with("cpuconv-wisdom 1\n"), "{text}");
    assert!(
        text.contains("input=1x24x10x10 out=32 kernel=3x3 stride=2x2"),
        "{text}"
    );
    wisdom::forget();
    // Forgotten: WisdomOnly falls back to the model.
    let only = measure().effort(PlanEffort::WisdomOnly);
    let estimated = pool(2).install(|| check_plan(&conv, &only, 7));
    assert_eq!(estimated.source, ChoiceSource::Estimate);
    assert_eq!(estimated.algorithm, conv.auto_algorithm());
    let entries = text.lines().count() - 1;
    assert_eq!(wisdom::import(&text).unwrap(), entries);
    for options in [measure(), only] {
        let from_wisdom = pool(2).install(|| check_plan(&conv, &options, 8));
        assert_eq!(from_wisdom.source, ChoiceSource::Wisdom);
        assert_eq!(
            (from_wisdom.algorithm, from_wisdom.threads, from_wisdom.isa),
            (choice.algorithm, choice.threads, choice.isa)
        );
    }
    // Exported again, it says the same (and maybe more: the other tests'
    // measured plans record their layers meanwhile).
    let again = wisdom::export();
    assert!(
        text.lines().all(|l| again.lines().any(|m| m == l)),
        "{again}"
    );
}

/// Plans the transposed `t` with `options` on random tensors and checks its
/// output against `Direct`'s: within `1e-4` per input channel and tap a
/// pixel can meet (the values lie in [−1, 1)), far below any wrong tap.
fn check_transposed_plan(
    t: &ConvTranspose2d,
    options: &ForwardOptions,
    seed: u64,
) -> cpuconv::PlanChoice {
    let [n, c, h, w] = t.input_shape();
    let mut rng = Rng::new(seed);
    let x = rng.vec(n * c * h * w);
    let wt = rng.vec(t.weight_shape().iter().product());
    let b = rng.vec(t.output_shape()[1]);
    let plan = t.plan(&wt, Some(&b), options).unwrap();
    let mut got = vec![f32::NAN; t.output_shape().iter().product()];
    plan.forward(&x, &mut got).unwrap();
    let direct = t
        .forward_to_vec(&x, &wt, Some(&b), Algorithm::Direct)
        .unwrap();
    let bound = 1e-4 * (c * 16) as f32;
    for (i, (g, d)) in got.iter().zip(&direct).enumerate() {
        assert!((g - d).abs() <= bound, "output {i}: {g} vs {d}");
    }
    plan.choice()
}

#[test]
fn measured_transposed_plans_round_trip_the_wisdom() {
    let _store = hold_store();
    // Unequal axes, so that the entry shows which is which.
    let t = ConvTranspose2dParams::new(2, 24, (8, 6), 16, (4, 3))
        .stride(2, 2)
        .padding(Padding::symmetric(1, 0))
        .build()
        .unwrap();
    assert_eq!(t.output_shape(), [2, 16, 16, 13]);
    // Estimate: Auto's model, unmeasured.
    let estimate = pool(2).install(|| check_transposed_plan(&t, &ForwardOptions::default(), 20));
    assert_eq!(estimate.source, ChoiceSource::Estimate);
    assert_eq!(estimate.algorithm, t.auto_algorithm());
    let choice = pool(2).install(|| check_transposed_plan(&t, &measure(), 21));
    assert_eq!(choice.source, ChoiceSource::Measured);
    assert!(choice.threads == 1 || choice.threads == 2, "{choice:?}");
    assert!(
        choice.algorithm == t.auto_algorithm()
            || (choice.algorithm != Algorithm::Direct
                && Algorithm::CONCRETE.contains(&choice.algorithm)),
        "{choice:?}"
    );
    let text = wisdom::export();
    let entry = "input=2x24x8x6 out=16 kernel=4x3 stride=2x2 op=transpose offset=1,0 output=16x13";
    assert!(text.contains(entry), "{text}");
    wisdom::forget();
    let only = measure().effort(PlanEffort::WisdomOnly);
    let estimated = pool(2).install(|| check_transposed_plan(&t, &only, 22));
    assert_eq!(estimated.source, ChoiceSource::Estimate);
    assert_eq!(wisdom::import(&text).unwrap(), text.lines().count() - 1);
    for options in [measure(), only] {
        let from_wisdom = pool(2).install(|| check_transposed_plan(&t, &options, 23));
        assert_eq!(from_wisdom.source, ChoiceSource::Wisdom);
        assert_eq!(
            (from_wisdom.algorithm, from_wisdom.threads, from_wisdom.isa),
            (choice.algorithm, choice.threads, choice.isa)
        );
    }
    // The same numbers as an ordinary convolution's layer are another key:
    // its WisdomOnly plan finds nothing.
    let conv = Conv2dParams::new(2, 24, (8, 6), 16, (4, 3))
        .stride(2, 2)
        .build()
        .unwrap();
    let plain = pool(2).install(|| check_plan(&conv, &only, 24));
    assert_eq!(plain.source, ChoiceSource::Estimate);
}

/// A wisdom line for `conv`'s layer with the given fields.
fn line(isa: Isa, cap: usize, request: &str, algorithm: &str, threads: usize) -> String {
    format!(
        "isa={} cap={cap} request={request} input=1x20x8x9 out=28 kernel=3x3 stride=1x1 \
         pad=1,1,1,1 dilation=1x1 groups=1 mode=xcorr algorithm={algorithm} threads={threads}",
        isa.name()
    )
}

fn wisdom_layer() -> Conv2d {
    Conv2dParams::new(1, 20, (8, 9), 28, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap()
}

/// The path plans of this process run by default.
fn this_isa() -> Isa {
    cpuconv::arch::clamp_isa(cpuconv::isa())
}

#[test]
fn wisdom_for_another_isa_is_ignored() {
    let _store = hold_store();
    let conv = wisdom_layer();
    // Im2col, which Auto never picks, so a plan that runs it took the wisdom.
    assert_ne!(conv.auto_algorithm(), Algorithm::Im2col);
    let only = ForwardOptions::new(Algorithm::Auto)
        .effort(PlanEffort::WisdomOnly)
        .parallelism(Parallelism::Sequential);
    for other in Isa::ALL.into_iter().filter(|&i| i != this_isa()) {
        let text = format!(
            "cpuconv-wisdom 1\n{}\n",
            line(other, 1, "auto", "im2col", 1)
        );
        assert_eq!(wisdom::import(&text).unwrap(), 1);
        let choice = check_plan(&conv, &only, 9);
        assert_eq!(choice.source, ChoiceSource::Estimate);
        assert_eq!(choice.algorithm, conv.auto_algorithm());
    }
    // The same entry for this machine's path applies.
    let text = format!(
        "cpuconv-wisdom 1\n# a comment\n\n{}\n",
        line(this_isa(), 1, "auto", "im2col", 1)
    );
    assert_eq!(wisdom::import(&text).unwrap(), 1);
    let choice = check_plan(&conv, &only, 9);
    assert_eq!(
        (choice.algorithm, choice.source),
        (Algorithm::Im2col, ChoiceSource::Wisdom)
    );
    // For another thread cap, it does not.
    let choice = pool(2).install(|| check_plan(&conv, &only.parallelism(Parallelism::Rayon), 9));
    assert_eq!(choice.source, ChoiceSource::Estimate);
}

#[test]
fn a_forced_path_is_the_path_a_measured_plan_runs() {
    let conv = Conv2dParams::new(1, 16, (9, 14), 24, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    for isa in cpuconv::arch::supported_isas() {
        let options = measure().isa(isa);
        let choice = pool(2).install(|| check_plan(&conv, &options, 30));
        assert_eq!(choice.isa, isa, "{choice:?}");
        assert!(allowed(&conv, choice.algorithm), "{choice:?}");
        // From the wisdom, the same.
        let again = pool(2).install(|| check_plan(&conv, &options, 31));
        assert_eq!((again.source, again.isa), (ChoiceSource::Wisdom, isa));
    }
}

/// A path below this CPU's, other than it, if there is one.
fn lower_path() -> Option<Isa> {
    Isa::ALL
        .into_iter()
        .find(|&i| i < this_isa() && i.is_supported())
}

#[test]
fn the_wisdom_round_trips_the_path_a_plan_runs() {
    let _store = hold_store();
    let Some(lower) = lower_path() else {
        eprintln!("this CPU runs the portable path only: no other path to record");
        return;
    };
    let conv = Conv2dParams::new(1, 20, (8, 10), 28, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let entry = line(this_isa(), 1, "auto", "implicit", 1).replace("1x20x8x9", "1x20x8x10");
    let entry = format!("{entry} run_isa={}", lower.name());
    assert_eq!(
        wisdom::import(&format!("cpuconv-wisdom 1\n{entry}\n")).unwrap(),
        1
    );
    // Exported, it says the same.
    assert!(wisdom::export().lines().any(|l| l == entry), "{entry}");
    let sequential = Parallelism::Sequential;
    let only = ForwardOptions::new(Algorithm::Auto)
        .effort(PlanEffort::WisdomOnly)
        .parallelism(sequential);
    let choice = check_plan(&conv, &only, 32);
    assert_eq!(
        (choice.algorithm, choice.isa, choice.source),
        (Algorithm::Implicit, lower, ChoiceSource::Wisdom)
    );
    // A request that forces this CPU's path does not take it ...
    let choice = check_plan(&conv, &only.isa(this_isa()), 33);
    assert_eq!(
        (choice.isa, choice.source),
        (this_isa(), ChoiceSource::Estimate)
    );
    // ... and measuring under the forced path leaves it in the wisdom.
    let forced = measure().parallelism(sequential).isa(this_isa());
    let choice = check_plan(&conv, &forced, 34);
    assert_eq!(choice.isa, this_isa());
    assert!(wisdom::export().lines().any(|l| l == entry), "{entry}");
    assert_eq!(check_plan(&conv, &only, 35).isa, lower);
    // A request that forces the entry's path has its own key.
    let choice = check_plan(&conv, &only.isa(lower), 36);
    assert_eq!(choice.source, ChoiceSource::Estimate);
}

#[test]
fn a_path_this_cpu_cannot_run_is_ignored() {
    let _store = hold_store();
    let conv = Conv2dParams::new(1, 20, (8, 12), 28, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let only = ForwardOptions::new(Algorithm::Auto)
        .effort(PlanEffort::WisdomOnly)
        .parallelism(Parallelism::Sequential);
    // Wisdom from a machine with another path, running a path this CPU
    // may lack: read, never applied.
    for (isa, run) in [(Isa::Avx512, Isa::Avx2), (Isa::Avx2, Isa::Avx2)] {
        if isa == this_isa() {
            continue;
        }
        let entry = line(isa, 1, "auto", "im2col", 1).replace("1x20x8x9", "1x20x8x12");
        let text = format!("cpuconv-wisdom 1\n{entry} run_isa={}\n", run.name());
        assert_eq!(wisdom::import(&text).unwrap(), 1);
        assert_eq!(check_plan(&conv, &only, 37).source, ChoiceSource::Estimate);
    }
    // This CPU's path, with a path below it that this CPU cannot run (a
    // CPU or VM that reports AVX-512 without AVX2): ignored, not an error.
    // Every path below the path of the CPUs this runs on usually runs.
    let Some(unrunnable) = Isa::ALL
        .into_iter()
        .find(|&i| i < this_isa() && !i.is_supported())
    else {
        eprintln!("every path below {} runs here", this_isa());
        return;
    };
    let entry = line(this_isa(), 1, "auto", "im2col", 1).replace("1x20x8x9", "1x20x8x12");
    let text = format!("cpuconv-wisdom 1\n{entry} run_isa={unrunnable}\n");
    assert_eq!(wisdom::import(&text).unwrap(), 1);
    let choice = check_plan(&conv, &only, 38);
    assert_eq!(
        (choice.source, choice.isa),
        (ChoiceSource::Estimate, this_isa())
    );
}

#[test]
fn a_bad_import_adds_nothing() {
    let _store = hold_store();
    let conv = Conv2dParams::new(1, 20, (8, 11), 28, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let good = line(this_isa(), 1, "auto", "im2col", 1).replace("1x20x8x9", "1x20x8x11");
    let text = format!("cpuconv-wisdom 1\n{good}\n{good} colour=red\n");
    let err = wisdom::import(&text).unwrap_err();
    assert!(
        matches!(err, ConvError::InvalidWisdom { line: 3, .. }),
        "{err:?}"
    );
    let only = ForwardOptions::new(Algorithm::Auto)
        .effort(PlanEffort::WisdomOnly)
        .parallelism(Parallelism::Sequential);
    assert_eq!(check_plan(&conv, &only, 1).source, ChoiceSource::Estimate);
}

/// `import(text)`'s error, which must name `token` and line `line`.
fn import_error(text: &str, line: usize, token: &str) -> String {
    match wisdom::import(text) {
        Err(ConvError::InvalidWisdom {
            line: l, token: t, ..
        }) if l == line && t == token => wisdom::import(text).unwrap_err().to_string(),
        other => {
            panic!("{text:?}: expected an error at line {line} naming {token:?}, got {other:?}")
        }
    }
}

/// The header and one entry with `from` replaced by `to`.
fn entry_with(from: &str, to: &str) -> String {
    let good = line(this_isa(), 2, "auto", "implicit", 2);
    assert!(good.contains(from), "{from}");
    format!("cpuconv-wisdom 1\n{}\n", good.replace(from, to))
}

#[test]
fn wisdom_without_a_header_is_an_error() {
    let msg = import_error("", 1, "");
    assert!(msg.contains("header"), "{msg}");
    import_error("\n# only a comment\n", 2, "");
    let entry = line(this_isa(), 1, "auto", "im2col", 1);
    import_error(&entry, 1, &entry);
    import_error("cpuconv-wisdom\n", 1, "cpuconv-wisdom");
    import_error("fftw-wisdom 1\n", 1, "fftw-wisdom 1");
}

#[test]
fn wisdom_of_another_version_is_an_error() {
    let msg = import_error("cpuconv-wisdom 2\n", 1, "2");
    assert!(msg.contains("version"), "{msg}");
}

#[test]
fn a_token_without_a_value_is_an_error() {
    import_error(&entry_with("groups=1", "groups"), 2, "groups");
}

#[test]
fn an_unknown_key_is_an_error() {
    let msg = import_error(
        &entry_with("groups=1", "groups=1 colour=red"),
        2,
        "colour=red",
    );
    assert!(msg.contains("unknown key"), "{msg}");
}

#[test]
fn a_repeated_key_is_an_error() {
    import_error(&entry_with("out=28", "out=28 out=28"), 2, "out=28");
}

#[test]
fn a_missing_key_is_an_error() {
    let msg = import_error(&entry_with(" mode=xcorr", ""), 2, "mode");
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn a_value_that_is_no_number_is_an_error() {
    import_error(&entry_with("cap=2", "cap=two"), 2, "cap=two");
    import_error(
        &entry_with("pad=1,1,1,1", "pad=1,1,-1,1"),
        2,
        "pad=1,1,-1,1",
    );
}

#[test]
fn a_size_of_zero_is_an_error() {
    import_error(&entry_with("kernel=3x3", "kernel=3x0"), 2, "kernel=3x0");
    import_error(&entry_with("threads=2", "threads=0"), 2, "threads=0");
}

#[test]
fn a_wrong_count_of_values_is_an_error() {
    import_error(
        &entry_with("input=1x20x8x9", "input=20x8x9"),
        2,
        "input=20x8x9",
    );
    import_error(&entry_with("pad=1,1,1,1", "pad=1x1x1x1"), 2, "pad=1x1x1x1");
}

#[test]
fn an_unknown_algorithm_is_an_error() {
    let msg = import_error(
        &entry_with("algorithm=implicit", "algorithm=fft"),
        2,
        "algorithm=fft",
    );
    assert!(msg.contains("unknown algorithm"), "{msg}");
    import_error(
        &entry_with("request=auto", "request=winograd"),
        2,
        "request=winograd",
    );
    // Names are exact.
    import_error(
        &entry_with("algorithm=implicit", "algorithm=Implicit"),
        2,
        "algorithm=Implicit",
    );
}

#[test]
fn an_auto_choice_is_an_error() {
    import_error(
        &entry_with("algorithm=implicit", "algorithm=auto"),
        2,
        "algorithm=auto",
    );
}

#[test]
fn a_choice_other_than_the_explicit_request_is_an_error() {
    import_error(
        &entry_with("request=auto", "request=im2col"),
        2,
        "algorithm=implicit",
    );
}

#[test]
fn an_unknown_isa_is_an_error() {
    let from = format!("isa={}", this_isa().name());
    import_error(&entry_with(&from, "isa=neon"), 2, "isa=neon");
}

#[test]
fn a_bad_run_isa_is_an_error() {
    let from = "threads=2";
    let msg = import_error(
        &entry_with(from, "threads=2 run_isa=neon"),
        2,
        "run_isa=neon",
    );
    assert!(msg.contains("unknown isa"), "{msg}");
    // Names are exact.
    import_error(
        &entry_with(from, "threads=2 run_isa=Avx2"),
        2,
        "run_isa=Avx2",
    );
    import_error(&entry_with(from, "threads=2 run_isa="), 2, "run_isa=");
    import_error(
        &entry_with(from, "threads=2 run_isa=portable run_isa=portable"),
        2,
        "run_isa=portable",
    );
    // Above the request's path: it would overrule a forced lower path.
    let entry = line(Isa::Portable, 1, "auto", "implicit", 1);
    let msg = import_error(
        &format!("cpuconv-wisdom 1\n{entry} run_isa=avx2\n"),
        2,
        "run_isa=avx2",
    );
    assert!(msg.contains("above"), "{msg}");
}

#[test]
fn an_unknown_mode_is_an_error() {
    import_error(&entry_with("mode=xcorr", "mode=flipped"), 2, "mode=flipped");
}

#[test]
fn threads_above_the_cap_are_an_error() {
    let msg = import_error(&entry_with("threads=2", "threads=3"), 2, "threads=3");
    assert!(msg.contains("cap"), "{msg}");
}

#[test]
fn a_measured_plan_refuses_bad_buffers() {
    let conv = Conv2dParams::new(1, 6, (7, 7), 10, (3, 3)).build().unwrap();
    let w = vec![0.5; conv.geometry().weight_len()];
    for effort in [PlanEffort::Measure, PlanEffort::WisdomOnly] {
        let options = measure().effort(effort);
        let err = conv.plan(&w[1..], None, &options).unwrap_err();
        assert!(matches!(
            err,
            ConvError::BufferLength {
                buffer: "weight",
                ..
            }
        ));
        let err = conv.plan(&w, Some(&[1.0; 3]), &options).unwrap_err();
        assert!(matches!(
            err,
            ConvError::BufferLength { buffer: "bias", .. }
        ));
        let clamp = cpuconv::Activation::Clamp {
            min: f32::NAN,
            max: 1.0,
        };
        let err = conv.plan(&w, None, &options.activation(clamp)).unwrap_err();
        assert!(matches!(err, ConvError::InvalidActivation { .. }));
    }
}

#[test]
fn non_finite_weights_are_measured_but_not_remembered() {
    let conv = Conv2dParams::new(1, 20, (8, 7), 28, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let mut w = vec![0.25; conv.geometry().weight_len()];
    w[3] = f32::INFINITY;
    let options = measure().parallelism(Parallelism::Sequential);
    let plan = conv.plan(&w, None, &options).unwrap();
    // Every padding-multiplying algorithm hands such weights to DirectSimd.
    assert_eq!(plan.algorithm(), Algorithm::DirectSimd);
    let again = conv.plan(&w, None, &options).unwrap();
    assert_eq!(again.choice().source, ChoiceSource::Measured);
}

#[test]
fn a_search_stays_within_its_budget() {
    // A layer of about 30 MFLOP: calls of a fraction of a millisecond to a
    // few (on the portable path), eight candidates on two threads (sixteen
    // on an AVX-512 CPU, whose AVX2 twins are candidates too).
    let conv = Conv2dParams::new(1, 64, (20, 20), 64, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let w = vec![0.01; conv.geometry().weight_len()];
    let start = std::time::Instant::now();
    let plan = pool(2).install(|| conv.plan(&w, None, &measure())).unwrap();
    let took = start.elapsed();
    assert_eq!(plan.choice().source, ChoiceSource::Measured);
    // The budget, the call in flight, and room for a busy machine.
    assert!(took.as_secs_f64() < 2.0, "{took:?}");
}
