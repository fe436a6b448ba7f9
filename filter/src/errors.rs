//! Denials: every refusal the gateway can give, with the exact status / type / code of the
//! product contract, and the one function that turns a denial into an OpenAI-shaped error body.

use std::borrow::Cow;

/// Most characters of client text (a model or tool name, a path) a denial message quotes, and of a
/// model name or path reported for the audit log.
pub const MAX_QUOTED: usize = 256;
/// Most characters of a denial message reported for the audit log.
pub const MAX_MESSAGE: usize = 1024;

/// `s` cut to at most `max` characters, the last one then `…`. The control plane bounds (and
/// redacts) what it records all the same; this keeps error bodies and reports small.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max || s.chars().nth(max).is_none() {
        return Cow::Borrowed(s);
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    Cow::Owned(out)
}

/// Client text as a denial message quotes it back.
pub fn quoted(s: &str) -> Cow<'_, str> {
    clip(s, MAX_QUOTED)
}

/// A request path as reported for the audit log: without its query string or fragment (where
/// clients put keys), cut.
pub fn reported_path(p: &str) -> Cow<'_, str> {
    clip(p.split(['?', '#']).next().unwrap_or_default(), MAX_QUOTED)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidJson,
    MissingModel,
    InvalidRequest,
    MissingApiKey,
    InvalidApiKey,
    TokenExpired,
    BudgetExceeded,
    ModelNotAllowed,
    ModelNotPriced,
    StreamingNotAllowed,
    ToolsNotAllowed,
    ToolNotAllowed,
    VisionNotAllowed,
    ScopeDenied,
    PassthroughNotAllowed,
    StrictViolation,
    UnknownEndpoint,
    RequestTooLarge,
    RateLimitExceeded,
    GovernanceUnavailable,
}

const ALL: [Code; 20] = [
    Code::InvalidJson,
    Code::MissingModel,
    Code::InvalidRequest,
    Code::MissingApiKey,
    Code::InvalidApiKey,
    Code::TokenExpired,
    Code::BudgetExceeded,
    Code::ModelNotAllowed,
    Code::ModelNotPriced,
    Code::StreamingNotAllowed,
    Code::ToolsNotAllowed,
    Code::ToolNotAllowed,
    Code::VisionNotAllowed,
    Code::ScopeDenied,
    Code::PassthroughNotAllowed,
    Code::StrictViolation,
    Code::UnknownEndpoint,
    Code::RequestTooLarge,
    Code::RateLimitExceeded,
    Code::GovernanceUnavailable,
];

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidJson => "invalid_json",
            Code::MissingModel => "missing_model",
            Code::InvalidRequest => "invalid_request",
            Code::MissingApiKey => "missing_api_key",
            Code::InvalidApiKey => "invalid_api_key",
            Code::TokenExpired => "token_expired",
            Code::BudgetExceeded => "budget_exceeded",
            Code::ModelNotAllowed => "model_not_allowed",
            Code::ModelNotPriced => "model_not_priced",
            Code::StreamingNotAllowed => "streaming_not_allowed",
            Code::ToolsNotAllowed => "tools_not_allowed",
            Code::ToolNotAllowed => "tool_not_allowed",
            Code::VisionNotAllowed => "vision_not_allowed",
            Code::ScopeDenied => "scope_denied",
            Code::PassthroughNotAllowed => "passthrough_not_allowed",
            Code::StrictViolation => "strict_violation",
            Code::UnknownEndpoint => "unknown_endpoint",
            Code::RequestTooLarge => "request_too_large",
            Code::RateLimitExceeded => "rate_limit_exceeded",
            Code::GovernanceUnavailable => "governance_unavailable",
        }
    }

    /// The code the control plane sent, or `GovernanceUnavailable` for one this filter does not know.
    pub fn parse(s: &str) -> Code {
        ALL.iter()
            .copied()
            .find(|c| c.as_str() == s)
            .unwrap_or(Code::GovernanceUnavailable)
    }

    pub fn status(self) -> u32 {
        match self {
            Code::InvalidJson | Code::MissingModel | Code::InvalidRequest => 400,
            Code::MissingApiKey | Code::InvalidApiKey | Code::TokenExpired => 401,
            Code::BudgetExceeded => 402,
            Code::ModelNotAllowed
            | Code::ModelNotPriced
            | Code::StreamingNotAllowed
            | Code::ToolsNotAllowed
            | Code::ToolNotAllowed
            | Code::VisionNotAllowed
            | Code::ScopeDenied
            | Code::PassthroughNotAllowed
            | Code::StrictViolation => 403,
            Code::UnknownEndpoint => 404,
            Code::RequestTooLarge => 413,
            Code::RateLimitExceeded => 429,
            Code::GovernanceUnavailable => 503,
        }
    }

    pub fn error_type(self) -> &'static str {
        match self.status() {
            400 | 404 | 413 => "invalid_request_error",
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "api_error",
        }
    }
}

