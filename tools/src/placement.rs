//! Where the operands start in memory: `gemm --placement` and `compare
//! --placement`.
//!
//! Users hand the library plain `Vec<f32>` buffers, which start wherever
//! the allocator put them: 4-byte aligned, and at any float within a cache
//! line or a page. A kernel that is fast only on aligned operands (split
//! loads, 4 KiB aliasing between a load stream and a store stream, prefetch
//! crossing pages) would be slow for some users and fast in every benchmark
//! whose buffers happen to be page-aligned. So each operand is placed
//! exactly `off` floats past a 4 KiB boundary, for the offsets in
//! [`OFFSETS`], and each placement is timed and checked against the result
//! at natural placement.

use crate::gemm::{
    check_result, checked_shapes, max_abs_diff, operands, parse_threads, shape_name, time_engine,
    Engine, GemmArgs, Layout, EXTRA_PEERS,
};
use crate::mem::check_room;
use crate::out::{outln, Stop};
use crate::suite::{self, try_alloc, try_filled, Layer};
use crate::table::{left, right, sig, Column, Table};
use crate::timing::{try_measure, Budget};
use crate::{effective_isa, pool, progress, BackendArg};
use cpuconv::{Activation, Algorithm, ForwardOptions, Isa, Parallelism};
use std::time::Duration;

/// Floats past a 4 KiB boundary where a placed operand starts: aligned, one
/// float off, odd, 16 bytes (SSE), 32 bytes (AVX), 48 bytes, and a whole
/// 64-byte cache line (AVX-512).
pub const OFFSETS: [usize; 7] = [0, 1, 3, 4, 8, 12, 16];
/// The column headers of [`OFFSETS`].
const OFFSET_HEADERS: [&str; 7] = ["+0", "+1", "+3", "+4", "+8", "+12", "+16"];

/// The boundary the offsets count from: a page, the period of the 4 KiB
/// aliasing that loads and stores suffer on x86 cores.
const PAGE_BYTES: usize = 4096;
/// Floats in a page: the room a [`Placed`] buffer allocates beyond its length.
const PAGE_FLOATS: usize = PAGE_BYTES / std::mem::size_of::<f32>();

/// `len` floats starting exactly `offset` floats past a 4 KiB boundary,
/// inside an ordinary `Vec<f32>` that has a page of room to slide in.
/// Safe code: the start is found from the buffer's address, which a `Vec`
/// keeps as long as it does not grow.
pub struct Placed {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

/// The index in a buffer at byte address `addr` (a multiple of 4) whose
/// address is `offset` floats past a 4 KiB boundary: always below a page.
fn start_index(addr: usize, offset: usize) -> usize {
    debug_assert!(addr.is_multiple_of(std::mem::size_of::<f32>()) && offset < PAGE_FLOATS);
    let want = offset * std::mem::size_of::<f32>();
    let have = addr % PAGE_BYTES;
    (want + PAGE_BYTES - have) % PAGE_BYTES / std::mem::size_of::<f32>()
}

impl Placed {
    /// `len` copies of `value` at `offset` floats past a 4 KiB boundary, or
    /// an error naming `what` when the memory cannot be had.
    pub fn filled(what: &str, len: usize, value: f32, offset: usize) -> Result<Self, String> {
        if offset >= PAGE_FLOATS {
            return Err(format!(
                "{what}: offset {offset} is not below a page ({PAGE_FLOATS} floats)"
            ));
        }
        let total = len
            .checked_add(PAGE_FLOATS)
            .ok_or_else(|| format!("{what}: {len} floats and a page do not fit in usize"))?;
        let mut buf = try_alloc(what, total)?;
        // Within the capacity reserved above: the buffer does not move.
        buf.resize(total, value);
        let start = start_index(buf.as_ptr() as usize, offset);
        Ok(Placed { buf, start, len })
    }

