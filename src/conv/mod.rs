//! The convolution operator: a validated [`Conv2d`] descriptor and the
//! algorithms that compute it.

pub mod backward;
pub(crate) mod backward_gemm;
pub(crate) mod direct;
pub(crate) mod direct_simd;
pub(crate) mod gemm_lowering;
pub(crate) mod grad_weight;
pub(crate) mod grad_weight_bands;
pub(crate) mod im2col;
pub(crate) mod implicit;
pub mod measure;
pub(crate) mod phases;
pub mod plan;
pub(crate) mod scratch;
pub mod transpose;
pub(crate) mod transposed_gemm;
pub mod wisdom;

pub use backward::{BackwardOptions, Grads};
pub use measure::{ChoiceSource, PlanChoice, PlanEffort};
pub use plan::{Conv2dPlan, Workspace};
pub use transpose::{
    ConvTranspose2d, ConvTranspose2dParams, ConvTranspose2dPlan, TransposePadding,
};

use crate::error::ConvError;
use crate::gemm::{Activation, GemmBackend, Isa, Parallelism};
use crate::geometry::{ConvGeometry, Padding};

/// An empty `Vec` with room for `len` values, asked for fallibly: for the
/// memory a call or a plan allocates for its own use, whose size follows the
/// convolution's shape rather than any buffer the caller handed in.
pub(crate) fn try_with_capacity<T>(what: &'static str, len: usize) -> Result<Vec<T>, ConvError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| ConvError::OutOfMemory {
            what,
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })?;
    Ok(v)
}

/// Whether [`Algorithm::DirectDense`] beats the implicit GEMM on `g` (see
/// [`Conv2d::auto_algorithm`]).
fn dense_wins(g: &ConvGeometry, isa: Isa) -> bool {
    let window = g.kernel_h.saturating_mul(g.kernel_w);
    let taps = g.channels_per_group().saturating_mul(window);
    let strided = g.stride_h > 1 || g.stride_w > 1;
    if window > 1 {
        taps >= 32 || strided
    } else {
        // The GEMM packs no B rows for a 1×1 layer either: the dense tile
        // wins there only with the larger register tile.
        if !direct_simd::dense_outgrows_gemm_tile(isa) {
            return false;
        }
        let l2 = crate::gemm::cache::cache_hierarchy().l2.per_core();
        strided
            || (taps >= 1024 && g.out_plane() >= 64)
            || (taps >= 128 && g.out_w < 16 && direct_simd::dense_flattens(g, l2))
    }
}

/// Whether every value is finite (no infinity, no NaN).
pub(crate) fn all_finite(x: &[f32]) -> bool {
    // `v · 0` is ±0 for a finite value and NaN for an infinity or a NaN, and
    // a NaN survives every later add: sixteen lanes of float adds, which
    // every x86-64 (SSE2) and aarch64 core runs as vector instructions. An
    // integer maximum of the bits (`pmaxud`, SSE4.1) compiled to scalar code
    // at the crate's baseline target: 2.2 instructions a float (callgrind),
    // the larger part of building the weight gradient's bands. Measured on
    // 600 K floats (Zen 5, 1 thread): 26–29 µs, subnormal values as fast
    // as normal ones; a compare-and-or on the bits (SSE2's pcmpgtd) 87 µs.
    let mut lanes = [0.0f32; 16];
    let mut blocks = x.chunks_exact(16);
    for block in &mut blocks {
        for (lane, v) in lanes.iter_mut().zip(block) {
            *lane += *v * 0.0;
        }
    }
    let rest = blocks.remainder().iter().map(|v| *v * 0.0);
    lanes.into_iter().chain(rest).all(|d| d == 0.0)
}

/// [`all_finite`] with the floats split over up to `threads` threads, for
/// large weights checked inside a call that runs on that many: the check
/// reads every float once, from memory where the weights are not cached
/// (2.4 MB of r50_deep's weights: 90–100 µs on an Intel Xeon, 5–9% of its
/// input gradient at 1 and 2 threads).
pub(crate) fn all_finite_on(x: &[f32], threads: usize) -> bool {
    use rayon::prelude::*;
    let part = x.len().div_ceil(threads.max(1)).max(FINITE_PART_MIN);
    if part >= x.len() {
        return all_finite(x);
    }
    x.par_chunks(part).with_max_len(1).all(all_finite)
}

