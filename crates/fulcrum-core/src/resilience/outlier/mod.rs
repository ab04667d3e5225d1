//! Passive outlier detection: eject the endpoints that fail live traffic (Envoy's semantics).
//!
//! The proxy reports each request's [`Observed`] outcome to a pool's [`OutlierDetector`]; an
//! endpoint is ejected (not routable) for a while when it looks like an outlier, as Envoy's
//! outlier detection does:
//!
//! * **consecutive 5xx** (5): 5xx answers in a row (local-origin failures count as 5xx);
//! * **consecutive gateway failures** (5): 502, 503, 504 in a row (local-origin failures
//!   count too; a 500 or a success resets the count);
//! * **consecutive local-origin failures** (5): connect failures, timeouts and resets in a
//!   row. As in Envoy it applies only with `split_local_origin_errors`, which also takes
//!   local-origin failures out of the two counts above and out of the success rate;
//! * **success rate**, evaluated every `interval` (10 s) over the endpoints that served at
//!   least `request_volume` (100) requests in the interval, when at least `minimum_hosts` (5)
//!   did: an endpoint whose success rate is below `mean - stdev_factor / 1000 x stdev`
//!   (population standard deviation; Envoy's factor 1900 means 1.9) is ejected, worst first.
//!
//! An ejection lasts `base_ejection_time x n` (30 s x n), capped at `max_ejection_time` (300 s),
//! where n counts the endpoint's recent ejections: it grows by one at each ejection and
//! shrinks by one at each evaluation the endpoint went through without being ejected. The
//! endpoint returns at [`OutlierDetector::tick`] once its time is up, with fresh counters.
//! Consecutive counts are checked with `>=`, not Envoy's `==`: an ejection refused by the
//! cap happens at the next failure once there is room.
//!
//! **The ejection cap**, exactly: with `n` endpoints at most
//! `floor(n x max_ejection_percent / 100)` are ejected at once; when `always_eject_one`
//! (the default) and `max_ejection_percent > 0`, that cap is raised to 1 when it would be
//! 0, so that small pools (2 to 9 GPUs at 10%) can still eject one bad endpoint. Envoy
//! enforces the percentage strictly since 1.31 and restores the older at-least-one behaviour
//! with `always_eject_one_host`; gRPC allows one ejection past the cap. A cap is never
//! exceeded by new ejections; removing endpoints (see below) never un-ejects the others, so
//! after a pool shrinks the count may sit above the new cap until ejections end.
//!
//! **Panic mode**: a [`PanicThreshold`] (50%) says when so few endpoints are routable that the
//! pool should ignore health and ejections and spread over every endpoint (Envoy's
//! `healthy_panic_threshold`).
//!
//! **Changing pools**: the detector is indexed like the pool's endpoint list (the order of
//! [`Selector::endpoints`](crate::Selector::endpoints)) and keyed by [`EndpointId`]:
//! [`OutlierDetector::set_endpoints`] takes the new list after a rebuild; endpoints that stay
//! keep their counters and ejections, new ones start clean, removed ones are forgotten.
//!
//! Cost: O(1) a recorded outcome; O(n log n) an evaluation every `interval`; O(n) a tick.
//! Left out: Envoy's `enforcing_*` percentages (every detection is enforced), the failure
//! percentage detector, the local-origin success rate, and ejection-time jitter.
//!
//! ```
//! use fulcrum_core::{EndpointId, Instant};
//! use fulcrum_core::resilience::Observed;
//! use fulcrum_core::resilience::outlier::{OutlierConfig, OutlierDetector, PanicThreshold};
//!
//! let ids: Vec<EndpointId> = (0..4).map(|i| EndpointId::from(format!("gpu-{i}"))).collect();
//! let mut pool = OutlierDetector::new(&OutlierConfig::default(), &ids, Instant::ZERO);
//! for _ in 0..4 {
//!     assert!(pool.record(2, Observed::Status(503), Instant::ZERO).is_none());
//! }
//! let ejection = pool.record(2, Observed::ConnectFailure, Instant::ZERO).unwrap();
//! assert_eq!(ejection.until, Instant::from_millis(30_000));
//! assert!(pool.is_ejected(2));
//! // 3 of 4 routable: no panic at 50%.
//! assert!(!PanicThreshold::default().is_panic(3, 4));
//! let events = pool.tick(Instant::from_millis(30_000));
//! assert!(!pool.is_ejected(2) && events.len() == 1);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::{Check, ConfigError, Observed};
use crate::endpoint::EndpointId;
use crate::time::Instant;

