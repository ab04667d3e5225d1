//! HTTPS listeners over real sockets: certificates made in the test, clients built on
//! rustls, plain upstreams behind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_testkit::certs::{Ca, Dir, Leaf, Usage};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::{self, Behavior, json};

type Tls = TlsStream<TcpStream>;

#[allow(deprecated)]
fn client_config(ca: &Ca, cert: Option<&Leaf>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).expect("CA PEM")).expect("CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert PEM")],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key PEM"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

async fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, sni: &str) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await
}

/// One GET over a TLS connection, in the protocol ALPN chose.
async fn get(tls: Tls, path: &str) -> Result<(StatusCode, http::HeaderMap, Bytes), hyper::Error> {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let req = Request::get(format!("https://a.test{path}")).body(Full::new(Bytes::new())).expect("request");
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().expect("path");
        parts.headers.insert("host", "a.test".parse().expect("host"));
        send.send_request(Request::from_parts(parts, body)).await?
    };
    let (parts, body) = resp.into_parts();
    Ok((parts.status, parts.headers, body.collect().await?.to_bytes()))
}

/// A listener `public` with the `tls` table, in front of `backend`.
fn config(backend: &common::Backend, tls: &str, extra: &str) -> String {
    let plain = common::one_pool_with(&format!("endpoints = {}", common::endpoints(&[backend])), extra);
    plain.replacen("pool = \"p\"\n", &format!("pool = \"p\"\ntls = {tls}\n"), 1)
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn https_clients_reach_a_plain_upstream_over_http1_and_h2() {
    let ca = Ca::new("test CA");
    let dir = Dir::new("tls-basic");
    let (cert, key) = dir.write_leaf("a", &ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let backend = common::backend("b1", Behavior::Echo).await;
    let tls = format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&cert), path(&key));
    let proxy = common::proxy(&config(&backend, &tls, "")).await;

    for alpn in [&["http/1.1"][..], &["h2"], &[]] {
        let client = client_config(&ca, None, alpn);
        let tls = connect(proxy.proxy_addr, &client, "a.test").await.expect("handshake");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(negotiated.as_deref(), alpn.first().map(|p| p.as_bytes()), "ALPN {alpn:?}");
        let (status, headers, body) = get(tls, "/hello").await.expect("response");
        assert_eq!(status, StatusCode::OK, "ALPN {alpn:?}");
        assert_eq!(headers["x-backend"], "b1");
        let seen = json(&body);
        assert_eq!(seen["uri"], "/hello");
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "upstreams are told the client used TLS");
        assert!(seen["headers"].get("x-forwarded-client-cert").is_none(), "no client certificate, no XFCC");
    }
    // The plain-text protocol on a TLS port is refused, not served.
    let mut plain = TcpStream::connect(proxy.proxy_addr).await.expect("connect");
    plain.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection is closed, not left hanging");
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "plain HTTP is not served on a TLS listener");
    proxy.shutdown().await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
    let ca = Ca::new("test CA");
    let dir = Dir::new("tls-sni");
    let a = ca.leaf(Usage::Server, "a.test", &["a.test"], &[]);
    let b = ca.leaf(Usage::Server, "b", &["b.test", "*.b.test"], &[]);
    let (a_cert, a_key) = dir.write_leaf("a", &a);
    let (b_cert, b_key) = dir.write_leaf("b", &b);
    let backend = common::backend("b1", Behavior::Echo).await;
    let tls = format!(
        r#"{{ certificates = [{{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}] }}"#,
        path(&a_cert),
        path(&a_key),
        path(&b_cert),
        path(&b_key)
    );
    let proxy = common::proxy(&config(&backend, &tls, "")).await;
    let client = client_config(&ca, None, &[]);
    let served = |tls: &Tls| tls.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec();
    for (sni, want) in [("a.test", &a), ("b.test", &b), ("api.B.test", &b)] {
        let tls = connect(proxy.proxy_addr, &client, sni).await.expect("handshake");
        assert_eq!(served(&tls), want.der, "SNI {sni}");
        let (status, _, _) = get(tls, "/").await.expect("response");
        assert_eq!(status, StatusCode::OK);
    }
    // A name no certificate covers: the first certificate, which the client then refuses.
    let refused = connect(proxy.proxy_addr, &client, "c.test").await;
    assert!(refused.is_err(), "a certificate for a.test does not verify for c.test");
    // An IP address (no SNI is sent for one): the first certificate too.
    let no_sni = rustls::ClientConfig::clone(&client);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(no_sni))
        .connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), {
            TcpStream::connect(proxy.proxy_addr).await.expect("connect")
        })
        .await;
    assert!(tls.is_err(), "the first certificate (a.test) does not verify for 127.0.0.1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_accepts_verified_clients_and_refuses_the_rest() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("another CA");
    let dir = Dir::new("tls-mtls");
    let (cert, key) = dir.write_leaf("a", &server_ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let ca_file = dir.write("clients.pem", &client_ca.pem());
    let backend = common::backend("b1", Behavior::Echo).await;
    let admins = common::backend("admins", Behavior::Echo).await;
    let tls = format!(r#"{{ cert = "{}", key = "{}", client_ca = "{}" }}"#, path(&cert), path(&key), path(&ca_file));
    // Identities under ns/admin go to their own pool.
    let extra = format!(
        r#"
[pool.admins]
endpoints = {}

[[route]]
pool = "admins"
match = {{ client_identity = "spiffe://test/ns/admin/*" }}
"#,
        common::endpoints(&[&admins])
    );
    let proxy = common::proxy(&config(&backend, &tls, &extra)).await;

    let alice = client_ca.leaf(Usage::Client, "alice", &[], &["spiffe://test/ns/app/sa/alice"]);
    let root = client_ca.leaf(Usage::Client, "root", &[], &["spiffe://test/ns/admin/sa/root"]);
    for alpn in [&["http/1.1"][..], &["h2"]] {
        let tls = connect(proxy.proxy_addr, &client_config(&server_ca, Some(&alice), alpn), "a.test").await;
        let (status, headers, body) = get(tls.expect("handshake"), "/").await.expect("response");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "b1");
        let xfcc = json(&body)["headers"]["x-forwarded-client-cert"].as_str().expect("XFCC").to_owned();
        assert!(xfcc.starts_with("Hash="), "{xfcc}");
        assert!(xfcc.contains(";Subject=\"CN=alice\""), "{xfcc}");
        assert!(xfcc.contains(";URI=spiffe://test/ns/app/sa/alice"), "{xfcc}");
    }
    let tls = connect(proxy.proxy_addr, &client_config(&server_ca, Some(&root), &[]), "a.test").await;
    let (status, headers, _) = get(tls.expect("handshake"), "/").await.expect("response");
    assert_eq!((status, &headers["x-backend"]), (StatusCode::OK, &"admins".parse().expect("value")));

    // Refused: no certificate, one from another CA, an expired one. With TLS 1.3 the client
    // may finish its side of the handshake first; the refusal then ends the first request.
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = client_ca.leaf_valid(Usage::Client, "old", &[], &[], now - 30 * day, now - day);
    let stranger = other_ca.leaf(Usage::Client, "mallory", &[], &["spiffe://test/ns/admin/sa/root"]);
    for (what, cert) in [("no certificate", None), ("another CA", Some(&stranger)), ("expired", Some(&expired))] {
        let refused = match connect(proxy.proxy_addr, &client_config(&server_ca, cert, &[]), "a.test").await {
            Err(_) => true,
            Ok(tls) => get(tls, "/").await.is_err(),
        };
        assert!(refused, "{what}: refused");
    }
    assert_eq!(admins.requests.load(Ordering::SeqCst), 1, "only root reached the admins' pool");
    // The proxy still serves.
    let tls = connect(proxy.proxy_addr, &client_config(&server_ca, Some(&alice), &[]), "a.test").await;
    assert_eq!(get(tls.expect("handshake"), "/").await.expect("response").0, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test]
async fn optional_client_certificates_serve_clients_without_one() {
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-optional");
    let (cert, key) = dir.write_leaf("a", &ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let backend = common::backend("b1", Behavior::Echo).await;
    let tls = format!(
        r#"{{ cert = "{}", key = "{}", client_ca = "{}", client_auth = "optional" }}"#,
        path(&cert),
        path(&key),
        path(&ca_file)
    );
    let proxy = common::proxy(&config(&backend, &tls, "")).await;
    let tls = connect(proxy.proxy_addr, &client_config(&ca, None, &[]), "a.test").await.expect("handshake");
    let (status, _, body) = get(tls, "/").await.expect("response");
    assert_eq!(status, StatusCode::OK);
    assert!(json(&body)["headers"].get("x-forwarded-client-cert").is_none());
    let bob = ca.leaf(Usage::Client, "bob", &["bob.test"], &[]);
    let tls = connect(proxy.proxy_addr, &client_config(&ca, Some(&bob), &[]), "a.test").await.expect("handshake");
    let (_, _, body) = get(tls, "/").await.expect("response");
    let xfcc = json(&body)["headers"]["x-forwarded-client-cert"].as_str().expect("XFCC").to_owned();
    assert!(xfcc.contains(";DNS=bob.test"), "{xfcc}");
    proxy.shutdown().await;
}

/// Clients keep opening connections and sending requests while the certificate files are
/// replaced: every request succeeds, and new connections get the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_file_change_and_on_reload_without_failing_requests() {
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-reload");
    let first = ca.leaf(Usage::Server, "a.test", &["a.test"], &[]);
    let (cert, key) = dir.write_leaf("a", &first);
    let backend = common::backend("b1", Behavior::Echo).await;
    let tls = format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&cert), path(&key));
    let toml = config(&backend, &tls, "");
    let proxy = common::proxy(&toml).await;
    let addr = proxy.proxy_addr;
    let client = client_config(&ca, None, &[]);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, ok, failed, client) = (stop.clone(), ok.clone(), failed.clone(), client.clone());
        // Half the clients keep one connection, half open one a request.
        load.push(tokio::spawn(async move {
            let mut kept = None;
            while !stop.load(Ordering::Relaxed) {
                let result = if i % 2 == 0 {
                    match connect(addr, &client, "a.test").await {
                        Ok(tls) => get(tls, "/").await.map(|r| r.0).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                } else {
                    keep_alive(&mut kept, addr, &client).await
                };
                match result {
                    Ok(StatusCode::OK) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let served = |tls: &Tls| tls.get_ref().1.peer_certificates().expect("certificate")[0].to_vec();
    common::until("requests flow", || ok.load(Ordering::Relaxed) > 20).await;

    // 1. The files change on disk: picked up within the watch period.
    let second = ca.leaf(Usage::Server, "a.test", &["a.test"], &[]);
    dir.write_leaf("a", &second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tls = connect(addr, &client, "a.test").await.expect("handshake");
        if served(&tls) == second.der {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new certificate is served within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. A reload naming other files: applied at once.
    let third = ca.leaf(Usage::Server, "a.test", &["a.test"], &[]);
    let (cert3, key3) = dir.write_leaf("third", &third);
    let next = toml.replace(&path(&cert), &path(&cert3)).replace(&path(&key), &path(&key3));
    proxy.live.reload_text(&next, None).expect("reload");
    let tls = connect(addr, &client, "a.test").await.expect("handshake");
    assert_eq!(served(&tls), third.der);

    // 3. A reload naming a missing file is refused, and the running certificate stays.
    let broken = toml.replace(&path(&cert), "/nonexistent/cert.pem");
    let err = proxy.live.reload_text(&broken, None).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    let tls = connect(addr, &client, "a.test").await.expect("handshake");
    assert_eq!(served(&tls), third.der);

    let before = ok.load(Ordering::Relaxed);
    common::until("more requests after the reloads", || ok.load(Ordering::Relaxed) > before + 20).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("client task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("certificate reloads under load: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "no request fails across certificate reloads");
    proxy.shutdown().await;
}

/// Sends one request on a kept HTTP/1.1 connection (opening it when there is none).
async fn keep_alive(
    kept: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
) -> Result<StatusCode, String> {
    if kept.as_ref().is_none_or(|s| s.is_closed()) {
        let tls = connect(addr, client, "a.test").await.map_err(|e| e.to_string())?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        *kept = Some(send);
    }
    let send = kept.as_mut().expect("connection");
    send.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get("/").header("host", "a.test").body(Full::new(Bytes::new())).expect("request");
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

#[tokio::test]
async fn bad_tls_input_gets_a_clean_close() {
    // (One thread: the proxy's tasks log to this thread's subscriber.)
    let (captured, _guard) = common::capture();
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-bad");
    let (cert, key) = dir.write_leaf("a", &ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let backend = common::backend("b1", Behavior::Echo).await;
    let tls = format!(r#"{{ cert = "{}", key = "{}", handshake_timeout = "500ms" }}"#, path(&cert), path(&key));
    let proxy = common::proxy(&config(&backend, &tls, "")).await;
    let addr = proxy.proxy_addr;

    // Garbage instead of a ClientHello: closed at once (with a TLS alert at most).
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&[0x42; 512]).await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "garbage: the connection is closed");
    assert!(buf.len() < 64, "garbage: at most an alert comes back, got {} bytes", buf.len());

    // A handshake that stops halfway (a record header promising more than is sent), and a
    // client that sends nothing: closed after the handshake timeout.
    for (what, bytes) in [("half a ClientHello", &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00][..]), ("silence", &[])] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "{what}: closed within 5 s");
        assert!(started.elapsed() >= Duration::from_millis(400), "{what}: waited for the handshake timeout");
    }

    // A client that does not trust the server's certificate gives up; the proxy goes on.
    let stranger = Ca::new("other");
    assert!(connect(addr, &client_config(&stranger, None, &[]), "a.test").await.is_err());
    let tls = connect(addr, &client_config(&ca, None, &[]), "a.test").await.expect("handshake");
    assert_eq!(get(tls, "/").await.expect("response").0, StatusCode::OK);
    proxy.shutdown().await;

    // Each bad handshake left a log line, with the peer.
    let lines = captured.lines();
    let count = |message: &str| lines.iter().filter(|l| l["message"] == message && l.get("peer").is_some()).count();
    assert!(count("TLS handshake failed") >= 2, "garbage and a distrusting client: {lines:#?}");
    assert_eq!(count("TLS handshake timed out"), 2, "half a ClientHello and silence: {lines:#?}");
}

#[tokio::test]
async fn tls_files_that_do_not_load_stop_the_start_with_the_file_named() {
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-files");
    let a = ca.leaf(Usage::Server, "a.test", &["a.test"], &[]);
    let b = ca.leaf(Usage::Server, "b.test", &["b.test"], &[]);
    let (cert, key) = dir.write_leaf("a", &a);
    let (_, other_key) = dir.write_leaf("b", &b);
    let garbage = dir.write("garbage.pem", "not a certificate\n");
    let backend = common::backend("b1", Behavior::Echo).await;
    let cases = [
        (format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&dir.path().join("missing.pem")), path(&key)), "missing.pem"),
        (format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&garbage), path(&key)), "garbage.pem"),
        (format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&cert), path(&garbage)), "garbage.pem"),
        (format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&cert), path(&other_key)), "does not fit"),
    ];
    for (tls, named) in cases {
        let config = fulcrum_config::Config::parse(&config(&backend, &tls, ""), None).expect("valid config");
        let err = fulcrum_proxy::Proxy::bind(&config).await.expect_err("refused");
        let message = err.to_string();
        assert!(message.contains("listener `public`") && message.contains(named), "{message}");
    }
}

