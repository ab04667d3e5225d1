//! End-to-end test of TCP (L4) pools.

use crate::common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP listener whose round-robin pool has these endpoints, then `extra` lines.
fn tcp_pool(endpoints: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
protocol = "tcp"
pool = "echo"

[pool.echo]
policy = "round_robin"
endpoints = [{}]
{extra}
"#,
        list.join(", ")
    )
}

/// An address that refuses connections (a listener bound, then closed).
async fn refusing() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("local address")
}

async fn echo_once(proxy: std::net::SocketAddr, i: usize) -> bool {
    let Ok(mut s) = TcpStream::connect(proxy).await else { return false };
    let msg = format!("ping {i}");
    if s.write_all(msg.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.is_ok() && buf == msg.as_bytes()
}

#[tokio::test]
async fn a_failed_connect_is_retried_on_another_endpoint() {
    let (live, dead) = (tcp_echo().await, refusing().await);
    let running = proxy(&tcp_pool(&[dead, live], "")).await;
    for i in 0..8 {
        assert!(echo_once(running.proxy_addr, i).await, "connection {i} failed");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn tcp_pools_honour_health_checks_and_drain() {
    let (live, dead) = (tcp_echo().await, refusing().await);
    let checks = r#"health_check = { kind = "tcp", interval = "50ms" }"#;
    let running = proxy(&tcp_pool(&[dead, live], checks)).await;
    let pool = running.pools[0].clone();
    until("the dead endpoint is found unhealthy and the live one healthy", || {
        let e = pool.snapshot().selector.endpoints().to_vec();
        e[0].signals().is_unavailable_for(fulcrum_core::Unavailable::Unhealthy)
            && e[1].signals().is_available(fulcrum_core::Instant::ZERO)
    })
    .await;
    let tried = || pool.snapshot().upstreams[0].requests();
    let before = tried();
    for i in 0..6 {
        assert!(echo_once(running.proxy_addr, i).await, "connection {i} failed");
    }
    assert_eq!(tried(), before, "no connection went to the unhealthy endpoint");
    // A drained endpoint takes no new connection either: with the live one drained and the
    // other down, nothing is left.
    pool.drain(&live.to_string(), std::time::Duration::from_millis(10)).await;
    assert!(!echo_once(running.proxy_addr, 99).await);
    running.shutdown().await;
}

#[tokio::test]
async fn tcp_listener_splices_to_a_pool() {
    let (e1, e2) = (tcp_echo().await, tcp_echo().await);
    let toml = tcp_pool(&[e1, e2], "");
    let running = proxy(&toml).await;
    for i in 0..4 {
        let mut s = TcpStream::connect(running.proxy_addr).await.unwrap();
        let msg = format!("hello {i}, raw bytes \x00\x01\x02");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    let counts: Vec<u64> = running.pools[0].snapshot().upstreams.iter().map(|u| u.requests()).collect();
    assert_eq!(counts, [2, 2]);
    running.shutdown().await;
}
