//! Target tracking, as Kubernetes' HorizontalPodAutoscaler (autoscaling/v2) does it.
//!
//! For each metric with a target, the proposal is `ceil(current x value / target)`, unless the
//! ratio `value / target` is within the tolerance of 1 (0.1), in which case it is the current
//! count. The largest proposal of all metrics wins; when a metric is missing and the others
//! propose a scale-down, the count holds (a metric that cannot be read might be the one that
//! needs the replicas). Then Kubernetes' `behavior`:
//!
//! 1. **stabilization**: a scale-down goes no lower than the highest proposal of the last
//!    `scale_down.stabilization_window` (300 s), a scale-up no higher than the lowest of the last
//!    `scale_up.stabilization_window` (0 s). Load that comes and goes does not make the fleet
//!    flap; a new policy starts with the current count in its window, so a restarted autoscaler
//!    does not scale down at once;
//! 2. **rate limits** per period: from the count at the start of each limit's period, at most
//!    `+100%` or `+4` replicas per 15 s up (the larger: `select = Max`), at most `-100%` per
//!    15 s down. The changes counted are those this policy decided.
//!
//! Finally the [`Bounds`] apply. Reads whatever its targets name (see
//! [`Metric`]). Cost: O(metrics + recommendations kept in the longest stabilization window +
//! changes in the longest period) a decision.
//!
//! Reference: Kubernetes, "Horizontal Pod Autoscaling", algorithm details and configurable
//! scaling behavior; `pkg/controller/podautoscaler/horizontal.go`.
//!
//! ```
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{
//!     Metric, MetricTarget, ScalePolicy, Signals, TargetTracking, TargetTrackingConfig, TargetTrackingSettings,
//! };
//!
//! let settings = TargetTrackingSettings::new(vec![MetricTarget { metric: Metric::InFlight, target: 8.0 }]);
//! let mut hpa = TargetTracking::new(TargetTrackingConfig::try_new(settings).unwrap());
//! let busy = Signals { replicas: 3, in_flight_per_replica: Some(16.0), ..Signals::default() };
//! assert_eq!(hpa.decide(Instant::ZERO, &busy).desired, 6);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use super::bounds::{Bounds, BoundsSettings, Floor};
use super::window::Recommendations;
use super::{Check, ConfigError, Decision, ScalePolicy, Signals, ceil_count};
use crate::time::Instant;

const SECTION: Check = Check { section: "target_tracking" };

/// The longest stabilization window Kubernetes accepts.
const MAX_WINDOW: Duration = Duration::from_secs(3_600);
/// The longest rate-limit period Kubernetes accepts.
const MAX_PERIOD: Duration = Duration::from_secs(1_800);

/// A metric target tracking can follow, as a value per replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `in_flight_per_replica`.
    InFlight,
    /// `request_rate / replicas`: requests a second per replica.
    RequestRate,
    /// `queue_length / replicas`: requests waiting per replica.
    QueueLength,
    /// `kv_cache_use`, a fraction.
    KvCacheUse,
    /// `p95_latency`, in seconds (a pool-wide value, as Kubernetes' `Object` metrics).
    P95Latency,
    /// `cpu_per_replica`, a fraction.
    Cpu,
    /// `memory_per_replica`, a fraction.
    Memory,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 7] = [
        Metric::InFlight,
        Metric::RequestRate,
        Metric::QueueLength,
        Metric::KvCacheUse,
        Metric::P95Latency,
        Metric::Cpu,
        Metric::Memory,
    ];

    /// The name configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::InFlight => "in_flight",
            Metric::RequestRate => "request_rate",
            Metric::QueueLength => "queue_length",
            Metric::KvCacheUse => "kv_cache_use",
            Metric::P95Latency => "p95_latency",
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
        }
    }

    /// The value compared with the target, or `None` when it is not known (or there is no
    /// replica to divide a total by).
    pub fn read(self, s: &Signals) -> Option<f64> {
        let per_replica = |total: f64| (s.replicas > 0).then(|| total / f64::from(s.replicas));
        match self {
            Metric::InFlight => Signals::clean(s.in_flight_per_replica),
            Metric::RequestRate => Signals::clean(s.request_rate).and_then(per_replica),
            Metric::QueueLength => s.queue_length.and_then(|q| per_replica(q as f64)),
            Metric::KvCacheUse => Signals::clean(s.kv_cache_use),
            Metric::P95Latency => s.p95_latency.map(|d| d.as_secs_f64()),
            Metric::Cpu => Signals::clean(s.cpu_per_replica),
            Metric::Memory => Signals::clean(s.memory_per_replica),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A metric and the value per replica to hold it at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricTarget {
    /// What to read.
    pub metric: Metric,
    /// The value to hold it at, in the metric's unit; positive.
    pub target: f64,
}

/// A limit on how fast the count may change: Kubernetes' `HPAScalingPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimit {
    /// At most this many replicas per period.
    Pods {
        /// Replicas, at least 1.
        pods: u32,
        /// The period, longer than zero, at most 30 min.
        period: Duration,
    },
    /// At most this percentage of the count at the start of the period, per period.
    Percent {
        /// Percent, at least 1 (above 100 allowed for scale-up).
        percent: u32,
        /// The period, longer than zero, at most 30 min.
        period: Duration,
    },
}

impl RateLimit {
    /// The period the limit counts over.
    pub fn period(&self) -> Duration {
        match *self {
            RateLimit::Pods { period, .. } | RateLimit::Percent { period, .. } => period,
        }
    }

    /// The count this limit allows from `start`, the count at the start of its period.
    fn allow(&self, start: i64, up: bool) -> i64 {
        match (*self, up) {
            (RateLimit::Pods { pods, .. }, true) => start + i64::from(pods),
            (RateLimit::Pods { pods, .. }, false) => start - i64::from(pods),
            (RateLimit::Percent { percent, .. }, true) => {
                (start as f64 * (1.0 + f64::from(percent) / 100.0)).ceil() as i64
            }
            (RateLimit::Percent { percent, .. }, false) => {
                (start as f64 * (1.0 - f64::from(percent) / 100.0)).max(0.0).floor() as i64
            }
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimit::Pods { pods, period } => write!(f, "{pods} replicas per {period:?}"),
            RateLimit::Percent { percent, period } => write!(f, "{percent}% per {period:?}"),
        }
    }
}

/// Which rate limit applies when there are several: Kubernetes' `selectPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Select {
    /// The one that allows the largest change (the default).
    #[default]
    Max,
    /// The one that allows the smallest change.
    Min,
    /// No change in this direction at all.
    Disabled,
}

