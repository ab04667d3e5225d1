//! The HTTP server: an accept loop, one task per connection, one task driving the engine.
//!
//! [`MockServer::start`] takes a bound listener (bind port 0 and read the address back, so
//! tests never race for ports) and returns a [`MockHandle`] at once: connections queue in the
//! listener's backlog until the accept loop takes them, so the server is ready when `start`
//! returns. [`MockHandle::shutdown`] is graceful: no new connections, requests in flight
//! finish (within `shutdown_grace`), hanging requests are closed. A crash fault stops the
//! server abruptly (every connection is dropped) and resolves [`MockHandle::wait`] with
//! [`Exit::Crashed`]; only the CLI turns that into a process exit.

mod body;
mod embed;
mod routes;
mod state;

pub use body::{MockBody, TokenStream};
pub use state::CrashReason;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::Error;
use crate::config::MockConfig;
use crate::engine::{Engine, EngineStats};
use crate::faults::{FaultError, Faults, FaultsPatch};
use state::{RunState, Shared, lock};

/// How a server ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request.
    Stopped,
    /// Crashed on purpose by a fault.
    Crashed(CrashReason),
}

/// Starts mock servers.
#[derive(Debug)]
pub struct MockServer;

impl MockServer {
    /// Serves `config` on `listener`. Must be called from within a Tokio runtime (with its
    /// time and I/O drivers enabled).
    pub async fn start(config: MockConfig, listener: TcpListener) -> Result<MockHandle, Error> {
        config.validate()?;
        let local_addr = listener.local_addr().map_err(Error::Io)?;
        let mut engine = Engine::try_new(config.engine.clone()).map_err(crate::config::ConfigError::from)?;
        engine.set_priority_scheduling(config.server.scheduling_policy == crate::config::SchedulingPolicy::Priority);
        let shared = Shared::new(config, engine);
        tokio::spawn(state::drive(shared.clone()));
        tokio::spawn(state::crash_timer(shared.clone()));
        let task = tokio::spawn(accept_loop(shared.clone(), listener));
        let state = shared.state.subscribe();
        Ok(MockHandle { shared, local_addr, task: Some(task), state })
    }

    /// Binds `addr` (port 0 picks a free port) and serves `config` there.
    pub async fn bind(config: MockConfig, addr: SocketAddr) -> Result<MockHandle, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        MockServer::start(config, listener).await
    }
}

/// A running mock server. Dropping it stops the server abruptly; prefer
/// [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct MockHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    state: watch::Receiver<RunState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("models", &self.config.models).finish_non_exhaustive()
    }
}

// === impl MockHandle ===

impl MockHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`, the base URL of its endpoints.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The configuration it runs.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// The engine's load and counters now.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats()
    }

    /// HTTP requests in flight, streams included.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).faults().clone()
    }

    /// Changes some faults, as `POST /admin/faults` does.
    pub fn set_faults(&self, patch: &FaultsPatch) -> Result<Faults, FaultError> {
        Ok(self.shared.set_faults(patch.apply(&self.faults())?, tokio::time::Instant::now()))
    }

    /// Waits until the server ends by itself (a crash fault) or is shut down.
    pub async fn wait(&mut self) -> Exit {
        let end = match self.state.wait_for(|s| s.is_over()).await {
            Ok(s) => *s,
            Err(_) => RunState::Stopped,
        };
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        match end {
            RunState::Crashed(reason) => Exit::Crashed(reason),
            _ => Exit::Stopped,
        }
    }

    /// Stops accepting, lets requests in flight finish (at most `shutdown_grace`), and stops.
    pub async fn shutdown(mut self) -> Exit {
        self.shared.state.send_if_modified(|s| {
            let running = *s == RunState::Running;
            if running {
                *s = RunState::Draining;
            }
            running
        });
        self.wait().await
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.shared.state.send_if_modified(|s| {
            let over = s.is_over();
            if !over {
                *s = RunState::Stopped;
            }
            !over
        });
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    let slots = Arc::new(Semaphore::new(shared.config.server.max_connections as usize));
    let mut state = shared.state.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Over the limit: the connection is closed at once.
                    let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(shared.clone(), stream, permit));
                }
                // Out of file descriptors and the like: let connections finish, then retry.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = state::wait_until(&mut state, |s| *s != RunState::Running) => break,
        }
    }
    drop(listener);
    let draining = *state.borrow() == RunState::Draining;
    if draining {
        let mut grace = pin!(tokio::time::sleep(shared.config.server.shutdown_grace));
        loop {
            tokio::select! {
                next = conns.join_next() => if next.is_none() { break },
                _ = &mut grace => break,
                _ = state::wait_until(&mut state, |s| s.is_over()) => break,
            }
        }
    }
    conns.shutdown().await;
    shared.state.send_if_modified(|s| {
        let over = s.is_over();
        if !over {
            *s = RunState::Stopped;
        }
        !over
    });
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let mut state = shared.state.subscribe();
    let service_state = shared.clone();
    let service = service_fn(move |req| routes::handle(service_state.clone(), req));
    let mut conn = pin!(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.server.read_timeout)
            .serve_connection(TokioIo::new(stream), service)
    );
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = state::wait_until(&mut state, |s| *s != RunState::Running) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
