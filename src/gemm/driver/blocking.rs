//! Block sizes and the rules for reading an operand in place, derived per
//! problem from the kernel's blocking and the cache sizes.

use crate::gemm::cache::cache_hierarchy;
use crate::gemm::element::Element;
use crate::gemm::engine::{ASource, PackBounds, StridedMatrix};
use crate::gemm::kernels::{Kernel, KernelInfo};

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
pub(crate) fn single_block_columns<T: Element>(kc: usize, info: &KernelInfo) -> usize {
    let elements = cache_hierarchy().l2.per_core() / 2 / std::mem::size_of::<T>();
    (elements / kc.max(1) / info.nr * info.nr).clamp(info.nr, info.nc.max(info.nr))
}

/// The rows of A per block for `m` rows of C, and whether they run in the
/// tall-A order: rows that fit one MC block keep the classic inner loops,
/// taller ones take blocks of `tall_mc` rows where the kernel's model gives
/// them (see [`crate::gemm::cache_model`]).
pub(super) fn row_blocks(m: usize, info: &KernelInfo) -> (usize, bool) {
    if m > info.mc && info.tall_mc > 0 {
        (info.tall_mc, true)
    } else {
        (info.mc, false)
    }
}

/// The most elements one task's packing buffers (A, B, staging rows) hold
/// for an `m × k × n` GEMM on `info`'s kernel: bounded by the blocking,
/// whatever the problem size.
pub(crate) fn pack_bounds<T: Element>(
    m: usize,
    k: usize,
    n: usize,
    info: &KernelInfo,
    a_prepacked: bool,
) -> PackBounds {
    let kc = block_depth(k, info).min(k.max(1));
    let (block_rows, tall) = row_blocks(m, info);
    let mc = block_rows.min(m.next_multiple_of(info.mr));
    let nc = if m <= info.mc || tall {
        single_block_columns::<T>(block_depth(k, info), info)
    } else {
        info.nc
    }
    .min(n.next_multiple_of(info.nr));
    let a = if a_prepacked { 0 } else { mc * kc };
    PackBounds {
        a,
        b: kc * nc,
        // Two rows of a block, for sources that build a row from the one
        // before it.
        staging: 2 * nc,
    }
}

/// Reading A in place pays when each packed A block would serve at most
/// this many B panels: 2048×512×49 (2 panels) spends 15% of its time
/// packing A, 256×2304×196 (7 panels) 5%.
pub(super) const A_IN_PLACE_MAX_PANELS: usize = 8;

/// The block height for an A read in place, where it is lower than MC:
/// the model's MC is sized for a packed (contiguous) block, which spreads
/// over every set of L2, while the rows of an A read in place, `rs`
/// elements apart, may reach only a few sets ([`rows_stay_in_l2`]). For an
/// `m × n` GEMM whose blocks would be read in place (few column panels), the
/// tallest whole-tile block whose rows stay in L2, if it is at least
/// [`IN_PLACE_MIN_TILES`] tiles tall; `None` keeps MC (and A is packed
/// where its rows would not stay). 2048×512×49 (rows 2 KiB apart: 256 of
/// them stay in a 1 MiB L2): MC 896 packed A at 133 GFLOP/s, 256-row blocks
/// in place 216 (1 thread AVX-512, Zen 5).
pub(super) fn in_place_block_rows<T: Element>(
    a: &ASource<'_, T>,
    kernel: &Kernel<T>,
    n: usize,
) -> Option<usize> {
    let ASource::Strided(StridedMatrix { rs, cs: 1, .. }) = *a else {
        return None;
    };
    let KernelInfo { mr, nr, mc, .. } = *kernel.info();
    if !kernel.a_strided() || rs <= 0 || n.div_ceil(nr) > A_IN_PLACE_MAX_PANELS {
        return None;
    }
    let held = cache_hierarchy()
        .l2
        .rows_held((rs as usize).saturating_mul(std::mem::size_of::<T>()));
    let rows = held / mr * mr;
    (rows < mc && rows >= IN_PLACE_MIN_TILES * mr).then_some(rows)
}

