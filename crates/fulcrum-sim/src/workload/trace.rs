//! Replaying a JSONL trace: one request per line, in arrival order.
//!
//! ```text
//! {"at": 0.125, "model": "llama", "input_tokens": 1200, "output_tokens": 180, "session": "u1", "hash_ids": [7, 8, 9]}
//! {"at": 0.250, "prompt": "You are a helpful assistant...", "output_tokens": 40}
//! ```
//!
//! - `at`: arrival, seconds from the start (non-decreasing; required);
//! - `model`: defaults to the workload's `model`;
//! - the prompt, one of: `prompt` (text, 4 characters a token, hashed as the proxy hashes it),
//!   `hash_ids` (one id per block of `block_tokens` tokens, as in the Mooncake traces: equal
//!   ids are equal blocks), or neither (a prompt shared with nothing);
//! - `input_tokens`: required unless `prompt` is given;
//! - `output_tokens`: required;
//! - `session`: any string or number; the hash key of sticky policies.
//!
//! A line that does not parse is an error naming the line and the field. Cost: the whole trace
//! is held in memory (about 100 bytes a request plus its text or ids).

use std::path::Path;
use std::sync::Arc;

use fulcrum_core::Instant;
use fulcrum_core::hash::{hash_bytes, mix};
use serde::Deserialize;

use super::{Content, SimRequest};
use crate::SimError;
use crate::fleet::Shape;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrace {
    pub(super) path: String,
    block_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    at: f64,
    model: Option<String>,
    prompt: Option<String>,
    hash_ids: Option<Vec<u64>>,
    input_tokens: Option<u32>,
    output_tokens: u32,
    session: Option<serde_json::Value>,
}

/// One request of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    at: Instant,
    model: Arc<str>,
    prompt_tokens: u32,
    output_tokens: u32,
    content: Content,
    session: u64,
}

/// A parsed trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Its requests, in arrival order.
    pub records: Vec<Record>,
}

impl Record {
    /// The request this record stands for.
    pub fn request(&self) -> SimRequest {
        SimRequest {
            at: self.at,
            model: self.model.clone(),
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            content: self.content.clone(),
            session: self.session,
        }
    }
}

impl Trace {
    pub(super) fn load(path: &Path, raw: &RawTrace, model: &Arc<str>) -> Result<Trace, SimError> {
        let block = raw.block_tokens.unwrap_or(16);
        if !(1..=65_536).contains(&block) {
            return Err(SimError::field("trace.block_tokens", format!("{block} is not in 1..=65536")));
        }
        let text = crate::read(path)?;
        Trace::parse(&text, block, model).map_err(|e| e.in_file(path))
    }

    /// Parses JSONL text; `block_tokens` is the size of a `hash_ids` block.
    pub fn parse(text: &str, block_tokens: u32, model: &Arc<str>) -> Result<Trace, SimError> {
        let mut records = Vec::new();
        let mut last = 0.0f64;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let at_line =
                |field: &str, message: String| SimError { file: None, line: Some(n), field: field.to_owned(), message };
            if line.trim().is_empty() {
                continue;
            }
            let r: RawRecord = serde_json::from_str(line).map_err(|e| at_line("", e.to_string()))?;
            if !(r.at.is_finite() && r.at >= 0.0 && r.at <= 1e9) {
                return Err(at_line("at", format!("{} is not a time in seconds (0 to 1e9)", r.at)));
            }
            if r.at < last {
                return Err(at_line("at", format!("{} is earlier than the line before ({last})", r.at)));
            }
            last = r.at;
            let model = r.model.map_or_else(|| model.clone(), Arc::from);
            let session = match &r.session {
                None => records.len() as u64,
                Some(serde_json::Value::String(s)) => hash_bytes(s.as_bytes(), 0x5345_5353),
                Some(serde_json::Value::Number(x)) => hash_bytes(x.to_string().as_bytes(), 0x5345_5353),
                Some(_) => return Err(at_line("session", "must be a string or a number".into())),
            };
            let (prompt_tokens, content) = match (r.prompt, r.hash_ids) {
                (Some(_), Some(_)) => return Err(at_line("prompt", "give `prompt` or `hash_ids`, not both".into())),
                (Some(p), None) => {
                    let tokens = u32::try_from(fulcrum_core::openai::text_tokens(&p)).unwrap_or(u32::MAX);
                    (r.input_tokens.unwrap_or(tokens), Content::Text(Arc::from(p)))
                }
                (None, ids) => {
                    let tokens = r.input_tokens.ok_or_else(|| at_line("input_tokens", "is required".into()))?;
                    let ids = ids.unwrap_or_default();
                    let mut segments: Vec<(u64, u32)> = Vec::with_capacity(ids.len() + 1);
                    let mut covered = 0u32;
                    for id in ids {
                        if covered >= tokens {
                            break;
                        }
                        let take = block_tokens.min(tokens - covered);
                        segments.push((mix(id, 0x4944), take));
                        covered += take;
                    }
                    if covered < tokens {
                        segments.push((mix(0x5441_494C, (records.len() as u64) << 1 | 1), tokens - covered));
                    }
                    (tokens, Content::Segments(segments))
                }
            };
            if prompt_tokens == 0 {
                return Err(at_line("input_tokens", "must be at least 1".into()));
            }
            records.push(Record {
                at: Instant::from_nanos((r.at * 1e9) as u64),
                model,
                prompt_tokens,
                output_tokens: r.output_tokens,
                content,
                session,
            });
        }
        if records.is_empty() {
            return Err(SimError::field("trace", "the trace has no requests"));
        }
        Ok(Trace { records })
    }

    /// Mean prompt and output tokens.
    pub fn shape(&self) -> Shape {
        let n = self.records.len().max(1) as f64;
        Shape {
            prompt_tokens: self.records.iter().map(|r| f64::from(r.prompt_tokens)).sum::<f64>() / n,
            output_tokens: self.records.iter().map(|r| f64::from(r.output_tokens)).sum::<f64>() / n,
        }
    }
}

