//! Prefix affinity: send a prompt where its prefix is probably cached, within a load bound.
//!
//! An engine that still holds a prompt's leading blocks in its KV cache skips their prefill:
//! for a long shared system prompt or a multi-turn conversation this is most of the work and
//! most of the time to first token. The policy keeps, per pool, a [`PrefixIndex`] of which
//! endpoints were sent which blocks (capped per endpoint like the cache it mirrors) and
//! follows the longest match, as SGLang's cache-aware router and llm-d's prefix-cache
//! scorer do, but only while the holder is not overloaded, as in consistent hashing with
//! bounded loads (Mirrokni, Thorup and Zadimoghaddam, SODA 2018), so a hot prefix cannot pile
//! every request onto one endpoint (collapse) and two endpoints cannot steal a prefix back and
//! forth (thrash): once the holder is over the bound, the next request goes elsewhere and the
//! prefix is then cached in two places, whose load the bound keeps level.
//!
//! **The rule.** Let *r* be the request's estimated tokens (at least 1), *T_i* the estimated
//! tokens in flight on endpoint *i*, *c_i* its capacity (see
//! [`Capacity`](crate::policy::Capacity)), *L_i = (T_i + r) / c_i* its load once it takes the
//! request, and *M = (sum T_j + r) / sum c_j* the pool's mean load over all its endpoints.
//! Endpoint *i* is *within the bound* when it has nothing in flight or
//! *L_i <= (1 + epsilon) M + slack_tokens*.
//!
//! 1. Among acceptable endpoints within the bound, take the one holding the longest run of the
//!    prompt's leading blocks ([`RequestFacts::prefix`](crate::RequestFacts::prefix)); ties go
//!    to the lower *L_i*. If that run is at least `min_match_blocks` long, pick it.
//! 2. Otherwise (short or no match, or every holder over the bound or vetoed) pick the
//!    acceptable endpoint of lowest *L_i*; among equal *L_i* the one whose index is least
//!    full (a new prefix goes where it evicts least, as SGLang's router sends an unmatched
//!    request to its smallest tree), then rotating. If the request's `model` names a LoRA
//!    adapter that some endpoint has loaded ([`LoadSignals::set_adapters`](crate::LoadSignals::set_adapters)),
//!    endpoints with the adapter that are within the bound come first.
//! 3. Record the prompt's blocks against the chosen endpoint.
//!
//! Defaults: `epsilon` 1.0, `slack_tokens` 8,192 (sticky: measured best on bench/ai-routing), `min_match_blocks` 2 (512 characters),
//! `cache_blocks` 8,192, `capacity` the static weight.
//!
//! **Cost**: an O(n) pass for the mean (and for the fallback), plus the index lookup and
//! record, O(blocks x 8) under the index's lock, independent of n. Interior mutability: the
//! index is behind a `Mutex`, locked twice a pick (lookup, then record), for microseconds,
//! and once more when a prompt matches nowhere (the fallback's occupancy tie-break).
//!
//! ```
//! use fulcrum_core::openai::text_prefix;
//! use fulcrum_core::{EndpointSpec, Instant, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=4).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new("prefix_affinity".parse().unwrap(), Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let system = "You are a helpful assistant. ".repeat(40);
//! let turn = |q: &str| text_prefix("llama", &format!("{system}{q}"), 256, 2048);
//! let (a, b) = (turn("What is Rust?"), turn("And Go?"));
//! let first = pool.pick_index(&RequestFacts { prefix: &a, ..RequestFacts::default() }, Instant::ZERO, &mut rng, |_| true);
//! // Another question behind the same system prompt goes to the same endpoint.
//! let second = pool.pick_index(&RequestFacts { prefix: &b, ..RequestFacts::default() }, Instant::ZERO, &mut rng, |_| true);
//! assert_eq!(first, second);
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use super::ai::{Capacities, IndexView, least, load, request_tokens, wanted_adapter};
use super::{Balance, PickCx, PoolView};
#[cfg(doc)]
use crate::prefix::PrefixIndex;

/// Longest cached prefix within a load bound.
#[derive(Debug)]
pub(crate) struct PrefixAffinity {
    index: IndexView,
    capacities: Capacities,
    min_match_blocks: u32,
    epsilon: f64,
    slack: f64,
    start: AtomicUsize,
}

