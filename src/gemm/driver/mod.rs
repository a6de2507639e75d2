//! The GEMM loop nest, written once for every micro-kernel: the entry
//! [`gemm`] and the two loop orders, [`gemm_block`] (one task's block of C)
//! and [`gemm_shared_b`] (threads sharing each packed B block).
//!
//! ```text
//! for jc in 0..n step NC        B block of NC columns      (L3)
//!   for pc in 0..k step KC      pack B[pc.., jc..] → NR-column panels
//!     for ic in 0..m step MC    pack A[ic.., pc..] → MR-row panels (L2)
//!       for jr in NR panels     one B micro-panel stays in L1 ...
//!         for ir in MR panels   ... while the A micro-panels stream past it
//!           micro-kernel(MR × NR tile)
//! ```
//!
//! Kernels whose B micro-panel lives in L2 (the AVX-512 tiles) run C
//! taller than MC in the tall-A order instead: for each block of `tall_mc`
//! rows of A (L3) and each KC block, B is packed in blocks of half of L2,
//! and the MR loop runs outside the NR loop, so one A micro-panel stays in
//! L1 while the B panels stream past it from L2.
//!
//! Packing pays for itself only when a panel is reused often. A row-major
//! operand whose packed panels would serve few tiles is read in place by
//! the kernels instead (only a partial last panel is packed): B when M fits
//! one MC block of at most [`blocking::B_IN_PLACE_MAX_TILES`] register
//! tiles and its rows start on cache lines ([`blocking::rows_on_lines`]) or
//! it has at most [`blocking::B_OFF_LINE_IN_PLACE_MAX_TILES`] of them, A
//! when C has at most [`blocking::A_IN_PLACE_MAX_PANELS`] column panels per
//! block.
//!
//! The rest lives beside this file: `threading` shares the nest out over
//! threads, `blocking` sizes the blocks and decides what is read in place,
//! `macro_kernel` runs the two innermost loops over one block.

mod blocking;
mod macro_kernel;
mod threading;

pub(crate) use blocking::{pack_bounds, B_ROW_ALIGN};
pub(crate) use threading::{split_range, thread_count};

/// Whether an `m × k × n` f32 GEMM on path `isa` with a row-major A (rows
/// `k` apart) and a strided B runs the row kernel with every A block read in
/// place and C's last one or two columns finished as dot products (see
/// [`gemm`]). A plan whose GEMM does so gains nothing from packing its
/// weights for the column kernel, and loses the dot-product peel: 512 →
/// 2048 1×1 on 7×7 (49 = 48 + 1 columns), 1 thread AVX-512, ran 212 GFLOP/s
/// planned (32×8 column tiles on packed weights) and 218–221 one-shot
/// (8×32 tiles, the last column as dot products).
pub(crate) fn peels_with_a_in_place(isa: crate::arch::Isa, m: usize, k: usize, n: usize) -> bool {
    if k == 0 {
        return false;
    }
    // Only the strides are looked at: the pointer is never read.
    let a = ASource::Strided(StridedMatrix {
        ptr: std::ptr::NonNull::<f32>::dangling().as_ptr().cast_const(),
        rs: k as isize,
        cs: 1,
    });
    let kernel = kernel_for_a(&a, super::kernels::kernel_for(isa), n);
    let count = dot_columns(&a, &kernel, m, n);
    let rows = m.min(kernel.info().mc);
    count > 0 && a_in_place(&a, &kernel, rows, (n - count).div_ceil(kernel.info().nr))
}

/// `kernel` as the driver runs it for `a`: MC narrowed to the rows that
/// stay in L2 where `a` is read in place ([`in_place_block_rows`]).
fn kernel_for_a<T: Element>(a: &ASource<'_, T>, kernel: &Kernel<T>, n: usize) -> Kernel<T> {
    match in_place_block_rows(a, kernel, n) {
        Some(rows) => kernel.with_mc(rows),
        None => *kernel,
    }
}

/// `kernel` with KC lowered to the depth whose lines of a column-major A
/// read in place fit where a packed panel would
/// ([`in_place_column_major_depth`]); for the model's blocking only, a
/// blocking the caller forces is kept as it is.
pub(crate) fn with_column_major_depth<T: Element>(
    a: &ASource<'_, T>,
    kernel: Kernel<T>,
    n: usize,
) -> Kernel<T> {
    match in_place_column_major_depth(a, &kernel, n) {
        Some(depth) => kernel.with_kc(depth),
        None => kernel,
    }
}

