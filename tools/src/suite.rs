//! The benchmark suite: convolution layers, GEMM shapes, deterministic data
//! and the `--shape` syntax.
//!
//! This file depends only on `std` and `cpuconv`: `benches/conv.rs` and
//! `benches/gemm.rs` include it with `#[path]`, so the tool and the criterion
//! benchmarks run exactly the same shapes. Keep it free of the tool's other
//! dependencies.

use cpuconv::{Conv2d, Conv2dParams, ConvError, ConvTranspose2d, ConvTranspose2dParams, Padding};

/// One row of the built-in suite: `N,C,H,W -> K, R×R, stride, pad, dilation, groups`.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    /// Name used by `--layer` and in the tables.
    pub name: &'static str,
    /// `[N, C, H, W]`.
    pub input: [usize; 4],
    /// Output channels K.
    pub out_channels: usize,
    /// Square kernel size R = S.
    pub kernel: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Symmetric padding (all four sides).
    pub pad: usize,
    /// Dilation (both axes).
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
}

#[allow(clippy::too_many_arguments)]
const fn layer(
    name: &'static str,
    input: [usize; 4],
    out_channels: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    groups: usize,
) -> LayerSpec {
    LayerSpec {
        name,
        input,
        out_channels,
        kernel,
        stride,
        pad,
        dilation,
        groups,
    }
}

/// The built-in layers: the classic hand-worked example, the ResNet-50 layer
/// types, a MobileNetV2 depthwise layer, a dilated, a batched and a grouped one.
#[rustfmt::skip]
pub const SUITE: &[LayerSpec] = &[
    //     name           N    C    H    W      K   R  s  p  d  groups
    layer("seed",        [1,   1,   3,   3],    1,  2, 1, 0, 1, 1),
    layer("r50_conv1",   [1,   3, 224, 224],   64,  7, 2, 3, 1, 1),
    layer("r50_3x3",     [1,  64,  56,  56],   64,  3, 1, 1, 1, 1),
    layer("r50_1x1",     [1, 256,  56,  56],   64,  1, 1, 0, 1, 1),
    layer("r50_3x3_s2",  [1, 128,  56,  56],  128,  3, 2, 1, 1, 1),
    layer("r50_deep",    [1, 256,  14,  14],  256,  3, 1, 1, 1, 1),
    layer("r50_last1x1", [1, 512,   7,   7], 2048,  1, 1, 0, 1, 1),
    layer("mbv2_dw",     [1, 144,  56,  56],  144,  3, 1, 1, 1, 144),
    layer("dilated",     [1,  64,  56,  56],   64,  3, 1, 2, 2, 1),
    layer("batch16",     [16, 32,  32,  32],   64,  3, 1, 1, 1, 1),
    layer("grouped",     [1, 128,  28,  28],  128,  3, 1, 1, 1, 32),
];

impl LayerSpec {
    /// The descriptor of this layer.
    pub fn params(&self) -> Conv2dParams {
        let [n, c, h, w] = self.input;
        Conv2dParams::new(n, c, (h, w), self.out_channels, (self.kernel, self.kernel))
            .stride(self.stride, self.stride)
            .padding(Padding::symmetric(self.pad, self.pad))
            .dilation(self.dilation, self.dilation)
            .groups(self.groups)
    }

    /// The layer as a named [`Layer`].
    pub fn to_layer(self) -> Layer {
        Layer {
            name: self.name.to_string(),
            params: self.params(),
        }
    }
}

/// A named convolution: a suite row or a `--shape`.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Name in the tables.
    pub name: String,
    /// The descriptor.
    pub params: Conv2dParams,
}

/// The tensors one layer runs on.
pub struct LayerData {
    /// `[N, C, H, W]`.
    pub input: Vec<f32>,
    /// `[K, C/groups, R, S]`.
    pub weight: Vec<f32>,
    /// `[K]`, or `None` (only the seed layer, to keep its textbook result).
    pub bias: Option<Vec<f32>>,
}

