//! `[pool.NAME] discovery = { ... }`: where a pool's endpoints come from when they are not
//! (only) listed in the file. The `fulcrum-discovery` crate runs these; this module only reads
//! and checks them. With discovery, a pool's `endpoints` list is the initial set (it may be
//! empty) until the provider's first answer replaces it.
//!
//! ```toml
//! [pool.llama]
//! discovery = { kind = "file", path = "endpoints.toml", interval = "1s" }
//! # discovery = { kind = "dns", name = "vllm.internal", port = 8000, interval = "5s" }
//! # discovery = { kind = "dns", record = "srv", name = "_http._tcp.vllm.internal" }
//! # discovery = { kind = "etcd", endpoints = ["127.0.0.1:2379"], prefix = "/fulcrum/pools/llama/" }
//! # discovery = { kind = "kubernetes", api_server = "http://127.0.0.1:8001", namespace = "default", service = "vllm", port = "http" }
//! # discovery = { kind = "registration", ttl = "10s" }
//! ```
//!
//! A relative `path` (file) or `token_file` (kubernetes) is resolved against the directory of
//! the configuration file when the configuration was read from one ([`Config::load`], or
//! [`Config::parse`] given a file name), else against the working directory of the process.
//!
//! [`Config::load`]: crate::Config::load
//! [`Config::parse`]: crate::Config::parse

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fulcrum_core::endpoint::Labels;
use fulcrum_core::membership::LeaseLimits;
use fulcrum_core::phi::PhiConfig;
use fulcrum_core::{EndpointId, EndpointSpec};
use serde::{Deserialize, Serialize};

use crate::raw::DurationStr;

/// Default polling interval of the `file` provider.
pub const DEFAULT_FILE_INTERVAL: Duration = Duration::from_secs(1);
/// Default re-resolution interval of the `dns` provider.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(5);

/// One endpoint as written: in a pool's `endpoints`, in a watched file, as an etcd value, or
/// in a registration. `labels` keys `gpu` (or `accelerator`) and `zone` become the typed
/// [`Labels`] fields; any other key is kept as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    /// Where to connect: `ip:port`.
    pub address: SocketAddr,
    /// Relative capacity (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<NonZeroU32>,
    /// Identity (default: the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Models served (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A field of an [`EndpointEntry`] that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EntryError {
    /// The field (`id`, `models`, `labels`).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Longest endpoint id accepted.
pub const MAX_ID_LEN: usize = 253;

// === impl EndpointEntry ===

impl EndpointEntry {
    /// An entry for `address` with nothing else set.
    pub fn new(address: SocketAddr) -> Self {
        EndpointEntry { address, weight: None, id: None, models: Vec::new(), labels: BTreeMap::new() }
    }

    /// Checks the entry and builds the endpoint description.
    pub fn into_spec(self) -> Result<EndpointSpec, EntryError> {
        let err = |field, message: &str| EntryError { field, message: message.to_owned() };
        let mut labels = Labels::default();
        for model in self.models {
            if model.trim().is_empty() {
                return Err(err("models", "a model name must not be empty"));
            }
            labels.models.push(model);
        }
        for (k, v) in self.labels {
            match k.as_str() {
                "" => return Err(err("labels", "a label name must not be empty")),
                "gpu" | "accelerator" => labels.accelerator = Some(v),
                "zone" => labels.zone = Some(v),
                _ => {
                    labels.other.insert(k, v);
                }
            }
        }
        let mut spec = EndpointSpec::new(self.address);
        if let Some(w) = self.weight {
            spec = spec.with_weight(w);
        }
        if let Some(id) = self.id {
            check_id(&id).map_err(|m| err("id", &m))?;
            spec = spec.with_id(id);
        }
        spec.labels = labels;
        Ok(spec)
    }

    /// The entry describing `spec` (the inverse of [`into_spec`](Self::into_spec); the id is
    /// left out when it is the address, the weight when it is 1).
    pub fn from_spec(spec: &EndpointSpec) -> Self {
        let mut labels = spec.labels.other.clone();
        if let Some(a) = &spec.labels.accelerator {
            labels.insert("gpu".to_owned(), a.clone());
        }
        if let Some(z) = &spec.labels.zone {
            labels.insert("zone".to_owned(), z.clone());
        }
        let default_id = EndpointId::from(spec.address.to_string());
        EndpointEntry {
            address: spec.address,
            weight: (spec.weight.get() != 1).then_some(spec.weight),
            id: (spec.id != default_id).then(|| spec.id.to_string()),
            models: spec.labels.models.clone(),
            labels,
        }
    }
}

