//! The selector: a pool's endpoints, their load signals and the policy's algorithm, built
//! from an immutable snapshot.
//!
//! The data plane holds a `Selector` behind an atomic swap. Membership changes build a new one
//! with [`Selector::rebuild`], which hands every endpoint that stays its old load signals (in
//! flight, latency, failures, slow start, engine reports) and keeps the pool's prefix index
//! ([`PrefixIndex`]) for them: counters and learned caches do not reset on reload. A periodic
//! [`Selector::refresh`] recomputes effective weights and, for table-driven policies, returns a
//! rebuilt selector when the tables must change.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;

use crate::balance::ai::{Capacities, IndexView};
use crate::balance::least::{LeastConnections, LeastResponseTime};
use crate::balance::least_tokens::LeastTokens;
use crate::balance::maglev::Maglev;
use crate::balance::power_of_k::PowerOfK;
use crate::balance::predicted_ttft::PredictedTtft;
use crate::balance::prefix_affinity::PrefixAffinity;
use crate::balance::random::Random;
use crate::balance::rendezvous::Rendezvous;
use crate::balance::ring::{BoundedLoad, ConsistentHash, MAX_RING_POINTS, Ring, ring_points};
use crate::balance::round_robin::RoundRobin;
use crate::balance::score::Score;
use crate::balance::sticky::Sticky;
use crate::balance::weighted_round_robin::{WeightedRoundRobin, table_weights};
use crate::balance::{Balance, PickCx, PoolView, from_client};
use crate::endpoint::perf::Sent;
use crate::endpoint::{Endpoint, EndpointId, EndpointSpec, InFlight, LatencyConfig, LoadSignals, PoolLoad};
use crate::facts::RequestFacts;
use crate::policy::{Policy, PolicyError};
use crate::prefix::{DEFAULT_CACHE_BLOCKS, PrefixIndex, SlotKey};
use crate::time::Instant;
use crate::weight::{DynamicWeight, SlowStart, effective_weight, ramp_factor};

/// Why a selector could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// The policy's options are invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Two endpoints share an id.
    #[error("endpoint `{0}` is listed twice")]
    DuplicateEndpoint(EndpointId),
    /// More endpoints than the policy's table can hold.
    #[error(
        "maglev table_size {table_size} must be larger than the number of endpoints ({endpoints}); choose a prime near 100 x endpoints"
    )]
    MaglevTableTooSmall {
        /// The configured size.
        table_size: u32,
        /// The pool's size.
        endpoints: usize,
    },
    /// The ring would be too large.
    #[error(
        "the hash ring would hold {points} points (vnodes x total weight), more than {max}; lower vnodes or the weights"
    )]
    RingTooLarge {
        /// Points needed.
        points: u64,
        /// The limit.
        max: u64,
    },
    /// More endpoints than fit in a pool.
    #[error("a pool holds at most {max} endpoints, got {got}")]
    TooManyEndpoints {
        /// Endpoints given.
        got: usize,
        /// The limit.
        max: usize,
    },
}

/// Most endpoints in one pool.
pub const MAX_ENDPOINTS: usize = 1 << 20;

/// Default age beyond which an engine's report counts as unknown: suits scrapes every
/// 500 ms or so (the Gateway API Inference Extension uses 200 ms for scrapes every 50 ms).
pub const DEFAULT_ENGINE_MAX_AGE: Duration = Duration::from_secs(2);

/// Pool-wide settings that are not the policy's.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectorOptions {
    latency: LatencyConfig,
    slow_start: Option<SlowStart>,
    dynamic_weight: DynamicWeight,
    engine_max_age: Duration,
}

impl Default for SelectorOptions {
    fn default() -> Self {
        SelectorOptions::new(LatencyConfig::default(), None, DynamicWeight::default())
    }
}

impl SelectorOptions {
    /// Options from their parts.
    pub fn new(latency: LatencyConfig, slow_start: Option<SlowStart>, dynamic_weight: DynamicWeight) -> Self {
        SelectorOptions { latency, slow_start, dynamic_weight, engine_max_age: DEFAULT_ENGINE_MAX_AGE }
    }

