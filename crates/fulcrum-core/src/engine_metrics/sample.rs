//! One sample line of the Prometheus text exposition format (version 0.0.4), read in place.
//!
//! `name{label="value",...} value [timestamp]`: the name and the label values are borrowed
//! from the line, never copied; label values stay escaped until someone asks for them
//! ([`LabelValue::unescape`] allocates only when the value holds an escape). Whitespace
//! around the label tokens, a trailing comma in the label set, a `\r` at the end, a float
//! timestamp (OpenMetrics' seconds) and an OpenMetrics exemplar (`# {...} 1.0` after the
//! value) are tolerated. The cost is one pass over the line.

use std::borrow::Cow;

/// Longest line [`parse_sample`] reads, in bytes; longer ones are refused unread.
///
/// vLLM's `lora_requests_info` line, the longest that matters, lists adapter names and stays
/// far below this with hundreds of adapters.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Why a line is not a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The line is empty or blank.
    #[error("blank line")]
    Blank,
    /// The line is a comment (`# HELP`, `# TYPE` or any other `#` line).
    #[error("comment line")]
    Comment,
    /// The line is longer than [`MAX_LINE_LEN`].
    #[error("line longer than {MAX_LINE_LEN} bytes")]
    TooLong,
    /// The line does not start with a metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    #[error("no metric name")]
    Name,
    /// The label set is malformed: a bad label name, a missing `=`, `"` or `,`, or an
    /// unterminated value or set.
    #[error("malformed label set")]
    Labels,
    /// The value is missing or is not a number (`NaN`, `+Inf` and `-Inf` are numbers).
    #[error("missing or malformed value")]
    Value,
    /// Something other than a timestamp or an exemplar follows the value.
    #[error("malformed timestamp or trailing text")]
    Trailing,
}

/// A sample: a metric name, its labels and its value, borrowed from the line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The metric name as written, suffix included (`vllm:prefix_cache_hits_total`).
    pub name: &'a str,
    /// The value (`NaN` and the infinities included).
    pub value: f64,
    /// The timestamp as written: milliseconds in the Prometheus text format, seconds in
    /// OpenMetrics.
    pub timestamp: Option<f64>,
    /// The text between the braces, already checked to be a well-formed label set.
    labels: &'a str,
}

// === impl Sample ===

impl<'a> Sample<'a> {
    /// The labels, in the order written.
    pub fn labels(&self) -> Labels<'a> {
        Labels { rest: self.labels }
    }

    /// The value of the first label called `name`.
    pub fn label(&self, name: &str) -> Option<LabelValue<'a>> {
        self.labels().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// The labels of a [`Sample`]: `(name, value)` pairs.
#[derive(Clone, Debug)]
pub struct Labels<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, LabelValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The set was checked when the sample was parsed, so an error cannot happen here; if
        // it did, ending the iteration is the safe answer.
        match next_label(self.rest) {
            Ok(Some((name, value, rest))) => {
                self.rest = rest;
                Some((name, value))
            }
            _ => {
                self.rest = "";
                None
            }
        }
    }
}

/// A label value as written, escapes included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelValue<'a> {
    raw: &'a str,
}

// === impl LabelValue ===

impl<'a> LabelValue<'a> {
    /// The value as written between the quotes (`a\"b` for `a"b`).
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The value with `\\`, `\"` and `\n` resolved; borrowed unless it holds an escape. An
    /// unknown escape (`\t`) is kept as written, as Prometheus' own parser does.
    pub fn unescape(&self) -> Cow<'a, str> {
        if !self.raw.contains('\\') {
            return Cow::Borrowed(self.raw);
        }
        let mut out = String::with_capacity(self.raw.len());
        let mut chars = self.raw.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        }
        Cow::Owned(out)
    }

    /// Whether the unescaped value equals `s` (no allocation unless the value holds an
    /// escape).
    pub fn is(&self, s: &str) -> bool {
        if self.raw.contains('\\') { self.unescape() == s } else { self.raw == s }
    }

    /// The value read as a non-negative integer (`"16"`, and `"16.0"` too); `None` for
    /// anything else (`"None"`, `"-1"`, `"1.5"`).
    pub fn as_u64(&self) -> Option<u64> {
        let s = self.raw.trim();
        s.parse::<u64>().ok().or_else(|| s.parse::<f64>().ok().and_then(super::whole_u64))
    }
}

/// Reads one sample line; see [`try_parse_sample`] for why a line is refused.
///
/// Never panics, whatever the input: a fuzz target can call it directly.
///
/// ```
/// use fulcrum_core::engine_metrics::parse_sample;
/// let s = parse_sample(r#"vllm:num_requests_running{model_name="llama \"8B\"",engine="0"} 3.0"#).unwrap();
/// assert_eq!((s.name, s.value), ("vllm:num_requests_running", 3.0));
/// assert_eq!(s.label("model_name").unwrap().unescape(), r#"llama "8B""#);
/// assert_eq!(s.labels().count(), 2);
/// assert!(parse_sample("# TYPE vllm:num_requests_running gauge").is_none());
/// ```
pub fn parse_sample(line: &str) -> Option<Sample<'_>> {
    try_parse_sample(line).ok()
}

