//! Leases: budget credit and rate slots reserved in the ledger for one Envoy worker, so the filter
//! admits an agent's requests without a round trip each.
//!
//! A lease is a reservation (it counts in `reserved`, it is durable, it expires and is then
//! charged in full), so `spent + reserved ≤ budget` holds exactly as for single requests:
//! - Grant: at most 1/8 of what remains, and only when that covers several requests; rate slots
//!   are recorded in the agent's sliding window at grant time, at most 1/8 of the headroom, so
//!   the window never admits more than RPM.
//! - Admission (reported after the fact, in batches): the slot's timestamp moves from the grant
//!   time to now, so the request stays in the window for a full minute from when it ran.
//! - Settlement: the exact cost is charged against the lease (spent += cost, the lease and
//!   `reserved` shrink by as much), at the prices in force when the lease was granted.
//! - Return: the unused credit is released and unused slots leave the window.
//! - Aged out: once a lease is past its admitting life (plus [`LATE_REPORT_MS`] for the last
//!   admissions' reports), its unused slots leave the window though the lease stays open: a
//!   worker returns a lease only when no request under it is in flight, and slow requests
//!   (minutes-long completions) must not hold the agent's unused slots for the rest of a minute.
//!
//! Small budgets and small RPM get no lease, so near its limits an agent is decided request by
//! request, exactly as without leases.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use aex_proto::lease::MAX_AGE_MS;
use aex_proto::v1 as pb;
use serde_json::json;

use super::{id_key, Ledger, Op, Reservation};
use crate::audit::kind;
use crate::config::Catalog;
use crate::money;
use crate::redact;

/// Payload of `request.allowed` for an admission under a lease (one per request: serialized
/// straight to JSON, field order = the event's documented key order).
#[derive(serde::Serialize)]
struct LeasedAllowed<'a> {
    model: &'a str,
    stream: bool,
    reserved_micros: u64,
    input_token_bound: u64,
    output_token_bound: u64,
    clamp_output_tokens: u64,
    lease: &'a str,
}

/// Payload of `request.settled` for a request settled against its lease.
#[derive(serde::Serialize)]
struct LeasedSettled<'a> {
    charge_micros: u64,
    reserved_micros: u64,
    model: &'a str,
    input_tokens: u64,
    output_tokens: u64,
    cached_input_tokens: u64,
    reasoning_tokens: u64,
    estimated: bool,
    released: bool,
    upstream_status: u32,
    outcome: &'a str,
    had_reservation: bool,
    lease: &'a str,
}

/// Lease ids carry this prefix (request ids are `req_…`); a stored reservation with it is a lease.
pub const LEASE_PREFIX: &str = "lease_";
/// A lease takes at most 1/LEASE_SHARE of the remaining budget and of the RPM headroom.
const LEASE_SHARE: u64 = 8;
/// A lease must cover at least this many worst-case requests to be worth granting …
const MIN_UNITS: u64 = 4;
/// … and holds at most this many, or one per rate slot wanted if that is more.
const MAX_UNITS: u64 = 64;
/// Fewer rate slots than this are not worth a lease: decide request by request.
const MIN_SLOTS: u64 = 8;

/// How long after a lease stops admitting its admissions' reports may still arrive: the filter
/// reports every 20–50 ms, so this is many report intervals.
pub const LATE_REPORT_MS: i64 = 5_000;

/// How long a worker may admit under a lease: at most a third of the reservation TTL, so with a
/// short TTL the lease is drained and returned long before it would expire and be charged in
/// full while in use.
fn max_age_ms(reservation_ttl_ms: i64) -> u64 {
    MAX_AGE_MS.min(u64::try_from(reservation_ttl_ms / 3).unwrap_or(0))
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub agent_id: String,
    /// Still reserved.
    pub amount: u64,
    pub granted_micros: u64,
    pub slots: u32,
    pub slots_used: u32,
    pub granted_ms: i64,
    pub expires_ms: i64,
    /// Prices in force at grant: the filter bounded its admissions with these.
    pub catalog: Arc<Catalog>,
    /// Id of their stored price list (kept in the row's `model` column), so a restart charges
    /// the lease at them too.
    pub price_list: String,
    pub charged: u64,
    pub requests: u64,
    /// Requests admitted under it and not settled yet (id keys → their worst case): what a
    /// stop that cannot wait for them still has to cover ([`Ledger::shrink_leases_to_running`]).
    pub running: HashMap<u64, u64>,
}

