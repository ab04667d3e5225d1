//! The hostile-input suite (issue 20, item 5), over raw sockets: request smuggling and
//! framing, size limits, slowloris, bodies that never end, HTTP/2 floods, nested and huge
//! JSON on an AI route. Every case checks the same three things:
//!
//! - the client gets a clear 4xx or a close, never a 5xx (the backends are healthy);
//! - no backend ever receives a smuggled request (each case hides `/smuggled-CASE` where a
//!   wrong reading of the framing would make it a request of its own);
//! - other clients are served within 2 s all along (a prober runs through the whole suite),
//!   the endpoints are not blamed, and memory stays bounded after the floods.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a case may get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// A 4xx or a close.
    Refused,
    /// Exactly this status.
    Status(u16),
    /// Served (2xx), or refused: both are correct readings (RFC 9112 lets a server accept
    /// or refuse it), as long as nothing is smuggled.
    Either,
}

struct Case {
    name: &'static str,
    raw: Vec<u8>,
    want: Want,
}

/// A request hidden where a wrong reading of the framing would find it.
fn smuggled(case: &str) -> String {
    format!("GET /smuggled-{case} HTTP/1.1\r\nHost: x\r\n\r\n")
}

/// A POST with `headers` (CRLF-terminated lines) and `body` as is.
fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n{body}").into_bytes()
}

/// A chunked POST whose body ends at `0\r\n\r\n`, followed by a smuggled request, with a
/// `Content-Length` covering both (`cl` is a format with `{n}` for that length).
fn cl_te(case: &'static str, te_first: bool, te: &str) -> Case {
    let body = format!("0\r\n\r\n{}", smuggled(case));
    let cl = format!("Content-Length: {}\r\n", body.len());
    let te = format!("Transfer-Encoding: {te}\r\n");
    let headers = if te_first { format!("{te}{cl}") } else { format!("{cl}{te}") };
    Case { name: case, raw: post("/upload", &headers, &body), want: Want::Either }
}

/// What follows a case's request: a smuggled request when the request must be refused (a
/// proxy that took it would find the next request there). A request that is valid has no
/// other reading: what follows it is a request the client pipelined, so none is added.
fn tail(case: &'static str, want: Want) -> String {
    if want == Want::Refused { smuggled(case) } else { String::new() }
}

/// A chunked POST with the given chunked body (then the case's tail).
fn chunked(case: &'static str, te: &str, body: &str, want: Want) -> Case {
    let raw = post("/upload", &format!("Transfer-Encoding: {te}\r\n"), &format!("{body}{}", tail(case, want)));
    Case { name: case, raw, want }
}

/// A POST with these header lines and a 5-byte body (then the case's tail).
fn framed(case: &'static str, headers: &str, want: Want) -> Case {
    Case { name: case, raw: post("/upload", headers, &format!("hello{}", tail(case, want))), want }
}

