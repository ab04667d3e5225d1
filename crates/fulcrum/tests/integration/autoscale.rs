//! The autoscaler end to end: local `fulcrum mock-backend` replicas grow under a load step
//! and shrink back after it, with no failed request during scale-in (issue P1.7).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_proxy::Proxy;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The binary's adapter of the proxy's pool to the autoscaler, compiled into this test too
/// (the binary crate has no library).
#[path = "../../src/scaled.rs"]
pub(super) mod scaled;

async fn client(proxy: SocketAddr, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(proxy).await else {
            failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let body = r#"{"model":"llama","max_tokens":60,"messages":[{"role":"user","content":"scale me"}]}"#;
        let req = http::Request::post("/v1/chat/completions")
            .header("host", "fulcrum")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let good = match s.send_request(req).await {
            Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if good {
            ok.fetch_add(1, Ordering::Relaxed)
        } else {
            failed.fetch_add(1, Ordering::Relaxed)
        };
    }
}

/// The proxy and the pool's autoscaler, running from `toml`.
pub(super) struct Scaled {
    pub(super) addr: SocketAddr,
    pub(super) pool: Arc<fulcrum_proxy::pool::PoolRuntime>,
    stop_proxy: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
    stop_scaler: tokio::sync::oneshot::Sender<()>,
    scaler: tokio::task::JoinHandle<Result<(), fulcrum_scale::autoscaler::AutoscaleError>>,
}

impl Scaled {
    pub(super) async fn start(toml: &str) -> Scaled {
        let config = Config::parse(toml, None).expect("config");
        let proxy = Proxy::bind(&config).await.expect("proxy");
        let addr = proxy.local_addr("public").expect("listener");
        let pool = proxy.pools().remove(0);
        let (stop_proxy, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(proxy.run(async {
            let _ = stop_rx.await;
        }));
        let (stop_scaler, scaler_rx) = tokio::sync::oneshot::channel::<()>();
        let autoscale = pool.config().autoscale.clone().expect("autoscale");
        let scaler = tokio::spawn(fulcrum_scale::autoscaler::run(scaled::ProxyPool(pool.clone()), autoscale, async {
            let _ = scaler_rx.await;
        }));
        Scaled { addr, pool, stop_proxy, served, stop_scaler, scaler }
    }

    fn replicas(&self) -> usize {
        self.pool.snapshot().selector.endpoints().len()
    }

    pub(super) async fn stop(self) {
        let Scaled { pool, stop_proxy, served, stop_scaler, scaler, .. } = self;
        let _ = stop_scaler.send(());
        scaler.await.expect("autoscaler task").expect("autoscaler");
        assert_eq!(pool.snapshot().selector.endpoints().len(), 0, "replicas stopped at shutdown");
        let _ = stop_proxy.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_a_load_step_out_and_back_in() {
    let bin = env!("CARGO_BIN_EXE_fulcrum");
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "fleet"

[pool.fleet]
policy = "least_connections"
retry = {{ max_attempts = 3 }}

[pool.fleet.autoscale]
policy = "threshold"
metric = "in_flight"
target = 2.0
reserve = 0
cooldown = "1s"
min_replicas = 1
max_replicas = 4
interval = "200ms"
drain_timeout = "10s"
actuator = {{ kind = "local", command = "{bin} mock-backend --port {{port}} --seed {{index}} --model llama --gpu h100", ports = "19700-19720", ready_path = "/health", stop_grace = "5s" }}
"#
    );
    let scaled = Scaled::start(&toml).await;
    let (addr, pool) = (scaled.addr, scaled.pool.clone());
    let replicas = || scaled.replicas();

    // The first replica comes up.
    let t0 = Instant::now();
    while replicas() < 1 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no first replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // A load step: 8 concurrent clients.
    let step = Arc::new(AtomicBool::new(false));
    let heavy: Vec<_> = (0..8).map(|_| tokio::spawn(client(addr, step.clone(), ok.clone(), failed.clone()))).collect();
    // A light load that goes on through the scale-in.
    let light_stop = Arc::new(AtomicBool::new(false));
    let light = tokio::spawn(client(addr, light_stop.clone(), ok.clone(), failed.clone()));

    let mut peak = 0;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(20) && peak < 3 {
        peak = peak.max(replicas());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(peak >= 3, "the fleet grew to {peak} replicas only");
    tokio::time::sleep(Duration::from_secs(1)).await;
    step.store(true, Ordering::Relaxed);
    for h in heavy {
        h.await.expect("client");
    }
    // The step is over: back to the minimum, while the light client keeps sending.
    let t2 = Instant::now();
    while replicas() > 1 {
        assert!(t2.elapsed() < Duration::from_secs(30), "still {} replicas", replicas());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    light_stop.store(true, Ordering::Relaxed);
    light.await.expect("light client");

    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests ({} ok)", ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) > 10);
    let events: Vec<String> =
        pool.safety().events().into_iter().filter(|e| e.kind == "autoscale").map(|e| e.detail).collect();
    println!("autoscale decisions: {events:#?}");
    assert!(events.iter().any(|e| e.contains("-> 1 replicas")), "{events:?}");

    scaled.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_scaled_to_zero_holds_requests_while_a_replica_starts() {
    let bin = env!("CARGO_BIN_EXE_fulcrum");
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "fleet"

[pool.fleet]
policy = "round_robin"

[pool.fleet.autoscale]
policy = "threshold"
target = 4.0
reserve = 0
cooldown = "500ms"
min_replicas = 0
max_replicas = 2
scale_to_zero_after = "1s"
interval = "100ms"
cold_start_timeout = "20s"
actuator = {{ kind = "local", command = "{bin} mock-backend --port {{port}} --model llama", ports = "19730-19740", ready_path = "/health", stop_grace = "5s" }}
"#
    );
    let scaled = Scaled::start(&toml).await;
    let addr = scaled.addr;
    let replicas = || scaled.replicas();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replicas(), 0, "min_replicas 0 starts empty");

    let (ok, failed, stop) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    for round in 0..2 {
        // One request to the empty pool: held, the autoscaler wakes a replica, it is served.
        let one = {
            let (ok, failed) = (ok.clone(), failed.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.store(false, Ordering::Relaxed);
                let before = ok.load(Ordering::Relaxed);
                let worker = tokio::spawn(client(addr, stop.clone(), ok.clone(), failed));
                while ok.load(Ordering::Relaxed) == before {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                stop.store(true, Ordering::Relaxed);
                worker.await.expect("client");
            })
        };
        tokio::time::timeout(Duration::from_secs(30), one).await.expect("served in time").expect("task");
        assert_eq!(failed.load(Ordering::Relaxed), 0, "round {round}: a request failed while the pool woke up");
        // Idle again: back to zero after scale_to_zero_after.
        let t0 = Instant::now();
        while replicas() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "round {round}: did not scale to zero");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    scaled.stop().await;
}
