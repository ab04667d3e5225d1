//! Per-client rate limiting: a token bucket for each key (client IP, API key), with a bounded
//! number of keys.
//!
//! Each key has a bucket of `burst` tokens refilled at `rate` tokens a second; a request
//! takes one token or is limited, with the time until a token is back as its Retry-After. The
//! bucket is kept as the generic cell rate algorithm (GCRA, ITU-T I.371's virtual scheduling;
//! the form of the token bucket that Stripe, redis-cell and governor use): one "theoretical
//! arrival time" a key, computed from `now`, with no timers and no refill task. With an
//! emission interval `T = 1 / rate`, a request at `t` is allowed when
//! `max(tat, t) + T - t <= burst x T`, and then `tat = max(tat, t) + T`. A new key starts with
//! a full bucket. Times are whole nanoseconds: `T` is `1 s / rate` rounded to the nanosecond.
//!
//! At most `max_keys` (100,000) keys are remembered; a new key past that evicts the least
//! recently seen one (LRU), which then starts again with a full bucket: memory is bounded,
//! at the price of a client that cycles through more keys than that escaping its limit.
//! Keys are hashed with the standard library's randomly keyed SipHash, so a client cannot
//! choose keys that collide (the decisions do not depend on the hash).
//!
//! Cost: O(1) a check (a hash lookup and a few links), about 100 bytes a key plus the key.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::resilience::admission::{RateDecision, RateLimitConfig, RateLimitSettings, RateLimiter};
//!
//! let s = RateLimitSettings { rate: 2.0, burst: 2, ..RateLimitSettings::default() };
//! let mut limiter = RateLimiter::new(&RateLimitConfig::try_new(s).unwrap());
//! let client = b"203.0.113.7";
//! assert_eq!(limiter.check(client, Instant::ZERO), RateDecision::Allowed);
//! assert_eq!(limiter.check(client, Instant::ZERO), RateDecision::Allowed);
//! assert_eq!(limiter.check(client, Instant::ZERO), RateDecision::Limited { retry_after: Duration::from_millis(500) });
//! assert_eq!(limiter.check(client, Instant::from_millis(500)), RateDecision::Allowed);
//! ```

use std::collections::HashMap;
use std::time::Duration;

use crate::resilience::{Check, ConfigError};
use crate::time::Instant;

const SECTION: Check = Check { section: "rate_limit" };

/// Most keys a limiter may remember.
pub const MAX_KEYS: usize = 1 << 24;

const NIL: u32 = u32::MAX;

/// Rate-limit settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitSettings {
    /// Tokens a second, above 0 and at most 10^9 (10).
    pub rate: f64,
    /// Bucket size: requests allowed at once after a quiet spell (20).
    pub burst: u32,
    /// Keys remembered at most (100,000).
    pub max_keys: usize,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings { rate: 10.0, burst: 20, max_keys: 100_000 }
    }
}

/// Validated rate-limit settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Nanoseconds per token.
    interval: u64,
    burst: u32,
    max_keys: usize,
}

// === impl RateLimitConfig ===

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { interval: 100_000_000, burst: 20, max_keys: 100_000 }
    }
}

impl RateLimitConfig {
    /// Checks the settings: a rate above 0 and at most 10^9 a second, a burst of at least 1,
    /// 1 to [`MAX_KEYS`] keys.
    pub fn try_new(s: RateLimitSettings) -> Result<Self, ConfigError> {
        if !(s.rate.is_finite() && s.rate > 0.0 && s.rate <= 1e9) {
            return Err(SECTION.err("rate", format!("must be above 0 and at most 1e9 a second, got {}", s.rate)));
        }
        let interval = (1e9 / s.rate).round();
        if interval >= u64::MAX as f64 {
            return Err(SECTION.err("rate", format!("is too small, got {}", s.rate)));
        }
        SECTION.positive("burst", s.burst)?;
        if !(1..=MAX_KEYS).contains(&s.max_keys) {
            return Err(SECTION.err("max_keys", format!("must be between 1 and {MAX_KEYS}, got {}", s.max_keys)));
        }
        Ok(RateLimitConfig { interval: interval as u64, burst: s.burst, max_keys: s.max_keys })
    }

