//! Fulcrum's service discovery: providers that keep each pool's set of endpoints current.
//!
//! Every provider (a watched [`file`](mod@file), [`dns`] records, an [`etcd`] prefix, [`kubernetes`]
//! EndpointSlices, or backends' own [`registration`]s with heartbeats) produces the same
//! thing: the `Vec<EndpointSpec>` of a pool. It hands a set to an [`EndpointSink`] (the proxy)
//! only when the set changed. When a provider fails, the pool keeps the last set it had
//! (static stability), and the failure shows in the [`StatusBoard`] that the admin API and
//! `/metrics` read. `docs/discovery.md` describes each provider's settings.
//!
//! ```no_run
//! use std::sync::Arc;
//! use fulcrum_core::EndpointSpec;
//! use fulcrum_discovery::{Discovery, EndpointSink, SinkError, StatusBoard};
//!
//! struct Print;
//! impl EndpointSink for Print {
//!     fn set(&self, pool: &str, endpoints: Vec<EndpointSpec>) -> Result<(), SinkError> {
//!         println!("{pool}: {} endpoints", endpoints.len());
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(config: fulcrum_config::Config) {
//! let discovery = Discovery::new(Arc::new(Print), Arc::new(StatusBoard::new()));
//! let tasks: Vec<_> = config.pools.values()
//!     .filter_map(|p| Some(discovery.spawn(&p.name, p.discovery.clone()?)))
//!     .collect();
//! let admin = axum::Router::new().merge(fulcrum_discovery::registration_router(discovery.registry().clone()));
//! # }
//! ```
//!
//! It must never depend on the proxy (`fulcrum-proxy`) or the control plane: they depend on
//! it, through [`EndpointSink`].

pub mod dns;
pub mod etcd;
pub mod file;
mod http;
pub mod kubernetes;
mod publish;
pub mod register;
pub mod registration;
pub mod status;
pub mod testing;

use std::sync::Arc;

use fulcrum_config::discovery::{DiscoveryConfig, DnsRecord, SliceSelector};
use tokio::task::JoinHandle;

pub use etcd::{EtcdClient, EtcdError, EtcdRegistration, register_etcd};
pub use http::{BearerToken, TransportError};
pub use publish::{EndpointSink, SinkError};
pub use register::{Heartbeat, RegisterArgs, RegisterError, RegisterTarget, run_register};
pub use registration::{HttpRegistration, Registry, register_http, registration_router};
pub use status::{ProviderState, ProviderStatus, StatusBoard};

/// Runs providers: holds the sink, the status board and the registration [`Registry`] they
/// share. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    sink: Arc<dyn EndpointSink>,
    status: Arc<StatusBoard>,
    registry: Registry,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").field("status", &self.status).finish_non_exhaustive()
    }
}

// === impl Discovery ===

impl Discovery {
    /// Providers that apply sets to `sink` and report to `status`.
    pub fn new(sink: Arc<dyn EndpointSink>, status: Arc<StatusBoard>) -> Self {
        Discovery { sink, status, registry: Registry::new() }
    }

    /// The status board.
    pub fn status(&self) -> &Arc<StatusBoard> {
        &self.status
    }

    /// The registrations behind `kind = "registration"` pools: give it to
    /// [`registration_router`].
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Starts `pool`'s provider in a task that runs until aborted. Its first set replaces
    /// the pool's configured endpoints as soon as it is known. Must be called inside a tokio
    /// runtime. Aborting the task of a `registration` pool leaves its registrations in the
    /// registry (spawning it again picks them up); call [`Registry::disable`] to drop them.
    pub fn spawn(&self, pool: &str, config: DiscoveryConfig) -> JoinHandle<()> {
        let out = publish::Publisher::new(
            pool.to_owned(),
            config.kind(),
            source(&config),
            self.sink.clone(),
            self.status.clone(),
        );
        match config {
            DiscoveryConfig::File(c) => tokio::spawn(file::run(c, out)),
            DiscoveryConfig::Dns(c) => tokio::spawn(dns::run(c, out)),
            DiscoveryConfig::Etcd(c) => tokio::spawn(etcd::provider::run(c, out)),
            DiscoveryConfig::Kubernetes(c) => tokio::spawn(kubernetes::run(c, out)),
            DiscoveryConfig::Registration(c) => {
                // Enabled now, so registrations are accepted as soon as this returns.
                self.registry.enable(pool, c.limits);
                tokio::spawn(registration::run(self.registry.clone(), c.limits, out))
            }
        }
    }
}

/// What a provider reads, in words, for the status board.
fn source(config: &DiscoveryConfig) -> String {
    match config {
        DiscoveryConfig::File(c) => format!("file {}", c.path.display()),
        DiscoveryConfig::Dns(c) => {
            let via = c.server.map(|s| format!(" via {s}")).unwrap_or_default();
            match c.record {
                DnsRecord::Address { port } => format!("dns A/AAAA {}:{port}{via}", c.name),
                DnsRecord::Srv => format!("dns SRV {}{via}", c.name),
            }
        }
        DiscoveryConfig::Etcd(c) => format!("etcd {} prefix {}", c.endpoints.join(","), c.prefix),
        DiscoveryConfig::Kubernetes(c) => {
            let what = match &c.selector {
                SliceSelector::Service(s) => format!("service {s}"),
                SliceSelector::Labels(l) => format!("selector {l}"),
            };
            let server = c.api_server.as_deref().unwrap_or("(in-cluster)");
            format!("kubernetes {server} namespace {} {what}", c.namespace)
        }
        DiscoveryConfig::Registration(c) => format!("registration ttl {:?}", c.limits.default_ttl),
    }
}

/// An error and its sources, one after the other: hyper's and kube's own message for a
/// failed connection is only "client error (Connect)", the reason (a refused connection, a
/// certificate that does not verify) is further down.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}
