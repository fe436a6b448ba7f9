//! The worker's leases: budget credit and rate slots the control plane reserved for this worker,
//! so a request that fits is admitted here without a round trip.
//!
//! Bookkeeping per lease: `credit` is what was granted minus the worst case of every request in
//! flight under it minus the exact cost of every request settled under it, so the control plane's
//! reservation (granted minus settled costs) always covers what is in flight. A request whose
//! worst case does not fit, or that would need its output cap clamped, is not admitted here: it
//! goes to the control plane as before. Leases are given back once nothing runs under them and
//! they are idle, old, used up or void (the agent's lease epoch changed).

use std::collections::HashMap;

use aex_proto::v1 as pb;

/// No new request is admitted under a lease older than this, or than the shorter life the
/// control plane granted (a third of its reservation TTL).
pub use aex_proto::lease::MAX_AGE_MS;
/// A lease with no admission or settlement under it for this long is given back (its credit and
/// slots are then free for other workers, and `reserved` settles to zero when the agent is idle).
/// Long enough to carry an agent's loop across its think time between calls (a tool run, a
/// one-second stream read by a client that then thinks).
pub const IDLE_MS: u64 = 3_000;
/// An agent is worth a lease from its second request within [`IDLE_MS`] of the one before: a
/// lease held from then on would not have gone idle. A lone request goes to the control plane
/// alone rather than with a lease grant and return around it.
const RECENT_MS: u64 = IDLE_MS;
/// A lease this close to its maximum age (a quarter of it at most) no longer counts as held when
/// deciding to ask for one, so an agent with steady but sparse traffic gets its next lease before
/// this one stops admitting.
const RENEW_BEFORE_MS: u64 = 5_000;
/// After the control plane declined a lease for an agent, ask again no sooner than this.
const DECLINED_BACKOFF_MS: u64 = 500;
const MIN_WANT_SLOTS: u64 = 32;
const MAX_WANT_SLOTS: u64 = 4_096;
/// A lease is topped up while it can still admit this many more worst-case requests.
const LOW_WATER_UNITS: u64 = 8;

#[derive(Debug)]
struct Held {
    id: String,
    epoch: u64,
    credit: u64,
    slots: u32,
    inflight: u32,
    received_ms: u64,
    /// No admission once it is this old.
    max_age_ms: u64,
    last_used_ms: u64,
    void: bool,
    /// A settlement under it could not be reported: never returned (a return releases what
    /// is left, including that request's cost), so it expires and is charged in full.
    forfeit: bool,
}

impl Held {
    fn usable(&self, epoch: u64, now_ms: u64) -> bool {
        !self.void && self.epoch == epoch && self.slots > 0 && !self.old(now_ms)
    }

    fn old(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.received_ms) >= self.max_age_ms
    }

    fn renewing(&self, now_ms: u64) -> bool {
        let before = RENEW_BEFORE_MS.min(self.max_age_ms / 4);
        now_ms.saturating_sub(self.received_ms) >= self.max_age_ms - before
    }
}

#[derive(Debug, Default)]
struct AgentLeases {
    held: Vec<Held>,
    /// A lease request is in flight for this agent.
    pending: bool,
    declined_until_ms: u64,
    /// Requests seen in the current second and in the previous one (sizes the next lease).
    bucket_start_ms: u64,
    bucket: u64,
    last_bucket: u64,
    /// When the agent's last request came, and whether it came within [`RECENT_MS`] of the one
    /// before it.
    last_request_ms: Option<u64>,
    recent: bool,
}

impl AgentLeases {
    fn note_request(&mut self, now_ms: u64) {
        self.recent = self
            .last_request_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < RECENT_MS);
        self.last_request_ms = Some(now_ms);
        if now_ms.saturating_sub(self.bucket_start_ms) >= 1_000 {
            self.last_bucket = if now_ms.saturating_sub(self.bucket_start_ms) < 2_000 {
                self.bucket
            } else {
                0
            };
            self.bucket = 0;
            self.bucket_start_ms = now_ms;
        }
        self.bucket += 1;
    }
}

/// Every lease this worker holds, by agent id.
#[derive(Debug, Default)]
pub struct Book {
    agents: HashMap<String, AgentLeases>,
}

impl Book {
    /// Admits a request whose worst case is `worst` under one of the agent's usable leases;
    /// returns the lease id.
    pub fn admit(&mut self, agent_id: &str, epoch: u64, worst: u64, now_ms: u64) -> Option<String> {
        let a = self.agents.get_mut(agent_id)?;
        let h = a
            .held
            .iter_mut()
            .rev()
            .find(|h| h.usable(epoch, now_ms) && h.credit >= worst)?;
        h.credit -= worst;
        h.slots -= 1;
        h.inflight += 1;
        h.last_used_ms = now_ms;
        Some(h.id.clone())
    }

