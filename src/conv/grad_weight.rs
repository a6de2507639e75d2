//! Grad weight as an implicit GEMM
//! ([`Algorithm::Implicit`](super::Algorithm::Implicit)): per group,
//! `dW = dY · im2col(X)ᵀ`, summed over the batch, with no column matrix.
//! Two orientations, chosen by the depth of the sum, `N·OH·OW` (the shape
//! only, never the threads):
//!
//! * **Bands** (`grad_weight_bands.rs`, depth ≥ [`depth_for_taps_as_rows`],
//!   several taps, at least 16 input channels per group, a kernel tile of
//!   32 columns: AVX-512): `dWᵀ = col · dYᵀ`
//!   one tap at a time, A read in place from a padded copy of a band of
//!   input rows, so the input is copied once instead of once per tap.
//! * **`dWᵀ = col · dYᵀ`** (depth ≥ [`depth_for_taps_as_rows`]): the taps
//!   are C's rows. The depth is cut into chunks of KC (crossing images);
//!   per chunk, the column chunk of a block of taps (`≤ 4·MC × KC`) is
//!   built by the same row filler as the forward (`im2col_rows`: shifted
//!   copies, padding, stride, dilation, both modes) into a buffer the
//!   micro-kernels read in place (plain copies, no transpose), and B is
//!   `dYᵀ`, transposed into NR-wide panels by [`GradOutputT`] — the small
//!   operand, reused by every MR rows of taps. C is a per-thread
//!   `taps × channels` block (β = 0 on the first chunk, then 1), transposed
//!   into dW once at the end. An unpadded stride-1 1×1 kernel reads the
//!   input planes in place (its chunks stay inside one image).
//! * **`dW = dY · colᵀ`** per image (below that depth: 7² and 14² planes at
//!   batch 1): B is [`ColumnsT`], the transposed im2col view. At unit
//!   stride in width no tap row is built: the block's input channels are
//!   copied once into zero-padded planes (none where the image needs no
//!   padding), where a tap's pixels of one output row are one run, and the
//!   runs are transposed straight into the panels (`pack_from_padded_planes`;
//!   1 thread AVX-512 Zen 5, against building rows, binaries alternating,
//!   three rounds, GFLOP/s: r50_deep 188–198 → 221–225, 3×3 d2 on 256×14²
//!   177–181 → 211–218, 5×5 on 128×14² 157–165 → 186–208, 1×1 1024 → 256
//!   on 14² 179–181 → 214–217, r50_last1x1 198–200 → 207–209, 3×3 on
//!   512×7² 176–182 → 186–187). Otherwise tap rows are built `nr` taps × 64
//!   pixels at a time into L1-sized staging and transposed into the panels.
//!   C is dW itself, β = 1 after the first image. With so little depth
//!   the other orientation's transpose of C costs as much as the product.
//!
//! Transposes go through `wide`'s 4×4 `f32x4` transpose (SSE shuffles on
//! x86-64, NEON elsewhere), sixteen source columns at a time; the same
//! tiles written as element loops compiled to scalar moves through the
//! stack: `col · dYᵀ` measured 19–26% slower with them on the 56² layers.
//!
//! Measured, 1 thread AVX-512 (Zen 5, shared machine, one process,
//! candidates interleaved, median of 15; GFLOP/s on the forward's FLOPs),
//! the two orientations forced on every layer (before the last two tuning
//! steps, which moved `col · dYᵀ` only):
//!
//! | layer (N×C×H² → K)           | col · dYᵀ | dY · colᵀ |
//! |------------------------------|-----------|-----------|
//! | r50_conv1 1×3×224² → 64 7×7/2| 176       | 130       |
//! | r50_3x3 1×64×56² → 64        | 203       | 139       |
//! | r50_1x1 1×256×56² → 64       | 199       | 138       |
//! | r50_3x3_s2 1×128×56² → 128   | 188       | 156       |
//! | r50_deep 1×256×14² → 256     | 188       | 194       |
//! | 1×512×7² → 512 3×3           | 110       | 184       |
//! | r50_last1x1 1×512×7² → 2048  | 106       | 215       |
//! | dilated 1×64×56² → 64 d2     | 203       | 133       |
//! | batch16 16×32×32² → 64       | 183       | 134       |
//! | 16×64×28² → 64               | 174       | 127       |
//!
//! Against `Im2col` and the forward plan (Implicit) in the same runs, see
//! `tests/grad_weight.rs`'s `timing`; 1 thread AVX-512 the implicit pass
//! reaches 0.85× the forward on r50_conv1 and 0.93–0.98× on the other
//! layers (r50_1x1 0.97×, 7² layers at or above the forward), AVX2 0.93×
//! on r50_conv1 and 0.99–1.0× elsewhere.
//!
//! **Order of the sum.** Every element of dW is summed over the depth in
//! one fixed order (chunk after chunk, or image after image, each GEMM's
//! depth in order), and the threads split only dW (blocks of taps and
//! channels, or the GEMM's blocks of C), never the depth; the kernel and
//! the chunking depend on the shape, the ISA and the blocking, not on the
//! threads. So the result is bitwise identical from run to run *and*
//! across thread counts (tested for 1 against 2 threads).
//!
//! **Workspace.** Per thread: the column chunk (`≤ 4·MC × KC` floats,
//! none for a pointwise kernel), the C block (`≤ 4·MC × NC`) and the
//! GEMM's packing buffers (with, for [`ColumnsT`] at unit stride in width,
//! the padded planes of one B block's channels, never more floats than the
//! packed block), whatever the image size or batch; the first two
//! are asked for fallibly ([`ConvError::OutOfMemory`], nothing written)
//! and kept on the calling thread for its next call.
//!
//! **Matrixmultiply backend.** The GEMMs go through `gemm_with_epilogue`
//! like the native ones, and, as for the forward's implicit lowering, that
//! backend cannot read a view: it materialises B per GEMM call, a
//! `chunk × channels` block of dYᵀ (or, in the per-image orientation, the
//! `OH·OW × C/g·R·S` transposed column matrix of one image, below 512
//! rows), in its own infallible buffer.

