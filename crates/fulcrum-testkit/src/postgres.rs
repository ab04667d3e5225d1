//! A PostgreSQL server of a test's own, on loopback: a new cluster in a temporary directory
//! (`initdb`), trusting local connections, stopped by its PID when dropped.
//!
//! The binaries come from `FULCRUM_POSTGRES_BIN` (a directory), else Debian's
//! `/usr/lib/postgresql/<version>/bin` (package `postgresql`, installed by
//! `scripts/install-test-deps.sh`), else `PATH`. PostgreSQL refuses to run as root: as root,
//! the server runs as the `postgres` user the package creates (through `setpriv`, which
//! execs, so the PID is the server's).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A running server; its superuser is `fulcrum`, with no password.
#[derive(Debug)]
pub struct Postgres {
    child: Option<Child>,
    dir: PathBuf,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Whether it runs as the `postgres` user (the tests run as root).
    as_postgres: bool,
}

/// Says the test cannot run: a failure when CI is set, else a SKIPPED line.
fn skip_or_fail(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why} (CI is set, so this is a failure; run scripts/install-test-deps.sh)"
    );
    println!("SKIPPED: {why}");
}

/// The directory of PostgreSQL's server binaries, if any.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FULCRUM_POSTGRES_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let status = Command::new("initdb").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    status.is_ok().then(PathBuf::new)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

impl Postgres {
    /// Starts a server, or returns `None` (after a SKIPPED line; a failure under CI) when
    /// PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            skip_or_fail("PostgreSQL's server is not installed (Debian package postgresql)");
            return None;
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fulcrum-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let as_postgres = is_root();
        let mut pg = Postgres { child: None, dir, bin, port: 0, as_postgres };
        if as_postgres {
            let status = Command::new("chown").arg("postgres:postgres").arg(&pg.dir).status().expect("run chown");
            assert!(status.success(), "chown postgres {} (is the `postgres` user there?)", pg.dir.display());
        }
        let data = pg.dir.join("data");
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "fulcrum", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // Another process may take the port between the pick and the bind: try a few.
        for _ in 0..5 {
            pg.port = free_port();
            pg.spawn();
            if pg.wait_ready() {
                return Some(pg);
            }
            pg.stop();
        }
        panic!("PostgreSQL did not start in 5 attempts; its log:\n{}", pg.log());
    }

    /// A command for one of the server's binaries, as the user the server runs as.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("postgres.log")).expect("log file");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
    }

    /// Waits until it accepts connections (at most 20 s), or it exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child
                && child.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Creates a database; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "fulcrum", name])
            .output()
            .expect("run createdb");
        assert!(out.status.success(), "createdb {name}: {}", String::from_utf8_lossy(&out.stderr));
        format!("postgres://fulcrum@127.0.0.1:{}/{name}", self.port)
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops it: a fast shutdown (SIGINT), then SIGKILL after 10 s; reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops it and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        assert!(self.wait_ready(), "PostgreSQL did not restart; its log:\n{}", self.log());
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}
