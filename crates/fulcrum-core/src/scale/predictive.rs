//! Predictive scaling: a forecast of the request rate that starts replicas before a ramp,
//! combined with a reactive policy.
//!
//! A new replica serves only after its cold start (process start, model load, readiness), so
//! a reactive policy that sees a morning ramp when it comes is a cold start late, and the
//! pool queues meanwhile. [`Predictive`] wraps any reactive [`ScalePolicy`] and, at each
//! decision, feeds the measured `request_rate` to a Holt-Winters model with a daily season
//! ([`forecast`](super::forecast)), reads the rate it expects `lead` from now (`lead` set to the
//! replicas' cold start), turns that rate into replicas and asks for the larger of that and
//! the reactive decision, within the reactive policy's [`Bounds`]. The reactive policy stays
//! the floor: a wrong forecast can only add replicas, never take away the ones the load
//! needs; the forecast's cost is the replicas it starts early or in vain. Taking the larger of
//! a forecast's capacity and a reactive policy's is how AWS EC2 Auto Scaling combines its
//! predictive scaling with its dynamic (target-tracking) policies.
//!
//! **From a rate to replicas**: `rate_per_replica`, when set, divides the rate. Otherwise the
//! reactive policy says what it would ask for at that load
//! ([`ScalePolicy::replicas_for_load`]): rate-based policies (`threshold`, `knative` and
//! `target_tracking` on `request_rate`, and `slo` through M/M/c) from the rate itself;
//! concurrency-based ones from the requests in flight that rate brings, by Little's law
//! (in flight = rate x the mean time a request stays). That time is learned here as the ratio
//! of the in-flight total to the rate, both summed with an exponential decay over a season, so
//! weighted by the rate: the busy hours count most, and a replica's latency there (it batches
//! more) is the one a ramp's replicas will see. Only ticks that measure the pool at its
//! target count: the load between half the target and the target (a backlog's longer stays
//! would overstate the time; a pool held above its need by `min_replicas` at night, whose
//! replicas batch less, would understate it), and the count unchanged upwards for a lead
//! (until the replicas asked for serve, the pool drains a backlog and is not at its steady
//! state). Until the model has a forecast and, for a
//! concurrency policy, a time in the system, the decision is the reactive one.
//!
//! A pool scaled to zero is woken ahead only when the forecast expects at least one request
//! within the lead, so that a forecast's small noise at night never holds a replica.
//!
//! Cost: O(1) a decision on top of the reactive policy's (one sample and two forecasts of the
//! model; see [`forecast`](super::forecast) for its memory).
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::forecast::HoltWintersSettings;
//! use fulcrum_core::scale::{
//!     LoadMetric, Predictive, PredictiveConfig, PredictiveSettings, ScalePolicy, Signals, Threshold,
//!     ThresholdConfig, ThresholdSettings,
//! };
//!
//! // Reactive: one replica per 10 req/s, no reserve, no cooldown.
//! let mut reactive = ThresholdSettings::new(LoadMetric::RequestRate, 10.0);
//! (reactive.reserve, reactive.cooldown, reactive.bounds.max_replicas) = (0, Duration::ZERO, 20);
//! let reactive = Box::new(Threshold::new(ThresholdConfig::try_new(reactive).unwrap()));
//! // A "day" of 10 minutes in 30 s slots; replicas take 60 s to serve.
//! let mut settings = PredictiveSettings::new(Duration::from_secs(60));
//! settings.forecast =
//!     HoltWintersSettings { season: Duration::from_secs(600), slot: Duration::from_secs(30), ..Default::default() };
//! let mut policy = Predictive::new(reactive, PredictiveConfig::try_new(settings).unwrap());
//! // Two days: 10 req/s, and 100 req/s from minute 5 to minute 8.
//! let rate = |s: u64| if (300..480).contains(&(s % 600)) { 100.0 } else { 10.0 };
//! let mut replicas = 1;
//! for s in 0..1_440 {
//!     let signals = Signals { replicas, request_rate: Some(rate(s)), ..Signals::default() };
//!     replicas = policy.decide(Instant::from_millis(s * 1_000), &signals).desired;
//! }
//! // Day 3, a minute before the ramp: still 10 req/s, but the policy scales for what comes.
//! let signals = Signals { replicas, request_rate: Some(10.0), ..Signals::default() };
//! let decision = policy.decide(Instant::from_millis(1_440_000), &signals);
//! assert!(decision.desired >= 5, "{decision}");
//! assert!(decision.reason.starts_with("predictive"));
//! assert!(policy.forecast().unwrap().rate_ahead > 50.0);
//! ```

