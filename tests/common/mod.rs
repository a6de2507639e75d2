//! Helpers shared by the integration tests (each test crate uses a subset).
#![allow(dead_code)]

pub mod grads;

use cpuconv::gemm::cache::cache_hierarchy;
use cpuconv::gemm::kernels::{kernel_info_for_tile, KernelInfo};
use cpuconv::testing::{isas_under_test, Blocking, KernelTrace};
use cpuconv::{
    Algorithm, Conv2dPlan, ConvError, ConvGeometry, ConvMode, GemmBackend, Isa, Parallelism,
    Workspace,
};
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

/// Number of proptest cases: `PROPTEST_CASES` when it parses, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The configuration of the property tests: [`proptest_cases`]`(default)`
/// cases, up to 2¹⁴ rejected draws in all, and failing seeds saved next to
/// the test's source file (`tests/<name>.proptest-regressions`).
pub fn proptest_config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: proptest_cases(default),
        max_global_rejects: 1 << 14,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// The bit patterns of `v`, for comparisons that must be exact (NaN and
/// the sign of zero included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `v` widened to f64.
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// `Σ a·b` in f64 over f32 values.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

/// The tolerance of an adjoint identity `⟨A(u), v⟩ = ⟨u, A*(v)⟩` checked
/// with [`dot`] over the f32 results of two operators whose outputs are
/// sums of `terms_a` and `terms_b` products: both inner products share the
/// magnitude `S = Σ_taps |u|·|w|·|v|` (computed in f64 by the caller), the
/// f32 error of each side is at most `(T + 1)·ε·S`, so the two differ by
/// at most `(T_a + 1 + T_b + 1)·ε·S`, plus `4·n·ε₆₄·S` for the f64 sums
/// (`n` counting their terms) and `f64::MIN_POSITIVE` so that `S = 0`
/// passes.
pub fn adjoint_tolerance(terms_a: usize, terms_b: usize, magnitude: f64, f64_terms: usize) -> f64 {
    let eps = f32::EPSILON as f64;
    let (ta, tb) = ((terms_a + 1) as f64, (terms_b + 1) as f64);
    (ta + tb) * eps * magnitude
        + (4.0 * f64_terms as f64 * f64::EPSILON * magnitude + f64::MIN_POSITIVE)
}

/// SplitMix64: a tiny deterministic generator, so proptest shrinks the shape
/// and the seed rather than thousands of individual floats.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        // 24 random bits -> [0, 1) exactly representable, then to [-1, 1).
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    pub fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }
}

/// Every (ISA, backend, parallelism) combination the fast paths must agree on.
/// The row tiles to force on path `isa` (`GemmOptions::wide_tile`): both of
/// AVX-512's, `8 × 32` and `8 × 48`, whichever this CPU would pick, so that
/// each is tested on every AVX-512 machine; the path's own choice elsewhere.
pub fn tiles_under_test(isa: Isa) -> Vec<Option<bool>> {
    match isa {
        Isa::Avx512 => vec![Some(false), Some(true)],
        _ => vec![None],
    }
}

/// Every path under test, paired with each row tile to force on it
/// ([`tiles_under_test`]).
pub fn isa_tiles_under_test() -> Vec<(Isa, Option<bool>)> {
    isas_under_test()
        .into_iter()
        .flat_map(|isa| tiles_under_test(isa).into_iter().map(move |w| (isa, w)))
        .collect()
}

pub fn engine_combos() -> Vec<(Isa, GemmBackend, Parallelism)> {
    let mut v = Vec::new();
    for isa in isas_under_test() {
        for backend in [GemmBackend::Native, GemmBackend::Matrixmultiply] {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                v.push((isa, backend, par));
            }
        }
    }
    v
}

/// Every concrete algorithm plus `Auto`; new algorithms join through
/// `Algorithm::CONCRETE`.
pub fn algorithms() -> Vec<Algorithm> {
    let mut v = Algorithm::CONCRETE.to_vec();
    v.push(Algorithm::Auto);
    v
}

/// Asserts that an error message names every one of `needles`.
pub fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
}

