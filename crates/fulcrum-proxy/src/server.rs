//! Listeners, connections and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_config::{Config, ListenerKind};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::live::Live;
use crate::pool::PoolRuntime;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("listener `{name}` cannot listen on {address}: {source}")]
    Bind {
        /// The listener.
        name: String,
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A pool could not be built.
    #[error("pool `{name}`: {source}")]
    Pool {
        /// The pool.
        name: String,
        /// Why.
        #[source]
        source: crate::pool::PoolError,
    },
    /// A listener's TLS files do not load.
    #[error("listener `{name}`: {source}")]
    Tls {
        /// The listener.
        name: String,
        /// Why.
        #[source]
        source: crate::tls::TlsError,
    },
    /// The batch database does not open.
    #[error("[batch]: {0}")]
    Batch(#[from] fulcrum_batch::store::StoreError),
}

enum Kind {
    Http(Duration),
    Tcp,
}

struct Bound {
    name: String,
    /// The listener's index in the configuration (and in each generation's state).
    index: usize,
    listener: TcpListener,
    kind: Kind,
    max_connections: usize,
}

/// A proxy whose listeners are bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    listeners: Vec<Bound>,
    live: Live,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("listeners", &self.listeners.iter().map(|l| &l.name).collect::<Vec<_>>())
            .field("live", &self.live)
            .finish()
    }
}

impl Proxy {
    /// Builds the pools and binds every listener (port 0 picks a free port; see
    /// [`local_addr`](Self::local_addr)). A proxy started this way can be reloaded with a
    /// whole new [`Config`] or text, but shows no source text until then.
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        Self::bind_with(config.clone(), None, None).await
    }

    /// Reads, validates and binds a configuration file; [`Live::reload_file`] reads it again.
    pub async fn bind_file(path: &std::path::Path) -> Result<Proxy, BindFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BindFileError::Config(fulcrum_config::ConfigError::unreadable(path, &e).into()))?;
        let config = Config::parse(&text, Some(path)).map_err(BindFileError::Config)?;
        Ok(Self::bind_with(config, Some(Arc::from(text)), Some(path.to_owned())).await?)
    }

    /// Binds `config`, remembering the text it came from (shown by the admin API, edited by
    /// its calls) and the file to read again on reload.
    pub async fn bind_with(
        config: Config,
        text: Option<Arc<str>>,
        path: Option<std::path::PathBuf>,
    ) -> Result<Proxy, StartError> {
        let mut listeners = Vec::new();
        for (index, lc) in config.listeners.iter().enumerate() {
            let listener = TcpListener::bind(lc.address).await.map_err(|source| StartError::Bind {
                name: lc.name.clone(),
                address: lc.address,
                source,
            })?;
            let kind = match &lc.kind {
                ListenerKind::Tcp { .. } => Kind::Tcp,
                ListenerKind::Http(h) => Kind::Http(h.header_read_timeout),
            };
            listeners.push(Bound { name: lc.name.clone(), index, listener, kind, max_connections: lc.max_connections });
        }
        let batches = match &config.batch {
            Some(b) => Some(crate::batch::Batches::open(b)?),
            None => None,
        };
        let live = Live::new(config, text, path, batches)?;
        Ok(Proxy { listeners, live })
    }

    /// The address a listener is bound to.
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| l.name == listener).and_then(|l| l.listener.local_addr().ok())
    }

    /// The pools of the running configuration, for status and statistics.
    pub fn pools(&self) -> Vec<Arc<PoolRuntime>> {
        self.live.pools()
    }

    /// The running configuration: read it, reload it.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Serves until `shutdown` completes, then stops accepting and lets requests in flight
    /// finish for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for bound in self.listeners {
            tasks.spawn(accept_loop(bound, self.live.clone(), stop_rx.clone()));
        }
        let refresher = tokio::spawn(refresh_loop(self.live.clone()));
        let certificates = tokio::spawn(watch_certificates(self.live.clone()));
        let supervisor = tokio::spawn(supervise_pools(self.live.clone()));
        let resumer = self.live.batches().map(|b| {
            // Batches left unfinished by the last run (a crash, a restart) go on, once the
            // database answers.
            tokio::spawn(b.clone().resume_when_reachable())
        });
        shutdown.await;
        let drain_timeout = self.live.drain_timeout();
        tracing::info!(?drain_timeout, "shutting down: no new connections, draining");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        refresher.abort();
        if let Some(r) = resumer {
            r.abort();
        }
        certificates.abort();
        supervisor.abort();
        self.live.shutdown_tracing().await;
        tracing::info!("stopped");
    }
}

