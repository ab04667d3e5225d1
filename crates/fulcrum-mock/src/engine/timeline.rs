//! The engine's timeline: what is due when, earliest first, ties by sequence id.
//!
//! A priority queue kept as a sorted double-ended queue rather than a binary heap, because of
//! how the engine fills it. Every running sequence has one entry; a decoding sequence that
//! steps is put back one inter-token latency later, and that latency is the same for every
//! sequence at a given moment (it depends on the batch size only). So a sequence that steps
//! nearly always goes behind every other one: the entries rotate, and a push is an append.
//! Only an entry scheduled with a shorter latency than those before it (a sequence left the
//! batch, a prefill ends early) goes into the middle, found by binary search and moved into
//! place from the nearer end.
//!
//! Cost: O(1) to pop and, in the common case, to push; O(log n + distance to the back)
//! otherwise; O(n) to take out a cancelled sequence's entry. The order is exactly a binary heap's on `(Instant, SeqId)`: keys are unique
//! (a sequence has one entry at a time).

use std::collections::VecDeque;

use fulcrum_core::Instant;

use super::SeqId;

/// Timed entries, earliest first.
#[derive(Clone, Debug, Default)]
pub(super) struct Timeline {
    entries: VecDeque<(Instant, SeqId)>,
}

impl Timeline {
    /// Schedules `id` at `at`.
    pub(super) fn push(&mut self, at: Instant, id: SeqId) {
        let entry = (at, id);
        match self.entries.back() {
            Some(last) if *last > entry => {
                let at = self.entries.partition_point(|e| *e < entry);
                self.entries.insert(at, entry);
            }
            _ => self.entries.push_back(entry),
        }
    }

    /// The earliest entry.
    pub(super) fn peek(&self) -> Option<(Instant, SeqId)> {
        self.entries.front().copied()
    }

    /// Takes out the entry of `id` (a cancelled sequence), if there is one.
    pub(super) fn remove(&mut self, id: SeqId) {
        if let Some(i) = self.entries.iter().position(|e| e.1 == id) {
            self.entries.remove(i);
        }
    }

    /// Takes the earliest entry.
    pub(super) fn pop(&mut self) -> Option<(Instant, SeqId)> {
        self.entries.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    #[test]
    fn a_removed_entry_is_gone() {
        let mut timeline = Timeline::default();
        for id in 0..3 {
            timeline.push(Instant::ZERO + Duration::from_millis(id), SeqId(id));
        }
        timeline.remove(SeqId(0));
        timeline.remove(SeqId(7));
        assert_eq!(timeline.pop().map(|e| e.1), Some(SeqId(1)));
        assert_eq!(timeline.pop().map(|e| e.1), Some(SeqId(2)));
        assert_eq!(timeline.pop(), None);
    }

    #[test]
    fn pops_in_the_order_of_a_binary_heap() {
        // Mostly rotating entries, with some shorter and longer delays and equal times.
        let mut timeline = Timeline::default();
        let mut heap = BinaryHeap::new();
        let mut state = 7u64;
        let at = |ms: u64| Instant::ZERO + Duration::from_millis(ms);
        for id in 0..20 {
            timeline.push(at(id % 5), SeqId(id));
            heap.push(Reverse((at(id % 5), SeqId(id))));
        }
        for _ in 0..5_000 {
            let Some(e) = timeline.pop() else { break };
            assert_eq!(Some(e), heap.pop().map(|r| r.0));
            assert_eq!(timeline.peek(), heap.peek().map(|r| r.0));
            state = fulcrum_core::hash::mix(state, 1);
            let delay = match state % 10 {
                0 => 3,
                1 => 40,
                _ => 10,
            };
            let next = (e.0 + Duration::from_millis(delay), e.1);
            timeline.push(next.0, next.1);
            heap.push(Reverse(next));
        }
    }
}
