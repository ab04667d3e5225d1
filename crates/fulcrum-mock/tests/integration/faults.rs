//! Each fault mode behaves as documented, set by configuration or by the admin endpoint.

use crate::common;

use std::time::Duration;

use common::*;
use fulcrum_mock::{CrashReason, Exit, Faults, FaultsPatch};
use serde_json::json;
use tokio::time::{Instant, timeout};

fn completion() -> serde_json::Value {
    json!({"model": "mock-llm", "prompt": "hello", "max_tokens": 2})
}

fn with_faults(faults: Faults) -> fulcrum_mock::MockConfig {
    fulcrum_mock::MockConfig { faults, ..config(1) }
}

#[tokio::test]
async fn error_rate_answers_500_and_the_admin_endpoint_changes_it() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    assert_eq!(post(addr, "/v1/completions", &completion()).await.status, 200);
    let set = post(addr, "/admin/faults", &json!({"error_rate": 1.0})).await;
    assert_eq!(set.status, 200);
    assert_eq!(set.json()["error_rate"], 1.0);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"model": "mock-llm", "prompt": "x", "messages": [{"role": "user", "content": "x"}]});
        let r = post(addr, path, &body).await;
        assert_eq!(r.status, 500);
        assert_eq!(r.json()["error"]["code"], "injected_fault");
    }
    assert_eq!(get(addr, "/health").await.status, 200, "health is not affected");
    let cleared = request(addr, "DELETE", "/admin/faults", "").await;
    assert_eq!(cleared.json()["error_rate"], 0.0);
    assert_eq!(post(addr, "/v1/completions", &completion()).await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_partial_error_rate_is_seeded() {
    let run = || async {
        let server = start(with_faults(Faults { error_rate: 0.5, ..Faults::default() })).await;
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(post(server.local_addr(), "/v1/completions", &completion()).await.status.as_u16());
        }
        server.shutdown().await;
        statuses
    };
    let (a, b) = (run().await, run().await);
    assert_eq!(a, b, "same seed, same faults");
    let errors = a.iter().filter(|s| **s == 500).count();
    assert!((5..=35).contains(&errors), "{errors} of 40");
    assert!(a.iter().all(|s| *s == 200 || *s == 500));
}

#[tokio::test]
async fn added_latency_and_spikes_delay_the_answer() {
    let faults = Faults { latency: Duration::from_millis(200), ..Faults::default() };
    let server = start(with_faults(faults)).await;
    let addr = server.local_addr();
    let t = Instant::now();
    assert_eq!(post(addr, "/v1/completions", &completion()).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(200), "{:?}", t.elapsed());
    server.set_faults(&FaultsPatch { spike_rate: Some(1.0), spike_ms: Some(300.0), ..Default::default() }).unwrap();
    let t = Instant::now();
    let s = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "x", 2)).await;
    let events = s.collect().await;
    let first = events.iter().find(|e| e.token().is_some()).unwrap().at;
    assert!(first - t >= Duration::from_millis(500), "TTFT {:?}", first - t);
    server.shutdown().await;
}

#[tokio::test]
async fn a_hanging_request_is_never_answered_until_shutdown() {
    let server = start(with_faults(Faults { hang_rate: 1.0, ..Faults::default() })).await;
    let addr = server.local_addr();
    let body = completion().to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let pending = tokio::spawn(async move { raw(addr, req.as_bytes(), PATIENCE).await });
    // The request is accepted (the server counts it) and nothing comes back.
    let deadline = Instant::now() + PATIENCE;
    while server.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // nothing may be answered meanwhile
    assert!(!pending.is_finished(), "a hanging request must not be answered");
    assert_eq!(get(addr, "/health").await.status, 200, "the server itself is fine");
    let t = Instant::now();
    assert_eq!(server.shutdown().await, Exit::Stopped);
    let answer = timeout(PATIENCE, pending).await.expect("closed at shutdown").unwrap();
    assert!(answer.is_empty(), "closed without an answer, got {:?}", String::from_utf8_lossy(&answer));
    assert!(t.elapsed() < Duration::from_secs(4), "shutdown does not wait for hanging requests");
}

