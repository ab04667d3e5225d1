//! The store in a PostgreSQL server (13 or later), shared by proxies on any number of hosts.
//!
//! The tables are SQLite's, prefixed `fulcrum_batch_`, created at each connection if
//! missing (under an advisory lock, so that proxies starting together do not race). Locks
//! stand in for SQLite's one writer at a time:
//! - a read-modify-write of a batch locks its row (`SELECT ... FOR UPDATE`);
//! - recording outcomes holds the batch row in share mode, and finishing a batch locks it: a
//!   batch is finished only after the outcomes being recorded are in, and only once.
//!
//! One connection, taken in turn, driven by a runtime of its own on the calling thread: the
//! calls stay synchronous, like SQLite's. A connection found closed (the server restarted, a
//! network cut) is opened again at the next call; a server down when the store opens is
//! reached at the first call after it is back. Each call has 30 s; one that takes longer
//! fails with [`StoreError::Timeout`] and its connection is dropped.
//!
//! The connection is plain TCP: run the server on a network the proxies trust, or behind a
//! TLS tunnel. The password comes from the URL, or from `PGPASSWORD` when the URL has none.

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{Done, Finish, PENDING, StoreError, redact};
use crate::object::{Batch, RequestCounts};

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows sent in one statement when a batch is created.
const INSERT_CHUNK: usize = 10_000;

