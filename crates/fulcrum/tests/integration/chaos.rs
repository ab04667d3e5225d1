//! Chaos: four mock backends as child processes under steady load; one is killed with
//! SIGKILL and restarted, one starts hanging, one starts failing 30% of requests. Clients
//! must see nothing (issue P1.4).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_proxy::Proxy;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::child::MockChild as Mock;

const REQUESTS: u64 = 3_000;
const CONCURRENCY: usize = 32;
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_millis(800);
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// A `fulcrum mock-backend` child process.
fn spawn_mock(port: u16, seed: u64) -> Mock {
    let (port, seed) = (port.to_string(), seed.to_string());
    let args = ["--port", &port, "--model", "llama", "--gpu", "h100", "--seed", &seed, "--output-len-median", "8"];
    Mock::spawn(&args.map(str::to_owned))
}

async fn admin(addr: SocketAddr, patch: &str) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("admin connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::patch("/admin/faults")
        .header("host", "mock")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(patch.to_owned())))
        .expect("admin request");
    let resp = s.send_request(req).await.expect("admin answer");
    assert_eq!(resp.status(), 200, "admin patch {patch}");
}

type Served =
    (SocketAddr, Arc<fulcrum_proxy::pool::PoolRuntime>, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>);

/// The proxy on `toml`, running, once the first health checks have admitted every endpoint.
async fn serve(toml: &str) -> Served {
    let config = Config::parse(toml, None).expect("config");
    let proxy = Proxy::bind(&config).await.expect("proxy");
    let addr = proxy.local_addr("public").expect("listener");
    let pool = proxy.pools().into_iter().next().expect("pool");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(proxy.run(async {
        let _ = stop_rx.await;
    }));
    // Wait until the first health checks have admitted everyone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pool.snapshot().selector.endpoints().iter().all(|e| e.signals().is_available(fulcrum_proxy::clock::now())) {
        assert!(Instant::now() < deadline, "endpoints not admitted by their health checks");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (addr, pool, stop_tx, served)
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    slowest_ms: AtomicU64,
    /// Requests slower than 2 s.
    slow: AtomicU64,
}

async fn client(proxy: SocketAddr, tally: Arc<Tally>, failures: Arc<std::sync::Mutex<Vec<String>>>) {
    client_for(proxy, tally, failures, REQUESTS).await;
}

