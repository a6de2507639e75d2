//! Property test: `gemm::sgemm` (and `sgemm_raw` for negative strides) against
//! a naive triple loop accumulated in f64, over random shapes, layouts, α and
//! β, on every ISA this CPU supports, both backends, and both threading modes.
//!
//! Error bound. For element (i, j), with `M = |α|·Σ_p |a_ip·b_pj| + |β·c_ij|`,
//! an f32 dot product of length k is within `k·ε·Σ|ab|` of the exact one, the
//! scaling by α and the update with β·c add at most two more roundings, so
//!
//! ```text
//! |got − want| ≤ 2·(k + 2)·ε·M + 1e-6        (ε = f32::EPSILON)
//! ```
//!
//! (at least the `2·k·ε·Σ|a·b| + |β|·ε·|c| + 1e-6` of a textbook analysis,
//! with the factor 2 as slack for the reference's own rounding).

mod common;

use common::{
    column_block, engine_combos, isa_tiles_under_test, kernel_info_for_call, proptest_cases,
    sequential_blocks, single_mc_block_columns, tiled_columns, tiles_under_test, with_blocking,
    AOperand, BlockCounts, GemmCall, Rng,
};
use cpuconv::gemm::kernels::{kernel_info, kernel_info_for_operands, kernel_info_for_shape};
use cpuconv::gemm::{sgemm, sgemm_raw, GemmOptions, MatMut, MatRef};
use cpuconv::testing::{isas_under_test, traced, Blocking, KernelTrace};
use cpuconv::{GemmBackend, GemmError, Isa, Parallelism};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use rayon::prelude::*;
use std::cell::Cell;
use std::num::NonZeroUsize;

/// Value of every element of a buffer that lies outside the matrix view; the
/// GEMM must leave them bit-for-bit alone.
const SENTINEL: f32 = -12345.678;

/// How a `rows × cols` matrix sits in its buffer.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Consecutive columns (row-major) or consecutive rows (column-major) are
    /// `inner` apart.
    row_major: bool,
    /// Stride along the contiguous axis: 1, or 2–3 for gaps between elements.
    inner: usize,
    /// Extra elements between the end of one row (column) and the next.
    pad: usize,
    /// Store the transpose and view it through `MatRef::t()` (A and B only).
    transposed: bool,
    /// Reverse the rows / the columns: negative strides (these go through
    /// `sgemm_raw`, since a safe view starts at `data[0]` and can only grow
    /// upwards).
    neg_rows: bool,
    neg_cols: bool,
    /// Extra elements after the last one.
    slack: usize,
}

impl Layout {
    const DENSE: Layout = Layout {
        row_major: true,
        inner: 1,
        pad: 0,
        transposed: false,
        neg_rows: false,
        neg_cols: false,
        slack: 0,
    };
}

/// A matrix in a buffer: element (i, j) at `origin + i·rs + j·cs`.
#[derive(Clone, Debug)]
struct Stored {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    origin: usize,
    layout: Layout,
}

impl Stored {
    /// Lays out a `rows × cols` matrix; the view gets `value(i, j)`, the rest
    /// of the buffer [`SENTINEL`].
    fn new(
        rows: usize,
        cols: usize,
        layout: Layout,
        mut value: impl FnMut(usize, usize) -> f32,
    ) -> Stored {
        // The storage shape: the transpose when viewed through `t()`.
        let (sr, sc) = if layout.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        // Outer stride at least 1 so that an empty axis never yields a zero
        // stride (zero-size views are covered by their own tests).
        let (srs, scs) = if layout.row_major {
            ((sc * layout.inner + layout.pad).max(1), layout.inner)
        } else {
            (layout.inner, (sr * layout.inner + layout.pad).max(1))
        };
        let (rs, cs) = if layout.transposed {
            (scs, srs)
        } else {
            (srs, scs)
        };
        let span = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        };
        let origin = if rows == 0 || cols == 0 {
            0
        } else {
            usize::from(layout.neg_rows) * (rows - 1) * rs
                + usize::from(layout.neg_cols) * (cols - 1) * cs
        };
        let rs = if layout.neg_rows {
            -(rs as isize)
        } else {
            rs as isize
        };
        let cs = if layout.neg_cols {
            -(cs as isize)
        } else {
            cs as isize
        };
        let mut s = Stored {
            data: vec![SENTINEL; span + layout.slack],
            rows,
            cols,
            rs,
            cs,
            origin,
            layout,
        };
        for i in 0..rows {
            for j in 0..cols {
                let o = s.offset(i, j);
                s.data[o] = value(i, j);
            }
        }
        s
    }

    fn offset(&self, i: usize, j: usize) -> usize {
        (self.origin as isize + i as isize * self.rs + j as isize * self.cs) as usize
    }

    fn get(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset(i, j)]
    }

    fn negative(&self) -> bool {
        self.rs < 0 || self.cs < 0
    }

    /// The safe view; negative strides place element (0, 0) at `origin`.
    fn view(&self) -> MatRef<'_> {
        if self.layout.transposed {
            MatRef::with_offset(
                &self.data,
                self.origin,
                self.cols,
                self.rows,
                self.cs,
                self.rs,
            )
            .t()
        } else {
            MatRef::with_offset(
                &self.data,
                self.origin,
                self.rows,
                self.cols,
                self.rs,
                self.cs,
            )
        }
    }

    fn view_mut(&mut self) -> MatMut<'_> {
        assert!(!self.layout.transposed);
        MatMut::with_offset(
            &mut self.data,
            self.origin,
            self.rows,
            self.cols,
            self.rs,
            self.cs,
        )
    }

    /// Pointer to element (0, 0), for `sgemm_raw`.
    fn ptr(&self) -> *const f32 {
        self.data.as_ptr().wrapping_add(self.origin)
    }

    /// Every buffer index inside the view.
    fn in_view(&self) -> Vec<bool> {
        let mut v = vec![false; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                v[self.offset(i, j)] = true;
            }
        }
        v
    }
}

/// `C ← α·A·B + β·C`: the safe entry point, or, for half of the
/// negative-stride cases (odd row count of C), `sgemm_raw`, so both entry
/// points see reversed views.
fn run_gemm(
    alpha: f32,
    a: &Stored,
    b: &Stored,
    beta: f32,
    c: &mut Stored,
    options: &GemmOptions,
) -> Result<(), GemmError> {
    if (a.negative() || b.negative() || c.negative()) && c.rows % 2 == 1 {
        assert_eq!((a.cols, c.rows, c.cols), (b.rows, a.rows, b.cols));
        let cp = c.data.as_mut_ptr().wrapping_add(c.origin);
        // SAFETY: every (i, p), (p, j) and (i, j) offset from the origins lies
        // in its buffer (by construction of `Stored`); C is injective (outer
        // stride ≥ inner stride · extent, whatever the signs) and a separate
        // allocation.
        unsafe {
            sgemm_raw(
                a.rows,
                a.cols,
                b.cols,
                alpha,
                a.ptr(),
                a.rs,
                a.cs,
                b.ptr(),
                b.rs,
                b.cs,
                beta,
                cp,
                c.rs,
                c.cs,
                options,
            );
        }
        Ok(())
    } else {
        let (av, bv) = (a.view(), b.view());
        sgemm(alpha, av, bv, beta, c.view_mut(), options)
    }
}

