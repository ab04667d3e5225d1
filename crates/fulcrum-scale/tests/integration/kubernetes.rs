//! The Kubernetes actuator against a minimal fake API server on 127.0.0.1: it implements GET and
//! PATCH of `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, checks the merge patch's
//! content type, and records every request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum_scale::{Actuator, ActuatorError, KubernetesActuator, KubernetesError, KubernetesSettings};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path_and_query: String,
    content_type: Option<String>,
    body: Option<Value>,
    authorization: Option<String>,
}

#[derive(Debug)]
struct Cluster {
    /// `spec.replicas` of deployments/llm in namespace ai.
    desired: i32,
    /// `status.replicas`: lags behind, as a real Deployment's does.
    current: i32,
    requests: Vec<Recorded>,
}

type Shared = Arc<Mutex<Cluster>>;

const SCALE_PATH: &str = "/apis/apps/v1/namespaces/ai/deployments/";

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (code, body)
}

fn scale(cluster: &Cluster) -> Value {
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": { "name": "llm", "namespace": "ai" },
        "spec": { "replicas": cluster.desired },
        "status": { "replicas": cluster.current, "selector": "app=llm" },
    })
}

fn answer(
    cluster: &Shared,
    method: &http::Method,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let Some(name) = path.strip_prefix(SCALE_PATH).and_then(|rest| rest.strip_suffix("/scale")) else {
        return status(404, "NotFound", &format!("the server could not find the requested resource {path}"));
    };
    match name {
        "llm" => {}
        "broken" => return status(500, "InternalError", "etcd is on fire"),
        other => return status(404, "NotFound", &format!("deployments.apps \"{other}\" not found")),
    }
    let mut cluster = cluster.lock().expect("lock");
    match *method {
        http::Method::GET => (200, scale(&cluster)),
        http::Method::PATCH => {
            if content_type != Some("application/merge-patch+json") {
                return status(415, "UnsupportedMediaType", &format!("unsupported patch type {content_type:?}"));
            }
            let replicas = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["spec"]["replicas"].as_i64());
            match replicas.and_then(|r| i32::try_from(r).ok()) {
                Some(r) => {
                    cluster.desired = r;
                    (200, scale(&cluster))
                }
                None => status(422, "Invalid", "spec.replicas must be an integer"),
            }
        }
        _ => status(405, "MethodNotAllowed", "only GET and PATCH"),
    }
}

/// Starts the fake API server; returns its address and its state.
async fn fake_api_server(desired: i32, current: i32) -> (SocketAddr, Shared) {
    fake_api_server_with(desired, current, None).await
}

/// The fake API server, over TLS when `tls` is given (as a real API server is); it records
/// each request's `Authorization` as its content type's neighbour in `Recorded`.
async fn fake_api_server_with(
    desired: i32,
    current: i32,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let cluster: Shared = Arc::new(Mutex::new(Cluster { desired, current, requests: Vec::new() }));
    let state = cluster.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (cluster, tls) = (cluster.clone(), tls.clone());
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let cluster = cluster.clone();
                async move {
                    let method = req.method().clone();
                    let path = req.uri().path().to_owned();
                    let path_and_query = req.uri().path_and_query().map_or(path.clone(), |p| p.to_string());
                    let content_type =
                        req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let authorization =
                        req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    cluster.lock().expect("lock").requests.push(Recorded {
                        method: method.to_string(),
                        path_and_query,
                        content_type: content_type.clone(),
                        body: serde_json::from_slice(&body).ok(),
                        authorization,
                    });
                    let (code, value) = answer(&cluster, &method, &path, content_type.as_deref(), &body);
                    let response = http::Response::builder()
                        .status(code)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(value.to_string())))
                        .expect("response");
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                fulcrum_testkit::certs::serve_http1(stream, tls, service).await;
            });
        }
    });
    (address, state)
}

async fn connect(address: SocketAddr, deployment: &str) -> KubernetesActuator {
    let settings = KubernetesSettings {
        api_server: Some(format!("http://{address}")),
        namespace: "ai".into(),
        timeout: Duration::from_secs(5),
        ..KubernetesSettings::new(deployment)
    };
    KubernetesActuator::connect(settings).await.expect("connect")
}

fn kube_error(e: ActuatorError) -> KubernetesError {
    match e {
        ActuatorError::Kubernetes(e) => e,
        other => panic!("expected a Kubernetes error, got {other:?}"),
    }
}