/// The workspace for `plan.forward_in`, or why it could not be allocated:
/// the one place the tests call `Conv2dPlan::workspace`, so a change of its
/// signature (to a `Result`, say) is one edit here. Today it returns the
/// workspace itself, and a workspace too large to allocate aborts the
/// process.
pub fn try_workspace(plan: &Conv2dPlan) -> Result<Workspace, ConvError> {
    plan.workspace()
}

/// [`try_workspace`] for plans whose workspace must fit.
pub fn workspace(plan: &Conv2dPlan) -> Workspace {
    try_workspace(plan).unwrap_or_else(|e| panic!("{:?} plan's workspace: {e}", plan.algorithm()))
}

/// Runs `f` in a child process: this test binary, run again on the one
/// test `name` (which must be the calling test, and must call this first
/// thing), with an environment variable telling it to run `f` itself. A
/// failed allocation aborts the process rather than panicking, so a test
/// of what a huge allocation does runs there: if the library aborts, the
/// test fails with the child's message instead of taking every other test
/// of the binary down with it. `Err` holds the child's exit status and
/// stderr when it did not succeed.
pub fn in_child_process(name: &str, f: impl FnOnce()) -> Result<(), String> {
    const VAR: &str = "CPUCONV_TEST_CHILD";
    if std::env::var(VAR).as_deref() == Ok(name) {
        f();
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--include-ignored", "--nocapture"])
        .env(VAR, name)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The child must really have run the test (a wrong name runs nothing).
    if !stdout.contains("1 passed") {
        return Err(format!("the child ran no test {name:?}:\n{stdout}"));
    }
    Ok(())
}

// --- an independent convolution reference ------------------------------------------------

/// Per output element (`[N, K, OH, OW]` order) of the convolution `g`
/// describes: the value in f64 before any activation, and
/// `M = Σ_taps |x·w| + |bias|`, straight from the definition. Taps whose
/// input position falls in the padding are skipped, whatever their weight
/// (the documented rule: a padding tap contributes nothing). Uses only the
/// geometry's plain fields, not the library's arithmetic.
pub fn conv_reference(
    g: &ConvGeometry,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let (cg, kg) = (g.in_channels / g.groups, g.out_channels / g.groups);
    let (h, w) = (g.in_h, g.in_w);
    let (r_len, s_len) = (g.kernel_h, g.kernel_w);
    let p = g.padding;
    let len = g.batch * g.out_channels * g.out_h * g.out_w;
    let (mut value, mut magnitude) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for n in 0..g.batch {
        for k in 0..g.out_channels {
            let grp = k / kg;
            for oh in 0..g.out_h {
                for ow in 0..g.out_w {
                    let (mut acc, mut mag) = (0.0f64, 0.0f64);
                    for c in 0..cg {
                        for r in 0..r_len {
                            for s in 0..s_len {
                                let iy =
                                    (oh * g.stride_h + r * g.dilation_h) as i128 - p.top as i128;
                                let ix =
                                    (ow * g.stride_w + s * g.dilation_w) as i128 - p.left as i128;
                                if iy < 0 || ix < 0 || iy >= h as i128 || ix >= w as i128 {
                                    continue;
                                }
                                let x = input[((n * g.in_channels + grp * cg + c) * h
                                    + iy as usize)
                                    * w
                                    + ix as usize] as f64;
                                let (wr, ws) = match g.mode {
                                    ConvMode::CrossCorrelation => (r, s),
                                    ConvMode::Convolution => (r_len - 1 - r, s_len - 1 - s),
                                };
                                let wv = weight[((k * cg + c) * r_len + wr) * s_len + ws] as f64;
                                acc += x * wv;
                                mag += (x * wv).abs();
                            }
                        }
                    }
                    if let Some(b) = bias {
                        acc += b[k] as f64;
                        mag += (b[k] as f64).abs();
                    }
                    value.push(acc);
                    magnitude.push(mag);
                }
            }
        }
    }
    (value, magnitude)
}

/// `2·(K + 1)·ε·M + 1e-6` for a GEMM depth `K = (C/g)·R·S`: any order of
/// the `K + 1` f32 additions of an output (its products and the bias) is
/// within `(K + 1)·ε·M` of the exact sum, so two such results, or one and
/// the exact value, differ by at most twice that; a clamp is 1-Lipschitz.
pub fn conv_bound(gemm_k: usize, magnitude: f64) -> f64 {
    2.0 * (gemm_k + 1) as f64 * f32::EPSILON as f64 * magnitude + 1e-6
}

// --- what the native GEMM's sequential loop nest runs ------------------------------------

/// GEMM macro-kernel blocks and the edges they lie past, as `KernelTrace`
/// counts them for one ISA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    pub blocks: u64,
    pub kc_edges: u64,
    pub mc_edges: u64,
    pub nc_edges: u64,
}

