//! Scaling to a waiting-time SLO with the M/M/c model.
//!
//! Each replica is a server that completes `service_rate` requests a second (1 / the mean time
//! a request holds a replica; for a batching engine, the replica's throughput at its target
//! batch). With the measured arrival rate lambda, the policy asks for the smallest replica count
//! c whose queue meets the SLO: P(wait > t) <= epsilon, or a mean wait Wq at most a target
//! ([`queueing`](super::queueing), through the Erlang B recursion). Arrival rates come and go, so a
//! scale-down waits for the highest recommendation of `scale_down_window` (300 s) to fall, as
//! Kubernetes' stabilization window.
//!
//! Reads `request_rate`; without it the count holds. The model assumes Poisson arrivals and
//! exponential service: bursty traffic or long-tailed generation lengths wait longer than it
//! predicts, so set the SLO with some margin, or pair it with [`Knative`](super::Knative)'s
//! panic mode. Cost: O(c) a decision.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{ScalePolicy, Signals, Slo, SloConfig, SloPolicy, SloSettings};
//!
//! let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
//! let mut settings = SloSettings::new(0.5, slo); // 2 s a request
//! settings.bounds.max_replicas = 1_000;
//! let mut policy = SloPolicy::new(SloConfig::try_new(settings).unwrap());
//! let s = Signals { replicas: 150, request_rate: Some(100.0), ..Signals::default() };
//! assert_eq!(policy.decide(Instant::ZERO, &s).desired, 209);
//! ```

use std::time::Duration;

use super::bounds::{Bounds, BoundsSettings, Floor};
use super::queueing::{MMc, Slo};
use super::window::Recommendations;
use super::{Check, ConfigError, Decision, ScalePolicy, Signals};
use crate::time::Instant;

const SECTION: Check = Check { section: "slo" };

/// SLO settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SloSettings {
    /// mu: requests a second one replica completes; positive.
    pub service_rate: f64,
    /// The objective.
    pub slo: Slo,
    /// A scale-down goes no lower than the highest recommendation of this window (300 s).
    pub scale_down_window: Duration,
    /// Replica bounds.
    pub bounds: BoundsSettings,
}

impl SloSettings {
    /// Settings for replicas of `service_rate` and `slo`, with the defaults for the rest.
    pub fn new(service_rate: f64, slo: Slo) -> Self {
        SloSettings {
            service_rate,
            slo,
            scale_down_window: Duration::from_secs(300),
            bounds: BoundsSettings::default(),
        }
    }
}

/// Validated SLO settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SloConfig {
    service_rate: f64,
    slo: Slo,
    scale_down_window: Duration,
    bounds: Bounds,
}

impl SloConfig {
    /// Checks the settings: a positive finite service rate, a probability in (0, 1), a mean
    /// wait longer than zero, valid bounds.
    pub fn try_new(s: SloSettings) -> Result<Self, ConfigError> {
        let service_rate = SECTION.positive_f64("service_rate", s.service_rate)?;
        match s.slo {
            Slo::WaitProbability { probability, .. } if !(probability > 0.0 && probability < 1.0) => {
                return Err(SECTION.err("probability", format!("must be above 0 and below 1, got {probability}")));
            }
            Slo::MeanWait(d) if d.is_zero() => return Err(SECTION.err("mean_wait", "must be longer than zero")),
            _ => {}
        }
        let bounds = Bounds::try_new(s.bounds)?;
        Ok(SloConfig { service_rate, slo: s.slo, scale_down_window: s.scale_down_window, bounds })
    }

    /// mu per replica.
    pub fn service_rate(&self) -> f64 {
        self.service_rate
    }

    /// The objective.
    pub fn slo(&self) -> &Slo {
        &self.slo
    }

    /// The scale-down stabilization window.
    pub fn scale_down_window(&self) -> Duration {
        self.scale_down_window
    }

    /// Replica bounds.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }
}

/// An SLO autoscaler for one pool.
#[derive(Clone, Debug)]
pub struct SloPolicy {
    config: SloConfig,
    floor: Floor,
    recommendations: Recommendations,
}

// === impl SloPolicy ===

impl SloPolicy {
    /// A policy with no history.
    pub fn new(config: SloConfig) -> Self {
        SloPolicy { floor: Floor::new(config.bounds), config, recommendations: Recommendations::default() }
    }

    /// The settings.
    pub fn config(&self) -> &SloConfig {
        &self.config
    }

    fn propose(&self, s: &Signals) -> (u32, String) {
        let current = s.replicas;
        let slo = match self.config.slo {
            Slo::WaitProbability { max_wait, probability } => format!("P(wait > {max_wait:?}) <= {probability}"),
            Slo::MeanWait(d) => format!("mean wait <= {d:?}"),
        };
        let Some(lambda) = Signals::clean(s.request_rate) else {
            return (current, format!("request_rate not reported: holding {current}"));
        };
        if lambda == 0.0 {
            return (0, format!("no requests arriving: none needed for {slo}"));
        }
        let sized =
            MMc::try_new(lambda, self.config.service_rate).and_then(|q| Ok((q.min_servers(&self.config.slo)?, q)));
        match sized {
            Ok((c, q)) => (
                c,
                format!(
                    "{lambda:.3} req/s at {} req/s per replica ({:.2} Erlangs): {c} replicas meet {slo}",
                    self.config.service_rate,
                    q.offered_load()
                ),
            ),
            Err(e) => (self.config.bounds.max(), format!("{lambda:.3} req/s: {e}: asking for the most")),
        }
    }
}

