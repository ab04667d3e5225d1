//! Per-endpoint upstream connections: a lock-free queue of idle HTTP/1.1 connections.
//!
//! A request takes a ready idle connection or opens a new one, and uses it in its own task
//! (see [`h1`](crate::h1)); when its response body has been read to the end, the connection
//! goes back to the queue. A pooled connection the endpoint closed while it sat idle is
//! usually seen before use (the socket turned readable); when the close crosses the request
//! on the wire instead (the write fails, or the connection ends before any response byte to
//! an idempotent request), the request goes out once more on a fresh connection: the
//! endpoint cannot have processed it, so nothing is repeated.
//!
//! A pool with `protocol = "h2"` speaks HTTP/2 instead, through hyper's client: one
//! connection per endpoint, opened at the first request and again when it closes, with
//! every request a stream on it. Trailers pass both ways (gRPC's status is one).
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::Response;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::error::ProxyError;
use crate::h1::conn::{Conn, Failure, exchange};
use crate::h1::{UpstreamBody, UpstreamError};
use crate::stats::EndpointStats;
use fulcrum_core::flow::SharedBreaker;

/// A request body on its way upstream: streamed from the client, or read already (model
/// routing, retries).
#[derive(Debug)]
pub(crate) enum ReqBody {
    /// The client's body, read as it is sent on.
    Streamed(Incoming),
    /// The whole body.
    Bytes(Bytes),
}

impl ReqBody {
    /// A copy to send again, when the body is buffered.
    pub(crate) fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Bytes(b) => Some(ReqBody::Bytes(b.clone())),
            ReqBody::Streamed(_) => None,
        }
    }

    /// As a body hyper's client sends (upgrades).
    pub(crate) fn into_hyper(self) -> HyperBody {
        match self {
            ReqBody::Streamed(s) => Either::Left(s),
            ReqBody::Bytes(b) => Either::Right(Full::new(b)),
        }
    }
}

/// The body type of requests sent through hyper's client (upgrades only).
pub(crate) type HyperBody = Either<Incoming, Full<Bytes>>;

struct Idle {
    conn: Box<Conn>,
    since: std::time::Instant,
}

/// One endpoint's connections and counters.
pub struct Upstream {
    address: SocketAddr,
    name: String,
    idle: ArrayQueue<Idle>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Open connections to the endpoint (for `max_connections`).
    connections: Arc<AtomicU32>,
    pub(crate) breaker: Option<SharedBreaker>,
    /// Requests, latencies and engine scrapes, for `/metrics`.
    stats: EndpointStats,
    /// The pool's TLS to its endpoints, if it has one.
    tls: Option<Arc<crate::tls::Connector>>,
    /// An `h2` pool's connection to the endpoint (none yet, or the last one opened).
    h2: Option<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<HyperBody>>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("address", &self.address).field("idle", &self.idle.len()).finish()
    }
}

