//! Helpers shared by the integration tests: event collection and process checks, all bounded.

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_scale::Event;
use tokio::sync::mpsc;

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// Receives events until `done` holds for one of them (that one included), at most `WAIT`.
pub async fn events_until(rx: &mut mpsc::Receiver<Event>, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                let last = done(&event);
                seen.push(event);
                if last {
                    return seen;
                }
            }
            Ok(None) => panic!("event channel closed; seen: {}", show(&seen)),
            Err(_) => panic!("no expected event within {WAIT:?}; seen: {}", show(&seen)),
        }
    }
}

/// Events, one per line.
pub fn show(events: &[Event]) -> String {
    events.iter().map(|e| format!("\n  {e}")).collect()
}

/// Whether a process exists and is not a zombie (Linux `/proc`).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Polls until `pid` is gone, at most `WAIT`.
pub async fn wait_gone(pid: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "process {pid} still alive after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.0 GET of `/`: the status code, or `None` if the connection failed.
pub async fn http_status(address: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

/// Whether a TCP connection to `address` is refused (nothing listens).
pub async fn refused(address: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(address)).await, Ok(Err(_)))
}

/// Polls until connections to `address` are refused, at most `WAIT`.
pub async fn wait_refused(address: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !refused(address).await {
        assert!(tokio::time::Instant::now() < deadline, "{address} still accepts connections after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
