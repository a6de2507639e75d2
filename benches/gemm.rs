//! GEMM throughput: cpuconv's native engine against `matrixmultiply` on the
//! shapes `cpuconv gemm` measures (squares 64..2048 and the GEMMs the
//! ResNet-50 layers of the convolution suite lower to), at one thread and at
//! every thread. Throughput is in FLOPs (2·M·K·N), so criterion reports
//! Gelem/s = GFLOP/s.
//!
//! `cargo bench --bench gemm -- 'gemm/1t/ours'` narrows the run.

use cpuconv::gemm::{sgemm, GemmBackend, GemmOptions, MatMut, MatRef, Parallelism};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

// The shape lists and the data generator, shared with the `cpuconv` tool.
#[allow(dead_code, unused_imports)] // the tool uses the rest; its tests are not run here
#[path = "../tools/src/suite.rs"]
mod suite;

fn bench_gemm(c: &mut Criterion) {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    // One thread runs on the calling thread; "all" uses every thread of the
    // global rayon pool, which is what a caller outside any pool gets.
    let mut modes = vec![("1t".to_string(), Parallelism::Sequential)];
    if all > 1 {
        modes.push((format!("{all}t"), Parallelism::Rayon));
    }
    for (label, parallelism) in modes {
        let mut group = c.benchmark_group(format!("gemm/{label}"));
        for (m, k, n) in suite::gemm_shapes() {
            let mut rng = suite::Rng::new((m * 31 + k * 17 + n) as u64);
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Elements(2 * (m * k * n) as u64));
            for (name, backend) in [
                ("ours", GemmBackend::Native),
                ("matrixmultiply", GemmBackend::Matrixmultiply),
            ] {
                let options = GemmOptions::default()
                    .backend(backend)
                    .parallelism(parallelism)
                    .isa(None);
                group.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{n}")), |bench| {
                    bench.iter(|| {
                        sgemm(
                            1.0,
                            MatRef::row_major(black_box(&a), m, k),
                            MatRef::row_major(black_box(&b), k, n),
                            0.0,
                            MatMut::row_major(&mut out, m, n),
                            &options,
                        )
                        .expect("valid shapes")
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_gemm
}
criterion_main!(benches);
