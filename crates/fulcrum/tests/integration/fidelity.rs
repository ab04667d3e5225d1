//! Simulator fidelity (issue P1.1): the same workload through `fulcrum simulate` and through
//! the proxy with real `fulcrum mock-backend` processes over sockets, compared.
//!
//! For each [`Case`] the simulator's library generates the workload and writes it as a trace
//! of text prompts (what `fulcrum simulate --emit-trace` writes); the real run starts one
//! mock-backend process per fleet backend (its engine flags taken from the fleet, a fixed
//! seed), the proxy in-process with a new user's configuration (the endpoints and the policy,
//! nothing else), and replays the trace open loop with the replayer of `fulcrum replay`; the
//! simulator reads the very same trace under the same pool configuration. A `crash` fault in
//! the fleet is a SIGKILL of that backend's process at the same trace time. Compared: time to
//! first token p50 and p99, the prefix-cache hit rate (cached / prompt tokens of completed
//! requests) and each backend's share of completed requests (from the mocks' own
//! `request_success` counters; a killed backend's share is what the survivors did not serve).
//!
//! The issue's tolerances are 15% on TTFT p50 and p99, 2 points on the hit rate and 5 points
//! on shares; the full figures ([`fidelity_full`], `#[ignore]`, about 4 minutes in a release
//! build: `bench/sim/fidelity.sh`) check them as stated, over 1,500 requests a run. The CI
//! variant ([`fidelity_short`]) runs 400 requests a run (about 20 s each) in a debug build,
//! and there one run of `power_of_two` is not a measurement to 15%: its picks are random and
//! the simulator's and the proxy's generators differ, so the two runs are two samples. Over 8
//! seeds the simulator alone gives that case a TTFT p50 of 36.5 to 39.7 ms and a p99 of 345
//! to 459 ms, and the debug build's own cost adds 2 to 3 ms to every real first token. So CI
//! holds p50 to 25% and p99 to 40% (still far inside the factor of two the check first
//! caught), and the hit rate and shares to the issue's points. An autoscaling case is one more
//! [`Case`] once the simulator models it.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_mock::engine::EngineConfig;
use fulcrum_mock::loadgen::replay::{self, ReplayConfig, ReplayRecord};
use fulcrum_proxy::Proxy;
use fulcrum_sim::fleet::{FaultKind, Fleet, ServiceModel};
use fulcrum_sim::workload::{Arrival, Prompts, Workload, trace};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::child::MockChild;

const MODEL: &str = "llama";
const SEED: u64 = 5;

/// One scenario: a fleet, a workload, the policies to run it under.
struct Case {
    name: &'static str,
    fleet: &'static str,
    /// The workload, with `{requests}` for the request count.
    workload: &'static str,
    /// Policies by name; `None` is the pool's default (a config without `policy`).
    policies: &'static [Option<&'static str>],
}

/// Three unlabelled engines at speeds 0.5, 1 and 2, small batches and KV pools.
const HETERO_FLEET: &str = r#"
[[backend]]
name = "slow"
gpu = "a100"
speed = 0.5
max_num_seqs = 8
num_gpu_blocks = 2000
prefill_tokens_per_sec = 3000
[[backend]]
name = "mid"
gpu = "a100"
speed = 1.0
max_num_seqs = 8
num_gpu_blocks = 2000
prefill_tokens_per_sec = 3000
[[backend]]
name = "fast"
gpu = "a100"
speed = 2.0
max_num_seqs = 8
num_gpu_blocks = 2000
prefill_tokens_per_sec = 3000
"#;

/// Three equal engines; one crashes 40% into the run (of the short run: see `crash_at`).
const CRASH_FLEET: &str = r#"
[[backend]]
name = "gpu"
count = 3
gpu = "a100"
max_num_seqs = 8
num_gpu_blocks = 2000
prefill_tokens_per_sec = 3000
[[fault]]
at = "CRASH_AT"
backend = "gpu-1"
kind = "crash"
"#;

