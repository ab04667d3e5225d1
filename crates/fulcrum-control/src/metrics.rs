//! `/metrics` in Prometheus text (OpenMetrics): per pool and per endpoint, read from the
//! proxy's counters at scrape time (a fresh registry each scrape; scrapes are rare next to
//! requests, and the request path only ever touches pre-allocated atomics, see
//! [`fulcrum_proxy::stats`]).
//!
//! Names follow Prometheus conventions: the `fulcrum_` prefix, `_total` for counters,
//! `_seconds` for durations. Labels: `pool`, `endpoint` (the endpoint's id; empty for
//! requests that reached no endpoint), `route` (the route's `name`; `default` for a
//! listener's default pool; empty for requests no route matched), `status` (the code, or its
//! class such as `5xx` beyond the first eight codes of a route and endpoint), `state`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fulcrum_core::Unavailable;
use fulcrum_core::resilience::breaker::BreakerState;
use fulcrum_proxy::pool::PoolRuntime;
use fulcrum_proxy::stats::{EndpointStats, Histogram, HistogramSnapshot, StatusCounts};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let f = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, f.clone());
    f
}

/// A counter without labels, at `value`.
fn single_counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A histogram family read from the proxy's lock-free histograms at scrape time.
#[derive(Debug)]
struct Histograms {
    name: &'static str,
    help: &'static str,
    series: Vec<(Labels, HistogramSnapshot)>,
}

impl Histograms {
    fn new(name: &'static str, help: &'static str) -> Self {
        Histograms { name, help, series: Vec::new() }
    }

    fn add(&mut self, labels: Labels, h: &Histogram) {
        self.series.push((labels, h.snapshot()));
    }
}

impl Collector for Histograms {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.series.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(self.name, self.help, None, MetricType::Histogram)?;
        for (labels, h) in &self.series {
            family.encode_family(labels)?.encode_histogram::<Labels>(h.sum, h.count, &h.buckets, None)?;
        }
        Ok(())
    }
}

/// Per-request families: requests by route and status, and the two latency histograms.
struct RequestFamilies {
    requests: Family<Labels, Counter>,
    duration: Histograms,
    first_byte: Histograms,
    prediction_error: Histograms,
}

impl RequestFamilies {
    fn new(r: &mut Registry) -> Self {
        RequestFamilies {
            requests: counter(
                r,
                "fulcrum_requests",
                "Requests answered, by pool, endpoint (the last one tried; empty when none was), route and status",
            ),
            duration: Histograms::new(
                "fulcrum_request_duration_seconds",
                "Time from a request's arrival to the end of its response body.",
            ),
            first_byte: Histograms::new(
                "fulcrum_time_to_first_byte_seconds",
                "Time from a request's arrival to the first byte of its response body (for a stream of server-sent events, the first token).",
            ),
            prediction_error: Histograms::new(
                "fulcrum_ttft_prediction_error_seconds",
                "How far each endpoint's learned model's predicted time to first token was from the measured one (streamed answers).",
            ),
        }
    }

    fn add_counts(
        &self,
        pool: &str,
        endpoint: &str,
        routes: &[Arc<str>],
        counts: &fulcrum_proxy::stats::RequestCounts,
    ) {
        counts.for_each(|slot, status, n| {
            let route = routes.get(usize::from(slot.0)).map_or("other", |r| &**r);
            let l =
                labels(&[("pool", pool), ("endpoint", endpoint), ("route", route), ("status", &status.to_string())]);
            self.requests.get_or_create(&l).inc_by(n);
        });
    }

    /// One endpoint's series (`endpoint` empty: the pool's requests that reached none, shown
    /// only once there are some).
    fn add(&mut self, pool: &str, endpoint: &str, routes: &[Arc<str>], stats: &EndpointStats) {
        self.add_counts(pool, endpoint, routes, &stats.requests);
        let duration = stats.duration.snapshot();
        if !endpoint.is_empty() || duration.count > 0 {
            let l = labels(&[("pool", pool), ("endpoint", endpoint)]);
            self.duration.series.push((l.clone(), duration));
            self.first_byte.add(l.clone(), &stats.first_byte);
            self.prediction_error.add(l, &stats.ttft_prediction_error);
        }
    }

