//! The OpenAI Batch API, served on HTTP listeners when `[batch]` is configured:
//!
//! | call | does |
//! |---|---|
//! | `POST /v1/files` | uploads a file (multipart: `file`, `purpose=batch`) |
//! | `GET /v1/files/{id}` | the file's description |
//! | `GET /v1/files/{id}/content` | its bytes |
//! | `DELETE /v1/files/{id}` | deletes it |
//! | `POST /v1/batches` | creates a batch (`input_file_id`, `endpoint`, `completion_window`, `metadata`) |
//! | `GET /v1/batches/{id}` | the batch, with live counts |
//! | `GET /v1/batches?limit=&after=` | batches, newest first |
//! | `POST /v1/batches/{id}/cancel` | cancels it |
//!
//! Errors have OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`). A batch's
//! constraints are in its metadata, under `fulcrum_require` (see
//! [`fulcrum_core::constraint`]); a batch no endpoint can run is refused at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use fulcrum_batch::input::{self, LineError, Mode};
use fulcrum_batch::object::{Batch, Errors, Status, window_secs};
use fulcrum_batch::store::StoreError;
use fulcrum_core::constraint::Requirements;
use http::{Method, Request, StatusCode, header};
use http_body_util::{Either, Full};
use serde_json::{Value, json};

use super::{Batches, Spec, blocking, unix_now};
use crate::http::{ListenerCtx, RespBody};
use crate::route::Matched;

/// The metadata key of a batch's constraints.
pub const REQUIRE_KEY: &str = "fulcrum_require";

/// A refused call: its status and OpenAI-shaped error.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's error code.
    pub code: &'static str,
    /// The field at fault.
    pub param: Option<&'static str>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Refused {
    fn new(status: StatusCode, code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Self {
        Refused { status, code, param, message: message.into() }
    }

    fn bad(code: &'static str, param: &'static str, message: impl Into<String>) -> Self {
        Refused::new(StatusCode::BAD_REQUEST, code, Some(param), message)
    }

    fn not_found(what: &str, id: &str) -> Self {
        Refused::new(StatusCode::NOT_FOUND, "not_found", None, format!("no {what} with id `{id}`"))
    }

    /// The store failed: 503 when that may pass (its server does not answer), else 500.
    pub(crate) fn store(e: StoreError) -> Self {
        tracing::error!(error = %e, "batch store failed");
        let status = if e.is_transient() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
        Refused::new(status, "server_error", None, e.to_string())
    }

    fn response(&self) -> Response {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}});
        json_response(self.status, &body)
    }
}

type Response = http::Response<RespBody>;

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = http::Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

/// Whether a path is the Batch API's.
pub(crate) fn is_batch_path(path: &str) -> bool {
    ["/v1/files", "/v1/batches"]
        .iter()
        .any(|p| path.strip_prefix(p).is_some_and(|r| r.is_empty() || r.starts_with('/')))
}

/// What a call answers: JSON, or a file's bytes.
enum Reply {
    Json(Value),
    Bytes(Vec<u8>),
}

impl From<Value> for Reply {
    fn from(v: Value) -> Self {
        Reply::Json(v)
    }
}

