//! `aex-mock`: a mock OpenAI-compatible provider for end-to-end tests and the
//! offline quick start.
//!
//! [`router`] serves the OpenAI wire format under `/v1/...` (chat
//! completions, legacy completions, embeddings, responses, models) and test
//! inspection endpoints under `/_mock/...`. Behaviour is deterministic and
//! steered per request by `x-mock-*` headers (latency, output length, errors,
//! usage quirks, cut streams); see the `control` module for the list.
//!
//! Generated text is `word1 word2 ... wordN` with one word per completion
//! token (N defaults to 12). Every `/v1/*` request is recorded and can be
//! read back with `GET /_mock/requests` (oldest first, last 2000 kept) and
//! cleared with `DELETE /_mock/requests`. Recorded paths are as seen by this
//! router, i.e. without any prefix it is nested under.

mod chat;
mod content;
mod control;
mod error;
mod gzip;
mod legacy;
mod params;
mod responses;
mod sse;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::content::clamp_prompt;
use crate::control::Controls;
use crate::error::ApiError;
use crate::params::Params;

/// How many recorded requests are kept.
const MAX_RECORDED: usize = 2000;
/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Models listed by `GET /v1/models`.
const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "o4-mini",
    "text-embedding-3-small",
    "mock-model",
];
/// Reported `system_fingerprint`.
pub(crate) const SYSTEM_FINGERPRINT: &str = "fp_mock";

/// Router serving the mock API at `/v1/...` plus the test inspection endpoints at `/_mock/...`.
/// Self-contained state (Router<()>), so it can be nested under a prefix: `Router::new().nest("/mock", aex_mock::router())`.
pub fn router() -> Router {
    mock_router(true)
}

/// The mock API alone, recording nothing: what a deployment serves as a provider without a key
/// (a recorder would keep every agent's prompts and headers for anyone to read).
pub fn provider_router() -> Router {
    mock_router(false)
}

fn mock_router(record: bool) -> Router {
    let shared = Arc::new(Shared {
        record,
        ..Shared::default()
    });
    let api = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat::handle).fallback(not_found),
        )
        .route(
            "/v1/completions",
            post(legacy::completions).fallback(not_found),
        )
        .route(
            "/v1/embeddings",
            post(legacy::embeddings).fallback(not_found),
        )
        .route("/v1/responses", post(responses::handle).fallback(not_found))
        .route("/v1/models", get(list_models).fallback(not_found))
        .route("/v1/models/:id", get(get_model).fallback(not_found))
        .route("/_mock/health", get(|| async { "ok" }));
    let api = if record {
        api.route(
            "/_mock/requests",
            get(recorded_requests).delete(clear_requests),
        )
    } else {
        api
    };
    api.fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// Serve `router()` on the listener until the future is dropped / process exits.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    // Stream events go out one by one: without TCP_NODELAY each waits on a delayed ACK.
    axum::serve(listener, router()).tcp_nodelay(true).await
}

/// State shared by all requests of one [`router`].
#[derive(Default)]
struct Shared {
    counter: AtomicU64,
    /// Whether requests are kept for `/_mock/requests`.
    record: bool,
    recorded: Mutex<VecDeque<Value>>,
}

impl Shared {
    fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn recorded(&self) -> MutexGuard<'_, VecDeque<Value>> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.recorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, parts: &Parts, body: &[u8]) {
        if !self.record {
            return;
        }
        let entry = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers_json(&parts.headers),
            "body": String::from_utf8_lossy(body),
        });
        let mut recorded = self.recorded();
        while recorded.len() >= MAX_RECORDED {
            recorded.pop_front();
        }
        recorded.push_back(entry);
    }
}

/// Headers as `{lower-case name: value}`; repeated headers are joined by ", ".
fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                out.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    Value::Object(out)
}

/// Per-request context handed from [`gate`] to the `/v1` handlers.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// Request number: used in `req_mock_<n>`, `chatcmpl-mock-<n>`, ...
    pub n: u64,
    /// The raw request body.
    pub body: Bytes,
    pub controls: Controls,
    /// Unix seconds, for `created` fields.
    pub created: u64,
}

impl Ctx {
    /// The body as a JSON object.
    pub fn params(&self) -> Result<Params, ApiError> {
        params::parse_body(&self.body)
    }

    /// Clamps a prompt-token estimate to at most half the body length.
    pub fn prompt_tokens(&self, estimate: u64) -> u64 {
        clamp_prompt(estimate, self.body.len())
    }
}

