//! A strict reader of metrics pages: the Prometheus text format (0.0.4) and OpenMetrics
//! text. Strict enough to catch what a scraper rejects: `# TYPE` before a family's samples
//! and only once, valid metric and label names, no label twice, numeric values, counters'
//! samples in `_total`, histogram buckets cumulative per series with `+Inf` equal to
//! `_count`, and each format's ending.

use std::collections::BTreeMap;

/// Which text format a page claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: ends with a newline; blank lines allowed.
    Prometheus,
    /// `application/openmetrics-text`: ends with `# EOF`; `# UNIT` allowed; no blank lines.
    OpenMetrics,
}

/// A sample's labels, by name.
pub type Labels = BTreeMap<String, String>;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// A page that passed the checks.
#[derive(Debug)]
pub struct Exposition {
    /// Families as (name, type), in page order.
    pub families: Vec<(String, String)>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples named `name` whose labels include every pair of `want`.
    pub fn matching<'a>(&'a self, name: &'a str, want: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of [`Exposition::matching`]'s values.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|s| s.value).sum()
    }
}

/// Checks `text` as `format` (panicking with the first problem) and returns what it holds.
pub fn check(text: &str, format: Format) -> Exposition {
    let types: &[&str] = match format {
        Format::Prometheus => {
            assert!(text.ends_with('\n'), "the page must end with a newline");
            &["counter", "gauge", "histogram", "summary", "untyped"]
        }
        Format::OpenMetrics => {
            assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
            &["counter", "gauge", "histogram", "gaugehistogram", "summary", "info", "stateset", "unknown"]
        }
    };
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" && format == Format::OpenMetrics {
            assert_eq!(i + 1, lines.len(), "# EOF before the end");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "bad family name {name:?}");
            assert!(types.contains(&kind), "type {kind:?} of {name} is not one of {types:?}");
            assert!(families.iter().all(|(n, _)| n != name), "second TYPE for {name}");
            families.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with("# HELP ") || (format == Format::OpenMetrics && line.starts_with("# UNIT ")) {
            continue;
        }
        if line.is_empty() && format == Format::Prometheus {
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "stray line {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value = number(value).unwrap_or_else(|| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, labels(l.strip_suffix('}').unwrap_or_else(|| panic!("no closing brace: {line:?}")))),
            None => (series, Labels::new()),
        };
        assert!(valid_name(name), "bad metric name {name:?}");
        let (family, kind) = families
            .iter()
            .rev()
            .find(|(f, _)| {
                name == f || ["_total", "_bucket", "_sum", "_count"].iter().any(|s| name == format!("{f}{s}"))
            })
            .unwrap_or_else(|| panic!("sample {name} before its TYPE"));
        match kind.as_str() {
            "counter" => assert_eq!(name, format!("{family}_total"), "counter samples end in _total"),
            "gauge" => assert_eq!(name, family, "a gauge's samples carry its name"),
            _ => {}
        }
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    let page = Exposition { families, samples };
    check_histograms(&page);
    page
}

/// Per histogram series (the labels but `le`): buckets cumulative, the last one `+Inf` and
/// equal to `_count`.
fn check_histograms(page: &Exposition) {
    for (family, _) in page.families.iter().filter(|(_, k)| k == "histogram") {
        let (bucket, count) = (format!("{family}_bucket"), format!("{family}_count"));
        for c in page.samples.iter().filter(|s| s.name == count) {
            let mut buckets: Vec<(f64, f64)> = page
                .samples
                .iter()
                .filter(|s| {
                    s.name == bucket
                        && s.labels.iter().filter(|(k, _)| *k != "le").all(|(k, v)| c.labels.get(k) == Some(v))
                })
                .map(|s| {
                    let le = s.labels.get("le").unwrap_or_else(|| panic!("{bucket} without le"));
                    (number(le).unwrap_or_else(|| panic!("bad le {le:?}")), s.value)
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family} {:?}: buckets not cumulative", c.labels);
            let inf = buckets.last().unwrap_or_else(|| panic!("{family} {:?}: no buckets", c.labels));
            assert!(inf.0.is_infinite() && inf.1 == c.value, "{family} {:?}: +Inf bucket != _count", c.labels);
        }
    }
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        v => v.parse().ok(),
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `a="x",b="y"`, with `\"`, `\\` and `\n` escapes.
fn labels(s: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels {s:?}"));
        assert!(valid_name(name) && !name.contains(':'), "bad label name {name:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next().unwrap_or_else(|| panic!("unterminated label {s:?}"));
            match c {
                '\\' => match chars.next().unwrap_or_else(|| panic!("escape at the end of {s:?}")).1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c} in {s:?}"),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        assert!(out.insert(name.to_owned(), value).is_none(), "label {name} twice in {s:?}");
        rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_page_is_read() {
        let page = check(
            "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{pool=\"p\",why=\"say \\\"hi\\\"\"} 3\n\
             # TYPE a_latency histogram\na_latency_bucket{le=\"0.1\"} 1\na_latency_bucket{le=\"+Inf\"} 2\n\
             a_latency_sum 0.3\na_latency_count 2\n# EOF\n",
            Format::OpenMetrics,
        );
        assert_eq!(page.families.len(), 2);
        assert_eq!(page.sum("a_requests_total", &[("pool", "p")]), 3.0);
        assert_eq!(page.samples[0].labels["why"], "say \"hi\"");
    }

    fn fails(text: &str, format: Format) -> bool {
        std::panic::catch_unwind(|| check(text, format)).is_err()
    }

    #[test]
    fn what_a_scraper_rejects_is_refused() {
        use Format::*;
        assert!(fails("# TYPE a counter\na_total 1\n", OpenMetrics), "no # EOF");
        assert!(fails("# TYPE a counter\na_total 1", Prometheus), "no final newline");
        assert!(fails("a 1\n", Prometheus), "sample before TYPE");
        assert!(fails("# TYPE a counter\na 1\n", Prometheus), "counter without _total");
        assert!(fails("# TYPE a gauge\n# TYPE a gauge\na 1\n", Prometheus), "TYPE twice");
        assert!(fails("# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n", Prometheus), "label twice");
        assert!(fails("# TYPE a gauge\na one\n", Prometheus), "not a number");
        assert!(fails("# TYPE 1a gauge\n", Prometheus), "bad name");
        assert!(fails("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", Prometheus));
        assert!(fails("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", Prometheus), "+Inf != count");
        assert!(fails("# TYPE a gauge\n\na 1\n# EOF\n", OpenMetrics), "blank line");
    }
}
