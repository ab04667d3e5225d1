//! The typed balancing policy, as configuration names it.
//!
//! A policy is written either as a bare name (`policy = "maglev"`) or as a table with a
//! `name` and options (`policy = { name = "maglev", table_size = 65537, key = "header:x-user" }`).
//! Deserializing validates: a bad value is an error that names the option and says what is
//! allowed.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default number of ring points per endpoint of average weight (ketama uses 160).
pub const DEFAULT_VNODES: u32 = 160;
/// Default Maglev lookup table size (a prime; Google's paper uses 65537 for small pools).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Default bounded-load slack: no endpoint above 1.25 x the average load.
pub const DEFAULT_EPSILON: f64 = 0.25;
/// Default number of candidates sampled by `power_of_two`.
pub const DEFAULT_CHOICES: usize = 2;

const MAX_CHOICES: usize = 64;
const MAX_VNODES: u32 = 10_000;
const MAX_MAGLEV_TABLE_SIZE: u32 = 1 << 24;

/// Why a policy was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The name is not a policy.
    #[error("unknown policy `{0}`; expected one of: {list}", list = PolicyKind::names())]
    UnknownPolicy(String),
    /// The policy needs an option that was not given.
    #[error("policy `{policy}` needs the option `{option}`")]
    Missing {
        /// The policy.
        policy: &'static str,
        /// The missing option.
        option: &'static str,
    },
    /// An option has a value out of range.
    #[error("policy `{policy}`: `{option}` {problem}")]
    Invalid {
        /// The policy.
        policy: &'static str,
        /// The option at fault.
        option: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// A hash key source is not one of the known forms.
    #[error("unknown hash key `{0}`; expected `client_ip`, `path`, `header:NAME` or `cookie:NAME`")]
    UnknownKey(String),
}

/// The names of the policies, without options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// `round_robin`
    RoundRobin,
    /// `weighted_round_robin`
    WeightedRoundRobin,
    /// `random`
    Random,
    /// `least_connections`
    LeastConnections,
    /// `least_response_time`
    LeastResponseTime,
    /// `power_of_two`
    PowerOfTwo,
    /// `ip_hash`
    IpHash,
    /// `header_hash`
    HeaderHash,
    /// `cookie_hash`
    CookieHash,
    /// `consistent_hash`
    ConsistentHash,
    /// `bounded_load`
    BoundedLoad,
    /// `maglev`
    Maglev,
    /// `rendezvous`
    Rendezvous,
}

impl PolicyKind {
    /// Every policy, in documentation order.
    pub const ALL: [PolicyKind; 13] = [
        PolicyKind::RoundRobin,
        PolicyKind::WeightedRoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastConnections,
        PolicyKind::LeastResponseTime,
        PolicyKind::PowerOfTwo,
        PolicyKind::IpHash,
        PolicyKind::HeaderHash,
        PolicyKind::CookieHash,
        PolicyKind::ConsistentHash,
        PolicyKind::BoundedLoad,
        PolicyKind::Maglev,
        PolicyKind::Rendezvous,
    ];

