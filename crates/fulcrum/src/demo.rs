//! `fulcrum demo`: a simulated heterogeneous GPU fleet behind the proxy, a traffic
//! generator, and a live summary every second.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use fulcrum_config::{Config, parse_duration};
use fulcrum_core::PolicyKind;
use fulcrum_mock::engine::{EngineConfig, Gpu};
use fulcrum_mock::loadgen::{LatencyHistogram, SseScanner};
use fulcrum_mock::{MockConfig, MockHandle, MockServer};
use fulcrum_proxy::Proxy;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The model the demo fleet serves.
const MODEL: &str = "llama-3-8b";

/// The demo fleet: name, accelerator, weight.
const FLEET: [(&str, Gpu, u32); 4] =
    [("h100-0", Gpu::H100, 4), ("a100-1", Gpu::A100, 2), ("a100-2", Gpu::A100, 2), ("l4-3", Gpu::L4, 1)];

/// A few long system prompts shared by many conversations, as real chat traffic has.
const SYSTEM_PROMPTS: [&str; 3] = [
    "You are a careful assistant for a bank. Answer in short paragraphs, cite the policy section, never give investment advice, and ask for clarification when a question is ambiguous.",
    "You are a coding assistant. Prefer small functions, explain trade-offs, show tests with every change, and point out undefined behaviour, races and unbounded memory use.",
    "You are a travel planner. Suggest itineraries with times and prices, keep walking distances short, and list the opening hours of every place you mention.",
];

/// Flags of `fulcrum demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the proxy listens; point your own OpenAI client at it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Stop after this long (such as 30s or 5m); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Concurrent streams of the built-in traffic generator (0: none, bring your own).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub concurrency: u32,
    /// Balancing policy of the fleet's pool (see `fulcrum policies`).
    #[arg(long, default_value = "predicted_ttft")]
    pub policy: PolicyKind,
    /// Show elastic scaling: the fleet is local `mock-backend` replicas managed by the
    /// autoscaler (1 to 6), and the traffic alternates between a low and a high level every
    /// 15 s.
    #[arg(long)]
    pub autoscale: bool,
    /// Where the admin API and the live dashboard (`/ui`) listen; when the port is taken, a
    /// free one is used instead.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Output tokens each generated request asks for.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_tokens: u32,
}

/// One second of client-side measurements.
#[derive(Default)]
struct Window {
    ok: u64,
    failed: u64,
    tokens: u64,
    ttft: LatencyHistogram,
    e2e: LatencyHistogram,
}

fn fleet_config(listen: SocketAddr, policy: PolicyKind, backends: &[(String, SocketAddr, Gpu, u32)]) -> String {
    let policy = match policy {
        PolicyKind::HeaderHash => r#"{ name = "header_hash", header = "x-user" }"#.to_owned(),
        PolicyKind::CookieHash => r#"{ name = "cookie_hash", cookie = "session" }"#.to_owned(),
        k => format!("\"{k}\""),
    };
    let endpoints: Vec<String> = backends
        .iter()
        .map(|(name, addr, gpu, weight)| {
            format!("  {{ id = \"{name}\", address = \"{addr}\", weight = {weight}, models = [\"{MODEL}\"], labels = {{ gpu = \"{}\" }} }},", gpu.as_str())
        })
        .collect();
    format!(
        "[[listener]]\nname = \"public\"\naddress = \"{listen}\"\npool = \"fleet\"\n\n[pool.fleet]\npolicy = {policy}\nengine_metrics = {{ interval = \"200ms\" }}\nendpoints = [\n{}\n]\n",
        endpoints.join("\n")
    )
}

async fn start_fleet() -> anyhow::Result<Vec<(String, MockHandle, Gpu, u32)>> {
    let mut fleet = Vec::new();
    for (i, (name, gpu, weight)) in FLEET.iter().enumerate() {
        let config = MockConfig {
            models: vec![MODEL.to_owned()],
            engine: EngineConfig::preset(*gpu),
            seed: i as u64 + 1,
            ..MockConfig::default()
        };
        let handle = MockServer::bind(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .with_context(|| format!("cannot start mock backend {name}"))?;
        fleet.push(((*name).to_owned(), handle, *gpu, *weight));
    }
    Ok(fleet)
}

/// One client stream: chat completions in a loop on a keep-alive connection.
async fn client(
    proxy: SocketAddr,
    worker: u32,
    max_tokens: u32,
    window: Arc<Mutex<Window>>,
    stop: Arc<AtomicBool>,
    active: Arc<std::sync::atomic::AtomicU32>,
) {
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if worker >= active.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Ok(stream) = tokio::net::TcpStream::connect(proxy).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && worker < active.load(Ordering::Relaxed) {
            n += 1;
            let system = SYSTEM_PROMPTS[(worker as usize + n as usize) % SYSTEM_PROMPTS.len()];
            let body = serde_json::json!({
                "model": MODEL,
                "stream": true,
                "max_tokens": max_tokens,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": format!("Question {n} from client {worker}: what should I do next?")},
                ],
            });
            let req = http::Request::post("/v1/chat/completions")
                .header("host", "fulcrum-demo")
                .header("content-type", "application/json")
                .header("x-user", format!("user-{worker}"))
                .body(Full::new(Bytes::from(body.to_string())));
            let Ok(req) = req else { break };
            let t0 = Instant::now();
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(_) => {
                    record(&window, None, None, 0);
                    break;
                }
            };
            let ok = resp.status().is_success();
            let mut body = resp.into_body();
            let (mut scanner, mut ttft, mut tokens) = (SseScanner::default(), None, 0u64);
            let mut failed = !ok;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(data) = f.data_ref() {
                            let t = scanner.feed(data);
                            if t > 0 && ttft.is_none() {
                                ttft = Some(t0.elapsed());
                            }
                            tokens += u64::from(t);
                        }
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                record(&window, None, None, 0);
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                record(&window, ttft, Some(t0.elapsed()), tokens);
            }
        }
    }
}

