//! Certificates made in the test (rcgen): certificate authorities, server and client
//! certificates signed by them, and a directory to write them to as PEM files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate.
    pub cert: String,
    /// Its key (PKCS#8).
    pub key: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server.
    Server,
    /// A TLS client.
    Client,
    /// Both (etcd's certificate, when its gateway dials itself with client-cert-auth).
    ServerAndClient,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        Ca { issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA") }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `usage` with common name `cn`, SAN DNS names (or IP addresses)
    /// `dns` and SAN URIs `uris`, valid from yesterday for a year.
    pub fn leaf(&self, usage: Usage, cn: &str, dns: &[&str], uris: &[&str]) -> Leaf {
        let today = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        self.leaf_valid(usage, cn, dns, uris, today - day, today + 365 * day)
    }

    /// Like [`leaf`](Self::leaf), valid from `not_before` to `not_after`.
    pub fn leaf_valid(
        &self,
        usage: Usage,
        cn: &str,
        dns: &[&str],
        uris: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        for d in dns {
            params.subject_alt_names.push(match d.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*d).try_into().expect("DNS name")),
            });
        }
        for u in uris {
            params.subject_alt_names.push(SanType::URI((*u).try_into().expect("URI")));
        }
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Leaf { cert: cert.pem(), key: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

/// A directory for a test's files, removed when dropped.
#[derive(Debug)]
pub struct Dir {
    path: PathBuf,
}

impl Dir {
    /// A new empty directory under the system's temporary directory.
    pub fn new(tag: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fulcrum-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test directory");
        Dir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in the directory (atomically: a reader sees the old file
    /// or the new one), and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        let file = path.file_name().expect("a file name").to_string_lossy().into_owned();
        let tmp = path.with_file_name(format!(".{file}.tmp"));
        std::fs::write(&tmp, contents).expect("write test file");
        std::fs::rename(&tmp, &path).expect("move test file in place");
        path
    }

    /// Writes a leaf's certificate and key as `NAME.pem` and `NAME-key.pem`.
    pub fn write_leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (self.write(&format!("{name}.pem"), &leaf.cert), self.write(&format!("{name}-key.pem"), &leaf.key))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TLS server configuration serving `leaf` (no client certificates asked for).
pub fn server_config(leaf: &Leaf) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    rustls::ServerConfig::builder_with_provider(fulcrum_tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("certificate PEM")],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key PEM"),
        )
        .expect("a server configuration")
}

/// An acceptor serving `leaf`.
pub fn acceptor(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    std::sync::Arc::new(server_config(leaf)).into()
}

/// Serves one accepted connection with hyper's HTTP/1.1 server, over TLS when `tls` is given
/// (a failed handshake ends it): the fake servers' common end.
pub async fn serve_http1<S, B>(stream: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>, service: S)
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = hyper::server::conn::http1::Builder::new();
    match tls {
        None => {
            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        }
        Some(tls) => {
            let Ok(stream) = tls.accept(stream).await else { return };
            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        }
    }
}
