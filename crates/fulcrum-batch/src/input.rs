//! Batch input files: JSON lines, each one request, checked before anything runs.
//!
//! Two kinds of line share one shape:
//!
//! - **OpenAI batch lines**: `{"custom_id": "a", "method": "POST", "url":
//!   "/v1/chat/completions", "body": {...}}`. In a batch made through the API, every line's
//!   `url` is the batch's `endpoint` and its method is POST, as OpenAI requires.
//! - **Generic HTTP tasks** (`fulcrum batch`, for any worker fleet): any method and path,
//!   with optional `headers` (an object of strings), a `body` (a JSON string is sent as it
//!   is, as text; any other JSON value as JSON) and `require` (constraints on the endpoint,
//!   see [`fulcrum_core::constraint`]).
//!
//! Errors are reported per line with OpenAI's codes, so that a user sees every bad line at
//! once: `invalid_json_line`, `missing_required_parameter`, `invalid_value`,
//! `mismatched_endpoint`, `duplicate_custom_id`, `line_too_long`, and
//! `too_many_requests` for a file over the request limit.

use std::collections::{BTreeMap, HashSet};

use fulcrum_core::constraint::Requirements;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The endpoints an OpenAI batch may name.
pub const OPENAI_ENDPOINTS: [&str; 5] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"];

/// At most this many line errors are kept (the count of the rest is reported).
pub const MAX_REPORTED_ERRORS: usize = 1000;

/// What a client may put in one file.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests (lines) in one file.
    pub max_requests: usize,
    /// Bytes in one line.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    /// OpenAI's: 50,000 requests; a line as large as the proxy's default body limit.
    fn default() -> Self {
        Limits { max_requests: 50_000, max_line_bytes: 8 << 20 }
    }
}

/// Which lines a file may hold.
#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    /// OpenAI batch lines for this endpoint (one of [`OPENAI_ENDPOINTS`]).
    OpenAi {
        /// The batch's endpoint.
        endpoint: &'a str,
    },
    /// Any HTTP task.
    Generic,
}

/// One request of a batch, as read from its line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The line it came from, from 1.
    pub line: u32,
    /// The caller's name for it, unique in the file.
    pub custom_id: String,
    /// HTTP method, upper case.
    pub method: String,
    /// Path and query.
    pub url: String,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Constraints on the endpoint (a generic task's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require: Option<String>,
}

impl Task {
    /// The body's bytes and content type: a JSON string as text, anything else as JSON.
    pub fn body_bytes(&self) -> Option<(Vec<u8>, &'static str)> {
        self.body_with_priority(None)
    }

    /// [`body_bytes`](Self::body_bytes), with `"priority": priority` added to a JSON object
    /// body that names none (an engine's scheduling priority, vLLM's and SGLang's extra
    /// parameter).
    pub fn body_with_priority(&self, priority: Option<i32>) -> Option<(Vec<u8>, &'static str)> {
        match &self.body {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some((s.clone().into_bytes(), "text/plain; charset=utf-8")),
            Some(Value::Object(o)) if priority.is_some() && !o.contains_key("priority") => {
                let mut o = o.clone();
                o.insert("priority".to_owned(), Value::from(priority));
                Some((serde_json::to_vec(&o).unwrap_or_default(), "application/json"))
            }
            Some(v) => Some((serde_json::to_vec(v).unwrap_or_default(), "application/json")),
        }
    }

    /// The OpenAI `model` its body names.
    pub fn model(&self) -> Option<&str> {
        self.body.as_ref()?.get("model")?.as_str()
    }
}

/// One bad line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// OpenAI's error code.
    pub code: String,
    /// What is wrong, in words.
    pub message: String,
    /// The field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// The line, from 1 (none for an error of the whole file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

/// A file read: its tasks, and its bad lines (the batch runs only when there are none).
#[derive(Debug, Default)]
pub struct Parsed {
    /// Good lines, in file order.
    pub tasks: Vec<Task>,
    /// Bad lines (at most [`MAX_REPORTED_ERRORS`]).
    pub errors: Vec<LineError>,
    /// Bad lines beyond those kept.
    pub more_errors: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    custom_id: Option<Value>,
    method: Option<Value>,
    url: Option<Value>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    require: Option<String>,
}

/// Reads a file's lines. Blank lines are skipped (and counted, so line numbers stay those of
/// the file).
pub fn parse(bytes: &[u8], mode: Mode<'_>, limits: &Limits) -> Parsed {
    let mut out = Parsed::default();
    let mut seen = HashSet::new();
    let mut requests = 0usize;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        requests += 1;
        if requests > limits.max_requests {
            out.errors.push(LineError {
                code: "too_many_requests".into(),
                message: format!("the file has more than {} requests, the limit of one batch", limits.max_requests),
                param: None,
                line: Some(line),
            });
            break;
        }
        match check(raw, line, mode, limits, &mut seen) {
            Ok(task) => out.tasks.push(task),
            Err(e) if out.errors.len() < MAX_REPORTED_ERRORS => out.errors.push(e),
            Err(_) => out.more_errors += 1,
        }
    }
    if requests == 0 {
        out.errors.push(LineError {
            code: "empty_file".into(),
            message: "the file has no requests".into(),
            param: None,
            line: None,
        });
    }
    out
}