/// The behaviour of one direction: Kubernetes' `HPAScalingRules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalingRules {
    /// Proposals of this long ago still count (at most 1 h).
    pub stabilization_window: Duration,
    /// Which of the limits applies.
    pub select: Select,
    /// The rate limits; at least one unless `select` is `Disabled`.
    pub limits: Vec<RateLimit>,
}

impl ScalingRules {
    /// Kubernetes' scale-up default: no stabilization, at most +100% or +4 replicas per 15 s,
    /// whichever is larger.
    pub fn default_scale_up() -> Self {
        let period = Duration::from_secs(15);
        ScalingRules {
            stabilization_window: Duration::ZERO,
            select: Select::Max,
            limits: vec![RateLimit::Percent { percent: 100, period }, RateLimit::Pods { pods: 4, period }],
        }
    }

    /// Kubernetes' scale-down default: a 300 s stabilization window, at most -100% per 15 s.
    pub fn default_scale_down() -> Self {
        ScalingRules {
            stabilization_window: Duration::from_secs(300),
            select: Select::Max,
            limits: vec![RateLimit::Percent { percent: 100, period: Duration::from_secs(15) }],
        }
    }

    fn validate(&self, window_field: &'static str, limits_field: &'static str) -> Result<(), ConfigError> {
        if self.stabilization_window > MAX_WINDOW {
            return Err(SECTION.err(window_field, format!("must be at most 1h, got {:?}", self.stabilization_window)));
        }
        if self.limits.is_empty() && self.select != Select::Disabled {
            return Err(SECTION.err(limits_field, "must hold at least one limit (or set select to disabled)"));
        }
        for limit in &self.limits {
            let (value, period) = match *limit {
                RateLimit::Pods { pods, period } => (pods, period),
                RateLimit::Percent { percent, period } => (percent, period),
            };
            if value == 0 {
                return Err(SECTION.err(limits_field, format!("{limit}: the value must be at least 1")));
            }
            if period.is_zero() || period > MAX_PERIOD {
                return Err(
                    SECTION.err(limits_field, format!("{limit}: the period must be longer than zero and at most 30m"))
                );
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let limits: Vec<String> = self.limits.iter().map(ToString::to_string).collect();
        format!("{} (select {:?})", limits.join(", "), self.select).to_lowercase()
    }
}

/// Target-tracking settings as written, with Kubernetes' defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetTrackingSettings {
    /// The metrics to track, at least one.
    pub targets: Vec<MetricTarget>,
    /// No change while |value / target - 1| is at most this (0.1).
    pub tolerance: f64,
    /// Scale-up behaviour ([`ScalingRules::default_scale_up`]).
    pub scale_up: ScalingRules,
    /// Scale-down behaviour ([`ScalingRules::default_scale_down`]).
    pub scale_down: ScalingRules,
    /// Replica bounds.
    pub bounds: BoundsSettings,
}

impl TargetTrackingSettings {
    /// Settings that track `targets`, with the defaults for the rest.
    pub fn new(targets: Vec<MetricTarget>) -> Self {
        TargetTrackingSettings {
            targets,
            tolerance: 0.1,
            scale_up: ScalingRules::default_scale_up(),
            scale_down: ScalingRules::default_scale_down(),
            bounds: BoundsSettings::default(),
        }
    }
}

/// Validated target-tracking settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetTrackingConfig {
    targets: Vec<MetricTarget>,
    tolerance: f64,
    scale_up: ScalingRules,
    scale_down: ScalingRules,
    bounds: Bounds,
}

