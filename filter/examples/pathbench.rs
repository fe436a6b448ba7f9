//! Per-piece timing of the filter's request path, natively and (built for wasm32-wasip1, run
//! under Node's WASI) in V8, the engine Envoy runs the filter in.
use std::hint::black_box;
use std::time::Instant;

use aex_filter::classify::Endpoint;
use aex_filter::decide;
use aex_filter::headers::{RequestHeaders, ResponseHeaders};
use aex_filter::sse::SseMeter;
use aex_filter::state::{sha256_hex, Index};
use aex_filter::usage;
use aex_proto::v1 as pb;
use prost::Message;

fn map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn agent_worst(plan: &decide::Plan, agent: &aex_filter::state::AgentEntry) -> u64 {
    decide::lease_bound(plan, agent).unwrap_or(1)
}

fn time<R>(name: &str, n: u32, mut f: impl FnMut() -> R) {
    for _ in 0..n / 10 {
        black_box(f());
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    println!(
        "{name:12} {:8.3} us",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}

fn main() {
    let token = "aex_Q2hhbmdlIG1lIGFuZCBub3RoaW5nIGJ1dCBhIHRlc3QgdG9rZW4xMjM0NTY";
    let snapshot = pb::Snapshot {
        agents: vec![pb::AgentPolicy {
            agent_id: "ag_0123456789abcdef".into(),
            name: "bench".into(),
            token_sha256: sha256_hex(token),
            allow_streaming: true,
            allow_tools: true,
            lease_epoch: 1,
            ..Default::default()
        }],
        models: vec![pb::Model {
            name: "test-model".into(),
            provider: "mock".into(),
            upstream_model: "test-model".into(),
            max_output_tokens: 4096,
            priced: true,
            chat_cap_field: "max_tokens".into(),
            input_micros_per_1m: 1_000_000,
            output_micros_per_1m: 2_000_000,
            ..Default::default()
        }],
        providers: vec![pb::Provider {
            name: "mock".into(),
            cluster: "aex_provider_mock".into(),
            authority: "127.0.0.1:9".into(),
            base_path: "/v1".into(),
            api_key: "sk-provider".into(),
            ..Default::default()
        }],
        image_token_bound: 1000,
        message_token_overhead: 8,
        max_body_bytes: 8 << 20,
    };
    let index = Index::from_snapshot(1, snapshot);
    let body = format!(
        "{{\"model\":\"test-model\",\"messages\":[{{\"role\":\"system\",\"content\":\"You are a terse assistant.\"}},{{\"role\":\"user\",\"content\":\"Summarise: {}\"}}],\"max_tokens\":128,\"temperature\":0}}",
        "lorem ipsum ".repeat(70)
    );
    let auth = format!("Bearer {token}");
    let req_map = map(&[
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("user-agent", "aex-loadgen"),
        ("authorization", &auth),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("x-forwarded-proto", "http"),
    ]);
    let resp = br#"{"id":"chatcmpl-0123456789","object":"chat.completion","created":1764201600,"model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":231,"completion_tokens":16,"total_tokens":247,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_mock"}"#;
    let resp_map = map(&[
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "487"),
        ("date", "Fri, 27 Nov 2026 06:00:00 GMT"),
        ("x-request-id", "req_0123456789"),
    ]);

    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let now = 1_764_201_600;
    time("req headers", n, || {
        RequestHeaders::from_map(black_box(&req_map))
    });
    time("sha256", n, || sha256_hex(black_box(token)));
    time("authenticate", n, || {
        decide::authenticate(&index, Some(black_box(&auth)), now)
            .map(|(a, h)| (a.policy.lease_epoch, h))
    });
    let (agent, hash) =
        decide::authenticate(&index, Some(&auth), now).unwrap_or_else(|_| std::process::exit(2));
    time("classify", n, || {
        aex_filter::classify::classify(Endpoint::ChatCompletions, black_box(body.as_bytes()))
            .map(|c| c.model)
    });
    time("plan", n, || {
        decide::plan(
            &index,
            agent,
            &hash,
            Endpoint::ChatCompletions,
            black_box(body.as_bytes()),
            false,
        )
        .map(|p| p.input_bound)
    });
    let plan = decide::plan(
        &index,
        agent,
        &hash,
        Endpoint::ChatCompletions,
        body.as_bytes(),
        false,
    )
    .unwrap_or_else(|_| std::process::exit(2));
    let mut book = aex_filter::lease::Book::default();
    book.note_request(&plan.agent_id, 0);
    book.granted(
        &plan.agent_id,
        pb::Lease {
            lease_id: "lease_0123456789abcdef".into(),
            amount_micros: u64::MAX / 4,
            slots: u32::MAX,
            epoch: 1,
            max_age_ms: 0,
        },
        0,
    );
    let worst = agent_worst(&plan, agent);
    let mut now_ms = 1u64;
    time("lease", n, || {
        now_ms += 1;
        book.note_request(&plan.agent_id, now_ms);
        let want = book.want(&plan.agent_id, 1, worst, now_ms).is_some();
        let id = book.admit(&plan.agent_id, 1, worst, now_ms);
        book.settle(
            &plan.agent_id,
            id.as_deref().unwrap_or(""),
            worst,
            100,
            now_ms,
        );
        (want, id)
    });
    time("rewrite", n, || {
        decide::rewrite_body(&plan, black_box(body.as_bytes()), 0).map(|b| b.map(|b| b.len()))
    });
    time("up path", n, || {
        decide::upstream_path(&plan.provider, plan.endpoint, "/v1/chat/completions")
    });
    time("resp headers", n, || {
        ResponseHeaders::from_map(black_box(&resp_map)).status
    });
    time("usage", n, || usage::from_json_body(black_box(resp)));
    let outcome = decide::Outcome {
        upstream_status: Some(200),
        usage: usage::from_json_body(resp),
        response_bytes: resp.len() as u64,
        complete: true,
        usage_final: true,
        ..Default::default()
    };
    time("settle+enc", n, || {
        let s = decide::settlement(&plan, "rq_0123456789abcdef", 0, &outcome);
        pb::ReportRequest {
            settlements: vec![s],
            ..Default::default()
        }
        .encode_to_vec()
    });
    // A 64-event stream as the mock sends it, one event per chunk, the usage chunk the gateway
    // asked for removed: per stream.
    let events: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let finish = if i == 63 { "\"stop\"" } else { "null" };
            format!("data: {{\"id\":\"chatcmpl-0123456789\",\"object\":\"chat.completion.chunk\",\"created\":1764201600,\"model\":\"test-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"lorem \"}},\"finish_reason\":{finish}}}]}}\n\n").into_bytes()
        })
        .chain([
            br#"data: {"id":"chatcmpl-0123456789","object":"chat.completion.chunk","created":1764201600,"model":"test-model","choices":[],"usage":{"prompt_tokens":231,"completion_tokens":64,"total_tokens":295}}"#.to_vec(),
            b"\n\ndata: [DONE]\n\n".to_vec(),
        ])
        .collect();
    time("sse stream", n / 64, || {
        let mut m = SseMeter::new(true);
        let last = events.len() - 1;
        for (i, e) in events.iter().enumerate() {
            black_box(m.feed(black_box(e), i == last));
        }
        m.usage()
    });
}
