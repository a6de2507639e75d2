//! `cpuconv compare`: every algorithm on every layer, for the forward pass
//! or the backward passes, timed, checked against the direct reference of
//! the same pass.

use crate::mem::check_room;
use crate::out::{outln, Stop};
use crate::suite::{
    self, try_filled, Layer, LayerData, TransposedLayer, SEED_GRAD_INPUT, SEED_GRAD_WEIGHT,
    SEED_OUTPUT, SHAPE_SYNTAX,
};
use crate::table::{left, right, sig, Column, Table};
use crate::timing::{try_measure, Budget, Timing};
use crate::{
    algorithm_parser, all_algorithms, effective_isa, isa_parser, pool, progress, BackendArg,
};
use clap::{Args, ValueEnum};
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::{
    Activation, Algorithm, BackwardOptions, ChoiceSource, Conv2d, ConvError, ConvTranspose2d,
    ForwardOptions, Isa, Parallelism, PlanChoice, PlanEffort,
};
use std::time::{Duration, Instant};

/// `--effort`: how `--plan` plans choose (`PlanEffort`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EffortArg {
    /// Auto's model (`PlanEffort::Estimate`).
    #[default]
    Estimate,
    /// Time the candidates on the layer (`PlanEffort::Measure`).
    Measure,
}

impl From<EffortArg> for PlanEffort {
    fn from(e: EffortArg) -> Self {
        match e {
            EffortArg::Estimate => PlanEffort::Estimate,
            EffortArg::Measure => PlanEffort::Measure,
        }
    }
}

/// `--pass`: which computation of each layer is timed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PassArg {
    /// The forward convolution, `Conv2d::forward_with`.
    #[default]
    Forward,
    /// The input gradient, `Conv2d::backward_input`.
    GradInput,
    /// The weight gradient, `Conv2d::backward_weight`.
    GradWeight,
    /// The transposed convolution, `ConvTranspose2d::forward_with`, on the
    /// transposed suite; `--shape` takes a transposed layer.
    Transpose,
    /// forward, grad-input and grad-weight of every layer of the suite,
    /// and transpose of every layer of the transposed suite, in one table
    /// with a `pass` column, then Auto's GFLOP/s per layer and pass.
    All,
}

impl PassArg {
    /// The passes it runs on a convolution layer, in table order.
    fn passes(self) -> &'static [Pass] {
        match self {
            PassArg::Forward => &[Pass::Forward],
            PassArg::GradInput => &[Pass::GradInput],
            PassArg::GradWeight => &[Pass::GradWeight],
            PassArg::Transpose => &[Pass::Transpose],
            PassArg::All => &[
                Pass::Forward,
                Pass::GradInput,
                Pass::GradWeight,
                Pass::Transpose,
            ],
        }
    }

    /// Whether it runs passes of ordinary convolutions.
    fn has_conv_passes(self) -> bool {
        self.passes().iter().any(|&p| p != Pass::Transpose)
    }

    /// Whether it runs the transposed pass.
    fn has_transpose(self) -> bool {
        self.passes().contains(&Pass::Transpose)
    }
}

/// One computation of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    GradInput,
    GradWeight,
    Transpose,
}

impl Pass {
    /// The name in the tables, the JSON and `--pass`.
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::GradInput => "grad-input",
            Pass::GradWeight => "grad-weight",
            Pass::Transpose => "transpose",
        }
    }

    /// Whether the library can plan it (`--plan`).
    fn has_plan(self) -> bool {
        matches!(self, Pass::Forward | Pass::Transpose)
    }
}

#[derive(Args, Debug)]
#[command(after_long_help = SHAPE_SYNTAX)]
pub struct CompareArgs {
    /// Which pass to time. Each backward pass counts the forward's FLOPs
    /// (`Conv2d::flops`) and transpose `ConvTranspose2d::flops`
    /// (2·N·C_in·H·W·C_out/g·R·S); an algorithm the library refuses for a
    /// pass is listed as `unsupported`; speedup and error are against the
    /// Direct reference of the same pass (the weight gradient overwrites its
    /// buffer; the output gradient is fixed random data, the seed layer's
    /// [[1,2],[3,4]]). Backward `auto` rows name no pick: the library does
    /// not say which it runs.
    #[arg(long, value_enum, default_value_t = PassArg::Forward)]
    pass: PassArg,

    /// Run only this suite layer (repeatable); see --list for the names.
    #[arg(long = "layer", value_name = "NAME")]
    layers: Vec<String>,

