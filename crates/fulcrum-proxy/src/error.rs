//! Errors the proxy answers itself, mapped to HTTP in one place.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched and the listener has no default pool.
    #[error("no route matches this request")]
    NoRoute,
    /// No endpoint of the pool serves the requested model.
    #[error("no endpoint serves model `{0}`")]
    UnknownModel(String),
    /// The pool has no endpoint that can take the request.
    #[error("no healthy endpoint in pool `{0}`")]
    NoEndpoint(String),
    /// Connecting to the chosen endpoint failed.
    #[error("cannot connect to upstream {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint did not answer in time.
    #[error("upstream {endpoint} did not answer within {after_ms} ms")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The limit that ran out.
        after_ms: u128,
    },
    /// The upstream connection failed before a response.
    #[error("upstream {endpoint} failed: {source}")]
    Upstream {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: crate::h1::UpstreamError,
    },
    /// The request body is over the listener's limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client sent its body too slowly.
    #[error("the request body did not arrive within {after_ms} ms")]
    BodyTimeout {
        /// The limit.
        after_ms: u128,
    },
    /// Reading the request body failed.
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// Admission control turned the request away (queue full or wait too long).
    #[error("the pool is overloaded; retry after {retry_after:?}")]
    Overloaded {
        /// When to come back.
        retry_after: std::time::Duration,
    },
    /// The client is over its rate limit.
    #[error("rate limit exceeded; retry after {retry_after:?}")]
    RateLimited {
        /// When to come back.
        retry_after: std::time::Duration,
    },
    /// A request header is not understood.
    #[error("{0}")]
    BadHeader(String),
    /// No endpoint can meet the request's time-to-first-token budget, and its class says to
    /// refuse it (429 for `sheddable`, 503 for `standard` after waiting).
    #[error("no endpoint can give a first token within the request's budget; retry after {retry_after:?}")]
    BudgetUnmet {
        /// 429 or 503.
        status: u16,
        /// When to come back.
        retry_after: std::time::Duration,
    },
}

impl ProxyError {
    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute | ProxyError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoint(_) | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadBody(_) | ProxyError::BadHeader(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BudgetUnmet { status: 429, .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BudgetUnmet { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::UnknownModel(_) => "model_not_found",
            ProxyError::NoEndpoint(_) => "no_healthy_endpoint",
            ProxyError::Connect { .. } => "upstream_connect_failed",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::Upstream { .. } => "upstream_failed",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadBody(_) => "bad_request_body",
            ProxyError::BodyTimeout { .. } => "request_body_timeout",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::BadHeader(_) => "bad_request_header",
            ProxyError::BudgetUnmet { .. } => "ttft_budget_unmet",
        }
    }

    /// How the failure of one try counts for retries, breakers and outlier detection.
    pub fn observed(&self) -> Option<fulcrum_core::resilience::Observed> {
        use fulcrum_core::resilience::Observed;
        match self {
            ProxyError::Connect { .. } => Some(Observed::ConnectFailure),
            ProxyError::Timeout { .. } => Some(Observed::Timeout),
            ProxyError::Upstream { .. } => Some(Observed::Reset),
            _ => None,
        }
    }

    /// Whether the fault is upstream's (the endpoint's), rather than the client's or routing's.
    pub fn is_upstream(&self) -> bool {
        matches!(self, ProxyError::Connect { .. } | ProxyError::Timeout { .. } | ProxyError::Upstream { .. })
    }

    /// The JSON answer: `{"error": {"message", "type", "code", "request_id"}}`, OpenAI's shape.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.status().as_u16(),
                "request_id": request_id.to_str().unwrap_or(""),
            }
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("x-request-id", request_id.clone());
        if let ProxyError::Overloaded { retry_after }
        | ProxyError::RateLimited { retry_after }
        | ProxyError::BudgetUnmet { retry_after, .. } = self
        {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
