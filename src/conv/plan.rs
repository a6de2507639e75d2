//! Plans: a convolution prepared once for one weight tensor (and bias), with
//! the weights pre-packed into the A-panel layout of the selected GEMM
//! micro-kernel, or gathered into the order the SIMD direct kernels read
//! them, so every `forward` goes straight to the loops.

use super::direct_simd;
use super::gemm_lowering::{forward_gemm, packed_group_len, ConvScratch, Lowering, Weights};
use super::measure::{ChoiceSource, PlanChoice, PlanEffort};
use super::{check_lengths, try_with_capacity, Algorithm, Conv2d, ForwardOptions};
use crate::error::ConvError;
use crate::gemm::engine::{
    pack_bounds, select_kernel, KernelInfo, PackBounds, PackBuffers, PackedA,
};
use crate::gemm::{GemmBackend, Isa};

/// A convolution bound to its weights and options. `forward` takes `&self`;
/// a plan is `Send + Sync`, so one plan can serve many threads at once.
///
/// ```
/// use cpuconv::{Algorithm, Conv2dParams, ForwardOptions};
/// let conv = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).build()?;
/// let plan = conv.plan(&[1.0, 0.0, 0.0, 1.0], Some(&[0.5]), &ForwardOptions::new(Algorithm::Auto))?;
/// let mut out = [0.0; 4];
/// plan.forward(&[1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0], &mut out)?;
/// assert_eq!(out, [2.5, 0.5, 3.5, 2.5]);
/// # Ok::<(), cpuconv::ConvError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Conv2dPlan {
    conv: Conv2d,
    options: ForwardOptions,
    weights: PlanWeights,
    bias: Option<Vec<f32>>,
    kernel: KernelInfo,
    scratch: ScratchFloats,
    choice: PlanChoice,
}

/// Caller-owned scratch memory for [`Conv2dPlan::forward_in`]: the GEMM's
/// packing panels (and, for `Im2col`, one column matrix), sized by the plan
/// that made it. One workspace serves one thread at a time.
pub struct Workspace {
    scratch: ConvScratch,
}

impl Workspace {
    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.scratch.pack.bytes() + self.scratch.col.capacity() * std::mem::size_of::<f32>()
    }
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("bytes", &self.bytes())
            .finish()
    }
}

#[derive(Clone, Debug)]
enum PlanWeights {
    /// The caller's layout, for algorithms that read weights directly.
    Raw(Vec<f32>),
    /// Packed per group for a kernel with `mr` rows.
    Packed { data: Vec<f32>, mr: usize },
    /// Gathered for the SIMD direct kernels, with their column plan.
    DirectSimd(Box<direct_simd::Prepared>),
    /// Packed per channel block for the dense tile.
    DirectDense(Box<direct_simd::DensePrepared>),
}

impl Conv2d {
    /// Prepares this convolution for `weight` (and `bias`): resolves
    /// `Algorithm::Auto`, fixes the ISA, pre-packs the weights for the
    /// GEMM-based algorithms on the native backend, and gathers them for
    /// `DirectSimd` (which then allocates nothing per call beyond, with
    /// channels in lanes, each thread's workspace on its first call).
    ///
    /// With [`ForwardOptions::effort`] at [`PlanEffort::Measure`] the
    /// algorithm, thread split and (where the caller does not force one)
    /// kernel path are chosen by timing the candidates on this shape (about
    /// 100 ms at most) or taken from the
    /// [wisdom](crate::wisdom); [`Conv2dPlan::choice`] says what was chosen
    /// and how.
    pub fn plan(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
    ) -> Result<Conv2dPlan, ConvError> {
        match options.effort {
            PlanEffort::Estimate => self.plan_as(weight, bias, options, ChoiceSource::Estimate),
            PlanEffort::Measure | PlanEffort::WisdomOnly => {
                super::measure::plan(self, weight, bias, options)
            }
        }
    }

