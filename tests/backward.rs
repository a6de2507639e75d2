//! The backward passes (`Conv2d::backward_input`, `backward_weight`,
//! `backward_bias`, `backward`), today all the `Direct` reference:
//!
//! * the seed example's gradients, worked by hand and asserted exactly;
//! * a stride that does not divide the input: the pixels the forward never
//!   reads get exactly 0;
//! * central finite differences, in f64, of `L = ⟨conv(x, w) + b, dy⟩` on
//!   small shapes covering stride, asymmetric padding, dilation, groups and
//!   both modes;
//! * the adjoint identity `⟨conv(x, w), dy⟩ = ⟨x, dX⟩ = ⟨w, dW⟩` as a
//!   property test on random shapes;
//! * `Algorithm::Im2col` against `Direct` for grad input and grad weight,
//!   as a property test on random shapes, on every ISA under test, both GEMM
//!   backends, sequential and threaded, accumulate on and off, with the
//!   kernel trace showing the forced ISA's GEMM ran; the tolerance per
//!   element is `2·(T + 1)·ε·M` with `M` the sum of the element's term
//!   magnitudes (both results are within `(T + 1)·ε·M` of the exact value,
//!   summed in different orders), computed by the Direct passes on `|x|`,
//!   `|w|`, `|dy|`, plus, when accumulating, the rounding of the final add
//!   (`ε·|result|` each): `common::grads::assert_close`, shared with
//!   `tests/grad_weight.rs`, where this derivation is written out with the
//!   code;
//! * accumulate vs overwrite, every subset of `Grads` against the single
//!   calls, and the errors for bad buffer lengths and algorithms.
//!
//! Error bounds. Every random value (x, w, b, dy) lies in `[-1, 1)`. A
//! gradient element is an f32 sum of `T` products (`T ≤ (K/g)·R·S` for
//! grad input, `T = N·OH·OW` at most for grad weight and bias), so with
//! `M = Σ |terms|` it is within `(T + 1)·ε·M` of the exact value (`ε =
//! f32::EPSILON`: the products' rounding plus any summation order).
//!
//! * Finite differences: `L` is linear in each variable, so the central
//!   difference `(L(v + h) − L(v − h)) / 2h` has no truncation error at all
//!   and only f64 rounding, at most `2·n_L·ε₆₄·B / 2h` for the `n_L` terms of
//!   `L`, each at most `B = 1 + h` in size; with `h = 1/2` that is far
//!   below the f32 error, bounded with `M ≤ T` (each term below 1) by
//!   `(T + 1)·T·ε`.
//! * Adjoint: the three inner products are f64 sums (exact to `n·ε₆₄` of
//!   the magnitudes) of f32 results, and all three share one magnitude,
//!   `S = Σ_taps |dy|·|x|·|w|` (computed in f64 by the test). The forward's
//!   error contributes at most `(T_f + 1)·ε·S` (`T_f = (C/g)·R·S`), grad
//!   input's `(T_x + 1)·ε·S` and grad weight's `(T_w + 1)·ε·S`, so two of
//!   them differ by at most the sum of their two bounds (plus the f64 part).

mod common;

use common::grads::{assert_close, build, cases, magnitudes, random_tensors, Case, Shapes};
use common::{
    adjoint_tolerance, assert_mentions, bits, dot, engine_combos, proptest_config, to_f64, Rng,
};
use cpuconv::testing::traced;
use cpuconv::{
    Algorithm, BackwardOptions, Conv2d, Conv2dParams, ConvError, ConvGeometry, ConvMode,
    GemmBackend, Grads, Padding, Parallelism,
};
use proptest::prelude::*;

/// The seed input, row-major:
///
/// ```text
/// 1 0 1
/// 2 1 0
/// 0 1 1
/// ```
const X: [f32; 9] = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];

/// The identity-diagonal 2×2 kernel `[[1, 0], [0, 1]]`.
const DIAG: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

/// A kernel with no symmetry, so a flip is visible: `[[1, 2], [3, 4]]`.
const K1234: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// The chosen grad output `[[1, 2], [3, 4]]`.
const DY: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

/// The `Direct` reference: every comparison below is against it (the
/// default, `Auto`, picks a fast path per pass and shape).
fn direct_options() -> BackwardOptions {
    BackwardOptions::new(Algorithm::Direct)
}

/// `(dX, dW, db)` through the three single-pass calls, overwriting.
fn gradients(
    conv: &Conv2d,
    input: &[f32],
    weight: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = conv.geometry();
    let mut dx = vec![f32::NAN; g.input_len()];
    let mut dw = vec![f32::NAN; g.weight_len()];
    let mut db = vec![f32::NAN; g.out_channels];
    conv.backward_input(weight, dy, &mut dx, &direct_options())
        .expect("grad input");
    conv.backward_weight(input, dy, &mut dw, &direct_options())
        .expect("grad weight");
    conv.backward_bias(dy, &mut db).expect("grad bias");
    (dx, dw, db)
}

