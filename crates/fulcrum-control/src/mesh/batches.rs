//! One proxy runs each batch: ownership of batches in mesh mode, with etcd leases.
//!
//! Proxies of a mesh whose own files point `[batch] database` at one database share their
//! batches: one SQLite file for proxies on one host, one PostgreSQL server for proxies on
//! several ([`fulcrum_proxy::batch::fulcrum_batch::store`] says why). Each batch then runs on one proxy at a time, the one that holds its key
//! `{control key}/batches/{batch id}` (`/fulcrum/config/batches/batch_...` by default). A
//! key is created only if absent, in one transaction, under its proxy's lease; its value
//! names the proxy (host, address, pid).
//!
//! - Each proxy has one lease (TTL `[batch] lease_ttl`, 10 s by default), renewed every third
//!   of it. A proxy that dies stops renewing; etcd deletes its keys when the TTL runs out.
//! - A batch created through a proxy's API is claimed there before it is stored, so it runs
//!   where it was made.
//! - Every 2 s, and at once when a key under the prefix is deleted (a lease ran out, a batch
//!   ended), each proxy reads the store's unfinished batches and claims those nobody holds
//!   (log lines `batch claimed`, and `batch taken over` with the previous holder). A batch
//!   held by another proxy never runs here.
//! - A proxy that has not renewed its lease for three quarters of the TTL (etcd unreachable)
//!   stops running its batches before etcd can give them to another: requests in flight
//!   finish and are recorded, the rest stays pending. It then asks for a new lease.
//! - When a batch ends, its holder deletes the key.
//!
//! Takeover: a batch of a proxy that died runs again elsewhere within the TTL and a moment (the
//! watch on the prefix wakes the others when the key goes; the 2 s round is the fallback). A
//! request that was in flight when its proxy died, or when the lease was lost, may reach a
//! backend twice, as after a crash; its outcome is recorded once.
//!
//! This is etcd's election recipe (a key created if absent under a lease, as
//! `concurrency.Election` and Kubernetes' leader election do), with one election per batch
//! rather than one leader for all, so that batches stay where they were created. Cost per
//! proxy: one keep-alive per TTL/3; every 2 s one range read of the prefix and one read of
//! the store's batch table; one transaction per claim.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fulcrum_discovery::etcd::{CasOutcome, EtcdClient, EventKind};
use fulcrum_proxy::batch::{Batches, Ownership};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How often a proxy looks for batches nobody holds.
pub const CLAIM_EVERY: Duration = Duration::from_secs(2);

/// What `GET /control` shows of the batches.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct BatchStatus {
    /// The prefix of the keys that say who holds which batch.
    pub prefix: String,
    /// This proxy's lease while it is valid.
    pub lease: Option<i64>,
    /// The batches this proxy holds.
    pub held: usize,
    /// The batches running here.
    pub running: usize,
}

/// The prefix of the batch keys of a mesh whose shared document is at `key`.
pub fn prefix_for(key: &str) -> String {
    format!("{}/batches/", key.trim_end_matches('/'))
}

/// This proxy's claims on batches; see the [module](self) docs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BatchOwners {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: EtcdClient,
    prefix: String,
    /// Who this proxy is, as written in the keys it holds.
    identity: String,
    ttl: Duration,
    batches: Weak<Batches>,
    lease: Mutex<Option<Lease>>,
    /// The batches this proxy holds.
    held: Mutex<HashSet<String>>,
    /// Who held a batch when this proxy last saw it held by another (a takeover's origin).
    seen: Mutex<HashMap<String, String>>,
    /// Wakes the claim round.
    wake: Notify,
}

/// The lease, and until when this proxy may count on it.
#[derive(Clone, Copy, Debug)]
struct Lease {
    id: i64,
    /// Three quarters of the TTL after the request that last renewed it was sent: etcd keeps
    /// it at least a quarter longer.
    valid_until: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.mul_f64(0.75)
}

// === impl BatchOwners ===

impl BatchOwners {
    /// Claims for `batches` (which is told to ask them, [`Batches::share`]) under `prefix`,
    /// with leases of `ttl`; `identity` names this proxy in its keys. Nothing is sent until
    /// [`run`](Self::run): until then every claim fails.
    pub fn share(
        client: EtcdClient,
        prefix: String,
        identity: String,
        ttl: Duration,
        batches: &Arc<Batches>,
    ) -> BatchOwners {
        let owners = BatchOwners {
            inner: Arc::new(Inner {
                client,
                prefix,
                identity,
                ttl,
                batches: Arc::downgrade(batches),
                lease: Mutex::new(None),
                held: Mutex::new(HashSet::new()),
                seen: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            }),
        };
        batches.share(Arc::new(owners.clone()));
        owners
    }