/// Whether `id` is usable as an endpoint id: not empty, at most [`MAX_ID_LEN`] bytes, no
/// control characters, no `/` (ids appear in admin API paths).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("must be at most {MAX_ID_LEN} bytes"));
    }
    if id.chars().any(|c| c.is_control() || c == '/') {
        return Err("must not contain `/` or control characters".to_owned());
    }
    Ok(())
}

/// Where a pool's endpoints come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DiscoveryConfig {
    /// A TOML or JSON file, polled.
    File(FileDiscovery),
    /// DNS A/AAAA or SRV records, re-resolved.
    Dns(DnsDiscovery),
    /// JSON values under an etcd key prefix, watched.
    Etcd(EtcdDiscovery),
    /// Kubernetes EndpointSlices of a Service, watched.
    Kubernetes(KubernetesDiscovery),
    /// Backends register themselves through the admin API and send heartbeats.
    Registration(RegistrationDiscovery),
}

impl DiscoveryConfig {
    /// The provider's kind as configuration spells it (`file`, `dns`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoveryConfig::File(_) => "file",
            DiscoveryConfig::Dns(_) => "dns",
            DiscoveryConfig::Etcd(_) => "etcd",
            DiscoveryConfig::Kubernetes(_) => "kubernetes",
            DiscoveryConfig::Registration(_) => "registration",
        }
    }

    /// Makes relative paths relative to `dir` (the configuration file's directory).
    pub(crate) fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        match self {
            DiscoveryConfig::File(f) => resolve(&mut f.path),
            DiscoveryConfig::Kubernetes(k) => {
                k.token_file.iter_mut().chain(k.ca_file.iter_mut()).for_each(resolve);
            }
            DiscoveryConfig::Etcd(e) => {
                if let Some(t) = &mut e.tls {
                    t.resolve_paths(dir);
                }
            }
            _ => {}
        }
    }
}

/// `kind = "file"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiscovery {
    /// The file: `.json` is read as JSON, anything else as TOML.
    pub path: PathBuf,
    /// How often it is checked (1 s).
    pub interval: Duration,
}

/// `kind = "dns"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsDiscovery {
    /// The name to resolve (for SRV, `_service._proto.name`).
    pub name: String,
    /// Which records.
    pub record: DnsRecord,
    /// Ask this server (UDP, then TCP if the answer is truncated) instead of the system's
    /// resolvers.
    pub server: Option<SocketAddr>,
    /// How often the name is resolved again (5 s).
    pub interval: Duration,
    /// How long one resolution may take (2 s).
    pub timeout: Duration,
}

/// Which DNS records a `dns` provider asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsRecord {
    /// A and AAAA records, with a fixed port.
    Address {
        /// The endpoints' port.
        port: u16,
    },
    /// SRV records, which carry ports and weights.
    Srv,
}

/// `kind = "etcd"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdDiscovery {
    /// etcd client URLs, `http://host:port` or `https://host:port` (a bare `host:port` gets
    /// `http://`).
    pub endpoints: Vec<String>,
    /// The key prefix; each key under it holds one endpoint as JSON.
    pub prefix: String,
    /// How long one request (or connecting) may take (5 s).
    pub timeout: Duration,
    /// For `https` endpoints: a CA bundle (else the system's roots) and a client certificate
    /// (`server_name` does not apply: each endpoint's own host is verified).
    pub tls: Option<crate::UpstreamTls>,
}

/// `kind = "kubernetes"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesDiscovery {
    /// The API server: `https://` (verified against `ca_file`) or `http://` (such as
    /// `kubectl proxy`). `None`: in a pod, the cluster's own (`KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, with the pod's service-account token and CA unless `token_file` and `ca_file`
    /// say otherwise).
    pub api_server: Option<String>,
    /// The namespace (`default`).
    pub namespace: String,
    /// Which EndpointSlices.
    pub selector: SliceSelector,
    /// Which port of the slices; `None`: the only one they list.
    pub port: Option<PortRef>,
    /// A file holding a bearer token, if the server needs one (read again at every new list,
    /// so a rotated token is picked up).
    pub token_file: Option<PathBuf>,
    /// A CA bundle (PEM) for an `https` API server, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long one list call may take (10 s).
    pub timeout: Duration,
}

