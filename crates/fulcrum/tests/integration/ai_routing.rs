//! AI-aware routing end to end: the proxy in front of mock backends (and fake engines whose
//! metrics the test controls), over real sockets (issue P1.5).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_mock::engine::{EngineConfig, Gpu};
use fulcrum_mock::{MockConfig, MockHandle, MockServer};
use fulcrum_proxy::Proxy;
use fulcrum_proxy::pool::PoolRuntime;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

async fn mock(models: &[&str], loras: &[&str], seed: u64) -> MockHandle {
    let config = MockConfig {
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        loras: loras.iter().map(|m| (*m).to_owned()).collect(),
        engine: EngineConfig { speed: 4.0, ..EngineConfig::preset(Gpu::H100) },
        seed,
        ..MockConfig::default()
    };
    MockServer::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock")
}

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) pool: Arc<PoolRuntime>,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

pub(crate) async fn proxy(pool_toml: &str) -> Running {
    let toml =
        format!("[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n\n[pool.p]\n{pool_toml}\n");
    let config = Config::parse(&toml, None).expect("config");
    let proxy = Proxy::bind(&config).await.expect("proxy");
    let addr = proxy.local_addr("public").expect("listener");
    let pool = proxy.pools().remove(0);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    Running { addr, pool, stop, done }
}

impl Running {
    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.done).await;
    }

    /// Requests each endpoint received, by id.
    fn counts(&self) -> Vec<(String, u64)> {
        self.pool.snapshot().upstreams.iter().map(|u| (u.name().to_owned(), u.requests())).collect()
    }
}

/// Waits (bounded) until `ready` holds: readiness is polled, never assumed after a sleep.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn endpoints(addrs: &[(&str, SocketAddr, &str)]) -> String {
    let items: Vec<String> =
        addrs.iter().map(|(id, a, extra)| format!("{{ id = \"{id}\", address = \"{a}\"{extra} }}")).collect();
    format!("endpoints = [{}]", items.join(", "))
}

