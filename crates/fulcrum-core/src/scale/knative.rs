//! Knative's Pod Autoscaler (KPA): a stable window for steady load, a panic window for bursts.
//!
//! The observed load (requests in flight, or requests a second) is averaged over two windows:
//! the stable window (60 s) and the panic window (6 s, a tenth of it). Each average divided by
//! the target per replica gives a count, `ceil(average / target)`, kept between
//! `floor(ready / max_scale_down_rate)` and `ceil(ready x max_scale_up_rate)` (ready = the
//! current count, at least 1).
//!
//! * **Stable mode**: the stable window's count.
//! * **Panic mode** starts when the panic window's count reaches `panic_threshold` (2) times
//!   the current count: a burst that would double the fleet. While panicking the count is the
//!   larger of the two windows' counts and never goes down. Panic ends once a whole stable
//!   window has passed without the panic condition, when the burst has made its way into the
//!   stable average.
//!
//! Averages are kept one bucket a second, as Knative's `TimedFloat64Buckets`; seconds without a
//! measurement do not count. Reads `in_flight_per_replica` and `queue_length`
//! ([`KnativeMetric::Concurrency`], as Knative counts requests its activator holds), or
//! `request_rate` ([`KnativeMetric::Rps`]). Cost: O(window in seconds) memory, O(1) amortized
//! a decision (the averages scan at most 60 buckets).
//!
//! Reference: Knative Serving, `pkg/autoscaler/scaling/autoscaler.go`, and "Configuring
//! scale bounds" / "Additional autoscaling configuration for KPA" in its documentation.
//!
//! ```
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{Knative, KnativeConfig, KnativeMetric, KnativeSettings, ScalePolicy, Signals};
//!
//! let config = KnativeConfig::try_new(KnativeSettings::new(KnativeMetric::Rps, 5.0)).unwrap();
//! let mut kpa = Knative::new(config);
//! let s = Signals { replicas: 2, request_rate: Some(12.0), ..Signals::default() };
//! assert_eq!(kpa.decide(Instant::ZERO, &s).desired, 3); // ceil(12 / 5)
//! assert!(!kpa.is_panicking());
//! ```

use std::time::Duration;

use super::bounds::{Bounds, BoundsSettings, Floor};
use super::window::BucketAverage;
use super::{Check, ConfigError, Decision, ScalePolicy, Signals, ceil_count};
use crate::time::Instant;

const SECTION: Check = Check { section: "knative" };

/// What Knative's autoscaler averages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KnativeMetric {
    /// Requests in flight and waiting, in all (Knative's default, `concurrency`).
    Concurrency,
    /// Requests a second (`rps`).
    Rps,
}

impl KnativeMetric {
    fn read(self, s: &Signals) -> Option<f64> {
        match self {
            KnativeMetric::Concurrency => s.in_flight_total(),
            KnativeMetric::Rps => Signals::clean(s.request_rate),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            KnativeMetric::Concurrency => "concurrency",
            KnativeMetric::Rps => "rps",
        }
    }
}

/// KPA settings as written, with Knative's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KnativeSettings {
    /// What to average.
    pub metric: KnativeMetric,
    /// The value per replica to aim at (Knative: the target times the target utilization;
    /// 100 x 70% = 70 by default for concurrency).
    pub target: f64,
    /// The stable window (60 s; 6 s to 1 h).
    pub stable_window: Duration,
    /// The panic window (6 s; at least 1 s and at most the stable window).
    pub panic_window: Duration,
    /// Panic when the panic window's count reaches this times the current count (2.0, that
    /// is 200%; above 1).
    pub panic_threshold: f64,
    /// At most this times the current count in one decision (1000; above 1).
    pub max_scale_up_rate: f64,
    /// At least the current count divided by this in one decision (2; above 1).
    pub max_scale_down_rate: f64,
    /// Replica bounds.
    pub bounds: BoundsSettings,
}

impl KnativeSettings {
    /// Settings for `metric` at `target` per replica, with Knative's defaults for the rest.
    pub fn new(metric: KnativeMetric, target: f64) -> Self {
        KnativeSettings {
            metric,
            target,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            bounds: BoundsSettings::default(),
        }
    }
}

