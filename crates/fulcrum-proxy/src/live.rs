//! The running configuration and live reload.
//!
//! Everything a request reads at its start (the listener's route table, the pools) sits in
//! one immutable [`State`] behind an `ArcSwap`. A reload validates the new text, builds a
//! whole new state beside the old one, and swaps it in one store: a request in flight keeps
//! the state (and the pool snapshot) it started with and finishes on it; the next request
//! sees the new one. Nothing is changed before every part of the new state has been built,
//! so an invalid config is refused with the old one still running untouched.
//!
//! What carries over, per pool, by name:
//! - unchanged pools are kept as they are (same object);
//! - pools fed by a discovery provider keep the endpoint set it found (their configured
//!   endpoints are only the first set);
//! - pools whose only change is their endpoint list keep their object and take the new list
//!   as a membership change ([`PoolRuntime::set_endpoints`]);
//! - pools with other changes (policy, timeouts, failure handling...) are rebuilt as a
//!   successor of the old pool: endpoints that stay keep their load signals (in flight,
//!   latency, effective weight, drain and health flags), connections and breakers (when the
//!   connection settings did not change), and the prefix-cache index.
//!
//! What a reload cannot change (it is refused, naming the field, and a restart applies it):
//! listeners' addresses, protocols, connection limits and header timeouts; `[proxy]`
//! workers and admin address; pools with `autoscale` (their replicas are owned by a running
//! autoscaler).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fulcrum_config::{Config, ConfigError, ConfigErrors, ListenerKind};

use crate::http::ListenerCtx;
use crate::pool::PoolRuntime;
use crate::route::{Route, RouteTable};

/// Why a reload was refused. The old configuration keeps running.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new text is not a valid configuration: every error found, one per line.
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    /// The change needs a restart.
    #[error("{field}: {message}")]
    NeedsRestart {
        /// The field at fault.
        field: String,
        /// What changed and why it cannot be applied live.
        message: String,
    },
    /// A pool could not be built.
    #[error("pool.{name}: {source}")]
    Pool {
        /// The pool.
        name: String,
        /// Why.
        #[source]
        source: crate::pool::PoolError,
    },
    /// A listener's TLS files do not load.
    #[error("listener[{index}].tls: {source}")]
    Tls {
        /// The listener's index.
        index: usize,
        /// Why.
        #[source]
        source: crate::tls::TlsError,
    },
}

impl ReloadError {
    /// The field at fault (`pool.llama.policy`, `listener[0].address`), if known.
    pub fn field(&self) -> &str {
        match self {
            ReloadError::Invalid(e) => &e.first().field,
            ReloadError::NeedsRestart { field, .. } => field,
            ReloadError::Pool { .. } => "pool",
            ReloadError::Tls { .. } => "listener",
        }
    }
}

/// Why a discovered set was not applied.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveredError {
    /// No pool of that name runs.
    #[error("no pool is named `{0}` any more")]
    NoPool(String),
    /// The pool's endpoints no longer come from discovery.
    #[error("pool `{0}` no longer takes its endpoints from discovery")]
    NotDiscovered(String),
    /// The set does not build.
    #[error(transparent)]
    Build(#[from] fulcrum_core::BuildError),
}

/// What a reload did, pool by pool.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Pools that did not change.
    pub unchanged: Vec<String>,
    /// Pools whose endpoint lists changed (applied as membership changes).
    pub endpoints_changed: Vec<String>,
    /// Pools rebuilt with new settings (load signals of remaining endpoints carried over).
    pub rebuilt: Vec<String>,
    /// New pools.
    pub added: Vec<String>,
    /// Pools removed (their requests in flight finish).
    pub removed: Vec<String>,
    /// The generation now running (1 is the configuration the proxy started with).
    pub generation: u64,
}

/// A listener's part of the state.
#[derive(Debug)]
pub(crate) enum ListenerState {
    Http(Arc<ListenerCtx>),
    Tcp(Arc<PoolRuntime>),
}

/// One immutable generation of the running configuration.
#[derive(Debug)]
pub struct State {
    config: Arc<Config>,
    text: Option<Arc<str>>,
    pools: BTreeMap<String, Arc<PoolRuntime>>,
    /// Index for index with `config.listeners`.
    pub(crate) listeners: Vec<ListenerState>,
    generation: u64,
}

impl State {
    /// The validated configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The TOML text it was read from (`None` when the proxy was started from a `Config`).
    pub fn text(&self) -> Option<&Arc<str>> {
        self.text.as_ref()
    }

