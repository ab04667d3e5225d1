//! The admin API (JSON), on its own listener.
//!
//! | call | what it does |
//! | --- | --- |
//! | `GET /pools` | every pool with its policy and endpoints' live state |
//! | `GET /pools/{pool}` | one pool |
//! | `GET /pools/{pool}/events` | the pool's timeline: health, ejections, breakers, retries, drains, scaling |
//! | `POST /pools/{pool}/endpoints/{id}/drain?timeout_ms=N` | stop new requests to an endpoint and wait for its requests in flight (default 30 s) |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are JSON: `{"error": {"message", "field"}}` with 404 for an unknown pool or endpoint
//! and 400 for a bad parameter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fulcrum_proxy::pool::{Drained, PoolRuntime};
use serde_json::{Value, json};

/// What the admin API works on.
#[derive(Clone, Debug)]
pub struct AdminState {
    pools: Arc<Vec<Arc<PoolRuntime>>>,
}

impl AdminState {
    /// The proxy's pools.
    pub fn new(pools: Vec<Arc<PoolRuntime>>) -> Self {
        AdminState { pools: Arc::new(pools) }
    }

    fn pool(&self, name: &str) -> Result<&Arc<PoolRuntime>, ApiError> {
        self.pools
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| ApiError::not_found("pool", format!("no pool is named `{name}`")))
    }
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: &'static str,
    message: String,
}

impl ApiError {
    fn not_found(field: &'static str, message: String) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, field, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"message": self.message, "field": self.field}}))).into_response()
    }
}

/// The admin API over `state`.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/pools", get(pools))
        .route("/pools/{pool}", get(pool))
        .route("/pools/{pool}/events", get(events))
        .route("/pools/{pool}/endpoints/{id}/drain", post(drain))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn describe(pool: &PoolRuntime) -> Value {
    let snapshot = pool.snapshot();
    let now = fulcrum_proxy::clock::now();
    let latency = *snapshot.selector.options().latency();
    let endpoints: Vec<Value> = snapshot
        .selector
        .endpoints()
        .iter()
        .zip(&snapshot.upstreams)
        .map(|(e, u)| {
            let s = e.signals();
            let reasons: Vec<&str> = [
                (fulcrum_core::Unavailable::Unchecked, "unchecked"),
                (fulcrum_core::Unavailable::Unhealthy, "unhealthy"),
                (fulcrum_core::Unavailable::Ejected, "ejected"),
                (fulcrum_core::Unavailable::Draining, "draining"),
            ]
            .into_iter()
            .filter(|(r, _)| s.is_unavailable_for(*r))
            .map(|(_, name)| name)
            .collect();
            json!({
                "id": e.id().as_str(),
                "address": e.address().to_string(),
                "weight": e.weight().get(),
                "effective_weight": s.effective_weight(),
                "available": s.is_available(now),
                "unavailable_because": reasons,
                "in_flight": s.in_flight(),
                "in_flight_tokens": s.in_flight_tokens(),
                "latency_ewma_ms": s.latency(now, &latency) * 1e3,
                "consecutive_failures": s.consecutive_failures(),
                "requests": u.requests(),
                "failures": u.failures(),
                "connections": u.connections(),
                "engine": s.engine(now, snapshot.selector.options().engine_max_age()).map(|l| json!({
                    "waiting": l.waiting, "running": l.running, "kv_cache_usage": l.kv_usage,
                })),
            })
        })
        .collect();
    json!({
        "name": pool.name(),
        "policy": pool.config().policy.kind().as_str(),
        "in_flight": snapshot.selector.in_flight(),
        "endpoints": endpoints,
    })
}

async fn pools(State(state): State<AdminState>) -> Json<Value> {
    Json(Value::Array(state.pools.iter().map(|p| describe(p)).collect()))
}

async fn pool(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(describe(state.pool(&name)?)))
}

async fn events(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool(&name)?;
    let events: Vec<Value> = pool
        .safety()
        .events()
        .into_iter()
        .map(|e| json!({"at_ns": e.at.as_nanos(), "endpoint": e.endpoint, "kind": e.kind, "detail": e.detail}))
        .collect();
    Ok(Json(Value::Array(events)))
}

async fn drain(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let pool = state.pool(&name)?;
    let timeout_ms = match query.get("timeout_ms") {
        None => 30_000,
        Some(v) => v.parse::<u64>().ok().filter(|&ms| ms <= 3_600_000).ok_or_else(|| ApiError {
            status: StatusCode::BAD_REQUEST,
            field: "timeout_ms",
            message: format!("timeout_ms must be a number of milliseconds up to 3600000, got {v:?}"),
        })?,
    };
    match pool.drain(&id, Duration::from_millis(timeout_ms)).await {
        Drained::Unknown => Err(ApiError::not_found("id", format!("pool `{name}` has no endpoint `{id}`"))),
        Drained::Idle => Ok(Json(json!({"endpoint": id, "drained": true, "in_flight": 0}))),
        Drained::TimedOut { in_flight } => Ok(Json(json!({"endpoint": id, "drained": false, "in_flight": in_flight}))),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::render(&state.pools),
    )
        .into_response()
}