/// Shared-prefix multi-turn chat at 60% of the fleet's capacity.
const CHAT: &str = r#"
requests = {requests}
model = "llama"
[arrival]
load = 0.6
[prompts]
kind = "chat"
system_prompts = 4
system_tokens = 600
conversations = 48
turns = 4
user_tokens = 60
max_prompt_tokens = 2000
output_tokens = 40
output_sigma = 0.5
output_max = 120
"#;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "heterogeneous",
            fleet: HETERO_FLEET,
            workload: CHAT,
            policies: &[Some("least_connections"), None],
        },
        Case { name: "crash", fleet: CRASH_FLEET, workload: CHAT, policies: &[Some("least_connections")] },
    ]
}

/// The figures compared.
#[derive(Clone, Debug, Default)]
struct Row {
    completed: u64,
    failed: u64,
    ttft_p50: f64,
    ttft_p99: f64,
    hit_rate: f64,
    shares: Vec<f64>,
}

/// How close they must be.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    p50: f64,
    p99: f64,
    hit_points: f64,
    share_points: f64,
}

const ISSUE: Tolerance = Tolerance { p50: 0.15, p99: 0.15, hit_points: 2.0, share_points: 5.0 };
const SHORT: Tolerance = Tolerance { p50: 0.25, p99: 0.40, ..ISSUE };

// === the simulated side ===

/// The trace a case generates: its text, and the same parsed for the simulator.
fn generate(case: &Case, fleet: &Fleet, requests: u64) -> (String, Workload) {
    let text = case.workload.replace("{requests}", &requests.to_string());
    let generated = Workload::parse(&text).expect("workload");
    let scenario = fulcrum_sim::Scenario::new(case.name, fleet.clone(), generated.clone());
    let (rate, _) = scenario.rates();
    let mut out = Vec::new();
    trace::write(generated.generate(rate, SEED), &mut out).expect("trace");
    let text = String::from_utf8(out).expect("utf-8");
    let parsed = trace::Trace::parse(&text, 16, &generated.model).expect("trace parses back");
    let workload = Workload {
        requests: parsed.records.len() as u64,
        model: generated.model.clone(),
        rate: None,
        arrival: Arrival::Poisson,
        prompts: Prompts::Trace(Arc::new(parsed)),
    };
    (text, workload)
}

/// Runs the simulator on `workload` under the proxy's `config` (its pool `p`).
fn simulate(case: &Case, fleet: &Fleet, workload: &Workload, config: &Config) -> Row {
    let pool = config.pools.get("p").expect("pool");
    let mut scenario = fulcrum_sim::Scenario::new(case.name, fleet.clone(), workload.clone());
    scenario.pool = pool.clone();
    scenario.inference_route = config.has_inference_route("p");
    let r = scenario.run_policy(pool.policy.kind().as_str(), SEED).expect("simulation");
    Row {
        completed: r.completed,
        failed: r.failed,
        ttft_p50: r.ttft_ms.p50,
        ttft_p99: r.ttft_ms.p99,
        hit_rate: r.prefix_hit_rate,
        shares: r.backends.iter().map(|b| b.share).collect(),
    }
}

// === the real side ===

/// A mock-backend process with the engine `c`, on a port it picks.
fn spawn_mock(c: &EngineConfig, seed: u64) -> MockChild {
    let ms = |d: Duration| format!("{}", d.as_secs_f64() * 1000.0);
    let args = [
        ("--port", "0".to_owned()),
        ("--model", MODEL.to_owned()),
        ("--seed", seed.to_string()),
        ("--speed", c.speed.to_string()),
        ("--max-num-seqs", c.max_num_seqs.to_string()),
        ("--prefill-tokens-per-sec", c.prefill_tokens_per_sec.to_string()),
        ("--prefill-overhead-ms", ms(c.prefill_overhead)),
        ("--itl-base-ms", ms(c.itl_base)),
        ("--itl-per-seq-ms", ms(c.itl_per_seq)),
        ("--block-size", c.block_size.to_string()),
        ("--num-gpu-blocks", c.num_gpu_blocks.to_string()),
        ("--max-model-len", c.max_model_len.to_string()),
    ];
    MockChild::spawn(&args.into_iter().flat_map(|(k, v)| [k.to_owned(), v]).collect::<Vec<_>>())
}

