//! Token usage as reported by OpenAI-compatible providers.
//!
//! Metering must work from whatever the upstream actually sent, so this reads every usage
//! shape the gateway meets in the wild: chat/completions/embeddings (`prompt_tokens` /
//! `completion_tokens`), the Responses API (`input_tokens` / `output_tokens`, also wrapped in
//! `response` by its terminal SSE events) and Groq's `x_groq.usage` on the last stream chunk.
//! Providers disagree on what the counts include: OpenAI counts reasoning inside
//! `completion_tokens`, xAI and some Gemini proxies report it beside it (or only in
//! `total_tokens`); DeepSeek reports cached input as a top-level `prompt_cache_hit_tokens`. The
//! output count read is therefore the largest any of the reported counts implies (see
//! [`from_json_body`]), so spend is never recorded below what the provider billed.
//! Nothing here fails on odd input, and nothing odd reads as a cheap request: a usage object whose
//! input count is missing, or any of whose counts is not a non-negative number, is no usage at
//! all (the request is then charged a conservative estimate); counts above [`MAX_TOKENS`] read as
//! [`MAX_TOKENS`] (an overrun, never a wrapped or zero count).

use std::fmt;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

/// Largest token count taken from a provider: orders of magnitude above any context window, yet
/// small enough that its cost at any configured price stays far inside the ledger's range. A
/// larger count (including integers beyond 64 bits) reads as this.
pub const MAX_TOKENS: u64 = 1 << 40;

/// Token counts of one request, as billed by the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    /// Output tokens billed, reasoning included (see [`from_json_body`]).
    pub output_tokens: u64,
    /// Part of `input_tokens` served from the provider's prompt cache (never more than it).
    pub cached_input_tokens: u64,
    /// Reasoning tokens as the provider reported them; never more than `output_tokens`.
    pub reasoning_tokens: u64,
    /// The usage names no output count at all (no completion, output or total count): right
    /// for embeddings, a count left out for anything that generates.
    pub output_missing: bool,
}

/// Usage in one JSON document: a whole non-streaming response body or one SSE event's data;
/// `None` when it is not a JSON object or carries no usage.
///
/// Looks at `usage`, then `response.usage`, then `x_groq.usage`, taking the first that is a JSON
/// object carrying at least one token count key (`prompt_tokens`, `completion_tokens`,
/// `input_tokens`, `output_tokens` or `total_tokens`: an unrelated or empty `usage: {}` is not
/// metered as a genuine zero-token request); `"usage": null` counts as absent. That object is the
/// usage only if it has an input count (`prompt_tokens` or `input_tokens`) and every count in it
/// is a non-negative number (a count that is `null` is absent; a fractional one is rounded up);
/// otherwise the document reports no usage. A provider uses one naming scheme per object;
/// whichever is present is read (chat names first), which also copes with hybrids some
/// compatible servers emit.
///
/// Output tokens are the largest of: the output count (`completion_tokens` / `output_tokens`,
/// absent = 0); what `total_tokens` leaves after the input, when it is at least the input; and
/// output plus reasoning (`*_tokens_details.reasoning_tokens`) when the reasoning exceeds the
/// output count, i.e. was plainly not counted in it. A total that is missing or short never
/// lowers the charge below the output count; derived counts are capped at [`MAX_TOKENS`]. Cached
/// input is `prompt_tokens_details.cached_tokens`, else `input_tokens_details.cached_tokens`,
/// else DeepSeek's `prompt_cache_hit_tokens`, capped at the input count. An odd detail count
/// (cached, reasoning or cache-hit: not a non-negative number) reads as absent — no discount,
/// no extra — without making the usage unusable.
///
/// One pass with no intermediate values: only the usage objects' counts are read, everything
/// else (e.g. a long completion) is skipped; like serde_json, the last of duplicate keys wins.
pub fn from_json_body(body: &[u8]) -> Option<Usage> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut top = Slots::default();
    Reader {
        at: At::Top,
        out: &mut top,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    top.found
        .into_iter()
        .flatten()
        .find(|u| u.reported)
        .filter(Counts::usable)
        .map(Counts::usage)
}

