//! Retries: whether and when to try a failed request again, and how many retries a pool may
//! afford.
//!
//! A [`RetryPolicy`] (one per route) decides from what happened to a try, as an [`Attempt`]:
//!
//! 1. never once a response byte has reached the client (the proxy streams: it cannot take
//!    back what it sent);
//! 2. only for a retryable outcome: a status of `retryable_statuses` (502, 503, 504), a
//!    connect failure, a reset before any response byte, or a first-byte (or per-try)
//!    timeout, each with its own switch (all on);
//! 3. only for idempotent methods (RFC 9110, 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE),
//!    unless the route allows non-idempotent retries (inference routes: a completion POST
//!    that failed before any byte reached the client is safe to send again). A connect failure
//!    is retried whatever the method: the request never left the proxy;
//! 4. at most `max_attempts` tries in all (3).
//!
//! A retry waits a backoff with full jitter (Brooker, "Exponential Backoff And Jitter", AWS
//! Architecture Blog, 2015): uniform in `[0, min(backoff_max, backoff_base x 2^(k-1))]` before
//! the k-th retry (25 ms base, 250 ms cap). The proxy retries on another endpoint (the
//! selector's veto) and asks the pool's [`RetryBudget`] first, so that retries can never
//! multiply the load of a failing fleet.
//!
//! The policy also carries the two timeouts the proxy enforces for each try: `per_try_timeout`
//! (the whole try) and `first_byte_timeout` (from sending the request to the response head).
//! Both are off by default (the pool's `first_byte_timeout` applies): an LLM stream may
//! legitimately last minutes. Cost: O(1).
//!
//! ```
//! use fulcrum_core::resilience::Observed;
//! use fulcrum_core::resilience::retry::{Attempt, Decision, GiveUp, RetryPolicy};
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let policy = RetryPolicy::default();
//! let mut rng = SmallRng::seed_from_u64(1);
//! let failed = Attempt { number: 1, idempotent: true, observed: Observed::Status(503), ..Attempt::default() };
//! let Decision::Retry { after } = policy.decide(&failed, &mut rng) else { panic!() };
//! assert!(after.as_millis() <= 25);
//! // Never after a response byte reached the client.
//! let streamed = Attempt { response_started: true, ..failed };
//! assert_eq!(policy.decide(&streamed, &mut rng), Decision::GiveUp(GiveUp::ResponseStarted));
//! ```

use std::fmt;
use std::time::Duration;

use rand::RngCore;

use super::{Check, ConfigError, Observed};
use crate::backoff::Backoff;

mod budget;

pub use budget::{BudgetConfig, BudgetSettings, RetryBudget};

const SECTION: Check = Check { section: "retry" };

/// Most tries a policy may allow.
pub const MAX_ATTEMPTS: u32 = 10;

/// Whether an HTTP method is idempotent (RFC 9110, 9.2.2). Methods are case-sensitive.
pub fn is_idempotent_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// Retry settings as written, with the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySettings {
    /// Tries in all, the first included (3; 1 turns retries off).
    pub max_attempts: u32,
    /// Answers worth another try (502, 503, 504).
    pub retryable_statuses: Vec<u16>,
    /// Retry when no connection could be made (true).
    pub on_connect_failure: bool,
    /// Retry when the connection was reset before any response byte (true).
    pub on_reset: bool,
    /// Retry when the response head did not come in time (true).
    pub on_timeout: bool,
    /// An inference request answered 500 is tried once more on another endpoint (true):
    /// model servers answer 500 for a crashed worker or an engine error that another replica
    /// does not have. Counted against the retry budget like any retry.
    pub inference_500_once: bool,
    /// Longest a single try may take (none).
    pub per_try_timeout: Option<Duration>,
    /// Longest from sending a try to its response head (none: the pool's).
    pub first_byte_timeout: Option<Duration>,
    /// Backoff ceiling of the first retry (25 ms), doubling at each one.
    pub backoff_base: Duration,
    /// Largest backoff ceiling (250 ms).
    pub backoff_max: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            retryable_statuses: vec![502, 503, 504],
            on_connect_failure: true,
            on_reset: true,
            on_timeout: true,
            inference_500_once: true,
            per_try_timeout: None,
            first_byte_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        }
    }
}

