//! Token usage as reported by OpenAI-compatible providers.
//!
//! Metering must work from whatever the upstream actually sent, so this reads every usage
//! shape the gateway meets in the wild: chat/completions/embeddings (`prompt_tokens` /
//! `completion_tokens`), the Responses API (`input_tokens` / `output_tokens`, also wrapped in
//! `response` by its terminal SSE events) and Groq's `x_groq.usage` on the last stream chunk.
//! Nothing here fails on odd input: a count that is not a non-negative JSON integer reads as 0.

use serde_json::{Map, Value};

/// Token counts of one request, as billed by the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Part of `input_tokens` served from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Part of `output_tokens` spent on hidden reasoning.
    pub reasoning_tokens: u64,
}

/// Keys whose presence marks an object as a usage report. Requiring one of them keeps an
/// unrelated or empty `usage: {}` from being metered as a genuine zero-token request.
const COUNT_KEYS: [&str; 5] = [
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "total_tokens",
];

/// Usage in one JSON document: a whole non-streaming response body or one SSE event's data.
///
/// Looks at `usage`, then `response.usage`, then `x_groq.usage`, taking the first that is a
/// JSON object carrying at least one token count; `"usage": null` counts as absent.
pub fn from_value(v: &Value) -> Option<Usage> {
    let obj = v.as_object()?;
    let candidates = [
        obj.get("usage"),
        obj.get("response").and_then(|r| r.get("usage")),
        obj.get("x_groq").and_then(|g| g.get("usage")),
    ];
    candidates
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .find(|u| COUNT_KEYS.iter().any(|k| u.contains_key(*k)))
        .map(read_usage)
}

/// Same as [`from_value`] for a whole body; `None` when it is not a JSON object. Only the
/// members that can carry usage are parsed into values (the rest, e.g. a long completion, is
/// only scanned); like serde_json, the last of duplicate keys wins.
pub fn from_json_body(body: &[u8]) -> Option<Usage> {
    let members = crate::json_edit::scan_members(body).ok()?;
    let mut top = Map::new();
    for key in ["usage", "response", "x_groq"] {
        if let Some(m) = members.iter().rev().find(|m| m.key == key) {
            let v: Value = serde_json::from_slice(body.get(m.value_start..m.value_end)?).ok()?;
            top.insert(key.to_string(), v);
        }
    }
    from_value(&Value::Object(top))
}

fn read_usage(u: &Map<String, Value>) -> Usage {
    // A provider uses one naming scheme per object; taking whichever is present (chat names
    // first) also copes with hybrids that some compatible servers emit.
    Usage {
        input_tokens: first_count(u, &["prompt_tokens", "input_tokens"]),
        output_tokens: first_count(u, &["completion_tokens", "output_tokens"]),
        cached_input_tokens: first_detail(
            u,
            &["prompt_tokens_details", "input_tokens_details"],
            "cached_tokens",
        ),
        reasoning_tokens: first_detail(
            u,
            &["completion_tokens_details", "output_tokens_details"],
            "reasoning_tokens",
        ),
    }
}

fn first_count(u: &Map<String, Value>, keys: &[&str]) -> u64 {
    keys.iter()
        .find_map(|k| u.get(*k).and_then(Value::as_u64))
        .unwrap_or(0)
}

