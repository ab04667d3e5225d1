//! Seeded randomness: a counter-based generator and the output-length distribution.
//!
//! Every random draw in the mock comes from a [`SplitMix64`] seeded from the configured seed
//! and a request's number (or the `seed` the client sent), so a run is reproducible and a
//! request's draws do not depend on what other requests did.

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast, and good enough for simulation.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

// === impl SplitMix64 ===

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly distributed in the open interval (0, 1).
    pub fn next_f64(&mut self) -> f64 {
        fulcrum_core::hash::unit_interval(self.next_u64())
    }

    /// A standard normal draw (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// True with probability `p` (clamped to 0..=1).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }
}

/// How many tokens a request generates when it does not set `max_tokens`: a log-normal
/// distribution (chat answers are skewed: many short, a few long) with the given median and
/// shape, rounded and clamped to `1..=max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutputLen {
    /// Median output length in tokens.
    pub median: f64,
    /// Standard deviation of the logarithm (0 makes every answer `median` tokens long).
    pub sigma: f64,
    /// Upper clamp in tokens.
    pub max: u32,
}

// === impl OutputLen ===

impl OutputLen {
    /// One draw for the request seeded with `seed`.
    pub fn sample(&self, seed: u64) -> u32 {
        let mut rng = SplitMix64::new(seed ^ 0x6F75_7470_7574_6C65);
        let x = self.median * (self.sigma * rng.next_normal()).exp();
        if !x.is_finite() {
            return self.max.max(1);
        }
        (x.round().max(1.0).min(f64::from(self.max.max(1)))) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_in_range() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!(x > 0.0 && x < 1.0);
        }
        assert!(!SplitMix64::new(1).chance(0.0));
        assert!(SplitMix64::new(1).chance(1.0));
    }

    #[test]
    fn output_length_is_seeded_and_clamped() {
        let dist = OutputLen { median: 100.0, sigma: 1.0, max: 300 };
        assert_eq!(dist.sample(7), dist.sample(7));
        let draws: Vec<u32> = (0..10_000).map(|s| dist.sample(s)).collect();
        assert!(draws.iter().all(|&n| (1..=300).contains(&n)));
        let mut sorted = draws.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!((90..=110).contains(&median), "median {median}");
        let fixed = OutputLen { median: 12.0, sigma: 0.0, max: 50 };
        assert!((0..100).all(|s| fixed.sample(s) == 12));
    }
}
