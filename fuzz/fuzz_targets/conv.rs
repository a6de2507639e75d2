//! Fuzzes `Conv2dParams::build`, every `forward` algorithm and plans.
//!
//! The input decodes into a `ConvInput`: a convolution whose sizes are small
//! most of the time and extreme some of the time, buffer lengths that are
//! usually right, an activation, a seed for the data and a few special values
//! (NaN, ±∞, ±f32::MAX, subnormal) placed in it.
//!
//! Oracles, beyond "no call panics":
//! * `build()` agrees with an independent model of the shape rules in u128
//!   arithmetic: Ok exactly when the model says valid, with its output shape,
//!   padding and FLOP count.
//! * A wrong buffer length gives `Err(BufferLength)`; right lengths give `Ok`.
//! * With finite data, every algorithm × ISA × threading × GEMM backend, and
//!   every plan (`forward`, `forward_in` with its own and with another
//!   plan's workspace), is within `(K+1)·ε·Σ|x·w|` of an f64 reference
//!   (so within twice that of `Algorithm::Direct`), element by element. The
//!   output is filled with NaN before each call, so an unwritten element shows.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::*;
use cpuconv::{
    Activation, Algorithm, Conv2d, Conv2dParams, Conv2dPlan, ConvError, ConvGeometry, ConvMode,
    ForwardOptions, GemmBackend, Isa, OnnxAutoPad, Padding, PaddingSpec, Parallelism, Workspace,
};
use libfuzzer_sys::fuzz_target;

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
    ForwardOptions {
        algorithm,
        parallelism,
        backend,
        activation,
        isa,
    }
}

