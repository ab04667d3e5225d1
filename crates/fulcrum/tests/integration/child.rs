//! Helpers for tests that run `fulcrum` subcommands as child processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `fulcrum mock-backend` child process, killed (SIGKILL, by its PID) when dropped.
pub struct MockChild {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl MockChild {
    /// Starts `fulcrum mock-backend ARGS` and reads back the address it announces (give
    /// `--port 0` to let it pick one).
    pub fn spawn(args: &[String]) -> MockChild {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .arg("mock-backend")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mock-backend");
        let addr = announced_addr(&mut child);
        MockChild { child, addr }
    }

    /// Sends a signal by name (`STOP`, `CONT`) to the child, by its PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
    }

    /// SIGKILL: no chance to close connections gracefully.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MockChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address a `fulcrum mock-backend` child (spawned with its stderr piped) announces on
/// its "listening on" line: the port it bound, read back rather than guessed.
fn announced_addr(child: &mut Child) -> SocketAddr {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").trim_start_matches("http://").to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("mock-backend announces its address");
    addr.parse().expect("address")
}

/// Starts `fulcrum serve --no-watch -c CONFIG EXTRA` and hands its log (level info, no colour)
/// over a channel, a line at a time. The log is read to its end, so a full pipe never stalls
/// the server. The caller kills the child.
pub fn serve(config: &Path, extra: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["serve", "--no-watch", "-c"])
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}
