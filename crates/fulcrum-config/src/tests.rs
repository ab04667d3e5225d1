use super::*;
use fulcrum_core::PolicyKind;

const GOOD: &str = r#"
[proxy]
workers = 1
drain_timeout = "10s"

[[listener]]
name = "public"
address = "127.0.0.1:8080"

[[listener]]
name = "db"
address = "127.0.0.1:5433"
protocol = "tcp"
pool = "postgres"

[[route]]
listener = "public"
match = { path_prefix = "/v1/", model = ["llama-3-8b", "llama-3-8b-instruct"] }
pool = "llama"

[[route]]
match = { host = "Embed.Example.com", headers = { "X-Tenant" = "a" } }
pool = "embed"

[pool.llama]
policy = "power_of_two"
sticky_cookie = "fulcrum_sticky"
first_byte_timeout = "30s"
slow_start = { window = "30s" }
endpoints = [
  { address = "127.0.0.1:9001", weight = 2, labels = { gpu = "h100", zone = "a", rack = "r1" }, models = ["llama-3-8b"] },
  { address = "127.0.0.1:9002" },
]

[pool.embed]
policy = { name = "maglev", key = "header:x-user", table_size = 251 }
endpoints = [{ address = "127.0.0.1:9101" }]

[pool.postgres]
endpoints = [{ address = "127.0.0.1:5432" }]
"#;

fn err(text: &str) -> String {
    Config::parse(text, Some(Path::new("fulcrum.toml"))).unwrap_err().to_string()
}

#[test]
fn a_full_file_parses_into_typed_values() {
    let c = Config::parse(GOOD, None).unwrap();
    assert_eq!(c.proxy.workers, NonZeroUsize::new(1));
    assert_eq!(c.proxy.drain_timeout, Duration::from_secs(10));
    assert_eq!(c.listeners.len(), 2);
    assert!(matches!(&c.listeners[1].kind, ListenerKind::Tcp { pool } if pool == "postgres"));
    let ListenerKind::Http(http) = &c.listeners[0].kind else { panic!("http listener") };
    assert_eq!(http.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(c.routes[0].matcher.models, ["llama-3-8b", "llama-3-8b-instruct"]);
    // A route without a listener applies to every HTTP listener.
    assert_eq!(c.routes[1].listeners, ["public"]);
    assert_eq!(c.routes[1].matcher.host.as_deref(), Some("embed.example.com"));
    assert_eq!(c.routes[1].matcher.headers, [("x-tenant".to_owned(), "a".to_owned())]);
    let llama = &c.pools["llama"];
    assert_eq!(llama.policy.kind(), PolicyKind::PowerOfTwo);
    assert_eq!(llama.timeouts.first_byte, Duration::from_secs(30));
    assert_eq!(llama.endpoints[0].weight.get(), 2);
    assert_eq!(llama.endpoints[0].labels.accelerator.as_deref(), Some("h100"));
    assert_eq!(llama.endpoints[0].labels.other["rack"], "r1");
    assert!(llama.options.slow_start().is_some());
    assert_eq!(c.pools["embed"].policy.kind(), PolicyKind::Maglev);
    assert_eq!(c.pools["postgres"].policy, Policy::default());
}

#[test]
fn errors_name_file_line_and_field() {
    let e = err("[[listener]]\nname = \"a\"\naddress = \"localhost\"\n");
    assert!(e.starts_with("fulcrum.toml:3: listener.address: "), "{e}");
    assert!(e.contains("socket address"), "{e}");

    let e = err("[pool.x]\nendpoints = [{ address = \"127.0.0.1:1\", weight = 0 }]\n");
    assert!(e.starts_with("fulcrum.toml:2:") && e.contains("nonzero"), "{e}");

    let e = err("[pool.x]\npolicy = \"fastest\"\n");
    assert!(e.contains("fulcrum.toml:2: pool.x.policy: unknown policy `fastest`"), "{e}");

    let e = err("[pool.x]\nconnect_timeout = \"5\"\n");
    assert!(e.contains("needs a unit"), "{e}");

    let e = err("[pool.x]\nconnect_timeout = \"0s\"\n");
    assert!(e.contains("pool.x.connect_timeout: must be longer than zero"), "{e}");

    let e = err("[[route]]\npool = \"nope\"\n[pool.a]\n");
    assert!(e.contains("fulcrum.toml:2: route[0].pool: no pool is named `nope` (pools: a)"), "{e}");

    let e = err("[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\n");
    assert!(e.contains("listener[0].pool: a tcp listener needs a pool"), "{e}");

    let e = err(
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n",
    );
    assert!(e.contains("fulcrum.toml:5: listener[1].name: `a` is used twice"), "{e}");

    let e = err("[pool.x]\nweight = 3\n");
    assert!(e.contains("unknown field `weight`"), "{e}");

    let e = err("[pool.x]\nslow_start = { window = \"10s\", min_weight_percent = 150 }\n");
    assert!(e.contains("pool.x.slow_start") && e.contains("between 0 and 100"), "{e}");

    let e = err(
        "[pool.x]\npolicy = { name = \"maglev\", table_size = 3 }\nendpoints = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:2\" }, { address = \"127.0.0.1:3\" }, { address = \"127.0.0.1:4\" }]\n",
    );
    assert!(e.contains("pool.x: maglev table_size 3"), "{e}");

    let e = err("[pool.x]\nendpoints = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:1\" }]\n");
    assert!(e.contains("listed twice"), "{e}");

    let e = err("[[route]]\nmatch = { path_prefix = \"v1\" }\npool = \"a\"\n[pool.a]\n");
    assert!(e.contains("path_prefix: must start with `/`"), "{e}");

    let e = err("this is not toml");
    assert!(e.starts_with("fulcrum.toml:1: "), "{e}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let e = Config::load(Path::new("/nonexistent/fulcrum.toml")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/fulcrum.toml: cannot read the file"), "{e}");
}

