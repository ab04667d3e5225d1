//! Weighted rendezvous (highest random weight) hashing.
//!
//! Thaler and Ravishankar (1998): each endpoint scores the key with a hash of (key, endpoint)
//! and the highest score wins. Weighted by the logarithmic method (Schindelhauer and Schomaker,
//! 2005, as in Resch's "weighted HRW"): score = weight / -ln(u), with u the hash mapped into
//! (0, 1), which gives each endpoint exactly its weight's share of keys. A score depends only on
//! the key and its endpoint, so removing an endpoint moves only its own keys and never a key
//! between the others; no table to build or store. Cost: O(n) a pick (one mix and one `ln`
//! per endpoint): best for pools up to a few hundred endpoints; use `maglev` beyond.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, HashKey, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=3).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let pool = Selector::try_new(Policy::Rendezvous { key: HashKey::Path }, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let key = RequestFacts::with_key(b"/v1/models/llama");
//! let owner = pool.pick_index(&key, Instant::ZERO, &mut rng, |_| true).unwrap();
//! // Veto the owner and the key goes to its runner-up, the same one every time.
//! let second = pool.pick_index(&key, Instant::ZERO, &mut rng, |e| e.id() != pool.endpoints()[owner].id());
//! assert_ne!(second, Some(owner));
//! assert_eq!(pool.pick_index(&key, Instant::ZERO, &mut rng, |e| e.id() != pool.endpoints()[owner].id()), second);
//! ```

use super::{Balance, PickCx, PoolView};
use crate::endpoint::Endpoint;
use crate::hash::{hash_bytes, mix, unit_interval};

/// Per-endpoint hash seeds and weights.
#[derive(Debug)]
pub(crate) struct Rendezvous {
    seeds: Box<[u64]>,
    weights: Box<[f64]>,
    from_client: bool,
}

impl Rendezvous {
    pub(crate) fn new(endpoints: &[Endpoint], from_client: bool) -> Self {
        Rendezvous {
            seeds: endpoints.iter().map(|e| hash_bytes(e.id().as_str().as_bytes(), 0)).collect(),
            weights: endpoints.iter().map(|e| f64::from(e.weight().get())).collect(),
            from_client,
        }
    }

    #[inline]
    fn score(&self, key: u64, idx: usize) -> f64 {
        self.weights[idx] / -unit_interval(mix(key, self.seeds[idx])).ln()
    }
}

impl Balance for Rendezvous {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let key = cx.key_hash(self.from_client);
        let mut best: Option<(usize, f64)> = None;
        for idx in 0..pool.endpoints.len() {
            let s = self.score(key, idx);
            // Only a candidate that would win is offered to the veto.
            if best.is_none_or(|(_, b)| s > b) && cx.accepts(pool, idx) {
                best = Some((idx, s));
            }
        }
        best.map(|(idx, _)| idx)
    }
}
