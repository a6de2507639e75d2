//! The two innermost loops (over the NR and MR panels of one packed block),
//! where the A and B panels of a block come from, and the columns peeled
//! off C's right edge as dot products.

use crate::gemm::element::Element;
use crate::gemm::engine::{ASource, Epilogue, StridedC, StridedMatrix};
use crate::gemm::kernels::{
    columns_past_edges, store_scalar, DotKernels, Kernel, KernelInfo, TileEpilogue,
};
use crate::gemm::pack::{pack_a_strided, AlignedBuf};

/// The last `count` columns of C, from `col0` on, computed as dot products:
/// right after the tile that ends at `col0` for a micro-panel of A, while
/// those `mr` rows of A are still in L1. The columns of B are staged
/// contiguous, column `q` at `columns + q·k`.
#[derive(Clone, Copy, Debug)]
pub(super) struct PeeledColumns<T> {
    pub(super) columns: *const T,
    pub(super) k: usize,
    pub(super) col0: usize,
    pub(super) count: usize,
    pub(super) dot: DotKernels<T>,
}

// SAFETY: the staged columns are written once, before any task starts, and
// only read from then on; the driver keeps them alive until every task has
// finished.
unsafe impl<T: Sync> Send for PeeledColumns<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for PeeledColumns<T> {}

/// How many of C's last columns the driver computes as dot products rather
/// than in tiles: the one or two columns just past a multiple of the narrow
/// kernel's width, which a tile would pad to a whole vector per row (49 =
/// 3·16 + 1 columns: four vectors per row in tiles, three plus one dot
/// product peeled off).
pub(super) fn peeled_columns<T>(kernel: &Kernel<T>, n: usize) -> usize {
    match (kernel.narrow(), kernel.dot()) {
        (Some((width, _)), Some(_)) => columns_past_edges(n, width),
        _ => 0,
    }
}

/// The A panels of rows `ic..ic+mcur` at depth `pc..pc+kcur`: read in place
/// (`in_place`, a row-major A), packed into `abuf` from a strided A, or
/// found in a pre-packed one.
///
/// # Safety
/// The block is inside A; `ic` is a multiple of MR; `in_place` only for a
/// strided A with unit column stride.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn a_block<T: Element>(
    a: &ASource<'_, T>,
    ic: usize,
    mcur: usize,
    pc: usize,
    kcur: usize,
    kernel: &Kernel<T>,
    in_place: bool,
    abuf: &mut AlignedBuf<T>,
) -> APanels<T> {
    let mr = kernel.info().mr;
    match *a {
        ASource::Strided(StridedMatrix { ptr, rs, cs }) if in_place => {
            // SAFETY: (ic, pc) is inside A.
            let origin = unsafe { ptr.offset(ic as isize * rs + pc as isize * cs) };
            let full = mcur / mr;
            let packed_tail = (full * mr < mcur).then(|| {
                let tail = abuf.get(kcur * mr);
                // SAFETY: the last panel's rows, at this depth, are inside A.
                unsafe {
                    let first_row = origin.offset((full * mr) as isize * rs);
                    pack_a_strided(first_row, rs, cs, mcur - full * mr, kcur, mr, tail);
                }
                tail.as_ptr()
            });
            APanels {
                first: origin,
                panel_stride: mr * rs as usize,
                rs: rs as usize,
                cs: cs as usize,
                packed_tail,
            }
        }
        ASource::Strided(StridedMatrix { ptr, rs, cs }) => {
            let apack = abuf.get(mcur.div_ceil(mr) * kcur * mr);
            // SAFETY: (ic, pc) and the mcur × kcur block are inside A.
            unsafe {
                let origin = ptr.offset(ic as isize * rs + pc as isize * cs);
                pack_a_strided(origin, rs, cs, mcur, kcur, mr, apack);
            }
            APanels::packed(apack.as_ptr(), kcur * mr, mr)
        }
        ASource::Packed(packed) => {
            let depth = packed.depth();
            APanels::packed(
                // SAFETY: ic is a multiple of mr; the panels cover every row
                // of A at full depth.
                unsafe { packed.as_ptr().add((ic / mr) * depth * mr + pc * mr) },
                depth * mr,
                mr,
            )
        }
    }
}

/// Where the micro-kernels find the A panels of one block.
#[derive(Clone, Copy)]
pub(super) struct APanels<T> {
    /// Panel `q` starts at `first + q·panel_stride`.
    first: *const T,
    panel_stride: usize,
    /// Value `(i, p)` of a panel is at `panel + i·rs + p·cs`.
    rs: usize,
    cs: usize,
    /// A packed copy (`rs = 1`, `cs = mr`, rows past the matrix zero) of
    /// the last panel, used instead of the in-place one when A is read in
    /// place and the block ends mid-panel.
    packed_tail: Option<*const T>,
}