    /// Sets how old an engine report may be before policies treat the endpoint's engine load
    /// as unknown (default [`DEFAULT_ENGINE_MAX_AGE`]); about four scrape intervals.
    pub fn with_engine_max_age(mut self, max_age: Duration) -> Self {
        self.engine_max_age = max_age;
        self
    }

    /// How old an engine report may be.
    pub fn engine_max_age(&self) -> Duration {
        self.engine_max_age
    }

    /// Latency estimation settings.
    pub fn latency(&self) -> &LatencyConfig {
        &self.latency
    }

    /// Slow start, if enabled.
    pub fn slow_start(&self) -> Option<&SlowStart> {
        self.slow_start.as_ref()
    }

    /// Dynamic weighting.
    pub fn dynamic_weight(&self) -> &DynamicWeight {
        &self.dynamic_weight
    }
}

/// A pick, with what the policy knows of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    /// The endpoint's index in [`Selector::endpoints`].
    pub index: usize,
    /// Leading prompt blocks the policy's prefix index says the endpoint holds (0 for
    /// policies without one).
    pub cached_blocks: u32,
}

/// A pool ready to pick from.
pub struct Selector {
    policy: Policy,
    options: SelectorOptions,
    endpoints: Arc<[Endpoint]>,
    load: Arc<PoolLoad>,
    /// The integer weights the tables were built from (table-driven policies only).
    table_weights: Vec<u32>,
    /// What the prefix-aware policies learned; carried over by rebuilds.
    prefix: Arc<PrefixIndex>,
    balancer: Box<dyn Balance>,
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selector")
            .field("policy", &self.policy)
            .field("endpoints", &self.endpoints.len())
            .field("in_flight", &self.load.in_flight())
            .finish_non_exhaustive()
    }
}

fn uses_weight_tables(policy: &Policy) -> bool {
    matches!(
        policy,
        Policy::WeightedRoundRobin
            | Policy::Random
            | Policy::IpHash
            | Policy::HeaderHash { .. }
            | Policy::CookieHash { .. }
    )
}