/// The seed example, `y = x ⋆ DIAG` (cross-correlation, stride 1, no
/// padding), `y[i][j] = x[i][j] + x[i+1][j+1] = [[2, 0], [3, 2]]`, with
/// `dy = [[1, 2], [3, 4]]`. By hand:
///
/// ```text
/// dX[a][b] = Σ_{i,j} dy[i][j]·w[a−i][b−j]; w is 1 at (0,0) and (1,1), so
///          = dy[a][b] + dy[a−1][b−1]   (each term only where it exists)
///   dX[0] = [dy00,  dy01,  0   ]            = [1, 2, 0]
///   dX[1] = [dy10,  dy11 + dy00,  dy01]     = [3, 4+1, 2] = [3, 5, 2]
///   dX[2] = [0,     dy10,  dy11]            = [0, 3, 4]
///
/// dW[r][s] = Σ_{i,j} dy[i][j]·x[i+r][j+s]
///   dW00 = 1·x00 + 2·x01 + 3·x10 + 4·x11 = 1 + 0 + 6 + 4 = 11
///   dW01 = 1·x01 + 2·x02 + 3·x11 + 4·x12 = 0 + 2 + 3 + 0 = 5
///   dW10 = 1·x10 + 2·x11 + 3·x20 + 4·x21 = 2 + 2 + 0 + 4 = 8
///   dW11 = 1·x11 + 2·x12 + 3·x21 + 4·x22 = 1 + 0 + 3 + 4 = 8
///
/// db = 1 + 2 + 3 + 4 = 10
/// ```
///
/// Small integers, so every value is exact.
#[test]
fn seed_example_by_hand() {
    let conv = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).build().unwrap();
    let y = conv
        .forward_to_vec(&X, &DIAG, None, Algorithm::Direct)
        .unwrap();
    assert_eq!(y, [2.0, 0.0, 3.0, 2.0]);
    let (dx, dw, db) = gradients(&conv, &X, &DIAG, &DY);
    assert_eq!(dx, [1.0, 2.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0]);
    assert_eq!(dw, [11.0, 5.0, 8.0, 8.0]);
    assert_eq!(db, [10.0]);
}

/// The seed example with the asymmetric kernel `[[1, 2], [3, 4]]`, in both
/// modes. Cross-correlation, by hand:
///
/// ```text
/// dX[a][b] = Σ dy[i][j]·w[a−i][b−j]
///   dX[0] = [1·1,        1·2 + 2·1,                2·2]       = [1, 4, 4]
///   dX[1] = [1·3 + 3·1,  1·4 + 2·3 + 3·2 + 4·1,    2·4 + 4·2] = [6, 20, 16]
///   dX[2] = [3·3,        3·4 + 4·3,                4·4]       = [9, 24, 16]
/// ```
///
/// dW does not depend on the weight: `[11, 5, 8, 8]` as above. True
/// convolution multiplies tap `(r, s)` by `w[1−r][1−s]`, which is
/// cross-correlation with the flipped kernel `[[4, 3], [2, 1]]`: its dX is
/// the cross-correlation dX of `[4, 3, 2, 1]`, and weight element `(r, s)`
/// receives what tap `(1−r, 1−s)` did, so dW is `[8, 8, 5, 11]`.
#[test]
fn seed_example_asymmetric_kernel_both_modes() {
    let conv = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).build().unwrap();
    let (dx, dw, db) = gradients(&conv, &X, &K1234, &DY);
    assert_eq!(dx, [1.0, 4.0, 4.0, 6.0, 20.0, 16.0, 9.0, 24.0, 16.0]);
    assert_eq!(dw, [11.0, 5.0, 8.0, 8.0]);
    assert_eq!(db, [10.0]);

    let flipped = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2))
        .mode(ConvMode::Convolution)
        .build()
        .unwrap();
    let (dx_conv, dw_conv, db_conv) = gradients(&flipped, &X, &K1234, &DY);
    let (dx_flip, _, _) = gradients(&conv, &X, &[4.0, 3.0, 2.0, 1.0], &DY);
    assert_eq!(dx_conv, dx_flip);
    assert_eq!(dw_conv, [8.0, 8.0, 5.0, 11.0]);
    assert_eq!(db_conv, [10.0]);
}

/// A 5×5 input, 2×2 kernel, stride 2: the two outputs per axis read rows
/// and columns 0–3, never 4. Windows do not overlap, so
/// `dX[2i + r][2j + s] = dy[i][j]·w[r][s]` exactly, and row 4 and column 4
/// are exactly 0 — written over a buffer that held NaN.
#[test]
fn stride_that_does_not_divide_leaves_unread_pixels_zero() {
    let conv = Conv2dParams::new(1, 1, (5, 5), 1, (2, 2))
        .stride(2, 2)
        .build()
        .unwrap();
    assert_eq!(conv.output_shape(), [1, 1, 2, 2]);
    let mut dx = vec![f32::NAN; 25];
    conv.backward_input(&K1234, &DY, &mut dx, &direct_options())
        .unwrap();
    for ih in 0..5 {
        for iw in 0..5 {
            let want = if ih == 4 || iw == 4 {
                0.0
            } else {
                DY[(ih / 2) * 2 + iw / 2] * K1234[(ih % 2) * 2 + iw % 2]
            };
            assert_eq!(dx[ih * 5 + iw].to_bits(), want.to_bits(), "dX[{ih}][{iw}]");
        }
    }

    // Asymmetric padding (top 1, left 1) and a 3×3 kernel at stride 2 on
    // 5×5: padded 6×6, two outputs per axis reading padded rows 0–4, i.e.
    // input rows −1..=3; row 4 and column 4 are never read.
    let conv = Conv2dParams::new(1, 1, (5, 5), 1, (3, 3))
        .stride(2, 2)
        .padding(Padding::explicit(1, 0, 1, 0))
        .build()
        .unwrap();
    assert_eq!(conv.output_shape(), [1, 1, 2, 2]);
    let weight: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let mut dx = vec![f32::NAN; 25];
    conv.backward_input(&weight, &DY, &mut dx, &direct_options())
        .unwrap();
    for ih in 0..5 {
        for iw in 0..5 {
            let v = dx[ih * 5 + iw];
            if ih == 4 || iw == 4 {
                assert_eq!(v.to_bits(), 0.0f32.to_bits(), "dX[{ih}][{iw}]");
            } else {
                assert!(v > 0.0, "dX[{ih}][{iw}] = {v}: read, so positive");
            }
        }
    }
}

