//! The client side of HTTP/1.1 over raw sockets: keep-alive and close, pipelining, HTTP/1.0,
//! HEAD, bodies, and the hand-over to hyper for what the proxy's own parser leaves to it.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a json body")
    }
}

/// Reads one response from `stream` (bytes after it stay in `buf`); `head_only` for the
/// answer to a HEAD. Bounded in time.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Raw {
    tokio::time::timeout(Duration::from_secs(10), read_response_inner(stream, buf, head_only))
        .await
        .expect("a response within 10 s")
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await.expect("read");
    buf.extend_from_slice(&chunk[..n]);
    n
}

async fn read_response_inner(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Raw {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(fill(stream, buf).await > 0, "closed before a response head: {:?}", String::from_utf8_lossy(buf));
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head");
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header line");
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut raw = Raw { status, headers, body: Vec::new() };
    if head_only || status == 204 || status == 304 {
        return raw;
    }
    if let Some(len) = raw.header("content-length") {
        let len: usize = len.parse().expect("a length");
        while buf.len() < len {
            assert!(fill(stream, buf).await > 0, "closed inside a body");
        }
        raw.body = buf.drain(..len).collect();
    } else if raw.header("transfer-encoding") == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(fill(stream, buf).await > 0, "closed inside a chunk size");
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).expect("ascii"), 16).expect("hex");
            while buf.len() < line_end + 2 + size + 2 {
                assert!(fill(stream, buf).await > 0, "closed inside a chunk");
            }
            raw.body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        while fill(stream, buf).await > 0 {}
        raw.body = std::mem::take(buf);
    }
    raw
}

/// A config whose listener "public" has the `extra` lines, in front of backend `a`.
fn listener_with(extra: &str, a: &Backend) -> String {
    format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n{extra}\n\n[pool.p]\nendpoints = {}\n",
        endpoints(&[a])
    )
}

/// Whether the proxy closes the connection (bounded wait).
async fn closes(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(within, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /three HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    for (path, body) in [("/one", ""), ("/two", "hello"), ("/three", "")] {
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["uri"], path);
        assert_eq!(r.json()["body"], body);
        assert!(r.header("connection").is_none(), "kept alive: {r:?}");
        assert!(r.header("x-request-id").is_some());
    }
    running.shutdown().await;
}

#[tokio::test]
async fn keep_alive_follows_the_client_version_and_connection_header() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut buf = Vec::new();

    // HTTP/1.0 closes after the response unless the client asks to keep it.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.0\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(closes(&mut s, Duration::from_secs(5)).await);

    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    for path in ["/b", "/c"] {
        s.write_all(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes()).await.unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.json()["uri"], path);
        // The client's connection header is this hop's, not the upstream's.
        assert!(r.json()["headers"].get("connection").is_none());
    }

    // HTTP/1.1 with `Connection: close`.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(closes(&mut s, Duration::from_secs(5)).await);

    // Shutdown closes an idle keep-alive connection at once, not after the drain timeout
    // (30 s) or header_read_timeout (30 s).
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let t0 = Instant::now();
    running.shutdown().await;
    assert!(closes(&mut s, Duration::from_secs(1)).await);
    assert!(t0.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t0.elapsed());
}

#[tokio::test]
async fn head_answers_carry_no_body_and_the_connection_goes_on() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, true).await;
    assert_eq!(r.status, 200);
    s.write_all(b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["uri"], "/g", "no stray body bytes before the second answer");
    running.shutdown().await;
}

#[tokio::test]
async fn an_absolute_form_target_names_the_host_and_routes_by_it() {
    let a = backend("a", Behavior::Echo).await;
    let b = backend("b", Behavior::Echo).await;
    let toml = format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\nlistener = \"public\"\nmatch = {{ host = \"api.example\" }}\npool = \"b\"\n\n\
         [[route]]\nlistener = \"public\"\npool = \"a\"\n\n\
         [pool.a]\nendpoints = {}\n\n[pool.b]\nendpoints = {}\n",
        endpoints(&[&a]),
        endpoints(&[&b])
    );
    let running = proxy(&toml).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    let mut buf = Vec::new();
    // The target's authority wins over the Host line (RFC 9112, 3.2.2), for routing and upstream.
    s.write_all(b"GET http://api.example:8000/p?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["backend"], "b", "{echo}");
    assert_eq!(echo["uri"], "/p?q=1", "origin-form upstream");
    assert_eq!(echo["headers"]["host"], "api.example:8000");
    assert_eq!(echo["headers"]["x-forwarded-host"], "api.example:8000");
    s.write_all(b"GET /p HTTP/1.1\r\nHost: api.example\r\n\r\n").await.unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, false).await.json()["backend"],
        "b",
        "by Host without a target authority"
    );
    s.write_all(b"GET http://other.example/p HTTP/1.1\r\nHost: api.example\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.json()["backend"], "a");
    running.shutdown().await;
}

