//! Changes to the running configuration, made on its TOML text.
//!
//! Every admin call that changes something (add or remove an endpoint, change a weight or a
//! policy) is an edit of the configuration text followed by the same validate-build-swap as
//! a reload: one code path, one set of checks, and `GET /config` always shows what runs.
//! Comments and layout of the original file are not kept in the edited text; the file on
//! disk is never written (a reload from the file replaces API changes, as with HAProxy's
//! runtime API).

use toml::{Table, Value};

/// Why an edit cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// No pool of that name.
    #[error("no pool is named `{0}`")]
    UnknownPool(String),
    /// No endpoint of that id in the pool.
    #[error("pool `{pool}` has no endpoint `{id}`")]
    UnknownEndpoint {
        /// The pool.
        pool: String,
        /// The id asked for.
        id: String,
    },
    /// The endpoint is there already.
    #[error("pool `{pool}` already has an endpoint `{id}`")]
    Duplicate {
        /// The pool.
        pool: String,
        /// The id.
        id: String,
    },
    /// The request itself is malformed (the field names what).
    #[error("{message}")]
    Bad {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The pool's endpoints come from a discovery provider, not from the configuration.
    #[error("pool `{0}` takes its endpoints from discovery; change them there")]
    Discovered(String),
    /// The running configuration has no text to edit.
    #[error("the running configuration was not read from text, so it cannot be edited")]
    NoText,
    /// The text does not parse (cannot happen for text that is running).
    #[error("the running configuration does not parse: {0}")]
    Unparsable(String),
}

impl EditError {
    /// The field at fault, for the JSON error.
    pub fn field(&self) -> &'static str {
        match self {
            EditError::UnknownPool(_) | EditError::Discovered(_) => "pool",
            EditError::UnknownEndpoint { .. } | EditError::Duplicate { .. } => "id",
            EditError::Bad { field, .. } => field,
            EditError::NoText | EditError::Unparsable(_) => "config",
        }
    }
}

/// The id an endpoint entry has: its `id`, else its address as the proxy writes it.
fn entry_id(entry: &Value) -> Option<String> {
    let t = entry.as_table()?;
    if let Some(id) = t.get("id").and_then(Value::as_str) {
        return Some(id.to_owned());
    }
    let address = t.get("address")?.as_str()?;
    Some(address.parse::<std::net::SocketAddr>().map_or_else(|_| address.to_owned(), |a| a.to_string()))
}

fn parse(text: &str) -> Result<Table, EditError> {
    text.parse::<Table>().map_err(|e| EditError::Unparsable(e.message().to_owned()))
}

fn render(table: &Table) -> Result<String, EditError> {
    toml::to_string(table).map_err(|e| EditError::Unparsable(e.to_string()))
}

/// The pool's table, refusing pools fed by discovery.
fn pool_mut<'t>(root: &'t mut Table, pool: &str) -> Result<&'t mut Table, EditError> {
    let table = root
        .get_mut("pool")
        .and_then(Value::as_table_mut)
        .and_then(|pools| pools.get_mut(pool))
        .and_then(Value::as_table_mut)
        .ok_or_else(|| EditError::UnknownPool(pool.to_owned()))?;
    Ok(table)
}

fn static_endpoints<'t>(root: &'t mut Table, pool: &str) -> Result<&'t mut Vec<Value>, EditError> {
    let table = pool_mut(root, pool)?;
    if table.contains_key("discovery") {
        return Err(EditError::Discovered(pool.to_owned()));
    }
    let endpoints = table.entry("endpoints").or_insert_with(|| Value::Array(Vec::new()));
    endpoints.as_array_mut().ok_or(EditError::Bad { field: "endpoints", message: "is not a list".into() })
}

/// Adds an endpoint (a JSON object with the fields of a pool's `endpoints` entries).
pub fn add_endpoint(text: &str, pool: &str, endpoint: &serde_json::Value) -> Result<String, EditError> {
    let mut root = parse(text)?;
    let entry = Value::try_from(endpoint).map_err(|e| EditError::Bad { field: "endpoint", message: e.to_string() })?;
    if !entry.is_table() {
        return Err(EditError::Bad { field: "endpoint", message: "must be a JSON object with an `address`".into() });
    }
    let id = entry_id(&entry)
        .ok_or(EditError::Bad { field: "address", message: "an endpoint needs an `address` (host:port)".into() })?;
    let endpoints = static_endpoints(&mut root, pool)?;
    if endpoints.iter().any(|e| entry_id(e).as_deref() == Some(id.as_str())) {
        return Err(EditError::Duplicate { pool: pool.to_owned(), id });
    }
    endpoints.push(entry);
    render(&root)
}

/// Removes an endpoint by id.
pub fn remove_endpoint(text: &str, pool: &str, id: &str) -> Result<String, EditError> {
    let mut root = parse(text)?;
    let endpoints = static_endpoints(&mut root, pool)?;
    let before = endpoints.len();
    endpoints.retain(|e| entry_id(e).as_deref() != Some(id));
    if endpoints.len() == before {
        return Err(EditError::UnknownEndpoint { pool: pool.to_owned(), id: id.to_owned() });
    }
    render(&root)
}

