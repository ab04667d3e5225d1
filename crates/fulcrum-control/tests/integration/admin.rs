//! The admin API without sockets (`oneshot`), over a proxy whose pool is real.

use axum::body::Body;
use fulcrum_config::Config;
use fulcrum_control::admin::{AdminState, app};
use fulcrum_proxy::Proxy;
use http_body_util::BodyExt;
use tower::ServiceExt;

const TOML: &str = r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "llm"

[pool.llm]
policy = "least_connections"
endpoints = [{ id = "a", address = "127.0.0.1:9" }, { id = "b", address = "127.0.0.1:10", weight = 2 }]
"#;

pub(crate) async fn state() -> AdminState {
    let config = Config::parse(TOML, None).expect("config");
    let proxy = Proxy::bind_with(config, Some(TOML.into()), None).await.expect("proxy");
    AdminState::new(proxy.live().clone())
}

async fn call(state: &AdminState, method: &str, uri: &str) -> (u16, String) {
    send(state, method, uri, None, "").await
}

async fn call_with(state: &AdminState, method: &str, uri: &str, body: &str) -> (u16, String) {
    send(state, method, uri, None, body).await
}

async fn send(state: &AdminState, method: &str, uri: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if !body.is_empty() && body.starts_with('{') {
        req = req.header("content-type", "application/json");
    }
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Body::from(body.to_owned())).expect("request");
    let resp = app(state.clone()).oneshot(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn pools_show_live_endpoint_state() {
    let state = state().await;
    let (status, body) = call(&state, "GET", "/pools").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v[0]["name"], "llm");
    assert_eq!(v[0]["policy"], "least_connections");
    assert_eq!(v[0]["endpoints"][1]["id"], "b");
    assert_eq!(v[0]["endpoints"][1]["weight"], 2);
    assert_eq!(v[0]["endpoints"][0]["available"], true);
    let (status, body) = call(&state, "GET", "/pools/llm").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&state, "GET", "/pools/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains(r#""field":"pool""#) && body.contains("no pool is named `nope`"), "{body}");
}