/// The fewest floats one thread of [`all_finite_on`] checks: 64 K floats
/// take a few microseconds, as long as waking a thread.
const FINITE_PART_MIN: usize = 1 << 16;

/// `len` zeros in memory asked for fallibly (see [`try_with_capacity`]).
pub(crate) fn zeroed(what: &'static str, len: usize) -> Result<Vec<f32>, ConvError> {
    let mut v = try_with_capacity(what, len)?;
    v.resize(len, 0.0);
    Ok(v)
}

/// `Ok` when every `(buffer, expected, actual)` length matches, else the
/// first mismatch as [`ConvError::BufferLength`].
pub(crate) fn check_lengths(checks: &[(&'static str, usize, usize)]) -> Result<(), ConvError> {
    match checks
        .iter()
        .find(|(_, expected, actual)| expected != actual)
    {
        Some(&(buffer, expected, actual)) => Err(ConvError::BufferLength {
            buffer,
            expected,
            actual,
        }),
        None => Ok(()),
    }
}

/// How a convolution is computed. Every algorithm gives the same values up to
/// floating-point rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// Nested loops over the definition: the reference, slow on big layers.
    Direct,
    /// Direct convolution vectorised along the output width, per ISA: the
    /// fast path for depthwise and small-group convolutions, where lowering
    /// onto a GEMM leaves each group a GEMM too small to pay for its packing.
    DirectSimd,
    /// Explicit im2col matrix `[C/g·R·S, OH·OW]` per image and group, then
    /// GEMM: the textbook lowering, kept for comparison.
    Im2col,
    /// Implicit GEMM: B is packed straight from the input through an im2col
    /// view, so no column matrix is ever built; an unpadded stride-1 1×1
    /// convolution multiplies the input planes directly.
    Implicit,
    /// Direct convolution vectorised across output channels (MLAS's NCHWc
    /// kernel idea on the caller's NCHW tensors): a register tile of up to
    /// 64 output channels × a few pixels of one output row, weights packed
    /// once, input pixels broadcast from a zero-padded copy; no B panel is
    /// ever written. The fast path for dense layers with many channels.
    DirectDense,
    /// Picks per shape; see [`Conv2d::auto_algorithm`].
    #[default]
    Auto,
}

impl Algorithm {
    /// Every concrete algorithm (not `Auto`).
    pub const CONCRETE: [Algorithm; 5] = [
        Algorithm::Direct,
        Algorithm::DirectSimd,
        Algorithm::Im2col,
        Algorithm::Implicit,
        Algorithm::DirectDense,
    ];

    /// Lower-case name, as the tool prints it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Direct => "direct",
            Algorithm::DirectSimd => "direct-simd",
            Algorithm::Im2col => "im2col",
            Algorithm::Implicit => "implicit",
            Algorithm::DirectDense => "direct-dense",
            Algorithm::Auto => "auto",
        }
    }

    /// Parses [`Algorithm::name`].
    pub fn from_name(s: &str) -> Option<Algorithm> {
        Algorithm::CONCRETE
            .into_iter()
            .chain([Algorithm::Auto])
            .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// Everything about a `forward` call beyond the tensors. Built with
/// [`ForwardOptions::new`] (or `default()`) and the chained setters, so that
/// later versions can add options without breaking callers.
///
/// ```
/// use cpuconv::{Activation, Algorithm, ForwardOptions, Isa, Parallelism};
/// let options = ForwardOptions::new(Algorithm::Implicit)
///     .parallelism(Parallelism::threads(1))
///     .activation(Activation::Relu)
///     .isa(Isa::Portable);
/// assert_eq!(options.isa, Some(Isa::Portable));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ForwardOptions {
    /// Which algorithm computes it.
    pub algorithm: Algorithm,
    /// Threads.
    pub parallelism: Parallelism,
    /// GEMM engine for the GEMM-based algorithms.
    pub backend: GemmBackend,
    /// Applied to every output after the bias.
    pub activation: Activation,
    /// Force a kernel path (clamped to the CPU); `None` uses [`crate::isa()`].
    pub isa: Option<Isa>,
    /// How hard [`Conv2d::plan`] works to choose the algorithm and threads
    /// (only plans read it).
    pub effort: PlanEffort,
    /// Tests only: cache blocking for the GEMM-based algorithms in place of
    /// the cache model's.
    #[doc(hidden)]
    pub blocking: Option<crate::testing::Blocking>,
}

