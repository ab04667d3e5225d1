//! Random and weighted random choice, from an injected seeded generator.
//!
//! Uniform when every effective weight is equal; otherwise Walker's alias method (Vose's
//! construction, 1991): one table of n thresholds and aliases built in O(n), then a pick is one
//! random number, one table read and one comparison, O(1) at any pool size. Many proxies
//! choosing at random spread load without talking to each other, and a fixed seed replays a
//! run exactly (the simulator depends on that). Weights are the endpoints' effective weights,
//! quantized as for [`weighted_round_robin`](super::weighted_round_robin).
//!
//! ```
//! use std::num::NonZeroU32;
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = [3, 1].iter().enumerate().map(|(i, &w)| {
//!     EndpointSpec::new(([127, 0, 0, 1], 9000 + i as u16).into()).with_weight(NonZeroU32::new(w).unwrap())
//! }).collect();
//! let pool = Selector::try_new(Policy::Random, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let heavy = (0..10_000)
//!     .filter(|_| pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true) == Some(0))
//!     .count();
//! assert!((7_200..7_800).contains(&heavy)); // about 3/4
//! ```

use super::{Balance, PickCx, PoolView, scan_from};
use crate::hash::reduce;

const VETO_TRIES: usize = 8;

/// Random choice: uniform, or through an alias table.
#[derive(Debug)]
pub(crate) struct Random {
    /// `None` when all weights are equal.
    alias: Option<AliasTable>,
}

#[derive(Debug)]
struct AliasTable {
    /// Probability of keeping column i, scaled to 2^32.
    keep: Box<[u64]>,
    alias: Box<[u32]>,
}

impl AliasTable {
    fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut scaled: Vec<f64> = weights.iter().map(|&w| f64::from(w) * n as f64 / total).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
        let mut keep = vec![1u64 << 32; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = (scaled[s] * (1u64 << 32) as f64) as u64;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers (rounding) keep their own column.
        AliasTable { keep: keep.into_boxed_slice(), alias: alias.into_boxed_slice() }
    }

    #[inline]
    fn sample(&self, r: u64) -> usize {
        let col = reduce(r, self.keep.len());
        if (r & 0xFFFF_FFFF) < self.keep[col] { col } else { self.alias[col] as usize }
    }
}

impl Random {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        Random { alias: (!equal && !weights.is_empty()).then(|| AliasTable::new(weights)) }
    }
}

impl Balance for Random {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let mut idx = 0;
        for _ in 0..VETO_TRIES {
            let r = cx.rng.next_u64();
            idx = match &self.alias {
                Some(t) => t.sample(r),
                None => reduce(r, n),
            };
            if cx.accepts(pool, idx) {
                return Some(idx);
            }
        }
        scan_from(pool, idx, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_table_reproduces_weights_exactly() {
        let weights = [5u32, 1, 1, 3, 10];
        let t = AliasTable::new(&weights);
        // Sum the probability mass each column sends to each endpoint.
        let n = weights.len();
        let mut mass = vec![0f64; n];
        for col in 0..n {
            let keep = t.keep[col] as f64 / (1u64 << 32) as f64;
            mass[col] += keep / n as f64;
            mass[t.alias[col] as usize] += (1.0 - keep) / n as f64;
        }
        let total: u32 = weights.iter().sum();
        for (m, &w) in mass.iter().zip(&weights) {
            assert!((m - f64::from(w) / f64::from(total)).abs() < 1e-6, "{mass:?}");
        }
    }
}
