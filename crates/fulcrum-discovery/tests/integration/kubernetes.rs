//! The `kubernetes` provider against a minimal fake API server on 127.0.0.1: it lists
//! EndpointSlices and streams watch events the test sends, and records every request.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_config::discovery::{DiscoveryConfig, KubernetesDiscovery, PortRef, SliceSelector};
use fulcrum_discovery::{Discovery, StatusBoard};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use serde_json::{Value, json};
use support::*;
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct Cluster {
    /// What a list returns.
    slices: Vec<Value>,
    resource_version: u64,
    /// Open watches.
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Every request's path and query.
    requests: Vec<String>,
    /// Every request's Authorization header.
    authorization: Vec<Option<String>>,
}

type Shared = Arc<Mutex<Cluster>>;

const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/ai/endpointslices";

fn slice(name: &str, endpoints: &[(&str, Option<bool>)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            let mut e =
                json!({ "addresses": [ip], "zone": "z1", "targetRef": { "kind": "Pod", "name": format!("pod-{ip}") } });
            if let Some(r) = ready {
                e["conditions"] = json!({ "ready": r });
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": "ai", "resourceVersion": "1",
                      "labels": { "kubernetes.io/service-name": "vllm" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8000, "protocol": "TCP" }, { "name": "metrics", "port": 9090 }],
        "endpoints": endpoints,
    })
}

impl Cluster {
    /// Sends a watch event to every open watch.
    fn event(&mut self, kind: &str, object: Value) {
        self.resource_version += 1;
        let line = format!("{}\n", json!({ "type": kind, "object": object }));
        self.watchers.retain(|w| w.send(Bytes::from(line.clone())).is_ok());
    }

    fn lists(&self) -> usize {
        self.requests.iter().filter(|r| !r.contains("watch=true")).count()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn respond(cluster: &Shared, path: &str, query: &str) -> http::Response<Body> {
    let json_response = |code: u16, value: Value| {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(value.to_string())).boxed())
            .expect("response")
    };
    if path != PATH {
        return json_response(
            404,
            json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": path }),
        );
    }
    let mut c = cluster.lock().expect("lock");
    if query.contains("watch=true") {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        c.watchers.push(tx);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        return http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("response");
    }
    json_response(
        200,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": { "resourceVersion": c.resource_version.to_string() },
            "items": c.slices,
        }),
    )
}

async fn fake_api_server(slices: Vec<Value>) -> (SocketAddr, Shared) {
    fake_api_server_with(slices, None).await
}

/// The fake API server, over TLS when `tls` is given (as a real API server is).
async fn fake_api_server_with(slices: Vec<Value>, tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let cluster: Shared = Arc::new(Mutex::new(Cluster { slices, resource_version: 100, ..Cluster::default() }));
    let state = cluster.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (cluster, tls) = (cluster.clone(), tls.clone());
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let cluster = cluster.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let query = req.uri().query().unwrap_or_default().to_owned();
                    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let mut c = cluster.lock().expect("lock");
                    c.requests.push(format!("{path}?{query}"));
                    c.authorization.push(auth);
                    drop(c);
                    Ok::<_, Infallible>(respond(&cluster, &path, &query))
                }
            });
            tokio::spawn(async move {
                fulcrum_testkit::certs::serve_http1(stream, tls, service).await;
            });
        }
    });
    (address, state)
}

fn config(address: SocketAddr) -> DiscoveryConfig {
    DiscoveryConfig::Kubernetes(KubernetesDiscovery {
        api_server: Some(format!("http://{address}")),
        namespace: "ai".to_owned(),
        selector: SliceSelector::Service("vllm".to_owned()),
        port: Some(PortRef::Name("http".to_owned())),
        token_file: None,
        ca_file: None,
        timeout: Duration::from_secs(5),
    })
}

async fn wait_watching(cluster: &Shared, n: usize) {
    eventually(WAIT, "a watch is open", || {
        cluster.lock().expect("lock").watchers.iter().filter(|w| !w.is_closed()).count() >= n
    })
    .await;
}