#[test]
fn resilience_tables_parse_with_defaults() {
    let c = Config::parse(GOOD, None).unwrap();
    let r = &c.pools["llama"].resilience;
    assert!(r.health_check.is_none() && r.admission.is_none() && r.rate_limit.is_none());
    assert!(r.outlier.is_some() && r.breaker.is_some());
    let text = r#"
[[route]]
match = { model = "m" }
pool = "x"
[[route]]
match = { path_prefix = "/" }
pool = "x"
[pool.x]
panic_threshold = 30
health_check = { kind = "http", path = "/ready", interval = "500ms", rise = 1, fall = 2, expected_statuses = [200] }
outlier_detection = { consecutive_5xx = 3, max_ejection_percent = 50 }
circuit_breaker = { enabled = false, max_requests = 100 }
retry = { max_attempts = 4, retryable_statuses = [500, 503], budget_percent = 10.0 }
admission = { max_in_flight = 8, max_queue = 16, queue_timeout = "2s", priority_header = "X-Priority" }
rate_limit = { key = "header:x-api-key", rate = 5.0, burst = 10 }
"#;
    let c = Config::parse(text, None).unwrap();
    let r = &c.pools["x"].resilience;
    assert!(
        matches!(&r.health_check, Some(HealthCheckRef { kind: resilience::CheckKind::Http { path, .. }, .. }) if path == "/ready")
    );
    assert!(r.breaker.is_none());
    assert_eq!(r.admission.as_ref().unwrap().priority_header.as_deref(), Some("x-priority"));
    assert_eq!(r.rate_limit.as_ref().unwrap().key, resilience::RateKey::Header("x-api-key".into()));
    assert!(c.routes[0].inference && !c.routes[1].inference);
}

type HealthCheckRef = resilience::HealthCheck;

#[test]
fn resilience_nonsense_is_refused_by_name() {
    for (table, want) in [
        ("health_check = { rise = 0 }", "pool.x.health_check.rise: must be at least 1"),
        ("health_check = { kind = \"udp\" }", "pool.x.health_check.kind"),
        ("health_check = { interval = \"0s\" }", "pool.x.health_check.interval: must be longer than zero"),
        ("outlier_detection = { max_ejection_percent = 150 }", "pool.x.outlier_detection.max_ejection_percent"),
        ("retry = { budget_percent = -5.0 }", "pool.x.retry.budget_percent"),
        ("retry = { retryable_statuses = [200] }", "pool.x.retry.retryable_statuses"),
        ("admission = { max_in_flight = 0 }", "pool.x.admission.max_in_flight"),
        ("rate_limit = { key = \"cookie:x\" }", "pool.x.rate_limit.key"),
        ("panic_threshold = 120", "pool.x.panic_threshold"),
        ("circuit_breaker = { probes = 0 }", "pool.x.circuit_breaker.probes"),
        ("retry = { max_attempts = 3, unknown = 1 }", "unknown field `unknown`"),
    ] {
        let e = err(&format!("[pool.x]\n{table}\n"));
        assert!(e.contains(want), "{table}: {e}");
    }
}