// ------------------------------------------------------------ reading a body without a tree
//
// `from_json_body` runs on every non-streaming response: building a `Value` tree for it cost
// more than the rest of the filter's per-request work. One visitor, told where in the document
// it is, reads only the counts (a differential test holds it to a plain reading of a `Value`
// tree); one visitor type keeps the Wasm code small.

/// An object key the usage reader cares about, told apart without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Usage,
    Response,
    XGroq,
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    TotalTokens,
    PromptDetails,
    InputDetails,
    CompletionDetails,
    OutputDetails,
    PromptCacheHit,
    Cached,
    Reasoning,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "usage" => Key::Usage,
                    "response" => Key::Response,
                    "x_groq" => Key::XGroq,
                    "prompt_tokens" => Key::PromptTokens,
                    "completion_tokens" => Key::CompletionTokens,
                    "input_tokens" => Key::InputTokens,
                    "output_tokens" => Key::OutputTokens,
                    "total_tokens" => Key::TotalTokens,
                    "prompt_tokens_details" => Key::PromptDetails,
                    "input_tokens_details" => Key::InputDetails,
                    "completion_tokens_details" => Key::CompletionDetails,
                    "output_tokens_details" => Key::OutputDetails,
                    "prompt_cache_hit_tokens" => Key::PromptCacheHit,
                    "cached_tokens" => Key::Cached,
                    "reasoning_tokens" => Key::Reasoning,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A token count as written: absent (or `null`), a usable number, or anything else.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Count {
    #[default]
    Absent,
    Valid(u64),
    Invalid,
}

impl Count {
    fn of_f64(f: f64) -> Count {
        if f.is_finite() && f >= 0.0 {
            // `as` saturates: 2^64 and beyond read as u64::MAX, then as MAX_TOKENS.
            Count::Valid((f.ceil() as u64).min(MAX_TOKENS))
        } else {
            Count::Invalid
        }
    }

    fn get(self) -> Option<u64> {
        match self {
            Count::Valid(n) => Some(n),
            _ => None,
        }
    }
}

/// A usage object's counts, each from the last member of its name.
#[derive(Default, Clone, Copy)]
struct Counts {
    /// One of the token count keys is present, whatever its value.
    reported: bool,
    prompt: Count,
    input: Count,
    completion: Count,
    output: Count,
    total: Count,
    prompt_cached: Option<u64>,
    input_cached: Option<u64>,
    completion_reasoning: Option<u64>,
    output_reasoning: Option<u64>,
    /// DeepSeek's top-level count of input tokens served from its cache.
    prompt_cache_hit: Option<u64>,
}

impl Counts {
    /// Trustworthy enough to charge from: every count a number, and an input count present.
    fn usable(&self) -> bool {
        let counts = [
            self.prompt,
            self.input,
            self.completion,
            self.output,
            self.total,
        ];
        !counts.contains(&Count::Invalid)
            && (self.prompt.get().is_some() || self.input.get().is_some())
    }

    fn usage(self) -> Usage {
        let input = self.prompt.get().or(self.input.get()).unwrap_or(0);
        let output = self.completion.get().or(self.output.get()).unwrap_or(0);
        let reasoning = self
            .completion_reasoning
            .or(self.output_reasoning)
            .unwrap_or(0);
        // A total below the input says nothing about the output: it adds 0, never subtracts.
        let rest_of_total = self.total.get().map_or(0, |t| t.saturating_sub(input));
        // Reasoning above the output count cannot be part of it (xAI, Gemini proxies).
        let beside = if reasoning > output {
            output.saturating_add(reasoning).min(MAX_TOKENS)
        } else {
            0
        };
        let cached = self
            .prompt_cached
            .or(self.input_cached)
            .or(self.prompt_cache_hit)
            .unwrap_or(0);
        Usage {
            input_tokens: input,
            output_tokens: output.max(rest_of_total).max(beside),
            cached_input_tokens: cached.min(input),
            reasoning_tokens: reasoning,
            output_missing: [self.completion, self.output, self.total]
                .iter()
                .all(|c| *c == Count::Absent),
        }
    }
}

