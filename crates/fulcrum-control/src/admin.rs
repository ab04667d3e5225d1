//! The admin API (JSON), on its own listener.
//!
//! | call | what it does |
//! | --- | --- |
//! | `GET /pools` | every pool with its policy and endpoints' live state |
//! | `GET /pools/{pool}` | one pool |
//! | `GET /pools/{pool}/scale` | an autoscaled pool's last decision: `desired_replicas`, `replicas`, bounds, reason, forecast (what KEDA's `metrics-api` scaler reads; 404 for a pool without `autoscale`, 503 before the first tick) |
//! | `GET /pools/{pool}/events` | the pool's timeline: health, ejections, breakers, retries, drains, scaling, reloads |
//! | `POST /pools/{pool}/endpoints` | add an endpoint (`{"address", "id"?, "weight"?, "models"?, "labels"?}`) |
//! | `DELETE /pools/{pool}/endpoints/{id}` | remove an endpoint (its requests in flight finish) |
//! | `PUT /pools/{pool}/endpoints/{id}/weight` | set its static weight (`{"weight": 3}`) |
//! | `POST /pools/{pool}/endpoints/{id}/drain?timeout_ms=N` | stop new requests to an endpoint and wait for its requests in flight (default 30 s) |
//! | `POST /pools/{pool}/endpoints/{id}/undrain` | end a drain: the endpoint takes new requests again (kept through reloads) |
//! | `PUT /pools/{pool}/policy` | change the pool's policy (`{"policy": "least_connections"}` or `{"policy": {"name", "options"}}`) |
//! | `GET /config` | the running configuration: its TOML text, the same as JSON, its generation |
//! | `PUT /config` | replace the running configuration with the TOML text of the body |
//! | `POST /reload` | read the configuration file again and apply it |
//! | `GET /discovery` | every discovery provider: kind, source, state, endpoints found, last success and error |
//! | `POST /pools/{pool}/registrations`, `PUT`/`DELETE /pools/{pool}/registrations/{id}`, `GET /pools/{pool}/registrations` | backends' self-registration and heartbeats (pools with `discovery = { kind = "registration" }`) |
//! | `GET /control` | standalone or mesh mode; in mesh mode the link to etcd: connected, revision, last error |
//! | `GET /metrics` | Prometheus text |
//! | `GET /ui` | the live dashboard (see [`crate::dashboard`]); `GET /ui/stream` is its server-sent-event stream |
//! | `GET /healthz` | liveness: 200 `{"status": "ok"}` while the process serves (no token needed) |
//! | `GET /readyz` | readiness: 200 once the configuration runs, with each pool's available endpoints (no token needed) |
//!
//! Changes are edits of the running configuration's text, applied like a reload (see
//! [`crate::edit`] and `fulcrum_proxy::live`): validated, built, swapped atomically; an
//! invalid result is refused and the old configuration keeps running. In mesh mode they are
//! published to every proxy through etcd instead ([`crate::mesh`]).
//!
//! Errors are JSON: `{"error": {"message", "field"}}` (an invalid configuration adds
//! `"errors"`: every error found, each `{"file", "line", "field", "message"}`) with 404 for an unknown pool or
//! endpoint, 400 for a bad request or an invalid configuration, 409 for a change that
//! conflicts with the running state or needs a restart, 401 without the bearer token when
//! one is set.

use fulcrum_core::balance::predicted_ttft::predict_now;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fulcrum_proxy::pool::{Drained, PoolRuntime};
use fulcrum_proxy::{Live, ReloadError, ReloadReport};
use serde_json::{Value, json};

use crate::edit::{self, EditError};
use crate::mesh::{Mesh, MeshError};

/// The largest request body the admin API reads (a whole configuration: 1 MiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the admin API works on.
#[derive(Clone, Debug)]
pub struct AdminState {
    live: Live,
    token: Option<Arc<str>>,
    mesh: Option<Mesh>,
    discovery: Option<fulcrum_discovery::Discovery>,
    /// Host names accepted in `Host` and `Origin` besides IP addresses and `localhost`.
    hosts: Arc<[String]>,
    /// The dashboard's history of the pools' traffic.
    recorder: Arc<crate::dashboard::Recorder>,
}

impl AdminState {
    /// The proxy's running configuration.
    pub fn new(live: Live) -> Self {
        let recorder = crate::dashboard::Recorder::start(live.clone());
        AdminState { live, token: None, mesh: None, discovery: None, hosts: Arc::from([]), recorder }
    }

