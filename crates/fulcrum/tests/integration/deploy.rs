//! The deployment files under deploy/ (issue P2.3), checked against the real thing:
//!
//! - the Kubernetes manifests against the Kubernetes schemas, and KEDA's objects and the
//!   pieces' cross-references structurally (tests/python/validate_manifests.py, which needs
//!   the Python packages `kubernetes-validate` and `pyyaml`);
//! - the ConfigMap's fulcrum.toml with `fulcrum validate`; the Dockerfile and the systemd
//!   unit against it;
//! - every metric and label the Grafana dashboard queries against a live `/metrics` of
//!   `fulcrum serve` with an autoscaled pool;
//! - the call KEDA's ScaledObject makes (its url, Host, bearer token and valueLocation)
//!   against a live admin API, idle and under load.
//!
//! Everything runs as child processes on 127.0.0.1 (`fulcrum serve`, `fulcrum mock-backend`,
//! Python), each killed by its PID when dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::child::MockChild;

fn fulcrum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fulcrum"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).expect("repository root")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

use fulcrum_testkit::certs::Dir;

// === the files, read the simple way ===

/// The block scalar `fulcrum.toml: |` of the ConfigMap, de-indented.
fn configmap_toml() -> String {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = yaml.lines();
    let key = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("fulcrum.toml: |"))
        .expect("fulcrum.toml: | in the ConfigMap");
    let mut block = None;
    let mut out = String::new();
    for line in lines {
        if line.trim().is_empty() {
            out.push('\n');
            continue;
        }
        if indent(line) <= indent(key) {
            break;
        }
        let cut = *block.get_or_insert(indent(line));
        out.push_str(&line[cut.min(indent(line))..]);
        out.push('\n');
    }
    out
}

/// The value of the first `key: value` line (YAML, or `key = value` for TOML with `=`), without
/// quotes and without a trailing comment.
fn scalar(text: &str, key: &str, sep: char) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(sep)))
        .unwrap_or_else(|| panic!("no `{key}{sep}` line"));
    let value = line[key.len()..].trim_start()[1..].trim();
    match value.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or("").to_owned(),
        None => value.split(" #").next().unwrap_or("").trim().to_owned(),
    }
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {address}"))
}

// === processes ===

/// `fulcrum serve --no-watch -c FILE`, killed with SIGKILL when dropped; its log is drained.
struct Served {
    child: Child,
    listener: String,
    admin: String,
}

impl Served {
    fn start(config: &Path, extra: &[&str]) -> Served {
        let (child, rx) = super::child::serve(config, extra);
        let value =
            |line: &str, key: &str| line.split(key).nth(1).and_then(|v| v.split_whitespace().next()).map(str::to_owned);
        let (mut listener, mut admin) = (None, None);
        let mut log = Vec::new();
        while listener.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("serve did not start:\n{}", log.join("\n")));
            if line.contains("listening listener=public") {
                listener = value(&line, "addr=");
            } else if line.contains("admin API listening") {
                admin = value(&line, "address=");
            }
            log.push(line);
        }
        Served { child, listener: listener.expect("listener"), admin: admin.expect("admin") }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mock engine; `speed` slows or speeds its every duration.
fn mock(seed: u64, speed: &str) -> MockChild {
    let seed = seed.to_string();
    MockChild::spawn(&["--port", "0", "--seed", &seed, "--speed", speed].map(str::to_owned))
}

