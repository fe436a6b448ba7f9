//! Deterministic generated text and token accounting.
//!
//! Output is `word1 word2 ... wordN`, one word per completion token. Prompt
//! tokens are estimated from the text in the request (bytes / 4 rounded up,
//! plus one per message or input item) and then clamped so they never exceed
//! half the request body's byte length — the upper bound a gateway may use
//! when it reserves budget before forwarding.

use serde_json::{json, Value};

use crate::control::Controls;
use crate::error::ApiError;

/// The generated words `word1 .. word{count}`.
pub(crate) fn words(count: u64) -> Vec<String> {
    (1..=count).map(|i| format!("word{i}")).collect()
}

/// Tokens for a piece of text: bytes / 4, rounded up.
pub(crate) fn text_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// Clamps an estimate so it never exceeds `body_len / 2`.
pub(crate) fn clamp_prompt(estimate: u64, body_len: usize) -> u64 {
    estimate.min(body_len as u64 / 2)
}

/// How many words to emit given the knob and an optional cap, and whether
/// the cap truncated the output.
pub(crate) fn capped(wanted: u64, cap: Option<u64>) -> (u64, bool) {
    match cap {
        Some(cap) if wanted > cap => (cap, true),
        _ => (wanted, false),
    }
}

/// Text bytes of a content value: a string, `null`, or an array of parts.
/// Parts carrying text (`text`, `input_text`, `output_text`, ...) count their
/// `text`; other parts (`image_url`, `input_audio`, `file`, ...) count nothing.
pub(crate) fn content_bytes(content: Option<&Value>, param: &str) -> Result<usize, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => Ok(s.len()),
        Some(Value::Array(parts)) => {
            let mut total = 0;
            for (i, part) in parts.iter().enumerate() {
                let Some(obj) = part.as_object() else {
                    return Err(ApiError::bad_type(&format!("{param}[{i}]"), "an object"));
                };
                if obj.get("type").and_then(Value::as_str).is_none() {
                    return Err(ApiError::missing(&format!("{param}[{i}].type")));
                }
                match obj.get("text") {
                    None => {}
                    Some(Value::String(t)) => total += t.len(),
                    Some(_) => {
                        return Err(ApiError::bad_type(
                            &format!("{param}[{i}].text"),
                            "a string",
                        ))
                    }
                }
            }
            Ok(total)
        }
        Some(_) => Err(ApiError::bad_type(param, "a string or an array of parts")),
    }
}

/// Prompt-token estimate for a Chat Completions `messages` array.
pub(crate) fn chat_prompt_estimate(messages: &[Value]) -> Result<u64, ApiError> {
    let mut tokens = 0;
    for (i, message) in messages.iter().enumerate() {
        let Some(m) = message.as_object() else {
            return Err(ApiError::bad_type(&format!("messages[{i}]"), "an object"));
        };
        match m.get("role") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => {
                return Err(ApiError::missing(&format!("messages[{i}].role")))
            }
            Some(_) => {
                return Err(ApiError::bad_type(
                    &format!("messages[{i}].role"),
                    "a string",
                ))
            }
        }
        let mut bytes = content_bytes(m.get("content"), &format!("messages[{i}].content"))?;
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            for call in calls {
                if let Some(args) = call
                    .get("function")
                    .and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                {
                    bytes += args.len();
                }
            }
        }
        tokens += text_tokens(bytes) + 1;
    }
    Ok(tokens)
}

/// Token counts to report, or `None` when `x-mock-no-usage` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    /// Applies the usage knobs to the real counts.
    pub fn report(prompt: u64, generated: u64, controls: &Controls) -> Option<Usage> {
        if controls.no_usage {
            return None;
        }
        Some(Usage {
            prompt,
            completion: controls.usage_completion_tokens.unwrap_or(generated),
        })
    }

    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// Chat Completions usage object.
    pub fn chat(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        })
    }

    /// Legacy Completions (and Groq `x_groq`) usage object.
    pub fn plain(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
        })
    }

    /// Responses API usage object.
    pub fn responses(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.total(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_numbered() {
        assert_eq!(words(3), vec!["word1", "word2", "word3"]);
        assert!(words(0).is_empty());
    }

    #[test]
    fn prompt_estimate_counts_text_and_messages() {
        let msgs = vec![
            json!({"role": "system", "content": "12345"}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "abcd"},
                {"type": "image_url", "image_url": {"url": "data:..."}}
            ]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]}),
        ];
        // ceil(5/4)+1 + ceil(4/4)+1 + ceil(2/4)+1
        assert_eq!(chat_prompt_estimate(&msgs).ok(), Some(3 + 2 + 2));
    }

    #[test]
    fn prompt_estimate_rejects_malformed_messages() {
        assert!(chat_prompt_estimate(&[json!("hi")]).is_err());
        assert!(chat_prompt_estimate(&[json!({"content": "hi"})]).is_err());
        assert!(chat_prompt_estimate(&[json!({"role": "user", "content": 5})]).is_err());
        assert!(
            chat_prompt_estimate(&[json!({"role": "user", "content": [{"text": "x"}]})]).is_err()
        );
    }

    #[test]
    fn clamp_and_cap() {
        assert_eq!(clamp_prompt(100, 21), 10);
        assert_eq!(clamp_prompt(3, 1000), 3);
        assert_eq!(capped(12, Some(5)), (5, true));
        assert_eq!(capped(12, Some(12)), (12, false));
        assert_eq!(capped(12, None), (12, false));
    }

    #[test]
    fn usage_knobs() {
        let c = Controls {
            usage_completion_tokens: Some(50),
            ..Controls::default()
        };
        let u = Usage::report(7, 3, &c).expect("usage reported");
        assert_eq!((u.prompt, u.completion, u.total()), (7, 50, 57));
        let c = Controls {
            no_usage: true,
            ..Controls::default()
        };
        assert_eq!(Usage::report(7, 3, &c), None);
    }
}
