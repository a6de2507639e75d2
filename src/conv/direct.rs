//! The direct convolution: nested loops that read like the definition. This is
//! the oracle every other path is tested against, so it is written for
//! reading, not speed.

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