    /// A copy of `src` at `offset` floats past a 4 KiB boundary.
    pub fn copy_of(what: &str, src: &[f32], offset: usize) -> Result<Self, String> {
        let mut placed = Placed::filled(what, src.len(), 0.0, offset)?;
        placed.as_mut_slice().copy_from_slice(src);
        Ok(placed)
    }

    /// The placed floats.
    pub fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The placed floats, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Smallest and largest of `values`.
fn min_max(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    values
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// A placement table: a label column or two, one column per offset, min, max.
fn offset_table(labels: &[Column]) -> Table {
    let mut columns = labels.to_vec();
    columns.extend(OFFSET_HEADERS.iter().map(|&h| right(h, 5)));
    columns.extend([right("min", 5), right("max", 5)]);
    Table::new(&columns)
}

/// One table row: the labels, then GFLOP/s per offset and their min and max.
fn offset_row(table: &Table, labels: &[String], gflops: &[f64]) -> String {
    let (lo, hi) = min_max(gflops.iter().copied());
    let mut cells = labels.to_vec();
    cells.extend(gflops.iter().map(|&g| sig(g)));
    cells.extend([sig(lo), sig(hi)]);
    table.row(&cells)
}

/// Which GEMM operands a row moves to the offset (the others start at 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmMode {
    All,
    A,
    B,
    C,
}

impl GemmMode {
    const EVERY: [GemmMode; 4] = [GemmMode::All, GemmMode::A, GemmMode::B, GemmMode::C];

    fn name(self) -> &'static str {
        match self {
            GemmMode::All => "all",
            GemmMode::A => "A",
            GemmMode::B => "B",
            GemmMode::C => "C",
        }
    }

