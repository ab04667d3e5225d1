//! Circuit breaking per endpoint, and per-endpoint concurrency limits.
//!
//! A [`Breaker`] is the classic three-state machine (Nygard's *Release It!*, Hystrix,
//! resilience4j):
//!
//! * **Closed**: requests pass; the breaker trips after `consecutive_failures` (5) failures
//!   in a row, or when the failure rate over a sliding window (10 s in 10 buckets) reaches
//!   `failure_rate_percent` (50%) with at least `minimum_requests` (20) in the window;
//! * **Open**: requests are refused for the open time, `open_time x backoff_factor ^ (trips - 1)`
//!   (5 s, 10 s, 20 s, ... capped at `max_open_time`, 60 s), where `trips` counts the trips
//!   since the breaker last closed;
//! * **HalfOpen**: once the open time has passed, at most `probes` (3) trial requests pass;
//!   when all of them succeed the breaker closes (and the backoff starts again from 5 s), when
//!   one fails it opens again for longer. A round of probes that has not finished after
//!   `probe_timeout` (30 s), because a probe was lost without a [`Breaker::cancel`], lets a new
//!   round start.
//!
//! **Choosing a candidate never changes a breaker's state**, so a balancer that filters
//! candidates with [`Breaker::would_admit`] (a `&self` method) and picks one of them does not
//! use up a probe of every endpoint it looked at. Only [`Breaker::admit`] changes state (Open
//! to HalfOpen when the open time has passed, counting a probe); it hands out a [`Permit`] that
//! the proxy gives back with the outcome to [`Breaker::record`] (or to [`Breaker::cancel`] when
//! the request ended without an outcome, such as a client that went away). Permits carry the
//! breaker's generation: outcomes of requests admitted before a change of state are ignored, so
//! a slow request that started while closed cannot close a breaker that has since opened.
//! `would_admit(now)` is true exactly when `admit(now)` would succeed.
//!
//! [`Limits`] caps each endpoint's connections, pending requests and requests (Envoy's
//! circuit-breaker thresholds); the proxy keeps the counters and asks [`Limits::admits`].
//!
//! Cost: O(1) per call (amortized over the window's buckets); a breaker is about 200 bytes.
//!
//! ```
//! use fulcrum_core::{Instant, Outcome};
//! use fulcrum_core::resilience::breaker::{Breaker, BreakerConfig, BreakerState};
//!
//! let mut breaker = Breaker::new(&BreakerConfig::default(), Instant::ZERO);
//! for _ in 0..5 {
//!     let permit = breaker.admit(Instant::ZERO).unwrap();
//!     breaker.record(permit, Outcome::Failure, Instant::ZERO);
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! assert!(!breaker.would_admit(Instant::from_millis(4_999)));
//! // Filtering changes nothing: still open, no probe used.
//! assert!(breaker.would_admit(Instant::from_millis(5_000)));
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let probe = breaker.admit(Instant::from_millis(5_000)).unwrap();
//! assert_eq!(breaker.state(), BreakerState::HalfOpen);
//! assert!(probe.is_probe());
//! ```

use std::fmt;
use std::time::Duration;

use super::{Check, ConfigError};
use crate::endpoint::Outcome;
use crate::time::Instant;

mod limits;

use super::window::Window;
pub use limits::{Counts, LimitExceeded, LimitSettings, Limits, Resource};

const SECTION: Check = Check { section: "circuit_breaker" };

/// Most buckets in a failure-rate window.
pub const MAX_BUCKETS: u32 = 1_000;

/// Circuit-breaker settings as written, with the documented defaults. A trigger set to
/// `None` is off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerSettings {
    /// Failures in a row that trip the breaker (5).
    pub consecutive_failures: Option<u32>,
    /// Failure rate over the window that trips it, in percent, 1 to 100 (50).
    pub failure_rate_percent: Option<u32>,
    /// Requests the window needs before the failure rate counts (20).
    pub minimum_requests: u32,
    /// Length of the failure-rate window (10 s).
    pub window: Duration,
    /// Buckets the window slides by (10).
    pub buckets: u32,
    /// Open time after the first trip (5 s).
    pub open_time: Duration,
    /// Growth of the open time at each further trip before the breaker closes (2.0).
    pub backoff_factor: f64,
    /// Longest open time (60 s).
    pub max_open_time: Duration,
    /// Trial requests let through when half-open (3).
    pub probes: u32,
    /// How long a round of probes may take before a new round may start (30 s).
    pub probe_timeout: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: Some(5),
            failure_rate_percent: Some(50),
            minimum_requests: 20,
            window: Duration::from_secs(10),
            buckets: 10,
            open_time: Duration::from_secs(5),
            backoff_factor: 2.0,
            max_open_time: Duration::from_secs(60),
            probes: 3,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

/// Validated circuit-breaker settings.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BreakerConfig {
    s: BreakerSettings,
}

// === impl BreakerConfig ===

