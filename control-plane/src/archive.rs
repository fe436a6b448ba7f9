//! Audit-log archiving: the oldest events move out of the database into a file, and the log
//! left behind stays verifiable on its own.
//!
//! `aex audit archive` writes the events after the previous archive, up to a chosen one, to a
//! JSON Lines file (one [`crate::audit::Event`] per line, the stored text unchanged so every
//! hash can be recomputed from it). The daemon then appends an `audit.archived` event ([`Archived`]): the
//! archived part's end (its last seq and hash: the next event's `prev_hash`) and its totals per
//! agent, counted from the first event ever. The archived rows leave the database in the
//! background, [`PRUNE_CHUNK`] per sweep, their per-minute counts with them.
//!
//! `aex audit` then checks the chain from that end, and `spent == Σ charges` with the archived
//! charges added; `aex audit --archive FILE…` also checks that the files chain from the first
//! event to the log and sum to the recorded totals.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection, OptionalExtension};

use crate::audit::{kind, Archived};
use crate::store::{self, StoreError};

/// Events newer than this are never archived: the dashboard and `aex status` count the last day
/// (archived events leave the per-minute counts), and a restart rebuilds the rate windows and
/// recognises re-sent reports from the last minutes of the log.
pub const MIN_AGE_MS: i64 = 24 * 60 * 60 * 1000;

/// Archived rows deleted per sweep (one a second): small enough that the commit it rides in
/// stays short, enough to empty a million events in under two minutes.
pub const PRUNE_CHUNK: i64 = 10_000;

/// The newest archive's record (the payload of the newest `audit.archived` event), if any.
pub fn newest(conn: &Connection) -> Result<Option<(u64, Archived)>, StoreError> {
    let row: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, payload FROM audit WHERE kind = ?1 ORDER BY seq DESC LIMIT 1",
            params![kind::AUDIT_ARCHIVED],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(seq, payload)| {
        let a = serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("audit/{seq}"), e.to_string()))?;
        Ok((u64::try_from(seq).unwrap_or(0), a))
    })
    .transpose()
}

/// What one event adds to an archive's totals.
pub fn add_event(a: &mut Archived, kind_: &str, agent_id: &str, payload: &str) {
    let counted = matches!(
        kind_,
        kind::REQUEST_SETTLED | kind::RESERVATION_EXPIRED | kind::OVERRUN
    );
    // Only the kinds with amounts are worth parsing.
    let p = if counted {
        serde_json::from_str(payload).unwrap_or_default()
    } else {
        serde_json::Value::Null
    };
    add_parsed(a, kind_, agent_id, &p);
}

/// [`add_event`] with the payload already parsed.
pub fn add_parsed(a: &mut Archived, kind_: &str, agent_id: &str, p: &serde_json::Value) {
    a.events += 1;
    let field = match kind_ {
        kind::REQUEST_SETTLED | kind::RESERVATION_EXPIRED => "charge_micros",
        kind::OVERRUN => "excess_micros",
        _ => return,
    };
    let n = p
        .get(field)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let sums = if field == "charge_micros" {
        &mut a.charges
    } else {
        &mut a.overruns
    };
    let sum = sums.entry(agent_id.to_string()).or_default();
    *sum = sum.saturating_add(n);
}

/// Why an archive up to `through_seq` cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Refused(String),
}

impl From<rusqlite::Error> for ArchiveError {
    fn from(e: rusqlite::Error) -> Self {
        ArchiveError::Store(e.into())
    }
}

/// The record of an archive of the events after `prev` up to `through_seq`: `prev`'s totals plus
/// those events', for the agents that exist now. The event at `through_seq` must be stored with
/// `through_hash` and be older than [`MIN_AGE_MS`] at `now_ms`.
pub fn next(
    conn: &Connection,
    prev: &Archived,
    through_seq: u64,
    through_hash: &str,
    file: &str,
    now_ms: i64,
) -> Result<Archived, ArchiveError> {
    if through_seq <= prev.through_seq {
        return Err(ArchiveError::Refused(format!(
            "the events up to {} are archived already",
            prev.through_seq
        )));
    }
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT ts_ms, hash FROM audit WHERE seq = ?1",
            params![i64::try_from(through_seq).unwrap_or(i64::MAX)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((ts_ms, hash)) = last else {
        return Err(ArchiveError::Refused(format!(
            "there is no audit event {through_seq}"
        )));
    };
    if hash != through_hash {
        return Err(ArchiveError::Refused(format!(
            "audit event {through_seq} is not the one archived (its hash differs)"
        )));
    }
    if ts_ms > now_ms - MIN_AGE_MS {
        return Err(ArchiveError::Refused(format!(
            "audit event {through_seq} is less than a day old: the last day stays in the database"
        )));
    }
    let mut next = prev.clone();
    next.through_seq = through_seq;
    next.through_hash = hash;
    next.file = file.to_string();
    let mut stmt =
        conn.prepare("SELECT kind, agent_id, payload FROM audit WHERE seq > ?1 AND seq <= ?2")?;
    let mut rows = stmt.query(params![
        i64::try_from(prev.through_seq).unwrap_or(i64::MAX),
        i64::try_from(through_seq).unwrap_or(i64::MAX)
    ])?;
    let mut counted = 0u64;
    while let Some(r) = rows.next()? {
        let (k, agent, payload): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        add_event(&mut next, &k, &agent, &payload);
        counted += 1;
    }
    if counted != through_seq - prev.through_seq {
        return Err(ArchiveError::Refused(format!(
            "the log holds {counted} of the events {}..={through_seq}: run `aex audit`",
            prev.through_seq + 1
        )));
    }
    // Deleted agents' totals go: no invariant is checked for them any more.
    let agents: std::collections::HashSet<String> = conn
        .prepare("SELECT id FROM agents")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())?;
    next.charges.retain(|id, _| agents.contains(id));
    next.overruns.retain(|id, _| agents.contains(id));
    Ok(next)
}

