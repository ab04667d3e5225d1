//! The prefix-cache index: which endpoints probably hold which prompt blocks.
//!
//! Engines such as vLLM and SGLang keep the KV cache of recent prompts and skip the prefill of
//! a new prompt's leading blocks when they still hold them. The proxy cannot see their caches,
//! so, like SGLang's cache-aware router and llm-d's prefix-cache scorer (in its
//! "approximate" mode), it learns from where it sent requests: every pick of the
//! `prefix_affinity` and `score` policies records the request's block hashes
//! ([`RequestFacts::prefix`](crate::RequestFacts::prefix), chained as
//! [`openai`](crate::openai) computes them) against the chosen endpoint.
//!
//! **Memory is capped** like the cache it mirrors: each endpoint has an LRU list of at most
//! `capacity` blocks (the policy's `cache_blocks`, or per endpoint from the engine's
//! `num_gpu_blocks`: [`Selector::set_prefix_capacity`](crate::Selector::set_prefix_capacity)).
//! Recording a request touches its blocks from last to first, so an endpoint's first blocks
//! are its freshest and eviction takes the ends of prompts first, as vLLM's evictor does.
//! A block is known on at most [`MAX_HOLDERS`] endpoints; an endpoint recording it beyond that
//! replaces the holder that recorded it longest ago. One entry (a block on an endpoint) costs
//! about 45 bytes: a 24-byte node plus its share of the hash table.
//!
//! **Lookup** walks the request's blocks from the first while some endpoint still holds every
//! block so far: cost O(matched blocks x [`MAX_HOLDERS`]), independent of the pool's size.
//! Recording costs O(blocks x [`MAX_HOLDERS`]).
//!
//! **Layout.** One slab of nodes; each node (block hash, endpoint slot) is on two intrusive
//! lists: its endpoint's doubly linked LRU list and its block's singly linked holder list,
//! whose head a hash map keyed by block hash gives. Evicting a node unlinks it from both (the
//! holder list is at most [`MAX_HOLDERS`] long) and drops the map entry when no holder is
//! left, so the table never keeps blocks nobody holds.
//!
//! **Sharing and locking.** A pool's index lives in an `Arc` that
//! [`Selector::rebuild`](crate::Selector::rebuild) and `refresh` hand to the next selector,
//! keyed by endpoint id, so endpoints that stay keep what they learned; endpoints that leave
//! are dropped. The index sits behind one `Mutex`: a pick locks it twice, once to look up and
//! once to record, each for a few microseconds at most (hundreds of blocks); a poisoned lock
//! is recovered, never a panic.
//!
//! ```
//! use fulcrum_core::EndpointId;
//! use fulcrum_core::prefix::PrefixIndex;
//! let index = PrefixIndex::new(1_000);
//! let (a, b) = (EndpointId::from("a"), EndpointId::from("b"));
//! index.record(&a, &[1, 2, 3]);
//! index.record(&b, &[1, 9]);
//! let mut m = index.match_lengths(&[1, 2, 3, 4]);
//! m.sort();
//! assert_eq!(m, [(a.clone(), 3), (b, 1)]);
//! index.set_capacity(&a, Some(1));
//! assert_eq!(index.held(&a), Some(1));
//! ```

use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::endpoint::EndpointId;
use crate::hash::Keyed;

/// Default capacity of each endpoint's list, in blocks: 8,192 blocks of 64 tokens hold
/// 512 Ki tokens, about the KV cache of an 80 GB GPU serving an 8B model.
pub const DEFAULT_CACHE_BLOCKS: u32 = 8_192;
/// Most endpoints a block is known on: enough that in a large pool a system prompt most
/// endpoints have cached is known as cached on many (8 was too few: bench/RESULTS.md, "The index
/// knows 32 holders of a block, not 8"), few enough to bound a lookup.
pub const MAX_HOLDERS: usize = 32;

const NIL: u32 = u32::MAX;

