//! Self-registration in etcd: a key under a lease, kept alive by heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fulcrum_config::discovery::EndpointEntry;
use fulcrum_core::EndpointSpec;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{EtcdClient, EtcdError};
use crate::register::Heartbeat;

/// A live registration; see [`register_etcd`]. Dropping it stops the heartbeats (the key
/// then disappears when the lease's TTL runs out).
#[derive(Debug)]
pub struct EtcdRegistration {
    client: EtcdClient,
    key: String,
    lease: Arc<AtomicI64>,
    heartbeat: watch::Receiver<Heartbeat>,
    task: JoinHandle<()>,
}

/// Registers `spec` under `prefix` (key: `prefix` + `/` if missing + the endpoint's id) with
/// a lease of `ttl` (whole seconds; etcd's minimum is about 2 s), and renews the lease every
/// TTL/3 in a task until the returned handle is dropped. If the lease is lost anyway (etcd
/// was unreachable for longer than the TTL), the task grants a new one and writes the key
/// again as soon as it can; [`EtcdRegistration::heartbeat`] tells how it goes.
pub async fn register_etcd(
    client: &EtcdClient,
    prefix: &str,
    spec: &EndpointSpec,
    ttl: Duration,
) -> Result<EtcdRegistration, EtcdError> {
    let key = if prefix.ends_with('/') { format!("{prefix}{}", spec.id) } else { format!("{prefix}/{}", spec.id) };
    let mut entry = EndpointEntry::from_spec(spec);
    entry.id = Some(spec.id.to_string());
    let value =
        serde_json::to_vec(&entry).map_err(|e| EtcdError::Decode { what: "endpoint", message: e.to_string() })?;
    let grant = client.lease_grant(ttl).await?;
    client.put_with_lease(&key, &value, grant.id).await?;
    let lease = Arc::new(AtomicI64::new(grant.id));
    let (tx, heartbeat) = watch::channel(Heartbeat::Alive);
    let task = tokio::spawn(keep_alive(client.clone(), key.clone(), value, ttl, grant.ttl, lease.clone(), tx));
    Ok(EtcdRegistration { client: client.clone(), key, lease, heartbeat, task })
}

async fn keep_alive(
    client: EtcdClient,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    mut granted: Duration,
    lease: Arc<AtomicI64>,
    tx: watch::Sender<Heartbeat>,
) {
    let mut failing = false;
    loop {
        let every = (granted / 3).max(Duration::from_millis(200));
        tokio::time::sleep(if failing { every.min(Duration::from_secs(1)) } else { every }).await;
        let id = lease.load(Ordering::Relaxed);
        let outcome = match client.lease_keepalive(id).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => {
                tracing::warn!(%key, lease = id, "the etcd lease expired; registering again");
                regrant(&client, &key, &value, ttl, &lease).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(t) => {
                granted = t;
                failing = false;
                tx.send_replace(Heartbeat::Alive);
            }
            Err(e) => {
                failing = true;
                tracing::warn!(%key, error = %e, "etcd heartbeat failed");
                tx.send_replace(Heartbeat::Failing(e.to_string()));
            }
        }
    }
}

async fn regrant(
    client: &EtcdClient,
    key: &str,
    value: &[u8],
    ttl: Duration,
    lease: &AtomicI64,
) -> Result<Duration, EtcdError> {
    let grant = client.lease_grant(ttl).await?;
    client.put_with_lease(key, value, grant.id).await?;
    lease.store(grant.id, Ordering::Relaxed);
    Ok(grant.ttl)
}

// === impl EtcdRegistration ===

impl EtcdRegistration {
    /// The key written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current lease.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// How the heartbeats go.
    pub fn heartbeat(&self) -> watch::Receiver<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Stops renewing the lease, as a backend that hangs would: the key disappears when the
    /// TTL runs out.
    pub fn stop_heartbeats(&self) {
        self.task.abort();
    }

    /// Leaves now: stops the heartbeats and revokes the lease, which deletes the key.
    pub async fn deregister(self) -> Result<(), EtcdError> {
        self.task.abort();
        self.client.lease_revoke(self.lease_id()).await
    }
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}
