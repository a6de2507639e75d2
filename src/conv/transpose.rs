//! Transposed convolution (PyTorch `nn.ConvTranspose2d`, ONNX
//! `ConvTranspose`): the adjoint of a convolution, the upsampling layer of
//! decoders, U-Nets and GANs. It runs on the same sub-pixel phases as a
//! convolution's input gradient (see `phases.rs`), with bias and activation
//! fused into the phases' stores.

use super::direct_simd::dense_one_row_fills_the_tile;
use super::measure::{ChoiceSource, PlanChoice, PlanEffort};
use super::phases::{transposed_forward, PlannedPhases, TransposedAxis, TransposedGeometry};
use super::transposed_gemm::{
    gemm_col2im_wins, gemm_rows, pack_weights, transposed_gemm, transposed_gemm_raw,
    TransposedWeights,
};
use super::{check_lengths, direct, try_with_capacity, zeroed, Algorithm, ForwardOptions};
use crate::arch::Isa;
use crate::error::ConvError;
use crate::gemm::engine::select_kernel;
use crate::gemm::GemmBackend;
use crate::geometry::{shape_setters, ConvMode, OnnxAutoPad, Padding};

/// How much of the full output (`stride·(input − 1) + output_padding +
/// dilation·(kernel − 1) + 1` per axis) a transposed convolution keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransposePadding {
    /// PyTorch `padding` (symmetric) or ONNX `pads` (any four values, see
    /// [`Padding::onnx_pads`]): rows and columns removed from each side of
    /// the full output.
    Explicit(Padding),
    /// ONNX `auto_pad`: `SameUpper` and `SameLower` keep `input·stride`
    /// outputs per axis, removing the rest evenly, an odd one at the end
    /// (`SameUpper`) or the beginning (`SameLower`); `Valid` removes
    /// nothing. Where the full output is shorter than `input·stride` (a
    /// kernel smaller than the stride) it is extended at the end with
    /// outputs no input reaches, which hold `act(bias)`.
    OnnxAuto(OnnxAutoPad),
    /// ONNX `output_shape`: keep `size` outputs per axis, the padding
    /// computed as the ONNX operator's equations say: with `total = full −
    /// size`, `SameUpper` (`extra_at_end`) removes `total/2` at the
    /// beginning and the rest at the end; otherwise (auto_pad `NOTSET` or
    /// `SameLower`) `total − total/2` at the beginning. A size above the full
    /// output (a negative total) extends it at the end with outputs no input
    /// reaches, which hold `act(bias)`: onnxruntime's reading (it clamps the
    /// padding at 0), and the values of ONNX's `test_convtranspose_output_shape`.
    OnnxOutputShape {
        /// Output height and width.
        size: (usize, usize),
        /// `true` for ONNX `auto_pad = SAME_UPPER`.
        extra_at_end: bool,
    },
}

impl Default for TransposePadding {
    fn default() -> Self {
        TransposePadding::Explicit(Padding::ZERO)
    }
}

impl From<Padding> for TransposePadding {
    fn from(p: Padding) -> Self {
        TransposePadding::Explicit(p)
    }
}

impl From<OnnxAutoPad> for TransposePadding {
    fn from(p: OnnxAutoPad) -> Self {
        TransposePadding::OnnxAuto(p)
    }
}

