//! Fuzzes `cpuconv::gemm::sgemm` over arbitrary views.
//!
//! The input decodes into a `GemmInput`: m, k, n (small most of the time,
//! sometimes past the blocking), three views (row/column major, padded,
//! transposed through `MatRef::t`, or any strides: negative, zero,
//! overlapping, extreme), each with an offset and a slice length that
//! usually fit and sometimes do not, α and β (specials included), the
//! backend, ISA and threading, and the data.
//!
//! Oracles, beyond "no call panics":
//! * `sgemm` returns `Ok` exactly when an independent model says the call is
//!   valid: shapes agree, every element of every non-empty view lies in its
//!   slice (i128 arithmetic), and C maps no two elements to one place (a
//!   bitmap over C's slice).
//! * On `Ok`, elements of C's slice outside the view are untouched (bit for
//!   bit), and every element of the view is within `2·(k+3)·ε·(|α|·Σ|a·b| +
//!   |β·c|)` of an f64 triple loop, wherever that is finite.
//! * BLAS semantics: with β = 0, C's slice is all NaN beforehand and must
//!   not leak; with α = 0 or k = 0, A and B are not read, so NaN there must
//!   not leak either.
#![no_main]

mod common;

use arbitrary::{Arbitrary, Unstructured};
use common::*;
use cpuconv::gemm::{sgemm, GemmOptions, MatMut, MatRef};
use cpuconv::{GemmBackend, GemmError, Isa, Parallelism};
use libfuzzer_sys::fuzz_target;

/// The most elements any slice has.
const MAX_LEN: usize = 1 << 20;
/// The most multiply-adds (`m·k·n`) a case may take.
const MAX_WORK: u128 = 1 << 22;

/// m, k or n: 192/256 in `0..=12`, 48/256 in `1..=100`, 16/256 in
/// `100..=1100` (past MC, KC and NC).
#[derive(Clone, Copy, PartialEq, Eq)]
struct GDim(usize);

impl std::fmt::Debug for GDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'a> Arbitrary<'a> for GDim {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let tag = u8::arbitrary(u)?;
        Ok(GDim(match tag {
            0..=191 => tag as usize % 13,
            192..=239 => 1 + u8::arbitrary(u)? as usize % 100,
            _ => 100 + u16::arbitrary(u)? as usize % 1001,
        }))
    }
}

/// How a view's rows and columns differ from what the call needs: nearly
/// always not at all.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Delta(i64);

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:+}", self.0)
    }
}

impl<'a> Arbitrary<'a> for Delta {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Delta(match u8::arbitrary(u)? {
            0..=243 => 0,
            t => [-2, -1, 1, 2][t as usize % 4],
        }))
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Layout {
    RowMajor,
    ColMajor,
    /// Leading dimension `cols + pad` (row major) or `rows + pad`.
    Padded {
        row_major: bool,
        pad: u8,
    },
    /// Any strides: negative, zero, overlapping, extreme.
    Strides(Stride, Stride),
}

/// Where element (0, 0) sits.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum OffsetSel {
    /// The smallest offset that keeps negative strides in bounds.
    Fit,
    /// That plus a few.
    FitPlus(u8),
    /// One too small (when the fit is not 0).
    FitMinus1,
    /// Any, extremes included.
    Raw(Val<0, 16, 255>),
}

/// The slice's length relative to what the view needs.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum SliceLen {
    Exact,
    Minus1,
    Plus(u8),
    Zero,
    Small(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct ViewSpec {
    layout: Layout,
    /// A and B: build the transposed view and take `.t()` of it.
    transposed: bool,
    rows_delta: Delta,
    cols_delta: Delta,
    offset: OffsetSel,
    len: SliceLen,
    /// Use `new` (offset 0) rather than `with_offset` when the offset is 0.
    use_new: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mat {
    A,
    B,
    C,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ParSel {
    Sequential,
    Threaded(ThreadedSel),
}

#[derive(Arbitrary, Debug)]
struct GemmInput {
    m: GDim,
    k: GDim,
    n: GDim,
    a: ViewSpec,
    b: ViewSpec,
    c: ViewSpec,
    alpha: Scalar,
    beta: Scalar,
    matrixmultiply: bool,
    isa: IsaSel,
    parallelism: ParSel,
    seed: u64,
    scale: Scale,
    /// Special values at `index % len` of a slice (at most 4 are used).
    specials: Vec<(Mat, u32, Special)>,
}

// ---------------------------------------------------------------------------
// The library's options, built in one place so API changes touch only this.

fn gemm_options(backend: GemmBackend, parallelism: Parallelism, isa: Option<Isa>) -> GemmOptions {
    GemmOptions::default()
        .backend(backend)
        .parallelism(parallelism)
        .isa(isa)
}

// ---------------------------------------------------------------------------

/// A view as the call sees it (after any transpose): element `(i, j)` at
/// `offset + i·rs + j·cs` of a slice of `len`.
#[derive(Clone, Copy, Debug)]
struct View {
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    offset: usize,
    len: usize,
    /// Built as the transpose of a `cols × rows` view.
    transposed: bool,
    use_new: bool,
}

impl View {
    fn empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// Lowest and highest offset relative to (0, 0), or `None` if empty.
    fn span(&self) -> Option<(i128, i128)> {
        if self.empty() {
            return None;
        }
        let r = (self.rows as i128 - 1) * self.rs as i128;
        let c = (self.cols as i128 - 1) * self.cs as i128;
        Some((r.min(0) + c.min(0), r.max(0) + c.max(0)))
    }

    fn in_bounds(&self) -> bool {
        match self.span() {
            None => true,
            Some((lo, hi)) => {
                let o = self.offset as i128;
                o + lo >= 0 && o + hi < self.len as i128
            }
        }
    }

    fn at(&self, i: usize, j: usize) -> usize {
        (self.offset as i128 + i as i128 * self.rs as i128 + j as i128 * self.cs as i128) as usize
    }

    fn mat_ref<'a>(&self, data: &'a [f32]) -> MatRef<'a> {
        let (r, c, rs, cs) = if self.transposed {
            (self.cols, self.rows, self.cs, self.rs)
        } else {
            (self.rows, self.cols, self.rs, self.cs)
        };
        let v = if self.use_new && self.offset == 0 {
            MatRef::new(data, r, c, rs, cs)
        } else {
            MatRef::with_offset(data, self.offset, r, c, rs, cs)
        };
        if self.transposed {
            v.t()
        } else {
            v
        }
    }

    fn mat_mut<'a>(&self, data: &'a mut [f32]) -> MatMut<'a> {
        if self.use_new && self.offset == 0 {
            MatMut::new(data, self.rows, self.cols, self.rs, self.cs)
        } else {
            MatMut::with_offset(data, self.offset, self.rows, self.cols, self.rs, self.cs)
        }
    }
}

