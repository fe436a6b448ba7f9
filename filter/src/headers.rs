//! Header maps as Envoy hands them over, read without trusting their bytes.
//!
//! The SDK's string getters (`get_map_value`, `get_map`) unwrap UTF-8: one request carrying
//! `Authorization: Bearer \xff` would abort the Wasm VM, and every later request on that worker
//! would fail. The glue fetches a whole map in one call as raw bytes and decodes it here: names
//! and values that are not UTF-8 are read lossily (an API key that is not UTF-8 then simply
//! matches no agent), and a malformed buffer yields what could be read, never a panic.

/// Splits proxy-wasm's serialized header map into raw (name, value) pairs: a little-endian u32
/// count, then a (name length, value length) pair of u32 per entry, then each name and value
/// followed by a NUL byte.
pub fn raw_pairs(bytes: &[u8]) -> Vec<(&[u8], &[u8])> {
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let Some(count) = u32_at(0) else {
        return Vec::new();
    };
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    let mut take = |len: usize| -> Option<&[u8]> {
        let s = bytes.get(data..data.checked_add(len)?)?;
        data = data.checked_add(len + 1)?;
        Some(s)
    };
    let mut out = Vec::with_capacity(count.min(256));
    for i in 0..count {
        let at = 4 + i * 8;
        let (Some(klen), Some(vlen)) = (u32_at(at), u32_at(at + 4)) else {
            break;
        };
        let (Some(k), Some(v)) = (take(klen), take(vlen)) else {
            break;
        };
        out.push((k, v));
    }
    out
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The request headers the filter acts on, from one read of the map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHeaders {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub authorization: Option<String>,
    pub content_length: Option<String>,
    /// The client's own provider key (`x-aex-provider-key`), empty treated as absent.
    pub passthrough_key: Option<String>,
    /// Headers the filter removes before forwarding, present in this request.
    pub has_passthrough: bool,
    /// `accept-encoding` headers the client sent.
    pub accept_encodings: u32,
    /// The last `accept-encoding` value is exactly `identity` (no compression).
    pub accepts_identity: bool,
    pub has_upstream: bool,
    /// Headers of [`RequestHeaders::CLIENT_CREDENTIALS`] present in this request, each once.
    pub client_credentials: Vec<&'static str>,
}

impl RequestHeaders {
    pub const PASSTHROUGH: &'static str = "x-aex-provider-key";
    pub const UPSTREAM: &'static str = "x-aex-upstream";
    /// Credentials and billing selectors a client could aim at the provider past the key AEX
    /// injects: other providers' API-key headers (Azure `api-key`, `x-api-key`, Gemini's
    /// `x-goog-api-key`) and OpenAI's organization/project selectors, which would let an agent
    /// pick what the operator's key bills. Removed before forwarding.
    pub const CLIENT_CREDENTIALS: [&'static str; 5] = [
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "openai-organization",
        "openai-project",
    ];

    /// The client credentials to remove before forwarding. With its own provider key
    /// (passthrough) the agent's organization and project selectors go with it: they choose what
    /// the agent's key bills, and a key bound to several projects may need them.
    pub fn credentials_to_remove(&self) -> impl Iterator<Item = &'static str> + '_ {
        let own_key = self.passthrough_key.is_some();
        self.client_credentials
            .iter()
            .copied()
            .filter(move |c| !(own_key && c.starts_with("openai-")))
    }

    /// From a serialized header map; only the headers read here are decoded. The first value
    /// of each header wins, as with Envoy's single-value lookup.
    pub fn from_map(bytes: &[u8]) -> Self {
        let mut h = RequestHeaders::default();
        for (k, v) in raw_pairs(bytes) {
            match k {
                b":method" if h.method.is_empty() => h.method = lossy(v),
                b":path" if h.path.is_empty() => h.path = lossy(v),
                b":authority" if h.authority.is_empty() => h.authority = lossy(v),
                b"authorization" if h.authorization.is_none() => h.authorization = Some(lossy(v)),
                b"content-length" if h.content_length.is_none() => {
                    h.content_length = Some(lossy(v))
                }
                _ if k == Self::PASSTHROUGH.as_bytes() => {
                    if !h.has_passthrough && !v.is_empty() {
                        h.passthrough_key = Some(lossy(v));
                    }
                    h.has_passthrough = true;
                }
                b"accept-encoding" => {
                    h.accept_encodings = h.accept_encodings.saturating_add(1);
                    h.accepts_identity = v.trim_ascii().eq_ignore_ascii_case(b"identity");
                }
                _ if k == Self::UPSTREAM.as_bytes() => h.has_upstream = true,
                _ => {
                    if let Some(name) = Self::CLIENT_CREDENTIALS.iter().find(|c| c.as_bytes() == k)
                    {
                        if !h.client_credentials.contains(name) {
                            h.client_credentials.push(name);
                        }
                    }
                }
            }
        }
        h
    }
}

/// The response headers the filter reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseHeaders {
    pub status: Option<u32>,
    pub content_type: String,
    /// A `content-encoding` other than `identity` (the body's bytes are not its text).
    pub encoded: bool,
    /// The provider framed the body with `content-length` (so its length cannot change).
    pub content_length: bool,
    pub request_id: bool,
}

