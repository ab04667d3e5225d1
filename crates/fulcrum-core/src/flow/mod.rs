//! A request's life in a pool, composed: the state a pool keeps about failures and overload
//! ([`PoolState`]) and the per-request attempt machine ([`Attempts`]) that decides, try by
//! try, where a request goes and what an outcome means.
//!
//! The pieces live in [`resilience`](crate::resilience) and the balancers; this module is the
//! one place that puts them together, so that the proxy and the simulator drive the very same
//! decisions. The shape is sozu's and quinn-proto's sans-IO state machines, with Pingora's
//! per-request context in mind:
//!
//! - [`Attempts::next`] answers [`Next::Send`] (a try on an endpoint, already counted in
//!   flight, with its breaker permit and first-byte deadline), [`Next::Wait`] (the backoff
//!   before a retry has not passed) or [`Next::Fail`] (no endpoint can take it).
//! - [`Attempts::record`] takes the try's classified outcome and the time to its response
//!   head, feeds the endpoint's latency model, its breaker and the pool's outlier detector,
//!   and answers [`Verdict::Answer`] (give the client what this try got) or
//!   [`Verdict::Retry`] (the pool's retry budget allowed another try, at a given instant).
//! - [`PoolState`] carries what outlives a request: the panic count, the outlier detector and
//!   its timers, the retry budget, admission and rate limits, the effects of health
//!   transitions (un-eject, breaker reset, slow start), the event timeline and counters.
//!
//! Nothing here reads a clock or draws ambient randomness: `now` and the generator come in as
//! arguments. Locks are short `std` mutexes around state that the proxy's threads share; the
//! pick path itself reads only atomics.
//!
//! The rules, in the order [`Attempts::next`] applies them:
//!
//! 1. A sticky endpoint (cookie) is taken on the first try when it is usable.
//! 2. Otherwise the pool's policy picks among the usable endpoints that serve the request's
//!    model and were not tried yet. Usable means available (checked, healthy, not ejected,
//!    not draining, circuit not open), or, when the pool is in panic (fewer routable than the
//!    [`PanicThreshold`]), anything but draining
//!    (Envoy's panic mode).
//! 3. The endpoint's breaker and the concurrency limits have the last word. A refusal is not
//!    a try: the endpoint is set aside and the pick runs again.
//!
//! Cost: a pick (see the policy's own cost) plus O(tries) for the veto; one short lock for
//! each breaker, outlier and budget update.
//!
//! ```
//! use fulcrum_core::flow::{Attempts, Members, Next, PoolRules, PoolState, RequestPlan, Verdict};
//! use fulcrum_core::resilience::Observed;
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector, SelectorOptions};
//! use rand::{SeedableRng, rngs::SmallRng};
//! use std::time::Duration;
//!
//! let specs = vec![
//!     EndpointSpec::new("10.0.0.1:8000".parse().unwrap()),
//!     EndpointSpec::new("10.0.0.2:8000".parse().unwrap()),
//! ];
//! let now = Instant::ZERO;
//! let selector = Selector::try_new(Policy::default(), SelectorOptions::default(), specs, now).unwrap();
//! let rules = PoolRules::default();
//! let members = Members::new(selector, rules.breaker.as_ref(), now);
//! let state = PoolState::new(rules, members.selector().endpoints(), now);
//! let mut rng = SmallRng::seed_from_u64(1);
//!
//! // A GET whose first try is refused at the connection is retried on the other endpoint.
//! let facts = RequestFacts::default();
//! let plan = RequestPlan { idempotent: true, replayable: true, ..RequestPlan::default() };
//! let mut attempts = Attempts::start(&state, &members, &facts, plan, now).unwrap();
//! let Next::Send(first) = attempts.next(&state, &members, &facts, now, &mut rng) else { panic!() };
//! let verdict = attempts.record(&state, &members, first.ticket, Observed::ConnectFailure, Duration::ZERO, now, &mut rng);
//! let Verdict::Retry { at } = verdict else { panic!("{verdict:?}") };
//! let Next::Send(second) = attempts.next(&state, &members, &facts, at, &mut rng) else { panic!() };
//! assert_ne!(first.index, second.index);
//! ```

mod attempt;
mod breaker;
mod pool;
pub mod slo;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use attempt::{Attempts, Fail, Hedging, Next, RequestPlan, Ticket, Try, UnknownModel, Verdict};
pub use breaker::SharedBreaker;
pub use pool::{EventSink, MAX_EVENTS, PoolCounters, PoolEvent, PoolState};

use crate::Selector;
use crate::resilience::admission::{AdmissionConfig, RateLimitConfig};
use crate::resilience::breaker::{BreakerConfig, Limits};
use crate::resilience::health::HealthConfig;
use crate::resilience::outlier::{OutlierConfig, PanicThreshold};
use crate::resilience::retry::{BudgetConfig, RetryPolicy};