/// Deletes up to [`PRUNE_CHUNK`] of the oldest events at or before `through_seq`, and takes
/// their counts out of `audit_minutes` (which then still equals the log it summarises).
pub fn prune_chunk(tx: &rusqlite::Transaction<'_>, through_seq: u64) -> Result<(), StoreError> {
    let through = i64::try_from(through_seq).unwrap_or(i64::MAX);
    let mut minutes: HashMap<(i64, String, String, String), (i64, i64)> = HashMap::new();
    let mut newest = None;
    {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, ts_ms, kind, agent_id, payload FROM audit WHERE seq <= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![through, PRUNE_CHUNK])?;
        while let Some(r) = rows.next()? {
            newest = Some(r.get::<_, i64>(0)?);
            let (ts_ms, k, agent, payload): (i64, String, String, String) =
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            if let Some((minute, code, charge)) = store::minute_of(ts_ms, &k, &payload) {
                let m = minutes.entry((minute, agent, k, code)).or_insert((0, 0));
                *m = (m.0 + 1, m.1.saturating_add(charge));
            }
        }
    }
    let Some(newest) = newest else {
        return Ok(());
    };
    tx.prepare_cached("DELETE FROM audit WHERE seq <= ?1")?
        .execute(params![newest])?;
    for ((minute, agent, k, code), (n, charge)) in &minutes {
        tx.prepare_cached(
            "UPDATE audit_minutes SET n = n - ?5, charge = charge - ?6
             WHERE minute_ms = ?1 AND agent_id = ?2 AND kind = ?3 AND code = ?4",
        )?
        .execute(params![minute, agent, k, code, n, charge])?;
        tx.prepare_cached(
            "DELETE FROM audit_minutes
             WHERE minute_ms = ?1 AND agent_id = ?2 AND kind = ?3 AND code = ?4 AND n <= 0",
        )?
        .execute(params![minute, agent, k, code])?;
    }
    Ok(())
}

/// The archived events still in the database after `archived` (none once pruning caught up):
/// what the sweeps have left to delete.
pub fn pending(conn: &Connection, archived: &Archived) -> Result<u64, StoreError> {
    let first: Option<i64> = conn.query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))?;
    Ok(first.map_or(0, |f| {
        archived
            .through_seq
            .saturating_sub(u64::try_from(f).unwrap_or(0))
            .saturating_add(1)
    }))
}

/// Totals of several archives' worth of events, per agent: checked against a record. An agent
/// the files count but the record leaves out must be one deleted since (the record keeps every
/// agent that existed when it was made).
pub fn totals_match(
    counted: &Archived,
    recorded: &Archived,
    agents: &std::collections::HashSet<String>,
) -> Result<(), Vec<String>> {
    let mut out = Vec::new();
    if counted.events != recorded.events {
        out.push(format!(
            "the archives hold {} events, the log records {} archived",
            counted.events, recorded.events
        ));
    }
    let compare = |what: &str,
                   c: &BTreeMap<String, u64>,
                   r: &BTreeMap<String, u64>,
                   out: &mut Vec<String>| {
        for (agent, n) in r {
            let have = c.get(agent).copied().unwrap_or(0);
            if have != *n {
                out.push(format!(
                    "agent {agent}: the archives hold {have} µUSD of {what}, the log records {n}"
                ));
            }
        }
    };
    compare("charges", &counted.charges, &recorded.charges, &mut out);
    compare("overruns", &counted.overruns, &recorded.overruns, &mut out);
    for (what, c, r) in [
        ("charges", &counted.charges, &recorded.charges),
        ("overruns", &counted.overruns, &recorded.overruns),
    ] {
        for (agent, n) in c {
            if *n > 0 && !r.contains_key(agent) && agents.contains(agent) {
                out.push(format!(
                    "agent {agent}: the archives hold {n} µUSD of {what}, the log records none for this agent"
                ));
            }
        }
    }
    if out.is_empty() {
        Ok(())
    } else {
        Err(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_totals_must_name_every_agent_that_still_exists() {
        let of = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(a, n)| (a.to_string(), *n)).collect()
        };
        let counted = Archived {
            events: 9,
            charges: of(&[("kept", 5), ("gone", 3)]),
            overruns: of(&[("kept", 1)]),
            ..Default::default()
        };
        let agents: std::collections::HashSet<String> = ["kept".to_string()].into();
        // The record drops deleted agents only.
        let recorded = Archived {
            events: 9,
            charges: of(&[("kept", 5)]),
            overruns: of(&[("kept", 1)]),
            ..Default::default()
        };
        assert!(totals_match(&counted, &recorded, &agents).is_ok());
        // A record with an existing agent's entry removed (and its spent lowered to match) used
        // to pass: only the entries it holds were compared.
        let forged = Archived {
            overruns: BTreeMap::new(),
            charges: BTreeMap::new(),
            ..recorded.clone()
        };
        let e = totals_match(&counted, &forged, &agents).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|b| b.contains("agent kept")), "{e:?}");
        let fewer = Archived {
            events: 8,
            ..recorded
        };
        assert!(totals_match(&counted, &fewer, &agents).is_err());
    }
}
