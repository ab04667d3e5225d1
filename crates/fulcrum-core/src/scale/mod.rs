//! Elastic scaling: how many replicas a pool should have, decided in virtual time.
//!
//! Each policy is a small state machine. The autoscaler runtime (not in this crate) reads the
//! pool's load every tick as a [`LoadReading`], which a [`SignalMeter`] turns into a
//! [`Signals`] value ([`signals`]), calls [`ScalePolicy::decide`] with the time as an
//! [`Instant`], and hands the [`Decision`] (a replica count and a reason to log) to an
//! actuator; a local actuator restarts crashed replicas as [`restart`] decides. Nothing here
//! reads a clock or a metric endpoint: the simulator drives the same signals and policies in
//! virtual time.
//!
//! | policy | what it does | from | reads |
//! | --- | --- | --- | --- |
//! | [`TargetTracking`] | `ceil(current x metric / target)` per metric, the largest wins; tolerance, scale-down stabilization, rate limits per period | Kubernetes' HorizontalPodAutoscaler and its `behavior` | the metrics it is given |
//! | [`Threshold`] | `ceil(P / T) + k`: load over the load one replica handles, plus a reserve; a cooldown after each change | the seeds' capacity rule, AWS simple scaling | `request_rate`, or `in_flight_per_replica` and `queue_length` |
//! | [`Knative`] | concurrency (or rate) averaged over a 60 s stable window and a 6 s panic window; bursts double the fleet at once and never shrink it while they last | Knative's KPA | `in_flight_per_replica` and `queue_length`, or `request_rate` |
//! | [`SloPolicy`] | the fewest replicas for which the M/M/c queue meets a waiting-time SLO | Erlang C ([`queueing`]) | `request_rate` |
//!
//! Every policy ends in the same [`Bounds`]: the count stays within `min_replicas..=max_replicas`;
//! with `min_replicas = 0` a pool with no load for `scale_to_zero_after` goes to zero, and a pool
//! at zero that sees load again goes to one (the proxy holds the requests meanwhile), after
//! which the policy takes over. `Signals::replicas` is the count last asked for (Kubernetes'
//! `spec.replicas`): policies that limit their rate of change count the changes they asked for.
//!
//! Cost: a decision is O(1) for [`Threshold`] and [`Knative`] (whose windows keep one bucket a
//! second), O(recommendations in the stabilization window) for [`TargetTracking`], and O(c) for
//! [`SloPolicy`], c the replica count it finds.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{Knative, KnativeConfig, KnativeMetric, KnativeSettings, ScalePolicy, Signals};
//!
//! // Knative's defaults: 10 requests in flight per replica as the target.
//! let config = KnativeConfig::try_new(KnativeSettings::new(KnativeMetric::Concurrency, 10.0)).unwrap();
//! let mut policy = Knative::new(config);
//! let mut now = Instant::ZERO;
//! let steady = Signals { replicas: 4, in_flight_per_replica: Some(10.0), ..Signals::default() };
//! for _ in 0..60 {
//!     assert_eq!(policy.decide(now, &steady).desired, 4);
//!     now = now + Duration::from_secs(1);
//! }
//! // A burst: four times the load. The panic window sees it within seconds.
//! let burst = Signals { in_flight_per_replica: Some(40.0), ..steady };
//! let decision = policy.decide(now + Duration::from_secs(3), &burst);
//! assert!(decision.desired >= 8, "{decision}");
//! assert!(policy.is_panicking());
//! ```

use std::fmt;
use std::time::Duration;

use crate::time::Instant;

pub mod bounds;
pub mod forecast;
pub mod knative;
pub mod predictive;
pub mod queueing;
pub mod restart;
pub mod signals;
pub mod slo;
pub mod status;
pub mod target;
pub mod threshold;
mod window;

