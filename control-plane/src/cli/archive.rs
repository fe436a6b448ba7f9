//! `aex audit archive`: moves the audit events older than an age out of the database into a
//! JSON Lines file (see [`crate::archive`]), and `aex audit --archive FILE…`'s reading of them.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rusqlite::Connection;
use serde_json::json;

use crate::archive;
use crate::audit::{Archived, ChainBreak, ChainVerifier, Event};
use crate::cli::{admin, print_json, runtime, status_error, utc, Ctx};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive the events older than this age: days (`30d`) or hours (`36h`), at least 1d.
    #[arg(long, value_name = "AGE")]
    older_than: String,
    /// The archive to write (JSON Lines, one event per line, mode 0600); must not exist yet.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// `30d` / `12h` (a whole number and its unit) in milliseconds.
pub fn parse_age(s: &str) -> anyhow::Result<i64> {
    let bad = || {
        anyhow::anyhow!("--older-than {s:?}: give a whole number of days or hours, like 30d or 12h")
    };
    let t = s.trim();
    let hours: i64 = if let Some(days) = t.strip_suffix('d') {
        days.parse::<i64>()
            .map_err(|_| bad())?
            .checked_mul(24)
            .ok_or_else(bad)?
    } else if let Some(hours) = t.strip_suffix('h') {
        hours.parse().map_err(|_| bad())?
    } else {
        return Err(bad());
    };
    anyhow::ensure!(hours <= 100 * 8_766, "--older-than {s}: at most 100 years");
    let ms = hours.checked_mul(3_600_000).ok_or_else(bad)?;
    anyhow::ensure!(
        ms >= archive::MIN_AGE_MS,
        "--older-than {s}: at least 1d (the last day stays in the database: the dashboard and \
         `aex status` count it)"
    );
    Ok(ms)
}

