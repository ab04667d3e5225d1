//! [`EtcdClient`]: the key-value, watch and lease calls of etcd's v3 API, over its JSON gateway.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::watch::Watch;
use super::wire::{self, b64, prefix_end};
use crate::http::{HttpClient, TransportError};

/// One key and its value, with etcd's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a delete event).
    pub value: Vec<u8>,
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision of the last change: the token of [`EtcdClient::compare_and_swap`].
    pub mod_revision: i64,
    /// Changes since creation.
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl KeyValue {
    /// The key as text (invalid UTF-8 replaced).
    pub fn key_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.key)
    }

    /// The value as text (invalid UTF-8 replaced).
    pub fn value_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// The keys of a range read and the store's revision when it was read: watch from
/// `revision + 1` to miss nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store's revision.
    pub revision: i64,
}

/// What a compare-and-swap did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key was written; this is the new revision.
    Swapped {
        /// The store's revision after the write.
        revision: i64,
    },
    /// Someone else changed the key first; this is what it holds now (`None`: absent).
    Conflict {
        /// The current key, if any.
        current: Option<KeyValue>,
    },
}

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id.
    pub id: i64,
    /// The TTL etcd granted (it may round up: etcd's minimum is about 2 s).
    pub ttl: Duration,
}

/// What happened to a key, in a watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created or changed.
    Put,
    /// Deleted (or its lease expired).
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: the key and the deleting revision).
    pub kv: KeyValue,
    /// The key before the change, when the watch asked for it.
    pub prev_kv: Option<KeyValue>,
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not `http://host:port`.
    #[error("etcd endpoint {endpoint:?}: {problem}")]
    InvalidEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong.
        problem: String,
    },
    /// No endpoint could be reached, or none answered in time.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A TLS file (CA bundle, client certificate or key) does not load.
    #[error("etcd TLS: {0}")]
    Tls(#[from] fulcrum_tls::TlsError),
    /// etcd answered with an error.
    #[error("etcd refused {call}: {message} (HTTP {status}, gRPC code {code})")]
    Server {
        /// The call (`/v3/kv/put`).
        call: &'static str,
        /// The HTTP status.
        status: u16,
        /// The gRPC status code (5: not found, 9: failed precondition, 14: unavailable).
        code: i32,
        /// etcd's message.
        message: String,
    },
    /// An answer could not be read.
    #[error("cannot read etcd's {what}: {message}")]
    Decode {
        /// What was being read.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// A watch stream ended (etcd stopped, the connection broke).
    #[error("the etcd watch stream ended")]
    WatchClosed,
    /// A watch asked for revisions etcd has compacted away: read the range again.
    #[error("etcd compacted revisions up to {compact_revision}; the watch must start again from a fresh read")]
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
    /// etcd cancelled a watch.
    #[error("etcd cancelled the watch: {reason}")]
    WatchCanceled {
        /// etcd's reason.
        reason: String,
    },
}

impl EtcdError {
    /// Whether trying again later may succeed: transport failures, closed watches and
    /// server-side unavailability, not bad endpoints or refused requests.
    pub fn is_retryable(&self) -> bool {
        match self {
            EtcdError::Transport(_) | EtcdError::WatchClosed | EtcdError::Compacted { .. } => true,
            EtcdError::Server { code, status, .. } => matches!(code, 4 | 8 | 10 | 14) || *status >= 500,
            _ => false,
        }
    }

    /// Whether etcd said the thing asked for does not exist (such as an expired lease).
    pub fn is_not_found(&self) -> bool {
        matches!(self, EtcdError::Server { code: 5, .. })
    }
}

/// A client of etcd's v3 API; cheap to clone, safe to share. See the [module](super) docs.
#[derive(Clone, Debug)]
pub struct EtcdClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<String>,
    /// The endpoint that answered last: calls start there.
    current: AtomicUsize,
    http: HttpClient,
}

// === impl EtcdClient ===

impl EtcdClient {
    /// A client of the cluster at `endpoints` (`http://host:port` or `host:port`), each call
    /// bounded by `timeout`. Nothing is sent yet. A call that cannot reach one endpoint tries
    /// the next. `https://` endpoints are verified against the system's roots.
    pub fn new<S: AsRef<str>>(endpoints: &[S], timeout: Duration) -> Result<Self, EtcdError> {
        Self::with_tls(endpoints, timeout, None)
    }

