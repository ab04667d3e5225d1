//! Consistent hashing on a ring (`consistent_hash`) and with bounded loads (`bounded_load`).
//!
//! **Ring** (Karger et al., STOC 1997; the weighted "ketama" layout of libmemcached):
//! each endpoint owns `vnodes x weight` points on a 64-bit circle, placed by hashing its id
//! with the point number; a key belongs to the first point clockwise of its hash. A point's
//! place depends only on its own endpoint, so when an endpoint leaves, only its keys move
//! (about 1/n of them) and no key moves between endpoints that stay. Lookup: a 65,536-bucket
//! index on the top 16 bits of the hash narrows the search to a handful of points, then a short
//! scan: O(1) expected, ~12 bytes a point. Build: O(P log P) for P points (at most 2^23).
//! A vetoed endpoint passes the key on clockwise (at most 1,024 points, then a scan).
//!
//! **Bounded loads** (Mirrokni, Thorup, Zadimoghaddam, SODA 2018; Vimeo's use in HAProxy):
//! the same ring, but an endpoint whose in-flight load has reached its cap
//! `ceil((1 + epsilon) x (pool in-flight + 1) x weight x learned speed / total weight)` is
//! skipped, and the key moves on clockwise. The learned speed (1 until answers teach otherwise,
//! and averaging 1 over the pool's weights) gives a slow backend a smaller share with no label.
//! No endpoint ever exceeds `1 + epsilon` times its share, however
//! hot a key, while most keys keep their endpoint. With several picks racing on other
//! threads the cap can be passed by at most the number of racing picks. When every
//! acceptable endpoint is at its cap the pick gives `None`.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, HashKey, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs: Vec<_> = (1..=4).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let policy = Policy::ConsistentHash { key: HashKey::Header("x-session".into()), vnodes: 160 };
//! let pool = Selector::try_new(policy, Default::default(), specs.clone(), Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let key = RequestFacts::with_key(b"conversation-42");
//! let owner = pool.pick(&key, Instant::ZERO, &mut rng, |_| true).unwrap().id().clone();
//! // Remove an endpoint that does not own the key: the key stays where it was.
//! let mut fewer = specs;
//! let gone = fewer.iter().position(|s| s.id != owner).unwrap();
//! fewer.remove(gone);
//! let smaller = pool.rebuild(fewer, Instant::ZERO).unwrap();
//! assert_eq!(smaller.pick(&key, Instant::ZERO, &mut rng, |_| true).unwrap().id(), &owner);
//! ```

use super::{Balance, PickCx, PoolView};
use crate::endpoint::Endpoint;
use crate::hash::hash_bytes;

/// Most points a ring may hold.
pub(crate) const MAX_RING_POINTS: u64 = 1 << 23;
const BUCKET_BITS: u32 = 16;
const WALK_LIMIT: usize = 1024;

/// A hash ring: sorted point hashes and their owners.
#[derive(Debug)]
pub(crate) struct Ring {
    hashes: Box<[u64]>,
    owners: Box<[u32]>,
    /// `buckets[b]` is the first point whose hash has top bits >= b.
    buckets: Box<[u32]>,
    from_client: bool,
}

/// Points each endpoint gets: `vnodes x weight`.
pub(crate) fn ring_points(endpoints: &[Endpoint], vnodes: u32) -> u64 {
    endpoints.iter().map(|e| u64::from(vnodes) * u64::from(e.weight().get())).sum()
}

