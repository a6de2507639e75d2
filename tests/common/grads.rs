//! Helpers of the backward-pass tests (`tests/backward.rs`,
//! `tests/grad_weight.rs`): a random convolution case and its strategy,
//! the magnitudes of the gradients' terms, and the per-element bound an
//! algorithm is held to against `Direct`.

use super::Rng;
use cpuconv::testing::Blocking;
use cpuconv::{Algorithm, BackwardOptions, Conv2d, Conv2dParams, ConvError, ConvMode, Padding};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::ops::RangeInclusive;

/// One random small convolution for the backward passes.
#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub channels_per_group: usize,
    pub groups: usize,
    pub out_per_group: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    pub padding: Padding,
    pub input: (usize, usize),
    pub mode: ConvMode,
    /// A forced cache blocking for the GEMM-based algorithms, if any.
    pub blocking: Option<Blocking>,
    pub seed: u64,
}

impl Case {
    pub fn params(&self) -> Conv2dParams {
        Conv2dParams::new(
            self.batch,
            self.channels_per_group * self.groups,
            self.input,
            self.out_per_group * self.groups,
            self.kernel,
        )
        .stride(self.stride.0, self.stride.1)
        .dilation(self.dilation.0, self.dilation.1)
        .padding(self.padding)
        .groups(self.groups)
        .mode(self.mode)
    }
}

/// The ranges one family of [`Case`]s draws from: each of the kernel,
/// stride, dilation and input ranges serves both axes, the padding range
/// all four sides.
pub struct Shapes {
    pub batch: RangeInclusive<usize>,
    pub channels_per_group: RangeInclusive<usize>,
    pub groups: RangeInclusive<usize>,
    pub out_per_group: RangeInclusive<usize>,
    pub kernel: RangeInclusive<usize>,
    pub stride: RangeInclusive<usize>,
    pub dilation: RangeInclusive<usize>,
    pub padding: RangeInclusive<usize>,
    pub input: RangeInclusive<usize>,
    /// The forced blockings ([`no_blocking`] for none).
    pub blocking: BoxedStrategy<Option<Blocking>>,
}

impl Shapes {
    /// `tests/backward.rs`'s ranges: like `conv_vs_direct`'s cases,
    /// smaller, since the Direct passes cost about `N·K·OH·OW·(C/g)·R·S`
    /// each, at most a few hundred thousand here; no forced blocking.
    pub fn small() -> Shapes {
        Shapes {
            batch: 1..=2,
            channels_per_group: 1..=4,
            groups: 1..=3,
            out_per_group: 1..=4,
            kernel: 1..=4,
            stride: 1..=3,
            dilation: 1..=3,
            padding: 0..=2,
            input: 1..=12,
            blocking: no_blocking(),
        }
    }
}

/// Never a forced blocking (draws nothing from the random source).
pub fn no_blocking() -> BoxedStrategy<Option<Blocking>> {
    Just(None).boxed()
}

/// Random [`Case`]s within `s`, both modes, any seed.
pub fn cases(s: Shapes) -> impl Strategy<Value = Case> {
    let pad = s.padding;
    (
        (s.batch, s.channels_per_group, s.groups, s.out_per_group),
        ((s.kernel.clone(), s.kernel), (s.stride.clone(), s.stride)),
        (
            (s.dilation.clone(), s.dilation),
            (pad.clone(), pad.clone(), pad.clone(), pad),
        ),
        (s.input.clone(), s.input),
        (
            prop_oneof![
                Just(ConvMode::CrossCorrelation),
                Just(ConvMode::Convolution)
            ],
            s.blocking,
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (batch, channels_per_group, groups, out_per_group),
                (kernel, stride),
                (dilation, (top, bottom, left, right)),
                input,
                (mode, blocking, seed),
            )| Case {
                batch,
                channels_per_group,
                groups,
                out_per_group,
                kernel,
                stride,
                dilation,
                padding: Padding::explicit(top, bottom, left, right),
                input,
                mode,
                blocking,
                seed,
            },
        )
}

