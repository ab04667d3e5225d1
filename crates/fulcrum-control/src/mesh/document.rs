//! The shared document of mesh mode and how it combines with a proxy's own file.
//!
//! A proxy's own file says where it listens (`[proxy]`, `[[listener]]`): that differs from
//! proxy to proxy. The shared document, kept in etcd, says what every proxy routes the same
//! way: `[pool.*]` and `[[route]]`. The running configuration is the own file with its pools
//! and routes replaced by the shared ones.

use toml::Table;

/// The keys of a configuration that the mesh shares.
pub const SHARED_KEYS: [&str; 2] = ["pool", "route"];

/// Why two texts cannot be combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// A text is not TOML.
    #[error("{which} is not valid TOML: {message}")]
    Toml {
        /// Which text.
        which: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The shared document holds more than pools and routes.
    #[error("the shared document may only hold `pool` and `route` tables, not `{0}`")]
    Foreign(String),
}

fn parse(text: &str, which: &'static str) -> Result<Table, DocumentError> {
    text.parse::<Table>().map_err(|e| DocumentError::Toml { which, message: e.message().trim().to_owned() })
}

fn render(table: &Table) -> String {
    // A table of TOML values always renders.
    toml::to_string(table).unwrap_or_default()
}

/// The shared part of a whole configuration: its pools and routes.
pub fn shared_part(whole: &str) -> Result<String, DocumentError> {
    let mut table = parse(whole, "the configuration")?;
    table.retain(|k, _| SHARED_KEYS.contains(&k));
    Ok(render(&table))
}

/// A proxy's own file with its pools and routes replaced by the shared document's.
pub fn combine(own: &str, shared: &str) -> Result<String, DocumentError> {
    let mut table = parse(own, "the proxy's own file")?;
    let shared = parse(shared, "the shared document")?;
    if let Some(key) = shared.keys().find(|k| !SHARED_KEYS.contains(&k.as_str())) {
        return Err(DocumentError::Foreign(key.clone()));
    }
    table.retain(|k, _| !SHARED_KEYS.contains(&k));
    for (k, v) in shared {
        table.insert(k, v);
    }
    // Routes name listeners: a shared route naming a listener this proxy lacks makes the
    // combined text invalid, and validation reports it with the field.
    Ok(render(&table))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = r#"
[proxy]
admin = "127.0.0.1:0"

[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "llm"

[pool.llm]
endpoints = [{ address = "127.0.0.1:9" }]
"#;

    #[test]
    fn the_shared_part_is_pools_and_routes() {
        let shared = shared_part(OWN).unwrap();
        let t: Table = shared.parse().unwrap();
        assert_eq!(t.keys().collect::<Vec<_>>(), ["pool"]);
    }

    #[test]
    fn combining_keeps_listeners_and_takes_pools_and_routes() {
        let shared = r#"
[[route]]
match = { path_prefix = "/v1/" }
pool = "llm"

[pool.llm]
policy = "least_connections"
endpoints = [{ address = "127.0.0.1:10" }, { address = "127.0.0.1:11" }]
"#;
        let text = combine(OWN, shared).unwrap();
        let config = fulcrum_config::Config::parse(&text, None).unwrap();
        assert_eq!(config.listeners[0].name, "public");
        assert_eq!(config.pools["llm"].endpoints.len(), 2);
        assert_eq!(config.routes.len(), 1);
        assert!(config.proxy.admin.is_some());
    }

    #[test]
    fn a_shared_document_with_listeners_is_refused() {
        let err = combine(OWN, "[proxy]\nworkers = 2").unwrap_err();
        assert_eq!(err, DocumentError::Foreign("proxy".into()));
        assert!(matches!(
            combine(OWN, "pool = ").unwrap_err(),
            DocumentError::Toml { which: "the shared document", .. }
        ));
    }
}
