//! The local process actuator: replicas are child processes started from a command template,
//! supervised, restarted with backoff when they crash, and stopped highest index first.
//!
//! Replica `i` runs the command template with `{index}` = `i`, `{port}` = a port of the
//! configured range (the lowest free one; it keeps it through restarts) and `{host}` = the
//! configured host (127.0.0.1). The template is split into words without a shell (see
//! [`template`](crate::template) for the quoting rules); environment values may use the same
//! placeholders (`CUDA_VISIBLE_DEVICES={index}`).
//!
//! Each replica has a supervisor task:
//!
//! ```text
//!   Starting --probe passes--> Running --exits--> Restarting{attempt, next_at} --delay--> Starting
//!      |  \--exits, or not ready within startup_timeout (killed)--^         |
//!      |                                     more than max_restarts within `within`
//!      |                                                                    v
//!      +--scale-in (any state)--> Stopping --SIGTERM, grace, SIGKILL--> gone   Failed
//! ```
//!
//! - **Ready** means the readiness probe passed: a TCP connect to `host:port`, or an HTTP
//!   `GET path` answered 2xx ([`Readiness`]), tried every `probe_interval` until
//!   `startup_timeout`. A replica that is not ready by then is killed and counts as a crash.
//! - **Restarts** follow [`RestartPolicy`]: exponential backoff (500 ms, x2, up to 30 s) that
//!   starts over after a replica was ready for `reset_after` (10 s), and an Erlang-style
//!   intensity limit (more than 5 restarts within 60 s: the replica is `Failed`, an
//!   [`EventKind::GaveUp`](crate::EventKind::GaveUp) is sent, and it stays down until
//!   [`LocalActuator::retry_failed`] or a scale-in removes it). A port another program holds
//!   shows up this way: the replica's bind fails, it exits, and it is eventually given up.
//! - **Scale-in** removes the highest indices. The caller drains them in the proxy first (see
//!   [`Actuator`]); `scale_to` then sends SIGTERM to each one's process group, SIGKILL to
//!   those still alive after `stop_grace` (10 s; 0 kills at once), and returns once they are
//!   gone and their ports free. SIGTERM is sent by running the `kill` program: the workspace
//!   forbids `unsafe` and has no `libc` binding (without a `kill` program, stopping falls back
//!   to SIGKILL of the direct child).
//! - **Children never outlive the actuator**: dropping it kills every replica's process group
//!   at once. (A SIGKILL of the process holding the actuator cannot be caught: its replicas are
//!   left running then, as with any supervisor.)
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use fulcrum_scale::{Actuator, EventSink, LocalActuator, LocalConfig, LocalSettings};
//!
//! let settings = LocalSettings::new("fulcrum mock-backend --port {port} --seed {index}", "9100-9199".parse()?);
//! let (events, mut rx) = EventSink::channel(256);
//! let mut actuator = LocalActuator::new(LocalConfig::try_new(settings)?, events);
//! tokio::spawn(async move {
//!     while let Some(event) = rx.recv().await {
//!         println!("{event}"); // and register or deregister it with the proxy
//!     }
//! });
//! actuator.scale_to(3).await?;
//! actuator.wait_for(Duration::from_secs(30), |rs| rs.iter().all(|r| r.state.is_running())).await?;
//! # Ok(()) }
//! ```

mod probe;
mod supervisor;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use probe::Readiness;

use self::supervisor::{Shared, Supervisor};
use crate::actuator::{Actuator, ActuatorError, Observed};
use crate::command::parse_env;
use crate::ports::{PortPool, PortRange};
use crate::process::REAP_TIMEOUT;
use crate::replica::{EventSink, Replica, ReplicaState};
use crate::restart::{RestartConfigError, RestartPolicy, RestartSettings};
use crate::template::{CommandTemplate, TemplateError};

/// The placeholders a local command template (and its environment values) may use.
pub const PLACEHOLDERS: &[&str] = &["port", "index", "host"];

/// Where replicas' standard output and error go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// To the actuator's own (the default): replicas' logs show with Fulcrum's.
    #[default]
    Inherit,
    /// Nowhere.
    Null,
}

