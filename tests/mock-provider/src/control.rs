//! The `x-mock-*` request headers that steer the mock's behaviour.
//!
//! All knobs are optional and apply to every `/v1/*` endpoint. A knob whose
//! value cannot be parsed is rejected with a 400 naming the header, so a
//! typo in a test shows up instead of being silently ignored.

use axum::http::{HeaderMap, StatusCode};

use crate::error::ApiError;

/// Sleep this many milliseconds before responding (before the first byte).
pub(crate) const LATENCY_MS: &str = "x-mock-latency-ms";
/// Sleep this many milliseconds between stream events.
pub(crate) const CHUNK_DELAY_MS: &str = "x-mock-chunk-delay-ms";
/// How many words (= completion tokens) to generate per choice.
pub(crate) const OUTPUT_TOKENS: &str = "x-mock-output-tokens";
/// Respond with this HTTP status and an OpenAI error body.
pub(crate) const ERROR: &str = "x-mock-error";
/// Never report usage.
pub(crate) const NO_USAGE: &str = "x-mock-no-usage";
/// Report this completion/output token count whatever was generated.
pub(crate) const USAGE_COMPLETION_TOKENS: &str = "x-mock-usage-completion-tokens";
/// Streaming: cut the connection after this many events.
pub(crate) const CUT_AFTER: &str = "x-mock-cut-after";
/// Streaming: report usage Groq-style in `x_groq` on the final chunk.
pub(crate) const GROQ: &str = "x-mock-groq";

/// Streaming chat: a running usage count on every content chunk as well (vLLM's
/// `continuous_usage_stats`), the final count on the finishing chunk.
pub(crate) const RUNNING_USAGE: &str = "x-mock-running-usage";

/// Replace the response's `content-type` with this value (e.g. an event stream sent as
/// `text/plain`, as some servers do).
pub(crate) const CONTENT_TYPE: &str = "x-mock-content-type";

/// `1`: gzip the response body (`content-encoding: gzip`) whatever `accept-encoding` asked for.
pub(crate) const GZIP: &str = "x-mock-gzip";

/// Add a response header whose value is not UTF-8 (`x-provider-note: caf\xe9`, Latin-1), as
/// some providers and proxies send.
pub(crate) const LATIN1_HEADER: &str = "x-mock-latin1-header";

/// Default number of generated words when `x-mock-output-tokens` is absent.
pub(crate) const DEFAULT_OUTPUT_TOKENS: u64 = 12;
/// Upper bound for `x-mock-output-tokens` (keeps a typo from eating memory).
const MAX_OUTPUT_TOKENS: u64 = 100_000;
/// Upper bound for the delay knobs: ten minutes.
const MAX_DELAY_MS: u64 = 600_000;

/// The parsed control knobs of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Controls {
    pub latency_ms: u64,
    pub chunk_delay_ms: u64,
    pub output_tokens: u64,
    pub error_status: Option<StatusCode>,
    pub no_usage: bool,
    pub usage_completion_tokens: Option<u64>,
    pub cut_after: Option<usize>,
    pub groq: bool,
    pub running_usage: bool,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            latency_ms: 0,
            chunk_delay_ms: 0,
            output_tokens: DEFAULT_OUTPUT_TOKENS,
            error_status: None,
            no_usage: false,
            usage_completion_tokens: None,
            cut_after: None,
            groq: false,
            running_usage: false,
        }
    }
}

impl Controls {
    /// Reads the knobs from request headers.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut c = Controls::default();
        if let Some(v) = number(headers, LATENCY_MS, MAX_DELAY_MS)? {
            c.latency_ms = v;
        }
        if let Some(v) = number(headers, CHUNK_DELAY_MS, MAX_DELAY_MS)? {
            c.chunk_delay_ms = v;
        }
        if let Some(v) = number(headers, OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)? {
            c.output_tokens = v;
        }
        if let Some(v) = number(headers, ERROR, 599)? {
            let status = StatusCode::from_u16(v as u16)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .ok_or_else(|| bad_header(ERROR, "an HTTP status between 400 and 599"))?;
            c.error_status = Some(status);
        }
        c.no_usage = flag(headers, NO_USAGE)?;
        c.usage_completion_tokens = number(headers, USAGE_COMPLETION_TOKENS, u64::MAX)?;
        c.cut_after = number(headers, CUT_AFTER, u32::MAX as u64)?.map(|v| v as usize);
        c.groq = flag(headers, GROQ)?;
        c.running_usage = flag(headers, RUNNING_USAGE)?;
        Ok(c)
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| bad_header(name, "an ASCII value")),
    }
}

fn number(headers: &HeaderMap, name: &str, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(s) = header_str(headers, name)? else {
        return Ok(None);
    };
    match s.parse::<u64>() {
        Ok(v) if v <= max => Ok(Some(v)),
        _ => Err(bad_header(
            name,
            &format!("a non-negative integer no greater than {max}"),
        )),
    }
}

fn flag(headers: &HeaderMap, name: &str) -> Result<bool, ApiError> {
    match header_str(headers, name)? {
        None => Ok(false),
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(bad_header(name, "1 or 0")),
        },
    }
}

fn bad_header(name: &str, expected: &str) -> ApiError {
    ApiError::invalid(
        format!("Invalid value for header '{name}': expected {expected}."),
        Some(name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn defaults_when_no_headers() {
        let c = Controls::from_headers(&HeaderMap::new()).expect("no headers is valid");
        assert_eq!(c, Controls::default());
        assert_eq!(c.output_tokens, 12);
    }

    #[test]
    fn parses_every_knob() {
        let c = Controls::from_headers(&headers(&[
            (LATENCY_MS, "15"),
            (CHUNK_DELAY_MS, "3"),
            (OUTPUT_TOKENS, "4"),
            (ERROR, "429"),
            (NO_USAGE, "1"),
            (USAGE_COMPLETION_TOKENS, "999"),
            (CUT_AFTER, "2"),
            (GROQ, "true"),
            (RUNNING_USAGE, "1"),
        ]))
        .expect("valid knobs");
        assert_eq!(
            c,
            Controls {
                latency_ms: 15,
                chunk_delay_ms: 3,
                output_tokens: 4,
                error_status: Some(StatusCode::TOO_MANY_REQUESTS),
                no_usage: true,
                usage_completion_tokens: Some(999),
                cut_after: Some(2),
                groq: true,
                running_usage: true,
            }
        );
    }

    #[test]
    fn rejects_bad_values_with_400_naming_the_header() {
        for (name, value) in [
            (LATENCY_MS, "soon"),
            (OUTPUT_TOKENS, "-1"),
            (OUTPUT_TOKENS, "1000000000"),
            (ERROR, "200"),
            (ERROR, "99"),
            (NO_USAGE, "maybe"),
        ] {
            let err = Controls::from_headers(&headers(&[(name, value)]))
                .expect_err("value must be rejected");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{name}: {value}");
            assert_eq!(err.param.as_deref(), Some(name));
        }
    }

    #[test]
    fn zero_flag_is_false() {
        let c = Controls::from_headers(&headers(&[(NO_USAGE, "0"), (GROQ, "false")]))
            .expect("valid flags");
        assert!(!c.no_usage);
        assert!(!c.groq);
    }
}