impl ResponseHeaders {
    /// From a serialized header map; only the headers read here are decoded.
    pub fn from_map(bytes: &[u8]) -> Self {
        let mut h = ResponseHeaders::default();
        for (k, v) in raw_pairs(bytes) {
            match k {
                b":status" if h.status.is_none() => h.status = lossy(v).trim().parse().ok(),
                b"content-type" if h.content_type.is_empty() => h.content_type = lossy(v),
                b"content-length" => h.content_length = true,
                b"x-request-id" => h.request_id = true,
                b"content-encoding" => {
                    let v = v.trim_ascii();
                    h.encoded |= !v.is_empty() && !v.eq_ignore_ascii_case(b"identity");
                }
                _ => {}
            }
        }
        h
    }

    pub fn is_event_stream(&self) -> bool {
        self.content_type
            .to_ascii_lowercase()
            .contains("text/event-stream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend((k.len() as u32).to_le_bytes());
            out.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend(*k);
            out.push(0);
            out.extend(*v);
            out.push(0);
        }
        out
    }

    #[test]
    fn decodes_a_map_and_reads_bad_utf8_lossily() {
        let raw = serialize(&[
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b"authorization", b"Bearer \xff\xfe"),
            (b"x-aex-provider-key", b""),
            (b"accept-encoding", b"gzip"),
            (b"content-length", b"42"),
            (b"authorization", b"Bearer second"),
        ]);
        assert_eq!(raw_pairs(&raw).len(), 7);
        let h = RequestHeaders::from_map(&raw);
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.authorization.as_deref(), Some("Bearer \u{fffd}\u{fffd}"));
        assert_eq!(h.content_length.as_deref(), Some("42"));
        assert_eq!(h.passthrough_key, None, "an empty key is no key");
        assert!(h.has_passthrough && !h.has_upstream);
        assert_eq!((h.accept_encodings, h.accepts_identity), (1, false));
        assert!(h.client_credentials.is_empty());
    }

    #[test]
    fn notes_each_client_credential_header_once() {
        let raw = serialize(&[
            (b"api-key", b"sk-agent-own"),
            (b"x-api-key", b"k"),
            (b"openai-organization", b"org-1"),
            (b"api-key", b"again"),
            (b"openai-project", b"proj"),
            (b"x-goog-api-key", b"g"),
            (b"x-api-keys", b"not one of them"),
        ]);
        let h = RequestHeaders::from_map(&raw);
        assert_eq!(
            h.client_credentials,
            [
                "api-key",
                "x-api-key",
                "openai-organization",
                "openai-project",
                "x-goog-api-key"
            ]
        );
    }

    #[test]
    fn an_agent_s_own_key_keeps_its_billing_selectors() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b"openai-organization", b"org-1"),
            (b"x-api-key", b"k"),
            (b"openai-project", b"proj"),
        ];
        let daemon_key = RequestHeaders::from_map(&serialize(&pairs));
        assert_eq!(
            daemon_key.credentials_to_remove().collect::<Vec<_>>(),
            ["openai-organization", "x-api-key", "openai-project"]
        );
        let mut own = pairs.to_vec();
        own.push((b"x-aex-provider-key", b"sk-own"));
        let own_key = RequestHeaders::from_map(&serialize(&own));
        assert_eq!(
            own_key.credentials_to_remove().collect::<Vec<_>>(),
            ["x-api-key"]
        );
    }

    #[test]
    fn a_malformed_buffer_yields_what_could_be_read() {
        let raw = serialize(&[
            (b":status", b"200"),
            (b"content-type", b"text/event-stream"),
        ]);
        assert!(raw_pairs(&[]).is_empty());
        assert!(raw_pairs(&raw[..3]).is_empty());
        // Cut inside the second value: the first pair survives.
        let cut = &raw[..raw.len() - 5];
        assert_eq!(raw_pairs(cut), vec![(&b":status"[..], &b"200"[..])]);
        // A count far beyond the data, and lengths pointing past the end.
        let mut huge = raw.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(raw_pairs(&huge).len() <= 2);
        let mut long = raw.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(raw_pairs(&long).is_empty());
        for n in 0..raw.len() {
            raw_pairs(&raw[..n]);
        }
        let h = ResponseHeaders::from_map(&raw);
        assert_eq!(h.status, Some(200));
        assert!(h.is_event_stream());
        assert!(!h.encoded && !h.content_length);
    }

    #[test]
    fn a_compressed_response_is_flagged() {
        for (values, encoded) in [
            (&[][..], false),
            (&[&b"identity"[..]][..], false),
            (&[&b" Identity "[..]][..], false),
            (&[&b"gzip"[..]][..], true),
            (&[&b"identity"[..], &b"br"[..]][..], true),
        ] {
            let mut pairs: Vec<(&[u8], &[u8])> = vec![(b":status", b"200")];
            pairs.extend(values.iter().map(|v| (&b"content-encoding"[..], *v)));
            assert_eq!(
                ResponseHeaders::from_map(&serialize(&pairs)).encoded,
                encoded,
                "{values:?}"
            );
        }
    }
}
