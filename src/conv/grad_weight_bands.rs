//! Grad weight with no column matrix at all: `dWᵀ` tap by tap, each tap's
//! rows of A read in place from a zero-padded copy of a band of input rows.
//!
//! The column chunk of `grad_weight.rs` (`col · dYᵀ`) is `R·S` shifted
//! copies of the input: on the 56² layers building it took 17–24% of the
//! pass (1 thread AVX-512, Zen 5: r50_3x3 229 of 1364 µs, r50_3x3_s2 393
//! of 1643 µs, dilated 314 of 1516 µs, batch16 802 of 3906 µs). Here the
//! copy is made once, not `R·S` times:
//!
//! * The depth of the sum runs over a **padded output grid**: output row
//!   `oh` covers `W_q = OW + ⌊(S−1)·d_w/σ_w⌋` positions, the last
//!   `W_q − OW` of them junk, whose rows of `dYᵀ` are zeros.
//! * The input, zero-padded, is split into its `σ_h` **row phases** (rows
//!   `≡ φ_h` modulo the vertical stride), each band row `σ_w·W_q` floats:
//!   the padded input row from its left padding on, columns kept in place.
//!   Tap `(r, s)` of channel `c` then reads, for depth `oh·W_q + ow`, the
//!   row phase `(r'·d_h) mod σ_h` at row `oh + ⌊r'·d_h/σ_h⌋`, column
//!   `σ_w·ow + s'·d_w` (`(r', s')` the window offset the mode pairs with
//!   the tap): every `σ_w`-th float of one run of the band for the whole
//!   chunk, junk included. So each tap's rows of A are the band's channel
//!   rows from a fixed offset, a constant stride apart, with a column
//!   stride of `σ_w`: an operand the GEMM reads in place. (Splitting the
//!   columns into phases as well, as this did first, made every stride-2
//!   band a de-interleaving pass that ran a float at a time: 108–148 µs of
//!   r50_3x3_s2's call, against a plain copy per row now.)
//! * Per chunk of output rows (about KC deep, inside one image) the band
//!   of those rows (plus the `⌊(R−1)·d_h/σ_h⌋` rows below them) is built
//!   once, `dYᵀ` is transposed into a row-major `depth × K` block the GEMM
//!   reads in place as B, and one GEMM per tap accumulates
//!   `dWᵀ[(c, tap), k]` for the task's channels.
//!
//! The price is the junk: `W_q/OW − 1` more FLOPs (3.6% on 56² planes at
//! 3×3, 7% at dilation 2, 6% on 32² planes), so shapes where it exceeds
//! 1/8 keep the column chunk, as do kernel tiles whose B rows are narrower
//! than a pair of cache lines (AVX2, portable: [`bands_pay_on`]), groups
//! of fewer than 16 input channels
//! (each tap's GEMM would have too few rows for the tile), 1×1 kernels (their
//! column chunk is a single copy already, or none: 1×1/2 from 256 to 512
//! channels on 56² ran 179 → 168 GFLOP/s on bands) and inputs whose band
//! holds an infinity or a NaN (a junk position multiplies an input value by
//! a zero, which would turn into NaN a tap that never reads that value):
//! the bands are checked as they are built, and dW is written only after
//! every task has finished, so such a call falls back with nothing written.
//!
//! Measured (1 thread AVX-512, Zen 5, shared machine, one process, the two
//! paths alternating, median of 11, GFLOP/s on the forward's FLOPs), after
//! the stride-2 bands were de-interleaved in one pass and `dYᵀ`'s rows
//! spaced an odd number of lines:
//!
//! | layer (N×C×H² → K)              | column chunk | bands |
//! |---------------------------------|--------------|-------|
//! | r50_3x3 1×64×56² → 64           | 197          | 208   |
//! | r50_3x3_s2 1×128×56² → 128, /2  | 184          | 187   |
//! | dilated 1×64×56² → 64, d2       | 196          | 201   |
//! | batch16 16×32×32² → 64          | 182          | 194   |
//! | 8×64×28² → 64                   | 178          | 196   |
//!
//! With row phases only (columns in place, read σ_w apart) and the faster
//! band building, one run of 5 alternating rounds on a noisier machine
//! (medians, same units; single rounds moved ±15%): r50_3x3 139 → 166,
//! r50_3x3_s2 140 → 182, dilated 158 → 170, batch16 139 → 159, 8×64×28²
//! 134 → 175 (column chunk → bands).
//!
//! A band must fit L2, which every tap's GEMM reads it from: 256 → 512
//! channels at stride 2 on 56² (a 1.8 MB band) ran 172 on bands against
//! 187 on the column chunk, and keeps the column chunk.
//!
//! `CPUCONV_GW_NO_BANDS` (any value, read at each call) sends every call to
//! the column chunk, for measuring one against the other in one process.
//!
//! **Order of the sum.** Every element of dW is summed chunk after chunk in
//! depth order, each GEMM's depth in order, and the threads split only the
//! channels and the taps of dW, never the depth. The block of output
//! channels each GEMM sees (its columns) is fixed by the shape; the rows
//! (channels) and the taps each task owns change with the thread count,
//! which changes no element's arithmetic. So results are bitwise identical
//! across runs and thread counts.
//!
//! **Workspace.** Per thread: the band of its channels (per row phase and
//! channel, about KC/W_q + R rows of `σ_w·W_q` floats), the block
//! of `dYᵀ` (`KC × min(K/g, NC)`), its block of dWᵀ and the GEMM's packing
//! buffers: bounded by the width of the image, never its height or the
//! batch.