#[test]
fn engine_metrics_scraping_is_configured_per_pool() {
    let c = Config::parse("[pool.x]\nengine_metrics = { interval = \"100ms\", models_path = \"/v1/models\" }\n", None)
        .unwrap();
    let m = c.pools["x"].engine_metrics.as_ref().unwrap();
    assert_eq!(
        (m.path.as_str(), m.interval, m.stale_after),
        ("/metrics", Duration::from_millis(100), Duration::from_millis(500))
    );
    assert_eq!(m.models_path.as_deref(), Some("/v1/models"));
    assert!(Config::parse("[pool.x]\n", None).unwrap().pools["x"].engine_metrics.is_none());
    let e = err("[pool.x]\nengine_metrics = { path = \"metrics\" }\n");
    assert!(e.contains("pool.x.engine_metrics.path: must start with `/`"), "{e}");
    let e = err("[pool.x]\nengine_metrics = { interval = \"0ms\" }\n");
    assert!(e.contains("engine_metrics.interval: must be longer than zero"), "{e}");
}

#[test]
fn discovery_paths_resolve_against_the_config_file() {
    let text = "[pool.x]\ndiscovery = { kind = \"file\", path = \"eps/llama.toml\" }\n";
    let c = Config::parse(text, Some(Path::new("/etc/fulcrum/fulcrum.toml"))).unwrap();
    let Some(discovery::DiscoveryConfig::File(f)) = &c.pools["x"].discovery else { panic!("file discovery") };
    assert_eq!(f.path, Path::new("/etc/fulcrum/eps/llama.toml"));
    // Without a file name the path stays relative (to the working directory).
    let c = Config::parse(text, None).unwrap();
    let Some(discovery::DiscoveryConfig::File(f)) = &c.pools["x"].discovery else { panic!("file discovery") };
    assert_eq!(f.path, Path::new("eps/llama.toml"));
    // With discovery, `endpoints` is the initial set and may be empty or not.
    assert!(c.pools["x"].endpoints.is_empty());
    let text = "[pool.x]\nendpoints = [{ address = \"127.0.0.1:1\" }]\ndiscovery = { kind = \"registration\", ttl = \"5s\" }\n";
    let c = Config::parse(text, None).unwrap();
    assert_eq!(c.pools["x"].endpoints.len(), 1);
    assert_eq!(c.pools["x"].discovery.as_ref().map(discovery::DiscoveryConfig::kind), Some("registration"));
    assert!(Config::parse(GOOD, None).unwrap().pools["llama"].discovery.is_none());
}

#[test]
fn endpoint_entries_are_checked_by_field() {
    let e = err("[pool.x]\nendpoints = [{ address = \"127.0.0.1:1\" }, { address = \"127.0.0.1:2\", id = \"\" }]\n");
    assert!(e.contains("pool.x.endpoints[1].id: must not be empty"), "{e}");
    let e = err("[pool.x]\nendpoints = [{ address = \"127.0.0.1:1\", labels = { \"\" = \"v\" } }]\n");
    assert!(e.contains("pool.x.endpoints[0].labels: a label name must not be empty"), "{e}");
}

#[test]
fn routes_have_unique_names_for_metrics_and_logs() {
    let c = Config::parse(GOOD, None).unwrap();
    assert_eq!(c.routes[0].name, "route0");
    assert_eq!(c.routes[1].name, "route1");
    let named = GOOD.replacen("[[route]]\nlistener", "[[route]]\nname = \"chat\"\nlistener", 1);
    let c = Config::parse(&named, None).unwrap();
    assert_eq!((c.routes[0].name.as_str(), c.routes[1].name.as_str()), ("chat", "route1"));
    let twice = GOOD.replacen("[[route]]\nlistener", "[[route]]\nname = \"route1\"\nlistener", 1);
    let e = err(&twice);
    assert!(e.contains("route[1].name: `route1` is used twice"), "{e}");
    for (name, says) in [("chat completions", "letters, digits"), ("default", "reserved")] {
        let bad = GOOD.replacen("[[route]]\nlistener", &format!("[[route]]\nname = \"{name}\"\nlistener"), 1);
        let e = err(&bad);
        assert!(e.contains("route[0].name: ") && e.contains(says), "{e}");
    }
}

