//! The live dashboard (`/ui` on the admin API) in a real browser: `fulcrum demo` with an admin
//! token, and `tests/browser/dashboard.mjs` driving Debian's headless Chromium through
//! playwright-core. `.ci/run` installs both (`scripts/install-test-deps.sh`); elsewhere the
//! test prints SKIPPED when they are missing, unless `CI` is set.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (by its PID) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What the browser test needs, or why it cannot run.
fn browser_missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} is missing (apt-get install chromium)"));
    }
    if !repo().join("tests/browser/node_modules/playwright-core").exists() {
        return Some("playwright-core is missing (cd tests/browser && npm ci)".to_owned());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is missing".to_owned());
    }
    None
}

#[test]
fn dashboard_shows_the_fleet_live_and_drains_from_the_page() {
    if let Some(why) = browser_missing() {
        assert!(std::env::var_os("CI").is_none(), "the browser test cannot run: {why}");
        println!("SKIPPED: {why}");
        return;
    }
    let token = "dashboard-test-token-0123456789";
    let mut demo = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["demo", "--duration", "90s", "--concurrency", "8", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("FULCRUM_ADMIN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fulcrum demo");
    let stdout = demo.stdout.take().expect("stdout is piped");
    let demo = Killed(demo);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("dashboard: ") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(60)).expect("the demo prints the dashboard's address");
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/ui"), "{url}");

    // The stream and the admin calls want the token; the page itself does not.
    let base = url.trim_end_matches("/ui");
    let addr = base.trim_start_matches("http://").to_owned();
    let status = |path: &str| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect to the admin API");
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        write!(conn, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("write");
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).expect("a status line");
        String::from_utf8_lossy(&head[9..12]).into_owned()
    };
    assert_eq!(status("/ui"), "200");
    assert_eq!(status("/ui/app.js"), "200");
    assert_eq!(status("/ui/stream"), "401");
    assert_eq!(status("/pools"), "401");
    assert_eq!(status("/healthz"), "200");

    // UPDATE_SCREENSHOT=1 writes the README's picture, after a minute of history; otherwise
    // it goes to the temporary directory and is removed.
    let update = std::env::var_os("UPDATE_SCREENSHOT").is_some();
    let (shot, wait) = if update {
        (repo().join("docs/img/dashboard.png"), "60")
    } else {
        (std::env::temp_dir().join(format!("fulcrum-dashboard-{}.png", std::process::id())), "1.5")
    };
    let out = Command::new("node")
        .arg(repo().join("tests/browser/dashboard.mjs"))
        .args([&url, token, &shot.display().to_string(), wait])
        .output()
        .expect("run node");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the browser test failed:\n{text}");
    assert!(text.contains("ok: the charts change"), "{text}");
    assert!(text.contains("available again after Undrain"), "{text}");
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    if !update {
        let _ = std::fs::remove_file(&shot);
    }
    drop(demo);
}
