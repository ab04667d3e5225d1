//! The balancing algorithms: one module and one type each, over an immutable snapshot.
//!
//! Every algorithm implements the crate-private `Balance` trait: it is built once from a pool's endpoints (tables,
//! rings, schedules are precomputed then) and answers `pick` without locks, reading live load
//! from atomics. The [`Selector`](crate::Selector) owns one and rebuilds it when membership or
//! table weights change.
//!
//! Every `pick` honours the caller's veto (`accept`): algorithms first try their own
//! candidates, then fall back to a scan, so a pool gives `None` only when every endpoint is
//! vetoed (or, for `bounded_load`, when every endpoint left is at its cap).
//!
//! The AI-aware policies (`least_tokens`, `prefix_affinity`, `score`) read the parsed request
//! ([`openai`](crate::openai)), compare load in estimated tokens per unit of capacity, and the
//! last two learn where prompts were sent in the pool's [`PrefixIndex`](crate::prefix::PrefixIndex),
//! the one piece of state they mutate at pick time (behind a lock).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;

use crate::endpoint::{Endpoint, LatencyConfig, PoolLoad};
use crate::facts::RequestFacts;
use crate::hash::hash_bytes;
use crate::policy::HashKey;
use crate::time::Instant;

pub(crate) mod ai;
pub mod least;
pub mod least_tokens;
pub mod maglev;
pub mod power_of_k;
pub mod predicted_ttft;
pub mod prefix_affinity;
pub mod random;
pub mod rendezvous;
pub mod ring;
pub mod round_robin;
pub mod score;
pub mod sticky;
pub mod weighted_round_robin;

/// A pool as an algorithm sees it at pick time.
#[derive(Clone, Copy)]
pub(crate) struct PoolView<'a> {
    pub endpoints: &'a [Endpoint],
    pub load: &'a PoolLoad,
    pub latency: &'a LatencyConfig,
    /// Engine reports older than this are unknown.
    pub engine_max_age: Duration,
}

/// The inputs of one pick.
pub(crate) struct PickCx<'a> {
    pub facts: &'a RequestFacts<'a>,
    pub now: Instant,
    pub rng: &'a mut dyn RngCore,
    pub accept: &'a mut dyn FnMut(&Endpoint) -> bool,
    /// Set by policies that know it: the prefix blocks the chosen endpoint holds.
    pub cached_blocks: u32,
}

/// A balancing algorithm over a fixed set of endpoints.
pub(crate) trait Balance: Send + Sync + fmt::Debug {
    /// The index of the chosen endpoint, or `None` when nothing acceptable is left.
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize>;
}

impl PickCx<'_> {
    pub(crate) fn accepts(&mut self, pool: &PoolView<'_>, idx: usize) -> bool {
        (self.accept)(&pool.endpoints[idx])
    }

    /// The key hash for a hashing policy: the client address when `from_client`, else the
    /// request's hash key; a random value when the request has none (spread evenly).
    pub(crate) fn key_hash(&mut self, from_client: bool) -> u64 {
        let hashed = if from_client {
            self.facts.client.map(|ip| match ip {
                IpAddr::V4(v4) => hash_bytes(&v4.octets(), 0),
                IpAddr::V6(v6) => hash_bytes(&v6.octets(), 0),
            })
        } else {
            self.facts.hash_key.map(|k| hash_bytes(k, 0))
        };
        hashed.unwrap_or_else(|| self.rng.next_u64())
    }
}

/// Whether a consistent-hashing key source reads the client address.
pub(crate) fn from_client(key: &HashKey) -> bool {
    matches!(key, HashKey::ClientIp)
}

/// The first acceptable endpoint at or after `start`, wrapping around.
pub(crate) fn scan_from(pool: &PoolView<'_>, start: usize, cx: &mut PickCx<'_>) -> Option<usize> {
    let n = pool.endpoints.len();
    (0..n).map(|i| (start + i) % n).find(|&idx| cx.accepts(pool, idx))
}

/// The acceptable endpoint of lowest cost, scanning from `start` so that ties rotate.
/// `accept` is asked only of endpoints that would improve on the best so far.
pub(crate) fn min_cost(
    pool: &PoolView<'_>,
    start: usize,
    cx: &mut PickCx<'_>,
    mut cost: impl FnMut(&Endpoint) -> f64,
) -> Option<usize> {
    let n = pool.endpoints.len();
    let mut best: Option<(usize, f64)> = None;
    for i in 0..n {
        let idx = (start + i) % n;
        let c = cost(&pool.endpoints[idx]);
        if best.is_none_or(|(_, b)| c < b) && cx.accepts(pool, idx) {
            best = Some((idx, c));
        }
    }
    best.map(|(idx, _)| idx)
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::net::SocketAddr;
    use std::num::NonZeroU32;

    use crate::{EndpointSpec, Policy, Selector, SelectorOptions, time::Instant};

    pub fn specs(weights: &[u32]) -> Vec<EndpointSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000));
                EndpointSpec::new(addr).with_weight(NonZeroU32::new(w).unwrap_or(NonZeroU32::MIN))
            })
            .collect()
    }

    pub fn selector(policy: Policy, weights: &[u32]) -> Selector {
        Selector::try_new(policy, SelectorOptions::default(), specs(weights), Instant::ZERO)
            .expect("valid test selector")
    }
}