fn record(window: &Mutex<Window>, ttft: Option<Duration>, e2e: Option<Duration>, tokens: u64) {
    let mut w = window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match e2e {
        Some(d) => {
            w.ok += 1;
            w.tokens += tokens;
            w.e2e.record(d);
            if let Some(t) = ttft {
                w.ttft.record(t);
            }
        }
        None => w.failed += 1,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}ms", d.as_secs_f64() * 1e3)
}

/// Runs the demo until Ctrl-C or `--duration`.
pub fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let rt = crate::serve::runtime(None)?;
    rt.block_on(run(args))
}

/// The autoscaled demo pool: local mock-backend replicas of this very binary.
fn autoscale_config(listen: SocketAddr, policy: PolicyKind) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the fulcrum binary to start replicas")?;
    let exe = exe.display().to_string().replace('\\', "\\\\").replace('"', "\\\"");
    let policy = match policy {
        PolicyKind::HeaderHash => r#"{ name = "header_hash", header = "x-user" }"#.to_owned(),
        PolicyKind::CookieHash => r#"{ name = "cookie_hash", cookie = "session" }"#.to_owned(),
        k => format!("\"{k}\""),
    };
    Ok(format!(
        r#"[[listener]]
name = "public"
address = "{listen}"
pool = "fleet"

[pool.fleet]
policy = {policy}
engine_metrics = {{ interval = "200ms" }}

[pool.fleet.autoscale]
policy = "threshold"
metric = "in_flight"
target = 4.0
reserve = 0
cooldown = "5s"
min_replicas = 1
max_replicas = 6
interval = "500ms"
drain_timeout = "20s"
actuator = {{ kind = "local", command = "'{exe}' mock-backend --port {{port}} --seed {{index}} --model {MODEL} --gpu a100", ports = "19800-19899", ready_path = "/health", stop_grace = "5s" }}
"#
    ))
}

/// The admin API with the dashboard, on `address` or, when that port is taken, on a free one.
/// Beyond loopback it needs a token (`FULCRUM_ADMIN_TOKEN`), as `fulcrum serve` does.
async fn start_admin(
    address: SocketAddr,
    live: fulcrum_proxy::Live,
    config: &Config,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let token = crate::serve::read_admin_token(None)?;
    anyhow::ensure!(
        token.is_some() || address.ip().is_loopback(),
        "--admin {address} is beyond loopback, so the admin API needs a bearer token: set FULCRUM_ADMIN_TOKEN"
    );
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tokio::net::TcpListener::bind(SocketAddr::new(address.ip(), 0))
                .await
                .with_context(|| format!("the admin API cannot listen on {}", address.ip()))?
        }
        Err(e) => return Err(e).with_context(|| format!("the admin API cannot listen on {address}")),
    };
    let bound = listener.local_addr().unwrap_or(address);
    let mut state = fulcrum_control::admin::AdminState::new(live);
    if let Some(token) = token {
        state = state.with_token(token);
    }
    let app = fulcrum_control::admin::app(state);
    Ok((bound, tokio::spawn(fulcrum_control::listen::serve(listener, app, config.proxy.admin_limits))))
}