async fn route(
    batches: &Arc<Batches>,
    ctx: &ListenerCtx,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<Reply, Refused> {
    let path = parts.uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let store = batches.store();
    match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["v1", "files"]) => {
            let (filename, purpose, content) = multipart(parts, body).await?;
            let limit = batches.config().max_file_bytes;
            if content.len() > limit {
                return Err(Refused::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "file_too_large",
                    Some("file"),
                    format!(
                        "the file has {} bytes, more than the limit of {limit} ([batch] max_file_bytes)",
                        content.len()
                    ),
                ));
            }
            if purpose != "batch" {
                return Err(Refused::bad(
                    "invalid_value",
                    "purpose",
                    format!("purpose `{purpose}` is not supported; use `batch`"),
                ));
            }
            let file = blocking(store, move |s| s.put_file(&purpose, &filename, &content, unix_now()))
                .await
                .map_err(Refused::store)?;
            Ok(to_json(&file))
        }
        (&Method::GET, ["v1", "files", id]) => {
            let key = (*id).to_owned();
            match blocking(store, move |s| s.file(&key)).await.map_err(Refused::store)? {
                Some(f) => Ok(to_json(&f)),
                None => Err(Refused::not_found("file", id)),
            }
        }
        (&Method::GET, ["v1", "files", id, "content"]) => {
            let key = (*id).to_owned();
            match blocking(store, move |s| s.file_content(&key)).await.map_err(Refused::store)? {
                Some(bytes) => Ok(Reply::Bytes(bytes)),
                None => Err(Refused::not_found("file", id)),
            }
        }
        (&Method::DELETE, ["v1", "files", id]) => {
            let key = (*id).to_owned();
            if blocking(store, move |s| s.delete_file(&key)).await.map_err(Refused::store)? {
                Ok(json!({"id": id, "object": "file", "deleted": true}).into())
            } else {
                Err(Refused::not_found("file", id))
            }
        }
        (&Method::POST, ["v1", "batches"]) => {
            let b = create_from_json(batches, ctx, parts, &body).await?;
            Ok(to_json(&b))
        }
        (&Method::GET, ["v1", "files"]) => {
            // OpenAI's defaults: up to 10,000, newest first.
            let q = Listing::read(parts, 10_000, 10_000)?;
            let (page, more) =
                blocking(store, move |s| s.list_files(q.purpose.as_deref(), q.after.as_deref(), q.limit, q.ascending))
                    .await
                    .map_err(Refused::store)?;
            Ok(list_reply(&page, |f| &f.id, more))
        }
        (&Method::GET, ["v1", "batches"]) => {
            let q = Listing::read(parts, 20, 100)?;
            if q.ascending || q.purpose.is_some() {
                let param = if q.ascending { "order" } else { "purpose" };
                return Err(Refused::bad("invalid_value", param, "batches list newest first, of every kind"));
            }
            let (page, more) =
                blocking(store, move |s| s.list_batches(q.after.as_deref(), q.limit)).await.map_err(Refused::store)?;
            Ok(list_reply(&page, |b| &b.id, more))
        }
        (&Method::GET, ["v1", "batches", id]) => match batches.get(id).await.map_err(Refused::store)? {
            Some(b) => Ok(to_json(&b)),
            None => Err(Refused::not_found("batch", id)),
        },
        (&Method::POST, ["v1", "batches", id, "cancel"]) => match batches.cancel(id).await.map_err(Refused::store)? {
            Some(b) => Ok(to_json(&b)),
            None => Err(Refused::not_found("batch", id)),
        },
        _ => Err(Refused::new(
            StatusCode::NOT_FOUND,
            "unknown_url",
            None,
            format!("{} {} is not a Batch API call", parts.method, parts.uri.path()),
        )),
    }
}

/// A listing's query: `limit` (from 1 to the listing's maximum; by default 20 batches or
/// 10,000 files, as OpenAI's), `after` (a cursor), `order` (`asc` or `desc`), `purpose`.
struct Listing {
    limit: usize,
    after: Option<String>,
    ascending: bool,
    purpose: Option<String>,
}

impl Listing {
    fn read(parts: &http::request::Parts, default: usize, max: usize) -> Result<Listing, Refused> {
        let mut q = Listing { limit: default, after: None, ascending: false, purpose: None };
        for (k, v) in parts.uri.query().unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')) {
            match k {
                "limit" => {
                    q.limit = v.parse().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                        Refused::bad("invalid_value", "limit", format!("limit must be from 1 to {max}, got `{v}`"))
                    })?;
                }
                "after" => q.after = Some(v.to_owned()),
                "order" => {
                    q.ascending = match v {
                        "asc" => true,
                        "desc" => false,
                        _ => {
                            return Err(Refused::bad(
                                "invalid_value",
                                "order",
                                format!("order must be asc or desc, got `{v}`"),
                            ));
                        }
                    }
                }
                "purpose" => q.purpose = Some(v.to_owned()),
                _ => {}
            }
        }
        Ok(q)
    }
}

/// OpenAI's list object.
fn list_reply<T: serde::Serialize>(page: &[T], id: impl Fn(&T) -> &String, more: bool) -> Reply {
    let data: Vec<Value> = page.iter().map(value).collect();
    Reply::Json(json!({
        "object": "list",
        "first_id": page.first().map(&id),
        "last_id": page.last().map(&id),
        "has_more": more,
        "data": data,
    }))
}

fn value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn to_json<T: serde::Serialize>(v: &T) -> Reply {
    Reply::Json(value(v))
}

