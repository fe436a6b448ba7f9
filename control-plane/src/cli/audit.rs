//! `aex audit`: verifies the invariants of the ledger and the audit log straight from the
//! database (works with the daemon stopped), naming every breach by agent and event sequence.
//! Negative numbers and raw tokens are looked for in every cell of every table.

use std::collections::HashMap;
use std::process::ExitCode;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use serde_json::{json, Value};

use crate::archive;
use crate::audit::{self, kind};
use crate::cli::{print_json, Ctx};
use crate::store;
use crate::{redact, tokens};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Instead of verifying, print the audit events of one request: the id every answer
    /// carries in `x-aex-request-id` (exit status 1 if it has none).
    #[arg(long, value_name = "ID")]
    request: Option<String>,
    /// Also verify archive files that `aex audit archive` wrote: every one since the first,
    /// they must chain from the first event to the log and hold the totals it records.
    #[arg(long = "archive", value_name = "FILE")]
    archives: Vec<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Move the events older than an age out of the database into a file (the log left behind
    /// stays verifiable; the daemon must be running).
    Archive(super::archive::Args),
}

/// The events recorded under one request id, oldest first (a full scan: an occasional lookup
/// does not earn an index on every event).
fn request_events(conn: &Connection, request_id: &str) -> rusqlite::Result<Vec<Value>> {
    let mut stmt = conn.prepare(
        "SELECT a.seq, a.ts_ms, a.kind, a.agent_id, COALESCE(g.name, ''), a.payload
         FROM audit a LEFT JOIN agents g ON g.id = a.agent_id
         WHERE a.request_id = ?1 ORDER BY a.seq",
    )?;
    let rows = stmt.query_map([request_id], |r| {
        let payload: String = r.get(5)?;
        Ok(json!({
            "seq": r.get::<_, i64>(0)?,
            "ts_ms": r.get::<_, i64>(1)?,
            "kind": r.get::<_, String>(2)?,
            "agent_id": r.get::<_, String>(3)?,
            "agent": r.get::<_, String>(4)?,
            "payload": serde_json::from_str::<Value>(&payload).unwrap_or(Value::String(payload)),
        }))
    })?;
    rows.collect()
}

fn show_request(ctx: &Ctx, conn: &Connection, request_id: &str) -> anyhow::Result<ExitCode> {
    // An empty id would list every event recorded without one (agent and config changes).
    anyhow::ensure!(
        !request_id.trim().is_empty(),
        "--request needs a request id (an answer's x-aex-request-id, e.g. req_…)"
    );
    let events = request_events(conn, request_id)?;
    let archived = archive::newest(conn)?.map(|(_, a)| a);
    if ctx.json {
        print_json(&json!({ "request_id": request_id, "events": events }));
    } else if events.is_empty() {
        match archived {
            Some(a) => eprintln!(
                "no audit events for request {request_id} in the database (events up to {} are archived, the newest in {})",
                a.through_seq, a.file
            ),
            None => eprintln!("no audit events for request {request_id}"),
        }
    } else {
        for e in &events {
            let secs = e["ts_ms"].as_i64().unwrap_or(0).div_euclid(1000);
            let agent = match e["agent"].as_str() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => e["agent_id"].as_str().unwrap_or("").to_string(),
            };
            println!(
                "{:>8}  {}  {:<18} {:<12} {}",
                e["seq"],
                crate::cli::utc(secs),
                e["kind"].as_str().unwrap_or(""),
                agent,
                e["payload"]
            );
        }
    }
    Ok(if events.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

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
    /// Every breach, named by its check.
    pub fn breaches(&self) -> Vec<String> {
        self.checks
            .iter()
            .flat_map(|(name, b)| b.iter().map(move |x| format!("{name}: {x}")))
            .collect()
    }
}

/// Whether `b` holds what looks like a raw agent or admin token: `aex_` followed by a whole
/// token's worth of the token alphabet (`aex_admin_…` qualifies too, since `_` is in it). Stored
/// client text has runs of 20 or more redacted, so nothing legitimate comes close.
fn contains_raw_token(b: &[u8]) -> bool {
    tokens::find_token_like(b, 0, tokens::BODY_LEN).is_some()
}

/// Every number below zero in an event's payload, nested ones included (`[old, new]` pairs).
fn negative_numbers(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Number(n) if n.as_f64().is_some_and(|x| x < 0.0) => {
            out.push(format!("{at} = {n}"));
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                negative_numbers(x, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, x) in map {
                let at = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                negative_numbers(x, &at, out);
            }
        }
        _ => {}
    }
}

/// What a scan of every cell of every table found.
#[derive(Default)]
struct CellScan {
    /// Text or blob cells that hold what looks like a raw token.
    tokens: Vec<String>,
    /// Numbers below zero.
    negative: Vec<String>,
}

