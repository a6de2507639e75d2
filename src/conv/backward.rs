//! The backward passes of a convolution: gradients with respect to the
//! input, the weight and the bias, with PyTorch's `convolution_backward`
//! semantics for every parameter the forward accepts.
//!
//! The input and weight gradients run either the [`Algorithm::Direct`]
//! reference (nested loops over the definition, in `direct.rs`) or
//! [`Algorithm::Im2col`], the textbook GEMM lowering (`backward_gemm.rs`);
//! the bias gradient is a plain sum. The implicit GEMM lowerings come next,
//! chosen through the same [`BackwardOptions`].

use super::phases::{self, TransposedGeometry};
use super::{backward_gemm, direct, direct_simd};
use super::{check_lengths, Algorithm, Conv2d, ForwardOptions};
use crate::error::ConvError;
use crate::gemm::{GemmBackend, Isa, Parallelism};

/// Everything about a backward call beyond the tensors. Built with
/// [`BackwardOptions::new`] (or `default()`) and the chained setters, so that
/// later versions can add options without breaking callers.
///
/// ```
/// use cpuconv::{Algorithm, BackwardOptions, Parallelism};
/// let options = BackwardOptions::new(Algorithm::Direct)
///     .accumulate(true)
///     .parallelism(Parallelism::threads(1));
/// assert!(options.accumulate);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct BackwardOptions {
    /// Which algorithm computes the input and weight gradients:
    /// [`Algorithm::Direct`] or [`Algorithm::Im2col`]. [`Algorithm::Auto`]
    /// (the default) resolves to `Direct` for now: `Im2col` builds a column
    /// matrix per image and group and pays for it in memory traffic, and the
    /// implicit lowerings that avoid it (the fast paths `Auto` should pick)
    /// come next. The weight gradient also runs [`Algorithm::DirectSimd`],
    /// the SIMD direct pass for depthwise and small-group convolutions
    /// (threads over output channels, results bitwise identical for any
    /// thread count). Any other algorithm is refused with
    /// [`ConvError::UnsupportedAlgorithm`].
    pub algorithm: Algorithm,
    /// `false` (the default): the weight and bias gradients replace what
    /// their buffers hold. `true`: they are added to it (`grad += dW`), as
    /// frameworks accumulate over micro-batches. The input gradient is
    /// always overwritten.
    pub accumulate: bool,
    /// Threads: each GEMM of [`Algorithm::Im2col`] threads itself;
    /// `DirectSimd` splits the output channels; the `Direct` reference runs
    /// on the calling thread.
    pub parallelism: Parallelism,
    /// Force a kernel path (clamped to the CPU) for the GEMMs of
    /// [`Algorithm::Im2col`] and the kernels of `DirectSimd`; `None` uses
    /// [`crate::isa()`]. The `Direct` reference uses no SIMD kernel.
    pub isa: Option<Isa>,
    /// GEMM engine for [`Algorithm::Im2col`] (ignored by `Direct`).
    pub backend: GemmBackend,
}

impl BackwardOptions {
    /// Defaults with the given algorithm.
    pub fn new(algorithm: Algorithm) -> Self {
        BackwardOptions {
            algorithm,
            ..Default::default()
        }
    }

    /// Sets the algorithm.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Sets whether the weight and bias gradients are added to their
    /// buffers (`true`) or replace them (`false`).
    pub fn accumulate(mut self, accumulate: bool) -> Self {
        self.accumulate = accumulate;
        self
    }

    /// Sets how many threads the call may use.
    pub fn parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Forces a kernel path (clamped to what the CPU supports).
    pub fn isa(mut self, isa: impl Into<Option<Isa>>) -> Self {
        self.isa = isa.into();
        self
    }

    /// Sets the GEMM engine of [`Algorithm::Im2col`].
    pub fn backend(mut self, backend: GemmBackend) -> Self {
        self.backend = backend;
        self
    }

    /// The algorithm the input gradient of `conv` runs: `Direct`,
    /// `Im2col`, or one the sub-pixel phases run on (`Implicit`,
    /// `DirectSimd`, `Auto`); `Auto` resolved by
    /// [`Conv2d::auto_input_gradient_algorithm`].
    fn input_algorithm(&self, conv: &Conv2d) -> Algorithm {
        match self.algorithm {
            Algorithm::Auto => conv.auto_input_gradient_algorithm(),
            a => a,
        }
    }

