//! When to restart a crashed replica, and when to give up: exponential backoff with a reset,
//! bounded by a restart intensity.
//!
//! Two rules, each from a supervisor that has run fleets for decades:
//!
//! - **Backoff** (Kubernetes' CrashLoopBackOff, systemd's `RestartSec` steps): the n-th restart
//!   in a row waits `min(cap, base x factor^(n-1))`: 500 ms, 1 s, 2 s, 4 s ... 30 s with the
//!   defaults. A replica that ran healthily (ready, then up) for `reset_after` before it exited
//!   starts again from `base`: one crash a day never waits 30 s.
//! - **Intensity** (Erlang/OTP supervisors' `intensity` and `period`): more than
//!   `max_restarts` restarts within `within` means restarting does not help; the replica is
//!   given up (failed) and reported, instead of crash-looping forever.
//!
//! This is a decision, not an effect: [`RestartTracker`] takes the time as an [`Instant`] and
//! never reads a clock, so it is tested (and simulated) without processes; the local actuator
//! of `fulcrum-scale` carries its decisions out. The waits are a [`Backoff`] without jitter.
//! Cost: O(max_restarts) per exit.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::restart::{RestartDecision, RestartPolicy, RestartSettings, RestartTracker};
//!
//! let policy = RestartPolicy::try_new(RestartSettings::default()).unwrap();
//! let mut tracker = RestartTracker::new(policy);
//! // Crashes right after start: 500 ms, then 1 s, then 2 s.
//! let ms = |n| Instant::from_millis(n);
//! assert_eq!(tracker.on_exit(ms(0), Duration::ZERO), RestartDecision::Restart { attempt: 1, delay: Duration::from_millis(500) });
//! assert_eq!(tracker.on_exit(ms(600), Duration::ZERO), RestartDecision::Restart { attempt: 2, delay: Duration::from_secs(1) });
//! assert_eq!(tracker.on_exit(ms(1700), Duration::ZERO), RestartDecision::Restart { attempt: 3, delay: Duration::from_secs(2) });
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::time::Instant;

/// Restart settings as written, with their defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestartSettings {
    /// The wait before the first restart in a row (500 ms).
    pub backoff_base: Duration,
    /// How much each further restart in a row multiplies the wait (2.0).
    pub backoff_factor: f64,
    /// The longest wait (30 s).
    pub backoff_max: Duration,
    /// How long a replica must have been ready before it exited for the backoff to start over
    /// (10 s).
    pub reset_after: Duration,
    /// The most restarts allowed within `within` (5); one more and the replica is given up.
    pub max_restarts: u32,
    /// The sliding window `max_restarts` counts over (60 s).
    pub within: Duration,
}

impl Default for RestartSettings {
    fn default() -> Self {
        RestartSettings {
            backoff_base: Duration::from_millis(500),
            backoff_factor: 2.0,
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
            max_restarts: 5,
            within: Duration::from_secs(60),
        }
    }
}

/// A restart setting was refused: which one, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("restart.{field} {problem}")]
pub struct RestartConfigError {
    /// The setting at fault, as configuration spells it.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub problem: String,
}

/// Validated restart settings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RestartPolicy {
    settings: RestartSettings,
}

// === impl RestartPolicy ===

impl RestartPolicy {
    /// Checks the settings: a base above zero and not above the cap, a finite factor of at least
    /// 1, a window above zero. `max_restarts = 0` is allowed: the first exit gives up.
    pub fn try_new(settings: RestartSettings) -> Result<Self, RestartConfigError> {
        let err = |field, problem: String| Err(RestartConfigError { field, problem });
        if settings.backoff_base.is_zero() {
            return err("backoff_base", "must be longer than zero".into());
        }
        if settings.backoff_max < settings.backoff_base {
            return err(
                "backoff_max",
                format!(
                    "must not be shorter than backoff_base ({:?}), got {:?}",
                    settings.backoff_base, settings.backoff_max
                ),
            );
        }
        if !(settings.backoff_factor.is_finite() && settings.backoff_factor >= 1.0) {
            return err(
                "backoff_factor",
                format!("must be a finite number of at least 1, got {}", settings.backoff_factor),
            );
        }
        if settings.within.is_zero() {
            return err("within", "must be longer than zero".into());
        }
        Ok(RestartPolicy { settings })
    }

    /// The settings.
    pub fn settings(&self) -> &RestartSettings {
        &self.settings
    }

    /// The wait before restart number `attempt` in a row (from 1):
    /// `min(cap, base x factor^(attempt-1))`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.backoff().ceiling(attempt)
    }

    /// The backoff the settings describe.
    pub fn backoff(&self) -> Backoff {
        let s = &self.settings;
        Backoff::new(s.backoff_base, s.backoff_max).with_factor(s.backoff_factor)
    }
}

/// What to do after a replica exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start it again after `delay`; this is restart number `attempt` in a row (from 1).
    Restart {
        /// Restarts in a row, this one included.
        attempt: u32,
        /// How long to wait first.
        delay: Duration,
    },
    /// Stop trying: `restarts` restarts already happened within `within`.
    GiveUp {
        /// The restarts counted in the window.
        restarts: u32,
        /// The window.
        within: Duration,
    },
}

/// One replica's restart history; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// Restarts in a row since the last reset.
    attempt: u32,
    /// When each restart within the window was decided, oldest first.
    recent: VecDeque<Instant>,
}

// === impl RestartTracker ===

