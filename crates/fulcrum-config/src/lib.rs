//! Fulcrum's configuration: one typed model, read from TOML in two stages.
//!
//! Stage one deserializes raw structs that mirror the file (unknown keys are errors, and
//! field-local checks such as addresses, durations and policies fail there with the line and
//! column of the value). Stage two (`Config::from_raw`) checks what spans fields (names are
//! unique, routes point at pools that exist, pools can be built) and produces typed values:
//! `SocketAddr`, `Duration`, `NonZero*`, [`Policy`], no sentinels. Every error names the file,
//! the line and the field, and says what is allowed.
//!
//! It must never depend on the proxy, sockets or a runtime: the proxy, the control plane and
//! the simulator all read this model.

pub mod autoscale;
pub mod batch;
pub mod discovery;
mod duration;
mod locate;
pub mod observe;
mod raw;
pub mod resilience;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fulcrum_core::{BuildError, EndpointSpec, Instant, Policy, Selector, SelectorOptions};

pub use duration::parse_duration;
use locate::{Locator, Step, steps};

/// Default limit on client connections per listener (HAProxy's `maxconn` spirit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default limit on a request body the proxy reads (4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Most worker threads `[proxy] workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// Most connections `[proxy] admin_max_connections` may allow.
pub const MAX_ADMIN_CONNECTIONS: usize = 1_000_000;

/// A configuration error: where, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, if the text came from one.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field at fault, as a path (`pool.llama.endpoints[1].address`).
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl ConfigError {
    /// The error of a configuration file that cannot be read.
    pub fn unreadable(path: &Path, e: &std::io::Error) -> Self {
        ConfigError {
            file: Some(path.to_owned()),
            line: None,
            field: String::new(),
            message: format!("cannot read the file: {e}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("<config>")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

/// Every error of a configuration (at least one), in file order. Its `Display` prints one
/// per line, each as `file:line: field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(Vec<ConfigError>);

// === impl ConfigErrors ===

impl ConfigErrors {
    /// The errors, sorted by line (errors without a line first, as they concern the whole
    /// file); an empty list stands for an unknown error.
    pub fn new(mut errors: Vec<ConfigError>) -> Self {
        if errors.is_empty() {
            errors.push(ConfigError {
                file: None,
                line: None,
                field: String::new(),
                message: "invalid configuration".into(),
            });
        }
        errors.sort_by_key(|e| e.line);
        ConfigErrors(errors)
    }

    /// The first error.
    pub fn first(&self) -> &ConfigError {
        &self.0[0]
    }

    /// All of them.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true; for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Proxy-wide settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxySettings {
    /// Worker threads; `None` means one per core.
    pub workers: Option<NonZeroUsize>,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// Where the admin API and `/metrics` listen, if anywhere.
    pub admin: Option<SocketAddr>,
    /// Host names the admin API accepts in `Host` and `Origin`, besides IP addresses and
    /// `localhost` (empty by default).
    pub admin_hosts: Vec<String>,
    /// Connection limits and timeouts of the admin listener.
    pub admin_limits: AdminLimits,
    /// Seed of the random choices (`random`, `power_of_two`, jitter); `None`: from the
    /// process. With one worker a run is then reproducible.
    pub seed: Option<u64>,
    /// One log line per request (target `fulcrum::access`).
    pub access_log: bool,
}

/// How the admin listener guards itself against idle and slow clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Most admin connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time allowed for a request head: from the connection's start, or from the first byte
    /// of a later request.
    pub header_timeout: Duration,
    /// How long a connection may stay idle between requests (keep-alive).
    pub idle_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Its name, which routes refer to.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Most client connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// HTTP or TCP, with their settings.
    pub kind: ListenerKind,
    /// TLS termination (HTTPS), if set.
    pub tls: Option<ListenerTls>,
}

/// A listener's TLS settings (`[listener.tls]`). The files are read when the proxy starts,
/// on reload, and again whenever one of them changes on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerTls {
    /// Certificate chains and their keys (PEM files). A client's SNI name picks the first
    /// whose certificate is valid for it; without a match, or without SNI, the first serves.
    pub certificates: Vec<CertificateFiles>,
    /// CA bundle (PEM) that client certificates are verified against (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate (with `client_ca`; default required).
    pub client_auth: ClientAuth,
    /// The oldest TLS version offered (1.2 by default; TLS 1.3 is always on).
    pub min_version: TlsVersion,
    /// Time allowed for a client to complete its handshake (default 10 s).
    pub handshake_timeout: Duration,
}

/// A certificate chain and its private key, in PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain: the server's certificate first, then intermediates.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Whether a TLS listener with a `client_ca` requires client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Connections without a valid certificate are refused in the handshake.
    Required,
    /// A certificate is verified if sent; clients without one are served too.
    Optional,
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    V1_2,
    /// TLS 1.3.
    V1_3,
}

/// What a listener speaks.
#[derive(Clone, Debug, PartialEq)]
pub enum ListenerKind {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), with WebSocket pass-through.
    Http(HttpListener),
    /// Plain TCP, proxied to a pool.
    Tcp {
        /// The pool connections go to.
        pool: String,
    },
}

