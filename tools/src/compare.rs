//! `cpuconv compare`: every algorithm on every layer, timed, checked against
//! the direct reference.

use crate::mem::check_room;
use crate::out::{outln, Stop};
use crate::suite::{self, try_filled, Layer, SEED_OUTPUT, SHAPE_SYNTAX};
use crate::table::{left, right, sig, Table};
use crate::timing::{measure, Budget};
use crate::{
    algorithm_parser, all_algorithms, effective_isa, isa_parser, pool, progress, BackendArg,
};
use clap::Args;
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::{Activation, Algorithm, Conv2d, ForwardOptions, Isa, Parallelism};
use std::time::Duration;

#[derive(Args, Debug)]
#[command(after_long_help = SHAPE_SYNTAX)]
pub struct CompareArgs {
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
    /// is how a framework runs a layer repeatedly.
    #[arg(long)]
    plan: bool,
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

/// The layers to run: `--layer` picks from the suite, `--shape` adds custom
/// ones, neither runs the whole suite.
fn select_layers(args: &CompareArgs) -> Result<Vec<Layer>, String> {
    let all = suite::suite();
    let mut layers = Vec::new();
    for name in &args.layers {
        let layer = all.iter().find(|l| l.name == *name).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
            format!("unknown layer {name:?}; the suite has {}", names.join(", "))
        })?;
        layers.push(layer.clone());
    }
    for (i, spec) in args.shapes.iter().enumerate() {
        layers.push(suite::parse_shape(spec, i + 1)?);
    }
    if layers.is_empty() {
        layers = all;
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

fn list() -> Result<(), Stop> {
    outln!("{SHAPE_SYNTAX}\n\nSuite:")?;
    for l in suite::suite() {
        match l.build() {
            Ok(conv) => outln!("  {:<12} {}", l.name, describe(&conv))?,
            Err(e) => outln!("  {:<12} invalid: {e}", l.name)?,
        }
    }
    Ok(())
}

/// The buffers a layer needs at once, in `f32`s: what [`Layer::try_data`]
/// and the timing loop allocate.
fn buffers(conv: &Conv2d) -> [(&'static str, usize); 5] {
    let g = conv.geometry();
    [
        ("input", g.input_len()),
        ("weight", g.weight_len()),
        ("bias", g.out_channels),
        ("output", g.output_len()),
        ("reference output", g.output_len()),
    ]
}

/// Entry point of `cpuconv compare`.
pub fn run(args: &CompareArgs) -> Result<(), Stop> {
    if args.list {
        return list();
    }
    // Validate every layer, and that its tensors fit, before printing anything.
    let layers = select_layers(args)?
        .into_iter()
        .map(|l| {
            let conv = l.build().map_err(|e| format!("layer {}: {e}", l.name))?;
            check_room(&buffers(&conv)).map_err(|e| format!("layer {}: {e}", l.name))?;
            Ok((l, conv))
        })
        .collect::<Result<Vec<_>, String>>()?;
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
    let time_direct = algos.contains(&Algorithm::Direct);
    let pool = pool(args.threads)?;
    let threads = pool.current_num_threads();
    let isa = effective_isa(args.isa);
    let budget = Budget::new(Duration::from_millis(args.budget_ms));
    let base = ForwardOptions::new(Algorithm::Direct)
        .parallelism(Parallelism::threads(args.threads))
        .backend(args.backend.into())
        .activation(Activation::None)
        .isa(args.isa);
    let table = Table::new(&[
        left("layer", 12),
        left("algorithm", 22),
        right("median ms", 10),
        right("GFLOP/s", 8),
        right("% peak", 6),
        right("speedup", 8),
        right("max abs err", 11),
    ]);
    // The FMA peak of the same ISA and thread count, measured in this run,
    // so the table says how much of the machine each algorithm uses.
    let peak = fma_peak_gflops(isa, threads);
    if !args.json {
        outln!(
            "cpuconv {} compare: isa {isa}, {threads} thread{}, backend {}, {}, \
             median of samples; speedup and error are relative to direct; \
             % peak is of the measured {isa} FMA peak, {} GFLOP/s.\n",
            env!("CARGO_PKG_VERSION"),
            if threads == 1 { "" } else { "s" },
            args.backend.name(),
            if args.plan {
                "planned (pre-packed weights)"
            } else {
                "one-shot forward"
            },
            sig(peak),
        )?;
        outln!("{}", table.header())?;
    }
    let pb = progress((layers.len() * algos.len()) as u64);
    let result = pool.install(|| -> Result<(), Stop> {
        for (layer, conv) in &layers {
            let in_layer = |e: String| format!("layer {}: {e}", layer.name);
            let data = layer.try_data(conv).map_err(in_layer)?;
            let len = conv.geometry().output_len();
            let bias = data.bias.as_deref();
            let run_once = |options: &ForwardOptions, out: &mut [f32]| {
                conv.forward_with(&data.input, &data.weight, bias, out, options)
                    .map_err(|e| {
                        format!("layer {} / {}: {e}", layer.name, options.algorithm.name())
                    })
            };

            // Direct first: its output is the reference, its time the baseline.
            let mut reference = try_filled("reference output", len, f32::NAN).map_err(in_layer)?;
            let mut out = try_filled("output", len, f32::NAN).map_err(in_layer)?;
            let mut direct_s = None;
            let mut order: Vec<Algorithm> = algos.clone();
            order.sort_by_key(|a| *a != Algorithm::Direct);
            if !time_direct {
                pb.set_message(format!("{} / direct (reference)", layer.name));
                run_once(&base, &mut reference)?;
            }
            for algo in order {
                pb.set_message(format!("{} / {}", layer.name, algo.name()));
                let options = base.algorithm(algo);
                out.fill(f32::NAN);
                let mut failure = None;
                let planned = if args.plan && algo != Algorithm::Direct {
                    let plan = conv
                        .plan(&data.weight, bias, &options)
                        .map_err(|e| format!("layer {} / {}: {e}", layer.name, algo.name()))?;
                    Some(plan)
                } else {
                    None
                };
                let t = measure(&budget, || {
                    let result = match &planned {
                        Some(plan) => plan
                            .forward(&data.input, &mut out)
                            .map_err(|e| format!("layer {} / {}: {e}", layer.name, algo.name())),
                        None => run_once(&options, &mut out),
                    };
                    if let Err(e) = result {
                        failure.get_or_insert(e);
                    }
                });
                if let Some(e) = failure {
                    return Err(e.into());
                }
                if algo == Algorithm::Direct {
                    reference.copy_from_slice(&out);
                    direct_s = Some(t.median_s);
                    if layer.name == "seed" && len == 4 && reference != SEED_OUTPUT {
                        pb.suspend(|| {
                            eprintln!(
                                "cpuconv: seed layer gave {reference:?}, expected {SEED_OUTPUT:?}"
                            )
                        });
                    }
                }
                let err = max_abs_error(&out, &reference);
                let gflops = conv.flops() as f64 / t.median_s / 1e9;
                let speedup = direct_s.map(|d| d / t.median_s);
                let (label, picked) = if algo == Algorithm::Auto {
                    let pick = conv.auto_algorithm();
                    (format!("auto ({})", pick.name()), Some(pick.name()))
                } else {
                    (algo.name().to_string(), None)
                };
                let label = if planned.is_some() {
                    format!("{label}+plan")
                } else {
                    label
                };
                let line = if args.json {
                    serde_json::json!({
                        "layer": layer.name,
                        "algorithm": algo.name(),
                        "picked": picked,
                        "median_ms": t.median_s * 1e3,
                        "min_ms": t.min_s * 1e3,
                        "gflops": gflops,
                        "peak_fraction": gflops / peak,
                        "planned": planned.is_some(),
                        "speedup": speedup,
                        "max_abs_err": err,
                        "flops": conv.flops(),
                        "samples": t.samples,
                        "reps": t.reps,
                        "threads": threads,
                        "isa": isa.name(),
                        "backend": args.backend.name(),
                    })
                    .to_string()
                } else {
                    table.row(&[
                        layer.name.clone(),
                        label,
                        sig(t.median_s * 1e3),
                        sig(gflops),
                        format!("{:.0}%", 100.0 * gflops / peak),
                        speedup.map_or("–".into(), |s| format!("{}x", sig(s))),
                        if err == 0.0 {
                            "0".into()
                        } else {
                            format!("{err:.1e}")
                        },
                    ])
                };
                pb.suspend(|| outln!("{line}"))?;
                pb.inc(1);
            }
        }
        Ok(())
    });
    pb.finish_and_clear();
    result
}
