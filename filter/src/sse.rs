//! Incremental Server-Sent-Events meter for streamed response bodies.
//!
//! Envoy hands the filter a response body in chunks that may split an event anywhere: inside
//! a multi-byte character, between `\r` and `\n`, in the middle of `data:`. The meter parses
//! the raw bytes per the SSE spec (WHATWG HTML, "event stream interpretation") without ever
//! assuming chunk or UTF-8 boundaries, remembers the last usage report and whether the stream
//! reached its terminal event, and, when the gateway itself asked the provider for usage,
//! removes the usage-only chunk so the client sees exactly the stream it asked for.
//!
//! Memory is bounded for any input: one pending event is held up to [`MAX_EVENT_BYTES`];
//! a longer one is given up on (its bytes are passed through unparsed) and parsing resumes at
//! the next event.

use crate::body_usage::BodyUsage;
use crate::event_head::{self, Choices, Kind, RESPONSES_TERMINAL};
use crate::usage::{self, Usage};

/// Largest event kept for parsing. Real usage/terminal events are a few KiB; Responses API
/// terminal events repeat the whole output, so leave generous room for long answers.
pub const MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;

/// What to send downstream in place of the chunk just fed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send the chunk unchanged.
    Passthrough,
    /// Send these bytes instead (possibly empty: everything was held back or removed).
    Replace(Vec<u8>),
}

/// What the client gets of one event.
enum Verdict {
    Keep,
    /// The usage-only chunk: removed when the gateway asked for usage.
    UsageChunk,
    /// The event with its top-level `usage` set to null.
    Rewrite(Vec<u8>),
}

/// `raw` with its data's JSON given `"usage": null`. One data line (borrowed from `raw`) is
/// spliced in place, byte for byte around the edit; several data lines (joined with LF in a copy)
/// are written back as data lines where the first stood (the edit keeps the JSON's line breaks,
/// which lie outside its strings). None when the data is not an object the edit can change: the
/// event is then passed on as it came.
fn null_usage(raw: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let edited = crate::json_edit::apply(
        data,
        &[crate::json_edit::Edit::Set {
            key: "usage",
            value_json: "null".into(),
        }],
    )
    .ok()?;
    let mut out = Vec::with_capacity(raw.len().saturating_add(edited.len()));
    let borrowed = (data.as_ptr() as usize)
        .checked_sub(raw.as_ptr() as usize)
        .and_then(|start| Some((start, start.checked_add(data.len())?)))
        .filter(|&(start, end)| {
            raw.get(start..end)
                .is_some_and(|d| d.as_ptr() == data.as_ptr())
        });
    if let Some((start, end)) = borrowed {
        out.extend_from_slice(raw.get(..start)?);
        out.extend_from_slice(&edited);
        out.extend_from_slice(raw.get(end..)?);
        return Some(out);
    }
    let mut lines = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (line, term, next) = split_line_keeping(rest);
        lines.push((line, term));
        rest = next;
    }
    // The data lines end as the first did, the last as the last did (unterminated at the end of
    // a body: then still unterminated).
    let is_data = |line: &[u8]| field(line).0 == b"data";
    let mut data_terms = lines.iter().filter(|(l, _)| is_data(l)).map(|&(_, t)| t);
    let first_term = data_terms.next().unwrap_or_default();
    let last_term = data_terms.next_back().unwrap_or(first_term);
    let between: &[u8] = if first_term.is_empty() {
        b"\n"
    } else {
        first_term
    };
    let mut data_written = false;
    for (line, term) in lines {
        if !is_data(line) {
            out.extend_from_slice(line);
            out.extend_from_slice(term);
        } else if !std::mem::replace(&mut data_written, true) {
            let mut parts = edited.split(|&b| b == b'\n').peekable();
            while let Some(part) = parts.next() {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(part);
                out.extend_from_slice(if parts.peek().is_some() {
                    between
                } else {
                    last_term
                });
            }
        }
    }
    Some(out)
}

/// A line's field name and value (`field: value`, one leading space dropped; a line with no
/// colon is a field with an empty value). Comment lines start with `:` (an empty field name).
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match find_either(line, b':', b':') {
        Some(colon) => {
            let (field, value) = line.split_at(colon);
            let value = value.get(1..).unwrap_or_default();
            (field, value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &b""[..]),
    }
}

/// Streaming SSE parser that meters usage and optionally strips the usage-only chunk.
#[derive(Debug)]
pub struct SseMeter {
    drop_usage_chunk: bool,
    /// Raw bytes of the current, not yet complete event (including comments and the lines
    /// parsed so far). Never longer than `MAX_EVENT_BYTES`.
    pending: Vec<u8>,
    /// The current event outgrew the bound: its bytes are no longer kept nor parsed.
    oversized: bool,
    /// Such an event's usage, read as its bytes pass (a Responses API terminal event repeats
    /// the whole output, and a tool's output in it can run to megabytes), and whether the event
    /// named itself a terminal one in the bytes that were held.
    oversized_scan: Option<BodyUsage>,
    oversized_terminal: bool,
    /// Bytes on the current line so far; zero at a terminator means a blank line, which ends
    /// the event.
    line_len: usize,
    /// The previous byte was a `\r` ending a non-blank line, so a following `\n` belongs to the
    /// same terminator rather than ending an (empty) line of its own.
    after_cr: bool,
    /// The previous byte was a `\r` ending an event; a following `\n` belongs to that event's
    /// terminator and shares its fate: `Some(true)` emitted, `Some(false)` removed.
    event_cr: Option<bool>,
    at_stream_start: bool,
    usage: Option<Usage>,
    /// The last usage came from an event that ends the stream's accounting (see
    /// [`SseMeter::usage_is_final`]).
    usage_final: bool,
    /// The last usage came once some but not all choices had finished: final if the stream
    /// then reaches `[DONE]` (a provider that answered fewer choices than asked).
    usage_final_at_done: bool,
    /// Choices the request asked for (`n`): usage on a chunk is final once all have finished.
    choices: u64,
    /// Indices of the choices that sent a finish reason.
    finished: Vec<u64>,
    /// Events that report an error, and events that carry anything else (`[DONE]` aside).
    error_events: u64,
    content_events: u64,
    saw_done: bool,
    bytes_seen: u64,
    events_seen: u64,
    oversized_events: u64,
    removed_events: u64,
}

