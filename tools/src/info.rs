//! `cpuconv info`: which kernel path runs, why, with what blocking, and how
//! fast the core's FMA units really are.

use crate::all_threads;
use crate::out::{outln, Stop};
use crate::table::{left, right, sig, Table};
use clap::Args;
use cpuconv::arch::{detected_isa, supported_isas};
use cpuconv::gemm::cache::{cache_hierarchy, CacheLevel, CacheSource};
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::gemm::kernels::{
    column_kernel_info, kernel_info, model_blocking, narrower_row_kernel_info, KernelInfo,
};
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
    let caches = cache_hierarchy();
    let level = |c: &CacheLevel| {
        json!({
            "bytes": c.size,
            "line_bytes": c.line,
            "ways": c.ways,
            "sets": c.sets(),
            "shared_by": c.shared_by,
            "per_core_bytes": c.per_core(),
        })
    };
    let kernel = |k: &KernelInfo| {
        let m = model_blocking(k.isa, k.mr, k.nr, caches);
        json!({
            "mr": k.mr,
            "nr": k.nr,
            "mc": k.mc,
            "kc": k.kc,
            "nc": k.nc,
            "tall_mc": k.tall_mc,
            "a_block_bytes": k.mc * k.kc * 4,
            "b_block_bytes": k.kc * k.nc * 4,
            "model": {
                "l1_a_ways": m.l1_a_ways,
                "l1_b_ways": m.l1_b_ways,
                "kc_l1": m.kc_l1,
                "l2_feed_bytes_per_cycle": m.l2_feed_bytes_per_cycle,
                "b_panel_level": m.b_panel_level,
                "l2_b_ways": m.l2_b_ways,
                "l2_a_ways": m.l2_a_ways,
                "l3_a_ways": m.l3_a_ways,
                "l3_b_ways": m.l3_b_ways,
                "mc": m.mc,
                "kc": m.kc,
                "nc": m.nc,
                "l3_tall_b_ways": m.l3_tall_b_ways,
                "tall_mc": m.tall_mc,
            },
        })
    };
    let mut blocking = Map::new();
    for &isa in &supported {
        let mut rows = kernel(&kernel_info(isa));
        // The column kernel plans take where C has few columns, or null.
        rows["columns"] = column_kernel_info(isa).map_or(Value::Null, |k| kernel(&k));
        // The second row kernel narrower C widths take, or null.
        rows["narrower_rows"] = narrower_row_kernel_info(isa).map_or(Value::Null, |k| kernel(&k));
        blocking.insert(isa.name().to_string(), rows);
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
            "l1d": level(&caches.l1d),
            "l2": level(&caches.l2),
            "l3": caches.l3.as_ref().map(level),
            "source": source_name(caches.source),
        },
        "blocking": blocking,
        "peaks": peaks,
        "peak_threads": all_threads(),
    })
}

/// How the report names where the cache description came from.
fn source_name(source: CacheSource) -> &'static str {
    match source {
        CacheSource::Os => "from the OS",
        CacheSource::Cpuid => "from CPUID",
        CacheSource::Assumed => "assumed: neither the OS nor CPUID described them",
    }
}

/// Bytes as KiB or, when whole, MiB.
fn kib(b: usize) -> String {
    if b >= 1024 * 1024 && b.is_multiple_of(1024 * 1024) {
        format!("{} MiB", b / (1024 * 1024))
    } else {
        format!("{} KiB", b / 1024)
    }
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

    let caches = cache_hierarchy();
    outln!(
        "\nCaches ({}; the model's inputs):\n",
        source_name(caches.source)
    )?;
    let table = Table::new(&[
        left("level", 5),
        right("size", 8),
        right("line", 4),
        right("ways", 4),
        right("sets", 6),
        right("shared by", 9),
        right("per core", 9),
    ]);
    outln!("{}", table.header())?;
    let levels = [
        ("L1d", Some(caches.l1d)),
        ("L2", Some(caches.l2)),
        ("L3", caches.l3),
    ];
    for (name, level) in levels {
        let Some(c) = level else {
            outln!("{}", table.row(&[name.into(), "none".into()]))?;
            continue;
        };
        outln!(
            "{}",
            table.row(&[
                name.to_string(),
                kib(c.size),
                c.line.to_string(),
                c.ways.to_string(),
                c.sets().to_string(),
                c.shared_by.to_string(),
                kib(c.per_core()),
            ])
        )?;
    }

    outln!(
        "\nBlocking per supported path: the analytical model (cpuconv::gemm::cache_model) \
         gives each operand the ways of the level that serves its reuse: the B micro-panel \
         in L1 (depth KC₁) or, where L2 can feed the kernel (feed ≤ 32 B/cycle), in one way \
         of L2; the A block in L2 (MC); the B block in this core's L3 share (NC). One way \
         is left spare at each level. Where the B micro-panel lives in L2, C taller than MC \
         runs in blocks of `tall MC` rows of A (in L3, beside a B block of half of L2, \
         `L3 ways B'`), each A micro-panel staying in L1 while the B panels stream past it; \
         `-`: the classic nest at every height. A `col` row is the path's column kernel, which plans \
         take where C has few columns (a 7×7 output plane); an `MRxNR` row, a narrower row \
         kernel the path keeps for C widths its main tile would pad worse (AVX-512's 8×32 \
         where the CPU runs 8×48; CPUCONV_AVX512_TILE=8x32|8x48 overrides).\n"
    )?;
    let blocking = Table::new(&[
        left("isa", 11),
        right("MR", 3),
        right("NR", 3),
        right("L1 ways A+B (KC₁)", 17),
        right("feed B/cycle", 12),
        right("B µpanel", 8),
        right("KC", 5),
        right("L2 ways B+A", 11),
        right("MC", 5),
        right("L3 ways A+B", 11),
        right("NC", 5),
        right("L3 ways B'", 10),
        right("tall MC", 7),
        right("A block", 8),
        right("B block", 8),
    ]);
    outln!("{}", blocking.header())?;
    let kernels = supported.iter().flat_map(|&isa| {
        let columns = column_kernel_info(isa).map(|k| (format!("{} col", isa.name()), k));
        let narrower =
            narrower_row_kernel_info(isa).map(|k| (format!("{} {}x{}", isa.name(), k.mr, k.nr), k));
        std::iter::once((isa.name().to_string(), kernel_info(isa)))
            .chain(narrower)
            .chain(columns)
    });
    for (name, k) in kernels {
        let m = model_blocking(k.isa, k.mr, k.nr, caches);
        outln!(
            "{}",
            blocking.row(&[
                name,
                k.mr.to_string(),
                k.nr.to_string(),
                format!("{}+{} ({})", m.l1_a_ways, m.l1_b_ways, m.kc_l1),
                m.l2_feed_bytes_per_cycle.to_string(),
                format!("L{}", m.b_panel_level),
                k.kc.to_string(),
                format!("{}+{}", m.l2_b_ways, m.l2_a_ways),
                k.mc.to_string(),
                format!("{}+{}", m.l3_a_ways, m.l3_b_ways),
                k.nc.to_string(),
                if k.tall_mc > 0 {
                    m.l3_tall_b_ways.to_string()
                } else {
                    "-".to_string()
                },
                if k.tall_mc > 0 {
                    k.tall_mc.to_string()
                } else {
                    "-".to_string()
                },
                kib(k.mc * k.kc * 4),
                kib(k.kc * k.nc * 4),
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
