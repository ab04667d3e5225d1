//! Power of k choices: the best of k distinct random candidates.
//!
//! Mitzenmacher's "power of two choices" (2001): sampling two endpoints and taking the less
//! loaded one brings the maximum load from O(log n / log log n) down to O(log log n), nearly
//! what a full scan achieves, at O(1) cost, and without the herding that makes every proxy of
//! a fleet pick the same "least loaded" endpoint at once. Envoy's least request and
//! Linkerd's and Finagle's P2C do this. Candidates are distinct (Floyd's sampling), k is
//! configurable (2 by default), pools of at most k endpoints are scanned whole, and the cost
//! is either least request ((in flight + 1) / capacity: effective weight x learned speed) or
//! peak EWMA (see
//! [`least`](super::least)). Vetoed candidates are skipped; if all k are, sampling repeats
//! twice, then the whole pool is scanned. Cost: O(k) a pick.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=2).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new(Policy::default(), Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let busy = pool.endpoints()[0].clone();
//! let _held = pool.begin(&busy, 0, Instant::ZERO);
//! // With two endpoints both are always sampled: the idle one wins.
//! let pick = pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap();
//! assert_eq!(pick.id(), pool.endpoints()[1].id());
//! ```

use super::least::{latency_cost, request_cost};
use super::{Balance, PickCx, PoolView, min_cost};
use crate::endpoint::{Endpoint, LatencyConfig};
use crate::hash::reduce;
use crate::policy::Cost;
use crate::time::Instant;

const RESAMPLES: usize = 3;
const MAX_K: usize = 64;
/// Draws a weighted sample takes at most, per candidate.
const WEIGHTED_TRIES: usize = 16;

/// The best of k distinct random candidates.
#[derive(Debug)]
pub(crate) struct PowerOfK {
    k: usize,
    cost: Cost,
}

impl PowerOfK {
    pub(crate) fn new(k: usize, cost: Cost) -> Self {
        PowerOfK { k: k.clamp(1, MAX_K), cost }
    }
}

#[inline]
fn cost_of(kind: Cost, e: &Endpoint, now: Instant, latency: &LatencyConfig) -> f64 {
    match kind {
        Cost::LeastRequest => request_cost(e),
        Cost::PeakEwma => latency_cost(e, now, latency),
    }
}

