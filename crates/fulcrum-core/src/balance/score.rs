//! Score: weighted scorers over engine metrics, prefix matches and load, in the style of
//! llm-d's endpoint picker.
//!
//! The Gateway API Inference Extension's endpoint picker (used by llm-d) filters out
//! saturated model servers, then ranks the rest by a weighted sum of scorers, each giving
//! 0 to 1. This policy does the same with what the proxy knows:
//!
//! 1. **Candidates**: the acceptable endpoints (the veto).
//! 2. **Saturation filter**: drop endpoints whose fresh engine report says
//!    `waiting >= max_waiting` (default 5) or `kv_usage >= max_kv_usage` (default 0.8), the
//!    Inference Extension's saturation-detector defaults. If that would drop every
//!    candidate, keep them all: the filter never empties the set.
//! 3. **Scorers**, each from 0 (worst) to 1 (best), normalised across the remaining
//!    candidates:
//!    - `queue`: 1 - waiting / most waiting among candidates (1 when nobody waits);
//!    - `kv_cache`: 1 - KV-cache use;
//!    - `prefix`: leading prompt blocks the endpoint holds / prompt blocks (0 without a
//!      prompt), from the pool's [`PrefixIndex`](crate::prefix::PrefixIndex);
//!    - `load`: 1 - L / largest L among candidates, where L = (in-flight tokens + this
//!      request's) / capacity, as `least_tokens` computes it;
//!    - `lora`: 1 if the endpoint has the adapter the request's `model` names loaded, 0 if
//!      not (0 for everyone when no endpoint has it).
//! 4. Pick the highest `sum(weight x score)`, ties going to the first candidate from a
//!    rotating start; record the prompt's blocks against it.
//!
//! Default weights: `prefix` 3, `queue` 2, `kv_cache` 2, `load` 1, `lora` 1.
//!
//! **Unknown is not idle.** An endpoint without an engine report younger than the pool's
//! [`SelectorOptions::engine_max_age`](crate::SelectorOptions::engine_max_age) (2 s by
//! default) gets the neutral 0.5 for `queue` and `kv_cache`, and is never filtered as
//! saturated; its `load` and `prefix` scores still count, so it is judged by the proxy's
//! own view. A stale report that said "idle" therefore cannot attract traffic.
//!
//! **Cost**: O(n) a pick (every candidate is asked the veto and scored; one allocation of n
//! small records), plus the prefix index's lookup and record, O(blocks x 8), under its lock.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=3).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new("score".parse().unwrap(), Default::default(), specs, Instant::ZERO).unwrap();
//! let now = Instant::from_millis(10_000);
//! let e = pool.endpoints();
//! e[0].signals().report_engine(12, 60, 0.95, now); // saturated
//! e[1].signals().report_engine(1, 20, 0.30, now);
//! e[2].signals().report_engine(0, 10, 0.10, now);
//! let mut rng = SmallRng::seed_from_u64(7);
//! assert_eq!(pool.pick_index(&RequestFacts::default(), now, &mut rng, |_| true), Some(2));
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use super::ai::{Capacities, IndexView, request_tokens, wanted_adapter};
use super::{Balance, PickCx, PoolView};
use crate::endpoint::EngineLoad;
use crate::policy::ScoreWeights;
use crate::prefix::MAX_HOLDERS;

const NEUTRAL: f64 = 0.5;

/// Weighted scorers after a saturation filter.
#[derive(Debug)]
pub(crate) struct Score {
    index: IndexView,
    capacities: Capacities,
    weights: ScoreWeights,
    max_waiting: u32,
    max_kv_usage: f64,
    start: AtomicUsize,
}

struct Candidate {
    idx: usize,
    load: f64,
    engine: Option<EngineLoad>,
    adapter: bool,
}

impl Score {
    pub(crate) fn new(
        index: IndexView,
        capacities: Capacities,
        weights: ScoreWeights,
        max_waiting: u32,
        max_kv_usage: f64,
    ) -> Self {
        Score { index, capacities, weights, max_waiting, max_kv_usage, start: AtomicUsize::new(0) }
    }

    fn saturated(&self, c: &Candidate) -> bool {
        c.engine.is_some_and(|e| e.waiting >= self.max_waiting || e.kv_usage >= self.max_kv_usage)
    }
}

