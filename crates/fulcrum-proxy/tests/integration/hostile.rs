//! Hostile and broken clients over raw sockets: what a client does wrong is answered 4xx and
//! never counted against the endpoint (issue P1.3, finding F1: ten broken uploads used to
//! open every breaker and eject the endpoint, and every other client then got 503).

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status of the first response on `stream`, or 0 if it closed without one (bounded).
async fn status_of(stream: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                return line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an answer or a close within 10 s")
}

/// The endpoint still takes traffic: no failure counted, no open circuit, no ejection.
fn unharmed(running: &Running) {
    let snapshot = running.pools[0].snapshot();
    let s = snapshot.selector.endpoints()[0].signals();
    assert_eq!(s.consecutive_failures(), 0, "a client's fault was counted against the endpoint");
    assert!(s.is_available(fulcrum_proxy::clock::now()), "the endpoint was taken out by clients' faults");
}

#[tokio::test]
async fn broken_and_abandoned_uploads_are_the_clients_fault() {
    let a = backend("a", Behavior::Echo).await;
    // The defaults: breakers open after 5 failures, outlier detection ejects after 5.
    let running = proxy(&one_pool_with(&format!("endpoints = {}", endpoints(&[&a])), "")).await;
    for _ in 0..12 {
        // A chunked body whose next chunk size is not hex.
        let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
            .await
            .unwrap();
        let status = status_of(&mut s).await;
        assert!(status == 0 || (400..500).contains(&status), "a malformed chunked body got {status}");
        // An upload the client abandons half way.
        let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly ten b").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    unharmed(&running);
    let (status, _, _) = send(running.proxy_addr, get("/after")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn a_stalled_upload_is_408_and_not_the_endpoints_fault() {
    let a = backend("a", Behavior::Echo).await;
    let pool = format!("first_byte_timeout = \"300ms\"\nendpoints = {}", endpoints(&[&a]));
    let running = proxy(&one_pool_with(&pool, "")).await;
    let stalled: Vec<_> = (0..8)
        .map(|_| {
            let addr = running.proxy_addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                // Over 64 KiB: streamed to the endpoint as it arrives, not read whole first.
                let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n";
                s.write_all(format!("{head}{}", "x".repeat(10_000)).as_bytes()).await.unwrap();
                status_of(&mut s).await
            })
        })
        .collect();
    for t in stalled {
        assert_eq!(t.await.unwrap(), 408);
    }
    unharmed(&running);
    let (status, _, _) = send(running.proxy_addr, get("/after")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
}

/// The whole answer to one raw request (the connection is closed after it).
async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn ambiguous_hosts_are_refused_and_host_cannot_be_stripped() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool_with(&format!("endpoints = {}", endpoints(&[&a])), "")).await;
    let addr = running.proxy_addr;
    for (what, req) in [
        ("two Host headers", "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n"),
        ("userinfo in Host", "GET / HTTP/1.1\r\nHost: user@a.example\r\nConnection: close\r\n\r\n"),
        (
            "userinfo in the target",
            "GET http://user:pw@a.example/ HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let answer = raw_answer(addr, req).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.contains("bad_request_header"), "{what}: {answer}");
    }
    // `Connection: host` does not strip Host on the way upstream.
    let answer = raw_answer(addr, "GET /h HTTP/1.1\r\nHost: kept.example\r\nConnection: close, host\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("kept.example"), "the upstream saw the Host: {answer}");
    running.shutdown().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_header_read_timeout() {
    // Finding F2: an HTTP/2 preface and an empty SETTINGS frame held a connection slot
    // forever, so `max_connections` of them locked every other client out.
    let a = backend("a", Behavior::Echo).await;
    let toml = one_pool_with(&format!("endpoints = {}", endpoints(&[&a])), "")
        .replace("pool = \"p\"\n", "pool = \"p\"\nheader_read_timeout = \"300ms\"\n");
    let running = proxy(&toml).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.expect("write");
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection was still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    // A connection that keeps sending requests is not idle: h2 requests are served.
    let (status, _, _) = send(running.proxy_addr, get("/after")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn a_silent_http2_client_is_closed_after_unanswered_pings() {
    // A client that sent a request and then stops reading and answering (no PING ack, no
    // SETTINGS ack) holds no slot: keep-alive PINGs go unanswered, and the connection closes.
    let a = backend("a", Behavior::Echo).await;
    let toml = one_pool_with(&format!("endpoints = {}", endpoints(&[&a])), "")
        .replace("pool = \"p\"\n", "pool = \"p\"\nheader_read_timeout = \"300ms\"\n");
    let running = proxy(&toml).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
    // HEADERS, END_STREAM | END_HEADERS, stream 1: GET / (HPACK static entries, authority `x`).
    hello.extend_from_slice(&[0, 0, 6, 1, 5, 0, 0, 0, 1, 0x82, 0x84, 0x86, 0x41, 0x01, b'x']);
    s.write_all(&hello).await.expect("write");
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a silent HTTP/2 client was still connected after 8 s ({} bytes read)", sink.len());
    assert!(started.elapsed() < Duration::from_secs(4), "closed after {:?}", started.elapsed());
    // Its request was answered before (a HEADERS frame came back on stream 1).
    assert!(sink.windows(5).any(|w| w[3] == 1 && w[4] & 4 != 0), "no response head came back");
    running.shutdown().await;
}

#[tokio::test]
async fn request_heads_are_limited_to_64_kib_over_http1_and_http2() {
    // The documented limit; hyper's own HTTP/1.1 limit (~400 KB) used to apply to heads our
    // parser handed over, and HTTP/2's was 16 KiB.
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool_with(&format!("endpoints = {}", endpoints(&[&a])), "")).await;
    let addr = running.proxy_addr;
    for kib in [60, 65] {
        let big = "a".repeat(kib * 1024);
        let answer =
            raw_answer(addr, &format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")).await;
        let want = if kib == 60 { "HTTP/1.1 200" } else { "HTTP/1.1 431" };
        assert!(answer.starts_with(want), "HTTP/1.1, a {kib} KiB head: {:?}", &answer[..answer.len().min(200)]);
        let mut c = h2(addr).await;
        let req = http::Request::get("http://x/")
            .header("x-big", big)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let status = c.send_request(req).await.map(|r| r.status().as_u16());
        if kib == 60 {
            assert_eq!(status.ok(), Some(200), "HTTP/2, a {kib} KiB head");
        } else {
            assert!(
                status.as_ref().is_err() || status.as_ref().ok() == Some(&431),
                "HTTP/2, a {kib} KiB head: {status:?}"
            );
        }
    }
    running.shutdown().await;
}
