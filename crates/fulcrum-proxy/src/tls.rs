//! TLS termination for HTTP listeners (rustls, with the *ring* crypto provider).
//!
//! - **Certificates** come from PEM files: one chain and key, or several. A client's SNI
//!   name picks the first certificate valid for it (its SAN DNS names, or its common name
//!   when it has none; `*.example.com` covers one label); without SNI, or without a match,
//!   the first certificate serves, as HAProxy's first `crt` does.
//! - **Protocols.** ALPN offers `h2` and `http/1.1`. TLS 1.3 is always on; TLS 1.2 unless
//!   `min_version = "1.3"`. The cipher suites are rustls's defaults, which keep only AEAD
//!   suites with forward secrecy: TLS 1.3 AES-256-GCM, AES-128-GCM and ChaCha20-Poly1305,
//!   and TLS 1.2 ECDHE (ECDSA or RSA) with the same three. There is no CBC, no RC4, no
//!   static RSA key exchange, no renegotiation and no compression.
//! - **Reload.** The files are read again on a configuration reload (a bad file fails the
//!   reload and the running certificates stay) and when one of them changes on disk
//!   (`Terminator::refresh`, polled every 2 s). Handshakes in progress and open
//!   connections keep the configuration they started with: none is dropped.
//! - **Upstreams** ([`Connector`], a pool's `tls`): HTTPS to the endpoints, verified against
//!   the system's roots or a given CA, with SNI from `server_name` (an endpoint reached by its
//!   IP address is verified for that address, and rustls sends no SNI for it), an optional
//!   client certificate, session resumption (rustls's in-memory cache, shared by the pool's
//!   connections), and connections pooled as plain ones are. Health checks and engine
//!   scrapes use the same TLS. The files are read when the pool is built; a change to them
//!   is not followed until the pool is rebuilt by a reload that changes its `tls`.
//! - **Client certificates** (mutual TLS), with `client_ca`: verified against that bundle in
//!   the handshake (required by default, or optional). The verified identity
//!   (`ClientIdentity`) is what routes match with `client_identity`, and what upstreams
//!   receive in `X-Forwarded-Client-Cert`, in Envoy's format. A client's own
//!   `X-Forwarded-Client-Cert` is always removed, as Envoy's default (`SANITIZE`) does.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use fulcrum_config::{ClientAuth, ListenerTls, TlsVersion, UpstreamTls};
use http::HeaderValue;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often certificate files are checked for changes.
pub(crate) const WATCH_EVERY: Duration = Duration::from_secs(2);

pub use fulcrum_tls::TlsError;
use fulcrum_tls::{error as tls_error, provider, read_certificates, read_key};

/// Reads every listener's and pool's TLS files as `serve` would, for `fulcrum validate`:
/// one message a listener or pool whose files do not load.
pub fn check(config: &fulcrum_config::Config) -> Vec<String> {
    let listeners = config.listeners.iter().enumerate().filter_map(|(i, l)| Some((i, l.tls.as_ref()?)));
    let mut errors: Vec<String> =
        listeners.filter_map(|(i, t)| load(t).err().map(|e| format!("listener[{i}].tls: {e}"))).collect();
    let pools = config.pools.iter().filter_map(|(name, p)| Some((name, p.tls.as_ref()?)));
    let failed = |(name, t): (&String, &UpstreamTls)| {
        let pool = &config.pools[name];
        Connector::new(t, pool.protocol).err().map(|e| format!("pool.{name}.tls: {e}"))
    };
    errors.extend(pools.filter_map(failed));
    if let Some(t) = config.tracing.as_ref().filter(|t| t.otlp_endpoint.https)
        && let Err(e) = crate::trace::collector_tls(t)
    {
        errors.push(format!("tracing: {e}"));
    }
    errors
}

// === impl Terminator ===

/// One listener's TLS: the configuration handshakes use, swapped whole when files change.
#[derive(Debug)]
pub(crate) struct Terminator {
    current: ArcSwap<Loaded>,
    /// The settings and the files' stamps when last read.
    watched: Mutex<(ListenerTls, Vec<Stamp>)>,
}

