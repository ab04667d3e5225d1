//! Token estimates without a tokenizer, and the prompt blocks the prefix cache hashes.
//!
//! The mock has no vocabulary, so it estimates tokens from text, in one of two ways
//! ([`TokenEstimator`]):
//!
//! - `chars` (the default): one token per 4 characters (Unicode scalar values), the usual rule
//!   of thumb for English with BPE tokenizers; the last, shorter group counts as a token;
//! - `words`: one token per whitespace-separated word.
//!
//! Token boundaries also cut the prompt into blocks of `block_size` tokens. Each full block
//! gets a hash of its bytes chained to the hash of the block before it (the first one to a
//! root derived from the model name), like vLLM's block hashes: two prompts share the hash of
//! block *i* only if they agree on every token up to the end of block *i*. Token-id prompts
//! (`"prompt": [1, 2, 3]`) hash the ids themselves, one token each.
//!
//! Output text is drawn, one word a token, from a small fixed vocabulary, seeded per request.

use std::fmt;
use std::str::FromStr;

use fulcrum_core::hash::{hash_bytes, mix};

use crate::engine::Prompt;

/// How tokens are estimated from text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenEstimator {
    /// One token per 4 characters.
    #[default]
    Chars,
    /// One token per whitespace-separated word.
    Words,
}

/// Characters per token for [`TokenEstimator::Chars`].
pub const CHARS_PER_TOKEN: u32 = 4;

// === impl TokenEstimator ===

impl TokenEstimator {
    /// The name used on the command line and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenEstimator::Chars => "chars",
            TokenEstimator::Words => "words",
        }
    }

    /// Estimated tokens in `text`.
    pub fn count(self, text: &str) -> u32 {
        let n = match self {
            TokenEstimator::Chars => text.chars().count().div_ceil(CHARS_PER_TOKEN as usize),
            TokenEstimator::Words => text.split_whitespace().count(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The prompt `text` as the engine sees it: token count and chained block hashes.
    pub fn prompt(self, text: &str, block_size: u32, root: u64) -> Prompt {
        let mut blocks = BlockHasher::new(text.as_bytes(), block_size, root);
        match self {
            TokenEstimator::Chars => {
                let mut chars = 0u32;
                for (i, c) in text.char_indices() {
                    chars = chars.saturating_add(1);
                    if chars.is_multiple_of(CHARS_PER_TOKEN) {
                        blocks.token_ends_at(i + c.len_utf8());
                    }
                }
                if !chars.is_multiple_of(CHARS_PER_TOKEN) {
                    blocks.token_ends_at(text.len());
                }
            }
            TokenEstimator::Words => {
                let mut in_word = false;
                for (i, c) in text.char_indices() {
                    if c.is_whitespace() {
                        if in_word {
                            blocks.token_ends_at(i);
                        }
                        in_word = false;
                    } else {
                        in_word = true;
                    }
                }
                if in_word {
                    blocks.token_ends_at(text.len());
                }
            }
        }
        blocks.finish()
    }
}

impl fmt::Display for TokenEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown estimator name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown tokenizer {0:?}: expected chars or words")]
pub struct UnknownEstimator(pub String);

impl FromStr for TokenEstimator {
    type Err = UnknownEstimator;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "chars" => Ok(TokenEstimator::Chars),
            "words" => Ok(TokenEstimator::Words),
            _ => Err(UnknownEstimator(s.to_owned())),
        }
    }
}

/// The prompt of a request given as token ids: one token per id.
pub fn prompt_from_ids(ids: &[u32], block_size: u32, root: u64) -> Prompt {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    let mut blocks = BlockHasher::new(&bytes, block_size, root);
    for i in 1..=ids.len() {
        blocks.token_ends_at(i * 4);
    }
    blocks.finish()
}

/// The root of a model's hash chains: prompts for different models (or LoRA adapters) never
/// share cached blocks.
pub fn root_hash(model: &str) -> u64 {
    hash_bytes(model.as_bytes(), 0x626c_6f63_6b73)
}

/// Cuts a byte string into blocks at token ends and hashes each full block, chained.
struct BlockHasher<'a> {
    bytes: &'a [u8],
    block_size: u32,
    tokens: u32,
    block_start: usize,
    prev: u64,
    hashes: Vec<u64>,
}

impl<'a> BlockHasher<'a> {
    fn new(bytes: &'a [u8], block_size: u32, root: u64) -> Self {
        BlockHasher { bytes, block_size: block_size.max(1), tokens: 0, block_start: 0, prev: root, hashes: Vec::new() }
    }