    /// Shows the discovery providers' status and serves backends' self-registrations
    /// (`/pools/{pool}/registrations`, see `fulcrum_discovery::registration_router`).
    pub fn with_discovery(mut self, discovery: fulcrum_discovery::Discovery) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Sends every change through the mesh's shared configuration (see [`crate::mesh`]).
    pub fn with_mesh(mut self, mesh: Mesh) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// Accepts these host names in `Host` and `Origin`, besides IP addresses and `localhost`.
    pub fn with_hosts(mut self, hosts: Vec<String>) -> Self {
        self.hosts = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        self
    }

    /// Requires `Authorization: Bearer <token>` on every call.
    pub fn with_token(mut self, token: impl Into<Arc<str>>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The running configuration.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// The dashboard's history of the pools' traffic.
    pub(crate) fn recorder(&self) -> Arc<crate::dashboard::Recorder> {
        self.recorder.clone()
    }

    fn pool(&self, name: &str) -> Result<Arc<PoolRuntime>, ApiError> {
        self.live.pool(name).ok_or_else(|| ApiError::not_found("pool", format!("no pool is named `{name}`")))
    }

    /// Edits the running text with `change` and applies the result: here (with no other
    /// reload in between), or through the mesh to every proxy (against the version edited).
    async fn change(&self, change: impl FnOnce(&str) -> Result<String, EditError>) -> Result<Json<Value>, ApiError> {
        let outcome = match &self.mesh {
            Some(mesh) => mesh.edit(change).await?,
            None => self.live.edit(change)?,
        };
        applied(outcome?)
    }

    async fn apply(&self, text: &str) -> Result<Json<Value>, ApiError> {
        match &self.mesh {
            Some(mesh) => applied(mesh.publish(text).await?),
            None => applied(self.live.reload_text(text, self.live.path())?),
        }
    }
}

fn applied(report: ReloadReport) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"applied": true, "report": report})))
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: String,
    message: String,
    /// Every error of an invalid configuration (`{"file", "line", "field", "message"}`).
    errors: Vec<Value>,
}

impl ApiError {
    fn new(status: StatusCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status, field: field.into(), message: message.into(), errors: Vec::new() }
    }

    fn not_found(field: &str, message: String) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, field, message)
    }

    fn bad(field: &str, message: String) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, field, message)
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        let status = match &e {
            EditError::UnknownPool(_) | EditError::UnknownEndpoint { .. } => StatusCode::NOT_FOUND,
            EditError::Bad { .. } => StatusCode::BAD_REQUEST,
            EditError::Duplicate { .. } | EditError::Discovered(_) | EditError::NoText => StatusCode::CONFLICT,
            EditError::Unparsable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.field(), e.to_string())
    }
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        let status = match &e {
            ReloadError::Invalid(_) | ReloadError::Pool { .. } | ReloadError::Tls { .. } => StatusCode::BAD_REQUEST,
            ReloadError::NeedsRestart { .. } => StatusCode::CONFLICT,
        };
        let (message, errors) = match &e {
            ReloadError::Invalid(c) => {
                let errors = c
                    .errors()
                    .iter()
                    .map(|e| json!({"file": e.file, "line": e.line, "field": e.field, "message": e.message}))
                    .collect();
                (format!("the new configuration is invalid, nothing changed: {c}"), errors)
            }
            other => (format!("refused, nothing changed: {other}"), Vec::new()),
        };
        ApiError { errors, ..ApiError::new(status, e.field(), message) }
    }
}

impl From<MeshError> for ApiError {
    fn from(e: MeshError) -> Self {
        match e {
            MeshError::Refused(r) => r.into(),
            MeshError::Unreachable(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "control", e.to_string()),
            MeshError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, "config", e.to_string()),
            MeshError::Document(_) => ApiError::bad("config", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"message": self.message, "field": self.field});
        if !self.errors.is_empty() {
            error["errors"] = Value::Array(self.errors);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// A JSON body, with its errors answered in the API's error shape.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::new(e.status(), "body", e.body_text())),
        }
    }
}

