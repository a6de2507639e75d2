//! The backward passes of a convolution: gradients with respect to the
//! input, the weight and the bias, with PyTorch's `convolution_backward`
//! semantics for every parameter the forward accepts.
//!
//! The input and weight gradients run either the [`Algorithm::Direct`]
//! reference (nested loops over the definition, in `direct.rs`) or
//! [`Algorithm::Im2col`], the textbook GEMM lowering (`backward_gemm.rs`);
//! grad input also runs as the sub-pixel phases of a transposed convolution
//! (`phases.rs`) on the forward's implicit GEMM or SIMD direct kernels, grad
//! weight as a GEMM without a column matrix (`grad_weight.rs`) or a SIMD
//! direct pass (`direct_simd/backward.rs`); the bias gradient is a plain
//! sum. [`BackwardOptions::algorithm`] says which runs.

use super::phases::{self, TransposedGeometry};
use super::transposed_gemm;
use super::{backward_gemm, direct, direct_simd, grad_weight};
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
    /// Which algorithm computes the input and weight gradients. Every
    /// algorithm computes both:
    ///
    /// * [`Algorithm::Direct`]: the reference loops over the definition;
    /// * [`Algorithm::Im2col`]: the textbook GEMM lowering per image and
    ///   group, with a column matrix (`backward_gemm.rs`);
    /// * [`Algorithm::Implicit`]: grad input as the sub-pixel phases on the
    ///   implicit GEMM (`phases.rs`), grad weight as a GEMM over the batch's
    ///   pixels that reads the input through im2col rows, never building a
    ///   column matrix (`grad_weight.rs`);
    /// * [`Algorithm::DirectSimd`]: grad input as the sub-pixel phases on
    ///   the SIMD direct kernels, grad weight as a SIMD direct pass (for
    ///   depthwise and small groups; correct, not fast, for others);
    /// * [`Algorithm::DirectDense`]: grad input as the sub-pixel phases on
    ///   the dense tile (vectors across channels); the weight gradient is
    ///   refused with [`ConvError::UnsupportedAlgorithm`];
    /// * [`Algorithm::Auto`] (the default): per pass and shape, see
    ///   [`Conv2d::auto_input_gradient_algorithm`] and
    ///   [`Conv2d::auto_weight_gradient_algorithm`].
    ///
    /// The weight gradient is bitwise identical from run to run and for any
    /// thread count with `Implicit` and `DirectSimd` (threads own blocks of
    /// it and never split the sum over the batch).
    pub algorithm: Algorithm,
    /// `false` (the default): the weight and bias gradients replace what
    /// their buffers hold. `true`: they are added to it (`grad += dW`), as
    /// frameworks accumulate over micro-batches. The input gradient is
    /// always overwritten.
    pub accumulate: bool,
    /// Threads: [`Algorithm::Im2col`]'s grad input gives each thread a
    /// share of a group's output channels where there are enough, else,
    /// where the group has enough work, a share of its input rows (outputs
    /// where two threads' rows meet then sum in an order that depends on
    /// the thread count); otherwise, and in its weight gradient, each GEMM
    /// threads itself. [`Algorithm::Implicit`] shares blocks of the weight
    /// gradient out, `DirectSimd` the output channels; the `Direct`
    /// reference runs on the calling thread.
    pub parallelism: Parallelism,
    /// Force a kernel path (clamped to the CPU) for the GEMMs of
    /// [`Algorithm::Im2col`] and the kernels of `DirectSimd`; `None` uses
    /// [`crate::isa()`]. The `Direct` reference uses no SIMD kernel.
    pub isa: Option<Isa>,
    /// GEMM engine for [`Algorithm::Im2col`] and [`Algorithm::Implicit`]
    /// (ignored by `Direct`).
    pub backend: GemmBackend,
    /// Tests only: cache blocking for the GEMM-based algorithms in place of
    /// the cache model's.
    #[doc(hidden)]
    pub blocking: Option<crate::testing::Blocking>,
    /// Tests only: the weight gradient takes the band path wherever the
    /// shape allows it, on every kernel tile (see `grad_weight_bands.rs`),
    /// so that its code is tested on every CPU.
    #[doc(hidden)]
    pub force_bands: bool,
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

    /// Sets the GEMM engine of [`Algorithm::Im2col`] and
    /// [`Algorithm::Implicit`].
    pub fn backend(mut self, backend: GemmBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Tests only: forces the GEMM's cache blocking.
    #[doc(hidden)]
    pub fn blocking(mut self, blocking: crate::testing::Blocking) -> Self {
        self.blocking = Some(blocking);
        self
    }

    /// Tests only: the band path wherever the shape allows it.
    #[doc(hidden)]
    pub fn force_bands(mut self, force: bool) -> Self {
        self.force_bands = force;
        self
    }

    /// The algorithm the input gradient of `conv` runs: `Direct`,
    /// `Im2col`, or one the sub-pixel phases run on (`Implicit`,
    /// `DirectSimd`, `Auto`); `Auto` resolved by
    /// [`Conv2d::auto_input_gradient_algorithm`].
    fn input_algorithm(&self, conv: &Conv2d) -> Algorithm {
        match self.algorithm {
            Algorithm::Auto => {
                let isa = self.phase_options(Algorithm::Auto).resolved_isa();
                conv.auto_input_gradient_algorithm_for(isa)
            }
            a => a,
        }
    }

    /// The algorithm the weight gradient of `conv` runs; `Auto` resolved by
    /// [`Conv2d::auto_weight_gradient_algorithm`].
    fn weight_algorithm(&self, conv: &Conv2d) -> Algorithm {
        match self.algorithm {
            Algorithm::Auto => conv.auto_weight_gradient_algorithm(),
            a => a,
        }
    }

    /// [`BackwardOptions::weight_algorithm`], or
    /// [`ConvError::UnsupportedAlgorithm`] for `DirectDense`, whose tile
    /// computes no weight gradient (vectors across output channels would
    /// need `grad_output` transposed per call; the implicit GEMM already runs
    /// these layers near the forward's speed).
    fn supported_weight_algorithm(&self, conv: &Conv2d) -> Result<Algorithm, ConvError> {
        match self.weight_algorithm(conv) {
            Algorithm::DirectDense => Err(ConvError::UnsupportedAlgorithm {
                pass: "grad_weight",
                algorithm: Algorithm::DirectDense.name(),
            }),
            a => Ok(a),
        }
    }

    /// The options of the GEMMs a pass runs, with `parallelism`.
    pub(crate) fn gemm_options(&self, parallelism: Parallelism) -> crate::GemmOptions {
        crate::GemmOptions {
            backend: self.backend,
            parallelism,
            isa: self.isa,
            blocking: self.blocking,
            wide_tile: None,
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
            effort: super::PlanEffort::Estimate,
            blocking: self.blocking,
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

/// Whether every phase of the input gradient `tg` runs on the dense tile
/// (the forward's `Auto` picks it for each phase's convolution) and the
/// tile repays packing the weights in the call
/// (`direct_simd::dense_repays_packing_per_call`): then the phases beat
/// GEMM + col2im even where a plane has fewer pixels than a group has
/// channels (the other reasons of `transposed_gemm::gemm_col2im_wins`, a
/// group of fewer than 16 output channels or disjoint taps, stand).
fn phases_run_dense(tg: &TransposedGeometry, isa: Isa) -> bool {
    if tg.out_per_group() < 16 || transposed_gemm::taps_disjoint(tg) {
        return false;
    }
    let Ok(phases) = phases::phases(tg) else {
        return false;
    };
    let l2 = crate::gemm::cache::cache_hierarchy().l2.per_core();
    phases.iter().filter_map(|p| p.conv.as_ref()).all(|conv| {
        let g = conv.geometry();
        let taps = g.channels_per_group() * g.kernel_h * g.kernel_w;
        conv.auto_algorithm_for(isa) == Algorithm::DirectDense
            && direct_simd::dense_repays_packing_per_call(taps, g.out_plane(), l2)
    })
}

impl Conv2d {
    /// The algorithm [`Algorithm::Auto`] runs for [`Conv2d::backward_input`]:
    /// [`Algorithm::Direct`] below 4 kFLOP; [`Algorithm::Im2col`] (GEMM +
    /// col2im) where it beats the sub-pixel phases (a group with fewer than
    /// 16 input channels, an output plane with fewer pixels than a group
    /// has output channels unless the phases run on the dense tile and it
    /// repays packing the weights in the call (see
    /// `direct_simd::dense_repays_packing_per_call`), or a kernel as large
    /// as its stride with no dilation or padding, whose taps never overlap;
    /// see `transposed_gemm.rs` for the measurements);
    /// otherwise the phases, each with its own `Auto` choice (`DirectSimd`
    /// for depthwise and small groups, `Implicit` otherwise), reported as
    /// `Auto`.
    pub fn auto_input_gradient_algorithm(&self) -> Algorithm {
        self.auto_input_gradient_algorithm_for(crate::isa())
    }

    /// [`Conv2d::auto_input_gradient_algorithm`] for the kernels of `isa`
    /// (clamped to the CPU): whether the phases run on the dense tile
    /// depends on the path's register tiles, as the forward's `Auto` does.
    pub(crate) fn auto_input_gradient_algorithm_for(&self, isa: Isa) -> Algorithm {
        let tg = TransposedGeometry::grad_input_of(self.geometry());
        if self.geometry().flops() < 4 * 1024 {
            Algorithm::Direct
        } else if transposed_gemm::gemm_col2im_wins(&tg) && !phases_run_dense(&tg, isa) {
            Algorithm::Im2col
        } else {
            Algorithm::Auto
        }
    }

    /// The algorithm [`Algorithm::Auto`] runs for
    /// [`Conv2d::backward_weight`]: [`Algorithm::Direct`] below 4 kFLOP,
    /// [`Algorithm::DirectSimd`] when a group has at most 16 input and 16
    /// output channels (the forward's rule, for the same reason: each
    /// group's GEMM would be too small for the micro-kernel's tile), and
    /// [`Algorithm::Implicit`] otherwise. Measured (Zen 5, AVX-512, 1
    /// thread, GFLOP/s, Implicit vs Im2col, then the forward plan):
    /// r50_conv1 178 vs 131 (208), r50_3x3 210 vs 144 (221), r50_1x1 247
    /// vs 138 (255), r50_3x3_s2 194 vs 164 (198), 512 → 512 channels on 7²
    /// 191 vs 175 (162), r50_last1x1 215 vs 216 (218), dilated 210 vs 142
    /// (216).
    pub fn auto_weight_gradient_algorithm(&self) -> Algorithm {
        let g = self.geometry();
        if g.flops() < 4 * 1024 {
            Algorithm::Direct
        } else if g.channels_per_group() <= 16 && g.out_channels_per_group() <= 16 {
            Algorithm::DirectSimd
        } else {
            Algorithm::Implicit
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
    /// column matrix (`C/g·R·S × OH·OW` floats) cannot be allocated, the
    /// sub-pixel phases when their gathered weights or, for a stride above
    /// 1, the scratch plane of one phase of one image (`C·⌈H/σ_h⌉·⌈W/σ_w⌉`
    /// floats) cannot be; either leaves `grad_input` as it was.
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
            Algorithm::Im2col => transposed_gemm::transposed_gemm_raw(
                &TransposedGeometry::grad_input_of(g),
                grad_output,
                weight,
                None,
                grad_input,
                &options.phase_options(Algorithm::Im2col),
            ),
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
    /// `grad_weight` as it was; [`Algorithm::Implicit`] builds no column
    /// matrix and fails so only when its per-thread blocks (bounded by the
    /// GEMM's blocking) cannot be. Implicit sums over the batch in a fixed
    /// order, bitwise identical from run to run and across thread counts.
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
        match options.supported_weight_algorithm(self)? {
            Algorithm::DirectSimd => {
                return direct_simd::backward_weight(
                    g,
                    input,
                    grad_output,
                    grad_weight,
                    options.accumulate,
                    options.isa.unwrap_or_else(crate::isa),
                    options.parallelism,
                )
            }
            Algorithm::Im2col => {
                return backward_gemm::backward_weight_im2col(
                    g,
                    input,
                    grad_output,
                    grad_weight,
                    options,
                )
            }
            Algorithm::Implicit => {
                return grad_weight::backward_weight_implicit(
                    g,
                    input,
                    grad_output,
                    grad_weight,
                    options,
                )
            }
            _ => {}
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
    /// as is every buffer given, before anything is written: a length error
    /// leaves every buffer as it was. (A [`ConvError::OutOfMemory`] for a
    /// pass's working memory can still come after an earlier pass has
    /// written its buffer: each pass allocates its own.)
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
        if grad_weight.is_some() {
            // Refused before any gradient is written.
            options.supported_weight_algorithm(self)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::isas_under_test;
    use crate::Conv2dParams;

    /// The input gradient's `Auto` asks the path a call runs, not the
    /// active one, whether its phases run on the dense tile: of 256 → 512
    /// 1×1 on 7² (a plane of fewer pixels than a group has channels, so
    /// GEMM + col2im unless the phases run dense), a path whose dense tile
    /// is no larger than its GEMM tile keeps the phase's 1×1 convolution on
    /// the implicit GEMM, and so runs GEMM + col2im.
    #[test]
    fn input_gradient_auto_follows_the_forced_isa() {
        let conv = Conv2dParams::new(1, 256, (7, 7), 512, (1, 1))
            .build()
            .unwrap();
        for isa in isas_under_test() {
            let got = conv.auto_input_gradient_algorithm_for(isa);
            if !direct_simd::dense_outgrows_gemm_tile(isa) {
                assert_eq!(got, Algorithm::Im2col, "{isa}");
            }
            let options = BackwardOptions::new(Algorithm::Auto).isa(Some(isa));
            assert_eq!(options.input_algorithm(&conv), got, "{isa}");
        }
        assert_eq!(
            conv.auto_input_gradient_algorithm(),
            conv.auto_input_gradient_algorithm_for(crate::isa())
        );
    }
}