fn first_detail(u: &Map<String, Value>, parents: &[&str], key: &str) -> u64 {
    parents
        .iter()
        .find_map(|p| u.get(*p).and_then(|d| d.get(key)).and_then(Value::as_u64))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(input: u64, output: u64, cached: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            reasoning_tokens: reasoning,
        }
    }

    #[test]
    fn chat_completion_body() {
        let body = br#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I assist you today?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default"}"#;
        assert_eq!(from_json_body(body), Some(u(19, 10, 0, 0)));
    }

    #[test]
    fn chat_details_fields() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":2048,"completion_tokens":300,"total_tokens":2348,"prompt_tokens_details":{"cached_tokens":1920},"completion_tokens_details":{"reasoning_tokens":256}}}"#;
        assert_eq!(from_json_body(body), Some(u(2048, 300, 1920, 256)));
    }

    #[test]
    fn embeddings_have_no_completion_tokens() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(from_json_body(body), Some(u(8, 0, 0, 0)));
    }

    #[test]
    fn responses_api_body() {
        let body = br#"{"id":"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b","object":"response","status":"completed","model":"o4-mini-2025-04-16","output":[],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":12},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}}"#;
        assert_eq!(from_json_body(body), Some(u(36, 87, 12, 64)));
    }

    #[test]
    fn responses_api_terminal_event() {
        let data = br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","object":"response","status":"completed","usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":12}}}"#;
        assert_eq!(from_json_body(data), Some(u(5, 7, 0, 0)));
        let created = br#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","usage":null}}"#;
        assert_eq!(from_json_body(created), None);
    }

    #[test]
    fn groq_x_groq_usage() {
        let data = br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1730000000,"model":"llama-3.1-8b-instant","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"x_groq":{"id":"req_01jbd6g2qdfw2adyrt2az8hz4w","usage":{"queue_time":0.003,"prompt_tokens":40,"prompt_time":0.002,"completion_tokens":12,"completion_time":0.01,"total_tokens":52,"total_time":0.012}}}"#;
        assert_eq!(from_json_body(data), Some(u(40, 12, 0, 0)));
    }

    #[test]
    fn null_usage_is_absent_and_falls_through() {
        assert_eq!(from_json_body(br#"{"choices":[],"usage":null}"#), None);
        let groq =
            br#"{"usage":null,"x_groq":{"usage":{"prompt_tokens":3,"completion_tokens":4}}}"#;
        assert_eq!(from_json_body(groq), Some(u(3, 4, 0, 0)));
    }

    #[test]
    fn first_present_shape_wins() {
        let both = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"x_groq":{"usage":{"prompt_tokens":30,"completion_tokens":40}}}"#;
        assert_eq!(from_json_body(both), Some(u(1, 2, 0, 0)));
    }

    #[test]
    fn no_usage_anywhere() {
        assert_eq!(
            from_json_body(br#"{"choices":[{"delta":{"content":"x"}}]}"#),
            None
        );
        assert_eq!(from_json_body(br#"{"usage":{}}"#), None);
        assert_eq!(from_json_body(br#"{"usage":"lots"}"#), None);
        assert_eq!(from_json_body(br#"[{"usage":{"prompt_tokens":1}}]"#), None);
        assert_eq!(from_json_body(b"42"), None);
    }

    #[test]
    fn duplicate_usage_keys_take_the_last_like_serde_json() {
        let body = br#"{"usage":{"prompt_tokens":1},"choices":[{"message":{"content":"{\"usage\":{\"prompt_tokens\":9}}"}}],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        assert_eq!(from_json_body(body), Some(u(2, 3, 0, 0)));
    }

    #[test]
    fn invalid_json_is_none() {
        assert_eq!(from_json_body(b""), None);
        assert_eq!(from_json_body(b"{\"usage\":{\"prompt_tokens\":1"), None);
        assert_eq!(from_json_body(&[0xff, 0xfe, b'{', b'}']), None);
    }

    #[test]
    fn garbage_counts_read_as_zero() {
        let body = br#"{"usage":{"prompt_tokens":-5,"completion_tokens":3.5,"total_tokens":"7","prompt_tokens_details":{"cached_tokens":null},"completion_tokens_details":[1,2]}}"#;
        assert_eq!(from_json_body(body), Some(u(0, 0, 0, 0)));
        let mixed = br#"{"usage":{"prompt_tokens":"x","completion_tokens":9,"prompt_tokens_details":"none","completion_tokens_details":{"reasoning_tokens":true}}}"#;
        assert_eq!(from_json_body(mixed), Some(u(0, 9, 0, 0)));
        let huge = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551616}}"#;
        assert_eq!(from_json_body(huge), Some(u(u64::MAX, 0, 0, 0)));
    }
}
