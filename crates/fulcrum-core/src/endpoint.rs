//! Endpoints and the live load signals the data plane shares with the balancers.
//!
//! An [`Endpoint`] is an immutable description (id, address, weight, labels) plus an
//! `Arc<LoadSignals>`: atomics that the data plane updates as requests start and finish, and
//! that survive a rebuild of the pool for endpoints that stay (see
//! [`Selector::rebuild`](crate::Selector::rebuild)).
//!
//! Load is counted by an RAII [`InFlight`] guard: the data plane creates it when it sends a
//! request and drops it when the response *stream* ends, not at the first byte, so a
//! backend streaming a thousand tokens for ten seconds counts as busy for ten seconds.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::ewma::PeakEwma;
use crate::time::Instant;

mod engine;
pub mod perf;

use engine::EngineSignals;
pub(crate) use engine::adapter_key;
pub use engine::{EngineLoad, MAX_ADAPTERS};

/// The identity of an endpoint within a pool. Load signals follow the id across rebuilds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(Arc<str>);

impl EndpointId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for EndpointId {
    fn from(s: &str) -> Self {
        EndpointId(Arc::from(s))
    }
}

impl From<String> for EndpointId {
    fn from(s: String) -> Self {
        EndpointId(Arc::from(s))
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an endpoint is: the models it serves, its accelerator, its zone, and free-form labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// Model names served (empty: any).
    pub models: Vec<String>,
    /// Accelerator type, such as `h100`, `a100`, `l4` or `cpu`.
    pub accelerator: Option<String>,
    /// Failure domain: zone, rack or host.
    pub zone: Option<String>,
    /// Any other labels.
    pub other: BTreeMap<String, String>,
}

impl Labels {
    /// Whether the endpoint is labelled as serving `model`: an empty `models` list serves any.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// The static description of an endpoint, as configuration or discovery provides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Identity; defaults to the address.
    pub id: EndpointId,
    /// Where to connect.
    pub address: SocketAddr,
    /// Static weight (relative capacity).
    pub weight: NonZeroU32,
    /// Labels.
    pub labels: Labels,
}

impl EndpointSpec {
    /// An endpoint of weight 1 whose id is its address.
    pub fn new(address: SocketAddr) -> Self {
        EndpointSpec {
            id: EndpointId::from(address.to_string()),
            address,
            weight: NonZeroU32::MIN,
            labels: Labels::default(),
        }
    }

    /// Sets the static weight.
    pub fn with_weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<EndpointId>) -> Self {
        self.id = id.into();
        self
    }
}

/// An endpoint of a built pool: its description and its shared load signals.
#[derive(Clone, Debug)]
pub struct Endpoint {
    spec: EndpointSpec,
    signals: Arc<LoadSignals>,
}

impl Endpoint {
    pub(crate) fn new(spec: EndpointSpec, signals: Arc<LoadSignals>) -> Self {
        Endpoint { spec, signals }
    }

    /// The endpoint's id.
    pub fn id(&self) -> &EndpointId {
        &self.spec.id
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.spec.address
    }

    /// The static weight.
    pub fn weight(&self) -> NonZeroU32 {
        self.spec.weight
    }

    /// The labels.
    pub fn labels(&self) -> &Labels {
        &self.spec.labels
    }

    /// The description this endpoint was built from.
    pub fn spec(&self) -> &EndpointSpec {
        &self.spec
    }

    /// The live load signals.
    pub fn signals(&self) -> &Arc<LoadSignals> {
        &self.signals
    }

    /// Whether this endpoint can serve `model`: its labels list it (or list no model at all),
    /// or it has a LoRA adapter of that name loaded (see [`LoadSignals::set_adapters`]).
    ///
    /// The data plane uses it to narrow a pool to a model's servers, inside the veto it
    /// passes to [`Selector::pick`](crate::Selector::pick):
    /// `pool.pick(&facts, now, rng, |e| e.serves(model) && e.signals().is_available(now))`.
    pub fn serves(&self, model: &str) -> bool {
        self.spec.labels.serves(model) || self.signals.has_adapter(model)
    }
}

/// The endpoints of `endpoints` that can serve `model` (see [`Endpoint::serves`]).
pub fn serving<'e>(endpoints: &'e [Endpoint], model: &'e str) -> impl Iterator<Item = &'e Endpoint> + 'e {
    endpoints.iter().filter(move |e| e.serves(model))
}

