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
//! An autoscaled fleet (the `autoscale` case) runs for real under `fulcrum serve`'s
//! autoscaler: the pool's `autoscale` section with a `local` actuator whose command starts
//! `fulcrum mock-backend` with the fleet's engine flags, so replicas are processes that join
//! the pool after their readiness probe; the trace is replayed once the first replica is up.
//! The simulated fleet's `cold_start` is not chosen: it is the mean time, measured in that
//! real run from the pool's timeline, from each scale-out decision to the new replica joining
//! (in a debug build the process is ready within one 500 ms tick, so it comes out at the
//! tick: the autoscaler registers ready replicas when it ticks). The real autoscaler also runs,
//! idle, while the first replica starts; the simulated trace starts as much later (the `lead`),
//! so both autoscalers see the same history. A replica's share is its 200s at the proxy (its
//! counters outlive its leaving the pool). The replica count is compared too: the same peak,
//! the mean over the trace within [`SCALE_MEAN`]; both runs' decisions are printed.
//!
//! The issue's tolerances are 15% on TTFT p50 and p99, 2 points on the hit rate and 5 points
//! on shares; the full figures ([`fidelity_full`], `#[ignore]`, about 6 minutes in a release
//! build: `bench/sim/fidelity.sh`) check them as stated, over 1,500 requests a run. The CI
//! variant ([`fidelity_short`]) runs 400 requests a run (about 20 s each) in a debug build,
//! and there one run of `power_of_two` is not a measurement to 15%: its picks are random and
//! the simulator's and the proxy's generators differ, so the two runs are two samples. Over 8
//! seeds the simulator alone gives that case a TTFT p50 of 36.5 to 39.7 ms and a p99 of 345
//! to 459 ms, and the debug build's own cost adds 2 to 3 ms to every real first token. So CI
//! holds p50 to 25% and p99 to 40% (still far inside the factor of two the check first
//! caught), and the hit rate and shares to the issue's points. `FIDELITY_ONLY=NAME` runs one
//! case only (when iterating on it).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::Config;
use fulcrum_core::flow::PoolEvent;
use fulcrum_mock::engine::EngineConfig;
use fulcrum_mock::loadgen::replay::{self, ReplayConfig, ReplayRecord};
use fulcrum_proxy::stats::Status;
use fulcrum_proxy::upstream::Upstream;
use fulcrum_proxy::{Proxy, clock};
use fulcrum_sim::fleet::{FaultKind, Fleet, ServiceModel};
use fulcrum_sim::workload::{Arrival, Prompts, Workload, trace};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::autoscale::Scaled;
use super::child::MockChild;

const MODEL: &str = "llama";
const SEED: u64 = 5;

/// One scenario: a fleet, a workload, the policies to run it under.
struct Case {
    name: &'static str,
    fleet: &'static str,
    /// The workload's `[arrival]` section; its prompts are [`CHAT`].
    arrival: &'static str,
    /// Policies by name; `None` is the pool's default (a config without `policy`).
    policies: &'static [Option<&'static str>],
    /// The pool's `autoscale` section, without its actuator, for an autoscaled fleet.
    autoscale: Option<&'static str>,
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

/// Poisson arrivals at 60% of the fleet's capacity.
const STEADY: &str = "[arrival]\nload = 0.6\n";

/// Shared-prefix multi-turn chat, the prompts of every case.
const CHAT: &str = r#"
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

/// Up to three replicas of the engine of [`CRASH_FLEET`], one up at the start. `COLD_START`
/// is not chosen: it is replaced by the cold start measured in the real run of the same case
/// (the mean time from a scale-out decision to the new replica joining the pool: process
/// start, readiness probe, and the autoscaler's next tick, which registers ready replicas).
const SCALED_FLEET: &str = r#"
[autoscale]
initial = 1
cold_start = "COLD_START"
[[backend]]
name = "replica"
count = 3
gpu = "a100"
max_num_seqs = 8
num_gpu_blocks = 2000
prefill_tokens_per_sec = 3000
"#;

/// Bursts: 10 s at 72% of three replicas' capacity (2.2 replicas' worth), then 8 s of
/// silence, 40% on average.
const BURSTS: &str = "[arrival]\nprocess = \"bursty\"\non = \"10s\"\noff = \"8s\"\nload = 0.4\n";