fn check(policy: &Policy, endpoints: &[Endpoint]) -> Result<(), BuildError> {
    policy.validate()?;
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(BuildError::TooManyEndpoints { got: endpoints.len(), max: MAX_ENDPOINTS });
    }
    let mut seen = HashSet::with_capacity(endpoints.len());
    if let Some(dup) = endpoints.iter().find(|e| !seen.insert(e.id())) {
        return Err(BuildError::DuplicateEndpoint(dup.id().clone()));
    }
    match policy {
        Policy::Maglev { table_size, .. } if endpoints.len() > *table_size as usize => {
            Err(BuildError::MaglevTableTooSmall { table_size: *table_size, endpoints: endpoints.len() })
        }
        Policy::ConsistentHash { vnodes, .. } | Policy::BoundedLoad { vnodes, .. } => {
            let points = ring_points(endpoints, *vnodes);
            if points > MAX_RING_POINTS {
                Err(BuildError::RingTooLarge { points, max: MAX_RING_POINTS })
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// Builds the algorithm; `check` has passed. `slots` are the endpoints' places in `prefix`
/// (for the policies that use it).
fn build_balancer(
    policy: &Policy,
    endpoints: &[Endpoint],
    weights: &[u32],
    prefix: &Arc<PrefixIndex>,
    slots: Vec<SlotKey>,
) -> Box<dyn Balance> {
    let client = policy.hash_key().is_none_or(from_client);
    let index = || IndexView::new(prefix.clone(), slots);
    match policy {
        Policy::RoundRobin => Box::new(RoundRobin::default()),
        Policy::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(weights)),
        Policy::Random => Box::new(Random::new(weights)),
        Policy::LeastConnections => Box::new(LeastConnections::default()),
        Policy::LeastResponseTime => Box::new(LeastResponseTime::default()),
        Policy::PowerOfTwo { choices, cost } => Box::new(PowerOfK::new(*choices, *cost)),
        Policy::IpHash => Box::new(Sticky::new(weights, true)),
        Policy::HeaderHash { .. } | Policy::CookieHash { .. } => Box::new(Sticky::new(weights, false)),
        Policy::ConsistentHash { vnodes, .. } => Box::new(ConsistentHash::new(Ring::new(endpoints, *vnodes, client))),
        Policy::BoundedLoad { vnodes, epsilon, .. } => {
            Box::new(BoundedLoad::new(Ring::new(endpoints, *vnodes, client), endpoints, *epsilon))
        }
        Policy::Maglev { table_size, .. } => Box::new(Maglev::new(endpoints, *table_size, client)),
        Policy::Rendezvous { .. } => Box::new(Rendezvous::new(endpoints, client)),
        Policy::LeastTokens { capacity } => Box::new(LeastTokens::new(Capacities::new(capacity, endpoints))),
        Policy::PrefixAffinity { min_match_blocks, epsilon, slack_tokens, capacity, .. } => {
            Box::new(PrefixAffinity::new(
                index(),
                Capacities::new(capacity, endpoints),
                *min_match_blocks,
                *epsilon,
                *slack_tokens,
            ))
        }
        Policy::PredictedTtft { .. } => Box::new(PredictedTtft::new(index())),
        Policy::Score { weights, max_waiting, max_kv_usage, capacity, .. } => {
            Box::new(Score::new(index(), Capacities::new(capacity, endpoints), *weights, *max_waiting, *max_kv_usage))
        }
    }
}

/// Points the prefix index at `endpoints` (endpoints that stay keep what they learned, the
/// others are forgotten) and returns their slots; empties it for policies without prefixes.
fn sync_prefix(policy: &Policy, prefix: &PrefixIndex, endpoints: &[Endpoint]) -> Vec<SlotKey> {
    match policy.cache_blocks() {
        Some(blocks) => {
            prefix.set_default_capacity(blocks);
            prefix.sync(endpoints.iter().map(Endpoint::id))
        }
        None => {
            prefix.sync(std::iter::empty());
            Vec::new()
        }
    }
}

// === impl Selector ===

impl Selector {
    /// Builds a pool from scratch: every endpoint gets fresh load signals.
    pub fn try_new(
        policy: Policy,
        options: SelectorOptions,
        specs: Vec<EndpointSpec>,
        now: Instant,
    ) -> Result<Selector, BuildError> {
        let endpoints: Vec<Endpoint> = specs
            .into_iter()
            .map(|spec| {
                let signals = Arc::new(LoadSignals::new(spec.weight, &options.latency, now));
                Endpoint::new(spec, signals)
            })
            .collect();
        let prefix = Arc::new(PrefixIndex::new(policy.cache_blocks().unwrap_or(DEFAULT_CACHE_BLOCKS)));
        Self::assemble(policy, options, endpoints.into(), Arc::new(PoolLoad::default()), prefix, now)
    }

    fn assemble(
        policy: Policy,
        options: SelectorOptions,
        endpoints: Arc<[Endpoint]>,
        load: Arc<PoolLoad>,
        prefix: Arc<PrefixIndex>,
        now: Instant,
    ) -> Result<Selector, BuildError> {
        check(&policy, &endpoints)?;
        let effective = Self::update_weights(&options, &endpoints, now);
        let table_weights = if uses_weight_tables(&policy) {
            let statics: Vec<u32> = endpoints.iter().map(|e| e.weight().get()).collect();
            table_weights(&statics, &effective)
        } else {
            Vec::new()
        };
        let slots = sync_prefix(&policy, &prefix, &endpoints);
        let balancer = build_balancer(&policy, &endpoints, &table_weights, &prefix, slots);
        Ok(Selector { policy, options, endpoints, load, table_weights, prefix, balancer })
    }

    /// Each endpoint's learned speed, as a factor on its weight.
    ///
    /// Weights are the prior: an endpoint of twice the pool's mean weight is assumed twice as
    /// fast. Its answers refine that as they gain weight: the factor is the measured speed
    /// against the pool ([`Perf::speed_against`](crate::endpoint::perf::Perf::speed_against))
    /// over the speed the weight claims, raised to the endpoint's confidence (answers /
    /// (answers + 1)). So equal weights learn the speeds, weights that match the speeds stay as
    /// they are, and an endpoint with no answers keeps its weight. The factors are scaled so
    /// that the pool's total weight is unchanged: learning moves work between endpoints, it
    /// does not add or remove capacity.
    fn update_speeds(load: &PoolLoad, endpoints: &[Endpoint]) {
        if endpoints.is_empty() {
            return;
        }
        let prior = load.perf().get();
        let total: f64 = endpoints.iter().map(|e| f64::from(e.weight().get())).sum();
        let mean_weight = total / endpoints.len() as f64;
        // First the raw factors (stored), then their scale.
        let mut scaled = 0.0;
        for e in endpoints {
            let est = e.signals().perf().estimate(&prior);
            let trust = est.served / (est.served + 1.0);
            let claimed = f64::from(e.weight().get()) / mean_weight;
            let factor = est.speed_against(&prior) / claimed.powf(trust);
            e.signals().set_learned_speed(factor);
            scaled += f64::from(e.weight().get()) * factor;
        }
        let norm = if scaled.is_finite() && scaled > 0.0 { total / scaled } else { 1.0 };
        for e in endpoints {
            e.signals().set_learned_speed(e.signals().learned_speed() * norm);
        }
    }

    /// Recomputes and stores every endpoint's effective weight at `now`.
    fn update_weights(options: &SelectorOptions, endpoints: &[Endpoint], now: Instant) -> Vec<f64> {
        endpoints
            .iter()
            .map(|e| {
                let s = e.signals();
                let ramp = s.slow_start_since().map(|since| now.saturating_since(since));
                if let (Some(elapsed), Some(ss)) = (ramp, options.slow_start.as_ref())
                    && elapsed >= ss.window()
                {
                    s.end_slow_start();
                }
                let w = effective_weight(
                    e.weight().get(),
                    ramp,
                    options.slow_start.as_ref(),
                    s.utilization(),
                    &options.dynamic_weight,
                );
                s.set_effective_weight(w);
                s.set_ramp_factor(ramp_factor(ramp, options.slow_start.as_ref()));
                w
            })
            .collect()
    }

    /// A new selector for a new endpoint set. Endpoints that stay (same id) keep their load
    /// signals; new ones start fresh, in slow start when it is enabled.
    pub fn rebuild(&self, specs: Vec<EndpointSpec>, now: Instant) -> Result<Selector, BuildError> {
        let old: HashMap<&EndpointId, &Arc<LoadSignals>> =
            self.endpoints.iter().map(|e| (e.id(), e.signals())).collect();
        let endpoints: Vec<Endpoint> = specs
            .into_iter()
            .map(|spec| {
                let signals = match old.get(&spec.id) {
                    Some(&s) => s.clone(),
                    None => {
                        let s = Arc::new(LoadSignals::new(spec.weight, &self.options.latency, now));
                        if self.options.slow_start.is_some() {
                            s.start_slow_start(now);
                        }
                        s
                    }
                };
                Endpoint::new(spec, signals)
            })
            .collect();
        let (policy, options) = (self.policy.clone(), self.options.clone());
        Self::assemble(policy, options, endpoints.into(), self.load.clone(), self.prefix.clone(), now)
    }

    /// The same endpoints (and load signals, and prefix index) under another policy or
    /// options.
    pub fn reconfigure(&self, policy: Policy, options: SelectorOptions, now: Instant) -> Result<Selector, BuildError> {
        Self::assemble(policy, options, self.endpoints.clone(), self.load.clone(), self.prefix.clone(), now)
    }

    /// Recomputes effective weights at `now` (slow-start ramps, reported utilization). For
    /// table-driven policies, returns a rebuilt selector when the tables must change; the
    /// caller swaps it in. Call it periodically (every 100 ms to 1 s) off the request path.
    pub fn refresh(&self, now: Instant) -> Option<Selector> {
        self.load.perf().update(self.endpoints.iter().map(|e| e.signals().perf()));
        Self::update_speeds(&self.load, &self.endpoints);
        let effective = Self::update_weights(&self.options, &self.endpoints, now);
        self.load.set_capacities(self.endpoints.iter().map(|e| e.signals().capacity()));
        if !uses_weight_tables(&self.policy) {
            return None;
        }
        let statics: Vec<u32> = self.endpoints.iter().map(|e| e.weight().get()).collect();
        let weights = table_weights(&statics, &effective);
        if weights == self.table_weights {
            return None;
        }
        // Table-driven policies use no prefix index.
        let balancer = build_balancer(&self.policy, &self.endpoints, &weights, &self.prefix, Vec::new());
        Some(Selector {
            policy: self.policy.clone(),
            options: self.options.clone(),
            endpoints: self.endpoints.clone(),
            load: self.load.clone(),
            table_weights: weights,
            prefix: self.prefix.clone(),
            balancer,
        })
    }

    /// Chooses an endpoint for a request, or `None` when the pool is empty or every endpoint
    /// is vetoed by `accept`.
    pub fn pick<'s>(
        &'s self,
        facts: &RequestFacts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
        accept: impl FnMut(&Endpoint) -> bool,
    ) -> Option<&'s Endpoint> {
        self.pick_index(facts, now, rng, accept).map(|i| &self.endpoints[i])
    }

    /// Like [`pick`](Self::pick), giving the endpoint's index in [`endpoints`](Self::endpoints).
    pub fn pick_index(
        &self,
        facts: &RequestFacts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
        accept: impl FnMut(&Endpoint) -> bool,
    ) -> Option<usize> {
        self.pick_detailed(facts, now, rng, accept).map(|p| p.index)
    }

    /// Like [`pick_index`](Self::pick_index), with what the policy knows of the choice.
    pub fn pick_detailed(
        &self,
        facts: &RequestFacts<'_>,
        now: Instant,
        rng: &mut dyn RngCore,
        mut accept: impl FnMut(&Endpoint) -> bool,
    ) -> Option<Picked> {
        if self.endpoints.is_empty() {
            return None;
        }
        let pool = PoolView {
            endpoints: &self.endpoints,
            load: &self.load,
            latency: &self.options.latency,
            engine_max_age: self.options.engine_max_age,
        };
        let mut cx = PickCx { facts, now, rng, accept: &mut accept, cached_blocks: 0 };
        let index = self.balancer.pick(&pool, &mut cx)?;
        Some(Picked { index, cached_blocks: cx.cached_blocks })
    }

    /// Counts a request as in flight on `endpoint` (with its estimated tokens) until the guard
    /// is dropped.
    pub fn begin(&self, endpoint: &Endpoint, tokens: u64, now: Instant) -> InFlight {
        InFlight::start(endpoint.signals().clone(), self.load.clone(), tokens, now)
    }

    /// Like [`begin`](Self::begin), for a request the endpoint's performance model learns
    /// from ([`InFlight::first_token`], [`InFlight::ended`]): `cached_blocks` is what the
    /// pick said the endpoint holds of the prompt.
    pub fn begin_request(
        &self,
        endpoint: &Endpoint,
        facts: &RequestFacts<'_>,
        cached_blocks: u32,
        now: Instant,
    ) -> InFlight {
        let signals = endpoint.signals();
        // Queued ahead of it: an interactive request waits for none of the background ones,
        // which the engine keeps waiting first, so a queue no longer than them is no queue.
        let behind = if facts.background { 0 } else { signals.background() };
        let queued = signals.engine(now, self.options.engine_max_age).is_some_and(|r| u64::from(r.waiting) > behind);
        // Only a streamed first token teaches the others' weight: nothing to predict otherwise.
        let (own_wait, others_wait) = if facts.stream {
            let perf = signals.perf().estimate(&self.load.perf().get());
            crate::balance::predicted_ttft::waits(endpoint, &perf, now, self.options.engine_max_age, facts.background)
        } else {
            (0.0, 0.0)
        };
        let sent =
            Sent { uncached: facts.uncached(cached_blocks), queued, streams: facts.stream, own_wait, others_wait };
        let first_new = facts.prefix.get(cached_blocks as usize).copied().filter(|_| sent.uncached > 0);
        InFlight::start(signals.clone(), self.load.clone(), facts.estimated_tokens, now)
            .with_sent(sent, first_new)
            .in_background(facts.background)
    }

    /// The endpoints, in the order they were given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The options.
    pub fn options(&self) -> &SelectorOptions {
        &self.options
    }

    /// Requests in flight in the pool.
    pub fn in_flight(&self) -> u64 {
        self.load.in_flight()
    }

    /// Sets how many prefix blocks the index remembers for endpoint `id` (`None`: the
    /// policy's `cache_blocks`), evicting beyond it; false if the pool's policy keeps no
    /// prefix index or has no such endpoint. Call it when the engine's cache size is scraped:
    /// `limits.cache_blocks_for_engine(num_gpu_blocks, block_size)` (see
    /// [`openai::Limits`](crate::openai::Limits)). The setting lasts across rebuilds while
    /// the endpoint stays.
    pub fn set_prefix_capacity(&self, id: &EndpointId, blocks: Option<u32>) -> bool {
        self.policy.cache_blocks().is_some() && self.prefix.set_capacity(id, blocks)
    }

    /// The pool's performance prior: what an endpoint with no samples of its own is taken
    /// to be (see [`perf`](crate::endpoint::perf)).
    pub fn pool_perf(&self) -> crate::endpoint::perf::Perf {
        self.load.perf().get()
    }

    /// The pool's prefix index (empty unless the policy is `prefix_affinity` or `score`).
    pub fn prefix_index(&self) -> &Arc<PrefixIndex> {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::specs;
    use crate::policy::PolicyKind;
    use rand::{SeedableRng, rngs::SmallRng};
    use std::time::Duration;

    fn every_policy() -> Vec<Policy> {
        PolicyKind::ALL
            .into_iter()
            .map(|k| match k {
                PolicyKind::HeaderHash => Policy::HeaderHash { header: "x-user".into() },
                PolicyKind::CookieHash => Policy::CookieHash { cookie: "sid".into() },
                PolicyKind::Maglev => Policy::Maglev { key: crate::HashKey::Path, table_size: 251 },
                k => Policy::from_kind(k).expect("defaults"),
            })
            .collect()
    }

    #[test]
    fn empty_and_fully_vetoed_pools_give_none() {
        let mut rng = SmallRng::seed_from_u64(0);
        let facts = RequestFacts::with_key(b"k");
        for policy in every_policy() {
            let empty = Selector::try_new(policy.clone(), SelectorOptions::default(), vec![], Instant::ZERO).unwrap();
            assert!(empty.pick(&facts, Instant::ZERO, &mut rng, |_| true).is_none(), "{policy:?}");
            let full = Selector::try_new(policy.clone(), SelectorOptions::default(), specs(&[1, 2, 3]), Instant::ZERO)
                .unwrap();
            assert!(full.pick(&facts, Instant::ZERO, &mut rng, |_| false).is_none(), "{policy:?}");
            assert!(full.pick(&facts, Instant::ZERO, &mut rng, |_| true).is_some(), "{policy:?}");
        }
    }

    #[test]
    fn load_signals_survive_a_rebuild() {
        let pool =
            Selector::try_new(Policy::LeastConnections, SelectorOptions::default(), specs(&[1, 1]), Instant::ZERO)
                .unwrap();
        let kept = pool.endpoints()[0].clone();
        let _guard = pool.begin(&kept, 10, Instant::ZERO);
        let mut next = specs(&[1, 1, 1]);
        next.remove(1);
        let rebuilt = pool.rebuild(next, Instant::ZERO).unwrap();
        let same = rebuilt.endpoints().iter().find(|e| e.id() == kept.id()).unwrap();
        assert_eq!(same.signals().in_flight(), 1);
        assert_eq!(same.signals().in_flight_tokens(), 10);
        assert!(Arc::ptr_eq(same.signals(), kept.signals()));
        assert_eq!(rebuilt.in_flight(), 1);
    }

    #[test]
    fn duplicates_and_small_tables_are_refused() {
        let mut s = specs(&[1, 1]);
        s.push(s[0].clone());
        let e = Selector::try_new(Policy::RoundRobin, SelectorOptions::default(), s, Instant::ZERO).unwrap_err();
        assert!(matches!(e, BuildError::DuplicateEndpoint(_)), "{e}");
        let policy = Policy::Maglev { key: crate::HashKey::Path, table_size: 7 };
        let e = Selector::try_new(policy, SelectorOptions::default(), specs(&[1; 8]), Instant::ZERO).unwrap_err();
        assert!(e.to_string().contains("table_size 7"), "{e}");
        let policy = Policy::ConsistentHash { key: crate::HashKey::Path, vnodes: 10_000 };
        let e = Selector::try_new(policy, SelectorOptions::default(), specs(&[1_000; 2]), Instant::ZERO).unwrap_err();
        assert!(matches!(e, BuildError::RingTooLarge { .. }), "{e}");
    }

    #[test]
    fn slow_start_ramps_a_new_endpoint_and_refresh_rebuilds_tables() {
        let ss = SlowStart::try_new(Duration::from_secs(10), 1.0, 10.0).unwrap();
        let options = SelectorOptions::new(LatencyConfig::default(), Some(ss), DynamicWeight::default());
        let pool = Selector::try_new(Policy::WeightedRoundRobin, options, specs(&[1]), Instant::ZERO).unwrap();
        let t0 = Instant::from_millis(1_000);
        let pool = pool.rebuild(specs(&[1, 1]), t0).unwrap();
        let new = &pool.endpoints()[1];
        assert!((new.signals().effective_weight() - 0.1).abs() < 1e-9);
        let mut rng = SmallRng::seed_from_u64(0);
        let share = |p: &Selector, rng: &mut SmallRng| {
            (0..1000).filter(|_| p.pick_index(&RequestFacts::default(), t0, rng, |_| true) == Some(1)).count()
        };
        assert_eq!(share(&pool, &mut rng), 91); // 10 of 110 slots: 1000 x 10/110.
        let half = pool.refresh(t0 + Duration::from_secs(5)).expect("weights changed");
        assert!((half.endpoints()[1].signals().effective_weight() - 0.5).abs() < 1e-9);
        assert_eq!(share(&half, &mut rng), 333);
        let done = half.refresh(t0 + Duration::from_secs(11)).expect("ramp ended");
        assert_eq!(done.endpoints()[1].signals().slow_start_since(), None);
        assert_eq!(share(&done, &mut rng), 500);
        assert!(done.refresh(t0 + Duration::from_secs(12)).is_none());
    }

    #[test]
    fn dynamic_weights_follow_reported_utilization() {
        let pool =
            Selector::try_new(Policy::Random, SelectorOptions::default(), specs(&[1, 1]), Instant::ZERO).unwrap();
        pool.endpoints()[0].signals().report_utilization(Some(0.75));
        let next = pool.refresh(Instant::ZERO).expect("weights changed");
        assert!((next.endpoints()[0].signals().effective_weight() - 0.25).abs() < 1e-9);
        let mut rng = SmallRng::seed_from_u64(4);
        let busy = (0..20_000)
            .filter(|_| next.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true) == Some(0))
            .count();
        // 0.25 / 1.25 = 20%.
        assert!((3_800..4_200).contains(&busy), "{busy}");
    }

    #[test]
    fn prefix_capacities_are_set_per_endpoint_and_kept_by_rebuilds() {
        let policy = Policy::from_kind(PolicyKind::PrefixAffinity).unwrap();
        let pool = Selector::try_new(policy, SelectorOptions::default(), specs(&[1, 1]), Instant::ZERO).unwrap();
        let id = pool.endpoints()[0].id().clone();
        assert!(pool.set_prefix_capacity(&id, Some(7)));
        assert!(!pool.set_prefix_capacity(&crate::EndpointId::from("nobody"), Some(7)));
        assert_eq!(pool.prefix_index().capacity(&id), Some(7));
        let rebuilt = pool.rebuild(specs(&[1, 1, 1]), Instant::ZERO).unwrap();
        assert_eq!(rebuilt.prefix_index().capacity(&id), Some(7));
        assert!(rebuilt.set_prefix_capacity(&id, None));
        assert_eq!(rebuilt.prefix_index().capacity(&id), Some(crate::prefix::DEFAULT_CACHE_BLOCKS));
        // A policy without prefixes lets the index go.
        pool.prefix_index().record(&id, &[1, 2, 3]);
        let plain = rebuilt.reconfigure(Policy::RoundRobin, SelectorOptions::default(), Instant::ZERO).unwrap();
        assert!(plain.prefix_index().is_empty());
        assert!(!plain.set_prefix_capacity(&id, Some(1)));
    }

    #[test]
    fn engine_max_age_is_an_option() {
        let options = SelectorOptions::default();
        assert_eq!(options.engine_max_age(), DEFAULT_ENGINE_MAX_AGE);
        let options = options.with_engine_max_age(Duration::from_millis(300));
        assert_eq!(options.engine_max_age(), Duration::from_millis(300));
    }
}
