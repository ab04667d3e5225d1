//! TLS building blocks shared by the proxy (listeners, upstreams, the OTLP exporter) and the
//! control plane's clients (etcd): reading PEM files with errors that name them, the crypto
//! provider, the system's CA certificates, and client configurations.
//!
//! The crypto provider is *ring*, which builds from a few C and assembly files in seconds.
//! aws-lc-rs (rustls's default, and the one with post-quantum key exchange, hence the
//! deprecation allowed below) needs cmake and builds AWS-LC for minutes on a small CI machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use fulcrum_config::UpstreamTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why TLS settings could not be loaded: the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {message}", path.display())]
pub struct TlsError {
    /// What the file is (`certificate`, `private key`, `CA bundle`).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// A [`TlsError`] about `path`.
pub fn error(what: &'static str, path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError { what, path: path.to_owned(), message: message.to_string() }
}

/// The crypto provider every TLS configuration of Fulcrum's is built with.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of that kind in the file".into(),
        other => other.to_string(),
    }
}

/// The certificates of a PEM file (a chain, or a CA bundle); `what` names it in errors.
pub fn read_certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(what, path, pem(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(what, path, pem(e)))?;
    if chain.is_empty() {
        return Err(error(what, path, "no `BEGIN CERTIFICATE` block in the file"));
    }
    Ok(chain)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| error("private key", path, pem(e)))
}

/// The CA certificates of a PEM bundle, as roots.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, "CA bundle")? {
        roots.add(cert).map_err(|e| error("CA bundle", path, e))?;
    }
    Ok(Arc::new(roots))
}

/// The system's CA certificates, read once.
pub fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map_or_else(|| "none found".to_owned(), ToString::to_string);
            return Err(format!("no usable system CA certificate ({why}): give a CA bundle"));
        }
        Ok(Arc::new(roots))
    });
    roots.clone().map_err(|message| TlsError { what: "CA bundle", path: PathBuf::from("(system)"), message })
}

/// A client configuration: servers verified against `tls.ca` (or the system's roots),
/// `tls.client_cert` presented when set, ALPN offering `alpn`. TLS 1.2 and 1.3. (The server
/// name is the caller's to choose at each connection.)
pub fn client_config(tls: &UpstreamTls, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let roots = match &tls.ca {
        Some(ca) => read_roots(ca)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error("CA bundle", Path::new("(system)"), e))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = read_certificates(&files.cert, "certificate")?;
            let key = read_key(&files.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| error("private key", &files.key, format!("does not fit {}: {e}", files.cert.display())))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
