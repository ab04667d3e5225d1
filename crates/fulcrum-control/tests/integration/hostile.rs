//! Bad admin API payloads over a real socket (issue 20, the hostile-input suite): invalid
//! JSON or TOML, wrong types, deep nesting and huge bodies to the calls that change things.
//! Each gets a 4xx, never a 5xx; nothing changes; other calls are answered within 2 s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fulcrum_control::admin::app;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The admin API of `admin::state`'s proxy (pool `llm`, endpoints `a` and `b`), served on 127.0.0.1, port 0.
async fn admin() -> SocketAddr {
    let state = crate::admin::state().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app(state)).await;
    });
    addr
}

/// One raw call; the status (0: closed without an answer) and the whole answer.
async fn raw_call(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (mut r, mut w) = s.split();
    let write = async {
        let _ = w.write_all(head.as_bytes()).await;
        let _ = w.write_all(body).await;
    };
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut out));
    let ((), read) = tokio::join!(write, read);
    assert!(read.is_ok(), "{method} {path}: no answer or close within 10 s");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_payloads_are_4xx_and_change_nothing() {
    let addr = admin().await;
    let json = "application/json";
    let deep = "[".repeat(100_000);
    let huge_json = format!("{{\"address\":\"{}\"}}", "x".repeat(2 << 20));
    let huge_toml = format!("# {}\n", "x".repeat(2 << 20));
    let cases: Vec<(&str, &str, &str, &str, Vec<u8>)> = vec![
        ("config: not TOML", "PUT", "/config", "text/plain", b"[[[ listener".to_vec()),
        ("config: wrong types", "PUT", "/config", "text/plain", b"[[listener]]\nname = 1\naddress = []\n".to_vec()),
        ("config: binary", "PUT", "/config", "text/plain", vec![0, 0xff, 0xfe, 0, 1, 2, b'[']),
        ("config: nested arrays", "PUT", "/config", "text/plain", format!("x = {deep}").into_bytes()),
        ("config: over 1 MiB", "PUT", "/config", "text/plain", huge_toml.into_bytes()),
        ("endpoint: not JSON", "POST", "/pools/llm/endpoints", json, b"{not json".to_vec()),
        ("endpoint: address a number", "POST", "/pools/llm/endpoints", json, br#"{"address":5}"#.to_vec()),
        ("endpoint: nested", "POST", "/pools/llm/endpoints", json, deep.clone().into_bytes()),
        (
            "endpoint: weight overflows",
            "POST",
            "/pools/llm/endpoints",
            json,
            br#"{"address":"127.0.0.1:11","weight":1e999}"#.to_vec(),
        ),
        (
            "endpoint: negative weight",
            "POST",
            "/pools/llm/endpoints",
            json,
            br#"{"address":"127.0.0.1:11","weight":-1}"#.to_vec(),
        ),
        ("endpoint: over 1 MiB", "POST", "/pools/llm/endpoints", json, huge_json.into_bytes()),
        (
            "endpoint: not JSON typed",
            "POST",
            "/pools/llm/endpoints",
            "text/plain",
            br#"{"address":"127.0.0.1:11"}"#.to_vec(),
        ),
        ("endpoint: unknown pool", "POST", "/pools/nope/endpoints", json, br#"{"address":"127.0.0.1:11"}"#.to_vec()),
        ("weight: a string", "PUT", "/pools/llm/endpoints/a/weight", json, br#"{"weight":"heavy"}"#.to_vec()),
        (
            "weight: over u64",
            "PUT",
            "/pools/llm/endpoints/a/weight",
            json,
            br#"{"weight":18446744073709551616}"#.to_vec(),
        ),
        ("weight: empty", "PUT", "/pools/llm/endpoints/a/weight", json, Vec::new()),
        ("policy: unknown", "PUT", "/pools/llm/policy", json, br#"{"policy":"fastest_please"}"#.to_vec()),
        (
            "policy: bad table size",
            "PUT",
            "/pools/llm/policy",
            json,
            br#"{"policy":{"name":"maglev","table_size":-1}}"#.to_vec(),
        ),
        ("policy: nested", "PUT", "/pools/llm/policy", json, format!("{{\"policy\":{deep}").into_bytes()),
        ("policy: NUL", "PUT", "/pools/llm/policy", json, b"{\"policy\":\"random\0\"}".to_vec()),
    ];
    let mut failures = Vec::new();
    for (name, method, path, content_type, body) in cases {
        let (status, answer) = raw_call(addr, method, path, content_type, &body).await;
        if !(400..500).contains(&status) {
            failures.push(format!("{name}: {status}: {}", &answer[..answer.len().min(300)]));
        }
    }
    assert!(failures.is_empty(), "bad admin payloads:\n{}", failures.join("\n"));
    // Nothing changed, and the API still answers at once.
    let started = Instant::now();
    let (status, answer) = raw_call(addr, "GET", "/config", "text/plain", b"").await;
    assert_eq!(status, 200, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "GET /config took {:?}", started.elapsed());
    assert!(answer.contains("\"generation\":1"), "the configuration changed: {answer}");
    let (status, answer) = raw_call(addr, "GET", "/pools/llm", "text/plain", b"").await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("least_connections"), "the policy changed: {answer}");
}
