//! The dense tile: direct convolution vectorised across output channels, for
//! layers with many channels per group (the ResNet 3×3 layers, stems,
//! dilated and strided layers), where the implicit GEMM spends a share of
//! every call writing B rows.
//!
//! The idea is MLAS's NCHWc convolution kernel, without changing the
//! caller's layout: a register tile is `F` vectors of `L` output channels
//! (one block of `F·L` channels of a group) × `W` output pixels, `W / R`
//! consecutive pixels of each of `R` consecutive rows (`R` from 1 to 3,
//! [`tile_rows`]). For each input channel and kernel tap it loads the
//! block's `F` weight vectors (packed once, `[taps][F·L]`, so the loads
//! stream through memory in order) and broadcasts the `W` input pixels that
//! tap meets (`W` scalar loads at constant offsets from one pointer and the
//! input row pitch), so every weight vector feeds `W` FMAs and every
//! broadcast `F`. Nothing is packed per
//! call but a zero-padded copy of the input (a padded layer; an unpadded
//! one is read in place), so the tap loop needs no bounds checks: the input
//! position of tap `(c, r, s)` is a fixed offset from the tile's, read from
//! a table built once.
//!
//! The tile's outputs leave channel-major (`[W][F·L]`); a whole output row
//! is gathered into the caller's NCHW planes with the bias and activation
//! (strided vector loads, contiguous stores).
//!
//! The sum for each output runs over the taps in one fixed order whatever
//! the threads, so results do not depend on the thread count. Padding taps
//! are multiplied by the padded copy's zeros, as in the GEMM lowerings, so
//! `Conv2d::resolve_algorithm` hands non-finite weights on a padded layer to
//! the SIMD direct tiles that skip them.
//!
//! Measured while choosing the tile (Zen 5, AVX-512, 1 thread, a stand-alone
//! prototype with the same loop, GFLOP/s; `F = 4`, widths `W` up to):
//!
//! | layer                       | W ≤ 4 | W ≤ 5 | W ≤ 6 | W ≤ 7 |
//! |-----------------------------|-------|-------|-------|-------|
//! | 64 → 64, 3×3, 56²           | 241   | 227   | 235   | 92    |
//! | 256 → 256, 3×3, 14²         | 229   | 245   | 228   | 94    |
//! | 128 → 128, 3×3/2, 56²       | 243   | 235   | 239   | 92    |
//!
//! (the implicit GEMM ran these at 212, 205 and 191 in the same session; 7
//! spills: 28 accumulators, 4 weight vectors and a broadcast exceed 32
//! registers). A row is split into tiles of as equal widths as the widest
//! tile allows (56 pixels with `W ≤ 6`: six of 6 and four of 5), which keeps
//! the narrow tail tiles of a plain split off the row.
//!
//! What the store costs, and what did not lower it (Zen 5, AVX-512, 1
//! thread, plans, GFLOP/s; "no store" is a build that skipped the row
//! store, so its output was wrong, to weigh it): a batch of 8 of 32 → 64
//! channels 3×3 on 32² (the suite's batch16 in small) 222–232 with the
//! output on a cache line and 206–221 with it 4 floats past one, against
//! 229–250 with no store at either placement; the same on 32×31, 32×33 and
//! 32×34 planes (222–230 against 236–244), so not the 4 KiB distance of
//! 32² planes mapping every channel's row to one L1 set; r50_3x3 230
//! against 233–235, r50_deep 231 against 231–234. The store's share
//! follows the taps per output (288 on that layer, 576 on r50_3x3): 16
//! strided loads, a 16 × 16 transpose and 16 stores a group of 256
//! outputs. The output's placement: starting 16, 32, 48 or 64 floats past
//! a 4 KiB boundary (whole lines) runs as at 0 (228–234), 1, 4 or 8
//! floats past (inside a line) at 222–224 (each
//! row of 32 floats then spans three lines, the outer two shared with the
//! neighbouring rows and written a row apart). Not taken: a masked head
//! store so that the rest of each channel's row starts on a line (218 →
//! 220–221 at +4, against 228–230 at +0 in the same runs);
//! prefetching the row's output lines at its start, or one or two rows
//! ahead into L2 (within the noise of the same runs); streaming stores for
//! whole vectors on a line, 231 → 236–238 at +0 (the write-allocate is
//! about a third of the store's cost), which would leave the output for
//! the next layer in DRAM rather than in L3.
//!
//! On AVX2 (Zen 3, 1 thread, one plan alternating the two loops call by
//! call, best of ~300 calls, GFLOP/s) the tap loop runs four taps an
//! iteration (see [`tile`]): r50_deep 79.8 → 85.8, r50_3x3 86.9 → 90.3,
//! dilated 85.9 → 89.3, 512 → 512 on 7² 66.8 → 74.5, the stem unchanged.
//! Not taken there: `W = 7` with the second weight vector read by each FMA
//! from memory (14 accumulators in 16 registers, the loop written in
//! assembly): 0.79–0.96× `W ≤ 6` on the suite's 3×3 layers, 1.07× on 7²
//! (binaries alternating, five rounds; its 15 vector loads per 14 FMAs
//! exceed the two a cycle Zen 3 issues);
//! chunking the taps so that a chunk's weights and input lines stay in L1
//! (16 input channels): within noise.
//!
//! Tiles over several rows: rows of 7 or 14 pixels split into tiles of
//! `4 + 3` or `5 + 5 + 4` on a tile up to 6 wide, so most tiles kept 6 to
//! 10 accumulators of 12 and every tile streamed the block's weights once
//! more. Three rows at a time they are tiles of 3 × 2 (`7 = 2 + 2 + 2 +
//! 1`, `14` seven of 2): full tiles, a third fewer of them. Zen 3, AVX2,
//! 1 thread, one plan with one-row tiles alternating with one with the
//! rows of [`tile_rows`] call by call, best GFLOP/s, two runs: 512 → 512
//! 3×3 on 7² 68.8 → 78.9 and 73.0 → 82.9, 256 → 256 on 7² 81.1 → 89.9
//! and 81.6 → 90.1, 512 → 512 3×3/2 on 14² 75.4 → 86.4 and 66.7 → 77.3,
//! batch16 83.6 → 87.3 and 87.3 → 88.9, r50_3x3_s2 84.5 → 87.4 and 89.5
//! → 90.6; r50_deep 84.6 → 86.1 and 87.7 → 87.5, r50_3x3, r50_conv1 and
//! 128 → 128 on 28² within ±1.5%. The sums are the same bits: each output
//! still sums its taps in the same order.

use super::{thread_count, Simd};
use crate::arch::{clamp_isa, Isa};
use crate::conv::scratch::{line_offset, Buffer, Scratch, LINE_FLOATS};
use crate::conv::try_with_capacity;
use crate::error::ConvError;
use crate::gemm::{Activation, Parallelism};
use crate::geometry::{ConvGeometry, ConvMode};
use crate::testing::record_direct_simd_jobs;
use rayon::prelude::*;
use std::ops::Range;

/// The widest tile any ISA uses (the instances compiled per `F`).
pub(super) const MAX_WIDTH: usize = 12;

/// The register tile of one ISA: lanes, and the widest tile for each
/// number of channel vectors `F` (`widths[F − 1]`; `F` up to `widths.len()`).
#[derive(Clone, Copy, Debug)]
pub(super) struct DenseShape {
    pub(super) lanes: usize,
    pub(super) widths: &'static [usize],
}

/// The ISA operations the dense rows run with.
pub(super) trait DenseRows: Simd {
    /// [`dense_row`] with this ISA's operations, compiled with its target
    /// features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`dense_row`] otherwise.
    unsafe fn dense_row<const F: usize, const P: usize>(row: &DenseRow<'_>);
}

/// What writes one block's packed weights: `fill(group, channels, block,
/// panel)`, see [`DensePrepared::with_weights`].
pub(crate) type FillPanel<'a> = dyn Fn(usize, Range<usize>, usize, &mut [f32]) + Sync + 'a;

/// The geometry as the dense rows use it.
#[derive(Clone, Debug)]
struct Geo {
    batch: usize,
    groups: usize,
    cg: usize,
    kg: usize,
    in_h: usize,
    in_w: usize,
    pad_top: usize,
    pad_left: usize,
    /// Padded input rows and row length.
    hp: usize,
    wp: usize,
    /// Whether the input needs a zero-padded copy (any padding at all).
    padded: bool,
    out_h: usize,
    out_w: usize,
    stride_h: usize,
    stride_w: usize,
    /// Taps per output channel: `cg·R·S`.
    taps: usize,
    /// Taps per chunk of whole input channels: a block's weights for one
    /// chunk and the chunk's band rows stay in L2 while every row of a band
    /// sweeps them ([`chunk_taps`]; `taps` when they all fit: no chunking).
    chunk: usize,
    /// Output rows per band (the last band may be shorter).
    band: usize,
    /// Output rows the tiles cover together ([`tile_rows`]).
    unit_rows: usize,
    /// Parts the channel blocks of a band are split into among threads.
    block_parts: usize,
    /// Input rows of a band's padded copy: `(band − 1)·σh + (R − 1)·dh + 1`.
    band_rows: usize,
    /// Distance between channels in what the tiles read: a band's padded
    /// copy (`band_rows·Wp`), or the caller's input plane when unpadded.
    cs: usize,
}

impl Geo {
    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }
    fn bands(&self) -> usize {
        self.out_h.div_ceil(self.band)
    }
    /// Floats of one band's padded copy (all channels of an image).
    fn band_len(&self) -> usize {
        if self.padded {
            self.groups * self.cg * self.cs
        } else {
            0
        }
    }
}

/// A convolution made ready for the dense tile once: the weights packed per
/// channel block, the tap offsets, the tile, the bands. Running it needs, per
/// thread, the padded copy of one band of rows (for a padded layer) and a
/// row buffer, kept by the calling thread from call to call.
#[derive(Clone, Debug)]
pub(crate) struct DensePrepared {
    geo: Geo,
    /// `[group][block][taps][F·L]`, starting `align` floats in (64-byte
    /// aligned, so each weight vector is one cache line on AVX-512).
    weights: Buffer,
    align: usize,
    /// Input offset of tap `(c, r, s)` from the tile's first pixel:
    /// `c·cs + r·dh·Wp + s·dw`.
    offsets: Vec<isize>,
    isa: Isa,
    lanes: usize,
    /// Channel vectors per block.
    f: usize,
    /// Blocks of `F·L` channels per group.
    blocks: usize,
    clamp: Option<(f32, f32)>,
    flops: u64,
}

/// The tile of `isa` (clamped to the CPU).
fn shape_for(isa: Isa) -> DenseShape {
    match clamp_isa(isa) {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::avx512::DENSE,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::avx2::DENSE,
        _ => super::portable::DENSE,
    }
}

/// Outputs the widest register tile of `shape` holds: `F·L·W` at its
/// largest.
fn tile_outputs(shape: DenseShape) -> usize {
    (1..=shape.widths.len())
        .map(|f| f * shape.lanes * shape.widths[f - 1])
        .max()
        .unwrap_or(0)
}

