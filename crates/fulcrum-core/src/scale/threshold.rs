//! Threshold scaling with a cooldown: the seeds' capacity rule `C = ceil(P / T) + k`.
//!
//! P is the pool's current load, T the load one replica handles at its target, k a reserve of
//! replicas kept beyond what the load needs (for a replica that fails or is being replaced,
//! N + k redundancy). After each change the count holds for `cooldown` (60 s), so that the
//! fleet settles and its load is measured again before the next step, as AWS's simple scaling
//! policies and their cooldown period do. A pool at zero that sees load wakes at once (the
//! [`Bounds`] decide it, whatever the cooldown).
//!
//! Reads `request_rate` ([`LoadMetric::RequestRate`]), or `in_flight_per_replica` and
//! `queue_length` ([`LoadMetric::InFlight`]: every request in flight or waiting). Without the
//! load it holds. Cost: O(1) a decision.
//!
//! ```
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{LoadMetric, ScalePolicy, Signals, Threshold, ThresholdConfig, ThresholdSettings};
//!
//! // One replica handles 20 requests a second; keep one spare.
//! let config = ThresholdConfig::try_new(ThresholdSettings::new(LoadMetric::RequestRate, 20.0)).unwrap();
//! let mut policy = Threshold::new(config);
//! let s = Signals { replicas: 2, request_rate: Some(130.0), ..Signals::default() };
//! assert_eq!(policy.decide(Instant::ZERO, &s).desired, 8); // ceil(130 / 20) + 1
//! ```

use std::time::Duration;

use super::bounds::{Bounds, BoundsSettings, Floor};
use super::{Check, ConfigError, Decision, ScalePolicy, Signals, ceil_count};
use crate::time::Instant;

const SECTION: Check = Check { section: "threshold" };

/// The load P that threshold scaling divides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadMetric {
    /// Requests arriving a second (`request_rate`); T is the rate one replica serves.
    RequestRate,
    /// Requests in flight and waiting (`in_flight_per_replica x replicas + queue_length`); T is
    /// the concurrency one replica serves well.
    InFlight,
}

impl LoadMetric {
    fn read(self, s: &Signals) -> Option<f64> {
        match self {
            LoadMetric::RequestRate => Signals::clean(s.request_rate),
            LoadMetric::InFlight => s.in_flight_total(),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            LoadMetric::RequestRate => "request_rate",
            LoadMetric::InFlight => "in_flight",
        }
    }
}

/// Threshold settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThresholdSettings {
    /// What P is.
    pub load: LoadMetric,
    /// T: the load one replica handles at its target; positive.
    pub per_replica: f64,
    /// k: replicas kept beyond what the load needs (1).
    pub reserve: u32,
    /// How long the count holds after a change (60 s; zero turns it off).
    pub cooldown: Duration,
    /// Replica bounds.
    pub bounds: BoundsSettings,
}

impl ThresholdSettings {
    /// Settings for `load` with T = `per_replica`, and the defaults for the rest.
    pub fn new(load: LoadMetric, per_replica: f64) -> Self {
        ThresholdSettings {
            load,
            per_replica,
            reserve: 1,
            cooldown: Duration::from_secs(60),
            bounds: BoundsSettings::default(),
        }
    }
}

/// Validated threshold settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThresholdConfig {
    load: LoadMetric,
    per_replica: f64,
    reserve: u32,
    cooldown: Duration,
    bounds: Bounds,
}

impl ThresholdConfig {
    /// Checks the settings: `per_replica` positive and finite, valid bounds.
    pub fn try_new(s: ThresholdSettings) -> Result<Self, ConfigError> {
        let per_replica = SECTION.positive_f64("per_replica", s.per_replica)?;
        let bounds = Bounds::try_new(s.bounds)?;
        Ok(ThresholdConfig { load: s.load, per_replica, reserve: s.reserve, cooldown: s.cooldown, bounds })
    }

    /// What P is.
    pub fn load(&self) -> LoadMetric {
        self.load
    }

