//! Every way a convolution or GEMM call can be refused.
//!
//! Each variant carries the offending values so that the message alone tells
//! the caller what to fix.

use std::fmt;

/// Why a convolution descriptor or a `forward` call was rejected.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConvError {
    /// One of N, C, H, W, K, R, S is zero; `name` says which.
    ZeroDimension {
        /// The parameter's name, e.g. `"in_channels"`.
        name: &'static str,
    },
    /// A stride component is zero.
    ZeroStride {
        /// Vertical stride.
        h: usize,
        /// Horizontal stride.
        w: usize,
    },
    /// A dilation component is zero.
    ZeroDilation {
        /// Vertical dilation.
        h: usize,
        /// Horizontal dilation.
        w: usize,
    },
    /// `groups` is zero.
    ZeroGroups,
    /// `groups` must divide both the input and the output channel count.
    GroupsMismatch {
        /// The requested group count.
        groups: usize,
        /// Input channels C.
        in_channels: usize,
        /// Output channels K.
        out_channels: usize,
    },
    /// A buffer's length does not match the shape it is meant to hold.
    BufferLength {
        /// Which buffer: `"input"`, `"weight"`, `"bias"`, `"output"` or
        /// `"workspace"` for the forward; `"grad_output"`, `"grad_input"`,
        /// `"grad_weight"` or `"grad_bias"` (and `"input"`, `"weight"`) for
        /// the backward passes.
        buffer: &'static str,
        /// The length the descriptor requires.
        expected: usize,
        /// The length that was passed.
        actual: usize,
    },
    /// The dilated kernel is larger than the padded input along one axis, so
    /// the output would be empty.
    KernelLargerThanInput {
        /// `"height"` or `"width"`.
        axis: &'static str,
        /// Dilated kernel extent, `d·(R−1)+1`.
        effective_kernel: usize,
        /// Input extent plus both paddings.
        padded_input: usize,
    },
    /// PyTorch's `padding="same"` is only defined for stride 1.
    SameWithStride {
        /// Vertical stride.
        h: usize,
        /// Horizontal stride.
        w: usize,
    },
    /// A size computed from the parameters does not fit in `usize`.
    Overflow {
        /// What was being computed, e.g. `"input length"`.
        what: &'static str,
    },
    /// A size, stride, dilation or padding (or an extent derived from them)
    /// is above `isize::MAX`, the largest offset the kernels can form
    /// exactly (and PyTorch's own limit: its sizes are `i64`).
    TooLarge {
        /// Which value, e.g. `"horizontal stride"`.
        what: &'static str,
        /// The value given or derived.
        value: usize,
    },
    /// Memory the call needed for its own use (a column matrix, a returned
    /// output, a plan's packed weights) could not be allocated.
    OutOfMemory {
        /// What the memory was for, e.g. `"im2col column matrix"`.
        what: &'static str,
        /// How many bytes were asked for.
        bytes: usize,
    },
    /// An `Activation::Clamp` bound is NaN, which has no clamp order.
    InvalidActivation {
        /// The lower bound given.
        min: f32,
        /// The upper bound given.
        max: f32,
    },
    /// A transposed convolution's `output_padding` is not below the larger
    /// of its stride and dilation on one axis (PyTorch's and ONNX's rule).
    OutputPaddingTooLarge {
        /// `"height"` or `"width"`.
        axis: &'static str,
        /// The output padding given.
        output_padding: usize,
        /// The stride on that axis.
        stride: usize,
        /// The dilation on that axis.
        dilation: usize,
    },
    /// A transposed convolution's ONNX `output_shape` is 0 on one axis (any
    /// larger size is reached: by removing padding from the full output,
    /// `stride·(input − 1) + output_padding + dilation·(kernel − 1) + 1`,
    /// or by extending it at the end).
    UnreachableOutputShape {
        /// `"height"` or `"width"`.
        axis: &'static str,
        /// The output size asked for.
        requested: usize,
        /// The full output's size on that axis.
        full: usize,
    },
    /// A transposed convolution's padding removes its whole output on one
    /// axis.
    PaddingRemovesOutput {
        /// `"height"` or `"width"`.
        axis: &'static str,
        /// The output with no padding (as for `UnreachableOutputShape`).
        full: usize,
        /// Padding at both ends together.
        padding: usize,
    },
    /// The algorithm asked for has no implementation for this pass. Every
    /// algorithm of this version implements every pass; the variant stays for
    /// algorithms (or passes) to come, which may cover fewer.
    UnsupportedAlgorithm {
        /// The pass: `"grad_input"`, `"grad_weight"` or `"backward"`.
        pass: &'static str,
        /// The algorithm that was asked for, as
        /// [`Algorithm::name`](crate::Algorithm::name) spells it (a name, so
        /// that errors sit below the operators that raise them).
        algorithm: &'static str,
    },
    /// A wisdom string ([`crate::wisdom::import`]) does not follow the
    /// format.
    InvalidWisdom {
        /// The line, counted from 1.
        line: usize,
        /// The token at fault (a key's name when it is missing).
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for ConvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvError::ZeroDimension { name } => write!(f, "{name} must be at least 1, got 0"),
            ConvError::ZeroStride { h, w } => {
                write!(f, "stride must be at least 1 on both axes, got ({h}, {w})")
            }
            ConvError::ZeroDilation { h, w } => {
                write!(
                    f,
                    "dilation must be at least 1 on both axes, got ({h}, {w})"
                )
            }
            ConvError::ZeroGroups => write!(f, "groups must be at least 1, got 0"),
            ConvError::GroupsMismatch {
                groups,
                in_channels,
                out_channels,
            } => write!(
                f,
                "groups = {groups} must divide in_channels = {in_channels} and \
                 out_channels = {out_channels}"
            ),
            ConvError::BufferLength {
                buffer,
                expected,
                actual,
            } => write!(
                f,
                "{buffer} buffer has {actual} elements, the shape needs {expected}"
            ),
            ConvError::KernelLargerThanInput {
                axis,
                effective_kernel,
                padded_input,
            } => write!(
                f,
                "dilated kernel {axis} {effective_kernel} exceeds padded input {axis} \
                 {padded_input}: the output would be empty"
            ),
            ConvError::SameWithStride { h, w } => write!(
                f,
                "PyTorch padding=\"same\" requires stride 1, got ({h}, {w}); \
                 use ONNX SAME_UPPER/SAME_LOWER for strided convolutions"
            ),
            ConvError::OutputPaddingTooLarge {
                axis,
                output_padding,
                stride,
                dilation,
            } => write!(
                f,
                "output_padding {axis} {output_padding} must be smaller than the larger of \
                 stride {stride} and dilation {dilation}"
            ),
            ConvError::UnreachableOutputShape {
                axis,
                requested,
                full,
            } => write!(
                f,
                "output_shape {axis} {requested} is unreachable: a transposed convolution's \
                 output has at least 1 (its full output here is {full})"
            ),
            ConvError::PaddingRemovesOutput {
                axis,
                full,
                padding,
            } => write!(
                f,
                "padding {padding} along the {axis} leaves nothing of the transposed \
                 convolution's {full} outputs"
            ),
            ConvError::Overflow { what } => write!(f, "{what} overflows usize"),
            ConvError::TooLarge { what, value } => write!(
                f,
                "{what} = {value} is above isize::MAX = {}, the largest offset the kernels can form",
                isize::MAX
            ),
            ConvError::OutOfMemory { what, bytes } => {
                write!(f, "could not allocate {bytes} bytes for the {what}")
            }
            ConvError::InvalidActivation { min, max } => write!(
                f,
                "Activation::Clamp bounds must not be NaN, got min = {min}, max = {max}"
            ),
            ConvError::UnsupportedAlgorithm { pass, algorithm } => write!(
                f,
                "the {pass} pass has no {algorithm} algorithm"
            ),
            ConvError::InvalidWisdom {
                line,
                token,
                reason,
            } => write!(f, "wisdom line {line}: {reason}: {token:?}"),
        }
    }
}

