//! `cpuconv info`: which kernel path runs, why, with what blocking, and how
//! fast the core's FMA units really are.

use crate::all_threads;
use crate::out::{outln, Stop};
use crate::table::{left, right, sig, Table};
use clap::Args;
use cpuconv::arch::{detected_isa, supported_isas};
use cpuconv::gemm::cache::cache_sizes;
use cpuconv::gemm::kernels::kernel_info;
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::Isa;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Skip the FMA peak measurement (about a second per path).
    #[arg(long)]
    no_peak: bool,

    /// Everything as one JSON object on stdout: the same facts as the text,
    /// with `peaks` null under --no-peak.
    #[arg(long, conflicts_with = "isas")]
    json: bool,

    /// Print only the ISA paths this CPU supports, comma-separated, lowest
    /// first (e.g. `portable,avx2,avx512`), for scripts; measures nothing.
    #[arg(long)]
    isas: bool,
}

/// The CPU model from `/proc/cpuinfo`, where there is one.
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The SIMD features the kernels care about, as `name: yes/no`.
#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Vec<(&'static str, bool)> {
    macro_rules! detect {
        ($($f:tt),*) => {
            vec![$(($f, std::arch::is_x86_feature_detected!($f))),*]
        };
    }
    detect!(
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512dq",
        "avx512bw",
        "avx512vl",
        "avx512vnni",
        "avx512bf16"
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_features() -> Vec<(&'static str, bool)> {
    Vec::new()
}

/// The measured FMA peak of one path.
struct Peak {
    isa: Isa,
    one: f64,
    all: f64,
}

/// The peak of `isa` at one thread and at all of them.
fn measure_peak(isa: Isa) -> Peak {
    let all = all_threads();
    let one = fma_peak_gflops(isa, 1);
    let many = if all > 1 {
        fma_peak_gflops(isa, all)
    } else {
        one
    };
    Peak {
        isa,
        one,
        all: many,
    }
}

/// `--json`: the facts of the text output, as numbers where they are numbers.
fn json(args: &InfoArgs) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let supported = supported_isas();
    let caches = cache_sizes();
    let mut blocking = Map::new();
    for &isa in &supported {
        let k = kernel_info(isa);
        blocking.insert(
            isa.name().to_string(),
            json!({
                "mr": k.mr,
                "nr": k.nr,
                "mc": k.mc,
                "kc": k.kc,
                "nc": k.nc,
                "a_block_bytes": k.mc * k.kc * 4,
                "b_block_bytes": k.kc * k.nc * 4,
            }),
        );
    }
    let peaks = if args.no_peak {
        Value::Null
    } else {
        let all = all_threads();
        let mut m = Map::new();
        for p in supported.iter().rev().map(|&isa| measure_peak(isa)) {
            m.insert(
                p.isa.name().to_string(),
                json!({
                    "one_thread_gflops": p.one,
                    "all_threads_gflops": p.all,
                    "per_thread_gflops": p.all / all as f64,
                }),
            );
        }
        Value::Object(m)
    };
    let features: Map<String, Value> = cpu_features()
        .into_iter()
        .map(|(name, on)| (name.to_string(), Value::Bool(on)))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "cpu_model": cpu_model(),
        "arch": std::env::consts::ARCH,
        "threads_available": all_threads(),
        "rayon_threads": rayon::current_num_threads(),
        "active_isa": cpuconv::isa().name(),
        "detected_isa": detected_isa().name(),
        "supported_isas": supported.iter().map(|i| i.name()).collect::<Vec<_>>(),
        "cpuconv_isa_env": std::env::var("CPUCONV_ISA").ok(),
        "cpu_features": features,
        "caches": {
            "l1d_bytes": caches.l1d,
            "l2_bytes": caches.l2,
            "l3_per_core_bytes": caches.l3_per_core,
            "from_os": caches.from_os,
        },
        "blocking": blocking,
        "peaks": peaks,
        "peak_threads": all_threads(),
    })
}

/// Entry point of `cpuconv info`.
pub fn run(args: &InfoArgs) -> Result<(), Stop> {
    if args.isas {
        let names: Vec<&str> = supported_isas().iter().map(|i| i.name()).collect();
        return outln!("{}", names.join(","));
    }
    if args.json {
        return outln!("{}", json(args));
    }
    outln!("cpuconv {}", env!("CARGO_PKG_VERSION"))?;
    if let Some(model) = cpu_model() {
        outln!("CPU:          {model}")?;
    }
    outln!("arch:         {}", std::env::consts::ARCH)?;
    outln!(
        "threads:      {} available, rayon pool {}",
        all_threads(),
        rayon::current_num_threads()
    )?;
    outln!("active ISA:   {}", cpuconv::isa())?;
    outln!("detected ISA: {}", detected_isa())?;
    match std::env::var("CPUCONV_ISA") {
        Ok(v) => outln!("CPUCONV_ISA:  {v:?}")?,
        Err(_) => outln!("CPUCONV_ISA:  (unset)")?,
    }
    let supported = supported_isas();
    let names: Vec<&str> = supported.iter().map(|i| i.name()).collect();
    outln!("supported:    {}", names.join(", "))?;
    let features = cpu_features();
    if features.is_empty() {
        outln!("features:     (not x86-64: the portable path only)")?;
    } else {
        let f: Vec<String> = features
            .iter()
            .map(|(name, on)| format!("{name}{}", if *on { "+" } else { "-" }))
            .collect();
        outln!("features:     {}", f.join(" "))?;
    }

    let caches = cache_sizes();
    let kib = |b: usize| {
        if b >= 1024 * 1024 && b.is_multiple_of(1024 * 1024) {
            format!("{} MiB", b / (1024 * 1024))
        } else {
            format!("{} KiB", b / 1024)
        }
    };
    outln!(
        "caches:       L1d {}, L2 {}, L3 {} per core ({})",
        kib(caches.l1d),
        kib(caches.l2),
        kib(caches.l3_per_core),
        if caches.from_os {
            "from the OS"
        } else {
            "defaults: the OS reported none"
        }
    )?;

    outln!("\nBlocking (per supported path, from those cache sizes):\n")?;
    let blocking = Table::new(&[
        left("isa", 8),
        right("MR", 3),
        right("NR", 3),
        right("MC", 5),
        right("KC", 5),
        right("NC", 5),
        right("A block KiB", 11),
        right("B block KiB", 11),
    ]);
    outln!("{}", blocking.header())?;
    for &isa in &supported {
        let k = kernel_info(isa);
        outln!(
            "{}",
            blocking.row(&[
                isa.name().to_string(),
                k.mr.to_string(),
                k.nr.to_string(),
                k.mc.to_string(),
                k.kc.to_string(),
                k.nc.to_string(),
                (k.mc * k.kc * 4 / 1024).to_string(),
                (k.kc * k.nc * 4 / 1024).to_string(),
            ])
        )?;
    }

    if args.no_peak {
        return Ok(());
    }
    let all = all_threads();
    outln!(
        "\nMeasured FMA peak (GFLOP/s, fp32, one FMA = 2 FLOPs, best of 5 × ~50 ms; \
         all threads = {all}):\n"
    )?;
    let peak = Table::new(&[
        left("isa", 8),
        right("1 thread", 9),
        right("all threads", 11),
        right("per thread", 10),
    ]);
    outln!("{}", peak.header())?;
    for &isa in supported.iter().rev() {
        let p = measure_peak(isa);
        outln!(
            "{}",
            peak.row(&[
                isa.name().to_string(),
                sig(p.one),
                sig(p.all),
                sig(p.all / all as f64),
            ])
        )?;
    }
    Ok(())
}
