//! Child processes that never outlive their owner: each in a process group of its own, which is
//! signalled as a whole.
//!
//! A replica command such as `sh -c 'server --port {port}'` starts a shell that starts the
//! server: signalling the shell alone would leave the server running. So every child is made the
//! leader of a new process group and signals go to the group (`kill -SIG -- -PGID`). The
//! workspace forbids `unsafe` and has no `libc` binding, so signals other than the direct
//! child's SIGKILL (which tokio sends itself) are sent by running the `kill` program (procps,
//! util-linux or busybox; `kill -TERM -- -PGID`), bounded by a timeout. Where no `kill` program
//! exists, a stop falls back to SIGKILL of the direct child only.
//!
//! [`Group`] owns a child: dropping it kills the whole group at once (and tokio's
//! `kill_on_drop` kills the direct child as a last resort). A process group id is only
//! signalled while its leader has not been reaped, or right after it was, so it cannot have been
//! reused by an unrelated process.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

/// How long the `kill` program may take.
const KILL_PROGRAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a child may take to be reaped after SIGKILL before we stop waiting for it.
pub(crate) const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A signal to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Please stop.
    Term,
    /// Stop now.
    Kill,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Kill => "-KILL",
        }
    }
}

/// Makes `command` start its child as the leader of a new process group, killed if dropped.
pub(crate) fn isolate(command: &mut Command) -> &mut Command {
    command.process_group(0).kill_on_drop(true)
}

/// A child process and its process group.
#[derive(Debug)]
pub(crate) struct Group {
    child: Child,
    pgid: Option<u32>,
    reaped: bool,
}

// === impl Group ===

impl Group {
    /// Owns a child started with [`isolate`].
    pub(crate) fn new(child: Child) -> Self {
        let pgid = child.id();
        Group { child, pgid, reaped: false }
    }

    /// The child's process id (and group id), until it is reaped.
    pub(crate) fn pid(&self) -> Option<u32> {
        if self.reaped { None } else { self.pgid }
    }

    /// The child, to take its pipes.
    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the child to exit; then kills what is left of its group (processes it started
    /// in the background).
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.reaped = true;
        if let Some(pgid) = self.pgid {
            let _ = signal_group(pgid, Signal::Kill).await;
        }
        Ok(status)
    }

    /// Stops the group: SIGTERM, then SIGKILL once `grace` has passed; returns the child's
    /// status, or `None` if it could not be reaped in time (it is killed again on drop).
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.reaped = true;
            return Some(status);
        }
        let termed = match self.pgid {
            Some(pgid) => signal_group(pgid, Signal::Term).await.is_ok(),
            None => false,
        };
        if termed && let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
            return status.ok();
        }
        self.kill().await
    }

    /// SIGKILL to the group (and to the child directly), then waits for the child.
    pub(crate) async fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(pgid) = self.pid() {
            let _ = signal_group(pgid, Signal::Kill).await;
        }
        let _ = self.child.start_kill();
        tokio::time::timeout(REAP_TIMEOUT, self.wait()).await.ok().and_then(Result::ok)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.pid()
            && matches!(self.child.try_wait(), Ok(None))
        {
            // Blocking, but brief: `kill` does one system call. tokio's kill_on_drop then kills
            // the direct child even if this fails.
            let _ = std::process::Command::new("kill")
                .args([Signal::Kill.flag(), "--", &format!("-{pgid}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends `signal` to the process group `pgid` with the `kill` program, bounded in time.
pub(crate) async fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let mut kill = Command::new("kill");
    kill.args([signal.flag(), "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let status = tokio::time::timeout(KILL_PROGRAM_TIMEOUT, kill.status())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the kill program did not finish"))??;
    if status.success() { Ok(()) } else { Err(io::Error::other(format!("kill {}: {status}", signal.flag()))) }
}

/// The last bytes a stream produced, kept up to a limit; shared so that a reader cut short
/// still leaves what it read.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tail {
    inner: Arc<Mutex<TailBuf>>,
}

#[derive(Debug, Default)]
struct TailBuf {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    /// Reads `reader` to its end, keeping the last `limit` bytes.
    pub(crate) async fn read(&self, mut reader: impl AsyncRead + Unpin, limit: usize) {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut chunk).await {
            let Ok(mut tail) = self.inner.lock() else { return };
            tail.bytes.extend_from_slice(&chunk[..n]);
            if tail.bytes.len() > limit {
                let cut = tail.bytes.len() - limit;
                tail.bytes.drain(..cut);
                tail.truncated = true;
            }
        }
    }

    /// What was kept, as text (invalid UTF-8 replaced), trimmed, with `...` in front if the
    /// beginning was cut.
    pub(crate) fn text(&self) -> String {
        let Ok(tail) = self.inner.lock() else { return String::new() };
        let text = String::from_utf8_lossy(&tail.bytes);
        let text = text.trim();
        if tail.truncated { format!("...{text}") } else { text.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_keeps_the_end() {
        let tail = Tail::default();
        tail.read(&b"hello world\n"[..], 5).await;
        assert_eq!(tail.text(), "...orld");
        let tail = Tail::default();
        tail.read(&b" short \n"[..], 100).await;
        assert_eq!(tail.text(), "short");
    }
}