    // `-h` shows only `help`, so it carries the syntax; `--help` appends
    // SHAPE_SYNTAX, which opens with the same line, so `long_help` leaves it out.
    #[arg(
        long = "shape",
        value_name = "SPEC",
        help = "A custom layer, `[NAME=]N,C,H,W:K,RxS[,sS][,pP|pT,B,L,R][,dD][,gG]` \
                (repeatable); see --help for the syntax. Without --layer, only the \
                custom layers run",
        long_help = "A custom layer (repeatable), in the syntax below. Without --layer, \
                     only the custom layers run"
    )]
    shapes: Vec<String>,

    /// Run only this algorithm (repeatable). The direct reference still runs
    /// once (untimed) for the error column.
    #[arg(long = "algo", value_name = "NAME", value_parser = algorithm_parser())]
    algos: Vec<Algorithm>,

    /// Threads; 0 (or `all`) is every CPU: the size of the rayon pool and the
    /// cap passed to the library.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_thread_count)]
    threads: usize,

    /// GEMM engine of the GEMM-based algorithms.
    #[arg(long, value_enum, default_value_t = BackendArg::Native)]
    backend: BackendArg,

    /// Force a kernel path; clamped to the CPU. Default: the active path
    /// (CPUCONV_ISA or the best detected).
    #[arg(long, value_parser = isa_parser())]
    isa: Option<Isa>,

    /// One JSON object per row on stdout instead of the Markdown table.
    #[arg(long)]
    json: bool,

    /// Rough time budget per (layer, algorithm), in milliseconds. Slow calls
    /// still get one warm-up and 3 samples.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    budget_ms: u64,

    /// List the suite's layers and exit.
    #[arg(long)]
    list: bool,

    /// Time every algorithm but Direct through a plan (`Conv2d::plan`, made
    /// once, untimed): weights pre-packed, `Auto` resolved, bias bound. This
    /// is how a framework runs a layer repeatedly. Only the forward and
    /// transpose passes have plans (`ConvTranspose2d::plan`): with `--pass
    /// all` the backward rows run one-shot, and a backward `--pass` alone
    /// refuses it.
    #[arg(long)]
    plan: bool,

    /// Time a forward plan (Auto, or each --algo) with its input, then its
    /// output, starting 0, 1, 3, 4, 8, 12 and 16 floats past a 4 KiB
    /// boundary: GFLOP/s per offset, min and max per layer.
    #[arg(long)]
    placement: bool,

    /// With --placement: how many times each placement is timed, every
    /// placement once per round (--budget-ms split over them); a row shows
    /// the median over the rounds, so the machine's drift spreads over
    /// every placement.
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: usize,

    /// How the forward `auto` plan chooses (with --plan): `estimate`, Auto's
    /// model; `measure`, by timing the algorithms and thread splits (and,
    /// on an AVX-512 CPU without --isa, the AVX2 kernels too) on the layer
    /// within about 100 ms (`PlanEffort::Measure`): its row shows the
    /// choice, its kernel path, its threads and the time the search took.
    /// A transposed layer's plan (--pass transpose) measures GEMM + col2im
    /// and the sub-pixel phases on each algorithm the same way.
    #[arg(long, value_enum, default_value_t = EffortArg::Estimate)]
    effort: EffortArg,

    /// With `--effort measure`: import the wisdom in FILE (when it exists)
    /// before planning and write the process's wisdom back to it after
    /// (`cpuconv::wisdom`). Plan once per machine, then later runs take
    /// their choices from FILE without measuring.
    #[arg(long, value_name = "FILE")]
    wisdom: Option<std::path::PathBuf>,
}

/// `--threads`: a count, or `all` for 0, which the pool and the library
/// both read as every CPU; `gemm --threads` takes the same words.
fn parse_thread_count(s: &str) -> Result<usize, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(0);
    }
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a thread count, 0 or `all`"))
}

