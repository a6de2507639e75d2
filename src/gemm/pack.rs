//! Packing of A into MR-row panels and of B into NR-column panels, and the
//! aligned, reused buffers they go into.
//!
//! Panel layouts (both zero-filled past the matrix edge, so a micro-kernel
//! always computes a full tile):
//! * A panel: `kc` steps of `mr` values, element `(i, p)` at `p·mr + i`.
//! * B panel: `kc` steps of `nr` values, element `(p, j)` at `p·nr + j`.

use super::element::Element;
use super::engine::{BSource, StridedMatrix};
use super::kernels::prefetch_read;
use std::cell::RefCell;

/// Bytes every packed buffer's start is aligned to: one cache line, one zmm
/// register.
const ALIGN: usize = 64;

/// A growable buffer of `T` whose usable part starts 64-byte aligned: a
/// vector with up to a line of slack in front, skipped.
#[derive(Default)]
pub(crate) struct AlignedBuf<T> {
    data: Vec<T>,
}

impl<T: Element> AlignedBuf<T> {
    /// Elements per cache line.
    const PER_LINE: usize = {
        let size = std::mem::size_of::<T>();
        assert!(ALIGN.is_multiple_of(size) && std::mem::align_of::<T>() == size);
        ALIGN / size
    };

    /// Elements of slack kept so that an aligned start always fits.
    const SLACK: usize = Self::PER_LINE - 1;

    /// Elements of the first one on a line boundary.
    fn start(&self) -> usize {
        let addr = self.data.as_ptr() as usize;
        (addr.next_multiple_of(ALIGN) - addr) / std::mem::size_of::<T>()
    }

    /// Elements allocated to serve `len` from an aligned start: whole
    /// cache lines plus the slack, and nothing at all for `len = 0`.
    pub(crate) fn allocation_for(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            len.next_multiple_of(Self::PER_LINE)
                .saturating_add(Self::SLACK)
        }
    }

    /// Elements usable from the aligned start.
    pub(crate) fn capacity(&self) -> usize {
        self.data.len().saturating_sub(Self::SLACK)
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<T>()
    }

    /// The first `len` elements from the aligned start, growing (never
    /// shrinking) the allocation. The slice's last cache line is allocated
    /// whole, so a vector access that ends on it never leaves the buffer.
    pub(crate) fn get(&mut self, len: usize) -> &mut [T] {
        if len == 0 {
            return &mut [];
        }
        let need = Self::allocation_for(len);
        if self.data.len() < need {
            // Exact growth: the buffer's size is the blocking's bound, not
            // twice it.
            self.data.reserve_exact(need - self.data.len());
            self.data.resize(need, T::ZERO);
        }
        let start = self.start();
        &mut self.data[start..start + len]
    }
}

/// The scratch one GEMM task packs into: A panels, B panels (both 64-byte
/// aligned), and staging rows for B sources that build rows before dealing
/// them to panels. Sized by the blocking, never by the problem.
#[derive(Default)]
pub(crate) struct PackBuffers<T> {
    pub(in crate::gemm) a: AlignedBuf<T>,
    pub(in crate::gemm) b: AlignedBuf<T>,
    pub(in crate::gemm) staging: Vec<T>,
}

impl<T: Element> PackBuffers<T> {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.a.bytes() + self.b.bytes() + self.staging.capacity() * std::mem::size_of::<T>()
    }
}

thread_local! {
    /// One set of `f32` packing buffers per thread, reused by every GEMM the
    /// thread runs.
    pub(crate) static F32_PACK_BUFFERS: RefCell<PackBuffers<f32>> = RefCell::default();
}

/// Runs `f` with this thread's packing buffers. The GEMM never re-enters
/// rayon while it holds them, but if it is ever re-entered on one thread
/// (a caller's callback, say) the inner call gets fresh buffers instead of
/// panicking.
pub(crate) fn with_pack_buffers<T: Element, R>(f: impl FnOnce(&mut PackBuffers<T>) -> R) -> R {
    T::pack_buffers().with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => f(&mut bufs),
        Err(_) => f(&mut PackBuffers::default()),
    })
}