impl SseMeter {
    /// `drop_usage_chunk`: the gateway injected `stream_options.include_usage` for metering although the
    /// client did not ask for it, so the usage-only chunk must be removed from what the client sees.
    pub fn new(drop_usage_chunk: bool) -> Self {
        SseMeter {
            drop_usage_chunk,
            pending: Vec::new(),
            oversized: false,
            oversized_scan: None,
            oversized_terminal: false,
            line_len: 0,
            after_cr: false,
            event_cr: None,
            at_stream_start: true,
            usage: None,
            usage_final: false,
            usage_final_at_done: false,
            choices: 1,
            finished: Vec::new(),
            error_events: 0,
            content_events: 0,
            saw_done: false,
            bytes_seen: 0,
            events_seen: 0,
            oversized_events: 0,
            removed_events: 0,
        }
    }

    /// The number of choices the request asked for (`n`; default 1).
    pub fn with_choices(mut self, choices: u64) -> Self {
        self.choices = choices.max(1);
        self
    }

    /// Feed the next body chunk. Returns what to send downstream in place of this chunk.
    ///
    /// Without `drop_usage_chunk` this is always [`Output::Passthrough`]: metering never delays
    /// bytes. With it, complete events are released as they complete (minus usage-only
    /// chat/completions chunks), a trailing partial event is held until it completes, and
    /// `end_of_stream` releases everything still held. `Passthrough` is also returned when the
    /// released bytes happen to equal the chunk, which spares the host a body rewrite.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Output {
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        self.bytes_seen = self.bytes_seen.saturating_add(len);

        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if let Some(kept) = self.event_cr.take() {
                if first == b'\n' {
                    if kept {
                        self.emit(&mut out, &[first]);
                    }
                    rest = tail;
                    continue;
                }
            }
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    self.hold(&mut out, &[first]);
                    rest = tail;
                    continue;
                }
            }
            match find_either(rest, b'\n', b'\r') {
                None => {
                    self.line_len = self.line_len.saturating_add(rest.len());
                    self.hold(&mut out, rest);
                    rest = &[];
                }
                Some(pos) => {
                    let (line, from_term) = rest.split_at(pos);
                    let Some((&term, after)) = from_term.split_first() else {
                        break;
                    };
                    self.line_len = self.line_len.saturating_add(line.len());
                    self.hold(&mut out, line);
                    self.hold(&mut out, &[term]);
                    rest = after;
                    let blank = self.line_len == 0;
                    self.line_len = 0;
                    if blank {
                        let kept = self.finish_event(&mut out);
                        if term == b'\r' {
                            self.event_cr = Some(kept);
                        }
                    } else if term == b'\r' {
                        self.after_cr = true;
                    }
                }
            }
        }

        if end_of_stream {
            self.finish_stream(&mut out);
        }

        if !self.drop_usage_chunk || out.as_slice() == chunk {
            Output::Passthrough
        } else {
            Output::Replace(out)
        }
    }

    /// The last usage seen in any event.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the last usage is the stream's final count rather than a running one: it came in
    /// the usage-only chunk (no choices), once every choice asked for had sent its finish
    /// reason (on the finishing chunk, or after it as OpenRouter sends it), or in a Responses
    /// API terminal event; or once some choice had finished and the stream then reached
    /// `[DONE]`. Servers that report usage on every chunk (vLLM's `continuous_usage_stats`)
    /// send running counts before that, which undercount a cut stream, and a Responses event
    /// before the terminal one carries no final count.
    pub fn usage_is_final(&self) -> bool {
        self.usage.is_some() && self.usage_final
    }

    /// The stream reported errors and nothing else (vLLM's and OpenRouter's in-stream errors,
    /// sent with a success status): an upstream error, not an answer.
    pub fn only_errors(&self) -> bool {
        self.error_events > 0 && self.content_events == 0 && self.usage.is_none()
    }

    /// `data: [DONE]` seen, or a Responses API terminal event
    /// (`response.completed` / `response.incomplete` / `response.failed`).
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Total body bytes fed.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Events dispatched (those with at least one `data` field), including `[DONE]`.
    pub fn events_seen(&self) -> u64 {
        self.events_seen
    }

    /// Events too large to keep ([`MAX_EVENT_BYTES`]): passed on as they came, their usage
    /// read by a byte scanner (`body_usage`) as they passed.
    pub fn oversized_events(&self) -> u64 {
        self.oversized_events
    }

    /// Usage-only chunks removed from the downstream stream.
    pub fn removed_events(&self) -> u64 {
        self.removed_events
    }

    /// Bytes sent downstream directly (only tracked when rewriting the stream).
    fn emit(&self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.drop_usage_chunk {
            out.extend_from_slice(bytes);
        }
    }

    /// Bytes belonging to the current event: kept until it completes, unless it is oversized.
    fn hold(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if !self.oversized && self.pending.len().saturating_add(bytes.len()) > MAX_EVENT_BYTES {
            self.oversized = true;
            let held = std::mem::take(&mut self.pending);
            self.oversized_terminal = event_names_terminal(&held);
            self.scan_oversized(&held);
            self.emit(out, &held);
        }
        if self.oversized {
            self.scan_oversized(bytes);
            self.emit(out, bytes);
        } else {
            self.pending.extend_from_slice(bytes);
        }
    }

    /// A blank line ended the current event. Returns whether its bytes went downstream.
    fn finish_event(&mut self, out: &mut Vec<u8>) -> bool {
        if self.oversized {
            self.oversized = false;
            self.finish_oversized();
            self.at_stream_start = false;
            return true;
        }
        let event = std::mem::take(&mut self.pending);
        let kept = self.pass_event(out, &event);
        // Reuse the allocation for the next event.
        self.pending = event;
        self.pending.clear();
        kept
    }

    /// Feeds an oversized event's bytes to its usage scanner, which starts at the data's first
    /// brace (a field name or an `event:` line holds none; one data line is the usual case,
    /// several would only hide the usage).
    fn scan_oversized(&mut self, bytes: &[u8]) {
        let bytes = match self.oversized_scan {
            Some(_) => bytes,
            None => {
                let Some(at) = bytes.iter().position(|&b| b == b'{') else {
                    return;
                };
                let json = bytes.get(at..).unwrap_or_default();
                // Its `type` comes first in a Responses event.
                self.oversized_terminal |= marks(json.get(..4096).unwrap_or(json)).terminal;
                self.oversized_scan = Some(BodyUsage::scanning());
                json
            }
        };
        if let Some(scan) = self.oversized_scan.as_mut() {
            scan.feed(bytes);
        }
    }

    /// An event too large to keep has ended: its usage, if its bytes held one, is metered.
    fn finish_oversized(&mut self) {
        self.oversized_events = self.oversized_events.saturating_add(1);
        self.content_events = self.content_events.saturating_add(1);
        let usage = self.oversized_scan.take().and_then(|s| s.finish().usage);
        if let Some(u) = usage {
            self.usage = Some(u);
            self.usage_final = self.oversized_terminal;
            self.usage_final_at_done = false;
        }
        if self.oversized_terminal {
            self.saw_done = true;
        }
    }

    /// Meters one event and passes on what the client gets of it: whether it got anything.
    fn pass_event(&mut self, out: &mut Vec<u8>, event: &[u8]) -> bool {
        match self.process_event(event) {
            Verdict::UsageChunk if self.drop_usage_chunk => {
                self.removed_events = self.removed_events.saturating_add(1);
                false
            }
            Verdict::Rewrite(bytes) => {
                self.emit(out, &bytes);
                true
            }
            Verdict::Keep | Verdict::UsageChunk => {
                self.emit(out, event);
                true
            }
        }
    }

    /// End of the body: an unterminated final event is metered and passed on like any other
    /// (the usage chunk the gateway asked for is removed even without its blank line).
    fn finish_stream(&mut self, out: &mut Vec<u8>) {
        if self.oversized {
            self.finish_oversized();
        } else if !self.pending.is_empty() {
            let event = std::mem::take(&mut self.pending);
            self.pass_event(out, &event);
        }
        self.pending = Vec::new();
        self.oversized = false;
        self.line_len = 0;
        self.after_cr = false;
        self.event_cr = None;
    }

    /// Interprets one event's raw bytes: meters it, and tells what the client gets of it.
    fn process_event(&mut self, raw: &[u8]) -> Verdict {
        let whole = raw;
        let mut raw = raw;
        if std::mem::replace(&mut self.at_stream_start, false) {
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }

        // One data line (the usual case) is borrowed; several are joined.
        let mut data: Option<std::borrow::Cow<[u8]>> = None;
        let mut event_name: &[u8] = b"";
        let mut rest = raw;
        while !rest.is_empty() {
            let (line, next) = split_line(rest);
            rest = next;
            if line.is_empty() || line.first() == Some(&b':') {
                continue;
            }
            let (name, value) = field(line);
            match name {
                b"data" => match data.as_mut() {
                    // The spec joins data lines with LF.
                    Some(buf) => {
                        let buf = buf.to_mut();
                        buf.push(b'\n');
                        buf.extend_from_slice(value);
                    }
                    None => data = Some(std::borrow::Cow::Borrowed(value)),
                },
                b"event" => event_name = value,
                _ => {}
            }
        }

        let Some(data) = data else {
            return Verdict::Keep;
        };
        self.events_seen = self.events_seen.saturating_add(1);

        if data.trim_ascii() == b"[DONE]" {
            self.saw_done = true;
            if self.usage_final_at_done {
                self.usage_final = true;
            }
            return Verdict::Keep;
        }
        if RESPONSES_TERMINAL
            .iter()
            .any(|t| t.as_bytes() == event_name)
        {
            self.saw_done = true;
        }

        // Most events are content deltas: parse only those that can carry a usage object, a
        // finish reason or an error, or end a Responses stream (a stream's events are metered
        // one by one on the worker thread).
        let marks = marks(&data);
        let head = if marks.any() {
            event_head::read(&data)
        } else {
            None
        };
        let Some(head) = head else {
            self.content_events = self.content_events.saturating_add(1);
            return Verdict::Keep;
        };
        if head.kind == Kind::ResponsesTerminal {
            self.saw_done = true;
        }
        let error = head.is_error();
        if error {
            self.error_events = self.error_events.saturating_add(1);
        } else {
            self.content_events = self.content_events.saturating_add(1);
        }
        if let Choices::Listed(list) = &head.choices {
            for (position, c) in list.iter().enumerate() {
                let index = c.index.unwrap_or(position as u64);
                if c.finished && !self.finished.contains(&index) {
                    self.finished.push(index);
                }
            }
        }
        if marks.usage {
            if let Some(u) = usage::from_json_body(&data) {
                self.usage = Some(u);
                let all_finished = self.finished.len() as u64 >= self.choices;
                self.usage_final = match head.kind {
                    Kind::ResponsesTerminal => true,
                    Kind::Responses => false,
                    Kind::Chunk | Kind::Error => head.choices.none() || all_finished,
                };
                self.usage_final_at_done = head.kind == Kind::Chunk && !self.finished.is_empty();
            }
        }
        match (head.usage, head.choices.none()) {
            (false, _) => Verdict::Keep,
            // The usage-only chunk; one that also reports an error is the client's to see, so
            // only its usage goes.
            (true, true) if !error => Verdict::UsageChunk,
            // A usage object on a content chunk (servers that report usage on every chunk, or
            // on the finishing one) exists only because the gateway asked for it: the client
            // gets `"usage": null` there, as on every other chunk of such a stream.
            (true, _) if self.drop_usage_chunk => {
                null_usage(whole, &data).map_or(Verdict::Keep, Verdict::Rewrite)
            }
            (true, _) => Verdict::Keep,
        }
    }

    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.pending.len()
    }
}

