//! The comparison backend: the `matrixmultiply` crate behind the same
//! interface as the native engine.

use super::driver::{scale_c, split_range, thread_count};
use super::engine::{ASource, BSource, Epilogue, StridedC, StridedMatrix};
use super::pack::AlignedBuf;
use super::GemmOptions;
use rayon::prelude::*;

/// The `matrixmultiply` backend, threaded by splitting C's columns across
/// rayon (its own threading is process-global). Bias is written into C in the
/// pass before the product accumulates onto it; an activation needs a pass
/// after: only the native engine fuses them into the store.
///
/// # Safety
/// As [`super::driver::gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_matrixmultiply<B: BSource<f32>>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &ASource<'_, f32>,
    b: &B,
    beta: f32,
    c: StridedC<f32>,
    ep: &Epilogue<f32>,
    options: &GemmOptions,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        // SAFETY: forwarded.
        unsafe { scale_c(m, n, beta, c, ep) };
        return;
    }
    let mut materialised = AlignedBuf::default();
    let bs = match b.as_strided() {
        Some(s) => s,
        None => {
            let buf = materialised.get(k * n);
            // SAFETY: one panel of width n is the whole k × n matrix, row-major.
            unsafe { b.pack_block(0, k, 0, n, n, buf, &mut Vec::new()) };
            StridedMatrix {
                ptr: buf.as_ptr(),
                rs: n as isize,
                cs: 1,
            }
        }
    };
    let mut beta = beta;
    if !ep.bias.is_null() {
        let with_bias = Epilogue {
            bias: ep.bias,
            ..Epilogue::NONE
        };
        // SAFETY: forwarded.
        unsafe { scale_c(m, n, beta, c, &with_bias) };
        beta = 1.0;
    }
    let threads = thread_count(m, n, k, options.parallelism).min(n.div_ceil(64));
    let run = |j0: usize, j1: usize| {
        // Use the views whole, so the closure captures the Sync wrappers and
        // not their raw-pointer fields.
        let (bs, c) = (&bs, &c);
        // SAFETY: columns j0..j1 of B and C; blocks of C are disjoint per task.
        unsafe {
            let bp = bs.ptr.offset(j0 as isize * bs.cs);
            let cp = c.ptr.offset(j0 as isize * c.cs);
            match *a {
                ASource::Strided(StridedMatrix { ptr, rs, cs }) => ::matrixmultiply::sgemm(
                    m,
                    k,
                    j1 - j0,
                    alpha,
                    ptr,
                    rs,
                    cs,
                    bp,
                    bs.rs,
                    bs.cs,
                    beta,
                    cp,
                    c.rs,
                    c.cs,
                ),
                ASource::Packed(packed) => {
                    let (ptr, kfull, mr) = (packed.as_ptr(), packed.depth(), packed.mr());
                    for q in 0..m.div_ceil(mr) {
                        let rows = mr.min(m - q * mr);
                        ::matrixmultiply::sgemm(
                            rows,
                            k,
                            j1 - j0,
                            alpha,
                            ptr.add(q * kfull * mr),
                            1,
                            mr as isize,
                            bp,
                            bs.rs,
                            bs.cs,
                            beta,
                            cp.offset((q * mr) as isize * c.rs),
                            c.rs,
                            c.cs,
                        )
                    }
                }
            }
        }
    };
    if threads <= 1 {
        run(0, n);
    } else {
        (0..threads).into_par_iter().with_max_len(1).for_each(|t| {
            let (j0, j1) = split_range(n, 16, threads, t);
            if j0 < j1 {
                run(j0, j1);
            }
        });
    }
    if ep.clamp.is_some() {
        let clamp_only = Epilogue {
            clamp: ep.clamp,
            ..Epilogue::NONE
        };
        // SAFETY: forwarded; C = clamp(1·C).
        unsafe { scale_c(m, n, 1.0, c, &clamp_only) };
    }
}
