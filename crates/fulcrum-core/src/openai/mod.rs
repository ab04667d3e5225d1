//! Request facts for AI routes: the parts of an OpenAI request body a policy looks at.
//!
//! [`parse`] reads a chat completions (`messages`), completions (`prompt`) or embeddings
//! (`input`) body and returns an [`AiRequest`]: the model, every message in order (role and
//! text: `content` may be a string or a list of parts, of which `text` parts count), the
//! prompts or inputs (strings, or token-id arrays), `max_completion_tokens` / `max_tokens`,
//! `stream`, `user`, token estimates, and the chained hashes of the prompt's leading blocks
//! that prefix-cache-aware policies match on. [`AiRequest::facts`] turns it into
//! [`RequestFacts`].
//!
//! **Token estimates.** There is no tokenizer: a prompt counts one token per
//! [`CHARS_PER_TOKEN`] (4) characters (Unicode scalar values), rounded up, the usual rule of
//! thumb for English with BPE tokenizers and the same rule as `fulcrum mock-backend`. A chat
//! counts the text the engine is given, rendered like the mock renders it:
//! `<|role|>\n` + content + `\n` for each message, then `<|assistant|>\n`. A token-id prompt
//! counts its ids. The output estimate is `max_completion_tokens`, else `max_tokens`, else
//! [`Limits::default_output_tokens`]; embeddings produce none.
//!
//! **Prefix blocks.** The rendered chat (every message with its role, in order: not only the
//! first message, which is a known weakness of some routers), or the first prompt of a
//! completion or embedding, is cut into blocks of [`Limits::block_chars`] characters (256 by
//! default: 64 tokens of 4 characters). Only full blocks are hashed, as an engine caches only
//! full blocks, and at most [`Limits::max_blocks`]. Block *i*'s hash is
//! `xxh3(block i's bytes, seed = hash of block i-1)`, and block 0's seed is the hash of the
//! model name, as vLLM chains its block hashes: two requests share block *i*'s hash only if
//! they name the same model (or adapter) and agree on every character up to the end of block
//! *i*. Token-id prompts are cut into blocks of `block_chars / 4` ids, hashed as little-endian
//! `u32`s in a separate domain.
//!
//! **Bounds and cost.** A body larger than [`Limits::max_body_bytes`], with more than
//! [`Limits::max_messages`] messages or more than [`Limits::max_inputs`] prompts is refused
//! with a typed [`ParseError`]; nothing panics on any input (a fuzz target can call [`parse`]
//! directly). Strings without escapes are borrowed from the body, not copied. Cost is linear in
//! the body: serde_json's scan, one copy of a chat's text into the rendered prompt, a character
//! count, and one XXH3 pass over the hashed blocks (a 200 KB chat takes tens of microseconds;
//! see `benches/pick.rs`).
//!
//! ```
//! use fulcrum_core::openai::{parse, ApiKind, Limits};
//! let body = br#"{"model": "llama", "max_tokens": 100, "stream": true,
//!     "messages": [{"role": "system", "content": "You are terse."},
//!                  {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]}"#;
//! let req = parse(body, &Limits::default()).unwrap();
//! assert_eq!(req.kind, ApiKind::Chat);
//! assert_eq!(req.messages[1].content.to_text(), "Hello");
//! // "<|system|>\nYou are terse.\n<|user|>\nHello\n<|assistant|>\n" is 54 characters.
//! assert_eq!(req.prompt_tokens, 14);
//! assert_eq!(req.facts().estimated_tokens, 114);
//! assert!(req.prefix.is_empty()); // shorter than one 256-character block
//! ```

use std::borrow::Cow;
use std::num::NonZeroU32;

use serde::de::DeserializeSeed;

use crate::facts::RequestFacts;

mod blocks;
mod de;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod path_tests {
    #[test]
    fn inference_paths_are_recognised() {
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/openai/v1/chat/completions/",
        ] {
            assert!(super::is_inference_path(p), "{p}");
        }
        for p in ["/", "/v1/models", "/v1/files", "/admin/completions/x", "/v1/batches"] {
            assert!(!super::is_inference_path(p), "{p}");
        }
    }
}
mod text;

pub use blocks::{model_seed, text_prefix, token_prefix};
pub use text::JsonText;

/// Characters a token is estimated at.
pub const CHARS_PER_TOKEN: u32 = 4;

/// Bounds and settings of [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted (default 4 MiB, the proxy's default `max_body_bytes`).
    pub max_body_bytes: usize,
    /// Most chat messages (default 4,096).
    pub max_messages: usize,
    /// Most prompts or inputs in one completions or embeddings request (default 2,048,
    /// OpenAI's limit for embeddings).
    pub max_inputs: usize,
    /// Characters a prefix block holds (default 256: 64 tokens of 4 characters).
    pub block_chars: NonZeroU32,
    /// Most prefix blocks hashed (default 2,048: the first 512 Ki characters).
    pub max_blocks: usize,
    /// Output tokens assumed when the request sets no `max_tokens` (default 256).
    pub default_output_tokens: u64,
}