/// How many of C's last columns the driver finishes as dot products for an
/// `m × n` C: [`peeled_columns`], where the kernel has dot kernels and
/// every micro-panel of A reaches them with its rows contiguous (a
/// row-major A read in place) or its columns (a packed panel, a
/// column-major A read in place); 0 otherwise, as for a row-major A read
/// in place at a column stride above 1, whose panels would take a scalar
/// loop. Blocks have at most MC rows and the tiled columns' panels, and
/// fewer rows or panels only make `a_in_place` easier to satisfy.
fn dot_columns<T: Element>(a: &ASource<'_, T>, kernel: &Kernel<T>, m: usize, n: usize) -> usize {
    let count = peeled_columns(kernel, n);
    if count == 0 || kernel.dot().is_none() {
        return 0;
    }
    match *a {
        ASource::Strided(StridedMatrix { rs, cs, .. }) if rs != 1 && cs != 1 => {
            let rows = m.min(kernel.info().mc);
            let panels = (n - count).div_ceil(kernel.info().nr);
            if a_in_place(a, kernel, rows, panels) {
                0
            } else {
                count
            }
        }
        _ => count,
    }
}

use super::element::Element;
use super::engine::{ASource, BSource, Epilogue, PackBuffers, StridedC, StridedMatrix};
use super::kernels::{store_scalar, Kernel, KernelInfo};
use super::pack::with_pack_buffers;
use super::Parallelism;
use crate::testing::record_gemm_block;
use blocking::{
    a_in_place, b_rows_in_place, block_depth, columns_to_aligned_rows, in_place_block_rows,
    in_place_column_major_depth, row_blocks, rows_on_lines, single_block_columns,
    B_IN_PLACE_MAX_TILES, B_OFF_LINE_IN_PLACE_MAX_TILES,
};
use macro_kernel::{a_block, peeled_columns, BPanels, MacroKernel, PeeledColumns};
use rayon::prelude::*;
use threading::run_tasks;

/// `C ← act(β·C + bias)` for the degenerate cases `k = 0` and `α = 0`, where
/// A and B must not be read.
///
/// # Safety
/// As `gemm` for C and the epilogue.
pub(crate) unsafe fn scale_c<T: Element>(
    m: usize,
    n: usize,
    beta: T,
    c: StridedC<T>,
    ep: &Epilogue<T>,
) {
    for i in 0..m {
        let bias = if ep.bias.is_null() {
            T::ZERO
        } else {
            // SAFETY: bias holds m values.
            unsafe { *ep.bias.add(i) }
        };
        for j in 0..n {
            // SAFETY: (i, j) is inside C; C is read only when beta != 0.
            unsafe {
                store_scalar(
                    c.ptr.offset(i as isize * c.rs + j as isize * c.cs),
                    T::ZERO,
                    beta,
                    bias,
                    ep.clamp,
                )
            };
        }
    }
}

/// Whether [`gemm`] computes a C it is given as `Cᵀ = Bᵀ·Aᵀ` (where A and B
/// are strided): C column-major, with no bias (a bias runs along C's rows).
pub(crate) fn computes_transposed<T>(c: &StridedC<T>, ep: &Epilogue<T>) -> bool {
    c.cs != 1 && c.rs == 1 && ep.bias.is_null()
}

