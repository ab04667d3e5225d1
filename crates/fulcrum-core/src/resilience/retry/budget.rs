//! The retry budget: retries may be at most a share of requests, plus a floor per second
//! (Finagle's `RetryBudget`, Linkerd's retry budgets).
//!
//! Each original request deposits `percent / 100` of a retry; each retry withdraws one.
//! Deposits and withdrawals count for `ttl`, and a reserve of `min_retries_per_sec x ttl`
//! retries is always there, so that a quiet pool can still retry. A retry is allowed when
//!
//! ```text
//! retries_in_window + 1 <= percent / 100 x requests_in_window + min_retries_per_sec x ttl
//! ```
//!
//! With the defaults (20%, 10 per second, 10 s) a pool that served 1,000 requests in the last
//! ten seconds may retry 300 times in them: 200 from its requests and 100 from the reserve.
//! Retries do not deposit (call [`RetryBudget::on_request`] for original requests only).
//!
//! Arithmetic is in integers (a millionth of a retry), so the count is exact in virtual time.
//! The window is `ttl` in 10 slices: a deposit or withdrawal made at `t` counts until the end
//! of the slice `t` falls in plus 9 more, that is for between 0.9 x ttl and ttl (Finagle's
//! `WindowedAdder` does the same). Cost: O(1) per call (amortized; at most 10 slices move).

use std::time::Duration;

use crate::resilience::window::Window;
use crate::resilience::{Check, ConfigError, nanos};
use crate::time::Instant;

const SECTION: Check = Check { section: "retry_budget" };

/// A retry, in the budget's units.
const RETRY: u128 = 1_000_000;
/// Slices of the window.
const SLICES: u32 = 10;

/// Retry-budget settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSettings {
    /// Retries allowed per 100 requests, 0 to 1000 (20.0).
    pub percent: f64,
    /// Retries allowed per second whatever the traffic (10).
    pub min_retries_per_sec: u32,
    /// How long deposits and withdrawals count, 1 s to 60 s (10 s).
    pub ttl: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings { percent: 20.0, min_retries_per_sec: 10, ttl: Duration::from_secs(10) }
    }
}

/// Validated retry-budget settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Units deposited by a request.
    deposit: u128,
    /// Units always available.
    reserve: u128,
    ttl: Duration,
}

// === impl BudgetConfig ===

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { deposit: 200_000, reserve: 100 * RETRY, ttl: Duration::from_secs(10) }
    }
}

impl BudgetConfig {
    /// Checks the settings: `percent` from 0 to 1000 (with millionths of a retry of
    /// precision), `ttl` from 1 s to 60 s (Finagle's bounds).
    pub fn try_new(s: BudgetSettings) -> Result<Self, ConfigError> {
        if !(s.percent.is_finite() && (0.0..=1000.0).contains(&s.percent)) {
            return Err(SECTION.err("percent", format!("must be between 0 and 1000, got {}", s.percent)));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&s.ttl) {
            return Err(SECTION.err("ttl", format!("must be between 1s and 60s, got {:?}", s.ttl)));
        }
        Ok(BudgetConfig {
            deposit: (s.percent * 10_000.0).round() as u128,
            reserve: u128::from(s.min_retries_per_sec) * u128::from(nanos(s.ttl)) / 1_000,
            ttl: s.ttl,
        })
    }

    /// How long deposits and withdrawals count.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// A pool's retry budget.
#[derive(Clone, Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    /// Requests (first count) and retries (second count) in the window.
    window: Window,
}

// === impl RetryBudget ===

impl RetryBudget {
    /// A budget with nothing deposited yet (the reserve is there).
    pub fn new(config: &BudgetConfig, now: Instant) -> Self {
        RetryBudget { config: *config, window: Window::new(config.ttl, SLICES, now) }
    }

    /// Counts an original request (not a retry).
    pub fn on_request(&mut self, now: Instant) {
        self.window.add(now, 1, 0);
    }

    fn balance(&mut self, now: Instant) -> u128 {
        let (requests, retries) = self.window.counts(now);
        let credit = u128::from(requests) * self.config.deposit + self.config.reserve;
        credit.saturating_sub(u128::from(retries) * RETRY)
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        if self.balance(now) < RETRY {
            return false;
        }
        self.window.add(now, 0, 1);
        true
    }