/// Named `f32` counts: the buffers a run allocates.
type Buffers = Vec<(&'static str, usize)>;

/// A layer to run: an ordinary or a transposed convolution, validated.
enum Subject {
    Conv(Layer, Conv2d),
    Transposed(TransposedLayer, ConvTranspose2d),
}

impl Subject {
    fn name(&self) -> &str {
        match self {
            Subject::Conv(l, _) => &l.name,
            Subject::Transposed(l, _) => &l.name,
        }
    }

    /// The passes of `passes` that apply to it, in table order.
    fn passes(&self, passes: &[Pass]) -> Vec<Pass> {
        let transposed = matches!(self, Subject::Transposed(..));
        passes
            .iter()
            .copied()
            .filter(|&p| (p == Pass::Transpose) == transposed)
            .collect()
    }

    /// The buffers it needs at once for `passes`, in `f32`s: its data, the
    /// output gradient, and one pass's output and reference at a time.
    fn buffers(&self, passes: &[Pass]) -> Buffers {
        let (mut v, outs): (Buffers, Buffers) = match self {
            Subject::Conv(_, conv) => {
                let g = conv.geometry();
                let mut v = vec![
                    ("input", g.input_len()),
                    ("weight", g.weight_len()),
                    ("bias", g.out_channels),
                ];
                if passes.iter().any(|&p| p != Pass::Forward) {
                    v.push(("grad_output", g.output_len()));
                }
                let outs = passes
                    .iter()
                    .map(|&p| match p {
                        Pass::GradInput => ("grad_input", g.input_len()),
                        Pass::GradWeight => ("grad_weight", g.weight_len()),
                        Pass::Forward | Pass::Transpose => ("output", g.output_len()),
                    })
                    .collect();
                (v, outs)
            }
            Subject::Transposed(_, t) => {
                let [input, weight, bias, output] = TransposedLayer::lens(t);
                (
                    vec![("input", input), ("weight", weight), ("bias", bias)],
                    vec![("output", output)],
                )
            }
        };
        if let Some(&(what, len)) = outs.iter().max_by_key(|&&(_, len)| len) {
            v.push((what, len));
            v.push(("reference", len));
        }
        v
    }
}

/// The layers to run: `--layer` picks from the suites the passes use,
/// `--shape` adds custom ones (transposed under `--pass transpose`),
/// neither runs those suites whole.
fn select_layers(args: &CompareArgs) -> Result<Vec<Subject>, String> {
    let conv = if args.pass.has_conv_passes() {
        suite::suite()
    } else {
        Vec::new()
    };
    let transposed = if args.pass.has_transpose() {
        suite::transposed_suite()
    } else {
        Vec::new()
    };
    let built = |l: &Layer| {
        l.build()
            .map(|c| Subject::Conv(l.clone(), c))
            .map_err(|e| format!("layer {}: {e}", l.name))
    };
    let built_t = |l: &TransposedLayer| {
        l.build()
            .map(|t| Subject::Transposed(l.clone(), t))
            .map_err(|e| format!("layer {}: {e}", l.name))
    };
    let mut layers = Vec::new();
    for name in &args.layers {
        if let Some(l) = conv.iter().find(|l| l.name == *name) {
            layers.push(built(l)?);
        } else if let Some(l) = transposed.iter().find(|l| l.name == *name) {
            layers.push(built_t(l)?);
        } else {
            let names: Vec<&str> = conv
                .iter()
                .map(|l| l.name.as_str())
                .chain(transposed.iter().map(|l| l.name.as_str()))
                .collect();
            return Err(format!(
                "unknown layer {name:?} for --pass {}; it has {} (--pass all runs both suites)",
                args.pass
                    .to_possible_value()
                    .expect("no skipped values")
                    .get_name(),
                names.join(", ")
            ));
        }
    }
    for (i, spec) in args.shapes.iter().enumerate() {
        layers.push(if args.pass == PassArg::Transpose {
            built_t(&suite::parse_transposed_shape(spec, i + 1)?)?
        } else {
            built(&suite::parse_shape(spec, i + 1)?)?
        });
    }
    if layers.is_empty() {
        for l in &conv {
            layers.push(built(l)?);
        }
        for l in &transposed {
            layers.push(built_t(l)?);
        }
    }
    Ok(layers)
}

fn describe(conv: &Conv2d) -> String {
    let g = conv.geometry();
    let p = g.padding;
    let pad = if p.top == p.bottom && p.left == p.right && p.top == p.left {
        format!("p{}", p.top)
    } else {
        format!("p{},{},{},{}", p.top, p.bottom, p.left, p.right)
    };
    format!(
        "{}x{}x{}x{} -> {}, {}x{} s{}x{} {pad} d{}x{} g{} ({:.1} MFLOP)",
        g.batch,
        g.in_channels,
        g.in_h,
        g.in_w,
        g.out_channels,
        g.kernel_h,
        g.kernel_w,
        g.stride_h,
        g.stride_w,
        g.dilation_h,
        g.dilation_w,
        g.groups,
        conv.flops() as f64 / 1e6
    )
}

fn list() -> Result<(), Stop> {
    outln!("{SHAPE_SYNTAX}\n\nSuite:")?;
    for l in suite::suite() {
        match l.build() {
            Ok(conv) => outln!("  {:<12} {}", l.name, describe(&conv))?,
            Err(e) => outln!("  {:<12} invalid: {e}", l.name)?,
        }
    }
    outln!("\nTransposed suite (--pass transpose):")?;
    for l in suite::transposed_suite() {
        match l.build() {
            Ok(t) => outln!("  {:<12} {}", l.name, describe_transposed(&t))?,
            Err(e) => outln!("  {:<12} invalid: {e}", l.name)?,
        }
    }
    Ok(())
}

fn describe_transposed(t: &ConvTranspose2d) -> String {
    let dims = |s: [usize; 4]| s.map(|d| d.to_string()).join("x");
    format!(
        "{} -> {}, weight {} ({:.1} MFLOP)",
        dims(t.input_shape()),
        dims(t.output_shape()),
        dims(t.weight_shape()),
        t.flops() as f64 / 1e6
    )
}

/// One call of a job, writing its output buffer.
type RunFn<'a> = Box<dyn Fn(Algorithm, &mut [f32]) -> Result<(), ConvError> + 'a>;
/// A planned call (the plan made, untimed, when the closure was).
type Planned<'a> = Box<dyn Fn(&mut [f32]) -> Result<(), ConvError> + 'a>;
/// Makes a plan for an algorithm.
type PlanFn<'a> = Box<dyn Fn(Algorithm) -> Result<Planned<'a>, ConvError> + 'a>;

/// One pass of one layer, ready to time: what it computes and how to run
/// it with a given algorithm.
struct Job<'a> {
    layer: &'a str,
    pass: Pass,
    /// FLOPs of one call: the forward's for every pass.
    flops: u64,
    /// Length of the buffer the pass writes.
    out_len: usize,
    /// What `Auto` runs, where the library says: one algorithm, or, for a
    /// transposed layer, those of its sub-pixel phases, comma-separated.
    auto_pick: Option<String>,
    /// For a measured `Auto` plan: its threads, and how it chose.
    auto_note: Option<String>,
    /// What the seed layer must give (checked on Direct's output).
    expected: Option<&'static [f32]>,
    run: RunFn<'a>,
    /// `Some` when `--plan` was given and the pass has plans.
    plan: Option<PlanFn<'a>>,
}