    /// The plan of `options` as they stand (`Auto` resolved by the model),
    /// its choice reported as coming from `source`.
    pub(crate) fn plan_as(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
        source: ChoiceSource,
    ) -> Result<Conv2dPlan, ConvError> {
        let g = self.geometry();
        check_lengths(&[
            ("weight", g.weight_len(), weight.len()),
            (
                "bias",
                g.out_channels,
                bias.map_or(g.out_channels, <[f32]>::len),
            ),
        ])?;
        options.activation.validate()?;
        let isa = options.resolved_isa();
        let algorithm = self.resolve_algorithm(
            options.algorithm,
            isa,
            weight,
            options.parallelism.max_threads(),
        );
        let gemm_based = matches!(algorithm, Algorithm::Im2col | Algorithm::Implicit);
        // Weights are packed for the kernels, except where the GEMM reads
        // them in place to finish the plane's last columns as dot products
        // (a strided B: the column matrix, or the input planes of a
        // pointwise layer), which packed weights would forgo. The check uses
        // the model's blocking, so a forced blocking (tests) keeps packing.
        let b_strided = algorithm == Algorithm::Im2col || g.is_pointwise_identity();
        let prepack = gemm_based
            && options.backend == GemmBackend::Native
            && !(b_strided
                && options.blocking.is_none()
                && crate::gemm::engine::peels_with_a_in_place(
                    isa,
                    g.out_channels_per_group(),
                    g.gemm_k(),
                    g.out_plane(),
                ));
        // The kernel every forward will select for these weights (the
        // workspace is sized for its blocking).
        let kernel = select_kernel(
            Some(isa),
            g.out_channels_per_group(),
            g.out_plane(),
            prepack,
            options.blocking,
        );
        let simd = match algorithm {
            Algorithm::DirectSimd => {
                direct_simd::Prepared::new(g, weight, options.activation, isa)?
            }
            _ => None,
        };
        let dense = match algorithm {
            Algorithm::DirectDense => direct_simd::DensePrepared::new(
                g,
                weight,
                options.activation,
                isa,
                options.parallelism.max_threads(),
            )?,
            _ => None,
        };
        let direct_scratch = match (&simd, &dense) {
            (Some(simd), _) => simd.scratch_len(),
            (_, Some(dense)) => dense.scratch_len(1),
            _ => 0,
        };
        let weights = if prepack {
            PlanWeights::Packed {
                data: pack_weights(self, weight, kernel.mr)?,
                mr: kernel.mr,
            }
        } else if let Some(prepared) = simd {
            PlanWeights::DirectSimd(Box::new(prepared))
        } else if let Some(prepared) = dense {
            PlanWeights::DirectDense(Box::new(prepared))
        } else {
            // Direct, the other backends, and a DirectSimd geometry whose
            // padding is too large for the SIMD kernels (it runs the
            // reference loops).
            PlanWeights::Raw(copy_of("plan weights", weight)?)
        };
        let bias = bias.map(|b| copy_of("plan bias", b)).transpose()?;
        let prepacked = matches!(weights, PlanWeights::Packed { .. });
        let scratch = ScratchFloats::new(g, algorithm, &kernel, prepacked, direct_scratch)?;
        let choice = PlanChoice {
            algorithm,
            threads: options.parallelism.max_threads(),
            isa,
            source,
        };
        Ok(Conv2dPlan {
            conv: *self,
            options: ForwardOptions {
                algorithm,
                isa: Some(isa),
                ..*options
            },
            weights,
            bias,
            kernel,
            scratch,
            choice,
        })
    }
}

/// `src` copied into memory asked for fallibly.
fn copy_of(what: &'static str, src: &[f32]) -> Result<Vec<f32>, ConvError> {
    let mut v = try_with_capacity(what, src.len())?;
    v.extend_from_slice(src);
    Ok(v)
}

/// Floats of scratch one thread needs per call of a plan: the GEMM's
/// packing buffers (A, B, staging rows; bounded by the blocking) and, for
/// `Im2col`, one column matrix. Computed once, checked, when the plan is
/// made, so that the byte count a caller asks for cannot wrap.
#[derive(Clone, Copy, Debug)]
struct ScratchFloats {
    a: usize,
    b: usize,
    staging: usize,
    col: usize,
    /// Their total in bytes.
    bytes: usize,
}