async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let fleet = if args.autoscale { Vec::new() } else { start_fleet().await? };
    let backends: Vec<(String, SocketAddr, Gpu, u32)> =
        fleet.iter().map(|(n, h, g, w)| (n.clone(), h.local_addr(), *g, *w)).collect();
    let toml = if args.autoscale {
        autoscale_config(args.listen, args.policy)?
    } else {
        fleet_config(args.listen, args.policy, &backends)
    };
    let config = Config::parse(&toml, None).context("demo configuration")?;
    let proxy = Proxy::bind_with(config.clone(), Some(Arc::from(toml.as_str())), None)
        .await
        .with_context(|| format!("cannot start the proxy on {} (is the port in use? try --listen)", args.listen))?;
    let addr = proxy.local_addr("public").context("listener")?;
    let pools = proxy.pools();
    if args.autoscale {
        println!(
            "fulcrum demo: proxy on http://{addr} (policy {}), an autoscaled fleet of 1 to 6 simulated A100 servers",
            args.policy
        );
        println!("(local mock-backend replicas; the load alternates every 15 s between low and high)");
    } else {
        println!(
            "fulcrum demo: proxy on http://{addr} (policy {}), fleet of {} simulated GPU servers:",
            args.policy,
            fleet.len()
        );
    }
    for (name, handle, gpu, weight) in &fleet {
        println!("  {name:8} {:5} weight {weight}  {}", gpu.as_str(), handle.base_url());
    }
    println!(
        "try: curl -N http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n       -d '{{\"model\":\"{MODEL}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'"
    );
    let admin = start_admin(args.admin, proxy.live().clone(), &config).await?;
    println!("dashboard: http://{}/ui   (admin API and /metrics on the same address)", admin.0);
    println!("Ctrl-C stops{}.\n", args.duration.map(|d| format!(", or after {d:?}")).unwrap_or_default());

    let (stop_scaler_tx, stop_scaler_rx) = tokio::sync::oneshot::channel::<()>();
    let scaler =
        pools.first().and_then(|p| p.config().autoscale.clone().map(|a| (p.clone(), a))).map(|(pool, autoscale)| {
            tokio::spawn(fulcrum_scale::autoscaler::run(crate::scaled::ProxyPool(pool), autoscale, async {
                let _ = stop_scaler_rx.await;
            }))
        });
    let (stop_proxy_tx, stop_proxy_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(proxy.run(async {
        let _ = stop_proxy_rx.await;
    }));

    if args.autoscale {
        // The traffic starts once the first replica is ready (requests to an empty pool get 503).
        let t0 = std::time::Instant::now();
        while pools[0].snapshot().selector.endpoints().is_empty() {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "the first replica did not become ready in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let window = Arc::new(Mutex::new(Window::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let low = (args.concurrency / 8).max(1);
    let active = Arc::new(std::sync::atomic::AtomicU32::new(if args.autoscale { low } else { args.concurrency }));
    let clients: Vec<_> = (0..args.concurrency)
        .map(|w| tokio::spawn(client(addr, w, args.max_tokens, window.clone(), stop.clone(), active.clone())))
        .collect();
    let mut decisions_seen = 0;

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let ctrl_c = crate::serve::shutdown_signal();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let started = Instant::now();
    let counts = |pools: &[Arc<fulcrum_proxy::pool::PoolRuntime>]| -> Vec<(String, u64)> {
        pools
            .iter()
            .flat_map(|p| {
                p.snapshot().upstreams.iter().map(|u| (u.name().to_owned(), u.requests())).collect::<Vec<_>>()
            })
            .collect()
    };
    let mut last = counts(&pools);
    let (mut total_ok, mut total_failed) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {
                let w = std::mem::take(&mut *window.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                total_ok += w.ok;
                total_failed += w.failed;
                let now = counts(&pools);
                let delta = |name: &str, n: u64| n.saturating_sub(last.iter().find(|l| l.0 == name).map_or(0, |l| l.1));
                let routed: u64 = now.iter().map(|(name, n)| delta(name, *n)).sum();
                let share: Vec<String> = now
                    .iter()
                    .map(|(name, n)| {
                        let pct = if routed == 0 { 0.0 } else { 100.0 * delta(name, *n) as f64 / routed as f64 };
                        format!("{name} {pct:>3.0}%")
                    })
                    .collect();
                last = now;
                if args.autoscale {
                    // A load step every 15 s: low, then high.
                    let phase = (started.elapsed().as_secs() / 15) % 2;
                    active.store(if phase == 0 { low } else { args.concurrency }, Ordering::Relaxed);
                    let decisions: Vec<String> = pools[0]
                        .safety()
                        .events()
                        .into_iter()
                        .filter(|e| e.kind == "autoscale")
                        .map(|e| e.detail)
                        .collect();
                    for d in decisions.iter().skip(decisions_seen) {
                        println!("        autoscaler: {d}");
                    }
                    decisions_seen = decisions.len();
                }
                let (t, e) = (w.ttft.percentiles(), w.e2e.percentiles());
                let replicas = if args.autoscale {
                    format!("replicas {}  clients {:>3}  ", pools[0].snapshot().selector.endpoints().len(), active.load(Ordering::Relaxed))
                } else {
                    String::new()
                };
                println!(
                    "{:>4}s  {replicas}{:>5} req/s  {:>6} tok/s  err {:<3} ttft p50 {:>6} p99 {:>6}  e2e p50 {:>6} p99 {:>6}  | {}",
                    started.elapsed().as_secs_f64().round() as u64,
                    routed,
                    w.tokens,
                    w.failed,
                    ms(t.p50),
                    ms(t.p99),
                    ms(e.p50),
                    ms(e.p99),
                    share.join("  ")
                );
            }
        }
    }
    println!("\nstopping: {total_ok} requests completed, {total_failed} failed");
    stop.store(true, Ordering::Relaxed);
    let _ = stop_proxy_tx.send(());
    for c in clients {
        c.abort();
    }
    let _ = proxy_task.await;
    admin.1.abort();
    if let Some(scaler) = scaler {
        let _ = stop_scaler_tx.send(());
        let _ = scaler.await;
    }
    for (_, handle, _, _) in fleet {
        handle.shutdown().await;
    }
    Ok(())
}
