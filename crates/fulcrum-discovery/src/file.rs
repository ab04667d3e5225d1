//! The `file` provider: a TOML or JSON file listing endpoints, polled.
//!
//! The file holds what a pool's `endpoints` list holds. In TOML:
//!
//! ```toml
//! endpoints = [
//!   { address = "10.0.0.7:8000", weight = 2, models = ["llama-3-8b"], labels = { zone = "a" } },
//!   { address = "10.0.0.8:8000", id = "gpu-8" },
//! ]
//! ```
//!
//! In JSON (a file whose name ends in `.json`): the same object, or the list alone. The file
//! is read every `interval` (1 s) and applied when its content differs from what was last
//! applied; write it atomically (to a temporary file, then rename) so a half-written file is
//! never read. A file that cannot be read or parsed leaves the pool with its last set, and the
//! error, with its line, shows in the status board until the file is fixed.

use std::path::Path;

use fulcrum_config::discovery::{EndpointEntry, EntryError, FileDiscovery};
use fulcrum_core::EndpointSpec;
use serde::Deserialize;

use crate::publish::Publisher;

/// Why a file could not be used. No message quotes the file: the path comes from a
/// configuration that the admin API accepts, so a message that echoed the file's bytes would
/// let an API client read any local file the proxy can (a key, a token). Errors give the
/// path, the position and what the file should hold, never what it holds.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML or JSON of the expected shape.
    #[error("{path}{}: {message}", position(*line, *column))]
    Parse {
        /// The file.
        path: String,
        /// The line, when known.
        line: Option<usize>,
        /// The column, when known.
        column: Option<usize>,
        /// What is wrong, in words of our own.
        message: &'static str,
    },
    /// An entry is wrong.
    #[error("{path}{}: endpoints[{index}]{}", position(*line, None), detail(source))]
    Entry {
        /// The file.
        path: String,
        /// The line, when known.
        line: Option<usize>,
        /// The entry's position.
        index: usize,
        /// What is wrong.
        #[source]
        source: fulcrum_config::discovery::EntryError,
    },
}

fn detail(e: &EntryError) -> String {
    if e.field.is_empty() { format!(": {}", e.message) } else { format!(".{e}") }
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// What a file that parses but has the wrong shape is told.
const NOT_ENDPOINTS: &str = "not a valid endpoints file: expected `endpoints = [{ address = \"ip:port\", weight, id, \
     models, labels }, ...]` in TOML, or in JSON a list of such endpoints or {\"endpoints\": [...]}";

/// The fields of an endpoint entry, and what each takes.
const FIELDS: [(&str, &str); 5] = [
    ("address", "must be an `ip:port` address"),
    ("weight", "must be a whole number from 1"),
    ("id", "must be a string"),
    ("models", "must be a list of model names"),
    ("labels", "must be a table of names and string values"),
];

fn hint(field: &'static str) -> String {
    let what = FIELDS.iter().find(|(f, _)| *f == field).map_or("", |(_, what)| *what);
    if field.is_empty() {
        format!("not a valid endpoint (its fields: {})", FIELDS.map(|(f, _)| f).join(", "))
    } else {
        format!("not a valid value: {what}")
    }
}

/// Which entry of `endpoints`, and which of its known fields (`""` for another or none), the
/// byte at `at` belongs to.
fn entry_field_at(doc: &toml::de::DeTable<'_>, at: usize) -> Option<(usize, &'static str)> {
    let (_, endpoints) = doc.iter().find(|(k, _)| k.get_ref() == "endpoints")?;
    let toml::de::DeValue::Array(entries) = endpoints.get_ref() else { return None };
    let index = entries.iter().position(|e| e.span().contains(&at))?;
    let toml::de::DeValue::Table(entry) = entries[index].get_ref() else { return Some((index, "")) };
    let key = entry.iter().find(|(k, v)| k.span().contains(&at) || v.span().contains(&at)).map(|(k, _)| k.get_ref());
    let known = key.and_then(|k| FIELDS.iter().find(|(f, _)| f == k)).map_or("", |(f, _)| *f);
    Some((index, known))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonDocument {
    List(Vec<EndpointEntry>),
    Object(Document),
}

/// Parses a file's text: JSON when `path` ends in `.json`, else TOML.
pub fn parse_endpoints(path: &Path, text: &str) -> Result<Vec<EndpointSpec>, FileError> {
    let shown = path.display().to_string();
    let parse_error = |line, column, message| FileError::Parse { path: shown.clone(), line, column, message };
    let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let entries = if json {
        // Parse as a value first: serde's untagged enums lose the position of an error.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            let message = match e.classify() {
                serde_json::error::Category::Eof => "not a valid endpoints file: the JSON ends too early",
                _ => "not a valid endpoints file: a JSON syntax error",
            };
            parse_error(Some(e.line()), Some(e.column()), message)
        })?;
        match serde_json::from_value::<JsonDocument>(value) {
            Ok(JsonDocument::List(l)) => l,
            Ok(JsonDocument::Object(d)) => d.endpoints,
            Err(_) => return Err(parse_error(None, None, NOT_ENDPOINTS)),
        }
    } else {
        let doc: Document = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start.min(text.len()));
            let line = at.map(|at| text[..at].matches('\n').count() + 1);
            let column = at.map(|at| at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1);
            let Ok(doc) = toml::de::DeTable::parse(text) else {
                return parse_error(line, column, "not a valid endpoints file: a TOML syntax error");
            };
            match at.and_then(|at| entry_field_at(doc.get_ref(), at)) {
                Some((index, field)) => {
                    let source = EntryError { field, message: hint(field) };
                    FileError::Entry { path: shown.clone(), line, index, source }
                }
                None => parse_error(line, column, NOT_ENDPOINTS),
            }
        })?;
        doc.endpoints
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            e.into_spec().map_err(|source| FileError::Entry { path: shown.clone(), line: None, index, source })
        })
        .collect()
}

