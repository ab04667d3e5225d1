//! Active health checks: the heartbeat of each endpoint, as HAProxy's `rise` and `fall`.
//!
//! The proxy probes each endpoint every `interval` (every `unhealthy_interval` while it is
//! down, HAProxy's `downinter`), spread by a random jitter of +-`jitter` x the interval so
//! that a fleet of proxies does not probe in lockstep (HAProxy's `spread-checks`, Envoy's
//! `interval_jitter_percent`). A probe that does not answer within `timeout` is a failure.
//!
//! A [`HealthState`] is one endpoint's state machine:
//!
//! * a new endpoint starts [`Health::Unknown`] and is not routable; its first successful
//!   check makes it [`Health::Healthy`] (it joins after its first success, as Envoy's
//!   `ignore_new_hosts_until_first_hc`), and `fall` failures in a row make it unhealthy;
//! * a healthy endpoint goes [`Health::Unhealthy`] after `fall` consecutive failures;
//! * an unhealthy endpoint comes back after `rise` consecutive successes.
//!
//! Every change is reported as a [`Transition`] with a [`HealthReason`] to log. On every
//! transition *to* healthy (a recovery, or a new endpoint's first success) the proxy starts
//! the endpoint's slow-start ramp with
//! [`LoadSignals::start_slow_start`](crate::LoadSignals::start_slow_start), so that a backend
//! that was just restarted gets a growing share of traffic ([`weight::SlowStart`](crate::weight::SlowStart)).
//!
//! The first check of a new endpoint is due at once; each later one is due at
//! [`HealthState::next_check`] from the moment the previous check completed. Cost: O(1) a
//! check, a few dozen bytes an endpoint.
//!
//! ```
//! use fulcrum_core::Instant;
//! use fulcrum_core::resilience::health::{Health, HealthConfig, HealthState};
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let config = HealthConfig::default(); // every 2 s +-10%, rise 2, fall 3
//! let mut state = HealthState::new(&config, Instant::ZERO);
//! assert!(!state.is_routable());
//! let joined = state.record(true, Instant::from_millis(5)).unwrap();
//! assert_eq!((joined.from, joined.to), (Health::Unknown, Health::Healthy));
//! let mut rng = SmallRng::seed_from_u64(1);
//! let next = state.next_check(Instant::from_millis(5), &mut rng);
//! assert!(next >= Instant::from_millis(1_805) && next <= Instant::from_millis(2_205));
//! ```

use std::fmt;
use std::time::Duration;

use rand::RngCore;

use super::{Check, ConfigError};
use crate::hash::unit_interval;
use crate::time::Instant;

const SECTION: Check = Check { section: "health_check" };

/// Health-check settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthSettings {
    /// Time between checks of an endpoint that is up or unknown (2 s).
    pub interval: Duration,
    /// Time between checks of an endpoint that is down (`None`: the same as `interval`).
    pub unhealthy_interval: Option<Duration>,
    /// How long a check may take before it counts as failed (1 s). The proxy enforces it.
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy endpoint back (2).
    pub rise: u32,
    /// Consecutive failures that take an endpoint down (3).
    pub fall: u32,
    /// Random spread of each interval, as a fraction of it, in `[0, 1)` (0.1: +-10%).
    pub jitter: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(2),
            unhealthy_interval: None,
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            jitter: 0.1,
        }
    }
}

/// Validated health-check settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthConfig {
    interval: Duration,
    unhealthy_interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    jitter: f64,
}

// === impl HealthConfig ===

impl Default for HealthConfig {
    fn default() -> Self {
        let s = HealthSettings::default();
        HealthConfig {
            interval: s.interval,
            unhealthy_interval: s.interval,
            timeout: s.timeout,
            rise: s.rise,
            fall: s.fall,
            jitter: s.jitter,
        }
    }
}

