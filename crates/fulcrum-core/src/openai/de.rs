//! Deserializing the fields of an OpenAI body that routing reads, borrowing strings from the
//! body and enforcing the message and input limits while parsing (never after).
//!
//! Prompt text (message contents, text parts, prompts, inputs) is kept as raw JSON string
//! literals (serde_json's `RawValue`, which only scans them) and decoded later, piece by
//! piece, into the block hasher ([`JsonText`]): serde_json's own unescaping copies in small
//! steps into a new string and takes about three times as long on a 200 KB prompt with a
//! newline escape on every line.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{JsonText, Message, PromptInput};

/// Which limit stopped the parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Overflow {
    Messages,
    Inputs,
}

/// Limits, and which one was hit (serde errors carry only text).
pub(super) struct Ctx {
    max_messages: usize,
    max_inputs: usize,
    overflow: Cell<Option<Overflow>>,
}

impl Ctx {
    pub(super) fn new(max_messages: usize, max_inputs: usize) -> Self {
        Ctx { max_messages, max_inputs, overflow: Cell::new(None) }
    }

    pub(super) fn overflow(&self) -> Option<Overflow> {
        self.overflow.get()
    }

    fn overflowed<E: de::Error>(&self, which: Overflow) -> E {
        self.overflow.set(Some(which));
        E::custom(match which {
            Overflow::Messages => "too many messages",
            Overflow::Inputs => "too many prompts or inputs",
        })
    }
}

/// The fields routing reads.
#[derive(Default)]
pub(super) struct RawBody<'a> {
    pub model: Option<Cow<'a, str>>,
    pub messages: Option<Vec<Message<'a>>>,
    pub prompt: Option<Vec<PromptInput<'a>>>,
    pub input: Option<Vec<PromptInput<'a>>>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stream: Option<bool>,
    pub user: Option<Cow<'a, str>>,
}

/// A string, borrowed from the body when it has no escapes.
struct Text<'a>(Cow<'a, str>);

struct TextVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(v)))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor(PhantomData))
    }
}

fn text<'a>(t: Option<Text<'a>>) -> Option<Cow<'a, str>> {
    t.map(|t| t.0)
}

// === the body ===

pub(super) struct BodySeed<'c>(pub &'c Ctx);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = RawBody<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawBody<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = RawBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBody<'de>, A::Error> {
        let mut body = RawBody::default();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match &*key.0 {
                "model" => body.model = text(map.next_value()?),
                "messages" => body.messages = Some(map.next_value_seed(MessagesSeed(self.0))?),
                "prompt" => body.prompt = Some(map.next_value_seed(PromptSeed(self.0))?),
                "input" => body.input = Some(map.next_value_seed(PromptSeed(self.0))?),
                "max_tokens" => body.max_tokens = map.next_value()?,
                "max_completion_tokens" => body.max_completion_tokens = map.next_value()?,
                "stream" => body.stream = map.next_value()?,
                "user" => body.user = text(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(body)
    }
}

// === messages ===

struct MessagesSeed<'c>(&'c Ctx);

impl<'de> DeserializeSeed<'de> for MessagesSeed<'_> {
    type Value = Vec<Message<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MessagesSeed<'_> {
    type Value = Vec<Message<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max = self.0.max_messages;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(8).min(max).min(1024));
        loop {
            if out.len() == max {
                return match seq.next_element::<IgnoredAny>()? {
                    Some(_) => Err(self.0.overflowed(Overflow::Messages)),
                    None => Ok(out),
                };
            }
            let Some(m) = seq.next_element::<RawMessage<'de>>()? else { return Ok(out) };
            let content = match m.content {
                Some(raw) => content(raw)?,
                None => JsonText::default(),
            };
            out.push(Message { role: text(m.role).unwrap_or(Cow::Borrowed("")), content });
        }
    }
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow, default)]
    role: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// A message's text: a string, or the text parts of a list, or nothing for `null`.
fn content<'a, E: de::Error>(raw: &'a RawValue) -> Result<JsonText<'a>, E> {
    let json = raw.get();
    match json.as_bytes().first() {
        Some(b'"') => Ok(JsonText::one(json)),
        Some(b'[') => {
            let parts: Vec<Part<'a>> = serde_json::from_str(json).map_err(E::custom)?;
            let mut texts = Vec::new();
            for part in parts {
                let is_text = part.kind.as_ref().is_none_or(|k| matches!(&*k.0, "text" | "input_text"));
                match part.text.map(RawValue::get) {
                    Some(t) if is_text && t.starts_with('"') => texts.push(t),
                    Some(_) if is_text => return Err(E::custom("a text part's `text` must be a string")),
                    _ => {}
                }
            }
            Ok(JsonText::many(texts))
        }
        Some(b'n') => Ok(JsonText::default()),
        _ => Err(E::custom("`content` must be a string, a list of content parts, or null")),
    }
}

/// A content part; parts other than text are skipped without being kept.
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

// === prompt and input ===

struct PromptSeed<'c>(&'c Ctx);

impl<'de> DeserializeSeed<'de> for PromptSeed<'_> {
    type Value = Vec<PromptInput<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let json = raw.get();
        match json.as_bytes().first() {
            Some(b'"') => Ok(vec![PromptInput::Text(JsonText::one(json))]),
            Some(b'[') => {
                let mut list = serde_json::Deserializer::from_str(json);
                list.deserialize_seq(PromptList(self.0)).map_err(|e| match self.0.overflow() {
                    Some(which) => self.0.overflowed(which),
                    None => de::Error::custom(e),
                })
            }
            Some(b'n') => Ok(Vec::new()),
            _ => Err(de::Error::custom(
                "a prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists",
            )),
        }
    }
}

struct PromptList<'c>(&'c Ctx);

impl<'de> Visitor<'de> for PromptList<'_> {
    type Value = Vec<PromptInput<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of strings, of token ids, or of token-id lists")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max = self.0.max_inputs;
        let mut out: Vec<PromptInput<'de>> = Vec::new();
        let mut flat: Option<Vec<u32>> = None;
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let json = raw.get();
            let input = match json.as_bytes().first() {
                Some(b'0'..=b'9') if out.is_empty() => {
                    let id: u64 = json.parse().map_err(|_| de::Error::custom("a token id must be a whole number"))?;
                    flat.get_or_insert_with(Vec::new).push(token_id(id));
                    continue;
                }
                Some(b'"') if flat.is_none() => PromptInput::Text(JsonText::one(json)),
                Some(b'[') if flat.is_none() => {
                    let ids: Vec<u64> = serde_json::from_str(json).map_err(de::Error::custom)?;
                    PromptInput::Tokens(ids.into_iter().map(token_id).collect())
                }
                Some(b'-') => return Err(de::Error::custom("a token id is negative")),
                _ => return Err(de::Error::custom("a prompt list mixes token ids with other items")),
            };
            if out.len() == max {
                return Err(self.0.overflowed(Overflow::Inputs));
            }
            out.push(input);
        }
        if let Some(ids) = flat {
            out.push(PromptInput::Tokens(ids));
        }
        Ok(out)
    }
}

fn token_id(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
