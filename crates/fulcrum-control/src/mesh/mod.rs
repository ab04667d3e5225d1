//! Mesh mode: many proxies, one desired configuration, kept in etcd.
//!
//! Every proxy started with `--control etcd://HOST:PORT[/KEY]` combines its own file (where
//! it listens) with the shared document at `KEY` (default `/fulcrum/config`: the pools and
//! routes, see [`document`]) and runs the result. It watches the key and applies each new
//! version as a live reload. A change made through any proxy's admin API is written to the
//! key with a compare-and-swap on the revision that proxy last saw, so two concurrent changes
//! cannot silently overwrite each other (the second gets 409, to send again);
//! every proxy, the writer included, then applies it from the watch (or the writer at once).
//!
//! When etcd cannot be reached, each proxy keeps serving its last configuration, shows the
//! failure in `GET /control` and `fulcrum_control_plane_connected`, refuses API changes with
//! 503 (rather than letting proxies drift apart), and reads and watches again with backoff.
//! The first proxy to start with an empty key publishes its own file's pools and routes.
//!
//! Proxies that share a batch database run each batch on one proxy at a time, held with an
//! etcd lease, and take over the batches of a proxy that dies: see [`batches`].

pub mod batches;
pub mod document;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fulcrum_discovery::etcd::{CasOutcome, EtcdClient, EtcdError, EventKind};
use fulcrum_proxy::{Live, ReloadError, ReloadReport};

pub use document::{DocumentError, combine, shared_part};

/// The key the shared document lives at unless the URL names another.
pub const DEFAULT_KEY: &str = "/fulcrum/config";

/// Where the shared document lives: parsed from `etcd://host:port[,host:port...][/key]`, or
/// `etcds://...` for etcd over https.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// etcd client endpoints (`http://host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// The key.
    pub key: String,
    /// For `etcds://`: a CA bundle (else the system's roots) and a client certificate (see
    /// [`with_tls`](Self::with_tls)).
    pub tls: Option<fulcrum_config::UpstreamTls>,
}

impl ControlUrl {
    /// Adds the TLS files of `--control-ca`, `--control-cert` and `--control-key`; they need
    /// an `etcds://` URL, and a certificate needs its key.
    pub fn with_tls(
        mut self,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
    ) -> Result<ControlUrl, String> {
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => Some(fulcrum_config::CertificateFiles { cert, key }),
            (None, None) => None,
            _ => return Err("--control-cert and --control-key go together".into()),
        };
        let https = self.endpoints.iter().all(|e| e.starts_with("https://"));
        if !https && (ca.is_some() || client_cert.is_some()) {
            return Err("--control-ca, --control-cert and --control-key need an etcds:// control URL".into());
        }
        if https {
            self.tls = Some(fulcrum_config::UpstreamTls { server_name: None, ca, client_cert });
        }
        Ok(self)
    }
}

impl std::str::FromStr for ControlUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = match (s.strip_prefix("etcd://"), s.strip_prefix("etcds://")) {
            (Some(rest), _) => ("http", rest),
            (_, Some(rest)) => ("https", rest),
            _ => {
                return Err(format!(
                    "{s:?}: a control plane URL starts with etcd:// (etcd://127.0.0.1:2379), or etcds:// for https"
                ));
            }
        };
        let (hosts, key) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_KEY),
        };
        let key = if key == "/" { DEFAULT_KEY } else { key };
        let endpoints: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("{scheme}://{h}")).collect();
        if endpoints.is_empty() {
            return Err(format!("{s:?}: name at least one etcd host:port"));
        }
        Ok(ControlUrl { endpoints, key: key.to_owned(), tls: None })
    }
}