/// The native engine: `C ← act(α·A·B + β·C + bias)`.
///
/// # Safety
/// As [`super::engine::gemm_with_epilogue`]; a `Packed` A was packed for
/// `kernel`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Element, B: BSource<T>>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &ASource<'_, T>,
    b: &B,
    beta: T,
    c: StridedC<T>,
    ep: &Epilogue<T>,
    kernel: &Kernel<T>,
    par: Parallelism,
    bufs: Option<&mut PackBuffers<T>>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == T::ZERO {
        // SAFETY: forwarded.
        unsafe { scale_c(m, n, beta, c, ep) };
        return;
    }
    // Kernels store rows of C with vector stores. For a column-major C,
    // compute Cᵀ = Bᵀ·Aᵀ instead, which is row-major.
    if computes_transposed(&c, ep) {
        if let (ASource::Strided(a), Some(bs)) = (a, b.as_strided()) {
            let at = a.t();
            let bt = ASource::Strided(bs.t());
            let ct = StridedC {
                ptr: c.ptr,
                rs: c.cs,
                cs: c.rs,
            };
            // SAFETY: the same memory, viewed transposed.
            unsafe { gemm(n, k, m, alpha, &bt, &at, beta, ct, ep, kernel, par, bufs) };
            return;
        }
    }
    let kernel = &kernel_for_a(a, kernel, n);
    if let ASource::Packed(packed) = a {
        // Packed panels of another height would be read out of bounds.
        assert_eq!(
            packed.mr(),
            kernel.info().mr,
            "A was packed for another kernel"
        );
    }
    if let (Some(bs), Some(dot)) = (b.as_strided(), kernel.dot()) {
        let count = dot_columns(a, kernel, m, n);
        let col0 = n - count;
        if count > 0 {
            let columns: Vec<T> = (col0..n)
                .flat_map(|j| (0..k).map(move |p| (p, j)))
                .map(|(p, j)| {
                    // SAFETY: (p, j) is inside B for p < k and j < n.
                    unsafe { *bs.ptr.offset(p as isize * bs.rs + j as isize * bs.cs) }
                })
                .collect();
            let peel = PeeledColumns {
                columns: columns.as_ptr(),
                k,
                col0,
                count,
                dot,
            };
            // SAFETY: forwarded; the tiles cover columns 0..col0 and finish
            // the rest through the peel, whose staged columns outlive the call.
            unsafe {
                run_tasks(
                    m,
                    k,
                    col0,
                    alpha,
                    a,
                    b,
                    beta,
                    c,
                    ep,
                    Some(peel),
                    kernel,
                    par,
                    bufs,
                )
            };
            return;
        }
    }
    // SAFETY: forwarded.
    unsafe { run_tasks(m, k, n, alpha, a, b, beta, c, ep, None, kernel, par, bufs) };
}

/// BLIS-style threading for a C with few column panels (a 14×14 or 7×7
/// output plane): every KC × NC block of B is packed once, by all threads
/// in parallel, into one shared buffer, and the threads then split the rows
/// of C over it. Splitting columns instead would leave 7 panels on 2
/// threads (4 + 3), and splitting rows with private B blocks would pack
/// (im2col) B once per thread. It costs two fork-joins per block, so it is
/// taken only where each thread's part of a block repays them
/// (`threading::MIN_SHARED_B_BLOCK_FMAS`).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_shared_b<T: Element, B: BSource<T>>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &ASource<'_, T>,
    b: &B,
    beta: T,
    c: StridedC<T>,
    ep: &Epilogue<T>,
    peel: Option<PeeledColumns<T>>,
    kernel: &Kernel<T>,
    threads: usize,
) {
    let KernelInfo { mr, nr, mc, nc, .. } = *kernel.info();
    let kc = block_depth(k, kernel.info());
    let ctx = MacroKernel {
        alpha,
        beta,
        c,
        ep,
        peel,
        kernel,
        k,
        m1: m,
        a_panel_outer: false,
    };
    // The calling thread lends its B buffer to the shared block, so that
    // every thread (the caller included) still has its own A and staging
    // buffers for the parallel parts; it is handed back at the end.
    let mut shared = with_pack_buffers(|bufs| std::mem::take(&mut bufs.b));
    for jc in (0..n).step_by(nc) {
        let ncur = nc.min(n - jc);
        let npanels = ncur.div_ceil(nr);
        for pc in (0..k).step_by(kc) {
            let kcur = kc.min(k - pc);
            let bpack = shared.get(npanels * kcur * nr);
            let per_task = npanels.div_ceil(threads);
            bpack
                .par_chunks_mut(per_task * kcur * nr)
                .with_max_len(1)
                .enumerate()
                .for_each(|(t, dst)| {
                    let first = t * per_task;
                    let cols = (npanels - first).min(per_task) * nr;
                    let cols = cols.min(ncur - first * nr);
                    with_pack_buffers(|bufs| {
                        // SAFETY: panels first.. of the block, inside B; dst
                        // holds exactly their elements.
                        unsafe {
                            b.pack_block(
                                pc,
                                kcur,
                                jc + first * nr,
                                cols,
                                nr,
                                dst,
                                &mut bufs.staging,
                            )
                        };
                    });
                });
            let bpack: &[T] = bpack;
            (0..threads).into_par_iter().with_max_len(1).for_each(|t| {
                let (m0, m1) = split_range(m, mr, threads, t);
                if m0 == m1 {
                    return;
                }
                with_pack_buffers(|bufs| {
                    for ic in (m0..m1).step_by(mc) {
                        let mcur = mc.min(m1 - ic);
                        // SAFETY: rows ic..ic+mcur and depth pc..pc+kcur are
                        // inside A; this task owns rows m0..m1 of C.
                        unsafe {
                            let a_here = a_in_place(a, kernel, mcur, npanels);
                            let apanels =
                                a_block(a, ic, mcur, pc, kcur, kernel, a_here, &mut bufs.a);
                            let bpanels = BPanels::packed(bpack, kcur, nr);
                            record_gemm_block(
                                kernel.info().isa,
                                kernel.is_column_kernel(),
                                pc > 0,
                                ic > m0,
                                jc > 0,
                            );
                            ctx.run(apanels, ic, mcur, bpanels, jc, ncur, pc, kcur);
                        }
                    }
                });
            });
        }
    }
    with_pack_buffers(|bufs| {
        if shared.capacity() > bufs.b.capacity() {
            bufs.b = shared;
        }
    });
}

