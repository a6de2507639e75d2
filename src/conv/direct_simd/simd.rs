//! The vector operations both register tiles are written in ([`Simd`], one
//! implementation per ISA), and the steps the tiles share on top of them:
//! where a tile sits ([`TileAt`]), one tap's load and FMA, interior or edge,
//! and the store through the epilogue.

use super::lanes::LanesForward;
use super::{ColVec, Geo, Job};

/// The vector operations the generic kernel is written in, on a zero-sized
/// token that only exists where the CPU supports the ISA (so the arithmetic
/// is safe to call; only memory access is `unsafe`). Every operation is
/// `#[inline(always)]` so that it compiles inside the caller's
/// `#[target_feature]` functions: [`Simd::general`] and [`Simd::three`].
pub(super) trait Simd: Copy {
    /// Lanes per vector.
    const LANES: usize;
    /// A vector of `LANES` floats.
    type V: Copy;
    /// A set of lanes.
    type M: Copy;
    /// Most vectors across a row the [3×3 row sweep](super::sweep) keeps in
    /// flight (three accumulators each, beside nine weights); 0 where the
    /// registers do not hold that, and the 3×3 tile runs instead.
    const SWEEP_VECS: usize = 0;

    /// [`run_general`](super::run_general) with this ISA's operations,
    /// compiled with its target features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`run_general`](super::run_general)
    /// otherwise.
    unsafe fn general<const KB: usize, const RB: usize, const SW: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    );

    /// [`run_three`](super::run_three) with this ISA's operations,
    /// compiled with its target features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as [`run_three`](super::run_three)
    /// otherwise.
    unsafe fn three<const RB: usize, const SW: usize, const SH: usize>(
        job: &Job<'_>,
        out: &mut [f32],
    );

    /// [`forward_lanes`](super::lanes::forward_lanes) with this ISA's
    /// operations, compiled with its target features.
    ///
    /// # Safety
    /// The CPU supports the ISA; as
    /// [`forward_lanes`](super::lanes::forward_lanes) otherwise.
    unsafe fn lanes_forward(job: &LanesForward<'_>, work: &mut [f32], out: &mut [f32]);

    /// The lanes `j` whose bit `j` of `bits` is set (bits past the lane
    /// count are ignored), for the merge-masked FMA.
    fn mask_bits(self, bits: u32) -> Self::M;

    /// `out[i]` = the sum of `v[i]`'s lanes, pairwise in a fixed order:
    /// lane `j` plus lane `j + L/2`, then again on the first half, down to
    /// one (`out` as long as `v`). An ISA may sum several vectors at once
    /// with shuffles, in exactly this order.
    #[inline(always)]
    fn reduce_lanes(self, v: &[Self::V], out: &mut [f32]) {
        const MAX_LANES: usize = 64;
        for (o, &v) in out.iter_mut().zip(v) {
            let mut lanes = [0.0f32; MAX_LANES];
            let mut width = Self::LANES.min(MAX_LANES);
            // SAFETY: writes `width ≤ MAX_LANES` floats into a local array.
            unsafe { self.store(lanes.as_mut_ptr(), v, width) };
            while width > 1 {
                width /= 2;
                for j in 0..width {
                    lanes[j] += lanes[j + width];
                }
            }
            *o = lanes[0];
        }
    }

    /// All zeros.
    fn zero(self) -> Self::V;
    /// `x` in every lane.
    fn splat(self, x: f32) -> Self::V;
    /// Lanes `lo..hi` (`lo ≤ hi ≤ LANES`; empty when equal).
    fn mask(self, lo: usize, hi: usize) -> Self::M;
    /// `a·b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a·b + c` in the lanes of `m`, `c` elsewhere.
    fn fma_masked(self, a: Self::V, b: Self::V, c: Self::V, m: Self::M) -> Self::V;
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `min(max(v, lo), hi)`, NaN passing through (as `clamp_keep_nan`).
    fn clamp(self, v: Self::V, lo: Self::V, hi: Self::V) -> Self::V;

    /// `p[0..LANES]`.
    ///
    /// # Safety
    /// `p[0..LANES]` is readable.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// `p[2·j]` for each lane `j`.
    ///
    /// # Safety
    /// `p[0..2·LANES − 1]` is readable.
    unsafe fn load_stride2(self, p: *const f32) -> Self::V;
    /// `[load_stride2(p), load_stride2(p + 1), load_stride2(p + 2)]`: the
    /// three kernel columns of a 3×3 tap row at stride 2. An ISA may share
    /// loads between them.
    ///
    /// # Safety
    /// `p[0..2·LANES + 1]` is readable.
    #[inline(always)]
    unsafe fn load_stride2_three(self, p: *const f32) -> [Self::V; 3] {
        // SAFETY: each reads within p[0..2·LANES + 1] (contract).
        unsafe {
            [
                self.load_stride2(p),
                self.load_stride2(p.add(1)),
                self.load_stride2(p.add(2)),
            ]
        }
    }
    /// `p[stride·j]` for each lane `j`.
    ///
    /// # Safety
    /// Each `p[stride·j]`, `j < LANES`, is readable.
    unsafe fn load_strided(self, p: *const f32, stride: usize) -> Self::V;
    /// `p[stride·j]` in the lanes `j` of `m`, 0 elsewhere; other lanes are
    /// not read.
    ///
    /// # Safety
    /// `p[stride·j]` is readable for each lane `j` of `m` (for stride 2, so
    /// is everything between the first and last of them); `p` itself may lie
    /// outside the allocation (implementations offset it only with wrapping
    /// arithmetic, or let the hardware skip the masked-off lanes).
    unsafe fn load_masked(self, p: *const f32, stride: usize, m: Self::M) -> Self::V;
    /// Writes the first `n` lanes (`1 ≤ n ≤ LANES`) to `p[0..n]`.
    ///
    /// # Safety
    /// `p[0..n]` is writable.
    unsafe fn store(self, p: *mut f32, v: Self::V, n: usize);

    /// The `LANES × LANES` block of floats whose row `j` is
    /// `p[j·stride..][..LANES]`, transposed: `out[l]` holds element `l` of
    /// every row (`out` as long as `LANES`). By default one strided load a
    /// vector; an ISA may shuffle whole rows in registers instead.
    ///
    /// # Safety
    /// `p[j·stride + l]` is readable for every `j, l < LANES`.
    #[inline(always)]
    unsafe fn load_transposed(self, p: *const f32, stride: usize, out: &mut [Self::V]) {
        for (l, v) in out.iter_mut().enumerate() {
            // SAFETY: element l of every row is readable (contract).
            *v = unsafe { self.load_strided(p.add(l), stride) };
        }
    }
}

