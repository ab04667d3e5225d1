//! OpenTelemetry traces: one server span per request, one client span per upstream attempt,
//! exported over OTLP/HTTP (JSON) by a small in-crate exporter.
//!
//! A request that carries a valid W3C `traceparent` joins that trace, with the caller's span
//! as its server span's parent (and is recorded when the caller's sampled flag says so); any
//! other request starts a new trace, recorded with probability `sample_ratio` (decided from
//! the trace id, as OpenTelemetry's `TraceIdRatioBased` sampler does). Each attempt of a
//! recorded request gets a client span, and the request sent upstream carries a `traceparent`
//! naming that span, so the backend's own spans hang under the attempt that reached it: a slow
//! or failing request shows which endpoint and which attempt made it so. The incoming
//! `tracestate` is forwarded unchanged.
//!
//! A request that is not recorded costs one branch: its headers pass through untouched.
//! Ids come from an injected [`IdSource`] (the proxy's per-thread generator by default).
//!
//! Why not the `opentelemetry` crates: with `opentelemetry-otlp` trimmed to HTTP/JSON and a
//! hyper client they add about 70 crates (tonic and prost among them, pulled by
//! `opentelemetry-proto` even without gRPC) and about 50 s to a clean debug build on two
//! cores, for what is here a few hundred lines: two span kinds, one exporter.

pub mod context;
pub mod export;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fulcrum_config::observe::TracingConfig;
use http::HeaderValue;

use self::context::{Parent, SpanId, TraceId};
use self::export::{Exporter, SpanData, SpanKind, Value};

/// Where trace and span ids come from.
pub trait IdSource: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]);
}

/// The proxy's per-thread generator ([`crate::clock::with_rng`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyRng;

impl IdSource for ProxyRng {
    fn fill(&self, buf: &mut [u8]) {
        crate::clock::with_rng(|rng| rand::RngCore::fill_bytes(rng, buf));
    }
}

/// Records spans and hands them to the exporter.
#[derive(Debug)]
pub struct Tracer {
    sample_ratio: f64,
    ids: Arc<dyn IdSource>,
    exporter: Exporter,
    /// Unix time at `anchor`, to turn monotonic instants into span timestamps.
    anchor: Instant,
    anchor_unix_ns: u64,
}

/// The TLS connector for an `https` collector: verified against `otlp_ca` or the system's
/// roots, with the URL's host as the server name.
pub(crate) fn collector_tls(config: &TracingConfig) -> Result<crate::tls::Connector, crate::tls::TlsError> {
    let settings = fulcrum_config::UpstreamTls {
        server_name: Some(config.otlp_endpoint.host.clone()),
        ca: config.otlp_ca.clone(),
        client_cert: None,
    };
    crate::tls::Connector::new(&settings, fulcrum_config::UpstreamProtocol::Http1)
}

