//! What a pool keeps about failures and overload between requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::resilience::Observed;
use crate::resilience::admission::{AdmissionQueue, Offer, Priority, RateDecision, RateLimiter, TicketId};
use crate::resilience::health::{Health, HealthState};
use crate::resilience::outlier::{OutlierDetector, OutlierEvent};
use crate::resilience::retry::RetryBudget;
use crate::{Endpoint, EndpointId, Instant, Unavailable};

use super::{PoolRules, Roster};

/// Locks, carrying on after a panic elsewhere: every critical section leaves its data whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One thing a pool's failure handling did, for logs, status and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolEvent {
    /// When (the driver's clock).
    pub at: Instant,
    /// The endpoint concerned (empty for the whole pool).
    pub endpoint: String,
    /// What happened: `health`, `ejected`, `returned`, `breaker`, `retry`, `drain`,
    /// `membership`, `reload`, `autoscale`.
    pub kind: &'static str,
    /// Details.
    pub detail: String,
}

/// The most events a pool keeps (the oldest go first).
pub const MAX_EVENTS: usize = 4096;

/// Counters of a pool's failure handling; they never go back, across rebuilds too.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Requests that reached the pool (after admission).
    pub requests: AtomicU64,
    /// Retries sent.
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub budget_exhausted: AtomicU64,
    /// Requests turned away by admission control (503).
    pub rejected: AtomicU64,
    /// Requests turned away by the rate limit (429).
    pub rate_limited: AtomicU64,
    /// Endpoints ejected by outlier detection.
    pub ejections: AtomicU64,
    /// Hedges sent (second tries while the first still had no response head).
    pub hedges: AtomicU64,
    /// Hedges whose response head came first and answered the request.
    pub hedges_won: AtomicU64,
}

/// A function that sees every event as it is recorded.
pub type EventSink = Box<dyn Fn(&PoolEvent) + Send + Sync>;

/// The event timeline, shared by a pool's successive builds.
struct Timeline {
    events: Mutex<VecDeque<PoolEvent>>,
    sink: Option<EventSink>,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline").field("events", &lock(&self.events).len()).finish_non_exhaustive()
    }
}

const LATENCY_SAMPLES: usize = 1024;

/// The last response-head latencies (microseconds; 0 = empty slot), written lock-free.
#[derive(Debug)]
struct LatencyRing {
    samples: Box<[AtomicU64]>,
    next: AtomicUsize,
}

/// A pool's failure-handling state: see the [module](super) doc.
#[derive(Debug)]
pub struct PoolState {
    rules: PoolRules,
    outlier: Option<Mutex<OutlierDetector>>,
    budget: Mutex<RetryBudget>,
    admission: Option<Mutex<AdmissionQueue>>,
    rate: Option<Mutex<RateLimiter>>,
    /// Endpoints with some reason to be unavailable (for panic mode).
    unavailable: AtomicUsize,
    timeline: Arc<Timeline>,
    counters: Arc<PoolCounters>,
    latencies: Arc<LatencyRing>,
}

const REASONS: [Unavailable; 4] =
    [Unavailable::Unchecked, Unavailable::Unhealthy, Unavailable::Ejected, Unavailable::Draining];

// === impl PoolState ===

impl PoolState {
    /// A new pool's state. With health checks, every endpoint waits for its first success.
    pub fn new(rules: PoolRules, endpoints: &[Endpoint], now: Instant) -> Self {
        Self::with_sink(rules, endpoints, now, None)
    }

