//! The pool an autoscaler grows and shrinks, as this crate sees it: a small trait its owner
//! implements.
//!
//! This crate never depends on the proxy. As discovery hands endpoint sets to an
//! `EndpointSink` that the crate above implements over the proxy's pools, the autoscaler
//! reads load from and registers replicas in a [`ScaledPool`]; the `fulcrum` binary implements
//! it for the proxy's pool and wires the two. Tests (and a simulator) implement it over
//! anything that holds endpoints. Cost: none beyond the implementation's; the autoscaler calls
//! each method at most a few times per tick.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use fulcrum_core::EndpointSpec;
use fulcrum_core::scale::{LoadReading, ScaleStatus};

/// Why the pool refused a set of replicas.
pub type PoolError = Box<dyn std::error::Error + Send + Sync>;

/// A pool whose replicas an autoscaler manages.
pub trait ScaledPool: Send + Sync + 'static {
    /// How a drain ended, to log.
    type Drained: fmt::Debug + Send;

    /// The pool's name, for logs.
    fn name(&self) -> &str;

    /// The pool's load now, as raw numbers; the autoscaler meters them into signals
    /// ([`fulcrum_core::scale::SignalMeter`]) with its own clock. Engine reports older than the
    /// pool trusts are left out by the pool, which knows their age.
    fn load(&self) -> LoadReading;

    /// Makes the pool's autoscaled endpoints `replicas` (ordered by id); the endpoints it has
    /// from elsewhere (its configuration) stay. Called every tick: a pool whose replicas did
    /// not change does nothing.
    fn set_replicas(&self, replicas: Vec<EndpointSpec>) -> Result<(), PoolError>;

    /// Stops sending new requests to replica `id` and resolves once its requests in flight
    /// (streams included) have finished, or after `timeout`. The replica stays in the pool,
    /// draining, until [`set_replicas`](Self::set_replicas) leaves it out. The future owns what
    /// it needs: the autoscaler drains several replicas at once, each in its own task.
    fn drain(&self, id: &str, timeout: Duration) -> impl Future<Output = Self::Drained> + Send + 'static;

    /// Records a scaling event in the pool's timeline.
    fn event(&self, message: String);

    /// Keeps the autoscaler's last tick for those who show it (admin API, dashboard,
    /// metrics, KEDA): called every tick, and with `None` when the autoscaler stops. The
    /// default keeps nothing.
    fn report(&self, status: Option<ScaleStatus>) {
        let _ = status;
    }
}