/// Why [`Proxy::bind_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindFileError {
    /// The file is not a valid configuration: every error found, one per line.
    #[error("{0}")]
    Config(fulcrum_config::ConfigErrors),
    /// It is, but the proxy could not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Runs each pool's background tasks (outlier timers, health checks, engine scrapes) and
/// follows reloads: pools that were rebuilt, added or removed get their tasks restarted,
/// started or stopped.
async fn supervise_pools(live: Live) {
    let mut reloads = live.subscribe();
    let mut running: HashMap<String, (Arc<PoolRuntime>, JoinSet<()>)> = HashMap::new();
    loop {
        let state = live.state();
        running.retain(|name, (pool, _)| state.pools().get(name).is_some_and(|p| Arc::ptr_eq(p, pool)));
        for (name, pool) in state.pools() {
            if running.contains_key(name) {
                continue;
            }
            let mut tasks = JoinSet::new();
            tasks.spawn(outlier_loop(pool.clone()));
            tasks.spawn(endpoint_tasks(pool.clone()));
            running.insert(name.clone(), (pool.clone(), tasks));
        }
        drop(state);
        if reloads.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps effective weights (slow start, reported utilization) current.
async fn refresh_loop(live: Live) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        live.state().pools().values().for_each(|p| p.refresh());
    }
}

/// Reads TLS listeners' certificate files again when they change on disk (a renewal by
/// cert-manager or certbot needs no reload).
async fn watch_certificates(live: Live) {
    let mut tick = tokio::time::interval(crate::tls::WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        // Reading a few small files: off the workers' threads.
        let live = live.clone();
        let _ = tokio::task::spawn_blocking(move || live.refresh_tls()).await;
    }
}

/// Keeps one health checker and one engine-metrics scraper per endpoint (as configured),
/// starting them for endpoints that join and stopping them for those that leave.
async fn endpoint_tasks(pool: Arc<PoolRuntime>) {
    let mut changes = pool.subscribe();
    let mut tasks = JoinSet::new();
    let mut running: HashMap<String, Vec<tokio::task::AbortHandle>> = HashMap::new();
    let health = pool.safety().config.health_check.clone();
    let scrape = pool.config().engine_metrics.clone();
    loop {
        let snapshot = pool.snapshot();
        let present: std::collections::HashSet<&str> =
            snapshot.selector.endpoints().iter().map(|e| e.id().as_str()).collect();
        running.retain(|id, handles| {
            let keep = present.contains(id.as_str());
            if !keep {
                handles.iter().for_each(tokio::task::AbortHandle::abort);
            }
            keep
        });
        for e in snapshot.selector.endpoints() {
            if running.contains_key(e.id().as_str()) {
                continue;
            }
            let mut handles = Vec::new();
            if let Some(check) = &health {
                handles.push(tasks.spawn(crate::health::check_loop(pool.clone(), e.clone(), check.clone())));
            }
            if let Some(config) = &scrape {
                handles.push(tasks.spawn(crate::scrape::scrape_loop(pool.clone(), e.clone(), config.clone())));
            }
            running.insert(e.id().to_string(), handles);
        }
        drop(snapshot);
        // Reap finished tasks while waiting for the next change.
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }
}

