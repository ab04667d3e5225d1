//! Helpers shared by the control-plane tests that run a proxy: mock backends, admin calls
//! without sockets, requests through the proxy.

use std::net::SocketAddr;

use axum::body::Body;
use bytes::Bytes;
use fulcrum_control::admin::{AdminState, app};
use fulcrum_mock::{MockConfig, MockHandle, MockServer};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

/// A default mock backend on 127.0.0.1.
pub async fn mock() -> MockHandle {
    MockServer::bind(MockConfig::default(), "127.0.0.1:0".parse().expect("address")).await.expect("mock starts")
}

/// One admin call (a JSON body when `body` is not empty); the status and the body's text.
pub async fn call(state: &AdminState, method: &str, uri: &str, body: &str) -> (u16, String) {
    let req = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request");
    let resp = app(state.clone()).oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The status of `GET path` through the proxy at `addr`, on a new connection.
pub async fn status_of(addr: SocketAddr, path: &str) -> u16 {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", "control.test").body(Full::new(Bytes::new())).expect("req");
    sender.send_request(req).await.expect("response").status().as_u16()
}
