//! Discovery wired to a running proxy, end to end on 127.0.0.1: a watched file feeds one
//! pool and backends' self-registrations another; when the file goes bad the pool keeps
//! serving its last set and the failure shows in `/discovery` and `/metrics`; a reload
//! that rebuilds the pool keeps the discovered set.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common;

use common::{call, mock, status_of};
use fulcrum_config::Config;
use fulcrum_control::admin::AdminState;
use fulcrum_control::discover;
use fulcrum_discovery::testing::{TempDir, write_atomically};
use fulcrum_proxy::{Live, Proxy};

fn config(file: &std::path::Path, policy: &str) -> String {
    format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "filed"

[[route]]
match = {{ path_prefix = "/reg/" }}
pool = "registered"

[pool.filed]
policy = "{policy}"
endpoints = []
discovery = {{ kind = "file", path = "{}", interval = "100ms" }}

[pool.registered]
endpoints = []
discovery = {{ kind = "registration", ttl = "1s" }}
"#,
        file.display()
    )
}

fn addresses(live: &Live, pool: &str) -> Vec<SocketAddr> {
    live.pool(pool).expect("pool").snapshot().selector.endpoints().iter().map(|e| e.address()).collect()
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_sets_serve_and_survive_provider_failures_and_reloads() {
    let (a, b) = (mock().await, mock().await);
    let dir = TempDir::new("control-discovery");
    let file = dir.path().join("filed.toml");
    write_atomically(&file, &format!("endpoints = [{{ address = \"{}\" }}]\n", a.local_addr()));

    let text = config(&file, "round_robin");
    let proxy = Proxy::bind_with(Config::parse(&text, None).expect("config"), Some(text.as_str().into()), None)
        .await
        .expect("proxy");
    let addr = proxy.local_addr("public").expect("listener");
    let live = proxy.live().clone();
    tokio::spawn(proxy.run(std::future::pending()));
    let discovery = discover::for_live(&live);
    tokio::spawn(discover::supervise(live.clone(), discovery.clone()));
    let admin = AdminState::new(live.clone()).with_discovery(discovery);

    // The file's set serves.
    until("the file's endpoint joins", async || addresses(&live, "filed") == [a.local_addr()]).await;
    assert_eq!(status_of(addr, "/v1/models").await, 200);

    // The file goes bad: the last set keeps serving; the failure shows.
    write_atomically(&file, "endpoints = [{ address = \"not an address\" }]\n");
    until("the provider reports the bad file", async || {
        let (_, body) = call(&admin, "GET", "/discovery", "").await;
        body.contains(r#""state":"failing""#)
    })
    .await;
    assert_eq!(addresses(&live, "filed"), [a.local_addr()]);
    for _ in 0..5 {
        assert_eq!(status_of(addr, "/v1/models").await, 200, "the last set stopped serving");
    }
    let (_, metrics) = call(&admin, "GET", "/metrics", "").await;
    assert!(metrics.contains(r#"fulcrum_discovery_up{pool="filed",kind="file"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"fulcrum_discovery_endpoints{pool="filed",kind="file"} 1"#), "{metrics}");

    // A reload that rebuilds the pool (new policy) keeps the discovered set.
    let report = live.reload_text(&config(&file, "least_connections"), None).expect("reload");
    assert_eq!(report.rebuilt, ["filed"]);
    assert_eq!(addresses(&live, "filed"), [a.local_addr()]);
    assert_eq!(status_of(addr, "/v1/models").await, 200);

    // The file is fixed with two endpoints: both join.
    write_atomically(
        &file,
        &format!("endpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n", a.local_addr(), b.local_addr()),
    );
    until("the fixed file applies", async || addresses(&live, "filed").len() == 2).await;

    // A backend registers through the admin API and serves; silent, it expires.
    let (status, body) = call(
        &admin,
        "POST",
        "/pools/registered/registrations",
        &format!(r#"{{"address":"{}","ttl_ms":1000}}"#, b.local_addr()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    until("the registration joins", async || addresses(&live, "registered") == [b.local_addr()]).await;
    assert_eq!(status_of(addr, "/reg/v1/models").await, 404, "the mock answers, through the registered endpoint");
    until("the silent registration expires", async || addresses(&live, "registered").is_empty()).await;
    assert_eq!(status_of(addr, "/reg/v1/models").await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_through_the_api_is_never_echoed() {
    let dir = TempDir::new("control-no-echo");
    let secret = dir.path().join("secret.env");
    write_atomically(&secret, "SECRET-XYZ = \"hunter2-token\"\n");
    let json = dir.path().join("secret.json");
    write_atomically(&json, "{\"SECRET-XYZ\": \"hunter2-token\"}");
    let start = "[pool.p]\nendpoints = []\n";
    let proxy =
        Proxy::bind_with(Config::parse(start, None).expect("config"), Some(start.into()), None).await.expect("proxy");
    let live = proxy.live().clone();
    let discovery = discover::for_live(&live);
    tokio::spawn(discover::supervise(live.clone(), discovery.clone()));
    let admin = AdminState::new(live.clone()).with_discovery(discovery);

    let text = format!(
        "[pool.p]\nendpoints = []\n\
         [pool.leak]\nendpoints = []\ndiscovery = {{ kind = \"file\", path = \"{}\", interval = \"50ms\" }}\n\
         [pool.leak_json]\nendpoints = []\ndiscovery = {{ kind = \"file\", path = \"{}\", interval = \"50ms\" }}\n",
        secret.display(),
        json.display()
    );
    let (status, body) = call(&admin, "PUT", "/config", &text).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("SECRET-XYZ") && !body.contains("hunter2"), "{body}");
    until("both providers report their file", async || {
        let (_, body) = call(&admin, "GET", "/discovery", "").await;
        body.matches(r#""state":"failing""#).count() == 2
    })
    .await;
    for uri in ["/discovery", "/metrics", "/pools/leak", "/pools/leak/events"] {
        let (_, body) = call(&admin, "GET", uri, "").await;
        assert!(!body.contains("SECRET-XYZ") && !body.contains("hunter2"), "{uri}: {body}");
        if uri == "/discovery" {
            assert!(body.contains("not a valid endpoints file"), "{body}");
            assert!(body.contains("secret.env:1:1"), "names the file and the position: {body}");
        }
    }
}
