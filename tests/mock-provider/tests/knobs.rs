//! The `x-mock-*` control headers, request recording, nesting under a
//! prefix, and the `aex-mock` binary.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{get, post, request, start, start_router};

const CHAT: &str = "/v1/chat/completions";

fn chat(stream: bool) -> Value {
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

#[tokio::test]
async fn no_usage_knob_omits_usage_everywhere() {
    let addr = start().await;
    let h = [("x-mock-no-usage", "1")];
    let v = post(addr, CHAT, &h, &chat(false)).await.json();
    assert!(v.get("usage").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let r = post(addr, CHAT, &h, &chat(true)).await;
    assert!(r.complete);
    let chunks = r.data_json();
    assert_eq!(chunks.len(), 14, "role + 12 words + finish, no usage chunk");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));

    let body = json!({"model": "m", "input": "hi"});
    assert!(post(addr, "/v1/responses", &h, &body)
        .await
        .json()
        .get("usage")
        .is_none());
    let body = json!({"model": "e", "input": "hi"});
    assert!(post(addr, "/v1/embeddings", &h, &body)
        .await
        .json()
        .get("usage")
        .is_none());
}

#[tokio::test]
async fn error_knob_returns_openai_errors() {
    let addr = start().await;
    for (status, kind) in [
        ("429", "rate_limit_error"),
        ("400", "invalid_request_error"),
        ("500", "server_error"),
        ("503", "server_error"),
    ] {
        for path in [CHAT, "/v1/embeddings", "/v1/responses"] {
            let r = post(addr, path, &[("x-mock-error", status)], &chat(true)).await;
            assert_eq!(r.status.to_string(), status, "{path}");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(r.header("x-request-id").is_some());
            assert_eq!(
                r.json(),
                json!({"error": {"message": "mock error", "type": kind,
                                  "param": null, "code": "mock_error"}})
            );
            assert_eq!(
                r.header("retry-after"),
                if status == "429" { Some("1") } else { None }
            );
        }
    }
    let r = get(addr, "/_mock/requests").await;
    assert_eq!(
        r.json().as_array().map(Vec::len),
        Some(12),
        "errors are recorded too"
    );
}

#[tokio::test]
async fn invalid_knob_values_are_rejected() {
    let addr = start().await;
    for (name, value) in [
        ("x-mock-error", "oops"),
        ("x-mock-error", "200"),
        ("x-mock-output-tokens", "-3"),
        ("x-mock-latency-ms", "1.5"),
        ("x-mock-no-usage", "perhaps"),
    ] {
        let r = post(addr, CHAT, &[(name, value)], &chat(false)).await;
        assert_eq!(r.status, 400, "{name}: {value}");
        assert_eq!(r.json()["error"]["param"], name);
    }
}

#[tokio::test]
async fn usage_completion_tokens_override() {
    let addr = start().await;
    let h = [
        ("x-mock-usage-completion-tokens", "500"),
        ("x-mock-output-tokens", "2"),
    ];
    let v = post(addr, CHAT, &h, &chat(false)).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "word1 word2");
    assert_eq!(v["usage"]["completion_tokens"], 500);
    assert_eq!(v["usage"]["total_tokens"], 502);

    let chunks = post(addr, CHAT, &h, &chat(true)).await.data_json();
    assert_eq!(
        chunks.last().expect("usage chunk")["usage"]["completion_tokens"],
        500
    );

    let v = post(
        addr,
        "/v1/responses",
        &h,
        &json!({"model": "m", "input": "hi"}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["output_tokens"], 500);
}

