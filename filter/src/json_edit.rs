//! Byte-preserving edits of the top-level members of a JSON object request body.
//!
//! The gateway has to change a few fields (`model`, `max_tokens`, `stream_options`, ...) of a
//! client's request. Re-serialising the whole body would reorder keys, alter number
//! formatting and lose duplicates, so instead the top level is scanned for member spans and
//! only those spans are rewritten; every other byte reaches the provider untouched.
//!
//! The scanner checks structure (strings, nesting, commas, colons at the top level) but not
//! every detail of number or literal syntax: callers parse the body with serde_json first.

/// One top-level member of the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The decoded key.
    pub key: String,
    /// Index of the key's opening quote.
    pub start: usize,
    pub value_start: usize,
    /// Exclusive.
    pub value_end: usize,
    /// Exclusive end of the member; equal to `value_end`.
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditError {
    /// The body (after whitespace and an optional BOM) is not a JSON object.
    NotAnObject,
    /// Broken structure at (or shortly after) this byte offset.
    Malformed(usize),
}

/// One change to the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit<'a> {
    /// Replace the value of every member named `key`, or insert the member first if absent.
    /// `value_json` is inserted verbatim and must itself be valid JSON (e.g. produced by
    /// `serde_json::to_string`).
    Set { key: &'a str, value_json: String },
    /// Delete every member named `key`.
    Remove { key: &'a str },
}

/// Nesting deeper than this is rejected rather than walked; serde_json refuses 128 already.
const MAX_DEPTH: usize = 512;

struct Scan {
    /// Index of the opening `{`.
    open: usize,
    members: Vec<Member>,
    /// `commas[i]` is the index of the comma following member `i` (all but the last have one).
    commas: Vec<usize>,
}

/// The top-level members of the object in `body`, in order, duplicates included.
pub fn scan_members(body: &[u8]) -> Result<Vec<Member>, EditError> {
    scan(body).map(|s| s.members)
}

/// Apply edits in order: Set replaces the value span of every member with that key (JSON allows duplicates), or, if absent,
/// inserts `"key":value` as the first member (followed by `,` if the object had members); Remove deletes every
/// member with that key together with one adjacent comma and the whitespace between them. Bytes outside edited
/// spans are preserved exactly. The result is valid JSON whenever the input and every `value_json` are.
pub fn apply(body: &[u8], edits: &[Edit]) -> Result<Vec<u8>, EditError> {
    let mut buf = body.to_vec();
    // Validate even with no edits so callers get the same error whatever they asked for.
    scan(&buf)?;
    for edit in edits {
        match edit {
            Edit::Set { key, value_json } => set(&mut buf, key, value_json)?,
            Edit::Remove { key } => remove(&mut buf, key)?,
        }
    }
    Ok(buf)
}

fn set(buf: &mut Vec<u8>, key: &str, value_json: &str) -> Result<(), EditError> {
    let scanned = scan(buf)?;
    let spans: Vec<(usize, usize)> = scanned
        .members
        .iter()
        .filter(|m| m.key == key)
        .map(|m| (m.value_start, m.value_end))
        .collect();
    if spans.is_empty() {
        let mut member = quote_key(key);
        member.push(b':');
        member.extend_from_slice(value_json.as_bytes());
        if !scanned.members.is_empty() {
            member.push(b',');
        }
        let at = scanned.open.saturating_add(1);
        splice(buf, at, at, &member)?;
    } else {
        // Back to front so earlier offsets stay valid.
        for &(start, end) in spans.iter().rev() {
            splice(buf, start, end, value_json.as_bytes())?;
        }
    }
    Ok(())
}

fn remove(buf: &mut Vec<u8>, key: &str) -> Result<(), EditError> {
    // Every removal shifts offsets, so rescan per removal; duplicates are rare and bodies small
    // enough that the quadratic worst case does not matter.
    loop {
        let scanned = scan(buf)?;
        let Some(idx) = scanned.members.iter().position(|m| m.key == key) else {
            return Ok(());
        };
        let Some(member) = scanned.members.get(idx) else {
            return Ok(());
        };
        let (from, to) = match (
            scanned.members.get(idx.saturating_add(1)),
            idx.checked_sub(1),
        ) {
            // Not last: take the member, its comma and the whitespace up to the next member,
            // so the next member moves into this one's place and indentation stays intact.
            (Some(next), _) => (member.start, next.start),
            // Last of several: take the preceding comma and the whitespace after it.
            (None, Some(prev)) => match scanned.commas.get(prev) {
                Some(&comma) => (comma, member.end),
                None => return Err(EditError::Malformed(member.start)),
            },
            (None, None) => (member.start, member.end),
        };
        splice(buf, from, to, b"")?;
    }
}

fn splice(buf: &mut Vec<u8>, from: usize, to: usize, with: &[u8]) -> Result<(), EditError> {
    if from > to || to > buf.len() {
        return Err(EditError::Malformed(from));
    }
    buf.splice(from..to, with.iter().copied());
    Ok(())
}

fn quote_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len().saturating_add(2));
    out.push(b'"');
    for c in key.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if u32::from(c) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", u32::from(c)).as_bytes());
            }
            c => {
                let mut tmp = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
    out.push(b'"');
    out
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body.get(i).copied().is_some_and(is_ws) {
        i = i.saturating_add(1);
    }
    i
}

