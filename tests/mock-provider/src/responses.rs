//! `POST /v1/responses`: the Responses API, plain and streamed.
//!
//! The output is one assistant `message` item holding `word1 .. wordN`
//! (capped by `max_output_tokens`; a capped reply is reported as OpenAI does:
//! `status: "incomplete"`, `incomplete_details.reason: "max_output_tokens"`,
//! and a final `response.incomplete` event instead of `response.completed`).
//! With a function tool in `tools` (and `tool_choice` not `"none"`) the
//! output is one `function_call` item with arguments `{}` instead. Streams
//! are named SSE events, each with a `sequence_number`.

use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::content::{capped, content_bytes, text_tokens, words, Usage};
use crate::error::ApiError;
use crate::params::{self, Params, ToolShape};
use crate::{sse, Ctx};

enum Output {
    Text { words: Vec<String>, truncated: bool },
    Tool { name: String, call_id: String },
}

struct Plan<'a> {
    p: &'a Params,
    id: String,
    item_id: String,
    model: String,
    created: u64,
    output: Output,
    usage: Option<Usage>,
}

impl Plan<'_> {
    fn truncated(&self) -> bool {
        matches!(
            self.output,
            Output::Text {
                truncated: true,
                ..
            }
        )
    }

    fn final_status(&self) -> &'static str {
        if self.truncated() {
            "incomplete"
        } else {
            "completed"
        }
    }

    /// The finished output item.
    fn item(&self) -> Value {
        match &self.output {
            Output::Text { words, .. } => json!({
                "type": "message",
                "id": self.item_id,
                "status": self.final_status(),
                "role": "assistant",
                "content": [text_part(&words.join(" "))],
            }),
            Output::Tool { name, call_id } => json!({
                "type": "function_call",
                "id": self.item_id,
                "call_id": call_id,
                "name": name,
                "arguments": "{}",
                "status": "completed",
            }),
        }
    }

    /// The response object. `usage`: `None` omits the key.
    fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>) -> Value {
        let echo = |key: &str, default: Value| params::get(self.p, key).cloned().unwrap_or(default);
        let incomplete = if status == "incomplete" {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        };
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!("response"));
        m.insert("created_at".into(), json!(self.created));
        m.insert("status".into(), json!(status));
        m.insert("error".into(), Value::Null);
        m.insert("incomplete_details".into(), incomplete);
        m.insert("instructions".into(), echo("instructions", Value::Null));
        m.insert(
            "max_output_tokens".into(),
            echo("max_output_tokens", Value::Null),
        );
        m.insert("model".into(), json!(self.model));
        m.insert("output".into(), Value::Array(output));
        m.insert(
            "parallel_tool_calls".into(),
            echo("parallel_tool_calls", json!(true)),
        );
        m.insert(
            "previous_response_id".into(),
            echo("previous_response_id", Value::Null),
        );
        m.insert("reasoning".into(), json!({"effort": null, "summary": null}));
        m.insert("store".into(), echo("store", json!(true)));
        m.insert("temperature".into(), echo("temperature", json!(1.0)));
        m.insert("text".into(), json!({"format": {"type": "text"}}));
        m.insert("tool_choice".into(), echo("tool_choice", json!("auto")));
        m.insert("tools".into(), echo("tools", json!([])));
        m.insert("top_p".into(), echo("top_p", json!(1.0)));
        m.insert("truncation".into(), json!("disabled"));
        if let Some(usage) = usage {
            m.insert("usage".into(), usage);
        }
        m.insert("user".into(), Value::Null);
        m.insert("metadata".into(), echo("metadata", json!({})));
        Value::Object(m)
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// Prompt-token estimate for `instructions` plus `input`.
fn input_estimate(p: &Params) -> Result<u64, ApiError> {
    let mut tokens = match params::string(p, "instructions")? {
        Some(s) => text_tokens(s.len()) + 1,
        None => 0,
    };
    match params::get(p, "input") {
        None => return Err(ApiError::missing("input")),
        Some(Value::String(s)) => tokens += text_tokens(s.len()) + 1,
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(obj) = item.as_object() else {
                    return Err(ApiError::bad_type(&format!("input[{i}]"), "an object"));
                };
                let mut bytes = content_bytes(obj.get("content"), &format!("input[{i}].content"))?;
                for key in ["arguments", "output"] {
                    if let Some(Value::String(s)) = obj.get(key) {
                        bytes += s.len();
                    }
                }
                tokens += text_tokens(bytes) + 1;
            }
        }
        Some(_) => return Err(ApiError::bad_type("input", "a string or an array")),
    }
    Ok(tokens)
}

