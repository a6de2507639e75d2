//! Convolution parameters, padding rules and the checked size arithmetic
//! that turns them into a validated [`ConvGeometry`].

use crate::error::ConvError;

/// Explicit zero padding on the four sides of the input, in pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Padding {
    /// Rows of zeros above the input.
    pub top: usize,
    /// Rows of zeros below the input.
    pub bottom: usize,
    /// Columns of zeros left of the input.
    pub left: usize,
    /// Columns of zeros right of the input.
    pub right: usize,
}

impl Padding {
    /// No padding (PyTorch `padding=0` / `"valid"`, ONNX `VALID`).
    pub const ZERO: Padding = Padding {
        top: 0,
        bottom: 0,
        left: 0,
        right: 0,
    };

    /// PyTorch `padding=(ph, pw)`: `ph` rows above and below, `pw` columns left and right.
    pub fn symmetric(ph: usize, pw: usize) -> Padding {
        Padding {
            top: ph,
            bottom: ph,
            left: pw,
            right: pw,
        }
    }

    /// Four explicit values, in the order top, bottom, left, right.
    pub fn explicit(top: usize, bottom: usize, left: usize, right: usize) -> Padding {
        Padding {
            top,
            bottom,
            left,
            right,
        }
    }

    /// ONNX `pads` attribute for a 2-D convolution: `[top, left, bottom, right]`
    /// (all begins, then all ends).
    pub fn onnx_pads(pads: [usize; 4]) -> Padding {
        Padding {
            top: pads[0],
            left: pads[1],
            bottom: pads[2],
            right: pads[3],
        }
    }
}

/// ONNX `auto_pad` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OnnxAutoPad {
    /// Pad so that `out = ceil(in / stride)`; an odd total puts the extra pixel at the end.
    SameUpper,
    /// As `SameUpper`, but the extra pixel goes at the beginning.
    SameLower,
    /// No padding.
    Valid,
}

/// How the padding of a convolution is specified. Rules that depend on the
/// input size, kernel, stride and dilation are resolved when the descriptor is
/// built; [`Conv2d::padding`](crate::Conv2d::padding) reports the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaddingSpec {
    /// Four explicit values.
    Explicit(Padding),
    /// PyTorch `padding="valid"`: no padding.
    TorchValid,
    /// PyTorch `padding="same"`: output size equals input size; stride must be 1.
    /// For an even effective kernel the extra row/column goes at the bottom/right.
    TorchSame,
    /// ONNX `auto_pad`, defined for any stride.
    OnnxAuto(OnnxAutoPad),
}

impl Default for PaddingSpec {
    fn default() -> Self {
        PaddingSpec::Explicit(Padding::ZERO)
    }
}

impl From<Padding> for PaddingSpec {
    fn from(p: Padding) -> Self {
        PaddingSpec::Explicit(p)
    }
}

impl From<OnnxAutoPad> for PaddingSpec {
    fn from(p: OnnxAutoPad) -> Self {
        PaddingSpec::OnnxAuto(p)
    }
}

/// The setters the convolution's and the transposed convolution's
/// parameter builders share, each a field set by value.
macro_rules! shape_setters {
    ($($name:ident),+) => {
        $(shape_setters!(@one $name);)+
    };
    (@one stride) => {
        /// Sets the stride (vertical, horizontal).
        pub fn stride(mut self, h: usize, w: usize) -> Self {
            self.stride = (h, w);
            self
        }
    };
    (@one dilation) => {
        /// Sets the dilation (vertical, horizontal).
        pub fn dilation(mut self, h: usize, w: usize) -> Self {
            self.dilation = (h, w);
            self
        }
    };
    (@one groups) => {
        /// Sets the number of groups.
        pub fn groups(mut self, groups: usize) -> Self {
            self.groups = groups;
            self
        }
    };
    (@one mode) => {
        /// Sets cross-correlation or flipped-kernel convolution.
        pub fn mode(mut self, mode: ConvMode) -> Self {
            self.mode = mode;
            self
        }
    };
}
pub(crate) use shape_setters;

/// Which of the two textbook definitions the convolution computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConvMode {
    /// `out[y,x] = Σ in[y·s+r·d, x·s+c·d] · w[r,c]`: what PyTorch and ONNX call
    /// convolution.
    #[default]
    CrossCorrelation,
    /// True mathematical convolution: the kernel is flipped, so the first input
    /// pixel of a window pairs with `w[R−1, S−1]`.
    Convolution,
}

