//! Server-sent-event framing and the streaming response body.
//!
//! Events are built up front, then sent one body frame per event, sleeping
//! `x-mock-chunk-delay-ms` between events. `x-mock-cut-after: K` ends the body
//! with an error after K events (never reaching the final event), which makes
//! the server drop the connection mid-stream.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;

use crate::control::Controls;

/// Pause before cutting a stream, so earlier events leave the server first.
const FLUSH_BEFORE_CUT: Duration = Duration::from_millis(25);

/// `data: <json>\n\n`
pub(crate) fn data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `event: <name>\ndata: <json>\n\n`
pub(crate) fn event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

/// The `data: [DONE]` terminator of Chat/Completions streams.
pub(crate) fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A `text/event-stream` response sending `events` as separate frames.
pub(crate) fn response(events: Vec<Bytes>, controls: &Controls) -> Response {
    let delay = Duration::from_millis(controls.chunk_delay_ms);
    // Cut before the last event at the latest, so a cut stream never looks
    // complete (no `[DONE]`, no `response.completed`).
    let cut = controls
        .cut_after
        .map(|k| k.min(events.len().saturating_sub(1)));
    let state = (events.into_iter(), 0usize, false);
    let stream = futures::stream::unfold(state, move |(mut events, sent, finished)| async move {
        if finished {
            return None;
        }
        if sent > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if cut.is_some_and(|k| sent >= k) {
            // Let the server flush the events already sent, so the client
            // really sees them before the connection drops.
            tokio::time::sleep(FLUSH_BEFORE_CUT).await;
            let err = io::Error::new(io::ErrorKind::ConnectionAborted, "x-mock-cut-after");
            return Some((Err(err), (events, sent, true)));
        }
        let next = events.next()?;
        Some((Ok::<Bytes, io::Error>(next), (events, sent + 1, false)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn framing() {
        assert_eq!(&data(&json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
        assert_eq!(
            &event("response.created", &json!({"b": 2}))[..],
            b"event: response.created\ndata: {\"b\":2}\n\n"
        );
        assert_eq!(&done()[..], b"data: [DONE]\n\n");
    }
}