/// The outcome of one request, as the data plane classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered well.
    Success,
    /// The endpoint failed (connect error, reset, timeout, 5xx).
    Failure,
}

/// Tuning of the latency estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyConfig {
    /// Decay time of the peak EWMA (tower and Linkerd use 10 s).
    pub decay: Duration,
    /// Latency assumed for an endpoint that has not answered yet.
    pub default_rtt: Duration,
    /// A failed request is recorded as at least this slow, so a backend that fails fast
    /// never looks fastest.
    pub failure_penalty: Duration,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            failure_penalty: Duration::from_secs(1),
        }
    }
}

const NO_RAMP: u64 = u64::MAX;

/// Why an endpoint is not taking new requests; several can hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Unavailable {
    /// Not yet checked by an active health check (it joins after its first success).
    Unchecked = 1,
    /// Failed its active health checks.
    Unhealthy = 2,
    /// Ejected by passive outlier detection.
    Ejected = 4,
    /// Being drained: no new requests.
    Draining = 8,
}
const UNKNOWN_UTILIZATION: u32 = u32::MAX;

/// Live load signals of one endpoint, shared by the data plane and the balancers.
///
/// Every field is an atomic: the request path never takes a lock.
///
/// The fields a pick reads sit in three cache lines (`repr(C)`, checked by a unit test): the
/// counts and capacity in the first; the engine's report (after its adapters), availability
/// and the learned performance in the fourth and fifth. The rest follows.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct LoadSignals {
    in_flight: AtomicU64,
    /// Of the requests in flight, those the engine runs behind interactive ones (batch
    /// requests of a lower engine priority): no load ahead of an interactive request.
    background: AtomicU64,
    /// Uncached prompt tokens of requests sent here that have not had their first token.
    prefilling: AtomicU64,
    /// Of `prefilling`, the background requests' tokens.
    background_prefilling: AtomicU64,
    /// Effective weight (`f64` bits), kept current by [`Selector::refresh`](crate::Selector::refresh).
    effective_weight: AtomicU64,
    /// Learned speed against the pool (`f64` bits), kept current by the refresh: 1 until
    /// answers teach otherwise.
    learned_speed: AtomicU64,
    /// `in_flight` when the engine last reported: the rest of its report is others' load
    /// (see [`LoadSignals::engine_requests`]).
    in_flight_at_report: AtomicU64,
    /// `background` when the engine last reported: its part of the report.
    background_at_report: AtomicU64,
    /// What the engine last reported, and its loaded LoRA adapters.
    engine: EngineSignals,
    /// Nanoseconds until which the endpoint's circuit is open (0: closed).
    circuit_open_until: AtomicU64,
    /// [`Unavailable`] bits.
    unavailable: AtomicU8,
    /// What its answers taught about its speed.
    perf: perf::PerfModel,
    in_flight_tokens: AtomicU64,
    latency: PeakEwma,
    consecutive_failures: AtomicU32,
    /// Utilization reported by the backend, in parts per million; `u32::MAX` when unknown.
    utilization_ppm: AtomicU32,
    /// Slow-start factor of the last refresh (`f64` bits), 1 outside a ramp.
    ramp_factor: AtomicU64,
    /// Start of the current slow-start ramp (nanoseconds), or `NO_RAMP`.
    ramp_since: AtomicU64,
    /// The first block each such request computes (0: a free slot): a prefix the index says
    /// is here is not cached yet from that block on.
    computing: [AtomicU64; COMPUTING_SLOTS],
}

/// Prefills in progress an endpoint remembers the first new block of.
const COMPUTING_SLOTS: usize = 16;

// === impl LoadSignals ===

