//! End-to-end tests of the HTTP data plane over real sockets on 127.0.0.1.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fulcrum_config::Config;
use fulcrum_core::{PolicyKind, RequestFacts, Selector};
use http::Request;
use http_body_util::{BodyExt, Full};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn backend_of(headers: &http::HeaderMap) -> String {
    headers.get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned()
}

#[tokio::test]
async fn every_policy_routes_as_the_core_says() {
    let (a, b, c) =
        (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await, backend("c", Behavior::Echo).await);
    for kind in PolicyKind::ALL {
        let policy = match kind {
            PolicyKind::HeaderHash => r#"{ name = "header_hash", header = "x-user" }"#.to_owned(),
            PolicyKind::CookieHash => r#"{ name = "cookie_hash", cookie = "sid" }"#.to_owned(),
            PolicyKind::ConsistentHash | PolicyKind::BoundedLoad | PolicyKind::Maglev | PolicyKind::Rendezvous => {
                format!(r#"{{ name = "{kind}", key = "header:x-user" }}"#)
            }
            k => format!("\"{k}\""),
        };
        let toml = one_pool(&policy, &[&a, &b, &c], "");
        let running = proxy(&toml).await;
        // The same pool, built by the core alone, predicts where each request goes.
        let config = Config::parse(&toml, None).unwrap();
        let pc = &config.pools["p"];
        let oracle =
            Selector::try_new(pc.policy.clone(), pc.options.clone(), pc.endpoints.clone(), fulcrum_core::Instant::ZERO)
                .unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
        let mut client = h1(running.proxy_addr).await;
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..30 {
            let user = format!("user-{}", i % 7);
            let req = Request::get("/v1/models")
                .header("host", "test.local")
                .header("x-user", &user)
                .header("cookie", format!("sid={user}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            let got = backend_of(resp.headers());
            resp.into_body().collect().await.unwrap();
            *seen.entry(got.clone()).or_default() += 1;
            let key = user.as_bytes();
            let expected = match kind {
                PolicyKind::RoundRobin | PolicyKind::WeightedRoundRobin | PolicyKind::IpHash => {
                    let facts = RequestFacts::with_client("127.0.0.1".parse().unwrap());
                    Some(oracle.pick(&facts, fulcrum_core::Instant::ZERO, &mut rng, |_| true).unwrap())
                }
                PolicyKind::HeaderHash
                | PolicyKind::CookieHash
                | PolicyKind::ConsistentHash
                | PolicyKind::BoundedLoad
                | PolicyKind::Maglev
                | PolicyKind::Rendezvous => Some(
                    oracle.pick(&RequestFacts::with_key(key), fulcrum_core::Instant::ZERO, &mut rng, |_| true).unwrap(),
                ),
                // Load- and randomness-driven: checked by their spread below.
                _ => None,
            };
            if let Some(e) = expected {
                assert_eq!(got, e.id().as_str(), "{kind}: request {i}");
            }
        }
        if matches!(
            kind,
            PolicyKind::Random | PolicyKind::LeastConnections | PolicyKind::LeastResponseTime | PolicyKind::PowerOfTwo
        ) {
            // Sequential requests leave every endpoint idle: ties rotate and random spreads.
            assert_eq!(seen.len(), 3, "{kind}: {seen:?}");
        }
        assert_eq!(seen.values().sum::<usize>(), 30);
        running.shutdown().await;
    }
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut client = h1(running.proxy_addr).await;
    for _ in 0..20 {
        let resp = client.send_request(get("/")).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(a.requests.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert_eq!(a.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn streamed_tokens_reach_the_client_while_the_backend_generates() {
    let s = backend("s", Behavior::Stream { chunks: 6, gap: Duration::from_millis(250) }).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&s], "")).await;
    let mut client = h1(running.proxy_addr).await;
    let t0 = Instant::now();
    let resp = client.send_request(get("/v1/chat/completions")).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = t0.elapsed();
    assert!(first.starts_with(b"data: {\"token\":0}"), "{first:?}");
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        rest.extend_from_slice(&frame.unwrap().into_data().unwrap_or_default());
    }
    let total = t0.elapsed();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    // The backend takes 5 x 250 ms; the first token must not wait for that.
    assert!(total >= Duration::from_millis(1_200), "{total:?}");
    assert!(first_at < total - Duration::from_millis(800), "first token after {first_at:?} of {total:?}");
    // Load counted until the stream ended, then released.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(running.pools[0].snapshot().selector.in_flight(), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn model_routing_reads_the_body_and_forwards_it_unchanged() {
    let (a, b, d) =
        (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await, backend("d", Behavior::Echo).await);
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
max_body_bytes = 2048

[[route]]
match = {{ path_prefix = "/v1/", model = "llama" }}
pool = "llama"

[[route]]
match = {{ path_prefix = "/v1/", model = ["qwen", "qwen-chat"] }}
pool = "qwen"

[[route]]
match = {{ path_prefix = "/other" }}
pool = "other"

[pool.llama]
endpoints = {}
[pool.qwen]
endpoints = {}
[pool.other]
endpoints = {}
"#,
        endpoints(&[&a]),
        endpoints(&[&b]),
        endpoints(&[&d])
    );
    let running = proxy(&toml).await;
    let body = r#"{"model":"qwen-chat","messages":[{"role":"user","content":"hello"}]}"#;
    let (status, headers, resp) = send(running.proxy_addr, post_json("/v1/chat/completions", body)).await;
    assert_eq!(status, 200);
    assert_eq!(backend_of(&headers), "b");
    assert_eq!(json(&resp)["body"], body);
    let (_, headers, _) =
        send(running.proxy_addr, post_json("/v1/completions", r#"{"model":"llama","prompt":"x"}"#)).await;
    assert_eq!(backend_of(&headers), "a");
    // No route for an unknown model: 404 in JSON.
    let (status, _, resp) = send(running.proxy_addr, post_json("/v1/completions", r#"{"model":"gpt-9"}"#)).await;
    assert_eq!(status, 404);
    assert_eq!(json(&resp)["error"]["type"], "no_route");
    // A route without model conditions never reads the body (streamed through).
    let (_, headers, _) = send(running.proxy_addr, post_json("/other", "not json at all")).await;
    assert_eq!(backend_of(&headers), "d");
    // Over the limit: 413, by content-length and by the bytes actually sent.
    let big = format!(r#"{{"model":"llama","prompt":"{}"}}"#, "x".repeat(4096));
    let (status, _, resp) = send(running.proxy_addr, post_json("/v1/completions", &big)).await;
    assert_eq!(status, 413);
    assert_eq!(json(&resp)["error"]["type"], "body_too_large");
    running.shutdown().await;
}

#[tokio::test]
async fn sticky_cookie_keeps_a_client_on_its_endpoint() {
    let (a, b, c) =
        (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await, backend("c", Behavior::Echo).await);
    let running = proxy(&one_pool("\"round_robin\"", &[&a, &b, &c], "sticky_cookie = \"lb\"")).await;
    let (_, headers, _) = send(running.proxy_addr, get("/")).await;
    let first = backend_of(&headers);
    let cookie = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("lb="), "{cookie}");
    for _ in 0..6 {
        let req = Request::get("/")
            .header("host", "x")
            .header("cookie", format!("other=1; {cookie}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (_, headers, _) = send(running.proxy_addr, req).await;
        assert_eq!(backend_of(&headers), first);
        assert!(!headers.contains_key("set-cookie"));
    }
    // Without the cookie, round robin moves on.
    let (_, headers, _) = send(running.proxy_addr, get("/")).await;
    assert_ne!(backend_of(&headers), first);
    running.shutdown().await;
}

#[tokio::test]
async fn model_routing_wins_over_a_sticky_cookie_and_a_drained_endpoint_is_left() {
    let (llama, qwen, qwen2) = (
        backend("llama", Behavior::Echo).await,
        backend("qwen", Behavior::Echo).await,
        backend("qwen2", Behavior::Echo).await,
    );
    let endpoints = format!(
        r#"[{{ address = "{}", id = "llama", models = ["llama"] }}, {{ address = "{}", id = "qwen", models = ["qwen"] }}, {{ address = "{}", id = "qwen2", models = ["qwen"] }}]"#,
        llama.addr, qwen.addr, qwen2.addr
    );
    let pool = format!("policy = \"round_robin\"\nendpoints = {endpoints}\nsticky_cookie = \"lb\"");
    let running = proxy(&one_pool_with(&pool, "")).await;
    let ask = |model: &str, cookie: Option<&str>| {
        let mut req = Request::post("/v1/completions").header("host", "x").header("content-type", "application/json");
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.body(Full::new(Bytes::from(format!(r#"{{"model":"{model}","prompt":"hi"}}"#)))).unwrap()
    };
    // A client stuck to the llama endpoint asks for qwen: the qwen endpoints answer.
    let (_, headers, _) = send(running.proxy_addr, ask("llama", None)).await;
    assert_eq!(backend_of(&headers), "llama");
    let cookie = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    for _ in 0..4 {
        let (status, headers, _) = send(running.proxy_addr, ask("qwen", Some(&cookie))).await;
        assert_eq!(status, 200);
        assert!(backend_of(&headers).starts_with("qwen"), "{:?}", backend_of(&headers));
    }
    // Stuck to qwen, then qwen drains: the client goes to qwen2.
    let (_, headers, _) = send(running.proxy_addr, ask("qwen", None)).await;
    let (first, cookie) =
        (backend_of(&headers), headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned());
    running.pools[0].drain(&first, std::time::Duration::from_millis(10)).await;
    for _ in 0..3 {
        let (status, headers, _) = send(running.proxy_addr, ask("qwen", Some(&cookie))).await;
        assert_eq!(status, 200);
        assert_ne!(backend_of(&headers), first);
    }
    running.shutdown().await;
}

#[tokio::test]
async fn header_hygiene() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let req = Request::get("/path?q=1")
        .header("host", "api.example.com")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "s")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("x-forwarded-for", "10.9.8.7")
        .header("x-kept", "yes")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(running.proxy_addr, req).await;
    assert_eq!(status, 200);
    let seen = &json(&body)["headers"];
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "api.example.com");
    assert_eq!(seen["host"], "api.example.com");
    for gone in ["x-secret", "keep-alive", "proxy-connection"] {
        assert!(seen.get(gone).is_none(), "{gone} passed: {seen}");
    }
    assert_eq!(json(&body)["uri"], "/path?q=1");
    let id = seen["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(headers["x-request-id"], id);
    // Response hop-by-hop headers are stripped too.
    assert!(!headers.contains_key("x-hop"));
    // A client's own request id passes through.
    let req = Request::get("/")
        .header("host", "x")
        .header("x-request-id", "trace-me-42")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, headers, body) = send(running.proxy_addr, req).await;
    assert_eq!(json(&body)["headers"]["x-request-id"], "trace-me-42");
    assert_eq!(headers["x-request-id"], "trace-me-42");
    running.shutdown().await;
}

#[tokio::test]
async fn http2_clients_are_served_over_http1_upstreams() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut client = h2(running.proxy_addr).await;
    for i in 0..3 {
        let req = Request::get(format!("http://h2.example.com/v1/models?i={i}")).body(Full::new(Bytes::new())).unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen = json(&body);
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["uri"], format!("/v1/models?i={i}"));
        assert_eq!(seen["headers"]["host"], "h2.example.com");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let w = backend("w", Behavior::Upgrade).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&w], "")).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "connection closed during handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping"[..], b"hello over the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
    running.shutdown().await;
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() {
    // 502: nothing listens on port 1.
    let toml = r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "dead"
[pool.dead]
endpoints = [{ address = "127.0.0.1:1" }]
"#;
    let running = proxy(toml).await;
    let (status, headers, body) = send(running.proxy_addr, get("/")).await;
    assert_eq!(status, 502);
    assert_eq!(json(&body)["error"]["type"], "upstream_connect_failed");
    assert_eq!(json(&body)["error"]["request_id"], headers["x-request-id"].to_str().unwrap());
    running.shutdown().await;

    // 503: a pool with no endpoints.
    let running =
        proxy("[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"empty\"\n[pool.empty]\n").await;
    let (status, _, body) = send(running.proxy_addr, get("/")).await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["error"]["type"], "no_healthy_endpoint");
    running.shutdown().await;

    // 504: the backend accepts and never answers.
    let h = backend("h", Behavior::Hang).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&h], "first_byte_timeout = \"300ms\"")).await;
    let t0 = Instant::now();
    let (status, _, body) = send(running.proxy_addr, get("/")).await;
    assert_eq!(status, 504);
    assert_eq!(json(&body)["error"]["type"], "upstream_timeout");
    assert!(t0.elapsed() >= Duration::from_millis(300) && t0.elapsed() < Duration::from_secs(5));
    running.shutdown().await;

    // 404 without a route or default pool.
    let running = proxy("[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n").await;
    let (status, _, _) = send(running.proxy_addr, get("/")).await;
    assert_eq!(status, 404);
    running.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_a_stream_in_flight() {
    let s = backend("s", Behavior::Stream { chunks: 5, gap: Duration::from_millis(200) }).await;
    let mut running = proxy(&one_pool("\"round_robin\"", &[&s], "")).await;
    let addr = running.proxy_addr;
    let mut client = h1(addr).await;
    let resp = client.send_request(get("/stream")).await.unwrap();
    let mut body = resp.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    // Ask the proxy to stop while the stream is still running.
    let _ = running.stop.take().unwrap().send(());
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        text.extend_from_slice(&frame.unwrap().into_data().unwrap_or_default());
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("\"token\":4") && text.ends_with("data: [DONE]\n\n"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), running.done).await.unwrap().unwrap();
    // Stopped: new connections are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn the_drain_timeout_cuts_what_is_still_running() {
    let s = backend("s", Behavior::Stream { chunks: 100, gap: Duration::from_millis(100) }).await;
    let mut running = proxy(&one_pool_with(
        &format!("policy = \"round_robin\"\nendpoints = {}", endpoints(&[&s])),
        "[proxy]\ndrain_timeout = \"300ms\"",
    ))
    .await;
    let mut client = h1(running.proxy_addr).await;
    let resp = client.send_request(get("/stream")).await.unwrap();
    let mut body = resp.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    let t0 = Instant::now();
    let _ = running.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(5), running.done).await.expect("stops after the drain timeout").unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(250), "stopped after {:?}", t0.elapsed());
    // The stream (10 s long) was cut: it ends early, with an error.
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the stream ends once the proxy stopped");
    assert!(ended, "a cut stream must not look complete");
}