impl<T: Element> BSource<T> for StridedMatrix<T> {
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [T],
        _staging: &mut Vec<T>,
    ) {
        let panels = nc.div_ceil(nr);
        let packed = match (self.cs, nr) {
            // SAFETY: rows k0..k0+kc and columns j0..j0+(nc/nr)·nr are inside
            // B (contract), and dst holds `panels·kc·nr` elements.
            (1, 32) => unsafe { pack_full_panels_by_rows::<T, 32>(self, k0, kc, j0, nc / nr, dst) },
            // SAFETY: as for 32.
            (1, 16) => unsafe { pack_full_panels_by_rows::<T, 16>(self, k0, kc, j0, nc / nr, dst) },
            _ => 0,
        };
        for (q, panel) in dst
            .chunks_exact_mut(kc * nr)
            .take(panels)
            .enumerate()
            .skip(packed)
        {
            let col0 = j0 + q * nr;
            let width = nr.min(nc - q * nr);
            // SAFETY: (k0.., col0..col0+width) lies inside B (contract).
            unsafe { pack_b_panel(self, k0, kc, col0, width, nr, panel) };
        }
    }

    fn as_strided(&self) -> Option<StridedMatrix<T>> {
        Some(*self)
    }
}

/// Panels packed side by side by [`pack_full_panels_by_rows`].
const PANELS_PER_PASS: usize = 8;

/// How far ahead [`pack_full_panels_by_rows`] prefetches B's rows. Rows
/// 4 KiB or more apart each start a new page, where the hardware
/// prefetchers stop, so without a hint every row waits on memory. Measured
/// in one process, alternating (1 thread AVX-512, share of the GEMM's time
/// spent packing B): 1024³ 4.4% → 3.2%, 1024×512×1024 4.9% → 3.3%, 2048³
/// 2.4% → 1.7%; 4, 16 or 32 rows ahead do the same within noise.
const PREFETCH_ROWS_AHEAD: isize = 8;

/// Packs `panels` full `W`-column panels of a row-major B, starting at
/// column `j0`, into `dst` (panel `q` at `dst[q·kc·W..]`), a few panels at
/// a time, row by row, and returns `panels`. Each source row is then read
/// in runs of 8 panels (1 KiB for W = 32) rather than the panel-at-a-time
/// copy's runs of one panel, each on another page when B's rows are 4 KiB
/// apart. Measured alone on a 1024-wide B (two 512 × 1024 blocks,
/// L3-resident, W = 32): 129 µs panel by panel, 91 µs by rows of 8 panels,
/// 80 µs for a plain copy of the same bytes. Inside the GEMM, where B comes
/// from further away, the order alone gained nothing; the row prefetch
/// ([`PREFETCH_ROWS_AHEAD`]) is what cut the packing time, and the order
/// keeps it to one hint per line of a 1 KiB run.
///
/// # Safety
/// `b.cs == 1`; rows `k0..k0+kc` and columns `j0..j0+W·panels` lie inside
/// B, and `dst` holds `panels·kc·W` elements.
unsafe fn pack_full_panels_by_rows<T: Element, const W: usize>(
    b: &StridedMatrix<T>,
    k0: usize,
    kc: usize,
    j0: usize,
    panels: usize,
    dst: &mut [T],
) -> usize {
    for q0 in (0..panels).step_by(PANELS_PER_PASS) {
        let q1 = panels.min(q0 + PANELS_PER_PASS);
        for p in 0..kc {
            // SAFETY: element (k0 + p, j0) is inside B.
            let row = unsafe { b.ptr.offset((k0 + p) as isize * b.rs + j0 as isize) };
            let ahead = row.wrapping_offset(PREFETCH_ROWS_AHEAD * b.rs);
            for line in (q0 * W..q1 * W).step_by(ALIGN / std::mem::size_of::<T>()) {
                prefetch_read(ahead.wrapping_add(line));
            }
            for q in q0..q1 {
                // SAFETY: columns j0 + W·q .. j0 + W·(q + 1) of the row are inside B.
                let run = unsafe { &*(row.add(q * W) as *const [T; W]) };
                dst[(q * kc + p) * W..][..W].copy_from_slice(run);
            }
        }
    }
    panels
}