impl std::error::Error for ConvError {}

/// Why a GEMM call was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GemmError {
    /// The shapes of A (`m × k`), B (`k × n`) and C (`m × n`) disagree.
    DimensionMismatch {
        /// Rows and columns of A.
        a: (usize, usize),
        /// Rows and columns of B.
        b: (usize, usize),
        /// Rows and columns of C.
        c: (usize, usize),
    },
    /// A matrix view reaches outside its slice.
    OutOfBounds {
        /// `"a"`, `"b"` or `"c"`.
        matrix: &'static str,
        /// Lowest element offset the view touches (may be negative).
        min_offset: isize,
        /// Highest element offset the view touches.
        max_offset: isize,
        /// Length of the slice.
        len: usize,
    },
    /// Two different elements of C share one memory location, so the result
    /// would depend on the order of writes.
    OverlappingOutput {
        /// Row stride of C.
        row_stride: isize,
        /// Column stride of C.
        col_stride: isize,
    },
    /// An index computation overflowed.
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
}

impl fmt::Display for GemmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GemmError::DimensionMismatch { a, b, c } => write!(
                f,
                "shapes disagree: A is {}×{}, B is {}×{}, C is {}×{} (need A m×k, B k×n, C m×n)",
                a.0, a.1, b.0, b.1, c.0, c.1
            ),
            GemmError::OutOfBounds {
                matrix,
                min_offset,
                max_offset,
                len,
            } => write!(
                f,
                "matrix {matrix} spans offsets {min_offset}..={max_offset} but its slice has \
                 {len} elements"
            ),
            GemmError::OverlappingOutput {
                row_stride,
                col_stride,
            } => write!(
                f,
                "C with row stride {row_stride} and column stride {col_stride} maps two \
                 elements to one location"
            ),
            GemmError::Overflow { what } => write!(f, "{what} overflows"),
        }
    }
}

impl std::error::Error for GemmError {}
