//! End-to-end tests of the upstream HTTP/1.1 client: connection reuse, stale pooled
//! connections, framing, and bad upstreams, against raw-socket backends on 127.0.0.1.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw backend does with one request.
enum Reply {
    /// Sends these bytes, and keeps the connection open.
    Send(Vec<u8>),
    /// Sends these bytes, then closes.
    SendAndClose(Vec<u8>),
    /// Closes without answering.
    Close,
}

/// A backend speaking raw HTTP/1.1.
struct Raw {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Every request head received (with its body, if it had a `content-length`).
    requests: Arc<Mutex<Vec<String>>>,
}

/// Starts a raw backend; `reply(connection, request, text)` answers the `request`-th request
/// (from 0) on the `connection`-th connection (from 0).
async fn raw_backend(reply: impl Fn(usize, usize, &str) -> Reply + Send + Sync + 'static) -> Raw {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reply = Arc::new(reply);
    let (conns, reqs) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let c = conns.fetch_add(1, Ordering::SeqCst);
            let (reply, reqs) = (reply.clone(), reqs.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for r in 0.. {
                    let Some(text) = read_request(&mut stream, &mut buf).await else { return };
                    reqs.lock().expect("requests").push(text.clone());
                    match reply(c, r, &text) {
                        Reply::Send(bytes) => {
                            if stream.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Reply::SendAndClose(bytes) => {
                            let _ = stream.write_all(&bytes).await;
                            return;
                        }
                        Reply::Close => return,
                    }
                }
            });
        }
    });
    Raw { addr, connections, requests }
}

/// Reads one request (head, and a body of `content-length` bytes) from `stream`.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let text = String::from_utf8_lossy(&buf[..end + 4 + length]).into_owned();
                buf.drain(..end + 4 + length);
                return Some(text);
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn pool_of(addr: SocketAddr, extra: &str) -> String {
    one_pool_with(&format!("endpoints = [{{ address = \"{addr}\" }}]"), extra)
}

/// Sends `req` on `client` and reads the whole answer.
async fn call(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let resp = client.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
}

#[tokio::test]
async fn a_stale_pooled_connection_is_retried_on_a_fresh_one() {
    // The first connection answers once, then closes as the second request arrives: the
    // endpoint closing an idle connection just as the proxy reuses it.
    let raw = raw_backend(|c, r, _| if c == 0 && r == 1 { Reply::Close } else { Reply::Send(ok("fine")) }).await;
    // No retries by policy: only the stale-connection retry can save the request.
    let running = proxy(&pool_of(raw.addr, "retry = { max_attempts = 1 }")).await;
    let mut client = h1(running.proxy_addr).await;
    for _ in 0..3 {
        let (status, _, body) = call(&mut client, get("/")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "fine");
    }
    assert_eq!(raw.connections.load(Ordering::SeqCst), 2);
    assert_eq!(raw.requests.lock().unwrap().len(), 4, "the request that met the closed connection went again");
    // A stale connection is not the endpoint's failure.
    let upstream = running.pools[0].snapshot().upstreams[0].clone();
    assert_eq!(upstream.failures(), 0);
    assert_eq!(upstream.requests(), 3);
    running.shutdown().await;
}

#[tokio::test]
async fn a_non_idempotent_request_is_not_sent_twice() {
    let raw = raw_backend(|c, r, _| if c == 0 && r == 1 { Reply::Close } else { Reply::Send(ok("fine")) }).await;
    let running = proxy(&pool_of(raw.addr, "retry = { max_attempts = 1 }")).await;
    let mut client = h1(running.proxy_addr).await;
    assert_eq!(call(&mut client, get("/")).await.0, 200);
    // The POST reaches the endpoint, which closes without an answer: it may have acted on
    // it, so it is not repeated.
    let (status, _, body) = call(&mut client, post_json("/v1/completions", "{\"prompt\":\"hi\"}")).await;
    assert_eq!(status, 502);
    assert_eq!(json(&body)["error"]["type"], "upstream_failed");
    let posts = raw.requests.lock().unwrap().iter().filter(|r| r.starts_with("POST")).count();
    assert_eq!(posts, 1);
    running.shutdown().await;
}

