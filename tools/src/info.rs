//! `cpuconv info`: which kernel path runs, why, with what blocking, and how
//! fast the core's FMA units really are.

use crate::all_threads;
use crate::out::{outln, Stop};
use crate::table::{left, right, sig, Table};
use clap::Args;
use cpuconv::gemm::cache::cache_sizes;
use cpuconv::gemm::kernels::peak::fma_peak_gflops;
use cpuconv::gemm::kernels::{detected_isa, kernel_info, supported_isas};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Skip the FMA peak measurement (about a second per path).
    #[arg(long)]
    no_peak: bool,
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

/// Entry point of `cpuconv info`.
pub fn run(args: &InfoArgs) -> Result<(), Stop> {
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
        let one = fma_peak_gflops(isa, 1);
        let many = if all > 1 {
            fma_peak_gflops(isa, all)
        } else {
            one
        };
        outln!(
            "{}",
            peak.row(&[
                isa.name().to_string(),
                sig(one),
                sig(many),
                sig(many / all as f64),
            ])
        )?;
    }
    Ok(())
}
