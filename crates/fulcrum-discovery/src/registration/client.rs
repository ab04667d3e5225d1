//! The backend's side of HTTP self-registration: register, then heartbeat until dropped.

use std::time::Duration;

use fulcrum_config::discovery::EndpointEntry;
use fulcrum_core::EndpointSpec;
use http::{Method, StatusCode, Uri};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::{BearerToken, HttpClient, TransportError};
use crate::register::Heartbeat;

/// Why registering with a proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationClientError {
    /// The admin URL is not `http://host:port`.
    #[error("admin URL {url:?}: {problem}")]
    BadUrl {
        /// As given.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// The proxy could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The proxy refused.
    #[error("the proxy refused the registration (HTTP {status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The proxy's error message.
        message: String,
    },
}

/// A live registration with a proxy; see [`register_http`]. Dropping it stops the
/// heartbeats (the proxy drops the endpoint when its TTL runs out).
#[derive(Debug)]
pub struct HttpRegistration {
    http: HttpClient,
    url: Uri,
    heartbeat: watch::Receiver<Heartbeat>,
    task: JoinHandle<()>,
}

/// Keeps an id to the characters that need no escaping in a URL path, escaping the rest.
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Registers `spec` with the proxy whose admin API is at `admin` (`http://host:port`) in
/// `pool`, for `ttl`, and sends a heartbeat every TTL/3 in a task until the returned handle is
/// dropped. If the proxy forgot the registration (it restarted, or heartbeats were lost for
/// longer than the TTL), the task registers again. `token` is the admin API's bearer token,
/// when it has one.
pub async fn register_http(
    admin: &str,
    pool: &str,
    spec: &EndpointSpec,
    ttl: Duration,
    token: Option<&BearerToken>,
) -> Result<HttpRegistration, RegistrationClientError> {
    let bad = |problem: &str| RegistrationClientError::BadUrl { url: admin.to_owned(), problem: problem.to_owned() };
    let base = admin.trim_end_matches('/');
    let base = if base.contains("://") { base.to_owned() } else { format!("http://{base}") };
    if !base.starts_with("http://") {
        return Err(bad("must be http://host:port"));
    }
    let collection: Uri =
        format!("{base}/pools/{}/registrations", escape(pool)).parse().map_err(|_| bad("not a URL"))?;
    let url: Uri = format!("{collection}/{}", escape(spec.id.as_str())).parse().map_err(|_| bad("not a URL"))?;
    let mut body = serde_json::to_value(EndpointEntry::from_spec(spec)).unwrap_or_default();
    body["id"] = serde_json::json!(spec.id.as_str());
    body["ttl_ms"] = serde_json::json!(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    let body = body.to_string().into_bytes();
    let mut http = HttpClient::new(Duration::from_secs(5).min(ttl.max(Duration::from_millis(500))));
    if let Some(token) = token {
        http = http.with_bearer(token);
    }
    post(&http, &collection, &body).await?;
    let (tx, heartbeat) = watch::channel(Heartbeat::Alive);
    let task = tokio::spawn(beat(http.clone(), collection, url.clone(), body, ttl, tx));
    Ok(HttpRegistration { http, url, heartbeat, task })
}

async fn post(http: &HttpClient, collection: &Uri, body: &[u8]) -> Result<(), RegistrationClientError> {
    let (status, answer) = http.call(Method::POST, collection.clone(), Some(body.to_vec())).await?;
    if status.is_success() { Ok(()) } else { Err(refused(status, &answer)) }
}

fn refused(status: StatusCode, answer: &[u8]) -> RegistrationClientError {
    let value: serde_json::Value = serde_json::from_slice(answer).unwrap_or_default();
    let mut message = value["error"]["message"]
        .as_str()
        .map_or_else(|| String::from_utf8_lossy(&answer[..answer.len().min(512)]).into_owned(), str::to_owned);
    if status == StatusCode::UNAUTHORIZED {
        message.push_str(" (the admin API's token: --admin-token-file FILE or FULCRUM_ADMIN_TOKEN)");
    }
    RegistrationClientError::Refused { status: status.as_u16(), message }
}

async fn beat(http: HttpClient, collection: Uri, url: Uri, body: Vec<u8>, ttl: Duration, tx: watch::Sender<Heartbeat>) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let mut failing = false;
    loop {
        tokio::time::sleep(if failing { every.min(Duration::from_secs(1)) } else { every }).await;
        let outcome = match http.call(Method::PUT, url.clone(), None).await {
            Ok((StatusCode::OK, _)) => Ok(()),
            Ok((StatusCode::NOT_FOUND, _)) => {
                tracing::warn!(%url, "the proxy forgot this registration; registering again");
                post(&http, &collection, &body).await
            }
            Ok((status, answer)) => Err(refused(status, &answer)),
            Err(e) => Err(e.into()),
        };
        failing = outcome.is_err();
        tx.send_replace(match outcome {
            Ok(()) => Heartbeat::Alive,
            Err(e) => {
                tracing::warn!(%url, error = %e, "heartbeat failed");
                Heartbeat::Failing(e.to_string())
            }
        });
    }
}

// === impl HttpRegistration ===

impl HttpRegistration {
    /// How the heartbeats go.
    pub fn heartbeat(&self) -> watch::Receiver<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Stops the heartbeats, as a backend that hangs would: the proxy drops the endpoint
    /// when its TTL runs out.
    pub fn stop_heartbeats(&self) {
        self.task.abort();
    }

    /// Leaves now: stops the heartbeats and deletes the registration.
    pub async fn deregister(self) -> Result<(), RegistrationClientError> {
        self.task.abort();
        let (status, answer) = self.http.call(Method::DELETE, self.url.clone(), None).await?;
        match status {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            s => Err(refused(s, &answer)),
        }
    }
}

impl Drop for HttpRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_escaped_for_paths() {
        assert_eq!(super::escape("gpu-7"), "gpu-7");
        assert_eq!(super::escape("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(super::escape("a b%"), "a%20b%25");
    }
}