impl BlockCounts {
    /// The counts of `n` identical GEMMs (a convolution's image-group pairs).
    pub fn times(self, n: u64) -> BlockCounts {
        BlockCounts {
            blocks: self.blocks * n,
            kc_edges: self.kc_edges * n,
            mc_edges: self.mc_edges * n,
            nc_edges: self.nc_edges * n,
        }
    }

    /// The same counts read from a trace of a call on `isa`.
    pub fn of_trace(trace: &KernelTrace, isa: Isa) -> BlockCounts {
        BlockCounts {
            blocks: trace.gemm_blocks[isa as usize],
            kc_edges: trace.kc_edges,
            mc_edges: trace.mc_edges,
            nc_edges: trace.nc_edges,
        }
    }
}

/// `info` with a forced blocking, rounded as `testing::Blocking` documents:
/// MC and NC up to whole register tiles, KC up to a multiple of 8; a kernel
/// with tall-A blocks takes the forced MC for them too.
pub fn with_blocking(info: KernelInfo, b: Blocking) -> KernelInfo {
    let mc = b.mc.max(1).next_multiple_of(info.mr);
    KernelInfo {
        mc,
        kc: b.kc.max(1).next_multiple_of(8),
        nc: b.nc.max(1).next_multiple_of(info.nr),
        tall_mc: if info.tall_mc > 0 { mc } else { 0 },
        ..info
    }
}

/// How A reaches the native GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AOperand {
    /// A strided matrix with these element strides.
    Strided { rs: isize, cs: isize },
    /// Pre-packed panels (a plan's weights).
    Packed,
}

/// One GEMM as the native engine's sequential driver (`src/gemm/driver.rs`)
/// sees it, after any transposition of a column-major C: `C` is `m × n`,
/// and C has unit column stride.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub alpha_nonzero: bool,
    pub a: AOperand,
    /// B is a strided matrix (not the implicit convolution's im2col view).
    pub b_strided: bool,
}

/// The kernel the native engine runs `call` on, on path `isa`: the path's
/// column kernel where every k-step of A's panels has its rows contiguous
/// (A packed, or column-major) and C's few columns would leave row tiles
/// mostly padding ([`kernel_info_for_shape`]), its row kernel otherwise.
/// Mirrors `select` and its caller in `src/gemm/engine.rs`.
/// `wide` forces AVX-512's row tile as `GemmOptions::wide_tile` does.
pub fn kernel_info_for_call(isa: Isa, wide: Option<bool>, call: &GemmCall) -> KernelInfo {
    let a_columns = match call.a {
        AOperand::Packed => true,
        AOperand::Strided { rs, cs } => rs == 1 && cs > 1,
    };
    kernel_info_for_tile(isa, call.m, call.n, a_columns, wide)
}

/// The columns the register tiles of a sequential native GEMM cover on the
/// kernel `info` (its blocking already forced): all `n`, except on the
/// AVX-512 row kernels (8 × 32 and 8 × 48, the only ones with a narrow
/// right-edge tile of 16 columns and dot-product kernels), where the one or
/// two columns just
/// past a multiple of 16 (`n > 16`) are peeled off the tiles when B is
/// strided and every micro-panel of A reaches the dot kernels with its
/// rows or its columns contiguous: A packed, A strided with a unit row or
/// column stride, or any other strides that the driver packs rather than
/// reads in place (row-major at a column stride of 2–4 is read in place
/// where at most 8 column panels follow and the rows stay in L2). Mirrors
/// `peeled_columns`, `dot_columns` and `a_in_place` in
/// `src/gemm/driver/`.
pub fn tiled_columns(info: &KernelInfo, call: &GemmCall) -> usize {
    const NARROW: usize = 16;
    let GemmCall { m, n, .. } = *call;
    let row_kernel_with_peel =
        info.isa == Isa::Avx512 && info.mr == 8 && [32, 48].contains(&info.nr);
    if !(row_kernel_with_peel && call.b_strided && n > NARROW && n % NARROW <= 2) {
        return n;
    }
    let col0 = n - n % NARROW;
    match call.a {
        AOperand::Strided { rs, cs } if rs != 1 && cs != 1 => {
            let in_place = rs > 0
                && (2..=4).contains(&cs)
                && col0.div_ceil(info.nr) <= 8
                && cache_hierarchy()
                    .l2
                    .holds_rows(rs as usize * 4, m.min(info.mc));
            if in_place {
                n
            } else {
                col0
            }
        }
        _ => col0,
    }
}