/// The parameters of a transposed convolution, PyTorch `nn.ConvTranspose2d`
/// and ONNX `ConvTranspose` semantics: input `[N, C_in, H, W]`, weight
/// `[C_in, C_out/groups, R, S]`, bias `[C_out]`, output `[N, C_out, OH, OW]`
/// with `OH = stride·(H − 1) + output_padding + dilation·(R − 1) + 1 −
/// top − bottom`.
///
/// ```
/// use cpuconv::{Algorithm, ConvTranspose2dParams, Padding};
/// // A 2× upsampling layer: 4×4 kernel, stride 2, padding 1.
/// let up = ConvTranspose2dParams::new(1, 128, (16, 16), 64, (4, 4))
///     .stride(2, 2)
///     .padding(Padding::symmetric(1, 1))
///     .build()?;
/// assert_eq!(up.output_shape(), [1, 64, 32, 32]);
///
/// // The seed example's transpose: each input pixel stamps the kernel.
/// let t = ConvTranspose2dParams::new(1, 1, (2, 2), 1, (2, 2)).build()?;
/// let y = t.forward_to_vec(&[1.0, 2.0, 3.0, 4.0], &[1.0, 0.0, 0.0, 1.0], None, Algorithm::Auto)?;
/// assert_eq!(y, [1.0, 2.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0]);
/// # Ok::<(), cpuconv::ConvError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTranspose2dParams {
    /// Batch size N.
    pub batch: usize,
    /// Input channels C_in.
    pub in_channels: usize,
    /// Input height and width.
    pub input_size: (usize, usize),
    /// Output channels C_out.
    pub out_channels: usize,
    /// Kernel height R and width S.
    pub kernel_size: (usize, usize),
    /// Stride (vertical, horizontal): the upsampling factor.
    pub stride: (usize, usize),
    /// What is removed from the full output.
    pub padding: TransposePadding,
    /// Extra outputs at the end of each axis (PyTorch `output_padding`, ONNX
    /// `output_padding`); each below the larger of stride and dilation.
    pub output_padding: (usize, usize),
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Number of groups; must divide C_in and C_out.
    pub groups: usize,
    /// Cross-correlation (PyTorch, ONNX) or flipped kernel, as for
    /// [`crate::Conv2dParams::mode`]: the transposed convolution is the
    /// adjoint of the convolution with the same mode.
    pub mode: ConvMode,
}

impl ConvTranspose2dParams {
    /// `batch` images of `in_channels × input_size` into `out_channels` with
    /// a `kernel_size` kernel; stride 1, no padding, no output padding,
    /// dilation 1, one group, cross-correlation.
    pub fn new(
        batch: usize,
        in_channels: usize,
        input_size: (usize, usize),
        out_channels: usize,
        kernel_size: (usize, usize),
    ) -> Self {
        ConvTranspose2dParams {
            batch,
            in_channels,
            input_size,
            out_channels,
            kernel_size,
            stride: (1, 1),
            padding: TransposePadding::default(),
            output_padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
            mode: ConvMode::CrossCorrelation,
        }
    }

    shape_setters!(stride);

    /// Sets the padding: a [`Padding`], an [`OnnxAutoPad`] or any
    /// [`TransposePadding`].
    pub fn padding(mut self, padding: impl Into<TransposePadding>) -> Self {
        self.padding = padding.into();
        self
    }

    /// Sets the output padding (vertical, horizontal).
    pub fn output_padding(mut self, h: usize, w: usize) -> Self {
        self.output_padding = (h, w);
        self
    }

    shape_setters!(dilation, groups, mode);

    /// Validates the parameters and computes every derived size.
    ///
    /// # Errors
    /// A zero size, stride, dilation or group count; groups that do not
    /// divide both channel counts; an output padding not below the larger
    /// of stride and dilation; an `output_shape` of 0; padding
    /// that removes the whole output; a size that overflows or exceeds
    /// `isize::MAX`.
    pub fn build(self) -> Result<ConvTranspose2d, ConvError> {
        ConvTranspose2d::new(&self)
    }
}

/// A validated transposed convolution, built by
/// [`ConvTranspose2dParams::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTranspose2d {
    tg: TransposedGeometry,
    padding: Padding,
    output_padding: (usize, usize),
}

