//! Predicted time to first token: send each request where its first token is expected
//! soonest, with every endpoint's speed learned from its answers.
//!
//! **The rule.** For each candidate endpoint *i*, with the prompt's *P* tokens of which the
//! pool's prefix index says *i* holds the first *C_i*:
//!
//! *cost_i = overhead_i + (P - C_i + 0.25 x prefilling_i) x prefill_i + queue_i + 0.05 x n_i x overhead_i
//! \[+ (P - C_i) x prefill_i when i's cache is full\]*
//!
//! - *overhead_i* and *prefill_i* (seconds a prompt token) are the endpoint's learned
//!   performance ([`perf`](crate::endpoint::perf)), from its measured first tokens against the
//!   tokens it had to compute. Nothing is configured: weights and labels are not read, a new
//!   endpoint starts from the pool's mean, a slowed one is noticed within seconds.
//! - *C_i* counts only blocks that are there already: a block that a request still in prefill
//!   on *i* is computing is not cached yet (the endpoint remembers the first new block of up
//!   to 16 prefills in progress). Without this, every request sharing a new long prefix
//!   followed the first one to its endpoint and computed it again.
//! - *prefilling_i* is the uncached prompt tokens of the requests this balancer sent to *i*
//!   that have not had their first token yet: prefill work ahead. A quarter of it
//!   ([`BACKLOG`]) counts: engines with chunked prefill share a prefill budget between such
//!   requests.
//! - *queue_i* is the expected wait for a batch slot: with *n_i* requests at the endpoint (the
//!   balancer's own count, or the engine's running plus waiting when scraped and larger, as
//!   other balancers send too; when part of the report is others' load, the balancer's own
//!   count now plus that part, so that requests sent since the report count) and *B_i*
//!   slots (the running count the engine last reported while it queued),
//!   *max(0, n_i + 1 - 0.8 B_i) x occupancy_i / 0.8 B_i* ([`KNEE`]), where
//!   *occupancy_i* is how long a request holds the endpoint; 0 while the slots are unknown.
//!   Others' requests count by the learned share of them that delays this balancer's
//!   ([`Perf::others`]: 1 until first tokens show less, as behind engines that run a
//!   low-priority batch client's requests after ours).
//! - The fourth term ([`SPREAD`]) is a small load cost that spreads requests among endpoints
//!   that are otherwise equal.
//! - The last one is the cost of eviction: when *i*'s part of the prefix index is full (at
//!   least [`FULL`] of the blocks it mirrors), the blocks the request adds there push out as
//!   many others, which a later request may have to compute again on *i*: their prefill counts
//!   a second time ([`EVICT`]). Without it, where prompt groups outgrow one engine's cache,
//!   every busy moment copied a group to another engine and evicted a third group there, and
//!   the caches thrashed: on the matrix's `small-engines-groups-80` the hit rate was 77%
//!   against `prefix_affinity`'s 93%; it is 82 to 84% with it, at a lower TTFT p99. Engines
//!   whose caches are not full are not affected.
//!
//! The constants were chosen on the whole scenario matrix of `fulcrum simulate`
//! (`bench/sim/matrix.toml`, 26 fleets and workloads), not on one case, and checked on three
//! seeds; `bench/RESULTS.md` has the figures and the variants tried.
//!
//! **Load bound.** An endpoint holding more than (1 + [`LOAD_EPSILON`]) times its capacity's
//! share of the pool's requests, plus [`LOAD_SLACK`], is passed over while any candidate is
//! within its own bound (bounded loads, Mirrokni et al., over the learned capacity of
//! [`LoadSignals::capacity`](crate::endpoint::LoadSignals::capacity)). Without it a fleet with
//! one much faster backend and no learned batch slots sent it every request: best for each
//! first token, but one backend's failure then hits everything, and the others' caches go
//! cold. On the matrix the bound moved no p99 by more than 3% and cost 2.2 points of hit rate
//! where prompt groups exceed the caches.
//!
//! The lowest prediction wins; the cache match is part of the cost, not a rule with
//! thresholds. Near ties (within 1% or 100 µs) go to the endpoint whose index is least full,
//! so that new prefixes spread and the fleet's caches fill evenly, then rotate. A hot prefix
//! is replicated as soon as its holder's queue or prefill backlog costs more than computing
//! the prefix elsewhere. The prompt's blocks are then recorded against the chosen endpoint.
//!
//! **Cost**: one prefix-index lookup (O(blocks x holders) under its lock) plus O(1) a
//! candidate, without allocating. In pools of more than [`SAMPLE_ABOVE`] endpoints the
//! candidates are at most [`HOLDER_CANDIDATES`] endpoints holding a prefix of the prompt (the
//! holder of the longest, and others drawn at random) plus [`SAMPLED`] others drawn at random
//! (power of k choices), so a pick stays O(blocks + k) at any pool size: about 0.65 µs at 1,000
//! endpoints and 0.45 µs at 8 (`bench/RESULTS.md`). On the matrix's pools of 64, 128 and 256
//! endpoints, sampling 8 or 16, or weighing every endpoint, routed alike (TTFT p99 and hit rate
//! within the seeds' spread). What mattered there was how many holders of a block the index
//! knows ([`MAX_HOLDERS`], 32): with 8, a system prompt that every endpoint had cached counted
//! as cached on 8 of them only, and TTFT p99 on 256 endpoints at uneven speeds was twice as
//! high.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::ai::IndexView;
use super::{Balance, PickCx, PoolView};
use crate::endpoint::Endpoint;
use crate::endpoint::perf::Perf;
use crate::prefix::MAX_HOLDERS;
use crate::time::Instant;
use std::time::Duration;

