//! The durable store: files, batches and each request's outcome, in one database.
//!
//! Two backends keep the same tables and give the same guarantees:
//! - **SQLite** ([`Store::open`], a file; the default): one proxy, or the proxies of a mesh
//!   on one host sharing the file;
//! - **PostgreSQL** ([`Store::open_postgres`], a `postgres://` URL; the cargo feature
//!   `postgres`): the proxies of a mesh on any number of hosts, so that one takes over a
//!   batch of another that died on another machine.
//!
//! Every change is a transaction: a process killed at any point (`kill -9`) leaves the
//! database as it was after the last commit. A request's outcome is written once, by the
//! update that moves it from pending (`state = 0`) to done; output and error files are made
//! from those rows when the batch finishes. So after a crash a restart sends again only what
//! was still pending (a request in flight at the crash may reach its backend twice), and no
//! `custom_id` is ever written twice.
//!
//! Several processes may share one database. A read-modify-write of a batch
//! ([`Store::update_batch`]) locks it, so that another process's change in between is not
//! overwritten, and [`Store::finalize`] never finishes a batch twice: the second caller gets
//! the batch as the first finished it.
//!
//! The calls are synchronous and short; an async caller runs them on a blocking thread.

#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use std::path::Path;

use crate::input::Task;
use crate::object::{Batch, FileObject, RequestCounts, Status};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The SQLite database could not be opened or created.
    #[error("batch database {path}: {source}")]
    Open {
        /// Its path.
        path: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// An SQLite query failed (a full disk, a corrupt file).
    #[error("batch database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The PostgreSQL server could not be reached, refused the connection, dropped it, or
    /// failed a query.
    #[cfg(feature = "postgres")]
    #[error("batch database {url}: {source}")]
    Server {
        /// Its URL, without the password.
        url: String,
        /// The client's error.
        source: tokio_postgres::Error,
    },
    /// A PostgreSQL error before the store names its server: the store returns
    /// [`Server`](Self::Server) instead.
    #[cfg(feature = "postgres")]
    #[doc(hidden)]
    #[error("batch database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The PostgreSQL server did not answer in time.
    #[error("batch database {url}: no answer within {secs} s")]
    Timeout {
        /// Its URL, without the password.
        url: String,
        /// How long it was given.
        secs: u64,
    },
    /// The database named cannot be used (a bad URL, or a backend this build lacks).
    #[error("batch database {url}: {reason}")]
    Unusable {
        /// The database named, without any password.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A stored row did not read back (a database written by another program).
    #[error("batch database: bad row: {0}")]
    Row(#[from] serde_json::Error),
}

impl StoreError {
    /// Whether the call may succeed if made again later: the database server was not
    /// reached, did not answer, dropped the connection, is shutting down or starting, or
    /// gave up a transaction for a conflict. A query or a row at fault is not.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Timeout { .. } => true,
            #[cfg(feature = "postgres")]
            StoreError::Server { source, .. } | StoreError::Postgres(source) => match source.as_db_error() {
                // Not the server's answer: the connection failed.
                None => true,
                // Connection exception, operator intervention (a shutdown), transaction
                // rollback (deadlock, serialization), insufficient resources.
                Some(db) => ["08", "57", "40", "53"].iter().any(|class| db.code().code().starts_with(class)),
            },
            _ => false,
        }
    }
}

/// A request's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a 2xx status: the output file.
    Answered,
    /// Answered with another status, or not answered: the error file.
    Failed,
}

impl Outcome {
    /// Its `state` in the items table (0 is pending).
    fn state(self) -> i16 {
        match self {
            Outcome::Answered => ANSWERED,
            Outcome::Failed => FAILED,
        }
    }
}

/// An item's `state`: not yet done.
const PENDING: i16 = 0;
/// An item's `state`: in the output file.
const ANSWERED: i16 = 1;
/// An item's `state`: in the error file.
const FAILED: i16 = 2;

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
pub enum Store {
    /// In an SQLite file.
    Sqlite(sqlite::Sqlite),
    /// In a PostgreSQL server.
    #[cfg(feature = "postgres")]
    Postgres(Box<postgres::Postgres>),
}

