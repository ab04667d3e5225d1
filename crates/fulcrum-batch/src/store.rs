//! The durable store: files, batches and each request's outcome, in one SQLite database.
//!
//! Every change is a transaction, in write-ahead-log mode: a process killed at any point
//! (`kill -9`) leaves the database as it was after the last commit. A request's outcome is
//! written once, by the update that moves it from pending (`state = 0`) to done; output and
//! error files are made from those rows when the batch finishes. So after a crash a restart
//! sends again only what was still pending (a request in flight at the crash may reach its
//! backend twice), and no `custom_id` is ever written twice.
//!
//! Several processes may share one database file on one host (the proxies of a mesh that
//! take over each other's batches): the write-ahead log lets readers go on while one writes,
//! writers wait for each other (a busy timeout of 10 s), and every transaction that writes
//! takes the write lock when it begins (`BEGIN IMMEDIATE`), so that one that read first never
//! fails because another wrote meanwhile. The write-ahead log needs shared memory: the file
//! must be on a local filesystem of one host, not on a network filesystem.
//!
//! The calls are synchronous and short; an async caller runs them on a blocking thread.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::input::Task;
use crate::object::{Batch, FileObject, RequestCounts, Status};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("batch database {path}: {source}")]
    Open {
        /// Its path.
        path: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A query failed (a full disk, a corrupt file).
    #[error("batch database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored row did not read back (a database written by another program).
    #[error("batch database: bad row: {0}")]
    Row(#[from] serde_json::Error),
}

/// A request's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a 2xx status: the output file.
    Answered,
    /// Answered with another status, or not answered: the error file.
    Failed,
}

/// A pending request.
#[derive(Clone, Debug)]
pub struct Item {
    /// Its line (its key within the batch).
    pub line: u32,
    /// The pool it goes to.
    pub pool: String,
    /// The request.
    pub task: Task,
}

/// One request's outcome and its output or error line.
#[derive(Clone, Debug)]
pub struct Done {
    /// Its line.
    pub line: u32,
    /// Output or error file.
    pub outcome: Outcome,
    /// The line written for it.
    pub result: String,
}