impl<T> APanels<T> {
    /// Packed panels, `panel_stride` elements apart.
    fn packed(first: *const T, panel_stride: usize, mr: usize) -> APanels<T> {
        APanels {
            first,
            panel_stride,
            rs: 1,
            cs: mr,
            packed_tail: None,
        }
    }

    /// The start and strides of panel `ir` of `npanels`.
    fn panel(&self, ir: usize, npanels: usize, mr: usize) -> (*const T, usize, usize) {
        match self.packed_tail {
            Some(tail) if ir + 1 == npanels => (tail, 1, mr),
            _ => (
                self.first.wrapping_add(ir * self.panel_stride),
                self.rs,
                self.cs,
            ),
        }
    }
}

/// Where the micro-kernels find the B panels of one block.
#[derive(Clone, Copy)]
pub(super) struct BPanels<T> {
    /// Panel `q` starts at `first + q·panel_stride`.
    pub(super) first: *const T,
    pub(super) panel_stride: usize,
    /// Floats from one k-step of a panel to the next.
    pub(super) ldb: usize,
    /// A packed copy (`ldb = nr`) of the last panel, used instead of the
    /// in-place one when B is read in place and the block ends mid-panel.
    pub(super) packed_tail: Option<*const T>,
}

impl<T> BPanels<T> {
    /// Panels packed contiguously, `kc·nr` elements each.
    pub(super) fn packed(bpack: &[T], kc: usize, nr: usize) -> BPanels<T> {
        BPanels {
            first: bpack.as_ptr(),
            panel_stride: kc * nr,
            ldb: nr,
            packed_tail: None,
        }
    }

    /// The start and k-step of panel `jr` of `npanels`.
    fn panel(&self, jr: usize, npanels: usize, nr: usize) -> (*const T, usize) {
        match self.packed_tail {
            Some(tail) if jr + 1 == npanels => (tail, nr),
            _ => (self.first.wrapping_add(jr * self.panel_stride), self.ldb),
        }
    }
}

/// What the innermost two loops need besides the packed panels.
pub(super) struct MacroKernel<'a, T> {
    pub(super) alpha: T,
    pub(super) beta: T,
    pub(super) c: StridedC<T>,
    pub(super) ep: &'a Epilogue<T>,
    /// Columns of C past the tiles' last column, finished as dot products
    /// next to the tiles (see [`peeled_columns`]).
    pub(super) peel: Option<PeeledColumns<T>>,
    pub(super) kernel: &'a Kernel<T>,
    pub(super) k: usize,
    pub(super) m1: usize,
    /// The MR loop outside the NR loop: each A micro-panel stays in L1
    /// while the block's B panels stream past it (the tall-A order of
    /// [`crate::gemm::cache_model`]); else each B micro-panel is reused by
    /// every A micro-panel of the block.
    pub(super) a_panel_outer: bool,
}

