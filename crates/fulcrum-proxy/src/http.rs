//! The HTTP request path: route, pick, forward, stream back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_core::policy::HashKey;
use fulcrum_core::{Outcome, RequestFacts};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::TrackedBody;
use crate::error::ProxyError;
use crate::headers::{self, X_REQUEST_ID};
use crate::pool::{PoolRuntime, sticky_token};
use crate::route::{Matched, RouteTable, model_of};
use crate::{clock, upstream::ReqBody};

/// What the proxy sends back to clients.
pub type RespBody = Either<TrackedBody, Full<Bytes>>;

/// What a listener's requests share.
#[derive(Debug)]
pub(crate) struct ListenerCtx {
    pub(crate) name: String,
    pub(crate) routes: RouteTable,
    pub(crate) max_body_bytes: usize,
}

/// Serves one request; every failure becomes a JSON error response.
pub(crate) async fn handle(
    ctx: Arc<ListenerCtx>,
    client: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let request_id = headers::request_id(req.headers_mut());
    match proxy(&ctx, client, req, &request_id).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            if e.is_upstream() || e.status() == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(request_id = ?request_id, listener = %ctx.name, status = e.status().as_u16(), error = %e, "request failed");
            } else {
                tracing::debug!(request_id = ?request_id, listener = %ctx.name, status = e.status().as_u16(), error = %e, "request refused");
            }
            Ok(e.to_response(&request_id).map(Either::Right))
        }
    }
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

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(e) => Err(ProxyError::BadBody(e.to_string())),
    }
}

fn content_length(req: &http::request::Parts) -> Option<u64> {
    req.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn proxy(
    ctx: &ListenerCtx,
    client: SocketAddr,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
) -> Result<Response<RespBody>, ProxyError> {
    let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();

    // Route; read the body only if a route needs the model from it.
    let mut model: Option<String> = None;
    let (pool, body): (Arc<PoolRuntime>, ReqBody) = match ctx.routes.find(&parts, false, None) {
        Matched::Pool(p) => (p.clone(), Either::Left(incoming)),
        Matched::None => return Err(ProxyError::NoRoute),
        Matched::NeedBody => {
            if content_length(&parts).is_some_and(|n| n > ctx.max_body_bytes as u64) {
                return Err(ProxyError::BodyTooLarge { limit: ctx.max_body_bytes });
            }
            let bytes = read_body(incoming, ctx.max_body_bytes).await?;
            model = model_of(&bytes);
            match ctx.routes.find(&parts, true, model.as_deref()) {
                Matched::Pool(p) => (p.clone(), Either::Right(Full::new(bytes))),
                _ => return Err(ProxyError::NoRoute),
            }
        }
    };

    // Pick an endpoint.
    let snapshot = pool.snapshot();
    let needs = pool.needs();
    let key: Option<&[u8]> = match &needs.key {
        Some(HashKey::Header(name)) => parts.headers.get(name.as_str()).map(HeaderValue::as_bytes),
        Some(HashKey::Cookie(name)) => headers::cookie(&parts.headers, name),
        Some(HashKey::Path) => Some(parts.uri.path().as_bytes()),
        Some(HashKey::ClientIp) | None => None,
    };
    let facts = RequestFacts {
        client: Some(client.ip()),
        hash_key: key,
        model: model.as_deref(),
        prompt: None,
        estimated_tokens: 0,
    };
    let now = clock::now();
    let sticky_name = pool.config().sticky_cookie.as_deref();
    let sticky_hit = sticky_name
        .and_then(|name| headers::cookie(&parts.headers, name))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .and_then(|token| snapshot.sticky_index(token));
    let idx = match sticky_hit {
        Some(i) => i,
        None => clock::with_rng(|rng| snapshot.selector.pick_index(&facts, now, rng, |_| true))
            .ok_or_else(|| ProxyError::NoEndpoint(pool.name().to_owned()))?,
    };
    let endpoint = &snapshot.selector.endpoints()[idx];
    let upstream = snapshot.upstreams[idx].clone();
    let guard = snapshot.selector.begin(endpoint, 0, now);

    // Rewrite the request for the upstream.
    let host = parts.headers.get(header::HOST).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    headers::add_forwarded(&mut parts.headers, client.ip(), host.as_ref());
    if let Some(authority) = parts.uri.authority() {
        // HTTP/2 or absolute-form: the upstream gets origin-form and a Host header.
        if host.is_none()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let timeouts = &pool.config().timeouts;
    let latency = *snapshot.selector.options().latency();
    let started = std::time::Instant::now();

    if let Some(client_upgrade) = upgrade {
        return websocket(upstream, upstream_req, client_upgrade, guard, timeouts.first_byte, request_id).await;
    }

    let sent = tokio::time::timeout(timeouts.first_byte, upstream.send(upstream_req)).await;
    let (mut resp, sender) = match sent {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            upstream.record_failure();
            endpoint.signals().observe(started.elapsed(), Outcome::Failure, clock::now(), &latency);
            return Err(e);
        }
        Err(_) => {
            upstream.record_failure();
            endpoint.signals().observe(started.elapsed(), Outcome::Failure, clock::now(), &latency);
            return Err(ProxyError::Timeout {
                endpoint: upstream.name().to_owned(),
                after_ms: timeouts.first_byte.as_millis(),
            });
        }
    };
    // Latency is time to the response head; load lasts until the body ends.
    let outcome = if resp.status().is_server_error() { Outcome::Failure } else { Outcome::Success };
    if outcome == Outcome::Failure {
        upstream.record_failure();
    }
    endpoint.signals().observe(started.elapsed(), outcome, clock::now(), &latency);

    let h = resp.headers_mut();
    headers::strip_hop_by_hop(h, false);
    h.insert(&X_REQUEST_ID, request_id.clone());
    if let Some(name) = sticky_name
        && sticky_hit.is_none()
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{name}={:016x}; Path=/; HttpOnly; SameSite=Lax",
            sticky_token(endpoint.id().as_str())
        ))
    {
        h.append(header::SET_COOKIE, v);
    }
    let deadline = timeouts.request.map(|d| tokio::time::Instant::from_std(started + d));
    Ok(resp.map(|incoming| Either::Left(TrackedBody::new(incoming, guard, (upstream, sender), deadline))))
}

/// Forwards a WebSocket (or any HTTP/1.1 upgrade) handshake on a fresh connection, then
/// splices the two upgraded streams until either side closes.
async fn websocket(
    upstream: Arc<crate::upstream::Upstream>,
    req: Request<ReqBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    guard: fulcrum_core::InFlight,
    first_byte: Duration,
    request_id: &HeaderValue,
) -> Result<Response<RespBody>, ProxyError> {
    let mut sender = upstream.connect(true).await?;
    let mut resp = match tokio::time::timeout(first_byte, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ProxyError::Upstream { endpoint: upstream.name().to_owned(), source: e }),
        Err(_) => {
            return Err(ProxyError::Timeout { endpoint: upstream.name().to_owned(), after_ms: first_byte.as_millis() });
        }
    };
    resp.headers_mut().insert(&X_REQUEST_ID, request_id.clone());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream refused the upgrade: pass its answer on as it is.
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        drop(guard);
        return Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let _guard = guard;
        if let (Ok(c), Ok(u)) = tokio::join!(client_upgrade, upstream_upgrade) {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Either::Right(Full::new(Bytes::new()))))
}