impl BreakerConfig {
    /// Checks the settings: thresholds and counts at least 1, a percentage of 1 to 100,
    /// durations longer than zero, 1 to [`MAX_BUCKETS`] buckets of at least a nanosecond,
    /// `backoff_factor >= 1`, `max_open_time >= open_time`.
    pub fn try_new(s: BreakerSettings) -> Result<Self, ConfigError> {
        if s.consecutive_failures == Some(0) {
            return Err(SECTION.err("consecutive_failures", "must be at least 1 (leave it out to turn it off)"));
        }
        if let Some(p) = s.failure_rate_percent
            && !(1..=100).contains(&p)
        {
            return Err(SECTION.err("failure_rate_percent", format!("must be between 1 and 100, got {p}")));
        }
        SECTION.positive("minimum_requests", s.minimum_requests)?;
        SECTION.nonzero_duration("window", s.window)?;
        if !(1..=MAX_BUCKETS).contains(&s.buckets) {
            return Err(SECTION.err("buckets", format!("must be between 1 and {MAX_BUCKETS}, got {}", s.buckets)));
        }
        if s.window.as_nanos() < u128::from(s.buckets) {
            return Err(
                SECTION.err("window", format!("must be at least one nanosecond per bucket, got {:?}", s.window))
            );
        }
        SECTION.nonzero_duration("open_time", s.open_time)?;
        if !(s.backoff_factor.is_finite() && s.backoff_factor >= 1.0) {
            return Err(
                SECTION.err("backoff_factor", format!("must be a number of at least 1, got {}", s.backoff_factor))
            );
        }
        if s.max_open_time < s.open_time {
            return Err(SECTION.err(
                "max_open_time",
                format!("must be at least open_time ({:?}), got {:?}", s.open_time, s.max_open_time),
            ));
        }
        SECTION.positive("probes", s.probes)?;
        SECTION.nonzero_duration("probe_timeout", s.probe_timeout)?;
        Ok(BreakerConfig { s })
    }

    /// The settings.
    pub fn settings(&self) -> &BreakerSettings {
        &self.s
    }

    /// The open time after `trips` trips (1 for the first).
    pub fn open_time(&self, trips: u32) -> Duration {
        let exponent = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX).min(1_000);
        let secs = self.s.open_time.as_secs_f64() * self.s.backoff_factor.powi(exponent);
        if secs.is_finite() && secs < self.s.max_open_time.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.s.max_open_time
        }
    }
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused.
    Open,
    /// A few probes pass.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// Why a breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerReason {
    /// This many failures in a row.
    ConsecutiveFailures {
        /// How many.
        count: u32,
    },
    /// The failure rate over the window reached the threshold.
    FailureRate {
        /// Failures in the window.
        failures: u64,
        /// Requests in the window.
        total: u64,
    },
    /// The open time passed: probes may go.
    OpenTimeElapsed,
    /// A probe failed.
    ProbeFailed,
    /// Every probe succeeded.
    ProbesSucceeded {
        /// How many.
        probes: u32,
    },
    /// An active health check passed: it is better evidence than the open timer.
    HealthCheckPassed,
}

impl fmt::Display for BreakerReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerReason::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            BreakerReason::FailureRate { failures, total } => {
                write!(f, "{failures} of the last {total} requests failed")
            }
            BreakerReason::OpenTimeElapsed => f.write_str("open time elapsed, probing"),
            BreakerReason::ProbeFailed => f.write_str("a probe failed"),
            BreakerReason::ProbesSucceeded { probes } => write!(f, "{probes} probes succeeded"),
            BreakerReason::HealthCheckPassed => f.write_str("an active health check passed"),
        }
    }
}

/// A change of state, to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// Why.
    pub reason: BreakerReason,
    /// When.
    pub at: Instant,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit {} -> {}: {}", self.from, self.to, self.reason)
    }
}

/// Leave to send one request; give it back to [`Breaker::record`] or [`Breaker::cancel`].
#[must_use = "give the permit back with Breaker::record or Breaker::cancel"]
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    generation: u64,
    probe: bool,
    transition: Option<Transition>,
}

impl Permit {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The change of state this admission caused (Open to HalfOpen), to log.
    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }
}

/// Why a breaker refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The breaker is open.
    #[error("circuit open for another {retry_after:?}")]
    Open {
        /// Time left until probes may go.
        retry_after: Duration,
    },
    /// The breaker is half-open and every probe is in flight.
    #[error("circuit half-open, every probe is in flight")]
    ProbesBusy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant, admitted: u32, succeeded: u32 },
}

