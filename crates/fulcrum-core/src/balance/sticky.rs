//! Session persistence by hashing: `ip_hash`, `header_hash`, `cookie_hash`.
//!
//! HAProxy's `balance source` / `balance hdr(name)` with its default map-based hashing, and
//! NGINX's `ip_hash` / `hash $cookie_x`: the key's hash indexes a table in which each endpoint
//! appears as often as its weight (the smooth weighted schedule of
//! [`weighted_round_robin`](super::weighted_round_robin), so turns are spread). The same key
//! lands on the same endpoint while the pool does not change; when it changes, many keys move
//! (use `consistent_hash`, `maglev` or `rendezvous` when that matters). A vetoed endpoint
//! rehashes the key up to 8 times (NGINX tries 20), then scans. A request without a key is
//! spread at random. Cost: O(1), one hash of the key.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=5).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let policy = Policy::HeaderHash { header: "x-user".into() };
//! let pool = Selector::try_new(policy, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let facts = RequestFacts::with_key(b"alice");
//! let first = pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true);
//! assert!((0..10).all(|_| pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true) == first));
//! ```

use super::weighted_round_robin::Schedule;
use super::{Balance, PickCx, PoolView};
use crate::hash::{mix, reduce};

const REHASHES: u64 = 8;

/// Key-hash persistence over a weighted table.
#[derive(Debug)]
pub(crate) struct Sticky {
    schedule: Schedule,
    from_client: bool,
}

impl Sticky {
    pub(crate) fn new(weights: &[u32], from_client: bool) -> Self {
        Sticky { schedule: Schedule::build(weights), from_client }
    }
}

impl Balance for Sticky {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let mut h = cx.key_hash(self.from_client);
        for attempt in 0..REHASHES {
            let idx = self.schedule.at(reduce(h, len));
            if cx.accepts(pool, idx) {
                return Some(idx);
            }
            h = mix(h, attempt + 1);
        }
        self.schedule.pick_from(reduce(h, len), pool, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use crate::{Instant, Policy, RequestFacts};
    use rand::{SeedableRng, rngs::SmallRng};
    use std::net::IpAddr;

    #[test]
    fn same_client_same_endpoint_and_vetoes_rehash() {
        let pool = selector(Policy::IpHash, &[1, 2, 3, 1]);
        let mut rng = SmallRng::seed_from_u64(1);
        for last in 0..50u8 {
            let facts = RequestFacts::with_client(IpAddr::from([192, 168, 0, last]));
            let a = pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true).unwrap();
            assert_eq!(pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true), Some(a));
            let id = pool.endpoints()[a].id().clone();
            let b = pool.pick_index(&facts, Instant::ZERO, &mut rng, |e| *e.id() != id).unwrap();
            assert_ne!(a, b);
        }
    }

    #[test]
    fn missing_key_spreads() {
        let pool = selector(Policy::CookieHash { cookie: "sid".into() }, &[1, 1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[pool.pick_index(&RequestFacts::default(), Instant::ZERO, &mut rng, |_| true).unwrap()] = true;
        }
        assert_eq!(seen, [true; 4]);
    }
}