/// HTTP listener settings.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpListener {
    /// The largest request body read when a route or policy needs it (then 413).
    pub max_body_bytes: usize,
    /// Time allowed for a client to send a request's headers, counted from when the
    /// connection starts waiting for them: it also closes keep-alive connections left idle.
    pub header_read_timeout: Duration,
    /// Time allowed for a client to send a body the proxy reads (then 408).
    pub body_read_timeout: Duration,
    /// Where requests no route matches go; without it they get 404.
    pub default_pool: Option<String>,
    /// Whether clients of this listener are trusted with any priority class in the pools'
    /// `priority_header` (false: capped at each pool's `untrusted_priority`).
    pub trust_priority: bool,
}

/// A route: which requests of which listeners go to which pool.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// Its name in metrics, logs and traces (default `route<index>`; unique).
    pub name: String,
    /// Listeners the route applies to.
    pub listeners: Vec<String>,
    /// What a request must match.
    pub matcher: RouteMatch,
    /// Where matching requests go.
    pub pool: String,
    /// An inference route: its POSTs may be retried (they are not idempotent in HTTP's
    /// terms, but a model server computes the same answer again). Default: true when the
    /// route matches on `model`, else false.
    pub inference: bool,
    /// Whether requests are hedged: a second try sent to another endpoint when the first has
    /// no response head after the hedging delay. None (the default): inference calls are
    /// (an inference route's requests, and OpenAI calls recognised by path or body), others
    /// not.
    pub hedge: Option<bool>,
    /// A fixed hedging delay instead of the endpoint's learned one (its recent 95th
    /// percentile time to a response head).
    pub hedge_delay: Option<Duration>,
    /// Protocols a client may switch to with `Upgrade` (lowercase; Envoy's per-route
    /// `upgrade_configs`). Default [`DEFAULT_UPGRADES`]; a request offering another is
    /// forwarded as a plain request, its `Upgrade` header removed.
    pub upgrades: Vec<String>,
}

/// The upgrades a route allows unless it says otherwise (and those of a listener's default
/// pool): WebSocket only.
pub const DEFAULT_UPGRADES: [&str; 1] = ["websocket"];

/// Conditions that must all hold for a route to match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteMatch {
    /// The `Host` (or `:authority`), without port, lowercase.
    pub host: Option<String>,
    /// A prefix of the path.
    pub path_prefix: Option<String>,
    /// Headers (lowercase names) and the values they must have.
    pub headers: Vec<(String, String)>,
    /// OpenAI `model` names in the JSON body; any of them matches.
    pub models: Vec<String>,
    /// A verified client certificate's identity (a SAN URI such as a SPIFFE ID, a SAN DNS
    /// name, or the subject's common name); a trailing `*` matches any suffix.
    pub client_identity: Option<String>,
}

/// Upstream timeouts of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolTimeouts {
    /// Connecting to an endpoint.
    pub connect: Duration,
    /// From sending the request to the response headers (time to first byte).
    pub first_byte: Duration,
    /// A whole request including its streamed response; `None`: no limit (streams may be long).
    pub request: Option<Duration>,
    /// How long an idle upstream connection is kept for reuse.
    pub idle: Duration,
    /// Whether each try's first-byte deadline adapts to the endpoint's recent answers, with
    /// `first_byte` as the most (true).
    pub adaptive_first_byte: bool,
}

impl Default for PoolTimeouts {
    fn default() -> Self {
        PoolTimeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(60),
            request: None,
            idle: Duration::from_secs(90),
            adaptive_first_byte: true,
        }
    }
}

