//! OpenAI-shaped error responses (`{"error": {message, type, param, code}}`).
//!
//! Every failure the mock produces — bad JSON, bad parameters, unknown paths,
//! and the `x-mock-error` knob — goes through [`ApiError`] so clients (the
//! `openai` SDK in particular) see exactly the body shape they expect.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An error rendered as an OpenAI error body with the given HTTP status.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`, optionally naming the offending parameter.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
        }
    }

    /// A 400 for a parameter of the wrong type.
    pub fn bad_type(param: &str, expected: &str) -> Self {
        Self::invalid(
            format!("Invalid type for '{param}': expected {expected}."),
            Some(param),
        )
    }

    /// A 400 for a missing required parameter.
    pub fn missing(param: &str) -> Self {
        Self::invalid(
            format!("Missing required parameter: '{param}'."),
            Some(param),
        )
    }

    /// The 400 returned when the body is not valid JSON.
    pub fn bad_json(detail: &str) -> Self {
        Self::invalid(
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
                 but what was sent was not valid JSON: {detail})"
            ),
            None,
        )
    }

    /// The 404 OpenAI returns for an unknown route or a wrong method.
    pub fn not_found(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Invalid URL ({method} {path})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// The error produced by the `x-mock-error: STATUS` knob.
    pub fn mock(status: StatusCode) -> Self {
        let kind = match status.as_u16() {
            429 => "rate_limit_error",
            400 => "invalid_request_error",
            _ => "server_error",
        };
        ApiError {
            status,
            message: "mock error".to_owned(),
            kind,
            param: None,
            code: Some("mock_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}