/// How EndpointSlices are selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceSelector {
    /// The slices of a Service: `kubernetes.io/service-name=NAME`.
    Service(String),
    /// Any label selector (`app=vllm,tier!=canary`).
    Labels(String),
}

impl SliceSelector {
    /// The label selector sent to the API server.
    pub fn label_selector(&self) -> String {
        match self {
            SliceSelector::Service(name) => format!("kubernetes.io/service-name={name}"),
            SliceSelector::Labels(s) => s.clone(),
        }
    }
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// The port of this name.
    Name(String),
    /// This port number.
    Number(u16),
}

/// `kind = "registration"`.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistrationDiscovery {
    /// TTLs, the member limit and the failure detector.
    pub limits: LeaseLimits,
}

// === stage one ===

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a port number or a port name")]
pub(crate) enum RawPort {
    Number(i64),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiscovery {
    kind: String,
    interval: Option<DurationStr>,
    timeout: Option<DurationStr>,
    path: Option<String>,
    name: Option<String>,
    port: Option<RawPort>,
    record: Option<String>,
    server: Option<SocketAddr>,
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
    api_server: Option<String>,
    namespace: Option<String>,
    service: Option<String>,
    selector: Option<String>,
    token_file: Option<String>,
    ca_file: Option<String>,
    ttl: Option<DurationStr>,
    min_ttl: Option<DurationStr>,
    max_ttl: Option<DurationStr>,
    max_endpoints: Option<usize>,
    phi_threshold: Option<f64>,
    phi_acceptable_pause: Option<DurationStr>,
    failure_detector: Option<bool>,
    tls: Option<crate::raw::RawUpstreamTls>,
}

use crate::raw::FieldError;

fn err(field: &str, problem: impl Into<String>) -> FieldError {
    (format!(".discovery.{field}"), problem.into())
}

fn required(v: Option<String>, field: &str) -> Result<String, FieldError> {
    v.filter(|s| !s.trim().is_empty()).ok_or_else(|| err(field, "is required"))
}

fn positive(d: Option<DurationStr>, field: &str, default: Duration) -> Result<Duration, FieldError> {
    match d {
        Some(DurationStr(d)) if d.is_zero() => Err(err(field, "must be longer than zero")),
        Some(DurationStr(d)) => Ok(d),
        None => Ok(default),
    }
}

// === impl RawDiscovery ===

impl RawDiscovery {
    /// The fields that are set, by name.
    fn present(&self) -> Vec<&'static str> {
        let fields = [
            ("interval", self.interval.is_some()),
            ("timeout", self.timeout.is_some()),
            ("path", self.path.is_some()),
            ("name", self.name.is_some()),
            ("port", self.port.is_some()),
            ("record", self.record.is_some()),
            ("server", self.server.is_some()),
            ("endpoints", self.endpoints.is_some()),
            ("prefix", self.prefix.is_some()),
            ("api_server", self.api_server.is_some()),
            ("namespace", self.namespace.is_some()),
            ("service", self.service.is_some()),
            ("selector", self.selector.is_some()),
            ("token_file", self.token_file.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("ttl", self.ttl.is_some()),
            ("min_ttl", self.min_ttl.is_some()),
            ("max_ttl", self.max_ttl.is_some()),
            ("max_endpoints", self.max_endpoints.is_some()),
            ("phi_threshold", self.phi_threshold.is_some()),
            ("phi_acceptable_pause", self.phi_acceptable_pause.is_some()),
            ("failure_detector", self.failure_detector.is_some()),
            ("tls", self.tls.is_some()),
        ];
        fields.into_iter().filter(|(_, set)| *set).map(|(name, _)| name).collect()
    }

