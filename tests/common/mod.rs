//! Helpers shared by the integration tests (each test crate uses a subset).
#![allow(dead_code)]

use cpuconv::testing::isas_under_test;
use cpuconv::{GemmBackend, Isa, Parallelism};

/// Number of proptest cases: `PROPTEST_CASES` when it parses, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// SplitMix64: a tiny deterministic generator, so proptest shrinks the shape
/// and the seed rather than thousands of individual floats.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        // 24 random bits -> [0, 1) exactly representable, then to [-1, 1).
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    pub fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }
}

/// Every (ISA, backend, parallelism) combination the fast paths must agree on.
pub fn engine_combos() -> Vec<(Isa, GemmBackend, Parallelism)> {
    let mut v = Vec::new();
    for isa in isas_under_test() {
        for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                v.push((isa, backend, par));
            }
        }
    }
    v
}