    /// The configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::WeightedRoundRobin => "weighted_round_robin",
            PolicyKind::Random => "random",
            PolicyKind::LeastConnections => "least_connections",
            PolicyKind::LeastResponseTime => "least_response_time",
            PolicyKind::PowerOfTwo => "power_of_two",
            PolicyKind::IpHash => "ip_hash",
            PolicyKind::HeaderHash => "header_hash",
            PolicyKind::CookieHash => "cookie_hash",
            PolicyKind::ConsistentHash => "consistent_hash",
            PolicyKind::BoundedLoad => "bounded_load",
            PolicyKind::Maglev => "maglev",
            PolicyKind::Rendezvous => "rendezvous",
        }
    }

    /// One line on when to use it.
    pub const fn summary(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "equal backends, short uniform requests",
            PolicyKind::WeightedRoundRobin => "backends of different sizes, uniform requests (NGINX smooth WRR)",
            PolicyKind::Random => "stateless spreading by weight; many proxies without coordination",
            PolicyKind::LeastConnections => "long or uneven requests such as LLM streams",
            PolicyKind::LeastResponseTime => "backends of uneven speed; avoids slow and failing ones (peak EWMA)",
            PolicyKind::PowerOfTwo => "the general default: near least-loaded at O(1), no herding across proxies",
            PolicyKind::IpHash => "stickiness by client address",
            PolicyKind::HeaderHash => "stickiness by a header such as a user or session id",
            PolicyKind::CookieHash => "stickiness by a cookie",
            PolicyKind::ConsistentHash => "caches keyed by request: few keys move when backends change",
            PolicyKind::BoundedLoad => "consistent hashing that never overloads a hot key's backend",
            PolicyKind::Maglev => "consistent hashing with O(1) lookup and even spread",
            PolicyKind::Rendezvous => "consistent hashing with minimal movement, small pools",
        }
    }

    fn names() -> String {
        PolicyKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        PolicyKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| PolicyError::UnknownPolicy(s.to_owned()))
    }
}

/// The load measure `power_of_two` compares its candidates by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    /// In-flight requests divided by effective weight.
    #[default]
    LeastRequest,
    /// Peak-EWMA latency x (in flight + 1), as in Finagle and Linkerd.
    PeakEwma,
}

