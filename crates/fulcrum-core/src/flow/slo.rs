//! Per-request latency objectives: a time-to-first-token budget and a criticality class.
//!
//! A client may send, with any request:
//!
//! - `x-fulcrum-ttft-budget`: how long it is willing to wait for the first token (`800ms`,
//!   `2s`, `1.5s`, or a bare number of milliseconds; 1 ms to 10 min);
//! - `x-fulcrum-criticality`: `critical`, `standard` (the default) or `sheddable` (the classes
//!   of the Gateway API Inference Extension).
//!
//! Before the first try the attempt machine predicts the chosen endpoint's TTFT with the
//! pool's learned performance model
//! ([`predict_now`](crate::balance::predicted_ttft::predict_now), the same prediction
//! `predicted_ttft` picks by, whatever the pool's policy). When the prediction fits the budget
//! left, the request goes. When it does not:
//!
//! - `critical` goes anyway: the budget is a wish, not a reason to refuse;
//! - `standard` waits, asking again every [`RECHECK`], while the budget lasts; if nothing fits
//!   by then it is refused with 503 and `Retry-After`;
//! - `sheddable` is refused at once with 429 and `Retry-After`, so that the capacity goes to
//!   the others.
//!
//! `Retry-After` is how far the prediction exceeded the budget, rounded up to whole seconds.
//! Retries after a failed first try are not judged again: the request is already under way.

use std::time::Duration;

use crate::time::Instant;

/// The header that carries the budget.
pub const BUDGET_HEADER: &str = "x-fulcrum-ttft-budget";
/// The header that carries the class.
pub const CRITICALITY_HEADER: &str = "x-fulcrum-criticality";
/// How often a waiting `standard` request asks again.
pub const RECHECK: Duration = Duration::from_millis(20);
/// The largest budget accepted.
pub const MAX_BUDGET: Duration = Duration::from_secs(600);

/// What a request may be refused for first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Criticality {
    /// Sent even when the budget cannot be met.
    Critical,
    /// Waits for the budget to be met, refused (503) when it cannot be.
    #[default]
    Standard,
    /// Refused at once (429) when the budget cannot be met.
    Sheddable,
}

/// A request's objective, as its headers said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slo {
    /// Time to first token the client will wait, from `arrived`.
    pub budget: Duration,
    /// What happens when the budget cannot be met.
    pub criticality: Criticality,
    /// When the request reached the pool.
    pub arrived: Instant,
}

/// A header value that is not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SloError {
    /// The budget is not a duration in range.
    #[error(
        "header {BUDGET_HEADER}: {0:?} is not a budget: give a duration such as 800ms, 2s or 1.5s (or milliseconds), from 1 ms to 10 min"
    )]
    Budget(String),
    /// The class is not one of the three.
    #[error("header {CRITICALITY_HEADER}: {0:?} is not a class: give critical, standard or sheddable")]
    Criticality(String),
}

fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned()
}

fn parse_budget(raw: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.len() > 32 {
        return None;
    }
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "ms"),
    };
    let value: f64 = number.trim().parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => value / 1e3,
        "s" => value,
        "m" | "min" => value * 60.0,
        _ => return None,
    };
    let budget = Duration::try_from_secs_f64(seconds).ok()?;
    (budget >= Duration::from_millis(1) && budget <= MAX_BUDGET).then_some(budget)
}

impl Slo {
    /// The objective from the two headers' values (`None` without a budget: the class alone
    /// asks for nothing). `arrived`: when the request reached the pool.
    pub fn from_headers(
        budget: Option<&[u8]>,
        criticality: Option<&[u8]>,
        arrived: Instant,
    ) -> Result<Option<Slo>, SloError> {
        let criticality = match criticality.map(|c| c.trim_ascii()) {
            None => Criticality::Standard,
            Some(c) if c.eq_ignore_ascii_case(b"critical") => Criticality::Critical,
            Some(c) if c.eq_ignore_ascii_case(b"standard") => Criticality::Standard,
            Some(c) if c.eq_ignore_ascii_case(b"sheddable") => Criticality::Sheddable,
            Some(c) => return Err(SloError::Criticality(shown(c))),
        };
        let Some(raw) = budget else { return Ok(None) };
        let budget = parse_budget(raw).ok_or_else(|| SloError::Budget(shown(raw)))?;
        Ok(Some(Slo { budget, criticality, arrived }))
    }

