//! The `kubernetes` provider: the ready endpoints of a Service's EndpointSlices.
//!
//! It lists the EndpointSlices (`discovery.k8s.io/v1`) of `namespace` selected by
//! `kubernetes.io/service-name=<service>` (or by any label `selector`), then watches them
//! from the list's resource version, and after each change hands the pool one endpoint per
//! ready address: `conditions.ready` true or unset (Kubernetes' rule: unknown counts as
//! ready); terminating and unready pods are left out. The port is the slice port named
//! `port` (`"http"`), the number `port`, or, without `port`, the slice's only port. An
//! endpoint's id is `address:port`; its zone, node and pod become labels (`zone`, `node`,
//! `pod`). Slices of FQDN addresses, and slices without the port asked for, are left out and
//! listed under `rejected` in the status board.
//!
//! A failed list or a broken watch leaves the pool with its last set, shows in the status
//! board, and is retried with backoff (100 ms doubling to 5 s) by listing again. A watch that
//! the server ends (its `timeoutSeconds`, about 5 minutes) is resumed from the last
//! resource version; one that is too old (`410 Gone`) starts over with a list.
//!
//! **Where.** `api_server = "https://..."` is verified against `ca_file` (else the system's
//! roots); `http://` serves `kubectl proxy`. Without `api_server`, in a pod: the cluster's
//! own API server (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`), with the pod's
//! service-account token and CA (under `/var/run/secrets/kubernetes.io/serviceaccount/`) unless
//! `token_file` and `ca_file` name others. A token file is sent as a bearer token; it is read
//! again whenever the provider lists anew (after any failure, such as a `401` once a rotated
//! token has expired). The proxy's service account needs `list` and `watch` on
//! `endpointslices.discovery.k8s.io`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fulcrum_config::discovery::{KubernetesDiscovery, PortRef};
use fulcrum_core::EndpointSpec;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client, Config};

use crate::publish::{Publisher, Reconnect};

/// How long the server holds a watch open before ending it.
const WATCH_SECONDS: u32 = 290;

