//! Smooth weighted round robin, with NGINX's semantics.
//!
//! NGINX's algorithm (Maxim Dounin, 2012): at each turn every endpoint's current weight grows
//! by its weight, the largest current weight wins and pays back the total. Weights a=5, b=1,
//! c=1 give `a a b a c a a`: the heavy endpoint's turns are spread out, not bunched.
//!
//! NGINX runs that loop on every request under a lock, O(n) a pick. We run it once, when the
//! pool is built, over one period (the sum of the weights after dividing by their greatest
//! common divisor) and store the sequence; a pick is then one atomic increment and one table
//! read, O(1) and lock-free, and the sequence is exactly NGINX's. Weights are the endpoints'
//! effective weights (slow start, dynamic factor), quantized to 1% of the largest when any
//! differs from its static weight; the selector rebuilds the table when they change. Above
//! 2^24 steps of simulation (say 10,000 endpoints of varied weights) the table is filled by an
//! earliest-deadline-first pass instead, O(W log n), with the same shares and spacing but ties
//! broken differently from NGINX. The table holds at most 2^20 entries; larger weight sums are
//! scaled down (each endpoint keeps at least one turn).
//!
//! ```
//! use std::num::NonZeroU32;
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = [5, 1, 1].iter().enumerate().map(|(i, &w)| {
//!     EndpointSpec::new(([127, 0, 0, 1], 9000 + i as u16).into()).with_weight(NonZeroU32::new(w).unwrap())
//! }).collect();
//! let pool = Selector::try_new(Policy::WeightedRoundRobin, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let names: String = (0..7)
//!     .map(|_| pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap())
//!     .map(|i| (b'a' + i as u8) as char)
//!     .collect();
//! assert_eq!(names, "aabacaa");
//! ```

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balance, PickCx, PoolView, scan_from};

/// At most this many entries in a schedule.
pub(crate) const MAX_SCHEDULE: u64 = 1 << 20;
/// Above this many (steps x endpoints), fill the schedule by EDF instead of simulating NGINX.
const MAX_SIMULATION: u64 = 1 << 24;
/// How many further schedule slots a vetoed pick tries before scanning.
const VETO_TRIES: usize = 16;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Integer table weights from effective weights: the static weights themselves when nothing
/// modifies them, else 1% steps of the largest; reduced by their gcd and capped so that
/// their sum stays within [`MAX_SCHEDULE`].
pub(crate) fn table_weights(statics: &[u32], effective: &[f64]) -> Vec<u32> {
    let unmodified = statics.iter().zip(effective).all(|(&s, &e)| f64::from(s) == e);
    let mut q: Vec<u64> = if unmodified {
        statics.iter().map(|&s| u64::from(s)).collect()
    } else {
        let max = effective.iter().copied().fold(0.0_f64, f64::max);
        effective.iter().map(|&e| if max > 0.0 { ((e / max) * 100.0).round().max(1.0) as u64 } else { 1 }).collect()
    };
    let g = q.iter().copied().fold(0, gcd).max(1);
    q.iter_mut().for_each(|w| *w /= g);
    let total: u64 = q.iter().sum();
    let cap = MAX_SCHEDULE.max(q.len() as u64);
    if total > cap {
        // Leave room for the turn every endpoint keeps.
        let scale = (cap - q.len() as u64) as f64 / total as f64;
        q.iter_mut().for_each(|w| *w = ((*w as f64 * scale).floor() as u64).max(1));
    }
    q.into_iter().map(|w| u32::try_from(w).unwrap_or(u32::MAX)).collect()
}

/// One period of a smooth weighted sequence of endpoint indices.
#[derive(Debug)]
pub(crate) struct Schedule {
    slots: Box<[u32]>,
}

impl Schedule {
    /// Builds the sequence for integer weights (each at least 1).
    pub(crate) fn build(weights: &[u32]) -> Schedule {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let n = weights.len() as u64;
        let slots = if total.saturating_mul(n) <= MAX_SIMULATION {
            Self::nginx(weights, total)
        } else {
            Self::edf(weights, total)
        };
        Schedule { slots: slots.into_boxed_slice() }
    }

    fn nginx(weights: &[u32], total: u64) -> Vec<u32> {
        let total = total as i64;
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                current[i] += i64::from(w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            out.push(best as u32);
        }
        out
    }

    fn edf(weights: &[u32], total: u64) -> Vec<u32> {
        // Endpoint i's k-th turn is due at (2k + 1) / (2 w_i): the middle of its k-th share.
        #[derive(PartialEq, Eq)]
        struct Due {
            num: u64,
            den: u64,
            idx: u32,
        }
        impl Ord for Due {
            fn cmp(&self, o: &Self) -> CmpOrdering {
                (u128::from(self.num) * u128::from(o.den))
                    .cmp(&(u128::from(o.num) * u128::from(self.den)))
                    .then(self.idx.cmp(&o.idx))
            }
        }
        impl PartialOrd for Due {
            fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
                Some(self.cmp(o))
            }
        }
        let mut heap: BinaryHeap<Reverse<Due>> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Reverse(Due { num: 1, den: 2 * u64::from(w), idx: i as u32 }))
            .collect();
        let mut out = Vec::with_capacity(total as usize);
        while let Some(Reverse(mut due)) = heap.pop() {
            out.push(due.idx);
            if out.len() as u64 == total {
                break;
            }
            due.num += 2;
            heap.push(Reverse(due));
        }
        out
    }

    /// The number of slots (one period).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The endpoint in slot `pos % len`.
    #[inline]
    pub(crate) fn at(&self, pos: usize) -> usize {
        self.slots[pos % self.slots.len()] as usize
    }

    /// The first acceptable endpoint from slot `pos`: a few further slots, then a scan.
    pub(crate) fn pick_from(&self, pos: usize, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        for i in 0..VETO_TRIES.min(self.slots.len()) {
            let idx = self.at(pos.wrapping_add(i));
            if cx.accepts(pool, idx) {
                return Some(idx);
            }
        }
        scan_from(pool, self.at(pos), cx)
    }
}

