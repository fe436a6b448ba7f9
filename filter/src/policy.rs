//! The agent's capability policy applied to a classified request. Pure: the same inputs always
//! give the same verdict, so every rule is unit-tested on the host.

use aex_proto::v1 as pb;

use crate::classify::{Classified, Endpoint};
use crate::errors::{Code, Denial};
use crate::state::AgentEntry;

/// Checks every inline rule; the first violated rule names the denial.
pub fn check(
    agent: &AgentEntry,
    model: Option<&pb::Model>,
    endpoint: Endpoint,
    c: &Classified,
    passthrough: bool,
    provider: Option<&pb::Provider>,
) -> Result<(), Denial> {
    let p = &agent.policy;
    if p.scope != pb::Scope::Execution as i32 {
        return Err(Denial::new(Code::ScopeDenied, "This token is read-only: it may list models and read its usage, not call model endpoints."));
    }
    if passthrough && !p.allow_passthrough {
        return Err(Denial::new(
            Code::PassthroughNotAllowed,
            "This agent may not send its own provider key (x-aex-provider-key).",
        ));
    }
    if !agent.model_allowed(&c.model) {
        return Err(Denial::new(
            Code::ModelNotAllowed,
            format!("The model '{}' is not allowed for this agent.", c.model),
        ));
    }
    let Some(model) = model else {
        return Err(Denial::new(
            Code::ModelNotAllowed,
            format!(
                "The model '{}' does not exist or is not configured.",
                c.model
            ),
        ));
    };
    if !model.priced {
        return Err(Denial::new(
            Code::ModelNotPriced,
            format!(
                "The model '{}' has no price configured; AEX refuses to forward unpriced models.",
                c.model
            ),
        ));
    }
    if c.stream && !p.allow_streaming {
        return Err(Denial::new(
            Code::StreamingNotAllowed,
            "Streaming is not allowed for this agent.",
        ));
    }
    if c.has_tools {
        if !p.allow_tools {
            return Err(Denial::new(
                Code::ToolsNotAllowed,
                "Tools are not allowed for this agent.",
            ));
        }
        if let Some(t) = c.tool_names.iter().find(|t| !agent.tool_allowed(t)) {
            return Err(Denial::new(
                Code::ToolNotAllowed,
                format!("The tool '{t}' is not allowed for this agent."),
            ));
        }
    }
    if c.images > 0 && !p.allow_vision {
        return Err(Denial::new(
            Code::VisionNotAllowed,
            "Image inputs are not allowed for this agent.",
        ));
    }
    if p.strict {
        if let Some(u) = c.unvouched.first() {
            return Err(Denial::new(
                Code::StrictViolation,
                format!(
                    "Strict agent: the request carries '{u}', which AEX cannot bound or vouch for."
                ),
            ));
        }
        if needs_usage_injection(endpoint, c, provider) {
            return Err(Denial::new(Code::StrictViolation, "Strict agent: streaming requests must set stream_options.include_usage=true, since AEX will not modify the request."));
        }
    }
    Ok(())
}

