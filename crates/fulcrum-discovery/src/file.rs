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

use fulcrum_config::discovery::{EndpointEntry, FileDiscovery};
use fulcrum_core::EndpointSpec;
use serde::Deserialize;

use crate::publish::Publisher;

/// Why a file could not be used.
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
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: String,
        /// The line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// An entry is wrong.
    #[error("{path}: endpoints[{index}].{source}")]
    Entry {
        /// The file.
        path: String,
        /// The entry's position.
        index: usize,
        /// What is wrong.
        #[source]
        source: fulcrum_config::discovery::EntryError,
    },
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
    let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let entries = if json {
        // Parse as a value first: serde's untagged enums lose the position of an error.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FileError::Parse {
            path: shown.clone(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        match serde_json::from_value::<JsonDocument>(value.clone()) {
            Ok(JsonDocument::List(l)) => l,
            Ok(JsonDocument::Object(d)) => d.endpoints,
            Err(_) => {
                // Say what is wrong with the shape the file seems to have.
                let message = match value {
                    serde_json::Value::Array(_) => serde_json::from_value::<Vec<EndpointEntry>>(value).err(),
                    _ => serde_json::from_value::<Document>(value).err(),
                }
                .map_or_else(|| "expected a list of endpoints or {\"endpoints\": [...]}".to_owned(), |e| e.to_string());
                return Err(FileError::Parse { path: shown, line: None, message });
            }
        }
    } else {
        let doc: Document = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            FileError::Parse { path: shown.clone(), line, message: e.message().trim().to_owned() }
        })?;
        doc.endpoints
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(index, e)| e.into_spec().map_err(|source| FileError::Entry { path: shown.clone(), index, source }))
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
        assert!(e.to_string().starts_with("e.toml:2: "), "{e}");
        let e = parse_endpoints(Path::new("e.json"), "[\n{\"address\": 5}\n").unwrap_err();
        assert!(e.to_string().starts_with("e.json:3: "), "{e}");
        let e = parse_endpoints(Path::new("e.json"), r#"[{"address":"127.0.0.1:1","wieght":2}]"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `wieght`"), "{e}");
        let e = parse_endpoints(Path::new("e.json"), r#"{"endpoint":[]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `endpoint`"), "{e}");
        let e =
            parse_endpoints(Path::new("e.toml"), "endpoints = [{ address = \"127.0.0.1:1\", id = \"\" }]").unwrap_err();
        assert_eq!(e.to_string(), "e.toml: endpoints[0].id: must not be empty");
    }
}
