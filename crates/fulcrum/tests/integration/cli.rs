//! The `fulcrum` binary, end to end.

use std::path::Path;
use std::process::Command;

fn fulcrum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fulcrum"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).expect("repository root")
}

#[test]
fn help_lists_the_subcommands() {
    let out = fulcrum().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for sub in ["serve", "validate", "demo", "mock-backend", "policies", "control", "register", "plan"] {
        assert!(text.contains(sub), "{sub} missing:\n{text}");
    }
}

#[test]
fn every_example_validates() {
    // The TLS examples name certs/ next to them (scripts/make-test-certs.sh makes them): they
    // are validated from a copy beside certificates made here.
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let with_certs = Dir::new("examples");
    let ca = Ca::new("example CA");
    std::fs::create_dir_all(with_certs.path().join("certs")).unwrap();
    with_certs.write("certs/ca.pem", &ca.pem());
    with_certs.write_leaf("certs/api", &ca.leaf(Usage::Server, "api.example.test", &["api.example.test"], &[]));
    with_certs.write_leaf("certs/admin", &ca.leaf(Usage::Server, "admin.example.test", &["admin.example.test"], &[]));
    with_certs.write_leaf(
        "certs/client",
        &ca.leaf(Usage::Client, "tester", &[], &["spiffe://example.test/ns/admin/sa/tester"]),
    );
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let mut path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if std::fs::read_to_string(&path).unwrap().contains("certs/") {
                let copy = with_certs.path().join(path.file_name().unwrap());
                std::fs::copy(&path, &copy).unwrap();
                path = copy;
            }
            let out = fulcrum().arg("validate").arg("-c").arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
            n += 1;
        }
    }
    assert!(n >= 4, "examples found: {n}");
}