/// Reads every cell of every table in the database (whatever tables a future schema, a
/// migration or a bug adds, and the schema itself), naming each finding by `label(table, rowid)`.
/// A cell that holds a token is named by table, row and column, never quoted.
fn scan_cells(conn: &Connection, label: impl Fn(&str, i64) -> String) -> anyhow::Result<CellScan> {
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tables.push("sqlite_master".to_string());
    let mut found = CellScan::default();
    for table in tables {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        // Names are printed: one made of a token is not printed back.
        let table_shown = redact::redact_tokens(&table);
        // A WITHOUT ROWID table has no rowid: its rows are numbered in scan order instead.
        let mut stmt = match conn.prepare(&format!("SELECT rowid, * FROM {quoted}")) {
            Ok(s) => s,
            Err(_) => conn.prepare(&format!("SELECT NULL, * FROM {quoted}"))?,
        };
        let columns: Vec<String> = stmt
            .column_names()
            .into_iter()
            .skip(1)
            .map(str::to_string)
            .collect();
        let mut rows = stmt.query([])?;
        let mut n = 0i64;
        while let Some(row) = rows.next()? {
            n += 1;
            let rowid = row.get::<_, Option<i64>>(0)?.unwrap_or(n);
            for (i, column) in columns.iter().enumerate() {
                let column = redact::redact_tokens(column);
                let table = &table_shown;
                match row.get_ref(i + 1)? {
                    ValueRef::Text(b) | ValueRef::Blob(b) if contains_raw_token(b) => {
                        found.tokens.push(format!(
                            "{}: {table}.{column} holds what looks like a raw token",
                            label(table, rowid)
                        ));
                    }
                    ValueRef::Integer(v) if v < 0 => found
                        .negative
                        .push(format!("{}: {table}.{column} = {v}", label(table, rowid))),
                    ValueRef::Real(v) if v < 0.0 => found
                        .negative
                        .push(format!("{}: {table}.{column} = {v}", label(table, rowid))),
                    _ => {}
                }
            }
        }
    }
    Ok(found)
}

/// Counted events per (minute, agent, kind, code): count and charges, as `audit_minutes` keeps them.
type Minutes = HashMap<(i64, String, String, String), (i64, i64)>;

/// Events read per query while verifying: the log is checked in one pass of bounded memory.
const AUDIT_CHUNK: u32 = 20_000;

/// Where `audit_minutes` (what the dashboard and `aex status` count from) disagrees with the
/// totals of the log (`from_log`, counted in the verifying pass): at most 20 rows.
fn minute_breaches(conn: &Connection, from_log: &Minutes) -> anyhow::Result<Vec<String>> {
    if !store::has_minute_counts(conn) {
        return Ok(Vec::new());
    }
    let mut kept = Minutes::new();
    let mut stmt =
        conn.prepare("SELECT minute_ms, agent_id, kind, code, n, charge FROM audit_minutes")?;
    for row in stmt.query_map([], |x| {
        Ok((
            (x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?),
            (x.get(4)?, x.get(5)?),
        ))
    })? {
        let (k, v) = row?;
        kept.insert(k, v);
    }
    let show = |(minute, agent, kind, code): &(i64, String, String, String),
                (n, charge): (i64, i64),
                side: &str| {
        format!("minute {minute} agent '{agent}' {kind} '{code}': {side} {n} events, {charge} µUSD")
    };
    let mut out = Vec::new();
    for (k, v) in &kept {
        if from_log.get(k) != Some(v) {
            out.push(show(k, *v, "counted"));
        }
    }
    for (k, v) in from_log {
        if !kept.contains_key(k) {
            out.push(show(k, *v, "in the log"));
        }
    }
    out.sort();
    out.truncate(20);
    Ok(out)
}