/// Serves a call, answering file contents as bytes (`application/octet-stream`).
pub(crate) async fn respond(
    batches: &Arc<Batches>,
    ctx: &ListenerCtx,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response {
    match route(batches, ctx, parts, body).await {
        Ok(Reply::Json(v)) => json_response(StatusCode::OK, &v),
        Ok(Reply::Bytes(bytes)) => {
            let mut resp = http::Response::new(Either::Right(Full::new(Bytes::from(bytes))));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
            resp
        }
        Err(r) => r.response(),
    }
}

/// The `file` and `purpose` fields of a multipart upload.
async fn multipart(parts: &http::request::Parts, body: Bytes) -> Result<(String, String, Vec<u8>), Refused> {
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        Refused::bad("invalid_request", "file", "an upload is multipart/form-data with `file` and `purpose` fields")
    })?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut file, mut purpose) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(Refused::bad("invalid_request", "file", format!("bad multipart body: {e}"))),
        };
        let name = field.name().unwrap_or("").to_owned();
        let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| Refused::bad("invalid_request", "file", format!("bad multipart body: {e}")))?;
        match name.as_str() {
            "file" => file = Some((filename, bytes.to_vec())),
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_owned()),
            _ => {}
        }
    }
    let (filename, content) =
        file.ok_or_else(|| Refused::bad("missing_required_parameter", "file", "the upload has no `file` field"))?;
    let purpose = purpose
        .ok_or_else(|| Refused::bad("missing_required_parameter", "purpose", "the upload has no `purpose` field"))?;
    Ok((filename, purpose, content))
}

async fn create_from_json(
    batches: &Arc<Batches>,
    ctx: &ListenerCtx,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<Batch, Refused> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Refused::bad("invalid_request", "body", format!("the body is not JSON: {e}")))?;
    let string = |name: &'static str| -> Result<String, Refused> {
        match v.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Refused::bad("invalid_value", name, format!("`{name}` must be a string"))),
            None => Err(Refused::bad("missing_required_parameter", name, format!("`{name}` is missing"))),
        }
    };
    let input_file_id = string("input_file_id")?;
    let endpoint = string("endpoint")?;
    let window = string("completion_window")?;
    if !input::OPENAI_ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(Refused::bad(
            "invalid_value",
            "endpoint",
            format!("endpoint `{endpoint}` is not supported; use one of {}", input::OPENAI_ENDPOINTS.join(", ")),
        ));
    }
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(Refused::bad("invalid_value", "metadata", "metadata has at most 16 keys"));
            }
            let mut out = BTreeMap::new();
            for (k, v) in m {
                match v {
                    Value::String(s) if k.len() <= 64 && s.len() <= 512 => {
                        out.insert(k.clone(), s.clone());
                    }
                    _ => {
                        return Err(Refused::bad(
                            "invalid_value",
                            "metadata",
                            format!("metadata `{k}`: keys are at most 64 characters, values strings of at most 512"),
                        ));
                    }
                }
            }
            Some(out)
        }
        Some(_) => return Err(Refused::bad("invalid_value", "metadata", "metadata must be an object of strings")),
    };
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
    let require = metadata.as_ref().and_then(|m| m.get(REQUIRE_KEY)).cloned();
    let spec = Spec { listener: Some(ctx.name.clone()), host, require, pool: None };
    let mode = Mode::OpenAi { endpoint: &endpoint };
    batches.create(input_file_id, endpoint.clone(), window, metadata, spec, mode, Some(ctx)).await
}

