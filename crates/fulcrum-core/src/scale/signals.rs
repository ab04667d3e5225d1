//! From raw load readings to the [`Signals`] the policies read.
//!
//! A driver reads its pool's load every tick as plain numbers, a [`LoadReading`]: requests
//! in flight and endpoints serving, a counter of requests received, requests the proxy holds,
//! the fresh reports of the engines (waiting requests, KV-cache use). A [`SignalMeter`] turns
//! the readings into signals: in flight per serving endpoint, the request rate over the time
//! between two readings (a counter difference, as Prometheus' `rate()` reads a counter),
//! KV-cache use averaged over the engines that reported, and the queue as what the proxy holds
//! plus what the engines report waiting. The autoscaler runtime meters the proxy's pool with
//! it; the simulator meters its modelled pool the same way, in virtual time, so both feed the
//! policies identical signals.
//!
//! Cost: O(engines) per reading; the meter keeps one previous counter value.
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::{LoadReading, SignalMeter};
//!
//! let mut meter = SignalMeter::starting_at(Instant::ZERO, 0);
//! let reading = LoadReading { endpoints: 4, in_flight: 10, requests: 50, held: 1, ..LoadReading::default() };
//! let signals = meter.read(Instant::ZERO + Duration::from_secs(5), 4, &reading);
//! assert_eq!(signals.in_flight_per_replica, Some(2.5));
//! assert_eq!(signals.request_rate, Some(10.0));
//! assert_eq!(signals.queue_length, Some(1));
//! ```

use std::time::Duration;

use super::Signals;
use crate::endpoint::EngineLoad;
use crate::selector::Selector;
use crate::time::Instant;

/// A pool's load at one moment, as raw numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReading {
    /// Endpoints in the pool (draining ones included: their requests are still in flight).
    pub endpoints: usize,
    /// Requests in flight in the pool (streams count until they end).
    pub in_flight: u64,
    /// Requests the pool has received since some start: a counter that only grows.
    pub requests: u64,
    /// Requests held by the proxy, waiting for an endpoint (a pool scaled to zero).
    pub held: u64,
    /// The engines' latest reports, only those fresh enough to trust.
    pub engines: Vec<EngineLoad>,
    /// The 95th percentile of request latency, when the driver measures it.
    pub p95_latency: Option<Duration>,
    /// CPU use per replica, mean, as a fraction of what a replica is given.
    pub cpu_per_replica: Option<f64>,
    /// Memory use per replica, mean, as a fraction of what a replica is given.
    pub memory_per_replica: Option<f64>,
}

// === impl LoadReading ===

impl LoadReading {
    /// What a selector knows at `now` (its endpoints, requests in flight and the engine reports
    /// younger than its `engine_max_age`); the driver adds its counters.
    pub fn of_selector(selector: &Selector, now: Instant) -> Self {
        let endpoints = selector.endpoints();
        let max_age = selector.options().engine_max_age();
        LoadReading {
            endpoints: endpoints.len(),
            in_flight: selector.in_flight(),
            engines: endpoints.iter().filter_map(|e| e.signals().engine(now, max_age)).collect(),
            ..LoadReading::default()
        }
    }
}

/// Turns successive [`LoadReading`]s into [`Signals`]; see the [module](self) docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignalMeter {
    /// The previous reading's time and request counter.
    last: Option<(Instant, u64)>,
}

// === impl SignalMeter ===

impl SignalMeter {
    /// A meter whose first reading has no request rate yet.
    pub fn new() -> Self {
        SignalMeter::default()
    }

    /// A meter that counts the first rate from `requests` received at `now`.
    pub fn starting_at(now: Instant, requests: u64) -> Self {
        SignalMeter { last: Some((now, requests)) }
    }

