//! Resilience: the decisions that notice failures and route around them, with no effect.
//!
//! Each module is a small state machine fed by classified outcomes and the time as a value,
//! in the manner of linkerd2-proxy's small crates and sozu's sans-IO managers. The proxy owns
//! the sockets, timers and counters; it asks these types what to do and tells them what
//! happened. The simulator drives them in virtual time the same way.
//!
//! | module | what it decides | driven by |
//! | --- | --- | --- |
//! | [`health`] | active health checks: when to check next, up or down (HAProxy's rise/fall) | one [`HealthState`](health::HealthState) per endpoint |
//! | [`outlier`] | passive outlier ejection from live traffic (Envoy's semantics) and panic mode | one [`OutlierDetector`](outlier::OutlierDetector) per pool |
//! | [`breaker`] | circuit breaking per endpoint, and per-endpoint concurrency limits | one [`Breaker`](breaker::Breaker) per endpoint |
//! | [`retry`] | whether and when to retry a failed try, and the retry budget (Finagle's) | one [`RetryPolicy`](retry::RetryPolicy) per route, one [`RetryBudget`](retry::RetryBudget) per pool |
//! | [`admission`] | max in flight with a bounded priority queue; per-client token buckets | one [`AdmissionQueue`](admission::AdmissionQueue) and one [`RateLimiter`](admission::RateLimiter) per pool or listener |
//!
//! An endpoint is a candidate for a request when it is routable by health, not ejected, and
//! its breaker [`would_admit`](breaker::Breaker::would_admit) the request; when fewer than
//! the [`PanicThreshold`](outlier::PanicThreshold) of a pool is routable, the pool ignores
//! health and ejection and spreads over every endpoint, as Envoy does.
//!
//! Outcomes come in as an [`Observed`] value so that no caller matches strings, and settings
//! are validated in two stages: a plain `...Settings` struct with public fields and the
//! documented defaults, turned into a typed `...Config` by `try_new`, or a [`ConfigError`]
//! that names the field.
//!
//! ```
//! use fulcrum_core::Outcome;
//! use fulcrum_core::resilience::Observed;
//! assert!(Observed::Status(503).is_gateway_failure());
//! assert!(Observed::ConnectFailure.is_failure());
//! assert!(!Observed::Status(429).is_failure());
//! assert_eq!(Outcome::from(Observed::Reset), Outcome::Failure);
//! ```

use std::fmt;

use crate::endpoint::Outcome;

pub mod admission;
pub mod breaker;
pub mod health;
pub mod outlier;
pub mod retry;
mod window;

pub(crate) use crate::settings::Check;
pub use crate::settings::ConfigError;

/// What became of one request (or one try of it), as the data plane classifies it.
///
/// Local-origin failures (no connection, a timeout, a reset) are counted like the status a
/// proxy answers for them (Envoy maps them to 503 and 504): they are server errors and
/// gateway failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Observed {
    /// The exchange went well without an HTTP status to tell (a TCP session, a gRPC call
    /// classified upstream).
    Success,
    /// The endpoint answered with this HTTP status.
    Status(u16),
    /// No connection: refused, unreachable, connect timeout, TLS handshake failure. The
    /// request never reached the endpoint.
    ConnectFailure,
    /// Connected, but no response head within the first-byte (or per-try) timeout.
    Timeout,
    /// The connection was reset or closed before the response was complete.
    Reset,
}

// === impl Observed ===

impl Observed {
    /// A failure that the proxy saw itself, without an answer from the endpoint.
    pub fn is_local_origin(self) -> bool {
        matches!(self, Observed::ConnectFailure | Observed::Timeout | Observed::Reset)
    }

    /// A 5xx answer, or a local-origin failure (which a proxy turns into a 5xx).
    pub fn is_server_error(self) -> bool {
        match self {
            Observed::Status(s) => (500..600).contains(&s),
            Observed::Success => false,
            _ => true,
        }
    }

    /// A gateway failure as Envoy defines it: 502, 503, 504, or a local-origin failure.
    pub fn is_gateway_failure(self) -> bool {
        match self {
            Observed::Status(s) => matches!(s, 502..=504),
            Observed::Success => false,
            _ => true,
        }
    }

    /// What breakers and success rates count as a failure: [`is_server_error`](Self::is_server_error).
    pub fn is_failure(self) -> bool {
        self.is_server_error()
    }
}

impl From<Observed> for Outcome {
    fn from(o: Observed) -> Outcome {
        if o.is_failure() { Outcome::Failure } else { Outcome::Success }
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Success => f.write_str("success"),
            Observed::Status(s) => write!(f, "status {s}"),
            Observed::ConnectFailure => f.write_str("connect failure"),
            Observed::Timeout => f.write_str("timeout"),
            Observed::Reset => f.write_str("connection reset"),
        }
    }
}

/// A uniform sample of `[0, max]` from an injected generator.
pub(crate) fn uniform_up_to(rng: &mut dyn rand::RngCore, max: u64) -> u64 {
    ((u128::from(rng.next_u64()) * (u128::from(max) + 1)) >> 64) as u64
}

/// Nanoseconds of a duration, saturating.
pub(crate) fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn classification() {
        for s in [500, 501, 502, 503, 504, 599] {
            assert!(Observed::Status(s).is_server_error(), "{s}");
        }
        for s in [200, 204, 301, 400, 404, 429, 499, 600] {
            assert!(!Observed::Status(s).is_failure(), "{s}");
        }
        assert!(!Observed::Status(500).is_gateway_failure());
        assert!(Observed::Status(504).is_gateway_failure());
        for o in [Observed::ConnectFailure, Observed::Timeout, Observed::Reset] {
            assert!(o.is_local_origin() && o.is_server_error() && o.is_gateway_failure());
            assert_eq!(Outcome::from(o), Outcome::Failure);
        }
        assert!(!Observed::Success.is_failure() && !Observed::Status(503).is_local_origin());
        assert_eq!(Outcome::from(Observed::Status(200)), Outcome::Success);
        assert_eq!(Observed::Status(502).to_string(), "status 502");
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(uniform_up_to(&mut rng, 0), 0);
        for _ in 0..1000 {
            assert!(uniform_up_to(&mut rng, 10) <= 10);
        }
        // The full range does not overflow.
        let _ = uniform_up_to(&mut rng, u64::MAX);
    }

    #[test]
    fn config_error_names_the_field() {
        let e = Check { section: "health_check" }.positive("rise", 0).unwrap_err();
        assert_eq!(e.to_string(), "health_check.rise must be at least 1, got 0");
        assert_eq!((e.section, e.field), ("health_check", "rise"));
    }
}
