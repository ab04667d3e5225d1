//! A pool's failure handling at run time: the core's state machines behind the locks and
//! atomics the data plane needs, and the timeline of what they decided.
//!
//! The pick path reads only atomics (`LoadSignals::is_available`, the unavailable count for
//! panic mode). Breakers, the outlier detector, the retry budget, the admission queue and the
//! rate limiter are updated under short mutexes when a request starts or ends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fulcrum_config::resilience::{PoolResilience, RateKey};
use fulcrum_core::resilience::Observed;
use fulcrum_core::resilience::admission::{AdmissionQueue, Offer, RateDecision, RateLimiter, TicketId};
use fulcrum_core::resilience::breaker::{Breaker, Permit};
use fulcrum_core::resilience::outlier::{OutlierDetector, OutlierEvent};
use fulcrum_core::resilience::retry::RetryBudget;
use fulcrum_core::{Endpoint, EndpointId, Instant, Outcome, Unavailable};
use tokio::sync::oneshot;

use crate::clock;
use crate::error::ProxyError;

/// Locks, carrying on after a panic elsewhere: every critical section leaves its data whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One thing a pool's failure handling did, for logs, status and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolEvent {
    /// When (proxy clock).
    pub at: Instant,
    /// The endpoint concerned.
    pub endpoint: String,
    /// What happened: `health`, `ejected`, `returned`, `circuit`, `retry`.
    pub kind: &'static str,
    /// Details.
    pub detail: String,
}

const MAX_EVENTS: usize = 4096;

/// Counters of a pool's failure handling.
#[derive(Debug, Default)]
pub struct SafetyStats {
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
    /// Route names, requests that reached no endpoint, admission waits (for `/metrics`).
    pub traffic: crate::stats::PoolTraffic,
}

/// A pool's failure-handling state.
#[derive(Debug)]
pub struct PoolSafety {
    pub(crate) config: PoolResilience,
    outlier: Option<Mutex<OutlierDetector>>,
    budget: Mutex<RetryBudget>,
    admission: Option<AdmissionRt>,
    rate: Option<Mutex<RateLimiter>>,
    /// Endpoints with some reason to be unavailable (for panic mode).
    unavailable: AtomicUsize,
    events: Mutex<VecDeque<PoolEvent>>,
    /// Counters (shared with the pool's successors across reloads, so they never go back).
    pub stats: Arc<SafetyStats>,
    /// The last `LATENCY_SAMPLES` response-head latencies (microseconds; 0 = empty slot),
    /// written lock-free round the ring.
    latencies: Box<[AtomicU64]>,
    latency_next: AtomicUsize,
}

const LATENCY_SAMPLES: usize = 1024;

impl PoolSafety {
    pub(crate) fn new(config: PoolResilience, endpoints: &[Endpoint]) -> Self {
        let now = clock::now();
        let ids: Vec<EndpointId> = endpoints.iter().map(|e| e.id().clone()).collect();
        let mut unavailable = 0;
        if config.health_check.is_some() {
            // Endpoints join after their first successful check.
            for e in endpoints {
                e.signals().set_unavailable(Unavailable::Unchecked, true);
                unavailable += 1;
            }
        }
        PoolSafety {
            outlier: config.outlier.as_ref().map(|c| Mutex::new(OutlierDetector::new(c, &ids, now))),
            budget: Mutex::new(RetryBudget::new(&config.budget, now)),
            admission: config.admission.as_ref().map(|a| AdmissionRt {
                state: Mutex::new(AdmissionState { queue: AdmissionQueue::new(&a.config), waiters: HashMap::new() }),
                next_id: AtomicU64::new(0),
                queue_timeout: a.config.settings().queue_timeout,
            }),
            rate: config.rate_limit.as_ref().map(|r| Mutex::new(RateLimiter::new(&r.config))),
            unavailable: AtomicUsize::new(unavailable),
            events: Mutex::new(VecDeque::new()),
            stats: Arc::default(),
            latencies: (0..LATENCY_SAMPLES).map(|_| AtomicU64::new(0)).collect(),
            latency_next: AtomicUsize::new(0),
            config,
        }
    }