/// The options every call of a run shares, per kind of pass.
struct Options {
    forward: ForwardOptions,
    backward: BackwardOptions,
    plan: bool,
    /// Whether the Auto row runs (a measured Auto plan is made up front).
    auto: bool,
}

/// The job of `pass` on a convolution layer. `grad_output` is `Some` when
/// any backward pass runs.
fn conv_job<'a>(
    layer: &'a Layer,
    conv: &'a Conv2d,
    data: &'a LayerData,
    grad_output: Option<&'a [f32]>,
    pass: Pass,
    options: &Options,
) -> Job<'a> {
    let g = conv.geometry();
    let seed = layer.is_seed(conv);
    let (fwd, bwd) = (options.forward, options.backward);
    let bias = data.bias.as_deref();
    let dy = || grad_output.expect("a backward pass has its output gradient");
    let (out_len, expected, run): (usize, &'static [f32], RunFn<'a>) = match pass {
        Pass::Forward => (
            g.output_len(),
            &SEED_OUTPUT,
            Box::new(move |algo, out| {
                conv.forward_with(&data.input, &data.weight, bias, out, &fwd.algorithm(algo))
            }),
        ),
        Pass::GradInput => {
            let dy = dy();
            (
                g.input_len(),
                &SEED_GRAD_INPUT,
                Box::new(move |algo, out| {
                    conv.backward_input(&data.weight, dy, out, &bwd.algorithm(algo))
                }),
            )
        }
        Pass::GradWeight => {
            let dy = dy();
            (
                g.weight_len(),
                &SEED_GRAD_WEIGHT,
                Box::new(move |algo, out| {
                    conv.backward_weight(&data.input, dy, out, &bwd.algorithm(algo))
                }),
            )
        }
        Pass::Transpose => unreachable!("an ordinary layer has no transposed pass"),
    };
    let plan: Option<PlanFn<'a>> = (options.plan && pass.has_plan()).then(|| {
        Box::new(move |algo| {
            // Only Auto's plan measures: an explicit algorithm's row runs
            // at the threads asked for.
            let effort = match algo {
                Algorithm::Auto => fwd.effort,
                _ => PlanEffort::Estimate,
            };
            let plan = conv.plan(&data.weight, bias, &fwd.algorithm(algo).effort(effort))?;
            Ok(Box::new(move |out: &mut [f32]| plan.forward(&data.input, out)) as Planned<'a>)
        }) as PlanFn<'a>
    });
    // A measured Auto plan says what it chose; the plan timed later takes
    // the same choice from the wisdom.
    let measured = (options.auto
        && options.plan
        && pass == Pass::Forward
        && fwd.effort != PlanEffort::Estimate)
        .then(|| {
            let start = Instant::now();
            let plan = conv.plan(&data.weight, bias, &fwd.algorithm(Algorithm::Auto));
            (plan, start.elapsed())
        });
    let auto_note = match &measured {
        Some((Ok(plan), took)) => Some(choice_note(plan.choice(), *took)),
        _ => None,
    };
    let measured_pick = match &measured {
        Some((Ok(plan), _)) => Some(plan.algorithm().name().to_string()),
        _ => None,
    };
    Job {
        layer: &layer.name,
        pass,
        flops: conv.flops(),
        out_len,
        auto_pick: measured_pick.or(Some(
            match pass {
                Pass::GradInput => match conv.auto_input_gradient_algorithm() {
                    // Auto on the phases: each phase's own choice.
                    Algorithm::Auto => "phases",
                    a => a.name(),
                },
                Pass::GradWeight => conv.auto_weight_gradient_algorithm().name(),
                _ => conv.auto_algorithm().name(),
            }
            .to_string(),
        )),
        auto_note,
        expected: seed.then_some(expected),
        run,
        plan,
    }
}

