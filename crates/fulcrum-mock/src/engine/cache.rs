//! The KV-cache block pool with a prefix cache: fixed capacity, chained block hashes, LRU.
//!
//! The pool holds `capacity` blocks of `block_size` tokens. A block is in one of three states:
//!
//! - **referenced**: held by one or more running sequences (`refs > 0`); it counts as used KV;
//! - **cached**: unreferenced but still holding a full prompt block whose chained hash is known,
//!   so a later prompt with the same prefix can take it back without recomputing it; cached
//!   blocks sit in an LRU list and are evicted, least recently released first, when a fresh
//!   block is needed and none is free;
//! - **free**: unreferenced and holding nothing worth keeping.
//!
//! The hash of block *i* covers its own tokens and the hash of block *i - 1* (vLLM's chained
//! block hashes), so equal hashes mean equal prefixes: a lookup walks the prompt's hashes in
//! order and stops at the first miss. Everything is O(1) per block (a hash table plus an
//! intrusive doubly linked LRU list over a vector); blocks are materialised lazily, so memory
//! follows the blocks actually used, not the configured capacity.
//!
//! Memory: 24 bytes a block, and about 5 bytes a cached prefix block in the hash table, which
//! holds only block indices (the hash is kept in the block). A simulator runs dozens of full
//! pools, so the table's size decides how often a look-up misses the CPU cache; with the
//! hash and the index in each slot it was three times larger.

use hashbrown::HashTable;

use fulcrum_core::hash::mix;

/// Index of a block in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId(u32);

const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Block {
    /// The prefix it holds, when `hashed` (two fields rather than an `Option<u64>`, which
    /// would make a block 32 bytes instead of 24).
    hash: u64,
    hashed: bool,
    refs: u32,
    prev: u32,
    next: u32,
}

impl Block {
    const FRESH: Block = Block { hash: 0, hashed: false, refs: 0, prev: NIL, next: NIL };

    fn hash(&self) -> Option<u64> {
        self.hashed.then_some(self.hash)
    }
}

/// The hash table's hash of a block hash (one mix, as [`fulcrum_core::hash::Keyed`] does).
fn key(hash: u64) -> u64 {
    mix(hash, 0)
}

/// The block pool and its prefix cache.
#[derive(Clone, Debug)]
pub struct PrefixCache {
    capacity: u32,
    blocks: Vec<Block>,
    /// The indices of the blocks that hold a prefix, found by their hash.
    by_hash: HashTable<u32>,
    free: Vec<u32>,
    lru_head: u32,
    lru_tail: u32,
    lru_len: u32,
    referenced: u32,
}

// === impl PrefixCache ===