impl ScratchFloats {
    fn new(
        g: &crate::geometry::ConvGeometry,
        algorithm: Algorithm,
        kernel: &KernelInfo,
        prepacked: bool,
        direct: usize,
    ) -> Result<ScratchFloats, ConvError> {
        let PackBounds { a, b, staging } = pack_bounds::<f32>(
            g.out_channels_per_group(),
            g.gemm_k(),
            g.out_plane(),
            kernel,
            prepacked,
        );
        let (a, b, staging, col) = match algorithm {
            Algorithm::Implicit => (a, b, staging, 0),
            // The geometry checked that the column matrix's float count fits.
            Algorithm::Im2col => (a, b, 0, g.gemm_k() * g.out_plane()),
            // The padded image and one row buffer (DirectDense), or a
            // block's transposed planes (DirectSimd with channels in lanes),
            // in the column buffer.
            Algorithm::DirectDense | Algorithm::DirectSimd => (0, 0, 0, direct),
            _ => (0, 0, 0, 0),
        };
        let overflow = ConvError::Overflow {
            what: "workspace size",
        };
        // What `workspace()` allocates: the packing buffers with their
        // alignment slack (bounded by the blocking), plus the column matrix.
        let packing = PackBuffers::<f32>::bytes_for(PackBounds { a, b, staging });
        let bytes = col
            .checked_mul(std::mem::size_of::<f32>())
            .and_then(|col| col.checked_add(packing))
            .ok_or(overflow)?;
        Ok(ScratchFloats {
            a,
            b,
            staging,
            col,
            bytes,
        })
    }
}

/// Packs every group's `K/g × C/g·R·S` weight block into A panels of `mr` rows.
fn pack_weights(conv: &Conv2d, weight: &[f32], mr: usize) -> Result<Vec<f32>, ConvError> {
    let g = conv.geometry();
    let (kg, kk) = (g.out_channels_per_group(), g.gemm_k());
    let per_group = packed_group_len(g, mr);
    let total = per_group.checked_mul(g.groups).ok_or(ConvError::Overflow {
        what: "packed weight size",
    })?;
    let mut data = try_with_capacity("packed weights", total)?;
    data.resize(total, 0.0);
    for (grp, dst) in data.chunks_exact_mut(per_group).enumerate() {
        PackedA::pack(&weight[grp * kg * kk..][..kg * kk], kg, kk, mr, dst);
    }
    Ok(data)
}

impl Conv2dPlan {
    /// The convolution this plan computes.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// The algorithm the plan runs (`Auto` resolved).
    pub fn algorithm(&self) -> Algorithm {
        self.options.algorithm
    }

    /// What the plan runs and how that was chosen: the algorithm, the
    /// most threads a call may use, the kernel path, and whether the model,
    /// a measurement or the wisdom chose them (see [`PlanEffort`]).
    ///
    /// ```
    /// use cpuconv::{Algorithm, ChoiceSource, Conv2dParams, ForwardOptions, Parallelism};
    /// let conv = Conv2dParams::new(1, 32, (8, 8), 32, (1, 1)).build()?;
    /// let weight = vec![0.5f32; 32 * 32];
    /// let options = ForwardOptions::new(Algorithm::Auto).parallelism(Parallelism::Sequential);
    /// let choice = conv.plan(&weight, None, &options)?.choice();
    /// assert_eq!(choice.algorithm, conv.auto_algorithm());
    /// assert_eq!((choice.threads, choice.source), (1, ChoiceSource::Estimate));
    /// assert_eq!(choice.isa, cpuconv::isa());
    /// # Ok::<(), cpuconv::ConvError>(())
    /// ```
    pub fn choice(&self) -> PlanChoice {
        self.choice
    }

    pub(crate) fn set_source(&mut self, source: ChoiceSource) {
        self.choice.source = source;
    }

    /// Whether the plan runs the reference loops: `Direct`, or a SIMD
    /// direct algorithm on a geometry its kernels cannot take.
    pub(crate) fn runs_reference(&self) -> bool {
        self.options.algorithm == Algorithm::Direct
            || (matches!(self.weights, PlanWeights::Raw(_))
                && matches!(
                    self.options.algorithm,
                    Algorithm::DirectSimd | Algorithm::DirectDense
                ))
    }

    /// Tests only: whether the plan holds its weights packed for the GEMM's
    /// kernels (rather than as given, read in place).
    #[doc(hidden)]
    pub fn weights_prepacked(&self) -> bool {
        matches!(self.weights, PlanWeights::Packed { .. })
    }

    /// The kernel path the plan was packed for.
    pub fn isa(&self) -> Isa {
        self.kernel.isa
    }

