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
            if path == "/ui/stream" {
                // An endless stream: `the_dashboard_streams_history_then_state` reads it.
                continue;
            }
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

fn scale_status(desired: u32) -> fulcrum_core::scale::ScaleStatus {
    fulcrum_core::scale::ScaleStatus {
        actuator: "external",
        min_replicas: 1,
        max_replicas: 8,
        replicas: 2,
        desired,
        reason: "in flight 9 over target 3".into(),
        forecast: Some(fulcrum_core::scale::Forecast {
            rate_now: 12.5,
            rate_ahead: 20.0,
            lead: std::time::Duration::from_secs(60),
            replicas: 4,
        }),
    }
}

#[tokio::test]
async fn scale_shows_the_autoscalers_last_decision_and_metrics_export_it() {
    let state = state().await;
    // A pool without an autoscaler: 404, naming what to add.
    let (s, b) = call(&state, "GET", "/pools/llm/scale").await;
    assert_error(s, &b, 404, "pool");
    assert!(b.contains("[pool.llm.autoscale]"), "{b}");
    let (s, b) = call(&state, "GET", "/pools/nope/scale").await;
    assert_error(s, &b, 404, "pool");

    let pool = state.live().pool("llm").expect("pool");
    pool.safety().stats.set_scale(Some(scale_status(3)));
    let (s, b) = call(&state, "GET", "/pools/llm/scale").await;
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    assert_eq!(v["desired_replicas"], 3);
    assert_eq!(v["replicas"], 2);
    assert_eq!(v["autoscaled"], true);
    assert_eq!(v["forecast"]["rate_ahead"], 20.0);
    assert_eq!(v["forecast"]["lead_seconds"], 60.0);

    let (_, metrics) = call(&state, "GET", "/metrics").await;
    for line in [
        r#"fulcrum_autoscale_desired_replicas{pool="llm"} 3.0"#,
        r#"fulcrum_autoscale_replicas{pool="llm"} 2.0"#,
        r#"fulcrum_autoscale_forecast_requests_per_second{pool="llm",horizon="ahead"} 20.0"#,
        r#"fulcrum_autoscale_forecast_replicas{pool="llm"} 4.0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    // The autoscaler stopped: nothing to show, nothing exported.
    pool.safety().stats.set_scale(None);
    let (s, _) = call(&state, "GET", "/pools/llm/scale").await;
    assert_eq!(s, 404);
    let (_, metrics) = call(&state, "GET", "/metrics").await;
    assert!(!metrics.contains("fulcrum_autoscale_desired_replicas{"), "{metrics}");
}

#[tokio::test]
async fn an_autoscaled_pool_answers_503_until_its_first_decision() {
    let toml = format!(
        "{TOML}\n[pool.llm.autoscale]\npolicy = \"threshold\"\ntarget = 4.0\nactuator = {{ kind = \"external\" }}\n"
    );
    let config = Config::parse(&toml, None).expect("config");
    let proxy = Proxy::bind_with(config, Some(toml.as_str().into()), None).await.expect("proxy");
    let state = AdminState::new(proxy.live().clone());
    let (s, b) = call(&state, "GET", "/pools/llm/scale").await;
    assert_error(s, &b, 503, "pool");
}

#[tokio::test]
async fn probes_and_the_dashboards_files_need_no_token_and_its_stream_does() {
    let token = "0123456789abcdef-secret";
    let state = state().await.with_token(token);
    let (s, b) = send(&state, "GET", "/healthz", None, "").await;
    assert_eq!((s, json(&b)["status"].clone()), (200, "ok".into()));
    let (s, b) = send(&state, "GET", "/readyz", None, "").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["pools"]["llm"]["endpoints"], 2);
    for path in ["/ui", "/ui/app.js", "/ui/app.css"] {
        let (s, b) = send(&state, "GET", path, None, "").await;
        assert_eq!(s, 200, "{path}");
        assert!(!b.is_empty());
    }
    let (s, b) = send(&state, "GET", "/ui/stream", None, "").await;
    assert_error(s, &b, 401, "authorization");
}

#[tokio::test]
async fn the_dashboard_streams_history_then_state() {
    let state = state().await;
    let req = axum::http::Request::builder().uri("/ui/stream").body(Body::empty()).expect("request");
    let resp = app(state.clone()).oneshot(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while text.matches("\n\n").count() < 2 {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.expect("two frames within 10 s");
        let frame = frame.expect("the stream goes on").expect("a frame");
        text.push_str(&String::from_utf8_lossy(frame.data_ref().expect("data")));
    }
    let frames: Vec<&str> = text.split("\n\n").collect();
    let data = |frame: &str| json(frame.split_once("data: ").expect("data line").1);
    assert!(frames[0].starts_with("event: hello\n"), "{}", frames[0]);
    let hello = data(frames[0]);
    assert!(hello["history"].is_array());
    assert!(hello["policies"].as_array().expect("policies").iter().any(|p| p == "least_connections"));
    assert!(frames[1].starts_with("event: state\n"), "{}", frames[1]);
    let now = data(frames[1]);
    let pool = &now["pools"][0];
    assert_eq!(pool["name"], "llm");
    assert_eq!(pool["endpoints"].as_array().expect("endpoints").len(), 2);
    assert!(now["events"].is_array());
}