/// A pool of endpoints and how to balance over them.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// The pool's name.
    pub name: String,
    /// The balancing policy.
    pub policy: Policy,
    /// Slow start, dynamic weights, latency estimation.
    pub options: SelectorOptions,
    /// The endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// A cookie the proxy inserts to keep a client on its endpoint.
    pub sticky_cookie: Option<String>,
    /// Upstream timeouts.
    pub timeouts: PoolTimeouts,
    /// Idle upstream connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Health checks, outlier detection, breakers, retries, admission control.
    pub resilience: resilience::PoolResilience,
    /// Scraping the engines' own metrics (queue, KV-cache use, LoRA adapters).
    pub engine_metrics: Option<EngineScrape>,
    /// Autoscaling of the pool's replicas.
    pub autoscale: Option<autoscale::AutoscaleConfig>,
    /// Where endpoints come from at run time; `endpoints` is then the initial set.
    pub discovery: Option<discovery::DiscoveryConfig>,
    /// HTTPS to the endpoints (requests, health checks and engine scrapes), if set.
    pub tls: Option<UpstreamTls>,
    /// What the proxy speaks to the endpoints.
    pub protocol: UpstreamProtocol,
}

/// The HTTP version a pool speaks to its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default), with pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2: over TLS with ALPN `h2`, else with prior knowledge (h2c); one multiplexed
    /// connection per endpoint. What gRPC services need.
    H2,
}

/// A pool's TLS to its endpoints (`[pool.NAME] tls`), or a control-plane client's (etcd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name sent in SNI and verified in the endpoints' certificates; without it, each
    /// endpoint's IP address (which its certificate must then hold as a SAN).
    pub server_name: Option<String>,
    /// A CA bundle (PEM) to verify the endpoints against, instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and key to present (mutual TLS).
    pub client_cert: Option<CertificateFiles>,
}

impl UpstreamTls {
    /// Makes relative paths relative to `dir` (the configuration file's directory).
    pub(crate) fn resolve_paths(&mut self, dir: &Path) {
        let files = self.client_cert.iter_mut().flat_map(|c| [&mut c.cert, &mut c.key]);
        for p in files.chain(self.ca.as_mut()) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

// === impl PoolConfig ===

impl PoolConfig {
    /// The pool's selector at `now`: its policy and options over `endpoints`. The one place
    /// a pool's configuration becomes a [`Selector`]: the proxy builds its pools with it and
    /// the simulator (which brings its own endpoints, the modelled fleet) its pool.
    pub fn selector_for(&self, endpoints: Vec<EndpointSpec>, now: Instant) -> Result<Selector, BuildError> {
        Selector::try_new(self.policy.clone(), self.options.clone(), endpoints, now)
    }

    /// [`selector_for`](Self::selector_for) the configured endpoints.
    pub fn selector(&self, now: Instant) -> Result<Selector, BuildError> {
        self.selector_for(self.endpoints.clone(), now)
    }

    /// The core's half of the pool's settings: what the request's attempt machine and the
    /// pool's failure handling decide with ([`fulcrum_core::flow`]). A try waits for its
    /// response head at most `timeouts.first_byte`, and at most the retry policy's per-try
    /// timeout.
    pub fn rules(&self) -> fulcrum_core::flow::PoolRules {
        let r = &self.resilience;
        let first_byte =
            r.retry.per_try_timeout().map_or(self.timeouts.first_byte, |t| t.min(self.timeouts.first_byte));
        fulcrum_core::flow::PoolRules {
            health: r.health_check.as_ref().map(|h| h.config),
            outlier: r.outlier,
            panic_threshold: r.panic_threshold,
            breaker: r.breaker,
            limits: r.limits,
            retry: r.retry,
            budget: r.budget,
            admission: r.admission.as_ref().map(|a| a.config),
            rate_limit: r.rate_limit.as_ref().map(|l| l.config),
            first_byte,
            adaptive_first_byte: self.timeouts.adaptive_first_byte,
        }
    }
}

/// How the proxy polls each endpoint's engine metrics (vLLM, SGLang, TensorRT-LLM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineScrape {
    /// The metrics path.
    pub path: String,
    /// How often.
    pub interval: Duration,
    /// Values older than this count as unknown (never as idle).
    pub stale_after: Duration,
    /// Also poll the endpoint's served models here (OpenAI `/v1/models`), if set.
    pub models_path: Option<String>,
}

/// A whole, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Proxy-wide settings.
    pub proxy: ProxySettings,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Routes, in file order: the first that matches wins.
    pub routes: Vec<RouteConfig>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// OpenTelemetry traces, when an OTLP endpoint is set.
    pub tracing: Option<observe::TracingConfig>,
    /// Offline batches, when `[batch]` is present.
    pub batch: Option<batch::BatchConfig>,
}