/// Smooth weighted round robin over a precomputed schedule.
#[derive(Debug)]
pub(crate) struct WeightedRoundRobin {
    schedule: Schedule,
    next: AtomicUsize,
}

impl WeightedRoundRobin {
    pub(crate) fn new(weights: &[u32]) -> Self {
        WeightedRoundRobin { schedule: Schedule::build(weights), next: AtomicUsize::new(0) }
    }
}

impl Balance for WeightedRoundRobin {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let pos = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule.pick_from(pos, pool, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters(s: &Schedule) -> String {
        (0..s.len()).map(|i| (b'a' + s.at(i) as u8) as char).collect()
    }

    #[test]
    fn matches_nginx_sequences() {
        assert_eq!(letters(&Schedule::build(&[5, 1, 1])), "aabacaa");
        assert_eq!(letters(&Schedule::build(&[1, 1, 1])), "abc");
        assert_eq!(letters(&Schedule::build(&[4, 2, 1])), "abacaba");
        assert_eq!(letters(&Schedule::build(&[3, 2])), "abab".to_owned() + "a");
    }

    #[test]
    fn gcd_shrinks_the_period() {
        assert_eq!(table_weights(&[10, 20, 30], &[10.0, 20.0, 30.0]), [1, 2, 3]);
    }

    #[test]
    fn modified_weights_are_quantized_to_percent_of_max() {
        // b ramps at 25%: 4 and 1 after the gcd.
        assert_eq!(table_weights(&[2, 2], &[2.0, 0.5]), [4, 1]);
        // Nothing drops to zero.
        assert_eq!(table_weights(&[1, 1], &[1.0, 0.0001]), [100, 1]);
    }

    #[test]
    fn huge_sums_are_capped() {
        let w = table_weights(&[u32::MAX, 1, 7], &[f64::from(u32::MAX), 1.0, 7.0]);
        let total: u64 = w.iter().map(|&x| u64::from(x)).sum();
        assert!(total <= MAX_SCHEDULE, "{total}");
        assert!(w.iter().all(|&x| x >= 1));
    }

    #[test]
    fn edf_keeps_shares_exact() {
        let weights: Vec<u32> = (1..=300).collect();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let s = Schedule { slots: Schedule::edf(&weights, total).into_boxed_slice() };
        let mut counts = vec![0u32; weights.len()];
        (0..s.len()).for_each(|i| counts[s.at(i)] += 1);
        assert_eq!(counts, weights);
    }
}
