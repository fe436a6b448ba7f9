//! Request classification from the real body: which endpoint, which model, whether it streams,
//! declares tools (and their names), carries images or content the classifier cannot vouch for,
//! and how many tokens it may consume at most.

use crate::borrowed::Value;

use crate::errors::{Code, Denial};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Endpoint {
    pub fn to_pb(self) -> aex_proto::v1::Endpoint {
        use aex_proto::v1::Endpoint as E;
        match self {
            Endpoint::ChatCompletions => E::ChatCompletions,
            Endpoint::Completions => E::Completions,
            Endpoint::Embeddings => E::Embeddings,
            Endpoint::Responses => E::Responses,
        }
    }

    /// Path below the provider's base path.
    pub fn suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }
}

/// What the gateway does with a request, decided from method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A model endpoint: read the body, check policy, reserve, forward.
    Governed(Endpoint),
    /// `GET /v1/models`: answered by the filter from the agent's policy.
    ListModels,
    /// `GET /v1/models/{id}`.
    GetModel(String),
    /// `GET /v1/aex/usage`: the agent's own budget and spend.
    Usage,
    /// Anything else under `/v1/`: refused so nothing bypasses governance.
    Unknown,
    /// Outside `/v1/` (dashboard): not the filter's business.
    NotGoverned,
}

pub fn route(method: &str, path: &str) -> Route {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.trim_end_matches('/');
    if path != "/v1" && !path.starts_with("/v1/") {
        return Route::NotGoverned;
    }
    match (method, path) {
        ("POST", "/v1/chat/completions") => Route::Governed(Endpoint::ChatCompletions),
        ("POST", "/v1/completions") => Route::Governed(Endpoint::Completions),
        ("POST", "/v1/embeddings") => Route::Governed(Endpoint::Embeddings),
        ("POST", "/v1/responses") => Route::Governed(Endpoint::Responses),
        ("GET", "/v1/models") => Route::ListModels,
        ("GET", "/v1/aex/usage") => Route::Usage,
        ("GET", p) => match p.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => Route::GetModel(percent_decode(id)),
            _ => Route::Unknown,
        },
        _ => Route::Unknown,
    }
}

/// A path segment with its `%XX` escapes decoded: SDKs escape the `/` of model names such as
/// `openai/gpt-oss-20b` (openai-python sends `GET /v1/models/openai%2Fgpt-oss-20b`). A segment
/// that does not decode to UTF-8, or holds a malformed escape, is kept as sent: it then names no
/// model.
pub fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_string();
    }
    let mut out = Vec::with_capacity(segment.len());
    let mut rest = segment.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b != b'%' {
            out.push(b);
            rest = tail;
            continue;
        }
        let hex = tail
            .get(..2)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        let Some(decoded) = hex else {
            return segment.to_string();
        };
        out.push(decoded);
        rest = tail.get(2..).unwrap_or_default();
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_string())
}

/// Which body field carries the output cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
}

impl CapField {
    pub fn as_str(self) -> &'static str {
        match self {
            CapField::MaxTokens => "max_tokens",
            CapField::MaxCompletionTokens => "max_completion_tokens",
            CapField::MaxOutputTokens => "max_output_tokens",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: Option<bool>,
    pub has_tools: bool,
    /// Names of the function / custom tools declared (checked against a tool allow-list).
    pub tool_names: Vec<String>,
    /// Built-in (server-side) tools declared, by type: `tools` entries whose `type` is neither
    /// `function` nor `custom` (web_search, file_search, code_interpreter, mcp, ...), and chat
    /// `web_search_options`. They have no name to allow-list, and their server-side cost is not
    /// bounded by the token prices.
    pub builtin_tools: Vec<String>,
    /// A `service_tier` other than absent / `auto` / `default`: billed at prices other than the
    /// configured ones.
    pub service_tier: Option<String>,
    pub images: u64,
    /// File parts (`file`, `input_file`): providers show the model a PDF's pages as images, so
    /// they are visual input too (and, unbounded, refused to strict agents).
    pub files: u64,
    /// Content parts or inputs whose cost or nature the classifier cannot bound (files, audio,
    /// server-side conversation state). Strict agents are refused such requests.
    pub unvouched: Vec<String>,
    /// Messages (chat), prompts (completions) or input items (responses): each carries a
    /// template overhead in the input bound.
    pub messages: u64,
    /// Per-choice output cap the request asked for, and the field it used. Always `None` for
    /// embeddings, which produce no output tokens.
    pub output_cap: Option<(CapField, u64)>,
    /// Number of choices the provider may generate, each up to the output cap: `n` (chat), or
    /// `max(n, best_of)` for each prompt of a completions batch.
    pub choices: u64,
}

impl Classified {
    /// Whether the request carries input whose size its bytes do not bound: a stored file, a
    /// previous response or conversation, audio, an unknown part (everything unvouched but the
    /// output `modalities`).
    pub fn has_unmeasured_input(&self) -> bool {
        self.unvouched.iter().any(|u| u != "modalities")
    }
}

fn bad(code: Code, msg: impl Into<String>) -> Denial {
    Denial::new(code, msg)
}

fn as_count(v: &Value, field: &str) -> Result<Option<u64>, Denial> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| {
            bad(
                Code::InvalidRequest,
                format!("'{field}' must be a non-negative integer"),
            )
        }),
    }
}

