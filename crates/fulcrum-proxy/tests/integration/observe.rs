//! Observability end to end over real sockets on 127.0.0.1: the access log (captured from
//! `tracing`) and OpenTelemetry traces received by a stand-in OTLP/HTTP collector.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

// === access log ===

fn with_id(mut req: Request<Full<Bytes>>, id: &str) -> Request<Full<Bytes>> {
    req.headers_mut().insert("x-request-id", id.parse().expect("id"));
    req
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request() {
    let (captured, _guard) = capture();
    let a = backend("a", Behavior::Stream { chunks: 3, gap: Duration::from_millis(30) }).await;
    let toml = format!(
        r#"
[proxy]
access_log = true

[[listener]]
name = "public"
address = "127.0.0.1:0"

[[route]]
name = "chat"
match = {{ path_prefix = "/v1/" }}
pool = "p"

[[route]]
match = {{ path_prefix = "/dead" }}
pool = "dead"

[pool.p]
endpoints = {}

[pool.dead]
endpoints = [{{ id = "gone", address = "127.0.0.1:1" }}]
"#,
        endpoints(&[&a])
    );
    let running = proxy(&toml).await;
    let addr = running.proxy_addr;

    // A streamed answer.
    let (status, _, body) = send(addr, with_id(get("/v1/chat?api_key=secret"), "req-stream")).await;
    assert_eq!(status, 200);
    let line = captured.line_of("req-stream").await;
    assert_eq!(line["level"], "INFO");
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{line}");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/chat", "the query is left out: {line}");
    assert_eq!(line["host"], "test.local");
    assert_eq!(line["route"], "chat");
    assert_eq!(line["pool"], "p");
    assert_eq!(line["endpoint"], "a");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], body.len() as u64);
    let (duration, ttfb) = (line["duration_ms"].as_f64().expect("duration"), line["ttfb_ms"].as_f64().expect("ttfb"));
    // Three chunks 30 ms apart: the first byte comes well before the end.
    assert!(duration >= 60.0 && ttfb < duration - 40.0, "{line}");
    assert!(line.get("error").is_none(), "{line}");

    // An endpoint that refuses connections: the error is logged.
    let (status, _, _) = send(addr, with_id(get("/dead"), "req-dead")).await;
    let line = captured.line_of("req-dead").await;
    assert_eq!(line["status"], status.as_u16());
    assert_eq!((line["route"].as_str(), line["pool"].as_str()), (Some("route1"), Some("dead")));
    assert_eq!(line["endpoint"], "gone");
    assert!(line["error"].as_str().is_some_and(|e| e.contains("cannot connect to upstream gone")), "{line}");

    // No route: only what is known.
    let (status, _, _) = send(addr, with_id(get("/elsewhere"), "req-404")).await;
    assert_eq!(status, 404);
    let line = captured.line_of("req-404").await;
    assert_eq!(line["status"], 404);
    for absent in ["route", "pool", "endpoint"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }
    assert_eq!(line["attempts"], 0);
    running.shutdown().await;
}

#[tokio::test]
async fn without_access_log_there_is_no_line() {
    let (captured, _guard) = capture();
    let a = backend("a", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&a], "")).await;
    let (status, _, _) = send(running.proxy_addr, with_id(get("/"), "quiet")).await;
    assert_eq!(status, 200);
    running.shutdown().await;
    assert!(captured.access_lines().is_empty(), "{:?}", captured.access_lines());
}

// === traces ===

