//! Finished spans, encoded as OTLP/JSON and POSTed to a collector in batches.
//!
//! The request path hands a finished span to a bounded queue (`try_send`: when the queue is
//! full the span is dropped and counted, never waited for). One background task takes up to
//! [`MAX_BATCH`] spans at a time, or what arrived within [`BATCH_DELAY`] of the first, and
//! POSTs them as one `ExportTraceServiceRequest` in the JSON encoding of OTLP/HTTP
//! (<https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding>: ids in hex, enums as
//! numbers, 64-bit integers as strings) on a kept-alive HTTP/1.1 connection. A batch the
//! collector refuses or that cannot be sent is dropped and logged (once per outage): tracing
//! never slows or fails a request. On shutdown the task sends what is queued, then stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::observe::OtlpEndpoint;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::context::{SpanId, TraceId, hex};

/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits for others to fill its batch.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Spans queued for export at most; more are dropped.
pub const QUEUE: usize = 8192;
/// Longest one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest shutdown waits to send what is queued.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// OTLP's span kinds that the proxy records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// A request the proxy received.
    Server = 2,
    /// A request the proxy sent upstream.
    Client = 3,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct SpanData {
    /// The trace.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// The parent span, if any.
    pub parent: Option<SpanId>,
    /// The W3C `tracestate` of the trace, if any.
    pub trace_state: Option<String>,
    /// The span's name.
    pub name: String,
    /// Server or client.
    pub kind: SpanKind,
    /// Start, Unix nanoseconds.
    pub start_ns: u64,
    /// End, Unix nanoseconds.
    pub end_ns: u64,
    /// Attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// An error message: the span's status is then ERROR.
    pub error: Option<String>,
}

// === OTLP/JSON ===

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportRequest<'a> {
    resource_spans: [ResourceSpans<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans<'a> {
    resource: Resource<'a>,
    scope_spans: [ScopeSpans<'a>; 1],
}

#[derive(Serialize)]
struct Resource<'a> {
    attributes: [KeyValue<'a>; 1],
}

#[derive(Serialize)]
struct Scope {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ScopeSpans<'a> {
    scope: Scope,
    spans: Vec<JsonSpan<'a>>,
}

#[derive(Serialize)]
struct KeyValue<'a> {
    key: &'a str,
    value: AnyValue<'a>,
}

#[derive(Serialize)]
enum AnyValue<'a> {
    #[serde(rename = "stringValue")]
    Str(&'a str),
    #[serde(rename = "intValue")]
    Int(String),
}

#[derive(Serialize)]
struct Status<'a> {
    code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonSpan<'a> {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_state: Option<&'a str>,
    name: &'a str,
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue<'a>>,
    status: Status<'a>,
}

/// An `ExportTraceServiceRequest` in OTLP/JSON.
pub fn encode(spans: &[SpanData], service_name: &str) -> Vec<u8> {
    let spans = spans
        .iter()
        .map(|s| JsonSpan {
            trace_id: hex(&s.trace_id),
            span_id: hex(&s.span_id),
            parent_span_id: s.parent.as_ref().map(|p| hex(p)),
            trace_state: s.trace_state.as_deref(),
            name: &s.name,
            kind: s.kind as u8,
            start_time_unix_nano: s.start_ns.to_string(),
            end_time_unix_nano: s.end_ns.to_string(),
            attributes: s
                .attributes
                .iter()
                .map(|(key, v)| KeyValue {
                    key,
                    value: match v {
                        Value::Str(s) => AnyValue::Str(s),
                        Value::Int(i) => AnyValue::Int(i.to_string()),
                    },
                })
                .collect(),
            // 2 = ERROR; 0 = UNSET (the collector and backends read a span without error as fine).
            status: Status { code: if s.error.is_some() { 2 } else { 0 }, message: s.error.as_deref() },
        })
        .collect();
    let request = ExportRequest {
        resource_spans: [ResourceSpans {
            resource: Resource { attributes: [KeyValue { key: "service.name", value: AnyValue::Str(service_name) }] },
            scope_spans: [ScopeSpans { scope: Scope { name: "fulcrum", version: env!("CARGO_PKG_VERSION") }, spans }],
        }],
    };
    serde_json::to_vec(&request).unwrap_or_default()
}

// === impl Exporter ===

/// The queue to the export task, and the task.
#[derive(Debug)]
pub(crate) struct Exporter {
    queue: mpsc::Sender<SpanData>,
    dropped: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Exporter {
    /// Starts the export task (on the current tokio runtime).
    pub(crate) fn start(config: &fulcrum_config::observe::TracingConfig) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let (stop, stopped) = watch::channel(false);
        let dropped = Arc::new(AtomicU64::new(0));
        // An https collector whose CA does not load: every export fails, saying why.
        let tls =
            config.otlp_endpoint.https.then(|| super::collector_tls(config).map(Arc::new).map_err(|e| e.to_string()));
        let client = Client { endpoint: config.otlp_endpoint.clone(), tls, conn: None, failing: false };
        let task = tokio::spawn(export_loop(rx, stopped, client, config.service_name.clone(), dropped.clone()));
        Exporter { queue, dropped, stop, task: std::sync::Mutex::new(Some(task)) }
    }

