//! The request pipeline as pure functions: from headers and body to a plan, from the control
//! plane's answer to the upstream edits, and from what came back to a settlement. The wasm glue
//! only calls these and moves bytes.

use aex_proto::v1 as pb;

use crate::classify::{self, CapField, Classified, Endpoint};
use crate::errors::{Code, Denial};
use crate::json_edit::{self, Edit};
use crate::policy;
use crate::state::{AgentEntry, Index};
use crate::usage::Usage;

/// Resolves the bearer token to an agent and checks its expiry.
pub fn authenticate<'a>(
    index: &'a Index,
    authorization: Option<&str>,
    now_s: i64,
) -> Result<(&'a AgentEntry, String), Denial> {
    let Some(h) = authorization.map(str::trim).filter(|h| !h.is_empty()) else {
        return Err(Denial::new(
            Code::MissingApiKey,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <token>'.",
        ));
    };
    let token = match h.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            t.trim()
        }
        _ => {
            return Err(Denial::new(
                Code::InvalidApiKey,
                "Malformed Authorization header: expected 'Bearer <token>'.",
            ))
        }
    };
    let hash = crate::state::sha256_hex(token);
    let Some(agent) = index.agent_by_token_hash(&hash) else {
        return Err(Denial::new(
            Code::InvalidApiKey,
            "Incorrect API key provided.",
        ));
    };
    let exp = agent.policy.token_expires_at;
    if exp != 0 && now_s >= exp {
        return Err(Denial {
            agent_id: agent.policy.agent_id.clone(),
            ..Denial::new(
                Code::TokenExpired,
                "The API key has expired. Rotate it with `aex agent rotate-token`.",
            )
        });
    }
    Ok((agent, hash))
}

/// Everything decided before asking the control plane.
#[derive(Debug, Clone)]
pub struct Plan {
    pub agent_id: String,
    pub token_sha256: String,
    pub endpoint: Endpoint,
    pub classified: Classified,
    pub model: pb::Model,
    pub provider: pb::Provider,
    /// `stream_options.include_usage` is added for metering; the usage chunk is hidden from the client.
    pub inject_usage: bool,
    pub input_bound: u64,
}

pub fn plan(
    index: &Index,
    agent: &AgentEntry,
    token_sha256: &str,
    endpoint: Endpoint,
    body: &[u8],
    passthrough: bool,
) -> Result<Plan, Denial> {
    let c = classify::classify(endpoint, body)?;
    let model = index.models.get(&c.model);
    let provider = model.and_then(|m| index.providers.get(&m.provider));
    policy::check(agent, model, endpoint, &c, passthrough, provider).map_err(|d| Denial {
        model: c.model.clone(),
        ..d
    })?;
    let Some(model) = model else {
        return Err(Denial::new(Code::ModelNotAllowed, "unknown model"));
    };
    let Some(provider) = index.providers.get(&model.provider) else {
        return Err(Denial::new(
            Code::GovernanceUnavailable,
            format!(
                "The provider of '{}' is not configured.",
                crate::errors::quoted(&c.model)
            ),
        ));
    };
    let inject_usage = policy::needs_usage_injection(endpoint, &c, Some(provider));
    let mut input_bound = classify::input_token_bound(
        body.len(),
        &c,
        index.message_token_overhead,
        index.image_token_bound,
    );
    // What the body only refers to can fill the model's whole context window.
    if c.has_unmeasured_input() {
        input_bound = input_bound.max(model.context_window);
    }
    Ok(Plan {
        agent_id: agent.policy.agent_id.clone(),
        token_sha256: token_sha256.to_string(),
        endpoint,
        classified: c,
        model: model.clone(),
        provider: provider.clone(),
        inject_usage,
        input_bound,
    })
}