/// Pools larger than this sample their candidates.
pub const SAMPLE_ABOVE: usize = 32;
/// Prefix holders weighed in a sampled pick: the holder of the longest prefix and others drawn
/// at random (the index knows up to [`MAX_HOLDERS`] of each block; the others count their
/// blocks when drawn among the endpoints).
pub const HOLDER_CANDIDATES: usize = 8;
/// Room for a pick's candidates: a small pool's endpoints, or a sampled pick's holders (all of
/// them, before [`HOLDER_CANDIDATES`] are chosen) and draws.
const MAX_CANDIDATES: usize = if MAX_HOLDERS + SAMPLED > SAMPLE_ABOVE { MAX_HOLDERS + SAMPLED } else { SAMPLE_ABOVE };
/// Endpoints drawn at random in a sampled pick, besides the prefix holders.
pub const SAMPLED: usize = 8;
/// Share of the prefill backlog a new request is taken to wait for.
pub const BACKLOG: f64 = 0.25;
/// Share of the learned batch slots from which requests are taken to queue.
pub const KNEE: f64 = 0.8;
/// How many times the prefill of blocks that evict others' counts again (see the module doc).
pub const EVICT: f64 = 1.0;
/// The share of an endpoint's index capacity in use from which new blocks evict others.
pub const FULL: f64 = 0.95;
/// Fixed costs each request in flight adds (a small load term that spreads equal endpoints).
pub const SPREAD: f64 = 0.05;
/// How far above its capacity's share of the requests an endpoint may go.
pub const LOAD_EPSILON: f64 = 1.0;
/// Requests an endpoint may hold above its bound.
pub const LOAD_SLACK: f64 = 4.0;
/// Relative and absolute width of a near tie.
const TIE: (f64, f64) = (0.01, 100e-6);

/// Lowest predicted time to first token.
#[derive(Debug)]
pub(crate) struct PredictedTtft {
    index: IndexView,
    start: AtomicUsize,
}

impl PredictedTtft {
    pub(crate) fn new(index: IndexView) -> Self {
        PredictedTtft { index, start: AtomicUsize::new(0) }
    }
}

/// The predicted time to first token of a request of `uncached` tokens sent to `e` at `now`
/// (`perf`: its estimate; engine reports older than `engine_max_age` are not read), as the
/// policy computes it: for the admin API and metrics.
pub fn predict_now(e: &Endpoint, perf: &Perf, uncached: u64, now: Instant, engine_max_age: Duration) -> f64 {
    predict_for(e, perf, uncached, now, engine_max_age, false)
}