/// What a measured plan's row says of its choice: its kernel path, its
/// threads, and how it was chosen (and how long the search took).
fn choice_note(c: PlanChoice, took: Duration) -> String {
    let how = match c.source {
        ChoiceSource::Measured => {
            format!("measured in {} ms", sig(took.as_secs_f64() * 1e3))
        }
        ChoiceSource::Wisdom => "wisdom".to_string(),
        _ => "estimate".to_string(),
    };
    format!(
        "{}, {} thread{}, {how}",
        c.isa,
        c.threads,
        if c.threads == 1 { "" } else { "s" }
    )
}

/// The job of a transposed layer.
fn transposed_job<'a>(
    layer: &'a TransposedLayer,
    t: &'a ConvTranspose2d,
    data: &'a LayerData,
    options: &Options,
) -> Job<'a> {
    let fwd = options.forward;
    let bias = data.bias.as_deref();
    let plan: Option<PlanFn<'a>> = options.plan.then(|| {
        Box::new(move |algo| {
            // As for a convolution, only Auto's plan measures.
            let effort = match algo {
                Algorithm::Auto => fwd.effort,
                _ => PlanEffort::Estimate,
            };
            let plan = t.plan(&data.weight, bias, &fwd.algorithm(algo).effort(effort))?;
            Ok(Box::new(move |out: &mut [f32]| plan.forward(&data.input, out)) as Planned<'a>)
        }) as PlanFn<'a>
    });
    // Auto's picks, per sub-pixel phase, are what an Auto plan reports; a
    // measured one (with --plan) also says how it chose, and the plan
    // timed later takes the same choice from the wisdom.
    let effort = if options.plan {
        fwd.effort
    } else {
        PlanEffort::Estimate
    };
    let start = Instant::now();
    let auto_plan = t.plan(
        &data.weight,
        bias,
        &fwd.algorithm(Algorithm::Auto).effort(effort),
    );
    let took = start.elapsed();
    let auto_note = match &auto_plan {
        Ok(plan) if effort != PlanEffort::Estimate => Some(choice_note(plan.choice(), took)),
        _ => None,
    };
    let auto_pick = auto_plan.ok().map(|plan| {
        let mut names: Vec<&str> = Vec::new();
        for name in plan.algorithms().into_iter().flatten().map(Algorithm::name) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.join(",")
    });
    Job {
        layer: &layer.name,
        pass: Pass::Transpose,
        flops: t.flops(),
        out_len: TransposedLayer::lens(t)[3],
        auto_pick,
        auto_note,
        expected: None,
        run: Box::new(move |algo, out| {
            t.forward_with(&data.input, &data.weight, bias, out, &fwd.algorithm(algo))
        }),
        plan,
    }
}

/// Largest `|a − b|`; NaN if any difference is NaN (an unwritten or broken output).
fn max_abs_error(a: &[f32], b: &[f32]) -> f32 {
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}

/// What one (layer, pass, algorithm) gave.
struct Row<'a> {
    layer: &'a str,
    pass: Pass,
    flops: u64,
    algo: Algorithm,
    auto_pick: Option<&'a str>,
    auto_note: Option<&'a str>,
    planned: bool,
    /// `Err`: the library does not run this algorithm for this pass (its message).
    result: Result<Measured, String>,
}

struct Measured {
    t: Timing,
    gflops: f64,
    speedup: Option<f64>,
    err: f32,
}

/// How rows are printed: the table (with a `pass` column when several
/// passes run) or JSON lines, with the run's context.
struct Printer {
    json: bool,
    table: Table,
    multi_pass: bool,
    peak: f64,
    threads: usize,
    isa: Isa,
    backend: BackendArg,
    effort: EffortArg,
}

