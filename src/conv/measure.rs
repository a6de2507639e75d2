//! Planning by measurement, FFTW's idea: with [`PlanEffort::Measure`],
//! [`Conv2d::plan`] (and [`ConvTranspose2d::plan`]) builds a plan for each
//! candidate (algorithm × thread split × kernel path), times each on the
//! real shape and keeps the fastest; the choice is remembered in the
//! process's [wisdom], which can be exported and imported as a small
//! string. The search is written once over both kinds of layer; a transposed
//! convolution's candidates are GEMM + col2im and its sub-pixel phases
//! (`Auto` for the phases' own choices, then each fast path for all of
//! them).
//!
//! # Why the kernel path is a candidate
//!
//! A plan runs the best instruction-set path the CPU has ([`crate::isa`]),
//! which on an AVX-512 CPU is the AVX-512 kernels. That is not always the
//! faster path. AMD's Zen 4 executes a 512-bit operation as two 256-bit
//! halves ("double-pumped"): its AVX-512 and AVX2 FMA peaks are equal, so
//! AVX-512 wins only where its other gifts pay (half the instructions,
//! twice the registers, masked edges) and can lose where the wider tile is
//! mostly padding or its weights outgrow a cache level, and which way a
//! layer goes depends on its shape. Nothing here is tuned on a CPU we do
//! not have: where the caller leaves the path open
//! ([`ForwardOptions::isa`] is `None`) and the CPU's path is AVX-512, the
//! AVX2 twin of every candidate is a candidate too, and the measurement
//! decides. A path the caller forces (or that `CPUCONV_ISA` lowers the CPU's
//! path to) is the only path measured. [`PlanChoice::isa`] says which path
//! the plan runs.
//!
//! # The search, in order
//!
//! 1. the wisdom: an entry for this layer, this ISA (the path the request
//!    resolves to), this thread cap and this request ends the search (no
//!    call is timed), unless it runs a path the CPU cannot run, or another
//!    path than the one the caller forces;
//! 2. the candidates, Estimate's pick first (the algorithm `Auto` picks, at
//!    the caller's thread cap, on the CPU's path), then its AVX2 twin (so
//!    that even a short budget compares the two paths on the most likely
//!    winner), then the same algorithm on one thread (on each path), then
//!    every other concrete algorithm that has a fast path for the layer
//!    ([`Algorithm::Direct`], the reference loops, only when it is
//!    Estimate's pick), each at the cap and on one thread, on the CPU's
//!    path, and last their AVX2 twins. An explicit algorithm keeps its
//!    algorithm: only the thread split (and the path, where it is open) is
//!    measured;
//! 3. one plan per candidate (weights packed once; the kept plan is the one
//!    that was timed, not re-packed), a warm-up call and a timed call; then,
//!    while two or more candidates are in the running, rounds of visits:
//!    an untimed call (the candidate's weights back in the caches) and
//!    [`VISIT_SAMPLES`] timed calls, up to [`SAMPLES`] timed calls each (in
//!    rounds, so a short budget times each candidate once before any gets a
//!    second call, and load that comes and goes falls on all of them); a
//!    candidate more than [`DROP_FACTOR`] times slower than the best (or
//!    [`CLOSE_FACTOR`] after [`CLOSE_AFTER`] calls) is timed no more;
//! 4. the budget: no call starts once the search has spent [`BUDGET`] or
//!    made [`MAX_CALLS`] calls (plan building counts towards the time), so
//!    it overruns by at most the call in flight. Estimate's pick is timed
//!    first: on a layer whose single call outlasts the budget, the search
//!    ends with Estimate's pick;
//! 5. the pick: the fastest lower median of a candidate's calls (a busy
//!    machine's interruptions only add time); Estimate's pick (on the CPU's
//!    path) stays unless the fastest beats it by more than [`TIE_MARGIN`]
//!    (noise on a busy machine should not trade the model's pick for an
//!    equal one, nor the CPU's path for an equally fast one).

use super::{
    zeroed, Algorithm, Conv2d, Conv2dPlan, ConvTranspose2d, ConvTranspose2dPlan, ForwardOptions,
};
use crate::arch::Isa;
use crate::conv::wisdom::{self, Choice, Key};
use crate::error::ConvError;
use crate::gemm::{GemmBackend, Parallelism};
use crate::geometry::Padding;
use std::time::{Duration, Instant};