    /// What to do with a request whose chosen endpoint predicts `predicted` seconds to its
    /// first token at `now`.
    pub fn judge(&self, predicted: f64, now: Instant) -> Judged {
        let left = self.budget.saturating_sub(now.saturating_since(self.arrived));
        if predicted <= left.as_secs_f64() || self.criticality == Criticality::Critical {
            return Judged::Send;
        }
        let over = (predicted - self.budget.as_secs_f64()).max(0.0);
        let retry_after = Duration::from_secs((over.ceil() as u64).clamp(1, 3_600));
        match self.criticality {
            Criticality::Standard if left > RECHECK => Judged::Recheck(now + RECHECK.min(left - RECHECK)),
            Criticality::Standard => Judged::Refused(Refused { status: 503, retry_after }),
            _ => Judged::Refused(Refused { status: 429, retry_after }),
        }
    }
}

/// What [`Slo::judge`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// Send it.
    Send,
    /// Ask again at this instant.
    Recheck(Instant),
    /// Refuse it.
    Refused(Refused),
}

/// A request refused because its budget cannot be met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// 429 (sheddable) or 503 (standard, after waiting).
    pub status: u16,
    /// When to try again.
    pub retry_after: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo(budget: &str, class: Option<&str>) -> Result<Option<Slo>, SloError> {
        Slo::from_headers(Some(budget.as_bytes()), class.map(str::as_bytes), Instant::ZERO)
    }

    #[test]
    fn budgets_parse_with_units_and_limits() {
        let b = |s: &str| slo(s, None).map(|o| o.map(|s| s.budget));
        assert_eq!(b("800ms"), Ok(Some(Duration::from_millis(800))));
        assert_eq!(b("2s"), Ok(Some(Duration::from_secs(2))));
        assert_eq!(b(" 1.5s "), Ok(Some(Duration::from_millis(1500))));
        assert_eq!(b("250"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(b("1m"), Ok(Some(Duration::from_secs(60))));
        for bad in ["", "fast", "-1s", "0", "11m", "1e400s", "1h", "NaNs", &"9".repeat(100)] {
            let err = b(bad).expect_err(bad);
            assert!(err.to_string().contains(BUDGET_HEADER), "{err}");
        }
        assert_eq!(Slo::from_headers(None, Some(b"critical"), Instant::ZERO), Ok(None));
        let err = slo("1s", Some("urgent")).expect_err("class");
        assert!(err.to_string().contains("critical, standard or sheddable"), "{err}");
        assert_eq!(slo("1s", Some("SHEDDABLE")).unwrap().unwrap().criticality, Criticality::Sheddable);
    }

    #[test]
    fn judged_by_class_when_the_budget_cannot_be_met() {
        let at = |ms| Instant::from_millis(ms);
        let with = |class| Slo { budget: Duration::from_millis(500), criticality: class, arrived: at(0) };
        for class in [Criticality::Critical, Criticality::Standard, Criticality::Sheddable] {
            assert_eq!(with(class).judge(0.4, at(0)), Judged::Send);
        }
        assert_eq!(with(Criticality::Critical).judge(9.0, at(0)), Judged::Send);
        assert_eq!(
            with(Criticality::Sheddable).judge(2.1, at(0)),
            Judged::Refused(Refused { status: 429, retry_after: Duration::from_secs(2) })
        );
        assert_eq!(with(Criticality::Standard).judge(0.6, at(0)), Judged::Recheck(at(20)));
        // Waiting spends the budget: 0.4 s fitted at first, not after 200 ms.
        assert_eq!(with(Criticality::Standard).judge(0.4, at(200)), Judged::Recheck(at(220)));
        assert_eq!(
            with(Criticality::Standard).judge(0.4, at(490)),
            Judged::Refused(Refused { status: 503, retry_after: Duration::from_secs(1) })
        );
    }
}
