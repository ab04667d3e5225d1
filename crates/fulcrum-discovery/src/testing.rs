//! Test support for Fulcrum's crates: an etcd server of a test's own on loopback, and
//! temporary directories. Tests of etcd discovery, self-registration and mesh mode use it;
//! it starts the `etcd` binary (Debian package `etcd-server`, installed by
//! `scripts/install-test-deps.sh`) and kills it by its PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::EtcdClient;

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fulcrum-discovery-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `path` atomically (a temporary file, then a rename), as the docs advise.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Says the test cannot run: a failure when CI is set, else a SKIPPED line.
pub fn skip_or_fail(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why} (CI is set, so this is a failure; run scripts/install-test-deps.sh)"
    );
    println!("SKIPPED: {why}");
}

/// An etcd server of the test's own, on loopback, killed (by its PID) when dropped.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    pub client_url: String,
    pub port: u16,
    dir: TempDir,
    tls: Option<EtcdTls>,
}

/// An etcd serving https with client-certificate authentication.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// Its certificate (for 127.0.0.1, usable as server and client: its JSON gateway dials
    /// its own gRPC port with it) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA its clients' certificates must chain to.
    pub client_ca: PathBuf,
    /// What its clients use: the CA that signed `cert`, and a client certificate.
    pub client: fulcrum_config::UpstreamTls,
}

impl Etcd {
    /// Starts etcd, or returns `None` (after `skip_or_fail`) when the binary is missing.
    pub async fn start() -> Option<Etcd> {
        Self::start_with(None).await
    }

    /// Starts etcd serving https with `tls` (client certificates required).
    pub async fn start_tls(tls: EtcdTls) -> Option<Etcd> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<EtcdTls>) -> Option<Etcd> {
        let binary = std::env::var("FULCRUM_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        if Command::new(&binary).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            skip_or_fail(&format!("`{binary}` is not installed (Debian package etcd-server)"));
            return None;
        }
        // etcd's JSON gateway dials the client address it listens on, so that address
        // cannot be port 0: a free port is picked and, should another process take it
        // first, another one is tried.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let client_url = format!("{scheme}://127.0.0.1:{port}");
            let mut etcd = Etcd { child: None, client_url, port, dir: TempDir::new("etcd"), tls: tls.clone() };
            etcd.spawn(&binary);
            if etcd.wait_ready().await {
                return Some(etcd);
            }
            last_log = etcd.log();
            // Dropped here: killed, its directory removed.
        }
        panic!("etcd did not start in 5 attempts; its last log:\n{last_log}");
    }

    fn spawn(&mut self, binary: &str) {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log file");
        let mut command = Command::new(binary);
        if let Some(tls) = &self.tls {
            command.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            command.arg("--trusted-ca-file").arg(&tls.client_ca).arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.client_url, "--advertise-client-urls", &self.client_url])
            // The peer port is never dialled in a one-member cluster: port 0 is fine there.
            .args(["--listen-peer-urls", "http://127.0.0.1:0", "--initial-advertise-peer-urls", "http://127.0.0.1:0"])
            .args(["--initial-cluster", "test=http://127.0.0.1:0", "--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    /// Waits until etcd answers a read (at most 15 s), or it exited.
    async fn wait_ready(&mut self) -> bool {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = &mut self.child
                && child.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            if client.get("/ready").await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A client of it (with the client certificate, when it serves https).
    pub fn client(&self) -> EtcdClient {
        let tls = self.tls.as_ref().map(|t| &t.client);
        EtcdClient::with_tls(&[self.client_url.as_str()], Duration::from_secs(2), tls).expect("client")
    }

    /// Kills etcd (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same port and data.
    pub async fn restart(&mut self) {
        let binary = std::env::var("FULCRUM_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        self.kill();
        self.spawn(&binary);
        assert!(self.wait_ready().await, "etcd did not restart:\n{}", self.log());
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}
