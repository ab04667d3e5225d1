//! Helpers for the end-to-end tests: start a mock on port 0, talk HTTP/1.1 to it, read its
//! metrics (pages are checked by `fulcrum_testkit::exposition`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fulcrum_mock::engine::{EngineConfig, Gpu, OutputLen};
use fulcrum_mock::{MockConfig, MockHandle, MockServer};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Bound on any single wait in these tests: generous, so a loaded CI machine does not fail
/// them, yet a hang fails instead of blocking forever.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fast, deterministic model: no prefill cost to speak of, `itl_ms` per token.
pub fn config(itl_ms: u64) -> MockConfig {
    MockConfig {
        engine: EngineConfig {
            max_num_seqs: 64,
            prefill_tokens_per_sec: 1e6,
            prefill_overhead: Duration::ZERO,
            itl_base: Duration::from_millis(itl_ms),
            itl_per_seq: Duration::ZERO,
            output_len: OutputLen { median: 8.0, sigma: 0.0, max: 64 },
            ..EngineConfig::preset(Gpu::H100)
        },
        ..MockConfig::default()
    }
}

pub async fn start(config: MockConfig) -> MockHandle {
    MockServer::bind(config, "127.0.0.1:0".parse().expect("an address")).await.expect("mock starts")
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: impl Into<Bytes>) -> Answer {
    timeout(PATIENCE, async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .expect("a request");
        let resp = sender.send_request(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Answer { status, headers, body }
    })
    .await
    .expect("answered in time")
}

pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, Bytes::new()).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    request(addr, "POST", path, body.to_string()).await
}

/// A streaming request in progress: events come with their arrival times.
pub struct Stream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    pub sent: Instant,
}

/// One SSE event: its JSON (or `None` for `[DONE]`) and when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub data: Option<Value>,
    pub at: Instant,
}

impl Event {
    /// Chat `delta.content` or completion `text`.
    pub fn token(&self) -> Option<&str> {
        let choice = self.data.as_ref()?.get("choices")?.get(0)?;
        choice.get("delta").and_then(|d| d.get("content")).or_else(|| choice.get("text"))?.as_str()
    }
}

pub async fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> Stream {
    timeout(PATIENCE, async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let req = Request::post(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a request");
        let sent = Instant::now();
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("content-type").map(|v| v.to_str().expect("ASCII")), Some("text/event-stream"));
        Stream { body: resp.into_body(), buf: Vec::new(), sent }
    })
    .await
    .expect("stream opened in time")
}

impl Stream {
    /// The next event, or `None` at the end of the body (or when the connection is cut).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = std::str::from_utf8(&raw[..end]).expect("utf-8");
                let payload = text.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {text:?}"));
                let data =
                    if payload == "[DONE]" { None } else { Some(serde_json::from_str(payload).expect("chunk JSON")) };
                return Some(Event { data, at: Instant::now() });
            }
            // A cut connection ends the stream; tests that need a clean end check for [DONE].
            let Ok(frame) = timeout(PATIENCE, self.body.frame()).await.expect("frame in time")? else { return None };
            if let Some(data) = frame.data_ref() {
                self.buf.extend_from_slice(data);
            }
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// Writes raw bytes on a fresh connection and reads until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = timeout(wait, stream.read_to_end(&mut out)).await;
    out
}

/// A streaming chat request body.
pub fn chat(model: &str, content: &str, max_tokens: u32) -> Value {
    serde_json::json!({
        "model": model, "stream": true, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": content}],
    })
}

/// Reads a gauge or counter sample `name` (with any labels) from Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let metric = key.split('{').next()?;
        (metric == name).then(|| value.parse().ok())?
    })
}

/// Polls `/metrics` until `name` reads `want`, or fails after [`PATIENCE`].
pub async fn wait_for_metric(addr: SocketAddr, name: &str, want: f64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = get(addr, "/metrics").await.text();
        if sample(&text, name) == Some(want) {
            return text;
        }
        assert!(Instant::now() < deadline, "{name} never read {want}:\n{text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
