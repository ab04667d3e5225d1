//! etcd: the client's calls, the `etcd` provider, self-registration under a lease, and what
//! happens when etcd goes away, against a real etcd of the test's own on loopback.
//!
//! Without the `etcd` binary (Debian package etcd-server; scripts/install-test-deps.sh
//! installs it) each test prints a SKIPPED line, unless the CI environment variable is set:
//! then it fails, so CI cannot pass without running them.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum_config::discovery::{DiscoveryConfig, EtcdDiscovery};
use fulcrum_core::EndpointSpec;
use fulcrum_discovery::etcd::{CasOutcome, EtcdClient, EventKind};
use fulcrum_discovery::{
    Discovery, Heartbeat, ProviderState, RegisterArgs, RegisterTarget, StatusBoard, register_etcd, run_register,
};
use support::*;

const PREFIX: &str = "/fulcrum/pools/llama/endpoints/";

fn provider(etcd: &Etcd) -> DiscoveryConfig {
    DiscoveryConfig::Etcd(EtcdDiscovery {
        endpoints: vec![etcd.client_url.clone()],
        prefix: PREFIX.to_owned(),
        timeout: Duration::from_secs(2),
        tls: None,
    })
}

fn start(etcd: &Etcd) -> (Arc<RecordingSink>, Arc<StatusBoard>, tokio::task::JoinHandle<()>) {
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", provider(etcd));
    (sink, status, task)
}