use super::grad_weight::{grow, odd_lines, on_each_thread, split, with_pooled};
use super::scratch::{line_offset, LINE_FLOATS};
use super::BackwardOptions;
use crate::error::ConvError;
use crate::gemm::engine::{
    gemm_with_epilogue, select_kernel, ASource, Epilogue, KernelInfo, PackBuffers, StridedC,
    StridedMatrix, B_ROW_ALIGN,
};
use crate::gemm::transpose::{store_columns, transpose};
use crate::gemm::{GemmBackend, Parallelism};
use crate::geometry::ConvGeometry;
use std::cell::RefCell;

/// How a call is cut into chunks and laid out in bands.
#[derive(Clone, Debug)]
pub(crate) struct Bands {
    /// `W_q`: positions per output row in the depth, `OW` of them real.
    wq: usize,
    /// Phase rows a band holds beyond its chunk's output rows.
    halo: usize,
    /// Output rows per chunk (the last of an image may have fewer).
    rows: usize,
    /// Floats per band row: `σ_w·W_q`, the padded input row's columns
    /// from the left padding on, kept interleaved.
    pitch: usize,
    /// The row phases taps read, `φ_h`, in band order.
    phases: Vec<usize>,
    /// Per tap `r·S + s`: its phase's index in `phases` and its offset
    /// (phase rows · pitch + input columns) in the band.
    taps: Vec<(usize, usize)>,
    /// Floats between two channels of one phase in a band: room for the
    /// chunk's rows, the halo and one more row read past the end by the
    /// last taps' junk, an odd number of cache lines.
    channel_stride: usize,
    /// Output channels per GEMM (columns of C), fixed by the shape.
    k_block: usize,
}

/// Whether the bands beat the column chunk on a kernel with this register
/// tile: where a row of its B micro-panel (`NR` floats of `dYᵀ`, which the
/// bands' GEMMs read in place) is a whole pair of cache lines
/// (`B_ROW_ALIGN`, 128 bytes).
/// AVX-512's 32-float rows take the bands (the module doc's table, Zen 5); AVX2's
/// 16 and the portable path's 8 keep the column chunk, measured on Zen 3
/// (1 thread, GFLOP/s, five rounds of the same binary alternating with
/// `CPUCONV_GW_NO_BANDS`, medians, bands → column chunk): r50_3x3 63–70 →
/// 74–78, batch16 55–58 → 67–74, r50_3x3_s2 75 → 77, dilated 73 → 77,
/// 8×64×28² → 64 62 → 70, 128 → 128 on 28² 65 → 78, 32 → 32 on 112² 52
/// → 71; at 2 threads 1.03–1.33× in the same direction. The portable
/// path, forced, moved 0.85–1.43× across those layers, within its noise.
/// Why narrower rows lose is not established: packing `dYᵀ` into panels
/// for each tap's GEMM inside the bands measured within noise (0.94–1.21×).
fn bands_pay_on(info: &KernelInfo) -> bool {
    info.nr * std::mem::size_of::<f32>() >= B_ROW_ALIGN
}

