//! `[batch]`: offline batches (the OpenAI Batch API on HTTP listeners, and `fulcrum batch`).
//!
//! ```toml
//! [batch]
//! database = "fulcrum-batch.db"   # SQLite file (relative to this file); created if missing,
//!                                 # or a PostgreSQL server: "postgres://USER@HOST:PORT/DATABASE"
//! max_file_bytes = 209715200      # largest upload (200 MiB)
//! max_requests = 50000            # requests in one batch
//! max_in_flight = 64              # batch requests in flight per pool, at most (default: 4 per endpoint)
//! max_attempts = 3                # sends of one request before it goes to the error file
//! engine_priority = 10            # engines schedule by priority: batch requests carry this one
//! lease_ttl = "10s"               # mesh mode: how long a dead proxy keeps its batches
//! ```
//!
//! Without the section the proxy serves no batch API: `/v1/files` and `/v1/batches` are
//! routed like any other path (to a provider that has them, say). With it, every field has a
//! default: `[batch]` alone is enough. Settings change only at a restart.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default database file name, in the configuration file's directory.
pub const DEFAULT_DATABASE: &str = "fulcrum-batch.db";

/// Where files, batches and each request's outcome are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file: one proxy, or proxies on one host sharing it.
    File(PathBuf),
    /// A PostgreSQL server's URL (`postgres://` or `postgresql://`): proxies on any hosts
    /// share it.
    Postgres(String),
}

impl Database {
    /// Reads `database`: a URL with a PostgreSQL scheme, else a file path.
    fn parse(text: &str) -> Result<Database, String> {
        if text.is_empty() {
            return Err("must be a file path or a postgres:// URL".into());
        }
        let scheme = text.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Database::Postgres(text.to_owned())),
            Some(other) if !other.contains(['/', '\\']) => Err(format!(
                "`{other}://` is not a database this proxy keeps batches in: use a file path or postgres://"
            )),
            _ => Ok(Database::File(PathBuf::from(text))),
        }
    }
}

/// Batch settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// The database of files, batches and each request's outcome.
    pub database: Database,
    /// The largest file a client may upload.
    pub max_file_bytes: usize,
    /// Requests in one batch.
    pub max_requests: usize,
    /// Batch requests in flight on one pool at most; `None`: four per endpoint.
    pub max_in_flight: Option<u32>,
    /// Sends of one request (the first and the retries) before it fails for good.
    pub max_attempts: u32,
    /// The engines schedule by priority (vLLM's `--scheduling-policy priority`, SGLang's
    /// `--enable-priority-scheduling`): batch requests' bodies carry this `priority` (lower
    /// runs first; interactive requests have 0), so that an engine runs them only in its
    /// gaps and preempts them for interactive ones; the batches may then fill the engines'
    /// batch slots. `None`: the engines are first come, first served.
    pub engine_priority: Option<i32>,
    /// Mesh mode (`fulcrum serve --control etcd://...`) with proxies sharing one database (a
    /// file on one host, or a PostgreSQL server):
    /// the TTL of the etcd lease under which a proxy holds the batches it runs. A proxy that
    /// dies keeps them this long at most before another takes them over.
    pub lease_ttl: Duration,
}

/// The lease TTL unless `lease_ttl` says otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The shortest lease TTL: etcd's own minimum is about 2 s.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// The longest lease TTL.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(600);

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            database: Database::File(PathBuf::from(DEFAULT_DATABASE)),
            max_file_bytes: 200 << 20,
            max_requests: 50_000,
            max_in_flight: None,
            max_attempts: 3,
            engine_priority: None,
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// `[batch]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBatch {
    pub database: Option<String>,
    pub max_file_bytes: Option<usize>,
    pub max_requests: Option<usize>,
    pub max_in_flight: Option<u32>,
    pub max_attempts: Option<u32>,
    pub engine_priority: Option<i32>,
    pub lease_ttl: Option<String>,
}

/// Hard ceilings on what the section may set.
const MAX_FILE_BYTES: usize = 1 << 30;
const MAX_REQUESTS: usize = 1_000_000;