/// Whether the dense tile of `isa` (clamped to the CPU) holds more outputs
/// in registers than the GEMM's base micro-tile (`MR × NR`) of the same
/// path. Per tap the tile loads `F` weight vectors and broadcasts `W`
/// pixels, as the micro-kernel loads its B vectors and broadcasts its A
/// column, so with equal tiles both run as many FMAs per load. A 1×1 layer
/// packs no B rows for the GEMM either, so there the dense tile can only
/// win by its larger tile: AVX-512's 384 outputs (4 × 16 × 6) against
/// 8 × 32 = 256, while AVX2's 96 (2 × 8 × 6) equal its 6 × 16 (see
/// `Conv2d::auto_algorithm`).
///
/// The GEMM's wide AVX-512 tile (8 × 48, on Intel) holds 384 outputs too,
/// yet the dense tile still won the 1×1 layers the rule sends to it there
/// (Intel Xeon, 1 thread, plans, two runs of `compare --plan`, GFLOP/s,
/// implicit GEMM on 8 × 48 → dense): 512 → 2048 on 7² 126–138 → 154–159,
/// 1024 → 2048 /2 on 14² 96 → 127–131, 1024 → 256 on 14² 159 → 187–189;
/// and lost or tied those it keeps from it (256 → 64 on 56² 143–154 →
/// 112–119, 32 → 16 on 112² 128–130 → 82–86, 128 → 512 on 28² 164–178 →
/// 162–167). So the rule compares with the base tile.
pub(crate) fn outgrows_gemm_tile(isa: Isa) -> bool {
    let gemm = crate::gemm::kernels::kernel_for(isa).info();
    tile_outputs(shape_for(isa)) > gemm.mr * gemm.nr
}

/// Channel vectors per block for `kg` channels per group: the count that
/// pads the fewest channels, the larger on a tie (more FMAs per broadcast).
fn vectors_per_block(kg: usize, shape: DenseShape) -> usize {
    let lanes = shape.lanes;
    (1..=shape.widths.len())
        .min_by_key(|&f| (kg.div_ceil(f * lanes) * f * lanes, usize::MAX - f))
        .unwrap_or(1)
}

/// FMAs a core keeps in flight: a 4-cycle FMA on two pipes (every x86
/// core this crate has been measured on). A tile with fewer accumulators
/// leaves the pipes waiting on the latency.
const FMAS_IN_FLIGHT: usize = 8;

/// Whether one row of `out_w` pixels alone, in tiles one row high, gives
/// the dense tile of `isa` (clamped to the CPU), for `kg` output channels a
/// group, more accumulators per tile on average than [`FMAS_IN_FLIGHT`].
/// AVX2's 2 × 6 tile splits an 8-pixel row into two tiles of 4 (8
/// accumulators) and a 7-pixel one into 4 + 3; AVX-512's 4 × 6 keeps 16
/// and more there. (The tiles run over up to three rows, [`tile_rows`],
/// which fills them on such rows too; this measure stays what separates
/// the transposed layers whose GEMM + col2im ties or wins, see
/// `ConvTranspose2d::auto_algorithm`.)
pub(crate) fn one_row_fills_the_tile(isa: Isa, kg: usize, out_w: usize) -> bool {
    rows_fill(shape_for(isa), kg, out_w)
}

/// [`one_row_fills_the_tile`] for the tile `shape`.
fn rows_fill(shape: DenseShape, kg: usize, out_w: usize) -> bool {
    let f = vectors_per_block(kg, shape);
    let widest = shape.widths.get(f.wrapping_sub(1)).copied().unwrap_or(1);
    let tiles = out_w.div_ceil(widest.max(1)).max(1);
    f.saturating_mul(out_w) > FMAS_IN_FLIGHT.saturating_mul(tiles)
}

/// Tile widths along a row: `out_w` split into `⌈out_w / widest⌉` tiles
/// whose widths differ by at most one (`widest` is the tile's pixels a row).
fn tile_widths(out_w: usize, widest: usize) -> impl Iterator<Item = usize> {
    let tiles = out_w.div_ceil(widest.max(1));
    let (base, extra) = out_w
        .checked_div(tiles)
        .map_or((0, 0), |base| (base, out_w % tiles));
    (0..tiles).map(move |t| base + usize::from(t < extra))
}

/// The most output rows a tile covers.
const MAX_TILE_ROWS: usize = 3;

/// Output rows each tile covers, for rows of `out_w` pixels, tiles up to
/// `widest` pixels and `out_h` rows: the count (up to [`MAX_TILE_ROWS`])
/// whose tiles hold the most pixels on average, the fewest rows on a tie.
/// A tile of `R` rows takes `widest / R` pixels of each: for `widest = 6`,
/// a 14-pixel row is `5 + 5 + 4` (4⅔ a tile), two rows `3 + 3 + 3 + 3 +
/// 2` (5⅗), three rows seven tiles of 2 (6).
fn tile_rows(out_w: usize, widest: usize, out_h: usize) -> usize {
    (1..=MAX_TILE_ROWS.min(out_h.max(1)))
        .filter(|&r| widest / r > 0)
        .max_by(|&a, &b| {
            // pixels a tile: r·out_w / ⌈out_w / (widest / r)⌉, compared
            // without division; fewer rows win a tie.
            let (ta, tb) = (out_w.div_ceil(widest / a), out_w.div_ceil(widest / b));
            (a * tb).cmp(&(b * ta)).then(b.cmp(&a))
        })
        .unwrap_or(1)
}

/// Taps per chunk for `cg` input channels of `window` taps each, blocks of
/// up to `max_block` channels and `band_channel` bytes of one input
/// channel's band rows: whole input channels, in as few chunks of
/// near-equal size as keep what the tiles of one block and chunk sweep
/// over a band (the chunk's weights, which every tile streams, and its
/// channels' band rows, which neighbouring tiles share) within half of L2
/// (one chunk when it all fits). Counting the weights alone (within three
/// quarters of L2) left r50_deep's 147 KiB of a block's weights beside
/// 256 KiB of band rows in Zen 3's 512 KiB L2. Zen 3, AVX2, 1 thread, one
/// plan with each rule alternating call by call, best GFLOP/s, two runs:
/// r50_deep 84.6 → 94.4 and 86.0 → 94.1 (two chunks of 128 channels),
/// r50_3x3 91.6 → 94.4 and 91.9 → 95.0, 512 → 512 3×3 on 14² 80.3 → 83.2
/// and 92.1 → 93.9; r50_conv1, r50_3x3_s2, batch16, 128 → 128 on 28², 256
/// and 512 → 512 on 7², 1024 → 1024 on 7² within ±1.5%. A budget of 3/8
/// or 3/4 of L2 ran as a half within ±1% (r50_3x3 −2.5% at 3/4). Before,
/// the weights alone: 512 → 512 3×3 on 7×7 (1.2 MB a block) ran at 171
/// GFLOP/s unchunked (Zen 5, 1 thread, AVX-512), while 256 → 256 (0.6 MB)
/// ran at 250.
fn chunk_taps(cg: usize, window: usize, max_block: usize, band_channel: usize, l2: usize) -> usize {
    let per_channel = window
        .saturating_mul(max_block)
        .saturating_mul(4)
        .saturating_add(band_channel)
        .max(1);
    let budget = (l2 / 2).max(1);
    let chunks = cg
        .saturating_mul(per_channel)
        .div_ceil(budget)
        .clamp(1, cg.max(1));
    cg.div_ceil(chunks).max(1) * window
}

/// What packs `weight` (PyTorch layout) into the dense tile's blocks (see
/// [`DensePrepared::with_weights`]): each block's weight rows transposed
/// (`[taps][lanes]` from `[lanes][taps]`) in 4×4 SIMD tiles; true
/// convolution mirrors each channel's window on the way, element by
/// element. Element by element across the whole panel, r50_deep's plan
/// took 545 µs to build, against a 0.92 ms forward.
pub(crate) fn weight_filler<'a>(
    g: &ConvGeometry,
    weight: &'a [f32],
) -> impl Fn(usize, Range<usize>, usize, &mut [f32]) + Sync + 'a {
    let flipped = g.mode == ConvMode::Convolution;
    let (rl, sl) = (g.kernel_h, g.kernel_w);
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let taps = cg * rl * sl;
    move |group: usize, channels: Range<usize>, block: usize, panel: &mut [f32]| {
        let first = (group * kg + channels.start) * taps;
        let rows = &weight[first..][..channels.len() * taps];
        if !flipped {
            crate::gemm::transpose::transpose(rows, taps, channels.len(), taps, panel, block);
            return;
        }
        for (lane, raw) in rows.chunks_exact(taps).enumerate() {
            for c in 0..cg {
                for r in 0..rl {
                    for s in 0..sl {
                        let tap = (c * rl + r) * sl + s;
                        let from = (c * rl + rl - 1 - r) * sl + sl - 1 - s;
                        panel[tap * block + lane] = raw[from];
                    }
                }
            }
        }
    }
}

/// Channels in the widest block of any ISA's tile (AVX-512: 4 vectors of
/// 16), which sizes a row buffer in [`flattens`] for every path alike.
const WIDEST_BLOCK: usize = 64;

/// Whether `g` runs as one row of all its pixels: a pointwise kernel at
/// unit stride without padding reads each output pixel's input at the same
/// offset, so its planes are one long row to the tiles (the output and
/// input memory are the same either way). Rows of 7 or 14 pixels otherwise
/// leave the tiles narrow (7 = 4 + 3 where 6 fit), and each tile streams
/// the whole block's weights. Only where the row buffer of the flattened
/// row (`plane × the widest block`) takes at most a quarter of L2, as a
/// band's rows do. Measured (Zen 5, AVX-512, plans, 1 thread, GFLOP/s,
/// one run, the two builds alternating, three rounds; rows → one row,
/// implicit GEMM in the same runs): 512 → 2048 on 7² 190–195 → 232–243
/// (implicit 173–226), 2048 → 512 on 7² 171–180 → 192–218 (207–219),
/// 160 → 960 on 7² 169–176 → 219–228 (212–220), 960 → 160 on 7² 230–240
/// → 242–247 (204–217), 256 → 256 on 14² 224–235 → 242–248 (222–234),
/// 128 → 512 on 28² 223–232 → 233–243 (226–242), a batch of 8 of 512 →
/// 2048 on 7² 184–199 → 232–241 (211–220).
pub(crate) fn flattens(g: &ConvGeometry, l2: usize) -> bool {
    let pointwise = g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1;
    let row_bytes = g
        .out_h
        .saturating_mul(g.out_w)
        .saturating_mul(WIDEST_BLOCK)
        .saturating_mul(std::mem::size_of::<f32>());
    pointwise && g.padding == crate::geometry::Padding::ZERO && g.out_h > 1 && row_bytes <= l2 / 4
}

