//! The OpenAI-compatible wire format: request bodies, errors and response bodies.
//!
//! Requests are parsed leniently, like vLLM does: unknown fields are ignored, so real clients
//! that send `temperature`, `tools` or `user` work. What the mock does not support (`n > 1`,
//! several prompts in one completion request) is refused with a 400 rather than ignored.

use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::FinishReason;

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// Model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream tokens as Server-Sent Events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Output tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Output tokens (newer spelling).
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Seed of the answer's draws.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Scheduling priority, lower first (vLLM's extra parameter; needs
    /// `--scheduling-policy priority` unless 0).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Number of answers (only 1 is supported).
    #[serde(default)]
    pub n: Option<u32>,
}

/// One message of a conversation.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`...
    pub role: String,
    /// Text, or a list of parts (only text parts count).
    #[serde(default)]
    pub content: Option<Content>,
}

/// Message content.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// A part of a message.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// Part type (`text`, `image_url`...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// `stream_options`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// The prompt.
    pub prompt: PromptInput,
    /// Stream tokens as Server-Sent Events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Output tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Seed of the answer's draws.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Scheduling priority, lower first (vLLM's extra parameter; needs
    /// `--scheduling-policy priority` unless 0).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Number of answers (only 1 is supported).
    #[serde(default)]
    pub n: Option<u32>,
}

/// `POST /v1/embeddings`.
#[derive(Clone, Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: String,
    /// Texts or token ids to embed.
    pub input: PromptInput,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
}

/// A prompt: text, texts, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Ids(Vec<u32>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u32>>),
}

/// One prompt out of a [`PromptInput`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptRef<'a> {
    /// Text.
    Text(&'a str),
    /// Token ids.
    Ids(&'a [u32]),
}

impl PromptInput {
    /// The prompts, in order.
    pub fn items(&self) -> Vec<PromptRef<'_>> {
        match self {
            PromptInput::Text(t) => vec![PromptRef::Text(t)],
            PromptInput::Texts(ts) => ts.iter().map(|t| PromptRef::Text(t)).collect(),
            PromptInput::Ids(ids) => vec![PromptRef::Ids(ids)],
            PromptInput::IdLists(lists) => lists.iter().map(|l| PromptRef::Ids(l)).collect(),
        }
    }
}

/// Renders a conversation as one prompt text, so that conversations sharing their first
/// messages share a prefix: `<|role|>\ncontent\n` per message, then `<|assistant|>\n`.
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|");
        out.push_str(&m.role);
        out.push_str("|>\n");
        match &m.content {
            Some(Content::Text(t)) => out.push_str(t),
            Some(Content::Parts(parts)) => {
                for p in parts.iter().filter(|p| p.kind == "text") {
                    out.push_str(p.text.as_deref().unwrap_or_default());
                }
            }
            None => {}
        }
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    out
}

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// The offending parameter.
    pub param: Option<&'static str>,
}

// === impl ApiError ===

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, code: None, param: None }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404: no such model.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            code: Some("model_not_found"),
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist."),
            )
        }
    }

    /// 404: no such route.
    pub fn not_found(path: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No route for {path}."))
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}."),
        )
    }

    /// 413.
    pub fn too_large(limit: u64) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body is larger than {limit} bytes."),
            )
        }
    }

    /// 408: the body did not arrive in time.
    pub fn timeout() -> Self {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "The request body did not arrive in time.")
    }

    /// 500 injected by the `error_rate` fault.
    pub fn injected() -> Self {
        ApiError {
            code: Some("injected_fault"),
            ..ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "Injected fault: internal error.")
        }
    }

    /// 503: warming up, or the waiting queue is full.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { code: Some(code), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message) }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        Bytes::from(v.to_string())
    }
}

/// Token counts of a response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

impl Usage {
    /// OpenAI's `usage` object.
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": u64::from(self.prompt_tokens) + u64::from(self.completion_tokens),
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// What a response needs to name itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseMeta {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Request number, for the id.
    pub number: u64,
    /// Unix seconds.
    pub created: u64,
    /// The model name as the client gave it.
    pub model: String,
}

/// An unknown endpoint name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown endpoint {0:?}: expected chat or completions")]
pub struct UnknownEndpoint(pub String);

impl std::str::FromStr for Endpoint {
    type Err = UnknownEndpoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chat" => Ok(Endpoint::Chat),
            "completions" | "completion" => Ok(Endpoint::Completion),
            _ => Err(UnknownEndpoint(s.to_owned())),
        }
    }
}

impl ResponseMeta {
    /// `chatcmpl-N` or `cmpl-N`.
    pub fn id(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", self.number),
            Endpoint::Completion => format!("cmpl-{}", self.number),
        }
    }

    /// The whole (non-streaming) response.
    pub fn full_response(&self, text: &str, reason: FinishReason, usage: Usage) -> Bytes {
        let v = match self.endpoint {
            Endpoint::Chat => json!({
                "id": self.id(), "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": reason.as_str()}],
                "usage": usage.to_json(),
            }),
            Endpoint::Completion => json!({
                "id": self.id(), "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()}],
                "usage": usage.to_json(),
            }),
        };
        Bytes::from(v.to_string())
    }
}

/// Writes SSE chunks in OpenAI's format, one per token, quickly: the invariant parts of a
/// chunk are rendered once per request.
#[derive(Clone, Debug)]
pub struct ChunkWriter {
    endpoint: Endpoint,
    /// `data: {"id":...,"model":...,"choices":[{"index":0,` up to the token.
    head: String,
    /// `data: {"id":...,"model":...,` up to the choices.
    usage_head: String,
}

