//! The hash-chained audit log: each event carries the SHA-256 of the previous one, so an edited,
//! inserted or deleted row breaks the chain from that point on.

use sha2::{Digest, Sha256};

/// `prev_hash` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Event kinds. Charges (`request.settled`, `reservation.expired`) carry `charge_micros`.
pub mod kind {
    pub const REQUEST_ALLOWED: &str = "request.allowed";
    pub const REQUEST_DENIED: &str = "request.denied";
    pub const REQUEST_SETTLED: &str = "request.settled";
    pub const RESERVATION_EXPIRED: &str = "reservation.expired";
    pub const OVERRUN: &str = "overrun";
    pub const LEASE_GRANTED: &str = "lease.granted";
    pub const LEASE_RETURNED: &str = "lease.returned";
    pub const AGENT_CREATED: &str = "agent.created";
    pub const AGENT_UPDATED: &str = "agent.updated";
    pub const AGENT_DELETED: &str = "agent.deleted";
    pub const TOKEN_ROTATED: &str = "token.rotated";
    pub const CONFIG_LOADED: &str = "config.loaded";
    pub const DAEMON_STARTED: &str = "daemon.started";
    /// The events up to `through_seq` were moved to an archive file (payload: [`super::Archived`]).
    pub const AUDIT_ARCHIVED: &str = "audit.archived";
}

/// The payload of an `audit.archived` event: where the log now starts and what the archived
/// part held, counted from the first event ever (each archive adds to the one before), so the
/// ledger's invariants still check against the log that is left.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Archived {
    /// The newest archived event and its hash: the next event's `prev_hash`.
    pub through_seq: u64,
    pub through_hash: String,
    /// Events archived so far.
    pub events: u64,
    /// Settled and expired charges archived, per agent id (agents that still exist).
    pub charges: std::collections::BTreeMap<String, u64>,
    /// Overrun excess archived, per agent id (agents that still exist).
    pub overruns: std::collections::BTreeMap<String, u64>,
    /// The file this archive went to, as the CLI named it.
    pub file: String,
}

/// An event as stored, and as an archive file holds it (one JSON object per line, the payload's
/// text exactly as hashed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub seq: u64,
    pub ts_ms: i64,
    pub kind: String,
    pub agent_id: String,
    pub request_id: String,
    /// Canonical JSON of the event's details, hashed as stored.
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash over an event's content and its predecessor's hash.
pub fn event_hash(
    prev_hash: &str,
    seq: u64,
    ts_ms: i64,
    kind: &str,
    agent_id: &str,
    request_id: &str,
    payload: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        prev_hash,
        &seq.to_string(),
        &ts_ms.to_string(),
        kind,
        agent_id,
        request_id,
        payload,
    ] {
        // Length-prefixed so no two different field splits hash alike.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The head of the chain: appends events in order.
#[derive(Debug, Clone)]
pub struct Chain {
    next_seq: u64,
    last_hash: String,
}

impl Chain {
    pub fn new(last_seq: u64, last_hash: String) -> Self {
        Self {
            next_seq: last_seq + 1,
            last_hash,
        }
    }

    /// The seq of the newest event appended (0: none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn genesis() -> Self {
        Self::new(0, GENESIS.to_string())
    }

    pub fn append(
        &mut self,
        ts_ms: i64,
        kind: &str,
        agent_id: &str,
        request_id: &str,
        payload: serde_json::Value,
    ) -> Event {
        self.append_json(ts_ms, kind, agent_id, request_id, payload.to_string())
    }

    /// `append` with the payload already serialized as a JSON object (the per-request events
    /// serialize a struct straight to text instead of building a `Value` first).
    pub fn append_json(
        &mut self,
        ts_ms: i64,
        kind: &str,
        agent_id: &str,
        request_id: &str,
        payload: String,
    ) -> Event {
        let seq = self.next_seq;
        let hash = event_hash(
            &self.last_hash,
            seq,
            ts_ms,
            kind,
            agent_id,
            request_id,
            &payload,
        );
        let ev = Event {
            seq,
            ts_ms,
            kind: kind.to_string(),
            agent_id: agent_id.to_string(),
            request_id: request_id.to_string(),
            payload,
            prev_hash: std::mem::replace(&mut self.last_hash, hash.clone()),
            hash,
        };
        self.next_seq += 1;
        ev
    }
}