/// One axis's resolved padding and extent, `(begin, end, output)`:
/// axis 0 is the height, 1 the width.
fn resolve_axis(
    p: &ConvTranspose2dParams,
    index: usize,
) -> Result<(usize, usize, usize), ConvError> {
    let pick = |pair: (usize, usize)| if index == 0 { pair.0 } else { pair.1 };
    let axis = if index == 0 { "height" } else { "width" };
    let (input, kernel, stride, dilation, output_padding) = (
        pick(p.input_size),
        pick(p.kernel_size),
        pick(p.stride),
        pick(p.dilation),
        pick(p.output_padding),
    );
    if output_padding >= stride.max(dilation) {
        return Err(ConvError::OutputPaddingTooLarge {
            axis,
            output_padding,
            stride,
            dilation,
        });
    }
    let overflow = ConvError::Overflow {
        what: "transposed convolution output size",
    };
    // stride·(input − 1) + output_padding + dilation·(kernel − 1) + 1.
    let full = stride
        .checked_mul(input - 1)
        .and_then(|v| v.checked_add(output_padding))
        .and_then(|v| v.checked_add(dilation.checked_mul(kernel - 1)?))
        .and_then(|v| v.checked_add(1))
        .ok_or(overflow.clone())?;
    // What is kept: the explicit rules remove padding from the full output;
    // the ONNX rules name a size, reached by removing `full − size` split
    // as the spec says, or, for a size above `full` (a negative total
    // padding), by extending the output at the end with outputs no input
    // reaches (`act(bias)`), as onnxruntime does (it clamps the padding
    // at 0 and keeps the size).
    let target = match p.padding {
        TransposePadding::Explicit(pad) => {
            let (begin, end) = if index == 0 {
                (pad.top, pad.bottom)
            } else {
                (pad.left, pad.right)
            };
            let removed = begin.checked_add(end);
            return match removed {
                Some(removed) if removed < full => Ok((begin, end, full - removed)),
                _ => Err(ConvError::PaddingRemovesOutput {
                    axis,
                    full,
                    padding: removed.unwrap_or(usize::MAX),
                }),
            };
        }
        TransposePadding::OnnxAuto(OnnxAutoPad::Valid) => return Ok((0, 0, full)),
        TransposePadding::OnnxAuto(same) => (
            input.checked_mul(stride).ok_or(overflow)?,
            same == OnnxAutoPad::SameUpper,
        ),
        TransposePadding::OnnxOutputShape { size, extra_at_end } => {
            let requested = pick(size);
            if requested == 0 {
                return Err(ConvError::UnreachableOutputShape {
                    axis,
                    requested,
                    full,
                });
            }
            (requested, extra_at_end)
        }
    };
    let (size, extra_at_end) = target;
    if size > full {
        return Ok((0, 0, size));
    }
    let total = full - size;
    let half = total / 2;
    let (begin, end) = if extra_at_end {
        (half, total - half)
    } else {
        (total - half, half)
    };
    Ok((begin, end, size))
}

impl ConvTranspose2d {
    fn new(p: &ConvTranspose2dParams) -> Result<ConvTranspose2d, ConvError> {
        // The matching convolution's rules for sizes, groups and `isize`
        // bounds, on the input side; the output side is checked below.
        let probe =
            crate::Conv2dParams::new(p.batch, p.in_channels, p.input_size, p.out_channels, (1, 1))
                .stride(p.stride.0, p.stride.1)
                .dilation(p.dilation.0, p.dilation.1)
                .groups(p.groups);
        if p.kernel_size.0 == 0 || p.kernel_size.1 == 0 {
            return Err(ConvError::ZeroDimension {
                name: "kernel_size",
            });
        }
        crate::geometry::ConvGeometry::new(&probe)?;
        let (top, bottom, out_h) = resolve_axis(p, 0)?;
        let (left, right, out_w) = resolve_axis(p, 1)?;
        for (what, v) in [
            ("output height", out_h),
            ("output width", out_w),
            ("kernel height", p.kernel_size.0),
            ("kernel width", p.kernel_size.1),
            ("top padding", top),
            ("left padding", left),
        ] {
            if isize::try_from(v).is_err() {
                return Err(ConvError::TooLarge { what, value: v });
            }
        }
        let lengths = [
            [p.batch, p.in_channels, p.input_size.0, p.input_size.1],
            [p.batch, p.out_channels, out_h, out_w],
            [
                p.in_channels,
                p.out_channels / p.groups,
                p.kernel_size.0,
                p.kernel_size.1,
            ],
        ];
        for dims in lengths {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or(ConvError::Overflow {
                    what: "transposed convolution buffer length",
                })?;
        }
        let flops = [
            2,
            p.batch as u64,
            p.in_channels as u64,
            p.input_size.0 as u64,
            p.input_size.1 as u64,
            (p.out_channels / p.groups) as u64,
            p.kernel_size.0 as u64,
            p.kernel_size.1 as u64,
        ];
        flops
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or(ConvError::Overflow {
                what: "transposed convolution FLOP count",
            })?;
        let axis = |input, output, kernel, stride, dilation, begin: usize| TransposedAxis {
            input,
            output,
            kernel,
            stride,
            dilation,
            offset: begin as isize,
        };
        Ok(ConvTranspose2d {
            tg: TransposedGeometry {
                batch: p.batch,
                in_channels: p.in_channels,
                out_channels: p.out_channels,
                groups: p.groups,
                h: axis(
                    p.input_size.0,
                    out_h,
                    p.kernel_size.0,
                    p.stride.0,
                    p.dilation.0,
                    top,
                ),
                w: axis(
                    p.input_size.1,
                    out_w,
                    p.kernel_size.1,
                    p.stride.1,
                    p.dilation.1,
                    left,
                ),
                mode: p.mode,
            },
            padding: Padding::explicit(top, bottom, left, right),
            output_padding: p.output_padding,
        })
    }

