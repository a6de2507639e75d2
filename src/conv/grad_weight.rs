//! Grad weight as an implicit GEMM ([`Algorithm::Implicit`]
//! (super::Algorithm::Implicit)): per group, `dW = dY · im2col(X)ᵀ`, summed
//! over the batch, with no column matrix.
//!
//! MEASURED-ORIENTATION-DOC

use super::im2col::{im2col_rows, ColumnTap};
use super::{try_with_capacity, BackwardOptions};
use crate::error::ConvError;
use crate::gemm::engine::{
    gemm_with_epilogue, select_kernel, ASource, BSource, Epilogue, PackBuffers, StridedC,
    StridedMatrix,
};
use crate::gemm::{GemmOptions, Parallelism};
use crate::geometry::ConvGeometry;
use rayon::prelude::*;

/// `grad_weight` (overwritten, or added to with `accumulate`) from `input`
/// and `grad_output`; lengths checked by the caller.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the per-thread buffers cannot be
/// allocated; `grad_weight` is then as it was.
pub(crate) fn backward_weight_implicit(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
) -> Result<(), ConvError> {
    if g.batch == 0 || g.out_plane() == 0 {
        // No term at all: the gradient is 0 (or what is already there).
        if !options.accumulate {
            grad_weight.fill(0.0);
        }
        return Ok(());
    }
    let forced = std::env::var("CPUCONV_GW_ORIENT");
    if forced.as_deref() == Ok("1")
        || (forced.is_err() && g.batch * g.out_plane() < DEPTH_FOR_TAPS_AS_ROWS)
    {
        return by_images(g, input, grad_output, grad_weight, options);
    }
    taps_as_rows(g, input, grad_output, grad_weight, options)
}

/// Below this depth (`N·OH·OW`) dW is computed image by image as
/// `dY · colᵀ`, otherwise as `col · dYᵀ` in chunks of the depth.
const DEPTH_FOR_TAPS_AS_ROWS: usize = 512;

// --- orientation 1: dW = dY · colᵀ per image, B a transposed im2col view ----------------

/// B = colᵀ of one image group (`OH·OW` rows, `C/g·R·S` columns), packed
/// by building tap rows with the im2col row filler and transposing them.
struct ColumnsT<'a> {
    g: &'a ConvGeometry,
    image: &'a [f32],
}

/// Pixels per staging chunk of [`ColumnsT`]: `nr × CHUNK` floats (8 KiB at
/// nr = 32) stay in L1 between the row filler and the transpose.
const CHUNK: usize = 64;

impl BSource<f32> for ColumnsT<'_> {
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
        staging: &mut Vec<f32>,
    ) {
        staging.clear();
        staging.resize(nr * CHUNK, 0.0);
        for q in 0..nc.div_ceil(nr) {
            let width = nr.min(nc - q * nr);
            let panel = &mut dst[q * kc * nr..][..kc * nr];
            let first = ColumnTap::of_row(self.g, j0 + q * nr);
            for c0 in (0..kc).step_by(CHUNK) {
                let ch = CHUNK.min(kc - c0);
                im2col_rows(
                    self.g,
                    self.image,
                    first,
                    k0 + c0..k0 + c0 + ch,
                    CHUNK,
                    width,
                    staging,
                );
                transpose(staging, CHUNK, width, ch, &mut panel[c0 * nr..], nr);
            }
            if width < nr {
                for row in panel.chunks_exact_mut(nr) {
                    row[width..].fill(0.0);
                }
            }
        }
    }
}

fn by_images(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
) -> Result<(), ConvError> {
    let (cg, kg, kk, plane) = (
        g.channels_per_group(),
        g.out_channels_per_group(),
        g.gemm_k(),
        g.out_plane(),
    );
    let gemm_opts = GemmOptions {
        backend: options.backend,
        parallelism: options.parallelism,
        isa: options.isa,
        blocking: options.blocking,
    };
    for grp in 0..g.groups {
        let dw = &mut grad_weight[grp * kg * kk..][..kg * kk];
        for n in 0..g.batch {
            let image =
                &input[(n * g.in_channels + grp * cg) * g.in_plane()..][..cg * g.in_plane()];
            let dy = &grad_output[(n * g.out_channels + grp * kg) * plane..][..kg * plane];
            let a = ASource::Strided(StridedMatrix {
                ptr: dy.as_ptr(),
                rs: plane as isize,
                cs: 1,
            });
            let b = ColumnsT { g, image };
            let c = StridedC {
                ptr: dw.as_mut_ptr(),
                rs: kk as isize,
                cs: 1,
            };
            let beta = if n == 0 && !options.accumulate {
                0.0
            } else {
                1.0
            };
            // SAFETY: A is this image-group's kg × plane block of
            // `grad_output`, B the plane × kk view of its input channels, C
            // the group's kg × kk block of `grad_weight`, exclusively
            // borrowed; with β = 0 C is not read.
            unsafe {
                gemm_with_epilogue(
                    kg,
                    plane,
                    kk,
                    1.0,
                    &a,
                    &b,
                    beta,
                    c,
                    &Epilogue::NONE,
                    &gemm_opts,
                    None,
                )
            };
        }
    }
    Ok(())
}