impl HealthConfig {
    /// Checks the settings: durations longer than zero, `rise` and `fall` at least 1,
    /// `jitter` in `[0, 1)`.
    pub fn try_new(s: HealthSettings) -> Result<Self, ConfigError> {
        let interval = SECTION.nonzero_duration("interval", s.interval)?;
        let unhealthy_interval = match s.unhealthy_interval {
            Some(d) => SECTION.nonzero_duration("unhealthy_interval", d)?,
            None => interval,
        };
        let timeout = SECTION.nonzero_duration("timeout", s.timeout)?;
        let rise = SECTION.positive("rise", s.rise)?;
        let fall = SECTION.positive("fall", s.fall)?;
        if !(s.jitter.is_finite() && (0.0..1.0).contains(&s.jitter)) {
            return Err(SECTION.err("jitter", format!("must be a fraction in [0, 1), got {}", s.jitter)));
        }
        Ok(HealthConfig { interval, unhealthy_interval, timeout, rise, fall, jitter: s.jitter })
    }

    /// Time between checks of an endpoint that is up or unknown.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Time between checks of an endpoint that is down.
    pub fn unhealthy_interval(&self) -> Duration {
        self.unhealthy_interval
    }

    /// How long a check may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Consecutive successes that bring an endpoint back.
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// Consecutive failures that take an endpoint down.
    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Random spread of each interval, as a fraction of it.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }
}

/// What the checks say about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// Not checked successfully yet: not routable.
    Unknown,
    /// Up: routable.
    Healthy,
    /// Down: not routable.
    Unhealthy,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// Why the health of an endpoint changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthReason {
    /// A new endpoint passed its first check.
    FirstSuccess,
    /// This many checks passed in a row (`rise`).
    Rise {
        /// Consecutive successes.
        successes: u32,
    },
    /// This many checks failed in a row (`fall`).
    Fall {
        /// Consecutive failures.
        failures: u32,
    },
}

impl fmt::Display for HealthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthReason::FirstSuccess => f.write_str("first health check passed"),
            HealthReason::Rise { successes } => write!(f, "{successes} consecutive health checks passed"),
            HealthReason::Fall { failures } => write!(f, "{failures} consecutive health checks failed"),
        }
    }
}

/// A change of health, to log and act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: Health,
    /// The state after.
    pub to: Health,
    /// Why.
    pub reason: HealthReason,
    /// When.
    pub at: Instant,
}

impl Transition {
    /// The endpoint became routable: the proxy starts its slow-start ramp.
    pub fn is_recovery(&self) -> bool {
        self.to == Health::Healthy
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)
    }
}

/// One endpoint's health-check state machine.
#[derive(Clone, Debug)]
pub struct HealthState {
    config: HealthConfig,
    health: Health,
    since: Instant,
    successes: u32,
    failures: u32,
}

// === impl HealthState ===

impl HealthState {
    /// A new endpoint, [`Health::Unknown`] since `now`. Its first check is due at once.
    pub fn new(config: &HealthConfig, now: Instant) -> Self {
        HealthState { config: *config, health: Health::Unknown, since: now, successes: 0, failures: 0 }
    }

    /// An endpoint already known to be `health` (its checks restart after a reload): no
    /// transition is reported until the checks change its state. Counters start at zero.
    pub fn resume(config: &HealthConfig, health: Health, now: Instant) -> Self {
        HealthState { health, ..HealthState::new(config, now) }
    }

    /// Applies new settings; the state and its counters stay.
    pub fn reconfigure(&mut self, config: &HealthConfig) {
        self.config = *config;
    }

    /// The current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Whether requests may go to the endpoint: only when healthy.
    pub fn is_routable(&self) -> bool {
        self.health == Health::Healthy
    }