impl TargetTrackingConfig {
    /// Checks the settings: at least one target, each positive and finite; a finite tolerance
    /// of at least 0; windows of at most 1 h; limits of at least 1 over periods of at most 30 min.
    pub fn try_new(s: TargetTrackingSettings) -> Result<Self, ConfigError> {
        if s.targets.is_empty() {
            return Err(SECTION.err("targets", "must name at least one metric"));
        }
        for t in &s.targets {
            if !(t.target.is_finite() && t.target > 0.0) {
                return Err(SECTION
                    .err("targets", format!("{}: the target must be a positive number, got {}", t.metric, t.target)));
            }
        }
        if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
            return Err(SECTION.err("tolerance", format!("must be a finite number of at least 0, got {}", s.tolerance)));
        }
        s.scale_up.validate("scale_up.stabilization_window", "scale_up.limits")?;
        s.scale_down.validate("scale_down.stabilization_window", "scale_down.limits")?;
        let bounds = Bounds::try_new(s.bounds)?;
        Ok(TargetTrackingConfig {
            targets: s.targets,
            tolerance: s.tolerance,
            scale_up: s.scale_up,
            scale_down: s.scale_down,
            bounds,
        })
    }

    /// The metrics tracked.
    pub fn targets(&self) -> &[MetricTarget] {
        &self.targets
    }

    /// The tolerance.
    pub fn tolerance(&self) -> f64 {
        self.tolerance
    }

    /// Scale-up behaviour.
    pub fn scale_up(&self) -> &ScalingRules {
        &self.scale_up
    }

    /// Scale-down behaviour.
    pub fn scale_down(&self) -> &ScalingRules {
        &self.scale_down
    }

    /// Replica bounds.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }
}

/// A target-tracking autoscaler for one pool.
#[derive(Clone, Debug)]
pub struct TargetTracking {
    config: TargetTrackingConfig,
    floor: Floor,
    recommendations: Recommendations,
    /// The changes decided, (when, how many: positive up, negative down), oldest first.
    changes: VecDeque<(Instant, i64)>,
}

// === impl TargetTracking ===

impl TargetTracking {
    /// A policy with no history.
    pub fn new(config: TargetTrackingConfig) -> Self {
        let floor = Floor::new(config.bounds);
        TargetTracking { config, floor, recommendations: Recommendations::default(), changes: VecDeque::new() }
    }

    /// The settings.
    pub fn config(&self) -> &TargetTrackingConfig {
        &self.config
    }

    /// The largest proposal over the metrics, and why.
    fn propose(&self, s: &Signals) -> (u32, String) {
        let current = s.replicas;
        let mut best: Option<(u32, String)> = None;
        let mut missing = Vec::new();
        for t in &self.config.targets {
            let Some(value) = t.metric.read(s) else {
                missing.push(t.metric.as_str());
                continue;
            };
            let ratio = value / t.target;
            let proposal = if (ratio - 1.0).abs() <= self.config.tolerance {
                current
            } else {
                ceil_count(ratio * f64::from(current))
            };
            if best.as_ref().is_none_or(|(p, _)| proposal > *p) {
                let why = format!("{} {value:.3} vs target {} (ratio {ratio:.2})", t.metric, t.target);
                best = Some((proposal, why));
            }
        }
        match best {
            None => (current, format!("no metric reported ({}): holding {current}", missing.join(", "))),
            Some((p, why)) if p < current && !missing.is_empty() => {
                (current, format!("{why}; {} not reported: no scale-down, holding {current}", missing.join(", ")))
            }
            Some((p, why)) if p == current => (p, format!("{why}: {p} replicas")),
            Some((p, why)) => (p, format!("{why}: {current} -> {p} replicas")),
        }
    }

