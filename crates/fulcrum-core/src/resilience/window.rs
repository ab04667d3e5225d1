//! A bucketed sliding window of two counts (requests and failures, deposits and withdrawals).
//!
//! The window is `buckets` buckets of `window / buckets` each: it holds the outcomes of the
//! current bucket and of the `buckets - 1` before it, so what it remembers spans between
//! `window - window / buckets` and `window`. Running totals make reading O(1); moving on
//! clears at most `buckets` buckets, O(1) amortized.

use std::time::Duration;

use crate::resilience::nanos;
use crate::time::Instant;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    a: u64,
    b: u64,
}

/// Two counts over a sliding window of time.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    width: u64,
    buckets: Box<[Bucket]>,
    /// The bucket number (time / width) of the newest bucket.
    head: u64,
    a: u64,
    b: u64,
}

// === impl Window ===

impl Window {
    /// `window` split in `buckets` (at least 1) buckets of at least a nanosecond.
    pub(crate) fn new(window: Duration, buckets: u32, now: Instant) -> Self {
        let n = u64::from(buckets.max(1));
        let width = (nanos(window) / n).max(1);
        Window {
            width,
            buckets: vec![Bucket::default(); n as usize].into_boxed_slice(),
            head: now.as_nanos() / width,
            a: 0,
            b: 0,
        }
    }

    fn slot(&self, number: u64) -> usize {
        (number % self.buckets.len() as u64) as usize
    }

    /// Forgets the buckets that left the window by `now`. A `now` earlier than the newest
    /// bucket counts in the newest bucket.
    fn advance(&mut self, now: Instant) {
        let number = now.as_nanos() / self.width;
        if number <= self.head {
            return;
        }
        let steps = (number - self.head).min(self.buckets.len() as u64);
        for k in 1..=steps {
            let slot = self.slot(self.head + k);
            let b = std::mem::take(&mut self.buckets[slot]);
            self.a -= b.a;
            self.b -= b.b;
        }
        self.head = number;
    }

    /// Adds `a` and `b` to the counts at `now`.
    pub(crate) fn add(&mut self, now: Instant, a: u64, b: u64) {
        self.advance(now);
        let slot = self.slot(self.head);
        let bucket = &mut self.buckets[slot];
        bucket.a += a;
        bucket.b += b;
        self.a += a;
        self.b += b;
    }

    /// Counts one request at `now`, failed or not (the breaker's use).
    pub(crate) fn record(&mut self, failed: bool, now: Instant) {
        self.add(now, 1, u64::from(failed));
    }

    /// The two counts in the window at `now`.
    pub(crate) fn counts(&mut self, now: Instant) -> (u64, u64) {
        self.advance(now);
        (self.a, self.b)
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
        self.a = 0;
        self.b = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    #[test]
    fn slides_bucket_by_bucket() {
        // 10 s in 10 buckets of 1 s.
        let mut w = Window::new(Duration::from_secs(10), 10, ms(0));
        w.record(true, ms(0));
        w.record(false, ms(500));
        w.record(true, ms(4_200));
        assert_eq!(w.counts(ms(9_999)), (3, 2));
        // The first bucket [0, 1 s) leaves at 10 s.
        assert_eq!(w.counts(ms(10_000)), (1, 1));
        // The one at 4.2 s, in [4 s, 5 s), leaves at 14 s.
        assert_eq!(w.counts(ms(13_999)), (1, 1));
        assert_eq!(w.counts(ms(14_000)), (0, 0));
        // A jump past the whole window clears it; an earlier time counts in the newest bucket.
        w.record(false, ms(100_000));
        w.record(true, ms(50));
        assert_eq!(w.counts(ms(100_001)), (2, 1));
        assert_eq!(w.counts(ms(1_000_000)), (0, 0));
        w.record(true, ms(1_000_000));
        w.clear();
        assert_eq!(w.counts(ms(1_000_000)), (0, 0));
    }

    #[test]
    fn tiny_windows_still_work() {
        let mut w = Window::new(Duration::from_nanos(3), 10, Instant::ZERO);
        w.record(true, Instant::from_nanos(1));
        assert_eq!(w.counts(Instant::from_nanos(10)), (1, 1));
        assert_eq!(w.counts(Instant::from_nanos(11)), (0, 0));
    }
}
