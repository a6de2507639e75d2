//! `cpuconv gemm`: our GEMM against matrixmultiply, as GFLOP/s and as a
//! share of the FMA peak measured in the same run.

use crate::mem::check_room;
use crate::out::{outln, Stop};
use crate::suite::{self, try_filled, Rng};
use crate::table::{left, right, sig, Table};
use crate::timing::{measure, Budget, Timing};
use crate::{all_threads, effective_isa, isa_parser, pool, progress};
use clap::Args;
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::gemm::{sgemm, MatMut, MatRef};
use cpuconv::{GemmBackend, GemmOptions, Isa, Parallelism};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Thread counts to run, comma-separated; 0 (or `all`) is every CPU.
    #[arg(long, value_name = "LIST", default_value = "1,all")]
    threads: String,

    /// Kernel path of our GEMM; clamped to the CPU. Default: the active
    /// path. matrixmultiply picks its own.
    #[arg(long, value_parser = isa_parser())]
    isa: Option<Isa>,

    /// A shape `MxKxN`, or one number for a square (repeatable); replaces
    /// the default list (squares 64..2048 and the suite's im2col GEMMs).
    #[arg(long = "shape", value_name = "MxKxN", value_parser = suite::parse_gemm_shape)]
    shapes: Vec<(usize, usize, usize)>,

    /// One JSON object per row on stdout instead of the Markdown table.
    #[arg(long)]
    json: bool,

    /// Rough time budget per (shape, threads, engine), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 600)]
    budget_ms: u64,
}

/// `--threads`: 0 means every CPU, as in `compare --threads`; each count
/// is resolved here, since the table and the peak need the real number.
fn parse_threads(list: &str) -> Result<Vec<usize>, String> {
    let mut v = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = if part.eq_ignore_ascii_case("all") {
            all_threads()
        } else {
            match part.parse::<usize>() {
                Ok(0) => all_threads(),
                Ok(n) => n,
                Err(_) => return Err(format!("--threads: {part:?} is not a count, 0 or `all`")),
            }
        };
        if !v.contains(&n) {
            v.push(n);
        }
    }
    if v.is_empty() {
        return Err("--threads: empty list".into());
    }
    Ok(v)
}

/// Times `C = A·B` on one engine.
fn time_gemm(
    budget: &Budget,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    options: &GemmOptions,
) -> Result<Timing, String> {
    let mut failure = None;
    let t = measure(budget, || {
        let r = sgemm(
            1.0,
            MatRef::row_major(a, m, k),
            MatRef::row_major(b, k, n),
            0.0,
            MatMut::row_major(c, m, n),
            options,
        );
        if let Err(e) = r {
            failure.get_or_insert(e);
        }
    });
    match failure {
        Some(e) => Err(format!("{m}x{k}x{n}: {e}")),
        None => Ok(t),
    }
}

/// The name of a shape in the table and in messages.
fn shape_name((m, k, n): (usize, usize, usize)) -> String {
    format!("{m}x{k}x{n}")
}

