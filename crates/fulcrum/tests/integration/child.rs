//! Helpers for tests that run `fulcrum` subcommands as child processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

/// The address a `fulcrum mock-backend` child (spawned with its stderr piped) announces on
/// its "listening on" line: the port it bound, read back rather than guessed.
pub fn announced_addr(child: &mut Child) -> SocketAddr {
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