/// The seed layer's textbook input `[[1,0,1],[2,1,0],[0,1,1]]`.
pub const SEED_INPUT: [f32; 9] = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];
/// The seed layer's kernel `[[1,0],[0,1]]`.
pub const SEED_WEIGHT: [f32; 4] = [1.0, 0.0, 0.0, 1.0];
/// What the seed layer must produce: `[[2,0],[3,2]]`.
pub const SEED_OUTPUT: [f32; 4] = [2.0, 0.0, 3.0, 2.0];
/// The seed layer's output gradient for the backward passes: `[[1,2],[3,4]]`.
pub const SEED_GRAD_OUTPUT: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
/// Its input gradient: `[[1,2,0],[3,5,2],[0,3,4]]`.
pub const SEED_GRAD_INPUT: [f32; 9] = [1.0, 2.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0];
/// Its weight gradient: `[[11,5],[8,8]]`.
pub const SEED_GRAD_WEIGHT: [f32; 4] = [11.0, 5.0, 8.0, 8.0];

/// SplitMix64: a tiny deterministic generator, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`, with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
    }

    /// `len` values in `[-1, 1)`.
    #[allow(dead_code)] // the benchmarks' form; the tool uses `try_vec`
    pub fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }

    /// The values [`Rng::vec`] gives, allocated as [`try_alloc`] does.
    pub fn try_vec(&mut self, what: &str, len: usize) -> Result<Vec<f32>, String> {
        let mut v = try_alloc(what, len)?;
        v.extend((0..len).map(|_| self.next_f32()));
        Ok(v)
    }
}

