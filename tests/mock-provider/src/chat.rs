//! `POST /v1/chat/completions`: plain, streamed, and tool-calling replies.
//!
//! The reply is `word1 .. wordN` (N from `x-mock-output-tokens`, capped by
//! `max_completion_tokens` / `max_tokens` with `finish_reason: "length"`),
//! repeated for each of the `n` choices. When `tools` holds a function tool
//! and `tool_choice` is not `"none"`, each choice instead calls that function
//! with arguments `{}` (one completion token). Streams follow OpenAI's chunk
//! sequence, including the `stream_options.include_usage` usage chunk.

use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::content::{capped, chat_prompt_estimate, words, Usage};
use crate::error::ApiError;
use crate::params::{self, ToolShape};
use crate::{sse, Ctx, SYSTEM_FINGERPRINT};

/// What each choice contains.
enum Output {
    Text { words: Vec<String>, truncated: bool },
    Tool { name: String, call_id: String },
}

impl Output {
    fn finish_reason(&self) -> &'static str {
        match self {
            Output::Text {
                truncated: true, ..
            } => "length",
            Output::Text { .. } => "stop",
            Output::Tool { .. } => "tool_calls",
        }
    }

    /// Completion tokens of one choice.
    fn tokens(&self) -> u64 {
        match self {
            Output::Text { words, .. } => words.len() as u64,
            Output::Tool { .. } => 1,
        }
    }
}

/// A validated request.
struct Plan {
    id: String,
    model: String,
    created: u64,
    choices: u64,
    output: Output,
    usage: Option<Usage>,
}

pub(crate) async fn handle(Extension(ctx): Extension<Ctx>) -> Result<Response, ApiError> {
    let p = ctx.params()?;
    let model = params::model(&p)?;
    let messages = match params::get(&p, "messages") {
        None => return Err(ApiError::missing("messages")),
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(ApiError::invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                Some("messages"),
            ))
        }
        Some(Value::Array(m)) => m,
        Some(_) => return Err(ApiError::bad_type("messages", "an array")),
    };
    let prompt = ctx.prompt_tokens(chat_prompt_estimate(messages)?);
    let stream = params::flag(&p, "stream")?;
    let include_usage = params::include_usage(&p)?;
    let choices = params::choice_count(&p)?;
    let cap = match params::token_cap(&p, "max_completion_tokens")? {
        Some(cap) => Some(cap),
        None => params::token_cap(&p, "max_tokens")?,
    };
    let output = match params::chosen_tool(&p, ToolShape::Chat)? {
        Some(name) => Output::Tool {
            name,
            call_id: format!("call_mock_{}", ctx.n),
        },
        None => {
            let (count, truncated) = capped(ctx.controls.output_tokens, cap);
            let mut words = words(count);
            if json_mode(&p) {
                // JSON mode: the same words, framed as one JSON object across the chunks.
                if words.is_empty() {
                    words.push(String::new());
                }
                if let Some(first) = words.first_mut() {
                    *first = format!("{{\"text\":\"{first}");
                }
                if let Some(last) = words.last_mut() {
                    last.push_str("\"}");
                }
            }
            Output::Text { words, truncated }
        }
    };
    let generated = output.tokens().saturating_mul(choices);
    let plan = Plan {
        id: format!("chatcmpl-mock-{}", ctx.n),
        model,
        created: ctx.created,
        choices,
        usage: Usage::report(prompt, generated, &ctx.controls),
        output,
    };
    if stream {
        let events = stream_events(&plan, &ctx, include_usage);
        Ok(sse::response(events, &ctx.controls))
    } else {
        Ok(Json(completion(&plan)).into_response())
    }
}

