//! Fuzzes `Conv2dParams::build`, `PaddingSpec::resolve`, every `forward`
//! algorithm and plans.
//!
//! The input decodes into a `ConvInput`: a convolution whose sizes are small
//! most of the time and extreme some of the time, buffer lengths that are
//! usually right, an activation, a seed for the data and a few special values
//! (NaN, ±∞, ±f32::MAX, subnormal) placed in it.
//!
//! Oracles, beyond "no call panics":
//! * `build()` agrees with an independent model of the shape rules in u128
//!   arithmetic: `Ok` exactly when the model says valid, with its output
//!   shape, padding and FLOP count; otherwise the very error the model
//!   predicts (variant and fields: the checks run in a documented order).
//!   `PaddingSpec::resolve` agrees with the model's padding step the same way.
//! * A wrong buffer length gives `Err(BufferLength)`; right lengths give `Ok`,
//!   or `Err(InvalidActivation)` for a clamp with a NaN bound.
//! * Every algorithm × ISA × threading × GEMM backend, every plan
//!   (`forward`, `forward_in` with its own and with another plan's
//!   workspace) and `forward_to_vec` is within `(K+1)·ε·Σ|x·w|` of an f64
//!   reference (so within twice that of `Algorithm::Direct`), element by
//!   element. The reference sums over real input pixels only (a tap in the
//!   padding contributes nothing, whatever its weight), so a NaN or ±∞ in
//!   the data must give exactly the NaN or ±∞ (or clamp bound) it gives. The
//!   output is filled with NaN before each call, so an unwritten element
//!   shows.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::*;
use cpuconv::{
    Activation, Algorithm, Conv2d, Conv2dParams, Conv2dPlan, ConvError, ConvGeometry, ConvMode,
    ForwardOptions, GemmBackend, Isa, OnnxAutoPad, Padding, PaddingSpec, Parallelism, Workspace,
};
use libfuzzer_sys::fuzz_target;

// Size limits. None hides a library problem: they keep what one case
// allocates (itself, or through the library) far below libFuzzer's
// `-rss_limit_mb`/`-malloc_limit_mb`, and each case fast.

/// The most elements of input, weight or output a run allocates.
const MAX_ELEMS: usize = 1 << 18;
/// The most multiply-adds (`N·K·OH·OW·C/g·R·S`) a case may take to be
/// computed: the f64 reference and `Direct` are plain loops, and each case
/// runs about 70 forward calls.
const MAX_MACS: usize = 1 << 21;
/// The most floats of an im2col column matrix (`C/g·R·S · OH·OW`) for which
/// `Algorithm::Im2col` runs.
const MAX_IM2COL: usize = 1 << 22;
/// The most bytes a plan's `workspace()` may ask for to be called.
const MAX_WORKSPACE_BYTES: usize = 64 << 20;
/// The most bytes a `DirectSimd` plan of a descriptor too big to compute
/// may hold, by the estimate in [`plan_bytes`]: its column plan grows with
/// the output width (`⌈OW/lanes⌉·(24 + 16·S)` bytes), which for a valid
/// `OW` of 2^31 is gigabytes, past libFuzzer's malloc limit.
const MAX_PLAN_BYTES: u128 = 256 << 20;

type Batch = Val<1, 3, 8>;
type Chan = Val<1, 6, 40>;
type Size = Val<1, 9, 40>;
type Kern = Val<1, 4, 9>;
type Step = Val<1, 3, 8>;
type Pad = Val<0, 3, 12>;

#[derive(Arbitrary, Debug)]
enum PadSpec {
    Explicit {
        top: Pad,
        bottom: Pad,
        left: Pad,
        right: Pad,
    },
    Symmetric(Pad, Pad),
    TorchValid,
    TorchSame,
    OnnxSameUpper,
    OnnxSameLower,
    OnnxValid,
}

