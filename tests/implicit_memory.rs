//! Implicit GEMM never allocates an im2col-sized buffer: a counting global
//! allocator records the largest single allocation made during the forward
//! call and compares it with the column matrix the explicit lowering needs.

use cpuconv::{Algorithm, Conv2dParams, ForwardOptions, Padding, Parallelism};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Largest single allocation, in bytes, made while `f` runs.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    LARGEST.load(Ordering::SeqCst)
}

/// The allocation counter is global, so the checks run one after another in
/// a single test rather than as parallel tests.
#[test]
fn implicit_memory_is_bounded_by_the_packing_panels() {
    // First, while every thread's own packing buffers are still cold.
    caller_workspace_means_no_allocation_at_all();
    implicit_allocates_no_column_matrix();
    planned_implicit_forward_allocates_nothing_once_warm();
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

fn planned_implicit_forward_allocates_nothing_once_warm() {
    let conv = Conv2dParams::new(1, 64, (56, 56), 64, (3, 3))
        .padding(Padding::symmetric(1, 1))
        .build()
        .unwrap();
    let g = *conv.geometry();
    let x = vec![0.5f32; g.input_len()];
    let w = vec![0.25f32; g.weight_len()];
    let opts = ForwardOptions::new(Algorithm::Implicit).parallelism(Parallelism::Sequential);
    let plan = conv.plan(&w, None, &opts).unwrap();
    let mut out = vec![0.0f32; g.output_len()];
    plan.forward(&x, &mut out).unwrap(); // warms this thread's packing buffers
    let largest = largest_allocation(|| {
        for _ in 0..3 {
            plan.forward(&x, &mut out).unwrap();
        }
    });
    assert_eq!(largest, 0, "a warm planned forward allocated {largest} B");
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
        let mut ws = plan.workspace();
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
