//! Live reload: applied under load with no failed request, refused whole when invalid,
//! streams in flight finish on the old tables, load signals carry over.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fulcrum_proxy::ReloadError;
use http_body_util::BodyExt;

fn two_pools(policy: &str, first: &[&Backend], second: &[&Backend], extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "p"

[[route]]
match = {{ path_prefix = "/second/" }}
pool = "q"

[pool.p]
policy = {policy}
endpoints = {}
{extra}

[pool.q]
policy = "round_robin"
endpoints = {}
"#,
        endpoints(first),
        endpoints(second)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let (a, b, c) =
        (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await, backend("c", Behavior::Echo).await);
    let configs = [
        two_pools("\"round_robin\"", &[&a], &[&c], ""),
        two_pools("\"round_robin\"", &[&a, &b], &[&c], ""),
        two_pools("\"least_connections\"", &[&a, &b], &[&c], "connect_timeout = \"2s\""),
        two_pools("\"power_of_two\"", &[&b], &[&a, &c], "retry = { max_attempts = 2 }"),
        two_pools("{ name = \"consistent_hash\", key = \"header:x-user\" }", &[&a, &b], &[&c], ""),
    ];
    let running = proxy(&configs[0]).await;
    let addr = running.proxy_addr;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            // Keep-alive connections: a reload must apply to them too, without breaking them.
            let mut conn = h1(addr).await;
            let path = if i % 2 == 0 { "/x" } else { "/second/x" };
            while !stop.load(Ordering::Relaxed) {
                let _ = conn.ready().await;
                match conn.send_request(get(path)).await {
                    Ok(resp) if resp.status() == 200 => {
                        let body = resp.into_body().collect().await;
                        if body.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed)
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed)
                        };
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {:?}", other.map(|r| r.status()));
                        conn = h1(addr).await;
                    }
                }
            }
        }));
    }
    let mut applied = 0;
    for round in 0..30 {
        let before = ok.load(Ordering::Relaxed);
        let report = running.live.reload_text(&configs[(round + 1) % configs.len()], None).expect("valid reload");
        assert_eq!(report.generation, round as u64 + 2);
        applied += 1;
        // Let traffic flow on each generation before the next swap (bounded wait).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ok.load(Ordering::Relaxed) < before + 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(applied, 30);
    assert!(ok > 600, "traffic flowed through every generation: {ok} answers");
    assert_eq!(failed, 0, "{failed} requests failed across 30 reloads ({ok} succeeded)");

    // The generation running is the last one applied, and the next one routes as written:
    // pool p = {a, b} under consistent hashing on x-user, so one user sticks to one backend.
    assert_eq!(running.live.state().text().map(|t| &**t), Some(configs[0].as_str()));
    let report = running.live.reload_text(&configs[4], None).expect("valid reload");
    assert_eq!((report.rebuilt, report.unchanged), (vec!["p".to_owned()], vec!["q".to_owned()]));
    assert_eq!(running.live.state().pools()["p"].config().policy.kind().as_str(), "consistent_hash");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        let mut req = get("/");
        req.headers_mut().insert("x-user", "ada".parse().unwrap());
        let (_, headers, _) = send(addr, req).await;
        seen.insert(headers["x-backend"].to_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    running.shutdown().await;
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let (a, b) = (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await);
    let good = one_pool("\"round_robin\"", &[&a], "");
    let running = proxy(&good).await;
    let before = running.live.state();

    // Not a config at all, a pool that cannot be built, a listener that moves.
    let bad_policy = one_pool("\"no_such_policy\"", &[&a, &b], "");
    let err = running.live.reload_text(&bad_policy, None).unwrap_err();
    assert!(matches!(err, ReloadError::Invalid(_)), "{err}");
    assert!(err.field().contains("pool.p"), "field named: {}", err.field());
    let moved = good.replace("127.0.0.1:0", "127.0.0.1:1");
    let err = running.live.reload_text(&moved, None).unwrap_err();
    assert!(matches!(err, ReloadError::NeedsRestart { .. }), "{err}");
    assert_eq!(err.field(), "listener[0].address");
    let with_batch = format!("{good}\n[batch]\n");
    let err = running.live.reload_text(&with_batch, None).unwrap_err();
    assert!(matches!(err, ReloadError::NeedsRestart { .. }), "{err}");
    assert_eq!(err.field(), "batch");
    let err = running.live.reload_text("[[listener]]\nname = 3", None).unwrap_err();
    assert!(err.to_string().contains("listener"), "{err}");

    // Nothing changed: same generation, same pool object, still serving.
    let after = running.live.state();
    assert_eq!(after.generation(), before.generation());
    assert!(Arc::ptr_eq(&after.pools()["p"], &before.pools()["p"]));
    let (status, headers, _) = send(running.proxy_addr, get("/")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-backend"], "a");
    running.shutdown().await;
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_old_tables_and_signals_carry_over() {
    let slow = backend("slow", Behavior::Stream { chunks: 6, gap: Duration::from_millis(100) }).await;
    let other = backend("other", Behavior::Echo).await;
    let running = proxy(&one_pool("\"round_robin\"", &[&slow], "")).await;
    let pool = running.live.pool("p").unwrap();

    let mut conn = h1(running.proxy_addr).await;
    let resp = conn.send_request(get("/stream")).await.expect("stream starts");
    assert_eq!(resp.status(), 200);
    let slow_signals = pool.snapshot().selector.endpoints()[0].signals().clone();
    assert_eq!(slow_signals.in_flight(), 1);

    // A rebuild (new policy) keeps the endpoint's signals: the stream still counts.
    let report = running.live.reload_text(&one_pool("\"least_connections\"", &[&slow], ""), None).unwrap();
    assert_eq!(report.rebuilt, ["p"]);
    let rebuilt = running.live.pool("p").unwrap();
    assert!(!Arc::ptr_eq(&rebuilt, &pool));
    assert!(Arc::ptr_eq(rebuilt.snapshot().selector.endpoints()[0].signals(), &slow_signals));
    assert_eq!(rebuilt.snapshot().selector.in_flight(), 1);

    // Then the endpoint leaves altogether: the stream still ends whole.
    let report = running.live.reload_text(&one_pool("\"least_connections\"", &[&other], ""), None).unwrap();
    assert_eq!(report.endpoints_changed, ["p"]);
    let (_, headers, _) = send(running.proxy_addr, get("/")).await;
    assert_eq!(headers["x-backend"], "other");
    let body = resp.into_body().collect().await.expect("stream completes").to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"token\":5") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(slow_signals.in_flight(), 0, "the stream's load was released when it ended");
    running.shutdown().await;
}

#[tokio::test]
async fn restart_only_changes_name_their_field() {
    let a = backend("a", Behavior::Echo).await;
    let base = one_pool("\"round_robin\"", &[&a], "");
    let running = proxy(&base).await;
    for (text, field) in [
        (format!("[proxy]\nworkers = 3\n{base}"), "proxy.workers"),
        (base.replace("pool = \"p\"", "pool = \"p\"\nmax_connections = 5"), "listener[0].max_connections"),
        (format!("{base}\n[[listener]]\nname = \"second\"\naddress = \"127.0.0.1:1\"\npool = \"p\"\n"), "listener"),
    ] {
        let err = running.live.reload_text(&text, None).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_health_state_and_restarts_no_slow_start() {
    let (a, b) = (backend("a", Behavior::Echo).await, backend("b", Behavior::Echo).await);
    let checks = "health_check = { path = \"/\", interval = \"50ms\" }\nslow_start = { window = \"60s\" }";
    let running = proxy(&one_pool("\"round_robin\"", &[&a, &b], checks)).await;
    let pool = || running.live.pool("p").expect("pool p");
    let now = fulcrum_proxy::clock::now;
    until("both passed their first check", || {
        pool().snapshot().selector.endpoints().iter().all(|e| e.signals().is_available(now()))
    })
    .await;
    let health_events = || pool().safety().events().iter().filter(|e| e.kind == "health").count();
    let before = health_events();
    assert_eq!(before, 2, "{:?}", pool().safety().events());
    // Both joined in slow start (their first success); their ramps must not restart.
    let ramps = || -> Vec<_> {
        pool().snapshot().selector.endpoints().iter().map(|e| e.signals().slow_start_since()).collect()
    };
    let ramps_before = ramps();
    assert!(ramps_before.iter().all(Option::is_some));

    // A policy change rebuilds the pool and restarts its health checks.
    let probes = || [&a, &b].map(|x| x.requests.load(Ordering::Relaxed));
    let probed = probes();
    running.live.reload_text(&one_pool("\"least_connections\"", &[&a, &b], checks), None).expect("valid reload");
    assert_eq!(pool().config().policy.kind().as_str(), "least_connections");
    // Once the restarted checks have probed each endpoint a few times: they went on from
    // "healthy", so no endpoint "recovered" again (no event, no new slow-start ramp) and
    // none stopped serving.
    until("the restarted checks probed both endpoints", || {
        probes().iter().zip(probed).all(|(now, then)| *now >= then + 3)
    })
    .await;
    assert_eq!(health_events(), before, "{:?}", pool().safety().events());
    for e in pool().snapshot().selector.endpoints() {
        assert!(e.signals().is_available(now()), "{} stopped serving", e.id());
    }
    assert_eq!(ramps(), ramps_before, "a ramp restarted");
    assert_eq!(send(running.proxy_addr, get("/")).await.0, http::StatusCode::OK);
    running.shutdown().await;
}
