//! What the AI-aware policies share: capacities, token loads, adapter keys, and the view of
//! the pool's prefix index.

use std::sync::Arc;

use super::{PickCx, PoolView};
use crate::endpoint::{Endpoint, adapter_key};
use crate::facts::RequestFacts;
use crate::policy::Capacity;
use crate::prefix::{Matches, PrefixIndex, SlotKey};

/// No endpoint's capacity is taken as less than this (a zero capacity would divide by zero).
const MIN_CAPACITY: f64 = 1e-9;
const NO_ENDPOINT: usize = usize::MAX;

/// Each endpoint's capacity before the slow-start ramp.
#[derive(Debug)]
pub(crate) struct Capacities {
    base: Box<[f64]>,
}

impl Capacities {
    pub(crate) fn new(capacity: &Capacity, endpoints: &[Endpoint]) -> Self {
        Capacities { base: endpoints.iter().map(|e| capacity.base(e.labels(), e.weight())).collect() }
    }

    /// The live capacity: base x slow-start ramp.
    ///
    /// Not the dynamic-weight factor: it comes from the engine's KV-cache use, which the
    /// in-flight tokens these policies compare already count, and which a prefix-caching
    /// engine keeps high while it serves its cached prefixes. Scaling capacity by it as well
    /// drove a busy prefix holder below the bound and its conversations to cold endpoints.
    #[inline]
    pub(crate) fn of(&self, idx: usize, e: &Endpoint) -> f64 {
        (self.base.get(idx).copied().unwrap_or(1.0) * e.signals().ramp_factor()).max(MIN_CAPACITY)
    }

    /// In-flight tokens per unit of capacity once `tokens` more are added.
    #[inline]
    pub(crate) fn load_after(&self, idx: usize, e: &Endpoint, tokens: u64) -> f64 {
        load(e.signals().in_flight_tokens(), tokens, self.of(idx, e))
    }
}

/// In-flight tokens per unit of `capacity` once `tokens` more are added to `in_flight`.
#[inline]
pub(crate) fn load(in_flight: u64, tokens: u64, capacity: f64) -> f64 {
    in_flight.saturating_add(tokens) as f64 / capacity
}

/// A request's token estimate, at least 1 so that capacity always matters.
#[inline]
pub(crate) fn request_tokens(facts: &RequestFacts<'_>) -> u64 {
    facts.estimated_tokens.max(1)
}

/// The adapter key of the request's model, when some endpoint of the pool has that adapter
/// loaded.
pub(crate) fn wanted_adapter(pool: &PoolView<'_>, facts: &RequestFacts<'_>) -> Option<u64> {
    let key = adapter_key(facts.model?);
    pool.endpoints.iter().any(|e| e.signals().has_adapter_key(key)).then_some(key)
}

/// The acceptable endpoint with the smallest `key` (a tuple such as (tier, cost), compared
/// in order), scanning from `start` so that ties rotate; `accept` is asked only of endpoints
/// that would improve.
pub(crate) fn least<K: PartialOrd + Copy>(
    pool: &PoolView<'_>,
    start: usize,
    cx: &mut PickCx<'_>,
    mut key: impl FnMut(usize) -> K,
) -> Option<usize> {
    let n = pool.endpoints.len();
    let mut best: Option<(usize, K)> = None;
    for i in 0..n {
        let idx = (start + i) % n;
        let k = key(idx);
        let better = best.is_none_or(|(_, b)| k < b);
        if better && cx.accepts(pool, idx) {
            best = Some((idx, k));
        }
    }
    best.map(|(idx, _)| idx)
}

/// A selector's view of its pool's prefix index: which slot is which endpoint.
#[derive(Debug)]
pub(crate) struct IndexView {
    index: Arc<PrefixIndex>,
    keys: Box<[SlotKey]>,
    /// Endpoint index by slot index.
    by_slot: Box<[usize]>,
}

impl IndexView {
    pub(crate) fn new(index: Arc<PrefixIndex>, keys: Vec<SlotKey>) -> Self {
        let len = keys.iter().map(|k| k.index() as usize + 1).max().unwrap_or(0);
        let mut by_slot = vec![NO_ENDPOINT; len];
        for (idx, k) in keys.iter().enumerate() {
            by_slot[k.index() as usize] = idx;
        }
        IndexView { index, keys: keys.into(), by_slot: by_slot.into() }
    }

    /// Calls `f(endpoint index, leading blocks held)` for the endpoints holding the first
    /// blocks of `prefix`.
    pub(crate) fn matches(&self, prefix: &[u64], mut f: impl FnMut(usize, u32)) {
        if prefix.is_empty() {
            return;
        }
        let mut m = Matches::default();
        self.index.lookup(prefix, &mut m);
        for (key, blocks) in m.iter() {
            let idx = self.by_slot.get(key.index() as usize).copied().unwrap_or(NO_ENDPOINT);
            if idx != NO_ENDPOINT && self.keys[idx] == key {
                f(idx, blocks);
            }
        }
    }

    /// Each endpoint's share of its index capacity in use, by endpoint index.
    pub(crate) fn occupancy(&self) -> Vec<f64> {
        self.index.occupancy(&self.keys)
    }

    /// The share of its index capacity each of the endpoints `idxs` holds, written into `out`
    /// in that order (one lock, no allocation).
    pub(crate) fn occupancy_of(&self, idxs: impl Iterator<Item = usize>, out: &mut [f64]) {
        self.index.occupancy_into(idxs.map(|i| self.keys.get(i).copied()), out);
    }

    /// Records that endpoint `idx` now holds `prefix`.
    pub(crate) fn record(&self, idx: usize, prefix: &[u64]) {
        if let (Some(&key), false) = (self.keys.get(idx), prefix.is_empty()) {
            self.index.record_slot(key, prefix);
        }
    }
}
