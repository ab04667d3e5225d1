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

/// The Kubernetes API server of the pod this process runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InCluster {
    /// `https://HOST:PORT`, from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub url: String,
    /// The service account's CA bundle.
    pub ca: PathBuf,
    /// The service account's token (projected and rotated by the kubelet: read it again).
    pub token: PathBuf,
}

/// Where the kubelet mounts a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The in-cluster API server, given the values of `KUBERNETES_SERVICE_HOST` and
/// `KUBERNETES_SERVICE_PORT` (as [`std::env::var`] returns them); an error says it is not in
/// a pod.
pub fn in_cluster(host: Option<String>, port: Option<String>) -> Result<InCluster, String> {
    let host = host.filter(|h| !h.is_empty()).ok_or_else(|| {
        "no api_server given and not in a pod (KUBERNETES_SERVICE_HOST is not set): set api_server".to_owned()
    })?;
    let port = port.filter(|p| !p.is_empty()).unwrap_or_else(|| "443".to_owned());
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    Ok(InCluster { url: format!("https://{host}:{port}"), ca: dir.join("ca.crt"), token: dir.join("token") })
}

/// The certificates of a CA bundle, DER-encoded (what kube's `root_cert` takes).
pub fn der_certificates(path: &Path) -> Result<Vec<Vec<u8>>, TlsError> {
    Ok(read_certificates(path, "CA bundle")?.into_iter().map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_a_pod_the_api_server_comes_from_the_environment() {
        let c = in_cluster(Some("10.96.0.1".into()), Some("443".into())).unwrap();
        assert_eq!(c.url, "https://10.96.0.1:443");
        assert_eq!(c.token, Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token"));
        assert_eq!(c.ca, Path::new("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"));
        assert_eq!(in_cluster(Some("fd00::1".into()), None).unwrap().url, "https://[fd00::1]:443");
        assert!(in_cluster(None, Some("443".into())).unwrap_err().contains("KUBERNETES_SERVICE_HOST"));
    }
}
