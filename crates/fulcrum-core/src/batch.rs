//! Batch work in the gaps of interactive traffic: how many batch requests a pool may have in
//! flight now, and which batch sends next.
//!
//! Batch requests never queue ahead of interactive ones. A pool's room is its admission
//! limit when it has one, else its `slots`: [`PER_ENDPOINT`] requests for each available
//! endpoint, or, when the engines schedule by priority (the batch requests carry a low one,
//! and an engine preempts them for interactive requests), [`engine_slots`] for each;
//! interactive requests in flight take it first, and batches share what is left, up to the
//! batch cap (`[batch] max_in_flight`). While interactive requests wait in the admission
//! queue, no batch request starts. Batches share fairly: each may hold its share of the
//! window (rounded up), so that a batch that arrives later is not starved by an earlier one.
//! A batch near its deadline is *urgent*: it goes first, and gets at least one request per
//! available endpoint even when interactive traffic fills the pool.
//!
//! ```
//! use fulcrum_core::batch::{Room, may_send};
//!
//! let room = Room { endpoints: 4, slots: 16, admission_limit: None, interactive: 10, queued: 0, cap: 64 };
//! assert_eq!(room.window(false), 6); // 4 endpoints x 4, less 10 interactive
//! // Two batches share the window: 3 each.
//! assert!(may_send(&room, 2, 2, 2, false));
//! assert!(!may_send(&room, 3, 3, 2, false));
//! ```

/// Requests in flight per available endpoint that a pool without admission control is taken
/// to hold before requests wait in engine queues.
pub const PER_ENDPOINT: u32 = 4;

/// Batch requests one endpoint may hold when its engine schedules by priority: its batch
/// slots (learned from its reports, `slots`; else as many as it runs now, `running`), plus
/// [`PER_ENDPOINT`] waiting, so that a slot that frees is taken at once. An engine that
/// queues shows its slots; until it does, the window grows by [`PER_ENDPOINT`] over what
/// runs, which finds them.
pub fn engine_slots(slots: u32, running: u32) -> u32 {
    slots.max(running).saturating_add(PER_ENDPOINT)
}

/// What a pool has room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Available endpoints (those a request could be sent to now).
    pub endpoints: u32,
    /// Requests the available endpoints hold before requests wait: [`PER_ENDPOINT`] each, or
    /// [`engine_slots`] each when their engines schedule by priority.
    pub slots: u32,
    /// The pool's admission limit (max in flight), if it has admission control.
    pub admission_limit: Option<u32>,
    /// Interactive requests in flight (every request in flight but the batches').
    pub interactive: u32,
    /// Requests waiting in the pool's admission queue.
    pub queued: u32,
    /// The most batch requests the pool may have in flight.
    pub cap: u32,
}

impl Room {
    /// Batch requests the pool may have in flight now (urgent: a batch near its deadline).
    pub fn window(&self, urgent: bool) -> u32 {
        let capacity = self.admission_limit.unwrap_or(self.slots);
        let free = if self.queued > 0 { 0 } else { capacity.saturating_sub(self.interactive) };
        let window = free.min(self.cap);
        if urgent { window.max(self.endpoints.min(self.cap)) } else { window }
    }
}

/// Whether a batch may send one more request: the pool's batch requests in flight
/// (`in_flight`, all batches) are under the window, and this batch (holding `mine`) is under
/// its fair share among `active` batches. An urgent batch needs only the window.
pub fn may_send(room: &Room, in_flight: u32, mine: u32, active: u32, urgent: bool) -> bool {
    let window = room.window(urgent);
    if in_flight >= window {
        return false;
    }
    urgent || mine < window.div_ceil(active.max(1))
}

/// Whether a batch is urgent: less than a tenth of its completion window is left, or less
/// than the time its pending requests need at the recent rate (`rate`, requests a second).
pub fn is_urgent(now_secs: i64, expires_at: i64, window_secs: i64, pending: u64, rate: f64) -> bool {
    let left = expires_at.saturating_sub(now_secs);
    if left <= window_secs / 10 {
        return true;
    }
    rate > 0.0 && (pending as f64 / rate) > left as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(interactive: u32, queued: u32) -> Room {
        Room { endpoints: 4, slots: 16, admission_limit: None, interactive, queued, cap: 64 }
    }

    #[test]
    fn interactive_traffic_comes_first() {
        assert_eq!(room(0, 0).window(false), 16);
        assert_eq!(room(12, 0).window(false), 4);
        assert_eq!(room(20, 0).window(false), 0);
        // Waiting interactive requests stop batch sends.
        assert_eq!(room(0, 1).window(false), 0);
        // The admission limit is the room when set; the cap bounds the batches.
        let r = Room { admission_limit: Some(100), cap: 30, ..room(50, 0) };
        assert_eq!(r.window(false), 30);
    }

    #[test]
    fn urgent_batches_get_one_per_endpoint_and_go_first() {
        assert_eq!(room(20, 3).window(true), 4);
        assert!(may_send(&room(20, 3), 3, 3, 2, true));
        assert!(!may_send(&room(20, 3), 3, 0, 2, false));
    }

    #[test]
    fn batches_share_the_window() {
        let r = room(0, 0); // window 16
        assert!(may_send(&r, 10, 7, 2, false));
        assert!(!may_send(&r, 10, 8, 2, false));
        assert!(!may_send(&r, 16, 0, 2, false));
        // Three batches: ceil(16 / 3) = 6 each.
        assert!(may_send(&r, 11, 5, 3, false));
        assert!(!may_send(&r, 11, 6, 3, false));
    }

    #[test]
    fn engines_that_schedule_by_priority_are_filled_to_their_slots() {
        // Slots unknown: four beyond what runs, so the window grows until the engine queues.
        assert_eq!(engine_slots(0, 0), 4);
        assert_eq!(engine_slots(0, 6), 10);
        // Known: the slots plus four waiting.
        assert_eq!(engine_slots(8, 8), 12);
        let r = Room { slots: 4 * engine_slots(8, 8), ..room(10, 0) };
        assert_eq!(r.window(false), 38);
    }

    #[test]
    fn urgency_from_the_clock_and_the_rate() {
        assert!(!is_urgent(0, 86_400, 86_400, 1000, 10.0));
        assert!(is_urgent(80_000, 86_400, 86_400, 0, 0.0));
        assert!(is_urgent(0, 86_400, 86_400, 1_000_000, 10.0));
    }
}
