//! Batches in mesh mode (issue P2.2): two `fulcrum serve --control etcd://...` proxies share
//! one batch database (an SQLite file, or a PostgreSQL server as proxies on several hosts do)
//! and one mock fleet. A batch runs only on the proxy that holds it in
//! etcd; killed with SIGKILL, that proxy's batch is taken over by the other within the lease
//! TTL and a moment, and every `custom_id` is in the output once. A cancel through one proxy
//! stops a batch that runs on the other; a proxy stopped with SIGTERM hands its batch over at
//! once. Everything runs on 127.0.0.1: a real etcd (Debian's `etcd-server`), a real
//! PostgreSQL (Debian's `postgresql`), mock backends and the proxies as child processes, each
//! stopped by its PID.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use fulcrum_discovery::testing::Etcd;
use serde_json::{Value, json};

use super::batch::{Dir, chat_lines, ids_in_results, json as json_call, upload};
use super::child::MockChild;

/// The lease TTL of these tests (the default is 10 s).
const TTL: Duration = Duration::from_secs(3);

/// A mock engine slow enough for a batch of a few hundred requests to take seconds.
fn slow_mock(seed: u64) -> MockChild {
    let seed = seed.to_string();
    let args = ["--port", "0", "--speed", "0.1", "--seed", &seed, "--output-len-median", "4"];
    MockChild::spawn(&args.map(str::to_owned))
}

/// A proxy's own file: its listener and admin API on ports of their own, the shared pools,
/// and the batch database every proxy of the test shares (a path or a URL).
fn own_file(dir: &Dir, name: &str, endpoints: &[SocketAddr], database: &str) -> PathBuf {
    let endpoints: Vec<String> = endpoints.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    let text = format!(
        "[proxy]\nadmin = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\npool = \"llm\"\n\n\
         [pool.llm]\nendpoints = [{}]\n\n\
         [batch]\ndatabase = \"{}\"\nmax_in_flight = 4\nlease_ttl = \"{}s\"\n",
        endpoints.join(", "),
        database,
        TTL.as_secs()
    );
    let path = dir.path(name);
    std::fs::write(&path, text).expect("config");
    path
}

/// `fulcrum serve --control URL`, killed with SIGKILL (by its PID) when dropped; its log is
/// kept.
struct Member {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Receiver<String>,
    lines: Vec<String>,
}