impl ForwardOptions {
    /// Defaults with the given algorithm.
    pub fn new(algorithm: Algorithm) -> Self {
        ForwardOptions {
            algorithm,
            ..Default::default()
        }
    }

    /// Sets the algorithm.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Sets how many threads the call may use.
    pub fn parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Sets the GEMM engine of the GEMM-based algorithms.
    pub fn backend(mut self, backend: GemmBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets the activation applied after the bias.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Forces a kernel path (clamped to what the CPU supports).
    pub fn isa(mut self, isa: impl Into<Option<Isa>>) -> Self {
        self.isa = isa.into();
        self
    }

    /// Sets how [`Conv2d::plan`] chooses: by the model (the default), by
    /// measurement, or from the wisdom only. See [`PlanEffort`].
    pub fn effort(mut self, effort: PlanEffort) -> Self {
        self.effort = effort;
        self
    }

    /// Tests only: forces the GEMM's cache blocking.
    #[doc(hidden)]
    pub fn blocking(mut self, blocking: crate::testing::Blocking) -> Self {
        self.blocking = Some(blocking);
        self
    }

    /// The kernel path these options run on: the one they name, or the
    /// active one, clamped to what the CPU supports.
    pub(crate) fn resolved_isa(&self) -> crate::arch::Isa {
        crate::arch::clamp_isa(self.isa.unwrap_or_else(crate::isa))
    }

    /// The options of the GEMMs a convolution lowers to, with `parallelism`.
    pub(crate) fn gemm_options(&self, parallelism: Parallelism) -> crate::GemmOptions {
        crate::GemmOptions {
            backend: self.backend,
            parallelism,
            isa: self.isa,
            blocking: self.blocking,
            wide_tile: None,
        }
    }
}

/// A validated 2-D convolution, built by [`crate::Conv2dParams::build`].
///
/// Tensors are contiguous `f32`: input `[N, C, H, W]`, weight
/// `[K, C/groups, R, S]`, bias `[K]`, output `[N, K, OH, OW]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2d {
    geom: ConvGeometry,
}

impl Conv2d {
    pub(crate) fn from_geometry(geom: ConvGeometry) -> Self {
        Conv2d { geom }
    }

