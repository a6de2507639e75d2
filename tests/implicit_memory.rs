//! What the forward calls allocate, seen by a counting global allocator:
//! implicit GEMM never allocates an im2col-sized buffer (the largest
//! allocation is compared with the column matrix the explicit lowering
//! needs), and a warm plan allocates nothing at all, for every algorithm
//! `Auto` picks.
//! A warm input gradient through the sub-pixel phases takes its large
//! buffers from the thread's pool.

use cpuconv::{
    Algorithm, BackwardOptions, Conv2d, Conv2dParams, ForwardOptions, Padding, Parallelism,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNT: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

/// Records one allocation (or reallocation) of `size` bytes while armed.
fn record(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System (alloc, alloc_zeroed or realloc)
        // with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What was allocated while a closure ran (on any thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Allocs {
    /// Allocations and reallocations.
    count: usize,
    /// Their sizes, summed.
    bytes: usize,
    /// The largest of them.
    largest: usize,
}

/// Every allocation made, by any thread, while `f` runs.
fn allocations(f: impl FnOnce()) -> Allocs {
    COUNT.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    Allocs {
        count: COUNT.load(Ordering::SeqCst),
        bytes: BYTES.load(Ordering::SeqCst),
        largest: LARGEST.load(Ordering::SeqCst),
    }
}

/// Largest single allocation, in bytes, made while `f` runs.
fn largest_allocation(f: impl FnOnce()) -> usize {
    allocations(f).largest
}

/// The allocation counter is global, so the checks run one after another in
/// a single test rather than as parallel tests.
#[test]
fn implicit_memory_is_bounded_and_warm_plans_allocate_nothing() {
    // First, while every thread's own packing buffers are still cold.
    caller_workspace_means_no_allocation_at_all();
    implicit_allocates_no_column_matrix();
    warm_plans_allocate_nothing();
    warm_input_gradient_takes_its_buffers_from_the_pool();
}

/// r50_3x3_s2's input gradient runs as four sub-pixel phases, three of
/// them on the dense tile with their weights packed up front (several
/// bands of rows each), beside the phases' planes and gathered weights:
/// once warm, every one of those buffers comes from the thread's pool
/// (fresh ones came back as new pages at every call, 96 page faults per
/// call on Zen 3), and what is still asked of the allocator is small
/// bookkeeping.
fn warm_input_gradient_takes_its_buffers_from_the_pool() {
    let conv = Conv2dParams::new(1, 128, (56, 56), 128, (3, 3))
        .stride(2, 2)
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let w: Vec<f32> = (0..g.weight_len()).map(|i| (i % 7) as f32 - 3.0).collect();
    let dy: Vec<f32> = (0..g.output_len()).map(|i| (i % 5) as f32 - 2.0).collect();
    let mut dx = vec![0.0f32; g.input_len()];
    let opts = BackwardOptions::new(Algorithm::Auto).parallelism(Parallelism::Sequential);
    conv.backward_input(&w, &dy, &mut dx, &opts).unwrap();
    let warm = allocations(|| conv.backward_input(&w, &dy, &mut dx, &opts).unwrap());
    // The smallest phase's packed dense weights: 2 taps × 128 × 128.
    let packed_phase = 2 * 128 * 128 * 4;
    println!("warm input gradient: {warm:?}, a packed phase {packed_phase} B");
    assert!(
        warm.largest < packed_phase / 8,
        "a warm call allocated {} B at once",
        warm.largest
    );
}

fn implicit_allocates_no_column_matrix() {
    // r50_conv1 and batch16 from the suite.
    let layers = [
        Conv2dParams::new(1, 3, (224, 224), 64, (7, 7))
            .stride(2, 2)
            .padding(Padding::symmetric(3, 3)),
        Conv2dParams::new(16, 32, (32, 32), 64, (3, 3)).padding(Padding::symmetric(1, 1)),
    ];
    for params in layers {
        let conv = params.build().unwrap();
        let g = *conv.geometry();
        let x = vec![0.5f32; g.input_len()];
        let w = vec![0.25f32; g.weight_len()];
        let mut out = vec![0.0f32; g.output_len()];
        let column_matrix = g.gemm_k() * g.out_plane() * 4;
        for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
            let opts = ForwardOptions::new(Algorithm::Implicit).parallelism(parallelism);
            let implicit = largest_allocation(|| {
                conv.forward_with(&x, &w, None, &mut out, &opts).unwrap();
            });
            let explicit = largest_allocation(|| {
                let o = opts.algorithm(Algorithm::Im2col);
                conv.forward_with(&x, &w, None, &mut out, &o).unwrap();
            });
            let plan = conv.plan(&w, None, &opts).unwrap();
            println!(
                "{params:?} {parallelism:?}: column matrix {column_matrix} B, largest allocation: \
                 implicit {implicit} B, explicit {explicit} B; plan reports {} B per thread",
                plan.workspace_bytes_per_thread()
            );
            assert!(
                explicit >= column_matrix,
                "the explicit lowering builds the matrix"
            );
            // The textbook lowering of the whole batch is one matrix of N
            // images' columns (batch16: 16 × 1.1 MiB ≈ 18 MiB); implicit
            // needs only its packing panels, bounded by the blocking and
            // independent of the batch: at most 2 MiB per thread, and what
            // the plan reports plus one staged row.
            let batch_matrix = column_matrix * g.batch;
            let bound = plan.workspace_bytes_per_thread() + 4 * 4096;
            assert!(
                implicit <= bound && implicit <= 2 << 20,
                "implicit allocated {implicit} B, bound {bound} B"
            );
            assert!(
                implicit < batch_matrix / 4,
                "implicit allocated {implicit} B, batch column matrix is {batch_matrix} B"
            );
            assert!(plan.workspace_bytes_per_thread() <= 2 << 20);
        }
    }
}