pub(crate) async fn handle(Extension(ctx): Extension<Ctx>) -> Result<Response, ApiError> {
    let p = ctx.params()?;
    let model = params::model(&p)?;
    let prompt = ctx.prompt_tokens(input_estimate(&p)?);
    let stream = params::flag(&p, "stream")?;
    let cap = params::token_cap(&p, "max_output_tokens")?;
    let (output, item_id) = match params::chosen_tool(&p, ToolShape::Responses)? {
        Some(name) => (
            Output::Tool {
                name,
                call_id: format!("call_mock_{}", ctx.n),
            },
            format!("fc_mock_{}", ctx.n),
        ),
        None => {
            let (count, truncated) = capped(ctx.controls.output_tokens, cap);
            (
                Output::Text {
                    words: words(count),
                    truncated,
                },
                format!("msg_mock_{}", ctx.n),
            )
        }
    };
    let generated = match &output {
        Output::Text { words, .. } => words.len() as u64,
        Output::Tool { .. } => 1,
    };
    let plan = Plan {
        p: &p,
        id: format!("resp_mock_{}", ctx.n),
        item_id,
        model,
        created: ctx.created,
        usage: Usage::report(prompt, generated, &ctx.controls),
        output,
    };
    if stream {
        Ok(sse::response(stream_events(&plan), &ctx.controls))
    } else {
        let usage = plan.usage.map(|u| u.responses());
        Ok(Json(plan.response(plan.final_status(), vec![plan.item()], usage)).into_response())
    }
}

fn stream_events(plan: &Plan<'_>) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut seq = 0u64;
    let mut push = |kind: &str, fields: Value| {
        let mut m = Map::new();
        m.insert("type".into(), json!(kind));
        m.insert("sequence_number".into(), json!(seq));
        if let Value::Object(rest) = fields {
            m.extend(rest);
        }
        events.push(sse::event(kind, &Value::Object(m)));
        seq += 1;
    };
    // While in progress, `usage` is null (omitted entirely under no-usage).
    let pending_usage = plan.usage.map(|_| Value::Null);
    let in_progress = plan.response("in_progress", Vec::new(), pending_usage);
    push("response.created", json!({"response": in_progress}));
    push("response.in_progress", json!({"response": in_progress}));
    let item_id = &plan.item_id;
    match &plan.output {
        Output::Text { words, .. } => {
            let added = json!({
                "type": "message",
                "id": item_id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            });
            push(
                "response.output_item.added",
                json!({"output_index": 0, "item": added}),
            );
            let at = |extra: Value| {
                let mut m = Map::new();
                m.insert("item_id".into(), json!(item_id));
                m.insert("output_index".into(), json!(0));
                m.insert("content_index".into(), json!(0));
                if let Value::Object(rest) = extra {
                    m.extend(rest);
                }
                Value::Object(m)
            };
            push(
                "response.content_part.added",
                at(json!({"part": text_part("")})),
            );
            for (i, word) in words.iter().enumerate() {
                let delta = if i == 0 {
                    word.clone()
                } else {
                    format!(" {word}")
                };
                push(
                    "response.output_text.delta",
                    at(json!({"delta": delta, "logprobs": []})),
                );
            }
            let text = words.join(" ");
            push(
                "response.output_text.done",
                at(json!({"text": text, "logprobs": []})),
            );
            push(
                "response.content_part.done",
                at(json!({"part": text_part(&text)})),
            );
        }
        Output::Tool { name, call_id } => {
            let added = json!({
                "type": "function_call",
                "id": item_id,
                "call_id": call_id,
                "name": name,
                "arguments": "",
                "status": "in_progress",
            });
            push(
                "response.output_item.added",
                json!({"output_index": 0, "item": added}),
            );
            push(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": 0, "delta": "{}"}),
            );
            push(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": 0, "arguments": "{}"}),
            );
        }
    }
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": plan.item()}),
    );
    let status = plan.final_status();
    let done = plan.response(status, vec![plan.item()], plan.usage.map(|u| u.responses()));
    let kind = if plan.truncated() {
        "response.incomplete"
    } else {
        "response.completed"
    };
    push(kind, json!({"response": done}));
    events
}