/// Knative's autoscaler on requests in flight, a replica for every 5 (of its 8 batch slots),
/// with short windows (6 s stable, 2 s panic) for a short run, a tick every 500 ms.
const SCALE_POLICY: &str = r#"policy = "knative"
metric = "in_flight"
target = 5.0
stable_window = "6s"
panic_window = "2s"
min_replicas = 1
max_replicas = 3
interval = "500ms"
drain_timeout = "10s"
"#;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "heterogeneous",
            fleet: HETERO_FLEET,
            arrival: STEADY,
            policies: &[Some("least_connections"), None],
            autoscale: None,
        },
        Case {
            name: "crash",
            fleet: CRASH_FLEET,
            arrival: STEADY,
            policies: &[Some("least_connections")],
            autoscale: None,
        },
        Case {
            name: "autoscale",
            fleet: SCALED_FLEET,
            arrival: BURSTS,
            policies: &[Some("least_connections")],
            autoscale: Some(SCALE_POLICY),
        },
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

/// How far the mean number of replicas serving over the trace may differ (the issue sets no
/// bound; a quarter of a replica is a decision half a cycle out of step), besides the peak,
/// which must be the same.
const SCALE_MEAN: f64 = 0.25;

// === the simulated side ===

/// The trace a case generates: its text, and the same parsed for the simulator.
fn generate(case: &Case, fleet: &Fleet, requests: u64) -> (String, Workload) {
    let text = format!("requests = {requests}\nmodel = \"{MODEL}\"\n{}{CHAT}", case.arrival);
    let generated = Workload::parse(&text).expect("workload");
    let scenario = fulcrum_sim::Scenario::new(case.name, fleet.clone(), generated.clone());
    let (rate, _) = scenario.rates();
    let mut out = Vec::new();
    trace::write(generated.generate(rate, SEED), &mut out).expect("trace");
    let text = String::from_utf8(out).expect("utf-8");
    let workload = traced(&text, &generated.model, 0.0);
    (text, workload)
}

/// The trace `text` as the simulator's workload, every request `lead` seconds later.
fn traced(text: &str, model: &Arc<str>, lead: f64) -> Workload {
    let shifted;
    let text = if lead > 0.0 {
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("a trace line");
                v["at"] = serde_json::json!(v["at"].as_f64().expect("at") + lead);
                v.to_string()
            })
            .collect();
        shifted = lines.join("\n");
        &shifted
    } else {
        text
    };
    let parsed = trace::Trace::parse(text, 16, model).expect("trace parses back");
    Workload {
        requests: parsed.records.len() as u64,
        model: model.clone(),
        rate: None,
        arrival: Arrival::Poisson,
        prompts: Prompts::Trace(Arc::new(parsed)),
    }
}

/// Runs the simulator on `workload` under the proxy's `config` (its pool `p`).
fn simulate(case: &Case, fleet: &Fleet, workload: &Workload, config: &Config) -> (Row, Scaling) {
    let pool = config.pools.get("p").expect("pool");
    let mut scenario = fulcrum_sim::Scenario::new(case.name, fleet.clone(), workload.clone());
    scenario.pool = pool.clone();
    scenario.inference_route = config.has_inference_route("p");
    let r = scenario.run_policy(pool.policy.kind().as_str(), SEED).expect("simulation");
    let row = Row {
        completed: r.completed,
        failed: r.failed,
        ttft_p50: r.ttft_ms.p50,
        ttft_p99: r.ttft_ms.p99,
        hit_rate: r.prefix_hit_rate,
        shares: r.backends.iter().map(|b| b.share).collect(),
    };
    // The decision's words start with the count it asks for; the count before is the last.
    let mut before = fleet.autoscale.map_or(0, |a| a.initial);
    let decisions = r
        .scaling
        .iter()
        .filter_map(|(at, words)| {
            let to: u32 = words.split(' ').next()?.parse().ok()?;
            let from = std::mem::replace(&mut before, to);
            Some((*at, from, to))
        })
        .collect();
    (row, Scaling { decisions, replicas: r.replicas.clone(), ..Scaling::default() })
}