#[test]
fn access_log_and_tracing_are_off_by_default() {
    let c = Config::parse(GOOD, None).unwrap();
    assert!(!c.proxy.access_log);
    assert_eq!(c.tracing, None);
    let text = format!("{GOOD}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n")
        .replace("workers = 1", "workers = 1\naccess_log = true");
    let c = Config::parse(&text, None).unwrap();
    assert!(c.proxy.access_log);
    let t = c.tracing.expect("tracing");
    assert_eq!(t.otlp_endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!((t.service_name.as_str(), t.sample_ratio), ("fulcrum", 1.0));
    let t = Config::parse(
        "[tracing]\notlp_endpoint = \"http://otel/\"\nservice_name = \"edge\"\nsample_ratio = 0.25\n",
        None,
    )
    .unwrap()
    .tracing
    .expect("tracing");
    assert_eq!((t.otlp_endpoint.port, t.service_name.as_str(), t.sample_ratio), (80, "edge", 0.25));
    // A table without an endpoint traces nothing.
    assert_eq!(Config::parse("[tracing]\nservice_name = \"edge\"\n", None).unwrap().tracing, None);
    let e = err("[tracing]\notlp_endpoint = \"http://otel:4318\"\nsample_ratio = 1.5\n");
    assert!(e.starts_with("fulcrum.toml:3: tracing.sample_ratio: must be from 0.0 to 1.0"), "{e}");
    let c = Config::parse(
        "[tracing]\notlp_endpoint = \"https://otel:4318\"\notlp_ca = \"ca.pem\"\n",
        Some(Path::new("/etc/f/f.toml")),
    )
    .unwrap();
    let t = c.tracing.unwrap();
    assert!(t.otlp_endpoint.https);
    assert_eq!(t.otlp_ca.as_deref(), Some(Path::new("/etc/f/ca.pem")));
    let e = err("[tracing]\nendpoint = \"http://otel:4318\"\n");
    assert!(e.contains("unknown field `endpoint`"), "{e}");
}

#[test]
fn an_llm_pool_without_a_policy_routes_by_predicted_ttft() {
    let pool = |extra: &str| {
        let text = format!("[pool.p]\nendpoints = [{{ address = \"127.0.0.1:9000\" }}]\n{extra}");
        Config::parse(&text, None).unwrap().pools.remove("p").unwrap()
    };
    assert_eq!(pool("engine_metrics = {}\n").policy.kind(), fulcrum_core::PolicyKind::PredictedTtft);
    assert_eq!(pool("").policy, fulcrum_core::Policy::default());
    // A named policy is kept.
    assert_eq!(
        pool("engine_metrics = {}\npolicy = \"least_connections\"\n").policy,
        fulcrum_core::Policy::LeastConnections
    );
}

#[test]
fn an_unknown_accelerator_label_is_an_error_naming_the_known_ones() {
    let pool = |gpu: &str| {
        format!(
            "[pool.x]\npolicy = {{ name = \"least_tokens\", capacity = \"accelerator\" }}\n\
             endpoints = [{{ address = \"127.0.0.1:1\", labels = {{ gpu = \"{gpu}\" }} }}]\n"
        )
    };
    let e = err(&pool("h800"));
    assert!(e.contains("pool.x.endpoints[0].labels.gpu: unknown accelerator `h800`"), "{e}");
    assert!(e.contains("a100, b200, cpu, h100, h200, l4, mi300x, tpu"), "{e}");
    for known in ["h200", "B200", "mi300x", "tpu"] {
        let c = Config::parse(&pool(known), None).unwrap_or_else(|e| panic!("{known}: {e}"));
        let capacity = c.pools["x"].policy.capacity().expect("a capacity").clone();
        assert!(capacity.base(&c.pools["x"].endpoints[0].labels, std::num::NonZeroU32::MIN) >= 2.0, "{known}");
    }
    // With the default capacity (the weight) labels are only labels.
    assert!(Config::parse(&pool("h800").replace(", capacity = \"accelerator\"", ""), None).is_ok());
}

#[test]
fn max_pending_is_refused_with_what_to_use_instead() {
    let e = err("[pool.x]\ncircuit_breaker = { max_pending = 10 }\n");
    assert!(e.contains("pool.x.circuit_breaker.max_pending: is not supported"), "{e}");
    assert!(e.contains("admission"), "{e}");
}

#[test]
fn what_serve_cannot_run_is_refused_by_validate() {
    let listener = "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:9000\"\npool = \"p\"\n";
    let pool = "[pool.p]\nendpoints = [{ address = \"127.0.0.1:1\" }]\n";
    let e = err(&format!("[proxy]\nworkers = 100000\n{listener}{pool}"));
    assert!(e.contains("fulcrum.toml:2: proxy.workers: must be at most 1024 threads, got 100000"), "{e}");
    let e = err(&format!("{listener}header_read_timeout = \"0s\"\n{pool}"));
    assert!(e.contains("listener[0].header_read_timeout: must be longer than zero"), "{e}");
    let e = err(&format!("[proxy]\nadmin = \"127.0.0.1:9000\"\n{listener}{pool}"));
    assert!(e.contains("listener[0].address: 127.0.0.1:9000 is the admin API's address"), "{e}");
}

#[test]
fn routes_take_a_hedging_switch_and_delay() {
    let base = "[pool.a]\nendpoints = [{ address = \"127.0.0.1:1\" }]\n[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n";
    let c = Config::parse(&format!("{base}[[route]]\npool = \"a\"\nhedge = false\n"), None).unwrap();
    assert_eq!((c.routes[0].hedge, c.routes[0].hedge_delay), (Some(false), None));
    let c = Config::parse(&format!("{base}[[route]]\npool = \"a\"\nhedge_delay = \"150ms\"\n"), None).unwrap();
    assert_eq!((c.routes[0].hedge, c.routes[0].hedge_delay), (None, Some(Duration::from_millis(150))));
    let e = err(&format!("{base}[[route]]\npool = \"a\"\nhedge_delay = \"0s\"\n"));
    assert!(e.contains("route[0].hedge_delay") && e.contains("longer than zero"), "{e}");
}

#[test]
fn routes_allow_websocket_upgrades_unless_they_list_others() {
    let c = Config::parse(GOOD, None).unwrap();
    assert_eq!(c.routes[0].upgrades, ["websocket"]);
    let text =
        GOOD.replace("pool = \"embed\"\n", "pool = \"embed\"\nupgrades = [\"WebSocket\", \"h2c\", \"websocket\"]\n");
    let c = Config::parse(&text, None).unwrap();
    assert_eq!(c.routes[1].upgrades, ["h2c", "websocket"]);
    let c = Config::parse(&GOOD.replace("pool = \"embed\"\n", "pool = \"embed\"\nupgrades = []\n"), None).unwrap();
    assert!(c.routes[1].upgrades.is_empty(), "an empty list allows no upgrade");
    let e = err(&GOOD.replace("pool = \"embed\"\n", "pool = \"embed\"\nupgrades = [\"web socket\"]\n"));
    assert!(e.contains("route.upgrades") && e.contains("`web socket` is not a protocol name"), "{e}");
}

#[test]
fn every_error_is_reported_at_its_fields_line() {
    let text = r#"[proxy]
workers = 1

[[listener]]
name = "public"
address = "127.0.0.1:8080"
header_read_timeout = "0s"

[[route]]
match = { path_prefix = "v1" }
pool = "a"

[pool.a]
endpoints = [{ address = "127.0.0.1:1" }]
connect_timeout = "0s"
retry = { max_attempts = 2,
          budget_percent = -5.0 }

[pool.b]
endpoints = [
  { address = "127.0.0.1:2" },
  { address = "127.0.0.1:3", id = "" },
]
health_check = { kind = "udp" }

[pool.b.autoscale]
target = 1.0
interval = "0s"
actuator = { kind = "docker" }
"#;
    let errors = Config::parse(text, Some(Path::new("f.toml"))).unwrap_err();
    let got: Vec<String> = errors.errors().iter().map(ToString::to_string).collect();
    let want = [
        "f.toml:7: listener[0].header_read_timeout: must be longer than zero",
        "f.toml:10: route[0].match.path_prefix: must start with `/`",
        "f.toml:15: pool.a.connect_timeout: must be longer than zero",
        "f.toml:17: pool.a.retry.budget_percent: ",
        "f.toml:22: pool.b.endpoints[1].id: must not be empty",
        "f.toml:24: pool.b.health_check.kind: must be",
        "f.toml:28: pool.b.autoscale.interval: must be longer than zero",
        "f.toml:29: pool.b.autoscale.actuator.kind: must be",
    ];
    assert_eq!(got.len(), want.len(), "{errors}");
    for (got, want) in got.iter().zip(want) {
        assert!(got.starts_with(want), "want {want:?}, got {got:?}\n{errors}");
    }
    // Display: one per line, in file order.
    assert_eq!(errors.to_string().lines().count(), want.len());
    assert_eq!(errors.first().line, Some(7));
}

#[test]
fn a_pool_with_errors_does_not_make_its_routes_errors_too() {
    let text = "[[route]]\npool = \"a\"\n[pool.a]\nidle_timeout = \"0s\"\n";
    let errors = Config::parse(text, None).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
    assert_eq!(errors.first().field, "pool.a.idle_timeout");
    assert_eq!(errors.first().line, Some(4));
}

#[test]
fn the_admin_listener_has_limits_by_default_and_from_the_file() {
    assert_eq!(Config::parse("", None).unwrap().proxy.admin_limits, AdminLimits::default());
    let text = "[proxy]\nadmin_max_connections = 8\nadmin_header_timeout = \"2s\"\nadmin_idle_timeout = \"5s\"\n";
    let limits = Config::parse(text, None).unwrap().proxy.admin_limits;
    assert_eq!(
        limits,
        AdminLimits {
            max_connections: 8,
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5)
        }
    );
    let e = err("[proxy]\nadmin = \"127.0.0.1:9901\"\nadmin_header_timeout = \"0s\"\nadmin_idle_timeout = \"0ms\"\n");
    assert!(e.contains("fulcrum.toml:3: proxy.admin_header_timeout: must be longer than zero"), "{e}");
    assert!(e.contains("fulcrum.toml:4: proxy.admin_idle_timeout: must be longer than zero"), "{e}");
    let e = err("[proxy]\nadmin_max_connections = 4611686018427387904\n");
    assert!(e.contains("admin_max_connections: must be at most 1000000"), "{e}");
    let e = err("[proxy]\nadmin_max_connections = 0\n");
    assert!(e.starts_with("fulcrum.toml:2:") && e.contains("admin_max_connections"), "{e}");
}