    /// Like [`new`](Self::new), with a function that sees every event as it is recorded (the
    /// proxy logs them).
    pub fn with_sink(rules: PoolRules, endpoints: &[Endpoint], now: Instant, sink: Option<EventSink>) -> Self {
        let ids: Vec<EndpointId> = endpoints.iter().map(|e| e.id().clone()).collect();
        if rules.health.is_some() {
            for e in endpoints {
                e.signals().set_unavailable(Unavailable::Unchecked, true);
            }
        }
        let state = PoolState {
            outlier: rules.outlier.as_ref().map(|c| Mutex::new(OutlierDetector::new(c, &ids, now))),
            budget: Mutex::new(RetryBudget::new(&rules.budget, now)),
            admission: rules.admission.as_ref().map(|a| Mutex::new(AdmissionQueue::new(a))),
            rate: rules.rate_limit.as_ref().map(|r| Mutex::new(RateLimiter::new(r))),
            unavailable: AtomicUsize::new(0),
            timeline: Arc::new(Timeline { events: Mutex::new(VecDeque::new()), sink }),
            counters: Arc::default(),
            latencies: Arc::new(LatencyRing {
                samples: (0..LATENCY_SAMPLES).map(|_| AtomicU64::new(0)).collect(),
                next: AtomicUsize::new(0),
            }),
            rules,
        };
        state.recount(endpoints);
        state
    }

    /// The state of a pool rebuilt with new rules (live reload). Counters, latencies and the
    /// event timeline carry over. Endpoints keep their flags, except those the new rules no
    /// longer produce: without health checks nobody stays unchecked or unhealthy; the outlier
    /// detector starts afresh, so nobody stays ejected. Health checks newly enabled do not
    /// hold back endpoints already serving; `added` ones wait for their first check as usual.
    pub fn succeed(old: &PoolState, rules: PoolRules, endpoints: &[Endpoint], added: &[String], now: Instant) -> Self {
        let mut next = PoolState::new(rules, &[], now);
        next.timeline = old.timeline.clone();
        next.counters = old.counters.clone();
        next.latencies = old.latencies.clone();
        for e in endpoints {
            if next.rules.health.is_none() {
                e.signals().set_unavailable(Unavailable::Unchecked, false);
                e.signals().set_unavailable(Unavailable::Unhealthy, false);
            }
            // The new outlier detector knows of no ejection, so nothing would ever end one
            // carried over: every endpoint starts un-ejected under it.
            e.signals().set_unavailable(Unavailable::Ejected, false);
        }
        next.on_membership(endpoints, added);
        next
    }