/// Total and split padding along one axis for ONNX `SAME_*`, per the ONNX spec:
/// `total = max(0, (ceil(in/s) − 1)·s + d·(k−1) + 1 − in)`.
fn onnx_same_axis(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    upper: bool,
) -> Result<(usize, usize), ConvError> {
    let overflow = ConvError::Overflow {
        what: "ONNX SAME padding",
    };
    let out = input.div_ceil(stride);
    let span = (out - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(effective_extent(kernel, dilation)?))
        .ok_or(overflow)?;
    let total = span.saturating_sub(input);
    let small = total / 2;
    let large = total - small;
    Ok(if upper {
        (small, large)
    } else {
        (large, small)
    })
}

/// `d·(k−1)+1`, the number of input pixels one kernel window spans.
fn effective_extent(kernel: usize, dilation: usize) -> Option<usize> {
    dilation.checked_mul(kernel - 1)?.checked_add(1)
}

/// `Err` for the first zero among the input size, kernel size, stride and
/// dilation: every rule below divides by the stride or subtracts 1 from the
/// kernel.
fn check_axes_nonzero(
    input: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
) -> Result<(), ConvError> {
    let dims = [
        ("input height", input.0),
        ("input width", input.1),
        ("kernel height", kernel.0),
        ("kernel width", kernel.1),
    ];
    if let Some(&(name, _)) = dims.iter().find(|(_, v)| *v == 0) {
        return Err(ConvError::ZeroDimension { name });
    }
    if stride.0 == 0 || stride.1 == 0 {
        return Err(ConvError::ZeroStride {
            h: stride.0,
            w: stride.1,
        });
    }
    if dilation.0 == 0 || dilation.1 == 0 {
        return Err(ConvError::ZeroDilation {
            h: dilation.0,
            w: dilation.1,
        });
    }
    Ok(())
}

impl PaddingSpec {
    /// Resolves the rule into four explicit values for the given geometry.
    /// A zero size, stride or dilation is an error, as in
    /// [`Conv2dParams::build`].
    ///
    /// ```
    /// use cpuconv::{OnnxAutoPad, Padding, PaddingSpec};
    /// let same = PaddingSpec::OnnxAuto(OnnxAutoPad::SameUpper);
    /// // 7 → ⌈7/2⌉ = 4 outputs of a 3-wide window need 2 pixels of padding.
    /// let p = same.resolve((7, 7), (3, 3), (2, 2), (1, 1)).unwrap();
    /// assert_eq!(p, Padding::symmetric(1, 1));
    /// assert!(same.resolve((7, 7), (3, 3), (0, 2), (1, 1)).is_err());
    /// ```
    pub fn resolve(
        &self,
        input: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        dilation: (usize, usize),
    ) -> Result<Padding, ConvError> {
        check_axes_nonzero(input, kernel, stride, dilation)?;
        match *self {
            PaddingSpec::Explicit(p) => Ok(p),
            PaddingSpec::TorchValid | PaddingSpec::OnnxAuto(OnnxAutoPad::Valid) => {
                Ok(Padding::ZERO)
            }
            PaddingSpec::TorchSame => {
                if stride != (1, 1) {
                    return Err(ConvError::SameWithStride {
                        h: stride.0,
                        w: stride.1,
                    });
                }
                let overflow = ConvError::Overflow {
                    what: "PyTorch same padding",
                };
                let th = dilation
                    .0
                    .checked_mul(kernel.0 - 1)
                    .ok_or(overflow.clone())?;
                let tw = dilation.1.checked_mul(kernel.1 - 1).ok_or(overflow)?;
                Ok(Padding {
                    top: th / 2,
                    bottom: th - th / 2,
                    left: tw / 2,
                    right: tw - tw / 2,
                })
            }
            PaddingSpec::OnnxAuto(mode) => {
                let upper = mode == OnnxAutoPad::SameUpper;
                let (top, bottom) = onnx_same_axis(input.0, kernel.0, stride.0, dilation.0, upper)?;
                let (left, right) = onnx_same_axis(input.1, kernel.1, stride.1, dilation.1, upper)?;
                Ok(Padding {
                    top,
                    bottom,
                    left,
                    right,
                })
            }
        }
    }
}

/// Everything that describes a 2-D convolution, as PyTorch's `nn.Conv2d` or an
/// ONNX `Conv` node would. Build one with [`Conv2dParams::new`] and the
/// chained setters, then validate it with [`Conv2dParams::build`].
///
/// ```
/// use cpuconv::{Conv2dParams, Padding};
/// let conv = Conv2dParams::new(1, 3, (224, 224), 64, (7, 7))
///     .stride(2, 2)
///     .padding(Padding::symmetric(3, 3))
///     .build()
///     .unwrap();
/// assert_eq!(conv.output_shape(), [1, 64, 112, 112]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// Batch size N.
    pub batch: usize,
    /// Input channels C.
    pub in_channels: usize,
    /// Input height H and width W.
    pub input_size: (usize, usize),
    /// Output channels K.
    pub out_channels: usize,
    /// Kernel height R and width S.
    pub kernel_size: (usize, usize),
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// How padding is specified.
    pub padding: PaddingSpec,
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Number of groups; must divide C and K.
    pub groups: usize,
    /// Cross-correlation (default) or flipped-kernel convolution.
    pub mode: ConvMode,
}

