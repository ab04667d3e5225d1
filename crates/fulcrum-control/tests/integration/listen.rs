//! The admin listener over real sockets on 127.0.0.1: its connection cap and its header
//! timeout close idle clients, and the API still answers a fresh connection afterwards.

use std::time::Duration;

use fulcrum_config::{AdminLimits, Config};
use fulcrum_control::admin::{AdminState, app};
use fulcrum_proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TOML: &str = "[pool.p]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n";

/// Whether the server closed `s` within `wait` (EOF or reset; `false` if it is still open).
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, s.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("the admin API sent bytes to a client that asked nothing"),
        Err(_) => false,
    }
}

/// `GET /control` on `s`; asserts a 200.
async fn get_control(s: &mut TcpStream) {
    s.write_all(b"GET /control HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_capped_and_timed_out() {
    let config = Config::parse(TOML, None).expect("config");
    let proxy = Proxy::bind_with(config, Some(TOML.into()), None).await.expect("proxy");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let header_timeout = Duration::from_millis(1500);
    let limits = AdminLimits { max_connections: 4, header_timeout, idle_timeout: Duration::from_secs(60) };
    let app = app(AdminState::new(proxy.live().clone()));
    tokio::spawn(fulcrum_control::listen::serve(listener, app, limits));

    // Four idle connections take every slot; three more are closed as they arrive.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..7 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    for (i, s) in idle.iter_mut().enumerate().skip(4) {
        assert!(closed_within(s, Duration::from_millis(1000)).await, "connection {i} beyond the cap stayed open");
    }
    assert!(opened.elapsed() < header_timeout, "too slow to tell the cap from the timeout");
    for (i, s) in idle.iter_mut().enumerate().take(4) {
        assert!(!closed_within(s, Duration::from_millis(10)).await, "connection {i} within the cap was closed early");
    }
    // The header timeout closes the ones that never send a request.
    for (i, s) in idle.iter_mut().enumerate().take(4) {
        assert!(closed_within(s, Duration::from_secs(10)).await, "idle connection {i} was never closed");
    }
    assert!(opened.elapsed() >= header_timeout, "closed before the header timeout");

    // A fresh connection is served, and a keep-alive one outlives the header timeout while
    // it is idle for less than the idle timeout.
    get_control(&mut TcpStream::connect(addr).await.expect("connect")).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    get_control(&mut s).await;
    assert!(!closed_within(&mut s, header_timeout + Duration::from_millis(500)).await, "idle keep-alive closed early");
    get_control(&mut s).await;

    // A head that starts but never ends is closed by the header timeout too.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /control HTTP/1.1\r\nhost: 1").await.expect("write");
    assert!(closed_within(&mut slow, Duration::from_secs(10)).await, "a partial head was never closed");

    // A whole head whose body never comes is refused once the body stalls for the header
    // timeout, and its slot is free again: the three slots left (the keep-alive one above
    // holds the fourth) taken this way do not lock out another client for long.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = "PUT /pools/p/policy HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
        s.write_all(head.as_bytes()).await.expect("write");
        stalled.push(s);
    }
    for (i, s) in stalled.iter_mut().enumerate() {
        let mut buf = vec![0u8; 4096];
        let n =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("an answer").expect("read");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 4"), "stalled body {i}: {answer}");
    }
    assert!(started.elapsed() >= header_timeout, "answered before the body stalled for the timeout");
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(5)).await, "stalled body {i}: its connection stayed open");
    }
    get_control(&mut TcpStream::connect(addr).await.expect("connect")).await;
}