const SECTION: Check = Check { section: "outlier_detection" };

/// Success-rate detection settings, with Envoy's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SuccessRateSettings {
    /// Endpoints with enough requests needed for an evaluation (5).
    pub minimum_hosts: u32,
    /// Requests an endpoint needs in an interval to be evaluated (100).
    pub request_volume: u32,
    /// Ejection below `mean - stdev_factor / 1000 x stdev` (1900).
    pub stdev_factor: u32,
}

impl Default for SuccessRateSettings {
    fn default() -> Self {
        SuccessRateSettings { minimum_hosts: 5, request_volume: 100, stdev_factor: 1900 }
    }
}

/// Outlier-detection settings as written, with the documented defaults. A detection set to
/// `None` is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// 5xx in a row before an ejection (5).
    pub consecutive_5xx: Option<u32>,
    /// 502/503/504 in a row before an ejection (5).
    pub consecutive_gateway_failure: Option<u32>,
    /// Local-origin failures in a row before an ejection (5); only with
    /// `split_local_origin_errors`.
    pub consecutive_local_origin_failure: Option<u32>,
    /// Count local-origin failures apart from answers (false).
    pub split_local_origin_errors: bool,
    /// Success-rate detection (on, with Envoy's defaults).
    pub success_rate: Option<SuccessRateSettings>,
    /// Time between success-rate evaluations (10 s).
    pub interval: Duration,
    /// First ejection's length, multiplied by the recent ejection count (30 s).
    pub base_ejection_time: Duration,
    /// Longest ejection (300 s).
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent of the pool (10).
    pub max_ejection_percent: u32,
    /// Allow one ejection even when the percentage rounds down to none (true).
    pub always_eject_one: bool,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: Some(5),
            consecutive_local_origin_failure: Some(5),
            split_local_origin_errors: false,
            success_rate: Some(SuccessRateSettings::default()),
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one: true,
        }
    }
}

/// Validated outlier-detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OutlierConfig {
    s: OutlierSettings,
}

// === impl OutlierConfig ===

impl OutlierConfig {
    /// Checks the settings: thresholds at least 1, durations longer than zero,
    /// `max_ejection_time >= base_ejection_time`, `max_ejection_percent <= 100`.
    pub fn try_new(s: OutlierSettings) -> Result<Self, ConfigError> {
        let on = |field, v: Option<u32>| match v {
            Some(0) => Err(SECTION.err(field, "must be at least 1 (leave it out to turn the detection off)")),
            _ => Ok(()),
        };
        on("consecutive_5xx", s.consecutive_5xx)?;
        on("consecutive_gateway_failure", s.consecutive_gateway_failure)?;
        on("consecutive_local_origin_failure", s.consecutive_local_origin_failure)?;
        if let Some(sr) = s.success_rate {
            SECTION.positive("success_rate_minimum_hosts", sr.minimum_hosts)?;
            SECTION.positive("success_rate_request_volume", sr.request_volume)?;
        }
        SECTION.nonzero_duration("interval", s.interval)?;
        SECTION.nonzero_duration("base_ejection_time", s.base_ejection_time)?;
        if s.max_ejection_time < s.base_ejection_time {
            return Err(SECTION.err(
                "max_ejection_time",
                format!(
                    "must be at least base_ejection_time ({:?}), got {:?}",
                    s.base_ejection_time, s.max_ejection_time
                ),
            ));
        }
        SECTION.percent("max_ejection_percent", s.max_ejection_percent)?;
        Ok(OutlierConfig { s })
    }

    /// The settings.
    pub fn settings(&self) -> &OutlierSettings {
        &self.s
    }