    /// Time for one token to come back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// Bucket size.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Keys remembered at most.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }
}

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// Go ahead.
    Allowed,
    /// Over the limit: answer 429 with a `Retry-After`
    /// ([`retry_after_secs`](super::retry_after_secs)).
    Limited {
        /// When a token is back.
        retry_after: Duration,
    },
}

#[derive(Clone, Debug)]
struct Slot {
    key: Box<[u8]>,
    /// Theoretical arrival time, in nanoseconds.
    tat: u64,
    prev: u32,
    next: u32,
}

/// Token buckets by client key, the least recently seen evicted past `max_keys`.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    map: HashMap<Box<[u8]>, u32>,
    slots: Vec<Slot>,
    /// Most recently seen.
    head: u32,
    /// Least recently seen.
    tail: u32,
    /// Slots left unused after `max_keys` shrank.
    free: Vec<u32>,
}

// === impl RateLimiter ===

impl RateLimiter {
    /// A limiter that knows no key yet.
    pub fn new(config: &RateLimitConfig) -> Self {
        RateLimiter { config: *config, map: HashMap::new(), slots: Vec::new(), head: NIL, tail: NIL, free: Vec::new() }
    }

    /// Applies new settings; buckets stay (a smaller `max_keys` evicts at the next new keys).
    pub fn reconfigure(&mut self, config: &RateLimitConfig) {
        self.config = *config;
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `key` is remembered.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    /// Takes a token for `key` at `now`, or says when one is back.
    pub fn check(&mut self, key: &[u8], now: Instant) -> RateDecision {
        let t = now.as_nanos();
        let i = match self.map.get(key) {
            Some(&i) => {
                self.unlink(i);
                i
            }
            None => self.insert(key, t),
        };
        self.push_front(i);
        let (interval, burst) = (u128::from(self.config.interval), u128::from(self.config.burst));
        let slot = &mut self.slots[i as usize];
        let next = u128::from(slot.tat.max(t)) + interval;
        let ahead = next - u128::from(t);
        if ahead > burst * interval {
            let wait = ahead - burst * interval;
            return RateDecision::Limited {
                retry_after: Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX)),
            };
        }
        slot.tat = u64::try_from(next).unwrap_or(u64::MAX);
        RateDecision::Allowed
    }

    /// A slot for a new key with a full bucket, evicting the least recently seen key when
    /// full; the slot is not linked.
    fn insert(&mut self, key: &[u8], t: u64) -> u32 {
        while self.map.len() >= self.config.max_keys && self.tail != NIL {
            let old = self.tail;
            self.unlink(old);
            let evicted = std::mem::take(&mut self.slots[old as usize].key);
            self.map.remove(&evicted);
            if self.map.len() < self.config.max_keys {
                let slot = &mut self.slots[old as usize];
                slot.key = key.into();
                slot.tat = t;
                self.map.insert(key.into(), old);
                return old;
            }
            // A smaller max_keys: this slot waits unused.
            self.free.push(old);
        }
        let slot = Slot { key: key.into(), tat: t, prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                // At most MAX_KEYS slots: the index fits.
                let i = u32::try_from(self.slots.len()).unwrap_or(NIL - 1);
                self.slots.push(slot);
                i
            }
        };
        self.map.insert(key.into(), i);
        i
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let s = &mut self.slots[i as usize];
        s.prev = NIL;
        s.next = NIL;
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.slots[old as usize].prev = i;
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    fn limiter(rate: f64, burst: u32, max_keys: usize) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig::try_new(RateLimitSettings { rate, burst, max_keys }).unwrap())
    }

    fn allowed(l: &mut RateLimiter, key: &[u8], now: Instant, n: usize) -> usize {
        (0..n).filter(|_| l.check(key, now) == RateDecision::Allowed).count()
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let mut l = limiter(10.0, 5, 100);
        assert_eq!(allowed(&mut l, b"a", ms(0), 100), 5);
        // One token every 100 ms.
        assert_eq!(l.check(b"a", ms(50)), RateDecision::Limited { retry_after: Duration::from_millis(50) });
        assert_eq!(l.check(b"a", ms(100)), RateDecision::Allowed);
        assert_eq!(l.check(b"a", ms(100)), RateDecision::Limited { retry_after: Duration::from_millis(100) });
        // Over a second of steady traffic: ten more.
        let got: usize = (1..=10).map(|k| allowed(&mut l, b"a", ms(100 + 100 * k), 3)).sum();
        assert_eq!(got, 10);
        // A quiet spell refills to the burst, not beyond.
        assert_eq!(allowed(&mut l, b"a", ms(60_000), 100), 5);
        // Other keys have their own buckets.
        assert_eq!(allowed(&mut l, b"b", ms(60_000), 100), 5);
    }

    #[test]
    fn limited_requests_take_no_token() {
        let mut l = limiter(1.0, 1, 10);
        assert_eq!(l.check(b"k", ms(0)), RateDecision::Allowed);
        for t in [0, 200, 400, 999] {
            let RateDecision::Limited { retry_after } = l.check(b"k", ms(t)) else { panic!("limited at {t}") };
            assert_eq!(retry_after, Duration::from_millis(1_000 - t));
        }
        assert_eq!(l.check(b"k", ms(1_000)), RateDecision::Allowed);
    }

    #[test]
    fn keys_are_capped_least_recently_seen_first() {
        let mut l = limiter(1.0, 1, 3);
        for k in [b"a", b"b", b"c"] {
            assert_eq!(l.check(k, ms(0)), RateDecision::Allowed);
        }
        // Seeing `a` again makes `b` the least recent.
        assert!(matches!(l.check(b"a", ms(1)), RateDecision::Limited { .. }));
        assert_eq!(l.check(b"d", ms(2)), RateDecision::Allowed);
        assert_eq!(l.len(), 3);
        assert!(!l.contains(b"b") && l.contains(b"a") && l.contains(b"c") && l.contains(b"d"));
        // `b` was forgotten: a full bucket again. `c` goes now.
        assert_eq!(l.check(b"b", ms(3)), RateDecision::Allowed);
        assert!(!l.contains(b"c"));
        // `a` kept its bucket all along.
        assert!(matches!(l.check(b"a", ms(4)), RateDecision::Limited { .. }));
        for i in 0..1_000u32 {
            l.check(&i.to_le_bytes(), ms(5));
            assert!(l.len() <= 3);
        }
    }

    #[test]
    fn shrinking_the_key_cap() {
        let mut l = limiter(1.0, 1, 5);
        for k in 0..5u8 {
            l.check(&[k], ms(0));
        }
        l.reconfigure(&RateLimitConfig::try_new(RateLimitSettings { rate: 1.0, burst: 1, max_keys: 2 }).unwrap());
        l.check(b"new", ms(1));
        assert_eq!(l.len(), 2);
        assert!(l.contains(b"new") && l.contains(&[4]));
        for k in 10..20u8 {
            l.check(&[k], ms(2));
            assert_eq!(l.len(), 2);
        }
        assert!(!l.is_empty());
    }

    #[test]
    fn extreme_rates() {
        // One a day: a day's wait.
        let mut l = limiter(1.0 / 86_400.0, 1, 1);
        l.check(b"x", ms(0));
        assert_eq!(l.check(b"x", ms(0)), RateDecision::Limited { retry_after: Duration::from_secs(86_400) });
        // A billion a second, a huge burst, at the far end of time: no overflow.
        let mut l = limiter(1e9, u32::MAX, 1);
        assert_eq!(allowed(&mut l, b"x", Instant::from_nanos(u64::MAX), 1_000), 1_000);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let d = RateLimitSettings::default();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e9, 1e-300] {
            let e = RateLimitConfig::try_new(RateLimitSettings { rate, ..d }).unwrap_err();
            assert_eq!((e.section, e.field), ("rate_limit", "rate"), "{rate}");
        }
        assert_eq!(RateLimitConfig::try_new(RateLimitSettings { burst: 0, ..d }).unwrap_err().field, "burst");
        for max_keys in [0, MAX_KEYS + 1] {
            assert_eq!(RateLimitConfig::try_new(RateLimitSettings { max_keys, ..d }).unwrap_err().field, "max_keys");
        }
        assert_eq!(RateLimitConfig::try_new(d).unwrap(), RateLimitConfig::default());
        assert_eq!(RateLimitConfig::default().interval(), Duration::from_millis(100));
    }
}
