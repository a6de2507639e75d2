//! Wall-clock measurement: warm-up, then the median of samples that are each
//! long enough to sit well above timer and scheduler noise.

use std::convert::Infallible;
use std::time::{Duration, Instant};

/// How long a measurement may take and how long each sample must be.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Rough bound on the timed samples of one measurement (the warm-up
    /// and the minimum sample count can exceed it for slow calls).
    pub total: Duration,
    /// Shortest sample: calls are repeated inside a sample until it is this long.
    pub min_sample: Duration,
    /// Fewest samples, however slow a call is.
    pub min_samples: usize,
    /// Most samples, however fast a call is.
    pub max_samples: usize,
    /// How long short calls are repeated before the samples (after one
    /// first call, which is always made).
    pub warm_up: Duration,
}

impl Budget {
    /// `total` per measurement, samples of at least 20 ms, 3 to 25 of them,
    /// after 100 ms of warm-up.
    pub fn new(total: Duration) -> Self {
        Budget {
            total,
            min_sample: Duration::from_millis(20),
            min_samples: 3,
            max_samples: 25,
            warm_up: Duration::from_millis(100),
        }
    }

    /// This budget with `warm_up` of warm-up.
    pub fn warm_up(self, warm_up: Duration) -> Self {
        Budget { warm_up, ..self }
    }
}

/// The result of one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Median seconds per call.
    pub median_s: f64,
    /// Fastest sample, seconds per call.
    pub min_s: f64,
    /// Samples taken.
    pub samples: usize,
    /// Calls per sample.
    pub reps: usize,
}

/// Times `f`: warms up (one call, then more for `budget.warm_up` when calls are
/// short), picks how many calls make a sample of at least
/// `budget.min_sample`, and returns the median seconds per call over as many
/// samples as fit in `budget.total` (clamped to the budget's sample range).
pub fn measure(budget: &Budget, mut f: impl FnMut()) -> Timing {
    try_measure(budget, || -> Result<(), Infallible> {
        f();
        Ok(())
    })
    .unwrap_or_else(|never| match never {})
}

/// [`measure`] for a call that can fail: the first error ends the
/// measurement and is returned. An algorithm a pass does not support fails
/// on its first (warm-up) call, so it costs nothing to find out.
pub fn try_measure<E>(budget: &Budget, mut f: impl FnMut() -> Result<(), E>) -> Result<Timing, E> {
    // Warm-up: the first call pays for page faults, kernel tables, packing
    // buffers; short calls get more warm-up to settle caches and clocks.
    let start = Instant::now();
    f()?;
    let mut per_call = start.elapsed();
    let warm_until = Instant::now() + budget.warm_up;
    if per_call < budget.min_sample {
        while Instant::now() < warm_until {
            let t = Instant::now();
            f()?;
            per_call = per_call.min(t.elapsed());
        }
    }
    let per_call = per_call.max(Duration::from_nanos(1));
    let reps = (budget.min_sample.as_secs_f64() / per_call.as_secs_f64())
        .ceil()
        .max(1.0) as usize;
    let sample = per_call.as_secs_f64() * reps as f64;
    let samples = ((budget.total.as_secs_f64() / sample) as usize).clamp(
        budget.min_samples,
        budget.max_samples.max(budget.min_samples),
    );
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        times.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    let median_s = if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    };
    Ok(Timing {
        median_s,
        min_s: times[0],
        samples,
        reps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_calls_are_batched_and_bounded() {
        let b = Budget::new(Duration::from_millis(100));
        let mut calls = 0u64;
        let t = measure(&b, || {
            calls += 1;
            std::hint::black_box(calls);
        });
        assert!(t.reps > 1);
        assert!((3..=25).contains(&t.samples));
        assert!(t.median_s > 0.0 && t.min_s <= t.median_s);
    }

    #[test]
    fn a_failing_call_stops_at_once() {
        let b = Budget::new(Duration::from_millis(100));
        let mut calls = 0u64;
        let r = try_measure(&b, || {
            calls += 1;
            Err::<(), _>("no")
        });
        assert_eq!(r.unwrap_err(), "no");
        assert_eq!(calls, 1);
    }
}