/// Whether the dense tile repays packing its weights in the call that runs
/// it (an input gradient, whose weights change every step): for `taps`
/// taps per output channel (the largest phase's) and `out_plane` output
/// pixels, where each packed weight meets at least 128 pixels, or the
/// widest block's packed panel (`taps × 64` floats) fits a quarter of L2
/// (`l2` bytes), where the tiles stream it from. Input gradients measured
/// (Zen 5, AVX-512, 1 thread, GFLOP/s, GEMM + col2im against the phases on
/// the dense tile, two runs; each block packed as it comes): 14² planes
/// all go to the tile, 256 → 256 3×3 187–191 vs 196, 512 → 512 3×3
/// 105–118 vs 182–191, 256 → 512 3×3 193–200 vs 191–198, 1024 → 256 1×1
/// 174 vs 205–207, 256 → 1024 1×1 165–199 vs 206–213; 7² planes as the
/// panel says, 512 → 2048 1×1 (512 KiB panels) 180–188 vs 159–174, 2048 →
/// 512 1×1 (128 KiB) 146–153 vs 181–184, 160 → 960 1×1 (240 KiB) 174–176
/// vs 185–188, 256 → 256 3×3 (576 KiB) 153–175 vs 129–142, 512 → 512 3×3
/// 165–169 vs 132–137.
///
/// A larger L2 does not move the crossover: on an Intel Xeon (family 6
/// model 167, L2 2 MiB; same runs, binaries of each algorithm alternating,
/// two rounds, best GFLOP/s, the forward layer named) the panels up to
/// [`MAX_PANEL_REPAID`] still won or tied, 2048 → 512 (128 KiB) 101 vs 113,
/// 960 → 160 (40 KiB) 139–148 vs 136–140, 160 → 960 (240 KiB) 118–124 vs
/// 128–134, 256 → 1024 (256 KiB) 115–122 vs 128–132, 1024 → 1024 (256
/// KiB) 99–103 vs 100–106 (512 → 1024, 256 KiB, 132–140 vs 111–119, the one
/// loss kept), and larger ones lost or tied: 512 → 2048 (r50_last1x1, 512
/// KiB) 127–130 vs 97–99, 512 → 1280 (320 KiB) 123–145 vs 100–116, 256 →
/// 1536 (384 KiB) 106–107 vs 110–113, 1024 → 2048 (512 KiB) 99–104 vs
/// 99.
pub(crate) fn repays_packing_per_call(taps: usize, out_plane: usize, l2: usize) -> bool {
    let panel_bytes = taps
        .saturating_mul(WIDEST_BLOCK)
        .saturating_mul(std::mem::size_of::<f32>());
    out_plane >= 128 || panel_bytes <= (l2 / 4).min(MAX_PANEL_REPAID)
}

/// The largest panel (bytes) whose packing in the call the dense tile
/// repays on a small plane, whatever the L2 (see
/// [`repays_packing_per_call`]).
const MAX_PANEL_REPAID: usize = 256 << 10;

/// Whether one row per image still gives each of `threads` threads a part
/// of the channel blocks (rows are what the threads share otherwise): with
/// a single block, 512 → 64 on 7² ran at 2 threads 289–328 GFLOP/s in rows
/// and 241–245 as one row.
fn flat_rows_keep_threads(g: &ConvGeometry, shape: DenseShape, threads: usize) -> bool {
    let per_image = threads.div_ceil(g.batch.max(1)).max(1);
    let f = vectors_per_block(g.out_channels_per_group(), shape);
    let blocks = g.groups * g.out_channels_per_group().div_ceil(f * shape.lanes);
    per_image == 1 || blocks >= per_image
}

/// `g` with each image's planes as one row (see [`flattens`]).
fn flattened(g: &ConvGeometry) -> ConvGeometry {
    ConvGeometry {
        in_h: 1,
        in_w: g.in_h * g.in_w,
        out_h: 1,
        out_w: g.out_h * g.out_w,
        ..*g
    }
}

/// How the threads given to a batch of `batch` images of `out_h` output
/// rows and `total_blocks` channel blocks share each image: into how many
/// parts its channel blocks are cut, and how many threads share each
/// part's rows (in bands, [`band_height`]); `(1, threads)` where bands of
/// rows alone share out the images.
///
/// An image with few rows for its threads has its blocks cut into one part
/// a thread where there are blocks enough (rows in bands of unequal height
/// left one thread idle: 512 → 512 on 7 rows ran 2 threads at 1.68× one).
/// With fewer blocks than threads, the split moves the fewest bytes among
/// those that still give every thread a unit: every part reads the image's
/// padded input (`input_bytes`), every band its part's share of the weights
/// (`weight_bytes` in all), so `p` parts of `⌈t / p⌉` bands move
/// `p·input + ⌈t / p⌉·weights`. Such layers used to take bands alone, each
/// re-reading all the weights. Measured (AVX-512, Intel Xeon, one process,
/// against that, best GFLOP/s), 16 threads: 512 → 512 3×3 on 7² (8 blocks
/// of 64) 429 → 1031, 256 → 256 on 7² 380 → 802, 2048 → 512 1×1 on 7² 407
/// → 1033, 512 → 512 on 14² 1012 → 1316, 256 → 256 on 14² 979 → 1151; 8
/// threads: 256 → 256 on 7² 398 → 586, on 14² 647 → 790, 128 → 128 on 28²
/// 760 → 844; 128 → 128 3×3/2 from 56² at 4 threads kept bands alone (two
/// blocks as parts measured 404 → 370, which the bytes predict).
fn image_split(
    out_h: usize,
    batch: usize,
    threads: usize,
    total_blocks: usize,
    input_bytes: usize,
    weight_bytes: usize,
) -> (usize, usize) {
    let per_image = threads.div_ceil(batch.max(1)).max(1);
    if per_image == 1 || out_h >= 8 * per_image {
        return (1, threads);
    }
    if total_blocks >= per_image {
        return (per_image, 1);
    }
    let moved = |parts: usize| {
        parts
            .saturating_mul(input_bytes)
            .saturating_add(per_image.div_ceil(parts).saturating_mul(weight_bytes))
    };
    // Parts whose bands (at most one a row) still give every thread a unit.
    let fills = |parts: usize| parts * out_h.min(per_image.div_ceil(parts)) >= per_image;
    let parts = (1..=total_blocks.max(1))
        .filter(|&p| fills(p))
        .min_by_key(|&p| moved(p))
        .unwrap_or(total_blocks.max(1));
    if parts > 1 {
        (parts, per_image.div_ceil(parts))
    } else {
        (1, threads)
    }
}

/// Output rows per band: as many as keep a band's padded input within
/// `budget` bytes (half of L2, so that it stays there while each channel
/// block reads it, or unbounded where [`one_band_repays`]), and few enough
/// that `threads` threads each get the same number of bands of a batch
/// this small.
fn band_height(
    out_h: usize,
    batch: usize,
    input_row_bytes: usize,
    window_rows: usize,
    stride_h: usize,
    threads: usize,
    budget: usize,
) -> usize {
    let fit_rows = budget / input_row_bytes.max(1);
    let by_cache = fit_rows
        .checked_sub(window_rows)
        .map_or(1, |spare| spare / stride_h.max(1) + 1);
    // Bands of near-equal height, a multiple of what the threads need in
    // number, so that each thread gets the same rows.
    let per_image = threads.div_ceil(batch.max(1)).max(1);
    let bands = out_h.div_ceil(by_cache).max(per_image);
    let bands = bands.div_ceil(per_image) * per_image;
    out_h.div_ceil(bands.min(out_h.max(1))).max(1)
}

/// Whether one band an image beats the `bands` that fit half of L2: every
/// band past the first reads all `weight_bytes` of packed weights again
/// (from L3, or beyond it from memory), where one band too large for L2
/// reads the padded image (`input_bytes`) from L3 once per channel block
/// of a group (`blocks`). Zen 3, AVX2, 1 thread, one plan per rule
/// alternating call by call, best GFLOP/s: 1024 → 1024 3×3 on 7² (38 MB
/// of weights, two bands) 64.2 → 74.8 (Implicit, which Auto does not
/// pick there, 70.8), 512 → 512 on 14² (9.4 MB, three bands) 82.0 →
/// 91.8; where the weights are small one band lost: r50_3x3 93.2 → 91.6,
/// r50_3x3_s2 87.2 → 82.2, r50_conv1 87.1 → 82.9 (this rule keeps their
/// bands).
fn one_band_repays(weight_bytes: usize, bands: usize, input_bytes: usize, blocks: usize) -> bool {
    weight_bytes.saturating_mul(bands.saturating_sub(1)) > input_bytes.saturating_mul(blocks)
}

impl DensePrepared {
    /// Prepares `weight` (PyTorch layout) for the dense tile of `isa`
    /// (clamped to the CPU), in bands for up to `threads` threads, or
    /// `None` when the offsets would not fit comfortably in `isize` (the
    /// reference loops take such a geometry).
    pub(crate) fn new(
        g: &ConvGeometry,
        weight: &[f32],
        activation: Activation,
        isa: Isa,
        threads: usize,
    ) -> Result<Option<DensePrepared>, ConvError> {
        Self::with_weights(g, activation, isa, threads, &weight_filler(g, weight))
    }

    /// As [`DensePrepared::new`], with the packed weights written by
    /// `fill(group, channels, block, panel)`: for the output channels
    /// `channels` of `group` (one block, `≤ block` of them), the panel
    /// `[taps][block]` with the weight output channel `channels.start + lane`
    /// gives tap `(c·R + r)·S + s` at `tap·block + lane`, as the tiles read it
    /// (input offset `(r, s)`: for true convolution, the mirrored weight).
    /// The other lanes are zero already. Panels are filled on up to
    /// `threads` threads.
    pub(crate) fn with_weights(
        g: &ConvGeometry,
        activation: Activation,
        isa: Isa,
        threads: usize,
        fill: &FillPanel<'_>,
    ) -> Result<Option<DensePrepared>, ConvError> {
        Self::prepared(g, activation, isa, threads, fill, false)
    }

    /// As [`DensePrepared::with_weights`], for one call,
    /// [`DensePrepared::run_once`] with the same `fill`: the weights are
    /// packed now only where each block's rows are not one unit of work
    /// (several images or bands); otherwise each block is packed by the
    /// task that runs it, just before its rows (see
    /// [`DensePrepared::run_packing`]).
    pub(crate) fn for_one_call(
        g: &ConvGeometry,
        activation: Activation,
        isa: Isa,
        threads: usize,
        fill: &FillPanel<'_>,
    ) -> Result<Option<DensePrepared>, ConvError> {
        Self::prepared(g, activation, isa, threads, fill, true)
    }

    /// [`DensePrepared::with_weights`], or with `one_call`
    /// [`DensePrepared::for_one_call`].
    fn prepared(
        g: &ConvGeometry,
        activation: Activation,
        isa: Isa,
        threads: usize,
        fill: &FillPanel<'_>,
        one_call: bool,
    ) -> Result<Option<DensePrepared>, ConvError> {
        let Some(mut prepared) = Self::unpacked(g, activation, isa, threads)? else {
            return Ok(None);
        };
        if !(one_call && prepared.packs_each_block_once()) {
            prepared.pack(threads, fill, one_call)?;
        }
        Ok(Some(prepared))
    }

    /// Runs a [`DensePrepared::for_one_call`] with the `fill` it was made
    /// with: [`DensePrepared::run`] where the weights were packed,
    /// [`DensePrepared::run_packing`] otherwise.
    pub(crate) fn run_once(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        par: Parallelism,
        fill: &FillPanel<'_>,
    ) -> Result<(), ConvError> {
        if self.weights.is_empty() {
            self.run_packing(input, bias, output, par, fill)
        } else {
            self.run(input, bias, output, par, None)
        }
    }