impl Conv2dParams {
    /// A convolution of `batch` images of `in_channels × input_size` into
    /// `out_channels` with a `kernel_size` kernel; stride 1, no padding,
    /// dilation 1, one group, cross-correlation.
    pub fn new(
        batch: usize,
        in_channels: usize,
        input_size: (usize, usize),
        out_channels: usize,
        kernel_size: (usize, usize),
    ) -> Self {
        Conv2dParams {
            batch,
            in_channels,
            input_size,
            out_channels,
            kernel_size,
            stride: (1, 1),
            padding: PaddingSpec::default(),
            dilation: (1, 1),
            groups: 1,
            mode: ConvMode::CrossCorrelation,
        }
    }

    shape_setters!(stride);

    /// Sets the padding: a [`Padding`], an [`OnnxAutoPad`] or any [`PaddingSpec`].
    pub fn padding(mut self, padding: impl Into<PaddingSpec>) -> Self {
        self.padding = padding.into();
        self
    }

    shape_setters!(dilation, groups, mode);

    /// Validates the parameters and computes every derived size.
    pub fn build(self) -> Result<crate::Conv2d, ConvError> {
        ConvGeometry::new(&self).map(crate::Conv2d::from_geometry)
    }
}

/// A validated convolution: every size is non-zero, every derived length fits
/// in `usize`, every size, stride, dilation and padding (and both padded
/// input extents) is at most `isize::MAX`, and the output is non-empty.
/// Built only through [`Conv2dParams::build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// N
    pub batch: usize,
    /// C
    pub in_channels: usize,
    /// H
    pub in_h: usize,
    /// W
    pub in_w: usize,
    /// K
    pub out_channels: usize,
    /// R
    pub kernel_h: usize,
    /// S
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Resolved padding.
    pub padding: Padding,
    /// Vertical dilation.
    pub dilation_h: usize,
    /// Horizontal dilation.
    pub dilation_w: usize,
    /// Groups.
    pub groups: usize,
    /// Correlation or flipped convolution.
    pub mode: ConvMode,
    /// Output height OH.
    pub out_h: usize,
    /// Output width OW.
    pub out_w: usize,
}