/// Sets an endpoint's static weight.
pub fn set_weight(text: &str, pool: &str, id: &str, weight: u32) -> Result<String, EditError> {
    if weight == 0 {
        return Err(EditError::Bad { field: "weight", message: "must be at least 1 (drain or remove instead)".into() });
    }
    let mut root = parse(text)?;
    let endpoints = static_endpoints(&mut root, pool)?;
    let entry = endpoints
        .iter_mut()
        .find(|e| entry_id(e).as_deref() == Some(id))
        .and_then(Value::as_table_mut)
        .ok_or_else(|| EditError::UnknownEndpoint { pool: pool.to_owned(), id: id.to_owned() })?;
    entry.insert("weight".into(), Value::Integer(i64::from(weight)));
    render(&root)
}

/// Sets a pool's policy: a name, or `{ name, options }` as in the file.
pub fn set_policy(text: &str, pool: &str, policy: &serde_json::Value) -> Result<String, EditError> {
    let mut root = parse(text)?;
    let value = Value::try_from(policy).map_err(|e| EditError::Bad { field: "policy", message: e.to_string() })?;
    if !(value.is_str() || value.is_table()) {
        return Err(EditError::Bad {
            field: "policy",
            message: "must be a policy name or an object `{name, options}`".into(),
        });
    }
    pool_mut(&mut root, pool)?.insert("policy".into(), value);
    render(&root)
}

/// The configuration as JSON (for `GET /config`).
pub fn to_json(text: &str) -> Result<serde_json::Value, EditError> {
    serde_json::to_value(parse(text)?).map_err(|e| EditError::Unparsable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
pool = "llm"

[pool.llm]
policy = "round_robin"
endpoints = [{ id = "a", address = "127.0.0.1:9" }, { address = "127.0.0.1:10", weight = 2 }]

[pool.found]
policy = "random"
discovery = { kind = "registration" }
"#;

    fn endpoints(text: &str) -> Vec<(String, i64)> {
        let root = parse(text).unwrap();
        root["pool"]["llm"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (entry_id(e).unwrap(), e.get("weight").and_then(Value::as_integer).unwrap_or(1)))
            .collect()
    }

    #[test]
    fn endpoints_are_added_removed_and_reweighted_by_id() {
        let added = add_endpoint(TEXT, "llm", &serde_json::json!({"address": "127.0.0.1:11", "weight": 3})).unwrap();
        assert_eq!(endpoints(&added), [("a".into(), 1), ("127.0.0.1:10".into(), 2), ("127.0.0.1:11".into(), 3)]);
        let removed = remove_endpoint(&added, "llm", "127.0.0.1:10").unwrap();
        assert_eq!(endpoints(&removed), [("a".into(), 1), ("127.0.0.1:11".into(), 3)]);
        let weighted = set_weight(&removed, "llm", "a", 5).unwrap();
        assert_eq!(endpoints(&weighted), [("a".into(), 5), ("127.0.0.1:11".into(), 3)]);
    }

    #[test]
    fn mistakes_name_the_field() {
        let dup = add_endpoint(TEXT, "llm", &serde_json::json!({"address": "127.0.0.1:10"})).unwrap_err();
        assert_eq!(dup, EditError::Duplicate { pool: "llm".into(), id: "127.0.0.1:10".into() });
        assert_eq!(add_endpoint(TEXT, "llm", &serde_json::json!({"weight": 2})).unwrap_err().field(), "address");
        assert_eq!(add_endpoint(TEXT, "llm", &serde_json::json!([1])).unwrap_err().field(), "endpoint");
        assert_eq!(remove_endpoint(TEXT, "nope", "a").unwrap_err(), EditError::UnknownPool("nope".into()));
        assert_eq!(remove_endpoint(TEXT, "llm", "zz").unwrap_err().field(), "id");
        assert_eq!(set_weight(TEXT, "llm", "a", 0).unwrap_err().field(), "weight");
        assert_eq!(set_policy(TEXT, "llm", &serde_json::json!(3)).unwrap_err().field(), "policy");
        assert_eq!(
            add_endpoint(TEXT, "found", &serde_json::json!({"address": "127.0.0.1:12"})).unwrap_err(),
            EditError::Discovered("found".into())
        );
    }

    #[test]
    fn policy_is_a_name_or_a_table() {
        let named = set_policy(TEXT, "llm", &serde_json::json!("least_connections")).unwrap();
        assert_eq!(parse(&named).unwrap()["pool"]["llm"]["policy"].as_str(), Some("least_connections"));
        let with_options =
            set_policy(TEXT, "llm", &serde_json::json!({"name": "bounded_load", "epsilon": 0.5})).unwrap();
        assert_eq!(parse(&with_options).unwrap()["pool"]["llm"]["policy"]["name"].as_str(), Some("bounded_load"));
        assert_eq!(to_json(TEXT).unwrap()["pool"]["llm"]["policy"], "round_robin");
    }
}