/// One HTTP/1.1 exchange with `Connection: close`: the status and the body (de-chunked).
fn exchange(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    try_exchange(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

fn try_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    s.write_all(format!("{head}\r\n{body}").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::other(format!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest.get(n + 2..).unwrap_or("");
    }
    out
}

fn chat(listener: &str, stream: bool, max_tokens: u32) -> std::io::Result<(u16, String)> {
    let body = format!(
        r#"{{"model":"mock-llm","messages":[{{"role":"user","content":"deploy me"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    );
    try_exchange(listener, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], &body)
}

/// Fails under CI, else says the test did not run and why.
fn skip_unless_ci(what: &str) {
    assert!(std::env::var_os("CI").is_none(), "{what}");
    println!("SKIPPED: {what}");
}

// === (a) the manifests ===

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    const MISSING: &str =
        "the Python packages `kubernetes-validate` and `pyyaml` are missing (pip install kubernetes-validate pyyaml)";
    let script = repo().join("tests/python/validate_manifests.py");
    let out = match Command::new("python3").arg(&script).arg(repo()).output() {
        Ok(out) => out,
        Err(e) => return skip_unless_ci(&format!("python3 cannot run ({e}); {MISSING}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if out.status.code() == Some(77) {
        return skip_unless_ci(MISSING);
    }
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("checked deployment.yaml#0 Deployment/fulcrum"), "{stdout}");
    assert!(stdout.contains("checked scaledobject.yaml#0 ScaledObject/"), "{stdout}");
}

// === (b) the configuration, the image and the unit ===

#[test]
fn the_configmap_config_passes_fulcrum_validate() {
    let dir = Dir::new("validate");
    let toml = configmap_toml();
    // As deployed: discovery in the cluster, the autoscaler left to KEDA, the admin API for
    // the Service's names. `validate` needs no cluster for any of it.
    for want in [r#"kind = "kubernetes""#, r#"actuator = { kind = "external" }"#, "admin_hosts", "[pool.llm.autoscale]"]
    {
        assert!(toml.contains(want), "the ConfigMap's fulcrum.toml lost {want}:\n{toml}");
    }
    let file = dir.write("fulcrum.toml", &toml);
    let out = fulcrum().arg("validate").arg("-c").arg(&file).output().expect("fulcrum validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(": ok (1 listeners, 0 routes, 1 pools"), "{stdout}");
}

#[test]
fn the_dockerfile_and_the_systemd_unit_agree_with_the_config() {
    let toml = configmap_toml();
    let listener_port = port_of(&scalar(&toml[toml.find("[[listener]]").expect("a listener")..], "address", '='));
    let admin_port = port_of(&scalar(&toml, "admin", '='));

    let docker = read("deploy/Dockerfile");
    let lines: Vec<&str> = docker.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let starting = |word: &str| lines.iter().filter(|l| l.starts_with(word)).copied().collect::<Vec<_>>();
    assert_eq!(starting("FROM ").len(), 2, "two stages: build and runtime");
    assert!(starting("FROM ")[0].ends_with(" AS build"), "{:?}", starting("FROM "));
    assert!(docker.contains("cargo build --release --locked -p fulcrum"));
    let user = starting("USER ");
    assert!(
        user.len() == 1 && !user[0].contains("root") && !user[0].starts_with("USER 0"),
        "a non-root user: {user:?}"
    );
    let expose = starting("EXPOSE ").concat();
    for port in [listener_port, admin_port] {
        assert!(expose.split_whitespace().any(|p| p == port.to_string()), "EXPOSE {port} (the config's): {expose}");
    }
    assert_eq!(starting("ENTRYPOINT "), ["ENTRYPOINT [\"fulcrum\", \"serve\", \"-c\", \"/etc/fulcrum/fulcrum.toml\"]"]);
    assert_eq!(
        starting("COPY --from=build "),
        ["COPY --from=build /out/fulcrum /usr/local/bin/fulcrum"],
        "only the binary"
    );
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/") && ignore.lines().any(|l| l.trim() == ".git/"), "{ignore}");

    let unit = read("deploy/systemd/fulcrum.service");
    let set = |key: &str| -> Vec<String> {
        unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned).collect()
    };
    assert!(set("ExecReload").iter().any(|c| c == "/bin/kill -HUP $MAINPID"), "reload is SIGHUP");
    assert_eq!(set("KillSignal"), ["SIGTERM"]);
    assert_eq!(set("Restart"), ["on-failure"]);
    for (key, value) in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("DynamicUser", "yes")] {
        assert_eq!(set(key), [value], "{key}");
    }
    assert!(!set("LimitNOFILE").is_empty());
    // SIGKILL must not cut a drain short: the stop timeout outlasts the config's drain.
    let stop: u64 = set("TimeoutStopSec")[0].trim_end_matches('s').parse().expect("TimeoutStopSec in seconds");
    let drain: u64 =
        scalar(&toml, "drain_timeout", '=').trim_end_matches('s').parse().expect("drain_timeout in seconds");
    assert!(stop > drain, "TimeoutStopSec {stop} s <= drain_timeout {drain} s");
    // systemd's own check, where systemd is (pointed at this build's binary).
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let dir = Dir::new("unit");
        let copy = dir.write("fulcrum.service", &unit.replace("/usr/local/bin/fulcrum", env!("CARGO_BIN_EXE_fulcrum")));
        let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
    } else {
        println!("systemd-analyze is not installed: the unit's syntax is not checked by systemd");
    }
}

// === (c) the dashboard against a live /metrics ===

/// Families exported only for pools whose autoscale policy forecasts (`predictive`).
const PREDICTIVE_ONLY: &[&str] =
    &["fulcrum_autoscale_forecast_requests_per_second", "fulcrum_autoscale_forecast_replicas"];

/// The sample names of a Prometheus text scrape, each with the label names seen on it, and the
/// families its `# TYPE` lines declare.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<String, BTreeSet<String>>,
    families: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    scrape.families.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = scrape.samples.entry(line[..end].to_owned()).or_default();
            if let Some(mut rest) = line[end..].strip_prefix('{') {
                // name="value" pairs; values may hold escaped quotes, commas and braces.
                while let Some((name, after)) = rest.split_once("=\"") {
                    labels.insert(name.trim_start_matches(',').trim().to_owned());
                    let mut escaped = false;
                    let close = after
                        .char_indices()
                        .find(|&(_, c)| {
                            let stop = c == '"' && !escaped;
                            escaped = c == '\\' && !escaped;
                            stop
                        })
                        .map(|(i, _)| i)
                        .expect("closing quote");
                    rest = &after[close + 1..];
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
        }
        scrape
    }

    /// The family a sample name belongs to (`fulcrum_requests_total` to `fulcrum_requests`,
    /// `..._bucket`, `_sum`, `_count` and `_created` to their histogram or counter).
    fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        ["_total", "_created", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| sample.strip_suffix(s).filter(|base| self.families.contains_key(*base)))
            .unwrap_or(sample)
    }
}