/// An empty vector with room for exactly `len` values, or an error naming
/// `what` and the bytes it needs. A valid `--shape` can need more memory
/// than the machine has, and `vec!` would abort the process there.
pub fn try_alloc(what: &str, len: usize) -> Result<Vec<f32>, String> {
    let bytes = len
        .checked_mul(std::mem::size_of::<f32>())
        .ok_or_else(|| format!("{what} needs {len} × 4 bytes, more than the address space"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| format!("{what} needs {bytes} bytes: allocation failed"))?;
    Ok(v)
}

/// `len` copies of `value`, allocated as [`try_alloc`] does.
pub fn try_filled(what: &str, len: usize, value: f32) -> Result<Vec<f32>, String> {
    let mut v = try_alloc(what, len)?;
    v.resize(len, value);
    Ok(v)
}

/// FNV-1a of a name: a per-layer seed, so every layer gets its own data.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

impl Layer {
    /// Validates the descriptor.
    pub fn build(&self) -> Result<Conv2d, ConvError> {
        self.params.build()
    }

    /// Deterministic data for the layer: random values in `[-1, 1)` and a
    /// bias, except for the seed layer, which gets its textbook input and
    /// kernel and no bias. Panics where [`Layer::try_data`] fails.
    #[allow(dead_code)] // the benchmarks' form; the tool uses `try_data`
    pub fn data(&self, conv: &Conv2d) -> LayerData {
        self.try_data(conv)
            .unwrap_or_else(|e| panic!("layer {}: {e}", self.name))
    }

    /// Whether this is the seed layer (by name and size), which gets the
    /// textbook tensors whose results are known.
    pub fn is_seed(&self, conv: &Conv2d) -> bool {
        let g = conv.geometry();
        self.name == "seed" && g.input_len() == 9 && g.weight_len() == 4 && g.output_len() == 4
    }

    /// [`Layer::data`], or which tensor could not be allocated.
    pub fn try_data(&self, conv: &Conv2d) -> Result<LayerData, String> {
        let g = conv.geometry();
        if self.is_seed(conv) {
            return Ok(LayerData {
                input: SEED_INPUT.to_vec(),
                weight: SEED_WEIGHT.to_vec(),
                bias: None,
            });
        }
        let mut rng = Rng::new(name_seed(&self.name));
        Ok(LayerData {
            input: rng.try_vec("input", g.input_len())?,
            weight: rng.try_vec("weight", g.weight_len())?,
            bias: Some(rng.try_vec("bias", g.out_channels)?),
        })
    }
}

impl Layer {
    /// A deterministic output gradient `[N, K, OH, OW]` for the backward
    /// passes: random values in `[-1, 1)` from a seed of its own, or
    /// [`SEED_GRAD_OUTPUT`] for the seed layer. Panics where
    /// [`Layer::try_grad_output`] fails.
    #[allow(dead_code)] // the benchmarks' form; the tool uses `try_grad_output`
    pub fn grad_output(&self, conv: &Conv2d) -> Vec<f32> {
        self.try_grad_output(conv)
            .unwrap_or_else(|e| panic!("layer {}: {e}", self.name))
    }

    /// [`Layer::grad_output`], or why it could not be allocated.
    pub fn try_grad_output(&self, conv: &Conv2d) -> Result<Vec<f32>, String> {
        if self.is_seed(conv) {
            return Ok(SEED_GRAD_OUTPUT.to_vec());
        }
        let mut rng = Rng::new(name_seed(&self.name) ^ 0x6772_6164); // "grad"
        rng.try_vec("grad_output", conv.geometry().output_len())
    }
}

/// The suite as [`Layer`]s.
pub fn suite() -> Vec<Layer> {
    SUITE.iter().map(|l| l.to_layer()).collect()
}

/// One row of the transposed suite: `N,C_in,H,W -> C_out, R×R, stride,
/// pad, output padding` (dilation 1, one group).
#[derive(Clone, Copy, Debug)]
pub struct TransposedSpec {
    /// Name used by `--layer` and in the tables.
    pub name: &'static str,
    /// `[N, C_in, H, W]`: the input of the transposed convolution.
    pub input: [usize; 4],
    /// Output channels C_out.
    pub out_channels: usize,
    /// Square kernel size R = S.
    pub kernel: usize,
    /// Stride (both axes): the upsampling factor.
    pub stride: usize,
    /// Symmetric padding (all four sides), cropped from the output.
    pub pad: usize,
    /// Output padding (both axes), added to the bottom and right.
    pub output_padding: usize,
}

/// The transposed layers: decoder upsamplings of a GAN generator, a U-Net,
/// an FCN head and a batched DCGAN generator. The output shapes (32², 56²,
/// 112², 16²) are `(H − 1)·s − 2p + R + op`.
#[rustfmt::skip]
pub const TRANSPOSED_SUITE: &[TransposedSpec] = &[
    //                   name            N    C_in H   W    C_out R  s  p  op
    TransposedSpec { name: "gan_up_k4s2",  input: [1, 128, 16, 16], out_channels:  64, kernel: 4, stride: 2, pad: 1, output_padding: 0 },
    TransposedSpec { name: "unet_up_k2s2", input: [1, 256, 28, 28], out_channels: 128, kernel: 2, stride: 2, pad: 0, output_padding: 0 },
    TransposedSpec { name: "fcn_up_k3s2",  input: [1,  64, 56, 56], out_channels:  32, kernel: 3, stride: 2, pad: 1, output_padding: 1 },
    TransposedSpec { name: "dcgan_b8",     input: [8, 256,  8,  8], out_channels: 128, kernel: 4, stride: 2, pad: 1, output_padding: 0 },
];

impl TransposedSpec {
    /// The descriptor of this layer.
    pub fn params(&self) -> ConvTranspose2dParams {
        let [n, c, h, w] = self.input;
        ConvTranspose2dParams::new(n, c, (h, w), self.out_channels, (self.kernel, self.kernel))
            .stride(self.stride, self.stride)
            .padding(Padding::symmetric(self.pad, self.pad))
            .output_padding(self.output_padding, self.output_padding)
    }

    /// The layer as a named [`TransposedLayer`].
    pub fn to_layer(self) -> TransposedLayer {
        TransposedLayer {
            name: self.name.to_string(),
            params: self.params(),
        }
    }
}

/// A named transposed convolution: a transposed-suite row or a
/// `--pass transpose --shape`.
#[derive(Clone, Debug)]
pub struct TransposedLayer {
    /// Name in the tables.
    pub name: String,
    /// The descriptor.
    pub params: ConvTranspose2dParams,
}

/// The product of a shape's dimensions.
fn count(shape: [usize; 4]) -> usize {
    shape.iter().product()
}

impl TransposedLayer {
    /// Validates the descriptor.
    pub fn build(&self) -> Result<ConvTranspose2d, ConvError> {
        self.params.build()
    }

    /// Deterministic data for the layer: input `[N, C_in, H, W]`, weight
    /// `[C_in, C_out/g, R, S]` and bias `[C_out]`, random in `[-1, 1)`.
    /// Panics where [`TransposedLayer::try_data`] fails.
    #[allow(dead_code)] // the benchmarks' form; the tool uses `try_data`
    pub fn data(&self, conv: &ConvTranspose2d) -> LayerData {
        self.try_data(conv)
            .unwrap_or_else(|e| panic!("layer {}: {e}", self.name))
    }

    /// [`TransposedLayer::data`], or which tensor could not be allocated.
    pub fn try_data(&self, conv: &ConvTranspose2d) -> Result<LayerData, String> {
        let mut rng = Rng::new(name_seed(&self.name));
        Ok(LayerData {
            input: rng.try_vec("input", count(conv.input_shape()))?,
            weight: rng.try_vec("weight", count(conv.weight_shape()))?,
            bias: Some(rng.try_vec("bias", conv.output_shape()[1])?),
        })
    }

    /// The `f32` counts of its input, weight, bias and output.
    pub fn lens(conv: &ConvTranspose2d) -> [usize; 4] {
        [
            count(conv.input_shape()),
            count(conv.weight_shape()),
            conv.output_shape()[1],
            count(conv.output_shape()),
        ]
    }
}

/// The transposed suite as [`TransposedLayer`]s.
pub fn transposed_suite() -> Vec<TransposedLayer> {
    TRANSPOSED_SUITE.iter().map(|l| l.to_layer()).collect()
}

/// Square GEMM sizes of `cpuconv gemm` and the GEMM benchmark.
pub const GEMM_SQUARE: [usize; 6] = [64, 128, 256, 512, 1024, 2048];

/// The GEMMs the suite's convolutions lower to, `M×K×N` = `K × C·R·S × OH·OW`:
/// r50_3x3, r50_conv1, r50_deep, r50_1x1, r50_last1x1, r50_3x3_s2.
pub const GEMM_IM2COL: [(usize, usize, usize); 6] = [
    (64, 576, 3136),
    (64, 147, 12544),
    (256, 2304, 196),
    (64, 256, 3136),
    (2048, 512, 49),
    (128, 1152, 784),
];

/// Every default GEMM shape `(M, K, N)`: the squares, then the im2col shapes.
pub fn gemm_shapes() -> Vec<(usize, usize, usize)> {
    GEMM_SQUARE
        .iter()
        .map(|&s| (s, s, s))
        .chain(GEMM_IM2COL)
        .collect()
}

/// Help text of the `--shape` syntax.
pub const SHAPE_SYNTAX: &str = "\
Custom layer: [NAME=]N,C,H,W:K,RxS[,sS][,pP|pT,B,L,R][,dD][,gG]

  N,C,H,W   input batch, channels, height, width
  K         output channels
  RxS       kernel height x width (a single number means square)
  sS        stride; sHxW for different vertical/horizontal strides
  pP        symmetric padding; pHxW per axis; pT,B,L,R top, bottom, left, right
  dD        dilation; dHxW per axis
  gG        groups (must divide C and K)

Example: --shape mylayer=1,64,56,56:128,3x3,s2,p1  --shape 8,16,32,32:16,5x5,p2,g16

Transposed layer (--pass transpose): the same tokens, read as the transposed
convolution's: N,C,H,W its input, K its output channels, pP the padding
cropped from its output, and one more:
  opO       output padding, added to the bottom and right; opHxW per axis

Example: --pass transpose --shape up=1,64,56,56:32,3x3,s2,p1,op1";

fn num(s: &str, what: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| format!("{what}: expected a number, got {s:?}"))
}