    /// As [`DensePrepared::with_weights`] without packing the weights: for
    /// [`DensePrepared::pack`], or for [`DensePrepared::run_packing`], which
    /// packs each block as it comes.
    fn unpacked(
        g: &ConvGeometry,
        activation: Activation,
        isa: Isa,
        threads: usize,
    ) -> Result<Option<DensePrepared>, ConvError> {
        let isa = clamp_isa(isa);
        let shape = shape_for(isa);
        let l2 = crate::gemm::cache::cache_hierarchy().l2.per_core();
        let flat;
        let g = if flattens(g, l2) && flat_rows_keep_threads(g, shape, threads) {
            flat = flattened(g);
            &flat
        } else {
            g
        };
        let p = g.padding;
        let limit = (isize::MAX / 8) as usize;
        let hp = g
            .in_h
            .checked_add(p.top)
            .and_then(|h| h.checked_add(p.bottom));
        let wp = g
            .in_w
            .checked_add(p.left)
            .and_then(|w| w.checked_add(p.right));
        let window_rows = g
            .kernel_h
            .checked_sub(1)
            .and_then(|r| r.checked_mul(g.dilation_h))
            .map(|r| r + 1);
        let image_len = hp
            .zip(wp)
            .and_then(|(h, w)| h.checked_mul(w)?.checked_mul(g.in_channels));
        let (Some(hp), Some(wp), Some(window_rows), Some(_)) =
            (hp, wp, window_rows, image_len.filter(|&l| l <= limit))
        else {
            return Ok(None);
        };
        let padded = p.top + p.bottom + p.left + p.right > 0;
        let window = g.kernel_h * g.kernel_w;
        let max_block = shape.widths.len() * shape.lanes;
        let f = vectors_per_block(g.out_channels_per_group(), shape);
        let blocks = g.out_channels_per_group().div_ceil(f * shape.lanes);
        let row_bytes = g.in_channels.saturating_mul(wp).saturating_mul(4);
        let fit = band_height(g.out_h, 1, row_bytes, window_rows, g.stride_h, 1, l2 / 2);
        let weight_bytes = g.weight_len().saturating_mul(4);
        let input_bytes = row_bytes.saturating_mul(hp);
        let (block_parts, band_threads) = image_split(
            g.out_h,
            g.batch,
            threads,
            g.groups * blocks,
            input_bytes,
            weight_bytes,
        );
        let whole = one_band_repays(weight_bytes, g.out_h.div_ceil(fit), input_bytes, blocks);
        let band = band_height(
            g.out_h,
            if block_parts > 1 { 1 } else { g.batch },
            row_bytes,
            window_rows,
            g.stride_h,
            band_threads,
            if whole { usize::MAX } else { l2 / 2 },
        );
        // Within the padded image, which the check above bounds.
        let band_rows = ((band - 1) * g.stride_h + window_rows).min(hp);
        let widest = shape.widths[f - 1];
        let unit_rows = tile_rows(g.out_w, widest, g.out_h);
        let cs = if padded {
            band_rows * wp
        } else {
            g.in_h * g.in_w
        };
        let band_channel = band_rows * wp * std::mem::size_of::<f32>();
        let chunk = chunk_taps(g.channels_per_group(), window, max_block, band_channel, l2);
        let geo = Geo {
            batch: g.batch,
            groups: g.groups,
            cg: g.channels_per_group(),
            kg: g.out_channels_per_group(),
            in_h: g.in_h,
            in_w: g.in_w,
            pad_top: p.top,
            pad_left: p.left,
            hp,
            wp,
            padded,
            out_h: g.out_h,
            out_w: g.out_w,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            taps: g.channels_per_group() * window,
            chunk,
            band,
            unit_rows,
            block_parts,
            band_rows,
            cs,
        };
        let block = f * shape.lanes;
        let mut offsets = try_with_capacity("dense tap offsets", geo.taps)?;
        for c in 0..geo.cg {
            for r in 0..g.kernel_h {
                for s in 0..g.kernel_w {
                    // Inside the (padded) image, which the check above bounds.
                    let off = c * cs + r * g.dilation_h * wp + s * g.dilation_w;
                    offsets.push(off as isize);
                }
            }
        }
        // A block's panel, and so every block's, within the size arithmetic.
        geo.taps
            .checked_mul(block)
            .and_then(|n| n.checked_mul(geo.groups * blocks))
            .and_then(|n| n.checked_add(16))
            .ok_or(ConvError::Overflow {
                what: "dense weights",
            })?;
        Ok(Some(DensePrepared {
            geo,
            weights: Buffer::default(),
            align: 0,
            offsets,
            isa,
            lanes: shape.lanes,
            f,
            blocks,
            clamp: activation.bounds(),
            flops: g.flops(),
        }))
    }

    /// Packs every block's weights with `fill` (see
    /// [`DensePrepared::with_weights`]) on up to `threads` threads, for
    /// [`DensePrepared::run`]; for `one_call` only (see
    /// [`DensePrepared::for_one_call`]), into a buffer of the thread's pool.
    ///
    /// # Errors
    /// [`ConvError::OutOfMemory`] when the packed weights cannot be
    /// allocated.
    fn pack(
        &mut self,
        threads: usize,
        fill: &FillPanel<'_>,
        one_call: bool,
    ) -> Result<(), ConvError> {
        let (blocks, block, kg) = (self.blocks, self.block(), self.geo.kg);
        let panel_len = self.panel_len();
        // 64-byte alignment: up to 15 floats of slack in front; the sizes
        // were checked by `unpacked`.
        let len = self.geo.groups * blocks * panel_len + LINE_FLOATS;
        // Packed for one call, the weights come from the thread's pool,
        // whose pages are mapped already.
        let mut weights = if one_call {
            Buffer::Pooled(Scratch::zeroed("dense weights", len)?)
        } else {
            let mut owned = try_with_capacity("dense weights", len)?;
            owned.resize(len, 0.0);
            Buffer::Owned(owned)
        };
        let align = line_offset(&weights);
        let dst = &mut weights[align..][..len - LINE_FLOATS];
        let fill_panel = |index: usize, panel: &mut [f32]| {
            let (group, b) = (index / blocks, index % blocks);
            let channels = b * block..((b + 1) * block).min(kg);
            fill(group, channels, block, panel);
        };
        if threads > 1 && dst.len() > panel_len {
            // Panels are independent: packed on the call's threads.
            dst.par_chunks_exact_mut(panel_len)
                .enumerate()
                .for_each(|(index, panel)| fill_panel(index, panel));
        } else {
            for (index, panel) in dst.chunks_exact_mut(panel_len).enumerate() {
                fill_panel(index, panel);
            }
        }
        self.weights = weights;
        self.align = align;
        Ok(())
    }

    /// Whether every block's rows run as one unit of work (one image, one
    /// band), so that [`DensePrepared::run_packing`] packs each block once,
    /// as [`DensePrepared::pack`] would, on the thread that then runs it.
    fn packs_each_block_once(&self) -> bool {
        self.geo.batch * self.geo.bands() == 1
    }

    /// Floats of one block's packed weights: `taps × F·L`.
    fn panel_len(&self) -> usize {
        self.geo.taps * self.block()
    }

    /// Channels per block: `F·L`.
    fn block(&self) -> usize {
        self.f * self.lanes
    }

    /// Floats of one row buffer: the row rounded up to whole vectors (the
    /// store reads `L` pixels at a time), `F·L` channels each.
    fn row_buffer_len(&self) -> usize {
        self.geo.out_w.div_ceil(self.lanes) * self.lanes * self.block()
    }

    /// Units of work: one per (image, band, part of the channel blocks).
    fn units(&self) -> usize {
        self.geo.batch * self.geo.bands() * self.geo.block_parts
    }

    /// Row buffers a task keeps: one per row of a unit, or with chunked
    /// taps one per row of a band (each row's sums wait there for the next
    /// chunk).
    fn row_buffers(&self) -> usize {
        if self.chunked() {
            self.geo.band
        } else {
            self.geo.unit_rows
        }
    }

    /// Whether the taps run in several chunks.
    fn chunked(&self) -> bool {
        self.geo.chunk < self.geo.taps
    }

    /// Floats of scratch a call on `threads` threads needs: per thread, the
    /// padded copy of one band (for a padded layer) and its row buffers.
    pub(crate) fn scratch_len(&self, threads: usize) -> usize {
        threads.max(1) * self.task_len(false)
    }

    /// Floats of one task's scratch: the padded copy of one band (for a
    /// padded layer), its row buffers, and with `packing` one block's
    /// weights (64-byte aligned: 16 floats of slack).
    fn task_len(&self, packing: bool) -> usize {
        let panel = if packing {
            self.panel_len() + LINE_FLOATS
        } else {
            0
        };
        self.geo.band_len() + self.row_buffers() * self.row_buffer_len() + panel
    }

    /// `output = act(conv(input, weight) + bias)`; slices have the lengths
    /// the geometry requires (checked by the caller). With `scratch` (a
    /// caller's workspace) the call runs on the calling thread and allocates
    /// nothing once `scratch` holds [`DensePrepared::scratch_len`]`(1)`
    /// floats; otherwise it takes up to the threads `par` allows, with
    /// scratch the calling thread keeps from call to call (grown, once, to
    /// what the largest call needed).
    ///
    /// # Errors
    /// [`ConvError::OutOfMemory`] when the scratch cannot be allocated.
    pub(crate) fn run(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        par: Parallelism,
        scratch: Option<&mut Vec<f32>>,
    ) -> Result<(), ConvError> {
        assert!(!self.weights.is_empty(), "dense: weights not packed");
        self.run_filling(input, bias, output, par, scratch, None)
    }

    /// As [`DensePrepared::run`] for a prepared convolution whose weights
    /// were never packed ([`DensePrepared::unpacked`]): each task packs a
    /// block's weights with `fill` into its scratch just before the block's
    /// rows, so the tiles read them from L2 rather than from a whole packed
    /// copy written and read back through L3. For a one-shot call (a
    /// forward without a plan, an input gradient) where
    /// [`DensePrepared::packs_each_block_once`]; elsewhere each unit of
    /// work would pack its blocks again.
    fn run_packing(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        par: Parallelism,
        fill: &FillPanel<'_>,
    ) -> Result<(), ConvError> {
        self.run_filling(input, bias, output, par, None, Some(fill))
    }

