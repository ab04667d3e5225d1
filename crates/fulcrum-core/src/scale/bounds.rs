//! The bounds every policy's decision ends in: minimum, maximum, scale to zero and back.

use std::time::Duration;

use super::{Activity, Check, ConfigError, Decision, Signals};
use crate::time::Instant;

const SECTION: Check = Check { section: "autoscale" };

/// Replica bounds as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundsSettings {
    /// The fewest replicas (1). 0 allows scaling to zero after `scale_to_zero_after` without load.
    pub min_replicas: u32,
    /// The most replicas (10).
    pub max_replicas: u32,
    /// With `min_replicas = 0`: how long a pool must see no load before it goes to zero (5 min;
    /// a model server takes long to load its weights again).
    pub scale_to_zero_after: Duration,
}

impl Default for BoundsSettings {
    fn default() -> Self {
        BoundsSettings { min_replicas: 1, max_replicas: 10, scale_to_zero_after: Duration::from_secs(300) }
    }
}

/// Validated replica bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    min: u32,
    max: u32,
    scale_to_zero_after: Duration,
}

// === impl Bounds ===

impl Default for Bounds {
    fn default() -> Self {
        let s = BoundsSettings::default();
        Bounds { min: s.min_replicas, max: s.max_replicas, scale_to_zero_after: s.scale_to_zero_after }
    }
}

impl Bounds {
    /// Checks the settings: `max_replicas >= 1`, `min_replicas <= max_replicas`,
    /// `scale_to_zero_after` longer than zero.
    pub fn try_new(s: BoundsSettings) -> Result<Self, ConfigError> {
        if s.max_replicas == 0 {
            return Err(SECTION.err("max_replicas", "must be at least 1, got 0"));
        }
        if s.min_replicas > s.max_replicas {
            return Err(SECTION.err(
                "min_replicas",
                format!("must not be above max_replicas ({}), got {}", s.max_replicas, s.min_replicas),
            ));
        }
        let scale_to_zero_after = SECTION.nonzero_duration("scale_to_zero_after", s.scale_to_zero_after)?;
        Ok(Bounds { min: s.min_replicas, max: s.max_replicas, scale_to_zero_after })
    }

    /// The fewest replicas.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// The most replicas.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// How long without load before scaling to zero, when `min_replicas` is 0.
    pub fn scale_to_zero_after(&self) -> Option<Duration> {
        (self.min == 0).then_some(self.scale_to_zero_after)
    }

    /// Whether a count is one a decision may give: within `[min, max]`, or 0 when the minimum
    /// is 0. (With a minimum of 0 a running pool keeps at least one replica until it has been
    /// idle long enough; 1 is within the bounds then.)
    pub fn allows(&self, replicas: u32) -> bool {
        (self.min..=self.max).contains(&replicas)
    }
}

/// The state the bounds need: since when the pool has been idle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Floor {
    bounds: Bounds,
    idle_since: Option<Instant>,
}

// === impl Floor ===

impl Floor {
    pub(crate) fn new(bounds: Bounds) -> Self {
        Floor { bounds, idle_since: None }
    }