    /// Whole retries available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        u64::try_from(self.balance(now) / RETRY).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    fn withdraw_all(b: &mut RetryBudget, now: Instant) -> u64 {
        let mut n = 0;
        while b.try_withdraw(now) {
            n += 1;
        }
        n
    }

    #[test]
    fn twenty_percent_plus_ten_per_second() {
        let mut b = RetryBudget::new(&BudgetConfig::default(), ms(0));
        // The reserve alone: 10/s x 10 s.
        assert_eq!(b.available(ms(0)), 100);
        for i in 0..1_000 {
            b.on_request(ms(i));
        }
        assert_eq!(b.available(ms(1_000)), 300);
        assert_eq!(withdraw_all(&mut b, ms(1_000)), 300);
        assert!(!b.try_withdraw(ms(9_999)));
        // Five more requests deposit one retry exactly.
        for _ in 0..4 {
            b.on_request(ms(5_000));
        }
        assert!(!b.try_withdraw(ms(5_000)));
        b.on_request(ms(5_000));
        assert!(b.try_withdraw(ms(5_000)));
        assert!(!b.try_withdraw(ms(5_000)));
    }

    #[test]
    fn deposits_and_withdrawals_expire_with_the_window() {
        let mut b = RetryBudget::new(&BudgetConfig::default(), ms(0));
        for _ in 0..500 {
            b.on_request(ms(500));
        }
        assert_eq!(withdraw_all(&mut b, ms(500)), 200);
        // The slice [0, 1 s) leaves the window at 10 s: deposits and withdrawals with it.
        assert_eq!(b.available(ms(9_999)), 0);
        assert_eq!(b.available(ms(10_000)), 100);
        // Withdrawals against the reserve also come back after the window.
        assert_eq!(withdraw_all(&mut b, ms(10_000)), 100);
        assert_eq!(b.available(ms(19_999)), 0);
        assert_eq!(b.available(ms(20_000)), 100);
    }

    #[test]
    fn sliding_accounting_is_exact() {
        // 100 requests a second, a retry whenever allowed, 20 seconds long.
        let mut b = RetryBudget::new(&BudgetConfig::default(), ms(0));
        let mut retries_by_second = Vec::new();
        for second in 0..20u64 {
            for i in 0..100 {
                b.on_request(ms(second * 1_000 + i * 10));
            }
            retries_by_second.push(withdraw_all(&mut b, ms(second * 1_000 + 999)));
        }
        // The first second takes the reserve and its 20; later each second gets its own 20,
        // until the first second's withdrawals leave the window at 10 s.
        assert_eq!(retries_by_second[0], 120);
        assert!(retries_by_second[1..10].iter().all(|&r| r == 20), "{retries_by_second:?}");
        assert_eq!(retries_by_second[10], 120);
        let in_any_window: Vec<u64> = retries_by_second.windows(10).map(|w| w.iter().sum()).collect();
        assert!(in_any_window.iter().all(|&r| r <= 100 + 20 * 10), "{in_any_window:?}");
    }

    #[test]
    fn fractions_and_zero() {
        let none = BudgetConfig::try_new(BudgetSettings { percent: 0.0, min_retries_per_sec: 0, ..Default::default() })
            .unwrap();
        let mut b = RetryBudget::new(&none, ms(0));
        for _ in 0..1_000 {
            b.on_request(ms(0));
        }
        assert!(!b.try_withdraw(ms(0)));
        // 12.5% of 8 requests is one retry; 2.5 s x 1/s is 2 more.
        let s = BudgetSettings { percent: 12.5, min_retries_per_sec: 1, ttl: Duration::from_millis(2_500) };
        let mut b = RetryBudget::new(&BudgetConfig::try_new(s).unwrap(), ms(0));
        for _ in 0..8 {
            b.on_request(ms(0));
        }
        assert_eq!(withdraw_all(&mut b, ms(0)), 3);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let d = BudgetSettings::default();
        for p in [-1.0, 1000.5, f64::NAN] {
            let e = BudgetConfig::try_new(BudgetSettings { percent: p, ..d }).unwrap_err();
            assert_eq!((e.section, e.field), ("retry_budget", "percent"));
        }
        for ttl in [Duration::ZERO, Duration::from_millis(999), Duration::from_secs(61)] {
            let e = BudgetConfig::try_new(BudgetSettings { ttl, ..d }).unwrap_err();
            assert_eq!(e.field, "ttl");
        }
        assert_eq!(BudgetConfig::try_new(d).unwrap(), BudgetConfig::default());
    }
}