/// The route name metrics and logs give requests that no route matched (a listener's
/// default pool); no route may take it.
pub const DEFAULT_ROUTE_NAME: &str = "default";

// === impl Config ===

impl Config {
    /// Whether requests reach `pool` through an inference route (a route to it with
    /// `inference`, which a `models` matcher implies), whose POSTs may be retried. A pool
    /// reached only as a listener's `default_pool` has none: its POSTs are never retried.
    pub fn has_inference_route(&self, pool: &str) -> bool {
        self.routes.iter().any(|r| r.pool == pool && r.inference)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, &e))?;
        Config::parse(&text, Some(path))
    }

    /// Parses and validates TOML text; `file` names the source in error messages, and its
    /// directory is where relative paths in the text (such as a discovery file) are resolved;
    /// without it they stay relative to the working directory. Every error is reported (a
    /// TOML syntax error stops the reading, so it comes alone; type errors come one a section,
    /// pool, listener and route).
    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let located = Locator::new(text, file);
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            // Read again section by section, pool by pool, listener and route by route, so
            // that one mistake does not hide the next.
            let mut errors = type_errors(text, &located);
            if errors.is_empty() {
                errors.push(toml_error(&e, &located));
            }
            ConfigErrors::new(errors)
        })?;
        Config::from_raw(raw, &located)
    }

    fn from_raw(raw: raw::RawConfig, at: &Locator<'_>) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        // What `serve` could not run is refused here, so that `validate` says so first.
        if let Some(w) = raw.proxy.workers
            && w.get() > MAX_WORKERS
        {
            let message = format!("must be at most {MAX_WORKERS} threads, got {}", w.get());
            errors.push(at.field_error(&steps("proxy.workers"), 0, "proxy.workers", &message));
        }
        let defaults = AdminLimits::default();
        let max_connections = match raw.proxy.admin_max_connections.map(NonZeroUsize::get) {
            Some(n) if n > MAX_ADMIN_CONNECTIONS => {
                let message = format!("must be at most {MAX_ADMIN_CONNECTIONS}, got {n}");
                let field = "proxy.admin_max_connections";
                errors.push(at.field_error(&steps(field), 0, field, &message));
                defaults.max_connections
            }
            n => n.unwrap_or(defaults.max_connections),
        };
        let mut positive = |key: &str, d: Option<raw::DurationStr>, default: Duration| match d {
            Some(d) if d.0.is_zero() => {
                let field = format!("proxy.{key}");
                errors.push(at.field_error(&steps(&field), 0, &field, "must be longer than zero"));
                default
            }
            Some(d) => d.0,
            None => default,
        };
        let admin_limits = AdminLimits {
            max_connections,
            header_timeout: positive("admin_header_timeout", raw.proxy.admin_header_timeout, defaults.header_timeout),
            idle_timeout: positive("admin_idle_timeout", raw.proxy.admin_idle_timeout, defaults.idle_timeout),
        };
        let proxy = ProxySettings {
            workers: raw.proxy.workers,
            drain_timeout: raw.proxy.drain_timeout.map_or(Duration::from_secs(30), |d| d.0),
            admin: raw.proxy.admin,
            admin_hosts: raw.proxy.admin_hosts.unwrap_or_default(),
            admin_limits,
            seed: raw.proxy.seed,
            access_log: raw.proxy.access_log.unwrap_or(false),
        };

        // References are checked against every pool written, valid or not: a pool with an
        // error of its own does not also make each route to it an error.
        let declared: Vec<String> = raw.pool.keys().cloned().collect();
        let mut pools = BTreeMap::new();
        for (name, spanned) in raw.pool {
            let span = spanned.span();
            let pool = spanned.into_inner();
            let field = format!("pool.{name}");
            let here = [Step::Key("pool"), Step::Key(&name)];
            if !is_name(&name) {
                errors.push(at.error(span.start, &field, "pool names use letters, digits, `-` and `_`"));
                continue;
            }
            let mut pool = match pool.validate(&name) {
                Ok(pool) => pool,
                Err(found) => {
                    for (sub, msg) in found {
                        let path = [&here[..], &steps(&sub)].concat();
                        errors.push(at.field_error(&path, span.start, &format!("{field}{sub}"), &msg));
                    }
                    continue;
                }
            };
            if let Some(dir) = at.file.and_then(Path::parent) {
                if let Some(d) = &mut pool.discovery {
                    d.resolve_paths(dir);
                }
                if let Some(t) = &mut pool.tls {
                    t.resolve_paths(dir);
                }
                if let Some(autoscale::ActuatorConfig::Kubernetes { ca_file, token_file, .. }) =
                    pool.autoscale.as_mut().map(|a| &mut a.actuator)
                {
                    for p in ca_file.iter_mut().chain(token_file.iter_mut()) {
                        if p.is_relative() {
                            *p = dir.join(&*p);
                        }
                    }
                }
            }
            // Build once to catch what only the whole pool shows (duplicates, table sizes).
            if let Err(e) = pool.selector(Instant::ZERO) {
                errors.push(at.error(span.start, &field, &e.to_string()));
                continue;
            }
            pools.insert(name, pool);
        }

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, spanned) in raw.listener.into_iter().enumerate() {
            let span = spanned.span();
            let l = spanned.into_inner();
            let before = errors.len();
            let mut fail = |key: &str, message: &str| {
                let path = [Step::Key("listener"), Step::Index(i), Step::Key(key)];
                errors.push(at.field_error(&path, span.start, &format!("listener[{i}].{key}"), message));
            };
            if !is_name(&l.name) {
                fail("name", "use letters, digits, `-` and `_`");
            } else if !names.insert(l.name.clone()) {
                fail("name", &format!("`{}` is used twice", l.name));
            }
            if !addresses.insert(l.address) {
                fail("address", &format!("{} is used by another listener", l.address));
            }
            // (Port 0 picks a free port at bind: two such addresses never clash.)
            if proxy.admin == Some(l.address) && l.address.port() != 0 {
                fail("address", &format!("{} is the admin API's address ([proxy] admin)", l.address));
            }
            for (name, d) in
                [("header_read_timeout", l.header_read_timeout), ("body_read_timeout", l.body_read_timeout)]
            {
                if d.is_some_and(|d| d.0.is_zero()) {
                    fail(name, "must be longer than zero");
                }
            }
            if let Some(pool) = &l.pool
                && !declared.contains(pool)
            {
                fail("pool", &unknown_pool(pool, &declared));
            }
            let kind = match l.protocol {
                raw::Protocol::Http => ListenerKind::Http(HttpListener {
                    max_body_bytes: l.max_body_bytes.map_or(DEFAULT_MAX_BODY_BYTES, NonZeroUsize::get),
                    header_read_timeout: l.header_read_timeout.map_or(Duration::from_secs(30), |d| d.0),
                    body_read_timeout: l.body_read_timeout.map_or(Duration::from_secs(60), |d| d.0),
                    default_pool: l.pool,
                    trust_priority: l.trust_priority.unwrap_or(false),
                }),
                raw::Protocol::Tcp => match l.pool {
                    Some(pool) => ListenerKind::Tcp { pool },
                    None => {
                        fail("pool", "a tcp listener needs a pool");
                        continue;
                    }
                },
            };
            let tls = match l.tls.map(|t| listener_tls(t, at.file.and_then(Path::parent))) {
                None => None,
                Some(_) if matches!(kind, ListenerKind::Tcp { .. }) => {
                    fail("tls", "TLS is for http listeners (a tcp listener passes bytes through)");
                    None
                }
                Some(Ok(t)) => Some(t),
                Some(Err((key, message))) => {
                    fail(&format!("tls.{key}"), &message);
                    None
                }
            };
            if errors.len() == before {
                let max_connections = l.max_connections.map_or(DEFAULT_MAX_CONNECTIONS, NonZeroUsize::get);
                listeners.push(ListenerConfig { name: l.name, address: l.address, max_connections, kind, tls });
            }
        }

        let http: Vec<String> =
            listeners.iter().filter(|l| matches!(l.kind, ListenerKind::Http(_))).map(|l| l.name.clone()).collect();
        let verifying: HashSet<String> = listeners
            .iter()
            .filter(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()))
            .map(|l| l.name.clone())
            .collect();
        let mut routes = Vec::new();
        let mut route_names = HashSet::new();
        for (i, spanned) in raw.route.into_iter().enumerate() {
            let span = spanned.span();
            let r = spanned.into_inner();
            let before = errors.len();
            let mut fail = |key: &str, message: &str| {
                let path = [&[Step::Key("route"), Step::Index(i)][..], &steps(key)].concat();
                errors.push(at.field_error(&path, span.start, &format!("route[{i}].{key}"), message));
            };
            let name = r.name.unwrap_or_else(|| format!("route{i}"));
            if !is_name(&name) {
                fail("name", "use letters, digits, `-` and `_`");
            } else if name == DEFAULT_ROUTE_NAME {
                fail("name", "`default` is reserved: metrics and logs use it for requests no route matched");
            } else if !route_names.insert(name.clone()) {
                fail("name", &format!("`{name}` is used twice"));
            }
            let listeners = match r.listener {
                Some(name) if http.contains(&name) => vec![name],
                Some(name) => {
                    fail(
                        "listener",
                        &format!("no http listener is named `{name}` (http listeners: {})", http.join(", ")),
                    );
                    Vec::new()
                }
                None => http.clone(),
            };
            if !declared.contains(&r.pool) {
                fail("pool", &unknown_pool(&r.pool, &declared));
            }
            let m = r.matcher;
            if let Some(prefix) = &m.path_prefix
                && !prefix.starts_with('/')
            {
                fail("match.path_prefix", "must start with `/`");
            }
            let mut headers = Vec::new();
            for (name, value) in m.headers {
                if !is_token(&name) {
                    fail("match.headers", &format!("`{name}` is not a header name"));
                }
                headers.push((name.to_ascii_lowercase(), value));
            }
            if r.hedge_delay.is_some_and(|d| d.0.is_zero()) {
                fail("hedge_delay", "must be longer than zero");
            }
            if m.client_identity.as_deref().is_some_and(str::is_empty) {
                fail("match.client_identity", "must not be empty");
            } else if m.client_identity.is_some()
                && let Some(plain) = listeners.iter().find(|l| !verifying.contains(*l))
            {
                let message = format!(
                    "listener `{plain}` does not verify client certificates: give its [listener.tls] a `client_ca`"
                );
                fail("match.client_identity", &message);
            }
            if errors.len() > before {
                continue;
            }
            let matcher = RouteMatch {
                host: m.host.map(|h| h.to_ascii_lowercase()),
                path_prefix: m.path_prefix,
                headers,
                models: m.model.map(|m| m.0).unwrap_or_default(),
                client_identity: m.client_identity,
            };
            let inference = r.inference.unwrap_or(!matcher.models.is_empty());
            let hedge_delay = r.hedge_delay.map(|d| d.0);
            let upgrades = r.upgrades.map_or_else(|| DEFAULT_UPGRADES.map(str::to_owned).to_vec(), |u| u.0);
            routes.push(RouteConfig {
                name,
                listeners,
                matcher,
                pool: r.pool,
                inference,
                hedge: r.hedge,
                hedge_delay,
                upgrades,
            });
        }

        let batch = match raw.batch.map(|b| b.validate(at.file.and_then(Path::parent))) {
            Some(Ok(b)) => Some(b),
            Some(Err(found)) => {
                for (key, message) in found {
                    let field = format!("batch.{key}");
                    errors.push(at.field_error(&steps(&field), 0, &field, &message));
                }
                None
            }
            None => None,
        };
        if !errors.is_empty() {
            return Err(ConfigErrors::new(errors));
        }
        Ok(Config {
            proxy,
            listeners,
            routes,
            pools,
            tracing: raw.tracing.and_then(|t| t.validate(at.file.and_then(Path::parent))),
            batch,
        })
    }
}