/// The depth of a block for a column-major A read in place, where it is
/// lower than KC: the model's KC sizes a packed micro-panel, whose k-steps
/// take `MR` floats each, while in place every k-step of a micro-panel
/// lies on a cache line of its own (its `MR` rows are contiguous, the next
/// step a column stride away). KC shrinks by the ratio, so that the
/// panel's lines take the L1 room its packed copy would. Measured (1
/// thread AVX-512, Zen 5, `cpuconv gemm --layout tn`, KC 512 → 256):
/// 256×2304×196 184–189 → 208–214 GFLOP/s; 512×2048×49 and 2048×512×49
/// within noise; KC 128: 204, KC 64: 186.
pub(super) fn in_place_column_major_depth<T: Element>(
    a: &ASource<'_, T>,
    kernel: &Kernel<T>,
    n: usize,
) -> Option<usize> {
    let ASource::Strided(StridedMatrix { rs: 1, cs, .. }) = *a else {
        return None;
    };
    let KernelInfo { mr, nr, kc, .. } = *kernel.info();
    if cs <= 1 || n.div_ceil(nr) > A_IN_PLACE_MAX_PANELS {
        return None;
    }
    let step_bytes = mr * std::mem::size_of::<T>();
    let line = cache_hierarchy().l1d.line.max(step_bytes);
    let depth = (kc * step_bytes / line).next_multiple_of(8);
    (depth < kc).then_some(depth)
}

/// Whether every row of a B read in place starts on a cache line at column
/// `col`: the stride is a whole number of lines and row 0 starts on one.
/// Elsewhere each 32-float panel row spans three lines instead of two and
/// the kernel's vector loads split across lines; packing B costs less.
/// Measured, 1 thread AVX-512, Intel Xeon (family 6 model 167), one
/// process, B alone 1, 3 or 8 floats past a 4 KiB boundary, in place vs
/// packed, median GFLOP/s: 128×1152×784 150–152 vs 152–161, 128³ 144–163
/// vs 161–186, 128×512×1000 (rows 4000 bytes apart, never on lines)
/// 138–151 vs 148–162 (at +0 163 vs 160), 96×384×196 160 vs 167 at +1;
/// but 64³ 148–165 vs 141–156. Rows on lines (B at +0 or +16, or peeled
/// there by [`columns_to_aligned_rows`]) stay in place, and so does a B
/// whose panels serve at most [`B_OFF_LINE_IN_PLACE_MAX_TILES`] tiles.
pub(super) fn rows_on_lines<T: Element>(bs: &StridedMatrix<T>, col: usize) -> bool {
    let size = std::mem::size_of::<T>();
    let row_bytes = (bs.rs as usize).saturating_mul(size);
    let start = bs.ptr.wrapping_add(col) as usize;
    row_bytes.is_multiple_of(CACHE_LINE) && start.is_multiple_of(CACHE_LINE)
}

/// The columns to take off the left of columns `n0..n0 + width` of a B read
/// in place so that the rest start on a boundary of [`B_ROW_ALIGN`] bytes
/// (or of a cache line, where the row stride is a whole number of lines
/// but not of that): every row then starts on one too, so no vector load
/// of the kernel splits across two lines and no panel row reaches into a
/// pair of lines it barely uses. 0 when the rows drift (the stride is no
/// whole number of lines), when the block already starts on the boundary,
/// or where peeling would change how many blocks of `block` columns the
/// rest needs (the blocking stays what the cache model says, and the
/// tests' mirror of the loop nest with it).
pub(super) fn columns_to_aligned_rows<T: Element>(
    bs: &StridedMatrix<T>,
    n0: usize,
    width: usize,
    block: usize,
    panel: usize,
) -> usize {
    // The peel costs a (narrow) tile per row of tiles: only where there are
    // many panels to repay it (64³ with B 3 floats past a line measured
    // 146 GFLOP/s with a peel, 218 without).
    if width < PEEL_MIN_PANELS * panel {
        return 0;
    }
    let size = std::mem::size_of::<T>();
    let row_bytes = (bs.rs as usize).saturating_mul(size);
    let start = bs.ptr.wrapping_add(n0) as usize;
    let Some(align) = [B_ROW_ALIGN, CACHE_LINE]
        .into_iter()
        .find(|&a| row_bytes.is_multiple_of(a))
    else {
        return 0;
    };
    if bs.rs <= 0 || !start.is_multiple_of(size) {
        return 0;
    }
    let lead = (align - start % align) % align / size;
    let block = block.max(1);
    if lead < width && (width - lead).div_ceil(block) == width.div_ceil(block) {
        lead
    } else {
        0
    }
}

