//! Overload: admission control, priority classes and rate limits over real sockets.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_fast_with_retry_after_and_bounded_queueing() {
    let slow = backend("slow", Behavior::Stream { chunks: 3, gap: Duration::from_millis(150) }).await;
    let toml = one_pool(
        "\"round_robin\"",
        &[&slow],
        "admission = { max_in_flight = 4, max_queue = 4, queue_timeout = \"200ms\" }",
    );
    let running = proxy(&toml).await;
    let addr = running.proxy_addr;
    let mut rss_after_first = 0;
    for round in 0..5 {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let (status, headers, _) = send(addr, get("/")).await;
                    (status, headers.get("retry-after").cloned(), started.elapsed())
                })
            })
            .collect();
        let (mut ok, mut rejected) = (0, 0);
        for t in tasks {
            let (status, retry_after, took) = t.await.unwrap();
            match status.as_u16() {
                200 => {
                    ok += 1;
                    // Served at once, or after a bounded wait in the queue.
                    assert!(took < Duration::from_millis(200 + 300 + 400), "served after {took:?}");
                }
                503 => {
                    rejected += 1;
                    assert!(retry_after.is_some(), "503 without Retry-After");
                    // Turned away at once or when the queue time ran out, never later.
                    assert!(took < Duration::from_millis(200 + 250), "rejected after {took:?}");
                }
                other => panic!("unexpected status {other}"),
            }
        }
        assert!(ok >= 4, "round {round}: {ok} served");
        assert!(rejected >= 28, "round {round}: {rejected} rejected");
        assert!(t0.elapsed() < Duration::from_secs(3));
        if round == 0 {
            rss_after_first = rss_kib();
        }
    }
    // No growth in memory across rounds of overload (generous: allocator noise).
    let grown = rss_kib().saturating_sub(rss_after_first);
    assert!(grown < 16 * 1024, "resident memory grew by {grown} KiB");
    let stats = &running.pools[0].safety().stats;
    assert!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed) >= 5 * 28);
    running.shutdown().await;
}

#[tokio::test]
async fn higher_priority_classes_leave_the_queue_first() {
    let (low_done, high_done) = low_then_high(true).await;
    assert!(high_done < low_done, "the high-priority request, queued later, must finish first");
}

#[tokio::test]
async fn an_untrusted_listener_cannot_claim_a_higher_class() {
    // The default: clients of a listener without trust_priority are capped at class 0.
    let (low_done, high_done) = low_then_high(false).await;
    assert!(low_done < high_done, "a claimed class from an untrusted client must not jump the queue");
}

/// A request holding the pool's one slot, then a class-0 request and a class-7 one queued
/// behind it: when each finished.
async fn low_then_high(trusted: bool) -> (Instant, Instant) {
    let slow = backend("slow", Behavior::Stream { chunks: 2, gap: Duration::from_millis(200) }).await;
    let toml = one_pool(
        "\"round_robin\"",
        &[&slow],
        "admission = { max_in_flight = 1, max_queue = 10, queue_timeout = \"5s\", priority_header = \"x-priority\" }",
    )
    .replace("pool = \"p\"\n", &format!("pool = \"p\"\ntrust_priority = {trusted}\n"));
    let running = proxy(&toml).await;
    let addr = running.proxy_addr;
    let request = |prio: &'static str| {
        Request::get("/").header("host", "x").header("x-priority", prio).body(Full::new(Bytes::new())).expect("ok")
    };
    let first = tokio::spawn(async move { send(addr, request("0")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let low = tokio::spawn(async move {
        send(addr, request("0")).await;
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let high = tokio::spawn(async move {
        send(addr, request("7")).await;
        Instant::now()
    });
    assert_eq!(first.await.expect("ok").0, 200);
    let (low_done, high_done) = (low.await.expect("ok"), high.await.expect("ok"));
    running.shutdown().await;
    (low_done, high_done)
}

#[tokio::test]
async fn rate_limits_answer_429_per_client_key() {
    let a = backend("a", Behavior::Echo).await;
    let toml = one_pool("\"round_robin\"", &[&a], "rate_limit = { key = \"header:x-api-key\", rate = 2.0, burst = 5 }");
    let running = proxy(&toml).await;
    let mut client = h1(running.proxy_addr).await;
    let with_key =
        |k: &str| Request::get("/").header("host", "x").header("x-api-key", k).body(Full::new(Bytes::new())).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let resp = client.send_request(with_key("alice")).await.unwrap();
        if resp.status() == 429 {
            let retry = resp.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
        statuses.push(resp.status().as_u16());
        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
    }
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    assert!((5..=6).contains(&allowed), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 12 - allowed);
    // Another key has its own bucket.
    let (status, _, _) = send(running.proxy_addr, with_key("bob")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
}
