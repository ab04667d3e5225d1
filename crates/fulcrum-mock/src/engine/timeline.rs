//! The engine's timeline: what is due when, earliest first, ties by sequence id.
//!
//! A priority queue kept as two sorted double-ended queues rather than a binary heap,
//! because of how the engine fills it. Every running sequence has one entry; a decoding
//! sequence that steps is put back one inter-token latency later, and that latency is the
//! same for every sequence at a given moment (it depends on the batch size only). So a
//! sequence that steps nearly always goes behind every other one: the entries rotate, and a
//! push is an append. A prefill's end is mostly later than the decode steps scheduled with
//! it, so prefills wait in a lane of their own (otherwise the next few milliseconds of decode
//! steps would each go in ahead of it), and the earliest entry is the earlier of the two
//! lanes' fronts. Only an entry scheduled with a shorter latency than those before it (a
//! sequence left the batch) goes into the middle of its lane, nearly always a place or two
//! from the back: a scan from the back finds its place (a binary search when it is further
//! in), and it is moved into place from the nearer end.
//!
//! Cost: O(1) to pop and, in the common case, to push (the place is found by a scan from the
//! back); O(log n + distance to the nearer end) otherwise; O(n) to take out a cancelled
//! sequence's entry. The order is exactly a binary heap's on `(Instant, SeqId)`: keys are
//! unique (a sequence has one entry at a time).
//!
//! An entry also carries the sequence's token counters ([`Entry::emitted`],
//! [`Entry::touch`]), so that a decode step between two block boundaries reads only the
//! deque: with 64 engines' tables competing for the cache, a look-up of the sequence per
//! token was one cache miss per token and half the simulator's time.

use std::collections::VecDeque;
use std::time::Duration;

use fulcrum_core::Instant;

use super::SeqId;

/// A running sequence's next step: when, which sequence, and its token counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    /// When the step is due.
    pub(super) at: Instant,
    /// The sequence.
    pub(super) id: SeqId,
    /// Output tokens the sequence has generated so far.
    pub(super) emitted: u32,
    /// The step that brings `emitted` to this count needs the sequence itself (the end of
    /// prefill, a new KV block, the last token); the steps before it need only this entry.
    pub(super) touch: u32,
}

impl Entry {
    /// The sort key.
    fn key(&self) -> (Instant, SeqId) {
        (self.at, self.id)
    }
}

/// How far from the back [`Lane::push`] looks before it searches.
const NEAR: usize = 8;

/// Timed entries, earliest first: decode steps in one lane, prefills in another.
#[derive(Clone, Debug, Default)]
pub(super) struct Timeline {
    decode: Lane,
    prefill: Lane,
}

/// Entries sorted by their key.
#[derive(Clone, Debug, Default)]
struct Lane(VecDeque<Entry>);

impl Timeline {
    /// Schedules `entry`: a prefill's end (nothing emitted yet) in its own lane, since it
    /// mostly comes after the decode steps scheduled by then and would put the next ones in
    /// the middle of the decode lane.
    #[inline]
    pub(super) fn push(&mut self, entry: Entry) {
        if entry.emitted == 0 {
            self.prefill.push(entry);
        } else {
            self.decode.push(entry);
        }
    }

    /// The lane whose front is the earliest entry (`true`: the prefill lane).
    fn prefill_first(&self) -> bool {
        match (self.decode.0.front(), self.prefill.0.front()) {
            (Some(d), Some(p)) => p.key() < d.key(),
            (d, p) => d.is_none() && p.is_some(),
        }
    }

    /// The earliest entry.
    pub(super) fn peek(&self) -> Option<&Entry> {
        if self.prefill_first() { self.prefill.0.front() } else { self.decode.0.front() }
    }