/// A loaded TLS configuration.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) handshake_timeout: Duration,
}

/// A file's modification time and length: a change in either means read it again.
type Stamp = Option<(SystemTime, u64)>;

impl Terminator {
    /// Reads the certificates, keys and CA bundle.
    pub(crate) fn new(settings: &ListenerTls) -> Result<Terminator, TlsError> {
        let stamps = stamps(settings);
        let loaded = load(settings)?;
        Ok(Terminator { current: ArcSwap::from_pointee(loaded), watched: Mutex::new((settings.clone(), stamps)) })
    }

    /// The configuration for the next handshake.
    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Reads `settings` (a reload's); [`install`](Self::install) puts the result in place.
    pub(crate) fn prepare(settings: &ListenerTls) -> Result<(ListenerTls, Vec<Stamp>, Loaded), TlsError> {
        let stamps = stamps(settings);
        Ok((settings.clone(), stamps, load(settings)?))
    }

    /// Puts a [`prepare`](Self::prepare)d configuration in place.
    pub(crate) fn install(&self, (settings, stamps, loaded): (ListenerTls, Vec<Stamp>, Loaded)) {
        // Under the lock: a file-change refresh cannot slip in between and leave its older
        // certificates in place with the new stamps.
        let mut watched = self.watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *watched = (settings, stamps);
        self.current.store(Arc::new(loaded));
    }

    /// Reads the files again if one of them changed since they were last read. A file that
    /// fails to load is logged, and the running configuration stays.
    pub(crate) fn refresh(&self, listener: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamps(&watched.0);
        if now == watched.1 {
            return;
        }
        watched.1 = now;
        match load(&watched.0) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                tracing::info!(listener, "TLS certificates reloaded: a file changed");
            }
            Err(e) => {
                tracing::error!(listener, error = %e, "TLS files changed but do not load: keeping the running certificates");
            }
        }
    }
}

fn stamps(settings: &ListenerTls) -> Vec<Stamp> {
    let files = settings.certificates.iter().flat_map(|c| [&c.cert, &c.key]).chain(settings.client_ca.as_ref());
    files
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn load(settings: &ListenerTls) -> Result<Loaded, TlsError> {
    let provider = provider();
    let mut certs = Vec::new();
    for files in &settings.certificates {
        let chain = read_certificates(&files.cert, "certificate")?;
        let key = read_key(&files.key)?;
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| tls_error("private key", &files.key, format!("does not fit {}: {e}", files.cert.display())))?;
        let leaf = &certified.cert[0];
        let names = match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, x)) => {
                if !x.validity().is_valid() {
                    tracing::warn!(certificate = %files.cert.display(), not_after = %x.validity().not_after, "serving a certificate that is expired or not valid yet");
                }
                server_names(&x)
            }
            Err(e) => return Err(tls_error("certificate", &files.cert, format!("cannot be read: {e}"))),
        };
        certs.push((names, Arc::new(certified)));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| tls_error("certificate", &settings.certificates[0].cert, e))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(ca, "client CA bundle")? {
                roots.add(cert).map_err(|e| tls_error("client CA bundle", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| tls_error("client CA bundle", ca, e))?)
        }
    };
    let mut server = builder.with_cert_resolver(Arc::new(SniResolver { certs }));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded { server: Arc::new(server), handshake_timeout: settings.handshake_timeout })
}

/// The names a server certificate is valid for, lowercase: its SAN DNS names, or its common
/// name if it has none.
fn server_names(x: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = san(x)
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        names.extend(x.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
    }
    names
}

fn san<'a>(
    x: &'a x509_parser::certificate::X509Certificate<'_>,
) -> impl Iterator<Item = &'a x509_parser::extensions::GeneralName<'a>> {
    x.subject_alternative_name().ok().flatten().into_iter().flat_map(|ext| ext.value.general_names.iter())
}

/// Whether certificate name `pattern` covers host `name` (both lowercase): equal, or a
/// wildcard first label standing for exactly one label.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => name.split_once('.').is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => pattern == name,
    }
}

