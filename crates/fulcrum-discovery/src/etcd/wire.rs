//! The JSON shapes of etcd's v3 gateway (grpc-gateway over the gRPC API): bytes are base64,
//! 64-bit integers are strings, and fields holding their zero value are left out.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer};

use super::{EtcdError, EventKind, KeyValue, WatchEvent};

pub(crate) fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, EtcdError> {
    STANDARD.decode(s).map_err(|e| EtcdError::Decode { what: "base64 bytes", message: e.to_string() })
}

/// An `int64`: a string in proto3's JSON mapping, a number from some proxies.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(i64),
        Text(String),
    }
    match Repr::deserialize(d)? {
        Repr::Number(n) => Ok(n),
        Repr::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Header {
    #[serde(default, deserialize_with = "int64")]
    pub revision: i64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    version: i64,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

impl RawKv {
    pub(crate) fn decode(self) -> Result<KeyValue, EtcdError> {
        Ok(KeyValue {
            key: unb64(&self.key)?,
            value: unb64(&self.value)?,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct RangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<RawKv>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct HeaderOnly {
    #[serde(default)]
    pub header: Header,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeleteRangeResponse {
    #[serde(default, deserialize_with = "int64")]
    pub deleted: i64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TxnResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ResponseOp {
    pub response_range: Option<RangeResponse>,
}

#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
pub(crate) struct LeaseGrantResponse {
    #[serde(default, deserialize_with = "int64")]
    pub ID: i64,
    #[serde(default, deserialize_with = "int64")]
    pub TTL: i64,
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeepAliveEnvelope {
    pub result: Option<KeepAliveResult>,
    pub error: Option<GatewayError>,
}

#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
pub(crate) struct KeepAliveResult {
    #[serde(default, deserialize_with = "int64")]
    pub TTL: i64,
}

/// An error as the gateway writes it: `{"error": "...", "message": "...", "code": 5}`; the
/// code is gRPC's (5: not found, 14: unavailable).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct GatewayError {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub code: i32,
    /// Stream errors nest it as `{"error": {"grpc_code": .., "message": ..}}`.
    #[serde(default)]
    pub grpc_code: i32,
}

impl GatewayError {
    pub(crate) fn text(&self) -> &str {
        if self.message.is_empty() { &self.error } else { &self.message }
    }

    pub(crate) fn grpc(&self) -> i32 {
        if self.code == 0 { self.grpc_code } else { self.code }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct WatchEnvelope {
    pub result: Option<WatchResponse>,
    pub error: Option<GatewayError>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WatchResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: String,
    #[serde(default)]
    pub events: Vec<RawEvent>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawEvent {
    /// `PUT` is the zero value, so it is left out.
    #[serde(default, rename = "type")]
    kind: String,
    kv: RawKv,
    prev_kv: Option<RawKv>,
}

impl RawEvent {
    pub(crate) fn decode(self) -> Result<WatchEvent, EtcdError> {
        let kind = match self.kind.as_str() {
            "" | "PUT" => EventKind::Put,
            "DELETE" => EventKind::Delete,
            other => return Err(EtcdError::Decode { what: "watch event", message: format!("unknown type {other:?}") }),
        };
        Ok(WatchEvent { kind, kv: self.kv.decode()?, prev_kv: self.prev_kv.map(RawKv::decode).transpose()? })
    }
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte below
/// 0xff incremented (etcd's `WithPrefix`); `\0` means "to the end" for an all-0xff prefix.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
        assert_eq!(prefix_end(&[0xff]), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[test]
    fn gateway_json_decodes() {
        let text = r#"{"result":{"header":{"revision":"3"},"events":[{"type":"DELETE","kv":{"key":"L2EvYg==","mod_revision":"3"}},{"kv":{"key":"L2EvYw==","value":"eA==","lease":"42"}}]}}"#;
        let envelope: WatchEnvelope = serde_json::from_str(text).unwrap();
        let result = envelope.result.unwrap();
        assert_eq!(result.header.revision, 3);
        let events: Vec<WatchEvent> = result.events.into_iter().map(|e| e.decode().unwrap()).collect();
        assert_eq!(events[0].kind, EventKind::Delete);
        assert_eq!(events[0].kv.key, b"/a/b");
        assert_eq!(
            (events[1].kind, events[1].kv.value.as_slice(), events[1].kv.lease),
            (EventKind::Put, &b"x"[..], 42)
        );
        let bad: RawKv = serde_json::from_str(r#"{"key":"***"}"#).unwrap();
        assert!(bad.decode().is_err());
        assert!(serde_json::from_str::<Header>(r#"{"revision":"x"}"#).is_err());
        assert_eq!(serde_json::from_str::<Header>(r#"{"revision":7}"#).unwrap().revision, 7);
    }
}
