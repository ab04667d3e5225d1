//! Effective weight: static weight x slow-start ramp x dynamic factor.
//!
//! * **Slow start** (Envoy's semantics): an endpoint that was just added or came back
//!   healthy gets `max(min_weight_percent / 100, time_factor ^ (1 / aggression))` of its
//!   weight, where `time_factor = max(elapsed, 1 s) / window`, until `window` has passed.
//!   An aggression above 1 ramps faster at first; 1 is linear.
//! * **Dynamic factor** from the utilization the backend reports (KV-cache use, busy slots,
//!   0 to 1): `max(min_factor, 1 - utilization)`. An endpoint at 80% gets a fifth of its
//!   weight's share of new work, one at 20% gets four fifths: work flows towards headroom.
//!   Unknown utilization counts as a factor of 1 (no information is not evidence of load).
//!
//! Table-driven policies (`weighted_round_robin`, `random`, the persistence hashes) read
//! effective weights when their tables are built; load-based ones read them live. The
//! consistent hashes (`consistent_hash`, `bounded_load`, `maglev`, `rendezvous`) use static
//! weights only, as Envoy does: re-weighting a hash table would move keys on every step.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::weight::{DynamicWeight, SlowStart, effective_weight};
//! let ss = SlowStart::try_new(Duration::from_secs(30), 1.0, 10.0).unwrap();
//! // Halfway through a linear ramp, an endpoint of weight 4 counts as 2.
//! let w = effective_weight(4, Some(Duration::from_secs(15)), Some(&ss), None, &DynamicWeight::default());
//! assert!((w - 2.0).abs() < 1e-9);
//! ```

use std::time::Duration;

/// Why a weight setting was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightError {
    /// The slow-start window is zero.
    #[error("slow_start.window must be longer than zero")]
    ZeroWindow,
    /// The aggression is not a positive finite number.
    #[error("slow_start.aggression must be a positive number, got {0}")]
    Aggression(f64),
    /// A percentage is outside 0..=100.
    #[error("slow_start.min_weight_percent must be between 0 and 100, got {0}")]
    MinWeightPercent(f64),
    /// The minimum dynamic factor is outside (0, 1].
    #[error("dynamic_weight.min_factor must be above 0 and at most 1, got {0}")]
    MinFactor(f64),
}

/// Slow-start settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    window: Duration,
    aggression: f64,
    min_weight_percent: f64,
}

impl SlowStart {
    /// Validated settings (Envoy's defaults: aggression 1.0, minimum 10%).
    pub fn try_new(window: Duration, aggression: f64, min_weight_percent: f64) -> Result<Self, WeightError> {
        if window.is_zero() {
            return Err(WeightError::ZeroWindow);
        }
        if !(aggression.is_finite() && aggression > 0.0) {
            return Err(WeightError::Aggression(aggression));
        }
        if !(0.0..=100.0).contains(&min_weight_percent) {
            return Err(WeightError::MinWeightPercent(min_weight_percent));
        }
        Ok(SlowStart { window, aggression, min_weight_percent })
    }

    /// The ramp window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The ramp factor after `elapsed` in slow start (1.0 once the window has passed).
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed >= self.window {
            return 1.0;
        }
        let time_factor = elapsed.max(Duration::from_secs(1)).as_secs_f64() / self.window.as_secs_f64();
        let ramp = time_factor.min(1.0).powf(1.0 / self.aggression);
        ramp.max(self.min_weight_percent / 100.0).min(1.0)
    }
}

/// Dynamic weighting from reported utilization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicWeight {
    min_factor: f64,
}

impl Default for DynamicWeight {
    fn default() -> Self {
        DynamicWeight { min_factor: 0.05 }
    }
}

impl DynamicWeight {
    /// Validated settings: the factor never drops below `min_factor` (0 < min_factor <= 1;
    /// 1 turns dynamic weighting off).
    pub fn try_new(min_factor: f64) -> Result<Self, WeightError> {
        if !(min_factor > 0.0 && min_factor <= 1.0) {
            return Err(WeightError::MinFactor(min_factor));
        }
        Ok(DynamicWeight { min_factor })
    }

    /// The factor for a reported utilization.
    pub fn factor(&self, utilization: Option<f64>) -> f64 {
        match utilization {
            Some(u) => (1.0 - u.clamp(0.0, 1.0)).max(self.min_factor),
            None => 1.0,
        }
    }
}

/// The slow-start factor (0 < factor <= 1): 1 unless a ramp is running.
///
/// `in_slow_start` is the time since the ramp began, if one is running.
pub fn ramp_factor(in_slow_start: Option<Duration>, slow_start: Option<&SlowStart>) -> f64 {
    match (in_slow_start, slow_start) {
        (Some(elapsed), Some(ss)) => ss.factor(elapsed),
        _ => 1.0,
    }
}

/// Static weight x slow-start ramp ([`ramp_factor`]) x dynamic factor.
pub fn effective_weight(
    static_weight: u32,
    in_slow_start: Option<Duration>,
    slow_start: Option<&SlowStart>,
    utilization: Option<f64>,
    dynamic: &DynamicWeight,
) -> f64 {
    f64::from(static_weight) * ramp_factor(in_slow_start, slow_start) * dynamic.factor(utilization)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_ramps_and_ends() {
        let ss = SlowStart::try_new(Duration::from_secs(60), 1.0, 10.0).unwrap();
        assert_eq!(ss.factor(Duration::ZERO), 0.1);
        assert!((ss.factor(Duration::from_secs(30)) - 0.5).abs() < 1e-9);
        assert_eq!(ss.factor(Duration::from_secs(60)), 1.0);
        let aggressive = SlowStart::try_new(Duration::from_secs(60), 2.0, 0.0).unwrap();
        assert!((aggressive.factor(Duration::from_secs(15)) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn dynamic_factor_moves_work_to_headroom() {
        let d = DynamicWeight::default();
        assert_eq!(d.factor(None), 1.0);
        assert!((d.factor(Some(0.8)) - 0.2).abs() < 1e-9);
        assert_eq!(d.factor(Some(1.0)), 0.05);
        assert_eq!(DynamicWeight::try_new(1.0).unwrap().factor(Some(0.9)), 1.0);
    }

    #[test]
    fn nonsense_is_refused() {
        assert_eq!(SlowStart::try_new(Duration::ZERO, 1.0, 10.0), Err(WeightError::ZeroWindow));
        assert!(SlowStart::try_new(Duration::from_secs(1), 0.0, 10.0).is_err());
        assert!(SlowStart::try_new(Duration::from_secs(1), f64::NAN, 10.0).is_err());
        assert!(SlowStart::try_new(Duration::from_secs(1), 1.0, 101.0).is_err());
        assert!(DynamicWeight::try_new(0.0).is_err());
        assert!(DynamicWeight::try_new(1.5).is_err());
    }
}