impl Printer {
    fn new(args: &CompareArgs, passes: &[Pass], peak: f64, threads: usize, isa: Isa) -> Self {
        let multi_pass = passes.len() > 1;
        let mut columns: Vec<Column> = vec![left("layer", 12)];
        if multi_pass {
            columns.push(left("pass", 11));
        }
        // Room for "unsupported" where a pass may refuse an algorithm.
        let forward_only = passes.iter().all(|&p| p == Pass::Forward);
        columns.extend([
            left("algorithm", 22),
            right("median ms", if forward_only { 10 } else { 11 }),
            right("GFLOP/s", 8),
            right("% peak", 6),
            right("speedup", 8),
            right("max abs err", 11),
        ]);
        Printer {
            json: args.json,
            table: Table::new(&columns),
            multi_pass,
            peak,
            threads,
            isa,
            backend: args.backend,
            effort: args.effort,
        }
    }

    fn line(&self, row: &Row) -> String {
        let picked = match (row.algo, row.auto_pick) {
            (Algorithm::Auto, Some(pick)) => Some(pick),
            _ => None,
        };
        if self.json {
            let m = row.result.as_ref().ok();
            return serde_json::json!({
                "layer": row.layer,
                "pass": row.pass.name(),
                "algorithm": row.algo.name(),
                "picked": picked,
                "supported": m.is_some(),
                "unsupported": row.result.as_ref().err(),
                "median_ms": m.map(|m| m.t.median_s * 1e3),
                "min_ms": m.map(|m| m.t.min_s * 1e3),
                "gflops": m.map(|m| m.gflops),
                "peak_fraction": m.map(|m| m.gflops / self.peak),
                "planned": row.planned,
                "speedup": m.and_then(|m| m.speedup),
                "max_abs_err": m.map(|m| m.err),
                "flops": row.flops,
                "samples": m.map(|m| m.t.samples),
                "reps": m.map(|m| m.t.reps),
                "threads": self.threads,
                "isa": self.isa.name(),
                "backend": self.backend.name(),
                "effort": PlanEffort::from(self.effort).name(),
                "picked_note": picked.and(row.auto_note),
            })
            .to_string();
        }
        let mut label = match (picked, row.auto_note) {
            (Some(p), Some(note)) => format!("auto ({p}; {note})"),
            (Some(p), None) => format!("auto ({p})"),
            (None, _) => row.algo.name().to_string(),
        };
        if row.planned {
            label.push_str("+plan");
        }
        let mut cells = vec![row.layer.to_string()];
        if self.multi_pass {
            cells.push(row.pass.name().to_string());
        }
        cells.push(label);
        match &row.result {
            Ok(m) => cells.extend([
                sig(m.t.median_s * 1e3),
                sig(m.gflops),
                format!("{:.0}%", 100.0 * m.gflops / self.peak),
                m.speedup.map_or("–".into(), |s| format!("{}x", sig(s))),
                if m.err == 0.0 {
                    "0".into()
                } else {
                    format!("{:.1e}", m.err)
                },
            ]),
            Err(_) => {
                cells.push("unsupported".into());
                cells.extend((0..4).map(|_| "–".to_string()));
            }
        }
        self.table.row(&cells)
    }
}

/// Whether an error means "this pass has no such algorithm".
fn unsupported(e: &ConvError) -> bool {
    matches!(e, ConvError::UnsupportedAlgorithm { .. })
}

