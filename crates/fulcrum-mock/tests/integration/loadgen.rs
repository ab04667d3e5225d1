//! The load generator against a mock: it holds its streams and counts what the model sends.

use crate::common;

use std::time::Duration;

use common::*;
use fulcrum_mock::loadgen::{self, LoadConfig, LoadError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_its_streams_and_measures_them() {
    let server = start(config(10)).await;
    let config = LoadConfig {
        concurrency: 40,
        warmup: Duration::from_millis(300),
        duration: Duration::from_millis(1500),
        max_tokens: Some(20),
        prompt_tokens: 100,
        shared_prefix_tokens: 64,
        ..LoadConfig::new(server.base_url())
    };
    let report = loadgen::run(&config).await.unwrap();
    println!("{report}");
    assert_eq!(report.requests_failed, 0, "{:?}", report.first_error);
    assert!(report.requests_ok >= 40, "{report:?}");
    // Each stream: the first token with the prefill, then 19 more 10 ms apart, so 20 tokens
    // in a little over 190 ms: about 4,200 tokens/s for 40 streams, never more.
    assert!(report.tokens_per_sec <= 4600.0, "{}", report.tokens_per_sec);
    assert!(report.tokens_per_sec >= 2000.0, "{}", report.tokens_per_sec);
    assert!(report.open_streams_mean >= 30.0, "{}", report.open_streams_mean);
    assert!(report.server_running.is_some_and(|n| n >= 30), "{:?}", report.server_running);
    // 20 tokens 10 ms apart after the first: at least 190 ms a request.
    assert!(report.latency.p50 >= Duration::from_millis(185), "{:?}", report.latency);
    assert!(report.ttft.p50 < report.latency.p50);
    assert!(server.stats().counters.prefix_hits > 0, "the shared prefix hits the cache");
    server.shutdown().await;
}

#[tokio::test]
async fn failures_are_counted_not_fatal() {
    let mut cfg = config(1);
    cfg.faults.error_rate = 1.0;
    let server = start(cfg).await;
    let config = LoadConfig {
        concurrency: 2,
        warmup: Duration::ZERO,
        duration: Duration::from_millis(300),
        ..LoadConfig::new(server.base_url())
    };
    let report = loadgen::run(&config).await.unwrap();
    assert!(report.requests_failed > 0);
    assert_eq!(report.requests_ok, 0);
    assert!(report.first_error.as_deref().is_some_and(|e| e.contains("500")), "{:?}", report.first_error);
    server.shutdown().await;
    assert!(matches!(loadgen::run(&LoadConfig::new("ftp://x")).await, Err(LoadError::BadUrl(_))));
    let zero = LoadConfig { concurrency: 0, ..LoadConfig::new("http://127.0.0.1:1") };
    assert!(matches!(loadgen::run(&zero).await, Err(LoadError::Invalid(_))));
}
