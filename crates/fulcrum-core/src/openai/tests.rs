use std::borrow::Cow;

use super::*;

fn chat(model: &str, messages: &[(&str, &str)]) -> String {
    let msgs: Vec<String> =
        messages.iter().map(|(r, c)| format!(r#"{{"role":{},"content":{}}}"#, json(r), json(c))).collect();
    format!(r#"{{"model":{},"messages":[{}]}}"#, json(model), msgs.join(","))
}

fn json(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn chat_bodies_keep_every_message_in_order() {
    let body = br#"{
        "model": "llama", "stream": true, "user": "u-1", "temperature": 0.2,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [1, {"b": null}]}}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look at "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this."}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"}
        ]
    }"#;
    let req = parse(body, &Limits::default()).unwrap();
    assert_eq!(req.kind, ApiKind::Chat);
    assert_eq!(req.model.as_deref(), Some("llama"));
    assert!(req.stream);
    assert_eq!(req.user.as_deref(), Some("u-1"));
    let got: Vec<(&str, Cow<'_, str>)> = req.messages.iter().map(|m| (&*m.role, m.content.to_text())).collect();
    let expected = [("system", "Be brief."), ("user", "Look at this."), ("assistant", ""), ("tool", "42")];
    assert_eq!(got, expected.map(|(r, c)| (r, Cow::Borrowed(c))));
    // Strings without escapes are borrowed from the body.
    assert!(matches!(req.messages[0].content.to_text(), Cow::Borrowed(_)));
    assert!(matches!(req.model, Some(Cow::Borrowed(_))));
    assert_eq!(req.max_tokens, None);
    assert_eq!(req.output_tokens, Limits::default().default_output_tokens);
    let rendered = render_chat(&req.messages);
    assert_eq!(req.prompt_tokens, text_tokens(&rendered));
    assert!(rendered.starts_with("<|system|>\nBe brief.\n<|user|>\nLook at this.\n"));
}