impl RawBatch {
    /// The typed settings, or each field's error (`field`, message).
    pub(crate) fn validate(self, dir: Option<&std::path::Path>) -> Result<BatchConfig, Vec<(String, String)>> {
        let d = BatchConfig::default();
        let mut errors = Vec::new();
        let mut range = |field: &str, v: Option<usize>, max: usize, default: usize| match v {
            Some(v) if v == 0 || v > max => {
                errors.push((field.to_owned(), format!("must be from 1 to {max}, got {v}")));
                default
            }
            Some(v) => v,
            None => default,
        };
        let max_file_bytes = range("max_file_bytes", self.max_file_bytes, MAX_FILE_BYTES, d.max_file_bytes);
        let max_requests = range("max_requests", self.max_requests, MAX_REQUESTS, d.max_requests);
        let max_in_flight = self.max_in_flight.map(|v| range("max_in_flight", Some(v as usize), 65_536, 1) as u32);
        let max_attempts = range("max_attempts", self.max_attempts.map(|v| v as usize), 100, 3) as u32;
        if let Some(p) = self.engine_priority
            && p <= 0
        {
            let msg = format!("must be above 0 (interactive requests have priority 0; lower runs first), got {p}");
            errors.push(("engine_priority".to_owned(), msg));
        }
        let lease_ttl = match self.lease_ttl.as_deref().map(crate::duration::parse_duration) {
            None => d.lease_ttl,
            Some(Ok(t)) if (MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&t) && t.subsec_nanos() == 0 => t,
            Some(Ok(_)) => {
                errors
                    .push(("lease_ttl".to_owned(), "must be whole seconds from 2s (etcd's minimum) to 10m".to_owned()));
                d.lease_ttl
            }
            Some(Err(e)) => {
                errors.push(("lease_ttl".to_owned(), e));
                d.lease_ttl
            }
        };
        let database = match self.database.as_deref().map(Database::parse) {
            None => d.database.clone(),
            Some(Ok(db)) => db,
            Some(Err(e)) => {
                errors.push(("database".to_owned(), e));
                d.database.clone()
            }
        };
        let database = match (dir, database) {
            (Some(dir), Database::File(path)) if path.is_relative() => Database::File(dir.join(path)),
            (_, database) => database,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let engine_priority = self.engine_priority;
        Ok(BatchConfig {
            database,
            max_file_bytes,
            max_requests,
            max_in_flight,
            max_attempts,
            engine_priority,
            lease_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn batch_settings_parse_and_bad_ones_name_their_field() {
        let ok = Config::parse("[batch]\nengine_priority = 10\nmax_in_flight = 32\n", None).unwrap();
        let batch = ok.batch.unwrap();
        assert_eq!((batch.engine_priority, batch.max_in_flight), (Some(10), Some(32)));
        let defaults = Config::parse("[batch]\n", None).unwrap().batch.unwrap();
        assert_eq!((defaults.engine_priority, defaults.lease_ttl), (None, super::DEFAULT_LEASE_TTL));
        let ttl = Config::parse("[batch]\nlease_ttl = \"3s\"\n", None).unwrap().batch.unwrap().lease_ttl;
        let dir = std::path::Path::new("/etc/fulcrum");
        for (text, db) in [
            ("postgres://f@db:5432/b", super::Database::Postgres("postgres://f@db:5432/b".into())),
            ("PostgreSQL://f@db/b", super::Database::Postgres("PostgreSQL://f@db/b".into())),
            ("state/b.db", super::Database::File(dir.join("state/b.db"))),
            ("/var/b.db", super::Database::File("/var/b.db".into())),
        ] {
            let file = dir.join("fulcrum.toml");
            let parsed = Config::parse(&format!("[batch]\ndatabase = \"{text}\"\n"), Some(&file)).unwrap();
            assert_eq!(parsed.batch.unwrap().database, db, "{text}");
        }
        assert_eq!(ttl, std::time::Duration::from_secs(3));
        for (text, field) in [
            ("engine_priority = 0", "engine_priority"),
            ("engine_priority = -3", "engine_priority"),
            ("max_attempts = 0", "max_attempts"),
            ("max_file_bytes = 0", "max_file_bytes"),
            ("lease_ttl = \"1s\"", "lease_ttl"),
            ("lease_ttl = \"2.5s\"", "lease_ttl"),
            ("lease_ttl = \"10\"", "lease_ttl"),
            ("database = \"\"", "database"),
            ("database = \"mysql://db/b\"", "database"),
        ] {
            let err = Config::parse(&format!("[batch]\n{text}\n"), None).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