/// `expr` with the contents of its string literals removed (label values, regexes).
fn without_strings(expr: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if c == q && !escaped {
                    quote = None;
                    out.push(c);
                }
                escaped = c == '\\' && !escaped;
            }
            None => {
                if c == '"' || c == '\'' || c == '`' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// The identifiers of a PromQL expression (strings removed), each with the byte just after it.
fn tokens(expr: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            // `$__rate_interval` and `$pool` are Grafana's, not PromQL's.
            if start == 0 || bytes[start - 1] != b'$' {
                out.push((expr[start..i].to_owned(), i));
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The text between the bracket at `open` and its match.
fn bracketed(expr: &str, open: usize) -> &str {
    let (o, c) = match expr.as_bytes()[open] {
        b'(' => ('(', ')'),
        _ => ('{', '}'),
    };
    let mut depth = 0;
    for (i, ch) in expr[open..].char_indices() {
        if ch == o {
            depth += 1;
        } else if ch == c {
            depth -= 1;
            if depth == 0 {
                return &expr[open + 1..open + i];
            }
        }
    }
    panic!("unbalanced {o} in {expr}");
}

/// What an expression uses: metric names, each with the labels its selector matches on, and
/// the labels of its `by`, `without`, `on`, `ignoring` and `group_*` clauses.
#[derive(Debug, Default)]
struct Uses {
    metrics: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

fn uses(expr: &str) -> Uses {
    let expr = without_strings(expr);
    let mut u = Uses::default();
    let next_char = |at: usize| expr[at..].char_indices().find(|(_, c)| !c.is_whitespace()).map(|(i, c)| (at + i, c));
    for (word, end) in tokens(&expr) {
        const CLAUSES: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
        if word.starts_with("fulcrum_") {
            let labels = match next_char(end) {
                Some((at, '{')) => bracketed(&expr, at)
                    .split(',')
                    .filter_map(|m| m.split(['=', '!']).next())
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect(),
                _ => Vec::new(),
            };
            u.metrics.push((word, labels));
        } else if CLAUSES.contains(&word.as_str())
            && let Some((at, '(')) = next_char(end)
        {
            u.grouping.extend(bracketed(&expr, at).split(',').map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()));
        }
    }
    u
}

/// Every query of the dashboard: panel targets (rows' nested panels too) and template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((title.clone(), t["expr"].as_str().expect("every target has an expr").to_owned()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str()).unwrap_or("");
        // `label_values(metric, label)` is Grafana's: the label is on the metric.
        let q = match q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            Some(args) => match args.rsplit_once(',') {
                Some((metric, label)) => format!("group by ({}) ({})", label.trim(), metric.trim()),
                None => args.to_owned(),
            },
            None => q.to_owned(),
        };
        out.push((format!("variable ${}", v["name"].as_str().unwrap_or("?")), q));
    }
    out
}