/// A break in the chain: the first event whose stored link or hash does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub seq: u64,
    pub reason: String,
}

/// Verifies events in `seq` order; returns every break found.
pub fn verify<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<ChainBreak> {
    let mut v = ChainVerifier::default();
    let mut breaks = Vec::new();
    for ev in events {
        v.push(ev, &mut breaks);
    }
    breaks
}

/// [`verify`] one event at a time, so a log of any length is checked in bounded memory.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected_prev: String,
    expected_seq: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            expected_prev: GENESIS.to_string(),
            expected_seq: 1,
        }
    }
}

impl ChainVerifier {
    /// A verifier for the events after an archive's end (from the first event if none).
    pub fn after_archive(a: &Archived) -> Self {
        if a.through_seq == 0 {
            Self::default()
        } else {
            Self::after(a.through_seq, &a.through_hash)
        }
    }

    /// A verifier for the events after `seq`, whose hash is `hash` (the end of an archive).
    pub fn after(seq: u64, hash: &str) -> Self {
        ChainVerifier {
            expected_prev: hash.to_string(),
            expected_seq: seq + 1,
        }
    }

    /// The sequence number and hash of the last event checked (the start, before any).
    pub fn end(&self) -> (u64, &str) {
        (self.expected_seq - 1, &self.expected_prev)
    }

    /// Checks the next event against the ones before it, adding what breaks to `breaks`.
    pub fn push(&mut self, ev: &Event, breaks: &mut Vec<ChainBreak>) {
        if ev.seq != self.expected_seq {
            breaks.push(ChainBreak {
                seq: ev.seq,
                reason: format!(
                    "sequence gap: expected event {}, found {} (rows deleted?)",
                    self.expected_seq, ev.seq
                ),
            });
        }
        if ev.prev_hash != self.expected_prev {
            breaks.push(ChainBreak {
                seq: ev.seq,
                reason: "prev_hash does not match the previous event's hash".into(),
            });
        }
        let h = event_hash(
            &ev.prev_hash,
            ev.seq,
            ev.ts_ms,
            &ev.kind,
            &ev.agent_id,
            &ev.request_id,
            &ev.payload,
        );
        if h != ev.hash {
            breaks.push(ChainBreak {
                seq: ev.seq,
                reason: "content does not match its hash (row edited)".into(),
            });
        }
        self.expected_prev.clone_from(&ev.hash);
        self.expected_seq = ev.seq + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(n: usize) -> Vec<Event> {
        let mut c = Chain::genesis();
        (0..n)
            .map(|i| {
                c.append(
                    i as i64,
                    kind::REQUEST_ALLOWED,
                    "a",
                    &format!("r{i}"),
                    serde_json::json!({"i": i}),
                )
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        assert!(verify(&chain_of(10)).is_empty());
    }

    #[test]
    fn edit_delete_and_reorder_are_detected() {
        let mut evs = chain_of(5);
        evs[2].payload = "{\"i\":99}".into();
        let b = verify(&evs);
        assert_eq!(b[0].seq, 3);

        let mut evs = chain_of(5);
        evs.remove(1);
        let b = verify(&evs);
        assert_eq!(b[0].seq, 3);
        assert!(b[0].reason.contains("gap"));

        let mut evs = chain_of(5);
        evs.pop();
        assert!(
            verify(&evs).is_empty(),
            "truncating the tail is caught by comparing with the daemon's head, not here"
        );
    }

    #[test]
    fn chain_resumes_from_head() {
        let evs = chain_of(3);
        let mut c = Chain::new(3, evs[2].hash.clone());
        let mut all = evs.clone();
        all.push(c.append(9, kind::OVERRUN, "a", "r", serde_json::json!({})));
        assert!(verify(&all).is_empty());
    }
}
