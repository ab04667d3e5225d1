//! What every provider shares: handing sets to the sink, recording outcomes, backing off.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_core::EndpointSpec;
use fulcrum_core::backoff::Backoff;

use crate::StatusBoard;

/// Why the sink refused a set (the proxy could not build the pool from it).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where endpoint sets go: the proxy implements it over its pools (`PoolRuntime::set_endpoints`).
/// Providers call it only when a pool's set changed, from their own task.
pub trait EndpointSink: Send + Sync {
    /// Replaces the endpoints of `pool` with `endpoints` (ordered by id, ids unique).
    fn set(&self, pool: &str, endpoints: Vec<EndpointSpec>) -> Result<(), SinkError>;
}

/// One provider's outlet: dedupes sets, applies them, keeps the status board current.
pub(crate) struct Publisher {
    pool: String,
    sink: Arc<dyn EndpointSink>,
    status: Arc<StatusBoard>,
    last: Option<Vec<EndpointSpec>>,
    rejected: Vec<String>,
}

impl Publisher {
    pub(crate) fn new(
        pool: String,
        kind: &'static str,
        source: String,
        sink: Arc<dyn EndpointSink>,
        status: Arc<StatusBoard>,
    ) -> Self {
        status.start(&pool, kind, source);
        Publisher { pool, sink, status, last: None, rejected: Vec::new() }
    }

    pub(crate) fn pool(&self) -> &str {
        &self.pool
    }

    /// A successful answer: applies `set` if it differs from the last one applied. Entries
    /// in `rejected` were left out of it, with why. Returns whether the attempt counts as a
    /// success (false when the set has duplicate ids or the sink refused it).
    pub(crate) fn publish(&mut self, mut set: Vec<EndpointSpec>, rejected: Vec<String>) -> bool {
        set.sort_by(|a, b| a.id.cmp(&b.id));
        set.dedup();
        let mut seen = HashSet::new();
        if let Some(dup) = set.iter().find(|e| !seen.insert(&e.id)) {
            self.fail(&format!("endpoint id `{}` names two different endpoints; the set was not applied", dup.id));
            return false;
        }
        if self.last.as_ref() == Some(&set) {
            self.rejected.clone_from(&rejected);
            self.status.succeeded(&self.pool, None, rejected);
            return true;
        }
        let n = set.len();
        match self.sink.set(&self.pool, set.clone()) {
            Ok(()) => {
                tracing::info!(pool = %self.pool, endpoints = n, "discovery applied a new endpoint set");
                self.last = Some(set);
                self.rejected.clone_from(&rejected);
                self.status.succeeded(&self.pool, Some(n), rejected);
                true
            }
            Err(e) => {
                self.fail(&format!("the pool refused the set of {n} endpoints: {e}"));
                false
            }
        }
    }

    /// A successful attempt that found nothing new (the source did not change).
    pub(crate) fn publish_unchanged(&self) {
        self.status.succeeded(&self.pool, None, self.rejected.clone());
    }

    /// A failed attempt: the pool keeps its last set.
    pub(crate) fn fail(&self, error: &dyn std::fmt::Display) {
        let error = error.to_string();
        tracing::warn!(pool = %self.pool, %error, "discovery failed; the pool keeps its last endpoint set");
        self.status.failed(&self.pool, error);
    }
}

/// The wait between reconnection attempts: a [`Backoff`] of 100 ms doubling to `max`, with the
/// failures in a row counted here and forgotten after a success.
#[derive(Debug)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    /// Failed attempts in a row.
    failures: u32,
}

impl Reconnect {
    pub(crate) const START: Duration = Duration::from_millis(100);

    pub(crate) fn new(max: Duration) -> Self {
        Reconnect { backoff: Backoff::new(Self::START, max), failures: 0 }
    }

    /// A success: the next failure waits [`START`](Self::START) again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// A failure: sleeps for the backoff of this many failures in a row.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Counts a failure and says how long to wait after it.
    fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.ceiling(self.failures)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Sink {
        sets: Mutex<Vec<usize>>,
        refuse: bool,
    }

    impl EndpointSink for Sink {
        fn set(&self, _pool: &str, endpoints: Vec<EndpointSpec>) -> Result<(), SinkError> {
            if self.refuse {
                return Err("no".into());
            }
            self.sets.lock().unwrap().push(endpoints.len());
            Ok(())
        }
    }

    #[test]
    fn reconnects_wait_100ms_doubling_to_the_cap_and_start_over_after_a_success() {
        let mut r = Reconnect::new(Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| r.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        r.reset();
        assert_eq!(r.next_delay(), Reconnect::START);
    }

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn only_changes_reach_the_sink() {
        let sink = Arc::new(Sink::default());
        let board = Arc::new(StatusBoard::new());
        let mut p = Publisher::new("x".into(), "file", "f".into(), sink.clone(), board.clone());
        assert!(p.publish(vec![spec(2), spec(1)], Vec::new()));
        assert!(p.publish(vec![spec(1), spec(2), spec(1)], Vec::new()));
        assert!(p.publish(vec![spec(1)], Vec::new()));
        assert_eq!(*sink.sets.lock().unwrap(), [2, 1]);
        assert!(!p.publish(vec![spec(1), spec(2).with_id("127.0.0.1:1")], Vec::new()));
        let s = board.get("x").unwrap();
        assert_eq!((s.updates, s.endpoints, s.consecutive_failures), (2, Some(1), 1));
        assert!(s.last_error.unwrap().contains("names two different endpoints"));
    }

    #[test]
    fn a_refusal_is_a_failure_and_is_retried() {
        let sink = Arc::new(Sink { refuse: true, ..Sink::default() });
        let board = Arc::new(StatusBoard::new());
        let mut p = Publisher::new("x".into(), "file", "f".into(), sink, board.clone());
        assert!(!p.publish(vec![spec(1)], Vec::new()));
        assert!(!p.publish(vec![spec(1)], Vec::new()));
        assert_eq!(board.get("x").unwrap().consecutive_failures, 2);
        assert!(board.get("x").unwrap().last_error.unwrap().contains("refused the set of 1 endpoints: no"));
    }
}
