//! Each test runs on every backend: an SQLite file and, with the `postgres` feature, a
//! PostgreSQL server of the test's own (Debian's package; a failure under CI if missing).

use std::path::PathBuf;

use super::*;
use crate::input::{Limits, Mode, parse};

/// A database to open stores on, removed when dropped.
enum Db {
    File(PathBuf),
    /// The server (stopped when dropped) and the database's URL.
    #[cfg(feature = "postgres")]
    Postgres(#[allow(dead_code)] fulcrum_testkit::postgres::Postgres, String),
}

impl Db {
    /// Opens a store on it (again: as another process, or after a restart).
    fn open(&self) -> Store {
        match self {
            Db::File(dir) => Store::open(&dir.join("b.db")).unwrap(),
            #[cfg(feature = "postgres")]
            Db::Postgres(_, url) => {
                let (store, unreachable) = Store::open_postgres(url).unwrap();
                assert!(unreachable.is_none(), "{unreachable:?}");
                store
            }
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        #[allow(irrefutable_let_patterns)] // without the `postgres` feature
        if let Db::File(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// An SQLite file and a PostgreSQL database (when the server is installed).
fn databases(tag: &str) -> Vec<Db> {
    let dir = std::env::temp_dir().join(format!("fulcrum-batch-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    #[allow(unused_mut)]
    let mut dbs = vec![Db::File(dir)];
    #[cfg(feature = "postgres")]
    if let Some(pg) = fulcrum_testkit::postgres::Postgres::start() {
        let url = pg.database("batches");
        dbs.push(Db::Postgres(pg, url));
    }
    dbs
}

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

fn new_batch(s: &Store, created_at: i64) -> Batch {
    Batch::new(s.new_id("batch_").unwrap(), "/v1/embeddings".into(), "f".into(), "24h".into(), None, created_at, 60)
}

fn text(s: &Store, file: Option<&String>) -> String {
    String::from_utf8(s.file_content(file.unwrap()).unwrap().unwrap()).unwrap()
}

#[test]
fn files_round_trip_and_delete() {
    for db in databases("files") {
        let s = db.open();
        let f = s.put_file("batch", "in.jsonl", b"abc", 7).unwrap();
        assert!(f.id.starts_with("file-") && f.id.len() == 29, "{s:?}: {}", f.id);
        assert_eq!(s.file(&f.id).unwrap().unwrap(), f);
        assert_eq!(s.file_content(&f.id).unwrap().unwrap(), b"abc");
        assert!(s.delete_file(&f.id).unwrap());
        assert!(!s.delete_file(&f.id).unwrap());
        assert!(s.file(&f.id).unwrap().is_none());
    }
}

#[test]
fn files_list_in_upload_order_by_purpose_and_page() {
    for db in databases("file-list") {
        let s = db.open();
        let ids: Vec<String> = (0..5)
            .map(|i| s.put_file(if i == 2 { "batch_output" } else { "batch" }, "f", b"x", i).unwrap().id)
            .collect();
        let list = |purpose, after, limit, ascending| {
            let (files, more) = s.list_files(purpose, after, limit, ascending).unwrap();
            (files.into_iter().map(|f| f.id).collect::<Vec<_>>(), more)
        };
        assert_eq!(list(None, None, 10, false), (ids.iter().rev().cloned().collect(), false), "{s:?}");
        assert_eq!(list(None, None, 2, true), (ids[..2].to_vec(), true), "{s:?}");
        assert_eq!(list(None, Some(ids[1].as_str()), 2, true), (ids[2..4].to_vec(), true), "{s:?}");
        let batch_only = list(Some("batch"), Some(ids[4].as_str()), 10, false);
        assert_eq!(batch_only, (vec![ids[3].clone(), ids[1].clone(), ids[0].clone()], false), "{s:?}");
        assert_eq!(list(Some("batch_output"), None, 10, true), (vec![ids[2].clone()], false), "{s:?}");
        assert_eq!(list(Some("none"), None, 10, true), (vec![], false), "{s:?}");
    }
}

#[test]
fn outcomes_are_recorded_once_and_files_hold_each_request_once() {
    for db in databases("outcomes") {
        let s = db.open();
        let mut b = new_batch(&s, 0);
        s.create_batch(&b, "{}", &tasks(5)).unwrap();
        assert_eq!(s.pending(&b.id, 0, 2).unwrap().iter().map(|i| i.line).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.record(&b.id, &[done(1, Outcome::Answered), done(2, Outcome::Failed)]).unwrap(), 2);
        // A second outcome for the same request (sent again after a crash) is ignored, as is
        // a request named twice in one call.
        assert_eq!(s.record(&b.id, &[done(1, Outcome::Failed), done(3, Outcome::Answered)]).unwrap(), 1);
        assert_eq!(s.record(&b.id, &[done(5, Outcome::Failed), done(5, Outcome::Answered)]).unwrap(), 1);
        drop(s);
        // Reopened, as after a restart: what was recorded is there, the rest is pending.
        let s = db.open();
        assert_eq!(s.pending(&b.id, 0, 10).unwrap().iter().map(|i| i.line).collect::<Vec<_>>(), [4]);
        assert_eq!(s.counts(&b.id).unwrap(), RequestCounts { total: 5, completed: 2, failed: 2 });
        s.finalize(&mut b, Status::Expired, Some(("batch_expired", "expired")), 9).unwrap();
        assert_eq!(text(&s, b.output_file_id.as_ref()), "{\"line\":1}\n{\"line\":3}\n");
        let err = text(&s, b.error_file_id.as_ref());
        assert_eq!(err.lines().count(), 3, "{s:?}: {err}");
        assert!(err.contains("\"custom_id\":\"r3\"") && err.contains("batch_expired"), "{s:?}: {err}");
        assert!(err.ends_with("{\"line\":5}\n"), "{s:?}: the failed line, first outcome: {err}");
        assert_eq!(b.request_counts, RequestCounts { total: 5, completed: 2, failed: 3 });
        let output = s.file(b.output_file_id.as_ref().unwrap()).unwrap().unwrap();
        assert_eq!((output.purpose.as_str(), output.bytes, output.created_at), ("batch_output", 22, 9));
        assert_eq!(s.batch(&b.id).unwrap().unwrap().status, Status::Expired);
        assert!(s.unfinished().unwrap().is_empty());
    }
}

#[test]
fn listing_pages_newest_first() {
    for db in databases("listing") {
        let s = db.open();
        let ids: Vec<String> = (0..5)
            .map(|i| {
                let b = new_batch(&s, i);
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
        assert_eq!(s.spec(&ids[0]).unwrap().as_deref(), Some("{}"));
    }
}

#[test]
fn two_processes_share_one_database() {
    // Two stores on one database, as two proxies of a mesh: they write at once (outcomes,
    // status changes), and a batch finished by one is not finished again by the other.
    for db in databases("shared") {
        let (a, b) = (db.open(), db.open());
        let mut batch = new_batch(&a, 0);
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
    }
}

#[test]
fn a_cancelled_batch_leaves_unsent_requests_out() {
    for db in databases("cancelled") {
        let s = db.open();
        let mut b = new_batch(&s, 0);
        s.create_batch(&b, "{}", &tasks(3)).unwrap();
        s.record(&b.id, &[done(2, Outcome::Answered)]).unwrap();
        s.finalize(&mut b, Status::Cancelled, None, 1).unwrap();
        assert!(b.error_file_id.is_none());
        assert_eq!(b.request_counts, RequestCounts { total: 3, completed: 1, failed: 0 });
    }
}

#[test]
fn a_large_batch_is_created_in_one_transaction() {
    // More requests than PostgreSQL's store sends in one statement.
    for db in databases("large") {
        let s = db.open();
        let b = new_batch(&s, 0);
        s.create_batch(&b, "{}", &tasks(25_001)).unwrap();
        assert_eq!(s.counts(&b.id).unwrap().total, 25_001);
        let last = s.pending(&b.id, 25_000, 10).unwrap();
        assert_eq!((last.len(), last[0].task.custom_id.as_str()), (1, "r25000"));
    }
}

#[test]
fn passwords_are_left_out_of_messages() {
    assert_eq!(redact("postgres://u:secret@db.example:5432/b?x=1"), "postgres://u:***@db.example:5432/b?x=1");
    assert_eq!(redact("postgres://u@db/b"), "postgres://u@db/b");
    assert_eq!(redact("/var/lib/fulcrum/b.db"), "/var/lib/fulcrum/b.db");
}

#[cfg(feature = "postgres")]
#[test]
fn a_bad_postgres_url_or_an_unreachable_server_names_what_is_wrong() {
    let e = Store::open_postgres("postgres://u:pw@127.0.0.1:1/b?sslmode=bogus").unwrap_err().to_string();
    assert!(e.contains("not a PostgreSQL URL") && e.contains("u:***@") && !e.contains("pw"), "{e}");
    let e = Store::open_postgres("postgres://127.0.0.1:1/b").unwrap_err().to_string();
    assert!(e.contains("names no user"), "{e}");
    // Port 1: nothing listens there. The store opens, and says why it has no connection.
    let (s, e) = Store::open_postgres("postgres://u:pw@127.0.0.1:1/b").unwrap();
    let e = e.expect("no server").to_string();
    assert!(e.starts_with("batch database postgres://u:***@127.0.0.1:1/b: ") && !e.contains("pw"), "{e}");
    let e = s.counts("batch_x").unwrap_err();
    assert!(e.is_transient() && e.to_string().starts_with("batch database postgres://u:***@"), "{e}");
    // A server that answers with a refusal that will not pass fails the open.
    let Some(pg) = fulcrum_testkit::postgres::Postgres::start() else { return };
    let e = Store::open_postgres(&format!("postgres://fulcrum@127.0.0.1:{}/nosuch", pg.port)).unwrap_err();
    assert!(!e.is_transient() && e.to_string().contains("nosuch"), "{e}");
}

#[cfg(feature = "postgres")]
#[test]
fn a_store_opened_while_the_server_is_down_connects_when_it_is_back() {
    let Some(mut pg) = fulcrum_testkit::postgres::Postgres::start() else { return };
    let url = pg.database("later");
    pg.stop();
    let (s, e) = Store::open_postgres(&url).unwrap();
    assert!(e.is_some_and(|e| e.is_transient()));
    pg.restart();
    // The tables are created at the first connection.
    let b = new_batch(&s, 0);
    s.create_batch(&b, "{}", &tasks(2)).unwrap();
    assert_eq!(s.counts(&b.id).unwrap().total, 2);
}

#[cfg(feature = "postgres")]
#[test]
fn a_store_reconnects_after_the_server_restarts() {
    let Some(mut pg) = fulcrum_testkit::postgres::Postgres::start() else { return };
    let url = pg.database("restart");
    let (s, _) = Store::open_postgres(&url).unwrap();
    let b = new_batch(&s, 0);
    s.create_batch(&b, "{}", &tasks(3)).unwrap();
    pg.restart();
    // The old connection is gone: the first call may fail, the next one reconnects.
    let _ = s.counts(&b.id);
    assert_eq!(s.counts(&b.id).unwrap().total, 3);
    pg.stop();
    // Server gone: the first call finds the connection closed; the next tries to open one
    // and says to what.
    let _ = s.counts(&b.id);
    let e = s.counts(&b.id).unwrap_err().to_string();
    assert!(e.starts_with(&format!("batch database {url}: ")), "{e}");
}