/// `"3"` or `"3x2"`.
fn pair(s: &str, what: &str) -> Result<(usize, usize), String> {
    match s.split_once(['x', 'X']) {
        Some((a, b)) => Ok((num(a, what)?, num(b, what)?)),
        None => {
            let v = num(s, what)?;
            Ok((v, v))
        }
    }
}

/// The fields of a `--shape`, before they become a descriptor: shared by
/// the ordinary and the transposed syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ShapeFields {
    name: String,
    input: [usize; 4],
    out_channels: usize,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: Option<Padding>,
    output_padding: Option<(usize, usize)>,
    dilation: Option<(usize, usize)>,
    groups: Option<usize>,
}

/// Parses the common syntax; `op` (output padding) only where `transposed`.
fn parse_fields(spec: &str, index: usize, transposed: bool) -> Result<ShapeFields, String> {
    let (name, rest) = match spec.split_once('=') {
        Some((n, r)) if !n.trim().is_empty() => (n.trim().to_string(), r),
        Some((_, r)) => (format!("shape{index}"), r),
        None => (format!("shape{index}"), spec),
    };
    let (input, conv) = rest
        .split_once(':')
        .ok_or_else(|| format!("{spec:?}: expected N,C,H,W:K,RxS[,...]"))?;
    let dims: Vec<usize> = input
        .split(',')
        .map(|d| num(d, "input N,C,H,W"))
        .collect::<Result<_, _>>()?;
    let [n, c, h, w] = dims[..] else {
        return Err(format!("{spec:?}: the input needs 4 numbers N,C,H,W"));
    };
    let mut tokens = conv.split(',').map(str::trim);
    let k = num(tokens.next().unwrap_or(""), "output channels K")?;
    let kernel = pair(
        tokens
            .next()
            .ok_or_else(|| format!("{spec:?}: missing the kernel RxS"))?,
        "kernel RxS",
    )?;
    let mut fields = ShapeFields {
        name,
        input: [n, c, h, w],
        out_channels: k,
        kernel,
        stride: None,
        padding: None,
        output_padding: None,
        dilation: None,
        groups: None,
    };
    let mut pads: Option<Vec<usize>> = None;
    for tok in tokens {
        if tok.is_empty() {
            continue;
        }
        if tok.bytes().all(|b| b.is_ascii_digit()) {
            // A bare number continues the pT,B,L,R list.
            match pads.as_mut() {
                Some(p) if p.len() < 4 => p.push(num(tok, "padding")?),
                _ => return Err(format!("{spec:?}: unexpected number {tok:?}")),
            }
            continue;
        }
        if let Some(value) = tok.strip_prefix("op") {
            if !transposed {
                return Err(format!(
                    "{spec:?}: {tok:?}: output padding is for transposed layers (--pass transpose)"
                ));
            }
            fields.output_padding = Some(pair(value, "output padding")?);
            continue;
        }
        let (key, value) = tok.split_at(1);
        match key {
            "s" => fields.stride = Some(pair(value, "stride")?),
            "d" => fields.dilation = Some(pair(value, "dilation")?),
            "g" => fields.groups = Some(num(value, "groups")?),
            "p" if value.contains(['x', 'X']) => {
                let (a, b) = pair(value, "padding")?;
                pads = Some(vec![a, a, b, b]);
            }
            "p" => pads = Some(vec![num(value, "padding")?]),
            _ => {
                let keys = if transposed {
                    "s, p, op, d, g"
                } else {
                    "s, p, d, g"
                };
                return Err(format!("{spec:?}: unknown option {tok:?} (use {keys})"));
            }
        }
    }
    fields.padding = match pads.as_deref() {
        None => None,
        Some(&[p]) => Some(Padding::symmetric(p, p)),
        Some(&[t, b, l, r]) => Some(Padding::explicit(t, b, l, r)),
        Some(p) => {
            return Err(format!(
                "{spec:?}: padding takes 1 value or 4 (T,B,L,R), got {}",
                p.len()
            ))
        }
    };
    Ok(fields)
}

