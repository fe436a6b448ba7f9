//! Agent tokens: generation, hashing, constant-time comparison. The daemon stores hashes only.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Every agent token starts with this.
pub const PREFIX: &str = "aex_";

/// Characters after the prefix of a generated token: 256 bits in base64url without padding.
pub const BODY_LEN: usize = 43;

/// Whether `b` belongs to the alphabet of generated tokens (base64url: `A-Z a-z 0-9 - _`).
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The first `aex_` at or after `from` followed by at least `min_run` token characters: the byte
/// range of the prefix and the whole run. `aex_` and the alphabet are ASCII, so on text the range
/// starts and ends on char boundaries.
pub fn find_token_like(s: &[u8], from: usize, min_run: usize) -> Option<std::ops::Range<usize>> {
    let p = PREFIX.as_bytes();
    let mut i = from;
    while i + p.len() <= s.len() {
        let at = i + s[i..].windows(p.len()).position(|w| w == p)?;
        let start = at + p.len();
        let run = s[start..].iter().take_while(|b| is_token_byte(**b)).count();
        if run >= min_run {
            return Some(at..start + run);
        }
        i = start;
    }
    None
}

/// A fresh token: `aex_` + 256 random bits, base64url without padding.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Lower-case hex SHA-256 of the token, as stored and as computed by the filter.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + BODY_LEN);
        assert!(a[PREFIX.len()..].bytes().all(is_token_byte));
        assert_eq!(find_token_like(a.as_bytes(), 0, BODY_LEN), Some(0..a.len()));
    }

    #[test]
    fn finds_a_token_among_other_text() {
        let t = generate();
        let s = format!("GET /v1/x?a=aex_short&key={t}&b=1");
        let at = s.find(&t).unwrap();
        assert_eq!(
            find_token_like(s.as_bytes(), 0, BODY_LEN),
            Some(at..at + t.len())
        );
        assert_eq!(find_token_like(s.as_bytes(), at + 1, BODY_LEN), None);
        assert_eq!(find_token_like(b"aex_", 0, 1), None);
        assert_eq!(find_token_like(b"", 0, 0), None);
        // A run one short of a whole token is not one; `aex_` inside a run is part of it.
        let short = format!("aex_{}", "a".repeat(BODY_LEN - 1));
        assert_eq!(find_token_like(short.as_bytes(), 0, BODY_LEN), None);
        let nested = format!("aex_aex_{}", "a".repeat(BODY_LEN));
        assert_eq!(
            find_token_like(nested.as_bytes(), 0, BODY_LEN),
            Some(0..nested.len())
        );
    }

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