impl Batches {
    /// Checks a batch and stores it: a file whose lines fail makes a `failed` batch with
    /// every line's error (as OpenAI does); constraints no endpoint meets refuse it at once.
    /// A good batch starts `in_progress`.
    #[allow(clippy::too_many_arguments)] // the API call's fields, and where its requests go
    pub(crate) async fn create(
        self: &Arc<Self>,
        input_file_id: String,
        endpoint: String,
        window: String,
        metadata: Option<BTreeMap<String, String>>,
        spec: Spec,
        mode: Mode<'_>,
        ctx: Option<&ListenerCtx>,
    ) -> Result<Batch, Refused> {
        let window_secs = window_secs(&window).map_err(|m| Refused::bad("invalid_value", "completion_window", m))?;
        let require = match &spec.require {
            Some(r) => {
                Some(Requirements::parse(r).map_err(|e| Refused::bad("invalid_value", "metadata", e.to_string()))?)
            }
            None => None,
        };
        let key = input_file_id.clone();
        let (file, content) = blocking(self.store(), move |s| Ok((s.file(&key)?, s.file_content(&key)?)))
            .await
            .map_err(Refused::store)?;
        let (Some(file), Some(content)) = (file, content) else {
            return Err(Refused::not_found("file", &input_file_id));
        };
        if file.purpose != "batch" {
            return Err(Refused::bad(
                "invalid_value",
                "input_file_id",
                format!("file `{}` has purpose `{}`, not `batch`", file.id, file.purpose),
            ));
        }
        let limits = input::Limits { max_requests: self.config.max_requests, ..input::Limits::default() };
        let parsed = input::parse(&content, mode, &limits);
        let mut errors = parsed.errors;

        // Where each request goes.
        let live = self.live().ok_or_else(|| {
            Refused::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "the proxy is stopping")
        })?;
        let mut items = Vec::with_capacity(parsed.tasks.len());
        for task in parsed.tasks {
            let pool = match (&spec.pool, ctx) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(ctx)) => {
                    let mut req = Request::builder().method(task.method.as_str()).uri(task.url.as_str());
                    if let Some(h) = &spec.host {
                        req = req.header(header::HOST, h);
                    }
                    for (k, v) in &task.headers {
                        req = req.header(k, v);
                    }
                    match req.body(()) {
                        Ok(r) => match ctx.routes.find(&r.into_parts().0, true, task.model()) {
                            Matched::Pool(p, ..) => Some(p.name().to_owned()),
                            _ => None,
                        },
                        Err(_) => None,
                    }
                }
                (None, None) => None,
            };
            match pool {
                Some(pool) => items.push((task, pool)),
                None => errors.push(LineError {
                    code: "no_route".into(),
                    message: format!(
                        "no route of listener `{}` takes {} {}",
                        spec.listener.as_deref().unwrap_or("-"),
                        task.method,
                        task.url
                    ),
                    param: Some("url".into()),
                    line: Some(task.line),
                }),
            }
        }

        // Constraints: each pool used must have an endpoint meeting each request's.
        let state = live.state();
        let mut checked: HashSet<(&str, Option<&str>)> = HashSet::new();
        for (task, pool) in &items {
            if require.is_none() && task.require.is_none() {
                continue;
            }
            if !checked.insert((pool.as_str(), task.require.as_deref())) {
                continue;
            }
            let Some(runtime) = state.pools().get(pool) else {
                return Err(Refused::bad("invalid_value", "pool", format!("no pool is named `{pool}`")));
            };
            let mut all = require.clone().unwrap_or_default();
            if let Some(r) = &task.require {
                all = all.and(&Requirements::parse(r).unwrap_or_default());
            }
            let snapshot = runtime.snapshot();
            if let Some(why) = all.unmet(snapshot.selector.endpoints().iter().map(|e| e.labels())) {
                return Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    "unsatisfiable_constraint",
                    Some("metadata"),
                    format!("pool `{pool}` cannot run this batch: {why} (line {} requires {all})", task.line),
                ));
            }
        }

        let now = unix_now();
        let id = blocking(self.store(), |s| s.new_id("batch_")).await.map_err(Refused::store)?;
        let mut batch = Batch::new(id, endpoint, input_file_id, window, metadata, now, window_secs);
        let spec_text = serde_json::to_string(&spec).unwrap_or_default();
        if !errors.is_empty() || parsed.more_errors > 0 {
            errors.sort_by_key(|e| e.line);
            errors.truncate(input::MAX_REPORTED_ERRORS);
            batch.errors = Some(Errors { object: "list".into(), data: errors });
            batch.set_status(Status::Failed, now);
            let b = batch.clone();
            blocking(self.store(), move |s| s.create_batch(&b, &spec_text, &[])).await.map_err(Refused::store)?;
            return Ok(batch);
        }
        batch.request_counts.total = items.len() as u64;
        batch.set_status(Status::InProgress, now);
        // A shared store: claimed before other proxies can see it, so it runs here.
        let claimed = match self.ownership.get() {
            Some(owner) => owner.claim(&batch.id).await,
            None => true,
        };
        let b = batch.clone();
        if let Err(e) = blocking(self.store(), move |s| s.create_batch(&b, &spec_text, &items)).await {
            if let (true, Some(owner)) = (claimed, self.ownership.get()) {
                owner.release(&batch.id).await;
            }
            return Err(Refused::store(e));
        }
        tracing::info!(batch = %batch.id, requests = batch.request_counts.total, "batch created");
        if claimed {
            self.start(&batch.id);
        } else {
            tracing::warn!(batch = %batch.id, "batch created but not claimed here: a proxy of the mesh claims it once etcd answers");
        }
        Ok(batch)
    }
}