/// Naive f64 product: per element of C, `(α·Σ a·b + β·c, |α|·Σ|a·b| + |β·c|)`,
/// row-major `m × n`. With `β = 0`, C is not read (it may hold NaN).
fn naive(alpha: f32, a: &Stored, b: &Stored, beta: f32, c: &Stored) -> (Vec<f64>, Vec<f64>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut sum = vec![0.0f64; m * n];
    let mut mag = vec![0.0f64; m * n];
    let bd: Vec<f64> = (0..k)
        .flat_map(|p| (0..n).map(move |j| (p, j)))
        .map(|(p, j)| b.get(p, j) as f64)
        .collect();
    for i in 0..m {
        let (srow, mrow) = (&mut sum[i * n..][..n], &mut mag[i * n..][..n]);
        for p in 0..k {
            let aip = a.get(i, p) as f64;
            let brow = &bd[p * n..][..n];
            for j in 0..n {
                let t = aip * brow[j];
                srow[j] += t;
                mrow[j] += t.abs();
            }
        }
    }
    let (alpha, beta) = (alpha as f64, beta as f64);
    for i in 0..m {
        for j in 0..n {
            let idx = i * n + j;
            let cterm = if beta == 0.0 {
                0.0
            } else {
                beta * c.get(i, j) as f64
            };
            sum[idx] = alpha * sum[idx] + cterm;
            mag[idx] = alpha.abs() * mag[idx] + cterm.abs();
        }
    }
    (sum, mag)
}

fn tolerance(k: usize, magnitude: f64) -> f64 {
    2.0 * (k + 2) as f64 * f32::EPSILON as f64 * magnitude + 1e-6
}

/// Checks every element of the view against the reference and every element
/// outside it against the sentinel.
fn check_c(
    what: &str,
    got: &Stored,
    k: usize,
    want: &[f64],
    magnitude: &[f64],
    in_view: &[bool],
) -> Result<(), TestCaseError> {
    let n = got.cols;
    for i in 0..got.rows {
        for j in 0..n {
            let v = got.get(i, j);
            let (w, tol) = (want[i * n + j], tolerance(k, magnitude[i * n + j]));
            prop_assert!(
                (v as f64 - w).abs() <= tol,
                "{}: C[{}][{}] = {}, want {} (±{})",
                what,
                i,
                j,
                v,
                w,
                tol
            );
        }
    }
    for (idx, (&x, &inside)) in got.data.iter().zip(in_view).enumerate() {
        if !inside {
            prop_assert_eq!(
                x.to_bits(),
                SENTINEL.to_bits(),
                "{}: buffer element {} outside the view was written ({})",
                what,
                idx,
                x
            );
        }
    }
    Ok(())
}

// --- strategies -------------------------------------------------------------------------

/// Matrix sizes: mostly small, often near a multiple of 16 (register tiles
/// are 8/16/32 wide; 192 and 256 are cache-block depths), sometimes 180–300.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=40,
        2 => (1usize..=16, -1isize..=1).prop_map(|(q, d)| (q as isize * 16 + d) as usize),
        1 => 180usize..=300,
    ]
}

fn scalar() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5), -2.0f32..2.0]
}

/// Layouts for A and B: any order, gaps, transposed views, reversed axes.
fn ab_layout() -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        prop_oneof![3 => Just(1usize), 1 => 2usize..=3],
        prop_oneof![1 => Just(0usize), 1 => 1usize..=3],
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
        0usize..=2,
    )
        .prop_map(
            |(row_major, inner, pad, transposed, neg_rows, neg_cols, slack)| Layout {
                row_major,
                inner,
                pad,
                transposed,
                neg_rows,
                neg_cols,
                slack,
            },
        )
}

/// Layouts for C: row- or column-major, gaps, now and then reversed axes.
fn c_layout() -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        prop_oneof![3 => Just(1usize), 1 => 2usize..=3],
        prop_oneof![1 => Just(0usize), 1 => 1usize..=3],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        0usize..=2,
    )
        .prop_map(
            |(row_major, inner, pad, neg_rows, neg_cols, slack)| Layout {
                row_major,
                inner,
                pad,
                neg_rows,
                neg_cols,
                slack,
                ..Layout::DENSE
            },
        )
}

#[derive(Clone, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    a: Layout,
    b: Layout,
    c: Layout,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (dim(), dim(), dim()),
        (scalar(), scalar()),
        (ab_layout(), ab_layout(), c_layout()),
        any::<u64>(),
    )
        .prop_map(|((m, k, n), (alpha, beta), (a, b, c), seed)| Case {
            m,
            k,
            n,
            alpha,
            beta,
            a,
            b,
            c,
            seed,
        })
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let (m, k, n) = (case.m, case.k, case.n);
    let mut rng = Rng::new(case.seed);
    let a = Stored::new(m, k, case.a, |_, _| rng.next_f32());
    let b = Stored::new(k, n, case.b, |_, _| rng.next_f32());
    // β = 0: C must not be read, so fill it with NaN.
    let beta_zero = case.beta == 0.0;
    let c0 = Stored::new(m, n, case.c, |_, _| {
        if beta_zero {
            f32::NAN
        } else {
            rng.next_f32()
        }
    });
    let (want, magnitude) = naive(case.alpha, &a, &b, case.beta, &c0);
    let in_view = c0.in_view();
    let runs = engine_combos()
        .into_iter()
        .flat_map(|(isa, backend, parallelism)| {
            let tiles = match backend {
                GemmBackend::Native => tiles_under_test(isa),
                _ => vec![None],
            };
            tiles
                .into_iter()
                .map(move |wide| (isa, backend, parallelism, wide))
        });
    for (isa, backend, parallelism, wide) in runs {
        let options = GemmOptions::default()
            .backend(backend)
            .parallelism(parallelism)
            .isa(Some(isa))
            .wide_tile(wide);
        let mut c = c0.clone();
        let (result, trace) = traced(|| run_gemm(case.alpha, &a, &b, case.beta, &mut c, &options));
        result.map_err(|e| TestCaseError::fail(format!("{options:?}: {e}")))?;
        // Evidence is per thread: only a sequential call runs every block here.
        let computes = m > 0 && n > 0 && k > 0 && case.alpha != 0.0;
        if backend == GemmBackend::Native && parallelism == Parallelism::Sequential && computes {
            prop_assert!(
                trace.gemm_ran_on(isa),
                "{:?}: no {} block ran",
                options,
                isa
            );
        }
        check_c(&format!("{options:?}"), &c, k, &want, &magnitude, &in_view)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: proptest_cases(512),
        // Failing seeds go to tests/gemm_vs_naive.proptest-regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn sgemm_matches_naive(case in case_strategy()) {
        run_case(&case)?;
    }
}