#[tokio::test]
async fn drain_marks_an_endpoint_and_reports() {
    let state = state().await;
    let (status, body) = call(&state, "POST", "/pools/llm/endpoints/a/drain?timeout_ms=100").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""drained":true"#), "{body}");
    let (_, pools) = call(&state, "GET", "/pools/llm").await;
    assert!(pools.contains("draining"), "{pools}");
    let (_, events) = call(&state, "GET", "/pools/llm/events").await;
    assert!(events.contains("drained"), "{events}");
    let (status, body) = call(&state, "POST", "/pools/llm/endpoints/zz/drain").await;
    assert_eq!(status, 404);
    assert!(body.contains(r#""field":"id""#), "{body}");
    let (status, body) = call(&state, "POST", "/pools/llm/endpoints/a/drain?timeout_ms=soon").await;
    assert_eq!(status, 400);
    assert!(body.contains(r#""field":"timeout_ms""#), "{body}");
}

#[tokio::test]
async fn undrain_ends_a_drain_and_both_outlive_a_reload() {
    let state = state().await;
    let available = |pools: &str| {
        let v: serde_json::Value = serde_json::from_str(pools).expect("json");
        v["endpoints"][0]["available"].as_bool().expect("available")
    };
    let (status, _) = call(&state, "POST", "/pools/llm/endpoints/a/drain?timeout_ms=10").await;
    assert_eq!(status, 200);
    // A policy change rebuilds the pool: the drain stays.
    let (status, body) = call_with(&state, "PUT", "/pools/llm/policy", r#"{"policy": "round_robin"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert!(!available(&call(&state, "GET", "/pools/llm").await.1), "draining through a policy change");
    let (status, body) = call(&state, "POST", "/pools/llm/endpoints/a/undrain").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""was_draining":true"#) && body.contains(r#""draining":false"#), "{body}");
    assert!(available(&call(&state, "GET", "/pools/llm").await.1), "available again");
    let (_, events) = call(&state, "GET", "/pools/llm/events").await;
    assert!(events.contains("undrain"), "{events}");
    // A new configuration keeps it available.
    let (status, body) = call_with(&state, "PUT", "/config", TOML).await;
    assert_eq!(status, 200, "{body}");
    assert!(available(&call(&state, "GET", "/pools/llm").await.1), "available after a reload");
    // Undraining what is not draining says so; an unknown endpoint is 404.
    let (_, body) = call(&state, "POST", "/pools/llm/endpoints/a/undrain").await;
    assert!(body.contains(r#""was_draining":false"#), "{body}");
    let (status, body) = call(&state, "POST", "/pools/llm/endpoints/zz/undrain").await;
    assert_eq!(status, 404);
    assert!(body.contains(r#""field":"id""#), "{body}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_conventional_names() {
    let state = state().await;
    let (status, body) = call(&state, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "{body}");
    for name in [
        "fulcrum_endpoint_requests_total{pool=\"llm\",endpoint=\"a\"} 0",
        "fulcrum_endpoint_available{pool=\"llm\",endpoint=\"b\"} 1",
        "fulcrum_pool_retries_total{pool=\"llm\"} 0",
        "fulcrum_pool_endpoints{pool=\"llm\"} 2",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // Every sample line is `name{labels} value` with a name that starts with fulcrum_.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("sample");
        assert!(name.starts_with("fulcrum_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The ids and weights of pool `llm` as the API shows them.
async fn members(state: &AdminState) -> Vec<(String, u64)> {
    let (_, body) = call(state, "GET", "/pools/llm").await;
    json(&body)["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| (e["id"].as_str().expect("id").to_owned(), e["weight"].as_u64().expect("weight")))
        .collect()
}

fn assert_error(status: u16, body: &str, want_status: u16, field: &str) {
    assert_eq!(status, want_status, "{body}");
    let v = json(body);
    assert_eq!(v["error"]["field"], field, "{body}");
    assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty(), "{body}");
}

#[tokio::test]
async fn endpoints_are_added_reweighted_and_removed() {
    let state = state().await;
    let (status, body) =
        call_with(&state, "POST", "/pools/llm/endpoints", r#"{"address":"127.0.0.1:11","weight":3}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["report"]["endpoints_changed"][0], "llm");
    assert_eq!(members(&state).await, [("a".into(), 1), ("b".into(), 2), ("127.0.0.1:11".into(), 3)]);

    let (status, body) = call_with(&state, "PUT", "/pools/llm/endpoints/a/weight", r#"{"weight":5}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(members(&state).await[0], ("a".into(), 5));

    let (status, body) = call(&state, "DELETE", "/pools/llm/endpoints/b").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(members(&state).await, [("a".into(), 5), ("127.0.0.1:11".into(), 3)]);

    // The running text shows every change.
    let (_, body) = call(&state, "GET", "/config").await;
    let v = json(&body);
    assert_eq!(v["generation"], 4);
    assert_eq!(v["config"]["pool"]["llm"]["endpoints"][1]["address"], "127.0.0.1:11");
    assert!(v["text"].as_str().expect("text").contains("127.0.0.1:11"));
}

#[tokio::test]
async fn endpoint_mistakes_are_json_errors_naming_the_field() {
    let state = state().await;
    let (s, b) = call_with(&state, "POST", "/pools/llm/endpoints", r#"{"address":"127.0.0.1:10","id":"b"}"#).await;
    assert_error(s, &b, 409, "id");
    let (s, b) = call_with(&state, "POST", "/pools/llm/endpoints", r#"{"weight":2}"#).await;
    assert_error(s, &b, 400, "address");
    let (s, b) = call_with(&state, "POST", "/pools/llm/endpoints", r#"{"address":"nowhere"}"#).await;
    assert_error(s, &b, 400, "pool.llm.endpoints.address");
    let (s, b) = call_with(&state, "POST", "/pools/llm/endpoints", "{not json").await;
    assert_error(s, &b, 400, "body");
    let (s, b) = call_with(&state, "POST", "/pools/nope/endpoints", r#"{"address":"127.0.0.1:11"}"#).await;
    assert_error(s, &b, 404, "pool");
    let (s, b) = call(&state, "DELETE", "/pools/llm/endpoints/zz").await;
    assert_error(s, &b, 404, "id");
    let (s, b) = call_with(&state, "PUT", "/pools/llm/endpoints/a/weight", r#"{"weight":0}"#).await;
    assert_error(s, &b, 400, "weight");
    let (s, b) = call_with(&state, "PUT", "/pools/llm/endpoints/a/weight", r#"{"weight":"heavy"}"#).await;
    assert_error(s, &b, 422, "body");
    let (s, b) = call(&state, "GET", "/no/such/call").await;
    assert_error(s, &b, 404, "path");
    let huge = format!("{{\"address\":\"{}\"}}", "x".repeat(2 << 20));
    let (s, _) = call_with(&state, "POST", "/pools/llm/endpoints", &huge).await;
    assert_eq!(s, 413);
    // Nothing of this changed the running configuration.
    assert_eq!(members(&state).await, [("a".into(), 1), ("b".into(), 2)]);
}

#[tokio::test]
async fn the_policy_changes_live_and_a_bad_one_is_refused() {
    let state = state().await;
    let (status, body) = call_with(&state, "PUT", "/pools/llm/policy", r#"{"policy":"power_of_two"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["report"]["rebuilt"][0], "llm");
    let (_, body) = call(&state, "GET", "/pools/llm").await;
    assert_eq!(json(&body)["policy"], "power_of_two");
    let (status, body) =
        call_with(&state, "PUT", "/pools/llm/policy", r#"{"policy":{"name":"maglev","key":"header:x-user"}}"#).await;
    assert_eq!(status, 200, "{body}");

    let (s, b) = call_with(&state, "PUT", "/pools/llm/policy", r#"{"policy":"fastest_please"}"#).await;
    assert_error(s, &b, 400, "pool.llm.policy");
    let (s, b) = call_with(&state, "PUT", "/pools/llm/policy", r#"{"policy":7}"#).await;
    assert_error(s, &b, 400, "policy");
    let (s, b) = call_with(&state, "PUT", "/pools/llm/policy", r#"{"polcy":"random"}"#).await;
    assert_error(s, &b, 422, "body");
    let (_, body) = call(&state, "GET", "/pools/llm").await;
    assert_eq!(json(&body)["policy"], "maglev");
}

#[tokio::test]
async fn the_whole_config_is_shown_replaced_and_reloaded() {
    let state = state().await;
    let (status, body) = call(&state, "GET", "/config").await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!((v["generation"].as_u64(), v["text"].as_str()), (Some(1), Some(TOML)));
    assert_eq!(v["config"]["pool"]["llm"]["policy"], "least_connections");

    let next = TOML.replace("least_connections", "random");
    let (status, body) = call_with(&state, "PUT", "/config", &next).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = call(&state, "GET", "/pools/llm").await;
    assert_eq!(json(&body)["policy"], "random");

    let (s, b) = call_with(&state, "PUT", "/config", "[pool.x]\npolicy = 1").await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("invalid, nothing changed"), "{b}");
    let (s, b) = call_with(&state, "PUT", "/config", &next.replace("127.0.0.1:0", "127.0.0.1:1")).await;
    assert_error(s, &b, 409, "listener[0].address");
    // Started without a file: nothing to read again.
    let (s, b) = call(&state, "POST", "/reload").await;
    assert_eq!(s, 409, "{b}");
    let (_, body) = call(&state, "GET", "/config").await;
    assert_eq!(json(&body)["generation"], 2);
}

#[tokio::test]
async fn reload_reads_the_file_again() {
    let dir = std::env::temp_dir().join(format!("fulcrum-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("fulcrum.toml");
    std::fs::write(&path, TOML).expect("write");
    let proxy = Proxy::bind_file(&path).await.expect("proxy");
    let state = AdminState::new(proxy.live().clone());
    std::fs::write(&path, TOML.replace("least_connections", "round_robin")).expect("write");
    let (status, body) = call(&state, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = call(&state, "GET", "/config").await;
    let v = json(&body);
    assert_eq!(v["config"]["pool"]["llm"]["policy"], "round_robin");
    assert_eq!(v["path"], path.display().to_string());
    std::fs::write(&path, "[[listener]]\nname = ").expect("write");
    let (s, b) = call(&state, "POST", "/reload").await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("fulcrum.toml"), "the error names the file: {b}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_token_guards_every_call() {
    let token = "0123456789abcdef-secret";
    let state = state().await.with_token(token);
    for (method, uri) in [("GET", "/pools"), ("GET", "/metrics"), ("DELETE", "/pools/llm/endpoints/a")] {
        let (s, b) = send(&state, method, uri, None, "").await;
        assert_error(s, &b, 401, "authorization");
        let (s, _) = send(&state, method, uri, Some("0123456789abcdef-wrong!"), "").await;
        assert_eq!(s, 401);
    }
    let (s, b) = send(&state, "GET", "/pools", Some(token), "").await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn control_and_discovery_show_a_standalone_proxy() {
    let state = state().await;
    let (status, body) = call(&state, "GET", "/control").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["mode"], "standalone");
    let (status, body) = call(&state, "GET", "/discovery").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["providers"], serde_json::json!([]));
    // Without discovery there are no registrations to take.
    let (s, b) = call_with(&state, "POST", "/pools/llm/registrations", r#"{"address":"127.0.0.1:12"}"#).await;
    assert_error(s, &b, 404, "path");
}

#[tokio::test]
async fn every_call_of_the_openapi_document_is_served() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/admin-api.openapi.json"))
        .expect("docs/admin-api.openapi.json");
    let doc = json(&doc);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 11, "{} paths", paths.len());
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            let state = state().await;
            // With discovery, so the registration calls are served too.
            let state = state.clone().with_discovery(fulcrum_control::discover::for_live(state.live()));
            let uri = path.replace("{pool}", "llm").replace("{id}", "a");
            let (status, body) = call(&state, &method.to_uppercase(), &uri).await;
            assert!(status != 405, "{method} {path} is documented but not routed");
            assert!(
                !(status == 404 && body.contains(r#""field":"path""#)),
                "{method} {path} is documented but not served: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_all_land() {
    let state = state().await;
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let state = state.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"address":"127.0.0.1:{}"}}"#, 2000 + i);
                call_with(&state, "POST", "/pools/llm/endpoints", &body).await
            })
        })
        .collect();
    for c in calls {
        let (status, body) = c.await.expect("call");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(members(&state).await.len(), 12, "every added endpoint is in the pool");
    let (_, body) = call(&state, "GET", "/config").await;
    assert_eq!(json(&body)["generation"], 11);
}

#[tokio::test]
async fn host_and_origin_must_name_the_admin_api() {
    let state = state().await.with_hosts(vec!["Fulcrum.Internal".into()]);
    let status_with = |headers: Vec<(&'static str, &'static str)>| {
        let state = state.clone();
        async move {
            let mut req = axum::http::Request::builder().method("GET").uri("/pools");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = app(state).oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    for ok in ["127.0.0.1:9901", "localhost:9901", "[::1]:9901", "10.1.2.3", "fulcrum.internal:9901", "localhost"] {
        assert_eq!(status_with(vec![("host", ok)]).await.0, 200, "Host {ok}");
    }
    // DNS rebinding: a name the attacker controls, resolving to this machine.
    let (status, body) = status_with(vec![("host", "attacker.example:9901")]).await;
    assert_eq!(status, 403);
    assert!(body.contains("admin_hosts") && body.contains(r#""field":"host""#), "{body}");
    // A page on another site calling the API from a browser.
    let (status, body) = status_with(vec![("host", "127.0.0.1:9901"), ("origin", "https://attacker.example")]).await;
    assert_eq!(status, 403);
    assert!(body.contains(r#""field":"origin""#), "{body}");
    assert_eq!(status_with(vec![("host", "127.0.0.1:9901"), ("origin", "http://localhost:9901")]).await.0, 200);
    assert_eq!(status_with(vec![("origin", "null")]).await.0, 403);
}

#[tokio::test]
async fn put_config_answers_every_error_with_its_line() {
    let state = state().await;
    let text = "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\nheader_read_timeout = \"0s\"\n\
                [[route]]\npool = \"nope\"\n\
                [pool.llm]\nconnect_timeout = \"0s\"\n\
                [pool.other]\nretry = { budget_percent = -1.0 }\n";
    let (s, b) = call_with(&state, "PUT", "/config", text).await;
    assert_error(s, &b, 400, "listener[0].header_read_timeout");
    let errors = json(&b)["error"]["errors"].as_array().cloned().unwrap_or_default();
    let got: Vec<(u64, &str)> =
        errors.iter().map(|e| (e["line"].as_u64().unwrap_or(0), e["field"].as_str().unwrap_or(""))).collect();
    assert_eq!(
        got,
        [
            (4, "listener[0].header_read_timeout"),
            (6, "route[0].pool"),
            (8, "pool.llm.connect_timeout"),
            (10, "pool.other.retry.budget_percent"),
        ],
        "{b}"
    );
    // The running configuration is untouched.
    let (_, body) = call(&state, "GET", "/config").await;
    assert_eq!(json(&body)["generation"], 1);
}