/// Runs the pool's outlier detector's timers (ejections ending, success-rate evaluations).
async fn outlier_loop(pool: Arc<PoolRuntime>) {
    loop {
        let snapshot = pool.snapshot();
        let now = crate::clock::now();
        let Some(next) = pool.safety().state().tick(snapshot.selector.endpoints(), now) else {
            return;
        };
        drop(snapshot);
        // Wake at the detector's next deadline, and at least every second.
        let wait = next.saturating_since(now).min(Duration::from_secs(1));
        tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
    }
}

async fn accept_loop(bound: Bound, live: Live, mut stop: watch::Receiver<bool>) {
    let Bound { name, index, listener, kind, max_connections } = bound;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut refused: u64 = 0;
    // Every connection's task, and the signal that tells them to finish.
    let mut conns = JoinSet::new();
    let (stop_conns, _) = watch::channel(());
    let builder = Arc::new({
        let mut b = auto::Builder::new(TokioExecutor::new());
        if let Kind::Http(header_read_timeout) = &kind {
            // writev(false): a response head and a small body leave in one send(2), which the
            // kernel handles for less than a writev(2) (it skips the VFS layer; about 0.4 µs a
            // request in bench/RESULTS.md's kernel profile). Large bodies are copied once more.
            //
            // Request heads: at most 64 KiB whoever parses them, as documented (hyper's own
            // HTTP/1.1 limit is ~400 KB, answered 431; HTTP/2's header list, counted as RFC
            // 9113 does, 32 bytes a field on top, is refused with a 431 too).
            let head = crate::h1::MAX_REQUEST_HEAD_BYTES;
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(*header_read_timeout)
                .max_buf_size(head)
                .writev(false);
            // HTTP/2: a PING after `header_read_timeout` without a frame, and the connection
            // closed when it is not answered within as long again: a silent peer (or one that
            // stalls in the middle of a header block) does not hold its slot. Idle connections
            // that answer pings are closed by `h1::server::serve`.
            b.http2()
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX))
                .keep_alive_interval(Some(*header_read_timeout))
                .keep_alive_timeout(*header_read_timeout);
        }
        b
    });
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Over the connection limit: close at once rather than let clients exhaust
                // descriptors (logged once per 1,000).
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if refused.is_multiple_of(1000) {
                        tracing::warn!(listener = %name, max_connections, "connection limit reached: closing new connections");
                    }
                    refused += 1;
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let stop = stop_conns.subscribe();
                match &kind {
                    Kind::Http(header_read_timeout) => {
                        // Each request reads the route table of the generation running when
                        // it arrives: a reload applies to keep-alive connections too.
                        let client = crate::h1::server::Client {
                            live: live.clone(),
                            index,
                            peer,
                            header_read_timeout: *header_read_timeout,
                            hyper: builder.clone(),
                        };
                        match live.tls(index) {
                            Some(tls) => {
                                let tls = tls.clone();
                                conns.spawn(async move {
                                    let _slot = slot;
                                    crate::h1::server::serve_tls(stream, client, stop, tls).await;
                                });
                            }
                            None => {
                                conns.spawn(async move {
                                    let _slot = slot;
                                    crate::h1::server::serve(stream, client, stop).await;
                                });
                            }
                        }
                    }
                    Kind::Tcp => {
                        let pool = live.tcp_pool(index).expect("a tcp listener has a pool");
                        conns.spawn(async move {
                            let _slot = slot;
                            crate::tcp::serve(stream, peer, pool).await;
                        });
                    }
                }
            }
        }
    }
    drop(listener);
    // Idle HTTP connections close now, busy ones after their response; TCP ones run on.
    stop_conns.send_replace(());
    let drain = live.drain_timeout();
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!(listener = %name, open = conns.len(), "drain timeout: closing connections still open");
    }
    // Dropping the set aborts what is left.
}