/// The whole body gzip-encoded, whatever the request's `accept-encoding` said.
async fn compress(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    parts
        .headers
        .insert("content-encoding", HeaderValue::from_static("gzip"));
    parts.headers.remove("content-length");
    Response::from_parts(parts, Body::from(gzip::gzip_stored(&bytes)))
}

fn is_api_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// Middleware: records `/v1` requests, applies the latency and error knobs,
/// and stamps the OpenAI-like response headers on every response.
async fn gate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let n = shared.next_id();
    tracing::debug!(n, method = %req.method(), uri = %req.uri(), "aex-mock request");
    let latin1 = req
        .headers()
        .get(control::LATIN1_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    let gzip = req
        .headers()
        .get(control::GZIP)
        .is_some_and(|v| v.as_bytes() == b"1");
    let content_type = req.headers().get(control::CONTENT_TYPE).cloned();
    let mut resp = if is_api_path(req.uri().path()) {
        match api_gate(&shared, n, req, next).await {
            Ok(resp) => resp,
            Err(err) => err.into_response(),
        }
    } else {
        next.run(req).await
    };
    let elapsed = started.elapsed().as_millis().to_string();
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("req_mock_{n}")) {
        headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&elapsed) {
        headers.insert("openai-processing-ms", v);
    }
    headers.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from_static("10000"),
    );
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("9999"),
    );
    if latin1 {
        if let Ok(v) = HeaderValue::from_bytes(b"caf\xe9") {
            headers.insert("x-provider-note", v);
        }
    }
    if let Some(v) = content_type {
        headers.insert("content-type", v);
    }
    if gzip {
        return compress(resp).await;
    }
    resp
}

async fn api_gate(shared: &Shared, n: u64, req: Request, next: Next) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            shared.record(&parts, b"");
            return Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..ApiError::invalid(
                    format!(
                        "The request body could not be read or exceeds {MAX_BODY_BYTES} bytes."
                    ),
                    None,
                )
            });
        }
    };
    shared.record(&parts, &body);
    let controls = Controls::from_headers(&parts.headers)?;
    if controls.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(controls.latency_ms)).await;
    }
    if let Some(status) = controls.error_status {
        return Err(ApiError::mock(status));
    }
    parts.extensions.insert(Ctx {
        n,
        body,
        controls,
        created: now_secs(),
    });
    Ok(next.run(Request::from_parts(parts, Body::empty())).await)
}

/// Current Unix time in seconds (0 if the clock is before 1970).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(method.as_str(), uri.path())
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "mock"})
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> = MODELS.iter().map(|m| model_json(m)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(Path(id): Path<String>) -> Json<Value> {
    Json(model_json(&id))
}

async fn recorded_requests(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(Value::Array(shared.recorded().iter().cloned().collect()))
}

async fn clear_requests(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut recorded = shared.recorded();
    let cleared = recorded.len();
    recorded.clear();
    Json(json!({"cleared": cleared}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(path: &str) -> Parts {
        let (parts, _) = axum::http::Request::builder()
            .method("POST")
            .uri(path)
            .header("x-dup", "a")
            .header("x-dup", "b")
            .body(())
            .map(|r| r.into_parts())
            .unwrap_or_else(|e| panic!("request: {e}"));
        parts
    }

    #[test]
    fn recording_keeps_the_last_2000_oldest_first() {
        let shared = Shared {
            record: true,
            ..Shared::default()
        };
        for i in 0..MAX_RECORDED + 5 {
            shared.record(&parts(&format!("/v1/x?i={i}")), b"{}");
        }
        let recorded = shared.recorded();
        assert_eq!(recorded.len(), MAX_RECORDED);
        assert_eq!(recorded[0]["query"], "i=5");
        assert_eq!(
            recorded[MAX_RECORDED - 1]["query"],
            format!("i={}", MAX_RECORDED + 4)
        );
    }

    #[test]
    fn repeated_headers_are_joined_and_bodies_lossy() {
        let shared = Shared {
            record: true,
            ..Shared::default()
        };
        shared.record(&parts("/v1/y"), b"ok \xff");
        let recorded = shared.recorded();
        assert_eq!(recorded[0]["headers"]["x-dup"], "a, b");
        assert_eq!(recorded[0]["body"], "ok \u{fffd}");
        assert_eq!(recorded[0]["path"], "/v1/y");
        assert_eq!(recorded[0]["query"], Value::Null);
    }

    #[test]
    fn api_paths() {
        assert!(is_api_path("/v1/chat/completions"));
        assert!(is_api_path("/v1"));
        assert!(!is_api_path("/v10/x"));
        assert!(!is_api_path("/_mock/requests"));
    }
}
