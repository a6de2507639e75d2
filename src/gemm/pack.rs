//! Packing of A into MR-row panels and of B into NR-column panels, and the
//! aligned, reused buffers they go into.
//!
//! Panel layouts (both zero-filled past the matrix edge, so a micro-kernel
//! always computes a full tile):
//! * A panel: `kc` steps of `mr` values, element `(i, p)` at `p·mr + i`.
//! * B panel: `kc` steps of `nr` values, element `(p, j)` at `p·nr + j`.

use std::cell::RefCell;

/// 64 bytes: one cache line, one zmm register.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A growable `f32` buffer whose start is 64-byte aligned.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    lines: Vec<Line>,
}

impl AlignedBuf {
    /// The first `len` floats, growing (never shrinking) the allocation.
    pub(crate) fn get(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0.0; 16]));
        }
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding, so the
        // first `lines·16 ≥ len` floats of the vector are initialised f32s,
        // and the borrow of `self` keeps them alive and unaliased.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), len) }
    }
}

thread_local! {
    /// One A and one B packing buffer per thread, reused by every GEMM the
    /// thread runs.
    static PACK_BUFFERS: RefCell<(AlignedBuf, AlignedBuf)> = RefCell::default();
}

/// Runs `f` with this thread's packing buffers. The GEMM never re-enters
/// rayon while it holds them, but if it is ever re-entered on one thread
/// (a caller's callback, say) the inner call gets fresh buffers instead of
/// panicking.
pub(crate) fn with_pack_buffers<R>(f: impl FnOnce(&mut AlignedBuf, &mut AlignedBuf) -> R) -> R {
    PACK_BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (a, b) = &mut *bufs;
            f(a, b)
        }
        Err(_) => f(&mut AlignedBuf::default(), &mut AlignedBuf::default()),
    })
}

/// Where the GEMM's B comes from. A plain strided matrix is one source; the
/// implicit convolution reads the input image through an im2col view.
pub(crate) trait BSource: Sync {
    /// Packs rows `k0..k0+kc` and columns `j0..j0+nc` of B into
    /// `nc.div_ceil(nr)` panels of `kc × nr`, panel `q` at `dst[q·kc·nr..]`,
    /// zero-filling the columns past `nc` in the last panel.
    ///
    /// # Safety
    /// The block lies inside B, and `dst` holds `nc.div_ceil(nr)·kc·nr` floats.
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
    );

    /// The source as a strided matrix, if it is one (for backends that need it).
    fn as_strided(&self) -> Option<StridedB> {
        None
    }
}

/// B as a pointer with element strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StridedB {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a StridedB is a read-only view; the GEMM's contract guarantees the
// memory stays valid and unmodified for the whole call, on every thread.
unsafe impl Sync for StridedB {}
// SAFETY: as above.
unsafe impl Send for StridedB {}

impl BSource for StridedB {
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
    ) {
        for (q, panel) in dst
            .chunks_exact_mut(kc * nr)
            .take(nc.div_ceil(nr))
            .enumerate()
        {
            let col0 = j0 + q * nr;
            let width = nr.min(nc - q * nr);
            // SAFETY: (k0.., col0..col0+width) lies inside B (contract).
            unsafe { pack_b_panel(self, k0, kc, col0, width, nr, panel) };
        }
    }

    fn as_strided(&self) -> Option<StridedB> {
        Some(*self)
    }
}

/// Packs one `kc × width` panel of a strided B, zero-padding to `nr` columns.
///
/// # Safety
/// Rows `k0..k0+kc` and columns `col0..col0+width` lie inside B.
unsafe fn pack_b_panel(
    b: &StridedB,
    k0: usize,
    kc: usize,
    col0: usize,
    width: usize,
    nr: usize,
    panel: &mut [f32],
) {
    // SAFETY: element (k0, col0) is inside B.
    let origin = unsafe { b.ptr.offset(k0 as isize * b.rs + col0 as isize * b.cs) };
    if b.cs == 1 {
        // Row-major B: each panel row is a contiguous run of the source row.
        for (p, row) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
            // SAFETY: the run (k0+p, col0..col0+width) is inside B.
            let src =
                unsafe { std::slice::from_raw_parts(origin.offset(p as isize * b.rs), width) };
            row[..width].copy_from_slice(src);
            row[width..].fill(0.0);
        }
    } else {
        for (p, row) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j < width {
                    // SAFETY: (k0+p, col0+j) is inside B.
                    unsafe { *origin.offset(p as isize * b.rs + j as isize * b.cs) }
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs rows `0..mc` and columns `0..kc` of a strided A (pointer at the
/// block's first element) into `mc.div_ceil(mr)` panels of `kc × mr`.
///
/// # Safety
/// The `mc × kc` block at `a` with strides `rs`, `cs` is readable, and `dst`
/// holds `mc.div_ceil(mr)·kc·mr` floats.
pub(crate) unsafe fn pack_a_strided(
    a: *const f32,
    rs: isize,
    cs: isize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    for (q, panel) in dst
        .chunks_exact_mut(kc * mr)
        .take(mc.div_ceil(mr))
        .enumerate()
    {
        let height = mr.min(mc - q * mr);
        for i in 0..mr {
            if i >= height {
                for p in 0..kc {
                    panel[p * mr + i] = 0.0;
                }
                continue;
            }
            // SAFETY: row q·mr+i < mc of the block.
            let row = unsafe { a.offset((q * mr + i) as isize * rs) };
            if cs == 1 {
                // SAFETY: the row's kc elements are contiguous and readable.
                let src = unsafe { std::slice::from_raw_parts(row, kc) };
                for (p, &x) in src.iter().enumerate() {
                    panel[p * mr + i] = x;
                }
            } else {
                for p in 0..kc {
                    // SAFETY: (q·mr+i, p) is inside the block.
                    panel[p * mr + i] = unsafe { *row.offset(p as isize * cs) };
                }
            }
        }
    }
}
