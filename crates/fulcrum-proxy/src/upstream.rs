//! Per-endpoint upstream connections: a lock-free queue of idle HTTP/1.1 connections.
//!
//! A request takes a ready idle connection or opens a new one; when its response body has
//! been read to the end, the connection goes back to the queue (see
//! [`TrackedBody`](crate::body::TrackedBody)). A pooled connection the endpoint closed while
//! it sat idle is detected when hyper hands the unsent request back, and the request goes out
//! on a fresh connection instead: nothing was sent, so nothing is repeated.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::safety::EndpointBreaker;
use crate::stats::EndpointStats;

/// The body type sent upstream: streamed from the client, or read already (model routing).
pub(crate) type ReqBody = Either<Incoming, Full<Bytes>>;

struct Idle {
    sender: SendRequest<ReqBody>,
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
    connections: std::sync::Arc<std::sync::atomic::AtomicU32>,
    pub(crate) breaker: Option<EndpointBreaker>,
    /// Requests, latencies and engine scrapes, for `/metrics`.
    stats: EndpointStats,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("address", &self.address).field("idle", &self.idle.len()).finish()
    }
}

impl Upstream {
    pub(crate) fn new(
        address: SocketAddr,
        name: String,
        max_idle: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
        breaker: Option<&fulcrum_core::resilience::breaker::BreakerConfig>,
    ) -> Self {
        Upstream {
            address,
            name,
            idle: ArrayQueue::new(max_idle.max(1)),
            connect_timeout,
            idle_timeout,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            connections: Default::default(),
            breaker: breaker.map(EndpointBreaker::new),
            stats: EndpointStats::default(),
        }
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The state of the endpoint's circuit breaker, when the pool has breakers.
    pub fn breaker_state(&self) -> Option<fulcrum_core::resilience::breaker::BreakerState> {
        self.breaker.as_ref().map(EndpointBreaker::state)
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

    fn checkout(&self) -> Option<SendRequest<ReqBody>> {
        while let Some(idle) = self.idle.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Returns a connection whose response was read to the end.
    pub(crate) fn checkin(&self, sender: SendRequest<ReqBody>) {
        if !sender.is_closed() {
            // A full queue drops the connection, which closes it.
            let _ = self.idle.push(Idle { sender, since: std::time::Instant::now() });
        }
    }

    /// Opens a new connection; `upgrades` keeps it usable for a protocol switch (WebSocket).
    pub(crate) async fn connect(&self, upgrades: bool) -> Result<SendRequest<ReqBody>, ProxyError> {
        let err = |source| ProxyError::Connect { endpoint: self.name.clone(), source };
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(err(e)),
            Err(_) => return Err(err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Upstream { endpoint: self.name.clone(), source: e })?;
        let open = self.connections.clone();
        open.fetch_add(1, Ordering::Relaxed);
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        sender.ready().await.map_err(|e| ProxyError::Upstream { endpoint: self.name.clone(), source: e })?;
        Ok(sender)
    }

    /// Sends a request on a pooled or new connection, returning the response head and the
    /// connection (to check in once the body is read).
    pub(crate) async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, SendRequest<ReqBody>), ProxyError> {
        self.record_request();
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect(false).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    // The pooled connection was closed under us before anything was sent.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(ProxyError::Upstream { endpoint: self.name.clone(), source: e.into_error() }),
                },
            }
        }
    }
}
