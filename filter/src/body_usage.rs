//! Usage from a non-streaming JSON response body of any size, in bounded memory.
//!
//! A response body is normally kept whole (up to [`FULL_PARSE_BYTES`]) and read with
//! [`usage::from_json_body`]. A larger one — an embeddings batch of 2,048 inputs at 3,072
//! dimensions is ~34 MB — would cost the Envoy worker's Wasm memory that much for good (a VM's
//! linear memory never shrinks), and used to lose its usage, which sits at the end. Past that
//! size the body is scanned as it passes instead: a byte-level tracker of the JSON structure
//! keeps only the value of the document's top-level `usage` member (the last one, as serde_json
//! would) and reads it at the end, so the charge stays exact.
//!
//! The scanner follows strings and escapes, so a `"usage"` inside a string never matches; it
//! does not validate the document (a malformed body is the provider's; the worst case is no
//! usage, and then the request is charged a conservative estimate). Keys are compared as raw
//! bytes: an escaped key spelling such as `"us\u0061ge"` is not recognised past the full-parse
//! size.

use crate::usage::{self, Usage};

/// Bodies up to this size are kept whole and parsed exactly.
pub const FULL_PARSE_BYTES: usize = 4 << 20;

/// Largest `usage` value kept (a real one is a few hundred bytes).
const MAX_USAGE_BYTES: usize = 64 << 10;

/// What the scanner expects next in an object whose members it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Key,
    Colon,
    Value,
    /// Inside or after a member's value, until `,` or `}`.
    AfterValue,
}

/// Where a usage object is read from, in `usage::from_json_body`'s order of preference.
const SLOTS: [&[u8]; 3] = [b"usage", b"response", b"x_groq"];

/// The members of one object the scanner follows: the document's (depth 1), or those of its
/// `response` or `x_groq` object (depth 2), where the Responses API's terminal events and Groq
/// put the usage.
#[derive(Debug, Clone)]
struct Level {
    expect: Expect,
    /// Raw bytes of the key being read (only the names in [`SLOTS`] matter; longer keys are cut).
    key: Vec<u8>,
}

impl Default for Level {
    fn default() -> Self {
        Level {
            expect: Expect::Key,
            key: Vec::new(),
        }
    }
}

/// What a whole non-streaming response body reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyReport {
    pub usage: Option<Usage>,
    /// No usage, and the body is an OpenAI-style error document (`{"error": …}` with no
    /// `choices`, `data` or `output`): an upstream error sent with a success status.
    pub error: bool,
    /// The body is one whole JSON document: a body cut short (a provider that closed the
    /// connection mid-answer, with no length to tell) is not an answer that arrived.
    pub whole: bool,
}

/// What a kept body with no usage is: whether it is one whole JSON document, and an error
/// document (a JSON object with a non-null `error` member and none of the members that carry a
/// result). Only consulted when a body reported no usage (rare), so a tree is fine.
fn without_usage(body: &[u8]) -> BodyReport {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return BodyReport::default();
    };
    let error = doc.as_object().is_some_and(|m| {
        m.get("error").is_some_and(|e| !e.is_null())
            && !["choices", "data", "output"]
                .iter()
                .any(|k| m.contains_key(*k))
    });
    BodyReport {
        usage: None,
        error,
        whole: true,
    }
}

/// Reads a JSON body chunk by chunk; see the module documentation.
#[derive(Debug, Default)]
pub struct BodyUsage {
    /// Whole body while it is at most [`FULL_PARSE_BYTES`]; emptied when scanning takes over.
    whole: Vec<u8>,
    scanning: bool,
    started: bool,
    /// The document is not an object: it has no top-level usage.
    not_object: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The document's members, and those of the `response` or `x_groq` object being read.
    top: Level,
    inner: Level,
    /// The slot ([`SLOTS`]) of the `response` / `x_groq` object being read at depth 2.
    wrapper: Option<usize>,
    /// The usage object being captured: its slot, the depth of the object holding it, its bytes.
    capture: Option<(usize, u32, Vec<u8>)>,
    /// The last complete usage object of each slot (None: absent, or overridden by a later
    /// member that is not one).
    last: [Option<Vec<u8>>; 3],
    /// The top-level object has closed.
    closed: bool,
}

