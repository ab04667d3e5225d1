//! The registration calls of the admin API, as an axum router to merge into it.
//!
//! | call | what it does |
//! | --- | --- |
//! | `POST /pools/{pool}/registrations` | register (or register again): `201` new, `200` replaced |
//! | `PUT /pools/{pool}/registrations/{id}` | heartbeat: restarts the lease's TTL; `404` once expired |
//! | `DELETE /pools/{pool}/registrations/{id}` | leave now: `204` |
//! | `GET /pools/{pool}/registrations` | the live registrations |
//!
//! A registration's body is an endpoint as in a pool's `endpoints` list, plus its TTL:
//!
//! ```json
//! {"address": "10.0.0.7:8000", "id": "gpu-7", "weight": 2, "models": ["llama-3-8b"],
//!  "labels": {"zone": "a"}, "ttl_ms": 10000}
//! ```
//!
//! Only `address` is required; `ttl_ms` defaults to the pool's `ttl` and must lie within its
//! `min_ttl` and `max_ttl`. The answer is `{"pool", "id", "ttl_ms", "created"}`: heartbeat
//! `PUT .../registrations/{id}` at least once per TTL (every TTL/3 is a good rhythm). Errors
//! are JSON, `{"error": {"message", "field"}}`: `400` for a bad body (the field at fault),
//! `404` for a pool that takes no registrations or an unknown or expired id, `409` when the
//! pool is full, `413` for a body over 64 KiB.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use fulcrum_config::discovery::EndpointEntry;
use fulcrum_core::membership::MembershipError;
use serde::Deserialize;
use serde_json::json;

use super::{Registry, RegistryError, millis};

/// The largest registration body accepted.
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// A registration, as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    address: SocketAddr,
    id: Option<String>,
    weight: Option<NonZeroU32>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ttl_ms: Option<u64>,
}

/// An error answered as JSON, `{"error": {"message", "field"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    field: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, field: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, field, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"message": self.message, "field": self.field}}))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::UnknownPool(_) => ApiError::new(StatusCode::NOT_FOUND, "pool", message),
            RegistryError::Membership(MembershipError::Unknown(_)) => {
                ApiError::new(StatusCode::NOT_FOUND, "id", message)
            }
            RegistryError::Membership(MembershipError::TtlOutOfRange { .. }) => {
                ApiError::new(StatusCode::BAD_REQUEST, "ttl_ms", message)
            }
            RegistryError::Membership(MembershipError::Full { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "pool", message)
            }
            RegistryError::Membership(MembershipError::BadLimits(_)) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "pool", message)
            }
        }
    }
}

/// The registration routes over `registry`, to `.merge()` into the admin API.
pub fn registration_router(registry: Registry) -> Router {
    Router::new()
        .route("/pools/{pool}/registrations", get(list).post(register))
        .route("/pools/{pool}/registrations/{id}", put(heartbeat).delete(deregister))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(registry)
}

/// The field a serde error is about, when its message names one.
fn field_of(message: &str) -> &'static str {
    const FIELDS: [&str; 6] = ["address", "id", "weight", "models", "labels", "ttl_ms"];
    if message.starts_with("unknown field") {
        return "body";
    }
    FIELDS.into_iter().find(|f| message.contains(&format!("`{f}`"))).unwrap_or("body")
}

async fn register(
    State(registry): State<Registry>,
    Path(pool): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), "body", e.body_text()))?;
    let body: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        let message = e.to_string();
        ApiError::new(StatusCode::BAD_REQUEST, field_of(&message), format!("invalid registration: {message}"))
    })?;
    let entry = EndpointEntry {
        address: body.address,
        weight: body.weight,
        id: body.id,
        models: body.models,
        labels: body.labels,
    };
    let spec = entry.into_spec().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.field, e.message))?;
    let ttl = body.ttl_ms.map(Duration::from_millis);
    let registered = registry.register(&pool, spec, ttl)?;
    let status = if registered.created { StatusCode::CREATED } else { StatusCode::OK };
    let answer = json!({
        "pool": pool,
        "id": registered.id.as_str(),
        "ttl_ms": millis(registered.ttl),
        "created": registered.created,
    });
    Ok((status, Json(answer)).into_response())
}

async fn heartbeat(
    State(registry): State<Registry>,
    Path((pool, id)): Path<(String, String)>,
) -> Result<Json<super::LeaseView>, ApiError> {
    Ok(Json(registry.renew(&pool, &id)?))
}

