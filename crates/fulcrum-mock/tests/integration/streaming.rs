//! End to end over real sockets: streaming, the performance model, metrics, endpoints.

use crate::common;

use std::time::Duration;

use common::*;
use fulcrum_mock::engine::EngineConfig;
use fulcrum_mock::{MetricsFlavor, MockConfig};
use fulcrum_testkit::exposition::{self, Format};
use serde_json::{Value, json};

#[tokio::test]
async fn chunks_arrive_spaced_by_the_inter_token_latency() {
    let server = start(config(40)).await;
    let events =
        open_stream(server.local_addr(), "/v1/chat/completions", &chat("mock-llm", "hi", 8)).await.collect().await;
    assert!(events.last().unwrap().data.is_none(), "ends with [DONE]");
    let usage = events[events.len() - 2].data.as_ref().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    let tokens: Vec<&Event> = events.iter().filter(|e| e.token().is_some()).collect();
    assert_eq!(tokens.len(), 8, "one chunk per token");
    let first = tokens[0].data.as_ref().unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(tokens[7].data.as_ref().unwrap()["choices"][0]["finish_reason"], "length");
    assert!(tokens[..7].iter().all(|e| e.data.as_ref().unwrap()["choices"][0]["finish_reason"].is_null()));
    let mut gaps: Vec<Duration> = tokens.windows(2).map(|w| w[1].at - w[0].at).collect();
    let span = tokens[7].at - tokens[0].at;
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    // Modelled: 40 ms a token. Lower bounds are tight (the mock is never early); upper bounds
    // leave room for a loaded machine.
    assert!(span >= Duration::from_millis(7 * 40 - 10), "7 gaps of 40 ms took {span:?}");
    assert!(span < Duration::from_millis(7 * 40 * 4), "7 gaps took {span:?}");
    assert!(median >= Duration::from_millis(30) && median < Duration::from_millis(120), "median gap {median:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_repeated_long_prefix_has_a_lower_time_to_first_token() {
    let mut cfg = config(5);
    cfg.engine.prefill_tokens_per_sec = 4000.0; // a 2,000-token prompt takes 500 ms
    let server = start(cfg).await;
    let document = "lorem ipsum dolor sit amet ".repeat(300); // 8,100 characters, about 2,025 tokens
    let ask = |question: &str| chat("mock-llm", &format!("{document}\n{question}"), 2);
    let ttft = |events: &[Event], sent| events.iter().find(|e| e.token().is_some()).unwrap().at - sent;
    let cached = |events: &[Event]| {
        events[events.len() - 2].data.as_ref().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };

    let first = open_stream(server.local_addr(), "/v1/chat/completions", &ask("What is it?")).await;
    let sent = first.sent;
    let first = first.collect().await;
    let second = open_stream(server.local_addr(), "/v1/chat/completions", &ask("Summarise it.")).await;
    let sent2 = second.sent;
    let second = second.collect().await;

    let (t1, t2) = (ttft(&first, sent), ttft(&second, sent2));
    assert_eq!(cached(&first), 0);
    assert!(cached(&second) >= 1900, "cached {}", cached(&second));
    assert!(t1 >= Duration::from_millis(450), "first TTFT {t1:?}");
    assert!(t2 * 4 < t1, "second TTFT {t2:?} should be far below the first {t1:?}");
    let stats = server.stats();
    assert!(stats.counters.prefix_hits >= 1900);
    assert!(stats.kv_blocks_cached > 100, "the prompt blocks stay cached");
    server.shutdown().await;
}

#[tokio::test]
async fn one_batch_slot_serves_two_requests_one_after_the_other() {
    let mut cfg = config(20);
    cfg.engine.max_num_seqs = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut a = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "first", 40)).await;
    a.next().await.expect("a's first token");
    // Read both streams as they come, each in its own task, so arrival times are true.
    let a = tokio::spawn(a.collect());
    // `a` holds the only slot for about 800 ms more: `b` waits for it.
    let b = tokio::spawn(async move {
        open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "second", 3)).await.collect().await
    });
    let text = wait_for_metric(addr, "vllm:num_requests_waiting", 1.0).await;
    assert_eq!(sample(&text, "vllm:num_requests_running"), Some(1.0));
    let load = get(addr, "/load").await.json();
    assert_eq!((load["running"].as_u64(), load["waiting"].as_u64()), (Some(1), Some(1)));
    let a_events = a.await.unwrap();
    let a_done = a_events.last().unwrap().at;
    let b_events = b.await.unwrap();
    let b_first = b_events.iter().find(|e| e.token().is_some()).unwrap().at;
    assert!(b_first >= a_done, "b's first token must come after a ended");
    wait_for_metric(addr, "vllm:num_requests_waiting", 0.0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn whole_answers_match_their_streams() {
    let server = start(config(1)).await;
    let addr = server.local_addr();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "mock-llm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6, "seed": 7}),
        ),
        ("/v1/completions", json!({"model": "mock-llm", "prompt": "once upon a time", "max_tokens": 6, "seed": 7})),
    ] {
        let whole = post(addr, path, &body).await;
        assert_eq!(whole.status, 200);
        let whole = whole.json();
        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        let streamed: String = open_stream(addr, path, &streamed_body)
            .await
            .collect()
            .await
            .iter()
            .filter_map(|e| e.token().map(str::to_owned))
            .collect();
        let choice = &whole["choices"][0];
        let text = choice["message"]["content"].as_str().or(choice["text"].as_str()).unwrap();
        assert_eq!(text, streamed, "{path}");
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(whole["usage"]["completion_tokens"], 6);
        assert_eq!(whole["usage"]["total_tokens"], whole["usage"]["prompt_tokens"].as_u64().unwrap() + 6);
    }
    // Without max_tokens the length comes from the seeded distribution: 8 tokens, "stop".
    let drawn = post(addr, "/v1/completions", &json!({"model": "mock-llm", "prompt": [1, 2, 3]})).await.json();
    assert_eq!(drawn["choices"][0]["finish_reason"], "stop");
    assert_eq!(drawn["usage"]["completion_tokens"], 8);
    assert_eq!(drawn["usage"]["prompt_tokens"], 3);
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_in_both_flavors() {
    for flavor in [MetricsFlavor::Vllm, MetricsFlavor::Sglang] {
        let mut cfg = config(1);
        cfg.loras = vec!["sql-lora".into()];
        cfg.server.metrics_flavor = flavor;
        let server = start(cfg).await;
        let addr = server.local_addr();
        for model in ["mock-llm", "sql-lora"] {
            let r = post(addr, "/v1/completions", &json!({"model": model, "prompt": "x".repeat(200), "max_tokens": 2}))
                .await;
            assert_eq!(r.status, 200);
        }
        let page = get(addr, "/metrics").await;
        assert_eq!(page.status, 200);
        assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let text = page.text();
        let families = exposition::check(&text, Format::Prometheus).families;
        let names: Vec<&str> = families.iter().map(|(n, _)| n.as_str()).collect();
        let expected: &[&str] = match flavor {
            MetricsFlavor::Vllm => &[
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:prefix_cache_queries",
                "vllm:prefix_cache_hits",
                "vllm:cache_config_info",
                "vllm:lora_requests_info",
                "vllm:time_to_first_token_seconds",
                "vllm:e2e_request_latency_seconds",
            ],
            MetricsFlavor::Sglang => &[
                "sglang:num_running_reqs",
                "sglang:num_queue_reqs",
                "sglang:token_usage",
                "sglang:cache_hit_rate",
                "sglang:time_to_first_token_seconds",
                "sglang:e2e_request_latency_seconds",
            ],
        };
        for name in expected {
            assert!(names.contains(name), "{name} missing from\n{text}");
        }
        let prefix = if flavor == MetricsFlavor::Vllm { "vllm" } else { "sglang" };
        assert_eq!(sample(&text, &format!("{prefix}:time_to_first_token_seconds_count")), Some(2.0));
        assert_eq!(sample(&text, &format!("{prefix}:e2e_request_latency_seconds_count")), Some(2.0));
        if flavor == MetricsFlavor::Vllm {
            assert_eq!(sample(&text, "vllm:prefix_cache_queries_total"), Some(100.0));
            assert!(text.contains(&format!("num_gpu_blocks=\"{}\"", EngineConfig::default().num_gpu_blocks)));
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_running_lora_adapter_is_reported() {
    let mut cfg = config(20);
    cfg.loras = vec!["sql-lora".into(), "idle-lora".into()];
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut s = open_stream(addr, "/v1/chat/completions", &chat("sql-lora", "hi", 30)).await;
    s.next().await.unwrap();
    let text = get(addr, "/metrics").await.text();
    assert!(text.contains("running_lora_adapters=\"sql-lora\""), "{text}");
    drop(s);
    server.shutdown().await;
}

#[tokio::test]
async fn models_health_load_and_embeddings() {
    let mut cfg = MockConfig { models: vec!["base".into(), "alias".into()], loras: vec!["lora-a".into()], ..config(1) };
    cfg.server.embedding_dim = 16;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let models = get(addr, "/v1/models").await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "alias", "lora-a"]);
    assert_eq!(models["data"][2]["parent"], "base");
    let health = get(addr, "/health").await;
    assert_eq!(health.status, 200);
    let load = get(addr, "/load").await.json();
    for key in
        ["running", "waiting", "max_num_seqs", "kv_cache_usage", "num_gpu_blocks", "prefix_cache_hit_rate", "in_flight"]
    {
        assert!(load.get(key).is_some(), "{key} missing from {load}");
    }
    assert_eq!(load["ready"], true);
    let e = post(addr, "/v1/embeddings", &json!({"model": "alias", "input": ["a", "b"]})).await.json();
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    assert_eq!(e["data"][1]["embedding"].as_array().unwrap().len(), 16);
    let b64 =
        post(addr, "/v1/embeddings", &json!({"model": "base", "input": "a", "encoding_format": "base64"})).await.json();
    assert_eq!(b64["data"][0]["embedding"].as_str().unwrap().len(), 88, "16 floats = 64 bytes");
    assert_eq!(server.stats().counters.finished_length, 3, "each input is a prefill-only sequence");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_slot() {
    let mut cfg = config(20);
    cfg.engine.max_num_seqs = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let mut s = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "long", 10_000)).await;
    s.next().await.unwrap();
    assert_eq!(server.stats().running, 1);
    drop(s);
    // The next request gets the slot at once, not in 200 s.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        post(addr, "/v1/completions", &json!({"model": "mock-llm", "prompt": "x", "max_tokens": 2})),
    )
    .await
    .expect("served");
    assert_eq!(r.status, 200);
    assert_eq!(server.stats().counters.cancelled, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_streams_finish() {
    let server = start(config(20)).await;
    let addr = server.local_addr();
    let mut s = open_stream(
        addr,
        "/v1/completions",
        &json!({"model": "mock-llm", "prompt": "x", "max_tokens": 10, "stream": true}),
    )
    .await;
    s.next().await.unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    let rest = s.collect().await;
    assert!(rest.last().unwrap().data.is_none(), "the stream still ends with [DONE]");
    assert_eq!(rest.iter().filter(|e| e.token().is_some()).count(), 9);
    assert_eq!(shutdown.await.unwrap(), fulcrum_mock::Exit::Stopped);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn decode_slows_down_as_the_batch_fills() {
    let mut cfg = config(10);
    cfg.engine.itl_per_seq = Duration::from_millis(10);
    let server = start(cfg).await;
    let addr = server.local_addr();
    // Alone: 20 ms a token. With 4 running: 50 ms a token.
    let alone = open_stream(addr, "/v1/chat/completions", &chat("mock-llm", "a", 11)).await.collect().await;
    let span = |events: &[Event]| {
        let t: Vec<_> = events.iter().filter(|e| e.token().is_some()).map(|e| e.at).collect();
        t[t.len() - 1] - t[0]
    };
    let mut handles = Vec::new();
    for i in 0..4 {
        handles.push(tokio::spawn(async move {
            open_stream(addr, "/v1/chat/completions", &chat("mock-llm", &format!("b{i}"), 11)).await.collect().await
        }));
    }
    let mut spans = Vec::new();
    for h in handles {
        spans.push(span(&h.await.unwrap()));
    }
    let (alone, together) = (span(&alone), spans.into_iter().max().unwrap());
    assert!(alone >= Duration::from_millis(190), "alone {alone:?}");
    assert!(together >= Duration::from_millis(450), "together {together:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_model_name_is_echoed_and_ids_are_distinct() {
    let server = start(MockConfig { models: vec!["m1".into(), "m2".into()], ..config(1) }).await;
    let addr = server.local_addr();
    let a = post(addr, "/v1/completions", &json!({"model": "m2", "prompt": "x", "max_tokens": 1})).await.json();
    let b = post(addr, "/v1/completions", &json!({"model": "m1", "prompt": "x", "max_tokens": 1})).await.json();
    assert_eq!(a["model"], "m2");
    assert_eq!(b["model"], "m1");
    assert_ne!(a["id"], b["id"]);
    assert_eq!(a["object"], Value::from("text_completion"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_reader_gets_its_whole_backlog_in_order() {
    let server = start(config(0)).await; // every token is ready at once
    let addr = server.local_addr();
    let body =
        json!({"model": "mock-llm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 600, "seed": 5});
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let s = open_stream(addr, "/v1/chat/completions", &streamed_body).await;
    // Read nothing until the engine has produced every token: the body sends a backlog.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.stats().counters.generation_tokens < 600 {
        assert!(tokio::time::Instant::now() < deadline, "the engine never finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let events = s.collect().await;
    assert!(events.last().unwrap().data.is_none(), "ends with [DONE]");
    let tokens: Vec<&Event> = events.iter().filter(|e| e.token().is_some()).collect();
    assert_eq!(tokens.len(), 600);
    assert_eq!(tokens[599].data.as_ref().unwrap()["choices"][0]["finish_reason"], "length");
    let streamed: String = tokens.iter().map(|e| e.token().unwrap()).collect();
    let whole = post(addr, "/v1/chat/completions", &body).await.json();
    assert_eq!(whole["choices"][0]["message"]["content"].as_str().unwrap(), streamed);
    server.shutdown().await;
}