    /// `[N, C_in, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        let t = &self.tg;
        [t.batch, t.in_channels, t.h.input, t.w.input]
    }

    /// `[C_in, C_out/groups, R, S]` (PyTorch's layout for
    /// `ConvTranspose2d.weight`, ONNX's for `ConvTranspose`'s `W`).
    pub fn weight_shape(&self) -> [usize; 4] {
        let t = &self.tg;
        [t.in_channels, t.out_per_group(), t.h.kernel, t.w.kernel]
    }

    /// `[N, C_out, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        let t = &self.tg;
        [t.batch, t.out_channels, t.h.output, t.w.output]
    }

    /// The padding removed from the full output, any ONNX rule resolved.
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The output padding.
    pub fn output_padding(&self) -> (usize, usize) {
        self.output_padding
    }

    /// `2·N·C_in·H·W·(C_out/groups)·R·S`: every input pixel meets every tap
    /// of its group's kernels once (taps that land in the removed padding
    /// included, as for the convolution's count).
    pub fn flops(&self) -> u64 {
        let t = &self.tg;
        // Checked when built.
        2 * (t.batch * t.in_channels * t.h.input * t.w.input) as u64
            * (t.out_per_group() * t.h.kernel * t.w.kernel) as u64
    }

    /// Checks the lengths of the buffers given (`None`: not part of the call).
    fn check_buffers(
        &self,
        input: Option<&[f32]>,
        weight: &[f32],
        bias: Option<&[f32]>,
        output: Option<&[f32]>,
    ) -> Result<(), ConvError> {
        let t = &self.tg;
        check_lengths(&[
            (
                "input",
                t.input_len(),
                input.map_or(t.input_len(), <[f32]>::len),
            ),
            ("weight", t.weight_len(), weight.len()),
            (
                "bias",
                t.out_channels,
                bias.map_or(t.out_channels, <[f32]>::len),
            ),
            (
                "output",
                t.output_len(),
                output.map_or(t.output_len(), <[f32]>::len),
            ),
        ])
    }

    /// Computes the transposed convolution into `output` with the default
    /// options and the given algorithm.
    pub fn forward(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        algorithm: Algorithm,
    ) -> Result<(), ConvError> {
        self.forward_with(input, weight, bias, output, &ForwardOptions::new(algorithm))
    }

    /// Computes `output = act(conv_transpose(input, weight) + bias)` as
    /// `options` say. `options.algorithm` is [`Algorithm::Direct`] for the
    /// reference loops over the definition, [`Algorithm::Im2col`] for GEMM +
    /// col2im, [`Algorithm::Auto`] for [`ConvTranspose2d::auto_algorithm`]'s
    /// choice; `Implicit` and `DirectSimd` run the sub-pixel phases, each an
    /// ordinary stride-1 convolution computed by that algorithm.
    pub fn forward_with(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        options: &ForwardOptions,
    ) -> Result<(), ConvError> {
        self.check_buffers(Some(input), weight, bias, Some(output))?;
        options.activation.validate()?;
        match self.resolve(options.algorithm, options.resolved_isa()) {
            Algorithm::Direct => {
                direct::transposed_direct(
                    &self.tg,
                    input,
                    weight,
                    bias,
                    options.activation,
                    output,
                );
                Ok(())
            }
            Algorithm::Im2col => {
                transposed_gemm_raw(&self.tg, input, weight, bias, output, options)
            }
            algorithm => transposed_forward(
                &self.tg,
                input,
                weight,
                bias,
                output,
                &ForwardOptions {
                    algorithm,
                    ..*options
                },
            ),
        }
    }

    /// `requested` with `Auto` resolved by [`ConvTranspose2d::auto_algorithm`]
    /// for the kernels of `isa`.
    fn resolve(&self, requested: Algorithm, isa: Isa) -> Algorithm {
        match requested {
            Algorithm::Auto => self.auto_algorithm_for(isa),
            a => a,
        }
    }

    /// The algorithm [`Algorithm::Auto`] runs for this shape:
    /// [`Algorithm::Direct`] below 4 kFLOP; [`Algorithm::Im2col`], GEMM +
    /// col2im (`W_gᵀ·x`, the input read as it lies, then each column added
    /// where it lands), when a group has fewer than 16 output channels, or
    /// an input plane fewer pixels than a group has input channels while
    /// every phase's sub-kernel is 1×1 (the phases' implicit GEMMs then get
    /// too few columns: dcgan_b8's 8² planes of 256 channels ran at 180
    /// GFLOP/s against 154 for the phases on the implicit GEMM, Zen 5
    /// AVX-512, 1 thread, plans), or when the taps are disjoint (kernel =
    /// stride, no dilation or padding: each column lands on one output
    /// pixel and is scattered, no col2im; unet_up_k2s2 203–212 against
    /// 186–196 for the phases); otherwise the sub-pixel phases, each with
    /// its own `Auto` choice (reported as `Auto`). Where the largest
    /// phase's sub-kernel is above 1×1 they run on the dense tile, which needs no
    /// columns: dcgan_b8 199–201 against 182 for GEMM + col2im in the same
    /// run (AVX-512). GEMM + col2im stays, though, where the phases' rows
    /// are too narrow for the path's dense tile to keep its FMAs busy
    /// (AVX2's tile on rows of 8 pixels or fewer) and the input plane has
    /// at most a quarter as many pixels as a group has input channels, so
    /// that the GEMM's depth repays col2im. Zen 3, AVX2, 1 thread, plans
    /// alternating call by call, GFLOP/s, phases on the dense tile against
    /// GEMM + col2im, best of 50–1500 calls: 8 images of 256 → 128 channels
    /// on 8² (dcgan_b8) 74 vs 83, one image 75 vs 85, 8 of 512 → 256 on 4²
    /// 71 vs 80 and on 8² 73 vs 85 (GEMM + col2im); 8 of 128 → 256 on 8² 77
    /// vs 67 and 64 → 64 71 vs 65 (too shallow: the tile), and 16-pixel
    /// phases, gan_up_k4s2 84 vs 80 and 8 of 128 → 64 on 16² 78 vs 77 (the
    /// tile). Those figures are from one-row tiles; since the tiles run
    /// over up to three rows, which fills them on 8-pixel rows too, the
    /// same comparison gave ties or GEMM + col2im still ahead (dcgan_b8
    /// 84.4 vs 84.3, one image 85.3 vs 85.5, 8 of 512 → 256 on 8² 84.0 vs
    /// 84.2 and on 4² 77 vs 85, k3s2 512 → 256 on 7² 69 vs 77), so the
    /// rule still counts one row's tiles. (The input gradient keeps its own
    /// rule, `Conv2d::auto_input_gradient_algorithm`: packing per call, the
    /// two measured even on r50_deep.)
    pub fn auto_algorithm(&self) -> Algorithm {
        self.auto_algorithm_for(crate::isa())
    }

    /// [`ConvTranspose2d::auto_algorithm`] for the kernels of `isa` (clamped
    /// to the CPU): whether the phases' rows fill the dense tile depends on
    /// the path's register tile.
    pub(crate) fn auto_algorithm_for(&self, isa: Isa) -> Algorithm {
        if self.flops() < 4 * 1024 {
            Algorithm::Direct
        } else if gemm_col2im_wins(&self.tg) && !self.phases_run_dense(isa) {
            Algorithm::Im2col
        } else {
            Algorithm::Auto
        }
    }

    /// Whether the largest sub-pixel phase has a sub-kernel above 1×1 with
    /// at least 32 taps and at least 16 output channels a group, so that
    /// `Auto` runs the phases on the dense tile, whose weights a plan packs
    /// once; and, where the input plane has at most a quarter as many
    /// pixels as a group has input channels, whether every phase's rows
    /// fill the tile of `isa` (see [`ConvTranspose2d::auto_algorithm`]).
    ///
    /// A 1×1 phase beside larger ones (k3s2's) takes its own `Auto`. Zen 3,
    /// AVX2, 1 thread, plans alternating call by call, best GFLOP/s, GEMM +
    /// col2im against the phases, k3s2 p1 op1: 256 → 128 channels on 14²
    /// 75 vs 82, a batch of 8 of them 74 vs 81, 512 → 256 on 14² 79 vs 82,
    /// 1024 → 256 on 28² 75 vs 83, 256 → 128 on 10² 80 vs 82.
    fn phases_run_dense(&self, isa: Isa) -> bool {
        let tg = &self.tg;
        // The largest phase's sub-kernel: k3s2's phases are 2×2, 2×1, 1×2
        // and 1×1, the last with a ninth of the taps.
        let sub = |a: &TransposedAxis| a.kernel.div_ceil(a.stride.max(1));
        let window = sub(&tg.h) * sub(&tg.w);
        let dense = tg.out_per_group() >= 16 && window > 1 && tg.in_per_group() * window >= 32;
        let deep = (tg.h.input * tg.w.input).saturating_mul(4) <= tg.in_per_group();
        dense && (!deep || self.phase_rows_fill_the_tile(isa))
    }

    /// Whether a row of every sub-pixel phase alone gives the dense tile of
    /// `isa` enough accumulators (`direct_simd::dense_one_row_fills_the_tile`).
    fn phase_rows_fill_the_tile(&self, isa: Isa) -> bool {
        let Ok(phases) = super::phases::phases(&self.tg) else {
            return false;
        };
        let kg = self.tg.out_per_group();
        phases
            .iter()
            .filter_map(|p| p.conv.as_ref())
            .all(|conv| dense_one_row_fills_the_tile(isa, kg, conv.geometry().out_w))
    }

    /// As [`ConvTranspose2d::forward`], allocating and returning the output.
    pub fn forward_to_vec(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        algorithm: Algorithm,
    ) -> Result<Vec<f32>, ConvError> {
        self.check_buffers(Some(input), weight, bias, None)?;
        let mut out = zeroed("output", self.tg.output_len())?;
        self.forward(input, weight, bias, &mut out, algorithm)?;
        Ok(out)
    }

    /// Prepares this transposed convolution for `weight` (and `bias`): each
    /// phase's weights are gathered and planned once (pre-packed for the
    /// GEMM lowerings, arranged for the SIMD direct kernels), so every
    /// `forward` goes straight to the phases' loops. With
    /// [`PlanEffort::Measure`] (set by [`ForwardOptions::effort`]) the
    /// algorithm, threads and kernel path are chosen by timing them, as
    /// [`Conv2d::plan`](crate::Conv2d::plan) does, and kept in the
    /// [wisdom](crate::wisdom); [`ConvTranspose2dPlan::choice`] says what was
    /// chosen.
    ///
    /// ```
    /// use cpuconv::{Activation, ConvTranspose2dParams, ForwardOptions, Padding};
    /// let up = ConvTranspose2dParams::new(1, 8, (4, 4), 4, (4, 4))
    ///     .stride(2, 2)
    ///     .padding(Padding::symmetric(1, 1))
    ///     .build()?;
    /// let weight = vec![0.01; 8 * 4 * 16];
    /// let plan = up.plan(&weight, Some(&[0.5; 4]), &ForwardOptions::default().activation(Activation::Relu))?;
    /// let mut out = vec![0.0; 4 * 8 * 8];
    /// plan.forward(&vec![1.0; 8 * 16], &mut out)?;
    /// // An interior output meets 2×2 taps of each of the 8 input channels.
    /// assert!((out[3 * 8 + 3] - (0.5 + 8.0 * 4.0 * 0.01)).abs() < 1e-6);
    /// # Ok::<(), cpuconv::ConvError>(())
    /// ```
    pub fn plan(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
    ) -> Result<ConvTranspose2dPlan, ConvError> {
        match options.effort {
            PlanEffort::Estimate => self.plan_as(weight, bias, options, ChoiceSource::Estimate),
            _ => {
                self.check_buffers(None, weight, bias, None)?;
                options.activation.validate()?;
                super::measure::plan_transposed(self, weight, bias, options)
            }
        }
    }

    /// The geometry the passes run on.
    pub(crate) fn transposed_geometry(&self) -> &TransposedGeometry {
        &self.tg
    }

    /// [`ConvTranspose2d::plan`] without measuring: `options` as they are,
    /// the choice marked as coming from `source`.
    pub(crate) fn plan_as(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
        source: ChoiceSource,
    ) -> Result<ConvTranspose2dPlan, ConvError> {
        self.check_buffers(None, weight, bias, None)?;
        options.activation.validate()?;
        let copy = |what, v: &[f32]| -> Result<Vec<f32>, ConvError> {
            let mut c = try_with_capacity(what, v.len())?;
            c.extend_from_slice(v);
            Ok(c)
        };
        let algorithm = self.resolve(options.algorithm, options.resolved_isa());
        let options = ForwardOptions {
            algorithm,
            ..*options
        };
        let raw = || -> Result<PlanInner, ConvError> {
            Ok(PlanInner::Raw {
                weight: copy("plan weights", weight)?,
                bias: bias.map(|b| copy("plan bias", b)).transpose()?,
                options,
            })
        };
        let inner = match algorithm {
            Algorithm::Direct => raw()?,
            Algorithm::Im2col if options.backend == GemmBackend::Native => {
                let isa = options.resolved_isa();
                let t = &self.tg;
                let kernel = select_kernel(
                    Some(isa),
                    gemm_rows(t),
                    t.h.input * t.w.input,
                    true,
                    options.blocking,
                );
                PlanInner::Packed {
                    weight: pack_weights(t, weight, kernel.mr)?,
                    mr: kernel.mr,
                    bias: bias.map(|b| copy("plan bias", b)).transpose()?,
                    options: ForwardOptions {
                        isa: Some(isa),
                        ..options
                    },
                }
            }
            Algorithm::Im2col => raw()?,
            _ => PlanInner::Phases(PlannedPhases::new(&self.tg, weight, bias, &options)?),
        };
        let choice = PlanChoice {
            algorithm,
            threads: options.parallelism.max_threads(),
            isa: options.resolved_isa(),
            source,
        };
        Ok(ConvTranspose2dPlan {
            conv: *self,
            inner,
            choice,
        })
    }
}

