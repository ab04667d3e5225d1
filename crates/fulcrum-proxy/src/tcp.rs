//! Plain TCP (L4) proxying: pick an endpoint per connection, then splice bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use fulcrum_core::RequestFacts;
use tokio::net::TcpStream;

use crate::clock;
use crate::pool::PoolRuntime;

/// Proxies one client connection to an endpoint of `pool`, counting it in flight for its
/// whole life.
pub(crate) async fn serve(mut client: TcpStream, peer: SocketAddr, pool: Arc<PoolRuntime>) {
    let snapshot = pool.snapshot();
    let facts = RequestFacts { client: Some(peer.ip()), ..RequestFacts::default() };
    let now = clock::now();
    let Some(idx) = clock::with_rng(|rng| snapshot.selector.pick_index(&facts, now, rng, |_| true)) else {
        tracing::warn!(pool = pool.name(), %peer, "no endpoint for tcp connection");
        return;
    };
    let endpoint = &snapshot.selector.endpoints()[idx];
    let _guard = snapshot.selector.begin(endpoint, 0, now);
    snapshot.upstreams[idx].record_request();
    let connect = tokio::time::timeout(pool.config().timeouts.connect, TcpStream::connect(endpoint.address()));
    let mut upstream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            snapshot.upstreams[idx].record_failure();
            tracing::warn!(pool = pool.name(), endpoint = %endpoint.id(), %peer, error = %e, "tcp connect failed");
            return;
        }
        Err(_) => {
            snapshot.upstreams[idx].record_failure();
            tracing::warn!(pool = pool.name(), endpoint = %endpoint.id(), %peer, "tcp connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
