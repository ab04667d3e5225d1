//! Faults on demand: errors, latency, hangs, crashes, warm-up, queue overflow.
//!
//! [`Faults`] is the validated set in force; [`FaultsPatch`] is how flags, the `[faults]`
//! table of a profile and the admin endpoint (`POST /admin/faults`) change it, field by
//! field. [`FaultState`] makes the per-request decisions, sans-IO: it takes the time as a
//! value and draws from a seeded generator, so a run with the same seed and arrivals injects
//! the same faults.
//!
//! For each inference request, in this order:
//!
//! 1. while warming up: `503` (and `/health` says not ready);
//! 2. the N-th request since `crash_after_requests` was set: crash (the request is never
//!    answered; the process exits when run as the CLI, the server stops when run in-process);
//! 3. with probability `error_rate`: `500`;
//! 4. with probability `hang_rate`: accept and never answer, until the client gives up or the
//!    server shuts down;
//! 5. otherwise wait `latency` (plus `spike` with probability `spike_rate`) before the request
//!    reaches the engine;
//! 6. `503` if `max_waiting` requests already wait for a batch slot.
//!
//! `crash_after_secs` crashes the server that long after it was set, whatever the traffic.

use std::time::Duration;

use tokio::time::Instant;

use crate::engine::SplitMix64;

/// The faults in force.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Fraction of inference requests answered `500`.
    pub error_rate: f64,
    /// Delay added to every inference request before it reaches the engine.
    pub latency: Duration,
    /// Fraction of inference requests delayed by a further `spike`.
    pub spike_rate: f64,
    /// The extra delay of a spike.
    pub spike: Duration,
    /// Fraction of inference requests accepted and never answered.
    pub hang_rate: f64,
    /// Crash on the N-th inference request after this was set.
    pub crash_after_requests: Option<u64>,
    /// Crash this long after this was set.
    pub crash_after: Option<Duration>,
    /// Not ready (`/health` 503, inference 503) for this long after this was set.
    pub warmup: Duration,
    /// Answer `503` when this many requests already wait for a batch slot.
    pub max_waiting: Option<u32>,
    /// The engine runs at this fraction of its configured speed (1: full speed).
    pub slowdown: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            latency: Duration::ZERO,
            spike_rate: 0.0,
            spike: Duration::ZERO,
            hang_rate: 0.0,
            crash_after_requests: None,
            crash_after: None,
            warmup: Duration::ZERO,
            max_waiting: None,
            slowdown: 1.0,
        }
    }
}

/// A change to [`Faults`]: flags, a profile's `[faults]` table or the admin endpoint's JSON.
/// Absent fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    /// Fraction of inference requests answered 500 (0 to 1).
    #[arg(long, value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Milliseconds added to every inference request before it reaches the engine.
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Fraction of inference requests that get a latency spike (0 to 1).
    #[arg(long, value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spike_rate: Option<f64>,
    /// Milliseconds a latency spike adds.
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spike_ms: Option<f64>,
    /// Fraction of inference requests accepted and never answered (0 to 1).
    #[arg(long, value_name = "P")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hang_rate: Option<f64>,
    /// Crash on the N-th inference request (the process exits with status 70).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_after_requests: Option<u64>,
    /// Crash this many seconds after start (the process exits with status 70).
    #[arg(long, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_after_secs: Option<f64>,
    /// Seconds after start during which /health and inference answer 503.
    #[arg(long, value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_secs: Option<f64>,
    /// Answer 503 when this many requests already wait for a batch slot.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_waiting: Option<u32>,
    /// Run the engine at this fraction of its configured speed (0.01 to 1; 1 undoes it).
    #[arg(long, value_name = "FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slowdown: Option<f64>,
}

/// A fault field is out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FaultError {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// The longest delay or period a fault may set: a day.
const MAX_PERIOD_SECS: f64 = 86_400.0;

// === impl FaultsPatch ===

impl FaultsPatch {
    /// `self` with the fields `top` sets replaced.
    pub fn overlay(self, top: FaultsPatch) -> FaultsPatch {
        FaultsPatch {
            error_rate: top.error_rate.or(self.error_rate),
            latency_ms: top.latency_ms.or(self.latency_ms),
            spike_rate: top.spike_rate.or(self.spike_rate),
            spike_ms: top.spike_ms.or(self.spike_ms),
            hang_rate: top.hang_rate.or(self.hang_rate),
            crash_after_requests: top.crash_after_requests.or(self.crash_after_requests),
            crash_after_secs: top.crash_after_secs.or(self.crash_after_secs),
            warmup_secs: top.warmup_secs.or(self.warmup_secs),
            max_waiting: top.max_waiting.or(self.max_waiting),
            slowdown: top.slowdown.or(self.slowdown),
        }
    }

