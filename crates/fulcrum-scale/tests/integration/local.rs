//! The local process actuator with real child processes: python3's http.server as the replica,
//! `sh` for crashing ones. Each test has a port range of its own (below the ephemeral range).

use crate::support;

use std::time::Duration;

use fulcrum_scale::restart::RestartSettings;
use fulcrum_scale::{
    Actuator, EventKind, EventSink, Exit, LocalActuator, LocalConfig, LocalSettings, Output, Readiness, ReplicaState,
};
use support::{WAIT, alive, events_until, http_status, refused, show, wait_gone, wait_refused};

const HTTP_SERVER: &str = "python3 -m http.server {port} --bind {host}";

fn settings(command: &str, ports: &str) -> LocalSettings {
    LocalSettings {
        output: Output::Null,
        probe_interval: Duration::from_millis(50),
        startup_timeout: WAIT,
        stop_grace: Duration::from_secs(5),
        ..LocalSettings::new(command, ports.parse().expect("port range"))
    }
}

fn fast_restarts(max_restarts: u32) -> RestartSettings {
    RestartSettings {
        backoff_base: Duration::from_millis(50),
        backoff_factor: 2.0,
        backoff_max: Duration::from_secs(1),
        reset_after: Duration::from_secs(10),
        max_restarts,
        within: Duration::from_secs(60),
    }
}

fn actuator(settings: LocalSettings) -> (LocalActuator, tokio::sync::mpsc::Receiver<fulcrum_scale::Event>) {
    let (sink, rx) = EventSink::channel(1024);
    (LocalActuator::new(LocalConfig::try_new(settings).expect("config"), sink), rx)
}