impl Member {
    fn start(config: &Path, control: &str) -> Member {
        let (child, log) = super::child::serve(config, &["--control", control]);
        let mut member =
            Member { child, addr: ([0, 0, 0, 0], 0).into(), admin: ([0, 0, 0, 0], 0).into(), log, lines: Vec::new() };
        let value = |line: &str, key: &str| -> Option<SocketAddr> {
            line.split(key).nth(1)?.split_whitespace().next()?.parse().ok()
        };
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = member.log.recv_timeout(Duration::from_secs(30)).expect("serve announces its listeners");
            if line.contains("listening") && line.contains("listener=main") {
                addr = value(&line, "addr=");
            } else if line.contains("admin API listening") {
                admin = value(&line, "address=");
            }
            member.lines.push(line);
        }
        member.addr = addr.expect("listener address");
        member.admin = admin.expect("admin address");
        member
    }

    /// Every log line so far.
    fn log(&mut self) -> &[String] {
        self.lines.extend(self.log.try_iter());
        &self.lines
    }

    /// Whether a line says `what` about batch `id`.
    fn logged(&mut self, what: &str, id: &str) -> bool {
        self.log().iter().any(|l| l.contains(what) && l.contains(id))
    }

    /// Requests this proxy sent to the fleet's endpoints (its admin API's metrics).
    fn sent(&self) -> f64 {
        String::from_utf8_lossy(&admin_get(self.admin, "/metrics"))
            .lines()
            .filter(|l| l.starts_with("fulcrum_endpoint_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A sample of this proxy's metrics (`name` or `name{labels}`), 0 when absent.
    fn metric(&self, name: &str) -> f64 {
        String::from_utf8_lossy(&admin_get(self.admin, "/metrics"))
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// What `GET /control` says of the batches this proxy holds.
    fn held(&self) -> Value {
        let v: Value = serde_json::from_slice(&admin_get(self.admin, "/control")).expect("json");
        v["mesh"]["batches"].clone()
    }

    /// SIGTERM, by its PID: the proxy drains and stops.
    fn terminate(&self) {
        let status = std::process::Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` on an admin API (which takes only its own address as `Host`): the body of a 200.
fn admin_get(admin: SocketAddr, path: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let head = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "GET {path}: {head}");
    raw[split..].to_vec()
}

fn create(addr: SocketAddr, n: usize) -> String {
    let file = upload(addr, &chat_lines(n));
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (status, batch) = json_call(addr, "POST", "/v1/batches", &body);
    assert_eq!(status, 200, "{batch}");
    batch["id"].as_str().expect("batch id").to_owned()
}

fn done(batch: &Value) -> u64 {
    batch["request_counts"]["completed"].as_u64().unwrap_or(0) + batch["request_counts"]["failed"].as_u64().unwrap_or(0)
}

/// Waits (at most `within`) until the batch, read through `addr`, satisfies `until`.
fn wait_batch(addr: SocketAddr, id: &str, within: Duration, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, b) = json_call(addr, "GET", &format!("/v1/batches/{id}"), &Value::Null);
        if until(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch {id} not as awaited within {within:?}: {b}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_etcd() -> Option<(tokio::runtime::Runtime, Etcd)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let etcd = rt.block_on(Etcd::start())?;
    Some((rt, etcd))
}

#[test]
fn batch_mesh_one_proxy_runs_a_batch_and_another_takes_it_over_after_kill_9() {
    let dir = Dir::new("mesh-takeover");
    let database = dir.path("shared/batches.db");
    takeover_after_kill_9(&dir, &database.display().to_string());
}

/// As above, with the batch state in a PostgreSQL server: what proxies on several hosts
/// share. The two proxies share no file: each has its own directory, and they meet only in
/// etcd, PostgreSQL and the fleet.
#[test]
fn batch_mesh_takeover_with_the_state_in_postgres() {
    let Some(pg) = fulcrum_testkit::postgres::Postgres::start() else { return };
    let dir = Dir::new("mesh-takeover-pg");
    takeover_after_kill_9(&dir, &pg.database("mesh"));
    // The proxies' directories hold their own files only: no batch state.
    let files: Vec<String> = std::fs::read_dir(dir.path("."))
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().all(|f| f.ends_with(".toml")), "{files:?}");
}

fn takeover_after_kill_9(dir: &Dir, database: &str) {
    const N: usize = 400;
    let Some((_rt, etcd)) = start_etcd() else { return };
    let control = format!("etcd://127.0.0.1:{}/test/batch-mesh", etcd.port);
    let fleet = [slow_mock(31), slow_mock(32)];
    let addrs: Vec<SocketAddr> = fleet.iter().map(|m| m.addr).collect();
    let mut a = Member::start(&own_file(dir, "a.toml", &addrs, database), &control);
    let mut b = Member::start(&own_file(dir, "b.toml", &addrs, database), &control);

    let id = create(a.addr, N);
    // Read through B (the shared store), until a quarter is done and B has had at least two
    // claim rounds (every 2 s) to try to take it.
    let started = Instant::now();
    let before = wait_batch(b.addr, &id, Duration::from_secs(60), |v| {
        done(v) as usize >= N / 4 && started.elapsed() >= Duration::from_secs(4)
    });
    assert_eq!(before["status"], "in_progress", "{before}");
    assert!((done(&before) as usize) < N * 3 / 4, "the batch ran too fast to be killed midway: {before}");
    // It runs on A only: B sent nothing to the fleet and claimed nothing.
    assert!(a.logged("batch claimed", &id), "A claimed the batch it created: {:#?}", a.log());
    assert!(a.sent() > 0.0);
    assert_eq!(b.sent(), 0.0, "B sent requests while A lives");
    assert!(!b.logged("batch claimed", &id) && !b.logged("batch taken over", &id), "{:#?}", b.log());
    assert_eq!((a.held()["held"].as_u64(), b.held()["held"].as_u64()), (Some(1), Some(0)));
    assert_eq!((a.metric("fulcrum_batches_running"), b.metric("fulcrum_batches_running")), (1.0, 0.0));

    // A dies mid-batch; B takes the batch over once A's lease ends, and finishes it.
    a.kill();
    let killed = Instant::now();
    let at_kill = done(&wait_batch(b.addr, &id, Duration::from_secs(5), |_| true));
    while !b.logged("batch taken over", &id) {
        assert!(killed.elapsed() < TTL + Duration::from_secs(5), "B did not take the batch over: {:#?}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    assert!((at_kill as usize) < N, "the batch was done before the kill");
    let batch = wait_batch(b.addr, &id, Duration::from_secs(120), |v| v["status"] == "completed");
    assert!(b.sent() > 0.0);
    // The key is released once the batch ends (just after its status is written).
    let completed = Instant::now();
    while b.held()["held"].as_u64() != Some(0) {
        assert!(completed.elapsed() < Duration::from_secs(5), "B still holds the batch: {}", b.held());
        std::thread::sleep(Duration::from_millis(20));
    }

    // Every custom_id once in output + error files.
    let seen = ids_in_results(b.addr, &batch);
    let missing = (0..N).filter(|i| !seen.contains_key(&format!("req-{i}"))).count();
    let twice = seen.values().filter(|&&n| n > 1).count();
    assert_eq!((seen.len(), missing, twice), (N, 0, 0), "taken over after {took:?}, {at_kill} done at the kill");
    assert_eq!(batch["request_counts"]["total"], N as u64);
    // B recorded exactly what A had not: its own counters say so.
    let recorded = b.metric("fulcrum_batch_requests_total{outcome=\"answered\"}")
        + b.metric("fulcrum_batch_requests_total{outcome=\"failed\"}");
    assert_eq!(recorded as u64, N as u64 - at_kill, "B's metrics");
    println!("taken over {took:?} after the kill ({at_kill} of {N} done then)");
}

#[test]
fn batch_mesh_a_cancel_through_another_proxy_stops_the_batch_and_sigterm_hands_over() {
    let Some((_rt, etcd)) = start_etcd() else { return };
    let control = format!("etcd://127.0.0.1:{}/test/batch-mesh-cancel", etcd.port);
    let dir = Dir::new("mesh-cancel");
    let database = dir.path("batches.db").display().to_string();
    let fleet = [slow_mock(33)];
    let addrs = [fleet[0].addr];
    let mut a = Member::start(&own_file(&dir, "a.toml", &addrs, &database), &control);
    let mut b = Member::start(&own_file(&dir, "b.toml", &addrs, &database), &control);
    let id = create(a.addr, 2000);
    wait_batch(b.addr, &id, Duration::from_secs(30), |v| done(v) > 0);
    let (status, cancelled) = json_call(b.addr, "POST", &format!("/v1/batches/{id}/cancel"), &Value::Null);
    assert_eq!((status, cancelled["status"].as_str()), (200, Some("cancelling")), "{cancelled}");
    // A, which runs it, reads the new status within a second and finishes it as cancelled.
    let batch = wait_batch(a.addr, &id, Duration::from_secs(10), |v| v["status"] == "cancelled");
    let finished = Instant::now();
    while !a.logged("batch finished", &id) {
        assert!(finished.elapsed() < Duration::from_secs(5), "A finishes it: {:#?}", a.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let completed = batch["request_counts"]["completed"].as_u64().expect("counts");
    assert!(completed > 0 && completed < 2000, "{batch}");
    assert_eq!(b.sent(), 0.0, "B never ran the batch");

    // A stops cleanly: it revokes its lease, and B takes its running batch over before the
    // lease could have run out.
    let id = create(a.addr, 2000);
    wait_batch(b.addr, &id, Duration::from_secs(30), |v| done(v) > 0);
    a.terminate();
    let asked = Instant::now();
    while !b.logged("batch taken over", &id) {
        assert!(asked.elapsed() < TTL, "B did not take the batch over at once: {:#?}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(a.child.wait().is_ok_and(|s| s.success()), "A stopped cleanly");
    while !a.logged("batch lease revoked", "") {
        assert!(asked.elapsed() < Duration::from_secs(10), "{:#?}", a.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_batch(b.addr, &id, Duration::from_secs(10), |v| done(v) > 0 && b.sent() > 0.0);
}
