//! Stage one: structs that mirror the file. Field-local checks happen while deserializing,
//! so their errors carry the value's line and column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use fulcrum_core::weight::{DynamicWeight, SlowStart};
use fulcrum_core::{LatencyConfig, Policy, SelectorOptions};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::{PoolConfig, PoolTimeouts, duration::parse_duration, is_token};

/// A duration written with a unit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DurationStr(pub Duration);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(DurationStr).map_err(serde::de::Error::custom)
    }
}

/// One string or a list of them.
#[derive(Clone, Debug, Default)]
pub(crate) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a string or a list of strings")]
        enum Repr {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::One(s) => OneOrMany(vec![s]),
            Repr::Many(v) => OneOrMany(v),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub pool: BTreeMap<String, Spanned<RawPool>>,
    pub tracing: Option<crate::observe::RawTracing>,
    pub batch: Option<crate::batch::RawBatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    pub workers: Option<NonZeroUsize>,
    pub drain_timeout: Option<DurationStr>,
    pub admin: Option<SocketAddr>,
    pub admin_hosts: Option<Vec<String>>,
    pub admin_max_connections: Option<NonZeroUsize>,
    pub admin_header_timeout: Option<DurationStr>,
    pub admin_idle_timeout: Option<DurationStr>,
    pub seed: Option<u64>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    pub pool: Option<String>,
    pub max_body_bytes: Option<NonZeroUsize>,
    pub header_read_timeout: Option<DurationStr>,
    pub body_read_timeout: Option<DurationStr>,
    pub max_connections: Option<NonZeroUsize>,
    pub trust_priority: Option<bool>,
    pub tls: Option<RawListenerTls>,
}

/// `[listener.tls]`: one certificate (`cert`, `key`), or several chosen by SNI
/// (`certificates`), or both (the first is then `cert`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: Option<ClientAuthRaw>,
    pub min_version: Option<String>,
    pub handshake_timeout: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClientAuthRaw {
    Required,
    Optional,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<String>,
    pub listener: Option<String>,
    pub inference: Option<bool>,
    pub hedge: Option<bool>,
    pub hedge_delay: Option<DurationStr>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub pool: String,
    pub upgrades: Option<UpgradeList>,
}

/// The protocols a route lets clients switch to with `Upgrade`: HTTP tokens, kept lowercase
/// (a protocol's `/version` suffix is not part of its name here).
#[derive(Clone, Debug)]
pub(crate) struct UpgradeList(pub Vec<String>);

impl<'de> Deserialize<'de> for UpgradeList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut names: Vec<String> = Vec::deserialize(d)?;
        if let Some(bad) = names.iter().find(|n| !is_token(n)) {
            let msg = format!("`{bad}` is not a protocol name (an HTTP token such as `websocket`)");
            return Err(serde::de::Error::custom(msg));
        }
        names.iter_mut().for_each(|n| n.make_ascii_lowercase());
        names.sort();
        names.dedup();
        Ok(UpgradeList(names))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub model: Option<OneOrMany>,
    pub client_identity: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlowStart {
    pub window: DurationStr,
    #[serde(default = "one")]
    pub aggression: f64,
    #[serde(default = "ten")]
    pub min_weight_percent: f64,
}

/// The policy of a pool whose configuration names none: `predicted_ttft` for an LLM pool
/// (one that scrapes its engines' metrics), `power_of_two` otherwise.
pub(crate) fn default_policy(llm: bool) -> Policy {
    if llm { Policy::from_kind(fulcrum_core::PolicyKind::PredictedTtft).unwrap_or_default() } else { Policy::default() }
}

fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    /// Unset: `predicted_ttft` for a pool that scrapes engine metrics (an LLM pool), else
    /// the general default.
    pub policy: Option<Policy>,
    #[serde(default)]
    pub endpoints: Vec<crate::discovery::EndpointEntry>,
    pub sticky_cookie: Option<String>,
    pub connect_timeout: Option<DurationStr>,
    pub first_byte_timeout: Option<DurationStr>,
    pub adaptive_first_byte: Option<bool>,
    pub request_timeout: Option<DurationStr>,
    pub idle_timeout: Option<DurationStr>,
    pub max_idle_per_endpoint: Option<usize>,
    pub slow_start: Option<RawSlowStart>,
    pub dynamic_weight_min_factor: Option<f64>,
    pub ewma_decay: Option<DurationStr>,
    pub default_rtt: Option<DurationStr>,
    pub failure_penalty: Option<DurationStr>,
    pub health_check: Option<crate::resilience::RawHealthCheck>,
    pub outlier_detection: Option<crate::resilience::RawOutlier>,
    pub circuit_breaker: Option<crate::resilience::RawBreaker>,
    pub retry: Option<crate::resilience::RawRetry>,
    pub admission: Option<crate::resilience::RawAdmission>,
    pub rate_limit: Option<crate::resilience::RawRateLimit>,
    pub panic_threshold: Option<f64>,
    pub engine_metrics: Option<RawEngineScrape>,
    pub autoscale: Option<crate::autoscale::RawAutoscale>,
    pub discovery: Option<crate::discovery::RawDiscovery>,
    pub tls: Option<RawUpstreamTls>,
    pub protocol: Option<UpstreamProtocolRaw>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamProtocolRaw {
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "h2")]
    H2,
}

/// `[pool.NAME] tls`: HTTPS to the endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEngineScrape {
    pub path: Option<String>,
    pub interval: Option<DurationStr>,
    pub stale_after: Option<DurationStr>,
    pub models_path: Option<String>,
}

/// A sub-field of a pool (`.retry.budget_percent`) and what is wrong with it.
pub(crate) type FieldError = (String, String);

/// The errors of one pool's fields, gathered so that every independent check reports.
#[derive(Debug, Default)]
pub(crate) struct FieldErrors(Vec<FieldError>);

// === impl FieldErrors ===

impl FieldErrors {
    /// The value, or `None` with its error kept.
    pub(crate) fn ok<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    /// The value, or `None` with all of its errors kept.
    pub(crate) fn all<T>(&mut self, r: Result<T, Vec<FieldError>>) -> Option<T> {
        r.map_err(|e| self.0.extend(e)).ok()
    }

    /// Keeps an error.
    pub(crate) fn push(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push((field.into(), problem.into()));
    }

    /// `value` if nothing went wrong; `build` runs only then.
    pub(crate) fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Vec<FieldError>> {
        if !self.0.is_empty() {
            return Err(self.0);
        }
        build().ok_or_else(|| vec![(String::new(), "invalid".into())])
    }
}

fn nonzero(d: Option<DurationStr>, field: &str, default: Duration) -> Result<Duration, FieldError> {
    match d {
        Some(DurationStr(d)) if d.is_zero() => Err((format!(".{field}"), "must be longer than zero".into())),
        Some(DurationStr(d)) => Ok(d),
        None => Ok(default),
    }
}