/// Local actuator settings as written, with their defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalSettings {
    /// The command line, with `{port}`, `{index}` and `{host}` placeholders. Required.
    pub command: String,
    /// The ports replicas may listen on. Required; it caps the replica count.
    pub ports: PortRange,
    /// The address replicas listen on, as the probe and the proxy reach them (127.0.0.1).
    pub host: IpAddr,
    /// Environment variables added to each replica's (values may hold placeholders).
    pub env: Vec<(String, String)>,
    /// The directory replicas run in (the current one).
    pub dir: Option<PathBuf>,
    /// How a replica shows it is ready (a TCP connect).
    pub readiness: Readiness,
    /// How long a started replica has to become ready (60 s; a model server that loads its
    /// weights needs more).
    pub startup_timeout: Duration,
    /// The pause between readiness probes (200 ms).
    pub probe_interval: Duration,
    /// How long one probe may take (1 s).
    pub probe_timeout: Duration,
    /// Backoff and restart intensity.
    pub restart: RestartSettings,
    /// How long a stopped replica has between SIGTERM and SIGKILL (10 s).
    pub stop_grace: Duration,
    /// Where replicas' output goes (inherited).
    pub output: Output,
}

impl LocalSettings {
    /// `command` on `ports`, with the default settings.
    pub fn new(command: impl Into<String>, ports: PortRange) -> Self {
        LocalSettings {
            command: command.into(),
            ports,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            env: Vec::new(),
            dir: None,
            readiness: Readiness::Tcp,
            startup_timeout: Duration::from_secs(60),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_secs(1),
            restart: RestartSettings::default(),
            stop_grace: Duration::from_secs(10),
            output: Output::Inherit,
        }
    }
}

/// A local actuator setting was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocalConfigError {
    /// The command line does not parse.
    #[error("command: {0}")]
    Command(#[source] TemplateError),
    /// An environment value does not parse.
    #[error("env.{name}: {source}")]
    Env {
        /// The variable.
        name: String,
        /// Why.
        #[source]
        source: TemplateError,
    },
    /// A restart setting is out of range.
    #[error(transparent)]
    Restart(#[from] RestartConfigError),
    /// Another setting is out of range.
    #[error("{field} {problem}")]
    Invalid {
        /// The setting, as configuration spells it.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Validated local actuator settings.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    command: CommandTemplate,
    ports: PortRange,
    host: IpAddr,
    env: Vec<(String, CommandTemplate)>,
    dir: Option<PathBuf>,
    readiness: Readiness,
    startup_timeout: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
    restart: RestartPolicy,
    stop_grace: Duration,
    output: Output,
}

// === impl LocalConfig ===

impl LocalConfig {
    /// Parses the command line and checks the settings: durations above zero, an HTTP probe
    /// path that starts with `/`, restart settings as [`RestartPolicy::try_new`] wants them.
    pub fn try_new(s: LocalSettings) -> Result<Self, LocalConfigError> {
        let command = CommandTemplate::parse(&s.command, PLACEHOLDERS).map_err(LocalConfigError::Command)?;
        let env = parse_env(s.env, PLACEHOLDERS).map_err(|(name, source)| LocalConfigError::Env { name, source })?;
        let restart = RestartPolicy::try_new(s.restart)?;
        let nonzero = |field, d: Duration| {
            if d.is_zero() {
                Err(LocalConfigError::Invalid { field, problem: "must be longer than zero" })
            } else {
                Ok(d)
            }
        };
        if let Readiness::Http { path } = &s.readiness
            && !path.starts_with('/')
        {
            return Err(LocalConfigError::Invalid { field: "readiness.path", problem: "must start with /" });
        }
        Ok(LocalConfig {
            command,
            ports: s.ports,
            host: s.host,
            env,
            dir: s.dir,
            readiness: s.readiness,
            startup_timeout: nonzero("startup_timeout", s.startup_timeout)?,
            probe_interval: nonzero("probe_interval", s.probe_interval)?,
            probe_timeout: nonzero("probe_timeout", s.probe_timeout)?,
            restart,
            stop_grace: s.stop_grace,
            output: s.output,
        })
    }

    /// The command template.
    pub fn command(&self) -> &CommandTemplate {
        &self.command
    }

    /// The port range.
    pub fn ports(&self) -> PortRange {
        self.ports
    }
}

/// Why a local scaling action failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// More replicas were asked for than the port range holds.
    #[error("cannot run {asked} replicas on the {available} ports of {ports}")]
    TooManyReplicas {
        /// The count asked for.
        asked: u32,
        /// The ports configured.
        ports: PortRange,
        /// How many that is.
        available: u32,
    },
    /// [`LocalActuator::wait_for`] timed out.
    #[error("the replicas did not reach the expected state within {timeout:?}: {replicas:?}")]
    WaitTimedOut {
        /// The timeout.
        timeout: Duration,
        /// The replicas as they were then.
        replicas: Vec<Replica>,
    },
}

impl LocalError {
    /// A wait may succeed later; a count beyond the port range never will.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LocalError::WaitTimedOut { .. })
    }
}