fn cases() -> Vec<Case> {
    let big = |n: usize| "a".repeat(n);
    vec![
        // Content-Length with Transfer-Encoding: TE wins and the connection closes, or 400.
        cl_te("cl-then-te", false, "chunked"),
        cl_te("te-then-cl", true, "chunked"),
        cl_te("cl-te-uppercase", false, "CHUNKED"),
        cl_te("cl-te-tab", false, "\tchunked"),
        // Duplicate or conflicting lengths.
        framed("two-lengths", "Content-Length: 5\r\nContent-Length: 40\r\n", Want::Refused),
        framed("length-list", "Content-Length: 5, 40\r\n", Want::Refused),
        framed("length-plus", "Content-Length: +5\r\n", Want::Refused),
        framed("length-hex", "Content-Length: 0x5\r\n", Want::Refused),
        framed("length-space-inside", "Content-Length: 5 0\r\n", Want::Refused),
        framed("length-space-before-colon", "Content-Length : 5\r\n", Want::Refused),
        framed("same-length-twice", "Content-Length: 5\r\nContent-Length: 5\r\n", Want::Status(200)),
        // Transfer-Encoding variants.
        chunked("te-chunked-identity", "chunked, identity", "5\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("te-xchunked", "xchunked", "5\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("te-identity", "identity", "5\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("te-uppercase", "CHUNKED", "5\r\nhello\r\n0\r\n\r\n", Want::Status(200)),
        chunked("te-leading-tab", "\tchunked", "5\r\nhello\r\n0\r\n\r\n", Want::Status(200)),
        chunked("te-trailing-space", "chunked ", "5\r\nhello\r\n0\r\n\r\n", Want::Status(200)),
        chunked("te-gzip-chunked", "gzip, chunked", "5\r\nhello\r\n0\r\n\r\n", Want::Either),
        Case {
            name: "te-twice",
            raw: post(
                "/upload",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                &format!("5\r\nhello\r\n0\r\n\r\n{}", smuggled("te-twice")),
            ),
            want: Want::Refused,
        },
        Case {
            name: "te-space-before-colon",
            raw: post(
                "/upload",
                "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
                &format!("0\r\n\r\n{}", smuggled("te-space-before-colon")),
            ),
            want: Want::Refused,
        },
        // obs-fold (RFC 9112 5.2: refuse with 400 or unfold).
        Case {
            name: "obs-fold-te",
            raw: post(
                "/upload",
                "Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n",
                &format!("0\r\n\r\n{}", smuggled("obs-fold-te")),
            ),
            want: Want::Refused,
        },
        framed("obs-fold-header", "X-A: 1\r\n\tX-B: 2\r\nContent-Length: 5\r\n", Want::Refused),
        // Bad chunk sizes and extensions.
        chunked("chunk-size-not-hex", "chunked", "zz\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-size-overflow", "chunked", "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-size-negative", "chunked", "-5\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-size-0x", "chunked", "0x5\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-data-too-long", "chunked", "3\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-extension", "chunked", "5;name=value\r\nhello\r\n0\r\n\r\n", Want::Status(200)),
        chunked("chunk-extension-quoted", "chunked", "5;a=\"b;c\"\r\nhello\r\n0\r\n\r\n", Want::Status(200)),
        chunked("chunk-extension-bare-lf", "chunked", "5;a\nb\r\nhello\r\n0\r\n\r\n", Want::Refused),
        chunked("chunk-bare-lf-after-size", "chunked", "5\nhello\r\n0\r\n\r\n", Want::Either),
        chunked("chunk-last-without-crlf", "chunked", "5\r\nhello\r\n0\r\n", Want::Refused),
        // Bare LF line endings, NUL and spaces in names, and other damaged heads.
        Case {
            name: "bare-lf-head",
            raw: b"GET /bare-lf HTTP/1.1\nHost: x\n\n".to_vec(),
            want: Want::Either,
        },
        Case {
            name: "bare-cr-head",
            raw: format!("GET /bare-cr HTTP/1.1\rHost: x\r\r{}", smuggled("bare-cr-head")).into_bytes(),
            want: Want::Refused,
        },
        framed("nul-in-name", "X-\0A: 1\r\nContent-Length: 5\r\n", Want::Refused),
        framed("space-in-name", "X A: 1\r\nContent-Length: 5\r\n", Want::Refused),
        framed("nul-in-value", "X-A: 1\x002\r\nContent-Length: 5\r\n", Want::Refused),
        framed("empty-name", ": 1\r\nContent-Length: 5\r\n", Want::Refused),
        Case { name: "http-0.9", raw: b"GET /\r\n\r\n".to_vec(), want: Want::Refused },
        Case { name: "http-2.0-line", raw: b"GET / HTTP/2.0\r\nHost: x\r\n\r\n".to_vec(), want: Want::Refused },
        Case { name: "binary-junk", raw: vec![0x16, 0x03, 0x01, 0x00, 0xff, 0, 0, 0, 0, 0], want: Want::Refused },
        // Sizes: the head limit is 64 KiB (431), a body over max_body_bytes is 413.
        Case {
            name: "head-65k",
            raw: format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", big(65 * 1024)).into_bytes(),
            want: Want::Status(431),
        },
        Case {
            name: "head-many-small-headers-65k",
            raw: format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(700)).into_bytes(),
            want: Want::Status(431),
        },
        Case {
            name: "head-60k",
            raw: format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", big(60 * 1024)).into_bytes(),
            want: Want::Status(200),
        },
        Case {
            name: "uri-70k",
            raw: format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", big(70 * 1024)).into_bytes(),
            want: Want::Refused,
        },
        Case {
            name: "body-over-limit-declared",
            raw: post("/v1/chat/completions", &format!("Content-Length: {}\r\n", 300_000), "{"),
            want: Want::Status(413),
        },
        Case {
            name: "body-over-limit-chunked",
            raw: post(
                "/v1/chat/completions",
                "Transfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{}\r\n0\r\n\r\n", 300_000, big(300_000)),
            ),
            want: Want::Status(413),
        },
        // JSON on the AI route (policy prefix_affinity reads the body).
        json_case("json-nested-100k", "[".repeat(100_000), Want::Either),
        json_case(
            "json-nested-in-messages",
            format!("{{\"model\":\"m\",\"messages\":{}", "[{\"content\":".repeat(10_000)),
            Want::Either,
        ),
        json_case(
            "json-huge-prompt",
            format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", big(140_000)),
            Want::Status(200),
        ),
        json_case(
            "json-many-messages",
            format!(
                "{{\"model\":\"m\",\"messages\":[{}{{\"role\":\"user\",\"content\":\"x\"}}]}}",
                "{\"role\":\"user\",\"content\":\"x\"},".repeat(4_000)
            ),
            Want::Status(200),
        ),
        json_case("json-over-limit", format!("{{\"model\":\"m\",\"prompt\":\"{}\"}}", big(300_000)), Want::Status(413)),
        json_case("json-not-json", "\u{0}\u{1}garbage{".to_owned(), Want::Either),
    ]
}