impl PadSpec {
    fn get(&self) -> PaddingSpec {
        match *self {
            PadSpec::Explicit {
                top,
                bottom,
                left,
                right,
            } => PaddingSpec::Explicit(Padding::explicit(top.0, bottom.0, left.0, right.0)),
            PadSpec::Symmetric(h, w) => PaddingSpec::Explicit(Padding::symmetric(h.0, w.0)),
            PadSpec::TorchValid => PaddingSpec::TorchValid,
            PadSpec::TorchSame => PaddingSpec::TorchSame,
            PadSpec::OnnxSameUpper => PaddingSpec::OnnxAuto(OnnxAutoPad::SameUpper),
            PadSpec::OnnxSameLower => PaddingSpec::OnnxAuto(OnnxAutoPad::SameLower),
            PadSpec::OnnxValid => PaddingSpec::OnnxAuto(OnnxAutoPad::Valid),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum GroupSpec {
    One,
    /// `groups = C` and `K = C·(1 + mult % 3)`.
    Depthwise {
        mult: u8,
    },
    /// A divisor of `gcd(C, K)` (the `pick`-th of those up to 64, or the gcd).
    Divisor {
        pick: u8,
    },
    Raw(Chan),
}

#[derive(Arbitrary, Debug)]
enum ActSpec {
    None,
    Relu,
    Relu6,
    /// Any bounds: min > max and NaN included.
    Clamp {
        min: Scalar,
        max: Scalar,
    },
}

impl ActSpec {
    fn get(&self) -> Activation {
        match *self {
            ActSpec::None => Activation::None,
            ActSpec::Relu => Activation::Relu,
            ActSpec::Relu6 => Activation::Relu6,
            ActSpec::Clamp { min, max } => Activation::Clamp {
                min: min.0,
                max: max.0,
            },
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Buf {
    Input,
    Weight,
    Bias,
}

#[derive(Arbitrary, Debug)]
struct ConvInput {
    batch: Batch,
    in_channels: Chan,
    in_h: Size,
    in_w: Size,
    out_channels: Chan,
    kernel_h: Kern,
    kernel_w: Kern,
    stride_h: Step,
    stride_w: Step,
    dilation_h: Step,
    dilation_w: Step,
    padding: PadSpec,
    groups: GroupSpec,
    flip: bool,
    activation: ActSpec,
    input_len: LenSel,
    weight_len: LenSel,
    output_len: LenSel,
    /// `None`: no bias.
    bias: Option<LenSel>,
    seed: u64,
    scale: Scale,
    /// Special values at `index % len` of a buffer (at most 4 are used).
    specials: Vec<(Buf, u32, Special)>,
    /// The threaded setting every call also runs with.
    threaded: ThreadedSel,
    /// Options of the plans (made for every algorithm).
    plan_isa: IsaSel,
    plan_threaded: bool,
}
// ---------------------------------------------------------------------------
// The library's options, built in one place each so API changes (builders,
// `#[non_exhaustive]`, a fallible `workspace()`) touch only these helpers.

fn forward_options(
    algorithm: Algorithm,
    parallelism: Parallelism,
    backend: GemmBackend,
    activation: Activation,
    isa: Option<Isa>,
) -> ForwardOptions {
    ForwardOptions::new(algorithm)
        .parallelism(parallelism)
        .backend(backend)
        .activation(activation)
        .isa(isa)
}

/// `plan.workspace()`, which must succeed: only asked for workspaces of at
/// most [`MAX_WORKSPACE_BYTES`].
fn make_workspace(plan: &Conv2dPlan, what: &dyn Fn() -> String) -> Workspace {
    match plan.workspace() {
        Ok(ws) => ws,
        Err(e) => panic!(
            "{}: workspace() of {} bytes failed: {e:?}",
            what(),
            plan.workspace_bytes_per_thread()
        ),
    }
}

/// `Algorithm::CONCRETE` and `Auto`.
fn all_algorithms() -> impl Iterator<Item = Algorithm> {
    Algorithm::CONCRETE
        .into_iter()
        .chain(std::iter::once(Algorithm::Auto))
}

const BACKENDS: [GemmBackend; 2] = [GemmBackend::Native, GemmBackend::Matrixmultiply];

// ---------------------------------------------------------------------------
// Parameters and the independent shape model.

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl ConvInput {
    fn params(&self) -> Conv2dParams {
        let c = self.in_channels.0;
        let mut k = self.out_channels.0;
        let groups = match self.groups {
            GroupSpec::One => 1,
            GroupSpec::Depthwise { mult } => {
                if let Some(kk) = c.checked_mul(1 + mult as usize % 3) {
                    k = kk;
                }
                c
            }
            GroupSpec::Divisor { pick } => {
                let g = gcd(c, k);
                let mut divisors: Vec<usize> =
                    (1..=g.min(64)).filter(|d| g.is_multiple_of(*d)).collect();
                divisors.push(g);
                divisors[pick as usize % divisors.len()]
            }
            GroupSpec::Raw(g) => g.0,
        };
        Conv2dParams::new(
            self.batch.0,
            c,
            (self.in_h.0, self.in_w.0),
            k,
            (self.kernel_h.0, self.kernel_w.0),
        )
        .stride(self.stride_h.0, self.stride_w.0)
        .dilation(self.dilation_h.0, self.dilation_w.0)
        .padding(self.padding.get())
        .groups(groups)
        .mode(if self.flip {
            ConvMode::Convolution
        } else {
            ConvMode::CrossCorrelation
        })
    }
}

/// What a valid descriptor's geometry must say.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    padding: [usize; 4],
    out: [usize; 2],
    flops: u128,
}

const UMAX: u128 = usize::MAX as u128;
const IMAX: u128 = isize::MAX as u128;

fn u(v: usize) -> u128 {
    v as u128
}

/// The product, `u128::MAX` once it passes that (every factor is at least
/// 1 where it matters, so "above `usize::MAX`" is decided right).
fn prod(vs: &[u128]) -> u128 {
    vs.iter()
        .try_fold(1u128, |acc, &v| acc.checked_mul(v))
        .unwrap_or(u128::MAX)
}

/// `d·(k−1)+1`, exact (`k ≥ 1`).
fn effective(kernel: usize, dilation: usize) -> u128 {
    u(dilation) * (u(kernel) - 1) + 1
}

/// The first zero among input size, kernel size, stride and dilation, as
/// both `build()` and `PaddingSpec::resolve` report it.
fn model_axes_nonzero(p: &Conv2dParams) -> Result<(), ConvError> {
    let dims = [
        ("input height", p.input_size.0),
        ("input width", p.input_size.1),
        ("kernel height", p.kernel_size.0),
        ("kernel width", p.kernel_size.1),
    ];
    if let Some(&(name, _)) = dims.iter().find(|(_, v)| *v == 0) {
        return Err(ConvError::ZeroDimension { name });
    }
    let ((sh, sw), (dh, dw)) = (p.stride, p.dilation);
    if sh == 0 || sw == 0 {
        return Err(ConvError::ZeroStride { h: sh, w: sw });
    }
    if dh == 0 || dw == 0 {
        return Err(ConvError::ZeroDilation { h: dh, w: dw });
    }
    Ok(())
}

/// What `p.padding.resolve(…)` must give: `[top, bottom, left, right]`.
///
/// * PyTorch `same` (stride 1 only): total `d·(k−1)` per axis, the odd pixel
///   at the end; the total must fit `usize`.
/// * ONNX `SAME_*`: total `max(0, (⌈in/s⌉−1)·s + d·(k−1)+1 − in)`, the odd
///   pixel at the end (upper) or beginning (lower); `(⌈in/s⌉−1)·s +
///   d·(k−1)+1` must fit `usize`. Height first.
fn model_padding(p: &Conv2dParams) -> Result<[u128; 4], ConvError> {
    model_axes_nonzero(p)?;
    let (input, kernel, stride, dilation) = (p.input_size, p.kernel_size, p.stride, p.dilation);
    let split = |total: u128, end: bool| {
        let (small, large) = (total / 2, total - total / 2);
        if end {
            (small, large)
        } else {
            (large, small)
        }
    };
    Ok(match p.padding {
        PaddingSpec::Explicit(q) => [u(q.top), u(q.bottom), u(q.left), u(q.right)],
        PaddingSpec::TorchValid | PaddingSpec::OnnxAuto(OnnxAutoPad::Valid) => [0; 4],
        PaddingSpec::TorchSame => {
            if stride != (1, 1) {
                return Err(ConvError::SameWithStride {
                    h: stride.0,
                    w: stride.1,
                });
            }
            let mut totals = [0u128; 2];
            for (t, (k, d)) in totals
                .iter_mut()
                .zip([(kernel.0, dilation.0), (kernel.1, dilation.1)])
            {
                *t = effective(k, d) - 1;
                if *t > UMAX {
                    return Err(ConvError::Overflow {
                        what: "PyTorch same padding",
                    });
                }
            }
            let (top, bottom) = split(totals[0], true);
            let (left, right) = split(totals[1], true);
            [top, bottom, left, right]
        }
        PaddingSpec::OnnxAuto(mode) => {
            let axis = |input: usize, kernel: usize, stride: usize, dilation: usize| {
                let span =
                    (u(input).div_ceil(u(stride)) - 1) * u(stride) + effective(kernel, dilation);
                if span > UMAX {
                    return Err(ConvError::Overflow {
                        what: "ONNX SAME padding",
                    });
                }
                Ok(split(
                    span.saturating_sub(u(input)),
                    mode == OnnxAutoPad::SameUpper,
                ))
            };
            let (top, bottom) = axis(input.0, kernel.0, stride.0, dilation.0)?;
            let (left, right) = axis(input.1, kernel.1, stride.1, dilation.1)?;
            [top, bottom, left, right]
        }
    })
}

/// What `build()` must give, computed in u128 from the documented rules, in
/// the library's order: zero N, C, K; zero sizes, strides, dilations;
/// groups; any size, stride or dilation above `isize::MAX` (`TooLarge`);
/// the padding rule; padded extents (above `usize::MAX`: `Overflow`, then
/// above `isize::MAX`: `TooLarge`); per axis, height first, the dilated
/// kernel (`Overflow` past `usize::MAX`) against the padded extent; then
/// the lengths of input, output, weight, the FLOP count and the im2col
/// matrix.
fn model(p: &Conv2dParams) -> Result<Shape, ConvError> {
    let dims = [
        ("batch", p.batch),
        ("in_channels", p.in_channels),
        ("out_channels", p.out_channels),
    ];
    if let Some(&(name, _)) = dims.iter().find(|(_, v)| *v == 0) {
        return Err(ConvError::ZeroDimension { name });
    }
    model_axes_nonzero(p)?;
    if p.groups == 0 {
        return Err(ConvError::ZeroGroups);
    }
    if !p.in_channels.is_multiple_of(p.groups) || !p.out_channels.is_multiple_of(p.groups) {
        return Err(ConvError::GroupsMismatch {
            groups: p.groups,
            in_channels: p.in_channels,
            out_channels: p.out_channels,
        });
    }
    let per_axis = [
        ("input height", p.input_size.0),
        ("input width", p.input_size.1),
        ("kernel height", p.kernel_size.0),
        ("kernel width", p.kernel_size.1),
        ("vertical stride", p.stride.0),
        ("horizontal stride", p.stride.1),
        ("vertical dilation", p.dilation.0),
        ("horizontal dilation", p.dilation.1),
    ];
    if let Some(&(what, value)) = per_axis.iter().find(|(_, v)| u(*v) > IMAX) {
        return Err(ConvError::TooLarge { what, value });
    }
    let [top, bottom, left, right] = model_padding(p)?;
    let padded = [
        u(p.input_size.0) + top + bottom,
        u(p.input_size.1) + left + right,
    ];
    if padded.iter().any(|&v| v > UMAX) {
        return Err(ConvError::Overflow {
            what: "padded input size",
        });
    }
    for (what, v) in [
        ("padded input height", padded[0]),
        ("padded input width", padded[1]),
    ] {
        if v > IMAX {
            return Err(ConvError::TooLarge {
                what,
                value: v as usize,
            });
        }
    }
    let mut out = [0u128; 2];
    for (i, axis) in ["height", "width"].into_iter().enumerate() {
        let (kernel, stride, dilation) = if i == 0 {
            (p.kernel_size.0, p.stride.0, p.dilation.0)
        } else {
            (p.kernel_size.1, p.stride.1, p.dilation.1)
        };
        let eff = effective(kernel, dilation);
        if eff > UMAX {
            return Err(ConvError::Overflow {
                what: "dilated kernel size",
            });
        }
        if eff > padded[i] {
            return Err(ConvError::KernelLargerThanInput {
                axis,
                effective_kernel: eff as usize,
                padded_input: padded[i] as usize,
            });
        }
        out[i] = (padded[i] - eff) / u(stride) + 1;
    }
    let [oh, ow] = out;
    let gemm_k = prod(&[
        u(p.in_channels / p.groups),
        u(p.kernel_size.0),
        u(p.kernel_size.1),
    ]);
    let input_len = prod(&[
        u(p.batch),
        u(p.in_channels),
        u(p.input_size.0),
        u(p.input_size.1),
    ]);
    let output_len = prod(&[u(p.batch), u(p.out_channels), oh, ow]);
    let lengths = [
        ("input length", input_len, UMAX),
        ("output length", output_len, UMAX),
        ("weight length", gemm_k, UMAX),
        ("weight length", prod(&[u(p.out_channels), gemm_k]), UMAX),
        (
            "FLOP count",
            prod(&[2, output_len, gemm_k]),
            u64::MAX as u128,
        ),
        ("im2col matrix size", prod(&[gemm_k, oh, ow]), UMAX),
    ];
    if let Some(&(what, _, _)) = lengths.iter().find(|(_, v, max)| v > max) {
        return Err(ConvError::Overflow { what });
    }
    Ok(Shape {
        padding: [top, bottom, left, right].map(|v| v as usize),
        out: [oh as usize, ow as usize],
        flops: prod(&[2, output_len, gemm_k]),
    })
}

/// Bytes of scratch an `Im2col` plan's workspace holds beyond its column
/// matrix (packing panels bounded by the blocking) are far below this.
const PANEL_SLACK: u128 = 1 << 40;

/// What `plan()` with the right lengths and a valid activation must give,
/// as far as the target can tell: `Some(err)` when it must be refused,
/// `None` when it must succeed, and `Err(())` where either is right (an
/// `Im2col` workspace within the panels' slack of `usize::MAX` bytes).
fn plan_model(g: &ConvGeometry, resolved: Algorithm) -> Result<Option<ConvError>, ()> {
    if resolved != Algorithm::Im2col {
        return Ok(None);
    }
    let col = u(g.gemm_k()) * u(g.out_plane());
    if col * 4 > UMAX {
        Ok(Some(ConvError::Overflow {
            what: "workspace size",
        }))
    } else if (col + PANEL_SLACK) * 4 > UMAX {
        Err(())
    } else {
        Ok(None)
    }
}

/// An upper bound on what a plan of `resolved` holds beyond its weights'
/// own size: `DirectSimd`'s column plan, `⌈OW/8⌉` vectors of at most 32
/// bytes and `S` ranges of 16 bytes each.
fn plan_bytes(g: &ConvGeometry, resolved: Algorithm) -> u128 {
    match resolved {
        Algorithm::DirectSimd => (u(g.out_w) / 8 + 1) * (32 + 16 * u(g.kernel_w)),
        _ => 0,
    }
}

/// The algorithm `forward_with`/`plan` run for `requested` with `weight`:
/// `Auto` resolved, and a GEMM lowering of a padded convolution with a
/// non-finite weight handed to `DirectSimd` (README, "Rules at the edges").
fn resolved(conv: &Conv2d, requested: Algorithm, weight: &[f32]) -> Algorithm {
    let a = match requested {
        Algorithm::Auto => conv.auto_algorithm(),
        a => a,
    };
    if matches!(a, Algorithm::Im2col | Algorithm::Implicit)
        && conv.padding() != Padding::ZERO
        && weight.iter().any(|w| !w.is_finite())
    {
        Algorithm::DirectSimd
    } else {
        a
    }
}

// ---------------------------------------------------------------------------
// The f64 reference.

/// The documented activation, `min(max(x, lo), hi)` (PyTorch's clamp:
/// `max` wins when `lo > hi`); NaN stays NaN. NaN bounds are refused before
/// any of this runs.
fn activation_ref(act: Activation, v: f64) -> f64 {
    let (lo, hi) = match act {
        Activation::None => return v,
        Activation::Relu => (0.0, f32::INFINITY),
        Activation::Relu6 => (0.0, 6.0),
        Activation::Clamp { min, max } => (min, max),
    };
    if v.is_nan() {
        return v;
    }
    v.max(lo as f64).min(hi as f64)
}

/// Whether the activation is refused (`Clamp` with a NaN bound).
fn invalid_activation(act: Activation) -> bool {
    matches!(act, Activation::Clamp { min, max } if min.is_nan() || max.is_nan())
}

/// `(value, Σ|finite terms|)` per output element, before the activation.
/// Only real input pixels take part: a tap in the padding contributes
/// nothing, whatever its weight. Non-finite data give the NaN or ±∞ of
/// IEEE arithmetic (the f64 sum of finite f32 products cannot overflow).
fn reference(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<(f64, f64)> {
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let mut out = Vec::with_capacity(g.output_len());
    let i = |v: usize| v as i128;
    let finite_abs = |t: f64| if t.is_finite() { t.abs() } else { 0.0 };
    for n in 0..g.batch {
        for k in 0..g.out_channels {
            let grp = k / kg;
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    let (mut acc, mut mag) = match bias {
                        Some(b) => (b[k] as f64, finite_abs(b[k] as f64)),
                        None => (0.0, 0.0),
                    };
                    for c in 0..cg {
                        for r in 0..g.kernel_h {
                            let ih =
                                i(oh) * i(g.stride_h) + i(r) * i(g.dilation_h) - i(g.padding.top);
                            if ih < 0 || ih >= i(g.in_h) {
                                continue;
                            }
                            for s in 0..g.kernel_w {
                                let iw = i(ow) * i(g.stride_w) + i(s) * i(g.dilation_w)
                                    - i(g.padding.left);
                                if iw < 0 || iw >= i(g.in_w) {
                                    continue;
                                }
                                let x = input[((n * g.in_channels + grp * cg + c) * g.in_h
                                    + ih as usize)
                                    * g.in_w
                                    + iw as usize];
                                let (wr, ws) = match g.mode {
                                    ConvMode::CrossCorrelation => (r, s),
                                    _ => (g.kernel_h - 1 - r, g.kernel_w - 1 - s),
                                };
                                let w = weight[((k * cg + c) * g.kernel_h + wr) * g.kernel_w + ws];
                                let t = x as f64 * w as f64;
                                acc += t;
                                mag += finite_abs(t);
                            }
                        }
                    }
                    out.push((acc, mag));
                }
            }
        }
    }
    out
}

struct Case<'a> {
    conv: &'a Conv2d,
    input: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    activation: Activation,
    reference: Vec<(f64, f64)>,
}

impl Case<'_> {
    /// Panics when `out` is not within the rounding bound of the reference
    /// with `activation`.
    fn check_with(&self, activation: Activation, what: &dyn Fn() -> String, out: &[f32]) {
        let g = self.conv.geometry();
        let terms = (g.gemm_k() + 1) as f64;
        for (idx, (&got, &(before, mag))) in out.iter().zip(&self.reference).enumerate() {
            if mag > 1e36 {
                // The f32 sums may overflow in one order and not another.
                continue;
            }
            let want = activation_ref(activation, before);
            let tol = terms * f32::EPSILON as f64 * mag + (terms + 1.0) * f32::MIN_POSITIVE as f64;
            if !close(got, want, tol) {
                let ow = idx % g.out_w;
                let oh = idx / g.out_w % g.out_h;
                let k = idx / (g.out_w * g.out_h) % g.out_channels;
                let n = idx / (g.out_w * g.out_h * g.out_channels);
                panic!(
                    "conv mismatch: {} gives {got:e} at output [n={n}, k={k}, oh={oh}, ow={ow}] \
                     (flat {idx}), f64 reference {want:e} (before activation {before:e}), \
                     tolerance {tol:e} (Σ|x·w| = {mag:e}, K = {}); activation {activation:?}, \
                     bias {}, geometry {g:?}",
                    what(),
                    g.gemm_k(),
                    self.bias.is_some(),
                );
            }
        }
    }

    fn check(&self, what: &dyn Fn() -> String, out: &[f32]) {
        self.check_with(self.activation, what, out);
    }
}

fn expect_ok(result: Result<(), ConvError>, what: &dyn Fn() -> String) {
    if let Err(e) = result {
        panic!("{} failed on buffers of the right lengths: {e:?}", what());
    }
}

fn expect_len_err<T: std::fmt::Debug>(result: Result<T, ConvError>, what: &dyn Fn() -> String) {
    match result {
        Err(ConvError::BufferLength { .. }) => {}
        other => panic!(
            "{} on a buffer of the wrong length gave {other:?}, want Err(BufferLength)",
            what()
        ),
    }
}

/// `result` must be `Err(InvalidActivation)` naming `act`'s bounds.
fn expect_invalid_activation<T: std::fmt::Debug>(
    result: Result<T, ConvError>,
    act: Activation,
    what: &dyn Fn() -> String,
) {
    let Activation::Clamp { min, max } = act else {
        unreachable!("only a clamp can be invalid");
    };
    match result {
        Err(ConvError::InvalidActivation { min: m, max: x })
            if m.to_bits() == min.to_bits() && x.to_bits() == max.to_bits() => {}
        other => panic!(
            "{} with {act:?} gave {other:?}, want Err(InvalidActivation {{ min: {min:?}, max: \
             {max:?} }})",
            what()
        ),
    }
}

/// A plan of `conv` with the right lengths: the model's answer
/// ([`plan_model`]) or `InvalidActivation`; `None` where refused as
/// predicted.
fn make_plan(
    conv: &Conv2d,
    weight: &[f32],
    bias: Option<&[f32]>,
    opts: &ForwardOptions,
) -> Option<Conv2dPlan> {
    let result = conv.plan(weight, bias, opts);
    let what = || {
        format!(
            "plan({opts:?}) of {:?} with the right lengths",
            conv.geometry()
        )
    };
    if invalid_activation(opts.activation) {
        expect_invalid_activation(result, opts.activation, &what);
        return None;
    }
    match (
        result,
        plan_model(conv.geometry(), resolved(conv, opts.algorithm, weight)),
    ) {
        (Ok(plan), Ok(None) | Err(())) => {
            let want = resolved(conv, opts.algorithm, weight);
            assert_eq!(
                plan.algorithm(),
                want,
                "{} runs the wrong algorithm",
                what()
            );
            Some(plan)
        }
        (Err(got), Ok(Some(want))) if got == want => None,
        (
            Err(ConvError::Overflow {
                what: "workspace size",
            }),
            Err(()),
        ) => None,
        (got, want) => panic!(
            "{} gave {got:?}, the model says {want:?} (Ok(None): must succeed)",
            what()
        ),
    }
}

// ---------------------------------------------------------------------------

fuzz_target!(|inp: ConvInput| run(&inp));

fn run(inp: &ConvInput) {
    init_pool();
    let params = inp.params();
    let want_padding = model_padding(&params)
        .map(|[t, b, l, r]| Padding::explicit(t as usize, b as usize, l as usize, r as usize));
    let got_padding = params.padding.resolve(
        params.input_size,
        params.kernel_size,
        params.stride,
        params.dilation,
    );
    assert_eq!(
        got_padding, want_padding,
        "PaddingSpec::resolve of {params:?} disagrees with the model"
    );
    let (conv, want) = match (params.build(), model(&params)) {
        (Err(got), Err(want)) => {
            assert_eq!(
                got, want,
                "build() of {params:?} refused it with the wrong error"
            );
            return;
        }
        (Ok(conv), Ok(want)) => (conv, want),
        (got, want) => panic!("build() of {params:?} gave {got:?}, the shape model says {want:?}"),
    };
    // Every query of a valid descriptor, whatever its size.
    let g = *conv.geometry();
    let p = conv.padding();
    let got = Shape {
        padding: [p.top, p.bottom, p.left, p.right],
        out: [g.out_h, g.out_w],
        flops: conv.flops() as u128,
    };
    assert_eq!(
        got, want,
        "geometry of {params:?} disagrees with the shape model"
    );
    let _ = (
        conv.output_shape(),
        conv.input_shape(),
        conv.weight_shape(),
        conv.auto_algorithm(),
        g.input_len(),
        g.output_len(),
        g.weight_len(),
        g.gemm_k(),
        g.out_plane(),
        g.in_plane(),
        g.channels_per_group(),
        g.out_channels_per_group(),
        g.is_pointwise_identity(),
    );
    let activation = inp.activation.get();

    let small = g.input_len() <= MAX_ELEMS
        && g.weight_len() <= MAX_ELEMS
        && g.output_len() <= MAX_ELEMS
        && (g.output_len() as u128 * g.gemm_k() as u128) <= MAX_MACS as u128;
    if !small {
        huge(inp, &conv, activation);
        return;
    }

    let bias_len = inp.bias.map(|l| l.apply(g.out_channels));
    let lens_right = inp.input_len == LenSel::Exact
        && inp.weight_len == LenSel::Exact
        && inp.output_len == LenSel::Exact
        && inp.bias.is_none_or(|l| l == LenSel::Exact);

    // Data: uniform in ±scale, then the special values.
    let mut rng = Rng::new(inp.seed);
    let scale = inp.scale.factor();
    let mut input = vec![0.0f32; inp.input_len.apply(g.input_len())];
    let mut weight = vec![0.0f32; inp.weight_len.apply(g.weight_len())];
    let mut bias = bias_len.map(|l| vec![0.0f32; l]);
    rng.fill(&mut input, scale);
    rng.fill(&mut weight, scale);
    if let Some(b) = &mut bias {
        rng.fill(b, scale);
    }
    for &(buf, at, special) in inp.specials.iter().take(4) {
        let dst: &mut [f32] = match buf {
            Buf::Input => &mut input,
            Buf::Weight => &mut weight,
            Buf::Bias => bias.as_deref_mut().unwrap_or(&mut []),
        };
        if !dst.is_empty() {
            let i = at as usize % dst.len();
            dst[i] = special.value();
        }
    }
    let bias = bias.as_deref();
    let mut output = vec![f32::NAN; inp.output_len.apply(g.output_len())];
    let threaded = inp.threaded.get();

    if !lens_right {
        wrong_lengths(inp, &conv, &input, &weight, bias, &mut output, activation);
        return;
    }

    let case = Case {
        conv: &conv,
        input: &input,
        weight: &weight,
        bias,
        activation,
        reference: reference(&g, &input, &weight, bias),
    };
    let im2col_ok = g.gemm_k() as u128 * g.out_plane() as u128 <= MAX_IM2COL as u128;

    // `forward_to_vec` (default options: no activation), with `Auto`.
    match conv.forward_to_vec(&input, &weight, bias, Algorithm::Auto) {
        Ok(out) => case.check_with(Activation::None, &|| "forward_to_vec(Auto)".into(), &out),
        Err(e) => panic!("forward_to_vec(Auto) failed with the right lengths: {e:?}"),
    }

    if invalid_activation(activation) {
        // Refused by every entry point, before any work.
        for algorithm in all_algorithms() {
            let opts = forward_options(algorithm, threaded, GemmBackend::Native, activation, None);
            let what = || format!("forward_with({opts:?})");
            expect_invalid_activation(
                conv.forward_with(&input, &weight, bias, &mut output, &opts),
                activation,
                &what,
            );
            assert!(
                output.iter().all(|v| v.is_nan()),
                "{} refused, but wrote the output",
                what()
            );
            make_plan(&conv, &weight, bias, &opts);
        }
        return;
    }

    // Every algorithm, ISA, threading and backend that differs.
    for algorithm in all_algorithms() {
        if resolved(&conv, algorithm, &weight) == Algorithm::Im2col && !im2col_ok {
            continue;
        }
        let gemm_based = matches!(
            algorithm,
            Algorithm::Im2col | Algorithm::Implicit | Algorithm::Auto
        );
        let isas: Vec<Option<Isa>> = if algorithm == Algorithm::Direct {
            vec![None]
        } else {
            IsaSel::all().collect()
        };
        for &isa in &isas {
            for parallelism in [Parallelism::Sequential, threaded] {
                for backend in BACKENDS {
                    if backend != GemmBackend::Native && !gemm_based {
                        continue;
                    }
                    let opts = forward_options(algorithm, parallelism, backend, activation, isa);
                    let what = || format!("forward_with({opts:?})");
                    output.fill(f32::NAN);
                    expect_ok(
                        conv.forward_with(case.input, case.weight, bias, &mut output, &opts),
                        &what,
                    );
                    case.check(&what, &output);
                }
            }
        }
    }

    // Plans, for every algorithm, with the input's ISA, threading and a
    // backend each.
    let plan_par = if inp.plan_threaded {
        threaded
    } else {
        Parallelism::Sequential
    };
    // A workspace made by another plan (the direct one: empty), to check
    // that `forward_in` copes with one that is too small.
    let direct = forward_options(
        Algorithm::Direct,
        plan_par,
        GemmBackend::Native,
        activation,
        None,
    );
    let foreign = make_plan(&conv, &weight, bias, &direct).expect("plan(Direct)");
    let mut foreign_ws = make_workspace(&foreign, &|| format!("plan({direct:?})"));
    for algorithm in all_algorithms() {
        for backend in BACKENDS {
            let opts =
                forward_options(algorithm, plan_par, backend, activation, inp.plan_isa.get());
            let Some(plan) = make_plan(&conv, &weight, bias, &opts) else {
                panic!("plan({opts:?}) of a small convolution refused");
            };
            let bytes = plan.workspace_bytes_per_thread();
            if plan.algorithm() == Algorithm::Im2col && !im2col_ok {
                continue;
            }
            let what = || format!("plan({opts:?}).forward");
            output.fill(f32::NAN);
            expect_ok(plan.forward(&input, &mut output), &what);
            case.check(&what, &output);
            if bytes <= MAX_WORKSPACE_BYTES {
                let mut ws = make_workspace(&plan, &what);
                for pass in 0..2 {
                    let what = || format!("plan({opts:?}).forward_in, own workspace, pass {pass}");
                    output.fill(f32::NAN);
                    expect_ok(plan.forward_in(&input, &mut output, &mut ws), &what);
                    case.check(&what, &output);
                }
            }
            let what = || format!("plan({opts:?}).forward_in, the Direct plan's workspace");
            output.fill(f32::NAN);
            expect_ok(plan.forward_in(&input, &mut output, &mut foreign_ws), &what);
            case.check(&what, &output);
        }
    }
}

/// Some buffer has the wrong length: every call that takes it must refuse.
fn wrong_lengths(
    inp: &ConvInput,
    conv: &Conv2d,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    activation: Activation,
) {
    let g = conv.geometry();
    let par = inp.threaded.get();
    let output_len = output.len();
    let vec_lens_right = inp.input_len == LenSel::Exact
        && inp.weight_len == LenSel::Exact
        && inp.bias.is_none_or(|l| l == LenSel::Exact);
    for algorithm in all_algorithms() {
        let opts = forward_options(
            algorithm,
            par,
            GemmBackend::Native,
            activation,
            inp.plan_isa.get(),
        );
        let what = || {
            format!(
                "forward_with({opts:?}) with lengths input {}/{}, weight {}/{}, bias {:?}/{}, \
                 output {}/{}",
                input.len(),
                g.input_len(),
                weight.len(),
                g.weight_len(),
                bias.map(<[f32]>::len),
                g.out_channels,
                output_len,
                g.output_len()
            )
        };
        expect_len_err(conv.forward_with(input, weight, bias, output, &opts), &what);
        if !vec_lens_right {
            // forward_to_vec has no output buffer to get wrong.
            expect_len_err(conv.forward_to_vec(input, weight, bias, algorithm), &|| {
                format!("forward_to_vec({algorithm:?})")
            });
        }
        let plan_lens_right =
            inp.weight_len == LenSel::Exact && inp.bias.is_none_or(|l| l == LenSel::Exact);
        if !plan_lens_right {
            expect_len_err(conv.plan(weight, bias, &opts), &|| {
                format!("plan({opts:?})")
            });
            continue;
        }
        let Some(plan) = make_plan(conv, weight, bias, &opts) else {
            continue;
        };
        if inp.input_len == LenSel::Exact && inp.output_len == LenSel::Exact {
            continue;
        }
        expect_len_err(plan.forward(input, output), &|| {
            format!("plan({opts:?}).forward")
        });
        if plan.workspace_bytes_per_thread() <= MAX_WORKSPACE_BYTES {
            let what = || format!("plan({opts:?}).forward_in");
            let mut ws = make_workspace(&plan, &what);
            expect_len_err(plan.forward_in(input, output, &mut ws), &what);
        }
    }
}

/// A valid descriptor too big to compute: the queries and every refusal must
/// still work without allocating the tensors.
fn huge(inp: &ConvInput, conv: &Conv2d, activation: Activation) {
    let g = conv.geometry();
    let par = inp.threaded.get();
    let mut empty_out: [f32; 0] = [];
    for algorithm in all_algorithms() {
        expect_len_err(conv.forward_to_vec(&[], &[], None, algorithm), &|| {
            format!("forward_to_vec({algorithm:?}) with empty buffers")
        });
        for backend in BACKENDS {
            let opts = forward_options(algorithm, par, backend, activation, inp.plan_isa.get());
            let what = || format!("forward_with({opts:?}) with empty buffers");
            // The weight may be huge too: it is empty here as well, unless small.
            expect_len_err(
                conv.forward_with(&[], &[], None, &mut empty_out, &opts),
                &what,
            );
            if g.weight_len() > MAX_ELEMS {
                continue;
            }
            let weight = vec![0.5f32; g.weight_len()];
            if plan_bytes(g, resolved(conv, algorithm, &weight)) > MAX_PLAN_BYTES {
                continue;
            }
            let bias = vec![0.25f32; g.out_channels];
            let bias = inp.bias.map(|_| &bias[..]);
            let Some(plan) = make_plan(conv, &weight, bias, &opts) else {
                continue;
            };
            expect_len_err(plan.forward(&[], &mut empty_out), &|| {
                format!("plan({opts:?}).forward with empty buffers")
            });
            if plan.workspace_bytes_per_thread() <= MAX_WORKSPACE_BYTES {
                let what = || format!("plan({opts:?}).forward_in with empty buffers");
                let mut ws = make_workspace(&plan, &what);
                expect_len_err(plan.forward_in(&[], &mut empty_out, &mut ws), &what);
            }
        }
    }
}
