//! Matrix transposes in SIMD tiles (8×8 through the AVX tile kernel where
//! the path has AVX2, 4×4 elsewhere and at the edges), for the layouts that
//! change hands between a GEMM's operands and the caller's tensors: the
//! packing of a column-major B, the weight gradient's `dYᵀ` panels and `dW`
//! stores, the dense tile's and the phases' packed weights.

use crate::arch::{clamp_isa, Isa};
use wide::f32x4;

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`, on the
/// active path ([`transpose_on`]).
pub(crate) fn transpose(
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    transpose_on(crate::isa(), src, lds, rows, cols, dst, ldd);
}

/// [`transpose`] on path `isa` (clamped to the CPU): the AVX2 and AVX-512
/// paths take the whole 8×8 tiles through the AVX tile kernel (on a CPU
/// that has AVX2), the rest of the matrix (and the portable path all of it)
/// 4×4 tiles and element loops. Every path moves the same floats. In one
/// process (1 thread, Zen 5), 4×4 → 8×8: the weight gradient's `dYᵀ` of
/// r50_conv1 (64 × 12544) 124–151 → 94–114 µs, 64 × 3136 27–29 → 20–22
/// µs, the bands' 128 × 28 blocks 0.3–0.4 → 0.2 µs.
pub(crate) fn transpose_on(
    isa: Isa,
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    let store = |x: &mut f32, v: f32| *x = v;
    let (rows8, cols8) = (rows / 8 * 8, cols / 8 * 8);
    let avx = clamp_isa(isa) >= Isa::Avx2 && Isa::Avx2.is_supported();
    if !avx || rows8 == 0 || cols8 == 0 {
        transpose_with(src, lds, rows, cols, dst, ldd, store);
        return;
    }
    // Bounds once, as `transpose_with` checks them, for the tiles' raw
    // reads and writes.
    let src = &src[..(rows - 1) * lds + cols];
    let dst = &mut dst[..(cols - 1) * ldd + rows];
    cfg_if::cfg_if! {
        if #[cfg(target_arch = "x86_64")] {
            // SAFETY: rows8 ≤ rows and cols8 ≤ cols, so the tiles lie inside
            // both slices as bounded above; both are multiples of 8; the CPU
            // has AVX2 (and so AVX).
            unsafe {
                crate::gemm::kernels::avx2::transpose_tiles_8x8(
                    src.as_ptr(),
                    lds,
                    rows8,
                    cols8,
                    dst.as_mut_ptr(),
                    ldd,
                )
            };
        } else {
            transpose_with(src, lds, rows8, cols8, dst, ldd, store);
        }
    }
    // The columns right of the tiles, then the rows below them.
    if cols > cols8 {
        let (src, dst) = (&src[cols8..], &mut dst[cols8 * ldd..]);
        transpose_with(src, lds, rows8, cols - cols8, dst, ldd, store);
    }
    if rows > rows8 {
        let (src, dst) = (&src[rows8 * lds..], &mut dst[rows8..]);
        transpose_with(src, lds, rows - rows8, cols, dst, ldd, store);
    }
}

/// `dst[c·ldd + r] = src[starts[r] + c]` for `r < starts.len()`, `c <
/// cols`: a transpose whose source rows start anywhere in `src` (the
/// weight gradient's tap rows, each a run of a zero-padded input plane),
/// on path `isa` (clamped to the CPU). AVX2 and AVX-512 take eight rows at
/// a time through the AVX tile kernel where `cols ≥ 8`, the rest 4×4
/// `wide` tiles where `cols ≥ 4`; a width that is not a multiple of the
/// tile ends with a tile overlapping the one before it, which writes the
/// same floats again. Element loops do what is left.
///
/// # Panics
/// If a source row runs past `src` or the destination past `dst`.
pub(crate) fn transpose_rows_at(
    isa: Isa,
    src: &[f32],
    starts: &[usize],
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    let rows = starts.len();
    if rows == 0 || cols == 0 {
        return;
    }
    let last = starts.iter().max().copied().unwrap_or(0);
    let src = &src[..last + cols];
    let dst = &mut dst[..(cols - 1) * ldd + rows];
    let mut done = 0;
    cfg_if::cfg_if! {
        if #[cfg(target_arch = "x86_64")] {
            let avx = clamp_isa(isa) >= Isa::Avx2 && Isa::Avx2.is_supported();
            if avx && cols >= 8 && rows >= 8 {
                done = rows / 8 * 8;
                // SAFETY: every row read (starts[r] + cols ≤ src.len()) and
                // every column written ((cols − 1)·ldd + done ≤ dst.len())
                // lies inside the slices as bounded above; `done` is a
                // multiple of 8 and cols ≥ 8; the CPU has AVX2 (and so AVX).
                unsafe {
                    crate::gemm::kernels::avx2::transpose_rows_at_8x8(
                        src.as_ptr(),
                        &starts[..done],
                        cols,
                        dst.as_mut_ptr(),
                        ldd,
                    )
                };
            }
        } else {
            // Only the 4×4 tiles and the element loops exist here.
            let _ = isa;
        }
    }
    if cols >= 4 {
        for r0 in (done..rows - (rows - done) % 4).step_by(4) {
            let mut c0 = 0;
            loop {
                let c = c0.min(cols - 4);
                let tile =
                    f32x4::transpose(std::array::from_fn(|i| load4(&src[starts[r0 + i] + c..])));
                for (e, column) in tile.iter().enumerate() {
                    let out: &mut [f32; 4] = (&mut dst[(c + e) * ldd + r0..][..4])
                        .try_into()
                        .expect("4 floats");
                    *out = column.to_array();
                }
                c0 += 4;
                if c0 >= cols {
                    break;
                }
            }
            done = r0 + 4;
        }
    }
    for (r, &start) in starts.iter().enumerate().skip(done) {
        for (c, &v) in src[start..start + cols].iter().enumerate() {
            dst[c * ldd + r] = v;
        }
    }
}

