//! Fulcrum's control plane: the admin API and the Prometheus metrics of a running proxy.
//!
//! The admin API is an axum `Router` built by [`admin::app`] from the proxy's running configuration ([`fulcrum_proxy::Live`]), so
//! tests call it without sockets (`oneshot`) and `fulcrum serve` binds it on its own listener.
//! Everything it reads comes from the proxy's lock-free snapshots and counters; everything it
//! changes goes through the pool's own methods (drain) or through a reload of an edited
//! configuration ([`edit`]), never around them.
//!
//! It must not be depended on by the data plane or the core.

pub mod admin;
pub mod dashboard;
pub mod discover;
pub mod edit;
pub mod listen;
pub mod mesh;
pub mod metrics;
