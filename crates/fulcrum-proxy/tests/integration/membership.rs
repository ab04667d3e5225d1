//! Changing a running pool: endpoints join and leave, and one is drained while it streams.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use fulcrum_core::EndpointSpec;
use fulcrum_proxy::pool::{Drained, MembershipChange};
use http_body_util::BodyExt;

fn spec(b: &Backend) -> EndpointSpec {
    EndpointSpec::new(b.addr).with_id(b.name.as_str())
}

async fn backend_of_next(addr: std::net::SocketAddr) -> String {
    let (_, headers, _) = send(addr, get("/")).await;
    headers.get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned()
}

#[tokio::test]
async fn endpoints_join_and_leave_a_running_pool() {
    let (a, b) = (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await);
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let pool = running.pools[0].clone();
    assert_eq!(backend_of_next(running.proxy_addr).await, "a");
    let kept = pool.snapshot().upstreams[0].clone();

    let change = pool.set_endpoints(vec![spec(&a), spec(&b)]).unwrap();
    assert_eq!(change, MembershipChange { added: vec!["b".into()], removed: vec![], kept: 1 });
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(backend_of_next(running.proxy_addr).await);
    }
    assert!(seen.contains(&"a".to_owned()) && seen.contains(&"b".to_owned()), "{seen:?}");
    // The endpoint that stayed kept its connections and counters.
    assert!(std::sync::Arc::ptr_eq(&kept, &pool.snapshot().upstreams[0]));

    let change = pool.set_endpoints(vec![spec(&b)]).unwrap();
    assert_eq!(change.removed, ["a"]);
    for _ in 0..3 {
        assert_eq!(backend_of_next(running.proxy_addr).await, "b");
    }
    // A bad change is refused and the pool keeps serving.
    assert!(pool.set_endpoints(vec![spec(&b), spec(&b)]).is_err());
    assert_eq!(backend_of_next(running.proxy_addr).await, "b");
    running.shutdown().await;
}

#[tokio::test]
async fn a_drained_endpoint_finishes_its_stream_and_takes_nothing_new() {
    let s = backend("s", Behavior::Stream { chunks: 5, gap: Duration::from_millis(150) }).await;
    let b = backend("b", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&s, &b], "")).await;
    let pool = running.pools[0].clone();
    // Round robin starts at s: a stream that takes ~600 ms.
    let mut client = h1(running.proxy_addr).await;
    let resp = client.send_request(get("/stream")).await.unwrap();
    assert_eq!(resp.headers()["x-backend"], "s");
    let stream = tokio::spawn(async move { resp.into_body().collect().await.unwrap().to_bytes() });

    let t0 = Instant::now();
    let drain = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.drain("s", Duration::from_secs(5)).await })
    };
    let draining = |p: &fulcrum_proxy::pool::PoolRuntime| {
        p.snapshot().selector.endpoints()[0].signals().is_unavailable_for(fulcrum_core::Unavailable::Draining)
    };
    until("s is draining", || draining(&pool)).await;
    // While it drains, every new request goes to b.
    for _ in 0..6 {
        assert_eq!(backend_of_next(running.proxy_addr).await, "b");
    }
    assert_eq!(drain.await.unwrap(), Drained::Idle);
    assert!(t0.elapsed() >= Duration::from_millis(400), "drained only after the stream ended");
    let body = stream.await.unwrap();
    assert!(body.ends_with(b"data: [DONE]\n\n"), "the stream completed whole");
    assert_eq!(pool.drain("nope", Duration::from_secs(1)).await, Drained::Unknown);
    let events: Vec<String> = pool.safety().events().into_iter().map(|e| format!("{} {}", e.kind, e.detail)).collect();
    assert!(events.iter().any(|e| e.contains("drained")), "{events:?}");
    running.shutdown().await;
}

#[tokio::test]
async fn a_new_endpoint_joins_after_its_first_health_check() {
    let (a, c) = (backend("a", Behavior::Echo).await, backend("c", Behavior::Echo).await);
    let running =
        proxy(&one_pool("\"round_robin\"", &[&a], "health_check = { path = \"/\", interval = \"100ms\" }")).await;
    let pool = running.pools[0].clone();
    until("a passed its first check", || {
        pool.snapshot().selector.endpoints()[0].signals().is_available(fulcrum_proxy::clock::now())
    })
    .await;
    pool.set_endpoints(vec![spec(&a), spec(&c)]).unwrap();
    // Right after joining, c is unchecked; once its check passes it takes its share.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got_c = false;
    while Instant::now() < deadline && !got_c {
        got_c = backend_of_next(running.proxy_addr).await == "c";
    }
    assert!(got_c, "c never received traffic");
    let events = pool.safety().events();
    assert!(events.iter().any(|e| e.endpoint == "c" && e.kind == "health"), "{events:?}");
    running.shutdown().await;
}