/// A TOML syntax or type error, at its line.
fn toml_error(e: &toml::de::Error, at: &Locator<'_>) -> ConfigError {
    let line = e.span().map(|s| at.line_of(s.start));
    let field = e.span().map(|s| at.field_at(s.start)).unwrap_or_default();
    // toml's message is one line; its Display adds a source excerpt we replace.
    ConfigError { file: at.file.map(Path::to_owned), line, field, message: e.message().trim().to_owned() }
}

/// The type errors of a document whose whole reading failed, each section, pool, listener
/// and route read on its own (none for a syntax error: the reading stops there).
fn type_errors(text: &str, at: &Locator<'_>) -> Vec<ConfigError> {
    use toml::Spanned;
    use toml::de::{DeTable, DeValue, ValueDeserializer};

    fn read<'a, T: serde::Deserialize<'a>>(value: &Spanned<DeValue<'a>>) -> Option<toml::de::Error> {
        T::deserialize(ValueDeserializer::from(value.clone())).err()
    }
    /// Each element of an array (each value of a table) on its own; the whole if it is not one.
    fn each<'a, T: serde::Deserialize<'a>>(value: &Spanned<DeValue<'a>>) -> Vec<toml::de::Error> {
        match value.get_ref() {
            DeValue::Array(items) => items.iter().filter_map(read::<T>).collect(),
            DeValue::Table(t) => t.iter().filter_map(|(_, v)| read::<T>(v)).collect(),
            _ => read::<Vec<T>>(value).into_iter().collect(),
        }
    }
    let Ok(doc) = DeTable::parse(text) else { return Vec::new() };
    let mut errors = Vec::new();
    for (key, value) in doc.get_ref() {
        let found = match key.get_ref().as_ref() {
            "proxy" => read::<raw::RawProxy>(value).into_iter().collect(),
            "tracing" => read::<observe::RawTracing>(value).into_iter().collect(),
            "batch" => read::<batch::RawBatch>(value).into_iter().collect(),
            "listener" => each::<raw::RawListener>(value),
            "route" => each::<raw::RawRoute>(value),
            "pool" if matches!(value.get_ref(), DeValue::Table(_)) => each::<raw::RawPool>(value),
            "pool" => read::<BTreeMap<String, raw::RawPool>>(value).into_iter().collect(),
            other => {
                let message = format!(
                    "unknown section `{other}`, expected one of `proxy`, `listener`, `route`, `pool`, `tracing`, `batch`"
                );
                errors.push(at.error(key.span().start, other, &message));
                Vec::new()
            }
        };
        errors.extend(found.iter().map(|e| toml_error(e, at)));
    }
    errors
}

