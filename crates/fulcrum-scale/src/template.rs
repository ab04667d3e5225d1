//! Command templates: a command line split into words without a shell, with `{name}`
//! placeholders filled in per replica.
//!
//! A template such as `fulcrum mock-backend --port {port} --seed {index}` is split once, when
//! it is parsed, by these rules (a small, predictable subset of the POSIX shell's):
//!
//! - blanks (spaces, tabs, newlines) separate words;
//! - `'...'` keeps everything inside as it is, blanks and backslashes included;
//! - `"..."` keeps everything inside as it is, except that `\"` and `\\` stand for `"` and `\`;
//! - outside quotes, `\` makes the next character an ordinary one (`\ ` is a space in a word);
//! - quotes may join parts of one word (`--name='a b'c` is `--name=a bc`); `''` is an empty word;
//! - nothing else is special: no variables, globs, pipes or redirections (`|`, `>`, `$HOME`
//!   and `~` reach the program as written). For those, run a shell yourself:
//!   `sh -c 'exec my-server --port {port} > /tmp/log-{index}'`.
//!
//! Then, in every word, quoted or not, `{name}` is replaced by the value of the placeholder
//! `name`. A placeholder is `{` + lowercase letters and `_` + `}`; a name the template's user
//! does not provide is refused when the template is parsed. Other braces are left alone (a
//! JSON argument such as `'{"a": 1}'` passes through), and a value never splits a word.
//!
//! ```
//! use fulcrum_scale::template::CommandTemplate;
//!
//! let t = CommandTemplate::parse("sh -c 'echo {replicas} > \"my file\"'", &["replicas"]).unwrap();
//! assert_eq!(t.expand(&[("replicas", "3")]), ["sh", "-c", "echo 3 > \"my file\""]);
//! assert!(CommandTemplate::parse("server --port {prot}", &["port", "index"]).is_err());
//! ```

use std::fmt;

/// A command line refused by [`CommandTemplate::parse`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No words at all.
    #[error("the command is empty")]
    Empty,
    /// A quote opened and never closed.
    #[error("the {quote} quote opened at character {at} is never closed")]
    UnclosedQuote {
        /// `'` or `"`.
        quote: char,
        /// Where it opened, counting characters from 1.
        at: usize,
    },
    /// A `\` as the very last character.
    #[error("the command ends with a lone backslash")]
    TrailingBackslash,
    /// A `{name}` that is not one of the known placeholders.
    #[error("unknown placeholder {{{name}}} (known: {known})")]
    UnknownPlaceholder {
        /// The name inside the braces.
        name: String,
        /// The placeholders this template may use, as `{a}, {b}`.
        known: String,
    },
}

/// A command line split into words, with placeholders to fill in; see the [module](self) docs.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    source: String,
    words: Vec<String>,
}

// === impl CommandTemplate ===

impl CommandTemplate {
    /// Splits `command` into words and checks that every placeholder is one of `known`.
    pub fn parse(command: &str, known: &[&str]) -> Result<Self, TemplateError> {
        let words = split(command)?;
        if words.is_empty() {
            return Err(TemplateError::Empty);
        }
        for word in &words {
            for name in placeholders(word) {
                if !known.contains(&name) {
                    let known = known.iter().map(|k| format!("{{{k}}}")).collect::<Vec<_>>().join(", ");
                    return Err(TemplateError::UnknownPlaceholder { name: name.to_owned(), known });
                }
            }
        }
        Ok(CommandTemplate { source: command.to_owned(), words })
    }

    /// The words with every `{name}` replaced by its value in `values` (a placeholder without a
    /// value is left as written). The first word is the program.
    pub fn expand(&self, values: &[(&str, &str)]) -> Vec<String> {
        self.words.iter().map(|w| expand_word(w, values)).collect()
    }

    /// The program: the first word, before expansion.
    pub fn program(&self) -> &str {
        self.words.first().map_or("", String::as_str)
    }

    /// The command line as it was written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for CommandTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CommandTemplate").field(&self.source).finish()
    }
}

