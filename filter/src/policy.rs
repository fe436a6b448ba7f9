//! The agent's capability policy applied to a classified request. Pure: the same inputs always
//! give the same verdict, so every rule is unit-tested on the host.

use aex_proto::v1 as pb;

use crate::classify::{Classified, Endpoint};
use crate::errors::{quoted, Code, Denial};
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
            format!(
                "The model '{}' is not allowed for this agent.",
                quoted(&c.model)
            ),
        ));
    }
    let Some(model) = model else {
        return Err(Denial::new(
            Code::ModelNotAllowed,
            format!(
                "The model '{}' does not exist or is not configured.",
                quoted(&c.model)
            ),
        ));
    };
    if !model.priced {
        return Err(Denial::new(
            Code::ModelNotPriced,
            format!(
                "The model '{}' has no price configured; AEX refuses to forward unpriced models.",
                quoted(&c.model)
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
        // A built-in tool has no name an allow-list could admit: with an allow-list set, only the
        // named function / custom tools it matches may be declared.
        if !p.allowed_tools.is_empty() {
            if let Some(t) = c.builtin_tools.first() {
                let t = quoted(t);
                return Err(Denial::new(
                    Code::ToolNotAllowed,
                    format!("The built-in tool '{t}' is not allowed for this agent: its tool allow-list admits named function tools only."),
                ));
            }
        }
        if let Some(t) = c.tool_names.iter().find(|t| !agent.tool_allowed(t)) {
            let t = quoted(t);
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
    if c.files > 0 && !p.allow_vision {
        return Err(Denial::new(
            Code::VisionNotAllowed,
            "File inputs are not allowed for this agent: providers show the model a PDF's pages as images.",
        ));
    }
    if p.strict {
        if !model.upstream_model.is_empty() && model.upstream_model != c.model {
            return Err(Denial::new(
                Code::StrictViolation,
                format!("Strict agent: the model '{}' is served by the provider as '{}', so AEX would have to rewrite the request's `model`; it never modifies a strict agent's request. A models.toml entry named '{}' (without upstream_model) lets strict agents call it by that name.", c.model, model.upstream_model, model.upstream_model),
            ));
        }
        if let Some(t) = c.builtin_tools.first() {
            let field = if t == "web_search_options" {
                "web_search_options"
            } else {
                "tools"
            };
            let t = quoted(t);
            return Err(Denial::new(
                Code::StrictViolation,
                format!("Strict agent: the request declares the built-in tool '{t}' (`{field}`), whose server-side cost AEX cannot bound."),
            ));
        }
        if let Some(t) = &c.service_tier {
            let t = quoted(t);
            return Err(Denial::new(
                Code::StrictViolation,
                format!("Strict agent: `service_tier` '{t}' is billed at other prices than the configured ones, so AEX cannot bound its cost. Remove it or use \"auto\" / \"default\"."),
            ));
        }
        if let Some(u) = c.unvouched.first() {
            let u = quoted(u);
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
    unpriced_cost(c)
}

/// Built-in tools the provider bills only by the tokens the usage reports (the model's own
/// reading and writing of the calls): every other built-in tool carries a fee per call, per
/// container or per generated image that no price in models.toml covers.
const TOKEN_BILLED_TOOLS: [&str; 6] = [
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "computer_use_preview",
    "computer_use",
];

/// Service tiers billed at most at the configured (standard) prices: OpenAI's `flex` costs less,
/// Groq's `on_demand` is its standard tier. `auto` and `default` are never recorded.
const STANDARD_PRICED_TIERS: [&str; 2] = ["flex", "on_demand"];

/// Media whose tokens providers bill above the text prices models.toml configures.
const AUDIO: [&str; 5] = [
    "input_audio",
    "audio",
    "audio_url",
    "audio_embeds",
    "modalities",
];

/// Refuses what would cost more than the configured token prices can charge (SPEC §3: never
/// charge less than the provider bills): a per-call built-in tool, a premium service tier,
/// audio. Any agent: the budget guarantee holds for every agent, not only strict ones, whose
/// stricter rules above refuse all of these first.
fn unpriced_cost(c: &Classified) -> Result<(), Denial> {
    let priced = |what: &str, why: &str| {
        Err(Denial::new(
            Code::ModelNotPriced,
            format!("{what} {why}, which the prices AEX is configured with do not cover, so it cannot keep the agent within its budget. Remove it from the request."),
        ))
    };
    if let Some(t) = c
        .builtin_tools
        .iter()
        .find(|t| !TOKEN_BILLED_TOOLS.contains(&t.as_str()))
    {
        return priced(
            &format!("The built-in tool '{}'", quoted(t)),
            "is billed by the provider per call (or per container or image) on top of tokens",
        );
    }
    if let Some(t) = c
        .service_tier
        .as_deref()
        .filter(|t| !STANDARD_PRICED_TIERS.contains(t))
    {
        return priced(
            &format!("`service_tier` '{}'", quoted(t)),
            "is billed at other prices than the standard tier",
        );
    }
    if let Some(a) = c.unvouched.iter().find(|u| AUDIO.contains(&u.as_str())) {
        let what = if a == "modalities" {
            "Audio output (`modalities`)".to_string()
        } else {
            format!("Audio input ('{}')", quoted(a))
        };
        return priced(&what, "is billed at audio-token prices");
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
                        name: "mapped".into(),
                        provider: "p".into(),
                        upstream_model: "vendor/mapped-2025".into(),
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
        denial(Endpoint::ChatCompletions, policy, body, passthrough).map_err(|d| d.code)
    }

    fn denial(
        endpoint: Endpoint,
        policy: pb::AgentPolicy,
        body: &str,
        passthrough: bool,
    ) -> Result<(), Denial> {
        let idx = index(policy);
        let agent = idx.agent_by_token_hash("h").unwrap();
        let c = classify(endpoint, body.as_bytes()).unwrap();
        check(
            agent,
            idx.models.get(&c.model),
            endpoint,
            &c,
            passthrough,
            None,
        )
    }

    fn responses_verdict(policy: pb::AgentPolicy, body: &str) -> Result<(), Code> {
        denial(Endpoint::Responses, policy, body, false).map_err(|d| d.code)
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
        assert_eq!(
            verdict(strict.clone(), file, false),
            Err(Code::StrictViolation)
        );
        assert_eq!(verdict(open(), file, false), Ok(()));
        // Audio is priced above text: refused to every agent (`unpriced_cost`).
        let audio = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA","format":"wav"}}]}]}"#;
        assert_eq!(
            verdict(strict.clone(), audio, false),
            Err(Code::StrictViolation)
        );
        // A model served under another name needs `model` rewritten.
        let mapped = r#"{"model":"mapped","messages":[]}"#;
        let d = denial(Endpoint::ChatCompletions, strict, mapped, false).unwrap_err();
        assert_eq!(d.code, Code::StrictViolation);
        assert!(d.message.contains("'vendor/mapped-2025'"), "{}", d.message);
        assert_eq!(verdict(open(), mapped, false), Ok(()));
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

    fn strict() -> pb::AgentPolicy {
        pb::AgentPolicy {
            strict: true,
            ..open()
        }
    }

    #[test]
    fn images_and_files_in_responses_tool_outputs_are_policed() {
        let image = r#"{"model":"gpt-4o-mini","input":[{"type":"function_call","call_id":"c1","name":"look","arguments":"{}"},{"type":"function_call_output","call_id":"c1","output":[{"type":"input_image","image_url":"https://x/cat.png"}]}]}"#;
        let no_vision = pb::AgentPolicy {
            allow_vision: false,
            ..open()
        };
        assert_eq!(
            responses_verdict(no_vision.clone(), image),
            Err(Code::VisionNotAllowed)
        );
        assert_eq!(
            responses_verdict(
                pb::AgentPolicy {
                    allow_vision: false,
                    ..strict()
                },
                image
            ),
            Err(Code::VisionNotAllowed)
        );
        assert_eq!(responses_verdict(open(), image), Ok(()));
        let screenshot = r#"{"model":"gpt-4o-mini","input":[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","image_url":"data:image/png;base64,AA"}}]}"#;
        assert_eq!(
            responses_verdict(no_vision, screenshot),
            Err(Code::VisionNotAllowed)
        );
        let file = r#"{"model":"gpt-4o-mini","input":[{"type":"function_call_output","call_id":"c","output":[{"type":"input_file","file_id":"file-abc"}]}]}"#;
        assert_eq!(
            responses_verdict(strict(), file),
            Err(Code::StrictViolation)
        );
        assert_eq!(responses_verdict(open(), file), Ok(()));
        // A PDF's pages reach the model as images: files are visual input, in every place.
        let no_vision = pb::AgentPolicy {
            allow_vision: false,
            ..open()
        };
        let chat_file = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-abc"}}]}]}"#;
        let typeless = r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":[{"file_id":"file-abc","input_file":{}}]}]}"#;
        for (endpoint, body) in [
            (Endpoint::Responses, file),
            (Endpoint::ChatCompletions, chat_file),
            (Endpoint::Responses, typeless),
        ] {
            let d = denial(endpoint, no_vision.clone(), body, false).unwrap_err();
            assert_eq!(d.code, Code::VisionNotAllowed, "{body}");
            assert!(d.message.contains("File inputs"), "{}", d.message);
        }
        assert_eq!(verdict(open(), chat_file, false), Ok(()));
    }

    #[test]
    fn built_in_tools_are_tools_and_strict_refuses_them() {
        let hosted = [
            r#"{"type":"web_search_preview"}"#,
            r#"{"type":"web_search"}"#,
            r#"{"type":"file_search","vector_store_ids":["vs_1"]}"#,
            r#"{"type":"code_interpreter","container":{"type":"auto"}}"#,
            r#"{"type":"image_generation"}"#,
            r#"{"type":"mcp","server_label":"s","server_url":"https://x"}"#,
            r#"{"type":"local_shell"}"#,
        ];
        for t in hosted {
            let body = format!(r#"{{"model":"gpt-4o-mini","input":"hi","tools":[{t}]}}"#);
            let d = denial(Endpoint::Responses, strict(), &body, false).unwrap_err();
            assert_eq!(d.code, Code::StrictViolation, "{t}");
            assert!(d.message.contains("`tools`"), "{}", d.message);
            assert_eq!(
                responses_verdict(
                    pb::AgentPolicy {
                        allow_tools: false,
                        ..open()
                    },
                    &body
                ),
                Err(Code::ToolsNotAllowed),
                "{t}"
            );
            // A built-in tool has no name an allow-list could admit, even one spelling its type
            // (the CLI turns `--allowed-tools '*'` into no allow-list at all).
            assert_eq!(
                responses_verdict(
                    pb::AgentPolicy {
                        allowed_tools: vec![
                            "get_*".into(),
                            "*search*".into(),
                            "mcp".into(),
                            "local_shell".into(),
                            "code_interpreter".into(),
                            "image_generation".into()
                        ],
                        ..open()
                    },
                    &body
                ),
                Err(Code::ToolNotAllowed),
                "{t}"
            );
        }
        let function = r#"{"model":"gpt-4o-mini","input":"hi","tools":[{"type":"function","name":"get_weather"},{"type":"custom","name":"get_x"}]}"#;
        assert_eq!(responses_verdict(strict(), function), Ok(()));
        assert_eq!(
            responses_verdict(
                pb::AgentPolicy {
                    allowed_tools: vec!["get_*".into()],
                    ..strict()
                },
                function
            ),
            Ok(())
        );

        let search = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"web_search_options":{}}"#;
        assert_eq!(
            verdict(
                pb::AgentPolicy {
                    allow_tools: false,
                    ..open()
                },
                search,
                false
            ),
            Err(Code::ToolsNotAllowed)
        );
        let d = denial(Endpoint::ChatCompletions, strict(), search, false).unwrap_err();
        assert_eq!(d.code, Code::StrictViolation);
        assert!(d.message.contains("web_search_options"), "{}", d.message);
    }

    #[test]
    fn strict_refuses_service_tiers_priced_differently() {
        let tier = |t: &str| {
            format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}],"service_tier":{t}}}"#
            )
        };
        for t in [r#""priority""#, r#""flex""#, r#""scale""#] {
            let d = denial(Endpoint::ChatCompletions, strict(), &tier(t), false).unwrap_err();
            assert_eq!(d.code, Code::StrictViolation, "{t}");
            assert!(d.message.contains("service_tier"), "{}", d.message);
        }
        for t in [r#""auto""#, r#""default""#, "null"] {
            assert_eq!(verdict(strict(), &tier(t), false), Ok(()), "{t}");
        }
        assert_eq!(
            responses_verdict(
                strict(),
                r#"{"model":"gpt-4o-mini","input":"hi","service_tier":"flex"}"#
            ),
            Err(Code::StrictViolation)
        );
    }

    #[test]
    fn what_the_token_prices_cannot_charge_is_refused_to_every_agent() {
        let not_priced = |endpoint, body: &str, what: &str| {
            let d = denial(endpoint, open(), body, false).unwrap_err();
            assert_eq!(d.code, Code::ModelNotPriced, "{body}");
            assert!(d.message.contains(what), "{}", d.message);
        };
        // Built-in tools billed per call, per container or per image; an unknown type too.
        for t in [
            "web_search_preview",
            "web_search",
            "file_search",
            "code_interpreter",
            "image_generation",
            "some_future_tool",
        ] {
            let body =
                format!(r#"{{"model":"gpt-4o-mini","input":"hi","tools":[{{"type":"{t}"}}]}}"#);
            not_priced(Endpoint::Responses, &body, &format!("'{t}'"));
        }
        not_priced(
            Endpoint::ChatCompletions,
            r#"{"model":"gpt-4o-mini","messages":[],"web_search_options":{}}"#,
            "'web_search_options'",
        );
        // Built-in tools billed by their tokens alone pass, beside function tools.
        for t in [
            "mcp",
            "local_shell",
            "shell",
            "apply_patch",
            "computer_use_preview",
        ] {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","input":"hi","tools":[{{"type":"{t}"}},{{"type":"function","name":"f"}}]}}"#
            );
            assert_eq!(responses_verdict(open(), &body), Ok(()), "{t}");
        }
        // Premium tiers; the standard ones (and the cheaper flex) are charged at the configured
        // prices, an over- rather than an undercharge.
        for t in ["priority", "scale", "performance"] {
            let body = format!(r#"{{"model":"gpt-4o-mini","messages":[],"service_tier":"{t}"}}"#);
            not_priced(Endpoint::ChatCompletions, &body, &format!("'{t}'"));
        }
        for t in ["flex", "on_demand", "auto", "default"] {
            let body = format!(r#"{{"model":"gpt-4o-mini","input":"hi","service_tier":"{t}"}}"#);
            assert_eq!(responses_verdict(open(), &body), Ok(()), "{t}");
        }
        // Audio in or out.
        not_priced(
            Endpoint::ChatCompletions,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA","format":"wav"}}]}]}"#,
            "'input_audio'",
        );
        not_priced(
            Endpoint::ChatCompletions,
            r#"{"model":"gpt-4o-mini","messages":[],"modalities":["text","audio"],"audio":{"voice":"alloy","format":"wav"}}"#,
            "`modalities`",
        );
        // Files and server-side state are billed as the tokens the usage reports: they pass.
        assert_eq!(
            responses_verdict(
                open(),
                r#"{"model":"gpt-4o-mini","input":[{"type":"input_file","file_id":"f"}],"previous_response_id":"r"}"#
            ),
            Ok(())
        );
        // Stricter rules come first: a strict agent is told it is strict.
        let body = r#"{"model":"gpt-4o-mini","input":"hi","tools":[{"type":"web_search"}]}"#;
        assert_eq!(
            responses_verdict(strict(), body),
            Err(Code::StrictViolation)
        );
    }
}