    pub(crate) fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// Since when the pool has been idle without a break, if it is.
    #[cfg(test)]
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Brings a policy's proposal within the bounds, and decides scaling to and from zero.
    ///
    /// Idleness needs evidence: a tick without any load measurement ends an idle period as a
    /// busy one does, so that a gap in metrics never scales a pool to zero.
    pub(crate) fn apply(&mut self, now: Instant, signals: &Signals, proposal: u32, reason: String) -> Decision {
        match signals.activity() {
            Activity::Idle => {
                self.idle_since.get_or_insert(now);
            }
            Activity::Busy | Activity::Unknown => self.idle_since = None,
        }
        let Bounds { min, max, scale_to_zero_after } = self.bounds;
        if min == 0 {
            if signals.replicas == 0 {
                return match signals.activity() {
                    Activity::Busy => Decision::new(1, "load arrived with no replica running: starting one"),
                    Activity::Idle | Activity::Unknown => Decision::new(0, "scaled to zero: no load"),
                };
            }
            if let Some(since) = self.idle_since {
                let idle = now.saturating_since(since);
                if idle >= scale_to_zero_after {
                    return Decision::new(
                        0,
                        format!("no load for {idle:?} (scale_to_zero_after {scale_to_zero_after:?}): scaling to zero"),
                    );
                }
            }
        }
        let floor = min.max(1);
        if proposal > max {
            Decision::new(max, format!("{reason}; held at max_replicas {max} (wanted {proposal})"))
        } else if proposal < floor {
            let what = if min == 0 { "one replica until the pool has been idle long enough" } else { "min_replicas" };
            Decision::new(floor, format!("{reason}; raised to {floor} ({what}; wanted {proposal})"))
        } else {
            Decision::new(proposal, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scale::secs;

    fn floor(min: u32, max: u32, after: u64) -> Floor {
        let settings =
            BoundsSettings { min_replicas: min, max_replicas: max, scale_to_zero_after: Duration::from_secs(after) };
        Floor::new(Bounds::try_new(settings).unwrap())
    }

    fn rate(replicas: u32, rate: f64) -> Signals {
        Signals { replicas, request_rate: Some(rate), ..Signals::default() }
    }

    #[test]
    fn clamps_to_min_and_max() {
        let mut f = floor(2, 5, 60);
        assert_eq!(f.apply(secs(0), &rate(3, 1.0), 9, "x".into()).desired, 5);
        let low = f.apply(secs(1), &rate(3, 1.0), 0, "x".into());
        assert_eq!(low.desired, 2);
        assert!(low.reason.contains("min_replicas"), "{}", low.reason);
        assert_eq!(f.apply(secs(2), &rate(3, 1.0), 4, "x".into()), Decision::new(4, "x"));
        // Idle for long, but the minimum is 2.
        assert_eq!(f.apply(secs(1_000), &rate(3, 0.0), 0, "x".into()).desired, 2);
    }

    #[test]
    fn scales_to_zero_after_idle_and_back_to_one() {
        let mut f = floor(0, 5, 60);
        // Busy: at least one.
        assert_eq!(f.apply(secs(0), &rate(2, 3.0), 0, "x".into()).desired, 1);
        // Idle from t = 10 s; not long enough at 69 s.
        assert_eq!(f.apply(secs(10), &rate(1, 0.0), 0, "x".into()).desired, 1);
        assert_eq!(f.idle_since(), Some(secs(10)));
        assert_eq!(f.apply(secs(69), &rate(1, 0.0), 0, "x".into()).desired, 1);
        let zero = f.apply(secs(70), &rate(1, 0.0), 0, "x".into());
        assert_eq!(zero.desired, 0, "{zero}");
        // At zero it stays at zero while idle, whatever the policy proposes.
        assert_eq!(f.apply(secs(80), &rate(0, 0.0), 3, "x".into()).desired, 0);
        // Load comes back: one replica, whatever the policy proposes.
        let wake =
            f.apply(secs(90), &Signals { replicas: 0, queue_length: Some(7), ..Signals::default() }, 0, "x".into());
        assert_eq!(wake.desired, 1, "{wake}");
        assert_eq!(f.idle_since(), None);
    }

    #[test]
    fn a_metrics_gap_restarts_the_idle_period() {
        let mut f = floor(0, 5, 60);
        f.apply(secs(0), &rate(1, 0.0), 1, "x".into());
        f.apply(secs(30), &Signals { replicas: 1, ..Signals::default() }, 1, "x".into());
        assert_eq!(f.apply(secs(61), &rate(1, 0.0), 1, "x".into()).desired, 1);
        assert_eq!(f.apply(secs(121), &rate(1, 0.0), 1, "x".into()).desired, 0);
    }

    #[test]
    fn bad_bounds_are_refused_by_name() {
        let bad = |min, max, after| {
            Bounds::try_new(BoundsSettings {
                min_replicas: min,
                max_replicas: max,
                scale_to_zero_after: Duration::from_secs(after),
            })
            .unwrap_err()
        };
        assert_eq!(bad(0, 0, 1).to_string(), "autoscale.max_replicas must be at least 1, got 0");
        assert_eq!(bad(3, 2, 1).to_string(), "autoscale.min_replicas must not be above max_replicas (2), got 3");
        assert_eq!(bad(0, 2, 0).field, "scale_to_zero_after");
        assert_eq!(Bounds::try_new(BoundsSettings::default()).unwrap(), Bounds::default());
        let b = Bounds::default();
        assert!(b.allows(1) && b.allows(10) && !b.allows(0) && !b.allows(11));
        assert_eq!(b.scale_to_zero_after(), None);
    }
}