/// Requests a mock finished (`vllm:request_success_total`, every finish reason).
async fn finished(addr: SocketAddr) -> Option<u64> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/metrics").header("host", "mock").body(Empty::<Bytes>::new()).ok()?;
    let body = s.send_request(req).await.ok()?.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let total = text
        .lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(total as u64)
}

/// The proxy's configuration: a listener and one pool of the mocks, as a new user writes it.
fn config(policy: Option<&str>, mocks: &[(String, SocketAddr)]) -> String {
    let endpoints: Vec<String> =
        mocks.iter().map(|(name, addr)| format!("{{ id = \"{name}\", address = \"{addr}\" }}")).collect();
    let policy = policy.map_or(String::new(), |p| format!("policy = \"{p}\"\n"));
    format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n\n[pool.p]\n{policy}endpoints = [{}]\n",
        endpoints.join(", ")
    )
}

/// `n`-th smallest at rank `ceil(q x n)`, as the simulator's report computes percentiles.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn real(fleet: &Fleet, records: &[ReplayRecord], policy: Option<&str>) -> (Row, Config) {
    let mut mocks: Vec<Arc<Mutex<MockChild>>> = Vec::new();
    let mut named = Vec::new();
    for (i, b) in fleet.backends.iter().enumerate() {
        let ServiceModel::Engine(c) = &b.model else { panic!("fidelity cases use engine backends") };
        let m = spawn_mock(c, SEED + i as u64);
        named.push((b.name.clone(), m.addr));
        mocks.push(Arc::new(Mutex::new(m)));
    }
    let text = config(policy, &named);
    let config = Config::parse(&text, None).expect("proxy config");
    let proxy = Proxy::bind(&config).await.expect("proxy");
    let url = format!("http://{}", proxy.local_addr("public").expect("listener"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    // The fleet's crashes, as SIGKILLs at the same trace times.
    let mut killers = Vec::new();
    let mut killed = Vec::new();
    for f in fleet.faults.iter().filter(|f| f.kind == FaultKind::Crash) {
        let (mock, at) = (mocks[f.backend].clone(), f.at);
        killed.push(f.backend);
        killers.push(tokio::spawn(async move {
            tokio::time::sleep(at).await;
            mock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).kill();
        }));
    }
    let replayed = replay::replay(&ReplayConfig::new(url), records).await.expect("replay");
    for k in killers {
        let _ = k.await;
    }
    let mut served = Vec::new();
    for m in &mocks {
        let addr = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).addr;
        served.push(finished(addr).await);
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    drop(mocks);

    let ok: Vec<&replay::Outcome> = replayed.outcomes.iter().filter(|o| o.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_ms).collect();
    ttft.sort_by(f64::total_cmp);
    let completed = ok.len() as u64;
    // A killed backend's /metrics is gone: it served what the others did not.
    let alive: u64 = served.iter().flatten().sum();
    let counts: Vec<u64> = served
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(n) => *n,
            None if killed.len() == 1 && killed[0] == i => completed.saturating_sub(alive),
            None => 0,
        })
        .collect();
    let row = Row {
        completed,
        failed: replayed.failed,
        ttft_p50: percentile(&ttft, 0.5),
        ttft_p99: percentile(&ttft, 0.99),
        hit_rate: replayed.prefix_hit_rate,
        shares: counts.iter().map(|&n| n as f64 / completed.max(1) as f64).collect(),
    };
    (row, config)
}

// === the comparison ===