fn autoscaled_config(
    endpoints: &[&MockChild],
    extra_proxy: &str,
    pool: &str,
    bounds: (u32, u32),
    predictive: bool,
) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|m| format!("{{ address = \"{}\" }}", m.addr)).collect();
    // A season of 2 s in slots of 200 ms (the lead may not pass the season): the first
    // forecast comes after 200 ms.
    let predictive = match predictive {
        true => "predictive = { lead = \"1s\", season = \"2s\", slot = \"200ms\", rate_per_replica = 4.0 }\n",
        false => "",
    };
    format!(
        r#"[proxy]
admin = "127.0.0.1:0"
{extra_proxy}

[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "{pool}"

[pool.{pool}]
policy = "least_connections"
endpoints = [{endpoints}]
admission = {{ max_in_flight = 256, max_queue = 64, queue_timeout = "5s" }}

[pool.{pool}.autoscale]
policy = "threshold"
metric = "in_flight"
target = 1.0
reserve = 0
cooldown = "200ms"
min_replicas = {min}
max_replicas = {max}
interval = "100ms"
actuator = {{ kind = "external" }}
{predictive}"#,
        endpoints = endpoints.join(", "),
        min = bounds.0,
        max = bounds.1,
    )
}

#[test]
fn every_dashboard_query_names_exported_metrics_and_labels() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/fulcrum.json")).expect("the dashboard is JSON");
    // Importable: a datasource input, and every panel and target reading from it.
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "{} has no query", p["title"]);
        }
    }

    // A pool with every family the dashboard shows: admission, an autoscaler (external, as
    // with KEDA), and a predictive policy if this build has one.
    let dir = Dir::new("grafana");
    let (a, b) = (mock(1, "20"), mock(2, "20"));
    let config = |predictive| autoscaled_config(&[&a, &b], "", "llm", (1, 8), predictive);
    let probe = dir.write("predictive.toml", &config(true));
    let probed = fulcrum().arg("validate").arg("-c").arg(&probe).output().expect("validate");
    let predictive = probed.status.success();
    let served = Served::start(&dir.write("fulcrum.toml", &config(predictive)), &[]);
    for _ in 0..3 {
        assert_eq!(chat(&served.listener, false, 8).expect("a chat completion").0, 200);
    }
    // A stream, so that the time to first token is that of a first token.
    let (status, body) = chat(&served.listener, true, 8).expect("a streamed chat completion");
    assert!(status == 200 && body.contains("data: [DONE]"), "{status} {body}");

    // The autoscaler reports at its first tick (100 ms), a forecast once its first slot ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, text) = exchange(&served.admin, "GET", "/metrics", &[], "");
        assert_eq!(status, 200, "{text}");
        let forecast = !predictive || text.contains("fulcrum_autoscale_forecast_requests_per_second{");
        if (text.contains("fulcrum_autoscale_desired_replicas{") && forecast) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let scrape = Scrape::parse(&metrics);

    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    let mut unchecked = BTreeSet::new();
    for (panel, expr) in dashboard_queries(&dashboard) {
        let u = uses(&expr);
        assert!(!u.metrics.is_empty(), "{panel}: no fulcrum_ metric in {expr}");
        for (metric, labels) in &u.metrics {
            let family = scrape.family_of(metric);
            if PREDICTIVE_ONLY.contains(&family) && !predictive {
                unchecked.insert(metric.clone());
                continue;
            }
            let Some(have) = scrape.samples.get(metric) else {
                let hint = match scrape.families.get(family) {
                    Some(kind) => format!("the family {family} ({kind}) is exported, but no sample is named {metric}"),
                    None => "no such family on /metrics".to_owned(),
                };
                problems.push(format!("{panel}: {metric}: {hint}"));
                continue;
            };
            checked.insert(metric.clone());
            for label in labels.iter().chain(&u.grouping) {
                if !have.contains(label) {
                    problems.push(format!("{panel}: {metric} has no label `{label}` (it has {have:?}): {expr}"));
                }
            }
        }
    }
    println!("checked against /metrics: {checked:?}");
    if !unchecked.is_empty() {
        println!(
            "NOT CHECKED: {unchecked:?}: exported only with a predictive policy, which this build refuses: {}",
            String::from_utf8_lossy(&probed.stderr)
        );
    }
    assert!(problems.is_empty(), "{} problems:\n{}\n\n/metrics:\n{metrics}", problems.len(), problems.join("\n"));
    // What the dashboard must show (issue P2.3).
    for want in [
        "fulcrum_requests_total",
        "fulcrum_time_to_first_byte_seconds_bucket",
        "fulcrum_request_duration_seconds_bucket",
        "fulcrum_pool_in_flight",
        "fulcrum_endpoint_requests_total",
        "fulcrum_endpoint_available",
        "fulcrum_endpoint_learned_speed",
        "fulcrum_pool_retries_total",
        "fulcrum_pool_ejections_total",
        "fulcrum_pool_admission_queued",
        "fulcrum_autoscale_replicas",
        "fulcrum_autoscale_desired_replicas",
    ] {
        assert!(checked.contains(want), "the dashboard does not show {want}");
    }
    assert!(
        checked.contains(PREDICTIVE_ONLY[0]) || unchecked.contains(PREDICTIVE_ONLY[0]),
        "the dashboard does not show the forecast"
    );
}