/// Reads one sample line, or says why it is not one.
pub fn try_parse_sample(line: &str) -> Result<Sample<'_>, SampleError> {
    if line.len() > MAX_LINE_LEN {
        return Err(SampleError::TooLong);
    }
    let line = line.trim_matches(is_space);
    let bytes = line.as_bytes();
    match bytes.first() {
        None => return Err(SampleError::Blank),
        Some(b'#') => return Err(SampleError::Comment),
        Some(_) => {}
    }
    let name_len = name_len(bytes);
    if name_len == 0 {
        return Err(SampleError::Name);
    }
    let (name, mut rest) = line.split_at(name_len);
    let mut labels = "";
    if let Some(set) = skip_space(rest).strip_prefix('{') {
        let end = label_set_len(set)?;
        labels = set.get(..end).ok_or(SampleError::Labels)?;
        rest = set.get(end + 1..).ok_or(SampleError::Labels)?;
    }
    // The value must be separated from the name or the label set.
    let after = skip_space(rest);
    if after.len() == rest.len() && !rest.is_empty() {
        return Err(SampleError::Value);
    }
    let (value, rest) = split_token(after);
    let value = parse_float(value).ok_or(SampleError::Value)?;
    let rest = skip_space(rest);
    let timestamp = if rest.is_empty() || rest.starts_with('#') {
        None
    } else {
        let (t, tail) = split_token(rest);
        let tail = skip_space(tail);
        if !(tail.is_empty() || tail.starts_with('#')) {
            return Err(SampleError::Trailing);
        }
        Some(parse_timestamp(t).ok_or(SampleError::Trailing)?)
    };
    Ok(Sample { name, value, timestamp, labels })
}

/// Bytes of a metric name (`[a-zA-Z0-9_:]`), as a table: the scan is one load per byte.
static NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        b += 1;
    }
    table
};

/// Length of the metric name at the start of `bytes`.
pub(super) fn name_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        Some(&b) if !b.is_ascii_digit() && NAME_BYTE[usize::from(b)] => {
            1 + bytes[1..].iter().take_while(|&&b| NAME_BYTE[usize::from(b)]).count()
        }
        _ => 0,
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r')
}

fn skip_space(s: &str) -> &str {
    s.trim_start_matches(is_space)
}

/// The first whitespace-delimited token, and the rest.
fn split_token(s: &str) -> (&str, &str) {
    s.split_at(s.find(is_space).unwrap_or(s.len()))
}

