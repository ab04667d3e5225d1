//! Request statistics recorded on the request path and read by `/metrics`.
//!
//! Everything here is pre-allocated and lock-free: recording a request is a few relaxed
//! atomic adds, with no allocation, no lock and no string formatting. Each endpoint's
//! [`Upstream`](crate::upstream::Upstream) holds an [`EndpointStats`]; each pool holds a
//! [`PoolTraffic`] with the same for requests that never reached an endpoint, plus the names of
//! the routes that lead to it.
//!
//! - [`StatusCounts`]: exact status codes in a few slots claimed on first use (compare and
//!   swap), then counted by class (`5xx`) once the slots are taken.
//! - [`RequestCounts`]: one [`StatusCounts`] per route slot of the pool.
//! - [`Histogram`]: fixed buckets for LLM traffic, 1 ms to 60 s, and a sum in microseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Route slots per pool: slot 0 is the listeners' default pool (`default`), the last is
/// shared by routes beyond the others (`other`).
pub const MAX_ROUTES: usize = 16;

/// Status codes counted exactly per route and endpoint; further codes count by class.
const STATUS_SLOTS: usize = 8;
/// A slot packs the code above the count.
const COUNT_BITS: u32 = 54;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Upper bounds of the latency buckets, seconds (`le`): from 1 ms (a cached answer) to 60 s
/// (a long generation).
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

/// [`LATENCY_BUCKETS`] in nanoseconds, for integer comparisons.
const BOUNDS_NS: [u64; 16] = [
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    20_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// A status label: an exact code, or a class for codes that found no free slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The code itself.
    Code(u16),
    /// `1xx` to `5xx` (the digit).
    Class(u8),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Code(c) => write!(f, "{c}"),
            Status::Class(c) => write!(f, "{c}xx"),
        }
    }
}

// === impl StatusCounts ===

/// Requests by status code.
#[derive(Debug, Default)]
pub struct StatusCounts {
    slots: [AtomicU64; STATUS_SLOTS],
    /// Codes without a slot, by class (index = first digit; 0 and >5 unused but harmless).
    classes: [AtomicU64; 10],
}

impl StatusCounts {
    /// No requests yet.
    pub const fn new() -> Self {
        StatusCounts { slots: [const { AtomicU64::new(0) }; STATUS_SLOTS], classes: [const { AtomicU64::new(0) }; 10] }
    }

    /// Counts one response of status `code` (100 to 999).
    pub fn record(&self, code: u16) {
        let key = u64::from(code) << COUNT_BITS;
        for slot in &self.slots {
            let mut v = slot.load(Ordering::Relaxed);
            if v == 0 {
                match slot.compare_exchange(0, key | 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return,
                    Err(now) => v = now,
                }
            }
            if v >> COUNT_BITS == u64::from(code) {
                slot.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.classes[usize::from(code / 100).min(9)].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls `f` for every status seen, with its count.
    pub fn for_each(&self, mut f: impl FnMut(Status, u64)) {
        for slot in &self.slots {
            let v = slot.load(Ordering::Relaxed);
            if v != 0 {
                f(Status::Code((v >> COUNT_BITS) as u16), v & COUNT_MASK);
            }
        }
        for (class, n) in self.classes.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                f(Status::Class(class as u8), n);
            }
        }
    }
}

// === impl RequestCounts ===

/// Requests by route slot and status.
#[derive(Debug, Default)]
pub struct RequestCounts {
    routes: [StatusCounts; MAX_ROUTES],
}

impl RequestCounts {
    /// Counts one response.
    pub fn record(&self, route: RouteSlot, code: u16) {
        self.routes[usize::from(route.0).min(MAX_ROUTES - 1)].record(code);
    }

