//! Portable micro-kernel written with `wide::f32x8`: what every target that is
//! not x86-64 with AVX2 builds (NEON on aarch64, SSE2 on baseline x86-64).
//!
//! `wide` picks its instructions when the crate is compiled, so this kernel is
//! sized for the register file of the target it is compiled for:
//! aarch64 has 32 128-bit registers, enough for a `6 × 16` tile (24 registers
//! of accumulators); SSE2 has 16, which fit a `6 × 8` tile (12).

use super::{store_tile_scalar, TileEpilogue};
use wide::f32x8;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "aarch64")] {
        /// `f32x8` vectors per B row.
        const NV: usize = 2;
    } else {
        /// `f32x8` vectors per B row.
        const NV: usize = 1;
    }
}

/// Columns of a B panel.
pub(crate) const NR: usize = 8 * NV;
/// Rows of an A panel.
pub(crate) const MR: usize = 6;

/// The dispatched micro-kernel; see [`super::MicroKernelFn`].
///
/// # Safety
/// As [`super::MicroKernelFn`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel(
    kc: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    ep: &TileEpilogue,
) {
    let mut acc = [[f32x8::ZERO; NV]; MR];
    let a_rows: [*const f32; MR] = core::array::from_fn(|i| a.wrapping_add(i * ars));
    let (mut ak, mut bp) = (0, b);
    for _ in 0..kc {
        // SAFETY: the panels hold kc steps of MR (A) and NR (B) floats; B
        // may be only f32-aligned, so its vectors are read unaligned.
        unsafe {
            let mut bv = [f32x8::ZERO; NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = (bp.add(8 * v) as *const f32x8).read_unaligned();
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = f32x8::splat(*a_rows[i].add(ak));
                for (v, slot) in row.iter_mut().enumerate() {
                    *slot = ai.mul_add(bv[v], *slot);
                }
            }
            ak += acs;
            bp = bp.add(ldb);
        }
    }
    let mut tile = [0.0f32; MR * NR];
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            tile[i * NR + 8 * v..i * NR + 8 * v + 8].copy_from_slice(&x.to_array());
        }
    }
    // SAFETY: forwarded contract.
    unsafe { store_tile_scalar(&tile, NR, c, rsc, csc, rows, cols, ep) };
}
