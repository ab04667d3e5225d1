//! HTTP self-registration over real sockets: the registration routes served on 127.0.0.1,
//! backends registering with `register_http`, heartbeats keeping them, silence removing them.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum_config::discovery::{DiscoveryConfig, RegistrationDiscovery};
use fulcrum_core::EndpointSpec;
use fulcrum_core::membership::LeaseLimits;
use fulcrum_discovery::{Discovery, StatusBoard, register_http, registration_router};
use support::*;

const TTL: Duration = Duration::from_millis(600);

/// Serves the registration routes; returns the admin URL.
async fn serve(discovery: &Discovery) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address: SocketAddr = listener.local_addr().expect("address");
    let app = registration_router(discovery.registry().clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn setup() -> (Arc<RecordingSink>, Arc<StatusBoard>, Discovery) {
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let discovery = Discovery::new(sink.clone(), status.clone());
    let limits = LeaseLimits { default_ttl: TTL, min_ttl: Duration::from_millis(100), ..LeaseLimits::default() };
    discovery.spawn("llama", DiscoveryConfig::Registration(RegistrationDiscovery { limits }));
    (sink, status, discovery)
}

fn spec(port: u16, id: &str) -> EndpointSpec {
    EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port))).with_id(id)
}

#[tokio::test]
async fn heartbeats_keep_a_registration_and_silence_removes_it_after_its_ttl() {
    let (sink, status, discovery) = setup();
    let url = serve(&discovery).await;
    let steady = register_http(&url, "llama", &spec(9001, "steady"), TTL, None).await.expect("register");
    let silent = register_http(&url, "llama", &spec(9002, "silent"), TTL, None).await.expect("register");
    sink.wait_for("llama", WAIT, "both registered", |s| s.len() == 2).await;

    // Heartbeats (every TTL/3) keep both through several TTLs.
    tokio::time::sleep(TTL * 4).await;
    assert_eq!(sink.last("llama").map(|s| ids(&s)), Some(vec!["silent".to_owned(), "steady".to_owned()]));
    let listed = discovery.registry().list("llama").expect("list");
    assert!(listed.iter().all(|l| l.renewals >= 3), "{listed:?}");

    // Silence: gone once its TTL has passed since the last heartbeat, and not before.
    let stopped = Instant::now();
    silent.stop_heartbeats();
    sink.wait_for("llama", TTL + Duration::from_secs(2), "the silent one expiring", |s| ids(s) == ["steady"]).await;
    let after = stopped.elapsed();
    println!("removed {after:?} after the heartbeats stopped");
    assert!(after >= TTL / 2, "removed before its TTL could pass: {after:?}");

    // A clean leave is immediate.
    let left = Instant::now();
    steady.deregister().await.expect("deregister");
    sink.wait_for("llama", TTL, "the clean leave", <[EndpointSpec]>::is_empty).await;
    assert!(left.elapsed() < TTL);
    assert_eq!(status.get("llama").map(|s| s.kind), Some("registration"));
}

#[tokio::test]
async fn a_forgotten_registration_registers_again_on_its_next_heartbeat() {
    let (sink, _status, discovery) = setup();
    let url = serve(&discovery).await;
    let _r = register_http(&url, "llama", &spec(9001, "a"), TTL, None).await.expect("register");
    sink.wait_for("llama", WAIT, "registered", |s| s.len() == 1).await;
    // The proxy forgets it (as after a restart).
    discovery.registry().remove("llama", "a").expect("remove");
    sink.wait_for("llama", WAIT, "forgotten", <[EndpointSpec]>::is_empty).await;
    // The next heartbeat gets a 404 and registers again.
    sink.wait_for("llama", TTL * 2, "back", |s| ids(s) == ["a"]).await;
}

#[tokio::test]
async fn refusals_are_errors_with_the_proxys_message() {
    let (_sink, _status, discovery) = setup();
    let url = serve(&discovery).await;
    let e = register_http(&url, "nope", &spec(9001, "a"), TTL, None).await.unwrap_err().to_string();
    assert!(e.contains("HTTP 404") && e.contains("no pool named `nope` accepts registrations"), "{e}");
    let e =
        register_http(&url, "llama", &spec(9001, "a"), Duration::from_millis(10), None).await.unwrap_err().to_string();
    assert!(e.contains("HTTP 400") && e.contains("ttl"), "{e}");
    let refused = format!("http://{}", refused_address());
    let e = register_http(&refused, "llama", &spec(9001, "a"), TTL, None).await.unwrap_err().to_string();
    assert!(e.contains("cannot reach"), "{e}");
}

/// One HTTP/1.1 request on its own connection; the status and the body.
async fn http(url: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(address).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_detector_removes_a_silent_backend_long_before_its_ttl() {
    let sink = RecordingSink::new();
    let discovery = Discovery::new(sink.clone(), Arc::new(StatusBoard::new()));
    // The defaults, as `discovery = { kind = "registration" }` gives them: phi above 8.
    discovery.spawn("llama", DiscoveryConfig::Registration(RegistrationDiscovery { limits: LeaseLimits::default() }));
    let url = serve(&discovery).await;
    let body = r#"{"address":"127.0.0.1:9001","id":"fast","ttl_ms":30000}"#;
    let (status, answer) = http(&url, "POST", "/pools/llama/registrations", body).await;
    assert_eq!(status, 201, "{answer}");
    sink.wait_for("llama", WAIT, "registered", |s| ids(s) == ["fast"]).await;

    // Heartbeats every 100 ms for two seconds.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, answer) = http(&url, "PUT", "/pools/llama/registrations/fast", "").await;
        assert_eq!(status, 200, "{answer}");
    }
    let (_, listed) = http(&url, "GET", "/pools/llama/registrations", "").await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let phi = listed["registrations"][0]["phi"].as_f64().expect("phi is shown once heartbeats are known");
    assert!(phi < 8.0, "{listed}");
    assert_eq!(sink.last("llama").map(|s| ids(&s)), Some(vec!["fast".to_owned()]), "it stayed while it beat");

    // It stops: gone within about a second, not after its 30 s TTL.
    let stopped = Instant::now();
    sink.wait_for("llama", Duration::from_secs(5), "the silent backend leaving", <[EndpointSpec]>::is_empty).await;
    let after = stopped.elapsed();
    println!("removed {after:?} after the heartbeats stopped (ttl 30 s)");
    assert!(after < Duration::from_millis(2_500), "{after:?}");
    assert!(after > Duration::from_millis(300), "removed before a heartbeat was even missed: {after:?}");
    // Its next heartbeat is told to register again.
    let (status, _) = http(&url, "PUT", "/pools/llama/registrations/fast", "").await;
    assert_eq!(status, 404);
}
