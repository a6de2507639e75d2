//! The GEMM loop nest, written once for every micro-kernel, and its rayon
//! split.
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
//! Packing pays for itself only when a panel is reused often. A row-major
//! operand whose packed panels would serve few tiles is read in place by
//! the kernels instead (only a partial last panel is packed): B when M fits
//! one MC block (each B panel then serves at most MC/MR tiles), A when C has
//! at most [`A_IN_PLACE_MAX_PANELS`] column panels per block.
//!
//! Threads split C into a grid of `tm × tn` blocks aligned to the register
//! tile; each thread runs the whole nest on its block with its own packing
//! buffers. The grid shape minimises repacking: splitting rows makes every
//! thread pack all of its B columns, splitting columns makes every thread
//! pack all of its A rows, so the cheaper one wins.

use super::cache::cache_sizes;
use super::kernels::{store_scalar, Kernel, KernelInfo, TileEpilogue};
use super::pack::{pack_a_strided, with_pack_buffers, AlignedBuf, BSource, PackBuffers, StridedB};
use super::{GemmOptions, Parallelism};
use crate::testing::record_gemm_block;
use rayon::prelude::*;

/// Where A comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ASource {
    /// A strided matrix, packed block by block as the loops reach it.
    Strided {
        ptr: *const f32,
        rs: isize,
        cs: isize,
    },
    /// Already packed for the selected kernel (pre-packed convolution weights): `m.div_ceil(mr)` panels of
    /// `k × mr`, panel `q` at `ptr + q·k·mr`, rows past `m` zero.
    Packed {
        ptr: *const f32,
        k: usize,
        mr: usize,
    },
}

/// C as a pointer with element strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CTile {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

/// Bias per row of C and the activation's clamp, applied as tiles are stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue {
    /// Null, or `m` values.
    pub bias: *const f32,
    /// `(lo, hi)` or `None`.
    pub clamp: Option<(f32, f32)>,
    /// Columns of C past the tiles' last column, finished as dot products
    /// next to the tiles (see [`peeled_columns`]); the driver sets it.
    pub peel: Option<PeeledColumns>,
}

impl Epilogue {
    /// Plain GEMM: no bias, no activation.
    pub const NONE: Epilogue = Epilogue {
        bias: std::ptr::null(),
        clamp: None,
        peel: None,
    };
}

/// The last `count` columns of C, from `col0` on, computed as dot products:
/// right after the tile that ends at `col0` for a micro-panel of A, while
/// those `mr` rows of A are still in L1. The columns of B are staged
/// contiguous, column `q` at `columns + q·k`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeeledColumns {
    columns: *const f32,
    k: usize,
    col0: usize,
    count: usize,
    dot: super::kernels::DotKernelFn,
}

// SAFETY: these are views the GEMM's callers vouch for (see `sgemm_raw`): A,
// B and bias are read-only for the whole call; C is written only in disjoint
// blocks, one per task.
unsafe impl Send for ASource {}
// SAFETY: as above.
unsafe impl Sync for ASource {}
// SAFETY: as above.
unsafe impl Send for CTile {}
// SAFETY: as above.
unsafe impl Sync for CTile {}
// SAFETY: as above.
unsafe impl Send for Epilogue {}
// SAFETY: as above.
unsafe impl Sync for Epilogue {}

/// Below this many multiply-adds per thread, waking another thread costs more
/// than it saves (a rayon fork-join is a few microseconds; 2^19 FMAs take
/// about 4 µs on one Zen 5 core).
const MIN_FMAS_PER_THREAD: u64 = 1 << 19;

/// How many threads a problem of this size deserves under `par`.
pub(crate) fn thread_count(m: usize, n: usize, k: usize, par: Parallelism) -> usize {
    let max = par.max_threads();
    if max <= 1 {
        return 1;
    }
    let work = (m as u64).saturating_mul(n as u64).saturating_mul(k as u64);
    let by_work = (work / MIN_FMAS_PER_THREAD).max(1);
    max.min(usize::try_from(by_work).unwrap_or(usize::MAX))
}

