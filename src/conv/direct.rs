//! The direct convolution: nested loops that read like the definition. This is
//! the oracle every other path is tested against, so it is written for
//! reading, not speed.

use super::phases::TransposedGeometry;
use crate::gemm::Activation;
use crate::geometry::ConvGeometry;

/// `output = act(conv(input, weight) + bias)`, one output element at a time.
///
/// Slices must already have the lengths `g` requires (checked by the caller).
pub(crate) fn conv2d_direct(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    output: &mut [f32],
    activation: Activation,
) {
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let (r_len, s_len) = (g.kernel_h, g.kernel_w);
    for n in 0..g.batch {
        for k in 0..g.out_channels {
            let group = k / kg;
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    let mut acc = 0.0f32;
                    for c in 0..cg {
                        let in_c = group * cg + c;
                        for r in 0..r_len {
                            // Input row this kernel row reads; may fall in the padding.
                            let ih = (oh * g.stride_h + r * g.dilation_h) as isize
                                - g.padding.top as isize;
                            if ih < 0 || ih >= g.in_h as isize {
                                continue;
                            }
                            for s in 0..s_len {
                                let iw = (ow * g.stride_w + s * g.dilation_w) as isize
                                    - g.padding.left as isize;
                                if iw < 0 || iw >= g.in_w as isize {
                                    continue;
                                }
                                let x = input[((n * g.in_channels + in_c) * g.in_h + ih as usize)
                                    * g.in_w
                                    + iw as usize];
                                let (wr, ws) = g.weight_tap(r, s);
                                let w = weight[((k * cg + c) * r_len + wr) * s_len + ws];
                                acc += x * w;
                            }
                        }
                    }
                    if let Some(b) = bias {
                        acc += b[k];
                    }
                    output[((n * g.out_channels + k) * g.out_h + oh) * g.out_w + ow] =
                        activation.apply(acc);
                }
            }
        }
    }
}

/// `grad_input = ∂L/∂input` for `grad_output = ∂L/∂output` (the bias and
/// any activation are not part of it: the caller differentiates those): the
/// transposed convolution of `grad_output`, computed by
/// [`transposed_direct`].
///
/// Slices must already have the lengths `g` requires (checked by the caller).
pub(crate) fn conv2d_backward_input_direct(
    g: &ConvGeometry,
    weight: &[f32],
    grad_output: &[f32],
    grad_input: &mut [f32],
) {
    let tg = TransposedGeometry::grad_input_of(g);
    transposed_direct(&tg, grad_output, weight, None, Activation::None, grad_input);
}

/// The transposed convolution from its definition: along each axis
///
/// ```text
/// y[n, co, o_h, o_w] = act(bias[co] + Σ_{ci in co's group} Σ_{i, u : i·σ_h + u·d_h − p_h = o_h} Σ_{j, v : …} x[n, ci, i, j] · w[ci, co', tap(u, v)])
/// ```
///
/// computed one output element at a time, as a gather: for each window
/// offset, solve for the input position that reaches this output through it
/// (if any). Every element is written exactly once, so an output no input
/// reaches (for a convolution's input gradient: the pixels the forward
/// never read) gets `act(bias)`. Only real input pixels are visited, so a
/// padding tap never contributes, as in the forward.
///
/// For a convolution's input gradient (`TransposedGeometry::grad_input_of`),
/// the forward reads input pixel `(ih, iw)` through tap `(r, s)` at output
/// `(oh, ow)` exactly when `ih = oh·stride_h + r·dilation_h − top`, so by
/// the chain rule this is `dX = Σ dY · W` over those triples.
///
/// Slices must already have the lengths `tg` requires (checked by the caller).
pub(crate) fn transposed_direct(
    tg: &TransposedGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    output: &mut [f32],
) {
    let (cin_g, cout_g) = (tg.in_per_group(), tg.out_per_group());
    let (h, w) = (&tg.h, &tg.w);
    for n in 0..tg.batch {
        for co in 0..tg.out_channels {
            let (group, c) = (co / cout_g, co % cout_g);
            for oh in 0..h.output {
                for ow in 0..w.output {
                    let mut acc = 0.0f32;
                    for k in group * cin_g..(group + 1) * cin_g {
                        for u in 0..h.kernel {
                            // `i·stride = o + offset − u·dilation`; every term
                            // is at most an extent or a dilated kernel extent,
                            // which the geometries keep within isize.
                            let Some(i) = output_index(
                                oh as isize + h.offset - (u * h.dilation) as isize,
                                h.stride,
                                h.input,
                            ) else {
                                continue;
                            };
                            for v in 0..w.kernel {
                                let Some(j) = output_index(
                                    ow as isize + w.offset - (v * w.dilation) as isize,
                                    w.stride,
                                    w.input,
                                ) else {
                                    continue;
                                };
                                let x =
                                    input[((n * tg.in_channels + k) * h.input + i) * w.input + j];
                                let (r, s) = tg.weight_tap(u, v);
                                let wv = weight[((k * cout_g + c) * h.kernel + r) * w.kernel + s];
                                acc += x * wv;
                            }
                        }
                    }
                    let b = bias.map_or(0.0, |b| b[co]);
                    output[((n * tg.out_channels + co) * h.output + oh) * w.output + ow] =
                        activation.apply(acc + b);
                }
            }
        }
    }
}