impl LoadSignals {
    /// Fresh signals for an endpoint of static weight `weight`.
    pub fn new(weight: NonZeroU32, latency: &LatencyConfig, now: Instant) -> Self {
        LoadSignals {
            in_flight: AtomicU64::new(0),
            in_flight_tokens: AtomicU64::new(0),
            latency: PeakEwma::new(latency.default_rtt, now),
            consecutive_failures: AtomicU32::new(0),
            utilization_ppm: AtomicU32::new(UNKNOWN_UTILIZATION),
            effective_weight: AtomicU64::new(f64::from(weight.get()).to_bits()),
            ramp_factor: AtomicU64::new(1f64.to_bits()),
            learned_speed: AtomicU64::new(1f64.to_bits()),
            ramp_since: AtomicU64::new(NO_RAMP),
            unavailable: AtomicU8::new(0),
            circuit_open_until: AtomicU64::new(0),
            engine: EngineSignals::new(),
            in_flight_at_report: AtomicU64::new(0),
            background_at_report: AtomicU64::new(0),
            perf: perf::PerfModel::default(),
            prefilling: AtomicU64::new(0),
            background: AtomicU64::new(0),
            background_prefilling: AtomicU64::new(0),
            computing: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Sets or clears one reason for being unavailable; returns whether the endpoint's
    /// availability (no reason at all) changed.
    pub fn set_unavailable(&self, reason: Unavailable, on: bool) -> bool {
        let bit = reason as u8;
        let before = if on {
            self.unavailable.fetch_or(bit, Ordering::Relaxed)
        } else {
            self.unavailable.fetch_and(!bit, Ordering::Relaxed)
        };
        let after = if on { before | bit } else { before & !bit };
        (before == 0) != (after == 0)
    }

    /// Whether `reason` currently holds.
    pub fn is_unavailable_for(&self, reason: Unavailable) -> bool {
        self.unavailable.load(Ordering::Relaxed) & reason as u8 != 0
    }

    /// Whether the endpoint takes new requests at `now`: no [`Unavailable`] reason holds
    /// and its circuit is not open. Lock-free: the balancers' veto reads it on every pick.
    pub fn is_available(&self, now: Instant) -> bool {
        self.unavailable.load(Ordering::Relaxed) == 0
            && now.as_nanos() >= self.circuit_open_until.load(Ordering::Relaxed)
    }

    /// Mirrors the circuit breaker: open until `until` (`None`: closed or half-open).
    pub fn set_circuit_open_until(&self, until: Option<Instant>) {
        self.circuit_open_until.store(until.map_or(0, Instant::as_nanos), Ordering::Relaxed);
    }

    /// Requests in flight (counted until their response stream ends).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Of the requests in flight, those in the background (see
    /// [`RequestFacts::background`](crate::RequestFacts::background)): the engine runs them
    /// behind interactive ones, so they are no load ahead of one.
    pub fn background(&self) -> u64 {
        self.background.load(Ordering::Relaxed)
    }

    /// Of [`prefilling_tokens`](Self::prefilling_tokens), the background requests'.
    pub fn background_prefilling_tokens(&self) -> u64 {
        self.background_prefilling.load(Ordering::Relaxed)
    }

    /// Estimated tokens (prompt and output) of the requests in flight.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Uncached prompt tokens of the requests in flight that have not had their first token
    /// yet (counted for requests the performance model learns from).
    pub fn prefilling_tokens(&self) -> u64 {
        self.prefilling.load(Ordering::Relaxed)
    }

    /// How many of `prefix`'s first `matched` blocks are cached here already: the blocks
    /// before the first one a request still in prefill here is computing.
    pub fn ready_blocks(&self, prefix: &[u64], matched: u32) -> u32 {
        let mut computing = [0u64; COMPUTING_SLOTS];
        let mut n = 0;
        for slot in &self.computing {
            let h = slot.load(Ordering::Relaxed);
            if h != 0 {
                computing[n] = h;
                n += 1;
            }
        }
        if n == 0 {
            return matched;
        }
        let computing = &computing[..n];
        prefix.iter().take(matched as usize).position(|&b| computing.contains(&b.max(1))).map_or(matched, |j| j as u32)
    }

    fn start_computing(&self, block: u64) -> Option<u8> {
        let h = block.max(1);
        self.computing
            .iter()
            .position(|s| s.compare_exchange(0, h, Ordering::Relaxed, Ordering::Relaxed).is_ok())
            .map(|i| i as u8)
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The peak-EWMA latency estimate at `now`, in seconds.
    pub fn latency(&self, now: Instant, config: &LatencyConfig) -> f64 {
        self.latency.get(now, config.decay)
    }

    /// Peak-EWMA cost: latency x (in flight + 1) x (1 + consecutive failures).
    pub fn ewma_cost(&self, now: Instant, config: &LatencyConfig) -> f64 {
        let pending = self.in_flight() as f64 + 1.0;
        let failures = f64::from(self.consecutive_failures()) + 1.0;
        self.latency(now, config) * pending * failures
    }

    /// Records the latency and outcome of one finished request.
    pub fn observe(&self, rtt: Duration, outcome: Outcome, now: Instant, config: &LatencyConfig) {
        self.observe_outcome(outcome);
        match outcome {
            Outcome::Success => self.latency.observe(rtt, now, config.decay),
            Outcome::Failure => self.latency.observe(rtt.max(config.failure_penalty), now, config.decay),
        }
    }

    /// Records a request's outcome without its latency (a background request's, which
    /// waited behind others): only the run of consecutive failures.
    pub fn observe_outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Success => self.consecutive_failures.store(0, Ordering::Relaxed),
            Outcome::Failure => _ = self.consecutive_failures.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Utilization the backend reported (0.0 to 1.0), if any.
    pub fn utilization(&self) -> Option<f64> {
        match self.utilization_ppm.load(Ordering::Relaxed) {
            UNKNOWN_UTILIZATION => None,
            ppm => Some(f64::from(ppm) / 1e6),
        }
    }

    /// Records the utilization the backend reports (clamped to 0..=1), or forgets it.
    pub fn report_utilization(&self, utilization: Option<f64>) {
        let ppm = match utilization {
            Some(u) if u.is_finite() => (u.clamp(0.0, 1.0) * 1e6).round() as u32,
            _ => UNKNOWN_UTILIZATION,
        };
        self.utilization_ppm.store(ppm, Ordering::Relaxed);
    }

    /// Records what the engine reported at `now`: requests waiting in its queue, requests
    /// running, and KV-cache use (clamped to 0..=1; a non-finite value forgets the report).
    /// Lock-free. Independent of [`report_utilization`](Self::report_utilization), which
    /// feeds dynamic weights: a scraper may call both.
    pub fn report_engine(&self, waiting: u32, running: u32, kv_usage: f64, now: Instant) {
        self.in_flight_at_report.store(self.in_flight(), Ordering::Relaxed);
        self.background_at_report.store(self.background(), Ordering::Relaxed);
        self.engine.report(waiting, running, kv_usage, now);
        self.perf.engine_report(waiting, running);
    }

    /// What its answers taught about its speed (see [`perf`]).
    pub fn perf(&self) -> &perf::PerfModel {
        &self.perf
    }

    /// The engine's last report, or `None` when there is none or it is older than `max_age`
    /// at `now`: a stale endpoint is unknown, never idle.
    pub fn engine(&self, now: Instant, max_age: Duration) -> Option<EngineLoad> {
        self.engine.get(now, max_age)
    }

    /// The requests at the engine (running and waiting) that a new request waits behind:
    /// as it last reported, or more when some of them came from elsewhere (other balancers,
    /// or requests this one gave up on) and this balancer has sent more since: then its own
    /// requests now plus those others. For an interactive request (`background` false) the
    /// background requests are left out, the report's as they were when it was taken and the
    /// balancer's as they are now: the engine runs them behind it. `None` without a report
    /// younger than `max_age`.
    ///
    /// A report is up to a scrape interval old. Read as it is, an endpoint that others load
    /// looked as loaded until the next one however many requests it was sent meanwhile; and
    /// with the background requests of now taken from it, one whose batch requests had ended
    /// since looked busy with interactive ones, and was passed over while the others filled.
    pub fn engine_requests(&self, now: Instant, max_age: Duration, background: bool) -> Option<u64> {
        let r = self.engine(now, max_age)?;
        let reported = u64::from(r.running) + u64::from(r.waiting);
        let others = reported.saturating_sub(self.in_flight_at_report.load(Ordering::Relaxed));
        // The background requests in the report, and those in flight now.
        let (reported_behind, behind) =
            if background { (0, 0) } else { (self.background_at_report.load(Ordering::Relaxed), self.background()) };
        Some(reported.saturating_sub(reported_behind).max(self.in_flight().saturating_sub(behind) + others))
    }

    /// Forgets the engine's report (the scrape failed or the endpoint stopped exporting).
    pub fn forget_engine(&self) {
        self.engine.forget();
    }

    /// Replaces the set of LoRA adapters the engine has loaded (from vLLM's
    /// `vllm:lora_requests_info` `running_lora_adapters` and `waiting_lora_adapters`).
    /// At most [`MAX_ADAPTERS`] distinct names are kept; the rest are ignored.
    pub fn set_adapters<'s>(&self, names: impl IntoIterator<Item = &'s str>) {
        self.engine.set_adapters(names);
    }

    /// Whether the adapter `name` is loaded.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.engine.has_adapter(name)
    }

    /// How many adapters are recorded as loaded.
    pub fn adapter_count(&self) -> usize {
        self.engine.adapter_count()
    }

    pub(crate) fn has_adapter_key(&self, key: u64) -> bool {
        self.engine.has_adapter_hash(key)
    }

    /// The effective weight computed by the last refresh.
    pub fn effective_weight(&self) -> f64 {
        f64::from_bits(self.effective_weight.load(Ordering::Relaxed))
    }

    pub(crate) fn set_effective_weight(&self, w: f64) {
        self.effective_weight.store(w.to_bits(), Ordering::Relaxed);
    }

    /// How fast the endpoint's answers say it is against the pool's weighted average (1: as
    /// fast; 2: twice), as of the last refresh ([`perf::Perf::speed_against`]).
    pub fn learned_speed(&self) -> f64 {
        f64::from_bits(self.learned_speed.load(Ordering::Relaxed))
    }

    pub(crate) fn set_learned_speed(&self, s: f64) {
        self.learned_speed.store(s.to_bits(), Ordering::Relaxed);
    }

    /// What the load-aware policies divide load by: the effective weight times the learned
    /// speed. A backend that answers at half speed takes half the work of its weight, with
    /// no label.
    #[inline]
    pub fn capacity(&self) -> f64 {
        (self.effective_weight() * self.learned_speed()).max(f64::MIN_POSITIVE)
    }

    /// The slow-start factor computed by the last refresh: 1 outside a ramp.
    pub fn ramp_factor(&self) -> f64 {
        f64::from_bits(self.ramp_factor.load(Ordering::Relaxed))
    }

    pub(crate) fn set_ramp_factor(&self, f: f64) {
        self.ramp_factor.store(f.to_bits(), Ordering::Relaxed);
    }

    /// Starts a slow-start ramp at `now` (the endpoint was added or came back healthy).
    pub fn start_slow_start(&self, now: Instant) {
        self.ramp_since.store(now.as_nanos().min(NO_RAMP - 1), Ordering::Relaxed);
    }

    /// When the current slow-start ramp began, if one is running.
    pub fn slow_start_since(&self) -> Option<Instant> {
        match self.ramp_since.load(Ordering::Relaxed) {
            NO_RAMP => None,
            n => Some(Instant::from_nanos(n)),
        }
    }

    pub(crate) fn end_slow_start(&self) {
        self.ramp_since.store(NO_RAMP, Ordering::Relaxed);
    }
}

/// Load of a whole pool, shared like [`LoadSignals`].
#[derive(Debug, Default)]
pub struct PoolLoad {
    in_flight: AtomicU64,
    /// Of those, requests in the background.
    background: AtomicU64,
    perf: perf::PoolPerf,
    /// The largest [`LoadSignals::capacity`] over the pool (`f64` bits) as of the last
    /// refresh; 0 until then, or when every endpoint's is the same.
    max_capacity: AtomicU64,
    /// The sum of the capacities (`f64` bits) as of the last refresh.
    total_capacity: AtomicU64,
}

impl PoolLoad {
    /// The largest capacity in the pool when capacities differ, as of the last refresh.
    pub fn uneven_max_capacity(&self) -> Option<f64> {
        Some(f64::from_bits(self.max_capacity.load(Ordering::Relaxed))).filter(|&m| m > 0.0)
    }