    fn add_unrouted(&self, counts: &StatusCounts) {
        counts.for_each(|status, n| {
            let l = labels(&[("pool", ""), ("endpoint", ""), ("route", ""), ("status", &status.to_string())]);
            self.requests.get_or_create(&l).inc_by(n);
        });
    }

    fn register(self, r: &mut Registry) {
        r.register_collector(Box::new(self.duration));
        r.register_collector(Box::new(self.first_byte));
        r.register_collector(Box::new(self.prediction_error));
    }
}

/// Autoscaled pools' families: the replica counts and, for a predictive policy, its forecast.
struct ScaleFamilies {
    replicas: Family<Labels, FloatGauge>,
    desired: Family<Labels, FloatGauge>,
    forecast: Family<Labels, FloatGauge>,
    forecast_replicas: Family<Labels, FloatGauge>,
}

impl ScaleFamilies {
    fn new(r: &mut Registry) -> Self {
        ScaleFamilies {
            replicas: gauge(
                r,
                "fulcrum_autoscale_replicas",
                "Replicas the autoscaler's last decision started from: the count last asked for, serving or not",
            ),
            desired: gauge(r, "fulcrum_autoscale_desired_replicas", "Replicas the scaling policy wants now"),
            forecast: gauge(
                r,
                "fulcrum_autoscale_forecast_requests_per_second",
                "A predictive policy's request rate: smoothed now (horizon=\"now\") and expected one cold start ahead (horizon=\"ahead\")",
            ),
            forecast_replicas: gauge(
                r,
                "fulcrum_autoscale_forecast_replicas",
                "Replicas the forecast rate needs (the policy takes the larger of this and the reactive count)",
            ),
        }
    }

    fn add(&self, p: &Labels, pool: &str, s: &fulcrum_core::scale::ScaleStatus) {
        self.replicas.get_or_create(p).set(f64::from(s.replicas));
        self.desired.get_or_create(p).set(f64::from(s.desired));
        if let Some(f) = &s.forecast {
            self.forecast.get_or_create(&labels(&[("pool", pool), ("horizon", "now")])).set(f.rate_now);
            self.forecast.get_or_create(&labels(&[("pool", pool), ("horizon", "ahead")])).set(f.rate_ahead);
            self.forecast_replicas.get_or_create(p).set(f64::from(f.replicas));
        }
    }
}

/// The metrics of `pools`, in Prometheus text format.
pub fn render(pools: &[Arc<PoolRuntime>]) -> String {
    render_with(pools, &[], None, None)
}

/// The batch runners' figures (with `[batch]`).
fn batches(r: &mut Registry, b: &fulcrum_proxy::batch::BatchStats) {
    let running = FloatGauge::default();
    running.set(b.running as f64);
    r.register("fulcrum_batches_running", "Batches whose runners run on this proxy", running);
    let in_flight = gauge(r, "fulcrum_batch_in_flight", "Batch requests in flight on the pool from this proxy");
    for (pool, n) in &b.in_flight {
        in_flight.get_or_create(&labels(&[("pool", pool)])).set(f64::from(*n));
    }
    let requests = counter(
        r,
        "fulcrum_batch_requests",
        "Batch requests whose outcome this proxy recorded: answered (2xx, the output file) or failed for good",
    );
    requests.get_or_create(&labels(&[("outcome", "answered")])).inc_by(b.answered);
    requests.get_or_create(&labels(&[("outcome", "failed")])).inc_by(b.failed);
    let help = "Batch requests sent again after a 429 or 5xx, after a backoff";
    single_counter(r, "fulcrum_batch_resends", help, b.resends);
    let help = "Batch runs stopped because the batch database did not answer (each goes on when it does)";
    single_counter(r, "fulcrum_batch_interruptions", help, b.interruptions);
}

