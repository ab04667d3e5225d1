//! `fulcrum serve` and `fulcrum validate`.

use std::path::PathBuf;

use anyhow::Context as _;
use fulcrum_config::{Config, ListenerKind};
use fulcrum_proxy::Proxy;

/// Flags of `fulcrum serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
    /// Worker threads, overriding `[proxy] workers` (default: one per core).
    #[arg(long)]
    pub workers: Option<std::num::NonZeroUsize>,
    /// Do not reload when the configuration file changes (SIGHUP and the admin API still do).
    #[arg(long)]
    pub no_watch: bool,
    /// A file holding the admin API's bearer token (else the FULCRUM_ADMIN_TOKEN environment
    /// variable). Required when `[proxy] admin` is not a loopback address.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Mesh mode: follow the pools and routes kept in etcd, at etcd://HOST:PORT (several hosts
    /// separated by commas, optionally followed by /KEY; default key /fulcrum/config); this
    /// file then gives the listeners and proxy settings. Admin API changes reach every proxy.
    #[arg(long, value_name = "URL")]
    pub control: Option<fulcrum_control::mesh::ControlUrl>,
    #[command(flatten)]
    pub control_tls: crate::control::ControlTls,
}

/// The admin API's bearer token, from `file` (`--admin-token-file`) or else the
/// `FULCRUM_ADMIN_TOKEN` environment variable; at least 16 characters when given.
pub(crate) fn read_admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let (token, from) = match file {
        Some(path) => (
            Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--admin-token-file {}: cannot read it", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            format!("--admin-token-file {}", path.display()),
        ),
        None => {
            (std::env::var("FULCRUM_ADMIN_TOKEN").ok().map(|t| t.trim().to_owned()), "FULCRUM_ADMIN_TOKEN".to_owned())
        }
    };
    match token {
        Some(t) if t.len() < 16 => {
            anyhow::bail!("{from}: the admin token must be at least 16 characters long (got {})", t.len())
        }
        Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => {
            anyhow::bail!("{from}: the admin token must be printable ASCII without spaces (it travels in a header)")
        }
        t => Ok(t),
    }
}

/// The admin token ([`read_admin_token`]); refused when the admin API listens beyond loopback
/// without one.
fn admin_token(args: &ServeArgs, admin: std::net::SocketAddr) -> anyhow::Result<Option<String>> {
    match read_admin_token(args.admin_token_file.as_deref())? {
        Some(t) => Ok(Some(t)),
        None if admin.ip().is_loopback() => Ok(None),
        None => anyhow::bail!(
            "proxy.admin: the admin API listens on {admin}, beyond loopback, so it needs a bearer token: \
             pass --admin-token-file FILE or set FULCRUM_ADMIN_TOKEN"
        ),
    }
}

/// Reloads the configuration on SIGHUP and, unless `watch` is off, when the file's content
/// changes (checked every second). A refused reload is logged; the old configuration runs on.
async fn reload_triggers(live: fulcrum_proxy::Live, mesh: Option<fulcrum_control::mesh::Mesh>, watch: bool) {
    let reload = |why: &str| {
        let outcome = match &mesh {
            Some(mesh) => mesh.reload_own().map_err(|e| e.to_string()),
            None => live.reload_file().map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(report) => tracing::info!(trigger = why, generation = report.generation, "reload applied"),
            Err(e) => tracing::error!(trigger = why, error = %e, "reload refused: the running configuration stays"),
        }
    };
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let read = |live: &fulcrum_proxy::Live| live.path().and_then(|p| std::fs::read_to_string(p).ok());
    let mut seen = read(&live);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            _ = hangup => {
                seen = read(&live);
                reload("SIGHUP");
            }
            _ = tick.tick(), if watch => {
                let now = read(&live);
                if now.is_some() && now != seen {
                    seen = now;
                    reload("file changed");
                }
            }
        }
    }
}

/// How this proxy names itself in the keys of the batches it holds in etcd: its host, its
/// first listener's address and its process id.
fn identity(proxy: &Proxy, config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".to_owned());
    let addr = config
        .listeners
        .first()
        .and_then(|l| proxy.local_addr(&l.name))
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    format!("{host} {addr} pid {}", std::process::id())
}

/// Flags of `fulcrum validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The configuration file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Checks a file and prints what it describes, or every error found, one per line
/// (`file:line: field: message`).
pub fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => {
            for e in errors.errors() {
                eprintln!("{e}");
            }
            let n = errors.len();
            anyhow::bail!("{}: {n} error{}", args.config.display(), if n == 1 { "" } else { "s" });
        }
    };
    let tls = fulcrum_proxy::tls::check(&config);
    if !tls.is_empty() {
        tls.iter().for_each(|e| eprintln!("{e}"));
        let n = tls.len();
        anyhow::bail!("{}: {n} error{}", args.config.display(), if n == 1 { "" } else { "s" });
    }
    println!(
        "{}: ok ({} listeners, {} routes, {} pools, {} endpoints)",
        args.config.display(),
        config.listeners.len(),
        config.routes.len(),
        config.pools.len(),
        config.pools.values().map(|p| p.endpoints.len()).sum::<usize>()
    );
    Ok(())
}

