//! `POST /v1/completions` (legacy text completions) and `POST /v1/embeddings`.
//!
//! Completions accept `prompt` as a string, an array of strings, a token
//! array or an array of token arrays; each prompt yields `n` choices of
//! `word1 .. wordN`, capped by `max_tokens`. Embeddings return deterministic
//! unit vectors (8 dimensions unless `dimensions` says otherwise) derived
//! from a hash of each input, as floats or, with `encoding_format: "base64"`,
//! as little-endian `f32` bytes in base64 (what the `openai` SDK asks for).

use axum::extract::Extension;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::content::{capped, text_tokens, words, Usage};
use crate::error::ApiError;
use crate::params::{self, Params};
use crate::{sse, Ctx, SYSTEM_FINGERPRINT};

/// Default embedding width.
const DEFAULT_DIMENSIONS: u64 = 8;
/// Largest accepted `dimensions`.
const MAX_DIMENSIONS: u64 = 3072;

/// One prompt / embedding input: its hashable bytes and its token estimate.
struct Input {
    bytes: Vec<u8>,
    tokens: u64,
}

/// Parses a `prompt` / `input` value: a string, an array of strings, a token
/// array, or an array of token arrays.
fn inputs(p: &Params, key: &str) -> Result<Vec<Input>, ApiError> {
    let text = |s: &str| Input {
        bytes: s.as_bytes().to_vec(),
        tokens: text_tokens(s.len()),
    };
    let token_array = |a: &[Value]| -> Option<Input> {
        let mut bytes = Vec::with_capacity(a.len() * 8);
        for t in a {
            bytes.extend_from_slice(&t.as_u64()?.to_le_bytes());
        }
        Some(Input {
            bytes,
            tokens: a.len() as u64,
        })
    };
    let expected = "a string, an array of strings, or an array of token arrays";
    match params::get(p, key) {
        None => Err(ApiError::missing(key)),
        Some(Value::String(s)) => Ok(vec![text(s)]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid(
            format!("Invalid '{key}': empty array. Expected an array with minimum length 1."),
            Some(key),
        )),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_number) {
                return token_array(items)
                    .map(|i| vec![i])
                    .ok_or_else(|| ApiError::bad_type(key, expected));
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Some(text(s)),
                    Value::Array(a) => token_array(a),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::bad_type(key, expected))
        }
        Some(_) => Err(ApiError::bad_type(key, expected)),
    }
}

pub(crate) async fn completions(Extension(ctx): Extension<Ctx>) -> Result<Response, ApiError> {
    let p = ctx.params()?;
    let model = params::model(&p)?;
    let prompts = inputs(&p, "prompt")?;
    let prompt = ctx.prompt_tokens(prompts.iter().map(|i| i.tokens).sum());
    let stream = params::flag(&p, "stream")?;
    let include_usage = params::include_usage(&p)?;
    let n = params::choice_count(&p)?;
    let (count, truncated) = capped(
        ctx.controls.output_tokens,
        params::token_cap(&p, "max_tokens")?,
    );
    let words = words(count);
    let finish = if truncated { "length" } else { "stop" };
    let choices = (prompts.len() as u64).saturating_mul(n);
    let usage = Usage::report(prompt, count.saturating_mul(choices), &ctx.controls);
    let id = format!("cmpl-mock-{}", ctx.n);

    let chunk = |choices: Vec<Value>, usage_field: Option<Option<Value>>| {
        let mut map = Map::new();
        map.insert("id".into(), json!(id));
        map.insert("object".into(), json!("text_completion"));
        map.insert("created".into(), json!(ctx.created));
        map.insert("model".into(), json!(model));
        map.insert("system_fingerprint".into(), json!(SYSTEM_FINGERPRINT));
        map.insert("choices".into(), Value::Array(choices));
        if let Some(u) = usage_field {
            map.insert("usage".into(), u.unwrap_or(Value::Null));
        }
        Value::Object(map)
    };
    let choice = |index: u64, text: &str, finish: Option<&str>| json!({"text": text, "index": index, "logprobs": null, "finish_reason": finish});

    if !stream {
        let text = words.join(" ");
        let all = (0..choices)
            .map(|i| choice(i, &text, Some(finish)))
            .collect();
        return Ok(Json(chunk(all, usage.map(|u| Some(u.plain())))).into_response());
    }

    let groq = ctx.controls.groq;
    let usage_chunk = if include_usage && !groq { usage } else { None };
    // Earlier chunks carry `"usage": null` only when a usage chunk follows.
    let null_usage = usage_chunk.map(|_| None);
    let mut events: Vec<Bytes> = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let text = if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        };
        for index in 0..choices {
            events.push(sse::data(&chunk(
                vec![choice(index, &text, None)],
                null_usage.clone(),
            )));
        }
    }
    for index in 0..choices {
        let mut value = chunk(vec![choice(index, "", Some(finish))], null_usage.clone());
        if groq && index + 1 == choices {
            if let (Some(u), Value::Object(map)) = (usage, &mut value) {
                map.insert(
                    "x_groq".into(),
                    json!({"id": format!("req_mock_{}", ctx.n), "usage": u.plain()}),
                );
            }
        }
        events.push(sse::data(&value));
    }
    if let Some(u) = usage_chunk {
        events.push(sse::data(&chunk(Vec::new(), Some(Some(u.plain())))));
    }
    events.push(sse::done());
    Ok(sse::response(events, &ctx.controls))
}

