//! A small HTTP/1.1 client for JSON APIs (etcd's gateway, the admin API), bounded in time and
//! size. Plain `http://` only, as elsewhere in Fulcrum.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The largest answer read whole (16 MiB).
pub(crate) const MAX_BODY: usize = 16 << 20;

/// Why an HTTP exchange failed before an answer could be read.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting or sending failed.
    #[error("cannot reach {uri}: {}", crate::causes(source.as_ref()))]
    Connect {
        /// The URL.
        uri: String,
        /// Why.
        #[source]
        source: Box<hyper_util::client::legacy::Error>,
    },
    /// No answer in time.
    #[error("no answer from {uri} within {timeout:?}")]
    Timeout {
        /// The URL.
        uri: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer broke off or was too large.
    #[error("reading the answer from {uri}: {message}")]
    Body {
        /// The URL.
        uri: String,
        /// Why.
        message: String,
    },
}

/// A bearer token for a proxy's admin API: printed redacted, sent only in the
/// `Authorization` header (marked sensitive).
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(http::HeaderValue);

impl BearerToken {
    /// Checks `token` (surrounding whitespace, such as a file's final newline, removed): it
    /// must be non-empty visible ASCII, as an `Authorization` header carries it.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a bearer token must be non-empty and printable ASCII without spaces".to_owned());
        }
        let mut value = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A pooled client whose every exchange is bounded by `timeout`.
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// `Authorization: Bearer ...` sent with every request, when set.
    authorization: Option<http::HeaderValue>,
}

impl HttpClient {
    /// A client of `http` and `https` URLs; https servers are verified against the system's
    /// roots (none: every https call fails verification, saying so).
    pub(crate) fn new(timeout: Duration) -> Self {
        let plain = fulcrum_config::UpstreamTls { server_name: None, ca: None, client_cert: None };
        let tls = fulcrum_tls::client_config(&plain, &[]).unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(fulcrum_tls::provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        Self::with_tls(timeout, tls)
    }

    /// A client whose https calls use `tls` (its CA, its client certificate).
    pub(crate) fn with_tls(timeout: Duration, tls: rustls::ClientConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        // Notices a peer that vanished while a watch stream was idle.
        connector.set_keepalive(Some(Duration::from_secs(30)));
        // hyper-rustls needs plain URLs let through (`https_or_http`) and the connector not to
        // refuse them on its own (`enforce_http`).
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new()).build(https);
        HttpClient { client, timeout, authorization: None }
    }

    /// Sends `token` as a bearer token with every request.
    pub(crate) fn with_bearer(mut self, token: &BearerToken) -> Self {
        self.authorization = Some(token.0.clone());
        self
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a request and returns the answer's head with its body still streaming.
    pub(crate) async fn send(
        &self,
        method: Method,
        uri: Uri,
        json: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, TransportError> {
        let mut builder = Request::builder().method(method).uri(uri.clone());
        if let Some(auth) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        let body = match json {
            Some(b) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let request =
            builder.body(body).map_err(|e| TransportError::Body { uri: uri.to_string(), message: e.to_string() })?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) => Err(TransportError::Connect { uri: uri.to_string(), source: Box::new(source) }),
            Err(_) => Err(TransportError::Timeout { uri: uri.to_string(), timeout: self.timeout }),
        }
    }

    /// One whole exchange: the status and the body (at most [`MAX_BODY`]), all within `timeout`.
    pub(crate) async fn call(
        &self,
        method: Method,
        uri: Uri,
        json: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), TransportError> {
        let exchange = async {
            let response = self.send(method, uri.clone(), json).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| TransportError::Body { uri: uri.to_string(), message: e.to_string() })?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(TransportError::Timeout { uri: uri.to_string(), timeout: self.timeout }))
    }
}