/// Verifies the database (and, given archive files, those too).
pub fn verify(conn: &Connection, archives: &[std::path::PathBuf]) -> anyhow::Result<Report> {
    // One read transaction: every check sees the same snapshot, however many batches a running
    // daemon commits meanwhile (in WAL mode readers neither wait for nor block the writer).
    // It only reads, so it is rolled back when dropped.
    let _snapshot = conn.unchecked_transaction()?;
    let mut r = Report::default();
    // Archived events are counted in the record of the newest archive: the log is checked from
    // where it ends, with its totals added.
    let base = archive::newest(conn)?.map(|(_, a)| a).unwrap_or_default();
    if !archives.is_empty() {
        let files = super::archive::read_files(archives)?;
        let mut breaches = files.breaks;
        if (files.end_seq, files.end_hash.as_str())
            != (base.through_seq, base.through_hash.as_str())
        {
            breaches.push(format!(
                "the archives end at event {}, the log's archived part at event {}{}",
                files.end_seq,
                base.through_seq,
                if files.end_seq == base.through_seq {
                    " (another hash: not the same events)"
                } else {
                    ""
                }
            ));
        }
        let agents: std::collections::HashSet<String> = conn
            .prepare("SELECT id FROM agents")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if let Err(b) = archive::totals_match(&files.totals, &base, &agents) {
            breaches.extend(b);
        }
        r.check(
            "archives chain to the log and hold its archived totals",
            breaches,
        );
    }
    // One pass over the log, a chunk at a time: memory does not grow with its length.
    let mut chain = audit::ChainVerifier::after_archive(&base);
    // Archived events not deleted yet: chained among themselves up to the archive's end.
    let mut archived_left: Option<audit::ChainVerifier> = None;
    let mut chain_breaks = Vec::new();
    let mut last: Option<(u64, String)> = None;
    // Per agent: settled and expired charges, overrun excess; the archived part's included.
    let mut totals = base.clone();
    let mut overrun_events: Vec<(String, u64, String)> = Vec::new();
    let mut minutes = Minutes::new();
    let mut negative = Vec::new();
    loop {
        let after = last.as_ref().map_or(0, |(seq, _)| *seq);
        let events = store::load_audit(conn, after, AUDIT_CHUNK, None)?;
        let Some(tail) = events.last() else {
            break;
        };
        last = Some((tail.seq, tail.hash.clone()));
        for e in &events {
            let is_archived = e.seq <= base.through_seq;
            if is_archived {
                archived_left
                    .get_or_insert_with(|| audit::ChainVerifier::after(e.seq - 1, &e.prev_hash))
                    .push(e, &mut chain_breaks);
            } else {
                chain.push(e, &mut chain_breaks);
            }
            let p: Value = serde_json::from_str(&e.payload).unwrap_or(Value::Null);
            let mut found = Vec::new();
            negative_numbers(&p, "", &mut found);
            negative.extend(found.into_iter().map(|f| format!("event {}: {f}", e.seq)));
            // Archived events are in the archive's totals (still counted per minute below, as
            // `audit_minutes` counts them until they go).
            if !is_archived {
                archive::add_parsed(&mut totals, &e.kind, &e.agent_id, &p);
                if e.kind == kind::OVERRUN {
                    overrun_events.push((e.agent_id.clone(), e.seq, e.payload.clone()));
                }
            }
            if store::COUNTED.contains(&e.kind.as_str()) {
                let code = p.get("code").and_then(Value::as_str).unwrap_or("");
                let charge = p.get("charge_micros").and_then(Value::as_i64).unwrap_or(0);
                let m = minutes
                    .entry((
                        e.ts_ms.div_euclid(60_000) * 60_000,
                        e.agent_id.clone(),
                        e.kind.clone(),
                        code.to_string(),
                    ))
                    .or_insert((0, 0));
                *m = (m.0 + 1, m.1.saturating_add(charge));
            }
        }
        if events.len() < AUDIT_CHUNK as usize {
            break;
        }
    }

    // 1. The chain, and its head against the head recorded with the last commit.
    let mut breaks: Vec<String> = chain_breaks
        .into_iter()
        .map(|b| format!("event {}: {}", b.seq, b.reason))
        .collect();
    if let Some(left) = archived_left {
        if left.end() != (base.through_seq, base.through_hash.as_str()) {
            breaks.push(format!(
                "event {}: the archived events still stored do not end where the archive does",
                left.end().0
            ));
        }
    }
    let head: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key='audit_head'", [], |x| {
            x.get(0)
        })
        .optional()?;
    if let Some(h) = head {
        let newest = last
            .as_ref()
            .map(|(seq, hash)| format!("{seq}:{hash}"))
            .unwrap_or_default();
        if h != newest {
            let seq = h.split(':').next().unwrap_or("?");
            breaks.push(format!(
                "event {seq}: the newest recorded event is missing (log truncated)"
            ));
        }
    }
    r.check("audit chain intact", breaks);

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
    // Names and ids are shown, so a token planted in one is not printed back.
    let who = |id: &str| {
        let name = names.get(id).map(String::as_str).unwrap_or("?");
        format!(
            "agent {} ({})",
            redact::redact_tokens(name),
            redact::redact_tokens(id)
        )
    };

    for (id, (_, _, _, open)) in &raw {
        if *open < 0 {
            negative.push(format!("{}: open reservations = {open}", who(id)));
        }
    }

    let mut spent_breaches = Vec::new();
    let mut budget_breaches = Vec::new();
    let mut reserved_breaches = Vec::new();
    for id in ids {
        let (budget, spent, reserved, open) = raw[id];
        let logged = totals.charges.get(id.as_str()).copied().unwrap_or(0);
        if u64::try_from(spent).ok() != Some(logged) {
            spent_breaches.push(format!(
                "{}: spent {spent} µUSD but settled charges in the log sum to {logged} µUSD",
                who(id)
            ));
        }
        // Wide enough that no stored values overflow it.
        let committed = i128::from(spent) + i128::from(reserved);
        let excess = committed - i128::from(budget);
        let explained = i128::from(totals.overruns.get(id.as_str()).copied().unwrap_or(0));
        if excess > explained {
            budget_breaches.push(format!("{}: spent + reserved = {committed} µUSD exceeds the budget of {budget} µUSD by {excess}, overruns explain {explained}", who(id)));
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
    r.check(
        "per-minute counts == the audit log",
        minute_breaches(conn, &minutes)?,
    );

    // Every cell of every table, not only the ones known today to hold client text.
    let agent_rows: HashMap<i64, String> = conn
        .prepare("SELECT rowid, id FROM agents")?
        .query_map([], |x| Ok((x.get(0)?, x.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let cells = scan_cells(conn, |table, rowid| match table {
        // `seq` is the audit table's rowid.
        "audit" => format!("event {rowid}"),
        "agents" => agent_rows
            .get(&rowid)
            .map_or_else(|| format!("agents row {rowid}"), |id| who(id)),
        _ => format!("{table} row {rowid}"),
    })?;
    negative.extend(cells.negative);
    r.check("no negative values", negative);
    r.check("no raw token stored", cells.tokens);
    r.overruns = overrun_events
        .iter()
        .map(|(agent, seq, payload)| format!("{} event {seq}: {payload}", who(agent)))
        .collect();
    Ok(r)
}

pub fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(Cmd::Archive(a)) = args.cmd {
        return super::archive::run(ctx, a);
    }
    let conn = crate::cli::open_db(ctx)?;
    if let Some(id) = &args.request {
        return show_request(ctx, &conn, id);
    }
    let report = verify(&conn, &args.archives)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_tokens_are_recognised_and_redacted_ones_are_not() {
        let t = tokens::generate();
        assert!(contains_raw_token(t.as_bytes()));
        assert!(contains_raw_token(format!("x?key={t}&y").as_bytes()));
        let admin = format!("aex_admin_{}", &t[tokens::PREFIX.len()..]);
        assert!(contains_raw_token(admin.as_bytes()));
        assert!(!contains_raw_token(redact::redact_tokens(&t).as_bytes()));
        assert!(!contains_raw_token(
            redact::client_text(&format!("/v1/{t}"), 10).as_bytes()
        ));
    }

    #[test]
    fn negative_numbers_are_found_at_any_depth() {
        let v: Value =
            serde_json::from_str(r#"{"a":1,"b":[3,-2],"c":{"d":-0.5},"e":"-1"}"#).unwrap();
        let mut found = Vec::new();
        negative_numbers(&v, "", &mut found);
        assert_eq!(found, ["b[1] = -2", "c.d = -0.5"]);
    }

    #[test]
    fn every_table_is_scanned_without_quoting_what_it_finds() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE ids(id TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;
             CREATE TABLE \"odd \"\"name\"(b BLOB, r REAL);",
        )
        .unwrap();
        let t = tokens::generate();
        conn.execute(
            "INSERT INTO meta VALUES('head', '1:ab'), ('note', ?1)",
            [&t],
        )
        .unwrap();
        conn.execute("INSERT INTO ids VALUES('a', 1), ('b', -3)", [])
            .unwrap();
        conn.execute(
            "INSERT INTO \"odd \"\"name\" VALUES(?1, -1.5)",
            [format!("blob {t}").into_bytes()],
        )
        .unwrap();
        let found = scan_cells(&conn, |table, row| format!("{table} row {row}")).unwrap();
        // The schema is read too (name, tbl_name, sql), and a name made of a token is not
        // printed back.
        let conn2 = Connection::open_in_memory().unwrap();
        conn2
            .execute_batch(&format!("CREATE TABLE \"{t}\"(x INTEGER);"))
            .unwrap();
        let schema = scan_cells(&conn2, |table, row| format!("{table} row {row}")).unwrap();
        assert_eq!(schema.tokens.len(), 3, "{:?}", schema.tokens);
        assert!(schema.tokens[0].starts_with("sqlite_master row 1: sqlite_master.name"));
        assert!(!format!("{:?}", schema.tokens).contains(&t[4..]));
        assert_eq!(
            found.tokens,
            [
                "meta row 2: meta.value holds what looks like a raw token",
                "odd \"name row 1: odd \"name.b holds what looks like a raw token",
            ]
        );
        assert_eq!(
            found.negative,
            [
                "ids row 2: ids.n = -3",
                "odd \"name row 1: odd \"name.r = -1.5"
            ]
        );
        assert!(!format!("{:?}", found.tokens).contains(&t[4..]));
    }
}
