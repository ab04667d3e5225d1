//! `/metrics` after real traffic: a proxy on 127.0.0.1 in front of two `fulcrum mock-backend`
//! servers (in process) and a dead endpoint; the page must parse as OpenMetrics text (checked
//! here, and by Python's `prometheus_client` parser when it is installed) and carry the
//! per-request families with the right labels.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_control::admin::{AdminState, app};
use fulcrum_mock::engine::{EngineConfig, Gpu, OutputLen};
use fulcrum_mock::{MockConfig, MockHandle, MockServer};
use fulcrum_proxy::Proxy;
use fulcrum_testkit::exposition::{self, Exposition, Format};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;
use tower::ServiceExt;

/// A model that streams 8 tokens, `itl_ms` apart.
async fn mock(itl_ms: u64) -> MockHandle {
    let config = MockConfig {
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
    };
    MockServer::bind(config, "127.0.0.1:0".parse().expect("address")).await.expect("mock starts")
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test.local")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.expect("body").to_bytes())
}

async fn scrape(state: &AdminState) -> String {
    let req = axum::http::Request::get("/metrics").body(Body::empty()).expect("request");
    let resp = app(state.clone()).oneshot(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

/// Checks the page as OpenMetrics text (see `fulcrum_testkit::exposition`), with Fulcrum's
/// own rules on top: every family is `fulcrum_*`, a counter, gauge or histogram, and every
/// histogram has a series.
fn parse(text: &str) -> Exposition {
    let page = exposition::check(text, Format::OpenMetrics);
    for (family, kind) in &page.families {
        assert!(family.starts_with("fulcrum_"), "family {family} outside fulcrum_");
        assert!(["counter", "gauge", "histogram"].contains(&kind.as_str()), "unexpected type {kind} of {family}");
        if kind == "histogram" {
            assert!(page.matching(&format!("{family}_count"), &[]).next().is_some(), "{family} has no series");
        }
    }
    page
}

/// Python's `prometheus_client` OpenMetrics parser reads the page (skipped outside CI when
/// Python or the package is missing).
fn python_parses(text: &str) {
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  fams = list(p(sys.stdin.read()))\nprint(len(fams), 'families')\n";
    let python = std::env::var("FULCRUM_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let outcome = child.and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().expect("stdin").write_all(text.as_bytes())?;
        c.wait_with_output()
    });
    let why = match outcome {
        Ok(out) if out.status.success() => {
            println!("prometheus_client: {}", String::from_utf8_lossy(&out.stdout).trim());
            return;
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("ModuleNotFoundError"), "prometheus_client rejects /metrics:\n{err}\n{text}");
            format!("prometheus_client is not installed: {}", err.trim())
        }
        Err(e) => format!("cannot run python3: {e}"),
    };
    assert!(std::env::var_os("CI").is_none(), "{why} (CI is set, so this is a failure)");
    println!("SKIPPED the Python check: {why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_have_the_request_families_and_labels() {
    let (a, b) = (mock(15).await, mock(15).await);
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"

[[route]]
name = "chat"
match = {{ path_prefix = "/v1/chat/" }}
pool = "llm"

[[route]]
name = "models"
match = {{ path_prefix = "/v1/models" }}
pool = "llm"

[[route]]
match = {{ path_prefix = "/dead" }}
pool = "dead"

[pool.llm]
policy = "round_robin"
endpoints = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]
engine_metrics = {{ interval = "50ms" }}
health_check = {{ path = "/health", interval = "100ms" }}
admission = {{ max_in_flight = 8, max_queue = 8, queue_timeout = "5s" }}

[pool.dead]
endpoints = [{{ id = "gone", address = "127.0.0.1:1" }}]
"#,
        a.local_addr(),
        b.local_addr()
    );
    let config = Config::parse(&toml, None).expect("config");
    let proxy = Proxy::bind(&config).await.expect("proxy");
    let addr = proxy.local_addr("public").expect("listener");
    let state = AdminState::new(proxy.live().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));

    // Wait until health checks and engine scrapes have run (both endpoints healthy).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = parse(&scrape(&state).await);
        let healthy = s.sum("fulcrum_endpoint_healthy", &[("pool", "llm")]);
        let scraped = s.matching("fulcrum_endpoint_engine_metrics_age_seconds", &[]).count();
        if healthy == 2.0 && scraped == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "endpoints never became healthy and scraped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let chat = r#"{"model":"mock-llm","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":8}"#;
    for _ in 0..4 {
        let (status, body) = request(addr, "POST", "/v1/chat/completions", chat).await;
        assert_eq!(status, 200, "{body:?}");
        assert!(body.ends_with(b"data: [DONE]\n\n"), "{body:?}");
    }
    assert_eq!(request(addr, "GET", "/v1/models", "").await.0, 200);
    assert_eq!(request(addr, "GET", "/nowhere", "").await.0, 404);
    let (dead, _) = request(addr, "GET", "/dead", "").await;
    assert!(dead == 502 || dead == 503, "{dead}");

    let text = scrape(&state).await;
    let s = parse(&text);
    python_parses(&text);

    // Requests by pool, endpoint, route and status.
    let requests = "fulcrum_requests_total";
    assert_eq!(s.sum(requests, &[("pool", "llm"), ("route", "chat"), ("status", "200")]), 4.0, "{text}");
    for e in ["a", "b"] {
        assert_eq!(s.sum(requests, &[("pool", "llm"), ("endpoint", e), ("route", "chat")]), 2.0, "{e}: {text}");
    }
    assert_eq!(s.sum(requests, &[("pool", "llm"), ("route", "models"), ("status", "200")]), 1.0);
    assert_eq!(
        s.sum(requests, &[("pool", "dead"), ("endpoint", "gone"), ("route", "route2"), ("status", &dead.to_string())]),
        1.0,
        "{text}"
    );
    assert!(s.sum(requests, &[("pool", ""), ("endpoint", ""), ("route", ""), ("status", "404")]) >= 1.0);
    for sample in s.matching(requests, &[]) {
        let keys: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["endpoint", "pool", "route", "status"]);
    }

    // Latency histograms per pool and endpoint: every answered request is in both, and the
    // first byte of a stream comes well before its end.
    for family in ["fulcrum_request_duration_seconds", "fulcrum_time_to_first_byte_seconds"] {
        assert_eq!(s.sum(&format!("{family}_count"), &[("pool", "llm")]), 5.0, "{family}: {text}");
    }
    let duration = s.sum("fulcrum_request_duration_seconds_sum", &[("pool", "llm")]);
    let first_byte = s.sum("fulcrum_time_to_first_byte_seconds_sum", &[("pool", "llm")]);
    // Eight tokens 15 ms apart: each stream lasts at least ~100 ms after its first token.
    assert!(duration > 0.4 && first_byte < duration - 0.3, "ttfb {first_byte} vs duration {duration}");

    // The state of the endpoints and the pool's failure handling.
    for (name, pool, want) in [
        ("fulcrum_endpoint_healthy", "llm", 2.0),
        ("fulcrum_endpoint_ejected", "llm", 0.0),
        ("fulcrum_endpoint_draining", "llm", 0.0),
        ("fulcrum_endpoint_in_flight", "llm", 0.0),
        ("fulcrum_pool_admission_queued", "llm", 0.0),
        ("fulcrum_pool_admission_in_flight", "llm", 0.0),
        ("fulcrum_pool_ejections_total", "llm", 0.0),
        ("fulcrum_pool_retries_total", "llm", 0.0),
        ("fulcrum_pool_retry_budget_exhausted_total", "llm", 0.0),
        ("fulcrum_endpoint_engine_scrape_failures_total", "llm", 0.0),
    ] {
        assert!(s.matching(name, &[("pool", pool)]).next().is_some(), "{name} missing:\n{text}");
        assert_eq!(s.sum(name, &[("pool", pool)]), want, "{name}");
    }
    assert_eq!(s.sum("fulcrum_endpoint_circuit_state", &[("pool", "llm"), ("state", "closed")]), 2.0);
    // One state at a time.
    assert_eq!(s.sum("fulcrum_endpoint_circuit_state", &[("pool", "dead"), ("endpoint", "gone")]), 1.0);
    let age = s.sum("fulcrum_endpoint_engine_metrics_age_seconds", &[("pool", "llm"), ("endpoint", "a")]);
    assert!((0.0..5.0).contains(&age), "scrape age {age}");
    assert!(s.sum("fulcrum_pool_admission_wait_seconds_count", &[("pool", "llm")]) >= 0.0);
    assert!(text.contains("# TYPE fulcrum_pool_admission_wait_seconds histogram"), "{text}");
    // The learned performance model: every streamed answer fed it (4 chat streams, 2 an
    // endpoint), and its prediction error has one observation per stream.
    for name in ["fulcrum_endpoint_learned_prefill_tokens_per_second", "fulcrum_endpoint_predicted_ttft_seconds"] {
        for e in ["a", "b"] {
            let v = s.sum(name, &[("pool", "llm"), ("endpoint", e)]);
            assert!(v.is_finite() && v > 0.0, "{name} {e}: {v}\n{text}");
        }
    }
    assert_eq!(s.sum("fulcrum_ttft_prediction_error_seconds_count", &[("pool", "llm")]), 4.0, "{text}");

    let _ = stop.send(());
    running.await.expect("proxy stops");
    a.shutdown().await;
    b.shutdown().await;
}
