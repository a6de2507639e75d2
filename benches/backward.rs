//! Backward-pass throughput: the input gradient (`Conv2d::backward_input`)
//! and the weight gradient (`Conv2d::backward_weight`) with every algorithm
//! `BackwardOptions` accepts, on the layer suite of `cpuconv compare`, with
//! every thread of the global rayon pool. Throughput is in FLOPs (each pass
//! counts the forward's, `Conv2d::flops`), so criterion reports Gelem/s =
//! GFLOP/s.
//!
//! An algorithm the library refuses for a pass (`ConvError::UnsupportedAlgorithm`)
//! is skipped, so new backward algorithms show up here as they land.
//!
//! `cargo bench --bench backward -- grad_weight/r50_3x3` narrows the run.

use cpuconv::{Algorithm, BackwardOptions, Conv2d, ConvError};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

// The layer table and the data generator, shared with the `cpuconv` tool.
#[allow(dead_code, unused_imports)] // the tool uses the rest; its tests are not run here
#[path = "../tools/src/suite.rs"]
mod suite;

/// The Direct backward passes are scalar references like the forward's, so,
/// as in `benches/conv.rs`, they are benchmarked only on layers up to this
/// many FLOPs (seed, mbv2_dw, grouped); above it they are skipped.
const DIRECT_MAX_FLOPS: u64 = 50_000_000;

/// One backward pass: its name and one call writing `out`.
struct Pass {
    name: &'static str,
    out_len: fn(&Conv2d) -> usize,
    call: fn(&Conv2d, &Tensors, &mut [f32], &BackwardOptions) -> Result<(), ConvError>,
}

struct Tensors {
    input: Vec<f32>,
    weight: Vec<f32>,
    grad_output: Vec<f32>,
}

const PASSES: [Pass; 2] = [
    Pass {
        name: "grad_input",
        out_len: |conv| conv.geometry().input_len(),
        call: |conv, t, out, options| {
            conv.backward_input(
                black_box(&t.weight),
                black_box(&t.grad_output),
                out,
                options,
            )
        },
    },
    Pass {
        name: "grad_weight",
        out_len: |conv| conv.geometry().weight_len(),
        call: |conv, t, out, options| {
            conv.backward_weight(black_box(&t.input), black_box(&t.grad_output), out, options)
        },
    },
];

fn bench_backward(c: &mut Criterion) {
    for pass in &PASSES {
        for layer in suite::suite() {
            let conv = layer.build().expect("suite layers are valid");
            let data = layer.data(&conv);
            let t = Tensors {
                input: data.input,
                weight: data.weight,
                grad_output: layer.grad_output(&conv),
            };
            let mut out = vec![0.0f32; (pass.out_len)(&conv)];
            let mut group = c.benchmark_group(format!("{}/{}", pass.name, layer.name));
            group.throughput(Throughput::Elements(conv.flops()));
            for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
                if algorithm == Algorithm::Direct && conv.flops() > DIRECT_MAX_FLOPS {
                    continue;
                }
                let options = BackwardOptions::new(algorithm);
                match (pass.call)(&conv, &t, &mut out, &options) {
                    Ok(()) => {}
                    Err(ConvError::UnsupportedAlgorithm { .. }) => continue,
                    Err(e) => panic!("{} / {} / {}: {e}", pass.name, layer.name, algorithm.name()),
                }
                group.bench_function(BenchmarkId::from_parameter(algorithm.name()), |b| {
                    b.iter(|| (pass.call)(&conv, &t, &mut out, &options).expect("valid buffers"))
                });
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_backward
}
criterion_main!(benches);
