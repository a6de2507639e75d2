//! # cpuconv
//!
//! 2-D convolution on the CPU with PyTorch `nn.Conv2d` / ONNX `Conv`
//! semantics (NCHW, weight `[K, C/groups, R, S]`, bias, stride, asymmetric
//! padding, dilation, groups), lowered onto a cache-blocked SIMD SGEMM with
//! runtime ISA dispatch (AVX-512, AVX2+FMA, portable `wide`) and rayon threads.
//!
//! ```
//! use cpuconv::{Algorithm, Conv2dParams};
//! // The classic example: a 2×2 identity-diagonal kernel over a 3×3 image.
//! let conv = Conv2dParams::new(1, 1, (3, 3), 1, (2, 2)).build()?;
//! let input = [1.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0];
//! let weight = [1.0, 0.0, 0.0, 1.0];
//! let out = conv.forward_to_vec(&input, &weight, None, Algorithm::Auto)?;
//! assert_eq!(out, [2.0, 0.0, 3.0, 2.0]);
//! # Ok::<(), cpuconv::ConvError>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod arch;
pub mod conv;
pub mod error;
pub mod gemm;
pub mod geometry;
#[doc(hidden)]
pub mod testing;

pub use arch::{isa, Isa};
pub use conv::wisdom;
pub use conv::{
    Algorithm, BackwardOptions, ChoiceSource, Conv2d, Conv2dPlan, ConvTranspose2d,
    ConvTranspose2dParams, ConvTranspose2dPlan, ForwardOptions, Grads, PlanChoice, PlanEffort,
    TransposePadding, Workspace,
};
pub use error::{ConvError, GemmError};
pub use gemm::{Activation, GemmBackend, GemmOptions, Parallelism};
pub use geometry::{Conv2dParams, ConvGeometry, ConvMode, OnnxAutoPad, Padding, PaddingSpec};