// --- an f64 evaluation of the definition ---------------------------------------------------

/// `L = ⟨conv(x, w) + b, dy⟩` in f64, straight from the definition (padding
/// taps skipped), using only the geometry's plain fields. Also returns the
/// number of terms summed.
fn loss_f64(g: &ConvGeometry, x: &[f64], w: &[f64], b: &[f64], dy: &[f64]) -> (f64, usize) {
    let (cg, kg) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let (r_len, s_len) = (g.kernel_h, g.kernel_w);
    let p = g.padding;
    let (mut loss, mut terms) = (0.0f64, 0usize);
    for n in 0..g.batch {
        for k in 0..g.out_channels {
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    let d = dy[((n * g.out_channels + k) * g.out_h + oh) * g.out_w + ow];
                    let mut y = b[k];
                    for c in 0..cg {
                        for r in 0..r_len {
                            for s in 0..s_len {
                                let ih = (oh * g.stride_h + r * g.dilation_h) as i64 - p.top as i64;
                                let iw =
                                    (ow * g.stride_w + s * g.dilation_w) as i64 - p.left as i64;
                                if ih < 0 || iw < 0 || ih >= g.in_h as i64 || iw >= g.in_w as i64 {
                                    continue;
                                }
                                let xi = x[((n * g.in_channels + (k / kg) * cg + c) * g.in_h
                                    + ih as usize)
                                    * g.in_w
                                    + iw as usize];
                                let (wr, ws) = match g.mode {
                                    ConvMode::CrossCorrelation => (r, s),
                                    ConvMode::Convolution => (r_len - 1 - r, s_len - 1 - s),
                                };
                                y += xi * w[((k * cg + c) * r_len + wr) * s_len + ws];
                                terms += 1;
                            }
                        }
                    }
                    loss += y * d;
                    terms += 1;
                }
            }
        }
    }
    (loss, terms)
}

/// Central differences of `loss_f64` with respect to every element of one
/// of its tensors (`which`: 0 = x, 1 = w, 2 = b), step `h`.
fn finite_differences(
    g: &ConvGeometry,
    tensors: &[Vec<f64>; 3],
    dy: &[f64],
    which: usize,
    h: f64,
) -> Vec<f64> {
    let mut t = tensors.clone();
    (0..tensors[which].len())
        .map(|i| {
            let v = tensors[which][i];
            t[which][i] = v + h;
            let up = loss_f64(g, &t[0], &t[1], &t[2], dy).0;
            t[which][i] = v - h;
            let down = loss_f64(g, &t[0], &t[1], &t[2], dy).0;
            t[which][i] = v;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// The f32 gradients of the `Direct` references against central
/// differences of `L = ⟨conv(x, w) + b, dy⟩` in f64 (bound in the module
/// doc), on shapes that together cover stride, asymmetric padding,
/// dilation, groups (depthwise too), batches and both modes.
#[test]
fn direct_references_match_finite_differences() {
    let base = |c, hw, k, rs| Conv2dParams::new(1, c, hw, k, rs);
    let cases = [
        base(1, (4, 4), 1, (3, 3)),
        base(2, (7, 6), 3, (3, 2)).stride(2, 3),
        base(2, (5, 4), 2, (3, 3)).padding(Padding::explicit(2, 0, 1, 3)),
        base(1, (7, 7), 2, (3, 2)).dilation(2, 3),
        base(4, (5, 5), 6, (2, 3)).groups(2),
        base(3, (6, 5), 3, (3, 3))
            .groups(3)
            .padding(Padding::explicit(1, 1, 0, 2)),
        base(4, (7, 8), 4, (3, 2))
            .groups(2)
            .stride(2, 1)
            .dilation(1, 2)
            .padding(Padding::explicit(0, 2, 1, 0))
            .mode(ConvMode::Convolution),
        Conv2dParams::new(2, 2, (6, 6), 2, (2, 3))
            .stride(3, 2)
            .dilation(2, 1)
            .padding(Padding::explicit(1, 2, 2, 1))
            .mode(ConvMode::Convolution),
        Conv2dParams::new(2, 2, (5, 6), 4, (3, 3))
            .groups(2)
            .stride(2, 2)
            .padding(Padding::explicit(2, 1, 0, 1)),
    ];
    let eps = f32::EPSILON as f64;
    let h = 0.5;
    for (i, params) in cases.iter().enumerate() {
        let conv = params.build().expect("valid case");
        let g = *conv.geometry();
        let mut rng = Rng::new(0xBAC4_0000 + i as u64);
        let x = rng.vec(g.input_len());
        let w = rng.vec(g.weight_len());
        let b = rng.vec(g.out_channels);
        let dy = rng.vec(g.output_len());
        let (dx, dw, db) = gradients(&conv, &x, &w, &dy);

        let tensors = [to_f64(&x), to_f64(&w), to_f64(&b)];
        let dy64 = to_f64(&dy);
        let n_l = loss_f64(&g, &tensors[0], &tensors[1], &tensors[2], &dy64).1;
        // f64 rounding of the difference quotient: both losses within
        // n_L·ε₆₄·n_L·(1 + h) of exact, divided by 2h.
        let fd_slack = 2.0 * (n_l * n_l) as f64 * f64::EPSILON * (1.0 + h) / (2.0 * h);
        let taps_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
        let taps_w = g.batch * g.out_h * g.out_w;
        for (which, name, got, taps) in [
            (0, "dX", &dx, taps_x),
            (1, "dW", &dw, taps_w),
            (2, "db", &db, taps_w),
        ] {
            let want = finite_differences(&g, &tensors, &dy64, which, h);
            let tol = (taps + 1) as f64 * taps as f64 * eps + fd_slack;
            for (j, (&got, &want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "case {i} {params:?}: {name}[{j}] = {got}, finite differences {want}, \
                     tolerance {tol:e}"
                );
            }
        }
    }
}

// --- the adjoint identity ------------------------------------------------------------------

/// [`Shapes::small`].
fn case_strategy() -> impl Strategy<Value = Case> {
    cases(Shapes::small())
}

fn abs64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x).abs()).collect()
}

