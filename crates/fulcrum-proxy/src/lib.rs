//! Fulcrum's data plane: listeners, routing, upstream connection pools, streaming.
//!
//! A request goes: listener -> route (host, path, headers, then the `model` of a JSON body
//! only if a route needs it) -> pool -> the core's selector picks an endpoint -> a pooled
//! HTTP/1.1 connection, driven in the request's own task -> the response streams back frame
//! by frame, counted in flight until its body ends. Pools are immutable snapshots behind
//! `ArcSwap`; counters are atomics; no lock is taken on the request path. Each request is
//! observed until its body ends ([`observe`]): counters and latency histograms per endpoint
//! ([`stats`], read by `/metrics`), and when configured an access-log line and OpenTelemetry
//! spans ([`trace`]).
//!
//! This crate owns effects (sockets, timers, tasks) and no decisions: those live in
//! `fulcrum-core`. It must not depend on the control plane.

pub mod batch;
pub mod body;
pub mod clock;
pub mod error;
pub mod h1;
mod headers;
mod health;
pub mod http;
pub mod live;
pub mod observe;
pub mod pool;
mod route;
pub mod safety;
mod scrape;
pub mod server;
pub mod stats;
mod tcp;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use error::ProxyError;
pub use live::{DiscoveredError, Live, ReloadError, ReloadReport};
pub use server::{BindFileError, Proxy, StartError};
