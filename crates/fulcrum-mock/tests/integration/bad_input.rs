//! Bad input gets an OpenAI-style error, never a panic or a hang, and the server goes on.

use crate::common;

use std::time::Duration;

use common::*;
use fulcrum_mock::engine::SplitMix64;
use serde_json::{Value, json};

fn assert_openai_error(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{}", answer.text());
    let e = answer.json();
    let error = e.get("error").unwrap_or_else(|| panic!("no error object: {e}"));
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(error["type"].is_string(), "{e}");
    assert_eq!(answer.headers["content-type"], "application/json");
}

#[tokio::test]
async fn malformed_json_is_400() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        for body in ["", "{", "not json", "[]", "{\"model\": 3}", "\u{0}\u{1}"] {
            let r = request(addr, "POST", path, body.to_owned()).await;
            assert_openai_error(&r, 400);
            assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn impossible_requests_are_400() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    let m = |extra: Value| {
        let mut v = json!({"model": "mock-llm", "messages": [{"role": "user", "content": "hi"}]});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    for body in [
        m(json!({"messages": []})),
        m(json!({"max_tokens": 0})),
        m(json!({"max_tokens": -1})),
        m(json!({"max_tokens": 1_000_000})),
        m(json!({"n": 2})),
        m(json!({"messages": [{"content": "no role"}]})),
        m(json!({"stream": "yes"})),
    ] {
        assert_openai_error(&post(addr, "/v1/chat/completions", &body).await, 400);
    }
    for body in [
        json!({"model": "mock-llm", "prompt": ["a", "b"]}),
        json!({"model": "mock-llm", "prompt": []}),
        json!({"model": "mock-llm", "prompt": "x".repeat(200_000), "max_tokens": 10}),
        json!({"model": "mock-llm"}),
    ] {
        assert_openai_error(&post(addr, "/v1/completions", &body).await, 400);
    }
    for body in [
        json!({"model": "mock-llm", "input": []}),
        json!({"model": "mock-llm", "input": "x", "encoding_format": "hex"}),
        json!({"model": "mock-llm", "input": vec!["x"; 3000]}),
    ] {
        assert_openai_error(&post(addr, "/v1/embeddings", &body).await, 400);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_model_is_404() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    let r = post(addr, "/v1/chat/completions", &chat("gpt-9", "hi", 2)).await;
    assert_openai_error(&r, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = post(addr, "/v1/embeddings", &json!({"model": "nope", "input": "x"})).await;
    assert_openai_error(&r, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let mut cfg = config(1);
    cfg.server.max_body_bytes = 1000;
    let server = start(cfg).await;
    let addr = server.local_addr();
    // Declared too large: refused without reading it.
    let big = json!({"model": "mock-llm", "prompt": "x".repeat(5000)});
    let r = post(addr, "/v1/completions", &big).await;
    assert_openai_error(&r, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // Chunked, with no length announced: cut off at the limit.
    let chunk = "x".repeat(1500);
    let raw_req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let answer = String::from_utf8_lossy(&raw(addr, raw_req.as_bytes(), PATIENCE).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(
        post(addr, "/v1/completions", &json!({"model": "mock-llm", "prompt": "ok", "max_tokens": 1})).await.status,
        200
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    assert_openai_error(&get(addr, "/v2/nothing").await, 404);
    assert_openai_error(&get(addr, "/v1/chat/completions").await, 405);
    assert_openai_error(&request(addr, "DELETE", "/metrics", "").await, 405);
    assert_openai_error(&post(addr, "/health", &json!({})).await, 405);
    server.shutdown().await;
}

#[tokio::test]
async fn broken_http_and_slow_clients_are_cut_off() {
    let mut cfg = config(1);
    cfg.server.read_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let answer = raw(addr, b"\x16\x03\x01 garbage that is not HTTP\r\n\r\n", PATIENCE).await;
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&answer));
    // Headers never finished: closed after the read timeout (408 or a plain close).
    let t = tokio::time::Instant::now();
    let answer = raw(addr, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n", PATIENCE).await;
    assert!(t.elapsed() < PATIENCE / 2, "slow headers must be cut off");
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&answer));
    // A body that never comes: 408 after the read timeout.
    let answer = raw(addr, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{", PATIENCE).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&answer));
    assert_eq!(get(addr, "/health").await.status, 200, "still serving");
    server.shutdown().await;
}

/// Seeded random bodies, mutated valid requests and odd JSON values: every one is answered
/// with a status the API documents, and the server stays healthy.
#[tokio::test]
async fn random_bodies_never_break_the_server() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    let mut rng = SplitMix64::new(2024);
    let valid = [
        chat("mock-llm", "hello there", 3).to_string(),
        json!({"model": "mock-llm", "prompt": [1, 2, 3], "max_tokens": 2}).to_string(),
        json!({"model": "mock-llm", "input": ["a", "b"]}).to_string(),
        json!({"error_rate": 0.0, "latency_ms": 0}).to_string(),
    ];
    let paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/admin/faults"];
    for i in 0..300 {
        let which = (rng.next_u64() % 4) as usize;
        let mut body = valid[which].clone().into_bytes();
        match i % 3 {
            0 => {
                for _ in 0..1 + rng.next_u64() % 4 {
                    let at = (rng.next_u64() as usize) % body.len();
                    body[at] = rng.next_u64() as u8;
                }
            }
            1 => body.truncate((rng.next_u64() as usize) % body.len()),
            _ => body = (0..rng.next_u64() % 64).map(|_| rng.next_u64() as u8).collect(),
        }
        let r = request(addr, "POST", paths[(rng.next_u64() % 4) as usize], body).await;
        assert!([200, 400, 404, 413].contains(&r.status.as_u16()), "status {} for case {i}", r.status);
        if r.status != 200 {
            assert!(r.json()["error"]["message"].is_string(), "case {i}");
        }
    }
    request(addr, "DELETE", "/admin/faults", "").await;
    assert_eq!(get(addr, "/health").await.status, 200);
    assert_eq!(
        post(addr, "/v1/completions", &json!({"model": "mock-llm", "prompt": "ok", "max_tokens": 1})).await.status,
        200
    );
    server.shutdown().await;
}
