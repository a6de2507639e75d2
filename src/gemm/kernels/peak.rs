//! Measured fused-multiply-add throughput of each ISA path: the ceiling a
//! GEMM micro-kernel on that path can reach, so GEMM and convolution speeds
//! can be reported as a fraction of what the core really does (clock, turbo
//! and FMA-unit count included) rather than of a datasheet number.
//!
//! The loop keeps many independent accumulator chains (16 zmm for AVX-512,
//! 12 ymm / `f32x8` for AVX2 and portable) so that neither the FMA latency
//! (4 cycles on Zen 5 and Skylake-X) nor a data dependency limits it: with
//! two FMA pipes, 8 chains already cover the latency. Each chain computes
//! `acc = acc·x + y` with `x` just below 1 and `y` small, so the values stay
//! normal (no denormal slow path) and bounded.

use crate::arch::{clamp_isa, Isa};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Target length of one timed measurement.
const TARGET: Duration = Duration::from_millis(50);

/// Timed measurements per call; the best one is reported.
const ROUNDS: usize = 5;

/// Multiplier and addend of every chain: `acc·X + Y` converges to 1.
const X: f32 = 0.999_999;
const Y: f32 = 1.0e-6;

/// FLOPs one kernel iteration performs: `2 · lanes · chains`.
fn flops_per_iter(isa: Isa) -> u64 {
    let (lanes, chains) = match isa {
        Isa::Avx512 => (16, AVX512_CHAINS),
        Isa::Avx2 => (8, AVX2_CHAINS),
        Isa::Portable => (8, PORTABLE_CHAINS),
    };
    2 * lanes * chains as u64
}

/// Runs `iters` iterations of the FMA loop of `isa` (already clamped to
/// what the CPU supports) and returns a value that depends on every chain.
fn run(isa: Isa, iters: u64) -> f32 {
    let (x, y) = (black_box(X), black_box(Y));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was clamped to the detected ISA, so the CPU supports
        // AVX-512F and FMA.
        Isa::Avx512 => unsafe { x86::fma_loop_avx512(iters, x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was clamped to the detected ISA, so the CPU supports
        // AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::fma_loop_avx2(iters, x, y) },
        _ => fma_loop_portable(iters, x, y),
    }
}

/// Independent `f32x8` chains of the portable loop: 12 of the 16 registers
/// of SSE2/AVX2 (24 of NEON's 32 as pairs of 128-bit halves would also fit,
/// but 12 already covers the latency of every core we know).
const PORTABLE_CHAINS: usize = 12;

/// The portable loop: `wide::f32x8::mul_add`, which is one FMA where the
/// target has one (aarch64, x86-64 built with `+fma`) and a multiply and an
/// add otherwise; both count as two FLOPs per lane.
#[inline(never)]
fn fma_loop_portable(iters: u64, x: f32, y: f32) -> f32 {
    use wide::f32x8;
    let (xv, yv) = (f32x8::splat(x), f32x8::splat(y));
    let mut acc = [f32x8::ZERO; PORTABLE_CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = f32x8::splat(i as f32 * 0.01);
    }
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(xv, yv);
        }
    }
    acc.iter().fold(f32x8::ZERO, |s, &a| s + a).reduce_add()
}

/// Independent zmm chains of the AVX-512 loop (of 32 registers).
const AVX512_CHAINS: usize = 16;
/// Independent ymm chains of the AVX2 loop (of 16 registers; two hold x, y).
const AVX2_CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{AVX2_CHAINS, AVX512_CHAINS};
    use core::arch::x86_64::*;

    /// `iters` rounds of one `vfmadd` per chain on 16 zmm accumulators.
    ///
    /// # Safety
    /// The CPU supports AVX-512F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    #[inline(never)]
    pub(super) unsafe fn fma_loop_avx512(iters: u64, x: f32, y: f32) -> f32 {
        let (xv, yv) = (_mm512_set1_ps(x), _mm512_set1_ps(y));
        let mut acc = [_mm512_setzero_ps(); AVX512_CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_set1_ps(i as f32 * 0.01);
        }
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, xv, yv);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `iters` rounds of one `vfmadd` per chain on 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    pub(super) unsafe fn fma_loop_avx2(iters: u64, x: f32, y: f32) -> f32 {
        let (xv, yv) = (_mm256_set1_ps(x), _mm256_set1_ps(y));
        let mut acc = [_mm256_setzero_ps(); AVX2_CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_set1_ps(i as f32 * 0.01);
        }
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, xv, yv);
            }
        }
        let mut sum = _mm256_setzero_ps();
        for a in acc {
            sum = _mm256_add_ps(sum, a);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats; the store is unaligned.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}

/// Wall time of `threads` threads each running `iters` iterations, started
/// together.
fn time_parallel(isa: Isa, iters: u64, threads: usize) -> Duration {
    if threads <= 1 {
        let start = Instant::now();
        black_box(run(isa, black_box(iters)));
        return start.elapsed();
    }
    let barrier = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    black_box(run(isa, black_box(iters)))
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            black_box(h.join().expect("FMA peak thread panicked"));
        }
        start.elapsed()
    })
}

/// Measured peak single-precision FMA throughput of the `isa` path (clamped
/// to what this CPU supports), in GFLOP/s, counting one fused multiply-add
/// per lane as two FLOPs.
///
/// `threads` threads (0 or 1: just the calling thread) run the loop at once
/// and the total is returned, so `fma_peak_gflops(isa, n)` is the ceiling for
/// an `n`-thread GEMM. Each call takes about a third of a second: a short
/// calibration, then the best of five ~50 ms measurements, which on a busy
/// machine still undercounts when other processes hold the cores.
pub fn fma_peak_gflops(isa: Isa, threads: usize) -> f64 {
    let isa = clamp_isa(isa);
    let threads = threads.max(1);
    // Calibrate on one thread: grow until a run is long enough to time.
    let mut iters: u64 = 1 << 14;
    let per_iter = loop {
        let t = time_parallel(isa, iters, 1);
        if t >= Duration::from_millis(10) || iters >= 1 << 40 {
            break t.as_secs_f64() / iters as f64;
        }
        iters *= 4;
    };
    let iters = ((TARGET.as_secs_f64() / per_iter.max(1e-12)) as u64).max(1);
    let best = (0..ROUNDS)
        .map(|_| time_parallel(isa, iters, threads))
        .min()
        .expect("ROUNDS > 0");
    let flops = flops_per_iter(isa) as f64 * iters as f64 * threads as f64;
    flops / best.as_secs_f64().max(1e-9) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_path_measures_a_positive_rate() {
        for isa in crate::arch::supported_isas() {
            let g = fma_peak_gflops(isa, 1);
            assert!(g.is_finite() && g > 0.1, "{isa}: {g}");
        }
    }

    #[test]
    fn the_loops_compute_the_recurrence() {
        // acc_{n+1} = acc_n·X + Y stays near its start for a few steps; every
        // path must agree with the scalar recurrence.
        let iters = 10;
        let expect: f32 = (0..PORTABLE_CHAINS)
            .map(|i| {
                let mut a = i as f32 * 0.01;
                for _ in 0..iters {
                    a = a.mul_add(X, Y);
                }
                a
            })
            .sum::<f32>()
            * 8.0;
        let got = fma_loop_portable(iters, X, Y);
        assert!((got - expect).abs() < 1e-3, "{got} vs {expect}");
        for isa in crate::arch::supported_isas() {
            let v = run(isa, iters);
            assert!(v.is_finite() && v > 0.0, "{isa}: {v}");
        }
    }
}
