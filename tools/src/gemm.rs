//! `cpuconv gemm`: our GEMM against matrixmultiply (and, built with the
//! `peers` feature, the `gemm` crate and faer), as GFLOP/s and as a share of
//! the FMA peak measured in the same run.

use crate::mem::check_room;
use crate::out::{outln, Stop};
use crate::suite::{self, try_filled, Rng};
use crate::table::{left, right, sig, Column, Table};
use crate::timing::{measure, Budget, Timing};
use crate::{all_threads, effective_isa, isa_parser, placement, pool, progress};
use clap::Args;
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::gemm::{sgemm, MatMut, MatRef};
use cpuconv::{GemmBackend, GemmOptions, Isa, Parallelism};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Thread counts to run, comma-separated; 0 (or `all`) is every CPU.
    #[arg(long, value_name = "LIST", default_value = "1,all")]
    pub(crate) threads: String,

    /// Kernel path of our GEMM; clamped to the CPU. Default: the active
    /// path. matrixmultiply picks its own.
    #[arg(long, value_parser = isa_parser())]
    pub(crate) isa: Option<Isa>,

    /// A shape `MxKxN`, or one number for a square (repeatable); replaces
    /// the default list (squares 64..2048 and the suite's im2col GEMMs).
    #[arg(long = "shape", value_name = "MxKxN", value_parser = suite::parse_gemm_shape)]
    pub(crate) shapes: Vec<(usize, usize, usize)>,

    /// One JSON object per row on stdout instead of the Markdown table.
    #[arg(long)]
    pub(crate) json: bool,

    /// Rough time budget per (shape, threads, engine), in milliseconds
    /// (with --placement: per operand placement, split over the rounds).
    #[arg(long, value_name = "MS", default_value_t = 600)]
    pub(crate) budget_ms: u64,

    /// Also time the `gemm` crate and faer on the same operands and threads,
    /// each checked against our result, with ours / the fastest peer
    /// (matrixmultiply included). Needs the tool built with
    /// `--features peers`.
    #[arg(long)]
    pub(crate) peers: bool,

    /// How A and B are stored: `nn` both row-major; `nt` B column-major
    /// (`A·Wᵀ` with W row-major, as in a linear layer); `tn` A
    /// column-major; `tt` both. C is row-major; every engine gets the same
    /// layout. Not with --placement.
    #[arg(long, value_enum, default_value_t = Layout::Nn)]
    pub(crate) layout: Layout,

    /// Time our GEMM with A, B and C starting 0, 1, 3, 4, 8, 12 and 16
    /// floats past a 4 KiB boundary: all three at the offset, then each
    /// alone (the others at 0). With --peers, the peers get the all-three
    /// row too. No FMA peak is measured.
    #[arg(long)]
    pub(crate) placement: bool,

    /// With --placement: how many times each placement is timed, every
    /// placement once per round; a row shows the median over the rounds,
    /// so that the machine's drift spreads over every placement.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub(crate) rounds: usize,
}

/// How A and B are stored: `t` is column-major (the transpose of a
/// row-major matrix), `n` row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Both row-major.
    Nn,
    /// B column-major.
    Nt,
    /// A column-major.
    Tn,
    /// Both column-major.
    Tt,
}

impl Layout {
    /// Whether A, then B, is column-major.
    pub fn column_major(self) -> (bool, bool) {
        match self {
            Layout::Nn => (false, false),
            Layout::Nt => (false, true),
            Layout::Tn => (true, false),
            Layout::Tt => (true, true),
        }
    }

    /// Its name in the header and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Nn => "nn",
            Layout::Nt => "nt",
            Layout::Tn => "tn",
            Layout::Tt => "tt",
        }
    }

    /// (row stride, column stride) of an `rows × cols` operand.
    #[cfg(feature = "peers")]
    fn strides(column_major: bool, rows: usize, cols: usize) -> (usize, usize) {
        if column_major {
            (1, rows)
        } else {
            (cols, 1)
        }
    }
}

