//! A pool at run time: its selector and upstreams, swapped atomically as a snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use fulcrum_config::PoolConfig;
use fulcrum_core::policy::Needs;
use fulcrum_core::{BuildError, Selector};

use crate::clock;
use crate::safety::PoolSafety;
use crate::upstream::Upstream;

/// An immutable view of a pool: the selector and, index for index, its upstreams.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The balancing state.
    pub selector: Selector,
    /// Connections and counters of `selector.endpoints()[i]`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Sticky-cookie token to endpoint index.
    sticky: HashMap<u64, usize>,
}

impl PoolSnapshot {
    /// The endpoint a sticky-cookie token names, if it is still in the pool.
    pub(crate) fn sticky_index(&self, token: u64) -> Option<usize> {
        self.sticky.get(&token).copied()
    }
}

/// The token a sticky cookie carries for an endpoint: a hash of its id, so that the cookie
/// reveals no address and survives reloads while the endpoint stays.
pub(crate) fn sticky_token(id: &str) -> u64 {
    fulcrum_core::hash::hash_bytes(id.as_bytes(), 0x5717_C4E1)
}

/// A pool: its configuration and the current snapshot.
#[derive(Debug)]
pub struct PoolRuntime {
    config: PoolConfig,
    needs: Needs,
    snapshot: ArcSwap<PoolSnapshot>,
    safety: Arc<PoolSafety>,
}

impl PoolRuntime {
    pub(crate) fn new(config: PoolConfig) -> Result<Self, BuildError> {
        let selector =
            Selector::try_new(config.policy.clone(), config.options.clone(), config.endpoints.clone(), clock::now())?;
        let safety = Arc::new(PoolSafety::new(config.resilience.clone(), selector.endpoints()));
        let snapshot = Self::snapshot_of(&config, selector, &HashMap::new());
        Ok(PoolRuntime { needs: config.policy.needs(), config, snapshot: ArcSwap::from_pointee(snapshot), safety })
    }

    fn snapshot_of(config: &PoolConfig, selector: Selector, old: &HashMap<&str, Arc<Upstream>>) -> PoolSnapshot {
        let upstreams: Vec<Arc<Upstream>> = selector
            .endpoints()
            .iter()
            .map(|e| match old.get(e.id().as_str()) {
                Some(u) => u.clone(),
                None => Arc::new(Upstream::new(
                    e.address(),
                    e.id().to_string(),
                    config.max_idle_per_endpoint,
                    config.timeouts.connect,
                    config.timeouts.idle,
                    config.resilience.breaker.as_ref(),
                )),
            })
            .collect();
        let sticky = selector.endpoints().iter().enumerate().map(|(i, e)| (sticky_token(e.id().as_str()), i)).collect();
        PoolSnapshot { selector, upstreams, sticky }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Failure handling: health, ejections, breakers' timeline, retries, admission.
    pub fn safety(&self) -> &Arc<PoolSafety> {
        &self.safety
    }

    /// What the policy needs from each request.
    pub(crate) fn needs(&self) -> &Needs {
        &self.needs
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }

    /// Recomputes effective weights; swaps in rebuilt tables when they changed.
    pub(crate) fn refresh(&self) {
        let current = self.snapshot.load();
        if let Some(selector) = current.selector.refresh(clock::now()) {
            let old: HashMap<&str, Arc<Upstream>> = current
                .selector
                .endpoints()
                .iter()
                .map(|e| e.id().as_str())
                .zip(current.upstreams.iter().cloned())
                .collect();
            let next = Self::snapshot_of(&self.config, selector, &old);
            self.snapshot.store(Arc::new(next));
        }
    }
}