impl BodyUsage {
    /// A scanner from the first byte: for one stream event too large to be kept (sse.rs).
    pub fn scanning() -> Self {
        BodyUsage {
            scanning: true,
            ..BodyUsage::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.scanning {
            self.scan(chunk);
            return;
        }
        if self.whole.len().saturating_add(chunk.len()) <= FULL_PARSE_BYTES {
            self.whole.extend_from_slice(chunk);
            return;
        }
        self.scanning = true;
        let whole = std::mem::take(&mut self.whole);
        self.scan(&whole);
        self.scan(chunk);
    }

    /// What the whole body reported.
    pub fn finish(self) -> BodyReport {
        if !self.scanning {
            return match usage::from_json_body(&self.whole) {
                // Read from a parse of the whole document.
                Some(u) => BodyReport {
                    usage: Some(u),
                    error: false,
                    whole: true,
                },
                None => without_usage(&self.whole),
            };
        }
        let whole = self.closed;
        if self.last.iter().all(Option::is_none) {
            return BodyReport {
                whole,
                ..BodyReport::default()
            };
        }
        // The usage objects found, in a document of their own for the usual reading.
        let mut doc = b"{".to_vec();
        for (slot, value) in self.last.iter().enumerate() {
            let (Some(value), Some(name)) = (value, SLOTS.get(slot)) else {
                continue;
            };
            if doc.len() > 1 {
                doc.push(b',');
            }
            doc.push(b'"');
            doc.extend_from_slice(name);
            doc.extend_from_slice(if slot == 0 { b"\":" } else { b"\":{\"usage\":" });
            doc.extend_from_slice(value);
            if slot != 0 {
                doc.push(b'}');
            }
        }
        doc.push(b'}');
        BodyReport {
            usage: usage::from_json_body(&doc),
            error: false,
            whole,
        }
    }

    /// The level whose members are followed at the current depth, if any.
    fn level(&mut self) -> Option<&mut Level> {
        match (self.depth, self.wrapper) {
            (1, _) => Some(&mut self.top),
            (2, Some(_)) => Some(&mut self.inner),
            _ => None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.not_object {
                return;
            }
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some((slot, _, c)) = self.capture.as_mut() {
            c.push(b);
            if c.len() > MAX_USAGE_BYTES {
                if let Some(last) = self.last.get_mut(*slot) {
                    *last = None;
                }
                self.capture = None;
            }
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if let Some(level) = self.level() {
                    if level.expect == Expect::Key {
                        level.expect = Expect::Colon;
                    }
                }
                return;
            }
            if let Some(level) = self.level() {
                if level.expect == Expect::Key && level.key.len() < 8 {
                    level.key.push(b);
                }
            }
            return;
        }
        if b.is_ascii_whitespace() {
            return;
        }
        if !self.started {
            // The first significant byte (a byte-order mark is skipped).
            if matches!(b, 0xEF | 0xBB | 0xBF) {
                return;
            }
            self.started = true;
            if b != b'{' {
                self.not_object = true;
                return;
            }
        }
        let (depth, wrapper) = (self.depth, self.wrapper);
        let mut named = None;
        if let Some(level) = self.level() {
            if level.expect == Expect::Value {
                level.expect = Expect::AfterValue;
                named = Some(SLOTS.iter().position(|n| *n == level.key.as_slice()));
            }
        }
        // The last member of a name wins: a later one that is not an object means none.
        match (named, depth, wrapper) {
            (Some(Some(0)), 1, _) => {
                self.last[0] = None;
                if b == b'{' {
                    self.capture = Some((0, 1, vec![b'{']));
                }
            }
            (Some(Some(slot)), 1, _) => {
                if let Some(last) = self.last.get_mut(slot) {
                    *last = None;
                }
                if b == b'{' {
                    self.wrapper = Some(slot);
                    self.inner = Level::default();
                }
            }
            (Some(Some(0)), 2, Some(slot)) => {
                if let Some(last) = self.last.get_mut(slot) {
                    *last = None;
                }
                if b == b'{' {
                    self.capture = Some((slot, 2, vec![b'{']));
                }
            }
            _ => {}
        }
        match b {
            b'"' => {
                self.in_string = true;
                if let Some(level) = self.level() {
                    if level.expect == Expect::Key {
                        level.key.clear();
                    }
                }
            }
            b'{' | b'[' => self.depth = self.depth.saturating_add(1),
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.closed = self.depth == 0;
                if self.depth == 1 {
                    self.wrapper = None;
                }
                if let Some((slot, at, c)) = self.capture.take() {
                    if self.depth == at {
                        if let Some(last) = self.last.get_mut(slot) {
                            *last = Some(c);
                        }
                    } else {
                        self.capture = Some((slot, at, c));
                    }
                }
            }
            b':' => {
                if let Some(level) = self.level() {
                    if level.expect == Expect::Colon {
                        level.expect = Expect::Value;
                    }
                }
            }
            b',' => {
                if let Some(level) = self.level() {
                    level.expect = Expect::Key;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the body fed in chunks of `size` (by either path) read as one whole document.
    fn whole(body: &[u8], size: usize, scanning: bool) -> bool {
        let mut b = BodyUsage {
            scanning,
            ..BodyUsage::default()
        };
        for chunk in body.chunks(size.max(1)) {
            b.feed(chunk);
        }
        b.finish().whole
    }

    #[test]
    fn a_body_cut_short_is_not_whole() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"a \"}\" b"}}],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        for scanning in [false, true] {
            for size in [1, 7, body.len()] {
                assert!(
                    whole(body, size, scanning),
                    "size {size} scanning {scanning}"
                );
                assert!(
                    whole(&[body.as_slice(), b"\n"].concat(), size, scanning),
                    "trailing whitespace"
                );
                for cut in [1, 20, 40, body.len() - 1] {
                    let short = body.get(..cut).unwrap();
                    assert!(
                        !whole(short, size, scanning),
                        "cut {cut} scanning {scanning}"
                    );
                }
            }
        }
        // An error document is whole too; an empty body is not.
        assert!(whole(br#"{"error":{"message":"no"}}"#, 4, false));
        assert!(!whole(b"", 4, false) && !whole(b"", 4, true));
    }

    /// Scans `body` (forced past the full-parse path) in chunks of `size` bytes.
    fn scanned(body: &[u8], size: usize) -> Option<Usage> {
        let mut b = BodyUsage {
            scanning: true,
            ..BodyUsage::default()
        };
        for chunk in body.chunks(size.max(1)) {
            b.feed(chunk);
        }
        b.finish().usage
    }

    fn u(input: u64, output: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        })
    }