    /// [`DensePrepared::run`] with the packed weights, or with `fill` (see
    /// [`DensePrepared::run_packing`]).
    fn run_filling(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        par: Parallelism,
        scratch: Option<&mut Vec<f32>>,
        fill: Option<&FillPanel<'_>>,
    ) -> Result<(), ConvError> {
        let geo = &self.geo;
        let in_image = geo.groups * geo.cg * geo.in_h * geo.in_w;
        let out_image = geo.groups * geo.kg * geo.out_plane();
        assert!(
            input.len() == geo.batch * in_image && output.len() == geo.batch * out_image,
            "dense: buffers do not match the geometry"
        );
        if output.is_empty() {
            return Ok(());
        }
        match scratch {
            Some(scratch) => self.run_in(input, bias, output, 1, scratch, fill),
            None => {
                let threads = thread_count(self.flops, self.units(), par);
                // The calling thread keeps its scratch for the next call, so
                // a warm plan allocates nothing; a call re-entered on the
                // same thread (a caller's callback) gets fresh memory.
                SCRATCH.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut kept) => self.run_in(input, bias, output, threads, &mut kept, fill),
                    Err(_) => self.run_in(input, bias, output, threads, &mut Vec::new(), fill),
                })
            }
        }
    }

    /// [`DensePrepared::run`] on `threads` threads with `scratch`, grown to
    /// [`DensePrepared::scratch_len`] where it is shorter. Task `t` takes
    /// units `U·t/threads..U·(t+1)/threads` of the `U` (image, band) units.
    fn run_in(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        scratch: &mut Vec<f32>,
        fill: Option<&FillPanel<'_>>,
    ) -> Result<(), ConvError> {
        let per_task = self.task_len(fill.is_some());
        let len = threads.max(1) * per_task;
        if scratch.len() < len {
            scratch
                .try_reserve_exact(len - scratch.len())
                .map_err(|_| ConvError::OutOfMemory {
                    what: "dense scratch",
                    bytes: len.saturating_mul(std::mem::size_of::<f32>()),
                })?;
            scratch.resize(len, 0.0);
        }
        let out = SharedOut(output.as_mut_ptr());
        let units = self.units();
        fork(0..threads, &mut scratch[..len], per_task, &|task, mem| {
            let range = units * task / threads..units * (task + 1) / threads;
            // SAFETY: `out` is the whole output; each task writes the rows
            // of its own units, disjoint from every other task's.
            unsafe { self.run_units(range, input, bias, out, mem, fill) };
        });
        let rows_per_unit = (self.geo.groups * self.blocks).div_ceil(self.geo.block_parts);
        record_direct_simd_jobs(self.isa, (units * rows_per_unit) as u64);
        Ok(())
    }

    /// Writes input rows `y0..y0 + band_rows` of the padded image `n` (rows
    /// past the padded image excepted, which no tile reads) into `band`:
    /// zeros in the padding, the input elsewhere.
    fn fill_band(&self, image: &[f32], y0: usize, band: &mut [f32]) {
        let geo = &self.geo;
        let in_plane = geo.in_h * geo.in_w;
        for (ch, dst) in band.chunks_exact_mut(geo.cs).enumerate() {
            let plane = &image[ch * in_plane..][..in_plane];
            let rows = geo.band_rows.min(geo.hp - y0);
            for (i, line) in dst.chunks_exact_mut(geo.wp).take(rows).enumerate() {
                match (y0 + i).checked_sub(geo.pad_top).filter(|&y| y < geo.in_h) {
                    Some(y) => {
                        let (left, rest) = line.split_at_mut(geo.pad_left);
                        left.fill(0.0);
                        let (mid, right) = rest.split_at_mut(geo.in_w);
                        mid.copy_from_slice(&plane[y * geo.in_w..][..geo.in_w]);
                        right.fill(0.0);
                    }
                    None => line.fill(0.0),
                }
            }
        }
    }

    /// Computes `units` (image, band) into the output at `out`: for each,
    /// the band's padded copy (a padded layer) into the front of `mem`, then
    /// every channel block's rows, the block's weights kept in cache across
    /// the band.
    ///
    /// # Safety
    /// `out` is the whole output, and no other thread writes the rows of
    /// these units while this runs.
    unsafe fn run_units(
        &self,
        units: Range<usize>,
        input: &[f32],
        bias: Option<&[f32]>,
        out: SharedOut,
        mem: &mut [f32],
        fill: Option<&FillPanel<'_>>,
    ) {
        let geo = &self.geo;
        let block = self.block();
        let panel = self.panel_len();
        let in_image = geo.groups * geo.cg * geo.in_h * geo.in_w;
        let out_image = geo.groups * geo.kg * geo.out_plane();
        let (band_buf, bufs) = mem.split_at_mut(geo.band_len());
        // With `fill`, one block's weights after the row buffers, 64-byte
        // aligned.
        let (bufs, packing) = bufs.split_at_mut(self.row_buffers() * self.row_buffer_len());
        let align = line_offset(packing);
        let packing = match fill {
            Some(_) => &mut packing[align..][..panel],
            None => packing,
        };
        let row_len = self.row_buffer_len();
        debug_assert!(bufs.len() >= self.row_buffers() * row_len);
        let chunked = self.chunked();
        for u in units {
            let (nb, part) = (u / geo.block_parts, u % geo.block_parts);
            let (n, b) = (nb / geo.bands(), nb % geo.bands());
            let total_blocks = geo.groups * self.blocks;
            let parts = geo.block_parts;
            let blocks = total_blocks * part / parts..total_blocks * (part + 1) / parts;
            let oh0 = b * geo.band;
            let oh1 = (oh0 + geo.band).min(geo.out_h);
            let image = &input[n * in_image..][..in_image];
            // What the tiles read, and where output row oh's first input row
            // starts in it.
            let (src, first_row): (&[f32], usize) = if geo.padded {
                self.fill_band(image, oh0 * geo.stride_h, band_buf);
                (band_buf, oh0 * geo.stride_h)
            } else {
                (image, 0)
            };
            let group_in = geo.cg * geo.cs;
            for gb in blocks.clone() {
                let (group, blk) = (gb / self.blocks, gb % self.blocks);
                let k0 = blk * block;
                let channels = (geo.kg - k0).min(block);
                let first = group * geo.kg + k0;
                let weights: &[f32] = match fill {
                    Some(fill) => {
                        if channels < block {
                            // The lanes past the channels compute on zeros,
                            // as in a packed copy, not on the weights of the
                            // block before (their sums are never stored).
                            packing.fill(0.0);
                        }
                        fill(group, k0..k0 + channels, block, packing);
                        packing
                    }
                    None => &self.weights[self.align + gb * panel..][..panel],
                };
                for t0 in (0..geo.taps).step_by(geo.chunk) {
                    let t1 = (t0 + geo.chunk).min(geo.taps);
                    for oh in (oh0..oh1).step_by(geo.unit_rows) {
                        let x = &src[group * group_in + (oh * geo.stride_h - first_row) * geo.wp..];
                        let buf = if chunked { (oh - oh0) * row_len } else { 0 };
                        let row = DenseRow {
                            x: x.as_ptr(),
                            offsets: &self.offsets[t0..t1],
                            weights: weights[t0 * block..].as_ptr(),
                            stride_w: geo.stride_w,
                            rows: geo.unit_rows.min(oh1 - oh),
                            row_pitch: geo.stride_h * geo.wp,
                            out_w: geo.out_w,
                            buf: bufs[buf..].as_mut_ptr(),
                            buf_pitch: row_len,
                            accumulate: t0 > 0,
                            store: t1 == geo.taps,
                            // Image n, channel `first`, row `oh`: inside the output.
                            out: out.0.wrapping_add(
                                n * out_image + first * geo.out_plane() + oh * geo.out_w,
                            ),
                            out_plane: geo.out_plane(),
                            channels,
                            bias: bias.map(|b| &b[first..first + channels]),
                            clamp: self.clamp,
                        };
                        // SAFETY: the ISA was clamped to the CPU; every tap of
                        // the unit's rows (all within this band) reads inside
                        // `src` (a tap's input row is at most (R − 1)·dh below
                        // its output row's first, which the band copy or the
                        // image holds, and every output's window lies inside
                        // the padded row); the weights hold the chunk's steps
                        // of the block, the buffers one per row of the unit,
                        // `row_len` apart, each the row rounded up to whole
                        // vectors (holding the earlier chunks' sums when
                        // accumulating), and the output rows are this task's
                        // (contract).
                        unsafe { self.dispatch(&row) };
                    }
                }
            }
        }
    }

    /// Runs one unit of rows on this plan's ISA and `F`.
    ///
    /// # Safety
    /// As [`dense_row`], and the CPU supports `self.isa`.
    unsafe fn dispatch(&self, row: &DenseRow<'_>) {
        // SAFETY: forwarded.
        unsafe {
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => super::avx512::run_dense_row(self.f, row),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => super::avx2::run_dense_row(self.f, row),
                _ => super::portable::run_dense_row(self.f, row),
            }
        }
    }
}

thread_local! {
    /// The scratch of the last call on this thread that had no workspace:
    /// band copies and row buffers, kept for the next call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output, written by several tasks at disjoint rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write through it only at rows no other task writes
// (`run_units`' contract), and the pointer outlives the fork that shares it.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// Runs `f(task, memory)` for every task of `tasks`, halving the range with
/// `rayon::join` (which allocates nothing); task `t` gets its own
/// `per_task` floats of `mem`, from `t·per_task`.
fn fork(
    tasks: Range<usize>,
    mem: &mut [f32],
    per_task: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    if tasks.len() <= 1 {
        if !tasks.is_empty() {
            f(tasks.start, &mut mem[..per_task]);
        }
        return;
    }
    let mid = tasks.start + tasks.len() / 2;
    let (left, right) = mem.split_at_mut((mid - tasks.start) * per_task);
    rayon::join(
        || fork(tasks.start..mid, left, per_task, f),
        || fork(mid..tasks.end, right, per_task, f),
    );
}

/// One output row of one channel block, ready for the tiles.
pub(super) struct DenseRow<'a> {
    /// The group's (padded) input at the row's first input row, column 0.
    x: *const f32,
    offsets: &'a [isize],
    /// The block's packed weights: `taps` steps of `F·L`.
    weights: *const f32,
    stride_w: usize,
    /// Output rows of this unit (1 to [`MAX_TILE_ROWS`]), each tile covering
    /// the same pixels of each.
    rows: usize,
    /// Input floats from one of the unit's rows to the next.
    row_pitch: usize,
    out_w: usize,
    /// `rows` row buffers, `buf_pitch` floats apart, each `⌈out_w / L⌉·L`
    /// pixels of `F·L` channels.
    buf: *mut f32,
    buf_pitch: usize,
    /// Add to the sums in `buf` (a later chunk of taps) rather than start
    /// from zero.
    accumulate: bool,
    /// The last chunk: store the row into the output.
    store: bool,
    /// The block's first output channel at this row.
    out: *mut f32,
    out_plane: usize,
    /// Real channels of the block (the rest are padding lanes).
    channels: usize,
    bias: Option<&'a [f32]>,
    clamp: Option<(f32, f32)>,
}

/// Runs a unit of rows with the widest tile of each `F` an ISA gives
/// (`P1..P4`).
///
/// # Safety
/// As [`DenseRows::dense_row`]; `f` is 1 to 4 and within the ISA's table.
#[inline(always)]
pub(super) unsafe fn run_row<
    S: DenseRows,
    const P1: usize,
    const P2: usize,
    const P3: usize,
    const P4: usize,
>(
    f: usize,
    row: &DenseRow<'_>,
) {
    // SAFETY: forwarded.
    unsafe {
        match f {
            1 => S::dense_row::<1, P1>(row),
            2 => S::dense_row::<2, P2>(row),
            3 => S::dense_row::<3, P3>(row),
            _ => S::dense_row::<4, P4>(row),
        }
    }
}

/// Every tile of one unit of `rows` output rows, then each row's store.
///
/// # Safety
/// For each row `r < rows`, every input position `x + r·row_pitch +
/// offsets[t] + ow·stride_w` for `ow < out_w` is readable; `weights` holds
/// `offsets.len()` steps of `F·L` floats; `buf` holds `rows` row buffers,
/// `buf_pitch` floats apart, of [`DensePrepared::row_buffer_len`] floats
/// each (the sums so far, when `accumulate`); when `store`, the `channels`
/// output rows at `out + r·out_w + k·out_plane` hold `out_w` writable
/// floats.
#[inline(always)]
pub(super) unsafe fn dense_row<S: Simd, const F: usize, const P: usize>(s: S, row: &DenseRow<'_>) {
    const { assert!(P <= MAX_WIDTH, "the widths! list below stops at MAX_WIDTH") };
    let block = F * S::LANES;
    let mut ow0 = 0;
    let widest = P / row.rows;
    for width in tile_widths(row.out_w, widest) {
        // SAFETY: pixels ow0..ow0 + width are inside the row (contract), the
        // buffer holds them.
        unsafe {
            let x = row.x.add(ow0 * row.stride_w);
            let buf = row.buf.add(ow0 * block);
            // The horizontal stride as a constant where it is 1 or 2, so
            // that the broadcasts' addresses are constant displacements
            // from one pointer rather than a register each.
            macro_rules! widths {
                ($sw:literal; $($w:literal)*) => {
                    match width {
                        $($w if $w <= P => tile::<S, F, $w, $sw, 1>(s, x, row, buf),)*
                        _ => unreachable!("tile width {width} above {P}"),
                    }
                };
            }
            macro_rules! tall {
                ($r:literal, $sw:literal; $($w:literal $wr:literal)*) => {
                    match width {
                        $($w if $wr <= P => tile::<S, F, $wr, $sw, $r>(s, x, row, buf),)*
                        _ => unreachable!("tile width {width} above {P} / {}", $r),
                    }
                };
            }
            match (row.rows, row.stride_w) {
                (1, 1) => widths!(1; 1 2 3 4 5 6 7 8 9 10 11 12),
                (1, 2) => widths!(2; 1 2 3 4 5 6 7 8 9 10 11 12),
                (1, _) => widths!(0; 1 2 3 4 5 6 7 8 9 10 11 12),
                (2, 1) => tall!(2, 1; 1 2 2 4 3 6 4 8 5 10 6 12),
                (2, 2) => tall!(2, 2; 1 2 2 4 3 6 4 8 5 10 6 12),
                (2, _) => tall!(2, 0; 1 2 2 4 3 6 4 8 5 10 6 12),
                (_, 1) => tall!(3, 1; 1 3 2 6 3 9 4 12),
                (_, 2) => tall!(3, 2; 1 3 2 6 3 9 4 12),
                _ => tall!(3, 0; 1 3 2 6 3 9 4 12),
            }
        }
        ow0 += width;
    }
    if row.store {
        for r in 0..row.rows {
            // SAFETY: forwarded contract: row r's buffer and output row.
            unsafe {
                store_row::<S, F>(
                    s,
                    row,
                    row.buf.add(r * row.buf_pitch),
                    row.out.add(r * row.out_w),
                )
            };
        }
    }
}

