//! `/v1/chat/completions` over real HTTP: bodies, usage, truncation,
//! streaming framing and tool calls.

mod support;

use serde_json::{json, Value};
use support::{post, request, request_number, start};

const CHAT: &str = "/v1/chat/completions";

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn words(n: usize) -> String {
    (1..=n)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn non_streaming_chat_reports_deterministic_usage() {
    let addr = start().await;
    let body = json!({
        "model": "My-Model_v1:ft",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the mock provider"}
        ]
    });
    let r = post(addr, CHAT, &[], &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("10000"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9999"));
    let ms = r.header("openai-processing-ms").expect("processing ms");
    assert!(ms.parse::<u64>().is_ok(), "{ms}");
    let n = request_number(&r);
    let v = r.json();
    assert_eq!(v["id"], format!("chatcmpl-mock-{n}"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().is_some_and(|c| c > 1_600_000_000));
    assert_eq!(v["model"], "My-Model_v1:ft");
    assert!(v["system_fingerprint"].is_string());
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(
        choices[0]["message"],
        json!({"role": "assistant", "content": words(12), "refusal": null})
    );
    assert_eq!(choices[0]["finish_reason"], "stop");
    // "You are terse." = 14 bytes -> 4 + 1; the user text = 30 bytes -> 8 + 1.
    assert_eq!(
        v["usage"],
        json!({
            "prompt_tokens": 14,
            "completion_tokens": 12,
            "total_tokens": 26,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}
        })
    );
}

#[tokio::test]
async fn prompt_tokens_never_exceed_half_the_body() {
    let addr = start().await;
    let bodies = [
        json!({"model": "", "messages": [{"role": ""}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": ""}]}),
        json!({"model": "m", "messages": [
            {"role": "user", "content": "x"}, {"role": "user", "content": "y"},
            {"role": "user", "content": []}, {"role": "user", "content": null}
        ]}),
        json!({"model": "m", "messages": user(&"long text ".repeat(500))}),
    ];
    for body in bodies {
        let bytes = serde_json::to_vec(&body).expect("serialize");
        let r = request(addr, "POST", CHAT, &[], Some(&bytes)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let prompt = r.json()["usage"]["prompt_tokens"].as_u64().expect("prompt");
        assert!(prompt >= 1);
        assert!(
            prompt <= bytes.len() as u64 / 2,
            "{prompt} > {}/2",
            bytes.len()
        );
    }
}

#[tokio::test]
async fn max_tokens_truncates_and_sets_length() {
    let addr = start().await;
    let cases = [
        (json!({"max_tokens": 5}), 5, "length"),
        (
            json!({"max_completion_tokens": 3, "max_tokens": 10}),
            3,
            "length",
        ),
        (json!({"max_tokens": 12}), 12, "stop"),
        (json!({"max_tokens": 50}), 12, "stop"),
        (json!({"max_tokens": null}), 12, "stop"),
    ];
    for (extra, count, finish) in cases {
        let mut body = json!({"model": "m", "messages": user("hi")});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let v = post(addr, CHAT, &[], &body).await.json();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            words(count),
            "{extra}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{extra}");
        assert_eq!(v["usage"]["completion_tokens"], count as u64, "{extra}");
    }
    let body = json!({"model": "m", "messages": user("hi"), "max_tokens": 2});
    let v = post(addr, CHAT, &[("x-mock-output-tokens", "1")], &body)
        .await
        .json();
    assert_eq!(v["choices"][0]["message"]["content"], "word1");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn output_tokens_header_and_n_choices() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": user("hi"), "n": 3});
    let v = post(addr, CHAT, &[("x-mock-output-tokens", "4")], &body)
        .await
        .json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        assert_eq!(c["message"]["content"], "word1 word2 word3 word4");
    }
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().expect("prompt") + 12
    );
}

#[tokio::test]
async fn content_parts_are_accepted() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe this image please"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ]}]});
    let r = post(addr, CHAT, &[], &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 26 bytes of text -> 7, plus 1 for the message.
    assert_eq!(r.json()["usage"]["prompt_tokens"], 8);
}

#[tokio::test]
async fn streaming_framing_without_include_usage() {
    let addr = start().await;
    let body = json!({"model": "gpt-4o-mini", "messages": user("hi"), "stream": true});
    let r = post(addr, CHAT, &[("x-mock-output-tokens", "3")], &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.header("x-request-id").is_some());
    assert!(r.complete, "stream must end cleanly");
    // Each SSE event is its own body frame.
    assert_eq!(r.chunks.len(), 6);
    for chunk in &r.chunks {
        let s = String::from_utf8_lossy(chunk);
        assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s:?}");
        assert_eq!(s.matches("\n\n").count(), 1, "{s:?}");
    }
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));
    let chunks = r.data_json();
    assert_eq!(chunks.len(), 5);
    let n = request_number(&r);
    for c in &chunks {
        assert_eq!(c["id"], format!("chatcmpl-mock-{n}"));
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-4o-mini");
        assert_eq!(c["created"], chunks[0]["created"]);
        assert!(
            c.get("usage").is_none(),
            "no usage key without include_usage"
        );
    }
    let delta = |i: usize| chunks[i]["choices"][0]["delta"].clone();
    let finish = |i: usize| chunks[i]["choices"][0]["finish_reason"].clone();
    assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
    assert_eq!(delta(1), json!({"content": "word1"}));
    assert_eq!(delta(2), json!({"content": " word2"}));
    assert_eq!(delta(3), json!({"content": " word3"}));
    assert_eq!(delta(4), json!({}));
    for i in 0..4 {
        assert_eq!(finish(i), Value::Null);
    }
    assert_eq!(finish(4), "stop");
}