impl<T: Element> MacroKernel<'_, T> {
    /// The NR and MR loops over one packed A block (rows `ic..ic+mcur`) and
    /// one packed B block (columns `jc..jc+ncur`) at depth `pc..pc+kcur`.
    ///
    /// # Safety
    /// The panels hold the blocks described; the tiles are inside this
    /// task's block of C.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        &self,
        apanels: APanels<T>,
        ic: usize,
        mcur: usize,
        bpanels: BPanels<T>,
        jc: usize,
        ncur: usize,
        pc: usize,
        kcur: usize,
    ) {
        let KernelInfo { mr, nr, .. } = *self.kernel.info();
        let (first, last) = (pc == 0, pc + kcur == self.k);
        let ep = self.ep;
        let npanels = ncur.div_ceil(nr);
        let row_panels = mcur.div_ceil(mr);
        let (outer, inner) = if self.a_panel_outer {
            (row_panels, npanels)
        } else {
            (npanels, row_panels)
        };
        for (o, i) in (0..outer).flat_map(|o| (0..inner).map(move |i| (o, i))) {
            let (jr, ir) = if self.a_panel_outer { (i, o) } else { (o, i) };
            let (bp, ldb) = bpanels.panel(jr, npanels, nr);
            let col = jc + jr * nr;
            // A block may end mid-panel before C does (the alignment peel).
            let cols = nr.min(jc + ncur - col);
            let (ap, ars, acs) = apanels.panel(ir, row_panels, mr);
            let row = ic + ir * mr;
            let tile = TileEpilogue {
                alpha: self.alpha,
                beta: if first { self.beta } else { T::ONE },
                bias: if first && !ep.bias.is_null() {
                    // SAFETY: row < m and bias holds m values.
                    unsafe { ep.bias.add(row) }
                } else {
                    std::ptr::null()
                },
                clamp: if last { ep.clamp } else { None },
            };
            // SAFETY: row < m and col < n by the loops' bounds.
            let cp = unsafe {
                self.c
                    .ptr
                    .offset(row as isize * self.c.rs + col as isize * self.c.cs)
            };
            let rows = mr.min(self.m1 - row);
            let peel = self.peel.filter(|p| col + cols == p.col0);
            match peel {
                Some(peel) if ars == 1 => {
                    // The micro-panel's columns are contiguous: the
                    // peeled columns ride along with the tile.
                    let mut out = [T::ZERO; 32];
                    // SAFETY: as below, and the peeled columns hold k
                    // staged values each, pc + kcur ≤ k.
                    unsafe {
                        (peel.dot.with_tile)(
                            kcur,
                            ap,
                            ars,
                            acs,
                            bp,
                            ldb,
                            cp,
                            self.c.rs,
                            self.c.cs,
                            rows,
                            cols,
                            &tile,
                            peel.columns.add(pc),
                            peel.k,
                            peel.count,
                            &mut out,
                        )
                    };
                    // SAFETY: the panel's rows and the peeled columns
                    // are inside this task's rows of C.
                    unsafe { self.store_peel(&peel, row, &out, 16, &tile) };
                }
                _ => {
                    let func = self.kernel.for_tile(rows, cols);
                    // SAFETY: the panels hold kcur steps; the tile at
                    // (row, col) is inside this task's block of C.
                    unsafe {
                        func(
                            kcur, ap, ars, acs, bp, ldb, cp, self.c.rs, self.c.cs, rows, cols,
                            &tile,
                        )
                    };
                    if let Some(peel) = peel {
                        // SAFETY: the panel is as described above; its
                        // rows and the peeled columns are inside this
                        // task's rows of C.
                        unsafe { self.finish_peel(&peel, ap, ars, acs, row, pc, kcur, &tile) };
                    }
                }
            }
        }
    }

    /// The peeled columns of the `mr` rows from `row` (one A micro-panel)
    /// at depth `pc..pc+kcur`, through the same epilogue as their tile.
    ///
    /// # Safety
    /// Value `(i, p)` of the panel is at `ap + i·ars + p·acs` for the
    /// panel's rows and `p < kcur`; the rows and columns are inside C.
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish_peel(
        &self,
        peel: &PeeledColumns<T>,
        ap: *const T,
        ars: usize,
        acs: usize,
        row: usize,
        pc: usize,
        kcur: usize,
        tile: &TileEpilogue<T>,
    ) {
        // Room for the tallest register tile; only the row kernels (8 rows
        // at most) have dot kernels, and a taller one must fail loudly
        // rather than leave rows unwritten.
        const MAX_MR: usize = 16;
        let rows = self.kernel.info().mr.min(self.m1 - row);
        assert!(rows <= MAX_MR, "peeled columns for a {rows}-row tile");
        let mut out = [T::ZERO; 2 * MAX_MR];
        for (q, out) in out.chunks_exact_mut(MAX_MR).take(peel.count).enumerate() {
            // SAFETY: column q holds k staged values; pc + kcur ≤ k.
            let column = unsafe { peel.columns.add(q * peel.k + pc) };
            if acs == 1 {
                // A row-major A read in place: rows are contiguous.
                // SAFETY: forwarded.
                unsafe { (peel.dot.rows)(kcur, ap, ars, rows, column, out) };
            } else {
                // Neither rows nor columns contiguous: a row-major A read in
                // place at a column stride above 1 (rare).
                for (i, x) in out.iter_mut().enumerate().take(rows) {
                    *x = (0..kcur)
                        // SAFETY: (i, p) is inside the panel.
                        .map(|p| unsafe { *ap.add(i * ars + p * acs) * *column.add(p) })
                        .sum();
                }
            }
        }
        // SAFETY: forwarded.
        unsafe { self.store_peel(peel, row, &out, MAX_MR, tile) };
    }

    /// Stores the peeled columns' sums of the micro-panel at `row` (column
    /// `q`'s at `out[q·stride..]`) through the tile's epilogue.
    ///
    /// # Safety
    /// The panel's rows and the peeled columns are inside this task's rows
    /// of C.
    unsafe fn store_peel(
        &self,
        peel: &PeeledColumns<T>,
        row: usize,
        out: &[T],
        stride: usize,
        tile: &TileEpilogue<T>,
    ) {
        let rows = self.kernel.info().mr.min(self.m1 - row);
        for q in 0..peel.count {
            for (i, &x) in out[q * stride..][..rows].iter().enumerate() {
                let bias = if tile.bias.is_null() {
                    T::ZERO
                } else {
                    // SAFETY: the tile's bias holds its rows' values.
                    unsafe { *tile.bias.add(i) }
                };
                // SAFETY: (row + i, col0 + q) is inside this task's rows of C.
                unsafe {
                    store_scalar(
                        self.c.ptr.offset(
                            (row + i) as isize * self.c.rs + (peel.col0 + q) as isize * self.c.cs,
                        ),
                        tile.alpha * x,
                        tile.beta,
                        bias,
                        tile.clamp,
                    )
                };
            }
        }
    }
}
