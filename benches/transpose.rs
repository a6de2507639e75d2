//! Transposed-convolution throughput: `ConvTranspose2d::forward_with` with
//! every algorithm (`Algorithm::CONCRETE` plus `Auto`) on the transposed
//! suite of `cpuconv compare --pass transpose`, with every thread of the
//! global rayon pool. Throughput is in FLOPs (`ConvTranspose2d::flops`,
//! 2·N·C_in·H·W·(C_out/g)·R·S), so criterion reports Gelem/s = GFLOP/s.
//!
//! An algorithm the library refuses for the transposed convolution
//! (`ConvError::UnsupportedAlgorithm`) is skipped, so new ones show up here
//! as they land.
//!
//! `cargo bench --bench transpose -- transpose/gan_up_k4s2` narrows the run.

use cpuconv::{Algorithm, ConvError, ForwardOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

// The layer tables and the data generator, shared with the `cpuconv` tool.
#[allow(dead_code, unused_imports)] // the tool uses the rest; its tests are not run here
#[path = "../tools/src/suite.rs"]
mod suite;

/// As in `benches/conv.rs`: the scalar Direct reference only on layers up
/// to this many FLOPs. Every layer of the transposed suite is above it
/// (67–537 MFLOP), so Direct runs only on smaller `TRANSPOSED_SUITE` rows
/// someone adds.
const DIRECT_MAX_FLOPS: u64 = 50_000_000;

fn bench_transpose(c: &mut Criterion) {
    for layer in suite::transposed_suite() {
        let t = layer.build().expect("transposed suite layers are valid");
        let data = layer.data(&t);
        let mut out = vec![0.0f32; suite::TransposedLayer::lens(&t)[3]];
        let mut group = c.benchmark_group(format!("transpose/{}", layer.name));
        group.throughput(Throughput::Elements(t.flops()));
        for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
            if algorithm == Algorithm::Direct && t.flops() > DIRECT_MAX_FLOPS {
                continue;
            }
            let options = ForwardOptions::new(algorithm);
            let call = |out: &mut [f32]| {
                t.forward_with(
                    black_box(&data.input),
                    black_box(&data.weight),
                    data.bias.as_deref(),
                    out,
                    &options,
                )
            };
            match call(&mut out) {
                Ok(()) => {}
                Err(ConvError::UnsupportedAlgorithm { .. }) => continue,
                Err(e) => panic!("{} / {}: {e}", layer.name, algorithm.name()),
            }
            group.bench_function(BenchmarkId::from_parameter(algorithm.name()), |b| {
                b.iter(|| call(&mut out).expect("valid buffers"))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_transpose
}
criterion_main!(benches);
