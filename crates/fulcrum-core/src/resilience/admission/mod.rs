//! Admission control: how many requests a pool works on at once, who waits, and who is told
//! to come back later.
//!
//! An [`AdmissionQueue`] admits up to `max_in_flight` (1024) requests; later ones wait in a
//! bounded queue (`max_queue`, 1024) for at most `queue_timeout` (10 s), then are turned away
//! with a Retry-After hint, as HAProxy's `maxconn`, `maxqueue` and `timeout queue` do. Waiting
//! requests carry a priority class (a `u8`, higher first; FIFO within a class), so that
//! interactive traffic overtakes batch work when the pool is busy. It is sans-IO: the proxy
//! names each request with a ticket id, parks waiters (a oneshot channel each), and is told
//! which ticket to wake by [`AdmissionQueue::release`] and which to turn away by
//! [`AdmissionQueue::expire`], which it calls at [`AdmissionQueue::next_deadline`].
//!
//! Invariants: at most `max_in_flight` admitted, at most `max_queue` waiting, and nobody waits
//! while there is room (a release admits the next waiter at once). A full queue rejects new
//! requests whatever their priority (no preemption). The Retry-After hint of a rejection is
//! `queue_timeout`: what the request would have waited at most.
//!
//! A [`RateLimiter`] adds per-client token buckets (by IP or API key), with a bounded number
//! of keys (see [`rate_limit`]).
//!
//! Cost: O(log q) an offer, release, cancel or expiry, with q requests waiting.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::resilience::admission::{AdmissionConfig, AdmissionQueue, AdmissionSettings, Offer};
//!
//! let s = AdmissionSettings { max_in_flight: 1, max_queue: 2, queue_timeout: Duration::from_secs(1) };
//! let mut pool = AdmissionQueue::new(&AdmissionConfig::try_new(s).unwrap());
//! let t0 = Instant::ZERO;
//! assert_eq!(pool.offer(1, 0, t0), Offer::Admitted);
//! assert!(matches!(pool.offer(2, 0, t0), Offer::Queued { .. }));
//! assert!(matches!(pool.offer(3, 9, t0), Offer::Queued { .. })); // a higher class
//! assert_eq!(pool.offer(4, 9, t0), Offer::Rejected { retry_after: Duration::from_secs(1) });
//! assert_eq!(pool.release(t0), Some(3)); // request 1 ended: the higher class goes first
//! assert_eq!(pool.expire(Instant::from_millis(1_000)), vec![2]);
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{Check, ConfigError};
use crate::time::Instant;

pub mod rate_limit;

pub use rate_limit::{RateDecision, RateLimitConfig, RateLimitSettings, RateLimiter};

const SECTION: Check = Check { section: "admission" };

/// The caller's name for a request.
pub type TicketId = u64;

/// A priority class: higher leaves the queue first.
pub type Priority = u8;

/// Seconds for a `Retry-After` header: the hint rounded up, at least 1.
pub fn retry_after_secs(hint: Duration) -> u64 {
    hint.as_secs().saturating_add(u64::from(hint.subsec_nanos() > 0)).max(1)
}

/// Admission settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// Requests worked on at once (1024).
    pub max_in_flight: u32,
    /// Requests waiting at most (1024; 0: no queue, reject at once).
    pub max_queue: u32,
    /// Longest wait in the queue (10 s).
    pub queue_timeout: Duration,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings { max_in_flight: 1024, max_queue: 1024, queue_timeout: Duration::from_secs(10) }
    }
}

/// Validated admission settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionConfig {
    s: AdmissionSettings,
}

impl AdmissionConfig {
    /// Checks the settings: `max_in_flight` at least 1, `queue_timeout` longer than zero.
    pub fn try_new(s: AdmissionSettings) -> Result<Self, ConfigError> {
        SECTION.positive("max_in_flight", s.max_in_flight)?;
        SECTION.nonzero_duration("queue_timeout", s.queue_timeout)?;
        Ok(AdmissionConfig { s })
    }

    /// The settings.
    pub fn settings(&self) -> &AdmissionSettings {
        &self.s
    }
}

/// The answer to an offered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Go ahead; call [`AdmissionQueue::release`] when the request ends.
    Admitted,
    /// Wait: [`AdmissionQueue::release`] or [`AdmissionQueue::expire`] will name the ticket,
    /// or the caller [`cancel`](AdmissionQueue::cancel)s it.
    Queued {
        /// When the ticket times out.
        deadline: Instant,
    },
    /// Turned away: answer 503 with a `Retry-After` ([`retry_after_secs`]).
    Rejected {
        /// When to come back.
        retry_after: Duration,
    },
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    priority: Priority,
    seq: u64,
    deadline: Instant,
}

/// A pool's admission control.
#[derive(Clone, Debug)]
pub struct AdmissionQueue {
    config: AdmissionConfig,
    in_flight: u32,
    by_priority: BTreeMap<(Reverse<Priority>, u64), TicketId>,
    by_deadline: BTreeMap<(Instant, u64), TicketId>,
    waiting: HashMap<TicketId, Waiting>,
    next_seq: u64,
    /// Tickets found timed out by `offer` or `release`, with their deadlines, handed out by
    /// the next `expire`.
    timed_out: Vec<(TicketId, Instant)>,
}