/// Which endpoints probably hold which prompt blocks (see the module documentation).
pub struct PrefixIndex {
    inner: Mutex<Inner>,
}

/// An endpoint's place in the index; the generation tells a reused slot from its previous
/// owner, so a selector built before a removal never writes to the wrong endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotKey {
    index: u32,
    generation: u32,
}

/// The endpoints holding a request's leading blocks, and how many.
#[derive(Debug, Default)]
pub(crate) struct Matches {
    len: usize,
    items: [(SlotKey, u32); MAX_HOLDERS],
}

impl SlotKey {
    pub(crate) fn index(self) -> u32 {
        self.index
    }
}

impl Default for SlotKey {
    fn default() -> Self {
        SlotKey { index: NIL, generation: 0 }
    }
}

impl Matches {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SlotKey, u32)> + '_ {
        self.items[..self.len].iter().copied()
    }

    fn push(&mut self, key: SlotKey, blocks: u32) {
        if self.len < MAX_HOLDERS {
            self.items[self.len] = (key, blocks);
            self.len += 1;
        }
    }
}

struct Node {
    hash: u64,
    slot: u32,
    /// LRU neighbours (towards the most and the least recently used).
    prev: u32,
    next: u32,
    /// The next holder of the same block.
    holder_next: u32,
}

struct Slot {
    id: EndpointId,
    generation: u32,
    /// Most recently used node.
    head: u32,
    /// Least recently used node.
    tail: u32,
    len: u32,
    /// A capacity set for this endpoint, overriding the default.
    capacity: Option<u32>,
}

struct Inner {
    nodes: Vec<Node>,
    /// Free nodes, linked through `next`.
    free: u32,
    blocks: HashMap<u64, u32, Keyed>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    by_id: HashMap<EndpointId, u32>,
    default_capacity: u32,
}

// === impl PrefixIndex ===

