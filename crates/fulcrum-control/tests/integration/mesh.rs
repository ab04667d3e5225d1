//! Mesh mode against a real etcd server on loopback (Debian package `etcd-server`; .ci/run
//! installs it): three proxies follow one shared configuration; a change through any
//! proxy's admin API reaches all three within a second; with etcd stopped they keep serving
//! their last configuration and refuse changes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common;

use common::{mock, status_of};
use fulcrum_config::Config;
use fulcrum_control::admin::AdminState;
use fulcrum_control::mesh::{ControlUrl, Mesh};
use fulcrum_discovery::testing::Etcd;
use fulcrum_proxy::{Live, Proxy};

fn own_file(endpoint: SocketAddr) -> String {
    format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "llm"

[pool.llm]
policy = "round_robin"
endpoints = [{{ id = "first", address = "{endpoint}" }}]
"#
    )
}

struct Member {
    live: Live,
    admin: AdminState,
    addr: SocketAddr,
    mesh: Mesh,
}

async fn member(url: &ControlUrl, own: &str) -> Member {
    let config = Config::parse(own, None).expect("config");
    let proxy = Proxy::bind_with(config, Some(own.into()), None).await.expect("proxy");
    let addr = proxy.local_addr("public").expect("listener");
    let live = proxy.live().clone();
    tokio::spawn(proxy.run(std::future::pending()));
    let mesh = Mesh::new(url, own, live.clone()).expect("mesh");
    tokio::spawn(mesh.clone().run());
    let admin = AdminState::new(live.clone()).with_mesh(mesh.clone());
    Member { live, admin, addr, mesh }
}