#[tokio::test]
async fn an_endpoint_that_closes_after_each_answer_gets_fresh_connections() {
    // Keep-alive announced, then the connection closed anyway: whether the proxy sees the
    // close before reuse or only on the next request, every request succeeds.
    let raw = raw_backend(|_, _, _| Reply::SendAndClose(ok("once"))).await;
    let running = proxy(&pool_of(raw.addr, "retry = { max_attempts = 1 }")).await;
    let mut client = h1(running.proxy_addr).await;
    for _ in 0..5 {
        let (status, _, body) = call(&mut client, get("/")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "once");
    }
    assert_eq!(raw.requests.lock().unwrap().len() - raw.connections.load(Ordering::SeqCst), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn connections_are_reused_only_when_both_sides_keep_them() {
    // Chunked answers (a streamed body) keep the connection.
    let s = backend("s", Behavior::Stream { chunks: 3, gap: Duration::from_millis(1) }).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&s], "")).await;
    let mut client = h1(running.proxy_addr).await;
    for _ in 0..5 {
        let (status, headers, body) = call(&mut client, get("/v1/chat/completions")).await;
        assert_eq!(status, 200);
        assert!(headers.get("transfer-encoding").is_some(), "{headers:?}");
        assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    }
    assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    assert_eq!(running.pools[0].snapshot().upstreams[0].connections(), 1);
    running.shutdown().await;

    // `Connection: close`, and HTTP/1.0 without keep-alive (its body read until close), do not.
    for answer in [
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nclose",
        "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close",
    ] {
        let raw = raw_backend(move |_, _, _| {
            if answer.contains("content-length") {
                Reply::Send(answer.as_bytes().to_vec())
            } else {
                Reply::SendAndClose(answer.as_bytes().to_vec())
            }
        })
        .await;
        let running = proxy(&pool_of(raw.addr, "")).await;
        let mut client = h1(running.proxy_addr).await;
        for _ in 0..3 {
            let (status, _, body) = call(&mut client, get("/")).await;
            assert_eq!(status, 200);
            assert!(answer.ends_with(std::str::from_utf8(&body).unwrap()), "{body:?}");
        }
        assert_eq!(raw.connections.load(Ordering::SeqCst), 3, "{answer}");
        running.shutdown().await;
    }
}

#[tokio::test]
async fn bad_upstream_answers_are_502_with_the_reason() {
    let huge = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n", "a".repeat(70_000));
    let mut many = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: 1\r\n"));
    }
    many.push_str("content-length: 0\r\n\r\n");
    let cases = [
        ("HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n".to_owned(), "Content-Length"),
        ("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc".to_owned(), "Content-Length"),
        (huge, "larger than 65536 bytes"),
        (many, "more than 100 headers"),
        ("SSH-2.0-OpenSSH_9.2\r\n\r\n".to_owned(), "malformed response head"),
        ("HTTP/1.1 200 OK\r\n".to_owned(), "closed before a response"),
    ];
    for (answer, reason) in cases {
        let bytes = answer.clone().into_bytes();
        let raw = raw_backend(move |_, _, _| Reply::SendAndClose(bytes.clone())).await;
        let running = proxy(&pool_of(raw.addr, "retry = { max_attempts = 1 }")).await;
        let (status, _, body) = send(running.proxy_addr, get("/")).await;
        assert_eq!(status, 502, "{reason}");
        let error = json(&body);
        assert_eq!(error["error"]["type"], "upstream_failed");
        let message = error["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(reason), "{message:?} should say {reason:?}");
        running.shutdown().await;
    }
}

#[tokio::test]
async fn a_body_cut_short_fails_the_response_and_its_connection() {
    let raw = raw_backend(|c, _, _| {
        if c == 0 {
            Reply::SendAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b".to_vec())
        } else {
            Reply::Send(ok("whole"))
        }
    })
    .await;
    let running = proxy(&pool_of(raw.addr, "")).await;
    let mut client = h1(running.proxy_addr).await;
    // The client sees the answer fail: its head and first bytes may or may not have been
    // flushed before the proxy closed the connection.
    match client.send_request(get("/")).await {
        Ok(resp) => assert!(resp.into_body().collect().await.is_err(), "the client must see the body fail"),
        Err(e) => assert!(e.is_incomplete_message(), "{e}"),
    }
    // The next request goes on a new connection, and the first one was not kept.
    let (status, _, body) = send(running.proxy_addr, get("/")).await;
    assert_eq!((status.as_u16(), body), (200, Bytes::from("whole")));
    assert_eq!(raw.connections.load(Ordering::SeqCst), 2);
    running.shutdown().await;
}

#[tokio::test]
async fn interim_responses_are_skipped_and_trailers_dropped() {
    let raw = raw_backend(|_, _, _| {
        Reply::Send(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n\
HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let running = proxy(&pool_of(raw.addr, "")).await;
    let mut client = h1(running.proxy_addr).await;
    for _ in 0..2 {
        let (status, headers, body) = call(&mut client, get("/")).await;
        assert_eq!(status, 200);
        assert_eq!(body, "wikipedia");
        assert!(headers.get("trailer").is_none());
    }
    assert_eq!(raw.connections.load(Ordering::SeqCst), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn request_bodies_stream_upstream_whatever_their_framing() {
    let e = backend("e", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&e], "retry = { max_attempts = 1 }")).await;

    // A large body of known length, streamed frame by frame.
    let big = "x".repeat(1 << 20);
    let (status, _, body) = send(running.proxy_addr, post_json("/upload", &big)).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["body_len"], 1 << 20);
    assert_eq!(json(&body)["headers"]["content-length"], "1048576");

    // A body of unknown length from the client goes chunked.
    let stream = TcpStream::connect(running.proxy_addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, chunks::Chunks>(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for part in ["{\"a\":", "1,", "\"b\":2}"] {
            let _ = tx.send(Bytes::from(part)).await;
        }
    });
    let req = Request::post("/upload").header("host", "test.local").body(chunks::Chunks(rx)).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = json(&resp.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(echoed["body"], "{\"a\":1,\"b\":2}");
    assert_eq!(echoed["headers"]["transfer-encoding"], "chunked");
    running.shutdown().await;
}
