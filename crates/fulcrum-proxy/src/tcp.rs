//! Plain TCP (L4) proxying: pick an endpoint per connection through the core's attempt
//! machine (health, ejection, drain, breakers and limits apply as for HTTP), retry a failed
//! connect elsewhere, then splice bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use fulcrum_core::RequestFacts;
use fulcrum_core::flow::{Attempts, Next, RequestPlan, Verdict};
use fulcrum_core::resilience::Observed;
use tokio::net::TcpStream;

use crate::clock;
use crate::pool::PoolRuntime;

/// Proxies one client connection to an endpoint of `pool`, counting it in flight for its
/// whole life.
pub(crate) async fn serve(mut client: TcpStream, peer: SocketAddr, pool: Arc<PoolRuntime>) {
    let snapshot = pool.snapshot();
    let state = pool.safety().state();
    // Nothing was sent before a connection exists, so a failed connect may always be retried.
    let facts = RequestFacts { client: Some(peer.ip()), ..RequestFacts::default() };
    let plan = RequestPlan { idempotent: true, replayable: true, ..RequestPlan::default() };
    let Ok(mut attempts) = Attempts::start(state, &*snapshot, &facts, plan, clock::now()) else { return };
    loop {
        let started = std::time::Instant::now();
        let now = clock::at(started);
        let t = match clock::with_rng(|rng| attempts.next(state, &*snapshot, &facts, now, rng)) {
            Next::Send(t) => t,
            Next::Wait(until) => {
                tokio::time::sleep(until.saturating_since(now)).await;
                continue;
            }
            Next::Fail(_) => {
                tracing::warn!(pool = pool.name(), %peer, "no endpoint for tcp connection");
                return;
            }
        };
        let endpoint = &snapshot.selector.endpoints()[t.index];
        let upstream = &snapshot.upstreams[t.index];
        upstream.record_request();
        let connect = tokio::time::timeout(pool.config().timeouts.connect, TcpStream::connect(endpoint.address()));
        let (observed, stream) = match connect.await {
            Ok(Ok(s)) => (Observed::Success, Some(s)),
            Ok(Err(e)) => {
                tracing::warn!(pool = pool.name(), endpoint = %endpoint.id(), %peer, error = %e, "tcp connect failed");
                (Observed::ConnectFailure, None)
            }
            Err(_) => {
                tracing::warn!(pool = pool.name(), endpoint = %endpoint.id(), %peer, "tcp connect timed out");
                (Observed::ConnectFailure, None)
            }
        };
        if stream.is_none() {
            upstream.record_failure();
        }
        let elapsed = started.elapsed();
        let verdict =
            clock::with_rng(|rng| attempts.record(state, &*snapshot, t.ticket, observed, elapsed, now + elapsed, rng));
        let Some(mut upstream) = stream else {
            match verdict {
                Verdict::Retry { .. } => continue,
                Verdict::Answer(_) | Verdict::Pending => return,
            }
        };
        let _guard = t.guard;
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
}