use super::im2col::{im2col_rows, ColumnTap};
use super::{try_with_capacity, BackwardOptions};
use crate::error::ConvError;
use crate::gemm::engine::{
    gemm_with_epilogue, select_kernel, ASource, BSource, Epilogue, PackBuffers, StridedC,
    StridedMatrix,
};
use crate::gemm::transpose::{store_columns, transpose, transpose_rows_at};
use crate::gemm::Parallelism;
use crate::geometry::ConvGeometry;
use rayon::prelude::*;
use std::cell::RefCell;

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
    if g.batch * g.out_plane() < depth_for_taps_as_rows(g) {
        return by_images(g, input, grad_output, grad_weight, options, |image| {
            ColumnsT { g, image }
        });
    }
    if super::grad_weight_bands::backward_weight_bands(g, input, grad_output, grad_weight, options)?
    {
        return Ok(());
    }
    taps_as_rows(g, input, grad_output, grad_weight, options)
}

/// Tap blocks (rows of C) hold up to this many MC blocks: the GEMM then
/// packs each block of dYᵀ once for all of them. Measured against one MC
/// block (1 thread AVX-512, one process, alternating): r50_3x3 +5–9%,
/// r50_3x3_s2 +2–9%, dilated +5–9%, batch16 of 64 channels +4–9%.
const TAP_BLOCKS_OF_MC: usize = 4;

/// Below this depth (`N·OH·OW`) dW is computed image by image as
/// `dY · colᵀ`, otherwise as `col · dYᵀ` in chunks of the depth: 512 for a
/// pointwise kernel, 384 for a window. Measured (1 thread AVX-512, one
/// process, alternating, GFLOP/s `dY · colᵀ` → `col · dYᵀ` or bands):
/// 3×3 at depth 392–400 gained (2×256×14² → 256: 182 → 193; 8×512×7² →
/// 512: 165 → 178; 1×128×20² → 128: 154 → 183) and at 196 lost
/// (4×512×7²: 170 → 158); 1×1 lost at 392 and 294 (2×256×14² → 1024:
/// 219 → 192; 6×512×7² → 2048: 171 → 143).
fn depth_for_taps_as_rows(g: &ConvGeometry) -> usize {
    if g.kernel_h * g.kernel_w == 1 {
        512
    } else {
        384
    }
}

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
        if self.g.stride_w == 1 && self.padded_planes_len(j0, nc) <= kc * nc {
            self.pack_from_padded_planes(k0, kc, j0, nc, nr, dst, staging);
            return;
        }
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