/// Picks a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    /// Each certificate with the names it is valid for, in configuration order.
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            self.certs.iter().find(|(names, _)| names.iter().any(|n| name_matches(n, &sni)))
        });
        chosen.or(self.certs.first()).map(|(_, key)| key.clone())
    }
}

// === impl Connector ===

/// A pool's TLS to its endpoints.
#[derive(Debug)]
pub struct Connector {
    config: Arc<ClientConfig>,
    /// SNI and the name verified; `None`: each endpoint's IP address.
    server_name: Option<ServerName<'static>>,
}

impl Connector {
    /// Reads the CA bundle (or the system's roots) and the client certificate.
    pub(crate) fn new(
        settings: &UpstreamTls,
        protocol: fulcrum_config::UpstreamProtocol,
    ) -> Result<Connector, TlsError> {
        let alpn: &[u8] = match protocol {
            fulcrum_config::UpstreamProtocol::Http1 => b"http/1.1",
            fulcrum_config::UpstreamProtocol::H2 => b"h2",
        };
        let config = fulcrum_tls::client_config(settings, &[alpn])?;
        let server_name = match &settings.server_name {
            Some(n) => {
                Some(ServerName::try_from(n.clone()).map_err(|e| tls_error("server name", Path::new(n.as_str()), e))?)
            }
            None => None,
        };
        Ok(Connector { config: Arc::new(config), server_name })
    }

    /// The TLS handshake over a connected `tcp` to `address`.
    pub(crate) async fn handshake(&self, address: SocketAddr, tcp: TcpStream) -> io::Result<Stream> {
        let name = self.server_name.clone().unwrap_or_else(|| ServerName::IpAddress(address.ip().into()));
        let tls = tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, Tcp(tcp)).await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// Connects to an endpoint, over TLS when `tls` is set: requests, health checks and scrapes
/// all go through here. No timeout of its own: callers bound it.
pub(crate) async fn dial(address: SocketAddr, tls: Option<&Connector>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(address).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(c) => c.handshake(address, tcp).await,
    }
}

// === impl Stream ===

/// A connection to an endpoint.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<Tcp>>),
}