    /// When the first step that needs its sequence ([`Entry::touch`]) is due, if every
    /// decode step from now on takes `itl`: an entry `n` steps short of its touch gets there
    /// `n x itl` after its own time. The scan of each lane stops at the first entry due after
    /// the best time found so far, so it reads the entries up to the earliest one whose next
    /// step needs its sequence (every prefill's does; about `block_size` decode entries).
    pub(super) fn first_touch(&self, itl: Duration) -> Option<Instant> {
        let first = self.prefill.first_touch(itl, None);
        self.decode.first_touch(itl, first)
    }

    /// Takes out the entry of `id` (a cancelled or preempted sequence), if there is one.
    pub(super) fn remove(&mut self, id: SeqId) -> Option<Entry> {
        self.decode.remove(id).or_else(|| self.prefill.remove(id))
    }

    /// Takes the earliest entry.
    pub(super) fn pop(&mut self) -> Option<Entry> {
        if self.prefill_first() { self.prefill.0.pop_front() } else { self.decode.0.pop_front() }
    }
}

impl Lane {
    #[inline]
    fn push(&mut self, entry: Entry) {
        let entries = &mut self.0;
        let key = entry.key();
        let len = entries.len();
        // The first entry due after this one: the entry nearly always goes last or a few
        // places before.
        let near = len.saturating_sub(NEAR);
        let mut at = len;
        while at > near && entries[at - 1].key() > key {
            at -= 1;
        }
        if at == near && at > 0 && entries[at - 1].key() > key {
            at = entries.partition_point(|e| e.key() < key);
        }
        if at == len {
            entries.push_back(entry);
        } else {
            entries.insert(at, entry);
        }
    }

    /// [`Timeline::first_touch`] over this lane, or `first` if that is earlier.
    fn first_touch(&self, itl: Duration, mut first: Option<Instant>) -> Option<Instant> {
        // In nanoseconds, as `Instant + Duration` counts them (and saturating as it does): the
        // same instants, without a `Duration` multiplication per entry.
        let itl = u64::try_from(itl.as_nanos()).unwrap_or(u64::MAX);
        let mut best = first.map_or(u64::MAX, Instant::as_nanos);
        for entry in &self.0 {
            let at = entry.at.as_nanos();
            if first.is_some() && at >= best {
                break;
            }
            let steps = entry.touch.saturating_sub(entry.emitted.saturating_add(1));
            let touch = at.saturating_add(itl.saturating_mul(u64::from(steps)));
            if first.is_none() || touch < best {
                best = touch;
                first = Some(Instant::from_nanos(touch));
            }
        }
        first
    }

    /// Takes out the entry of `id`, if there is one.
    fn remove(&mut self, id: SeqId) -> Option<Entry> {
        let found = self.0.iter().position(|e| e.id == id)?;
        self.0.remove(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    /// Odd ids in the decode lane, even ones in the prefill lane.
    fn entry(at: Instant, id: u64) -> Entry {
        Entry { at, id: SeqId(id), emitted: (id % 2) as u32, touch: 0 }
    }

    #[test]
    fn a_removed_entry_is_gone() {
        let mut timeline = Timeline::default();
        for id in 0..3 {
            timeline.push(entry(Instant::ZERO + Duration::from_millis(id), id));
        }
        timeline.remove(SeqId(0));
        timeline.remove(SeqId(7));
        assert_eq!(timeline.pop().map(|e| e.id), Some(SeqId(1)));
        assert_eq!(timeline.pop().map(|e| e.id), Some(SeqId(2)));
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
            timeline.push(entry(at(id % 5), id));
            heap.push(Reverse((at(id % 5), SeqId(id))));
        }
        for _ in 0..5_000 {
            let Some(e) = timeline.pop() else { break };
            assert_eq!(Some(e.key()), heap.pop().map(|r| r.0));
            assert_eq!(timeline.peek().map(Entry::key), heap.peek().map(|r| r.0));
            state = fulcrum_core::hash::mix(state, 1);
            let delay = match state % 10 {
                0 => 3,
                1 => 40,
                _ => 10,
            };
            let next = Entry { at: e.at + Duration::from_millis(delay), ..e };
            timeline.push(next);
            heap.push(Reverse(next.key()));
        }
    }
}
