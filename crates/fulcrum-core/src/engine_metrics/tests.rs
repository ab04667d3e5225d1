//! Whole pages: one fixture per engine and version, and the fulcrum mock backend's output.

use super::*;

const VLLM_V1: &str = include_str!("testdata/vllm_v1.prom");
const VLLM_V0: &str = include_str!("testdata/vllm_v0.prom");
const SGLANG: &str = include_str!("testdata/sglang.prom");
const SGLANG_UNDERSCORE: &str = include_str!("testdata/sglang_underscore.prom");
const TRITON: &str = include_str!("testdata/triton_trtllm.prom");
const TRTLLM_SERVE: &str = include_str!("testdata/trtllm_serve.prom");
const MOCK_VLLM: &str = include_str!("testdata/mock_vllm.prom");
const MOCK_SGLANG: &str = include_str!("testdata/mock_sglang.prom");

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn vllm_v1_with_two_engines() {
    let m = parse(VLLM_V1);
    assert_eq!(m.flavor, Some(Flavor::Vllm));
    assert_eq!((m.running, m.waiting), (Some(12.0), Some(2.0)));
    assert!(close(m.kv_cache_usage, 0.35), "{:?}", m.kv_cache_usage);
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(54_000)));
    assert_eq!(m.prefix_cache, Some(PrefixCacheCounters { queries: 200_000.0, hits: 80_000.0 }));
    assert!(close(m.prefix_cache_hit_rate, 0.4));
    assert_eq!(m.preemptions, Some(4.0));
    // The newest of three LoRA series.
    assert_eq!(m.running_loras, ["sql-lora", "chat-lora"]);
    assert_eq!(m.waiting_loras, ["summarize"]);
    assert_eq!(m.max_loras, Some(4));
    assert_eq!(m.max_running, None);
    assert_eq!(m.stats.malformed, 0);
    assert!(!m.stats.truncated);
    assert_eq!(m.stats.samples, 17);
}

#[test]
fn vllm_v0_names() {
    let m = parse(VLLM_V0);
    assert_eq!(m.flavor, Some(Flavor::Vllm));
    assert_eq!((m.running, m.waiting), (Some(4.0), Some(9.0)));
    assert!(close(m.kv_cache_usage, 0.9612));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(7907)));
    assert_eq!(m.prefix_cache, None);
    assert!(close(m.prefix_cache_hit_rate, 0.35));
    assert_eq!(m.preemptions, Some(17.0));
    assert!(m.running_loras.is_empty() && m.waiting_loras.is_empty());
    assert_eq!(m.max_loras, Some(2));
}

#[test]
fn sglang_colon_names() {
    let m = parse(SGLANG);
    assert_eq!(m.flavor, Some(Flavor::Sglang));
    assert_eq!((m.running, m.waiting), (Some(162.0), Some(2826.0)));
    assert!(close(m.kv_cache_usage, 0.28));
    assert_eq!((m.kv_tokens_used, m.kv_tokens_total), (Some(123_859.0), Some(442_355)));
    // Cached tokens are summed over their `cache_source`.
    let c = m.prefix_cache.unwrap();
    assert_eq!((c.queries, c.hits), (8_128_902.0, 2_032_451.0));
    assert!(close(m.prefix_cache_hit_rate, 2_032_451.0 / 8_128_902.0));
    assert_eq!(m.preemptions, Some(6.0));
    assert_eq!((m.num_gpu_blocks, m.block_size), (None, None));
}

#[test]
fn sglang_underscore_names_over_two_ranks() {
    let m = parse(SGLANG_UNDERSCORE);
    assert_eq!(m.flavor, Some(Flavor::Sglang));
    assert_eq!((m.running, m.waiting), (Some(4.0), Some(4.0)));
    // No token_usage: used / total over both ranks.
    assert!(close(m.kv_cache_usage, 0.2));
    assert_eq!(m.kv_tokens_total, Some(20_000));
    assert!(close(m.prefix_cache_hit_rate, 0.375));
}