pub use bounds::{Bounds, BoundsSettings};
pub use knative::{Knative, KnativeConfig, KnativeMetric, KnativeSettings};
pub use predictive::{Predictive, PredictiveConfig, PredictiveSettings};
pub use queueing::{MMc, QueueError, Slo};
pub use signals::{LoadReading, SignalMeter};
pub use slo::{SloConfig, SloPolicy, SloSettings};
pub use status::ScaleStatus;
pub use target::{
    Metric, MetricTarget, RateLimit, ScalingRules, Select, TargetTracking, TargetTrackingConfig, TargetTrackingSettings,
};
pub use threshold::{LoadMetric, Threshold, ThresholdConfig, ThresholdSettings};

/// What the autoscaler knows about a pool's load at one tick.
///
/// Every measurement is optional: a policy reads the ones it documents and treats a missing one
/// as unknown, never as zero. A value that is negative or not finite counts as missing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// The replica count last asked for (Kubernetes' `spec.replicas`), ready or not.
    pub replicas: u32,
    /// Requests in flight on a replica, mean over the replicas serving (streams count until
    /// they end).
    pub in_flight_per_replica: Option<f64>,
    /// The replicas serving now (endpoints in the pool), which may be fewer than `replicas`
    /// while some start; `None`: as many as `replicas`.
    pub serving: Option<u32>,
    /// Requests arriving at the pool, per second, in all.
    pub request_rate: Option<f64>,
    /// Requests waiting, in all: in the proxy's admission queue and in the engines' queues.
    pub queue_length: Option<u64>,
    /// KV-cache use, mean over the replicas, as a fraction (0.8 is 80%).
    pub kv_cache_use: Option<f64>,
    /// The 95th percentile of request latency.
    pub p95_latency: Option<Duration>,
    /// CPU use per replica, mean, as a fraction of what a replica is given (0.8 is 80%).
    pub cpu_per_replica: Option<f64>,
    /// Memory use per replica, mean, as a fraction of what a replica is given.
    pub memory_per_replica: Option<f64>,
}

// === impl Signals ===

impl Signals {
    /// A measurement that can be used: finite and not negative.
    pub(crate) fn clean(value: Option<f64>) -> Option<f64> {
        value.filter(|v| v.is_finite() && *v >= 0.0)
    }

    /// Requests in flight and waiting, in all: `in_flight_per_replica x serving (else
    /// replicas) + queue_length`, or `None` when neither is known. Replicas still starting
    /// carry no load: counting them would make load that is not there, and a policy on it
    /// would feed on its own scale-up.
    pub fn in_flight_total(&self) -> Option<f64> {
        let serving = self.serving.unwrap_or(self.replicas);
        let in_flight = Self::clean(self.in_flight_per_replica).map(|v| v * f64::from(serving));
        let queued = self.queue_length.map(|q| q as f64);
        match (in_flight, queued) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        }
    }

    /// Whether the pool has work, from the load measurements (`in_flight_per_replica`,
    /// `request_rate`, `queue_length`): busy when any is above zero, idle when at least one is
    /// known and all known ones are zero, unknown otherwise.
    pub fn activity(&self) -> Activity {
        let known = [
            Self::clean(self.in_flight_per_replica),
            Self::clean(self.request_rate),
            self.queue_length.map(|q| q as f64),
        ];
        if known.iter().flatten().any(|v| *v > 0.0) {
            Activity::Busy
        } else if known.iter().any(Option::is_some) {
            Activity::Idle
        } else {
            Activity::Unknown
        }
    }
}

/// Whether a pool has work, as [`Signals::activity`] tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activity {
    /// Some request is in flight, arriving or waiting.
    Busy,
    /// Known to have no request in flight, arriving or waiting.
    Idle,
    /// No load measurement: neither busy nor idle.
    Unknown,
}

/// What a policy wants: a replica count, and why, to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The replica count the pool should have.
    pub desired: u32,
    /// Why, in words, with the numbers that led there.
    pub reason: String,
}

impl Decision {
    pub(crate) fn new(desired: u32, reason: impl Into<String>) -> Self {
        Decision { desired, reason: reason.into() }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} replicas: {}", self.desired, self.reason)
    }
}