/// The width of the B blocks the single-MC path (`m ≤ MC`) uses for a
/// `k`-deep GEMM on `info`: `single_block_columns` of the driver, as many
/// columns as keep a K block of B within half of L2, between NR and NC.
pub fn single_mc_block_columns(info: &KernelInfo, k: usize) -> usize {
    // `block_depth`: K split into equal blocks no deeper than KC.
    let kc = k
        .div_ceil(k.div_ceil(info.kc).max(1))
        .next_multiple_of(8)
        .min(info.kc);
    let floats = cache_hierarchy().l2.per_core() / 2 / 4;
    (floats / kc.max(1) / info.nr * info.nr).clamp(info.nr, info.nc.max(info.nr))
}

/// The width of the column blocks whose edges a sequential native GEMM
/// counts: [`single_mc_block_columns`] when the rows fit one MC block, NC
/// otherwise.
pub fn column_block(info: &KernelInfo, call: &GemmCall) -> usize {
    if call.m <= info.mc || info.tall_mc > 0 {
        single_mc_block_columns(info, call.k)
    } else {
        info.nc
    }
}

/// The blocks a sequential native GEMM runs on the kernel `info` (its
/// blocking already forced), mirroring the loop nest of `gemm_block` in
/// `src/gemm/driver.rs`:
///
/// * nothing when `m`, `n` or `k` is 0 or α is 0 (C is only scaled);
/// * the tiles cover [`tiled_columns`];
/// * K is split into `⌈k / KC⌉` blocks: `block_depth` evens their depth to
///   `⌈k / ⌈k / KC⌉⌉` rounded up to a multiple of 8, never above KC (itself
///   a multiple of 8), which leaves the count at `⌈k / KC⌉`;
/// * `m ≤ MC`: the single-MC path, K blocks outside column blocks of
///   [`single_mc_block_columns`], counting an NC edge per column block past
///   the first and never an MC edge;
/// * `m > MC` on a kernel with tall-A blocks: the single-MC path once per
///   block of `tall_mc` rows, each block past the first counting an MC
///   edge;
/// * `m > MC` otherwise: the classic nest, NC blocks × K blocks × MC
///   blocks, each block past the first of its loop counting that loop's
///   edge.
pub fn sequential_blocks(info: &KernelInfo, call: &GemmCall) -> BlockCounts {
    let GemmCall { m, k, n, .. } = *call;
    if m == 0 || n == 0 || k == 0 || !call.alpha_nonzero {
        return BlockCounts::default();
    }
    let n = tiled_columns(info, call);
    let kb = k.div_ceil(info.kc) as u64;
    let nb = n.div_ceil(column_block(info, call)) as u64;
    if m <= info.mc || info.tall_mc > 0 {
        let mb = if m <= info.mc {
            1
        } else {
            m.div_ceil(info.tall_mc) as u64
        };
        BlockCounts {
            blocks: mb * kb * nb,
            kc_edges: mb * (kb - 1) * nb,
            mc_edges: (mb - 1) * kb * nb,
            nc_edges: mb * kb * (nb - 1),
        }
    } else {
        let mb = m.div_ceil(info.mc) as u64;
        BlockCounts {
            blocks: nb * kb * mb,
            kc_edges: nb * (kb - 1) * mb,
            mc_edges: nb * kb * (mb - 1),
            nc_edges: (nb - 1) * kb * mb,
        }
    }
}