/// Times every algorithm of `algos` on `job` (Direct first: its output is
/// the reference, its time the baseline; when it is not asked for, it still
/// runs once, untimed), printing each row as it comes. Returns Auto's
/// GFLOP/s (`None` when not run, `Some(None)` when unsupported).
fn time_job(
    job: &Job,
    algos: &[Algorithm],
    budget: &Budget,
    printer: &Printer,
    pb: &indicatif::ProgressBar,
) -> Result<Option<Option<f64>>, Stop> {
    let fail = |algo: Algorithm, e: ConvError| {
        Stop::from(format!(
            "layer {} / {} / {}: {e}",
            job.layer,
            job.pass.name(),
            algo.name()
        ))
    };
    let in_layer = |e: String| Stop::from(format!("layer {}: {e}", job.layer));
    let mut reference = try_filled("reference", job.out_len, f32::NAN).map_err(in_layer)?;
    let mut out = try_filled("output", job.out_len, f32::NAN).map_err(in_layer)?;
    let mut direct_s = None;
    let mut order = algos.to_vec();
    order.sort_by_key(|a| *a != Algorithm::Direct);
    if !order.contains(&Algorithm::Direct) {
        pb.set_message(format!(
            "{} / {} / direct (reference)",
            job.layer,
            job.pass.name()
        ));
        (job.run)(Algorithm::Direct, &mut reference).map_err(|e| fail(Algorithm::Direct, e))?;
    }
    let mut auto = None;
    for algo in order {
        pb.set_message(format!(
            "{} / {} / {}",
            job.layer,
            job.pass.name(),
            algo.name()
        ));
        out.fill(f32::NAN);
        let planned = match &job.plan {
            Some(make) if algo != Algorithm::Direct => Some(make(algo)),
            _ => None,
        };
        let measured = match planned {
            Some(Err(e)) => Err(e),
            Some(Ok(call)) => try_measure(budget, || call(&mut out)),
            None => try_measure(budget, || (job.run)(algo, &mut out)),
        };
        let result = match measured {
            Ok(t) => {
                if algo == Algorithm::Direct {
                    reference.copy_from_slice(&out);
                    direct_s = Some(t.median_s);
                    if let Some(want) = job.expected.filter(|w| **w != *reference) {
                        pb.suspend(|| {
                            eprintln!(
                                "cpuconv: seed layer's {} gave {reference:?}, expected {want:?}",
                                job.pass.name()
                            )
                        });
                    }
                }
                Ok(Measured {
                    t,
                    gflops: job.flops as f64 / t.median_s / 1e9,
                    speedup: direct_s.map(|d| d / t.median_s),
                    err: max_abs_error(&out, &reference),
                })
            }
            Err(e) if unsupported(&e) => Err(e.to_string()),
            Err(e) => return Err(fail(algo, e)),
        };
        if algo == Algorithm::Auto {
            auto = Some(result.as_ref().ok().map(|m| m.gflops));
        }
        let row = Row {
            layer: job.layer,
            pass: job.pass,
            flops: job.flops,
            algo,
            auto_pick: job.auto_pick.as_deref(),
            auto_note: job.auto_note.as_deref(),
            planned: job.plan.is_some() && algo != Algorithm::Direct && result.is_ok(),
            result,
        };
        pb.suspend(|| outln!("{}", printer.line(&row)))?;
        pb.inc(1);
    }
    Ok(auto)
}

