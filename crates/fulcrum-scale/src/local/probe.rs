//! Readiness probes: is a freshly started replica accepting work yet?

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How a replica shows it is ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Readiness {
    /// A TCP connection to its port succeeds (the default).
    #[default]
    Tcp,
    /// `GET path` on its port answers 2xx (a model server's `/health`, `/v1/models`).
    Http {
        /// The path, starting with `/`.
        path: String,
    },
}

impl Readiness {
    /// One probe of `address`, bounded by `timeout`: whether it passed.
    pub(crate) async fn check(&self, address: SocketAddr, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.check_unbounded(address)).await.unwrap_or(false)
    }

    async fn check_unbounded(&self, address: SocketAddr) -> bool {
        let Ok(stream) = TcpStream::connect(address).await else { return false };
        match self {
            Readiness::Tcp => true,
            Readiness::Http { path } => http_get_ok(stream, address, path).await,
        }
    }
}

async fn http_get_ok(stream: TcpStream, address: SocketAddr, path: &str) -> bool {
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return false;
    };
    let conn = tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, address.to_string())
        .header(http::header::USER_AGENT, "fulcrum-scale readiness probe")
        .body(Empty::<Bytes>::new());
    let ok = match request {
        Ok(request) => sender.send_request(request).await.is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    conn.abort();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_needs_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        assert!(Readiness::Tcp.check(address, Duration::from_secs(1)).await);
        drop(listener);
        assert!(!Readiness::Tcp.check(address, Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /health HTTP/1.1\r\n"));
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let probe = Readiness::Http { path: "/health".into() };
        assert!(probe.check(address, Duration::from_secs(5)).await);
        assert!(!probe.check(address, Duration::from_secs(5)).await);
        server.await.unwrap();
    }
}