/// The most output tokens a request's estimate counts (a million: beyond any context window).
pub const MAX_OUTPUT_TOKENS: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_messages: 4_096,
            max_inputs: 2_048,
            block_chars: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
            max_blocks: 2_048,
            default_output_tokens: 256,
        }
    }
}

impl Limits {
    /// How many prefix blocks of this size an engine's KV cache holds: `num_gpu_blocks`
    /// blocks of `engine_block_size` tokens (vLLM's `cache_config_info` labels), at
    /// [`CHARS_PER_TOKEN`] characters a token. Feed it to
    /// [`Selector::set_prefix_capacity`](crate::Selector::set_prefix_capacity).
    pub fn cache_blocks_for_engine(&self, num_gpu_blocks: u64, engine_block_size: u32) -> u32 {
        let chars = u128::from(num_gpu_blocks) * u128::from(engine_block_size) * u128::from(CHARS_PER_TOKEN);
        u32::try_from(chars / u128::from(self.block_chars.get())).unwrap_or(u32::MAX)
    }
}

/// Which API a body is for, from the field that carries its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/chat/completions`: `messages`.
    Chat,
    /// `/v1/completions`: `prompt`.
    Completion,
    /// `/v1/embeddings`: `input`.
    Embedding,
}

/// One chat message: its role and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// `system`, `user`, `assistant`, `tool`... (empty when absent).
    pub role: Cow<'a, str>,
    /// The text: the string content, or the `text` parts of a list in order (empty for
    /// `null` content, such as an assistant message with only tool calls). Decoded on
    /// demand: [`JsonText::to_text`].
    pub content: JsonText<'a>,
}

/// One prompt of a completions request, or one input of an embeddings request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptInput<'a> {
    /// Text, decoded on demand ([`JsonText::to_text`]).
    Text(JsonText<'a>),
    /// Token ids (ids above `u32::MAX` are saturated).
    Tokens(Vec<u32>),
}

/// What a policy may know about an OpenAI request. Strings borrow from the body when they
/// have no JSON escapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AiRequest<'a> {
    /// The API, from the prompt's field.
    pub kind: ApiKind,
    /// The `model` field (a base model or a LoRA adapter name).
    pub model: Option<Cow<'a, str>>,
    /// The chat messages in order (chat only).
    pub messages: Vec<Message<'a>>,
    /// The prompts (completions) or inputs (embeddings).
    pub prompts: Vec<PromptInput<'a>>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `stream`.
    pub stream: bool,
    /// `user`.
    pub user: Option<Cow<'a, str>>,
    /// Estimated prompt tokens (all prompts of a batch).
    pub prompt_tokens: u64,
    /// Estimated output tokens.
    pub output_tokens: u64,
    /// Chained hashes of the prompt's full leading blocks.
    pub prefix: Vec<u64>,
}

impl AiRequest<'_> {
    /// Prompt and output estimates together: what counts in flight.
    pub fn estimated_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.output_tokens)
    }

    /// The facts a policy reads: model, prefix hashes and token estimate. The data plane
    /// adds the client address and hash key: `RequestFacts { client, ..req.facts() }`.
    pub fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            model: self.model.as_deref(),
            prefix: &self.prefix,
            estimated_tokens: self.estimated_tokens(),
            prompt_tokens: self.prompt_tokens,
            stream: self.stream,
            unbounded_output: !self.stream && self.max_tokens.is_none() && self.kind != ApiKind::Embedding,
            ..RequestFacts::default()
        }
    }
}

/// Why a body was not understood.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is larger than the limit.
    #[error("request body of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not JSON, not an object, or a field has the wrong type.
    #[error("request body is not a valid OpenAI request: {0}")]
    Json(#[source] serde_json::Error),
    /// More messages than the limit.
    #[error("more than {max} messages")]
    TooManyMessages {
        /// The limit.
        max: usize,
    },
    /// More prompts or inputs than the limit.
    #[error("more than {max} prompts or inputs")]
    TooManyInputs {
        /// The limit.
        max: usize,
    },
    /// None of `messages`, `prompt` and `input` is present.
    #[error("request body has none of `messages`, `prompt` or `input`")]
    NoPrompt,
}

impl ParseError {
    /// Whether a configured limit (body size, messages, inputs) refused the body, as opposed
    /// to a body that is not an OpenAI request at all.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ParseError::TooLarge { .. } | ParseError::TooManyMessages { .. } | ParseError::TooManyInputs { .. }
        )
    }
}