// === (d) what KEDA reads ===

/// What the ScaledObject's metrics-api trigger asks for.
struct KedaTrigger {
    /// `host:port`, sent as `Host`.
    authority: String,
    /// `/pools/{pool}/scale`.
    path: String,
    pool: String,
    value_location: String,
    bounds: (u32, u32),
}

fn keda_trigger() -> KedaTrigger {
    let yaml = read("deploy/keda/scaledobject.yaml");
    assert_eq!(scalar(&yaml, "- type", ':'), "metrics-api");
    assert_eq!(scalar(&yaml, "authMode", ':'), "bearer");
    let url = scalar(&yaml, "url", ':');
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("url {url}: http:// expected"));
    let (authority, path) = rest.split_at(rest.find('/').expect("a path"));
    let parts: Vec<&str> = path.split('/').collect();
    assert!(
        parts.len() == 4 && parts[1] == "pools" && parts[3] == "scale",
        "url path {path}: /pools/{{pool}}/scale expected"
    );
    let count = |key| scalar(&yaml, key, ':').parse::<u32>().unwrap_or_else(|e| panic!("{key}: {e}"));
    KedaTrigger {
        authority: authority.to_owned(),
        path: path.to_owned(),
        pool: parts[2].to_owned(),
        value_location: scalar(&yaml, "valueLocation", ':'),
        bounds: (count("minReplicaCount"), count("maxReplicaCount")),
    }
}