#[test]
fn a_bad_file_names_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("fulcrum-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[pool.a]\npolicy = \"round_robin\"\nendpoints = [{ address = \"127.0.0.1:1\", weight = -2 }]\n",
    )
    .unwrap();
    let out = fulcrum().arg("validate").arg("-c").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3: pool.a.endpoints:"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    // A control plane URL that is not etcd:// is refused, naming the flag.
    let out = fulcrum().args(["control", "--control", "http://127.0.0.1:2379", "show"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control") && err.contains("etcd://"), "{err}");
}

#[test]
fn validate_prints_every_error_one_per_line() {
    let dir = std::env::temp_dir().join(format!("fulcrum-cli-all-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("many.toml");
    std::fs::write(
        &file,
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nbody_read_timeout = \"0s\"\n\
         [[route]]\npool = \"nope\"\n\
         [pool.a]\nidle_timeout = \"0s\"\n\
         [pool.b]\nhealth_check = { rise = 0 }\n",
    )
    .unwrap();
    let out = fulcrum().arg("validate").arg("-c").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let want = [
        "many.toml:4: listener[0].body_read_timeout: must be longer than zero",
        "many.toml:6: route[0].pool: no pool is named `nope`",
        "many.toml:8: pool.a.idle_timeout: must be longer than zero",
        "many.toml:10: pool.b.health_check.rise: must be at least 1",
    ];
    assert_eq!(lines.len(), want.len() + 1, "{err}");
    for (line, want) in lines.iter().zip(want) {
        assert!(line.contains(want) && line.starts_with(&*dir.to_string_lossy()), "want {want:?} in {line:?}");
    }
    assert!(lines[4].contains("4 errors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_runs_a_fleet_and_stops_by_itself() {
    let out = fulcrum()
        .args(["demo", "--duration", "3s", "--listen", "127.0.0.1:0", "--concurrency", "8", "--max-tokens", "16"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("req/s")).collect();
    assert!(lines.len() >= 2, "{text}");
    for name in ["h100-0", "a100-1", "a100-2", "l4-3"] {
        assert!(lines[1].contains(name), "{text}");
    }
    let last = text.lines().last().unwrap_or("");
    assert!(last.contains(" 0 failed") && !last.starts_with("stopping: 0 requests"), "{text}");
}

#[test]
fn demo_autoscale_grows_and_shrinks_the_fleet() {
    let out = fulcrum()
        .args([
            "demo",
            "--autoscale",
            "--duration",
            "38s",
            "--listen",
            "127.0.0.1:0",
            "--concurrency",
            "16",
            "--max-tokens",
            "24",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("autoscaler: 1 -> "), "no scale-out:\n{text}");
    assert!(text.lines().any(|l| l.contains("autoscaler:") && l.contains("-> 1 replicas")), "no scale-in:\n{text}");
    let last = text.lines().last().unwrap_or("");
    assert!(last.contains(" 0 failed"), "{text}");
}

/// A `fulcrum serve` child with its log lines and admin address.
struct Served {
    child: std::process::Child,
    log: std::sync::mpsc::Receiver<String>,
    admin: String,
    /// The log lines up to the admin API's.
    started: Vec<String>,
}

impl Drop for Served {
    /// A test that fails leaves no `serve` behind (its output would hold the test's pipes
    /// open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(file: &Path, extra: &[&str]) -> Served {
        use std::io::BufRead;
        let mut child = fulcrum()
            .args(["serve", "-c"])
            .arg(file)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve test harness");
        let stderr = child.stderr.take().expect("serve test harness");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut started = Vec::new();
        let admin = loop {
            let line = log.recv_timeout(std::time::Duration::from_secs(20)).expect("serve logs its admin address");
            started.push(line.clone());
            if line.contains("admin API listening") {
                let addr = line
                    .split("address=")
                    .nth(1)
                    .expect("serve test harness")
                    .split_whitespace()
                    .next()
                    .expect("serve test harness")
                    .to_owned();
                break addr.trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':').to_owned();
            }
        };
        Served { child, log, admin, started }
    }

    /// The address listener `name` listens on, from its start-up log line.
    fn listener(&self, name: &str) -> String {
        let line = self
            .started
            .iter()
            .find(|l| l.contains("listening") && l.contains(&format!("listener={name}")))
            .expect("serve logs each listener's address");
        let addr = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).expect("an address");
        addr.trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':').to_owned()
    }

    fn get(&self, path: &str) -> String {
        self.get_as(path, None)
    }

    /// GET `path` from the admin API, with `token` as the bearer token when given.
    fn get_as(&self, path: &str, token: Option<&str>) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.admin).expect("serve test harness");
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n", self.admin)
            .expect("serve test harness");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("serve test harness");
        text
    }

    /// Polls `path` until its answer contains `want` (bounded).
    fn until(&self, path: &str, want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = self.get(path);
            if text.contains(want) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{path} never showed {want}:\n{text}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits for a log line containing `want` (bounded).
    fn logged(&self, want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(std::time::Duration::from_millis(200))
                && line.contains(want)
            {
                return;
            }
        }
        panic!("no log line with {want:?}");
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .expect("serve test harness");
        assert!(status.success());
    }

    fn stop(mut self) {
        self.signal("-TERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().expect("serve test harness") {
                break exit;
            }
            assert!(std::time::Instant::now() < deadline, "serve did not stop on SIGTERM");
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(exit.success(), "{exit:?}");
    }
}

fn serve_config(endpoints: &str) -> String {
    format!(
        "[proxy]\nadmin = \"127.0.0.1:0\"\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n[pool.p]\nendpoints = [{endpoints}]\n"
    )
}

#[test]
fn serve_exposes_the_admin_api_reloads_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("fulcrum-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("serve.toml");
    std::fs::write(&file, serve_config("{ address = \"127.0.0.1:9\" }")).unwrap();
    let served = Served::start(&file, &[]);
    let text = served.get("/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("fulcrum_pool_endpoints{pool=\"p\"} 1"), "{text}");

    // Editing the file reloads it; an invalid edit is refused and the last config runs on.
    std::fs::write(&file, serve_config("{ address = \"127.0.0.1:9\" }, { address = \"127.0.0.1:10\" }")).unwrap();
    served.until("/metrics", "fulcrum_pool_endpoints{pool=\"p\"} 2");
    std::fs::write(&file, serve_config("{ address = \"nowhere\" }")).unwrap();
    served.logged("reload refused");
    served.until("/metrics", "fulcrum_pool_endpoints{pool=\"p\"} 2");
    served.stop();

    // With --no-watch, only SIGHUP (or the API) reloads.
    std::fs::write(&file, serve_config("{ address = \"127.0.0.1:9\" }")).unwrap();
    let served = Served::start(&file, &["--no-watch"]);
    std::fs::write(&file, serve_config("{ address = \"127.0.0.1:9\" }, { address = \"127.0.0.1:11\" }")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(served.get("/metrics").contains("fulcrum_pool_endpoints{pool=\"p\"} 1"));
    served.signal("-HUP");
    served.until("/metrics", "fulcrum_pool_endpoints{pool=\"p\"} 2");
    served.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_admin_api_beyond_loopback_needs_a_token() {
    let dir = std::env::temp_dir().join(format!("fulcrum-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("open.toml");
    std::fs::write(
        &file,
        serve_config("{ address = \"127.0.0.1:9\" }").replace("127.0.0.1:0\"\n[[", "0.0.0.0:0\"\n[["),
    )
    .unwrap();
    let out = fulcrum().args(["serve", "-c"]).arg(&file).env_remove("FULCRUM_ADMIN_TOKEN").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy.admin") && err.contains("--admin-token-file"), "{err}");
    let short = dir.join("short-token");
    std::fs::write(&short, "abc\n").unwrap();
    let out = fulcrum().args(["serve", "-c"]).arg(&file).arg("--admin-token-file").arg(&short).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16 characters"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn register_reaches_an_admin_api_that_has_a_token() {
    let dir = std::env::temp_dir().join(format!("fulcrum-register-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("registry.toml");
    let config = serve_config("").replace("endpoints = []", "endpoints = []\ndiscovery = { kind = \"registration\" }");
    std::fs::write(&file, config).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "a-long-enough-admin-token\n").unwrap();
    let served = Served::start(&file, &["--admin-token-file", token.to_str().unwrap()]);
    let url = format!("http://{}", served.admin);
    let register = |extra: &[&str]| {
        let mut cmd = fulcrum();
        cmd.args(["register", "--admin", &url, "--pool", "p", "--address", "127.0.0.1:9301", "--id", "gpu-1"])
            .args(["--ttl", "2s"])
            .args(extra)
            .env_remove("FULCRUM_ADMIN_TOKEN")
            .stderr(std::process::Stdio::piped());
        cmd
    };
    // Without the token the proxy refuses, and the command says so.
    let out = register(&[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");

    assert!(err.contains("--admin-token-file"), "the refusal says how to give the token: {err}");
    // A token that cannot travel in a header is refused before anything is sent.
    let spaced = dir.join("spaced");
    std::fs::write(&spaced, "a token with spaces in it\n").unwrap();
    let out = register(&["--admin-token-file", spaced.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("printable ASCII"), "{err}");

    // With it, the backend joins the pool, and leaves it when the command stops.
    let mut child = register(&["--admin-token-file", token.to_str().unwrap()]).spawn().unwrap();
    let seen = |want: bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = served.get_as("/pools/p", Some("a-long-enough-admin-token"));
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            if text.contains("127.0.0.1:9301") == want {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "gpu-1 present should be {want}:\n{text}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    seen(true);
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
    seen(false);
    served.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A one-line HTTP/1.1 backend: answers every request `200 ok` (for tests that need an
/// upstream and no more).
fn tiny_backend() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a test backend");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    // Read a request head; bodies are not expected.
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let ok = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    if ok.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn serve_terminates_tls_with_certificates_named_relative_to_the_config() {
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let dir = Dir::new("cli-tls");
    let ca = Ca::new("CA");
    dir.write_leaf("server", &ca.leaf(Usage::Server, "api.test", &["api.test"], &[]));
    let backend = tiny_backend();
    let config = |key: &str| {
        format!(
            "[proxy]\nadmin = \"127.0.0.1:0\"\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"p\"\n\
             tls = {{ cert = \"server.pem\", key = \"{key}\" }}\n[pool.p]\nendpoints = [{{ address = \"{backend}\" }}]\n"
        )
    };
    let file = dir.write("tls.toml", &config("server-key.pem"));
    let out = fulcrum().arg("validate").arg("-c").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A key file that is not there: named, with the listener, by validate and by serve.
    let bad = dir.write("bad.toml", &config("missing-key.pem"));
    for cmd in ["validate", "serve"] {
        let out = fulcrum().arg(cmd).arg("-c").arg(&bad).output().unwrap();
        assert!(!out.status.success(), "{cmd} refuses it");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("private key") && err.contains("missing-key.pem"), "{cmd}: {err}");
    }

    let served = Served::start(&file, &[]);
    assert!(served.started.iter().any(|l| l.contains("protocol=\"https\"")), "{:?}", served.started);
    let addr = served.listener("public");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(ca.pem().as_bytes()).unwrap();
        roots.add(ca_der).unwrap();
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        let _ = tls.read_to_string(&mut text).await;
        text
    });
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
    served.stop();
}