    /// The forward options of the convolutions a pass lowers to.
    fn phase_options(&self, algorithm: Algorithm) -> ForwardOptions {
        ForwardOptions {
            algorithm,
            parallelism: self.parallelism,
            backend: self.backend,
            activation: crate::gemm::Activation::None,
            isa: self.isa,
            blocking: None,
        }
    }

    /// The algorithm `pass` runs: `Direct` (also for `Auto`, see
    /// [`BackwardOptions::algorithm`]) or `Im2col`; any other is refused.
    fn check_algorithm(&self, pass: &'static str) -> Result<Algorithm, ConvError> {
        match self.algorithm {
            Algorithm::Direct | Algorithm::Auto => Ok(Algorithm::Direct),
            Algorithm::Im2col => Ok(Algorithm::Im2col),
            algorithm => Err(ConvError::UnsupportedAlgorithm {
                pass,
                algorithm: algorithm.name(),
            }),
        }
    }

    /// The algorithm the weight gradient runs: [`Algorithm::DirectSimd`]
    /// when asked for (the SIMD direct pass for depthwise and small-group
    /// convolutions), otherwise as [`BackwardOptions::check_algorithm`].
    fn check_weight_algorithm(&self, pass: &'static str) -> Result<Algorithm, ConvError> {
        match self.algorithm {
            Algorithm::DirectSimd => Ok(Algorithm::DirectSimd),
            _ => self.check_algorithm(pass),
        }
    }
}

/// The gradients a [`Conv2d::backward`] call computes: each `Some` buffer is
/// filled, each `None` pass is skipped (PyTorch's `output_mask`). Shapes are
/// those of the input `[N, C, H, W]`, the weight `[K, C/groups, R, S]` and
/// the bias `[K]`.
#[derive(Debug, Default)]
pub struct Grads<'a> {
    /// ∂L/∂input, always overwritten.
    pub input: Option<&'a mut [f32]>,
    /// ∂L/∂weight, summed over the batch; overwritten or accumulated into
    /// as [`BackwardOptions::accumulate`] says.
    pub weight: Option<&'a mut [f32]>,
    /// ∂L/∂bias; overwritten or accumulated into as
    /// [`BackwardOptions::accumulate`] says.
    pub bias: Option<&'a mut [f32]>,
}

impl Conv2d {
    /// The algorithm [`Algorithm::Auto`] runs for [`Conv2d::backward_input`]:
    ///
    /// * the sub-pixel phases (each phase a stride-1 convolution with its
    ///   own `Auto` choice: `DirectSimd` for depthwise and small groups,
    ///   `Implicit` otherwise), reported as `Auto`, when a group has at most
    ///   16 input and output channels, or when the batch's output pixels
    ///   `N·OH·OW` are at least the output channels per group `K/g`;
    /// * [`Algorithm::Im2col`] otherwise: when a group has fewer than 16
    ///   input channels (the phases' GEMMs would have fewer rows than the
    ///   micro-kernel's tile), or few output pixels per output channel.
    ///
    /// Why the pixels: the phases gather the transposed weights once per
    /// call (`K·C·R·S` floats, one per `2·N·OH·OW` FLOPs), while `Im2col`
    /// reads them in place and pays for its `col2im` instead (one add per
    /// `2·K/g` FLOPs). Measured (Zen 5, AVX-512, 1 thread, GFLOP/s, phases
    /// vs Im2col, forward plan in brackets): r50_3x3 215 vs 133 [222],
    /// r50_1x1 236 vs 134 [250], dilated 220 vs 140 [225], batch16 195 vs
    /// 129 [197], r50_3x3_s2 166 vs 169 [203]; r50_deep (49 pixels, 512
    /// channels) 73 vs 138 [213], r50_last1x1 (49, 2048) 95 vs 145 [254];
    /// the 3-channel stem r50_conv1 43 vs 116 [208].
    pub fn auto_input_gradient_algorithm(&self) -> Algorithm {
        let g = self.geometry();
        let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
        let pixels = g.batch.saturating_mul(g.out_plane());
        if g.flops() < 4 * 1024 {
            Algorithm::Direct
        } else if (cg <= 16 && kg <= 16) || (cg >= 16 && pixels >= kg) {
            Algorithm::Auto
        } else {
            Algorithm::Im2col
        }
    }