/// Entry point of `cpuconv compare`.
pub fn run(args: &CompareArgs) -> Result<(), Stop> {
    if args.list {
        return list();
    }
    if args.placement {
        return crate::placement::run_conv(&crate::placement::ConvPlacement {
            layers: &args.layers,
            shapes: &args.shapes,
            algos: &args.algos,
            threads: args.threads,
            isa: args.isa,
            backend: args.backend,
            budget_ms: args.budget_ms,
            rounds: args.rounds,
            json: args.json,
            forward: args.pass == PassArg::Forward,
        });
    }
    let passes = args.pass.passes();
    if args.plan && !passes.iter().any(|p| p.has_plan()) {
        return Err(format!(
            "--plan: the {} pass has no plan (the library plans only the forward and \
             transposed convolutions); drop --plan, or use --pass forward, transpose or all",
            passes[0].name()
        )
        .into());
    }
    if args.effort != EffortArg::Estimate && !args.plan {
        return Err("--effort: only plans measure; add --plan"
            .to_string()
            .into());
    }
    if let Some(path) = &args.wisdom {
        if args.effort != EffortArg::Measure {
            return Err(
                "--wisdom: only measured plans use wisdom; add --effort measure"
                    .to_string()
                    .into(),
            );
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                cpuconv::wisdom::import(&text)
                    .map_err(|e| format!("--wisdom {}: {e}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("--wisdom {}: {e}", path.display()).into()),
        }
    }
    // Validate every layer, and that its tensors fit, before printing anything.
    let layers = select_layers(args)?;
    for l in &layers {
        check_room(&l.buffers(&l.passes(passes)))
            .map_err(|e| format!("layer {}: {e}", l.name()))?;
    }
    let algos = if args.algos.is_empty() {
        all_algorithms()
    } else {
        let mut v = Vec::new();
        for a in &args.algos {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    };
    let pool = pool(args.threads)?;
    let threads = pool.current_num_threads();
    let isa = effective_isa(args.isa);
    let budget = Budget::new(Duration::from_millis(args.budget_ms));
    let options = Options {
        forward: ForwardOptions::new(Algorithm::Direct)
            .parallelism(Parallelism::threads(args.threads))
            .backend(args.backend.into())
            .activation(Activation::None)
            .isa(args.isa)
            .effort(args.effort.into()),
        backward: BackwardOptions::new(Algorithm::Direct)
            .parallelism(Parallelism::threads(args.threads))
            .backend(args.backend.into())
            .isa(args.isa),
        plan: args.plan,
        auto: algos.contains(&Algorithm::Auto),
    };
    let multi_pass = passes.len() > 1;
    // The FMA peak of the same ISA and thread count, measured in this run,
    // so the table says how much of the machine each algorithm uses.
    let peak = fma_peak_gflops(isa, threads);
    let printer = Printer::new(args, passes, peak, threads, isa);
    if !args.json {
        // The passes some layer runs (`all` with only ordinary layers has no transpose).
        let pass_names: Vec<&str> = passes
            .iter()
            .filter(|&&p| layers.iter().any(|l| !l.passes(&[p]).is_empty()))
            .map(|p| p.name())
            .collect();
        let mut how = match (args.plan, multi_pass) {
            (false, _) => "one-shot calls",
            (true, false) => "planned (pre-packed weights)",
            (true, true) => {
                "forward and transpose planned (pre-packed weights), backward one-shot (no plan)"
            }
        }
        .to_string();
        if args.effort == EffortArg::Measure {
            how.push_str(", forward auto planned by measurement");
        }
        outln!(
            "cpuconv {} compare: {} {}, isa {isa}, {threads} thread{}, backend {}, {how}, \
             median of samples; speedup and error are relative to direct on the same pass; \
             % peak is of the measured {isa} FMA peak, {} GFLOP/s.\n",
            env!("CARGO_PKG_VERSION"),
            if pass_names.len() > 1 {
                "passes"
            } else {
                "pass"
            },
            pass_names.join(", "),
            if threads == 1 { "" } else { "s" },
            args.backend.name(),
            sig(peak),
        )?;
        outln!("{}", printer.table.header())?;
    }
    let jobs: usize = layers.iter().map(|l| l.passes(passes).len()).sum();
    let pb = progress((jobs * algos.len()) as u64);
    let mut summary: Vec<(&str, Vec<Option<Option<f64>>>)> = Vec::new();
    let result = pool.install(|| -> Result<(), Stop> {
        for subject in &layers {
            let in_layer = |e: String| format!("layer {}: {e}", subject.name());
            // Auto's GFLOP/s per pass of `passes` (None where it does not apply).
            let mut autos = vec![None; passes.len()];
            let mut record = |pass: Pass, auto| {
                let i = passes.iter().position(|&p| p == pass).expect("a pass run");
                autos[i] = auto;
            };
            match subject {
                Subject::Conv(layer, conv) => {
                    let mine = subject.passes(passes);
                    let data = layer.try_data(conv).map_err(in_layer)?;
                    let grad_output = if mine.iter().any(|&p| p != Pass::Forward) {
                        Some(layer.try_grad_output(conv).map_err(in_layer)?)
                    } else {
                        None
                    };
                    for pass in mine {
                        let dy = grad_output.as_deref();
                        let job = conv_job(layer, conv, &data, dy, pass, &options);
                        record(pass, time_job(&job, &algos, &budget, &printer, &pb)?);
                    }
                }
                Subject::Transposed(layer, t) => {
                    let data = layer.try_data(t).map_err(in_layer)?;
                    let job = transposed_job(layer, t, &data, &options);
                    record(
                        Pass::Transpose,
                        time_job(&job, &algos, &budget, &printer, &pb)?,
                    );
                }
            }
            summary.push((subject.name(), autos));
        }
        Ok(())
    });
    pb.finish_and_clear();
    result?;
    if let Some(path) = &args.wisdom {
        std::fs::write(path, cpuconv::wisdom::export())
            .map_err(|e| format!("--wisdom {}: {e}", path.display()))?;
    }
    if multi_pass && !args.json && algos.contains(&Algorithm::Auto) {
        print_summary(passes, &summary)?;
    }
    Ok(())
}

/// `--pass all`'s closing table: Auto's GFLOP/s per layer and pass (`–`
/// where a pass does not apply to a layer); passes no layer ran are left out.
fn print_summary(passes: &[Pass], rows: &[(&str, Vec<Option<Option<f64>>>)]) -> Result<(), Stop> {
    let shown: Vec<usize> = (0..passes.len())
        .filter(|&i| rows.iter().any(|(_, autos)| autos[i].is_some()))
        .collect();
    let mut columns = vec![left("layer", 12)];
    columns.extend(shown.iter().map(|&i| right(passes[i].name(), 11)));
    let table = Table::new(&columns);
    outln!("\nauto, GFLOP/s per pass:\n")?;
    outln!("{}", table.header())?;
    for (layer, autos) in rows {
        let mut cells = vec![layer.to_string()];
        cells.extend(shown.iter().map(|&i| match &autos[i] {
            Some(Some(g)) => sig(*g),
            Some(None) => "unsupported".into(),
            None => "–".into(),
        }));
        outln!("{}", table.row(&cells))?;
    }
    Ok(())
}
