//! Recorded provider streams fed to `SseMeter` under every way Envoy might chunk them.
//!
//! Envoy gives no guarantee about where body chunks end, so each fixture is split at every
//! byte offset, fed a byte at a time and cut at pseudo-random points; metering results and the
//! bytes the client receives must not depend on the cut.

use aex_filter::sse::{Output, SseMeter};
use aex_filter::usage::Usage;
use std::path::PathBuf;

struct Case {
    name: &'static str,
    usage: Option<Usage>,
    events: u64,
    /// Hand-written copy of the stream without the usage-only chunk, if it has one.
    dropped: Option<&'static str>,
}

fn usage(input: u64, output: u64, cached: u64, reasoning: u64) -> Option<Usage> {
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        reasoning_tokens: reasoning,
        output_missing: false,
    })
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "openai_chat_usage.sse",
            usage: usage(1180, 9, 1024, 0),
            events: 8,
            dropped: Some("openai_chat_usage.dropped.sse"),
        },
        Case {
            name: "openai_chat_no_usage.sse",
            usage: None,
            events: 6,
            dropped: None,
        },
        Case {
            name: "groq_chat.sse",
            usage: usage(42, 7, 0, 0),
            events: 6,
            dropped: None,
        },
        Case {
            name: "responses_api.sse",
            usage: usage(14, 146, 0, 128),
            events: 13,
            dropped: None,
        },
        Case {
            name: "completions_legacy.sse",
            usage: usage(5, 7, 0, 0),
            events: 6,
            dropped: Some("completions_legacy.dropped.sse"),
        },
        Case {
            name: "vllm_crlf.sse",
            usage: usage(17, 12, 0, 0),
            events: 5,
            dropped: Some("vllm_crlf.dropped.sse"),
        },
        Case {
            name: "comments_keepalive.sse",
            usage: usage(11, 6, 0, 0),
            events: 5,
            dropped: Some("comments_keepalive.dropped.sse"),
        },
    ]
}

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    let bytes = std::fs::read(&path);
    assert!(bytes.is_ok(), "reading {}: {bytes:?}", path.display());
    bytes.unwrap_or_default()
}

/// Feeds `chunks` (the last with end_of_stream) and returns the bytes sent downstream.
fn run(chunks: &[&[u8]], drop: bool) -> (SseMeter, Vec<u8>) {
    let mut meter = SseMeter::new(drop);
    let mut out = Vec::new();
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.iter().enumerate() {
        match meter.feed(chunk, i == last) {
            Output::Passthrough => out.extend_from_slice(chunk),
            Output::Replace(bytes) => {
                assert!(drop, "Replace returned while only metering");
                out.extend_from_slice(&bytes);
            }
        }
    }
    (meter, out)
}

fn check(case: &Case, input: &[u8], chunks: &[&[u8]], how: &str) {
    let expected_dropped = case.dropped.map(fixture);
    for drop in [false, true] {
        let (meter, out) = run(chunks, drop);
        let ctx = format!("{} ({how}, drop={drop})", case.name);
        assert_eq!(meter.usage(), case.usage, "{ctx}: usage");
        assert!(meter.saw_done(), "{ctx}: saw_done");
        assert_eq!(meter.events_seen(), case.events, "{ctx}: events");
        assert_eq!(meter.bytes_seen(), input.len() as u64, "{ctx}: bytes_seen");
        assert_eq!(meter.oversized_events(), 0, "{ctx}: oversized");
        let expected: &[u8] = match (&expected_dropped, drop) {
            (Some(dropped), true) => dropped,
            _ => input,
        };
        // Compared as text first so a failure shows a readable diff.
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(expected),
            "{ctx}: emitted bytes"
        );
        assert_eq!(out, expected, "{ctx}: emitted bytes");
        let removed = u64::from(drop && expected_dropped.is_some());
        assert_eq!(meter.removed_events(), removed, "{ctx}: removed");
    }
}

#[test]
fn dropped_fixtures_differ_from_originals_by_one_event() {
    for case in cases() {
        let Some(dropped) = case.dropped else {
            continue;
        };
        let input = fixture(case.name);
        let dropped = fixture(dropped);
        assert!(dropped.len() < input.len(), "{}", case.name);
        // The removed bytes form one contiguous run: a common prefix plus a common suffix.
        let prefix = input
            .iter()
            .zip(&dropped)
            .take_while(|(a, b)| a == b)
            .count();
        let suffix = input
            .iter()
            .rev()
            .zip(dropped.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(prefix + suffix >= dropped.len(), "{}", case.name);
    }
}

#[test]
fn whole_stream_in_one_chunk() {
    for case in cases() {
        let input = fixture(case.name);
        check(&case, &input, &[&input], "whole");
        check(&case, &input, &[&input, b""], "whole + empty eos");
    }
}

#[test]
fn split_at_every_offset() {
    for case in cases() {
        let input = fixture(case.name);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            check(&case, &input, &[a, b], &format!("split at {at}"));
        }
    }
}

#[test]
fn one_byte_at_a_time() {
    for case in cases() {
        let input = fixture(case.name);
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        check(&case, &input, &chunks, "bytewise");
        let mut with_empty_eos = chunks.clone();
        with_empty_eos.push(b"");
        check(&case, &input, &with_empty_eos, "bytewise + empty eos");
    }
}

#[test]
fn random_chunkings() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for case in cases() {
        let input = fixture(case.name);
        for round in 0..200 {
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut rest: &[u8] = &input;
            while !rest.is_empty() {
                let take = (next() % 97) as usize;
                let (a, b) = rest.split_at(take.min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            check(&case, &input, &chunks, &format!("random round {round}"));
        }
    }
}
