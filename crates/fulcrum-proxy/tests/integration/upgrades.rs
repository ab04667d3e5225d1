//! Protocol upgrades: only WebSocket passes unless a route allows others, and an upgrade the
//! upstream refuses streams its answer back (issue 20: any `Upgrade` token used to be
//! tunnelled, so `Upgrade: h2c` answered 101 carried later requests past routing and limits;
//! a refused upgrade's answer was read whole into memory).

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The answer head to one raw request, and the connection to read on.
async fn head_of(addr: std::net::SocketAddr, request: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("an answer head within 5 s");
    (String::from_utf8_lossy(&head).into_owned(), s)
}

fn upgrade_request(protocol: &str) -> String {
    format!("GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n")
}

#[tokio::test]
async fn upgrades_other_than_websocket_go_as_plain_requests() {
    let echo = backend("echo", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&echo], "")).await;
    for protocol in ["h2c", "websocket, h2c", "TLS/1.2", "foo"] {
        let (head, mut s) = head_of(running.proxy_addr, &upgrade_request(protocol)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "Upgrade: {protocol}: {head}");
        let mut body = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut body)).await.expect("body").expect("read");
        let seen = String::from_utf8_lossy(&body[..n]).to_ascii_lowercase();
        assert!(!seen.contains("\"upgrade\""), "Upgrade: {protocol}: the upstream saw an Upgrade header: {seen}");
        assert!(!seen.contains("\"connection\""), "Upgrade: {protocol}: the upstream saw a Connection header: {seen}");
        // The connection stays an HTTP one: a second request on it is routed and answered.
        s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains("HTTP/1.1 200") && rest.contains("/again"), "Upgrade: {protocol}: then {rest}");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_route_may_allow_other_upgrades() {
    let up = backend("up", Behavior::Upgrade).await;
    let echo = backend("echo", Behavior::Echo).await;
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "echo"

[[route]]
match = {{ path_prefix = "/up" }}
pool = "up"
upgrades = ["websocket", "h2c"]

[pool.up]
endpoints = {}

[pool.echo]
endpoints = {}
"#,
        endpoints(&[&up]),
        endpoints(&[&echo])
    );
    let running = proxy(&toml).await;
    let (head, _) = head_of(running.proxy_addr, &upgrade_request("h2c")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Not on the default pool, which allows WebSocket only.
    let (head, _) = head_of(running.proxy_addr, &upgrade_request("h2c").replace("/up", "/other")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_websocket_upgrade_streams_its_answer() {
    // The upstream answers the upgrade with an event stream whose first event comes at once
    // and the next one a minute later: the first must reach the client now.
    let s = backend("s", Behavior::Stream { chunks: 2, gap: Duration::from_secs(60) }).await;
    // A stream still open at shutdown is cut after the drain timeout.
    let toml = format!("[proxy]\ndrain_timeout = \"1s\"\n{}", one_pool("\"round_robin\"", &[&s], ""));
    let running = proxy(&toml).await;
    let request = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut c = TcpStream::connect(running.proxy_addr).await.expect("connect");
    c.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let first_event = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"token\":0") {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let streamed = tokio::time::timeout(Duration::from_secs(5), first_event).await;
    let text = String::from_utf8_lossy(&got);
    assert!(streamed.is_ok(), "the refused upgrade's first event did not come through: {text:?}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(c);
    running.shutdown().await;
}
