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

mod ai;

pub use crate::prefix::DEFAULT_CACHE_BLOCKS;
pub use ai::{
    Capacity, DEFAULT_MAX_KV_USAGE, DEFAULT_MAX_WAITING, DEFAULT_MIN_MATCH_BLOCKS, DEFAULT_PREFIX_EPSILON,
    DEFAULT_SLACK_TOKENS, MAX_CACHE_BLOCKS, ScoreWeights,
};

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
    /// `least_tokens`
    LeastTokens,
    /// `prefix_affinity`
    PrefixAffinity,
    /// `score`
    Score,
    /// `predicted_ttft`
    PredictedTtft,
}

impl PolicyKind {
    /// Every policy, in documentation order.
    pub const ALL: [PolicyKind; 17] = [
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
        PolicyKind::LeastTokens,
        PolicyKind::PrefixAffinity,
        PolicyKind::Score,
        PolicyKind::PredictedTtft,
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
            PolicyKind::LeastTokens => "least_tokens",
            PolicyKind::PrefixAffinity => "prefix_affinity",
            PolicyKind::Score => "score",
            PolicyKind::PredictedTtft => "predicted_ttft",
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
            PolicyKind::LeastTokens => {
                "LLM requests of uneven size: fewest estimated tokens in flight per unit of capacity"
            }
            PolicyKind::PrefixAffinity => {
                "LLM prompts that share prefixes: the endpoint holding the longest cached prefix, within a load bound"
            }
            PolicyKind::Score => {
                "LLM fleets with engine metrics: weighted queue, KV-cache, prefix and load scores (llm-d style)"
            }
            PolicyKind::PredictedTtft => {
                "LLM fleets (the default for OpenAI pools): the lowest predicted time to first token, speeds learned"
            }
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
fn default_cache_blocks() -> u32 {
    DEFAULT_CACHE_BLOCKS
}
fn default_min_match_blocks() -> u32 {
    DEFAULT_MIN_MATCH_BLOCKS
}
fn default_prefix_epsilon() -> f64 {
    DEFAULT_PREFIX_EPSILON
}
fn default_slack_tokens() -> u32 {
    DEFAULT_SLACK_TOKENS
}
fn default_max_waiting() -> u32 {
    DEFAULT_MAX_WAITING
}
fn default_max_kv_usage() -> f64 {
    DEFAULT_MAX_KV_USAGE
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
    /// Fewest estimated tokens in flight per unit of capacity.
    LeastTokens {
        /// How capacity is found.
        capacity: Capacity,
    },
    /// The endpoint holding the longest cached prefix, among those under a load bound.
    PrefixAffinity {
        /// Blocks remembered per endpoint unless the engine reports its own size.
        cache_blocks: u32,
        /// A shorter match goes to the least loaded endpoint.
        min_match_blocks: u32,
        /// Slack over the mean load (in-flight tokens per unit of capacity).
        epsilon: f64,
        /// Further slack, in tokens per unit of capacity.
        slack_tokens: u32,
        /// How capacity is found.
        capacity: Capacity,
    },
    /// The lowest predicted time to first token: queueing plus uncached prefill at each
    /// endpoint's learned speed.
    PredictedTtft {
        /// Blocks remembered per endpoint unless the engine reports its own size.
        cache_blocks: u32,
    },
    /// Weighted scorers over engine metrics, prefix matches and load.
    Score {
        /// The scorers' weights.
        weights: ScoreWeights,
        /// Endpoints with at least this many requests waiting are saturated.
        max_waiting: u32,
        /// Endpoints with at least this KV-cache use (0 to 1) are saturated.
        max_kv_usage: f64,
        /// Blocks remembered per endpoint unless the engine reports its own size.
        cache_blocks: u32,
        /// How capacity is found.
        capacity: Capacity,
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
    LeastTokens {
        #[serde(default)]
        capacity: Capacity,
    },
    PrefixAffinity {
        #[serde(default = "default_cache_blocks")]
        cache_blocks: u32,
        #[serde(default = "default_min_match_blocks")]
        min_match_blocks: u32,
        #[serde(default = "default_prefix_epsilon")]
        epsilon: f64,
        #[serde(default = "default_slack_tokens")]
        slack_tokens: u32,
        #[serde(default)]
        capacity: Capacity,
    },
    PredictedTtft {
        #[serde(default = "default_cache_blocks")]
        cache_blocks: u32,
    },
    Score {
        #[serde(default)]
        weights: ScoreWeights,
        #[serde(default = "default_max_waiting")]
        max_waiting: u32,
        #[serde(default = "default_max_kv_usage")]
        max_kv_usage: f64,
        #[serde(default = "default_cache_blocks")]
        cache_blocks: u32,
        #[serde(default)]
        capacity: Capacity,
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
            RawPolicy::LeastTokens { capacity } => Policy::LeastTokens { capacity },
            RawPolicy::PredictedTtft { cache_blocks } => Policy::PredictedTtft { cache_blocks },
            RawPolicy::PrefixAffinity { cache_blocks, min_match_blocks, epsilon, slack_tokens, capacity } => {
                Policy::PrefixAffinity { cache_blocks, min_match_blocks, epsilon, slack_tokens, capacity }
            }
            RawPolicy::Score { weights, max_waiting, max_kv_usage, cache_blocks, capacity } => {
                Policy::Score { weights, max_waiting, max_kv_usage, cache_blocks, capacity }
            }
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
    /// The request body, parsed with [`openai::parse`](crate::openai::parse): model, token
    /// estimate and prefix hashes ([`AiRequest::facts`](crate::openai::AiRequest::facts)).
    pub body: bool,
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
            PolicyKind::LeastTokens => Policy::LeastTokens { capacity: Capacity::default() },
            PolicyKind::PrefixAffinity => Policy::PrefixAffinity {
                cache_blocks: DEFAULT_CACHE_BLOCKS,
                min_match_blocks: DEFAULT_MIN_MATCH_BLOCKS,
                epsilon: DEFAULT_PREFIX_EPSILON,
                slack_tokens: DEFAULT_SLACK_TOKENS,
                capacity: Capacity::default(),
            },
            PolicyKind::PredictedTtft => Policy::PredictedTtft { cache_blocks: DEFAULT_CACHE_BLOCKS },
            PolicyKind::Score => Policy::Score {
                weights: ScoreWeights::default(),
                max_waiting: DEFAULT_MAX_WAITING,
                max_kv_usage: DEFAULT_MAX_KV_USAGE,
                cache_blocks: DEFAULT_CACHE_BLOCKS,
                capacity: Capacity::default(),
            },
        })
    }

    /// How the policy finds each endpoint's capacity, for the policies that have the option.
    pub fn capacity(&self) -> Option<&Capacity> {
        match self {
            Policy::LeastTokens { capacity, .. }
            | Policy::PrefixAffinity { capacity, .. }
            | Policy::Score { capacity, .. } => Some(capacity),
            _ => None,
        }
    }

    /// Whether the policy's picks read the endpoints' learned performance
    /// ([`perf`](crate::endpoint::perf)): `predicted_ttft`, and the load-aware policies that
    /// divide load by capacity (`least_connections`, `power_of_two` with least request,
    /// `bounded_load`).
    pub fn reads_learned_speed(&self) -> bool {
        matches!(
            self,
            Policy::PredictedTtft { .. }
                | Policy::LeastConnections
                | Policy::PowerOfTwo { cost: Cost::LeastRequest, .. }
                | Policy::BoundedLoad { .. }
        )
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
            Policy::LeastTokens { .. } => PolicyKind::LeastTokens,
            Policy::PrefixAffinity { .. } => PolicyKind::PrefixAffinity,
            Policy::Score { .. } => PolicyKind::Score,
            Policy::PredictedTtft { .. } => PolicyKind::PredictedTtft,
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
            Policy::PrefixAffinity { cache_blocks, .. }
            | Policy::Score { cache_blocks, .. }
            | Policy::PredictedTtft { cache_blocks }
                if !(1..=MAX_CACHE_BLOCKS).contains(cache_blocks) =>
            {
                invalid("cache_blocks", format!("must be between 1 and {MAX_CACHE_BLOCKS}, got {cache_blocks}"))
            }
            Policy::PrefixAffinity { min_match_blocks: 0, .. } => {
                invalid("min_match_blocks", "must be at least 1, got 0".to_owned())
            }
            Policy::PrefixAffinity { epsilon, .. } if !(epsilon.is_finite() && *epsilon >= 0.0) => {
                invalid("epsilon", format!("must be a number of at least 0 (such as 0.5), got {epsilon}"))
            }
            Policy::Score { max_waiting: 0, .. } => invalid("max_waiting", "must be at least 1, got 0".to_owned()),
            Policy::Score { max_kv_usage, .. } if !(*max_kv_usage > 0.0 && *max_kv_usage <= 1.0) => {
                invalid("max_kv_usage", format!("must be above 0 and at most 1 (such as 0.8), got {max_kv_usage}"))
            }
            Policy::Score { weights, .. } if weights.problem().is_some() => {
                invalid("weights", weights.problem().unwrap_or_default())
            }
            Policy::LeastTokens { capacity }
            | Policy::PrefixAffinity { capacity, .. }
            | Policy::Score { capacity, .. }
                if capacity.problem().is_some() =>
            {
                invalid("capacity", capacity.problem().unwrap_or_default())
            }
            _ => Ok(()),
        }
    }