    /// Counts one of the agent's requests (sizes and triggers its leases); call once per request,
    /// before [`Book::want`]. The key is allocated only for an agent not seen yet.
    pub fn note_request(&mut self, agent_id: &str, now_ms: u64) {
        match self.agents.get_mut(agent_id) {
            Some(a) => a.note_request(now_ms),
            None => {
                let mut a = AgentLeases::default();
                a.note_request(now_ms);
                self.agents.insert(agent_id.to_string(), a);
            }
        }
    }

    /// A request admitted under `lease_id` ended: its worst case comes back to the lease's credit
    /// minus what it actually cost. Usage above the worst case voids the lease.
    pub fn settle(&mut self, agent_id: &str, lease_id: &str, worst: u64, cost: u64, now_ms: u64) {
        let Some(h) = self
            .agents
            .get_mut(agent_id)
            .and_then(|a| a.held.iter_mut().find(|h| h.id == lease_id))
        else {
            return;
        };
        h.inflight = h.inflight.saturating_sub(1);
        h.last_used_ms = h.last_used_ms.max(now_ms);
        if cost > worst {
            h.void = true;
            h.credit = h.credit.saturating_sub(cost - worst);
        } else {
            h.credit = h.credit.saturating_add(worst - cost);
        }
    }

    /// Whether to ask for a (new) lease for the agent, and how big: when no usable lease is held
    /// or the held ones run low. Marks the request pending; the answer goes to [`Book::granted`]
    /// or [`Book::declined`].
    pub fn want(
        &mut self,
        agent_id: &str,
        epoch: u64,
        unit: u64,
        now_ms: u64,
    ) -> Option<pb::LeaseWant> {
        if unit == 0 {
            return None;
        }
        // No entry: no request noted, so none recent.
        let a = self.agents.get_mut(agent_id)?;
        let rate = a.bucket.max(a.last_bucket);
        if a.pending || now_ms < a.declined_until_ms || !a.recent {
            return None;
        }
        let slots = rate.saturating_mul(2).clamp(MIN_WANT_SLOTS, MAX_WANT_SLOTS);
        let (mut credit, mut free_slots) = (0u64, 0u64);
        for h in a
            .held
            .iter()
            .filter(|h| h.usable(epoch, now_ms) && !h.renewing(now_ms))
        {
            credit = credit.saturating_add(h.credit);
            free_slots += u64::from(h.slots);
        }
        let low = credit < unit.saturating_mul(LOW_WATER_UNITS) || free_slots < slots / 4;
        if !low {
            return None;
        }
        a.pending = true;
        Some(pb::LeaseWant {
            unit_micros: unit,
            slots: u32::try_from(slots).unwrap_or(u32::MAX),
        })
    }

    pub fn granted(&mut self, agent_id: &str, lease: pb::Lease, now_ms: u64) {
        let a = self.agents.entry(agent_id.to_string()).or_default();
        a.pending = false;
        a.held.push(Held {
            id: lease.lease_id,
            epoch: lease.epoch,
            credit: lease.amount_micros,
            slots: lease.slots,
            inflight: 0,
            received_ms: now_ms,
            max_age_ms: match lease.max_age_ms {
                0 => MAX_AGE_MS,
                ms => ms.min(MAX_AGE_MS),
            },
            last_used_ms: now_ms,
            void: false,
            forfeit: false,
        });
    }