impl ChunkWriter {
    /// A writer for the response `meta` names.
    pub fn new(meta: &ResponseMeta) -> Self {
        let object = match meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let model = Value::String(meta.model.clone()).to_string();
        let usage_head = format!(
            "data: {{\"id\":\"{}\",\"object\":\"{object}\",\"created\":{},\"model\":{model},",
            meta.id(),
            meta.created
        );
        let head = format!("{usage_head}\"choices\":[{{\"index\":0,");
        ChunkWriter { endpoint: meta.endpoint, head, usage_head }
    }

    /// Appends the chunk of one token; `first` adds the assistant role, `finish` the reason.
    /// `text` must need no JSON escaping (see [`crate::tokens::token_text`]).
    pub fn token(&self, out: &mut Vec<u8>, text: &str, first: bool, finish: Option<FinishReason>) {
        out.extend_from_slice(self.head.as_bytes());
        match self.endpoint {
            Endpoint::Chat if first => out.extend_from_slice(b"\"delta\":{\"role\":\"assistant\",\"content\":\""),
            Endpoint::Chat => out.extend_from_slice(b"\"delta\":{\"content\":\""),
            Endpoint::Completion => out.extend_from_slice(b"\"text\":\""),
        }
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(match self.endpoint {
            Endpoint::Chat => b"\"},\"logprobs\":null,\"finish_reason\":",
            Endpoint::Completion => b"\",\"logprobs\":null,\"finish_reason\":",
        });
        match finish {
            Some(r) => {
                out.push(b'"');
                out.extend_from_slice(r.as_str().as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]}\n\n");
    }

    /// Appends the closing chunk of a stream that produced no token: an empty delta with the
    /// finish reason.
    pub fn empty_finish(&self, out: &mut Vec<u8>, reason: FinishReason) {
        self.token(out, "", true, Some(reason));
    }

    /// Appends the `usage` chunk (`stream_options.include_usage`).
    pub fn usage(&self, out: &mut Vec<u8>, usage: Usage) {
        out.extend_from_slice(self.usage_head.as_bytes());
        out.extend_from_slice(b"\"choices\":[],\"usage\":");
        out.extend_from_slice(usage.to_json().to_string().as_bytes());
        out.extend_from_slice(b"}\n\n");
    }

    /// Appends the end of the stream.
    pub fn done(out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(endpoint: Endpoint) -> ResponseMeta {
        ResponseMeta { endpoint, number: 3, created: 1_700_000_000, model: "m\"x".into() }
    }

    fn events(bytes: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(bytes).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn chat_chunks_are_valid_openai_json() {
        let w = ChunkWriter::new(&meta(Endpoint::Chat));
        let mut out = Vec::new();
        w.token(&mut out, " hi", true, None);
        w.token(&mut out, " there", false, Some(FinishReason::Length));
        w.usage(&mut out, Usage { prompt_tokens: 5, completion_tokens: 2, cached_tokens: 0 });
        ChunkWriter::done(&mut out);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        let e = events(&out);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0]["object"], "chat.completion.chunk");
        assert_eq!(e[0]["model"], "m\"x");
        assert_eq!(e[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(e[0]["choices"][0]["delta"]["content"], " hi");
        assert_eq!(e[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(e[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(e[2]["choices"], json!([]));
        assert_eq!(e[2]["usage"]["total_tokens"], 7);
    }

    #[test]
    fn completion_chunks_and_full_responses() {
        let m = meta(Endpoint::Completion);
        let w = ChunkWriter::new(&m);
        let mut out = Vec::new();
        w.token(&mut out, " a", true, None);
        w.empty_finish(&mut out, FinishReason::Stop);
        let e = events(&out);
        assert_eq!(e[0]["object"], "text_completion");
        assert_eq!(e[0]["id"], "cmpl-3");
        assert_eq!(e[0]["choices"][0]["text"], " a");
        assert_eq!(e[1]["choices"][0]["finish_reason"], "stop");
        let full: Value =
            serde_json::from_slice(&m.full_response(" a b", FinishReason::Stop, Usage::default())).unwrap();
        assert_eq!(full["choices"][0]["text"], " a b");
        let chat: Value = serde_json::from_slice(&meta(Endpoint::Chat).full_response(
            "x",
            FinishReason::Length,
            Usage { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 },
        ))
        .unwrap();
        assert_eq!(chat["choices"][0]["message"]["content"], "x");
        assert_eq!(chat["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn errors_have_openai_shape() {
        let e: Value = serde_json::from_slice(&ApiError::model_not_found("gpt").body()).unwrap();
        assert_eq!(e["error"]["code"], "model_not_found");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["param"], "model");
        assert!(e["error"]["message"].as_str().unwrap().contains("gpt"));
    }

    #[test]
    fn chat_rendering_shares_prefixes() {
        let parse = |s: &str| -> Vec<ChatMessage> { serde_json::from_str(s).unwrap() };
        let a = render_chat(&parse(r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#));
        let b = render_chat(&parse(
            r#"[{"role":"system","content":[{"type":"text","text":"be brief"}]},{"role":"user","content":"yo"}]"#,
        ));
        assert!(a.starts_with("<|system|>\nbe brief\n<|user|>\n"));
        assert_eq!(a[..20], b[..20]);
        let input: PromptInput = serde_json::from_str("[[1,2],[3]]").unwrap();
        assert_eq!(input.items(), vec![PromptRef::Ids(&[1, 2]), PromptRef::Ids(&[3])]);
    }
}