/// `Err(TooLarge)` for the first value above `isize::MAX`.
fn fits_isize(values: &[(&'static str, usize)]) -> Result<(), ConvError> {
    match values.iter().find(|(_, v)| isize::try_from(*v).is_err()) {
        Some(&(what, value)) => Err(ConvError::TooLarge { what, value }),
        None => Ok(()),
    }
}

fn mul(a: usize, b: usize, what: &'static str) -> Result<usize, ConvError> {
    a.checked_mul(b).ok_or(ConvError::Overflow { what })
}

/// One axis of `floor((in + pad_lo + pad_hi − d·(k−1) − 1) / s) + 1`.
fn output_extent(
    axis: &'static str,
    input: usize,
    pad_lo: usize,
    pad_hi: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> Result<usize, ConvError> {
    let padded = input
        .checked_add(pad_lo)
        .and_then(|v| v.checked_add(pad_hi))
        .ok_or(ConvError::Overflow {
            what: "padded input size",
        })?;
    let effective = effective_extent(kernel, dilation).ok_or(ConvError::Overflow {
        what: "dilated kernel size",
    })?;
    if effective > padded {
        return Err(ConvError::KernelLargerThanInput {
            axis,
            effective_kernel: effective,
            padded_input: padded,
        });
    }
    Ok((padded - effective) / stride + 1)
}

impl ConvGeometry {
    /// Validates `p` in the order a user would want to hear about problems:
    /// zero sizes first, then group divisibility, then padding and output size,
    /// then the lengths of every buffer.
    pub fn new(p: &Conv2dParams) -> Result<ConvGeometry, ConvError> {
        let dims = [
            ("batch", p.batch),
            ("in_channels", p.in_channels),
            ("out_channels", p.out_channels),
        ];
        if let Some(&(name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(ConvError::ZeroDimension { name });
        }
        check_axes_nonzero(p.input_size, p.kernel_size, p.stride, p.dilation)?;
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
        // Offsets inside a padded plane are formed in `isize` (a window's
        // first pixel lies up to `padding` before the input), so every
        // per-axis value must fit one, as it must in PyTorch's `i64` sizes.
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
        fits_isize(&per_axis)?;
        let padding = p
            .padding
            .resolve(p.input_size, p.kernel_size, p.stride, p.dilation)?;
        let padded = |input: usize, lo: usize, hi: usize| input.checked_add(lo)?.checked_add(hi);
        let overflow = ConvError::Overflow {
            what: "padded input size",
        };
        let padded_h =
            padded(p.input_size.0, padding.top, padding.bottom).ok_or(overflow.clone())?;
        let padded_w = padded(p.input_size.1, padding.left, padding.right).ok_or(overflow)?;
        fits_isize(&[
            ("padded input height", padded_h),
            ("padded input width", padded_w),
        ])?;
        let out_h = output_extent(
            "height",
            p.input_size.0,
            padding.top,
            padding.bottom,
            p.kernel_size.0,
            p.stride.0,
            p.dilation.0,
        )?;
        let out_w = output_extent(
            "width",
            p.input_size.1,
            padding.left,
            padding.right,
            p.kernel_size.1,
            p.stride.1,
            p.dilation.1,
        )?;
        let g = ConvGeometry {
            batch: p.batch,
            in_channels: p.in_channels,
            in_h: p.input_size.0,
            in_w: p.input_size.1,
            out_channels: p.out_channels,
            kernel_h: p.kernel_size.0,
            kernel_w: p.kernel_size.1,
            stride_h: p.stride.0,
            stride_w: p.stride.1,
            padding,
            dilation_h: p.dilation.0,
            dilation_w: p.dilation.1,
            groups: p.groups,
            mode: p.mode,
            out_h,
            out_w,
        };
        // Every length the kernels index with is computed once here, checked;
        // afterwards the unchecked forms below cannot overflow.
        g.checked_input_len()?;
        g.checked_output_len()?;
        g.checked_weight_len()?;
        g.checked_flops()?;
        // The im2col column matrix of one group, plus one image of input
        // padded on all sides, must be addressable too.
        mul(g.gemm_k_checked()?, g.out_h * g.out_w, "im2col matrix size")?;
        Ok(g)
    }

    fn checked_input_len(&self) -> Result<usize, ConvError> {
        let what = "input length";
        mul(
            mul(mul(self.batch, self.in_channels, what)?, self.in_h, what)?,
            self.in_w,
            what,
        )
    }

    fn checked_output_len(&self) -> Result<usize, ConvError> {
        let what = "output length";
        mul(
            mul(mul(self.batch, self.out_channels, what)?, self.out_h, what)?,
            self.out_w,
            what,
        )
    }

    fn gemm_k_checked(&self) -> Result<usize, ConvError> {
        let what = "weight length";
        mul(
            mul(self.in_channels / self.groups, self.kernel_h, what)?,
            self.kernel_w,
            what,
        )
    }

    fn checked_weight_len(&self) -> Result<usize, ConvError> {
        mul(self.out_channels, self.gemm_k_checked()?, "weight length")
    }

    fn checked_flops(&self) -> Result<u64, ConvError> {
        let what = "FLOP count";
        let out = self.checked_output_len()? as u64;
        out.checked_mul(2)
            .and_then(|v| v.checked_mul(self.gemm_k_checked().ok()? as u64))
            .ok_or(ConvError::Overflow { what })
    }

    /// `N·C·H·W`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }

    /// `N·K·OH·OW`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_h * self.out_w
    }

    /// `K·(C/groups)·R·S`.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.gemm_k()
    }

    /// Input channels per group.
    pub fn channels_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels per group: the GEMM's M.
    pub fn out_channels_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    /// `(C/groups)·R·S`: the GEMM's K dimension.
    pub fn gemm_k(&self) -> usize {
        self.channels_per_group() * self.kernel_h * self.kernel_w
    }

    /// `OH·OW`: the GEMM's N per image.
    pub fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// `H·W`.
    pub fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    /// `2·N·K·OH·OW·(C/groups)·R·S`, counting a multiply-add as two operations.
    pub fn flops(&self) -> u64 {
        2 * self.output_len() as u64 * self.gemm_k() as u64
    }

    /// Whether every output pixel reads only in-bounds input with unit stride
    /// and dilation and a 1×1 kernel: the input plane is already the GEMM's B.
    pub fn is_pointwise_identity(&self) -> bool {
        self.kernel_h == 1
            && self.kernel_w == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.padding == Padding::ZERO
    }

    /// The kernel tap that multiplies input offset `(r, s)` of a window:
    /// itself for cross-correlation, the mirrored tap for true convolution.
    #[inline]
    pub fn weight_tap(&self, r: usize, s: usize) -> (usize, usize) {
        match self.mode {
            ConvMode::CrossCorrelation => (r, s),
            ConvMode::Convolution => (self.kernel_h - 1 - r, self.kernel_w - 1 - s),
        }
    }
}