#[tokio::test]
async fn streaming_with_include_usage() {
    let addr = start().await;
    let body = json!({
        "model": "m", "messages": user("hello"), "stream": true,
        "stream_options": {"include_usage": true}, "max_tokens": 2
    });
    let r = post(addr, CHAT, &[], &body).await;
    assert!(r.complete);
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));
    let chunks = r.data_json();
    // role, word1, word2, finish, usage
    assert_eq!(chunks.len(), 5);
    for c in &chunks[..4] {
        assert_eq!(c.get("usage"), Some(&Value::Null), "{c}");
        assert_eq!(c["choices"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    let last = &chunks[4];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(
        last["usage"],
        json!({
            "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}
        })
    );
}

#[tokio::test]
async fn streaming_n_choices_interleaves_indexes() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": user("hi"), "stream": true, "n": 2,
        "stream_options": {"include_usage": true}});
    let r = post(addr, CHAT, &[("x-mock-output-tokens", "2")], &body).await;
    let chunks = r.data_json();
    let indexes: Vec<u64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["index"].as_u64())
        .collect();
    assert_eq!(indexes, vec![0, 1, 0, 1, 0, 1, 0, 1]);
    assert_eq!(
        chunks.last().expect("usage")["usage"]["completion_tokens"],
        4
    );
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "other"}}
    ])
}

#[tokio::test]
async fn tool_call_non_streaming() {
    let addr = start().await;
    let body = json!({"model": "m", "messages": user("weather?"), "tools": tools()});
    let r = post(addr, CHAT, &[], &body).await;
    let n = request_number(&r);
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"}}])
    );
    assert_eq!(v["usage"]["completion_tokens"], 1);

    let named = json!({"model": "m", "messages": user("x"), "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "other"}}});
    let v = post(addr, CHAT, &[], &named).await.json();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "other"
    );

    let none =
        json!({"model": "m", "messages": user("x"), "tools": tools(), "tool_choice": "none"});
    let v = post(addr, CHAT, &[], &none).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], words(12));
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let empty = json!({"model": "m", "messages": user("x"), "tools": []});
    let v = post(addr, CHAT, &[], &empty).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn tool_call_streaming() {
    let addr = start().await;
    let body =
        json!({"model": "m", "messages": user("weather?"), "tools": tools(), "stream": true});
    let r = post(addr, CHAT, &[], &body).await;
    assert!(r.complete);
    let n = request_number(&r);
    let chunks = r.data_json();
    assert_eq!(chunks.len(), 3);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "index": 0, "id": format!("call_mock_{n}"), "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        chunks[1]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    );
    assert_eq!(chunks[2]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_400s() {
    let addr = start().await;
    let check = |r: support::Reply, param: Value| {
        assert_eq!(r.status, 400, "{}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_eq!(v["error"]["param"], param);
        assert!(v["error"].get("code").is_some());
    };
    check(
        request(addr, "POST", CHAT, &[], Some(b"{\"model\": ")).await,
        Value::Null,
    );
    check(
        request(addr, "POST", CHAT, &[], Some(b"")).await,
        Value::Null,
    );
    check(post(addr, CHAT, &[], &json!([1])).await, Value::Null);
    check(
        post(addr, CHAT, &[], &json!({"messages": user("x")})).await,
        json!("model"),
    );
    check(
        post(addr, CHAT, &[], &json!({"model": "m"})).await,
        json!("messages"),
    );
    check(
        post(addr, CHAT, &[], &json!({"model": "m", "messages": "hi"})).await,
        json!("messages"),
    );
    check(
        post(
            addr,
            CHAT,
            &[],
            &json!({"model": "m", "messages": user("x"), "max_tokens": "5"}),
        )
        .await,
        json!("max_tokens"),
    );
    check(
        post(
            addr,
            CHAT,
            &[],
            &json!({"model": "m", "messages": user("x"), "n": 0}),
        )
        .await,
        json!("n"),
    );
    check(
        post(
            addr,
            CHAT,
            &[],
            &json!({"model": "m", "messages": [{"role": "user", "content": 7}]}),
        )
        .await,
        json!("messages[0].content"),
    );
    check(
        post(
            addr,
            CHAT,
            &[],
            &json!({"model": "m", "messages": user("x"), "stream": "yes"}),
        )
        .await,
        json!("stream"),
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_get_openai_shaped_404s() {
    let addr = start().await;
    for (method, path) in [
        ("POST", "/v1/chat/complete"),
        ("GET", "/nothing"),
        ("GET", CHAT),
        ("DELETE", "/v1/models"),
    ] {
        let r = request(addr, method, path, &[], None).await;
        assert_eq!(r.status, 404, "{method} {path}");
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            v["error"]["message"],
            format!("Invalid URL ({method} {path})")
        );
    }
}