fn scan(body: &[u8]) -> Result<Scan, EditError> {
    let mut i = if body.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    i = skip_ws(body, i);
    if body.get(i) != Some(&b'{') {
        return Err(EditError::NotAnObject);
    }
    let open = i;
    let mut members = Vec::new();
    let mut commas = Vec::new();
    i = skip_ws(body, i.saturating_add(1));
    if body.get(i) == Some(&b'}') {
        return finish(
            body,
            i,
            Scan {
                open,
                members,
                commas,
            },
        );
    }
    loop {
        if body.get(i) != Some(&b'"') {
            return Err(EditError::Malformed(i));
        }
        let start = i;
        let key_end = skip_string(body, i)?;
        let key_bytes = body
            .get(start..key_end)
            .ok_or(EditError::Malformed(start))?;
        let key: String =
            serde_json::from_slice(key_bytes).map_err(|_| EditError::Malformed(start))?;
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return Err(EditError::Malformed(i));
        }
        let value_start = skip_ws(body, i.saturating_add(1));
        let value_end = skip_value(body, value_start)?;
        members.push(Member {
            key,
            start,
            value_start,
            value_end,
            end: value_end,
        });
        i = skip_ws(body, value_end);
        match body.get(i) {
            Some(b',') => {
                commas.push(i);
                i = skip_ws(body, i.saturating_add(1));
            }
            Some(b'}') => {
                return finish(
                    body,
                    i,
                    Scan {
                        open,
                        members,
                        commas,
                    },
                )
            }
            _ => return Err(EditError::Malformed(i)),
        }
    }
}

/// `close` is the index of the object's `}`; only whitespace may follow.
fn finish(body: &[u8], close: usize, scan: Scan) -> Result<Scan, EditError> {
    let after = skip_ws(body, close.saturating_add(1));
    if after < body.len() {
        return Err(EditError::Malformed(after));
    }
    Ok(scan)
}

/// `start` is an opening quote; returns the index just past the closing quote.
fn skip_string(body: &[u8], start: usize) -> Result<usize, EditError> {
    let mut i = start.saturating_add(1);
    loop {
        match body.get(i) {
            None => return Err(EditError::Malformed(start)),
            Some(b'"') => return Ok(i.saturating_add(1)),
            // The escaped byte is never structural, so skipping it suffices even for \uXXXX.
            Some(b'\\') => i = i.saturating_add(2),
            Some(&b) if b < 0x20 => return Err(EditError::Malformed(i)),
            Some(_) => i = i.saturating_add(1),
        }
    }
}

