//! What an actuator reports: its replicas as they are now, and events as they happen.
//!
//! [`Replica`] is a snapshot ([`Actuator::replicas`](crate::Actuator::replicas)); [`Event`]s
//! go through a bounded channel made by [`EventSink::channel`]. A supervisor never waits for
//! the reader: when the channel is full an event is dropped and counted
//! ([`EventSink::dropped`]), so a slow reader costs it log lines, never a stuck restart. The
//! snapshot stays exact either way.
//!
//! The autoscaler registers a replica with the proxy on [`EventKind::Ready`] and deregisters it
//! on [`EventKind::Exited`] and [`EventKind::Stopped`] (both carry the address; an `Exited`
//! replica may never have been ready). Since events can be dropped, it should also reconcile
//! the proxy's endpoints against the snapshot now and then: the replicas whose state is
//! [`ReplicaState::Running`] are exactly the ones to route to
//! ([`LocalActuator::subscribe`](crate::LocalActuator::subscribe) wakes it on every change).
//!
//! ```
//! use fulcrum_scale::{Event, EventKind, EventSink};
//!
//! let (sink, mut events) = EventSink::channel(1);
//! sink.emit(Event { index: 0, kind: EventKind::Ready { address: "127.0.0.1:9100".parse().unwrap() } });
//! sink.emit(Event { index: 1, kind: EventKind::Ready { address: "127.0.0.1:9101".parse().unwrap() } });
//! assert_eq!(events.try_recv().unwrap().to_string(), "replica 0: ready at 127.0.0.1:9100");
//! assert_eq!(sink.dropped(), 1); // the second did not fit
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

/// One replica, as its actuator last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Its place in the fleet, from 0; scale-in removes the highest first.
    pub index: u32,
    /// Where it listens, when the actuator chose it (local processes).
    pub address: Option<SocketAddr>,
    /// Where it is in its life.
    pub state: ReplicaState,
    /// Its process id while it has a process.
    pub pid: Option<u32>,
    /// How often it was restarted after a crash, since it was first started.
    pub restarts: u32,
}

/// Where a replica is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Started; its readiness probe has not passed yet.
    Starting,
    /// Its readiness probe passed, and it has not exited since.
    Running,
    /// It exited, and will be started again at `next_at`: restart number `attempt` in a row.
    Restarting {
        /// Restarts in a row (from 1); the backoff grows with it.
        attempt: u32,
        /// When it will be started.
        next_at: tokio::time::Instant,
    },
    /// It crashed too often (the restart intensity was exceeded) and is no longer restarted.
    Failed,
    /// Being stopped (scale-in): terminated, then killed after the grace period.
    Stopping,
}

impl ReplicaState {
    /// Whether the replica is up and ready.
    pub fn is_running(&self) -> bool {
        matches!(self, ReplicaState::Running)
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaState::Starting => f.write_str("starting"),
            ReplicaState::Running => f.write_str("running"),
            ReplicaState::Restarting { attempt, .. } => write!(f, "restarting (attempt {attempt})"),
            ReplicaState::Failed => f.write_str("failed"),
            ReplicaState::Stopping => f.write_str("stopping"),
        }
    }
}

/// Something that happened to a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The replica's index.
    pub index: u32,
    /// What happened.
    pub kind: EventKind,
}

/// What happened to a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Its process was started (not ready yet).
    Started {
        /// The process id.
        pid: u32,
        /// Where it will listen.
        address: SocketAddr,
    },
    /// Its readiness probe passed: register it with the proxy.
    Ready {
        /// Where it listens.
        address: SocketAddr,
    },
    /// It ended without being asked to (or could not start): deregister it. A restart or a
    /// give-up follows.
    Exited {
        /// Where it listened.
        address: SocketAddr,
        /// How it ended.
        exit: Exit,
        /// How long it had been ready (zero if it never was): the backoff starts over after
        /// `reset_after`.
        ready_for: Duration,
    },
    /// It will be started again in `delay`.
    Restarting {
        /// Restarts in a row (from 1).
        attempt: u32,
        /// The backoff.
        delay: Duration,
    },
    /// It crashed more than the restart intensity allows and stays down.
    GaveUp {
        /// Restarts within the window.
        restarts: u32,
        /// The window.
        within: Duration,
    },
    /// It was stopped on request (scale-in) and its process is gone.
    Stopped {
        /// Where it listened.
        address: SocketAddr,
        /// How its process ended, if it had one.
        status: Option<ExitStatus>,
    },
}