impl Balance for Score {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let (now, max_age) = (cx.now, pool.engine_max_age);
        let r = request_tokens(cx.facts);
        let adapter = wanted_adapter(pool, cx.facts);
        let mut candidates: Vec<Candidate> = Vec::with_capacity(n);
        for i in 0..n {
            let idx = (start + i) % n;
            if !cx.accepts(pool, idx) {
                continue;
            }
            let e = &pool.endpoints[idx];
            candidates.push(Candidate {
                idx,
                load: self.capacities.load_after(idx, e, r),
                engine: e.signals().engine(now, max_age),
                adapter: adapter.is_some_and(|k| e.signals().has_adapter_key(k)),
            });
        }
        if candidates.iter().any(|c| !self.saturated(c)) {
            candidates.retain(|c| !self.saturated(c));
        }
        let prefix = cx.facts.prefix;
        let mut matched = [(usize::MAX, 0u32); MAX_HOLDERS];
        let mut m = 0;
        self.index.matches(prefix, |idx, blocks| {
            if m < MAX_HOLDERS {
                matched[m] = (idx, blocks);
                m += 1;
            }
        });
        let max_waiting = candidates.iter().filter_map(|c| c.engine.map(|e| e.waiting)).max().unwrap_or(0);
        let max_load = candidates.iter().map(|c| c.load).fold(0.0, f64::max);
        let w = &self.weights;
        let mut best: Option<(usize, f64)> = None;
        for c in &candidates {
            let (queue, kv) = match c.engine {
                Some(e) if max_waiting == 0 => (1.0, 1.0 - e.kv_usage),
                Some(e) => (1.0 - f64::from(e.waiting) / f64::from(max_waiting), 1.0 - e.kv_usage),
                None => (NEUTRAL, NEUTRAL),
            };
            let held = matched[..m].iter().find(|(i, _)| *i == c.idx).map_or(0, |(_, b)| *b);
            let prefix_score = if prefix.is_empty() { 0.0 } else { f64::from(held) / prefix.len() as f64 };
            let load = if max_load > 0.0 { 1.0 - c.load / max_load } else { 1.0 };
            let score = w.queue * queue
                + w.kv_cache * kv
                + w.prefix * prefix_score
                + w.load * load
                + w.lora * f64::from(u8::from(c.adapter));
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((c.idx, score));
            }
        }
        let chosen = best.map(|(idx, _)| idx);
        if let Some(idx) = chosen {
            self.index.record(idx, prefix);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::specs;
    use crate::openai::text_prefix;
    use crate::policy::{Capacity, ScoreWeights};
    use crate::{Instant, Policy, RequestFacts, Selector, SelectorOptions};
    use rand::{SeedableRng, rngs::SmallRng};

    fn policy(weights: ScoreWeights) -> Policy {
        Policy::Score { weights, max_waiting: 5, max_kv_usage: 0.8, cache_blocks: 1_000, capacity: Capacity::Weight }
    }

    fn pool(weights: ScoreWeights, n: usize) -> Selector {
        let options = SelectorOptions::default().with_engine_max_age(Duration::from_secs(2));
        Selector::try_new(policy(weights), options, specs(&vec![1; n]), Instant::ZERO).unwrap()
    }

    const NOW: Instant = Instant::from_millis(100_000);

    fn pick(pool: &Selector, facts: &RequestFacts<'_>, rng: &mut SmallRng) -> Option<usize> {
        pool.pick_index(facts, NOW, rng, |_| true)
    }

    #[test]
    fn the_saturation_filter_never_empties_the_set() {
        let pool = pool(ScoreWeights::default(), 3);
        let mut rng = SmallRng::seed_from_u64(0);
        let e = pool.endpoints();
        e[0].signals().report_engine(9, 1, 0.1, NOW);
        e[1].signals().report_engine(0, 1, 0.85, NOW);
        e[2].signals().report_engine(6, 1, 0.2, NOW);
        // Every endpoint saturated: all stay candidates and the best of them wins.
        assert!(pick(&pool, &RequestFacts::default(), &mut rng).is_some());
        // One not saturated: it wins even though its queue score alone is not the best.
        e[1].signals().report_engine(4, 1, 0.79, NOW);
        for _ in 0..5 {
            assert_eq!(pick(&pool, &RequestFacts::default(), &mut rng), Some(1));
        }
    }

    #[test]
    fn stale_metrics_are_unknown_not_idle() {
        let pool = pool(ScoreWeights { prefix: 0.0, load: 0.0, lora: 0.0, ..ScoreWeights::default() }, 2);
        let mut rng = SmallRng::seed_from_u64(0);
        let e = pool.endpoints();
        // An old report said idle; a fresh one says moderately busy.
        e[0].signals().report_engine(0, 0, 0.0, NOW - Duration::from_secs(10));
        e[1].signals().report_engine(2, 10, 0.3, NOW);
        // Fresh: queue 1 - 2/2 = 0, kv 0.7 -> 2 x 0 + 2 x 0.7 = 1.4; stale: 2 x 0.5 + 2 x 0.5 = 2.
        // Neutral still wins over a busy queue, but not because it looks idle: compare with
        // a fresh idle report, which scores 4.
        assert_eq!(pick(&pool, &RequestFacts::default(), &mut rng), Some(0));
        e[1].signals().report_engine(0, 1, 0.0, NOW);
        assert_eq!(pick(&pool, &RequestFacts::default(), &mut rng), Some(1));
        // And the stale endpoint is never filtered as saturated by its old numbers.
        e[0].signals().report_engine(50, 0, 0.99, NOW - Duration::from_secs(10));
        e[1].signals().report_engine(50, 1, 0.99, NOW);
        assert_eq!(pick(&pool, &RequestFacts::default(), &mut rng), Some(0));
    }

    #[test]
    fn prefix_matches_attract_and_load_limits_them() {
        let pool = pool(ScoreWeights::default(), 3);
        let mut rng = SmallRng::seed_from_u64(0);
        let shared = "p".repeat(3_000);
        let blocks = text_prefix("m", &format!("{shared}1"), 256, 100);
        let facts = RequestFacts { prefix: &blocks, estimated_tokens: 100, ..RequestFacts::default() };
        let first = pick(&pool, &facts, &mut rng).unwrap();
        for _ in 0..5 {
            assert_eq!(pick(&pool, &facts, &mut rng), Some(first));
        }
        // The holder's queue backs up: the filter drops it despite its cache.
        pool.endpoints()[first].signals().report_engine(7, 30, 0.5, NOW);
        assert_ne!(pick(&pool, &facts, &mut rng), Some(first));
    }

    #[test]
    fn vetoed_endpoints_are_never_scored() {
        let pool = pool(ScoreWeights::default(), 3);
        let mut rng = SmallRng::seed_from_u64(0);
        pool.endpoints()[2].signals().report_engine(0, 0, 0.0, NOW);
        let best = pool.endpoints()[2].id().clone();
        for _ in 0..5 {
            let got = pool.pick(&RequestFacts::default(), NOW, &mut rng, |e| *e.id() != best).unwrap();
            assert_ne!(*got.id(), best);
        }
        assert_eq!(pool.pick_index(&RequestFacts::default(), NOW, &mut rng, |_| false), None);
    }

    #[test]
    fn capacity_and_adapters_count() {
        let mut s = specs(&[1, 1]);
        s[0].labels.accelerator = Some("h100".into());
        s[1].labels.accelerator = Some("l4".into());
        let policy = Policy::Score {
            weights: ScoreWeights { queue: 0.0, kv_cache: 0.0, prefix: 0.0, load: 1.0, lora: 0.0 },
            max_waiting: 5,
            max_kv_usage: 0.8,
            cache_blocks: 100,
            capacity: Capacity::accelerator_defaults(),
        };
        let pool = Selector::try_new(policy, SelectorOptions::default(), s, Instant::ZERO).unwrap();
        let e = pool.endpoints().to_vec();
        let mut rng = SmallRng::seed_from_u64(0);
        let facts = RequestFacts { estimated_tokens: 1_000, ..RequestFacts::default() };
        let mut guards = Vec::new();
        for _ in 0..50 {
            let i = pool.pick_index(&facts, NOW, &mut rng, |_| true).unwrap();
            guards.push(pool.begin(&e[i], 1_000, NOW));
        }
        assert_eq!((e[0].signals().in_flight(), e[1].signals().in_flight()), (40, 10));

        let pool = pool_with_adapter();
        let facts = RequestFacts { model: Some("sql"), ..RequestFacts::default() };
        assert_eq!(pool.pick_index(&facts, NOW, &mut rng, |_| true), Some(1));
    }

    fn pool_with_adapter() -> Selector {
        let pool = pool(ScoreWeights::default(), 3);
        pool.endpoints()[1].signals().set_adapters(["sql"]);
        pool
    }
}