#[test]
fn type_errors_in_several_places_are_all_reported() {
    let text = r#"[[listener]]
name = "public"
address = "127.0.0.1:8080"
max_connections = "many"

[pool.a]
endpoints = [{ address = "127.0.0.1:1" }]
wieght = 2

[pool.b]
endpoints = [{ address = "127.0.0.1:2", weight = "heavy" }]

[[route]]
pool = "a"
hedge = "yes"

[extras]
x = 1
"#;
    let errors = Config::parse(text, Some(Path::new("f.toml"))).unwrap_err();
    let got: Vec<(Option<usize>, String)> = errors.errors().iter().map(|e| (e.line, e.to_string())).collect();
    let lines: Vec<Option<usize>> = got.iter().map(|g| g.0).collect();
    assert_eq!(lines, [Some(4), Some(8), Some(11), Some(15), Some(17)], "{errors}");
    assert!(got[1].1.contains("wieght"), "{errors}");
    assert!(got[4].1.contains("unknown section `extras`"), "{errors}");
    // A syntax error stops the reading: it comes alone.
    let errors = Config::parse("[pool.a\nendpoints = 1\n", None).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
}

const TLS_BASE: &str = r#"
[[listener]]
name = "https"
address = "127.0.0.1:8443"
pool = "p"
TLS