/// Bytes in a cache line on every x86 and Arm server core.
const CACHE_LINE: usize = 64;

/// Where the rows of a B read in place should start: an aligned pair of
/// cache lines, the unit of the adjacent-line (spatial) prefetchers of x86
/// cores, and the bytes of an AVX-512 panel row (32 floats). Measured, 1
/// thread AVX-512, Zen 5, 64×576×3136 with B alone 0–2048 floats past a
/// 4 KiB boundary (A and C at +0), GFLOP/s in one process: rows starting
/// on a 128-byte boundary (+0, +32, +64, … +2048) 198–207; rows on a line
/// but not a pair (+16) 165–177, the same as rows mid-line (+1 … +12,
/// which the former line-sized peel moved to +16); B packed, at every
/// offset, 189–192.
pub(crate) const B_ROW_ALIGN: usize = 2 * CACHE_LINE;

/// The fewest column panels a B read in place must span before its
/// leading columns are peeled to a pair or line boundary (see
/// [`columns_to_aligned_rows`]); with fewer, a B whose rows start mid-line
/// is packed (`rows_on_lines`). Lowered from 32: Intel Xeon, 1 thread,
/// AVX-512, `cpuconv gemm --placement`, B 1–12 floats past a line, GFLOP/s
/// with 32 → 8: 128×1152×784 (16 panels of 48) 142–151 → 155–160,
/// 64×576×784 133–141 → 147–167, 32×288×784 115–122 → 150–162;
/// 128×256×1024, 64×64×512 and 128×128×400 within noise. 64³ (2 panels)
/// measured 146 with a peel against 218 without.
pub(super) const PEEL_MIN_PANELS: usize = 8;

/// Below this many register tiles, a block read in place would re-read B's
/// block too often: pack A at full MC instead.
pub(super) const IN_PLACE_MIN_TILES: usize = 8;

/// The most register tiles (rows of the block / MR) for which a row-major B
/// is read in place rather than packed. A panel read in place is fetched
/// from its strided rows once per tile: for a few tiles that costs less
/// than copying it, for many the contiguous packed panel wins. Measured, 1
/// thread AVX-512, one process, in place vs packed, best GFLOP/s: Intel
/// Xeon (family 6 model 167) 64×576×3136 (8 tiles) 164 vs 146,
/// 128×512×1000 (16) 175 vs 167, 128×1152×784 (16) 164 vs 166,
/// 192×576×784 (24) 153 vs 175, 256³ (32) 171 vs 204, 256×2304×196 161
/// vs 173, 384³ (48) 162 vs 180, 512³ (64) 153 vs 181 (2 threads: 192×576×784
/// 300 vs 334, 256³ 261 vs 327, 512³ 295 vs 346); the 1×1 forward of 128 →
/// 512 channels on 28² 173 → 193. Zen 5 earlier: 256×512×1024 (32 tiles)
/// 22% slower in place.
pub(super) const B_IN_PLACE_MAX_TILES: usize = 16;