/// A transposed convolution bound to its weights and options; `forward`
/// takes `&self`, and a plan is `Send + Sync`.
#[derive(Clone, Debug)]
pub struct ConvTranspose2dPlan {
    conv: ConvTranspose2d,
    inner: PlanInner,
    choice: PlanChoice,
}

#[derive(Clone, Debug)]
enum PlanInner {
    /// `Direct`, or `Im2col` on a GEMM engine that takes no packed weights.
    Raw {
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        options: ForwardOptions,
    },
    /// `Im2col` with `W_gᵀ` packed for the kernel with `mr` rows.
    Packed {
        weight: Vec<f32>,
        mr: usize,
        bias: Option<Vec<f32>>,
        options: ForwardOptions,
    },
    Phases(PlannedPhases),
}

impl ConvTranspose2dPlan {
    /// The transposed convolution this plan computes.
    pub fn conv(&self) -> &ConvTranspose2d {
        &self.conv
    }

    /// What the plan runs and where that choice came from (see
    /// [`PlanEffort`]): the algorithm ([`Algorithm::Auto`] for the sub-pixel
    /// phases, each with its own choice; [`ConvTranspose2dPlan::algorithms`]
    /// names them), the threads it may use, its kernel path.
    pub fn choice(&self) -> PlanChoice {
        self.choice
    }

