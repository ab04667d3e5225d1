//! Helpers shared by the integration tests: a sink that records sets, temporary
//! directories, and an etcd server of the test's own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_core::EndpointSpec;
use fulcrum_discovery::{EndpointSink, SinkError, StatusBoard};
use tokio::sync::watch;

/// The longest any wait in these tests may take, unless the test says less.
pub const WAIT: Duration = Duration::from_secs(20);

/// Records every set applied, per pool.
#[derive(Debug)]
pub struct RecordingSink {
    sets: Mutex<Vec<(String, Vec<EndpointSpec>)>>,
    changed: watch::Sender<u64>,
}

impl RecordingSink {
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingSink { sets: Mutex::default(), changed: watch::channel(0).0 })
    }

    /// Every set applied to `pool`, in order.
    pub fn sets(&self, pool: &str) -> Vec<Vec<EndpointSpec>> {
        self.sets.lock().expect("lock").iter().filter(|(p, _)| p == pool).map(|(_, s)| s.clone()).collect()
    }

    /// The set last applied to `pool`.
    pub fn last(&self, pool: &str) -> Option<Vec<EndpointSpec>> {
        self.sets(pool).pop()
    }

    /// Waits, at most `within`, until the last set of `pool` satisfies `done`; returns it.
    pub async fn wait_for(
        &self,
        pool: &str,
        within: Duration,
        what: &str,
        done: impl Fn(&[EndpointSpec]) -> bool,
    ) -> Vec<EndpointSpec> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(set) = self.last(pool).filter(|s| done(s)) {
                return set;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                panic!(
                    "{what}: not within {within:?}; sets so far: {:?}",
                    self.sets(pool).iter().map(|s| addresses(s)).collect::<Vec<_>>()
                );
            }
        }
    }
}

impl EndpointSink for RecordingSink {
    fn set(&self, pool: &str, endpoints: Vec<EndpointSpec>) -> Result<(), SinkError> {
        self.sets.lock().expect("lock").push((pool.to_owned(), endpoints));
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// The addresses of a set, as text, in the set's order.
pub fn addresses(set: &[EndpointSpec]) -> Vec<String> {
    set.iter().map(|e| e.address.to_string()).collect()
}

/// The ids of a set.
pub fn ids(set: &[EndpointSpec]) -> Vec<String> {
    set.iter().map(|e| e.id.to_string()).collect()
}

/// Polls `done` every 20 ms until it holds, at most `within`.
pub async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the status board shows `pool` failing with an error containing `text`.
pub async fn wait_failing(status: &StatusBoard, pool: &str, text: &str) -> fulcrum_discovery::ProviderStatus {
    let mut seen = None;
    eventually(WAIT, &format!("pool {pool} failing with {text:?}"), || {
        seen = status.get(pool);
        seen.as_ref().is_some_and(|s| {
            s.state == fulcrum_discovery::ProviderState::Failing
                && s.last_error.as_deref().is_some_and(|e| e.contains(text))
        })
    })
    .await;
    seen.expect("status")
}

#[allow(unused_imports)]
pub use fulcrum_discovery::testing::*;

/// A loopback address nothing listens on (connections are refused).
pub fn refused_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}
