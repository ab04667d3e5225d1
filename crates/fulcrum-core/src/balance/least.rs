//! Least connections and least response time: a full scan for the lowest cost.
//!
//! * `least_connections` (NGINX `least_conn`, HAProxy `leastconn`): cost =
//!   (in-flight requests + 1) / capacity, where capacity is the effective weight times the
//!   endpoint's learned speed ([`LoadSignals::capacity`](crate::endpoint::LoadSignals::capacity)).
//!   With speed as capacity this is the "shortest expected delay" rule: a request queued
//!   behind n others on a server of rate mu waits about (n + 1) / mu, and the rule beats
//!   joining the shortest queue when servers differ in speed. The speed is learned from the
//!   endpoint's answers ([`perf`](crate::endpoint::perf)), so a backend slowed to half speed
//!   takes about half the work with no label or weight change; until answers arrive it is 1.
//!   In-flight counts last until a response stream ends, so a backend holding long LLM
//!   streams looks busy for as long as it is. The `+ 1` makes an idle fast endpoint cheaper
//!   than an idle slow one.
//! * `least_response_time`: cost = peak-EWMA latency x (in flight + 1) x (1 + consecutive
//!   failures) / effective weight (Finagle's and Linkerd's peak-EWMA load, over the whole pool
//!   rather than two samples). Failures are recorded as at least a configured penalty
//!   (1 s by default), so a backend that fails fast never looks cheapest. The latency is
//!   already the endpoint's measured speed: dividing by the learned speed as well would count
//!   it twice (cost in 1/speed squared), so this cost does not.
//!
//! Ties go to the first endpoint at or after a rotating start, so idle endpoints share work
//! in turn instead of the first one taking all. Cost: O(n) a pick; for large pools
//! `power_of_two` gets nearly the same balance at O(1) (Mitzenmacher, 2001).
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=3).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new(Policy::LeastConnections, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let facts = RequestFacts::default();
//! // Two long streams are held on whatever endpoints were picked...
//! let a = pool.pick(&facts, Instant::ZERO, &mut rng, |_| true).unwrap();
//! let _held_a = pool.begin(a, 0, Instant::ZERO);
//! let b = pool.pick(&facts, Instant::ZERO, &mut rng, |_| true).unwrap();
//! let _held_b = pool.begin(b, 0, Instant::ZERO);
//! // ...so the third request goes to the idle one.
//! let c = pool.pick(&facts, Instant::ZERO, &mut rng, |_| true).unwrap();
//! assert_eq!(c.signals().in_flight(), 0);
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balance, PickCx, PoolView, min_cost};
use crate::endpoint::{Endpoint, LatencyConfig};
use crate::time::Instant;

/// Fewest in-flight requests per unit of weight.
#[derive(Debug, Default)]
pub(crate) struct LeastConnections {
    start: AtomicUsize,
}

/// The cost `least_connections` and `power_of_two` (least request) compare.
#[inline]
pub(crate) fn request_cost(e: &Endpoint) -> f64 {
    let s = e.signals();
    (s.in_flight() as f64 + 1.0) / s.capacity()
}

/// The cost `least_response_time` and `power_of_two` (peak EWMA) compare.
#[inline]
pub(crate) fn latency_cost(e: &Endpoint, now: Instant, latency: &LatencyConfig) -> f64 {
    let s = e.signals();
    s.ewma_cost(now, latency) / s.effective_weight().max(f64::MIN_POSITIVE)
}

impl Balance for LeastConnections {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        min_cost(pool, start, cx, request_cost)
    }
}

/// Lowest peak-EWMA cost over the whole pool.
#[derive(Debug, Default)]
pub(crate) struct LeastResponseTime {
    start: AtomicUsize,
}

impl Balance for LeastResponseTime {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let (now, latency) = (cx.now, pool.latency);
        min_cost(pool, start, cx, |e| latency_cost(e, now, latency))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use crate::{Instant, Outcome, Policy, RequestFacts};
    use rand::{SeedableRng, rngs::SmallRng};
    use std::time::Duration;

    #[test]
    fn least_connections_respects_weights() {
        // Weight 2 takes two in flight before weight 1 takes its first... after the +1 rule:
        // costs (0+1)/2 < (0+1)/1, (1+1)/2 = (0+1)/1 (tie broken by rotation), and so on.
        let pool = selector(Policy::LeastConnections, &[2, 1]);
        let mut rng = SmallRng::seed_from_u64(0);
        let mut guards = Vec::new();
        for _ in 0..30 {
            let i = pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap();
            guards.push(pool.begin(&pool.endpoints()[i].clone(), 0, Instant::ZERO));
        }
        let loads: Vec<u64> = pool.endpoints().iter().map(|e| e.signals().in_flight()).collect();
        assert_eq!(loads.iter().sum::<u64>(), 30);
        assert!((19..=21).contains(&loads[0]), "{loads:?}");
    }

    #[test]
    fn least_connections_gives_a_slow_backend_less_without_a_label() {
        // Same weights; endpoint 0's answers take twice as long as the others'.
        let pool = selector(Policy::LeastConnections, &[1, 1, 1]);
        let prior = pool.pool_perf();
        for t in 0..40u64 {
            let now = Instant::from_millis(t * 50);
            for (i, e) in pool.endpoints().iter().enumerate() {
                let held = Duration::from_millis(if i == 0 { 800 } else { 400 });
                e.signals().perf().finished(held, None, &prior, now);
            }
        }
        assert!(pool.refresh(Instant::from_millis(2000)).is_none());
        let speeds: Vec<f64> = pool.endpoints().iter().map(|e| e.signals().learned_speed()).collect();
        assert!(speeds[1] / speeds[0] > 1.8 && (speeds[1] - speeds[2]).abs() < 1e-9, "{speeds:?}");
        // Weighted by static weight, speeds average 1: learning moves work, it adds none.
        assert!((speeds.iter().sum::<f64>() - 3.0).abs() < 1e-9, "{speeds:?}");
        let mut rng = SmallRng::seed_from_u64(0);
        let mut guards = Vec::new();
        for _ in 0..50 {
            let i = pool.pick_index(&RequestFacts::default(), Instant::from_millis(2000), &mut rng, |_| true).unwrap();
            guards.push(pool.begin(&pool.endpoints()[i].clone(), 0, Instant::from_millis(2000)));
        }
        let loads: Vec<u64> = pool.endpoints().iter().map(|e| e.signals().in_flight()).collect();
        // Shortest expected delay: in flight in proportion to speed (about 1 : 2 : 2).
        assert!(loads[0] * 3 < loads[1] * 2 && loads[0] * 3 < loads[2] * 2, "{loads:?}");
    }

    #[test]
    fn least_response_time_avoids_slow_and_failing() {
        let pool = selector(Policy::LeastResponseTime, &[1, 1, 1]);
        let cfg = *pool.options().latency();
        let now = Instant::from_millis(100);
        let e = pool.endpoints();
        e[0].signals().observe(Duration::from_millis(400), Outcome::Success, now, &cfg);
        e[1].signals().observe(Duration::from_micros(100), Outcome::Failure, now, &cfg);
        e[2].signals().observe(Duration::from_millis(50), Outcome::Success, now, &cfg);
        let mut rng = SmallRng::seed_from_u64(0);
        for _ in 0..5 {
            assert_eq!(pool.pick_index(&RequestFacts::default(), now, &mut rng, |_| true), Some(2));
        }
        // Vetoing the best leaves the next best, never the failing one.
        let best = e[2].id().clone();
        assert_eq!(pool.pick_index(&RequestFacts::default(), now, &mut rng, |x| *x.id() != best), Some(0));
    }
}