/// One tile: `F` channel vectors × `W` pixels, `W / R` of each of the
/// unit's `R` rows, over every tap; `SW` is the horizontal stride when it
/// is 1 or 2, and 0 for any other (`stride_w`).
///
/// The loops index the accumulators by pixel and vector so that the tile
/// stays a fixed grid of registers.
///
/// # Safety
/// As [`dense_row`], for pixels `0..W / R` from `x` of each row.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<S: Simd, const F: usize, const W: usize, const SW: usize, const R: usize>(
    s: S,
    x: *const f32,
    row: &DenseRow<'_>,
    buf: *mut f32,
) {
    let lanes = S::LANES;
    let cols = W / R;
    let stride_w = if SW == 0 { row.stride_w } else { SW };
    let pitch = row.row_pitch;
    // Pixel j's place in the buffer: its row's, then its column's.
    let at = |j: usize| (j / cols) * row.buf_pitch + (j % cols) * F * lanes;
    let mut acc = [[s.zero(); W]; F];
    if row.accumulate {
        for j in 0..W {
            for f in 0..F {
                // SAFETY: the buffer holds pixel j's F·L channels (contract).
                acc[f][j] = unsafe { s.load(buf.add(at(j) + f * lanes)) };
            }
        }
    }
    let mut w = row.weights;
    // Four taps an iteration where that keeps every accumulator in a
    // register: the loop's count, compare and branch and the weights' step
    // then come once for four taps' FMAs. Not with one channel vector or a
    // stride held in registers, where the compiler hoisted the four taps'
    // weights or addresses and spilled accumulators (AVX2 `F = 1`, `W ≥ 10`;
    // AVX-512 `F = 2, 3`, `W = 8` at `SW = 0`).
    let per_step = if F >= 2 && SW != 0 { 4 } else { 1 };
    let steps = row.offsets.chunks_exact(per_step);
    let rest = steps.remainder();
    for step in steps {
        // SAFETY: taps `step` of pixels 0..W are readable and the weights
        // hold a step for each (contract).
        unsafe {
            for (t, &off) in step.iter().enumerate() {
                tap::<S, F, W, R>(
                    s,
                    &mut acc,
                    x.offset(off),
                    stride_w,
                    pitch,
                    w.add(t * F * lanes),
                );
            }
            w = w.add(per_step * F * lanes);
        }
    }
    for &off in rest {
        // SAFETY: as above, for one tap.
        unsafe {
            tap::<S, F, W, R>(s, &mut acc, x.offset(off), stride_w, pitch, w);
            w = w.add(F * lanes);
        }
    }
    for (j, _) in acc[0].iter().enumerate() {
        for (f, vecs) in acc.iter().enumerate() {
            // SAFETY: the buffer holds pixel j's F·L channels.
            unsafe { s.store(buf.add(at(j) + f * lanes), vecs[j], lanes) };
        }
    }
}

/// One tap of a tile: the step's `F` weight vectors at `w`, times the `W`
/// pixels, `W / R` from each of `R` rows (`pitch` apart) from `xp`,
/// `stride_w` apart, into the accumulators.
///
/// # Safety
/// `w[0..F·L]` and the `W` pixels are readable.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn tap<S: Simd, const F: usize, const W: usize, const R: usize>(
    s: S,
    acc: &mut [[S::V; W]; F],
    xp: *const f32,
    stride_w: usize,
    pitch: usize,
    w: *const f32,
) {
    let lanes = S::LANES;
    let cols = W / R;
    let mut wv = [s.zero(); F];
    // SAFETY: within the step and the pixels (contract).
    unsafe {
        for (f, v) in wv.iter_mut().enumerate() {
            *v = s.load(w.add(f * lanes));
        }
        for j in 0..W {
            let b = s.splat(*xp.add((j / cols) * pitch + (j % cols) * stride_w));
            for f in 0..F {
                acc[f][j] = s.fma(wv[f], b, acc[f][j]);
            }
        }
    }
}

