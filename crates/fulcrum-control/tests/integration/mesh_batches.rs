//! Batch ownership in mesh mode against a real etcd on loopback: a proxy that loses etcd
//! stops running its batches before its lease can have ended (so that no other proxy runs
//! them at the same time), and takes them back once etcd returns.

use std::time::{Duration, Instant};

use fulcrum_config::Config;
use fulcrum_control::mesh::batches::prefix_for;
use fulcrum_control::mesh::{ControlUrl, Mesh};
use fulcrum_discovery::testing::{Etcd, TempDir};
use fulcrum_mock::{MockConfig, MockServer};
use fulcrum_proxy::Proxy;
use fulcrum_proxy::batch::fulcrum_batch::object::Status;

const TTL: Duration = Duration::from_secs(2);

/// Waits (at most `within`) until `done`; returns how long it took.
async fn until(within: Duration, what: &str, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_etcd_stops_its_batches_before_its_lease_ends_and_takes_them_back() {
    let Some(mut etcd) = Etcd::start().await else { return };
    let url: ControlUrl = format!("etcd://127.0.0.1:{}/test/mesh-batches", etcd.port).parse().expect("url");
    let mut mock = MockConfig::default();
    mock.engine.speed = 0.1;
    let backend = MockServer::bind(mock, "127.0.0.1:0".parse().expect("address")).await.expect("mock starts");
    let dir = TempDir::new("mesh-batches");
    let own = format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\npool = \"llm\"\n\n\
         [pool.llm]\nendpoints = [{{ address = \"{}\" }}]\n\n\
         [batch]\ndatabase = \"{}\"\nmax_in_flight = 2\nlease_ttl = \"{}s\"\n",
        backend.local_addr(),
        dir.path().join("batches.db").display(),
        TTL.as_secs()
    );
    let config = Config::parse(&own, None).expect("config");
    let proxy = Proxy::bind_with(config, Some(own.as_str().into()), None).await.expect("proxy");
    let live = proxy.live().clone();
    let batches = live.batches().cloned().expect("[batch]");
    let mesh = Mesh::new(&url, &own, live.clone()).expect("mesh");
    tokio::spawn(mesh.clone().run());
    let owners = mesh.share_batches(&batches, "proxy a".into(), TTL);
    tokio::spawn(owners.clone().run());
    tokio::spawn(proxy.run(std::future::pending()));
    until(Duration::from_secs(10), "a lease", || owners.status().lease.is_some()).await;

    let lines: String = (0..80)
        .map(|i| {
            format!(
                "{{\"custom_id\":\"t{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"mock-llm\",\"messages\":[{{\"role\":\"user\",\"content\":\"q {i}\"}}],\"max_tokens\":2}}}}\n"
            )
        })
        .collect();
    let batch = batches.create_for_pool(lines.into_bytes(), "in.jsonl", "llm", None, "24h").await.expect("batch");
    let id = batch.id.clone();
    assert_eq!(batches.running(), std::slice::from_ref(&id));
    let status = mesh.status().batches.expect("batch status");
    assert_eq!((status.held, status.running, status.prefix.as_str()), (1, 1, "/test/mesh-batches/batches/"));
    let key = format!("{}{id}", prefix_for("/test/mesh-batches"));
    let held = etcd.client().get(&key).await.expect("get").expect("the batch's key");
    assert_eq!(held.value_str(), "proxy a");
    let start = Instant::now();
    while batches.counts(&id).await.expect("counts").completed < 5 {
        assert!(start.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // etcd goes away: the proxy cannot renew its lease, and stops the batch before the
    // lease could have ended in etcd (requests in flight finish first).
    etcd.kill();
    let stopped = until(TTL + Duration::from_millis(500), "the batch stopped", || batches.running().is_empty()).await;
    until(Duration::from_secs(1), "the lease given up", || {
        mesh.status().batches.is_some_and(|s| s.lease.is_none() && s.held == 0)
    })
    .await;
    let at_stop = batches.counts(&id).await.expect("counts");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(batches.counts(&id).await.expect("counts"), at_stop, "nothing runs without the lease");
    assert!(at_stop.completed < 80, "the batch finished before etcd went: {at_stop:?}");

    // etcd is back: a new lease, and the batch once the old lease's key is gone.
    etcd.restart().await;
    until(TTL * 3 + Duration::from_secs(5), "the batch taken back", || batches.running() == std::slice::from_ref(&id))
        .await;
    batches.wait(&id).await;
    let done = batches.get(&id).await.expect("get").expect("batch");
    assert_eq!((done.status, done.request_counts.completed), (Status::Completed, 80), "{done:?}");
    println!("stopped {stopped:?} after etcd went, at {at_stop:?}");
}
