//! The Kubernetes actuator: sets a Deployment's replica count through its `scale` subresource.
//!
//! `scale_to(n)` sends `PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale` with the
//! JSON merge patch `{"spec":{"replicas":n}}` (content type `application/merge-patch+json`),
//! as `kubectl scale` does; Kubernetes then creates or removes pods (it picks which pods go:
//! drain the ones it will remove through readiness, or let the proxy's health checks and
//! discovery notice). `observe` reads the same subresource: `spec.replicas` and
//! `status.replicas`. Patching only the scale needs only the `deployments/scale` permission
//! (`get`, `patch`), not write access to the whole Deployment.
//!
//! **Where.** `api_server = "https://..."` is verified against `ca_file` (else the system's
//! roots), with the bearer token of `token_file` (kube reads it again as it rotates);
//! `http://` serves `kubectl proxy`. Without `api_server` the configuration is inferred:
//! `KUBECONFIG` or `~/.kube/config`, else in a pod the cluster's own API server
//! (`KUBERNETES_SERVICE_HOST`) with the pod's service-account token and CA, so the
//! autoscaler works from inside a pod with no sidecar.
//!
//! Each call is bounded by `timeout` (10 s), connecting included, and not retried here: the
//! autoscaler tries again at its next tick ([`KubernetesError::is_retryable`] says whether to).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use fulcrum_scale::{Actuator, KubernetesActuator, KubernetesSettings};
//!
//! let mut settings = KubernetesSettings::new("llama-8b");
//! settings.api_server = Some("http://127.0.0.1:8001".into()); // kubectl proxy
//! settings.namespace = "inference".into();
//! let mut actuator = KubernetesActuator::connect(settings).await?;
//! actuator.scale_to(4).await?;
//! println!("{:?}", actuator.observe().await?);
//! # Ok(()) }
//! ```

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Config};

use crate::actuator::{Actuator, ActuatorError, Observed};
use crate::replica::Replica;

/// Kubernetes actuator settings as written, with their defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// The Deployment to scale. Required.
    pub deployment: String,
    /// Its namespace (`default`).
    pub namespace: String,
    /// The API server (`https://`, or `http://` for `kubectl proxy`); `None` infers it from
    /// `KUBECONFIG`, `~/.kube/config` or the in-cluster environment.
    pub api_server: Option<String>,
    /// A CA bundle (PEM) to verify an `https` API server against, instead of the system's
    /// roots (or the inferred configuration's CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// A file holding a bearer token (or the inferred configuration's credentials).
    pub token_file: Option<std::path::PathBuf>,
    /// How long one API call may take, connection included (10 s).
    pub timeout: Duration,
}