/// Builds the case; a kernel larger than the padded input (refused by
/// `build`) rejects it.
pub fn build(case: &Case) -> Result<Conv2d, TestCaseError> {
    match case.params().build() {
        Ok(conv) => Ok(conv),
        Err(ConvError::KernelLargerThanInput { .. }) => Err(TestCaseError::reject("empty output")),
        Err(e) => panic!("{case:?}: {e}"),
    }
}

/// Random `(x, w, dy)` for `conv`, drawn in that order from `rng`.
pub fn random_tensors(conv: &Conv2d, rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let g = conv.geometry();
    let x = rng.vec(g.input_len());
    let w = rng.vec(g.weight_len());
    let dy = rng.vec(g.output_len());
    (x, w, dy)
}

fn direct() -> BackwardOptions {
    BackwardOptions::new(Algorithm::Direct)
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|a| a.abs()).collect()
}

/// The magnitudes `M` of [`assert_close`] for grad weight: `Direct`'s
/// grad weight on `|x|`, `|dy|`, in f32 (`M` up to its own rounding, which
/// the bound's factor 2 covers many times over).
pub fn weight_magnitudes(conv: &Conv2d, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (mut mw, o) = (vec![0.0; conv.geometry().weight_len()], direct());
    conv.backward_weight(&abs(x), &abs(dy), &mut mw, &o)
        .unwrap();
    mw
}

/// The magnitudes `M` of [`assert_close`] for grad input and grad weight:
/// `Direct`'s gradients on `|x|`, `|w|`, `|dy|`, in f32, as in
/// [`weight_magnitudes`].
pub fn magnitudes(conv: &Conv2d, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut mx, o) = (vec![0.0; conv.geometry().input_len()], direct());
    conv.backward_input(&abs(w), &abs(dy), &mut mx, &o).unwrap();
    (mx, weight_magnitudes(conv, x, dy))
}

/// `|got − want| ≤ 2·(terms + 1)·ε·(m + |start|) + ε·(|start| + |want|)`
/// per element (plus `1e-30`, so that an exact 0 passes), `ε =
/// f32::EPSILON`: the bound of `tests/backward.rs`'s module doc.
///
/// Every random value lies in `[-1, 1)`. A gradient element is an f32 sum
/// of `T` products (`T ≤ (K/g)·R·S` for grad input, `T = N·OH·OW` at most
/// for grad weight and bias), so with `M = Σ |terms|` it is within
/// `(T + 1)·ε·M` of the exact value (the products' rounding plus any
/// summation order). Two algorithms summing in different orders are each
/// within that of the exact value, so within `2·(T + 1)·ε·M` of each other;
/// `M` is computed by the Direct passes on `|x|`, `|w|`, `|dy|`
/// ([`magnitudes`]). When accumulating into `start`, the start value joins
/// the sum (`|start|` in the magnitude), and each result's final add
/// rounds once more, `ε·|result|` each: `ε·(|start| + |want|)`. With
/// `start` all zeros the bound is the overwriting one.
pub fn assert_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    magnitude: &[f32],
    start: &[f32],
    terms: usize,
) -> Result<(), TestCaseError> {
    let eps = f32::EPSILON as f64;
    for (i, (((&a, &b), &m), &s)) in got.iter().zip(want).zip(magnitude).zip(start).enumerate() {
        let tol = 2.0 * (terms + 1) as f64 * eps * (f64::from(m) + f64::from(s).abs())
            + eps * (f64::from(s).abs() + f64::from(b).abs())
            + 1e-30;
        prop_assert!(
            (f64::from(a) - f64::from(b)).abs() <= tol,
            "{what}: element {i}: {a} vs {b}, tolerance {tol:e}"
        );
    }
    Ok(())
}