/// The admin API over `state`.
pub fn app(state: AdminState) -> Router {
    let registrations = state
        .discovery
        .as_ref()
        .map(|d| fulcrum_discovery::registration_router(d.registry().clone()))
        .unwrap_or_default();
    Router::new()
        .route("/pools", get(pools))
        .route("/pools/{pool}", get(pool))
        .route("/pools/{pool}/events", get(events))
        .route("/pools/{pool}/scale", get(scale))
        .route("/pools/{pool}/endpoints", post(add_endpoint))
        .route("/pools/{pool}/endpoints/{id}", axum::routing::delete(remove_endpoint))
        .route("/pools/{pool}/endpoints/{id}/weight", put(set_weight))
        .route("/pools/{pool}/endpoints/{id}/drain", post(drain))
        .route("/pools/{pool}/endpoints/{id}/undrain", post(undrain))
        .route("/pools/{pool}/policy", put(set_policy))
        .route("/config", get(show_config).put(replace_config))
        .route("/reload", post(reload))
        .route("/control", get(control))
        .route("/discovery", get(discovery))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/", get(|| async { axum::response::Redirect::temporary("/ui") }))
        .route("/ui", get(crate::dashboard::index))
        .route("/ui/", get(crate::dashboard::index))
        .route("/ui/app.js", get(crate::dashboard::script))
        .route("/ui/app.css", get(crate::dashboard::style))
        .route("/ui/stream", get(crate::dashboard::stream))
        .route("/readyz", get(readyz))
        .with_state(state.clone())
        .merge(registrations)
        .fallback(|| async {
            ApiError::not_found("path", "no such admin call; see GET /pools, /config, /metrics".into())
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state, check_host))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Whether `authority` (`host[:port]`) names this admin API: an IP address (what probes and
/// scripts use; a DNS-rebinding attack needs a name), `localhost`, or a configured name.
fn allowed_authority(authority: &str, hosts: &[String]) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(h, port)| if port.parse::<u16>().is_ok() { h } else { authority }),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.parse::<std::net::Ipv4Addr>().is_ok() || host == "localhost" || hosts.contains(&host)
}

/// Refuses requests whose `Host` or `Origin` names another site (DNS rebinding, cross-site
/// requests from a browser): 403, before the token is even looked at.
async fn check_host(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let refuse = |field: &str, value: &str| {
        let message = format!(
            "{field} {value:?} does not name this admin API: use an IP address or localhost, or list the name in [proxy] admin_hosts"
        );
        ApiError::new(StatusCode::FORBIDDEN, field.to_ascii_lowercase(), message).into_response()
    };
    if let Some(host) = req.headers().get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !allowed_authority(host, &state.hosts) {
            return refuse("Host", host);
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin.split_once("://").map_or("", |(_, rest)| rest).trim_end_matches('/');
        if !allowed_authority(authority, &state.hosts) {
            return refuse("Origin", origin);
        }
    }
    next.run(req).await
}

/// Checks the bearer token, when one is set, in constant time.
async fn authorize(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(token) = &state.token else { return next.run(req).await };
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) || crate::dashboard::STATIC_PATHS.contains(&path) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authorization",
        "this admin API needs `Authorization: Bearer <token>`",
    )
    .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

/// The calls that need no token: probes, which tell nothing about the fleet but that the
/// process runs, and the way to the dashboard.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/"];

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn describe(pool: &PoolRuntime) -> Value {
    let snapshot = pool.snapshot();
    let now = fulcrum_proxy::clock::now();
    let latency = *snapshot.selector.options().latency();
    let prior = snapshot.selector.pool_perf();
    let engine_age = snapshot.selector.options().engine_max_age();
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
            let perf = s.perf().estimate(&prior);
            let learned = json!({
                "prefill_tokens_per_second": perf.prefill_rate(),
                "overhead_ms": perf.overhead * 1e3,
                "itl_ms": perf.itl * 1e3,
                "occupancy_ms": perf.occupancy * 1e3,
                "batch_slots": (perf.slots > 0).then_some(perf.slots),
                "samples": perf.confidence,
                "speed": s.learned_speed(),
                "others_weight": perf.others,
                "predicted_ttft_ms_1k_tokens": predict_now(e, &perf, 1_000, now, engine_age) * 1e3,
            });
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
                "circuit": u.breaker_state().map(|b| b.to_string()),
                "engine": s.engine(now, engine_age).map(|l| json!({
                    "waiting": l.waiting, "running": l.running, "kv_cache_usage": l.kv_usage,
                    "prefix_cache_hit_rate": u.stats().engine_hit_rate(),
                })),
                "learned": learned,
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
    Json(Value::Array(state.live.pools().iter().map(|p| describe(p)).collect()))
}

async fn pool(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool(&name)?;
    Ok(Json(describe(&pool)))
}

async fn add_endpoint(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Body(endpoint): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    state.change(|text| edit::add_endpoint(text, &name, &endpoint)).await
}

