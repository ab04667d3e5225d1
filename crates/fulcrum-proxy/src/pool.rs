//! A pool at run time: its selector and upstreams, swapped atomically as a snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use fulcrum_config::PoolConfig;
use fulcrum_core::policy::Needs;
use fulcrum_core::{BuildError, Selector};

use crate::clock;
use crate::safety::PoolSafety;
use crate::upstream::Upstream;

/// An immutable view of a pool: the selector and, index for index, its upstreams.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The balancing state.
    pub selector: Selector,
    /// Connections and counters of `selector.endpoints()[i]`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Sticky-cookie token to endpoint index.
    sticky: HashMap<u64, usize>,
    /// Some endpoint lists the models it serves, or adapters may be reported: requests need
    /// their `model` read from the body.
    by_model: bool,
}

impl PoolSnapshot {
    /// The upstreams by endpoint id, to carry over into the next snapshot.
    fn upstreams_by_id(&self) -> HashMap<&str, Arc<Upstream>> {
        self.selector.endpoints().iter().map(|e| e.id().as_str()).zip(self.upstreams.iter().cloned()).collect()
    }

    /// The endpoint a sticky-cookie token names, if it is still in the pool.
    pub(crate) fn sticky_index(&self, token: u64) -> Option<usize> {
        self.sticky.get(&token).copied()
    }
}

impl fulcrum_core::flow::Roster for PoolSnapshot {
    fn selector(&self) -> &Selector {
        &self.selector
    }

    fn breaker(&self, index: usize) -> Option<&fulcrum_core::flow::SharedBreaker> {
        self.upstreams.get(index)?.breaker.as_ref()
    }

    fn connections(&self, index: usize) -> u64 {
        self.upstreams.get(index).map_or(0, |u| u64::from(u.connections()))
    }
}

/// The token a sticky cookie carries for an endpoint: a hash of its id, so that the cookie
/// reveals no address and survives reloads while the endpoint stays.
pub(crate) fn sticky_token(id: &str) -> u64 {
    fulcrum_core::hash::hash_bytes(id.as_bytes(), 0x5717_C4E1)
}

/// A pool: its configuration and the current snapshot.
#[derive(Debug)]
pub struct PoolRuntime {
    config: PoolConfig,
    needs: Needs,
    snapshot: ArcSwap<PoolSnapshot>,
    /// The current snapshot's `by_model`, read on the request path without loading it.
    by_model: std::sync::atomic::AtomicBool,
    safety: Arc<PoolSafety>,
    /// Serializes the writers of `snapshot` (membership changes, weight refreshes); readers
    /// never wait.
    writer: std::sync::Mutex<()>,
    /// Bumped at every membership change, for the per-endpoint background tasks.
    generation: tokio::sync::watch::Sender<u64>,
    /// Requests held while the pool has no endpoint (scaled to zero), waiting for one.
    held: std::sync::atomic::AtomicU64,
    /// TLS to the endpoints, when the pool has `tls`.
    tls: Option<Arc<crate::tls::Connector>>,
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Its endpoints or policy do not build.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Its TLS files do not load.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What a membership change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// Endpoints that joined.
    pub added: Vec<String>,
    /// Endpoints that left.
    pub removed: Vec<String>,
    /// Endpoints that stayed (their load signals and connections carried over).
    pub kept: usize,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// No request was left in flight.
    Idle,
    /// The timeout passed with requests still in flight.
    TimedOut {
        /// Requests still in flight.
        in_flight: u64,
    },
    /// No endpoint of that id.
    Unknown,
}

impl PoolRuntime {
    pub(crate) fn new(config: PoolConfig) -> Result<Self, PoolError> {
        let now = clock::now();
        let selector = config.selector(now)?;
        let tls = connector(&config)?;
        let safety = Arc::new(PoolSafety::new(config.resilience.clone(), config.rules(), selector.endpoints(), now));
        let snapshot = Self::snapshot_of(&config, selector, &HashMap::new(), tls.as_ref(), now);
        Ok(Self::assemble(config, snapshot, safety, tls))
    }