    /// The gradient with respect to the input: `grad_input = ∂L/∂input`
    /// given `grad_output = ∂L/∂output` (`[N, K, OH, OW]`), for the forward
    /// without its activation (apply the activation's derivative to
    /// `grad_output` first).
    ///
    /// Every element of `grad_input` is overwritten; input pixels the
    /// forward never read (the last rows or columns when the stride does not
    /// divide the padded extent evenly) get 0.
    ///
    /// [`Algorithm::Im2col`] fails with [`ConvError::OutOfMemory`] when its
    /// column matrix (`C/g·R·S × OH·OW` floats) cannot be allocated,
    /// leaving `grad_input` as it was.
    pub fn backward_input(
        &self,
        weight: &[f32],
        grad_output: &[f32],
        grad_input: &mut [f32],
        options: &BackwardOptions,
    ) -> Result<(), ConvError> {
        let g = self.geometry();
        check_lengths(&[
            ("weight", g.weight_len(), weight.len()),
            ("grad_output", g.output_len(), grad_output.len()),
            ("grad_input", g.input_len(), grad_input.len()),
        ])?;
        match options.input_algorithm(self) {
            Algorithm::Direct => {
                direct::conv2d_backward_input_direct(g, weight, grad_output, grad_input);
                Ok(())
            }
            Algorithm::Im2col => {
                backward_gemm::backward_input_im2col(g, weight, grad_output, grad_input, options)
            }
            phase_algorithm => {
                let tg = TransposedGeometry::grad_input_of(g);
                let forward = options.phase_options(phase_algorithm);
                phases::transposed_forward(&tg, grad_output, weight, None, grad_input, &forward)
            }
        }
    }

    /// The gradient with respect to the weight, summed over the batch:
    /// `grad_weight = ∂L/∂weight` given `grad_output = ∂L/∂output`. It
    /// replaces what `grad_weight` holds, or is added to it when
    /// `options.accumulate` is set.
    ///
    /// [`Algorithm::Im2col`] fails with [`ConvError::OutOfMemory`] when its
    /// column matrix (`C/g·R·S × OH·OW` floats) cannot be allocated, leaving
    /// `grad_weight` as it was.
    pub fn backward_weight(
        &self,
        input: &[f32],
        grad_output: &[f32],
        grad_weight: &mut [f32],
        options: &BackwardOptions,
    ) -> Result<(), ConvError> {
        let g = self.geometry();
        check_lengths(&[
            ("input", g.input_len(), input.len()),
            ("grad_output", g.output_len(), grad_output.len()),
            ("grad_weight", g.weight_len(), grad_weight.len()),
        ])?;
        let algorithm = options.check_weight_algorithm("grad_weight")?;
        if algorithm == Algorithm::DirectSimd {
            return direct_simd::backward_weight(
                g,
                input,
                grad_output,
                grad_weight,
                options.accumulate,
                options.isa.unwrap_or_else(crate::isa),
                options.parallelism,
            );
        }
        if algorithm == Algorithm::Im2col {
            return backward_gemm::backward_weight_im2col(
                g,
                input,
                grad_output,
                grad_weight,
                options,
            );
        }
        direct::conv2d_backward_weight_direct(
            g,
            input,
            grad_output,
            grad_weight,
            options.accumulate,
        );
        Ok(())
    }

    /// The gradient with respect to the bias: `grad_bias[k]` is the sum of
    /// `grad_output` over the batch and channel `k`'s output plane. It
    /// replaces what `grad_bias` holds; to accumulate into it, call
    /// [`Conv2d::backward`] with only [`Grads::bias`] and
    /// [`BackwardOptions::accumulate`] set.
    pub fn backward_bias(
        &self,
        grad_output: &[f32],
        grad_bias: &mut [f32],
    ) -> Result<(), ConvError> {
        let g = self.geometry();
        check_lengths(&[
            ("grad_output", g.output_len(), grad_output.len()),
            ("grad_bias", g.out_channels, grad_bias.len()),
        ])?;
        direct::conv2d_backward_bias_direct(g, grad_output, grad_bias, false);
        Ok(())
    }

