//! A simulated GPU inference server: `fulcrum mock-backend`.
//!
//! It stands in for vLLM or SGLang wherever a load balancer can see one: OpenAI-compatible
//! endpoints with token streaming, batch slots and a FIFO waiting queue, a prefix (KV) cache
//! that makes repeated prefixes cheaper, the engine's own metrics in vLLM's or SGLang's names,
//! and faults on demand. It is cheap: one process on one core holds a thousand open streams.
//!
//! - [`engine`] is the performance model, sans-IO (time is a value, no tokio, no clock), so
//!   that the simulator can run the same model in virtual time;
//! - [`server`] serves it over HTTP/1.1 with hyper, driven by a tokio timer;
//! - [`loadgen`] holds N concurrent streams against a URL and reports tokens/s, time to first
//!   token and latency percentiles (the benchmark and the demo use it);
//! - [`cli`] is what `fulcrum mock-backend` runs.
//!
//! Everything but [`engine`] and [`tokens`] sits behind the `server` feature (on by default);
//! without it the crate is the engine model alone, with no tokio and no hyper, which is how the
//! simulator (`fulcrum-sim`) uses it.
//!
//! In-process use (tests, `fulcrum demo`): bind port 0, start, read the address back.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fulcrum_mock::Error> {
//! use fulcrum_mock::{MockConfig, MockServer, engine::{EngineConfig, Gpu}};
//!
//! let config = MockConfig { engine: EngineConfig { speed: 0.5, ..EngineConfig::preset(Gpu::L4) }, ..MockConfig::default() };
//! let server = MockServer::bind(config, "127.0.0.1:0".parse().unwrap()).await?;
//! println!("serving on {}", server.base_url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! This crate must never depend on the proxy or the control plane: it is what they are tested
//! against. It depends on `fulcrum-core` only for time values and hashing.

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
pub mod engine;
#[cfg(feature = "server")]
pub mod faults;
#[cfg(feature = "server")]
pub mod loadgen;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
pub mod tokens;

#[cfg(feature = "server")]
pub use cli::{Args, CRASH_EXIT_CODE, main, run};
#[cfg(feature = "server")]
pub use config::{ConfigError, MetricsFlavor, MockConfig};
#[cfg(feature = "server")]
pub use faults::{Faults, FaultsPatch};
#[cfg(feature = "server")]
pub use server::{CrashReason, Exit, MockHandle, MockServer};

/// What can stop a mock server from starting.
#[cfg(feature = "server")]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[source] std::io::Error),
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent.
#[cfg(feature = "server")]
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