// --- TLS to upstreams ---

/// What an HTTPS test backend saw.
#[derive(Default)]
struct Seen {
    handshakes: AtomicUsize,
    resumed: AtomicUsize,
    requests: AtomicUsize,
    /// Common names of the client certificates presented.
    clients: std::sync::Mutex<Vec<String>>,
}

/// An HTTPS backend on 127.0.0.1 with `leaf`, requiring a client certificate from
/// `client_ca` when given. It answers `200 NAME`, with `Connection: close` when `close`.
async fn https_backend(
    name: &'static str,
    leaf: &Leaf,
    client_ca: Option<&Ca>,
    close: bool,
) -> (SocketAddr, Arc<Seen>) {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).expect("CA")).expect("CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                seen.handshakes.fetch_add(1, Ordering::SeqCst);
                let conn = tls.get_ref().1;
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    seen.resumed.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(certs) = conn.peer_certificates() {
                    let (_, x) = x509_parser::parse_x509_certificate(&certs[0]).expect("client certificate");
                    let cn = x.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("?");
                    seen.clients.lock().expect("clients").push(cn.to_owned());
                }
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    async move {
                        // A POST is answered with its body's length: `NAME:LEN`.
                        let post = req.method() == http::Method::POST;
                        let len = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
                        let text = if post { format!("{name}:{len}") } else { name.to_owned() };
                        let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                        if close {
                            resp.headers_mut().insert("connection", "close".parse().expect("static"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (addr, seen)
}

/// A plain listener `public` in front of pool `p` with `endpoints` and `pool` lines.
fn upstream_config(endpoints: &[SocketAddr], pool: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    common::one_pool_with(&format!("endpoints = [{}]\n{pool}", list.join(", ")), "")
}

async fn plain_get(addr: SocketAddr) -> (StatusCode, Bytes) {
    let (status, _, body) = common::send(addr, common::get("/")).await;
    (status, body)
}

#[tokio::test]
async fn https_upstreams_are_verified_pooled_resumed_and_health_checked() {
    let ca = Ca::new("upstream CA");
    let dir = Dir::new("tls-upstream");
    let ca_file = dir.write("ca.pem", &ca.pem());
    let leaf = ca.leaf(Usage::Server, "backend", &["backend.test"], &[]);
    let (kept, kept_seen) = https_backend("kept", &leaf, None, false).await;
    let pool = format!(
        "tls = {{ server_name = \"backend.test\", ca = \"{}\" }}\nhealth_check = {{ path = \"/health\", interval = \"100ms\" }}",
        path(&ca_file)
    );
    let proxy = common::proxy(&upstream_config(&[kept], &pool)).await;
    for _ in 0..20 {
        assert_eq!(plain_get(proxy.proxy_addr).await, (StatusCode::OK, Bytes::from("kept")));
    }
    // Requests share pooled TLS connections (health checks open their own).
    let requests = kept_seen.requests.load(Ordering::SeqCst);
    assert!(requests >= 20, "{requests}");
    let handshakes = kept_seen.handshakes.load(Ordering::SeqCst);
    assert!(handshakes < requests / 2, "{handshakes} handshakes for {requests} requests: connections are pooled");
    // Health checks reach the backend over TLS (its request handler counts them), and the
    // endpoint stays in service.
    common::until("health checks over TLS", || kept_seen.requests.load(Ordering::SeqCst) >= requests + 3).await;
    assert_eq!(plain_get(proxy.proxy_addr).await, (StatusCode::OK, Bytes::from("kept")));
    proxy.shutdown().await;

    // A backend that closes each connection: the next handshakes resume the TLS session.
    let (closing, closing_seen) = https_backend("closing", &leaf, None, true).await;
    let proxy = common::proxy(&upstream_config(&[closing], &pool)).await;
    for _ in 0..5 {
        assert_eq!(plain_get(proxy.proxy_addr).await, (StatusCode::OK, Bytes::from("closing")));
    }
    let resumed = closing_seen.resumed.load(Ordering::SeqCst);
    assert!(resumed >= 3, "{resumed} of {} handshakes resumed", closing_seen.handshakes.load(Ordering::SeqCst));
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_fails_verification_gets_no_request() {
    let ca = Ca::new("real CA");
    let other = Ca::new("another CA");
    let dir = Dir::new("tls-upstream-verify");
    let other_file = dir.write("other.pem", &other.pem());
    let ca_file = dir.write("ca.pem", &ca.pem());
    let (addr, seen) = https_backend("b", &ca.leaf(Usage::Server, "b", &["backend.test"], &[]), None, false).await;
    for (pool, why) in [
        (format!("tls = {{ server_name = \"backend.test\", ca = \"{}\" }}", path(&other_file)), "another CA"),
        (format!("tls = {{ server_name = \"wrong.test\", ca = \"{}\" }}", path(&ca_file)), "another name"),
        (format!("tls = {{ ca = \"{}\" }}", path(&ca_file)), "the IP address, not in the certificate"),
    ] {
        let proxy = common::proxy(&upstream_config(&[addr], &pool)).await;
        let (status, body) = plain_get(proxy.proxy_addr).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{why}: {body:?}");
        proxy.shutdown().await;
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0, "no request reached an unverified upstream");
    // Without server_name, the endpoint's IP address is verified: a certificate for it passes.
    let (by_ip, _) = https_backend("by-ip", &ca.leaf(Usage::Server, "ip", &["127.0.0.1"], &[]), None, false).await;
    let proxy = common::proxy(&upstream_config(&[by_ip], &format!("tls = {{ ca = \"{}\" }}", path(&ca_file)))).await;
    assert_eq!(plain_get(proxy.proxy_addr).await, (StatusCode::OK, Bytes::from("by-ip")));
    proxy.shutdown().await;
}

#[tokio::test]
async fn https_clients_reach_https_upstreams_with_client_certificates() {
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-end-to-end");
    let ca_file = dir.write("ca.pem", &ca.pem());
    let (front_cert, front_key) = dir.write_leaf("front", &ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let (client_cert, client_key) =
        dir.write_leaf("proxy", &ca.leaf(Usage::Client, "fulcrum", &[], &["spiffe://test/proxy"]));
    let backend_leaf = ca.leaf(Usage::Server, "backend", &["backend.test"], &[]);
    let (addr, seen) = https_backend("mtls", &backend_leaf, Some(&ca), false).await;
    let pool = |cert: &str| format!("tls = {{ server_name = \"backend.test\", ca = \"{}\"{cert} }}", path(&ca_file));
    let with_cert = pool(&format!(", cert = \"{}\", key = \"{}\"", path(&client_cert), path(&client_key)));
    let toml = upstream_config(&[addr], &with_cert).replacen(
        "pool = \"p\"\n",
        &format!("pool = \"p\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n", path(&front_cert), path(&front_key)),
        1,
    );
    let proxy = common::proxy(&toml).await;
    for alpn in [&["http/1.1"][..], &["h2"]] {
        let tls = connect(proxy.proxy_addr, &client_config(&ca, None, alpn), "a.test").await.expect("handshake");
        let (status, _, body) = get(tls, "/").await.expect("response");
        assert_eq!((status, body), (StatusCode::OK, Bytes::from("mtls")), "ALPN {alpn:?}");
    }
    assert!(seen.clients.lock().expect("clients").iter().all(|cn| cn == "fulcrum"));
    // A body larger than the sockets' buffers, through TLS on both sides: every byte arrives
    // (a TLS write can leave records in rustls until flushed).
    let big = vec![b'x'; 8 << 20];
    let tls = connect(proxy.proxy_addr, &client_config(&ca, None, &["http/1.1"]), "a.test").await.expect("handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http/1.1");
    tokio::spawn(conn);
    let req = Request::post("/upload").header("host", "a.test").body(Full::new(Bytes::from(big))).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, format!("mtls:{}", 8 << 20));
    proxy.shutdown().await;
    // Without the client certificate, the upstream refuses the proxy: 502.
    let proxy = common::proxy(&upstream_config(&[addr], &pool(""))).await;
    assert_eq!(plain_get(proxy.proxy_addr).await.0, StatusCode::BAD_GATEWAY);
    proxy.shutdown().await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
}

/// HTTP/1.1 over TLS is served by the proxy's own HTTP/1.1 code (not hyper's): a client that
/// leaves while its request waits is noticed through rustls (the request is cancelled and
/// logged 499), and keep-alive, pipelining and chunked bodies work as in clear text.
#[tokio::test]
async fn http1_over_tls_notices_a_client_that_leaves_and_keeps_connections_alive() {
    let (captured, _guard) = common::capture();
    let ca = Ca::new("CA");
    let dir = Dir::new("tls-h1");
    let (cert, key) = dir.write_leaf("a", &ca.leaf(Usage::Server, "a.test", &["a.test"], &[]));
    let hang = common::backend("hang", Behavior::Hang).await;
    let echo = common::backend("echo", Behavior::Echo).await;
    let tls = format!(r#"{{ cert = "{}", key = "{}" }}"#, path(&cert), path(&key));
    let extra = format!(
        "[pool.hang]\nendpoints = {}\n\n[[route]]\nmatch = {{ path_prefix = \"/hang\" }}\npool = \"hang\"\n",
        common::endpoints(&[&hang])
    );
    let toml = config(&echo, &tls, &extra).replacen("[[listener]]", "[proxy]\naccess_log = true\n\n[[listener]]", 1);
    let proxy = common::proxy(&toml).await;
    let client = client_config(&ca, None, &["http/1.1"]);

    // Three requests on one kept-alive TLS connection, the last pipelined behind the second.
    let mut tls = connect(proxy.proxy_addr, &client, "a.test").await.expect("handshake");
    tls.write_all(b"GET /one HTTP/1.1\r\nhost: a.test\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tls.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    tls.write_all(b"POST /two HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /three HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    while got.windows(12).filter(|w| *w == b"HTTP/1.1 200").count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.expect("in time").expect("read");
        assert!(n > 0, "the connection stays open");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("\"uri\":\"/two\"") && text.contains("\"body\":\"abc\"") && text.contains("\"uri\":\"/three\""),
        "{text}"
    );
    assert_eq!(echo.connections.load(Ordering::SeqCst), 1, "the upstream connection is reused too");

    // Gone before the response head: cancelled, 499.
    let mut tls = connect(proxy.proxy_addr, &client, "a.test").await.expect("handshake");
    tls.write_all(b"GET /hang HTTP/1.1\r\nhost: a.test\r\nx-request-id: left-over-tls\r\n\r\n").await.expect("write");
    // Leaves once the request is waiting at the upstream.
    common::until("the request reaches the hanging upstream", || hang.requests.load(Ordering::SeqCst) == 1).await;
    drop(tls);
    let line = captured.line_of("left-over-tls").await;
    assert_eq!(line["status"], 499, "{line}");
    proxy.shutdown().await;
}