    /// Calls `f` for every (route slot, status) seen, with its count.
    pub fn for_each(&self, mut f: impl FnMut(RouteSlot, Status, u64)) {
        for (i, counts) in self.routes.iter().enumerate() {
            counts.for_each(|status, n| f(RouteSlot(i as u16), status, n));
        }
    }
}

// === impl Histogram ===

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; 17],
    sum_micros: AtomicU64,
}

/// A histogram read at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in that bucket alone)`, ending with `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations, seconds.
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(ns / 1_000, Ordering::Relaxed);
    }

    /// The counts now (each bucket read once; `count` is their sum, so `+Inf` equals it).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = LATENCY_BUCKETS.iter().copied().chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(&self.buckets).map(|(b, n)| (b, n.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        HistogramSnapshot { buckets, sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, count }
    }
}

// === impl EndpointStats ===

/// What one endpoint served, for `/metrics`.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests whose answer came from (or was last tried at) this endpoint, by route and status.
    pub requests: RequestCounts,
    /// From the request's arrival to the end of its response body.
    pub duration: Histogram,
    /// From the request's arrival to the first byte of the response body (for a stream of
    /// server-sent events, the first token), or the end of a response without a body.
    pub first_byte: Histogram,
    /// How far the balancer's predicted time to first token was from the measured one, for
    /// streamed answers routed by a policy that predicts it (`predicted_ttft`; the others'
    /// requests feed the performance model too).
    pub ttft_prediction_error: Histogram,
    /// When the engine's metrics were last scraped successfully (proxy clock, ns + 1; 0: never).
    engine_scraped: AtomicU64,
    /// Engine-metrics scrapes that failed.
    engine_scrape_failures: AtomicU64,
    /// The engine's prefix-cache hit rate between its last two scrapes that saw lookups, in
    /// parts per million, plus one (0: unknown).
    engine_hit_rate: AtomicU64,
}

impl EndpointStats {
    /// Records a successful engine-metrics scrape.
    pub(crate) fn scraped(&self, now: fulcrum_core::Instant) {
        self.engine_scraped.store(now.as_nanos().saturating_add(1), Ordering::Relaxed);
    }

    /// Records a failed engine-metrics scrape.
    pub(crate) fn scrape_failed(&self) {
        self.engine_scrape_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Time since the engine's metrics were last scraped successfully, if ever.
    pub fn engine_scrape_age(&self, now: fulcrum_core::Instant) -> Option<Duration> {
        match self.engine_scraped.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_nanos(now.as_nanos().saturating_sub(at - 1))),
        }
    }

    /// Records the engine's recent prefix-cache hit rate (0.0 to 1.0).
    pub(crate) fn set_engine_hit_rate(&self, rate: f64) {
        if rate.is_finite() {
            let ppm = (rate.clamp(0.0, 1.0) * 1e6).round() as u64;
            self.engine_hit_rate.store(ppm + 1, Ordering::Relaxed);
        }
    }

    /// The engine's prefix-cache hit rate between its last two scrapes that saw lookups (the
    /// engine's own count of cached prompt tokens), if it reports one.
    pub fn engine_hit_rate(&self) -> Option<f64> {
        match self.engine_hit_rate.load(Ordering::Relaxed) {
            0 => None,
            v => Some((v - 1) as f64 / 1e6),
        }
    }

    /// Engine-metrics scrapes that failed.
    pub fn engine_scrape_failures(&self) -> u64 {
        self.engine_scrape_failures.load(Ordering::Relaxed)
    }
}

// === impl PoolTraffic ===

/// Where a route's requests are counted in its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSlot(pub u16);

impl RouteSlot {
    /// The listeners' default pool (no route matched).
    pub const DEFAULT: RouteSlot = RouteSlot(0);
}

/// A pool's request statistics beyond its endpoints'.
#[derive(Debug, Default)]
pub struct PoolTraffic {
    /// Route names by slot (slot 0 is `default`, implied).
    routes: std::sync::Mutex<Vec<Arc<str>>>,
    /// Requests that reached no endpoint (no endpoint available, overload, rate limit, bad body).
    pub unsent: EndpointStats,
    /// Time requests waited in the admission queue (admitted or not).
    pub admission_wait: Histogram,
}

