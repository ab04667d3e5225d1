//! The phi-accrual failure detector (Hayashibara, Défago, Yared and Katayama, "The φ Accrual
//! Failure Detector", 2004), as Akka and Cassandra use it for heartbeats.
//!
//! Instead of a fixed timeout, the detector learns how regularly a member sends heartbeats: it
//! keeps a bounded window of the last inter-arrival times and, at any moment, says how unlikely
//! the current silence is under a normal distribution fitted to them:
//! `phi(now) = -log10(1 - F(now - last))`, where `F` is the distribution's CDF. A phi of 1 means
//! a 10% chance that a heartbeat is still coming, 8 one in a hundred million. The member is
//! suspected when phi passes a threshold (8 by default, Akka's). A regular heartbeater is
//! suspected after little more than one missed period; an irregular one gets more slack.
//!
//! As in Akka, the fitted mean is lengthened by an *acceptable pause* (GC, a busy event loop),
//! the standard deviation has a floor (perfectly regular heartbeats would otherwise make any
//! jitter fatal), and `F` is the logistic approximation of the normal CDF
//! (`1 / (1 + e^(-y (1.5976 + 0.070566 y²)))`, error below 0.0002), which this module also
//! inverts in closed form to say *when* phi will pass the threshold: a driver sleeps until
//! then instead of polling. Until a few intervals are known, the detector says nothing.
//!
//! Cost: constant memory per member (`max_samples` intervals, 100 by default) and O(1) per
//! heartbeat and per question; sums are kept exactly in integers, so they never drift.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::phi::{HeartbeatHistory, PhiConfig};
//!
//! let config = PhiConfig::default();
//! let mut h = HeartbeatHistory::new(Instant::ZERO);
//! for i in 1..=20 {
//!     h.heartbeat(Instant::from_millis(i * 100), &config);
//! }
//! // Just after a heartbeat all is well; a second and a half of silence is a failure.
//! assert!(h.phi(Instant::from_millis(2_050), &config).unwrap() < 1.0);
//! assert!(h.phi(Instant::from_millis(3_500), &config).unwrap() > config.threshold);
//! let suspect = h.suspect_at(&config).unwrap();
//! assert!(suspect > Instant::from_millis(2_500) && suspect < Instant::from_millis(3_500));
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Instant;

/// How the detector judges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhiConfig {
    /// Suspect a member when phi passes this (8.0).
    pub threshold: f64,
    /// Added to the mean interval: a pause that should never make a member suspect (500 ms).
    pub acceptable_pause: Duration,
    /// The least standard deviation assumed (100 ms).
    pub min_std_dev: Duration,
    /// Intervals kept (100): older ones are forgotten.
    pub max_samples: usize,
    /// Intervals needed before the detector judges (5).
    pub min_samples: usize,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            acceptable_pause: Duration::from_millis(500),
            min_std_dev: Duration::from_millis(100),
            max_samples: 100,
            min_samples: 5,
        }
    }
}

impl PhiConfig {
    /// Checks the settings: a threshold above zero, at least one sample.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err(format!("must be a number above 0, got {}", self.threshold));
        }
        if self.max_samples == 0 || self.min_samples == 0 || self.min_samples > self.max_samples {
            return Err("need 0 < min_samples <= max_samples".to_owned());
        }
        Ok(())
    }
}

/// The heartbeat inter-arrival times of one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatHistory {
    intervals: VecDeque<u64>,
    sum: u128,
    sum_sq: u128,
    last: Instant,
}

// === impl HeartbeatHistory ===

impl HeartbeatHistory {
    /// A member first heard from at `now` (its registration).
    pub fn new(now: Instant) -> Self {
        HeartbeatHistory { intervals: VecDeque::new(), sum: 0, sum_sq: 0, last: now }
    }

    /// A heartbeat at `now`: its interval since the last one joins the window.
    pub fn heartbeat(&mut self, now: Instant, config: &PhiConfig) {
        let interval = now.saturating_since(self.last);
        self.last = now.max(self.last);
        let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        while self.intervals.len() >= config.max_samples.max(1) {
            if let Some(old) = self.intervals.pop_front() {
                self.sum -= u128::from(old);
                self.sum_sq -= u128::from(old) * u128::from(old);
            }
        }
        self.intervals.push_back(nanos);
        self.sum += u128::from(nanos);
        self.sum_sq += u128::from(nanos) * u128::from(nanos);
    }

    /// Intervals in the window.
    pub fn samples(&self) -> usize {
        self.intervals.len()
    }

    /// The last heartbeat.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// The mean (acceptable pause included) and the standard deviation (floored), in seconds;
    /// `None` until `min_samples` intervals are known.
    fn fit(&self, config: &PhiConfig) -> Option<(f64, f64)> {
        let n = self.intervals.len();
        if n < config.min_samples.max(1) {
            return None;
        }
        let n128 = n as u128;
        let mean = self.sum as f64 / n as f64;
        // n·Σx² − (Σx)², exact, over n²: the population variance.
        let spread = (n128 * self.sum_sq).saturating_sub(self.sum * self.sum) as f64 / (n as f64 * n as f64);
        let std_dev = spread.sqrt().max(config.min_std_dev.as_nanos() as f64);
        Some(((mean + config.acceptable_pause.as_nanos() as f64) / 1e9, std_dev / 1e9))
    }

    /// Phi at `now`: how unlikely it is that a heartbeat is still coming; `None` until enough
    /// intervals are known.
    pub fn phi(&self, now: Instant, config: &PhiConfig) -> Option<f64> {
        let (mean, std_dev) = self.fit(config)?;
        let elapsed = now.saturating_since(self.last).as_secs_f64();
        let y = (elapsed - mean) / std_dev;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        // -log10(1 - F) with F = 1 / (1 + e): 1 - F = e / (1 + e). Written as ln(1 + 1/e) so
        // that a large y (e near zero) stays finite as long as it can.
        Some((1.0 / e).ln_1p() / std::f64::consts::LN_10)
    }