/// How hard [`Conv2d::plan`] works to choose what a plan runs: FFTW's
/// planner flags. Set with [`ForwardOptions::effort`]; one-shot calls
/// ([`Conv2d::forward_with`]) ignore it. [`ConvTranspose2d::plan`] takes
/// it too: its candidates are GEMM + col2im and the sub-pixel phases, each
/// phase on its own `Auto` choice and then all of them on each fast path.
///
/// ```
/// use cpuconv::{Algorithm, ChoiceSource, Conv2dParams, ForwardOptions, Padding, PlanEffort};
/// let conv = Conv2dParams::new(1, 16, (12, 12), 32, (3, 3))
///     .padding(Padding::symmetric(1, 1))
///     .build()?;
/// let weight = vec![0.01f32; conv.geometry().weight_len()];
/// // Times the candidates (within about 100 ms) and keeps the fastest.
/// let options = ForwardOptions::new(Algorithm::Auto).effort(PlanEffort::Measure);
/// let plan = conv.plan(&weight, None, &options)?;
/// let choice = plan.choice();
/// // A second plan of the same layer takes the choice from the wisdom.
/// let again = conv.plan(&weight, None, &options)?;
/// assert_eq!(again.choice().source, ChoiceSource::Wisdom);
/// assert_eq!(again.algorithm(), choice.algorithm);
/// # Ok::<(), cpuconv::ConvError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PlanEffort {
    /// No measurement: `Auto` resolves by [`Conv2d::auto_algorithm`]'s
    /// model, the plan uses the threads the caller allows. What plans have
    /// always done.
    #[default]
    Estimate,
    /// The wisdom's choice for this layer if it has one; otherwise time the
    /// candidates on the real shape within the budget (see the
    /// [module](crate::conv::measure) notes: at most about 100 ms or 50
    /// forward calls), keep the fastest, and record it in the wisdom.
    /// Applies to the native GEMM backend (with another backend it is
    /// `Estimate`). The candidates include the AVX2 kernels on an AVX-512
    /// CPU unless [`ForwardOptions::isa`] forces a path. With an explicit
    /// algorithm, only the thread split (the caller's cap or one thread) and
    /// that kernel path are measured, and only when there is more than one
    /// to try.
    Measure,
    /// The wisdom's choice if it has one, else `Estimate`; never measures
    /// (FFTW's `FFTW_WISDOM_ONLY`): for a framework that ships wisdom and
    /// wants plan times bounded.
    WisdomOnly,
}

impl PlanEffort {
    /// Lower-case name: `estimate`, `measure`, `wisdom-only`.
    pub fn name(self) -> &'static str {
        match self {
            PlanEffort::Estimate => "estimate",
            PlanEffort::Measure => "measure",
            PlanEffort::WisdomOnly => "wisdom-only",
        }
    }

    /// Parses [`PlanEffort::name`] (any case).
    pub fn from_name(s: &str) -> Option<PlanEffort> {
        [
            PlanEffort::Estimate,
            PlanEffort::Measure,
            PlanEffort::WisdomOnly,
        ]
        .into_iter()
        .find(|e| e.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// Where a plan's choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChoiceSource {
    /// Not measured: Auto's model, or the algorithm the caller asked for,
    /// at the caller's thread cap.
    Estimate,
    /// Timed on this shape by this plan's search.
    Measured,
    /// Taken from the wisdom (measured earlier in this process, or imported).
    Wisdom,
}

/// What a plan runs, and why: [`Conv2dPlan::choice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PlanChoice {
    /// The algorithm (`Auto` resolved).
    pub algorithm: Algorithm,
    /// The most threads a call may use: the caller's cap (as the current
    /// rayon pool gave it when the plan was made), or 1 where measurement
    /// found one thread faster. A call small enough still runs on one.
    pub threads: usize,
    /// The kernel path the plan runs ([`Conv2dPlan::isa`]): the forced or
    /// default path, or AVX2 on an AVX-512 CPU where measurement found it
    /// faster (see the [module](crate::conv::measure) notes).
    pub isa: Isa,
    /// How it was chosen.
    pub source: ChoiceSource,
}

