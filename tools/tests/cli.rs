//! The `cpuconv` binary as a user and a script see it: help text, exit
//! status, JSON fields, closed pipes, shapes too big to allocate. Every run
//! is tiny (the seed layer, 8×8×8 GEMMs, 1 ms budgets); the FMA peak that
//! `compare` and `gemm` measure first is the slowest part, about a third
//! of a second.

use cpuconv::arch::supported_isas;
use cpuconv::{Algorithm, Isa};
use serde_json::Value;
use std::process::{Command, Output, Stdio};

fn cpuconv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cpuconv"))
        .args(args)
        .env_remove("CPUCONV_ISA")
        .output()
        .expect("the cpuconv binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `args` and expects success, returning stdout.
fn ok(args: &[&str]) -> String {
    let out = cpuconv(args);
    assert!(
        out.status.success(),
        "cpuconv {args:?}: {}\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

/// Each stdout line as JSON.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn all_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn compare_help_lists_every_algorithm() {
    let help = ok(&["compare", "--help"]);
    let line = help
        .lines()
        .find(|l| l.contains("[possible values: direct"))
        .unwrap_or_else(|| panic!("no --algo value list in:\n{help}"));
    let names: Vec<&str> = Algorithm::CONCRETE
        .into_iter()
        .chain([Algorithm::Auto])
        .map(Algorithm::name)
        .collect();
    assert!(line.contains(&names.join(", ")), "{line}");
    assert!(line.contains("direct-simd"), "{line}");
}

#[test]
fn algo_names_parse_and_bad_ones_are_refused() {
    let out = cpuconv(&["compare", "--algo", "nonsense", "--layer", "seed"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("direct-simd"), "{}", stderr(&out));
}

#[test]
fn compare_help_gives_the_shape_syntax_once() {
    let syntax = "[NAME=]N,C,H,W:K,RxS";
    let long = ok(&["compare", "--help"]);
    assert_eq!(long.matches(syntax).count(), 1, "{long}");
    assert_eq!(long.matches("Custom layer:").count(), 1, "{long}");
    // `-h` has no syntax block after the options, so --shape's line keeps it.
    let short = ok(&["compare", "-h"]);
    assert_eq!(short.matches(syntax).count(), 1, "{short}");
}

#[test]
fn threads_zero_means_every_cpu_in_both_commands() {
    for cmd in ["compare", "gemm"] {
        let help = ok(&[cmd, "--help"]);
        assert!(help.contains("0 (or `all`) is every CPU"), "{cmd}: {help}");
    }
    let rows = json_lines(&ok(&[
        "gemm",
        "--threads",
        "0",
        "--shape",
        "8",
        "--budget-ms",
        "1",
        "--json",
    ]));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["threads"], all_threads());
    let rows = json_lines(&ok(&[
        "compare",
        "--threads",
        "0",
        "--layer",
        "seed",
        "--algo",
        "direct",
        "--budget-ms",
        "1",
        "--json",
    ]));
    assert_eq!(rows[0]["threads"], all_threads());
}

#[test]
fn compare_json_keeps_its_fields() {
    let rows = json_lines(&ok(&[
        "compare",
        "--layer",
        "seed",
        "--algo",
        "direct",
        "--algo",
        "auto",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--json",
    ]));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for key in [
            "algorithm",
            "picked",
            "median_ms",
            "gflops",
            "peak_fraction",
        ] {
            assert!(row.get(key).is_some(), "no {key} in {row}");
        }
        assert!(row["median_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(rows[0]["algorithm"], "direct");
    assert_eq!(rows[0]["picked"], Value::Null);
    assert_eq!(rows[1]["algorithm"], "auto");
    assert!(rows[1]["picked"].is_string(), "{}", rows[1]);
}

/// Runs `args` with stdout a pipe whose read end is already closed, so the
/// first line written meets a broken pipe.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_cpuconv"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("the cpuconv binary runs")
}

#[test]
fn a_closed_stdout_stops_quietly() {
    let runs: &[&[&str]] = &[
        &["compare", "--list"],
        &["compare", "--help"],
        &["info", "--no-peak"],
        &["info", "--json", "--no-peak"],
        &["info", "--isas"],
        &[
            "compare",
            "--layer",
            "seed",
            "--algo",
            "direct",
            "--threads",
            "1",
            "--budget-ms",
            "1",
        ],
        &["gemm", "--shape", "8", "--threads", "1", "--budget-ms", "1"],
    ];
    for args in runs {
        let out = into_closed_pipe(args);
        let err = stderr(&out);
        assert!(out.status.success(), "{args:?}: {}\n{err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_reader_that_leaves_early_stops_the_list_quietly() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cpuconv"))
        .args(["compare", "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cpuconv binary runs");
    let mut first = [0u8; 8];
    child
        .stdout
        .take()
        .expect("piped")
        .read_exact(&mut first)
        .expect("some output");
    let out = child.wait_with_output().expect("it exits");
    assert!(out.status.success(), "{}", out.status);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn an_enormous_layer_is_an_error_not_an_abort() {
    // 2^42 input values (16 TiB): no machine holds it, whatever its
    // overcommit policy lets it reserve.
    let out = cpuconv(&["compare", "--shape", "1,1024,65536,65536:1024,3x3,p1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("layer shape1: "), "{err}");
    assert!(err.contains(" bytes"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn an_enormous_gemm_is_an_error_not_an_abort() {
    let out = cpuconv(&["gemm", "--shape", "100000000", "--threads", "1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("100000000x100000000x100000000: A needs 40000000000000000 bytes"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn gemm_refuses_a_zero_dimension() {
    let out = cpuconv(&["gemm", "--shape", "0x8x8", "--threads", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("positive"), "{}", stderr(&out));
}

fn supported_names() -> Vec<&'static str> {
    supported_isas().iter().map(|i| i.name()).collect()
}

#[test]
fn info_isas_is_one_line_for_scripts() {
    let text = ok(&["info", "--isas"]);
    assert_eq!(text, format!("{}\n", supported_names().join(",")));
    assert!(text.starts_with("portable"), "{text}");
}

#[test]
fn info_json_is_one_object() {
    let text = ok(&["info", "--json", "--no-peak"]);
    let rows = json_lines(&text);
    assert_eq!(rows.len(), 1, "{text}");
    let info = &rows[0];
    let supported = supported_names();
    assert_eq!(info["supported_isas"], serde_json::json!(supported));
    // CPUCONV_ISA is unset for the tool, so it runs the detected path.
    let detected = cpuconv::arch::detected_isa().name();
    assert_eq!(info["active_isa"], detected);
    assert_eq!(info["detected_isa"], detected);
    assert_eq!(info["cpuconv_isa_env"], Value::Null);
    assert_eq!(info["peaks"], Value::Null);
    for level in ["l1d", "l2"] {
        for key in ["bytes", "line_bytes", "ways", "sets", "shared_by"] {
            let v = info["caches"][level][key].as_u64();
            assert!(v.is_some_and(|v| v > 0), "{level} {key}: {info}");
        }
    }
    let cpu = &info["caches"];
    assert!(
        cpu["l2"]["bytes"].as_u64() >= cpu["l1d"]["bytes"].as_u64(),
        "{info}"
    );
    for isa in &supported {
        let rows = &info["blocking"][isa];
        // The x86 paths have a column kernel (a tall tile), portable none.
        let columns = &rows["columns"];
        assert_eq!(columns.is_null(), *isa == "portable", "{isa}: {info}");
        for b in [rows, columns].into_iter().filter(|b| !b.is_null()) {
            for key in ["mr", "nr", "mc", "kc", "nc"] {
                assert!(b[key].as_u64().unwrap() > 0, "{isa} {key}: {info}");
                // The blocking is the model's.
                if let Some(model) = b["model"].get(key) {
                    assert_eq!(&b[key], model, "{isa} {key}");
                }
            }
        }
        if !columns.is_null() {
            assert!(columns["mr"].as_u64() > columns["nr"].as_u64(), "{isa}");
        }
    }
}

#[test]
fn info_json_reports_cpuconv_isa() {
    let out = Command::new(env!("CARGO_BIN_EXE_cpuconv"))
        .args(["info", "--json", "--no-peak"])
        .env("CPUCONV_ISA", "portable")
        .output()
        .expect("the cpuconv binary runs");
    assert!(out.status.success(), "{}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(info["cpuconv_isa_env"], "portable");
    assert_eq!(info["active_isa"], "portable");
}

/// The rows of `compare --json` for `args`, at one thread and a 1 ms budget.
fn compare_rows(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["compare", "--threads", "1", "--budget-ms", "1", "--json"];
    all.extend_from_slice(args);
    json_lines(&ok(&all))
}

/// Checks the rows of one backward pass: every algorithm listed once,
/// Direct and Auto supported, each supported row timed and close to Direct,
/// each refused one marked so with its numbers null.
fn check_backward_rows(rows: &[Value], pass: &str, tolerance: f64) {
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["algorithm"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = Algorithm::CONCRETE.iter().map(|a| a.name()).collect();
    expected.push("auto");
    assert_eq!(names, expected, "{rows:?}");
    for row in rows {
        assert_eq!(row["pass"], pass, "{row}");
        // Auto names its pick (`phases` for the input gradient's sub-pixel
        // phases); the concrete algorithms name none.
        if row["algorithm"] == "auto" {
            let pick = row["picked"].as_str().unwrap();
            assert!(
                Algorithm::from_name(pick).is_some() || pick == "phases",
                "{row}"
            );
        } else {
            assert_eq!(row["picked"], Value::Null, "{row}");
        }
        assert_eq!(row["planned"], false, "{row}");
        if row["supported"] == true {
            assert!(row["median_ms"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["gflops"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["peak_fraction"].as_f64().unwrap() > 0.0, "{row}");
            let err = row["max_abs_err"].as_f64().unwrap();
            assert!(err <= tolerance, "{row}");
            assert_eq!(row["unsupported"], Value::Null, "{row}");
        } else {
            assert_eq!(row["supported"], false, "{row}");
            assert_eq!(row["median_ms"], Value::Null, "{row}");
            let why = row["unsupported"].as_str().unwrap();
            assert!(why.contains(row["algorithm"].as_str().unwrap()), "{row}");
        }
    }
    for always in ["direct", "im2col", "auto"] {
        let row = rows.iter().find(|r| r["algorithm"] == always).unwrap();
        assert_eq!(row["supported"], true, "{row}");
    }
    assert_eq!(rows[0]["max_abs_err"], 0.0, "{}", rows[0]);
}

#[test]
fn compare_grad_input_and_grad_weight_on_the_seed_layer() {
    // The seed's gradients are small integers: every algorithm gets them exactly.
    for pass in ["grad-input", "grad-weight"] {
        let rows = compare_rows(&["--pass", pass, "--layer", "seed"]);
        check_backward_rows(&rows, pass, 0.0);
        // The FLOPs of each backward pass are the forward's.
        assert_eq!(rows[0]["flops"], 2 * 4 * 4, "{}", rows[0]);
    }
}

#[test]
fn compare_backward_passes_on_a_strided_grouped_shape() {
    for pass in ["grad-input", "grad-weight"] {
        let rows = compare_rows(&["--pass", pass, "--shape", "t=2,4,9,7:6,3x2,s2,p1,g2"]);
        check_backward_rows(&rows, pass, 1e-4);
        assert!(rows.iter().all(|r| r["layer"] == "t"));
    }
}

#[test]
fn compare_pass_all_runs_the_three_passes_side_by_side() {
    let rows = compare_rows(&["--pass", "all", "--layer", "seed", "--algo", "auto"]);
    let passes: Vec<&str> = rows.iter().map(|r| r["pass"].as_str().unwrap()).collect();
    assert_eq!(passes, ["forward", "grad-input", "grad-weight"]);
    // Only the forward knows Auto's pick.
    assert!(rows[0]["picked"].is_string(), "{}", rows[0]);
    assert_eq!(rows[0]["max_abs_err"], 0.0);
    assert!(rows.iter().all(|r| r["supported"] == true), "{rows:?}");

    let table = ok(&[
        "compare",
        "--pass",
        "all",
        "--layer",
        "seed",
        "--threads",
        "1",
        "--budget-ms",
        "1",
    ]);
    assert!(table.contains("| pass "), "{table}");
    assert!(table.contains("| grad-weight |"), "{table}");
    assert!(table.contains("auto, GFLOP/s per pass"), "{table}");
    // --plan plans the forward only.
    let rows = compare_rows(&[
        "--pass", "all", "--plan", "--layer", "seed", "--algo", "im2col",
    ]);
    let planned: Vec<bool> = rows
        .iter()
        .map(|r| r["planned"].as_bool().unwrap())
        .collect();
    assert_eq!(planned, [true, false, false], "{rows:?}");
}

#[test]
fn compare_forward_is_still_the_default() {
    let rows = compare_rows(&["--layer", "seed", "--algo", "direct"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["pass"], "forward");
    let table = ok(&[
        "compare",
        "--layer",
        "seed",
        "--algo",
        "direct",
        "--threads",
        "1",
        "--budget-ms",
        "1",
    ]);
    assert!(!table.contains("| pass "), "{table}");
}

#[test]
fn a_bad_pass_is_refused() {
    let out = cpuconv(&["compare", "--pass", "backward", "--layer", "seed"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("grad-input"), "{err}");
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    // A backward pass alone has no plan to time.
    let out = cpuconv(&[
        "compare",
        "--pass",
        "grad-weight",
        "--plan",
        "--layer",
        "seed",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no plan"), "{err}");
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn compare_transpose_on_a_tiny_shape() {
    let shape = "t=1,4,5,5:6,3x3,s2,p1,op1";
    let rows = compare_rows(&["--pass", "transpose", "--shape", shape]);
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["algorithm"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = Algorithm::CONCRETE.iter().map(|a| a.name()).collect();
    expected.push("auto");
    assert_eq!(names, expected, "{rows:?}");
    for row in &rows {
        assert_eq!(row["pass"], "transpose", "{row}");
        assert_eq!(row["layer"], "t", "{row}");
        // 2·N·C_in·H·W·C_out·R·S
        assert_eq!(row["flops"], 2 * 4 * 5 * 5 * 6 * 3 * 3, "{row}");
        if row["supported"] == true {
            assert!(row["median_ms"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["max_abs_err"].as_f64().unwrap() <= 1e-5, "{row}");
        } else {
            assert_eq!(row["median_ms"], Value::Null, "{row}");
        }
    }
    for always in ["direct", "auto"] {
        let row = rows.iter().find(|r| r["algorithm"] == always).unwrap();
        assert_eq!(row["supported"], true, "{row}");
    }
    // Planned, as the onnxruntime script runs it.
    let rows = compare_rows(&[
        "--pass",
        "transpose",
        "--plan",
        "--algo",
        "auto",
        "--shape",
        shape,
    ]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["planned"], true, "{}", rows[0]);
    assert!(
        rows[0]["max_abs_err"].as_f64().unwrap() <= 1e-5,
        "{}",
        rows[0]
    );
}

#[test]
fn transposed_layers_and_shapes_stay_with_their_passes() {
    let out = cpuconv(&["compare", "--pass", "transpose", "--layer", "r50_3x3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("gan_up_k4s2"), "{}", stderr(&out));
    let out = cpuconv(&[
        "compare",
        "--pass",
        "forward",
        "--shape",
        "1,4,5,5:6,3,s2,op1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("transposed"), "{}", stderr(&out));
    let list = ok(&["compare", "--list"]);
    for name in [
        "gan_up_k4s2",
        "unet_up_k2s2",
        "fcn_up_k3s2",
        "dcgan_b8",
        "opO",
    ] {
        assert!(list.contains(name), "{name}: {list}");
    }
}

#[test]
fn compare_pass_all_adds_transpose_for_transposed_layers() {
    let rows = compare_rows(&[
        "--pass",
        "all",
        "--layer",
        "seed",
        "--layer",
        "gan_up_k4s2",
        "--algo",
        "auto",
    ]);
    let passes: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["layer"].as_str().unwrap(), r["pass"].as_str().unwrap()))
        .collect();
    assert_eq!(
        passes,
        [
            ("seed", "forward"),
            ("seed", "grad-input"),
            ("seed", "grad-weight"),
            ("gan_up_k4s2", "transpose"),
        ]
    );
    assert!(
        rows[3]["max_abs_err"].as_f64().unwrap() <= 1e-3,
        "{}",
        rows[3]
    );
}

/// The columns of every `--placement` table after its labels.
const PLACEMENT_COLUMNS: [&str; 9] = ["+0", "+1", "+3", "+4", "+8", "+12", "+16", "min", "max"];

/// The placement table's header line in `out`, checked to have the offset
/// and min/max columns.
fn check_placement_header(out: &str) {
    let header = out
        .lines()
        .find(|l| l.starts_with("| placed"))
        .unwrap_or_else(|| panic!("no placement table in:\n{out}"));
    let cells: Vec<&str> = header.split('|').map(str::trim).collect();
    for col in PLACEMENT_COLUMNS {
        assert!(cells.contains(&col), "no {col} column in {header}");
    }
}

/// A JSON placement row: seven offsets, seven positive GFLOP/s, min ≤ max.
fn check_placement_row(row: &Value) {
    assert_eq!(
        row["offsets"],
        serde_json::json!([0, 1, 3, 4, 8, 12, 16]),
        "{row}"
    );
    let g = row["gflops"].as_array().unwrap_or_else(|| panic!("{row}"));
    assert_eq!(g.len(), 7, "{row}");
    assert!(g.iter().all(|v| v.as_f64().unwrap() > 0.0), "{row}");
    let (lo, hi) = (row["min"].as_f64().unwrap(), row["max"].as_f64().unwrap());
    assert!(0.0 < lo && lo <= hi, "{row}");
}

#[test]
fn gemm_placement_has_a_row_per_mode_with_min_and_max() {
    let out = ok(&[
        "gemm",
        "--placement",
        "--shape",
        "8x16x24",
        "--threads",
        "1",
        "--budget-ms",
        "1",
    ]);
    check_placement_header(&out);
    for mode in ["all", "A", "B", "C"] {
        let row = format!("| {mode:<6} | ours ");
        assert_eq!(out.matches(&row).count(), 1, "{row} in:\n{out}");
    }
    assert!(
        out.contains("8x16x24, ours over every placement: min "),
        "{out}"
    );
}

#[test]
fn gemm_placement_json_rows_and_summary() {
    let rows = json_lines(&ok(&[
        "gemm",
        "--placement",
        "--shape",
        "8",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--json",
    ]));
    assert_eq!(rows.len(), 5, "{rows:?}");
    for (row, mode) in rows.iter().zip(["all", "A", "B", "C"]) {
        assert_eq!(row["placed"], mode, "{row}");
        assert_eq!(row["engine"], "ours", "{row}");
        check_placement_row(row);
    }
    assert_eq!(rows[4]["summary"], true, "{}", rows[4]);
    assert!(rows[4]["ours_min"].as_f64().unwrap() > 0.0, "{}", rows[4]);
}

#[test]
fn compare_placement_moves_the_input_and_the_output() {
    let out = ok(&[
        "compare",
        "--placement",
        "--layer",
        "seed",
        "--threads",
        "1",
        "--budget-ms",
        "1",
    ]);
    check_placement_header(&out);
    for mode in ["input", "output"] {
        let row = format!("| {mode:<6} | auto (");
        assert_eq!(out.matches(&row).count(), 1, "{row} in:\n{out}");
    }
    assert!(out.contains("seed, every placement: min "), "{out}");

    let rows = json_lines(&ok(&[
        "compare",
        "--placement",
        "--shape",
        "1,4,6,6:4,3x3,p1",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--json",
    ]));
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (row, mode) in rows.iter().zip(["input", "output"]) {
        assert_eq!(row["placed"], mode, "{row}");
        assert!(row["picked"].is_string(), "{row}");
        check_placement_row(row);
    }
    assert_eq!(rows[2]["summary"], true, "{}", rows[2]);
}

#[test]
fn compare_placement_refuses_a_backward_pass() {
    let out = cpuconv(&["compare", "--placement", "--pass", "grad-input"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("forward pass"), "{}", stderr(&out));
}

#[test]
fn gemm_peers_needs_the_feature_or_adds_its_columns() {
    let args = [
        "gemm",
        "--peers",
        "--shape",
        "8",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--json",
    ];
    if cfg!(feature = "peers") {
        let rows = json_lines(&ok(&args));
        for key in ["gemm_gflops", "faer_gflops", "best_peer", "ratio_best_peer"] {
            assert!(rows[0].get(key).is_some(), "no {key} in {}", rows[0]);
        }
    } else {
        let out = cpuconv(&args);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("--features peers"),
            "{}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{}", stdout(&out));
    }
}

#[test]
fn compare_effort_measure_measures_transposed_plans() {
    let args = [
        "compare",
        "--pass",
        "transpose",
        "--shape",
        "t=1,8,6,6:4,4x4,s2,p1",
        "--plan",
        "--effort",
        "measure",
        "--algo",
        "auto",
        "--algo",
        "im2col",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--json",
    ];
    let rows = json_lines(&ok(&args));
    assert_eq!(rows.len(), 2);
    // Auto's row says how its plan chose; the explicit algorithm's is not
    // measured.
    let note = rows[0]["picked_note"].as_str().expect("a note");
    let (isa, rest) = note.split_once(", ").expect("isa, threads, how");
    assert!(Isa::from_name(isa).is_some(), "{note}");
    assert!(
        rest.starts_with("1 thread, measured in ") || rest == "1 thread, wisdom",
        "{note}"
    );
    assert_eq!(rows[1]["picked_note"], Value::Null, "{}", rows[1]);
    for row in &rows {
        assert!(
            row["max_abs_err"].as_f64().expect("checked") < 1e-4,
            "{row}"
        );
    }
}

#[test]
fn compare_effort_measure_shows_the_choice() {
    let args = [
        "compare",
        "--shape",
        "m=1,8,10,10:16,3x3,p1",
        "--plan",
        "--effort",
        "measure",
        "--algo",
        "implicit",
        "--algo",
        "auto",
        "--threads",
        "1",
        "--budget-ms",
        "1",
    ];
    let rows = json_lines(&ok(&[&args[..], &["--json"]].concat()));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["effort"], "measure", "{row}");
    }
    // The explicit algorithm's row is not measured; Auto's says its choice.
    assert_eq!(rows[0]["picked_note"], Value::Null, "{}", rows[0]);
    let picked = rows[1]["picked"].as_str().expect("auto names its pick");
    assert!(Algorithm::from_name(picked).is_some(), "{picked}");
    // The note names the kernel path the plan runs: the row's, or (an
    // AVX-512 CPU's search with no --isa) AVX2.
    let note = rows[1]["picked_note"].as_str().expect("a note");
    let (isa, rest) = note.split_once(", ").expect("isa, threads, how");
    assert!(Isa::from_name(isa).is_some(), "{note}");
    assert!(rest.starts_with("1 thread, "), "{note}");
    // A second process may measure its way to another algorithm or path.
    let table = ok(&args);
    let measured = Algorithm::CONCRETE.iter().any(|a| {
        Isa::ALL
            .iter()
            .any(|i| table.contains(&format!("auto ({}; {}, 1 thread, ", a.name(), i.name())))
    });
    assert!(measured, "{table}");
    // A forced path is the path the pick runs.
    let forced = json_lines(&ok(&[&args[..], &["--isa", "portable", "--json"]].concat()));
    let note = forced[1]["picked_note"].as_str().expect("a note");
    assert!(note.starts_with("portable, 1 thread, "), "{note}");
    assert!(table.contains("planned by measurement"), "{table}");
    // Without --plan there is nothing to measure.
    let out = cpuconv(&["compare", "--layer", "seed", "--effort", "measure"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--plan"), "{err}");
}

#[test]
fn compare_wisdom_file_round_trips() {
    let path = std::env::temp_dir().join(format!("cpuconv-cli-wisdom-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let file = path.to_str().expect("a UTF-8 temp path");
    let args = [
        "compare",
        "--shape",
        "w=1,8,12,12:16,3x3,p1",
        "--plan",
        "--effort",
        "measure",
        "--algo",
        "auto",
        "--threads",
        "1",
        "--budget-ms",
        "1",
        "--wisdom",
        file,
    ];
    // No file yet: the plan is measured, and the file gets the choice.
    let first = ok(&args);
    assert!(first.contains("measured in"), "{first}");
    let text = std::fs::read_to_string(&path).expect("the wisdom file");
    assert!(text.starts_with("cpuconv-wisdom 1\n"), "{text}");
    assert!(text.contains("input=1x8x12x12 out=16 kernel=3x3"), "{text}");
    // The next process takes the choice from the file, measuring nothing.
    let second = ok(&args);
    assert!(second.contains(", wisdom)"), "{second}");
    // A file that is no wisdom is an error naming it.
    std::fs::write(&path, "not wisdom\n").unwrap();
    let out = cpuconv(&args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(file) && err.contains("header"), "{err}");
    let _ = std::fs::remove_file(&path);
    // Wisdom serves measured plans only.
    let out = cpuconv(&["compare", "--layer", "seed", "--plan", "--wisdom", file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--effort measure"),
        "{}",
        stderr(&out)
    );
}