/// A set of HTTP statuses from 400 to 599, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Statuses([u64; 4]);

impl Statuses {
    fn insert(&mut self, s: u16) {
        let i = usize::from(s - 400);
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn contains(&self, s: u16) -> bool {
        (400..600).contains(&s) && {
            let i = usize::from(s - 400);
            self.0[i / 64] & (1 << (i % 64)) != 0
        }
    }
}

/// A validated retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    statuses: Statuses,
    on_connect_failure: bool,
    on_reset: bool,
    on_timeout: bool,
    inference_500_once: bool,
    per_try_timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
}

/// What happened to the try that just ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Tries made so far, the one that just ended included (1 after the first try).
    pub number: u32,
    /// The request's method is idempotent ([`is_idempotent_method`]).
    pub idempotent: bool,
    /// The route allows retrying non-idempotent requests (inference routes do by default).
    pub route_allows_non_idempotent: bool,
    /// The try's outcome.
    pub observed: Observed,
    /// A response byte has reached the client.
    pub response_started: bool,
    /// An earlier try of the request was answered 500 (so an inference request's one retry
    /// after a 500 is spent).
    pub earlier_500: bool,
}

impl Default for Attempt {
    /// The first try of a non-idempotent request on a route that does not allow retrying it,
    /// which succeeded.
    fn default() -> Self {
        Attempt {
            number: 1,
            idempotent: false,
            route_allows_non_idempotent: false,
            observed: Observed::Success,
            response_started: false,
            earlier_500: false,
        }
    }
}

/// Why a request is not tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// A response byte reached the client.
    ResponseStarted,
    /// The outcome is not one the policy retries (a success, a 4xx, a 500, ...).
    NotRetryable(Observed),
    /// The method is not idempotent and the route does not allow retrying it.
    NotIdempotent,
    /// Every allowed try was made.
    AttemptsExhausted {
        /// Tries made.
        attempts: u32,
    },
    /// The pool's retry budget is spent (from [`RetryPolicy::decide_within`]).
    BudgetExhausted,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::ResponseStarted => f.write_str("the response had started"),
            GiveUp::NotRetryable(o) => write!(f, "{o} is not retryable"),
            GiveUp::NotIdempotent => f.write_str("the method is not idempotent"),
            GiveUp::AttemptsExhausted { attempts } => write!(f, "{attempts} tries made"),
            GiveUp::BudgetExhausted => f.write_str("the retry budget is spent"),
        }
    }
}

/// What to do after a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again (on another endpoint) after waiting this long.
    Retry {
        /// The backoff.
        after: Duration,
    },
    /// Answer the client with what there is.
    GiveUp(GiveUp),
}

// === impl RetryPolicy ===

impl Default for RetryPolicy {
    /// The defaults of [`RetrySettings`].
    fn default() -> Self {
        RetryPolicy::try_new(RetrySettings::default()).expect("the default retry settings are valid")
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn never() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }

    /// Checks the settings: 1 to [`MAX_ATTEMPTS`] tries, statuses from 400 to 599, timeouts
    /// and the backoff base longer than zero, `first_byte_timeout <= per_try_timeout`,
    /// `backoff_max >= backoff_base`.
    pub fn try_new(s: RetrySettings) -> Result<Self, ConfigError> {
        if !(1..=MAX_ATTEMPTS).contains(&s.max_attempts) {
            return Err(SECTION.err(
                "max_attempts",
                format!("must be between 1 (no retries) and {MAX_ATTEMPTS}, got {}", s.max_attempts),
            ));
        }
        let mut statuses = Statuses::default();
        for &st in &s.retryable_statuses {
            if !(400..600).contains(&st) {
                return Err(SECTION.err("retryable_statuses", format!("must be statuses from 400 to 599, got {st}")));
            }
            statuses.insert(st);
        }
        if let Some(d) = s.per_try_timeout {
            SECTION.nonzero_duration("per_try_timeout", d)?;
        }
        if let Some(d) = s.first_byte_timeout {
            SECTION.nonzero_duration("first_byte_timeout", d)?;
            if let Some(per_try) = s.per_try_timeout
                && d > per_try
            {
                return Err(SECTION.err(
                    "first_byte_timeout",
                    format!("must not be longer than per_try_timeout ({per_try:?}), got {d:?}"),
                ));
            }
        }
        SECTION.nonzero_duration("backoff_base", s.backoff_base)?;
        if s.backoff_max < s.backoff_base {
            return Err(SECTION.err(
                "backoff_max",
                format!("must be at least backoff_base ({:?}), got {:?}", s.backoff_base, s.backoff_max),
            ));
        }
        Ok(RetryPolicy {
            max_attempts: s.max_attempts,
            statuses,
            on_connect_failure: s.on_connect_failure,
            on_reset: s.on_reset,
            on_timeout: s.on_timeout,
            inference_500_once: s.inference_500_once,
            per_try_timeout: s.per_try_timeout,
            first_byte_timeout: s.first_byte_timeout,
            backoff_base: s.backoff_base,
            backoff_max: s.backoff_max,
        })
    }

    /// Tries in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Longest a single try may take.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.per_try_timeout
    }

    /// Longest from sending a try to its response head.
    pub fn first_byte_timeout(&self) -> Option<Duration> {
        self.first_byte_timeout
    }

    /// Whether the policy retries this outcome (before any response byte).
    pub fn is_retryable(&self, observed: Observed) -> bool {
        match observed {
            Observed::Success => false,
            Observed::Status(s) => self.statuses.contains(s),
            Observed::ConnectFailure => self.on_connect_failure,
            Observed::Reset => self.on_reset,
            Observed::Timeout => self.on_timeout,
        }
    }

    /// Whether the try may be retried, without the backoff: the rules of the module doc, in
    /// that order.
    pub fn check(&self, attempt: &Attempt) -> Result<(), GiveUp> {
        if attempt.response_started {
            return Err(GiveUp::ResponseStarted);
        }
        let inference_500 = self.inference_500_once
            && attempt.observed == Observed::Status(500)
            && attempt.route_allows_non_idempotent
            && !attempt.earlier_500;
        if !self.is_retryable(attempt.observed) && !inference_500 {
            return Err(GiveUp::NotRetryable(attempt.observed));
        }
        let never_sent = attempt.observed == Observed::ConnectFailure;
        if !(attempt.idempotent || attempt.route_allows_non_idempotent || never_sent) {
            return Err(GiveUp::NotIdempotent);
        }
        if attempt.number >= self.max_attempts {
            return Err(GiveUp::AttemptsExhausted { attempts: attempt.number });
        }
        Ok(())
    }

    /// The backoff before retry number `retry` (1 for the first): full jitter, uniform in
    /// `[0, min(backoff_max, backoff_base x 2^(retry-1))]`, to the nanosecond.
    pub fn backoff(&self, retry: u32, rng: &mut dyn RngCore) -> Duration {
        Backoff::new(self.backoff_base, self.backoff_max).with_full_jitter().delay(retry, rng)
    }

    /// What to do after a try: [`check`](Self::check), then the [`backoff`](Self::backoff).
    /// The proxy then asks the pool's budget ([`decide_within`](Self::decide_within) does both).
    pub fn decide(&self, attempt: &Attempt, rng: &mut dyn RngCore) -> Decision {
        match self.check(attempt) {
            Ok(()) => Decision::Retry { after: self.backoff(attempt.number.max(1), rng) },
            Err(why) => Decision::GiveUp(why),
        }
    }

    /// [`decide`](Self::decide), then a withdrawal from `budget` when the answer is to retry.
    pub fn decide_within(
        &self,
        attempt: &Attempt,
        budget: &mut RetryBudget,
        now: crate::Instant,
        rng: &mut dyn RngCore,
    ) -> Decision {
        match self.decide(attempt, rng) {
            Decision::Retry { .. } if !budget.try_withdraw(now) => Decision::GiveUp(GiveUp::BudgetExhausted),
            d => d,
        }
    }
}

#[cfg(test)]
mod tests;
