//! The element types the GEMM's packing and buffers handle.
//!
//! Only `f32` today; `f64`, `bf16` and `f16` come next, each with its own
//! micro-kernels (and, for the 16-bit types, conversions in packing), on the
//! same packing code and buffers.

use super::pack::{PackBuffers, F32_PACK_BUFFERS};
use std::cell::RefCell;
use std::fmt::Debug;
use std::thread::LocalKey;

/// A value the GEMM packs into panels and keeps in its buffers.
///
/// Crate-private, so sealed: implemented only for plain floating-point
/// types, whose size divides a 64-byte cache line and whose alignment is
/// their size (so a line-aligned buffer holds whole elements).
pub(crate) trait Element:
    Copy + Default + PartialEq + Debug + Send + Sync + 'static
{
    /// Zero: the padding of panels past the matrix edge.
    const ZERO: Self;

    /// This thread's packing buffers for this element type (a thread-local
    /// cannot be generic, so each type names its own).
    fn pack_buffers() -> &'static LocalKey<RefCell<PackBuffers<Self>>>;
}

impl Element for f32 {
    const ZERO: f32 = 0.0;

    fn pack_buffers() -> &'static LocalKey<RefCell<PackBuffers<f32>>> {
        &F32_PACK_BUFFERS
    }
}