/// Lays out a `rows × cols` view (C: never transposed).
fn make_view(
    spec: &ViewSpec,
    rows: usize,
    cols: usize,
    allow_transpose: bool,
    rng: &mut Rng,
) -> View {
    let adjust = |v: usize, d: Delta| (v as i64 + d.0).max(0) as usize;
    let (rows, cols) = (adjust(rows, spec.rows_delta), adjust(cols, spec.cols_delta));
    let transposed = allow_transpose && spec.transposed;
    // Strides of the stored matrix: `cols × rows` when transposed.
    let (sr, sc) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let (srs, scs) = match spec.layout {
        Layout::RowMajor => (sc as isize, 1),
        Layout::ColMajor => (1, sr as isize),
        Layout::Padded { row_major, pad } => {
            let pad = (pad % 8) as usize;
            if row_major {
                ((sc + pad) as isize, 1)
            } else {
                (1, (sr + pad) as isize)
            }
        }
        Layout::Strides(rs, cs) => (rs.0, cs.0),
    };
    let (rs, cs) = if transposed { (scs, srs) } else { (srs, scs) };
    let mut v = View {
        rows,
        cols,
        rs,
        cs,
        offset: 0,
        len: 0,
        transposed,
        use_new: spec.use_new,
    };
    let small = |x: u8| x as usize % 64;
    let Some((lo, hi)) = v.span() else {
        // Empty: nothing is read, any offset and length go.
        v.offset = match spec.offset {
            OffsetSel::Raw(o) => o.0,
            _ => (rng.next_u64() % 8) as usize,
        };
        v.len = match spec.len {
            SliceLen::Small(x) | SliceLen::Plus(x) => small(x),
            _ => 0,
        };
        return v;
    };
    let fit = -lo;
    let offset: i128 = match spec.offset {
        OffsetSel::Fit => fit,
        OffsetSel::FitPlus(x) => fit + x as i128,
        OffsetSel::FitMinus1 => (fit - 1).max(0),
        OffsetSel::Raw(o) => o.0 as i128,
    };
    let needed = offset + hi + 1;
    if offset <= MAX_LEN as i128 && needed <= MAX_LEN as i128 {
        v.offset = offset as usize;
        v.len = match spec.len {
            SliceLen::Exact => needed as usize,
            SliceLen::Minus1 => needed as usize - 1,
            SliceLen::Plus(x) => needed as usize + x as usize % 16,
            SliceLen::Zero => 0,
            SliceLen::Small(x) => small(x),
        };
    } else {
        // Too big to allocate: a small slice, so the call must refuse.
        v.offset = offset.clamp(0, usize::MAX as i128) as usize;
        v.len = match spec.len {
            SliceLen::Small(x) | SliceLen::Plus(x) => small(x),
            _ => 1,
        };
    }
    v
}

/// Whether C maps no two elements of a non-empty in-bounds view to one place.
fn injective(c: &View) -> bool {
    let mut seen = vec![false; c.len];
    for i in 0..c.rows {
        for j in 0..c.cols {
            let at = c.at(i, j);
            if std::mem::replace(&mut seen[at], true) {
                return false;
            }
        }
    }
    true
}

fuzz_target!(|inp: GemmInput| run(&inp));