    /// The pool's total capacity as of the last refresh (0 before it).
    pub fn total_capacity(&self) -> f64 {
        f64::from_bits(self.total_capacity.load(Ordering::Relaxed))
    }

    pub(crate) fn set_capacities(&self, capacities: impl Iterator<Item = f64>) {
        let (min, max, sum) =
            capacities.fold((f64::INFINITY, 0.0f64, 0.0), |(lo, hi, sum), c| (lo.min(c), hi.max(c), sum + c));
        let uneven = max.is_finite() && max > min * 1.01;
        self.max_capacity.store(if uneven { max } else { 0.0 }.to_bits(), Ordering::Relaxed);
        self.total_capacity.store(sum.to_bits(), Ordering::Relaxed);
    }

    /// Requests in flight in the pool.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Of the requests in flight in the pool, those in the background.
    pub fn background(&self) -> u64 {
        self.background.load(Ordering::Relaxed)
    }

    /// The pool's performance prior: what a new endpoint is assumed to be.
    pub fn perf(&self) -> &perf::PoolPerf {
        &self.perf
    }
}

/// Counts one request as in flight on an endpoint until dropped.
///
/// The data plane keeps it alive until the response body ends (or the client goes away).
#[must_use = "the request stops counting as in flight when the guard is dropped"]
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<LoadSignals>,
    pool: Arc<PoolLoad>,
    tokens: u64,
    started: Instant,
    sent: perf::Sent,
    first_token: Option<Instant>,
    /// Its slot in the endpoint's blocks being computed.
    computing: Option<u8>,
    /// Whether it counts as background load (see [`InFlight::in_background`]).
    background: bool,
}