impl Tracer {
    /// A tracer exporting to `config`'s collector; starts the export task on the current
    /// tokio runtime.
    pub fn new(config: &TracingConfig, ids: Arc<dyn IdSource>) -> Arc<Tracer> {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Arc::new(Tracer {
            sample_ratio: config.sample_ratio,
            ids,
            exporter: Exporter::start(config),
            anchor: Instant::now(),
            anchor_unix_ns: u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// Sends the spans still queued and stops exporting.
    pub async fn shutdown(&self) {
        self.exporter.shutdown().await;
    }

    /// Spans dropped so far because the queue was full or the collector failed.
    pub fn dropped(&self) -> u64 {
        self.exporter.dropped()
    }

    fn unix_ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.anchor);
        self.anchor_unix_ns.saturating_add(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }

    fn span_id(&self) -> SpanId {
        loop {
            let mut id = [0u8; 8];
            self.ids.fill(&mut id);
            if id != [0; 8] {
                return id;
            }
        }
    }

    fn trace_id(&self) -> TraceId {
        loop {
            let mut id = [0u8; 16];
            self.ids.fill(&mut id);
            if id != [0; 16] {
                return id;
            }
        }
    }

    /// Starts the server span of a request that arrived at `started`, if it is to be
    /// recorded.
    pub(crate) fn start(self: &Arc<Self>, headers: &http::HeaderMap, started: Instant) -> Option<ServerTrace> {
        let (trace_id, parent) = match context::from_headers(headers) {
            Some(Parent { sampled: false, .. }) => return None,
            Some(p) => (p.trace_id, Some(p.span_id)),
            None => {
                let trace_id = self.trace_id();
                // The trace id's last 8 bytes against the ratio, as TraceIdRatioBased does.
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let draw = u64::from_be_bytes(low) as f64 / u64::MAX as f64;
                if self.sample_ratio < 1.0 && draw >= self.sample_ratio {
                    return None;
                }
                (trace_id, None)
            }
        };
        let trace_state = parent
            .and_then(|_| headers.get("tracestate"))
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.len() <= 512)
            .map(str::to_owned);
        Some(ServerTrace {
            tracer: self.clone(),
            trace_id,
            span_id: self.span_id(),
            parent,
            trace_state,
            started,
            attempts: Vec::new(),
        })
    }
}

/// An upstream attempt being recorded.
#[derive(Debug)]
struct Attempt {
    number: u32,
    span_id: SpanId,
    started: Instant,
    attributes: Vec<(&'static str, Value)>,
}

/// What the server span of one request ends with.
#[derive(Debug, Default)]
pub(crate) struct Summary<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) host: Option<&'a str>,
    pub(crate) client: Option<SocketAddr>,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) route: Option<&'a str>,
    pub(crate) pool: Option<&'a str>,
    pub(crate) endpoint: Option<&'a str>,
    pub(crate) attempts: u32,
    pub(crate) status: u16,
    /// A response head went out (else `status` is 499, and an attempt still open never
    /// answered).
    pub(crate) answered: bool,
    pub(crate) bytes: u64,
    /// The last thing that went wrong (a failed attempt, even one retried successfully).
    pub(crate) error: Option<&'a str>,
    /// What went wrong after the response began (a stream cut, the client gone).
    pub(crate) response_error: Option<&'a str>,
}

/// The spans of one recorded request.
#[derive(Debug)]
pub(crate) struct ServerTrace {
    tracer: Arc<Tracer>,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    trace_state: Option<String>,
    started: Instant,
    /// Attempts open: one, or two while a hedge races the try it hedged.
    attempts: Vec<Attempt>,
}

impl ServerTrace {
    /// Starts the client span of attempt `number` and returns the `traceparent` to send
    /// upstream. Attempts left open are closed as failed, unless this one is a hedge (which
    /// races the open one).
    pub(crate) fn start_attempt(
        &mut self,
        number: u32,
        method: &str,
        pool: &str,
        endpoint: &str,
        address: SocketAddr,
        hedge: bool,
    ) -> HeaderValue {
        if !hedge {
            while !self.attempts.is_empty() {
                self.end_attempt(None, Some("abandoned"));
            }
        }
        let span_id = self.tracer.span_id();
        self.attempts.push(Attempt {
            number,
            span_id,
            started: Instant::now(),
            attributes: vec![
                ("http.request.method", Value::Str(method.to_owned())),
                ("server.address", Value::Str(address.ip().to_string())),
                ("server.port", Value::Int(i64::from(address.port()))),
                ("fulcrum.pool", Value::Str(pool.to_owned())),
                ("fulcrum.endpoint", Value::Str(endpoint.to_owned())),
                ("fulcrum.attempt", Value::Int(i64::from(number))),
            ],
        });
        context::format(&self.trace_id, &span_id, true)
    }

    /// Ends the latest open attempt's span: the upstream's status if it answered, the error
    /// if it failed (client spans count 4xx and 5xx answers as errors, as OpenTelemetry's HTTP
    /// conventions say).
    pub(crate) fn end_attempt(&mut self, status: Option<u16>, error: Option<&str>) {
        if let Some(a) = self.attempts.pop() {
            self.end(a, status, error);
        }
    }