/// A stand-in OTLP/HTTP collector: keeps every span POSTed to /v1/traces.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    async fn start() -> (Collector, SocketAddr) {
        Self::start_with(None).await
    }

    /// A collector that serves over TLS when `tls` is given.
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> (Collector, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector::default();
        let spans = collector.spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (spans, tls) = (spans.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let spans = spans.clone();
                        async move {
                            let ok = req.method() == http::Method::POST
                                && req.uri().path() == "/v1/traces"
                                && req.headers()["content-type"] == "application/json";
                            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            for rs in json["resourceSpans"].as_array().into_iter().flatten() {
                                assert_eq!(rs["resource"]["attributes"][0]["value"]["stringValue"], "edge");
                                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                                    spans
                                        .lock()
                                        .expect("spans")
                                        .extend(ss["spans"].as_array().into_iter().flatten().cloned());
                                }
                            }
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            if !ok {
                                *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    fulcrum_testkit::certs::serve_http1(stream, tls, svc).await;
                });
            }
        });
        (collector, addr)
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Value> {
        self.spans.lock().expect("spans").iter().filter(|s| s["traceId"] == trace_id).cloned().collect()
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    let kv = span["attributes"].as_array()?.iter().find(|kv| kv["key"] == key)?;
    kv["value"].get("stringValue").or_else(|| kv["value"].get("intValue"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_the_incoming_parent_to_each_attempt() {
    let (collector, collector_addr) = Collector::start().await;
    let live = backend("live", Behavior::Echo).await;
    let toml = format!(
        r#"
[tracing]
otlp_endpoint = "http://{collector_addr}"
service_name = "edge"

[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "p"

[pool.p]
policy = "round_robin"
endpoints = [{{ id = "dead", address = "127.0.0.1:1" }}, {{ id = "live", address = "{}" }}]
"#,
        live.addr
    );
    let running = proxy(&toml).await;
    let parent = "b7ad6b7169203331";

    // Round robin: within two requests one tries the dead endpoint first, then retries.
    let mut requests = Vec::new();
    for i in 0..2 {
        let trace_id = format!("0af7651916cd43dd8448eb211c8031{i:02x}");
        let mut req = get("/v1/models");
        req.headers_mut().insert("traceparent", format!("00-{trace_id}-{parent}-01").parse().unwrap());
        req.headers_mut().insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        let (status, _, body) = send(running.proxy_addr, req).await;
        assert_eq!(status, 200);
        let upstream_saw = json(&body)["headers"]["traceparent"].as_str().expect("traceparent upstream").to_owned();
        assert_eq!(json(&body)["headers"]["tracestate"], "congo=t61rcWkgMzE");
        requests.push((trace_id, upstream_saw));
    }
    // An unsampled parent is forwarded untouched and nothing is recorded.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let mut req = get("/v1/models");
    req.headers_mut().insert("traceparent", unsampled.parse().unwrap());
    let (_, _, body) = send(running.proxy_addr, req).await;
    assert_eq!(json(&body)["headers"]["traceparent"], unsampled);
    // Shutdown sends what is queued.
    running.shutdown().await;

    let mut saw_failed_attempt = false;
    for (trace_id, upstream_saw) in &requests {
        let spans = collector.of_trace(trace_id);
        let servers: Vec<&Value> = spans.iter().filter(|s| s["kind"] == 2).collect();
        let clients: Vec<&Value> = spans.iter().filter(|s| s["kind"] == 3).collect();
        assert_eq!(servers.len(), 1, "{spans:#?}");
        let server = servers[0];
        assert_eq!(server["parentSpanId"], parent);
        assert_eq!(server["traceState"], "congo=t61rcWkgMzE");
        assert_eq!(attr(server, "http.response.status_code"), Some(&Value::from("200")));
        assert_eq!(attr(server, "fulcrum.endpoint"), Some(&Value::from("live")));
        assert!(!clients.is_empty() && clients.iter().all(|c| c["parentSpanId"] == server["spanId"]), "{spans:#?}");
        // The last attempt reached the backend, which got that attempt's span as its parent.
        let last = clients
            .iter()
            .find(|c| attr(c, "fulcrum.attempt") == Some(&Value::from(clients.len().to_string())))
            .expect("last attempt");
        let (tp_trace, tp_parent) = (&upstream_saw[3..35], &upstream_saw[36..52]);
        assert_eq!(tp_trace, trace_id);
        assert_eq!(tp_parent, last["spanId"].as_str().expect("span id"), "{upstream_saw} vs {last:#}");
        assert_eq!(attr(last, "fulcrum.endpoint"), Some(&Value::from("live")));
        assert_eq!(attr(last, "fulcrum.pool"), Some(&Value::from("p")));
        assert_eq!(last["status"]["code"], 0);
        if clients.len() == 2 {
            // The first attempt went to the dead endpoint: its span carries the error.
            let failed =
                clients.iter().find(|c| attr(c, "fulcrum.attempt") == Some(&Value::from("1"))).expect("attempt 1");
            assert_eq!(attr(failed, "fulcrum.endpoint"), Some(&Value::from("dead")));
            assert_eq!(attr(failed, "server.port"), Some(&Value::from("1")));
            assert_eq!(failed["status"]["code"], 2);
            assert!(
                failed["status"]["message"].as_str().is_some_and(|m| m.contains("cannot connect to upstream dead")),
                "{failed:#}"
            );
            assert_eq!(attr(failed, "error.type"), Some(&Value::from("connect_failed")));
            assert_eq!(attr(server, "fulcrum.attempts"), Some(&Value::from("2")));
            saw_failed_attempt = true;
        }
    }
    assert!(saw_failed_attempt, "no request tried the dead endpoint first");
    assert!(collector.of_trace("11111111111111111111111111111111").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_parent_starts_a_trace() {
    let (collector, collector_addr) = Collector::start().await;
    let a = backend("a", Behavior::Echo).await;
    let toml = one_pool("\"round_robin\"", &[&a], "").replace(
        "[[listener]]",
        &format!("[tracing]\notlp_endpoint = \"http://{collector_addr}/\"\nservice_name = \"edge\"\n\n[[listener]]"),
    );
    let running = proxy(&toml).await;
    let (_, _, body) = send(running.proxy_addr, get("/")).await;
    let tp = json(&body)["headers"]["traceparent"].as_str().expect("a traceparent goes upstream").to_owned();
    running.shutdown().await;
    let spans = collector.of_trace(&tp[3..35]);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans.iter().find(|s| s["kind"] == 2).expect("server span");
    assert!(server.get("parentSpanId").is_none(), "{server:#}");
    assert_eq!(server["name"], "GET default");
    let client = spans.iter().find(|s| s["kind"] == 3).expect("client span");
    assert_eq!(client["spanId"], &tp[36..52]);
    let (start, end) = (server["startTimeUnixNano"].as_str().unwrap(), server["endTimeUnixNano"].as_str().unwrap());
    assert!(start.parse::<u64>().unwrap() <= end.parse::<u64>().unwrap());
}

#[tokio::test]
async fn a_client_that_leaves_is_logged_as_such() {
    let (captured, _guard) = capture();
    let hang = backend("hang", Behavior::Hang).await;
    let slow = backend("slow", Behavior::Stream { chunks: 50, gap: Duration::from_millis(50) }).await;
    let toml = format!(
        r#"
[proxy]
access_log = true

[[listener]]
name = "public"
address = "127.0.0.1:0"

[[route]]
name = "hang"
match = {{ path_prefix = "/hang" }}
pool = "hang"

[[route]]
name = "slow"
match = {{ path_prefix = "/slow" }}
pool = "slow"

[pool.hang]
endpoints = {}

[pool.slow]
endpoints = {}
"#,
        endpoints(&[&hang]),
        endpoints(&[&slow])
    );
    let running = proxy(&toml).await;

    // Gone before the response head: 499.
    let mut client = h1(running.proxy_addr).await;
    let pending = client.send_request(with_id(get("/hang"), "left-early"));
    assert!(tokio::time::timeout(Duration::from_millis(200), pending).await.is_err());
    drop(client);
    let line = captured.line_of("left-early").await;
    assert_eq!(line["status"], 499);
    assert_eq!(line["endpoint"], "hang");
    assert_eq!(line["error"], "the client went away before the response");

    // Gone mid-stream: the status sent, and the cut.
    let mut client = h1(running.proxy_addr).await;
    let resp = client.send_request(with_id(get("/slow"), "left-mid-stream")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    drop(client);
    let line = captured.line_of("left-mid-stream").await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["error"], "the client went away before the response ended");
    assert!(line["bytes"].as_u64().is_some_and(|b| b > 0 && b < 50 * 16), "{line}");

    // Gone before the body was whole: 499, no endpoint tried.
    let mut raw = tokio::net::TcpStream::connect(running.proxy_addr).await.unwrap();
    raw.write_all(
        b"POST /slow HTTP/1.1\r\nHost: x\r\nx-request-id: left-in-body\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    drop(raw);
    let line = captured.line_of("left-in-body").await;
    assert_eq!(line["status"], 499);
    assert_eq!(line["error"], "the client went away before the response");
    assert!(line["endpoint"].is_null(), "{line}");
    running.shutdown().await;
}

#[tokio::test]
async fn the_access_log_follows_reloads_and_tracing_needs_a_restart() {
    let (captured, _guard) = capture();
    let a = backend("a", Behavior::Echo).await;
    let quiet = one_pool("\"round_robin\"", &[&a], "");
    let running = proxy(&quiet).await;
    send(running.proxy_addr, with_id(get("/"), "before")).await;
    let loud = format!("[proxy]\naccess_log = true\n{quiet}");
    running.live.reload_text(&loud, None).expect("access_log applies live");
    send(running.proxy_addr, with_id(get("/"), "after")).await;
    captured.line_of("after").await;
    assert!(captured.access_lines().iter().all(|l| l["request_id"] != "before"));
    let traced = format!("[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n{loud}");
    let e = running.live.reload_text(&traced, None).expect_err("tracing changes only at a restart");
    assert_eq!(e.field(), "tracing", "{e}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_verified_against_its_ca() {
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let ca = Ca::new("collector CA");
    let leaf = ca.leaf(Usage::Server, "collector", &["127.0.0.1"], &[]);
    let server = fulcrum_testkit::certs::server_config(&leaf);
    let (collector, collector_addr) = Collector::start_with(Some(Arc::new(server).into())).await;
    let dir = Dir::new("otlp-https");
    let good = dir.write("ca.pem", &ca.pem());
    let wrong = dir.write("other.pem", &Ca::new("other").pem());
    let a = backend("a", Behavior::Echo).await;
    for (ca_file, delivered) in [(&wrong, false), (&good, true)] {
        let tracing = format!(
            "[tracing]\notlp_endpoint = \"https://{collector_addr}\"\notlp_ca = \"{}\"\nservice_name = \"edge\"\n\n[[listener]]",
            ca_file.display()
        );
        let running = proxy(&one_pool("\"round_robin\"", &[&a], "").replace("[[listener]]", &tracing)).await;
        let (status, _, body) = send(running.proxy_addr, get("/")).await;
        assert_eq!(status, StatusCode::OK, "tracing never stands in the way of requests");
        let tp = json(&body)["headers"]["traceparent"].as_str().expect("traceparent").to_owned();
        running.shutdown().await;
        let spans = collector.of_trace(&tp[3..35]);
        assert_eq!(spans.len(), if delivered { 2 } else { 0 }, "CA {}: {spans:#?}", ca_file.display());
    }
}