/// The most wall-clock time a search starts calls in (plans built and
/// calls made); it overruns by at most the call in flight.
pub const BUDGET: Duration = Duration::from_millis(100);
/// The most forward calls (warm-ups included) a search makes.
pub const MAX_CALLS: usize = 50;
/// Timed calls per candidate at most; its time is their lower median.
pub const SAMPLES: usize = 7;
/// A candidate whose time is more than this times the best is timed no
/// more.
pub const DROP_FACTOR: f64 = 3.0;
/// ... and, after [`CLOSE_AFTER`] calls, more than this times the best: the
/// budget left goes to the close contenders.
pub const CLOSE_FACTOR: f64 = 1.25;
/// See [`CLOSE_FACTOR`].
pub const CLOSE_AFTER: usize = 3;
/// Timed calls per visit of a candidate after the first round (each visit
/// opens with one untimed call).
pub const VISIT_SAMPLES: usize = 2;
/// Estimate's pick is kept unless the fastest candidate is faster by more
/// than this fraction of its time: on a shared two-core machine the same
/// plan's time moved by that much between searches.
pub const TIE_MARGIN: f64 = 0.05;

/// One algorithm at one thread cap on one kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    algorithm: Algorithm,
    threads: usize,
    isa: Isa,
}

impl Candidate {
    /// The plan options of this candidate: `estimate`'s with its
    /// algorithm, threads (out of a cap of `cap`) and path.
    fn options(&self, estimate: &ForwardOptions, cap: usize) -> ForwardOptions {
        ForwardOptions {
            algorithm: self.algorithm,
            isa: Some(self.isa),
            ..with_threads(estimate, self.threads, cap)
        }
    }
}

/// A candidate under test: its plan (dropped once it is out of the
/// running) and its timed calls.
struct Trial<P> {
    candidate: Candidate,
    plan: Option<P>,
    samples: Vec<Duration>,
}

impl<P> Trial<P> {
    /// The lower median of the samples.
    fn time(&self) -> Option<Duration> {
        let mut s = self.samples.clone();
        s.sort_unstable();
        s.get(s.len().saturating_sub(1) / 2).copied()
    }
}

/// `options` at `threads` threads out of a cap of `cap`.
fn with_threads(options: &ForwardOptions, threads: usize, cap: usize) -> ForwardOptions {
    let parallelism = if threads >= cap {
        options.parallelism
    } else {
        Parallelism::threads(threads)
    };
    ForwardOptions {
        parallelism,
        ..*options
    }
}

/// A layer whose plans are measured: [`Conv2d`] and [`ConvTranspose2d`].
/// The search is written once over it.
pub(crate) trait MeasuredLayer {
    /// What a plan of the layer is.
    type Plan;
    /// The lengths of one call's input and output.
    fn lens(&self) -> (usize, usize);
    /// A plan for `options` (their algorithm, threads and path), its choice
    /// marked as coming from `source`.
    fn plan_for(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
        source: ChoiceSource,
    ) -> Result<Self::Plan, ConvError>;
    /// The algorithm `Auto`'s model picks for the kernels of `isa`.
    fn auto_pick(&self, isa: Isa) -> Algorithm;
    /// The algorithm `Estimate` runs on path `isa` for a request of
    /// `requested`.
    fn estimate_pick(&self, requested: Algorithm, isa: Isa) -> Algorithm {
        match requested {
            Algorithm::Auto => self.auto_pick(isa),
            a => a,
        }
    }
    /// The other algorithms an `Auto` request measures, the most frequent
    /// winners first (a short budget reaches those).
    fn other_algorithms(&self) -> Vec<Algorithm>;
    /// One call of `plan`.
    fn run(plan: &Self::Plan, input: &[f32], output: &mut [f32]) -> Result<(), ConvError>;
    /// The algorithm `plan` runs (two candidates that run the same are
    /// measured once).
    fn ran(plan: &Self::Plan) -> Algorithm;
    /// Whether `plan` runs the reference loops.
    fn runs_reference(plan: &Self::Plan) -> bool;
    /// Marks where `plan`'s choice came from.
    fn set_source(plan: &mut Self::Plan, source: ChoiceSource);
}

impl MeasuredLayer for Conv2d {
    type Plan = Conv2dPlan;
    fn lens(&self) -> (usize, usize) {
        let g = self.geometry();
        (g.input_len(), g.output_len())
    }
    fn plan_for(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
        source: ChoiceSource,
    ) -> Result<Conv2dPlan, ConvError> {
        self.plan_as(weight, bias, options, source)
    }
    fn auto_pick(&self, isa: Isa) -> Algorithm {
        self.auto_algorithm_for(isa)
    }
    fn other_algorithms(&self) -> Vec<Algorithm> {
        fast_paths_first(&[
            Algorithm::DirectDense,
            Algorithm::Implicit,
            Algorithm::DirectSimd,
        ])
    }
    fn run(plan: &Conv2dPlan, input: &[f32], output: &mut [f32]) -> Result<(), ConvError> {
        plan.forward(input, output)
    }
    fn ran(plan: &Conv2dPlan) -> Algorithm {
        plan.algorithm()
    }
    fn runs_reference(plan: &Conv2dPlan) -> bool {
        plan.runs_reference()
    }
    fn set_source(plan: &mut Conv2dPlan, source: ChoiceSource) {
        plan.set_source(source);
    }
}

