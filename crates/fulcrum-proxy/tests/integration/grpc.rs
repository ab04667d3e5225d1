//! HTTP/2 upstreams and gRPC through the proxy, over real sockets. The gRPC service is a
//! small hand-written one on hyper's HTTP/2 server (gRPC is HTTP/2 with length-prefixed
//! messages and a status in trailers), so the test needs no code generator.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common;

/// A body of frames sent through a channel: data and trailers, as they come.
struct Frames(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn frames() -> (mpsc::Sender<Frame<Bytes>>, Frames) {
    let (tx, rx) = mpsc::channel(16);
    (tx, Frames(rx))
}

/// One gRPC message: uncompressed, length-prefixed.
fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(payload.len()).expect("small message"));
    b.put_slice(payload);
    b.freeze()
}

/// Splits a body into its gRPC messages.
fn messages(mut body: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        body.advance(1);
        let len = body.get_u32() as usize;
        out.push(body.split_to(len.min(body.len())));
    }
    out
}

fn trailers(status: u32, message: &str) -> Frame<Bytes> {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", status.to_string().parse().expect("status"));
    if !message.is_empty() {
        t.insert("grpc-message", message.parse().expect("message"));
    }
    Frame::trailers(t)
}

/// The service: `Echo/Unary` answers `echo:` + each message; `Echo/Stream` answers three
/// messages 150 ms apart; `Echo/Fail` answers status 5; anything else reports the request's
/// version, and the value of its `x-checksum` trailer if it sent one.
async fn serve(req: Request<Incoming>, calls: Arc<AtomicUsize>) -> Result<Response<Frames>, hyper::Error> {
    calls.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let version = format!("{:?}", req.version());
    let grpc = req.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let te = req.headers().get("te").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
    let collected = req.into_body().collect().await?;
    let checksum = collected.trailers().and_then(|t| t.get("x-checksum")).map(|v| v.to_str().unwrap_or("").to_owned());
    let body = collected.to_bytes();
    let (tx, frames) = frames();
    let mut resp = Response::new(frames);
    resp.headers_mut().insert("content-type", "application/grpc".parse().expect("static"));
    tokio::spawn(async move {
        match path.as_str() {
            "/test.Echo/Unary" => {
                for m in messages(body) {
                    let _ = tx.send(Frame::data(message(&[b"echo:", &m[..]].concat()))).await;
                }
                let _ = tx.send(trailers(0, "")).await;
            }
            "/test.Echo/Stream" => {
                for i in 0..3 {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                    let _ = tx.send(Frame::data(message(format!("part {i}").as_bytes()))).await;
                }
                let _ = tx.send(trailers(0, "")).await;
            }
            "/test.Echo/Fail" => {
                let _ = tx.send(trailers(5, "no such thing")).await;
            }
            _ => {
                let text = format!("{version} grpc={grpc} te={te} checksum={}", checksum.unwrap_or_default());
                let _ = tx.send(Frame::data(Bytes::from(text))).await;
            }
        }
    });
    Ok(resp)
}

/// An HTTP/2-only (prior knowledge) server on 127.0.0.1.
struct H2Server {
    addr: SocketAddr,
    /// Requests served.
    calls: Arc<AtomicUsize>,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    /// Sending on it drops every open connection.
    cut: tokio::sync::watch::Sender<()>,
}

async fn h2_server() -> H2Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (calls, conns) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (cut, _) = tokio::sync::watch::channel(());
    let (c, n, k) = (calls.clone(), conns.clone(), cut.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let (calls, mut cut) = (c.clone(), k.subscribe());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| serve(req, calls.clone()));
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = cut.changed() => {}
                }
            });
        }
    });
    H2Server { addr, calls, conns, cut }
}

async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
    tokio::spawn(conn);
    send
}

