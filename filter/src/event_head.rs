//! What the SSE meter reads of one stream event's JSON: its `type`, its choices' indices and
//! finish reasons, and whether it carries a top-level `usage` or `error`.
//!
//! One pass with no tree, everything else skipped unread: a delta's text is never decoded, so
//! a lone surrogate (`"\ud83d"`, half of an emoji a provider split between chunks) or invalid
//! UTF-8 in it cannot hide the usage beside it (serde_json refuses both when it decodes a
//! string, and skips them when it ignores one).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What an event's `type` says.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No `type` (chat and completions chunks), or one the meter does not act on.
    #[default]
    Chunk,
    /// A Responses API event that does not end the stream (`response.created`, deltas, …).
    Responses,
    /// `response.completed`, `response.incomplete` or `response.failed`.
    ResponsesTerminal,
    /// `"type": "error"` (the Responses API's error event).
    Error,
}

/// Terminal events of the Responses API stream, which has no `[DONE]` sentinel.
pub const RESPONSES_TERMINAL: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

/// One entry of `choices`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub index: Option<u64>,
    /// A `finish_reason` other than null or `""` (old Ollama sent `""` on every chunk).
    pub finished: bool,
}

/// The event's `choices` member.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Choices {
    #[default]
    Absent,
    /// An array (empty: the usage-only chunk).
    Listed(Vec<Choice>),
    /// Present but not an array.
    Other,
}