impl ScalePolicy for SloPolicy {
    fn decide(&mut self, now: Instant, s: &Signals) -> Decision {
        let current = s.replicas;
        if self.recommendations.is_empty() {
            self.recommendations.seed(now, current);
        }
        let (proposal, mut reason) = self.propose(s);
        let window = self.config.scale_down_window;
        let stabilized = self.recommendations.stabilize(now, current, proposal, Duration::ZERO, window);
        if stabilized > proposal {
            reason.push_str(&format!("; held at {stabilized}, the highest recommendation of the last {window:?}"));
        }
        self.floor.apply(now, s, stabilized, reason)
    }

    fn bounds(&self) -> &Bounds {
        self.floor.bounds()
    }

    /// The fewest replicas whose M/M/c queue meets the SLO at `rate` (0 for no requests; the
    /// most allowed when no count can).
    fn replicas_for_load(&self, rate: f64, _in_flight: Option<f64>) -> Option<u32> {
        if rate <= 0.0 {
            return Some(0);
        }
        let c = MMc::try_new(rate, self.config.service_rate).and_then(|q| q.min_servers(&self.config.slo));
        Some(c.unwrap_or(self.config.bounds.max()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::secs;

    fn textbook() -> SloSettings {
        let slo = Slo::WaitProbability { max_wait: Duration::from_millis(500), probability: 0.05 };
        let mut s = SloSettings::new(0.5, slo);
        s.bounds.max_replicas = 10_000;
        s
    }

    fn rate(replicas: u32, rate: f64) -> Signals {
        Signals { replicas, request_rate: Some(rate), ..Signals::default() }
    }

    #[test]
    fn the_textbook_case_needs_209() {
        let mut p = SloPolicy::new(SloConfig::try_new(textbook()).unwrap());
        let d = p.decide(secs(0), &rate(1, 100.0));
        assert_eq!(d.desired, 209, "{d}");
        assert!(d.reason.contains("200.00 Erlangs): 209 replicas meet P(wait > 500ms) <= 0.05"), "{d}");
        // A mean-wait SLO of 50 ms needs 213.
        let mut s = textbook();
        s.slo = Slo::MeanWait(Duration::from_millis(50));
        let mut p = SloPolicy::new(SloConfig::try_new(s).unwrap());
        assert_eq!(p.decide(secs(0), &rate(1, 100.0)).desired, 213);
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let mut p = SloPolicy::new(SloConfig::try_new(textbook()).unwrap());
        assert_eq!(p.decide(secs(0), &rate(209, 100.0)).desired, 209);
        let d = p.decide(secs(60), &rate(209, 50.0));
        assert_eq!(d.desired, 209, "{d}");
        assert!(d.reason.contains("held at 209"), "{d}");
        let low = p.decide(secs(300), &rate(209, 50.0)).desired;
        assert!(low < 120 && low > 100, "{low}");
    }

    #[test]
    fn bounds_and_missing_rate() {
        let mut s = textbook();
        s.bounds.max_replicas = 100;
        let mut p = SloPolicy::new(SloConfig::try_new(s).unwrap());
        assert_eq!(p.decide(secs(0), &rate(50, 100.0)).desired, 100);
        let d = p.decide(secs(1), &Signals { replicas: 100, ..Signals::default() });
        assert_eq!(d.desired, 100);
        assert!(d.reason.contains("request_rate not reported"), "{d}");
        // No requests: the minimum (1).
        let mut p = SloPolicy::new(
            SloConfig::try_new(SloSettings { scale_down_window: Duration::ZERO, ..textbook() }).unwrap(),
        );
        assert_eq!(p.decide(secs(0), &rate(7, 0.0)).desired, 1);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |s: SloSettings| SloConfig::try_new(s).unwrap_err().field;
        assert_eq!(bad(SloSettings { service_rate: 0.0, ..textbook() }), "service_rate");
        let p = Slo::WaitProbability { max_wait: Duration::from_secs(1), probability: 1.0 };
        assert_eq!(bad(SloSettings { slo: p, ..textbook() }), "probability");
        assert_eq!(bad(SloSettings { slo: Slo::MeanWait(Duration::ZERO), ..textbook() }), "mean_wait");
        let c = SloConfig::try_new(textbook()).unwrap();
        assert_eq!(
            (c.service_rate(), c.scale_down_window(), c.bounds().max()),
            (0.5, Duration::from_secs(300), 10_000)
        );
        assert!(matches!(c.slo(), Slo::WaitProbability { .. }));
    }
}
