//! The `etcd` provider: read the prefix, watch it, keep the set in step.

use std::collections::BTreeMap;
use std::time::Duration;

use fulcrum_config::discovery::{EndpointEntry, EtcdDiscovery};
use fulcrum_core::EndpointSpec;

use super::{EtcdClient, EventKind, KeyValue};
use crate::publish::{Publisher, Reconnect};

/// Runs until aborted.
pub(crate) async fn run(config: EtcdDiscovery, mut out: Publisher) {
    let client = match EtcdClient::with_tls(&config.endpoints, config.timeout, config.tls.as_ref()) {
        Ok(c) => c,
        Err(e) => return out.fail(&e),
    };
    let prefix = config.prefix.as_str();
    let mut backoff = Reconnect::new(Duration::from_secs(5));
    loop {
        let range = match client.get_prefix(prefix).await {
            Ok(r) => r,
            Err(e) => {
                out.fail(&format!("reading {prefix}: {e}"));
                backoff.wait().await;
                continue;
            }
        };
        let mut keys: BTreeMap<Vec<u8>, KeyValue> = range.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        publish(&mut out, prefix, &keys);
        let mut watch = match client.watch_prefix(prefix, range.revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                out.fail(&format!("watching {prefix}: {e}"));
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        loop {
            match watch.next().await {
                Ok(batch) if batch.events.is_empty() => {}
                Ok(batch) => {
                    for event in batch.events {
                        match event.kind {
                            EventKind::Put => keys.insert(event.kv.key.clone(), event.kv),
                            EventKind::Delete => keys.remove(&event.kv.key),
                        };
                    }
                    publish(&mut out, prefix, &keys);
                }
                Err(e) => {
                    out.fail(&format!("watching {prefix}: {e}"));
                    break;
                }
            }
        }
        backoff.wait().await;
    }
}

fn publish(out: &mut Publisher, prefix: &str, keys: &BTreeMap<Vec<u8>, KeyValue>) {
    let mut set = Vec::with_capacity(keys.len());
    let mut rejected = Vec::new();
    for kv in keys.values() {
        match endpoint_of(prefix, kv) {
            Ok(spec) => set.push(spec),
            Err(why) => rejected.push(format!("{}: {why}", kv.key_str())),
        }
    }
    out.publish(set, rejected);
}

/// The endpoint a key describes; its id defaults to the key's last `/`-separated part.
pub(crate) fn endpoint_of(prefix: &str, kv: &KeyValue) -> Result<EndpointSpec, String> {
    let mut entry: EndpointEntry = serde_json::from_slice(&kv.value).map_err(|e| format!("not an endpoint: {e}"))?;
    if entry.id.is_none() {
        let key = kv.key_str();
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        let id = rest.rsplit('/').find(|s| !s.is_empty()).ok_or("the key has no name after the prefix")?;
        entry.id = Some(id.to_owned());
    }
    entry.into_spec().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.into(), value: value.into(), create_revision: 1, mod_revision: 1, version: 1, lease: 0 }
    }

    #[test]
    fn ids_come_from_the_value_or_the_key() {
        let p = "/f/pools/x/";
        let e = endpoint_of(p, &kv("/f/pools/x/endpoints/gpu-7", r#"{"address":"127.0.0.1:1","weight":2}"#)).unwrap();
        assert_eq!((e.id.as_str(), e.weight.get()), ("gpu-7", 2));
        let e = endpoint_of(p, &kv("/f/pools/x/a", r#"{"address":"127.0.0.1:1","id":"mine"}"#)).unwrap();
        assert_eq!(e.id.as_str(), "mine");
        assert!(endpoint_of(p, &kv("/f/pools/x/a", "not json")).unwrap_err().starts_with("not an endpoint"));
        assert!(endpoint_of(p, &kv("/f/pools/x/a", r#"{"address":"x"}"#)).is_err());
        assert!(endpoint_of(p, &kv("/f/pools/x/", r#"{"address":"127.0.0.1:1"}"#)).is_err());
        assert!(endpoint_of(p, &kv("/f/pools/x/a", r#"{"address":"127.0.0.1:1","port":1}"#)).is_err());
    }
}