/// Writes `requests` as JSONL trace lines, prompts as text ([`Content::text`]): what
/// `fulcrum simulate --emit-trace` writes, so that the simulator (reading it back with
/// [`Trace::parse`]) and a real run (replaying it over sockets) see the same bytes. Returns
/// the lines written.
pub fn write(requests: impl Iterator<Item = SimRequest>, out: &mut dyn std::io::Write) -> std::io::Result<u64> {
    let mut n = 0;
    for r in requests {
        let line = serde_json::json!({
            "at": r.at.as_nanos() as f64 / 1e9,
            "model": &*r.model,
            "prompt": r.content.text(),
            "input_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "session": format!("{:016x}", r.session),
        });
        writeln!(out, "{line}")?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_bad_lines_are_named() {
        let m: Arc<str> = Arc::from("m");
        let t = Trace::parse(
            "{\"at\": 0.5, \"input_tokens\": 40, \"output_tokens\": 3, \"hash_ids\": [1, 2], \"session\": \"a\"}\n\
             \n{\"at\": 1.0, \"prompt\": \"hello there, how are you?\", \"output_tokens\": 5}\n",
            16,
            &m,
        )
        .unwrap();
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.records[0].request().content.blocks("m", 16, 9).len(), 2);
        assert_eq!(t.records[1].prompt_tokens, 7);
        let err = |s: &str| Trace::parse(s, 16, &m).unwrap_err().to_string();
        assert!(err("{\"at\": 1, \"output_tokens\": 3}\n").contains("line 1: input_tokens"));
        assert!(err("{\"at\": 2, \"input_tokens\": 1, \"output_tokens\": 3}\n{\"at\": 1}").starts_with("line 2"));
        assert!(err("{\"at\": 2, \"input_tokens\": 1, \"output_tokens\": 3}\n{\"at\": 1, \"input_tokens\": 1, \"output_tokens\": 3}").contains("line 2: at"));
        assert!(err("not json").contains("line 1"));
    }

    #[test]
    fn written_traces_read_back_with_the_same_prompts_and_times() {
        let w = super::super::Workload::parse(
            "requests = 50\nmodel = \"m\"\n[arrival]\nrate = 20.0\n[prompts]\nkind = \"chat\"\nsystem_tokens = 100\nuser_tokens = 20\n",
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(write(w.generate(Some(20.0), 3), &mut out).unwrap(), 50);
        let back = Trace::parse(std::str::from_utf8(&out).unwrap(), 16, &Arc::from("m")).unwrap();
        let (mut seg, mut text) = (Vec::new(), Vec::new());
        for (a, b) in w.generate(Some(20.0), 3).zip(&back.records) {
            let b = b.request();
            assert_eq!((a.prompt_tokens, a.output_tokens), (b.prompt_tokens, b.output_tokens));
            assert!(a.at.as_nanos().abs_diff(b.at.as_nanos()) <= 1);
            assert_eq!(a.content.text(), b.content.text());
            assert_eq!(a.content.text().len(), 4 * a.prompt_tokens as usize);
            seg.push(a.content.engine_blocks("m", 16));
            text.push(b.content.engine_blocks("m", 16));
        }
        // Shared segments are shared text: every pair shares as many leading blocks either way.
        let shared = |x: &[u64], y: &[u64]| x.iter().zip(y).take_while(|(a, b)| a == b).count();
        let mut sharing = 0;
        for i in 0..seg.len() {
            for j in 0..i {
                assert_eq!(shared(&seg[i], &seg[j]), shared(&text[i], &text[j]), "requests {j} and {i}");
                sharing += usize::from(shared(&seg[i], &seg[j]) > 0);
            }
        }
        assert!(sharing > 0, "the chat workload shares prefixes");
    }
}