    /// Every size of the convolution, validated.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geom
    }

    /// `[N, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        let g = &self.geom;
        [g.batch, g.in_channels, g.in_h, g.in_w]
    }

    /// `[K, C/groups, R, S]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        let g = &self.geom;
        [
            g.out_channels,
            g.channels_per_group(),
            g.kernel_h,
            g.kernel_w,
        ]
    }

    /// `[N, K, OH, OW]`, with `OH = ⌊(H + top + bottom − d·(R−1) − 1) / s⌋ + 1`.
    pub fn output_shape(&self) -> [usize; 4] {
        let g = &self.geom;
        [g.batch, g.out_channels, g.out_h, g.out_w]
    }

    /// The padding in use, with any `same`/`auto_pad` rule resolved.
    pub fn padding(&self) -> Padding {
        self.geom.padding
    }

    /// `2·N·K·OH·OW·(C/groups)·R·S`.
    pub fn flops(&self) -> u64 {
        self.geom.flops()
    }

    /// The algorithm [`Algorithm::Auto`] runs for this shape:
    ///
    /// * [`Algorithm::Direct`] below 4 kFLOP (the seed example is 32 FLOP),
    ///   where any setup costs more than the arithmetic;
    /// * [`Algorithm::DirectSimd`] when a group has at most 16 input and at
    ///   most 16 output channels (depthwise, ResNeXt-style groups, tiny
    ///   layers): the GEMM per group would have M and K too small to use the
    ///   micro-kernel's tile or amortise the packing. Measured on Zen 5
    ///   (AVX-512, 1 thread, GFLOP/s, SIMD direct vs implicit GEMM):
    ///   depthwise 3×3 82 vs 7, 4 channels per group 126 vs 24, 8: 133 vs
    ///   48, 16: 141 vs 81, 32: 145 vs 123, 64: even;
    /// * [`Algorithm::DirectDense`] for a kernel larger than 1×1 with at
    ///   least 32 taps per output channel (`C/g·R·S`) or a stride above 1,
    ///   and, where the dense tile holds more outputs in registers than
    ///   the GEMM's micro-tile (AVX-512; see
    ///   `direct_simd::dense::outgrows_gemm_tile`), for a 1×1 kernel at a
    ///   stride above 1, with at least 1024 taps
    ///   on a plane of at least 64 outputs, or with at least 128 taps on
    ///   rows narrower than 16 pixels whose planes the dense tile runs as
    ///   one row (7² and 14²; see `direct_simd::dense::flattens`). As one
    ///   row (plans, Zen 5 AVX-512, 1 thread, GFLOP/s, three runs, dense vs
    ///   implicit): 512 → 2048 on 7² 237–244 vs 220–222, 2048 → 512 on 7²
    ///   216–220 vs 211, 160 → 960 on 7² 225–229 vs 212–222, 512 → 64 on
    ///   7² 240–250 vs 204–210, 256 → 256 on 14² 235–244 vs 224–233, 128 →
    ///   512 on 14² 225–234 vs 219–225; 64 → 256 on 14² 213–215 vs 213–217
    ///   (64 taps) and 128 → 512 on 28² 218–231 vs 224–241 stay implicit.
    ///   At 2 threads, 512 → 2048 on 7²: 470–485 vs 421–435. Measured
    ///   on Zen 5 (plans, 1 thread, GFLOP/s, implicit GEMM vs dense):
    ///
    ///   | layer (C → K, window, plane)   | taps | implicit | dense |
    ///   |--------------------------------|------|----------|-------|
    ///   | 64 → 64, 3×3, 56²              | 576  | 217      | 248   |
    ///   | 128 → 128, 3×3/2, 56²          | 1152 | 197      | 246   |
    ///   | 256 → 256, 3×3, 14²            | 2304 | 216      | 252   |
    ///   | 64 → 64, 3×3 dilated 2, 56²    | 576  | 207      | 242   |
    ///   | 16 × (32 → 64), 3×3, 32²       | 288  | 192      | 230   |
    ///   | 3 → 64, 7×7/2, 224²            | 147  | 207      | 227   |
    ///   | 64 → 32, 3×3, 56²              | 576  | 186      | 236   |
    ///   | 64 → 16, 3×3, 56²              | 576  | 145      | 170   |
    ///   | 96 → 96, 5×5, 35²              | 2400 | 211      | 253   |
    ///   | 3 → 64, 3×3, 224²              | 27   | 144      | 102   |
    ///   | 512 → 512, 3×3, 7²             | 4608 | 155      | 196   |
    ///   | 512 → 512, 3×3, 14²            | 4608 | 175      | 229   |
    ///   | 1024 → 256, 3×3, 14²           | 9216 | 165      | 193   |
    ///   | 256 → 256, 1×1, 14²            | 256  | 230      | 218   |
    ///   | 64 → 256, 1×1, 56²             | 64   | 237      | 169   |
    ///   | 512 → 2048, 1×1, 7²            | 512  | 232      | 189   |
    ///
    ///   After the dense tile's store learned to transpose its channel-major
    ///   sums in registers (AVX-512) rather than gather them, the same run
    ///   of both gave (implicit vs dense): 3 → 32, 3×3/2, 224² 122 vs 170;
    ///   3 → 64, 3×3, 224² 138 vs 101 (a 12.8 MB output, written once
    ///   either way); 4 → 64, 3×3, 56² 169 vs 199; 8 → 32 165 vs 225;
    ///   1×1: 256 → 64 on 56² 235 vs 239, 256 → 256 on 14² 233 vs 240,
    ///   1024 → 256 on 14² 234 vs 255, 256 → 512 at stride 2 207 vs 219,
    ///   64 → 256 on 56² 231 vs 218, 16 → 96 on 112² 160 vs 150, 512 → 2048
    ///   on 7² 225 vs 195, 160 → 960 on 7² 216 vs 183. The table above was
    ///   measured with the gathering store, which few taps did not repay. (The
    ///   last three rows were measured in a later, noisier run than the
    ///   others, after the dense tile learned to split the taps into chunks
    ///   whose weights stay in L2: unchunked, 512 → 512 on 7² ran at 171
    ///   against the GEMM's 192.) A 1×1 layer multiplies the input planes
    ///   in place on the GEMM.
    ///
    ///   With AVX2's tile, no larger than its GEMM's (2 × 8 channels × 6
    ///   pixels against 6 × 16), the 1×1 layers stay on the GEMM (Zen 3,
    ///   AVX2, plans, 1 thread, GFLOP/s, three or four alternating rounds,
    ///   implicit vs dense): 512 → 2048 on 7² 56–67 vs 48–60, 2048 → 512 on
    ///   7² 39–68 vs 42–49, 1024 → 256 on 14² 61–77 vs 64–71, 256 → 256 on
    ///   14² 74–76 vs 65–78, 160 → 960 on 7² 53–68 vs 57–67, and at stride
    ///   2 256 → 512 on 56² 62–82 vs 45–61, 1024 → 2048 on 14² 44–66 vs
    ///   34–43.
    /// * [`Algorithm::Implicit`] otherwise, including the few-channel stems:
    ///   since its B rows are shifted copies of each other (see
    ///   `im2col_rows`), the implicit GEMM also beats the SIMD direct kernel
    ///   on a GEMM as shallow as an RGB input's (plans, Zen 5 AVX-512, 1
    ///   thread, GFLOP/s, SIMD direct vs implicit GEMM; C → K, window):
    ///
    ///   | layer                 | K = 32                | K = 64                 |
    ///   |-----------------------|-----------------------|------------------------|
    ///   | 3 → K, 7×7/2, 224²    | 149 vs 174            | 150 vs 202             |
    ///   | 3 → K, 3×3, 224²      | 125 vs 143            | 61–104 vs 133–140      |
    ///   | 4 → K, 3×3, 56²       | 135 vs 150            | 131 vs 166             |
    ///   | 1 → K, 3×3, 128²      | 93 vs 87              | 93 vs 98               |
    ///   | 3 → K, 5×5, 112²      | 198 vs 176            | 197 vs 192             |
    ///
    ///   (4 → 64, 3×3/2: 91 vs 142; a batch of 8 on the 7×7/2 stem: 117 vs
    ///   196.) The one-channel 32-filter layer and the 5×5 layers run 3–11%
    ///   slower than they would with the direct kernel; a rule for them
    ///   would rest on these two shapes alone.
    ///
    ///   The implicit GEMM is as fast as the explicit im2col (the packing
    ///   does the same copies), without the column matrix; an unpadded
    ///   stride-1 1×1 convolution multiplies the input directly.
    ///
    /// This is the pick for the active ISA ([`crate::isa`]); a call or a
    /// plan whose [`ForwardOptions::isa`] forces another path resolves
    /// `Auto` for that path ([`Conv2d::auto_algorithm_for`]).
    pub fn auto_algorithm(&self) -> Algorithm {
        self.auto_algorithm_for(crate::isa())
    }

    /// [`Conv2d::auto_algorithm`] for the kernels of `isa` (clamped to the
    /// CPU), what a call forced onto that path with [`ForwardOptions::isa`]
    /// runs: the 1×1 rule depends on the path's register tiles.
    ///
    /// ```
    /// use cpuconv::{Algorithm, Conv2dParams, Isa};
    /// // 1×1, 256 → 256 channels at stride 2 on a 28² plane.
    /// let conv = Conv2dParams::new(1, 256, (28, 28), 256, (1, 1)).stride(2, 2).build()?;
    /// // The portable path's register tile is the GEMM's: no dense tile.
    /// assert_eq!(conv.auto_algorithm_for(Isa::Portable), Algorithm::Implicit);
    /// # Ok::<(), cpuconv::ConvError>(())
    /// ```
    pub fn auto_algorithm_for(&self, isa: Isa) -> Algorithm {
        let g = &self.geom;
        if g.flops() < 4 * 1024 {
            Algorithm::Direct
        } else if g.channels_per_group() <= 16 && g.out_channels_per_group() <= 16 {
            Algorithm::DirectSimd
        } else if dense_wins(g, isa) {
            Algorithm::DirectDense
        } else {
            Algorithm::Implicit
        }
    }

    /// The algorithm that computes a call asked to run `requested` with
    /// `weight` on the kernels of `isa`: `Auto` resolved for that path, and
    /// a GEMM lowering replaced by `DirectSimd` when a non-finite weight
    /// could meet the padding.
    ///
    /// The rule every algorithm follows: a tap that falls in the padding
    /// contributes nothing, whatever its weight, as if the sum ran only over
    /// real input pixels (the reference loops, the SIMD direct kernels and
    /// oneDNN, PyTorch's default CPU path for `f32`, skip such taps). The GEMM
    /// lowerings instead multiply the column matrix's zeros, and `0 × ±∞` or
    /// `0 × NaN` is NaN; so when the weights hold an infinity or a NaN and
    /// the convolution is padded, they hand the call to `DirectSimd`, which
    /// skips padding taps. Checking costs one pass over the weights, on up
    /// to `threads` threads ([`all_finite_on`]).
    pub(crate) fn resolve_algorithm(
        &self,
        requested: Algorithm,
        isa: Isa,
        weight: &[f32],
        threads: usize,
    ) -> Algorithm {
        self.resolve_algorithm_with(requested, isa, || all_finite_on(weight, threads))
    }

    /// [`Conv2d::resolve_algorithm`] with the weights' check given as
    /// `finite` (asked only where the answer matters): callers holding
    /// several convolutions of one weight tensor check it once.
    pub(crate) fn resolve_algorithm_with(
        &self,
        requested: Algorithm,
        isa: Isa,
        finite: impl FnOnce() -> bool,
    ) -> Algorithm {
        let algorithm = match requested {
            Algorithm::Auto => self.auto_algorithm_for(isa),
            a => a,
        };
        let multiplies_padding = matches!(
            algorithm,
            Algorithm::Im2col | Algorithm::Implicit | Algorithm::DirectDense
        );
        if multiplies_padding && self.geom.padding != Padding::ZERO && !finite() {
            Algorithm::DirectSimd
        } else {
            algorithm
        }
    }

    fn check_buffers(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &[f32],
    ) -> Result<(), ConvError> {
        let g = &self.geom;
        let checks = [
            ("input", g.input_len(), input.len()),
            ("weight", g.weight_len(), weight.len()),
            (
                "bias",
                g.out_channels,
                bias.map_or(g.out_channels, <[f32]>::len),
            ),
            ("output", g.output_len(), output.len()),
        ];
        check_lengths(&checks)
    }

    /// Computes the convolution into `output` with the default options and
    /// the given algorithm.
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

    /// Computes `output = act(conv(input, weight) + bias)` as `options` say.
    pub fn forward_with(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        options: &ForwardOptions,
    ) -> Result<(), ConvError> {
        self.check_buffers(input, weight, bias, output)?;
        options.activation.validate()?;
        let algorithm = self.resolve_algorithm(
            options.algorithm,
            options.resolved_isa(),
            weight,
            options.parallelism.max_threads(),
        );
        let g = &self.geom;
        match algorithm {
            Algorithm::Direct => {
                direct::conv2d_direct(g, input, weight, bias, output, options.activation)
            }
            Algorithm::DirectSimd => direct_simd::forward(
                g,
                input,
                weight,
                bias,
                output,
                options.activation,
                options.isa.unwrap_or_else(crate::isa),
                options.parallelism,
            )?,
            Algorithm::DirectDense => {
                let isa = options.isa.unwrap_or_else(crate::isa);
                let threads = options.parallelism.max_threads();
                let fill = direct_simd::dense_weight_filler(g, weight);
                let act = options.activation;
                match direct_simd::DensePrepared::for_one_call(g, act, isa, threads, &fill)? {
                    Some(p) => p.run_once(input, bias, output, options.parallelism, &fill)?,
                    None => {
                        direct::conv2d_direct(g, input, weight, bias, output, options.activation)
                    }
                }
            }
            Algorithm::Im2col | Algorithm::Implicit | Algorithm::Auto => {
                let lowering = if algorithm == Algorithm::Im2col {
                    gemm_lowering::Lowering::Explicit
                } else {
                    gemm_lowering::Lowering::Implicit
                };
                let weights = gemm_lowering::Weights::Raw(weight);
                gemm_lowering::forward_gemm(
                    g, input, weights, bias, output, options, lowering, None,
                )?
            }
        }
        Ok(())
    }

    /// As [`Conv2d::forward`], allocating and returning the output.
    pub fn forward_to_vec(
        &self,
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        algorithm: Algorithm,
    ) -> Result<Vec<f32>, ConvError> {
        // The lengths first: a valid geometry may describe an output far
        // larger than memory, and a short input must say so, not abort.
        let g = &self.geom;
        check_lengths(&[
            ("input", g.input_len(), input.len()),
            ("weight", g.weight_len(), weight.len()),
            (
                "bias",
                g.out_channels,
                bias.map_or(g.out_channels, <[f32]>::len),
            ),
        ])?;
        let mut out = zeroed("output", g.output_len())?;
        self.forward(input, weight, bias, &mut out, algorithm)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{all_finite, all_finite_on, FINITE_PART_MIN};

    #[test]
    fn all_finite_on_threads_finds_a_non_finite_value_in_any_part() {
        // Three parts of 64 K floats and a short fourth at 4 threads.
        let len = 3 * FINITE_PART_MIN + 1000;
        let mut x = vec![1.5f32; len];
        for threads in [1, 2, 4, 8] {
            assert!(all_finite_on(&x, threads), "{threads}");
        }
        for at in [
            0,
            FINITE_PART_MIN - 1,
            FINITE_PART_MIN,
            2 * FINITE_PART_MIN + 7,
            len - 1,
        ] {
            for bad in [f32::INFINITY, f32::NAN] {
                x[at] = bad;
                for threads in [1, 2, 4, 8] {
                    assert!(
                        !all_finite_on(&x, threads),
                        "{bad} at {at}, {threads} threads"
                    );
                }
                x[at] = 1.5;
            }
        }
        // Too short to split: one pass on the calling thread, same answer.
        assert!(all_finite_on(&x[..100], 4));
        assert!(!all_finite_on(&[1.0, f32::NAN], 4));
    }

    #[test]
    fn all_finite_finds_every_non_finite_value_wherever_it_is() {
        let finite: Vec<f32> = (0..37)
            .map(|i| [f32::MAX, -f32::MAX, f32::MIN_POSITIVE, -0.0, 1e-45, 3.5][i % 6])
            .collect();
        for len in 0..finite.len() {
            assert!(all_finite(&finite[..len]), "len {len}");
            for at in 0..len {
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN] {
                    let mut x = finite[..len].to_vec();
                    x[at] = bad;
                    assert!(!all_finite(&x), "{bad} at {at} of {len}");
                }
            }
        }
    }
}