proptest! {
    #![proptest_config(proptest_config(256))]

    /// `⟨conv(x, w), dy⟩ = ⟨x, backward_input(w, dy)⟩ = ⟨w, backward_weight(x, dy)⟩`
    /// within the bound of the module doc; and grad input overwrites every
    /// element (the buffer starts as NaN).
    #[test]
    fn adjoint_identity(case in case_strategy()) {
        // Kernels larger than the padded input are refused by `build`.
        let conv = build(&case)?;
        let g = *conv.geometry();
        let (x, w, dy) = random_tensors(&conv, &mut Rng::new(case.seed));

        let y = conv.forward_to_vec(&x, &w, None, Algorithm::Direct).unwrap();
        let mut dx = vec![f32::NAN; g.input_len()];
        conv.backward_input(&w, &dy, &mut dx, &direct_options()).unwrap();
        let mut dw = vec![f32::NAN; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut dw, &direct_options()).unwrap();
        prop_assert!(dx.iter().all(|v| v.is_finite()), "grad input left a NaN");

        let via_y = dot(&y, &dy);
        let via_x = dot(&x, &dx);
        let via_w = dot(&w, &dw);

        let zero_bias = vec![0.0; g.out_channels];
        let (magnitude, terms) = loss_f64(&g, &abs64(&x), &abs64(&w), &zero_bias, &abs64(&dy));
        let t_f = g.channels_per_group() * g.kernel_h * g.kernel_w;
        let t_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
        let t_w = g.batch * g.out_h * g.out_w;
        for (a, b, ta, tb, what) in [
            (via_y, via_x, t_f, t_x, "⟨y, dy⟩ vs ⟨x, dX⟩"),
            (via_y, via_w, t_f, t_w, "⟨y, dy⟩ vs ⟨w, dW⟩"),
            (via_x, via_w, t_x, t_w, "⟨x, dX⟩ vs ⟨w, dW⟩"),
        ] {
            let tol = adjoint_tolerance(ta, tb, magnitude, terms);
            prop_assert!(
                (a - b).abs() <= tol,
                "{what}: {a} vs {b}, difference {:e} above {tol:e}", (a - b).abs()
            );
        }
    }
}

// --- overwrite, accumulate, subsets --------------------------------------------------------

/// A grouped, strided, padded, dilated convolution with two images and
/// random tensors.
fn mixed_case() -> (Conv2d, Vec<f32>, Vec<f32>, Vec<f32>) {
    let conv = Conv2dParams::new(2, 4, (7, 6), 6, (3, 2))
        .groups(2)
        .stride(2, 1)
        .dilation(1, 2)
        .padding(Padding::explicit(1, 0, 2, 1))
        .build()
        .unwrap();
    let (x, w, dy) = random_tensors(&conv, &mut Rng::new(42));
    (conv, x, w, dy)
}

/// Without `accumulate` the weight and bias gradients replace the buffers;
/// with it, each element becomes `old + fresh`, the fresh sum computed
/// first and added once (`grad += dW`), so the result is that f32 addition
/// bit for bit. Grad input is overwritten either way.
#[test]
fn accumulate_adds_and_overwrite_replaces() {
    let (conv, x, w, dy) = mixed_case();
    let g = *conv.geometry();
    let (dx, dw, db) = gradients(&conv, &x, &w, &dy);
    let mut rng = Rng::new(7);
    let old_w = rng.vec(g.weight_len());
    let old_b = rng.vec(g.out_channels);
    let old_x = rng.vec(g.input_len());

    for accumulate in [false, true] {
        let options = direct_options().accumulate(accumulate);
        let (mut gx, mut gw, mut gb) = (old_x.clone(), old_w.clone(), old_b.clone());
        conv.backward_weight(&x, &dy, &mut gw, &options).unwrap();
        conv.backward_input(&w, &dy, &mut gx, &options).unwrap();
        let sum = |old: &[f32], fresh: &[f32]| -> Vec<f32> {
            old.iter().zip(fresh).map(|(o, f)| o + f).collect()
        };
        let (want_w, want_b) = if accumulate {
            (sum(&old_w, &dw), sum(&old_b, &db))
        } else {
            (dw.clone(), db.clone())
        };
        assert_eq!(
            bits(&gw),
            bits(&want_w),
            "grad weight, accumulate {accumulate}"
        );
        assert_eq!(bits(&gx), bits(&dx), "grad input, accumulate {accumulate}");
        // The bias gradient accumulates through `backward`.
        let grads = Grads {
            bias: Some(&mut gb),
            ..Grads::default()
        };
        conv.backward(&x, &w, &dy, grads, &options).unwrap();
        assert_eq!(
            bits(&gb),
            bits(&want_b),
            "grad bias, accumulate {accumulate}"
        );
    }

    // `backward_bias` always overwrites.
    let mut gb = old_b.clone();
    conv.backward_bias(&dy, &mut gb).unwrap();
    assert_eq!(bits(&gb), bits(&db));
}