impl Lease {
    pub(super) fn row(&self) -> Reservation {
        Reservation {
            request_id: self.id.clone(),
            agent_id: self.agent_id.clone(),
            model: self.price_list.clone(),
            amount: self.amount,
            input_bound: 0,
            output_cap: 0,
            created_ms: self.granted_ms,
            expires_ms: self.expires_ms,
            prices: money::Prices::default(),
            lease_counts: super::LeaseCounts {
                granted: self.granted_micros,
                charged: self.charged,
                requests: self.requests,
            },
        }
    }

    /// A lease found on disk at start (with the prices its row names): its slots are gone with
    /// the old process's windows. A row written before it kept its totals counts from here.
    pub(super) fn from_row(r: Reservation, catalog: Arc<Catalog>) -> Self {
        let counts = r.lease_counts;
        Lease {
            price_list: r.model,
            id: r.request_id,
            agent_id: r.agent_id,
            amount: r.amount,
            granted_micros: if counts.granted > 0 {
                counts.granted
            } else {
                r.amount
            },
            slots: 0,
            slots_used: 0,
            granted_ms: r.created_ms,
            expires_ms: r.expires_ms,
            catalog,
            charged: counts.charged,
            requests: counts.requests,
            running: HashMap::new(),
        }
    }
}

/// Drops minute-old entries and returns the agent's window.
pub(super) fn window<'a>(
    windows: &'a mut std::collections::HashMap<String, VecDeque<i64>>,
    agent_id: &str,
    now_ms: i64,
) -> &'a mut VecDeque<i64> {
    let w = windows.entry(agent_id.to_string()).or_default();
    while w.front().is_some_and(|t| *t <= now_ms - super::MINUTE_MS) {
        w.pop_front();
    }
    w
}

/// Removes up to `n` entries equal to `t` from a sorted window.
fn remove_at(w: &mut VecDeque<i64>, t: i64, n: usize) -> usize {
    let mut removed = 0;
    while removed < n {
        let i = w.partition_point(|x| *x < t);
        if w.get(i) != Some(&t) {
            break;
        }
        w.remove(i);
        removed += 1;
    }
    removed
}