    /// The offsets of A, B and C in this mode.
    fn offsets(self, off: usize) -> [usize; 3] {
        match self {
            GemmMode::All => [off; 3],
            GemmMode::A => [off, 0, 0],
            GemmMode::B => [0, off, 0],
            GemmMode::C => [0, 0, off],
        }
    }
}

/// The distinct keys of `keys`, first occurrence first: a placement two
/// rows share (every mode's offset 0) is measured once.
fn distinct<K: PartialEq + Copy>(keys: impl IntoIterator<Item = K>) -> Vec<K> {
    let mut out: Vec<K> = Vec::new();
    for k in keys {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// Measures every key once per round, `rounds` times, the keys of round
/// `r` starting at key `r` (so that no placement always runs first or
/// right after the same one), and returns each key's median over the
/// rounds. The placements of one table are compared with each other: a
/// sequential sweep would credit a neighbour's burst of load on this
/// shared machine to whichever placement ran during it, and the min/max
/// of a row would measure the machine, not the placement.
fn interleaved<K: Copy>(
    keys: &[K],
    rounds: usize,
    mut measure: impl FnMut(K) -> Result<f64, String>,
) -> Result<Vec<f64>, String> {
    let rounds = rounds.max(1);
    let mut samples = vec![Vec::with_capacity(rounds); keys.len()];
    for r in 0..rounds {
        for i in 0..keys.len() {
            let j = (i + r) % keys.len();
            samples[j].push(measure(keys[j])?);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// The budget of one placement in one of `rounds` rounds: `budget_ms`
/// split over them, with a shorter warm-up than a lone measurement's (each
/// round's first call still pays for the fresh buffers' page faults).
fn round_budget(budget_ms: u64, rounds: usize) -> Budget {
    Budget::new(Duration::from_millis(budget_ms / rounds.max(1) as u64))
        .warm_up(Duration::from_millis(30))
}

/// The median of `values` (the mean of the middle two for an even count;
/// NaN for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// `cpuconv gemm --placement`.
pub fn run_gemm(args: &GemmArgs) -> Result<(), Stop> {
    let threads = parse_threads(&args.threads)?;
    let isa = effective_isa(args.isa);
    let shapes = checked_shapes(&args.shapes, PAGE_FLOATS)?;
    let rounds = args.rounds.max(1);
    let budget = round_budget(args.budget_ms, rounds);
    // Ours in every mode; with --peers, each peer with all operands moved.
    let mut rows: Vec<(Engine, GemmMode)> =
        GemmMode::EVERY.iter().map(|&m| (Engine::Ours, m)).collect();
    if args.peers {
        rows.extend(
            [Engine::Matrixmultiply]
                .iter()
                .chain(EXTRA_PEERS)
                .map(|&e| (e, GemmMode::All)),
        );
    }
    let table = offset_table(&[left("placed", 6), left("engine", 6)]);
    if !args.json {
        outln!(
            "cpuconv {} gemm --placement: GFLOP/s of C = A·B (row-major f32, median of \
             samples) with the operands starting +N floats past a 4 KiB boundary: `all` \
             moves A, B and C, `A`/`B`/`C` moves that one (the others at +0). ours = \
             native {isa} kernels{}. Every result is checked against ours at natural \
             placement.",
            env!("CARGO_PKG_VERSION"),
            if args.peers {
                "; mm = matrixmultiply, gemm = the gemm crate, faer = faer's matmul \
                 (each picks its own ISA)"
            } else {
                ""
            }
        )?;
    }
    let keys = distinct(
        rows.iter()
            .flat_map(|&(engine, mode)| OFFSETS.map(|off| (engine, mode.offsets(off)))),
    );
    let pb = progress((threads.len() * shapes.len() * keys.len() * rounds) as u64);
    for &t in &threads {
        let pool = pool(t)?;
        let result = pool.install(|| -> Result<(), Stop> {
            for &shape in &shapes {
                let name = shape_name(shape);
                let (a, b) = operands(shape)?;
                let mut reference = try_filled("reference C", shape.0 * shape.2, 0.0)
                    .map_err(|e| format!("{name}: {e}"))?;
                Engine::Ours.run(shape, Layout::Nn, &a, &b, &mut reference, t, isa)?;
                if !args.json {
                    let header = format!(
                        "\n{name}, {t} thread{}, GFLOP/s:\n\n{}",
                        if t == 1 { "" } else { "s" },
                        table.header()
                    );
                    pb.suspend(|| outln!("{header}"))?;
                }
                let medians = interleaved(&keys, rounds, |(engine, place)| {
                    pb.set_message(format!(
                        "{name}, {t} thread(s), {} at {place:?}",
                        engine.name()
                    ));
                    let g = time_placed_gemm(
                        &budget,
                        engine,
                        shape,
                        place,
                        (&a, &b),
                        &reference,
                        t,
                        isa,
                    );
                    pb.inc(1);
                    g
                })?;
                let gflops_at = |key: (Engine, [usize; 3])| {
                    keys.iter()
                        .position(|&k| k == key)
                        .map_or(f64::NAN, |i| medians[i])
                };
                let mut per_row = Vec::with_capacity(rows.len());
                for &(engine, mode) in &rows {
                    let gflops: Vec<f64> = OFFSETS
                        .iter()
                        .map(|&off| gflops_at((engine, mode.offsets(off))))
                        .collect();
                    let (lo, hi) = min_max(gflops.iter().copied());
                    let line = if args.json {
                        serde_json::json!({
                            "m": shape.0,
                            "k": shape.1,
                            "n": shape.2,
                            "threads": t,
                            "isa": isa.name(),
                            "engine": engine.name(),
                            "placed": mode.name(),
                            "offsets": OFFSETS,
                            "gflops": gflops,
                            "min": lo,
                            "max": hi,
                        })
                        .to_string()
                    } else {
                        let labels = [mode.name().to_string(), engine.name().to_string()];
                        offset_row(&table, &labels, &gflops)
                    };
                    pb.suspend(|| outln!("{line}"))?;
                    per_row.push((engine, lo, hi));
                }
                let summary = gemm_summary(args.json, shape, t, isa, &per_row);
                pb.suspend(|| outln!("{summary}"))?;
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

/// Times one engine with A, B and C at `place` (floats past a page) and
/// checks its product; returns GFLOP/s.
#[allow(clippy::too_many_arguments)]
fn time_placed_gemm(
    budget: &Budget,
    engine: Engine,
    shape: (usize, usize, usize),
    place: [usize; 3],
    (a, b): (&[f32], &[f32]),
    reference: &[f32],
    threads: usize,
    isa: Isa,
) -> Result<f64, String> {
    let (m, k, n) = shape;
    let in_shape = |e: String| format!("{}: {e}", shape_name(shape));
    let pa = Placed::copy_of("A", a, place[0]).map_err(in_shape)?;
    let pb = Placed::copy_of("B", b, place[1]).map_err(in_shape)?;
    let mut pc = Placed::filled("C", m * n, f32::NAN, place[2]).map_err(in_shape)?;
    let operands = (pa.as_slice(), pb.as_slice(), pc.as_mut_slice());
    let t = time_engine(budget, engine, shape, Layout::Nn, operands, threads, isa)?;
    check_result(engine, shape, pc.as_slice(), reference)?;
    Ok(2.0 * m as f64 * k as f64 * n as f64 / t.median_s / 1e9)
}

/// The closing line of a shape: ours over every placement, and, with
/// peers, against the best peer: ours' slowest placement over the peer's
/// fastest (the target: at least 1.0) and over the peer's slowest.
fn gemm_summary(
    json: bool,
    shape: (usize, usize, usize),
    t: usize,
    isa: Isa,
    per_row: &[(Engine, f64, f64)],
) -> String {
    let (lo, hi) = min_max(
        per_row
            .iter()
            .filter(|r| r.0 == Engine::Ours)
            .flat_map(|r| [r.1, r.2]),
    );
    // The best peer: the fastest at its own best placement.
    let best = per_row
        .iter()
        .filter(|r| r.0 != Engine::Ours)
        .max_by(|x, y| x.2.total_cmp(&y.2));
    if json {
        let mut obj = serde_json::json!({
            "m": shape.0,
            "k": shape.1,
            "n": shape.2,
            "threads": t,
            "isa": isa.name(),
            "summary": true,
            "ours_min": lo,
            "ours_max": hi,
        });
        if let Some(&(peer, plo, phi)) = best {
            let map = obj.as_object_mut().expect("an object");
            map.insert("best_peer".into(), peer.name().into());
            map.insert("best_peer_min".into(), plo.into());
            map.insert("best_peer_max".into(), phi.into());
            map.insert("ours_min_over_best_peer_max".into(), (lo / phi).into());
            map.insert("ours_min_over_best_peer_min".into(), (lo / plo).into());
        }
        return obj.to_string();
    }
    let mut line = format!(
        "\n{}, ours over every placement: min {}, max {} (min/max {:.2})",
        shape_name(shape),
        sig(lo),
        sig(hi),
        lo / hi
    );
    if let Some(&(peer, plo, phi)) = best {
        line.push_str(&format!(
            "; best peer {}: min {}, max {}; ours min / its max {:.2}, / its min {:.2}",
            peer.name(),
            sig(plo),
            sig(phi),
            lo / phi,
            lo / plo
        ));
    }
    line
}

/// What `compare --placement` takes from `compare`'s arguments.
pub struct ConvPlacement<'a> {
    /// `--layer` names.
    pub layers: &'a [String],
    /// `--shape` specs.
    pub shapes: &'a [String],
    /// `--algo`s (empty: Auto).
    pub algos: &'a [Algorithm],
    /// `--threads` (0: every CPU).
    pub threads: usize,
    /// `--isa`.
    pub isa: Option<Isa>,
    /// `--backend`.
    pub backend: BackendArg,
    /// `--budget-ms`: per placement, split over the rounds.
    pub budget_ms: u64,
    /// `--rounds`: every placement timed once per round, median over rounds.
    pub rounds: usize,
    /// `--json`.
    pub json: bool,
    /// Whether `--pass` is the forward pass, the only one with placements.
    pub forward: bool,
}

/// Which tensor of a convolution a row moves to the offset (the other at 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConvMode {
    Input,
    Output,
}

impl ConvMode {
    fn name(self) -> &'static str {
        match self {
            ConvMode::Input => "input",
            ConvMode::Output => "output",
        }
    }

    /// The offsets of the input and the output in this mode.
    fn offsets(self, off: usize) -> [usize; 2] {
        match self {
            ConvMode::Input => [off, 0],
            ConvMode::Output => [0, off],
        }
    }
}

/// The layers `--layer` and `--shape` name, or the whole suite.
fn conv_layers(req: &ConvPlacement) -> Result<Vec<Layer>, String> {
    let all = suite::suite();
    let mut layers = Vec::new();
    for name in req.layers {
        match all.iter().find(|l| l.name == *name) {
            Some(l) => layers.push(l.clone()),
            None => {
                let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
                return Err(format!(
                    "unknown layer {name:?} for --placement; it has {}",
                    names.join(", ")
                ));
            }
        }
    }
    for (i, spec) in req.shapes.iter().enumerate() {
        layers.push(suite::parse_shape(spec, i + 1)?);
    }
    if layers.is_empty() {
        layers = all;
    }
    Ok(layers)
}

/// `cpuconv compare --placement`: a plan per layer and algorithm (Auto
/// unless `--algo` says), timed with its input, then its output, placed at
/// each offset. The weights are packed into the plan, so where the
/// caller's weights start does not matter after planning.
pub fn run_conv(req: &ConvPlacement) -> Result<(), Stop> {
    if !req.forward {
        return Err(Stop::Failed(
            "--placement times the forward pass (through plans); drop --pass".into(),
        ));
    }
    let layers = conv_layers(req)?;
    let mut built = Vec::with_capacity(layers.len());
    for l in &layers {
        let conv = l.build().map_err(|e| format!("layer {}: {e}", l.name))?;
        let g = conv.geometry();
        let room = |len: usize| len.saturating_add(PAGE_FLOATS);
        check_room(&[
            ("input", g.input_len()),
            ("placed input", room(g.input_len())),
            ("weight", g.weight_len()),
            ("output", room(g.output_len())),
            ("reference", g.output_len()),
        ])
        .map_err(|e| format!("layer {}: {e}", l.name))?;
        built.push((l, conv));
    }
    let algos: Vec<Algorithm> = if req.algos.is_empty() {
        vec![Algorithm::Auto]
    } else {
        req.algos.to_vec()
    };
    let pool = pool(req.threads)?;
    let threads = pool.current_num_threads();
    let isa = effective_isa(req.isa);
    let budget = round_budget(req.budget_ms, req.rounds.max(1));
    let options = ForwardOptions::new(Algorithm::Auto)
        .parallelism(Parallelism::threads(req.threads))
        .backend(req.backend.into())
        .activation(Activation::None)
        .isa(req.isa);
    let modes = [ConvMode::Input, ConvMode::Output];
    let table = offset_table(&[left("placed", 6), left("algorithm", 22)]);
    if !req.json {
        outln!(
            "cpuconv {} compare --placement: GFLOP/s of a forward plan (weights packed \
             once, median of samples) with its input or its output starting +N floats \
             past a 4 KiB boundary (the other at +0); isa {isa}, {threads} thread{}, \
             backend {}. Every output is checked against the plan's at natural placement.",
            env!("CARGO_PKG_VERSION"),
            if threads == 1 { "" } else { "s" },
            req.backend.name()
        )?;
    }
    let keys = distinct(
        modes
            .iter()
            .flat_map(|&mode| OFFSETS.map(|off| mode.offsets(off))),
    );
    let rounds = req.rounds.max(1);
    let pb = progress((built.len() * algos.len() * keys.len() * rounds) as u64);
    let result = pool.install(|| -> Result<(), Stop> {
        for (layer, conv) in &built {
            let in_layer = |e: String| format!("layer {}: {e}", layer.name);
            let data = layer.try_data(conv).map_err(in_layer)?;
            let g = conv.geometry();
            let flops = conv.flops() as f64;
            if !req.json {
                let header = format!(
                    "\n{} ({:.1} MFLOP), GFLOP/s:\n\n{}",
                    layer.name,
                    flops / 1e6,
                    table.header()
                );
                pb.suspend(|| outln!("{header}"))?;
            }
            let mut rows = Vec::new();
            for &algo in &algos {
                let fail = |e: cpuconv::ConvError| {
                    Stop::from(format!("layer {} / {}: {e}", layer.name, algo.name()))
                };
                let plan = conv
                    .plan(&data.weight, data.bias.as_deref(), &options.algorithm(algo))
                    .map_err(fail)?;
                let label = match algo {
                    Algorithm::Auto => format!("auto ({})", plan.algorithm().name()),
                    a => a.name().to_string(),
                };
                let mut reference =
                    try_filled("reference", g.output_len(), f32::NAN).map_err(in_layer)?;
                plan.forward(&data.input, &mut reference).map_err(fail)?;
                // Sums of products of values below 1 in size: placement must
                // not change them beyond rounding.
                let scale = reference.iter().fold(1.0f32, |s, v| s.max(v.abs()));
                let tolerance = 1e-4 * scale;
                let mut diffs = vec![0.0f32; keys.len()];
                let medians = interleaved(&keys, rounds, |place| {
                    pb.set_message(format!("{} / {label} / at {place:?}", layer.name));
                    let input = Placed::copy_of("input", &data.input, place[0])?;
                    let mut out = Placed::filled("output", g.output_len(), f32::NAN, place[1])?;
                    let t = try_measure(&budget, || {
                        plan.forward(input.as_slice(), out.as_mut_slice())
                    })
                    .map_err(|e| e.to_string())?;
                    let diff = max_abs_diff(out.as_slice(), &reference);
                    if diff.is_nan() || diff > tolerance {
                        return Err(format!(
                            "{label}, input at +{}, output at +{}: output differs from \
                             natural placement by {diff} (tolerance {tolerance})",
                            place[0], place[1]
                        ));
                    }
                    let i = keys.iter().position(|&k| k == place).unwrap_or(0);
                    diffs[i] = diffs[i].max(diff);
                    pb.inc(1);
                    Ok(flops / t.median_s / 1e9)
                })
                .map_err(in_layer)?;
                for mode in modes {
                    let at = |off: usize| keys.iter().position(|&k| k == mode.offsets(off));
                    let gflops: Vec<f64> = OFFSETS
                        .iter()
                        .map(|&off| at(off).map_or(f64::NAN, |i| medians[i]))
                        .collect();
                    let worst = OFFSETS
                        .iter()
                        .filter_map(|&off| at(off).map(|i| diffs[i]))
                        .fold(0.0f32, f32::max);
                    let (lo, hi) = min_max(gflops.iter().copied());
                    let line = if req.json {
                        serde_json::json!({
                            "layer": layer.name,
                            "algorithm": algo.name(),
                            "picked": (algo == Algorithm::Auto).then(|| plan.algorithm().name()),
                            "placed": mode.name(),
                            "offsets": OFFSETS,
                            "gflops": gflops,
                            "min": lo,
                            "max": hi,
                            "max_abs_diff": worst,
                            "flops": conv.flops(),
                            "threads": threads,
                            "isa": isa.name(),
                            "backend": req.backend.name(),
                        })
                        .to_string()
                    } else {
                        offset_row(&table, &[mode.name().to_string(), label.clone()], &gflops)
                    };
                    pb.suspend(|| outln!("{line}"))?;
                    rows.push((label.clone(), lo, hi));
                }
            }
            let (lo, hi) = min_max(rows.iter().flat_map(|r| [r.1, r.2]));
            let line = if req.json {
                serde_json::json!({
                    "layer": layer.name,
                    "summary": true,
                    "min": lo,
                    "max": hi,
                    "threads": threads,
                    "isa": isa.name(),
                })
                .to_string()
            } else {
                format!(
                    "\n{}, every placement: min {}, max {} (min/max {:.2})",
                    layer.name,
                    sig(lo),
                    sig(hi),
                    lo / hi
                )
            };
            pb.suspend(|| outln!("{line}"))?;
        }
        Ok(())
    });
    pb.finish_and_clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_headers_name_the_offsets() {
        for (off, h) in OFFSETS.iter().zip(OFFSET_HEADERS) {
            assert_eq!(format!("+{off}"), h);
        }
    }

    #[test]
    fn the_start_lands_on_the_offset() {
        for addr in [0, 4, 8, 60, 64, 4092, 4096, 8196, 12_288 + 40] {
            for off in [0, 1, 3, 16, 1023] {
                let i = start_index(addr, off);
                assert!(i < PAGE_FLOATS, "{addr} {off}: {i}");
                assert_eq!((addr + 4 * i) % PAGE_BYTES, 4 * off, "{addr} {off}");
            }
        }
    }

    #[test]
    fn placed_buffers_start_where_asked_and_hold_the_data() {
        let src: Vec<f32> = (0..100).map(|i| i as f32).collect();
        for off in OFFSETS {
            let p = Placed::copy_of("x", &src, off).unwrap();
            assert_eq!(p.as_slice().as_ptr() as usize % PAGE_BYTES, 4 * off);
            assert_eq!(p.as_slice(), &src[..]);
            let f = Placed::filled("y", 7, 2.5, off).unwrap();
            assert_eq!(f.as_slice(), &[2.5; 7]);
            assert_eq!(f.as_slice().as_ptr() as usize % PAGE_BYTES, 4 * off);
        }
        assert!(Placed::filled("z", 1, 0.0, PAGE_FLOATS).is_err());
        let e = Placed::filled("huge", usize::MAX - 10, 0.0, 0)
            .err()
            .unwrap();
        assert!(e.contains("huge"), "{e}");
    }

    #[test]
    fn rounds_visit_every_key_in_a_rotated_order_and_keep_the_median() {
        assert_eq!(distinct([3, 1, 3, 2, 1]), vec![3, 1, 2]);
        let mut order = Vec::new();
        let mut call = 0.0;
        let medians = interleaved(&['a', 'b', 'c'], 3, |k| {
            order.push(k);
            call += 1.0;
            // Key a's samples are 1, 6, 8; b's 2, 4, 9; c's 3, 5, 7.
            Ok(call)
        })
        .unwrap();
        assert_eq!(order, ['a', 'b', 'c', 'b', 'c', 'a', 'c', 'a', 'b']);
        assert_eq!(medians, vec![6.0, 4.0, 5.0]);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        let failed = interleaved(
            &[1, 2],
            2,
            |k| if k == 2 { Err("no".into()) } else { Ok(1.0) },
        );
        assert_eq!(failed, Err("no".to_string()));
    }

    #[test]
    fn modes_move_the_operands_they_name() {
        assert_eq!(GemmMode::All.offsets(3), [3, 3, 3]);
        assert_eq!(GemmMode::B.offsets(3), [0, 3, 0]);
        assert_eq!(ConvMode::Output.offsets(8), [0, 8]);
        assert_eq!(min_max([2.0, 1.0, 3.0]), (1.0, 3.0));
    }
}