impl Bands {
    /// The layout for `g` on a kernel with register tile `mr` and blocking
    /// `kc`/`nc`, or `None` where the column chunk serves `g` better (see
    /// the module doc).
    pub(crate) fn for_geometry(g: &ConvGeometry, mr: usize, kc: usize, nc: usize) -> Option<Bands> {
        if g.kernel_h * g.kernel_w == 1 || g.channels_per_group() < 16.max(2 * mr) {
            return None;
        }
        let (sh, sw) = (g.stride_h, g.stride_w);
        let halo = (g.kernel_h - 1) * g.dilation_h / sh;
        let wq = g.out_w + (g.kernel_w - 1) * g.dilation_w / sw;
        // Junk at most 1/8 of the depth.
        if wq * 8 > g.out_w * 9 {
            return None;
        }
        let chunks = g.out_h.div_ceil((kc / wq).max(1));
        let rows = g.out_h.div_ceil(chunks);
        let pitch = sw * wq;
        let mut phases = Vec::new();
        let mut taps = Vec::with_capacity(g.kernel_h * g.kernel_w);
        for r in 0..g.kernel_h {
            for s in 0..g.kernel_w {
                let (ro, so) = g.weight_tap(r, s);
                let (y, x) = (ro * g.dilation_h, so * g.dilation_w);
                let index = match phases.iter().position(|&p| p == y % sh) {
                    Some(i) => i,
                    None => {
                        phases.push(y % sh);
                        phases.len() - 1
                    }
                };
                taps.push((index, (y / sh) * pitch + x));
            }
        }
        let channel_stride = odd_lines((rows + halo + 1) * pitch);
        // The band of a whole group must fit L2 (see the module doc).
        let band_bytes = (phases.len() * g.channels_per_group())
            .saturating_mul(channel_stride)
            .saturating_mul(std::mem::size_of::<f32>());
        if band_bytes > crate::gemm::cache::cache_hierarchy().l2.per_core() {
            return None;
        }
        let kg = g.out_channels_per_group();
        let k_block = kg.div_ceil(kg.div_ceil(nc.max(1)));
        Some(Bands {
            wq,
            halo,
            rows,
            pitch,
            phases,
            taps,
            channel_stride,
            k_block,
        })
    }

    /// Floats of the band of `channels` channels.
    fn band_len(&self, channels: usize) -> usize {
        self.phases.len() * channels * self.channel_stride
    }
}