/// Every subset of `Grads`, overwriting and accumulating: the requested
/// buffers equal the single-pass calls bit for bit, the others stay as
/// they were.
#[test]
fn backward_with_every_subset_equals_the_single_calls() {
    let (conv, x, w, dy) = mixed_case();
    let g = *conv.geometry();
    let mut rng = Rng::new(9);
    let old_x = rng.vec(g.input_len());
    let old_w = rng.vec(g.weight_len());
    let old_b = rng.vec(g.out_channels);
    for accumulate in [false, true] {
        let options = BackwardOptions::new(Algorithm::Direct).accumulate(accumulate);
        // What the single calls give, starting from the same old buffers.
        let mut want_x = old_x.clone();
        conv.backward_input(&w, &dy, &mut want_x, &options).unwrap();
        let mut want_w = old_w.clone();
        conv.backward_weight(&x, &dy, &mut want_w, &options)
            .unwrap();
        let mut want_b = old_b.clone();
        if accumulate {
            let mut fresh = vec![0.0; g.out_channels];
            conv.backward_bias(&dy, &mut fresh).unwrap();
            for (b, f) in want_b.iter_mut().zip(&fresh) {
                *b += f;
            }
        } else {
            conv.backward_bias(&dy, &mut want_b).unwrap();
        }

        for mask in 0..8u8 {
            let (mut gx, mut gw, mut gb) = (old_x.clone(), old_w.clone(), old_b.clone());
            let grads = Grads {
                input: (mask & 1 != 0).then_some(&mut gx[..]),
                weight: (mask & 2 != 0).then_some(&mut gw[..]),
                bias: (mask & 4 != 0).then_some(&mut gb[..]),
            };
            conv.backward(&x, &w, &dy, grads, &options).unwrap();
            let pick = |on: bool, want: &[f32], old: &[f32]| bits(if on { want } else { old });
            let ctx = format!("mask {mask:03b}, accumulate {accumulate}");
            assert_eq!(bits(&gx), pick(mask & 1 != 0, &want_x, &old_x), "dX, {ctx}");
            assert_eq!(bits(&gw), pick(mask & 2 != 0, &want_w, &old_w), "dW, {ctx}");
            assert_eq!(bits(&gb), pick(mask & 4 != 0, &want_b, &old_b), "db, {ctx}");
        }
    }
}

// --- errors --------------------------------------------------------------------------------

fn expect_length_error(result: Result<(), ConvError>, buffer: &str, expected: usize) {
    match result {
        Err(e @ ConvError::BufferLength { .. }) => {
            let ConvError::BufferLength {
                buffer: got,
                expected: want,
                actual,
            } = e.clone()
            else {
                unreachable!()
            };
            assert_eq!((got, want, actual), (buffer, expected, expected + 1));
            assert_mentions(&e.to_string(), &[buffer, &expected.to_string()]);
        }
        other => panic!("{buffer}: expected BufferLength, got {other:?}"),
    }
}