/// The most register tiles for which a row-major B is read in place even
/// where its rows start off cache lines ([`rows_on_lines`]): its split
/// loads are paid once per tile, the copy once per call, and for this few
/// tiles the copy costs more. Measured with `cpuconv gemm --placement`, 1
/// thread AVX-512, Intel Xeon (family 6 model 167), B alone at +1 … +12
/// floats past a 4 KiB boundary, packed vs in place, two rounds alternating
/// (GFLOP/s): 64×576×1000 (rows never on lines) 137–142 vs 167–174,
/// 32×256×256 120–131 vs 161–174, 64×64×100 113–123 vs 128–131, 64³
/// 130–135 vs 137–145, 48³ 137–143 vs 139–156. From 10 to 16 tiles it was
/// a wash within the machine's noise (80×256×256 and 96³ +2–6%, 128³ and
/// 96×384×196 −5 to +3%), so the rule stops at 8.
pub(super) const B_OFF_LINE_IN_PLACE_MAX_TILES: usize = 8;

/// The largest column stride of a row-major A the kernels read in place:
/// the weight gradient's bands at stride σ read every σ-th float of a row
/// (`grad_weight_bands.rs`), where a packed copy per tap would undo what
/// the band saves.
pub(super) const A_IN_PLACE_MAX_COLUMN_STRIDE: isize = 4;

/// Whether the kernel reads the `rows`-row A block in place rather than
/// packed, for a block that serves `column_panels` B panels: a row-major A
/// (column stride up to [`A_IN_PLACE_MAX_COLUMN_STRIDE`]) whose rows stay
/// in L2 ([`rows_stay_in_l2`]), or a column-major one.
pub(super) fn a_in_place<T: Element>(
    a: &ASource<'_, T>,
    kernel: &Kernel<T>,
    rows: usize,
    column_panels: usize,
) -> bool {
    match *a {
        ASource::Strided(StridedMatrix { rs, cs, .. }) => {
            kernel.a_strided()
                && column_panels <= A_IN_PLACE_MAX_PANELS
                && ((rs > 0
                    && (1..=A_IN_PLACE_MAX_COLUMN_STRIDE).contains(&cs)
                    && rows_stay_in_l2::<T>(rs as usize, rows))
                    || (rs == 1 && cs > 0))
        }
        ASource::Packed(_) => false,
    }
}

/// Whether a row-major B is read in place at depth `kc`, its rows `rs`
/// elements apart: they stay in L2 together ([`rows_stay_in_l2`]) and a
/// micro-panel's `kc` rows do not all fall into one L1 set
/// ([`crate::gemm::cache::CacheLevel::holds_panel_rows`]). Rows a whole
/// number of L1 ways apart (2048, 3072 or 5120 floats on a 4 KiB way) ran
/// 156–184 GFLOP/s in place against 175–211 packed (1 thread AVX-512, Zen
/// 5, `kc` = 64, 64 to 256 rows of A), where 3584 or 4608 floats (half a
/// way off) ran 206–211 in place and 170–209 packed, and 3136 (a 1×1
/// layer's 56² planes) 205–218 against 210.
pub(super) fn b_rows_in_place<T: Element>(rs: usize, kc: usize) -> bool {
    let row_bytes = rs.saturating_mul(std::mem::size_of::<T>());
    rows_stay_in_l2::<T>(rs, kc) && cache_hierarchy().l1d.holds_panel_rows(row_bytes, kc)
}