/// Classifies a request body for `endpoint`.
pub fn classify(endpoint: Endpoint, body: &[u8]) -> Result<Classified, Denial> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(
            Code::InvalidJson,
            "The request body is empty; expected a JSON object.",
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        bad(
            Code::InvalidJson,
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = &v else {
        return Err(bad(
            Code::InvalidJson,
            "The request body must be a JSON object.",
        ));
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => {
            return Err(bad(
                Code::MissingModel,
                "You must provide a model parameter.",
            ))
        }
        Some(Value::String(s)) if !s.is_empty() => s.to_string(),
        Some(Value::String(_)) => {
            return Err(bad(
                Code::MissingModel,
                "You must provide a model parameter.",
            ))
        }
        Some(_) => return Err(bad(Code::InvalidRequest, "'model' must be a string.")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(Code::InvalidRequest, "'stream' must be a boolean.")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(bad(
                    Code::InvalidRequest,
                    "'stream_options.include_usage' must be a boolean.",
                ))
            }
        },
        Some(_) => {
            return Err(bad(
                Code::InvalidRequest,
                "'stream_options' must be an object.",
            ))
        }
    };
    let mut c = Classified {
        model,
        stream,
        include_usage,
        choices: 1,
        ..Default::default()
    };

    // Tools: chat `tools` / legacy `functions`, Responses `tools` (function and built-in tools).
    for key in ["tools", "functions"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for t in items {
                    c.has_tools = true;
                    match t.get("type") {
                        // Legacy `functions` entries and typeless entries are named tools.
                        None | Some(Value::Null) => push_tool_names(t, &mut c.tool_names),
                        Some(ty) if ty == "function" || ty == "custom" => {
                            push_tool_names(t, &mut c.tool_names)
                        }
                        Some(Value::String(ty)) => c.builtin_tools.push(ty.to_string()),
                        Some(_) => c.builtin_tools.push("untyped tool".into()),
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    Code::InvalidRequest,
                    format!("'{key}' must be an array."),
                ))
            }
        }
    }

    // Chat's built-in web search: a tool, though not declared in `tools`.
    if obj.get("web_search_options").is_some_and(|x| !x.is_null()) {
        c.has_tools = true;
        c.builtin_tools.push("web_search_options".into());
    }
    match obj.get("service_tier") {
        None | Some(Value::Null) => {}
        Some(t) if t == "auto" || t == "default" => {}
        Some(Value::String(t)) => c.service_tier = Some(t.to_string()),
        Some(_) => c.service_tier = Some("(not a string)".into()),
    }

    match endpoint {
        Endpoint::ChatCompletions => {
            let Some(Value::Array(messages)) = obj.get("messages") else {
                return Err(bad(
                    Code::InvalidRequest,
                    "'messages' must be an array of messages.",
                ));
            };
            c.messages = messages.len() as u64;
            for m in messages {
                scan_content(m.get("content"), &mut c);
                // An assistant message's `audio` (a previous audio reply) and any media member.
                scan_media(m, &mut c);
            }
            let mct = as_count(&v, "max_completion_tokens")?;
            let mt = as_count(&v, "max_tokens")?;
            // With both fields, providers differ in which one they obey: bound the request by
            // the larger, so neither the reservation nor a policy cap can be outrun (a clamp
            // rewrites both).
            c.output_cap = match (mct, mt) {
                (Some(a), Some(b)) => Some(if a >= b {
                    (CapField::MaxCompletionTokens, a)
                } else {
                    (CapField::MaxTokens, b)
                }),
                (Some(a), None) => Some((CapField::MaxCompletionTokens, a)),
                (None, Some(b)) => Some((CapField::MaxTokens, b)),
                (None, None) => None,
            };
            c.choices = as_count(&v, "n")?.unwrap_or(1).max(1);
            if obj
                .get("modalities")
                .and_then(Value::as_array)
                .is_some_and(|m| m.iter().any(|x| x != "text"))
            {
                c.unvouched.push("modalities".into());
            }
        }
        Endpoint::Completions => {
            // OpenAI-compatible servers answer `n` (or `best_of`) choices for EACH prompt of a
            // batch: a string or a flat token-id array is one prompt, an array of strings or of
            // token-id arrays is one prompt per element.
            let prompts = match obj.get("prompt") {
                Some(Value::String(_)) => 1,
                Some(Value::Array(a)) if a.is_empty() => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "'prompt' must not be an empty array.",
                    ))
                }
                Some(Value::Array(a)) if a.iter().all(|x| matches!(x, Value::Number(_))) => 1,
                Some(Value::Array(a))
                    if a
                        .iter()
                        .all(|x| matches!(x, Value::String(_) | Value::Array(_))) =>
                {
                    a.len() as u64
                }
                Some(Value::Array(_)) => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "'prompt' must be a string, an array of strings, an array of token ids, or an array of token-id arrays.",
                    ))
                }
                None | Some(Value::Null) => {
                    return Err(bad(Code::InvalidRequest, "'prompt' is required."))
                }
                Some(_) => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "'prompt' must be a string or an array.",
                    ))
                }
            };
            // The template overhead is per prompt, not per token id.
            c.messages = prompts;
            c.output_cap = as_count(&v, "max_tokens")?.map(|n| (CapField::MaxTokens, n));
            let n = as_count(&v, "n")?.unwrap_or(1);
            let best_of = as_count(&v, "best_of")?.unwrap_or(1);
            c.choices = n.max(best_of).max(1).saturating_mul(prompts);
        }
        Endpoint::Embeddings => {
            match obj.get("input") {
                Some(Value::String(_)) | Some(Value::Array(_)) => {}
                _ => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "'input' must be a string or an array.",
                    ))
                }
            }
            c.messages = 1;
            // No output tokens: no cap to bound, write or clamp.
            c.output_cap = None;
            c.stream = false;
        }
        Endpoint::Responses => {
            match obj.get("input") {
                None | Some(Value::Null) | Some(Value::String(_)) => c.messages = 1,
                Some(Value::Array(items)) => {
                    c.messages = items.len() as u64;
                    for item in items {
                        scan_response_item(item, &mut c);
                    }
                }
                Some(_) => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "'input' must be a string or an array.",
                    ))
                }
            }
            // A background response is queued: the provider's immediate reply carries no usage
            // and the job then runs (and is fetched) outside AEX, unmetered.
            match obj.get("background") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => {
                    return Err(bad(
                        Code::InvalidRequest,
                        "Background responses are not supported through AEX: their cost cannot be metered. Remove `background` or set it to false.",
                    ))
                }
                Some(_) => {
                    return Err(bad(Code::InvalidRequest, "'background' must be a boolean."))
                }
            }
            for key in ["previous_response_id", "conversation", "prompt"] {
                if obj.get(key).is_some_and(|x| !x.is_null()) {
                    c.unvouched.push(key.into());
                }
            }
            c.output_cap =
                as_count(&v, "max_output_tokens")?.map(|n| (CapField::MaxOutputTokens, n));
        }
    }
    Ok(c)
}