    /// Any subset of the three gradients in one call, like PyTorch's
    /// `convolution_backward` with its output mask: each `Some` buffer of
    /// `grads` gets what [`Conv2d::backward_input`],
    /// [`Conv2d::backward_weight`] and [`Conv2d::backward_bias`] (with
    /// `options.accumulate`) give. `input` and `weight` are always checked,
    /// as is every buffer given, before anything is written: a length or
    /// algorithm error leaves every buffer as it was. (With
    /// [`Algorithm::Im2col`], a [`ConvError::OutOfMemory`] for a column
    /// matrix can still come after an earlier pass has written its buffer:
    /// each pass allocates its own.)
    ///
    /// The seed example, `[[1, 0, 1], [2, 1, 0], [0, 1, 1]]` correlated with
    /// `[[1, 0], [0, 1]]`, with `grad_output = [[1, 2], [3, 4]]`:
    ///
    /// ```
    /// use cpuconv::{BackwardOptions, Conv2dParams, Grads};
    /// let conv = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).build()?;
    /// let input = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];
    /// let weight = [1.0, 0.0, 0.0, 1.0];
    /// let grad_output = [1.0, 2.0, 3.0, 4.0];
    /// let (mut dx, mut dw, mut db) = ([0.0; 9], [0.0; 4], [0.0; 1]);
    /// let grads = Grads {
    ///     input: Some(&mut dx),
    ///     weight: Some(&mut dw),
    ///     bias: Some(&mut db),
    /// };
    /// conv.backward(&input, &weight, &grad_output, grads, &BackwardOptions::default())?;
    /// assert_eq!(dx, [1.0, 2.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0]);
    /// assert_eq!(dw, [11.0, 5.0, 8.0, 8.0]);
    /// assert_eq!(db, [10.0]);
    ///
    /// // Only the weight gradient, added to what the buffer holds.
    /// let grads = Grads { weight: Some(&mut dw), ..Grads::default() };
    /// let accumulate = BackwardOptions::default().accumulate(true);
    /// conv.backward(&input, &weight, &grad_output, grads, &accumulate)?;
    /// assert_eq!(dw, [22.0, 10.0, 16.0, 16.0]);
    /// # Ok::<(), cpuconv::ConvError>(())
    /// ```
    pub fn backward(
        &self,
        input: &[f32],
        weight: &[f32],
        grad_output: &[f32],
        grads: Grads<'_>,
        options: &BackwardOptions,
    ) -> Result<(), ConvError> {
        let Grads {
            input: grad_input,
            weight: grad_weight,
            bias: grad_bias,
        } = grads;
        // An absent gradient is not checked: it stands in with the length
        // its pass would need.
        let g = self.geometry();
        let len = |buffer: &Option<&mut [f32]>, needed: usize| {
            buffer.as_ref().map_or(needed, |b| b.len())
        };
        check_lengths(&[
            ("input", g.input_len(), input.len()),
            ("weight", g.weight_len(), weight.len()),
            ("grad_output", g.output_len(), grad_output.len()),
            ("grad_input", g.input_len(), len(&grad_input, g.input_len())),
            (
                "grad_weight",
                g.weight_len(),
                len(&grad_weight, g.weight_len()),
            ),
            ("grad_bias", g.out_channels, len(&grad_bias, g.out_channels)),
        ])?;
        // Every algorithm computes the input gradient; the weight gradient's
        // is checked before anything is written.
        if grad_weight.is_some() {
            options.check_weight_algorithm("backward")?;
        }
        if let Some(grad_input) = grad_input {
            self.backward_input(weight, grad_output, grad_input, options)?;
        }
        if let Some(grad_weight) = grad_weight {
            self.backward_weight(input, grad_output, grad_weight, options)?;
        }
        if let Some(grad_bias) = grad_bias {
            direct::conv2d_backward_bias_direct(g, grad_output, grad_bias, options.accumulate);
        }
        Ok(())
    }
}