/// The value at a GJSON path of plain keys (`a.b.c`), as the metrics-api scaler reads it.
fn at<'a>(v: &'a Value, location: &str) -> &'a Value {
    assert!(
        !location.contains(['*', '?', '#', '|', '@', '\\']),
        "{location}: only plain GJSON paths are followed here"
    );
    location.split('.').fold(v, |v, key| &v[key])
}

#[test]
fn the_admin_api_answers_what_the_scaled_object_reads() {
    let keda = keda_trigger();
    let dir = Dir::new("keda");
    // The admin API as deployed: behind the Service's names (admin_hosts from the ConfigMap),
    // with a bearer token that KEDA's TriggerAuthentication sends.
    let toml = configmap_toml();
    let hosts = toml.lines().find(|l| l.starts_with("admin_hosts")).expect("admin_hosts in the ConfigMap's [proxy]");
    let token = "keda-reads-this-token-0123456789";
    let token_file = dir.write("admin-token", token);
    // Slow engines: 200-token streams last about 3 s, so concurrent ones pile up in flight.
    let (a, b) = (mock(3, "0.5"), mock(4, "0.5"));
    let config = autoscaled_config(&[&a, &b], hosts, &keda.pool, keda.bounds, false);
    let served =
        Served::start(&dir.write("fulcrum.toml", &config), &["--admin-token-file", token_file.to_str().expect("path")]);
    let bearer = format!("Bearer {token}");
    let headers = [("Host", keda.authority.as_str()), ("Authorization", bearer.as_str())];
    // The answer, or `None` for the 503 "not decided yet" before the autoscaler's first tick.
    let try_get = || {
        let (status, body) = exchange(&served.admin, "GET", &keda.path, &headers, "");
        if status == 503 && body.contains("has not decided yet") {
            return None;
        }
        assert_eq!(status, 200, "GET {} as KEDA: {body}", keda.path);
        Some(serde_json::from_str::<Value>(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
    };
    let get = || try_get().expect("a decision, once there was one");
    // The replica count KEDA reads, checked as the scaler and the HPA will use it.
    let desired = |v: &Value| -> u64 {
        let value = at(v, &keda.value_location);
        let n = value.as_u64().unwrap_or_else(|| panic!("{}: not a non-negative integer: {v}", keda.value_location));
        assert_eq!(value, &v["desired_replicas"], "{v}");
        assert_eq!((v["pool"].as_str(), v["autoscaled"].as_bool()), (Some(keda.pool.as_str()), Some(true)), "{v}");
        let (lo, hi) = keda.bounds;
        assert!((u64::from(lo)..=u64::from(hi)).contains(&n), "{n} is outside the pool's {lo}..={hi}: {v}");
        for (field, bound) in [("min_replicas", lo), ("max_replicas", hi)] {
            if !v[field].is_null() {
                assert_eq!(v[field], u64::from(bound), "{v}");
            }
        }
        n
    };

    // Without the token KEDA's scaler would get 401; with the ScaledObject's Host and the token, 200.
    let (status, body) = exchange(&served.admin, "GET", &keda.path, &[("Host", keda.authority.as_str())], "");
    assert_eq!(status, 401, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let idle = loop {
        if let Some(v) = try_get() {
            break desired(&v);
        }
        assert!(Instant::now() < deadline, "no decision within 10 s (the autoscaler ticks every 100 ms)");
        std::thread::sleep(Duration::from_millis(50));
    };

    // Load: twelve concurrent streams on two endpoints, a target of one in flight per replica.
    let load: Vec<_> = (0..12)
        .map(|_| {
            let listener = served.listener.clone();
            // Cut short when the proxy stops at the end: the outcome does not matter.
            std::thread::spawn(move || drop(chat(&listener, true, 200)))
        })
        .collect();
    let want = (u64::from(keda.bounds.1)).min(4).max(idle + 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let peak = loop {
        let v = get();
        let n = desired(&v);
        seen.push(n);
        if n >= want {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "desired_replicas never reached {want} under load (idle {idle}): {seen:?}; last {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("idle desired_replicas {idle}; under load {seen:?}; {peak}");
    drop(served);
    for h in load {
        let _ = h.join();
    }
}