    /// Most endpoints that may be ejected at once in a pool of `n` (see the module doc).
    pub fn max_ejections(&self, n: usize) -> usize {
        let pct = self.s.max_ejection_percent as usize;
        let cap = n.saturating_mul(pct) / 100;
        if cap == 0 && self.s.always_eject_one && pct > 0 && n > 0 { 1 } else { cap }
    }

    fn ejection_time(&self, ejections: u32) -> Duration {
        self.s.base_ejection_time.saturating_mul(ejections.max(1)).min(self.s.max_ejection_time)
    }
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EjectionReason {
    /// 5xx answers (or local-origin failures) in a row.
    Consecutive5xx {
        /// How many.
        count: u32,
    },
    /// 502/503/504 answers (or local-origin failures) in a row.
    ConsecutiveGatewayFailure {
        /// How many.
        count: u32,
    },
    /// Connect failures, timeouts and resets in a row.
    ConsecutiveLocalOriginFailure {
        /// How many.
        count: u32,
    },
    /// Success rate below the pool's threshold in the last interval.
    SuccessRate {
        /// The endpoint's success rate, in percent.
        rate: f64,
        /// The threshold, in percent.
        threshold: f64,
    },
}

impl fmt::Display for EjectionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EjectionReason::Consecutive5xx { count } => write!(f, "{count} consecutive 5xx"),
            EjectionReason::ConsecutiveGatewayFailure { count } => write!(f, "{count} consecutive gateway failures"),
            EjectionReason::ConsecutiveLocalOriginFailure { count } => {
                write!(f, "{count} consecutive connect failures, timeouts or resets")
            }
            EjectionReason::SuccessRate { rate, threshold } => {
                write!(f, "success rate {rate:.1}% below the pool's threshold {threshold:.1}%")
            }
        }
    }
}

/// An endpoint was ejected.
#[derive(Clone, Debug, PartialEq)]
pub struct Ejection {
    /// Its index in the pool.
    pub index: usize,
    /// Its id.
    pub id: EndpointId,
    /// Why.
    pub reason: EjectionReason,
    /// When it returns (at the first [`OutlierDetector::tick`] at or after this).
    pub until: Instant,
    /// Its recent ejection count, the multiplier of the ejection time.
    pub ejections: u32,
}

/// What an [`OutlierDetector::tick`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum OutlierEvent {
    /// An endpoint was ejected by the success-rate evaluation.
    Ejected(Ejection),
    /// An ejected endpoint's time was up: it is routable again.
    Returned {
        /// Its index.
        index: usize,
        /// Its id.
        id: EndpointId,
    },
}

#[derive(Clone, Debug)]
struct Host {
    id: EndpointId,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Requests and failures in the current interval, for the success rate.
    requests: u64,
    failures: u64,
    ejected_until: Option<Instant>,
    /// Recent ejections: the ejection-time multiplier.
    ejections: u32,
    /// Ejected at some point since the last evaluation.
    ejected_lately: bool,
}

impl Host {
    fn new(id: EndpointId) -> Self {
        Host {
            id,
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            consecutive_local: 0,
            requests: 0,
            failures: 0,
            ejected_until: None,
            ejections: 0,
            ejected_lately: false,
        }
    }

    fn reset_counts(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }
}

/// Passive outlier detection over one pool.
#[derive(Clone, Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    hosts: Vec<Host>,
    index: HashMap<EndpointId, usize>,
    ejected: usize,
    next_evaluation: Instant,
}

// === impl OutlierDetector ===

impl OutlierDetector {
    /// A detector over the endpoints `ids` (distinct, in the pool's order); the first
    /// success-rate evaluation is due at `now + interval`.
    pub fn new(config: &OutlierConfig, ids: &[EndpointId], now: Instant) -> Self {
        let mut d = OutlierDetector {
            config: *config,
            hosts: Vec::new(),
            index: HashMap::new(),
            ejected: 0,
            next_evaluation: now + config.s.interval,
        };
        d.set_endpoints(ids);
        d
    }