pub(crate) async fn embeddings(Extension(ctx): Extension<Ctx>) -> Result<Response, ApiError> {
    let p = ctx.params()?;
    let model = params::model(&p)?;
    let inputs = inputs(&p, "input")?;
    let dimensions = match params::uint(&p, "dimensions")? {
        None => DEFAULT_DIMENSIONS,
        Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => d,
        Some(d) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid 'dimensions': {d}. Expected a value between 1 and {MAX_DIMENSIONS}."
                ),
                Some("dimensions"),
            ))
        }
    };
    let base64 = match params::string(&p, "encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("Invalid 'encoding_format': '{other}'. Expected 'float' or 'base64'."),
                Some("encoding_format"),
            ))
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding(&input.bytes, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": model});
    if !ctx.controls.no_usage {
        let prompt = ctx.prompt_tokens(inputs.iter().map(|i| i.tokens).sum());
        if let Value::Object(map) = &mut body {
            map.insert(
                "usage".into(),
                json!({"prompt_tokens": prompt, "total_tokens": prompt}),
            );
        }
    }
    Ok(Json(body).into_response())
}

/// A deterministic unit vector for `bytes`: FNV-1a seeds a splitmix64 stream.
fn embedding(bytes: &[u8], dimensions: u64) -> Vec<f32> {
    let mut state = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter()
        .map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding(b"hello", 8);
        assert_eq!(a.len(), 8);
        assert_eq!(a, embedding(b"hello", 8));
        assert_ne!(a, embedding(b"world", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }

    #[test]
    fn input_shapes() {
        let p = |v: Value| match json!({ "input": v }) {
            Value::Object(m) => m,
            _ => Params::new(),
        };
        let count = |v: Value| inputs(&p(v), "input").map(|i| i.len()).ok();
        assert_eq!(count(json!("abc")), Some(1));
        assert_eq!(count(json!(["a", "b"])), Some(2));
        assert_eq!(count(json!([1, 2, 3])), Some(1));
        assert_eq!(count(json!([[1, 2], [3]])), Some(2));
        assert_eq!(count(json!([])), None);
        assert_eq!(count(json!([{"x": 1}])), None);
        assert_eq!(count(json!([1.5])), None);
        assert_eq!(count(json!(5)), None);
        let tokens = inputs(&p(json!(["abcde", [7, 8, 9]])), "input")
            .map(|i| i.iter().map(|x| x.tokens).collect::<Vec<_>>())
            .ok();
        assert_eq!(tokens, Some(vec![2, 3]));
    }
}