impl Upstream {
    /// An endpoint of `pool`, connected to with its settings.
    pub(crate) fn new(
        address: SocketAddr,
        name: String,
        pool: &fulcrum_config::PoolConfig,
        tls: Option<Arc<crate::tls::Connector>>,
        now: fulcrum_core::Instant,
    ) -> Self {
        let breaker = pool.resilience.breaker.as_ref();
        Upstream {
            address,
            name,
            idle: ArrayQueue::new(pool.max_idle_per_endpoint.max(1)),
            connect_timeout: pool.timeouts.connect,
            idle_timeout: pool.timeouts.idle,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            connections: Default::default(),
            breaker: breaker.map(|c| SharedBreaker::new(c, now)),
            stats: EndpointStats::default(),
            tls,
            h2: (pool.protocol == fulcrum_config::UpstreamProtocol::H2).then(|| tokio::sync::Mutex::new(None)),
        }
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The state of the endpoint's circuit breaker, when the pool has breakers.
    pub fn breaker_state(&self) -> Option<fulcrum_core::resilience::breaker::BreakerState> {
        self.breaker.as_ref().map(SharedBreaker::state)
    }

    /// What the endpoint served: requests by route and status, latencies, engine scrapes.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Open connections to this endpoint.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// The endpoint's id, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests sent to this endpoint.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests that failed at this endpoint (connect, timeout, error, 5xx).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn record_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A pooled connection that has not idled past the idle timeout at `now`, and that the
    /// endpoint has not closed.
    fn checkout(&self, now: std::time::Instant) -> Option<Box<Conn>> {
        while let Some(idle) = self.idle.pop() {
            if now.saturating_duration_since(idle.since) < self.idle_timeout && idle.conn.is_reusable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Returns a connection whose response was read to the end.
    pub(crate) fn checkin(&self, conn: Box<Conn>) {
        // A full queue drops the connection, which closes it.
        let _ = self.idle.push(Idle { conn, since: std::time::Instant::now() });
    }

    /// Connects (and shakes hands, over TLS) within the connect timeout.
    async fn open(&self) -> Result<crate::tls::Stream, ProxyError> {
        let err = |source| ProxyError::Connect { endpoint: self.name.clone(), source };
        let dial = crate::tls::dial(self.address, self.tls.as_deref());
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))),
        }
    }

    /// Opens a new connection for [`send`](Self::send).
    async fn connect(&self) -> Result<Box<Conn>, ProxyError> {
        Ok(Conn::new(self.open().await?, self.connections.clone()))
    }

    /// Opens a new connection through hyper's client, kept usable for a protocol switch
    /// (WebSocket).
    pub(crate) async fn connect_upgradable(&self) -> Result<SendRequest<HyperBody>, ProxyError> {
        let stream = self.open().await?;
        let upstream_err = |e: hyper::Error| ProxyError::Upstream { endpoint: self.name.clone(), source: e.into() };
        let (mut sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(upstream_err)?;
        let open = self.connections.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
        sender.ready().await.map_err(upstream_err)?;
        Ok(sender)
    }

    /// Sends a request on a pooled or new connection, in the caller's task, and returns the
    /// response head; its body streams from the connection as it is polled, and puts the
    /// connection back in the pool when it ends. The head must arrive within `first_byte` of
    /// `started` (connecting included).
    pub(crate) async fn send(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        mut body: ReqBody,
        started: std::time::Instant,
        first_byte: Duration,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        self.record_request();
        let deadline = tokio::time::Instant::from_std(started) + first_byte;
        let timed_out = || ProxyError::Timeout { endpoint: self.name.clone(), after_ms: first_byte.as_millis() };
        if let Some(h2) = &self.h2 {
            return match tokio::time::timeout_at(deadline, Box::pin(self.send_h2(h2, parts, body))).await {
                Ok(result) => result,
                Err(_) => {
                    // The connection may be dead without a close (a blackholed peer): the
                    // next request opens a new one rather than queue on it.
                    *h2.lock().await = None;
                    Err(timed_out())
                }
            };
        }
        let mut stale = false;
        loop {
            // After a stale pooled connection, a fresh one: the others may be stale too.
            let (conn, reused) = match (!stale).then(|| self.checkout(started)).flatten() {
                Some(c) => (c, true),
                // Boxed: connecting is rare, and its future would weigh on every request's.
                None => match tokio::time::timeout_at(deadline, Box::pin(self.connect())).await {
                    Ok(conn) => (conn?, false),
                    Err(_) => return Err(timed_out()),
                },
            };
            // Pinned where it is made: a move of a future copies all of it.
            match std::pin::pin!(exchange(conn, parts, body, self, deadline)).await {
                Ok(resp) => return Ok(resp),
                Err(Failure { unprocessed: true, replay: Some(again), .. }) if reused => {
                    body = again;
                    stale = true;
                }
                Err(Failure { error: UpstreamError::TimedOut, .. }) => return Err(timed_out()),
                // The client's faults: answered 4xx, never counted against the endpoint.
                Err(Failure { error: UpstreamError::RequestBody(e), .. }) => {
                    return Err(ProxyError::BadBody(e.to_string()));
                }
                Err(Failure { error: UpstreamError::RequestBodyStalled, .. }) => {
                    return Err(ProxyError::BodyTimeout { after_ms: first_byte.as_millis() });
                }
                Err(f) => return Err(ProxyError::Upstream { endpoint: self.name.clone(), source: f.error }),
            }
        }
    }

    /// Sends a request as a stream on the endpoint's HTTP/2 connection, opening one if there
    /// is none (or it closed).
    async fn send_h2(
        &self,
        h2: &tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<HyperBody>>>,
        parts: &http::request::Parts,
        body: ReqBody,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let upstream_err = |e: hyper::Error| ProxyError::Upstream { endpoint: self.name.clone(), source: e.into() };
        let mut sender = {
            let mut slot = h2.lock().await;
            match slot.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => {
                    let stream = self.open().await?;
                    let mut builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    // PINGs on a quiet connection, and the connection closed when one is
                    // not answered: a half-open connection is noticed within 20 s.
                    builder
                        .timer(hyper_util::rt::TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .keep_alive_while_idle(true);
                    let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.map_err(upstream_err)?;
                    let open = self.connections.clone();
                    open.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _ = conn.await;
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        let mut req = http::Request::from_parts(h2_head(parts, self.address, self.tls.is_some()), body.into_hyper());
        *req.version_mut() = http::Version::HTTP_2;
        sender.ready().await.map_err(upstream_err)?;
        let resp = sender.send_request(req).await.map_err(upstream_err)?;
        Ok(resp.map(UpstreamBody::h2))
    }
}

/// A request head as an HTTP/2 upstream gets it: the target in absolute form (its
/// authority from `Host`, else the endpoint's address), no `Host` or connection-specific
/// headers, and `te: trailers` for gRPC.
fn h2_head(parts: &http::request::Parts, address: SocketAddr, tls: bool) -> http::request::Parts {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.headers = parts.headers.clone();
    head.extensions = http::Extensions::new();
    let authority = head
        .headers
        .remove(http::header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            http::uri::Authority::try_from(address.to_string()).expect("a socket address is an authority")
        });
    let scheme = if tls { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    head.uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let grpc =
        head.headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Connection-specific headers are malformed in HTTP/2 (RFC 9113, 8.2.2); TE only as
    // `trailers`, which gRPC servers expect.
    for name in [http::header::CONNECTION, http::header::TRANSFER_ENCODING, http::header::UPGRADE, http::header::TE] {
        head.headers.remove(name);
    }
    head.headers.remove("keep-alive");
    head.headers.remove("proxy-connection");
    if grpc {
        head.headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    head
}