    /// Like [`new`](Self::new), with `tls` for `https://` endpoints: a CA bundle instead of
    /// the system's roots, and a client certificate (etcd's `--client-cert-auth`).
    pub fn with_tls<S: AsRef<str>>(
        endpoints: &[S],
        timeout: Duration,
        tls: Option<&fulcrum_config::UpstreamTls>,
    ) -> Result<Self, EtcdError> {
        let invalid = |endpoint: &str, problem: &str| EtcdError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            problem: problem.to_owned(),
        };
        if endpoints.is_empty() {
            return Err(invalid("", "no endpoint given"));
        }
        if timeout.is_zero() {
            return Err(invalid("", "the timeout must be longer than zero"));
        }
        let mut bases = Vec::new();
        for e in endpoints {
            let e = e.as_ref();
            let base = match e.split_once("://") {
                None => format!("http://{e}"),
                Some(("http" | "https", _)) => e.to_owned(),
                Some(_) => return Err(invalid(e, "must be http://host:port or https://host:port")),
            };
            let base = base.trim_end_matches('/').to_owned();
            let uri: Uri = base.parse().map_err(|err: http::uri::InvalidUri| invalid(e, &err.to_string()))?;
            if uri.authority().and_then(|a| a.port_u16()).is_none() || uri.path().len() > 1 {
                return Err(invalid(e, "must be host:port, such as 127.0.0.1:2379"));
            }
            bases.push(base);
        }
        let http = match tls {
            None => HttpClient::new(timeout),
            Some(tls) => {
                let config = fulcrum_tls::client_config(tls, &[])?;
                HttpClient::with_tls(timeout, config)
            }
        };
        Ok(EtcdClient { inner: Arc::new(Inner { endpoints: bases, current: AtomicUsize::new(0), http }) })
    }

    /// The endpoints, as URLs.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Sends `body` to `path` on the first endpoint that answers, starting with the one
    /// that answered last.
    pub(crate) async fn send_raw(&self, path: &'static str, body: &Value, stream: bool) -> Result<SentRaw, EtcdError> {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let body =
            serde_json::to_vec(body).map_err(|e| EtcdError::Decode { what: "request", message: e.to_string() })?;
        let mut last = None;
        for i in 0..n {
            let index = (start + i) % n;
            let uri: Uri = format!("{}{path}", self.inner.endpoints[index])
                .parse()
                .map_err(|e: http::uri::InvalidUri| EtcdError::Decode { what: "URL", message: e.to_string() })?;
            let outcome = if stream {
                self.inner.http.send(Method::POST, uri, Some(body.clone())).await.map(SentRaw::Stream)
            } else {
                self.inner.http.call(Method::POST, uri, Some(body.clone())).await.map(|(s, b)| SentRaw::Whole(s, b))
            };
            match outcome {
                Ok(sent) => {
                    self.inner.current.store(index, Ordering::Relaxed);
                    return Ok(sent);
                }
                Err(e @ (TransportError::Connect { .. } | TransportError::Timeout { .. })) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or(EtcdError::WatchClosed, EtcdError::Transport))
    }

    async fn call<T: DeserializeOwned>(&self, path: &'static str, body: Value) -> Result<T, EtcdError> {
        let SentRaw::Whole(status, bytes) = self.send_raw(path, &body, false).await? else {
            return Err(EtcdError::WatchClosed);
        };
        if status != StatusCode::OK {
            return Err(server_error(path, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::Decode { what: path, message: e.to_string() })
    }

    /// Reads one key.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<KeyValue>, EtcdError> {
        let r: wire::RangeResponse = self.call("/v3/kv/range", json!({ "key": b64(key.as_ref()) })).await?;
        r.kvs.into_iter().next().map(wire::RawKv::decode).transpose()
    }

    /// Reads every key that starts with `prefix`, and the revision it was read at.
    pub async fn get_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Range, EtcdError> {
        let prefix = prefix.as_ref();
        let body = json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) });
        let r: wire::RangeResponse = self.call("/v3/kv/range", body).await?;
        let kvs = r.kvs.into_iter().map(wire::RawKv::decode).collect::<Result<_, _>>()?;
        Ok(Range { kvs, revision: r.header.revision })
    }

    /// Writes a key; returns the new revision.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<i64, EtcdError> {
        self.put_inner(key.as_ref(), value.as_ref(), 0).await
    }

    /// Writes a key attached to a lease: it is deleted when the lease ends.
    pub async fn put_with_lease(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: i64,
    ) -> Result<i64, EtcdError> {
        self.put_inner(key.as_ref(), value.as_ref(), lease).await
    }

    async fn put_inner(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({ "key": b64(key), "value": b64(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let r: wire::HeaderOnly = self.call("/v3/kv/put", body).await?;
        Ok(r.header.revision)
    }

    /// Deletes a key; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<u64, EtcdError> {
        let r: wire::DeleteRangeResponse = self.call("/v3/kv/deleterange", json!({ "key": b64(key.as_ref()) })).await?;
        Ok(u64::try_from(r.deleted).unwrap_or(0))
    }

    /// Deletes every key that starts with `prefix`; returns how many.
    pub async fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<u64, EtcdError> {
        let prefix = prefix.as_ref();
        let body = json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) });
        let r: wire::DeleteRangeResponse = self.call("/v3/kv/deleterange", body).await?;
        Ok(u64::try_from(r.deleted).unwrap_or(0))
    }

    /// Writes `value` only if the key's `mod_revision` is still `expected` (0: only if the key
    /// does not exist), in one transaction. On a conflict, returns what the key holds now.
    pub async fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected_mod_revision: i64,
        value: impl AsRef<[u8]>,
    ) -> Result<CasOutcome, EtcdError> {
        let key = b64(key.as_ref());
        let compare = json!({ "target": "MOD", "key": key, "mod_revision": expected_mod_revision.to_string(), "result": "EQUAL" });
        let put = json!({ "key": key, "value": b64(value.as_ref()) });
        self.put_if(&key, compare, put).await
    }

    /// One transaction: `put` if `compare` holds, else a read of `key` (base64), returned as
    /// the conflict.
    async fn put_if(&self, key: &str, compare: Value, put: Value) -> Result<CasOutcome, EtcdError> {
        let body = json!({
            "compare": [compare],
            "success": [{ "request_put": put }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let r: wire::TxnResponse = self.call("/v3/kv/txn", body).await?;
        if r.succeeded {
            return Ok(CasOutcome::Swapped { revision: r.header.revision });
        }
        let current = r.responses.into_iter().filter_map(|op| op.response_range).flat_map(|range| range.kvs).next();
        Ok(CasOutcome::Conflict { current: current.map(wire::RawKv::decode).transpose()? })
    }

    /// Creates a key attached to `lease` only if it does not exist, in one transaction
    /// (compare `create_revision == 0`): of several callers, one wins. On a conflict, returns
    /// what the key holds now (its `lease` tells whose it is).
    pub async fn create_with_lease(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: i64,
    ) -> Result<CasOutcome, EtcdError> {
        let key = b64(key.as_ref());
        let mut put = json!({ "key": key, "value": b64(value.as_ref()) });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let compare = json!({ "target": "CREATE", "key": key, "create_revision": "0", "result": "EQUAL" });
        self.put_if(&key, compare, put).await
    }

    /// Deletes a key only if it is attached to `lease` (compare on the key's lease), in one
    /// transaction: a holder gives up what it holds, never what another took meanwhile.
    /// Returns whether it was deleted.
    pub async fn delete_if_lease(&self, key: impl AsRef<[u8]>, lease: i64) -> Result<bool, EtcdError> {
        let key = b64(key.as_ref());
        let body = json!({
            "compare": [{ "target": "LEASE", "key": key, "lease": lease.to_string(), "result": "EQUAL" }],
            "success": [{ "request_delete_range": { "key": key } }],
        });
        let r: wire::TxnResponse = self.call("/v3/kv/txn", body).await?;
        Ok(r.succeeded)
    }

    /// Watches every key that starts with `prefix`, from `start_revision` (0: from now; use
    /// [`Range::revision`]` + 1` after a read to miss nothing). The watch is created when this
    /// returns.
    pub async fn watch_prefix(&self, prefix: impl AsRef<[u8]>, start_revision: i64) -> Result<Watch, EtcdError> {
        let prefix = prefix.as_ref();
        self.watch_range(prefix, Some(&prefix_end(prefix)), start_revision).await
    }

    /// Watches one key, from `start_revision` (0: from now).
    pub async fn watch_key(&self, key: impl AsRef<[u8]>, start_revision: i64) -> Result<Watch, EtcdError> {
        self.watch_range(key.as_ref(), None, start_revision).await
    }

    async fn watch_range(&self, key: &[u8], end: Option<&[u8]>, start_revision: i64) -> Result<Watch, EtcdError> {
        let mut create = json!({ "key": b64(key), "prev_kv": true });
        if let Some(end) = end {
            create["range_end"] = json!(b64(end));
        }
        if start_revision > 0 {
            create["start_revision"] = json!(start_revision.to_string());
        }
        let body = json!({ "create_request": create });
        let SentRaw::Stream(response) = self.send_raw("/v3/watch", &body, true).await? else {
            return Err(EtcdError::WatchClosed);
        };
        Watch::start(response, self.inner.http.timeout()).await
    }

    /// Grants a lease of `ttl` (whole seconds, rounded up; etcd may raise it to its minimum).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant, EtcdError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let r: wire::LeaseGrantResponse =
            self.call("/v3/lease/grant", json!({ "TTL": secs.max(1).to_string() })).await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Server { call: "/v3/lease/grant", status: 200, code: 0, message: r.error });
        }
        Ok(LeaseGrant { id: r.ID, ttl: Duration::from_secs(u64::try_from(r.TTL).unwrap_or(0)) })
    }

    /// Renews a lease; returns its TTL from now, or `None` if the lease no longer exists
    /// (it expired or was revoked: its keys are gone).
    pub async fn lease_keepalive(&self, lease: i64) -> Result<Option<Duration>, EtcdError> {
        let r: wire::KeepAliveEnvelope = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        if let Some(e) = r.error {
            return Err(EtcdError::Server {
                call: "/v3/lease/keepalive",
                status: 200,
                code: e.grpc(),
                message: e.text().to_owned(),
            });
        }
        let ttl = r.result.map_or(0, |r| r.TTL);
        Ok((ttl > 0).then(|| Duration::from_secs(u64::try_from(ttl).unwrap_or(0))))
    }

    /// Ends a lease now, deleting its keys. Revoking a lease that is already gone is not an
    /// error.
    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self.call::<wire::HeaderOnly>("/v3/lease/revoke", json!({ "ID": lease.to_string() })).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