const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7262846914771035904);
CREATE TABLE IF NOT EXISTS fulcrum_batch_files (
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    content BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS fulcrum_batch_batches (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    object TEXT NOT NULL,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fulcrum_batch_items (
    batch TEXT NOT NULL,
    line BIGINT NOT NULL,
    pool TEXT NOT NULL,
    task TEXT NOT NULL,
    state SMALLINT NOT NULL DEFAULT 0,
    result TEXT,
    PRIMARY KEY (batch, line)
);
CREATE INDEX IF NOT EXISTS fulcrum_batch_items_by_state ON fulcrum_batch_items (batch, state, line);
";

const RANDOM_HEX: &str = "SELECT left(md5(gen_random_uuid()::text), 24)";

const COUNTS: &str = "SELECT count(*), count(*) FILTER (WHERE state = 1), count(*) FILTER (WHERE state = 2)
    FROM fulcrum_batch_items WHERE batch = $1";

/// A PostgreSQL database.
pub struct Postgres {
    /// The URL without its password.
    url: String,
    config: tokio_postgres::Config,
    /// Drives the connection, during calls only. Shut down without blocking when dropped (it
    /// may be dropped on an async thread).
    runtime: Option<tokio::runtime::Runtime>,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Postgres {
    /// The store, and the error that kept it from reaching the server now when that may pass
    /// (the server down, the network cut): it connects at the next call. An error that will
    /// not pass (a bad URL, a wrong password, no such database) is returned as such.
    pub(super) fn open(url: &str) -> Result<(Postgres, Option<StoreError>), StoreError> {
        let redacted = redact(url);
        let unusable = |reason: String| StoreError::Unusable { url: redacted.clone(), reason };
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| unusable(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        if config.get_user().is_none() {
            return Err(unusable("names no user (postgres://USER@HOST/DATABASE)".into()));
        }
        config.connect_timeout(CONNECT_TIMEOUT).application_name("fulcrum");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unusable(format!("no runtime for its client: {e}")))?;
        let store = Postgres { url: redacted, config, runtime: Some(runtime), client: Mutex::new(None) };
        // Connects (and creates the tables): on a thread of its own, as the caller may be on
        // an async runtime's thread, where another runtime cannot block.
        let first = std::thread::scope(|scope| {
            scope.spawn(|| store.call(async |_| Ok(()))).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        match first {
            Ok(()) => Ok((store, None)),
            Err(e) if e.is_transient() => Ok((store, Some(e))),
            Err(e) => Err(e),
        }
    }

    fn client(&self) -> MutexGuard<'_, Option<Client>> {
        self.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` with the connection (opened again if it was closed), within [`CALL_TIMEOUT`].
    fn call<T>(&self, f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut slot = self.client();
        let Some(runtime) = &self.runtime else {
            return Err(StoreError::Unusable { url: self.url.clone(), reason: "closed".into() });
        };
        let result = runtime.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, async {
                let client = match &mut *slot {
                    Some(client) if !client.is_closed() => client,
                    slot => {
                        let (client, connection) = self
                            .config
                            .connect(NoTls)
                            .await
                            .map_err(|source| StoreError::Server { url: self.url.clone(), source })?;
                        tokio::spawn(connection);
                        // The tables, if missing (cheap when they are there).
                        client.batch_execute(&format!("BEGIN;{SCHEMA}COMMIT;")).await?;
                        slot.insert(client)
                    }
                };
                f(client).await
            })
            .await
        });
        match result {
            Ok(Err(StoreError::Postgres(source))) => Err(StoreError::Server { url: self.url.clone(), source }),
            Ok(r) => r,
            Err(_) => {
                // The call was abandoned midway: its connection's state is unknown.
                *slot = None;
                Err(StoreError::Timeout { url: self.url.clone(), secs: CALL_TIMEOUT.as_secs() })
            }
        }
    }

    pub(super) fn random_hex(&self) -> Result<String, StoreError> {
        self.call(async |c| Ok(c.query_one(RANDOM_HEX, &[]).await?.get(0)))
    }

    pub(super) fn insert_file(&self, id: &str, object: &str, content: &[u8]) -> Result<(), StoreError> {
        self.call(async |c| {
            c.execute(
                "INSERT INTO fulcrum_batch_files (id, object, content) VALUES ($1, $2, $3)",
                &[&id, &object, &content],
            )
            .await?;
            Ok(())
        })
    }

    pub(super) fn file_object(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.call(async |c| {
            let row = c.query_opt("SELECT object FROM fulcrum_batch_files WHERE id = $1", &[&id]).await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub(super) fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.call(async |c| {
            let row = c.query_opt("SELECT content FROM fulcrum_batch_files WHERE id = $1", &[&id]).await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub(super) fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Vec<String>, StoreError> {
        let (cmp, order, none) = if ascending { (">", "ASC", 0) } else { ("<", "DESC", i64::MAX) };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = format!(
            "SELECT object FROM fulcrum_batch_files
             WHERE seq {cmp} coalesce((SELECT seq FROM fulcrum_batch_files WHERE id = $1), $2)
               AND ($3::text IS NULL OR object::jsonb ->> 'purpose' = $3)
             ORDER BY seq {order} LIMIT $4"
        );
        self.call(async |c| {
            let rows = c.query(&query, &[&after, &none, &purpose, &limit]).await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub(super) fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        self.call(async |c| Ok(c.execute("DELETE FROM fulcrum_batch_files WHERE id = $1", &[&id]).await? > 0))
    }

    pub(super) fn create_batch(
        &self,
        id: &str,
        object: &str,
        spec: &str,
        items: &[(u32, &str, String)],
    ) -> Result<(), StoreError> {
        self.call(async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO fulcrum_batch_batches (id, object, spec) VALUES ($1, $2, $3)",
                &[&id, &object, &spec],
            )
            .await?;
            let insert = tx
                .prepare(
                    "INSERT INTO fulcrum_batch_items (batch, line, pool, task)
                     SELECT $1::text, * FROM unnest($2::bigint[], $3::text[], $4::text[])",
                )
                .await?;
            for chunk in items.chunks(INSERT_CHUNK) {
                let lines: Vec<i64> = chunk.iter().map(|(line, _, _)| i64::from(*line)).collect();
                let pools: Vec<&str> = chunk.iter().map(|(_, pool, _)| *pool).collect();
                let tasks: Vec<&str> = chunk.iter().map(|(_, _, task)| task.as_str()).collect();
                tx.execute(&insert, &[&id, &lines, &pools, &tasks]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    pub(super) fn batch_object(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.call(async |c| {
            let row = c.query_opt("SELECT object FROM fulcrum_batch_batches WHERE id = $1", &[&id]).await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub(super) fn spec(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.call(async |c| {
            let row = c.query_opt("SELECT spec FROM fulcrum_batch_batches WHERE id = $1", &[&id]).await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub(super) fn update_batch(
        &self,
        id: &str,
        change: impl FnOnce(&str) -> Result<(Batch, Option<String>), StoreError>,
    ) -> Result<Option<Batch>, StoreError> {
        self.call(async |c| {
            let tx = c.transaction().await?;
            let row = tx.query_opt("SELECT object FROM fulcrum_batch_batches WHERE id = $1 FOR UPDATE", &[&id]).await?;
            let Some(row) = row else { return Ok(None) };
            let (batch, save) = change(row.get(0))?;
            if let Some(object) = save {
                tx.execute("UPDATE fulcrum_batch_batches SET object = $2 WHERE id = $1", &[&id, &object]).await?;
                tx.commit().await?;
            }
            Ok(Some(batch))
        })
    }

    pub(super) fn save_batch(&self, id: &str, object: &str) -> Result<(), StoreError> {
        self.call(async |c| {
            c.execute("UPDATE fulcrum_batch_batches SET object = $2 WHERE id = $1", &[&id, &object]).await?;
            Ok(())
        })
    }

    pub(super) fn list_batches(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(async |c| {
            let rows = c
                .query(
                    "SELECT object FROM fulcrum_batch_batches
                     WHERE seq < coalesce((SELECT seq FROM fulcrum_batch_batches WHERE id = $1), 9223372036854775807)
                     ORDER BY seq DESC LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub(super) fn all_batches(&self) -> Result<Vec<String>, StoreError> {
        self.call(async |c| {
            let rows = c.query("SELECT object FROM fulcrum_batch_batches ORDER BY seq", &[]).await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub(super) fn pending(
        &self,
        batch: &str,
        after: u32,
        limit: usize,
    ) -> Result<Vec<(u32, String, String)>, StoreError> {
        let (after, limit) = (i64::from(after), i64::try_from(limit).unwrap_or(i64::MAX));
        self.call(async |c| {
            let rows = c
                .query(
                    "SELECT line, pool, task FROM fulcrum_batch_items
                     WHERE batch = $1 AND state = $2 AND line > $3 ORDER BY line LIMIT $4",
                    &[&batch, &PENDING, &after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let line: i64 = r.get(0);
                    let line = u32::try_from(line).map_err(|_| StoreError::Unusable {
                        url: self.url.clone(),
                        reason: format!("item line {line} of batch {batch} is out of range"),
                    })?;
                    Ok((line, r.get(1), r.get(2)))
                })
                .collect()
        })
    }

    pub(super) fn record(&self, batch: &str, done: &[Done]) -> Result<usize, StoreError> {
        // One outcome per line, the first: an UPDATE ... FROM takes any one of several.
        let mut seen = std::collections::HashSet::with_capacity(done.len());
        let done: Vec<&Done> = done.iter().filter(|d| seen.insert(d.line)).collect();
        let lines: Vec<i64> = done.iter().map(|d| i64::from(d.line)).collect();
        let states: Vec<i16> = done.iter().map(|d| d.outcome.state()).collect();
        let results: Vec<&str> = done.iter().map(|d| d.result.as_str()).collect();
        self.call(async |c| {
            let tx = c.transaction().await?;
            // Share mode on the batch: a finalize waits for this transaction (module docs).
            tx.execute("SELECT 1 FROM fulcrum_batch_batches WHERE id = $1 FOR SHARE", &[&batch]).await?;
            let new = tx
                .execute(
                    "UPDATE fulcrum_batch_items AS i SET state = d.state, result = d.result
                     FROM unnest($2::bigint[], $3::smallint[], $4::text[]) AS d(line, state, result)
                     WHERE i.batch = $1 AND i.line = d.line AND i.state = $5",
                    &[&batch, &lines, &states, &results, &PENDING],
                )
                .await?;
            tx.commit().await?;
            Ok(new as usize)
        })
    }

    pub(super) fn counts(&self, batch: &str) -> Result<RequestCounts, StoreError> {
        self.call(async |c| {
            let row = c.query_one(COUNTS, &[&batch]).await?;
            let count = |i: usize| row.get::<_, i64>(i) as u64;
            Ok(RequestCounts { total: count(0), completed: count(1), failed: count(2) })
        })
    }

    pub(super) fn finalize(&self, finish: &mut Finish<'_>) -> Result<(), StoreError> {
        self.call(async |c| {
            let tx = c.transaction().await?;
            let stored = tx
                .query_opt("SELECT object FROM fulcrum_batch_batches WHERE id = $1 FOR UPDATE", &[&finish.id()])
                .await?;
            if finish.finished_already(stored.as_ref().map(|r| r.get(0)))? {
                return Ok(());
            }
            let rows = tx
                .query(
                    "SELECT state, result, task FROM fulcrum_batch_items WHERE batch = $1 ORDER BY line",
                    &[&finish.id()],
                )
                .await?;
            let assembled =
                finish.assemble(rows.iter().map(|r| Ok::<_, StoreError>((r.get(0), r.get(1), r.get(2)))))?;
            let mut ids = [None, None];
            for ((content, name), id) in assembled.files.iter().zip(&mut ids) {
                if content.is_empty() {
                    continue;
                }
                let hex: String = tx.query_one(RANDOM_HEX, &[]).await?.get(0);
                let (file, object) = finish.file_object(&hex, content, name)?;
                tx.execute(
                    "INSERT INTO fulcrum_batch_files (id, object, content) VALUES ($1, $2, $3)",
                    &[&file.id, &object, content],
                )
                .await?;
                *id = Some(file.id);
            }
            let object = finish.close(&assembled, ids)?;
            tx.execute("UPDATE fulcrum_batch_batches SET object = $2 WHERE id = $1", &[&finish.id(), &object]).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
