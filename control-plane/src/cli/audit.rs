//! `aex audit`: verifies the invariants of the ledger and the audit log straight from the
//! database (works with the daemon stopped), naming every breach by agent and event sequence.

use std::collections::HashMap;
use std::process::ExitCode;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{json, Value};

use crate::audit::{self, kind};
use crate::cli::{print_json, Ctx};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct Args {}

#[derive(Default)]
pub struct Report {
    checks: Vec<(String, Vec<String>)>,
    /// Usage charged above a reservation: not a breach (honesty beats the bound), listed apart.
    overruns: Vec<String>,
}

impl Report {
    fn check(&mut self, name: &str, breaches: Vec<String>) {
        self.checks.push((name.to_string(), breaches));
    }
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|(_, b)| b.is_empty())
    }
}

/// Finds what looks like a raw agent or admin token: `aex_` + ≥ 40 URL-safe characters.
fn contains_raw_token(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(pos) = s[i..].find("aex_") {
        let start = i + pos + 4;
        let run = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'-' || **c == b'_')
            .count();
        if run >= 40 {
            return true;
        }
        i = start;
    }
    false
}

pub fn verify(conn: &Connection) -> anyhow::Result<Report> {
    // One read transaction: every check sees the same snapshot, however many batches a running
    // daemon commits meanwhile (in WAL mode readers neither wait for nor block the writer).
    // It only reads, so it is rolled back when dropped.
    let _snapshot = conn.unchecked_transaction()?;
    let mut r = Report::default();
    let events = store::load_audit(conn, 0, u32::MAX, None)?;

    // 1. The chain, and its head against the head recorded with the last commit.
    let mut breaks: Vec<String> = audit::verify(&events)
        .into_iter()
        .map(|b| format!("event {}: {}", b.seq, b.reason))
        .collect();
    let head: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key='audit_head'", [], |x| {
            x.get(0)
        })
        .optional()?;
    if let Some(h) = head {
        let last = events
            .last()
            .map(|e| format!("{}:{}", e.seq, e.hash))
            .unwrap_or_default();
        if h != last {
            let seq = h.split(':').next().unwrap_or("?");
            breaks.push(format!(
                "event {seq}: the newest recorded event is missing (log truncated)"
            ));
        }
    }
    r.check("audit chain intact", breaks);

    // Per-agent sums from the log.
    let mut charges: HashMap<&str, u64> = HashMap::new();
    let mut overruns: HashMap<&str, u64> = HashMap::new();
    let mut negative = Vec::new();
    for e in &events {
        let p: Value = serde_json::from_str(&e.payload).unwrap_or(Value::Null);
        for (k, v) in p.as_object().into_iter().flatten() {
            if v.as_i64().is_some_and(|n| n < 0) {
                negative.push(format!("event {}: {k} = {v}", e.seq));
            }
        }
        let charge = p.get("charge_micros").and_then(Value::as_u64).unwrap_or(0);
        if e.kind == kind::REQUEST_SETTLED || e.kind == kind::RESERVATION_EXPIRED {
            *charges.entry(&e.agent_id).or_default() += charge;
        }
        if e.kind == kind::OVERRUN {
            *overruns.entry(&e.agent_id).or_default() +=
                p.get("excess_micros").and_then(Value::as_u64).unwrap_or(0);
        }
    }

    let mut raw: HashMap<String, (i64, i64, i64, i64)> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT id, name, budget, spent, reserved FROM agents")?;
        let rows = stmt.query_map([], |x| {
            Ok((
                x.get::<_, String>(0)?,
                x.get::<_, String>(1)?,
                x.get::<_, i64>(2)?,
                x.get::<_, i64>(3)?,
                x.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (id, name, budget, spent, reserved) = row?;
            let open: i64 = conn.query_row(
                "SELECT COALESCE(SUM(amount),0) FROM reservations WHERE agent_id=?1",
                [&id],
                |x| x.get(0),
            )?;
            names.insert(id.clone(), name);
            raw.insert(id, (budget, spent, reserved, open));
        }
    }
    let mut ids: Vec<&String> = raw.keys().collect();
    ids.sort_by_key(|id| names.get(*id).cloned().unwrap_or_default());
    let who = |id: &str| {
        format!(
            "agent {} ({id})",
            names.get(id).map(String::as_str).unwrap_or("?")
        )
    };

    for (id, (b, s, rs, o)) in &raw {
        for (field, v) in [
            ("budget", b),
            ("spent", s),
            ("reserved", rs),
            ("open reservations", o),
        ] {
            if *v < 0 {
                negative.push(format!("{}: {field} = {v}", who(id)));
            }
        }
    }

    let mut spent_breaches = Vec::new();
    let mut budget_breaches = Vec::new();
    let mut reserved_breaches = Vec::new();
    for id in ids {
        let (budget, spent, reserved, open) = raw[id];
        let logged = charges.get(id.as_str()).copied().unwrap_or(0);
        if u64::try_from(spent).ok() != Some(logged) {
            spent_breaches.push(format!(
                "{}: spent {spent} µUSD but settled charges in the log sum to {logged} µUSD",
                who(id)
            ));
        }
        let excess = (spent + reserved) - budget;
        let explained =
            i64::try_from(overruns.get(id.as_str()).copied().unwrap_or(0)).unwrap_or(i64::MAX);
        if excess > explained {
            budget_breaches.push(format!("{}: spent + reserved = {} µUSD exceeds the budget of {budget} µUSD by {excess}, overruns explain {explained}", who(id), spent + reserved));
        }
        if reserved != open {
            reserved_breaches.push(format!(
                "{}: reserved {reserved} µUSD but open reservations sum to {open} µUSD",
                who(id)
            ));
        }
    }
    r.check("spent == sum of settled charges", spent_breaches);
    r.check(
        "spent + reserved <= budget (overruns explained)",
        budget_breaches,
    );
    r.check("reserved == sum of open reservations", reserved_breaches);
    r.check("no negative values", negative);

    let mut tokens = Vec::new();
    for e in &events {
        if contains_raw_token(&e.payload) || contains_raw_token(&e.request_id) {
            tokens.push(format!(
                "event {}: payload holds what looks like a raw token",
                e.seq
            ));
        }
    }
    let mut stmt = conn.prepare("SELECT id, name, policy, token_sha256 FROM agents")?;
    let rows = stmt.query_map([], |x| {
        Ok((
            x.get::<_, String>(0)?,
            [
                x.get::<_, String>(1)?,
                x.get::<_, String>(2)?,
                x.get::<_, String>(3)?,
            ],
        ))
    })?;
    for row in rows {
        let (id, cols) = row?;
        if cols.iter().any(|c| contains_raw_token(c)) {
            tokens.push(format!(
                "{}: agent row holds what looks like a raw token",
                who(&id)
            ));
        }
    }
    r.check("no raw token stored", tokens);
    r.overruns = events
        .iter()
        .filter(|e| e.kind == kind::OVERRUN)
        .map(|e| format!("{} event {}: {}", who(&e.agent_id), e.seq, e.payload))
        .collect();
    Ok(r)
}

pub fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let path = ctx.home.db();
    anyhow::ensure!(
        path.exists(),
        "no database at {} (run `aex init` and `aex daemon start`)",
        path.display()
    );
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let report = verify(&conn)?;
    if ctx.json {
        print_json(&json!({
            "ok": report.ok(),
            "checks": report.checks.iter().map(|(n, b)| json!({ "check": n, "ok": b.is_empty(), "breaches": b })).collect::<Vec<_>>(),
            "overruns": report.overruns,
        }));
    } else {
        for (name, breaches) in &report.checks {
            println!(
                "{} {name}",
                if breaches.is_empty() { "ok  " } else { "FAIL" }
            );
            for b in breaches {
                println!("       {b}");
            }
        }
        if !report.overruns.is_empty() {
            println!("overruns (charged above their reservation; the agents were blocked):");
            for o in &report.overruns {
                println!("       {o}");
            }
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