async fn chat(addr: SocketAddr, model: &str, system: &str, user: &str, max_tokens: u32) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let body = serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    });
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "fulcrum")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = s.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn system_prompt(n: usize) -> String {
    format!("You are assistant number {n}. ") + &"Always answer with care and cite your sources. ".repeat(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prefixes_stay_on_one_endpoint_until_it_is_overloaded() {
    let mocks = [mock(&["llama"], &[], 1).await, mock(&["llama"], &[], 2).await, mock(&["llama"], &[], 3).await];
    let eps: Vec<(&str, SocketAddr, &str)> =
        vec![("a", mocks[0].local_addr(), ""), ("b", mocks[1].local_addr(), ""), ("c", mocks[2].local_addr(), "")];
    // Tight bounds, so that a burst of 24 overloads the holder.
    let policy = "policy = { name = \"prefix_affinity\", epsilon = 0.25, slack_tokens = 1024 }";
    let running = proxy(&format!("{policy}\n{}", endpoints(&eps))).await;

    // One conversation after another with the same long system prompt: one endpoint.
    for i in 0..8 {
        let (status, _) = chat(running.addr, "llama", &system_prompt(1), &format!("question {i}"), 4).await;
        assert_eq!(status, 200);
    }
    let counts = running.counts();
    let holder = counts.iter().max_by_key(|c| c.1).cloned().expect("an endpoint");
    assert_eq!(holder.1, 8, "all on one endpoint: {counts:?}");

    // A different prefix is free to go elsewhere, and does when the holder is busier.
    // Many at once with the same prefix: the holder takes its share, then the rest spill.
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let addr = running.addr;
            tokio::spawn(async move { chat(addr, "llama", &system_prompt(1), &format!("burst {i}"), 200).await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let after = running.counts();
    let grew: Vec<u64> = after.iter().zip(&counts).map(|(a, b)| a.1 - b.1).collect();
    assert_eq!(grew.iter().sum::<u64>(), 24);
    assert!(grew.iter().filter(|&&g| g > 0).count() >= 2, "an overloaded holder must shed: {grew:?}");
    let holder_idx = counts.iter().position(|c| c.0 == holder.0).expect("holder");
    // Which endpoint ends with the most depends on timing (the spill-over endpoints learn the
    // prefix too); what the rule guarantees is that the holder still takes its part.
    assert!(grew[holder_idx] > 0, "the holder keeps taking requests while within its bound: {grew:?}");
    running.shutdown().await;
    for m in mocks {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_adapters_route_to_the_endpoints_that_serve_them() {
    let llama = mock(&["llama"], &[], 1).await;
    let qwen = mock(&["qwen"], &[], 2).await;
    let lora = mock(&["llama"], &["sql-adapter"], 3).await;
    let eps = vec![
        ("llama", llama.local_addr(), ", models = [\"llama\"]"),
        ("qwen", qwen.local_addr(), ", models = [\"qwen\"]"),
        ("lora", lora.local_addr(), ", models = [\"llama\"]"),
    ];
    let running = proxy(&format!(
        "policy = \"least_tokens\"\nengine_metrics = {{ interval = \"100ms\", models_path = \"/v1/models\" }}\n{}",
        endpoints(&eps)
    ))
    .await;
    // Let the scraper learn the adapters from /v1/models.
    until("the adapter is scraped", || running.pool.snapshot().selector.endpoints()[2].serves("sql-adapter")).await;
    for i in 0..6 {
        let (status, body) = chat(running.addr, "qwen", "hi", &format!("q{i}"), 2).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = chat(running.addr, "sql-adapter", "hi", &format!("s{i}"), 2).await;
        assert_eq!(status, 200, "{body}");
    }
    let counts: std::collections::HashMap<String, u64> = running.counts().into_iter().collect();
    assert_eq!(counts["qwen"], 6, "{counts:?}");
    assert_eq!(counts["lora"], 6, "{counts:?}");
    assert_eq!(counts["llama"], 0, "{counts:?}");
    // A model nobody serves: 404 in OpenAI's shape.
    let (status, body) = chat(running.addr, "gpt-9", "hi", "x", 2).await;
    assert_eq!(status, 404);
    assert!(body.contains("model_not_found"), "{body}");
    running.shutdown().await;
    for m in [llama, qwen, lora] {
        m.shutdown().await;
    }
}

/// A fake engine: answers chat completions (after `delay_ms`), and serves `/metrics` from
/// text the test sets (or fails it, to go stale).
#[derive(Clone)]
struct FakeEngine {
    metrics: Arc<Mutex<Option<String>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

async fn fake_engine() -> (SocketAddr, FakeEngine) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let engine = FakeEngine { metrics: Arc::new(Mutex::new(None)), delay_ms: Default::default() };
    let shared = engine.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            match shared.metrics.lock().expect("metrics").clone() {
                                Some(text) => http::Response::new(Full::new(Bytes::from(text))),
                                None => {
                                    let mut r = http::Response::new(Full::new(Bytes::new()));
                                    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                                    r
                                }
                            }
                        } else {
                            let _ = req.into_body().collect().await;
                            let delay = shared.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            http::Response::new(Full::new(Bytes::from_static(br#"{"choices":[]}"#)))
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, engine)
}

fn vllm_page(waiting: u32, kv: f64) -> String {
    format!(
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"llama\"}} 4\n\
         vllm:num_requests_waiting{{model_name=\"llama\"}} {waiting}\nvllm:kv_cache_usage_perc{{model_name=\"llama\"}} {kv}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_engines_are_avoided_and_stale_metrics_ignored() {
    let (a, engine_a) = fake_engine().await;
    let (b, engine_b) = fake_engine().await;
    *engine_a.metrics.lock().expect("a") = Some(vllm_page(50, 0.95));
    *engine_b.metrics.lock().expect("b") = Some(vllm_page(3, 0.7));
    let eps = vec![("a", a, ""), ("b", b, "")];
    let running = proxy(&format!(
        "policy = \"score\"\nengine_metrics = {{ interval = \"50ms\", stale_after = \"200ms\" }}\n{}",
        endpoints(&eps)
    ))
    .await;
    let reported = |i: usize| {
        let snapshot = running.pool.snapshot();
        let max_age = snapshot.selector.options().engine_max_age();
        snapshot.selector.endpoints()[i].signals().engine(fulcrum_proxy::clock::now(), max_age).is_some()
    };
    until("both engines are scraped", || reported(0) && reported(1)).await;
    let send = |n: usize| async move {
        for i in 0..n {
            assert_eq!(chat(running.addr, "llama", "hello", &format!("x{i}"), 2).await.0, 200);
        }
    };
    // Fresh: a is saturated (50 waiting, 95% KV), so everything goes to b.
    send(10).await;
    let before: Vec<u64> = running.counts().iter().map(|c| c.1).collect();
    assert_eq!(before, [0, 10], "a saturated engine is filtered out");
    // a's metrics stop: its last (saturated) report goes stale and is ignored. Unknown is not
    // idle, but it is no longer "saturated" either, and b is busy: a gets traffic again.
    *engine_a.metrics.lock().expect("a") = None;
    until("a's report is stale", || !reported(0)).await;
    send(10).await;
    let after: Vec<u64> = running.counts().iter().map(|c| c.1).collect();
    assert!(after[0] > 0, "the stale saturated report must not keep a out: {after:?}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_holder_with_a_full_kv_cache_keeps_its_conversations() {
    // A prefix-caching engine reports its KV cache nearly full while it serves the prefixes
    // it holds. That load is already counted in its in-flight tokens: it must not also shrink
    // its capacity and push the prefix's requests onto a cold endpoint.
    let (a, engine_a) = fake_engine().await;
    let (b, engine_b) = fake_engine().await;
    for e in [&engine_a, &engine_b] {
        *e.metrics.lock().expect("metrics") = Some(vllm_page(0, 0.1));
        e.delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
    }
    let eps = vec![("a", a, ""), ("b", b, "")];
    let running = proxy(&format!(
        "policy = {{ name = \"prefix_affinity\", epsilon = 1.0, slack_tokens = 0 }}\n\
         engine_metrics = {{ interval = \"50ms\" }}\n{}",
        endpoints(&eps)
    ))
    .await;
    assert_eq!(chat(running.addr, "llama", &system_prompt(7), "first", 8).await.0, 200);
    let holder = running.counts().iter().position(|c| c.1 == 1).expect("one endpoint took it");
    let engines = [&engine_a, &engine_b];
    *engines[holder].metrics.lock().expect("metrics") = Some(vllm_page(0, 0.97));
    let weight = |i: usize| running.pool.snapshot().selector.endpoints()[i].signals().effective_weight();
    until("the holder's KV-cache use is scraped", || weight(holder) < 0.1).await;

    // Four at once behind the same system prompt: the holder's token load stays within the
    // bound (twice the mean with two endpoints), so all four stay with their prefix.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let addr = running.addr;
            tokio::spawn(async move { chat(addr, "llama", &system_prompt(7), &format!("turn {i}"), 8).await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let counts: Vec<u64> = running.counts().iter().map(|c| c.1).collect();
    assert_eq!(counts[holder], 5, "the holder keeps its prefix: {counts:?}");
    running.shutdown().await;
}

/// A streamed chat completion (the first body bytes are the first token); its status.
/// One chat completion (streamed or whole): its status, whether its body is complete (a
/// stream ends with `[DONE]`, a whole answer has its `choices`), and how long it took.
pub(crate) async fn chat_once(addr: SocketAddr, prompt: &str, stream: bool, max_tokens: u32) -> (u16, bool, Duration) {
    let started = std::time::Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let body = serde_json::json!({
        "model": "llama", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    });
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "fulcrum")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = s.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let complete = if stream { text.trim_end().ends_with("data: [DONE]") } else { text.contains("\"choices\"") };
    (status, complete, started.elapsed())
}

async fn stream_chat(addr: SocketAddr, prompt: String) -> u16 {
    chat_once(addr, &prompt, true, 4).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slowed_to_half_speed_loses_share_within_seconds_without_a_label() {
    slowed_backend_loses_share("predicted_ttft").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_learns_a_slowed_backend_as_capacity() {
    slowed_backend_loses_share("least_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_of_two_learns_a_slowed_backend_as_capacity() {
    slowed_backend_loses_share("power_of_two").await;
}

async fn slowed_backend_loses_share(policy: &str) {
    // Three equal engines (speed 1: a 2,000-token prompt takes 125 ms to prefill), the
    // configuration a new user writes: the policy and the endpoints, nothing about speeds.
    let mut mocks = Vec::new();
    for seed in 1..=3 {
        let config = MockConfig {
            models: vec!["llama".to_owned()],
            engine: EngineConfig::preset(Gpu::H100),
            seed,
            ..MockConfig::default()
        };
        mocks.push(MockServer::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock"));
    }
    let eps: Vec<(&str, SocketAddr, &str)> =
        vec![("a", mocks[0].local_addr(), ""), ("b", mocks[1].local_addr(), ""), ("c", mocks[2].local_addr(), "")];
    let running = proxy(&format!("policy = \"{policy}\"\n{}", endpoints(&eps))).await;

    // Six clients, each sending distinct 8,000-character prompts back to back until told.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients: Vec<_> = (0..6u64)
        .map(|c| {
            let (addr, stop, failures) = (running.addr, stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let prompt = format!("client {c} request {i}: ") + &"lorem ipsum dolor sit amet ".repeat(300);
                    if stream_chat(addr, prompt).await != 200 {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let share_of_a = |from: &[(String, u64)], to: &[(String, u64)]| {
        let grew: Vec<u64> = to.iter().zip(from).map(|(t, f)| t.1 - f.1).collect();
        (grew[0] as f64 / grew.iter().sum::<u64>().max(1) as f64, grew)
    };
    // Learn the fleet, then measure a's share of 3 s of requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = running.counts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t1 = running.counts();
    let (before, grew_before) = share_of_a(&t0, &t1);
    // Half speed, through the mock's admin faults: nothing tells the proxy.
    mocks[0]
        .set_faults(&fulcrum_mock::faults::FaultsPatch { slowdown: Some(0.5), ..Default::default() })
        .expect("fault");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t2 = running.counts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t3 = running.counts();
    let (after, grew_after) = share_of_a(&t2, &t3);
    // What the proxy learned: a's prefill rate is about half the others'.
    let snapshot = running.pool.snapshot();
    let prior = snapshot.selector.pool_perf();
    let rates: Vec<f64> =
        snapshot.selector.endpoints().iter().map(|e| e.signals().perf().estimate(&prior).prefill_rate()).collect();
    let speeds: Vec<f64> = snapshot.selector.endpoints().iter().map(|e| e.signals().learned_speed()).collect();

    eprintln!(
        "{policy}: share of a: {before:.2} {grew_before:?} -> {after:.2} {grew_after:?}; \
         learned prefill rates {rates:?}, speeds {speeds:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    assert_eq!(failures.load(std::sync::atomic::Ordering::Relaxed), 0);
    // Within 5 s of the slow-down (measured from 2 s to 5 s after it), a's share of new
    // requests has fallen well below what it was.
    assert!(before > 0.2, "equal engines share: {grew_before:?}");
    assert!(
        after < 0.75 * before,
        "share of the slowed engine: {before:.2} {grew_before:?} -> {after:.2} {grew_after:?}"
    );
    if policy == "predicted_ttft" {
        // (Only the AI policies read prompts; the others learn first tokens as overhead.)
        assert!(rates[0] < 0.75 * rates[1].min(rates[2]), "learned prefill rates {rates:?}");
    }
    // And the capacity the load-aware policies divide by.
    assert!(speeds[0] < 0.8 * speeds[1].min(speeds[2]), "learned speeds {speeds:?}");
    running.shutdown().await;
    for m in mocks {
        m.shutdown().await;
    }
}

/// A chat completion with extra headers: status, Retry-After, body, and how long it took.
async fn chat_with(
    addr: SocketAddr,
    prompt: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, String, Duration) {
    let started = std::time::Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let body = serde_json::json!({
        "model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": prompt}],
    });
    let mut req = http::Request::post("/v1/chat/completions")
        .header("host", "fulcrum")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp =
        s.send_request(req.body(Full::new(Bytes::from(body.to_string()))).expect("request")).await.expect("response");
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, retry, String::from_utf8_lossy(&body).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttft_budget_no_endpoint_can_meet_is_queued_or_shed_by_class() {
    // The configuration a new user writes: endpoints only (the default policy, which reads no
    // bodies; a budget header makes the proxy read the prompt's length anyway).
    let a = mock(&["llama"], &[], 1).await;
    let running = proxy(&endpoints(&[("a", a.local_addr(), "")])).await;
    let addr = running.addr;
    // About 20,000 prompt tokens: seconds of prefill anywhere, a budget of 50 ms.
    let long = "lorem ipsum dolor sit amet ".repeat(3_000);
    let budget = ("x-fulcrum-ttft-budget", "50ms");

    let (status, retry, body, _) = chat_with(addr, &long, &[budget, ("x-fulcrum-criticality", "sheddable")]).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s >= 1)), "Retry-After");
    assert!(body.contains("ttft_budget_unmet"), "{body}");

    // Standard (the default class) waits for the budget to pass, then 503.
    let (status, retry, body, took) = chat_with(addr, &long, &[budget]).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "Retry-After");
    assert!(took >= Duration::from_millis(25), "standard waits while the budget lasts: {took:?}");

    // Critical goes anyway; a short prompt or a generous budget goes whatever the class.
    assert_eq!(chat_with(addr, &long, &[budget, ("x-fulcrum-criticality", "critical")]).await.0, 200);
    assert_eq!(
        chat_with(addr, "hi", &[("x-fulcrum-ttft-budget", "2s"), ("x-fulcrum-criticality", "sheddable")]).await.0,
        200
    );
    assert_eq!(chat_with(addr, &long, &[("x-fulcrum-ttft-budget", "10m")]).await.0, 200);
    // Nothing reached the backend but the three that were sent.
    assert_eq!(running.counts()[0].1, 3);

    // A header that is not understood is the client's error, named.
    let (status, _, body, _) = chat_with(addr, "hi", &[("x-fulcrum-ttft-budget", "soon")]).await;
    assert_eq!(status, 400);
    assert!(body.contains("x-fulcrum-ttft-budget") && body.contains("bad_request_header"), "{body}");
    let (status, _, body, _) = chat_with(addr, "hi", &[budget, ("x-fulcrum-criticality", "vip")]).await;
    assert_eq!(status, 400);
    assert!(body.contains("critical, standard or sheddable"), "{body}");
    running.shutdown().await;
    a.shutdown().await;
}

/// Another client fills the engines' queues with low-priority requests (a naive batch client;
/// the engines schedule by priority, so its requests run after the proxy's). The default policy
/// reads those queues in the engines' metrics; its first tokens show they do not delay its
/// requests, and it learns so (the others' weight) instead of reading them as a wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_clients_low_priority_queues_are_learned_not_to_delay_ours() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut mocks = Vec::new();
    for seed in 1..=2 {
        let mut config = MockConfig {
            models: vec!["llama".to_owned()],
            engine: EngineConfig { speed: 4.0, max_num_seqs: 4, ..EngineConfig::preset(Gpu::H100) },
            seed,
            ..MockConfig::default()
        };
        config.server.scheduling_policy = fulcrum_mock::config::SchedulingPolicy::Priority;
        mocks.push(MockServer::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock"));
    }
    // The other client: 12 requests at a time on each engine, at priority 10, long answers.
    let stop = Arc::new(AtomicBool::new(false));
    let mut naive = Vec::new();
    for m in &mocks {
        for i in 0..12 {
            let (addr, stop) = (m.local_addr(), stop.clone());
            naive.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let body = serde_json::json!({
                        "model": "llama", "max_tokens": 200, "priority": 10,
                        "messages": [{"role": "user", "content": format!("batch item {i}")}],
                    });
                    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else { break };
                    let (mut s, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
                    tokio::spawn(conn);
                    let req = http::Request::post("/v1/chat/completions")
                        .header("host", "mock")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("request");
                    if let Ok(resp) = s.send_request(req).await {
                        let _ = resp.into_body().collect().await;
                    }
                }
            }));
        }
    }
    let eps = vec![("a", mocks[0].local_addr(), ""), ("b", mocks[1].local_addr(), "")];
    let running = proxy(&format!("engine_metrics = {{ interval = \"100ms\" }}\n{}", endpoints(&eps))).await;
    // The weight the policy routes on: each endpoint's own, blended with the pool's.
    let others = |i: usize| {
        let snapshot = running.pool.snapshot();
        let prior = snapshot.selector.pool_perf();
        snapshot.selector.endpoints()[i].signals().perf().estimate(&prior).others
    };
    let queued = |i: usize| {
        let snapshot = running.pool.snapshot();
        let max_age = snapshot.selector.options().engine_max_age();
        let e = &snapshot.selector.endpoints()[i];
        e.signals().engine(fulcrum_proxy::clock::now(), max_age).is_some_and(|r| r.waiting >= 4)
    };
    until("both engines report the other client's queue", || queued(0) && queued(1)).await;
    assert_eq!((others(0), others(1)), (1.0, 1.0), "nothing learned yet");
    // Interactive streams through the proxy, four at a time, in rounds of 80, until both
    // weights are learned (at most 10 rounds; 2 are enough on an idle machine).
    let mut rounds = 0;
    while rounds < 10 && !(others(0) < 0.5 && others(1) < 0.5) {
        rounds += 1;
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let addr = running.addr;
                tokio::spawn(async move {
                    let mut failed = 0;
                    for i in 0..20 {
                        let (status, complete, _) =
                            chat_once(addr, &format!("user {c} round {rounds} turn {i}"), true, 4).await;
                        failed += u32::from(status != 200 || !complete);
                    }
                    failed
                })
            })
            .collect();
        for c in clients {
            assert_eq!(c.await.expect("client"), 0, "interactive requests failed");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let learned = (others(0), others(1));
    assert!(learned.0 < 0.5 && learned.1 < 0.5, "others' weight after {rounds} rounds: {learned:?}");
    // Neither endpoint is left out. One round (80 requests) can be all there is, and on a
    // loaded machine its split is uneven (17 / 63 was seen in CI): at least an eighth each.
    let counts: Vec<u64> = running.counts().iter().map(|c| c.1).collect();
    let total: u64 = counts.iter().sum();
    assert!(counts.iter().all(|&n| n * 8 >= total), "both endpoints serve: {counts:?}");
    running.shutdown().await;
    for t in naive {
        t.abort();
    }
    for m in mocks {
        m.shutdown().await;
    }
}
