//! Property tests of the engine-metrics parser: no input makes it panic or report a number out
//! of range, and the line parser reads back what a writer of the text format wrote.
//!
//! Each property is a plain function of its input, so a fuzz target can call the same code:
//! `fulcrum_core::engine_metrics::{parse_bytes, parse_sample}`.

use fulcrum_core::engine_metrics::{
    EngineMetrics, PrefixCacheCounters, Sample, counter_increase, parse, parse_bytes, parse_sample,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const FIXTURES: [&str; 8] = [
    include_str!("../../src/engine_metrics/testdata/vllm_v1.prom"),
    include_str!("../../src/engine_metrics/testdata/vllm_v0.prom"),
    include_str!("../../src/engine_metrics/testdata/sglang.prom"),
    include_str!("../../src/engine_metrics/testdata/sglang_underscore.prom"),
    include_str!("../../src/engine_metrics/testdata/triton_trtllm.prom"),
    include_str!("../../src/engine_metrics/testdata/trtllm_serve.prom"),
    include_str!("../../src/engine_metrics/testdata/mock_vllm.prom"),
    include_str!("../../src/engine_metrics/testdata/mock_sglang.prom"),
];

/// What holds for any page, however broken.
fn check(m: &EngineMetrics) {
    let counts = [m.running, m.waiting, m.max_running, m.kv_tokens_used, m.preemptions];
    for v in counts.into_iter().flatten() {
        assert!(v.is_finite() && v >= 0.0, "{m:?}");
    }
    for v in [m.kv_cache_usage, m.prefix_cache_hit_rate].into_iter().flatten() {
        assert!((0.0..=1.0).contains(&v), "{m:?}");
    }
    if let Some(c) = m.prefix_cache {
        assert!(c.queries.is_finite() && c.queries >= 0.0 && c.hits.is_finite() && c.hits >= 0.0, "{m:?}");
    }
    let s = m.stats;
    assert!(u64::from(s.samples) + u64::from(s.malformed) <= u64::from(s.lines), "{s:?}");
    if m.flavor.is_none() {
        assert!(m.is_empty(), "{m:?}");
    }
}

/// Everything a sample offers, read to the end.
fn walk(s: &Sample<'_>, line: &str) {
    assert!(!s.name.is_empty() && line.contains(s.name));
    let mut n = 0;
    for (name, value) in s.labels() {
        assert!(!name.is_empty());
        let _ = value.unescape();
        let _ = value.as_u64();
        n += 1;
        assert!(n <= line.len(), "labels never end");
    }
}

/// Lines built from the tokens that matter to the parser, so that random input reaches the
/// label and value code, not only the first-byte check.
fn tokens() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("vllm:num_requests_running"),
        Just("vllm:kv_cache_usage_perc"),
        Just("vllm:lora_requests_info"),
        Just("vllm:cache_config_info"),
        Just("sglang_token_usage"),
        Just("nv_trt_llm_kv_cache_block_metrics"),
        Just("trtllm_kv_cache_reused_blocks_total"),
        Just("running_lora_adapters"),
        Just("block_size"),
        Just("kv_cache_block_type"),
        Just("{"),
        Just("}"),
        Just("\""),
        Just("\\"),
        Just("="),
        Just(","),
        Just(" "),
        Just("\t"),
        Just("\n"),
        Just("\r\n"),
        Just("#"),
        Just("NaN"),
        Just("+Inf"),
        Just("-1"),
        Just("0.5"),
        Just("1e308"),
        Just("é"),
    ];
    prop::collection::vec(prop_oneof![token.prop_map(str::to_owned), "[a-z0-9_:.]{1,6}"], 0..80)
        .prop_map(|parts| parts.concat())
}