fn line(label: &str, r: &Row) -> String {
    let shares: Vec<String> = r.shares.iter().map(|s| format!("{:.1}", s * 100.0)).collect();
    format!(
        "| {label} | {} | {} | {:.1} | {:.1} | {:.1}% | {} |",
        r.completed,
        r.failed,
        r.ttft_p50,
        r.ttft_p99,
        r.hit_rate * 100.0,
        shares.join(" / ")
    )
}

/// Sim less real: TTFT in percent of real, hit rate and shares in points.
fn delta(sim: &Row, real: &Row) -> String {
    let pct = |s: f64, r: f64| if r == 0.0 { 0.0 } else { (s - r) / r * 100.0 };
    let shares: Vec<String> =
        sim.shares.iter().zip(&real.shares).map(|(s, r)| format!("{:+.1}", (s - r) * 100.0)).collect();
    format!(
        "| sim - real | | | {:+.1}% | {:+.1}% | {:+.1} pt | {} pt |",
        pct(sim.ttft_p50, real.ttft_p50),
        pct(sim.ttft_p99, real.ttft_p99),
        (sim.hit_rate - real.hit_rate) * 100.0,
        shares.join(" / ")
    )
}

/// What is out of tolerance, if anything.
fn misses(sim: &Row, real: &Row, tol: Tolerance) -> Vec<String> {
    let mut out = Vec::new();
    let rel = |s: f64, r: f64| if r == 0.0 { 0.0 } else { (s - r).abs() / r };
    if rel(sim.ttft_p50, real.ttft_p50) > tol.p50 {
        out.push(format!("TTFT p50 {:.1} vs {:.1} ms", sim.ttft_p50, real.ttft_p50));
    }
    if rel(sim.ttft_p99, real.ttft_p99) > tol.p99 {
        out.push(format!("TTFT p99 {:.1} vs {:.1} ms", sim.ttft_p99, real.ttft_p99));
    }
    if (sim.hit_rate - real.hit_rate).abs() * 100.0 > tol.hit_points {
        out.push(format!("hit rate {:.1}% vs {:.1}%", sim.hit_rate * 100.0, real.hit_rate * 100.0));
    }
    for (i, (s, r)) in sim.shares.iter().zip(&real.shares).enumerate() {
        if (s - r).abs() * 100.0 > tol.share_points {
            out.push(format!("backend {i} share {:.1}% vs {:.1}%", s * 100.0, r * 100.0));
        }
    }
    out
}

/// Runs every case with `requests` requests (the crash at 40% of the trace); prints both
/// rows of each and fails on what is out of `tol`.
async fn check(requests: u64, tol: Tolerance) {
    let mut failures = Vec::new();
    println!("| case / policy | side | completed | failed | TTFT p50 ms | TTFT p99 ms | hit rate | shares % |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for case in cases() {
        // The crash time is a fraction of the run: the trace's span is known once generated
        // at the fleet's rate, so the fleet is parsed twice.
        let probe = Fleet::parse(&case.fleet.replace("CRASH_AT", "1h")).expect("fleet");
        let (_, probe_workload) = generate(&case, &probe, requests);
        let span = match &probe_workload.prompts {
            Prompts::Trace(t) => t.records.last().map_or(0.0, |r| r.request().at.as_nanos() as f64 / 1e9),
            _ => 0.0,
        };
        let crash_at = format!("{}ms", (span * 400.0).round());
        let fleet = Fleet::parse(&case.fleet.replace("CRASH_AT", &crash_at)).expect("fleet");
        let (text, workload) = generate(&case, &fleet, requests);
        let records = replay::parse_trace(&text).expect("the replayer reads the trace");
        for policy in case.policies {
            let (real_row, config) = real(&fleet, &records, *policy).await;
            let sim_row = simulate(&case, &fleet, &workload, &config);
            let policy = config.pools.get("p").map_or("?", |p| p.policy.kind().as_str());
            let label = format!("{} / {policy}", case.name);
            println!("| {label} {}", line("sim", &sim_row));
            println!("| {label} {}", line("real", &real_row));
            println!("| {label} {}", delta(&sim_row, &real_row));
            let m = misses(&sim_row, &real_row, tol);
            if !m.is_empty() {
                failures.push(format!("{label}: {}", m.join("; ")));
            }
        }
    }
    assert!(failures.is_empty(), "simulator and real run disagree:\n{}", failures.join("\n"));
}