fn grpc_request<B>(
    path: &str,
    body: B,
) -> Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>
where
    B: http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Sync + 'static,
{
    Request::post(format!("http://grpc.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body.boxed())
        .expect("request")
}

/// Reads a response's data frames (with when each arrived) and its trailers.
async fn read(resp: Response<Incoming>) -> (Vec<(Bytes, Instant)>, Option<HeaderMap>) {
    let mut body = resp.into_body();
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        match frame.into_data() {
            Ok(d) => data.push((d, Instant::now())),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (data, trailers)
}

fn config(upstream: SocketAddr) -> String {
    common::one_pool_with(&format!("endpoints = [{{ address = \"{upstream}\" }}]\nprotocol = \"h2\""), "")
}

#[tokio::test]
async fn grpc_unary_streaming_and_error_calls_pass_through_with_their_trailers() {
    let H2Server { addr: upstream, calls, conns, .. } = h2_server().await;
    let proxy = common::proxy(&config(upstream)).await;
    let mut client = h2_client(proxy.proxy_addr).await;

    // Unary: two messages in, two out, status 0 in the trailers.
    let body = Full::new([message(b"a"), message(b"bc")].concat().into());
    let resp = client.send_request(grpc_request("/test.Echo/Unary", body)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let (data, trailers) = read(resp).await;
    let payload: Bytes = data.into_iter().flat_map(|(d, _)| d).collect();
    assert_eq!(messages(payload), [Bytes::from("echo:a"), Bytes::from("echo:bc")]);
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

    // Server streaming: each message arrives when sent, not at the end.
    let resp =
        client.send_request(grpc_request("/test.Echo/Stream", Full::new(message(b"go")))).await.expect("response");
    let (data, trailers) = read(resp).await;
    let payload: Vec<Bytes> = data.iter().flat_map(|(d, _)| messages(d.clone())).collect();
    assert_eq!(payload, [Bytes::from("part 0"), Bytes::from("part 1"), Bytes::from("part 2")]);
    let spread = data.last().expect("data").1 - data.first().expect("data").1;
    assert!(spread >= Duration::from_millis(250), "messages streamed as sent ({spread:?} between first and last)");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");

    // An error status, in trailers, reaches the client as sent.
    let resp = client.send_request(grpc_request("/test.Echo/Fail", Full::new(message(b"x")))).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, trailers) = read(resp).await;
    let trailers = trailers.expect("trailers");
    assert_eq!(
        (&trailers["grpc-status"], &trailers["grpc-message"]),
        (&"5".parse().expect("v"), &"no such thing".parse().expect("v"))
    );

    // Client streaming with request trailers: both reach the upstream.
    let (tx, body) = frames();
    let resp = tokio::spawn({
        let mut client = client.clone();
        async move { client.send_request(grpc_request("/other", body)).await }
    });
    tx.send(Frame::data(message(b"one"))).await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(Frame::data(message(b"two"))).await.expect("send");
    let mut t = HeaderMap::new();
    t.insert("x-checksum", "abc123".parse().expect("static"));
    tx.send(Frame::trailers(t)).await.expect("send");
    drop(tx);
    let (data, _) = read(resp.await.expect("task").expect("response")).await;
    let text: Bytes = data.into_iter().flat_map(|(d, _)| d).collect();
    assert_eq!(text, "HTTP/2.0 grpc=true te=trailers checksum=abc123");

    // Every call went over one upstream HTTP/2 connection.
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(conns.load(Ordering::SeqCst), 1, "requests are streams on one connection");
    proxy.shutdown().await;
}

#[tokio::test]
async fn http1_clients_reach_h2_upstreams_and_health_checks_speak_h2() {
    let H2Server { addr: upstream, calls, .. } = h2_server().await;
    let pool = format!(
        "endpoints = [{{ address = \"{upstream}\" }}]\nprotocol = \"h2\"\nhealth_check = {{ path = \"/health\", interval = \"100ms\" }}"
    );
    let proxy = common::proxy(&common::one_pool_with(&pool, "")).await;
    let (status, _, body) = common::send(proxy.proxy_addr, common::get("/plain")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "HTTP/2.0 grpc=false te= checksum=");
    // Health checks reach the HTTP/2-only server (an HTTP/1.1 probe would not parse).
    common::until("health checks over HTTP/2", || calls.load(Ordering::SeqCst) >= 4).await;
    let (status, _, _) = common::send(proxy.proxy_addr, common::get("/plain")).await;
    assert_eq!(status, StatusCode::OK, "the endpoint stays in service");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_h2_upstream_connection_that_drops_is_opened_again_and_a_dead_one_is_a_502() {
    let server = h2_server().await;
    let proxy = common::proxy(&config(server.addr)).await;
    assert_eq!(common::send(proxy.proxy_addr, common::get("/a")).await.0, StatusCode::OK);
    // The upstream drops its connections (a restart, an idle timeout): the next request
    // opens a new one.
    server.cut.send_replace(());
    common::until("the proxy sees the connection close", || proxy.pools[0].snapshot().upstreams[0].connections() == 0)
        .await;
    assert_eq!(common::send(proxy.proxy_addr, common::get("/b")).await.0, StatusCode::OK);
    assert_eq!(server.conns.load(Ordering::SeqCst), 2);
    assert_eq!(server.calls.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;

    // Nothing listening: 502, not a hang.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed = listener.local_addr().expect("addr");
    drop(listener);
    let dead = common::proxy(&config(closed)).await;
    assert_eq!(common::send(dead.proxy_addr, common::get("/a")).await.0, StatusCode::BAD_GATEWAY);
    dead.shutdown().await;
}