    pub(crate) fn validate(self) -> Result<DiscoveryConfig, FieldError> {
        let allowed: &[&str] = match self.kind.as_str() {
            "file" => &["path", "interval"],
            "dns" => &["name", "port", "record", "server", "interval", "timeout"],
            "etcd" => &["endpoints", "prefix", "timeout", "tls"],
            "kubernetes" => {
                &["api_server", "namespace", "service", "selector", "port", "token_file", "ca_file", "timeout"]
            }
            "registration" => &[
                "ttl",
                "min_ttl",
                "max_ttl",
                "max_endpoints",
                "phi_threshold",
                "phi_acceptable_pause",
                "failure_detector",
            ],
            k => {
                let msg = format!("must be \"file\", \"dns\", \"etcd\", \"kubernetes\" or \"registration\", got {k:?}");
                return Err(err("kind", msg));
            }
        };
        if let Some(field) = self.present().into_iter().find(|f| !allowed.contains(f)) {
            let msg = format!("does not apply to kind {:?} (it takes: {})", self.kind, allowed.join(", "));
            return Err(err(field, msg));
        }
        match self.kind.as_str() {
            "file" => Ok(DiscoveryConfig::File(FileDiscovery {
                path: PathBuf::from(required(self.path, "path")?),
                interval: positive(self.interval, "interval", DEFAULT_FILE_INTERVAL)?,
            })),
            "dns" => self.dns(),
            "etcd" => self.etcd(),
            "kubernetes" => self.kubernetes(),
            _ => self.registration(),
        }
    }

    fn dns(self) -> Result<DiscoveryConfig, FieldError> {
        let name = required(self.name, "name")?;
        let valid = name.len() <= 253
            && name.trim_end_matches('.').split('.').all(|l| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(err("name", format!("{name:?} is not a DNS name")));
        }
        let record = match self.record.as_deref().unwrap_or("a") {
            "a" | "aaaa" | "address" => match self.port {
                Some(RawPort::Number(p)) if (1..=65_535).contains(&p) => {
                    DnsRecord::Address { port: u16::try_from(p).map_err(|_| err("port", "out of range"))? }
                }
                Some(_) => return Err(err("port", "must be a port number from 1 to 65535")),
                None => return Err(err("port", "is required for A/AAAA records (SRV records carry their own)")),
            },
            "srv" => {
                if self.port.is_some() {
                    return Err(err("port", "does not apply to SRV records, which carry their own ports"));
                }
                DnsRecord::Srv
            }
            r => return Err(err("record", format!("must be \"a\" (A and AAAA) or \"srv\", got {r:?}"))),
        };
        Ok(DiscoveryConfig::Dns(DnsDiscovery {
            name,
            record,
            server: self.server,
            interval: positive(self.interval, "interval", DEFAULT_DNS_INTERVAL)?,
            timeout: positive(self.timeout, "timeout", Duration::from_secs(2))?,
        }))
    }

    fn etcd(self) -> Result<DiscoveryConfig, FieldError> {
        let raw = self.endpoints.unwrap_or_default();
        if raw.is_empty() {
            return Err(err("endpoints", "is required: etcd client addresses such as [\"127.0.0.1:2379\"]"));
        }
        let tls = match self.tls.map(crate::raw::RawUpstreamTls::validate).transpose() {
            Ok(Some(t)) if t.server_name.is_some() => {
                return Err(err("tls.server_name", "does not apply to etcd: each endpoint's own host is verified"));
            }
            Ok(t) => t,
            Err((field, message)) => return Err((format!(".discovery{field}"), message)),
        };
        // With `tls`, a bare host:port is https, and an http:// one a mistake (its files
        // would never be used).
        let endpoints = raw.iter().map(|e| etcd_url(e, tls.is_some())).collect::<Result<Vec<_>, _>>()?;
        let prefix = required(self.prefix, "prefix")?;
        Ok(DiscoveryConfig::Etcd(EtcdDiscovery {
            endpoints,
            prefix,
            timeout: positive(self.timeout, "timeout", Duration::from_secs(5))?,
            tls,
        }))
    }