/// A scaling policy: fed the time and the pool's signals at each tick, it says how many
/// replicas the pool should have.
pub trait ScalePolicy: fmt::Debug + Send {
    /// The decision at `now`. Calls come in time order; the runtime carries the decision out
    /// (or reports the count it reached in the next [`Signals::replicas`]).
    fn decide(&mut self, now: Instant, signals: &Signals) -> Decision;

    /// The bounds every decision stays within.
    fn bounds(&self) -> &Bounds;

    /// What the policy expects of the load, when it forecasts (a predictive policy); `None`
    /// for the reactive ones. Read after [`decide`](Self::decide), to show and export.
    fn forecast(&self) -> Option<Forecast> {
        None
    }

    /// The replicas this policy would ask for, before its bounds, if the load held steady at
    /// `rate` requests a second with `in_flight` requests in flight and waiting in all (by
    /// Little's law, the rate times the mean time a request stays); `None` when it cannot tell
    /// from these (it scales on another metric, or needs `in_flight` and was not given it).
    /// [`Predictive`] turns its forecast rate into replicas with it.
    fn replicas_for_load(&self, rate: f64, in_flight: Option<f64>) -> Option<u32> {
        let _ = (rate, in_flight);
        None
    }
}

/// A predictive policy's view ahead: the request rate it expects and the replicas that rate
/// needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    /// The request rate now, as the forecast's model smooths it (requests a second).
    pub rate_now: f64,
    /// The request rate expected `lead` from now (requests a second).
    pub rate_ahead: f64,
    /// How far ahead: the time a new replica takes to serve.
    pub lead: Duration,
    /// The replicas `rate_ahead` needs.
    pub replicas: u32,
}

pub(crate) use crate::settings::Check;
pub use crate::settings::ConfigError;

/// `ceil(x)` as a replica count, saturating; `x` must not be NaN (0 if it is).
pub(crate) fn ceil_count(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        x.ceil() as u32
    }
}

/// Test support: `n` seconds after the clock's zero.
#[cfg(test)]
pub(crate) fn secs(n: u64) -> Instant {
    Instant::from_millis(n * 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_total_adds_the_queue() {
        let s = Signals { replicas: 4, in_flight_per_replica: Some(2.5), queue_length: Some(3), ..Signals::default() };
        assert_eq!(s.in_flight_total(), Some(13.0));
        assert_eq!(Signals { in_flight_per_replica: None, ..s }.in_flight_total(), Some(3.0));
        assert_eq!(Signals::default().in_flight_total(), None);
        let bad = Signals { replicas: 2, in_flight_per_replica: Some(f64::NAN), ..Signals::default() };
        assert_eq!(bad.in_flight_total(), None);
        // Two of four replicas asked for serve: the load is theirs alone.
        let starting = Signals { serving: Some(2), queue_length: None, ..s };
        assert_eq!(starting.in_flight_total(), Some(5.0));
    }

    #[test]
    fn activity_needs_evidence_of_idleness() {
        assert_eq!(Signals::default().activity(), Activity::Unknown);
        let idle = Signals { request_rate: Some(0.0), ..Signals::default() };
        assert_eq!(idle.activity(), Activity::Idle);
        assert_eq!(Signals { queue_length: Some(1), ..idle }.activity(), Activity::Busy);
        assert_eq!(Signals { request_rate: Some(-1.0), ..Signals::default() }.activity(), Activity::Unknown);
        // CPU alone says nothing about requests.
        assert_eq!(Signals { cpu_per_replica: Some(0.9), ..Signals::default() }.activity(), Activity::Unknown);
    }

    #[test]
    fn ceil_count_saturates() {
        assert_eq!(ceil_count(0.0), 0);
        assert_eq!(ceil_count(-3.0), 0);
        assert_eq!(ceil_count(f64::NAN), 0);
        assert_eq!(ceil_count(2.000_1), 3);
        assert_eq!(ceil_count(7.0), 7);
        assert_eq!(ceil_count(1e12), u32::MAX);
        assert_eq!(ceil_count(f64::INFINITY), u32::MAX);
    }

    #[test]
    fn decision_displays_count_and_reason() {
        assert_eq!(Decision::new(3, "because").to_string(), "3 replicas: because");
    }
}
