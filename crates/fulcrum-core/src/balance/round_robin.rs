//! Round robin: each endpoint in turn.
//!
//! The oldest policy of all (NGINX's and HAProxy's `roundrobin` without weights). One shared
//! atomic counter; a vetoed endpoint passes the turn to the next one. Cost: O(1), one atomic
//! increment (O(n) only when most endpoints are vetoed). Use it for equal backends and short,
//! uniform requests; for streams of uneven length prefer `least_connections` or
//! `power_of_two`.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=3).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new(Policy::RoundRobin, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let ports: Vec<u16> = (0..4)
//!     .map(|_| pool.pick(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap().address().port())
//!     .collect();
//! assert_eq!(ports, [9001, 9002, 9003, 9001]);
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balance, PickCx, PoolView, scan_from};

/// Round robin state: the next turn.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
}

impl Balance for RoundRobin {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        scan_from(pool, start, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use crate::{Instant, Policy, RequestFacts};
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn turns_rotate_and_skip_vetoed() {
        let pool = selector(Policy::RoundRobin, &[1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(0);
        let vetoed = pool.endpoints()[1].id().clone();
        let picks: Vec<usize> = (0..4)
            .map(|_| pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |e| *e.id() != vetoed).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 2, 0]);
    }
}