/// [`predict_now`] for a request in the background or not: an interactive request does not
/// wait for background requests (the engine runs them behind it), so they are left out of the
/// requests ahead of it, in flight and in the engine's report alike (the report's as they were
/// when it was taken: see [`LoadSignals::engine_requests`]); a background request waits for
/// everything.
///
/// [`LoadSignals::engine_requests`]: crate::endpoint::LoadSignals::engine_requests
fn predict_for(
    e: &Endpoint,
    perf: &Perf,
    uncached: u64,
    now: Instant,
    engine_max_age: Duration,
    background: bool,
) -> f64 {
    let s = e.signals();
    let (own, others) = ahead(e, now, engine_max_age, background);
    // Others' requests by how much they delay this balancer's (learned; 1 until then).
    let n = own as f64 + perf.others * others as f64;
    let spread = SPREAD * n * perf.overhead;
    let behind_tokens = if background { 0 } else { s.background_prefilling_tokens() };
    let backlog = s.prefilling_tokens().saturating_sub(behind_tokens);
    perf.prefill_time(uncached) + BACKLOG * backlog as f64 * perf.prefill + wait(perf, n) + spread
}

/// The requests ahead of a new one at `e`: this balancer's own (less the background ones, for
/// an interactive request), and other clients' (those of the engine's report beyond them; 0
/// without a report).
fn ahead(e: &Endpoint, now: Instant, engine_max_age: Duration, background: bool) -> (u64, u64) {
    let s = e.signals();
    let behind = if background { 0 } else { s.background() };
    let own = s.in_flight().saturating_sub(behind);
    let others = s.engine_requests(now, engine_max_age, background).map_or(0, |engine| engine.saturating_sub(own));
    (own, others)
}

/// The expected wait for a batch slot with `n` requests ahead: *max(0, n + 1 - 0.8 B) x
/// occupancy / 0.8 B* with *B* the learned slots; 0 while they are unknown.
fn wait(perf: &Perf, n: f64) -> f64 {
    match perf.slots {
        0 => 0.0,
        b => {
            let b = f64::from(b) * KNEE;
            ((n + 1.0) - b).max(0.0) * perf.occupancy / b
        }
    }
}

/// The predicted wait for a batch slot of a request sent to `e` now: behind this balancer's
/// own requests, and how much longer behind all of other clients' (what the first token then
/// shows teaches [`Perf::others`]).
pub(crate) fn waits(e: &Endpoint, perf: &Perf, now: Instant, engine_max_age: Duration, background: bool) -> (f64, f64) {
    let (own, others) = ahead(e, now, engine_max_age, background);
    let own_wait = wait(perf, own as f64);
    (own_wait, wait(perf, (own + others) as f64) - own_wait)
}

/// The most requests an endpoint may hold: (1 + [`LOAD_EPSILON`]) x its capacity's share of
/// the pool's requests (this one included), plus one. Bounded loads (Mirrokni et al.) over
/// the learned capacity: however fast one endpoint is, the others keep a share.
/// For an interactive request, background requests count neither in the pool nor at the
/// endpoint: they are no load ahead of it.
struct LoadBound {
    /// Allowed requests a unit of capacity; infinite before the first refresh.
    per_capacity: f64,
    /// Whether the request is in the background (then every request counts).
    background: bool,
}

impl LoadBound {
    fn new(pool: &PoolView<'_>, background: bool) -> Self {
        let total = pool.load.total_capacity();
        let behind = if background { 0 } else { pool.load.background() };
        let requests = (pool.load.in_flight().saturating_sub(behind) + 1) as f64;
        let per_capacity = if total > 0.0 { (1.0 + LOAD_EPSILON) * requests / total } else { f64::INFINITY };
        LoadBound { per_capacity, background }
    }

    #[inline]
    fn admits(&self, e: &Endpoint) -> bool {
        let s = e.signals();
        let behind = if self.background { 0 } else { s.background() };
        ((s.in_flight().saturating_sub(behind) + 1) as f64) <= self.per_capacity * s.capacity() + LOAD_SLACK
    }
}

#[inline]
fn predict(e: &Endpoint, perf: &Perf, uncached: u64, pool: &PoolView<'_>, cx: &PickCx<'_>) -> f64 {
    predict_for(e, perf, uncached, cx.now, pool.engine_max_age, cx.facts.background)
}