/// Picks the `tm × tn = threads` grid (or fewer, where a side has too few
/// panels) that repacks least: each row split repacks B (`k·n` floats) and
/// each column split repacks A (`m·k`, or nothing when A is pre-packed).
fn thread_grid(
    m: usize,
    n: usize,
    threads: usize,
    info: &KernelInfo,
    a_prepacked: bool,
) -> (usize, usize) {
    let (mp, np) = (m.div_ceil(info.mr), n.div_ceil(info.nr));
    let mut best = (1, 1);
    let mut best_cost = (usize::MAX, u64::MAX);
    for tm in 1..=threads {
        if !threads.is_multiple_of(tm) {
            continue;
        }
        let tn = threads / tm;
        // Fewer tasks than asked when a side runs out of panels.
        let (tm_eff, tn_eff) = (tm.min(mp), tn.min(np));
        let idle = threads - tm_eff * tn_eff;
        let a_cost = if a_prepacked {
            0
        } else {
            tn_eff as u64 * m as u64
        };
        let cost = tm_eff as u64 * n as u64 + a_cost;
        if (idle, cost) < best_cost {
            best_cost = (idle, cost);
            best = (tm_eff, tn_eff);
        }
    }
    best
}

/// The `part`-th of `parts` contiguous ranges of `0..len`, cut on multiples
/// of `unit` and as even as that allows.
fn split_range(len: usize, unit: usize, parts: usize, part: usize) -> (usize, usize) {
    let units = len.div_ceil(unit);
    let (base, extra) = (units / parts, units % parts);
    let start = part * base + part.min(extra);
    let count = base + usize::from(part < extra);
    ((start * unit).min(len), ((start + count) * unit).min(len))
}

/// `C ← act(β·C + bias)` for the degenerate cases `k = 0` and `α = 0`, where
/// A and B must not be read.
///
/// # Safety
/// As `gemm` for C and the epilogue.
pub(crate) unsafe fn scale_c(m: usize, n: usize, beta: f32, c: CTile, ep: &Epilogue) {
    for i in 0..m {
        let bias = if ep.bias.is_null() {
            0.0
        } else {
            // SAFETY: bias holds m values.
            unsafe { *ep.bias.add(i) }
        };
        for j in 0..n {
            // SAFETY: (i, j) is inside C; C is read only when beta != 0.
            unsafe {
                store_scalar(
                    c.ptr.offset(i as isize * c.rs + j as isize * c.cs),
                    0.0,
                    beta,
                    bias,
                    ep.clamp,
                )
            };
        }
    }
}