/// Where the consistent-hashing policies take their key from.
///
/// The data plane extracts it and passes it as [`RequestFacts::hash_key`](crate::RequestFacts);
/// for `client_ip` the core uses the client address. A request without a key gets a random
/// one (so it is spread evenly), as HAProxy falls back to round robin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// The request path.
    Path,
    /// The value of a header.
    Header(String),
    /// The value of a cookie.
    Cookie(String),
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl FromStr for HashKey {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::UnknownKey(s.to_owned());
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            None if s == "path" => Ok(HashKey::Path),
            Some(("header", name)) if is_token(name) => Ok(HashKey::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if is_token(name) => Ok(HashKey::Cookie(name.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Path => f.write_str("path"),
            HashKey::Header(h) => write!(f, "header:{h}"),
            HashKey::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

impl Serialize for HashKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

fn default_choices() -> usize {
    DEFAULT_CHOICES
}
fn default_vnodes() -> u32 {
    DEFAULT_VNODES
}
fn default_epsilon() -> f64 {
    DEFAULT_EPSILON
}
fn default_table_size() -> u32 {
    DEFAULT_MAGLEV_TABLE_SIZE
}

/// A balancing policy with its options.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(remote = "Self", tag = "name", rename_all = "snake_case")]
pub enum Policy {
    /// Each endpoint in turn.
    RoundRobin,
    /// NGINX's smooth weighted round robin over effective weights.
    WeightedRoundRobin,
    /// Uniform, or weighted by effective weight when weights differ (alias method).
    Random,
    /// Fewest in-flight requests per unit of effective weight.
    LeastConnections,
    /// Lowest peak-EWMA cost over the whole pool.
    LeastResponseTime,
    /// The best of `choices` distinct random candidates.
    PowerOfTwo {
        /// How many candidates to sample (k).
        choices: usize,
        /// How candidates are compared.
        cost: Cost,
    },
    /// Client address hashed over a weighted table.
    IpHash,
    /// A header's value hashed over a weighted table.
    HeaderHash {
        /// The header name.
        header: String,
    },
    /// A cookie's value hashed over a weighted table.
    CookieHash {
        /// The cookie name.
        cookie: String,
    },
    /// A ketama ring with weighted virtual nodes.
    ConsistentHash {
        /// Where the key comes from.
        key: HashKey,
        /// Ring points per endpoint of average weight.
        vnodes: u32,
    },
    /// Consistent hashing with bounded loads.
    BoundedLoad {
        /// Where the key comes from.
        key: HashKey,
        /// Ring points per endpoint of average weight.
        vnodes: u32,
        /// Slack over the average load: no endpoint above ceil((1 + epsilon) x average).
        epsilon: f64,
    },
    /// Maglev hashing.
    Maglev {
        /// Where the key comes from.
        key: HashKey,
        /// Lookup table size, a prime well above the number of endpoints.
        table_size: u32,
    },
    /// Weighted rendezvous (highest random weight) hashing.
    Rendezvous {
        /// Where the key comes from.
        key: HashKey,
    },
}

/// The table form of a policy as written in a file. Unit variants are written `{}` so that
/// serde refuses options they do not take (it ignores extra fields of internally tagged unit
/// variants).
#[derive(Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
enum RawPolicy {
    RoundRobin {},
    WeightedRoundRobin {},
    Random {},
    LeastConnections {},
    LeastResponseTime {},
    PowerOfTwo {
        #[serde(default = "default_choices")]
        choices: usize,
        #[serde(default)]
        cost: Cost,
    },
    IpHash {},
    HeaderHash {
        header: String,
    },
    CookieHash {
        cookie: String,
    },
    ConsistentHash {
        #[serde(default)]
        key: HashKey,
        #[serde(default = "default_vnodes")]
        vnodes: u32,
    },
    BoundedLoad {
        #[serde(default)]
        key: HashKey,
        #[serde(default = "default_vnodes")]
        vnodes: u32,
        #[serde(default = "default_epsilon")]
        epsilon: f64,
    },
    Maglev {
        #[serde(default)]
        key: HashKey,
        #[serde(default = "default_table_size")]
        table_size: u32,
    },
    Rendezvous {
        #[serde(default)]
        key: HashKey,
    },
}

impl From<RawPolicy> for Policy {
    fn from(raw: RawPolicy) -> Policy {
        match raw {
            RawPolicy::RoundRobin {} => Policy::RoundRobin,
            RawPolicy::WeightedRoundRobin {} => Policy::WeightedRoundRobin,
            RawPolicy::Random {} => Policy::Random,
            RawPolicy::LeastConnections {} => Policy::LeastConnections,
            RawPolicy::LeastResponseTime {} => Policy::LeastResponseTime,
            RawPolicy::PowerOfTwo { choices, cost } => Policy::PowerOfTwo { choices, cost },
            RawPolicy::IpHash {} => Policy::IpHash,
            RawPolicy::HeaderHash { header } => Policy::HeaderHash { header },
            RawPolicy::CookieHash { cookie } => Policy::CookieHash { cookie },
            RawPolicy::ConsistentHash { key, vnodes } => Policy::ConsistentHash { key, vnodes },
            RawPolicy::BoundedLoad { key, vnodes, epsilon } => Policy::BoundedLoad { key, vnodes, epsilon },
            RawPolicy::Maglev { key, table_size } => Policy::Maglev { key, table_size },
            RawPolicy::Rendezvous { key } => Policy::Rendezvous { key },
        }
    }
}

/// Which request facts a policy needs, so the data plane extracts nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// The client address.
    pub client_ip: bool,
    /// A hash key from this source.
    pub key: Option<HashKey>,
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

// === impl Policy ===

impl Policy {
    /// The policy of that name with default options; `header_hash` and `cookie_hash` have no
    /// default and need their option.
    pub fn from_kind(kind: PolicyKind) -> Result<Policy, PolicyError> {
        Ok(match kind {
            PolicyKind::RoundRobin => Policy::RoundRobin,
            PolicyKind::WeightedRoundRobin => Policy::WeightedRoundRobin,
            PolicyKind::Random => Policy::Random,
            PolicyKind::LeastConnections => Policy::LeastConnections,
            PolicyKind::LeastResponseTime => Policy::LeastResponseTime,
            PolicyKind::PowerOfTwo => Policy::PowerOfTwo { choices: DEFAULT_CHOICES, cost: Cost::default() },
            PolicyKind::IpHash => Policy::IpHash,
            PolicyKind::HeaderHash => return Err(PolicyError::Missing { policy: kind.as_str(), option: "header" }),
            PolicyKind::CookieHash => return Err(PolicyError::Missing { policy: kind.as_str(), option: "cookie" }),
            PolicyKind::ConsistentHash => Policy::ConsistentHash { key: HashKey::default(), vnodes: DEFAULT_VNODES },
            PolicyKind::BoundedLoad => {
                Policy::BoundedLoad { key: HashKey::default(), vnodes: DEFAULT_VNODES, epsilon: DEFAULT_EPSILON }
            }
            PolicyKind::Maglev => Policy::Maglev { key: HashKey::default(), table_size: DEFAULT_MAGLEV_TABLE_SIZE },
            PolicyKind::Rendezvous => Policy::Rendezvous { key: HashKey::default() },
        })
    }

    /// The policy's name.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::RoundRobin => PolicyKind::RoundRobin,
            Policy::WeightedRoundRobin => PolicyKind::WeightedRoundRobin,
            Policy::Random => PolicyKind::Random,
            Policy::LeastConnections => PolicyKind::LeastConnections,
            Policy::LeastResponseTime => PolicyKind::LeastResponseTime,
            Policy::PowerOfTwo { .. } => PolicyKind::PowerOfTwo,
            Policy::IpHash => PolicyKind::IpHash,
            Policy::HeaderHash { .. } => PolicyKind::HeaderHash,
            Policy::CookieHash { .. } => PolicyKind::CookieHash,
            Policy::ConsistentHash { .. } => PolicyKind::ConsistentHash,
            Policy::BoundedLoad { .. } => PolicyKind::BoundedLoad,
            Policy::Maglev { .. } => PolicyKind::Maglev,
            Policy::Rendezvous { .. } => PolicyKind::Rendezvous,
        }
    }

    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let policy = self.kind().as_str();
        let invalid = |option, problem: String| Err(PolicyError::Invalid { policy, option, problem });
        match self {
            Policy::PowerOfTwo { choices, .. } if !(1..=MAX_CHOICES).contains(choices) => {
                invalid("choices", format!("must be between 1 and {MAX_CHOICES}, got {choices}"))
            }
            Policy::HeaderHash { header } if !is_token(header) => {
                invalid("header", format!("must be a header name, got {header:?}"))
            }
            Policy::CookieHash { cookie } if !is_token(cookie) => {
                invalid("cookie", format!("must be a cookie name, got {cookie:?}"))
            }
            Policy::ConsistentHash { vnodes, .. } | Policy::BoundedLoad { vnodes, .. }
                if !(1..=MAX_VNODES).contains(vnodes) =>
            {
                invalid("vnodes", format!("must be between 1 and {MAX_VNODES}, got {vnodes}"))
            }
            Policy::BoundedLoad { epsilon, .. } if !(epsilon.is_finite() && *epsilon > 0.0) => {
                invalid("epsilon", format!("must be a number above 0 (such as 0.25), got {epsilon}"))
            }
            Policy::Maglev { table_size, .. } if !is_prime(*table_size) || *table_size > MAX_MAGLEV_TABLE_SIZE => {
                invalid(
                    "table_size",
                    format!("must be a prime up to {MAX_MAGLEV_TABLE_SIZE} (such as 65537), got {table_size}"),
                )
            }
            _ => Ok(()),
        }
    }

    /// What the data plane must extract from a request for this policy.
    pub fn needs(&self) -> Needs {
        match self {
            Policy::IpHash => Needs { client_ip: true, key: None },
            Policy::HeaderHash { header } => {
                Needs { client_ip: false, key: Some(HashKey::Header(header.to_ascii_lowercase())) }
            }
            Policy::CookieHash { cookie } => Needs { client_ip: false, key: Some(HashKey::Cookie(cookie.clone())) },
            Policy::ConsistentHash { key, .. }
            | Policy::BoundedLoad { key, .. }
            | Policy::Maglev { key, .. }
            | Policy::Rendezvous { key } => match key {
                HashKey::ClientIp => Needs { client_ip: true, key: None },
                other => Needs { client_ip: false, key: Some(other.clone()) },
            },
            _ => Needs::default(),
        }
    }

    /// The key source of a hashing policy.
    pub(crate) fn hash_key(&self) -> Option<&HashKey> {
        match self {
            Policy::ConsistentHash { key, .. }
            | Policy::BoundedLoad { key, .. }
            | Policy::Maglev { key, .. }
            | Policy::Rendezvous { key } => Some(key),
            _ => None,
        }
    }
}

impl Default for Policy {
    /// `power_of_two` over least requests: the best general-purpose choice.
    fn default() -> Self {
        Policy::PowerOfTwo { choices: DEFAULT_CHOICES, cost: Cost::LeastRequest }
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Policy::from_kind(s.parse()?)
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Policy::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;

        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = Policy;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a policy name such as \"power_of_two\", or a table with `name` and options")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Policy, E> {
                s.parse().map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Policy, A::Error> {
                let policy: Policy = RawPolicy::deserialize(de::value::MapAccessDeserializer::new(map))?.into();
                policy.validate().map_err(de::Error::custom)?;
                Ok(policy)
            }
        }

        d.deserialize_any(PolicyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Pool {
        policy: Policy,
    }

    fn parse(s: &str) -> Result<Policy, String> {
        toml::from_str::<Pool>(s).map(|p| p.policy).map_err(|e| e.to_string())
    }

    #[test]
    fn every_name_parses_from_a_string() {
        for kind in PolicyKind::ALL {
            let policy = match kind {
                PolicyKind::HeaderHash => parse(r#"policy = { name = "header_hash", header = "x-user" }"#),
                PolicyKind::CookieHash => parse(r#"policy = { name = "cookie_hash", cookie = "sid" }"#),
                _ => parse(&format!("policy = \"{kind}\"")),
            };
            assert_eq!(policy.unwrap().kind(), kind);
        }
    }

    #[test]
    fn options_parse_and_round_trip() {
        let p = parse(r#"policy = { name = "maglev", table_size = 251, key = "header:X-User" }"#).unwrap();
        assert_eq!(p, Policy::Maglev { key: HashKey::Header("x-user".into()), table_size: 251 });
        let p = parse(r#"policy = { name = "power_of_two", choices = 3, cost = "peak_ewma" }"#).unwrap();
        assert_eq!(p, Policy::PowerOfTwo { choices: 3, cost: Cost::PeakEwma });
        #[derive(Serialize)]
        struct Out<'a> {
            policy: &'a Policy,
        }
        for policy in [p, Policy::RoundRobin, Policy::Rendezvous { key: HashKey::Cookie("sid".into()) }] {
            let text = toml::to_string(&Out { policy: &policy }).unwrap();
            assert_eq!(parse(&text).unwrap(), policy, "{text}");
        }
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = parse(r#"policy = "fastest""#).unwrap_err();
        assert!(e.contains("unknown policy `fastest`") && e.contains("round_robin"), "{e}");
        let e = parse(r#"policy = "header_hash""#).unwrap_err();
        assert!(e.contains("needs the option `header`"), "{e}");
        let e = parse(r#"policy = { name = "maglev", table_size = 65536 }"#).unwrap_err();
        assert!(e.contains("table_size") && e.contains("prime"), "{e}");
        let e = parse(r#"policy = { name = "bounded_load", epsilon = 0.0 }"#).unwrap_err();
        assert!(e.contains("epsilon"), "{e}");
        let e = parse(r#"policy = { name = "power_of_two", choices = 0 }"#).unwrap_err();
        assert!(e.contains("choices"), "{e}");
        let e = parse(r#"policy = { name = "round_robin", weight = 3 }"#).unwrap_err();
        assert!(e.contains("weight"), "{e}");
        let e = parse(r#"policy = { name = "rendezvous", key = "body" }"#).unwrap_err();
        assert!(e.contains("unknown hash key `body`"), "{e}");
    }

    #[test]
    fn needs_follow_the_key_source() {
        assert!(Policy::IpHash.needs().client_ip);
        assert_eq!(Policy::RoundRobin.needs(), Needs::default());
        let p = Policy::Rendezvous { key: HashKey::Cookie("sid".into()) };
        assert_eq!(p.needs().key, Some(HashKey::Cookie("sid".into())));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(2) && is_prime(251));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0));
    }
}
