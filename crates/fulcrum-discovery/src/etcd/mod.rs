//! etcd: a general v3 client ([`EtcdClient`]), the `etcd` discovery provider, and
//! self-registration under a lease ([`register_etcd`]).
//!
//! **Why the JSON gateway and not gRPC.** etcd serves its v3 API over gRPC and, on the same
//! client port, as JSON through its gRPC gateway (`POST /v3/kv/range`, `/v3/watch`, ...;
//! etcd 3.4 and later). The gRPC crate (`etcd-client`) needs `tonic` and `prost`, and its
//! build script needs a `protoc` binary: a second HTTP stack and a code generator for a few
//! calls. The gateway needs only hyper, which Fulcrum already has, and speaks the same API:
//! keys and values are base64, 64-bit integers are JSON strings, a watch is one long POST
//! whose answer streams one JSON message per change. What it costs: JSON is bigger than
//! protobuf, and a lease keep-alive is one POST each (the gateway closes a bidirectional
//! stream when the request body ends), which at one call per TTL/3 does not matter.
//!
//! **Discovery.** The provider reads every key under its prefix, then watches the prefix
//! from the next revision, so no change is missed between the two. Each key holds one
//! endpoint as JSON, the fields of a pool's `endpoints` entries:
//!
//! ```text
//! /fulcrum/pools/llama/endpoints/gpu-7 -> {"address":"10.0.0.7:8000","weight":2,"models":["llama-3-8b"]}
//! ```
//!
//! Without an `id` in the value, the endpoint's id is the last `/`-separated part of its key
//! (`gpu-7`). A key whose value cannot be read is left out of the set and listed in the status
//! board's `rejected`; the other keys still count. When etcd cannot be reached, or the watch
//! breaks, the pool keeps its last set, the failure shows in the status board, and the
//! provider reads and watches again with backoff (100 ms doubling to 5 s).
//!
//! **Self-registration.** [`register_etcd`] grants a lease, writes the endpoint's key with it
//! and renews the lease every TTL/3 until the returned [`EtcdRegistration`] is dropped (or
//! [`EtcdRegistration::deregister`]ed, which deletes the key at once). A backend that stops
//! renewing loses its key when the TTL runs out, and every proxy watching the prefix drops it.

mod client;
pub(crate) mod provider;
mod register;
mod watch;
mod wire;

pub use client::{CasOutcome, EtcdClient, EtcdError, EventKind, KeyValue, LeaseGrant, Range, WatchEvent};
pub use register::{EtcdRegistration, register_etcd};
pub use watch::{Watch, WatchBatch};
