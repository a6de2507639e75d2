//! Convolution as one GEMM per image and group, written once for both
//! lowerings (explicit im2col matrix, implicit im2col view) and for raw or
//! pre-packed weights.
//!
//! Group `grp` of image `n` is `C[K/g, OH·OW] = W_grp[K/g, C/g·R·S] · B`, where
//! B is the column matrix of that group's input channels and C is a slice of
//! the output tensor, so the result lands in place with bias and activation
//! applied by the GEMM's store.

use super::im2col::im2col_group;
use super::implicit::Im2colView;
use super::ForwardOptions;
use crate::error::ConvError;
use crate::gemm::engine::{
    gemm_with_epilogue, ASource, BSource, Epilogue, PackBuffers, PackedA, StridedC, StridedMatrix,
};
use crate::gemm::{GemmOptions, Parallelism};
use crate::geometry::ConvGeometry;
use rayon::prelude::*;

/// How B is produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lowering {
    /// Build the column matrix, then multiply.
    Explicit,
    /// Pack B straight from the input through the im2col view (or, for an
    /// unpadded stride-1 1×1 kernel, from the input itself).
    Implicit,
}

/// The A operand of every group's GEMM.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Weights<'a> {
    /// PyTorch layout `[K, C/g, R, S]`: group `grp` is the row-major
    /// `K/g × C/g·R·S` block starting at row `grp·K/g`.
    Raw(&'a [f32]),
    /// Packed for a kernel with `mr` rows: per group, `⌈(K/g)/mr⌉` panels of
    /// `C/g·R·S × mr`, groups one after another.
    Packed { data: &'a [f32], mr: usize },
}

impl Weights<'_> {
    fn group(&self, g: &ConvGeometry, grp: usize) -> ASource<'_, f32> {
        let (kg, kk) = (g.out_channels_per_group(), g.gemm_k());
        match *self {
            Weights::Raw(w) => ASource::Strided(StridedMatrix {
                ptr: w[grp * kg * kk..][..kg * kk].as_ptr(),
                rs: kk as isize,
                cs: 1,
            }),
            Weights::Packed { data, mr } => {
                let stride = packed_group_len(g, mr);
                ASource::Packed(PackedA::from_panels(
                    &data[grp * stride..][..stride],
                    kg,
                    kk,
                    mr,
                ))
            }
        }
    }
}

/// Floats of one group's packed weights for a kernel with `mr` rows.
pub(crate) fn packed_group_len(g: &ConvGeometry, mr: usize) -> usize {
    PackedA::<f32>::packed_len(g.out_channels_per_group(), g.gemm_k(), mr)
}

/// Whether to run whole (image, group) GEMMs in parallel, each on one
/// thread, rather than one GEMM at a time across threads: when there are
/// enough of them to share out evenly, the outer split needs no
/// synchronisation inside a GEMM and repacks nothing.
fn split_over_pairs(pairs: usize, threads: usize) -> bool {
    threads > 1 && (pairs.is_multiple_of(threads) || pairs >= 4 * threads)
}

/// Everything one thread needs to run the convolution's GEMMs without
/// allocating: the GEMM's packing buffers and, for the explicit lowering,
/// the column matrix of one image group.
#[derive(Default)]
pub(crate) struct ConvScratch {
    pub pack: PackBuffers<f32>,
    pub col: Vec<f32>,
}

/// Makes `col` hold the `len` floats of a column matrix, with its memory
/// asked for fallibly: the matrix grows with the kernel and the output
/// plane, not with any buffer the caller handed in.
pub(crate) fn column_matrix(col: &mut Vec<f32>, len: usize) -> Result<(), ConvError> {
    if col.capacity() < len {
        *col = super::try_with_capacity("im2col column matrix", len)?;
    }
    col.resize(len, 0.0);
    Ok(())
}

