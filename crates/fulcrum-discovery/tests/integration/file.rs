//! The `file` provider against real files: edits are applied, a bad file keeps the last set.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use fulcrum_config::discovery::{DiscoveryConfig, FileDiscovery};
use fulcrum_discovery::{Discovery, ProviderState, StatusBoard};
use support::*;

fn discovery(sink: &Arc<RecordingSink>) -> (Discovery, Arc<StatusBoard>) {
    let status = Arc::new(StatusBoard::new());
    (Discovery::new(sink.clone(), status.clone()), status)
}

#[tokio::test]
async fn edits_are_applied_and_a_bad_file_keeps_the_last_set() {
    let dir = TempDir::new("file");
    let path = dir.path().join("llama.toml");
    write_atomically(&path, "endpoints = [\n  { address = \"127.0.0.1:9001\", weight = 2 },\n]\n");
    let sink = RecordingSink::new();
    let (discovery, status) = discovery(&sink);
    let config = FileDiscovery { path: path.clone(), interval: Duration::from_millis(50) };
    let task = discovery.spawn("llama", DiscoveryConfig::File(config));

    let set = sink.wait_for("llama", WAIT, "the first set", |s| s.len() == 1).await;
    assert_eq!((addresses(&set), set[0].weight.get()), (vec!["127.0.0.1:9001".to_owned()], 2));

    // An edit: one more endpoint, with labels.
    write_atomically(
        &path,
        "endpoints = [\n  { address = \"127.0.0.1:9001\", weight = 2 },\n  { address = \"127.0.0.1:9002\", id = \"b\", models = [\"m\"], labels = { zone = \"z\" } },\n]\n",
    );
    let set = sink.wait_for("llama", WAIT, "the edit", |s| s.len() == 2).await;
    assert_eq!(ids(&set), ["127.0.0.1:9001", "b"]);
    assert_eq!(set[1].labels.zone.as_deref(), Some("z"));

    // A bad file: the set stays, the error shows with its line.
    let applied = sink.sets("llama").len();
    write_atomically(&path, "endpoints = [\n  { address = \"127.0.0.1:9001\" },\n  { address = \"nowhere\" },\n]\n");
    let s = wait_failing(&status, "llama", "llama.toml:3").await;
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("ip:port")), "{s:?}");
    assert_eq!(s.endpoints, Some(2), "the status still shows the set in use");
    assert_eq!(sink.sets("llama").len(), applied, "nothing was applied");

    // A missing file: the same.
    std::fs::remove_file(&path).expect("remove");
    wait_failing(&status, "llama", "cannot read").await;
    assert_eq!(sink.sets("llama").len(), applied);

    // Fixed (as JSON would be read for a .json file, TOML here): applied again.
    write_atomically(&path, "endpoints = [{ address = \"127.0.0.1:9003\" }]\n");
    let set = sink.wait_for("llama", WAIT, "the fixed file", |s| addresses(s) == ["127.0.0.1:9003"]).await;
    assert_eq!(set.len(), 1);
    eventually(WAIT, "status ok again", || status.get("llama").is_some_and(|s| s.state == ProviderState::Ok)).await;
    let s = status.get("llama").expect("status");
    assert_eq!((s.kind, s.consecutive_failures, s.updates), ("file", 0, 3));
    assert!(s.failures >= 2 && s.last_error.is_some(), "the last error is kept: {s:?}");
    task.abort();
}

#[tokio::test]
async fn a_json_file_works_and_an_unchanged_file_is_not_applied_again() {
    let dir = TempDir::new("json");
    let path = dir.path().join("eps.json");
    write_atomically(&path, r#"[{"address":"127.0.0.1:7001"},{"address":"[::1]:7002","weight":5}]"#);
    let sink = RecordingSink::new();
    let (discovery, status) = discovery(&sink);
    let task =
        discovery.spawn("embed", DiscoveryConfig::File(FileDiscovery { path, interval: Duration::from_millis(20) }));
    let set = sink.wait_for("embed", WAIT, "the json set", |s| s.len() == 2).await;
    assert_eq!(addresses(&set), ["127.0.0.1:7001", "[::1]:7002"]);
    // Many polls later, still one update.
    eventually(WAIT, "several successful polls", || status.get("embed").and_then(|s| s.last_success_unix_ms).is_some())
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.sets("embed").len(), 1);
    assert_eq!(status.get("embed").expect("status").updates, 1);
    task.abort();
}

#[tokio::test]
async fn a_file_missing_from_the_start_is_reported_and_nothing_is_applied() {
    let dir = TempDir::new("missing");
    let sink = RecordingSink::new();
    let (discovery, status) = discovery(&sink);
    let config = FileDiscovery { path: dir.path().join("nope.toml"), interval: Duration::from_millis(20) };
    let task = discovery.spawn("x", DiscoveryConfig::File(config));
    let s = wait_failing(&status, "x", "nope.toml").await;
    assert_eq!(s.endpoints, None);
    assert!(sink.sets("x").is_empty(), "the configured endpoints stay");
    task.abort();
}