// --- orientation 2: dWᵀ = col · dYᵀ, taps as the rows of C -------------------------------

/// B = dYᵀ of one group over a window of the batch's depth (`N·OH·OW`,
/// image-major): row `p` is depth `d0 + p`, column `j` output channel
/// `c0 + j` of the group.
struct GradOutputT<'a> {
    g: &'a ConvGeometry,
    grad_output: &'a [f32],
    /// First output channel of the block, counted over all groups.
    channel0: usize,
    /// First depth of the window.
    d0: usize,
}

impl BSource<f32> for GradOutputT<'_> {
    unsafe fn pack_block(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
        _staging: &mut Vec<f32>,
    ) {
        let (plane, k_all) = (self.g.out_plane(), self.g.out_channels);
        for q in 0..nc.div_ceil(nr) {
            let width = nr.min(nc - q * nr);
            let panel = &mut dst[q * kc * nr..][..kc * nr];
            let channel = self.channel0 + j0 + q * nr;
            let mut p = 0;
            while p < kc {
                let d = self.d0 + k0 + p;
                let (n, pixel) = (d / plane, d % plane);
                let len = (plane - pixel).min(kc - p);
                let src = &self.grad_output[(n * k_all + channel) * plane + pixel..];
                transpose(src, plane, width, len, &mut panel[p * nr..], nr);
                p += len;
            }
            if width < nr {
                for row in panel.chunks_exact_mut(nr) {
                    row[width..].fill(0.0);
                }
            }
        }
    }
}

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`.
fn transpose(src: &[f32], lds: usize, rows: usize, cols: usize, dst: &mut [f32], ldd: usize) {
    transpose_with(src, lds, rows, cols, dst, ldd, |x, v| *x = v);
}

/// `dst[c·ldd + r] ⊕= src[r·lds + c]` for `r < rows`, `c < cols`, with
/// `⊕=` being `store`: in 8×8 tiles of fixed size (a few shuffles each,
/// every row of the source and of the destination read or written as 8
/// contiguous floats) and element loops at the edges.
#[inline(always)]
fn transpose_with(
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
    store: impl Fn(&mut f32, f32) + Copy,
) {
    const T: usize = 8;
    if rows == 0 || cols == 0 {
        return;
    }
    let (rows_full, cols_full) = (rows / T * T, cols / T * T);
    let src = &src[..(rows - 1) * lds + cols];
    let dst = &mut dst[..(cols - 1) * ldd + rows];
    for r0 in (0..rows_full).step_by(T) {
        for c0 in (0..cols_full).step_by(T) {
            let tile: [[f32; T]; T] = std::array::from_fn(|i| {
                src[(r0 + i) * lds + c0..][..T]
                    .try_into()
                    .expect("T floats")
            });
            for j in 0..T {
                let out: &mut [f32; T] = (&mut dst[(c0 + j) * ldd + r0..][..T])
                    .try_into()
                    .expect("T floats");
                let column: [f32; T] = std::array::from_fn(|i| tile[i][j]);
                for (x, v) in out.iter_mut().zip(column) {
                    store(x, v);
                }
            }
        }
        for c in cols_full..cols {
            for i in 0..T {
                store(&mut dst[c * ldd + r0 + i], src[(r0 + i) * lds + c]);
            }
        }
    }
    for r in rows_full..rows {
        for c in 0..cols {
            store(&mut dst[c * ldd + r], src[r * lds + c]);
        }
    }
}

/// How the work is cut: tap blocks (rows of C), channel blocks (columns
/// of C) and depth chunks (the GEMM's depth per call).
struct Blocks {
    mr: usize,
    tap_blocks: usize,
    channel_blocks: usize,
    /// Depth of one chunk (the last may be shorter).
    chunk: usize,
    /// Row stride of the column chunk.
    ld: usize,
    max_taps: usize,
    max_channels: usize,
}

/// The `part`-th of `parts` contiguous ranges of `0..len`, cut on
/// multiples of `unit`, as even as that allows.
fn split(len: usize, unit: usize, parts: usize, part: usize) -> (usize, usize) {
    let units = len.div_ceil(unit);
    let (base, extra) = (units / parts, units % parts);
    let start = part * base + part.min(extra);
    let count = base + usize::from(part < extra);
    ((start * unit).min(len), ((start + count) * unit).min(len))
}

fn taps_as_rows(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
) -> Result<(), ConvError> {
    let (kg, kk) = (g.out_channels_per_group(), g.gemm_k());
    let depth = g.batch * g.out_plane();
    let info = select_kernel(options.isa, kk, kg, false, options.blocking);
    let (mr, nr) = (info.mr, info.nr);
    // Threads: each owns whole blocks of dW, so the reduction over the batch
    // is never split and its order is the same for every thread count.
    let fmas = (g.groups * kg * kk) as u64 * depth as u64;
    let threads = options
        .parallelism
        .max_threads()
        .min(usize::try_from(fmas >> 19).unwrap_or(usize::MAX).max(1));
    let mut tap_blocks = kk.div_ceil(info.mc);
    let channel_blocks = kg.div_ceil(info.nc);
    let tap_units = kk.div_ceil(mr);
    if threads > 1 {
        let tasks = |tb: usize| g.groups * tb * channel_blocks;
        while tap_blocks < tap_units
            && (tasks(tap_blocks) < threads
                || (!tasks(tap_blocks).is_multiple_of(threads) && tasks(tap_blocks) < 4 * threads))
        {
            tap_blocks += 1;
        }
    }
    let chunks = depth.div_ceil(info.kc);
    let chunk = depth
        .div_ceil(chunks)
        .next_multiple_of(8)
        .min(info.kc.max(8));
    // Rows an odd number of cache lines apart, so that the rows of a chunk
    // spread over all of L2's sets.
    let mut ld = chunk.next_multiple_of(16);
    if (ld / 16).is_multiple_of(2) {
        ld += 16;
    }
    let blocks = Blocks {
        mr,
        tap_blocks,
        channel_blocks,
        chunk,
        ld,
        max_taps: split(kk, mr, tap_blocks, 0).1,
        max_channels: split(kg, nr, channel_blocks, 0).1,
    };
    let tasks = g.groups * tap_blocks * channel_blocks;
    let threads = threads.min(tasks);
    // Every buffer first, so that running out of memory writes nothing.
    let mut workspaces = (0..threads)
        .map(|_| Workspace::new(&blocks))
        .collect::<Result<Vec<_>, _>>()?;
    let dw = StridedC {
        ptr: grad_weight.as_mut_ptr(),
        rs: kk as isize,
        cs: 1,
    };
    let ctx = Context {
        g,
        input,
        grad_output,
        blocks: &blocks,
        options,
    };
    let run = |t: usize, ws: &mut Workspace| {
        let (lo, hi) = split(tasks, 1, threads, t);
        for task in lo..hi {
            // SAFETY: tasks write disjoint blocks of `grad_weight`, which is
            // exclusively borrowed for the whole call.
            unsafe { ctx.run(task, ws, dw) };
        }
    };
    if threads == 1 {
        run(0, &mut workspaces[0]);
    } else {
        workspaces
            .par_iter_mut()
            .with_max_len(1)
            .enumerate()
            .for_each(|(t, ws)| run(t, ws));
    }
    Ok(())
}

/// One thread's buffers: the column chunk (`max_taps × ld`), C
/// (`max_taps × max_channels`) and the GEMM's packing buffers.
struct Workspace {
    col: Vec<f32>,
    c: Vec<f32>,
    pack: PackBuffers<f32>,
}

impl Workspace {
    fn new(b: &Blocks) -> Result<Self, ConvError> {
        let mut col = try_with_capacity("grad weight column chunk", b.max_taps * b.ld)?;
        col.resize(b.max_taps * b.ld, 0.0);
        let mut c = try_with_capacity("grad weight block", b.max_taps * b.max_channels)?;
        c.resize(b.max_taps * b.max_channels, 0.0);
        Ok(Workspace {
            col,
            c,
            pack: PackBuffers::default(),
        })
    }
}

struct Context<'a> {
    g: &'a ConvGeometry,
    input: &'a [f32],
    grad_output: &'a [f32],
    blocks: &'a Blocks,
    options: &'a BackwardOptions,
}

impl Context<'_> {
    /// Task `task`: one block of taps × output channels of one group,
    /// summed over the whole depth in chunk order, then stored into dW.
    ///
    /// # Safety
    /// `dw` is the whole `grad_weight`, valid for reads and writes, and no
    /// other thread touches this task's block meanwhile.
    unsafe fn run(&self, task: usize, ws: &mut Workspace, dw: StridedC<f32>) {
        let g = self.g;
        let b = self.blocks;
        let (cg, kg, kk, plane) = (
            g.channels_per_group(),
            g.out_channels_per_group(),
            g.gemm_k(),
            g.out_plane(),
        );
        let depth = g.batch * plane;
        let grp = task / (b.tap_blocks * b.channel_blocks);
        let rest = task % (b.tap_blocks * b.channel_blocks);
        let (t0, t1) = split(kk, b.mr, b.tap_blocks, rest / b.channel_blocks);
        let (c0, c1) = split(kg, 1, b.channel_blocks, rest % b.channel_blocks);
        let (mt, nk) = (t1 - t0, c1 - c0);
        if mt == 0 || nk == 0 {
            return;
        }
        let gemm_opts = GemmOptions {
            backend: self.options.backend,
            parallelism: Parallelism::Sequential,
            isa: self.options.isa,
            blocking: self.options.blocking,
        };
        let first_tap = ColumnTap::of_row(g, t0);
        for (i, d0) in (0..depth).step_by(b.chunk).enumerate() {
            let d1 = (d0 + b.chunk).min(depth);
            // The column chunk: taps t0..t1 × depths d0..d1, image by image.
            let mut d = d0;
            while d < d1 {
                let (n, p0) = (d / plane, d % plane);
                let p1 = plane.min(p0 + d1 - d);
                let image = &self.input[(n * g.in_channels + grp * cg) * g.in_plane()..]
                    [..cg * g.in_plane()];
                im2col_rows(g, image, first_tap, p0..p1, b.ld, mt, &mut ws.col[d - d0..]);
                d += p1 - p0;
            }
            let a = ASource::Strided(StridedMatrix {
                ptr: ws.col.as_ptr(),
                rs: b.ld as isize,
                cs: 1,
            });
            let bsrc = GradOutputT {
                g,
                grad_output: self.grad_output,
                channel0: grp * kg + c0,
                d0,
            };
            let c = StridedC {
                ptr: ws.c.as_mut_ptr(),
                rs: nk as isize,
                cs: 1,
            };
            let beta = if i == 0 { 0.0 } else { 1.0 };
            // SAFETY: A is the mt × (d1 − d0) column chunk just built (rows
            // ld apart), B the (d1 − d0) × nk view of `grad_output`, C the
            // mt × nk block of `ws.c`, ours alone; with β = 0 C is not read.
            unsafe {
                gemm_with_epilogue(
                    mt,
                    d1 - d0,
                    nk,
                    1.0,
                    &a,
                    &bsrc,
                    beta,
                    c,
                    &Epilogue::NONE,
                    &gemm_opts,
                    Some(&mut ws.pack),
                )
            };
        }
        // dW[grp·kg + c0 + j][t0 + i] (+)= C[i][j], eight rows of dW at a
        // time.
        for j0 in (0..nk).step_by(8) {
            let w = (nk - j0).min(8);
            let mut rows: [&mut [f32]; 8] = Default::default();
            for (j, row) in rows.iter_mut().enumerate().take(w) {
                let first = (grp * kg + c0 + j0 + j) * kk + t0;
                // SAFETY: row `grp·kg + c0 + j0 + j`, columns t0..t1 of dW:
                // inside it, this task's alone (see the contract), and one
                // slice per row.
                *row = unsafe { std::slice::from_raw_parts_mut(dw.ptr.add(first), mt) };
            }
            let src = &ws.c[j0..];
            if self.options.accumulate {
                store_columns(src, nk, mt, &mut rows[..w], |x, v| *x += v);
            } else {
                store_columns(src, nk, mt, &mut rows[..w], |x, v| *x = v);
            }
        }
    }
}

/// `rows[j][i] ⊕= src[i·lds + j]` for `i < len`, `j < rows.len() ≤ 8`,
/// with `⊕=` being `store`: 8×8 tiles where there are 8 rows, element
/// loops elsewhere.
#[inline(always)]
fn store_columns(
    src: &[f32],
    lds: usize,
    len: usize,
    rows: &mut [&mut [f32]],
    store: impl Fn(&mut f32, f32) + Copy,
) {
    const T: usize = 8;
    let full = if rows.len() == T { len / T * T } else { 0 };
    for i0 in (0..full).step_by(T) {
        let tile: [[f32; T]; T] =
            std::array::from_fn(|i| src[(i0 + i) * lds..][..T].try_into().expect("T floats"));
        for (j, row) in rows.iter_mut().enumerate() {
            let out: &mut [f32; T] = (&mut row[i0..i0 + T]).try_into().expect("T floats");
            let column: [f32; T] = std::array::from_fn(|i| tile[i][j]);
            for (x, v) in out.iter_mut().zip(column) {
                store(x, v);
            }
        }
    }
    for (j, row) in rows.iter_mut().enumerate() {
        for i in full..len {
            store(&mut row[i], src[i * lds + j]);
        }
    }
}