fn json_case(name: &'static str, body: String, want: Want) -> Case {
    let raw = post(
        "/v1/chat/completions",
        &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()),
        &body,
    );
    Case { name, raw, want }
}

/// Everything the proxy answers on one connection, until it closes (bounded): the bytes,
/// and whether it closed.
async fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Write and read at once: the proxy may answer (and close) before reading all of it.
    let (mut r, mut w) = s.split();
    let write = async {
        let _ = w.write_all(raw).await;
    };
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let (_, closed) = tokio::join!(write, async { tokio::time::timeout(within, read).await.unwrap_or(false) });
    (out, closed)
}

/// The status codes of the responses in `bytes` (status lines at the start of a response).
fn statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("HTTP/1.1 ") {
        let code = rest[i + 9..].get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        out.push(code);
        rest = &rest[i + 9..];
    }
    out
}

/// A prober: a GET every 100 ms on a new connection; returns the slowest answer and any
/// failure, when `stop` fires.
fn prober(addr: SocketAddr) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<(Duration, Vec<String>)>) {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut failures = Vec::new();
        loop {
            let started = Instant::now();
            let probe = tokio::time::timeout(Duration::from_secs(5), async {
                let (out, _) = exchange(
                    addr,
                    b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    Duration::from_secs(5),
                )
                .await;
                statuses(&out).first().copied().unwrap_or(0)
            })
            .await;
            worst = worst.max(started.elapsed());
            match probe {
                Ok(200) => {}
                other => failures.push(format!("probe at {:?}: {other:?}", started)),
            }
            tokio::select! {
                _ = &mut rx => return (worst, failures),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    (tx, task)
}

/// The proxy under test: a plain pool, an AI route whose pool reads bodies, short timeouts.
async fn hostile_proxy() -> (Running, Backend, Backend) {
    let plain = backend("plain", Behavior::Echo).await;
    let ai = backend("ai", Behavior::Echo).await;
    let toml = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "plain"
header_read_timeout = "1s"
body_read_timeout = "1s"
max_body_bytes = 200000

[[route]]
match = {{ path_prefix = "/v1/" }}
pool = "ai"

[pool.plain]
first_byte_timeout = "2s"
endpoints = {}

[pool.ai]
policy = "prefix_affinity"
first_byte_timeout = "2s"
endpoints = {}
"#,
        endpoints(&[&plain]),
        endpoints(&[&ai])
    );
    (proxy(&toml).await, plain, ai)
}

/// Neither endpoint was blamed for what clients did.
fn unharmed(running: &Running) {
    for pool in &running.pools {
        let snapshot = pool.snapshot();
        for e in snapshot.selector.endpoints() {
            let s = e.signals();
            assert_eq!(s.consecutive_failures(), 0, "{}: a client's fault was counted against it", e.id());
            assert!(s.is_available(fulcrum_proxy::clock::now()), "{}: taken out by clients' faults", e.id());
        }
    }
}

fn nothing_smuggled(backends: &[&Backend]) {
    for b in backends {
        let targets = b.targets.lock().expect("targets");
        let smuggled: Vec<_> = targets.iter().filter(|t| t.contains("smuggled")).collect();
        assert!(smuggled.is_empty(), "{} received smuggled requests: {smuggled:?}", b.name);
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_framing_smuggling_sizes_and_json() {
    let (running, plain, ai) = hostile_proxy().await;
    let addr = running.proxy_addr;
    let (stop_probe, probe) = prober(addr);
    let tasks: Vec<_> = cases()
        .into_iter()
        .map(|case| {
            tokio::spawn(async move {
                let (out, closed) = exchange(addr, &case.raw, Duration::from_secs(6)).await;
                (
                    case.name,
                    case.want,
                    statuses(&out),
                    closed,
                    String::from_utf8_lossy(&out[..out.len().min(300)]).into_owned(),
                )
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        let (name, want, got, closed, head) = t.await.expect("case task");
        let first = got.first().copied();
        eprintln!("{name}: {got:?} closed={closed}");
        let ok = match want {
            Want::Status(s) => first == Some(s),
            // No answer counts only if the proxy closed the connection (not if it hung).
            Want::Refused => first.map_or(closed, |s| (400..500).contains(&s)),
            Want::Either => first.map_or(closed, |s| (200..300).contains(&s) || (400..500).contains(&s)),
        };
        if !ok || got.iter().any(|s| *s >= 500) {
            failures.push(format!("{name}: wanted {want:?}, got {got:?} (closed: {closed}): {head:?}"));
        }
        // One answer per connection at most, for the one request a client sent: a second
        // one would be a request found in the first one's body.
        if got.len() > 1 {
            failures.push(format!("{name}: {} answers on one connection: {got:?}", got.len()));
        }
    }
    let _ = stop_probe.send(());
    let (worst, probe_failures) = probe.await.expect("prober");
    eprintln!("slowest probe meanwhile: {worst:?}");
    assert!(failures.is_empty(), "hostile cases failed:\n{}", failures.join("\n"));
    assert!(probe_failures.is_empty(), "other clients were not served: {probe_failures:?}");
    assert!(worst < Duration::from_secs(2), "another client waited {worst:?}");
    nothing_smuggled(&[&plain, &ai]);
    unharmed(&running);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_endless_bodies_are_cut_off() {
    let (running, plain, ai) = hostile_proxy().await;
    let addr = running.proxy_addr;
    let (stop_probe, probe) = prober(addr);
    // A head trickled a byte every 100 ms, past header_read_timeout (1 s).
    let slowloris = tokio::spawn(async move {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!("GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n", "a".repeat(200));
        for b in head.as_bytes() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut byte = [0u8; 1];
            // Closed (or answered) while trickling: stop.
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut byte)).await {
                break;
            }
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        started.elapsed()
    });
    // Chunked bodies that never end, on a plain route (streamed) and an AI route (read).
    let endless = |path: &'static str| {
        tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
            s.write_all(head.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while started.elapsed() < Duration::from_secs(8) {
                if s.write_all(b"1\r\nx\r\n").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
                if !out.is_empty() && out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            (started.elapsed(), statuses(&out))
        })
    };
    let plain_body = endless("/upload");
    let ai_body = endless("/v1/chat/completions");

    let slow = slowloris.await.expect("slowloris");
    eprintln!("slowloris: closed after {slow:?}");
    assert!(slow < Duration::from_secs(3), "a slowloris head held its connection for {slow:?}");
    for (what, task) in [("plain route", plain_body), ("AI route", ai_body)] {
        let (took, got) = task.await.expect("endless body");
        eprintln!("endless chunked body, {what}: {got:?} after {took:?}");
        assert!(took < Duration::from_secs(6), "{what}: an endless chunked body ran for {took:?} ({got:?})");
        assert!(got.iter().all(|s| (400..500).contains(s)), "{what}: an endless body got {got:?}");
    }
    let _ = stop_probe.send(());
    let (worst, probe_failures) = probe.await.expect("prober");
    assert!(probe_failures.is_empty(), "other clients were not served: {probe_failures:?}");
    assert!(worst < Duration::from_secs(2), "another client waited {worst:?}");
    nothing_smuggled(&[&plain, &ai]);
    unharmed(&running);
    running.shutdown().await;
}

// === HTTP/2, hand-rolled frames ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small frame");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A GET / header block (HPACK: `:method GET`, `:path /`, `:scheme http` from the static
/// table, `:authority x` as a literal).
const GET_BLOCK: [u8; 6] = [0x82, 0x84, 0x86, 0x41, 0x01, b'x'];

/// The preface and an empty SETTINGS frame.
fn h2_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    out
}

/// Writes `bytes` and reads what comes back until the connection closes or `within` ends;
/// whether it closed, and the bytes read.
async fn h2_flood(addr: SocketAddr, bytes: Vec<u8>, within: Duration) -> (bool, usize) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.split();
    let write = async {
        for piece in bytes.chunks(64 * 1024) {
            if w.write_all(piece).await.is_err() {
                return;
            }
        }
    };
    let read = async {
        let mut n = 0;
        let mut buf = [0u8; 16 * 1024];
        let closed = tokio::time::timeout(within, async {
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
            }
        })
        .await
        .is_ok();
        (closed, n)
    };
    let ((), out) = tokio::join!(write, read);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_leave_the_proxy_serving() {
    let (running, plain, ai) = hostile_proxy().await;
    let addr = running.proxy_addr;
    let (stop_probe, probe) = prober(addr);
    let rss_before = rss_kib();

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once, in bulk.
    let mut rapid = h2_start();
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        frame(&mut rapid, HEADERS, END_STREAM | END_HEADERS, id, &GET_BLOCK);
        frame(&mut rapid, RST_STREAM, 0, id, &8u32.to_be_bytes());
    }
    // CONTINUATION flood (CVE-2024-27316): one header block that never ends, 8 MB of it.
    let mut continuation = h2_start();
    frame(&mut continuation, HEADERS, END_STREAM, 1, &GET_BLOCK);
    let mut field = vec![0x00, 0x05];
    field.extend_from_slice(b"x-abc");
    field.push(100);
    field.extend_from_slice(&[b'a'; 100]);
    let payload: Vec<u8> = field.iter().copied().cycle().take(field.len() * 150).collect();
    for _ in 0..500 {
        frame(&mut continuation, CONTINUATION, 0, 1, &payload);
    }
    // SETTINGS and PING floods: each asks for an answer.
    let mut settings = h2_start();
    for i in 0..50_000u32 {
        let mut p = vec![0x00, 0x03];
        p.extend_from_slice(&(100 + i % 50).to_be_bytes());
        frame(&mut settings, SETTINGS, 0, 0, &p);
    }
    let mut pings = h2_start();
    for i in 0..50_000u64 {
        frame(&mut pings, PING, 0, 0, &i.to_be_bytes());
    }

    let (rapid, continuation, settings, pings) = tokio::join!(
        h2_flood(addr, rapid, Duration::from_secs(5)),
        h2_flood(addr, continuation, Duration::from_secs(5)),
        h2_flood(addr, settings, Duration::from_secs(5)),
        h2_flood(addr, pings, Duration::from_secs(5)),
    );
    // An endless header block cannot be answered: the connection is closed (GOAWAY first).
    assert!(continuation.0, "a CONTINUATION flood kept its connection open ({} bytes back)", continuation.1);
    // The others may be served or closed; what matters is below. Said for the record:
    eprintln!("rapid reset: closed {}; SETTINGS flood: closed {}; PING flood: closed {}", rapid.0, settings.0, pings.0);

    let rss_after = rss_kib();
    let _ = stop_probe.send(());
    let (worst, probe_failures) = probe.await.expect("prober");
    assert!(probe_failures.is_empty(), "other clients were not served: {probe_failures:?}");
    assert!(worst < Duration::from_secs(2), "another client waited {worst:?}");
    // Generous: other tests run in this process too. The floods sent 8 MB and 1.5 MB.
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!("RSS {rss_before} KiB before the HTTP/2 floods, {rss_after} KiB after");
    assert!(grown < 256 * 1024, "RSS grew by {grown} KiB during the HTTP/2 floods");
    // Rapid resets reach the backend at most once each, never more.
    assert!(plain.requests.load(std::sync::atomic::Ordering::SeqCst) <= 5_000 + 200);
    nothing_smuggled(&[&plain, &ai]);
    unharmed(&running);
    running.shutdown().await;
}
