//! What every provider shares: handing sets to the sink, recording outcomes, backing off.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_core::EndpointSpec;

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

/// Exponential backoff between reconnection attempts: 100 ms doubling to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) const START: Duration = Duration::from_millis(100);

    pub(crate) fn new(max: Duration) -> Self {
        Backoff { next: Self::START, max }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::START;
    }

    /// Sleeps for the current delay, then doubles it.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
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