/// Rust's float syntax, which covers Prometheus' spellings (`NaN`, `+Inf`, `-Inf`, `1e-3`).
fn parse_float(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

fn parse_timestamp(s: &str) -> Option<f64> {
    let t = s.parse::<i64>().map(|t| t as f64).ok().or_else(|| s.parse::<f64>().ok())?;
    t.is_finite().then_some(t)
}

/// Length of the label set that `set` starts (just after the `{`): the index of its `}`.
fn label_set_len(set: &str) -> Result<usize, SampleError> {
    let mut rest = set;
    loop {
        match next_label(rest)? {
            Some((_, _, r)) => rest = r,
            None => {
                let r = skip_space(rest);
                return match r.strip_prefix('}') {
                    Some(_) => Ok(set.len() - r.len()),
                    None => Err(SampleError::Labels),
                };
            }
        }
    }
}

/// The label at the start of `s` and the text after it (and after its `,`, if any).
///
/// `Ok(None)` at the end of the set: at the end of `s` or at a `}`.
fn next_label(s: &str) -> Result<Option<(&str, LabelValue<'_>, &str)>, SampleError> {
    let s = skip_space(s);
    if s.is_empty() || s.starts_with('}') {
        return Ok(None);
    }
    let bytes = s.as_bytes();
    let len = name_len(bytes);
    // Label names have no colon.
    if len == 0 || bytes[..len].contains(&b':') {
        return Err(SampleError::Labels);
    }
    let (name, rest) = s.split_at(len);
    let rest = skip_space(rest).strip_prefix('=').ok_or(SampleError::Labels)?;
    let quoted = skip_space(rest).strip_prefix('"').ok_or(SampleError::Labels)?;
    let end = closing_quote(quoted.as_bytes()).ok_or(SampleError::Labels)?;
    let raw = quoted.get(..end).ok_or(SampleError::Labels)?;
    let rest = skip_space(quoted.get(end + 1..).ok_or(SampleError::Labels)?);
    let rest = match rest.as_bytes().first() {
        Some(b',') => &rest[1..],
        Some(b'}') | None => rest,
        Some(_) => return Err(SampleError::Labels),
    };
    Ok(Some((name, LabelValue { raw }, rest)))
}

/// Index of the closing `"` of a label value, skipping escaped characters.
fn closing_quote(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => return Some(i),
            // An escape's second byte is ASCII or starts a multi-byte character whose later
            // bytes are never `"` or `\`, so skipping one byte keeps the scan in step.
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &Sample<'_>) -> Vec<(String, String)> {
        s.labels().map(|(n, v)| (n.to_owned(), v.unescape().into_owned())).collect()
    }

    #[test]
    fn plain_and_labelled_samples() {
        let s = parse_sample("up 1").unwrap();
        assert_eq!((s.name, s.value, s.timestamp), ("up", 1.0, None));
        assert_eq!(s.labels().count(), 0);
        let s = parse_sample(r#"a:b_c{x="1",y=""} 2.5e3 1700000000000"#).unwrap();
        assert_eq!((s.name, s.value, s.timestamp), ("a:b_c", 2500.0, Some(1.7e12)));
        assert_eq!(labels(&s), [("x".into(), "1".into()), ("y".into(), String::new())]);
        let s = parse_sample("empty{} 3").unwrap();
        assert_eq!((s.name, s.value, s.labels().count()), ("empty", 3.0, 0));
    }

    #[test]
    fn escapes_in_label_values() {
        let s = parse_sample(r#"m{a="q\"uote",b="back\\slash",c="new\nline",d="odd\t",e="}{,="} 1"#).unwrap();
        assert_eq!(
            labels(&s),
            [
                ("a".into(), "q\"uote".into()),
                ("b".into(), "back\\slash".into()),
                ("c".into(), "new\nline".into()),
                ("d".into(), "odd\\t".into()),
                ("e".into(), "}{,=".into()),
            ]
        );
        assert!(s.label("a").unwrap().is("q\"uote"));
        assert!(matches!(s.label("e").unwrap().unescape(), Cow::Borrowed(_)));
    }

    #[test]
    fn special_values_and_timestamps() {
        assert!(parse_sample("m NaN").unwrap().value.is_nan());
        assert_eq!(parse_sample("m +Inf").unwrap().value, f64::INFINITY);
        assert_eq!(parse_sample("m -Inf").unwrap().value, f64::NEG_INFINITY);
        assert_eq!(parse_sample("m 1 -5").unwrap().timestamp, Some(-5.0));
        assert_eq!(parse_sample("m 1 1700000000.25").unwrap().timestamp, Some(1_700_000_000.25));
        // OpenMetrics exemplar after the value.
        assert_eq!(parse_sample(r#"m_bucket{le="1"} 4 # {trace_id="abc"} 0.5"#).unwrap().value, 4.0);
    }

    #[test]
    fn lenient_whitespace() {
        let s = parse_sample("  m { a = \"1\" , b=\"2\", }\t7 \r").unwrap();
        assert_eq!((s.name, s.value), ("m", 7.0));
        assert_eq!(labels(&s).len(), 2);
    }

    #[test]
    fn refusals() {
        for (line, why) in [
            ("", SampleError::Blank),
            ("  \r", SampleError::Blank),
            ("# HELP m help", SampleError::Comment),
            ("1m 1", SampleError::Name),
            ("{a=\"1\"} 1", SampleError::Name),
            ("m", SampleError::Value),
            ("m{} ", SampleError::Value),
            ("m x", SampleError::Value),
            ("m{a=\"1\"}2", SampleError::Value),
            ("m{a=\"1\" 2", SampleError::Labels),
            ("m{a=\"1} 2", SampleError::Labels),
            ("m{a=1} 2", SampleError::Labels),
            ("m{a:b=\"1\"} 2", SampleError::Labels),
            ("m{a=\"1\" b=\"2\"} 2", SampleError::Labels),
            ("m{,} 2", SampleError::Labels),
            ("m 1 2 3", SampleError::Trailing),
            ("m 1 later", SampleError::Trailing),
        ] {
            assert_eq!(try_parse_sample(line), Err(why), "{line:?}");
        }
        assert_eq!(try_parse_sample(&"m".repeat(MAX_LINE_LEN + 1)), Err(SampleError::TooLong));
    }

    #[test]
    fn label_value_numbers() {
        let v = |raw| LabelValue { raw }.as_u64();
        assert_eq!(v("16"), Some(16));
        assert_eq!(v("16.0"), Some(16));
        assert_eq!(v("None"), None);
        assert_eq!(v("-1"), None);
        assert_eq!(v("1.5"), None);
        assert_eq!(v("1e300"), None);
    }

    #[test]
    fn truncated_escape_does_not_panic() {
        for line in ["m{a=\"\\", "m{a=\"\\\"", "m{a=\"é\\é\"} 1", "m{a=\"\\é\"} 1"] {
            let _ = parse_sample(line).map(|s| labels(&s));
        }
        let s = parse_sample("m{a=\"x\\é\"} 1").unwrap();
        assert_eq!(s.label("a").unwrap().unescape(), "x\\é");
    }
}
