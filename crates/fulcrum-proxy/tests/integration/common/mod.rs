//! Test backends and clients over real sockets on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_proxy::Proxy;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What a test backend does with each request.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Answers JSON describing the request it got, with `x-backend: NAME`.
    Echo,
    /// Streams `chunks` SSE events `gap` apart.
    Stream { chunks: usize, gap: Duration },
    /// Accepts and never answers.
    Hang,
    /// Answers 101 to an upgrade, then echoes bytes.
    Upgrade,
}

/// A running test backend.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// The target of every request it received, in order.
    pub targets: Arc<std::sync::Mutex<Vec<String>>>,
}

type Body = Either<Full<Bytes>, chunks::Chunks>;

/// A body of timed chunks.
pub mod chunks {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    pub struct Chunks(pub mpsc::Receiver<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    pub fn spawn(chunks: usize, gap: Duration) -> Chunks {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..chunks {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if tx.send(Bytes::from(format!("data: {{\"token\":{i}}}\n\n"))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        Chunks(rx)
    }
}

async fn answer(name: String, behavior: Behavior, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    match behavior {
        Behavior::Echo => {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("?"))))
                .collect();
            let json = serde_json::json!({
                "backend": name,
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body_len": body.len(),
                "body": String::from_utf8_lossy(&body),
            });
            let mut resp = Response::new(Either::Left(Full::new(Bytes::from(json.to_string()))));
            resp.headers_mut().insert("x-backend", name.parse().expect("name"));
            resp.headers_mut().insert("connection", "keep-alive, x-hop".parse().expect("static"));
            resp.headers_mut().insert("x-hop", "must-not-pass".parse().expect("static"));
            Ok(resp)
        }
        Behavior::Stream { chunks, gap } => {
            let mut resp = Response::new(Either::Right(chunks::spawn(chunks, gap)));
            resp.headers_mut().insert("content-type", "text/event-stream".parse().expect("static"));
            resp.headers_mut().insert("x-backend", name.parse().expect("name"));
            Ok(resp)
        }
        Behavior::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Behavior::Upgrade => {
            let mut req = req;
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert("connection", "upgrade".parse().expect("static"));
            resp.headers_mut().insert("upgrade", "websocket".parse().expect("static"));
            resp.headers_mut().insert("x-backend", name.parse().expect("name"));
            Ok(resp)
        }
    }
}

/// Starts a backend on 127.0.0.1, port 0.
pub async fn backend(name: &str, behavior: Behavior) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let b = Backend {
        name: name.to_owned(),
        addr,
        connections: Arc::new(AtomicUsize::new(0)),
        requests: Arc::new(AtomicUsize::new(0)),
        targets: Arc::default(),
    };
    let (conns, reqs, name) = (b.connections.clone(), b.requests.clone(), b.name.clone());
    let targets = b.targets.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            conns.fetch_add(1, Ordering::SeqCst);
            let (name, behavior, reqs) = (name.clone(), behavior.clone(), reqs.clone());
            let targets = targets.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    targets.lock().expect("targets").push(req.uri().to_string());
                    answer(name.clone(), behavior.clone(), req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    b
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A running proxy.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<()>,
    pub pools: Vec<Arc<fulcrum_proxy::pool::PoolRuntime>>,
    /// The running configuration, to reload.
    pub live: fulcrum_proxy::Live,
}

impl Running {
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.done).await.expect("proxy stops").expect("no panic");
    }
}

/// Starts a proxy from TOML whose listener named "public" binds 127.0.0.1:0.
pub async fn proxy(toml: &str) -> Running {
    let config = Config::parse(toml, None).expect("valid config");
    let proxy = Proxy::bind_with(config, Some(Arc::from(toml)), None).await.expect("bind proxy");
    let proxy_addr = proxy.local_addr("public").expect("public listener");
    let pools = proxy.pools();
    let live = proxy.live().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(proxy.run(async move {
        let _ = rx.await;
    }));
    Running { proxy_addr, stop: Some(tx), done, pools, live }
}

/// An HTTP/1.1 client connection.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

/// An HTTP/2 (prior knowledge) client connection.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// Sends one request on a new connection and reads the whole answer.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut c = h1(addr).await;
    let resp = c.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
}

/// A GET request.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).header("host", "test.local").body(Full::new(Bytes::new())).expect("request")
}

/// A POST of a JSON body.
pub fn post_json(path: &str, json: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "test.local")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json.to_owned())))
        .expect("request")
}

pub fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).expect("json body")
}

/// A pool's endpoints list for TOML.
pub fn endpoints(backends: &[&Backend]) -> String {
    let items: Vec<String> =
        backends.iter().map(|b| format!("{{ address = \"{}\", id = \"{}\" }}", b.addr, b.name)).collect();
    format!("[{}]", items.join(", "))
}

/// A config with one listener named "public" whose default pool `p` has `policy`, the
/// backends, and `extra` lines.
pub fn one_pool(policy: &str, backends: &[&Backend], extra: &str) -> String {
    one_pool_with(&format!("policy = {policy}\nendpoints = {}", endpoints(backends)), extra)
}

/// A config with one listener named "public" whose default pool `p` has the TOML `pool`
/// lines, then `extra` lines.
pub fn one_pool_with(pool: &str, extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "p"

[pool.p]
{pool}
{extra}
"#
    )
}

/// Waits (bounded) until `ready` holds: readiness is polled, never assumed after a sleep.
pub async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Collects what the JSON formatter writes.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Every line so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().expect("buffer").clone()).expect("utf-8");
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }

    /// The access-log lines so far, parsed.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.lines().into_iter().filter(|v| v["target"] == "fulcrum::access").collect()
    }

    /// Waits (bounded) for the access-log line of `request_id`: it is written when the
    /// response body has been sent, which may be just after the client read it.
    pub async fn line_of(&self, request_id: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.access_lines().into_iter().find(|v| v["request_id"] == request_id) {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "no access-log line for {request_id}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    // This test runs on one thread (tokio's current-thread runtime): the proxy's tasks log
    // to this thread's subscriber.
    (captured, tracing::subscriber::set_default(subscriber))
}