/// Pushes every name a tool entry carries: providers differ in which one they read (the Responses
/// API its top-level `name`, chat `function.name`, or `custom.name` for a custom tool), so an entry
/// carrying several must have each of them allowed. An entry with none is named by its `type` (or
/// nothing), which no allow-list of tool names is meant to admit.
fn push_tool_names(t: &Value, names: &mut Vec<String>) {
    let before = names.len();
    let nested = |key| t.get(key).and_then(|x| x.get("name"));
    names.extend(
        [nested("function"), t.get("name"), nested("custom")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string),
    );
    if names.len() == before {
        names.push(
            t.get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
}

/// Content part types that are plain text.
const TEXT_PARTS: [&str; 4] = ["text", "refusal", "input_text", "output_text"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Media {
    /// An image: refused to agents without vision, and bounded by the configured image bound.
    Image,
    /// Visual input that bound does not cover (video, image embeddings): refused to agents
    /// without vision and to strict agents.
    UnboundedVisual,
    /// Audio, embeddings: refused to strict agents.
    Unbounded,
    /// A file: its pages may reach the model as images (refused to agents without vision), and
    /// its size is not bounded (refused to strict agents).
    File,
}

/// What a provider reads as media, named by a content part's `type` or by a member it carries,
/// whatever its `type` says: vLLM reads a part without a `type`, or with a `uuid`, by the first
/// of these members present. A null member is absent (SDKs echo assistant messages back with
/// `"audio": null`), unless the part has a `uuid`: vLLM then reads that media from its cache.
const MEDIA: [(&str, Media); 15] = [
    ("image_url", Media::Image),
    ("input_image", Media::Image),
    ("image", Media::Image),
    ("image_pil", Media::Image),
    ("computer_screenshot", Media::Image),
    ("image_embeds", Media::UnboundedVisual),
    ("video_url", Media::UnboundedVisual),
    ("video_embeds", Media::UnboundedVisual),
    ("input_audio", Media::Unbounded),
    ("audio", Media::Unbounded),
    ("audio_url", Media::Unbounded),
    ("audio_embeds", Media::Unbounded),
    ("file", Media::File),
    ("input_file", Media::File),
    ("prompt_embeds", Media::Unbounded),
];

/// Counts the media a content part (or a message) carries, by its `type` or its members: one
/// image per part however many image members it has, and each unbounded kind as unvouched.
fn scan_media(p: &Value, c: &mut Classified) {
    let ty = p.get("type").and_then(Value::as_str);
    let cached = p.get("uuid").is_some_and(|u| !u.is_null());
    let carries = |name: &str| p.get(name).is_some_and(|v| cached || !v.is_null());
    let (mut visual, mut file) = (false, false);
    for &(name, media) in MEDIA
        .iter()
        .filter(|(name, _)| ty == Some(*name) || carries(name))
    {
        visual |= matches!(media, Media::Image | Media::UnboundedVisual);
        file |= media == Media::File;
        if media != Media::Image {
            c.unvouched.push(name.into());
        }
    }
    if visual {
        c.images += 1;
    }
    if file {
        c.files += 1;
    }
}

/// Message content or a tool result's `output`: a string is text; an array holds content parts;
/// an object is one such part. Tool outputs use that form (a computer call's screenshot); chat
/// and Responses message content does not, but a provider may still read it as a part (others
/// as text), so it is read as one rather than refused, which keeps AEX transparent to providers
/// that accept it.
fn scan_content(content: Option<&Value>, c: &mut Classified) {
    match content {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => parts.iter().for_each(|p| scan_part(p, c)),
        Some(part @ Value::Object(_)) => scan_part(part, c),
        Some(_) => c.unvouched.push("non-text content".into()),
    }
}

/// A content part: its media are counted whatever its `type`; a part whose `type` is neither text
/// nor a media kind is content the classifier cannot vouch for, media or not.
fn scan_part(p: &Value, c: &mut Classified) {
    scan_media(p, c);
    let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
    let known = TEXT_PARTS.contains(&ty) || MEDIA.iter().any(|(name, _)| *name == ty);
    if !known {
        c.unvouched.push(if ty.is_empty() {
            "untyped content part".into()
        } else {
            ty.to_string()
        });
    }
}

fn scan_response_item(item: &Value, c: &mut Classified) {
    match item.get("type").and_then(Value::as_str) {
        None | Some("message") => {
            scan_content(item.get("content"), c);
            scan_media(item, c);
        }
        Some("function_call_output")
        | Some("custom_tool_call_output")
        | Some("computer_call_output") => scan_content(item.get("output"), c),
        // A generated image handed back as input: the model sees it like any input image.
        Some("image_generation_call") => {
            if item
                .get("result")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
            {
                c.images += 1;
            }
        }
        // A code interpreter call's outputs may hold images it drew; they reach the model too.
        Some("code_interpreter_call") => {
            if let Some(Value::Array(outs)) = item.get("outputs") {
                c.images += outs
                    .iter()
                    .filter(|o| o.get("type").and_then(Value::as_str) == Some("image"))
                    .count() as u64;
            }
            c.unvouched.push("code_interpreter_call".into());
        }
        Some("function_call") | Some("custom_tool_call") | Some("reasoning") => {}
        // A content part sent as an item (`input_text`, `input_image`, ...), or an unknown item.
        Some(_) => scan_part(item, c),
    }
}

/// Upper bound on input tokens: a BPE token is at least one byte, plus per-message template
/// overhead and a configured bound per image (an image URL costs far more than its bytes).
pub fn input_token_bound(
    body_len: usize,
    c: &Classified,
    message_overhead: u64,
    image_bound: u64,
) -> u64 {
    (body_len as u64)
        .saturating_add(c.messages.saturating_mul(message_overhead))
        .saturating_add(c.images.saturating_mul(image_bound))
        .saturating_add(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Classified, Denial> {
        classify(Endpoint::ChatCompletions, body.as_bytes())
    }

    #[test]
    fn model_ids_in_paths_are_percent_decoded() {
        assert_eq!(
            route("GET", "/v1/models/openai%2Fgpt-oss-20b"),
            Route::GetModel("openai/gpt-oss-20b".into())
        );
        assert_eq!(
            route("GET", "/v1/models/org%2fm"),
            Route::GetModel("org/m".into())
        );
        assert_eq!(
            route("GET", "/v1/models/test%2Dmodel"),
            Route::GetModel("test-model".into())
        );
        assert_eq!(
            route("GET", "/v1/models/org/m"),
            Route::GetModel("org/m".into())
        );
        assert_eq!(
            route("GET", "/v1/models/caf%C3%A9"),
            Route::GetModel("café".into())
        );
        // Malformed or non-UTF-8 escapes are kept as sent.
        for raw in ["a%2", "a%zz", "a%", "%+1", "%FF%FE", "%E2%82"] {
            assert_eq!(percent_decode(raw), raw);
        }
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("POST", "/v1/chat/completions"),
            Route::Governed(Endpoint::ChatCompletions)
        );
        assert_eq!(
            route("POST", "/v1/chat/completions?x=1"),
            Route::Governed(Endpoint::ChatCompletions)
        );
        assert_eq!(
            route("POST", "/v1/responses"),
            Route::Governed(Endpoint::Responses)
        );
        assert_eq!(route("GET", "/v1/models"), Route::ListModels);
        assert_eq!(
            route("GET", "/v1/models/gpt-4o"),
            Route::GetModel("gpt-4o".into())
        );
        assert_eq!(route("GET", "/v1/aex/usage"), Route::Usage);
        assert_eq!(route("POST", "/v1/files"), Route::Unknown);
        assert_eq!(route("GET", "/v1/chat/completions"), Route::Unknown);
        assert_eq!(route("POST", "/v1"), Route::Unknown);
        assert_eq!(route("GET", "/dashboard"), Route::NotGoverned);
        assert_eq!(route("GET", "/v10/x"), Route::NotGoverned);
    }

    #[test]
    fn duplicate_members_take_the_last_as_the_provider_would() {
        // serde_json-based providers keep the last duplicate: so must the classifier, or a body
        // could show it one model (or no tools) and the provider another.
        let c = chat(
            r#"{"model":"cheap","messages":[],"model":"gpt-4o","stream":true,"stream":false}"#,
        )
        .unwrap();
        assert_eq!(c.model, "gpt-4o");
        assert!(!c.stream);
        let c = chat(r#"{"model":"m","messages":[],"tools":null,"tools":[{"type":"function","function":{"name":"a","name":"rm_rf"}}]}"#)
            .unwrap();
        assert_eq!(c.tool_names, vec!["rm_rf".to_string()]);
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":"x","content":[{"type":"text","type":"image_url"}]}]}"#)
            .unwrap();
        assert_eq!(c.images, 1);
        let c =
            chat(r#"{"model":"gpt\u002d4o","messages":[],"max_tokens":5,"max_tokens":7}"#).unwrap();
        assert_eq!(c.model, "gpt-4o");
        assert_eq!(c.output_cap, Some((CapField::MaxTokens, 7)));
        assert_eq!(
            chat(r#"{"model":"m","messages":[],"n":2,"n":-1}"#)
                .unwrap_err()
                .code,
            Code::InvalidRequest
        );
    }

    #[test]
    fn bad_bodies() {
        assert_eq!(chat("").unwrap_err().code, Code::InvalidJson);
        assert_eq!(chat("{").unwrap_err().code, Code::InvalidJson);
        assert_eq!(chat("[1]").unwrap_err().code, Code::InvalidJson);
        assert_eq!(
            chat(r#"{"messages":[]}"#).unwrap_err().code,
            Code::MissingModel
        );
        assert_eq!(
            chat(r#"{"model":"","messages":[]}"#).unwrap_err().code,
            Code::MissingModel
        );
        assert_eq!(
            chat(r#"{"model":3,"messages":[]}"#).unwrap_err().code,
            Code::InvalidRequest
        );
        assert_eq!(
            chat(r#"{"model":"m"}"#).unwrap_err().code,
            Code::InvalidRequest
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[],"stream":"yes"}"#)
                .unwrap_err()
                .code,
            Code::InvalidRequest
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[],"max_tokens":-1}"#)
                .unwrap_err()
                .code,
            Code::InvalidRequest
        );
    }

    #[test]
    fn tools_and_names() {
        let c = chat(r#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"get_weather"}},{"type":"web_search"}]}"#).unwrap();
        assert!(c.has_tools);
        assert_eq!(c.tool_names, vec!["get_weather"]);
        assert_eq!(c.builtin_tools, vec!["web_search"]);
        let c = chat(r#"{"model":"m","messages":[],"functions":[{"name":"legacy"}]}"#).unwrap();
        assert_eq!(c.tool_names, vec!["legacy"]);
        let c = chat(r#"{"model":"m","messages":[],"tools":[]}"#).unwrap();
        assert!(!c.has_tools);
        let c = classify(
            Endpoint::Responses,
            br#"{"model":"m","input":"hi","tools":[{"type":"function","name":"f"}]}"#,
        )
        .unwrap();
        assert_eq!(c.tool_names, vec!["f"]);
    }

    #[test]
    fn vision_and_unvouched_content() {
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"http://x/i.png"}}]}]}"#).unwrap();
        assert_eq!(c.images, 1);
        assert!(c.unvouched.is_empty());
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}},{"type":"file"}]}]}"#).unwrap();
        assert_eq!(c.unvouched, vec!["input_audio", "file"]);
        let c = classify(Endpoint::Responses, br#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"x"}]}]}"#).unwrap();
        assert_eq!(c.images, 1);
        let c = classify(
            Endpoint::Responses,
            br#"{"model":"m","input":"x","previous_response_id":"resp_1"}"#,
        )
        .unwrap();
        assert_eq!(c.unvouched, vec!["previous_response_id"]);
    }

    /// Each case: (endpoint, the user message's `content` (chat) or the `input` (responses),
    /// images, unvouched). Every mismatch is reported, not just the first.
    fn check_media(cases: &[(Endpoint, &str, u64, &[&str])]) {
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|&(endpoint, x, images, unvouched)| {
                let body = match endpoint {
                    Endpoint::Responses => format!(r#"{{"model":"m","input":{x}}}"#),
                    _ => format!(r#"{{"model":"m","messages":[{{"role":"user","content":{x}}}]}}"#),
                };
                let c = classify(endpoint, body.as_bytes()).unwrap();
                let got = (c.images, c.unvouched);
                let want = (images, unvouched.iter().map(|u| u.to_string()).collect());
                (got != want).then(|| format!("{x}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    const CHAT: Endpoint = Endpoint::ChatCompletions;
    const RESP: Endpoint = Endpoint::Responses;

    #[test]
    fn media_members_count_whatever_the_part_type_says() {
        check_media(&[
            // vLLM reads a typeless part, or one with a `uuid`, by its media member (even null:
            // the uuid then names cached media).
            (
                CHAT,
                r#"[{"type":"text","text":"what?"},{"image_url":"data:,"}]"#,
                1,
                &["untyped content part"],
            ),
            (
                CHAT,
                r#"[{"image_url":{"url":"https://x/a.png"}}]"#,
                1,
                &["untyped content part"],
            ),
            (
                CHAT,
                r#"[{"type":"text","text":"x","uuid":"img-1","image_url":"data:,"}]"#,
                1,
                &[],
            ),
            (
                CHAT,
                r#"[{"uuid":"img-1","image_url":null}]"#,
                1,
                &["untyped content part"],
            ),
            // Visual parts the image bound does not cover: vision, and unvouched.
            (
                CHAT,
                r#"[{"type":"video_url","video_url":{"url":"https://x/a.mp4"}}]"#,
                1,
                &["video_url"],
            ),
            (
                CHAT,
                r#"[{"type":"image_embeds","image_embeds":"AAAA"}]"#,
                1,
                &["image_embeds"],
            ),
            // Other media in a text part; an unknown type carrying an image.
            (
                CHAT,
                r#"[{"type":"text","text":"x","input_audio":{"data":"AA"}}]"#,
                0,
                &["input_audio"],
            ),
            (
                CHAT,
                r#"[{"type":"text","text":"x","file":{"file_id":"f"}}]"#,
                0,
                &["file"],
            ),
            (
                CHAT,
                r#"[{"type":"picture","image_url":"u"}]"#,
                1,
                &["picture"],
            ),
            // Content sent as one part object instead of an array is read as that part.
            (
                CHAT,
                r#"{"type":"image_url","image_url":{"url":"u"}}"#,
                1,
                &[],
            ),
            (
                CHAT,
                r#"{"type":"input_audio","input_audio":{}}"#,
                0,
                &["input_audio"],
            ),
            (CHAT, "7", 0, &["non-text content"]),
            // Responses: typeless parts, object content, media on an item.
            (
                RESP,
                r#"[{"role":"user","content":[{"image_url":"u"}]}]"#,
                1,
                &["untyped content part"],
            ),
            (
                RESP,
                r#"[{"role":"user","content":{"type":"input_image","image_url":"u"}}]"#,
                1,
                &[],
            ),
            (RESP, r#"[{"image_url":"u"}]"#, 1, &[]),
            (
                RESP,
                r#"[{"type":"input_text","text":"x","video_url":"v"}]"#,
                1,
                &["video_url"],
            ),
        ]);
    }

    #[test]
    fn ordinary_text_and_image_content_is_classified_as_before() {
        check_media(&[
            (CHAT, r#""hello""#, 0, &[]),
            (CHAT, "null", 0, &[]),
            (
                CHAT,
                r#"[{"type":"text","text":"a"},{"type":"refusal","refusal":"no"}]"#,
                0,
                &[],
            ),
            // One image per part, however many image members it carries.
            (
                CHAT,
                r#"[{"type":"image_url","image_url":{"url":"u","detail":"low"}},{"type":"input_image","image_url":"u"}]"#,
                2,
                &[],
            ),
            (
                CHAT,
                r#"[{"type":"input_audio","input_audio":{"data":"AA"}},{"type":"file","file":{}}]"#,
                0,
                &["input_audio", "file"],
            ),
            (
                CHAT,
                r#"[{"type":"text","text":"x"},{"text":"y"}]"#,
                0,
                &["untyped content part"],
            ),
            (
                CHAT,
                r#"[{"type":"text","text":"x","image_url":null,"file":null}]"#,
                0,
                &[],
            ),
            (RESP, r#""hello""#, 0, &[]),
            (
                RESP,
                r#"[{"type":"message","role":"user","content":[{"type":"input_text","text":"x"},{"type":"input_image","image_url":"u"}]},{"type":"input_text","text":"z"}]"#,
                1,
                &[],
            ),
            (
                RESP,
                r#"[{"role":"assistant","content":[{"type":"output_text","text":"y","annotations":[]}]}]"#,
                0,
                &[],
            ),
            (
                RESP,
                r#"[{"type":"input_image","image_url":"u"},{"type":"input_file","file_id":"f"}]"#,
                1,
                &["input_file"],
            ),
            (
                RESP,
                r#"[{"type":"item_reference","id":"msg_1"}]"#,
                0,
                &["item_reference"],
            ),
        ]);
        let c = chat(
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"audio":{"id":"a1"}}]}"#,
        )
        .unwrap();
        assert_eq!((c.images, c.unvouched), (0, vec!["audio".into()]));
        // A null member is absent: SDKs echo assistant messages back with every field.
        let c = chat(r#"{"model":"m","messages":[{"role":"assistant","content":"x","audio":null,"refusal":null,"tool_calls":null}]}"#)
            .unwrap();
        assert_eq!((c.images, c.unvouched.len()), (0, 0));
    }

    #[test]
    fn every_name_a_tool_entry_carries_is_a_tool_name() {
        let cases: [(Endpoint, &str, &str, &[&str]); 6] = [
            (
                RESP,
                "tools",
                r#"{"type":"function","name":"delete_files","function":{"name":"get_weather"}}"#,
                &["get_weather", "delete_files"],
            ),
            (
                CHAT,
                "tools",
                r#"{"type":"custom","name":"get_weather","custom":{"name":"shell"}}"#,
                &["get_weather", "shell"],
            ),
            (
                CHAT,
                "tools",
                r#"{"type":"function","name":"delete_files","function":{"name":"get_weather"}}"#,
                &["get_weather", "delete_files"],
            ),
            (
                CHAT,
                "functions",
                r#"{"name":"delete_files","function":{"name":"get_weather"}}"#,
                &["get_weather", "delete_files"],
            ),
            // Unchanged: one name per ordinary entry; an entry with none is named by its type.
            (
                CHAT,
                "tools",
                r#"{"type":"function","function":{"name":"f"}},{"type":"custom","custom":{"name":"g"}}"#,
                &["f", "g"],
            ),
            (
                CHAT,
                "tools",
                r#"{"type":"function"},{}"#,
                &["function", ""],
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|&(endpoint, key, tools, want)| {
                let body =
                    format!(r#"{{"model":"m","messages":[],"input":"x","{key}":[{tools}]}}"#);
                let got = classify(endpoint, body.as_bytes()).unwrap().tool_names;
                (got != want).then(|| format!("{key}: {tools}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn caps_and_choices() {
        let c = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":50,"n":3,"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(c.output_cap, Some((CapField::MaxTokens, 50)));
        assert_eq!(c.choices, 3);
        assert!(c.stream);
        assert_eq!(c.include_usage, Some(true));
        // Both caps: the larger bounds the request, whichever one the provider obeys.
        let c = chat(r#"{"model":"m","messages":[],"max_tokens":50,"max_completion_tokens":20}"#)
            .unwrap();
        assert_eq!(c.output_cap, Some((CapField::MaxTokens, 50)));
        let c = chat(r#"{"model":"m","messages":[],"max_completion_tokens":4000,"max_tokens":1}"#)
            .unwrap();
        assert_eq!(c.output_cap, Some((CapField::MaxCompletionTokens, 4000)));
        let c = classify(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"x","n":2,"best_of":4}"#,
        )
        .unwrap();
        assert_eq!(c.choices, 4);
        let c = classify(Endpoint::Embeddings, br#"{"model":"e","input":["a","b"]}"#).unwrap();
        assert_eq!(c.output_cap, None, "embeddings have no output cap");
        assert_eq!(c.choices, 1);
    }

    fn completions(body: &str) -> Result<Classified, Denial> {
        classify(Endpoint::Completions, body.as_bytes())
    }

    #[test]
    fn completions_batches_multiply_the_choices_per_prompt() {
        // n (or best_of) choices for EACH prompt of a batch.
        let strings: Vec<String> = (0..20).map(|i| format!("\"p{i}\"")).collect();
        let c = completions(&format!(
            r#"{{"model":"m","prompt":[{}]}}"#,
            strings.join(",")
        ))
        .unwrap();
        assert_eq!((c.choices, c.messages), (20, 20));
        let c = completions(r#"{"model":"m","prompt":["a","b","c"],"n":2,"best_of":4}"#).unwrap();
        assert_eq!(c.choices, 12);
        let c = completions(r#"{"model":"m","prompt":[[1,2],[3,4]],"n":3}"#).unwrap();
        assert_eq!((c.choices, c.messages), (6, 2));
        // One tokenized prompt, and a plain string: one prompt.
        let c = completions(r#"{"model":"m","prompt":[1,2,3],"n":2}"#).unwrap();
        assert_eq!((c.choices, c.messages), (2, 1));
        let c = completions(r#"{"model":"m","prompt":"x","n":2}"#).unwrap();
        assert_eq!((c.choices, c.messages), (2, 1));
        for bad in [
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m","prompt":[1,"a"]}"#,
            r#"{"model":"m","prompt":[{"a":1}]}"#,
        ] {
            assert_eq!(
                completions(bad).unwrap_err().code,
                Code::InvalidRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_token_id_prompt_is_one_message_not_one_per_token() {
        let ids = vec!["1"; 20_000].join(",");
        let body = format!(r#"{{"model":"m","prompt":[{ids}],"max_tokens":10}}"#);
        let c = completions(&body).unwrap();
        assert_eq!(c.messages, 1);
        assert_eq!(
            input_token_bound(body.len(), &c, 8, 1000),
            body.len() as u64 + 8 + 16
        );
    }

    fn responses(body: &str) -> Classified {
        classify(Endpoint::Responses, body.as_bytes()).unwrap()
    }

    #[test]
    fn generated_images_handed_back_as_input_are_images() {
        let c = responses(
            r#"{"model":"m","input":[{"type":"image_generation_call","id":"ig_1","status":"completed","result":"iVBORw0KGgo="}]}"#,
        );
        assert_eq!((c.images, c.unvouched.len()), (1, 0));
        // No result (still generating, or stripped): nothing for the model to see.
        let c = responses(
            r#"{"model":"m","input":[{"type":"image_generation_call","id":"ig_1","status":"generating","result":null}]}"#,
        );
        assert_eq!((c.images, c.unvouched.len()), (0, 0));
        let c = responses(
            r#"{"model":"m","input":[{"type":"code_interpreter_call","id":"ci","code":"plot()","outputs":[{"type":"logs","logs":"ok"},{"type":"image","url":"https://x/p.png"}]}]}"#,
        );
        assert_eq!(c.images, 1);
        assert_eq!(c.unvouched, vec!["code_interpreter_call"]);
    }

    #[test]
    fn responses_tool_outputs_are_scanned_like_message_content() {
        let c = responses(
            r#"{"model":"m","input":[{"type":"function_call","call_id":"c1","name":"look","arguments":"{}"},{"type":"function_call_output","call_id":"c1","output":[{"type":"input_image","image_url":"https://x/cat.png"}]}]}"#,
        );
        assert_eq!(c.images, 1);
        assert!(c.unvouched.is_empty(), "{:?}", c.unvouched);
        let c = responses(
            r#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":[{"type":"input_file","file_id":"file-abc"}]}]}"#,
        );
        assert_eq!(c.unvouched, vec!["input_file"]);
        let c = responses(
            r#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":{"type":"input_file","file_id":"f"}}]}"#,
        );
        assert_eq!(c.unvouched, vec!["input_file"]);
        let c = responses(
            r#"{"model":"m","input":[{"type":"custom_tool_call_output","call_id":"c","output":[{"type":"input_text","text":"t"},{"type":"input_image","image_url":"u"}]}]}"#,
        );
        assert_eq!(c.images, 1);
        let c = responses(
            r#"{"model":"m","input":[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","image_url":"data:image/png;base64,AAAA"}}]}"#,
        );
        assert_eq!(c.images, 1);
        assert!(c.unvouched.is_empty(), "{:?}", c.unvouched);
        // A string output is text.
        let c = responses(
            r#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":"sunny"}]}"#,
        );
        assert_eq!((c.images, c.unvouched.len()), (0, 0));
        // The image bound is added for an image in a tool output.
        let body = r#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":[{"type":"input_image","image_url":"u"}]}]}"#;
        let c = responses(body);
        assert_eq!(
            input_token_bound(body.len(), &c, 8, 1000),
            body.len() as u64 + 8 + 1000 + 16
        );
    }

    #[test]
    fn background_responses_are_refused() {
        for body in [
            r#"{"model":"m","input":"hi","background":true}"#,
            r#"{"model":"m","input":"hi","background":"true"}"#,
        ] {
            let d = classify(Endpoint::Responses, body.as_bytes()).unwrap_err();
            assert_eq!(d.code, Code::InvalidRequest, "{body}");
        }
        let d = classify(
            Endpoint::Responses,
            br#"{"model":"m","input":"hi","background":true}"#,
        )
        .unwrap_err();
        assert!(d.message.contains("Background responses are not supported"));
        responses(r#"{"model":"m","input":"hi","background":false}"#);
        responses(r#"{"model":"m","input":"hi","background":null}"#);
    }

    #[test]
    fn built_in_tools_and_service_tiers_are_recorded() {
        let c = responses(
            r#"{"model":"m","input":"hi","tools":[{"type":"web_search_preview"},{"type":"function","name":"f"},{"type":"mcp","server_label":"s"},{"type":"custom","name":"g"}]}"#,
        );
        assert!(c.has_tools);
        assert_eq!(c.tool_names, vec!["f", "g"]);
        assert_eq!(c.builtin_tools, vec!["web_search_preview", "mcp"]);
        let c = chat(r#"{"model":"m","messages":[],"web_search_options":{}}"#).unwrap();
        assert!(c.has_tools);
        assert_eq!(c.builtin_tools, vec!["web_search_options"]);
        let c = chat(r#"{"model":"m","messages":[],"web_search_options":null}"#).unwrap();
        assert!(!c.has_tools);
        for (tier, want) in [
            (r#""priority""#, Some("priority")),
            (r#""flex""#, Some("flex")),
            (r#""auto""#, None),
            (r#""default""#, None),
            ("null", None),
        ] {
            let c = chat(&format!(
                r#"{{"model":"m","messages":[],"service_tier":{tier}}}"#
            ))
            .unwrap();
            assert_eq!(c.service_tier.as_deref(), want, "{tier}");
        }
        let c = responses(r#"{"model":"m","input":"x","service_tier":"priority"}"#);
        assert_eq!(c.service_tier.as_deref(), Some("priority"));
    }

    #[test]
    fn input_bound_covers_bytes_messages_and_images() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u"}}]}]}"#;
        let c = chat(body).unwrap();
        assert_eq!(
            input_token_bound(body.len(), &c, 8, 1000),
            body.len() as u64 + 8 + 1000 + 16
        );
    }
}