/// Why a change through the mesh was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// etcd could not be reached: nothing changed anywhere.
    #[error("the control plane (etcd) cannot be reached, nothing changed: {0}")]
    Unreachable(#[source] EtcdError),
    /// Another change was written first.
    #[error("the shared configuration changed meanwhile (now at revision {revision}); read it again and retry")]
    Conflict {
        /// The revision the key is at now.
        revision: i64,
    },
    /// The change would not run here.
    #[error(transparent)]
    Refused(#[from] ReloadError),
    /// The texts do not combine.
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// What `GET /control` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MeshStatus {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// The key of the shared document.
    pub key: String,
    /// Whether the last call to etcd succeeded and the watch is open.
    pub connected: bool,
    /// The shared document's revision last applied (0: none yet).
    pub revision: i64,
    /// The last error talking to etcd or applying a version, if any since the last success.
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch of the last version applied.
    pub applied_at_unix: Option<u64>,
    /// With `[batch]`: the batches this proxy holds and runs ([`batches`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<batches::BatchStatus>,
}

/// A proxy's link to the shared configuration. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Mesh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: EtcdClient,
    key: String,
    live: Live,
    /// The proxy's own file's text.
    own: Mutex<Arc<str>>,
    /// The shared document last applied, and its revision.
    shared: Mutex<(Option<Arc<str>>, i64)>,
    status: Mutex<MeshStatus>,
    /// The claims on batches, with `[batch]`.
    batch_owners: OnceLock<batches::BatchOwners>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Mesh {
    /// A link for `live`, whose own file's text is `own`. Nothing is sent until
    /// [`run`](Self::run).
    pub fn new(url: &ControlUrl, own: &str, live: Live) -> Result<Mesh, EtcdError> {
        let client = EtcdClient::with_tls(&url.endpoints, Duration::from_secs(2), url.tls.as_ref())?;
        let status = MeshStatus { endpoints: url.endpoints.clone(), key: url.key.clone(), ..MeshStatus::default() };
        Ok(Mesh {
            inner: Arc::new(Inner {
                client,
                key: url.key.clone(),
                live,
                own: Mutex::new(Arc::from(own)),
                shared: Mutex::new((None, 0)),
                status: Mutex::new(status),
                batch_owners: OnceLock::new(),
            }),
        })
    }

    /// The link's state.
    pub fn status(&self) -> MeshStatus {
        let mut status = lock(&self.inner.status).clone();
        status.batches = self.inner.batch_owners.get().map(batches::BatchOwners::status);
        status
    }

    /// Runs each of `batches` on one proxy of the mesh at a time (see [`batches`]): keys
    /// under [`batches::prefix_for`] this mesh's key, held under a lease of `ttl`; `identity`
    /// names this proxy in them. Call before the proxy runs; spawn the returned claims'
    /// [`run`](batches::BatchOwners::run).
    pub fn share_batches(
        &self,
        batches: &Arc<fulcrum_proxy::batch::Batches>,
        identity: String,
        ttl: Duration,
    ) -> batches::BatchOwners {
        let prefix = batches::prefix_for(&self.inner.key);
        let owners = batches::BatchOwners::share(self.inner.client.clone(), prefix, identity, ttl, batches);
        let _ = self.inner.batch_owners.set(owners.clone());
        owners
    }

    fn failed(&self, error: &dyn std::fmt::Display) {
        let mut s = lock(&self.inner.status);
        s.connected = false;
        s.last_error = Some(error.to_string());
    }

    /// Takes version `revision` of the shared document: unless `force`, only when it is
    /// newer than the last version seen (watch events, a publish and a reconnect may bring
    /// the same version twice, or an older one late). It is recorded as seen even when this
    /// proxy refuses to run it, so that edits build on the latest version. The lock on the
    /// shared document is held through the reload: versions apply one at a time, in order.
    fn apply(&self, shared: Arc<str>, revision: i64, force: bool) -> Result<Option<ReloadReport>, MeshError> {
        let mut seen = lock(&self.inner.shared);
        if !force && seen.0.is_some() && revision <= seen.1 {
            return Ok(None);
        }
        *seen = (Some(shared.clone()), revision);
        let own = lock(&self.inner.own).clone();
        let text = combine(&own, &shared)?;
        let current = self.inner.live.state();
        let report = if current.text().is_some_and(|t| **t == *text) {
            None
        } else {
            // Relative paths (TLS files, a CA) stay relative to the proxy's own file.
            Some(self.inner.live.reload_text(&text, self.inner.live.path())?)
        };
        // Still under the shared document's lock: a newer version applied by another task
        // right after this one must not have its revision overwritten by this older one.
        let mut s = lock(&self.inner.status);
        s.revision = revision;
        s.last_error = None;
        s.applied_at_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs());
        drop(s);
        drop(seen);
        Ok(report)
    }

    /// Follows the shared document until the task is dropped: reads it (publishing the own
    /// file's pools and routes if the key is empty), applies it, watches it, and starts
    /// again with backoff (100 ms doubling to 2 s) whenever etcd fails.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, key = %self.inner.key, "control plane unreachable: serving the last configuration");
                    self.failed(&e);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn follow(&self) -> Result<(), EtcdError> {
        let client = &self.inner.client;
        let key = &self.inner.key;
        let (shared, revision) = match client.get(key).await? {
            Some(kv) => (Arc::<str>::from(kv.value_str()), kv.mod_revision),
            None => {
                let own = lock(&self.inner.own).clone();
                let mine = shared_part(&own).unwrap_or_default();
                match client.compare_and_swap(key, 0, &mine).await? {
                    CasOutcome::Swapped { revision } => {
                        tracing::info!(%key, revision, "published this proxy's pools and routes as the shared configuration");
                        (Arc::from(mine), revision)
                    }
                    CasOutcome::Conflict { current: Some(kv) } => (Arc::from(kv.value_str()), kv.mod_revision),
                    CasOutcome::Conflict { current: None } => return Ok(()),
                }
            }
        };
        let mut watch = client.watch_key(key, revision + 1).await?;
        self.apply_logged(shared, revision);
        // Connected once the current version has been taken (or refused), not before.
        lock(&self.inner.status).connected = true;
        loop {
            let batch = watch.next().await?;
            for event in batch.events {
                match event.kind {
                    EventKind::Put => {
                        let rev = event.kv.mod_revision;
                        self.apply_logged(Arc::from(event.kv.value_str()), rev);
                    }
                    EventKind::Delete => {
                        tracing::warn!(%key, "the shared configuration was deleted: keeping the running one");
                    }
                }
            }
        }
    }

    fn apply_logged(&self, shared: Arc<str>, revision: i64) {
        match self.apply(shared, revision, false) {
            Ok(Some(report)) => {
                tracing::info!(revision, generation = report.generation, "applied the shared configuration")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(revision, error = %e, "refused a version of the shared configuration; the running one stays");
                lock(&self.inner.status).last_error = Some(format!("revision {revision} refused: {e}"));
            }
        }
    }

    /// Edits the latest shared version seen (combined with the own file, as the admin API
    /// shows it) with `change`, and publishes the result against that version's revision:
    /// a version published meanwhile by another proxy makes it a conflict, never a silent
    /// overwrite. `Ok(Err(_))` is an edit refused by `change`.
    pub async fn edit<E>(
        &self,
        change: impl FnOnce(&str) -> Result<String, E>,
    ) -> Result<Result<ReloadReport, E>, MeshError> {
        let (shared, revision) = lock(&self.inner.shared).clone();
        let whole = match shared {
            Some(shared) => combine(&lock(&self.inner.own).clone(), &shared)?,
            None => self.inner.live.state().text().map(|t| t.to_string()).unwrap_or_default(),
        };
        match change(&whole) {
            Ok(next) => self.publish_at(&next, revision).await.map(Ok),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Publishes the pools and routes of `whole` (a whole configuration) against the latest
    /// version seen.
    pub async fn publish(&self, whole: &str) -> Result<ReloadReport, MeshError> {
        let revision = lock(&self.inner.shared).1;
        self.publish_at(whole, revision).await
    }

    /// Checks `whole` here, writes its pools and routes with a compare-and-swap on
    /// `expected` (the revision the change was based on), then applies it here at once;
    /// the other proxies apply it from their watches.
    async fn publish_at(&self, whole: &str, expected: i64) -> Result<ReloadReport, MeshError> {
        let shared: Arc<str> = Arc::from(shared_part(whole)?);
        let own = lock(&self.inner.own).clone();
        let text = combine(&own, &shared)?;
        self.inner.live.check_text(&text)?;
        match self.inner.client.compare_and_swap(&self.inner.key, expected, &*shared).await {
            Err(e) => {
                self.failed(&e);
                Err(MeshError::Unreachable(e))
            }
            Ok(CasOutcome::Conflict { current }) => {
                Err(MeshError::Conflict { revision: current.map_or(0, |kv| kv.mod_revision) })
            }
            Ok(CasOutcome::Swapped { revision }) => {
                // Checked above; should this proxy still refuse it, the others got it.
                let report = self.apply(shared, revision, false).map_err(|e| {
                    tracing::error!(revision, error = %e, "published a version this proxy then refused");
                    e
                })?;
                Ok(report.unwrap_or_else(|| ReloadReport {
                    generation: self.inner.live.state().generation(),
                    ..ReloadReport::default()
                }))
            }
        }
    }

    /// Reads the own file again (SIGHUP, file change, `POST /reload`) and applies it with
    /// the shared document last seen; its own pools and routes do not count in mesh mode.
    pub fn reload_own(&self) -> Result<ReloadReport, MeshError> {
        let Some(path) = self.inner.live.path() else {
            return Err(MeshError::Refused(ReloadError::NeedsRestart {
                field: String::new(),
                message: "the proxy was not started from a file: there is nothing to read again".into(),
            }));
        };
        let own = std::fs::read_to_string(path)
            .map_err(|e| ReloadError::Invalid(fulcrum_config::ConfigError::unreadable(path, &e).into()))?;
        // The own file must be valid on its own before it is combined.
        fulcrum_config::Config::parse(&own, Some(path)).map_err(ReloadError::Invalid)?;
        let (shared, revision) = lock(&self.inner.shared).clone();
        let previous = std::mem::replace(&mut *lock(&self.inner.own), Arc::from(own.as_str()));
        let outcome = match shared {
            Some(shared) => self.apply(shared, revision, true).map(|r| r.unwrap_or_default()),
            None => self.inner.live.reload_text(&own, Some(path)).map_err(MeshError::from),
        };
        if outcome.is_err() {
            *lock(&self.inner.own) = previous;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls_name_hosts_and_a_key() {
        let u: ControlUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        let plain = ControlUrl { endpoints: vec!["http://127.0.0.1:2379".into()], key: DEFAULT_KEY.into(), tls: None };
        assert_eq!(u, plain);
        let u: ControlUrl = "etcd://10.0.0.1:2379,10.0.0.2:2379/prod/fulcrum".parse().unwrap();
        assert_eq!(u.endpoints.len(), 2);
        assert_eq!(u.key, "/prod/fulcrum");
        assert!("http://127.0.0.1:2379".parse::<ControlUrl>().unwrap_err().contains("etcd://"));
        assert!("etcd:///key".parse::<ControlUrl>().is_err());
        // etcds:// is etcd over https, with TLS files from the flags.
        let u: ControlUrl = "etcds://10.0.0.1:2379".parse().unwrap();
        assert_eq!(u.endpoints, ["https://10.0.0.1:2379"]);
        let u = u.with_tls(Some("ca.pem".into()), Some("c.pem".into()), Some("k.pem".into())).unwrap();
        let tls = u.tls.unwrap();
        assert_eq!(tls.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert!(tls.client_cert.is_some());
        let plain_with_files = plain.clone().with_tls(Some("ca.pem".into()), None, None).unwrap_err();
        assert!(plain_with_files.contains("etcds://"), "{plain_with_files}");
        let half = "etcds://a:1".parse::<ControlUrl>().unwrap().with_tls(None, Some("c.pem".into()), None).unwrap_err();
        assert!(half.contains("go together"), "{half}");
    }
}
