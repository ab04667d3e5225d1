//! The admin API without sockets (`oneshot`), over a proxy whose pool is real.

use axum::body::Body;
use fulcrum_config::Config;
use fulcrum_control::admin::{AdminState, app};
use fulcrum_proxy::Proxy;
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn state() -> AdminState {
    let toml = r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "llm"

[pool.llm]
policy = "least_connections"
endpoints = [{ id = "a", address = "127.0.0.1:9" }, { id = "b", address = "127.0.0.1:10", weight = 2 }]
"#;
    let config = Config::parse(toml, None).expect("config");
    let proxy = Proxy::bind(&config).await.expect("proxy");
    AdminState::new(proxy.pools())
}

async fn call(state: &AdminState, method: &str, uri: &str) -> (u16, String) {
    let req = axum::http::Request::builder().method(method).uri(uri).body(Body::empty()).expect("request");
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
