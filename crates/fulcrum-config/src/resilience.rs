//! The failure-handling tables of a pool: `health_check`, `outlier_detection`,
//! `circuit_breaker`, `retry`, `admission`, `rate_limit`, and `panic_threshold`.
//!
//! Each raw table maps onto the core's settings with the core's defaults for what it leaves
//! out; the core validates, and its errors are renamed to the file's spelling
//! (`pool.NAME.retry.budget_percent`).

use fulcrum_core::resilience::ConfigError as CoreError;
use fulcrum_core::resilience::admission::{AdmissionConfig, AdmissionSettings, RateLimitConfig, RateLimitSettings};
use fulcrum_core::resilience::breaker::{BreakerConfig, BreakerSettings, LimitSettings, Limits};
use fulcrum_core::resilience::health::{HealthConfig, HealthSettings};
use fulcrum_core::resilience::outlier::{OutlierConfig, OutlierSettings, PanicThreshold, SuccessRateSettings};
use fulcrum_core::resilience::retry::{BudgetConfig, BudgetSettings, RetryPolicy, RetrySettings};
use serde::Deserialize;

use crate::is_token;
use crate::raw::DurationStr;

/// How an active health check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET path`; healthy when the status is listed (any 2xx when the list is empty).
    Http {
        /// The path probed.
        path: String,
        /// Statuses that count as healthy.
        expected_statuses: Vec<u16>,
    },
    /// A TCP connect.
    Tcp,
}

/// Active health checking of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    /// How to probe.
    pub kind: CheckKind,
    /// Intervals, timeout, thresholds.
    pub config: HealthConfig,
}

/// Where a rate limit takes its client key from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// The client's IP address.
    ClientIp,
    /// A header such as an API key (lowercase name).
    Header(String),
}

/// A per-client rate limit.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    /// The client key.
    pub key: RateKey,
    /// Rate, burst, key cap.
    pub config: RateLimitConfig,
}

/// Admission control of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    /// In flight, queue, timeout.
    pub config: AdmissionConfig,
    /// A header whose value (0 to 255) is the request's priority class; higher leaves the
    /// queue first. Absent or unparsable: class 0.
    pub priority_header: Option<String>,
    /// The highest class a client of an untrusted listener may claim (0 by default: only
    /// listeners with `trust_priority = true` raise a request's class).
    pub untrusted_priority: u8,
}

/// Everything a pool does about failures and overload.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolResilience {
    /// Active health checks; none unless configured.
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection (on by default, Envoy's defaults).
    pub outlier: Option<OutlierConfig>,
    /// Below this share of routable endpoints, traffic spreads over all of them.
    pub panic_threshold: PanicThreshold,
    /// Per-endpoint circuit breaker (on by default).
    pub breaker: Option<BreakerConfig>,
    /// Per-endpoint concurrency limits.
    pub limits: Limits,
    /// When and how to retry.
    pub retry: RetryPolicy,
    /// How many retries the pool may add.
    pub budget: BudgetConfig,
    /// Admission control; none unless configured.
    pub admission: Option<Admission>,
    /// A per-client rate limit; none unless configured.
    pub rate_limit: Option<RateLimit>,
}