    /// The state of the claims.
    pub fn status(&self) -> BatchStatus {
        BatchStatus {
            prefix: self.inner.prefix.clone(),
            lease: self.valid_lease().map(|l| l.id),
            held: lock(&self.inner.held).len(),
            running: self.inner.batches.upgrade().map_or(0, |b| b.running().len()),
        }
    }

    fn key(&self, batch: &str) -> String {
        format!("{}{batch}", self.inner.prefix)
    }

    fn valid_lease(&self) -> Option<Lease> {
        let lease = (*lock(&self.inner.lease))?;
        (Instant::now() < lease.valid_until).then_some(lease)
    }

    /// Keeps a lease, claims batches nobody holds, and watches for keys that go, until the
    /// task is dropped.
    pub async fn run(self) {
        tokio::join!(self.keep_lease(), self.claim_rounds(), self.watch_deletes());
    }

    /// Grants a lease and renews it every TTL/3; when it cannot be renewed in time, stops
    /// the batches running here and starts again with a new lease.
    async fn keep_lease(&self) {
        let client = &self.inner.client;
        let mut backoff = Duration::from_millis(100);
        loop {
            let sent = Instant::now();
            let grant = match client.lease_grant(self.inner.ttl).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get an etcd lease for batches: none runs here until then");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let id = grant.id;
            *lock(&self.inner.lease) = Some(Lease { id, valid_until: valid_until(sent, grant.ttl) });
            tracing::info!(lease = id, ttl = ?grant.ttl, "batch lease granted");
            self.inner.wake.notify_one();
            let mut next = sent + grant.ttl / 3;
            let why = loop {
                let Some(lease) = *lock(&self.inner.lease) else { break "the lease is gone" };
                tokio::time::sleep_until(next.min(lease.valid_until)).await;
                if Instant::now() >= lease.valid_until {
                    break "it could not be renewed in time";
                }
                let sent = Instant::now();
                match tokio::time::timeout_at(lease.valid_until, client.lease_keepalive(id)).await {
                    Ok(Ok(Some(ttl))) => {
                        *lock(&self.inner.lease) = Some(Lease { id, valid_until: valid_until(sent, ttl) });
                        next = sent + ttl / 3;
                    }
                    Ok(Ok(None)) => break "it expired",
                    Ok(Err(e)) => {
                        tracing::warn!(lease = id, error = %e, "batch lease renewal failed; trying again");
                        next = Instant::now() + Duration::from_millis(500);
                    }
                    Err(_) => {}
                }
            };
            self.lost(id, why).await;
        }
    }

    /// Leaves (the proxy stops): stops the batches running here and revokes the lease, so
    /// that the other proxies take them over at once rather than at the end of the TTL.
    /// Stop [`run`](Self::run)'s task first.
    pub async fn leave(&self) {
        let lease = lock(&self.inner.lease).take();
        lock(&self.inner.held).clear();
        let stopped = self.inner.batches.upgrade().map_or(0, |b| b.stop_all());
        if let Some(lease) = lease {
            match self.inner.client.lease_revoke(lease.id).await {
                Ok(()) => tracing::info!(
                    lease = lease.id,
                    stopped,
                    "batch lease revoked: other proxies take the batches over"
                ),
                Err(e) => {
                    tracing::warn!(lease = lease.id, error = %e, "cannot revoke the batch lease; it ends with its TTL")
                }
            }
        }
    }

    /// The lease is lost: nothing runs here any more under it.
    async fn lost(&self, id: i64, why: &str) {
        *lock(&self.inner.lease) = None;
        lock(&self.inner.held).clear();
        let stopped = self.inner.batches.upgrade().map_or(0, |b| b.stop_all());
        tracing::warn!(
            lease = id,
            stopped,
            "lost the batch lease ({why}): the batches running here stop, other proxies take them over"
        );
        // Should etcd still keep it, its keys go now rather than at the end of the TTL.
        let _ = self.inner.client.lease_revoke(id).await;
    }