/// Files, batches and requests.
#[derive(Debug)]
pub struct Store {
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

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open = || -> Result<Connection, rusqlite::Error> {
            let conn = Connection::open(path)?;
            Self::prepare(&conn)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    /// A store in memory, gone when dropped (tests).
    pub fn in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        Self::prepare(&conn)?;
        Ok(Store { conn: Mutex::new(conn) })
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

    /// A new random identifier with this prefix (SQLite's own random source).
    pub fn new_id(&self, prefix: &str) -> Result<String, StoreError> {
        let hex: String = self.conn().query_row("SELECT lower(hex(randomblob(12)))", [], |r| r.get(0))?;
        Ok(format!("{prefix}{hex}"))
    }

    /// Stores a file.
    pub fn put_file(&self, purpose: &str, filename: &str, content: &[u8], now: i64) -> Result<FileObject, StoreError> {
        let file = FileObject {
            id: self.new_id("file-")?,
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: now,
            filename: filename.to_owned(),
            purpose: purpose.to_owned(),
        };
        self.conn().execute(
            "INSERT INTO files (id, object, content) VALUES (?1, ?2, ?3)",
            params![file.id, serde_json::to_string(&file)?, content],
        )?;
        Ok(file)
    }

    /// A file's description.
    pub fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        let row: Option<String> =
            self.conn().query_row("SELECT object FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(row.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    /// A file's bytes.
    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.conn().query_row("SELECT content FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    /// Deletes a file; whether it was there.
    pub fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM files WHERE id = ?1", [id])? > 0)
    }

    /// Stores a new batch and its requests (each with the pool it goes to), in one
    /// transaction. `spec` is what runs it (see the proxy's batch runner), kept as JSON.
    pub fn create_batch(&self, batch: &Batch, spec: &str, items: &[(Task, String)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        tx.execute(
            "INSERT INTO batches (id, object, spec) VALUES (?1, ?2, ?3)",
            params![batch.id, serde_json::to_string(batch)?, spec],
        )?;
        {
            let mut insert = tx.prepare("INSERT INTO items (batch, line, pool, task) VALUES (?1, ?2, ?3, ?4)")?;
            for (task, pool) in items {
                insert.execute(params![batch.id, task.line, pool, serde_json::to_string(task)?])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A batch.
    pub fn batch(&self, id: &str) -> Result<Option<Batch>, StoreError> {
        let row: Option<String> =
            self.conn().query_row("SELECT object FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(row.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    /// A batch's runner spec (as given to [`create_batch`](Self::create_batch)).
    pub fn spec(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn().query_row("SELECT spec FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?)
    }

    /// Changes a batch in one transaction, so that another process's change in between is
    /// not overwritten: `change` gets the stored batch and says whether to save it. Returns
    /// the batch as it is after the call (`None`: no such batch).
    pub fn update_batch(&self, id: &str, change: impl FnOnce(&mut Batch) -> bool) -> Result<Option<Batch>, StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let row: Option<String> =
            tx.query_row("SELECT object FROM batches WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let Some(row) = row else { return Ok(None) };
        let mut batch: Batch = serde_json::from_str(&row)?;
        if change(&mut batch) {
            tx.execute("UPDATE batches SET object = ?2 WHERE id = ?1", params![id, serde_json::to_string(&batch)?])?;
            tx.commit()?;
        }
        Ok(Some(batch))
    }

    /// Saves a batch's new state.
    pub fn save_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE batches SET object = ?2 WHERE id = ?1",
            params![batch.id, serde_json::to_string(batch)?],
        )?;
        Ok(())
    }

    /// Batches, newest first, after the one named `after` (OpenAI's cursor); and whether more
    /// follow.
    pub fn list_batches(&self, after: Option<&str>, limit: usize) -> Result<(Vec<Batch>, bool), StoreError> {
        let conn = self.conn();
        let before = match after {
            Some(id) => conn
                .query_row("SELECT seq FROM batches WHERE id = ?1", [id], |r| r.get::<_, i64>(0))
                .optional()?
                .unwrap_or(i64::MAX),
            None => i64::MAX,
        };
        let mut stmt = conn.prepare("SELECT object FROM batches WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2")?;
        let rows = stmt.query_map(params![before, limit as i64 + 1], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str::<Batch>(&row?)?);
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Batches not yet finished (to resume after a restart), oldest first.
    pub fn unfinished(&self) -> Result<Vec<Batch>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT object FROM batches ORDER BY seq")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let b: Batch = serde_json::from_str(&row?)?;
            if !b.status.is_terminal() {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Up to `limit` pending requests after line `after`, in line order.
    pub fn pending(&self, batch: &str, after: u32, limit: usize) -> Result<Vec<Item>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT line, pool, task FROM items WHERE batch = ?1 AND state = 0 AND line > ?2 ORDER BY line LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![batch, after, limit as i64], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (line, pool, task) = row?;
            out.push(Item { line, pool, task: serde_json::from_str(&task)? });
        }
        Ok(out)
    }

    /// Records outcomes, in one transaction; a request already done keeps its first outcome.
    /// Returns how many were new.
    pub fn record(&self, batch: &str, done: &[Done]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let mut new = 0;
        {
            let mut update =
                tx.prepare("UPDATE items SET state = ?3, result = ?4 WHERE batch = ?1 AND line = ?2 AND state = 0")?;
            for d in done {
                let state = match d.outcome {
                    Outcome::Answered => 1,
                    Outcome::Failed => 2,
                };
                new += update.execute(params![batch, d.line, state, d.result])?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// A batch's counts: all requests, answered well, failed.
    pub fn counts(&self, batch: &str) -> Result<RequestCounts, StoreError> {
        let conn = self.conn();
        let (total, completed, failed): (i64, i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(state = 1), 0), coalesce(sum(state = 2), 0) FROM items WHERE batch = ?1",
            [batch],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(RequestCounts { total: total as u64, completed: completed as u64, failed: failed as u64 })
    }

    /// Finishes a batch in one transaction: writes its output and error files from the
    /// recorded outcomes (line order), sets their ids, its counts and `status`. Pending
    /// requests go to the error file with `pending` (a code and message) when given; else
    /// they are left out, as OpenAI leaves out a cancelled batch's unsent requests.
    ///
    /// A batch already finished (by another process sharing the database) stays as it is:
    /// `batch` becomes the stored one.
    pub fn finalize(
        &self,
        batch: &mut Batch,
        status: Status,
        pending: Option<(&str, &str)>,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = Self::write(&mut conn)?;
        let stored: Option<String> =
            tx.query_row("SELECT object FROM batches WHERE id = ?1", [&batch.id], |r| r.get(0)).optional()?;
        if let Some(stored) = stored {
            let stored: Batch = serde_json::from_str(&stored)?;
            if stored.status.is_terminal() {
                *batch = stored;
                return Ok(());
            }
        }
        let mut output = Vec::new();
        let mut errors = Vec::new();
        {
            let mut stmt = tx.prepare("SELECT state, result, task FROM items WHERE batch = ?1 ORDER BY line")?;
            let mut rows = stmt.query([&batch.id])?;
            while let Some(row) = rows.next()? {
                let state: i64 = row.get(0)?;
                let line = match state {
                    1 | 2 => row.get::<_, String>(1)?,
                    _ => match pending {
                        Some((code, message)) => {
                            let task: Task = serde_json::from_str(&row.get::<_, String>(2)?)?;
                            let id = format!("batch_req_{}_{}", batch.id.trim_start_matches("batch_"), task.line);
                            crate::object::failed_line(&id, &task.custom_id, code, message)
                        }
                        None => continue,
                    },
                };
                let file = if state == 1 { &mut output } else { &mut errors };
                file.extend_from_slice(line.as_bytes());
                file.push(b'\n');
            }
        }
        let put = |content: &[u8], name: &str| -> Result<Option<String>, StoreError> {
            if content.is_empty() {
                return Ok(None);
            }
            let id: String = tx.query_row("SELECT lower(hex(randomblob(12)))", [], |r| r.get(0))?;
            let file = FileObject {
                id: format!("file-{id}"),
                object: "file".into(),
                bytes: content.len() as u64,
                created_at: now,
                filename: name.to_owned(),
                purpose: "batch_output".into(),
            };
            tx.execute(
                "INSERT INTO files (id, object, content) VALUES (?1, ?2, ?3)",
                params![file.id, serde_json::to_string(&file)?, content],
            )?;
            Ok(Some(file.id))
        };
        batch.output_file_id = put(&output, &format!("{}_output.jsonl", batch.id))?;
        batch.error_file_id = put(&errors, &format!("{}_error.jsonl", batch.id))?;
        let (total, completed, failed): (i64, i64, i64) = tx.query_row(
            "SELECT count(*), coalesce(sum(state = 1), 0), coalesce(sum(state = 2), 0) FROM items WHERE batch = ?1",
            [&batch.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let unsent = if pending.is_some() { total - completed - failed } else { 0 };
        batch.request_counts =
            RequestCounts { total: total as u64, completed: completed as u64, failed: (failed + unsent) as u64 };
        batch.set_status(status, now);
        tx.execute("UPDATE batches SET object = ?2 WHERE id = ?1", params![batch.id, serde_json::to_string(batch)?])?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Limits, Mode, parse};

    fn tasks(n: usize) -> Vec<(Task, String)> {
        let text: String = (0..n)
            .map(|i| format!("{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{{\"input\":\"{i}\"}}}}\n"))
            .collect();
        let p = parse(text.as_bytes(), Mode::OpenAi { endpoint: "/v1/embeddings" }, &Limits::default());
        assert!(p.errors.is_empty());
        p.tasks.into_iter().map(|t| (t, "p".to_owned())).collect()
    }

    fn done(line: u32, outcome: Outcome) -> Done {
        Done { line, outcome, result: format!("{{\"line\":{line}}}") }
    }

    #[test]
    fn files_round_trip_and_delete() {
        let s = Store::in_memory().unwrap();
        let f = s.put_file("batch", "in.jsonl", b"abc", 7).unwrap();
        assert!(f.id.starts_with("file-") && f.id.len() == 29);
        assert_eq!(s.file(&f.id).unwrap().unwrap(), f);
        assert_eq!(s.file_content(&f.id).unwrap().unwrap(), b"abc");
        assert!(s.delete_file(&f.id).unwrap());
        assert!(!s.delete_file(&f.id).unwrap());
        assert!(s.file(&f.id).unwrap().is_none());
    }

    #[test]
    fn outcomes_are_recorded_once_and_files_hold_each_request_once() {
        let dir = std::env::temp_dir().join(format!("fulcrum-batch-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.db");
        let _ = std::fs::remove_file(&path);
        let s = Store::open(&path).unwrap();
        let mut b =
            Batch::new(s.new_id("batch_").unwrap(), "/v1/embeddings".into(), "f".into(), "24h".into(), None, 0, 60);
        s.create_batch(&b, "{}", &tasks(5)).unwrap();
        assert_eq!(s.pending(&b.id, 0, 2).unwrap().iter().map(|i| i.line).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.record(&b.id, &[done(1, Outcome::Answered), done(2, Outcome::Failed)]).unwrap(), 2);
        // A second outcome for the same request (sent again after a crash) is ignored.
        assert_eq!(s.record(&b.id, &[done(1, Outcome::Failed), done(3, Outcome::Answered)]).unwrap(), 1);
        drop(s);
        // Reopened, as after a restart: what was recorded is there, the rest is pending.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.pending(&b.id, 0, 10).unwrap().iter().map(|i| i.line).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(s.counts(&b.id).unwrap(), RequestCounts { total: 5, completed: 2, failed: 1 });
        s.finalize(&mut b, Status::Expired, Some(("batch_expired", "expired")), 9).unwrap();
        let out = String::from_utf8(s.file_content(b.output_file_id.as_ref().unwrap()).unwrap().unwrap()).unwrap();
        assert_eq!(out, "{\"line\":1}\n{\"line\":3}\n");
        let err = String::from_utf8(s.file_content(b.error_file_id.as_ref().unwrap()).unwrap().unwrap()).unwrap();
        assert_eq!(err.lines().count(), 3);
        assert!(err.contains("\"custom_id\":\"r4\"") && err.contains("batch_expired"));
        assert_eq!(b.request_counts, RequestCounts { total: 5, completed: 2, failed: 3 });
        assert_eq!(s.batch(&b.id).unwrap().unwrap().status, Status::Expired);
        assert!(s.unfinished().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listing_pages_newest_first() {
        let s = Store::in_memory().unwrap();
        let ids: Vec<String> = (0..5)
            .map(|i| {
                let b = Batch::new(
                    s.new_id("batch_").unwrap(),
                    "/v1/embeddings".into(),
                    "f".into(),
                    "24h".into(),
                    None,
                    i,
                    60,
                );
                s.create_batch(&b, "{}", &[]).unwrap();
                b.id
            })
            .collect();
        let (page, more) = s.list_batches(None, 2).unwrap();
        assert!(more);
        assert_eq!(page.iter().map(|b| &b.id).collect::<Vec<_>>(), [&ids[4], &ids[3]]);
        let (page, more) = s.list_batches(Some(&ids[3]), 10).unwrap();
        assert!(!more);
        assert_eq!(page.len(), 3);
        assert_eq!(s.unfinished().unwrap().len(), 5);
    }

    #[test]
    fn two_processes_share_one_file() {
        // Two stores on one file, as two proxies of a mesh: they write at once (outcomes,
        // status changes), and a batch finished by one is not finished again by the other.
        let dir = std::env::temp_dir().join(format!("fulcrum-batch-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shared.db");
        let _ = std::fs::remove_file(&path);
        let (a, b) = (Store::open(&path).unwrap(), Store::open(&path).unwrap());
        let mut batch =
            Batch::new(a.new_id("batch_").unwrap(), "/v1/embeddings".into(), "f".into(), "24h".into(), None, 0, 60);
        a.create_batch(&batch, "{}", &tasks(400)).unwrap();
        std::thread::scope(|scope| {
            for (store, parity) in [(&a, 0u32), (&b, 1u32)] {
                let id = batch.id.clone();
                scope.spawn(move || {
                    for line in (1..=400u32).filter(|l| l % 2 == parity) {
                        store.record(&id, &[done(line, Outcome::Answered)]).unwrap();
                        store.update_batch(&id, |_| true).unwrap();
                        store.counts(&id).unwrap();
                    }
                });
            }
        });
        assert_eq!(b.counts(&batch.id).unwrap(), RequestCounts { total: 400, completed: 400, failed: 0 });
        // A change made on one side is seen by the other's read-modify-write.
        let cancelling = b.update_batch(&batch.id, |x| {
            x.set_status(Status::Cancelling, 5);
            true
        });
        assert_eq!(cancelling.unwrap().unwrap().status, Status::Cancelling);
        let seen = a.update_batch(&batch.id, |_| false).unwrap().unwrap();
        assert_eq!(seen.status, Status::Cancelling);
        a.finalize(&mut batch, Status::Completed, None, 9).unwrap();
        let first_output = batch.output_file_id.clone();
        assert!(first_output.is_some());
        let mut late = batch.clone();
        late.output_file_id = None;
        b.finalize(&mut late, Status::Cancelled, None, 10).unwrap();
        assert_eq!((late.status, late.output_file_id), (Status::Completed, first_output));
        assert!(b.update_batch("batch_none", |_| true).unwrap().is_none());
        drop((a, b));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cancelled_batch_leaves_unsent_requests_out() {
        let s = Store::in_memory().unwrap();
        let mut b =
            Batch::new(s.new_id("batch_").unwrap(), "/v1/embeddings".into(), "f".into(), "24h".into(), None, 0, 60);
        s.create_batch(&b, "{}", &tasks(3)).unwrap();
        s.record(&b.id, &[done(2, Outcome::Answered)]).unwrap();
        s.finalize(&mut b, Status::Cancelled, None, 1).unwrap();
        assert!(b.error_file_id.is_none());
        assert_eq!(b.request_counts, RequestCounts { total: 3, completed: 1, failed: 0 });
    }
}