impl Ring {
    /// Builds the ring; the caller has checked [`ring_points`] against [`MAX_RING_POINTS`].
    pub(crate) fn new(endpoints: &[Endpoint], vnodes: u32, from_client: bool) -> Ring {
        let total = ring_points(endpoints, vnodes).min(MAX_RING_POINTS) as usize;
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(total);
        for (idx, e) in endpoints.iter().enumerate() {
            let id = e.id().as_str().as_bytes();
            let count = u64::from(vnodes) * u64::from(e.weight().get());
            points.extend((0..count).map(|r| (hash_bytes(id, r), idx as u32)));
        }
        // Ties (64-bit collisions) are ordered by endpoint id, which does not depend on the
        // other endpoints, so removals never reorder survivors.
        points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| endpoints[a.1 as usize].id().cmp(endpoints[b.1 as usize].id()))
        });
        let mut buckets = vec![0u32; (1usize << BUCKET_BITS) + 1];
        let mut p = 0usize;
        for (b, slot) in buckets.iter_mut().enumerate() {
            while p < points.len() && ((points[p].0 >> (64 - BUCKET_BITS)) as usize) < b {
                p += 1;
            }
            *slot = p as u32;
        }
        Ring {
            hashes: points.iter().map(|p| p.0).collect(),
            owners: points.iter().map(|p| p.1).collect(),
            buckets: buckets.into_boxed_slice(),
            from_client,
        }
    }

    /// The position of the first point at or clockwise of `h`.
    #[inline]
    pub(crate) fn position(&self, h: u64) -> usize {
        let b = (h >> (64 - BUCKET_BITS)) as usize;
        let (mut p, end) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        while p < end && self.hashes[p] < h {
            p += 1;
        }
        if p == self.hashes.len() { 0 } else { p }
    }

    /// Walks clockwise from `h` to the first endpoint that `ok` allows, then scans.
    fn walk(
        &self,
        h: u64,
        pool: &PoolView<'_>,
        cx: &mut PickCx<'_>,
        mut ok: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let len = self.hashes.len();
        if len == 0 {
            return None;
        }
        let start = self.position(h);
        for i in 0..len.min(WALK_LIMIT) {
            let idx = self.owners[(start + i) % len] as usize;
            if ok(idx) && cx.accepts(pool, idx) {
                return Some(idx);
            }
        }
        let n = pool.endpoints.len();
        let first = self.owners[start] as usize;
        (0..n).map(|i| (first + i) % n).find(|&idx| ok(idx) && cx.accepts(pool, idx))
    }
}

/// Plain consistent hashing.
#[derive(Debug)]
pub(crate) struct ConsistentHash {
    ring: Ring,
}

impl ConsistentHash {
    pub(crate) fn new(ring: Ring) -> Self {
        ConsistentHash { ring }
    }
}

impl Balance for ConsistentHash {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let h = cx.key_hash(self.ring.from_client);
        self.ring.walk(h, pool, cx, |_| true)
    }
}

/// Consistent hashing with bounded loads.
#[derive(Debug)]
pub(crate) struct BoundedLoad {
    ring: Ring,
    /// Each endpoint's share of the total static weight, times (1 + epsilon).
    allowance: Box<[f64]>,
}

impl BoundedLoad {
    pub(crate) fn new(ring: Ring, endpoints: &[Endpoint], epsilon: f64) -> Self {
        let total: f64 = endpoints.iter().map(|e| f64::from(e.weight().get())).sum();
        let allowance = endpoints.iter().map(|e| (1.0 + epsilon) * f64::from(e.weight().get()) / total).collect();
        BoundedLoad { ring, allowance }
    }

    /// The most requests endpoint `idx`, of learned speed `speed`, may hold once `pool_load`
    /// requests are in flight.
    pub(crate) fn cap(&self, idx: usize, speed: f64, pool_load: u64) -> u64 {
        (self.allowance[idx] * speed * pool_load as f64).ceil() as u64
    }
}

impl Balance for BoundedLoad {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        let h = cx.key_hash(self.ring.from_client);
        let after = pool.load.in_flight() + 1;
        self.ring.walk(h, pool, cx, |idx| {
            let s = pool.endpoints[idx].signals();
            s.in_flight() < self.cap(idx, s.learned_speed(), after)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use crate::{HashKey, Instant, Policy, RequestFacts};
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn positions_wrap_and_are_ordered() {
        let pool = selector(Policy::ConsistentHash { key: HashKey::Path, vnodes: 3 }, &[1, 2]);
        let mut rng = SmallRng::seed_from_u64(0);
        // Every key maps somewhere, including the extremes of the hash space.
        for key in [&b""[..], b"a", b"zzzz", b"\xff\xff"] {
            assert!(pool.pick_index(&RequestFacts::with_key(key), Instant::ZERO, &mut rng, |_| true).is_some());
        }
    }

    #[test]
    fn hot_key_spills_over_at_the_cap() {
        let policy = Policy::BoundedLoad { key: HashKey::Path, vnodes: 40, epsilon: 0.5 };
        let pool = selector(policy, &[1, 1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(0);
        let hot = RequestFacts::with_key(b"the-same-system-prompt");
        let mut guards = Vec::new();
        for _ in 0..40 {
            let e = pool.pick(&hot, Instant::ZERO, &mut rng, |_| true).unwrap().clone();
            guards.push(pool.begin(&e, 0, Instant::ZERO));
        }
        let loads: Vec<u64> = pool.endpoints().iter().map(|e| e.signals().in_flight()).collect();
        // Cap is ceil(1.5 x 40 / 4) = 15: the owner holds 15, the rest spill clockwise.
        assert_eq!(loads.iter().max(), Some(&15), "{loads:?}");
        assert_eq!(loads.iter().sum::<u64>(), 40);
    }
}
