//! The proxy's pool as the autoscaler sees it: [`fulcrum_scale::ScaledPool`] implemented over
//! a [`PoolRuntime`].
//!
//! The autoscaler crate never depends on the proxy (and the proxy not on it); this binary
//! wires them, as `fulcrum-control` wires discovery's endpoint sink to the live pools. The
//! load is read from the pool's lock-free snapshot and counters; engine reports are judged
//! fresh on the proxy's clock, the one they were stamped with. Replicas join and leave through
//! `PoolRuntime::set_endpoints`, next to the pool's configured endpoints. Cost: O(endpoints)
//! per call; nothing is written when the replicas did not change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fulcrum_core::EndpointSpec;
use fulcrum_core::scale::LoadReading;
use fulcrum_proxy::clock;
use fulcrum_proxy::pool::{Drained, PoolRuntime};
use fulcrum_scale::{PoolError, ScaledPool};

/// A proxy pool driven by an autoscaler.
#[derive(Clone, Debug)]
pub struct ProxyPool(pub Arc<PoolRuntime>);

impl ScaledPool for ProxyPool {
    type Drained = Drained;

    fn name(&self) -> &str {
        self.0.name()
    }

    fn load(&self) -> LoadReading {
        let pool = &self.0;
        LoadReading {
            requests: pool.safety().stats.requests.load(Ordering::Relaxed),
            held: pool.held(),
            p95_latency: pool.safety().p95_latency(),
            ..LoadReading::of_selector(&pool.snapshot().selector, clock::now())
        }
    }

    fn set_replicas(&self, replicas: Vec<EndpointSpec>) -> Result<(), PoolError> {
        let mut specs = self.0.config().endpoints.clone();
        specs.extend(replicas);
        let current: Vec<(String, SocketAddr)> =
            self.0.snapshot().selector.endpoints().iter().map(|e| (e.id().to_string(), e.address())).collect();
        let wanted: Vec<(String, SocketAddr)> = specs.iter().map(|s| (s.id.to_string(), s.address)).collect();
        if current != wanted {
            self.0.set_endpoints(specs)?;
        }
        Ok(())
    }

    fn drain(&self, id: &str, timeout: Duration) -> impl Future<Output = Drained> + Send + 'static {
        let (pool, id) = (self.0.clone(), id.to_owned());
        async move { pool.drain(&id, timeout).await }
    }

    fn event(&self, message: String) {
        self.0.safety().event(self.0.name(), "autoscale", message);
    }

    fn report(&self, status: Option<fulcrum_core::scale::ScaleStatus>) {
        self.0.safety().stats.set_scale(status);
    }
}