impl Default for PoolResilience {
    fn default() -> Self {
        PoolResilience {
            health_check: None,
            outlier: Some(OutlierConfig::default()),
            panic_threshold: PanicThreshold::default(),
            breaker: Some(BreakerConfig::default()),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            budget: BudgetConfig::default(),
            admission: None,
            rate_limit: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    kind: Option<String>,
    path: Option<String>,
    #[serde(default)]
    expected_statuses: Vec<u16>,
    interval: Option<DurationStr>,
    unhealthy_interval: Option<DurationStr>,
    timeout: Option<DurationStr>,
    rise: Option<u32>,
    fall: Option<u32>,
    jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlier {
    enabled: Option<bool>,
    consecutive_5xx: Option<u32>,
    consecutive_gateway_failure: Option<u32>,
    consecutive_local_origin_failure: Option<u32>,
    success_rate: Option<bool>,
    success_rate_minimum_hosts: Option<u32>,
    success_rate_request_volume: Option<u32>,
    success_rate_stdev_factor: Option<u32>,
    interval: Option<DurationStr>,
    base_ejection_time: Option<DurationStr>,
    max_ejection_time: Option<DurationStr>,
    max_ejection_percent: Option<u32>,
    always_eject_one: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    enabled: Option<bool>,
    consecutive_failures: Option<u32>,
    failure_rate_percent: Option<u32>,
    minimum_requests: Option<u32>,
    window: Option<DurationStr>,
    open_time: Option<DurationStr>,
    backoff_factor: Option<f64>,
    max_open_time: Option<DurationStr>,
    probes: Option<u32>,
    probe_timeout: Option<DurationStr>,
    max_connections: Option<u32>,
    max_pending: Option<u32>,
    max_requests: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    max_attempts: Option<u32>,
    retryable_statuses: Option<Vec<u16>>,
    on_connect_failure: Option<bool>,
    on_reset: Option<bool>,
    on_timeout: Option<bool>,
    inference_500_once: Option<bool>,
    per_try_timeout: Option<DurationStr>,
    backoff_base: Option<DurationStr>,
    backoff_max: Option<DurationStr>,
    budget_percent: Option<f64>,
    budget_min_per_sec: Option<u32>,
    budget_ttl: Option<DurationStr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmission {
    max_in_flight: Option<u32>,
    max_queue: Option<u32>,
    queue_timeout: Option<DurationStr>,
    priority_header: Option<String>,
    untrusted_priority: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    key: Option<String>,
    rate: Option<f64>,
    burst: Option<u32>,
    max_keys: Option<usize>,
}

/// The raw tables of one pool.
#[derive(Debug, Default)]
pub(crate) struct RawResilience {
    pub health_check: Option<RawHealthCheck>,
    pub outlier_detection: Option<RawOutlier>,
    pub circuit_breaker: Option<RawBreaker>,
    pub retry: Option<RawRetry>,
    pub admission: Option<RawAdmission>,
    pub rate_limit: Option<RawRateLimit>,
    pub panic_threshold: Option<f64>,
}

use crate::raw::FieldError;

/// The core's error, spelled as the file spells it (a sub-field of the pool).
fn rename(e: CoreError) -> FieldError {
    let (table, field) = match (e.section, e.field) {
        ("retry_budget", "percent") => ("retry", "budget_percent"),
        ("retry_budget", "ttl") => ("retry", "budget_ttl"),
        ("retry_budget", f) => ("retry", f),
        ("limits", f) => ("circuit_breaker", f),
        ("pool", f) => return (format!(".{f}"), e.problem),
        (s, f) => (s, f),
    };
    (format!(".{table}.{field}"), e.problem)
}

fn d(v: Option<DurationStr>, default: std::time::Duration) -> std::time::Duration {
    v.map_or(default, |d| d.0)
}

impl RawResilience {
    /// Each table is checked on its own: every table at fault reports.
    pub(crate) fn validate(self) -> Result<PoolResilience, Vec<FieldError>> {
        let mut errors = crate::raw::FieldErrors::default();
        let health_check = self.health_check.map(health_check).map(|h| errors.ok(h));
        let outlier = errors.ok(outlier(self.outlier_detection.unwrap_or_default()));
        let panic_threshold = match self.panic_threshold {
            Some(p) => errors.ok(PanicThreshold::try_new(p).map_err(rename)),
            None => Some(PanicThreshold::default()),
        };
        let breaker = errors.ok(breaker(self.circuit_breaker.unwrap_or_default()));
        let retry = errors.ok(retry(self.retry.unwrap_or_default()));
        let admission = self.admission.map(admission).map(|a| errors.ok(a));
        let rate_limit = self.rate_limit.map(rate_limit).map(|r| errors.ok(r));
        errors.finish(|| {
            let ((limits, breaker), (retry, budget)) = (breaker?, retry?);
            Some(PoolResilience {
                health_check: health_check.map(|h| h.ok_or(())).transpose().ok()?,
                outlier: outlier?,
                panic_threshold: panic_threshold?,
                breaker,
                limits,
                retry,
                budget,
                admission: admission.map(|a| a.ok_or(())).transpose().ok()?,
                rate_limit: rate_limit.map(|r| r.ok_or(())).transpose().ok()?,
            })
        })
    }
}

fn health_check(h: RawHealthCheck) -> Result<HealthCheck, FieldError> {
    let defaults = HealthSettings::default();
    let settings = HealthSettings {
        interval: d(h.interval, defaults.interval),
        unhealthy_interval: h.unhealthy_interval.map(|d| d.0),
        timeout: d(h.timeout, defaults.timeout),
        rise: h.rise.unwrap_or(defaults.rise),
        fall: h.fall.unwrap_or(defaults.fall),
        jitter: h.jitter.unwrap_or(defaults.jitter),
    };
    let config = HealthConfig::try_new(settings).map_err(rename)?;
    let kind = match h.kind.as_deref().unwrap_or("http") {
        "http" => {
            let path = h.path.unwrap_or_else(|| "/health".to_owned());
            if !path.starts_with('/') {
                return Err((".health_check.path".into(), format!("must start with `/`, got {path:?}")));
            }
            if let Some(s) = h.expected_statuses.iter().find(|s| !(100..=599).contains(*s)) {
                return Err((".health_check.expected_statuses".into(), format!("{s} is not an HTTP status")));
            }
            CheckKind::Http { path, expected_statuses: h.expected_statuses }
        }
        "tcp" => CheckKind::Tcp,
        other => {
            return Err((".health_check.kind".into(), format!("must be \"http\" or \"tcp\", got {other:?}")));
        }
    };
    Ok(HealthCheck { kind, config })
}

fn outlier(o: RawOutlier) -> Result<Option<OutlierConfig>, FieldError> {
    if o.enabled == Some(false) {
        return Ok(None);
    }
    let defaults = OutlierSettings::default();
    let sr_defaults = SuccessRateSettings::default();
    let settings = OutlierSettings {
        consecutive_5xx: o.consecutive_5xx.or(defaults.consecutive_5xx),
        consecutive_gateway_failure: o.consecutive_gateway_failure.or(defaults.consecutive_gateway_failure),
        consecutive_local_origin_failure: o
            .consecutive_local_origin_failure
            .or(defaults.consecutive_local_origin_failure),
        split_local_origin_errors: defaults.split_local_origin_errors,
        success_rate: if o.success_rate == Some(false) {
            None
        } else {
            Some(SuccessRateSettings {
                minimum_hosts: o.success_rate_minimum_hosts.unwrap_or(sr_defaults.minimum_hosts),
                request_volume: o.success_rate_request_volume.unwrap_or(sr_defaults.request_volume),
                stdev_factor: o.success_rate_stdev_factor.unwrap_or(sr_defaults.stdev_factor),
            })
        },
        interval: d(o.interval, defaults.interval),
        base_ejection_time: d(o.base_ejection_time, defaults.base_ejection_time),
        max_ejection_time: d(o.max_ejection_time, defaults.max_ejection_time),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(defaults.max_ejection_percent),
        always_eject_one: o.always_eject_one.unwrap_or(defaults.always_eject_one),
    };
    OutlierConfig::try_new(settings).map(Some).map_err(rename)
}

fn breaker(b: RawBreaker) -> Result<(Limits, Option<BreakerConfig>), FieldError> {
    if b.max_pending.is_some() {
        return Err((
            ".circuit_breaker.max_pending".into(),
            "is not supported: the proxy opens a connection rather than queueing requests per endpoint; \
             bound queueing with admission = { max_in_flight, max_queue } instead"
                .into(),
        ));
    }
    let limit_defaults = LimitSettings::default();
    let limits = Limits::try_new(LimitSettings {
        max_connections: b.max_connections.or(limit_defaults.max_connections),
        max_pending: b.max_pending.or(limit_defaults.max_pending),
        max_requests: b.max_requests.or(limit_defaults.max_requests),
    })
    .map_err(rename)?;
    if b.enabled == Some(false) {
        return Ok((limits, None));
    }
    let defaults = BreakerSettings::default();
    let settings = BreakerSettings {
        consecutive_failures: b.consecutive_failures.or(defaults.consecutive_failures),
        failure_rate_percent: b.failure_rate_percent.or(defaults.failure_rate_percent),
        minimum_requests: b.minimum_requests.unwrap_or(defaults.minimum_requests),
        window: d(b.window, defaults.window),
        buckets: defaults.buckets,
        open_time: d(b.open_time, defaults.open_time),
        backoff_factor: b.backoff_factor.unwrap_or(defaults.backoff_factor),
        max_open_time: d(b.max_open_time, defaults.max_open_time),
        probes: b.probes.unwrap_or(defaults.probes),
        probe_timeout: d(b.probe_timeout, defaults.probe_timeout),
    };
    Ok((limits, Some(BreakerConfig::try_new(settings).map_err(rename)?)))
}

fn retry(r: RawRetry) -> Result<(RetryPolicy, BudgetConfig), FieldError> {
    let defaults = RetrySettings::default();
    let retry = RetryPolicy::try_new(RetrySettings {
        max_attempts: r.max_attempts.unwrap_or(defaults.max_attempts),
        retryable_statuses: r.retryable_statuses.unwrap_or(defaults.retryable_statuses),
        on_connect_failure: r.on_connect_failure.unwrap_or(defaults.on_connect_failure),
        on_reset: r.on_reset.unwrap_or(defaults.on_reset),
        on_timeout: r.on_timeout.unwrap_or(defaults.on_timeout),
        inference_500_once: r.inference_500_once.unwrap_or(defaults.inference_500_once),
        per_try_timeout: r.per_try_timeout.map(|d| d.0),
        first_byte_timeout: None,
        backoff_base: d(r.backoff_base, defaults.backoff_base),
        backoff_max: d(r.backoff_max, defaults.backoff_max),
    })
    .map_err(rename)?;
    let bd = BudgetSettings::default();
    let budget = BudgetConfig::try_new(BudgetSettings {
        percent: r.budget_percent.unwrap_or(bd.percent),
        min_retries_per_sec: r.budget_min_per_sec.unwrap_or(bd.min_retries_per_sec),
        ttl: d(r.budget_ttl, bd.ttl),
    })
    .map_err(rename)?;
    Ok((retry, budget))
}

fn admission(a: RawAdmission) -> Result<Admission, FieldError> {
    let defaults = AdmissionSettings::default();
    let config = AdmissionConfig::try_new(AdmissionSettings {
        max_in_flight: a.max_in_flight.unwrap_or(defaults.max_in_flight),
        max_queue: a.max_queue.unwrap_or(defaults.max_queue),
        queue_timeout: d(a.queue_timeout, defaults.queue_timeout),
    })
    .map_err(rename)?;
    if let Some(h) = &a.priority_header
        && !is_token(h)
    {
        return Err((".admission.priority_header".into(), format!("`{h}` is not a header name")));
    }
    Ok(Admission {
        config,
        priority_header: a.priority_header.map(|h| h.to_ascii_lowercase()),
        untrusted_priority: a.untrusted_priority.unwrap_or(0),
    })
}

fn rate_limit(rl: RawRateLimit) -> Result<RateLimit, FieldError> {
    let key = match rl.key.as_deref().unwrap_or("client_ip") {
        "client_ip" => RateKey::ClientIp,
        k => match k.strip_prefix("header:") {
            Some(name) if is_token(name) => RateKey::Header(name.to_ascii_lowercase()),
            _ => {
                return Err((".rate_limit.key".into(), format!("must be \"client_ip\" or \"header:NAME\", got {k:?}")));
            }
        },
    };
    let defaults = RateLimitSettings::default();
    let config = RateLimitConfig::try_new(RateLimitSettings {
        rate: rl.rate.unwrap_or(defaults.rate),
        burst: rl.burst.unwrap_or(defaults.burst),
        max_keys: rl.max_keys.unwrap_or(defaults.max_keys),
    })
    .map_err(rename)?;
    Ok(RateLimit { key, config })
}