#[tokio::test]
async fn a_list_then_watch_events_keep_the_set_current() {
    let initial = slice("vllm-abc", &[("127.0.0.1", Some(true)), ("127.0.0.2", Some(false)), ("127.0.0.5", None)]);
    let (address, cluster) = fake_api_server(vec![initial]).await;
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", config(address));

    // The list: ready (or unknown) endpoints only, at the port named http.
    let set = sink.wait_for("llama", WAIT, "the initial list", |s| s.len() == 2).await;
    assert_eq!(addresses(&set), ["127.0.0.1:8000", "127.0.0.5:8000"]);
    assert_eq!(set[0].labels.zone.as_deref(), Some("z1"));
    assert_eq!(set[0].labels.other["pod"], "pod-127.0.0.1");
    {
        let c = cluster.lock().expect("lock");
        assert!(c.requests[0].contains("labelSelector=kubernetes.io%2Fservice-name%3Dvllm"), "{:?}", c.requests);
    }

    // A watch event: 127.0.0.2 became ready.
    wait_watching(&cluster, 1).await;
    let watch = cluster.lock().expect("lock").requests.iter().find(|r| r.contains("watch=true")).cloned();
    assert!(watch.is_some_and(|w| w.contains("resourceVersion=100")), "the watch starts at the list's version");
    cluster
        .lock()
        .expect("lock")
        .event("MODIFIED", slice("vllm-abc", &[("127.0.0.1", Some(true)), ("127.0.0.2", Some(true))]));
    sink.wait_for("llama", WAIT, "the modified slice", |s| addresses(s) == ["127.0.0.1:8000", "127.0.0.2:8000"]).await;

    // Another slice of the same service.
    cluster.lock().expect("lock").event("ADDED", slice("vllm-def", &[("127.0.0.3", Some(true))]));
    sink.wait_for("llama", WAIT, "the added slice", |s| s.len() == 3).await;

    // A slice deleted.
    cluster.lock().expect("lock").event("DELETED", slice("vllm-abc", &[]));
    sink.wait_for("llama", WAIT, "the deleted slice", |s| addresses(s) == ["127.0.0.3:8000"]).await;

    // The watch's version is too old: the provider lists again.
    let lists = cluster.lock().expect("lock").lists();
    {
        let mut c = cluster.lock().expect("lock");
        c.slices = vec![slice("vllm-def", &[("127.0.0.3", Some(true)), ("127.0.0.4", Some(true))])];
        c.event("ERROR", json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired", "message": "too old resource version" }));
    }
    sink.wait_for("llama", WAIT, "the relist", |s| s.len() == 2 && addresses(s)[1] == "127.0.0.4:8000").await;
    assert!(cluster.lock().expect("lock").lists() > lists);
    let s = status.get("llama").expect("status");
    assert_eq!((s.kind, s.consecutive_failures), ("kubernetes", 0), "{s:?}");
    task.abort();
}

#[tokio::test]
async fn an_unreachable_api_server_is_reported() {
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", config(refused_address()));
    let s = wait_failing(&status, "llama", "listing endpointslices in namespace ai").await;
    assert_eq!(s.endpoints, None);
    assert!(sink.sets("llama").is_empty());
    task.abort();
}

#[tokio::test]
async fn a_token_file_is_sent_as_a_bearer_token() {
    let dir = TempDir::new("token");
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-token\n").expect("write");
    let (address, cluster) = fake_api_server(vec![slice("vllm-abc", &[("127.0.0.1", Some(true))])]).await;
    let DiscoveryConfig::Kubernetes(mut k) = config(address) else { unreachable!() };
    k.token_file = Some(token);
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", DiscoveryConfig::Kubernetes(k));
    sink.wait_for("llama", WAIT, "the list", |s| s.len() == 1).await;
    let auth = cluster.lock().expect("lock").authorization[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer secret-token"), "the trailing newline is not sent");
    task.abort();

    // An empty token file is an error the status board shows.
    std::fs::write(dir.path().join("token"), "\n").expect("write");
    let DiscoveryConfig::Kubernetes(mut k) = config(address) else { unreachable!() };
    k.token_file = Some(dir.path().join("token"));
    let task = Discovery::new(sink.clone(), status.clone()).spawn("empty", DiscoveryConfig::Kubernetes(k));
    wait_failing(&status, "empty", "token").await;
    task.abort();
}

/// As in a pod: the API server over https, verified against the service account's CA, and
/// the service account's token sent as a bearer token.
#[tokio::test]
async fn an_https_api_server_is_verified_against_its_ca_with_the_token_sent() {
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let ca = Ca::new("cluster CA");
    let leaf = ca.leaf(Usage::Server, "kubernetes", &["127.0.0.1", "kubernetes.default.svc"], &[]);
    let server = fulcrum_testkit::certs::server_config(&leaf);
    let initial = slice("vllm-abc", &[("127.0.0.1", Some(true))]);
    let (address, cluster) = fake_api_server_with(vec![initial], Some(std::sync::Arc::new(server).into())).await;
    let dir = Dir::new("k8s-tls");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let token_file = dir.write("token", "pod-token\n");
    let other_ca = dir.write("other.crt", &Ca::new("other").pem());
    let https = |ca: &std::path::Path| {
        DiscoveryConfig::Kubernetes(KubernetesDiscovery {
            api_server: Some(format!("https://{address}")),
            ca_file: Some(ca.to_owned()),
            token_file: Some(token_file.clone()),
            ..match config(address) {
                DiscoveryConfig::Kubernetes(k) => k,
                _ => unreachable!(),
            }
        })
    };
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("llama", https(&ca_file));
    let set = sink.wait_for("llama", WAIT, "the list over https", |s| s.len() == 1).await;
    assert_eq!(addresses(&set), ["127.0.0.1:8000"]);
    assert_eq!(cluster.lock().expect("lock").authorization[0].as_deref(), Some("Bearer pod-token"));
    task.abort();
    // (Its watch may still have been on its way.)
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A server the CA did not sign: nothing is read, and the status says why.
    let requests = cluster.lock().expect("lock").requests.len();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(RecordingSink::new(), status.clone()).spawn("other", https(&other_ca));
    wait_failing(&status, "other", "certificate").await;
    assert_eq!(cluster.lock().expect("lock").requests.len(), requests, "no request reached an unverified server");
    task.abort();
}
