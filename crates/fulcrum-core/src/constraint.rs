//! Resource constraints: what a task or a batch requires of the endpoint that runs it.
//!
//! A requirement names an endpoint label and a value, written as the user writes them in
//! `fulcrum batch --require` or a batch's `metadata`:
//!
//! | written | holds on an endpoint whose |
//! |---|---|
//! | `gpu=a100` (or `accelerator=a100`) | accelerator label is `a100` |
//! | `zone=us-east-1a` | zone label is `us-east-1a` |
//! | `model=llama-3-8b` | models list names it (an endpoint that lists no model serves any) |
//! | `gpu_memory_gb>=80` | label `gpu_memory_gb` is a number of at least 80 |
//! | `tier=batch` | label `tier` is `batch` |
//!
//! Several are separated by commas, and all must hold. Names and values are compared
//! exactly (case included).
//!
//! ```
//! use fulcrum_core::constraint::Requirements;
//! use fulcrum_core::Labels;
//!
//! let req = Requirements::parse("gpu=a100, gpu_memory_gb>=80").unwrap();
//! let mut labels = Labels { accelerator: Some("a100".into()), ..Labels::default() };
//! labels.other.insert("gpu_memory_gb".into(), "80".into());
//! assert!(req.admits(&labels));
//! labels.other.insert("gpu_memory_gb".into(), "40".into());
//! assert_eq!(req.missing(&labels).unwrap().to_string(), "gpu_memory_gb>=80");
//! ```

use std::fmt;

use crate::Labels;

/// At most this many requirements in one set (a client writes them).
pub const MAX_REQUIREMENTS: usize = 16;
/// At most this many bytes in one set's text.
pub const MAX_TEXT: usize = 1024;

/// One requirement.
#[derive(Clone, Debug, PartialEq)]
pub enum Requirement {
    /// A label equals a value (`gpu`, `zone`, `model` and any other label).
    Equals(String, String),
    /// A label is a number of at least this much.
    AtLeast(String, f64),
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::AtLeast(k, n) => write!(f, "{k}>={n}"),
        }
    }
}

impl Requirement {
    /// Whether an endpoint with these labels meets it.
    pub fn admits(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals(k, v) => match k.as_str() {
                "gpu" | "accelerator" => labels.accelerator.as_deref() == Some(v),
                "zone" => labels.zone.as_deref() == Some(v),
                "model" => labels.serves(v),
                other => labels.other.get(other) == Some(v),
            },
            Requirement::AtLeast(k, n) => {
                let value = match k.as_str() {
                    "gpu" | "accelerator" => labels.accelerator.as_deref(),
                    "zone" => labels.zone.as_deref(),
                    other => labels.other.get(other).map(String::as_str),
                };
                value.and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| v >= *n)
            }
        }
    }
}

/// Requirements that must all hold: empty admits every endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Requirements(Vec<Requirement>);

/// Why requirements could not be read; the message names the part at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("requirement `{part}`: {reason}")]
pub struct ParseError {
    /// The part of the text at fault.
    pub part: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Requirements {
    /// Reads `name=value` and `name>=number` parts separated by commas.
    pub fn parse(text: &str) -> Result<Requirements, ParseError> {
        let fail = |part: &str, reason| ParseError { part: part.chars().take(80).collect(), reason };
        if text.len() > MAX_TEXT {
            return Err(fail(text, "longer than 1024 bytes"));
        }
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once(">=") {
                let n = v.trim().parse::<f64>().ok().filter(|n| n.is_finite());
                let n = n.ok_or_else(|| fail(part, "`>=` needs a number after it"))?;
                Requirement::AtLeast(name(k).ok_or_else(|| fail(part, "bad label name"))?, n)
            } else if let Some((k, v)) = part.split_once('=') {
                let v = v.trim();
                if v.is_empty() {
                    return Err(fail(part, "the value is empty"));
                }
                Requirement::Equals(name(k).ok_or_else(|| fail(part, "bad label name"))?, v.to_owned())
            } else {
                return Err(fail(part, "expected `label=value` or `label>=number`"));
            };
            out.push(req);
        }
        if out.len() > MAX_REQUIREMENTS {
            return Err(fail(text, "more than 16 requirements"));
        }
        Ok(Requirements(out))
    }