    pub(crate) fn set_source(&mut self, source: ChoiceSource) {
        self.choice.source = source;
    }

    /// The algorithm each sub-pixel phase runs, in phase order (row phase
    /// major); `None` for a phase no tap reaches (it holds `act(bias)`). A
    /// `Direct` or `Im2col` plan reports that one algorithm.
    pub fn algorithms(&self) -> Vec<Option<Algorithm>> {
        match &self.inner {
            PlanInner::Raw { options, .. } | PlanInner::Packed { options, .. } => {
                vec![Some(options.algorithm)]
            }
            PlanInner::Phases(p) => p.algorithms().collect(),
        }
    }

    /// Computes the transposed convolution of `input` into `output`.
    pub fn forward(&self, input: &[f32], output: &mut [f32]) -> Result<(), ConvError> {
        let tg = &self.conv.tg;
        check_lengths(&[
            ("input", tg.input_len(), input.len()),
            ("output", tg.output_len(), output.len()),
        ])?;
        match &self.inner {
            PlanInner::Raw {
                weight,
                bias,
                options,
            } if options.algorithm == Algorithm::Direct => {
                direct::transposed_direct(
                    tg,
                    input,
                    weight,
                    bias.as_deref(),
                    options.activation,
                    output,
                );
                Ok(())
            }
            PlanInner::Raw {
                weight,
                bias,
                options,
            } => transposed_gemm(
                tg,
                input,
                TransposedWeights::Raw(weight),
                bias.as_deref(),
                output,
                options,
            ),
            PlanInner::Packed {
                weight,
                mr,
                bias,
                options,
            } => transposed_gemm(
                tg,
                input,
                TransposedWeights::Packed {
                    data: weight,
                    mr: *mr,
                },
                bias.as_deref(),
                output,
                options,
            ),
            PlanInner::Phases(p) => p.forward(input, output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::supported_isas;

    fn up(batch: usize, cin: usize, size: usize, cout: usize) -> ConvTranspose2d {
        ConvTranspose2dParams::new(batch, cin, (size, size), cout, (4, 4))
            .stride(2, 2)
            .padding(Padding::symmetric(1, 1))
            .build()
            .unwrap()
    }

    #[test]
    fn auto_follows_the_tile_of_the_forced_isa() {
        // dcgan_b8: 8² planes, 256 input channels (a plane of a quarter as
        // many pixels), 8-pixel phase rows.
        let dcgan = up(8, 256, 8, 128);
        // 128 input channels: the GEMM is too shallow to repay col2im.
        let shallow = up(8, 128, 8, 256);
        // 16-pixel phase rows fill AVX2's tile too.
        let wide = up(1, 1024, 16, 128);
        // k3s2: the 2×2 phase decides, not the 1×1 one.
        let k3s2 = |size: usize| {
            ConvTranspose2dParams::new(1, 512, (size, size), 256, (3, 3))
                .stride(2, 2)
                .padding(Padding::symmetric(1, 1))
                .output_padding(1, 1)
                .build()
                .unwrap()
        };
        let pick = |fills: bool| {
            if fills {
                Algorithm::Auto
            } else {
                Algorithm::Im2col
            }
        };
        for isa in supported_isas() {
            let (fills_8, fills_16) = (fills(isa, 8), fills(isa, 16));
            assert_eq!(dcgan.auto_algorithm_for(isa), pick(fills_8), "{isa}");
            assert_eq!(shallow.auto_algorithm_for(isa), Algorithm::Auto, "{isa}");
            assert_eq!(wide.auto_algorithm_for(isa), pick(fills_16), "{isa}");
            // 14²: a plane of more than a quarter as many pixels as the
            // 512 channels, so the phases whatever the tile; 7²: as the
            // tile's rows say.
            assert_eq!(k3s2(14).auto_algorithm_for(isa), Algorithm::Auto, "{isa}");
            let fills_7 = dense_one_row_fills_the_tile(isa, 256, 7);
            assert_eq!(k3s2(7).auto_algorithm_for(isa), pick(fills_7), "{isa}");
            if isa == Isa::Avx2 {
                assert!(!fills_8 && fills_16);
                assert_eq!(k3s2(7).auto_algorithm_for(isa), Algorithm::Im2col);
            }
        }
        assert_eq!(
            dcgan.auto_algorithm(),
            dcgan.auto_algorithm_for(crate::isa())
        );
    }

    /// Whether `isa`'s dense tile keeps more than 8 accumulators on rows of
    /// `out_w` pixels of 128 channels (on 8 pixels AVX-512's 4 × 6 does,
    /// AVX2's 2 × 6 does not).
    fn fills(isa: Isa, out_w: usize) -> bool {
        dense_one_row_fills_the_tile(isa, 128, out_w)
    }
}