/// The native engine: `C ← act(α·A·B + β·C + bias)`.
///
/// # Safety
/// As [`super::gemm_with_epilogue`]; a `Packed` A was packed for `kernel`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<B: BSource>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &ASource,
    b: &B,
    beta: f32,
    c: CTile,
    ep: &Epilogue,
    kernel: &Kernel,
    par: Parallelism,
    bufs: Option<&mut PackBuffers>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        // SAFETY: forwarded.
        unsafe { scale_c(m, n, beta, c, ep) };
        return;
    }
    // Kernels store rows of C with vector stores. For a column-major C,
    // compute Cᵀ = Bᵀ·Aᵀ instead, which is row-major.
    if c.cs != 1 && c.rs == 1 && ep.bias.is_null() {
        if let (ASource::Strided { ptr, rs, cs }, Some(bs)) = (*a, b.as_strided()) {
            let at = StridedB {
                ptr,
                rs: cs,
                cs: rs,
            };
            let bt = ASource::Strided {
                ptr: bs.ptr,
                rs: bs.cs,
                cs: bs.rs,
            };
            let ct = CTile {
                ptr: c.ptr,
                rs: c.cs,
                cs: c.rs,
            };
            // SAFETY: the same memory, viewed transposed.
            unsafe { gemm(n, k, m, alpha, &bt, &at, beta, ct, ep, kernel, par, bufs) };
            return;
        }
    }
    if let ASource::Packed { mr, .. } = a {
        // Packed panels of another height would be read out of bounds.
        assert_eq!(*mr, kernel.info().mr, "A was packed for another kernel");
    }
    if let (ASource::Strided { cs: 1, .. }, Some(bs), Some(dot), None) =
        (*a, b.as_strided(), kernel.dot(), ep.peel)
    {
        let count = peeled_columns(kernel, n);
        let col0 = n - count;
        // Only where every A block is read in place, so that each micro-panel
        // reaches the dot kernel in rows (a packed panel takes a scalar
        // loop). Blocks have at most MC rows and col0's panels, and fewer
        // rows or panels only make `a_in_place` easier to satisfy.
        let rows = m.min(kernel.info().mc);
        if count > 0 && a_in_place(a, kernel, rows, col0.div_ceil(kernel.info().nr)) {
            // SAFETY: (p, j) is inside B for p < k and j < n.
            let columns: Vec<f32> = (col0..n)
                .flat_map(|j| (0..k).map(move |p| (p, j)))
                .map(|(p, j)| unsafe { *bs.ptr.offset(p as isize * bs.rs + j as isize * bs.cs) })
                .collect();
            let with_peel = Epilogue {
                peel: Some(PeeledColumns {
                    columns: columns.as_ptr(),
                    k,
                    col0,
                    count,
                    dot,
                }),
                ..*ep
            };
            // SAFETY: forwarded; the tiles cover columns 0..col0 and finish
            // the rest through the peel, whose staged columns outlive the call.
            unsafe {
                gemm(
                    m, k, col0, alpha, a, b, beta, c, &with_peel, kernel, par, bufs,
                )
            };
            return;
        }
    }
    if let Some(bufs) = bufs {
        // The caller's buffers serve one thread: this call runs on the
        // calling thread only.
        // SAFETY: forwarded; the single task covers all of C.
        unsafe { gemm_block(0, m, 0, n, k, alpha, a, b, beta, c, ep, kernel, bufs) };
        return;
    }
    let threads = thread_count(m, n, k, par);
    let (mp, np) = (m.div_ceil(kernel.info().mr), n.div_ceil(kernel.info().nr));
    if threads > 1 && np < 4 * threads && mp >= 2 * threads {
        // Too few column panels to share out evenly: share B instead.
        // SAFETY: forwarded.
        unsafe { gemm_shared_b(m, k, n, alpha, a, b, beta, c, ep, kernel, threads) };
        return;
    }
    let prepacked = matches!(a, ASource::Packed { .. });
    let (tm, tn) = thread_grid(m, n, threads, kernel.info(), prepacked);
    // Column blocks may end mid-panel where a narrow kernel finishes the
    // partial panel at half cost: 196 columns split 112 + 84 (3.5 and 3
    // panels of work) instead of 128 + 68 (4 and 3).
    let column_unit = kernel.narrow().map_or(kernel.info().nr, |(width, _)| width);
    let task = |t: usize| {
        let (m0, m1) = split_range(m, kernel.info().mr, tm, t / tn);
        let (n0, n1) = split_range(n, column_unit, tn, t % tn);
        if m0 < m1 && n0 < n1 {
            with_pack_buffers(|bufs| {
                // SAFETY: tasks cover disjoint blocks of C; the rest is forwarded.
                unsafe { gemm_block(m0, m1, n0, n1, k, alpha, a, b, beta, c, ep, kernel, bufs) };
            });
        }
    };
    if tm * tn == 1 {
        task(0);
    } else {
        (0..tm * tn).into_par_iter().with_max_len(1).for_each(task);
    }
}