/// A GEMM implementation the tool can time on dense `f32` operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// cpuconv's own GEMM on the chosen ISA path.
    Ours,
    /// The matrixmultiply crate, through cpuconv's backend switch.
    Matrixmultiply,
    /// sarah-quinones' `gemm` crate (AVX-512 kernels picked at run time).
    #[cfg(feature = "peers")]
    GemmCrate,
    /// faer's matmul (its own x86 kernels, AVX-512 picked at run time).
    #[cfg(feature = "peers")]
    Faer,
}

/// The engines `--peers` adds; empty when the tool was built without them.
#[cfg(feature = "peers")]
pub const EXTRA_PEERS: &[Engine] = &[Engine::GemmCrate, Engine::Faer];
/// The engines `--peers` adds; empty when the tool was built without them.
#[cfg(not(feature = "peers"))]
pub const EXTRA_PEERS: &[Engine] = &[];

impl Engine {
    /// The name in tables and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Ours => "ours",
            Engine::Matrixmultiply => "mm",
            #[cfg(feature = "peers")]
            Engine::GemmCrate => "gemm",
            #[cfg(feature = "peers")]
            Engine::Faer => "faer",
        }
    }

    /// Its GFLOP/s column header (a `'static` str, as tables want).
    fn gflops_header(self) -> &'static str {
        match self {
            Engine::Ours => "ours GFLOP/s",
            Engine::Matrixmultiply => "mm GFLOP/s",
            #[cfg(feature = "peers")]
            Engine::GemmCrate => "gemm GFLOP/s",
            #[cfg(feature = "peers")]
            Engine::Faer => "faer GFLOP/s",
        }
    }

    /// `c = a·b`, dense, A and B stored as `layout` says, C row-major, on
    /// `threads` threads of the current rayon pool (1: the calling thread
    /// only). `isa` steers ours only: the others pick their own kernels.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
        (m, k, n): (usize, usize, usize),
        layout: Layout,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        threads: usize,
        isa: Isa,
    ) -> Result<(), String> {
        if a.len() != m * k || b.len() != k * n || c.len() != m * n {
            return Err(format!(
                "{}: operand lengths {}, {}, {} do not fit {m}x{k}x{n}",
                self.name(),
                a.len(),
                b.len(),
                c.len()
            ));
        }
        let backend = match self {
            Engine::Ours => GemmBackend::Native,
            Engine::Matrixmultiply => GemmBackend::Matrixmultiply,
            #[cfg(feature = "peers")]
            Engine::GemmCrate => {
                peers::gemm_crate((m, k, n), layout, a, b, c, threads);
                return Ok(());
            }
            #[cfg(feature = "peers")]
            Engine::Faer => {
                peers::faer((m, k, n), layout, a, b, c, threads);
                return Ok(());
            }
        };
        let options = GemmOptions::default()
            .backend(backend)
            .parallelism(Parallelism::threads(threads))
            .isa(Some(isa));
        let (a_t, b_t) = layout.column_major();
        let view = |data, rows, cols, t| {
            if t {
                MatRef::col_major(data, rows, cols)
            } else {
                MatRef::row_major(data, rows, cols)
            }
        };
        sgemm(
            1.0,
            view(a, m, k, a_t),
            view(b, k, n, b_t),
            0.0,
            MatMut::row_major(c, m, n),
            &options,
        )
        .map_err(|e| format!("{}: {e}", self.name()))
    }
}

/// The calls into the peer crates, whose only forms are theirs.
#[cfg(feature = "peers")]
mod peers {
    use super::Layout;