impl Default for KnativeSettings {
    /// Concurrency, with Knative's default target: 100 x 70%.
    fn default() -> Self {
        KnativeSettings::new(KnativeMetric::Concurrency, 70.0)
    }
}

/// Validated KPA settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KnativeConfig {
    settings: KnativeSettings,
    bounds: Bounds,
}

impl KnativeConfig {
    /// Checks the settings: a positive target, 6 s <= stable window <= 1 h,
    /// 1 s <= panic window <= stable window, threshold and rates above 1.
    pub fn try_new(s: KnativeSettings) -> Result<Self, ConfigError> {
        SECTION.positive_f64("target", s.target)?;
        if s.stable_window < Duration::from_secs(6) || s.stable_window > Duration::from_secs(3_600) {
            return Err(SECTION.err("stable_window", format!("must be between 6s and 1h, got {:?}", s.stable_window)));
        }
        if s.panic_window < Duration::from_secs(1) || s.panic_window > s.stable_window {
            return Err(SECTION.err(
                "panic_window",
                format!(
                    "must be at least 1s and at most stable_window ({:?}), got {:?}",
                    s.stable_window, s.panic_window
                ),
            ));
        }
        for (field, value) in [
            ("panic_threshold", s.panic_threshold),
            ("max_scale_up_rate", s.max_scale_up_rate),
            ("max_scale_down_rate", s.max_scale_down_rate),
        ] {
            if !(value.is_finite() && value > 1.0) {
                return Err(SECTION.err(field, format!("must be a finite number above 1, got {value}")));
            }
        }
        let bounds = Bounds::try_new(s.bounds)?;
        Ok(KnativeConfig { settings: s, bounds })
    }

    /// The settings, as validated.
    pub fn settings(&self) -> &KnativeSettings {
        &self.settings
    }

    /// Replica bounds.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }
}

/// A KPA autoscaler for one pool.
#[derive(Clone, Debug)]
pub struct Knative {
    config: KnativeConfig,
    floor: Floor,
    samples: BucketAverage,
    /// The last time the panic condition held, while panicking (Knative's `panicTime`).
    panic_since: Option<Instant>,
    /// The highest count decided during this panic.
    max_panic: u32,
}

// === impl Knative ===