async fn deregister(
    State(registry): State<Registry>,
    Path((pool, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    registry.remove(&pool, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list(State(registry): State<Registry>, Path(pool): Path<String>) -> Result<Response, ApiError> {
    let registrations = registry.list(&pool)?;
    Ok(Json(json!({ "pool": pool, "registrations": registrations })).into_response())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use fulcrum_core::membership::LeaseLimits;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder().method(method).uri(uri).body(Body::from(body.to_owned())).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn app() -> Router {
        let registry = Registry::new();
        registry.enable("llama", LeaseLimits::default());
        registration_router(registry)
    }

    #[tokio::test]
    async fn register_heartbeat_list_and_leave() {
        let app = app();
        let (s, v) = call(
            &app,
            "POST",
            "/pools/llama/registrations",
            r#"{"address":"127.0.0.1:9001","id":"a","weight":2,"models":["m"],"ttl_ms":5000}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(
            (v["id"].as_str(), v["ttl_ms"].as_u64(), v["created"].as_bool()),
            (Some("a"), Some(5000), Some(true))
        );
        let (s, v) = call(&app, "POST", "/pools/llama/registrations", r#"{"address":"127.0.0.1:9001","id":"a"}"#).await;
        assert_eq!((s, v["ttl_ms"].as_u64()), (StatusCode::OK, Some(10_000)));
        let (s, v) = call(&app, "PUT", "/pools/llama/registrations/a", "").await;
        assert_eq!(
            (s, v["renewals"].as_u64(), v["address"].as_str()),
            (StatusCode::OK, Some(1), Some("127.0.0.1:9001"))
        );
        let (s, v) = call(&app, "GET", "/pools/llama/registrations", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["registrations"].as_array().map(Vec::len), Some(1));
        assert_eq!(call(&app, "DELETE", "/pools/llama/registrations/a", "").await.0, StatusCode::NO_CONTENT);
        let (s, v) = call(&app, "PUT", "/pools/llama/registrations/a", "").await;
        assert_eq!((s, v["error"]["field"].as_str()), (StatusCode::NOT_FOUND, Some("id")));
    }

    #[tokio::test]
    async fn bad_calls_get_json_errors_naming_the_field() {
        let app = app();
        for (uri, body, status, field) in [
            ("/pools/nope/registrations", r#"{"address":"127.0.0.1:1"}"#, StatusCode::NOT_FOUND, "pool"),
            ("/pools/llama/registrations", r#"{"address":"localhost"}"#, StatusCode::BAD_REQUEST, "body"),
            ("/pools/llama/registrations", r#"{"id":"x"}"#, StatusCode::BAD_REQUEST, "address"),
            ("/pools/llama/registrations", r#"{"address":"127.0.0.1:1","weight":0}"#, StatusCode::BAD_REQUEST, "body"),
            (
                "/pools/llama/registrations",
                r#"{"address":"127.0.0.1:1","ttl_ms":5}"#,
                StatusCode::BAD_REQUEST,
                "ttl_ms",
            ),
            ("/pools/llama/registrations", r#"{"address":"127.0.0.1:1","id":""}"#, StatusCode::BAD_REQUEST, "id"),
            ("/pools/llama/registrations", r#"{"address":"127.0.0.1:1","port":1}"#, StatusCode::BAD_REQUEST, "body"),
            ("/pools/llama/registrations", "not json", StatusCode::BAD_REQUEST, "body"),
        ] {
            let (s, v) = call(&app, "POST", uri, body).await;
            assert_eq!(s, status, "{body}: {v}");
            assert_eq!(v["error"]["field"].as_str(), Some(field), "{body}: {v}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
        let big = format!(r#"{{"address":"127.0.0.1:1","id":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        let (s, v) = call(&app, "POST", "/pools/llama/registrations", &big).await;
        assert_eq!((s, v["error"]["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body")));
        let (s, _) = call(&app, "GET", "/pools/nope/registrations", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_full_pool_refuses_with_409() {
        let registry = Registry::new();
        registry.enable("p", LeaseLimits { max_members: 1, ..LeaseLimits::default() });
        let app = registration_router(registry);
        assert_eq!(
            call(&app, "POST", "/pools/p/registrations", r#"{"address":"127.0.0.1:1"}"#).await.0,
            StatusCode::CREATED
        );
        let (s, v) = call(&app, "POST", "/pools/p/registrations", r#"{"address":"127.0.0.1:2"}"#).await;
        assert_eq!((s, v["error"]["field"].as_str()), (StatusCode::CONFLICT, Some("pool")));
    }
}