impl MeasuredLayer for ConvTranspose2d {
    type Plan = ConvTranspose2dPlan;
    fn lens(&self) -> (usize, usize) {
        let tg = self.transposed_geometry();
        (tg.input_len(), tg.output_len())
    }
    fn plan_for(
        &self,
        weight: &[f32],
        bias: Option<&[f32]>,
        options: &ForwardOptions,
        source: ChoiceSource,
    ) -> Result<ConvTranspose2dPlan, ConvError> {
        self.plan_as(weight, bias, options, source)
    }
    fn auto_pick(&self, isa: Isa) -> Algorithm {
        self.auto_algorithm_for(isa)
    }
    fn other_algorithms(&self) -> Vec<Algorithm> {
        // GEMM + col2im first: the phases' own `Auto` is Estimate's pick
        // wherever GEMM + col2im is not.
        fast_paths_first(&[
            Algorithm::Im2col,
            Algorithm::DirectDense,
            Algorithm::Implicit,
            Algorithm::DirectSimd,
        ])
    }
    fn run(plan: &ConvTranspose2dPlan, input: &[f32], output: &mut [f32]) -> Result<(), ConvError> {
        plan.forward(input, output)
    }
    fn ran(plan: &ConvTranspose2dPlan) -> Algorithm {
        plan.choice().algorithm
    }
    fn runs_reference(plan: &ConvTranspose2dPlan) -> bool {
        plan.choice().algorithm == Algorithm::Direct
    }
    fn set_source(plan: &mut ConvTranspose2dPlan, source: ChoiceSource) {
        plan.set_source(source);
    }
}

/// `first`, then every other concrete algorithm but the reference loops.
fn fast_paths_first(first: &[Algorithm]) -> Vec<Algorithm> {
    let mut order = first.to_vec();
    for a in Algorithm::CONCRETE {
        if a != Algorithm::Direct && !order.contains(&a) {
            order.push(a);
        }
    }
    order
}

/// [`Conv2d::plan`] for [`PlanEffort::Measure`] and
/// [`PlanEffort::WisdomOnly`].
pub(crate) fn plan(
    conv: &Conv2d,
    weight: &[f32],
    bias: Option<&[f32]>,
    options: &ForwardOptions,
) -> Result<Conv2dPlan, ConvError> {
    let key = |isa, cap| Key::new(conv.geometry(), isa, cap, options.algorithm);
    // Non-finite weights on a padded layer send every padding-multiplying
    // algorithm to DirectSimd: what was measured says nothing of the layer.
    let rerouted = conv.geometry().padding != Padding::ZERO && !super::all_finite(weight);
    plan_layer(conv, weight, bias, options, key, rerouted)
}

/// [`ConvTranspose2d::plan`] for [`PlanEffort::Measure`] and
/// [`PlanEffort::WisdomOnly`].
pub(crate) fn plan_transposed(
    conv: &ConvTranspose2d,
    weight: &[f32],
    bias: Option<&[f32]>,
    options: &ForwardOptions,
) -> Result<ConvTranspose2dPlan, ConvError> {
    let key = |isa, cap| Key::transposed(conv.transposed_geometry(), isa, cap, options.algorithm);
    // Non-finite weights send the phases to DirectSimd, as above.
    let rerouted = !super::all_finite(weight);
    plan_layer(conv, weight, bias, options, key, rerouted)
}