/// `dst[c·ldd + r] ⊕= src[r·lds + c]` for `r < rows`, `c < cols`, with
/// `⊕=` being `store`: in 4×4 tiles (four vector loads, the `wide` crate's
/// transpose — a few shuffles — and four vector stores) and element loops
/// at the edges. The same tiles written as element loops over arrays
/// compiled to scalar moves through the stack.
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
    if rows == 0 || cols == 0 {
        return;
    }
    let (rows_full, cols_full) = (rows / 4 * 4, cols / 4 * 4);
    let src = &src[..(rows - 1) * lds + cols];
    let dst = &mut dst[..(cols - 1) * ldd + rows];
    // Sixteen columns (one cache line of each source row) at a time, over
    // all the rows: each source line is read whole, and the sixteen
    // destination rows being filled stay in L1 until they are complete.
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for c_block in (0..cols_full).step_by(16) {
        let c_end = (c_block + 16).min(cols_full);
        for r0 in (0..rows_full).step_by(4) {
            for c0 in (c_block..c_end).step_by(4) {
                // SAFETY: rows r0..r0 + 4 ≤ rows and columns c0..c0 + 4 ≤
                // cols, so every source float is inside `src` as sliced above
                // ((rows − 1)·lds + cols floats) and every destination float
                // (column c0 + j, rows r0..r0 + 4) inside `dst` ((cols −
                // 1)·ldd + rows floats): the per-element bounds checks these
                // raw reads and writes skip cost 4 instructions a float.
                unsafe {
                    let tile = f32x4::transpose(std::array::from_fn(|i| {
                        f32x4::new(
                            sp.add((r0 + i) * lds + c0)
                                .cast::<[f32; 4]>()
                                .read_unaligned(),
                        )
                    }));
                    for (j, column) in tile.iter().enumerate() {
                        let out = &mut *dp.add((c0 + j) * ldd + r0).cast::<[f32; 4]>();
                        for (x, v) in out.iter_mut().zip(column.to_array()) {
                            store(x, v);
                        }
                    }
                }
            }
        }
    }
    for r0 in (0..rows_full).step_by(4) {
        for c in cols_full..cols {
            for i in 0..4 {
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

/// The first four floats of `s` as a vector.
#[inline(always)]
fn load4(s: &[f32]) -> f32x4 {
    let a: [f32; 4] = s[..4].try_into().expect("4 floats");
    f32x4::new(a)
}

/// `rows[j][i] ⊕= src[i·lds + j]` for `i < len`, `j < rows.len()`, with
/// `⊕=` being `store`: 4×4 tiles as in [`transpose_with`] where there are
/// 4 rows, element loops elsewhere.
#[inline(always)]
pub(crate) fn store_columns(
    src: &[f32],
    lds: usize,
    len: usize,
    rows: &mut [&mut [f32]],
    store: impl Fn(&mut f32, f32) + Copy,
) {
    let full = if rows.len() == 4 { len / 4 * 4 } else { 0 };
    for i0 in (0..full).step_by(4) {
        let tile = f32x4::transpose(std::array::from_fn(|i| load4(&src[(i0 + i) * lds..])));
        for (row, column) in rows.iter_mut().zip(tile) {
            let out: &mut [f32; 4] = (&mut row[i0..i0 + 4]).try_into().expect("4 floats");
            for (x, v) in out.iter_mut().zip(column.to_array()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path moves every float to its place and nothing else, on
    /// shapes around the 8×8 and 4×4 tiles (whole tiles, remainders right
    /// and below, both), with padded strides whose padding must stay as
    /// it was.
    #[test]
    fn transpose_matches_the_definition_on_every_path() {
        let sizes = [1, 3, 4, 7, 8, 9, 16, 17, 31, 33, 64];
        for isa in crate::arch::supported_isas() {
            for &rows in &sizes {
                for &cols in &sizes {
                    let (lds, ldd) = (cols + 3, rows + 5);
                    let src: Vec<f32> = (0..rows * lds).map(|i| i as f32).collect();
                    let mut dst = vec![f32::NAN; cols * ldd];
                    transpose_on(isa, &src, lds, rows, cols, &mut dst, ldd);
                    for c in 0..cols {
                        for r in 0..ldd {
                            let got = dst[c * ldd + r];
                            if r < rows {
                                assert_eq!(got, src[r * lds + c], "{isa} {rows}×{cols} ({r}, {c})");
                            } else {
                                assert!(got.is_nan(), "{isa} {rows}×{cols}: wrote padding");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows that start anywhere (out of order, overlapping each other, at
    /// odd offsets): every path puts every float in its place and writes
    /// nothing else, for row counts around the 8- and 4-row groups and
    /// widths around the 8- and 4-wide tiles, where the last tile overlaps
    /// the one before it.
    #[test]
    fn transpose_rows_at_matches_the_definition_on_every_path() {
        let src: Vec<f32> = (0..400).map(|i| i as f32).collect();
        for isa in crate::arch::supported_isas() {
            for rows in [1, 3, 4, 5, 8, 9, 12, 16, 19, 32] {
                let starts: Vec<usize> = (0..rows).map(|r| (r * 37 + 11) % 300).collect();
                for cols in [1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 16, 17, 49] {
                    let ldd = rows + 3;
                    let mut dst = vec![f32::NAN; cols * ldd];
                    transpose_rows_at(isa, &src, &starts, cols, &mut dst, ldd);
                    for c in 0..cols {
                        for r in 0..ldd {
                            let got = dst[c * ldd + r];
                            if r < rows {
                                let want = src[starts[r] + c];
                                assert_eq!(got, want, "{isa} {rows}×{cols} ({r}, {c})");
                            } else {
                                assert!(got.is_nan(), "{isa} {rows}×{cols}: wrote padding");
                            }
                        }
                    }
                }
            }
        }
    }
}
