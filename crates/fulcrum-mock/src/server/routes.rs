//! Request routing and the handlers, generic over the request body so that unit tests can call
//! [`handle`] without sockets.

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::body::{MockBody, TokenStream};
use super::embed;
use super::state::{CrashReason, InFlight, Refusal, RunState, Shared, lock};
use crate::api::{
    ApiError, ChatRequest, ChunkWriter, CompletionRequest, Endpoint, PromptRef, ResponseMeta, Usage, render_chat,
};
use crate::engine::{Prompt, RequestSpec};
use crate::faults::{Decision, Faults, FaultsPatch};
use crate::metrics;
use crate::tokens::{prompt_from_ids, token_text};

/// The connection is closed without an answer (hang ended by shutdown, crash).
#[derive(Debug, thiserror::Error)]
#[error("closed without an answer")]
pub struct Closed;

/// What a handler gives back when it does not answer normally.
enum Stop {
    Answer(ApiError),
    Close,
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Answer(e)
    }
}

const ROUTES: [&str; 8] = [
    "/health",
    "/load",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/admin/faults",
];

/// Answers one request.
pub(crate) async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Result<Response<MockBody>, Closed>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let admin = shared.config.server.admin;
    let result = match (&method, path.as_str()) {
        (&Method::GET, "/health") => Ok(health(&shared)),
        (&Method::GET, "/load") => Ok(load(&shared)),
        (&Method::GET, "/metrics") => Ok(metrics_page(&shared)),
        (&Method::GET, "/v1/models") => Ok(models(&shared)),
        (&Method::POST, "/v1/chat/completions") => generate(&shared, req, Endpoint::Chat).await,
        (&Method::POST, "/v1/completions") => generate(&shared, req, Endpoint::Completion).await,
        (&Method::POST, "/v1/embeddings") => embeddings(&shared, req).await,
        (m, "/admin/faults") if admin => admin_faults(&shared, m, req).await,
        (m, p) if ROUTES.contains(&p) && (p != "/admin/faults" || admin) => {
            Err(Stop::Answer(ApiError::method_not_allowed(m.as_str(), p)))
        }
        (_, p) => Err(Stop::Answer(ApiError::not_found(p))),
    };
    match result {
        Ok(response) => Ok(response),
        Err(Stop::Answer(e)) => Ok(error_response(&e)),
        Err(Stop::Close) => Err(Closed),
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(e.body()));
    *r.status_mut() = e.status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Reads a body of at most `max_body_bytes` within `read_timeout`.