    /// Consecutive successful checks so far.
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Consecutive failed checks so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Records the result of a check that completed at `now` (a timeout is a failure), and
    /// returns the change of state it caused, if any.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
        }
        let (to, reason) = match self.health {
            Health::Unknown if ok => (Health::Healthy, HealthReason::FirstSuccess),
            Health::Unhealthy if ok && self.successes >= self.config.rise => {
                (Health::Healthy, HealthReason::Rise { successes: self.successes })
            }
            Health::Unknown | Health::Healthy if !ok && self.failures >= self.config.fall => {
                (Health::Unhealthy, HealthReason::Fall { failures: self.failures })
            }
            _ => return None,
        };
        let from = self.health;
        self.health = to;
        self.since = now;
        self.successes = 0;
        self.failures = 0;
        Some(Transition { from, to, reason, at: now })
    }

    /// When the next check is due, given that the previous one completed at `last`: the
    /// interval (the unhealthy interval while down) spread uniformly by +-jitter.
    pub fn next_check(&self, last: Instant, rng: &mut dyn RngCore) -> Instant {
        let base = match self.health {
            Health::Unhealthy => self.config.unhealthy_interval,
            Health::Unknown | Health::Healthy => self.config.interval,
        };
        let spread = self.config.jitter * (2.0 * unit_interval(rng.next_u64()) - 1.0);
        last + base.mul_f64(1.0 + spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    fn state() -> HealthState {
        HealthState::new(&HealthConfig::default(), ms(0))
    }

    #[test]
    fn new_endpoint_joins_after_first_success() {
        let mut s = state();
        assert_eq!(s.health(), Health::Unknown);
        assert!(!s.is_routable());
        let t = s.record(true, ms(10)).unwrap();
        assert_eq!(
            t,
            Transition { from: Health::Unknown, to: Health::Healthy, reason: HealthReason::FirstSuccess, at: ms(10) }
        );
        assert!(t.is_recovery());
        assert!(s.is_routable());
        assert_eq!(s.since(), ms(10));
        assert_eq!(s.record(true, ms(20)), None);
    }

    #[test]
    fn a_resumed_state_reports_only_real_changes() {
        let config = HealthConfig::default();
        let mut s = HealthState::resume(&config, Health::Healthy, Instant::ZERO);
        assert!(s.is_routable());
        // Checks that keep succeeding change nothing: no recovery, no slow start.
        assert_eq!(s.record(true, Instant::ZERO), None);
        let mut down = HealthState::resume(&config, Health::Unhealthy, Instant::ZERO);
        assert!(!down.is_routable());
        let mut changed = None;
        for _ in 0..config.rise() {
            changed = changed.or(down.record(true, Instant::ZERO));
        }
        assert!(changed.is_some_and(|t| t.is_recovery()));
        for _ in 0..config.fall() {
            changed = s.record(false, Instant::ZERO);
        }
        assert_eq!(changed.map(|t| t.to), Some(Health::Unhealthy));
    }

    #[test]
    fn unknown_goes_down_after_fall_failures() {
        let mut s = state();
        assert_eq!(s.record(false, ms(1)), None);
        assert_eq!(s.record(false, ms(2)), None);
        let t = s.record(false, ms(3)).unwrap();
        assert_eq!((t.from, t.to, t.reason), (Health::Unknown, Health::Unhealthy, HealthReason::Fall { failures: 3 }));
        assert!(!t.is_recovery());
    }

    #[test]
    fn healthy_falls_and_rises() {
        let mut s = state();
        s.record(true, ms(0));
        // Two failures, then a success: the count starts again.
        assert_eq!(s.record(false, ms(1)), None);
        assert_eq!(s.record(false, ms(2)), None);
        assert_eq!(s.record(true, ms(3)), None);
        assert_eq!(s.consecutive_failures(), 0);
        assert_eq!(s.record(false, ms(4)), None);
        assert_eq!(s.record(false, ms(5)), None);
        let down = s.record(false, ms(6)).unwrap();
        assert_eq!((down.from, down.to), (Health::Healthy, Health::Unhealthy));
        assert_eq!(down.to_string(), "healthy -> unhealthy: 3 consecutive health checks failed");
        assert!(!s.is_routable());
        // One success is not enough (rise 2), a failure resets it.
        assert_eq!(s.record(true, ms(7)), None);
        assert_eq!(s.record(false, ms(8)), None);
        assert_eq!(s.record(true, ms(9)), None);
        let up = s.record(true, ms(10)).unwrap();
        assert_eq!(
            (up.from, up.to, up.reason),
            (Health::Unhealthy, Health::Healthy, HealthReason::Rise { successes: 2 })
        );
        assert!(up.is_recovery());
        assert_eq!(s.since(), ms(10));
        // Staying down does not report again.
        let mut s2 = state();
        for i in 0..3 {
            s2.record(false, ms(i));
        }
        assert_eq!(s2.record(false, ms(4)), None);
    }

    #[test]
    fn rise_and_fall_of_one() {
        let config = HealthConfig::try_new(HealthSettings { rise: 1, fall: 1, ..HealthSettings::default() }).unwrap();
        let mut s = HealthState::new(&config, ms(0));
        assert_eq!(s.record(false, ms(1)).unwrap().to, Health::Unhealthy);
        assert_eq!(s.record(true, ms(2)).unwrap().to, Health::Healthy);
        assert_eq!(s.record(false, ms(3)).unwrap().to, Health::Unhealthy);
    }

    #[test]
    fn next_check_uses_the_unhealthy_interval_while_down() {
        let config = HealthConfig::try_new(HealthSettings {
            interval: Duration::from_secs(2),
            unhealthy_interval: Some(Duration::from_secs(10)),
            jitter: 0.0,
            ..HealthSettings::default()
        })
        .unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut s = HealthState::new(&config, ms(0));
        assert_eq!(s.next_check(ms(100), &mut rng), ms(2_100));
        for i in 0..3 {
            s.record(false, ms(i));
        }
        assert_eq!(s.next_check(ms(100), &mut rng), ms(10_100));
        s.record(true, ms(4));
        s.record(true, ms(5));
        assert_eq!(s.next_check(ms(100), &mut rng), ms(2_100));
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let s = state();
        let mut rng = SmallRng::seed_from_u64(42);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for _ in 0..10_000 {
            let next = s.next_check(ms(1_000), &mut rng).as_nanos();
            lo = lo.min(next);
            hi = hi.max(next);
        }
        // 2 s +-10% after 1 s; both ends are reached to within 1%.
        assert!(lo >= ms(2_800).as_nanos() && lo < ms(2_820).as_nanos(), "{lo}");
        assert!(hi <= ms(3_200).as_nanos() && hi > ms(3_180).as_nanos(), "{hi}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |s: HealthSettings| HealthConfig::try_new(s).unwrap_err();
        let d = HealthSettings::default();
        assert_eq!(bad(HealthSettings { interval: Duration::ZERO, ..d }).field, "interval");
        assert_eq!(bad(HealthSettings { unhealthy_interval: Some(Duration::ZERO), ..d }).field, "unhealthy_interval");
        assert_eq!(bad(HealthSettings { timeout: Duration::ZERO, ..d }).field, "timeout");
        assert_eq!(bad(HealthSettings { rise: 0, ..d }).to_string(), "health_check.rise must be at least 1, got 0");
        assert_eq!(bad(HealthSettings { fall: 0, ..d }).field, "fall");
        for j in [-0.1, 1.0, f64::NAN, f64::INFINITY] {
            let e = bad(HealthSettings { jitter: j, ..d });
            assert_eq!(e.field, "jitter", "{j}");
        }
        assert_eq!(HealthConfig::try_new(d).unwrap(), HealthConfig::default());
    }

    #[test]
    fn reconfigure_keeps_state() {
        let mut s = state();
        s.record(true, ms(0));
        s.record(false, ms(1));
        let one = HealthConfig::try_new(HealthSettings { fall: 2, ..HealthSettings::default() }).unwrap();
        s.reconfigure(&one);
        assert_eq!(s.record(false, ms(2)).unwrap().to, Health::Unhealthy);
    }
}