impl Balance for PredictedTtft {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let prior = pool.load.perf().get();
        let prefix = cx.facts.prefix;
        // The endpoints holding a prefix of the prompt, and how many of its blocks.
        let mut holders = [(0usize, 0u32); MAX_HOLDERS];
        let mut held = 0;
        self.index.matches(prefix, |idx, blocks| {
            if held < MAX_HOLDERS {
                holders[held] = (idx, blocks);
                held += 1;
            }
        });
        let holders = &holders[..held];
        let blocks_of = |idx: usize| holders.iter().find(|h| h.0 == idx).map_or(0, |h| h.1);
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        // The candidates and the blocks each holds, on the stack (no allocation a pick): in
        // small pools every endpoint, from a rotating start; in large ones the holders and a
        // sample.
        let mut candidates = [(0usize, 0u32); MAX_CANDIDATES];
        let len = if n <= SAMPLE_ABOVE {
            for (i, slot) in candidates[..n].iter_mut().enumerate() {
                *slot = (if start + i < n { start + i } else { start + i - n }, 0);
            }
            // Each holder's blocks at its place in the rotation.
            for &(idx, blocks) in holders {
                candidates[if idx >= start { idx - start } else { idx + n - start }].1 = blocks;
            }
            n
        } else {
            // A multiply and shift maps a draw onto `0..k`: no division.
            let mut draw = |k: usize| ((u128::from(cx.rng.next_u64()) * k as u128) >> 64) as usize;
            // The holders: when there are more than HOLDER_CANDIDATES, the holder of the
            // longest prefix and others drawn at random. Then distinct endpoints drawn at
            // random.
            let mut len = held.min(HOLDER_CANDIDATES);
            candidates[..held].copy_from_slice(holders);
            if held > len {
                let top = (0..held).max_by_key(|&i| candidates[i].1).unwrap_or(0);
                candidates.swap(0, top);
                for i in 1..len {
                    let j = i + draw(held - i);
                    candidates.swap(i, j);
                }
            }
            for _ in 0..SAMPLED {
                let idx = draw(n);
                if !candidates[..len].iter().any(|c| c.0 == idx) {
                    candidates[len] = (idx, blocks_of(idx));
                    len += 1;
                }
            }
            len
        };
        let candidates = &candidates[..len];
        // How full each candidate's index is, under one lock (for the eviction cost and near
        // ties; nothing to read for a request without a prefix).
        let mut fullness = [0.0f64; MAX_CANDIDATES];
        if !prefix.is_empty() {
            self.index.occupancy_of(candidates.iter().map(|c| c.0), &mut fullness[..len]);
        }
        // (endpoint, cost, cached blocks, cache fullness) of the best candidate...
        let mut best: Option<(usize, f64, u32, f64)> = None;
        // ...and of the best over its load bound, taken only when every candidate is.
        let mut over: Option<(usize, f64, u32, f64)> = None;
        let bound = LoadBound::new(pool, cx.facts.background);
        for (&(idx, indexed), &full) in candidates.iter().zip(&fullness) {
            let e = &pool.endpoints[idx];
            // Blocks a prefill still in progress there computes are not cached yet.
            let blocks = match indexed {
                0 => 0,
                m => e.signals().ready_blocks(prefix, m),
            };
            let perf = e.signals().perf().estimate(&prior);
            let uncached = cx.facts.uncached(blocks);
            let mut cost = predict(e, &perf, uncached, pool, cx);
            if full >= FULL {
                // The blocks it adds push out as many that a later request may need.
                cost += EVICT * uncached as f64 * perf.prefill;
            }
            if !bound.admits(e) {
                if over.is_none_or(|(_, c, _, _)| cost < c) && cx.accepts(pool, idx) {
                    over = Some((idx, cost, blocks, full));
                }
                continue;
            }
            let better = match best {
                None => true,
                Some((_, bc, _, bfull)) => {
                    let width = (bc * TIE.0).max(TIE.1);
                    if cost < bc - width {
                        true
                    } else if cost <= bc + width && !prefix.is_empty() {
                        full < bfull || (full == bfull && cost < bc)
                    } else {
                        false
                    }
                }
            };
            if better && cx.accepts(pool, idx) {
                best = Some((idx, cost, blocks, full));
            }
        }
        // A sampled pick whose candidates were all vetoed: any acceptable endpoint.
        let chosen = match best.or(over) {
            Some((idx, _, blocks, _)) => {
                cx.cached_blocks = blocks;
                Some(idx)
            }
            None => super::scan_from(pool, start, cx),
        };
        if let Some(idx) = chosen {
            self.index.record(idx, prefix);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::{SeedableRng, rngs::SmallRng};

    use super::super::test_support::specs;
    use super::{LOAD_EPSILON, LOAD_SLACK};
    use crate::endpoint::perf::Sent;
    use crate::openai::text_prefix;
    use crate::{InFlight, Instant, Policy, PolicyKind, RequestFacts, Selector, SelectorOptions};

    fn pool(n: usize) -> Selector {
        let policy = Policy::from_kind(PolicyKind::PredictedTtft).unwrap();
        Selector::try_new(policy, SelectorOptions::default(), specs(&vec![1; n]), Instant::ZERO).unwrap()
    }

    /// Teaches endpoint `idx` a prefill rate of `rate` tokens a second (50 samples).
    fn teach(pool: &Selector, idx: usize, rate: f64) {
        let m = pool.endpoints()[idx].signals().perf();
        let prior = pool.pool_perf();
        for i in 0..50u64 {
            let u = 200 + i * 20;
            let sent = Sent { uncached: u, queued: false, streams: true, ..Sent::default() };
            let y = Duration::from_secs_f64(0.005 + u as f64 / rate);
            m.first_token(&sent, y, &prior, Instant::from_millis(i * 10));
        }
    }

    fn facts<'a>(prefix: &'a [u64], prompt_tokens: u64) -> RequestFacts<'a> {
        RequestFacts {
            prefix,
            prompt_tokens,
            estimated_tokens: prompt_tokens + 100,
            stream: true,
            ..Default::default()
        }
    }

    fn send(pool: &Selector, f: &RequestFacts<'_>, rng: &mut SmallRng) -> (usize, InFlight) {
        let p = pool.pick_detailed(f, Instant::from_millis(600), rng, |_| true).unwrap();
        (p.index, pool.begin_request(&pool.endpoints()[p.index], f, p.cached_blocks, Instant::from_millis(600)))
    }

    #[test]
    fn cold_prompts_go_to_the_endpoint_learned_fastest_without_a_label() {
        let pool = pool(3);
        teach(&pool, 0, 4_000.0);
        teach(&pool, 1, 16_000.0);
        teach(&pool, 2, 8_000.0);
        let mut rng = SmallRng::seed_from_u64(1);
        for i in 0..5 {
            let prefix = text_prefix("m", &format!("{i} {}", "x".repeat(4_000)), 256, 100);
            let (idx, _done) = send(&pool, &facts(&prefix, 1_000), &mut rng);
            assert_eq!(idx, 1, "request {i}");
        }
    }

    #[test]
    fn background_requests_are_no_queue_for_interactive_ones() {
        // Endpoint 0 is twice as fast, and full of batch requests that its engine runs behind
        // interactive ones (8 running, 20 waiting, all of them background).
        let pool = pool(2);
        teach(&pool, 0, 16_000.0);
        teach(&pool, 1, 8_000.0);
        let now = Instant::from_millis(600);
        let mut rng = SmallRng::seed_from_u64(1);
        let cold = |i: u32| text_prefix("m", &format!("{i} {}", "x".repeat(4_000)), 256, 100);
        let mut held = Vec::new();
        for i in 0..28 {
            let prefix = cold(100 + i);
            let f = RequestFacts { background: true, ..facts(&prefix, 1_000) };
            held.push(pool.begin_request(&pool.endpoints()[0], &f, 0, now));
        }
        pool.endpoints()[0].signals().report_engine(20, 8, 0.5, now);
        assert_eq!(pool.endpoints()[0].signals().background(), 28);
        // An interactive request does not wait for them: the faster endpoint.
        let prefix = cold(1);
        let (idx, _interactive) = send(&pool, &facts(&prefix, 1_000), &mut rng);
        assert_eq!(idx, 0);
        // Another batch request waits behind them all: the idle endpoint.
        let prefix = cold(2);
        let f = RequestFacts { background: true, ..facts(&prefix, 1_000) };
        let (idx, _batch) = send(&pool, &f, &mut rng);
        assert_eq!(idx, 1);
        drop(held);
        assert_eq!(pool.endpoints()[0].signals().background(), 0);
    }

    #[test]
    fn background_requests_teach_no_speed() {
        // Batch items that waited behind interactive traffic (5 s to a first token, 9 s
        // held) leave the model where it was; the same answers to interactive requests
        // make the endpoint slow.
        let learned = |background: bool| {
            let pool = pool(1);
            let f = RequestFacts { background, ..facts(&[], 1_000) };
            for i in 0..50u64 {
                let at = |ms: u64| Instant::from_millis(i * 10 + ms);
                let mut g = pool.begin_request(&pool.endpoints()[0], &f, 0, at(0));
                let error = g.first_token(at(5_000));
                assert_eq!(error.is_none(), background);
                g.ended(at(9_000), 100);
            }
            let prior = pool.pool_perf();
            (pool.endpoints()[0].signals().perf().estimate(&prior), prior)
        };
        let (batch, prior) = learned(true);
        assert_eq!(
            (batch.prefill, batch.overhead, batch.occupancy, batch.confidence),
            (prior.prefill, prior.overhead, prior.occupancy, 0.0)
        );
        let (interactive, prior) = learned(false);
        assert!(interactive.prefill_time(1_000) > 2.0 * prior.prefill_time(1_000));
        assert!(interactive.occupancy > 2.0 * prior.occupancy);
    }

    #[test]
    fn the_fastest_endpoint_never_takes_everything() {
        // One endpoint 16x faster than the others, and no batch slots learned: every request's
        // first token is soonest there, but its load bound keeps the others in use.
        let pool = pool(3);
        teach(&pool, 0, 4_000.0);
        teach(&pool, 1, 64_000.0);
        teach(&pool, 2, 4_000.0);
        assert!(pool.refresh(Instant::from_millis(600)).is_none());
        let mut rng = SmallRng::seed_from_u64(1);
        let mut held = Vec::new();
        let mut counts = [0u32; 3];
        for i in 0..90 {
            let prefix = text_prefix("m", &format!("{i} {}", "x".repeat(4_000)), 256, 100);
            let (idx, done) = send(&pool, &facts(&prefix, 1_000), &mut rng);
            counts[idx] += 1;
            held.push(done);
        }
        let caps: Vec<f64> = pool.endpoints().iter().map(|e| e.signals().capacity()).collect();
        let bound = (1.0 + LOAD_EPSILON) * 90.0 * caps[1] / caps.iter().sum::<f64>() + LOAD_SLACK;
        assert!(counts[1] > counts[0] && counts[1] > counts[2], "{counts:?}");
        assert!(f64::from(counts[1]) <= bound + 1.0 && counts[0] > 0 && counts[2] > 0, "{counts:?}, bound {bound:.1}");
    }

    #[test]
    fn a_cached_prefix_beats_a_faster_cold_endpoint_and_a_backlog_spreads_it() {
        let pool = pool(2);
        teach(&pool, 0, 8_000.0);
        teach(&pool, 1, 16_000.0);
        let mut rng = SmallRng::seed_from_u64(1);
        let shared = "s".repeat(8_000);
        let prefix = text_prefix("m", &shared, 256, 100);
        // Pin the prefix on the slower endpoint, then finish that request.
        pool.prefix_index().record(pool.endpoints()[0].id(), &prefix);
        // 2,000 tokens, 31 blocks of 64 of them cached on 0: 0 costs ~7 ms, 1 ~130 ms.
        let (idx, first) = send(&pool, &facts(&prefix, 2_000), &mut rng);
        let uncached = 2_000 - 64 * prefix.len() as u64;
        assert_eq!((idx, first.signals().prefilling_tokens()), (0, uncached));
        // Cold prefills queued at the holder: its backlog soon costs more than computing
        // the prefix on the faster endpoint.
        let other = text_prefix("m", &"o".repeat(8_000), 256, 100);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.begin_request(&pool.endpoints()[0], &facts(&other, 2_000), 0, Instant::from_millis(600)));
        }
        let (idx, _second) = send(&pool, &facts(&prefix, 2_000), &mut rng);
        assert_eq!(idx, 1, "the backlog at the holder sends the prefix to a second endpoint");
        drop(held);
        let (idx, _third) = send(&pool, &facts(&prefix, 2_000), &mut rng);
        assert!(idx == 0 || idx == 1);
    }

    #[test]
    fn a_full_cache_counts_the_blocks_a_prompt_would_evict() {
        // Two equal endpoints. The prompt's prefix is cached on 0, behind a prefill backlog
        // that makes computing it again on 1 sooner (~130 ms against ~160). With room in 1's
        // cache it goes there; with 1's cache full, the blocks it would push out count again
        // (~255 ms), and it stays with the holder.
        let pick = |full: bool| {
            let pool = pool(2);
            teach(&pool, 0, 16_000.0);
            teach(&pool, 1, 16_000.0);
            let index = pool.prefix_index();
            let prefix = text_prefix("m", &"s".repeat(8_000), 256, 100);
            index.record(pool.endpoints()[0].id(), &prefix);
            if full {
                index.set_capacity(pool.endpoints()[1].id(), Some(20));
                index.record(pool.endpoints()[1].id(), &(1_000..1_020).collect::<Vec<u64>>());
            }
            let other = text_prefix("m", &"o".repeat(8_000), 256, 100);
            let held: Vec<_> = (0..5)
                .map(|_| pool.begin_request(&pool.endpoints()[0], &facts(&other, 2_000), 0, Instant::from_millis(600)))
                .collect();
            let (idx, _g) = send(&pool, &facts(&prefix, 2_000), &mut SmallRng::seed_from_u64(1));
            drop(held);
            idx
        };
        assert_eq!(pick(false), 1);
        assert_eq!(pick(true), 0);
    }

    #[test]
    fn a_prefix_still_being_computed_is_not_cached_yet() {
        let pool = pool(2);
        teach(&pool, 0, 16_000.0);
        teach(&pool, 1, 16_000.0);
        let mut rng = SmallRng::seed_from_u64(5);
        let prefix = text_prefix("m", &"p".repeat(16_000), 256, 100);
        let (first, mut computing) = send(&pool, &facts(&prefix, 4_000), &mut rng);
        // While the first request computes the prompt, the index's record of it is not a
        // cache hit: a second request with the same prompt is not sent to wait behind it.
        let ready = pool.endpoints()[first].signals().ready_blocks(&prefix, prefix.len() as u32);
        assert_eq!(ready, 0);
        let (second, _g) = send(&pool, &facts(&prefix, 4_000), &mut rng);
        assert_ne!(second, first);
        // Once its first token is out the prefix is there.
        computing.first_token(Instant::from_millis(900));
        let ready = pool.endpoints()[first].signals().ready_blocks(&prefix, prefix.len() as u32);
        assert_eq!(ready, prefix.len() as u32);
    }

    #[test]
    fn among_many_holders_of_a_system_prompt_the_conversation_finds_its_own() {
        // 24 endpoints of 200 hold a system prompt (more than a sampled pick weighs); one of
        // them also holds the conversation that follows it.
        let pool = pool(200);
        let mut rng = SmallRng::seed_from_u64(5);
        let system = "s".repeat(8_000);
        let prompt = text_prefix("m", &system, 256, 100);
        let conversation = text_prefix("m", &format!("{system}{}", "c".repeat(4_000)), 256, 100);
        let on = |pool: &Selector, idx: usize, prefix: &[u64], rng: &mut SmallRng| {
            let f = facts(prefix, 3_000);
            let now = Instant::from_millis(600);
            let p = pool.pick_detailed(&f, now, rng, |e| *e.id() == *pool.endpoints()[idx].id()).unwrap();
            assert_eq!(p.index, idx);
        };
        for idx in 0..24 {
            on(&pool, idx * 7, &prompt, &mut rng);
        }
        on(&pool, 70, &conversation, &mut rng);
        for _ in 0..20 {
            let (idx, done) = send(&pool, &facts(&conversation, 3_000), &mut rng);
            assert_eq!(idx, 70);
            drop(done);
        }
    }

    #[test]
    fn large_pools_sample_and_still_find_the_prefix_holder() {
        let pool = pool(1_000);
        let mut rng = SmallRng::seed_from_u64(3);
        let prefix = text_prefix("m", &"h".repeat(8_000), 256, 100);
        let (holder, done) = send(&pool, &facts(&prefix, 2_000), &mut rng);
        drop(done);
        for _ in 0..20 {
            let (idx, done) = send(&pool, &facts(&prefix, 2_000), &mut rng);
            assert_eq!(idx, holder);
            drop(done);
        }
        // Every endpoint vetoed but one: still found.
        let only = pool.endpoints()[777].id().clone();
        let f = facts(&[], 10);
        assert_eq!(pool.pick_index(&f, Instant::ZERO, &mut rng, |e| *e.id() == only), Some(777));
    }
}