async fn read_body<B>(shared: &Shared, req: Request<B>) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let limit = shared.config.server.max_body_bytes;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let limited = Limited::new(req.into_body(), usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(shared.config.server.read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::timeout()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(limit)),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("Could not read the request body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

/// Applies the faults to one inference request: `Ok` to serve it (after any added delay).
async fn pass_faults(shared: &Shared) -> Result<(), Stop> {
    let decision = lock(&shared.faults).decide(tokio::time::Instant::now());
    match decision {
        Decision::WarmingUp => Err(ApiError::unavailable("warming_up", "The server is warming up.").into()),
        Decision::Crash(n) => {
            shared.crash(CrashReason::AfterRequests(n));
            Err(Stop::Close)
        }
        Decision::Error => Err(ApiError::injected().into()),
        Decision::Hang => {
            let mut state = shared.state.subscribe();
            super::state::wait_until(&mut state, |s| *s != RunState::Running).await;
            Err(Stop::Close)
        }
        Decision::Serve(delay) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(())
        }
    }
}

/// Submits a prompt; maps refusals to answers.
fn submit(shared: &Arc<Shared>, spec: RequestSpec, adapter: Option<usize>) -> Result<super::state::Ticket, ApiError> {
    let max_waiting = lock(&shared.faults).faults().max_waiting;
    shared.submit(spec, adapter, max_waiting).map_err(|r| match r {
        Refusal::QueueFull(n) => {
            ApiError::unavailable("queue_full", format!("Too many requests waiting ({n}); try again later."))
        }
        Refusal::Engine(e) => ApiError::bad_request(e.to_string()),
    })
}

fn request_seed(shared: &Shared, number: u64, seed: Option<i64>) -> u64 {
    match seed {
        Some(s) => s as u64,
        None => fulcrum_core::hash::mix(shared.config.seed, number),
    }
}

/// The parts of a chat or completion request the mock uses.
struct Generation {
    model: String,
    text: Option<String>,
    ids: Option<Vec<u32>>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u32>,
    seed: Option<i64>,
    n: Option<u32>,
    priority: i32,
}

impl Generation {
    fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Generation, ApiError> {
        match endpoint {
            Endpoint::Chat => {
                let r: ChatRequest = parse(bytes)?;
                if r.messages.is_empty() {
                    return Err(ApiError::bad_request("`messages` must not be empty."));
                }
                Ok(Generation {
                    text: Some(render_chat(&r.messages)),
                    ids: None,
                    stream: r.stream.unwrap_or(false),
                    include_usage: r.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
                    max_tokens: r.max_completion_tokens.or(r.max_tokens),
                    seed: r.seed,
                    n: r.n,
                    priority: r.priority.unwrap_or(0),
                    model: r.model,
                })
            }
            Endpoint::Completion => {
                let r: CompletionRequest = parse(bytes)?;
                let items = r.prompt.items();
                let [item] = items.as_slice() else {
                    return Err(ApiError::bad_request("Exactly one prompt per request is supported."));
                };
                let (text, ids) = match *item {
                    PromptRef::Text(t) => (Some(t.to_owned()), None),
                    PromptRef::Ids(ids) => (None, Some(ids.to_vec())),
                };
                Ok(Generation {
                    text,
                    ids,
                    stream: r.stream.unwrap_or(false),
                    include_usage: r.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
                    max_tokens: r.max_tokens,
                    seed: r.seed,
                    n: r.n,
                    priority: r.priority.unwrap_or(0),
                    model: r.model,
                })
            }
        }
    }
}

/// `/v1/chat/completions` and `/v1/completions`.
async fn generate<B>(shared: &Arc<Shared>, req: Request<B>, endpoint: Endpoint) -> Result<Response<MockBody>, Stop>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let in_flight = InFlight::new(shared);
    let bytes = read_body(shared, req).await?;
    let Generation { model, text, ids, stream, include_usage, max_tokens, seed, n, priority } =
        Generation::parse(endpoint, &bytes)?;
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("Only `n = 1` is supported.").into());
    }
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("`max_tokens` must be at least 1.").into());
    }
    let model_ref = shared.resolve(&model).ok_or_else(|| ApiError::model_not_found(&model))?;
    let block_size = shared.config.engine.block_size;
    let prompt = match (text, ids) {
        (Some(text), _) => shared.config.tokenizer.prompt(&text, block_size, model_ref.root),
        (None, Some(ids)) => prompt_from_ids(&ids, block_size, model_ref.root),
        (None, None) => Prompt::default(),
    };
    pass_faults(shared).await?;
    let number = shared.request_numbers.fetch_add(1, Ordering::Relaxed);
    let seed = request_seed(shared, number, seed);
    let prompt_tokens = prompt.tokens;
    let ticket = submit(shared, RequestSpec { prompt, max_tokens, seed, priority }, model_ref.adapter)?;
    let meta = ResponseMeta { endpoint, number, created: shared.created_unix, model };
    if stream {
        let body = TokenStream::new(ticket, ChunkWriter::new(&meta), seed, prompt_tokens, include_usage, in_flight);
        let mut r = Response::new(MockBody::Stream(Box::new(body)));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }
    let done = ticket.finished().await;
    let text: String = (0..done.tokens).map(|i| token_text(seed, i)).collect();
    let usage = Usage { prompt_tokens, completion_tokens: done.tokens, cached_tokens: done.cached_tokens };
    let reason = done.finished.unwrap_or(crate::engine::FinishReason::Stop);
    let mut r = Response::new(MockBody::full(meta.full_response(&text, reason, usage)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// `/v1/embeddings`: each input is a prefill-only sequence; vectors are seeded by the text.
async fn embeddings<B>(shared: &Arc<Shared>, req: Request<B>) -> Result<Response<MockBody>, Stop>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let _in_flight = InFlight::new(shared);
    let bytes = read_body(shared, req).await?;
    let r: crate::api::EmbeddingRequest = parse(&bytes)?;
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad_request(format!("Unknown encoding_format {other:?}.")).into()),
    };
    let model_ref = shared.resolve(&r.model).ok_or_else(|| ApiError::model_not_found(&r.model))?;
    let items = r.input.items();
    let dim = shared.config.server.embedding_dim;
    embed::check_size(items.len(), dim)?;
    pass_faults(shared).await?;
    let block_size = shared.config.engine.block_size;
    let mut tickets = Vec::with_capacity(items.len());
    let mut vectors = Vec::with_capacity(items.len());
    let mut total_tokens = 0u64;
    for item in &items {
        let prompt = match *item {
            PromptRef::Text(t) => shared.config.tokenizer.prompt(t, block_size, model_ref.root),
            PromptRef::Ids(ids) => prompt_from_ids(ids, block_size, model_ref.root),
        };
        total_tokens += u64::from(prompt.tokens);
        vectors.push(embed::vector(item, dim, base64));
        let spec = RequestSpec { prompt, max_tokens: Some(0), seed: 0, priority: 0 };
        tickets.push(submit(shared, spec, model_ref.adapter)?);
    }
    for ticket in &tickets {
        ticket.finished().await;
    }
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| json!({"object": "embedding", "index": index, "embedding": embedding}))
        .collect();
    let body = json!({
        "object": "list", "data": data, "model": r.model,
        "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens},
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn health(shared: &Shared) -> Response<MockBody> {
    let now = tokio::time::Instant::now();
    let (ready, ready_in) = {
        let faults = lock(&shared.faults);
        (faults.ready(now), faults.ready_at().saturating_duration_since(now))
    };
    match shared.run_state() {
        RunState::Running if ready => json_response(StatusCode::OK, &json!({"status": "ok"})),
        RunState::Running => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "warming_up", "ready_in_ms": ready_in.as_millis() as u64}),
        ),
        _ => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "draining"})),
    }
}