fn all_running(n: usize) -> impl FnMut(&[fulcrum_scale::Replica]) -> bool {
    move |rs| rs.len() == n && rs.iter().all(|r| r.state.is_running())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_out_and_in_highest_first() {
    let (mut actuator, mut events) = actuator(settings(HTTP_SERVER, "23100-23109"));

    actuator.scale_to(1).await.expect("scale to 1");
    let replicas = actuator.wait_for(WAIT, all_running(1)).await.expect("one running");
    assert_eq!(replicas[0].address, Some("127.0.0.1:23100".parse().unwrap()));
    assert_eq!(http_status(replicas[0].address.unwrap()).await, Some(200));

    actuator.scale_to(3).await.expect("scale to 3");
    let replicas = actuator.wait_for(WAIT, all_running(3)).await.expect("three running");
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(r.index, i as u32);
        assert_eq!(r.address.unwrap().port(), 23100 + i as u16);
        assert_eq!(http_status(r.address.unwrap()).await, Some(200), "replica {i} answers");
        assert!(r.pid.is_some_and(alive));
        assert_eq!(r.restarts, 0);
    }
    let observed = actuator.observe().await.expect("observe");
    assert_eq!((observed.desired, observed.current), (Some(3), Some(3)));

    let gone: Vec<_> = replicas[1..].to_vec();
    actuator.scale_to(1).await.expect("scale to 1");
    // Returned once the highest indices are gone: their processes and their ports.
    let left = actuator.replicas();
    assert_eq!(left.iter().map(|r| r.index).collect::<Vec<_>>(), [0]);
    assert_eq!(left[0].pid, replicas[0].pid, "replica 0 untouched");
    for r in &gone {
        assert!(!alive(r.pid.unwrap()), "replica {} process gone", r.index);
        assert!(refused(r.address.unwrap()).await, "replica {} port closed", r.index);
    }
    assert_eq!(http_status(left[0].address.unwrap()).await, Some(200));

    // Both were gone when scale_to returned: their events are in the channel already.
    let mut stops = 0;
    let seen = events_until(&mut events, |e| {
        stops += usize::from(matches!(e.kind, EventKind::Stopped { .. }));
        stops == 2
    })
    .await;
    let ready = seen.iter().filter(|e| matches!(e.kind, EventKind::Ready { .. })).count();
    assert_eq!(ready, 3, "{}", show(&seen));
    let mut stopped: Vec<_> =
        seen.iter().filter(|e| matches!(e.kind, EventKind::Stopped { .. })).map(|e| e.index).collect();
    stopped.sort_unstable();
    assert_eq!(stopped, [1, 2], "{}", show(&seen));
    assert!(!seen.iter().any(|e| matches!(e.kind, EventKind::Exited { .. })), "no crash: {}", show(&seen));

    // Scaling back out reuses the lowest free ports.
    actuator.scale_to(2).await.expect("scale to 2");
    let replicas = actuator.wait_for(WAIT, all_running(2)).await.expect("two running");
    assert_eq!(replicas[1].address.unwrap().port(), 23101);

    actuator.scale_to(0).await.expect("scale to 0");
    assert!(actuator.replicas().is_empty());
    for r in &replicas {
        assert!(!alive(r.pid.unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_restarted_on_its_port() {
    let mut s = settings(HTTP_SERVER, "23110-23114");
    s.restart = fast_restarts(5);
    s.readiness = Readiness::Http { path: "/".into() };
    let (mut actuator, mut events) = actuator(s);
    actuator.scale_to(1).await.expect("scale to 1");
    let before = actuator.wait_for(WAIT, all_running(1)).await.expect("running")[0].clone();
    let pid = before.pid.expect("pid");

    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(status.success());

    let mut ready = 0;
    let seen = events_until(&mut events, |e| {
        ready += usize::from(matches!(e.kind, EventKind::Ready { .. }));
        ready == 2
    })
    .await;
    let exited = seen.iter().find_map(|e| match &e.kind {
        EventKind::Exited { exit: Exit::Status(status), .. } => Some(*status),
        _ => None,
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(exited.and_then(|s| s.signal()), Some(9), "{}", show(&seen));
    assert!(
        seen.iter().any(|e| e.kind == EventKind::Restarting { attempt: 1, delay: Duration::from_millis(50) }),
        "{}",
        show(&seen)
    );

    let after = actuator.wait_for(WAIT, all_running(1)).await.expect("running again")[0].clone();
    assert_eq!(after.address, before.address, "same port after a restart");
    assert_ne!(after.pid, before.pid);
    assert_eq!(after.restarts, 1);
    assert_eq!(http_status(after.address.unwrap()).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_backs_off_then_gives_up() {
    let mut s = settings("sh -c 'exit 3'", "23120-23121");
    s.restart = fast_restarts(4);
    let (mut actuator, mut events) = actuator(s);
    let started = tokio::time::Instant::now();
    actuator.scale_to(1).await.expect("scale to 1");
    let seen = events_until(&mut events, |e| matches!(e.kind, EventKind::GaveUp { .. })).await;

    let delays: Vec<_> = seen
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Restarting { attempt, delay } => Some((attempt, delay.as_millis())),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [(1, 50), (2, 100), (3, 200), (4, 400)], "{}", show(&seen));
    let exits = seen
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Exited { exit: Exit::Status(s), .. } if s.code() == Some(3)))
        .count();
    assert_eq!(exits, 5, "the first run and four restarts: {}", show(&seen));
    assert_eq!(seen.last().map(|e| &e.kind), Some(&EventKind::GaveUp { restarts: 4, within: Duration::from_secs(60) }));
    // The waits really happened: 50 + 100 + 200 + 400 ms.
    assert!(started.elapsed() >= Duration::from_millis(750));

    let replicas =
        actuator.wait_for(WAIT, |rs| rs.iter().all(|r| r.state == ReplicaState::Failed)).await.expect("failed");
    assert_eq!(replicas[0].restarts, 4);
    assert_eq!(replicas[0].pid, None);

    // A failed replica stays failed through scale_to, and comes back through retry_failed.
    actuator.scale_to(1).await.expect("scale to 1 again");
    assert_eq!(actuator.replicas()[0].state, ReplicaState::Failed);
    assert_eq!(actuator.retry_failed().await, 1);
    let seen = events_until(&mut events, |e| matches!(e.kind, EventKind::GaveUp { .. })).await;
    assert!(seen.iter().any(|e| matches!(e.kind, EventKind::Stopped { status: None, .. })), "{}", show(&seen));
    assert!(seen.iter().any(|e| e.kind == EventKind::Restarting { attempt: 1, delay: Duration::from_millis(50) }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_starts_over_after_a_healthy_run() {
    // Listens for 300 ms, then exits 1: ready every time, never for long.
    let script = "import socket, time, sys\n\
                  s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  s.bind(('127.0.0.1', {port})); s.listen()\n\
                  time.sleep(0.3); sys.exit(1)";
    let command = format!("python3 -c \"{script}\"");
    let mut s = settings(&command, "23130-23131");
    s.restart = RestartSettings { reset_after: Duration::from_millis(100), ..fast_restarts(10) };
    let (mut actuator, mut events) = actuator(s);
    actuator.scale_to(1).await.expect("scale to 1");
    let mut restarts = 0;
    let seen = events_until(&mut events, |e| {
        restarts += usize::from(matches!(e.kind, EventKind::Restarting { .. }));
        restarts == 3
    })
    .await;
    let attempts: Vec<_> = seen
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Restarting { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 1, 1], "ready for 300 ms > reset_after each time: {}", show(&seen));
    assert_eq!(seen.iter().filter(|e| matches!(e.kind, EventKind::Ready { .. })).count(), 3, "{}", show(&seen));
    actuator.scale_to(0).await.expect("scale to 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_in_time_is_killed_and_counts_as_a_crash() {
    let mut s = settings("sleep 30", "23140-23141");
    s.startup_timeout = Duration::from_millis(300);
    s.restart = fast_restarts(0);
    let (mut actuator, mut events) = actuator(s);
    actuator.scale_to(1).await.expect("scale to 1");
    let seen = events_until(&mut events, |e| matches!(e.kind, EventKind::GaveUp { .. })).await;
    let pid = seen.iter().find_map(|e| match e.kind {
        EventKind::Started { pid, .. } => Some(pid),
        _ => None,
    });
    assert!(
        seen.iter().any(|e| matches!(&e.kind, EventKind::Exited { exit: Exit::NotReady { waited }, .. } if *waited == Duration::from_millis(300))),
        "{}",
        show(&seen)
    );
    wait_gone(pid.expect("started")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_is_reported_and_given_up() {
    let mut s = settings("/nonexistent/fulcrum-replica --port {port}", "23150-23151");
    s.restart = fast_restarts(1);
    let (mut actuator, mut events) = actuator(s);
    actuator.scale_to(1).await.expect("scale to 1");
    let seen = events_until(&mut events, |e| matches!(e.kind, EventKind::GaveUp { .. })).await;
    let error = seen.iter().find_map(|e| match &e.kind {
        EventKind::Exited { exit: Exit::Error { error }, .. } => Some(error.clone()),
        _ => None,
    });
    assert!(error.is_some_and(|e| e.starts_with("cannot start `/nonexistent/fulcrum-replica`")), "{}", show(&seen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_kills_the_whole_process_group() {
    // The shell does not exec the server (a command follows it): the server is a grandchild.
    let command = format!("sh -c '{HTTP_SERVER}; echo unreachable'");
    let (mut actuator, _events) = actuator(settings(&command, "23160-23161"));
    actuator.scale_to(1).await.expect("scale to 1");
    let replica = actuator.wait_for(WAIT, all_running(1)).await.expect("running")[0].clone();
    let address = replica.address.unwrap();
    assert_eq!(http_status(address).await, Some(200));
    actuator.scale_to(0).await.expect("scale to 0");
    // The shell was reaped before scale_to returned; the server, its child, was sent SIGKILL
    // with the whole group and is gone a moment later.
    assert!(!alive(replica.pid.unwrap()));
    wait_refused(address).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_actuator_kills_its_replicas() {
    let (mut actuator, _events) = actuator(settings(HTTP_SERVER, "23170-23172"));
    actuator.scale_to(2).await.expect("scale to 2");
    let replicas = actuator.wait_for(WAIT, all_running(2)).await.expect("running");
    drop(actuator);
    for r in &replicas {
        wait_gone(r.pid.unwrap()).await;
        assert!(refused(r.address.unwrap()).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_and_placeholders_reach_the_replica() {
    // The replica serves its own environment: an index-derived variable must be there.
    let dir = std::env::temp_dir().join(format!("fulcrum-scale-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let command = format!("sh -c 'echo $GPU > gpu-{{index}}.txt; exec {HTTP_SERVER}'");
    let mut s = settings(&command, "23180-23181");
    s.env = vec![("GPU".into(), "cuda:{index}".into())];
    s.dir = Some(dir.clone());
    let (mut actuator, _events) = actuator(s);
    actuator.scale_to(2).await.expect("scale to 2");
    actuator.wait_for(WAIT, all_running(2)).await.expect("running");
    for i in 0..2 {
        let text = std::fs::read_to_string(dir.join(format!("gpu-{i}.txt"))).expect("written by the replica");
        assert_eq!(text.trim(), format!("cuda:{i}"));
    }
    actuator.scale_to(0).await.expect("scale to 0");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let command = format!("sh -c 'trap \"\" TERM; exec {HTTP_SERVER}'");
    let mut s = settings(&command, "23190-23191");
    s.stop_grace = Duration::from_millis(300);
    let (mut actuator, mut events) = actuator(s);
    actuator.scale_to(1).await.expect("scale to 1");
    let replica = actuator.wait_for(WAIT, all_running(1)).await.expect("running")[0].clone();

    // A call cancelled while the replica is stopping leaves it to the next call.
    let cancelled = tokio::time::timeout(Duration::from_millis(50), actuator.scale_to(0)).await;
    assert!(cancelled.is_err(), "still within the grace period");
    let started = tokio::time::Instant::now();
    actuator.scale_to(0).await.expect("scale to 0");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(actuator.replicas().is_empty());
    assert!(!alive(replica.pid.unwrap()));

    let seen = events_until(&mut events, |e| matches!(e.kind, EventKind::Stopped { .. })).await;
    use std::os::unix::process::ExitStatusExt;
    let status = seen.iter().find_map(|e| match e.kind {
        EventKind::Stopped { status, .. } => status,
        _ => None,
    });
    assert_eq!(status.and_then(|s| s.signal()), Some(9), "SIGTERM ignored, then SIGKILL: {}", show(&seen));

    // Its port is free again.
    actuator.scale_to(1).await.expect("scale to 1 again");
    let again = actuator.wait_for(WAIT, all_running(1)).await.expect("running again")[0].clone();
    assert_eq!(again.address, replica.address);
}