/// `grad_weight` by bands, when [`Bands::for_geometry`] takes `g` and the
/// input is finite; `Ok(false)` (nothing written) otherwise, also where a band holds an infinity or a NaN, for the
/// caller's column-chunk path. Lengths are checked by the caller.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the per-thread buffers cannot be
/// allocated; `grad_weight` is then as it was.
pub(crate) fn backward_weight_bands(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
) -> Result<bool, ConvError> {
    if options.backend != GemmBackend::Native || std::env::var_os("CPUCONV_GW_NO_BANDS").is_some() {
        return Ok(false);
    }
    let (cg, kg, taps) = (
        g.channels_per_group(),
        g.out_channels_per_group(),
        g.kernel_h * g.kernel_w,
    );
    let info = select_kernel(options.isa, cg, kg, false, options.blocking);
    if !options.force_bands && !bands_pay_on(&info) {
        return Ok(false);
    }
    let Some(bands) = Bands::for_geometry(g, info.mr, info.kc, info.nc) else {
        return Ok(false);
    };
    let k_blocks = kg.div_ceil(bands.k_block);
    let units = g.groups * k_blocks;
    // Threads: each owns channels × taps of whole dW blocks; channels are
    // split first (in MR multiples, at least two panels each), then taps.
    let fmas = (g.groups * kg * cg * taps) as u64 * (g.batch * g.out_plane()) as u64;
    let threads = options
        .parallelism
        .max_threads()
        .min(usize::try_from(fmas >> 19).unwrap_or(usize::MAX).max(1));
    let mut channel_parts = 1;
    let mut tap_parts = 1;
    let panels = cg.div_ceil(info.mr);
    while units * channel_parts * tap_parts < threads {
        if channel_parts * 2 * 2 <= panels {
            channel_parts *= 2;
        } else if tap_parts < taps {
            tap_parts += 1;
        } else {
            break;
        }
    }
    let tasks = units * channel_parts * tap_parts;
    let threads = threads.min(tasks);
    let max_channels = split(cg, info.mr, channel_parts, 0).1;
    let max_taps = split(taps, 1, tap_parts, 0).1;
    let task_c = max_channels * max_taps * bands.k_block;
    let sizes = Sizes {
        band: bands.band_len(max_channels),
        // Room to start the block on a cache line (see `Context::run`).
        bt: bands.rows * bands.wq * odd_lines(bands.k_block) + LINE_FLOATS,
        c: task_c * split(tasks, 1, threads, 0).1,
    };
    let ctx = Context {
        g,
        input,
        grad_output,
        bands: &bands,
        options,
        k_blocks,
        channel_parts,
        tap_parts,
        mr: info.mr,
    };
    let dw = StridedC {
        ptr: grad_weight.as_mut_ptr(),
        rs: 0,
        cs: 1,
    };
    let finite = with_pooled(
        &POOL,
        threads,
        |ws| ws.reserve(&sizes),
        |workspaces| {
            // Every task's block of dWᵀ first, then (when every band was
            // finite) the stores: dW is written only once nothing can fail.
            let finite = on_each_thread(workspaces, |t, ws| {
                let (lo, hi) = split(tasks, 1, threads, t);
                let mut finite = true;
                for task in lo..hi {
                    let Workspace { band, bt, c, pack } = ws;
                    // dYᵀ's block starts on a cache line: its rows are a
                    // whole number of lines apart, so each then starts on
                    // one and no vector load the GEMM makes of it (read in
                    // place) splits across two lines. A fresh `Vec` of
                    // this size starts 16 bytes past a page: r50_3x3 and
                    // batch16 ran 15–20% slower so (see the commit).
                    let start = line_offset(bt);
                    let bt = &mut bt[start..];
                    let c = &mut c[(task - lo) * task_c..][..task_c];
                    finite &= ctx.run(task, band, bt, c, pack);
                }
                finite
            });
            finite
                && on_each_thread(workspaces, |t, ws| {
                    let (lo, hi) = split(tasks, 1, threads, t);
                    for task in lo..hi {
                        // SAFETY: tasks store disjoint elements of
                        // `grad_weight`, which is exclusively borrowed for the
                        // whole call.
                        unsafe { ctx.store(task, &ws.c[(task - lo) * task_c..][..task_c], dw) };
                    }
                    true
                })
        },
    )?;
    if finite {
        crate::testing::record_grad_weight_bands();
    }
    Ok(finite)
}

/// Floats each thread's buffers need.
struct Sizes {
    band: usize,
    bt: usize,
    c: usize,
}

/// One thread's buffers: the band, the block of `dYᵀ`, its block of `dWᵀ`
/// and the GEMM's packing buffers.
#[derive(Default)]
struct Workspace {
    band: Vec<f32>,
    bt: Vec<f32>,
    c: Vec<f32>,
    pack: PackBuffers<f32>,
}

impl Workspace {
    fn reserve(&mut self, s: &Sizes) -> Result<(), ConvError> {
        grow(&mut self.band, "grad weight band", s.band)?;
        grow(&mut self.bt, "grad weight output block", s.bt)?;
        grow(&mut self.c, "grad weight block", s.c)
    }
}

thread_local! {
    /// The workspaces of the last call made on this thread, kept for the
    /// next one.
    static POOL: RefCell<Vec<Workspace>> = const { RefCell::new(Vec::new()) };
}

/// What one task owns: group `grp`, input channels `c0..c0 + mc` of it,
/// taps `t0..t0 + mt`, its output channels `k0..k0 + nk`.
struct Task {
    grp: usize,
    c0: usize,
    mc: usize,
    t0: usize,
    mt: usize,
    k0: usize,
    nk: usize,
}

struct Context<'a> {
    g: &'a ConvGeometry,
    input: &'a [f32],
    grad_output: &'a [f32],
    bands: &'a Bands,
    options: &'a BackwardOptions,
    k_blocks: usize,
    channel_parts: usize,
    tap_parts: usize,
    mr: usize,
}

