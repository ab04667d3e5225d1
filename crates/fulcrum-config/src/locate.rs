//! Where a field is written: byte offsets to lines, and field paths (`pool.x.retry.budget_percent`,
//! `listener[0].address`, `pool.x.endpoints[1].labels.gpu`) to the line of their key, found in
//! toml's spanned document. Stage two checks values after serde has dropped their spans; this
//! is how its errors still name the field's own line rather than its table's.

use std::cell::OnceCell;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::ConfigError;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step<'p> {
    /// A key of a table.
    Key(&'p str),
    /// An element of an array.
    Index(usize),
}

/// `.retry.budget_percent` or `endpoints[1].labels` as steps (a leading `.` is ignored).
pub(crate) fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some((index, after)) = rest.split_once(']') {
            if let Ok(i) = index.parse() {
                out.push(Step::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or("");
        }
    }
    out
}

/// Turns byte offsets and field paths into lines for error messages.
pub(crate) struct Locator<'a> {
    pub(crate) text: &'a str,
    pub(crate) file: Option<&'a Path>,
    /// The spanned document, parsed on the first error that needs it.
    doc: OnceCell<Option<Spanned<DeTable<'a>>>>,
}

impl<'a> Locator<'a> {
    pub(crate) fn new(text: &'a str, file: Option<&'a Path>) -> Self {
        Locator { text, file, doc: OnceCell::new() }
    }

    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.text.as_bytes()[..offset.min(self.text.len())].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// The field written at `offset`: the table header above it and the key on its line
    /// (`pool.llama.endpoints`), as far as the text shows it.
    pub(crate) fn field_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("");
        let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.starts_with('['));
        let table = self.text[..start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
        match (table, key) {
            (Some(t), Some(k)) => format!("{t}.{k}"),
            (Some(t), None) => t,
            (None, Some(k)) => k.to_owned(),
            (None, None) => String::new(),
        }
    }

    /// Where the deepest written part of `path` is: the key of the last step the document
    /// has (an array element's own start), `None` if not even the first step is written.
    pub(crate) fn offset_of(&self, path: &[Step<'_>]) -> Option<usize> {
        let doc = self.doc.get_or_init(|| DeTable::parse(self.text).ok()).as_ref()?;
        let mut found = None;
        let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        for step in path {
            let value = match (step, table, array) {
                (Step::Key(k), Some(t), _) => {
                    let Some((key, value)) = t.iter().find(|(key, _)| key.get_ref() == k) else { break };
                    found = Some(key.span().start);
                    value
                }
                (Step::Index(i), _, Some(a)) => {
                    let Some(value) = a.get(*i) else { break };
                    found = Some(value.span().start);
                    value
                }
                _ => break,
            };
            (table, array) = match value.get_ref() {
                DeValue::Table(t) => (Some(t), None),
                DeValue::Array(a) => (None, Some(&a[..])),
                _ => (None, None),
            };
        }
        found
    }

    /// An error at `offset`.
    pub(crate) fn error(&self, offset: usize, field: &str, message: &str) -> ConfigError {
        ConfigError {
            file: self.file.map(Path::to_owned),
            line: Some(self.line_of(offset)),
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }

    /// An error on the field at `path` (its spelling in messages is `field`), at the line of
    /// its key, or of the nearest enclosing table written, or else at `fallback`.
    pub(crate) fn field_error(&self, path: &[Step<'_>], fallback: usize, field: &str, message: &str) -> ConfigError {
        self.error(self.offset_of(path).unwrap_or(fallback), field, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_keys_and_indices() {
        assert_eq!(
            steps(".endpoints[1].labels.gpu"),
            [Step::Key("endpoints"), Step::Index(1), Step::Key("labels"), Step::Key("gpu")]
        );
        assert_eq!(steps("listener[0][2]"), [Step::Key("listener"), Step::Index(0), Step::Index(2)]);
    }

    #[test]
    fn fields_are_found_on_their_own_lines() {
        let text = "[pool.x]\npolicy = \"random\"\nretry = { max_attempts = 2,\n  budget_percent = -1.0 }\n\
                    endpoints = [\n  { address = \"127.0.0.1:1\" },\n  { address = \"127.0.0.1:2\", labels = { gpu = \"z\" } },\n]\n\
                    [pool.x.autoscale]\ntarget = 1.0\n\n[[listener]]\nname = \"a\"\n[[listener]]\nname = \"b\"\naddress = \"x\"\n";
        let at = Locator::new(text, None);
        let line = |path: &str| at.offset_of(&steps(path)).map(|o| at.line_of(o));
        assert_eq!(line("pool.x.retry.budget_percent"), Some(4));
        assert_eq!(line("pool.x.retry.nothing"), Some(3));
        assert_eq!(line("pool.x.endpoints[1].labels.gpu"), Some(7));
        assert_eq!(line("pool.x.autoscale.target"), Some(10));
        assert_eq!(line("listener[1].address"), Some(16));
        assert_eq!(line("route[0].pool"), None);
    }
}