fn unknown_pool(name: &str, pools: &[String]) -> String {
    let known: Vec<&str> = pools.iter().map(String::as_str).collect();
    format!("no pool is named `{name}` (pools: {})", if known.is_empty() { "none".into() } else { known.join(", ") })
}

pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests;

/// Checks `[listener.tls]` and resolves its paths against `dir` (the configuration file's
/// directory). Errors name the key at fault.
fn listener_tls(raw: raw::RawListenerTls, dir: Option<&Path>) -> Result<ListenerTls, (&'static str, String)> {
    let resolve = |p: PathBuf| match dir {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    };
    let mut certificates = Vec::new();
    match (raw.cert, raw.key) {
        (Some(cert), Some(key)) => certificates.push(CertificateFiles { cert, key }),
        (Some(_), None) => return Err(("key", "`cert` needs its `key`".into())),
        (None, Some(_)) => return Err(("cert", "`key` needs its `cert`".into())),
        (None, None) => {}
    }
    certificates.extend(raw.certificates.into_iter().map(|c| CertificateFiles { cert: c.cert, key: c.key }));
    if certificates.is_empty() {
        return Err(("cert", "a TLS listener needs a certificate: `cert` and `key`, or `certificates`".into()));
    }
    for c in &mut certificates {
        c.cert = resolve(std::mem::take(&mut c.cert));
        c.key = resolve(std::mem::take(&mut c.key));
    }
    let min_version = match raw.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => return Err(("min_version", format!("`{other}` is not a TLS version: use \"1.2\" or \"1.3\""))),
    };
    let client_auth = match (raw.client_auth, &raw.client_ca) {
        (Some(_), None) => return Err(("client_auth", "needs a `client_ca` to verify certificates against".into())),
        (Some(raw::ClientAuthRaw::Optional), Some(_)) => ClientAuth::Optional,
        _ => ClientAuth::Required,
    };
    let handshake_timeout = match raw.handshake_timeout {
        Some(d) if d.0.is_zero() => return Err(("handshake_timeout", "must be longer than zero".into())),
        d => d.map_or(Duration::from_secs(10), |d| d.0),
    };
    Ok(ListenerTls { certificates, client_ca: raw.client_ca.map(resolve), client_auth, min_version, handshake_timeout })
}