pub(crate) enum SentRaw {
    Whole(StatusCode, bytes::Bytes),
    Stream(http::Response<hyper::body::Incoming>),
}

pub(crate) fn server_error(call: &'static str, status: StatusCode, body: &[u8]) -> EtcdError {
    let parsed: wire::GatewayError = serde_json::from_slice(body).unwrap_or_default();
    let message = match parsed.text() {
        "" => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        text => text.to_owned(),
    };
    EtcdError::Server { call, status: status.as_u16(), code: parsed.grpc(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        let t = Duration::from_secs(1);
        let c = EtcdClient::new(&["127.0.0.1:2379", "http://10.0.0.1:2379/"], t).unwrap();
        assert_eq!(c.endpoints(), ["http://127.0.0.1:2379", "http://10.0.0.1:2379"]);
        let err = |e: &str| EtcdClient::new(&[e], t).unwrap_err().to_string();
        assert!(err("ftp://a:1").contains("must be http://host:port or https://host:port"));
        assert!(err("a").contains("must be host:port"));
        assert!(err("http://a:1/v3").contains("must be host:port"));
        assert!(err("ftp://a:1").contains("http://host:port"));
        assert!(EtcdClient::new::<&str>(&[], t).is_err());
        assert!(EtcdClient::new(&["a:1"], Duration::ZERO).is_err());
    }

    #[test]
    fn server_errors_are_classified() {
        let e = server_error(
            "/v3/kv/put",
            StatusCode::NOT_FOUND,
            br#"{"error":"x","message":"etcdserver: requested lease not found","code":5}"#,
        );
        assert!(e.is_not_found() && !e.is_retryable());
        assert!(e.to_string().contains("requested lease not found"));
        let e = server_error("/v3/kv/put", StatusCode::SERVICE_UNAVAILABLE, b"upstream down");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("upstream down"));
    }
}