impl Ledger {
    /// Grants a lease for the agent when its remaining budget and RPM headroom are large enough.
    fn grant_lease(
        &mut self,
        id: &str,
        agent_id: &str,
        want: &pb::LeaseWant,
        now_ms: i64,
    ) -> Option<pb::Lease> {
        let fresh_id = id.starts_with(LEASE_PREFIX)
            && id.len() <= 128
            && !self.leases.contains_key(id)
            && !self.closed.contains_key(&id_key(id));
        let agent = self.agents.get(agent_id)?;
        let held = self
            .lease_holds
            .get(agent_id)
            .is_some_and(|&until| until > now_ms);
        if !fresh_id || agent.blocked_overrun || want.unit_micros == 0 || self.stopping || held {
            return None;
        }
        // Enough for every slot wanted to run at the worst case, so a busy agent's lease runs
        // out of slots and credit together.
        let units = MAX_UNITS.max(u64::from(want.slots));
        let amount = want
            .unit_micros
            .saturating_mul(units)
            .min(agent.remaining() / LEASE_SHARE);
        if amount < want.unit_micros.saturating_mul(MIN_UNITS) {
            return None;
        }
        let rpm = u64::from(agent.rpm);
        let epoch = agent.lease_epoch;
        let w = window(&mut self.windows, agent_id, now_ms);
        let headroom = rpm.saturating_sub(w.len() as u64);
        let slots = u64::from(want.slots).min(headroom / LEASE_SHARE);
        if slots < MIN_SLOTS {
            return None;
        }
        w.extend(std::iter::repeat_n(now_ms, slots as usize));
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        let id = id.to_string();
        let lease = Lease {
            id: id.clone(),
            agent_id: agent_id.to_string(),
            amount,
            granted_micros: amount,
            slots,
            slots_used: 0,
            granted_ms: now_ms,
            expires_ms: now_ms + self.limits.reservation_ttl_ms,
            catalog: self.catalog.clone(),
            price_list: self.price_list.clone(),
            charged: 0,
            requests: 0,
            running: HashMap::new(),
        };
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.reserved = a.reserved.saturating_add(amount);
        }
        self.ops.push(Op::PutReservation(lease.row()));
        self.put_agent(agent_id);
        self.event(
            now_ms,
            kind::LEASE_GRANTED,
            agent_id,
            &id,
            json!({ "amount_micros": amount, "slots": slots, "expires_ms": lease.expires_ms }),
        );
        self.leases.insert(id.clone(), lease);
        Some(pb::Lease {
            lease_id: id,
            amount_micros: amount,
            slots,
            epoch,
            max_age_ms: max_age_ms(self.limits.reservation_ttl_ms),
        })
    }

    /// A worker's top-up request: checked like an Authorize (token, expiry, scope, block).
    pub fn lease(&mut self, req: &pb::LeaseRequest, now_ms: i64) -> pb::LeaseResponse {
        let ok = self.agents.get(&req.agent_id).is_some_and(|a| {
            crate::tokens::constant_time_eq(a.token_sha256.as_bytes(), req.token_sha256.as_bytes())
                && (a.token_expires_at == 0 || now_ms / 1000 < a.token_expires_at)
                && a.policy.scope == crate::policy::Scope::Execution
                // A tokens-per-minute limit is kept request by request in the ledger.
                && a.policy.tpm == 0
        });
        let lease = match (&req.want, ok) {
            (Some(want), true) => self.grant_lease(&req.lease_id, &req.agent_id, want, now_ms),
            _ => None,
        };
        pb::LeaseResponse { lease }
    }

    /// Records a request the filter admitted under a lease.
    pub fn admit(&mut self, a: &pb::LeasedAdmission, now_ms: i64) {
        let key = id_key(&a.request_id);
        // A retried report repeats admissions: record each once.
        if !self.agents.contains_key(&a.agent_id)
            || self.closed.contains_key(&key)
            || self.admitted.insert(key, now_ms).is_some()
        {
            return;
        }
        self.count(&a.agent_id, &a.model, "allowed");
        let granted_ms = self.leases.get_mut(&a.lease_id).and_then(|l| {
            l.requests += 1;
            l.running.insert(key, a.reserved_micros);
            // Its row keeps the count (written once per commit however many admissions).
            self.ops.push(Op::PutReservation(l.row()));
            (l.slots_used < l.slots).then(|| {
                l.slots_used += 1;
                l.granted_ms
            })
        });
        let w = window(&mut self.windows, &a.agent_id, now_ms);
        if let Some(g) = granted_ms {
            remove_at(w, g, 1);
        }
        // Now ≥ every entry: the window stays sorted.
        w.push_back(now_ms);
        let model = redact::client_text(&a.model, redact::MAX_NAME);
        self.event_of(
            now_ms,
            kind::REQUEST_ALLOWED,
            &a.agent_id,
            &a.request_id,
            &LeasedAllowed {
                model: &model,
                stream: a.stream,
                reserved_micros: a.reserved_micros,
                input_token_bound: a.input_token_bound,
                output_token_bound: a.output_cap_total,
                clamp_output_tokens: 0,
                lease: &a.lease_id,
            },
        );
        // A TPM limit set while the worker held this lease reaches it at its next sync: the
        // admissions it made meanwhile count in the token log all the same.
        let tokens = a.input_token_bound.saturating_add(a.output_cap_total);
        self.count_tokens(&a.agent_id, &a.request_id, tokens, now_ms);
    }

    /// At the end of a clean stop's drain: each lease this run granted that is still out (a
    /// request running under it outlasted the drain) keeps only the worst case of the requests
    /// still running under it; the rest of its credit goes back to the agent. A lease left open
    /// is charged in full when it expires after the restart: a stop that cut one long stream
    /// charged the lease's whole unused credit (a probe: 11,579 µUSD for ~19 used).
    pub fn shrink_leases_to_running(&mut self, since_ms: i64) {
        let mut changed = Vec::new();
        for l in self
            .leases
            .values_mut()
            .filter(|l| l.granted_ms >= since_ms)
        {
            let need: u64 = l.running.values().fold(0, |a, &w| a.saturating_add(w));
            if l.amount > need {
                changed.push((l.agent_id.clone(), l.amount - need));
                l.amount = need;
                self.ops.push(Op::PutReservation(l.row()));
            }
        }
        for (agent_id, freed) in changed {
            if let Some(a) = self.agents.get_mut(&agent_id) {
                a.reserved = a.reserved.saturating_sub(freed);
            }
            self.put_agent(&agent_id);
        }
    }

    /// Settles a request admitted under a lease: exact cost charged against the lease.
    pub(super) fn settle_leased(&mut self, s: &pb::Settlement, now_ms: i64) -> bool {
        if self.closed.contains_key(&id_key(&s.request_id)) {
            return false;
        }
        self.admitted.remove(&id_key(&s.request_id));
        if let Some(l) = self.leases.get_mut(&s.lease_id) {
            l.running.remove(&id_key(&s.request_id));
        }
        // Admitted under the lease: the request id never had a reservation row of its own.
        self.close_id(&s.request_id, now_ms, false);
        self.settle_tokens(&s.agent_id, s, now_ms);
        let model = redact::client_text(&s.model, redact::MAX_NAME);
        let outcome = redact::client_text(&s.outcome, redact::MAX_LABEL);
        if self.expired_leases.contains_key(&id_key(&s.lease_id)) {
            // The lease was charged in full when it expired: this cost is already in `spent`.
            self.event(
                now_ms,
                kind::REQUEST_SETTLED,
                &s.agent_id,
                &s.request_id,
                json!({
                    "charge_micros": 0, "reserved_micros": s.reserved_micros, "model": model,
                    "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
                    "estimated": s.estimated, "released": s.release, "outcome": outcome,
                    "lease": s.lease_id, "lease_expired": true,
                }),
            );
            return true;
        }
        let catalog = self
            .leases
            .get(&s.lease_id)
            .map_or_else(|| self.catalog.clone(), |l| l.catalog.clone());
        let prices = catalog.models.get(&s.model).and_then(|m| m.prices);
        let charge = super::settlement_charge(s, prices, s.reserved_micros);
        let from_lease = match self.leases.get_mut(&s.lease_id) {
            Some(l) => {
                let take = charge.min(l.amount);
                l.amount -= take;
                l.charged = l.charged.saturating_add(charge);
                let row = l.row();
                self.ops.push(Op::PutReservation(row));
                take
            }
            None => 0,
        };
        let Some(agent) = self.agents.get_mut(&s.agent_id) else {
            return true;
        };
        agent.reserved = agent.reserved.saturating_sub(from_lease);
        agent.spent = agent.spent.saturating_add(charge);
        let excess = charge
            .saturating_sub(s.reserved_micros)
            .max(charge - from_lease);
        if excess > 0 {
            agent.blocked_overrun = true;
            agent.lease_epoch += 1;
            self.version += 1;
            self.agent_versions.insert(s.agent_id.clone(), self.version);
        }
        let agent_id = s.agent_id.clone();
        self.put_agent(&agent_id);
        self.event_of(
            now_ms,
            kind::REQUEST_SETTLED,
            &agent_id,
            &s.request_id,
            &LeasedSettled {
                charge_micros: charge,
                reserved_micros: s.reserved_micros,
                model: &model,
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens,
                cached_input_tokens: s.cached_input_tokens,
                reasoning_tokens: s.reasoning_tokens,
                estimated: s.estimated,
                released: s.release,
                upstream_status: s.upstream_status,
                outcome: &outcome,
                had_reservation: from_lease > 0 || charge == 0,
                lease: &s.lease_id,
            },
        );
        if excess > 0 {
            self.event(now_ms, kind::OVERRUN, &agent_id, &s.request_id, json!({
                "charge_micros": charge, "reserved_micros": s.reserved_micros, "excess_micros": excess,
                "lease": s.lease_id,
            }));
        }
        true
    }

    /// A worker is done with a lease: release what is left and free its unused rate slots.
    pub fn return_lease(&mut self, r: &pb::LeaseReturn, now_ms: i64) {
        let Some(l) = self.leases.remove(&r.lease_id) else {
            // Never granted (or not yet: the worker gave up waiting): the id can no longer be.
            if r.lease_id.starts_with(LEASE_PREFIX)
                && !self.closed.contains_key(&id_key(&r.lease_id))
            {
                self.close(&r.lease_id, now_ms);
            }
            return;
        };
        self.close(&l.id, now_ms);
        let unused = l.slots.saturating_sub(l.slots_used) as usize;
        let freed = match self.windows.get_mut(&l.agent_id) {
            Some(w) => remove_at(w, l.granted_ms, unused),
            None => 0,
        };
        if let Some(a) = self.agents.get_mut(&l.agent_id) {
            a.reserved = a.reserved.saturating_sub(l.amount);
        }
        self.put_agent(&l.agent_id);
        self.event(now_ms, kind::LEASE_RETURNED, &l.agent_id, &l.id, json!({
            "released_micros": l.amount, "charged_micros": l.charged, "granted_micros": l.granted_micros,
            "requests": l.requests, "unused_slots": freed,
        }));
    }

    /// Frees the unused rate slots of leases that can admit no more (past their admitting life and
    /// [`LATE_REPORT_MS`]); the leases stay open until returned or expired. An admission
    /// reported later still enters the window, at its report time.
    pub(super) fn free_aged_slots(&mut self, now_ms: i64) {
        let life = i64::try_from(max_age_ms(self.limits.reservation_ttl_ms)).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(life.saturating_add(LATE_REPORT_MS));
        for l in self.leases.values_mut() {
            if l.granted_ms > cutoff || l.slots <= l.slots_used {
                continue;
            }
            if let Some(w) = self.windows.get_mut(&l.agent_id) {
                remove_at(w, l.granted_ms, (l.slots - l.slots_used) as usize);
            }
            l.slots = l.slots_used;
        }
    }

    /// Charges an unreturned lease in full (its worker never came back), like any reservation.
    pub(super) fn expire_lease(&mut self, id: &str, now_ms: i64, why: &str) {
        let Some(l) = self.leases.remove(id) else {
            return;
        };
        let keep = now_ms + super::EXPIRED_RETENTION_MS;
        self.close_id(&l.id, keep, true);
        self.expired_leases.insert(id_key(&l.id), keep);
        self.charge_in_full(&l.agent_id, l.amount);
        self.event(
            now_ms,
            kind::RESERVATION_EXPIRED,
            &l.agent_id,
            &l.id,
            json!({
                "charge_micros": l.amount, "reserved_micros": l.amount, "lease": true, "why": why,
                "created_ms": l.granted_ms,
            }),
        );
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{allowed, req, settle, with_agent};
    use super::*;
    use crate::ledger::{LedgerError, LEASE_HOLD_MS};
    use crate::policy::Policy;

    #[test]
    fn leased_event_payloads_are_the_bytes_json_would_write() {
        // The audit hash covers the payload text: the structs must serialize exactly as the
        // json! objects they replaced.
        let allowed = LeasedAllowed {
            model: "gpt-4o \"mini\" \u{e9}",
            stream: true,
            reserved_micros: u64::MAX,
            input_token_bound: 1_234,
            output_token_bound: 56,
            clamp_output_tokens: 0,
            lease: "lease_1",
        };
        let want = json!({
            "model": allowed.model, "stream": true, "reserved_micros": u64::MAX,
            "input_token_bound": 1_234, "output_token_bound": 56, "clamp_output_tokens": 0,
            "lease": "lease_1",
        });
        assert_eq!(serde_json::to_string(&allowed).unwrap(), want.to_string());
        let settled = LeasedSettled {
            charge_micros: 7,
            reserved_micros: 9,
            model: "m\n",
            input_tokens: 1,
            output_tokens: 2,
            cached_input_tokens: 3,
            reasoning_tokens: 4,
            estimated: false,
            released: true,
            upstream_status: 429,
            outcome: "upstream_error",
            had_reservation: true,
            lease: "",
        };
        let want = json!({
            "charge_micros": 7, "reserved_micros": 9, "model": "m\n",
            "input_tokens": 1, "output_tokens": 2,
            "cached_input_tokens": 3, "reasoning_tokens": 4,
            "estimated": false, "released": true, "upstream_status": 429,
            "outcome": "upstream_error", "had_reservation": true, "lease": "",
        });
        assert_eq!(serde_json::to_string(&settled).unwrap(), want.to_string());
    }

    fn want(unit: u64, slots: u32) -> pb::LeaseWant {
        pb::LeaseWant {
            unit_micros: unit,
            slots,
        }
    }

    fn lease_req(unit: u64, slots: u32) -> pb::LeaseRequest {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        pb::LeaseRequest {
            lease_id: format!("lease_t{}", N.fetch_add(1, Ordering::Relaxed)),
            agent_id: "a1".into(),
            token_sha256: "h".into(),
            want: Some(want(unit, slots)),
        }
    }

    fn admission(id: &str, lease: &pb::Lease, worst: u64) -> pb::LeasedAdmission {
        pb::LeasedAdmission {
            request_id: id.into(),
            agent_id: "a1".into(),
            lease_id: lease.lease_id.clone(),
            model: "m".into(),
            reserved_micros: worst,
            ..Default::default()
        }
    }

    fn leased(id: &str, lease: &pb::Lease, worst: u64, input: u64, output: u64) -> pb::Settlement {
        pb::Settlement {
            lease_id: lease.lease_id.clone(),
            reserved_micros: worst,
            model: "m".into(),
            ..settle(id, input, output)
        }
    }

    fn window_len(l: &Ledger) -> usize {
        l.windows.get("a1").map_or(0, VecDeque::len)
    }

    #[test]
    fn grants_an_eighth_of_what_remains_and_of_the_rate_headroom() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 500), 0).lease.unwrap();
        // min(500 units (one per slot wanted) = 500,000, 1,000,000 / 8 = 125,000);
        // min(500 slots, 1000 / 8 = 125).
        assert_eq!((g.amount_micros, g.slots), (125_000, 125));
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (0, 125_000));
        assert_eq!(window_len(&l), 125);
        assert_eq!(l.open_reservations("a1"), 1);
        let g = l.lease(&lease_req(20_000, 500), 0).lease.unwrap();
        assert_eq!(
            (g.amount_micros, g.slots),
            ((1_000_000 - 125_000) / 8, (1_000 - 125) / 8)
        );
        let g = l.lease(&lease_req(100, 20), 0).lease.unwrap();
        assert_eq!(
            g.amount_micros, 6_400,
            "at least 64 units when few slots are wanted"
        );
    }

    #[test]
    fn a_lease_lives_at_most_a_third_of_the_reservation_ttl() {
        assert_eq!(max_age_ms(3_600_000), MAX_AGE_MS);
        assert_eq!(max_age_ms(60_000), MAX_AGE_MS);
        assert_eq!(max_age_ms(10_000), 3_333);
        assert_eq!(max_age_ms(0), 0);
    }

    #[test]
    fn small_budgets_small_rpm_and_bad_tokens_get_no_lease() {
        let mut l = with_agent(10_000, 1_000, Policy::default());
        // 10,000 / 8 = 1,250 < 4 units of 1,000.
        assert!(l.lease(&lease_req(1_000, 100), 0).lease.is_none());
        let mut l = with_agent(1_000_000_000, 60, Policy::default());
        // 60 / 8 = 7 slots < 8.
        assert!(l.lease(&lease_req(1_000, 100), 0).lease.is_none());
        let mut l = with_agent(1_000_000_000, 1_000, Policy::default());
        let mut r = lease_req(1_000, 100);
        r.token_sha256 = "other".into();
        assert!(l.lease(&r, 0).lease.is_none());
        assert_eq!(l.agent("a1").unwrap().reserved, 0);
        assert_eq!(window_len(&l), 0);
        // A tokens-per-minute limit is kept request by request.
        let tpm = Policy {
            tpm: 1_000_000,
            ..Policy::default()
        };
        let mut l = with_agent(1_000_000_000, 1_000, tpm);
        assert!(l.lease(&lease_req(1_000, 100), 0).lease.is_none());
    }

    #[test]
    fn leased_requests_are_charged_exactly_and_the_rest_released_on_return() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        assert_eq!((g.amount_micros, g.slots), (100_000, 100));
        l.admit(&admission("r1", &g, 1_000), 10);
        l.admit(&admission("r2", &g, 1_000), 11);
        // Prices 1 and 2 µUSD per token.
        assert!(l.settle(&leased("r1", &g, 1_000, 100, 50), 20));
        assert!(
            !l.settle(&leased("r1", &g, 1_000, 100, 50), 21),
            "idempotent"
        );
        assert!(l.settle(&leased("r2", &g, 1_000, 10, 5), 22));
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (200 + 20, 100_000 - 220));
        l.return_lease(
            &pb::LeaseReturn {
                lease_id: g.lease_id.clone(),
                agent_id: "a1".into(),
            },
            30,
        );
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (220, 0));
        assert_eq!(l.open_reservations("a1"), 0);
        // The two requests stay in the window (at their admission time); 98 unused slots left it.
        assert_eq!(window_len(&l), 2);
        assert_eq!(l.windows["a1"], VecDeque::from(vec![10, 11]));
    }

    #[test]
    fn a_lease_that_can_admit_no_more_frees_its_unused_slots_though_requests_run_on() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        assert_eq!((g.slots, g.max_age_ms), (100, 20_000));
        l.admit(&admission("r1", &g, 1_000), 10);
        l.admit(&admission("r2", &g, 1_000), 11);
        // Still within its life and the reports' grace: the slots are the worker's.
        l.expire(20_000 + LATE_REPORT_MS - 1);
        assert_eq!(window_len(&l), 100);
        // After: the 98 unused leave (the minute would have kept them until 60 s); the lease,
        // its credit and its two requests in flight stay.
        l.expire(20_000 + LATE_REPORT_MS);
        assert_eq!(l.windows["a1"], VecDeque::from(vec![10, 11]));
        assert!(l.leases.contains_key(&g.lease_id));
        assert_eq!(l.agent("a1").unwrap().reserved, 100_000);
        // An admission reported even later still counts, at its report time; settling and
        // returning then work as ever.
        l.admit(&admission("r3", &g, 1_000), 26_000);
        assert_eq!(l.windows["a1"], VecDeque::from(vec![10, 11, 26_000]));
        assert!(l.settle(&leased("r1", &g, 1_000, 100, 50), 30_000));
        l.return_lease(
            &pb::LeaseReturn {
                lease_id: g.lease_id.clone(),
                agent_id: "a1".into(),
            },
            31_000,
        );
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (200, 0));
        assert_eq!(window_len(&l), 3);
    }

    #[test]
    fn a_shutdown_recalls_every_lease_and_grants_none() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        let epoch = l.agent("a1").unwrap().lease_epoch;
        assert_eq!(l.recall_leases(), 1);
        // The epoch workers hold the lease under changed: they void it and return it.
        assert_ne!(l.agent("a1").unwrap().lease_epoch, epoch);
        assert!(l.lease(&lease_req(1_000, 100), 1).lease.is_none());
        l.return_lease(
            &pb::LeaseReturn {
                lease_id: g.lease_id.clone(),
                agent_id: "a1".into(),
            },
            2,
        );
        assert_eq!((l.open_leases(), l.agent("a1").unwrap().reserved), (0, 0));
    }

    #[test]
    fn lowering_a_busy_agent_s_budget_recalls_its_leases_and_holds_new_ones() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        let held = l.agent("a1").unwrap().reserved;
        assert!(held > 0);
        // The lease's unused credit counts as held: the budget cannot go under it yet.
        let lower = |l: &mut Ledger, now| {
            l.update_agent("atlas", now, |a| {
                a.budget = 1_000;
                Ok(())
            })
            .map(|_| ())
        };
        assert!(matches!(
            lower(&mut l, 1),
            Err(LedgerError::BelowCommitted(_))
        ));
        let epoch = l.agent("a1").unwrap().lease_epoch;
        assert_eq!(l.recall_agent_leases("a1", 1), 1);
        assert_ne!(l.agent("a1").unwrap().lease_epoch, epoch);
        // No new lease while the change waits for the old one to come back.
        assert!(l.lease(&lease_req(1_000, 100), 2).lease.is_none());
        l.return_lease(
            &pb::LeaseReturn {
                lease_id: g.lease_id.clone(),
                agent_id: "a1".into(),
            },
            3,
        );
        lower(&mut l, 4).unwrap();
        let a = l.agent("a1").unwrap();
        assert_eq!((a.budget, a.reserved), (1_000, 0));
        // Leases are granted again after the hold (as far as the budget affords).
        l.update_agent("atlas", 5, |a| {
            a.budget = 1_000_000;
            Ok(())
        })
        .unwrap();
        assert!(l
            .lease(&lease_req(1_000, 100), 4 + LEASE_HOLD_MS)
            .lease
            .is_some());
    }

    #[test]
    fn a_lease_a_stop_leaves_out_keeps_only_what_still_runs_under_it() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        l.admit(&admission("r1", &g, 300), 1);
        l.admit(&admission("r2", &g, 200), 2);
        assert!(l.settle(&leased("r1", &g, 300, 10, 10), 3));
        let spent = l.agent("a1").unwrap().spent;
        // r2 outlasts the drain: the lease keeps r2's worst case, the rest goes back.
        l.shrink_leases_to_running(0);
        assert_eq!(l.leases[&g.lease_id].amount, 200);
        assert_eq!(l.agent("a1").unwrap().reserved, 200);
        // Expired after the restart: charged 200, not the lease's whole credit.
        let expires = l.leases[&g.lease_id].expires_ms;
        l.expire(expires + 1);
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (spent + 200, 0));
    }

    #[test]
    fn a_stopping_control_plane_admits_nothing_new() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        l.recall_leases();
        let r = l.authorize(&req("r1", 10, 10), 1);
        assert_eq!(r.deny_code, "governance_unavailable");
        assert_eq!(l.open_this_run(), (0, 0));
    }

    #[test]
    fn a_lease_returned_before_its_grant_is_never_granted() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let r = lease_req(1_000, 100);
        l.return_lease(
            &pb::LeaseReturn {
                lease_id: r.lease_id.clone(),
                agent_id: "a1".into(),
            },
            0,
        );
        assert!(l.lease(&r, 1).lease.is_none());
        let mut other = lease_req(1_000, 100);
        other.lease_id = "not-a-lease-id".into();
        assert!(l.lease(&other, 1).lease.is_none());
        assert_eq!(l.agent("a1").unwrap().reserved, 0);
        let again = lease_req(1_000, 100);
        assert!(l.lease(&again, 2).lease.is_some());
        assert!(l.lease(&again, 3).lease.is_none(), "an id is granted once");
    }

    #[test]
    fn a_retried_admission_is_recorded_once() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        l.admit(&admission("r1", &g, 1_000), 10);
        l.admit(&admission("r1", &g, 1_000), 11);
        assert_eq!(l.leases[&g.lease_id].slots_used, 1);
        assert_eq!(window_len(&l), 100);
    }

    #[test]
    fn an_unreturned_lease_expires_and_is_charged_in_full_once() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        l.admit(&admission("r1", &g, 1_000), 10);
        assert_eq!(l.expire(59_999), 0);
        assert_eq!(l.expire(60_000), 1);
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.reserved), (100_000, 0));
        // The request's late settlement is already paid for by the full charge.
        assert!(l.settle(&leased("r1", &g, 1_000, 100, 50), 60_001));
        assert_eq!(l.agent("a1").unwrap().spent, 100_000);
        // So is one that comes much later (a stream that outlasted the TTL by minutes).
        l.admit(&admission("r2", &g, 1_000), 20);
        assert_eq!(l.expire(60_000 + 10 * 60_000), 0);
        assert!(l.settle(&leased("r2", &g, 1_000, 100, 50), 60_000 + 10 * 60_000));
        let a = l.agent("a1").unwrap();
        assert_eq!((a.spent, a.blocked_overrun), (100_000, false));
    }

    #[test]
    fn usage_above_the_bound_is_charged_flagged_and_blocks() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let epoch = l.agent("a1").unwrap().lease_epoch;
        let g = l.lease(&lease_req(1_000, 100), 0).lease.unwrap();
        l.admit(&admission("r1", &g, 100), 10);
        // 100 + 2×100 = 300 > the 100 the filter held.
        l.settle(&leased("r1", &g, 100, 100, 100), 20);
        let a = l.agent("a1").unwrap();
        assert_eq!(a.spent, 300);
        assert!(a.blocked_overrun);
        assert_ne!(a.lease_epoch, epoch, "workers drop the agent's leases");
        assert!(l.lease(&lease_req(1_000, 100), 30).lease.is_none());
    }

    #[test]
    fn policy_token_and_price_changes_void_leases() {
        let mut l = with_agent(1_000_000, 1_000, Policy::default());
        let e0 = l.agent("a1").unwrap().lease_epoch;
        l.update_agent("atlas", 1, |a| {
            a.rpm = 2_000;
            Ok(())
        })
        .unwrap();
        let e1 = l.agent("a1").unwrap().lease_epoch;
        assert_ne!(e0, e1);
        l.rotate_token("atlas", "h2".into(), None, 2).unwrap();
        let e2 = l.agent("a1").unwrap().lease_epoch;
        assert_ne!(e1, e2);
        let cat = l.catalog().clone();
        l.set_catalog(cat, 3);
        assert_ne!(l.agent("a1").unwrap().lease_epoch, e2);
    }

    #[test]
    fn leases_never_let_the_window_pass_rpm_or_the_budget_be_exceeded() {
        let rpm = 200;
        let mut l = with_agent(5_000_000, rpm, Policy::default());
        let mut open: Vec<(pb::Lease, u32)> = Vec::new();
        let mut n = 0;
        // Within one minute: leases and single requests compete for the same window.
        for t in 0..400_i64 {
            let now = t * 100;
            if t % 3 == 0 {
                if let Some(g) = l.lease(&lease_req(2_000, 64), now).lease {
                    open.push((g, 0));
                }
            }
            for (g, used) in open.iter_mut() {
                if *used < g.slots {
                    n += 1;
                    let id = format!("l{n}");
                    l.admit(&admission(&id, g, 2_000), now);
                    l.settle(&leased(&id, g, 2_000, 500, 100), now);
                    *used += 1;
                }
            }
            let r = req(&format!("q{t}"), 500, 100);
            if allowed(&l.authorize(&r, now)) {
                l.settle(&settle(&format!("q{t}"), 500, 100), now);
            }
            if t % 7 == 0 {
                for (g, _) in open.drain(..) {
                    l.return_lease(
                        &pb::LeaseReturn {
                            lease_id: g.lease_id,
                            agent_id: "a1".into(),
                        },
                        now,
                    );
                }
            }
            let w = window(&mut l.windows, "a1", now);
            assert!(
                w.len() as u64 <= u64::from(rpm),
                "window {} at {now}",
                w.len()
            );
            let a = l.agent("a1").unwrap();
            assert!(a.spent + a.reserved <= a.budget);
        }
    }
}