    /// The failure handling of a pool rebuilt with new settings (live reload). Counters and
    /// the event timeline carry over. Endpoints keep their flags, except those the new
    /// settings no longer produce: without health checks nobody stays unchecked or
    /// unhealthy; the outlier detector starts afresh, so nobody stays ejected. Health checks newly
    /// enabled do not hold back endpoints already serving; `added` ones wait for their
    /// first check as usual.
    pub(crate) fn succeed(old: &PoolSafety, config: PoolResilience, endpoints: &[Endpoint], added: &[String]) -> Self {
        let mut next = PoolSafety::new(config, &[]);
        next.stats = old.stats.clone();
        *lock(&next.events) = lock(&old.events).clone();
        for (to, from) in next.latencies.iter().zip(old.latencies.iter()) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        next.latency_next.store(old.latency_next.load(Ordering::Relaxed), Ordering::Relaxed);
        for e in endpoints {
            if next.config.health_check.is_none() {
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

    /// Records the time to a response head.
    pub(crate) fn record_latency(&self, latency: Duration) {
        let slot = self.latency_next.fetch_add(1, Ordering::Relaxed) % LATENCY_SAMPLES;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latencies[slot].store(micros, Ordering::Relaxed);
    }

    /// The 95th percentile of the last 1,024 times to a response head, if any were recorded.
    pub fn p95_latency(&self) -> Option<Duration> {
        let mut v: Vec<u64> = self.latencies.iter().map(|l| l.load(Ordering::Relaxed)).filter(|&l| l > 0).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let idx = ((v.len() as f64) * 0.95).ceil() as usize;
        Some(Duration::from_micros(v[idx.clamp(1, v.len()) - 1]))
    }

    /// Admission control's requests in flight and requests waiting in its queue, when the
    /// pool has admission control (takes its lock briefly: for status and metrics).
    pub fn admission_load(&self) -> Option<(u32, usize)> {
        let rt = self.admission.as_ref()?;
        let st = lock(&rt.state);
        Some((st.queue.in_flight(), st.queue.queued()))
    }

    /// Records an event and logs it.
    pub fn event(&self, endpoint: &str, kind: &'static str, detail: String) {
        if kind == "retry" {
            tracing::debug!(endpoint, kind, %detail, "pool event");
        } else {
            tracing::info!(endpoint, kind, %detail, "pool event");
        }
        let mut events = lock(&self.events);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(PoolEvent { at: clock::now(), endpoint: endpoint.to_owned(), kind, detail });
    }

    /// The recorded events, oldest first (the last 4,096).
    pub fn events(&self) -> Vec<PoolEvent> {
        lock(&self.events).iter().cloned().collect()
    }

    /// Takes a new endpoint list: the outlier detector follows it (state kept by id), new
    /// endpoints wait for their first health check, and the unavailable count is redone.
    pub(crate) fn on_membership(&self, endpoints: &[Endpoint], added: &[String]) {
        if let Some(outlier) = &self.outlier {
            let ids: Vec<EndpointId> = endpoints.iter().map(|e| e.id().clone()).collect();
            lock(outlier).set_endpoints(&ids);
        }
        if self.config.health_check.is_some() {
            for e in endpoints.iter().filter(|e| added.iter().any(|a| a == e.id().as_str())) {
                e.signals().set_unavailable(Unavailable::Unchecked, true);
            }
        }
        let reasons = [Unavailable::Unchecked, Unavailable::Unhealthy, Unavailable::Ejected, Unavailable::Draining];
        let unavailable =
            endpoints.iter().filter(|e| reasons.iter().any(|&r| e.signals().is_unavailable_for(r))).count();
        self.unavailable.store(unavailable, Ordering::Relaxed);
    }

    /// Sets or clears a reason for an endpoint to be unavailable, keeping the count right.
    pub(crate) fn set_unavailable(&self, endpoint: &Endpoint, reason: Unavailable, on: bool) {
        if endpoint.signals().set_unavailable(reason, on) {
            if on {
                self.unavailable.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unavailable.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether too few endpoints are available: then health is ignored and traffic spreads
    /// over every endpoint rather than crushing the few left (Envoy's panic mode).
    pub(crate) fn is_panic(&self, total: usize) -> bool {
        // (Draining endpoints are excluded from panic spreading by the caller's veto.)
        let unavailable = self.unavailable.load(Ordering::Relaxed).min(total);
        self.config.panic_threshold.is_panic(total - unavailable, total)
    }

    /// Counts an original request into the retry budget.
    pub(crate) fn on_request(&self, now: Instant) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        lock(&self.budget).on_request(now);
    }

    /// Decides whether to try again.
    pub(crate) fn decide(
        &self,
        attempt: &fulcrum_core::resilience::retry::Attempt,
        now: Instant,
    ) -> fulcrum_core::resilience::retry::Decision {
        use fulcrum_core::resilience::retry::{Decision, GiveUp};
        let decision = clock::with_rng(|rng| {
            let mut budget = lock(&self.budget);
            self.config.retry.decide_within(attempt, &mut budget, now, rng)
        });
        match decision {
            Decision::Retry { .. } => {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Decision::GiveUp(GiveUp::BudgetExhausted) => {
                self.stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            }
            Decision::GiveUp(_) => {}
        }
        decision
    }

    /// Feeds an outcome to the outlier detector; ejects when it says so.
    pub(crate) fn observe(&self, endpoints: &[Endpoint], idx: usize, observed: Observed, now: Instant) {
        let Some(outlier) = &self.outlier else { return };
        let ejection = lock(outlier).record(idx, observed, now);
        if let Some(ej) = ejection
            && let Some(e) = endpoints.get(ej.index)
        {
            self.set_unavailable(e, Unavailable::Ejected, true);
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            let wait = ej.until.saturating_since(now);
            self.event(e.id().as_str(), "ejected", format!("{} (ejection {} for {wait:?})", ej.reason, ej.ejections));
        }
    }

    /// Returns an ejected endpoint to rotation when its active health check passes again.
    pub(crate) fn uneject(&self, endpoint: &Endpoint, idx: usize) {
        let Some(outlier) = &self.outlier else { return };
        if lock(outlier).uneject(idx) {
            self.set_unavailable(endpoint, Unavailable::Ejected, false);
            self.event(endpoint.id().as_str(), "returned", "active health check passed".to_owned());
        }
    }

    /// Runs the outlier detector's timers; returns when to call again.
    pub(crate) fn tick_outliers(&self, endpoints: &[Endpoint], now: Instant) -> Option<Instant> {
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
                        self.set_unavailable(e, Unavailable::Ejected, true);
                        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                        self.event(e.id().as_str(), "ejected", format!("{} (ejection {})", ej.reason, ej.ejections));
                    }
                }
                OutlierEvent::Returned { index, id } => {
                    if let Some(e) = endpoints.get(index) {
                        self.set_unavailable(e, Unavailable::Ejected, false);
                    }
                    self.event(id.as_str(), "returned", "ejection time over".to_owned());
                }
            }
        }
        Some(next)
    }

    /// Checks the rate limit for a client key.
    pub(crate) fn rate_limit(
        &self,
        client: std::net::IpAddr,
        headers: &http::HeaderMap,
        now: Instant,
    ) -> Result<(), ProxyError> {
        let (Some(rate), Some(cfg)) = (&self.rate, &self.config.rate_limit) else { return Ok(()) };
        let ip;
        let key: &[u8] = match &cfg.key {
            RateKey::ClientIp => {
                ip = match client {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                &ip
            }
            RateKey::Header(name) => headers.get(name.as_str()).map_or(&b""[..], |v| v.as_bytes()),
        };
        match lock(rate).check(key, now) {
            RateDecision::Allowed => Ok(()),
            RateDecision::Limited { retry_after } => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ProxyError::RateLimited { retry_after })
            }
        }
    }

    /// Waits for admission (bounded queue, priority classes, timeout).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
    ) -> Result<Option<AdmissionSlot>, ProxyError> {
        let Some(rt) = &self.admission else { return Ok(None) };
        let priority = self
            .config
            .admission
            .as_ref()
            .and_then(|a| a.priority_header.as_deref())
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0);
        let id = rt.next_id.fetch_add(1, Ordering::Relaxed);
        let now = clock::now();
        let (deadline, mut rx) = {
            let mut st = lock(&rt.state);
            match st.queue.offer(id, priority, now) {
                Offer::Admitted => return Ok(Some(AdmissionSlot { safety: self.clone() })),
                Offer::Rejected { retry_after } => {
                    drop(st);
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(ProxyError::Overloaded { retry_after });
                }
                Offer::Queued { deadline } => {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.insert(id, tx);
                    (deadline, rx)
                }
            }
        };
        // Waiting: if this future is dropped (the client left), the ticket is cancelled.
        let mut waiting = Waiting { safety: self, rt, id, done: false };
        let queued_at = std::time::Instant::now();
        let admitted = match tokio::time::timeout(deadline.saturating_since(now), &mut rx).await {
            Ok(Ok(())) => true,
            _ => rx.try_recv().is_ok(),
        };
        self.stats.traffic.admission_wait.observe(queued_at.elapsed());
        waiting.done = true;
        if admitted {
            return Ok(Some(AdmissionSlot { safety: self.clone() }));
        }
        let cancelled = {
            let mut st = lock(&rt.state);
            st.waiters.remove(&id);
            st.queue.cancel(id)
        };
        if !cancelled {
            // Admitted at the last moment, after the timeout: pass the place on.
            self.release();
        }
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        Err(ProxyError::Overloaded { retry_after: rt.queue_timeout })
    }

    fn release(&self) {
        let Some(rt) = &self.admission else { return };
        let now = clock::now();
        let mut st = lock(&rt.state);
        while let Some(next) = st.queue.release(now) {
            // A waiter that is gone passes its place on.
            if let Some(tx) = st.waiters.remove(&next)
                && tx.send(()).is_ok()
            {
                return;
            }
        }
    }
}