/// The measured plan of `layer` under wisdom key `key(isa, cap)`: the
/// wisdom's choice, or the search's (recorded unless `rerouted`).
fn plan_layer<L: MeasuredLayer>(
    layer: &L,
    weight: &[f32],
    bias: Option<&[f32]>,
    options: &ForwardOptions,
    key: impl Fn(Isa, usize) -> Key,
    rerouted: bool,
) -> Result<L::Plan, ConvError> {
    let estimate = ForwardOptions {
        effort: PlanEffort::Estimate,
        ..*options
    };
    if options.backend != GemmBackend::Native {
        return layer.plan_for(weight, bias, &estimate, ChoiceSource::Estimate);
    }
    let isa = options.resolved_isa();
    let forced = options.isa.is_some();
    let cap = options.parallelism.max_threads().max(1);
    let key = key(isa, cap);
    let entry = wisdom::lookup(&key);
    if let Some(choice) = entry.filter(|c| applies(c, isa, forced, Isa::is_supported)) {
        let candidate = Candidate {
            algorithm: choice.algorithm,
            threads: choice.threads,
            isa: choice.run_isa,
        };
        let opts = candidate.options(&estimate, cap);
        return layer.plan_for(weight, bias, &opts, ChoiceSource::Wisdom);
    }
    let isas = isa_candidates(isa, forced, Isa::is_supported);
    let others = match options.algorithm {
        Algorithm::Auto => layer.other_algorithms(),
        _ => Vec::new(),
    };
    let pick = layer.estimate_pick(options.algorithm, isa);
    let candidates = candidates_of(pick, &others, cap, &isas);
    if options.effort != PlanEffort::Measure || candidates.len() < 2 {
        return layer.plan_for(weight, bias, &estimate, ChoiceSource::Estimate);
    }
    let (plan, candidate) = search(layer, weight, bias, &estimate, cap, &candidates)?;
    // A search under a forced path does not replace an entry that the same
    // request with the path left open would take: that one compared more.
    let keep = forced && entry.is_some_and(|c| applies(&c, isa, false, Isa::is_supported));
    if let (Some(c), false, false) = (candidate, rerouted, keep) {
        let choice = Choice {
            algorithm: c.algorithm,
            threads: c.threads,
            run_isa: c.isa,
        };
        wisdom::record(key, choice);
    }
    Ok(plan)
}

/// Whether a wisdom entry for a request that resolves to path `isa`
/// applies: it runs a path the CPU can run (`supported`), and the path a
/// `forced` request asks for.
fn applies(choice: &Choice, isa: Isa, forced: bool, supported: impl Fn(Isa) -> bool) -> bool {
    supported(choice.run_isa) && (!forced || choice.run_isa == isa)
}

/// The kernel paths to measure for a request that resolves to `isa`, that
/// path first: AVX2 too where the path is AVX-512, left open by the caller
/// (not `forced`), and the CPU runs AVX2 (`supported`; see the module
/// notes on why).
fn isa_candidates(isa: Isa, forced: bool, supported: impl Fn(Isa) -> bool) -> Vec<Isa> {
    if !forced && isa == Isa::Avx512 && supported(Isa::Avx2) {
        vec![isa, Isa::Avx2]
    } else {
        vec![isa]
    }
}

/// The candidates of a [`Conv2d`] (see [`candidates_of`]).
#[cfg(test)]
fn candidates(conv: &Conv2d, requested: Algorithm, cap: usize, isas: &[Isa]) -> Vec<Candidate> {
    let others = match requested {
        Algorithm::Auto => conv.other_algorithms(),
        _ => Vec::new(),
    };
    candidates_of(conv.estimate_pick(requested, isas[0]), &others, cap, isas)
}

/// The candidates on the kernel paths `isas` (the request's own first):
/// Estimate's `pick` first, then `others` but the pick (see the module
/// notes for the order).
fn candidates_of(
    pick: Algorithm,
    others: &[Algorithm],
    cap: usize,
    isas: &[Isa],
) -> Vec<Candidate> {
    let others: Vec<Algorithm> = others.iter().copied().filter(|&a| a != pick).collect();
    let splits: &[usize] = if cap > 1 { &[cap, 1] } else { &[1] };
    let mut out = Vec::new();
    // Estimate's pick: each split on every path, the request's own first.
    for &threads in splits {
        for &isa in isas {
            out.push(Candidate {
                algorithm: pick,
                threads,
                isa,
            });
        }
    }
    // The other algorithms on the request's path, then on the others.
    for &isa in isas {
        for &algorithm in &others {
            for &threads in splits {
                out.push(Candidate {
                    algorithm,
                    threads,
                    isa,
                });
            }
        }
    }
    out
}

/// The budget's state.
struct Clock {
    start: Instant,
    calls: usize,
}

impl Clock {
    fn spent(&self) -> bool {
        self.calls >= MAX_CALLS || self.start.elapsed() >= BUDGET
    }