impl Stream {
    /// The TCP connection underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.get_ref().0.0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// === impl Tcp ===

/// The TCP connection under rustls. rustls hands its records over as a vectored write; a
/// single buffer (a small response is one record) goes out with `send(2)`, as plain
/// connections' writes do, since `writev(2)` costs the kernel more for one buffer (its VFS
/// path: about 0.4 µs a call more on the proxy benchmark's machine, 2% of a TLS request).
#[derive(Debug)]
pub(crate) struct Tcp(pub(crate) TcpStream);

impl AsyncRead for Tcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &mut self.get_mut().0;
        let mut full = bufs.iter().filter(|b| !b.is_empty());
        match (full.next(), full.next()) {
            (Some(one), None) => Pin::new(tcp).poll_write(cx, one),
            (None, _) => Poll::Ready(Ok(0)),
            _ => Pin::new(tcp).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

// === impl ClientIdentity ===

/// A verified client certificate's identity.
#[derive(Clone, Debug)]
pub(crate) struct ClientIdentity {
    /// Its common names.
    pub(crate) common_names: Vec<String>,
    /// SAN URIs (SPIFFE IDs are these).
    pub(crate) uris: Vec<String>,
    /// SAN DNS names.
    pub(crate) dns: Vec<String>,
    /// `X-Forwarded-Client-Cert`, as upstreams get it.
    pub(crate) header: HeaderValue,
}

impl ClientIdentity {
    /// The identity of the certificate a client presented (already verified by the
    /// handshake), if it sent one.
    pub(crate) fn of(conn: &rustls::ServerConnection) -> Option<ClientIdentity> {
        let leaf = conn.peer_certificates()?.first()?;
        let (_, x) = x509_parser::parse_x509_certificate(leaf).ok()?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        for name in san(&x) {
            match name {
                x509_parser::extensions::GeneralName::URI(u) => uris.push((*u).to_owned()),
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
        let subject = rfc2253(x.subject());
        let common_names =
            x.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_owned).collect();
        let hash = ring::digest::digest(&ring::digest::SHA256, leaf);
        let mut xfcc = String::from("Hash=");
        for b in hash.as_ref() {
            xfcc.push_str(&format!("{b:02x}"));
        }
        xfcc.push_str(";Subject=");
        xfcc.push_str(&quoted(&subject));
        for u in &uris {
            xfcc.push_str(";URI=");
            xfcc.push_str(&quoted(u));
        }
        for d in &dns {
            xfcc.push_str(";DNS=");
            xfcc.push_str(&quoted(d));
        }
        let header = HeaderValue::from_str(&xfcc).ok()?;
        Some(ClientIdentity { common_names, uris, dns, header })
    }

    /// Whether a route's `client_identity` pattern matches, equal or (ending in `*`) as a
    /// prefix: a pattern with a scheme (`spiffe://...`) is compared with the SAN URIs only;
    /// any other with the SAN DNS names, and with the common name only when the certificate
    /// has no SAN at all. A common name cannot pass for a SPIFFE ID.
    pub(crate) fn matches(&self, pattern: &str) -> bool {
        let test = |v: &String| match pattern.strip_suffix('*') {
            Some(prefix) => v.starts_with(prefix),
            None => v == pattern,
        };
        if pattern.contains("://") {
            return self.uris.iter().any(test);
        }
        if self.uris.is_empty() && self.dns.is_empty() {
            return self.common_names.iter().any(test);
        }
        self.dns.iter().any(test)
    }
}

/// A distinguished name as RFC 2253 writes it, and Envoy's XFCC `Subject`: the most specific
/// part first (`CN=alice,O=Example`), attributes by their short names (else their OIDs),
/// `,`, `+`, `"`, `\`, `<`, `>`, `;` and `=` in values escaped.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            let attrs: Vec<String> = rdn
                .iter()
                .map(|a| {
                    let key = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                        .map_or_else(|_| a.attr_type().to_id_string(), str::to_owned);
                    let value = a.as_str().unwrap_or("");
                    let mut escaped = String::with_capacity(value.len());
                    for c in value.chars() {
                        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                            escaped.push('\\');
                        }
                        escaped.push(c);
                    }
                    format!("{key}={escaped}")
                })
                .collect();
            attrs.join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// An XFCC value: quoted (with `"` and `\` escaped) when it holds a separator.
fn quoted(v: &str) -> String {
    if v.contains([',', ';', '=', '"', '\\']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
        assert!(!name_matches("api.example.com", "web.example.com"));
    }

    #[test]
    fn xfcc_values_are_quoted_when_they_hold_separators() {
        assert_eq!(quoted("spiffe://cluster.local/ns/a/sa/b"), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(quoted("CN=a,O=b"), "\"CN=a,O=b\"");
        assert_eq!(quoted("CN=a \"b\""), "\"CN=a \\\"b\\\"\"");
    }

    #[test]
    fn identity_patterns_match_exactly_or_by_prefix() {
        let id = ClientIdentity {
            common_names: vec!["svc".into()],
            uris: vec!["spiffe://prod/ns/a/sa/b".into()],
            dns: vec!["svc.prod".into()],
            header: HeaderValue::from_static("x"),
        };
        assert!(id.matches("spiffe://prod/ns/a/sa/b"));
        assert!(id.matches("spiffe://prod/ns/a/*"));
        assert!(id.matches("svc.prod"));
        assert!(!id.matches("svc"), "with SANs, the common name is not an identity");
        assert!(!id.matches("spiffe://prod/ns/other/*"));
        assert!(!id.matches("spiffe://prod/ns/a"));
        // A common name that looks like a SPIFFE ID is not one.
        let cn_only = ClientIdentity {
            common_names: vec!["spiffe://prod/ns/a/sa/b".into(), "legacy".into()],
            uris: vec![],
            dns: vec![],
            header: HeaderValue::from_static("x"),
        };
        assert!(!cn_only.matches("spiffe://prod/ns/a/*"));
        assert!(cn_only.matches("legacy"));
    }
}
