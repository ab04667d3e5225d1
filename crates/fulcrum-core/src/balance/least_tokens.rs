//! Least outstanding tokens: the fewest estimated tokens in flight per unit of capacity.
//!
//! LLM requests differ by orders of magnitude: a 50-token question and a 100,000-token
//! document both count as one connection to `least_connections`. This policy counts what the
//! engine has to do instead: each request in flight weighs its estimated prompt and output
//! tokens ([`RequestFacts::estimated_tokens`](crate::RequestFacts::estimated_tokens), as
//! [`openai`](crate::openai) estimates them; the same number the data plane passes to
//! [`Selector::begin`](crate::Selector::begin)). Cost of endpoint *i* =
//! (in-flight tokens + this request's tokens) / capacity, where capacity is the static weight
//! or the accelerator's entry in a table (`capacity`, see [`Capacity`](crate::policy::Capacity))
//! times the slow-start ramp. Adding the request's own tokens makes a large idle
//! endpoint cheaper than a small idle one, as `least_connections`' `+ 1` does. It is NGINX's
//! `least_conn` (see [`least`](super::least)) with each request weighed by its tokens, and
//! with the endpoints' relative speed made explicit for mixed fleets. Ties rotate.
//! Cost: O(n) a pick.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=2).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new("least_tokens".parse().unwrap(), Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! // One long document on the first endpoint outweighs many short chats on the second.
//! let _doc = pool.begin(&pool.endpoints()[0].clone(), 50_000, Instant::ZERO);
//! let _chats: Vec<_> = (0..10).map(|_| pool.begin(&pool.endpoints()[1].clone(), 300, Instant::ZERO)).collect();
//! let facts = RequestFacts { estimated_tokens: 500, ..RequestFacts::default() };
//! assert_eq!(pool.pick_index(&facts, Instant::ZERO, &mut rng, |_| true), Some(1));
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use super::ai::{Capacities, least, request_tokens};
use super::{Balance, PickCx, PoolView};

/// Fewest in-flight tokens per unit of capacity.
#[derive(Debug)]
pub(crate) struct LeastTokens {
    capacities: Capacities,
    start: AtomicUsize,
}

impl LeastTokens {
    pub(crate) fn new(capacities: Capacities) -> Self {
        LeastTokens { capacities, start: AtomicUsize::new(0) }
    }
}

impl Balance for LeastTokens {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let n = pool.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let tokens = request_tokens(cx.facts);
        least(pool, start, cx, |idx| (0, self.capacities.load_after(idx, &pool.endpoints[idx], tokens)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{selector, specs};
    use crate::policy::Capacity;
    use crate::{Instant, Policy, RequestFacts, Selector, SelectorOptions};
    use rand::{SeedableRng, rngs::SmallRng};

    fn facts(tokens: u64) -> RequestFacts<'static> {
        RequestFacts { estimated_tokens: tokens, ..RequestFacts::default() }
    }

    #[test]
    fn tokens_not_requests_decide() {
        let pool = selector(Policy::LeastTokens { capacity: Capacity::Weight }, &[1, 1, 1]);
        let e = pool.endpoints().to_vec();
        let _a = pool.begin(&e[0], 10_000, Instant::ZERO);
        let _b: Vec<_> = (0..5).map(|_| pool.begin(&e[1], 100, Instant::ZERO)).collect();
        let _c = pool.begin(&e[2], 2_000, Instant::ZERO);
        let mut rng = SmallRng::seed_from_u64(0);
        assert_eq!(pool.pick_index(&facts(100), Instant::ZERO, &mut rng, |_| true), Some(1));
        // Vetoing the best leaves the next best.
        let best = e[1].id().clone();
        assert_eq!(pool.pick_index(&facts(100), Instant::ZERO, &mut rng, |x| *x.id() != best), Some(2));
    }

    #[test]
    fn ties_rotate() {
        let pool = selector(Policy::LeastTokens { capacity: Capacity::Weight }, &[1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(0);
        let picks: Vec<usize> =
            (0..6).map(|_| pool.pick_index(&facts(0), Instant::ZERO, &mut rng, |_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn capacity_scales_load_by_accelerator() {
        let mut s = specs(&[1, 1]);
        s[0].labels.accelerator = Some("h100".into());
        s[1].labels.accelerator = Some("l4".into());
        let policy = Policy::LeastTokens { capacity: Capacity::accelerator_defaults() };
        let pool = Selector::try_new(policy, SelectorOptions::default(), s, Instant::ZERO).unwrap();
        let e = pool.endpoints().to_vec();
        let mut rng = SmallRng::seed_from_u64(0);
        let mut guards = Vec::new();
        for _ in 0..50 {
            let i = pool.pick_index(&facts(1_000), Instant::ZERO, &mut rng, |_| true).unwrap();
            guards.push(pool.begin(&e[i], 1_000, Instant::ZERO));
        }
        // Four units of capacity against one: 40 and 10.
        assert_eq!((e[0].signals().in_flight(), e[1].signals().in_flight()), (40, 10));
    }
}