#[tokio::test]
async fn crash_after_n_requests_stops_the_server_not_the_process() {
    let faults = Faults { crash_after_requests: Some(3), ..Faults::default() };
    let mut server = start(with_faults(faults)).await;
    let addr = server.local_addr();
    let mut s = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "long", 1000)).await;
    s.next().await.unwrap();
    assert_eq!(post(addr, "/v1/completions", &completion()).await.status, 200);
    let third = completion().to_string();
    let req = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{third}", third.len());
    let answer = raw(addr, req.as_bytes(), PATIENCE).await;
    assert!(answer.is_empty(), "the crashing request gets no answer: {:?}", String::from_utf8_lossy(&answer));
    let exit = timeout(PATIENCE, server.wait()).await.expect("crashed");
    assert_eq!(exit, Exit::Crashed(CrashReason::AfterRequests(3)));
    // Every connection dropped: the open stream ends without [DONE].
    let rest = timeout(PATIENCE, async {
        let mut n = 0;
        while let Some(e) = s.next().await {
            assert!(e.data.is_some(), "no [DONE] after a crash");
            n += 1;
        }
        n
    })
    .await
    .expect("stream cut");
    assert!(rest < 1000);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "nothing listens any more");
}

#[tokio::test]
async fn crash_after_time_fires_on_its_own() {
    let t = Instant::now();
    let mut server =
        start(with_faults(Faults { crash_after: Some(Duration::from_millis(300)), ..Faults::default() })).await;
    let exit = timeout(PATIENCE, server.wait()).await.expect("crashed");
    assert_eq!(exit, Exit::Crashed(CrashReason::AfterTime(Duration::from_millis(300))));
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Set at run time through the admin endpoint, it counts from then.
    let mut server = start(config(1)).await;
    let addr = server.local_addr();
    let t = Instant::now();
    assert_eq!(post(addr, "/admin/faults", &json!({"crash_after_secs": 0.2})).await.status, 200);
    assert!(matches!(
        timeout(PATIENCE, server.wait()).await.expect("crashed"),
        Exit::Crashed(CrashReason::AfterTime(_))
    ));
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn warm_up_says_not_ready_then_ready() {
    let t = Instant::now();
    let server = start(with_faults(Faults { warmup: Duration::from_millis(400), ..Faults::default() })).await;
    let addr = server.local_addr();
    let health = get(addr, "/health").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["status"], "warming_up");
    let r = post(addr, "/v1/completions", &completion()).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "warming_up");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(get(addr, "/load").await.json()["ready"], false);
    // Poll readiness as a balancer would.
    while get(addr, "/health").await.status != 200 {
        assert!(t.elapsed() < PATIENCE, "never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t.elapsed() >= Duration::from_millis(400), "ready too early: {:?}", t.elapsed());
    assert_eq!(post(addr, "/v1/completions", &completion()).await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_waiting_queue_answers_503() {
    let mut cfg = with_faults(Faults { max_waiting: Some(1), ..Faults::default() });
    cfg.engine.max_num_seqs = 1;
    cfg.engine.itl_base = Duration::from_millis(20);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut a = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "a", 200)).await;
    a.next().await.unwrap();
    let b = tokio::spawn(async move { post(addr, "/v1/completions", &completion()).await.status });
    wait_for_metric(addr, "vllm:num_requests_waiting", 1.0).await;
    let c = post(addr, "/v1/completions", &completion()).await;
    assert_eq!(c.status, 503);
    assert_eq!(c.json()["error"]["code"], "queue_full");
    assert_eq!(c.headers["retry-after"], "1");
    drop(a); // frees the slot: b runs
    assert_eq!(timeout(PATIENCE, b).await.unwrap().unwrap(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn the_admin_endpoint_validates_and_can_be_disabled() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    for bad in [json!({"error_rate": 2}), json!({"eror_rate": 0.1}), json!({"crash_after_requests": 0}), json!([1])] {
        let r = post(addr, "/admin/faults", &bad).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.json()["error"]["message"].is_string());
    }
    let view = get(addr, "/admin/faults").await.json();
    for key in
        ["error_rate", "latency_ms", "spike_rate", "spike_ms", "hang_rate", "warmup_secs", "requests_seen", "ready"]
    {
        assert!(view.get(key).is_some(), "{key} missing from {view}");
    }
    let patched =
        request(addr, "PATCH", "/admin/faults", json!({"latency_ms": 5, "max_waiting": 3}).to_string()).await.json();
    assert_eq!((patched["latency_ms"].as_f64(), patched["max_waiting"].as_u64()), (Some(5.0), Some(3)));
    assert_eq!(server.faults().latency, Duration::from_millis(5));
    assert_eq!(request(addr, "PUT", "/admin/faults", "{}").await.status, 405);
    server.shutdown().await;

    let mut cfg = config(1);
    cfg.server.admin = false;
    let server = start(cfg).await;
    assert_eq!(get(server.local_addr(), "/admin/faults").await.status, 404);
    server.shutdown().await;
}