// === impl InFlight ===

impl InFlight {
    pub(crate) fn start(endpoint: Arc<LoadSignals>, pool: Arc<PoolLoad>, tokens: u64, now: Instant) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        pool.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            pool,
            tokens,
            started: now,
            sent: perf::Sent::default(),
            first_token: None,
            computing: None,
            background: false,
        }
    }

    /// Counts the request as background load: the engine runs it behind interactive requests
    /// (see [`RequestFacts::background`](crate::RequestFacts::background)).
    pub(crate) fn in_background(mut self, on: bool) -> Self {
        if on && !self.background {
            self.endpoint.background.fetch_add(1, Ordering::Relaxed);
            self.endpoint.background_prefilling.fetch_add(self.sent.uncached, Ordering::Relaxed);
            self.pool.background.fetch_add(1, Ordering::Relaxed);
            self.background = true;
        }
        self
    }

    /// Sets what the performance model learns from this request (see [`perf`]), and
    /// `first_new_block`, the hash of the first prompt block the endpoint must compute.
    pub(crate) fn with_sent(mut self, sent: perf::Sent, first_new_block: Option<u64>) -> Self {
        self.endpoint.prefilling.fetch_add(sent.uncached, Ordering::Relaxed);
        self.computing = first_new_block.and_then(|b| self.endpoint.start_computing(b));
        self.sent = sent;
        self
    }

    /// Whether the answer streams, as its response says (a stream of server-sent events):
    /// only then do its first body bytes time its first token.
    pub fn streaming(mut self, streams: bool) -> Self {
        self.sent.streams = streams;
        self
    }

    /// Whether the answer streams (see [`streaming`](Self::streaming)).
    pub fn streams(&self) -> bool {
        self.sent.streams
    }

    /// Its prefill is over (first token, or the request ended): stop counting its tokens.
    fn prefilled(&mut self) {
        let tokens = std::mem::take(&mut self.sent.uncached);
        if tokens > 0 {
            self.endpoint.prefilling.fetch_sub(tokens, Ordering::Relaxed);
            if self.background {
                self.endpoint.background_prefilling.fetch_sub(tokens, Ordering::Relaxed);
            }
        }
        if let Some(slot) = self.computing.take() {
            self.endpoint.computing[usize::from(slot)].store(0, Ordering::Relaxed);
        }
    }

    /// The endpoint's signals.
    pub fn signals(&self) -> &Arc<LoadSignals> {
        &self.endpoint
    }

    /// The first token (the first body bytes of a streamed answer) arrived at `now`: a
    /// prefill sample for the endpoint's performance model. Only the first call counts.
    /// Returns the time to first token the model predicted and the one measured, in
    /// seconds, for a prediction-error histogram (`None` when the answer does not stream).
    pub fn first_token(&mut self, now: Instant) -> Option<(f64, f64)> {
        if self.first_token.is_some() {
            return None;
        }
        self.first_token = Some(now);
        if self.background {
            // Its wait was behind interactive requests, not the endpoint's speed.
            self.prefilled();
            return None;
        }
        let ttft = now.saturating_since(self.started);
        let prior = self.pool.perf.get();
        let predicted = self.endpoint.perf.first_token(&self.sent, ttft, &prior, now);
        self.prefilled();
        self.sent.streams.then_some((predicted, ttft.as_secs_f64()))
    }

    /// The answer ended well at `now` after `frames` body frames (output tokens, for a
    /// stream that sends one a frame): teaches the endpoint's occupancy and decode time.
    pub fn ended(self, now: Instant, frames: u64) {
        if self.background {
            // Held as long as interactive requests preempted it: no occupancy or decode time.
            return;
        }
        let held = now.saturating_since(self.started);
        let decode =
            self.first_token.filter(|_| self.sent.streams).map(|t| (now.saturating_since(t), frames.saturating_sub(1)));
        let prior = self.pool.perf.get();
        self.endpoint.perf.finished(held, decode, &prior, now);
    }

    /// When the request started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the request's latency (from its start to `now`) and outcome, then stops
    /// counting it.
    pub fn finish(self, outcome: Outcome, now: Instant, config: &LatencyConfig) {
        let rtt = now.saturating_since(self.started);
        if self.background {
            self.endpoint.observe_outcome(outcome);
        } else {
            self.endpoint.observe(rtt, outcome, now, config);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.prefilled();
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.in_flight_tokens.fetch_sub(self.tokens, Ordering::Relaxed);
        self.pool.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.background {
            self.endpoint.background.fetch_sub(1, Ordering::Relaxed);
            self.pool.background.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_reads_three_cache_lines_of_an_endpoint() {
        use std::mem::{offset_of, size_of};
        type L = LoadSignals;
        // Counts and capacity: the first line.
        for end in [
            offset_of!(L, in_flight),
            offset_of!(L, background),
            offset_of!(L, prefilling),
            offset_of!(L, background_prefilling),
            offset_of!(L, effective_weight),
            offset_of!(L, learned_speed),
            offset_of!(L, in_flight_at_report),
            offset_of!(L, background_at_report),
        ] {
            assert!(end + 8 <= 64, "{end}");
        }
        // The engine's report, availability and the start of the learned performance: the
        // fourth; the rest of it, the fifth.
        let engine = offset_of!(L, engine);
        for at in [
            engine + offset_of!(EngineSignals, packed),
            engine + offset_of!(EngineSignals, at),
            offset_of!(L, circuit_open_until),
            offset_of!(L, unavailable),
        ] {
            assert_eq!(at / 64, 3, "{at}");
        }
        let published = offset_of!(L, perf) + offset_of!(perf::PerfModel, published);
        assert_eq!(published / 64, 3);
        assert_eq!((published + size_of::<perf::Published>() - 1) / 64, 4);
        assert_eq!(std::mem::align_of::<L>(), 64);
    }

    fn signals() -> Arc<LoadSignals> {
        Arc::new(LoadSignals::new(NonZeroU32::MIN, &LatencyConfig::default(), Instant::ZERO))
    }

    #[test]
    fn guard_counts_until_dropped() {
        let s = signals();
        let pool = Arc::new(PoolLoad::default());
        let a = InFlight::start(s.clone(), pool.clone(), 100, Instant::ZERO);
        let b = InFlight::start(s.clone(), pool.clone(), 50, Instant::ZERO);
        assert_eq!((s.in_flight(), s.in_flight_tokens(), pool.in_flight()), (2, 150, 2));
        drop(a);
        assert_eq!((s.in_flight(), s.in_flight_tokens(), pool.in_flight()), (1, 50, 1));
        b.finish(Outcome::Success, Instant::from_millis(40), &LatencyConfig::default());
        assert_eq!((s.in_flight(), s.in_flight_tokens(), pool.in_flight()), (0, 0, 0));
        // 40 ms is above the 30 ms default, so the peak is taken at once.
        assert!((s.latency(Instant::from_millis(40), &LatencyConfig::default()) - 0.040).abs() < 1e-6);
    }

    #[test]
    fn fast_failures_cost_more_than_slow_successes() {
        let cfg = LatencyConfig::default();
        let (good, bad) = (signals(), signals());
        let now = Instant::from_millis(10);
        good.observe(Duration::from_millis(200), Outcome::Success, now, &cfg);
        bad.observe(Duration::from_micros(50), Outcome::Failure, now, &cfg);
        assert!(bad.ewma_cost(now, &cfg) > good.ewma_cost(now, &cfg));
        assert_eq!(bad.consecutive_failures(), 1);
        bad.observe(Duration::from_millis(1), Outcome::Success, now, &cfg);
        assert_eq!(bad.consecutive_failures(), 0);
    }

    #[test]
    fn availability_has_several_reasons() {
        let s = signals();
        let now = Instant::from_millis(10);
        assert!(s.is_available(now));
        assert!(s.set_unavailable(Unavailable::Unhealthy, true));
        assert!(!s.set_unavailable(Unavailable::Ejected, true));
        assert!(!s.set_unavailable(Unavailable::Unhealthy, false));
        assert!(!s.is_available(now) && s.is_unavailable_for(Unavailable::Ejected));
        assert!(s.set_unavailable(Unavailable::Ejected, false));
        s.set_circuit_open_until(Some(Instant::from_millis(20)));
        assert!(!s.is_available(now) && s.is_available(Instant::from_millis(20)));
        s.set_circuit_open_until(None);
        assert!(s.is_available(now));
    }

    #[test]
    fn utilization_is_clamped_and_forgettable() {
        let s = signals();
        assert_eq!(s.utilization(), None);
        s.report_utilization(Some(1.5));
        assert_eq!(s.utilization(), Some(1.0));
        s.report_utilization(Some(f64::NAN));
        assert_eq!(s.utilization(), None);
        s.report_utilization(Some(0.25));
        assert_eq!(s.utilization(), Some(0.25));
    }

    #[test]
    fn models_are_served_by_label_or_adapter() {
        let mut spec = EndpointSpec::new(([10, 0, 0, 1], 80).into());
        let any = Endpoint::new(spec.clone(), signals());
        assert!(any.serves("llama"));
        spec.labels.models = vec!["llama".into()];
        let llama = Endpoint::new(spec.clone(), signals());
        spec.labels.models = vec!["mistral".into()];
        let mistral = Endpoint::new(spec, signals());
        assert!(llama.serves("llama") && !mistral.serves("llama"));
        mistral.signals().set_adapters(["sql-lora"]);
        assert!(mistral.serves("sql-lora") && !llama.serves("sql-lora"));
        let pool = [any, llama, mistral];
        assert_eq!(serving(&pool, "llama").count(), 2);
        assert_eq!(serving(&pool, "sql-lora").count(), 2);
    }

    #[test]
    fn engine_reports_go_stale() {
        let s = signals();
        s.report_engine(2, 8, 0.5, Instant::from_millis(1_000));
        let fresh = s.engine(Instant::from_millis(2_000), Duration::from_secs(2)).unwrap();
        assert_eq!((fresh.waiting, fresh.running, fresh.kv_usage), (2, 8, 0.5));
        assert!(s.engine(Instant::from_millis(3_001), Duration::from_secs(2)).is_none());
        s.forget_engine();
        assert!(s.engine(Instant::from_millis(1_000), Duration::from_secs(2)).is_none());
        // Dynamic weights keep their own input.
        assert_eq!(s.utilization(), None);
    }

    #[test]
    fn engine_reports_leave_out_background_requests_as_they_were_then() {
        let s = signals();
        let pool = Arc::new(PoolLoad::default());
        let at = Instant::from_millis(1_000);
        let age = Duration::from_secs(2);
        let start = || InFlight::start(s.clone(), pool.clone(), 1, at);
        let interactive: Vec<_> = (0..3).map(|_| start()).collect();
        let mut batch: Vec<_> = (0..6).map(|_| start().in_background(true)).collect();
        s.report_engine(1, 8, 0.5, at);
        assert_eq!((s.engine_requests(at, age, false), s.engine_requests(at, age, true)), (Some(3), Some(9)));
        // Five batch requests end before the next report: the interactive ones ahead are
        // still 3 (not the report's 9 less the one batch request left).
        batch.truncate(1);
        assert_eq!(s.engine_requests(at, age, false), Some(3));
        drop((interactive, batch));
    }

    #[test]
    fn engine_reports_count_others_load_beside_what_was_sent_since() {
        let s = signals();
        let pool = Arc::new(PoolLoad::default());
        let at = Instant::from_millis(1_000);
        let age = Duration::from_secs(2);
        assert_eq!(s.engine_requests(at, age, true), None);
        let old = InFlight::start(s.clone(), pool.clone(), 1, at);
        // One of ours and 5 from elsewhere at the engine.
        s.report_engine(2, 4, 0.5, at);
        assert_eq!(s.engine_requests(at, age, true), Some(6));
        let sent: Vec<_> = (0..3).map(|_| InFlight::start(s.clone(), pool.clone(), 1, at)).collect();
        assert_eq!(s.engine_requests(at, age, true), Some(9));
        // Ended since: the report stands until the next.
        drop(old);
        drop(sent);
        assert_eq!(s.engine_requests(at, age, true), Some(6));
        // Only ours at the engine (or fewer: some on their way): ours count.
        let ours: Vec<_> = (0..4).map(|_| InFlight::start(s.clone(), pool.clone(), 1, at)).collect();
        s.report_engine(0, 3, 0.5, at);
        assert_eq!(s.engine_requests(at, age, true), Some(4));
        drop(ours);
        assert_eq!(s.engine_requests(at, age, true), Some(3));
    }
}