/// One layer for each algorithm `Auto` picks, with the algorithm it must pick.
fn auto_layers() -> Vec<(&'static str, Conv2d, Algorithm)> {
    let build = |p: Conv2dParams| p.build().unwrap();
    vec![
        // The seed example: 32 FLOP.
        (
            "seed 3x3",
            build(Conv2dParams::new(1, 1, (3, 3), 1, (2, 2))),
            Algorithm::Direct,
        ),
        (
            "depthwise 32x28x28 3x3",
            build(
                Conv2dParams::new(1, 32, (28, 28), 32, (3, 3))
                    .groups(32)
                    .padding(Padding::symmetric(1, 1)),
            ),
            Algorithm::DirectSimd,
        ),
        // Enough work for two threads.
        (
            "depthwise 96x56x56 3x3",
            build(
                Conv2dParams::new(1, 96, (56, 56), 96, (3, 3))
                    .groups(96)
                    .padding(Padding::symmetric(1, 1)),
            ),
            Algorithm::DirectSimd,
        ),
        (
            "grouped 64x28x28 3x3, 4 channels per group",
            build(
                Conv2dParams::new(2, 64, (28, 28), 64, (3, 3))
                    .groups(16)
                    .padding(Padding::symmetric(1, 1)),
            ),
            Algorithm::DirectSimd,
        ),
        (
            "depthwise 96x7x7 3x3 (channels in lanes)",
            build(
                Conv2dParams::new(1, 96, (7, 7), 96, (3, 3))
                    .groups(96)
                    .padding(Padding::symmetric(1, 1)),
            ),
            Algorithm::DirectSimd,
        ),
        (
            "dense 64x56x56 3x3",
            build(Conv2dParams::new(1, 64, (56, 56), 64, (3, 3)).padding(Padding::symmetric(1, 1))),
            Algorithm::DirectDense,
        ),
        (
            "dense 16x(32x16x16) 3x3",
            build(
                Conv2dParams::new(16, 32, (16, 16), 64, (3, 3)).padding(Padding::symmetric(1, 1)),
            ),
            Algorithm::DirectDense,
        ),
        (
            "stem 3x56x56 3x3",
            build(Conv2dParams::new(1, 3, (56, 56), 32, (3, 3)).padding(Padding::symmetric(1, 1))),
            Algorithm::Implicit,
        ),
        (
            "pointwise 64x28x28 -> 128",
            build(Conv2dParams::new(1, 64, (28, 28), 128, (1, 1))),
            Algorithm::Implicit,
        ),
    ]
}