    /// `c = a·b` with the `gemm` crate; lengths checked by [`super::Engine::run`].
    pub fn gemm_crate(
        (m, k, n): (usize, usize, usize),
        layout: Layout,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        threads: usize,
    ) {
        assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
        let par = if threads <= 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let stride = |s: usize| isize::try_from(s).expect("a slice length fits in isize");
        let (a_t, b_t) = layout.column_major();
        let (a_rs, a_cs) = Layout::strides(a_t, m, k);
        let (b_rs, b_cs) = Layout::strides(b_t, k, n);
        // SAFETY: `a`, `b` and `c` hold exactly m·k, k·n and m·n floats (asserted
        // above), and each is described as dense over its own slice (C
        // row-major; A and B row-major, or column-major with row stride 1
        // and column stride m or k), so every element the call touches lies
        // inside its slice. `c` is an exclusive borrow, so it overlaps
        // neither input. The crate's argument order is (dst, dst column
        // stride, dst row stride, read_dst, lhs…, rhs…, alpha, beta, …) and it
        // computes dst = alpha·dst + beta·lhs·rhs: with read_dst false and
        // beta 1 that is c = a·b, and c's old values are never read.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                stride(n),
                false,
                a.as_ptr(),
                stride(a_cs),
                stride(a_rs),
                b.as_ptr(),
                stride(b_cs),
                stride(b_rs),
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// `c = a·b` with faer's matmul.
    pub fn faer(
        (m, k, n): (usize, usize, usize),
        layout: Layout,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        threads: usize,
    ) {
        let par = if threads <= 1 {
            faer::Par::Seq
        } else {
            faer::Par::rayon(threads)
        };
        let view = |data, rows, cols, t| {
            if t {
                faer::MatRef::from_column_major_slice(data, rows, cols)
            } else {
                faer::MatRef::from_row_major_slice(data, rows, cols)
            }
        };
        let (a_t, b_t) = layout.column_major();
        faer::linalg::matmul::matmul(
            faer::MatMut::from_row_major_slice_mut(c, m, n),
            faer::Accum::Replace,
            view(a, m, k, a_t),
            view(b, k, n, b_t),
            1.0f32,
            par,
        );
    }
}

/// Fails unless the tool has the peer engines, when `--peers` asks for them.
pub fn check_peers_built(peers: bool) -> Result<(), String> {
    if peers && EXTRA_PEERS.is_empty() {
        return Err(
            "--peers: this cpuconv was built without the `peers` feature; \
                    build it with `cargo build --release -p cpuconv-tools --features peers`"
                .into(),
        );
    }
    Ok(())
}

/// `--threads`: 0 means every CPU, as in `compare --threads`; each count
/// is resolved here, since the table and the peak need the real number.
pub fn parse_threads(list: &str) -> Result<Vec<usize>, String> {
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

/// Times `c = a·b` on one engine. `c` is filled with NaN first, so an
/// engine that writes nothing cannot pass the check that follows on the
/// previous engine's result.
pub fn time_engine(
    budget: &Budget,
    engine: Engine,
    shape: (usize, usize, usize),
    layout: Layout,
    (a, b, c): (&[f32], &[f32], &mut [f32]),
    threads: usize,
    isa: Isa,
) -> Result<Timing, String> {
    c.fill(f32::NAN);
    let mut failure = None;
    let t = measure(budget, || {
        if let Err(e) = engine.run(shape, layout, a, b, c, threads, isa) {
            failure.get_or_insert(e);
        }
    });
    match failure {
        Some(e) => Err(format!("{}: {e}", shape_name(shape))),
        None => Ok(t),
    }
}

/// Largest `|x − y|`; NaN if any difference is NaN (an unwritten output).
pub fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    let mut worst = 0.0f32;
    for (p, q) in x.iter().zip(y) {
        let d = (p - q).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}

/// Fails when `engine`'s `c` is further from ours than rounding explains.
/// Operands are uniform in [-1, 1), so each of the m·n sums has k terms
/// below 1 in size; summation orders differ between engines, and 1e-4·k
/// is far above their rounding yet far below what a wrong stride or a
/// skipped block gives (errors of order √k).
pub fn check_result(
    engine: Engine,
    shape: (usize, usize, usize),
    c: &[f32],
    ours: &[f32],
) -> Result<f32, String> {
    let diff = max_abs_diff(c, ours);
    let tolerance = 1e-4 * shape.1.max(1) as f32;
    if diff <= tolerance {
        Ok(diff)
    } else {
        Err(format!(
            "{}: {}'s result differs from ours by {diff} (tolerance {tolerance}): \
             its numbers would not be a speed",
            shape_name(shape),
            engine.name()
        ))
    }
}

/// The name of a shape in the table and in messages.
pub fn shape_name((m, k, n): (usize, usize, usize)) -> String {
    format!("{m}x{k}x{n}")
}

/// `--shape`s, or the default list, each checked to be runnable (positive,
/// and A, B, C plus `extra_floats` per operand fit in memory) before any
/// time is spent measuring.
pub fn checked_shapes(
    shapes: &[(usize, usize, usize)],
    extra_floats: usize,
) -> Result<Vec<(usize, usize, usize)>, String> {
    let shapes = if shapes.is_empty() {
        suite::gemm_shapes()
    } else {
        shapes.to_vec()
    };
    for &(m, k, n) in &shapes {
        let name = shape_name((m, k, n));
        if m == 0 || k == 0 || n == 0 {
            return Err(format!("{name}: every dimension must be positive"));
        }
        let len = |rows: usize, cols: usize, what: &str| {
            rows.checked_mul(cols)
                .and_then(|l| l.checked_add(extra_floats))
                .ok_or_else(|| format!("{name}: {what} has more elements than fit in usize"))
        };
        check_room(&[
            ("A", len(m, k, "A")?),
            ("B", len(k, n, "B")?),
            ("C", len(m, n, "C")?),
            ("reference C", len(m, n, "C")?),
        ])
        .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(shapes)
}

/// The benchmark's operands A (m×k) and B (k×n) for a shape, from a seed of
/// the shape's own, so every run and mode multiplies the same numbers.
pub fn operands((m, k, n): (usize, usize, usize)) -> Result<(Vec<f32>, Vec<f32>), String> {
    // Wrapping only matters for shapes too big to allocate, which
    // `checked_shapes` already refused.
    let seed = m
        .wrapping_mul(31)
        .wrapping_add(k.wrapping_mul(17))
        .wrapping_add(n);
    let mut rng = Rng::new(seed as u64);
    let name = shape_name((m, k, n));
    let in_shape = |e: String| format!("{name}: {e}");
    let a = rng.try_vec("A", m * k).map_err(in_shape)?;
    let b = rng.try_vec("B", k * n).map_err(in_shape)?;
    Ok((a, b))
}

/// What one engine gave on one shape.
struct EngineResult {
    engine: Engine,
    t: Timing,
    gflops: f64,
    /// Largest difference from our result (0 for ours).
    diff: f32,
}

/// Entry point of `cpuconv gemm`.
pub fn run(args: &GemmArgs) -> Result<(), Stop> {
    check_peers_built(args.peers)?;
    if args.placement {
        if args.layout != Layout::Nn {
            return Err("--placement times row-major operands only (--layout nn)"
                .to_string()
                .into());
        }
        return placement::run_gemm(args);
    }
    let threads = parse_threads(&args.threads)?;
    let isa = effective_isa(args.isa);
    // Every shape must be runnable before the peaks take their seconds.
    let shapes = checked_shapes(&args.shapes, 0)?;
    let budget = Budget::new(Duration::from_millis(args.budget_ms));
    let engines: Vec<Engine> = [Engine::Ours, Engine::Matrixmultiply]
        .into_iter()
        .chain(if args.peers { EXTRA_PEERS } else { &[] }.iter().copied())
        .collect();

    // Peaks first, so the table can quote them from its first row.
    let pb = progress((threads.len() * (shapes.len() + 1)) as u64);
    let mut peaks = Vec::new();
    for &t in &threads {
        pb.set_message(format!("FMA peak, {t} thread(s)"));
        peaks.push(fma_peak_gflops(isa, t));
        pb.inc(1);
    }
    let mut columns: Vec<Column> = vec![left("shape MxKxN", 16), right("threads", 7)];
    columns.extend(engines.iter().map(|e| right(e.gflops_header(), 10)));
    columns.push(right("ours/mm", 7));
    if args.peers {
        columns.push(right("ours/best peer", 14));
    }
    columns.extend([right("ours % peak", 11), right("mm % peak", 9)]);
    let table = Table::new(&columns);
    if !args.json {
        pb.suspend(|| -> Result<(), Stop> {
            outln!(
                "cpuconv {} gemm: ours = native {isa} kernels, mm = matrixmultiply (it picks \
                 its own ISA){}; C = A·B, f32, layout {} (A, B: n row-major, t \
                 column-major; C row-major), same operands and threads, median of samples; \
                 % peak is of the {isa} FMA peak.",
                env!("CARGO_PKG_VERSION"),
                if args.peers {
                    ", gemm = the gemm crate, faer = faer's matmul (each picks its own \
                     ISA, checked against ours once per shape); best peer = the fastest \
                     of mm, gemm and faer"
                } else {
                    ""
                },
                args.layout.name()
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
            for &shape in &shapes {
                let (m, k, n) = shape;
                let name = shape_name(shape);
                pb.set_message(format!("{name}, {t} thread(s)"));
                // The sizes were checked above; the allocations can still fail.
                let in_shape = |e: String| format!("{name}: {e}");
                let (a, b) = operands(shape)?;
                let mut c = try_filled("C", m * n, 0.0).map_err(in_shape)?;
                let mut reference = try_filled("reference C", m * n, 0.0).map_err(in_shape)?;
                let flops = 2.0 * m as f64 * k as f64 * n as f64;
                let mut results = Vec::with_capacity(engines.len());
                for &engine in &engines {
                    let timing = time_engine(
                        &budget,
                        engine,
                        shape,
                        args.layout,
                        (&a, &b, &mut c),
                        t,
                        isa,
                    )?;
                    let diff = if engine == Engine::Ours {
                        reference.copy_from_slice(&c);
                        0.0
                    } else {
                        check_result(engine, shape, &c, &reference)?
                    };
                    results.push(EngineResult {
                        engine,
                        t: timing,
                        gflops: flops / timing.median_s / 1e9,
                        diff,
                    });
                }
                let line = row(args, &table, shape, t, isa, peak, &results);
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

/// One shape's table row or JSON object. `results` starts with ours, then
/// matrixmultiply, then the peers.
fn row(
    args: &GemmArgs,
    table: &Table,
    (m, k, n): (usize, usize, usize),
    t: usize,
    isa: Isa,
    peak: f64,
    results: &[EngineResult],
) -> String {
    let (ours, mm) = (&results[0], &results[1]);
    let best = results[1..]
        .iter()
        .max_by(|x, y| x.gflops.total_cmp(&y.gflops))
        .expect("matrixmultiply always runs");
    if args.json {
        let mut obj = serde_json::json!({
            "m": m,
            "k": k,
            "n": n,
            "threads": t,
            "layout": args.layout.name(),
            "isa": isa.name(),
            "ours_gflops": ours.gflops,
            "mm_gflops": mm.gflops,
            "ratio": ours.gflops / mm.gflops,
            "ours_pct_peak": 100.0 * ours.gflops / peak,
            "mm_pct_peak": 100.0 * mm.gflops / peak,
            "peak_gflops": peak,
            "ours_median_ms": ours.t.median_s * 1e3,
            "mm_median_ms": mm.t.median_s * 1e3,
            "mm_max_abs_diff": mm.diff,
        });
        if args.peers {
            let map = obj.as_object_mut().expect("an object");
            for r in &results[2..] {
                let name = r.engine.name();
                map.insert(format!("{name}_gflops"), r.gflops.into());
                map.insert(format!("{name}_median_ms"), (r.t.median_s * 1e3).into());
                map.insert(format!("{name}_max_abs_diff"), r.diff.into());
            }
            map.insert("best_peer".into(), best.engine.name().into());
            map.insert("best_peer_gflops".into(), best.gflops.into());
            map.insert("ratio_best_peer".into(), (ours.gflops / best.gflops).into());
        }
        return obj.to_string();
    }
    let mut cells = vec![shape_name((m, k, n)), t.to_string()];
    cells.extend(results.iter().map(|r| sig(r.gflops)));
    cells.push(format!("{:.2}", ours.gflops / mm.gflops));
    if args.peers {
        cells.push(format!(
            "{:.2} ({})",
            ours.gflops / best.gflops,
            best.engine.name()
        ));
    }
    cells.extend([
        format!("{:.0}%", 100.0 * ours.gflops / peak),
        format!("{:.0}%", 100.0 * mm.gflops / peak),
    ]);
    table.row(&cells)
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

    /// Every engine computes the same product on an odd shape, so a peer's
    /// call cannot be wired with a wrong stride or argument order.
    #[test]
    fn every_engine_agrees_with_ours() {
        let shape = (7, 13, 19);
        let (a, b) = operands(shape).unwrap();
        let mut expected = vec![0.0f32; 7 * 19];
        for i in 0..7 {
            for j in 0..19 {
                expected[i * 19 + j] = (0..13).map(|p| a[i * 13 + p] * b[p * 19 + j]).sum();
            }
        }
        let isa = effective_isa(None);
        let engines = [Engine::Ours, Engine::Matrixmultiply];
        for &engine in engines.iter().chain(EXTRA_PEERS) {
            for threads in [1, 2] {
                let mut c = vec![f32::NAN; 7 * 19];
                for layout in [Layout::Nn, Layout::Nt, Layout::Tn, Layout::Tt] {
                    let (a_t, b_t) = layout.column_major();
                    let mut c = vec![f32::NAN; 7 * 19];
                    engine
                        .run(shape, layout, &a, &b, &mut c, threads, isa)
                        .unwrap();
                    let want: Vec<f32> = (0..7 * 19)
                        .map(|ij| {
                            let (i, j) = (ij / 19, ij % 19);
                            (0..13)
                                .map(|p| {
                                    let x = if a_t { a[p * 7 + i] } else { a[i * 13 + p] };
                                    let y = if b_t { b[j * 13 + p] } else { b[p * 19 + j] };
                                    x * y
                                })
                                .sum()
                        })
                        .collect();
                    let diff = check_result(engine, shape, &c, &want);
                    assert!(
                        diff.is_ok(),
                        "{engine:?} {layout:?}, {threads} threads: {diff:?}"
                    );
                }
                engine
                    .run(shape, Layout::Nn, &a, &b, &mut c, threads, isa)
                    .unwrap();
                let diff = check_result(engine, shape, &c, &expected);
                assert!(diff.is_ok(), "{engine:?}, {threads} threads: {diff:?}");
            }
        }
    }

    #[test]
    fn a_wrong_result_is_refused() {
        let shape = (2, 8, 2);
        let ours = [1.0, 2.0, 3.0, 4.0];
        assert!(check_result(Engine::Matrixmultiply, shape, &ours, &ours).is_ok());
        let wrong = [1.0, 3.0, 2.0, 4.0];
        let e = check_result(Engine::Matrixmultiply, shape, &wrong, &ours).unwrap_err();
        assert!(e.contains("2x8x2: mm's result differs from ours"), "{e}");
        let unwritten = [f32::NAN; 4];
        assert!(check_result(Engine::Matrixmultiply, shape, &unwritten, &ours).is_err());
    }

    #[test]
    fn peers_without_the_feature_is_a_message() {
        assert!(check_peers_built(false).is_ok());
        assert_eq!(check_peers_built(true).is_ok(), !EXTRA_PEERS.is_empty());
    }
}