/// Where in the document a value sits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    /// The document: `usage`, `response.usage`, `x_groq.usage`.
    Top,
    /// `response` or `x_groq`: their `usage`.
    Wrapper,
    /// A `usage` object: its counts.
    Usage,
    /// A `*_tokens_details` object: `cached_tokens`, `reasoning_tokens`.
    Details,
    /// A token count.
    Count,
}

/// What the reader found in one value, by where it sat.
#[derive(Default)]
struct Slots {
    /// At::Count.
    count: Count,
    /// At::Details.
    cached: Option<u64>,
    reasoning: Option<u64>,
    /// At::Usage (or At::Wrapper: its `usage`), when it is an object.
    counts: Option<Counts>,
    /// At::Top: the `usage`, `response.usage` and `x_groq.usage` candidates.
    found: [Option<Counts>; 3],
}

/// Reads one value into `out` (results go through `out`, keeping the visitor's own return
/// value empty: no large struct is moved per visited value).
struct Reader<'a> {
    at: At,
    out: &'a mut Slots,
}

impl<'de> DeserializeSeed<'de> for Reader<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Reads the value of the current map entry at `at`.
fn read<'de, A: MapAccess<'de>>(map: &mut A, at: At) -> Result<Slots, A::Error> {
    let mut s = Slots::default();
    map.next_value_seed(Reader { at, out: &mut s })?;
    Ok(s)
}

