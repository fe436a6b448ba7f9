//! Client-supplied text on its way into the audit log: request paths, model names, denial
//! messages that quote them. The log is append-only and hash-chained, so whatever lands in it
//! stays: a raw token there fails `aex audit` for good, and an unbounded string fills the disk.
//! Every event field that carries client text goes through [`client_text`] (or [`path`]) first.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::tokens;

/// Most characters kept of a client-supplied path or model name.
pub const MAX_NAME: usize = 256;
/// Most characters kept of a message that may quote client text.
pub const MAX_MESSAGE: usize = 1024;
/// Most characters kept of a short label a filter reports (a denial code, a settlement outcome).
pub const MAX_LABEL: usize = 64;
/// `aex_` followed by this many token characters is redacted: a whole token has
/// [`tokens::BODY_LEN`], and even a good part of one has no place in the log.
pub const MIN_REDACTED_RUN: usize = 20;
/// What a cut string ends with.
pub const CUT_MARK: char = '…';

/// Replaces every token-like run (`aex_` + ≥ [`MIN_REDACTED_RUN`] base64url characters) with
/// `aex_[redacted:sha256:<first 12 hex>]`. The hash is of the run as found, so a leaked token can
/// still be told apart, and matched against the `token_sha256` of the agent it belongs to.
pub fn redact_tokens(s: &str) -> Cow<'_, str> {
    let Some(mut found) = tokens::find_token_like(s.as_bytes(), 0, MIN_REDACTED_RUN) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    loop {
        let run = &s[found.clone()];
        let digest = hex::encode(Sha256::digest(run.as_bytes()));
        out.push_str(&s[copied..found.start]);
        out.push_str(tokens::PREFIX);
        out.push_str("[redacted:sha256:");
        out.push_str(&digest[..12]);
        out.push(']');
        copied = found.end;
        match tokens::find_token_like(s.as_bytes(), copied, MIN_REDACTED_RUN) {
            Some(next) => found = next,
            None => break,
        }
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// `s` cut to at most `max` characters (the last one then [`CUT_MARK`]), on a char boundary.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max || s.char_indices().nth(max).is_none() {
        return Cow::Borrowed(s);
    }
    let keep = max.saturating_sub(1);
    let end = s.char_indices().nth(keep).map_or(s.len(), |(i, _)| i);
    let mut out = String::with_capacity(end + CUT_MARK.len_utf8());
    out.push_str(&s[..end]);
    out.push(CUT_MARK);
    Cow::Owned(out)
}

/// Client text as the audit log stores it: tokens redacted (before the cut, so no part of one
/// survives at the edge), then cut to `max` characters.
pub fn client_text(s: &str, max: usize) -> Cow<'_, str> {
    match redact_tokens(s) {
        Cow::Borrowed(b) => clip(b, max),
        Cow::Owned(o) => Cow::Owned(clip(&o, max).into_owned()),
    }
}

/// A request path as the audit log stores it: without its query string or fragment (where
/// clients put keys), then as [`client_text`].
pub fn path(p: &str) -> Cow<'_, str> {
    let end = p.find(['?', '#']).unwrap_or(p.len());
    client_text(&p[..end], MAX_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(run: &str) -> String {
        let h = hex::encode(Sha256::digest(run.as_bytes()));
        format!("aex_[redacted:sha256:{}]", &h[..12])
    }

    #[test]
    fn tokens_are_redacted_wherever_they_appear() {
        let a = tokens::generate();
        let b = tokens::generate();
        assert_eq!(redact_tokens(&a), marker(&a));
        let s = format!("/v1/{a}/x {b}.");
        assert_eq!(
            redact_tokens(&s),
            format!("/v1/{}/x {}.", marker(&a), marker(&b))
        );
        // The redacted form holds no token-like run: redacting again changes nothing.
        let once = redact_tokens(&s).into_owned();
        assert_eq!(redact_tokens(&once), once);
        // Part of a token is redacted too; a short run and text without one are kept as is.
        let part = &a[..4 + MIN_REDACTED_RUN];
        assert_eq!(redact_tokens(part), marker(part));
        let short = &a[..4 + MIN_REDACTED_RUN - 1];
        assert!(matches!(redact_tokens(short), Cow::Borrowed(_)));
        assert!(matches!(redact_tokens("gpt-4o-mini"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_redaction_hash_is_the_tokens_stored_hash() {
        let t = tokens::generate();
        let r = redact_tokens(&t);
        assert!(r.contains(&tokens::sha256_hex(&t)[..12]));
    }

    #[test]
    fn clip_cuts_on_char_boundaries_and_marks_the_cut() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "ab…");
        assert_eq!(clip("ééé", 3), "ééé");
        assert_eq!(clip("éééé", 3), "éé…");
        assert_eq!(clip("日本語テキスト", 4).chars().count(), 4);
        assert_eq!(clip("", 0), "");
    }

    #[test]
    fn client_text_is_bounded_and_holds_no_token() {
        let t = tokens::generate();
        // A token straddling the cut is redacted whole, never left half in.
        let s = format!("{}{t}", "x".repeat(MAX_NAME - 10));
        let out = client_text(&s, MAX_NAME);
        assert!(out.chars().count() <= MAX_NAME);
        assert!(out.ends_with(CUT_MARK));
        assert!(!out.contains(&t[..14]));
        let huge = "m".repeat(1 << 20);
        assert_eq!(client_text(&huge, MAX_NAME).chars().count(), MAX_NAME);
    }

    #[test]
    fn paths_lose_their_query_and_fragment() {
        let t = tokens::generate();
        assert_eq!(path(&format!("/v1/nothing?key={t}")), "/v1/nothing");
        assert_eq!(path("/v1/x#frag"), "/v1/x");
        assert_eq!(path(&format!("/v1/{t}")), format!("/v1/{}", marker(&t)));
        assert_eq!(
            path(&format!("/{}", "a".repeat(1000))).chars().count(),
            MAX_NAME
        );
    }
}