    /// Queues a finished span; drops it when the queue is full.
    pub(crate) fn send(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far (queue full or export failed).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is queued (within [`FLUSH_TIMEOUT`]) and stops the task.
    pub(crate) async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = crate::safety::lock(&self.task).take();
        if let Some(task) = task
            && tokio::time::timeout(FLUSH_TIMEOUT, task).await.is_err()
        {
            tracing::warn!("trace export: spans still queued at shutdown were dropped");
        }
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: watch::Receiver<bool>,
    mut client: Client,
    service_name: String,
    dropped: Arc<AtomicU64>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut stopping = false;
    while !stopping {
        // Wait for a first span (or shutdown), then for more until the batch is full or due.
        tokio::select! {
            span = rx.recv() => match span {
                Some(s) => batch.push(s),
                None => stopping = true,
            },
            _ = stop.wait_for(|s| *s) => stopping = true,
        }
        if !stopping {
            let due = tokio::time::sleep(BATCH_DELAY);
            tokio::pin!(due);
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    span = rx.recv() => match span {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    _ = &mut due => break,
                    _ = stop.wait_for(|s| *s) => {
                        stopping = true;
                        break;
                    }
                }
            }
        }
        if stopping {
            // Send everything already queued.
            while let Ok(s) = rx.try_recv() {
                batch.push(s);
            }
        }
        for chunk in batch.chunks(MAX_BATCH) {
            let n = chunk.len() as u64;
            if !client.post(Bytes::from(encode(chunk, &service_name))).await {
                dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
        batch.clear();
    }
}

struct Client {
    endpoint: OtlpEndpoint,
    /// TLS to an `https` collector (or why it cannot be set up).
    tls: Option<Result<Arc<crate::tls::Connector>, String>>,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// The last export failed (log once per outage).
    failing: bool,
}

impl Client {
    /// POSTs one batch; whether the collector took it.
    async fn post(&mut self, body: Bytes) -> bool {
        let result = match tokio::time::timeout(EXPORT_TIMEOUT, self.try_post(body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        match result {
            Ok(()) => {
                if self.failing {
                    tracing::info!(endpoint = %self.endpoint, "trace export: the collector takes spans again");
                }
                self.failing = false;
                true
            }
            Err(e) => {
                self.conn = None;
                if !self.failing {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "trace export failed: spans are dropped until it works again");
                }
                self.failing = true;
                false
            }
        }
    }

    async fn try_post(&mut self, body: Bytes) -> Result<(), String> {
        // A kept-alive connection the collector closed is retried once on a new one.
        for fresh in [false, true] {
            if fresh || self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                self.conn = Some(self.connect().await?);
            }
            let Some(conn) = self.conn.as_mut() else { continue };
            if conn.ready().await.is_err() {
                self.conn = None;
                continue;
            }
            let req = http::Request::post(self.endpoint.path.as_str())
                .header(http::header::HOST, self.endpoint.authority())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, concat!("fulcrum/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            match conn.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                    return if status.is_success() { Ok(()) } else { Err(format!("the collector answered {status}")) };
                }
                Err(e) if !fresh => {
                    tracing::debug!(error = %e, "trace export: kept-alive connection failed, retrying on a new one");
                    self.conn = None;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("cannot reach the collector".to_owned())
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => crate::tls::Stream::Plain(tcp),
            Some(Err(e)) => return Err(e.clone()),
            Some(Ok(tls)) => {
                let peer = tcp.peer_addr().map_err(|e| format!("cannot connect: {e}"))?;
                tls.handshake(peer, tcp).await.map_err(|e| format!("TLS: {e}"))?
            }
        };
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_json() {
        let span = SpanData {
            trace_id: [0x4b; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent: Some([0xff; 8]),
            trace_state: Some("vendor=x".into()),
            name: "GET chat".into(),
            kind: SpanKind::Client,
            start_ns: 1_700_000_000_000_000_000,
            end_ns: 1_700_000_000_500_000_000,
            attributes: vec![("fulcrum.pool", Value::Str("llm".into())), ("fulcrum.attempt", Value::Int(2))],
            error: Some("connection refused".into()),
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&[span], "edge")).unwrap();
        let rs = &json["resourceSpans"][0];
        assert_eq!(rs["resource"]["attributes"][0]["key"], "service.name");
        assert_eq!(rs["resource"]["attributes"][0]["value"]["stringValue"], "edge");
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4b".repeat(16));
        assert_eq!(s["spanId"], "0102030405060708");
        assert_eq!(s["parentSpanId"], "ffffffffffffffff");
        assert_eq!(s["traceState"], "vendor=x");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(s["attributes"][1]["value"]["intValue"], "2");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["status"]["message"], "connection refused");
    }
}
