//! Maglev hashing: consistent hashing with an O(1) lookup table.
//!
//! Google's Maglev load balancer (Eisenbud et al., NSDI 2016). Each endpoint derives a
//! permutation of the table's M slots from two hashes of its id (an offset and a skip); the
//! endpoints take turns claiming their next free preferred slot until the table is full. A
//! key's hash indexes the table directly. Spread is near perfect (each endpoint gets M/n
//! slots, give or take one) and when an endpoint leaves, close to 1/n of keys move. Weights:
//! in each round an endpoint claims a slot only when its accumulated weight reaches the largest
//! weight (Envoy's weighted Maglev works the same way), so slot counts follow weights.
//! M must be a prime larger than the number of endpoints (65,537 by default; choose
//! M >= 100 n for even spread). Build: O(M log M) expected; lookup: one hash, one multiply,
//! one table read. A vetoed endpoint rehashes the key up to 8 times, then scans.
//!
//! ```
//! use fulcrum_core::{EndpointSpec, HashKey, Instant, Policy, RequestFacts, Selector};
//! use rand::{SeedableRng, rngs::SmallRng};
//! let specs = (1..=3).map(|p| EndpointSpec::new(([127, 0, 0, 1], 9000 + p).into())).collect();
//! let policy = Policy::Maglev { key: HashKey::Header("x-user".into()), table_size: 251 };
//! let pool = Selector::try_new(policy, Default::default(), specs, Instant::ZERO).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let alice = RequestFacts::with_key(b"alice");
//! let first = pool.pick_index(&alice, Instant::ZERO, &mut rng, |_| true);
//! assert_eq!(pool.pick_index(&alice, Instant::ZERO, &mut rng, |_| true), first);
//! ```

use super::{Balance, PickCx, PoolView, scan_from};
use crate::endpoint::Endpoint;
use crate::hash::{hash_bytes, mix, reduce};

const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"
const REHASHES: u64 = 8;

/// A filled Maglev lookup table.
#[derive(Debug)]
pub(crate) struct Maglev {
    table: Box<[u32]>,
    from_client: bool,
}

impl Maglev {
    /// Fills a table of prime size `m`; the caller has checked `0 < endpoints.len() <= m`.
    pub(crate) fn new(endpoints: &[Endpoint], m: u32, from_client: bool) -> Maglev {
        let m64 = u64::from(m);
        let n = endpoints.len();
        let mut table = vec![u32::MAX; m as usize];
        if n == 0 {
            return Maglev { table: Box::new([]), from_client };
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let id = e.id().as_str().as_bytes();
                let offset = hash_bytes(id, OFFSET_SEED) % m64;
                let skip = hash_bytes(id, SKIP_SEED) % (m64 - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        let weights: Vec<u64> = endpoints.iter().map(|e| u64::from(e.weight().get())).collect();
        let max_w = weights.iter().copied().max().unwrap_or(1);
        let mut next = vec![0u64; n];
        let mut credit = vec![0u64; n];
        let mut filled = 0u64;
        'fill: loop {
            for i in 0..n {
                credit[i] += weights[i];
                if credit[i] < max_w {
                    continue;
                }
                credit[i] -= max_w;
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m64) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m64 {
                    break 'fill;
                }
            }
        }
        Maglev { table: table.into_boxed_slice(), from_client }
    }

    #[cfg(test)]
    pub(crate) fn slots(&self) -> &[u32] {
        &self.table
    }
}

impl Balance for Maglev {
    fn pick(&self, pool: &PoolView<'_>, cx: &mut PickCx<'_>) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let mut h = cx.key_hash(self.from_client);
        for attempt in 0..REHASHES {
            let idx = self.table[reduce(h, self.table.len())] as usize;
            if cx.accepts(pool, idx) {
                return Some(idx);
            }
            h = mix(h, attempt + 1);
        }
        let start = self.table[reduce(h, self.table.len())] as usize;
        scan_from(pool, start, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::selector;
    use super::*;
    use crate::{HashKey, Policy};

    #[test]
    fn slots_follow_weights() {
        let pool = selector(Policy::Maglev { key: HashKey::Path, table_size: 65_537 }, &[1, 2, 3, 4]);
        let m = Maglev::new(pool.endpoints(), 65_537, false);
        let mut counts = [0u32; 4];
        m.slots().iter().for_each(|&s| counts[s as usize] += 1);
        assert_eq!(counts.iter().sum::<u32>(), 65_537);
        for (i, &c) in counts.iter().enumerate() {
            let expected = 65_537.0 * (i + 1) as f64 / 10.0;
            assert!((f64::from(c) - expected).abs() <= 2.0, "{counts:?}");
        }
    }

    #[test]
    fn a_table_exactly_as_large_as_the_pool_fills() {
        let pool = selector(Policy::Maglev { key: HashKey::Path, table_size: 7 }, &[1; 7]);
        let m = Maglev::new(pool.endpoints(), 7, false);
        let mut s: Vec<u32> = m.slots().to_vec();
        s.sort_unstable();
        assert_eq!(s, [0, 1, 2, 3, 4, 5, 6]);
    }
}