    /// `faults` with this patch applied, or the first invalid field.
    pub fn apply(&self, faults: &Faults) -> Result<Faults, FaultError> {
        let mut f = faults.clone();
        if let Some(p) = self.error_rate {
            f.error_rate = probability("error_rate", p)?;
        }
        if let Some(ms) = self.latency_ms {
            f.latency = period("latency_ms", ms / 1000.0)?;
        }
        if let Some(p) = self.spike_rate {
            f.spike_rate = probability("spike_rate", p)?;
        }
        if let Some(ms) = self.spike_ms {
            f.spike = period("spike_ms", ms / 1000.0)?;
        }
        if let Some(p) = self.hang_rate {
            f.hang_rate = probability("hang_rate", p)?;
        }
        if let Some(n) = self.crash_after_requests {
            if n == 0 {
                return Err(FaultError { field: "crash_after_requests", reason: "must be at least 1".into() });
            }
            f.crash_after_requests = Some(n);
        }
        if let Some(s) = self.crash_after_secs {
            f.crash_after = Some(period("crash_after_secs", s)?);
        }
        if let Some(s) = self.warmup_secs {
            f.warmup = period("warmup_secs", s)?;
        }
        if let Some(n) = self.max_waiting {
            f.max_waiting = Some(n);
        }
        if let Some(x) = self.slowdown {
            if !(x.is_finite() && (0.01..=1.0).contains(&x)) {
                return Err(FaultError { field: "slowdown", reason: format!("{x} is not a fraction in 0.01..=1") });
            }
            f.slowdown = x;
        }
        Ok(f)
    }
}

fn probability(field: &'static str, p: f64) -> Result<f64, FaultError> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(FaultError { field, reason: format!("{p} is not a probability in 0..=1") })
    }
}

fn period(field: &'static str, secs: f64) -> Result<Duration, FaultError> {
    if secs.is_finite() && (0.0..=MAX_PERIOD_SECS).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(FaultError { field, reason: format!("{secs} s is not in 0..=86400 s") })
    }
}

// === impl Faults ===

impl Faults {
    /// The same faults as a patch that would set every one of them (what
    /// `GET /admin/faults` shows).
    pub fn to_patch(&self) -> FaultsPatch {
        FaultsPatch {
            error_rate: Some(self.error_rate),
            latency_ms: Some(self.latency.as_secs_f64() * 1000.0),
            spike_rate: Some(self.spike_rate),
            spike_ms: Some(self.spike.as_secs_f64() * 1000.0),
            hang_rate: Some(self.hang_rate),
            crash_after_requests: self.crash_after_requests,
            crash_after_secs: self.crash_after.map(|d| d.as_secs_f64()),
            warmup_secs: Some(self.warmup.as_secs_f64()),
            max_waiting: self.max_waiting,
            slowdown: Some(self.slowdown),
        }
    }
}

/// What to do with one inference request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer `503`: still warming up.
    WarmingUp,
    /// Crash now, without answering.
    Crash(u64),
    /// Answer `500`.
    Error,
    /// Never answer.
    Hang,
    /// Serve it after this delay.
    Serve(Duration),
}

/// The faults in force and the state their decisions need.
#[derive(Clone, Debug)]
pub struct FaultState {
    faults: Faults,
    rng: SplitMix64,
    requests: u64,
    crash_count_from: u64,
    crash_at: Option<Instant>,
    ready_at: Instant,
}

// === impl FaultState ===

impl FaultState {
    /// `faults`, in force from `now`.
    pub fn new(faults: Faults, seed: u64, now: Instant) -> Self {
        let mut state = FaultState {
            faults: Faults::default(),
            rng: SplitMix64::new(seed ^ 0x6661_756c_7473),
            requests: 0,
            crash_count_from: 0,
            crash_at: None,
            ready_at: now,
        };
        state.set(faults, now);
        state
    }

    /// The faults in force.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Puts `faults` in force from `now`: the crash counters and the warm-up restart for the
    /// fields that changed.
    pub fn set(&mut self, faults: Faults, now: Instant) {
        if faults.crash_after_requests != self.faults.crash_after_requests {
            self.crash_count_from = self.requests;
        }
        if faults.crash_after != self.faults.crash_after {
            self.crash_at = faults.crash_after.map(|d| now + d);
        }
        if faults.warmup != self.faults.warmup {
            self.ready_at = now + faults.warmup;
        }
        self.faults = faults;
    }