/// The output position `o` with `o·stride = offset`, if there is one in
/// `0..out_len`: which output read an input pixel through a given tap.
fn output_index(offset: isize, stride: usize, out_len: usize) -> Option<usize> {
    // A negative offset means the tap lies above (left of) the first output's
    // window; an offset the stride does not divide falls between outputs.
    let offset = usize::try_from(offset).ok()?;
    (offset % stride == 0 && offset / stride < out_len).then_some(offset / stride)
}

/// `grad_weight = ∂L/∂weight` for `grad_output = ∂L/∂output`, summed over the
/// batch:
///
/// ```text
/// dW[k, c, tap(r, s)] = Σ_n Σ_{oh, ow} dY[n, k, oh, ow] · X[n, group(k)·C/g + c, oh·σ_h + r·d_h − top, ow·σ_w + s·d_w − left]
/// ```
///
/// over the taps that fall on real pixels (padding taps skipped exactly as
/// the forward skips them). One weight element at a time, in a fixed order
/// (batch, then output rows, then columns); with `accumulate` the finished
/// sum is added to what `grad_weight` holds (`grad += dW`, as a framework
/// accumulating over micro-batches does), otherwise it replaces it.
///
/// Slices must already have the lengths `g` requires (checked by the caller).
pub(crate) fn conv2d_backward_weight_direct(
    g: &ConvGeometry,
    input: &[f32],
    grad_output: &[f32],
    grad_weight: &mut [f32],
    accumulate: bool,
) {
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let (r_len, s_len) = (g.kernel_h, g.kernel_w);
    for k in 0..g.out_channels {
        let group = k / kg;
        for c in 0..cg {
            let in_c = group * cg + c;
            for r in 0..r_len {
                for s in 0..s_len {
                    let mut acc = 0.0f32;
                    for n in 0..g.batch {
                        for oh in 0..g.out_h {
                            // The same input row the forward reads through this tap.
                            let ih = (oh * g.stride_h + r * g.dilation_h) as isize
                                - g.padding.top as isize;
                            if ih < 0 || ih >= g.in_h as isize {
                                continue;
                            }
                            for ow in 0..g.out_w {
                                let iw = (ow * g.stride_w + s * g.dilation_w) as isize
                                    - g.padding.left as isize;
                                if iw < 0 || iw >= g.in_w as isize {
                                    continue;
                                }
                                let x = input[((n * g.in_channels + in_c) * g.in_h + ih as usize)
                                    * g.in_w
                                    + iw as usize];
                                let dy = grad_output
                                    [((n * g.out_channels + k) * g.out_h + oh) * g.out_w + ow];
                                acc += dy * x;
                            }
                        }
                    }
                    // The forward multiplies this tap by weight element `tap(r, s)`.
                    let (wr, ws) = g.weight_tap(r, s);
                    let dst = &mut grad_weight[((k * cg + c) * r_len + wr) * s_len + ws];
                    *dst = if accumulate { *dst + acc } else { acc };
                }
            }
        }
    }
}

/// `grad_bias[k] = Σ_n Σ_{oh, ow} dY[n, k, oh, ow]` (every output of channel
/// `k` adds `bias[k]` once), in that order; with `accumulate` added to what
/// `grad_bias` holds, otherwise replacing it.
///
/// Slices must already have the lengths `g` requires (checked by the caller).
pub(crate) fn conv2d_backward_bias_direct(
    g: &ConvGeometry,
    grad_output: &[f32],
    grad_bias: &mut [f32],
    accumulate: bool,
) {
    for (k, dst) in grad_bias.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for n in 0..g.batch {
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    acc += grad_output[((n * g.out_channels + k) * g.out_h + oh) * g.out_w + ow];
                }
            }
        }
        *dst = if accumulate { *dst + acc } else { acc };
    }
}
