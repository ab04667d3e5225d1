//! Discovery providers wired to the running proxy: each pool with a `discovery` table gets
//! its provider, whose endpoint sets become membership changes of the pool of that name in
//! the generation running at the time. Reloads that add, remove or change a pool's
//! `discovery` start, stop or restart its provider; a pool rebuilt for other reasons keeps
//! the set its provider found (see `fulcrum_proxy::live`).

use std::collections::HashMap;
use std::sync::Arc;

use fulcrum_config::discovery::DiscoveryConfig;
use fulcrum_core::EndpointSpec;
use fulcrum_discovery::{Discovery, EndpointSink, SinkError, StatusBoard};
use fulcrum_proxy::Live;
use tokio::task::JoinHandle;

/// Hands endpoint sets to the pools of the running configuration.
#[derive(Debug)]
pub struct LiveSink {
    live: Live,
}

impl EndpointSink for LiveSink {
    fn set(&self, pool: &str, endpoints: Vec<EndpointSpec>) -> Result<(), SinkError> {
        let change = self.live.set_discovered(pool, endpoints)?;
        tracing::info!(pool, added = ?change.added, removed = ?change.removed, kept = change.kept, "discovery changed the pool");
        Ok(())
    }
}

/// The discovery of a running proxy: providers feeding its pools, their status board and
/// the registrations of `kind = "registration"` pools.
pub fn for_live(live: &Live) -> Discovery {
    Discovery::new(Arc::new(LiveSink { live: live.clone() }), Arc::new(StatusBoard::new()))
}

/// The providers running, stopped when dropped (when the supervising task ends or is
/// aborted).
struct Providers {
    discovery: Discovery,
    running: HashMap<String, (DiscoveryConfig, JoinHandle<()>)>,
}

impl Providers {
    fn stop(&self, name: &str, config: &DiscoveryConfig, task: &JoinHandle<()>) {
        task.abort();
        if matches!(config, DiscoveryConfig::Registration(_)) {
            self.discovery.registry().disable(name);
        }
        self.discovery.status().remove(name);
    }

    /// Makes the running providers those of `pools`.
    fn follow(&mut self, pools: &std::collections::BTreeMap<String, fulcrum_config::PoolConfig>) {
        let running = std::mem::take(&mut self.running);
        for (name, (config, task)) in running {
            if pools.get(&name).and_then(|p| p.discovery.as_ref()) == Some(&config) {
                self.running.insert(name, (config, task));
            } else {
                self.stop(&name, &config, &task);
            }
        }
        for (name, pool) in pools {
            if let Some(config) = &pool.discovery
                && !self.running.contains_key(name)
            {
                let task = self.discovery.spawn(name, config.clone());
                self.running.insert(name.clone(), (config.clone(), task));
            }
        }
    }
}

impl Drop for Providers {
    fn drop(&mut self) {
        for (name, (config, task)) in &self.running {
            self.stop(name, config, task);
        }
    }
}

/// Runs the providers of the running configuration's pools, following reloads, until the
/// task is dropped (which stops them).
pub async fn supervise(live: Live, discovery: Discovery) {
    let mut reloads = live.subscribe();
    let mut providers = Providers { discovery, running: HashMap::new() };
    loop {
        providers.follow(&live.state().config().pools);
        if reloads.changed().await.is_err() {
            return;
        }
    }
}