/// Each buffer one element too long, through every call that takes it: a
/// `BufferLength` naming it, and nothing written.
#[test]
fn bad_buffer_lengths_are_named() {
    let (conv, x, w, dy) = mixed_case();
    let g = *conv.geometry();
    let long = |v: &[f32]| {
        let mut v = v.to_vec();
        v.push(0.0);
        v
    };
    let (x_long, w_long, dy_long) = (long(&x), long(&w), long(&dy));
    let o = direct_options();
    let (il, wl, ol, kl) = (
        g.input_len(),
        g.weight_len(),
        g.output_len(),
        g.out_channels,
    );
    let mut dx = vec![0.0; il];
    let mut dw = vec![0.0; wl];
    let mut db = vec![0.0; kl];
    let (mut dx_long, mut dw_long, mut db_long) =
        (vec![0.0; il + 1], vec![0.0; wl + 1], vec![0.0; kl + 1]);

    expect_length_error(conv.backward_input(&w_long, &dy, &mut dx, &o), "weight", wl);
    expect_length_error(
        conv.backward_input(&w, &dy_long, &mut dx, &o),
        "grad_output",
        ol,
    );
    expect_length_error(
        conv.backward_input(&w, &dy, &mut dx_long, &o),
        "grad_input",
        il,
    );
    expect_length_error(conv.backward_weight(&x_long, &dy, &mut dw, &o), "input", il);
    expect_length_error(
        conv.backward_weight(&x, &dy_long, &mut dw, &o),
        "grad_output",
        ol,
    );
    expect_length_error(
        conv.backward_weight(&x, &dy, &mut dw_long, &o),
        "grad_weight",
        wl,
    );
    expect_length_error(conv.backward_bias(&dy_long, &mut db), "grad_output", ol);
    expect_length_error(conv.backward_bias(&dy, &mut db_long), "grad_bias", kl);
    assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == 0.0));

    // `backward`: input and weight always, the gradients when given; an
    // error writes none of the good buffers either.
    fn all<'a>(dx: &'a mut [f32], dw: &'a mut [f32], db: &'a mut [f32]) -> Grads<'a> {
        Grads {
            input: Some(dx),
            weight: Some(dw),
            bias: Some(db),
        }
    }
    let none = Grads::default;
    expect_length_error(conv.backward(&x_long, &w, &dy, none(), &o), "input", il);
    expect_length_error(conv.backward(&x, &w_long, &dy, none(), &o), "weight", wl);
    expect_length_error(
        conv.backward(&x, &w, &dy_long, none(), &o),
        "grad_output",
        ol,
    );
    let r = conv.backward(&x, &w, &dy, all(&mut dx_long, &mut dw, &mut db), &o);
    expect_length_error(r, "grad_input", il);
    let r = conv.backward(&x, &w, &dy, all(&mut dx, &mut dw_long, &mut db), &o);
    expect_length_error(r, "grad_weight", wl);
    let r = conv.backward(&x, &w, &dy, all(&mut dx, &mut dw, &mut db_long), &o);
    expect_length_error(r, "grad_bias", kl);
    assert!(dx.iter().chain(&dw).chain(&db).all(|&v| v == 0.0));
}

/// Every pass runs every algorithm but the weight gradient of
/// `DirectDense`, which is `UnsupportedAlgorithm` (from `backward` before any
/// gradient is written), and they agree with `Direct`; `backward` asking
/// only for the bias gradient needs no algorithm at all.
#[test]
fn every_algorithm_runs_every_pass() {
    let (conv, x, w, dy) = mixed_case();
    let g = *conv.geometry();
    let (want_dx, want_dw, want_db) = gradients(&conv, &x, &w, &dy);
    let (mx, mw) = magnitudes(&conv, &x, &w, &dy);
    let zeros_x = vec![0.0; g.input_len()];
    let zeros_w = vec![0.0; g.weight_len()];
    let t_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
    let t_w = g.batch * g.out_h * g.out_w;
    for algorithm in Algorithm::CONCRETE.into_iter().chain([Algorithm::Auto]) {
        let o = BackwardOptions::new(algorithm);
        let mut dx = vec![f32::NAN; g.input_len()];
        let mut dw = vec![f32::NAN; g.weight_len()];
        let mut db = vec![f32::NAN; g.out_channels];
        let only_bias = Grads {
            bias: Some(&mut db),
            ..Grads::default()
        };
        conv.backward(&x, &w, &dy, only_bias, &o).unwrap();
        assert_eq!(bits(&db), bits(&want_db), "{algorithm:?}");
        let what = format!("{algorithm:?}");
        if algorithm == Algorithm::DirectDense {
            let grads = Grads {
                input: Some(&mut dx),
                weight: Some(&mut dw),
                ..Grads::default()
            };
            let err = conv.backward(&x, &w, &dy, grads, &o).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConvError::UnsupportedAlgorithm {
                        pass: "grad_weight",
                        algorithm: "direct-dense"
                    }
                ),
                "{err}"
            );
            assert!(dx.iter().chain(&dw).all(|v| v.is_nan()), "nothing written");
            let err = conv.backward_weight(&x, &dy, &mut dw, &o).unwrap_err();
            assert!(
                matches!(err, ConvError::UnsupportedAlgorithm { .. }),
                "{err}"
            );
            conv.backward_input(&w, &dy, &mut dx, &o).unwrap();
            assert_close(&what, &dx, &want_dx, &mx, &zeros_x, t_x).unwrap();
            continue;
        }
        let grads = Grads {
            input: Some(&mut dx),
            weight: Some(&mut dw),
            ..Grads::default()
        };
        conv.backward(&x, &w, &dy, grads, &o).unwrap();
        assert_close(&what, &dx, &want_dx, &mx, &zeros_x, t_x).unwrap();
        assert_close(&what, &dw, &want_dw, &mw, &zeros_w, t_w).unwrap();
    }
}

// --- Im2col against Direct ---------------------------------------------------------------