impl Knative {
    /// A policy with no history.
    pub fn new(config: KnativeConfig) -> Self {
        Knative {
            floor: Floor::new(config.bounds),
            samples: BucketAverage::new(config.settings.stable_window),
            config,
            panic_since: None,
            max_panic: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &KnativeConfig {
        &self.config
    }

    /// Whether the last decision was in panic mode.
    pub fn is_panicking(&self) -> bool {
        self.panic_since.is_some()
    }
}

impl ScalePolicy for Knative {
    fn decide(&mut self, now: Instant, s: &Signals) -> Decision {
        let k = self.config.settings;
        let current = s.replicas;
        if let Some(value) = k.metric.read(s) {
            self.samples.record(now, value);
        }
        let (Some(stable), Some(panic)) =
            (self.samples.average(now, k.stable_window), self.samples.average(now, k.panic_window))
        else {
            let reason =
                format!("no {} measured in the last {:?}: holding {current}", k.metric.as_str(), k.panic_window);
            return self.floor.apply(now, s, current, reason);
        };
        let ready = f64::from(current.max(1));
        let max_up = ceil_count(ready * k.max_scale_up_rate);
        let max_down = (ready / k.max_scale_down_rate).floor() as u32;
        let stable_count = ceil_count(stable / k.target);
        let panic_count = ceil_count(panic / k.target);
        let stable_desired = stable_count.clamp(max_down, max_up);
        let panic_desired = panic_count.clamp(max_down, max_up);
        let over_threshold = f64::from(panic_count) / ready >= k.panic_threshold;

        let averages = format!(
            "{} averages {stable:.2} over {:?} and {panic:.2} over {:?} at target {} per replica",
            k.metric.as_str(),
            k.stable_window,
            k.panic_window,
            k.target
        );
        let mut note = String::new();
        if over_threshold {
            if self.panic_since.is_none() {
                note = format!("; panic: the panic window wants {panic_count}, >= {} x {current}", k.panic_threshold);
            }
            self.panic_since = Some(now);
        } else if let Some(since) = self.panic_since
            && now.saturating_since(since) > k.stable_window
        {
            self.panic_since = None;
            self.max_panic = 0;
            note = format!("; panic over: no burst for {:?}", k.stable_window);
        }
        let (proposal, reason) = if self.panic_since.is_some() {
            let want = stable_desired.max(panic_desired);
            if want > self.max_panic {
                self.max_panic = want;
            }
            let held = if want < self.max_panic {
                format!(", not lowered from {} in panic", self.max_panic)
            } else {
                String::new()
            };
            (self.max_panic, format!("{averages}{note}; panic mode: {}{held}", self.max_panic))
        } else {
            (stable_desired, format!("{averages}{note}; stable mode: {stable_desired}"))
        };
        let decision = self.floor.apply(now, s, proposal, reason);
        if self.panic_since.is_some() {
            // The floor may have raised the count (a minimum, a wake-up): never go below it.
            self.max_panic = self.max_panic.max(decision.desired);
        }
        decision
    }

    fn bounds(&self) -> &Bounds {
        self.floor.bounds()
    }

    /// `ceil(load / target)`, the stable mode's count, the load being `in_flight`
    /// (concurrency) or `rate` (rps).
    fn replicas_for_load(&self, rate: f64, in_flight: Option<f64>) -> Option<u32> {
        let k = &self.config.settings;
        let load = match k.metric {
            KnativeMetric::Concurrency => in_flight?,
            KnativeMetric::Rps => rate,
        };
        Some(ceil_count(load / k.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::secs;

    fn kpa(target: f64, min: u32, max: u32) -> Knative {
        let mut s = KnativeSettings::new(KnativeMetric::Concurrency, target);
        s.bounds = BoundsSettings { min_replicas: min, max_replicas: max, ..BoundsSettings::default() };
        Knative::new(KnativeConfig::try_new(s).unwrap())
    }

    /// `total` requests in flight over `replicas` replicas.
    fn load(replicas: u32, total: f64) -> Signals {
        let per = if replicas == 0 { 0.0 } else { total / f64::from(replicas) };
        Signals { replicas, in_flight_per_replica: Some(per), ..Signals::default() }
    }

    #[test]
    fn a_load_step_scales_out_within_the_panic_window() {
        let mut p = kpa(10.0, 1, 100);
        let mut replicas = 10;
        for t in 0..120 {
            let d = p.decide(secs(t), &load(replicas, 100.0));
            assert_eq!(d.desired, 10, "t = {t}: {d}");
            replicas = d.desired;
        }
        assert!(!p.is_panicking());
        // The load quadruples at t = 120 s; the actuator brings replicas up at once.
        let mut reached = None;
        for t in 120..126 {
            let d = p.decide(secs(t), &load(replicas, 400.0));
            replicas = d.desired;
            if replicas >= 40 && reached.is_none() {
                reached = Some(t);
            }
        }
        assert!(p.is_panicking());
        assert_eq!(replicas, 40);
        // Within the 6 s panic window of the step.
        assert!(reached.is_some_and(|t| t < 126), "{reached:?}");
        // The stable average alone would still be far below 40.
        let stable = p.samples.average(secs(125), Duration::from_secs(60)).unwrap();
        assert!(stable < 200.0, "{stable}");
    }

    #[test]
    fn panic_never_scales_down_and_ends_after_a_stable_window() {
        let mut p = kpa(10.0, 1, 100);
        for t in 0..60 {
            p.decide(secs(t), &load(4, 40.0));
        }
        let d = p.decide(secs(60), &load(4, 400.0));
        assert!(p.is_panicking(), "{d}");
        let peak = d.desired;
        let mut replicas = peak;
        // The burst stops at once: panicking, the count does not fall.
        for t in 61..120 {
            let d = p.decide(secs(t), &load(replicas, 40.0));
            assert!(d.desired >= peak, "t = {t}: {d}");
            replicas = d.desired;
        }
        // The panic condition last held at 60 s (while replicas were fewer): over after 120 s.
        let mut t = 120;
        while p.is_panicking() {
            let d = p.decide(secs(t), &load(replicas, 40.0));
            replicas = d.desired;
            t += 1;
            assert!(t < 200, "still panicking");
        }
        assert!(t <= 122, "left panic at {t}");
        // In stable mode it scales down, at most halving per decision.
        let before = replicas;
        let d = p.decide(secs(t), &load(replicas, 40.0));
        assert!(d.desired >= before / 2 && d.desired < before, "{before} -> {d}");
    }

    #[test]
    fn steady_load_is_stable() {
        let mut p = kpa(10.0, 1, 100);
        for t in 0..300 {
            // 95 to 105 in flight: always 10 replicas (ceil of the average over 10).
            let total = 100.0 + if t % 2 == 0 { 0.0 } else { -5.0 };
            let d = p.decide(secs(t), &load(10, total));
            assert_eq!(d.desired, 10, "t = {t}: {d}");
        }
    }

    #[test]
    fn scale_down_is_at_most_halving() {
        let mut p = kpa(10.0, 1, 100);
        let d = p.decide(secs(0), &load(20, 10.0));
        assert_eq!(d.desired, 10, "{d}");
    }

    #[test]
    fn no_measurement_holds() {
        let mut p = kpa(10.0, 1, 100);
        let d = p.decide(secs(0), &Signals { replicas: 5, ..Signals::default() });
        assert_eq!(d.desired, 5);
        assert!(d.reason.starts_with("no concurrency measured"), "{d}");
    }

    #[test]
    fn from_zero_and_back() {
        let mut s = KnativeSettings::new(KnativeMetric::Concurrency, 10.0);
        s.bounds = BoundsSettings { min_replicas: 0, max_replicas: 50, scale_to_zero_after: Duration::from_secs(30) };
        let mut p = Knative::new(KnativeConfig::try_new(s).unwrap());
        let d = p.decide(secs(0), &Signals { replicas: 0, queue_length: Some(30), ..Signals::default() });
        assert_eq!(d.desired, 1, "{d}");
        // One replica with 30 waiting: the panic window wants 3 >= 2 x 1.
        let d = p.decide(secs(1), &Signals { replicas: 1, in_flight_per_replica: Some(30.0), ..Signals::default() });
        assert_eq!(d.desired, 3, "{d}");
        assert!(p.is_panicking());
        let mut replicas = d.desired;
        for t in 2..200 {
            replicas = p.decide(secs(t), &load(replicas, 0.0)).desired;
        }
        assert_eq!(replicas, 0);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |f: &dyn Fn(&mut KnativeSettings)| {
            let mut s = KnativeSettings::default();
            f(&mut s);
            KnativeConfig::try_new(s).unwrap_err().field
        };
        assert_eq!(bad(&|s| s.target = 0.0), "target");
        assert_eq!(bad(&|s| s.stable_window = Duration::from_secs(5)), "stable_window");
        assert_eq!(bad(&|s| s.panic_window = Duration::from_millis(500)), "panic_window");
        assert_eq!(bad(&|s| s.panic_window = Duration::from_secs(61)), "panic_window");
        assert_eq!(bad(&|s| s.panic_threshold = 1.0), "panic_threshold");
        assert_eq!(bad(&|s| s.max_scale_up_rate = f64::NAN), "max_scale_up_rate");
        assert_eq!(bad(&|s| s.max_scale_down_rate = 0.5), "max_scale_down_rate");
        assert_eq!(bad(&|s| s.bounds.max_replicas = 0), "max_replicas");
        let c = KnativeConfig::try_new(KnativeSettings::default()).unwrap();
        assert_eq!(c.settings().target, 70.0);
        assert_eq!(c.bounds().max(), 10);
    }
}
