//! Self-registration for the command line: `fulcrum register ...` registers a backend in etcd
//! or with a proxy's admin API, keeps it registered with heartbeats, and leaves cleanly when
//! told to stop. See [`run_register`].

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use fulcrum_config::discovery::EndpointEntry;
use fulcrum_core::EndpointSpec;

use crate::etcd::{EtcdClient, EtcdError, register_etcd};
use crate::http::BearerToken;
use crate::registration::{RegistrationClientError, register_http};

/// How a registration's heartbeats go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// The last heartbeat was accepted.
    Alive,
    /// The last heartbeat failed (it is retried every second or TTL/3, whichever is
    /// shorter); once the TTL has passed the endpoint is out of the pool until one succeeds.
    Failing(String),
}

/// Where to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterTarget {
    /// Under a lease in etcd, for proxies running the `etcd` provider on `prefix`.
    Etcd {
        /// etcd client URLs (`http://host:port`, `https://host:port` or `host:port`).
        endpoints: Vec<String>,
        /// The key prefix the proxies watch (the key is the prefix and the endpoint's id).
        prefix: String,
        /// For `https://` endpoints: a CA bundle and a client certificate.
        tls: Option<fulcrum_config::UpstreamTls>,
    },
    /// With one proxy's admin API, in a pool whose discovery kind is `registration`.
    Admin {
        /// The admin API, `http://host:port`.
        url: String,
        /// The pool.
        pool: String,
        /// The admin API's bearer token, when it has one.
        token: Option<BearerToken>,
    },
}

/// What `fulcrum register` is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterArgs {
    /// Where to register.
    pub target: RegisterTarget,
    /// The backend's address, as proxies should reach it.
    pub address: SocketAddr,
    /// Its id (default: the address).
    pub id: Option<String>,
    /// Its weight (default 1).
    pub weight: Option<u32>,
    /// Models it serves.
    pub models: Vec<String>,
    /// Labels (`gpu`, `zone`, anything).
    pub labels: Vec<(String, String)>,
    /// The lease's TTL: how long after the last heartbeat the backend leaves the pools.
    pub ttl: Duration,
}

/// Why `fulcrum register` failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// An argument is wrong.
    #[error("--{field}: {message}")]
    Invalid {
        /// The argument.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The proxy failed or refused.
    #[error(transparent)]
    Admin(#[from] RegistrationClientError),
}

/// Parses a `key=value` label argument.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?} is not a label such as zone=a")),
    }
}

impl RegisterArgs {
    /// The endpoint these arguments describe, checked.
    pub fn spec(&self) -> Result<EndpointSpec, RegisterError> {
        let weight = match self.weight {
            Some(w) => Some(
                NonZeroU32::new(w)
                    .ok_or(RegisterError::Invalid { field: "weight", message: "must be at least 1".into() })?,
            ),
            None => None,
        };
        let entry = EndpointEntry {
            address: self.address,
            weight,
            id: self.id.clone(),
            models: self.models.clone(),
            labels: self.labels.iter().cloned().collect(),
        };
        entry.into_spec().map_err(|e| RegisterError::Invalid { field: e.field, message: e.message })
    }
}

/// Registers, keeps the registration alive until `until` completes (such as Ctrl-C), then
/// leaves (revokes the etcd lease or deletes the registration), so the endpoint goes at once
/// rather than after its TTL. Heartbeat failures are logged (`tracing`) and retried; only the
/// first registration's failure is returned as an error.
pub async fn run_register(args: RegisterArgs, until: impl Future<Output = ()>) -> Result<(), RegisterError> {
    if args.ttl < Duration::from_secs(1) {
        return Err(RegisterError::Invalid { field: "ttl", message: "must be at least 1s".into() });
    }
    let spec = args.spec()?;
    match &args.target {
        RegisterTarget::Etcd { endpoints, prefix, tls } => {
            let client = EtcdClient::with_tls(endpoints, Duration::from_secs(5), tls.as_ref())?;
            let registration = register_etcd(&client, prefix, &spec, args.ttl).await?;
            tracing::info!(key = registration.key(), lease = registration.lease_id(), "registered in etcd");
            log_until(registration.heartbeat(), until).await;
            registration.deregister().await?;
        }
        RegisterTarget::Admin { url, pool, token } => {
            let registration = register_http(url, pool, &spec, args.ttl, token.as_ref()).await?;
            tracing::info!(%url, pool, id = %spec.id, "registered with the proxy");
            log_until(registration.heartbeat(), until).await;
            registration.deregister().await?;
        }
    }
    tracing::info!(id = %spec.id, "deregistered");
    Ok(())
}

async fn log_until(mut heartbeat: tokio::sync::watch::Receiver<Heartbeat>, until: impl Future<Output = ()>) {
    let mut until = std::pin::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => return,
            changed = heartbeat.changed() => {
                if changed.is_err() {
                    // The heartbeat task is gone; wait for the stop signal all the same.
                    return until.await;
                }
                match &*heartbeat.borrow_and_update() {
                    Heartbeat::Alive => tracing::info!("heartbeats accepted"),
                    Heartbeat::Failing(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RegisterArgs {
        RegisterArgs {
            target: RegisterTarget::Admin { url: "http://127.0.0.1:1".into(), pool: "p".into(), token: None },
            address: "127.0.0.1:9000".parse().unwrap(),
            id: None,
            weight: Some(2),
            models: vec!["m".into()],
            labels: vec![("zone".into(), "a".into())],
            ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn arguments_are_checked() {
        let spec = args().spec().unwrap();
        assert_eq!((spec.weight.get(), spec.labels.zone.as_deref()), (2, Some("a")));
        let e = RegisterArgs { weight: Some(0), ..args() }.spec().unwrap_err();
        assert_eq!(e.to_string(), "--weight: must be at least 1");
        let e = RegisterArgs { id: Some(String::new()), ..args() }.spec().unwrap_err();
        assert_eq!(e.to_string(), "--id: must not be empty");
        assert_eq!(parse_label("zone = a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("=a").is_err() && parse_label("a").is_err());
    }

    #[test]
    fn the_token_never_prints() {
        let token = Some(BearerToken::new(" a-long-enough-admin-token\n").unwrap());
        assert!(BearerToken::new("two words").is_err() && BearerToken::new("").is_err());
        let args =
            RegisterArgs { target: RegisterTarget::Admin { url: "u".into(), pool: "p".into(), token }, ..args() };
        let shown = format!("{args:?}");
        assert!(!shown.contains("a-long-enough") && shown.contains("redacted"), "{shown}");
    }

    #[tokio::test]
    async fn a_short_ttl_is_refused_before_anything_is_sent() {
        let e = run_register(RegisterArgs { ttl: Duration::from_millis(10), ..args() }, async {}).await.unwrap_err();
        assert_eq!(e.to_string(), "--ttl: must be at least 1s");
    }
}