    /// Claims batches nobody holds every [`CLAIM_EVERY`], and whenever woken.
    async fn claim_rounds(&self) {
        let mut tick = tokio::time::interval(CLAIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.wake.notified() => {}
            }
            self.claim_round().await;
        }
    }

    /// One round: the store's unfinished batches against the keys in etcd. Held here and not
    /// running: start it. Held by another and running here: stop it. Held by nobody: claim
    /// it, and run it if the claim wins.
    async fn claim_round(&self) {
        let Some(lease) = self.valid_lease() else { return };
        let Some(batches) = self.inner.batches.upgrade() else { return };
        let unfinished = match batches.unfinished().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the unfinished batches");
                return;
            }
        };
        let range = match self.inner.client.get_prefix(&self.inner.prefix).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read who holds the batches");
                return;
            }
        };
        let holders: HashMap<String, _> = range
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = kv.key_str().strip_prefix(self.inner.prefix.as_str())?.to_owned();
                Some((id, kv))
            })
            .collect();
        let running: HashSet<String> = batches.running().into_iter().collect();
        for id in &unfinished {
            match holders.get(id) {
                Some(kv) if kv.lease == lease.id => {
                    lock(&self.inner.held).insert(id.clone());
                    if !running.contains(id) {
                        batches.start(id);
                    }
                }
                Some(kv) => {
                    lock(&self.inner.seen).insert(id.clone(), kv.value_str().into_owned());
                    lock(&self.inner.held).remove(id);
                    if running.contains(id) && batches.stop(id) {
                        tracing::warn!(batch = %id, holder = %kv.value_str(), "batch held by another proxy: stopping it here");
                    }
                }
                None => {
                    // Not held any more, whatever this proxy thought (the key was deleted).
                    lock(&self.inner.held).remove(id);
                    if self.claim_batch(id).await {
                        batches.start(id);
                    }
                }
            }
        }
        // Keys this proxy holds for batches that ended (a release that failed) go; not those
        // of a batch being created here, claimed before it is stored.
        let unfinished: HashSet<&String> = unfinished.iter().collect();
        let stale = holders.iter().filter(|(id, kv)| kv.lease == lease.id && !unfinished.contains(id));
        for (id, _) in stale {
            if let Ok(Some(b)) = batches.get(id).await
                && b.status.is_terminal()
                && !running.contains(id)
            {
                self.release_batch(id).await;
            }
        }
        lock(&self.inner.seen).retain(|id, _| unfinished.contains(id));
    }

    /// Watches the prefix: a key that goes (a lease ran out) wakes the claim round at once.
    async fn watch_deletes(&self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.inner.client.watch_prefix(&self.inner.prefix, 0).await {
                Ok(mut watch) => {
                    backoff = Duration::from_millis(100);
                    // Keys may have gone while the watch was down.
                    self.inner.wake.notify_one();
                    while let Ok(events) = watch.next().await {
                        for event in events.events.iter().filter(|e| e.kind == EventKind::Delete) {
                            let key = event.kv.key_str();
                            if let (Some(id), Some(prev)) =
                                (key.strip_prefix(self.inner.prefix.as_str()), &event.prev_kv)
                            {
                                let holder = prev.value_str();
                                if holder != self.inner.identity {
                                    lock(&self.inner.seen).insert(id.to_owned(), holder.into_owned());
                                }
                            }
                            self.inner.wake.notify_one();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch the batch keys"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Creates batch `id`'s key under this proxy's lease unless it exists; whether this
    /// proxy holds it.
    async fn claim_batch(&self, id: &str) -> bool {
        let Some(lease) = self.valid_lease() else { return false };
        if lock(&self.inner.held).contains(id) {
            return true;
        }
        match self.inner.client.create_with_lease(self.key(id), &self.inner.identity, lease.id).await {
            Ok(CasOutcome::Swapped { .. }) => {
                lock(&self.inner.held).insert(id.to_owned());
                match lock(&self.inner.seen).remove(id) {
                    Some(from) => tracing::info!(batch = %id, %from, lease = lease.id, "batch taken over"),
                    None => tracing::info!(batch = %id, lease = lease.id, "batch claimed"),
                }
                true
            }
            Ok(CasOutcome::Conflict { current: Some(kv) }) if kv.lease == lease.id => {
                lock(&self.inner.held).insert(id.to_owned());
                true
            }
            Ok(CasOutcome::Conflict { current }) => {
                if let Some(kv) = current {
                    lock(&self.inner.seen).insert(id.to_owned(), kv.value_str().into_owned());
                }
                false
            }
            Err(e) => {
                tracing::warn!(batch = %id, error = %e, "cannot claim the batch; it is claimed again later");
                false
            }
        }
    }

    /// Deletes batch `id`'s key if this proxy's lease holds it.
    async fn release_batch(&self, id: &str) {
        lock(&self.inner.held).remove(id);
        let Some(lease) = *lock(&self.inner.lease) else { return };
        if let Err(e) = self.inner.client.delete_if_lease(self.key(id), lease.id).await {
            tracing::debug!(batch = %id, error = %e, "cannot release the batch; its key goes with the lease");
        }
    }
}

impl Ownership for BatchOwners {
    fn claim<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(self.claim_batch(id))
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.release_batch(id))
    }

    fn holds(&self, id: &str) -> bool {
        self.valid_lease().is_some() && lock(&self.inner.held).contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keys_live_under_the_control_key() {
        assert_eq!(prefix_for("/fulcrum/config"), "/fulcrum/config/batches/");
        assert_eq!(prefix_for("/prod/fulcrum/"), "/prod/fulcrum/batches/");
    }

    #[test]
    fn a_lease_is_counted_on_for_three_quarters_of_its_ttl() {
        let now = Instant::now();
        assert_eq!(valid_until(now, Duration::from_secs(10)), now + Duration::from_millis(7500));
    }
}