/// What an autoscaler did in a run, in seconds from the trace's start.
#[derive(Clone, Debug, Default)]
struct Scaling {
    /// Each decision that changed the count: `(at, from, to)`.
    decisions: Vec<(f64, u32, u32)>,
    /// Replicas serving (up or draining): `(at, count)` at least at each change.
    replicas: Vec<(f64, u32)>,
    /// Real runs: from each scale-out decision to each new replica joining the pool.
    cold_starts: Vec<f64>,
    /// Real runs: from the autoscaler's start to the trace's (the first replica's start).
    lead: f64,
}

impl Scaling {
    /// The most replicas serving over `[0, span]`, and their time-weighted mean.
    fn peak_and_mean(&self, span: f64) -> (u32, f64) {
        let (mut peak, mut area, mut last) = (0, 0.0, (0.0, self.replicas.first().map_or(0, |r| r.1)));
        for &(at, n) in &self.replicas {
            let at = at.clamp(0.0, span);
            area += (at - last.0) * f64::from(last.1);
            peak = peak.max(n);
            last = (at, n);
        }
        area += (span - last.0).max(0.0) * f64::from(last.1);
        (peak, area / span.max(1e-9))
    }

    fn summary(&self, span: f64) -> String {
        let (peak, mean) = self.peak_and_mean(span);
        let steps: Vec<String> = self.decisions.iter().map(|(at, from, to)| format!("{at:.1}s {from}->{to}")).collect();
        format!("peak {peak}, mean {mean:.2} replicas, {} decisions: {}", self.decisions.len(), steps.join(", "))
    }
}

// === the real side ===

/// A mock-backend process with the engine `c`, on a port it picks.
fn spawn_mock(c: &EngineConfig, seed: u64) -> MockChild {
    let args = [("--port", "0".to_owned()), ("--seed", seed.to_string())].into_iter().chain(engine_args(c));
    MockChild::spawn(&args.flat_map(|(k, v)| [k.to_owned(), v]).collect::<Vec<_>>())
}

