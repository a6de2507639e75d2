//! The element types the GEMM's driver, packing and buffers handle.
//!
//! Only `f32` today; `f64`, `bf16` and `f16` come next, each with its own
//! micro-kernels (and, for the 16-bit types, conversions in packing), on the
//! same loop nest, packing code and buffers.

use super::pack::{PackBuffers, F32_PACK_BUFFERS};
use std::cell::RefCell;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, Mul};
use std::thread::LocalKey;

/// A value the GEMM packs into panels, keeps in its buffers, and computes
/// with where the driver works element by element (the degenerate `k = 0`
/// and `α = 0`, the columns peeled off C's right edge, the scalar stores).
///
/// Crate-private, so sealed: implemented only for plain floating-point
/// types, whose size divides a 64-byte cache line and whose alignment is
/// their size (so a line-aligned buffer holds whole elements).
pub(crate) trait Element:
    Copy
    + Default
    + PartialEq
    + PartialOrd
    + Debug
    + Send
    + Sync
    + Add<Output = Self>
    + Mul<Output = Self>
    + Sum
    + 'static
{
    /// Zero: the padding of panels past the matrix edge.
    const ZERO: Self;

    /// One: β for every K block after the first, which accumulates onto C.
    const ONE: Self;

    /// This thread's packing buffers for this element type (a thread-local
    /// cannot be generic, so each type names its own).
    fn pack_buffers() -> &'static LocalKey<RefCell<PackBuffers<Self>>>;

    /// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`: the
    /// packing of a column-major B, in the type's SIMD tiles.
    fn transpose(src: &[Self], lds: usize, rows: usize, cols: usize, dst: &mut [Self], ldd: usize);
}

impl Element for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;

    fn pack_buffers() -> &'static LocalKey<RefCell<PackBuffers<f32>>> {
        &F32_PACK_BUFFERS
    }

    fn transpose(src: &[f32], lds: usize, rows: usize, cols: usize, dst: &mut [f32], ldd: usize) {
        super::transpose::transpose(src, lds, rows, cols, dst, ldd);
    }
}