impl Context<'_> {
    /// The input channels c0..c1, taps t0..t1 and output channels of one k
    /// block of one group that task `task` owns.
    fn task(&self, task: usize) -> Task {
        let g = self.g;
        let taps = g.kernel_h * g.kernel_w;
        let tap_part = task % self.tap_parts;
        let rest = task / self.tap_parts;
        let channel_part = rest % self.channel_parts;
        let rest = rest / self.channel_parts;
        let (kb, grp) = (rest % self.k_blocks, rest / self.k_blocks);
        let (c0, c1) = split(
            g.channels_per_group(),
            self.mr,
            self.channel_parts,
            channel_part,
        );
        let (t0, t1) = split(taps, 1, self.tap_parts, tap_part);
        let (k0, k1) = split(
            g.out_channels_per_group(),
            self.bands.k_block,
            self.k_blocks,
            kb,
        );
        Task {
            grp,
            c0,
            mc: c1 - c0,
            t0,
            mt: t1 - t0,
            k0,
            nk: k1 - k0,
        }
    }

    /// Task `task`'s block of dWᵀ (`C[c·mt + i][j]` for its channel c, tap
    /// t0 + i and output channel k0 + j) into `c`, summed over the whole
    /// depth in chunk order. Returns whether every band was finite (if not,
    /// `c` is not the gradient).
    fn run(
        &self,
        task: usize,
        band: &mut [f32],
        bt: &mut [f32],
        c: &mut [f32],
        pack: &mut PackBuffers<f32>,
    ) -> bool {
        let (g, b) = (self.g, self.bands);
        let t = self.task(task);
        if t.mc == 0 || t.mt == 0 || t.nk == 0 {
            return true;
        }
        let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
        let gemm_opts = self.options.gemm_options(Parallelism::Sequential);
        let band = &mut band[..b.band_len(t.mc)];
        let mut first = true;
        for n in 0..g.batch {
            let image = &self.input[(n * g.in_channels + t.grp * cg + t.c0) * g.in_plane()..]
                [..t.mc * g.in_plane()];
            for oh0 in (0..g.out_h).step_by(b.rows) {
                let rows = b.rows.min(g.out_h - oh0);
                let depth = rows * b.wq;
                if !self.fill_band(image, t.mc, oh0, rows, band) {
                    return false;
                }
                let ldb = odd_lines(t.nk);
                self.fill_grad_output_t(n, t.grp * kg + t.k0, t.nk, oh0, rows, ldb, bt);
                let bsrc = StridedMatrix {
                    ptr: bt.as_ptr(),
                    rs: ldb as isize,
                    cs: 1,
                };
                let beta = if first { 0.0 } else { 1.0 };
                for (i, &(phase, offset)) in b.taps[t.t0..t.t0 + t.mt].iter().enumerate() {
                    let a = ASource::Strided(StridedMatrix {
                        ptr: band[phase * t.mc * b.channel_stride + offset..].as_ptr(),
                        rs: b.channel_stride as isize,
                        cs: g.stride_w as isize,
                    });
                    let cm = StridedC {
                        ptr: c[i * t.nk..].as_mut_ptr(),
                        rs: (t.mt * t.nk) as isize,
                        cs: 1,
                    };
                    // SAFETY: A is this tap's mc channel rows of the band,
                    // `channel_stride` apart, each read at `depth` floats
                    // σ_w apart from `offset`: at most the halo's rows, the
                    // chunk's and one more, which the stride holds; B the depth × nk
                    // block of dYᵀ just built; C rows i, i + mt, … of this
                    // task's block `c` (mc·mt × nk), ours alone; with β = 0
                    // C is not read.
                    unsafe {
                        gemm_with_epilogue(
                            t.mc,
                            depth,
                            t.nk,
                            1.0,
                            &a,
                            &bsrc,
                            beta,
                            cm,
                            &Epilogue::NONE,
                            &gemm_opts,
                            Some(pack),
                        )
                    };
                }
                first = false;
            }
        }
        true
    }

    /// Stores task `task`'s block `c` (from [`Context::run`]) into dW:
    /// `dW[grp·kg + k0 + j][(c0 + c)·R·S + t0 + i] (+)= C[c·mt + i][j]`,
    /// four rows of dW at a time; whole taps are one run per row.
    ///
    /// # Safety
    /// `dw.ptr` is the whole `grad_weight`, valid for reads and writes, and
    /// no other thread touches this task's elements meanwhile.
    unsafe fn store(&self, task: usize, c: &[f32], dw: StridedC<f32>) {
        let g = self.g;
        let t = self.task(task);
        let (kg, kk, taps) = (
            g.out_channels_per_group(),
            g.gemm_k(),
            g.kernel_h * g.kernel_w,
        );
        let (runs, run_len) = if t.mt == taps {
            (1, t.mc * t.mt)
        } else {
            (t.mc, t.mt)
        };
        for j0 in (0..t.nk).step_by(4) {
            let w = (t.nk - j0).min(4);
            for run in 0..runs {
                let mut rows: [&mut [f32]; 4] = Default::default();
                for (j, row) in rows.iter_mut().enumerate().take(w) {
                    let first = (t.grp * kg + t.k0 + j0 + j) * kk + (t.c0 + run) * taps + t.t0;
                    // SAFETY: `run_len` elements of row grp·kg + k0 + j0 + j
                    // of dW, this task's alone (see the contract), one slice
                    // per row.
                    *row = unsafe { std::slice::from_raw_parts_mut(dw.ptr.add(first), run_len) };
                }
                let src = &c[run * run_len * t.nk + j0..];
                if self.options.accumulate {
                    store_columns(src, t.nk, run_len, &mut rows[..w], |x, v| *x += v);
                } else {
                    store_columns(src, t.nk, run_len, &mut rows[..w], |x, v| *x = v);
                }
            }
        }
    }

    /// The band of output rows `oh0..oh0 + rows` for the `channels` input
    /// planes `image`: per row phase and channel, `rows + halo` rows of
    /// `pitch` floats, zero where the padded input is padding.
    /// Returns whether every value written is finite (the junk multiplies
    /// some of them by zero).
    fn fill_band(
        &self,
        image: &[f32],
        channels: usize,
        oh0: usize,
        rows: usize,
        band: &mut [f32],
    ) -> bool {
        let (g, b) = (self.g, self.bands);
        let (pt, pl) = (g.padding.top as isize, g.padding.left as isize);
        let width = (rows + b.halo) * b.pitch;
        // Every row of the band has the same columns inside the input: one
        // range for all of them, and per row a copy between two zero fills
        // (with the range worked out per row, r50_3x3's bands took 1.2–1.7×
        // as long, in isolation).
        let (j_lo, j_hi) = super::im2col::valid_range(b.pitch, 1, -pl, g.in_w);
        let x0 = (j_lo as isize - pl) as usize;
        for (pi, &ph) in b.phases.iter().enumerate() {
            for c in 0..channels {
                let plane = &image[c * g.in_plane()..][..g.in_plane()];
                let dst = &mut band[(pi * channels + c) * b.channel_stride..][..width];
                for (i, out) in dst.chunks_exact_mut(b.pitch).enumerate() {
                    let y = ((oh0 + i) * g.stride_h + ph) as isize - pt;
                    if y < 0 || y >= g.in_h as isize || j_lo >= j_hi {
                        out.fill(0.0);
                        continue;
                    }
                    out[..j_lo].fill(0.0);
                    out[j_lo..j_hi]
                        .copy_from_slice(&plane[y as usize * g.in_w + x0..][..j_hi - j_lo]);
                    out[j_hi..].fill(0.0);
                }
                if !super::all_finite(dst) {
                    return false;
                }
            }
        }
        true
    }

    /// `dYᵀ` of image `n`, output channels `k0..k0 + nk`, output rows
    /// `oh0..oh0 + rows`, as a row-major `rows·W_q × nk` block with rows
    /// `ldb` apart, the junk positions' rows zero.
    #[allow(clippy::too_many_arguments)]
    fn fill_grad_output_t(
        &self,
        n: usize,
        k0: usize,
        nk: usize,
        oh0: usize,
        rows: usize,
        ldb: usize,
        bt: &mut [f32],
    ) {
        let (g, b) = (self.g, self.bands);
        let plane = g.out_plane();
        let dy = &self.grad_output[(n * g.out_channels + k0) * plane..][..nk * plane];
        for i in 0..rows {
            let dst = &mut bt[i * b.wq * ldb..][..b.wq * ldb];
            transpose(&dy[(oh0 + i) * g.out_w..], plane, nk, g.out_w, dst, ldb);
            for junk in dst[g.out_w * ldb..].chunks_exact_mut(ldb) {
                junk[..nk].fill(0.0);
            }
        }
    }
}