impl KubernetesSettings {
    /// `deployment` in the `default` namespace, with the default settings.
    pub fn new(deployment: impl Into<String>) -> Self {
        KubernetesSettings {
            deployment: deployment.into(),
            namespace: "default".into(),
            api_server: None,
            ca_file: None,
            token_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a Kubernetes action failed.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// A setting is out of range.
    #[error("kubernetes.{field} {problem}")]
    Invalid {
        /// The setting, as configuration spells it.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// `api_server` is not a URL.
    #[error("kubernetes.api_server {url:?} is not a valid URL: {source}")]
    BadUrl {
        /// As written.
        url: String,
        /// Why.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The CA file does not load.
    #[error("kubernetes.ca_file: {0}")]
    Ca(#[from] fulcrum_tls::TlsError),
    /// No configuration could be inferred.
    #[error("no Kubernetes configuration found (set kubernetes.api_server): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot set up the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("{action} deployments/{name}/scale in namespace {namespace}: {source}")]
    Api {
        /// `get` or `patch`.
        action: &'static str,
        /// The namespace.
        namespace: String,
        /// The Deployment.
        name: String,
        /// What kube said.
        #[source]
        source: kube::Error,
    },
    /// An API call did not finish in time.
    #[error("{action} deployments/{name}/scale in namespace {namespace}: no answer within {timeout:?}")]
    TimedOut {
        /// `get` or `patch`.
        action: &'static str,
        /// The namespace.
        namespace: String,
        /// The Deployment.
        name: String,
        /// The timeout.
        timeout: Duration,
    },
}

impl KubernetesError {
    /// Timeouts, connection failures, conflicts, throttling and server errors may pass;
    /// a missing Deployment, a refused permission or a bad setting will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            KubernetesError::TimedOut { .. } => true,
            KubernetesError::Api { source, .. } => match source {
                kube::Error::Api(status) => matches!(status.code, 409 | 429 | 500..=599),
                kube::Error::HyperError(_) | kube::Error::Service(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// The HTTP status the API server answered with, if it answered with an error.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            KubernetesError::Api { source: kube::Error::Api(status), .. } => Some(status.code),
            _ => None,
        }
    }
}

/// Scales a Deployment; see the [module](self) docs.
#[derive(Clone)]
pub struct KubernetesActuator {
    api: Api<Deployment>,
    name: String,
    namespace: String,
    timeout: Duration,
}

impl std::fmt::Debug for KubernetesActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesActuator")
            .field("namespace", &self.namespace)
            .field("deployment", &self.name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === impl KubernetesActuator ===

impl KubernetesActuator {
    /// Builds the client (no request is sent yet).
    pub async fn connect(s: KubernetesSettings) -> Result<Self, KubernetesError> {
        let invalid = |field, problem: &str| KubernetesError::Invalid { field, problem: problem.to_owned() };
        if s.deployment.is_empty() {
            return Err(invalid("deployment", "must not be empty"));
        }
        if s.namespace.is_empty() {
            return Err(invalid("namespace", "must not be empty"));
        }
        if s.timeout.is_zero() {
            return Err(invalid("timeout", "must be longer than zero"));
        }
        let mut config = match &s.api_server {
            Some(url) => {
                let uri =
                    url.parse::<http::Uri>().map_err(|source| KubernetesError::BadUrl { url: url.clone(), source })?;
                if uri.scheme().is_none() || uri.authority().is_none() {
                    return Err(invalid("api_server", "must be a URL such as http://127.0.0.1:8001"));
                }
                Config::new(uri)
            }
            None => Config::infer().await.map_err(KubernetesError::Infer)?,
        };
        if let Some(ca) = &s.ca_file {
            config.root_cert = Some(fulcrum_tls::der_certificates(ca)?);
        }
        if let Some(path) = &s.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("token_file", &format!("{}: {e}", path.display())))?;
            if text.trim().is_empty() {
                return Err(invalid("token_file", &format!("{}: is empty", path.display())));
            }
            if text.trim() == text {
                // kube reads it again as the kubelet rotates it.
                config.auth_info.token_file = Some(path.display().to_string());
            } else {
                // kube would send the newline too (an invalid header): the trimmed token,
                // read once. The kubelet's own token files have no surrounding whitespace.
                tracing::warn!(file = %path.display(), "kubernetes.token_file ends in whitespace: read once, not followed as it rotates");
                config.auth_info.token = Some(text.trim().to_owned().into());
            }
        }
        config.default_namespace.clone_from(&s.namespace);
        config.connect_timeout = Some(s.timeout);
        config.read_timeout = Some(s.timeout);
        config.write_timeout = Some(s.timeout);
        let client = Client::try_from(config).map_err(KubernetesError::Client)?;
        Ok(KubernetesActuator {
            api: Api::namespaced(client, &s.namespace),
            name: s.deployment,
            namespace: s.namespace,
            timeout: s.timeout,
        })
    }

    /// Reads the scale: `(spec.replicas, status.replicas)`.
    pub async fn get_scale(&self) -> Result<(u32, u32), KubernetesError> {
        let scale = self.bounded("get", self.api.get_scale(&self.name)).await?;
        let spec = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
        let status = scale.status.map_or(0, |s| s.replicas);
        Ok((count(spec), count(status)))
    }

    /// Sets `spec.replicas`.
    pub async fn patch_scale(&self, replicas: u32) -> Result<(), KubernetesError> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let params = PatchParams { field_manager: Some("fulcrum".into()), ..PatchParams::default() };
        self.bounded("patch", self.api.patch_scale(&self.name, &params, &Patch::Merge(&patch))).await?;
        Ok(())
    }

    async fn bounded<T>(
        &self,
        action: &'static str,
        call: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, KubernetesError> {
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(KubernetesError::Api { action, namespace, name, source }),
            Err(_) => Err(KubernetesError::TimedOut { action, namespace, name, timeout: self.timeout }),
        }
    }
}

/// A replica count from the API (an `i32`), clamped at 0.
fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

impl Actuator for KubernetesActuator {
    async fn scale_to(&mut self, replicas: u32) -> Result<(), ActuatorError> {
        Ok(self.patch_scale(replicas).await?)
    }

    async fn observe(&mut self) -> Result<Observed, ActuatorError> {
        let (desired, current) = self.get_scale().await?;
        Ok(Observed { desired: Some(desired), current: Some(current) })
    }

    fn replicas(&self) -> Vec<Replica> {
        Vec::new()
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settings_are_checked() {
        let err = |s: KubernetesSettings| async move { KubernetesActuator::connect(s).await.unwrap_err().to_string() };
        let with_url =
            |url: &str| KubernetesSettings { api_server: Some(url.into()), ..KubernetesSettings::new("llm") };
        assert_eq!(err(KubernetesSettings::new("")).await, "kubernetes.deployment must not be empty");
        assert_eq!(
            err(KubernetesSettings { timeout: Duration::ZERO, ..with_url("http://127.0.0.1:1") }).await,
            "kubernetes.timeout must be longer than zero"
        );
        assert!(
            err(with_url("http://bad url"))
                .await
                .starts_with("kubernetes.api_server \"http://bad url\" is not a valid URL")
        );
        assert_eq!(
            err(with_url("127.0.0.1:8001")).await,
            "kubernetes.api_server must be a URL such as http://127.0.0.1:8001"
        );
        // https is built in; its files are checked when connecting.
        assert!(KubernetesActuator::connect(with_url("https://10.0.0.1:6443")).await.is_ok());
        let missing = |f: &str| KubernetesSettings { ca_file: Some(f.into()), ..with_url("https://10.0.0.1:6443") };
        assert!(
            err(missing("/nonexistent/ca.crt")).await.starts_with("kubernetes.ca_file: CA bundle /nonexistent/ca.crt")
        );
        let no_token = KubernetesSettings { token_file: Some("/nonexistent/token".into()), ..with_url("https://k:1") };
        assert!(err(no_token).await.starts_with("kubernetes.token_file /nonexistent/token"));
        assert!(KubernetesActuator::connect(with_url("http://127.0.0.1:8001")).await.is_ok());
    }

    #[test]
    fn counts_clamp() {
        assert_eq!(count(-1), 0);
        assert_eq!(count(7), 7);
    }
}