    #[test]
    fn agrees_with_the_full_parse_on_top_level_usage_whatever_the_chunking() {
        let bodies: [&[u8]; 19] = [
            br#"{"object":"list","data":[{"embedding":[0.1,-2e-3],"usage":{"prompt_tokens":99}}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
            br#"{"choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":9} \\"}}],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"x":[{"usage":{"prompt_tokens":5}}],"usage":{"prompt_tokens":4,"completion_tokens":6,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":null}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":"x"}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":[{"prompt_tokens":7}]}"#,
            br#"{"usage" : { "input_tokens" : 36 , "output_tokens" : 87 } , "status" : "completed" }"#,
            b"\xEF\xBB\xBF {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n",
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            br#"{"usages":{"prompt_tokens":1},"usag":{"prompt_tokens":2},"data":"}}}{{{"}"#,
            br#"{"a":{"usage":{"prompt_tokens":1,"completion_tokens":1}}}"#,
            br#"{"usage":{"prompt_tokens":12.0,"completion_tokens":"50"}}"#,
            // The Responses API's terminal events and Groq nest it one level down.
            br#"{"type":"response.completed","response":{"id":"r","output":[{"usage":{"input_tokens":99}}],"usage":{"input_tokens":7,"output_tokens":9}}}"#,
            br#"{"x_groq":{"id":"q","usage":{"prompt_tokens":5,"completion_tokens":6}},"choices":[]}"#,
            br#"{"response":{"usage":{"input_tokens":1,"output_tokens":2}},"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            br#"{"response":{"usage":{"input_tokens":1,"output_tokens":2}},"response":{"status":"failed"}}"#,
            br#"{"response":{"usage":{"input_tokens":1,"output_tokens":2},"usage":null}}"#,
            br#"{"response":[{"usage":{"input_tokens":1}}],"data":{"response":{"usage":{"input_tokens":5}}}}"#,
            br#"{"response":{"text":"\"usage\":{\"input_tokens\":3}","usage":{"input_tokens":2,"output_tokens":1}}}"#,
        ];
        for body in bodies {
            let want = usage::from_json_body(body);
            for size in [1, 2, 3, 7, 64, body.len()] {
                assert_eq!(
                    scanned(body, size),
                    want,
                    "{} / {size}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn a_body_larger_than_the_full_parse_size_keeps_its_usage_in_bounded_memory() {
        let mut b = BodyUsage::default();
        b.feed(br#"{"object":"list","data":["#);
        let item = br#"{"object":"embedding","index":0,"embedding":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},"#;
        let mut fed = 0;
        while fed <= FULL_PARSE_BYTES + (1 << 20) {
            b.feed(item);
            fed += item.len();
        }
        assert!(
            b.scanning && b.whole.capacity() == 0,
            "the body is no longer kept"
        );
        b.feed(br#"{"index":1}],"model":"m","usage":{"prompt_tokens":4096,"total_tokens":4096}}"#);
        assert_eq!(b.finish().usage, u(4096, 0));
    }

    #[test]
    fn an_error_document_without_usage_is_told_apart() {
        let report = |body: &[u8]| {
            let mut b = BodyUsage::default();
            b.feed(body);
            b.finish()
        };
        let err =
            report(br#"{"error":{"message":"overloaded","type":"server_error","code":null}}"#);
        assert_eq!((err.usage, err.error), (None, true));
        assert!(report(br#"{"error":"quota"}"#).error);
        // Usage wins: the provider billed something.
        let billed = report(
            br#"{"error":{"message":"x"},"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        );
        assert_eq!((billed.usage, billed.error), (u(3, 1), false));
        // A result with an error member, a null error, no error, not JSON: not an error document.
        for body in [
            &br#"{"choices":[],"error":{"message":"partial"}}"#[..],
            br#"{"error":null}"#,
            br#"{"id":"x"}"#,
            b"<html>oops</html>",
        ] {
            assert!(!report(body).error, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_small_body_is_parsed_whole() {
        let mut b = BodyUsage::default();
        b.feed(br#"{"us\u0061ge":{"prompt_tokens":1,"#);
        b.feed(br#""completion_tokens":2}}"#);
        assert!(!b.scanning);
        assert_eq!(b.finish().usage, u(1, 2));
    }

    #[test]
    fn an_oversized_usage_value_is_no_usage() {
        let mut body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_USAGE_BYTES));
        body.extend(br#""}}"#);
        assert_eq!(scanned(&body, 4096), None);
    }
}
