//! The HTTP request path: route, pick, forward, stream back; each request observed by an
//! [`Exchange`] (metrics, access log, trace).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_core::flow::slo::{self, Slo};
use fulcrum_core::flow::{Attempts, Fail, Next, RequestPlan, Ticket, Try, UnknownModel, Verdict};
use fulcrum_core::openai;
use fulcrum_core::policy::HashKey;
use fulcrum_core::resilience::Observed;
use fulcrum_core::resilience::retry::is_idempotent_method;
use fulcrum_core::{Outcome, RequestFacts};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{Source, TrackedBody};
use crate::error::ProxyError;
use crate::h1::UpstreamBody;
use crate::headers::{self, Origin, X_REQUEST_ID};
use crate::observe::{Exchange, Observe};
use crate::pool::{PoolRuntime, PoolSnapshot, sticky_token};
use crate::route::{Matched, RouteTable, model_of};
use crate::safety::AdmissionSlot;
use crate::{clock, upstream::ReqBody};

/// What the proxy sends back to clients.
pub type RespBody = Either<TrackedBody, Full<Bytes>>;

/// What a listener's requests share.
#[derive(Debug)]
pub(crate) struct ListenerCtx {
    pub(crate) name: String,
    pub(crate) routes: RouteTable,
    pub(crate) max_body_bytes: usize,
    pub(crate) body_read_timeout: std::time::Duration,
    /// Whether its clients may claim any priority class.
    pub(crate) trust_priority: bool,
    /// Access log and traces (metrics are always recorded).
    pub(crate) observe: Observe,
    /// The Batch API, when `[batch]` is configured.
    pub(crate) batch: Option<Arc<crate::batch::Batches>>,
}

/// What [`proxy`] answers: an upstream response to stream back, or a whole one.
enum Answer {
    Stream(Response<UpstreamBody>, Streaming),
    /// The answer to an upgrade the upstream refused, streamed as it comes (hyper's client).
    Refused(Response<Incoming>, Streaming),
    Whole(Response<RespBody>),
}

/// What a streamed response holds until its body ends.
struct Streaming {
    guard: fulcrum_core::InFlight,
    deadline: Option<tokio::time::Instant>,
    admission: Option<AdmissionSlot>,
}

/// Serves one request that hyper read (HTTP/2, upgrades, streamed bodies; see
/// [`h1::server`](crate::h1::server) for the others).
///
/// `origin` is what upstreams are told of the client's connection, made once per
/// connection.
pub(crate) async fn handle(
    ctx: Arc<ListenerCtx>,
    client: SocketAddr,
    origin: Arc<Origin>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (parts, incoming) = req.into_parts();
    let started = std::time::Instant::now();
    let mut req = ClientRequest { parts, body: Ok(ReqBody::Streamed(incoming)), upgrade, started };
    // Boxed: hyper moves the service's future; a small one moves cheaply.
    Ok(Box::pin(respond(&ctx, client, &origin, &mut req)).await)
}

/// A request as read from a client. [`respond`] borrows it: the caller keeps it where it was
/// made, and only what the proxy takes out of it (the body) moves.
pub(crate) struct ClientRequest {
    pub(crate) parts: http::request::Parts,
    /// The body, or why it could not be read (answered as an error).
    pub(crate) body: Result<ReqBody, ProxyError>,
    /// The client's side of an HTTP/1.1 upgrade it asked for.
    pub(crate) upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// When its head was read (the request's duration counts from it).
    pub(crate) started: std::time::Instant,
}

/// Records a request whose client left before its body was whole: no answer, 499 in the
/// metrics and the access log.
pub(crate) fn client_left(
    ctx: &ListenerCtx,
    client: SocketAddr,
    mut parts: http::request::Parts,
    started: std::time::Instant,
) {
    let request_id = headers::request_id(&mut parts.headers);
    drop(Exchange::begin(&ctx.observe, started, client, &parts.method, &parts.uri, &parts.headers, &request_id));
}