// --- forced small blocking: every cache-block edge ---------------------------------------

/// Sizes up to 100 for problems run with a forced blocking of 8–24 rows or
/// depth and 32–96 columns: below one block (the single-MC path, one K
/// block), between, and past several, often one off a multiple of 8 (the
/// block sizes are multiples of 8; the register tiles 6, 8, 16 or 32 wide).
fn blocked_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 1usize..=24,
        3 => 25usize..=100,
        2 => (1usize..=12, -1isize..=1).prop_map(|(q, d)| (q as isize * 8 + d) as usize),
    ]
}

/// The forced blocking, drawn per case. MC and NC are rounded up to whole
/// register tiles (MC 8 → 12 on the 6-row kernels), KC to a multiple of 8.
fn small_blocking() -> impl Strategy<Value = Blocking> {
    (
        prop::sample::select(vec![8usize, 16, 24]),
        prop::sample::select(vec![8usize, 16, 24]),
        prop::sample::select(vec![32usize, 64, 96]),
    )
        .prop_map(|(mc, kc, nc)| Blocking { mc, kc, nc })
}

fn blocked_case_strategy() -> impl Strategy<Value = (Case, Blocking)> {
    (
        (blocked_dim(), blocked_dim(), blocked_dim()),
        (scalar(), scalar()),
        (ab_layout(), ab_layout(), c_layout()),
        any::<u64>(),
        small_blocking(),
    )
        .prop_map(|((m, k, n), (alpha, beta), (a, b, c), seed, blocking)| {
            (
                Case {
                    m,
                    k,
                    n,
                    alpha,
                    beta,
                    a,
                    b,
                    c,
                    seed,
                },
                blocking,
            )
        })
}

/// The GEMM the driver runs for `C ← α·A·B + β·C` on these operands: a C
/// with unit row stride and any other column stride is computed as
/// `Cᵀ = Bᵀ·Aᵀ` (the kernels store rows of C), so rows and columns swap and
/// Bᵀ becomes A.
fn driver_call(alpha: f32, a: &Stored, b: &Stored, c: &Stored) -> GemmCall {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let transposed = c.cs != 1 && c.rs == 1;
    let (m, n, a) = if transposed {
        (n, m, AOperand::Strided { rs: b.cs, cs: b.rs })
    } else {
        (m, n, AOperand::Strided { rs: a.rs, cs: a.cs })
    };
    GemmCall {
        m,
        k,
        n,
        alpha_nonzero: alpha != 0.0,
        a,
        b_strided: true,
    }
}

/// How many (case, ISA) runs crossed each edge, to show the strategy is not
/// vacuous.
#[derive(Clone, Copy, Debug, Default)]
struct EdgeStats {
    runs: u32,
    kc: u32,
    mc: u32,
    nc: u32,
    all: u32,
}

/// Runs the case sequentially on the native engine of every ISA under test
/// with `blocking` forced, checks C against the naive product, and checks
/// that the blocks that ran on this thread are exactly those the driver's
/// loop nest must run ([`sequential_blocks`]), all on the forced ISA: in
/// particular a KC edge is crossed iff k > KC, an MC edge iff the rows
/// exceed MC, and an NC edge iff the columns the tiles cover exceed the
/// column block of the path taken.
fn run_blocked_case(
    case: &Case,
    blocking: Blocking,
    stats: &Cell<EdgeStats>,
) -> Result<(), TestCaseError> {
    let (m, k, n) = (case.m, case.k, case.n);
    let mut rng = Rng::new(case.seed);
    let a = Stored::new(m, k, case.a, |_, _| rng.next_f32());
    let b = Stored::new(k, n, case.b, |_, _| rng.next_f32());
    let beta_zero = case.beta == 0.0;
    let c0 = Stored::new(m, n, case.c, |_, _| {
        if beta_zero {
            f32::NAN
        } else {
            rng.next_f32()
        }
    });
    let (want, magnitude) = naive(case.alpha, &a, &b, case.beta, &c0);
    let in_view = c0.in_view();
    let call = driver_call(case.alpha, &a, &b, &c0);
    for (isa, wide) in isa_tiles_under_test() {
        let options = GemmOptions::default()
            .backend(GemmBackend::Native)
            .parallelism(Parallelism::Sequential)
            .isa(isa)
            .blocking(blocking)
            .wide_tile(wide);
        let mut c = c0.clone();
        let (result, trace) = traced(|| run_gemm(case.alpha, &a, &b, case.beta, &mut c, &options));
        result.map_err(|e| TestCaseError::fail(format!("{options:?}: {e}")))?;
        check_c(&format!("{options:?}"), &c, k, &want, &magnitude, &in_view)?;

        let info = with_blocking(kernel_info_for_call(isa, wide, &call), blocking);
        let expected = sequential_blocks(&info, &call);
        let got = BlockCounts::of_trace(&trace, isa);
        let what = format!("{isa} {info:?} {call:?}: trace {trace:?}");
        if expected.blocks > 0 {
            prop_assert!(trace.gemm_ran_on(isa), "no {} block ran: {}", isa, what);
            // The plain statements first, for a readable failure.
            prop_assert_eq!(got.kc_edges > 0, k > info.kc, "KC edge: {}", what);
            prop_assert_eq!(got.mc_edges > 0, call.m > info.mc, "MC edge: {}", what);
            prop_assert_eq!(
                got.nc_edges > 0,
                tiled_columns(&info, &call) > column_block(&info, &call),
                "NC edge: {}",
                what
            );
        }
        for other in Isa::ALL.into_iter().filter(|&o| o != isa) {
            prop_assert!(!trace.gemm_ran_on(other), "{} ran: {}", other, what);
        }
        prop_assert_eq!(got, expected, "{}", what);

        let mut s = stats.get();
        s.runs += 1;
        s.kc += u32::from(got.kc_edges > 0);
        s.mc += u32::from(got.mc_edges > 0);
        s.nc += u32::from(got.nc_edges > 0);
        s.all += u32::from(got.kc_edges > 0 && got.mc_edges > 0 && got.nc_edges > 0);
        stats.set(s);
    }
    Ok(())
}