/// What ran out for a 429: requests per minute, or tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub retry_after_secs: u64,
    /// The agent's limit (requests, or tokens when `tokens_remaining` is set).
    pub limit: u64,
    /// Refused on tokens: the tokens left in the current minute.
    pub tokens_remaining: Option<u64>,
}

/// A refusal with its human-readable reason and, for 429, rate-limit details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: Code,
    pub message: String,
    /// A 429's details: its `Retry-After` and `x-ratelimit-*` headers.
    pub rate_limit: Option<RateLimited>,
    /// The agent refused, when known (an expired token still names its agent).
    pub agent_id: String,
    /// The model the refused request named, when the body was readable.
    pub model: String,
}

impl Denial {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            rate_limit: None,
            agent_id: String::new(),
            model: String::new(),
        }
    }

    /// `{"error":{"message":…,"type":…,"param":null,"code":…}}`
    pub fn body(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.code.error_type(),
                "param": serde_json::Value::Null,
                "code": self.code.as_str(),
            }
        });
        v.to_string().into_bytes()
    }

    /// Response headers besides content-type.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("content-type", "application/json".to_string())];
        let Some(r) = self.rate_limit else {
            return h;
        };
        let s = r.retry_after_secs;
        h.push(("retry-after", s.to_string()));
        match r.tokens_remaining {
            Some(left) => {
                h.push(("x-ratelimit-limit-tokens", r.limit.to_string()));
                h.push(("x-ratelimit-remaining-tokens", left.to_string()));
                h.push(("x-ratelimit-reset-tokens", format!("{s}s")));
            }
            None => {
                h.push(("x-ratelimit-limit-requests", r.limit.to_string()));
                h.push(("x-ratelimit-remaining-requests", "0".to_string()));
                h.push(("x-ratelimit-reset-requests", format!("{s}s")));
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_contract() {
        let expect = [
            (Code::InvalidJson, 400, "invalid_request_error"),
            (Code::MissingApiKey, 401, "authentication_error"),
            (Code::TokenExpired, 401, "authentication_error"),
            (Code::BudgetExceeded, 402, "insufficient_quota"),
            (Code::StrictViolation, 403, "permission_error"),
            (Code::UnknownEndpoint, 404, "invalid_request_error"),
            (Code::RequestTooLarge, 413, "invalid_request_error"),
            (Code::RateLimitExceeded, 429, "rate_limit_error"),
            (Code::GovernanceUnavailable, 503, "api_error"),
        ];
        for (c, s, t) in expect {
            assert_eq!((c.status(), c.error_type()), (s, t), "{c:?}");
        }
        for c in ALL {
            assert_eq!(Code::parse(c.as_str()), c);
        }
    }

    #[test]
    fn quoted_client_text_is_cut_on_char_boundaries() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "ab…");
        assert_eq!(clip("éééé", 3), "éé…");
        assert_eq!(quoted(&"m".repeat(100_000)).chars().count(), MAX_QUOTED);
        assert_eq!(reported_path("/v1/nothing?key=aex_x#f"), "/v1/nothing");
        assert_eq!(reported_path("/v1/x#f?y"), "/v1/x");
        assert_eq!(
            reported_path(&format!("/v1/{}", "a".repeat(5000)))
                .chars()
                .count(),
            MAX_QUOTED
        );
    }

    #[test]
    fn rate_limit_headers_name_what_ran_out() {
        let header = |d: &Denial, k: &str| {
            d.headers()
                .into_iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v)
        };
        let mut rpm = Denial::new(Code::RateLimitExceeded, "rpm");
        rpm.rate_limit = Some(RateLimited {
            retry_after_secs: 7,
            limit: 60,
            tokens_remaining: None,
        });
        assert_eq!(header(&rpm, "retry-after").as_deref(), Some("7"));
        assert_eq!(
            header(&rpm, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&rpm, "x-ratelimit-limit-requests").as_deref(),
            Some("60")
        );
        assert_eq!(header(&rpm, "x-ratelimit-limit-tokens"), None);
        let mut tpm = Denial::new(Code::RateLimitExceeded, "tpm");
        tpm.rate_limit = Some(RateLimited {
            retry_after_secs: 12,
            limit: 10_000,
            tokens_remaining: Some(350),
        });
        assert_eq!(header(&tpm, "retry-after").as_deref(), Some("12"));
        assert_eq!(
            header(&tpm, "x-ratelimit-limit-tokens").as_deref(),
            Some("10000")
        );
        assert_eq!(
            header(&tpm, "x-ratelimit-remaining-tokens").as_deref(),
            Some("350")
        );
        assert_eq!(
            header(&tpm, "x-ratelimit-reset-tokens").as_deref(),
            Some("12s")
        );
        assert_eq!(header(&tpm, "x-ratelimit-remaining-requests"), None);
    }

    #[test]
    fn body_is_openai_shaped() {
        let d = Denial::new(Code::ModelNotAllowed, "no \"quotes\" problem");
        let v: serde_json::Value = serde_json::from_slice(&d.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(v["error"]["param"].is_null());
        assert_eq!(v["error"]["message"], "no \"quotes\" problem");
    }
}