#[tokio::test]
async fn patches_the_scale_subresource() {
    let (address, cluster) = fake_api_server(2, 2).await;
    let mut actuator = connect(address, "llm").await;

    let observed = actuator.observe().await.expect("observe");
    assert_eq!((observed.desired, observed.current), (Some(2), Some(2)));

    actuator.scale_to(5).await.expect("scale to 5");
    let observed = actuator.observe().await.expect("observe");
    assert_eq!((observed.desired, observed.current), (Some(5), Some(2)), "status lags behind spec");

    let requests = cluster.lock().expect("lock").requests.clone();
    let methods: Vec<_> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["GET", "PATCH", "GET"]);
    let patch = &requests[1];
    assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(patch.body, Some(json!({ "spec": { "replicas": 5 } })));
    assert!(patch.path_and_query.starts_with("/apis/apps/v1/namespaces/ai/deployments/llm/scale?"), "{patch:?}");
    assert!(patch.path_and_query.contains("fieldManager=fulcrum"), "{patch:?}");
    assert_eq!(requests[0].path_and_query, "/apis/apps/v1/namespaces/ai/deployments/llm/scale");

    actuator.scale_to(0).await.expect("scale to 0");
    assert_eq!(cluster.lock().expect("lock").desired, 0);
    assert!(actuator.replicas().is_empty());
    assert_eq!(actuator.kind(), "kubernetes");
}

#[tokio::test]
async fn a_missing_deployment_is_not_retryable() {
    let (address, _cluster) = fake_api_server(1, 1).await;
    let mut actuator = connect(address, "gone").await;
    let err = kube_error(actuator.scale_to(3).await.unwrap_err());
    assert_eq!(err.status_code(), Some(404));
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.starts_with("patch deployments/gone/scale in namespace ai: "), "{text}");
    assert!(text.contains("not found"), "{text}");
}

#[tokio::test]
async fn a_server_error_is_retryable() {
    let (address, _cluster) = fake_api_server(1, 1).await;
    let mut actuator = connect(address, "broken").await;
    let err = kube_error(actuator.observe().await.unwrap_err());
    assert_eq!(err.status_code(), Some(500));
    assert!(err.is_retryable());
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    // A listener that is closed at once: connections are refused.
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let mut actuator = connect(address, "llm").await;
    let err = kube_error(actuator.scale_to(1).await.unwrap_err());
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let settings = KubernetesSettings {
        api_server: Some(format!("http://{address}")),
        timeout: Duration::from_millis(300),
        ..KubernetesSettings::new("llm")
    };
    let mut actuator = KubernetesActuator::connect(settings).await.expect("connect");
    let started = Instant::now();
    let err = kube_error(actuator.scale_to(1).await.unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(err.is_retryable(), "{err:?}");
    holder.abort();
}

/// As from inside a pod: the API server over https, verified against the service account's
/// CA, with its token; a server the CA did not sign is refused before any request.
#[tokio::test]
async fn scales_through_an_https_api_server_with_a_token_and_ca() {
    use fulcrum_testkit::certs::{Ca, Dir, Usage};
    let ca = Ca::new("cluster CA");
    let leaf = ca.leaf(Usage::Server, "kubernetes", &["127.0.0.1"], &[]);
    let server = fulcrum_testkit::certs::server_config(&leaf);
    let (address, cluster) = fake_api_server_with(2, 2, Some(Arc::new(server).into())).await;
    let dir = Dir::new("scale-tls");
    let ca_file = dir.write("ca.crt", &ca.pem());
    // As the kubelet writes it: no trailing newline (one is trimmed too; see the actuator).
    let token_file = dir.write("token", "scaler-token");
    let settings = |ca: std::path::PathBuf| KubernetesSettings {
        api_server: Some(format!("https://{address}")),
        namespace: "ai".into(),
        ca_file: Some(ca),
        token_file: Some(token_file.clone()),
        timeout: Duration::from_secs(5),
        ..KubernetesSettings::new("llm")
    };
    let mut actuator = KubernetesActuator::connect(settings(ca_file.clone())).await.expect("connect");
    actuator.scale_to(4).await.expect("scale over https");
    assert_eq!(actuator.get_scale().await.expect("get").0, 4);
    {
        let c = cluster.lock().expect("lock");
        assert!(
            c.requests.iter().all(|r| r.authorization.as_deref() == Some("Bearer scaler-token")),
            "{:?}",
            c.requests
        );
    }
    // A token file someone wrote by hand, with a final newline: sent trimmed.
    let typed = dir.write("typed-token", "scaler-token\n");
    let by_hand = KubernetesSettings { token_file: Some(typed), ..settings(ca_file.clone()) };
    KubernetesActuator::connect(by_hand).await.expect("connect").get_scale().await.expect("get");
    let last = cluster.lock().expect("lock").requests.last().cloned().expect("a request");
    assert_eq!(last.authorization.as_deref(), Some("Bearer scaler-token"));
    let seen = cluster.lock().expect("lock").requests.len();
    let other = dir.write("other.crt", &Ca::new("other").pem());
    let mut stranger = KubernetesActuator::connect(settings(other)).await.expect("connect");
    assert!(stranger.scale_to(1).await.is_err(), "a server the CA did not sign is refused");
    assert_eq!(cluster.lock().expect("lock").requests.len(), seen, "and gets no request");
}