    /// The pools, by name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<PoolRuntime>> {
        &self.pools
    }

    /// 1 for the configuration the proxy started with, then one more per applied reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

struct Inner {
    state: ArcSwap<State>,
    /// Serializes reloads (they are rare; requests never take it).
    reloading: std::sync::Mutex<()>,
    changes: tokio::sync::watch::Sender<u64>,
    path: Option<PathBuf>,
    /// Traces, when `[tracing]` sets an endpoint (changes only at a restart).
    tracer: Option<Arc<crate::trace::Tracer>>,
    /// Each listener's TLS, index for index with `config.listeners` (TLS is turned on or off
    /// only at a restart; its files are read again on reload and when they change).
    tls: Vec<Option<Arc<crate::tls::Terminator>>>,
    /// Offline batches, when `[batch]` is configured (changes only at a restart).
    batches: Option<Arc<crate::batch::Batches>>,
}

/// A handle on a [`Live`] that does not keep it alive (what batches hold).
#[derive(Clone, Debug)]
pub struct WeakLive(std::sync::Weak<Inner>);

impl WeakLive {
    /// The live configuration, while the proxy runs.
    pub fn upgrade(&self) -> Option<Live> {
        self.0.upgrade().map(|inner| Live { inner })
    }
}

/// A handle on the running configuration: read it, reload it. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("generation", &self.state().generation).field("path", &self.inner.path).finish()
    }
}