/// The control plane's own state beside the pools': discovery providers and the mesh link.
fn control_plane(
    r: &mut Registry,
    providers: &[fulcrum_discovery::ProviderStatus],
    mesh: Option<&crate::mesh::MeshStatus>,
) {
    let up = gauge(r, "fulcrum_discovery_up", "1 when the pool's discovery provider's last attempt succeeded");
    let found =
        gauge(r, "fulcrum_discovery_endpoints", "Endpoints in the provider's last set (the pool keeps it on failure)");
    let updates = counter(r, "fulcrum_discovery_updates", "Endpoint sets the provider applied to the pool");
    let failures =
        counter(r, "fulcrum_discovery_failures", "Failed attempts of the provider (the last set stays in use)");
    let age =
        gauge(r, "fulcrum_discovery_last_success_age_seconds", "Time since the provider's last successful attempt");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for p in providers {
        let l = labels(&[("pool", &p.pool), ("kind", p.kind)]);
        up.get_or_create(&l).set(if p.consecutive_failures == 0 && p.last_success_unix_ms.is_some() {
            1.0
        } else {
            0.0
        });
        found.get_or_create(&l).set(p.endpoints.unwrap_or(0) as f64);
        updates.get_or_create(&l).inc_by(p.updates);
        failures.get_or_create(&l).inc_by(p.failures);
        if let Some(ms) = p.last_success_unix_ms {
            age.get_or_create(&l).set(now_ms.saturating_sub(ms) as f64 / 1e3);
        }
    }
    if let Some(m) = mesh {
        let connected =
            gauge(r, "fulcrum_control_plane_connected", "1 while the proxy follows the shared configuration in etcd");
        let revision =
            gauge(r, "fulcrum_control_plane_revision", "The etcd revision of the shared configuration applied");
        let l = labels(&[("key", &m.key)]);
        connected.get_or_create(&l).set(if m.connected { 1.0 } else { 0.0 });
        revision.get_or_create(&l).set(m.revision as f64);
    }
}

