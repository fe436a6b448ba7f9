//! Read-side statistics over the audit log and the ledger tables: enforcement summaries, burn
//! rates, timelines and recent events, for `aex status`, `aex metrics` and the dashboard. Runs on a
//! read-only connection, off the async runtime.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};
use serde::Serialize;

// A database only an older daemon wrote has no per-minute counts: it is read from the audit log.
use crate::store::{has_minute_counts as has_minutes, StoreError, COUNTED_KINDS};

/// One group of counted events: agent, kind, denial code, count and charges.
type Counted = (String, String, String, u64, u64);

/// The counted events with `ts_ms > since`, in groups by agent, kind and code (a group may come
/// twice: callers add them up). Whole minutes come from `audit_minutes`, the part-minute at the
/// start from the audit log, so a day costs a day of minutes, not a day of payloads.
fn counted_since(conn: &Connection, since: i64) -> Result<Vec<Counted>, StoreError> {
    let raw = format!(
        "SELECT agent_id, kind, COALESCE(json_extract(payload,'$.code'),''), COUNT(*),
                COALESCE(SUM(json_extract(payload,'$.charge_micros')),0)
         FROM audit WHERE ts_ms > ?1 AND ts_ms < ?2 AND kind IN {COUNTED_KINDS} GROUP BY 1, 2, 3"
    );
    let (sql, first_whole_minute) = if has_minutes(conn) {
        (
            format!(
                "SELECT agent_id, kind, code, SUM(n), SUM(charge) FROM audit_minutes
                 WHERE minute_ms >= ?2 GROUP BY 1, 2, 3 UNION ALL {raw}"
            ),
            (since.saturating_add(60_000)).div_euclid(60_000) * 60_000,
        )
    } else {
        (raw, i64::MAX)
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![since, first_whole_minute], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            u(r.get::<_, i64>(3)?),
            u(r.get::<_, i64>(4)?),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

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
    for (_, kind, code, n, charge) in counted_since(conn, since)? {
        match kind.as_str() {
            "request.allowed" => w.allowed += n,
            "request.denied" => {
                w.denied += n;
                *w.denied_by_code.entry(code).or_default() += n;
            }
            _ => w.spent_micros = w.spent_micros.saturating_add(charge),
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
    /// Σ of each agent's remaining: one agent's overrun does not take from the others'.
    pub remaining_micros: u64,
}

pub fn totals(agents: &[AgentMetrics]) -> Totals {
    agents.iter().fold(Totals::default(), |t, a| Totals {
        budget_micros: t.budget_micros.saturating_add(a.budget_micros),
        spent_micros: t.spent_micros.saturating_add(a.spent_micros),
        reserved_micros: t.reserved_micros.saturating_add(a.reserved_micros),
        remaining_micros: t.remaining_micros.saturating_add(a.remaining_micros),
    })
}

pub fn agent_metrics(
    conn: &Connection,
    now_ms: i64,
    window_ms: i64,
) -> Result<Vec<AgentMetrics>, StoreError> {
    let since = now_ms - window_ms.max(1);
    let mut per: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for (id, kind, _, n, charge) in counted_since(conn, since)? {
        if id.is_empty() {
            continue;
        }
        let e = per.entry(id).or_default();
        match kind.as_str() {
            "request.allowed" => e.0 += n,
            "request.denied" => {
                // Requests count every attempt, allowed or denied, as the totals do.
                e.0 += n;
                e.1 += n;
            }
            _ => e.2 = e.2.saturating_add(charge),
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
    // `start` is a whole minute: the per-minute counts answer it exactly.
    let sql = if has_minutes(conn) {
        "SELECT minute_ms, kind, SUM(n), SUM(charge) FROM audit_minutes WHERE minute_ms >= ?1 GROUP BY 1, 2"
            .to_string()
    } else {
        format!(
            "SELECT (ts_ms / 60000) * 60000, kind, COUNT(*), COALESCE(SUM(json_extract(payload,'$.charge_micros')),0)
             FROM audit WHERE ts_ms >= ?1 AND kind IN {COUNTED_KINDS} GROUP BY 1, 2"
        )
    };
    let mut stmt = conn.prepare_cached(&sql)?;
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
/// What an `agent.updated` event changed: limits as old → new, policy fields with their new
/// values, a cleared overrun block; "no change" when it changed nothing.
fn updated_summary(p: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for (key, label, unit) in [
        ("budget_micros", "budget", " µUSD"),
        ("rpm", "rpm", ""),
        ("tpm", "tpm", ""),
    ] {
        if let Some([old, new]) = p.get(key).and_then(|v| v.as_array()).map(Vec::as_slice) {
            if old != new {
                parts.push(format!("{label} {old}{unit} → {new}{unit}"));
            }
        }
    }
    if let Some(changed) = p.get("policy_changed").and_then(|v| v.as_object()) {
        for (k, v) in changed {
            parts.push(format!("{k} → {v}"));
        }
    }
    if p.get("overrun_block_cleared").and_then(|v| v.as_bool()) == Some(true) {
        parts.push("overrun block cleared".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join(", ")
    }
}

/// The newest `limit` events, and with them the newest `notable` ones that are not per-request
/// traffic (agent and config changes, overruns, expiries), so a flood of requests or denials
/// does not push those out of view.
pub fn recent_events(
    conn: &Connection,
    limit: u32,
    notable: u32,
) -> Result<Vec<RecentEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.seq, e.ts_ms, e.kind,
                COALESCE(a.name,
                         CASE WHEN e.agent_id <> '' THEN
                           (SELECT json_extract(d.payload, '$.name') FROM audit d
                             WHERE d.agent_id = e.agent_id AND d.kind = 'agent.deleted'
                             ORDER BY d.seq DESC LIMIT 1) END,
                         e.agent_id),
                e.request_id, e.payload
           FROM audit e LEFT JOIN agents a ON a.id = e.agent_id
          WHERE e.seq IN (SELECT seq FROM audit ORDER BY seq DESC LIMIT ?1)
             OR e.seq IN (SELECT seq FROM audit WHERE kind NOT IN
                  ('request.allowed','request.denied','request.settled','lease.granted','lease.returned')
                  ORDER BY seq DESC LIMIT ?2)
          ORDER BY e.seq DESC",
    )?;
    let rows = stmt.query_map(params![limit, notable], |r| {
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
            "agent.updated" => updated_summary(&p),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::audit::Chain;
    use crate::ledger::Op;
    use crate::store::{open_connection, Store, StoreOptions};

    /// Totals per (agent, kind, code): count and charges.
    type Totals = BTreeMap<(String, String, String), (u64, u64)>;

    /// What a database answers for windows starting anywhere around minute boundaries, as sorted
    /// totals, plus the timeline.
    fn answers(conn: &Connection, now: i64) -> (Vec<Totals>, String) {
        let sinces = [
            0,
            59_999,
            60_000,
            60_001,
            119_999,
            120_000,
            150_000,
            180_000,
            now - 1,
        ];
        let counted = sinces
            .iter()
            .map(|&since| {
                let mut m = BTreeMap::new();
                for (a, k, c, n, charge) in counted_since(conn, since).unwrap() {
                    let e: &mut (u64, u64) = m.entry((a, k, c)).or_default();
                    *e = (e.0 + n, e.1 + charge);
                }
                m
            })
            .collect();
        let timeline = serde_json::to_string(&timeline(conn, now, 5).unwrap()).unwrap();
        (counted, timeline)
    }

    #[test]
    fn per_minute_counts_answer_exactly_what_the_audit_log_does() {
        let dir = std::env::temp_dir().join(format!("aex-stats-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("aex.db");
        let (store, _) = Store::open(&db, StoreOptions::default()).unwrap();
        let mut chain = Chain::genesis();
        let mut ops = Vec::new();
        // Events on and around minute boundaries, in two batches so that a minute's counts are
        // added to, not overwritten.
        for (i, ts) in [
            0, 1, 59_999, 60_000, 60_001, 119_999, 120_000, 120_001, 179_999, 180_000, 200_000,
        ]
        .into_iter()
        .enumerate()
        {
            let agent = if i % 3 == 0 {
                ""
            } else if i % 2 == 0 {
                "ag_a"
            } else {
                "ag_b"
            };
            let code = if i % 2 == 0 { "x" } else { "y" };
            for (kind, payload) in [
                ("request.allowed", json!({ "reserved_micros": 5 })),
                (
                    "request.denied",
                    json!({ "code": code, "message": "m \"code\":\"z\"" }),
                ),
                (
                    "request.settled",
                    json!({ "charge_micros": 100 + i, "reserved_micros": 500 }),
                ),
                ("reservation.expired", json!({ "charge_micros": 7 })),
                ("agent.created", json!({ "name": "n" })),
            ] {
                ops.push(Op::Audit(chain.append(ts, kind, agent, "r", payload)));
            }
            if i == 4 {
                store
                    .submit(std::mem::take(&mut ops))
                    .blocking_recv()
                    .unwrap();
            }
        }
        // Minute 0 of the first batch again, for the same agent, kind and code.
        ops.push(Op::Audit(chain.append(
            2,
            "request.denied",
            "",
            "r",
            json!({ "code": "x" }),
        )));
        ops.push(Op::Audit(chain.append(
            3,
            "request.settled",
            "",
            "r",
            json!({ "charge_micros": 1 }),
        )));
        store.submit(ops).blocking_recv().unwrap();
        let now = 240_000;
        let conn = open_connection(&db).unwrap();
        let rolled = answers(&conn, now);
        assert!(rolled.0[0].values().map(|v| v.0).sum::<u64>() > 0);
        // The same questions answered from the audit log alone.
        conn.execute("DELETE FROM meta WHERE key = 'audit_minutes'", [])
            .unwrap();
        assert!(!has_minutes(&conn));
        assert_eq!(answers(&conn, now), rolled);
        // A database written before the counts existed gets them on its next open.
        conn.execute("DELETE FROM audit_minutes", []).unwrap();
        drop(conn);
        let conn = open_connection(&db).unwrap();
        assert!(has_minutes(&conn));
        assert_eq!(answers(&conn, now), rolled);
        drop(conn);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_update_is_summarised_by_what_it_changed() {
        let p = serde_json::json!({
            "budget_micros": [500_000, 5_000_000], "rpm": [600, 600], "tpm": [0, 0],
            "policy": {"allow_streaming": false}, "policy_changed": {"allow_streaming": false},
            "overrun_block_cleared": true,
        });
        assert_eq!(
            updated_summary(&p),
            "budget 500000 µUSD → 5000000 µUSD, allow_streaming → false, overrun block cleared"
        );
        let same = serde_json::json!({"budget_micros": [1, 1], "rpm": [2, 2], "tpm": [0, 0], "policy_changed": {}});
        assert_eq!(updated_summary(&same), "no change");
    }
}