proptest! {
    #![proptest_config(proptest_config(48))]

    /// `Im2col` against `Direct` for grad input and grad weight on every
    /// engine combination, accumulate on and off; on sequential calls the
    /// trace shows the forced ISA's GEMM ran.
    #[test]
    fn im2col_matches_direct(case in case_strategy()) {
        let conv = build(&case)?;
        let g = *conv.geometry();
        let mut rng = Rng::new(case.seed);
        let (x, w, dy) = random_tensors(&conv, &mut rng);
        let start = rng.vec(g.weight_len());
        let zeros_w = vec![0.0; g.weight_len()];
        let zeros_x = vec![0.0; g.input_len()];
        let (mx, mw) = magnitudes(&conv, &x, &w, &dy);
        let t_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
        let t_w = g.batch * g.out_h * g.out_w;

        let mut want_dx = vec![0.0; g.input_len()];
        conv.backward_input(&w, &dy, &mut want_dx, &direct_options()).unwrap();
        let mut want_dw = vec![0.0; g.weight_len()];
        conv.backward_weight(&x, &dy, &mut want_dw, &direct_options()).unwrap();
        let mut want_acc = start.clone();
        conv.backward_weight(&x, &dy, &mut want_acc, &direct_options().accumulate(true)).unwrap();

        for (isa, backend, par) in engine_combos() {
            let what = format!("{case:?} {isa:?} {backend:?} {par:?}");
            let o = BackwardOptions::new(Algorithm::Im2col).isa(isa).backend(backend).parallelism(par);
            let mut dx = vec![f32::NAN; g.input_len()];
            let mut dw = vec![f32::NAN; g.weight_len()];
            let ((), trace) = traced(|| {
                conv.backward_input(&w, &dy, &mut dx, &o).unwrap();
                conv.backward_weight(&x, &dy, &mut dw, &o).unwrap();
            });
            assert_close(&format!("grad input {what}"), &dx, &want_dx, &mx, &zeros_x, t_x)?;
            assert_close(&format!("grad weight {what}"), &dw, &want_dw, &mw, &zeros_w, t_w)?;
            let mut acc = start.clone();
            conv.backward_weight(&x, &dy, &mut acc, &o.accumulate(true)).unwrap();
            assert_close(&format!("accumulated grad weight {what}"), &acc, &want_acc, &mw, &start, t_w)?;
            if backend == GemmBackend::Native && par == Parallelism::Sequential {
                prop_assert!(trace.gemm_ran_on(isa), "{what}: no {isa:?} GEMM in {trace:?}");
            }
        }
    }

    // --- Sub-pixel phases against Direct ------------------------------------------------

    /// Grad input through the sub-pixel phases (each phase a stride-1
    /// convolution run by `Implicit`, `DirectSimd` or `Auto`) against
    /// `Direct`, on every engine combination; on sequential calls the trace
    /// shows the forced ISA's kernels ran (when a phase has taps at all).
    #[test]
    fn phases_match_direct_for_grad_input(case in case_strategy()) {
        let conv = build(&case)?;
        let g = *conv.geometry();
        let (x, w, dy) = random_tensors(&conv, &mut Rng::new(case.seed));
        let zeros_x = vec![0.0; g.input_len()];
        let (mx, _) = magnitudes(&conv, &x, &w, &dy);
        let t_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
        let mut want_dx = vec![0.0; g.input_len()];
        conv.backward_input(&w, &dy, &mut want_dx, &direct_options()).unwrap();
        // Some input pixel meets a tap: then some phase has a convolution.
        let reached = mx.iter().any(|&m| m > 0.0);

        for algorithm in [Algorithm::Implicit, Algorithm::DirectSimd, Algorithm::DirectDense, Algorithm::Auto] {
            for (isa, backend, par) in engine_combos() {
                let what = format!("{case:?} {algorithm:?} {isa:?} {backend:?} {par:?}");
                let o = BackwardOptions::new(algorithm).isa(isa).backend(backend).parallelism(par);
                let mut dx = vec![f32::NAN; g.input_len()];
                let ((), trace) = traced(|| conv.backward_input(&w, &dy, &mut dx, &o).unwrap());
                assert_close(&format!("grad input {what}"), &dx, &want_dx, &mx, &zeros_x, t_x)?;
                let sequential = backend == GemmBackend::Native && par == Parallelism::Sequential;
                if sequential && reached && algorithm == Algorithm::Implicit {
                    prop_assert!(trace.gemm_ran_on(isa), "{what}: no {isa:?} GEMM in {trace:?}");
                }
                let simd = matches!(algorithm, Algorithm::DirectSimd | Algorithm::DirectDense);
                if sequential && reached && simd {
                    prop_assert!(trace.direct_simd_ran_on(isa), "{what}: no {isa:?} SIMD direct in {trace:?}");
                }
            }
        }
    }
}

/// An unpadded stride-1 1×1 convolution, where `Im2col` writes the input
/// gradient in place (its col2im is the identity), and the Auto choice for
/// such layers, against `Direct` on every engine combination.
#[test]
fn pointwise_grad_input_in_place_matches_direct() {
    for (batch, c, k, groups, hw) in [
        (1, 8, 4, 1, (5, 7)),
        (2, 6, 9, 3, (3, 4)),
        (3, 32, 64, 2, (6, 6)),
    ] {
        let conv = Conv2dParams::new(batch, c, hw, k, (1, 1))
            .groups(groups)
            .build()
            .unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(7);
        let (x, w, dy) = random_tensors(&conv, &mut rng);
        let (mx, _) = magnitudes(&conv, &x, &w, &dy);
        let mut want = vec![0.0; g.input_len()];
        conv.backward_input(&w, &dy, &mut want, &direct_options())
            .unwrap();
        let zeros = vec![0.0; g.input_len()];
        for algorithm in [Algorithm::Im2col, Algorithm::Auto] {
            for (isa, backend, par) in engine_combos() {
                let o = BackwardOptions::new(algorithm)
                    .isa(isa)
                    .backend(backend)
                    .parallelism(par);
                let mut dx = vec![f32::NAN; g.input_len()];
                conv.backward_input(&w, &dy, &mut dx, &o).unwrap();
                let what =
                    format!("{batch} {c} {k} {groups} {algorithm:?} {isa:?} {backend:?} {par:?}");
                assert_close(&what, &dx, &want, &mx, &zeros, k / groups).unwrap();
            }
        }
    }
}