    pub fn declined(&mut self, agent_id: &str, now_ms: u64) {
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.pending = false;
            a.declined_until_ms = now_ms + DECLINED_BACKOFF_MS;
        }
    }

    /// The lease request could not be made or answered: allow another one.
    pub fn failed(&mut self, agent_id: &str) {
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.pending = false;
        }
    }

    /// Voids leases whose agent's epoch changed (or whose agent is gone) in a new policy snapshot.
    pub fn void_stale(&mut self, epoch_of: impl Fn(&str) -> Option<u64>) {
        for (agent_id, a) in &mut self.agents {
            let current = epoch_of(agent_id);
            for h in &mut a.held {
                if current != Some(h.epoch) {
                    h.void = true;
                }
            }
        }
    }

    /// Leases to give back now: nothing in flight, and idle, old, used up or void.
    /// A settlement under `lease_id` was dropped (the report queue was full): the lease admits
    /// no more and is never returned, so the control plane charges it in full on expiry, which
    /// covers the unreported request.
    pub fn forfeit(&mut self, agent_id: &str, lease_id: &str) {
        if let Some(h) = self
            .agents
            .get_mut(agent_id)
            .and_then(|a| a.held.iter_mut().find(|h| h.id == lease_id))
        {
            h.void = true;
            h.forfeit = true;
        }
    }

    pub fn take_returns(&mut self, now_ms: u64) -> Vec<pb::LeaseReturn> {
        let mut out = Vec::new();
        for (agent_id, a) in &mut self.agents {
            a.held.retain(|h| {
                let done = h.inflight == 0
                    && (h.void
                        || h.slots == 0
                        || h.credit == 0
                        || h.old(now_ms)
                        || now_ms.saturating_sub(h.last_used_ms) >= IDLE_MS);
                if done && !h.forfeit {
                    out.push(pb::LeaseReturn {
                        lease_id: h.id.clone(),
                        agent_id: agent_id.clone(),
                    });
                }
                !done
            });
        }
        // Forget agents with nothing held or pending and no recent request.
        self.agents.retain(|_, a| {
            !a.held.is_empty()
                || a.pending
                || a.declined_until_ms > now_ms
                || a.last_request_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) < RECENT_MS)
        });
        out
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.agents.values().map(|a| a.held.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, amount: u64, slots: u32, epoch: u64) -> pb::Lease {
        pb::Lease {
            lease_id: id.into(),
            amount_micros: amount,
            slots,
            epoch,
            max_age_ms: 0,
        }
    }

    #[test]
    fn a_lease_granted_a_shorter_life_stops_admitting_renews_and_is_returned_by_then() {
        let mut b = Book::default();
        b.granted(
            "a",
            pb::Lease {
                max_age_ms: 3_000,
                ..grant("l1", 1_000, 100, 7)
            },
            0,
        );
        assert!(b.admit("a", 7, 1, 2_999).is_some());
        b.settle("a", "l1", 1, 1, 2_999);
        assert_eq!(b.admit("a", 7, 1, 3_000), None, "too old");
        assert_eq!(
            b.take_returns(3_000).len(),
            1,
            "returned once nothing runs under it"
        );
        // Renewal starts a quarter of the life before its end, not 5 s before.
        b.granted(
            "a",
            pb::Lease {
                max_age_ms: 3_000,
                ..grant("l2", 1_000, 100, 7)
            },
            10_000,
        );
        assert!(!b.agents["a"].held[0].renewing(12_249));
        assert!(b.agents["a"].held[0].renewing(12_250));
        // A longer life than the filter's own is cut to it; 0 means the filter's own.
        b.granted(
            "a",
            pb::Lease {
                max_age_ms: 60_000,
                ..grant("l3", 1_000, 100, 7)
            },
            0,
        );
        b.granted("a", grant("l4", 1_000, 100, 7), 0);
        assert!(b.agents["a"].held[1..]
            .iter()
            .all(|h| h.max_age_ms == MAX_AGE_MS));
    }

    #[test]
    fn admits_within_credit_and_slots_and_gives_back_when_idle() {
        let mut b = Book::default();
        assert_eq!(b.admit("a", 1, 100, 0), None, "no lease yet");
        b.granted("a", grant("l1", 250, 3, 1), 0);
        assert_eq!(b.admit("a", 1, 100, 1).as_deref(), Some("l1"));
        assert_eq!(b.admit("a", 1, 100, 2).as_deref(), Some("l1"));
        assert_eq!(b.admit("a", 1, 100, 3), None, "50 credit left < 100");
        b.settle("a", "l1", 100, 30, 3);
        // 50 + (100 − 30) = 120.
        assert_eq!(b.admit("a", 1, 100, 4).as_deref(), Some("l1"));
        assert_eq!(b.admit("a", 1, 1, 5), None, "three slots used");
        assert!(b.take_returns(2_000).is_empty(), "requests still in flight");
        b.settle("a", "l1", 100, 100, 5);
        b.settle("a", "l1", 100, 100, 5);
        // Out of slots and drained: given back at once.
        let r = b.take_returns(6);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].lease_id, "l1");
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_lease_is_idle_three_seconds_after_its_last_admission_or_settlement() {
        let mut b = Book::default();
        b.granted("a", grant("l1", 1_000, 100, 1), 0);
        b.admit("a", 1, 10, 0);
        b.settle("a", "l1", 10, 5, 500);
        assert!(b.take_returns(500 + IDLE_MS - 1).is_empty());
        assert_eq!(b.take_returns(500 + IDLE_MS).len(), 1);
    }

    #[test]
    fn void_and_old_leases_admit_nothing() {
        let mut b = Book::default();
        b.granted("a", grant("l1", 1_000, 100, 7), 0);
        assert_eq!(b.admit("a", 8, 1, 1), None, "another epoch");
        assert!(b.admit("a", 7, 1, 1).is_some());
        assert_eq!(b.admit("a", 7, 1, MAX_AGE_MS), None, "too old");
        b.granted("a", grant("l2", 1_000, 100, 7), MAX_AGE_MS);
        b.void_stale(|_| Some(9));
        assert_eq!(b.admit("a", 7, 1, MAX_AGE_MS + 1), None);
        b.settle("a", "l1", 1, 1, 2);
        assert_eq!(b.take_returns(MAX_AGE_MS + 2).len(), 2);
    }

    #[test]
    fn a_forfeit_lease_admits_nothing_and_is_dropped_without_a_return() {
        let mut b = Book::default();
        b.granted("a", grant("l1", 1_000, 100, 1), 0);
        b.granted("a", grant("l2", 1_000, 100, 1), 0);
        b.admit("a", 1, 100, 1);
        b.forfeit("a", "l2");
        b.forfeit("a", "l0"); // unknown: nothing happens
        assert_eq!(
            b.admit("a", 1, 100, 2).as_deref(),
            Some("l1"),
            "l2 admits no more"
        );
        b.settle("a", "l2", 100, 40, 3);
        b.settle("a", "l1", 100, 40, 3);
        // Both drained and idle: l1 goes back, l2 is forgotten for the control plane to expire.
        let r = b.take_returns(3 + IDLE_MS);
        assert_eq!(
            r.iter().map(|x| x.lease_id.as_str()).collect::<Vec<_>>(),
            ["l1"]
        );
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn an_overrun_voids_the_lease() {
        let mut b = Book::default();
        b.granted("a", grant("l1", 1_000, 100, 1), 0);
        b.admit("a", 1, 100, 1);
        b.settle("a", "l1", 100, 150, 2);
        assert_eq!(b.admit("a", 1, 1, 2), None);
        assert_eq!(b.take_returns(3).len(), 1, "void: returned once drained");
    }

    #[test]
    fn asks_once_while_pending_and_backs_off_when_declined() {
        let mut b = Book::default();
        b.note_request("a", 0);
        assert!(
            b.want("a", 1, 500, 0).is_none(),
            "a lone request gets no lease"
        );
        b.note_request("a", 0);
        let w = b.want("a", 1, 500, 0).unwrap();
        assert_eq!((w.unit_micros, w.slots), (500, MIN_WANT_SLOTS as u32));
        assert!(b.want("a", 1, 500, 1).is_none(), "one request at a time");
        b.declined("a", 2);
        assert!(b.want("a", 1, 500, 3).is_none(), "backing off");
        assert!(b.want("a", 1, 500, 2 + DECLINED_BACKOFF_MS).is_some());
        b.granted("a", grant("l1", 100_000, 1_000, 1), 600);
        assert!(b.want("a", 1, 500, 601).is_none(), "plenty left");
        assert!(
            b.want("a", 1, 20_000, 602).is_some(),
            "credit low for big requests"
        );
    }

    #[test]
    fn a_sparse_agent_gets_a_lease_from_its_second_request_within_the_idle_time() {
        let mut b = Book::default();
        // One request every 4 s: each would find its lease idle, so none is asked for.
        for t in [0, 4_000, 8_000] {
            b.note_request("a", t);
            assert!(b.want("a", 1, 500, t).is_none(), "request at {t} ms");
        }
        // The next one 2.5 s later (an agent loop: a one-second stream, then a tool run).
        b.note_request("a", 10_500);
        assert!(b.want("a", 1, 500, 10_500).is_some());
        b.granted("a", grant("l1", 100_000, 100, 1), 10_501);
        b.admit("a", 1, 500, 13_000).unwrap();
        b.settle("a", "l1", 500, 100, 13_000);
        assert!(
            b.take_returns(13_000 + IDLE_MS - 1).is_empty(),
            "held across the think time"
        );
        assert_eq!(b.admit("a", 1, 500, 15_500).as_deref(), Some("l1"));
    }

    #[test]
    fn a_lease_near_its_max_age_is_renewed_before_it_stops_admitting() {
        let mut b = Book::default();
        b.note_request("a", 0);
        b.note_request("a", 1);
        b.want("a", 1, 500, 1).unwrap();
        b.granted("a", grant("l1", 1_000_000, 1_000, 1), 2);
        let before = 2 + MAX_AGE_MS - RENEW_BEFORE_MS - 1;
        b.note_request("a", before);
        assert!(
            b.want("a", 1, 500, before).is_none(),
            "plenty left, not yet old"
        );
        b.note_request("a", before + 1);
        assert!(
            b.want("a", 1, 500, before + 1).is_some(),
            "old: ask for the next one"
        );
        b.granted("a", grant("l2", 1_000_000, 1_000, 1), before + 2);
        assert_eq!(
            b.admit("a", 1, 500, before + 3).as_deref(),
            Some("l2"),
            "the newest first"
        );
    }

    #[test]
    fn lease_size_follows_the_request_rate() {
        let mut b = Book::default();
        for t in 0..1_000 {
            b.note_request("a", t);
        }
        // 1,000 requests per second → ask for two seconds' worth.
        let w = b.want("a", 1, 1, 1_000).unwrap();
        assert_eq!(w.slots, 2_000);
    }
}
