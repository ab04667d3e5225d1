//! `/metrics` in Prometheus text: per pool and per endpoint, read from the proxy's counters
//! at scrape time (a fresh registry each scrape; scrapes are rare next to requests).
//!
//! Names follow Prometheus conventions: the `fulcrum_` prefix, `_total` for counters,
//! `_seconds` for durations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fulcrum_proxy::pool::PoolRuntime;
use prometheus_client::encoding::text::encode;
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

/// The metrics of `pools`, in Prometheus text format.
pub fn render(pools: &[Arc<PoolRuntime>]) -> String {
    let mut r = Registry::default();
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
    let weight = gauge(&mut r, "fulcrum_endpoint_effective_weight", "Static weight x slow start x dynamic factor");
    let pool_requests = counter(&mut r, "fulcrum_pool_requests", "Requests admitted to the pool");
    let retries = counter(&mut r, "fulcrum_pool_retries", "Retries sent");
    let budget = counter(&mut r, "fulcrum_pool_retry_budget_exhausted", "Retries the retry budget refused");
    let rejected = counter(&mut r, "fulcrum_pool_rejected", "Requests turned away by admission control (503)");
    let limited = counter(&mut r, "fulcrum_pool_rate_limited", "Requests turned away by the rate limit (429)");
    let pool_in_flight = gauge(&mut r, "fulcrum_pool_in_flight", "Requests in flight in the pool");
    let held = gauge(&mut r, "fulcrum_pool_held", "Requests held while the pool has no endpoint (scaled to zero)");
    let p95 = gauge(
        &mut r,
        "fulcrum_pool_response_head_p95_seconds",
        "p95 time to the response head over the last 1,024 requests",
    );
    let endpoints = gauge(&mut r, "fulcrum_pool_endpoints", "Endpoints in the pool");

    let now = fulcrum_proxy::clock::now();
    for pool in pools {
        let snapshot = pool.snapshot();
        let p: Labels = vec![("pool".into(), pool.name().to_owned())];
        let stats = &pool.safety().stats;
        pool_requests.get_or_create(&p).inc_by(stats.requests.load(Ordering::Relaxed));
        retries.get_or_create(&p).inc_by(stats.retries.load(Ordering::Relaxed));
        budget.get_or_create(&p).inc_by(stats.budget_exhausted.load(Ordering::Relaxed));
        rejected.get_or_create(&p).inc_by(stats.rejected.load(Ordering::Relaxed));
        limited.get_or_create(&p).inc_by(stats.rate_limited.load(Ordering::Relaxed));
        pool_in_flight.get_or_create(&p).set(snapshot.selector.in_flight() as f64);
        held.get_or_create(&p).set(pool.held() as f64);
        endpoints.get_or_create(&p).set(snapshot.selector.endpoints().len() as f64);
        if let Some(v) = pool.safety().p95_latency() {
            p95.get_or_create(&p).set(v.as_secs_f64());
        }
        let latency_config = *snapshot.selector.options().latency();
        for (e, u) in snapshot.selector.endpoints().iter().zip(&snapshot.upstreams) {
            let l: Labels = vec![("pool".into(), pool.name().to_owned()), ("endpoint".into(), e.id().to_string())];
            let s = e.signals();
            requests.get_or_create(&l).inc_by(u.requests());
            failures.get_or_create(&l).inc_by(u.failures());
            in_flight.get_or_create(&l).set(s.in_flight() as f64);
            tokens.get_or_create(&l).set(s.in_flight_tokens() as f64);
            latency.get_or_create(&l).set(s.latency(now, &latency_config));
            available.get_or_create(&l).set(if s.is_available(now) { 1.0 } else { 0.0 });
            weight.get_or_create(&l).set(s.effective_weight());
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