/// Grad input through the phases (`Implicit`) and through GEMM + col2im
/// (`Im2col`) with small forced blocks (carried by
/// `BackwardOptions::blocking` to every GEMM), on shapes whose GEMMs cross
/// KC, MC and NC edges (phases: depth `K/g·R'·S'` above 8, `C/g` above 8
/// rows, planes above 32 pixels; col2im: depth `K/g` above 8, `C/g·R·S`
/// rows above 8, output planes above 32 pixels): against `Direct`, and for
/// each algorithm the trace shows every edge was crossed.
#[test]
fn grad_input_phases_with_small_blocks_cross_every_edge() {
    use cpuconv::testing::Blocking;
    let blocking = Blocking {
        mc: 8,
        kc: 8,
        nc: 32,
    };
    let shapes = [
        // (batch, C, K, groups, input, kernel, stride, padding, dilation)
        (1, 24, 20, 1, (11, 13), (3, 3), (1, 1), 1, (1, 1)),
        (2, 18, 12, 2, (14, 9), (3, 2), (2, 2), 1, (1, 1)),
        (1, 17, 9, 1, (16, 16), (4, 4), (2, 2), 1, (1, 2)),
        (1, 10, 30, 1, (9, 12), (1, 1), (2, 1), 0, (1, 1)),
    ];
    let mut edges = [[0u64; 3]; 2];
    for (batch, c, k, groups, input, kernel, stride, pad, dilation) in shapes {
        let conv = Conv2dParams::new(batch, c, input, k, kernel)
            .stride(stride.0, stride.1)
            .padding(Padding::symmetric(pad, pad))
            .dilation(dilation.0, dilation.1)
            .groups(groups)
            .build()
            .unwrap();
        let g = *conv.geometry();
        let mut rng = Rng::new(11);
        let (x, w, dy) = random_tensors(&conv, &mut rng);
        let (mx, _) = magnitudes(&conv, &x, &w, &dy);
        let mut want = vec![0.0; g.input_len()];
        conv.backward_input(&w, &dy, &mut want, &direct_options())
            .unwrap();
        let zeros = vec![0.0; g.input_len()];
        let t_x = g.out_channels_per_group() * g.kernel_h * g.kernel_w;
        for (a, algorithm) in [Algorithm::Implicit, Algorithm::Im2col]
            .into_iter()
            .enumerate()
        {
            for isa in cpuconv::testing::isas_under_test() {
                for par in [Parallelism::Sequential, Parallelism::Rayon] {
                    let o = BackwardOptions::new(algorithm)
                        .isa(isa)
                        .parallelism(par)
                        .blocking(blocking);
                    let mut dx = vec![f32::NAN; g.input_len()];
                    let ((), trace) = traced(|| conv.backward_input(&w, &dy, &mut dx, &o).unwrap());
                    let what = format!(
                        "{:?} {algorithm:?} {isa:?} {par:?}",
                        (batch, c, k, groups, input, kernel, stride)
                    );
                    assert_close(&what, &dx, &want, &mx, &zeros, t_x).unwrap();
                    if par == Parallelism::Sequential {
                        assert!(trace.gemm_ran_on(isa), "{what}: {trace:?}");
                        edges[a][0] += trace.kc_edges;
                        edges[a][1] += trace.mc_edges;
                        edges[a][2] += trace.nc_edges;
                    }
                }
            }
        }
    }
    assert!(
        edges.iter().flatten().all(|&e| e > 0),
        "KC, MC, NC edges crossed (Implicit, Im2col): {edges:?}"
    );
}

/// A pointwise layer whose plane has fewer pixels than it has input
/// channels (ResNet's last 1×1 at 7×7, scaled down): `Im2col`'s grad input
/// multiplies the transposed product there, reading the weights in place;
/// `DirectDense` copies each weight row straight into its panels. Both
/// match `Direct`, batched and grouped (a block of 20 of 24 lanes on
/// AVX-512), on every engine combination.
#[test]
fn pointwise_grad_input_on_a_small_plane_matches_direct() {
    for (batch, groups) in [(1, 1), (3, 2)] {
        let conv = Conv2dParams::new(batch, 40, (3, 3), 24, (1, 1))
            .groups(groups)
            .build()
            .unwrap();
        let g = *conv.geometry();
        let (x, w, dy) = random_tensors(&conv, &mut Rng::new(7));
        let (want_dx, _, _) = gradients(&conv, &x, &w, &dy);
        let (mx, _) = magnitudes(&conv, &x, &w, &dy);
        let zeros_x = vec![0.0; g.input_len()];
        let t_x = g.out_channels_per_group();
        for algorithm in [Algorithm::Im2col, Algorithm::DirectDense] {
            for (isa, backend, par) in engine_combos() {
                let o = BackwardOptions::new(algorithm)
                    .isa(isa)
                    .backend(backend)
                    .parallelism(par);
                let mut dx = vec![f32::NAN; g.input_len()];
                conv.backward_input(&w, &dy, &mut dx, &o).unwrap();
                let what = format!("{batch} {groups} {algorithm:?} {isa:?} {backend:?} {par:?}");
                assert_close(&what, &dx, &want_dx, &mx, &zeros_x, t_x).unwrap();
            }
        }
    }
}