impl ColumnsT<'_> {
    /// Floats of the zero-padded planes [`Self::pack_from_padded_planes`]
    /// builds for taps `j0..j0 + nc` at unit stride in width: it runs only
    /// where that is no more than the packed block itself, so the
    /// workspace stays bounded by the blocking (a large vertical stride
    /// could otherwise ask for most of a tall image).
    fn padded_planes_len(&self, j0: usize, nc: usize) -> usize {
        let g = self.g;
        if self.reads_image_in_place() {
            return 0;
        }
        let taps = g.kernel_h * g.kernel_w;
        let channels = (j0 + nc - 1) / taps + 1 - j0 / taps;
        let (hp, wp) = self.padded_plane();
        channels.saturating_mul(hp.saturating_mul(wp))
    }

    /// Whether the image needs no padding (and so no copy): its planes are
    /// the padded planes.
    fn reads_image_in_place(&self) -> bool {
        let g = self.g;
        let (hp, wp) = self.padded_plane();
        g.padding.top == 0 && g.padding.left == 0 && hp <= g.in_h && wp == g.in_w
    }

    /// Rows and columns of a padded plane: every input row and column some
    /// tap reads at unit stride in width, padding included.
    fn padded_plane(&self) -> (usize, usize) {
        let g = self.g;
        (
            (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1,
            g.out_w + (g.kernel_w - 1) * g.dilation_w,
        )
    }

    /// [`BSource::pack_block`] at unit stride in width, with no row filler:
    /// the input channels the block's taps read are copied once into
    /// zero-padded planes (in `staging`), on which tap `(c, r, s)` over one
    /// output row is a single run of `OW` floats, and the panels are those
    /// runs transposed, an output row at a time
    /// ([`transpose_rows_at`]). Safe code throughout: a block outside B or
    /// a `dst` too short panics rather than reading or writing past them.
    #[allow(clippy::too_many_arguments)]
    fn pack_from_padded_planes(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        nr: usize,
        dst: &mut [f32],
        staging: &mut Vec<f32>,
    ) {
        let g = self.g;
        let (taps, ow) = (g.kernel_h * g.kernel_w, g.out_w);
        let (c0, c1) = (j0 / taps, (j0 + nc - 1) / taps + 1);
        let (hp, wp) = self.padded_plane();
        let (top, left) = (g.padding.top, g.padding.left);
        // The image itself where it needs no padding, else padded copies.
        let (source, plane, first) = if self.reads_image_in_place() {
            (self.image, g.in_plane(), c0)
        } else {
            let plane = hp * wp;
            staging.clear();
            staging.resize((c1 - c0) * plane, 0.0);
            let run = g.in_w.min(wp.saturating_sub(left));
            for (c, padded) in (c0..c1).zip(staging.chunks_exact_mut(plane)) {
                let channel = &self.image[c * g.in_plane()..][..g.in_plane()];
                for (ih, row) in channel.chunks_exact(g.in_w).enumerate() {
                    let ph = ih + top;
                    if ph >= hp {
                        break;
                    }
                    padded[ph * wp + left..][..run].copy_from_slice(&row[..run]);
                }
            }
            (&staging[..], plane, 0)
        };
        // Consecutive output rows are one run where no column is skipped
        // between them (a 1×1 kernel at stride 1 without padding).
        let run_rows = if g.stride_h * wp == ow {
            usize::MAX
        } else {
            ow
        };
        let isa = crate::isa();
        let mut starts = Vec::with_capacity(nr);
        for q in 0..nc.div_ceil(nr) {
            let width = nr.min(nc - q * nr);
            let panel = &mut dst[q * kc * nr..][..kc * nr];
            // Where each tap's run for output row 0 starts.
            starts.clear();
            starts.extend((j0 + q * nr..j0 + q * nr + width).map(|j| {
                let (r, s) = ((j / g.kernel_w) % g.kernel_h, j % g.kernel_w);
                let (ro, so) = g.weight_tap(r, s);
                (j / taps - c0 + first) * plane + ro * g.dilation_h * wp + so * g.dilation_w
            }));
            // The block's pixels, an output row (or the part of one inside
            // the block) at a time.
            let mut p = k0;
            while p < k0 + kc {
                let (oh, owp) = (p / ow, p % ow);
                let len = run_rows.saturating_sub(owp).min(k0 + kc - p);
                // The runs of this output row, from the tap starts above.
                let shift = oh * g.stride_h * wp + owp;
                transpose_rows_at(
                    isa,
                    &source[shift..],
                    &starts,
                    len,
                    &mut panel[(p - k0) * nr..],
                    nr,
                );
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

/// `dW_g = Σ_n dY_{n,g} · B_{n,g}` image by image into each group's block
/// of `grad_weight` (β = 1 after the first image, or from the first with
/// `accumulate`), B being the `OH·OW × C/g·R·S` operand `columns` gives for
/// one image group (`[C/g, H, W]`): the transposed im2col view here, the
/// transpose of an explicit column matrix for `Algorithm::Im2col`
/// (`backward_weight_im2col`). The images run one after another, so the
/// sum has a fixed order whatever the threads: they work inside each GEMM.
pub(crate) fn by_images<'a, B: BSource<f32>>(
    g: &ConvGeometry,
    input: &'a [f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    options: &BackwardOptions,
    mut columns: impl FnMut(&'a [f32]) -> B,
) -> Result<(), ConvError> {
    let (cg, kg, kk, plane) = (
        g.channels_per_group(),
        g.out_channels_per_group(),
        g.gemm_k(),
        g.out_plane(),
    );
    let gemm_opts = options.gemm_options(options.parallelism);
    for grp in 0..g.groups {
        let dw = &mut grad_weight[grp * kg * kk..][..kg * kk];
        for n in 0..g.batch {
            let image =
                &input[(n * g.in_channels + grp * cg) * g.in_plane()..][..cg * g.in_plane()];
            let b = columns(image);
            let dy = &grad_output[(n * g.out_channels + grp * kg) * plane..][..kg * plane];
            let a = ASource::Strided(StridedMatrix {
                ptr: dy.as_ptr(),
                rs: plane as isize,
                cs: 1,
            });
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
            // `grad_output`, B the plane × kk operand `columns` gave for its
            // input channels (valid until the next call), C the group's
            // kg × kk block of `grad_weight`, exclusively borrowed; with
            // β = 0 C is not read.
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

/// How the work is cut: tap blocks (rows of C), channel blocks (columns
/// of C) and depth chunks (the GEMM's depth per call).
struct Blocks {
    mr: usize,
    /// The column chunk is the input itself (a pointwise convolution).
    in_place: bool,
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
pub(super) fn split(len: usize, unit: usize, parts: usize, part: usize) -> (usize, usize) {
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
    let mut tap_blocks = kk.div_ceil(TAP_BLOCKS_OF_MC * info.mc);
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
    // An unpadded stride-1 1×1 kernel reads the input planes in place, so
    // its chunks stay inside one image; other chunks cross images freely.
    let in_place = g.is_pointwise_identity();
    let span = if in_place { g.out_plane() } else { depth };
    let chunk = span
        .div_ceil(span.div_ceil(info.kc))
        .next_multiple_of(8)
        .min(info.kc.max(8));
    let ld = odd_lines(chunk);
    let blocks = Blocks {
        mr,
        in_place,
        tap_blocks,
        channel_blocks,
        chunk,
        ld,
        max_taps: split(kk, mr, tap_blocks, 0).1,
        max_channels: split(kg, nr, channel_blocks, 0).1,
    };
    let tasks = g.groups * tap_blocks * channel_blocks;
    let threads = threads.min(tasks);
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
    with_pooled(
        &POOL,
        threads,
        |ws| ws.reserve(&blocks),
        |workspaces| {
            on_each_thread(workspaces, |t, ws| {
                let (lo, hi) = split(tasks, 1, threads, t);
                for task in lo..hi {
                    // SAFETY: tasks write disjoint blocks of `grad_weight`, which
                    // is exclusively borrowed for the whole call.
                    unsafe { ctx.run(task, ws, dw) };
                }
                true
            })
        },
    )?;
    Ok(())
}

/// One thread's buffers: the column chunk (`max_taps × ld`), C
/// (`max_taps × max_channels`) and the GEMM's packing buffers.
#[derive(Default)]
struct Workspace {
    col: Vec<f32>,
    c: Vec<f32>,
    pack: PackBuffers<f32>,
}

thread_local! {
    /// The workspaces of the last call made on this thread, kept for the
    /// next one (one per thread it ran on; bounded by the blocking).
    static POOL: RefCell<Vec<Workspace>> = const { RefCell::new(Vec::new()) };
}

/// A row stride for rows of `n` floats read in place: whole cache lines,
/// an odd number of them, so that the rows of a block spread over every
/// set of L2 rather than crowding the few a power-of-two stride reaches.
pub(super) fn odd_lines(n: usize) -> usize {
    let ld = n.next_multiple_of(16);
    if (ld / 16).is_multiple_of(2) {
        ld + 16
    } else {
        ld
    }
}

/// Runs `f` on `threads` workspaces taken from the calling thread's `pool`
/// and given back to it after, so that calls after the first allocate
/// nothing and fault in no fresh pages; each is first made ready by
/// `reserve`, all of them before `f` runs, so that running out of memory
/// writes nothing (the error is returned, `f` never runs).
pub(super) fn with_pooled<W: Default, R>(
    pool: &'static std::thread::LocalKey<RefCell<Vec<W>>>,
    threads: usize,
    reserve: impl Fn(&mut W) -> Result<(), ConvError>,
    f: impl FnOnce(&mut [W]) -> R,
) -> Result<R, ConvError> {
    let mut workspaces = pool.with(|p| std::mem::take(&mut *p.borrow_mut()));
    workspaces.resize_with(workspaces.len().max(threads), W::default);
    let ready = workspaces[..threads].iter_mut().try_for_each(reserve);
    let result = ready.map(|()| f(&mut workspaces[..threads]));
    pool.with(|p| *p.borrow_mut() = workspaces);
    result
}

/// `run(t, workspace t)` for each thread `t`: on the calling thread alone
/// for one, otherwise one rayon task per workspace; whether every run
/// returned `true`.
pub(super) fn on_each_thread<W: Send>(
    workspaces: &mut [W],
    run: impl Fn(usize, &mut W) -> bool + Sync,
) -> bool {
    if let [one] = workspaces {
        return run(0, one);
    }
    workspaces
        .par_iter_mut()
        .with_max_len(1)
        .enumerate()
        .map(|(t, ws)| run(t, ws))
        .reduce(|| true, |a, b| a && b)
}

/// Makes `v` hold at least `len` floats, asking for new memory fallibly.
pub(super) fn grow(v: &mut Vec<f32>, what: &'static str, len: usize) -> Result<(), ConvError> {
    if v.len() < len {
        if v.capacity() < len {
            *v = try_with_capacity(what, len)?;
        }
        v.resize(len, 0.0);
    }
    Ok(())
}

impl Workspace {
    fn reserve(&mut self, b: &Blocks) -> Result<(), ConvError> {
        let col = if b.in_place { 0 } else { b.max_taps * b.ld };
        grow(&mut self.col, "grad weight column chunk", col)?;
        grow(
            &mut self.c,
            "grad weight block",
            b.max_taps * b.max_channels,
        )
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
        let gemm_opts = self.options.gemm_options(Parallelism::Sequential);
        let first_tap = ColumnTap::of_row(g, t0);
        // Chunks of the depth in order: across images, or (in place) per image.
        let span = if b.in_place { plane } else { depth };
        let chunks = (0..depth / span).flat_map(|s| {
            (0..span)
                .step_by(b.chunk)
                .map(move |p| (s * span + p, s * span + (p + b.chunk).min(span)))
        });
        for (i, (d0, d1)) in chunks.enumerate() {
            let a = if b.in_place {
                let (n, p0) = (d0 / plane, d0 % plane);
                let image = &self.input[(n * g.in_channels + grp * cg + t0) * g.in_plane()..];
                ASource::Strided(StridedMatrix {
                    ptr: image[p0..].as_ptr(),
                    rs: g.in_plane() as isize,
                    cs: 1,
                })
            } else {
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
                ASource::Strided(StridedMatrix {
                    ptr: ws.col.as_ptr(),
                    rs: b.ld as isize,
                    cs: 1,
                })
            };
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
            // SAFETY: A is the mt × (d1 − d0) column chunk, just built (rows
            // ld apart) or, for a pointwise kernel, channels t0..t1 of the
            // input (in_plane apart; taps are channels and the chunk lies in
            // one image), B the (d1 − d0) × nk view of `grad_output`, C the
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
        // dW[grp·kg + c0 + j][t0 + i] (+)= C[i][j], four rows of dW at a
        // time.
        for j0 in (0..nk).step_by(4) {
            let w = (nk - j0).min(4);
            let mut rows: [&mut [f32]; 4] = Default::default();
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