    /// Takes a new endpoint list (after the pool changed): endpoints that stay keep their
    /// state at their new index, new ones start clean, removed ones are forgotten.
    pub fn set_endpoints(&mut self, ids: &[EndpointId]) {
        let mut old: HashMap<EndpointId, Host> = self.hosts.drain(..).map(|h| (h.id.clone(), h)).collect();
        self.hosts = ids.iter().map(|id| old.remove(id).unwrap_or_else(|| Host::new(id.clone()))).collect();
        self.index = self.hosts.iter().enumerate().map(|(i, h)| (h.id.clone(), i)).collect();
        self.ejected = self.hosts.iter().filter(|h| h.ejected_until.is_some()).count();
    }

    /// Applies new settings; counters and ejections stay.
    pub fn reconfigure(&mut self, config: &OutlierConfig) {
        self.config = *config;
    }

    /// The settings.
    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// Endpoints in the pool.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The index of an endpoint.
    pub fn index_of(&self, id: &EndpointId) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Whether the endpoint at `index` is ejected (false for an index out of range).
    pub fn is_ejected(&self, index: usize) -> bool {
        self.hosts.get(index).is_some_and(|h| h.ejected_until.is_some())
    }

    /// When the endpoint's ejection ends, if it is ejected.
    pub fn ejected_until(&self, index: usize) -> Option<Instant> {
        self.hosts.get(index).and_then(|h| h.ejected_until)
    }

    /// The endpoint's recent ejection count (the multiplier of its next ejection time, less one).
    pub fn ejections(&self, index: usize) -> u32 {
        self.hosts.get(index).map_or(0, |h| h.ejections)
    }

    /// Endpoints ejected now.
    pub fn ejected_count(&self) -> usize {
        self.ejected
    }

    /// Most endpoints that may be ejected at once in this pool.
    pub fn max_ejections(&self) -> usize {
        self.config.max_ejections(self.hosts.len())
    }

    /// When [`tick`](Self::tick) should run next: the next evaluation or the first return.
    pub fn next_deadline(&self) -> Instant {
        self.hosts.iter().filter_map(|h| h.ejected_until).fold(self.next_evaluation, Instant::min)
    }