/// The sequential loop nest over rows `m0..m1` and columns `n0..n1` of C.
///
/// When the rows fit in one MC block (the usual convolution: M = output
/// channels ≤ MC), the KC loop goes outside the NC loop and B is packed in
/// blocks of [`single_block_columns`] columns: A is then packed once per KC
/// block, and each packed B block (≤ L2/2) is consumed while it is still in
/// L2 instead of being written out to L3 and read back. Taller C runs the
/// same nest per block of the kernel's `tall_mc` rows (its A block in L3)
/// with the MR loop outside the NR loop, where the kernel's model gives
/// one (the tall-A order of [`crate::gemm::cache_model`]); else the classic
/// nest of the module doc.
///
/// # Safety
/// As [`gemm`]; `m0` is a multiple of the kernel's MR.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block<T: Element, B: BSource<T>>(
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    k: usize,
    alpha: T,
    a: &ASource<'_, T>,
    b: &B,
    beta: T,
    c: StridedC<T>,
    ep: &Epilogue<T>,
    peel: Option<PeeledColumns<T>>,
    kernel: &Kernel<T>,
    bufs: &mut PackBuffers<T>,
) {
    let KernelInfo { nr, mc, nc, .. } = *kernel.info();
    // Split k into equal blocks no deeper than KC rather than full blocks
    // plus a thin remainder, whose epilogue and C traffic cost as much as a
    // full block's while doing little work.
    let kc = block_depth(k, kernel.info());
    let (block_rows, tall) = row_blocks(m1 - m0, kernel.info());
    let ctx = MacroKernel {
        alpha,
        beta,
        c,
        ep,
        peel,
        kernel,
        k,
        m1,
        a_panel_outer: tall,
    };
    let PackBuffers {
        a: abuf,
        b: bbuf,
        staging,
    } = bufs;
    if m1 - m0 <= mc || tall {
        // A row-major B is read in place where each B panel serves at
        // most `B_IN_PLACE_MAX_TILES` tiles, too few to repay copying it,
        // and its rows stay in cache between tiles (see `b_rows_in_place`).
        // Measured, 1 thread AVX-512, in place vs packed: 64×576×3136
        // +7%, 64×147×12544 +17%, 128×512×1000 +6%, but 256×512×1024 −22%
        // (rows 4 KiB apart).
        let tiles = (m1 - m0).div_ceil(kernel.info().mr);
        let in_place = b.as_strided().filter(|bs| {
            bs.cs == 1
                && bs.rs > 0
                && tiles <= B_IN_PLACE_MAX_TILES
                && b_rows_in_place::<T>(bs.rs as usize, kc)
        });
        let nc_small = single_block_columns::<T>(kc, kernel.info());
        // A B read in place whose rows start off a line pair gets its first
        // few columns as a block of their own (packed), so that every row
        // of the rest starts on a pair where the stride allows, else on a
        // line ([`columns_to_aligned_rows`]).
        let lead = in_place.map_or(0, |bs| {
            columns_to_aligned_rows(&bs, n0, n1 - n0, nc_small, nr)
        });
        // Rows that still straddle cache lines after the peel are packed
        // (see `rows_on_lines`), unless each panel serves so few tiles
        // that the copy costs more than the split loads
        // (`B_OFF_LINE_IN_PLACE_MAX_TILES`).
        let few_tiles = tiles <= B_OFF_LINE_IN_PLACE_MAX_TILES;
        let (in_place, lead) = match in_place {
            Some(bs) if !few_tiles && !rows_on_lines(&bs, n0 + lead) => (None, 0),
            other => (other, lead),
        };
        for (ic, pc) in (m0..m1)
            .step_by(block_rows)
            .flat_map(|ic| (0..k).step_by(kc).map(move |pc| (ic, pc)))
        {
            let mcur = block_rows.min(m1 - ic);
            let kcur = kc.min(k - pc);
            let a_here = a_in_place(a, kernel, mcur, (n1 - n0).div_ceil(nr));
            // SAFETY: rows ic..ic+mcur and depth pc..pc+kcur are inside A.
            let apanels = unsafe { a_block(a, ic, mcur, pc, kcur, kernel, a_here, abuf) };
            let starts = (lead > 0)
                .then_some(n0)
                .into_iter()
                .chain((n0 + lead..n1).step_by(nc_small));
            for jc in starts {
                let ncur = if jc < n0 + lead {
                    lead
                } else {
                    nc_small.min(n1 - jc)
                };
                let bpanels = match in_place {
                    Some(bs) => {
                        let full = ncur / nr;
                        let packed_tail = if full * nr < ncur {
                            let tail = bbuf.get(kcur * nr);
                            // SAFETY: the last panel's columns are inside B.
                            unsafe {
                                b.pack_block(
                                    pc,
                                    kcur,
                                    jc + full * nr,
                                    ncur - full * nr,
                                    nr,
                                    tail,
                                    staging,
                                )
                            };
                            Some(tail.as_ptr())
                        } else {
                            None
                        };
                        BPanels {
                            first: bs.ptr.wrapping_offset(pc as isize * bs.rs + jc as isize),
                            panel_stride: nr,
                            ldb: bs.rs as usize,
                            packed_tail,
                        }
                    }
                    None => {
                        // A source that can produce whole rows of the block
                        // more cheaply than panels (one that builds B row by
                        // row, such as the implicit convolution's view)
                        // writes them for the kernels to read in place,
                        // rather than dealing each row out to the panels.
                        // Rows 1 KiB apart (256 columns) measured no slower
                        // than rows padded off that stride.
                        let ld = ncur.next_multiple_of(nr);
                        let rows = bbuf.get(kcur * ld);
                        // SAFETY: the block is inside B and `rows` has the room.
                        if unsafe { b.write_rows(pc, kcur, jc, ncur, ld, rows) } {
                            BPanels {
                                first: rows.as_ptr(),
                                panel_stride: nr,
                                ldb: ld,
                                packed_tail: None,
                            }
                        } else {
                            let bpack = bbuf.get(ncur.div_ceil(nr) * kcur * nr);
                            // SAFETY: the block is inside B and bpack has the room.
                            unsafe { b.pack_block(pc, kcur, jc, ncur, nr, bpack, staging) };
                            BPanels::packed(bpack, kcur, nr)
                        }
                    }
                };
                // The peel is no block of the blocking: the blocks, and
                // their edges, are those after it.
                if jc >= n0 + lead {
                    record_gemm_block(
                        kernel.info().isa,
                        kernel.is_column_kernel(),
                        pc > 0,
                        ic > m0,
                        jc > n0 + lead,
                    );
                }
                // SAFETY: forwarded; the panels were packed above.
                unsafe { ctx.run(apanels, ic, mcur, bpanels, jc, ncur, pc, kcur) };
            }
        }
        return;
    }
    for jc in (n0..n1).step_by(nc) {
        let ncur = nc.min(n1 - jc);
        for pc in (0..k).step_by(kc) {
            let kcur = kc.min(k - pc);
            let bpack = bbuf.get(ncur.div_ceil(nr) * kcur * nr);
            // SAFETY: the block is inside B and bpack has the room.
            unsafe { b.pack_block(pc, kcur, jc, ncur, nr, bpack, staging) };
            let bpack: &[T] = bpack;
            for ic in (m0..m1).step_by(mc) {
                let mcur = mc.min(m1 - ic);
                let a_here = a_in_place(a, kernel, mcur, ncur.div_ceil(nr));
                // SAFETY: rows ic..ic+mcur and depth pc..pc+kcur are inside A.
                let apanels = unsafe { a_block(a, ic, mcur, pc, kcur, kernel, a_here, abuf) };
                record_gemm_block(
                    kernel.info().isa,
                    kernel.is_column_kernel(),
                    pc > 0,
                    ic > m0,
                    jc > n0,
                );
                // SAFETY: forwarded; the panels were packed above.
                unsafe {
                    ctx.run(
                        apanels,
                        ic,
                        mcur,
                        BPanels::packed(bpack, kcur, nr),
                        jc,
                        ncur,
                        pc,
                        kcur,
                    )
                };
            }
        }
    }
}
