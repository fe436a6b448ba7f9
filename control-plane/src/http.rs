//! The control plane's HTTP server: health, Prometheus `/metrics`, the admin dashboard (also
//! reachable through Envoy at `/dashboard`), and the built-in mock provider at `/mock/v1`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::core::{now_ms, Core};
use crate::providers::MOCK_PREFIX;
use crate::{stats, tokens};

const SESSION_COOKIE: &str = "aex_session";
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

const INDEX_HTML: &str = include_str!("../assets/dashboard/index.html");
const LOGIN_HTML: &str = include_str!("../assets/dashboard/login.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../assets/dashboard/app.css");

/// The one error type of the HTTP API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The OpenAI error shape used everywhere else: a type and a string code.
        let (kind, code) = match self.status {
            StatusCode::UNAUTHORIZED => ("authentication_error", "admin_token_required"),
            StatusCode::NOT_FOUND => ("invalid_request_error", "not_found"),
            s if s.is_client_error() => ("invalid_request_error", "bad_request"),
            _ => ("api_error", "internal_error"),
        };
        let body = json!({ "error": { "message": self.message, "type": kind, "param": null, "code": code } });
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/api/state", get(api_state))
        .route("/dashboard/assets/:file", get(asset))
        .with_state(core)
        // Not the built-in mock's answers: they reach agents as a provider's would.
        .layer(axum::middleware::map_response(protective_headers))
        .nest(MOCK_PREFIX, aex_mock::provider_router())
        .layer(axum::middleware::from_fn(loopback_only))
}

/// No page of this port may be framed by another (clickjacking: any local web app shares the
/// 127.0.0.1 site), sniffed into another type, or cached with its data.
async fn protective_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        h.insert(name, header::HeaderValue::from_static(value));
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    r
}

/// A form posted from another site (a page that signs the operator out): browsers say where a
/// request comes from in `Sec-Fetch-Site`, and older ones in `Origin`.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if let Some(site) = fetch_site {
        return !matches!(site, "same-origin" | "none");
    }
    headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| {
            let host = o.split("://").nth(1).unwrap_or(o);
            o == "null" || !is_loopback_host(host)
        })
}

/// Answers only requests addressed to a loopback name (the port listens on 127.0.0.1 alone): a
/// web page an operator opens could otherwise point its own host name at 127.0.0.1 (DNS
/// rebinding) and read this port from the browser, `/metrics` naming every agent and its spend.
async fn loopback_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // An absolute URI's authority is the target (RFC 9112 §3.2.2), else `Host`; a request
    // naming neither (HTTP/1.0) is refused too.
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    match host {
        Some(h) if is_loopback_host(&h) => next.run(req).await,
        h => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "AEX answers requests to 127.0.0.1, localhost or [::1] only, not {}.",
                h.map_or_else(
                    || "a request without a host".to_string(),
                    |h| format!("{h:?}")
                )
            ),
        )
        .into_response(),
    }
}

/// `127.0.0.1`, `localhost`, `[::1]` (or any 127.x address), with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// 503 while the database refuses commits (requests are refused meanwhile).
async fn healthz(State(core): State<Arc<Core>>) -> impl IntoResponse {
    if core.store_failing() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the ledger database cannot commit",
        )
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&core),
    )
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Admin only: `Authorization: Bearer <admin token>` or a session cookie from the login page.
/// Agent tokens never match.
fn authorized(core: &Core, headers: &HeaderMap) -> bool {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
    {
        return tokens::constant_time_eq(
            tokens::sha256_hex(token.trim()).as_bytes(),
            core.admin_token_sha256.as_bytes(),
        );
    }
    let Some(id) = cookie(headers, SESSION_COOKIE) else {
        return false;
    };
    let now = now_ms();
    let mut sessions = core.sessions.lock().unwrap_or_else(|p| p.into_inner());
    sessions.retain(|_, exp| *exp > now);
    sessions.contains_key(&id)
}

fn html(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn page(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    if authorized(&core, &headers) {
        html(INDEX_HTML)
    } else {
        let mut r = html(LOGIN_HTML);
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if cross_site(&headers) {
        return ApiError::new(StatusCode::FORBIDDEN, "cross-site sign-in refused").into_response();
    }
    if !tokens::constant_time_eq(
        tokens::sha256_hex(f.token.trim()).as_bytes(),
        core.admin_token_sha256.as_bytes(),
    ) {
        let mut r = html(LOGIN_HTML);
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut().insert(
            "x-aex-login",
            "failed"
                .parse()
                .unwrap_or(header::HeaderValue::from_static("failed")),
        );
        return r;
    }
    let id = tokens::generate();
    core.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), now_ms() + SESSION_TTL_MS);
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age={}",
        SESSION_TTL_MS / 1000
    );
    let mut r = Redirect::to("/dashboard").into_response();
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return ApiError::new(StatusCode::FORBIDDEN, "cross-site sign-out refused").into_response();
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        core.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    let mut r = Redirect::to("/dashboard").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_static(
            "aex_session=; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age=0",
        ),
    );
    r
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, ctype) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return ApiError::new(StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Everything the dashboard shows, in one document.
pub fn dashboard_state(db: &std::path::Path, now: i64) -> Result<serde_json::Value, ApiError> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(crate::store::StoreError::from)?;
    let hour = 3_600_000;
    let agents = stats::agent_metrics(&conn, now, hour)?;
    let last_hour = stats::window_counts(&conn, now, hour)?;
    let last_day = stats::window_counts(&conn, now, 24 * hour)?;
    let timeline = stats::timeline(&conn, now, 60)?;
    let events = stats::recent_events(&conn, 50, 20)?;
    let stats::Totals {
        budget_micros: budget,
        spent_micros: spent,
        reserved_micros: reserved,
        remaining_micros: remaining,
    } = stats::totals(&agents);
    Ok(json!({
        "generated_at_ms": now,
        "window_secs": hour / 1000,
        "totals": {
            "agents": agents.len(), "budget_micros": budget, "spent_micros": spent, "reserved_micros": reserved,
            "remaining_micros": remaining,
            "requests_1h": last_hour.allowed + last_hour.denied, "denials_1h": last_hour.denied,
            "requests_24h": last_day.allowed + last_day.denied, "denials_24h": last_day.denied,
            "spent_1h_micros": last_hour.spent_micros,
        },
        "agents": agents,
        "denials_by_code": last_hour.denied_by_code,
        "timeline": timeline,
        "recent_events": events,
    }))
}

async fn api_state(
    State(core): State<Arc<Core>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !authorized(&core, &headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin token required",
        ));
    }
    let db = core.db_path.clone();
    let v = tokio::task::spawn_blocking(move || dashboard_state(&db, now_ms()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_host_names() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:9002",
            "localhost:9000",
            "LOCALHOST",
            "[::1]:9002",
            "[::1]",
            "127.3.4.5:1",
        ] {
            assert!(super::is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:9002",
            "127.0.0.1.evil.example",
            "localhost.evil.example:1",
            "10.0.0.1:9002",
            "[::2]:1",
            "",
        ] {
            assert!(!super::is_loopback_host(h), "{h}");
        }
    }
}