/// The metrics of `pools`, the discovery `providers`, the `mesh` link and the batch
/// runners, in Prometheus text format.
pub fn render_with(
    pools: &[Arc<PoolRuntime>],
    providers: &[fulcrum_discovery::ProviderStatus],
    mesh: Option<&crate::mesh::MeshStatus>,
    batch: Option<&fulcrum_proxy::batch::BatchStats>,
) -> String {
    let mut r = Registry::default();
    control_plane(&mut r, providers, mesh);
    if let Some(b) = batch {
        batches(&mut r, b);
    }
    let requests =
        counter(&mut r, "fulcrum_endpoint_requests", "Requests sent to the endpoint (tries, retries included)");
    let failures = counter(
        &mut r,
        "fulcrum_endpoint_failures",
        "Tries that failed at the endpoint (connect, timeout, reset, 5xx)",
    );
    let in_flight =
        gauge(&mut r, "fulcrum_endpoint_in_flight", "Requests in flight, counted until their response ends");
    let tokens = gauge(&mut r, "fulcrum_endpoint_in_flight_tokens", "Estimated tokens of the requests in flight");
    let latency = gauge(&mut r, "fulcrum_endpoint_latency_ewma_seconds", "Peak-EWMA time to the response head");
    let available = gauge(
        &mut r,
        "fulcrum_endpoint_available",
        "1 when the endpoint takes new requests (healthy, not ejected, circuit closed, not draining)",
    );
    let healthy = gauge(
        &mut r,
        "fulcrum_endpoint_healthy",
        "1 when the endpoint passes its active health checks (always 1 without health checks; 0 until the first check)",
    );
    let ejected = gauge(&mut r, "fulcrum_endpoint_ejected", "1 while outlier detection keeps the endpoint ejected");
    let draining = gauge(&mut r, "fulcrum_endpoint_draining", "1 while the endpoint is being drained");
    let circuit = gauge(
        &mut r,
        "fulcrum_endpoint_circuit_state",
        "1 for the state the endpoint's circuit breaker is in (closed, open, half_open), 0 for the others",
    );
    let weight = gauge(&mut r, "fulcrum_endpoint_effective_weight", "Static weight x slow start x dynamic factor");
    let prefill_rate = gauge(
        &mut r,
        "fulcrum_endpoint_learned_prefill_tokens_per_second",
        "Prompt tokens a second the endpoint computes, learned from its times to first token (pool prior blended in)",
    );
    let itl = gauge(
        &mut r,
        "fulcrum_endpoint_learned_itl_seconds",
        "Time an output token, learned from the endpoint's streams (pool prior blended in)",
    );
    let others = gauge(
        &mut r,
        "fulcrum_endpoint_learned_others_weight",
        "Share of other clients' requests at the endpoint (in its engine's metrics) that delays this proxy's (1: all)",
    );
    let speed = gauge(
        &mut r,
        "fulcrum_endpoint_learned_speed",
        "Capacity factor learned from the endpoint's answers, on top of its weight (1: as the weight says)",
    );
    let predicted = gauge(
        &mut r,
        "fulcrum_endpoint_predicted_ttft_seconds",
        "Predicted time to first token of a 1,000-token uncached prompt sent now",
    );
    let scrape_age = gauge(
        &mut r,
        "fulcrum_endpoint_engine_metrics_age_seconds",
        "Time since the engine's own metrics were last scraped successfully",
    );
    let scrape_failures =
        counter(&mut r, "fulcrum_endpoint_engine_scrape_failures", "Engine-metrics scrapes that failed");
    let hit_rate = gauge(
        &mut r,
        "fulcrum_endpoint_engine_prefix_cache_hit_rate",
        "The engine's prefix-cache hit rate between its last two scrapes that saw lookups (0 to 1)",
    );
    let pool_requests = counter(&mut r, "fulcrum_pool_requests", "Requests admitted to the pool");
    let retries = counter(&mut r, "fulcrum_pool_retries", "Retries sent");
    let budget = counter(&mut r, "fulcrum_pool_retry_budget_exhausted", "Retries the retry budget refused");
    let rejected = counter(&mut r, "fulcrum_pool_rejected", "Requests turned away by admission control (503)");
    let limited = counter(&mut r, "fulcrum_pool_rate_limited", "Requests turned away by the rate limit (429)");
    let ejections = counter(&mut r, "fulcrum_pool_ejections", "Endpoints ejected by outlier detection");
    let hedges =
        counter(&mut r, "fulcrum_pool_hedges", "Hedges sent: second tries while the first had no response head");
    let hedges_won =
        counter(&mut r, "fulcrum_pool_hedges_won", "Hedges whose response head came first and answered the request");
    let pool_in_flight = gauge(&mut r, "fulcrum_pool_in_flight", "Requests in flight in the pool");
    let held = gauge(&mut r, "fulcrum_pool_held", "Requests held while the pool has no endpoint (scaled to zero)");
    let admission_running = gauge(
        &mut r,
        "fulcrum_pool_admission_in_flight",
        "Requests holding one of admission control's places (pools with `admission`)",
    );
    let admission_queued = gauge(
        &mut r,
        "fulcrum_pool_admission_queued",
        "Requests waiting in the admission queue (pools with `admission`)",
    );
    let p95 = gauge(
        &mut r,
        "fulcrum_pool_response_head_p95_seconds",
        "p95 time to the response head over the last 1,024 requests",
    );
    let endpoints = gauge(&mut r, "fulcrum_pool_endpoints", "Endpoints in the pool");
    let scale = ScaleFamilies::new(&mut r);
    let mut per_request = RequestFamilies::new(&mut r);
    let mut admission_wait = Histograms::new(
        "fulcrum_pool_admission_wait_seconds",
        "Time requests waited in the admission queue (admitted or turned away).",
    );

    let now = fulcrum_proxy::clock::now();
    for pool in pools {
        let snapshot = pool.snapshot();
        let name = pool.name();
        let p: Labels = labels(&[("pool", name)]);
        let stats = &pool.safety().stats;
        pool_requests.get_or_create(&p).inc_by(stats.requests.load(Ordering::Relaxed));
        retries.get_or_create(&p).inc_by(stats.retries.load(Ordering::Relaxed));
        budget.get_or_create(&p).inc_by(stats.budget_exhausted.load(Ordering::Relaxed));
        rejected.get_or_create(&p).inc_by(stats.rejected.load(Ordering::Relaxed));
        limited.get_or_create(&p).inc_by(stats.rate_limited.load(Ordering::Relaxed));
        ejections.get_or_create(&p).inc_by(stats.ejections.load(Ordering::Relaxed));
        hedges.get_or_create(&p).inc_by(stats.hedges.load(Ordering::Relaxed));
        hedges_won.get_or_create(&p).inc_by(stats.hedges_won.load(Ordering::Relaxed));
        pool_in_flight.get_or_create(&p).set(snapshot.selector.in_flight() as f64);
        held.get_or_create(&p).set(pool.held() as f64);
        endpoints.get_or_create(&p).set(snapshot.selector.endpoints().len() as f64);
        if let Some(status) = stats.scale() {
            scale.add(&p, name, &status);
        }
        if let Some(v) = pool.safety().p95_latency() {
            p95.get_or_create(&p).set(v.as_secs_f64());
        }
        if let Some((running, queued)) = pool.safety().admission_load() {
            admission_running.get_or_create(&p).set(f64::from(running));
            admission_queued.get_or_create(&p).set(queued as f64);
            admission_wait.add(p.clone(), &stats.traffic.admission_wait);
        }
        let routes = stats.traffic.route_names();
        per_request.add(name, "", &routes, &stats.traffic.unsent);
        let scraped = pool.config().engine_metrics.is_some();
        let health_checked = pool.config().resilience.health_check.is_some();
        let latency_config = *snapshot.selector.options().latency();
        let prior = snapshot.selector.pool_perf();
        let engine_age = snapshot.selector.options().engine_max_age();
        for (e, u) in snapshot.selector.endpoints().iter().zip(&snapshot.upstreams) {
            let id = e.id().as_str();
            let l: Labels = labels(&[("pool", name), ("endpoint", id)]);
            let s = e.signals();
            let flag = |on: bool| if on { 1.0 } else { 0.0 };
            requests.get_or_create(&l).inc_by(u.requests());
            failures.get_or_create(&l).inc_by(u.failures());
            in_flight.get_or_create(&l).set(s.in_flight() as f64);
            tokens.get_or_create(&l).set(s.in_flight_tokens() as f64);
            latency.get_or_create(&l).set(s.latency(now, &latency_config));
            available.get_or_create(&l).set(flag(s.is_available(now)));
            let unhealthy = health_checked
                && (s.is_unavailable_for(Unavailable::Unchecked) || s.is_unavailable_for(Unavailable::Unhealthy));
            healthy.get_or_create(&l).set(flag(!unhealthy));
            ejected.get_or_create(&l).set(flag(s.is_unavailable_for(Unavailable::Ejected)));
            draining.get_or_create(&l).set(flag(s.is_unavailable_for(Unavailable::Draining)));
            if let Some(state) = u.breaker_state() {
                for (value, label) in [
                    (BreakerState::Closed, "closed"),
                    (BreakerState::Open, "open"),
                    (BreakerState::HalfOpen, "half_open"),
                ] {
                    let sl = labels(&[("pool", name), ("endpoint", id), ("state", label)]);
                    circuit.get_or_create(&sl).set(flag(state == value));
                }
            }
            weight.get_or_create(&l).set(s.effective_weight());
            let perf = s.perf().estimate(&prior);
            prefill_rate.get_or_create(&l).set(perf.prefill_rate());
            speed.get_or_create(&l).set(s.learned_speed());
            itl.get_or_create(&l).set(perf.itl);
            others.get_or_create(&l).set(perf.others);
            predicted
                .get_or_create(&l)
                .set(fulcrum_core::balance::predicted_ttft::predict_now(e, &perf, 1_000, now, engine_age));
            if scraped {
                if let Some(age) = u.stats().engine_scrape_age(now) {
                    scrape_age.get_or_create(&l).set(age.as_secs_f64());
                }
                scrape_failures.get_or_create(&l).inc_by(u.stats().engine_scrape_failures());
                if let Some(rate) = u.stats().engine_hit_rate() {
                    hit_rate.get_or_create(&l).set(rate);
                }
            }
            per_request.add(name, id, &routes, u.stats());
        }
    }
    per_request.add_unrouted(&fulcrum_proxy::observe::UNROUTED);
    per_request.register(&mut r);
    r.register_collector(Box::new(admission_wait));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