/// After one warm-up call, a planned forward allocates nothing, on the
/// calling thread alone and threaded; and `forward_in` with the plan's own
/// workspace allocates nothing even on a fresh thread, with no warm-up: for
/// every algorithm `Auto` picks. Two allocations remain on the threaded
/// path, both measured here against bounds that one allocation per call
/// would break:
///
/// * The implicit GEMM keeps its packing panels per worker thread, so a
///   worker allocates them the first time it packs, which on a pool of more
///   threads than one call engages may be after the warm-up (seen with
///   `RAYON_NUM_THREADS=16`: 11 to 17 allocations of up to 252 KiB in 200
///   calls). `DirectDense` keeps its padded image and row buffers on the
///   calling thread, so a thread's first call allocates them once, and
///   `DirectSimd` with channels in lanes a block's transposed planes in each
///   thread's pool. The other direct paths keep nothing per thread.
/// * A call from a thread outside the pool hands its work to the pool
///   through rayon's global injector queue (`Registry::inject`, a crossbeam
///   `Injector`), which allocates a new block of 63 job slots (1520 bytes)
///   every 63 injections and frees the drained one: rayon's steady cost,
///   about 24 bytes per call, not only on first use. Inside a worker (here
///   `rayon::scope`) the split goes through the worker's own deque and
///   allocates nothing.
fn warm_plans_allocate_nothing() {
    let mut failures = Vec::new();
    let mut expect_none = |what: String, got: Allocs| {
        println!("{what}: {got:?}");
        if got != Allocs::default() {
            failures.push(format!("{what} allocated {got:?}"));
        }
    };
    for (name, conv, algorithm) in auto_layers() {
        let g = *conv.geometry();
        let x: Vec<f32> = (0..g.input_len()).map(|i| (i % 11) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|i| (i % 5) as f32 * 0.2).collect();
        let b: Vec<f32> = (0..g.out_channels).map(|i| i as f32).collect();
        let mut out = vec![0.0f32; g.output_len()];
        for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
            let what = format!("{name} ({algorithm:?}, {parallelism:?})");
            let opts = ForwardOptions::new(Algorithm::Auto).parallelism(parallelism);
            let plan = conv.plan(&w, Some(&b), &opts).unwrap();
            assert_eq!(plan.algorithm(), algorithm, "{name}: Auto's choice");
            let warm_calls = |out: &mut [f32]| {
                plan.forward(&x, out).unwrap(); // warm-up
                allocations(|| {
                    for _ in 0..3 {
                        plan.forward(&x, out).unwrap();
                    }
                })
            };
            if parallelism == Parallelism::Sequential {
                expect_none(format!("{what}: 3 warm forwards"), warm_calls(&mut out));
            } else {
                // Packing panels of workers that had no work before: each
                // worker's at most twice the per-thread workspace (grown
                // once), in at most 6 allocations.
                let threads = rayon::current_num_threads();
                let (panel_bytes, panel_allocs) = match algorithm {
                    Algorithm::Implicit => {
                        (2 * threads * plan.workspace_bytes_per_thread(), 6 * threads)
                    }
                    // The calling thread's padded image and a row buffer per
                    // thread, kept for its next call: grown once.
                    Algorithm::DirectDense => (threads * plan.workspace_bytes_per_thread(), 1),
                    // Channels in lanes: a block's transposed planes, from
                    // each thread's pool, allocated on its first block.
                    Algorithm::DirectSimd => (
                        threads * plan.workspace_bytes_per_thread(),
                        threads * usize::from(plan.workspace_bytes_per_thread() > 0),
                    ),
                    _ => (0, 0),
                };
                let inside = rayon::scope(|_| warm_calls(&mut out));
                if panel_bytes == 0 {
                    expect_none(format!("{what}: 3 warm forwards in a worker"), inside);
                } else {
                    println!("{what}: 3 warm forwards in a worker: {inside:?}");
                    assert!(
                        inside.bytes <= panel_bytes && inside.count <= panel_allocs,
                        "{what}: 3 warm forwards in a worker allocated {inside:?}, \
                         more than packing panels for {threads} workers"
                    );
                }
                let calls: usize = 200;
                let outside = allocations(|| {
                    for _ in 0..calls {
                        plan.forward(&x, &mut out).unwrap();
                    }
                });
                println!("{what}: {calls} forwards from outside the pool: {outside:?}");
                // DirectDense forks twice per padded image (the copy, then
                // the rows): two injections per call.
                let injections = match algorithm {
                    Algorithm::DirectDense => 2 * calls,
                    _ => calls,
                };
                let blocks = injections.div_ceil(63) + 1;
                assert!(
                    outside.count <= blocks + panel_allocs
                        && outside.bytes <= blocks * 2048 + panel_bytes,
                    "{what}: {calls} forwards from outside the pool allocated {outside:?}, \
                     more than rayon's injector blocks and packing panels"
                );
            }

            let mut ws = plan.workspace().unwrap();
            assert_eq!(ws.bytes(), plan.workspace_bytes_per_thread());
            // A fresh thread: nothing of its own is warm.
            let cold = std::thread::scope(|s| {
                s.spawn(|| {
                    allocations(|| {
                        for _ in 0..2 {
                            plan.forward_in(&x, &mut out, &mut ws).unwrap();
                        }
                    })
                })
                .join()
                .unwrap()
            });
            expect_none(format!("{what}: 2 forward_in on a fresh thread"), cold);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// With a workspace from the plan, even the first call allocates nothing,
/// for both GEMM lowerings, and gives the one-shot forward's values.
fn caller_workspace_means_no_allocation_at_all() {
    // K_gemm = 32·4·4 = 512: a full-depth KC block.
    let conv = Conv2dParams::new(2, 32, (20, 20), 24, (4, 4))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let x: Vec<f32> = (0..g.input_len()).map(|i| (i % 13) as f32 - 6.0).collect();
    let w: Vec<f32> = (0..g.weight_len()).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..g.out_channels).map(|i| i as f32).collect();
    for algorithm in [Algorithm::Implicit, Algorithm::Im2col] {
        let opts = ForwardOptions::new(algorithm);
        let plan = conv.plan(&w, Some(&b), &opts).unwrap();
        // The reference runs Direct, so no thread's packing buffers get warm.
        let want = conv
            .forward_to_vec(&x, &w, Some(&b), Algorithm::Direct)
            .unwrap();
        let mut ws = plan.workspace().unwrap();
        assert!(ws.bytes() >= plan.workspace_bytes_per_thread());
        let mut out = vec![0.0f32; g.output_len()];
        // On a fresh thread, whose per-thread packing buffers are cold: any
        // use of them instead of the workspace would allocate.
        let largest = std::thread::scope(|s| {
            s.spawn(|| {
                largest_allocation(|| {
                    for _ in 0..2 {
                        plan.forward_in(&x, &mut out, &mut ws).unwrap();
                    }
                })
            })
            .join()
            .unwrap()
        });
        assert_eq!(
            largest, 0,
            "{algorithm:?}: forward_in allocated {largest} B"
        );
        for (o, r) in out.iter().zip(&want) {
            assert!(
                (o - r).abs() <= 1e-4 * (1.0 + r.abs()),
                "{algorithm:?}: {o} vs {r}"
            );
        }
    }
}