#[tokio::test]
async fn the_client_reads_writes_swaps_watches_and_leases() {
    let Some(etcd) = Etcd::start().await else { return };
    let c = etcd.client();
    let r1 = c.put("/mesh/config", "v1").await.expect("put");
    c.put("/mesh/other", "x").await.expect("put");
    c.put("/meshy", "not under the prefix").await.expect("put");
    let kv = c.get("/mesh/config").await.expect("get").expect("present");
    assert_eq!((kv.value_str(), kv.mod_revision), ("v1".into(), r1));
    assert!(c.get("/absent").await.expect("get").is_none());
    let range = c.get_prefix("/mesh/").await.expect("range");
    assert_eq!(
        range.kvs.iter().map(|kv| kv.key_str().into_owned()).collect::<Vec<_>>(),
        ["/mesh/config", "/mesh/other"]
    );
    assert!(range.revision >= r1);

    // Compare-and-swap on mod_revision.
    let mut watch = c.watch_key("/mesh/config", range.revision + 1).await.expect("watch");
    let CasOutcome::Swapped { revision: r2 } = c.compare_and_swap("/mesh/config", r1, "v2").await.expect("cas") else {
        panic!("the first swap should win")
    };
    match c.compare_and_swap("/mesh/config", r1, "v3").await.expect("cas") {
        CasOutcome::Conflict { current: Some(kv) } => assert_eq!((kv.value_str(), kv.mod_revision), ("v2".into(), r2)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(matches!(c.compare_and_swap("/mesh/new", 0, "n").await.expect("cas"), CasOutcome::Swapped { .. }));
    assert!(matches!(c.compare_and_swap("/mesh/new", 0, "n").await.expect("cas"), CasOutcome::Conflict { .. }));

    // The watch saw the swap, with the value before it.
    let batch = tokio::time::timeout(WAIT, watch.next()).await.expect("in time").expect("batch");
    assert_eq!(batch.events.len(), 1);
    let event = &batch.events[0];
    assert_eq!((event.kind, event.kv.value_str()), (EventKind::Put, "v2".into()));
    assert_eq!(event.prev_kv.as_ref().map(|kv| kv.value_str().into_owned()), Some("v1".to_owned()));

    assert_eq!(c.delete("/mesh/other").await.expect("delete"), 1);
    assert_eq!(c.delete_prefix("/mesh/").await.expect("delete"), 2);
    let batch = tokio::time::timeout(WAIT, watch.next()).await.expect("in time").expect("batch");
    assert_eq!(batch.events[0].kind, EventKind::Delete);

    // Leases: a key under a revoked lease is gone; keep-alive of a gone lease says so.
    let lease = c.lease_grant(Duration::from_secs(30)).await.expect("grant");
    assert_eq!(lease.ttl, Duration::from_secs(30));
    c.put_with_lease("/mesh/leased", "x", lease.id).await.expect("put");
    assert!(c.lease_keepalive(lease.id).await.expect("keepalive").is_some());
    c.lease_revoke(lease.id).await.expect("revoke");
    assert!(c.get("/mesh/leased").await.expect("get").is_none());
    assert_eq!(c.lease_keepalive(lease.id).await.expect("keepalive"), None);
    c.lease_revoke(lease.id).await.expect("revoking twice is fine");
    let e = c.put_with_lease("/mesh/leased", "x", lease.id).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

/// The claim of mesh mode's batch ownership: two proxies create one key, each under its own
/// lease; one wins, the other sees whose it is; the loser cannot delete it; once the
/// winner's lease is revoked (its proxy died) the key is gone and the other wins.
#[tokio::test]
async fn a_key_created_if_absent_under_a_lease_has_one_holder_until_the_lease_ends() {
    let Some(etcd) = Etcd::start().await else { return };
    let (a, b) = (etcd.client(), etcd.client());
    let key = "/test/batches/batch_1";
    let la = a.lease_grant(Duration::from_secs(30)).await.expect("grant").id;
    let lb = b.lease_grant(Duration::from_secs(30)).await.expect("grant").id;
    let (ca, cb) = tokio::join!(a.create_with_lease(key, "proxy a", la), b.create_with_lease(key, "proxy b", lb));
    let (ca, cb) = (ca.expect("claim a"), cb.expect("claim b"));
    let (winner, loser, (wl, ll)) = match (&ca, &cb) {
        (CasOutcome::Swapped { .. }, CasOutcome::Conflict { .. }) => (&a, &b, (la, lb)),
        (CasOutcome::Conflict { .. }, CasOutcome::Swapped { .. }) => (&b, &a, (lb, la)),
        other => panic!("exactly one claim must win: {other:?}"),
    };
    let CasOutcome::Conflict { current: Some(held) } = (if wl == la { &cb } else { &ca }) else {
        panic!("the loser is told who holds the key")
    };
    assert_eq!(held.lease, wl);
    // Claiming again, or deleting, as the loser changes nothing; as the winner, claiming
    // again is a conflict that names its own lease.
    assert!(matches!(loser.create_with_lease(key, "again", ll).await.expect("claim"), CasOutcome::Conflict { .. }));
    assert!(!loser.delete_if_lease(key, ll).await.expect("delete"));
    let kv = winner.get(key).await.expect("get").expect("still held");
    assert_eq!(kv.lease, wl);
    // The winner's lease ends: the key goes with it, and the other claim wins.
    winner.lease_revoke(wl).await.expect("revoke");
    assert!(loser.get(key).await.expect("get").is_none());
    assert!(matches!(loser.create_with_lease(key, "taken over", ll).await.expect("claim"), CasOutcome::Swapped { .. }));
    let kv = winner.get(key).await.expect("get").expect("held");
    assert_eq!((kv.lease, kv.value_str().into_owned()), (ll, "taken over".to_owned()));
    // The holder gives it up.
    assert!(!winner.delete_if_lease(key, wl).await.expect("delete"));
    assert!(loser.delete_if_lease(key, ll).await.expect("delete"));
    assert!(winner.get(key).await.expect("get").is_none());
}

#[tokio::test]
async fn puts_and_deletes_reach_the_pool_within_a_second() {
    let Some(etcd) = Etcd::start().await else { return };
    let c = etcd.client();
    c.put(format!("{PREFIX}a"), r#"{"address":"127.0.0.1:9001","weight":2}"#).await.expect("put");
    let (sink, status, task) = start(&etcd);
    let set = sink.wait_for("llama", WAIT, "the initial read", |s| s.len() == 1).await;
    assert_eq!((ids(&set), set[0].weight.get()), (vec!["a".to_owned()], 2));

    let put_at = Instant::now();
    c.put(format!("{PREFIX}b"), r#"{"address":"127.0.0.1:9002","models":["llama-3-8b"]}"#).await.expect("put");
    let set = sink.wait_for("llama", Duration::from_secs(1), "a put", |s| s.len() == 2).await;
    assert_eq!(ids(&set), ["a", "b"]);
    assert_eq!(set[1].labels.models, ["llama-3-8b"]);
    println!("put seen after {:?}", put_at.elapsed());

    let delete_at = Instant::now();
    c.delete(format!("{PREFIX}a")).await.expect("delete");
    sink.wait_for("llama", Duration::from_secs(1), "a delete", |s| ids(s) == ["b"]).await;
    println!("delete seen after {:?}", delete_at.elapsed());

    // A bad value is left out and listed; the rest still counts.
    c.put(format!("{PREFIX}broken"), "{not json").await.expect("put");
    c.put(format!("{PREFIX}c"), r#"{"address":"127.0.0.1:9003"}"#).await.expect("put");
    sink.wait_for("llama", Duration::from_secs(1), "c", |s| ids(s) == ["b", "c"]).await;
    eventually(WAIT, "the bad key is listed", || {
        status.get("llama").is_some_and(|s| s.rejected.iter().any(|r| r.starts_with(&format!("{PREFIX}broken: "))))
    })
    .await;
    assert_eq!(status.get("llama").map(|s| s.state), Some(ProviderState::Ok));
    task.abort();
}

#[tokio::test]
async fn a_registration_whose_heartbeats_stop_expires_and_leaves_the_pool() {
    let Some(etcd) = Etcd::start().await else { return };
    let c = etcd.client();
    let (sink, _status, task) = start(&etcd);
    let ttl = Duration::from_secs(2);
    let steady = EndpointSpec::new("127.0.0.1:9101".parse().expect("address")).with_id("steady");
    let silent = EndpointSpec::new("127.0.0.1:9102".parse().expect("address")).with_id("silent");
    let steady = register_etcd(&c, PREFIX, &steady, ttl).await.expect("register");
    let silent = register_etcd(&c, PREFIX.trim_end_matches('/'), &silent, ttl).await.expect("register");
    assert_eq!(silent.key(), format!("{PREFIX}silent"));
    sink.wait_for("llama", WAIT, "both registered", |s| s.len() == 2).await;

    // Heartbeats keep both through several TTLs.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(sink.last("llama").map(|s| s.len()), Some(2));
    assert_eq!(*steady.heartbeat().borrow(), Heartbeat::Alive);

    // The silent one stops renewing: etcd deletes its key when the lease runs out.
    let stopped = Instant::now();
    silent.stop_heartbeats();
    sink.wait_for("llama", ttl + Duration::from_secs(3), "the silent lease expiring", |s| ids(s) == ["steady"]).await;
    let gone_after = stopped.elapsed();
    println!("the silent registration left after {gone_after:?}");
    assert!(gone_after >= Duration::from_millis(500), "it left before its lease could expire: {gone_after:?}");

    // Leaving cleanly removes the key at once.
    let left = Instant::now();
    steady.deregister().await.expect("deregister");
    sink.wait_for("llama", Duration::from_secs(1), "the clean leave", <[EndpointSpec]>::is_empty).await;
    assert!(left.elapsed() < ttl);
    task.abort();
}

#[tokio::test]
async fn the_command_line_entry_point_registers_and_leaves() {
    let Some(etcd) = Etcd::start().await else { return };
    let (sink, _status, task) = start(&etcd);
    let args = RegisterArgs {
        target: RegisterTarget::Etcd { endpoints: vec![etcd.client_url.clone()], prefix: PREFIX.to_owned(), tls: None },
        address: "127.0.0.1:9201".parse().expect("address"),
        id: Some("cli".to_owned()),
        weight: Some(3),
        models: vec!["m".to_owned()],
        labels: vec![("zone".to_owned(), "a".to_owned())],
        ttl: Duration::from_secs(5),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(run_register(args, async {
        let _ = stopped.await;
    }));
    let set = sink.wait_for("llama", WAIT, "the CLI registration", |s| s.len() == 1).await;
    assert_eq!((ids(&set), set[0].weight.get(), set[0].labels.zone.as_deref()), (vec!["cli".to_owned()], 3, Some("a")));
    stop.send(()).expect("stop");
    tokio::time::timeout(WAIT, run).await.expect("in time").expect("join").expect("run_register");
    sink.wait_for("llama", Duration::from_secs(1), "the CLI leaving", <[EndpointSpec]>::is_empty).await;
    task.abort();
}

#[tokio::test]
async fn when_etcd_stops_the_last_set_stays_and_the_status_shows_it() {
    let Some(mut etcd) = Etcd::start().await else { return };
    let c = etcd.client();
    c.put(format!("{PREFIX}a"), r#"{"address":"127.0.0.1:9001"}"#).await.expect("put");
    c.put(format!("{PREFIX}b"), r#"{"address":"127.0.0.1:9002"}"#).await.expect("put");
    let (sink, status, task) = start(&etcd);
    sink.wait_for("llama", WAIT, "the initial read", |s| s.len() == 2).await;
    let applied = sink.sets("llama").len();

    etcd.kill();
    let s = wait_failing(&status, "llama", "cannot reach").await;
    assert_eq!(s.endpoints, Some(2));
    // It keeps trying, and keeps failing, without touching the pool.
    eventually(WAIT, "more failed attempts", || status.get("llama").is_some_and(|s| s.consecutive_failures >= 3)).await;
    assert_eq!(sink.sets("llama").len(), applied, "the last set stays");
    let s = status.get("llama").expect("status");
    println!("while etcd is down: {:?}", s.last_error);
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains(&etcd.client_url[7..])), "{s:?}");

    // etcd comes back (same data): the provider reads and watches again by itself.
    etcd.restart().await;
    eventually(WAIT, "recovery", || status.get("llama").is_some_and(|s| s.state == ProviderState::Ok)).await;
    etcd.client().delete(format!("{PREFIX}a")).await.expect("delete");
    sink.wait_for("llama", WAIT, "a change after recovery", |s| ids(s) == ["b"]).await;
    task.abort();
}

#[tokio::test]
async fn etcd_over_https_with_client_certificates_feeds_a_pool() {
    use fulcrum_config::{CertificateFiles, UpstreamTls};
    use fulcrum_discovery::testing::EtcdTls;
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let ca = Ca::new("etcd CA");
    let dir = Dir::new("etcd-tls");
    let (cert, key) =
        dir.write_leaf("etcd", &ca.leaf(Usage::ServerAndClient, "etcd", &["127.0.0.1", "localhost"], &[]));
    let (client_cert, client_key) = dir.write_leaf("fulcrum", &ca.leaf(Usage::Client, "fulcrum", &[], &[]));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let client = UpstreamTls {
        server_name: None,
        ca: Some(ca_file.clone()),
        client_cert: Some(CertificateFiles { cert: client_cert, key: client_key }),
    };
    let etcd_client_cert = client.client_cert.clone();
    let tls = EtcdTls { cert, key, client_ca: ca_file.clone(), client: client.clone() };
    let Some(etcd) = Etcd::start_tls(tls).await else { return };
    assert!(etcd.client_url.starts_with("https://"), "{}", etcd.client_url);
    let c = etcd.client();
    c.put(format!("{PREFIX}a"), r#"{"address":"127.0.0.1:9001"}"#).await.expect("put over https");

    // Refused: no client certificate, and a CA that did not sign etcd's certificate.
    let url = [etcd.client_url.as_str()];
    let no_cert = UpstreamTls { client_cert: None, ..client.clone() };
    let err = EtcdClient::with_tls(&url, Duration::from_secs(2), Some(&no_cert)).expect("client").get("/x").await;
    assert!(err.is_err(), "no client certificate: refused");
    let other = dir.write("other.pem", &Ca::new("other").pem());
    let wrong_ca = UpstreamTls { ca: Some(other), ..client.clone() };
    let err = EtcdClient::with_tls(&url, Duration::from_secs(2), Some(&wrong_ca)).expect("client").get("/x").await;
    let err = err.expect_err("a server the CA did not sign: refused").to_string();
    assert!(err.contains("certificate"), "the error says why: {err}");

    // A pool fed by discovery over https.
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let config = DiscoveryConfig::Etcd(EtcdDiscovery {
        endpoints: vec![etcd.client_url.clone()],
        prefix: PREFIX.to_owned(),
        timeout: Duration::from_secs(2),
        tls: Some(client),
    });
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", config);
    sink.wait_for("llama", WAIT, "the initial read over https", |s| s.len() == 1).await;
    c.put(format!("{PREFIX}b"), r#"{"address":"127.0.0.1:9002"}"#).await.expect("put");
    sink.wait_for("llama", Duration::from_secs(2), "a watched put over https", |s| ids(s) == ["a", "b"]).await;

    // `fulcrum register --etcd https://... --etcd-ca --etcd-cert --etcd-key`: a backend
    // registers itself over https too.
    let args = RegisterArgs {
        target: RegisterTarget::Etcd {
            endpoints: vec![etcd.client_url.clone()],
            prefix: PREFIX.to_owned(),
            tls: Some(UpstreamTls { client_cert: etcd_client_cert, ..no_cert }),
        },
        address: "127.0.0.1:9203".parse().expect("address"),
        id: Some("tls".to_owned()),
        weight: None,
        models: Vec::new(),
        labels: Vec::new(),
        ttl: Duration::from_secs(5),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(run_register(args, async {
        let _ = stopped.await;
    }));
    sink.wait_for("llama", WAIT, "a registration over https", |s| ids(s) == ["a", "b", "tls"]).await;
    stop.send(()).expect("stop");
    tokio::time::timeout(WAIT, run).await.expect("in time").expect("join").expect("run_register");
    sink.wait_for("llama", Duration::from_secs(2), "the registration leaving", |s| ids(s) == ["a", "b"]).await;
    task.abort();
}