    /// Records one outcome of the endpoint at `index`; returns the ejection it caused, if any.
    /// An index out of range is ignored.
    pub fn record(&mut self, index: usize, observed: Observed, now: Instant) -> Option<Ejection> {
        let split = self.config.s.split_local_origin_errors;
        let h = self.hosts.get_mut(index)?;
        let local = observed.is_local_origin();
        if local {
            h.consecutive_local = h.consecutive_local.saturating_add(1);
        } else {
            h.consecutive_local = 0;
        }
        if !(local && split) {
            h.requests += 1;
            if observed.is_server_error() {
                h.failures += 1;
                h.consecutive_5xx = h.consecutive_5xx.saturating_add(1);
            } else {
                h.consecutive_5xx = 0;
            }
            if observed.is_gateway_failure() {
                h.consecutive_gateway = h.consecutive_gateway.saturating_add(1);
            } else {
                h.consecutive_gateway = 0;
            }
        }
        if h.ejected_until.is_some() {
            return None;
        }
        let s = &self.config.s;
        let reached = |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| count >= t);
        let reason = if reached(h.consecutive_5xx, s.consecutive_5xx) {
            EjectionReason::Consecutive5xx { count: h.consecutive_5xx }
        } else if reached(h.consecutive_gateway, s.consecutive_gateway_failure) {
            EjectionReason::ConsecutiveGatewayFailure { count: h.consecutive_gateway }
        } else if split && reached(h.consecutive_local, s.consecutive_local_origin_failure) {
            EjectionReason::ConsecutiveLocalOriginFailure { count: h.consecutive_local }
        } else {
            return None;
        };
        self.eject(index, reason, now)
    }

    /// Ejects the endpoint at `index` if the cap allows.
    fn eject(&mut self, index: usize, reason: EjectionReason, now: Instant) -> Option<Ejection> {
        if self.ejected >= self.max_ejections() {
            return None;
        }
        let config = self.config;
        let h = &mut self.hosts[index];
        h.ejections = h.ejections.saturating_add(1);
        let until = now + config.ejection_time(h.ejections);
        h.ejected_until = Some(until);
        h.ejected_lately = true;
        h.reset_counts();
        self.ejected += 1;
        Some(Ejection { index, id: h.id.clone(), reason, until, ejections: h.ejections })
    }

    /// Returns the endpoints whose ejection is over and, when an interval has passed, runs
    /// the success-rate evaluation. Call it at [`next_deadline`](Self::next_deadline).
    pub fn tick(&mut self, now: Instant) -> Vec<OutlierEvent> {
        let mut events = Vec::new();
        for (index, h) in self.hosts.iter_mut().enumerate() {
            if h.ejected_until.is_some_and(|until| until <= now) {
                h.ejected_until = None;
                h.reset_counts();
                self.ejected -= 1;
                events.push(OutlierEvent::Returned { index, id: h.id.clone() });
            }
        }
        if now >= self.next_evaluation {
            self.evaluate(now, &mut events);
            self.next_evaluation = now + self.config.s.interval;
        }
        events
    }

    /// Returns an ejected endpoint to rotation at once, as Envoy does when an active health
    /// check succeeds (`successful_active_health_check_uneject_host`): the health check has
    /// better evidence than the passive detector's timer. Returns whether it was ejected.
    pub fn uneject(&mut self, index: usize) -> bool {
        match self.hosts.get_mut(index) {
            Some(h) if h.ejected_until.is_some() => {
                h.ejected_until = None;
                h.reset_counts();
                self.ejected -= 1;
                true
            }
            _ => false,
        }
    }

    fn evaluate(&mut self, now: Instant, events: &mut Vec<OutlierEvent>) {
        for h in &mut self.hosts {
            if h.ejected_until.is_none() && !h.ejected_lately {
                h.ejections = h.ejections.saturating_sub(1);
            }
            h.ejected_lately = false;
        }
        if let Some(sr) = self.config.s.success_rate {
            let rates: Vec<(usize, f64)> = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| h.ejected_until.is_none() && h.requests >= u64::from(sr.request_volume))
                .map(|(i, h)| (i, 100.0 * (h.requests - h.failures) as f64 / h.requests as f64))
                .collect();
            if !rates.is_empty() && rates.len() >= sr.minimum_hosts as usize {
                let n = rates.len() as f64;
                let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
                let stdev = (rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n).sqrt();
                let threshold = mean - f64::from(sr.stdev_factor) / 1000.0 * stdev;
                let mut outliers: Vec<(usize, f64)> = rates.into_iter().filter(|r| r.1 < threshold).collect();
                outliers.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                for (index, rate) in outliers {
                    match self.eject(index, EjectionReason::SuccessRate { rate, threshold }, now) {
                        Some(e) => events.push(OutlierEvent::Ejected(e)),
                        None => break,
                    }
                }
            }
        }
        for h in &mut self.hosts {
            h.requests = 0;
            h.failures = 0;
        }
    }
}

/// When so few endpoints are routable that a pool ignores health and ejections (Envoy's
/// panic mode): below `percent` of the pool routable (50% by default; 0 turns it off).
///
/// In panic the pool spreads over every endpoint, healthy or not: a pool that has lost most
/// of its endpoints at once more likely has a broken health signal than a broken fleet, and
/// concentrating all traffic on the few left would overload them too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanicThreshold {
    percent: f64,
}

// === impl PanicThreshold ===

impl Default for PanicThreshold {
    fn default() -> Self {
        PanicThreshold { percent: 50.0 }
    }
}

impl PanicThreshold {
    /// A threshold of `percent` (0 to 100).
    pub fn try_new(percent: f64) -> Result<Self, ConfigError> {
        if !(percent.is_finite() && (0.0..=100.0).contains(&percent)) {
            return Err(ConfigError::new(
                "pool",
                "panic_threshold",
                format!("must be between 0 and 100, got {percent}"),
            ));
        }
        Ok(PanicThreshold { percent })
    }

    /// The threshold in percent.
    pub fn percent(&self) -> f64 {
        self.percent
    }

    /// Whether a pool of `total` endpoints of which `routable` are routable is in panic:
    /// `routable / total < percent / 100`. Never for an empty pool.
    pub fn is_panic(&self, routable: usize, total: usize) -> bool {
        total > 0 && (routable as f64) * 100.0 < self.percent * total as f64
    }
}

#[cfg(test)]
mod tests;
