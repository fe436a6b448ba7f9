//! `/v1/completions`, `/v1/embeddings` and `/v1/responses` over real HTTP.

mod support;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{post, request_number, start};

#[tokio::test]
async fn legacy_completions_non_streaming() {
    let addr = start().await;
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 4});
    let r = post(addr, "/v1/completions", &[], &body).await;
    let n = request_number(&r);
    let v = r.json();
    assert_eq!(v["id"], format!("cmpl-mock-{n}"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "gpt-3.5-turbo-instruct");
    assert_eq!(
        v["choices"],
        json!([{"text": "word1 word2 word3 word4", "index": 0, "logprobs": null,
                "finish_reason": "length"}])
    );
    // "Once upon" = 9 bytes -> 3 tokens.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );

    let body = json!({"model": "m", "prompt": ["a", "b"], "n": 2});
    let v = post(
        addr,
        "/v1/completions",
        &[("x-mock-output-tokens", "2")],
        &body,
    )
    .await
    .json();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["choices"][3]["index"], 3);
    assert_eq!(v["choices"][3]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let body = json!({"model": "m", "prompt": [1, 2, 3]});
    let v = post(addr, "/v1/completions", &[], &body).await.json();
    assert_eq!(v["usage"]["prompt_tokens"], 3);

    let r = post(
        addr,
        "/v1/completions",
        &[],
        &json!({"model": "m", "prompt": {}}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "prompt");
}

#[tokio::test]
async fn legacy_completions_streaming() {
    let addr = start().await;
    let body = json!({"model": "m", "prompt": "hi", "stream": true});
    let r = post(
        addr,
        "/v1/completions",
        &[("x-mock-output-tokens", "2")],
        &body,
    )
    .await;
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete);
    assert_eq!(r.chunks.len(), 4);
    let chunks = r.data_json();
    let texts: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["word1", " word2", ""]);
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));

    let body = json!({"model": "m", "prompt": "hi", "stream": true,
        "stream_options": {"include_usage": true}});
    let r = post(
        addr,
        "/v1/completions",
        &[("x-mock-output-tokens", "2")],
        &body,
    )
    .await;
    let chunks = r.data_json();
    assert_eq!(chunks.len(), 4);
    assert!(chunks[..3]
        .iter()
        .all(|c| c.get("usage") == Some(&Value::Null)));
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(
        chunks[3]["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let addr = start().await;
    let body = json!({"model": "text-embedding-3-small", "input": ["hello world", "bye"]});
    let v = post(addr, "/v1/embeddings", &[], &body).await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i as u64);
        assert_eq!(d["embedding"].as_array().map(Vec::len), Some(8));
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    // ceil(11/4) + ceil(3/4)
    assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));

    let floats: Vec<f32> = data[0]["embedding"]
        .as_array()
        .expect("floats")
        .iter()
        .filter_map(Value::as_f64)
        .map(|f| f as f32)
        .collect();
    let body = json!({"model": "e", "input": "hello world", "encoding_format": "base64"});
    let v = post(addr, "/v1/embeddings", &[], &body).await.json();
    let b64 = v["data"][0]["embedding"].as_str().expect("base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, floats, "same input, same vector in both encodings");

    let body = json!({"model": "e", "input": "x", "dimensions": 16});
    let v = post(addr, "/v1/embeddings", &[], &body).await.json();
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(16));

    for bad in [
        json!({"model": "e"}),
        json!({"model": "e", "input": []}),
        json!({"model": "e", "input": "x", "encoding_format": "hex"}),
    ] {
        let r = post(addr, "/v1/embeddings", &[], &bad).await;
        assert_eq!(r.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn responses_non_streaming() {
    let addr = start().await;
    let body = json!({
        "model": "gpt-4.1-mini",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "hello"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "again"}]}
        ]
    });
    let r = post(
        addr,
        "/v1/responses",
        &[("x-mock-output-tokens", "3")],
        &body,
    )
    .await;
    let n = request_number(&r);
    let v = r.json();
    assert_eq!(v["id"], format!("resp_mock_{n}"));
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-4.1-mini");
    assert_eq!(v["instructions"], "Be brief.");
    let output = v["output"].as_array().expect("output");
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["status"], "completed");
    assert_eq!(output[0]["role"], "assistant");
    assert!(output[0]["id"].is_string());
    assert_eq!(
        output[0]["content"],
        json!([{"type": "output_text", "text": "word1 word2 word3", "annotations": []}])
    );
    // instructions 9 bytes -> 3+1, "hello" -> 2+1, "again" -> 2+1
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 13
        })
    );

    let body = json!({"model": "m", "input": "hi", "max_output_tokens": 5});
    let v = post(addr, "/v1/responses", &[], &body).await.json();
    assert_eq!(v["status"], "incomplete");
    assert_eq!(
        v["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(v["usage"]["output_tokens"], 5);

    let r = post(addr, "/v1/responses", &[], &json!({"model": "m"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "input");
}

#[tokio::test]
async fn responses_streaming_events() {
    let addr = start().await;
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let r = post(
        addr,
        "/v1/responses",
        &[("x-mock-output-tokens", "2")],
        &body,
    )
    .await;
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete);
    let events = r.named_events();
    assert_eq!(r.chunks.len(), events.len(), "one frame per event");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(&data["type"], name);
        assert_eq!(data["sequence_number"], i as u64);
    }
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[4].1["delta"], "word1");
    assert_eq!(events[5].1["delta"], " word2");
    assert_eq!(events[6].1["text"], "word1 word2");
    let done = &events[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "word1 word2");
    assert_eq!(done["usage"]["output_tokens"], 2);
    assert_eq!(done["usage"]["input_tokens"], 2);
    assert!(!r.text().contains("[DONE]"));

    let body = json!({"model": "m", "input": "hi", "stream": true, "max_output_tokens": 1});
    let events = post(addr, "/v1/responses", &[], &body).await.named_events();
    let (name, last) = events.last().expect("final event");
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["usage"]["output_tokens"], 1);
}

#[tokio::test]
async fn responses_function_call() {
    let addr = start().await;
    let tools = json!([{"type": "function", "name": "lookup",
        "parameters": {"type": "object", "properties": {}}}]);
    let body = json!({"model": "m", "input": "find it", "tools": tools});
    let r = post(addr, "/v1/responses", &[], &body).await;
    let n = request_number(&r);
    let v = r.json();
    assert_eq!(v["output"][0]["type"], "function_call");
    assert_eq!(v["output"][0]["name"], "lookup");
    assert_eq!(v["output"][0]["arguments"], "{}");
    assert_eq!(v["output"][0]["call_id"], format!("call_mock_{n}"));
    assert_eq!(v["usage"]["output_tokens"], 1);

    let body = json!({"model": "m", "input": "find it", "tools": tools, "stream": true});
    let events = post(addr, "/v1/responses", &[], &body).await.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"response.function_call_arguments.delta"));
    assert_eq!(names.last(), Some(&"response.completed"));
    let body = json!({"model": "m", "input": "x", "tools": tools, "tool_choice": "none"});
    let v = post(addr, "/v1/responses", &[], &body).await.json();
    assert_eq!(v["output"][0]["type"], "message");
}