    /// Ends attempt `number`'s span, if it is open (see [`end_attempt`](Self::end_attempt)).
    pub(crate) fn end_attempt_of(&mut self, number: u32, status: Option<u16>, error: Option<&str>) {
        if let Some(i) = self.attempts.iter().position(|a| a.number == number) {
            let a = self.attempts.remove(i);
            self.end(a, status, error);
        }
    }

    fn end(&mut self, mut a: Attempt, status: Option<u16>, error: Option<&str>) {
        if let Some(s) = status {
            a.attributes.push(("http.response.status_code", Value::Int(i64::from(s))));
        }
        let error = match (error, status) {
            (Some(e), _) => {
                a.attributes.push(("error.type", Value::Str(error_type(e))));
                Some(e.to_owned())
            }
            (None, Some(s)) if s >= 400 => {
                a.attributes.push(("error.type", Value::Str(s.to_string())));
                Some(format!("upstream answered {s}"))
            }
            _ => None,
        };
        let method = a.attributes.first().map_or("", |(_, v)| if let Value::Str(m) = v { m.as_str() } else { "" });
        let span = SpanData {
            trace_id: self.trace_id,
            span_id: a.span_id,
            parent: Some(self.span_id),
            trace_state: self.trace_state.clone(),
            name: method.to_owned(),
            kind: SpanKind::Client,
            start_ns: self.tracer.unix_ns(a.started),
            end_ns: self.tracer.unix_ns(Instant::now()),
            attributes: a.attributes,
            error,
        };
        self.tracer.exporter.send(span);
    }

    /// Ends the request: the open attempt (with the response's status) and the server span.
    pub(crate) fn finish(mut self, s: &Summary<'_>, elapsed: Duration) {
        self.end_attempt(s.answered.then_some(s.status), s.response_error);
        while !self.attempts.is_empty() {
            self.end_attempt(None, Some("abandoned"));
        }
        let mut attributes = vec![
            ("http.request.method", Value::Str(s.method.to_owned())),
            ("url.path", Value::Str(s.path.to_owned())),
            ("http.response.status_code", Value::Int(i64::from(s.status))),
            ("http.response.body.size", Value::Int(i64::try_from(s.bytes).unwrap_or(i64::MAX))),
            ("fulcrum.attempts", Value::Int(i64::from(s.attempts))),
        ];
        let strings = [
            ("server.address", s.host),
            ("fulcrum.request_id", s.request_id),
            ("fulcrum.route", s.route),
            ("fulcrum.pool", s.pool),
            ("fulcrum.endpoint", s.endpoint),
        ];
        attributes.extend(strings.into_iter().filter_map(|(k, v)| Some((k, Value::Str(v?.to_owned())))));
        if let Some(c) = s.client {
            attributes.push(("client.address", Value::Str(c.ip().to_string())));
            attributes.push(("client.port", Value::Int(i64::from(c.port()))));
        }
        // Server spans count 5xx and cut responses as errors, 4xx not.
        let error = if let Some(e) = s.response_error {
            attributes.push(("error.type", Value::Str("response_incomplete".into())));
            Some(e.to_owned())
        } else if s.status >= 500 {
            attributes.push(("error.type", Value::Str(s.status.to_string())));
            Some(s.error.map_or_else(|| format!("answered {}", s.status), str::to_owned))
        } else {
            None
        };
        let name = match s.route {
            Some(r) => format!("{} {r}", s.method),
            None => s.method.to_owned(),
        };
        let span = SpanData {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            trace_state: self.trace_state.take(),
            name,
            kind: SpanKind::Server,
            start_ns: self.tracer.unix_ns(self.started),
            end_ns: self.tracer.unix_ns(self.started + elapsed),
            attributes,
            error,
        };
        self.tracer.exporter.send(span);
    }
}