impl RestartTracker {
    /// A replica that has not crashed yet.
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker { policy, attempt: 0, recent: VecDeque::new() }
    }

    /// The replica exited at `now` after being ready for `healthy_for` (zero if it never got
    /// ready). Restarts within the window count every exit; the backoff starts over first if
    /// `healthy_for` reached `reset_after`.
    pub fn on_exit(&mut self, now: Instant, healthy_for: Duration) -> RestartDecision {
        let s = self.policy.settings;
        if healthy_for >= s.reset_after {
            self.attempt = 0;
        }
        while self.recent.front().is_some_and(|t| now.saturating_since(*t) >= s.within) {
            self.recent.pop_front();
        }
        let restarts = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if restarts >= s.max_restarts {
            return RestartDecision::GiveUp { restarts, within: s.within };
        }
        self.recent.push_back(now);
        self.attempt = self.attempt.saturating_add(1);
        RestartDecision::Restart { attempt: self.attempt, delay: self.policy.delay(self.attempt) }
    }

    /// Restarts in a row since the backoff last started over.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    fn policy(max_restarts: u32, within: Duration) -> RestartPolicy {
        RestartPolicy::try_new(RestartSettings { max_restarts, within, ..RestartSettings::default() }).unwrap()
    }

    fn delay(d: RestartDecision) -> Duration {
        match d {
            RestartDecision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy::default();
        let delays: Vec<_> = (1..=9).map(|n| p.delay(n)).collect();
        assert_eq!(
            delays,
            [ms(500), ms(1000), ms(2000), ms(4000), ms(8000), ms(16000), ms(30000), ms(30000), ms(30000)]
        );
        assert_eq!(p.delay(0), ms(500));
        assert_eq!(p.delay(u32::MAX), ms(30_000));
    }

    #[test]
    fn backoff_grows_on_repeated_crashes() {
        let mut t = RestartTracker::new(policy(100, Duration::from_secs(3600)));
        let mut now = 0;
        let mut seen = Vec::new();
        for _ in 0..5 {
            let d = delay(t.on_exit(at(now), Duration::ZERO));
            seen.push(d);
            now += d.as_millis() as u64 + 100;
        }
        assert_eq!(seen, [ms(500), ms(1000), ms(2000), ms(4000), ms(8000)]);
        assert_eq!(t.attempt(), 5);
    }

    #[test]
    fn backoff_resets_after_a_healthy_run() {
        let mut t = RestartTracker::new(policy(100, Duration::from_secs(3600)));
        for i in 0..4 {
            t.on_exit(at(i * 20_000), Duration::ZERO);
        }
        assert_eq!(t.attempt(), 4);
        // Up and ready for 9.9 s: not long enough.
        assert_eq!(delay(t.on_exit(at(100_000), ms(9_900))), ms(8000));
        // Ready for 10 s: starts over.
        assert_eq!(t.on_exit(at(200_000), ms(10_000)), RestartDecision::Restart { attempt: 1, delay: ms(500) });
    }

    #[test]
    fn intensity_limit_gives_up() {
        let mut t = RestartTracker::new(policy(3, Duration::from_secs(10)));
        for i in 0..3 {
            assert!(matches!(t.on_exit(at(i * 1000), Duration::ZERO), RestartDecision::Restart { .. }));
        }
        assert_eq!(
            t.on_exit(at(3000), Duration::ZERO),
            RestartDecision::GiveUp { restarts: 3, within: Duration::from_secs(10) }
        );
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let mut t = RestartTracker::new(policy(2, Duration::from_secs(10)));
        assert!(matches!(t.on_exit(at(0), Duration::ZERO), RestartDecision::Restart { .. }));
        assert!(matches!(t.on_exit(at(5_000), Duration::ZERO), RestartDecision::Restart { .. }));
        // At 10 s the first restart is exactly `within` old: it no longer counts.
        assert!(matches!(t.on_exit(at(10_000), Duration::ZERO), RestartDecision::Restart { .. }));
        assert!(matches!(t.on_exit(at(12_000), Duration::ZERO), RestartDecision::GiveUp { restarts: 2, .. }));
    }

    #[test]
    fn zero_restarts_gives_up_at_once() {
        let mut t = RestartTracker::new(policy(0, Duration::from_secs(10)));
        assert_eq!(
            t.on_exit(at(0), Duration::ZERO),
            RestartDecision::GiveUp { restarts: 0, within: Duration::from_secs(10) }
        );
    }

    #[test]
    fn settings_are_checked() {
        let bad = |s: RestartSettings| RestartPolicy::try_new(s).unwrap_err().field;
        let d = RestartSettings::default();
        assert_eq!(bad(RestartSettings { backoff_base: Duration::ZERO, ..d }), "backoff_base");
        assert_eq!(bad(RestartSettings { backoff_max: ms(100), ..d }), "backoff_max");
        assert_eq!(bad(RestartSettings { backoff_factor: 0.5, ..d }), "backoff_factor");
        assert_eq!(bad(RestartSettings { backoff_factor: f64::NAN, ..d }), "backoff_factor");
        assert_eq!(bad(RestartSettings { within: Duration::ZERO, ..d }), "within");
        let err = RestartPolicy::try_new(RestartSettings { backoff_factor: 0.5, ..d }).unwrap_err();
        assert_eq!(err.to_string(), "restart.backoff_factor must be a finite number of at least 1, got 0.5");
    }
}