/// The mock-backend flags of the model and the engine `c`.
fn engine_args(c: &EngineConfig) -> [(&'static str, String); 10] {
    let ms = |d: Duration| format!("{}", d.as_secs_f64() * 1000.0);
    [
        ("--model", MODEL.to_owned()),
        ("--speed", c.speed.to_string()),
        ("--max-num-seqs", c.max_num_seqs.to_string()),
        ("--prefill-tokens-per-sec", c.prefill_tokens_per_sec.to_string()),
        ("--prefill-overhead-ms", ms(c.prefill_overhead)),
        ("--itl-base-ms", ms(c.itl_base)),
        ("--itl-per-seq-ms", ms(c.itl_per_seq)),
        ("--block-size", c.block_size.to_string()),
        ("--num-gpu-blocks", c.num_gpu_blocks.to_string()),
        ("--max-model-len", c.max_model_len.to_string()),
    ]
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

/// The proxy's configuration: a listener and one pool of the mocks, as a new user writes it,
/// or of the replicas its `autoscale` section (given whole) runs.
fn config(policy: Option<&str>, mocks: &[(String, SocketAddr)], autoscale: Option<&str>) -> String {
    let endpoints: Vec<String> =
        mocks.iter().map(|(name, addr)| format!("{{ id = \"{name}\", address = \"{addr}\" }}")).collect();
    let policy = policy.map_or(String::new(), |p| format!("policy = \"{p}\"\n"));
    let members = match autoscale {
        Some(section) => format!("\n[pool.p.autoscale]\n{section}"),
        None => format!("endpoints = [{}]\n", endpoints.join(", ")),
    };
    format!("[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n\n[pool.p]\n{policy}{members}")
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
    let text = config(policy, &named, None);
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

    let completed = replayed.outcomes.iter().filter(|o| o.ok).count() as u64;
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
    (row(&replayed, &counts), config)
}

/// The figures of a replay, with each backend's completed requests.
fn row(replayed: &replay::ReplayReport, counts: &[u64]) -> Row {
    let ok: Vec<&replay::Outcome> = replayed.outcomes.iter().filter(|o| o.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_ms).collect();
    ttft.sort_by(f64::total_cmp);
    let completed = ok.len() as u64;
    Row {
        completed,
        failed: replayed.failed,
        ttft_p50: percentile(&ttft, 0.5),
        ttft_p99: percentile(&ttft, 0.99),
        hit_rate: replayed.prefix_hit_rate,
        shares: counts.iter().map(|&n| n as f64 / completed.max(1) as f64).collect(),
    }
}

/// An autoscaled fleet for real: `fulcrum serve`'s autoscaler (the pool's `autoscale` section
/// with a `local` actuator) starts and stops mock-backend processes with the fleet's engine
/// flags; the trace is replayed once the first replica is up. Each replica's completed
/// requests are its 200s at the proxy (its counters are kept past its leaving the pool).
async fn real_scaled(
    fleet: &Fleet,
    records: &[ReplayRecord],
    policy: Option<&str>,
    autoscale: &str,
) -> (Row, Config, Scaling) {
    let ServiceModel::Engine(c) = &fleet.backends[0].model else { panic!("fidelity cases use engine backends") };
    let bin = env!("CARGO_BIN_EXE_fulcrum");
    let flags: Vec<String> = engine_args(c).iter().map(|(k, v)| format!("{k} {v}")).collect();
    let command = format!("{bin} mock-backend --port {{port}} --seed {{index}} {}", flags.join(" "));
    let section = format!(
        "{autoscale}actuator = {{ kind = \"local\", command = \"{command}\", ports = \"19750-19790\", ready_path = \"/health\", stop_grace = \"5s\" }}\n"
    );
    let text = config(policy, &[], Some(&section));
    let config = Config::parse(&text, None).expect("proxy config");
    let scaled = Scaled::start(&text).await;
    let (url, pool) = (format!("http://{}", scaled.addr), scaled.pool.clone());
    let waited = std::time::Instant::now();
    while pool.snapshot().selector.endpoints().is_empty() {
        assert!(waited.elapsed() < Duration::from_secs(30), "no first replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = clock::now();
    let since = move |at: fulcrum_core::Instant| (at.as_nanos() as f64 - start.as_nanos() as f64) / 1e9;
    // The replicas' counters, and how many serve, every 20 ms until the replay ends.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (pool, done) = (pool.clone(), done.clone());
        async move {
            // A replica that leaves and comes back is a new upstream under the same id.
            let mut seen: Vec<(String, Arc<Upstream>)> = Vec::new();
            let mut replicas: Vec<(f64, u32)> = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let snapshot = pool.snapshot();
                for (e, u) in snapshot.selector.endpoints().iter().zip(&snapshot.upstreams) {
                    if !seen.iter().any(|(_, s)| Arc::ptr_eq(s, u)) {
                        seen.push((e.id().to_string(), u.clone()));
                    }
                }
                let n = snapshot.selector.endpoints().len() as u32;
                if replicas.last().is_none_or(|&(_, m)| m != n) {
                    replicas.push((since(clock::now()).max(0.0), n));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (seen, replicas)
        }
    });
    let replayed = replay::replay(&ReplayConfig::new(url), records).await.expect("replay");
    done.store(true, Ordering::Relaxed);
    let (seen, replicas) = watcher.await.expect("watcher");
    let events = pool.safety().events();
    scaled.stop().await;

    let mut counts = vec![0; fleet.backends.len()];
    for (id, upstream) in &seen {
        let index: usize = id.strip_prefix("replica-").and_then(|i| i.parse().ok()).expect("a replica's id");
        upstream.stats().requests.for_each(|_, status, n| {
            if status == Status::Code(200) {
                counts[index] += n;
            }
        });
    }
    let decisions = scale_steps(&events).into_iter().map(|(i, from, to)| (since(events[i].at), from, to)).collect();
    let lead = events.iter().find(|e| e.kind == "autoscale").map_or(0.0, |e| -since(e.at));
    let scaling = Scaling { decisions, replicas, cold_starts: cold_starts(&events), lead };
    (row(&replayed, &counts), config, scaling)
}

/// The autoscaler's decisions in a pool's timeline: `(event index, from, to)`, from its words
/// (`2 -> 3 replicas: ...`).
fn scale_steps(events: &[PoolEvent]) -> Vec<(usize, u32, u32)> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == "autoscale")
        .filter_map(|(i, e)| {
            let (from, rest) = e.detail.split_once(" -> ")?;
            let to = rest.split(' ').next()?;
            Some((i, from.parse().ok()?, to.parse().ok()?))
        })
        .collect()
}

/// Seconds from each scale-out decision to each replica it starts joining the pool (before
/// the next decision; the cooldown keeps decisions further apart than a start).
fn cold_starts(events: &[PoolEvent]) -> Vec<f64> {
    let steps = scale_steps(events);
    let mut out = Vec::new();
    for (k, &(i, from, to)) in steps.iter().enumerate() {
        let end = steps.get(k + 1).map_or(events.len(), |s| s.0);
        for index in from..to {
            let id = fulcrum_scale::autoscaler::replica_id(index);
            let joined = events[i..end]
                .iter()
                .find(|e| e.kind == "membership" && e.endpoint == id && e.detail == "joined the pool");
            if let Some(j) = joined {
                out.push((j.at.as_nanos() as f64 - events[i].at.as_nanos() as f64) / 1e9);
            }
        }
    }
    out
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
    let mut notes = Vec::new();
    for case in cases() {
        if std::env::var("FIDELITY_ONLY").is_ok_and(|o| o != case.name) {
            continue;
        }
        // The crash time is a fraction of the run: the trace's span is known once generated
        // at the fleet's rate, so the fleet is parsed twice. The cold start does not change
        // the trace; it is measured below.
        let fleet_text = |crash_at: &str, cold_start: &str| {
            Fleet::parse(&case.fleet.replace("CRASH_AT", crash_at).replace("COLD_START", cold_start)).expect("fleet")
        };
        let probe = fleet_text("1h", "1s");
        let (_, probe_workload) = generate(&case, &probe, requests);
        let span = match &probe_workload.prompts {
            Prompts::Trace(t) => t.records.last().map_or(0.0, |r| r.request().at.as_nanos() as f64 / 1e9),
            _ => 0.0,
        };
        let crash_at = format!("{}ms", (span * 400.0).round());
        let fleet = fleet_text(&crash_at, "1s");
        let (text, workload) = generate(&case, &fleet, requests);
        let records = replay::parse_trace(&text).expect("the replayer reads the trace");
        for policy in case.policies {
            let (sim_row, real_row, config) = match case.autoscale {
                None => {
                    let (real_row, config) = real(&fleet, &records, *policy).await;
                    let (sim_row, _) = simulate(&case, &fleet, &workload, &config);
                    (sim_row, real_row, config)
                }
                Some(autoscale) => {
                    let (real_row, config, real_scaling) = real_scaled(&fleet, &records, *policy, autoscale).await;
                    let starts = &real_scaling.cold_starts;
                    assert!(!starts.is_empty(), "{}: the real autoscaler added no replica", case.name);
                    // The simulated replicas start in the time the real ones took.
                    let cold_start = starts.iter().sum::<f64>() / starts.len() as f64;
                    let fleet = fleet_text(&crash_at, &format!("{}ms", (cold_start * 1000.0).round()));
                    // The real autoscaler ran (idle) while the first replica started: so does
                    // the simulated one, the trace starting as late.
                    let lead = real_scaling.lead;
                    let workload = traced(&text, &workload.model, lead);
                    let (sim_row, mut sim_scaling) = simulate(&case, &fleet, &workload, &config);
                    sim_scaling.decisions.iter_mut().for_each(|d| d.0 -= lead);
                    sim_scaling.replicas.iter_mut().for_each(|r| r.0 = (r.0 - lead).max(0.0));
                    let measured: Vec<String> = starts.iter().map(|s| format!("{:.0}", s * 1000.0)).collect();
                    notes.push(format!(
                        "{}: trace span {span:.1} s, lead {lead:.2} s, cold start {} ms (mean of {} ms)",
                        case.name,
                        (cold_start * 1000.0).round(),
                        measured.join(", ")
                    ));
                    notes.push(format!("{} sim:  {}", case.name, sim_scaling.summary(span)));
                    notes.push(format!("{} real: {}", case.name, real_scaling.summary(span)));
                    let ((sim_peak, sim_mean), (real_peak, real_mean)) =
                        (sim_scaling.peak_and_mean(span), real_scaling.peak_and_mean(span));
                    if sim_peak != real_peak || (sim_mean - real_mean).abs() > SCALE_MEAN {
                        let msg =
                            format!("replicas: peak {sim_peak} vs {real_peak}, mean {sim_mean:.2} vs {real_mean:.2}");
                        failures.push(format!("{}: {msg}", case.name));
                    }
                    (sim_row, real_row, config)
                }
            };
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
    println!();
    for n in &notes {
        println!("{n}");
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
#[ignore = "about six minutes; run by bench/sim/fidelity.sh"]
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
