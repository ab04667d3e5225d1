//! Peak-EWMA latency, lock-free.
//!
//! The estimator of Finagle and tower's `PeakEwma`: a new sample above the current estimate
//! replaces it at once (peak-sensitive, so a backend that slows down is noticed on the next
//! response), a sample below it is blended in with a weight that grows with the time since
//! the last update (`1 - exp(-elapsed / decay)`). Read without a new sample, the estimate
//! decays towards zero, so an endpoint nobody has tried in a while gets tried again.
//!
//! The estimate (an `f32` of microseconds) and the time of its last update (wrapping
//! milliseconds) share one `AtomicU64`, so readers always see a consistent pair and writers
//! update with a compare-and-swap loop. Cost: one atomic load and one `exp` per read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::time::Instant;

/// A lock-free peak-EWMA latency estimate.
#[derive(Debug)]
pub struct PeakEwma {
    packed: AtomicU64,
}

fn millis32(now: Instant) -> u32 {
    // Wrapping milliseconds: differences stay right for gaps under 24 days.
    (now.as_nanos() / 1_000_000) as u32
}

fn pack(micros: f32, at: u32) -> u64 {
    (u64::from(micros.to_bits()) << 32) | u64::from(at)
}

fn unpack(v: u64) -> (f32, u32) {
    (f32::from_bits((v >> 32) as u32), v as u32)
}

fn decayed(micros: f32, at: u32, now: u32, decay: Duration) -> f64 {
    let elapsed_ms = f64::from(now.wrapping_sub(at));
    // A writer on another thread may have stamped a slightly later time than our `now`.
    if elapsed_ms > f64::from(u32::MAX / 2) {
        return f64::from(micros);
    }
    let tau_ms = (decay.as_secs_f64() * 1_000.0).max(1e-3);
    f64::from(micros) * (-elapsed_ms / tau_ms).exp()
}

// === impl PeakEwma ===

impl PeakEwma {
    /// A new estimate that starts at `initial` (the default latency assumed for an endpoint
    /// that has not answered yet).
    pub fn new(initial: Duration, now: Instant) -> Self {
        let micros = initial.as_secs_f64() * 1e6;
        PeakEwma { packed: AtomicU64::new(pack(micros as f32, millis32(now))) }
    }

    /// The estimate at `now`, in seconds, decayed since the last sample.
    pub fn get(&self, now: Instant, decay: Duration) -> f64 {
        let (micros, at) = unpack(self.packed.load(Ordering::Relaxed));
        decayed(micros, at, millis32(now), decay) / 1e6
    }

    /// Feeds one observed latency.
    pub fn observe(&self, rtt: Duration, now: Instant, decay: Duration) {
        let sample = rtt.as_secs_f64() * 1e6;
        let now32 = millis32(now);
        let _ = self.packed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            let (micros, at) = unpack(v);
            let current = f64::from(micros);
            let next = if sample > current {
                sample
            } else {
                let elapsed_ms = f64::from(now32.wrapping_sub(at).min(u32::MAX / 2));
                let tau_ms = (decay.as_secs_f64() * 1_000.0).max(1e-3);
                let w = (-elapsed_ms / tau_ms).exp();
                current * w + sample * (1.0 - w)
            };
            Some(pack(next as f32, now32))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn peaks_are_taken_at_once() {
        let e = PeakEwma::new(Duration::from_millis(10), Instant::ZERO);
        e.observe(Duration::from_millis(500), Instant::ZERO, DECAY);
        let v = e.get(Instant::ZERO, DECAY);
        assert!((v - 0.5).abs() < 1e-6, "{v}");
    }

    #[test]
    fn lower_samples_blend_by_elapsed_time() {
        let e = PeakEwma::new(Duration::from_millis(100), Instant::ZERO);
        // One decay period later, the weight of the old estimate is 1/e.
        let t = Instant::ZERO + DECAY;
        e.observe(Duration::from_millis(10), t, DECAY);
        let expected = 0.1 * (-1f64).exp() + 0.01 * (1.0 - (-1f64).exp());
        assert!((e.get(t, DECAY) - expected).abs() < 1e-6);
    }

    #[test]
    fn reads_decay_towards_zero() {
        let e = PeakEwma::new(Duration::from_millis(100), Instant::ZERO);
        let later = e.get(Instant::ZERO + DECAY * 5, DECAY);
        assert!(later < 0.1 * 0.01, "{later}");
    }

    #[test]
    fn a_read_before_the_last_write_is_not_inflated() {
        let e = PeakEwma::new(Duration::from_millis(100), Instant::from_millis(1000));
        assert!((e.get(Instant::from_millis(999), DECAY) - 0.1).abs() < 1e-6);
    }
}
