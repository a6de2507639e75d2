//! Implicit GEMM: the GEMM's B-packing reads the input through an im2col
//! *view*, so the `[C/g·R·S, OH·OW]` column matrix never exists. The only
//! extra memory is the packing panels of each thread (bounded by the
//! blocking: `KC × NC` of B plus `MC × KC` of A), whatever the image size or
//! batch. Where the output channels fit one MC block (the usual layer), the
//! view writes the rows of each `KC × NC` block of B straight into that
//! buffer for the kernels to read in place; otherwise it packs panels.

use super::im2col::{im2col_row_after, im2col_rows, ColumnTap};
use crate::gemm::engine::BSource;
use crate::geometry::ConvGeometry;

/// The column matrix of one group of one image, never materialised: element
/// `(row, col)` with `row = (c·R + r)·S + s` and `col = oh·OW + ow` is the input
/// pixel that weight tap `(c, r, s)` meets at output `(oh, ow)`, or 0 in the
/// padding.
pub(crate) struct Im2colView<'a> {
    pub g: &'a ConvGeometry,
    /// The group's channels of one image: `[C/g, H, W]`.
    pub image: &'a [f32],
}

impl BSource<f32> for Im2colView<'_> {
    /// Each row of the block is first built in `staging` (two rows of at
    /// most NC floats, L1-resident, used in turn so that a row can be
    /// shifted from the one before) by the same row filler the explicit
    /// lowering uses, then dealt out to the panels in fixed-width copies.
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
        let panels = nc.div_ceil(nr);
        let panel_len = kc * nr;
        // Two staging rows, used in turn, so that at stride 1 each row can
        // be built from the one before it (`im2col_row_after`). Rounded up to whole panels
        // so the last one is zero-padded.
        let width = panels * nr;
        staging.clear();
        staging.resize(2 * width, 0.0);
        let mut tap = ColumnTap::of_row(self.g, k0);
        for p in 0..kc {
            let (even, odd) = staging.split_at_mut(width);
            let (cur, prev) = if p % 2 == 0 { (even, odd) } else { (odd, even) };
            // Only the row just before is kept: enough for stride 1.
            let prev = (p > 0 && self.g.stride_w == 1).then_some(&prev[..nc]);
            im2col_row_after(self.g, self.image, tap, j0, prev, &mut cur[..nc]);
            deal_row(cur, nr, &mut dst[p * nr..], panel_len);
            tap = tap.next(self.g);
        }
    }

    /// Each row is written where the kernels will read it. Measured in one
    /// process against `pack_block`, alternating (1 thread AVX-512, plans):
    /// r50_3x3 +6%, batch16 +6%, r50_conv1 (implicit) +6%, r50_3x3_s2 +2%,
    /// r50_deep within noise.
    unsafe fn write_rows(
        &self,
        k0: usize,
        kc: usize,
        j0: usize,
        nc: usize,
        ld: usize,
        dst: &mut [f32],
    ) -> bool {
        im2col_rows(
            self.g,
            self.image,
            ColumnTap::of_row(self.g, k0),
            j0..j0 + nc,
            ld,
            kc,
            dst,
        );
        for row in dst.chunks_exact_mut(ld).take(kc) {
            row[nc..].fill(0.0);
        }
        true
    }
}

/// Copies `row` in chunks of `nr` to `dst[q·panel_len..]`, with the width
/// known at compile time for the kernels' panel widths so each chunk is a
/// few vector moves rather than a `memcpy` call.
fn deal_row(row: &[f32], nr: usize, dst: &mut [f32], panel_len: usize) {
    fn fixed<const W: usize>(row: &[f32], dst: &mut [f32], panel_len: usize) {
        for (q, chunk) in row.chunks_exact(W).enumerate() {
            let to: &mut [f32; W] = (&mut dst[q * panel_len..][..W])
                .try_into()
                .expect("W floats");
            let from: &[f32; W] = chunk.try_into().expect("W floats");
            *to = *from;
        }
    }
    match nr {
        32 => fixed::<32>(row, dst, panel_len),
        16 => fixed::<16>(row, dst, panel_len),
        8 => fixed::<8>(row, dst, panel_len),
        _ => {
            for (q, chunk) in row.chunks_exact(nr).enumerate() {
                dst[q * panel_len..][..nr].copy_from_slice(chunk);
            }
        }
    }
}