#[test]
fn sgemm_with_small_blocks_crosses_every_edge() {
    let cases = proptest_cases(512);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    });
    let stats = Cell::new(EdgeStats::default());
    if let Err(e) = runner.run(&blocked_case_strategy(), |(case, blocking)| {
        run_blocked_case(&case, blocking, &stats)
    }) {
        panic!("{e}");
    }
    let s = stats.get();
    println!("runs crossing edges: {s:?}");
    // Measured over 4096 cases: KC and MC edges in about 58% of the runs,
    // NC in 23%, all three at once in 14%. Floors of 1/8 (1/16 for all
    // three) sit at least five standard deviations below at 512 cases and
    // catch a strategy or a blocking override that stopped working.
    if cases >= 256 {
        for (edge, count, floor) in [
            ("KC", s.kc, 8),
            ("MC", s.mc, 8),
            ("NC", s.nc, 8),
            ("all three", s.all, 16),
        ] {
            assert!(
                count * floor >= s.runs,
                "only {count} of {} runs crossed {edge}: {s:?}",
                s.runs
            );
        }
    }
}

/// One call that crosses a KC, an MC and an NC edge at once on every ISA,
/// with β ≠ 0 (only the first K block may apply β) and with β = 0 over a
/// NaN C, row-major and column-major (computed transposed) C, checked
/// value by value and block by block.
#[test]
fn one_call_crosses_kc_mc_and_nc_edges() {
    let blocking = Blocking {
        mc: 16,
        kc: 16,
        nc: 32,
    };
    // 68 rows: five MC blocks, the last of 4 rows (a partial register
    // tile); depth 41: three K blocks (16, 16 and 9); 100 columns: four NC
    // blocks, the last of 4 columns (100 % 16 = 4: AVX-512 peels nothing).
    // A column-major C is computed as Cᵀ, 100 × 68: the same edges, its 68
    // columns (68 % 16 = 4, no peel either) more than one block of even
    // the 48-wide tile.
    let (m, k, n) = (68, 41, 100);
    let col_major = Layout {
        row_major: false,
        ..Layout::DENSE
    };
    for (c_layout, beta) in [
        (Layout::DENSE, -0.5f32),
        (Layout::DENSE, 0.0),
        (col_major, 1.25),
        (col_major, 0.0),
    ] {
        let mut rng = Rng::new(31);
        let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, c_layout, |_, _| {
            if beta == 0.0 {
                f32::NAN
            } else {
                rng.next_f32()
            }
        });
        let (want, magnitude) = naive(0.75, &a, &b, beta, &c0);
        let call = driver_call(0.75, &a, &b, &c0);
        for isa in isas_under_test() {
            let options = GemmOptions::default()
                .parallelism(Parallelism::Sequential)
                .isa(isa)
                .blocking(blocking);
            let mut c = c0.clone();
            let (result, trace): (_, KernelTrace) =
                traced(|| run_gemm(0.75, &a, &b, beta, &mut c, &options));
            result.unwrap();
            let what = format!("{isa} β {beta} {c_layout:?}: {trace:?}");
            check_c(&what, &c, k, &want, &magnitude, &c0.in_view())
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(trace.gemm_ran_on(isa), "{what}");
            assert!(trace.kc_edges > 0, "no KC edge: {what}");
            assert!(trace.mc_edges > 0, "no MC edge: {what}");
            assert!(trace.nc_edges > 0, "no NC edge: {what}");
            let info = with_blocking(kernel_info_for_call(isa, None, &call), blocking);
            assert_eq!(
                BlockCounts::of_trace(&trace, isa),
                sequential_blocks(&info, &call),
                "{what}"
            );
        }
    }
}

/// A problem whose rows fit one MC block takes the single-MC path, whose B
/// blocks are `single_block_columns` wide: with a forced NC that is at most
/// NC, so 100 columns against NC = 32 still cross column-block edges.
#[test]
fn single_mc_block_path_crosses_its_column_blocks() {
    let blocking = Blocking {
        mc: 24,
        kc: 8,
        nc: 32,
    };
    let (m, k, n) = (13, 30, 100);
    let mut rng = Rng::new(5);
    let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
    let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
    let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
    let (want, magnitude) = naive(1.0, &a, &b, 1.0, &c0);
    for isa in isas_under_test() {
        let info = with_blocking(kernel_info_for_operands(isa, m, n, false), blocking);
        assert!(m <= info.mc);
        let width = single_mc_block_columns(&info, k);
        assert!(width <= info.nc && n > width, "{info:?}: blocks of {width}");
        let options = GemmOptions::default()
            .parallelism(Parallelism::Sequential)
            .isa(isa)
            .blocking(blocking);
        let mut c = c0.clone();
        let (result, trace) = traced(|| run_gemm(1.0, &a, &b, 1.0, &mut c, &options));
        result.unwrap();
        check_c(&format!("{isa}"), &c, k, &want, &magnitude, &c0.in_view())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(trace.mc_edges, 0, "{isa}: {trace:?}");
        assert!(trace.kc_edges > 0 && trace.nc_edges > 0, "{isa}: {trace:?}");
    }
}

