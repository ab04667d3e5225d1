//! Active health checks: one task per endpoint probes it on the pool's schedule and feeds
//! the core's health state machine.
//!
//! An endpoint joins after its first successful check, leaves after `fall` failures in a
//! row and returns after `rise` successes, in slow start when the pool has it. Every
//! transition is logged and recorded in the pool's event timeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::resilience::{CheckKind, HealthCheck};
use fulcrum_core::Endpoint;
use fulcrum_core::flow::PoolState;
use fulcrum_core::resilience::health::HealthState;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::clock;
use crate::pool::PoolRuntime;

/// Probes one endpoint until the task is aborted (the endpoint left the pool, or shutdown).
pub(crate) async fn check_loop(pool: Arc<PoolRuntime>, endpoint: Endpoint, check: HealthCheck) {
    let state = pool.safety().state();
    // Restarted (the pool was rebuilt by a reload): go on from what the endpoint's flags say.
    let known = PoolState::known_health(&endpoint);
    let mut health = HealthState::resume(&check.config, known, clock::now());
    loop {
        let ok = probe(&check.kind, endpoint.address(), &pool, check.config.timeout()).await;
        let now = clock::now();
        // What a result means (flags, events, recovery effects) is the core's to say.
        state.on_probe(&*pool.snapshot(), &endpoint, &mut health, ok, now);
        let next = clock::with_rng(|rng| health.next_check(now, rng));
        tokio::time::sleep(next.saturating_since(now)).await;
    }
}

/// One probe, bounded by `timeout`.
async fn probe(kind: &CheckKind, address: SocketAddr, pool: &PoolRuntime, timeout: Duration) -> bool {
    let attempt = async {
        // A TCP check over TLS passes when the handshake does.
        let stream = crate::tls::dial(address, pool.tls()).await.ok()?;
        let CheckKind::Http { path, expected_statuses } = kind else { return Some(true) };
        let io = TokioIo::new(stream);
        let req = http::Request::get(path.as_str())
            .header(http::header::USER_AGENT, "fulcrum-health-check")
            .body(Empty::<Bytes>::new())
            .ok()?;
        // In the pool's protocol: an HTTP/2-only (gRPC) server answers no HTTP/1.1 probe.
        let resp = if pool.config().protocol == fulcrum_config::UpstreamProtocol::H2 {
            let scheme = if pool.tls().is_some() { "https" } else { "http" };
            let (mut parts, body) = req.into_parts();
            parts.uri = format!("{scheme}://{address}{path}").parse().ok()?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(conn);
            sender.send_request(http::Request::from_parts(parts, body)).await.ok()?
        } else {
            let (mut parts, body) = req.into_parts();
            parts.headers.insert(http::header::HOST, http::HeaderValue::from_str(&address.to_string()).ok()?);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            sender.send_request(http::Request::from_parts(parts, body)).await.ok()?
        };
        let status = resp.status().as_u16();
        Some(if expected_statuses.is_empty() {
            (200..300).contains(&status)
        } else {
            expected_statuses.contains(&status)
        })
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
