//! One replica's life, as a task: start, wait until ready, run, restart after a crash with
//! backoff, give up past the restart intensity, stop when asked.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{LocalConfig, Output};
use crate::process::{self, Group};
use crate::replica::{Event, EventKind, EventSink, Exit, Replica, ReplicaState};
use crate::restart::{RestartDecision, RestartTracker};

/// What the supervisors of one actuator share with it.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The replicas, by index: the actuator adds and removes entries, supervisors update them.
    pub snapshot: watch::Sender<Vec<Replica>>,
    pub events: EventSink,
    /// The time origin for the restart trackers' [`fulcrum_core::Instant`]s.
    pub origin: Instant,
}

impl Shared {
    fn update(&self, index: u32, f: impl FnOnce(&mut Replica)) {
        self.snapshot.send_modify(|replicas| {
            if let Some(r) = replicas.iter_mut().find(|r| r.index == index) {
                f(r);
            }
        });
    }

    fn emit(&self, index: u32, kind: EventKind) {
        self.events.emit(Event { index, kind });
    }

    fn core_now(&self) -> fulcrum_core::Instant {
        let nanos = self.origin.elapsed().as_nanos();
        fulcrum_core::Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One replica's supervisor.
#[derive(Debug)]
pub(crate) struct Supervisor {
    pub index: u32,
    pub port: u16,
    pub config: Arc<LocalConfig>,
    pub shared: Arc<Shared>,
}

/// How the start of a process ended.
enum Startup {
    Ready,
    Exited(Exit),
    NotReady,
    Stop(bool),
}

/// How a running process ended.
enum Run {
    Exited(Exit),
    Stop(bool),
}

// === impl Supervisor ===

impl Supervisor {
    fn address(&self) -> SocketAddr {
        SocketAddr::new(self.config.host, self.port)
    }

    /// Runs until stopped. `stop` carries `()` for a graceful stop (SIGTERM, then SIGKILL after
    /// the grace period); if its sender is dropped instead, the process is killed at once.
    pub(crate) async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut tracker = RestartTracker::new(self.config.restart);
        let address = self.address();
        loop {
            self.shared.update(self.index, |r| {
                r.state = ReplicaState::Starting;
                r.pid = None;
            });
            let (exit, ready_for) = match self.spawn() {
                Err(error) => (Exit::Error { error }, Duration::ZERO),
                Ok(mut group) => {
                    let pid = group.pid();
                    self.shared.update(self.index, |r| r.pid = pid);
                    if let Some(pid) = pid {
                        self.shared.emit(self.index, EventKind::Started { pid, address });
                    }
                    let startup = tokio::select! {
                        stopped = &mut stop => Startup::Stop(stopped.is_ok()),
                        status = group.wait() => Startup::Exited(exit_of(status)),
                        ready = self.wait_ready() => if ready { Startup::Ready } else { Startup::NotReady },
                    };
                    match startup {
                        Startup::Stop(graceful) => return self.stop(Some(group), graceful).await,
                        Startup::Exited(exit) => (exit, Duration::ZERO),
                        Startup::NotReady => {
                            group.kill().await;
                            (Exit::NotReady { waited: self.config.startup_timeout }, Duration::ZERO)
                        }
                        Startup::Ready => {
                            self.shared.update(self.index, |r| r.state = ReplicaState::Running);
                            self.shared.emit(self.index, EventKind::Ready { address });
                            let since = Instant::now();
                            let run = tokio::select! {
                                stopped = &mut stop => Run::Stop(stopped.is_ok()),
                                status = group.wait() => Run::Exited(exit_of(status)),
                            };
                            match run {
                                Run::Stop(graceful) => return self.stop(Some(group), graceful).await,
                                Run::Exited(exit) => (exit, since.elapsed()),
                            }
                        }
                    }
                }
            };
            self.shared.update(self.index, |r| r.pid = None);
            self.shared.emit(self.index, EventKind::Exited { address, exit, ready_for });
            match tracker.on_exit(self.shared.core_now(), ready_for) {
                RestartDecision::Restart { attempt, delay } => {
                    let next_at = Instant::now() + delay;
                    self.shared.update(self.index, |r| {
                        r.state = ReplicaState::Restarting { attempt, next_at };
                        r.restarts = r.restarts.saturating_add(1);
                    });
                    self.shared.emit(self.index, EventKind::Restarting { attempt, delay });
                    tokio::select! {
                        stopped = &mut stop => return self.stop(None, stopped.is_ok()).await,
                        () = tokio::time::sleep_until(next_at) => {}
                    }
                }
                RestartDecision::GiveUp { restarts, within } => {
                    self.shared.update(self.index, |r| r.state = ReplicaState::Failed);
                    self.shared.emit(self.index, EventKind::GaveUp { restarts, within });
                    let stopped = (&mut stop).await;
                    return self.stop(None, stopped.is_ok()).await;
                }
            }
        }
    }

    /// Starts the replica's process, in a process group of its own.
    fn spawn(&self) -> Result<Group, String> {
        let port = self.port.to_string();
        let index = self.index.to_string();
        let host = self.config.host.to_string();
        let values = [("port", port.as_str()), ("index", index.as_str()), ("host", host.as_str())];
        let argv = self.config.command.expand(&values);
        let Some((program, args)) = argv.split_first() else { return Err("the command is empty".into()) };
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        if self.config.output == Output::Null {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        for (name, value) in &self.config.env {
            cmd.env(name, value.expand(&values).concat());
        }
        if let Some(dir) = &self.config.dir {
            cmd.current_dir(dir);
        }
        match process::isolate(&mut cmd).spawn() {
            Ok(child) => Ok(Group::new(child)),
            Err(e) => Err(format!("cannot start `{program}`: {e}")),
        }
    }

    /// Probes until the replica is ready or the startup timeout has passed.
    async fn wait_ready(&self) -> bool {
        let deadline = Instant::now() + self.config.startup_timeout;
        let address = self.address();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            if self.config.readiness.check(address, self.config.probe_timeout.min(remaining)).await {
                return true;
            }
            tokio::time::sleep_until((Instant::now() + self.config.probe_interval).min(deadline)).await;
        }
    }

    /// Stops on request: gracefully (SIGTERM, grace period, SIGKILL) or at once.
    async fn stop(self, group: Option<Group>, graceful: bool) {
        if !graceful {
            return; // the actuator is gone: dropping the group kills it
        }
        self.shared.update(self.index, |r| r.state = ReplicaState::Stopping);
        let status = match group {
            Some(mut group) => group.terminate(self.config.stop_grace).await,
            None => None,
        };
        self.shared.update(self.index, |r| r.pid = None);
        self.shared.emit(self.index, EventKind::Stopped { address: self.address(), status });
    }
}

fn exit_of(status: std::io::Result<std::process::ExitStatus>) -> Exit {
    match status {
        Ok(status) => Exit::Status(status),
        Err(e) => Exit::Error { error: format!("lost track of the process: {e}") },
    }
}
