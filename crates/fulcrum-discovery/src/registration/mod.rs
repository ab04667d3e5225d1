//! Self-registration over HTTP: backends register with the proxy's admin API and send
//! heartbeats; a backend that falls silent for longer than its TTL leaves the pool.
//!
//! The [`Registry`] holds, for each pool whose discovery kind is `registration`, a
//! [`Membership`]: the sans-IO lease state machine of `fulcrum-core`, fed with the time read
//! here. [`registration_router`] exposes it as JSON (see [`api`] for the calls), and the
//! pool's provider task pushes the live set to the pool whenever it changes and whenever a
//! lease runs out, at the lease's deadline.
//!
//! Leases live in the proxy's memory: after a restart the pool starts from its configured
//! `endpoints`, and each backend's next heartbeat gets a 404 that tells it to register again
//! ([`register_http`] does that by itself), so the pool refills within one heartbeat period.

pub mod api;
mod client;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fulcrum_core::membership::{Lease, LeaseLimits, Membership, MembershipError, Registered};
use fulcrum_core::{EndpointSpec, Instant};
use tokio::sync::Notify;

pub use api::registration_router;
pub use client::{HttpRegistration, RegistrationClientError, register_http};

use crate::publish::Publisher;

/// The registrations of every pool that accepts them; cheap to clone, safe to share.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    origin: tokio::time::Instant,
    pools: Mutex<HashMap<String, PoolLeases>>,
}

#[derive(Debug)]
struct PoolLeases {
    members: Membership,
    changed: Arc<Notify>,
}

/// Why the registry refused a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The pool does not take registrations.
    #[error("no pool named `{0}` accepts registrations (its discovery must be {{ kind = \"registration\" }})")]
    UnknownPool(String),
    /// The lease state machine refused.
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

// === impl Registry ===

impl Registry {
    /// An empty registry: no pool accepts registrations until [`enable`](Self::enable)d.
    pub fn new() -> Self {
        Registry { inner: Arc::new(Inner { origin: tokio::time::Instant::now(), pools: Mutex::default() }) }
    }