    /// Every requirement of both.
    pub fn and(mut self, other: &Requirements) -> Requirements {
        self.0.extend(other.0.iter().cloned());
        self
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The requirements.
    pub fn iter(&self) -> impl Iterator<Item = &Requirement> {
        self.0.iter()
    }

    /// Whether an endpoint with these labels meets them all.
    pub fn admits(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| r.admits(labels))
    }

    /// The first requirement these labels do not meet.
    pub fn missing(&self, labels: &Labels) -> Option<&Requirement> {
        self.0.iter().find(|r| !r.admits(labels))
    }

    /// Why no endpoint of `labels` meets them, naming each requirement no endpoint meets (or,
    /// when each is met somewhere, that none meets them together); `None` when one does.
    pub fn unmet<'a>(&self, labels: impl Iterator<Item = &'a Labels> + Clone) -> Option<String> {
        if labels.clone().any(|l| self.admits(l)) {
            return None;
        }
        let alone: Vec<String> =
            self.0.iter().filter(|r| !labels.clone().any(|l| r.admits(l))).map(ToString::to_string).collect();
        Some(if alone.is_empty() {
            format!("no endpoint meets {self} together")
        } else {
            format!("no endpoint has {}", alone.join(", "))
        })
    }
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn name(k: &str) -> Option<String> {
    let k = k.trim();
    (!k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
        .then(|| k.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(gpu: &str, zone: &str, other: &[(&str, &str)]) -> Labels {
        Labels {
            models: vec!["llama".into()],
            accelerator: Some(gpu.into()),
            zone: Some(zone.into()),
            other: other.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn equals_and_at_least_on_typed_and_other_labels() {
        let l = labels("a100", "z1", &[("mem", "80"), ("tier", "batch")]);
        for ok in ["gpu=a100", "accelerator=a100", "zone=z1", "model=llama", "mem>=80", "mem>=79.5", "tier=batch", ""] {
            assert!(Requirements::parse(ok).unwrap().admits(&l), "{ok}");
        }
        for no in ["gpu=h100", "zone=z2", "model=mistral", "mem>=81", "tier=online", "missing=x", "tier>=1"] {
            assert!(!Requirements::parse(no).unwrap().admits(&l), "{no}");
        }
        let both = Requirements::parse(" gpu=a100 , mem>=40 ").unwrap();
        assert!(both.admits(&l));
        assert_eq!(both.to_string(), "gpu=a100,mem>=40");
    }

    #[test]
    fn bad_text_names_the_part() {
        let e = Requirements::parse("gpu=a100,memory").unwrap_err();
        assert_eq!(e.part, "memory");
        assert!(Requirements::parse("mem>=lots").unwrap_err().to_string().contains("number"));
        assert!(Requirements::parse("gpu=").is_err());
        assert!(Requirements::parse("=x").is_err());
        assert!(Requirements::parse(&"a=b,".repeat(17)).is_err());
        assert!(Requirements::parse(&"x".repeat(2000)).is_err());
    }

    #[test]
    fn unmet_names_what_no_endpoint_has() {
        let fleet = [labels("a100", "z1", &[]), labels("l4", "z2", &[])];
        let r = Requirements::parse("gpu=h100,zone=z1").unwrap();
        assert_eq!(r.unmet(fleet.iter()).unwrap(), "no endpoint has gpu=h100");
        let r = Requirements::parse("gpu=a100,zone=z2").unwrap();
        assert_eq!(r.unmet(fleet.iter()).unwrap(), "no endpoint meets gpu=a100,zone=z2 together");
        assert_eq!(Requirements::parse("gpu=l4").unwrap().unmet(fleet.iter()), None);
    }
}
