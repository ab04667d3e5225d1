//! Options of the AI-aware policies: endpoint capacity and scorer weights.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::endpoint::Labels;

/// Default `prefix_affinity` slack over the mean load: 100%, far more than `bounded_load`'s
/// 25%, because a cache hit saves a whole prefill (measured best on bench/ai-routing).
pub const DEFAULT_PREFIX_EPSILON: f64 = 1.0;
/// Default `prefix_affinity` slack in tokens per unit of capacity, so that a lightly loaded
/// pool keeps affinity.
pub const DEFAULT_SLACK_TOKENS: u32 = 8_192;
/// Default shortest match (in blocks) worth following.
pub const DEFAULT_MIN_MATCH_BLOCKS: u32 = 2;
/// Default `score` saturation threshold on waiting requests (the Gateway API Inference
/// Extension's saturation detector uses 5).
pub const DEFAULT_MAX_WAITING: u32 = 5;
/// Default `score` saturation threshold on KV-cache use (the same detector uses 0.8).
pub const DEFAULT_MAX_KV_USAGE: f64 = 0.8;
/// Largest `cache_blocks`.
pub const MAX_CACHE_BLOCKS: u32 = 1 << 24;

/// How much work an endpoint takes, relative to the others: every load comparison of
/// `least_tokens`, `prefix_affinity` and `score` divides by it.
///
/// Written `capacity = "weight"` (the default), `capacity = "accelerator"` (the default
/// table, rough LLM serving throughput against an L4: b200 8, h200 5, h100 4, mi300x 4,
/// a100 2, tpu 2, l4 1, cpu 0.25) or a table of your own (`capacity = { h100 = 4, a10g = 1.5 }`).
/// An endpoint without an accelerator label uses its static weight; a label the table does
/// not know is a configuration error ([`Capacity::unknown`]). Either way the capacity is
/// multiplied by the endpoint's slow-start ramp. Dynamic weighting (the engine's KV-cache use)
/// does not apply: the in-flight tokens these policies compare already count that load.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Capacity {
    /// The static weight.
    #[default]
    Weight,
    /// By accelerator label (lower case), through this table.
    Accelerator(BTreeMap<String, f64>),
}

impl Capacity {
    /// The default accelerator table.
    pub fn accelerator_defaults() -> Capacity {
        Capacity::Accelerator(
            [
                ("b200", 8.0),
                ("h200", 5.0),
                ("h100", 4.0),
                ("mi300x", 4.0),
                ("a100", 2.0),
                ("tpu", 2.0),
                ("l4", 1.0),
                ("cpu", 0.25),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        )
    }

    /// The capacity of an endpoint with these labels and static weight, before the
    /// slow-start ramp.
    pub fn base(&self, labels: &Labels, weight: NonZeroU32) -> f64 {
        let table = match self {
            Capacity::Weight => None,
            Capacity::Accelerator(table) => {
                labels.accelerator.as_deref().and_then(|a| table.get(a).or_else(|| table.get(&a.to_ascii_lowercase())))
            }
        };
        table.copied().unwrap_or(f64::from(weight.get()))
    }

    /// For a table: the error for an accelerator label it does not know (case-insensitive),
    /// naming the label and the known ones.
    pub fn unknown(&self, accelerator: &str) -> Option<String> {
        let Capacity::Accelerator(table) = self else { return None };
        if table.contains_key(accelerator) || table.contains_key(&accelerator.to_ascii_lowercase()) {
            return None;
        }
        let known: Vec<&str> = table.keys().map(String::as_str).collect();
        Some(format!(
            "unknown accelerator `{accelerator}`: the capacity table knows {}; add it, as in capacity = {{ {accelerator} = 3 }}",
            known.join(", ")
        ))
    }

    pub(super) fn problem(&self) -> Option<String> {
        match self {
            Capacity::Weight => None,
            Capacity::Accelerator(table) => table
                .iter()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0))
                .map(|(k, v)| format!("`{k}` must be a number above 0, got {v}")),
        }
    }
}