    /// The next generation of `old` under a new configuration (live reload): endpoints that
    /// stay keep their load signals and prefix-cache entries; their connections and breakers
    /// carry over when the connection settings did not change; failure-handling state
    /// (ejections, budgets, the event timeline) carries over when its settings did not change,
    /// else it starts again from the endpoints' current flags.
    pub(crate) fn succeed(old: &PoolRuntime, config: PoolConfig) -> Result<Self, PoolError> {
        let now = clock::now();
        let current = old.snapshot();
        let selector = current
            .selector
            .reconfigure(config.policy.clone(), config.options.clone(), now)?
            .rebuild(config.endpoints.clone(), now)?;
        let old_upstreams = current.upstreams_by_id();
        let was = &old.config;
        let same_connections = was.timeouts.connect == config.timeouts.connect
            && was.timeouts.idle == config.timeouts.idle
            && was.max_idle_per_endpoint == config.max_idle_per_endpoint
            && was.resilience.breaker == config.resilience.breaker
            && was.tls == config.tls
            && was.protocol == config.protocol;
        // The same TLS settings keep their connector (and the endpoints their connections);
        // changed ones read the files anew.
        let tls = if same_connections { old.tls.clone() } else { connector(&config)? };
        let added: Vec<String> = selector
            .endpoints()
            .iter()
            .filter(|e| !old_upstreams.contains_key(e.id().as_str()))
            .map(|e| e.id().to_string())
            .collect();
        let rules = config.rules();
        let safety = if was.resilience == config.resilience && old.safety.state().rules() == &rules {
            old.safety.state().on_membership(selector.endpoints(), &added);
            old.safety.clone()
        } else {
            let endpoints = selector.endpoints();
            Arc::new(PoolSafety::succeed(&old.safety, config.resilience.clone(), rules, endpoints, &added, now))
        };
        let carried = if same_connections { old_upstreams } else { HashMap::new() };
        let snapshot = Self::snapshot_of(&config, selector, &carried, tls.as_ref(), now);
        Ok(Self::assemble(config, snapshot, safety, tls))
    }

    fn assemble(
        config: PoolConfig,
        snapshot: PoolSnapshot,
        safety: Arc<PoolSafety>,
        tls: Option<Arc<crate::tls::Connector>>,
    ) -> PoolRuntime {
        PoolRuntime {
            needs: config.policy.needs(),
            config,
            by_model: std::sync::atomic::AtomicBool::new(snapshot.by_model),
            snapshot: ArcSwap::from_pointee(snapshot),
            safety,
            writer: std::sync::Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
            tls,
        }
    }