    /// What the data plane must extract from a request for this policy.
    pub fn needs(&self) -> Needs {
        match self {
            Policy::IpHash => Needs { client_ip: true, ..Needs::default() },
            Policy::HeaderHash { header } => {
                Needs { key: Some(HashKey::Header(header.to_ascii_lowercase())), ..Needs::default() }
            }
            Policy::CookieHash { cookie } => Needs { key: Some(HashKey::Cookie(cookie.clone())), ..Needs::default() },
            Policy::ConsistentHash { key, .. }
            | Policy::BoundedLoad { key, .. }
            | Policy::Maglev { key, .. }
            | Policy::Rendezvous { key } => match key {
                HashKey::ClientIp => Needs { client_ip: true, ..Needs::default() },
                other => Needs { key: Some(other.clone()), ..Needs::default() },
            },
            Policy::LeastTokens { .. }
            | Policy::PrefixAffinity { .. }
            | Policy::Score { .. }
            | Policy::PredictedTtft { .. } => Needs { body: true, ..Needs::default() },
            _ => Needs::default(),
        }
    }

    /// The default per-endpoint capacity of the prefix index, for the policies that use one.
    pub(crate) fn cache_blocks(&self) -> Option<u32> {
        match self {
            Policy::PrefixAffinity { cache_blocks, .. }
            | Policy::Score { cache_blocks, .. }
            | Policy::PredictedTtft { cache_blocks } => Some(*cache_blocks),
            _ => None,
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
mod tests;