impl Choices {
    /// No choices: absent, `null` or `[]`.
    pub fn none(&self) -> bool {
        match self {
            Choices::Absent => true,
            Choices::Listed(c) => c.is_empty(),
            Choices::Other => false,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventHead {
    pub kind: Kind,
    pub choices: Choices,
    /// A top-level `usage` that is not null.
    pub usage: bool,
    /// A top-level `error` that is not null.
    pub error: bool,
}

impl EventHead {
    /// An error report rather than content: an `error` event, or a top-level `error` with no
    /// choices (vLLM's and OpenRouter's in-stream errors).
    pub fn is_error(&self) -> bool {
        self.kind == Kind::Error || (self.error && self.choices.none())
    }
}

/// The head of one event's data; `None` when it is not a JSON object.
pub fn read(data: &[u8]) -> Option<EventHead> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let mut de = serde_json::Deserializer::from_slice(data);
    let head = Head::deserialize(&mut de).ok()?.0;
    de.end().ok()?;
    Some(head)
}

/// A top-level key the head cares about.
enum Key {
    Type,
    Choices,
    Usage,
    Error,
    Index,
    FinishReason,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "type" => Key::Type,
                    "choices" => Key::Choices,
                    "usage" => Key::Usage,
                    "error" => Key::Error,
                    "index" => Key::Index,
                    "finish_reason" => Key::FinishReason,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, as one of the few shapes the head distinguishes. Arrays and objects are
/// read by the visitor of the member holding them; here they only count as present.
#[derive(Default)]
enum Scalar {
    #[default]
    Null,
    Str(bool, Kind),
    Number(Option<u64>),
    Other,
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                let kind = if RESPONSES_TERMINAL.contains(&s) {
                    Kind::ResponsesTerminal
                } else if s.starts_with("response.") {
                    Kind::Responses
                } else if s == "error" {
                    Kind::Error
                } else {
                    Kind::Chunk
                };
                Ok(Scalar::Str(!s.is_empty(), kind))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(Some(n)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Scalar, E> {
                Ok(Scalar::Number(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Number(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A value that is skipped unread, and known only as null or not.
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<IgnoredAny>::deserialize(d).map(|v| Present(v.is_some()))
    }
}

/// The document's head; anything but an object is an error, which [`read`] reads as no head.
struct Head(EventHead);

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Head;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
                let mut h = EventHead::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Type => {
                            h.kind = match map.next_value::<Scalar>()? {
                                Scalar::Str(_, kind) => kind,
                                _ => Kind::Chunk,
                            }
                        }
                        Key::Choices => h.choices = map.next_value::<ChoiceList>()?.0,
                        Key::Usage => h.usage = map.next_value::<Present>()?.0,
                        Key::Error => h.error = map.next_value::<Present>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Head(h))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `choices` member.
struct ChoiceList(Choices);

impl<'de> Deserialize<'de> for ChoiceList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoiceList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChoiceList, A::Error> {
                let mut list = Vec::new();
                while let Some(c) = seq.next_element::<Entry>()? {
                    list.push(c.0);
                }
                Ok(ChoiceList(Choices::Listed(list)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Absent))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChoiceList, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ChoiceList(Choices::Other))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Other))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Other))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Other))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Other))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ChoiceList, E> {
                Ok(ChoiceList(Choices::Other))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of `choices` (an entry that is not an object has no index and has not finished).
struct Entry(Choice);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a choice")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
                let mut c = Choice::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Index => {
                            if let Scalar::Number(n) = map.next_value::<Scalar>()? {
                                c.index = n;
                            }
                        }
                        Key::FinishReason => {
                            c.finished = match map.next_value::<Scalar>()? {
                                Scalar::Null => false,
                                Scalar::Str(non_empty, _) => non_empty,
                                Scalar::Number(_) | Scalar::Other => true,
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Entry(c))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Entry(Choice::default()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
                Ok(Entry(Choice::default()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(index: u64, finished: bool) -> Choice {
        Choice {
            index: Some(index),
            finished,
        }
    }

    #[test]
    fn chat_chunks() {
        let h = read(br#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}"#).unwrap();
        assert_eq!(h.kind, Kind::Chunk);
        assert_eq!(h.choices, Choices::Listed(vec![choice(0, false)]));
        assert!(!h.usage && !h.error && !h.is_error());

        let h = read(br#"{"choices":[{"index":1,"finish_reason":"stop"},{"finish_reason":""},7],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert_eq!(
            h.choices,
            Choices::Listed(vec![
                choice(1, true),
                Choice {
                    index: None,
                    finished: false
                },
                Choice::default()
            ])
        );
        assert!(h.usage);

        let h = read(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#).unwrap();
        assert!(h.choices.none() && h.usage);
        assert!(read(br#"{"usage":{}}"#).unwrap().choices.none());
        assert!(read(br#"{"choices":null}"#).unwrap().choices.none());
        assert!(!read(br#"{"choices":{"a":1}}"#).unwrap().choices.none());
    }

    #[test]
    fn text_the_head_does_not_need_is_never_decoded() {
        // A lone surrogate and invalid UTF-8 in a delta: serde_json refuses both as strings.
        for data in [
            &br#"{"choices":[{"index":0,"delta":{"content":"\ud83d"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11}}"#[..],
            b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":11}}",
        ] {
            assert!(serde_json::from_slice::<serde_json::Value>(data).is_err());
            let h = read(data).unwrap();
            assert_eq!(h.choices, Choices::Listed(vec![choice(0, true)]));
            assert!(h.usage);
        }
    }

    #[test]
    fn responses_events_and_errors() {
        let kind = |d: &[u8]| read(d).unwrap().kind;
        assert_eq!(
            kind(br#"{"type":"response.created","response":{"usage":null}}"#),
            Kind::Responses
        );
        assert_eq!(
            kind(br#"{"type":"response.output_text.delta","delta":"x"}"#),
            Kind::Responses
        );
        for t in RESPONSES_TERMINAL {
            assert_eq!(
                kind(format!(r#"{{"type":"{t}"}}"#).as_bytes()),
                Kind::ResponsesTerminal
            );
        }
        assert_eq!(kind(br#"{"type":"error","code":"x"}"#), Kind::Error);
        assert_eq!(kind(br#"{"type":7}"#), Kind::Chunk);
        assert!(read(br#"{"type":"error","message":"m"}"#)
            .unwrap()
            .is_error());
        assert!(read(br#"{"error":{"message":"m"}}"#).unwrap().is_error());
        assert!(
            read(br#"{"choices":[],"error":{"code":502},"usage":{"prompt_tokens":1}}"#)
                .unwrap()
                .is_error()
        );
        assert!(!read(br#"{"error":null,"choices":[]}"#).unwrap().is_error());
        // Content with an error beside it is content.
        assert!(!read(br#"{"error":"x","choices":[{"index":0}]}"#)
            .unwrap()
            .is_error());
    }

    #[test]
    fn what_is_not_an_object_has_no_head() {
        for data in [
            &b"[1]"[..],
            b"\"x\"",
            b"1",
            b"null",
            b"true",
            b"{",
            b"{} x",
            b"",
        ] {
            assert_eq!(read(data), None, "{:?}", String::from_utf8_lossy(data));
        }
    }
}