#[derive(Debug)]
struct AdmissionState {
    queue: AdmissionQueue,
    waiters: HashMap<TicketId, oneshot::Sender<()>>,
}

#[derive(Debug)]
struct AdmissionRt {
    state: Mutex<AdmissionState>,
    next_id: AtomicU64,
    queue_timeout: Duration,
}

/// Cancels a queued ticket when its waiter goes away early (and passes the place on if the
/// ticket had just been admitted).
struct Waiting<'a> {
    safety: &'a PoolSafety,
    rt: &'a AdmissionRt,
    id: TicketId,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done {
            let cancelled = {
                let mut st = lock(&self.rt.state);
                st.waiters.remove(&self.id);
                st.queue.cancel(self.id)
            };
            if !cancelled {
                self.safety.release();
            }
        }
    }
}

/// A place among the pool's requests in flight, held until the response ends.
pub struct AdmissionSlot {
    safety: Arc<PoolSafety>,
}

impl std::fmt::Debug for AdmissionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionSlot")
    }
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        self.safety.release();
    }
}

fn describe(t: &fulcrum_core::resilience::breaker::Transition) -> String {
    format!("{} -> {}: {}", t.from, t.to, t.reason)
}

/// An endpoint's circuit breaker, mirrored into its load signals for the lock-free veto.
#[derive(Debug)]
pub(crate) struct EndpointBreaker {
    breaker: Mutex<Breaker>,
}