impl PrefixCache {
    /// An empty pool of `capacity` blocks.
    pub fn new(capacity: u32) -> Self {
        PrefixCache {
            capacity,
            blocks: Vec::new(),
            by_hash: HashTable::new(),
            free: Vec::new(),
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            referenced: 0,
        }
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Blocks held by running sequences.
    pub fn referenced(&self) -> u32 {
        self.referenced
    }

    /// Unreferenced blocks that still hold a reusable prefix.
    pub fn cached(&self) -> u32 {
        self.lru_len
    }

    /// Blocks that can be handed out now: free, never used, or evictable.
    pub fn available(&self) -> u32 {
        self.capacity - self.referenced
    }

    /// The block that holds `hash`, if one does.
    fn find(&self, hash: u64) -> Option<u32> {
        self.by_hash.find(key(hash), |&i| self.blocks[i as usize].hash() == Some(hash)).copied()
    }

    /// How many leading `hashes` are cached, and how many of those are not referenced now
    /// (taking them back uses up available blocks).
    pub fn lookup(&self, hashes: &[u64]) -> (u32, u32) {
        let mut hits = 0;
        let mut unreferenced = 0;
        for &hash in hashes {
            let Some(index) = self.find(hash) else { break };
            hits += 1;
            if self.blocks[index as usize].refs == 0 {
                unreferenced += 1;
            }
        }
        (hits, unreferenced)
    }

    /// Reads the parts of the hash table where `hashes` would be, so that registering them
    /// next finds those parts in the CPU cache: independent of each other, the reads overlap
    /// instead of each waiting for the one before, as the registrations do. Changes nothing.
    pub fn prepare(&self, hashes: &[u64]) {
        for &hash in hashes {
            std::hint::black_box(self.find(hash));
        }
    }

    /// Takes a reference on the cached block with `hash`, if there is one.
    pub fn acquire(&mut self, hash: u64) -> Option<BlockId> {
        let index = self.find(hash)?;
        if self.blocks[index as usize].refs == 0 {
            self.unlink(index);
            self.referenced += 1;
        }
        self.blocks[index as usize].refs += 1;
        Some(BlockId(index))
    }

    /// Hands out a block with one reference: a free one, a new one, or the least recently
    /// released cached one (its prefix is forgotten). `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let index = if let Some(index) = self.free.pop() {
            index
        } else if (self.blocks.len() as u32) < self.capacity {
            self.blocks.push(Block::FRESH);
            self.blocks.len() as u32 - 1
        } else if self.lru_head != NIL {
            let index = self.lru_head;
            self.unlink(index);
            if let Some(hash) = self.blocks[index as usize].hash()
                && let Ok(slot) = self.by_hash.find_entry(key(hash), |&i| i == index)
            {
                slot.remove();
            }
            index
        } else {
            return None;
        };
        let block = &mut self.blocks[index as usize];
        block.hashed = false;
        block.refs = 1;
        self.referenced += 1;
        Some(BlockId(index))
    }

    /// Records that `block` now holds the prefix `hash`, unless another block already does
    /// (then `block` stays private and is freed, not cached, when released). Returns whether
    /// the hash was recorded.
    pub fn register(&mut self, block: BlockId, hash: u64) -> bool {
        if self.find(hash).is_some() {
            return false;
        }
        let Some(entry) = self.blocks.get_mut(block.0 as usize) else { return false };
        if entry.hashed {
            return false;
        }
        entry.hash = hash;
        entry.hashed = true;
        let blocks = &self.blocks;
        // Every block in the table holds a hash (it is taken out when the block is reused).
        self.by_hash.insert_unique(key(hash), block.0, |&i| key(blocks[i as usize].hash));
        true
    }

    /// Drops one reference. A block nobody holds becomes cached (most recently used end of
    /// the LRU) if it holds a prefix, free otherwise.
    pub fn release(&mut self, block: BlockId) {
        let index = block.0;
        let Some(entry) = self.blocks.get_mut(index as usize) else { return };
        if entry.refs == 0 {
            debug_assert!(false, "release of an unreferenced block");
            return;
        }
        entry.refs -= 1;
        if entry.refs > 0 {
            return;
        }
        self.referenced -= 1;
        if entry.hashed {
            self.push_tail(index);
        } else {
            self.free.push(index);
        }
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next) = {
            let block = &self.blocks[index as usize];
            (block.prev, block.next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let block = &mut self.blocks[index as usize];
        block.prev = NIL;
        block.next = NIL;
        self.lru_len -= 1;
    }

    fn push_tail(&mut self, index: u32) {
        let tail = self.lru_tail;
        {
            let block = &mut self.blocks[index as usize];
            block.prev = tail;
            block.next = NIL;
        }
        if tail == NIL {
            self.lru_head = index;
        } else {
            self.blocks[tail as usize].next = index;
        }
        self.lru_tail = index;
        self.lru_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(cache: &mut PrefixCache, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map(|&h| {
                let b = cache.allocate().expect("room");
                assert!(cache.register(b, h));
                b
            })
            .collect()
    }

    #[test]
    fn released_prefix_is_found_again() {
        let mut cache = PrefixCache::new(8);
        let blocks = fill(&mut cache, &[1, 2, 3]);
        assert_eq!(cache.referenced(), 3);
        for b in blocks.iter().rev() {
            cache.release(*b);
        }
        assert_eq!((cache.referenced(), cache.cached()), (0, 3));
        assert_eq!(cache.lookup(&[1, 2, 9, 3]), (2, 2), "stops at the first miss");
        assert_eq!(cache.acquire(1), Some(blocks[0]));
        assert_eq!(cache.lookup(&[1, 2]), (2, 1));
        assert_eq!((cache.referenced(), cache.cached()), (1, 2));
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block() {
        let mut cache = PrefixCache::new(3);
        let a = fill(&mut cache, &[10, 11]);
        let b = fill(&mut cache, &[20]);
        // Released in reverse order, as the engine does: the tail of a prefix goes first.
        cache.release(a[1]);
        cache.release(a[0]);
        cache.release(b[0]);
        let fresh = cache.allocate().expect("evicts");
        assert_eq!(fresh, a[1]);
        assert_eq!(cache.lookup(&[10, 11]), (1, 1));
        assert_eq!(cache.lookup(&[20]), (1, 1));
        cache.allocate().expect("evicts 10");
        cache.allocate().expect("evicts 20");
        assert_eq!(cache.allocate(), None, "every block referenced");
        assert_eq!(cache.available(), 0);
    }

    #[test]
    fn duplicate_hash_stays_private_and_is_freed() {
        let mut cache = PrefixCache::new(4);
        let first = fill(&mut cache, &[7]);
        let second = cache.allocate().expect("room");
        assert!(!cache.register(second, 7));
        cache.release(second);
        assert_eq!(cache.cached(), 0, "a private block is freed, not cached");
        cache.release(first[0]);
        assert_eq!(cache.cached(), 1);
    }

    #[test]
    fn shared_block_needs_every_reference_released() {
        let mut cache = PrefixCache::new(2);
        let blocks = fill(&mut cache, &[5]);
        let again = cache.acquire(5).expect("cached");
        assert_eq!(again, blocks[0]);
        assert_eq!(cache.referenced(), 1);
        cache.release(again);
        assert_eq!(cache.cached(), 0);
        cache.release(blocks[0]);
        assert_eq!(cache.cached(), 1);
    }
}