impl PoolTraffic {
    /// The slot of route `name`, registered on first use (when route tables are built, never
    /// per request). Routes beyond [`MAX_ROUTES`]` - 2` share the last slot.
    pub(crate) fn route_slot(&self, name: &str) -> RouteSlot {
        let mut routes = crate::safety::lock(&self.routes);
        if let Some(i) = routes.iter().position(|r| &**r == name) {
            return RouteSlot(i as u16 + 1);
        }
        if routes.len() < MAX_ROUTES - 2 {
            routes.push(Arc::from(name));
            RouteSlot(routes.len() as u16)
        } else {
            RouteSlot(MAX_ROUTES as u16 - 1)
        }
    }

    /// The label of each slot in use: `default`, the route names, and `other`.
    pub fn route_names(&self) -> Vec<Arc<str>> {
        let routes = crate::safety::lock(&self.routes);
        let mut names: Vec<Arc<str>> = Vec::with_capacity(MAX_ROUTES);
        names.push(Arc::from(fulcrum_config::DEFAULT_ROUTE_NAME));
        names.extend(routes.iter().cloned());
        names.resize(MAX_ROUTES - 1, Arc::from(""));
        names.push(Arc::from("other"));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(c: &StatusCounts) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        c.for_each(|s, n| v.push((s.to_string(), n)));
        v
    }

    #[test]
    fn status_codes_take_slots_then_classes() {
        let c = StatusCounts::default();
        c.record(200);
        c.record(200);
        c.record(503);
        assert_eq!(collect(&c), [("200".to_owned(), 2), ("503".to_owned(), 1)]);
        for code in [201, 202, 203, 204, 205, 206, 207, 208, 208] {
            c.record(code);
        }
        // Eight slots: 200, 503, 201..=206; 207 and 208 count as 2xx.
        let v = collect(&c);
        assert_eq!(v.len(), 9, "{v:?}");
        assert_eq!(v.last(), Some(&("2xx".to_owned(), 3)));
        assert_eq!(v.iter().map(|(_, n)| n).sum::<u64>(), 12);
    }

    #[test]
    fn bucket_bounds_agree() {
        for (s, ns) in LATENCY_BUCKETS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // <= 1 ms
        h.observe(Duration::from_millis(1)); // <= 1 ms (le is inclusive)
        h.observe(Duration::from_millis(30)); // <= 50 ms
        h.observe(Duration::from_secs(120)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.001, 2));
        assert_eq!(s.buckets[5], (0.05, 1));
        assert_eq!(s.buckets[16], (f64::INFINITY, 1));
        assert!((s.sum - 120.0315).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn route_slots_are_stable_and_bounded() {
        let t = PoolTraffic::default();
        assert_eq!(t.route_slot("chat"), RouteSlot(1));
        assert_eq!(t.route_slot("embed"), RouteSlot(2));
        assert_eq!(t.route_slot("chat"), RouteSlot(1));
        for i in 0..20 {
            t.route_slot(&format!("r{i}"));
        }
        assert_eq!(t.route_slot("late"), RouteSlot(MAX_ROUTES as u16 - 1));
        let names = t.route_names();
        assert_eq!(names.len(), MAX_ROUTES);
        assert_eq!((&*names[0], &*names[1], &*names[MAX_ROUTES - 1]), ("default", "chat", "other"));
        let counts = RequestCounts::default();
        counts.record(RouteSlot(1), 200);
        counts.record(RouteSlot(99), 200); // out of range: counted as `other`
        let mut seen = Vec::new();
        counts.for_each(|r, s, n| seen.push((r.0, s, n)));
        assert_eq!(seen, [(1, Status::Code(200), 1), (MAX_ROUTES as u16 - 1, Status::Code(200), 1)]);
    }
}