/// One endpoint's circuit breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    since: Instant,
    consecutive: u32,
    window: Window,
    /// Trips since the breaker last closed: the backoff exponent.
    trips: u32,
    /// Changes at every change of state; permits of another generation are stale.
    generation: u64,
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker.
    pub fn new(config: &BreakerConfig, now: Instant) -> Self {
        Breaker {
            config: *config,
            state: State::Closed,
            since: now,
            consecutive: 0,
            window: Window::new(config.s.window, config.s.buckets, now),
            trips: 0,
            generation: 0,
        }
    }

    /// Applies new settings. The state stays; the failure-rate window starts empty.
    pub fn reconfigure(&mut self, config: &BreakerConfig, now: Instant) {
        self.config = *config;
        self.window = Window::new(config.s.window, config.s.buckets, now);
    }

    /// The state. An open breaker whose open time has passed says `Open` until a request is
    /// admitted.
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// When an open breaker lets probes through.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Closes the breaker because an active health check passed (the endpoint came back):
    /// its open time and backoff start over. Permits handed out before are stale. Returns
    /// the transition, if the breaker was not closed.
    pub fn reset(&mut self, now: Instant) -> Option<Transition> {
        let from = self.state();
        self.consecutive = 0;
        self.trips = 0;
        self.window = Window::new(self.config.s.window, self.config.s.buckets, now);
        if from == BreakerState::Closed {
            return None;
        }
        self.state = State::Closed;
        self.since = now;
        self.generation += 1;
        Some(Transition { from, to: BreakerState::Closed, reason: BreakerReason::HealthCheckPassed, at: now })
    }

    /// Trips since the breaker last closed.
    pub fn trips(&self) -> u32 {
        self.trips
    }

    fn round_expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_since(since) >= self.config.s.probe_timeout
    }

    /// Whether [`admit`](Self::admit) would let a request through at `now`. Changes nothing:
    /// use it to filter candidates.
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { since, admitted, .. } => {
                admitted < self.config.s.probes || self.round_expired(since, now)
            }
        }
    }

    /// Lets a request through, or says why not. Moves an open breaker whose time is up to
    /// half-open, and counts probes.
    pub fn admit(&mut self, now: Instant) -> Result<Permit, Rejected> {
        match self.state {
            State::Closed => Ok(Permit { generation: self.generation, probe: false, transition: None }),
            State::Open { until } if now < until => Err(Rejected::Open { retry_after: until.saturating_since(now) }),
            State::Open { .. } => {
                let transition = self.enter(
                    State::HalfOpen { since: now, admitted: 1, succeeded: 0 },
                    BreakerReason::OpenTimeElapsed,
                    now,
                );
                Ok(Permit { generation: self.generation, probe: true, transition: Some(transition) })
            }
            State::HalfOpen { since, admitted, succeeded } => {
                if admitted < self.config.s.probes {
                    self.state = State::HalfOpen { since, admitted: admitted + 1, succeeded };
                } else if self.round_expired(since, now) {
                    self.generation += 1;
                    self.state = State::HalfOpen { since: now, admitted: 1, succeeded: 0 };
                } else {
                    return Err(Rejected::ProbesBusy);
                }
                Ok(Permit { generation: self.generation, probe: true, transition: None })
            }
        }
    }

    /// Records the outcome of an admitted request; returns the change of state it caused.
    /// Outcomes of requests admitted before the last change of state are ignored.
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Transition> {
        if permit.generation != self.generation {
            return None;
        }
        let failed = outcome == Outcome::Failure;
        match self.state {
            State::Closed => {
                self.window.record(failed, now);
                self.consecutive = if failed { self.consecutive.saturating_add(1) } else { 0 };
                let s = &self.config.s;
                let reason = if s.consecutive_failures.is_some_and(|t| self.consecutive >= t) {
                    BreakerReason::ConsecutiveFailures { count: self.consecutive }
                } else {
                    let (total, failures) = self.window.counts(now);
                    match s.failure_rate_percent {
                        Some(p) if total >= u64::from(s.minimum_requests) && failures * 100 >= u64::from(p) * total => {
                            BreakerReason::FailureRate { failures, total }
                        }
                        _ => return None,
                    }
                };
                Some(self.trip(reason, now))
            }
            State::HalfOpen { since, admitted, succeeded } => {
                if failed {
                    return Some(self.trip(BreakerReason::ProbeFailed, now));
                }
                let succeeded = succeeded + 1;
                if succeeded < self.config.s.probes {
                    self.state = State::HalfOpen { since, admitted, succeeded };
                    return None;
                }
                self.trips = 0;
                Some(self.enter(State::Closed, BreakerReason::ProbesSucceeded { probes: succeeded }, now))
            }
            State::Open { .. } => None,
        }
    }

    /// Gives back a permit whose request ended without an outcome (the client went away, the
    /// request was not sent): a half-open probe slot is freed.
    pub fn cancel(&mut self, permit: Permit) {
        if let State::HalfOpen { since, admitted, succeeded } = self.state
            && permit.probe
            && permit.generation == self.generation
        {
            self.state = State::HalfOpen { since, admitted: admitted.saturating_sub(1), succeeded };
        }
    }

    fn trip(&mut self, reason: BreakerReason, now: Instant) -> Transition {
        self.trips = self.trips.saturating_add(1);
        let until = now + self.config.open_time(self.trips);
        self.enter(State::Open { until }, reason, now)
    }

    fn enter(&mut self, state: State, reason: BreakerReason, now: Instant) -> Transition {
        let from = self.state();
        self.state = state;
        self.since = now;
        self.generation += 1;
        self.consecutive = 0;
        self.window.clear();
        Transition { from, to: self.state(), reason, at: now }
    }
}

#[cfg(test)]
mod tests;