async fn client_for(proxy: SocketAddr, tally: Arc<Tally>, failures: Arc<std::sync::Mutex<Vec<String>>>, requests: u64) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    while tally.sent.fetch_add(1, Ordering::Relaxed) < requests {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(proxy).await.expect("proxy connect");
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().expect("connected");
        let body = r#"{"model":"llama","max_tokens":8,"messages":[{"role":"user","content":"hello there"}]}"#;
        let req = http::Request::post("/v1/chat/completions")
            .header("host", "fulcrum")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let t0 = Instant::now();
        let result = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(_) if status == 200 => Ok(()),
                    Ok(b) => Err(format!("{status}: {}", String::from_utf8_lossy(&b.to_bytes()))),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => {
                sender = None;
                Err(format!("send: {e}"))
            }
        };
        tally.slowest_ms.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        if t0.elapsed() > Duration::from_secs(2) {
            tally.slow.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                failures.lock().expect("failures").push(e);
                tally.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_invisible_to_clients() {
    let mut mocks: Vec<Mock> = (0..4).map(|i| spawn_mock(0, i + 1)).collect();
    let names = ["dies", "hangs", "flaky", "steady"];
    let endpoints: Vec<String> =
        mocks.iter().zip(names).map(|(m, n)| format!("{{ id = \"{n}\", address = \"{}\" }}", m.addr)).collect();
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"

[[route]]
match = {{ path_prefix = "/v1/", model = "llama" }}
pool = "fleet"

[pool.fleet]
policy = "power_of_two"
first_byte_timeout = "{}ms"
slow_start = {{ window = "60s" }}
health_check = {{ path = "/health", interval = "{}ms", timeout = "150ms", rise = 2, fall = 3 }}
outlier_detection = {{ consecutive_gateway_failure = 2, max_ejection_percent = 50 }}
retry = {{ max_attempts = 3, retryable_statuses = [500, 502, 503, 504], backoff_base = "5ms", backoff_max = "20ms" }}
endpoints = [{}]
"#,
        FIRST_BYTE_TIMEOUT.as_millis(),
        HEALTH_INTERVAL.as_millis(),
        endpoints.join(", ")
    );
    let (addr, pool, stop_tx, served) = serve(&toml).await;

    let tally = Arc::new(Tally::default());
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let clients: Vec<_> =
        (0..CONCURRENCY).map(|_| tokio::spawn(client(addr, tally.clone(), failures.clone()))).collect();
    let upstream_requests = |i: usize| pool.snapshot().upstreams[i].requests();

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let killed_at = t0.elapsed();
    let dead_port = mocks[0].addr.port();
    mocks[0].kill();

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let hang_at = t0.elapsed();
    admin(mocks[1].addr, r#"{"hang_rate": 1.0}"#).await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    admin(mocks[2].addr, r#"{"error_rate": 0.3}"#).await;
    let flaky_at = t0.elapsed();

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let restarted_at = t0.elapsed();
    mocks[0] = spawn_mock(dead_port, 9);
    let hung_requests_after_restart = upstream_requests(1);

    for c in clients {
        c.await.unwrap();
    }
    let elapsed = t0.elapsed();
    let stats = &pool.safety().stats;
    let events = pool.safety().events();

    let load_start = fulcrum_proxy::clock::now() - elapsed;
    let at = |e: &fulcrum_proxy::safety::PoolEvent| e.at.saturating_since(load_start).as_secs_f64();
    let mut timeline: Vec<(f64, String)> = vec![
        (killed_at.as_secs_f64(), "dies: SIGKILL".into()),
        (hang_at.as_secs_f64(), "hangs: starts hanging".into()),
        (flaky_at.as_secs_f64(), "flaky: starts failing 30% of requests".into()),
        (restarted_at.as_secs_f64(), "dies: restarted".into()),
    ];
    let mut retries = 0;
    for e in &events {
        if e.kind == "retry" {
            retries += 1;
        } else {
            timeline.push((at(e), format!("{}: {} {}", e.endpoint, e.kind, e.detail)));
        }
    }
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("timeline (seconds since the load started):");
    for (t, what) in &timeline {
        println!("  {t:>6.3}  {what}");
    }
    println!(
        "{} requests in {:.1}s: {} ok, {} failed; {} retries (budget refusals {}), slowest {} ms",
        REQUESTS,
        elapsed.as_secs_f64(),
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        retries,
        stats.budget_exhausted.load(Ordering::Relaxed),
        tally.slowest_ms.load(Ordering::Relaxed)
    );

    // Nothing reached the clients.
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failures: {:?}", failures.lock().unwrap());
    assert_eq!(tally.ok.load(Ordering::Relaxed), REQUESTS);

    // A hung backend costs a request at most one first-byte timeout (plus normal service).
    let slowest = Duration::from_millis(tally.slowest_ms.load(Ordering::Relaxed));
    assert!(slowest < FIRST_BYTE_TIMEOUT * 2, "slowest request {slowest:?}");

    // The hung backend stopped receiving requests within two seconds of hanging.
    let first = |endpoint: &str, kinds: &[&str], after: Duration| {
        events
            .iter()
            .filter(|e| e.endpoint == endpoint && kinds.contains(&e.kind) && !e.detail.contains("-> healthy"))
            .map(|e| Duration::from_secs_f64(at(e)))
            .find(|&t| t >= after)
    };
    let hung_out = first("hangs", &["ejected", "health"], hang_at).expect("hung endpoint taken out");
    assert!(hung_out - hang_at < Duration::from_secs(2), "hung endpoint out after {:?}", hung_out - hang_at);
    assert_eq!(upstream_requests(1), hung_requests_after_restart, "hung endpoint still receiving requests");

    // The dead endpoint left rotation within three health intervals...
    let dead_out = first("dies", &["ejected", "health"], killed_at).expect("dead endpoint taken out");
    assert!(
        dead_out - killed_at <= HEALTH_INTERVAL * 3 + Duration::from_millis(200),
        "dead out after {:?}",
        dead_out - killed_at
    );
    // ...and came back, in slow start, within two seconds of its restart.
    let back = events
        .iter()
        .filter(|e| e.endpoint == "dies" && e.kind == "health" && e.detail.contains("-> healthy"))
        .map(|e| Duration::from_secs_f64(at(e)))
        .find(|&t| t >= restarted_at)
        .expect("restarted endpoint readmitted");
    assert!(back - restarted_at < Duration::from_secs(2), "readmitted after {:?}", back - restarted_at);
    let snapshot = pool.snapshot();
    let ramp = snapshot.selector.endpoints()[0].signals().slow_start_since().expect("readmitted in slow start");
    assert!(ramp.saturating_since(load_start) >= restarted_at, "the ramp began at readmission");
    assert!(upstream_requests(0) > 0);

    // The retry budget held: retries at most 20% of requests plus 10 a second.
    let allowed = 0.2 * REQUESTS as f64 + 10.0 * elapsed.as_secs_f64().ceil();
    assert!(f64::from(retries) <= allowed, "{retries} retries, budget {allowed}");
    assert!(retries > 0, "the chaos caused retries");

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
}

/// The same faults with the configuration a new user writes: the endpoints and a health
/// check, nothing about retries, routes or timeouts (issue P1.3). One backend is killed, one
/// frozen with SIGSTOP, one fails 30% of requests with 500; 16 clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_survive_a_kill_a_freeze_and_errors() {
    const CLIENTS: usize = 16;
    const BUDGET: u64 = 1_000_000;
    let mocks: Vec<Mock> = (0..4).map(|i| spawn_mock(0, i + 1)).collect();
    let mut mocks: Vec<Option<Mock>> = mocks.into_iter().map(Some).collect();
    let addrs: Vec<SocketAddr> = mocks.iter().map(|m| m.as_ref().expect("mock").addr).collect();
    let endpoints: Vec<String> = addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    let toml = format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"fleet\"\n\n\
         [pool.fleet]\nhealth_check = {{ path = \"/health\" }}\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    let (addr, pool, stop_tx, served) = serve(&toml).await;

    let tally = Arc::new(Tally::default());
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> =
        (0..CLIENTS).map(|_| tokio::spawn(client_for(addr, tally.clone(), failures.clone(), BUDGET))).collect();
    let ok = || tally.ok.load(Ordering::Relaxed);
    // Before the faults: 2 s of warm-up, then the rate over 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n0, t0) = (ok(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (ok() - n0) as f64 / t0.elapsed().as_secs_f64();
    // The faults, together.
    mocks[0].take().expect("mock").kill();
    let frozen = mocks[1].take().expect("mock");
    frozen.signal("STOP");
    admin(addrs[2], r#"{"error_rate": 0.3}"#).await;
    // While frozen: the rate over 6 s, from 1 s after the faults.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (n1, t1) = (ok(), Instant::now());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = (ok() - n1) as f64 / t1.elapsed().as_secs_f64();
    tally.sent.store(BUDGET, Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
    }
    frozen.signal("CONT");
    drop(frozen);
    let stats = &pool.safety().stats;
    println!(
        "defaults: {} ok, {} failed, {} slower than 2 s (slowest {} ms); goodput {before:.0} req/s before, \
         {during:.0} req/s with 2 of 4 backends live; retries {}, budget refusals {}, hedges {} ({} won)",
        ok(),
        tally.failed.load(Ordering::Relaxed),
        tally.slow.load(Ordering::Relaxed),
        tally.slowest_ms.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
        stats.budget_exhausted.load(Ordering::Relaxed),
        stats.hedges.load(Ordering::Relaxed),
        stats.hedges_won.load(Ordering::Relaxed),
    );
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failures: {:?}", failures.lock().unwrap());
    assert!(tally.slow.load(Ordering::Relaxed) <= 4, "{} requests slower than 2 s", tally.slow.load(Ordering::Relaxed));
    assert!(during >= 0.8 * before * 2.0 / 4.0, "goodput {during:.0} req/s while frozen against {before:.0} before");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
}