    /// The rules.
    pub fn rules(&self) -> &PoolRules {
        &self.rules
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<PoolCounters> {
        &self.counters
    }

    /// Takes a new endpoint list: the outlier detector follows it (state kept by id), new
    /// endpoints wait for their first health check, and the unavailable count is redone.
    pub fn on_membership(&self, endpoints: &[Endpoint], added: &[String]) {
        if let Some(outlier) = &self.outlier {
            let ids: Vec<EndpointId> = endpoints.iter().map(|e| e.id().clone()).collect();
            lock(outlier).set_endpoints(&ids);
        }
        if self.rules.health.is_some() {
            for e in endpoints.iter().filter(|e| added.iter().any(|a| a == e.id().as_str())) {
                e.signals().set_unavailable(Unavailable::Unchecked, true);
            }
        }
        self.recount(endpoints);
    }

    fn recount(&self, endpoints: &[Endpoint]) {
        let n = endpoints.iter().filter(|e| REASONS.iter().any(|&r| e.signals().is_unavailable_for(r))).count();
        self.unavailable.store(n, Ordering::Relaxed);
    }

    /// Sets or clears a reason for an endpoint to be unavailable, keeping the count right.
    pub fn set_unavailable(&self, endpoint: &Endpoint, reason: Unavailable, on: bool) {
        if endpoint.signals().set_unavailable(reason, on) {
            if on {
                self.unavailable.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unavailable.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether too few endpoints are available: then health is ignored and traffic spreads
    /// over every endpoint but the draining ones, rather than crushing the few left (Envoy's
    /// panic mode).
    pub fn is_panic(&self, total: usize) -> bool {
        let unavailable = self.unavailable.load(Ordering::Relaxed).min(total);
        self.rules.panic_threshold.is_panic(total - unavailable, total)
    }

    /// Whether an endpoint may take a new request: available, or anything but draining when
    /// the pool is in panic.
    pub fn usable(endpoint: &Endpoint, panic: bool, now: Instant) -> bool {
        let s = endpoint.signals();
        s.is_available(now) || (panic && !s.is_unavailable_for(Unavailable::Draining))
    }

    /// Records an event (and hands it to the sink).
    pub fn event(&self, at: Instant, endpoint: &str, kind: &'static str, detail: String) {
        let event = PoolEvent { at, endpoint: endpoint.to_owned(), kind, detail };
        if let Some(sink) = &self.timeline.sink {
            sink(&event);
        }
        let mut events = lock(&self.timeline.events);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The recorded events, oldest first (the last [`MAX_EVENTS`]).
    pub fn events(&self) -> Vec<PoolEvent> {
        lock(&self.timeline.events).iter().cloned().collect()
    }

    /// Records the time to a response head.
    pub fn record_latency(&self, latency: Duration) {
        let ring = &self.latencies;
        let slot = ring.next.fetch_add(1, Ordering::Relaxed) % LATENCY_SAMPLES;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        ring.samples[slot].store(micros, Ordering::Relaxed);
    }

    /// The 95th percentile of the last 1,024 times to a response head, if any were recorded.
    pub fn p95_latency(&self) -> Option<Duration> {
        let mut v: Vec<u64> =
            self.latencies.samples.iter().map(|l| l.load(Ordering::Relaxed)).filter(|&l| l > 0).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let idx = ((v.len() as f64) * 0.95).ceil() as usize;
        Some(Duration::from_micros(v[idx.clamp(1, v.len()) - 1]))
    }

    /// Counts a request into the pool and its retry budget.
    pub(crate) fn on_request(&self, now: Instant) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        lock(&self.budget).on_request(now);
    }

    /// Takes a retry from the budget, counting either way.
    pub(crate) fn withdraw_retry(&self, now: Instant) -> bool {
        let ok = lock(&self.budget).try_withdraw(now);
        let counter = if ok { &self.counters.retries } else { &self.counters.budget_exhausted };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Takes a hedge from the retry budget (hedges and retries share it; a hedge is counted
    /// once it is sent).
    pub(crate) fn withdraw_hedge(&self, now: Instant) -> bool {
        lock(&self.budget).try_withdraw(now)
    }

    /// Feeds an outcome to the outlier detector; ejects when it says so.
    pub(crate) fn observe(&self, endpoints: &[Endpoint], idx: usize, observed: Observed, now: Instant) {
        let Some(outlier) = &self.outlier else { return };
        let ejection = lock(outlier).record(idx, observed, now);
        if let Some(ej) = ejection
            && let Some(e) = endpoints.get(ej.index)
        {
            self.eject(
                e,
                now,
                format!("{} (ejection {} for {:?})", ej.reason, ej.ejections, ej.until.saturating_since(now)),
            );
        }
    }

    fn eject(&self, endpoint: &Endpoint, now: Instant, detail: String) {
        self.set_unavailable(endpoint, Unavailable::Ejected, true);
        self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        self.event(now, endpoint.id().as_str(), "ejected", detail);
    }

    /// Runs the outlier detector's timers (ejections that end, success-rate sweeps); returns
    /// when to call again, or `None` when the pool has no outlier detection.
    pub fn tick(&self, endpoints: &[Endpoint], now: Instant) -> Option<Instant> {
        let outlier = self.outlier.as_ref()?;
        let (events, next) = {
            let mut d = lock(outlier);
            let events = d.tick(now);
            (events, d.next_deadline())
        };
        for ev in events {
            match ev {
                OutlierEvent::Ejected(ej) => {
                    if let Some(e) = endpoints.get(ej.index) {
                        self.eject(e, now, format!("{} (ejection {})", ej.reason, ej.ejections));
                    }
                }
                OutlierEvent::Returned { index, id } => {
                    if let Some(e) = endpoints.get(index) {
                        self.set_unavailable(e, Unavailable::Ejected, false);
                    }
                    self.event(now, id.as_str(), "returned", "ejection time over".to_owned());
                }
            }
        }
        Some(next)
    }

    /// The health an endpoint's flags say it has: where a restarted checker resumes from, so
    /// that a serving endpoint neither "recovers" again (events, slow start) nor stops.
    pub fn known_health(endpoint: &Endpoint) -> Health {
        let s = endpoint.signals();
        if s.is_unavailable_for(Unavailable::Unchecked) {
            Health::Unknown
        } else if s.is_unavailable_for(Unavailable::Unhealthy) {
            Health::Unhealthy
        } else {
            Health::Healthy
        }
    }

    /// Takes the result of one active health check of `endpoint` and applies what it means:
    /// the endpoint's flags follow its health after every probe (not only on a change: a
    /// checker of the pool's previous build may still have written them), a transition is
    /// recorded, and a recovery starts slow start, returns the endpoint from ejection and
    /// closes its breaker.
    pub fn on_probe(&self, roster: &dyn Roster, endpoint: &Endpoint, health: &mut HealthState, ok: bool, now: Instant) {
        let transition = health.record(ok, now);
        if health.health() != Health::Unknown {
            self.set_unavailable(endpoint, Unavailable::Unhealthy, !health.is_routable());
            self.set_unavailable(endpoint, Unavailable::Unchecked, false);
        }
        let Some(t) = transition else { return };
        self.event(now, endpoint.id().as_str(), "health", t.to_string());
        if !t.is_recovery() {
            return;
        }
        endpoint.signals().start_slow_start(now);
        // A recovered endpoint may be a restarted or replaced process: what its answers
        // taught about its speed starts again from the pool's prior.
        endpoint.signals().perf().reset();
        // Indices change when the pool does: look the endpoint up by id.
        let Some(idx) = roster.selector().endpoints().iter().position(|e| e.id() == endpoint.id()) else { return };
        if let Some(outlier) = &self.outlier
            && lock(outlier).uneject(idx)
        {
            self.set_unavailable(endpoint, Unavailable::Ejected, false);
            self.event(now, endpoint.id().as_str(), "returned", "active health check passed".to_owned());
        }
        if let Some(b) = roster.breaker(idx) {
            b.reset(endpoint, self, now);
        }
    }

    /// Stops new requests to an endpoint (they finish where they are).
    pub fn drain(&self, endpoint: &Endpoint, now: Instant) {
        self.set_unavailable(endpoint, Unavailable::Draining, true);
        self.event(now, endpoint.id().as_str(), "drain", "no new requests".to_owned());
    }

    /// Takes an endpoint out of draining: it takes new requests again (if nothing else keeps
    /// it out). Returns whether it was draining.
    pub fn undrain(&self, endpoint: &Endpoint, now: Instant) -> bool {
        let was = endpoint.signals().is_unavailable_for(Unavailable::Draining);
        self.set_unavailable(endpoint, Unavailable::Draining, false);
        if was {
            self.event(now, endpoint.id().as_str(), "undrain", "takes new requests again".to_owned());
        }
        was
    }

    /// Checks a client's key against the rate limit (always allowed without one).
    pub fn rate_check(&self, key: &[u8], now: Instant) -> RateDecision {
        let Some(rate) = &self.rate else { return RateDecision::Allowed };
        let decision = lock(rate).check(key, now);
        if matches!(decision, RateDecision::Limited { .. }) {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    /// Whether the pool has admission control.
    pub fn has_admission(&self) -> bool {
        self.admission.is_some()
    }

    /// Offers a request to admission control (admitted at once without it).
    pub fn admission_offer(&self, id: TicketId, priority: Priority, now: Instant) -> Offer {
        let Some(q) = &self.admission else { return Offer::Admitted };
        let offer = lock(q).offer(id, priority, now);
        if matches!(offer, Offer::Rejected { .. }) {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        offer
    }

    /// Withdraws a queued ticket (its waiter left or timed out); false when it was admitted
    /// meanwhile, so the caller holds a place it must release.
    pub fn admission_cancel(&self, id: TicketId) -> bool {
        self.admission.as_ref().is_some_and(|q| lock(q).cancel(id))
    }

    /// A queued request that gave up waiting (counted as rejected).
    pub fn admission_timed_out(&self) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends an admitted request; returns the queued ticket admitted in its place, if any.
    pub fn admission_release(&self, now: Instant) -> Option<TicketId> {
        self.admission.as_ref().and_then(|q| lock(q).release(now))
    }

    /// Admission control's requests in flight and requests queued, when the pool has it.
    pub fn admission_load(&self) -> Option<(u32, usize)> {
        let q = lock(self.admission.as_ref()?);
        Some((q.in_flight(), q.queued()))
    }
}
