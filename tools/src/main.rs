//! `cpuconv`: compare the convolution algorithms, inspect the CPU paths,
//! measure the GEMM against `matrixmultiply` (and, with the `peers` feature,
//! the `gemm` crate and faer) and the FMA peak, and measure how both depend
//! on where their operands start in memory (`--placement`).

mod compare;
mod gemm;
mod info;
mod mem;
mod out;
mod placement;
mod suite;
mod table;
mod timing;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use clap::{Parser, Subcommand, ValueEnum};
use cpuconv::arch::clamp_isa;
use cpuconv::{Algorithm, GemmBackend, Isa};
use indicatif::{ProgressBar, ProgressStyle};
use out::Stop;
use std::ffi::OsStr;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cpuconv",
    version,
    about = "Benchmark and inspect the cpuconv convolution and GEMM kernels",
    long_about = "Benchmark and inspect the cpuconv convolution and GEMM kernels.\n\n\
                  Tables are Markdown on stdout (or JSON lines with --json); progress goes \
                  to stderr. The kernel path defaults to the best the CPU supports, or to \
                  CPUCONV_ISA=avx512|avx2|portable when set."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time every algorithm on the layer suite against the direct reference.
    Compare(compare::CompareArgs),
    /// Show the ISA paths, CPU features, blocking and measured FMA peak.
    Info(info::InfoArgs),
    /// GEMM GFLOP/s: ours vs matrixmultiply (and --peers), as a share of the
    /// FMA peak; --placement: by where the operands start.
    Gemm(gemm::GemmArgs),
}

/// `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// cpuconv's packed SIMD GEMM.
    #[default]
    Native,
    /// The matrixmultiply crate.
    Matrixmultiply,
}

impl BackendArg {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Native => "native",
            BackendArg::Matrixmultiply => "matrixmultiply",
        }
    }
}

impl From<BackendArg> for GemmBackend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Native => GemmBackend::Native,
            BackendArg::Matrixmultiply => GemmBackend::Matrixmultiply,
        }
    }
}

/// A `value_parser` over the values of a library enum, by the names the
/// library gives them: `--help` lists the library's own list, so a new
/// algorithm or ISA shows up there without touching the tool.
#[derive(Clone)]
pub struct Named<T: 'static> {
    values: Vec<T>,
    name: fn(T) -> &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T: Copy + Send + Sync + 'static> TypedValueParser for Named<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let flag = arg.map_or_else(|| "value".to_string(), |a| a.to_string());
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(ErrorKind::InvalidUtf8, format!("{flag}: not UTF-8\n")).with_cmd(cmd)
        })?;
        (self.parse)(text).map_err(|e| {
            clap::Error::raw(ErrorKind::InvalidValue, format!("{flag}: {e}\n")).with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            self.values
                .iter()
                .map(|&v| PossibleValue::new((self.name)(v))),
        ))
    }
}

/// `--algo`: [`all_algorithms`] by name.
pub fn algorithm_parser() -> Named<Algorithm> {
    Named {
        values: all_algorithms(),
        name: Algorithm::name,
        parse: parse_algorithm,
    }
}

/// `--isa`: [`Isa::ALL`] by name.
pub fn isa_parser() -> Named<Isa> {
    Named {
        values: Isa::ALL.to_vec(),
        name: Isa::name,
        parse: parse_isa,
    }
}

/// Parses `--isa` with the names `CPUCONV_ISA` takes.
pub fn parse_isa(s: &str) -> Result<Isa, String> {
    Isa::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
        format!("unknown ISA {s:?}; expected one of {}", names.join(", "))
    })
}

/// Parses `--algo`.
pub fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = all_algorithms().iter().map(|a| a.name()).collect();
        format!(
            "unknown algorithm {s:?}; expected one of {}",
            names.join(", ")
        )
    })
}

/// Every concrete algorithm, then `Auto`.
pub fn all_algorithms() -> Vec<Algorithm> {
    Algorithm::CONCRETE
        .into_iter()
        .chain([Algorithm::Auto])
        .collect()
}

/// The path a forced `--isa` really runs, with a warning when the CPU lacks it.
pub fn effective_isa(requested: Option<Isa>) -> Isa {
    match requested {
        None => cpuconv::isa(),
        Some(want) => {
            let got = clamp_isa(want);
            if got != want {
                eprintln!("cpuconv: this CPU does not support {want}; using {got}");
            }
            got
        }
    }
}

/// All hardware threads.
pub fn all_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A rayon pool of `threads` threads (0: rayon's default, every CPU).
pub fn pool(threads: usize) -> Result<rayon::ThreadPool, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot build a {threads}-thread pool: {e}"))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compare(args) => compare::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Gemm(args) => gemm::run(&args),
    };
    match result {
        Ok(()) | Err(Stop::Closed) => ExitCode::SUCCESS,
        Err(Stop::Failed(e)) => {
            eprintln!("cpuconv: {e}");
            ExitCode::FAILURE
        }
    }
}