/// Calls the same method on whichever backend.
macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            #[cfg(feature = "postgres")]
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (or creates) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        sqlite::Sqlite::open(path).map(Store::Sqlite)
    }

    /// An SQLite store in memory, gone when dropped (tests).
    pub fn in_memory() -> Result<Store, StoreError> {
        sqlite::Sqlite::in_memory().map(Store::Sqlite)
    }

    /// Connects to the PostgreSQL server at `url` (`postgres://user@host:port/database`; the
    /// password, when the URL has none, from `PGPASSWORD`) and creates the tables if missing.
    ///
    /// A server that cannot be reached now (down, a network cut: [`StoreError::is_transient`])
    /// does not keep the store from opening: the error comes beside it, and the store
    /// connects at the first call after the server is back. A bad URL, a wrong password or a
    /// missing database fail; so does a build without the cargo feature `postgres`.
    pub fn open_postgres(url: &str) -> Result<(Store, Option<StoreError>), StoreError> {
        #[cfg(feature = "postgres")]
        {
            postgres::Postgres::open(url).map(|(p, e)| (Store::Postgres(Box::new(p)), e))
        }
        #[cfg(not(feature = "postgres"))]
        {
            Err(StoreError::Unusable {
                url: redact(url),
                reason: "this build of Fulcrum has no PostgreSQL support (the cargo feature `postgres`)".into(),
            })
        }
    }

    /// A new random identifier with this prefix (24 hexadecimal digits after it).
    pub fn new_id(&self, prefix: &str) -> Result<String, StoreError> {
        Ok(format!("{prefix}{}", each!(self, s => s.random_hex()?)))
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
        let object = serde_json::to_string(&file)?;
        each!(self, s => s.insert_file(&file.id, &object, content))?;
        Ok(file)
    }

    /// A file's description.
    pub fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        let row = each!(self, s => s.file_object(id))?;
        Ok(row.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    /// A file's bytes.
    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        each!(self, s => s.file_content(id))
    }

    /// Files, newest first (or oldest first: `ascending`), of one purpose or all, after the
    /// one named `after` (OpenAI's cursor; an unknown one starts from the first); and whether
    /// more follow.
    pub fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<(Vec<FileObject>, bool), StoreError> {
        page(each!(self, s => s.list_files(purpose, after, limit + 1, ascending))?, limit)
    }

    /// Deletes a file; whether it was there.
    pub fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        each!(self, s => s.delete_file(id))
    }

    /// Stores a new batch and its requests (each with the pool it goes to), in one
    /// transaction. `spec` is what runs it (see the proxy's batch runner), kept as JSON.
    pub fn create_batch(&self, batch: &Batch, spec: &str, items: &[(Task, String)]) -> Result<(), StoreError> {
        let object = serde_json::to_string(batch)?;
        let rows = items
            .iter()
            .map(|(task, pool)| Ok((task.line, pool.as_str(), serde_json::to_string(task)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        each!(self, s => s.create_batch(&batch.id, &object, spec, &rows))
    }

    /// A batch.
    pub fn batch(&self, id: &str) -> Result<Option<Batch>, StoreError> {
        let row = each!(self, s => s.batch_object(id))?;
        Ok(row.map(|s| serde_json::from_str(&s)).transpose()?)
    }

    /// A batch's runner spec (as given to [`create_batch`](Self::create_batch)).
    pub fn spec(&self, id: &str) -> Result<Option<String>, StoreError> {
        each!(self, s => s.spec(id))
    }

    /// Changes a batch in one transaction, so that another process's change in between is
    /// not overwritten: `change` gets the stored batch and says whether to save it. Returns
    /// the batch as it is after the call (`None`: no such batch).
    pub fn update_batch(&self, id: &str, change: impl FnOnce(&mut Batch) -> bool) -> Result<Option<Batch>, StoreError> {
        each!(self, s => s.update_batch(id, |row| {
            let mut batch: Batch = serde_json::from_str(row)?;
            let save = change(&mut batch).then(|| serde_json::to_string(&batch)).transpose()?;
            Ok((batch, save))
        }))
    }

    /// Saves a batch's new state.
    pub fn save_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        let object = serde_json::to_string(batch)?;
        each!(self, s => s.save_batch(&batch.id, &object))
    }

    /// Batches, newest first, after the one named `after` (OpenAI's cursor); and whether more
    /// follow.
    pub fn list_batches(&self, after: Option<&str>, limit: usize) -> Result<(Vec<Batch>, bool), StoreError> {
        page(each!(self, s => s.list_batches(after, limit + 1))?, limit)
    }

    /// Batches not yet finished (to resume after a restart), oldest first.
    pub fn unfinished(&self) -> Result<Vec<Batch>, StoreError> {
        let mut out = Vec::new();
        for row in each!(self, s => s.all_batches())? {
            let b: Batch = serde_json::from_str(&row)?;
            if !b.status.is_terminal() {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Up to `limit` pending requests after line `after`, in line order.
    pub fn pending(&self, batch: &str, after: u32, limit: usize) -> Result<Vec<Item>, StoreError> {
        let rows = each!(self, s => s.pending(batch, after, limit))?;
        rows.into_iter().map(|(line, pool, task)| Ok(Item { line, pool, task: serde_json::from_str(&task)? })).collect()
    }

    /// Records outcomes, in one transaction; a request already done keeps its first outcome
    /// (as does one named twice in `done`). Returns how many were new.
    pub fn record(&self, batch: &str, done: &[Done]) -> Result<usize, StoreError> {
        each!(self, s => s.record(batch, done))
    }

    /// A batch's counts: all requests, answered well, failed.
    pub fn counts(&self, batch: &str) -> Result<RequestCounts, StoreError> {
        each!(self, s => s.counts(batch))
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
        each!(self, s => s.finalize(&mut Finish { batch, status, pending, now }))
    }
}

/// A [`Store::finalize`] call, as the backends carry it out: they lock the batch, read its
/// items in line order into [`Finish::assemble`], store the files it returns under new ids,
/// then [`Finish::close`] the batch and save it.
pub(crate) struct Finish<'a> {
    batch: &'a mut Batch,
    status: Status,
    pending: Option<(&'a str, &'a str)>,
    now: i64,
}

/// The output and error files of a batch being finished, and its counts.
pub(crate) struct Assembled {
    /// (content, file name) of the output file and of the error file; empty contents are not
    /// stored.
    pub files: [(Vec<u8>, String); 2],
    counts: RequestCounts,
}

impl Finish<'_> {
    /// The batch's id.
    pub(crate) fn id(&self) -> &str {
        &self.batch.id
    }

    /// Whether the stored batch (its JSON) is already finished; if so, the caller's batch
    /// becomes it and nothing else is done.
    pub(crate) fn finished_already(&mut self, stored: Option<&str>) -> Result<bool, StoreError> {
        let Some(stored) = stored else { return Ok(false) };
        let stored: Batch = serde_json::from_str(stored)?;
        if !stored.status.is_terminal() {
            return Ok(false);
        }
        *self.batch = stored;
        Ok(true)
    }

    /// The files and counts, from the batch's items in line order: (state, result, task).
    pub(crate) fn assemble<E>(
        &self,
        rows: impl IntoIterator<Item = Result<(i16, Option<String>, String), E>>,
    ) -> Result<Assembled, StoreError>
    where
        StoreError: From<E>,
    {
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let mut counts = RequestCounts::default();
        for row in rows {
            let (state, result, task) = row?;
            counts.total += 1;
            let (line, answered) = match (state, result) {
                (ANSWERED, Some(result)) => (result, true),
                (FAILED, Some(result)) => (result, false),
                _ => match self.pending {
                    Some((code, message)) => {
                        let task: Task = serde_json::from_str(&task)?;
                        let id = format!("batch_req_{}_{}", self.batch.id.trim_start_matches("batch_"), task.line);
                        (crate::object::failed_line(&id, &task.custom_id, code, message), false)
                    }
                    None => continue,
                },
            };
            let file = if answered {
                counts.completed += 1;
                &mut output
            } else {
                counts.failed += 1;
                &mut errors
            };
            file.extend_from_slice(line.as_bytes());
            file.push(b'\n');
        }
        let id = &self.batch.id;
        Ok(Assembled { files: [(output, format!("{id}_output.jsonl")), (errors, format!("{id}_error.jsonl"))], counts })
    }

    /// The file object of an output or error file stored under `id` (`file-` and 24
    /// hexadecimal digits), and its JSON.
    pub(crate) fn file_object(
        &self,
        hex: &str,
        content: &[u8],
        name: &str,
    ) -> Result<(FileObject, String), StoreError> {
        let file = FileObject {
            id: format!("file-{hex}"),
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: self.now,
            filename: name.to_owned(),
            purpose: "batch_output".into(),
        };
        let json = serde_json::to_string(&file)?;
        Ok((file, json))
    }

    /// Sets the batch's file ids, counts and status; returns its JSON, to save.
    pub(crate) fn close(&mut self, assembled: &Assembled, ids: [Option<String>; 2]) -> Result<String, StoreError> {
        let [output, error] = ids;
        self.batch.output_file_id = output;
        self.batch.error_file_id = error;
        self.batch.request_counts = assembled.counts;
        self.batch.set_status(self.status, self.now);
        Ok(serde_json::to_string(&*self.batch)?)
    }
}

/// Up to `limit` objects of a listing read with one more row than that (JSON), and whether
/// more follow.
fn page<T: serde::de::DeserializeOwned>(rows: Vec<String>, limit: usize) -> Result<(Vec<T>, bool), StoreError> {
    let more = rows.len() > limit;
    let out = rows.iter().take(limit).map(|r| serde_json::from_str(r)).collect::<Result<_, _>>()?;
    Ok((out, more))
}

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