/// Everything a pool decides about failures and overload, validated (the core's half of a
/// pool's configuration; `fulcrum-config` builds it from the file).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolRules {
    /// Active health checks: endpoints join after their first success. None: every endpoint
    /// is routable from the start.
    pub health: Option<HealthConfig>,
    /// Passive outlier detection (on by default, Envoy's defaults).
    pub outlier: Option<OutlierConfig>,
    /// Below this share of routable endpoints, traffic spreads over all of them.
    pub panic_threshold: PanicThreshold,
    /// Per-endpoint circuit breaker (on by default).
    pub breaker: Option<BreakerConfig>,
    /// Per-endpoint concurrency limits.
    pub limits: Limits,
    /// When and how to retry.
    pub retry: RetryPolicy,
    /// How many retries the pool may add.
    pub budget: BudgetConfig,
    /// Admission control (max in flight, bounded priority queue).
    pub admission: Option<AdmissionConfig>,
    /// Per-client token buckets.
    pub rate_limit: Option<RateLimitConfig>,
    /// The longest a try waits for its response head (the pool's first-byte timeout, bounded
    /// by the retry policy's per-try timeout).
    pub first_byte: Duration,
    /// Whether each try's first-byte deadline adapts to its endpoint's recent times to a
    /// response head and the request's predicted one
    /// ([`Perf::first_byte_deadline`](crate::endpoint::perf::Perf::first_byte_deadline)),
    /// with `first_byte` as the most (true).
    pub adaptive_first_byte: bool,
}

impl Default for PoolRules {
    /// No health checks, admission or rate limit; outlier detection, breakers, retries and
    /// the budget at their defaults; a 60 s first-byte timeout.
    fn default() -> Self {
        PoolRules {
            health: None,
            outlier: Some(OutlierConfig::default()),
            panic_threshold: PanicThreshold::default(),
            breaker: Some(BreakerConfig::default()),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            budget: BudgetConfig::default(),
            admission: None,
            rate_limit: None,
            first_byte: Duration::from_secs(60),
            adaptive_first_byte: true,
        }
    }
}

impl PoolRules {
    /// Whether a request may ever be tried twice, before its body is known to be replayable:
    /// the policy allows more than one try, and the method is idempotent or the route allows
    /// retrying any method (inference routes do).
    pub fn may_retry(&self, idempotent: bool, route_allows_any_method: bool) -> bool {
        self.retry.max_attempts() > 1 && (idempotent || route_allows_any_method)
    }
}

/// What the attempt machine needs of a pool's current members: the selector and, index for
/// index, each endpoint's breaker and open connections. The proxy's pool snapshot implements
/// it; [`Members`] is the plain implementation the simulator and tests use.
pub trait Roster {
    /// The balancing state and the endpoints.
    fn selector(&self) -> &Selector;
    /// The circuit breaker of endpoint `index`, when the pool has breakers.
    fn breaker(&self, index: usize) -> Option<&SharedBreaker>;
    /// Connections open to endpoint `index` (for `max_connections`-style limits; 0 when the
    /// driver has no connections to count).
    fn connections(&self, index: usize) -> u64 {
        let _ = index;
        0
    }
}

/// A selector with one breaker per endpoint: a [`Roster`] for drivers that keep no
/// connections of their own (the simulator, tests).
#[derive(Debug)]
pub struct Members {
    selector: Selector,
    breakers: Vec<SharedBreaker>,
}

impl Members {
    /// The selector's endpoints, each with a fresh breaker when `breaker` is given.
    pub fn new(selector: Selector, breaker: Option<&BreakerConfig>, now: crate::Instant) -> Self {
        let breakers = match breaker {
            Some(c) => selector.endpoints().iter().map(|_| SharedBreaker::new(c, now)).collect(),
            None => Vec::new(),
        };
        Members { selector, breakers }
    }

    /// The members after a change of endpoints (same ids keep their breakers).
    pub fn rebuild(&self, selector: Selector, breaker: Option<&BreakerConfig>, now: crate::Instant) -> Self {
        let Some(config) = breaker else { return Members { selector, breakers: Vec::new() } };
        let old = self.selector.endpoints();
        let breakers = selector
            .endpoints()
            .iter()
            .map(|e| match old.iter().position(|o| o.id() == e.id()).and_then(|i| self.breakers.get(i)) {
                Some(b) => b.clone(),
                None => SharedBreaker::new(config, now),
            })
            .collect();
        Members { selector, breakers }
    }

    /// The selector.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }
}

impl Roster for Members {
    fn selector(&self) -> &Selector {
        &self.selector
    }

    fn breaker(&self, index: usize) -> Option<&SharedBreaker> {
        self.breakers.get(index)
    }
}