/// Where one register tile sits.
pub(super) struct TileAt<'a> {
    /// First output row.
    pub(super) oh0: usize,
    /// Output rows of the tile, `1..=RB`.
    pub(super) rows: usize,
    pub(super) cv: ColVec,
    /// Per kernel column, the lanes that read inside the input row.
    pub(super) ranges: &'a [(usize, usize)],
}

impl<'a> TileAt<'a> {
    /// The tile of rows `oh0..oh0 + rows` at vector `v` of the plan.
    #[inline(always)]
    pub(super) fn new(job: &Job<'a>, oh0: usize, rows: usize, v: usize, cv: &ColVec) -> TileAt<'a> {
        let s_len = job.geo.s_len;
        TileAt {
            oh0,
            rows,
            cv: *cv,
            ranges: &job.cols.ranges[v * s_len..(v + 1) * s_len],
        }
    }
}

/// One interior vector load with the stride `SW` stands for.
///
/// # Safety
/// `p[stride·j]` is readable for every lane `j`.
#[inline(always)]
pub(super) unsafe fn load_interior<S: Simd, const SW: usize>(
    s: S,
    p: *const f32,
    stride: usize,
) -> S::V {
    // SAFETY: lanes 0..L at stride `stride` are readable (contract); for
    // stride 2 that is the whole run p[0..2L−1], which `load_stride2` reads.
    unsafe {
        match SW {
            1 => s.load(p),
            2 => s.load_stride2(p),
            _ => s.load_strided(p, stride),
        }
    }
}

/// One tap into one accumulator: `acc += w·x` over the lanes the tap reads.
/// `EDGE` loads and accumulates only the lanes of `m`.
///
/// # Safety
/// `EDGE`: `p[stride·j]` is readable for each lane `j` of `m`; otherwise for
/// every lane.
#[inline(always)]
pub(super) unsafe fn load_tap<S: Simd, const SW: usize, const EDGE: bool>(
    s: S,
    p: *const f32,
    stride: usize,
    m: S::M,
) -> S::V {
    // SAFETY: forwarded contract.
    unsafe {
        if EDGE {
            s.load_masked(p, stride, m)
        } else {
            load_interior::<S, SW>(s, p, stride)
        }
    }
}

/// `acc + w·x`, on the lanes of `m` only for `EDGE`.
#[inline(always)]
pub(super) fn fma_tap<S: Simd, const EDGE: bool>(
    s: S,
    w: S::V,
    x: S::V,
    acc: S::V,
    m: S::M,
) -> S::V {
    if EDGE {
        s.fma_masked(w, x, acc, m)
    } else {
        s.fma(w, x, acc)
    }
}

/// `p`, hidden from the optimiser so that it keeps a running row pointer
/// instead of rebuilding every row's address from spilled products.
#[inline(always)]
pub(super) fn opaque(p: *const f32) -> *const f32 {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let mut addr = p.addr();
        // SAFETY: an empty asm block that only passes an integer through a
        // register: no memory access, no stack use, no other effect.
        unsafe {
            core::arch::asm!("/* {0} */", inout(reg) addr, options(pure, nomem, nostack, preserves_flags))
        };
        // The same address, with `p`'s provenance.
        p.with_addr(addr)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    p
}

/// Adds the bias, applies the activation and stores the first `t.rows` rows
/// of a tile.
///
/// # Safety
/// `out` points at the unit's `KB` output planes.
#[inline(always)]
pub(super) unsafe fn store_tile<S: Simd, const KB: usize, const RB: usize>(
    s: S,
    geo: &Geo,
    t: &TileAt<'_>,
    acc: &[[S::V; RB]; KB],
    bias: Option<&[f32; KB]>,
    out: *mut f32,
) {
    for (kk, acc) in acc.iter().enumerate() {
        for (i, &a) in acc.iter().enumerate().take(t.rows) {
            let mut v = a;
            if let Some(b) = bias {
                v = s.add(v, s.splat(b[kk]));
            }
            if let Some((lo, hi)) = geo.clamp {
                v = s.clamp(v, s.splat(lo), s.splat(hi));
            }
            let at = kk * geo.out_plane + (t.oh0 + i) * geo.out_w + t.cv.ow0;
            // SAFETY: channel kk < KB of the unit's planes, row oh0 + i <
            // out_h, lanes ow0..ow0 + lanes ≤ out_w: inside `out` (contract).
            unsafe { s.store(out.add(at), v, t.cv.lanes) };
        }
    }
}