impl Serialize for Capacity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Capacity::Weight => s.serialize_str("weight"),
            Capacity::Accelerator(table) => table.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CapacityVisitor;

        impl<'de> Visitor<'de> for CapacityVisitor {
            type Value = Capacity;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"weight\", \"accelerator\", or a table from accelerator to capacity")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Capacity, E> {
                match s {
                    "weight" => Ok(Capacity::Weight),
                    "accelerator" => Ok(Capacity::accelerator_defaults()),
                    other => Err(E::custom(format!(
                        "unknown capacity `{other}`; expected \"weight\", \"accelerator\" or a table such as {{ h100 = 4, l4 = 1 }}"
                    ))),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Capacity, A::Error> {
                let mut table = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, f64>()? {
                    table.insert(k.to_ascii_lowercase(), v);
                }
                Ok(Capacity::Accelerator(table))
            }
        }

        d.deserialize_any(CapacityVisitor)
    }
}

/// Weights of the `score` policy's scorers (each scorer gives 0 to 1, higher is better).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreWeights {
    /// Fewer requests waiting in the engine's queue (default 2).
    pub queue: f64,
    /// Less KV cache in use (default 2).
    pub kv_cache: f64,
    /// A longer prefix-cache match (default 3).
    pub prefix: f64,
    /// Fewer in-flight tokens per unit of capacity (default 1).
    pub load: f64,
    /// The requested LoRA adapter already loaded (default 1).
    pub lora: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights { queue: 2.0, kv_cache: 2.0, prefix: 3.0, load: 1.0, lora: 1.0 }
    }
}

impl ScoreWeights {
    pub(super) fn problem(&self) -> Option<String> {
        let all = [
            ("queue", self.queue),
            ("kv_cache", self.kv_cache),
            ("prefix", self.prefix),
            ("load", self.load),
            ("lora", self.lora),
        ];
        if let Some((name, w)) = all.iter().find(|(_, w)| !(w.is_finite() && *w >= 0.0)) {
            return Some(format!("`{name}` must be a number of at least 0, got {w}"));
        }
        (all.iter().map(|(_, w)| w).sum::<f64>() <= 0.0).then(|| "must not all be 0".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(acc: Option<&str>) -> Labels {
        Labels { accelerator: acc.map(str::to_owned), ..Labels::default() }
    }

    #[test]
    fn capacity_comes_from_the_table_or_the_weight() {
        let w3 = NonZeroU32::new(3).unwrap();
        assert_eq!(Capacity::Weight.base(&labels(Some("h100")), w3), 3.0);
        let table = Capacity::accelerator_defaults();
        assert_eq!(table.base(&labels(Some("h100")), w3), 4.0);
        assert_eq!(table.base(&labels(Some("H100")), w3), 4.0);
        assert_eq!(table.base(&labels(Some("cpu")), w3), 0.25);
        assert_eq!(table.base(&labels(Some("tpu")), w3), 2.0);
        // A label the table does not know (configuration refuses it; a discovered endpoint
        // can still carry one): the weight.
        assert_eq!(table.base(&labels(Some("h800")), w3), 3.0);
        assert!(table.unknown("h800").is_some_and(|e| e.contains("`h800`")));
        assert_eq!(table.unknown("H200"), None);
        assert_eq!(table.base(&labels(None), w3), 3.0);
        assert_eq!(table.problem(), None);
        let bad = Capacity::Accelerator([("l4".to_owned(), 0.0)].into_iter().collect());
        assert!(bad.problem().unwrap().contains("`l4`"));
    }

    #[test]
    fn weights_need_one_positive() {
        assert_eq!(ScoreWeights::default().problem(), None);
        let zero = ScoreWeights { queue: 0.0, kv_cache: 0.0, prefix: 0.0, load: 0.0, lora: 0.0 };
        assert!(zero.problem().is_some());
        assert!(ScoreWeights { load: -1.0, ..ScoreWeights::default() }.problem().unwrap().contains("load"));
    }
}