/// A supervisor task and how to stop it.
#[derive(Debug)]
struct Slot {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Runs replicas as local child processes; see the [module](self) docs.
#[derive(Debug)]
pub struct LocalActuator {
    config: Arc<LocalConfig>,
    shared: Arc<Shared>,
    ports: PortPool,
    slots: BTreeMap<u32, Slot>,
}

// === impl LocalActuator ===

impl LocalActuator {
    /// An actuator with no replica yet; events go to `events`.
    pub fn new(config: LocalConfig, events: EventSink) -> Self {
        let ports = PortPool::new(config.ports);
        let (snapshot, _) = watch::channel(Vec::new());
        let shared = Arc::new(Shared { snapshot, events, origin: tokio::time::Instant::now() });
        LocalActuator { config: Arc::new(config), shared, ports, slots: BTreeMap::new() }
    }

    /// A receiver that sees every change of the replicas (the same list as
    /// [`replicas`](Actuator::replicas)), for those who would rather watch than poll.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Replica>> {
        self.shared.snapshot.subscribe()
    }

    /// Waits until `done` holds for the replicas, at most `timeout`; returns them.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Replica]) -> bool,
    ) -> Result<Vec<Replica>, LocalError> {
        let mut rx = self.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|r| done(r))).await {
            Ok(Ok(replicas)) => Ok(replicas.clone()),
            _ => Err(LocalError::WaitTimedOut { timeout, replicas: self.replicas() }),
        }
    }

    /// Starts the failed replicas afresh, on the same ports (their restart history forgotten);
    /// returns how many.
    pub async fn retry_failed(&mut self) -> usize {
        let failed: Vec<u32> =
            self.replicas().into_iter().filter(|r| r.state == ReplicaState::Failed).map(|r| r.index).collect();
        for &index in &failed {
            if let Some(port) = self.finish(index).await {
                self.start(index, port);
            }
        }
        failed.len()
    }

    /// Starts replica `index` on `port`.
    fn start(&mut self, index: u32, port: u16) {
        let address = std::net::SocketAddr::new(self.config.host, port);
        self.shared.snapshot.send_modify(|replicas| {
            let at = replicas.partition_point(|r| r.index < index);
            let replica =
                Replica { index, address: Some(address), state: ReplicaState::Starting, pid: None, restarts: 0 };
            replicas.insert(at, replica);
        });
        let (stop, stop_rx) = oneshot::channel();
        let supervisor = Supervisor { index, port, config: self.config.clone(), shared: self.shared.clone() };
        let task = tokio::spawn(supervisor.run(stop_rx));
        self.slots.insert(index, Slot { port, stop: Some(stop), task });
    }

    /// Asks a replica to stop; [`finish`](Self::finish) waits for it.
    fn signal_stop(slot: &mut Slot) {
        if let Some(stop) = slot.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops replica `index` and waits for its supervisor (bounded: it is aborted, and its
    /// processes killed, if it overruns), then forgets the replica; returns its port, which the
    /// caller releases or reuses.
    async fn finish(&mut self, index: u32) -> Option<u16> {
        let slot = self.slots.get_mut(&index)?;
        Self::signal_stop(slot);
        // The kill program twice, the grace period, reaping; with room to spare.
        let bound = self.config.stop_grace + REAP_TIMEOUT + Duration::from_secs(10);
        if tokio::time::timeout(bound, &mut slot.task).await.is_err() {
            slot.task.abort();
            let _ = (&mut slot.task).await;
        }
        // No await between the task's end and here: a cancelled call leaves the slot to the next.
        let slot = self.slots.remove(&index)?;
        self.shared.snapshot.send_modify(|replicas| replicas.retain(|r| r.index != index));
        Some(slot.port)
    }
}

impl Actuator for LocalActuator {
    /// Starts the missing replicas `0..replicas` (without waiting for them to be ready) and
    /// stops those at `replicas` and above (asked highest first, stopped together), returning
    /// once their processes are gone. Failed replicas below `replicas` stay failed (see
    /// [`retry_failed`](LocalActuator::retry_failed)). Cancel-safe: replicas a dropped call
    /// asked to stop are finished by the next call.
    async fn scale_to(&mut self, replicas: u32) -> Result<(), ActuatorError> {
        let ports = self.ports.range();
        if replicas > ports.len() {
            return Err(LocalError::TooManyReplicas { asked: replicas, ports, available: ports.len() }.into());
        }
        for (_, slot) in self.slots.range_mut(replicas..).rev() {
            Self::signal_stop(slot);
        }
        let stopping: Vec<u32> = self.slots.iter().rev().filter(|(_, s)| s.stop.is_none()).map(|(i, _)| *i).collect();
        for index in stopping {
            if let Some(port) = self.finish(index).await {
                self.ports.release(port);
            }
        }
        for index in 0..replicas {
            if !self.slots.contains_key(&index) {
                let Some(port) = self.ports.take() else {
                    return Err(LocalError::TooManyReplicas { asked: replicas, ports, available: ports.len() }.into());
                };
                self.start(index, port);
            }
        }
        Ok(())
    }

    /// `desired`: the replicas asked for (failed ones included); `current`: those running.
    async fn observe(&mut self) -> Result<Observed, ActuatorError> {
        let running = self.shared.snapshot.borrow().iter().filter(|r| r.state.is_running()).count();
        Ok(Observed {
            desired: Some(u32::try_from(self.slots.len()).unwrap_or(u32::MAX)),
            current: Some(u32::try_from(running).unwrap_or(u32::MAX)),
        })
    }

    fn replicas(&self) -> Vec<Replica> {
        self.shared.snapshot.borrow().clone()
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

impl Drop for LocalActuator {
    /// Kills every replica at once: aborting a supervisor drops its process group, which kills it.
    fn drop(&mut self) {
        for slot in self.slots.values() {
            slot.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LocalSettings {
        LocalSettings::new("srv --port {port}", PortRange::try_new(9100, 9101).unwrap())
    }

    #[test]
    fn settings_are_checked() {
        let bad = |s: LocalSettings| LocalConfig::try_new(s).unwrap_err().to_string();
        assert_eq!(
            bad(LocalSettings { command: "srv --port {prot}".into(), ..settings() }),
            "command: unknown placeholder {prot} (known: {port}, {index}, {host})"
        );
        assert_eq!(
            bad(LocalSettings { startup_timeout: Duration::ZERO, ..settings() }),
            "startup_timeout must be longer than zero"
        );
        assert_eq!(
            bad(LocalSettings { readiness: Readiness::Http { path: "health".into() }, ..settings() }),
            "readiness.path must start with /"
        );
        let restart = RestartSettings { backoff_base: Duration::ZERO, ..RestartSettings::default() };
        assert_eq!(bad(LocalSettings { restart, ..settings() }), "restart.backoff_base must be longer than zero");
        let env = vec![("GPU".to_owned(), "{gpu}".to_owned())];
        assert!(bad(LocalSettings { env, ..settings() }).starts_with("env.GPU: unknown placeholder {gpu}"));
        assert!(LocalConfig::try_new(settings()).is_ok());
    }

    #[tokio::test]
    async fn refuses_more_replicas_than_ports() {
        let mut actuator = LocalActuator::new(LocalConfig::try_new(settings()).unwrap(), EventSink::none());
        let err = actuator.scale_to(3).await.unwrap_err();
        assert_eq!(err.to_string(), "cannot run 3 replicas on the 2 ports of 9100-9101");
        assert!(!err.is_retryable());
        assert!(actuator.replicas().is_empty());
    }
}