#[tokio::test]
async fn client_limits_hold_connections_and_slow_bodies() {
    let a = backend("a", Behavior::Echo).await;
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
max_connections = 2
body_read_timeout = "300ms"

[[route]]
match = {{ model = "m" }}
pool = "p"

[pool.p]
endpoints = {}
"#,
        endpoints(&[&a])
    );
    let running = proxy(&toml).await;
    // A slow body on a route that reads it: 408 once body_read_timeout has passed.
    let mut slow = TcpStream::connect(running.proxy_addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":").await.unwrap();
    let t0 = Instant::now();
    let mut answer = vec![0u8; 1024];
    let n = slow.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    drop(slow);
    // Two connections held open (each has had an answer, so the proxy counts it, and the
    // closed slow one no longer); the third is closed at once.
    async fn served(addr: std::net::SocketAddr) -> TcpStream {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                && buf[..n].starts_with(b"HTTP/1.1 ")
            {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "no connection was served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let first = served(running.proxy_addr).await;
    let second = served(running.proxy_addr).await;
    let mut third = TcpStream::connect(running.proxy_addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await.expect("closed, not hung");
    assert!(matches!(read, Ok(0) | Err(_)), "the third connection must be closed: {read:?}");
    drop((first, second));
    running.shutdown().await;
}
