//! Typed access to request-body parameters, with OpenAI-style 400 errors.
//!
//! Handlers never index into request JSON blindly: every read goes through
//! these helpers, which treat `null` as absent and reject wrong types.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// A request body that parsed as a JSON object.
pub(crate) type Params = Map<String, Value>;

/// Parses the raw body as a JSON object.
pub(crate) fn parse_body(body: &[u8]) -> Result<Params, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        )),
    }
}

/// A present, non-null parameter.
pub(crate) fn get<'a>(p: &'a Params, key: &str) -> Option<&'a Value> {
    p.get(key).filter(|v| !v.is_null())
}

/// The required `model` string, returned verbatim.
pub(crate) fn model(p: &Params) -> Result<String, ApiError> {
    match get(p, "model") {
        None => Err(ApiError::invalid(
            "you must provide a model parameter",
            Some("model"),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::bad_type("model", "a string")),
    }
}

/// An optional boolean (default `false`).
pub(crate) fn flag(p: &Params, key: &str) -> Result<bool, ApiError> {
    match get(p, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_type(key, "a boolean")),
    }
}

/// An optional non-negative integer.
pub(crate) fn uint(p: &Params, key: &str) -> Result<Option<u64>, ApiError> {
    match get(p, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_type(key, "a non-negative integer")),
    }
}

/// An optional optional string.
pub(crate) fn string<'a>(p: &'a Params, key: &str) -> Result<Option<&'a str>, ApiError> {
    match get(p, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_type(key, "a string")),
    }
}

/// `stream_options.include_usage` (default `false`).
pub(crate) fn include_usage(p: &Params) -> Result<bool, ApiError> {
    match get(p, "stream_options") {
        None => Ok(false),
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad_type(
                "stream_options.include_usage",
                "a boolean",
            )),
        },
        Some(_) => Err(ApiError::bad_type("stream_options", "an object")),
    }
}

/// The `n` parameter: number of choices, 1 to 128 (default 1).
pub(crate) fn choice_count(p: &Params) -> Result<u64, ApiError> {
    match uint(p, "n")? {
        None => Ok(1),
        Some(n) if (1..=128).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            format!("Invalid value for 'n': {n}. Expected a value between 1 and 128."),
            Some("n"),
        )),
    }
}

/// An output cap such as `max_tokens`: a positive integer when present.
pub(crate) fn token_cap(p: &Params, key: &str) -> Result<Option<u64>, ApiError> {
    match uint(p, key)? {
        Some(0) => Err(ApiError::invalid(
            format!("Invalid '{key}': integer below minimum value. Expected a value >= 1."),
            Some(key),
        )),
        other => Ok(other),
    }
}

/// Which API shape the `tools` array uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolShape {
    /// Chat Completions: `{"type":"function","function":{"name":..}}`.
    Chat,
    /// Responses: `{"type":"function","name":..}`.
    Responses,
}

/// Whether the conversation ends with a tool's result (a chat `tool` message, a Responses
/// `function_call_output` item): a model left to choose (`tool_choice` absent or `"auto"`)
/// then answers in text, as real ones do, so agent loops end.
fn answers_a_tool_result(p: &Params, shape: ToolShape) -> bool {
    let last = match shape {
        ToolShape::Chat => get(p, "messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("role")),
        ToolShape::Responses => get(p, "input")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("type")),
    };
    matches!(
        (shape, last.and_then(Value::as_str)),
        (ToolShape::Chat, Some("tool")) | (ToolShape::Responses, Some("function_call_output"))
    )
}