fn check(
    raw: &[u8],
    line: u32,
    mode: Mode<'_>,
    limits: &Limits,
    seen: &mut HashSet<String>,
) -> Result<Task, LineError> {
    let err = |code: &str, param: Option<&str>, message: String| LineError {
        code: code.into(),
        message,
        param: param.map(str::to_owned),
        line: Some(line),
    };
    if raw.len() > limits.max_line_bytes {
        return Err(err(
            "line_too_long",
            None,
            format!("the line has {} bytes, more than the limit of {}", raw.len(), limits.max_line_bytes),
        ));
    }
    let parsed: RawLine = serde_json::from_slice(raw)
        .map_err(|e| err("invalid_json_line", None, format!("not a JSON object of a request: {e}")))?;
    let string = |v: Option<Value>, name: &str| match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(err("invalid_value", Some(name), format!("`{name}` is empty"))),
        Some(_) => Err(err("invalid_value", Some(name), format!("`{name}` must be a string"))),
        None => Err(err("missing_required_parameter", Some(name), format!("`{name}` is missing"))),
    };
    let custom_id = string(parsed.custom_id, "custom_id")?;
    if custom_id.len() > 512 {
        return Err(err("invalid_value", Some("custom_id"), "`custom_id` is longer than 512 bytes".into()));
    }
    let method = string(parsed.method, "method")?.to_ascii_uppercase();
    let url = string(parsed.url, "url")?;
    if !url.starts_with('/') || url.starts_with("//") || url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(err(
            "invalid_value",
            Some("url"),
            format!("`url` must be a path such as /v1/chat/completions, got `{url}`"),
        ));
    }
    if !method.bytes().all(|b| b.is_ascii_alphabetic()) || method.len() > 16 {
        return Err(err("invalid_value", Some("method"), format!("`{method}` is not an HTTP method")));
    }
    let headers = parsed.headers.unwrap_or_default();
    match mode {
        Mode::OpenAi { endpoint } => {
            if method != "POST" {
                return Err(err("invalid_value", Some("method"), format!("only POST is supported, got `{method}`")));
            }
            if url != endpoint {
                return Err(err(
                    "mismatched_endpoint",
                    Some("url"),
                    format!("the line's url `{url}` is not the batch's endpoint `{endpoint}`"),
                ));
            }
            if !parsed.body.as_ref().is_some_and(Value::is_object) {
                return Err(err("invalid_value", Some("body"), "`body` must be a JSON object".into()));
            }
            if !headers.is_empty() || parsed.require.is_some() {
                return Err(err("invalid_value", None, "`headers` and `require` are for generic tasks only".into()));
            }
        }
        Mode::Generic => {
            for (k, v) in &headers {
                if http_token(k).is_none() || v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                    return Err(err("invalid_value", Some("headers"), format!("`{k}` is not a valid header")));
                }
            }
        }
    }
    if parsed.body.as_ref().and_then(|b| b.get("stream")).and_then(Value::as_bool) == Some(true) {
        return Err(err("invalid_value", Some("body.stream"), "streaming is not supported in a batch".into()));
    }
    if let Some(r) = &parsed.require {
        Requirements::parse(r).map_err(|e| err("invalid_value", Some("require"), e.to_string()))?;
    }
    if !seen.insert(custom_id.clone()) {
        return Err(err(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("`custom_id` `{custom_id}` is used by an earlier line; each must be unique"),
        ));
    }
    Ok(Task { line, custom_id, method, url, headers, body: parsed.body, require: parsed.require })
}