/// Entry point of `cpuconv gemm`.
pub fn run(args: &GemmArgs) -> Result<(), Stop> {
    let threads = parse_threads(&args.threads)?;
    let isa = effective_isa(args.isa);
    let shapes = if args.shapes.is_empty() {
        suite::gemm_shapes()
    } else {
        args.shapes.clone()
    };
    // Every shape must be runnable before the peaks take their seconds.
    for &(m, k, n) in &shapes {
        let name = shape_name((m, k, n));
        if m == 0 || k == 0 || n == 0 {
            return Err(format!("{name}: every dimension must be positive").into());
        }
        let len = |rows: usize, cols: usize, what: &str| {
            rows.checked_mul(cols)
                .ok_or_else(|| format!("{name}: {what} has more elements than fit in usize"))
        };
        check_room(&[
            ("A", len(m, k, "A")?),
            ("B", len(k, n, "B")?),
            ("C", len(m, n, "C")?),
        ])
        .map_err(|e| format!("{name}: {e}"))?;
    }
    let budget = Budget::new(Duration::from_millis(args.budget_ms));

    // Peaks first, so the table can quote them from its first row.
    let pb = progress((threads.len() * (shapes.len() + 1)) as u64);
    let mut peaks = Vec::new();
    for &t in &threads {
        pb.set_message(format!("FMA peak, {t} thread(s)"));
        peaks.push(fma_peak_gflops(isa, t));
        pb.inc(1);
    }
    let table = Table::new(&[
        left("shape MxKxN", 16),
        right("threads", 7),
        right("ours GFLOP/s", 12),
        right("mm GFLOP/s", 10),
        right("ours/mm", 7),
        right("ours % peak", 11),
        right("mm % peak", 9),
    ]);
    if !args.json {
        pb.suspend(|| -> Result<(), Stop> {
            outln!(
                "cpuconv {} gemm: ours = native {isa} kernels, mm = matrixmultiply (it picks \
                 its own ISA); C = A·B, row-major f32, median of samples; % peak is of the \
                 {isa} FMA peak.",
                env!("CARGO_PKG_VERSION")
            )?;
            for (&t, &p) in threads.iter().zip(&peaks) {
                outln!(
                    "Measured {isa} FMA peak, {t} thread{}: {} GFLOP/s",
                    if t == 1 { "" } else { "s" },
                    sig(p)
                )?;
            }
            outln!("\n{}", table.header())
        })
        .inspect_err(|_| pb.finish_and_clear())?;
    }

    for (&t, &peak) in threads.iter().zip(&peaks) {
        let pool = pool(t)?;
        let result = pool.install(|| -> Result<(), Stop> {
            for &(m, k, n) in &shapes {
                let name = shape_name((m, k, n));
                pb.set_message(format!("{name}, {t} thread(s)"));
                // The benchmark's seed; wrapping only matters for shapes too
                // big to allocate, which the checks above already refused.
                let seed = m
                    .wrapping_mul(31)
                    .wrapping_add(k.wrapping_mul(17))
                    .wrapping_add(n);
                let mut rng = Rng::new(seed as u64);
                // The sizes were checked above; the allocations can still fail.
                let in_shape = |e: String| format!("{name}: {e}");
                let a = rng.try_vec("A", m * k).map_err(in_shape)?;
                let b = rng.try_vec("B", k * n).map_err(in_shape)?;
                let mut c = try_filled("C", m * n, 0.0).map_err(in_shape)?;
                let options = |backend| {
                    GemmOptions::default()
                        .backend(backend)
                        .parallelism(Parallelism::threads(t))
                        .isa(Some(isa))
                };
                let ours = time_gemm(
                    &budget,
                    (m, k, n),
                    &a,
                    &b,
                    &mut c,
                    &options(GemmBackend::Native),
                )?;
                let mm = time_gemm(
                    &budget,
                    (m, k, n),
                    &a,
                    &b,
                    &mut c,
                    &options(GemmBackend::Matrixmultiply),
                )?;
                let flops = 2.0 * m as f64 * k as f64 * n as f64;
                let (g_ours, g_mm) = (flops / ours.median_s / 1e9, flops / mm.median_s / 1e9);
                let line = if args.json {
                    serde_json::json!({
                        "m": m,
                        "k": k,
                        "n": n,
                        "threads": t,
                        "isa": isa.name(),
                        "ours_gflops": g_ours,
                        "mm_gflops": g_mm,
                        "ratio": g_ours / g_mm,
                        "ours_pct_peak": 100.0 * g_ours / peak,
                        "mm_pct_peak": 100.0 * g_mm / peak,
                        "peak_gflops": peak,
                        "ours_median_ms": ours.median_s * 1e3,
                        "mm_median_ms": mm.median_s * 1e3,
                    })
                    .to_string()
                } else {
                    table.row(&[
                        name.clone(),
                        t.to_string(),
                        sig(g_ours),
                        sig(g_mm),
                        format!("{:.2}", g_ours / g_mm),
                        format!("{:.0}%", 100.0 * g_ours / peak),
                        format!("{:.0}%", 100.0 * g_mm / peak),
                    ])
                };
                pb.suspend(|| outln!("{line}"))?;
                pb.inc(1);
            }
            Ok(())
        });
        if let Err(e) = result {
            pb.finish_and_clear();
            return Err(e);
        }
    }
    pb.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_lists_parse() {
        assert_eq!(parse_threads("1,2"), Ok(vec![1, 2]));
        assert_eq!(
            parse_threads("1, all"),
            Ok(vec![1, all_threads()]).map(|mut v| {
                v.dedup();
                v
            })
        );
        assert_eq!(parse_threads("0"), Ok(vec![all_threads()]));
        assert_eq!(parse_threads("0,all"), Ok(vec![all_threads()]));
        assert!(parse_threads("x").is_err());
        assert!(parse_threads("").is_err());
    }
}