    fn kubernetes(self) -> Result<DiscoveryConfig, FieldError> {
        if let Some(api_server) = &self.api_server {
            match api_server.split_once("://") {
                Some(("http" | "https", rest)) if !rest.is_empty() => {}
                _ => {
                    return Err(err(
                        "api_server",
                        format!(
                            "must be a URL such as https://10.0.0.1:6443 or http://127.0.0.1:8001, got {api_server:?}"
                        ),
                    ));
                }
            }
        }
        let api_server = self.api_server;
        let namespace = self.namespace.unwrap_or_else(|| "default".to_owned());
        if namespace.is_empty() || !crate::is_name(&namespace) {
            return Err(err("namespace", format!("{namespace:?} is not a namespace name")));
        }
        let selector = match (self.service, self.selector) {
            (Some(s), None) if crate::is_name(&s) => SliceSelector::Service(s),
            (Some(s), None) => return Err(err("service", format!("{s:?} is not a Service name"))),
            (None, Some(s)) if !s.trim().is_empty() => SliceSelector::Labels(s),
            (Some(_), Some(_)) => return Err(err("selector", "give `service` or `selector`, not both")),
            _ => return Err(err("service", "is required (or a label `selector`)")),
        };
        let port = match self.port {
            None => None,
            Some(RawPort::Number(p)) => match u16::try_from(p) {
                Ok(p) if p > 0 => Some(PortRef::Number(p)),
                _ => return Err(err("port", "must be a port number from 1 to 65535 or a port name")),
            },
            Some(RawPort::Name(n)) if !n.is_empty() => match n.parse::<u16>() {
                Ok(p) if p > 0 => Some(PortRef::Number(p)),
                _ => Some(PortRef::Name(n)),
            },
            Some(RawPort::Name(_)) => return Err(err("port", "must not be empty")),
        };
        Ok(DiscoveryConfig::Kubernetes(KubernetesDiscovery {
            api_server,
            namespace,
            selector,
            port,
            token_file: self.token_file.filter(|t| !t.is_empty()).map(PathBuf::from),
            ca_file: self.ca_file.filter(|t| !t.is_empty()).map(PathBuf::from),
            timeout: positive(self.timeout, "timeout", Duration::from_secs(10))?,
        }))
    }

