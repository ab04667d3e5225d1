//! Exponential backoff: how long to wait before the n-th try in a row.
//!
//! One type for every wait that grows with failures: the retry of a request (full jitter,
//! [`resilience::retry`](crate::resilience::retry)), the restart of a crashed replica (no
//! jitter, starting over after a healthy run, [`scale::restart`](crate::scale::restart)) and
//! a discovery provider's reconnection (no jitter, starting over after a success).
//!
//! The n-th wait in a row (n from 1) has the ceiling `min(max, base x factor^(n-1))`, the
//! exponential backoff of Ethernet and TCP's retransmission timer. Without jitter the wait is
//! the ceiling; with full jitter (Brooker, "Exponential Backoff And Jitter", AWS Architecture
//! Blog, 2015) it is uniform in `[0, ceiling]`, drawn from an injected generator, so that
//! clients that failed together do not come back together. The attempt count belongs to the
//! caller (it knows when a run of failures ends), so a [`Backoff`] is an immutable value.
//!
//! Cost: O(1), no allocation; one draw from the generator with jitter, none without.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::backoff::Backoff;
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let ms = Duration::from_millis;
//! let restart = Backoff::new(ms(500), Duration::from_secs(30));
//! let waits: Vec<_> = (1..=8).map(|n| restart.ceiling(n)).collect();
//! assert_eq!(waits, [ms(500), ms(1_000), ms(2_000), ms(4_000), ms(8_000), ms(16_000), ms(30_000), ms(30_000)]);
//!
//! let retry = Backoff::new(ms(25), ms(250)).with_full_jitter();
//! let mut rng = SmallRng::seed_from_u64(7);
//! assert!(retry.delay(3, &mut rng) <= ms(100));
//! ```

use std::time::Duration;

use rand::RngCore;

use crate::resilience::{nanos, uniform_up_to};

/// How a wait is spread below its ceiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Jitter {
    /// The wait is the ceiling.
    #[default]
    None,
    /// The wait is uniform in `[0, ceiling]`.
    Full,
}

/// An exponential backoff; see the [module](self) docs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    max: Duration,
    jitter: Jitter,
}

// === impl Backoff ===

impl Backoff {
    /// Waits from `base`, doubling up to `max`, without jitter. A `base` above `max` waits
    /// `max` each time.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, factor: 2.0, max, jitter: Jitter::None }
    }

    /// The same, growing by `factor` at each attempt instead of 2. A factor below 1 (or NaN)
    /// counts as 1: the waits never shrink.
    pub fn with_factor(self, factor: f64) -> Self {
        Backoff { factor: factor.max(1.0), ..self }
    }

    /// The same, with full jitter.
    pub const fn with_full_jitter(self) -> Self {
        Backoff { jitter: Jitter::Full, ..self }
    }

    /// The first wait's ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// How much each attempt multiplies the ceiling.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The largest ceiling.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How waits are spread below their ceiling.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The ceiling of attempt `attempt` in a row (from 1; 0 counts as 1):
    /// `min(max, base x factor^(attempt-1))`, to the nanosecond. Never above `max`, and never
    /// smaller for a later attempt.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let max = nanos(self.max);
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        // Exact for whole factors: a power of two scales a float without rounding.
        let grown = nanos(self.base) as f64 * self.factor.powi(exponent);
        Duration::from_nanos(if grown < max as f64 { (grown as u64).min(max) } else { max })
    }

    /// The wait before attempt `attempt` in a row (from 1): the [`ceiling`](Self::ceiling),
    /// or with [`Jitter::Full`] a uniform draw from `[0, ceiling]` taken from `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut dyn RngCore) -> Duration {
        let ceiling = self.ceiling(attempt);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => Duration::from_nanos(uniform_up_to(rng, nanos(ceiling))),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;
    use rand::rngs::SmallRng;
    use rand::{RngCore, SeedableRng};

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_to_the_cap() {
        let b = Backoff::new(ms(100), ms(5_000));
        let waits: Vec<_> = (1..=9).map(|n| b.ceiling(n)).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1_600), ms(3_200), ms(5_000), ms(5_000), ms(5_000)]);
        assert_eq!(b.ceiling(0), ms(100));
        assert_eq!(b.ceiling(u32::MAX), ms(5_000));
    }

    #[test]
    fn other_factors_and_odd_settings() {
        let b = Backoff::new(ms(100), ms(1_000)).with_factor(1.5);
        assert_eq!((b.ceiling(2), b.ceiling(3)), (ms(150), ms(225)));
        // A factor below 1 or NaN never shrinks the wait; an infinite one jumps to the cap.
        assert_eq!(Backoff::new(ms(100), ms(1_000)).with_factor(0.5).ceiling(5), ms(100));
        assert_eq!(Backoff::new(ms(100), ms(1_000)).with_factor(f64::NAN).ceiling(5), ms(100));
        assert_eq!(Backoff::new(ms(100), ms(1_000)).with_factor(f64::INFINITY).ceiling(2), ms(1_000));
        // A base above the cap waits the cap; huge durations saturate.
        assert_eq!(Backoff::new(ms(500), ms(200)).ceiling(1), ms(200));
        assert_eq!(Backoff::new(Duration::MAX, Duration::MAX).ceiling(3), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn without_jitter_the_rng_is_untouched() {
        let b = Backoff::new(ms(25), ms(250));
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(b.delay(2, &mut rng), ms(50));
        assert_eq!(rng.next_u64(), SmallRng::seed_from_u64(3).next_u64());
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = Backoff::new(ms(25), ms(250)).with_full_jitter();
        assert_eq!(b.jitter(), Jitter::Full);
        let mut rng = SmallRng::seed_from_u64(9);
        let draws: Vec<Duration> = (0..2_000).map(|_| b.delay(3, &mut rng)).collect();
        let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(*max <= ms(100) && *max > ms(99), "{max:?}");
        assert!(*min < ms(1), "{min:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, rng_seed: RngSeed::Fixed(0xBAC0_2026), ..ProptestConfig::default() })]

        #[test]
        fn waits_stay_under_the_cap_and_grow_without_jitter(
            base_ms in 1u64..10_000,
            max_ms in 1u64..100_000,
            factor in 0.5f64..8.0,
            attempt in 0u32..200,
            seed: u64,
        ) {
            let b = Backoff::new(ms(base_ms), ms(max_ms)).with_factor(factor);
            let (now, next) = (b.ceiling(attempt), b.ceiling(attempt + 1));
            prop_assert!(now <= ms(max_ms) && next <= ms(max_ms));
            prop_assert!(now <= next, "{now:?} then {next:?}");
            prop_assert!(now >= ms(base_ms.min(max_ms)));
            let mut rng = SmallRng::seed_from_u64(seed);
            prop_assert_eq!(b.delay(attempt, &mut rng), now);
            prop_assert!(b.with_full_jitter().delay(attempt, &mut rng) <= now);
        }
    }
}