/// The row buffer into the output rows: `act(v + bias)`, `L` pixels of one
/// channel at a time.
///
/// # Safety
/// As [`dense_row`].
#[inline(always)]
unsafe fn store_row<S: Simd, const F: usize>(
    s: S,
    row: &DenseRow<'_>,
    buf: *const f32,
    out: *mut f32,
) {
    const MAX_LANES: usize = 16;
    let lanes = S::LANES;
    debug_assert!(lanes <= MAX_LANES);
    let block = F * lanes;
    let clamp = row.clamp.map(|(lo, hi)| (s.splat(lo), s.splat(hi)));
    let mut t = [s.zero(); MAX_LANES];
    for k0 in (0..row.channels).step_by(lanes) {
        let mut ow0 = 0;
        while ow0 < row.out_w {
            let n = lanes.min(row.out_w - ow0);
            // SAFETY: the buffer holds whole vectors of pixels, and channels
            // k0..k0 + L lie within the block (contract).
            unsafe { s.load_transposed(buf.add(ow0 * block + k0), block, &mut t[..lanes]) };
            for (l, &v) in t[..lanes].iter().enumerate().take(row.channels - k0) {
                let k = k0 + l;
                let mut v = v;
                if let Some(b) = row.bias {
                    v = s.add(v, s.splat(b[k]));
                }
                if let Some((lo, hi)) = clamp {
                    v = s.clamp(v, lo, hi);
                }
                // SAFETY: output row k has out_w floats from ow0 (contract).
                unsafe { s.store(out.add(k * row.out_plane + ow0), v, n) };
            }
            ow0 += lanes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn narrow_rows_fill_only_the_wider_tile() {
        use super::super::{avx2, avx512};
        // AVX2's 2 × 6: 8 pixels are two tiles of 4 (8 accumulators), 7
        // are 4 + 3; 14 are 5 + 5 + 4 (9⅓ on average), 16 are 6 + 5 + 5.
        for (out_w, fills) in [
            (4, false),
            (7, false),
            (8, false),
            (14, true),
            (16, true),
            (56, true),
        ] {
            assert_eq!(
                rows_fill(avx2::DENSE, 128, out_w),
                fills,
                "avx2, {out_w} pixels"
            );
        }
        // One vector of channels (8 a group): 12 pixels in one tile.
        assert!(!rows_fill(avx2::DENSE, 8, 8));
        assert!(rows_fill(avx2::DENSE, 8, 12));
        // AVX-512's 4 × 6 keeps 16 accumulators on 4 pixels.
        for out_w in [4, 7, 8, 14] {
            assert!(
                rows_fill(avx512::DENSE, 128, out_w),
                "avx512, {out_w} pixels"
            );
        }
    }

    #[test]
    fn tiles_cover_the_rows_that_fill_them_most() {
        // A tile up to 6 wide (AVX2's two vectors, AVX-512's four): a row of
        // 14 is 5 + 5 + 4, three rows seven tiles of 2; of 7, 4 + 3 against
        // 2 + 2 + 2 + 1 three rows high; 12 is two full tiles already.
        assert_eq!(tile_rows(14, 6, 14), 3);
        assert_eq!(tile_rows(7, 6, 7), 3);
        assert_eq!(tile_rows(56, 6, 56), 3);
        assert_eq!(tile_rows(12, 6, 12), 1);
        // Two rows (3 + 3 + 3 + 3 + 2) where the plane has only two.
        assert_eq!(tile_rows(14, 6, 2), 2);
        assert_eq!(tile_rows(14, 6, 1), 1);
        // Up to 8 wide (AVX-512's two or three vectors): 7 and 8 fill one
        // tile a row, which two rows (4 + 4) only tie.
        assert_eq!(tile_rows(8, 8, 8), 1);
        assert_eq!(tile_rows(7, 8, 7), 1);
        // Up to 12 wide (one vector): 14 is 7 + 7, three rows 4 + 4 + 3 + 3.
        assert_eq!(tile_rows(14, 12, 14), 3);
        // A tile one pixel wide, an empty row.
        assert_eq!(tile_rows(5, 1, 5), 1);
        assert_eq!(tile_rows(0, 6, 3), 1);
    }

    /// Tiles over two and three rows give the reference's values on every
    /// ISA, for rows of every width class a tile splits them into, planes
    /// whose rows leave every remainder of the tile's rows, strides 1 to 3
    /// (the last with the stride in a register), one block or several, on
    /// one and two threads and with chunked taps.
    #[test]
    fn tiles_over_several_rows_match_the_reference() {
        use crate::geometry::Padding;
        use crate::Conv2dParams;
        let mut tall = 0;
        let mut seed = 777u32;
        for stride in 1..=3 {
            for out_w in [1, 2, 3, 4, 5, 7, 8, 13, 14] {
                for out_h in 1..=7 {
                    seed += 1;
                    let side = |out: usize| (out - 1) * stride + 1;
                    let k = if seed.is_multiple_of(2) { 16 } else { 40 };
                    let params = Conv2dParams::new(1, 3, (side(out_h), side(out_w)), k, (3, 3))
                        .stride(stride, stride)
                        .padding(Padding::symmetric(1, 1));
                    let Case { g, x, w, b, want } = case(params, seed, Activation::None);
                    assert_eq!((g.out_h, g.out_w), (out_h, out_w));
                    for isa in Isa::ALL.into_iter().filter(|&i| clamp_isa(i) == i) {
                        for (threads, chunked) in [(1, false), (2, false), (1, true)] {
                            let mut p = DensePrepared::new(&g, &w, Activation::None, isa, threads)
                                .unwrap()
                                .unwrap();
                            let widest = shape_for(isa).widths[p.f - 1];
                            assert_eq!(p.geo.unit_rows, tile_rows(out_w, widest, out_h));
                            tall += usize::from(p.geo.unit_rows > 1);
                            if chunked {
                                p.geo.chunk = 9;
                            }
                            let mut got = vec![f32::NAN; g.output_len()];
                            p.run(&x, Some(&b), &mut got, Parallelism::threads(threads), None)
                                .unwrap();
                            assert_matches(&got, &want, &(params, isa, threads, chunked));
                        }
                    }
                }
            }
        }
        assert!(tall > 100, "only {tall} runs had tiles over several rows");
    }

    #[test]
    fn tile_widths_cover_the_row_evenly() {
        for widest in 1..=MAX_WIDTH {
            for out_w in 0..200 {
                let w: Vec<usize> = tile_widths(out_w, widest).collect();
                assert_eq!(w.iter().sum::<usize>(), out_w);
                assert_eq!(w.len(), out_w.div_ceil(widest));
                if let (Some(lo), Some(hi)) = (w.iter().min(), w.iter().max()) {
                    assert!(
                        *hi <= widest && hi - lo <= 1 && *lo >= 1,
                        "{out_w} by {widest}: {w:?}"
                    );
                }
            }
        }
        assert_eq!(
            tile_widths(56, 6).collect::<Vec<_>>(),
            [6, 6, 6, 6, 6, 6, 5, 5, 5, 5]
        );
    }

    #[test]
    fn bands_fit_half_of_l2_and_share_out_evenly() {
        // 128 channels of 58 padded floats: 29 KiB a row; 17 rows fit half
        // of 1 MiB, which is 8 output rows at stride 2 with a 3-row window.
        let row = 128 * 58 * 4;
        assert_eq!(band_height(28, 1, row, 3, 2, 1, 1 << 19), 7);
        assert_eq!(band_height(28, 1, row, 3, 2, 2, 1 << 19), 7);
        // Small input rows: one band a picture, unless threads need more.
        assert_eq!(band_height(56, 1, 1024, 3, 1, 1, 1 << 19), 56);
        assert_eq!(band_height(56, 1, 1024, 3, 1, 2, 1 << 19), 28);
        assert_eq!(band_height(56, 4, 1024, 3, 1, 2, 1 << 19), 56);
        assert_eq!(band_height(14, 1, 1024, 3, 1, 16, 1 << 19), 1);
        // A row larger than the cache: one output row a band.
        assert_eq!(band_height(10, 1, 1 << 30, 3, 1, 1, 1 << 19), 1);
        // An unbounded budget: one band, unless threads need more.
        assert_eq!(band_height(7, 1, 1 << 20, 3, 1, 1, usize::MAX), 7);
        assert_eq!(band_height(14, 1, 1 << 20, 3, 1, 2, usize::MAX), 7);
        for out_h in 1..40 {
            for threads in 1..5 {
                let band = band_height(out_h, 1, 4096, 5, 1, threads, 32 << 10);
                // No taller than one thread's even share, rounded up.
                let share = out_h.div_ceil(threads);
                assert!(
                    (1..=share).contains(&band),
                    "{out_h} rows, {threads} threads: {band}"
                );
            }
        }
    }

    #[test]
    fn image_split_moves_the_fewest_bytes() {
        let (kib, mib) = (1usize << 10, 1usize << 20);
        // 512 → 512 3×3 on 7² (9 × 9 padded rows of 512 channels: 162 KiB;
        // 9 MiB of weights), 8 AVX-512 blocks of 64: the blocks in 8 parts,
        // two bands of rows each, at 16 threads; as many parts as threads
        // at 2 to 8.
        let (input, weights) = (162 * kib, 9 * mib);
        assert_eq!(image_split(7, 1, 16, 8, input, weights), (8, 2));
        assert_eq!(image_split(7, 1, 8, 8, input, weights), (8, 1));
        assert_eq!(image_split(7, 1, 2, 8, input, weights), (2, 1));
        // AVX2 blocks of 16: 32 of them.
        assert_eq!(image_split(7, 1, 16, 32, input, weights), (16, 1));
        // 128 → 128 3×3/2 from 56² (1.6 MiB of padded input, 576 KiB of
        // weights, two blocks) on 28 rows: bands alone at 4 threads, both
        // blocks at 16.
        let (input, weights) = (1680 * kib, 576 * kib);
        assert_eq!(image_split(28, 1, 4, 2, input, weights), (1, 4));
        assert_eq!(image_split(28, 1, 16, 2, input, weights), (2, 8));
        // Input outweighing the weights, blocks enough: one part a thread
        // (as at 2 threads always); too few blocks and rows for bands
        // alone: as many parts as the rows need.
        assert_eq!(image_split(7, 1, 2, 4, 4 * mib, kib), (2, 1));
        assert_eq!(image_split(2, 1, 8, 4, 4 * mib, kib), (4, 2));
        // Rows enough for the threads, one thread an image, or one block:
        // bands alone.
        assert_eq!(image_split(56, 1, 2, 8, input, weights), (1, 2));
        assert_eq!(image_split(7, 16, 2, 8, input, weights), (1, 2));
        assert_eq!(image_split(7, 1, 16, 1, input, weights), (1, 16));
        // A batch shares its threads out first: 4 images, 16 threads.
        assert_eq!(image_split(7, 4, 16, 8, 162 * kib, 9 * mib), (4, 1));
    }

    /// Images cut into parts of their channel blocks and bands of rows at
    /// once (many threads on few rows) give the reference's values, the
    /// same bits as one thread.
    #[test]
    fn blocks_and_bands_split_at_once_match_the_reference() {
        use crate::geometry::Padding;
        use crate::Conv2dParams;
        let layers = [
            Conv2dParams::new(1, 24, (7, 7), 96, (3, 3)).padding(Padding::symmetric(1, 1)),
            // 80 channels: at least two blocks on every path (five of 16
            // lanes on AVX-512, where 40 made one block of 48 that no
            // thread count cuts).
            Conv2dParams::new(1, 16, (9, 6), 80, (3, 2)).stride(2, 1),
            Conv2dParams::new(2, 8, (5, 5), 72, (1, 1)),
        ];
        let act = Activation::Relu;
        for (i, params) in layers.into_iter().enumerate() {
            let Case { g, x, w, b, want } = case(params, 77 + i as u32, act);
            let fill = weight_filler(&g, &w);
            for isa in Isa::ALL.into_iter().filter(|&i| clamp_isa(i) == i) {
                let one = DensePrepared::with_weights(&g, act, isa, 1, &fill)
                    .unwrap()
                    .unwrap();
                let mut first = vec![f32::NAN; g.output_len()];
                one.run(&x, Some(&b), &mut first, Parallelism::Sequential, None)
                    .unwrap();
                assert_matches(&first, &want, &(params, isa, 1));
                let mut split = false;
                for threads in [4, 8, 16] {
                    let par = Parallelism::threads(threads);
                    let p = DensePrepared::with_weights(&g, act, isa, threads, &fill)
                        .unwrap()
                        .unwrap();
                    split |= p.geo.block_parts > 1 && p.geo.bands() > 1;
                    let mut got = vec![f32::NAN; g.output_len()];
                    p.run(&x, Some(&b), &mut got, par, None).unwrap();
                    let what = (params, isa, threads, p.geo.block_parts, p.geo.band);
                    assert_matches(&got, &want, &what);
                    assert!(
                        got.iter()
                            .zip(&first)
                            .all(|(a, e)| a.to_bits() == e.to_bits()),
                        "{what:?}"
                    );
                }
                assert!(
                    split || params.build().unwrap().geometry().batch > 1,
                    "{params:?} {isa:?}"
                );
            }
        }
    }

    #[test]
    fn one_band_where_the_weights_outweigh_the_input() {
        let kib = 1 << 10;
        // 1024 → 1024 3×3 on 7² (AVX2 blocks of 16: 64 a group): 36 MiB of
        // weights read twice against 9 rows of 36 KiB read by 64 blocks.
        assert!(one_band_repays(36 * kib * kib, 2, 9 * 36 * kib, 64));
        // 512 → 512 on 14², three bands: 9 MiB twice more against 16 rows
        // of 32 KiB read by 32 blocks.
        assert!(one_band_repays(9 * kib * kib, 3, 16 * 32 * kib, 32));
        // r50_3x3 (144 KiB of weights, four bands) and r50_3x3_s2 (576
        // KiB, ten bands, 58 rows of 29 KiB, 8 blocks) keep their bands.
        assert!(!one_band_repays(144 * kib, 4, 58 * 14 * kib, 4));
        assert!(!one_band_repays(576 * kib, 10, 58 * 29 * kib, 8));
        // A band that fits: nothing to repay.
        assert!(!one_band_repays(usize::MAX, 1, 1, 1));
    }

    #[test]
    fn blocks_pad_the_fewest_channels() {
        let shape = DenseShape {
            lanes: 16,
            widths: &[12, 12, 8, 6],
        };
        assert_eq!(vectors_per_block(64, shape), 4);
        assert_eq!(vectors_per_block(96, shape), 3);
        assert_eq!(vectors_per_block(32, shape), 2);
        assert_eq!(vectors_per_block(16, shape), 1);
        assert_eq!(vectors_per_block(1, shape), 1);
        assert_eq!(vectors_per_block(2048, shape), 4);
    }

    /// A layer with random input, weight and bias (a linear congruential
    /// sequence from `seed`, values in ±0.5) and the reference's output
    /// for them with `act`.
    struct Case {
        g: ConvGeometry,
        x: Vec<f32>,
        w: Vec<f32>,
        b: Vec<f32>,
        want: Vec<f32>,
    }

    fn case(params: crate::Conv2dParams, seed: u32, act: Activation) -> Case {
        let mut seed = seed;
        let mut next = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let g = *params.build().unwrap().geometry();
        let x: Vec<f32> = (0..g.input_len()).map(|_| next()).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|_| next()).collect();
        let b: Vec<f32> = (0..g.out_channels).map(|_| next()).collect();
        let mut want = vec![0.0; g.output_len()];
        crate::conv::direct::conv2d_direct(&g, &x, &w, Some(&b), &mut want, act);
        Case { g, x, w, b, want }
    }

    /// Every element of `got` within 1e-5 of the reference's.
    fn assert_matches(got: &[f32], want: &[f32], what: &dyn std::fmt::Debug) {
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            assert!((a - e).abs() <= 1e-5, "{what:?}: [{i}] {a} vs {e}");
        }
    }

    /// Chunked taps (forced small here: the real chunk needs weights beyond
    /// three quarters of L2) give the reference's values, on every ISA, on one thread
    /// and on three (bands of several rows, each row's sums kept across
    /// chunks), with bias and a clamp, padded and unpadded, strided.
    #[test]
    fn chunked_taps_match_the_reference() {
        use crate::geometry::Padding;
        use crate::Conv2dParams;
        let seed = 12345u32;
        let layers = [
            Conv2dParams::new(2, 7, (9, 11), 37, (3, 3)).padding(Padding::symmetric(1, 1)),
            Conv2dParams::new(1, 5, (10, 9), 20, (3, 2))
                .stride(2, 2)
                .dilation(1, 2),
            Conv2dParams::new(1, 6, (8, 8), 18, (2, 2))
                .groups(2)
                .padding(Padding::explicit(0, 1, 1, 0)),
        ];
        let act = Activation::Clamp {
            min: -0.4,
            max: 0.6,
        };
        for (i, params) in layers.into_iter().enumerate() {
            let Case { g, x, w, b, want } = case(params, seed + i as u32, act);
            for isa in Isa::ALL.into_iter().filter(|&i| clamp_isa(i) == i) {
                for threads in [1, 3] {
                    let mut p = DensePrepared::new(&g, &w, act, isa, threads)
                        .unwrap()
                        .unwrap();
                    // Two input channels a chunk.
                    p.geo.chunk = 2 * g.kernel_h * g.kernel_w;
                    assert!(p.geo.chunk < p.geo.taps && p.row_buffers() > 0);
                    let mut got = vec![f32::NAN; g.output_len()];
                    p.run(&x, Some(&b), &mut got, Parallelism::threads(threads), None)
                        .unwrap();
                    assert_matches(&got, &want, &(isa, threads));
                }
            }
        }
    }

    /// Each block packed by the task that runs it, just before its rows
    /// (`run_packing`), gives the reference's values on every ISA: partial
    /// blocks after full ones (in a buffer the full ones used), chunked
    /// taps, padding,
    /// groups, true convolution, one to three threads; and a one-shot call
    /// packs per block exactly where each block's rows are one unit.
    #[test]
    fn blocks_packed_as_they_come_match_the_reference() {
        use crate::geometry::Padding;
        use crate::Conv2dParams;
        let seed = 4242u32;
        let layers = [
            Conv2dParams::new(1, 9, (7, 8), 150, (3, 3)).padding(Padding::symmetric(1, 1)),
            Conv2dParams::new(1, 40, (7, 7), 70, (1, 1)),
            Conv2dParams::new(1, 12, (6, 9), 40, (2, 3))
                .groups(2)
                .stride(2, 1)
                .padding(Padding::explicit(1, 0, 0, 2)),
            Conv2dParams::new(1, 6, (5, 5), 36, (3, 3)).mode(ConvMode::Convolution),
            Conv2dParams::new(2, 5, (6, 6), 20, (3, 3)).padding(Padding::symmetric(1, 1)),
        ];
        let act = Activation::Clamp {
            min: -0.5,
            max: 0.7,
        };
        for (i, params) in layers.into_iter().enumerate() {
            let Case { g, x, w, b, want } = case(params, seed + i as u32, act);
            let fill = weight_filler(&g, &w);
            for isa in Isa::ALL.into_iter().filter(|&i| clamp_isa(i) == i) {
                for threads in [1, 2, 3] {
                    let par = Parallelism::threads(threads);
                    let mut p = DensePrepared::unpacked(&g, act, isa, threads)
                        .unwrap()
                        .unwrap();
                    if p.geo.taps > g.kernel_h * g.kernel_w {
                        // One input channel a chunk.
                        p.geo.chunk = g.kernel_h * g.kernel_w;
                    }
                    let mut got = vec![f32::NAN; g.output_len()];
                    p.run_packing(&x, Some(&b), &mut got, par, &fill).unwrap();
                    assert_matches(&got, &want, &(params, isa, threads));
                    let once = DensePrepared::for_one_call(&g, act, isa, threads, &fill)
                        .unwrap()
                        .unwrap();
                    assert_eq!(
                        once.weights.is_empty(),
                        g.batch == 1 && once.geo.bands() == 1,
                        "{params:?} {isa:?} {threads}"
                    );
                    let mut got = vec![f32::NAN; g.output_len()];
                    once.run_once(&x, Some(&b), &mut got, par, &fill).unwrap();
                    assert_matches(&got, &want, &(params, isa, threads, "once"));
                }
            }
        }
    }

    #[test]
    fn packing_per_call_is_repaid_by_big_planes_or_panels_a_quarter_of_l2_up_to_256_kib() {
        let mib = 1 << 20;
        // 14² planes repay it whatever the weights (512 → 512 3×3).
        for l2 in [512 << 10, mib, 2 * mib] {
            assert!(repays_packing_per_call(512 * 9, 196, l2));
        }
        // 7² planes: 512 taps (128 KiB panels) fit a quarter of 1 MiB (Zen
        // 4/5, Skylake-SP), not of 256 KiB; 1024 (256 KiB) a quarter of
        // 1 MiB or 2 MiB; 2048 (512 KiB) nowhere, not even beside 2 MiB of
        // L2 (an Intel Xeon measured so), nor 256 → 256 3×3 (576 KiB).
        assert!(repays_packing_per_call(512, 49, mib));
        assert!(!repays_packing_per_call(512, 49, 256 << 10));
        assert!(repays_packing_per_call(960, 49, mib));
        assert!(repays_packing_per_call(1024, 49, mib));
        assert!(repays_packing_per_call(1024, 49, 2 * mib));
        assert!(!repays_packing_per_call(1025, 49, 2 * mib));
        assert!(!repays_packing_per_call(2048, 49, mib));
        assert!(!repays_packing_per_call(2048, 49, 2 * mib));
        assert!(!repays_packing_per_call(2048, 49, 16 * mib));
        assert!(!repays_packing_per_call(256 * 9, 49, 2 * mib));
        assert!(!repays_packing_per_call(256 * 9, 49, mib));
        assert!(!repays_packing_per_call(256 * 9, 127, mib));
        assert!(repays_packing_per_call(256 * 9, 128, mib));
        assert!(!repays_packing_per_call(usize::MAX, 1, usize::MAX));
    }

    #[test]
    fn pointwise_planes_run_as_one_row_where_the_row_buffer_fits() {
        use crate::geometry::Padding;
        use crate::Conv2dParams;
        let geo = |c: usize, hw: usize, k: usize, stride: usize, pad: usize| {
            *Conv2dParams::new(1, c, (hw, hw), k, (1, 1))
                .stride(stride, stride)
                .padding(Padding::symmetric(pad, pad))
                .build()
                .unwrap()
                .geometry()
        };
        let mib = 1 << 20;
        // 7² and 14² planes fit a quarter of any L2 measured (512 KiB: Zen 2,
        // 1 MiB: Zen 4/5, Skylake-SP; 2 MiB: Sapphire Rapids); 28² (784
        // pixels × 64 channels × 4 bytes = 196 KiB) fits from 1 MiB on.
        for l2 in [512 << 10, mib, 2 * mib] {
            assert!(flattens(&geo(512, 7, 2048, 1, 0), l2));
            assert!(flattens(&geo(256, 14, 256, 1, 0), l2));
        }
        assert!(!flattens(&geo(128, 28, 512, 1, 0), 512 << 10));
        assert!(flattens(&geo(128, 28, 512, 1, 0), mib));
        assert!(!flattens(&geo(256, 56, 64, 1, 0), 2 * mib));
        // Not pointwise at unit stride without padding, or one row already.
        assert!(!flattens(&geo(512, 7, 2048, 2, 0), mib));
        assert!(!flattens(&geo(512, 7, 2048, 1, 1), mib));
        let row = *Conv2dParams::new(1, 8, (1, 40), 16, (1, 1))
            .build()
            .unwrap()
            .geometry();
        assert!(!flattens(&row, mib));
        let window = *Conv2dParams::new(1, 8, (7, 7), 16, (3, 1))
            .build()
            .unwrap()
            .geometry();
        assert!(!flattens(&window, mib));
        // Every ISA's block fits the row buffer the rule sizes.
        for isa in Isa::ALL {
            let shape = shape_for(isa);
            assert!(shape.widths.len() * shape.lanes <= WIDEST_BLOCK, "{isa:?}");
        }
        // One row keeps two threads busy only with two blocks to share.
        let avx512 = DenseShape {
            lanes: 16,
            widths: &[12, 8, 8, 6],
        };
        assert!(flat_rows_keep_threads(&geo(512, 7, 64, 1, 0), avx512, 1));
        assert!(!flat_rows_keep_threads(&geo(512, 7, 64, 1, 0), avx512, 2));
        assert!(flat_rows_keep_threads(&geo(512, 7, 128, 1, 0), avx512, 2));
        let batch = *Conv2dParams::new(2, 512, (7, 7), 64, (1, 1))
            .build()
            .unwrap()
            .geometry();
        assert!(flat_rows_keep_threads(&batch, avx512, 2));
    }

    /// Pointwise layers run as one row per image give the reference's
    /// values on every ISA, on one thread and on two, batched, grouped, with
    /// partial blocks, bias and a clamp.
    #[test]
    fn flattened_pointwise_layers_match_the_reference() {
        use crate::Conv2dParams;
        let seed = 777u32;
        let layers = [
            Conv2dParams::new(1, 40, (7, 7), 150, (1, 1)),
            Conv2dParams::new(3, 24, (5, 9), 70, (1, 1)),
            Conv2dParams::new(2, 12, (6, 6), 36, (1, 1)).groups(2),
            Conv2dParams::new(1, 8, (14, 14), 20, (1, 1)),
        ];
        let l2 = crate::gemm::cache::cache_hierarchy().l2.per_core();
        let act = Activation::Clamp {
            min: -0.7,
            max: 0.8,
        };
        for (i, params) in layers.into_iter().enumerate() {
            let Case { g, x, w, b, want } = case(params, seed + i as u32, act);
            assert!(flattens(&g, l2), "{params:?}");
            for isa in Isa::ALL.into_iter().filter(|&i| clamp_isa(i) == i) {
                for threads in [1, 2] {
                    let p = DensePrepared::new(&g, &w, act, isa, threads)
                        .unwrap()
                        .unwrap();
                    let per_image = threads.div_ceil(g.batch);
                    let one_row = flat_rows_keep_threads(&g, shape_for(isa), threads);
                    assert_eq!(p.geo.out_h == 1, one_row, "{params:?} {isa:?} {threads}");
                    assert!(one_row || per_image > 1);
                    let mut got = vec![f32::NAN; g.output_len()];
                    p.run(&x, Some(&b), &mut got, Parallelism::threads(threads), None)
                        .unwrap();
                    assert_matches(&got, &want, &(params, isa, threads));
                }
            }
        }
    }

    /// Only AVX-512's tile outgrows its GEMM micro-tile; the others
    /// equal theirs (the shapes compiled here, whatever this CPU runs).
    #[test]
    fn only_the_avx512_tile_outgrows_the_gemm_tile() {
        use crate::gemm::kernels::portable as gemm_portable;
        assert_eq!(
            tile_outputs(super::super::portable::DENSE),
            gemm_portable::MR * gemm_portable::NR
        );
        #[cfg(target_arch = "x86_64")]
        {
            use crate::gemm::kernels::{avx2, avx512};
            assert_eq!(tile_outputs(super::super::avx512::DENSE), 384);
            assert!(tile_outputs(super::super::avx512::DENSE) > avx512::MR * avx512::NR);
            assert_eq!(tile_outputs(super::super::avx2::DENSE), avx2::MR * avx2::NR);
        }
        assert!(!outgrows_gemm_tile(Isa::Portable));
        assert_eq!(
            outgrows_gemm_tile(Isa::Avx512),
            clamp_isa(Isa::Avx512) == Isa::Avx512
        );
    }

    #[test]
    fn chunks_keep_a_block_of_weights_in_l2() {
        // r50_deep on AVX2 (16 channels a block: 576 bytes of 3×3 weights an
        // input channel, and 16 band rows of 16 floats): 410 KB, two chunks
        // on a 512 KiB L2 and one on 1 MiB.
        assert_eq!(chunk_taps(256, 9, 16, 1024, 512 << 10), 128 * 9);
        assert_eq!(chunk_taps(256, 9, 16, 1024, 1 << 20), 256 * 9);
        // AVX-512's 64 channels a block: 2304 bytes of weights a channel.
        assert_eq!(chunk_taps(256, 9, 64, 1024, 1 << 20), 128 * 9);
        assert_eq!(chunk_taps(2048, 9, 64, 0, 1 << 20), 228 * 9);
        // The band's rows count as much as the weights.
        assert_eq!(chunk_taps(64, 9, 16, 3712, 512 << 10), 32 * 9);
        assert_eq!(chunk_taps(64, 9, 16, 0, 512 << 10), 64 * 9);
        // Never less than one channel, never more than there are.
        assert_eq!(chunk_taps(4, 49, 64, 0, 1 << 10), 49);
        assert_eq!(chunk_taps(64, 9, 16, 1 << 20, 512 << 10), 9);
        assert_eq!(chunk_taps(3, 49, 64, 0, 1 << 30), 3 * 49);
        assert_eq!(chunk_taps(0, 9, 64, 0, 1 << 20), 9);
    }
}