#[test]
fn escapes_are_decoded_and_owned() {
    let req = parse(br#"{"messages":[{"role":"user","content":"a\nb \u00e9"}]}"#, &Limits::default()).unwrap();
    assert_eq!(req.messages[0].content.to_text(), "a\nb é");
    assert!(matches!(req.messages[0].content.to_text(), Cow::Owned(_)));
    assert_eq!(req.model, None);
}

#[test]
fn completions_take_strings_lists_and_token_ids() {
    let limits = Limits::default();
    let req = parse(br#"{"model":"m","prompt":"hello world!","max_tokens":7}"#, &limits).unwrap();
    assert_eq!(req.kind, ApiKind::Completion);
    assert!(matches!(&req.prompts[..], [PromptInput::Text(t)] if *t == "hello world!"));
    assert_eq!((req.prompt_tokens, req.output_tokens, req.estimated_tokens()), (3, 7, 10));
    let req = parse(br#"{"prompt":["abcd","abcde"],"max_tokens":1}"#, &limits).unwrap();
    assert_eq!(req.prompts.len(), 2);
    assert_eq!(req.prompt_tokens, 3);
    let req = parse(br#"{"prompt":[1,2,3,99999999999],"max_completion_tokens":5,"max_tokens":9}"#, &limits).unwrap();
    assert_eq!(req.prompts, [PromptInput::Tokens(vec![1, 2, 3, u32::MAX])]);
    assert_eq!((req.prompt_tokens, req.max_tokens), (4, Some(5)));
    let req = parse(br#"{"prompt":[[1,2],[3]]}"#, &limits).unwrap();
    assert_eq!(req.prompts, [PromptInput::Tokens(vec![1, 2]), PromptInput::Tokens(vec![3])]);
    assert!(matches!(parse(br#"{"prompt":[1,"a"]}"#, &limits), Err(ParseError::Json(_))));
    assert!(matches!(parse(br#"{"prompt":["a",1]}"#, &limits), Err(ParseError::Json(_))));
    assert!(matches!(parse(br#"{"prompt":[-1]}"#, &limits), Err(ParseError::Json(_))));
    // Token-id prompts are hashed in blocks of block_chars / 4 ids.
    let ids: Vec<String> = (0..130).map(|i| i.to_string()).collect();
    let body = format!(r#"{{"model":"m","prompt":[{}]}}"#, ids.join(","));
    let req = parse(body.as_bytes(), &limits).unwrap();
    assert_eq!(req.prefix, token_prefix("m", &(0..130).collect::<Vec<u32>>(), 64, 100));
    assert_eq!(req.prefix.len(), 2);
}

#[test]
fn embeddings_have_no_output() {
    let req = parse(br#"{"model":"e5","input":["one","two"],"max_tokens":50}"#, &Limits::default()).unwrap();
    assert_eq!(req.kind, ApiKind::Embedding);
    assert_eq!((req.prompt_tokens, req.output_tokens), (2, 0));
    let req = parse(br#"{"input":null}"#, &Limits::default()).unwrap();
    assert_eq!((req.kind, req.prompts.len(), req.prompt_tokens), (ApiKind::Embedding, 0, 0));
}

#[test]
fn bad_bodies_get_typed_errors() {
    let limits = Limits::default();
    for bad in [&b""[..], b"not json", b"[]", b"{\"messages\": 3}", b"{\"model\": 3, \"prompt\": \"x\"}", b"{} x"] {
        assert!(matches!(parse(bad, &limits), Err(ParseError::Json(_))), "{:?}", String::from_utf8_lossy(bad));
    }
    assert!(matches!(parse(br#"{"model":"m"}"#, &limits), Err(ParseError::NoPrompt)));
    assert!(matches!(parse(br#"{"messages":[{"role":"user","content":3}]}"#, &limits), Err(ParseError::Json(_))));
    // Deep nesting neither overflows the stack nor passes for a prompt.
    let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(parse(deep.as_bytes(), &limits), Err(ParseError::NoPrompt)));
    let deep = format!(r#"{{"messages":[{{"content":{}{}}}]}}"#, "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(parse(deep.as_bytes(), &limits), Err(ParseError::Json(_))));
    let e = parse(&[b' '; 11], &Limits { max_body_bytes: 10, ..limits.clone() }).unwrap_err();
    assert!(matches!(e, ParseError::TooLarge { size: 11, max: 10 }), "{e}");
}

#[test]
fn message_and_input_limits_hold_while_parsing() {
    let limits = Limits { max_messages: 3, max_inputs: 2, ..Limits::default() };
    let three = chat("m", &[("user", "a"), ("assistant", "b"), ("user", "c")]);
    assert_eq!(parse(three.as_bytes(), &limits).unwrap().messages.len(), 3);
    let four = chat("m", &[("user", "a"), ("assistant", "b"), ("user", "c"), ("user", "d")]);
    let e = parse(four.as_bytes(), &limits).unwrap_err();
    assert!(matches!(e, ParseError::TooManyMessages { max: 3 }), "{e}");
    assert!(e.is_limit() && !ParseError::NoPrompt.is_limit());
    assert!(parse(br#"{"input":["a","b"]}"#, &limits).is_ok());
    let e = parse(br#"{"input":["a","b","c"]}"#, &limits).unwrap_err();
    assert!(matches!(e, ParseError::TooManyInputs { max: 2 }), "{e}");
    // A flat token-id prompt is one input, however long.
    assert!(parse(br#"{"prompt":[1,2,3,4,5]}"#, &limits).is_ok());
}

#[test]
fn prefix_covers_every_message_and_depends_on_the_model() {
    let system = "s".repeat(600);
    let limits = Limits::default();
    let hashes = |model: &str, msgs: &[(&str, &str)]| parse(chat(model, msgs).as_bytes(), &limits).unwrap().prefix;
    let long_q = "q".repeat(600);
    let a = hashes("m", &[("system", &system), ("user", &long_q)]);
    // ~1,230 rendered characters: 4 full blocks of 256.
    assert_eq!(a.len(), 4);
    // The same first message and a different second one: the blocks after the system prompt
    // differ, the first two (all system prompt) do not.
    let other_q = "r".repeat(600);
    let b = hashes("m", &[("system", &system), ("user", &other_q)]);
    assert_eq!(a[..2], b[..2]);
    assert!(a[2..].iter().zip(&b[2..]).all(|(x, y)| x != y));
    // The role counts too.
    let c = hashes("m", &[("system", &system), ("assistant", &long_q)]);
    assert_ne!(a[2], c[2]);
    // The model seeds the chain.
    let d = hashes("n", &[("system", &system), ("user", &long_q)]);
    assert!(a.iter().zip(&d).all(|(x, y)| x != y));
    // Exactly the rendered text's blocks.
    let body = chat("m", &[("system", &system), ("user", &long_q)]);
    let req = parse(body.as_bytes(), &limits).unwrap();
    assert_eq!(a, text_prefix("m", &render_chat(&req.messages), 256, 2_048));
}

#[test]
fn block_size_and_count_are_bounded() {
    let big = "z".repeat(200_000);
    let body = chat("m", &[("user", &big)]);
    let req = parse(body.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(req.prefix.len(), (200_000 + 22) / 256);
    assert_eq!(req.prompt_tokens, (200_000u64 + 22).div_ceil(4));
    let small = Limits { max_blocks: 10, block_chars: NonZeroU32::new(64).unwrap(), ..Limits::default() };
    let req = parse(body.as_bytes(), &small).unwrap();
    assert_eq!(req.prefix.len(), 10);
    assert_eq!(req.prompt_tokens, (200_000u64 + 22).div_ceil(4));
}

#[test]
fn facts_carry_model_prefix_and_tokens() {
    let body = chat("m", &[("user", &"x".repeat(1000))]);
    let req = parse(body.as_bytes(), &Limits::default()).unwrap();
    let facts = req.facts();
    assert_eq!(facts.model, Some("m"));
    assert_eq!(facts.prefix, &req.prefix[..]);
    assert_eq!(facts.estimated_tokens, req.prompt_tokens + 256);
    assert_eq!(facts.client, None);
}

#[test]
fn engine_cache_sizes_convert_to_blocks() {
    let limits = Limits::default();
    // 30,000 blocks of 16 tokens = 480,000 tokens = 7,500 blocks of 64 tokens.
    assert_eq!(limits.cache_blocks_for_engine(30_000, 16), 7_500);
    assert_eq!(limits.cache_blocks_for_engine(u64::MAX, u32::MAX), u32::MAX);
}

#[test]
fn arbitrary_bytes_never_panic() {
    use rand::{Rng, SeedableRng, rngs::SmallRng};
    let mut rng = SmallRng::seed_from_u64(5);
    let seeds = [
        &br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#[..],
        br#"{"prompt":[[1,2],[3]],"max_tokens":3}"#,
        br#"{"input":"abc","stream":false,"user":"x"}"#,
    ];
    for _ in 0..20_000 {
        let mut body = seeds[rng.random_range(0..seeds.len())].to_vec();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..body.len());
            match rng.random_range(0..3) {
                0 => body[i] = rng.random(),
                1 => {
                    body.remove(i);
                }
                _ => body.insert(i, b"{}[]\",:0\\"[rng.random_range(0..9)]),
            }
        }
        let _ = parse(&body, &Limits { max_messages: 2, max_inputs: 2, ..Limits::default() });
    }
}

#[test]
fn a_huge_max_tokens_is_clamped_so_counters_cannot_wrap() {
    let body =
        format!(r#"{{"model":"m","max_tokens":{},"messages":[{{"role":"user","content":"hi"}}]}}"#, u64::MAX - 1);
    let req = parse(body.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(req.output_tokens, MAX_OUTPUT_TOKENS);
    assert!(req.estimated_tokens() < MAX_OUTPUT_TOKENS + 100);
    // Two of them in flight on one endpoint do not wrap its counter.
    let pool = crate::balance::test_support::selector(crate::Policy::LeastConnections, &[1]);
    let e = pool.endpoints()[0].clone();
    let (_a, _b) = (
        pool.begin(&e, req.estimated_tokens(), crate::Instant::ZERO),
        pool.begin(&e, req.estimated_tokens(), crate::Instant::ZERO),
    );
    assert_eq!(e.signals().in_flight_tokens(), 2 * req.estimated_tokens());
}