/// Serves one request; every failure (including the body's) becomes a JSON error response.
///
/// The future is large (it holds the forwarding's, unboxed): callers pin it where it is made
/// (`pin!`) or box it, rather than move it; for the same reason it borrows the request (an
/// async fn's arguments are copied into its future, and copied again as it starts).
pub(crate) async fn respond(
    ctx: &ListenerCtx,
    client: SocketAddr,
    origin: &Origin,
    req: &mut ClientRequest,
) -> Response<RespBody> {
    let started = req.started;
    if let Some(batches) = &ctx.batch
        && crate::batch::api::is_batch_path(req.parts.uri.path())
    {
        return Box::pin(batch_call(ctx, batches, client, req)).await;
    }
    let parts = &mut req.parts;
    // Room for what the proxy adds (request id, X-Forwarded-*, Host, traceparent): one growth at most.
    parts.headers.reserve(6);
    let request_id = headers::request_id(&mut parts.headers);
    let mut exchange =
        Exchange::begin(&ctx.observe, started, client, &parts.method, &parts.uri, &parts.headers, &request_id);
    // Pinned where it is made: a move of a future copies all of it.
    let answer = pin!(proxy(ctx, client, origin, req, &request_id, &mut exchange)).await;
    match answer {
        Ok(Answer::Stream(resp, s)) => streamed(resp.map(Either::Left), s, exchange),
        Ok(Answer::Refused(resp, s)) => streamed(resp.map(Either::Right), s, exchange),
        Ok(Answer::Whole(resp)) => {
            exchange.respond(resp.status());
            exchange.on_data(http_body::Body::size_hint(resp.body()).exact().unwrap_or(0) as usize);
            exchange.complete();
            resp
        }
        Err(e) => {
            if e.is_upstream() || e.status() == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(request_id = request_id.to_str().unwrap_or("-"), listener = %ctx.name, status = e.status().as_u16(), error = %e, "request failed");
            } else {
                tracing::debug!(request_id = request_id.to_str().unwrap_or("-"), listener = %ctx.name, status = e.status().as_u16(), error = %e, "request refused");
            }
            let resp = e.to_response(&request_id);
            exchange.refused(&e, http_body::Body::size_hint(resp.body()).exact().unwrap_or(0) as usize);
            resp.map(Either::Right)
        }
    }
}

/// A Batch API call (see [`batch::api`](crate::batch::api)): its body read whole, under the
/// upload limit, and answered by the proxy itself.
async fn batch_call(
    ctx: &ListenerCtx,
    batches: &Arc<crate::batch::Batches>,
    client: SocketAddr,
    req: &mut ClientRequest,
) -> Response<RespBody> {
    let parts = &mut req.parts;
    let request_id = headers::request_id(&mut parts.headers);
    let mut exchange =
        Exchange::begin(&ctx.observe, req.started, client, &parts.method, &parts.uri, &parts.headers, &request_id);
    // Multipart framing around the largest file.
    let limit = batches.config().max_file_bytes.saturating_add(64 << 10);
    let body = std::mem::replace(&mut req.body, Ok(ReqBody::Bytes(Bytes::new())));
    let timeout = ctx.body_read_timeout.max(Duration::from_secs(300));
    let body = match body {
        Ok(body) => read_body(body, parts, limit, timeout).await,
        Err(e) => Err(e),
    };
    let resp = match body {
        Ok(bytes) => crate::batch::api::respond(batches, ctx, parts, bytes).await,
        Err(e) => {
            let resp = e.to_response(&request_id);
            exchange.refused(&e, http_body::Body::size_hint(resp.body()).exact().unwrap_or(0) as usize);
            return resp.map(Either::Right);
        }
    };
    exchange.respond(resp.status());
    exchange.on_data(http_body::Body::size_hint(resp.body()).exact().unwrap_or(0) as usize);
    exchange.complete();
    resp
}

