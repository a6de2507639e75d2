//! Matrix transposes in 4×4 SIMD tiles, for the layouts that change hands
//! between a GEMM's operands and the caller's tensors: the packing of a
//! column-major B, the weight gradient's `dYᵀ` panels and `dW` stores, the
//! dense tile's and the phases' packed weights.

use wide::f32x4;

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`.
pub(crate) fn transpose(
    src: &[f32],
    lds: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    transpose_with(src, lds, rows, cols, dst, ldd, |x, v| *x = v);
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