fn make_workspace(plan: &Conv2dPlan) -> Workspace {
    plan.workspace()
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

/// What `build()` must give, computed in u128 from the documented rules.
#[derive(Debug, PartialEq, Eq)]
enum Model {
    Invalid(&'static str),
    Valid {
        padding: [usize; 4],
        out: [usize; 2],
        flops: u128,
    },
}

const UMAX: u128 = usize::MAX as u128;

fn model(p: &Conv2dParams) -> Model {
    let dims = [
        p.batch,
        p.in_channels,
        p.input_size.0,
        p.input_size.1,
        p.out_channels,
        p.kernel_size.0,
        p.kernel_size.1,
    ];
    if dims.contains(&0) {
        return Model::Invalid("zero dimension");
    }
    if p.stride.0 == 0 || p.stride.1 == 0 {
        return Model::Invalid("zero stride");
    }
    if p.dilation.0 == 0 || p.dilation.1 == 0 {
        return Model::Invalid("zero dilation");
    }
    if p.groups == 0
        || !p.in_channels.is_multiple_of(p.groups)
        || !p.out_channels.is_multiple_of(p.groups)
    {
        return Model::Invalid("groups");
    }
    let u = |v: usize| v as u128;
    // One axis: (pad_lo, pad_hi, out) or why not.
    let axis = |input: usize,
                kernel: usize,
                stride: usize,
                dilation: usize,
                lo: usize,
                hi: usize|
     -> Result<(u128, u128, u128), &'static str> {
        let eff = u(dilation) * (u(kernel) - 1) + 1;
        let (lo, hi) = match p.padding {
            PaddingSpec::Explicit(_) => (u(lo), u(hi)),
            PaddingSpec::TorchValid | PaddingSpec::OnnxAuto(OnnxAutoPad::Valid) => (0, 0),
            PaddingSpec::TorchSame => {
                if p.stride != (1, 1) {
                    return Err("same with stride");
                }
                let total = eff - 1;
                if total > UMAX {
                    return Err("overflow");
                }
                (total / 2, total - total / 2)
            }
            PaddingSpec::OnnxAuto(mode) => {
                let out = u(input).div_ceil(u(stride));
                let span = (out - 1) * u(stride) + eff;
                if span > UMAX || eff > UMAX {
                    return Err("overflow");
                }
                let total = span.saturating_sub(u(input));
                let (small, large) = (total / 2, total - total / 2);
                if mode == OnnxAutoPad::SameUpper {
                    (small, large)
                } else {
                    (large, small)
                }
            }
        };
        let padded = u(input) + lo + hi;
        if padded > UMAX || eff > UMAX {
            return Err("overflow");
        }
        if eff > padded {
            return Err("kernel larger than input");
        }
        Ok((lo, hi, (padded - eff) / u(stride) + 1))
    };
    let explicit = match p.padding {
        PaddingSpec::Explicit(q) => q,
        _ => Padding::ZERO,
    };
    let (top, bottom, oh) = match axis(
        p.input_size.0,
        p.kernel_size.0,
        p.stride.0,
        p.dilation.0,
        explicit.top,
        explicit.bottom,
    ) {
        Ok(v) => v,
        Err(e) => return Model::Invalid(e),
    };
    let (left, right, ow) = match axis(
        p.input_size.1,
        p.kernel_size.1,
        p.stride.1,
        p.dilation.1,
        explicit.left,
        explicit.right,
    ) {
        Ok(v) => v,
        Err(e) => return Model::Invalid(e),
    };
    let prod = |vs: &[u128]| {
        vs.iter()
            .try_fold(1u128, |acc, &v| acc.checked_mul(v))
            .unwrap_or(u128::MAX)
    };
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
    let weight_len = prod(&[u(p.out_channels), gemm_k]);
    let im2col = prod(&[gemm_k, oh, ow]);
    let flops = prod(&[2, output_len, gemm_k]);
    if [input_len, output_len, weight_len, im2col]
        .iter()
        .any(|&v| v > UMAX)
        || flops > u64::MAX as u128
    {
        return Model::Invalid("overflow");
    }
    Model::Valid {
        padding: [top, bottom, left, right].map(|v| v as usize),
        out: [oh as usize, ow as usize],
        flops,
    }
}

// ---------------------------------------------------------------------------
// The f64 reference.

/// The documented activation, `min(max(x, lo), hi)` (what PyTorch's clamp
/// does too: `max` wins when `lo > hi`), a NaN bound ignored.
fn activation_ref(act: Activation, v: f64) -> f64 {
    let (lo, hi) = match act {
        Activation::None => return v,
        Activation::Relu => (0.0, f32::INFINITY),
        Activation::Relu6 => (0.0, 6.0),
        Activation::Clamp { min, max } => (min, max),
        #[allow(unreachable_patterns)]
        _ => return v,
    };
    v.max(lo as f64).min(hi as f64)
}

/// Whether a guard is on: its constant, unless `CPUCONV_FUZZ_NO_GUARDS` is
/// set in the environment (to check a library fix against the crashes the
/// guard hides).
fn guard(on: bool) -> bool {
    static ALL_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    on && !*ALL_OFF.get_or_init(|| std::env::var_os("CPUCONV_FUZZ_NO_GUARDS").is_some())
}

/// GUARD (remove once the library settles `Clamp { min > max }`): `Direct`
/// computes `x < min ? min : x > max ? max : x`, which gives `min` where the
/// documented `min(max(x, min), max)` gives `max`. Until one rule holds
/// everywhere, an inverted clamp accepts either.
const GUARD_INVERTED_CLAMP: bool = true;

/// GUARD (remove once fixed): the im2col helpers (`im2col::valid_range`)
/// compute with `stride_w as isize`: a horizontal stride of `isize::MAX`
/// overflows (`attempt to add with overflow`, im2col.rs:27) and one of 2^63
/// or more turns negative and the output silently comes out zero. Until
/// fixed, `Im2col` and `Implicit` (also through `Auto` and plans) are not
/// run when `stride_w > isize::MAX / 2`.
const GUARD_HUGE_STRIDE_W: bool = true;

/// Whether a guard says not to run `algorithm` (`Auto` resolved) on `g`.
fn guarded(g: &ConvGeometry, algorithm: Algorithm) -> bool {
    guard(GUARD_HUGE_STRIDE_W)
        && matches!(algorithm, Algorithm::Im2col | Algorithm::Implicit)
        && g.stride_w > isize::MAX as usize / 2
}

/// GUARD (remove once fixed): `Conv2d::plan` of a GEMM algorithm on the
/// native backend picks its kernel with `kernels::padded_work`, which
/// multiplies `⌈K/g⌉_mr · ⌈OH·OW⌉_nr` (and that times 10) unchecked:
/// `attempt to multiply with overflow` at gemm/kernels/mod.rs:341 for a
/// valid geometry with a huge output plane. Until fixed, such plans are not
/// made when that product could overflow.
const GUARD_PLAN_PADDED_WORK: bool = true;

/// Whether [`GUARD_PLAN_PADDED_WORK`] says not to plan `algorithm` on `backend`.
fn plan_guarded(conv: &Conv2d, algorithm: Algorithm, backend: GemmBackend) -> bool {
    let g = conv.geometry();
    let resolved = match algorithm {
        Algorithm::Auto => conv.auto_algorithm(),
        a => a,
    };
    guard(GUARD_PLAN_PADDED_WORK)
        && backend == GemmBackend::Native
        && matches!(resolved, Algorithm::Im2col | Algorithm::Implicit)
        && (g.out_channels_per_group() as u128 + 32) * (g.out_plane() as u128 + 32) * 10
            > usize::MAX as u128
}

/// GUARD (remove once fixed): every algorithm computes input positions as
/// `(oh·stride + r·dilation) as isize − pad as isize`, which overflows
/// (`attempt to subtract with overflow` at conv/direct.rs:31 and :37, and
/// conv/im2col.rs:40 and :41 in `window_offset`) once the padded input
/// extent passes `isize::MAX` (huge padding, dilation or an ONNX SAME
/// padding that grows with them). Until fixed, such geometries are only
/// queried, as the huge ones are, not computed.
const GUARD_PADDED_EXTENT: bool = true;

fn extent_guarded(g: &ConvGeometry) -> bool {
    let p = g.padding;
    guard(GUARD_PADDED_EXTENT)
        && [
            g.in_h as u128 + p.top as u128 + p.bottom as u128,
            g.in_w as u128 + p.left as u128 + p.right as u128,
        ]
        .iter()
        .any(|&e| e > isize::MAX as u128)
}

/// GUARD (remove once fixed): `Conv2dPlan::workspace_bytes_per_thread` of
/// an `Im2col` plan multiplies the column matrix's floats (`C/g·R·S·OH·OW`,
/// which `build()` only checks against `usize`) by 4 unchecked: `attempt to
/// multiply with overflow` at conv/plan.rs:178. Until fixed, it is not
/// asked of such plans.
const GUARD_WORKSPACE_BYTES: bool = true;

fn workspace_bytes_guarded(plan: &Conv2dPlan) -> bool {
    let g = plan.conv().geometry();
    guard(GUARD_WORKSPACE_BYTES)
        && plan.algorithm() == Algorithm::Im2col
        && (g.gemm_k() as u128 * g.out_plane() as u128 + (1 << 40)) * 4 > usize::MAX as u128
}

/// The scalar rule `Direct` uses, for [`GUARD_INVERTED_CLAMP`].
fn inverted_clamp_alternative(act: Activation, v: f64) -> Option<f64> {
    match act {
        Activation::Clamp { min, max } if guard(GUARD_INVERTED_CLAMP) && min > max => {
            Some(if v < min as f64 {
                min as f64
            } else if v > max as f64 {
                max as f64
            } else {
                v
            })
        }
        _ => None,
    }
}

/// `(value, Σ|terms|)` per output element, before the activation.
fn reference(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<(f64, f64)> {
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let mut out = Vec::with_capacity(g.output_len());
    let i = |v: usize| v as i128;
    for n in 0..g.batch {
        for k in 0..g.out_channels {
            let grp = k / kg;
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    let (mut acc, mut mag) = match bias {
                        Some(b) => (b[k] as f64, (b[k] as f64).abs()),
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
                                mag += t.abs();
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
    /// `Some` when every datum is finite: the reference to compare with.
    reference: Option<Vec<(f64, f64)>>,
}

impl Case<'_> {
    /// Panics when `out` is not within the rounding bound of the reference.
    fn check(&self, what: &dyn Fn() -> String, out: &[f32]) {
        let Some(reference) = &self.reference else {
            return;
        };
        let g = self.conv.geometry();
        let terms = (g.gemm_k() + 1) as f64;
        for (idx, (&got, &(want, mag))) in out.iter().zip(reference).enumerate() {
            if mag > 1e36 {
                // The f32 sums may overflow in one order and not another.
                continue;
            }
            let before = want;
            let want = activation_ref(self.activation, before);
            let tol = terms * f32::EPSILON as f64 * mag + (terms + 1.0) * f32::MIN_POSITIVE as f64;
            let alternative = inverted_clamp_alternative(self.activation, before);
            if !close(got, want, tol) && !alternative.is_some_and(|alt| close(got, alt, tol)) {
                let ow = idx % g.out_w;
                let oh = idx / g.out_w % g.out_h;
                let k = idx / (g.out_w * g.out_h) % g.out_channels;
                let n = idx / (g.out_w * g.out_h * g.out_channels);
                panic!(
                    "conv mismatch: {} gives {got:e} at output [n={n}, k={k}, oh={oh}, ow={ow}] \
                     (flat {idx}), f64 reference {want:e} (before activation {:e}), tolerance \
                     {tol:e} (Σ|x·w| = {mag:e}, K = {}); activation {:?}, bias {}, geometry {g:?}",
                    what(),
                    reference[idx].0,
                    g.gemm_k(),
                    self.activation,
                    self.bias.is_some(),
                );
            }
        }
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

// ---------------------------------------------------------------------------

fuzz_target!(|inp: ConvInput| run(&inp));

fn run(inp: &ConvInput) {
    init_pool();
    let params = inp.params();
    let want = model(&params);
    let conv = match (params.build(), &want) {
        (Err(_), Model::Invalid(_)) => return,
        (Ok(conv), Model::Valid { .. }) => conv,
        (got, want) => panic!("build() of {params:?} gave {got:?}, the shape model says {want:?}"),
    };
    // Every query of a valid descriptor, whatever its size.
    let g = *conv.geometry();
    let p = conv.padding();
    let got = Model::Valid {
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
        && (g.output_len() as u128 * g.gemm_k() as u128) <= MAX_MACS as u128
        && !extent_guarded(&g);
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

    let finite = input
        .iter()
        .chain(&weight)
        .chain(bias.unwrap_or(&[]))
        .all(|v| v.is_finite());
    let case = Case {
        conv: &conv,
        input: &input,
        weight: &weight,
        bias,
        activation,
        reference: finite.then(|| reference(&g, &input, &weight, bias)),
    };
    let im2col_ok = g.gemm_k() as u128 * g.out_plane() as u128 <= MAX_IM2COL as u128;

    // Every algorithm, ISA, threading and backend that differs.
    for algorithm in all_algorithms() {
        if algorithm == Algorithm::Im2col && !im2col_ok {
            continue;
        }
        let resolved = match algorithm {
            Algorithm::Auto => conv.auto_algorithm(),
            a => a,
        };
        if guarded(&g, resolved) {
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
    let foreign = conv
        .plan(
            &weight,
            bias,
            &forward_options(
                Algorithm::Direct,
                plan_par,
                GemmBackend::Native,
                activation,
                None,
            ),
        )
        .expect("plan(Direct) with the right lengths");
    let mut foreign_ws = make_workspace(&foreign);
    for algorithm in all_algorithms() {
        for backend in BACKENDS {
            let opts =
                forward_options(algorithm, plan_par, backend, activation, inp.plan_isa.get());
            let plan = match conv.plan(&weight, bias, &opts) {
                Ok(plan) => plan,
                Err(e) => panic!("plan({opts:?}) failed with the right lengths: {e:?}"),
            };
            let bytes = plan.workspace_bytes_per_thread();
            if plan.algorithm() == Algorithm::Im2col && !im2col_ok || guarded(&g, plan.algorithm())
            {
                continue;
            }
            let what = || format!("plan({opts:?}).forward");
            output.fill(f32::NAN);
            expect_ok(plan.forward(&input, &mut output), &what);
            case.check(&what, &output);
            if bytes <= MAX_WORKSPACE_BYTES {
                let mut ws = make_workspace(&plan);
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
        let plan_lens_right =
            inp.weight_len == LenSel::Exact && inp.bias.is_none_or(|l| l == LenSel::Exact);
        let plan = conv.plan(weight, bias, &opts);
        if !plan_lens_right {
            expect_len_err(plan, &|| format!("plan({opts:?})"));
            continue;
        }
        let plan = plan.unwrap_or_else(|e| panic!("plan({opts:?}) with the right lengths: {e:?}"));
        if inp.input_len == LenSel::Exact && inp.output_len == LenSel::Exact {
            continue;
        }
        expect_len_err(plan.forward(input, output), &|| {
            format!("plan({opts:?}).forward")
        });
        if plan.workspace_bytes_per_thread() <= MAX_WORKSPACE_BYTES {
            let mut ws = make_workspace(&plan);
            expect_len_err(plan.forward_in(input, output, &mut ws), &|| {
                format!("plan({opts:?}).forward_in")
            });
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
            if plan_guarded(conv, algorithm, backend) {
                continue;
            }
            let weight = vec![0.5f32; g.weight_len()];
            let bias = vec![0.25f32; g.out_channels];
            let bias = inp.bias.map(|_| &bias[..]);
            let plan = match conv.plan(&weight, bias, &opts) {
                Ok(plan) => plan,
                Err(e) => panic!("plan({opts:?}) of {g:?} with the right lengths: {e:?}"),
            };
            let bytes = if workspace_bytes_guarded(&plan) {
                usize::MAX
            } else {
                plan.workspace_bytes_per_thread()
            };
            expect_len_err(plan.forward(&[], &mut empty_out), &|| {
                format!("plan({opts:?}).forward with empty buffers")
            });
            if bytes <= MAX_WORKSPACE_BYTES {
                let mut ws = make_workspace(&plan);
                expect_len_err(plan.forward_in(&[], &mut empty_out, &mut ws), &|| {
                    format!("plan({opts:?}).forward_in with empty buffers")
                });
            }
        }
    }
}