/// An upstream's response whose body streams back, observed until it ends.
fn streamed(resp: Response<Source>, s: Streaming, mut exchange: Exchange) -> Response<RespBody> {
    exchange.respond(resp.status());
    // A stream of server-sent events: its first body bytes are its first token.
    let events =
        resp.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let guard = s.guard.streaming(events);
    resp.map(|body| Either::Left(TrackedBody::new(body, guard, s.deadline, s.admission, exchange)))
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The whole body, read (bounded by `limit` and `timeout`) if it was not yet.
async fn read_body(
    body: ReqBody,
    parts: &http::request::Parts,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ProxyError> {
    let body = match body {
        ReqBody::Bytes(b) if b.len() > limit => return Err(ProxyError::BodyTooLarge { limit }),
        ReqBody::Bytes(b) => return Ok(b),
        ReqBody::Streamed(incoming) => incoming,
    };
    if content_length(parts).is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ProxyError::BodyTimeout { after_ms: timeout.as_millis() }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Ok(Err(e)) => Err(ProxyError::BadBody(e.to_string())),
    }
}

fn content_length(req: &http::request::Parts) -> Option<u64> {
    req.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn proxy(
    ctx: &ListenerCtx,
    client: SocketAddr,
    origin: &Origin,
    req: &mut ClientRequest,
    request_id: &HeaderValue,
    exchange: &mut Exchange,
) -> Result<Answer, ProxyError> {
    // The body and the upgrade are taken out; the head stays where the caller keeps it.
    let body = std::mem::replace(&mut req.body, Ok(ReqBody::Bytes(Bytes::new())))?;
    let upgrade = req.upgrade.take();
    let parts = &mut req.parts;
    headers::check_host(parts).map_err(ProxyError::BadHeader)?;
    if let Some(id) = &origin.identity {
        // For routes that match on it.
        parts.extensions.insert(id.clone());
    }

    // Route; read the body only if a route needs the model from it.
    let mut model: Option<String> = None;
    let (pool, rules, upgrades, body) = match ctx.routes.find(parts, false, None) {
        Matched::Pool(p, rules, route, upgrades) => {
            exchange.routed(route, p);
            (p.clone(), *rules, upgrades, body)
        }
        Matched::None => return Err(ProxyError::NoRoute),
        Matched::NeedBody => {
            let bytes = Box::pin(read_body(body, parts, ctx.max_body_bytes, ctx.body_read_timeout)).await?;
            model = model_of(&bytes);
            match ctx.routes.find(parts, true, model.as_deref()) {
                Matched::Pool(p, rules, route, upgrades) => {
                    exchange.routed(route, p);
                    (p.clone(), *rules, upgrades, ReqBody::Bytes(bytes))
                }
                _ => return Err(ProxyError::NoRoute),
            }
        }
    };
    // An upgrade the route does not allow (any but WebSocket by default) is not offered to
    // the upstream: the request goes as a plain one, its Upgrade header stripped. A switch
    // to `h2c` would otherwise carry later requests past routing and limits.
    let upgrade = upgrade.filter(|_| upgrades.allow(&parts.headers));

    // AI policies read the body (bounded) for the model, token estimate and prefix hashes;
    // so do inference calls on any pool and time-to-first-token budgets: the first-byte
    // deadline and the budget's prediction need the prompt's and the answer's lengths.
    let (body, body_bytes): (ReqBody, Option<Bytes>) = match body {
        body if pool.needs().body
            || parts.headers.contains_key(slo::BUDGET_HEADER)
            || openai::is_inference_path(parts.uri.path()) =>
        {
            let bytes = Box::pin(read_body(body, parts, ctx.max_body_bytes, ctx.body_read_timeout)).await?;
            (ReqBody::Bytes(bytes.clone()), Some(bytes))
        }
        // Other policies read only the model, when endpoints take only some models.
        body if model.is_none() && pool.routes_by_model() => {
            let bytes = Box::pin(read_body(body, parts, ctx.max_body_bytes, ctx.body_read_timeout)).await?;
            model = model_of(&bytes);
            (ReqBody::Bytes(bytes), None)
        }
        left => (left, None),
    };
    let mut limits = openai::Limits { max_body_bytes: ctx.max_body_bytes, ..openai::Limits::default() };
    if !pool.needs().body {
        // Read only for its lengths (deadline, budget): no prefix hashes, which no policy here reads.
        limits.max_blocks = 0;
    }
    // A body the parser refuses is still forwarded: the backend answers it.
    let ai = body_bytes.as_ref().and_then(|bytes| openai::parse(bytes, &limits).ok());
    if model.is_none() {
        model = ai.as_ref().and_then(|a| a.model.as_deref().map(str::to_owned));
    }

    // Overload protection before any work on the pool.
    let safety = pool.safety().clone();
    safety.rate_limit(client.ip(), &parts.headers)?;
    let admission = safety.admit(&parts.headers, ctx.trust_priority).await?;

    // An OpenAI inference call changes nothing on the server: it may be sent again before its
    // first response byte on any route, known by its path or its parsed body.
    let inference = rules.inference || ai.is_some() || openai::is_inference_path(parts.uri.path());
    // A request that may be retried must be sendable again: its body is kept (bounded).
    let idempotent = is_idempotent_method(parts.method.as_str());
    let mut may_retry = upgrade.is_none() && safety.state().rules().may_retry(idempotent, inference);
    let body: ReqBody = match body {
        ReqBody::Streamed(incoming) if may_retry => {
            if http_body::Body::is_end_stream(&incoming) {
                ReqBody::Bytes(Bytes::new())
            } else if content_length(parts).is_some_and(|n| n <= ctx.max_body_bytes as u64) {
                let incoming = ReqBody::Streamed(incoming);
                ReqBody::Bytes(Box::pin(read_body(incoming, parts, ctx.max_body_bytes, ctx.body_read_timeout)).await?)
            } else {
                // Unknown or large length: stream it through, once.
                may_retry = false;
                ReqBody::Streamed(incoming)
            }
        }
        other => other,
    };

    rewrite_for_upstream(parts, origin, upgrade.is_some());

    // What the policy looks at.
    // A pool the autoscaler has scaled to zero holds its requests while a replica starts.
    let snapshot = match &pool.config().autoscale {
        Some(a) => Box::pin(pool.wait_for_endpoints(a.cold_start_timeout)).await,
        None => pool.snapshot(),
    };
    let key = match &pool.needs().key {
        Some(HashKey::Header(name)) => parts.headers.get(name.as_str()).map(HeaderValue::as_bytes),
        Some(HashKey::Cookie(name)) => headers::cookie(&parts.headers, name),
        Some(HashKey::Path) => Some(parts.uri.path().as_bytes()),
        Some(HashKey::ClientIp) | None => None,
    }
    .map(<[u8]>::to_vec);
    let sticky = pool
        .config()
        .sticky_cookie
        .as_deref()
        .and_then(|name| headers::cookie(&parts.headers, name))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .and_then(|token| snapshot.sticky_index(token));
    // A batch's constraints (set by the batch runner only: clients cannot set extensions).
    let require = parts.extensions.get::<Arc<fulcrum_core::constraint::Requirements>>().cloned();
    let facts = RequestFacts {
        client: Some(client.ip()),
        hash_key: key.as_deref(),
        model: model.as_deref(),
        require: require.as_deref(),
        background: parts.extensions.get::<crate::batch::Background>().is_some(),
        ..ai.as_ref().map(openai::AiRequest::facts).unwrap_or_default()
    };
    // One clock reading: the request reaches the pool, and its first try starts.
    let started = std::time::Instant::now();
    let slo = Slo::from_headers(
        parts.headers.get(slo::BUDGET_HEADER).map(HeaderValue::as_bytes),
        parts.headers.get(slo::CRITICALITY_HEADER).map(HeaderValue::as_bytes),
        clock::at(started),
    )
    .map_err(|e| ProxyError::BadHeader(e.to_string()))?;
    let plan = RequestPlan {
        idempotent,
        route_allows_any_method: inference,
        replayable: may_retry && matches!(body, ReqBody::Bytes(_)),
        sticky,
        slo,
        hedge: rules.hedging(inference),
    };
    let mut attempts = Attempts::start(safety.state(), &*snapshot, &facts, plan, clock::at(started))
        .map_err(|UnknownModel(m)| ProxyError::UnknownModel(m))?;
    let cx = Forward { pool: &pool, snapshot: &snapshot, facts: &facts, request_id, sticky };
    match upgrade {
        Some(client_upgrade) => {
            // The upgrade's request is handed over whole (hyper's client sends it).
            let parts = std::mem::replace(parts, Request::new(()).into_parts().0);
            cx.upgrade(&mut attempts, parts, body, client_upgrade, exchange, started).await
        }
        // Not boxed, and pinned where it is made (not moved): see `respond`.
        None => pin!(cx.forward(&mut attempts, parts, body, admission, exchange, started)).await,
    }
}

/// The request head as the upstream gets it: origin-form, the Host the client meant,
/// hop-by-hop headers stripped, `X-Forwarded-*` added.
fn rewrite_for_upstream(parts: &mut http::request::Parts, origin: &Origin, upgrade: bool) {
    if let Some(authority) = parts.uri.authority() {
        // HTTP/2 or absolute-form: the upstream gets origin-form and a Host header. The
        // target's authority wins over a Host line the client also sent (RFC 9112, 3.2.2),
        // as it did for routing.
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    let host = parts.headers.get(header::HOST).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarded(&mut parts.headers, origin, host.as_ref());
    parts.version = Version::HTTP_11;
}

/// A try sent and not answered yet: what the attempt machine needs back.
struct Flight {
    index: usize,
    /// Its attempt number (the exchange's, for traces and logs).
    number: u32,
    ticket: Ticket,
    guard: fulcrum_core::InFlight,
    /// When it was sent.
    started: std::time::Instant,
}

/// A try's send on its way (boxed: only hedged tries are).
type Sending<'p> = std::pin::Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'p>>;

/// The try whose outcome decides what happens next, and what it got.
struct Settled {
    verdict: Verdict,
    result: Result<Response<UpstreamBody>, ProxyError>,
    index: usize,
    guard: fulcrum_core::InFlight,
    started: std::time::Instant,
}

/// What the tries of one request share.
struct Forward<'a> {
    pool: &'a PoolRuntime,
    snapshot: &'a PoolSnapshot,
    facts: &'a RequestFacts<'a>,
    request_id: &'a HeaderValue,
    /// The endpoint the client's sticky cookie named, if any.
    sticky: Option<usize>,
}

impl Forward<'_> {
    /// Sends the request as the core's attempt machine says, try after try; this loop only
    /// moves bytes and reads the clock (`started`: the reading the first try starts at).
    async fn forward(
        &self,
        attempts: &mut Attempts,
        parts: &mut http::request::Parts,
        body: ReqBody,
        admission: Option<AdmissionSlot>,
        exchange: &mut Exchange,
        started: std::time::Instant,
    ) -> Result<Answer, ProxyError> {
        let (state, snapshot) = (self.pool.safety().state(), self.snapshot);
        let mut last_error: Option<ProxyError> = None;
        let mut body = Some(body);
        let mut first = Some(started);
        loop {
            let started = first.take().unwrap_or_else(std::time::Instant::now);
            let now = clock::at(started);
            let t = match clock::with_rng(|rng| attempts.next(state, snapshot, self.facts, now, rng)) {
                Next::Send(t) => t,
                Next::Wait(until) => {
                    tokio::time::sleep(until.saturating_since(now)).await;
                    continue;
                }
                Next::Fail(Fail::Refused(r)) => {
                    return Err(ProxyError::BudgetUnmet { status: r.status, retry_after: r.retry_after });
                }
                Next::Fail(Fail::NoEndpoint) => return Err(last_error.unwrap_or_else(|| self.no_endpoint())),
            };
            let upstream = &snapshot.upstreams[t.index];
            // Only buffered bodies are ever sent twice.
            let Some(b) = (if t.last { body.take() } else { body.as_ref().and_then(ReqBody::try_clone) }) else {
                return Err(last_error.unwrap_or_else(|| self.no_endpoint()));
            };
            let number = exchange.attempt(upstream, &parts.method, &mut parts.headers);
            let first_byte = self.first_byte(&t, &b);
            let flight = Flight { index: t.index, number, ticket: t.ticket, guard: t.guard, started };
            // A hedge needs a second copy of the body.
            let settled = match t.hedge_after.filter(|_| body.is_some()) {
                // Not boxed, and pinned where it is made (not moved): see `respond`.
                None => {
                    let result = pin!(upstream.send(parts, b, started, first_byte)).await;
                    let verdict = self.record(attempts, flight.ticket, flight.index, &result, started);
                    Settled { verdict, result, index: flight.index, guard: flight.guard, started }
                }
                Some(delay) => {
                    let send = Box::pin(upstream.send(parts, b, started, first_byte));
                    Box::pin(self.hedged(attempts, (flight, send), delay, parts, body.as_ref(), exchange)).await
                }
            };
            let Settled { verdict, result, index, guard, started } = settled;
            if let Verdict::Retry { .. } | Verdict::Pending = verdict {
                exchange.attempt_failed(result.as_ref().ok().map(|r| r.status()), result.as_ref().err());
                last_error = result.err().or(last_error);
                continue;
            }
            let mut resp = result?;
            self.finish(&mut resp, index);
            let deadline = self.response_deadline().map(|d| tokio::time::Instant::from_std(started + d));
            return Ok(Answer::Stream(resp, Streaming { guard, deadline, admission }));
        }
    }

    /// The longest a try waits for its response head. A body still streaming from the client
    /// gets the pool's whole first-byte timeout: the adaptive deadline is for the upstream's
    /// answer, not the client's upload.
    fn first_byte(&self, t: &Try, body: &ReqBody) -> Duration {
        match body {
            ReqBody::Streamed(_) => t.first_byte.max(self.pool.config().timeouts.first_byte),
            ReqBody::Bytes(_) => t.first_byte,
        }
    }

    /// Hands a try's outcome to the attempt machine.
    fn record(
        &self,
        attempts: &mut Attempts,
        ticket: Ticket,
        index: usize,
        result: &Result<Response<UpstreamBody>, ProxyError>,
        started: std::time::Instant,
    ) -> Verdict {
        let (state, snapshot) = (self.pool.safety().state(), self.snapshot);
        let (observed, elapsed) = (classify(result), started.elapsed());
        if Outcome::from(observed) == Outcome::Failure {
            snapshot.upstreams[index].record_failure();
        }
        let now = clock::at(started) + elapsed;
        clock::with_rng(|rng| attempts.record(state, snapshot, ticket, observed, elapsed, now, rng))
    }

    /// Waits for a try's response head; when none has come after `delay`, hedges: a second
    /// try goes to another endpoint, the first response head that answers wins, and the other
    /// try is dropped (its connection closed, so the backend stops working on it).
    async fn hedged<'p>(
        &self,
        attempts: &mut Attempts,
        (first, mut send): (Flight, Sending<'p>),
        delay: Duration,
        parts: &'p http::request::Parts,
        body: Option<&ReqBody>,
        exchange: &mut Exchange,
    ) -> Settled {
        let (state, snapshot) = (self.pool.safety().state(), self.snapshot);
        let hedge_at = tokio::time::Instant::from_std(first.started + delay);
        let early = tokio::select! {
            result = &mut send => Some(result),
            () = tokio::time::sleep_until(hedge_at) => None,
        };
        let started = std::time::Instant::now();
        let hedge = match early {
            Some(_) => None,
            None => clock::with_rng(|rng| attempts.hedge(state, snapshot, self.facts, clock::at(started), rng)),
        };
        let (hedge, b) = match (hedge, body.and_then(ReqBody::try_clone)) {
            (Some(h), Some(b)) => (h, b),
            (hedge, _) => {
                if let Some(h) = hedge {
                    attempts.cancel(state, snapshot, h.ticket, Duration::ZERO, clock::at(started));
                }
                let result = match early {
                    Some(result) => result,
                    None => send.await,
                };
                let verdict = self.record(attempts, first.ticket, first.index, &result, first.started);
                return Settled { verdict, result, index: first.index, guard: first.guard, started: first.started };
            }
        };
        // The hedge's own head (its trace context differs).
        let mut hedge_parts = parts.clone();
        let upstream = &snapshot.upstreams[hedge.index];
        let number = exchange.hedge(upstream, &hedge_parts.method, &mut hedge_parts.headers);
        let first_byte = self.first_byte(&hedge, &b);
        let second = Flight { index: hedge.index, number, ticket: hedge.ticket, guard: hedge.guard, started };
        let hedge_send: Sending<'_> = Box::pin(upstream.send(&hedge_parts, b, started, first_byte));
        let mut out = [Some((first, send)), Some((second, hedge_send))];
        loop {
            let (i, result) = std::future::poll_fn(|cx| {
                for (i, slot) in out.iter_mut().enumerate() {
                    if let Some((_, send)) = slot
                        && let std::task::Poll::Ready(r) = send.as_mut().poll(cx)
                    {
                        return std::task::Poll::Ready((i, r));
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            let Some((done, _)) = out[i].take() else { continue };
            let verdict = self.record(attempts, done.ticket, done.index, &result, done.started);
            if verdict == Verdict::Pending {
                // Its twin may still answer.
                let (status, error) = (result.as_ref().ok().map(|r| r.status()), result.as_ref().err());
                exchange.attempt_failed_of(done.number, &snapshot.upstreams[done.index], status, error);
                continue;
            }
            // The other try lost: dropped, its connection closed.
            for (other, send) in out.iter_mut().filter_map(Option::take) {
                drop(send);
                exchange.lost(other.number);
                let elapsed = other.started.elapsed();
                attempts.cancel(state, snapshot, other.ticket, elapsed, clock::at(other.started) + elapsed);
            }
            exchange.answered_by(&snapshot.upstreams[done.index]);
            return Settled { verdict, result, index: done.index, guard: done.guard, started: done.started };
        }
    }

    /// Forwards an HTTP/1.1 upgrade: one try, no retry (the client's connection is handed
    /// over as it is).
    async fn upgrade(
        &self,
        attempts: &mut Attempts,
        mut parts: http::request::Parts,
        body: ReqBody,
        client_upgrade: hyper::upgrade::OnUpgrade,
        exchange: &mut Exchange,
        started: std::time::Instant,
    ) -> Result<Answer, ProxyError> {
        let (state, snapshot) = (self.pool.safety().state(), self.snapshot);
        let now = clock::at(started);
        let Next::Send(t) = clock::with_rng(|rng| attempts.next(state, snapshot, self.facts, now, rng)) else {
            return Err(self.no_endpoint());
        };
        let upstream = snapshot.upstreams[t.index].clone();
        exchange.attempt(&upstream, &parts.method, &mut parts.headers);
        let req = Request::from_parts(parts, body.into_hyper());
        let mut guard = Some(t.guard);
        let result =
            Box::pin(websocket(upstream, req, client_upgrade, &mut guard, t.first_byte, self.request_id)).await;
        let (observed, elapsed) = (classify(&result), started.elapsed());
        // Upgrades are tried once: the verdict can only be to answer.
        clock::with_rng(|rng| attempts.record(state, snapshot, t.ticket, observed, elapsed, now + elapsed, rng));
        let resp = result?;
        Ok(match guard {
            // Switched: the spliced streams hold the guard; the client gets the 101 head.
            None => Answer::Whole(resp.map(|_| Either::Right(Full::new(Bytes::new())))),
            // Refused: the answer streams back, however long it is.
            Some(guard) => {
                let deadline = self.response_deadline().map(|d| tokio::time::Instant::from_std(started + d));
                Answer::Refused(resp, Streaming { guard, deadline, admission: None })
            }
        })
    }

    fn no_endpoint(&self) -> ProxyError {
        ProxyError::NoEndpoint(self.pool.name().to_owned())
    }

    /// The response head as the client gets it: hop-by-hop headers stripped, the request id,
    /// and a sticky cookie naming the endpoint when the client had none for it.
    fn finish(&self, resp: &mut Response<UpstreamBody>, index: usize) {
        let h = resp.headers_mut();
        headers::strip_hop_by_hop(h, false);
        h.insert(&X_REQUEST_ID, self.request_id.clone());
        if let Some(name) = self.pool.config().sticky_cookie.as_deref()
            && self.sticky != Some(index)
            && let Ok(v) = HeaderValue::from_str(&format!(
                "{name}={:016x}; Path=/; HttpOnly; SameSite=Lax",
                sticky_token(self.snapshot.selector.endpoints()[index].id().as_str())
            ))
        {
            h.append(header::SET_COOKIE, v);
        }
    }

    /// How long the whole response may take: the pool's request_timeout and the retry
    /// policy's per_try_timeout, whichever is shorter.
    fn response_deadline(&self) -> Option<Duration> {
        let request = self.pool.config().timeouts.request;
        match (request, self.pool.safety().config.retry.per_try_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How a try went, as the core classifies outcomes.
fn classify<B>(result: &Result<Response<B>, ProxyError>) -> Observed {
    match result {
        Ok(resp) if resp.status().as_u16() >= 400 => Observed::Status(resp.status().as_u16()),
        Ok(_) => Observed::Success,
        // The client's faults (a body that broke or stalled) are its answer, not the endpoint's.
        Err(e @ (ProxyError::BadBody(_) | ProxyError::BodyTimeout { .. })) => Observed::Status(e.status().as_u16()),
        Err(e) => e.observed().unwrap_or(Observed::Reset),
    }
}

/// Forwards a WebSocket (or another allowed HTTP/1.1 upgrade) handshake on a fresh
/// connection. When the upstream switches protocols, the two upgraded streams are spliced
/// until either side closes, holding `guard` (taken); otherwise its answer is returned with
/// its body unread, to stream back (`guard` left).
async fn websocket(
    upstream: Arc<crate::upstream::Upstream>,
    req: Request<crate::upstream::HyperBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    guard: &mut Option<fulcrum_core::InFlight>,
    first_byte: Duration,
    request_id: &HeaderValue,
) -> Result<Response<Incoming>, ProxyError> {
    let mut sender = upstream.connect_upgradable().await?;
    let mut resp = match tokio::time::timeout(first_byte, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ProxyError::Upstream { endpoint: upstream.name().to_owned(), source: e.into() }),
        Err(_) => {
            return Err(ProxyError::Timeout { endpoint: upstream.name().to_owned(), after_ms: first_byte.as_millis() });
        }
    };
    resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: nothing is read into memory here (a 40 MB answer used to be).
        headers::strip_hop_by_hop(resp.headers_mut(), false);
        return Ok(resp);
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let held = guard.take();
    tokio::spawn(async move {
        let _guard = held;
        if let (Ok(c), Ok(u)) = tokio::join!(client_upgrade, upstream_upgrade) {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        }
    });
    Ok(resp)
}