/// Runs until aborted.
pub(crate) async fn run(config: FileDiscovery, mut out: Publisher) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_text: Option<String> = None;
    loop {
        ticks.tick().await;
        let text = match tokio::fs::read_to_string(&config.path).await {
            Ok(t) => t,
            Err(source) => {
                out.fail(&FileError::Read { path: config.path.display().to_string(), source });
                continue;
            }
        };
        if last_text.as_ref() == Some(&text) {
            // Unchanged since it was applied: nothing to parse again.
            out.publish_unchanged();
            continue;
        }
        match parse_endpoints(&config.path, &text) {
            Ok(set) => {
                if out.publish(set, Vec::new()) {
                    last_text = Some(text);
                }
            }
            Err(e) => out.fail(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_parse_alike() {
        let toml = "endpoints = [\n  { address = \"127.0.0.1:1\", weight = 2 },\n  { address = \"127.0.0.1:2\", id = \"b\" },\n]\n";
        let a = parse_endpoints(Path::new("e.toml"), toml).unwrap();
        let json = r#"{"endpoints":[{"address":"127.0.0.1:1","weight":2},{"address":"127.0.0.1:2","id":"b"}]}"#;
        assert_eq!(parse_endpoints(Path::new("e.json"), json).unwrap(), a);
        let list = r#"[{"address":"127.0.0.1:1","weight":2},{"address":"127.0.0.1:2","id":"b"}]"#;
        assert_eq!(parse_endpoints(Path::new("e.JSON"), list).unwrap(), a);
        assert!(parse_endpoints(Path::new("e.toml"), "").unwrap().is_empty());
    }

    #[test]
    fn errors_say_where() {
        let e = parse_endpoints(Path::new("e.toml"), "endpoints = [\n  { address = \"nowhere\" },\n]\n").unwrap_err();
        assert_eq!(e.to_string(), "e.toml:2: endpoints[0].address: not a valid value: must be an `ip:port` address");
        let e = parse_endpoints(Path::new("e.toml"), "endpoints = [{ address = \"127.0.0.1:1\", wieght = 2 }]\n");
        assert!(
            e.unwrap_err()
                .to_string()
                .starts_with("e.toml:1: endpoints[0]: not a valid endpoint (its fields: address,")
        );
        let e = parse_endpoints(Path::new("e.toml"), "endpoints = [{ address = ").unwrap_err();
        assert!(e.to_string().starts_with("e.toml:1:"), "{e}");
        let e = parse_endpoints(Path::new("e.json"), "[\n{\"address\": 5}\n").unwrap_err();
        assert!(e.to_string().starts_with("e.json:3:"), "{e}");
        let e = parse_endpoints(Path::new("e.json"), r#"[{"address":"127.0.0.1:1","wieght":2}]"#).unwrap_err();
        assert!(e.to_string().contains("not a valid endpoints file"), "{e}");
        let e = parse_endpoints(Path::new("e.json"), r#"{"endpoint":[]}"#).unwrap_err();
        assert!(e.to_string().contains("not a valid endpoints file"), "{e}");
        let e =
            parse_endpoints(Path::new("e.toml"), "endpoints = [{ address = \"127.0.0.1:1\", id = \"\" }]").unwrap_err();
        assert_eq!(e.to_string(), "e.toml: endpoints[0].id: must not be empty");
    }

    #[test]
    fn errors_never_quote_the_file() {
        let secret = "SECRET-XYZ";
        for (name, text) in [
            ("key.toml", format!("{secret}=hunter2\n")),
            ("key", format!("{secret} = \"hunter2\"\n")),
            ("value.toml", format!("endpoints = \"{secret}\"\n")),
            ("addr.toml", format!("endpoints = [{{ address = \"{secret}\" }}]\n")),
            ("model.toml", format!("endpoints = [{{ address = \"127.0.0.1:1\", {secret} = 1 }}]\n")),
            ("shadow.toml", format!("root:{secret}:19000:0:99999:7:::\n")),
            ("key.json", format!("{{\"{secret}\": \"hunter2\"}}")),
            ("value.json", format!("[\"{secret}\"]")),
            ("syntax.json", secret.to_owned()),
            ("addr.json", format!("[{{\"address\": \"{secret}\"}}]")),
        ] {
            let e = parse_endpoints(Path::new(name), &text).unwrap_err().to_string();
            assert!(!e.contains(secret) && !e.contains("hunter2") && !e.contains("root"), "{name}: {e}");
            assert!(e.starts_with(name), "{name}: {e}");
        }
    }
}