impl fmt::Display for CommandTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Splits a command line into words by the rules of the module docs.
pub fn split(command: &str) -> Result<Vec<String>, TemplateError> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = command.chars().enumerate();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\\' => match chars.next() {
                Some((_, next)) => word.get_or_insert_default().push(next),
                None => return Err(TemplateError::TrailingBackslash),
            },
            '\'' | '"' => {
                let w = word.get_or_insert_default();
                loop {
                    match chars.next() {
                        Some((_, q)) if q == c => break,
                        Some((_, '\\')) if c == '"' => match chars.next() {
                            Some((_, e @ ('"' | '\\'))) => w.push(e),
                            Some((_, other)) => {
                                w.push('\\');
                                w.push(other);
                            }
                            None => return Err(TemplateError::UnclosedQuote { quote: c, at: i + 1 }),
                        },
                        Some((_, other)) => w.push(other),
                        None => return Err(TemplateError::UnclosedQuote { quote: c, at: i + 1 }),
                    }
                }
            }
            other => word.get_or_insert_default().push(other),
        }
    }
    words.extend(word);
    Ok(words)
}

/// The placeholder names in a word: `{` + `[a-z_]+` + `}`.
fn placeholders(word: &str) -> impl Iterator<Item = &str> {
    word.match_indices('{').filter_map(|(at, _)| placeholder_at(word, at))
}

/// The name of the placeholder that starts at byte `at` (a `{`), if one does.
fn placeholder_at(word: &str, at: usize) -> Option<&str> {
    let rest = &word[at + 1..];
    let end = rest.find('}')?;
    let name = &rest[..end];
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some(name)
}

fn expand_word(word: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        match placeholder_at(rest, at).and_then(|name| values.iter().find(|(k, _)| *k == name).map(|v| (name, v.1))) {
            Some((name, value)) => {
                out.push_str(value);
                rest = &rest[at + name.len() + 2..];
            }
            None => {
                out.push('{');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split(s).unwrap()
    }

    #[test]
    fn splits_on_blanks() {
        assert_eq!(words("  a  b\tc\nd "), ["a", "b", "c", "d"]);
        assert!(words("").is_empty());
        assert!(words("   ").is_empty());
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(words(r#"a 'b c' "d e""#), ["a", "b c", "d e"]);
        assert_eq!(words(r#"'it''s' "say \"hi\"" 'back\slash'"#), ["its", r#"say "hi""#, r"back\slash"]);
        assert_eq!(words(r#""a\nb" "c\\d""#), [r"a\nb", r"c\d"]);
        assert_eq!(words(r"a\ b \'x"), ["a b", "'x"]);
        assert_eq!(words("--name='a b'c"), ["--name=a bc"]);
        assert_eq!(words("x '' \"\""), ["x", "", ""]);
        assert_eq!(words("a|b > c $HOME ~"), ["a|b", ">", "c", "$HOME", "~"]);
    }

    #[test]
    fn refuses_broken_lines() {
        assert_eq!(split("a 'b"), Err(TemplateError::UnclosedQuote { quote: '\'', at: 3 }));
        assert_eq!(split("a \"b\\\""), Err(TemplateError::UnclosedQuote { quote: '"', at: 3 }));
        assert_eq!(split("a \\"), Err(TemplateError::TrailingBackslash));
        assert_eq!(CommandTemplate::parse(" ", &[]), Err(TemplateError::Empty));
    }

    #[test]
    fn expands_placeholders_inside_words() {
        let t =
            CommandTemplate::parse("srv --port={port} --seed {index} 'log-{index}.txt'", &["port", "index"]).unwrap();
        assert_eq!(t.expand(&[("port", "9100"), ("index", "2")]), ["srv", "--port=9100", "--seed", "2", "log-2.txt"]);
        assert_eq!(t.program(), "srv");
        assert_eq!(t.to_string(), "srv --port={port} --seed {index} 'log-{index}.txt'");
    }

    #[test]
    fn a_value_never_splits_a_word() {
        let t = CommandTemplate::parse("echo {replicas}", &["replicas"]).unwrap();
        assert_eq!(t.expand(&[("replicas", "1 2")]), ["echo", "1 2"]);
    }

    #[test]
    fn other_braces_pass_through() {
        let t = CommandTemplate::parse(r#"x '{"a": {port}}' {} {A} {port"#, &["port"]).unwrap();
        assert_eq!(t.expand(&[("port", "1")]), [r#"x"#, r#"{"a": 1}"#, "{}", "{A}", "{port"]);
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let err = CommandTemplate::parse("srv --port {prot}", &["port", "index"]).unwrap_err();
        assert_eq!(err.to_string(), "unknown placeholder {prot} (known: {port}, {index})");
    }

    #[test]
    fn missing_values_stay_as_written() {
        let t = CommandTemplate::parse("srv {port}", &["port"]).unwrap();
        assert_eq!(t.expand(&[]), ["srv", "{port}"]);
    }
}