    /// When phi passes `config.threshold` if no heartbeat comes; `None` until enough intervals
    /// are known (or for a threshold too high to ever pass).
    pub fn suspect_at(&self, config: &PhiConfig) -> Option<Instant> {
        let (mean, std_dev) = self.fit(config)?;
        let y = logistic_inverse(config.threshold)?;
        let after = (mean + y * std_dev).max(0.0);
        Some(self.last + Duration::try_from_secs_f64(after).ok()?)
    }
}

/// The `y` at which `-log10(e / (1 + e)) = threshold`, `e = exp(-y (a + b y²))`: the real
/// root of `b y³ + a y - L = 0` with `L = ln((1 - p) / p)`, `p = 10^-threshold` (Cardano;
/// one real root since `a, b > 0`).
fn logistic_inverse(threshold: f64) -> Option<f64> {
    let (a, b) = (1.5976, 0.070566);
    // L = ln(1/p - 1) = ln(10^threshold - 1).
    let l = (threshold * std::f64::consts::LN_10).exp_m1().ln();
    let (p, q) = (a / b, -l / b);
    let root = (q * q / 4.0 + p * p * p / 27.0).sqrt();
    let y = (-q / 2.0 + root).cbrt() + (-q / 2.0 - root).cbrt();
    y.is_finite().then_some(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn regular(period_ms: u64, beats: u64, config: &PhiConfig) -> HeartbeatHistory {
        let mut h = HeartbeatHistory::new(at(0));
        for i in 1..=beats {
            h.heartbeat(at(i * period_ms), config);
        }
        h
    }

    #[test]
    fn the_inverse_meets_phi_at_the_threshold() {
        let config = PhiConfig::default();
        let h = regular(1_000, 50, &config);
        for threshold in [0.1, 0.5, 1.0, 3.0, 8.0, 16.0] {
            let c = PhiConfig { threshold, ..config };
            let when = h.suspect_at(&c).expect("a time");
            let phi = h.phi(when, &c).expect("phi");
            assert!((phi - threshold).abs() < 1e-6, "threshold {threshold}: phi {phi}");
        }
    }

    #[test]
    fn regular_heartbeats_keep_phi_low_and_a_stop_passes_the_threshold_soon() {
        let config = PhiConfig::default();
        let h = regular(100, 30, &config);
        let last = h.last();
        // Right after, and one period on, phi is low.
        assert!(h.phi(last + Duration::from_millis(10), &config).expect("phi") < 0.5);
        assert!(h.phi(last + Duration::from_millis(100), &config).expect("phi") < 1.0);
        // It passes 8 in about a second of silence: long before a 30 s TTL.
        let suspect = h.suspect_at(&config).expect("a time").saturating_since(last);
        assert!(suspect > Duration::from_millis(600) && suspect < Duration::from_millis(1_500), "{suspect:?}");
        assert!(h.phi(last + Duration::from_secs(2), &config).expect("phi") > config.threshold);
        // Phi only grows with silence.
        let mut previous = 0.0;
        for ms in (0..3_000).step_by(50) {
            let phi = h.phi(last + Duration::from_millis(ms), &config).expect("phi");
            assert!(phi >= previous, "phi fell at {ms} ms");
            previous = phi;
        }
    }

    #[test]
    fn jittery_heartbeats_do_not_flap() {
        let config = PhiConfig::default();
        let mut h = HeartbeatHistory::new(at(0));
        // Every 1 s ± 300 ms (a fixed pattern, no randomness): each arrives before phi passes 8.
        let jitter = [0i64, 300, -300, 150, -250, 280, -100, 50, -300, 300];
        let mut now = 0u64;
        for i in 0..200 {
            let next = (now as i64 + 1_000 + jitter[i % jitter.len()]) as u64;
            if h.samples() >= config.min_samples {
                let phi = h.phi(at(next), &config).expect("phi");
                assert!(phi < config.threshold, "heartbeat {i} would have been too late: phi {phi}");
                assert!(h.suspect_at(&config).expect("a time") > at(next));
            }
            h.heartbeat(at(next), &config);
            now = next;
        }
    }

    #[test]
    fn memory_is_bounded_and_the_window_forgets() {
        let config = PhiConfig { max_samples: 10, ..PhiConfig::default() };
        let mut h = regular(5_000, 100, &config);
        assert_eq!(h.samples(), 10);
        // Ten fast beats replace the slow ones entirely.
        let last = h.last();
        for i in 1..=10 {
            h.heartbeat(last + Duration::from_millis(i * 100), &config);
        }
        assert_eq!(h.samples(), 10);
        let suspect = h.suspect_at(&config).expect("a time").saturating_since(h.last());
        assert!(suspect < Duration::from_secs(2), "{suspect:?}");
    }

    #[test]
    fn too_few_samples_say_nothing_and_settings_are_checked() {
        let config = PhiConfig::default();
        let h = regular(100, 4, &config);
        assert_eq!((h.phi(at(10_000), &config), h.suspect_at(&config)), (None, None));
        assert!(regular(100, 5, &config).phi(at(10_000), &config).is_some());
        assert!(config.validate().is_ok());
        for threshold in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(PhiConfig { threshold, ..config }.validate().is_err(), "{threshold}");
        }
        assert!(PhiConfig { min_samples: 200, ..config }.validate().is_err());
        // A threshold beyond what f64 can tell apart never passes.
        assert_eq!(regular(100, 10, &config).suspect_at(&PhiConfig { threshold: 400.0, ..config }), None);
    }
}