    /// The signals of `reading`, taken at `now`, for a pool last asked for `replicas`. The
    /// request rate is over the time since the previous reading (unknown for the first one,
    /// or when no time has passed); a counter that went back counts as no request.
    pub fn read(&mut self, now: Instant, replicas: u32, reading: &LoadReading) -> Signals {
        let rate = self.last.and_then(|(at, requests)| {
            let dt = now.saturating_since(at).as_secs_f64();
            (dt > 0.0).then(|| reading.requests.saturating_sub(requests) as f64 / dt)
        });
        self.last = Some((now, reading.requests));
        let serving = reading.endpoints.max(1) as f64;
        let engines = &reading.engines;
        let kv = (!engines.is_empty()).then(|| engines.iter().map(|e| e.kv_usage).sum::<f64>() / engines.len() as f64);
        let engine_waiting: u64 = engines.iter().map(|e| u64::from(e.waiting)).sum();
        Signals {
            replicas,
            in_flight_per_replica: Some(reading.in_flight as f64 / serving),
            serving: Some(u32::try_from(reading.endpoints).unwrap_or(u32::MAX)),
            request_rate: rate,
            kv_cache_use: kv,
            // Requests held while the pool is at zero (the load that wakes it), plus what the
            // engines report waiting in their own queues.
            queue_length: Some(reading.held.saturating_add(engine_waiting)),
            p95_latency: reading.p95_latency,
            cpu_per_replica: reading.cpu_per_replica,
            memory_per_replica: reading.memory_per_replica,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scale::secs;
    use crate::{EndpointSpec, Policy, SelectorOptions};

    fn engine(waiting: u32, kv_usage: f64) -> EngineLoad {
        EngineLoad { waiting, running: 0, kv_usage, at: Instant::ZERO }
    }

    #[test]
    fn rate_is_the_counter_difference_over_the_time_between_readings() {
        let mut meter = SignalMeter::new();
        let at = |requests| LoadReading { requests, ..LoadReading::default() };
        assert_eq!(meter.read(secs(0), 1, &at(100)).request_rate, None);
        assert_eq!(meter.read(secs(2), 1, &at(140)).request_rate, Some(20.0));
        // No time passed: unknown, and the counter moves on.
        assert_eq!(meter.read(secs(2), 1, &at(150)).request_rate, None);
        assert_eq!(meter.read(secs(3), 1, &at(160)).request_rate, Some(10.0));
        // A counter that went back (a restarted driver) reads as no request.
        assert_eq!(meter.read(secs(4), 1, &at(5)).request_rate, Some(0.0));
        assert_eq!(SignalMeter::starting_at(secs(0), 10).read(secs(1), 1, &at(15)).request_rate, Some(5.0));
    }

    #[test]
    fn in_flight_is_per_serving_endpoint_and_the_queue_adds_the_engines() {
        let reading = LoadReading {
            endpoints: 3,
            in_flight: 9,
            held: 2,
            engines: vec![engine(4, 0.5), engine(1, 0.9)],
            p95_latency: Some(Duration::from_millis(800)),
            cpu_per_replica: Some(0.25),
            ..LoadReading::default()
        };
        let s = SignalMeter::new().read(secs(1), 5, &reading);
        assert_eq!(s.replicas, 5);
        assert_eq!(s.in_flight_per_replica, Some(3.0));
        assert_eq!(s.queue_length, Some(7));
        assert!((s.kv_cache_use.unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(s.p95_latency, Some(Duration::from_millis(800)));
        assert_eq!((s.cpu_per_replica, s.memory_per_replica), (Some(0.25), None));
    }

    #[test]
    fn an_empty_pool_reads_its_held_requests() {
        let reading = LoadReading { held: 3, ..LoadReading::default() };
        let s = SignalMeter::new().read(secs(1), 0, &reading);
        assert_eq!(s.in_flight_per_replica, Some(0.0));
        assert_eq!(s.kv_cache_use, None);
        assert_eq!(s.queue_length, Some(3));
        assert_eq!(s.activity(), super::super::Activity::Busy);
    }

    #[test]
    fn a_selector_reading_keeps_only_fresh_engine_reports() {
        let specs = vec![
            EndpointSpec::new("10.0.0.1:8000".parse().unwrap()),
            EndpointSpec::new("10.0.0.2:8000".parse().unwrap()),
        ];
        let selector = Selector::try_new(Policy::default(), SelectorOptions::default(), specs, Instant::ZERO).unwrap();
        let max_age = selector.options().engine_max_age();
        selector.endpoints()[0].signals().report_engine(2, 0, 0.4, Instant::ZERO);
        let guard = selector.begin(&selector.endpoints()[1], 0, Instant::ZERO);
        let fresh = LoadReading::of_selector(&selector, Instant::ZERO);
        assert_eq!((fresh.endpoints, fresh.in_flight, fresh.engines.len()), (2, 1, 1));
        let stale = LoadReading::of_selector(&selector, Instant::ZERO + max_age + Duration::from_secs(1));
        assert!(stale.engines.is_empty());
        drop(guard);
    }
}