/// A runtime with `workers` threads (default: one per core). One worker gets tokio's
/// current-thread scheduler: no work stealing, no cross-thread wake-ups, as HAProxy and NGINX
/// run a single thread.
pub fn runtime(workers: Option<std::num::NonZeroUsize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(w) if w.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(w) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(w.get());
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().thread_name("fulcrum-worker").build().context("cannot start the async runtime")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the proxy until Ctrl-C or SIGTERM, then drains.
pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let token = config.proxy.admin.map(|a| admin_token(args, a)).transpose()?.flatten();
    if let Some(seed) = config.proxy.seed {
        fulcrum_proxy::clock::set_seed(seed);
    }
    let rt = runtime(args.workers.or(config.proxy.workers))?;
    rt.block_on(async {
        let proxy = Proxy::bind_file(&args.config).await?;
        let live = proxy.live().clone();
        // Mesh mode: the pools and routes come from etcd (the file's until the first read).
        let mesh = match &args.control {
            None if args.control_tls.is_set() => {
                anyhow::bail!("--control-ca, --control-cert and --control-key need --control etcds://...")
            }
            Some(url) => {
                let url = &args.control_tls.apply(url)?;
                let own = live.state().text().map(|t| t.to_string()).unwrap_or_default();
                let mesh = fulcrum_control::mesh::Mesh::new(url, &own, live.clone())?;
                tracing::info!(etcd = ?url.endpoints, key = %url.key, "mesh mode: following the shared configuration");
                Some(mesh)
            }
            None => None,
        };
        let mesh_task = mesh.clone().map(|m| tokio::spawn(m.run()));
        // Mesh mode with batches: each runs on one proxy, held under this proxy's lease
        // (before the proxy runs, which resumes the batches it can claim).
        let batch_owners = match (&mesh, live.batches()) {
            (Some(mesh), Some(batches)) => {
                let owners = mesh.share_batches(batches, identity(&proxy, &config), batches.config().lease_ttl);
                let prefix = owners.status().prefix;
                tracing::info!(%prefix, ttl = ?batches.config().lease_ttl, "mesh mode: each batch runs on the proxy that holds it in etcd");
                Some((owners.clone(), tokio::spawn(owners.run())))
            }
            _ => None,
        };
        let discovery = fulcrum_control::discover::for_live(&live);
        let discovery_task = tokio::spawn(fulcrum_control::discover::supervise(live.clone(), discovery.clone()));
        let reloader = tokio::spawn(reload_triggers(live.clone(), mesh.clone(), !args.no_watch));
        for l in &config.listeners {
            let kind = match &l.kind {
                ListenerKind::Http(_) if l.tls.is_some() => "https",
                ListenerKind::Http(_) => "http",
                ListenerKind::Tcp { .. } => "tcp",
            };
            let addr = proxy.local_addr(&l.name).map_or_else(|| l.address.to_string(), |a| a.to_string());
            tracing::info!(listener = %l.name, %addr, protocol = kind, "listening");
        }
        // Autoscalers start their replicas now and stop them after the proxy has drained.
        let (stop_scaling, stopped) = tokio::sync::watch::channel(false);
        let mut scalers = tokio::task::JoinSet::new();
        for pool in proxy.pools() {
            if let Some(autoscale) = pool.config().autoscale.clone() {
                let mut stopped = stopped.clone();
                scalers.spawn(fulcrum_scale::autoscaler::run(crate::scaled::ProxyPool(pool), autoscale, async move {
                    let _ = stopped.changed().await;
                }));
            }
        }
        // The admin API and /metrics, on their own listener.
        let admin = match config.proxy.admin {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("the admin API cannot listen on {address}"))?;
                let address = listener.local_addr().unwrap_or(address);
                tracing::info!(%address, "admin API listening");
                let mut state = fulcrum_control::admin::AdminState::new(live.clone())
                    .with_discovery(discovery)
                    .with_hosts(config.proxy.admin_hosts.clone());
                if let Some(token) = token {
                    state = state.with_token(token);
                }
                if let Some(mesh) = mesh {
                    state = state.with_mesh(mesh);
                }
                let app = fulcrum_control::admin::app(state);
                Some(tokio::spawn(fulcrum_control::listen::serve(listener, app, config.proxy.admin_limits)))
            }
            None => None,
        };
        proxy.run(shutdown_signal()).await;
        if let Some((owners, task)) = batch_owners {
            task.abort();
            owners.leave().await;
        }
        reloader.abort();
        discovery_task.abort();
        if let Some(task) = mesh_task {
            task.abort();
        }
        if let Some(admin) = admin {
            admin.abort();
        }
        let _ = stop_scaling.send(true);
        while let Some(done) = scalers.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "autoscaler stopped with an error");
            }
        }
        anyhow::Ok(())
    })
}