/// The events to archive: after the previous archive up to the one before the first event at or
/// after `cutoff_ms` (a prefix of the log, whatever a clock step did to the times). None when
/// there is nothing to archive.
fn through(conn: &Connection, prev: &Archived, cutoff_ms: i64) -> anyhow::Result<Option<u64>> {
    let (first_new, newest): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT (SELECT MIN(seq) FROM audit WHERE ts_ms >= ?1), (SELECT MAX(seq) FROM audit)",
        [cutoff_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let end = match (first_new, newest) {
        (Some(f), _) => f - 1,
        (None, Some(n)) => n,
        (None, None) => 0,
    };
    let end = u64::try_from(end).unwrap_or(0);
    Ok((end > prev.through_seq).then_some(end))
}

/// Writes the events after `prev` up to `end` to `file`, checking their chain on the way. Returns the last one's hash and the first and last event times.
fn write_file(
    conn: &Connection,
    prev: &Archived,
    end: u64,
    file: std::fs::File,
) -> anyhow::Result<(String, i64, i64)> {
    let mut w = BufWriter::new(file);
    let mut chain = ChainVerifier::after_archive(prev);
    let mut breaks: Vec<ChainBreak> = Vec::new();
    let (mut first_ms, mut last_ms) = (None, 0);
    let mut after = prev.through_seq;
    while after < end {
        let events = store::load_audit(conn, after, 20_000, None)?;
        if events.is_empty() {
            break;
        }
        for e in events {
            if e.seq > end {
                after = end;
                break;
            }
            chain.push(&e, &mut breaks);
            if let Some(b) = breaks.first() {
                anyhow::bail!(
                    "the audit chain is broken at event {}: {} (see `aex audit`); nothing was archived",
                    b.seq,
                    b.reason
                );
            }
            first_ms.get_or_insert(e.ts_ms);
            last_ms = e.ts_ms;
            after = e.seq;
            serde_json::to_writer(&mut w, &e)?;
            w.write_all(b"\n")?;
        }
    }
    let (seq, hash) = chain.end();
    anyhow::ensure!(
        seq == end,
        "the log ends at event {seq}, before event {end}; nothing was archived"
    );
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((hash.to_string(), first_ms.unwrap_or(0), last_ms))
}

pub fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let age_ms = parse_age(&args.older_than)?;
    let conn = crate::cli::open_db(ctx)?;
    let prev = archive::newest(&conn)?.map(|(_, a)| a).unwrap_or_default();
    let cutoff_ms = crate::core::now_ms() - age_ms;
    let Some(end) = through(&conn, &prev, cutoff_ms)? else {
        if ctx.json {
            print_json(&json!({ "events": 0, "file": null }));
        } else {
            println!(
                "nothing to archive: every event before {} is archived already",
                utc(cutoff_ms.div_euclid(1000))
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let out = std::path::absolute(&args.out)?;
    runtime()?.block_on(async {
        // The daemon owns the chain (it appends the record of the archive): reach it before
        // writing anything.
        let mut c = admin(&ctx.home).await?;
        // Never an existing file (an earlier archive, perhaps the only copy of its events).
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?
        };
        // From here on the file is this command's own, to remove if it is not archived.
        let (hash, first_ms, last_ms) = write_file(&conn, &prev, end, file).inspect_err(|_| {
            let _ = std::fs::remove_file(&out);
        })?;
        let r = c
            .archive_audit(aex_proto::v1::ArchiveAuditRequest {
                through_seq: end,
                through_hash: hash,
                file: out.display().to_string(),
                after_seq: prev.through_seq,
            })
            .await
            .map_err(|s| {
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) {
                    // Refused: a file the log does not name would only mislead.
                    let _ = std::fs::remove_file(&out);
                    anyhow::anyhow!("{}; nothing was archived", status_error(s))
                } else {
                    // The answer was lost: the daemon may have recorded the archive (and will
                    // then delete its rows), so the file stays.
                    anyhow::anyhow!(
                        "{}; the archive may or may not be recorded: `aex audit --archive` with \
                         every archive file, {} included, tells (remove it if it is not)",
                        status_error(s),
                        out.display()
                    )
                }
            })?
            .into_inner();
        let (from, to) = (prev.through_seq + 1, end);
        let sweeps = r.events.div_ceil(archive::PRUNE_CHUNK as u64);
        if ctx.json {
            print_json(&json!({
                "events": r.events,
                "first_seq": from,
                "last_seq": to,
                "first_ts_ms": first_ms,
                "last_ts_ms": last_ms,
                "file": out.display().to_string(),
                "archived_event_seq": r.archived_event_seq,
            }));
        } else {
            println!(
                "archived {} events ({from}..={to}, {} to {}) to {}",
                r.events,
                utc(first_ms.div_euclid(1000)),
                utc(last_ms.div_euclid(1000)),
                out.display()
            );
            println!(
                "the daemon deletes them from the database within about {sweeps} s; keep the file: \
                 `aex audit --archive FILE…` (every archive, oldest first) checks it against the log"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// What reading archive files found: where their chain ends and their totals.
pub struct FromFiles {
    pub end_seq: u64,
    pub end_hash: String,
    pub totals: Archived,
    pub breaks: Vec<String>,
}

/// Reads archive files as one chain from the first event ever (files taken in the order of
/// their first event), counting their totals as the daemon did when it archived them.
pub fn read_files(files: &[PathBuf]) -> anyhow::Result<FromFiles> {
    let mut ordered = Vec::new();
    for f in files {
        let first = std::io::BufReader::new(
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?,
        )
        .lines()
        .next()
        .transpose()?
        .and_then(|l| serde_json::from_str::<Event>(&l).ok())
        .map_or(0, |l| l.seq);
        ordered.push((first, f));
    }
    ordered.sort();
    let mut chain = ChainVerifier::default();
    let mut breaks = Vec::new();
    let mut totals = Archived::default();
    for (_, f) in ordered {
        let reader = std::io::BufReader::new(std::fs::File::open(f)?);
        let mut lines = 0;
        for (i, line) in reader.lines().enumerate() {
            lines += 1;
            let line = line?;
            let at = format!("{} line {}", f.display(), i + 1);
            let e: Event = match serde_json::from_str(&line) {
                Ok(e) => e,
                Err(e) => {
                    breaks.push(format!("{at}: not an archived event ({e})"));
                    continue;
                }
            };
            let mut found = Vec::new();
            chain.push(&e, &mut found);
            breaks.extend(
                found
                    .into_iter()
                    .map(|b| format!("{at}: event {}: {}", b.seq, b.reason)),
            );
            archive::add_event(&mut totals, &e.kind, &e.agent_id, &e.payload);
        }
        if lines == 0 {
            breaks.push(format!("{}: holds no events (not an archive)", f.display()));
        }
    }
    let (end_seq, end_hash) = chain.end();
    Ok(FromFiles {
        end_seq,
        end_hash: end_hash.to_string(),
        totals,
        breaks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{kind, Chain};
    use crate::ledger::{Agent, Op};
    use crate::store::{Store, StoreOptions};
    use rusqlite::OpenFlags;
    use std::path::Path;

    const DAY_MS: i64 = 86_400_000;

    fn agent(spent: u64) -> Agent {
        Agent {
            id: "ag_1".into(),
            name: "atlas".into(),
            budget: 1_000,
            spent,
            reserved: 0,
            rpm: 60,
            policy: Default::default(),
            token_sha256: "00".repeat(32),
            token_expires_at: 0,
            ttl_secs: 0,
            created_at: 0,
            blocked_overrun: false,
            lease_epoch: 0,
        }
    }

    fn commit(store: &Store, ops: Vec<Op>) {
        store.submit(ops).blocking_recv().unwrap();
    }

    /// Whether `aex audit` (with these archive files) finds the database intact.
    fn intact(conn: &Connection, files: &[PathBuf]) -> Result<(), String> {
        let r = crate::cli::audit::verify(conn, files).unwrap();
        if r.ok() {
            Ok(())
        } else {
            Err(r.breaches().join("\n"))
        }
    }

    /// What the daemon does on `ArchiveAudit`: the record of the archive, chained in, then the
    /// sweeps' deletes.
    fn archive(
        conn: &Connection,
        store: &Store,
        chain: &mut Chain,
        cutoff_ms: i64,
        out: &Path,
    ) -> Archived {
        let prev = archive::newest(conn)
            .unwrap()
            .map(|(_, a)| a)
            .unwrap_or_default();
        let end = through(conn, &prev, cutoff_ms).unwrap().unwrap();
        let (hash, _, _) =
            write_file(conn, &prev, end, std::fs::File::create(out).unwrap()).unwrap();
        let now = crate::core::now_ms();
        let next = archive::next(conn, &prev, end, &hash, "f", now).unwrap();
        let ev = chain.append_json(
            now,
            kind::AUDIT_ARCHIVED,
            "",
            "",
            serde_json::to_string(&next).unwrap(),
        );
        commit(store, vec![Op::Audit(ev)]);
        next
    }

    #[test]
    fn an_archived_log_still_verifies_and_its_files_chain_to_it() {
        let dir = std::env::temp_dir().join(format!("aex-archive-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("aex.db");
        let (store, _) = Store::open(&db, StoreOptions::default()).unwrap();
        let now = crate::core::now_ms();
        // Three days ago, two days ago, and now: each request allowed and settled at 7 µUSD,
        // one denial, and an overrun two days ago.
        let mut chain = Chain::genesis();
        let mut ops = Vec::new();
        let mut spent = 0;
        for (day, n) in [(3, 10), (2, 5), (0, 5)] {
            for i in 0..n {
                let t = now - day * DAY_MS + i * 1_000;
                let rid = format!("r{day}{i}");
                ops.push(chain.append(
                    t,
                    kind::REQUEST_ALLOWED,
                    "ag_1",
                    &rid,
                    serde_json::json!({}),
                ));
                ops.push(chain.append(
                    t,
                    kind::REQUEST_SETTLED,
                    "ag_1",
                    &rid,
                    serde_json::json!({"charge_micros": 7}),
                ));
                spent += 7;
            }
            if day == 2 {
                ops.push(chain.append(
                    now - 2 * DAY_MS,
                    kind::OVERRUN,
                    "ag_1",
                    "r20",
                    serde_json::json!({"excess_micros": 3}),
                ));
            }
            ops.push(chain.append(
                now - day * DAY_MS,
                kind::REQUEST_DENIED,
                "ag_1",
                "d",
                serde_json::json!({"code": "rate_limit_exceeded"}),
            ));
        }
        let mut ops: Vec<Op> = ops.into_iter().map(Op::Audit).collect();
        ops.insert(0, Op::PutAgent(agent(spent)));
        commit(&store, ops);
        let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        intact(&conn, &[]).unwrap();

        // The first archive: three days ago (21 events).
        let f1 = dir.join("one.jsonl");
        let a1 = archive(&conn, &store, &mut chain, now - 2 * DAY_MS - 1, &f1);
        assert_eq!((a1.through_seq, a1.events), (21, 21));
        assert_eq!(a1.charges["ag_1"], 70);
        // Archived but not deleted yet, then deleted: the log verifies, with and without the file.
        intact(&conn, &[]).unwrap();
        intact(&conn, std::slice::from_ref(&f1)).unwrap();
        commit(
            &store,
            vec![Op::PruneAudit {
                through_seq: a1.through_seq,
            }],
        );
        let first: i64 = conn
            .query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(first, 22);
        intact(&conn, &[]).unwrap();
        intact(&conn, std::slice::from_ref(&f1)).unwrap();

        // The second: up to a day ago (the overrun too), after the first.
        let f2 = dir.join("two.jsonl");
        let a2 = archive(&conn, &store, &mut chain, now - DAY_MS, &f2);
        assert_eq!(a2.through_seq, 33);
        assert_eq!(
            (a2.events, a2.charges["ag_1"], a2.overruns["ag_1"]),
            (33, 105, 3)
        );
        commit(
            &store,
            vec![Op::PruneAudit {
                through_seq: a2.through_seq,
            }],
        );
        intact(&conn, &[]).unwrap();
        // The files in either order; one alone does not reach back to the first event.
        intact(&conn, &[f2.clone(), f1.clone()]).unwrap();
        let e = intact(&conn, std::slice::from_ref(&f2)).unwrap_err();
        assert!(e.contains("expected event 1, found 22"), "{e}");
        // Nothing more to archive before a day ago.
        assert_eq!(through(&conn, &a2, now - DAY_MS).unwrap(), None);

        // An edited archive line, a deleted record of the archive, rows deleted without one.
        let text = std::fs::read_to_string(&f1).unwrap();
        let f3 = dir.join("edited.jsonl");
        std::fs::write(
            &f3,
            text.replacen("\\\"charge_micros\\\":7", "\\\"charge_micros\\\":1", 1),
        )
        .unwrap();
        let e = intact(&conn, &[f3, f2.clone()]).unwrap_err();
        assert!(e.contains("content does not match its hash"), "{e}");
        let rw = Connection::open(&db).unwrap();
        let newest_record = a2.through_seq + 11 + 2;
        rw.execute("DELETE FROM audit WHERE seq = ?1", [newest_record])
            .unwrap();
        let e = intact(&conn, &[]).unwrap_err();
        assert!(e.contains("expected event 22"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ages_are_whole_days_or_hours_of_at_least_a_day() {
        assert_eq!(parse_age("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_age("24h").unwrap(), 86_400_000);
        assert_eq!(parse_age(" 36h ").unwrap(), 36 * 3_600_000);
        for bad in [
            "23h",
            "876601h",
            "0h",
            "0d",
            "30",
            "d",
            "1.5d",
            "-1d",
            "30m",
            "1w",
            "",
            "99999999999999999d",
            "3é",
        ] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