    fn token_ends_at(&mut self, end: usize) {
        self.tokens = self.tokens.saturating_add(1);
        if self.tokens.is_multiple_of(self.block_size) {
            let block = self.bytes.get(self.block_start..end).unwrap_or_default();
            self.prev = hash_bytes(block, self.prev);
            self.hashes.push(self.prev);
            self.block_start = end;
        }
    }

    fn finish(self) -> Prompt {
        Prompt { tokens: self.tokens, block_hashes: self.hashes }
    }
}

const VOCABULARY: [&str; 64] = [
    " the",
    " a",
    " model",
    " token",
    " server",
    " batch",
    " cache",
    " prefix",
    " request",
    " stream",
    " latency",
    " load",
    " balance",
    " queue",
    " fleet",
    " route",
    " answer",
    " of",
    " to",
    " and",
    " in",
    " is",
    " for",
    " with",
    " on",
    " that",
    " this",
    " fast",
    " slow",
    " more",
    " less",
    " each",
    " every",
    " one",
    " two",
    " many",
    " GPU",
    " memory",
    " block",
    " time",
    " first",
    " next",
    " last",
    " word",
    " text",
    " reply",
    " simulated",
    " mock",
    " engine",
    " decode",
    " prefill",
    " slot",
    " waits",
    " runs",
    " ends",
    " starts",
    ",",
    ".",
    " Fulcrum",
    " picks",
    " best",
    " backend",
    " again",
    " here",
];

/// The text of output token `index` of the request seeded with `seed`. Plain ASCII without
/// quotes or backslashes, so it needs no escaping in JSON.
pub fn token_text(seed: u64, index: u32) -> &'static str {
    VOCABULARY[(mix(seed, u64::from(index)) % VOCABULARY.len() as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_documented_rules() {
        assert_eq!(TokenEstimator::Chars.count(""), 0);
        assert_eq!(TokenEstimator::Chars.count("abcd"), 1);
        assert_eq!(TokenEstimator::Chars.count("abcde"), 2);
        assert_eq!(TokenEstimator::Chars.count("ééééé"), 2, "characters, not bytes");
        assert_eq!(TokenEstimator::Words.count("  hello   big\tworld \n"), 3);
        for text in ["", "a", "hello world, this is a prompt", "ééé é", "x\u{00a0}y"] {
            for est in [TokenEstimator::Chars, TokenEstimator::Words] {
                assert_eq!(est.prompt(text, 2, 0).tokens, est.count(text), "{est} {text:?}");
            }
        }
    }

    #[test]
    fn equal_prefixes_share_block_hashes() {
        let base = "x".repeat(64 * 3); // 48 tokens = 3 blocks of 16
        let a = TokenEstimator::Chars.prompt(&format!("{base}tail one"), 16, 1);
        let b = TokenEstimator::Chars.prompt(&format!("{base}another tail"), 16, 1);
        assert_eq!(a.block_hashes.len(), 3);
        assert_eq!(a.block_hashes, b.block_hashes);
        let c = TokenEstimator::Chars.prompt(&format!("y{}", &base[1..]), 16, 1);
        assert!(c.block_hashes.iter().zip(&a.block_hashes).all(|(x, y)| x != y), "chained: one change moves all");
        let d = TokenEstimator::Chars.prompt(&base, 16, 2);
        assert_ne!(d.block_hashes[0], a.block_hashes[0], "the root separates models");
    }

    #[test]
    fn words_blocks_cut_at_word_ends() {
        let text = "one two three four five six seven";
        let p = TokenEstimator::Words.prompt(text, 3, 0);
        assert_eq!((p.tokens, p.block_hashes.len()), (7, 2));
        let q = TokenEstimator::Words.prompt("one two three four five six other", 3, 0);
        assert_eq!(p.block_hashes, q.block_hashes);
    }

    #[test]
    fn id_prompts_hash_ids() {
        let ids: Vec<u32> = (0..40).collect();
        let p = prompt_from_ids(&ids, 16, 0);
        assert_eq!((p.tokens, p.block_hashes.len()), (40, 2));
        assert_eq!(prompt_from_ids(&ids[..32], 16, 0).block_hashes, p.block_hashes);
    }

    #[test]
    fn output_text_is_seeded_and_json_safe() {
        assert_eq!(token_text(3, 9), token_text(3, 9));
        let words: std::collections::HashSet<_> = (0..200).map(|i| token_text(3, i)).collect();
        assert!(words.len() > 20);
        assert!(VOCABULARY.iter().all(|w| w.bytes().all(|b| b.is_ascii_graphic() || b == b' ') && !w.contains('"')));
    }
}