#[tokio::test]
async fn a_body_arriving_in_pieces_is_forwarded_whole() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b" world").await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["body"], "hello world");
    assert_eq!(r.json()["headers"]["content-length"], "11");
    // A larger one, in pieces, on the same connection.
    let body = "0123456789abcdef".repeat(200 * 1024 / 16);
    s.write_all(format!("POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes())
        .await
        .unwrap();
    for piece in body.as_bytes().chunks(30_000) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["body_len"].as_u64(), Some(body.len() as u64));
    assert_eq!(r.json()["body"].as_str(), Some(body.as_str()));
    running.shutdown().await;
}

#[tokio::test]
async fn what_the_proxy_does_not_parse_itself_is_served_by_hyper() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&listener_with(r#"max_body_bytes = 16"#, &a)).await;
    let mut buf = Vec::new();

    // One connection: a plain GET, then a chunked body (hyper from here on), then a GET.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.json()["uri"], "/first");
    s.write_all(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.json()["uri"].as_str(), r.json()["body"].as_str()), (Some("/chunked"), Some("hello world")));
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.json()["uri"], "/after");

    // A body over max_body_bytes that nothing needs to read streams through.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    let body = "x".repeat(100);
    s.write_all(format!("POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{body}").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (200, Some(100)));

    // Expect: 100-continue gets its interim answer.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(fill(&mut s, &mut head).await > 0);
    }
    assert!(head.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"ok").await.unwrap();
    let mut rest = head[head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..].to_vec();
    assert_eq!(read_response(&mut s, &mut rest, false).await.json()["body"], "ok");

    // Malformed requests: hyper's 400.
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
        s.write_all(bad).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    running.shutdown().await;
}

#[tokio::test]
async fn streams_reach_http10_clients_until_the_connection_closes() {
    let s = backend("s", Behavior::Stream { chunks: 3, gap: Duration::from_millis(20) }).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&s], "")).await;
    let mut c = TcpStream::connect(running.proxy_addr).await.unwrap();
    c.write_all(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut c, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "an unknown length ends with the connection");
    assert!(r.header("transfer-encoding").is_none());
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("\"token\":2") && text.ends_with("data: [DONE]\n\n"), "{text}");
    running.shutdown().await;
}

#[tokio::test]
async fn idle_connections_close_after_header_read_timeout() {
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&listener_with(r#"header_read_timeout = "300ms""#, &a)).await;
    let mut buf = Vec::new();
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let t0 = Instant::now();
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    assert!(t0.elapsed() >= Duration::from_millis(250), "closed after {:?}", t0.elapsed());
    // A head that never ends is cut off too.
    let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(closes(&mut s, Duration::from_secs(5)).await);
    running.shutdown().await;
}

#[tokio::test]
async fn a_request_begun_before_shutdown_is_answered_whoever_serves_it() {
    let a = backend("a", Behavior::Echo).await;
    let mut running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let addr = running.proxy_addr;
    let mut buf = Vec::new();
    // Two connections with half a request each when the proxy is told to stop: the rest is
    // a plain body on one, a chunked one (which hyper serves) on the other.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let mut chunked = TcpStream::connect(addr).await.unwrap();
    // (Sent with a first request in one write: once that is answered, the proxy holds the half.)
    for s in [&mut plain, &mut chunked] {
        s.write_all(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\nPOST /late HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        assert_eq!(read_response(s, &mut buf, false).await.status, 200);
    }
    let _ = running.stop.take().unwrap().send(());
    // Stopped accepting: the listener is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener is still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    plain.write_all(b"Content-Length: 5\r\n\r\nhello").await.unwrap();
    chunked.write_all(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").await.unwrap();
    for s in [&mut plain, &mut chunked] {
        let r = read_response(s, &mut buf, false).await;
        assert_eq!((r.status, r.header("connection")), (200, Some("close")), "{r:?}");
        assert_eq!(r.json()["body"], "hello");
        assert!(closes(s, Duration::from_secs(5)).await);
    }
    tokio::time::timeout(Duration::from_secs(5), running.done).await.expect("stops").expect("no panic");
}