/// Packs one `kc × width` panel of a strided B, zero-padding to `nr` columns.
///
/// # Safety
/// Rows `k0..k0+kc` and columns `col0..col0+width` lie inside B.
unsafe fn pack_b_panel<T: Element>(
    b: &StridedMatrix<T>,
    k0: usize,
    kc: usize,
    col0: usize,
    width: usize,
    nr: usize,
    panel: &mut [T],
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
            row[width..].fill(T::ZERO);
        }
    } else if b.rs == 1 && b.cs > 0 && width > 0 {
        // Column-major B (the transposed weights of `X·Wᵀ`): the panel is
        // the transpose of `width` source columns, each `kc` contiguous
        // floats, done in SIMD tiles. Gathered a float at a time, packing
        // made 256×1024×1024 with a column-major B run at 159 GFLOP/s
        // against 220 row-major (1 thread AVX-512, Zen 5).
        let cs = b.cs as usize;
        // SAFETY: from (k0, col0) to (k0+kc−1, col0+width−1), column-major:
        // every element between lies in B's storage, readable from the first
        // to the last (the contract), and nothing writes it during the GEMM
        // (C never shares storage with B: `sgemm`'s borrows forbid it, and
        // the crate's own callers pass separate buffers).
        let src = unsafe { std::slice::from_raw_parts(origin, (width - 1) * cs + kc) };
        T::transpose(src, cs, width, kc, panel, nr);
        if width < nr {
            for row in panel.chunks_exact_mut(nr).take(kc) {
                row[width..].fill(T::ZERO);
            }
        }
    } else {
        for (p, row) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j < width {
                    // SAFETY: (k0+p, col0+j) is inside B.
                    unsafe { *origin.offset(p as isize * b.rs + j as isize * b.cs) }
                } else {
                    T::ZERO
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
/// holds `mc.div_ceil(mr)·kc·mr` elements.
pub(crate) unsafe fn pack_a_strided<T: Element>(
    a: *const T,
    rs: isize,
    cs: isize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [T],
) {
    if rs == 1 {
        // SAFETY: forwarded contract.
        unsafe {
            match mr {
                8 => pack_a_column_major::<T, 8>(a, cs, mc, kc, dst),
                16 => pack_a_column_major::<T, 16>(a, cs, mc, kc, dst),
                32 => pack_a_column_major::<T, 32>(a, cs, mc, kc, dst),
                6 => pack_a_column_major::<T, 6>(a, cs, mc, kc, dst),
                _ => pack_a_column_major_any(a, cs, mc, kc, mr, dst),
            }
        }
        return;
    }
    for (q, panel) in dst
        .chunks_exact_mut(kc * mr)
        .take(mc.div_ceil(mr))
        .enumerate()
    {
        let height = mr.min(mc - q * mr);
        // SAFETY: row q·mr is inside the block.
        let first_row = unsafe { a.offset((q * mr) as isize * rs) };
        match (mr, height) {
            // SAFETY: rows q·mr..q·mr+height and columns 0..kc are inside
            // the block; the panel holds kc·mr elements.
            (8, 8) => unsafe { pack_a_panel_full::<T, 8>(first_row, rs, cs, kc, panel) },
            // SAFETY: as for 8.
            (6, 6) => unsafe { pack_a_panel_full::<T, 6>(first_row, rs, cs, kc, panel) },
            // SAFETY: as for 8.
            (32, 32) => unsafe { pack_a_panel_full::<T, 32>(first_row, rs, cs, kc, panel) },
            // SAFETY: as for 8.
            _ => unsafe { pack_a_panel_edge(first_row, rs, cs, kc, mr, height, panel) },
        }
    }
}

/// A column-major block (`rs = 1`) into `mc.div_ceil(MR)` panels of
/// `kc × MR`, one k-step of every panel at a time: each column of the block
/// is read once, front to back (`mc` contiguous values), and its `MR`-value
/// runs are copied whole into as many panels. Panel by panel, every column
/// is touched once per panel and the copy of `MR` values of a length known
/// only at run time was a call to `memcpy`. Measured with every column-major
/// A packed (a throwaway switch, since removed), 1 thread AVX-512, Intel
/// Xeon (family 6 model 167), one process alternating, median of 15 rounds,
/// GFLOP/s, panel by panel → this: `sgemm` with A column-major 3136×576×64
/// 95 → 102, 2048×512×49 88 → 96, 1024×2048×96 124 → 130, 784×1152×128
/// 140 → 156 (256×2304×196 145 → 139); with C column-major (so that A is
/// Bᵀ) 64×576×3136 102 → 105, 49×512×2048 92 → 100, 96×2048×1024 128 →
/// 138, 128×1152×784 150 → 161.
///
/// # Safety
/// As [`pack_a_strided`] with `rs = 1`.
#[inline(always)]
unsafe fn pack_a_column_major<T: Element, const MR: usize>(
    a: *const T,
    cs: isize,
    mc: usize,
    kc: usize,
    dst: &mut [T],
) {
    let full = mc / MR;
    let height = mc % MR;
    let panel_len = kc * MR;
    assert!(
        dst.len() >= mc.div_ceil(MR) * panel_len,
        "A pack buffer too short"
    );
    let out = dst.as_mut_ptr();
    for p in 0..kc {
        // SAFETY: column p's rows 0..mc are inside the block (contract),
        // one after another.
        let column = unsafe { a.offset(p as isize * cs) };
        for q in 0..full {
            // SAFETY: rows q·MR..(q+1)·MR of column p are inside the block;
            // step p of panel q lies within `dst` (checked above), and the
            // block is not `dst` (a caller's A, not a pack buffer).
            unsafe {
                out.add(q * panel_len + p * MR)
                    .cast::<[T; MR]>()
                    .write_unaligned(column.add(q * MR).cast::<[T; MR]>().read_unaligned())
            };
        }
        if height > 0 {
            // SAFETY: the last panel's step p lies within `dst` (checked above).
            let step =
                unsafe { std::slice::from_raw_parts_mut(out.add(full * panel_len + p * MR), MR) };
            // SAFETY: rows full·MR..mc of column p are inside the block.
            let rest = unsafe { std::slice::from_raw_parts(column.add(full * MR), height) };
            step[..height].copy_from_slice(rest);
            step[height..].fill(T::ZERO);
        }
    }
}

/// [`pack_a_column_major`] for a panel height not compiled as a constant.
///
/// # Safety
/// As [`pack_a_strided`] with `rs = 1`.
unsafe fn pack_a_column_major_any<T: Element>(
    a: *const T,
    cs: isize,
    mc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [T],
) {
    for (q, panel) in dst
        .chunks_exact_mut(kc * mr)
        .take(mc.div_ceil(mr))
        .enumerate()
    {
        let height = mr.min(mc - q * mr);
        for (p, step) in panel.chunks_exact_mut(mr).take(kc).enumerate() {
            // SAFETY: rows q·mr..q·mr+height of column p are inside the
            // block, one after another (contract).
            let column = unsafe {
                std::slice::from_raw_parts(a.offset(p as isize * cs + (q * mr) as isize), height)
            };
            step[..height].copy_from_slice(column);
            step[height..].fill(T::ZERO);
        }
    }
}

/// One full A panel with the row count known at compile time, packed in
/// groups of at most 8 rows: each k-step of a group becomes up to 8 loads
/// from as many sequential row streams and one store of that many floats.
/// A 32-row panel packed in one pass would keep 32 streams and 32 live
/// pointers at once, and runs 3× slower.
///
/// # Safety
/// Rows `0..R` and columns `0..kc` from `a` are readable; `panel` holds `kc·R`.
#[inline(always)]
unsafe fn pack_a_panel_full<T: Element, const R: usize>(
    a: *const T,
    rs: isize,
    cs: isize,
    kc: usize,
    panel: &mut [T],
) {
    const G: usize = 8;
    for g0 in (0..R).step_by(G) {
        let rows: [*const T; G] =
            std::array::from_fn(|i| a.wrapping_offset((g0 + i).min(R - 1) as isize * rs));
        let width = G.min(R - g0);
        for (p, step) in panel.chunks_exact_mut(R).take(kc).enumerate() {
            let off = p as isize * cs;
            for (x, row) in step[g0..g0 + width].iter_mut().zip(rows) {
                // SAFETY: (g0 + i, p) is inside the block.
                *x = unsafe { *row.offset(off) };
            }
        }
    }
}

/// A panel at the bottom edge: `height < mr` real rows, the rest zero.
///
/// # Safety
/// Rows `0..height` and columns `0..kc` from `a` are readable; `panel` holds `kc·mr`.
unsafe fn pack_a_panel_edge<T: Element>(
    a: *const T,
    rs: isize,
    cs: isize,
    kc: usize,
    mr: usize,
    height: usize,
    panel: &mut [T],
) {
    for (p, group) in panel.chunks_exact_mut(mr).take(kc).enumerate() {
        for (i, x) in group.iter_mut().enumerate() {
            *x = if i < height {
                // SAFETY: (i, p) is inside the block.
                unsafe { *a.offset(i as isize * rs + p as isize * cs) }
            } else {
                T::ZERO
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_line_and_do_not_move_once_grown() {
        let mut buf = AlignedBuf::<f32>::default();
        // Nothing requested allocates nothing (a direct plan's workspace).
        assert!(buf.get(0).is_empty());
        assert_eq!(buf.bytes(), 0);
        for len in [1, 15, 16, 17, 1000, 5, 0] {
            let slice = buf.get(len);
            assert_eq!(slice.len(), len);
            if len > 0 {
                assert_eq!(slice.as_ptr() as usize % ALIGN, 0, "len {len}");
            }
        }
        assert!(buf.capacity() >= 1000);
        // A workspace sized up front serves every smaller request in place.
        let grown = buf.get(1000).as_ptr();
        assert_eq!(buf.get(10).as_ptr(), grown);
        assert_eq!(buf.get(1000).as_ptr(), grown);
    }

    /// A column-major block (columns `cs` apart, the gap holding values
    /// that must not be read into the panels) packs into the panels of
    /// the definition: panel `q`, step `p`, lane `i` is `A[q·mr + i][p]`,
    /// or zero below the block. Every panel height the kernels use (and
    /// one no kernel uses, the generic loop), blocks of whole panels and
    /// with a short last one.
    #[test]
    fn column_major_blocks_pack_into_the_panels_of_the_definition() {
        for mr in [5usize, 6, 8, 16, 32] {
            for mc in [1, mr - 1, mr, mr + 1, 3 * mr + 2] {
                for kc in [1, 3, 17] {
                    let cs = mc + 3;
                    let a: Vec<f32> = (0..cs * kc)
                        .map(|x| if x % cs < mc { x as f32 } else { f32::NAN })
                        .collect();
                    let panels = mc.div_ceil(mr);
                    let mut dst = vec![f32::NAN; panels * kc * mr];
                    // SAFETY: the mc × kc block at columns cs apart lies in
                    // `a`, and `dst` holds the panels.
                    unsafe { pack_a_strided(a.as_ptr(), 1, cs as isize, mc, kc, mr, &mut dst) };
                    for q in 0..panels {
                        for p in 0..kc {
                            for i in 0..mr {
                                let row = q * mr + i;
                                let want = if row < mc { (p * cs + row) as f32 } else { 0.0 };
                                let got = dst[(q * kc + p) * mr + i];
                                assert_eq!(got, want, "mr {mr} mc {mc} kc {kc} q {q} p {p} i {i}");
                            }
                        }
                    }
                }
            }
        }
    }
}