#[test]
fn triton_tensorrt_llm_backend() {
    let m = parse(TRITON);
    assert_eq!(m.flavor, Some(Flavor::TensorRtLlm));
    assert_eq!((m.running, m.waiting, m.max_running), (Some(7.0), Some(3.0), Some(512.0)));
    assert!(close(m.kv_cache_usage, 0.25));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(64), Some(8000)));
    assert_eq!(m.prefix_cache_hit_rate, None);
    // Without `active` and `fraction` (older backends): `scheduled`, and used / max blocks.
    let old = TRITON
        .lines()
        .filter(|l| !l.contains("\"active\"") && !l.contains("\"fraction\""))
        .map(|l| l.replace("_metrics", "_statistics"))
        .collect::<Vec<_>>()
        .join("\n");
    let m = parse(&old);
    assert_eq!(m.running, Some(4.0));
    assert!(close(m.kv_cache_usage, 0.25));
}

#[test]
fn trtllm_serve_names() {
    let m = parse(TRTLLM_SERVE);
    assert_eq!(m.flavor, Some(Flavor::TensorRtLlm));
    assert_eq!((m.running, m.waiting, m.max_running), (Some(12.0), Some(1.0), Some(64.0)));
    assert!(close(m.kv_cache_usage, 0.62));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(32), Some(4096)));
    assert_eq!(m.prefix_cache, Some(PrefixCacheCounters { queries: 2000.0, hits: 600.0 }));
    assert!(close(m.prefix_cache_hit_rate, 0.3));
}

#[test]
fn fulcrum_mock_backend_both_flavors() {
    let m = parse(MOCK_VLLM);
    assert_eq!(m.flavor, Some(Flavor::Vllm));
    assert_eq!((m.running, m.waiting), (Some(2.0), Some(1.0)));
    // Both usage names are printed: the current one is read, not both.
    assert_eq!(m.kv_cache_usage, Some(0.1));
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(16), Some(100)));
    assert_eq!(m.prefix_cache, Some(PrefixCacheCounters { queries: 200.0, hits: 50.0 }));
    assert_eq!(m.prefix_cache_hit_rate, Some(0.25));
    assert_eq!((m.running_loras.as_slice(), m.max_loras), (&["a".to_owned()][..], Some(1)));
    assert_eq!(m.stats.malformed, 0);

    let m = parse(MOCK_SGLANG);
    assert_eq!(m.flavor, Some(Flavor::Sglang));
    assert_eq!((m.running, m.waiting, m.max_running), (Some(2.0), Some(1.0), Some(2.0)));
    assert_eq!(m.kv_cache_usage, Some(0.1));
    assert_eq!(m.kv_tokens_used, Some(160.0));
    assert_eq!(m.prefix_cache, None);
    assert_eq!(m.prefix_cache_hit_rate, Some(0.25));
    assert_eq!(m.stats.malformed, 0);
}

#[test]
fn crlf_blank_lines_and_garbage() {
    let page = "\r\n# TYPE vllm:num_requests_running gauge\r\n\r\nvllm:num_requests_running 3\r\n\
                %%% garbage\r\n{\"json\": true}\r\nvllm:num_requests_waiting{a=\"} 1\r\n\
                vllm:num_requests_waiting{a=\"b\"} many\r\n  \r\nvllm:num_requests_waiting 2 1700000000000\r\n";
    let m = parse(page);
    assert_eq!((m.running, m.waiting), (Some(3.0), Some(2.0)));
    assert_eq!(m.stats.malformed, 4);
    assert_eq!(m.stats.samples, 2);
    assert_eq!(m.stats.lines, 8);
}

#[test]
fn special_values_are_unknown() {
    let page = "vllm:num_requests_running{engine=\"0\"} NaN\nvllm:num_requests_running{engine=\"1\"} 2\n\
                vllm:num_requests_waiting +Inf\nvllm:kv_cache_usage_perc -1\nvllm:gpu_cache_usage_perc 1.5\n";
    let m = parse(page);
    assert_eq!(m.running, Some(2.0));
    assert_eq!(m.waiting, None);
    // The current name's only sample is negative, so the V0 name is read, and clamped.
    assert_eq!(m.kv_cache_usage, Some(1.0));
}

#[test]
fn escaped_lora_names_and_ties() {
    let page = "vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"we\\\"ird, b\",waiting_lora_adapters=\"\"} 5 10\n\
                vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 5 9\n\
                vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"nan\",waiting_lora_adapters=\"\"} NaN\n";
    let m = parse(page);
    assert_eq!(m.running_loras, ["we\"ird", "b"]);
    assert_eq!(m.max_loras, Some(8));
    assert!(!m.is_empty());
}