/// The threaded paths with a forced small blocking, checked by value (their
/// blocks run on pool threads, where `traced` cannot see them): few column
/// panels and many rows share one packed B across the threads, each
/// thread's rows crossing MC blocks of their own; many column panels split
/// C into a grid of blocks. Three threads, so the splits are uneven.
#[test]
fn threaded_paths_with_small_blocks_match_naive() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let blocking = Blocking {
        mc: 16,
        kc: 16,
        nc: 32,
    };
    // 240×100×50 is 1.2M multiply-adds: two threads' worth (2^19 each).
    // Its 50 columns are 2, 4 or 7 panels (of 32, 16, 8): fewer than 4 per
    // thread, with ≥ 2 row panels per thread, so B is shared. 64×100×300
    // has 10–38 column panels: the grid split.
    for (m, k, n) in [(240, 100, 50), (241, 97, 49), (64, 100, 300), (70, 90, 333)] {
        let mut rng = Rng::new(m as u64 * 7 + n as u64);
        let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, Layout::DENSE, |_, _| f32::NAN);
        let (want, magnitude) = naive(1.5, &a, &b, 0.0, &c0);
        for isa in isas_under_test() {
            let options = GemmOptions::default()
                .parallelism(Parallelism::Rayon)
                .isa(isa)
                .blocking(blocking);
            let mut c = c0.clone();
            pool.install(|| run_gemm(1.5, &a, &b, 0.0, &mut c, &options))
                .unwrap();
            check_c(
                &format!("{m}×{k}×{n} {isa}"),
                &c,
                k,
                &want,
                &magnitude,
                &c0.in_view(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

// --- fixed cases --------------------------------------------------------------------------

fn options_everywhere() -> Vec<GemmOptions> {
    engine_combos()
        .into_iter()
        .map(|(isa, backend, parallelism)| {
            GemmOptions::default()
                .backend(backend)
                .parallelism(parallelism)
                .isa(Some(isa))
        })
        .collect()
}

#[test]
fn k_zero_scales_c_by_beta() {
    let (m, n) = (5, 7);
    for options in options_everywhere() {
        for beta in [1.0f32, -1.5, 0.25] {
            let mut c: Vec<f32> = (0..m * n).map(|v| v as f32 - 10.0).collect();
            let before = c.clone();
            sgemm(
                2.0,
                MatRef::row_major(&[], m, 0),
                MatRef::row_major(&[], 0, n),
                beta,
                MatMut::row_major(&mut c, m, n),
                &options,
            )
            .unwrap();
            for (x, y) in c.iter().zip(&before) {
                assert_eq!(*x, beta * y, "{options:?} β {beta}");
            }
        }
        // β = 0 writes zeros, even over NaN.
        let mut c = vec![f32::NAN; m * n];
        sgemm(
            2.0,
            MatRef::row_major(&[], m, 0),
            MatRef::row_major(&[], 0, n),
            0.0,
            MatMut::row_major(&mut c, m, n),
            &options,
        )
        .unwrap();
        assert!(c.iter().all(|&v| v == 0.0), "{options:?}: {c:?}");
    }
}

#[test]
fn alpha_zero_does_not_read_a_or_b() {
    let (m, k, n) = (19, 33, 37);
    let a = vec![f32::NAN; m * k];
    let b = vec![f32::INFINITY; k * n];
    for options in options_everywhere() {
        let mut c: Vec<f32> = (0..m * n).map(|v| (v % 13) as f32 - 6.0).collect();
        let before = c.clone();
        sgemm(
            0.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            -1.5,
            MatMut::row_major(&mut c, m, n),
            &options,
        )
        .unwrap();
        for (x, y) in c.iter().zip(&before) {
            assert_eq!(*x, -1.5 * y, "{options:?}");
        }
        // α = 0 and β = 0: zeros, whatever A, B and C hold.
        let mut c = vec![f32::NAN; m * n];
        sgemm(
            0.0,
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            0.0,
            MatMut::row_major(&mut c, m, n),
            &options,
        )
        .unwrap();
        assert!(c.iter().all(|&v| v == 0.0), "{options:?}");
    }
}

#[test]
fn beta_zero_ignores_nan_in_c() {
    let (m, k, n) = (21, 17, 45);
    let mut rng = Rng::new(3);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    let mut want = vec![0.0f32; m * n];
    sgemm(
        1.0,
        MatRef::row_major(&a, m, k),
        MatRef::row_major(&b, k, n),
        0.0,
        MatMut::row_major(&mut want, m, n),
        &GemmOptions::default(),
    )
    .unwrap();
    for options in options_everywhere() {
        for fill in [f32::NAN, f32::INFINITY, -f32::INFINITY] {
            let mut c = vec![fill; m * n];
            sgemm(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                MatMut::row_major(&mut c, m, n),
                &options,
            )
            .unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    x.is_finite() && (x - y).abs() <= 1e-5,
                    "{options:?}: {x} vs {y}"
                );
            }
        }
    }
}

/// `m = 0` or `n = 0`: Ok, nothing read or written. Uses the dense
/// constructors a caller would use, so the views' strides come from
/// `row_major` / `col_major` of a zero extent (e.g. `row_major(c, 3, 0)` has
/// row stride 0, `col_major(c, 0, 4)` column stride 0): a view with no
/// elements cannot map two elements to one place.
#[test]
fn empty_output_is_ok_and_touches_nothing() {
    let nan = [f32::NAN; 64];
    let mut failures = std::collections::BTreeSet::new();
    for options in options_everywhere() {
        for (m, k, n) in [
            (0, 3, 4),
            (3, 5, 0),
            (0, 0, 0),
            (0, 4, 0),
            (4, 0, 0),
            (0, 0, 4),
        ] {
            let a = &nan[..m * k];
            let b = &nan[..k * n];
            for col_major in [false, true] {
                let mut c = [SENTINEL; 8];
                let cv = if col_major {
                    MatMut::col_major(&mut c[..m * n], m, n)
                } else {
                    MatMut::row_major(&mut c[..m * n], m, n)
                };
                let (av, bv) = if col_major {
                    (MatRef::col_major(a, m, k), MatRef::col_major(b, k, n))
                } else {
                    (MatRef::row_major(a, m, k), MatRef::row_major(b, k, n))
                };
                let r = sgemm(1.0, av, bv, 0.5, cv, &options);
                if let Err(e) = r {
                    let order = if col_major { "col_major" } else { "row_major" };
                    // Checked before any engine runs: one line per shape.
                    failures.insert(format!("{m}×{k}×{n} {order}: {e:?}"));
                }
                assert!(c.iter().all(|v| v.to_bits() == SENTINEL.to_bits()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "sgemm rejects empty outputs built with the dense constructors:\n{}",
        failures.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The same with explicit unit strides, which are unambiguous.
#[test]
fn empty_output_with_explicit_strides_is_ok() {
    let mut c = [SENTINEL; 4];
    for options in options_everywhere() {
        for (m, n) in [(0usize, 4usize), (4, 0), (0, 0)] {
            let r = sgemm(
                1.0,
                MatRef::new(&[1.0; 8], m, 2, 2, 1),
                MatRef::new(&[1.0; 8], 2, n, 4, 1),
                1.0,
                MatMut::new(&mut c, m, n, 4, 1),
                &options,
            );
            assert_eq!(r, Ok(()), "{m}×{n} {options:?}");
            assert!(c.iter().all(|v| v.to_bits() == SENTINEL.to_bits()));
        }
    }
}

/// A single dense case compared with the naive reference.
fn check_dense(m: usize, k: usize, n: usize, options: &GemmOptions, seed: u64) {
    let mut rng = Rng::new(seed);
    let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
    let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
    let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
    let (want, magnitude) = naive(0.75, &a, &b, -0.5, &c0);
    let mut c = c0.clone();
    run_gemm(0.75, &a, &b, -0.5, &mut c, options).unwrap();
    check_c(
        &format!("{m}×{k}×{n} {options:?}"),
        &c,
        k,
        &want,
        &magnitude,
        &c0.in_view(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Shapes that cross every cache-blocking boundary of every kernel on this
/// machine class (KC 192–512, MC 252–680, NC 1024–2720): several KC blocks
/// with β = 0 and NaN in C (only the first block may use β), more rows than
/// MC, more columns than NC, with strided layouts.
#[test]
fn blocking_edges_match_naive() {
    let col_major = Layout {
        row_major: false,
        ..Layout::DENSE
    };
    let gapped = Layout {
        inner: 2,
        pad: 3,
        slack: 1,
        ..Layout::DENSE
    };
    let padded = Layout {
        pad: 5,
        slack: 2,
        ..Layout::DENSE
    };
    let cases = [
        Case {
            m: 9,
            k: 1030,
            n: 1100,
            alpha: -1.5,
            beta: 0.0,
            a: col_major,
            b: gapped,
            c: padded,
            seed: 1,
        },
        Case {
            m: 700,
            k: 200,
            n: 40,
            alpha: 1.0,
            beta: -1.5,
            a: gapped,
            b: Layout {
                transposed: true,
                ..Layout::DENSE
            },
            c: col_major,
            seed: 2,
        },
        Case {
            m: 7,
            k: 530,
            n: 2800,
            alpha: 0.5,
            beta: 0.0,
            a: Layout {
                neg_rows: true,
                neg_cols: true,
                ..Layout::DENSE
            },
            b: padded,
            c: Layout::DENSE,
            seed: 3,
        },
    ];
    for case in &cases {
        run_case(case).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
}

#[test]
fn large_threaded_case_matches_naive() {
    // M×K×N = 513×1000×700: several cache blocks in every direction, ragged
    // edges (513 = 64·8 + 1), split across the pool's threads.
    let (m, k, n) = (513, 1000, 700);
    let mut rng = Rng::new(99);
    let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
    let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
    let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
    let (want, magnitude) = naive(1.0, &a, &b, 1.0, &c0);
    let in_view = c0.in_view();
    for isa in isas_under_test() {
        for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
            let options = GemmOptions::default()
                .backend(backend)
                .parallelism(Parallelism::Rayon)
                .isa(Some(isa));
            let mut c = c0.clone();
            run_gemm(1.0, &a, &b, 1.0, &mut c, &options).unwrap();
            check_c(&format!("{options:?}"), &c, k, &want, &magnitude, &in_view)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Runs `C ← α·A·B + β·C` on the native engine on every ISA path (and
/// each of AVX-512's row tiles) with `parallelism` (inside `pool` when
/// given) and checks each result against the naive product.
fn check_every_isa(
    alpha: f32,
    a: &Stored,
    b: &Stored,
    beta: f32,
    c0: &Stored,
    parallelism: Parallelism,
    pool: Option<&rayon::ThreadPool>,
) {
    let (want, magnitude) = naive(alpha, a, b, beta, c0);
    let in_view = c0.in_view();
    for (isa, wide) in isa_tiles_under_test() {
        let options = GemmOptions::default()
            .backend(GemmBackend::Native)
            .parallelism(parallelism)
            .isa(Some(isa))
            .wide_tile(wide);
        let mut c = c0.clone();
        let mut run = || run_gemm(alpha, a, b, beta, &mut c, &options);
        match pool {
            Some(pool) => pool.install(run),
            None => run(),
        }
        .unwrap();
        check_c(
            &format!("{}x{}x{} {options:?}", a.rows, a.cols, b.cols),
            &c,
            a.cols,
            &want,
            &magnitude,
            &in_view,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn column_kernel_only_for_few_columns() {
    // The x86 paths' column kernels (AVX-512 32 × 8, AVX2 16 × 6) serve
    // pre-packed A (convolution plans) when C has few columns;
    // tests/plan.rs checks their values.
    for (isa, tile) in [(Isa::Avx512, (32, 8)), (Isa::Avx2, (16, 6))] {
        if !isas_under_test().contains(&isa) {
            continue;
        }
        let rows = |m, n| kernel_info_for_operands(isa, m, n, false);
        let got = kernel_info_for_shape(isa, 2048, 49);
        assert_eq!((got.mr, got.nr), tile, "{isa}");
        assert_eq!(kernel_info_for_shape(isa, 95, 7).mr, tile.0, "{isa}");
        assert_eq!(
            kernel_info_for_shape(isa, 2048, 2048),
            rows(2048, 2048),
            "{isa}"
        );
        // 196 = 12·16 + 4: row tiles pad 12 columns, column tiles 2 (AVX2)
        // or 4 (AVX-512), not 10% less work.
        assert_eq!(
            kernel_info_for_shape(isa, 256, 196),
            rows(256, 196),
            "{isa}"
        );
    }
    if isas_under_test().contains(&Isa::Portable) {
        let portable = kernel_info(Isa::Portable);
        assert_eq!(kernel_info_for_shape(Isa::Portable, 2048, 49), portable);
    }
}

#[test]
fn column_major_a_takes_the_column_kernel() {
    // A column-major A (the input gradient's `Wᵀ`, read through the weight
    // tensor) has its rows contiguous at every k-step, so C with few
    // columns runs on the x86 paths' column kernels, A packed by one copy
    // per step; a row-major A keeps the row kernel, and so does a shape
    // whose column tiles would pad as much (9 × 13). 1030 and 100 rows end
    // mid-panel, k = 513 crosses a KC edge, 49 = 8·6 + 1 and 7 columns end
    // in narrow tiles, and a padded column stride moves every column off
    // the line boundary.
    for (m, k, n) in [(1030, 513, 49), (100, 300, 7), (9, 40, 13), (64, 64, 49)] {
        let mut rng = Rng::new(31 + m as u64);
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
        for (row_major, pad) in [(false, 0), (false, 3), (true, 0)] {
            let a_layout = Layout {
                row_major,
                pad,
                ..Layout::DENSE
            };
            let a = Stored::new(m, k, a_layout, |_, _| rng.next_f32());
            let (want, magnitude) = naive(0.5, &a, &b, 1.0, &c0);
            for isa in isas_under_test() {
                let options = GemmOptions::default()
                    .backend(GemmBackend::Native)
                    .parallelism(Parallelism::Sequential)
                    .isa(Some(isa));
                let mut c = c0.clone();
                let (result, trace) = traced(|| run_gemm(0.5, &a, &b, 1.0, &mut c, &options));
                result.unwrap();
                let what = format!("{m}x{k}x{n} A {a_layout:?} {isa}");
                check_c(&what, &c, k, &want, &magnitude, &c0.in_view())
                    .unwrap_or_else(|e| panic!("{e}"));
                // Where a pre-packed A would take the column kernel, a
                // column-major one does too, for every block.
                let column_tiles =
                    kernel_info_for_shape(isa, m, n) != kernel_info_for_operands(isa, m, n, false);
                let blocks: u64 = trace.gemm_blocks.iter().sum();
                let want = if column_tiles && !row_major {
                    blocks
                } else {
                    0
                };
                assert!(trace.gemm_ran_on(isa), "{what}: {trace:?}");
                assert_eq!(trace.column_kernel_blocks, want, "{what}: {trace:?}");
            }
        }
    }
}

#[test]
fn column_major_c_lowers_the_depth_of_the_a_the_driver_reads() {
    // A column-major C runs as Cᵀ = Bᵀ·Aᵀ: the A the kernels read is Bᵀ,
    // column-major (B row-major), 200 rows of 64-column C panels, read in
    // place, so K blocks are cut to the depth whose lines fit where a packed
    // panel's would. The depth was once chosen from the caller's A
    // (row-major here, so never lowered): k just past the lowered depth
    // then ran as one K block.
    let (m, n) = (64, 200);
    let line = cpuconv::gemm::cache::cache_hierarchy().l1d.line.max(1);
    for isa in isas_under_test() {
        let info = kernel_info_for_operands(isa, n, m, true);
        let step_bytes = info.mr * std::mem::size_of::<f32>();
        let depth = (info.kc * step_bytes / line.max(step_bytes)).next_multiple_of(8);
        if depth + 8 > info.kc {
            // Steps of a line or more: nothing to lower on this path.
            continue;
        }
        let k = depth + 8;
        let mut rng = Rng::new(77);
        let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c_layout = Layout {
            row_major: false,
            ..Layout::DENSE
        };
        let c0 = Stored::new(m, n, c_layout, |_, _| rng.next_f32());
        let (want, magnitude) = naive(1.0, &a, &b, 0.5, &c0);
        let options = GemmOptions::default()
            .backend(GemmBackend::Native)
            .parallelism(Parallelism::Sequential)
            .isa(Some(isa));
        let mut c = c0.clone();
        let (result, trace) = traced(|| run_gemm(1.0, &a, &b, 0.5, &mut c, &options));
        result.unwrap();
        let what = format!(
            "{m}x{k}x{n}, C column-major, {isa}, KC {} → {depth}",
            info.kc
        );
        check_c(&what, &c, k, &want, &magnitude, &c0.in_view()).unwrap_or_else(|e| panic!("{e}"));
        assert!(trace.gemm_ran_on(isa), "{what}: {trace:?}");
        assert!(trace.kc_edges > 0, "{what}: one K block: {trace:?}");
    }
}

#[test]
fn row_major_a_read_in_place() {
    // Few column panels: the row kernels read a row-major A where it lies.
    // 1001 and 70 rows end mid-panel (the last panel is packed); an odd row
    // pad leaves rows unaligned; k = 1300 spans several K blocks; 600 rows
    // of 512 exercise the multi-block path with whole-row blocks.
    let a_layout = Layout {
        pad: 3,
        slack: 5,
        ..Layout::DENSE
    };
    for (m, k, n, layout) in [
        (1001, 1300, 49, a_layout),
        (70, 33, 200, a_layout),
        (600, 512, 20, Layout::DENSE),
    ] {
        let mut rng = Rng::new(17 + m as u64);
        let a = Stored::new(m, k, layout, |_, _| rng.next_f32());
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
        check_every_isa(0.5, &a, &b, 2.0, &c0, Parallelism::Sequential, None);
    }
}

#[test]
fn columns_past_a_multiple_of_16_as_dot_products() {
    // 17, 18, 33, 34, 49, 50, 81, 97 and 305 columns: on AVX-512 the last one or
    // two are peeled off the tiles, as dot products of A's rows where A is
    // row-major and read in place, else accumulated next to the tile
    // before them (a column-major A read in place, or A packed: 305
    // columns are too many panels to read A in place; 13 rows end in a
    // 5-row panel). Odd k exercises the masked tail of the dot product;
    // padded rows of C, the scalar store; 3 threads split the peeled rows.
    // (A column-major C is computed transposed, without the peel.)
    let c_layouts = [
        Layout::DENSE,
        Layout {
            pad: 3,
            ..Layout::DENSE
        },
        Layout {
            row_major: false,
            pad: 1,
            ..Layout::DENSE
        },
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for (m, k, n) in [
        (70, 37, 17),
        (9, 16, 18),
        (301, 5, 33),
        (1030, 513, 49),
        (64, 100, 50),
        (13, 70, 34),
        (21, 40, 81),
        (9, 64, 97),
        (40, 300, 305),
    ] {
        let mut rng = Rng::new(23 + n as u64);
        let a_layouts = [
            Layout::DENSE,
            Layout {
                row_major: false,
                ..Layout::DENSE
            },
            Layout {
                row_major: false,
                pad: 2,
                ..Layout::DENSE
            },
        ];
        for a_layout in a_layouts {
            let a = Stored::new(m, k, a_layout, |_, _| rng.next_f32());
            let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
            for layout in c_layouts {
                let c0 = Stored::new(m, n, layout, |_, _| rng.next_f32());
                check_every_isa(1.5, &a, &b, -0.25, &c0, Parallelism::Sequential, None);
                check_every_isa(1.0, &a, &b, 0.0, &c0, Parallelism::Rayon, Some(&pool));
            }
        }
    }
}

#[test]
fn row_major_b_read_in_place() {
    // M ≤ MC with a row-major B: the kernels read B where it lies instead of
    // packing it. An odd row pad leaves the rows unaligned; 1100 columns end
    // mid-panel (the last panel is packed); k = 1300 spans several K blocks,
    // so C is accumulated across blocks; the sentinel slack after B checks
    // that no read runs past its last row.
    let b_layout = Layout {
        pad: 3,
        slack: 5,
        ..Layout::DENSE
    };
    for (m, k, n) in [(64, 1300, 1100), (9, 150, 64), (200, 40, 33)] {
        let mut rng = Rng::new(11 + m as u64);
        let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
        let b = Stored::new(k, n, b_layout, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
        check_every_isa(1.25, &a, &b, 0.5, &c0, Parallelism::Sequential, None);
    }
}

#[test]
fn b_read_in_place_from_mid_line_matches_naive() {
    // A row-major B read in place whose rows are a whole number of line
    // pairs apart (1056 floats) or of lines only (1040 and 400 floats),
    // starting anywhere in a pair: the driver peels the columns up to the
    // next pair (or line) into a packed block of their own (B spans ≥ 8
    // column panels on every path and tile), then reads the rest aligned.
    // Every start offset, every ISA and tile, against the f64 product.
    for (m, k, n) in [(24, 37, 1056), (24, 37, 1040), (24, 37, 400)] {
        b_in_place_at_every_offset(m, k, n);
    }
}

#[test]
fn b_off_its_lines_read_in_place_for_few_tiles_matches_naive() {
    // Rows 1000 floats apart never all start on cache lines, so no peel
    // aligns them: with at most 8 register tiles of rows (64 rows on
    // AVX-512, 48 on AVX2) B is read in place anyway, split loads and
    // all; 72 rows (9 tiles) pack it. Every start offset, every ISA and
    // tile, against the f64 product.
    for (m, k, n) in [(64, 19, 1000), (48, 19, 1000), (72, 19, 1000)] {
        b_in_place_at_every_offset(m, k, n);
    }
}

fn b_in_place_at_every_offset(m: usize, k: usize, n: usize) {
    let mut rng = Rng::new(31);
    let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
    let store: Vec<f32> = (0..k * n + 32).map(|_| rng.next_f32()).collect();
    for offset in 0..32 {
        let b = &store[offset..][..k * n];
        let mut want = vec![0.0f64; m * n];
        let mut magnitude = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = f64::from(a[i * k + p]);
                for j in 0..n {
                    want[i * n + j] += x * f64::from(b[p * n + j]);
                    magnitude[i * n + j] += (x * f64::from(b[p * n + j])).abs();
                }
            }
        }
        for (isa, wide) in isa_tiles_under_test() {
            let options = GemmOptions::default()
                .backend(GemmBackend::Native)
                .parallelism(Parallelism::Sequential)
                .isa(Some(isa))
                .wide_tile(wide);
            let mut c = vec![f32::NAN; m * n];
            sgemm(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(b, k, n),
                0.0,
                MatMut::row_major(&mut c, m, n),
                &options,
            )
            .unwrap();
            for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                let tol = tolerance(k, magnitude[idx]);
                assert!(
                    (f64::from(got) - w).abs() <= tol,
                    "{isa} {wide:?} {m}x{k}x{n}, B at +{offset}: C[{}][{}] = {got}, want {w}",
                    idx / n,
                    idx % n
                );
            }
        }
    }
}

#[test]
fn few_column_panels_share_b_across_threads() {
    // 13 and 100 columns are 1 and 4 panels of 32: too few to share out
    // evenly, so the threads share one packed B and split the rows, where
    // each thread's part of a block is large enough to repay the extra
    // fork-joins (`MIN_SHARED_B_BLOCK_FMAS`: 683 rows × 100 × 552 deep, 2667
    // × 13 × 600); 2049 = 8·256 + 1 rows, ragged; 3 threads, so the row
    // split is uneven too. 513 rows split the grid instead.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for (m, k, n) in [(2049, 1100, 100), (8001, 600, 13), (513, 700, 100)] {
        let mut rng = Rng::new(7 + n as u64);
        let a = Stored::new(m, k, Layout::DENSE, |_, _| rng.next_f32());
        let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
        let c0 = Stored::new(m, n, Layout::DENSE, |_, _| rng.next_f32());
        check_every_isa(0.5, &a, &b, -1.5, &c0, Parallelism::Rayon, Some(&pool));
    }
}

#[test]
fn sgemm_inside_rayon_workers() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // Big enough (128·160·256 ≈ 5M FMAs) that each call wants to split too.
    let (m, k, n) = (128, 160, 256);
    let mut rng = Rng::new(5);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    let mut want = vec![0.0f32; m * n];
    sgemm(
        1.0,
        MatRef::row_major(&a, m, k),
        MatRef::row_major(&b, k, n),
        0.0,
        MatMut::row_major(&mut want, m, n),
        &GemmOptions::default().parallelism(Parallelism::Sequential),
    )
    .unwrap();
    let options = options_everywhere();
    let results: Vec<(GemmOptions, Vec<f32>)> = pool.install(|| {
        options
            .par_iter()
            .map(|opt| {
                let mut c = vec![f32::NAN; m * n];
                sgemm(
                    1.0,
                    MatRef::row_major(&a, m, k),
                    MatRef::row_major(&b, k, n),
                    0.0,
                    MatMut::row_major(&mut c, m, n),
                    opt,
                )
                .unwrap();
                (*opt, c)
            })
            .collect()
    });
    assert_eq!(results.len(), options.len());
    for (opt, c) in results {
        for (x, y) in c.iter().zip(&want) {
            // Different kernels round differently; K = 160 values in [-1, 1).
            assert!((x - y).abs() <= 1e-3, "{opt:?}: {x} vs {y}");
        }
    }
}

#[test]
fn rayon_capped_matches() {
    let caps = [1usize, 2, 3, 64];
    for cap in caps {
        for isa in isas_under_test() {
            for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
                let options = GemmOptions::default()
                    .backend(backend)
                    .parallelism(Parallelism::RayonCapped(NonZeroUsize::new(cap).unwrap()))
                    .isa(Some(isa));
                check_dense(130, 150, 270, &options, cap as u64);
            }
        }
    }
}

#[test]
fn parallelism_helpers() {
    assert_eq!(Parallelism::threads(0), Parallelism::Rayon);
    assert_eq!(Parallelism::threads(1), Parallelism::Sequential);
    assert_eq!(
        Parallelism::threads(3),
        Parallelism::RayonCapped(NonZeroUsize::new(3).unwrap())
    );
    assert_eq!(Parallelism::Sequential.max_threads(), 1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(|| {
        assert_eq!(Parallelism::Rayon.max_threads(), 3);
        assert_eq!(Parallelism::threads(2).max_threads(), 2);
        assert_eq!(Parallelism::threads(64).max_threads(), 3);
    });
}

#[test]
fn every_supported_isa_really_runs() {
    let mut ran = Vec::new();
    for isa in isas_under_test() {
        for parallelism in [Parallelism::Sequential, Parallelism::Rayon] {
            let options = GemmOptions::default()
                .backend(GemmBackend::Native)
                .parallelism(parallelism)
                .isa(isa);
            let ((), trace) = traced(|| check_dense(70, 90, 110, &options, 11));
            // Work handed to other threads is recorded there, so only the
            // sequential call must show every block on this thread.
            if parallelism == Parallelism::Sequential {
                assert!(
                    trace.gemm_ran_on(isa),
                    "forcing {isa} ran no {isa} GEMM: {trace:?}"
                );
                for other in Isa::ALL.into_iter().filter(|&o| o != isa) {
                    assert!(
                        !trace.gemm_ran_on(other),
                        "forcing {isa} ran {other}: {trace:?}"
                    );
                }
                ran.push(format!(
                    "{isa} ({} blocks)",
                    trace.gemm_blocks[isa as usize]
                ));
            }
        }
    }
    println!("GEMM ISAs that ran: {}", ran.join(", "));
    assert!(isas_under_test().contains(&Isa::Portable));
}

/// Every row count of a bottom-edge tile (1 to 17 rows: each short tile
/// below a register tile of 8 or 6, alone and under full ones), under each
/// edge and full tile (16, 32, 48, 49, 80 and 97 columns: on AVX-512's
/// 8 × 48 tile, 80 = 48 + a 32-column edge and 97 = 2·48 + a peeled
/// column), A row-major (read in place) and column-major (packed), on
/// every path and both of AVX-512's tiles, value by value against the
/// naive product.
#[test]
fn every_bottom_edge_row_count() {
    let col_major = Layout {
        row_major: false,
        ..Layout::DENSE
    };
    let k = 37;
    for m in 1..=17 {
        for n in [16, 32, 48, 49, 80, 97] {
            for a_layout in [Layout::DENSE, col_major] {
                let mut rng = Rng::new((m * 100 + n) as u64);
                let a = Stored::new(m, k, a_layout, |_, _| rng.next_f32());
                let b = Stored::new(k, n, Layout::DENSE, |_, _| rng.next_f32());
                let c0 = Stored::new(m, n, Layout::DENSE, |_, _| f32::NAN);
                let (want, magnitude) = naive(1.0, &a, &b, 0.0, &c0);
                for (isa, wide) in isa_tiles_under_test() {
                    let options = GemmOptions::default()
                        .parallelism(Parallelism::Sequential)
                        .isa(isa)
                        .wide_tile(wide);
                    let mut c = c0.clone();
                    run_gemm(1.0, &a, &b, 0.0, &mut c, &options).unwrap();
                    let what = format!("{isa} {wide:?} {m}×{k}×{n} A {a_layout:?}");
                    check_c(&what, &c, k, &want, &magnitude, &c0.in_view())
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}