use std::time::Duration;

use super::forecast::{HoltWinters, HoltWintersConfig, HoltWintersSettings};
use super::{Bounds, Check, ConfigError, Decision, Forecast, ScalePolicy, Signals, ceil_count};
use crate::time::Instant;

const SECTION: Check = Check { section: "predictive" };

/// Predictive settings as written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictiveSettings {
    /// How far ahead to scale: the time a new replica takes to serve (its cold start).
    pub lead: Duration,
    /// The forecast's season, slot and smoothing ([`HoltWintersSettings::default`]: a day in
    /// 5-minute slots).
    pub forecast: HoltWintersSettings,
    /// Requests a second one replica serves, when given; otherwise the reactive policy turns
    /// the rate into replicas.
    pub rate_per_replica: Option<f64>,
}

impl PredictiveSettings {
    /// Settings that scale `lead` ahead, with the defaults for the rest.
    pub fn new(lead: Duration) -> Self {
        PredictiveSettings { lead, forecast: HoltWintersSettings::default(), rate_per_replica: None }
    }
}

/// Validated predictive settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictiveConfig {
    lead: Duration,
    forecast: HoltWintersConfig,
    rate_per_replica: Option<f64>,
}

impl PredictiveConfig {
    /// Checks the settings: a lead longer than zero and at most the season, a valid forecast
    /// model, a positive finite `rate_per_replica`.
    pub fn try_new(s: PredictiveSettings) -> Result<Self, ConfigError> {
        let lead = SECTION.nonzero_duration("lead", s.lead)?;
        let forecast = HoltWintersConfig::try_new(s.forecast)?;
        if lead > s.forecast.season {
            return Err(
                SECTION.err("lead", format!("must be at most the season ({:?}), got {lead:?}", s.forecast.season))
            );
        }
        let rate_per_replica = match s.rate_per_replica {
            Some(r) => Some(SECTION.positive_f64("rate_per_replica", r)?),
            None => None,
        };
        Ok(PredictiveConfig { lead, forecast, rate_per_replica })
    }

    /// How far ahead it scales.
    pub fn lead(&self) -> Duration {
        self.lead
    }

    /// The forecast model's settings.
    pub fn forecast(&self) -> &HoltWintersConfig {
        &self.forecast
    }

    /// Requests a second per replica, when given.
    pub fn rate_per_replica(&self) -> Option<f64> {
        self.rate_per_replica
    }
}

/// Little's law, learned: requests in flight over the request rate, both summed with an
/// exponential decay over a window (the season).
#[derive(Clone, Copy, Debug, Default)]
struct TimeInSystem {
    in_flight: f64,
    rate: f64,
    at: Option<Instant>,
}

impl TimeInSystem {
    fn record(&mut self, now: Instant, in_flight: f64, rate: f64, window: Duration) {
        let decay = self.at.map_or(0.0, |t| (-now.saturating_since(t).as_secs_f64() / window.as_secs_f64()).exp());
        self.in_flight = self.in_flight * decay + in_flight;
        self.rate = self.rate * decay + rate;
        self.at = Some(now);
    }

    /// The mean time a request stays, in seconds.
    fn seconds(&self) -> Option<f64> {
        let w = self.in_flight / self.rate;
        (self.rate > 0.0 && w.is_finite()).then_some(w)
    }
}