impl PrefixIndex {
    /// An empty index whose endpoints hold at most `default_capacity` blocks each.
    pub fn new(default_capacity: u32) -> Self {
        // The one process-random value in the core, allowed on purpose: it keys the table's
        // hashing against crafted prompts and decides nothing (lookups give the same answers
        // under any key).
        #[expect(clippy::disallowed_methods, reason = "a hash-flooding key; no decision depends on it")]
        let key = RandomState::new().hash_one(0x5052_4546_4958u64);
        PrefixIndex {
            inner: Mutex::new(Inner {
                nodes: Vec::new(),
                free: NIL,
                blocks: HashMap::with_hasher(Keyed(key)),
                slots: Vec::new(),
                free_slots: Vec::new(),
                by_id: HashMap::new(),
                default_capacity,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The capacity of endpoints without one of their own.
    pub fn default_capacity(&self) -> u32 {
        self.lock().default_capacity
    }

    /// Changes the default capacity, evicting from endpoints without their own capacity.
    pub fn set_default_capacity(&self, capacity: u32) {
        let mut inner = self.lock();
        inner.default_capacity = capacity;
        for s in 0..inner.slots.len() as u32 {
            inner.trim(s);
        }
    }

    /// Sets an endpoint's capacity in blocks (`None`: back to the default), evicting its
    /// least recently used blocks beyond it. Returns false for an endpoint the index does not
    /// know (not in a pool whose policy matches prefixes).
    pub fn set_capacity(&self, id: &EndpointId, capacity: Option<u32>) -> bool {
        let mut inner = self.lock();
        let Some(&s) = inner.by_id.get(id) else { return false };
        if let Some(slot) = inner.slot_mut(s) {
            slot.capacity = capacity;
        }
        inner.trim(s);
        true
    }

    /// An endpoint's capacity in blocks.
    pub fn capacity(&self, id: &EndpointId) -> Option<u32> {
        let inner = self.lock();
        let slot = inner.slot(*inner.by_id.get(id)?)?;
        Some(slot.capacity.unwrap_or(inner.default_capacity))
    }

    /// How many blocks an endpoint is recorded as holding.
    pub fn held(&self, id: &EndpointId) -> Option<usize> {
        let inner = self.lock();
        Some(inner.slot(*inner.by_id.get(id)?)?.len as usize)
    }

    /// Entries (a block on an endpoint) in the whole index.
    pub fn len(&self) -> usize {
        self.lock().slots.iter().flatten().map(|s| s.len as usize).sum()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that `id` now holds `blocks` (a request's chained block hashes), adding the
    /// endpoint if it is new.
    pub fn record(&self, id: &EndpointId, blocks: &[u64]) {
        let mut inner = self.lock();
        let s = inner.register(id);
        inner.record(s, blocks);
    }

    /// Every endpoint holding `blocks[0]`, with how many leading blocks of `blocks` it holds.
    pub fn match_lengths(&self, blocks: &[u64]) -> Vec<(EndpointId, usize)> {
        let mut m = Matches::default();
        let inner = self.lock();
        inner.lookup(blocks, &mut m);
        m.iter().filter_map(|(k, n)| Some((inner.slot(k.index)?.id.clone(), n as usize))).collect()
    }

    /// Forgets an endpoint.
    pub fn remove(&self, id: &EndpointId) {
        let mut inner = self.lock();
        if let Some(s) = inner.by_id.remove(id) {
            inner.drop_slot(s);
        }
    }

    /// Registers `ids` (keeping what endpoints already known hold) and forgets every other
    /// endpoint; returns each id's slot.
    pub(crate) fn sync<'i>(&self, ids: impl Iterator<Item = &'i EndpointId>) -> Vec<SlotKey> {
        let mut inner = self.lock();
        let keys: Vec<SlotKey> = ids
            .map(|id| {
                let s = inner.register(id);
                SlotKey { index: s, generation: inner.slot(s).map_or(0, |x| x.generation) }
            })
            .collect();
        let keep: std::collections::HashSet<u32> = keys.iter().map(|k| k.index).collect();
        let gone: Vec<EndpointId> =
            inner.by_id.iter().filter(|(_, s)| !keep.contains(s)).map(|(id, _)| id.clone()).collect();
        for id in gone {
            if let Some(s) = inner.by_id.remove(&id) {
                inner.drop_slot(s);
            }
        }
        keys
    }

    pub(crate) fn lookup(&self, blocks: &[u64], out: &mut Matches) {
        self.lock().lookup(blocks, out);
    }

    /// The share of its capacity each slot of `keys` holds (0 for a slot gone), under one
    /// lock.
    pub(crate) fn occupancy(&self, keys: &[SlotKey]) -> Vec<f64> {
        let mut out = vec![0.0; keys.len()];
        self.occupancy_into(keys.iter().map(|&k| Some(k)), &mut out);
        out
    }

    /// [`occupancy`](Self::occupancy) written into `out`, one value a key (0 for `None` and
    /// for a slot gone), under one lock and without allocating.
    pub(crate) fn occupancy_into(&self, keys: impl Iterator<Item = Option<SlotKey>>, out: &mut [f64]) {
        let inner = self.lock();
        for (o, key) in out.iter_mut().zip(keys) {
            *o = match key.and_then(|k| inner.slot(k.index).filter(|s| s.generation == k.generation)) {
                Some(s) => f64::from(s.len) / f64::from(s.capacity.unwrap_or(inner.default_capacity).max(1)),
                None => 0.0,
            };
        }
    }

    pub(crate) fn record_slot(&self, key: SlotKey, blocks: &[u64]) {
        let mut inner = self.lock();
        if inner.slot(key.index).is_some_and(|s| s.generation == key.generation) {
            inner.record(key.index, blocks);
        }
    }
}

impl fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("PrefixIndex")
            .field("endpoints", &inner.by_id.len())
            .field("blocks", &inner.blocks.len())
            .field("default_capacity", &inner.default_capacity)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn slot(&self, s: u32) -> Option<&Slot> {
        self.slots.get(s as usize)?.as_ref()
    }

    fn slot_mut(&mut self, s: u32) -> Option<&mut Slot> {
        self.slots.get_mut(s as usize)?.as_mut()
    }

    fn register(&mut self, id: &EndpointId) -> u32 {
        if let Some(&s) = self.by_id.get(id) {
            return s;
        }
        let fresh = |generation| Slot { id: id.clone(), generation, head: NIL, tail: NIL, len: 0, capacity: None };
        let s = match self.free_slots.pop() {
            Some(s) => {
                let generation = self.slots[s as usize].as_ref().map_or(0, |x| x.generation);
                self.slots[s as usize] = Some(fresh(generation));
                s
            }
            None => {
                self.slots.push(Some(fresh(0)));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(id.clone(), s);
        s
    }

    /// Empties a slot and frees it for reuse under a new generation, so that keys handed out
    /// for it no longer write.
    fn drop_slot(&mut self, s: u32) {
        while self.slot(s).is_some_and(|x| x.tail != NIL) {
            self.evict_tail(s);
        }
        if let Some(slot) = self.slot_mut(s) {
            slot.id = EndpointId::from("");
            slot.generation = slot.generation.wrapping_add(1);
            self.free_slots.push(s);
        }
    }

    fn capacity_of(&self, slot: &Slot) -> u32 {
        slot.capacity.unwrap_or(self.default_capacity)
    }

    /// Evicts least recently used blocks of slot `s` beyond its capacity.
    fn trim(&mut self, s: u32) {
        while let Some(slot) = self.slot(s) {
            if slot.len <= self.capacity_of(slot) || slot.tail == NIL {
                break;
            }
            self.evict_tail(s);
        }
    }

    fn lookup(&self, blocks: &[u64], out: &mut Matches) {
        let Some((first, rest)) = blocks.split_first() else { return };
        let mut alive = [0u32; MAX_HOLDERS];
        let mut n = 0;
        for s in self.holders(*first) {
            if n < MAX_HOLDERS {
                alive[n] = s;
                n += 1;
            }
        }
        let key = |s: u32| SlotKey { index: s, generation: self.slot(s).map_or(0, |x| x.generation) };
        for (i, h) in rest.iter().enumerate() {
            if n == 0 {
                return;
            }
            let mut held = [NIL; MAX_HOLDERS];
            for (k, s) in self.holders(*h).take(MAX_HOLDERS).enumerate() {
                held[k] = s;
            }
            let mut kept = 0;
            for j in 0..n {
                if held.contains(&alive[j]) {
                    alive[kept] = alive[j];
                    kept += 1;
                } else {
                    out.push(key(alive[j]), i as u32 + 1);
                }
            }
            n = kept;
        }
        for &s in &alive[..n] {
            out.push(key(s), blocks.len() as u32);
        }
    }

    /// The slots holding block `hash`.
    fn holders(&self, hash: u64) -> impl Iterator<Item = u32> + '_ {
        let mut node = self.blocks.get(&hash).copied().unwrap_or(NIL);
        std::iter::from_fn(move || {
            let n = self.nodes.get(node as usize)?;
            node = n.holder_next;
            Some(n.slot)
        })
    }

    fn record(&mut self, s: u32, blocks: &[u64]) {
        let Some(slot) = self.slot(s) else { return };
        if self.capacity_of(slot) == 0 {
            return;
        }
        // Last block first: the first blocks end up most recently used.
        for &h in blocks.iter().rev() {
            self.touch(s, h);
        }
    }

    /// Marks block `hash` as held by slot `s`, most recently used.
    fn touch(&mut self, s: u32, hash: u64) {
        let head = self.blocks.get(&hash).copied().unwrap_or(NIL);
        let (mut node, mut count, mut last) = (head, 0usize, NIL);
        while node != NIL {
            let n = &self.nodes[node as usize];
            if n.slot == s {
                self.unlink_lru(node);
                self.push_front(s, node);
                return;
            }
            count += 1;
            last = node;
            node = n.holder_next;
        }
        if count >= MAX_HOLDERS && last != NIL {
            // The holder that recorded the block longest ago gives it up.
            let owner = self.nodes[last as usize].slot;
            self.unlink_lru(last);
            if let Some(o) = self.slot_mut(owner) {
                o.len -= 1;
            }
            self.unlink_holder(last);
            self.free_node(last);
        }
        let new = self.alloc(Node { hash, slot: s, prev: NIL, next: NIL, holder_next: NIL });
        match self.blocks.entry(hash) {
            Entry::Occupied(mut e) => {
                self.nodes[new as usize].holder_next = *e.get();
                e.insert(new);
            }
            Entry::Vacant(e) => {
                e.insert(new);
            }
        }
        self.push_front(s, new);
        if let Some(slot) = self.slot_mut(s) {
            slot.len += 1;
        }
        self.trim(s);
    }

    fn alloc(&mut self, node: Node) -> u32 {
        if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    fn free_node(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        n.slot = NIL;
        n.holder_next = NIL;
        n.prev = NIL;
        n.next = self.free;
        self.free = i;
    }

    fn push_front(&mut self, s: u32, i: u32) {
        let Some(slot) = self.slots.get_mut(s as usize).and_then(Option::as_mut) else { return };
        let old = slot.head;
        slot.head = i;
        if slot.tail == NIL {
            slot.tail = i;
        }
        let n = &mut self.nodes[i as usize];
        n.prev = NIL;
        n.next = old;
        if old != NIL {
            self.nodes[old as usize].prev = i;
        }
    }

    /// Takes node `i` out of its slot's LRU list (its `len` is left to the caller).
    fn unlink_lru(&mut self, i: u32) {
        let Node { prev, next, slot, .. } = self.nodes[i as usize];
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        if let Some(slot) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            if slot.head == i {
                slot.head = next;
            }
            if slot.tail == i {
                slot.tail = prev;
            }
        }
    }

    /// Takes node `i` out of its block's holder list, dropping the block when none is left.
    fn unlink_holder(&mut self, i: u32) {
        let (hash, after) = (self.nodes[i as usize].hash, self.nodes[i as usize].holder_next);
        let Some(head) = self.blocks.get_mut(&hash) else { return };
        if *head == i {
            if after == NIL {
                self.blocks.remove(&hash);
            } else {
                *head = after;
            }
            return;
        }
        let mut node = *head;
        while node != NIL {
            let next = self.nodes[node as usize].holder_next;
            if next == i {
                self.nodes[node as usize].holder_next = after;
                return;
            }
            node = next;
        }
    }

    fn evict_tail(&mut self, s: u32) {
        let Some(tail) = self.slot(s).map(|x| x.tail).filter(|&t| t != NIL) else { return };
        self.unlink_lru(tail);
        if let Some(slot) = self.slot_mut(s) {
            slot.len -= 1;
        }
        self.unlink_holder(tail);
        self.free_node(tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EndpointId {
        EndpointId::from(s)
    }

    fn sorted(mut m: Vec<(EndpointId, usize)>) -> Vec<(EndpointId, usize)> {
        m.sort();
        m
    }

    #[test]
    fn match_lengths_count_leading_blocks() {
        let index = PrefixIndex::new(100);
        index.record(&id("a"), &[1, 2, 3, 4]);
        index.record(&id("b"), &[1, 2, 7]);
        index.record(&id("c"), &[9]);
        assert_eq!(sorted(index.match_lengths(&[1, 2, 3, 4, 5])), [(id("a"), 4), (id("b"), 2)]);
        assert_eq!(sorted(index.match_lengths(&[1, 2, 7])), [(id("a"), 2), (id("b"), 3)]);
        assert_eq!(index.match_lengths(&[5, 1]), []);
        assert_eq!(index.match_lengths(&[]), []);
        assert_eq!(index.held(&id("a")), Some(4));
        assert_eq!(index.len(), 8);
    }

    #[test]
    fn eviction_is_lru_and_takes_prompt_ends_first() {
        let index = PrefixIndex::new(4);
        let a = id("a");
        index.record(&a, &[1, 2, 3]);
        index.record(&a, &[10, 11]);
        // Five blocks for four places: the least recent, the end of the first prompt (3), goes.
        assert_eq!(index.held(&a), Some(4));
        assert_eq!(index.match_lengths(&[1, 2, 3]), [(a.clone(), 2)]);
        // Touching 1 and 2 again makes 11 then 10 the oldest.
        index.record(&a, &[1, 2]);
        index.record(&a, &[20, 21]);
        assert_eq!(index.match_lengths(&[1, 2]), [(a.clone(), 2)]);
        assert_eq!(index.match_lengths(&[10]), []);
        assert_eq!(index.match_lengths(&[20, 21]), [(a.clone(), 2)]);
        assert_eq!(index.held(&a), Some(4));
    }

    #[test]
    fn capacities_are_settable_per_endpoint() {
        let index = PrefixIndex::new(10);
        let (a, b) = (id("a"), id("b"));
        let blocks: Vec<u64> = (0..10).collect();
        index.record(&a, &blocks);
        index.record(&b, &blocks);
        assert!(index.set_capacity(&a, Some(3)));
        assert_eq!((index.held(&a), index.capacity(&a)), (Some(3), Some(3)));
        assert_eq!(sorted(index.match_lengths(&blocks)), [(a.clone(), 3), (b.clone(), 10)]);
        index.set_default_capacity(5);
        assert_eq!((index.held(&a), index.held(&b)), (Some(3), Some(5)));
        assert!(index.set_capacity(&a, None));
        assert_eq!(index.capacity(&a), Some(5));
        assert!(!index.set_capacity(&id("nobody"), Some(1)));
        index.set_capacity(&b, Some(0));
        assert_eq!(index.held(&b), Some(0));
        index.record(&b, &blocks);
        assert_eq!(index.held(&b), Some(0));
        assert_eq!(index.match_lengths(&blocks), [(a, 3)]);
    }

    #[test]
    fn a_block_has_a_bounded_number_of_holders() {
        let index = PrefixIndex::new(100);
        let ids: Vec<EndpointId> = (0..MAX_HOLDERS + 3).map(|i| id(&format!("e{i}"))).collect();
        for e in &ids {
            index.record(e, &[42]);
        }
        let holders = index.match_lengths(&[42]);
        assert_eq!(holders.len(), MAX_HOLDERS);
        // The first recorders gave the block up.
        assert!(holders.iter().all(|(e, _)| !ids[..3].contains(e)));
        assert_eq!(index.held(&ids[0]), Some(0));
        assert_eq!(index.len(), MAX_HOLDERS);
    }

    #[test]
    fn sync_keeps_survivors_and_slots_are_not_confused_after_reuse() {
        let index = PrefixIndex::new(100);
        let (a, b, c, d) = (id("a"), id("b"), id("c"), id("d"));
        let keys = index.sync([&a, &b].into_iter());
        index.record_slot(keys[0], &[1, 2]);
        index.record_slot(keys[1], &[1, 3]);
        let kept = index.sync([&a, &c].into_iter());
        assert_eq!(kept[0], keys[0]);
        assert_eq!(index.held(&b), None);
        assert_eq!(index.match_lengths(&[1, 2]), [(a.clone(), 2)]);
        // b's slot is free: a selector still holding b's key writes nothing...
        index.record_slot(keys[1], &[5]);
        assert_eq!(index.match_lengths(&[5]), []);
        // ...nor once d has reused the slot.
        let again = index.sync([&a, &c, &d].into_iter());
        assert_eq!(again[2].index, keys[1].index);
        index.record_slot(keys[1], &[5]);
        assert_eq!(index.held(&d), Some(0));
        index.record_slot(again[2], &[5]);
        assert_eq!(index.match_lengths(&[5]), [(d, 1)]);
        index.remove(&a);
        assert_eq!(index.match_lengths(&[1]), []);
    }
}