/// One byte-level edit of a page.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), prop_oneof![Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'\n'), any::<u8>()])
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(page: &mut Vec<u8>, edit: &Edit) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    let len = page.len();
    match *edit {
        Edit::Flip(i, b) if len > 0 => page[at(i, len)] = b,
        Edit::Insert(i, b) => page.insert(at(i, len + 1), b),
        Edit::Delete(i) if len > 0 => {
            page.remove(at(i, len));
        }
        Edit::Truncate(i) => page.truncate(at(i, len + 1)),
        _ => {}
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{value:e}")
    }
}

proptest! {
    // A fixed seed: CI explores the same cases every run, and a failure replays exactly.
    #![proptest_config(ProptestConfig { cases: 512, rng_seed: RngSeed::Fixed(0xF01C_2026), ..ProptestConfig::default() })]

    #[test]
    fn any_string_is_read_without_panic(text in any::<String>()) {
        check(&parse(&text));
        for line in text.lines() {
            if let Some(s) = parse_sample(line) {
                walk(&s, line);
            }
        }
    }

    #[test]
    fn any_bytes_are_read_without_panic(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        check(&parse_bytes(&body));
    }

    #[test]
    fn token_soup_is_read_without_panic(text in tokens()) {
        check(&parse(&text));
        for line in text.split('\n') {
            if let Some(s) = parse_sample(line) {
                walk(&s, line);
            }
        }
    }

    #[test]
    fn mutated_fixtures_are_read_without_panic(
        which in 0..FIXTURES.len(),
        edits in prop::collection::vec(edit(), 1..24),
    ) {
        let mut page = FIXTURES[which].as_bytes().to_vec();
        for e in &edits {
            apply(&mut page, e);
        }
        let m = parse_bytes(&page);
        check(&m);
        for line in String::from_utf8_lossy(&page).split('\n') {
            if let Some(s) = parse_sample(line) {
                walk(&s, line);
            }
        }
    }

    #[test]
    fn samples_read_back_as_written(
        name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,24}",
        labels in prop::collection::vec(("[a-zA-Z_][a-zA-Z0-9_]{0,12}", any::<String>()), 0..6),
        value in any::<f64>(),
        timestamp in proptest::option::of(any::<i64>()),
        crlf in any::<bool>(),
    ) {
        let mut line = name.clone();
        if !labels.is_empty() {
            let set: Vec<String> = labels.iter().map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
            line.push_str(&format!("{{{}}}", set.join(",")));
        }
        line.push(' ');
        line.push_str(&render(value));
        if let Some(t) = timestamp {
            line.push_str(&format!(" {t}"));
        }
        if crlf {
            line.push('\r');
        }
        let s = parse_sample(&line).expect("a well-formed line parses");
        prop_assert_eq!(s.name, name.as_str());
        prop_assert!(s.value.to_bits() == value.to_bits() || (s.value.is_nan() && value.is_nan()));
        prop_assert_eq!(s.timestamp, timestamp.map(|t| t as f64));
        let read: Vec<(String, String)> =
            s.labels().map(|(n, v)| (n.to_owned(), v.unescape().into_owned())).collect();
        prop_assert_eq!(read, labels);
    }

    #[test]
    fn recent_hit_rate_is_a_rate(
        before in (0.0..1e12f64, 0.0..1e12f64),
        after in (0.0..1e12f64, 0.0..1e12f64),
    ) {
        let c = |(queries, hits)| PrefixCacheCounters { queries, hits };
        let (earlier, later) = (c(before), c(after));
        if let Some(r) = later.hit_rate_since(&earlier) {
            prop_assert!((0.0..=1.0).contains(&r));
        }
        let dq = counter_increase(earlier.queries, later.queries).unwrap();
        prop_assert!(dq >= 0.0);
        // Without a reset, the rate is the hits gained per query made.
        if later.queries > earlier.queries && later.hits >= earlier.hits {
            let dh = later.hits - earlier.hits;
            let expected = (dh / (later.queries - earlier.queries)).min(1.0);
            prop_assert_eq!(later.hit_rate_since(&earlier), Some(expected));
        }
    }
}