impl PrefixAffinity {
    pub(crate) fn new(
        index: IndexView,
        capacities: Capacities,
        min_match_blocks: u32,
        epsilon: f64,
        slack_tokens: u32,
    ) -> Self {
        PrefixAffinity {
            index,
            capacities,
            min_match_blocks: min_match_blocks.max(1),
            epsilon,
            slack: f64::from(slack_tokens),
            start: AtomicUsize::new(0),
        }
    }
}

impl Balance for PrefixAffinity {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let r = request_tokens(cx.facts);
        // Each endpoint's tokens in flight and capacity, read once: the mean and every load
        // then come from the same reading. (Read again per use, a request another thread
        // started in between counted in an endpoint's load but not in the mean, and pushed a
        // holder over a bound it was within.) On the stack for pools of up to 32 endpoints.
        let mut on_stack = [(0u64, 0.0f64); 32];
        let mut on_heap = Vec::new();
        let seen: &mut [(u64, f64)] = if n <= on_stack.len() {
            &mut on_stack[..n]
        } else {
            on_heap.resize(n, (0, 0.0));
            &mut on_heap
        };
        let (mut tokens, mut capacity) = (r as f64, 0.0);
        for (idx, e) in pool.endpoints.iter().enumerate() {
            let (t, c) = (e.signals().in_flight_tokens(), self.capacities.of(idx, e));
            seen[idx] = (t, c);
            tokens += t as f64;
            capacity += c;
        }
        let seen = &*seen;
        let bound = (1.0 + self.epsilon) * tokens / capacity + self.slack;
        let load = |idx: usize| load(seen[idx].0, r, seen[idx].1);
        let within = |idx: usize| seen[idx].0 == 0 || load(idx) <= bound;
        let prefix = cx.facts.prefix;

