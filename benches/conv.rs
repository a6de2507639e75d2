//! Convolution throughput: every algorithm (`Algorithm::CONCRETE` plus
//! `Auto`) on the layer suite of `cpuconv compare`, with every thread of the
//! global rayon pool. Throughput is in FLOPs (`Conv2d::flops`), so criterion
//! reports Gelem/s = GFLOP/s.
//!
//! `cargo bench --bench conv -- conv/r50_3x3` narrows the run.

use cpuconv::{Algorithm, ForwardOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

// The layer table and the data generator, shared with the `cpuconv` tool.
#[allow(dead_code, unused_imports)] // the tool uses the rest; its tests are not run here
#[path = "../tools/src/suite.rs"]
mod suite;

/// Direct is the scalar reference (about 1.2 GFLOP/s on a Zen 5 core), so
/// each call on a ResNet-sized layer (~100–600 MFLOP) takes 0.1–0.5 s, and
/// criterion's minimum of 10 samples would spend several seconds per layer
/// confirming what `cpuconv compare` already shows. It is benchmarked only
/// on layers up to this many FLOPs (seed, mbv2_dw, grouped: under ~10 ms a
/// call); above it, it is skipped.
const DIRECT_MAX_FLOPS: u64 = 50_000_000;

fn bench_conv(c: &mut Criterion) {
    for layer in suite::suite() {
        let conv = layer.build().expect("suite layers are valid");
        let data = layer.data(&conv);
        let mut out = vec![0.0f32; conv.geometry().output_len()];
        let mut group = c.benchmark_group(format!("conv/{}", layer.name));
        group.throughput(Throughput::Elements(conv.flops()));
        for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
            if algorithm == Algorithm::Direct && conv.flops() > DIRECT_MAX_FLOPS {
                continue;
            }
            // `auto` keeps its name whatever it picks, so saved criterion
            // baselines stay comparable; `cpuconv compare` shows the pick.
            let options = ForwardOptions::new(algorithm);
            group.bench_function(BenchmarkId::from_parameter(algorithm.name()), |b| {
                b.iter(|| {
                    conv.forward_with(
                        black_box(&data.input),
                        black_box(&data.weight),
                        data.bias.as_deref(),
                        &mut out,
                        &options,
                    )
                    .expect("valid buffers")
                })
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
    targets = bench_conv
}
criterion_main!(benches);