/// A short `error.type` from a proxy error message.
fn error_type(message: &str) -> String {
    let kind = if message.starts_with("cannot connect") {
        "connect_failed"
    } else if message.contains("did not answer within") {
        "timeout"
    } else if message == "abandoned" {
        "abandoned"
    } else {
        "upstream_failed"
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// Counts up: ids 01 01 01..., 02 02 02... (never zero).
    #[derive(Debug, Default)]
    struct Counting(AtomicU8);

    impl IdSource for Counting {
        fn fill(&self, buf: &mut [u8]) {
            let n = self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            buf.fill(n);
        }
    }

    fn config(ratio: f64) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: fulcrum_config::observe::OtlpEndpoint::parse("http://127.0.0.1:9").unwrap(),
            service_name: "test".into(),
            sample_ratio: ratio,
            otlp_ca: None,
        }
    }

    #[tokio::test]
    async fn parents_decide_and_ids_come_from_the_source() {
        let tracer = Tracer::new(&config(1.0), Arc::new(Counting::default()));
        let now = Instant::now();
        // No parent: a new trace, ids drawn in order.
        let t = tracer.start(&http::HeaderMap::new(), now).unwrap();
        assert_eq!((t.trace_id, t.span_id, t.parent), ([1; 16], [2; 8], None));
        // A sampled parent: joined, with its tracestate.
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        let mut t = tracer.start(&h, now).unwrap();
        assert_eq!(context::hex(&t.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.parent.map(|p| context::hex(&p)).as_deref(), Some("b7ad6b7169203331"));
        assert_eq!(t.trace_state.as_deref(), Some("congo=t61rcWkgMzE"));
        // An attempt's traceparent names the attempt's span.
        let tp = t.start_attempt(1, "GET", "p", "a", "127.0.0.1:1".parse().unwrap(), false);
        assert_eq!(tp.to_str().unwrap(), "00-0af7651916cd43dd8448eb211c80319c-0404040404040404-01");
        // An unsampled parent: nothing recorded.
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"));
        assert!(tracer.start(&h, now).is_none());
        tracer.shutdown().await;
    }

    #[tokio::test]
    async fn a_hedge_races_its_attempt_with_both_spans_open() {
        let tracer = Tracer::new(&config(1.0), Arc::new(Counting::default()));
        let mut t = tracer.start(&http::HeaderMap::new(), Instant::now()).unwrap();
        let at: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let open = |t: &ServerTrace| t.attempts.iter().map(|a| a.number).collect::<Vec<_>>();
        t.start_attempt(1, "POST", "p", "a", at, false);
        t.start_attempt(2, "POST", "p", "b", at, true);
        assert_eq!(open(&t), [1, 2], "the hedge races the open attempt");
        // The hedge answers first: the first attempt's span ends, the hedge's stays open
        // until the response ends.
        t.end_attempt_of(1, None, Some("cancelled: another attempt answered first"));
        assert_eq!(open(&t), [2]);
        // A retry (not a hedge) closes whatever is open.
        t.start_attempt(3, "POST", "p", "c", at, false);
        assert_eq!(open(&t), [3]);
        tracer.shutdown().await;
    }

    #[tokio::test]
    async fn the_ratio_samples_new_traces() {
        let never = Tracer::new(&config(0.0), Arc::new(ProxyRng));
        assert!((0..100).all(|_| never.start(&http::HeaderMap::new(), Instant::now()).is_none()));
        // 0x01..01 / u64::MAX is about 0.0039: recorded at 0.5, not at 0.001.
        let half = Tracer::new(&config(0.5), Arc::new(Counting::default()));
        assert!(half.start(&http::HeaderMap::new(), Instant::now()).is_some());
        let rare = Tracer::new(&config(0.001), Arc::new(Counting::default()));
        assert!(rare.start(&http::HeaderMap::new(), Instant::now()).is_none());
        for t in [never, half, rare] {
            t.shutdown().await;
        }
    }
}
