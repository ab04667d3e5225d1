//! A watch: one long POST to `/v3/watch` whose answer is a stream of JSON messages.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::client::server_error;
use super::wire::WatchEnvelope;
use super::{EtcdError, WatchEvent};
use crate::http::MAX_BODY;

/// Changes seen together, at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// The store's revision after these changes.
    pub revision: i64,
    /// The changes, in order (empty for a progress notification).
    pub events: Vec<WatchEvent>,
}

/// An open watch, from [`EtcdClient::watch_prefix`](super::EtcdClient::watch_prefix) or
/// [`EtcdClient::watch_key`](super::EtcdClient::watch_key). Dropping it closes the stream.
#[derive(Debug)]
pub struct Watch {
    body: Incoming,
    buf: Vec<u8>,
    revision: i64,
}

// === impl Watch ===

impl Watch {
    /// Checks the answer's head and waits (at most `timeout`) for etcd to confirm the watch.
    pub(crate) async fn start(response: http::Response<Incoming>, timeout: Duration) -> Result<Watch, EtcdError> {
        let status = response.status();
        if !status.is_success() {
            let body = tokio::time::timeout(timeout, Limited::new(response.into_body(), 64 << 10).collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(server_error("/v3/watch", status, &body));
        }
        let mut watch = Watch { body: response.into_body(), buf: Vec::new(), revision: 0 };
        loop {
            let message =
                tokio::time::timeout(timeout, watch.message()).await.map_err(|_| EtcdError::WatchClosed)??;
            if message.created {
                watch.revision = message.header.revision;
                return Ok(watch);
            }
            if message.canceled {
                return Err(canceled(&message));
            }
        }
    }

    /// The latest revision the watch has reported.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Waits for the next changes. Errors end the watch: [`EtcdError::WatchClosed`] when the
    /// stream broke, [`EtcdError::Compacted`] when etcd no longer has the revisions asked for.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        loop {
            let message = self.message().await?;
            if message.canceled {
                return Err(canceled(&message));
            }
            if message.created {
                continue;
            }
            self.revision = self.revision.max(message.header.revision);
            let events = message.events.into_iter().map(|e| e.decode()).collect::<Result<Vec<_>, _>>()?;
            return Ok(WatchBatch { revision: message.header.revision, events });
        }
    }

    /// The next message of the stream.
    async fn message(&mut self) -> Result<super::wire::WatchResponse, EtcdError> {
        loop {
            let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<WatchEnvelope>();
            match values.next() {
                Some(Ok(envelope)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    if let Some(e) = envelope.error {
                        return Err(EtcdError::Server {
                            call: "/v3/watch",
                            status: 200,
                            code: e.grpc(),
                            message: e.text().to_owned(),
                        });
                    }
                    match envelope.result {
                        Some(result) => return Ok(result),
                        None => continue,
                    }
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(EtcdError::Decode { what: "watch stream", message: e.to_string() });
                }
                _ => {}
            }
            if self.buf.len() > MAX_BODY {
                return Err(EtcdError::Decode { what: "watch stream", message: "a message over 16 MiB".into() });
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => return Err(EtcdError::WatchClosed),
            }
        }
    }
}

fn canceled(message: &super::wire::WatchResponse) -> EtcdError {
    if message.compact_revision > 0 {
        EtcdError::Compacted { compact_revision: message.compact_revision }
    } else {
        EtcdError::WatchCanceled { reason: message.cancel_reason.clone() }
    }
}