    /// Times one call of `plan`.
    fn call<L: MeasuredLayer>(
        &mut self,
        plan: &L::Plan,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<Duration, ConvError> {
        self.calls += 1;
        let t = Instant::now();
        L::run(plan, input, output)?;
        Ok(t.elapsed())
    }
}

/// Deterministic values in `[-1, 1)`, in memory asked for fallibly.
fn scratch_input(len: usize) -> Result<Vec<f32>, ConvError> {
    let mut v = zeroed("measurement input", len)?;
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    for x in &mut v {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *x = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
    Ok(v)
}

/// Times `candidates` (the first is Estimate's pick) and returns the plan
/// of the fastest, with the candidate when a measurement chose it (`None`
/// when the scratch tensors could not be had: Estimate's plan, unmeasured).
fn search<L: MeasuredLayer>(
    conv: &L,
    weight: &[f32],
    bias: Option<&[f32]>,
    estimate: &ForwardOptions,
    cap: usize,
    candidates: &[Candidate],
) -> Result<(L::Plan, Option<Candidate>), ConvError> {
    let (input_len, output_len) = conv.lens();
    let mut clock = Clock {
        start: Instant::now(),
        calls: 0,
    };
    let (input, mut output) = match (scratch_input(input_len), zeroed("output", output_len)) {
        (Ok(i), Ok(o)) => (i, o),
        _ => {
            let plan = conv.plan_for(weight, bias, estimate, ChoiceSource::Estimate)?;
            return Ok((plan, None));
        }
    };
    let mut trials: Vec<Trial<L::Plan>> = Vec::new();
    // Round one: a plan, a warm-up and one timed call per candidate.
    for (i, &candidate) in candidates.iter().enumerate() {
        if i > 0 && clock.spent() {
            break;
        }
        let opts = candidate.options(estimate, cap);
        let plan = match conv.plan_for(weight, bias, &opts, ChoiceSource::Measured) {
            Ok(p) => p,
            // Estimate's own plan fails as an Estimate plan would.
            Err(e) if i == 0 => return Err(e),
            // A candidate that cannot be had (an Im2col column matrix too
            // large, say) is no candidate.
            Err(_) => continue,
        };
        // A fast path that falls back to the reference loops (on any
        // path: the loops are the same), or a candidate another already
        // stands for (non-finite weights reroute algorithms), is skipped.
        let duplicate = trials.iter().any(|t| {
            t.candidate.threads == candidate.threads
                && t.candidate.isa == candidate.isa
                && t.plan.as_ref().map(L::ran) == Some(L::ran(&plan))
        });
        if i > 0 && (L::runs_reference(&plan) || duplicate) {
            continue;
        }
        let mut trial = Trial {
            candidate,
            plan: None,
            samples: Vec::new(),
        };
        let warm = clock.call::<L>(&plan, &input, &mut output);
        if warm.is_ok() && !clock.spent() {
            if let Ok(t) = clock.call::<L>(&plan, &input, &mut output) {
                trial.samples.push(t);
            }
        }
        match warm {
            // Estimate's pick cannot run here (the memory a call asks for,
            // say): its plan, unmeasured, as an Estimate plan would be.
            Err(_) if i == 0 => {
                let mut plan = plan;
                L::set_source(&mut plan, ChoiceSource::Estimate);
                return Ok((plan, None));
            }
            // Only Estimate's pick stays untimed (it is the pick then).
            Err(_) => continue,
            Ok(_) if i > 0 && trial.samples.is_empty() => continue,
            Ok(_) => trial.plan = Some(plan),
        }
        trials.push(trial);
    }
    // More rounds for the candidates still in the running, while the
    // budget lasts. Each visit first calls once untimed, so that the timed
    // calls find this candidate's weights in the caches, as the calls of a
    // layer run over and over do (and as benchmarks time them).
    'rounds: loop {
        let mut visited = false;
        for i in 0..trials.len() {
            let best = best_time(&trials);
            let trial = &mut trials[i];
            let Some(time) = trial.time() else { continue };
            if trial.plan.is_some() && out_of_the_running(time, trial.samples.len(), best) {
                trial.plan = None;
            }
            let in_running = trials.iter().filter(|t| t.plan.is_some()).count();
            let trial = &mut trials[i];
            let Some(plan) = &trial.plan else { continue };
            if in_running < 2 || trial.samples.len() >= SAMPLES {
                continue;
            }
            if clock.spent() || clock.call::<L>(plan, &input, &mut output).is_err() {
                break 'rounds;
            }
            for _ in 0..VISIT_SAMPLES {
                if clock.spent() {
                    break 'rounds;
                }
                match clock.call::<L>(plan, &input, &mut output) {
                    Ok(t) => trial.samples.push(t),
                    Err(_) => break 'rounds,
                }
            }
            visited = true;
        }
        if !visited {
            break;
        }
    }
    let pick = choose(&trials);
    let trial = &mut trials[pick];
    let candidate = trial.candidate;
    let plan = match trial.plan.take() {
        Some(plan) => plan,
        // Dropped plans are never the fastest; rebuilt should that change.
        None => conv.plan_for(
            weight,
            bias,
            &candidate.options(estimate, cap),
            ChoiceSource::Measured,
        )?,
    };
    Ok((plan, Some(candidate)))
}

/// The best time of any trial still in the running.
fn best_time<P>(trials: &[Trial<P>]) -> Duration {
    trials
        .iter()
        .filter(|t| t.plan.is_some())
        .filter_map(Trial::<P>::time)
        .min()
        .unwrap_or(Duration::MAX)
}

/// Whether a trial of time `t` over `samples` calls is out of the running
/// against the best time `best`: by [`DROP_FACTOR`] after one call, by
/// [`CLOSE_FACTOR`] after [`CLOSE_AFTER`].
fn out_of_the_running(t: Duration, samples: usize, best: Duration) -> bool {
    let factor = if samples >= CLOSE_AFTER {
        CLOSE_FACTOR
    } else {
        DROP_FACTOR
    };
    t.as_secs_f64() > factor * best.as_secs_f64()
}

/// The index of the trial to keep: the fastest, or Estimate's pick (index
/// 0) when within [`TIE_MARGIN`] of it or when nothing else was timed.
fn choose<P>(trials: &[Trial<P>]) -> usize {
    let fastest = trials
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.time().map(|d| (i, d)))
        .min_by_key(|&(_, d)| d);
    match (trials.first().and_then(Trial::<P>::time), fastest) {
        (_, None) => 0,
        (None, Some((i, _))) => i,
        (Some(est), Some((i, d))) => {
            if est.as_secs_f64() <= d.as_secs_f64() * (1.0 + TIE_MARGIN) {
                0
            } else {
                i
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(algorithm: Algorithm, ms: &[u64]) -> Trial<Conv2dPlan> {
        Trial {
            candidate: Candidate {
                algorithm,
                threads: 1,
                isa: Isa::Portable,
            },
            plan: None,
            samples: ms.iter().map(|&m| Duration::from_millis(m)).collect(),
        }
    }

    #[test]
    fn lower_median() {
        assert_eq!(trial(Algorithm::Implicit, &[]).time(), None);
        let t = |ms: &[u64]| trial(Algorithm::Implicit, ms).time().unwrap().as_millis();
        assert_eq!(t(&[5]), 5);
        assert_eq!(t(&[7, 5]), 5);
        assert_eq!(t(&[9, 5, 7]), 7);
    }

    #[test]
    fn estimate_kept_within_the_margin() {
        let est = trial(Algorithm::DirectDense, &[1010, 1011, 1012]);
        let other = trial(Algorithm::Implicit, &[1000, 1000, 1000]);
        assert_eq!(choose(&[est, other]), 0);
        let est = trial(Algorithm::DirectDense, &[1100]);
        let other = trial(Algorithm::Implicit, &[1000, 1000]);
        assert_eq!(choose(&[est, other]), 1);
        // Estimate's pick untimed (its warm-up spent the budget).
        assert_eq!(choose(&[trial(Algorithm::DirectDense, &[])]), 0);
    }

    #[test]
    fn candidates_put_the_estimate_first() {
        let conv = crate::Conv2dParams::new(1, 64, (14, 14), 64, (3, 3))
            .build()
            .unwrap();
        let own = [Isa::Avx2];
        let c = candidates(&conv, Algorithm::Auto, 2, &own);
        assert_eq!(
            c[0],
            Candidate {
                algorithm: conv.auto_algorithm(),
                threads: 2,
                isa: Isa::Avx2,
            }
        );
        assert_eq!(c.len(), 8);
        assert!(c.iter().all(|c| c.algorithm != Algorithm::Direct));
        assert!(c.iter().all(|c| c.isa == Isa::Avx2));
        let c = candidates(&conv, Algorithm::Im2col, 1, &own);
        assert_eq!(c.len(), 1);
        let c = candidates(&conv, Algorithm::Im2col, 4, &own);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_avx2_twin_is_measured_only_where_the_path_is_open() {
        let all = |_: Isa| true;
        let no_avx2 = |i: Isa| i != Isa::Avx2;
        assert_eq!(
            isa_candidates(Isa::Avx512, false, all),
            [Isa::Avx512, Isa::Avx2]
        );
        // Forced, the path is the caller's.
        assert_eq!(isa_candidates(Isa::Avx512, true, all), [Isa::Avx512]);
        assert_eq!(isa_candidates(Isa::Avx2, true, all), [Isa::Avx2]);
        // An AVX2 CPU (or `CPUCONV_ISA=avx2`) has no other path to try.
        assert_eq!(isa_candidates(Isa::Avx2, false, all), [Isa::Avx2]);
        assert_eq!(isa_candidates(Isa::Portable, false, all), [Isa::Portable]);
        // A CPU (or VM) that reports AVX-512 without AVX2.
        assert_eq!(isa_candidates(Isa::Avx512, false, no_avx2), [Isa::Avx512]);
    }

    #[test]
    fn the_avx2_twin_of_the_estimate_comes_second() {
        let conv = crate::Conv2dParams::new(1, 64, (14, 14), 64, (3, 3))
            .build()
            .unwrap();
        let pick = conv.auto_algorithm();
        let isas = [Isa::Avx512, Isa::Avx2];
        let c = candidates(&conv, Algorithm::Auto, 2, &isas);
        let at = |algorithm, threads, isa| Candidate {
            algorithm,
            threads,
            isa,
        };
        assert_eq!(
            c[..4],
            [
                at(pick, 2, Isa::Avx512),
                at(pick, 2, Isa::Avx2),
                at(pick, 1, Isa::Avx512),
                at(pick, 1, Isa::Avx2),
            ]
        );
        // Then every other algorithm on the CPU's path before any on AVX2.
        assert_eq!(c.len(), 16);
        assert!(c[4..10].iter().all(|c| c.isa == Isa::Avx512));
        assert!(c[10..].iter().all(|c| c.isa == Isa::Avx2));
        // Every candidate on the CPU's path has its AVX2 twin.
        for x in c.iter().filter(|c| c.isa == Isa::Avx512) {
            assert!(
                c.contains(&Candidate {
                    isa: Isa::Avx2,
                    ..*x
                }),
                "{x:?}"
            );
        }
        // An explicit algorithm on one thread: the path alone is measured.
        let c = candidates(&conv, Algorithm::Im2col, 1, &isas);
        assert_eq!(
            c,
            [
                at(Algorithm::Im2col, 1, Isa::Avx512),
                at(Algorithm::Im2col, 1, Isa::Avx2)
            ]
        );
    }

    /// On this CPU: with the path left open, an AVX-512 CPU's candidates
    /// include the AVX2 twin; with a path forced, none does.
    #[test]
    fn candidates_on_this_cpu() {
        let conv = crate::Conv2dParams::new(1, 32, (10, 10), 48, (3, 3))
            .build()
            .unwrap();
        let default = crate::arch::clamp_isa(crate::isa());
        let open = candidates(
            &conv,
            Algorithm::Auto,
            1,
            &isa_candidates(default, false, Isa::is_supported),
        );
        assert_eq!(open[0].isa, default);
        let twin = open.get(1).map(|c| (c.algorithm, c.isa));
        if default == Isa::Avx512 && Isa::Avx2.is_supported() {
            assert_eq!(twin, Some((conv.auto_algorithm(), Isa::Avx2)));
        } else {
            assert!(open.iter().all(|c| c.isa == default));
        }
        for forced in crate::arch::supported_isas() {
            let c = candidates(
                &conv,
                Algorithm::Auto,
                1,
                &isa_candidates(forced, true, Isa::is_supported),
            );
            assert!(c.iter().all(|c| c.isa == forced), "{forced}");
        }
    }

    #[test]
    fn wisdom_applies_only_where_it_can_run_and_is_not_overruled() {
        let choice = |run_isa| Choice {
            algorithm: Algorithm::Implicit,
            threads: 1,
            run_isa,
        };
        let all = |_: Isa| true;
        let no_avx2 = |i: Isa| i != Isa::Avx2;
        let avx2 = choice(Isa::Avx2);
        assert!(applies(&avx2, Isa::Avx512, false, all));
        // A path this CPU cannot run: ignored.
        assert!(!applies(&avx2, Isa::Avx512, false, no_avx2));
        // A forced path is the path the plan runs.
        assert!(!applies(&avx2, Isa::Avx512, true, all));
        assert!(applies(&choice(Isa::Avx512), Isa::Avx512, true, all));
        assert!(applies(&choice(Isa::Avx512), Isa::Avx512, false, no_avx2));
    }
}