async fn remove_endpoint(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    state.change(|text| edit::remove_endpoint(text, &name, &id)).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

async fn set_weight(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
    Body(body): Body<WeightBody>,
) -> Result<Json<Value>, ApiError> {
    state.change(|text| edit::set_weight(text, &name, &id, body.weight)).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    policy: Value,
}

async fn set_policy(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Body(body): Body<PolicyBody>,
) -> Result<Json<Value>, ApiError> {
    state.change(|text| edit::set_policy(text, &name, &body.policy)).await
}

async fn show_config(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let current = state.live.state();
    let text = current.text().ok_or(EditError::NoText)?;
    Ok(Json(json!({
        "generation": current.generation(),
        "path": state.live.path().map(|p| p.display().to_string()),
        "text": &**text,
        "config": edit::to_json(text)?,
    })))
}

async fn replace_config(State(state): State<AdminState>, text: String) -> Result<Json<Value>, ApiError> {
    state.apply(&text).await
}

async fn reload(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    match &state.mesh {
        Some(mesh) => applied(mesh.reload_own()?),
        None => applied(state.live.reload_file()?),
    }
}

async fn discovery(State(state): State<AdminState>) -> Json<Value> {
    let providers = state.discovery.as_ref().map(|d| d.status().snapshot()).unwrap_or_default();
    Json(json!({"providers": providers}))
}

async fn control(State(state): State<AdminState>) -> Json<Value> {
    match &state.mesh {
        Some(mesh) => Json(json!({"mode": "mesh", "mesh": mesh.status()})),
        None => Json(json!({"mode": "standalone", "generation": state.live.state().generation()})),
    }
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
        Some(v) => v.parse::<u64>().ok().filter(|&ms| ms <= 3_600_000).ok_or_else(|| {
            ApiError::bad("timeout_ms", format!("timeout_ms must be a number of milliseconds up to 3600000, got {v:?}"))
        })?,
    };
    match pool.drain(&id, Duration::from_millis(timeout_ms)).await {
        Drained::Unknown => Err(ApiError::not_found("id", format!("pool `{name}` has no endpoint `{id}`"))),
        Drained::Idle => Ok(Json(json!({"endpoint": id, "drained": true, "in_flight": 0}))),
        Drained::TimedOut { in_flight } => Ok(Json(json!({"endpoint": id, "drained": false, "in_flight": in_flight}))),
    }
}

async fn undrain(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let pool = state.pool(&name)?;
    match pool.undrain(&id) {
        None => Err(ApiError::not_found("id", format!("pool `{name}` has no endpoint `{id}`"))),
        Some(was) => Ok(Json(json!({"endpoint": id, "draining": false, "was_draining": was}))),
    }
}

/// An autoscaled pool's last decision as JSON (the dashboard's and KEDA's view).
pub(crate) fn scale_json(pool: &PoolRuntime) -> Option<Value> {
    let s = pool.safety().stats.scale()?;
    let forecast = s.forecast.map(|f| {
        json!({
            "rate_now": f.rate_now,
            "rate_ahead": f.rate_ahead,
            "lead_seconds": f.lead.as_secs_f64(),
            "replicas": f.replicas,
        })
    });
    Some(json!({
        "pool": pool.name(),
        "autoscaled": true,
        "actuator": s.actuator,
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "replicas": s.replicas,
        "desired_replicas": s.desired,
        "reason": s.reason,
        "forecast": forecast,
    }))
}

async fn scale(State(state): State<AdminState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pool(&name)?;
    if let Some(status) = scale_json(&pool) {
        return Ok(Json(status));
    }
    if pool.config().autoscale.is_none() {
        let message = format!(
            "pool `{name}` is not autoscaled: add [pool.{name}.autoscale] (with actuator = {{ kind = \"external\" }} for KEDA)"
        );
        return Err(ApiError::not_found("pool", message));
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "pool",
        format!("pool `{name}`'s autoscaler has not decided yet"),
    ))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready as soon as the configuration runs: a load balancer whose backends are all down still
/// answers (503 with a reason), which beats a refused connection, so readiness does not follow
/// the backends' health.
async fn readyz(State(state): State<AdminState>) -> Json<Value> {
    let now = fulcrum_proxy::clock::now();
    let pools: serde_json::Map<String, Value> = state
        .live
        .pools()
        .iter()
        .map(|p| {
            let snapshot = p.snapshot();
            let endpoints = snapshot.selector.endpoints();
            let available = endpoints.iter().filter(|e| e.signals().is_available(now)).count();
            (p.name().to_owned(), json!({"endpoints": endpoints.len(), "available": available}))
        })
        .collect();
    Json(json!({"status": "ready", "generation": state.live.state().generation(), "pools": pools}))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::render_with(
            &state.live.pools(),
            &state.discovery.as_ref().map(|d| d.status().snapshot()).unwrap_or_default(),
            state.mesh.as_ref().map(Mesh::status).as_ref(),
            state.live.batches().map(|b| b.stats()).as_ref(),
        ),
    )
        .into_response()
}
