//! `fulcrum --log-format json serve`: every log line is one JSON object, the access log too.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next stderr line that satisfies `want`, parsed (bounded wait).
fn next_json(lines: &mpsc::Receiver<String>, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    loop {
        let line = lines.recv_timeout(Duration::from_secs(20)).expect("a log line in time");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        if want(&v) {
            return v;
        }
    }
}

/// `fulcrum --log-format json serve -c FILE`, its stderr lines, and the address it listens on.
fn serve_json(file: &std::path::Path) -> (Server, mpsc::Receiver<String>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["--log-format", "json", "serve", "-c"])
        .arg(file)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fulcrum serve starts");
    let mut server = Server(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let listening = next_json(&lines, |v| v["message"] == "listening");
    let addr = listening["addr"].as_str().expect("addr").to_owned();
    (server, lines, addr)
}

#[test]
fn json_logs_carry_the_access_log() {
    let dir = std::env::temp_dir().join(format!("fulcrum-logging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fulcrum.toml");
    std::fs::write(
        &file,
        r#"
[proxy]
access_log = true

[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "dead"

[pool.dead]
endpoints = [{ id = "gone", address = "127.0.0.1:1" }]
"#,
    )
    .unwrap();
    let (server, lines, addr) = serve_json(&file);
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    conn.write_all(
        b"GET /v1/models?key=secret HTTP/1.1\r\nHost: json.test\r\nX-Request-Id: log-1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");

    let access = next_json(&lines, |v| v["target"] == "fulcrum::access");
    assert_eq!(access["request_id"], "log-1");
    assert_eq!(access["path"], "/v1/models");
    assert_eq!(access["host"], "json.test");
    assert_eq!(access["route"], "default");
    assert_eq!((access["pool"].as_str(), access["endpoint"].as_str()), (Some("dead"), Some("gone")));
    assert_eq!(access["status"], 502);
    assert!(access["error"].as_str().is_some_and(|e| e.contains("cannot connect")), "{access}");
    assert!(access["duration_ms"].as_f64().is_some() && access["bytes"].as_u64().is_some_and(|b| b > 0), "{access}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_log_format_is_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum")).args(["--log-format", "yaml", "policies"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'yaml'") && err.contains("text") && err.contains("json"), "{err}");
    // A global flag: accepted after the subcommand too.
    let out = Command::new(env!("CARGO_BIN_EXE_fulcrum")).args(["policies", "--log-format", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A backend that answers every request 200 on its own thread (until the test ends).
fn tiny_backend() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    addr
}

/// The endpoints `fulcrum serve` picked for 24 requests in a row, from its access log.
fn picks(config: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("fulcrum-seed-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).expect("io");
    let file = dir.join("fulcrum.toml");
    std::fs::write(&file, config).expect("io");
    let (server, lines, addr) = serve_json(&file);
    let mut picked = Vec::new();
    for i in 0..24 {
        let mut conn = TcpStream::connect(&addr).expect("io");
        conn.set_read_timeout(Some(Duration::from_secs(20))).expect("io");
        conn.write_all(format!("GET /{i} HTTP/1.1\r\nHost: seed.test\r\nConnection: close\r\n\r\n").as_bytes())
            .expect("io");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("io");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let access = next_json(&lines, |v| v["target"] == "fulcrum::access");
        picked.push(access["endpoint"].as_str().expect("endpoint").to_owned());
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    picked
}

#[test]
fn a_seed_makes_the_random_policies_reproducible() {
    let backends: Vec<String> =
        (0..4).map(|i| format!("{{ id = \"b{i}\", address = \"{}\" }}", tiny_backend())).collect();
    let config = |seed: u64| {
        format!(
            "[proxy]\nworkers = 1\naccess_log = true\nseed = {seed}\n\n[[listener]]\nname = \"public\"\n\
             address = \"127.0.0.1:0\"\npool = \"p\"\n\n[pool.p]\npolicy = \"random\"\nendpoints = [{}]\n",
            backends.join(", ")
        )
    };
    let first = picks(&config(7));
    assert_eq!(picks(&config(7)), first, "the same seed, the same picks");
    assert_ne!(picks(&config(8)), first, "another seed, other picks");
    assert!(first.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{first:?}");
}