/// Parses a `--shape` (see [`SHAPE_SYNTAX`]); `index` names unnamed shapes.
pub fn parse_shape(spec: &str, index: usize) -> Result<Layer, String> {
    let f = parse_fields(spec, index, false)?;
    let [n, c, h, w] = f.input;
    let mut params = Conv2dParams::new(n, c, (h, w), f.out_channels, f.kernel);
    if let Some((a, b)) = f.stride {
        params = params.stride(a, b);
    }
    if let Some(p) = f.padding {
        params = params.padding(p);
    }
    if let Some((a, b)) = f.dilation {
        params = params.dilation(a, b);
    }
    if let Some(g) = f.groups {
        params = params.groups(g);
    }
    Ok(Layer {
        name: f.name,
        params,
    })
}

/// Parses a transposed `--shape` (see [`SHAPE_SYNTAX`]); `index` names
/// unnamed shapes.
pub fn parse_transposed_shape(spec: &str, index: usize) -> Result<TransposedLayer, String> {
    let f = parse_fields(spec, index, true)?;
    let [n, c, h, w] = f.input;
    let mut params = ConvTranspose2dParams::new(n, c, (h, w), f.out_channels, f.kernel);
    if let Some((a, b)) = f.stride {
        params = params.stride(a, b);
    }
    if let Some(p) = f.padding {
        params = params.padding(p);
    }
    if let Some((a, b)) = f.output_padding {
        params = params.output_padding(a, b);
    }
    if let Some((a, b)) = f.dilation {
        params = params.dilation(a, b);
    }
    if let Some(g) = f.groups {
        params = params.groups(g);
    }
    Ok(TransposedLayer {
        name: f.name,
        params,
    })
}

