//! Every way an `sgemm` call can be refused: each refusal is asserted by
//! error variant with its payload and by a `Display` message that names the
//! offending value(s), with C left alone; the near misses that must be
//! accepted are computed. Nothing may panic. (Convolution refusals are in
//! `bad_input_conv.rs`.)

mod common;

use common::assert_mentions;
use cpuconv::gemm::{sgemm, GemmOptions, MatMut, MatRef};
use cpuconv::GemmError;

fn gemm_err(a: MatRef<'_>, b: MatRef<'_>, c: MatMut<'_>) -> (GemmError, String) {
    let e = sgemm(1.0, a, b, 0.0, c, &GemmOptions::default()).expect_err("must be rejected");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn gemm_dimension_mismatch() {
    let a = [1.0; 6];
    let b = [1.0; 8];
    let mut c = [0.0; 4];
    // A 2×3, B 4×2: inner dimensions disagree.
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 4, 2),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::DimensionMismatch {
            a: (2, 3),
            b: (4, 2),
            c: (2, 2)
        }
    );
    assert_mentions(&msg, &["2×3", "4×2", "2×2"]);
    // A 2×3, B 3×2, C 2×1... wrong C rows/cols.
    let b = [1.0; 6];
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        MatMut::row_major(&mut c, 1, 2),
    );
    assert_eq!(
        e,
        GemmError::DimensionMismatch {
            a: (2, 3),
            b: (3, 2),
            c: (1, 2)
        }
    );
    assert_mentions(&msg, &["2×3", "3×2", "1×2"]);
    let (e, _) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        MatMut::row_major(&mut c, 2, 1),
    );
    assert!(matches!(e, GemmError::DimensionMismatch { .. }), "{e:?}");
    assert_eq!(c, [0.0; 4], "a rejected call wrote C");
}

#[test]
fn gemm_view_past_the_end() {
    let a = [1.0; 5];
    let b = [1.0; 6];
    let mut c = [0.0; 4];
    // A 2×3 row-major needs offsets 0..=5, the slice has 5.
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "a",
            min_offset: 0,
            max_offset: 5,
            len: 5
        }
    );
    assert_mentions(&msg, &["a", "0..=5", "5 elements"]);
    // B with a padded row stride of 4: offsets up to 2·4 + 1 = 9, slice 6.
    let a = [1.0; 6];
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::new(&b, 3, 2, 4, 1),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "b",
            min_offset: 0,
            max_offset: 9,
            len: 6
        }
    );
    assert_mentions(&msg, &["b", "0..=9", "6"]);
    // C too short.
    let mut short = [0.0; 3];
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        MatMut::row_major(&mut short, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "c",
            min_offset: 0,
            max_offset: 3,
            len: 3
        }
    );
    assert_mentions(&msg, &["c", "0..=3", "3"]);
    assert_eq!(short, [0.0; 3]);
}

#[test]
fn gemm_negative_stride_reaching_before_the_start() {
    // Element (0, 0) of a view is data[0]; a negative row stride puts row 1
    // at offset −3, before the slice.
    let a = [1.0; 6];
    let b = [1.0; 6];
    let mut c = [0.0; 4];
    let (e, msg) = gemm_err(
        MatRef::new(&a, 2, 3, -3, 1),
        MatRef::row_major(&b, 3, 2),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "a",
            min_offset: -3,
            max_offset: 2,
            len: 6
        }
    );
    assert_mentions(&msg, &["a", "-3..=2", "6"]);
    // Negative column stride on B.
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::new(&b, 3, 2, 2, -1),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "b",
            min_offset: -1,
            max_offset: 4,
            len: 6
        }
    );
    assert_mentions(&msg, &["b", "-1..=4"]);
    // And on C.
    let (e, _) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        MatMut::new(&mut c, 2, 2, -2, 1),
    );
    assert_eq!(
        e,
        GemmError::OutOfBounds {
            matrix: "c",
            min_offset: -2,
            max_offset: 1,
            len: 4
        }
    );
    assert_eq!(c, [0.0; 4]);
}

#[test]
fn gemm_negative_strides_with_an_offset_are_accepted() {
    // A = [1 2 3; 4 5 6] read with both strides negative from the last
    // element: the view is [6 5 4; 3 2 1].
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3×2
    let mut c = [0.0; 4];
    sgemm(
        1.0,
        MatRef::with_offset(&a, 5, 2, 3, -3, -1),
        MatRef::row_major(&b, 3, 2),
        0.0,
        MatMut::row_major(&mut c, 2, 2),
        &GemmOptions::default(),
    )
    .unwrap();
    // [6 5 4]·B = [6+4, 5+4], [3 2 1]·B = [3+1, 2+1]
    assert_eq!(c, [10.0, 9.0, 4.0, 3.0]);
    // The same offset with a stride reaching past the start is refused.
    assert!(sgemm(
        1.0,
        MatRef::with_offset(&a, 4, 2, 3, -3, -1),
        MatRef::row_major(&b, 3, 2),
        0.0,
        MatMut::row_major(&mut c, 2, 2),
        &GemmOptions::default(),
    )
    .is_err());
}