impl RawPool {
    /// Stage two for one pool; errors give the sub-field (`.endpoints[1].labels`) and message,
    /// every independent one of them.
    pub(crate) fn validate(self, name: &str) -> Result<PoolConfig, Vec<FieldError>> {
        let mut errors = FieldErrors::default();
        let defaults = PoolTimeouts::default();
        let mut positive = |d, field, default| errors.ok(nonzero(d, field, default)).unwrap_or(default);
        let timeouts = PoolTimeouts {
            connect: positive(self.connect_timeout, "connect_timeout", defaults.connect),
            first_byte: positive(self.first_byte_timeout, "first_byte_timeout", defaults.first_byte),
            request: self.request_timeout.map(|d| positive(Some(d), "request_timeout", d.0)),
            idle: positive(self.idle_timeout, "idle_timeout", defaults.idle),
            adaptive_first_byte: self.adaptive_first_byte.unwrap_or(defaults.adaptive_first_byte),
        };
        let lat = LatencyConfig::default();
        let latency = LatencyConfig {
            decay: positive(self.ewma_decay, "ewma_decay", lat.decay),
            default_rtt: positive(self.default_rtt, "default_rtt", lat.default_rtt),
            failure_penalty: self.failure_penalty.map_or(lat.failure_penalty, |d| d.0),
        };
        let slow_start = self.slow_start.and_then(|ss| {
            errors.ok(SlowStart::try_new(ss.window.0, ss.aggression, ss.min_weight_percent)
                .map_err(|e| (".slow_start".to_owned(), e.to_string())))
        });
        let dynamic = match self.dynamic_weight_min_factor {
            Some(f) => errors
                .ok(DynamicWeight::try_new(f).map_err(|e| (".dynamic_weight_min_factor".to_owned(), e.to_string())))
                .unwrap_or_default(),
            None => DynamicWeight::default(),
        };
        if let Some(cookie) = &self.sticky_cookie
            && !is_token(cookie)
        {
            errors.push(".sticky_cookie", format!("`{cookie}` is not a cookie name"));
        }
        let engine_metrics = self.engine_metrics.map(|m| {
            let interval = errors.ok(nonzero(m.interval, "engine_metrics.interval", Duration::from_millis(200)));
            let interval = interval.unwrap_or(Duration::from_millis(200));
            let stale_after =
                errors.ok(nonzero(m.stale_after, "engine_metrics.stale_after", interval * 5)).unwrap_or(interval * 5);
            for (field, path) in [("path", &m.path), ("models_path", &m.models_path)] {
                if let Some(p) = path
                    && !p.starts_with('/')
                {
                    errors.push(format!(".engine_metrics.{field}"), format!("must start with `/`, got {p:?}"));
                }
            }
            crate::EngineScrape {
                path: m.path.unwrap_or_else(|| "/metrics".to_owned()),
                interval,
                stale_after,
                models_path: m.models_path,
            }
        });
        let resilience = errors.all(
            crate::resilience::RawResilience {
                health_check: self.health_check,
                outlier_detection: self.outlier_detection,
                circuit_breaker: self.circuit_breaker,
                retry: self.retry,
                admission: self.admission,
                rate_limit: self.rate_limit,
                panic_threshold: self.panic_threshold,
            }
            .validate(),
        );
        let policy = self.policy.unwrap_or_else(|| default_policy(engine_metrics.is_some()));
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, e) in self.endpoints.into_iter().enumerate() {
            let spec = e.into_spec().map_err(|e| (format!(".endpoints[{i}].{}", e.field), e.message));
            let Some(spec) = errors.ok(spec) else { continue };
            let unknown = policy.capacity().and_then(|c| spec.labels.accelerator.as_deref().and_then(|a| c.unknown(a)));
            if let Some(problem) = unknown {
                errors.push(format!(".endpoints[{i}].labels.gpu"), problem);
            }
            endpoints.push(spec);
        }
        let discovery = self.discovery.and_then(|d| errors.ok(d.validate()));
        let tls = self.tls.and_then(|t| errors.ok(t.validate()));
        if self.protocol == Some(UpstreamProtocolRaw::H2) && engine_metrics.is_some() {
            // The scraper speaks HTTP/1.1 (model servers' /metrics do): an h2-only port
            // would never answer it.
            errors.push(".protocol", "\"h2\" pools cannot scrape engine_metrics (the scraper speaks HTTP/1.1)");
        }
        let autoscale = self.autoscale.and_then(|a| errors.all(a.validate()));
        let mut options = SelectorOptions::new(latency, slow_start, dynamic);
        if let Some(m) = &engine_metrics {
            options = options.with_engine_max_age(m.stale_after);
        }
        errors.finish(|| {
            Some(PoolConfig {
                name: name.to_owned(),
                policy,
                options,
                endpoints,
                sticky_cookie: self.sticky_cookie,
                timeouts,
                max_idle_per_endpoint: self.max_idle_per_endpoint.unwrap_or(64),
                resilience: resilience?,
                engine_metrics,
                autoscale,
                discovery,
                tls,
                protocol: match self.protocol {
                    Some(UpstreamProtocolRaw::H2) => crate::UpstreamProtocol::H2,
                    _ => crate::UpstreamProtocol::Http1,
                },
            })
        })
    }
}

impl RawUpstreamTls {
    pub(crate) fn validate(self) -> Result<crate::UpstreamTls, FieldError> {
        let client_cert = match (self.cert, self.key) {
            (Some(cert), Some(key)) => Some(crate::CertificateFiles { cert, key }),
            (Some(_), None) => return Err((".tls.key".into(), "`cert` needs its `key`".into())),
            (None, Some(_)) => return Err((".tls.cert".into(), "`key` needs its `cert`".into())),
            (None, None) => None,
        };
        let server_name = match self.server_name {
            Some(n) if rustls_name_ok(&n) => Some(n.to_ascii_lowercase()),
            Some(n) => return Err((".tls.server_name".into(), format!("`{n}` is not a DNS name or IP address"))),
            None => None,
        };
        Ok(crate::UpstreamTls { server_name, ca: self.ca, client_cert })
    }
}

/// A DNS name (letters, digits, `-`, dots between labels) or an IP address.
fn rustls_name_ok(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