/// Parses a GEMM `--shape`: `MxKxN`, or one number for a square.
pub fn parse_gemm_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    match parts[..] {
        [n] => {
            let n = num(n, "size")?;
            Ok((n, n, n))
        }
        [m, k, n] => Ok((num(m, "M")?, num(k, "K")?, num(n, "N")?)),
        _ => Err(format!("{s:?}: expected MxKxN or a single size")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_layers_build() {
        for l in suite() {
            let conv = l.build().unwrap_or_else(|e| panic!("{}: {e}", l.name));
            let d = l.data(&conv);
            assert_eq!(d.input.len(), conv.geometry().input_len());
        }
    }

    #[test]
    fn transposed_suite_builds_with_its_documented_shapes() {
        let expected = [
            ("gan_up_k4s2", [1, 64, 32, 32]),
            ("unet_up_k2s2", [1, 128, 56, 56]),
            ("fcn_up_k3s2", [1, 32, 112, 112]),
            ("dcgan_b8", [8, 128, 16, 16]),
        ];
        let layers = transposed_suite();
        assert_eq!(layers.len(), expected.len());
        for (l, (name, out)) in layers.iter().zip(expected) {
            assert_eq!(l.name, name);
            let t = l.build().unwrap_or_else(|e| panic!("{}: {e}", l.name));
            assert_eq!(t.output_shape(), out, "{name}");
            let [n, c, h, w] = t.input_shape();
            let [_, _, r, s] = t.weight_shape();
            let flops = 2 * n * c * h * w * out[1] * r * s;
            assert_eq!(t.flops(), flops as u64, "{name}");
            let d = l.data(&t);
            assert_eq!(d.input.len(), n * c * h * w);
            assert_eq!(d.weight.len(), c * out[1] * r * s);
        }
    }

    #[test]
    fn transposed_shapes_parse() {
        let l = parse_transposed_shape("up=1,64,56,56:32,3x3,s2,p1,op1", 0).unwrap();
        assert_eq!(l.name, "up");
        assert_eq!(l.build().unwrap().output_shape(), [1, 32, 112, 112]);
        let l = parse_transposed_shape("2,8,5,7:4,3x2,s2x3,op1x2,d1,g2", 3).unwrap();
        assert_eq!(l.name, "shape3");
        let t = l.build().unwrap();
        // (5−1)·2 + 3 + 1 = 12, (7−1)·3 + 2 + 2 = 22.
        assert_eq!(t.output_shape(), [2, 4, 12, 22]);
        assert_eq!(t.weight_shape(), [8, 2, 3, 2]);
        assert!(parse_transposed_shape("1,1,8,8:1,3,opx", 0).is_err());
        assert!(parse_transposed_shape("1,1,8,8:1,3,q1", 0)
            .unwrap_err()
            .contains("op"));
    }

    #[test]
    fn suite_matches_gemm_shapes() {
        // The im2col shapes are the suite's GEMMs.
        for (name, shape) in [
            ("r50_3x3", GEMM_IM2COL[0]),
            ("r50_conv1", GEMM_IM2COL[1]),
            ("r50_deep", GEMM_IM2COL[2]),
            ("r50_1x1", GEMM_IM2COL[3]),
            ("r50_last1x1", GEMM_IM2COL[4]),
            ("r50_3x3_s2", GEMM_IM2COL[5]),
        ] {
            let l = SUITE.iter().find(|l| l.name == name).unwrap();
            let g = *l.params().build().unwrap().geometry();
            assert_eq!(
                (g.out_channels_per_group(), g.gemm_k(), g.out_plane()),
                shape,
                "{name}"
            );
        }
    }

    #[test]
    fn shapes_parse() {
        let l = parse_shape("x=1,64,56,56:128,3x3,s2,p1", 0).unwrap();
        assert_eq!(l.name, "x");
        let c = l.build().unwrap();
        assert_eq!(c.output_shape(), [1, 128, 28, 28]);

        let l = parse_shape("2,8,10,12:4,3x5,p1,2,0,3,d2,g2", 7).unwrap();
        assert_eq!(l.name, "shape7");
        assert_eq!(l.params.padding, Padding::explicit(1, 2, 0, 3).into());
        assert_eq!(l.params.dilation, (2, 2));
        assert_eq!(l.params.groups, 2);
        assert_eq!(l.params.kernel_size, (3, 5));

        let l = parse_shape("1,1,8,8:1,3,s2x1,p1x2", 0).unwrap();
        assert_eq!(l.params.stride, (2, 1));
        assert_eq!(l.params.padding, Padding::explicit(1, 1, 2, 2).into());

        assert!(parse_shape("1,1,8:1,3", 0).is_err());
        assert!(parse_shape("1,1,8,8:1,3,p1,2", 0).is_err());
        assert!(parse_shape("1,1,8,8:1,3,q1", 0).is_err());
        let e = parse_shape("1,1,8,8:1,3,s2,op1", 0).unwrap_err();
        assert!(e.contains("transposed"), "{e}");
        assert_eq!(parse_gemm_shape("64x576x3136"), Ok((64, 576, 3136)));
        assert_eq!(parse_gemm_shape("512"), Ok((512, 512, 512)));
    }
}