    fn now(&self) -> Instant {
        let elapsed = self.inner.origin.elapsed();
        Instant::from_nanos(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
    }

    fn deadline(&self, at: Instant) -> tokio::time::Instant {
        self.inner.origin + Duration::from_nanos(at.as_nanos())
    }

    fn with_pool<T>(
        &self,
        pool: &str,
        f: impl FnOnce(&mut PoolLeases, Instant) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let now = self.now();
        let mut pools = self.inner.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let leases = pools.get_mut(pool).ok_or_else(|| RegistryError::UnknownPool(pool.to_owned()))?;
        let (version, expiry) = (leases.members.version(), leases.members.next_expiry());
        let out = f(leases, now);
        // The provider sleeps until the next expiry: wake it for a change, and for an expiry
        // that came sooner (the failure detector's verdict moves earlier as it learns).
        let sooner = match (leases.members.next_expiry(), expiry) {
            (Some(next), Some(before)) => next < before,
            (next, before) => next.is_some() && before.is_none(),
        };
        if leases.members.version() != version || sooner {
            leases.changed.notify_one();
        }
        out
    }

    /// Lets `pool` take registrations with these limits (keeping any leases it holds), and
    /// returns what is notified when its membership changes.
    pub fn enable(&self, pool: &str, limits: LeaseLimits) -> Arc<Notify> {
        let mut pools = self.inner.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = pools
            .entry(pool.to_owned())
            .or_insert_with(|| PoolLeases { members: Membership::new(limits), changed: Arc::new(Notify::new()) });
        if *entry.members.limits() != limits {
            let mut members = Membership::new(limits);
            let now = self.now();
            for lease in entry.members.leases() {
                let ttl = lease.ttl.clamp(limits.min_ttl, limits.max_ttl);
                // Full or out of range under the new limits: the lease is dropped.
                let _ = members.register(lease.spec.clone(), Some(ttl), now);
            }
            entry.members = members;
            entry.changed.notify_one();
        }
        entry.changed.clone()
    }

    /// Stops `pool` taking registrations and forgets its leases.
    pub fn disable(&self, pool: &str) {
        self.inner.pools.lock().unwrap_or_else(PoisonError::into_inner).remove(pool);
    }

    /// Registers (or re-registers) an endpoint; `ttl` `None` takes the pool's default.
    pub fn register(&self, pool: &str, spec: EndpointSpec, ttl: Option<Duration>) -> Result<Registered, RegistryError> {
        self.with_pool(pool, |l, now| Ok(l.members.register(spec, ttl, now)?))
    }

    /// A heartbeat.
    pub fn renew(&self, pool: &str, id: &str) -> Result<LeaseView, RegistryError> {
        self.with_pool(pool, |l, now| {
            let lease = l.members.renew(id, now)?.clone();
            Ok(LeaseView::of(&lease, l.members.phi(&lease, now), now))
        })
    }

    /// Removes a registration at once.
    pub fn remove(&self, pool: &str, id: &str) -> Result<(), RegistryError> {
        self.with_pool(pool, |l, _| {
            l.members.remove(id).map(|_| ()).ok_or_else(|| MembershipError::Unknown(id.to_owned()).into())
        })
    }

    /// The live registrations of a pool, ordered by id.
    pub fn list(&self, pool: &str) -> Result<Vec<LeaseView>, RegistryError> {
        self.with_pool(pool, |l, now| {
            l.members.expire(now);
            Ok(l.members.leases().map(|lease| LeaseView::of(lease, l.members.phi(lease, now), now)).collect())
        })
    }

    /// Expires what is due and returns the live set and when the next lease runs out.
    fn live(&self, pool: &str) -> Result<(Vec<EndpointSpec>, Option<tokio::time::Instant>), RegistryError> {
        self.with_pool(pool, |l, now| {
            for gone in l.members.expire(now) {
                if gone.ttl_deadline() <= now {
                    tracing::info!(pool, id = %gone.spec.id, "a registration expired: no heartbeat within its ttl");
                } else {
                    tracing::info!(pool, id = %gone.spec.id, "a registration expired: its heartbeats stopped (phi above the threshold)");
                }
            }
            Ok((l.members.live(), l.members.next_expiry().map(|at| self.deadline(at))))
        })
    }
}

/// A registration as the API shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LeaseView {
    /// The lease's id (the endpoint's id).
    pub id: String,
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: fulcrum_config::discovery::EndpointEntry,
    /// Its TTL.
    pub ttl_ms: u64,
    /// Time left before it expires: its TTL, or the failure detector's verdict if sooner.
    pub expires_in_ms: u64,
    /// Heartbeats received.
    pub renewals: u64,
    /// The failure detector's phi now (rounded to 0.01): how unlikely the silence since the
    /// last heartbeat is; `null` until it has enough heartbeats (or without a detector).
    pub phi: Option<f64>,
}

impl LeaseView {
    fn of(lease: &Lease, phi: Option<f64>, now: Instant) -> Self {
        let mut endpoint = fulcrum_config::discovery::EndpointEntry::from_spec(&lease.spec);
        endpoint.id = None;
        LeaseView {
            id: lease.spec.id.to_string(),
            endpoint,
            ttl_ms: millis(lease.ttl),
            expires_in_ms: millis(lease.deadline().saturating_since(now)),
            renewals: lease.renewals,
            phi: phi.map(|p| (p.min(1e6) * 100.0).round() / 100.0),
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `registration` provider: pushes the pool's live set on every change and expiry.
/// Runs until aborted.
pub(crate) async fn run(registry: Registry, limits: LeaseLimits, mut out: Publisher) {
    let pool = out.pool().to_owned();
    let changed = registry.enable(&pool, limits);
    loop {
        let next = match registry.live(&pool) {
            Ok((set, next)) => {
                out.publish(set, Vec::new());
                next
            }
            Err(e) => {
                // Someone disabled the pool: nothing more to do.
                return out.fail(&e);
            }
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = changed.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => changed.notified().await,
        }
    }
}