        // 1. The longest match within the bound.
        let mut best: Option<(usize, u32, f64)> = None;
        if prefix.len() >= self.min_match_blocks as usize {
            self.index.matches(prefix, |idx, blocks| {
                if blocks < self.min_match_blocks || !within(idx) {
                    return;
                }
                let l = load(idx);
                let better = best.is_none_or(|(_, b, bl)| blocks > b || (blocks == b && l < bl));
                if better && cx.accepts(pool, idx) {
                    best = Some((idx, blocks, l));
                }
            });
        }
        // 2. Otherwise the least loaded, adapter holders within the bound first.
        let chosen = match best {
            Some((idx, _, _)) => Some(idx),
            None => {
                let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
                let adapter = wanted_adapter(pool, cx.facts);
                // Cache room matters only for a prompt that will be recorded.
                let occupancy = if prefix.is_empty() { Vec::new() } else { self.index.occupancy() };
                least(pool, start, cx, |idx| {
                    let preferred =
                        adapter.is_none_or(|k| pool.endpoints[idx].signals().has_adapter_key(k) && within(idx));
                    (u8::from(!preferred), load(idx), occupancy.get(idx).copied().unwrap_or(0.0))
                })
            }
        };
        // 3. Learn where the prefix now is.
        if let Some(idx) = chosen {
            self.index.record(idx, prefix);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::specs;
    use crate::openai::text_prefix;
    use crate::policy::Capacity;
    use crate::{Endpoint, InFlight, Instant, Policy, RequestFacts, Selector, SelectorOptions};
    use rand::{SeedableRng, rngs::SmallRng};

    fn policy(epsilon: f64, slack_tokens: u32) -> Policy {
        Policy::PrefixAffinity {
            cache_blocks: 1_000,
            min_match_blocks: 2,
            epsilon,
            slack_tokens,
            capacity: Capacity::Weight,
        }
    }

    fn pool(policy: Policy, n: usize) -> Selector {
        Selector::try_new(policy, SelectorOptions::default(), specs(&vec![1; n]), Instant::ZERO).unwrap()
    }

    fn prompt(shared: &str, tail: &str) -> Vec<u64> {
        text_prefix("m", &format!("{shared}{tail}"), 256, 100)
    }

    fn send(pool: &Selector, prefix: &[u64], tokens: u64, rng: &mut SmallRng) -> (usize, InFlight) {
        let facts = RequestFacts { prefix, estimated_tokens: tokens, ..RequestFacts::default() };
        let idx = pool.pick_index(&facts, Instant::ZERO, rng, |_| true).unwrap();
        let e: Endpoint = pool.endpoints()[idx].clone();
        (idx, pool.begin(&e, tokens, Instant::ZERO))
    }

    #[test]
    fn repeated_prefixes_stay_while_the_holder_is_not_overloaded() {
        let pool = pool(policy(0.5, 4_096), 4);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "s".repeat(2_000);
        let (first, g) = send(&pool, &prompt(&shared, "one"), 1_000, &mut rng);
        drop(g);
        for i in 0..20 {
            // Finished requests leave no load: always the holder.
            let (idx, g) = send(&pool, &prompt(&shared, &format!("question {i}")), 1_000, &mut rng);
            assert_eq!(idx, first, "request {i}");
            drop(g);
        }
        // New prompts at equal load go where the index is least full: first to the three
        // endpoints holding nothing, never to the holder of the long shared prefix.
        let others: std::collections::HashSet<usize> =
            (0..3).map(|i| send(&pool, &prompt(&format!("{i}{}", "o".repeat(600)), ""), 1, &mut rng).0).collect();
        assert_eq!(others.len(), 3);
        assert!(!others.contains(&first));
    }

    #[test]
    fn load_comes_before_cache_room() {
        let pool = pool(policy(1.0, 0), 2);
        let mut rng = SmallRng::seed_from_u64(1);
        let (full, _busy) = send(&pool, &prompt(&"x".repeat(3_000), ""), 1_000, &mut rng);
        // The endpoint with the emptier index but more load loses to the idle one.
        let (idx, _g) = send(&pool, &prompt(&"y".repeat(600), ""), 10, &mut rng);
        assert_ne!(idx, full);
        drop(_busy);
        let _other = pool.begin(&pool.endpoints()[idx].clone(), 5_000, Instant::ZERO);
        let (next, _h) = send(&pool, &prompt(&"z".repeat(600), ""), 10, &mut rng);
        assert_eq!(next, full, "the fuller index wins when it is less loaded");
    }

    #[test]
    fn an_overloaded_holder_sheds_and_the_prefix_spreads() {
        let pool = pool(policy(0.25, 0), 4);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "h".repeat(3_000);
        let mut held = Vec::new();
        let mut counts = [0usize; 4];
        for i in 0..40 {
            let (idx, g) = send(&pool, &prompt(&shared, &format!("{i}")), 1_000, &mut rng);
            counts[idx] += 1;
            held.push(g);
        }
        // Without the bound all 40 would land on one endpoint; with it, no endpoint takes
        // more than (1 + 0.25) x its share plus one request.
        assert!(counts.iter().all(|&c| c <= 13), "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 40);
        // Each endpoint now holds the shared blocks.
        let index = pool.prefix_index();
        let blocks = prompt(&shared, "x");
        assert_eq!(index.match_lengths(&blocks).len(), 4);
    }

    #[test]
    fn short_matches_go_to_the_least_loaded() {
        let pool = pool(policy(0.5, 4_096), 3);
        let mut rng = SmallRng::seed_from_u64(1);
        let e = pool.endpoints().to_vec();
        // One shared block only (min_match_blocks is 2).
        let one = prompt(&"a".repeat(256), &"b".repeat(300));
        let (first, _g) = send(&pool, &one, 10, &mut rng);
        let _busy = pool.begin(&e[(first + 1) % 3], 500, Instant::ZERO);
        let other = prompt(&"a".repeat(256), &"c".repeat(300));
        let (next, _h) = send(&pool, &other, 10, &mut rng);
        assert_eq!(next, (first + 2) % 3, "the idle one, not the holder of one block");
    }

    #[test]
    fn vetoed_holders_are_skipped_and_the_match_follows_the_model() {
        let pool = pool(policy(0.5, 4_096), 3);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "v".repeat(2_000);
        let (first, g) = send(&pool, &prompt(&shared, "1"), 10, &mut rng);
        drop(g);
        let holder = pool.endpoints()[first].id().clone();
        let blocks = prompt(&shared, "2");
        let facts = RequestFacts { prefix: &blocks, estimated_tokens: 10, ..RequestFacts::default() };
        let got = pool.pick_index(&facts, Instant::ZERO, &mut rng, |e| *e.id() != holder).unwrap();
        assert_ne!(got, first);
        assert_eq!(pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| false), None);
        // The same text for another model shares nothing.
        let other_model = text_prefix("n", &format!("{shared}2"), 256, 100);
        assert!(pool.prefix_index().match_lengths(&other_model).is_empty());
    }

    #[test]
    fn loaded_adapters_are_preferred() {
        let pool = pool(policy(0.5, 4_096), 3);
        let mut rng = SmallRng::seed_from_u64(1);
        pool.endpoints()[2].signals().set_adapters(["sql-lora"]);
        for _ in 0..5 {
            let facts = RequestFacts { model: Some("sql-lora"), estimated_tokens: 10, ..RequestFacts::default() };
            assert_eq!(pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true), Some(2));
        }
        // The adapter's holder over the bound: the least loaded takes it.
        let _busy = pool.begin(&pool.endpoints()[2].clone(), 100_000, Instant::ZERO);
        let facts = RequestFacts { model: Some("sql-lora"), estimated_tokens: 10, ..RequestFacts::default() };
        assert_ne!(pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true), Some(2));
    }

    #[test]
    fn the_index_survives_a_rebuild_for_endpoints_that_stay() {
        let pool = pool(policy(0.5, 4_096), 3);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "k".repeat(2_000);
        let (first, g) = send(&pool, &prompt(&shared, "1"), 10, &mut rng);
        drop(g);
        let id = pool.endpoints()[first].id().clone();
        let mut next = specs(&[1, 1, 1]);
        next.retain(|s| s.id == id || s.id == next_other(&pool, &id));
        let rebuilt = pool.rebuild(next, Instant::ZERO).unwrap();
        let (idx, _g) = send(&rebuilt, &prompt(&shared, "2"), 10, &mut rng);
        assert_eq!(rebuilt.endpoints()[idx].id(), &id);
        assert!(std::sync::Arc::ptr_eq(rebuilt.prefix_index(), pool.prefix_index()));
    }

    #[test]
    fn a_full_kv_cache_does_not_shrink_the_holder() {
        // A prefix-caching engine reports its KV cache nearly full while it serves the
        // prefixes it holds; that must not push its conversations onto cold endpoints.
        let pool = pool(policy(1.0, 0), 4);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "f".repeat(3_000);
        let (holder, _first) = send(&pool, &prompt(&shared, "a"), 1_000, &mut rng);
        // Load elsewhere, so that the holder is within the bound on tokens alone.
        let mut rest = Vec::new();
        for (i, e) in pool.endpoints().iter().enumerate().filter(|&(i, _)| i != holder) {
            rest.push(pool.begin(&e.clone(), 1_000 + i as u64, Instant::ZERO));
        }
        pool.endpoints()[holder].signals().report_utilization(Some(0.95));
        assert!(pool.refresh(Instant::ZERO).is_none());
        assert!(pool.endpoints()[holder].signals().effective_weight() < 0.1);
        let (idx, _second) = send(&pool, &prompt(&shared, "b"), 1_000, &mut rng);
        assert_eq!(idx, holder);
    }

    #[test]
    fn slow_start_still_scales_capacity() {
        let ramp = crate::weight::SlowStart::try_new(std::time::Duration::from_secs(60), 1.0, 10.0).unwrap();
        let options = SelectorOptions::new(Default::default(), Some(ramp), Default::default());
        let pool = Selector::try_new(policy(1.0, 0), options, specs(&[1, 1]), Instant::ZERO).unwrap();
        pool.endpoints()[1].signals().start_slow_start(Instant::ZERO);
        assert!(pool.refresh(Instant::ZERO).is_none());
        // At 10% of its capacity the new endpoint looks ten times as loaded: a cold prompt
        // of 100 tokens costs it 1,000, and the other one 600 with 500 in flight.
        let mut rng = SmallRng::seed_from_u64(1);
        let _a = pool.begin(&pool.endpoints()[0].clone(), 500, Instant::ZERO);
        let (idx, _g) = send(&pool, &prompt(&"n".repeat(600), ""), 100, &mut rng);
        assert_eq!(idx, 0);
    }

    fn next_other(pool: &Selector, not: &crate::EndpointId) -> crate::EndpointId {
        pool.endpoints().iter().map(|e| e.id().clone()).find(|i| i != not).unwrap()
    }
}