impl EndpointBreaker {
    pub(crate) fn new(config: &fulcrum_core::resilience::breaker::BreakerConfig) -> Self {
        EndpointBreaker { breaker: Mutex::new(Breaker::new(config, clock::now())) }
    }

    /// Asks to send a request; `None` when the circuit refuses.
    pub(crate) fn admit(&self, endpoint: &Endpoint, safety: &PoolSafety, now: Instant) -> Option<Permit> {
        let mut b = lock(&self.breaker);
        match b.admit(now) {
            Ok(permit) => {
                if let Some(t) = permit.transition() {
                    endpoint.signals().set_circuit_open_until(None);
                    safety.event(endpoint.id().as_str(), "breaker", describe(&t));
                }
                Some(permit)
            }
            Err(_) => {
                endpoint.signals().set_circuit_open_until(b.open_until());
                None
            }
        }
    }

    /// Records how the request went.
    pub(crate) fn record(
        &self,
        endpoint: &Endpoint,
        safety: &PoolSafety,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) {
        let mut b = lock(&self.breaker);
        if let Some(t) = b.record(permit, outcome, now) {
            endpoint.signals().set_circuit_open_until(b.open_until());
            drop(b);
            safety.event(endpoint.id().as_str(), "breaker", describe(&t));
        }
    }

    /// Closes the circuit: an active health check passed.
    pub(crate) fn reset(&self, endpoint: &Endpoint, safety: &PoolSafety, now: Instant) {
        let t = lock(&self.breaker).reset(now);
        if let Some(t) = t {
            endpoint.signals().set_circuit_open_until(None);
            safety.event(endpoint.id().as_str(), "breaker", describe(&t));
        }
    }

    /// The breaker's state.
    pub(crate) fn state(&self) -> fulcrum_core::resilience::breaker::BreakerState {
        lock(&self.breaker).state()
    }

    /// Gives a permit back unused.
    pub(crate) fn cancel(&self, permit: Permit) {
        lock(&self.breaker).cancel(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_of_recent_latencies() {
        let safety = PoolSafety::new(PoolResilience::default(), &[]);
        assert_eq!(safety.p95_latency(), None);
        for ms in 1..=100 {
            safety.record_latency(Duration::from_millis(ms));
        }
        assert_eq!(safety.p95_latency(), Some(Duration::from_millis(95)));
        // The ring keeps only the most recent samples.
        for _ in 0..LATENCY_SAMPLES {
            safety.record_latency(Duration::from_millis(7));
        }
        assert_eq!(safety.p95_latency(), Some(Duration::from_millis(7)));
    }
}