    fn registration(self) -> Result<DiscoveryConfig, FieldError> {
        let defaults = LeaseLimits::default();
        let limits = LeaseLimits {
            default_ttl: positive(self.ttl, "ttl", defaults.default_ttl)?,
            min_ttl: positive(self.min_ttl, "min_ttl", defaults.min_ttl)?,
            max_ttl: positive(self.max_ttl, "max_ttl", defaults.max_ttl)?,
            max_members: self.max_endpoints.unwrap_or(defaults.max_members),
            failure_detector: defaults.failure_detector.filter(|_| self.failure_detector != Some(false)).map(|d| {
                PhiConfig {
                    threshold: self.phi_threshold.unwrap_or(d.threshold),
                    acceptable_pause: self.phi_acceptable_pause.map_or(d.acceptable_pause, |p| p.0),
                    ..d
                }
            }),
        };
        if let Some(d) = &limits.failure_detector {
            d.validate().map_err(|e| err("phi_threshold", e))?;
        }
        if limits.max_members == 0 {
            return Err(err("max_endpoints", "must be at least 1"));
        }
        if limits.min_ttl > limits.default_ttl {
            return Err(err("min_ttl", format!("must not be longer than ttl ({:?})", limits.default_ttl)));
        }
        if limits.default_ttl > limits.max_ttl {
            return Err(err("max_ttl", format!("must not be shorter than ttl ({:?})", limits.default_ttl)));
        }
        Ok(DiscoveryConfig::Registration(RegistrationDiscovery { limits }))
    }
}

/// `host:port` or `http://host:port` as an `http://host:port` URL.
fn etcd_url(e: &str, tls: bool) -> Result<String, FieldError> {
    let (scheme, rest) = match e.split_once("://") {
        None if tls => ("https", e),
        None => ("http", e),
        Some(("http", _)) if tls => {
            return Err(err("endpoints", format!("{e:?} is plain http, but `tls` is set: use https://")));
        }
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some(_) => return Err(err("endpoints", format!("{e:?} is not an http(s):// URL or host:port"))),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("endpoints", format!("{e:?} needs a port")))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || rest.contains('/') {
        return Err(err("endpoints", format!("{e:?} is not host:port (such as 127.0.0.1:2379)")));
    }
    Ok(format!("{scheme}://{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn discovery(table: &str) -> DiscoveryConfig {
        let c = Config::parse(&format!("[pool.x]\ndiscovery = {table}\n"), None).unwrap();
        c.pools["x"].discovery.clone().unwrap()
    }

    fn err(table: &str) -> String {
        Config::parse(&format!("[pool.x]\ndiscovery = {table}\n"), Some(Path::new("f.toml"))).unwrap_err().to_string()
    }

    #[test]
    fn every_kind_parses_with_defaults() {
        let DiscoveryConfig::Dns(d) = discovery(r#"{ kind = "dns", name = "localhost", port = 9001 }"#) else {
            panic!("dns")
        };
        assert_eq!((d.record, d.interval, d.server), (DnsRecord::Address { port: 9001 }, DEFAULT_DNS_INTERVAL, None));
        let DiscoveryConfig::Dns(d) =
            discovery(r#"{ kind = "dns", record = "srv", name = "_http._tcp.x.local", server = "127.0.0.1:5353" }"#)
        else {
            panic!("srv")
        };
        assert_eq!(d.record, DnsRecord::Srv);
        assert_eq!(d.server, Some("127.0.0.1:5353".parse().unwrap()));
        let DiscoveryConfig::Etcd(e) =
            discovery(r#"{ kind = "etcd", endpoints = ["127.0.0.1:2379", "http://10.0.0.2:2379/"], prefix = "/f/" }"#)
        else {
            panic!("etcd")
        };
        assert_eq!(e.endpoints, ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        let DiscoveryConfig::Kubernetes(k) = discovery(
            r#"{ kind = "kubernetes", api_server = "http://127.0.0.1:8001", service = "vllm", port = "http" }"#,
        ) else {
            panic!("kubernetes")
        };
        assert_eq!(k.namespace, "default");
        assert_eq!(k.selector.label_selector(), "kubernetes.io/service-name=vllm");
        assert_eq!(k.port, Some(PortRef::Name("http".into())));
        let DiscoveryConfig::Kubernetes(k) = discovery(
            r#"{ kind = "kubernetes", api_server = "http://127.0.0.1:8001", selector = "app=vllm", port = 8000 }"#,
        ) else {
            panic!("kubernetes")
        };
        assert_eq!(k.port, Some(PortRef::Number(8000)));
        // In a pod: no api_server (the cluster's own, from the environment); https with a CA.
        let DiscoveryConfig::Kubernetes(k) = discovery(r#"{ kind = "kubernetes", service = "vllm" }"#) else {
            panic!("kubernetes")
        };
        assert_eq!((k.api_server, k.ca_file, k.token_file), (None, None, None));
        let DiscoveryConfig::Kubernetes(k) = discovery(
            r#"{ kind = "kubernetes", api_server = "https://10.0.0.1:6443", ca_file = "/ca.pem", service = "v" }"#,
        ) else {
            panic!("kubernetes")
        };
        assert_eq!(k.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        let DiscoveryConfig::Registration(r) = discovery(r#"{ kind = "registration" }"#) else { panic!("reg") };
        assert_eq!(r.limits, LeaseLimits::default());
        assert_eq!(r.limits.failure_detector.map(|d| d.threshold), Some(8.0));
        let off = discovery(r#"{ kind = "registration", failure_detector = false }"#);
        let DiscoveryConfig::Registration(off) = off else { panic!("{off:?}") };
        assert_eq!(off.limits.failure_detector, None, "the TTL alone ends leases");
        let DiscoveryConfig::Registration(r) =
            discovery(r#"{ kind = "registration", phi_threshold = 12.5, phi_acceptable_pause = "2s" }"#)
        else {
            panic!("reg")
        };
        let d = r.limits.failure_detector.expect("a detector");
        assert_eq!((d.threshold, d.acceptable_pause), (12.5, Duration::from_secs(2)));
        let DiscoveryConfig::File(f) = discovery(r#"{ kind = "file", path = "/etc/eps.json" }"#) else {
            panic!("file")
        };
        assert_eq!((f.path.to_str(), f.interval), (Some("/etc/eps.json"), DEFAULT_FILE_INTERVAL));
    }

    #[test]
    fn nonsense_is_refused_by_field() {
        for (table, want) in [
            (r#"{ kind = "zookeeper" }"#, "pool.x.discovery.kind: must be"),
            (r#"{ kind = "file" }"#, "pool.x.discovery.path: is required"),
            (r#"{ kind = "file", path = "a", port = 1 }"#, "pool.x.discovery.port: does not apply to kind \"file\""),
            (r#"{ kind = "file", path = "a", interval = "0s" }"#, "discovery.interval: must be longer than zero"),
            (r#"{ kind = "dns", name = "x" }"#, "pool.x.discovery.port: is required"),
            (r#"{ kind = "dns", name = "x", port = 0 }"#, "pool.x.discovery.port: must be a port number"),
            (r#"{ kind = "dns", name = "x y", port = 1 }"#, "pool.x.discovery.name: \"x y\" is not a DNS name"),
            (r#"{ kind = "dns", name = "x", record = "srv", port = 1 }"#, "port: does not apply to SRV"),
            (r#"{ kind = "dns", name = "x", record = "mx" }"#, "pool.x.discovery.record"),
            (r#"{ kind = "etcd", prefix = "/a/" }"#, "pool.x.discovery.endpoints: is required"),
            (r#"{ kind = "etcd", endpoints = ["ftp://a:1"], prefix = "/" }"#, "not an http(s):// URL"),
            (
                r#"{ kind = "etcd", endpoints = ["https://a:1"], prefix = "/", tls = { server_name = "a" } }"#,
                "does not apply to etcd",
            ),
            (r#"{ kind = "etcd", endpoints = ["a"], prefix = "/" }"#, "needs a port"),
            (r#"{ kind = "etcd", endpoints = ["a:1"] }"#, "pool.x.discovery.prefix: is required"),
            (
                r#"{ kind = "kubernetes", api_server = "k:6443", service = "s" }"#,
                "pool.x.discovery.api_server: must be a URL",
            ),
            (r#"{ kind = "kubernetes", api_server = "ftp://k", service = "s" }"#, "https://10.0.0.1:6443"),
            (r#"{ kind = "kubernetes", api_server = "http://k" }"#, "pool.x.discovery.service: is required"),
            (r#"{ kind = "kubernetes", api_server = "http://k", service = "s", selector = "a=b" }"#, "not both"),
            (r#"{ kind = "kubernetes", api_server = "http://k", service = "s", port = 70000 }"#, "discovery.port"),
            (r#"{ kind = "registration", ttl = "1s", min_ttl = "2s" }"#, "pool.x.discovery.min_ttl"),
            (r#"{ kind = "registration", ttl = "1h", max_ttl = "1m" }"#, "pool.x.discovery.max_ttl"),
            (r#"{ kind = "registration", max_endpoints = 0 }"#, "pool.x.discovery.max_endpoints"),
            (
                r#"{ kind = "registration", phi_threshold = 0.0 }"#,
                "pool.x.discovery.phi_threshold: must be a number above 0",
            ),
            (r#"{ kind = "registration", phi_threshold = -3.0 }"#, "pool.x.discovery.phi_threshold"),
            (r#"{ kind = "file", path = "a", phi_threshold = 8.0 }"#, "phi_threshold: does not apply to kind \"file\""),
            (r#"{ kind = "registration", nonsense = 1 }"#, "unknown field `nonsense`"),
        ] {
            let e = err(table);
            assert!(e.contains(want), "{table}: {e}");
            // Stage-two errors name the pool's line, as the other pool tables do.
            assert!(e.starts_with("f.toml:"), "{table}: {e}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let text = r#"{"address":"127.0.0.1:1","weight":3,"id":"a","models":["m"],"labels":{"gpu":"h100","zone":"z","rack":"r"}}"#;
        let entry: EndpointEntry = serde_json::from_str(text).unwrap();
        let spec = entry.clone().into_spec().unwrap();
        assert_eq!(spec.labels.accelerator.as_deref(), Some("h100"));
        assert_eq!(EndpointEntry::from_spec(&spec), entry);
        let plain = EndpointEntry::new("127.0.0.1:2".parse().unwrap());
        assert_eq!(EndpointEntry::from_spec(&plain.clone().into_spec().unwrap()), plain);
        let bad = EndpointEntry { id: Some("a/b".into()), ..plain.clone() };
        assert_eq!(bad.into_spec().unwrap_err().field, "id");
        let bad = EndpointEntry { models: vec![" ".into()], ..plain };
        assert_eq!(bad.into_spec().unwrap_err().field, "models");
    }
}