    /// Replicas changed in the last `period`: (added, removed).
    fn changed_within(&self, now: Instant, period: Duration) -> (i64, i64) {
        self.changes
            .iter()
            .filter(|(t, _)| now.saturating_since(*t) < period)
            .fold((0, 0), |(up, down), &(_, c)| if c > 0 { (up + c, down) } else { (up, down - c) })
    }

    /// The farthest the count may go from `current` in one direction, per the rules.
    fn limit(&self, now: Instant, current: u32, up: bool) -> i64 {
        let rules = if up { &self.config.scale_up } else { &self.config.scale_down };
        let current = i64::from(current);
        let proposals = rules.limits.iter().map(|limit| {
            let (added, removed) = self.changed_within(now, limit.period());
            limit.allow(current - added + removed, up)
        });
        // The largest change is the highest count up, the lowest count down.
        let limit = match (rules.select, up) {
            (Select::Disabled, _) => None,
            (Select::Max, true) | (Select::Min, false) => proposals.max(),
            (Select::Max, false) | (Select::Min, true) => proposals.min(),
        };
        let limit = limit.unwrap_or(current);
        if up { limit.max(current) } else { limit.min(current) }
    }
}

impl ScalePolicy for TargetTracking {
    fn decide(&mut self, now: Instant, s: &Signals) -> Decision {
        let current = s.replicas;
        if self.recommendations.is_empty() {
            self.recommendations.seed(now, current);
        }
        let (proposal, mut reason) = self.propose(s);
        let (up_window, down_window) =
            (self.config.scale_up.stabilization_window, self.config.scale_down.stabilization_window);
        let stabilized = self.recommendations.stabilize(now, current, proposal, up_window, down_window);
        if stabilized > proposal {
            reason.push_str(&format!(
                "; held at {stabilized}, the highest recommendation of the last {down_window:?} \
                 (scale-down stabilization)"
            ));
        } else if stabilized < proposal {
            reason.push_str(&format!(
                "; held at {stabilized}, the lowest recommendation of the last {up_window:?} (scale-up stabilization)"
            ));
        }
        let mut limited = stabilized;
        if stabilized > current {
            let limit = self.limit(now, current, true);
            if i64::from(stabilized) > limit {
                limited = u32::try_from(limit).unwrap_or(u32::MAX);
                reason.push_str(&format!("; limited to {limited} by scale_up: {}", self.config.scale_up.describe()));
            }
        } else if stabilized < current {
            let limit = self.limit(now, current, false);
            if i64::from(stabilized) < limit {
                limited = u32::try_from(limit).unwrap_or(0);
                reason
                    .push_str(&format!("; limited to {limited} by scale_down: {}", self.config.scale_down.describe()));
            }
        }
        let decision = self.floor.apply(now, s, limited, reason);
        let change = i64::from(decision.desired) - i64::from(current);
        if change != 0 {
            self.changes.push_back((now, change));
        }
        let longest =
            self.config.scale_up.limits.iter().chain(&self.config.scale_down.limits).map(RateLimit::period).max();
        let longest = longest.unwrap_or(Duration::ZERO);
        while self.changes.front().is_some_and(|(t, _)| now.saturating_since(*t) >= longest) {
            self.changes.pop_front();
        }
        decision
    }

    fn bounds(&self) -> &Bounds {
        self.floor.bounds()
    }

    /// The largest `ceil(total / target)` over the targets on `in_flight` and `request_rate`
    /// (the other metrics do not follow from a rate); `None` without such a target.
    fn replicas_for_load(&self, rate: f64, in_flight: Option<f64>) -> Option<u32> {
        let counts = self.config.targets.iter().filter_map(|t| match t.metric {
            Metric::InFlight => in_flight.map(|c| ceil_count(c / t.target)),
            Metric::RequestRate => Some(ceil_count(rate / t.target)),
            _ => None,
        });
        counts.max()
    }
}

#[cfg(test)]
mod tests;