/// Returns the index just past the value starting at `start`.
fn skip_value(body: &[u8], start: usize) -> Result<usize, EditError> {
    match body.get(start) {
        None => Err(EditError::Malformed(start)),
        Some(b'"') => skip_string(body, start),
        Some(b'{') | Some(b'[') => skip_container(body, start),
        Some(_) => {
            let mut i = start;
            while body
                .get(i)
                .is_some_and(|&b| !is_ws(b) && !matches!(b, b',' | b'}' | b']'))
            {
                i = i.saturating_add(1);
            }
            let token = body.get(start..i).unwrap_or_default();
            let plausible = matches!(token, b"true" | b"false" | b"null")
                || token
                    .first()
                    .is_some_and(|&b| b == b'-' || b.is_ascii_digit())
                    && token.iter().all(|&b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    });
            if plausible {
                Ok(i)
            } else {
                Err(EditError::Malformed(start))
            }
        }
    }
}

/// Walks a nested array/object, matching bracket kinds so that the spans handed to edits are
/// always balanced.
fn skip_container(body: &[u8], start: usize) -> Result<usize, EditError> {
    let mut stack: Vec<u8> = Vec::new();
    let mut i = start;
    loop {
        match body.get(i) {
            None => return Err(EditError::Malformed(start)),
            Some(b'"') => {
                i = skip_string(body, i)?;
                continue;
            }
            Some(&open @ (b'{' | b'[')) => {
                // The top-level object is one level already.
                if stack.len().saturating_add(1) >= MAX_DEPTH {
                    return Err(EditError::Malformed(i));
                }
                stack.push(if open == b'{' { b'}' } else { b']' });
            }
            Some(&close @ (b'}' | b']')) => {
                if stack.pop() != Some(close) {
                    return Err(EditError::Malformed(i));
                }
                if stack.is_empty() {
                    return Ok(i.saturating_add(1));
                }
            }
            Some(_) => {}
        }
        i = i.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn set<'a>(key: &'a str, value_json: &str) -> Edit<'a> {
        Edit::Set {
            key,
            value_json: value_json.to_string(),
        }
    }

    fn edited(body: &str, edits: &[Edit]) -> String {
        let out = apply(body.as_bytes(), edits);
        assert!(out.is_ok(), "{body:?}: {out:?}");
        let out = out.unwrap_or_default();
        assert!(
            serde_json::from_slice::<Value>(&out).is_ok(),
            "result is not JSON: {:?}",
            String::from_utf8_lossy(&out)
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn scan_reports_spans() {
        let body = br#" {"model" : "gpt-4o", "n":1,"msgs":[{"a":"}"}] } "#;
        let members = scan_members(body).unwrap_or_default();
        let got: Vec<(&str, &[u8])> = members
            .iter()
            .map(|m| {
                (
                    m.key.as_str(),
                    body.get(m.value_start..m.value_end).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("model", &br#""gpt-4o""#[..]),
                ("n", b"1"),
                ("msgs", br#"[{"a":"}"}]"#),
            ]
        );
        let first = members.first().cloned();
        assert_eq!(
            first,
            Some(Member {
                key: "model".into(),
                start: 2,
                value_start: 12,
                value_end: 20,
                end: 20,
            })
        );
    }

    #[test]
    fn insert_into_empty_object() {
        assert_eq!(
            edited("{}", &[set("max_tokens", "256")]),
            r#"{"max_tokens":256}"#
        );
        assert_eq!(edited(" { \n } ", &[set("a", "1")]), " {\"a\":1 \n } ");
    }

    #[test]
    fn insert_into_non_empty_object() {
        assert_eq!(
            edited(
                r#"{"model":"m", "stream":true}"#,
                &[set("stream_options", r#"{"include_usage":true}"#)]
            ),
            r#"{"stream_options":{"include_usage":true},"model":"m", "stream":true}"#
        );
    }

    #[test]
    fn replace_existing_preserves_everything_else() {
        let body =
            "{\n  \"model\": \"gpt-4o\",\n  \"max_tokens\": 4096,\n  \"temperature\": 0.70\n}\n";
        assert_eq!(
            edited(body, &[set("max_tokens", "1000"), set("model", r#""gpt-4o-mini""#)]),
            "{\n  \"model\": \"gpt-4o-mini\",\n  \"max_tokens\": 1000,\n  \"temperature\": 0.70\n}\n"
        );
    }

    #[test]
    fn set_replaces_every_duplicate() {
        assert_eq!(
            edited(r#"{"n":1,"x":[],"n":2}"#, &[set("n", "3")]),
            r#"{"n":3,"x":[],"n":3}"#
        );
    }

    #[test]
    fn remove_first_middle_last_only() {
        let body = r#"{"a":1, "b":{"c":"}"}, "d":[1,2]}"#;
        assert_eq!(
            edited(body, &[Edit::Remove { key: "a" }]),
            r#"{"b":{"c":"}"}, "d":[1,2]}"#
        );
        assert_eq!(
            edited(body, &[Edit::Remove { key: "b" }]),
            r#"{"a":1, "d":[1,2]}"#
        );
        assert_eq!(
            edited(body, &[Edit::Remove { key: "d" }]),
            r#"{"a":1, "b":{"c":"}"}}"#
        );
        assert_eq!(
            edited(r#"{ "a" : 1 }"#, &[Edit::Remove { key: "a" }]),
            "{  }"
        );
        assert_eq!(edited(body, &[Edit::Remove { key: "zz" }]), body);
    }

    #[test]
    fn remove_keeps_pretty_layout() {
        let body = "{\n  \"a\": 1,\n  \"b\": 2,\n  \"c\": 3\n}";
        assert_eq!(
            edited(body, &[Edit::Remove { key: "a" }]),
            "{\n  \"b\": 2,\n  \"c\": 3\n}"
        );
        assert_eq!(
            edited(body, &[Edit::Remove { key: "b" }]),
            "{\n  \"a\": 1,\n  \"c\": 3\n}"
        );
        assert_eq!(
            edited(body, &[Edit::Remove { key: "c" }]),
            "{\n  \"a\": 1,\n  \"b\": 2\n}"
        );
    }

    #[test]
    fn remove_every_duplicate() {
        assert_eq!(
            edited(r#"{"s":1,"k":2,"s":3,"s":4}"#, &[Edit::Remove { key: "s" }]),
            r#"{"k":2}"#
        );
        assert_eq!(
            edited(r#"{"s":1,"s":2}"#, &[Edit::Remove { key: "s" }]),
            "{}"
        );
    }

    #[test]
    fn edits_apply_in_order() {
        assert_eq!(
            edited(r#"{"a":1}"#, &[Edit::Remove { key: "a" }, set("a", "2")]),
            r#"{"a":2}"#
        );
        assert_eq!(
            edited(r#"{"b":1}"#, &[set("a", "2"), Edit::Remove { key: "a" }]),
            r#"{"b":1}"#
        );
    }

    #[test]
    fn keys_with_escapes() {
        let body = r#"{"m\u006fdel":"x","a\"b":1,"c\\":2}"#;
        let keys: Vec<String> = scan_members(body.as_bytes())
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec!["model", "a\"b", "c\\"]);
        assert_eq!(
            edited(body, &[set("model", "\"y\"")]),
            r#"{"m\u006fdel":"y","a\"b":1,"c\\":2}"#
        );
        assert_eq!(
            edited(body, &[Edit::Remove { key: "a\"b" }]),
            r#"{"m\u006fdel":"x","c\\":2}"#
        );
        assert_eq!(edited("{}", &[set("q\"\\\n", "1")]), r#"{"q\"\\\u000a":1}"#);
    }

    #[test]
    fn nested_strings_with_structural_characters() {
        let body = r#"{"messages":[{"role":"user","content":"}] \" {[ \\"}],"max_tokens":5}"#;
        assert_eq!(
            edited(body, &[set("max_tokens", "6")]),
            r#"{"messages":[{"role":"user","content":"}] \" {[ \\"}],"max_tokens":6}"#
        );
    }

    #[test]
    fn bom_and_surrounding_whitespace_are_kept() {
        // serde_json itself rejects a BOM, so this is compared as bytes only.
        let body = "\u{feff}\r\n\t{\"a\":1}\n\n";
        assert_eq!(
            apply(body.as_bytes(), &[set("a", "2")]),
            Ok(b"\xEF\xBB\xBF\r\n\t{\"a\":2}\n\n".to_vec())
        );
        let body = " \r\n\t{\"a\":1}\n\n";
        assert_eq!(
            edited(body, &[set("b", "2")]),
            " \r\n\t{\"b\":2,\"a\":1}\n\n"
        );
    }

    #[test]
    fn not_an_object() {
        for body in ["", "   ", "[]", "\"x\"", "1", "null", "\u{feff}"] {
            assert_eq!(
                scan_members(body.as_bytes()),
                Err(EditError::NotAnObject),
                "{body:?}"
            );
            assert_eq!(
                apply(body.as_bytes(), &[]),
                Err(EditError::NotAnObject),
                "{body:?}"
            );
        }
    }

    #[test]
    fn malformed_inputs_error() {
        let cases = [
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":1",
            "{\"a\":1,",
            "{\"a\":1,}",
            "{,}",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":[1,2}",
            "{\"a\":{\"b\":1]}",
            "{\"a\":\"unterminated}",
            "{\"a\":\"\\",
            "{\"a\":1}}",
            "{\"a\":1} x",
            "{\"a\":nope}",
            "{\"a\":}",
            "{\"\\x\":1}",
            "{\"a\":\"tab\tinside\"}",
        ];
        for body in cases {
            assert!(
                matches!(scan_members(body.as_bytes()), Err(EditError::Malformed(_))),
                "{body:?}"
            );
            assert!(
                matches!(
                    apply(body.as_bytes(), &[set("a", "1")]),
                    Err(EditError::Malformed(_))
                ),
                "{body:?}"
            );
        }
        assert!(matches!(
            scan_members(&[b'{', b'"', 0xff, b'"', b':', b'1', b'}']),
            Err(EditError::Malformed(1))
        ));
    }

    #[test]
    fn nesting_depth_is_bounded() {
        let deep = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(scan_members(deep(100).as_bytes()).is_ok());
        assert!(matches!(
            scan_members(deep(100_000).as_bytes()),
            Err(EditError::Malformed(_))
        ));
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % (n.max(1) as u64)) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items
                .get(self.below(items.len()))
                .copied()
                .unwrap_or_default()
        }
    }

    const KEYS: [&str; 5] = ["a", "model", "b\"q", "é", "max_tokens"];
    const WS: [&str; 5] = ["", " ", "\n  ", "\t", "\r\n"];

    fn gen_value(rng: &mut Rng, depth: usize, out: &mut String) {
        let ws = |rng: &mut Rng| WS.get(rng.below(WS.len())).copied().unwrap_or_default();
        match rng.below(if depth > 3 { 4 } else { 6 }) {
            0 => out.push_str(rng.pick(&["0", "-1.5e3", "12345678901234567890", "true", "null"])),
            1 => out.push_str(rng.pick(&[r#""}""#, r#""\"{[""#, r#""日本\\""#, r#""\u00e9""#])),
            2 => out.push_str("[]"),
            3 => out.push_str("{}"),
            4 => {
                out.push('[');
                for i in 0..rng.below(3) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(ws(rng));
                    gen_value(rng, depth + 1, out);
                }
                out.push(']');
            }
            _ => gen_object(rng, depth + 1, out),
        }
    }

    fn gen_object(rng: &mut Rng, depth: usize, out: &mut String) {
        let ws = |rng: &mut Rng| WS.get(rng.below(WS.len())).copied().unwrap_or_default();
        out.push('{');
        out.push_str(ws(rng));
        for i in 0..rng.below(5) {
            if i > 0 {
                out.push(',');
                out.push_str(ws(rng));
            }
            let key = rng.pick(&KEYS);
            out.push_str(&serde_json::to_string(key).unwrap_or_default());
            out.push_str(ws(rng));
            out.push(':');
            out.push_str(ws(rng));
            gen_value(rng, depth, out);
            out.push_str(ws(rng));
        }
        out.push('}');
    }

    /// What serde_json says the edits should produce (order-insensitive, duplicates folded).
    fn model(input: &Map<String, Value>, edits: &[Edit]) -> Map<String, Value> {
        let mut map = input.clone();
        for edit in edits {
            match edit {
                Edit::Set { key, value_json } => {
                    let v = serde_json::from_str(value_json).unwrap_or(Value::Null);
                    map.insert((*key).to_string(), v);
                }
                Edit::Remove { key } => {
                    map.remove(*key);
                }
            }
        }
        map
    }

    #[test]
    fn generated_inputs_never_panic_and_stay_valid() {
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        let values = ["1", "\"s\"", "{\"include_usage\":true}", "[null]", "-0.5"];
        for _ in 0..3000 {
            let mut body = String::new();
            gen_object(&mut rng, 0, &mut body);
            let mut edits = Vec::new();
            for _ in 0..rng.below(4) {
                let key = rng.pick(&KEYS);
                if rng.below(2) == 0 {
                    edits.push(set(key, rng.pick(&values)));
                } else {
                    edits.push(Edit::Remove { key });
                }
            }

            let parsed: Result<Map<String, Value>, _> = serde_json::from_str(&body);
            assert!(parsed.is_ok(), "generator produced invalid JSON: {body}");
            let parsed = parsed.unwrap_or_default();
            let out = apply(body.as_bytes(), &edits);
            assert!(out.is_ok(), "{body:?} {edits:?}: {out:?}");
            let reparsed: Result<Map<String, Value>, _> =
                serde_json::from_slice(&out.unwrap_or_default());
            assert!(reparsed.is_ok(), "{body:?} {edits:?}");
            assert_eq!(
                reparsed.unwrap_or_default(),
                model(&parsed, &edits),
                "{body:?} {edits:?}"
            );

            // Mutations of valid input: anything may come back, but never a panic, and an Ok
            // result of a still-valid object must itself be valid.
            let bytes = body.as_bytes();
            for _ in 0..4 {
                let mut m = bytes.to_vec();
                match rng.below(3) {
                    0 => m.truncate(rng.below(bytes.len() + 1)),
                    1 => {
                        let at = rng.below(m.len());
                        let b = b"{}[]\",:\\ x1\xff"
                            .get(rng.below(13))
                            .copied()
                            .unwrap_or(b'x');
                        if let Some(slot) = m.get_mut(at) {
                            *slot = b;
                        }
                    }
                    _ => {
                        let at = rng.below(m.len() + 1);
                        let b = b"{}[]\",:\\ ".get(rng.below(10)).copied().unwrap_or(b' ');
                        m.insert(at.min(m.len()), b);
                    }
                }
                let _ = scan_members(&m);
                let result = apply(&m, &edits);
                let input_valid = serde_json::from_slice::<Map<String, Value>>(&m).is_ok();
                if input_valid {
                    assert!(
                        result.is_ok(),
                        "{:?}: {result:?}",
                        String::from_utf8_lossy(&m)
                    );
                }
                if let (true, Ok(out)) = (input_valid, result) {
                    assert!(
                        serde_json::from_slice::<Map<String, Value>>(&out).is_ok(),
                        "{:?} {edits:?}",
                        String::from_utf8_lossy(&m)
                    );
                }
            }
        }
    }
}