#[test]
fn gemm_overlapping_output() {
    let a = [1.0; 6];
    let b = [1.0; 9];
    let mut c = [0.0; 9];
    // Row stride 0 with 2 rows: rows 0 and 1 share memory.
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 3),
        MatMut::new(&mut c, 2, 3, 0, 1),
    );
    assert_eq!(
        e,
        GemmError::OverlappingOutput {
            row_stride: 0,
            col_stride: 1
        }
    );
    assert_mentions(&msg, &["row stride 0", "column stride 1"]);
    // Column stride 0 with 3 columns.
    let (e, msg) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 3),
        MatMut::new(&mut c, 2, 3, 3, 0),
    );
    assert_eq!(
        e,
        GemmError::OverlappingOutput {
            row_stride: 3,
            col_stride: 0
        }
    );
    assert_mentions(&msg, &["row stride 3", "column stride 0"]);
    // Row stride 2 with 3 columns of stride 1: (0, 2) and (1, 0) collide.
    let (e, _) = gemm_err(
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 3),
        MatMut::new(&mut c, 2, 3, 2, 1),
    );
    assert_eq!(
        e,
        GemmError::OverlappingOutput {
            row_stride: 2,
            col_stride: 1
        }
    );
    assert_eq!(c, [0.0; 9], "a rejected call wrote C");
}

#[test]
fn gemm_degenerate_strides_that_do_not_overlap_are_accepted() {
    // A single row may have any row stride (even 0); a single column any
    // column stride. A may use stride 0 (a broadcast row).
    let a = [2.0, 3.0];
    let b = [1.0, 10.0, 100.0, 1000.0];
    let mut c = [0.0; 2];
    // A: 1×2 with row stride 0; B 2×2 row-major; C 1×2 with row stride 0.
    sgemm(
        1.0,
        MatRef::new(&a, 1, 2, 0, 1),
        MatRef::row_major(&b, 2, 2),
        0.0,
        MatMut::new(&mut c, 1, 2, 0, 1),
        &GemmOptions::default(),
    )
    .unwrap();
    // [2 3]·[1 10; 100 1000] = [302, 3020]
    assert_eq!(c, [302.0, 3020.0]);
    // A broadcast: 2×2 with row stride 0 (both rows [2 3]).
    let mut c = [0.0; 4];
    sgemm(
        1.0,
        MatRef::new(&a, 2, 2, 0, 1),
        MatRef::row_major(&b, 2, 2),
        0.0,
        MatMut::row_major(&mut c, 2, 2),
        &GemmOptions::default(),
    )
    .unwrap();
    assert_eq!(c, [302.0, 3020.0, 302.0, 3020.0]);
}

#[test]
fn gemm_view_offset_overflow() {
    let a = [1.0; 4];
    let b = [1.0; 4];
    let mut c = [0.0; 4];
    // (rows − 1)·row_stride + (cols − 1)·col_stride = isize::MAX + 1.
    let (e, msg) = gemm_err(
        MatRef::new(&a, 2, 2, isize::MAX, 1),
        MatRef::row_major(&b, 2, 2),
        MatMut::row_major(&mut c, 2, 2),
    );
    assert_eq!(
        e,
        GemmError::Overflow {
            what: "matrix view offsets"
        }
    );
    assert_mentions(&msg, &["matrix view offsets", "overflow"]);
    // More rows than isize can index.
    let (e, _) = gemm_err(
        MatRef::new(&a, usize::MAX, 1, 1, 1),
        MatRef::row_major(&b, 1, 1),
        MatMut::new(&mut c, usize::MAX, 1, 1, 1),
    );
    assert_eq!(
        e,
        GemmError::Overflow {
            what: "matrix view offsets"
        }
    );
    assert_eq!(c, [0.0; 4]);
}

/// An interleaved C whose elements are all distinct — 2×2 with row stride 3
/// and column stride 2 touches offsets {0, 2, 3, 5} — is not overlapping and
/// must be accepted (the overlap check is exact, not just sufficient).
#[test]
fn gemm_injective_interleaved_output_is_accepted() {
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [1.0, 0.0, 0.0, 1.0];
    let mut c = [-1.0; 6];
    sgemm(
        1.0,
        MatRef::row_major(&a, 2, 2),
        MatRef::row_major(&b, 2, 2),
        0.0,
        MatMut::new(&mut c, 2, 2, 3, 2),
        &GemmOptions::default(),
    )
    .expect("an injective view must be accepted");
    // C = A: (0,0)->0, (0,1)->2, (1,0)->3, (1,1)->5; offsets 1 and 4 untouched.
    assert_eq!(c, [1.0, -1.0, 2.0, 3.0, -1.0, 4.0]);
}