/// `settlements`: the worker's unreported settlements of the agent, applied first.
pub fn authorize_request(
    p: &Plan,
    request_id: &str,
    settlements: Vec<pb::Settlement>,
) -> pb::AuthorizeRequest {
    let choices = p.classified.choices.max(1);
    pb::AuthorizeRequest {
        request_id: request_id.to_string(),
        agent_id: p.agent_id.clone(),
        token_sha256: p.token_sha256.clone(),
        model: p.classified.model.clone(),
        endpoint: p.endpoint.to_pb() as i32,
        stream: p.classified.stream,
        input_token_bound: p.input_bound,
        requested_output_cap: p
            .classified
            .output_cap
            .map_or(0, |(_, n)| n.saturating_mul(choices)),
        choices,
        settlements,
    }
}

/// Worst-case cost of the request as the control plane would reserve it, when it can be admitted
/// under a lease as is: priced model, and no output cap to write (the agent's limit is not
/// exceeded). `None` = only the control plane may decide (it clamps, or refuses).
pub fn lease_bound(p: &Plan, agent: &AgentEntry) -> Option<u64> {
    let prices = crate::state::prices(&p.model)?;
    let choices = p.classified.choices.max(1);
    if p.endpoint == Endpoint::Embeddings {
        // No output tokens: the input alone, and no cap the agent's limit could clamp.
        return Some(aex_proto::money::worst_case(prices, p.input_bound, 0));
    }
    let per_choice = match p.classified.output_cap {
        Some((_, n)) if n > 0 => n,
        _ => p.model.max_output_tokens,
    };
    let limit = agent.policy.max_output_tokens;
    if limit > 0 && per_choice > limit {
        return None;
    }
    Some(aex_proto::money::worst_case(
        prices,
        p.input_bound,
        per_choice.saturating_mul(choices),
    ))
}

/// What a settlement costs at the model's prices (the control plane charges the same).
pub fn settlement_cost(p: &Plan, s: &pb::Settlement) -> u64 {
    match crate::state::prices(&p.model) {
        Some(prices) if !s.release => aex_proto::money::charge(
            prices,
            aex_proto::money::TokenUsage {
                input: s.input_tokens,
                output: s.output_tokens,
                cached_input: s.cached_input_tokens,
            },
        ),
        _ => 0,
    }
}

/// Output tokens the provider can produce in total once the request is forwarded.
pub fn output_cap_total(p: &Plan, clamp: u64) -> u64 {
    if p.endpoint == Endpoint::Embeddings {
        return 0;
    }
    let per_choice = if clamp > 0 {
        clamp
    } else {
        p.classified
            .output_cap
            .map_or(p.model.max_output_tokens, |(_, n)| n)
    };
    per_choice.saturating_mul(p.classified.choices.max(1))
}

/// The documented governance edits to the body: upstream model name, usage metering for
/// streams, and the output-cap clamp. `None` = forward the client's bytes untouched.
pub fn rewrite_body(p: &Plan, body: &[u8], clamp: u64) -> Result<Option<Vec<u8>>, Denial> {
    // Embeddings have no output cap: a `max_tokens` there is not the provider's to receive.
    let clamp = if p.endpoint == Endpoint::Embeddings {
        0
    } else {
        clamp
    };
    let mut edits: Vec<Edit> = Vec::new();
    let upstream = &p.model.upstream_model;
    if !upstream.is_empty() && *upstream != p.classified.model {
        edits.push(Edit::Set {
            key: "model",
            value_json: serde_json::Value::String(upstream.clone()).to_string(),
        });
    }
    // Top-level members, scanned once for both edits that need them (no second full parse).
    let members = if p.inject_usage || clamp > 0 {
        json_edit::scan_members(body)
            .map_err(|_| Denial::new(Code::InvalidJson, "The request body is not valid JSON."))?
    } else {
        Vec::new()
    };
    if p.inject_usage {
        // Keep the client's other stream options; like serde_json, the last duplicate wins.
        let mut opts = members
            .iter()
            .rev()
            .find(|m| m.key == "stream_options")
            .and_then(|m| body.get(m.value_start..m.value_end))
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
        edits.push(Edit::Set {
            key: "stream_options",
            value_json: opts.to_string(),
        });
    }
    if clamp > 0 {
        let n = clamp.to_string();
        match p.classified.output_cap {
            Some((CapField::MaxTokens, _)) | Some((CapField::MaxCompletionTokens, _))
                if p.endpoint == Endpoint::ChatCompletions =>
            {
                // Clamp every cap field the client sent, so none lets the provider go further.
                for f in [CapField::MaxTokens, CapField::MaxCompletionTokens] {
                    if members.iter().any(|m| m.key == f.as_str()) {
                        edits.push(Edit::Set {
                            key: f.as_str(),
                            value_json: n.clone(),
                        });
                    }
                }
            }
            Some((f, _)) => edits.push(Edit::Set {
                key: f.as_str(),
                value_json: n,
            }),
            None => {
                let field = match p.endpoint {
                    Endpoint::ChatCompletions
                        if p.model.chat_cap_field == "max_completion_tokens" =>
                    {
                        "max_completion_tokens"
                    }
                    Endpoint::Responses => "max_output_tokens",
                    _ => "max_tokens",
                };
                edits.push(Edit::Set {
                    key: field,
                    value_json: n,
                });
            }
        }
    }
    if edits.is_empty() {
        return Ok(None);
    }
    json_edit::apply(body, &edits)
        .map(Some)
        .map_err(|_| Denial::new(Code::InvalidJson, "The request body is not valid JSON."))
}