/// The function the mock should "call", if any.
///
/// A tool is called when `tools` holds at least one function tool and
/// `tool_choice` is not `"none"`, except that a conversation ending with a tool's result gets
/// text unless `tool_choice` forces a call. A `tool_choice` naming a function picks it;
/// otherwise the first function tool is used.
pub(crate) fn chosen_tool(p: &Params, shape: ToolShape) -> Result<Option<String>, ApiError> {
    let tools = match get(p, "tools") {
        None => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad_type("tools", "an array")),
    };
    let mut first = None;
    for (i, tool) in tools.iter().enumerate() {
        let Some(obj) = tool.as_object() else {
            return Err(ApiError::bad_type(&format!("tools[{i}]"), "an object"));
        };
        if obj.get("type").and_then(Value::as_str) != Some("function") {
            continue;
        }
        let name = match shape {
            ToolShape::Chat => obj.get("function").and_then(|f| f.get("name")),
            ToolShape::Responses => obj.get("name"),
        };
        match name.and_then(Value::as_str) {
            Some(n) => {
                if first.is_none() {
                    first = Some(n.to_owned());
                }
            }
            None => {
                let param = match shape {
                    ToolShape::Chat => format!("tools[{i}].function.name"),
                    ToolShape::Responses => format!("tools[{i}].name"),
                };
                return Err(ApiError::missing(&param));
            }
        }
    }
    let Some(first) = first else {
        return Ok(None);
    };
    let auto = if answers_a_tool_result(p, shape) {
        None
    } else {
        Some(first.clone())
    };
    match get(p, "tool_choice") {
        None => Ok(auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(None),
            "auto" => Ok(auto),
            "required" => Ok(Some(first)),
            other => Err(ApiError::invalid(
                format!(
                    "Invalid value for 'tool_choice': '{other}'. Expected 'none', 'auto' or \
                     'required'."
                ),
                Some("tool_choice"),
            )),
        },
        Some(Value::Object(o)) => {
            let named = match shape {
                ToolShape::Chat => o.get("function").and_then(|f| f.get("name")),
                ToolShape::Responses => o.get("name"),
            };
            Ok(Some(
                named
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or(first),
            ))
        }
        Some(_) => Err(ApiError::bad_type("tool_choice", "a string or an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Params {
        match v {
            Value::Object(m) => m,
            _ => Params::new(),
        }
    }

    #[test]
    fn body_must_be_a_json_object() {
        assert!(parse_body(b"{\"model\":\"m\"}").is_ok());
        assert_eq!(parse_body(b"{nope").unwrap_err().status.as_u16(), 400);
        assert_eq!(parse_body(b"[1,2]").unwrap_err().status.as_u16(), 400);
        assert_eq!(parse_body(b"").unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn typed_getters_reject_wrong_types() {
        let p = params(json!({"max_tokens": "10", "stream": 1, "n": 0, "model": 5}));
        assert!(uint(&p, "max_tokens").is_err());
        assert!(flag(&p, "stream").is_err());
        assert!(choice_count(&p).is_err());
        assert!(model(&p).is_err());
        let p = params(json!({"max_tokens": null, "stream": null}));
        assert_eq!(uint(&p, "max_tokens").ok(), Some(None));
        assert_eq!(flag(&p, "stream").ok(), Some(false));
        assert_eq!(choice_count(&p).ok(), Some(1));
        assert!(token_cap(&params(json!({"max_tokens": 0})), "max_tokens").is_err());
    }

    #[test]
    fn tool_selection_follows_tool_choice() {
        let tools = json!([
            {"type": "web_search"},
            {"type": "function", "function": {"name": "first"}},
            {"type": "function", "function": {"name": "second"}}
        ]);
        let pick = |choice: Value| {
            chosen_tool(
                &params(json!({"tools": tools, "tool_choice": choice})),
                ToolShape::Chat,
            )
            .ok()
            .flatten()
        };
        assert_eq!(pick(Value::Null).as_deref(), Some("first"));
        assert_eq!(pick(json!("auto")).as_deref(), Some("first"));
        assert_eq!(pick(json!("none")), None);
        assert_eq!(
            pick(json!({"type": "function", "function": {"name": "second"}})).as_deref(),
            Some("second")
        );
        let empty = params(json!({"tools": []}));
        assert_eq!(chosen_tool(&empty, ToolShape::Chat).ok(), Some(None));
        let flat = params(json!({"tools": [{"type": "function", "name": "f"}]}));
        assert_eq!(
            chosen_tool(&flat, ToolShape::Responses)
                .ok()
                .flatten()
                .as_deref(),
            Some("f")
        );
    }

    #[test]
    fn a_tool_result_is_answered_in_text_unless_a_call_is_forced() {
        let chat = |choice: Value, last: &str| {
            let mut p = json!({
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "messages": [{"role": "user", "content": "x"}, {"role": last, "content": "y"}]
            });
            if !choice.is_null() {
                p["tool_choice"] = choice;
            }
            chosen_tool(&params(p), ToolShape::Chat).ok().flatten()
        };
        assert_eq!(chat(Value::Null, "tool"), None);
        assert_eq!(chat(json!("auto"), "tool"), None);
        assert_eq!(chat(json!("required"), "tool").as_deref(), Some("f"));
        assert_eq!(chat(Value::Null, "user").as_deref(), Some("f"));
        let responses = |last: Value| {
            chosen_tool(
                &params(json!({"tools": [{"type": "function", "name": "f"}], "input": [last]})),
                ToolShape::Responses,
            )
            .ok()
            .flatten()
        };
        assert_eq!(
            responses(json!({"type": "function_call_output", "call_id": "c", "output": "1"})),
            None
        );
        assert_eq!(
            responses(json!({"role": "user", "content": "x"})).as_deref(),
            Some("f")
        );
    }
}
