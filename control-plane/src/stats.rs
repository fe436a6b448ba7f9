//! Read-side statistics over the audit log and the ledger tables: enforcement summaries, burn
//! rates, timelines and recent events, for `aex status`, `aex metrics` and the dashboard. Runs on a
//! read-only connection, off the async runtime.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug, Clone, Serialize, Default)]
pub struct WindowCounts {
    pub window_secs: i64,
    pub allowed: u64,
    pub denied: u64,
    pub denied_by_code: BTreeMap<String, u64>,
    pub spent_micros: u64,
}

/// Requests, denials by code and spend in the last `window_ms`.
pub fn window_counts(
    conn: &Connection,
    now_ms: i64,
    window_ms: i64,
) -> Result<WindowCounts, StoreError> {
    let since = now_ms - window_ms;
    let mut w = WindowCounts {
        window_secs: window_ms / 1000,
        ..Default::default()
    };
    let mut stmt = conn.prepare_cached(
        "SELECT kind, COALESCE(json_extract(payload,'$.code'),''), COUNT(*), COALESCE(SUM(json_extract(payload,'$.charge_micros')),0)
         FROM audit WHERE ts_ms > ?1 AND kind IN ('request.allowed','request.denied','request.settled','reservation.expired')
         GROUP BY kind, 2",
    )?;
    let rows = stmt.query_map(params![since], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (kind, code, n, charge) = row?;
        let n = u64::try_from(n).unwrap_or(0);
        match kind.as_str() {
            "request.allowed" => w.allowed += n,
            "request.denied" => {
                w.denied += n;
                *w.denied_by_code.entry(code).or_default() += n;
            }
            _ => w.spent_micros += u64::try_from(charge).unwrap_or(0),
        }
    }
    Ok(w)
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentMetrics {
    pub id: String,
    pub name: String,
    pub budget_micros: u64,
    pub spent_micros: u64,
    pub reserved_micros: u64,
    pub remaining_micros: u64,
    pub rpm: u32,
    pub blocked_overrun: bool,
    pub open_reservations: u64,
    /// Spend in the trailing window, scaled to one hour.
    pub burn_micros_per_hour: u64,
    pub window_spent_micros: u64,
    /// Seconds until the remaining budget is gone at the current burn rate; None = not burning.
    pub time_to_exhaustion_secs: Option<u64>,
    pub requests_in_window: u64,
    pub denials_in_window: u64,
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Sums over every agent, saturating (thousands of maximal budgets exceed 64 bits).
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub budget_micros: u64,
    pub spent_micros: u64,
    pub reserved_micros: u64,
}

pub fn totals(agents: &[AgentMetrics]) -> Totals {
    agents.iter().fold(Totals::default(), |t, a| Totals {
        budget_micros: t.budget_micros.saturating_add(a.budget_micros),
        spent_micros: t.spent_micros.saturating_add(a.spent_micros),
        reserved_micros: t.reserved_micros.saturating_add(a.reserved_micros),
    })
}

pub fn agent_metrics(
    conn: &Connection,
    now_ms: i64,
    window_ms: i64,
) -> Result<Vec<AgentMetrics>, StoreError> {
    let since = now_ms - window_ms.max(1);
    let mut per: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT agent_id, kind, COUNT(*), COALESCE(SUM(json_extract(payload,'$.charge_micros')),0) FROM audit
         WHERE ts_ms > ?1 AND agent_id != '' AND kind IN ('request.allowed','request.denied','request.settled','reservation.expired')
         GROUP BY agent_id, kind",
    )?;
    for row in stmt.query_map(params![since], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })? {
        let (id, kind, n, charge) = row?;
        let e = per.entry(id).or_default();
        match kind.as_str() {
            "request.allowed" => e.0 += u(n),
            "request.denied" => {
                // Requests count every attempt, allowed or denied, as the totals do.
                e.0 += u(n);
                e.1 += u(n);
            }
            _ => e.2 += u(charge),
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT a.id, a.name, a.budget, a.spent, a.reserved, a.rpm, a.blocked_overrun,
                (SELECT COUNT(*) FROM reservations r WHERE r.agent_id = a.id)
         FROM agents a ORDER BY a.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, u32>(5)?,
            r.get::<_, bool>(6)?,
            r.get::<_, i64>(7)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, budget, spent, reserved, rpm, blocked, open) = row?;
        let (requests, denials, window_spent) = per.get(&id).copied().unwrap_or_default();
        let (budget, spent, reserved) = (u(budget), u(spent), u(reserved));
        let remaining = budget.saturating_sub(spent.saturating_add(reserved));
        let burn =
            u64::try_from(u128::from(window_spent) * 3_600_000 / u128::from(u(window_ms.max(1))))
                .unwrap_or(u64::MAX);
        let tte = (burn > 0).then(|| {
            u64::try_from(u128::from(remaining) * 3600 / u128::from(burn)).unwrap_or(u64::MAX)
        });
        out.push(AgentMetrics {
            id,
            name,
            budget_micros: budget,
            spent_micros: spent,
            reserved_micros: reserved,
            remaining_micros: remaining,
            rpm,
            blocked_overrun: blocked,
            open_reservations: u(open),
            burn_micros_per_hour: burn,
            window_spent_micros: window_spent,
            time_to_exhaustion_secs: tte,
            requests_in_window: requests,
            denials_in_window: denials,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub minute_ms: i64,
    pub allowed: u64,
    pub denied: u64,
    pub spent_micros: u64,
}

/// Per-minute counts for the last `minutes` minutes, oldest first, with empty minutes filled in.
pub fn timeline(conn: &Connection, now_ms: i64, minutes: i64) -> Result<Vec<Bucket>, StoreError> {
    let end = now_ms - now_ms % 60_000;
    let start = end - (minutes - 1) * 60_000;
    let mut buckets: Vec<Bucket> = (0..minutes)
        .map(|i| Bucket {
            minute_ms: start + i * 60_000,
            allowed: 0,
            denied: 0,
            spent_micros: 0,
        })
        .collect();
    let mut stmt = conn.prepare_cached(
        "SELECT (ts_ms / 60000) * 60000, kind, COUNT(*), COALESCE(SUM(json_extract(payload,'$.charge_micros')),0) FROM audit
         WHERE ts_ms >= ?1 AND kind IN ('request.allowed','request.denied','request.settled','reservation.expired')
         GROUP BY 1, 2",
    )?;
    for row in stmt.query_map(params![start], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })? {
        let (minute, kind, n, charge) = row?;
        let Some(b) = usize::try_from((minute - start) / 60_000)
            .ok()
            .and_then(|i| buckets.get_mut(i))
        else {
            continue;
        };
        match kind.as_str() {
            "request.allowed" => b.allowed += u(n),
            "request.denied" => b.denied += u(n),
            _ => b.spent_micros += u(charge),
        }
    }
    Ok(buckets)
}

#[derive(Debug, Clone, Serialize)]
pub struct RecentEvent {
    pub seq: u64,
    pub ts_ms: i64,
    pub kind: String,
    pub agent: String,
    pub request_id: String,
    pub summary: String,
}

/// The newest events, newest first, with a one-line summary each. Events are named by their
/// agent's name; a deleted agent's by the name its `agent.deleted` event recorded (one probe of
/// the partial index `audit_deleted`). Events of no agent (unknown tokens, daemon events) look
/// nothing up.
pub fn recent_events(conn: &Connection, limit: u32) -> Result<Vec<RecentEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.seq, e.ts_ms, e.kind,
                COALESCE(a.name,
                         CASE WHEN e.agent_id <> '' THEN
                           (SELECT json_extract(d.payload, '$.name') FROM audit d
                             WHERE d.agent_id = e.agent_id AND d.kind = 'agent.deleted'
                             ORDER BY d.seq DESC LIMIT 1) END,
                         e.agent_id),
                e.request_id, e.payload
           FROM audit e LEFT JOIN agents a ON a.id = e.agent_id ORDER BY e.seq DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map(params![limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, ts_ms, kind, agent, request_id, payload) = row?;
        let p: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
        let s = |k: &str| {
            p.get(k)
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_default()
        };
        let summary = match kind.as_str() {
            "request.allowed" => format!("{} reserved {} µUSD", s("model"), s("reserved_micros")),
            "request.denied" => format!("{}: {}", s("code"), s("message")),
            "request.settled" => format!(
                "{} charged {} µUSD ({} in / {} out{})",
                s("model"),
                s("charge_micros"),
                s("input_tokens"),
                s("output_tokens"),
                if p.get("estimated").and_then(|v| v.as_bool()) == Some(true) {
                    ", estimated"
                } else {
                    ""
                }
            ),
            "reservation.expired" => format!("expired, charged {} µUSD", s("charge_micros")),
            "overrun" => format!("overrun by {} µUSD", s("excess_micros")),
            _ => payload.chars().take(120).collect(),
        };
        out.push(RecentEvent {
            seq: u(seq),
            ts_ms,
            kind,
            agent,
            request_id,
            summary,
        });
    }
    Ok(out)
}
