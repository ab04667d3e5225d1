use super::*;

#[derive(Debug, Deserialize)]
struct Pool {
    policy: Policy,
}

fn parse(s: &str) -> Result<Policy, String> {
    toml::from_str::<Pool>(s).map(|p| p.policy).map_err(|e| e.to_string())
}

#[test]
fn every_name_parses_from_a_string() {
    for kind in PolicyKind::ALL {
        let policy = match kind {
            PolicyKind::HeaderHash => parse(r#"policy = { name = "header_hash", header = "x-user" }"#),
            PolicyKind::CookieHash => parse(r#"policy = { name = "cookie_hash", cookie = "sid" }"#),
            _ => parse(&format!("policy = \"{kind}\"")),
        };
        assert_eq!(policy.unwrap().kind(), kind);
    }
}

#[test]
fn options_parse_and_round_trip() {
    let p = parse(r#"policy = { name = "maglev", table_size = 251, key = "header:X-User" }"#).unwrap();
    assert_eq!(p, Policy::Maglev { key: HashKey::Header("x-user".into()), table_size: 251 });
    let p = parse(r#"policy = { name = "power_of_two", choices = 3, cost = "peak_ewma" }"#).unwrap();
    assert_eq!(p, Policy::PowerOfTwo { choices: 3, cost: Cost::PeakEwma });
    #[derive(Serialize)]
    struct Out<'a> {
        policy: &'a Policy,
    }
    for policy in [p, Policy::RoundRobin, Policy::Rendezvous { key: HashKey::Cookie("sid".into()) }] {
        let text = toml::to_string(&Out { policy: &policy }).unwrap();
        assert_eq!(parse(&text).unwrap(), policy, "{text}");
    }
}

#[test]
fn errors_name_what_is_wrong() {
    let e = parse(r#"policy = "fastest""#).unwrap_err();
    assert!(e.contains("unknown policy `fastest`") && e.contains("round_robin"), "{e}");
    let e = parse(r#"policy = "header_hash""#).unwrap_err();
    assert!(e.contains("needs the option `header`"), "{e}");
    let e = parse(r#"policy = { name = "maglev", table_size = 65536 }"#).unwrap_err();
    assert!(e.contains("table_size") && e.contains("prime"), "{e}");
    let e = parse(r#"policy = { name = "bounded_load", epsilon = 0.0 }"#).unwrap_err();
    assert!(e.contains("epsilon"), "{e}");
    let e = parse(r#"policy = { name = "power_of_two", choices = 0 }"#).unwrap_err();
    assert!(e.contains("choices"), "{e}");
    let e = parse(r#"policy = { name = "round_robin", weight = 3 }"#).unwrap_err();
    assert!(e.contains("weight"), "{e}");
    let e = parse(r#"policy = { name = "rendezvous", key = "body" }"#).unwrap_err();
    assert!(e.contains("unknown hash key `body`"), "{e}");
}

#[test]
fn needs_follow_the_key_source() {
    assert!(Policy::IpHash.needs().client_ip);
    assert_eq!(Policy::RoundRobin.needs(), Needs::default());
    let p = Policy::Rendezvous { key: HashKey::Cookie("sid".into()) };
    assert_eq!(p.needs().key, Some(HashKey::Cookie("sid".into())));
}

#[test]
fn primes() {
    assert!(is_prime(65_537) && is_prime(2) && is_prime(251));
    assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0));
}

#[test]
fn ai_policies_parse_with_defaults_and_options() {
    let p = parse(r#"policy = "prefix_affinity""#).unwrap();
    assert_eq!(p, Policy::from_kind(PolicyKind::PrefixAffinity).unwrap());
    assert!(matches!(p, Policy::PrefixAffinity { cache_blocks: 8_192, min_match_blocks: 2, slack_tokens: 8_192, .. }));
    let p = parse(
        r#"policy = { name = "prefix_affinity", cache_blocks = 100, epsilon = 1.0, min_match_blocks = 4, capacity = "accelerator" }"#,
    )
    .unwrap();
    assert_eq!(
        p,
        Policy::PrefixAffinity {
            cache_blocks: 100,
            min_match_blocks: 4,
            epsilon: 1.0,
            slack_tokens: DEFAULT_SLACK_TOKENS,
            capacity: Capacity::accelerator_defaults(),
        }
    );
    let p = parse(
        r#"policy = { name = "score", weights = { prefix = 5 }, max_waiting = 10, capacity = { H100 = 3, l4 = 1 } }"#,
    )
    .unwrap();
    let Policy::Score { weights, max_waiting, max_kv_usage, capacity, .. } = &p else { panic!("{p:?}") };
    assert_eq!(*weights, ScoreWeights { prefix: 5.0, ..ScoreWeights::default() });
    assert_eq!((*max_waiting, *max_kv_usage), (10, DEFAULT_MAX_KV_USAGE));
    assert_eq!(*capacity, Capacity::Accelerator([("h100".into(), 3.0), ("l4".into(), 1.0)].into_iter().collect()));
    let p2 = parse(r#"policy = { name = "least_tokens", capacity = "weight" }"#).unwrap();
    assert_eq!(p2, Policy::LeastTokens { capacity: Capacity::Weight });
    #[derive(Serialize)]
    struct Out<'a> {
        policy: &'a Policy,
    }
    for policy in [p, p2, Policy::from_kind(PolicyKind::PrefixAffinity).unwrap()] {
        let text = toml::to_string(&Out { policy: &policy }).unwrap();
        assert_eq!(parse(&text).unwrap(), policy, "{text}");
    }
}

#[test]
fn ai_policy_errors_name_the_option() {
    for (text, option) in [
        (r#"policy = { name = "prefix_affinity", cache_blocks = 0 }"#, "cache_blocks"),
        (r#"policy = { name = "prefix_affinity", min_match_blocks = 0 }"#, "min_match_blocks"),
        (r#"policy = { name = "prefix_affinity", epsilon = -1.0 }"#, "epsilon"),
        (r#"policy = { name = "score", max_kv_usage = 1.5 }"#, "max_kv_usage"),
        (r#"policy = { name = "score", max_waiting = 0 }"#, "max_waiting"),
        (r#"policy = { name = "score", weights = { queue = -1 } }"#, "queue"),
        (r#"policy = { name = "score", weights = { speed = 1 } }"#, "speed"),
        (r#"policy = { name = "least_tokens", capacity = { l4 = 0 } }"#, "capacity"),
        (r#"policy = { name = "least_tokens", capacity = "gpus" }"#, "unknown capacity `gpus`"),
        (r#"policy = { name = "least_tokens", epsilon = 1.0 }"#, "epsilon"),
    ] {
        let e = parse(text).unwrap_err();
        assert!(e.contains(option), "{text}: {e}");
    }
}

#[test]
fn ai_policies_need_the_body() {
    for kind in [PolicyKind::LeastTokens, PolicyKind::PrefixAffinity, PolicyKind::Score] {
        let needs = Policy::from_kind(kind).unwrap().needs();
        assert_eq!(needs, Needs { body: true, ..Needs::default() }, "{kind}");
    }
    assert!(!Policy::default().needs().body);
    assert!(PolicyKind::Score.summary().contains("llm-d"));
}