/// The upstream `:path`: the provider's base path + the endpoint, keeping the client's query.
pub fn upstream_path(provider: &pb::Provider, endpoint: Endpoint, client_path: &str) -> String {
    let query = client_path
        .find('?')
        .map_or("", |i| client_path.get(i..).unwrap_or(""));
    format!("{}{}{}", provider.base_path, endpoint.suffix(), query)
}

/// What came back from upstream, as the response callbacks saw it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// None = no response headers ever arrived (client left first, or the stream was reset).
    pub upstream_status: Option<u32>,
    pub usage: Option<Usage>,
    pub response_bytes: u64,
    pub complete: bool,
    /// The provider compressed the body (despite `accept-encoding: identity`): its byte count
    /// says nothing about the tokens in it.
    pub encoded: bool,
    /// `usage` is the provider's final count, not a running one from a stream that stopped
    /// before its final report (a JSON body's usage is final).
    pub usage_final: bool,
    /// A success status carrying an error document and no usage.
    pub error_body: bool,
}

/// Settlement for a forwarded request: exact when the provider reported usage; released when
/// the provider refused; otherwise a conservative estimate flagged as such.
pub fn settlement(p: &Plan, request_id: &str, clamp: u64, o: &Outcome) -> pb::Settlement {
    let mut s = pb::Settlement {
        request_id: request_id.to_string(),
        agent_id: p.agent_id.clone(),
        model: p.classified.model.clone(),
        upstream_status: o.upstream_status.unwrap_or(0),
        ..Default::default()
    };
    // Tokens never exceed the bytes that carried them, nor the cap the provider enforced.
    // Compressed bytes bound nothing, and a non-streaming answer is generated (and billed) whole
    // even when it never arrives in full: then the cap alone is the estimate.
    let cap = output_cap_total(p, clamp);
    let output_estimate = if o.encoded || (!p.classified.stream && !o.complete) {
        cap
    } else {
        o.response_bytes.min(cap)
    };
    if let Some(u) = o.usage {
        s.input_tokens = u.input_tokens;
        s.output_tokens = u.output_tokens;
        s.cached_input_tokens = u.cached_input_tokens;
        s.reasoning_tokens = u.reasoning_tokens;
        s.outcome = if u.output_missing && p.endpoint != Endpoint::Embeddings {
            // A generating request whose usage names no output count: what it produced is
            // not known, so it is estimated as for a stream without usage.
            s.estimated = true;
            s.output_tokens = output_estimate;
            "usage_without_output"
        } else if o.complete && o.usage_final {
            "complete"
        } else if o.usage_final {
            "cut_with_usage"
        } else {
            // A running count (usage on every chunk) from a stream cut before its final
            // report, or ended without one (no finish reason, usage-only chunk or terminal
            // event): a lower bound only. The input count is exact; the output is estimated.
            s.estimated = true;
            s.output_tokens = u.output_tokens.max(output_estimate);
            "cut_with_running_usage"
        }
        .into();
        return s;
    }
    match o.upstream_status {
        Some(st) if st >= 400 => {
            s.release = true;
            s.outcome = "upstream_error".into();
        }
        Some(_) if o.error_body => {
            s.release = true;
            s.outcome = "upstream_error".into();
        }
        _ => {
            s.estimated = true;
            s.input_tokens = p.input_bound;
            s.output_tokens = output_estimate;
            s.outcome = match (o.upstream_status, o.complete) {
                (None, _) => "client_gone_before_response",
                (Some(_), true) => "no_usage_reported",
                (Some(_), false) => "stream_cut",
            }
            .into();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index::from_snapshot(
            1,
            pb::Snapshot {
                agents: vec![pb::AgentPolicy {
                    agent_id: "a1".into(),
                    token_sha256: crate::state::sha256_hex("aex_tok"),
                    allow_streaming: true,
                    allow_tools: true,
                    allow_vision: true,
                    ..Default::default()
                }],
                models: vec![pb::Model {
                    name: "gpt-oss-20b".into(),
                    provider: "groq".into(),
                    upstream_model: "openai/gpt-oss-20b".into(),
                    max_output_tokens: 1000,
                    priced: true,
                    chat_cap_field: "max_tokens".into(),
                    input_micros_per_1m: 100_000,
                    output_micros_per_1m: 500_000,
                    cached_input_micros_per_1m: Some(50_000),
                    context_window: 131_072,
                }],
                providers: vec![pb::Provider {
                    name: "groq".into(),
                    cluster: "provider_groq".into(),
                    base_path: "/openai/v1".into(),
                    ..Default::default()
                }],
                image_token_bound: 100,
                message_token_overhead: 8,
                max_body_bytes: 1 << 20,
            },
        )
    }

    fn plan_of(body: &str) -> Plan {
        plan_at(Endpoint::ChatCompletions, body)
    }

    fn plan_at(endpoint: Endpoint, body: &str) -> Plan {
        let idx = index();
        let (agent, hash) = authenticate(&idx, Some("Bearer aex_tok"), 0).unwrap();
        plan(&idx, agent, &hash, endpoint, body.as_bytes(), false).unwrap()
    }

    /// The test index with the agent's policy changed by `f`.
    fn index_with(f: impl FnOnce(&mut pb::AgentPolicy)) -> Index {
        let idx = index();
        let mut policy = idx
            .agent_by_token_hash(&crate::state::sha256_hex("aex_tok"))
            .unwrap()
            .policy
            .clone();
        f(&mut policy);
        Index::from_snapshot(
            2,
            pb::Snapshot {
                agents: vec![policy],
                models: idx.models.values().cloned().collect(),
                providers: idx.providers.values().cloned().collect(),
                image_token_bound: 100,
                message_token_overhead: 8,
                max_body_bytes: 1 << 20,
            },
        )
    }

    #[test]
    fn completions_batches_reserve_every_prompts_choices() {
        let idx = index();
        let agent = idx
            .agent_by_token_hash(&crate::state::sha256_hex("aex_tok"))
            .unwrap();
        let prompts: Vec<String> = (0..20).map(|i| format!("\"p{i}\"")).collect();
        let body = format!(
            r#"{{"model":"gpt-oss-20b","prompt":[{}],"n":2}}"#,
            prompts.join(",")
        );
        let p = plan_at(Endpoint::Completions, &body);
        assert_eq!(p.classified.choices, 40);
        // No cap asked: the model's limit for each of the 2 × 20 choices.
        let prices = crate::state::prices(&p.model).unwrap();
        assert_eq!(
            lease_bound(&p, agent),
            Some(aex_proto::money::worst_case(prices, p.input_bound, 40_000))
        );
        assert_eq!(output_cap_total(&p, 0), 40_000);
        // A clamp is per choice: 40 choices of 7 tokens.
        assert_eq!(output_cap_total(&p, 7), 280);
        let body = r#"{"model":"gpt-oss-20b","prompt":[[1,2],[3,4]],"max_tokens":50,"best_of":3}"#;
        let p = plan_at(Endpoint::Completions, body);
        let req = authorize_request(&p, "r", Vec::new());
        // The control plane divides the total by `choices` to get the per-choice cap back.
        assert_eq!((req.choices, req.requested_output_cap), (6, 300));
        assert_eq!(req.requested_output_cap / req.choices, 50);
        assert_eq!(
            lease_bound(&p, agent),
            Some(aex_proto::money::worst_case(prices, p.input_bound, 300))
        );
        // One tokenized prompt: one prompt, one message of overhead.
        let ids = vec!["1"; 20_000].join(",");
        let body = format!(r#"{{"model":"gpt-oss-20b","prompt":[{ids}],"max_tokens":10}}"#);
        let p = plan_at(Endpoint::Completions, &body);
        assert_eq!(p.classified.choices, 1);
        assert_eq!(p.input_bound, body.len() as u64 + 8 + 16);
    }

    #[test]
    fn input_the_body_only_refers_to_is_bounded_by_the_context_window() {
        let stored = [
            (
                Endpoint::Responses,
                r#"{"model":"gpt-oss-20b","previous_response_id":"resp_1","input":"and then?"}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"gpt-oss-20b","input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}]}"#,
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"gpt-oss-20b","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-1"}}]}]}"#,
            ),
        ];
        for (endpoint, body) in stored {
            assert_eq!(plan_at(endpoint, body).input_bound, 131_072, "{body}");
        }
        // Audio (a previous audio reply by id, or audio asked as output) is billed at prices
        // models.toml cannot hold: refused, not bounded.
        let idx = index();
        let (agent, hash) = authenticate(&idx, Some("Bearer aex_tok"), 0).unwrap();
        for body in [
            r#"{"model":"gpt-oss-20b","messages":[{"role":"assistant","audio":{"id":"audio_1"}}]}"#,
            r#"{"model":"gpt-oss-20b","messages":[],"modalities":["text","audio"]}"#,
        ] {
            let d = plan(
                &idx,
                agent,
                &hash,
                Endpoint::ChatCompletions,
                body.as_bytes(),
                false,
            )
            .unwrap_err();
            assert_eq!(d.code, Code::ModelNotPriced, "{body}");
        }
        // A body larger than the window keeps its own bound.
        let big = format!(
            r#"{{"model":"gpt-oss-20b","previous_response_id":"r","input":"{}"}}"#,
            "x".repeat(200_000)
        );
        assert!(plan_at(Endpoint::Responses, &big).input_bound > 200_000);
    }

    #[test]
    fn embeddings_never_get_an_output_cap() {
        let body = br#"{"model":"gpt-oss-20b","input":"hello"}"#;
        // A strict agent's embeddings call is admitted as is (no output cap to clamp), on a
        // model served under its own name; under another name, `model` would need a rewrite.
        let strict = index_with(|a| {
            a.max_output_tokens = 256;
            a.strict = true;
        });
        let (agent, hash) = authenticate(&strict, Some("Bearer aex_tok"), 0).unwrap();
        let refused = plan(&strict, agent, &hash, Endpoint::Embeddings, body, false).unwrap_err();
        assert_eq!(refused.code, Code::StrictViolation);
        let same_name = Index::from_snapshot(
            3,
            pb::Snapshot {
                agents: vec![agent.policy.clone()],
                models: strict
                    .models
                    .values()
                    .map(|m| pb::Model {
                        upstream_model: String::new(),
                        ..m.clone()
                    })
                    .collect(),
                providers: strict.providers.values().cloned().collect(),
                image_token_bound: 100,
                message_token_overhead: 8,
                max_body_bytes: 1 << 20,
            },
        );
        let (agent, hash) = authenticate(&same_name, Some("Bearer aex_tok"), 0).unwrap();
        let p = plan(&same_name, agent, &hash, Endpoint::Embeddings, body, false).unwrap();
        assert_eq!(rewrite_body(&p, body, 256).unwrap(), None);

        let idx = index_with(|a| a.max_output_tokens = 256);
        let (agent, hash) = authenticate(&idx, Some("Bearer aex_tok"), 0).unwrap();
        let p = plan(&idx, agent, &hash, Endpoint::Embeddings, body, false).unwrap();
        let prices = crate::state::prices(&p.model).unwrap();
        // Input only, admitted as is although the model's output limit exceeds the agent's.
        assert_eq!(
            lease_bound(&p, agent),
            Some(aex_proto::money::worst_case(prices, p.input_bound, 0))
        );
        let req = authorize_request(&p, "r", Vec::new());
        assert_eq!(req.requested_output_cap, 0);
        assert_eq!(output_cap_total(&p, 0), 0);
        assert_eq!(output_cap_total(&p, 256), 0);
        // Even a clamp from the control plane is never written into an embeddings body.
        let out = rewrite_body(&p, body, 256).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "openai/gpt-oss-20b");
        assert!(v.get("max_tokens").is_none(), "{v}");
        let mut same_name = p.clone();
        same_name.model.upstream_model = "gpt-oss-20b".into();
        assert_eq!(rewrite_body(&same_name, body, 256).unwrap(), None);
    }

    #[test]
    fn lease_bound_is_the_reservation_the_control_plane_would_make() {
        let idx = index();
        let agent = idx
            .agent_by_token_hash(&crate::state::sha256_hex("aex_tok"))
            .unwrap();
        let p = plan_of(
            r#"{"model":"gpt-oss-20b","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"n":2}"#,
        );
        let prices = crate::state::prices(&p.model).unwrap();
        assert_eq!(
            lease_bound(&p, agent),
            Some(aex_proto::money::worst_case(prices, p.input_bound, 100))
        );
        // No cap asked: the model's limit, per choice.
        let p = plan_of(r#"{"model":"gpt-oss-20b","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(
            lease_bound(&p, agent),
            Some(aex_proto::money::worst_case(prices, p.input_bound, 1000))
        );
        // The agent's limit would clamp: only the control plane may decide.
        let mut limited = index();
        let mut snap_agent = limited
            .agent_by_token_hash(&crate::state::sha256_hex("aex_tok"))
            .unwrap()
            .policy
            .clone();
        snap_agent.max_output_tokens = 10;
        limited = Index::from_snapshot(
            2,
            pb::Snapshot {
                agents: vec![snap_agent],
                models: limited.models.values().cloned().collect(),
                ..Default::default()
            },
        );
        let agent = limited
            .agent_by_token_hash(&crate::state::sha256_hex("aex_tok"))
            .unwrap();
        assert_eq!(lease_bound(&p, agent), None);
        let mut unpriced = p.clone();
        unpriced.model.priced = false;
        assert_eq!(lease_bound(&unpriced, agent), None);
    }

    #[test]
    fn settlement_cost_prices_cached_tokens_and_releases_at_zero() {
        let p = plan_of(r#"{"model":"gpt-oss-20b","messages":[{"role":"user","content":"hi"}]}"#);
        let s = pb::Settlement {
            input_tokens: 1_000,
            cached_input_tokens: 400,
            output_tokens: 10,
            ..Default::default()
        };
        // (600 × 0.1 + 400 × 0.05 + 10 × 0.5) µUSD = 60 + 20 + 5.
        assert_eq!(settlement_cost(&p, &s), 85);
        let released = pb::Settlement { release: true, ..s };
        assert_eq!(settlement_cost(&p, &released), 0);
    }

    #[test]
    fn auth_errors() {
        let idx = index();
        let code = |h: Option<&str>| authenticate(&idx, h, 0).err().map(|d| d.code);
        assert_eq!(code(None), Some(Code::MissingApiKey));
        assert_eq!(code(Some("")), Some(Code::MissingApiKey));
        assert_eq!(code(Some("Basic abc")), Some(Code::InvalidApiKey));
        assert_eq!(code(Some("Bearer")), Some(Code::InvalidApiKey));
        assert_eq!(code(Some("Bearer nope")), Some(Code::InvalidApiKey));
        assert_eq!(code(Some("bearer aex_tok")), None);
        let idx = Index::from_snapshot(
            2,
            pb::Snapshot {
                agents: vec![pb::AgentPolicy {
                    agent_id: "a9".into(),
                    token_sha256: crate::state::sha256_hex("old"),
                    token_expires_at: 10,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let expired = authenticate(&idx, Some("Bearer old"), 10).err().unwrap();
        assert_eq!(
            (expired.code, expired.agent_id.as_str()),
            (Code::TokenExpired, "a9"),
            "an expired token still names its agent"
        );
    }

    #[test]
    fn rewrites_model_usage_and_clamp_preserving_the_rest() {
        let body = r#"{"model":"gpt-oss-20b","messages":[{"role":"user","content":"hé 🚀"}],"stream":true, "x_unknown": {"a": [1, 2]}}"#;
        let p = plan_of(body);
        assert!(p.inject_usage);
        let out = rewrite_body(&p, body.as_bytes(), 42).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "openai/gpt-oss-20b");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_tokens"], 42);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#""x_unknown": {"a": [1, 2]}"#),
            "untouched members keep their bytes: {text}"
        );
    }

    #[test]
    fn keeps_existing_stream_options_and_clamps_every_cap_field() {
        let body = r#"{"model":"gpt-oss-20b","messages":[],"stream":true,"stream_options":{"include_usage":false,"other":1},"max_tokens":500,"max_completion_tokens":400}"#;
        let p = plan_of(body);
        let v: serde_json::Value =
            serde_json::from_slice(&rewrite_body(&p, body.as_bytes(), 10).unwrap().unwrap())
                .unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "other": 1})
        );
        assert_eq!(
            (
                v["max_tokens"].as_u64(),
                v["max_completion_tokens"].as_u64()
            ),
            (Some(10), Some(10))
        );
    }

    #[test]
    fn untouched_when_nothing_to_do() {
        let idx = index();
        let mut p = plan_of(r#"{"model":"gpt-oss-20b","messages":[]}"#);
        p.model.upstream_model = "gpt-oss-20b".into();
        assert_eq!(
            rewrite_body(&p, br#"{"model":"gpt-oss-20b","messages":[]}"#, 0).unwrap(),
            None
        );
        drop(idx);
    }

    #[test]
    fn policy_denials_name_the_model() {
        let idx = index();
        let (agent, hash) = authenticate(&idx, Some("Bearer aex_tok"), 0).unwrap();
        let d = plan(
            &idx,
            agent,
            &hash,
            Endpoint::ChatCompletions,
            br#"{"model":"nope","messages":[]}"#,
            false,
        )
        .unwrap_err();
        assert_eq!((d.code, d.model.as_str()), (Code::ModelNotAllowed, "nope"));
    }

    #[test]
    fn paths_keep_the_query() {
        let prov = pb::Provider {
            base_path: "/openai/v1".into(),
            ..Default::default()
        };
        assert_eq!(
            upstream_path(
                &prov,
                Endpoint::ChatCompletions,
                "/v1/chat/completions?api-version=1"
            ),
            "/openai/v1/chat/completions?api-version=1"
        );
    }

    #[test]
    fn settlements() {
        let p = plan_of(r#"{"model":"gpt-oss-20b","messages":[],"max_tokens":100}"#);
        let exact = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(200),
                usage: Some(Usage {
                    input_tokens: 5,
                    output_tokens: 7,
                    ..Default::default()
                }),
                response_bytes: 900,
                complete: true,
                usage_final: true,
                ..Default::default()
            },
        );
        assert_eq!(
            (
                exact.input_tokens,
                exact.output_tokens,
                exact.estimated,
                exact.release
            ),
            (5, 7, false, false)
        );
        let err = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(500),
                ..Default::default()
            },
        );
        assert!(err.release);
        let cut = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(200),
                response_bytes: 5000,
                ..Default::default()
            },
        );
        assert!(cut.estimated);
        assert_eq!(
            (cut.input_tokens, cut.output_tokens),
            (p.input_bound, 100),
            "estimate is bounded by the enforced cap"
        );
        // A non-streaming answer is generated whole even if the client left before it came:
        // the cap. A stream stops with its client: the bytes that came (none).
        let gone = settlement(&p, "r", 0, &Outcome::default());
        assert!(gone.estimated && !gone.release);
        assert_eq!(gone.output_tokens, 100);
        let sp = plan_of(r#"{"model":"gpt-oss-20b","messages":[],"max_tokens":100,"stream":true}"#);
        let gone = settlement(&sp, "r", 0, &Outcome::default());
        assert!(gone.estimated && !gone.release);
        assert_eq!(gone.output_tokens, 0);
        let half = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(200),
                response_bytes: 30,
                ..Default::default()
            },
        );
        assert_eq!((half.output_tokens, half.estimated), (100, true));
        // A running usage count from a cut stream is a lower bound: estimated from the bytes
        // when they say more; a final count stands.
        let running = Outcome {
            upstream_status: Some(200),
            usage: Some(Usage {
                input_tokens: 5,
                output_tokens: 6,
                ..Default::default()
            }),
            response_bytes: 40,
            ..Default::default()
        };
        let r = settlement(&sp, "r", 0, &running);
        assert_eq!(
            (
                r.input_tokens,
                r.output_tokens,
                r.estimated,
                r.outcome.as_str()
            ),
            (5, 40, true, "cut_with_running_usage")
        );
        let r = settlement(
            &sp,
            "r",
            0,
            &Outcome {
                usage_final: true,
                ..running.clone()
            },
        );
        assert_eq!(
            (r.output_tokens, r.estimated, r.outcome.as_str()),
            (6, false, "cut_with_usage")
        );
        // A running count from a stream that ended cleanly but before its final report (no
        // finish reason, no usage-only chunk, no terminal event): as much a lower bound as a cut.
        let r = settlement(
            &sp,
            "r",
            0,
            &Outcome {
                complete: true,
                ..running.clone()
            },
        );
        assert_eq!(
            (r.output_tokens, r.estimated, r.outcome.as_str()),
            (40, true, "cut_with_running_usage")
        );
        // A success status with an error document and no usage: released like any error.
        let e = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(200),
                response_bytes: 80,
                complete: true,
                error_body: true,
                ..Default::default()
            },
        );
        assert!(e.release && !e.estimated, "{e:?}");
        // 60 gzip bytes may inflate to any number of tokens: the whole cap is charged.
        let gzip = settlement(
            &p,
            "r",
            0,
            &Outcome {
                upstream_status: Some(200),
                response_bytes: 60,
                complete: true,
                encoded: true,
                ..Default::default()
            },
        );
        assert!(gzip.estimated);
        assert_eq!(
            (gzip.input_tokens, gzip.output_tokens),
            (p.input_bound, 100)
        );
    }

    #[test]
    fn a_usage_that_names_no_output_count_is_an_estimate_unless_nothing_is_generated() {
        let without_output = |p: &Plan| {
            settlement(
                p,
                "r",
                0,
                &Outcome {
                    upstream_status: Some(200),
                    usage: Some(Usage {
                        input_tokens: 12,
                        output_missing: true,
                        ..Default::default()
                    }),
                    response_bytes: 90,
                    complete: true,
                    usage_final: true,
                    ..Default::default()
                },
            )
        };
        // A chat answer of 90 bytes (cap 100) whose usage left the output count out: charged
        // as exact at 0 output before.
        let chat = without_output(&plan_of(
            r#"{"model":"gpt-oss-20b","messages":[],"max_tokens":100}"#,
        ));
        assert_eq!(
            (chat.input_tokens, chat.output_tokens, chat.estimated),
            (12, 90, true)
        );
        assert_eq!(chat.outcome, "usage_without_output");
        // Embeddings generate nothing: exact.
        let emb = without_output(&plan_at(
            Endpoint::Embeddings,
            r#"{"model":"gpt-oss-20b","input":"hello"}"#,
        ));
        assert_eq!(
            (emb.input_tokens, emb.output_tokens, emb.estimated),
            (12, 0, false)
        );
    }
}