/// Why the client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// `api_server` is not a URL.
    #[error("api_server {url:?} is not a valid URL: {message}")]
    BadUrl {
        /// As written.
        url: String,
        /// Why.
        message: String,
    },
    /// kube could not build a client.
    #[error("cannot set up the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// No `api_server`, and not in a pod.
    #[error("{0}")]
    NotInCluster(String),
    /// The CA file does not load.
    #[error("ca_file: {0}")]
    Ca(#[from] fulcrum_tls::TlsError),
    /// The token file cannot be read, or is empty.
    #[error("token_file {path}: {message}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// Where the API server is, and the files of its CA and token.
struct Target {
    url: String,
    ca: Option<std::path::PathBuf>,
    token: Option<std::path::PathBuf>,
}

/// The configured API server, or in a pod the cluster's own with the service account's files.
fn target(config: &KubernetesDiscovery) -> Result<Target, KubernetesError> {
    match &config.api_server {
        Some(url) => Ok(Target { url: url.clone(), ca: config.ca_file.clone(), token: config.token_file.clone() }),
        None => {
            let env = |name| std::env::var(name).ok();
            let pod = fulcrum_tls::in_cluster(env("KUBERNETES_SERVICE_HOST"), env("KUBERNETES_SERVICE_PORT"))
                .map_err(KubernetesError::NotInCluster)?;
            Ok(Target {
                url: pod.url,
                ca: Some(config.ca_file.clone().unwrap_or(pod.ca)),
                token: Some(config.token_file.clone().unwrap_or(pod.token)),
            })
        }
    }
}

/// The bearer token in the token file, without the surrounding whitespace (a trailing
/// newline would make it an invalid header).
async fn read_token(path: Option<&std::path::Path>) -> Result<Option<String>, KubernetesError> {
    let Some(path) = path else { return Ok(None) };
    let fail = |message: String| KubernetesError::Token { path: path.display().to_string(), message };
    let text = tokio::fs::read_to_string(path).await.map_err(|e| fail(e.to_string()))?;
    match text.trim() {
        "" => Err(fail("is empty".into())),
        token => Ok(Some(token.to_owned())),
    }
}

fn client(
    config: &KubernetesDiscovery,
    target: &Target,
    token: Option<String>,
) -> Result<Api<EndpointSlice>, KubernetesError> {
    let bad = |message: String| KubernetesError::BadUrl { url: target.url.clone(), message };
    let uri: http::Uri = target.url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    if uri.authority().is_none() {
        return Err(bad("must be https://host:port or http://host:port".into()));
    }
    let mut kube_config = Config::new(uri);
    if let Some(ca) = &target.ca {
        kube_config.root_cert = Some(fulcrum_tls::der_certificates(ca)?);
    }
    kube_config.default_namespace.clone_from(&config.namespace);
    kube_config.connect_timeout = Some(config.timeout);
    // Watches stay open for WATCH_SECONDS: reads may be quiet that long.
    kube_config.read_timeout = Some(Duration::from_secs(u64::from(WATCH_SECONDS) + 30));
    kube_config.write_timeout = Some(config.timeout);
    kube_config.auth_info.token = token.map(Into::into);
    let client = Client::try_from(kube_config).map_err(KubernetesError::Client)?;
    Ok(Api::namespaced(client, &config.namespace))
}

/// Runs until aborted.
pub(crate) async fn run(config: KubernetesDiscovery, mut out: Publisher) {
    let selector = config.selector.label_selector();
    let what = format!("endpointslices in namespace {} with labels {selector}", config.namespace);
    let mut backoff = Reconnect::new(Duration::from_secs(5));
    'list: loop {
        // Built again for every list, so a rotated token is picked up after a 401.
        let api = match target(&config) {
            Ok(t) => read_token(t.token.as_deref()).await.and_then(|token| client(&config, &t, token)),
            Err(e) => Err(e),
        };
        let api = match api {
            Ok(api) => api,
            Err(e) => {
                out.fail(&e);
                backoff.wait().await;
                continue;
            }
        };
        let listed = tokio::time::timeout(config.timeout, api.list(&ListParams::default().labels(&selector))).await;
        let list = match listed {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                out.fail(&format!("listing {what}: {}", crate::causes(&e)));
                backoff.wait().await;
                continue;
            }
            Err(_) => {
                out.fail(&format!("listing {what}: no answer within {:?}", config.timeout));
                backoff.wait().await;
                continue;
            }
        };
        let mut version = list.metadata.resource_version.unwrap_or_default();
        let mut slices: BTreeMap<String, EndpointSlice> =
            list.items.into_iter().map(|s| (s.metadata.name.clone().unwrap_or_default(), s)).collect();
        publish(&mut out, &slices, config.port.as_ref());
        loop {
            let params = WatchParams::default().labels(&selector).timeout(WATCH_SECONDS);
            let stream = match tokio::time::timeout(config.timeout, api.watch(&params, &version)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    out.fail(&format!("watching {what}: {}", crate::causes(&e)));
                    backoff.wait().await;
                    continue 'list;
                }
                Err(_) => {
                    out.fail(&format!("watching {what}: no answer within {:?}", config.timeout));
                    backoff.wait().await;
                    continue 'list;
                }
            };
            backoff.reset();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let changed = match event {
                    Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)) => {
                        version = s.metadata.resource_version.clone().unwrap_or(version);
                        slices.insert(s.metadata.name.clone().unwrap_or_default(), s);
                        true
                    }
                    Ok(WatchEvent::Deleted(s)) => {
                        version = s.metadata.resource_version.clone().unwrap_or(version);
                        slices.remove(s.metadata.name.as_deref().unwrap_or_default());
                        true
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        version = b.metadata.resource_version;
                        false
                    }
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        // Too old: list again, no failure to report.
                        continue 'list;
                    }
                    Ok(WatchEvent::Error(status)) => {
                        out.fail(&format!("watching {what}: {} ({})", status.message, status.code));
                        backoff.wait().await;
                        continue 'list;
                    }
                    Err(e) => {
                        out.fail(&format!("watching {what}: {}", crate::causes(&e)));
                        backoff.wait().await;
                        continue 'list;
                    }
                };
                if changed {
                    publish(&mut out, &slices, config.port.as_ref());
                }
            }
            // The server ended the watch (its timeout): resume from `version`.
        }
    }
}