/// Runs the convolution as GEMMs. Buffers are checked by the caller. With
/// `scratch`, everything runs on the calling thread and packs into it.
///
/// # Errors
/// [`ConvError::OutOfMemory`] when the explicit lowering's column matrix
/// cannot be allocated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_gemm(
    g: &ConvGeometry,
    input: &[f32],
    weights: Weights<'_>,
    bias: Option<&[f32]>,
    output: &mut [f32],
    opts: &ForwardOptions,
    lowering: Lowering,
    scratch: Option<&mut ConvScratch>,
) -> Result<(), ConvError> {
    let pairs = g.batch * g.groups;
    let out = StridedC {
        ptr: output.as_mut_ptr(),
        rs: g.out_plane() as isize,
        cs: 1,
    };
    // Only without a workspace: asking rayon for its pool size may
    // allocate on a thread that has never used rayon.
    let threads = match scratch {
        Some(_) => 1,
        None => opts.parallelism.max_threads().min(pairs),
    };
    if split_over_pairs(pairs, threads) {
        let gemm_opts = opts.gemm_options(Parallelism::Sequential);
        return (0..threads)
            .into_par_iter()
            .with_max_len(1)
            .try_for_each(|t| {
                let out = &out;
                let mut col = Vec::new();
                let (lo, hi) = (pairs * t / threads, pairs * (t + 1) / threads);
                for pair in lo..hi {
                    // SAFETY: each pair writes its own disjoint block of the output.
                    unsafe {
                        run_pair(
                            g, input, weights, bias, *out, opts, &gemm_opts, lowering, pair,
                            &mut col, None,
                        )
                    }?;
                }
                Ok(())
            });
    }
    // One GEMM at a time: on the calling thread only with the caller's
    // scratch, otherwise each GEMM threads itself.
    let mut own_col = Vec::new();
    let (parallelism, col, mut pack) = match scratch {
        Some(s) => (Parallelism::Sequential, &mut s.col, Some(&mut s.pack)),
        None => (opts.parallelism, &mut own_col, None),
    };
    let gemm_opts = opts.gemm_options(parallelism);
    for pair in 0..pairs {
        // SAFETY: `output` is exclusively borrowed and pairs run one at a time.
        unsafe {
            run_pair(
                g,
                input,
                weights,
                bias,
                out,
                opts,
                &gemm_opts,
                lowering,
                pair,
                col,
                pack.as_deref_mut(),
            )
        }?;
    }
    Ok(())
}

/// One (image, group) GEMM into its block of the output.
///
/// # Safety
/// `out` points at the whole output tensor, valid for writes, and no other
/// thread touches this pair's block during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn run_pair(
    g: &ConvGeometry,
    input: &[f32],
    weights: Weights<'_>,
    bias: Option<&[f32]>,
    out: StridedC<f32>,
    opts: &ForwardOptions,
    gemm_opts: &GemmOptions,
    lowering: Lowering,
    pair: usize,
    col: &mut Vec<f32>,
    pack: Option<&mut PackBuffers<f32>>,
) -> Result<(), ConvError> {
    let (n, grp) = (pair / g.groups, pair % g.groups);
    let (cg, kg) = (g.channels_per_group(), g.out_channels_per_group());
    let image = &input[(n * g.in_channels + grp * cg) * g.in_plane()..][..cg * g.in_plane()];
    let c = StridedC {
        // SAFETY: the block starts inside the output tensor (length checked).
        ptr: unsafe { out.ptr.add((n * g.out_channels + grp * kg) * g.out_plane()) },
        ..out
    };
    let epilogue = Epilogue {
        bias: bias.map_or(std::ptr::null(), |b| b[grp * kg..].as_ptr()),
        clamp: opts.activation.bounds(),
    };
    let a = weights.group(g, grp);
    let (kk, plane) = (g.gemm_k(), g.out_plane());
    // SAFETY (each arm): A is kg × kk (raw or packed for the selected kernel),
    // B is kk × plane, C is this pair's kg × plane block; bias has kg values.
    match lowering {
        Lowering::Explicit => {
            column_matrix(col, kk * plane)?;
            im2col_group(g, image, col);
            let b = StridedMatrix {
                ptr: col.as_ptr(),
                rs: plane as isize,
                cs: 1,
            };
            // SAFETY: as above; col is the kk × plane column matrix.
            unsafe { gemm_group(g, &a, &b, c, &epilogue, gemm_opts, pack) };
        }
        Lowering::Implicit if g.is_pointwise_identity() => {
            let b = StridedMatrix {
                ptr: image.as_ptr(),
                rs: g.in_plane() as isize,
                cs: 1,
            };
            // SAFETY: as above; for a 1×1 kernel, stride 1 and no padding the
            // group's cg = kk input planes of H·W = plane pixels are B.
            unsafe { gemm_group(g, &a, &b, c, &epilogue, gemm_opts, pack) };
        }
        Lowering::Implicit => {
            let b = Im2colView { g, image };
            // SAFETY: as above; the view reads only inside `image`.
            unsafe { gemm_group(g, &a, &b, c, &epilogue, gemm_opts, pack) };
        }
    }
    Ok(())
}

/// # Safety
/// As [`run_pair`], with the operands it describes.
unsafe fn gemm_group<B: BSource<f32>>(
    g: &ConvGeometry,
    a: &ASource<'_, f32>,
    b: &B,
    c: StridedC<f32>,
    epilogue: &Epilogue<f32>,
    opts: &GemmOptions,
    pack: Option<&mut PackBuffers<f32>>,
) {
    // SAFETY: forwarded.
    unsafe {
        gemm_with_epilogue(
            g.out_channels_per_group(),
            g.gemm_k(),
            g.out_plane(),
            1.0,
            a,
            b,
            0.0,
            c,
            epilogue,
            opts,
            pack,
        )
    }
}