/// The CI variant: about 20 s of trace per run, debug build (see the module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fidelity_short() {
    check(400, SHORT).await;
}

/// The full figures for bench/RESULTS.md: three times as long, every tolerance as the issue
/// states it. `bench/sim/fidelity.sh` runs it in a release build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about four minutes; run by bench/sim/fidelity.sh"]
async fn fidelity_full() {
    check(1500, ISSUE).await;
}

/// The bytes agree: for a generated prompt, the simulator's prefix blocks are what the proxy
/// computes from the body the replayer sends, and its engine blocks are what the mock
/// computes from that text.
#[test]
fn the_simulator_hashes_prompts_as_the_proxy_and_the_mock_do() {
    let fleet = Fleet::parse(HETERO_FLEET).expect("fleet");
    let (text, workload) = generate(&cases()[0], &fleet, 40);
    let records = replay::parse_trace(&text).expect("trace");
    let Prompts::Trace(t) = &workload.prompts else { panic!("a trace") };
    for (record, sim) in records.iter().zip(&t.records) {
        let sim = sim.request();
        let body = replay::request_body(record);
        let parsed = fulcrum_core::openai::parse(&body, &fulcrum_core::openai::Limits::default()).expect("body");
        assert_eq!(parsed.prefix, sim.content.blocks(&sim.model, 64, 2048), "proxy prefix blocks");
        assert_eq!(parsed.prompt_tokens, u64::from(sim.prompt_tokens));
        assert_eq!(parsed.output_tokens, u64::from(sim.output_tokens));
        // The mock: a completion prompt is given to the engine as it is.
        let root = fulcrum_mock::tokens::root_hash(MODEL);
        let mock = fulcrum_mock::tokens::TokenEstimator::Chars.prompt(&record.prompt, 16, root);
        assert_eq!(mock.block_hashes, sim.content.engine_blocks(&sim.model, 16), "engine blocks");
        assert_eq!(mock.tokens, sim.prompt_tokens);
    }
}

/// From the command line: `simulate --emit-trace` writes a trace that `replay` sends to a
/// mock backend, every request answered.
#[test]
fn emitted_traces_replay_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("fulcrum-fidelity-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (fleet, workload, trace) = (dir.join("fleet.toml"), dir.join("w.toml"), dir.join("t.jsonl"));
    std::fs::write(&fleet, "[[backend]]\nname = \"gpu\"\n").expect("fleet");
    let w = "requests = 20\nmodel = \"llama\"\n[arrival]\nrate = 40.0\n[prompts]\nkind = \"chat\"\noutput_tokens = 4\n";
    std::fs::write(&workload, w).expect("workload");
    let bin = env!("CARGO_BIN_EXE_fulcrum");
    let sim = Command::new(bin)
        .arg("simulate")
        .args(["--fleet".as_ref(), fleet.as_os_str(), "--workload".as_ref(), workload.as_os_str()])
        .args(["--emit-trace".as_ref(), trace.as_os_str(), "--json".as_ref()])
        .output()
        .expect("simulate");
    assert!(sim.status.success(), "{}", String::from_utf8_lossy(&sim.stderr));
    let c = EngineConfig::preset(fulcrum_mock::engine::Gpu::H100);
    let mock = spawn_mock(&c, 1);
    let out = Command::new(bin)
        .args(["replay", "--url", &format!("http://{}", mock.addr), "--json", "--trace"])
        .arg(&trace)
        .output()
        .expect("replay");
    drop(mock);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!((report["requests"].as_u64(), report["ok"].as_u64()), (Some(20), Some(20)), "{report}");
    assert!(report["prefix_hit_rate"].as_f64().is_some_and(|h| h > 0.0), "chat turns share prefixes: {report}");
}