/// How many of C's last columns the driver computes as dot products rather
/// than in tiles: the one or two columns just past a multiple of the narrow
/// kernel's width, which a tile would pad to a whole vector per row (49 =
/// 3·16 + 1 columns: four vectors per row in tiles, three plus one dot
/// product peeled off).
fn peeled_columns(kernel: &Kernel, n: usize) -> usize {
    match (kernel.narrow(), kernel.dot()) {
        (Some((width, _)), Some(_)) if n > width && n % width <= 2 => n % width,
        _ => 0,
    }
}

/// BLIS-style threading for a C with few column panels (a 14×14 or 7×7
/// output plane): every KC × NC block of B is packed once, by all threads
/// in parallel, into one shared buffer, and the threads then split the rows
/// of C over it. Splitting columns instead would leave 7 panels on 2
/// threads (4 + 3), and splitting rows with private B blocks would pack
/// (im2col) B once per thread.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_shared_b<B: BSource>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &ASource,
    b: &B,
    beta: f32,
    c: CTile,
    ep: &Epilogue,
    kernel: &Kernel,
    threads: usize,
) {
    let KernelInfo { mr, nr, mc, nc, .. } = *kernel.info();
    let kc = block_depth(k, kernel.info());
    let ctx = MacroKernel {
        alpha,
        beta,
        c,
        ep,
        kernel,
        k,
        m1: m,
        n1: n,
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
                        // holds exactly their floats.
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
            let bpack: &[f32] = bpack;
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
                            record_gemm_block(kernel.info().isa, pc > 0, ic > m0, jc > 0);
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
/// L2 instead of being written out to L3 and read back.
///
/// # Safety
/// As [`gemm`]; `m0` is a multiple of the kernel's MR.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block<B: BSource>(
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    k: usize,
    alpha: f32,
    a: &ASource,
    b: &B,
    beta: f32,
    c: CTile,
    ep: &Epilogue,
    kernel: &Kernel,
    bufs: &mut PackBuffers,
) {
    let KernelInfo { nr, mc, nc, .. } = *kernel.info();
    // Split k into equal blocks no deeper than KC rather than full blocks
    // plus a thin remainder, whose epilogue and C traffic cost as much as a
    // full block's while doing little work.
    let kc = block_depth(k, kernel.info());
    let ctx = MacroKernel {
        alpha,
        beta,
        c,
        ep,
        kernel,
        k,
        m1,
        n1,
    };
    let PackBuffers {
        a: abuf,
        b: bbuf,
        staging,
    } = bufs;
    if m1 - m0 <= mc {
        // A row-major B is read in place: each B panel serves only
        // `(m1 - m0) / mr` tiles here, too few to repay copying it, as long
        // as its rows stay in L2 between tiles (see `rows_stay_in_l2`).
        // Measured, 1 thread AVX-512, in place vs packed: 64×576×3136
        // +7%, 64×147×12544 +17%, 128×512×1000 +6%, but 256×512×1024 −22%
        // (rows 4 KiB apart).
        let in_place = b.as_strided().filter(|bs| {
            bs.cs == 1 && bs.rs > 0 && rows_stay_in_l2(bs.rs as usize, kc, cache_sizes().l2)
        });
        let nc_small = single_block_columns(kc, kernel.info());
        for pc in (0..k).step_by(kc) {
            let kcur = kc.min(k - pc);
            // SAFETY: rows m0..m1 and depth pc..pc+kcur are inside A.
            let a_here = a_in_place(a, kernel, m1 - m0, (n1 - n0).div_ceil(nr));
            let apanels = unsafe { a_block(a, m0, m1 - m0, pc, kcur, kernel, a_here, abuf) };
            for jc in (n0..n1).step_by(nc_small) {
                let ncur = nc_small.min(n1 - jc);
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
                        // A source that builds B row by row (the implicit
                        // convolution) writes whole rows of the block for
                        // the kernels to read in place, rather than building
                        // each row and then dealing it out to the panels.
                        // Rows 1 KiB apart (256 columns) measured no slower
                        // than rows padded off that stride.
                        let ld = ncur.next_multiple_of(nr);
                        let rows = bbuf.get(kcur * ld);
                        // SAFETY: the block is inside B and `rows` has the room.
                        if unsafe { b.fill_rows(pc, kcur, jc, ncur, ld, rows) } {
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
                record_gemm_block(kernel.info().isa, pc > 0, false, jc > n0);
                // SAFETY: forwarded; the panels were packed above.
                unsafe { ctx.run(apanels, m0, m1 - m0, bpanels, jc, ncur, pc, kcur) };
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
            let bpack: &[f32] = bpack;
            for ic in (m0..m1).step_by(mc) {
                let mcur = mc.min(m1 - ic);
                // SAFETY: rows ic..ic+mcur and depth pc..pc+kcur are inside A.
                let a_here = a_in_place(a, kernel, mcur, ncur.div_ceil(nr));
                let apanels = unsafe { a_block(a, ic, mcur, pc, kcur, kernel, a_here, abuf) };
                record_gemm_block(kernel.info().isa, pc > 0, ic > m0, jc > n0);
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

/// The depth of the K blocks for a GEMM of depth `k`: equal blocks no
/// deeper than KC.
pub(crate) fn block_depth(k: usize, info: &KernelInfo) -> usize {
    k.div_ceil(k.div_ceil(info.kc).max(1))
        .next_multiple_of(8)
        .min(info.kc)
}

/// The width of the B blocks when C's rows fit one MC block: as many
/// columns as keep a `kc`-deep block within half of L2 (A's block is at
/// most MC rows, the other half). These blocks are consumed by few tiles
/// each, so the wider they are, the fewer times each KC block of A is
/// walked again and, for the implicit convolution, the fewer partial input
/// rows each block of B rows starts and ends on. Measured against the
/// former fixed 256 columns (1 thread AVX-512 plans, one process,
/// alternating, three runs): r50_3x3 (kc 288: 448 columns) +2.5–6%,
/// r50_conv1 (kc 152: 832) +4–6%, r50_3x3_s2 +2%, batch16 (1024 columns:
/// 448 + 448 + 128) −2% to +1%; r50_deep (kc 464: 256, as before), r50_1x1
/// and the GEMM shapes with M ≤ 256 within ±2%. Splitting the columns
/// into equal blocks instead measured the same.
pub(crate) fn single_block_columns(kc: usize, info: &KernelInfo) -> usize {
    let floats = cache_sizes().l2 / 2 / std::mem::size_of::<f32>();
    (floats / kc.max(1) / info.nr * info.nr).clamp(info.nr, info.nc.max(info.nr))
}

/// The most floats one task's packing buffers (A, B, staging rows) hold for
/// an `m × k × n` GEMM: bounded by the blocking, whatever the problem size.
pub(crate) fn pack_bounds(
    m: usize,
    k: usize,
    n: usize,
    info: &KernelInfo,
    a_prepacked: bool,
) -> (usize, usize, usize) {
    let kc = block_depth(k, info).min(k.max(1));
    let mc = info.mc.min(m.next_multiple_of(info.mr));
    let nc = if m <= info.mc {
        single_block_columns(block_depth(k, info), info)
    } else {
        info.nc
    }
    .min(n.next_multiple_of(info.nr));
    let a = if a_prepacked { 0 } else { mc * kc };
    // Staging: two rows of a block, for sources that build a row from the
    // one before it.
    (a, kc * nc, 2 * nc)
}

/// Reading A in place pays when each packed A block would serve at most
/// this many B panels: 2048×512×49 (2 panels) spends 15% of its time
/// packing A, 256×2304×196 (7 panels) 5%.
const A_IN_PLACE_MAX_PANELS: usize = 8;

/// Whether the kernel reads the `rows`-row A block in place rather than
/// packed, for a block that serves `column_panels` B panels: a row-major A
/// whose rows stay in L2 ([`rows_stay_in_l2`]).
fn a_in_place(a: &ASource, kernel: &Kernel, rows: usize, column_panels: usize) -> bool {
    match *a {
        ASource::Strided { rs, cs, .. } => {
            kernel.a_strided()
                && cs == 1
                && rs > 0
                && column_panels <= A_IN_PLACE_MAX_PANELS
                && rows_stay_in_l2(rs as usize, rows, cache_sizes().l2)
        }
        ASource::Packed { .. } => false,
    }
}

/// Whether `rows` rows of an operand read in place, `rs` floats apart, can
/// stay in L2 together. Rows whose starts are `2^t` cache lines apart (and
/// line-aligned) fall into only `sets / 2^t` of L2's sets, whatever their
/// width; with 16 ways, and a factor 2 of room for everything else, that
/// holds `rows` rows while `2^t · 2 · rows ≤ L2 lines`. A packed panel is
/// contiguous and spreads over every set. For B panels of 512 rows 4 KiB
/// apart (64 lines) this fails (64·1024 > 16384 lines of a 1 MiB L2), and
/// reading in place was measured 22% slower than packing.
fn rows_stay_in_l2(rs: usize, rows: usize, l2: usize) -> bool {
    let bytes = rs.saturating_mul(4);
    let line_stride_pow2 = if bytes.is_multiple_of(64) {
        1usize << (bytes / 64).trailing_zeros().min(usize::BITS - 1)
    } else {
        1
    };
    line_stride_pow2.saturating_mul(2 * rows) <= l2 / 64
}

/// The A panels of rows `ic..ic+mcur` at depth `pc..pc+kcur`: read in place
/// (`in_place`, a row-major A), packed into `abuf` from a strided A, or
/// found in a pre-packed one.
///
/// # Safety
/// The block is inside A; `ic` is a multiple of MR; `in_place` only for a
/// strided A with unit column stride.
#[allow(clippy::too_many_arguments)]
unsafe fn a_block(
    a: &ASource,
    ic: usize,
    mcur: usize,
    pc: usize,
    kcur: usize,
    kernel: &Kernel,
    in_place: bool,
    abuf: &mut AlignedBuf,
) -> APanels {
    let mr = kernel.info().mr;
    match *a {
        ASource::Strided { ptr, rs, cs } if in_place => {
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
                cs: 1,
                packed_tail,
            }
        }
        ASource::Strided { ptr, rs, cs } => {
            let apack = abuf.get(mcur.div_ceil(mr) * kcur * mr);
            // SAFETY: (ic, pc) and the mcur × kcur block are inside A.
            unsafe {
                let origin = ptr.offset(ic as isize * rs + pc as isize * cs);
                pack_a_strided(origin, rs, cs, mcur, kcur, mr, apack);
            }
            APanels::packed(apack.as_ptr(), kcur * mr, mr)
        }
        ASource::Packed { ptr, k: kfull, .. } => APanels::packed(
            // SAFETY: ic is a multiple of mr; the panels cover every row of
            // A at full depth.
            unsafe { ptr.add((ic / mr) * kfull * mr + pc * mr) },
            kfull * mr,
            mr,
        ),
    }
}

/// Where the micro-kernels find the A panels of one block.
#[derive(Clone, Copy)]
struct APanels {
    /// Panel `q` starts at `first + q·panel_stride`.
    first: *const f32,
    panel_stride: usize,
    /// Value `(i, p)` of a panel is at `panel + i·rs + p·cs`.
    rs: usize,
    cs: usize,
    /// A packed copy (`rs = 1`, `cs = mr`, rows past the matrix zero) of
    /// the last panel, used instead of the in-place one when A is read in
    /// place and the block ends mid-panel.
    packed_tail: Option<*const f32>,
}

impl APanels {
    /// Packed panels, `panel_stride` floats apart.
    fn packed(first: *const f32, panel_stride: usize, mr: usize) -> APanels {
        APanels {
            first,
            panel_stride,
            rs: 1,
            cs: mr,
            packed_tail: None,
        }
    }

    /// The start and strides of panel `ir` of `npanels`.
    fn panel(&self, ir: usize, npanels: usize, mr: usize) -> (*const f32, usize, usize) {
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
struct BPanels {
    /// Panel `q` starts at `first + q·panel_stride`.
    first: *const f32,
    panel_stride: usize,
    /// Floats from one k-step of a panel to the next.
    ldb: usize,
    /// A packed copy (`ldb = nr`) of the last panel, used instead of the
    /// in-place one when B is read in place and the block ends mid-panel.
    packed_tail: Option<*const f32>,
}

impl BPanels {
    /// Panels packed contiguously, `kc·nr` floats each.
    fn packed(bpack: &[f32], kc: usize, nr: usize) -> BPanels {
        BPanels {
            first: bpack.as_ptr(),
            panel_stride: kc * nr,
            ldb: nr,
            packed_tail: None,
        }
    }

    /// The start and k-step of panel `jr` of `npanels`.
    fn panel(&self, jr: usize, npanels: usize, nr: usize) -> (*const f32, usize) {
        match self.packed_tail {
            Some(tail) if jr + 1 == npanels => (tail, nr),
            _ => (self.first.wrapping_add(jr * self.panel_stride), self.ldb),
        }
    }
}

/// What the innermost two loops need besides the packed panels.
struct MacroKernel<'a> {
    alpha: f32,
    beta: f32,
    c: CTile,
    ep: &'a Epilogue,
    kernel: &'a Kernel,
    k: usize,
    m1: usize,
    n1: usize,
}

impl MacroKernel<'_> {
    /// The NR and MR loops over one packed A block (rows `ic..ic+mcur`) and
    /// one packed B block (columns `jc..jc+ncur`) at depth `pc..pc+kcur`.
    ///
    /// # Safety
    /// The panels hold the blocks described; the tiles are inside this
    /// task's block of C.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        apanels: APanels,
        ic: usize,
        mcur: usize,
        bpanels: BPanels,
        jc: usize,
        ncur: usize,
        pc: usize,
        kcur: usize,
    ) {
        let KernelInfo { mr, nr, .. } = *self.kernel.info();
        let (first, last) = (pc == 0, pc + kcur == self.k);
        let ep = self.ep;
        let npanels = ncur.div_ceil(nr);
        for jr in 0..npanels {
            let (bp, ldb) = bpanels.panel(jr, npanels, nr);
            let col = jc + jr * nr;
            let cols = nr.min(self.n1 - col);
            let func = match self.kernel.narrow() {
                Some((width, narrow)) if cols <= width => narrow,
                _ => self.kernel.func(),
            };
            let row_panels = mcur.div_ceil(mr);
            for ir in 0..row_panels {
                let (ap, ars, acs) = apanels.panel(ir, row_panels, mr);
                let row = ic + ir * mr;
                let tile = TileEpilogue {
                    alpha: self.alpha,
                    beta: if first { self.beta } else { 1.0 },
                    bias: if first && !ep.bias.is_null() {
                        // SAFETY: row < m and bias holds m values.
                        unsafe { ep.bias.add(row) }
                    } else {
                        std::ptr::null()
                    },
                    clamp: if last { ep.clamp } else { None },
                };
                // SAFETY: the panels hold kcur steps; the tile at (row, col)
                // is inside this task's block of C.
                unsafe {
                    func(
                        kcur,
                        ap,
                        ars,
                        acs,
                        bp,
                        ldb,
                        self.c
                            .ptr
                            .offset(row as isize * self.c.rs + col as isize * self.c.cs),
                        self.c.rs,
                        self.c.cs,
                        mr.min(self.m1 - row),
                        cols,
                        &tile,
                    )
                };
                if let Some(peel) = ep.peel.filter(|p| col + cols == p.col0) {
                    // SAFETY: the panel is as described above; its rows and
                    // the peeled columns are inside this task's rows of C.
                    unsafe { self.finish_peel(&peel, ap, ars, acs, row, pc, kcur, &tile) };
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
        peel: &PeeledColumns,
        ap: *const f32,
        ars: usize,
        acs: usize,
        row: usize,
        pc: usize,
        kcur: usize,
        tile: &TileEpilogue,
    ) {
        // Room for the tallest register tile; only the row kernels (8 rows
        // at most) have a dot kernel, and a taller one must fail loudly
        // rather than leave rows unwritten.
        const MAX_MR: usize = 32;
        let rows = self.kernel.info().mr.min(self.m1 - row);
        assert!(rows <= MAX_MR, "peeled columns for a {rows}-row tile");
        let mut out = [0.0f32; MAX_MR];
        for q in 0..peel.count {
            // SAFETY: column q holds k staged values; pc + kcur ≤ k.
            let column = unsafe { peel.columns.add(q * peel.k + pc) };
            if acs == 1 {
                // A read in place: rows are contiguous, the dot kernel's
                // layout.
                // SAFETY: forwarded.
                unsafe { (peel.dot)(kcur, ap, ars, rows, column, &mut out) };
            } else {
                // A packed (a packed last panel, or a packed block): rare.
                for (i, x) in out.iter_mut().enumerate().take(rows) {
                    *x = (0..kcur)
                        // SAFETY: (i, p) is inside the panel.
                        .map(|p| unsafe { *ap.add(i * ars + p * acs) * *column.add(p) })
                        .sum();
                }
            }
            for (i, &x) in out.iter().enumerate().take(rows) {
                let bias = if tile.bias.is_null() {
                    0.0
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

/// The `matrixmultiply` backend, threaded by splitting C's columns across
/// rayon (its own threading is process-global). Bias is written into C in the
/// pass before the product accumulates onto it; an activation needs a pass
/// after: only the native engine fuses them into the store.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_matrixmultiply<B: BSource>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &ASource,
    b: &B,
    beta: f32,
    c: CTile,
    ep: &Epilogue,
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
            StridedB {
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
                ASource::Strided { ptr, rs, cs } => matrixmultiply::sgemm(
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
                ASource::Packed { ptr, k: kfull, mr } => {
                    for q in 0..m.div_ceil(mr) {
                        let rows = mr.min(m - q * mr);
                        matrixmultiply::sgemm(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_range_covers_everything_once() {
        for len in [0usize, 1, 7, 32, 33, 1000] {
            for parts in 1..6 {
                let mut next = 0;
                for p in 0..parts {
                    let (a, b) = split_range(len, 8, parts, p);
                    assert_eq!(a, next.min(len));
                    assert!(a % 8 == 0 || a == len);
                    next = b;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn in_place_rows_must_spread_over_l2_sets() {
        let l2 = 1 << 20;
        // B panels of 512 rows 4 KiB or 8 KiB apart: 16 or 8 set groups.
        assert!(!rows_stay_in_l2(1024, 512, l2));
        assert!(!rows_stay_in_l2(2048, 512, l2));
        // 64×147×12544 and 64×576×3136: 16 and 4 lines' power of two.
        assert!(rows_stay_in_l2(12544, 152, l2));
        assert!(rows_stay_in_l2(3136, 288, l2));
        // Not line-aligned rows drift across the sets.
        assert!(rows_stay_in_l2(1000, 512, l2));
        // An A block of 256 whole rows of 512 floats.
        assert!(rows_stay_in_l2(512, 256, l2));
    }

    #[test]
    fn grid_prefers_the_long_side() {
        let info = KernelInfo {
            isa: super::super::Isa::Portable,
            mr: 8,
            nr: 32,
            mc: 64,
            kc: 64,
            nc: 256,
        };
        // Few rows, many columns: split the columns.
        assert_eq!(thread_grid(64, 3136, 2, &info, false), (1, 2));
        // Many rows, few columns: split the rows.
        assert_eq!(thread_grid(2048, 49, 2, &info, false), (2, 1));
        // One panel each way: only one task has work.
        assert_eq!(thread_grid(8, 32, 4, &info, false), (1, 1));
    }
}
