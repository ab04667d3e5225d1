//! Cost of reading a model server's `/metrics` page: a vLLM V1 page of about 2,000 lines (four
//! data-parallel engines, sixteen histograms each), the same page as bytes, and one sample
//! line. The proxy reads one page per backend every 200 ms.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fulcrum_core::engine_metrics::{parse, parse_bytes, parse_sample};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const HISTOGRAMS: [&str; 16] = [
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "time_per_output_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_inference_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_params_n",
    "request_params_max_tokens",
    "iteration_tokens_total",
    "request_max_num_generation_tokens",
    "kv_block_lifetime_seconds",
    "kv_block_idle_before_evict_seconds",
];
const ENGINES: usize = 4;
const BUCKETS: usize = 26;

/// A vLLM V1 page as `prometheus_client` prints it.
fn vllm_page() -> String {
    let mut out = String::with_capacity(256 * 1024);
    for i in 0..30 {
        let _ = writeln!(out, "# HELP python_gc_objects_collected_total Objects collected during gc");
        let _ = writeln!(out, "python_gc_objects_collected_total{{generation=\"{i}\"}} {}.0", 1000 + i);
    }
    let gauge = |out: &mut String, name: &str, value: &dyn Fn(usize) -> f64| {
        let _ = writeln!(out, "# HELP vllm:{name} A gauge.\n# TYPE vllm:{name} gauge");
        for e in 0..ENGINES {
            let _ = writeln!(out, "vllm:{name}{{engine=\"{e}\",model_name=\"{MODEL}\"}} {:?}", value(e));
        }
    };
    gauge(&mut out, "num_requests_running", &|e| (3 + e) as f64);
    gauge(&mut out, "num_requests_waiting", &|e| e as f64);
    gauge(&mut out, "kv_cache_usage_perc", &|e| 0.1 * (e + 1) as f64);
    for name in ["prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens"] {
        let _ = writeln!(out, "# HELP vllm:{name} A counter.\n# TYPE vllm:{name} counter");
        for e in 0..ENGINES {
            let _ = writeln!(out, "vllm:{name}_total{{engine=\"{e}\",model_name=\"{MODEL}\"}} {}.0", 1000 * (e + 1));
            let _ = writeln!(out, "vllm:{name}_created{{engine=\"{e}\",model_name=\"{MODEL}\"}} 1.7519e+09");
        }
    }
    for name in HISTOGRAMS {
        let _ = writeln!(out, "# HELP vllm:{name} A histogram.\n# TYPE vllm:{name} histogram");
        for e in 0..ENGINES {
            let labels = format!("engine=\"{e}\",model_name=\"{MODEL}\"");
            let _ = writeln!(out, "vllm:{name}_sum{{{labels}}} 1234.5");
            for b in 0..BUCKETS {
                let _ =
                    writeln!(out, "vllm:{name}_bucket{{{labels},le=\"{:?}\"}} {}.0", 0.001 * (1 << b) as f64, b * 7);
            }
            let _ = writeln!(out, "vllm:{name}_bucket{{{labels},le=\"+Inf\"}} 200.0");
            let _ = writeln!(out, "vllm:{name}_count{{{labels}}} 200.0");
            let _ = writeln!(out, "vllm:{name}_created{{{labels}}} 1.7519e+09");
        }
    }
    for e in 0..ENGINES {
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",\
             engine=\"{e}\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"27000\"}} 1.0"
        );
    }
    let _ = writeln!(
        out,
        "vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"sql-lora,chat-lora\",\
         waiting_lora_adapters=\"summarize\"}} 1.7519016e+09"
    );
    out
}

fn engine_metrics(c: &mut Criterion) {
    let page = vllm_page();
    let lines = page.lines().count();
    assert!((1_900..=2_300).contains(&lines), "{lines} lines");
    let m = parse(&page);
    assert_eq!((m.running, m.stats.malformed), (Some(18.0), 0));

    let mut group = c.benchmark_group("engine_metrics");
    group.throughput(Throughput::Bytes(page.len() as u64));
    group.bench_function(format!("parse/vllm_{lines}_lines"), |b| b.iter(|| parse(black_box(&page))));
    group.bench_function(format!("parse_bytes/vllm_{lines}_lines"), |b| {
        b.iter(|| parse_bytes(black_box(page.as_bytes())))
    });
    group.throughput(Throughput::Elements(1));
    let line = format!("vllm:num_requests_running{{engine=\"0\",model_name=\"{MODEL}\"}} 7.0");
    group.bench_function("parse_sample/gauge", |b| b.iter(|| parse_sample(black_box(&line))));
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .without_plots()
}

criterion_group! { name = benches; config = config(); targets = engine_metrics }
criterion_main!(benches);
