//! A pool's failure handling at run time: the core's [`PoolState`] (every decision, and the
//! timeline of what it decided), and the effects only the proxy has: requests waiting for
//! admission, rate-limit keys read from headers, traffic figures for `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fulcrum_config::resilience::{PoolResilience, RateKey};
use fulcrum_core::flow::{PoolCounters, PoolRules, PoolState};
use fulcrum_core::resilience::admission::{Offer, RateDecision, TicketId};
use fulcrum_core::{Endpoint, Instant};
use tokio::sync::oneshot;

use crate::clock;
use crate::error::ProxyError;

pub use fulcrum_core::flow::PoolEvent;

/// Locks, carrying on after a panic elsewhere: every critical section leaves its data whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counters of a pool's failure handling: the core's ([`PoolCounters`], through `Deref`) and
/// the proxy's traffic figures.
#[derive(Debug, Default)]
pub struct SafetyStats {
    counters: Arc<PoolCounters>,
    /// Route names, requests that reached no endpoint, admission waits (for `/metrics`).
    pub traffic: crate::stats::PoolTraffic,
    /// The pool's autoscaler's last tick, when it has one.
    scale: std::sync::Mutex<Option<fulcrum_core::scale::ScaleStatus>>,
}

impl SafetyStats {
    /// The pool's autoscaler's last tick; `None` when the pool has no autoscaler running.
    pub fn scale(&self) -> Option<fulcrum_core::scale::ScaleStatus> {
        self.scale.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Keeps the autoscaler's last tick (`None` when it stops).
    pub fn set_scale(&self, status: Option<fulcrum_core::scale::ScaleStatus>) {
        *self.scale.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }
}

impl std::ops::Deref for SafetyStats {
    type Target = PoolCounters;

    fn deref(&self) -> &PoolCounters {
        &self.counters
    }
}

/// A pool's failure handling: the core's [`PoolState`] (every decision) and what only the
/// proxy has: the waiters of the admission queue and the traffic figures.
#[derive(Debug)]
pub struct PoolSafety {
    pub(crate) config: PoolResilience,
    state: PoolState,
    admission: Option<AdmissionRt>,
    /// Counters (shared with the pool's successors across reloads, so they never go back).
    pub stats: Arc<SafetyStats>,
}

fn log_event(e: &PoolEvent) {
    if e.kind == "retry" {
        tracing::debug!(endpoint = %e.endpoint, kind = e.kind, detail = %e.detail, "pool event");
    } else {
        tracing::info!(endpoint = %e.endpoint, kind = e.kind, detail = %e.detail, "pool event");
    }
}

impl PoolSafety {
    pub(crate) fn new(config: PoolResilience, rules: PoolRules, endpoints: &[Endpoint], now: Instant) -> Self {
        let state = PoolState::with_sink(rules, endpoints, now, Some(Box::new(log_event)));
        let stats = Arc::new(SafetyStats {
            counters: state.counters().clone(),
            traffic: Default::default(),
            scale: Default::default(),
        });
        Self::assemble(config, state, stats)
    }

    fn assemble(config: PoolResilience, state: PoolState, stats: Arc<SafetyStats>) -> Self {
        PoolSafety {
            admission: config.admission.as_ref().map(|a| AdmissionRt {
                waiters: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                queue_timeout: a.config.settings().queue_timeout,
            }),
            config,
            state,
            stats,
        }
    }

    /// The failure handling of a pool rebuilt with new settings (live reload): see
    /// [`PoolState::succeed`]; the counters carry over.
    pub(crate) fn succeed(
        old: &PoolSafety,
        config: PoolResilience,
        rules: PoolRules,
        endpoints: &[Endpoint],
        added: &[String],
        now: Instant,
    ) -> Self {
        let state = PoolState::succeed(&old.state, rules, endpoints, added, now);
        Self::assemble(config, state, old.stats.clone())
    }

    /// The core's state: the attempt machine and the health checks drive it.
    pub fn state(&self) -> &PoolState {
        &self.state
    }

    /// The 95th percentile of the last 1,024 times to a response head, if any were recorded.
    pub fn p95_latency(&self) -> Option<Duration> {
        self.state.p95_latency()
    }

    /// Admission control's requests in flight and requests waiting in its queue, when the
    /// pool has admission control (takes its lock briefly: for status and metrics).
    pub fn admission_load(&self) -> Option<(u32, usize)> {
        self.state.admission_load()
    }

    /// Records an event (it is logged too), at the clock's current reading.
    pub fn event(&self, endpoint: &str, kind: &'static str, detail: String) {
        self.state.event(clock::now(), endpoint, kind, detail);
    }

    /// The recorded events, oldest first (the last 4,096).
    pub fn events(&self) -> Vec<PoolEvent> {
        self.state.events()
    }

    /// Checks the rate limit for a client key (the clock is read only when the pool has one).
    pub(crate) fn rate_limit(&self, client: std::net::IpAddr, headers: &http::HeaderMap) -> Result<(), ProxyError> {
        let Some(cfg) = &self.config.rate_limit else { return Ok(()) };
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
        match self.state.rate_check(key, clock::now()) {
            RateDecision::Allowed => Ok(()),
            RateDecision::Limited { retry_after } => Err(ProxyError::RateLimited { retry_after }),
        }
    }

    /// Waits for admission (bounded queue, priority classes, timeout). A client of an
    /// untrusted listener claims at most the pool's `untrusted_priority`.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        trusted: bool,
    ) -> Result<Option<AdmissionSlot>, ProxyError> {
        let Some(rt) = &self.admission else { return Ok(None) };
        let config = self.config.admission.as_ref();
        let claimed = config
            .and_then(|a| a.priority_header.as_deref())
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0);
        let priority = if trusted { claimed } else { claimed.min(config.map_or(0, |a| a.untrusted_priority)) };
        let id = rt.next_id.fetch_add(1, Ordering::Relaxed);
        let now = clock::now();
        let (deadline, mut rx) = {
            // The core's queue is only ever touched under the waiters' lock, so that an
            // admission and its wake-up are one step.
            let mut waiters = lock(&rt.waiters);
            match self.state.admission_offer(id, priority, now) {
                Offer::Admitted => return Ok(Some(AdmissionSlot { safety: self.clone() })),
                Offer::Rejected { retry_after } => return Err(ProxyError::Overloaded { retry_after }),
                Offer::Queued { deadline } => {
                    let (tx, rx) = oneshot::channel();
                    waiters.insert(id, tx);
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
        if !self.cancel(rt, id) {
            // Admitted at the last moment, after the timeout: pass the place on.
            self.release();
        }
        self.state.admission_timed_out();
        Err(ProxyError::Overloaded { retry_after: rt.queue_timeout })
    }

    /// Withdraws a queued ticket; false when it was admitted meanwhile.
    fn cancel(&self, rt: &AdmissionRt, id: TicketId) -> bool {
        let mut waiters = lock(&rt.waiters);
        waiters.remove(&id);
        self.state.admission_cancel(id)
    }

    fn release(&self) {
        let Some(rt) = &self.admission else { return };
        let now = clock::now();
        let mut waiters = lock(&rt.waiters);
        while let Some(next) = self.state.admission_release(now) {
            // A waiter that is gone passes its place on.
            if let Some(tx) = waiters.remove(&next)
                && tx.send(()).is_ok()
            {
                return;
            }
        }
    }
}

#[derive(Debug)]
struct AdmissionRt {
    waiters: Mutex<HashMap<TicketId, oneshot::Sender<()>>>,
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
        if !self.done && !self.safety.cancel(self.rt, self.id) {
            self.safety.release();
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