    fn snapshot_of(
        config: &PoolConfig,
        selector: Selector,
        old: &HashMap<&str, Arc<Upstream>>,
        tls: Option<&Arc<crate::tls::Connector>>,
        now: fulcrum_core::Instant,
    ) -> PoolSnapshot {
        let upstreams: Vec<Arc<Upstream>> = selector
            .endpoints()
            .iter()
            .map(|e| match old.get(e.id().as_str()) {
                Some(u) => u.clone(),
                None => Arc::new(Upstream::new(e.address(), e.id().to_string(), config, tls.cloned(), now)),
            })
            .collect();
        let sticky = selector.endpoints().iter().enumerate().map(|(i, e)| (sticky_token(e.id().as_str()), i)).collect();
        let by_model = config.engine_metrics.as_ref().is_some_and(|e| e.models_path.is_some())
            || selector.endpoints().iter().any(|e| !e.labels().models.is_empty());
        PoolSnapshot { selector, upstreams, sticky, by_model }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// TLS to the endpoints, if the pool has it.
    pub(crate) fn tls(&self) -> Option<&crate::tls::Connector> {
        self.tls.as_deref()
    }

    /// Failure handling: health, ejections, breakers' timeline, retries, admission.
    pub fn safety(&self) -> &Arc<PoolSafety> {
        &self.safety
    }

    /// What the policy needs from each request.
    pub(crate) fn needs(&self) -> &Needs {
        &self.needs
    }

    /// Whether requests need their `model` read to pick an endpoint that serves it (some
    /// endpoint lists models, or the pool polls the engines' served models and adapters).
    pub(crate) fn routes_by_model(&self) -> bool {
        self.by_model.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Swaps in a new snapshot (writers hold `writer`).
    fn store(&self, next: PoolSnapshot) {
        self.by_model.store(next.by_model, std::sync::atomic::Ordering::Relaxed);
        self.snapshot.store(Arc::new(next));
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the pool's endpoints. Endpoints that stay (same id) keep their load signals,
    /// connections, breakers and health; new ones start fresh (in slow start when the pool
    /// has it, and, with health checks, unchecked until their first success). Requests in
    /// flight finish on the snapshot they started with.
    pub fn set_endpoints(&self, specs: Vec<fulcrum_core::EndpointSpec>) -> Result<MembershipChange, BuildError> {
        let _writer = crate::safety::lock(&self.writer);
        let current = self.snapshot.load_full();
        let now = clock::now();
        let selector = current.selector.rebuild(specs, now)?;
        let old = current.upstreams_by_id();
        let mut change = MembershipChange::default();
        for e in selector.endpoints() {
            if old.contains_key(e.id().as_str()) {
                change.kept += 1;
            } else {
                change.added.push(e.id().to_string());
            }
        }
        let ids: std::collections::HashSet<&str> = selector.endpoints().iter().map(|e| e.id().as_str()).collect();
        change.removed = old.keys().filter(|id| !ids.contains(*id)).map(|id| (*id).to_owned()).collect();
        let next = Self::snapshot_of(&self.config, selector, &old, self.tls.as_ref(), now);
        self.safety.state().on_membership(next.selector.endpoints(), &change.added);
        self.store(next);
        self.generation.send_modify(|g| *g += 1);
        for id in &change.added {
            self.safety.event(id, "membership", "joined the pool".to_owned());
        }
        for id in &change.removed {
            self.safety.event(id, "membership", "left the pool".to_owned());
        }
        Ok(change)
    }

    /// Stops sending new requests to an endpoint and waits, up to `timeout`, until the
    /// requests it has in flight (streams included) have finished. The endpoint stays in the
    /// pool, draining, until it is removed with [`set_endpoints`](Self::set_endpoints).
    pub async fn drain(&self, id: &str, timeout: std::time::Duration) -> Drained {
        let endpoint = self.snapshot().selector.endpoints().iter().find(|e| e.id().as_str() == id).cloned();
        let Some(endpoint) = endpoint else { return Drained::Unknown };
        self.safety.state().drain(&endpoint, clock::now());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let in_flight = endpoint.signals().in_flight();
            if in_flight == 0 {
                self.safety.event(id, "drain", "drained: nothing in flight".to_owned());
                return Drained::Idle;
            }
            if tokio::time::Instant::now() >= deadline {
                self.safety.event(id, "drain", format!("drain timeout with {in_flight} in flight"));
                return Drained::TimedOut { in_flight };
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ends an endpoint's draining: it takes new requests again. `None` when the pool has no
    /// such endpoint, else whether it was draining. The endpoint's state is carried through
    /// reloads, as its draining was.
    pub fn undrain(&self, id: &str) -> Option<bool> {
        let snapshot = self.snapshot();
        let endpoint = snapshot.selector.endpoints().iter().find(|e| e.id().as_str() == id)?;
        Some(self.safety.state().undrain(endpoint, clock::now()))
    }

    /// Requests waiting for the pool's first endpoint (the autoscaler reads it as a queue).
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Holds a request while the pool has no endpoint, until one joins or `timeout` passes:
    /// a pool scaled to zero wakes up without turning its first requests away. Returns the
    /// snapshot to use (possibly still empty).
    pub(crate) async fn wait_for_endpoints(&self, timeout: std::time::Duration) -> Arc<PoolSnapshot> {
        let snapshot = self.snapshot();
        if !snapshot.selector.endpoints().is_empty() {
            return snapshot;
        }
        let mut changes = self.generation.subscribe();
        self.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(timeout, async {
            while self.snapshot().selector.endpoints().is_empty() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.held.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.snapshot()
    }

    /// Follows membership changes (for the per-endpoint background tasks).
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Recomputes effective weights; swaps in rebuilt tables when they changed.
    pub(crate) fn refresh(&self) {
        let _writer = crate::safety::lock(&self.writer);
        let current = self.snapshot.load();
        let now = clock::now();
        if let Some(selector) = current.selector.refresh(now) {
            let old = current.upstreams_by_id();
            let next = Self::snapshot_of(&self.config, selector, &old, self.tls.as_ref(), now);
            self.store(next);
        }
    }
}

/// The pool's TLS connector, when it has `tls`.
fn connector(config: &PoolConfig) -> Result<Option<Arc<crate::tls::Connector>>, crate::tls::TlsError> {
    config.tls.as_ref().map(|t| crate::tls::Connector::new(t, config.protocol).map(Arc::new)).transpose()
}
