//! Time windows the policies keep: recommendations to stabilize over, and per-second averages.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Instant;

/// Whether `t` lies in the window `(now - window, now]` (later instants count as inside).
fn within(now: Instant, t: Instant, window: Duration) -> bool {
    now.saturating_since(t) < window
}

/// Past recommendations, for Kubernetes' stabilization windows.
///
/// A scale-up goes no higher than the lowest recommendation of the scale-up window; a
/// scale-down goes no lower than the highest recommendation of the scale-down window
/// (`stabilizeRecommendationWithBehaviors` in Kubernetes' HPA controller). The raw
/// recommendations are kept, not the stabilized ones.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recommendations {
    recs: VecDeque<(Instant, u32)>,
}

impl Recommendations {
    /// Whether nothing was recorded yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Records a recommendation without stabilizing (Kubernetes seeds a new autoscaler's
    /// window with the current count, so that a restart does not scale down at once).
    pub(crate) fn seed(&mut self, now: Instant, replicas: u32) {
        self.recs.push_back((now, replicas));
    }

    /// Stabilizes `proposal` against the windows, then records it.
    pub(crate) fn stabilize(
        &mut self,
        now: Instant,
        current: u32,
        proposal: u32,
        up_window: Duration,
        down_window: Duration,
    ) -> u32 {
        let (mut up, mut down) = (proposal, proposal);
        for &(t, rec) in &self.recs {
            if within(now, t, up_window) {
                up = up.min(rec);
            }
            if within(now, t, down_window) {
                down = down.max(rec);
            }
        }
        let stabilized = current.max(up).min(down);
        self.recs.push_back((now, proposal));
        let keep = up_window.max(down_window);
        while self.recs.front().is_some_and(|&(t, _)| !within(now, t, keep)) {
            self.recs.pop_front();
        }
        stabilized
    }
}

/// One bucket a second of a measurement, averaged over a window, as Knative's
/// `TimedFloat64Buckets`: a value recorded many times a second weighs as one second.
#[derive(Clone, Debug)]
pub(crate) struct BucketAverage {
    /// (second since the origin, sum, count), oldest first.
    buckets: VecDeque<(u64, f64, u32)>,
    /// Buckets older than this many seconds are dropped.
    keep_secs: u64,
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A window in whole buckets, at least one.
fn window_buckets(window: Duration) -> u64 {
    let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
    nanos.div_ceil(NANOS_PER_SEC).max(1)
}

impl BucketAverage {
    /// Keeps enough buckets for windows up to `longest`.
    pub(crate) fn new(longest: Duration) -> Self {
        BucketAverage { buckets: VecDeque::new(), keep_secs: window_buckets(longest) }
    }

    /// Records a value measured at `now` (a value from the past is added to the latest bucket).
    pub(crate) fn record(&mut self, now: Instant, value: f64) {
        let second = now.as_nanos() / NANOS_PER_SEC;
        match self.buckets.back_mut() {
            Some((s, sum, count)) if *s >= second => {
                *sum += value;
                *count += 1;
            }
            _ => self.buckets.push_back((second, value, 1)),
        }
        while self.buckets.front().is_some_and(|&(s, _, _)| s + self.keep_secs <= second) {
            self.buckets.pop_front();
        }
    }

    /// The mean of the per-second means recorded in the window ending at `now`, or `None` when
    /// nothing was recorded in it. Seconds without a record do not count (a missed scrape is
    /// not a second without load).
    pub(crate) fn average(&self, now: Instant, window: Duration) -> Option<f64> {
        let second = now.as_nanos() / NANOS_PER_SEC;
        let n = window_buckets(window);
        let (total, buckets) = self
            .buckets
            .iter()
            .filter(|&&(s, _, _)| s + n > second)
            .fold((0.0, 0u32), |(total, k), &(_, sum, count)| (total + sum / f64::from(count), k + 1));
        (buckets > 0).then(|| total / f64::from(buckets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::secs;

    const MIN5: Duration = Duration::from_secs(300);

    #[test]
    fn scale_down_takes_the_highest_recommendation_of_the_window() {
        let mut r = Recommendations::default();
        assert_eq!(r.stabilize(secs(0), 10, 10, Duration::ZERO, MIN5), 10);
        assert_eq!(r.stabilize(secs(60), 10, 4, Duration::ZERO, MIN5), 10);
        assert_eq!(r.stabilize(secs(120), 10, 6, Duration::ZERO, MIN5), 10);
        // 10 was recommended at t = 0: at 300 s it has left the window, 6 (at 120 s) is highest.
        assert_eq!(r.stabilize(secs(300), 10, 3, Duration::ZERO, MIN5), 6);
        assert_eq!(r.stabilize(secs(421), 6, 3, Duration::ZERO, MIN5), 3);
        // Scale-up is immediate with a zero up window.
        assert_eq!(r.stabilize(secs(422), 3, 12, Duration::ZERO, MIN5), 12);
        assert!(r.recs.len() <= 4, "{:?}", r.recs);
    }

    #[test]
    fn scale_up_takes_the_lowest_recommendation_of_its_window() {
        let mut r = Recommendations::default();
        let up = Duration::from_secs(60);
        assert_eq!(r.stabilize(secs(0), 4, 4, up, Duration::ZERO), 4);
        assert_eq!(r.stabilize(secs(10), 4, 9, up, Duration::ZERO), 4);
        assert_eq!(r.stabilize(secs(20), 4, 8, up, Duration::ZERO), 4);
        assert_eq!(r.stabilize(secs(61), 4, 9, up, Duration::ZERO), 8);
    }

    #[test]
    fn a_window_near_the_origin_is_not_cut_short() {
        let mut r = Recommendations::default();
        r.seed(Instant::ZERO, 8);
        assert_eq!(r.stabilize(Instant::from_millis(1), 8, 2, Duration::ZERO, MIN5), 8);
    }

    #[test]
    fn bucket_average_weighs_each_second_once() {
        let mut b = BucketAverage::new(Duration::from_secs(60));
        assert_eq!(b.average(secs(0), Duration::from_secs(6)), None);
        // Ten samples of 10 in second 0, one sample of 40 in second 1.
        for i in 0..10 {
            b.record(Instant::from_millis(i * 100), 10.0);
        }
        b.record(secs(1), 40.0);
        assert_eq!(b.average(secs(1), Duration::from_secs(6)), Some(25.0));
        // Only second 1 is within a one-second window.
        assert_eq!(b.average(secs(1), Duration::from_secs(1)), Some(40.0));
        // Long after, nothing is left in a short window.
        assert_eq!(b.average(secs(100), Duration::from_secs(6)), None);
        b.record(secs(200), 1.0);
        assert_eq!(b.buckets.len(), 1);
    }
}