impl Live {
    /// The first generation, built from `config`.
    pub(crate) fn new(
        config: Config,
        text: Option<Arc<str>>,
        path: Option<PathBuf>,
        batches: Option<Arc<crate::batch::Batches>>,
    ) -> Result<Self, crate::StartError> {
        let mut pools = BTreeMap::new();
        for (name, pc) in &config.pools {
            let pool = PoolRuntime::new(pc.clone())
                .map_err(|source| crate::StartError::Pool { name: name.clone(), source })?;
            pools.insert(name.clone(), Arc::new(pool));
        }
        let tracer = config.tracing.as_ref().map(|t| crate::trace::Tracer::new(t, Arc::new(crate::trace::ProxyRng)));
        let mut tls = Vec::new();
        for lc in &config.listeners {
            let terminator = match &lc.tls {
                Some(t) => Some(Arc::new(
                    crate::tls::Terminator::new(t)
                        .map_err(|source| crate::StartError::Tls { name: lc.name.clone(), source })?,
                )),
                None => None,
            };
            tls.push(terminator);
        }
        let listeners = listener_states(&config, &pools, tracer.as_ref(), batches.as_ref());
        let state = State { config: Arc::new(config), text, pools, listeners, generation: 1 };
        let live = Live {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(state),
                reloading: std::sync::Mutex::new(()),
                changes: tokio::sync::watch::Sender::new(1),
                path,
                tracer,
                tls,
                batches,
            }),
        };
        if let Some(b) = &live.inner.batches {
            b.attach(WeakLive(Arc::downgrade(&live.inner)));
        }
        Ok(live)
    }

    /// Offline batches, when `[batch]` is configured.
    pub fn batches(&self) -> Option<&Arc<crate::batch::Batches>> {
        self.inner.batches.as_ref()
    }

    /// A listener context whose every request goes to `pool` (what `fulcrum batch` sends
    /// through), named `name` in metrics and logs.
    pub(crate) fn pool_context(&self, pool: Arc<PoolRuntime>, name: &str) -> ListenerCtx {
        let state = self.state();
        ListenerCtx {
            name: name.to_owned(),
            routes: RouteTable::new(Vec::new(), Some(pool)),
            max_body_bytes: fulcrum_config::DEFAULT_MAX_BODY_BYTES,
            body_read_timeout: Duration::from_secs(60),
            trust_priority: false,
            observe: crate::observe::Observe::new(state.config().proxy.access_log, self.inner.tracer.clone()),
            batch: None,
        }
    }

    /// The current generation.
    pub fn state(&self) -> Arc<State> {
        self.inner.state.load_full()
    }

    /// The file the configuration was read from, if any (what [`reload_file`](Self::reload_file)
    /// reads again).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The pools of the current generation, sorted by name.
    pub fn pools(&self) -> Vec<Arc<PoolRuntime>> {
        self.state().pools.values().cloned().collect()
    }

    /// The pool of that name in the current generation.
    pub fn pool(&self, name: &str) -> Option<Arc<PoolRuntime>> {
        self.state().pools.get(name).cloned()
    }

    /// Follows reloads: the value is the generation now running.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The route table of HTTP listener `index` in the current generation.
    pub(crate) fn listener(&self, index: usize) -> Option<Arc<ListenerCtx>> {
        match self.inner.state.load().listeners.get(index) {
            Some(ListenerState::Http(ctx)) => Some(ctx.clone()),
            _ => None,
        }
    }

    /// Listener `index`'s TLS, if it terminates TLS.
    pub(crate) fn tls(&self, index: usize) -> Option<&Arc<crate::tls::Terminator>> {
        self.inner.tls.get(index).and_then(Option::as_ref)
    }

    /// Reads the TLS files of every TLS listener again if they changed on disk.
    pub(crate) fn refresh_tls(&self) {
        let state = self.state();
        for (lc, t) in state.config.listeners.iter().zip(&self.inner.tls) {
            if let Some(t) = t {
                t.refresh(&lc.name);
            }
        }
    }

    /// The pool of TCP listener `index` in the current generation.
    pub(crate) fn tcp_pool(&self, index: usize) -> Option<Arc<PoolRuntime>> {
        match self.inner.state.load().listeners.get(index) {
            Some(ListenerState::Tcp(pool)) => Some(pool.clone()),
            _ => None,
        }
    }

    /// Reads the configuration file again and applies it.
    pub fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        let Some(path) = self.inner.path.clone() else {
            return Err(ReloadError::NeedsRestart {
                field: String::new(),
                message: "the proxy was not started from a file: there is nothing to read again".into(),
            });
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| ConfigErrors::from(ConfigError::unreadable(&path, &e)))?;
        self.reload_text(&text, Some(&path))
    }

    /// Validates `text` and applies it; on any error nothing changes. `file` names the
    /// source in error messages.
    pub fn reload_text(&self, text: &str, file: Option<&Path>) -> Result<ReloadReport, ReloadError> {
        let config = Config::parse(text, file)?;
        self.apply(config, Some(Arc::from(text)))
    }

    /// Checks, without applying, that `text` is valid and could be applied live.
    pub fn check_text(&self, text: &str) -> Result<(), ReloadError> {
        let config = Config::parse(text, self.path())?;
        check_restart_only(&self.state().config, &config)
    }

    /// Applies a validated configuration; on any error nothing changes.
    pub fn apply(&self, config: Config, text: Option<Arc<str>>) -> Result<ReloadReport, ReloadError> {
        let _reloading = crate::safety::lock(&self.inner.reloading);
        self.apply_locked(config, text)
    }

    /// Edits the running text with `change` and applies the result, with no other reload
    /// in between: two concurrent edits both land, one after the other. `Ok(Err(_))` is an
    /// edit refused by `change`.
    pub fn edit<E>(
        &self,
        change: impl FnOnce(&str) -> Result<String, E>,
    ) -> Result<Result<ReloadReport, E>, ReloadError> {
        let _reloading = crate::safety::lock(&self.inner.reloading);
        let Some(text) = self.state().text.clone() else {
            return Err(ReloadError::NeedsRestart {
                field: "config".into(),
                message: "the running configuration was not read from text, so it cannot be edited".into(),
            });
        };
        let next = match change(&text) {
            Ok(next) => next,
            Err(e) => return Ok(Err(e)),
        };
        // Relative paths (TLS files, a discovery file) stay relative to the file's directory.
        let config = Config::parse(&next, self.path())?;
        self.apply_locked(config, Some(Arc::from(next))).map(Ok)
    }

    /// Replaces the endpoints of `pool`, a pool fed by discovery, unless a reload is under way
    /// (it waits) or the pool no longer has discovery (refused: a provider stopped by a reload
    /// must not overwrite the static endpoints that replaced it).
    pub fn set_discovered(
        &self,
        pool: &str,
        endpoints: Vec<fulcrum_core::EndpointSpec>,
    ) -> Result<crate::pool::MembershipChange, DiscoveredError> {
        let _reloading = crate::safety::lock(&self.inner.reloading);
        let state = self.state();
        let runtime = state.pools.get(pool).ok_or_else(|| DiscoveredError::NoPool(pool.to_owned()))?;
        if runtime.config().discovery.is_none() {
            return Err(DiscoveredError::NotDiscovered(pool.to_owned()));
        }
        Ok(runtime.set_endpoints(endpoints)?)
    }

    fn apply_locked(&self, config: Config, text: Option<Arc<str>>) -> Result<ReloadReport, ReloadError> {
        let old = self.state();
        check_restart_only(&old.config, &config)?;
        // TLS files are read first too: a reload that names a missing file changes nothing.
        let mut tls = Vec::new();
        for (index, lc) in config.listeners.iter().enumerate() {
            if let (Some(settings), Some(t)) = (&lc.tls, self.tls(index)) {
                let prepared =
                    crate::tls::Terminator::prepare(settings).map_err(|source| ReloadError::Tls { index, source })?;
                tls.push((t.clone(), prepared));
            }
        }

        // Build everything first: nothing running changes until every pool is built.
        enum Plan {
            Keep(Arc<PoolRuntime>),
            Members(Arc<PoolRuntime>, Vec<fulcrum_core::EndpointSpec>),
            New(Arc<PoolRuntime>),
        }
        let mut report = ReloadReport::default();
        let mut plans = BTreeMap::new();
        for (name, pc) in &config.pools {
            let failed = |source| ReloadError::Pool { name: name.clone(), source };
            let plan = match (old.pools.get(name), old.config.pools.get(name)) {
                (Some(pool), Some(was)) if was == pc => {
                    report.unchanged.push(name.clone());
                    Plan::Keep(pool.clone())
                }
                // A pool fed by discovery keeps the set its provider found: the file's
                // endpoints are only its first set.
                (Some(pool), Some(was)) if same_but_endpoints(was, pc) && pc.discovery.is_some() => {
                    report.unchanged.push(name.clone());
                    Plan::Keep(pool.clone())
                }
                (Some(pool), Some(was)) if same_but_endpoints(was, pc) => {
                    report.endpoints_changed.push(name.clone());
                    Plan::Members(pool.clone(), pc.endpoints.clone())
                }
                (Some(pool), Some(_)) => {
                    report.rebuilt.push(name.clone());
                    let mut pc = pc.clone();
                    if pc.discovery.is_some() {
                        pc.endpoints = pool.snapshot().selector.endpoints().iter().map(|e| e.spec().clone()).collect();
                    }
                    Plan::New(Arc::new(PoolRuntime::succeed(pool, pc).map_err(failed)?))
                }
                _ => {
                    report.added.push(name.clone());
                    Plan::New(Arc::new(PoolRuntime::new(pc.clone()).map_err(failed)?))
                }
            };
            plans.insert(name.clone(), plan);
        }
        report.removed = old.pools.keys().filter(|n| !config.pools.contains_key(*n)).cloned().collect();

        // Commit: membership changes cannot fail here (the config was built once already
        // while validating), then one store.
        let mut pools = BTreeMap::new();
        for (name, plan) in plans {
            let pool = match plan {
                Plan::Keep(pool) | Plan::New(pool) => pool,
                Plan::Members(pool, specs) => {
                    if let Err(source) = pool.set_endpoints(specs) {
                        tracing::error!(pool = %name, error = %source, "endpoint change refused during a reload");
                    }
                    pool
                }
            };
            pools.insert(name, pool);
        }
        for name in &report.rebuilt {
            pools[name].safety().event("", "reload", "pool rebuilt with new settings".to_owned());
        }
        for (t, prepared) in tls {
            t.install(prepared);
        }
        let listeners = listener_states(&config, &pools, self.inner.tracer.as_ref(), self.inner.batches.as_ref());
        let generation = old.generation + 1;
        report.generation = generation;
        let text = text.or_else(|| if *old.config == config { old.text.clone() } else { None });
        self.inner.state.store(Arc::new(State { config: Arc::new(config), text, pools, listeners, generation }));
        self.inner.changes.send_replace(generation);
        tracing::info!(
            generation,
            unchanged = report.unchanged.len(),
            endpoints_changed = report.endpoints_changed.len(),
            rebuilt = report.rebuilt.len(),
            added = report.added.len(),
            removed = report.removed.len(),
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Sends the spans still queued (at shutdown, once requests have drained).
    pub(crate) async fn shutdown_tracing(&self) {
        if let Some(t) = &self.inner.tracer {
            t.shutdown().await;
        }
    }

    /// How long shutdown waits for requests in flight, as currently configured.
    pub(crate) fn drain_timeout(&self) -> Duration {
        self.state().config.proxy.drain_timeout
    }
}

fn listener_states(
    config: &Config,
    pools: &BTreeMap<String, Arc<PoolRuntime>>,
    tracer: Option<&Arc<crate::trace::Tracer>>,
    batches: Option<&Arc<crate::batch::Batches>>,
) -> Vec<ListenerState> {
    config
        .listeners
        .iter()
        .map(|lc| match &lc.kind {
            ListenerKind::Tcp { pool } => ListenerState::Tcp(pools[pool].clone()),
            ListenerKind::Http(h) => {
                let routes = config
                    .routes
                    .iter()
                    .filter(|r| r.listeners.contains(&lc.name))
                    .map(|r| Route::new(r, pools[&r.pool].clone()))
                    .collect();
                let default = h.default_pool.as_ref().map(|p| pools[p].clone());
                ListenerState::Http(Arc::new(ListenerCtx {
                    name: lc.name.clone(),
                    routes: RouteTable::new(routes, default),
                    max_body_bytes: h.max_body_bytes,
                    body_read_timeout: h.body_read_timeout,
                    trust_priority: h.trust_priority,
                    observe: crate::observe::Observe::new(config.proxy.access_log, tracer.cloned()),
                    batch: batches.cloned(),
                }))
            }
        })
        .collect()
}

/// Whether two pool configurations differ at most in their endpoint lists.
fn same_but_endpoints(a: &fulcrum_config::PoolConfig, b: &fulcrum_config::PoolConfig) -> bool {
    let mut b = b.clone();
    b.endpoints.clone_from(&a.endpoints);
    *a == b
}

/// Refuses what only a restart can apply.
fn check_restart_only(old: &Config, new: &Config) -> Result<(), ReloadError> {
    let restart = |field: String, message: String| Err(ReloadError::NeedsRestart { field, message });
    if old.proxy.workers != new.proxy.workers {
        return restart("proxy.workers".into(), "the number of worker threads changes only at a restart".into());
    }
    if old.batch != new.batch {
        return restart("batch".into(), "batch settings (the database among them) change only at a restart".into());
    }
    if old.tracing != new.tracing {
        return restart("tracing".into(), "trace export settings change only at a restart".into());
    }
    if old.proxy.admin != new.proxy.admin {
        return restart("proxy.admin".into(), "the admin API's address changes only at a restart".into());
    }
    if old.proxy.admin_limits != new.proxy.admin_limits {
        let message = "the admin listener's limits (admin_max_connections, admin_header_timeout, admin_idle_timeout) change only at a restart";
        return restart("proxy.admin_max_connections".into(), message.into());
    }
    if old.listeners.len() != new.listeners.len() {
        return restart(
            "listener".into(),
            format!(
                "listeners cannot be added or removed live ({} running, {} in the new config); restart to apply",
                old.listeners.len(),
                new.listeners.len()
            ),
        );
    }
    for (i, (a, b)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        let field = |f: &str| format!("listener[{i}].{f}");
        if a.name != b.name {
            return restart(field("name"), format!("listener `{}` cannot be renamed live", a.name));
        }
        if a.address != b.address {
            return restart(field("address"), format!("listener `{}` cannot move to {} live", a.name, b.address));
        }
        if a.max_connections != b.max_connections {
            return restart(field("max_connections"), "changes only at a restart".into());
        }
        if a.tls.is_some() != b.tls.is_some() {
            return restart(field("tls"), format!("listener `{}` turns TLS on or off only at a restart", a.name));
        }
        match (&a.kind, &b.kind) {
            (ListenerKind::Http(x), ListenerKind::Http(y)) if x.header_read_timeout != y.header_read_timeout => {
                return restart(field("header_read_timeout"), "changes only at a restart".into());
            }
            (ListenerKind::Http(_), ListenerKind::Http(_)) | (ListenerKind::Tcp { .. }, ListenerKind::Tcp { .. }) => {}
            _ => return restart(field("protocol"), format!("listener `{}` cannot change protocol live", a.name)),
        }
    }
    let autoscaled = |c: &Config, name: &str| c.pools.get(name).is_some_and(|p| p.autoscale.is_some());
    for name in old.pools.keys().chain(new.pools.keys()) {
        if (autoscaled(old, name) || autoscaled(new, name)) && old.pools.get(name) != new.pools.get(name) {
            return restart(
                format!("pool.{name}"),
                "a pool with `autoscale` changes only at a restart (its autoscaler owns the replicas)".into(),
            );
        }
    }
    Ok(())
}