/// `response_format` asks for JSON (`json_object` or `json_schema`).
fn json_mode(p: &params::Params) -> bool {
    matches!(
        params::get(p, "response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str),
        Some("json_object") | Some("json_schema")
    )
}

fn completion(plan: &Plan) -> Value {
    let message = match &plan.output {
        Output::Text { words, .. } => json!({
            "role": "assistant",
            "content": words.join(" "),
            "refusal": null,
        }),
        Output::Tool { name, call_id } => json!({
            "role": "assistant",
            "content": null,
            "refusal": null,
            "tool_calls": [{
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": "{}"},
            }],
        }),
    };
    let choices: Vec<Value> = (0..plan.choices)
        .map(|index| {
            json!({
                "index": index,
                "message": message,
                "logprobs": null,
                "finish_reason": plan.output.finish_reason(),
            })
        })
        .collect();
    let mut body = json!({
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    });
    if let (Some(usage), Value::Object(map)) = (plan.usage, &mut body) {
        map.insert("usage".to_owned(), usage.chat());
    }
    body
}

fn stream_events(plan: &Plan, ctx: &Ctx, include_usage: bool) -> Vec<Bytes> {
    let groq = ctx.controls.groq;
    // OpenAI puts `"usage": null` on every chunk before the usage chunk.
    let usage_chunk = if include_usage && !groq {
        plan.usage
    } else {
        None
    };
    let chunk = |choices: Vec<Value>, usage: Option<Value>| {
        let mut map = Map::new();
        map.insert("id".into(), json!(plan.id));
        map.insert("object".into(), json!("chat.completion.chunk"));
        map.insert("created".into(), json!(plan.created));
        map.insert("model".into(), json!(plan.model));
        map.insert("system_fingerprint".into(), json!(SYSTEM_FINGERPRINT));
        map.insert("choices".into(), Value::Array(choices));
        if usage_chunk.is_some() {
            map.insert("usage".into(), usage.unwrap_or(Value::Null));
        }
        Value::Object(map)
    };
    let choice = |index: u64, delta: Value, finish: Option<&str>| json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish});

    let mut events = Vec::new();
    // Opening delta: the role (and, for tool calls, the call header).
    for index in 0..plan.choices {
        let delta = match &plan.output {
            Output::Text { .. } => json!({"role": "assistant", "content": ""}),
            Output::Tool { name, call_id } => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }],
            }),
        };
        events.push(sse::data(&chunk(vec![choice(index, delta, None)], None)));
    }
    // Body deltas.
    match &plan.output {
        Output::Text { words, .. } => {
            for (i, word) in words.iter().enumerate() {
                let text = if i == 0 {
                    word.clone()
                } else {
                    format!(" {word}")
                };
                for index in 0..plan.choices {
                    let delta = json!({"content": text});
                    let mut value = chunk(vec![choice(index, delta, None)], None);
                    if let (true, Some(usage), Value::Object(map)) =
                        (ctx.controls.running_usage, plan.usage, &mut value)
                    {
                        let so_far = Usage {
                            prompt: usage.prompt,
                            completion: (i as u64 + 1) * plan.choices,
                        };
                        map.insert("usage".into(), so_far.chat());
                    }
                    events.push(sse::data(&value));
                }
            }
        }
        Output::Tool { .. } => {
            for index in 0..plan.choices {
                let delta = json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]});
                events.push(sse::data(&chunk(vec![choice(index, delta, None)], None)));
            }
        }
    }
    // Finish chunks; Groq reports usage on the last one.
    let finish = plan.output.finish_reason();
    for index in 0..plan.choices {
        let mut value = chunk(vec![choice(index, json!({}), Some(finish))], None);
        if let (true, Some(usage), Value::Object(map)) =
            (ctx.controls.running_usage, plan.usage, &mut value)
        {
            map.insert("usage".into(), usage.chat());
        }
        if groq && index + 1 == plan.choices {
            if let (Some(usage), Value::Object(map)) = (plan.usage, &mut value) {
                map.insert(
                    "x_groq".into(),
                    json!({"id": format!("req_mock_{}", ctx.n), "usage": usage.plain()}),
                );
            }
        }
        events.push(sse::data(&value));
    }
    if let Some(usage) = usage_chunk {
        events.push(sse::data(&chunk(Vec::new(), Some(usage.chat()))));
    }
    events.push(sse::done());
    events
}
