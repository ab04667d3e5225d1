//! The store in an SQLite file, in write-ahead-log mode.
//!
//! Several processes may share one file on one host (the proxies of a mesh that take over
//! each other's batches): the write-ahead log lets readers go on while one writes, writers
//! wait for each other (a busy timeout of 10 s), and every transaction that writes takes the
//! write lock when it begins (`BEGIN IMMEDIATE`), so that one that read first never fails
//! because another wrote meanwhile. The write-ahead log needs shared memory: the file must be
//! on a local filesystem of one host, not on a network filesystem. Proxies on several hosts
//! share a PostgreSQL server instead.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Done, Finish, PENDING, StoreError};
use crate::object::{Batch, RequestCounts};

/// An SQLite database (one connection, taken in turn).
#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    object TEXT NOT NULL,
    spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    batch TEXT NOT NULL,
    line INTEGER NOT NULL,
    pool TEXT NOT NULL,
    task TEXT NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    PRIMARY KEY (batch, line)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_state ON items (batch, state, line);
";

const COUNTS: &str =
    "SELECT count(*), coalesce(sum(state = 1), 0), coalesce(sum(state = 2), 0) FROM items WHERE batch = ?1";

impl Sqlite {
    pub(super) fn open(path: &Path) -> Result<Sqlite, StoreError> {
        let open = || -> Result<Connection, rusqlite::Error> {
            let conn = Connection::open(path)?;
            Self::prepare(&conn)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Ok(Sqlite { conn: Mutex::new(conn) })
    }

    pub(super) fn in_memory() -> Result<Sqlite, StoreError> {
        let conn = Connection::open_in_memory()?;
        Self::prepare(&conn)?;
        Ok(Sqlite { conn: Mutex::new(conn) })
    }

    fn prepare(conn: &Connection) -> Result<(), rusqlite::Error> {
        // WAL with NORMAL sync: a commit survives the process being killed; only a power cut
        // may lose the last commits, never corrupt the file.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A transaction that holds the write lock from its start (see the module docs).
    fn write(conn: &mut Connection) -> Result<Transaction<'_>, rusqlite::Error> {
        conn.transaction_with_behavior(TransactionBehavior::Immediate)
    }

    fn random_hex_in(conn: &Connection) -> Result<String, rusqlite::Error> {
        conn.query_row("SELECT lower(hex(randomblob(12)))", [], |r| r.get(0))
    }

    pub(super) fn random_hex(&self) -> Result<String, StoreError> {
        Ok(Self::random_hex_in(&self.conn())?)
    }

    pub(super) fn insert_file(&self, id: &str, object: &str, content: &[u8]) -> Result<(), StoreError> {
        self.conn()
            .execute("INSERT INTO files (id, object, content) VALUES (?1, ?2, ?3)", params![id, object, content])?;
        Ok(())
    }

    pub(super) fn file_object(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn().query_row("SELECT object FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    pub(super) fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.conn().query_row("SELECT content FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    pub(super) fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Vec<String>, StoreError> {
        // Upload order is rowid order (the table has a rowid; ids are random).
        let (cmp, order, none) = if ascending { (">", "ASC", 0) } else { ("<", "DESC", i64::MAX) };
        let conn = self.conn();
        let from = match after {
            Some(id) => {
                conn.query_row("SELECT rowid FROM files WHERE id = ?1", [id], |r| r.get::<_, i64>(0)).optional()?
            }
            None => None,
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT object FROM files WHERE rowid {cmp} ?1 AND (?2 IS NULL OR json_extract(object, '$.purpose') = ?2)
             ORDER BY rowid {order} LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![from.unwrap_or(none), purpose, limit as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM files WHERE id = ?1", [id])? > 0)
    }

    pub(super) fn create_batch(
        &self,
        id: &str,
        object: &str,
        spec: &str,
        items: &[(u32, &str, String)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        tx.execute("INSERT INTO batches (id, object, spec) VALUES (?1, ?2, ?3)", params![id, object, spec])?;
        {
            let mut insert = tx.prepare("INSERT INTO items (batch, line, pool, task) VALUES (?1, ?2, ?3, ?4)")?;
            for (line, pool, task) in items {
                insert.execute(params![id, line, pool, task])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub(super) fn batch_object(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn().query_row("SELECT object FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    pub(super) fn spec(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn().query_row("SELECT spec FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    pub(super) fn update_batch(
        &self,
        id: &str,
        change: impl FnOnce(&str) -> Result<(Batch, Option<String>), StoreError>,
    ) -> Result<Option<Batch>, StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let row: Option<String> =
            tx.query_row("SELECT object FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let Some(row) = row else { return Ok(None) };
        let (batch, save) = change(&row)?;
        if let Some(object) = save {
            tx.execute("UPDATE batches SET object = ?2 WHERE id = ?1", params![id, object])?;
            tx.commit()?;
        }
        Ok(Some(batch))
    }

    pub(super) fn save_batch(&self, id: &str, object: &str) -> Result<(), StoreError> {
        self.conn().execute("UPDATE batches SET object = ?2 WHERE id = ?1", params![id, object])?;
        Ok(())
    }

    pub(super) fn list_batches(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let before = match after {
            Some(id) => conn
                .query_row("SELECT seq FROM batches WHERE id = ?1", [id], |r| r.get::<_, i64>(0))
                .optional()?
                .unwrap_or(i64::MAX),
            None => i64::MAX,
        };
        let mut stmt = conn.prepare("SELECT object FROM batches WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2")?;
        let rows = stmt.query_map(params![before, limit as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn all_batches(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT object FROM batches ORDER BY seq")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn pending(
        &self,
        batch: &str,
        after: u32,
        limit: usize,
    ) -> Result<Vec<(u32, String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT line, pool, task FROM items WHERE batch = ?1 AND state = ?2 AND line > ?3 ORDER BY line LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![batch, PENDING, after, limit as i64], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn record(&self, batch: &str, done: &[Done]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let mut new = 0;
        {
            let mut update =
                tx.prepare("UPDATE items SET state = ?3, result = ?4 WHERE batch = ?1 AND line = ?2 AND state = ?5")?;
            for d in done {
                new += update.execute(params![batch, d.line, d.outcome.state(), d.result, PENDING])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    pub(super) fn counts(&self, batch: &str) -> Result<RequestCounts, StoreError> {
        Ok(Self::counts_in(&self.conn(), batch)?)
    }

    fn counts_in(conn: &Connection, batch: &str) -> Result<RequestCounts, rusqlite::Error> {
        let (total, completed, failed): (i64, i64, i64) =
            conn.query_row(COUNTS, [batch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(RequestCounts { total: total as u64, completed: completed as u64, failed: failed as u64 })
    }

    pub(super) fn finalize(&self, finish: &mut Finish<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let stored: Option<String> =
            tx.query_row("SELECT object FROM batches WHERE id = ?1", [finish.id()], |r| r.get(0)).optional()?;
        if finish.finished_already(stored.as_deref())? {
            return Ok(());
        }
        let assembled = {
            let mut stmt = tx.prepare("SELECT state, result, task FROM items WHERE batch = ?1 ORDER BY line")?;
            let rows = stmt.query_map([finish.id()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            finish.assemble(rows)?
        };
        let mut ids = [None, None];
        for ((content, name), id) in assembled.files.iter().zip(&mut ids) {
            if content.is_empty() {
                continue;
            }
            let (file, object) = finish.file_object(&Self::random_hex_in(&tx)?, content, name)?;
            tx.execute(
                "INSERT INTO files (id, object, content) VALUES (?1, ?2, ?3)",
                params![file.id, object, content],
            )?;
            *id = Some(file.id);
        }
        let object = finish.close(&assembled, ids)?;
        tx.execute("UPDATE batches SET object = ?2 WHERE id = ?1", params![finish.id(), object])?;
        tx.commit()?;
        Ok(())
    }
}