/// A chat/completions stream only reports usage when asked; AEX asks on the client's behalf,
/// unless the provider refuses the field (it then reports usage on its own, or the stream is
/// charged an estimate).
pub fn needs_usage_injection(
    endpoint: Endpoint,
    c: &Classified,
    provider: Option<&pb::Provider>,
) -> bool {
    c.stream
        && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        && c.include_usage != Some(true)
        && !provider.is_some_and(|p| p.no_usage_injection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classify;
    use crate::state::Index;

    fn index(policy: pb::AgentPolicy) -> Index {
        Index::from_snapshot(
            1,
            pb::Snapshot {
                agents: vec![pb::AgentPolicy {
                    token_sha256: "h".into(),
                    ..policy
                }],
                models: vec![
                    pb::Model {
                        name: "gpt-4o-mini".into(),
                        provider: "p".into(),
                        priced: true,
                        ..Default::default()
                    },
                    pb::Model {
                        name: "gpt-oss-20b".into(),
                        provider: "p".into(),
                        priced: true,
                        ..Default::default()
                    },
                    pb::Model {
                        name: "free".into(),
                        provider: "p".into(),
                        priced: false,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )
    }

    fn open() -> pb::AgentPolicy {
        pb::AgentPolicy {
            allow_streaming: true,
            allow_tools: true,
            allow_vision: true,
            ..Default::default()
        }
    }

    fn verdict(policy: pb::AgentPolicy, body: &str, passthrough: bool) -> Result<(), Code> {
        let idx = index(policy);
        let agent = idx.agent_by_token_hash("h").unwrap();
        let c = classify(Endpoint::ChatCompletions, body.as_bytes()).unwrap();
        check(
            agent,
            idx.models.get(&c.model),
            Endpoint::ChatCompletions,
            &c,
            passthrough,
            None,
        )
        .map_err(|d| d.code)
    }

    const PLAIN: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn each_rule_denies_with_its_code() {
        assert_eq!(verdict(open(), PLAIN, false), Ok(()));
        let ro = pb::AgentPolicy {
            scope: pb::Scope::ReadOnly as i32,
            ..open()
        };
        assert_eq!(verdict(ro, PLAIN, false), Err(Code::ScopeDenied));
        assert_eq!(
            verdict(open(), PLAIN, true),
            Err(Code::PassthroughNotAllowed)
        );
        assert_eq!(
            verdict(
                pb::AgentPolicy {
                    allow_passthrough: true,
                    ..open()
                },
                PLAIN,
                true
            ),
            Ok(())
        );
        let only_oss = pb::AgentPolicy {
            allowed_models: vec!["gpt-oss-*".into()],
            ..open()
        };
        assert_eq!(
            verdict(only_oss.clone(), PLAIN, false),
            Err(Code::ModelNotAllowed)
        );
        assert_eq!(
            verdict(only_oss, r#"{"model":"gpt-oss-20b","messages":[]}"#, false),
            Ok(())
        );
        assert_eq!(
            verdict(open(), r#"{"model":"nope","messages":[]}"#, false),
            Err(Code::ModelNotAllowed)
        );
        assert_eq!(
            verdict(open(), r#"{"model":"free","messages":[]}"#, false),
            Err(Code::ModelNotPriced)
        );
        let stream = r#"{"model":"gpt-4o-mini","messages":[],"stream":true}"#;
        assert_eq!(
            verdict(
                pb::AgentPolicy {
                    allow_streaming: false,
                    ..open()
                },
                stream,
                false
            ),
            Err(Code::StreamingNotAllowed)
        );
        let tools = r#"{"model":"gpt-4o-mini","messages":[],"tools":[{"type":"function","function":{"name":"rm_rf"}}]}"#;
        assert_eq!(
            verdict(
                pb::AgentPolicy {
                    allow_tools: false,
                    ..open()
                },
                tools,
                false
            ),
            Err(Code::ToolsNotAllowed)
        );
        let named = pb::AgentPolicy {
            allowed_tools: vec!["get_*".into()],
            ..open()
        };
        assert_eq!(
            verdict(named.clone(), tools, false),
            Err(Code::ToolNotAllowed)
        );
        assert_eq!(
            verdict(named, &tools.replace("rm_rf", "get_weather"), false),
            Ok(())
        );
        let image = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert_eq!(
            verdict(
                pb::AgentPolicy {
                    allow_vision: false,
                    ..open()
                },
                image,
                false
            ),
            Err(Code::VisionNotAllowed)
        );
    }

    #[test]
    fn strict_refuses_what_it_would_otherwise_modify_or_cannot_vouch_for() {
        let strict = pb::AgentPolicy {
            strict: true,
            ..open()
        };
        assert_eq!(verdict(strict.clone(), PLAIN, false), Ok(()));
        let stream = r#"{"model":"gpt-4o-mini","messages":[],"stream":true}"#;
        assert_eq!(
            verdict(strict.clone(), stream, false),
            Err(Code::StrictViolation)
        );
        assert_eq!(verdict(open(), stream, false), Ok(()));
        let with_usage = r#"{"model":"gpt-4o-mini","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(verdict(strict.clone(), with_usage, false), Ok(()));
        let file = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"file","file":{}}]}]}"#;
        assert_eq!(verdict(strict, file, false), Err(Code::StrictViolation));
        assert_eq!(verdict(open(), file, false), Ok(()));
    }

    #[test]
    fn usage_is_not_injected_for_a_provider_that_refuses_stream_options() {
        let stream = classify(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[],"stream":true}"#,
        )
        .unwrap();
        let injecting = pb::Provider::default();
        let refusing = pb::Provider {
            no_usage_injection: true,
            ..Default::default()
        };
        assert!(needs_usage_injection(
            Endpoint::ChatCompletions,
            &stream,
            Some(&injecting)
        ));
        assert!(needs_usage_injection(
            Endpoint::ChatCompletions,
            &stream,
            None
        ));
        assert!(!needs_usage_injection(
            Endpoint::ChatCompletions,
            &stream,
            Some(&refusing)
        ));
        // A strict agent's stream to such a provider needs no edit, so it is not refused.
        let idx = index(pb::AgentPolicy {
            strict: true,
            ..open()
        });
        let agent = idx.agent_by_token_hash("h").unwrap();
        let c = classify(
            Endpoint::ChatCompletions,
            br#"{"model":"gpt-4o-mini","messages":[],"stream":true}"#,
        )
        .unwrap();
        let model = idx.models.get(&c.model);
        let verdict = |p: &pb::Provider| {
            check(agent, model, Endpoint::ChatCompletions, &c, false, Some(p)).map_err(|d| d.code)
        };
        assert_eq!(verdict(&injecting), Err(Code::StrictViolation));
        assert_eq!(verdict(&refusing), Ok(()));
    }
}