/// The first byte of a body that is not whitespace or a byte-order mark: `{` or `[` starts a
/// JSON document, anything else (`data:`, `event:`, `:`) an event stream. `None` while only
/// whitespace has arrived.
pub fn first_significant_byte(chunk: &[u8]) -> Option<u8> {
    let chunk = chunk.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(chunk);
    chunk.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// Splits off the first line; the terminator (`\r\n`, `\n` or `\r`) belongs to neither part.
fn split_line(buf: &[u8]) -> (&[u8], &[u8]) {
    let (line, _, rest) = split_line_keeping(buf);
    (line, rest)
}

/// [`split_line`], with the terminator (empty on an unterminated last line).
fn split_line_keeping(buf: &[u8]) -> (&[u8], &[u8], &[u8]) {
    match find_either(buf, b'\n', b'\r') {
        None => (buf, &[], &[]),
        Some(pos) => {
            let (line, from_term) = buf.split_at(pos);
            let len = if from_term.starts_with(b"\r\n") { 2 } else { 1 };
            let (term, rest) = from_term.split_at(len.min(from_term.len()));
            (line, term, rest)
        }
    }
}

/// The index of the first byte equal to `a` or `b`, eight bytes at a time (Wasm has no
/// vectorised memchr; every byte of a stream is scanned on the worker thread).
fn find_either(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let (va, vb) = (LO * u64::from(a), LO * u64::from(b));
    let mut words = hay.chunks_exact(8);
    let mut base = 0;
    for w in &mut words {
        let Ok(w) = <[u8; 8]>::try_from(w) else {
            break;
        };
        let w = u64::from_le_bytes(w);
        let (x, y) = (w ^ va, w ^ vb);
        // A zero byte in x or y is a match; the lowest flagged byte is always a true one.
        let z = ((x.wrapping_sub(LO) & !x) | (y.wrapping_sub(LO) & !y)) & HI;
        if z != 0 {
            return Some(base + (z.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&c| c == a || c == b)
        .map(|p| base + p)
}

/// Whether the held start of an event names a Responses terminal event: in an `event:` line,
/// or as a quoted name in the data.
fn event_names_terminal(held: &[u8]) -> bool {
    let mut rest = held;
    while !rest.is_empty() {
        let (line, next) = split_line(rest);
        rest = next;
        let (name, value) = field(line);
        if name == b"event" && RESPONSES_TERMINAL.iter().any(|t| t.as_bytes() == value) {
            return true;
        }
    }
    marks(held).terminal
}

/// What an event's data may hold that the meter acts on, found without parsing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Marks {
    /// Some `"usage"` key followed by an object (`"usage": null`, which providers put on every
    /// chunk once usage is asked for, carries nothing).
    usage: bool,
    /// Some `"finish_reason"` followed by a string that is not empty.
    finish: bool,
    /// `"error"`, as a key or a value.
    error: bool,
    /// A Responses API terminal event's name (`"response.completed"`, …).
    terminal: bool,
}

impl Marks {
    fn any(self) -> bool {
        self.usage || self.finish || self.error || self.terminal
    }
}

/// Looks once at what follows each `"` of the data (JSON is short strings between quotes, so
/// this is a single pass; a mark inside a string, where its quotes are escaped, is not one).
/// A mark may be a false alarm (an escaped key in a value is still a key here): the event is
/// then parsed for nothing.
fn marks(data: &[u8]) -> Marks {
    /// What follows `"key"`: optional spaces, a colon, optional spaces.
    fn value_after<'a>(rest: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
        let after = rest.strip_prefix(key)?.trim_ascii_start();
        Some(after.strip_prefix(b":")?.trim_ascii_start())
    }
    let mut m = Marks::default();
    let mut from = 0;
    while let Some(at) = data.get(from..).and_then(|d| find_either(d, b'"', b'"')) {
        let rest = data.get(from + at + 1..).unwrap_or_default();
        match rest.first() {
            Some(b'u') => {
                m.usage |= value_after(rest, b"usage\"").is_some_and(|v| v.first() == Some(&b'{'));
            }
            Some(b'f') => {
                m.finish |= value_after(rest, b"finish_reason\"")
                    .is_some_and(|v| v.first() == Some(&b'"') && v.get(1) != Some(&b'"'));
            }
            Some(b'e') => m.error |= rest.starts_with(b"error\""),
            Some(b'r') => {
                m.terminal |= rest.strip_prefix(b"response.").is_some_and(|name| {
                    RESPONSES_TERMINAL
                        .iter()
                        .filter_map(|t| t.as_bytes().get(b"response.".len()..))
                        .any(|t| name.starts_with(t) && name.get(t.len()) == Some(&b'"'))
                });
            }
            _ => {}
        }
        from += at + 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_with_something_to_meter_are_parsed() {
        let usage = |d: &[u8]| marks(d).usage;
        assert!(usage(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
        assert!(usage(br#"{"usage" : {"a":1}}"#));
        assert!(usage(
            br#"{"usage":null,"x_groq":{"usage":{"prompt_tokens":1}}}"#
        ));
        assert!(!usage(
            br#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#
        ));
        assert!(!usage(br#"{"choices":[{"delta":{"content":"usage"}}]}"#));
        assert!(!usage(b"\"usage\""));

        let finish = |d: &[u8]| marks(d).finish;
        assert!(finish(br#"{"choices":[{"finish_reason":"stop"}]}"#));
        assert!(finish(br#"{"choices":[{"finish_reason" :  "length"}]}"#));
        assert!(!finish(br#"{"choices":[{"finish_reason":null}]}"#));
        assert!(!finish(br#"{"choices":[{"finish_reason":""}]}"#));
        assert!(!finish(
            br#"{"choices":[{"delta":{"content":"\"finish_reason\":\"stop\""}}]}"#
        ));

        let error = |d: &[u8]| marks(d).error;
        assert!(error(br#"{"error":{"message":"x"}}"#));
        assert!(error(br#"{"type":"error"}"#));
        assert!(!error(br#"{"choices":[{"delta":{"content":"an error"}}]}"#));
        assert!(!error(br#"{"content":"\"error\""}"#));

        let terminal = |d: &[u8]| marks(d).terminal;
        assert!(terminal(br#"{"type":"response.completed"}"#));
        assert!(terminal(br#"{"a":"response.x","type":"response.failed"}"#));
        assert!(!terminal(br#"{"type":"response.output_text.delta"}"#));
        assert!(!terminal(br#"{"type":"response.completed_x"}"#));
        assert!(!terminal(b"\"response."));

        assert!(!marks(br#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}"#).any());
    }

    #[test]
    fn find_either_agrees_with_a_plain_scan() {
        let mut x: u64 = 1;
        for len in 0..70 {
            for _ in 0..200 {
                let hay: Vec<u8> = (0..len)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        [b'a', b'\n', b'\r', 0x80, 0xff, 0x00, b'"', 0x0a ^ 0x80]
                            [(x >> 61) as usize]
                    })
                    .collect();
                for (a, b) in [(b'\n', b'\r'), (b'"', b'"'), (0x80, 0xff), (0, 0)] {
                    let want = hay.iter().position(|&c| c == a || c == b);
                    assert_eq!(find_either(&hay, a, b), want, "{hay:?} {a} {b}");
                }
            }
        }
    }

    const USAGE_ONLY: &[u8] =
        br#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;

    fn usage(input: u64, output: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        })
    }

    /// Feeds every chunk (end_of_stream on the last) and returns what went downstream.
    fn run(meter: &mut SseMeter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.iter().enumerate() {
            match meter.feed(chunk, i == last) {
                Output::Passthrough => out.extend_from_slice(chunk),
                Output::Replace(bytes) => out.extend_from_slice(&bytes),
            }
        }
        out
    }

    fn event(data: &[u8], term: &[u8]) -> Vec<u8> {
        let mut e = b"data: ".to_vec();
        e.extend_from_slice(data);
        e.extend_from_slice(term);
        e.extend_from_slice(term);
        e
    }

    #[test]
    fn usage_the_gateway_asked_for_is_nulled_on_content_chunks_and_kept_when_the_client_asked() {
        // vLLM's continuous usage stats (or a final chunk carrying choices and usage): with the
        // gateway's include_usage, the client sees `"usage":null` there, byte for byte otherwise.
        let content = event(
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4},"x":1}"#,
            b"\r\n",
        );
        let mut m = SseMeter::new(true);
        let out = run(
            &mut m,
            &[
                &content,
                &event(USAGE_ONLY, b"\r\n"),
                &event(b"[DONE]", b"\r\n"),
            ],
        );
        let mut want = event(
            br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":null,"x":1}"#,
            b"\r\n",
        );
        want.extend(event(b"[DONE]", b"\r\n"));
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&want)
        );
        assert_eq!((m.usage(), m.removed_events()), (usage(3, 4), 1));
        // Split at every byte: the same.
        for cut in 1..content.len() {
            let mut m = SseMeter::new(true);
            let (a, b) = content.split_at(cut);
            let out = run(&mut m, &[a, b, &event(b"[DONE]", b"\r\n")]);
            assert_eq!(out, want, "cut at {cut}");
        }
        // The client asked for usage: untouched.
        let mut m = SseMeter::new(false);
        assert_eq!(run(&mut m, &[&content]), content);
        // Several data lines (joined in a copy) are written back as data lines, usage nulled;
        // other fields and comments stay where they were (found by a probe: the usage passed).
        let multi = b"event: x\r\ndata: {\"choices\":[{\"delta\":{}}],\r\n: note\r\ndata:\"usage\":{\"prompt_tokens\":1}}\r\n\r\n";
        // Unterminated at the end of the body: the lines still apart, the end as it came.
        let tail = b"data: {\"choices\":[{}],\ndata: \"usage\":{\"prompt_tokens\":2},\"x\":1}";
        for (input, want, input_tokens) in [
            (
                &multi[..],
                "event: x\r\ndata: {\"choices\":[{\"delta\":{}}],\r\ndata: \"usage\":null}\r\n: note\r\n\r\n",
                1,
            ),
            (
                &tail[..],
                "data: {\"choices\":[{}],\ndata: \"usage\":null,\"x\":1}",
                2,
            ),
        ] {
            let mut m = SseMeter::new(true);
            assert_eq!(String::from_utf8_lossy(&run(&mut m, &[input])), want);
            let want = usage(input_tokens, 0).map(|u| Usage {
                output_missing: true,
                ..u
            });
            assert_eq!(m.usage(), want);
        }
        let mut m = SseMeter::new(false);
        assert_eq!(run(&mut m, &[multi]), multi.to_vec());
    }

    #[test]
    fn running_usage_is_not_final_until_the_choices_finish() {
        // vLLM with continuous_usage_stats: a running count on every content chunk.
        let running = |n: u32, finish: &str| {
            event(
                format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"w"}},"finish_reason":{finish}}}],"usage":{{"prompt_tokens":3,"completion_tokens":{n}}}}}"#).as_bytes(),
                b"\n",
            )
        };
        let mut m = SseMeter::new(false);
        run(&mut m, &[&running(1, "null"), &running(2, "null")]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 2), false));
        run(&mut m, &[&running(3, "\"stop\"")]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 3), true));

        // The usage-only chunk and a Responses terminal event are final; no usage is not.
        let mut m = SseMeter::new(false);
        assert!(!m.usage_is_final());
        run(&mut m, &[&event(USAGE_ONLY, b"\n")]);
        assert!(m.usage_is_final());
        let mut m = SseMeter::new(false);
        run(&mut m, &[&event(br#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}}"#, b"\n")]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 4), true));
    }

    /// Feeds the events one by one, the stream ending with the last; returns the meter.
    fn metered(choices: u64, drop: bool, events: &[&[u8]]) -> (SseMeter, Vec<u8>) {
        let mut m = SseMeter::new(drop).with_choices(choices);
        let chunks: Vec<Vec<u8>> = events.iter().map(|e| event(e, b"\n")).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let out = run(&mut m, &refs);
        (m, out)
    }

    #[test]
    fn usage_after_every_choice_finished_is_final() {
        // OpenRouter: the finishing chunk, then the usage on a chunk whose one choice has an
        // empty delta and no finish reason, then [DONE]. Charged as an estimate before (an
        // overcharge on every OpenRouter stream).
        let finish = br#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#;
        let usage_chunk = br#"{"choices":[{"index":0,"delta":{},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":6}}"#;
        let (m, _) = metered(1, false, &[finish, usage_chunk]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(5, 6), true));
        // n=2 with usage on every chunk: one choice finishing is not the end, the other still
        // generates (final before: a cut stream charged its running count as exact).
        let running = |index: u32, finish: &str, out: u32| {
            format!(
                r#"{{"choices":[{{"index":{index},"delta":{{"content":"w"}},"finish_reason":{finish}}}],"usage":{{"prompt_tokens":3,"completion_tokens":{out}}}}}"#
            )
        };
        let (a, b, c) = (
            running(0, "\"stop\"", 5),
            running(1, "null", 6),
            running(1, "\"length\"", 7),
        );
        let (m, _) = metered(2, false, &[a.as_bytes(), b.as_bytes()]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 6), false));
        let (m, _) = metered(2, false, &[a.as_bytes(), b.as_bytes(), c.as_bytes()]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 7), true));
        // A provider that answered fewer choices than asked: final once it reaches [DONE].
        let (m, _) = metered(2, false, &[a.as_bytes()]);
        assert!(!m.usage_is_final());
        let (m, _) = metered(2, false, &[a.as_bytes(), b"[DONE]"]);
        assert!(m.usage_is_final());
        // An empty finish reason (old Ollama, on every chunk) is no finish, even at [DONE].
        let empty = br#"{"choices":[{"index":0,"delta":{"content":"w"},"finish_reason":""}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let (m, _) = metered(1, false, &[empty, b"[DONE]"]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 2), false));
    }

    #[test]
    fn a_responses_event_before_the_terminal_one_carries_no_final_usage() {
        let created = br#"{"type":"response.created","response":{"usage":{"input_tokens":0,"output_tokens":0}}}"#;
        let delta = br#"{"type":"response.output_text.delta","delta":"x"}"#;
        let (m, _) = metered(1, false, &[created, delta]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(0, 0), false));
        let done = br#"{"type":"response.incomplete","response":{"usage":{"input_tokens":4,"output_tokens":9}}}"#;
        let (m, _) = metered(1, false, &[created, delta, done]);
        assert_eq!(
            (m.usage(), m.usage_is_final(), m.saw_done()),
            (usage(4, 9), true, true)
        );
    }

    #[test]
    fn a_split_character_in_the_text_does_not_hide_the_usage() {
        // Gemini-style: usage on the last content chunk, whose text is half an emoji escaped
        // (a lone surrogate) or a raw invalid byte: serde_json refuses both, and the usage went
        // unread (an estimate, and the usage the gateway asked for reached the client).
        let lone = br#"{"choices":[{"index":0,"delta":{"content":"\ud83d"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7}}"#.to_vec();
        let raw = b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7}}".to_vec();
        for data in [lone, raw] {
            let (m, out) = metered(1, true, &[&data, b"[DONE]"]);
            assert_eq!((m.usage(), m.usage_is_final()), (usage(11, 7), true));
            let nulled = String::from_utf8_lossy(&out).into_owned();
            assert!(nulled.contains(r#""usage":null"#), "{nulled}");
            assert!(!nulled.contains("prompt_tokens"), "{nulled}");
        }
    }

    #[test]
    fn an_error_report_reaches_the_client_and_an_error_only_stream_is_an_error() {
        // OpenRouter's in-stream error, with usage: it was removed as the usage chunk, and a
        // failed request looked like an empty success.
        let err = br#"{"choices":[],"error":{"code":502,"message":"upstream failed"},"usage":{"prompt_tokens":5,"completion_tokens":0}}"#;
        let (m, out) = metered(1, true, &[err, b"[DONE]"]);
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(
            out.contains("upstream failed") && out.contains(r#""usage":null"#),
            "{out}"
        );
        assert_eq!(m.removed_events(), 0);
        assert_eq!(m.usage(), usage(5, 0));
        let (_, out) = metered(1, false, &[err]);
        assert_eq!(out, event(err, b"\n"));
        // vLLM's in-stream error and no tokens: an upstream error, released like an error body.
        let (m, _) = metered(
            1,
            true,
            &[br#"{"error":{"message":"boom","code":500}}"#, b"[DONE]"],
        );
        assert!(m.only_errors() && m.usage().is_none());
        let (m, _) = metered(
            1,
            false,
            &[br#"{"type":"error","code":"server_error","message":"m"}"#],
        );
        assert!(m.only_errors());
        // After content it is a cut stream (tokens were generated), not an error.
        let content = br#"{"choices":[{"index":0,"delta":{"content":"w"},"finish_reason":null}]}"#;
        let (m, _) = metered(1, false, &[content, br#"{"error":{"message":"boom"}}"#]);
        assert!(!m.only_errors());
        let (m, _) = metered(1, false, &[content]);
        assert!(!m.only_errors());
    }

    #[test]
    fn a_usage_chunk_without_choices_is_the_usage_chunk_too() {
        let content = event(
            br#"{"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
            b"\n",
        );
        let no_key = event(
            br#"{"id":"c","usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            b"\n",
        );
        let done = event(b"[DONE]", b"\n");
        let stream = [content.as_slice(), no_key.as_slice(), done.as_slice()];
        let mut m = SseMeter::new(true);
        assert_eq!(
            run(&mut m, &stream),
            [content.clone(), done.clone()].concat()
        );
        assert_eq!((m.usage(), m.removed_events()), (usage(3, 4), 1));
        // Content next to the usage stays, whatever the shape (the usage the client did not
        // ask for reads as null there).
        let both = event(br#"{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#, b"\n");
        let mut m = SseMeter::new(true);
        assert_eq!(
            run(&mut m, &[both.as_slice()]),
            event(
                br#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#,
                b"\n"
            )
        );
        assert_eq!((m.usage(), m.removed_events()), (usage(3, 4), 0));
    }

    #[test]
    fn the_first_significant_byte_tells_json_from_events() {
        assert_eq!(first_significant_byte(b""), None);
        assert_eq!(first_significant_byte(b" \r\n\t"), None);
        assert_eq!(
            first_significant_byte(b"\xEF\xBB\xBF\n{\"a\":1}"),
            Some(b'{')
        );
        assert_eq!(first_significant_byte(b"  [1]"), Some(b'['));
        assert_eq!(first_significant_byte(b"data: {}\n\n"), Some(b'd'));
        assert_eq!(first_significant_byte(b": ping\n\n"), Some(b':'));
    }

    #[test]
    fn cr_only_line_endings() {
        let mut input = event(br#"{"choices":[{"delta":{"content":"a"}}]}"#, b"\r");
        let kept = input.clone();
        input.extend(event(USAGE_ONLY, b"\r"));
        input.extend_from_slice(b"data: [DONE]\r\r");
        let mut expected = kept;
        expected.extend_from_slice(b"data: [DONE]\r\r");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let mut m = SseMeter::new(true);
            assert_eq!(run(&mut m, &[a, b]), expected, "split at {at}");
            assert_eq!(m.usage(), usage(3, 4));
            assert!(m.saw_done());
            assert_eq!(m.events_seen(), 3);
        }
    }

    #[test]
    fn removed_event_takes_its_whole_crlf_terminator() {
        let mut input = event(USAGE_ONLY, b"\r\n");
        input.extend(event(b"[DONE]", b"\r\n"));
        let expected = event(b"[DONE]", b"\r\n");
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let mut m = SseMeter::new(true);
            assert_eq!(run(&mut m, &[a, b]), expected, "split at {at}");
            assert_eq!(m.removed_events(), 1);
        }
    }

    #[test]
    fn unterminated_final_event_is_parsed_and_passed_on_like_any_other() {
        // Found by a probe: the usage chunk the gateway asked for, with no blank line (or only
        // one newline) before the end of the body, reached the client.
        let content = event(br#"{"choices":[{"delta":{"content":"x"}}]}"#, b"\n");
        for tail in [&b""[..], b"\n", b"\r\n"] {
            let mut input = content.clone();
            input.extend_from_slice(b"data: ");
            input.extend_from_slice(USAGE_ONLY);
            input.extend_from_slice(tail);
            for drop in [false, true] {
                for at in 0..=input.len() {
                    let (a, b) = input.split_at(at);
                    let mut m = SseMeter::new(drop);
                    let want = if drop { &content } else { &input };
                    assert_eq!(&run(&mut m, &[a, b]), want, "split at {at}, drop {drop}");
                    assert_eq!(m.usage(), usage(3, 4));
                    assert_eq!(m.removed_events(), u64::from(drop));
                    assert!(!m.saw_done());
                }
            }
        }
        let mut m = SseMeter::new(false);
        run(&mut m, &[b"data: [DONE]\n"]);
        assert!(m.saw_done());
    }

    #[test]
    fn held_bytes_wait_for_the_event_to_complete() {
        let mut m = SseMeter::new(true);
        assert_eq!(
            m.feed(b"data: {\"a\":1}\n", false),
            Output::Replace(Vec::new())
        );
        assert_eq!(
            m.feed(b"\ndata: [DO", false),
            Output::Replace(b"data: {\"a\":1}\n\n".to_vec())
        );
        assert_eq!(
            m.feed(b"NE]\n\n", false),
            Output::Replace(b"data: [DONE]\n\n".to_vec())
        );
        // Aligned chunks need no rewrite.
        assert_eq!(m.feed(b": ping\n\n", false), Output::Passthrough);
        assert_eq!(m.feed(b"", true), Output::Passthrough);
        assert!(m.saw_done());
    }

    #[test]
    fn metering_only_never_replaces() {
        let mut m = SseMeter::new(false);
        let chunks = [
            &b"data: {\"a\""[..],
            b":1}\n",
            b"\n",
            b"data: ",
            USAGE_ONLY,
            b"\n\n",
        ];
        for chunk in chunks {
            assert_eq!(m.feed(chunk, false), Output::Passthrough);
        }
        assert_eq!(m.feed(b"", true), Output::Passthrough);
        assert_eq!(m.usage(), usage(3, 4));
        assert_eq!(m.removed_events(), 0);
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        assert_eq!(m.bytes_seen(), total as u64);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        let input = b"data: {\"choices\":[],\n\
                      data:\"usage\":{\"prompt_tokens\":1,\n\
                      data: \"completion_tokens\":2}}\n\n";
        let mut m = SseMeter::new(true);
        assert_eq!(run(&mut m, &[input]), b"");
        assert_eq!(m.usage(), usage(1, 2));
        assert_eq!(m.events_seen(), 1);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        let input = b"event: ping\n\n: comment\n\nid: 7\nretry: 1000\n\n\n\n";
        let mut m = SseMeter::new(true);
        assert_eq!(run(&mut m, &[input]), input);
        assert_eq!(m.events_seen(), 0);
        assert!(!m.saw_done());
    }

    #[test]
    fn field_without_colon_and_space_variants() {
        // `data` alone is a data field with an empty value; `data:x` needs no space.
        let input = b"data\ndata:[DONE]\n\ndata:[DONE]\n\n";
        let mut m = SseMeter::new(false);
        run(&mut m, &[input]);
        assert_eq!(m.events_seen(), 2);
        assert!(m.saw_done());
    }

    #[test]
    fn responses_terminal_events_mark_done() {
        for name in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let by_type =
                format!("data: {{\"type\":\"{name}\",\"response\":{{\"usage\":null}}}}\n\n");
            let mut m = SseMeter::new(false);
            run(&mut m, &[by_type.as_bytes()]);
            assert!(m.saw_done(), "{name} by type");
            let by_event = format!("event: {name}\ndata: {{}}\n\n");
            let mut m = SseMeter::new(false);
            run(&mut m, &[by_event.as_bytes()]);
            assert!(m.saw_done(), "{name} by event name");
        }
        let mut m = SseMeter::new(false);
        run(&mut m, &[b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\"}\n\n"]);
        assert!(!m.saw_done());
    }

    #[test]
    fn last_usage_wins() {
        let mut input = event(
            br#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            b"\n",
        );
        input.extend(event(USAGE_ONLY, b"\n"));
        let mut m = SseMeter::new(true);
        let out = run(&mut m, &[&input]);
        assert_eq!(m.usage(), usage(3, 4));
        // Only the chunk with empty choices is usage-only; the other reached the client, its
        // usage (asked for by the gateway) as null.
        assert_eq!(
            out,
            event(br#"{"choices":[{"delta":{}}],"usage":null}"#, b"\n")
        );
    }

    #[test]
    fn leading_bom_is_ignored() {
        let mut input = b"\xEF\xBB\xBF".to_vec();
        input.extend(event(USAGE_ONLY, b"\n"));
        let mut m = SseMeter::new(false);
        run(&mut m, &[&input]);
        assert_eq!(m.usage(), usage(3, 4));
    }

    #[test]
    fn oversized_event_is_passed_through_and_memory_stays_bounded() {
        let mut big = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9},\"pad\":\"".to_vec();
        big.resize(MAX_EVENT_BYTES + 4096, b'x');
        big.extend_from_slice(b"\"}\n\n");
        let mut input = big;
        input.extend(event(USAGE_ONLY, b"\n"));
        input.extend(event(b"[DONE]", b"\n"));
        let mut expected = input.clone();
        expected
            .truncate(input.len() - event(USAGE_ONLY, b"\n").len() - event(b"[DONE]", b"\n").len());
        expected.extend(event(b"[DONE]", b"\n"));

        for drop in [false, true] {
            let mut m = SseMeter::new(drop);
            let mut out = Vec::new();
            for chunk in input.chunks(64 * 1024) {
                match m.feed(chunk, false) {
                    Output::Passthrough => out.extend_from_slice(chunk),
                    Output::Replace(bytes) => out.extend_from_slice(&bytes),
                }
                assert!(m.held_bytes() <= MAX_EVENT_BYTES);
            }
            if let Output::Replace(bytes) = m.feed(b"", true) {
                out.extend_from_slice(&bytes);
            }
            assert_eq!(m.oversized_events(), 1);
            assert_eq!(
                m.usage(),
                usage(3, 4),
                "parsing resumed after the big event"
            );
            assert!(m.saw_done());
            assert_eq!(&out, if drop { &expected } else { &input });
        }
    }

    #[test]
    fn a_terminal_event_too_large_to_keep_still_reports_its_usage() {
        // `response.completed` repeats the whole output: a tool's 3 MB result in it lost the
        // usage (charged the input bound and the whole cap).
        let mut big = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"mcp_call\",\"output\":\"".to_vec();
        big.resize(3 * MAX_EVENT_BYTES / 2, b'x');
        big.extend_from_slice(br#""}],"usage":{"input_tokens":120,"output_tokens":45}}}"#);
        big.extend_from_slice(b"\n\n");
        for chunk_size in [1 << 10, 64 << 10, big.len()] {
            let mut m = SseMeter::new(false);
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = big.chunks(chunk_size).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                if let Output::Replace(b) = m.feed(chunk, i + 1 == chunks.len()) {
                    out.extend(b);
                } else {
                    out.extend_from_slice(chunk);
                }
                assert!(m.held_bytes() <= MAX_EVENT_BYTES);
            }
            assert_eq!(out, big);
            assert_eq!(m.oversized_events(), 1);
            assert_eq!(
                (m.usage(), m.usage_is_final(), m.saw_done()),
                (usage(120, 45), true, true),
                "chunks of {chunk_size}"
            );
        }
        // An oversized event that is not terminal (a chat chunk) gives a running count only.
        let mut chat = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
        chat.resize(MAX_EVENT_BYTES + 10, b'y');
        chat.extend_from_slice(br#""}}],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#);
        chat.extend_from_slice(b"\n\n");
        let mut m = SseMeter::new(false);
        run(&mut m, &[&chat]);
        assert_eq!((m.usage(), m.usage_is_final()), (usage(3, 9), false));
    }

    #[test]
    fn endless_line_without_terminator_stays_bounded() {
        let mut m = SseMeter::new(true);
        let chunk = vec![b'a'; 1024 * 1024];
        let mut emitted = 0usize;
        for _ in 0..5 {
            if let Output::Replace(bytes) = m.feed(&chunk, false) {
                emitted += bytes.len();
            } else {
                emitted += chunk.len();
            }
            assert!(m.held_bytes() <= MAX_EVENT_BYTES);
        }
        assert!(emitted >= 3 * 1024 * 1024);
        assert_eq!(m.bytes_seen(), 5 * 1024 * 1024);
    }

    #[test]
    fn garbage_never_panics_and_passes_through() {
        let alphabet: &[&[u8]] = &[
            b"data:",
            b"data: ",
            b"event: ",
            b":",
            b"\r",
            b"\n",
            b"\r\n",
            b"[DONE]",
            b"{",
            b"}",
            b"\"usage\":",
            b"null",
            b"{\"prompt_tokens\":1}",
            b"\xff",
            b"\xe6\x97",
            b"x",
            b" ",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                let piece = alphabet.get((next() % alphabet.len() as u64) as usize);
                input.extend_from_slice(piece.copied().unwrap_or_default());
            }
            let mut chunks = Vec::new();
            let mut rest = input.as_slice();
            while !rest.is_empty() {
                let (a, b) = rest.split_at(((next() % 7) as usize).min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            for drop in [false, true] {
                let mut m = SseMeter::new(drop);
                // Nothing here has `"choices":[]`, so nothing may be removed.
                assert_eq!(run(&mut m, &chunks), input);
                assert_eq!(m.bytes_seen(), input.len() as u64);
            }
        }
    }
}