/// `/load`: the engine's load as JSON, for balancers that poll it.
fn load(shared: &Shared) -> Response<MockBody> {
    let s = shared.stats();
    let c = s.counters;
    let ready = lock(&shared.faults).ready(tokio::time::Instant::now()) && shared.run_state() == RunState::Running;
    let hit_rate = if c.prefix_queries == 0 { 0.0 } else { c.prefix_hits as f64 / c.prefix_queries as f64 };
    let body = json!({
        "ready": ready,
        "running": s.running,
        "waiting": s.waiting,
        "max_num_seqs": shared.config.engine.max_num_seqs,
        "kv_cache_usage": s.kv_usage,
        "kv_blocks_used": s.kv_blocks_used,
        "num_gpu_blocks": s.num_gpu_blocks,
        "prefix_cache_hit_rate": hit_rate,
        "in_flight": shared.in_flight.load(Ordering::Relaxed),
    });
    json_response(StatusCode::OK, &body)
}

fn metrics_page(shared: &Shared) -> Response<MockBody> {
    let (snap, latency) = shared.snapshot();
    let text = metrics::render(shared.config.server.metrics_flavor, &shared.config.models[0], &snap, &latency);
    let mut r = Response::new(MockBody::full(text));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

fn models(shared: &Shared) -> Response<MockBody> {
    let cfg = &shared.config;
    let base = &cfg.models[0];
    let card = |id: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": shared.created_unix, "owned_by": "fulcrum-mock",
               "root": parent.unwrap_or(base), "parent": parent, "max_model_len": cfg.engine.max_model_len})
    };
    let data: Vec<Value> =
        cfg.models.iter().map(|m| card(m, None)).chain(cfg.loras.iter().map(|l| card(l, Some(base)))).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `/admin/faults`: GET shows the faults, POST or PATCH changes some, DELETE clears them all.
async fn admin_faults<B>(shared: &Arc<Shared>, method: &Method, req: Request<B>) -> Result<Response<MockBody>, Stop>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let now = tokio::time::Instant::now();
    match *method {
        Method::GET => {}
        Method::POST | Method::PATCH => {
            let bytes = read_body(shared, req).await?;
            let patch: FaultsPatch = parse(&bytes)?;
            let current = lock(&shared.faults).faults().clone();
            let faults = patch.apply(&current).map_err(|e| ApiError::bad_request(e.to_string()))?;
            shared.set_faults(faults, now);
        }
        Method::DELETE => {
            shared.set_faults(Faults::default(), now);
        }
        _ => return Err(ApiError::method_not_allowed(method.as_str(), "/admin/faults").into()),
    }
    Ok(json_response(StatusCode::OK, &admin_view(shared, now)))
}

fn admin_view(shared: &Shared, now: tokio::time::Instant) -> Value {
    let state = lock(&shared.faults);
    let mut v = serde_json::to_value(state.faults().to_patch()).unwrap_or_default();
    if let Value::Object(map) = &mut v {
        map.insert("requests_seen".into(), json!(state.requests()));
        map.insert("ready".into(), json!(state.ready(now)));
        let crash_in = state.crash_at().map(|at| at.saturating_duration_since(now).as_secs_f64());
        map.insert("crash_in_secs".into(), json!(crash_in));
    }
    v
}
