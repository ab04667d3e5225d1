//! End-to-end test of TCP (L4) pools.

use crate::common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn tcp_listener_splices_to_a_pool() {
    let (e1, e2) = (tcp_echo().await, tcp_echo().await);
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
protocol = "tcp"
pool = "echo"

[pool.echo]
policy = "round_robin"
endpoints = [{{ address = "{e1}" }}, {{ address = "{e2}" }}]
"#
    );
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
