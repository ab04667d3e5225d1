//! Per-endpoint concurrency limits (Envoy's circuit-breaker thresholds).

use std::fmt;

use crate::resilience::{Check, ConfigError};

const SECTION: Check = Check { section: "limits" };

/// Concurrency limits as written; `None` is no limit. Defaults are Envoy's: 1024 each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitSettings {
    /// Most connections open to the endpoint (1024).
    pub max_connections: Option<u32>,
    /// Most requests waiting for a connection to the endpoint (1024).
    pub max_pending: Option<u32>,
    /// Most requests in flight on the endpoint (1024).
    pub max_requests: Option<u32>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings { max_connections: Some(1024), max_pending: Some(1024), max_requests: Some(1024) }
    }
}

/// What a limit bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Open connections.
    Connections,
    /// Requests waiting for a connection.
    Pending,
    /// Requests in flight.
    Requests,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Connections => "max_connections",
            Resource::Pending => "max_pending",
            Resource::Requests => "max_requests",
        })
    }
}

/// The counts of one endpoint that the proxy keeps, before the new request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Open connections.
    pub connections: u64,
    /// Requests waiting for a connection.
    pub pending: u64,
    /// Requests in flight.
    pub requests: u64,
}

/// A limit is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {resource} ({limit}) reached")]
pub struct LimitExceeded {
    /// Which limit.
    pub resource: Resource,
    /// Its value.
    pub limit: u32,
}

/// Validated concurrency limits of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    s: LimitSettings,
}

// === impl Limits ===

impl Limits {
    /// No limits at all.
    pub const UNLIMITED: Limits =
        Limits { s: LimitSettings { max_connections: None, max_pending: None, max_requests: None } };

    /// Checks the settings: every limit given is at least 1.
    pub fn try_new(s: LimitSettings) -> Result<Self, ConfigError> {
        for (field, v) in
            [("max_connections", s.max_connections), ("max_pending", s.max_pending), ("max_requests", s.max_requests)]
        {
            if v == Some(0) {
                return Err(SECTION.err(field, "must be at least 1 (leave it out for no limit)"));
            }
        }
        Ok(Limits { s })
    }

    /// The limit on a resource, if any.
    pub fn max(&self, resource: Resource) -> Option<u32> {
        match resource {
            Resource::Connections => self.s.max_connections,
            Resource::Pending => self.s.max_pending,
            Resource::Requests => self.s.max_requests,
        }
    }

    /// Whether one more of `resource` fits when `current` are in use.
    pub fn check(&self, resource: Resource, current: u64) -> Result<(), LimitExceeded> {
        match self.max(resource) {
            Some(limit) if current >= u64::from(limit) => Err(LimitExceeded { resource, limit }),
            _ => Ok(()),
        }
    }

    /// Whether a new request may start on the endpoint, given its counts before it: one
    /// more request must fit, and one more pending request (a new request may have to wait
    /// for a connection; while requests wait, none is idle). Opening a connection is checked
    /// apart, with [`admits_connection`](Self::admits_connection), when the pool needs one.
    pub fn admits(&self, current: &Counts) -> Result<(), LimitExceeded> {
        self.check(Resource::Requests, current.requests)?;
        self.check(Resource::Pending, current.pending)
    }

    /// Whether a new connection may open when `open` are open.
    pub fn admits_connection(&self, open: u64) -> Result<(), LimitExceeded> {
        self.check(Resource::Connections, open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_admit_below_the_max() {
        let l =
            Limits::try_new(LimitSettings { max_connections: Some(2), max_pending: Some(1), max_requests: Some(3) })
                .unwrap();
        assert_eq!(l.admits(&Counts { connections: 9, pending: 0, requests: 2 }), Ok(()));
        let e = l.admits(&Counts { requests: 3, ..Counts::default() }).unwrap_err();
        assert_eq!(e, LimitExceeded { resource: Resource::Requests, limit: 3 });
        assert_eq!(e.to_string(), "endpoint max_requests (3) reached");
        assert_eq!(l.admits(&Counts { pending: 1, ..Counts::default() }).unwrap_err().resource, Resource::Pending);
        assert!(l.admits_connection(1).is_ok());
        assert_eq!(l.admits_connection(2).unwrap_err().resource, Resource::Connections);
        assert!(
            Limits::UNLIMITED.admits(&Counts { connections: u64::MAX, pending: u64::MAX, requests: u64::MAX }).is_ok()
        );
        assert_eq!(Limits::default().max(Resource::Requests), Some(1024));
    }

    #[test]
    fn zero_limits_are_refused() {
        let d = LimitSettings::default();
        for (s, field) in [
            (LimitSettings { max_connections: Some(0), ..d }, "max_connections"),
            (LimitSettings { max_pending: Some(0), ..d }, "max_pending"),
            (LimitSettings { max_requests: Some(0), ..d }, "max_requests"),
        ] {
            let e = Limits::try_new(s).unwrap_err();
            assert_eq!((e.section, e.field), ("limits", field));
        }
        assert!(
            Limits::try_new(LimitSettings { max_connections: None, max_pending: None, max_requests: None }).is_ok()
        );
    }
}