async fn call(state: &AdminState, method: &str, uri: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = common::call(state, method, uri, body).await;
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

fn endpoint_ids(live: &Live) -> Vec<String> {
    let pool = live.pool("llm").expect("pool llm");
    pool.snapshot().selector.endpoints().iter().map(|e| e.id().to_string()).collect()
}

/// Waits until every member satisfies `done`; returns how long it took (at most 10 s).
async fn all_agree(members: &[Member], done: impl Fn(&Member) -> bool) -> Duration {
    let start = Instant::now();
    while !members.iter().all(&done) {
        assert!(start.elapsed() < Duration::from_secs(10), "the proxies did not agree in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_agree_within_a_second_and_keep_serving_without_etcd() {
    let Some(mut etcd) = Etcd::start().await else { return };
    let url: ControlUrl = format!("etcd://127.0.0.1:{}/test/mesh", etcd.port).parse().expect("url");
    let (first, second) = (mock().await, mock().await);

    // The first member publishes its pools; the others start from their own files (which
    // differ) and converge on the shared one.
    let a = member(&url, &own_file(first.local_addr())).await;
    all_agree(std::slice::from_ref(&a), |m| m.mesh.status().connected).await;
    let b = member(&url, &own_file(second.local_addr())).await;
    let c = member(&url, &own_file(second.local_addr())).await;
    let members = [a, b, c];
    // Each own file has an endpoint "first" too (at another address): the address tells
    // which one runs.
    let first_addr = first.local_addr().to_string();
    all_agree(&members, |m| {
        let pool = m.live.pool("llm").expect("pool");
        let endpoints = pool.snapshot().selector.endpoints().to_vec();
        m.mesh.status().connected
            && endpoints.len() == 1
            && endpoints[0].id().to_string() == "first"
            && endpoints[0].address().to_string() == first_addr
    })
    .await;

    // A change through one proxy's admin API reaches all three within a second.
    let body = format!(r#"{{"id":"second","address":"{}"}}"#, second.local_addr());
    let started = Instant::now();
    let (status, answer) = call(&members[1].admin, "POST", "/pools/llm/endpoints", &body).await;
    assert_eq!(status, 200, "{answer}");
    let took = started.elapsed().max(all_agree(&members, |m| endpoint_ids(&m.live) == ["first", "second"]).await);
    assert!(took < Duration::from_secs(1), "the change took {took:?} to reach every proxy");

    let started = Instant::now();
    let (status, answer) =
        call(&members[2].admin, "PUT", "/pools/llm/policy", r#"{"policy":"least_connections"}"#).await;
    assert_eq!(status, 200, "{answer}");
    let took = started.elapsed().max(
        all_agree(&members, |m| {
            m.live.pool("llm").expect("pool").config().policy.kind().as_str() == "least_connections"
        })
        .await,
    );
    assert!(took < Duration::from_secs(1), "the policy change took {took:?} to reach every proxy");
    // Each proxy still has its own listener, from its own file.
    let revision = members[2].mesh.status().revision;
    all_agree(&members, |m| m.mesh.status().revision == revision).await;
    for m in &members {
        assert_eq!(status_of(m.addr, "/v1/models").await, 200);
    }

    // An invalid change is refused before it reaches etcd.
    let (status, answer) = call(&members[0].admin, "PUT", "/pools/llm/policy", r#"{"policy":"nope"}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(members[1].mesh.status().revision, revision);

    // etcd stops: every proxy serves on with its last configuration; changes are refused
    // rather than applied to one proxy only.
    etcd.kill();
    let (status, answer) = call(&members[0].admin, "DELETE", "/pools/llm/endpoints/first", "").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["field"], "control");
    all_agree(&members, |m| !m.mesh.status().connected).await;
    for m in &members {
        assert_eq!(endpoint_ids(&m.live), ["first", "second"]);
        for _ in 0..4 {
            assert_eq!(status_of(m.addr, "/v1/models").await, 200, "a proxy stopped serving without etcd");
        }
    }
    let (status, answer) = call(&members[0].admin, "GET", "/control", "").await;
    assert_eq!(status, 200);
    assert_eq!(answer["mode"], "mesh");
    assert_eq!(answer["mesh"]["connected"], false);

    // etcd is back: the proxies reconnect and changes flow again.
    etcd.restart().await;
    all_agree(&members, |m| m.mesh.status().connected).await;
    let (status, answer) = call(&members[0].admin, "DELETE", "/pools/llm/endpoints/first", "").await;
    assert_eq!(status, 200, "{answer}");
    all_agree(&members, |m| endpoint_ids(&m.live) == ["second"]).await;
}

/// Mesh mode over an etcd that serves https and requires client certificates (mutual TLS to
/// the control plane): two proxies agree on a change made through one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_an_etcd_over_mutual_tls() {
    use fulcrum_config::{CertificateFiles, UpstreamTls};
    use fulcrum_discovery::testing::EtcdTls;
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let ca = Ca::new("mesh CA");
    let dir = Dir::new("mesh-tls");
    let (cert, key) = dir.write_leaf("etcd", &ca.leaf(Usage::ServerAndClient, "etcd", &["127.0.0.1"], &[]));
    let (proxy_cert, proxy_key) =
        dir.write_leaf("proxy", &ca.leaf(Usage::Client, "proxy", &[], &["spiffe://test/proxy"]));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let client = UpstreamTls {
        server_name: None,
        ca: Some(ca_file.clone()),
        client_cert: Some(CertificateFiles { cert: proxy_cert.clone(), key: proxy_key.clone() }),
    };
    let tls = EtcdTls { cert, key, client_ca: ca_file.clone(), client };
    let Some(etcd) = Etcd::start_tls(tls).await else { return };
    let url: ControlUrl = format!("etcds://127.0.0.1:{}/test/mesh-tls", etcd.port).parse().expect("url");
    let url = url.with_tls(Some(ca_file), Some(proxy_cert), Some(proxy_key)).expect("tls files");
    let (first, second) = (mock().await, mock().await);
    let a = member(&url, &own_file(first.local_addr())).await;
    all_agree(std::slice::from_ref(&a), |m| m.mesh.status().connected).await;
    let b = member(&url, &own_file(second.local_addr())).await;
    let members = [a, b];
    let first_addr = first.local_addr().to_string();
    all_agree(&members, |m| {
        let pool = m.live.pool("llm").expect("pool");
        let endpoints = pool.snapshot().selector.endpoints().to_vec();
        m.mesh.status().connected && endpoints.len() == 1 && endpoints[0].address().to_string() == first_addr
    })
    .await;
    let body = format!(r#"{{"id":"second","address":"{}"}}"#, second.local_addr());
    let (status, answer) = call(&members[1].admin, "POST", "/pools/llm/endpoints", &body).await;
    assert_eq!(status, 200, "{answer}");
    all_agree(&members, |m| m.mesh.status().connected && endpoint_ids(&m.live) == ["first", "second"]).await;

    // Without a client certificate the proxy cannot reach the control plane.
    let bare = format!("etcds://127.0.0.1:{}/test/mesh-tls", etcd.port).parse::<ControlUrl>().expect("url");
    let bare = bare.with_tls(Some(dir.path().join("ca.pem")), None, None).expect("tls files");
    let outsider = member(&bare, &own_file(first.local_addr())).await;
    // Waits for its first attempt to fail, not for a fixed time.
    let start = Instant::now();
    while outsider.mesh.status().last_error.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the outsider never reported its failure");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!outsider.mesh.status().connected, "a proxy without a client certificate is refused");
}