impl<'de> Visitor<'de> for Reader<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut c = Counts::default();
        while let Some(key) = map.next_key::<Key>()? {
            match (self.at, key) {
                (At::Top, Key::Usage) => self.out.found[0] = read(&mut map, At::Usage)?.counts,
                (At::Top, Key::Response) => self.out.found[1] = read(&mut map, At::Wrapper)?.counts,
                (At::Top, Key::XGroq) => self.out.found[2] = read(&mut map, At::Wrapper)?.counts,
                (At::Wrapper, Key::Usage) => self.out.counts = read(&mut map, At::Usage)?.counts,
                (At::Usage, Key::PromptTokens) => c.prompt = read(&mut map, At::Count)?.count,
                (At::Usage, Key::InputTokens) => c.input = read(&mut map, At::Count)?.count,
                (At::Usage, Key::CompletionTokens) => {
                    c.completion = read(&mut map, At::Count)?.count
                }
                (At::Usage, Key::OutputTokens) => c.output = read(&mut map, At::Count)?.count,
                (At::Usage, Key::TotalTokens) => c.total = read(&mut map, At::Count)?.count,
                (At::Usage, Key::PromptDetails) => {
                    c.prompt_cached = read(&mut map, At::Details)?.cached
                }
                (At::Usage, Key::InputDetails) => {
                    c.input_cached = read(&mut map, At::Details)?.cached
                }
                (At::Usage, Key::CompletionDetails) => {
                    c.completion_reasoning = read(&mut map, At::Details)?.reasoning
                }
                (At::Usage, Key::OutputDetails) => {
                    c.output_reasoning = read(&mut map, At::Details)?.reasoning
                }
                (At::Usage, Key::PromptCacheHit) => {
                    c.prompt_cache_hit = read(&mut map, At::Count)?.count.get()
                }
                (At::Details, Key::Cached) => {
                    self.out.cached = read(&mut map, At::Count)?.count.get()
                }
                (At::Details, Key::Reasoning) => {
                    self.out.reasoning = read(&mut map, At::Count)?.count.get()
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if self.at == At::Usage
                && matches!(
                    key,
                    Key::PromptTokens
                        | Key::InputTokens
                        | Key::CompletionTokens
                        | Key::OutputTokens
                        | Key::TotalTokens
                )
            {
                c.reported = true;
            }
        }
        if self.at == At::Usage {
            self.out.counts = Some(c);
        }
        self.out.count = Count::Invalid;
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.out.count = Count::Invalid;
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(), E> {
        self.out.count = Count::Valid(n.min(MAX_TOKENS));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<(), E> {
        self.out.count =
            u64::try_from(n).map_or(Count::Invalid, |n| Count::Valid(n.min(MAX_TOKENS)));
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, f: f64) -> Result<(), E> {
        self.out.count = Count::of_f64(f);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.out.count = Count::Invalid;
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.out.count = Count::Invalid;
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    // The oracle for `from_json_body`: the same reading done plainly on a parsed `Value` tree.

    const COUNT_KEYS: [&str; 5] = [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "total_tokens",
    ];

    fn from_value(v: &Value) -> Option<Usage> {
        let obj = v.as_object()?;
        pick([
            obj.get("usage"),
            obj.get("response").and_then(|r| r.get("usage")),
            obj.get("x_groq").and_then(|g| g.get("usage")),
        ])
    }

    fn pick(candidates: [Option<&Value>; 3]) -> Option<Usage> {
        candidates
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .find(|u| COUNT_KEYS.iter().any(|k| u.contains_key(*k)))
            .filter(|u| usable(u))
            .map(read_usage)
    }

    /// A count as the oracle reads it: null or missing is absent; a non-negative integer or
    /// finite number (rounded up) is valid, capped at MAX_TOKENS; anything else is invalid.
    fn count(v: Option<&Value>) -> Count {
        match v {
            None | Some(Value::Null) => Count::Absent,
            Some(v) => match (v.as_u64(), v.as_i64(), v.as_f64()) {
                (Some(n), _, _) => Count::Valid(n.min(MAX_TOKENS)),
                (None, Some(_), _) => Count::Invalid,
                (None, None, Some(f)) if f.is_finite() && f >= 0.0 => {
                    Count::Valid((f.ceil() as u64).min(MAX_TOKENS))
                }
                _ => Count::Invalid,
            },
        }
    }

    fn usable(u: &Map<String, Value>) -> bool {
        COUNT_KEYS
            .iter()
            .all(|k| count(u.get(*k)) != Count::Invalid)
            && ["prompt_tokens", "input_tokens"]
                .iter()
                .any(|k| count(u.get(*k)).get().is_some())
    }

    fn read_usage(u: &Map<String, Value>) -> Usage {
        let input = first_count(u, &["prompt_tokens", "input_tokens"]);
        let reported = first_count(u, &["completion_tokens", "output_tokens"]);
        let reasoning = first_detail(
            u,
            &["completion_tokens_details", "output_tokens_details"],
            "reasoning_tokens",
        );
        // Output: what the provider counted as output, or what its total leaves after the
        // input, or its output plus reasoning it reported outside the output count.
        let mut output = reported;
        if let Some(total) = count(u.get("total_tokens")).get() {
            if total >= input {
                output = output.max(total - input);
            }
        }
        if reasoning > reported {
            output = output.max(MAX_TOKENS.min(reported + reasoning));
        }
        // Cached: the details' count, else DeepSeek's top-level hit count; never above input.
        let cached = ["prompt_tokens_details", "input_tokens_details"]
            .iter()
            .map(|p| count(u.get(*p).and_then(|d| d.get("cached_tokens"))))
            .chain([count(u.get("prompt_cache_hit_tokens"))])
            .find_map(Count::get)
            .unwrap_or(0);
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached.min(input),
            reasoning_tokens: reasoning,
            output_missing: ["completion_tokens", "output_tokens", "total_tokens"]
                .iter()
                .all(|k| count(u.get(*k)) == Count::Absent),
        }
    }

    fn first_count(u: &Map<String, Value>, keys: &[&str]) -> u64 {
        keys.iter()
            .find_map(|k| count(u.get(*k)).get())
            .unwrap_or(0)
    }

    fn first_detail(u: &Map<String, Value>, parents: &[&str], key: &str) -> u64 {
        parents
            .iter()
            .find_map(|p| count(u.get(*p).and_then(|d| d.get(key))).get())
            .unwrap_or(0)
    }

    fn u(input: u64, output: u64, cached: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            reasoning_tokens: reasoning,
            output_missing: false,
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
    fn body_scan_agrees_with_parsing_the_whole_document() {
        // from_json_body skips what cannot carry usage; it must read what from_value reads.
        let parts = [
            r#""usage":{"prompt_tokens":4,"completion_tokens":5}"#,
            r#""usage":null"#,
            r#""usage":{"total_tokens":3}"#,
            r#""usage":[{"prompt_tokens":1}]"#,
            r#""response":{"usage":{"input_tokens":6,"output_tokens":7},"usage":{"input_tokens":8}}"#,
            r#""response":{"output":[{"usage":{"input_tokens":99}}]}"#,
            r#""response":[{"usage":{"input_tokens":1}}]"#,
            r#""response":"usage""#,
            r#""x_groq":{"id":"r","usage":{"prompt_tokens":10,"completion_tokens":11}}"#,
            r#""x_groq":{"usage":null}"#,
            r#""choices":[{"message":{"content":"{\"usage\":{\"prompt_tokens\":9}}","tool_calls":[]}}],"n":1.5e3"#,
            r#""us\u0061ge":{"prompt_tokens":12,"completion_tokens_details":{"reasoning_tokens":2}}"#,
            r#""usage":{"prompt_tokens":-1,"input_tokens":7,"completion_tokens":2.0,"output_tokens":3,"prompt_tokens":"x"}"#,
            r#""usage":{"input_tokens":1e2,"output_tokens":18446744073709551616,"total_tokens":null}"#,
            r#""usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":3},"input_tokens_details":{"cached_tokens":4},"prompt_tokens_details":[1]}"#,
            r#""usage":{"output_tokens":5,"output_tokens_details":{"reasoning_tokens":2,"reasoning_tokens":{"n":1}},"completion_tokens_details":{"reasoning_tokens":1}}"#,
            r#""x_groq":{"usage":{"completion_tokens":1,"completion_tokens_details":{"reasoning_tokens":1}},"usage":7}"#,
            r#""usage":{"prompt_tokens":3.0,"completion_tokens":4.5,"total_tokens":null}"#,
            r#""usage":{"prompt_tokens":-1,"prompt_tokens":2,"completion_tokens":1,"completion_tokens":"x"}"#,
            r#""usage":{"input_tokens":null,"prompt_tokens":null,"output_tokens":2}"#,
            r#""usage":{"prompt_tokens":32,"completion_tokens":9,"total_tokens":135,"completion_tokens_details":{"reasoning_tokens":94}}"#,
            r#""usage":{"prompt_tokens":21,"total_tokens":81,"prompt_cache_hit_tokens":20,"prompt_cache_miss_tokens":1}"#,
            r#""usage":{"input_tokens":10,"output_tokens":5,"total_tokens":4,"output_tokens_details":{"reasoning_tokens":1099511627776},"input_tokens_details":{"cached_tokens":11}}"#,
            r#""usage":{"prompt_tokens":9,"prompt_cache_hit_tokens":3,"prompt_tokens_details":{"cached_tokens":null},"prompt_cache_hit_tokens":-3}"#,
            r#""response":{"usage":{"input_tokens":4,"prompt_cache_hit_tokens":2.5,"total_tokens":1e3,"output_tokens_details":{"reasoning_tokens":"x"}}}"#,
            r#""prompt_cache_hit_tokens":5,"x_groq":{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":18446744073709551616,"prompt_cache_hit_tokens":9,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            r#""usage":{"prompt_tokens":50,"completion_tokens":30,"total_tokens":60,"completion_tokens_details":{"reasoning_tokens":40},"prompt_cache_hit_tokens":"all"}"#,
        ];
        let mut checked = 0;
        for a in 0..parts.len() {
            for b in 0..parts.len() {
                for c in [None, Some(0), Some(4), Some(8)] {
                    let mut members = vec![parts[a], parts[b]];
                    members.extend(c.map(|i| parts[i]));
                    let body = format!("{{{}}}", members.join(","));
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let got = from_json_body(body.as_bytes());
                    assert_eq!(got, from_value(&v), "{body}");
                    if let Some(got) = got {
                        // Parts stay parts, and nothing leaves the capped range.
                        assert!(got.cached_input_tokens <= got.input_tokens, "{body}");
                        assert!(got.reasoning_tokens <= got.output_tokens, "{body}");
                        assert!(
                            got.input_tokens.max(got.output_tokens) <= MAX_TOKENS,
                            "{body}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, parts.len() * parts.len() * 4);
    }

    #[test]
    fn byte_order_mark_and_whitespace_around_the_body() {
        let body = b"\xEF\xBB\xBF \n{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}} \n";
        assert_eq!(from_json_body(body), Some(u(1, 2, 0, 0)));
        assert_eq!(from_json_body(b"{\"usage\":{\"prompt_tokens\":1}} x"), None);
    }

    #[test]
    fn invalid_json_is_none() {
        assert_eq!(from_json_body(b""), None);
        assert_eq!(from_json_body(b"{\"usage\":{\"prompt_tokens\":1"), None);
        assert_eq!(from_json_body(&[0xff, 0xfe, b'{', b'}']), None);
    }

    #[test]
    fn garbage_counts_are_no_usage_at_all() {
        // Charging from these would read as a cheap (or free) request: the caller estimates.
        for usage in [
            r#"{"prompt_tokens":-5,"completion_tokens":3}"#,
            r#"{"prompt_tokens":12,"completion_tokens":"50"}"#,
            r#"{"prompt_tokens":12,"completion_tokens":50,"total_tokens":"62"}"#,
            r#"{"prompt_tokens":true,"completion_tokens":50}"#,
            r#"{"prompt_tokens":12,"completion_tokens":[50]}"#,
            r#"{"prompt_tokens":12,"completion_tokens":{"n":50}}"#,
            r#"{"prompt_tokens":12,"completion_tokens":-1.0}"#,
            r#"{"total_tokens":62}"#,
            r#"{"completion_tokens":50}"#,
            r#"{"prompt_tokens":null,"completion_tokens":50}"#,
        ] {
            let body = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            assert_eq!(from_json_body(body.as_bytes()), None, "{usage}");
        }
        // Odd details are only details: no cache discount, no reasoning count.
        let details = br#"{"usage":{"prompt_tokens":10,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":"all"},"completion_tokens_details":[1,2]}}"#;
        assert_eq!(from_json_body(details), Some(u(10, 9, 0, 0)));
    }

    #[test]
    fn numbers_that_are_not_plain_integers() {
        // Whole-valued floats are counts; fractions round up; null is absent.
        let body =
            br#"{"usage":{"prompt_tokens":12.0,"completion_tokens":49.2,"total_tokens":null}}"#;
        assert_eq!(from_json_body(body), Some(u(12, 50, 0, 0)));
        let embeddings = br#"{"usage":{"prompt_tokens":8.0,"total_tokens":8.0}}"#;
        assert_eq!(from_json_body(embeddings), Some(u(8, 0, 0, 0)));
    }

    #[test]
    fn huge_counts_read_as_the_maximum_never_as_zero_or_wrapped() {
        let huge = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551616}}"#;
        assert_eq!(from_json_body(huge), Some(u(MAX_TOKENS, MAX_TOKENS, 0, 0)));
        let big = br#"{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1e300}}"#;
        assert_eq!(from_json_body(big), Some(u(MAX_TOKENS, MAX_TOKENS, 0, 0)));
        let just_below = format!(
            r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":1}}}}"#,
            MAX_TOKENS - 1
        );
        assert_eq!(
            from_json_body(just_below.as_bytes()),
            Some(u(MAX_TOKENS - 1, 1, 0, 0))
        );
    }

    #[test]
    fn openai_reasoning_is_inside_completion_tokens_and_not_charged_twice() {
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60,"completion_tokens_details":{"reasoning_tokens":30}}}"#;
        assert_eq!(from_json_body(body), Some(u(10, 50, 0, 30)));
        // All of the output was reasoning: still counted once.
        let all = br#"{"usage":{"prompt_tokens":10,"completion_tokens":30,"total_tokens":40,"completion_tokens_details":{"reasoning_tokens":30}}}"#;
        assert_eq!(from_json_body(all), Some(u(10, 30, 0, 30)));
        let no_total = br#"{"usage":{"prompt_tokens":10,"completion_tokens":50,"completion_tokens_details":{"reasoning_tokens":30}}}"#;
        assert_eq!(from_json_body(no_total), Some(u(10, 50, 0, 30)));
    }

    #[test]
    fn xai_reasoning_outside_completion_tokens_is_charged() {
        let body = br#"{"id":"x","object":"chat.completion","model":"grok-3-mini","choices":[],"usage":{"prompt_tokens":32,"completion_tokens":9,"total_tokens":135,"prompt_tokens_details":{"text_tokens":32,"audio_tokens":0,"image_tokens":0,"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":94,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        assert_eq!(from_json_body(body), Some(u(32, 103, 0, 94)));
        // Without the total, completion + reasoning still holds the charge up.
        let no_total = br#"{"usage":{"prompt_tokens":32,"completion_tokens":9,"completion_tokens_details":{"reasoning_tokens":94}}}"#;
        assert_eq!(from_json_body(no_total), Some(u(32, 103, 0, 94)));
    }

    #[test]
    fn gemini_proxy_reasoning_with_zero_completion_tokens_is_charged() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":21,"completion_tokens":0,"total_tokens":81,"completion_tokens_details":{"reasoning_tokens":60}}}"#;
        assert_eq!(from_json_body(body), Some(u(21, 60, 0, 60)));
    }

    #[test]
    fn output_is_what_the_total_leaves_when_completion_tokens_are_missing() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":21,"total_tokens":81}}"#;
        assert_eq!(from_json_body(body), Some(u(21, 60, 0, 0)));
        let responses = br#"{"response":{"usage":{"input_tokens":21,"total_tokens":81}}}"#;
        assert_eq!(from_json_body(responses), Some(u(21, 60, 0, 0)));
    }

    #[test]
    fn a_short_or_missing_total_never_lowers_the_output_count() {
        // Total below input + output, below input alone, or absent: the output count stands.
        for usage in [
            r#"{"prompt_tokens":10,"completion_tokens":50,"total_tokens":20}"#,
            r#"{"prompt_tokens":10,"completion_tokens":50,"total_tokens":5}"#,
            r#"{"prompt_tokens":10,"completion_tokens":50,"total_tokens":0}"#,
            r#"{"prompt_tokens":10,"completion_tokens":50}"#,
            r#"{"prompt_tokens":10,"completion_tokens":50,"total_tokens":null}"#,
        ] {
            let body = format!(r#"{{"usage":{usage}}}"#);
            assert_eq!(
                from_json_body(body.as_bytes()),
                Some(u(10, 50, 0, 0)),
                "{usage}"
            );
        }
        // A total below the input adds nothing; reasoning outside completion still does.
        let short = br#"{"usage":{"prompt_tokens":100,"completion_tokens":9,"total_tokens":50,"completion_tokens_details":{"reasoning_tokens":94}}}"#;
        assert_eq!(from_json_body(short), Some(u(100, 103, 0, 94)));
    }

    #[test]
    fn responses_api_reasoning_outside_output_tokens_is_charged() {
        let body = br#"{"type":"response.completed","response":{"status":"completed","usage":{"input_tokens":32,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,"output_tokens_details":{"reasoning_tokens":94},"total_tokens":135}}}"#;
        assert_eq!(from_json_body(body), Some(u(32, 103, 0, 94)));
        let inside = br#"{"usage":{"input_tokens":32,"output_tokens":103,"output_tokens_details":{"reasoning_tokens":94},"total_tokens":135}}"#;
        assert_eq!(from_json_body(inside), Some(u(32, 103, 0, 94)));
        let no_output =
            br#"{"usage":{"input_tokens":21,"output_tokens_details":{"reasoning_tokens":60}}}"#;
        // No output count at all: known to be missing (charged as an estimate, decide.rs).
        let missing = Usage {
            output_missing: true,
            ..u(21, 60, 0, 60)
        };
        assert_eq!(from_json_body(no_output), Some(missing));
    }

    #[test]
    fn derived_output_counts_stay_capped() {
        let body = format!(
            r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":5,"total_tokens":{m},"completion_tokens_details":{{"reasoning_tokens":18446744073709551615}}}}}}"#,
            m = MAX_TOKENS
        );
        assert_eq!(
            from_json_body(body.as_bytes()),
            Some(u(1, MAX_TOKENS, 0, MAX_TOKENS))
        );
        let huge_total = br#"{"usage":{"prompt_tokens":0,"total_tokens":1e300}}"#;
        assert_eq!(from_json_body(huge_total), Some(u(0, MAX_TOKENS, 0, 0)));
    }

    #[test]
    fn deepseek_prompt_cache_hit_tokens_are_cached_input() {
        let body = br#"{"id":"d","object":"chat.completion","model":"deepseek-chat","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":20,"total_tokens":1020,"prompt_cache_hit_tokens":768,"prompt_cache_miss_tokens":232}}"#;
        assert_eq!(from_json_body(body), Some(u(1000, 20, 768, 0)));
        // Both reported: the details field wins.
        let both = br#"{"usage":{"prompt_tokens":1000,"completion_tokens":20,"prompt_cache_hit_tokens":768,"prompt_cache_miss_tokens":232,"prompt_tokens_details":{"cached_tokens":512}}}"#;
        assert_eq!(from_json_body(both), Some(u(1000, 20, 512, 0)));
        let responses = br#"{"usage":{"input_tokens":1000,"output_tokens":20,"prompt_cache_hit_tokens":768,"input_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(from_json_body(responses), Some(u(1000, 20, 0, 0)));
        // Only in a usage object: a stray top-level key is not usage.
        let stray =
            br#"{"prompt_cache_hit_tokens":5,"usage":{"prompt_tokens":10,"completion_tokens":1}}"#;
        assert_eq!(from_json_body(stray), Some(u(10, 1, 0, 0)));
    }

    #[test]
    fn an_odd_cache_hit_count_is_no_discount_like_an_odd_cached_tokens() {
        // As with `cached_tokens`: the odd count reads as absent (full input price), and the
        // usage itself stays usable.
        for hit in [r#""768""#, "-1", "true", "[1]", r#"{"n":1}"#, "null"] {
            let body = format!(
                r#"{{"usage":{{"prompt_tokens":1000,"completion_tokens":20,"prompt_cache_hit_tokens":{hit}}}}}"#
            );
            assert_eq!(
                from_json_body(body.as_bytes()),
                Some(u(1000, 20, 0, 0)),
                "{hit}"
            );
        }
        // An odd details count falls through to the hit count.
        let odd_details = br#"{"usage":{"prompt_tokens":1000,"prompt_cache_hit_tokens":768,"prompt_tokens_details":{"cached_tokens":"all"}}}"#;
        let want = Usage {
            output_missing: true,
            ..u(1000, 0, 768, 0)
        };
        assert_eq!(from_json_body(odd_details), Some(want));
    }

    #[test]
    fn cached_input_never_exceeds_input() {
        for usage in [
            r#"{"prompt_tokens":100,"completion_tokens":1,"prompt_cache_hit_tokens":5000}"#,
            r#"{"prompt_tokens":100,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":5000}}"#,
            r#"{"input_tokens":100,"output_tokens":1,"input_tokens_details":{"cached_tokens":1e300}}"#,
        ] {
            let body = format!(r#"{{"usage":{usage}}}"#);
            assert_eq!(
                from_json_body(body.as_bytes()),
                Some(u(100, 1, 100, 0)),
                "{usage}"
            );
        }
    }
}