[pool.p]
endpoints = [{ address = "127.0.0.1:9001" }]
"#;

fn tls(table: &str) -> String {
    TLS_BASE.replace("TLS", table)
}

#[test]
fn tls_listeners_resolve_paths_and_default_to_tls_1_2_and_required_client_certificates() {
    let c = Config::parse(
        &tls(r#"tls = { cert = "certs/a.pem", key = "/keys/a.pem", client_ca = "ca.pem" }"#),
        Some(Path::new("/etc/fulcrum/fulcrum.toml")),
    )
    .unwrap();
    let t = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(t.certificates[0].cert, Path::new("/etc/fulcrum/certs/a.pem"));
    assert_eq!(t.certificates[0].key, Path::new("/keys/a.pem"));
    assert_eq!(t.client_ca.as_deref(), Some(Path::new("/etc/fulcrum/ca.pem")));
    assert_eq!(t.client_auth, ClientAuth::Required);
    assert_eq!(t.min_version, TlsVersion::V1_2);
    assert_eq!(t.handshake_timeout, Duration::from_secs(10));

    let c = Config::parse(
        &tls(r#"tls = { certificates = [{ cert = "a.pem", key = "a.key" }, { cert = "b.pem", key = "b.key" }], min_version = "1.3" }"#),
        None,
    )
    .unwrap();
    let t = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(t.certificates.len(), 2);
    assert_eq!(t.min_version, TlsVersion::V1_3);
    assert!(t.client_ca.is_none());
}

#[test]
fn bad_tls_settings_name_the_key() {
    for (table, key, says) in [
        ("tls = {}", "tls.cert", "needs a certificate"),
        (r#"tls = { cert = "a.pem" }"#, "tls.key", "needs its `key`"),
        (r#"tls = { cert = "a.pem", key = "a.key", min_version = "1.1" }"#, "tls.min_version", "not a TLS version"),
        (r#"tls = { cert = "a.pem", key = "a.key", client_auth = "optional" }"#, "tls.client_auth", "client_ca"),
        (
            r#"tls = { cert = "a.pem", key = "a.key", handshake_timeout = "0s" }"#,
            "tls.handshake_timeout",
            "longer than zero",
        ),
        (r#"tls = { cert = "a.pem", key = "a.key", ciphers = "ALL" }"#, "", "unknown field `ciphers`"),
    ] {
        let e = err(&tls(table));
        assert!(e.contains(key) && e.contains(says), "{table}: {e}");
    }
    let e = err(&format!(
        "{}\n[[route]]\nmatch = {{ client_identity = \"spiffe://a/*\" }}\npool = \"p\"\n",
        tls(r#"tls = { cert = "a.pem", key = "a.key" }"#)
    ));
    assert!(e.contains("route[0].match.client_identity") && e.contains("does not verify client certificates"), "{e}");
    let tcp = "[[listener]]\nname = \"t\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\npool = \"p\"\ntls = { cert = \"a\", key = \"b\" }\n[pool.p]\nendpoints = [{ address = \"127.0.0.1:2\" }]\n";
    assert!(err(tcp).contains("TLS is for http listeners"), "{}", err(tcp));
}

#[test]
fn upstream_tls_resolves_paths_and_names_what_is_wrong() {
    let pool = |tls: &str| format!("[pool.p]\nendpoints = [{{ address = \"127.0.0.1:443\" }}]\ntls = {tls}\n");
    let c = Config::parse(
        &pool(r#"{ server_name = "API.example.com", ca = "ca.pem", cert = "c.pem", key = "/k.pem" }"#),
        Some(Path::new("/etc/fulcrum/f.toml")),
    )
    .unwrap();
    let t = c.pools["p"].tls.as_ref().unwrap();
    assert_eq!(t.server_name.as_deref(), Some("api.example.com"));
    assert_eq!(t.ca.as_deref(), Some(Path::new("/etc/fulcrum/ca.pem")));
    let client = t.client_cert.as_ref().unwrap();
    assert_eq!((client.cert.as_path(), client.key.as_path()), (Path::new("/etc/fulcrum/c.pem"), Path::new("/k.pem")));
    // `tls = {}`: the system's roots, each endpoint's IP address as the name.
    let c = Config::parse(&pool("{}"), None).unwrap();
    assert_eq!(c.pools["p"].tls, Some(UpstreamTls { server_name: None, ca: None, client_cert: None }));
    for (tls, says) in [
        (r#"{ server_name = "not a name!" }"#, "pool.p.tls.server_name"),
        (r#"{ cert = "c.pem" }"#, "pool.p.tls.key"),
        (r#"{ verify = false }"#, "unknown field `verify`"),
    ] {
        let e = err(&pool(tls));
        assert!(e.contains(says), "{tls}: {e}");
    }
}

#[test]
fn h2_pools_cannot_scrape_engine_metrics() {
    let e = err("[pool.p]\nendpoints = [{ address = \"127.0.0.1:1\" }]\nprotocol = \"h2\"\nengine_metrics = {}\n");
    assert!(e.contains("pool.p.protocol") && e.contains("engine_metrics"), "{e}");
    let e = err("[pool.p]\nendpoints = []\nprotocol = \"h3\"\n");
    assert!(e.contains("protocol"), "{e}");
}