#[test]
fn first_engine_wins_on_a_mixed_page() {
    let m = parse("sglang:num_running_reqs 4\nvllm:num_requests_running 9\nsglang:num_queue_reqs 1\n");
    assert_eq!(m.flavor, Some(Flavor::Sglang));
    assert_eq!((m.running, m.waiting), (Some(4.0), Some(1.0)));
}

#[test]
fn empty_and_foreign_pages() {
    for page in ["", "\n\n", "# HELP x y\n", "process_cpu_seconds_total 1\nup 1\n", "<html>404</html>"] {
        let m = parse(page);
        assert!(m.is_empty(), "{page:?}");
        assert_eq!(m.flavor, None);
    }
    assert_eq!(parse("<html>404</html>").stats.malformed, 1);
}

#[test]
fn bytes_with_invalid_utf8() {
    let mut body = b"vllm:num_requests_running{model_name=\"caf".to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"\"} 6\n\xc3\nvllm:num_requests_waiting 1\n");
    let m = parse_bytes(&body);
    assert_eq!((m.running, m.waiting), (Some(6.0), Some(1.0)));
    assert_eq!(m.stats.malformed, 1);
    assert_eq!(parse_bytes(VLLM_V1.as_bytes()), parse(VLLM_V1));
    // A byte-order mark is not part of the first line.
    assert_eq!(parse(&format!("\u{feff}{MOCK_VLLM}")), parse(MOCK_VLLM));
}

#[test]
fn bounded_work() {
    let mut page = "vllm:num_requests_running 1\n".repeat(MAX_LINES);
    assert!(!parse(&page).stats.truncated);
    page.push_str("vllm:num_requests_waiting 1\n");
    let m = parse(&page);
    assert!(m.stats.truncated);
    assert_eq!(m.running, Some(MAX_LINES as f64));
    assert_eq!(m.waiting, None);
    let long =
        format!("vllm:num_requests_waiting{{a=\"{}\"}} 1\nvllm:num_requests_running 1\n", "x".repeat(MAX_LINE_LEN));
    let m = parse(&long);
    assert_eq!((m.running, m.waiting, m.stats.malformed), (Some(1.0), None, 1));
}

#[test]
fn hit_rate_between_scrapes() {
    let before = parse(VLLM_V1);
    let mut after = before.clone();
    after.prefix_cache = Some(PrefixCacheCounters { queries: 210_000.0, hits: 89_000.0 });
    assert!(close(after.recent_prefix_cache_hit_rate(&before), 0.9));
    // Nothing looked up in between: no evidence.
    assert_eq!(before.recent_prefix_cache_hit_rate(&before), None);
    // The engine restarted: its counters started again from zero.
    let restarted = EngineMetrics { prefix_cache: Some(PrefixCacheCounters { queries: 100.0, hits: 10.0 }), ..after };
    assert!(close(restarted.recent_prefix_cache_hit_rate(&before), 0.1));
    // No counters (vLLM V0): the engine's own gauge.
    let v0 = parse(VLLM_V0);
    assert!(close(v0.recent_prefix_cache_hit_rate(&v0), 0.35));
}

#[test]
fn counter_helpers() {
    let c = |queries, hits| PrefixCacheCounters { queries, hits };
    assert_eq!(c(0.0, 0.0).hit_rate(), None);
    assert_eq!(c(10.0, 20.0).hit_rate(), Some(1.0));
    assert_eq!(c(10.0, 5.0).hit_rate_since(&c(f64::NAN, 0.0)), None);
    // Only the hits went down: still a restart, both counted from zero.
    assert_eq!(c(110.0, 5.0).hit_rate_since(&c(100.0, 50.0)), Some(5.0 / 110.0));
    assert_eq!(counter_increase(-1.0, 3.0), None);
    assert_eq!(counter_increase(3.0, f64::INFINITY), None);
    assert_eq!(counter_increase(3.0, 3.0), Some(0.0));
}

#[test]
fn whole_numbers() {
    assert_eq!(whole_u64(3.0), Some(3));
    assert_eq!(whole_u64(3.5), None);
    assert_eq!(whole_u64(-0.0), Some(0));
    assert_eq!(whole_u64(f64::NAN), None);
    assert_eq!(whole_u64(1e20), None);
}
