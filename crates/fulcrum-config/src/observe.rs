//! `[tracing]`: OpenTelemetry traces sent over OTLP/HTTP.
//!
//! ```toml
//! [tracing]
//! otlp_endpoint = "http://127.0.0.1:4318"   # a collector's OTLP/HTTP base URL
//! service_name = "fulcrum"                  # the `service.name` resource attribute
//! sample_ratio = 0.1                        # share of new traces recorded (default 1.0)
//! ```
//!
//! Without `otlp_endpoint` nothing is traced. The endpoint is a base URL, as in
//! `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to its path plus `/v1/traces` (a URL that already
//! ends in `/v1/traces` is used as it is). `http` or `https`; over https the collector's
//! certificate is verified against the system's CAs, or against `otlp_ca` (a PEM bundle).
//! Each field is checked while the file is read, so errors carry the value's line.

use serde::{Deserialize, Deserializer};

/// Default `service.name`.
pub const DEFAULT_SERVICE_NAME: &str = "fulcrum";

/// Where and how the proxy sends traces.
#[derive(Clone, Debug, PartialEq)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL.
    pub otlp_endpoint: OtlpEndpoint,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Share of new traces (requests without a sampled parent) that are recorded, 0.0 to 1.0.
    /// A request whose `traceparent` says sampled is always recorded, one that says not
    /// sampled never is (parent-based sampling).
    pub sample_ratio: f64,
    /// CA bundle (PEM) for an `https` collector, instead of the system's roots.
    pub otlp_ca: Option<std::path::PathBuf>,
}

/// An `http[s]://host[:port][/path]` URL for OTLP/HTTP traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// Over TLS (`https`).
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (80, or 443 for https, when the URL has none).
    pub port: u16,
    /// The path spans are POSTed to, ending in `/v1/traces`.
    pub path: String,
}

impl OtlpEndpoint {
    /// Parses a base URL; the error says what is allowed.
    pub fn parse(url: &str) -> Result<OtlpEndpoint, String> {
        let (https, rest) = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            _ => return Err(format!("`{url}` is not an http(s) URL such as \"http://127.0.0.1:4318\"")),
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) if rest[i..].starts_with('/') && !rest[i..].contains(['?', '#']) => (&rest[..i], &rest[i..]),
            Some(_) => return Err(format!("`{url}`: a query or fragment is not allowed")),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!("`{url}`: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("`{url}`: unexpected `{after}` after the host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) {
            return Err(format!("`{url}`: `{host}` is not a host name or IP address"));
        }
        let port = match port {
            None if https => 443,
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| format!("`{url}`: bad port `{p}`"))?,
        };
        let base = path.trim_end_matches('/');
        let path = if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") };
        Ok(OtlpEndpoint { https, host: host.to_owned(), port, path })
    }

    /// The `Host` header value.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

impl<'de> Deserialize<'de> for OtlpEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        OtlpEndpoint::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A share from 0.0 to 1.0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ratio(pub f64);

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&v) {
            Ok(Ratio(v))
        } else {
            Err(serde::de::Error::custom(format!("must be from 0.0 to 1.0, got {v}")))
        }
    }
}

/// A `service.name`: printable, at most 255 bytes.
#[derive(Clone, Debug)]
pub(crate) struct ServiceName(pub String);

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s.len() > 255 || s.chars().any(char::is_control) {
            return Err(serde::de::Error::custom("must be 1 to 255 printable characters"));
        }
        Ok(ServiceName(s))
    }
}

/// `[tracing]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTracing {
    pub otlp_endpoint: Option<OtlpEndpoint>,
    pub service_name: Option<ServiceName>,
    pub sample_ratio: Option<Ratio>,
    pub otlp_ca: Option<std::path::PathBuf>,
}

impl RawTracing {
    /// The typed settings; `None` when no endpoint is set (tracing off).
    /// `dir` is where a relative `otlp_ca` is (the configuration file's directory).
    pub(crate) fn validate(self, dir: Option<&std::path::Path>) -> Option<TracingConfig> {
        let otlp_ca = self.otlp_ca.map(|p| match dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        });
        Some(TracingConfig {
            otlp_endpoint: self.otlp_endpoint?,
            service_name: self.service_name.map_or_else(|| DEFAULT_SERVICE_NAME.to_owned(), |s| s.0),
            sample_ratio: self.sample_ratio.map_or(1.0, |r| r.0),
            otlp_ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_base_urls() {
        let e = OtlpEndpoint::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("127.0.0.1", 4318, "/v1/traces"));
        assert_eq!(e.to_string(), "http://127.0.0.1:4318/v1/traces");
        let e = OtlpEndpoint::parse("HTTP://collector.monitoring/otlp/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("collector.monitoring", 80, "/otlp/v1/traces"));
        let e = OtlpEndpoint::parse("http://[::1]:4318/v1/traces").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.path.as_str()), ("::1", 4318, "/v1/traces"));
        assert_eq!(e.authority(), "[::1]:4318");
        let e = OtlpEndpoint::parse("https://otel.example").unwrap();
        assert_eq!((e.https, e.port, e.to_string().as_str()), (true, 443, "https://otel.example:443/v1/traces"));
        for (bad, says) in [
            ("127.0.0.1:4318", "not an http(s) URL"),
            ("ftp://otel:4318", "not an http(s) URL"),
            ("http://:4318", "not a host name"),
            ("http://otel:0", "bad port"),
            ("http://otel:99999", "bad port"),
            ("http://otel:4318/?x=1", "query or fragment"),
            ("http://user:pw@otel:4318", "credentials"),
            ("http://[::1/", "unclosed"),
        ] {
            let e = OtlpEndpoint::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
