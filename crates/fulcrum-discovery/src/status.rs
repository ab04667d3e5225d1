//! The status board: how each pool's provider is doing, for the admin API and `/metrics`.
//!
//! Providers write to it after every attempt; readers take a [`StatusBoard::snapshot`], a
//! plain copy that serializes to JSON. A failing provider does not empty its pool (the last
//! set stays in use): the board is where the failure shows.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where a provider stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderState {
    /// No attempt has finished yet.
    Starting,
    /// The last attempt succeeded.
    Ok,
    /// The last attempt failed; the pool keeps its last set.
    Failing,
}

/// One pool's provider, as of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderStatus {
    /// The pool.
    pub pool: String,
    /// The provider's kind (`file`, `dns`, `etcd`, `kubernetes`, `registration`).
    pub kind: &'static str,
    /// What it reads, in words (`file /etc/fulcrum/llama.toml`).
    pub source: String,
    /// Where it stands.
    pub state: ProviderState,
    /// Endpoints in the set last applied (`None` before the first).
    pub endpoints: Option<usize>,
    /// Sets applied to the pool (changes only: an unchanged answer is not applied again).
    pub updates: u64,
    /// Failed attempts, in all.
    pub failures: u64,
    /// Failed attempts since the last success.
    pub consecutive_failures: u64,
    /// When an attempt last succeeded (Unix milliseconds).
    pub last_success_unix_ms: Option<u64>,
    /// When a set was last applied (Unix milliseconds).
    pub last_update_unix_ms: Option<u64>,
    /// The last failure, kept after a later success for a post-mortem.
    pub last_error: Option<String>,
    /// When it happened (Unix milliseconds).
    pub last_error_unix_ms: Option<u64>,
    /// Entries left out of the current set, each with why (a bad etcd value, a slice
    /// without the port): the rest of the set is still applied.
    pub rejected: Vec<String>,
}

/// The board; share it as `Arc<StatusBoard>`.
#[derive(Debug, Default)]
pub struct StatusBoard {
    pools: RwLock<BTreeMap<String, ProviderStatus>>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// === impl StatusBoard ===

impl StatusBoard {
    /// An empty board.
    pub fn new() -> Self {
        StatusBoard::default()
    }

    /// Every provider, ordered by pool.
    pub fn snapshot(&self) -> Vec<ProviderStatus> {
        self.pools.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// One pool's provider.
    pub fn get(&self, pool: &str) -> Option<ProviderStatus> {
        self.pools.read().unwrap_or_else(PoisonError::into_inner).get(pool).cloned()
    }

    /// Forgets a pool (its provider was stopped for good).
    pub fn remove(&self, pool: &str) {
        self.pools.write().unwrap_or_else(PoisonError::into_inner).remove(pool);
    }

    /// Starts (or restarts) the entry of `pool`.
    pub(crate) fn start(&self, pool: &str, kind: &'static str, source: String) {
        let status = ProviderStatus {
            pool: pool.to_owned(),
            kind,
            source,
            state: ProviderState::Starting,
            endpoints: None,
            updates: 0,
            failures: 0,
            consecutive_failures: 0,
            last_success_unix_ms: None,
            last_update_unix_ms: None,
            last_error: None,
            last_error_unix_ms: None,
            rejected: Vec::new(),
        };
        self.pools.write().unwrap_or_else(PoisonError::into_inner).insert(pool.to_owned(), status);
    }

    fn update(&self, pool: &str, f: impl FnOnce(&mut ProviderStatus)) {
        if let Some(s) = self.pools.write().unwrap_or_else(PoisonError::into_inner).get_mut(pool) {
            f(s);
        }
    }

    /// An attempt succeeded; `applied` is the size of a set just applied, if one was.
    pub(crate) fn succeeded(&self, pool: &str, applied: Option<usize>, rejected: Vec<String>) {
        let now = unix_ms();
        self.update(pool, |s| {
            s.state = ProviderState::Ok;
            s.consecutive_failures = 0;
            s.last_success_unix_ms = Some(now);
            s.rejected = rejected;
            if let Some(n) = applied {
                s.endpoints = Some(n);
                s.updates += 1;
                s.last_update_unix_ms = Some(now);
            }
        });
    }

    /// An attempt failed.
    pub(crate) fn failed(&self, pool: &str, error: String) {
        let now = unix_ms();
        self.update(pool, |s| {
            s.state = ProviderState::Failing;
            s.failures += 1;
            s.consecutive_failures += 1;
            s.last_error = Some(error);
            s.last_error_unix_ms = Some(now);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_and_successes_are_counted() {
        let board = StatusBoard::new();
        board.succeeded("nobody", Some(1), Vec::new()); // unknown pools are ignored
        board.start("llama", "file", "file x.toml".into());
        assert_eq!(board.get("llama").map(|s| s.state), Some(ProviderState::Starting));
        board.succeeded("llama", Some(2), Vec::new());
        board.failed("llama", "boom".into());
        board.failed("llama", "boom again".into());
        let s = board.get("llama").unwrap();
        assert_eq!((s.state, s.failures, s.consecutive_failures, s.endpoints), (ProviderState::Failing, 2, 2, Some(2)));
        assert_eq!(s.last_error.as_deref(), Some("boom again"));
        board.succeeded("llama", None, vec!["k: bad".into()]);
        let s = board.get("llama").unwrap();
        assert_eq!((s.state, s.consecutive_failures, s.updates), (ProviderState::Ok, 0, 1));
        assert_eq!(s.rejected, ["k: bad"]);
        let json = serde_json::to_value(board.snapshot()).unwrap();
        assert_eq!(json[0]["state"], "ok");
        assert_eq!(json[0]["last_error"], "boom again");
        board.remove("llama");
        assert!(board.snapshot().is_empty());
    }
}