// === impl AdmissionQueue ===

impl AdmissionQueue {
    /// An idle pool.
    pub fn new(config: &AdmissionConfig) -> Self {
        AdmissionQueue {
            config: *config,
            in_flight: 0,
            by_priority: BTreeMap::new(),
            by_deadline: BTreeMap::new(),
            waiting: HashMap::new(),
            next_seq: 0,
            timed_out: Vec::new(),
        }
    }

    /// Requests admitted and not yet released.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// The settings.
    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// Offers a request (`id` must not be waiting already; offering it again changes
    /// nothing and says `Queued`).
    pub fn offer(&mut self, id: TicketId, priority: Priority, now: Instant) -> Offer {
        if let Some(w) = self.waiting.get(&id) {
            return Offer::Queued { deadline: w.deadline };
        }
        self.collect_expired(now);
        let s = &self.config.s;
        if self.in_flight < s.max_in_flight && self.waiting.is_empty() {
            self.in_flight += 1;
            return Offer::Admitted;
        }
        if self.waiting.len() >= s.max_queue as usize {
            return Offer::Rejected { retry_after: s.queue_timeout };
        }
        let deadline = now + s.queue_timeout;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_priority.insert((Reverse(priority), seq), id);
        self.by_deadline.insert((deadline, seq), id);
        self.waiting.insert(id, Waiting { priority, seq, deadline });
        Offer::Queued { deadline }
    }