/// Draws an endpoint with probability in proportion to its capacity, by rejection against the
/// pool's largest (at most `WEIGHTED_TRIES` draws, then the last one).
fn weighted_draw(pool: &PoolView<'_>, max_capacity: f64, cx: &mut PickCx<'_>) -> usize {
    let n = pool.endpoints.len();
    let mut idx = 0;
    for _ in 0..WEIGHTED_TRIES {
        idx = reduce(cx.rng.next_u64(), n);
        let keep = pool.endpoints[idx].signals().capacity() / max_capacity;
        if (cx.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < keep {
            break;
        }
    }
    idx
}

/// k distinct indices below n (k < n), each drawn in proportion to capacity; fewer when
/// draws keep repeating. Returns how many.
fn sample_weighted(
    pool: &PoolView<'_>,
    k: usize,
    max_capacity: f64,
    cx: &mut PickCx<'_>,
    out: &mut [usize; MAX_K],
) -> usize {
    let mut len = 0;
    for _ in 0..2 * k {
        let idx = weighted_draw(pool, max_capacity, cx);
        if !out[..len].contains(&idx) {
            out[len] = idx;
            len += 1;
            if len == k {
                break;
            }
        }
    }
    len
}

/// k distinct indices below n (k < n), by Floyd's algorithm.
fn sample_distinct(n: usize, k: usize, cx: &mut PickCx<'_>, out: &mut [usize; MAX_K]) {
    for (len, j) in ((n - k)..n).enumerate() {
        let t = reduce(cx.rng.next_u64(), j + 1);
        out[len] = if out[..len].contains(&t) { j } else { t };
    }
}

impl Balance for PowerOfK {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let (now, latency, kind) = (cx.now, pool.latency, self.cost);
        if n > self.k {
            let mut sample = [0usize; MAX_K];
            // Least request samples in proportion to capacity where capacities differ: a
            // uniform sample would cap what a fast endpoint can take at k/n of the requests
            // however idle it is.
            let weighted = match kind {
                Cost::LeastRequest => pool.load.uneven_max_capacity(),
                Cost::PeakEwma => None,
            };
            for _ in 0..RESAMPLES {
                let len = match weighted {
                    Some(max) => sample_weighted(pool, self.k, max, cx, &mut sample),
                    None => {
                        sample_distinct(n, self.k, cx, &mut sample);
                        self.k
                    }
                };
                // Floyd's sample is a uniform set but not in random order; ties go to the
                // first candidate seen, so start at a random one.
                let rot = reduce(cx.rng.next_u64(), len);
                let mut best: Option<(usize, f64)> = None;
                for i in 0..len {
                    let idx = sample[(i + rot) % len];
                    let c = cost_of(kind, &pool.endpoints[idx], now, latency);
                    if best.is_none_or(|(_, b)| c < b) && cx.accepts(pool, idx) {
                        best = Some((idx, c));
                    }
                }
                if let Some((idx, _)) = best {
                    return Some(idx);
                }
            }
        }
        // Small pools, or every sample vetoed: scan the whole pool.
        let start = reduce(cx.rng.next_u64(), n);
        min_cost(pool, start, cx, |e| cost_of(kind, e, now, latency))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use super::*;
    use crate::{Instant, Policy, RequestFacts};
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn floyd_samples_are_distinct_and_cover() {
        let facts = RequestFacts::default();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut accept = |_: &Endpoint| true;
        let mut cx = PickCx { facts: &facts, now: Instant::ZERO, rng: &mut rng, accept: &mut accept, cached_blocks: 0 };
        let mut out = [0usize; MAX_K];
        let mut seen = [0u32; 10];
        for _ in 0..1000 {
            sample_distinct(10, 4, &mut cx, &mut out);
            let s = &out[..4];
            assert!(s.iter().all(|&x| x < 10));
            assert!((0..4).all(|i| (i + 1..4).all(|j| s[i] != s[j])), "{s:?}");
            s.iter().for_each(|&x| seen[x] += 1);
        }
        assert!(seen.iter().all(|&c| (300..500).contains(&c)), "{seen:?}");
    }

    #[test]
    fn ties_are_broken_at_random() {
        // All idle: every endpoint must get its turn, including the last index.
        let pool = selector(Policy::default(), &[1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut counts = [0u32; 3];
        for _ in 0..3_000 {
            counts[pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| (900..1100).contains(&c)), "{counts:?}");
    }

    #[test]
    fn p2c_keeps_load_near_even() {
        let pool = selector(Policy::default(), &[1; 50]);
        let mut rng = SmallRng::seed_from_u64(9);
        let mut guards = Vec::new();
        for _ in 0..5_000 {
            let e = pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap().clone();
            guards.push(pool.begin(&e, 0, Instant::ZERO));
        }
        let max = pool.endpoints().iter().map(|e| e.signals().in_flight()).max().unwrap();
        // Average 100; random placement would give about 125 here, P2C stays within a few.
        assert!(max <= 103, "max load {max}");
    }

    #[test]
    fn a_fast_endpoint_can_take_more_than_k_over_n() {
        // Weight 8 among seven of weight 1: its share is 8/15. A uniform sample of 2 out of
        // 8 would see it in only a quarter of the picks, capping it there.
        let pool = selector(Policy::default(), &[8, 1, 1, 1, 1, 1, 1, 1]);
        assert!(pool.refresh(Instant::ZERO).is_none());
        let mut rng = SmallRng::seed_from_u64(5);
        let mut guards = Vec::new();
        for _ in 0..1_500 {
            let e = pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap().clone();
            guards.push(pool.begin(&e, 0, Instant::ZERO));
        }
        let heavy = pool.endpoints()[0].signals().in_flight();
        assert!((700..=900).contains(&heavy), "weight 8 holds {heavy} of 1500");
    }

    #[test]
    fn k_larger_than_pool_scans() {
        let pool = selector(Policy::PowerOfTwo { choices: 8, cost: Cost::PeakEwma }, &[1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(9);
        let first = pool.endpoints()[0].id().clone();
        for _ in 0..20 {
            let p = pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |e| *e.id() != first).unwrap();
            assert_ne!(*p.id(), first);
        }
    }
}