/// A reactive policy with a forecast ahead of it; see the [module](self) docs.
#[derive(Debug)]
pub struct Predictive {
    reactive: Box<dyn ScalePolicy>,
    config: PredictiveConfig,
    model: HoltWinters,
    stay: TimeInSystem,
    /// The count asked for at the last decision, and since when it has been that.
    replicas: Option<(u32, Instant)>,
    last: Option<Forecast>,
}

// === impl Predictive ===

impl Predictive {
    /// `reactive` with a forecast that has seen nothing yet.
    pub fn new(reactive: Box<dyn ScalePolicy>, config: PredictiveConfig) -> Self {
        Predictive {
            reactive,
            model: HoltWinters::new(config.forecast),
            config,
            stay: TimeInSystem::default(),
            replicas: None,
            last: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &PredictiveConfig {
        &self.config
    }

    /// The mean time a request stays in the pool (in flight or waiting), as learned, in
    /// seconds.
    pub fn time_in_system(&self) -> Option<f64> {
        self.stay.seconds()
    }

    /// The replicas `rate` needs: by `rate_per_replica`, else as the reactive policy would ask.
    fn replicas_for(&self, rate: f64) -> Option<u32> {
        match self.config.rate_per_replica {
            Some(per) => Some(ceil_count(rate / per)),
            None => self.reactive.replicas_for_load(rate, self.stay.seconds().map(|w| rate * w)),
        }
    }
}

impl ScalePolicy for Predictive {
    fn decide(&mut self, now: Instant, s: &Signals) -> Decision {
        let reactive = self.reactive.decide(now, s);
        let rate = Signals::clean(s.request_rate);
        self.model.observe(now, rate);
        let raised = match self.replicas {
            Some((n, since)) if s.replicas <= n => since,
            Some(_) => now,
            None => Instant::ZERO,
        };
        self.replicas = Some((s.replicas, raised));
        // After the count rose the pool is not at its steady state (new replicas start, a
        // backlog drains) until a lead has passed.
        let settled = now.saturating_since(raised) >= self.config.lead;
        // Only a load between half the target and the target: a backlog's longer stays would
        // overstate the time, and a pool held above its need by `min_replicas` at night
        // understate it (requests go faster through replicas that batch fewer).
        let at_target = |n: u32| n <= s.replicas && n.saturating_mul(2) >= s.replicas;
        if let (Some(rate), Some(in_flight)) = (rate, s.in_flight_total())
            && settled
            && rate > 0.0
            && s.replicas > 0
            && self.reactive.replicas_for_load(rate, Some(in_flight)).is_some_and(at_target)
        {
            self.stay.record(now, in_flight, rate, self.config.forecast.settings().season);
        }
        let lead = self.config.lead;
        let (Some(rate_now), Some(rate_ahead)) = (self.model.forecast(now), self.model.forecast(now + lead)) else {
            self.last = None;
            let reason = format!("reactive: {}; no forecast yet (the first slot has not ended)", reactive.reason);
            return Decision { reason, ..reactive };
        };
        let Some(needed) = self.replicas_for(rate_ahead) else {
            self.last = None;
            let reason = format!(
                "reactive: {}; forecast {rate_ahead:.2} req/s in {lead:?}, but no time in the system learned yet \
                 to turn it into replicas",
                reactive.reason
            );
            return Decision { reason, ..reactive };
        };
        self.last = Some(Forecast { rate_now, rate_ahead, lead, replicas: needed });
        let max = self.reactive.bounds().max();
        let predicted = needed.min(max);
        // A pool at zero wakes ahead only for at least one request expected within the lead.
        let wakes = reactive.desired > 0 || rate_ahead * lead.as_secs_f64() >= 1.0;
        let stay = match (self.config.rate_per_replica, self.stay.seconds()) {
            (Some(per), _) => format!(" at {per} req/s a replica"),
            (None, Some(w)) => format!(" ({:.1} in flight at {w:.2} s each)", rate_ahead * w),
            (None, None) => String::new(),
        };
        let forecast = format!("{rate_ahead:.2} req/s expected in {lead:?} (now {rate_now:.2}){stay} needs {needed}");
        if predicted > reactive.desired && wakes {
            let held = if needed > max { format!(", held at max_replicas {max}") } else { String::new() };
            let reason = format!(
                "predictive {predicted} > reactive {}: {forecast}{held}; reactive: {}",
                reactive.desired, reactive.reason
            );
            Decision::new(predicted, reason)
        } else if predicted > reactive.desired {
            let reason = format!(
                "reactive {}: {}; forecast {forecast}, under one request within the lead: not woken",
                reactive.desired, reactive.reason
            );
            Decision { reason, ..reactive }
        } else {
            let reason =
                format!("reactive {} >= predictive: {}; forecast {forecast}", reactive.desired, reactive.reason);
            Decision { reason, ..reactive }
        }
    }

    fn bounds(&self) -> &Bounds {
        self.reactive.bounds()
    }

    fn forecast(&self) -> Option<Forecast> {
        self.last
    }

    fn replicas_for_load(&self, rate: f64, in_flight: Option<f64>) -> Option<u32> {
        self.reactive.replicas_for_load(rate, in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::{
        BoundsSettings, Knative, KnativeConfig, KnativeMetric, KnativeSettings, LoadMetric, Threshold, ThresholdConfig,
        ThresholdSettings,
    };

    /// A day of 100 s: 2 req/s, a ramp from 30 s to 40 s up to 20 req/s, 20 until 70 s, back to
    /// 2 by 80 s.
    fn day(t: u64) -> f64 {
        let t = (t % 100) as f64;
        match t {
            t if t < 30.0 => 2.0,
            t if t < 40.0 => 2.0 + 1.8 * (t - 30.0),
            t if t < 70.0 => 20.0,
            t if t < 80.0 => 20.0 - 1.8 * (t - 70.0),
            _ => 2.0,
        }
    }

    fn settings(lead: u64) -> PredictiveSettings {
        let mut s = PredictiveSettings::new(Duration::from_secs(lead));
        s.forecast.season = Duration::from_secs(100);
        s.forecast.slot = Duration::from_secs(5);
        s
    }

    fn bounds(min: u32, max: u32) -> BoundsSettings {
        BoundsSettings { min_replicas: min, max_replicas: max, scale_to_zero_after: Duration::from_secs(20) }
    }

    /// Threshold on the rate: 2 req/s a replica, no reserve, no cooldown.
    fn by_rate(min: u32, max: u32) -> Box<dyn ScalePolicy> {
        let mut s = ThresholdSettings::new(LoadMetric::RequestRate, 2.0);
        (s.reserve, s.cooldown, s.bounds) = (0, Duration::ZERO, bounds(min, max));
        Box::new(Threshold::new(ThresholdConfig::try_new(s).unwrap()))
    }

    fn predictive(reactive: Box<dyn ScalePolicy>, s: PredictiveSettings) -> Predictive {
        Predictive::new(reactive, PredictiveConfig::try_new(s).unwrap())
    }

    fn secs(n: u64) -> Instant {
        Instant::from_millis(n * 1_000)
    }

    /// Runs `p` from `from` to `to` seconds on `rate`, the pool reaching at once what it asks
    /// for, with 3 s in the system per request; the decisions.
    fn run(p: &mut Predictive, from: u64, to: u64, rate: impl Fn(u64) -> f64, replicas: &mut u32) -> Vec<Decision> {
        (from..to)
            .map(|t| {
                let r = rate(t);
                let per = if *replicas == 0 { 0.0 } else { r * 3.0 / f64::from(*replicas) };
                let s = Signals {
                    replicas: *replicas,
                    request_rate: Some(r),
                    in_flight_per_replica: Some(per),
                    queue_length: Some(0),
                    ..Signals::default()
                };
                let d = p.decide(secs(t), &s);
                *replicas = d.desired;
                d
            })
            .collect()
    }

    #[test]
    fn without_a_forecast_it_is_the_reactive_policy() {
        let mut p = predictive(by_rate(1, 20), settings(10));
        let mut replicas = 1;
        let first = run(&mut p, 0, 5, day, &mut replicas);
        assert!(first.iter().all(|d| d.desired == 1 && d.reason.contains("no forecast yet")), "{first:?}");
        assert_eq!(p.forecast(), None);
        // The first slot has ended: a forecast, flat.
        let d = run(&mut p, 5, 6, day, &mut replicas);
        assert_eq!(d[0].desired, 1);
        assert!(d[0].reason.starts_with("reactive 1 >= predictive"), "{}", d[0]);
        let f = p.forecast().unwrap();
        assert_eq!((f.lead, f.replicas), (Duration::from_secs(10), 1));
        assert!((f.rate_ahead - 2.0).abs() < 1e-9);
    }

    #[test]
    fn it_scales_a_lead_ahead_of_a_ramp_it_has_seen_before() {
        let mut p = predictive(by_rate(1, 20), settings(10));
        let mut replicas = 1;
        // The first day: no seasonal shape, so nothing ahead of the ramp.
        let day1 = run(&mut p, 0, 100, day, &mut replicas);
        assert_eq!(day1[25].desired, 1, "{}", day1[25]);
        run(&mut p, 100, 225, day, &mut replicas);
        // Day 3 at 25 s: 2 req/s now (one replica); 10 s later the ramp is half way (11 req/s).
        let d = &run(&mut p, 225, 226, day, &mut replicas)[0];
        assert!((4..=8).contains(&d.desired), "{d}");
        assert!(d.reason.starts_with(&format!("predictive {} > reactive 1", d.desired)), "{d}");
        // On the plateau the forecast agrees with the reactive count; at night it gives way.
        let rest = run(&mut p, 226, 300, day, &mut replicas);
        let plateau = &rest[50 - 26];
        assert!((10..=11).contains(&plateau.desired), "{plateau}");
        assert_eq!(rest[95 - 26].desired, 1, "{}", rest[95 - 26]);
    }

    #[test]
    fn concurrency_policies_learn_the_time_in_the_system() {
        // Knative on concurrency: 6 in flight a replica; requests stay 3 s.
        let mut k = KnativeSettings::new(KnativeMetric::Concurrency, 6.0);
        k.bounds = bounds(1, 50);
        let reactive = Box::new(Knative::new(KnativeConfig::try_new(k).unwrap()));
        let mut p = predictive(reactive, settings(10));
        let mut replicas = 1;
        run(&mut p, 0, 225, day, &mut replicas);
        let w = p.time_in_system().unwrap();
        assert!((w - 3.0).abs() < 1e-9, "{w}");
        let d = &run(&mut p, 225, 226, day, &mut replicas)[0];
        let f = p.forecast().unwrap();
        // ceil(rate x 3 s / 6).
        assert_eq!(f.replicas, ceil_count(f.rate_ahead * 3.0 / 6.0));
        assert!(d.desired >= 3 && d.desired == f.replicas, "{d}");
    }

    #[test]
    fn a_backlog_does_not_inflate_the_time_in_the_system() {
        let mut k = KnativeSettings::new(KnativeMetric::Concurrency, 6.0);
        k.bounds = bounds(1, 4);
        let reactive = Box::new(Knative::new(KnativeConfig::try_new(k).unwrap()));
        let mut p = predictive(reactive, settings(10));
        let within =
            Signals { replicas: 2, request_rate: Some(2.0), in_flight_per_replica: Some(3.0), ..Default::default() };
        for t in 0..30 {
            p.decide(secs(t), &within);
        }
        assert!((p.time_in_system().unwrap() - 3.0).abs() < 1e-9);
        // At max_replicas with 50 in flight a replica: requests stay 25 s, but that is a queue.
        let over =
            Signals { replicas: 4, request_rate: Some(8.0), in_flight_per_replica: Some(50.0), ..Default::default() };
        for t in 30..90 {
            p.decide(secs(t), &over);
        }
        assert!((p.time_in_system().unwrap() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_time_is_learned_only_at_the_target_and_a_lead_after_a_rise() {
        let mut k = KnativeSettings::new(KnativeMetric::Concurrency, 6.0);
        k.bounds = bounds(1, 20);
        let reactive = Box::new(Knative::new(KnativeConfig::try_new(k).unwrap()));
        let mut p = predictive(reactive, settings(10));
        let load = |replicas, rate, per| Signals {
            replicas,
            request_rate: Some(rate),
            in_flight_per_replica: Some(per),
            ..Default::default()
        };
        for t in 0..30 {
            p.decide(secs(t), &load(2, 2.0, 3.0));
        }
        let w = p.time_in_system().unwrap();
        assert!((w - 3.0).abs() < 1e-9, "{w}");
        // Ten replicas held at 0.5 in flight each (5 s a request): far below the target, left out.
        for t in 30..100 {
            p.decide(secs(t), &load(10, 1.0, 0.5));
        }
        assert!((p.time_in_system().unwrap() - 3.0).abs() < 1e-9);
        // Back to 2, then up to 4: for a lead the total reads 4 x the mean over the 2 serving
        // (12 in flight for 2 req/s), left out.
        p.decide(secs(100), &load(2, 2.0, 3.0));
        for t in 101..111 {
            p.decide(secs(t), &load(4, 2.0, 3.0));
        }
        assert!((p.time_in_system().unwrap() - 3.0).abs() < 1e-9);
        p.decide(secs(111), &load(4, 2.0, 3.0));
        assert!(p.time_in_system().unwrap() > 3.0);
    }

    #[test]
    fn rate_per_replica_overrides_the_reactive_mapping_and_max_replicas_holds() {
        let mut s = settings(10);
        s.rate_per_replica = Some(1.0);
        let mut p = predictive(by_rate(1, 12), s);
        let mut replicas = 1;
        run(&mut p, 0, 250, day, &mut replicas);
        let f = p.forecast().unwrap();
        assert!(f.replicas > 12, "{f:?}");
        let d = &run(&mut p, 250, 251, day, &mut replicas)[0];
        assert_eq!(d.desired, 12);
        assert!(d.reason.contains("held at max_replicas 12"), "{d}");
    }

    #[test]
    fn a_pool_scaled_to_zero_sleeps_at_night_and_wakes_before_the_morning() {
        // Nothing at all from 80 s to 30 s the next day.
        let rate = |t: u64| if (30..80).contains(&(t % 100)) { day(t) } else { 0.0 };
        let mut p = predictive(by_rate(0, 20), settings(10));
        let mut replicas = 1;
        run(&mut p, 0, 300, rate, &mut replicas);
        let night = run(&mut p, 300, 312, rate, &mut replicas);
        assert_eq!(night.last().unwrap().desired, 0, "{}", night.last().unwrap());
        // Still nothing arriving at 25 s, but the ramp comes at 30 s: awake before it.
        let morning = run(&mut p, 312, 326, rate, &mut replicas);
        let d = morning.last().unwrap();
        assert!(d.desired >= 1, "{d}");
        assert!(d.reason.starts_with("predictive"), "{d}");
    }

    #[test]
    fn each_policy_says_what_a_load_needs() {
        use crate::scale::{
            Metric, MetricTarget, Slo, SloConfig, SloPolicy, SloSettings, TargetTracking, TargetTrackingConfig,
            TargetTrackingSettings,
        };
        let knative =
            |metric, target| Knative::new(KnativeConfig::try_new(KnativeSettings::new(metric, target)).unwrap());
        let concurrency = knative(KnativeMetric::Concurrency, 6.0);
        assert_eq!(concurrency.replicas_for_load(10.0, Some(25.0)), Some(5));
        assert_eq!(concurrency.replicas_for_load(10.0, None), None);
        assert_eq!(knative(KnativeMetric::Rps, 2.0).replicas_for_load(10.0, None), Some(5));
        let threshold = |metric, per, reserve| {
            let mut s = ThresholdSettings::new(metric, per);
            s.reserve = reserve;
            Threshold::new(ThresholdConfig::try_new(s).unwrap())
        };
        assert_eq!(threshold(LoadMetric::RequestRate, 2.0, 1).replicas_for_load(10.0, None), Some(6));
        assert_eq!(threshold(LoadMetric::InFlight, 4.0, 0).replicas_for_load(1.0, Some(10.0)), Some(3));
        assert_eq!(threshold(LoadMetric::InFlight, 4.0, 0).replicas_for_load(1.0, None), None);
        let tracking =
            |targets| TargetTracking::new(TargetTrackingConfig::try_new(TargetTrackingSettings::new(targets)).unwrap());
        let both = tracking(vec![
            MetricTarget { metric: Metric::InFlight, target: 8.0 },
            MetricTarget { metric: Metric::RequestRate, target: 3.0 },
        ]);
        assert_eq!(both.replicas_for_load(30.0, Some(40.0)), Some(10));
        assert_eq!(both.replicas_for_load(3.0, Some(40.0)), Some(5));
        let kv = tracking(vec![MetricTarget { metric: Metric::KvCacheUse, target: 0.7 }]);
        assert_eq!(kv.replicas_for_load(30.0, Some(40.0)), None);
        let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
        let mut settings = SloSettings::new(0.5, slo);
        settings.bounds.max_replicas = 1_000;
        let slo = SloPolicy::new(SloConfig::try_new(settings).unwrap());
        assert_eq!(slo.replicas_for_load(100.0, None), Some(209));
        assert_eq!(slo.replicas_for_load(0.0, None), Some(0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 128,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x9AED_1C75),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the signals (gaps, NaN, negative, huge), a decision stays within the bounds
        /// and a forecast is finite and not negative.
        #[test]
        fn decisions_stay_within_the_bounds(
            ticks in proptest::collection::vec(
                (1u64..5_000, proptest::option::of(-10f64..1e7), proptest::option::of(-1f64..1e4), 0u32..40),
                1..200,
            ),
            min in 0u32..3,
            concurrency: bool,
        ) {
            let metric = if concurrency { KnativeMetric::Concurrency } else { KnativeMetric::Rps };
            let mut k = KnativeSettings::new(metric, 4.0);
            k.bounds = bounds(min, 12);
            let mut p = predictive(Box::new(Knative::new(KnativeConfig::try_new(k).unwrap())), settings(10));
            let mut now = 0;
            for (gap, rate, per, replicas) in ticks {
                now += gap;
                let rate = rate.map(|r| if r > 9e6 { f64::NAN } else { r });
                let s = Signals { replicas, request_rate: rate, in_flight_per_replica: per, ..Signals::default() };
                let d = p.decide(Instant::from_millis(now), &s);
                proptest::prop_assert!(d.desired <= 12, "{d}");
                proptest::prop_assert!(d.desired >= min, "{d}");
                if let Some(f) = p.forecast() {
                    proptest::prop_assert!(f.rate_now.is_finite() && f.rate_now >= 0.0);
                    proptest::prop_assert!(f.rate_ahead.is_finite() && f.rate_ahead >= 0.0);
                }
            }
        }
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |s: PredictiveSettings| PredictiveConfig::try_new(s).unwrap_err();
        let e = bad(PredictiveSettings::new(Duration::ZERO));
        assert_eq!(e.to_string(), "predictive.lead must be longer than zero");
        let e = bad(PredictiveSettings::new(Duration::from_secs(2 * 86_400)));
        assert_eq!(e.field, "lead");
        let mut s = PredictiveSettings::new(Duration::from_secs(60));
        s.rate_per_replica = Some(-1.0);
        assert_eq!(bad(s).field, "rate_per_replica");
        s.rate_per_replica = None;
        s.forecast.slot = Duration::from_secs(7);
        assert_eq!(bad(s).field, "season");
        let ok = PredictiveConfig::try_new(PredictiveSettings::new(Duration::from_secs(120))).unwrap();
        assert_eq!((ok.lead(), ok.forecast().slots(), ok.rate_per_replica()), (Duration::from_secs(120), 288, None));
    }
}