    /// An admitted request ended: frees its place and returns the ticket to admit in its
    /// stead, if one waits (the highest class, the oldest in it). Tickets that timed out are
    /// skipped and handed out by the next [`expire`](Self::expire).
    pub fn release(&mut self, now: Instant) -> Option<TicketId> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.collect_expired(now);
        self.admit_next()
    }

    fn admit_next(&mut self) -> Option<TicketId> {
        if self.in_flight >= self.config.s.max_in_flight {
            return None;
        }
        let ((_, seq), id) = self.by_priority.pop_first()?;
        if let Some(w) = self.waiting.remove(&id) {
            self.by_deadline.remove(&(w.deadline, seq));
        }
        self.in_flight += 1;
        Some(id)
    }

    fn collect_expired(&mut self, now: Instant) {
        while let Some(entry) = self.by_deadline.first_entry() {
            let (deadline, seq) = *entry.key();
            if deadline > now {
                break;
            }
            let id = entry.remove();
            if let Some(w) = self.waiting.remove(&id) {
                self.by_priority.remove(&(Reverse(w.priority), seq));
            }
            self.timed_out.push((id, deadline));
        }
    }

    /// The tickets that waited too long by `now`, oldest first: answer them 503 with a
    /// `Retry-After` of the queue timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<TicketId> {
        self.collect_expired(now);
        self.timed_out.drain(..).map(|(id, _)| id).collect()
    }

    /// Takes a waiting ticket out of the queue (the client went away), and out of the
    /// timed-out tickets not yet handed out. Returns whether it was there; an admitted request
    /// is [`release`](Self::release)d instead.
    pub fn cancel(&mut self, id: TicketId) -> bool {
        match self.waiting.remove(&id) {
            Some(w) => {
                self.by_priority.remove(&(Reverse(w.priority), w.seq));
                self.by_deadline.remove(&(w.deadline, w.seq));
                true
            }
            None => {
                let before = self.timed_out.len();
                self.timed_out.retain(|&(t, _)| t != id);
                self.timed_out.len() < before
            }
        }
    }

    /// When [`expire`](Self::expire) has work next: the earliest deadline of the tickets
    /// waiting or timed out and not yet handed out.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.timed_out.first() {
            Some(&(_, deadline)) => Some(deadline),
            None => self.by_deadline.first_key_value().map(|((deadline, _), _)| *deadline),
        }
    }

    /// Applies new settings and admits the waiters that now fit. Waiting tickets keep their
    /// deadlines; a smaller queue bound applies to new offers.
    pub fn reconfigure(&mut self, config: &AdmissionConfig, now: Instant) -> Vec<TicketId> {
        self.config = *config;
        self.collect_expired(now);
        std::iter::from_fn(|| self.admit_next()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    fn queue(max_in_flight: u32, max_queue: u32, timeout_ms: u64) -> AdmissionQueue {
        let s = AdmissionSettings { max_in_flight, max_queue, queue_timeout: Duration::from_millis(timeout_ms) };
        AdmissionQueue::new(&AdmissionConfig::try_new(s).unwrap())
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_then_rejects() {
        let mut q = queue(2, 1, 500);
        assert_eq!(q.offer(1, 0, ms(0)), Offer::Admitted);
        assert_eq!(q.offer(2, 0, ms(0)), Offer::Admitted);
        assert_eq!(q.offer(3, 0, ms(10)), Offer::Queued { deadline: ms(510) });
        assert_eq!(q.offer(3, 0, ms(20)), Offer::Queued { deadline: ms(510) });
        assert_eq!(q.offer(4, 255, ms(10)), Offer::Rejected { retry_after: Duration::from_millis(500) });
        assert_eq!((q.in_flight(), q.queued()), (2, 1));
        assert_eq!(q.next_deadline(), Some(ms(510)));
        assert_eq!(q.release(ms(100)), Some(3));
        assert_eq!((q.in_flight(), q.queued(), q.next_deadline()), (2, 0, None));
        assert_eq!(q.release(ms(100)), None);
        assert_eq!(q.release(ms(100)), None);
        assert_eq!(q.in_flight(), 0);
        // A spurious release never goes below zero.
        assert_eq!(q.release(ms(100)), None);
        assert_eq!(q.offer(5, 0, ms(100)), Offer::Admitted);
    }

    #[test]
    fn priority_order_and_fifo_within_a_class() {
        let mut q = queue(1, 10, 1_000);
        assert_eq!(q.offer(0, 0, ms(0)), Offer::Admitted);
        for (id, prio) in [(1, 0), (2, 5), (3, 0), (4, 9), (5, 5), (6, 9)] {
            assert!(matches!(q.offer(id, prio, ms(id)), Offer::Queued { .. }));
        }
        let order: Vec<TicketId> = (0..6).filter_map(|_| q.release(ms(10))).collect();
        assert_eq!(order, [4, 6, 2, 5, 1, 3]);
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn waiting_tickets_time_out() {
        let mut q = queue(1, 10, 1_000);
        q.offer(0, 0, ms(0));
        q.offer(1, 0, ms(0));
        q.offer(2, 7, ms(400));
        q.offer(3, 0, ms(800));
        assert!(q.expire(ms(999)).is_empty());
        assert_eq!(q.expire(ms(1_000)), [1]);
        assert_eq!(q.next_deadline(), Some(ms(1_400)));
        assert_eq!(q.expire(ms(5_000)), [2, 3]);
        assert_eq!((q.queued(), q.in_flight()), (0, 1));
    }

    #[test]
    fn release_skips_timed_out_tickets_and_reports_them_later() {
        let mut q = queue(1, 10, 1_000);
        q.offer(0, 0, ms(0));
        q.offer(1, 9, ms(0));
        q.offer(2, 0, ms(500));
        // At 1.2 s ticket 1 has timed out: ticket 2 goes in.
        assert_eq!(q.release(ms(1_200)), Some(2));
        assert_eq!(q.next_deadline(), Some(ms(1_000)));
        assert_eq!(q.expire(ms(1_200)), [1]);
        assert_eq!(q.next_deadline(), None);
        // A timed-out ticket not yet handed out can still be cancelled.
        q.offer(3, 0, ms(1_300));
        assert_eq!(q.offer(4, 0, ms(2_300)), Offer::Queued { deadline: ms(3_300) });
        assert!(q.cancel(3));
        assert_eq!(q.expire(ms(2_300)), Vec::<TicketId>::new());
    }

    #[test]
    fn cancel_leaves_the_queue() {
        let mut q = queue(1, 2, 1_000);
        q.offer(0, 0, ms(0));
        q.offer(1, 0, ms(0));
        q.offer(2, 0, ms(0));
        assert!(matches!(q.offer(3, 0, ms(0)), Offer::Rejected { .. }));
        assert!(q.cancel(1));
        assert!(!q.cancel(1));
        assert!(!q.cancel(0));
        assert!(matches!(q.offer(3, 0, ms(0)), Offer::Queued { .. }));
        assert_eq!(q.release(ms(1)), Some(2));
        assert_eq!(q.release(ms(1)), Some(3));
        assert!(q.expire(ms(10_000)).is_empty());
    }

    #[test]
    fn no_queue_rejects_at_once() {
        let mut q = queue(1, 0, 2_500);
        q.offer(0, 0, ms(0));
        let Offer::Rejected { retry_after } = q.offer(1, 0, ms(0)) else { panic!("rejected expected") };
        assert_eq!(retry_after_secs(retry_after), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(10)), 10);
    }

    #[test]
    fn reconfigure_admits_waiters_that_fit() {
        let mut q = queue(1, 10, 1_000);
        for id in 0..4 {
            q.offer(id, 0, ms(0));
        }
        let bigger =
            AdmissionConfig::try_new(AdmissionSettings { max_in_flight: 3, ..AdmissionSettings::default() }).unwrap();
        assert_eq!(q.reconfigure(&bigger, ms(1)), [1, 2]);
        assert_eq!((q.in_flight(), q.queued()), (3, 1));
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let d = AdmissionSettings::default();
        let e = AdmissionConfig::try_new(AdmissionSettings { max_in_flight: 0, ..d }).unwrap_err();
        assert_eq!(e.to_string(), "admission.max_in_flight must be at least 1, got 0");
        let e = AdmissionConfig::try_new(AdmissionSettings { queue_timeout: Duration::ZERO, ..d }).unwrap_err();
        assert_eq!(e.field, "queue_timeout");
        assert!(AdmissionConfig::try_new(AdmissionSettings { max_queue: 0, ..d }).is_ok());
    }
}