#[tokio::test]
async fn cut_after_drops_the_connection_mid_stream() {
    let addr = start().await;
    let r = post(addr, CHAT, &[("x-mock-cut-after", "3")], &chat(true)).await;
    assert_eq!(r.status, 200);
    assert!(!r.complete, "the body must not end with a terminal chunk");
    assert_eq!(r.chunks.len(), 3);
    assert!(!r.text().contains("[DONE]"));
    let chunks = r.data_json();
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], " word2");

    // Larger than the stream: still cut before the final event.
    let r = post(addr, CHAT, &[("x-mock-cut-after", "1000")], &chat(true)).await;
    assert!(!r.complete);
    assert!(!r.text().contains("[DONE]"));
    assert_eq!(r.data_json().len(), 15, "everything up to the usage chunk");

    let r = post(
        addr,
        "/v1/responses",
        &[("x-mock-cut-after", "0")],
        &json!({"model": "m", "input": "x", "stream": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.complete);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn groq_mode_puts_usage_in_x_groq() {
    let addr = start().await;
    let h = [("x-mock-groq", "1"), ("x-mock-output-tokens", "2")];
    let r = post(addr, CHAT, &h, &chat(true)).await;
    let chunks = r.data_json();
    assert_eq!(chunks.len(), 4, "role, 2 words, finish; no usage chunk");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let last = &chunks[3];
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        last["x_groq"]["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})
    );
    assert!(last["x_groq"]["id"].is_string());
    assert!(chunks[..3].iter().all(|c| c.get("x_groq").is_none()));
    assert_eq!(r.data_lines().last().map(String::as_str), Some("[DONE]"));

    let body = json!({"model": "m", "prompt": "hi", "stream": true});
    let chunks = post(addr, "/v1/completions", &h, &body).await.data_json();
    assert_eq!(
        chunks.last().expect("final")["x_groq"]["usage"]["completion_tokens"],
        2
    );
}

#[tokio::test]
async fn latency_and_chunk_delay() {
    let addr = start().await;
    let started = Instant::now();
    let r = post(addr, CHAT, &[("x-mock-latency-ms", "150")], &chat(false)).await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let ms: u64 = r
        .header("openai-processing-ms")
        .and_then(|v| v.parse().ok())
        .expect("processing ms");
    assert!(ms >= 150, "{ms}");

    let started = Instant::now();
    let h = [
        ("x-mock-chunk-delay-ms", "30"),
        ("x-mock-output-tokens", "3"),
    ];
    let r = post(addr, CHAT, &h, &chat(true)).await;
    // role, 3 words, finish, usage, [DONE] = 7 events, 6 gaps.
    assert_eq!(r.chunks.len(), 7);
    assert!(started.elapsed() >= Duration::from_millis(180));
}

#[tokio::test]
async fn requests_are_recorded_and_cleared() {
    let addr = start().await;
    let bytes = br#"{"model":"rec","messages":[{"role":"user","content":"caf\u00e9"}]}"#;
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions?api-version=2024&x=1",
        &[("Authorization", "Bearer sk-test"), ("X-Custom", "Yes")],
        Some(bytes),
    )
    .await;
    assert_eq!(r.status, 200);
    get(addr, "/v1/models").await;
    get(addr, "/_mock/health").await;

    let recorded = get(addr, "/_mock/requests").await.json();
    let list = recorded.as_array().expect("array");
    assert_eq!(list.len(), 2, "only /v1 requests are recorded: {recorded}");
    let first = &list[0];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v1/chat/completions");
    assert_eq!(first["query"], "api-version=2024&x=1");
    assert_eq!(first["headers"]["authorization"], "Bearer sk-test");
    assert_eq!(first["headers"]["x-custom"], "Yes");
    assert_eq!(first["headers"]["content-type"], "application/json");
    assert_eq!(first["body"], String::from_utf8_lossy(bytes).as_ref());
    assert_eq!(list[1]["method"], "GET");
    assert_eq!(list[1]["path"], "/v1/models");
    assert_eq!(list[1]["query"], Value::Null);
    assert_eq!(list[1]["body"], "");

    let r = request(addr, "DELETE", "/_mock/requests", &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(get(addr, "/_mock/requests").await.json(), json!([]));
}

#[tokio::test]
async fn health_and_models() {
    let addr = start().await;
    let r = get(addr, "/_mock/health").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let v = get(addr, "/v1/models").await.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    assert!(data.len() >= 3);
    for m in data {
        assert!(m["id"].is_string());
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64());
        assert_eq!(m["owned_by"], "mock");
    }
    let v = get(addr, "/v1/models/ft:custom-1").await.json();
    assert_eq!(v["id"], "ft:custom-1");
}

#[tokio::test]
async fn nests_under_a_prefix() {
    let addr = start_router(axum::Router::new().nest("/mock", aex_mock::router())).await;
    let r = post(addr, "/mock/v1/chat/completions", &[], &chat(false)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "chat.completion");
    assert!(r.header("x-request-id").is_some());
    let recorded = get(addr, "/mock/_mock/requests").await.json();
    assert_eq!(recorded[0]["path"], "/v1/chat/completions");
    let r = get(addr, "/mock/v1/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

/// Kills the child process when dropped, even if an assertion fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_aex-mock"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn aex-mock"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read line");
    let addr = line
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .expect("address line");
    let port: u16 = addr.parse().expect("port");
    assert_ne!(port, 0);
    let addr = ([127, 0, 0, 1], port).into();
    let r = get(addr, "/_mock/health").await;
    assert_eq!(r.text(), "ok");
    let r = post(addr, CHAT, &[], &chat(false)).await;
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn latin1_header_knob_sends_a_header_value_that_is_not_utf8() {
    let addr = start().await;
    let r = post(addr, CHAT, &[("x-mock-latin1-header", "1")], &chat(false)).await;
    assert_eq!(r.status, 200);
    // The reply head is decoded lossily: the Latin-1 é (0xE9) is not UTF-8.
    assert_eq!(r.header("x-provider-note"), Some("caf\u{fffd}"));
    let r = post(addr, CHAT, &[], &chat(false)).await;
    assert_eq!(r.header("x-provider-note"), None);
}