    /// Whether `/health` says ready at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        now >= self.ready_at
    }

    /// When the warm-up ends.
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// When the timed crash is due, if one is set.
    pub fn crash_at(&self) -> Option<Instant> {
        self.crash_at
    }

    /// Inference requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The decision for the next inference request, arriving at `now`.
    pub fn decide(&mut self, now: Instant) -> Decision {
        self.requests += 1;
        if !self.ready(now) {
            return Decision::WarmingUp;
        }
        if let Some(n) = self.faults.crash_after_requests
            && self.requests - self.crash_count_from >= n
        {
            return Decision::Crash(n);
        }
        // Draw every number whatever the outcome, so one rate's change does not shift the others.
        let error = self.rng.chance(self.faults.error_rate);
        let hang = self.rng.chance(self.faults.hang_rate);
        let spike = self.rng.chance(self.faults.spike_rate);
        if error {
            Decision::Error
        } else if hang {
            Decision::Hang
        } else {
            Decision::Serve(self.faults.latency + if spike { self.faults.spike } else { Duration::ZERO })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn patches_validate_and_overlay() {
        let base = FaultsPatch { error_rate: Some(0.5), latency_ms: Some(10.0), ..Default::default() };
        let top = FaultsPatch { error_rate: Some(0.1), ..Default::default() };
        let merged = base.overlay(top);
        assert_eq!(merged.error_rate, Some(0.1));
        assert_eq!(merged.latency_ms, Some(10.0));
        let faults = merged.apply(&Faults::default()).unwrap();
        assert_eq!(faults.latency, Duration::from_millis(10));
        assert_eq!(faults.to_patch().apply(&Faults::default()).unwrap(), faults);
        for bad in [
            FaultsPatch { error_rate: Some(1.5), ..Default::default() },
            FaultsPatch { hang_rate: Some(f64::NAN), ..Default::default() },
            FaultsPatch { latency_ms: Some(-1.0), ..Default::default() },
            FaultsPatch { crash_after_requests: Some(0), ..Default::default() },
            FaultsPatch { warmup_secs: Some(1e12), ..Default::default() },
        ] {
            assert!(bad.apply(&Faults::default()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn no_faults_serves_everything_at_once() {
        let now = t0();
        let mut state = FaultState::new(Faults::default(), 1, now);
        assert!(state.ready(now));
        assert!((0..100).all(|_| state.decide(now) == Decision::Serve(Duration::ZERO)));
    }

    #[test]
    fn rates_are_seeded_and_roughly_right() {
        let now = t0();
        let faults = Faults { error_rate: 0.25, ..Faults::default() };
        let run = |seed| {
            let mut s = FaultState::new(faults.clone(), seed, now);
            (0..4000).map(|_| s.decide(now)).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        let errors = run(9).iter().filter(|d| **d == Decision::Error).count();
        assert!((800..1200).contains(&errors), "{errors}");
        let all = Faults { hang_rate: 1.0, ..Faults::default() };
        assert_eq!(FaultState::new(all, 1, now).decide(now), Decision::Hang);
    }

    #[test]
    fn crash_counts_from_when_it_was_set() {
        let now = t0();
        let mut state = FaultState::new(Faults::default(), 1, now);
        state.decide(now);
        state.decide(now);
        state.set(Faults { crash_after_requests: Some(2), ..Faults::default() }, now);
        assert!(matches!(state.decide(now), Decision::Serve(_)));
        assert_eq!(state.decide(now), Decision::Crash(2));
    }

    #[test]
    fn warmup_and_timed_crash_start_when_set() {
        let now = t0();
        let faults = Faults {
            warmup: Duration::from_secs(5),
            crash_after: Some(Duration::from_secs(9)),
            latency: Duration::from_millis(3),
            spike_rate: 1.0,
            spike: Duration::from_millis(4),
            ..Faults::default()
        };
        let mut state = FaultState::new(faults, 1, now);
        assert!(!state.ready(now));
        assert_eq!(state.decide(now), Decision::WarmingUp);
        let later = now + Duration::from_secs(5);
        assert!(state.ready(later));
        assert_eq!(state.decide(later), Decision::Serve(Duration::from_millis(7)));
        assert_eq!(state.crash_at(), Some(now + Duration::from_secs(9)));
    }
}