fn publish(out: &mut Publisher, slices: &BTreeMap<String, EndpointSlice>, port: Option<&PortRef>) {
    let (set, rejected) = endpoints_of(slices.values(), port);
    out.publish(set, rejected);
}

/// The ready endpoints of `slices`, and why any slice was left out.
pub(crate) fn endpoints_of<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: Option<&PortRef>,
) -> (Vec<EndpointSpec>, Vec<String>) {
    let mut set = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    for slice in slices {
        let name = slice.metadata.name.as_deref().unwrap_or("(unnamed)");
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            rejected.push(format!("endpointslice {name}: addressType {} is not supported", slice.address_type));
            continue;
        }
        let ports = slice.ports.as_deref().unwrap_or_default();
        let number = match port {
            Some(PortRef::Number(n)) => Some(*n),
            Some(PortRef::Name(wanted)) => {
                ports.iter().find(|p| p.name.as_deref() == Some(wanted.as_str())).and_then(|p| p.port).and_then(to_port)
            }
            None if ports.len() == 1 => ports[0].port.and_then(to_port),
            None => None,
        };
        let Some(number) = number else {
            let names: Vec<String> =
                ports.iter().map(|p| format!("{}={}", p.name.as_deref().unwrap_or(""), p.port.unwrap_or(0))).collect();
            let why = match port {
                Some(PortRef::Name(n)) => format!("no port named {n:?}"),
                _ => "several ports: name one with `port`".to_owned(),
            };
            if !slice.endpoints.is_empty() {
                rejected.push(format!("endpointslice {name}: {why} (ports: {})", names.join(", ")));
            }
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    rejected.push(format!("endpointslice {name}: {address:?} is not an IP address"));
                    continue;
                };
                let socket = SocketAddr::new(ip, number);
                if !seen.insert(socket) {
                    continue;
                }
                let mut spec = EndpointSpec::new(socket);
                spec.labels.zone.clone_from(&endpoint.zone);
                if let Some(node) = &endpoint.node_name {
                    spec.labels.other.insert("node".into(), node.clone());
                }
                if let Some(pod) = endpoint.target_ref.as_ref().and_then(|r| r.name.clone()) {
                    spec.labels.other.insert("pod".into(), pod);
                }
                set.push(spec);
            }
        }
    }
    (set, rejected)
}

fn to_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn ready_addresses_at_the_named_port() {
        let a = slice(serde_json::json!({
            "metadata": {"name": "vllm-a"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000}, {"name": "metrics", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z1", "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "vllm-0"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["nonsense"]},
            ],
        }));
        let fqdn = slice(serde_json::json!({"metadata": {"name": "f"}, "addressType": "FQDN", "endpoints": []}));
        let (set, rejected) = endpoints_of([&a, &fqdn], Some(&PortRef::Name("http".into())));
        let addrs: Vec<String> = set.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8000", "10.0.0.3:8000"]);
        assert_eq!(set[0].labels.zone.as_deref(), Some("z1"));
        assert_eq!(set[0].labels.other["pod"], "vllm-0");
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        let (set, rejected) = endpoints_of([&a], None);
        assert!(set.is_empty());
        assert!(rejected[0].contains("several ports"), "{rejected:?}");
        let (set, _) = endpoints_of([&a], Some(&PortRef::Number(7000)));
        assert_eq!(set[0].address.port(), 7000);
        let (_, rejected) = endpoints_of([&a], Some(&PortRef::Name("grpc".into())));
        assert!(rejected[0].contains("no port named \"grpc\""), "{rejected:?}");
    }
}