fn http_token(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: Mode<'static> = Mode::OpenAi { endpoint: "/v1/chat/completions" };

    fn line(id: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[]}}}}"#
        )
    }

    #[test]
    fn good_lines_in_order_blank_lines_skipped() {
        let text = format!("{}\n\n{}\r\n", line("a"), line("b"));
        let p = parse(text.as_bytes(), CHAT, &Limits::default());
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.tasks.iter().map(|t| (t.line, t.custom_id.as_str())).collect::<Vec<_>>(), [(1, "a"), (3, "b")]);
        assert_eq!(p.tasks[0].model(), Some("m"));
    }

    #[test]
    fn every_bad_line_is_named_with_its_code() {
        let text = [
            line("a"),
            "{not json".into(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.into(),
            line("a"),
            r#"{"custom_id":"c","method":"POST","url":"/v1/embeddings","body":{}}"#.into(),
            r#"{"custom_id":"d","method":"GET","url":"/v1/chat/completions","body":{}}"#.into(),
            r#"{"custom_id":"e","method":"POST","url":"/v1/chat/completions","body":{"stream":true}}"#.into(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{},"extra":1}"#.into(),
        ]
        .join("\n");
        let p = parse(text.as_bytes(), CHAT, &Limits::default());
        let codes: Vec<(u32, &str)> = p.errors.iter().map(|e| (e.line.unwrap(), e.code.as_str())).collect();
        assert_eq!(
            codes,
            [
                (2, "invalid_json_line"),
                (3, "missing_required_parameter"),
                (4, "duplicate_custom_id"),
                (5, "mismatched_endpoint"),
                (6, "invalid_value"),
                (7, "invalid_value"),
                (8, "invalid_json_line"),
            ]
        );
        assert!(p.errors[2].message.contains("`a`"), "{}", p.errors[2].message);
    }

    #[test]
    fn an_engine_priority_goes_into_bodies_that_name_none() {
        let own = r#"{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[],"priority":2}}"#;
        let text = [line("a"), own.to_owned()].join("\n");
        let p = parse(text.as_bytes(), CHAT, &Limits::default());
        let body = |i: usize| -> Value {
            let (bytes, kind) = p.tasks[i].body_with_priority(Some(10)).unwrap();
            assert_eq!(kind, "application/json");
            serde_json::from_slice(&bytes).unwrap()
        };
        assert_eq!(body(0)["priority"], 10);
        assert_eq!(body(0)["model"], "m");
        assert_eq!(body(1)["priority"], 2, "the line's own priority stays");
        assert_eq!(p.tasks[0].body_with_priority(None), p.tasks[0].body_bytes());
    }

    #[test]
    fn limits_on_lines_and_requests() {
        let limits = Limits { max_requests: 2, max_line_bytes: 200 };
        let long = format!(
            r#"{{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{{"p":"{}"}}}}"#,
            "y".repeat(300)
        );
        let text = [line("a"), long, line("b"), line("c")].join("\n");
        let p = parse(text.as_bytes(), CHAT, &limits);
        let codes: Vec<&str> = p.errors.iter().map(|e| e.code.as_str()).collect();
        assert_eq!(codes, ["line_too_long", "too_many_requests"]);
        assert_eq!(parse(b"\n\n", CHAT, &limits).errors[0].code, "empty_file");
    }

    #[test]
    fn generic_tasks_take_any_method_headers_and_constraints() {
        let text = r#"{"custom_id":"t1","method":"put","url":"/jobs/1","headers":{"x-job":"1"},"body":"raw text","require":"gpu=a100"}
{"custom_id":"t2","method":"GET","url":"/health"}
{"custom_id":"t3","method":"POST","url":"/x","require":"gpu"}
{"custom_id":"t4","method":"POST","url":"/x","headers":{"bad header":"v"}}"#;
        let p = parse(text.as_bytes(), Mode::Generic, &Limits::default());
        assert_eq!(p.tasks.len(), 2);
        assert_eq!(p.tasks[0].method, "PUT");
        assert_eq!(p.tasks[0].body_bytes().unwrap(), (b"raw text".to_vec(), "text/plain; charset=utf-8"));
        assert_eq!(p.tasks[1].body_bytes(), None);
        // An engine priority goes into JSON object bodies that name none.
        assert_eq!(p.tasks[0].body_with_priority(Some(5)), p.tasks[0].body_bytes());
        assert_eq!(p.errors.iter().map(|e| e.param.as_deref().unwrap()).collect::<Vec<_>>(), ["require", "headers"]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for bytes in [&b"\xff\xfe\n{}\n[]\n\"s\"\n"[..], b"{\"custom_id\":1}", b"\0\0\0"] {
            let p = parse(bytes, Mode::Generic, &Limits::default());
            assert!(p.tasks.is_empty() && !p.errors.is_empty());
        }
    }

    proptest::proptest! {
        /// Any bytes: no panic, every non-blank line is a task or an error, and the tasks'
        /// ids are unique.
        #[test]
        fn any_bytes_are_tasks_or_errors(lines in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::string::string_regex(r#"\{"custom_id":"[a-c]","method":"(POST|GET|p)","url":"/v1/(chat/completions|x)"(,"body":\{"model":"m"\})?\}"#).unwrap(),
                proptest::string::string_regex(".{0,40}").unwrap(),
            ],
            0..20,
        )) {
            let text = lines.join("\n");
            for mode in [Mode::Generic, Mode::OpenAi { endpoint: "/v1/chat/completions" }] {
                let p = parse(text.as_bytes(), mode, &Limits { max_requests: 15, max_line_bytes: 64 });
                let requests = text.split('\n').filter(|l| !l.bytes().all(|b| b.is_ascii_whitespace())).count();
                if requests > 0 && requests <= 15 {
                    proptest::prop_assert_eq!(p.tasks.len() + p.errors.len(), requests);
                }
                let ids: std::collections::HashSet<_> = p.tasks.iter().map(|t| &t.custom_id).collect();
                proptest::prop_assert_eq!(ids.len(), p.tasks.len());
            }
        }
    }
}
