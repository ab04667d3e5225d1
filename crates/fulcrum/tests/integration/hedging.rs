//! Request hedging end to end, with the configuration a new user writes (endpoints only):
//! mock backends that accept some requests and never answer them; the proxy hedges those
//! after the endpoint's learned 95th-percentile time to a response head, instead of waiting
//! for the first-byte deadline (issue P1.3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_mock::engine::{EngineConfig, Gpu};
use fulcrum_mock::faults::FaultsPatch;
use fulcrum_mock::{MockConfig, MockServer};

use crate::ai_routing::{chat_once, endpoints, proxy};

/// Sends `n` chat completions from each of `clients` clients; returns how many took longer
/// than `slow`, and how many failed (not 200, or a body cut short).
async fn load(addr: SocketAddr, clients: u64, n: u64, slow: Duration, stream: bool) -> (u64, u64) {
    let (slow_count, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (slow_count, failed) = (slow_count.clone(), failed.clone());
            tokio::spawn(async move {
                for i in 0..n {
                    let prompt = format!("client {c} request {i}: hello");
                    let (status, complete, took) = chat_once(addr, &prompt, stream, 2).await;
                    if status != 200 || !complete {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if took > slow {
                        slow_count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("the load ends").expect("client");
    }
    (slow_count.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_get_no_head_are_hedged_on_another_endpoint_by_default() {
    hedged_when_no_head_comes(false).await;
}

/// The same with event streams: a stream is hedged only before its response head, and the
/// winner's stream reaches the client whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_get_no_head_are_hedged_too() {
    hedged_when_no_head_comes(true).await;
}

async fn hedged_when_no_head_comes(stream: bool) {
    let mut mocks = Vec::new();
    for seed in 1..=3 {
        let config = MockConfig {
            models: vec!["llama".to_owned()],
            engine: EngineConfig { speed: 4.0, ..EngineConfig::preset(Gpu::H100) },
            seed,
            ..MockConfig::default()
        };
        mocks.push(MockServer::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock"));
    }
    let eps: Vec<(&str, SocketAddr, &str)> =
        vec![("a", mocks[0].local_addr(), ""), ("b", mocks[1].local_addr(), ""), ("c", mocks[2].local_addr(), "")];
    let running = proxy(&endpoints(&eps)).await;

    // Learn each endpoint's times to a response head (16 are needed before hedging).
    let (_, failed) = load(running.addr, 4, 30, Duration::from_secs(10), stream).await;
    assert_eq!(failed, 0);
    // Now each backend accepts 5% of requests and never answers them. Without hedging each
    // of those waits for the adaptive first-byte deadline (at least 250 ms) and a retry.
    for m in &mocks {
        m.set_faults(&FaultsPatch { hang_rate: Some(0.05), ..Default::default() }).expect("fault");
    }
    let stats = &running.pool.safety().stats;
    let (slow, failed) = load(running.addr, 4, 50, Duration::from_millis(200), stream).await;
    let (hedges, won) = (stats.hedges.load(Ordering::Relaxed), stats.hedges_won.load(Ordering::Relaxed));
    let retries = stats.retries.load(Ordering::Relaxed);
    println!(
        "stream {stream}: 200 requests with 5% never answered: {slow} slower than 200 ms, {failed} failed; \
         {hedges} hedges, {won} won, {retries} retries"
    );
    assert_eq!(failed, 0);
    // About 10 of the 200 hung: hedged, nearly all answer in well under 200 ms (a hedge that
    // hangs too, 5% of 5%, still gets its first-byte deadline and a retry).
    assert!(slow <= 3, "{slow} requests slower than 200 ms");
    assert!(won >= 4 && hedges >= won, "hedges {hedges}, won {won}");
    running.shutdown().await;
    for m in mocks {
        m.shutdown().await;
    }
}