    /// T.
    pub fn per_replica(&self) -> f64 {
        self.per_replica
    }

    /// k.
    pub fn reserve(&self) -> u32 {
        self.reserve
    }

    /// The hold after a change.
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Replica bounds.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }
}

/// A threshold autoscaler for one pool.
#[derive(Clone, Debug)]
pub struct Threshold {
    config: ThresholdConfig,
    floor: Floor,
    last_change: Option<Instant>,
}

// === impl Threshold ===

impl Threshold {
    /// A policy with no history (no cooldown running).
    pub fn new(config: ThresholdConfig) -> Self {
        Threshold { floor: Floor::new(config.bounds), config, last_change: None }
    }

    /// The settings.
    pub fn config(&self) -> &ThresholdConfig {
        &self.config
    }

    /// When the cooldown of the last change ends, if it is still running at `now`.
    pub fn cooldown_until(&self, now: Instant) -> Option<Instant> {
        let end = self.last_change? + self.config.cooldown;
        (end > now).then_some(end)
    }
}

impl ScalePolicy for Threshold {
    fn decide(&mut self, now: Instant, s: &Signals) -> Decision {
        let current = s.replicas;
        let c = &self.config;
        let (proposal, reason) = match c.load.read(s) {
            None => (current, format!("{} not reported: holding {current}", c.load.as_str())),
            Some(p) => {
                let needed = ceil_count(p / c.per_replica);
                let want = needed.saturating_add(c.reserve);
                let why = format!(
                    "{} {p:.3} / {} per replica = {needed}, + reserve {} = {want}",
                    c.load.as_str(),
                    c.per_replica,
                    c.reserve
                );
                match self.cooldown_until(now) {
                    Some(end) if want != current => {
                        let left = end.saturating_since(now);
                        (current, format!("{why}; cooling down for {left:?} more: holding {current}"))
                    }
                    _ => (want, why),
                }
            }
        };
        let decision = self.floor.apply(now, s, proposal, reason);
        if decision.desired != current {
            self.last_change = Some(now);
        }
        decision
    }

    fn bounds(&self) -> &Bounds {
        self.floor.bounds()
    }