/// Whether a request path is an OpenAI-compatible inference call (chat completions,
/// completions, embeddings, responses), with or without a `/v1` or other prefix. Such a POST
/// is safe to send again before any response byte: it changes nothing on the server. The
/// proxy retries it on any route, without the route being marked `inference`.
pub fn is_inference_path(path: &str) -> bool {
    const ENDINGS: [&str; 4] = ["/chat/completions", "/completions", "/embeddings", "/responses"];
    let path = path.trim_end_matches('/');
    path.len() <= 256 && ENDINGS.iter().any(|e| path.ends_with(e))
}

/// Parses an OpenAI chat completions, completions or embeddings body. Never panics.
///
/// A body with `messages` is a chat, else one with `prompt` a completion, else one with
/// `input` an embedding; other fields are skipped.
pub fn parse<'a>(body: &'a [u8], limits: &Limits) -> Result<AiRequest<'a>, ParseError> {
    if body.len() > limits.max_body_bytes {
        return Err(ParseError::TooLarge { size: body.len(), max: limits.max_body_bytes });
    }
    let ctx = de::Ctx::new(limits.max_messages, limits.max_inputs);
    let mut json = serde_json::Deserializer::from_slice(body);
    let raw =
        de::BodySeed(&ctx).deserialize(&mut json).and_then(|raw| json.end().map(|()| raw)).map_err(|e| {
            match ctx.overflow() {
                Some(de::Overflow::Messages) => ParseError::TooManyMessages { max: limits.max_messages },
                Some(de::Overflow::Inputs) => ParseError::TooManyInputs { max: limits.max_inputs },
                None => ParseError::Json(e),
            }
        })?;
    let model = raw.model;
    let seed = model_seed(model.as_deref().unwrap_or(""));
    let block_chars = limits.block_chars.get() as usize;
    let mut prefix = Vec::new();
    let (kind, messages, prompts, prompt_tokens) = if let Some(messages) = raw.messages {
        let mut w = blocks::BlockWriter::new(seed, block_chars, limits.max_blocks, &mut prefix);
        render_chat_into(&messages, |piece| w.push(piece));
        let chars = w.finish();
        (ApiKind::Chat, messages, Vec::new(), chars.div_ceil(u64::from(CHARS_PER_TOKEN)))
    } else {
        let (kind, prompts) = match (raw.prompt, raw.input) {
            (Some(p), _) => (ApiKind::Completion, p),
            (None, Some(i)) => (ApiKind::Embedding, i),
            (None, None) => return Err(ParseError::NoPrompt),
        };
        let mut tokens = 0u64;
        for (i, p) in prompts.iter().enumerate() {
            // The first prompt is hashed; a batch's others are only counted.
            tokens = tokens.saturating_add(match p {
                PromptInput::Text(t) if i == 0 => {
                    let mut w = blocks::BlockWriter::new(seed, block_chars, limits.max_blocks, &mut prefix);
                    t.for_each_piece(|piece| w.push(piece));
                    w.finish().div_ceil(u64::from(CHARS_PER_TOKEN))
                }
                PromptInput::Text(t) => t.char_count().div_ceil(u64::from(CHARS_PER_TOKEN)),
                PromptInput::Tokens(ids) => {
                    if i == 0 {
                        let per_block = (block_chars / CHARS_PER_TOKEN as usize).max(1);
                        blocks::token_blocks(ids, seed, per_block, limits.max_blocks, &mut prefix);
                    }
                    ids.len() as u64
                }
            });
        }
        (kind, Vec::new(), prompts, tokens)
    };
    let max_tokens = raw.max_completion_tokens.or(raw.max_tokens);
    // A client's max_tokens is clamped: near u64::MAX it would wrap the endpoint's in-flight
    // token counter and skew every later pick.
    let output_tokens = match kind {
        ApiKind::Embedding => 0,
        _ => max_tokens.unwrap_or(limits.default_output_tokens).min(MAX_OUTPUT_TOKENS),
    };
    Ok(AiRequest {
        kind,
        model,
        messages,
        prompts,
        max_tokens,
        stream: raw.stream.unwrap_or(false),
        user: raw.user,
        prompt_tokens,
        output_tokens,
        prefix,
    })
}

/// Estimated tokens of `text`: one per 4 characters, the last shorter group counting as one.
pub fn text_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(u64::from(CHARS_PER_TOKEN))
}

/// The chat as the engine is given it (the mock backend's template): `<|role|>\n` + content
/// + `\n` for each message, then `<|assistant|>\n`.
pub fn render_chat(messages: &[Message<'_>]) -> String {
    let mut out = String::new();
    render_chat_into(messages, |piece| out.push_str(piece));
    out
}

fn render_chat_into(messages: &[Message<'_>], mut push: impl FnMut(&str)) {
    for m in messages {
        push("<|");
        push(&m.role);
        push("|>\n");
        m.content.for_each_piece(&mut push);
        push("\n");
    }
    push("<|assistant|>\n");
}