/// How a replica's process ended, when nobody asked it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited by itself, with this status (code or signal).
    Status(ExitStatus),
    /// Its program could not be started, or waiting for it failed.
    Error {
        /// Why, as the operating system said.
        error: String,
    },
    /// It did not pass its readiness probe within the startup timeout, and was killed.
    NotReady {
        /// The startup timeout.
        waited: Duration,
    },
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::Error { error } => f.write_str(error),
            Exit::NotReady { waited } => write!(f, "not ready within {waited:?}, killed"),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replica {}: ", self.index)?;
        match &self.kind {
            EventKind::Started { pid, address } => write!(f, "started, pid {pid}, for {address}"),
            EventKind::Ready { address } => write!(f, "ready at {address}"),
            EventKind::Exited { address, exit, ready_for } => {
                write!(f, "at {address} exited ({exit}) after being ready for {ready_for:?}")
            }
            EventKind::Restarting { attempt, delay } => {
                write!(f, "restarting in {} ms (attempt {attempt})", delay.as_millis())
            }
            EventKind::GaveUp { restarts, within } => {
                write!(f, "gave up after {restarts} restarts within {within:?}")
            }
            EventKind::Stopped { address, status: Some(status) } => write!(f, "at {address} stopped ({status})"),
            EventKind::Stopped { address, status: None } => write!(f, "at {address} stopped"),
        }
    }
}

/// Where an actuator sends its events: a bounded channel, or nowhere.
#[derive(Clone, Debug, Default)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<AtomicU64>,
}

// === impl EventSink ===

impl EventSink {
    /// A sink and the receiving end of a channel that holds up to `capacity` events (at least 1).
    pub fn channel(capacity: usize) -> (EventSink, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (EventSink { tx: Some(tx), dropped: Arc::default() }, rx)
    }

    /// A sink that discards every event.
    pub fn none() -> EventSink {
        EventSink::default()
    }

    /// Sends an event without waiting; counts it as dropped when the channel is full.
    pub fn emit(&self, event: Event) {
        if let Some(tx) = &self.tx
            && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_display() {
        let address: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        let e = |kind| Event { index: 2, kind }.to_string();
        assert_eq!(e(EventKind::Started { pid: 7, address }), "replica 2: started, pid 7, for 127.0.0.1:9100");
        assert_eq!(
            e(EventKind::Restarting { attempt: 3, delay: Duration::from_secs(2) }),
            "replica 2: restarting in 2000 ms (attempt 3)"
        );
        assert_eq!(
            e(EventKind::Exited {
                address,
                exit: Exit::NotReady { waited: Duration::from_secs(5) },
                ready_for: Duration::ZERO
            }),
            "replica 2: at 127.0.0.1:9100 exited (not ready within 5s, killed) after being ready for 0ns"
        );
        assert_eq!(
            e(EventKind::GaveUp { restarts: 5, within: Duration::from_secs(60) }),
            "replica 2: gave up after 5 restarts within 60s"
        );
        assert_eq!(e(EventKind::Stopped { address, status: None }), "replica 2: at 127.0.0.1:9100 stopped");
    }

    #[test]
    fn a_closed_channel_is_not_a_drop() {
        let (sink, rx) = EventSink::channel(0);
        drop(rx);
        sink.emit(Event { index: 0, kind: EventKind::GaveUp { restarts: 1, within: Duration::from_secs(1) } });
        assert_eq!(sink.dropped(), 0);
        EventSink::none().emit(Event { index: 0, kind: EventKind::GaveUp { restarts: 1, within: Duration::ZERO } });
    }
}