    /// `ceil(P / T) + k`, P being `rate` or `in_flight` as the policy's load metric says.
    fn replicas_for_load(&self, rate: f64, in_flight: Option<f64>) -> Option<u32> {
        let c = &self.config;
        let load = match c.load {
            LoadMetric::RequestRate => rate,
            LoadMetric::InFlight => in_flight?,
        };
        Some(ceil_count(load / c.per_replica).saturating_add(c.reserve))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::secs;

    fn policy(reserve: u32, cooldown: u64, min: u32, max: u32) -> Threshold {
        let mut s = ThresholdSettings::new(LoadMetric::RequestRate, 10.0);
        s.reserve = reserve;
        s.cooldown = Duration::from_secs(cooldown);
        s.bounds.min_replicas = min;
        s.bounds.max_replicas = max;
        Threshold::new(ThresholdConfig::try_new(s).unwrap())
    }

    fn rate(replicas: u32, rate: f64) -> Signals {
        Signals { replicas, request_rate: Some(rate), ..Signals::default() }
    }

    #[test]
    fn the_reserve_is_kept() {
        let mut p = policy(2, 0, 1, 100);
        let d = p.decide(secs(0), &rate(1, 95.0));
        assert_eq!(d.desired, 12, "{d}"); // ceil(9.5) + 2
        assert!(d.reason.contains("= 10, + reserve 2 = 12"), "{d}");
        // Even with no load the reserve stays.
        assert_eq!(p.decide(secs(1), &rate(12, 0.0)).desired, 2);
        // Exactly at a multiple: no extra replica beyond the reserve.
        assert_eq!(p.decide(secs(2), &rate(2, 40.0)).desired, 6);
    }

    #[test]
    fn cooldown_holds_after_each_change() {
        let mut p = policy(1, 60, 1, 100);
        assert_eq!(p.decide(secs(0), &rate(2, 50.0)).desired, 6);
        assert_eq!(p.cooldown_until(secs(10)), Some(secs(60)));
        let held = p.decide(secs(30), &rate(6, 200.0));
        assert_eq!(held.desired, 6, "{held}");
        assert!(held.reason.contains("cooling down for 30s more"), "{held}");
        // No change wanted: nothing to hold, and the cooldown does not restart.
        assert_eq!(p.decide(secs(40), &rate(6, 50.0)).desired, 6);
        assert_eq!(p.decide(secs(60), &rate(6, 200.0)).desired, 21);
        assert_eq!(p.decide(secs(100), &rate(21, 10.0)).desired, 21);
        assert_eq!(p.decide(secs(120), &rate(21, 10.0)).desired, 2);
        assert_eq!(p.cooldown_until(secs(200)), None);
    }

    #[test]
    fn in_flight_counts_the_queue() {
        let mut s = ThresholdSettings::new(LoadMetric::InFlight, 8.0);
        s.reserve = 0;
        let mut p = Threshold::new(ThresholdConfig::try_new(s).unwrap());
        let sig =
            Signals { replicas: 2, in_flight_per_replica: Some(8.0), queue_length: Some(9), ..Signals::default() };
        assert_eq!(p.decide(secs(0), &sig).desired, 4); // ceil(25 / 8)
    }

    #[test]
    fn min_and_max_are_respected() {
        let mut p = policy(1, 0, 3, 5);
        assert_eq!(p.decide(secs(0), &rate(4, 0.0)).desired, 3);
        assert_eq!(p.decide(secs(1), &rate(3, 1_000.0)).desired, 5);
        let d = p.decide(secs(2), &Signals { replicas: 4, ..Signals::default() });
        assert_eq!(d.desired, 4, "{d}");
        assert!(d.reason.contains("not reported"), "{d}");
    }

    #[test]
    fn to_zero_after_idle_and_back_to_one() {
        let mut s = ThresholdSettings::new(LoadMetric::RequestRate, 10.0);
        s.bounds = BoundsSettings { min_replicas: 0, max_replicas: 10, scale_to_zero_after: Duration::from_secs(120) };
        let mut p = Threshold::new(ThresholdConfig::try_new(s).unwrap());
        assert_eq!(p.decide(secs(0), &rate(3, 25.0)).desired, 4);
        // Idle from 100 s: the reserve keeps one replica until 220 s, then zero.
        assert_eq!(p.decide(secs(100), &rate(4, 0.0)).desired, 1);
        assert_eq!(p.decide(secs(219), &rate(1, 0.0)).desired, 1);
        assert_eq!(p.decide(secs(220), &rate(1, 0.0)).desired, 0);
        assert_eq!(p.decide(secs(230), &rate(0, 0.0)).desired, 0);
        // Load: one at once, cooldown or not; then the rule.
        assert_eq!(p.decide(secs(231), &rate(0, 45.0)).desired, 1);
        assert_eq!(p.decide(secs(300), &rate(1, 45.0)).desired, 6);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = ThresholdConfig::try_new(ThresholdSettings::new(LoadMetric::RequestRate, t)).unwrap_err();
            assert_eq!((e.section, e.field), ("threshold", "per_replica"), "{t}");
        }
        let mut s = ThresholdSettings::new(LoadMetric::InFlight, 4.0);
        s.bounds.min_replicas = 20;
        assert_eq!(ThresholdConfig::try_new(s).unwrap_err().field, "min_replicas");
        let c = ThresholdConfig::try_new(ThresholdSettings::new(LoadMetric::InFlight, 4.0)).unwrap();
        assert_eq!((c.reserve(), c.cooldown(), c.per_replica()), (1, Duration::from_secs(60), 4.0));
        assert_eq!((c.load(), c.bounds().min()), (LoadMetric::InFlight, 1));
    }
}