    /// Bytes of scratch memory one thread uses per call, beyond the output:
    /// for `Implicit` only the packing panels (bounded by the blocking:
    /// `KC·NC` floats of B plus `MC·KC` of A, independent of image size and
    /// batch); for `Im2col` also the column matrix of one image and group;
    /// for the direct algorithms what their kernels stage (`DirectDense` a
    /// padded image band, `DirectSimd` with channels in lanes a block's two
    /// transposed planes; otherwise none: it reads the weights the plan
    /// gathered and keeps its partial sums in registers). With
    /// [`Conv2dPlan::forward`] the panels are kept per thread and reused, so
    /// repeated calls allocate nothing; [`Conv2dPlan::forward_in`] uses a
    /// caller-owned [`Workspace`] of this size instead. (A plan whose
    /// workspace would not fit in `usize` bytes is refused when it is made.)
    pub fn workspace_bytes_per_thread(&self) -> usize {
        self.scratch.bytes
    }

    /// A workspace for [`Conv2dPlan::forward_in`], allocated here, once, at
    /// the size [`Conv2dPlan::workspace_bytes_per_thread`] states.
    ///
    /// # Errors
    /// [`ConvError::OutOfMemory`] when the memory cannot be had (an
    /// `Im2col` column matrix grows with the kernel and the output plane).
    pub fn workspace(&self) -> Result<Workspace, ConvError> {
        let ScratchFloats {
            a, b, staging, col, ..
        } = self.scratch;
        let mut scratch = ConvScratch {
            col: try_with_capacity("im2col column matrix", col)?,
            ..ConvScratch::default()
        };
        scratch.pack.reserve(PackBounds { a, b, staging });
        Ok(Workspace { scratch })
    }

    /// As [`Conv2dPlan::forward`], on the calling thread only, packing into
    /// the caller's `workspace` instead of per-thread buffers: for callers
    /// that manage their own threads and memory. Nothing is allocated when
    /// the workspace came from [`Conv2dPlan::workspace`] of this plan.
    pub fn forward_in(
        &self,
        input: &[f32],
        output: &mut [f32],
        workspace: &mut Workspace,
    ) -> Result<(), ConvError> {
        self.run(input, output, Some(&mut workspace.scratch))
    }

    /// `output = act(conv(input, weight) + bias)` with the planned weights.
    pub fn forward(&self, input: &[f32], output: &mut [f32]) -> Result<(), ConvError> {
        self.run(input, output, None)
    }

    fn run(
        &self,
        input: &[f32],
        output: &mut [f32],
        scratch: Option<&mut ConvScratch>,
    ) -> Result<(), ConvError> {
        let g = self.conv.geometry();
        check_lengths(&[
            ("input", g.input_len(), input.len()),
            ("output", g.output_len(), output.len()),
        ])?;
        let bias = self.bias.as_deref();
        match (&self.weights, self.options.algorithm) {
            (PlanWeights::Packed { data, mr }, algo) => {
                let lowering = if algo == Algorithm::Im2col {
                    Lowering::Explicit
                } else {
                    Lowering::Implicit
                };
                let weights = Weights::Packed { data, mr: *mr };
                forward_gemm(
                    g,
                    input,
                    weights,
                    bias,
                    output,
                    &self.options,
                    lowering,
                    scratch,
                )
            }
            (PlanWeights::DirectSimd(prepared), _) => {
                // A workspace means the caller's thread only.
                let par = match scratch {
                    Some(_) => crate::gemm::Parallelism::Sequential,
                    None => self.options.parallelism,
                };
                match scratch {
                    Some(scratch) => prepared.run_in(input, bias, output, &mut scratch.col),
                    None => prepared.run(input, bias, output, par),
                }
                Ok(())
            }
            (PlanWeights::DirectDense(prepared), _) => {
                // A workspace means the caller's thread only, and its memory.
                let par = self.options.parallelism;
                prepared.run(input, bias, output, par, scratch.map(|s| &mut s.col))
            }
            (PlanWeights::Raw(w), _) => {
                let options = if scratch.is_some() {
                    // A workspace means the caller's thread only.
                    ForwardOptions {
                        parallelism: crate::gemm::Parallelism::Sequential,
                        ..self.options
                    }
                } else {
                    self.options
                };
                self.conv.forward_with(input, w, bias, output, &options)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn plan_is_send_and_sync() {
        assert_send_sync::<super::Conv2dPlan>();
    }
}
