//! What a backend engine reports about itself: queue, running batch, KV-cache use, and the
//! LoRA adapters it has loaded.
//!
//! A scraper in the data plane reads the engine's metrics (vLLM's `vllm:num_requests_waiting`,
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`, or
//! SGLang's equivalents) and stores them here with the time of the scrape. Everything is an
//! atomic: policies read it on every pick without a lock.
//!
//! A report is one 64-bit word (waiting and running saturated at 2^21 - 1, KV use in parts per
//! million) plus its time, so a reader sees a whole report or the previous one, with at worst
//! the time of one and the numbers of the other while a store races a load.
//! Adapters are kept as up to [`MAX_ADAPTERS`] hashes of their names: a reader racing an
//! update may briefly see a mix of the old and new sets, which only affects a preference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::hash::hash_bytes;
use crate::time::Instant;

/// Most LoRA adapters remembered per endpoint; further names are ignored.
pub const MAX_ADAPTERS: usize = 16;

const COUNT_BITS: u32 = 21;
const COUNT_MAX: u32 = (1 << COUNT_BITS) - 1;
const PPM_BITS: u32 = 20;
const PPM_MAX: u32 = 1_000_000;
const NEVER: u64 = 0;
const ADAPTER_SEED: u64 = 0x10AA_ADA7;

/// Load an engine reported at one time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineLoad {
    /// Requests waiting in the engine's queue (saturated at 2,097,151).
    pub waiting: u32,
    /// Requests in the running batch (saturated at 2,097,151).
    pub running: u32,
    /// KV-cache use, 0.0 to 1.0.
    pub kv_usage: f64,
    /// When the report was taken.
    pub at: Instant,
}

/// Lock-free storage of the latest engine report and loaded adapters.
///
/// The report comes last (`repr(C)`): [`LoadSignals`](super::LoadSignals) lays it out in one
/// cache line with the fields a pick reads after it.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct EngineSignals {
    /// Adapter name hashes (never zero); zero marks a free slot.
    adapters: [AtomicU64; MAX_ADAPTERS],
    /// waiting | running << 21 | kv ppm << 42.
    pub(super) packed: AtomicU64,
    /// Nanoseconds of the report, plus one; `NEVER` when there is none.
    pub(super) at: AtomicU64,
}

fn adapter_hash(name: &str) -> u64 {
    hash_bytes(name.as_bytes(), ADAPTER_SEED).max(1)
}

// === impl EngineSignals ===

impl EngineSignals {
    pub(crate) fn new() -> Self {
        EngineSignals {
            packed: AtomicU64::new(0),
            at: AtomicU64::new(NEVER),
            adapters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub(crate) fn report(&self, waiting: u32, running: u32, kv_usage: f64, now: Instant) {
        if !kv_usage.is_finite() {
            self.forget();
            return;
        }
        let ppm = (kv_usage.clamp(0.0, 1.0) * f64::from(PPM_MAX)).round() as u64;
        let packed = u64::from(waiting.min(COUNT_MAX))
            | u64::from(running.min(COUNT_MAX)) << COUNT_BITS
            | ppm << (2 * COUNT_BITS);
        self.packed.store(packed, Ordering::Relaxed);
        self.at.store(now.as_nanos().saturating_add(1), Ordering::Release);
    }

    pub(crate) fn forget(&self) {
        self.at.store(NEVER, Ordering::Release);
    }

    pub(crate) fn get(&self, now: Instant, max_age: Duration) -> Option<EngineLoad> {
        let at = match self.at.load(Ordering::Acquire) {
            NEVER => return None,
            n => Instant::from_nanos(n - 1),
        };
        if now.saturating_since(at) > max_age {
            return None;
        }
        let packed = self.packed.load(Ordering::Relaxed);
        let mask = u64::from(COUNT_MAX);
        let ppm = (packed >> (2 * COUNT_BITS)) & ((1 << PPM_BITS) - 1);
        Some(EngineLoad {
            waiting: (packed & mask) as u32,
            running: ((packed >> COUNT_BITS) & mask) as u32,
            kv_usage: ppm as f64 / f64::from(PPM_MAX),
            at,
        })
    }

    pub(crate) fn set_adapters<'s>(&self, names: impl IntoIterator<Item = &'s str>) {
        let mut hashes = [0u64; MAX_ADAPTERS];
        let mut len = 0;
        for name in names {
            let h = adapter_hash(name);
            if len < MAX_ADAPTERS && !hashes[..len].contains(&h) {
                hashes[len] = h;
                len += 1;
            }
        }
        for (slot, h) in self.adapters.iter().zip(hashes) {
            slot.store(h, Ordering::Relaxed);
        }
    }

    pub(crate) fn has_adapter(&self, name: &str) -> bool {
        self.has_adapter_hash(adapter_hash(name))
    }

    /// `hash` as [`adapter_key`] computes it.
    pub(crate) fn has_adapter_hash(&self, hash: u64) -> bool {
        for slot in &self.adapters {
            match slot.load(Ordering::Relaxed) {
                0 => return false,
                h if h == hash => return true,
                _ => {}
            }
        }
        false
    }

    pub(crate) fn adapter_count(&self) -> usize {
        self.adapters.iter().take_while(|s| s.load(Ordering::Relaxed) != 0).count()
    }
}

/// The key [`EngineSignals::has_adapter_hash`] compares, computed once per request.
pub(crate) fn adapter_key(name: &str) -> u64 {
    adapter_hash(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_saturate() {
        let e = EngineSignals::new();
        let t = Instant::from_millis(1_000);
        assert_eq!(e.get(t, Duration::from_secs(1)), None);
        e.report(3, 40, 0.375, t);
        let got = e.get(t, Duration::from_secs(1)).unwrap();
        assert_eq!((got.waiting, got.running, got.kv_usage, got.at), (3, 40, 0.375, t));
        e.report(u32::MAX, 5, 7.0, Instant::ZERO);
        let got = e.get(Instant::ZERO, Duration::ZERO).unwrap();
        assert_eq!((got.waiting, got.running, got.kv_usage), (COUNT_MAX, 5, 1.0));
    }

    #[test]
    fn old_reports_are_unknown_not_idle() {
        let e = EngineSignals::new();
        e.report(0, 0, 0.0, Instant::from_millis(100));
        let max_age = Duration::from_secs(2);
        assert!(e.get(Instant::from_millis(2_100), max_age).is_some());
        assert_eq!(e.get(Instant::from_millis(2_101), max_age), None);
        // A report stamped after `now` (another thread's clock read) counts as fresh.
        assert!(e.get(Instant::from_millis(50), max_age).is_some());
        e.report(1, 1, f64::NAN, Instant::from_millis(100));
        assert_eq!(e.get(Instant::from_millis(100), max_age), None);
    }

    #[test]
    fn adapters_are_replaced_and_capped() {
        let e = EngineSignals::new();
        assert!(!e.has_adapter("sql"));
        e.set_adapters(["sql", "chat", "sql"]);
        assert!(e.has_adapter("sql") && e.has_adapter("chat") && !e.has_adapter("math"));
        assert_eq!(e.adapter_count(), 2);
        e.set_adapters(["math"]);
        assert!(!e.has_adapter("sql") && e.has_adapter("math"));
        let many: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
        e.set_adapters(many.iter().map(String::as_str));
        assert_eq!(e.adapter_count(), MAX_ADAPTERS);
        assert!(e.has_adapter("a0") && !e.has_adapter("a39"));
        e.set_adapters([]);
        assert_eq!(e.adapter_count(), 0);
    }
}