/// Whether `rows` rows of an operand read in place, `rs` elements apart, can
/// stay in L2 together: [`crate::gemm::cache::CacheLevel::holds_rows`] on
/// this core's L2.
pub(super) fn rows_stay_in_l2<T: Element>(rs: usize, rows: usize) -> bool {
    cache_hierarchy()
        .l2
        .holds_rows(rs.saturating_mul(std::mem::size_of::<T>()), rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views of `data` at `offset` floats past an `align`-byte boundary
    /// with row stride `rs` (only their addresses are ever looked at).
    fn placed(
        data: &mut crate::gemm::pack::AlignedBuf<f32>,
        align: usize,
    ) -> impl Fn(usize, isize) -> StridedMatrix<f32> {
        let base = data.get(4096 + align / 4).as_ptr();
        let base = base.wrapping_add((align - base as usize % align) % align / 4);
        move |offset, rs| StridedMatrix {
            ptr: base.wrapping_add(offset),
            rs,
            cs: 1,
        }
    }

    #[test]
    fn rows_on_lines_needs_a_line_stride_and_start() {
        let mut data = crate::gemm::pack::AlignedBuf::<f32>::default();
        let at = placed(&mut data, CACHE_LINE);
        // 784 floats (49 lines) apart, starting on a line, or reaching one
        // at the column asked about.
        assert!(rows_on_lines(&at(0, 784), 0));
        assert!(rows_on_lines(&at(3, 784), 13));
        // Off a line.
        assert!(!rows_on_lines(&at(3, 784), 0));
        assert!(!rows_on_lines(&at(0, 784), 8));
        // 1000 floats apart (62.5 lines): the second row is off a line.
        assert!(!rows_on_lines(&at(0, 1000), 0));
    }

    #[test]
    fn the_peel_reaches_the_next_pair_or_line() {
        let mut data = crate::gemm::pack::AlignedBuf::<f32>::default();
        // The offsets below count from a pair of lines.
        let at = placed(&mut data, B_ROW_ALIGN);
        // Rows a whole number of line pairs apart (3136 floats: 98 × 128
        // bytes), starting 3 floats past a pair: 29 columns to the next one.
        assert_eq!(columns_to_aligned_rows(&at(3, 3136), 0, 3136, 256, 32), 29);
        // One line past a pair: 16 columns.
        assert_eq!(columns_to_aligned_rows(&at(16, 3136), 0, 3136, 256, 32), 16);
        // From column 29 of that matrix on, nothing to peel.
        assert_eq!(columns_to_aligned_rows(&at(3, 3136), 29, 3000, 256, 32), 0);
        // Rows an odd number of lines apart (3120 floats: 195 lines): only
        // a line boundary is the same in every row.
        assert_eq!(columns_to_aligned_rows(&at(3, 3120), 0, 3120, 256, 32), 13);
        assert_eq!(columns_to_aligned_rows(&at(16, 3120), 0, 3120, 256, 32), 0);
        // Rows that drift across lines: no peel helps every row.
        assert_eq!(columns_to_aligned_rows(&at(3, 3137), 0, 3137, 256, 32), 0);
        // Too few panels to repay a peel.
        assert_eq!(columns_to_aligned_rows(&at(3, 3136), 0, 64, 256, 32), 0);
        // A block narrower than the peel, or a peel that would save a block.
        assert_eq!(columns_to_aligned_rows(&at(3, 3136), 0, 10, 256, 32), 0);
        assert_eq!(
            columns_to_aligned_rows(&at(3, 3136), 0, 2048 + 5, 2048, 32),
            0
        );
    }

    #[test]
    fn a_column_major_a_in_place_gets_the_depth_its_lines_fit() {
        let kernel = crate::gemm::kernels::kernel_for(crate::arch::Isa::Portable).with_blocking(
            crate::testing::Blocking {
                mc: 96,
                kc: 512,
                nc: 1024,
            },
        );
        let KernelInfo { mr, nr, .. } = *kernel.info();
        let a = |rs: isize, cs: isize| {
            ASource::Strided(StridedMatrix {
                ptr: std::ptr::null::<f32>(),
                rs,
                cs,
            })
        };
        let line = cache_hierarchy().l1d.line;
        let want = (512 * mr * 4 / line.max(mr * 4)).next_multiple_of(8);
        let got = in_place_column_major_depth(&a(1, 2048), &kernel, nr);
        assert_eq!(got, (want < 512).then_some(want), "line {line}, mr {mr}");
        // Row-major, or too many column panels to be read in place: KC.
        assert_eq!(in_place_column_major_depth(&a(2048, 1), &kernel, nr), None);
        let wide = nr * (A_IN_PLACE_MAX_PANELS + 1);
        assert_eq!(
            in_place_column_major_depth(&a(1, 2048), &kernel, wide),
            None
        );
    }
}