fn run(inp: &GemmInput) {
    init_pool();
    let (m, k, n) = (inp.m.0, inp.k.0, inp.n.0);
    if m as u128 * k as u128 * n as u128 > MAX_WORK {
        return;
    }
    let mut rng = Rng::new(inp.seed);
    let av = make_view(&inp.a, m, k, true, &mut rng);
    let bv = make_view(&inp.b, k, n, true, &mut rng);
    let cv = make_view(&inp.c, m, n, false, &mut rng);
    let (alpha, beta) = (inp.alpha.0, inp.beta.0);

    // Data.
    let scale = inp.scale.factor();
    let mut a = vec![0.0f32; av.len];
    let mut b = vec![0.0f32; bv.len];
    let mut c = vec![f32::NAN; cv.len];
    rng.fill(&mut a, scale);
    rng.fill(&mut b, scale);
    if beta != 0.0 {
        rng.fill(&mut c, scale);
    }
    if alpha == 0.0 {
        // Never read.
        a.fill(f32::NAN);
        b.fill(f32::NAN);
    }
    for &(mat, at, special) in inp.specials.iter().take(4) {
        let dst = match mat {
            Mat::A => &mut a,
            Mat::B => &mut b,
            Mat::C => &mut c,
        };
        if !dst.is_empty() {
            let i = at as usize % dst.len();
            dst[i] = special.value();
        }
    }
    let c_before = c.clone();

    // What the call must do.
    let shapes_agree = av.cols == bv.rows && cv.rows == av.rows && cv.cols == bv.cols;
    let (m, k, n) = (av.rows, av.cols, bv.cols);
    let valid = shapes_agree
        && av.in_bounds()
        && bv.in_bounds()
        && cv.in_bounds()
        && (cv.empty() || injective(&cv));

    let backend = if inp.matrixmultiply {
        GemmBackend::Matrixmultiply
    } else {
        GemmBackend::Native
    };
    let parallelism = match inp.parallelism {
        ParSel::Sequential => Parallelism::Sequential,
        ParSel::Threaded(t) => t.get(),
    };
    let options = gemm_options(backend, parallelism, inp.isa.get());
    let result = sgemm(
        alpha,
        av.mat_ref(&a),
        bv.mat_ref(&b),
        beta,
        cv.mat_mut(&mut c),
        &options,
    );
    let describe =
        || format!("sgemm(α = {alpha:?}, A {av:?}, B {bv:?}, β = {beta:?}, C {cv:?}, {options:?})");
    match (&result, valid) {
        (Ok(()), true) => {}
        (Err(_), false) => return,
        (Ok(()), false) => panic!(
            "{} returned Ok, but the model says it must be refused (shapes agree: {shapes_agree}, \
             in bounds: A {} B {} C {})",
            describe(),
            av.in_bounds(),
            bv.in_bounds(),
            cv.in_bounds()
        ),
        (Err(e), true) => panic!("{} refused a valid call: {e:?}", describe()),
    }
    let _: &Result<(), GemmError> = &result;

    // Nothing outside C's view changed.
    let mut in_view = vec![false; c.len()];
    for i in 0..cv.rows {
        for j in 0..cv.cols {
            in_view[cv.at(i, j)] = true;
        }
    }
    for (idx, ((&now, &was), &inside)) in c.iter().zip(&c_before).zip(&in_view).enumerate() {
        if !inside && now.to_bits() != was.to_bits() {
            panic!(
                "{} wrote c[{idx}] = {now:?} (was {was:?}), outside C's view",
                describe()
            );
        }
    }

    // Every element of the view against an f64 triple loop.
    if !alpha.is_finite() || !beta.is_finite() {
        return;
    }
    let reads_ab = alpha != 0.0 && k > 0;
    let terms = (k + 3) as f64;
    for i in 0..m {
        for j in 0..n {
            let (mut ab, mut mag) = (0.0f64, 0.0f64);
            let mut finite = true;
            if reads_ab {
                for p in 0..k {
                    let (x, y) = (a[av.at(i, p)], b[bv.at(p, j)]);
                    finite &= x.is_finite() && y.is_finite();
                    let t = x as f64 * y as f64;
                    ab += t;
                    mag += t.abs();
                }
            }
            let old = c_before[cv.at(i, j)];
            let (cterm, cmag) = if beta != 0.0 {
                finite &= old.is_finite();
                (beta as f64 * old as f64, (beta as f64 * old as f64).abs())
            } else {
                (0.0, 0.0)
            };
            // A·B is summed in f32 before α scales it, so it may overflow
            // even where α·A·B would not.
            let ab_mag = mag;
            let mag = alpha.abs() as f64 * mag + cmag;
            if !finite || mag > 1e36 || ab_mag > 1e36 {
                continue;
            }
            let want = alpha as f64 * ab + cterm;
            let tol = 2.0 * terms * f32::EPSILON as f64 * mag
                + terms * f32::MIN_POSITIVE as f64 * (1.0 + alpha.abs() as f64);
            let got = c[cv.at(i, j)];
            if !close(got, want, tol) {
                panic!(
                    "{} gives C[{i}, {j}] = {got:e}, the f64 reference {want:e} (tolerance \
                     {tol:e}; C before {old:e}; m, k, n = {m}, {k}, {n})",
                    describe()
                );
            }
        }
    }
}
