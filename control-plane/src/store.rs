//! SQLite persistence. One writer thread owns the write connection and commits queued ops in
//! batches (group commit); the async runtime never waits on the disk except for the
//! acknowledgement of its own batch. WAL mode with `synchronous=NORMAL`: a committed batch
//! survives `kill -9` of the daemon.
//!
//! The ledger applies a change in memory before its batch reaches the disk, so a batch is never
//! dropped: one that cannot commit is retried (another process holding the write lock) until it
//! does, and if it still cannot after [`StoreOptions::give_up`], or the error is not a lock
//! (disk full, I/O error), the process exits with [`EXIT_COMMIT_FAILED`] so that a restart
//! reloads consistent state from the disk. Everything the daemon acknowledged is on disk, and
//! memory (reservations, totals, the audit chain's head) is never ahead of the disk by more than
//! the batches the writer holds — which end with the process if they cannot be written.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::audit::Event;
use crate::ledger::{Agent, Loaded, Op, RecentAdmission, Reservation};
use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database row {0}: {1}")]
    Corrupt(String, String),
    #[error("the database was written by a newer AEX (data format {found}; this aex reads formats up to {FORMAT}): run that version of aex; going back to an older one is not supported")]
    Newer { found: i64 },
}

/// The database's data format, kept in SQLite's `user_version`. Raise it with any change an
/// older daemon would misread or silently drop (a table, a column, a policy or payload field it
/// does not know): a daemon or CLI refuses a database of a newer format instead of running on
/// it. Databases from before the format was recorded read 0 and are brought up to date on open.
pub const FORMAT: i64 = 1;

/// The database's format, or [`StoreError::Newer`] when this build cannot read it.
pub fn check_format(conn: &Connection) -> Result<i64, StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > FORMAT {
        return Err(StoreError::Newer { found });
    }
    Ok(found)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents(
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
  budget INTEGER NOT NULL, spent INTEGER NOT NULL, reserved INTEGER NOT NULL,
  rpm INTEGER NOT NULL, policy TEXT NOT NULL,
  token_sha256 TEXT NOT NULL, token_expires_at INTEGER NOT NULL, ttl_secs INTEGER NOT NULL,
  created_at INTEGER NOT NULL, blocked_overrun INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations(
  request_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, model TEXT NOT NULL,
  amount INTEGER NOT NULL, input_bound INTEGER NOT NULL, output_cap INTEGER NOT NULL,
  created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  input_price INTEGER NOT NULL DEFAULT 0, output_price INTEGER NOT NULL DEFAULT 0, cached_input_price INTEGER,
  lease_granted INTEGER NOT NULL DEFAULT 0, lease_charged INTEGER NOT NULL DEFAULT 0,
  lease_requests INTEGER NOT NULL DEFAULT 0);
-- The prices of each catalog leases were granted under, once per distinct set (see
-- ledger/price_list.rs); a lease's reservation row names its list in `model`.
CREATE TABLE IF NOT EXISTS price_lists(id TEXT PRIMARY KEY, prices TEXT NOT NULL) WITHOUT ROWID;
-- WITHOUT ROWID: one b-tree per closed id (a rowid table keeps a second one for the key), and
-- one id is closed per request.
CREATE TABLE IF NOT EXISTS closed_requests(request_id TEXT PRIMARY KEY, closed_ms INTEGER NOT NULL) WITHOUT ROWID;
-- Closed ids are kept on disk for as long as a reservation or lease can stay open (far longer than
-- in memory): pruning and the start-up load find them by time.
CREATE INDEX IF NOT EXISTS closed_requests_ms ON closed_requests(closed_ms);
CREATE TABLE IF NOT EXISTS audit(
  seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, kind TEXT NOT NULL,
  agent_id TEXT NOT NULL, request_id TEXT NOT NULL, payload TEXT NOT NULL,
  prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_agent ON audit(agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts_ms);
-- The dashboard names a deleted agent's events by its deletion event.
CREATE INDEX IF NOT EXISTS audit_deleted ON audit(agent_id) WHERE kind = 'agent.deleted';
-- The events that are not per-request traffic (agent and config changes, overruns, expiries,
-- archives): the dashboard keeps the newest in view however many requests follow (stats.rs).
CREATE INDEX IF NOT EXISTS audit_notable ON audit(seq) WHERE kind NOT IN
  ('request.allowed','request.denied','request.settled','lease.granted','lease.returned');
-- Where the log starts after archiving: the newest `audit.archived` event (archive.rs).
CREATE INDEX IF NOT EXISTS audit_archived ON audit(seq) WHERE kind = 'audit.archived';
-- audit_head = 'seq:hash' of the newest event, written in the same transaction, so deleting the
-- newest rows is detected too.
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The counted events (requests allowed and denied, charges) per minute, agent, kind and denial
-- code, written with the events: the dashboard and `aex status` read a day from here instead of
-- parsing a day of audit payloads (stats.rs). Derived data: `aex audit` checks it.
CREATE TABLE IF NOT EXISTS audit_minutes(
  minute_ms INTEGER NOT NULL, agent_id TEXT NOT NULL, kind TEXT NOT NULL, code TEXT NOT NULL,
  n INTEGER NOT NULL, charge INTEGER NOT NULL,
  PRIMARY KEY(minute_ms, agent_id, kind, code)) WITHOUT ROWID;
";

/// Columns added since a table was first created: a database written by an older daemon gets
/// them (with their defaults) when opened.
fn add_missing_columns(conn: &Connection) -> Result<(), StoreError> {
    const ADDED: [(&str, &str, &str); 3] = [
        (
            "reservations",
            "lease_granted",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "reservations",
            "lease_charged",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "reservations",
            "lease_requests",
            "INTEGER NOT NULL DEFAULT 0",
        ),
    ];
    for (table, column, decl) in ADDED {
        let present = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// The events `audit_minutes` counts.
pub const COUNTED: [&str; 4] = [
    "request.allowed",
    "request.denied",
    "request.settled",
    "reservation.expired",
];

/// [`COUNTED`] as SQL (`kind IN COUNTED_KINDS`); a test keeps the two the same.
pub const COUNTED_KINDS: &str =
    "('request.allowed','request.denied','request.settled','reservation.expired')";

/// Whether `audit_minutes` counts the whole log: `meta.audit_minutes` names the head of the log
/// the counts were last brought to (written with every commit, like `audit_head`). An older
/// daemon that ran on the database since appended events without counting them, and left the
/// two apart: the counts are then rebuilt when a daemon of this version opens it.
pub fn has_minute_counts(conn: &Connection) -> bool {
    conn.query_row(
        "SELECT (SELECT value FROM meta WHERE key = 'audit_minutes')
              = COALESCE((SELECT value FROM meta WHERE key = 'audit_head'), '')",
        [],
        |r| r.get::<_, Option<bool>>(0),
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Fills `audit_minutes` from the audit log once, for a database written before it existed
/// (the writer keeps it current from then on).
fn backfill_minutes(conn: &mut Connection) -> Result<(), StoreError> {
    if has_minute_counts(conn) {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM audit_minutes", [])?;
    tx.execute(
        &format!(
            "INSERT INTO audit_minutes(minute_ms, agent_id, kind, code, n, charge)
             SELECT (ts_ms / 60000) * 60000, agent_id, kind, COALESCE(json_extract(payload, '$.code'), ''),
                    COUNT(*), COALESCE(SUM(json_extract(payload, '$.charge_micros')), 0)
             FROM audit WHERE kind IN {COUNTED_KINDS} GROUP BY 1, 2, 3, 4"
        ),
        [],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta(key, value)
         VALUES('audit_minutes', COALESCE((SELECT value FROM meta WHERE key = 'audit_head'), ''))",
        [],
    )?;
    tx.commit()?;
    Ok(())
}

/// A row of `audit_minutes`: minute, agent, kind and denial code.
type MinuteKey<'a> = (i64, &'a str, &'a str, String);

/// Where an event of `kind` at `ts_ms` counts in `audit_minutes`: its minute, denial code and
/// charge; None for the kinds it does not count.
pub(crate) fn minute_of(ts_ms: i64, kind: &str, payload: &str) -> Option<(i64, String, i64)> {
    let (code, charge) = match kind {
        "request.allowed" => (String::new(), 0),
        "request.denied" => (
            member(payload, "code")
                .and_then(|v| serde_json::from_str::<String>(v).ok())
                .unwrap_or_default(),
            0,
        ),
        "request.settled" | "reservation.expired" => (
            String::new(),
            member(payload, "charge_micros")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        _ => return None,
    };
    Some((ts_ms.div_euclid(60_000) * 60_000, code, charge))
}

/// The raw text of a member of a flat JSON object as this daemon writes its payloads (compact,
/// each key once): a number, or a string with its quotes. A key's quoted name followed by a colon
/// cannot occur inside a string value, whose quotes are escaped, so the first match is the member.
fn member<'a>(payload: &'a str, key: &str) -> Option<&'a str> {
    let at = payload.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = payload.get(at..)?;
    let end = if rest.starts_with('"') {
        // The closing quote: the first one no backslash escapes.
        let b = rest.as_bytes();
        let mut i = 1;
        loop {
            match b.get(i)? {
                b'\\' => i += 2,
                b'"' => break i + 1,
                _ => i += 1,
            }
        }
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    rest.get(..end)
}

/// Exit status of a daemon whose database refused a commit for good (EX_IOERR): memory holds
/// changes the disk does not, so the process ends rather than answer from state it cannot keep.
pub const EXIT_COMMIT_FAILED: i32 = 74;

/// How the writer treats a commit the database refuses.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Retry a batch refused because the database is locked for at most this long, then exit.
    pub give_up: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            give_up: Duration::from_secs(60),
        }
    }
}

/// Resolves once every op queued before it is committed.
type Ack = oneshot::Sender<()>;

struct Batch {
    ops: Vec<Op>,
    ack: Ack,
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Batch>,
    /// Set while the writer is retrying a batch the database refused; cleared once it commits.
    failing: Arc<AtomicBool>,
    /// Reads the rare lookups of the request path need (closed ids older than the ledger keeps
    /// in memory), off the writer's connection.
    reader: Arc<Mutex<Connection>>,
}

pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // SQLite's own WAL checkpoints (every ~4 MB) keep the log bounded under sustained load;
    // after each reset the file is cut back to this size.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let format = check_format(&conn)?;
    conn.execute_batch(SCHEMA)?;
    add_missing_columns(&conn)?;
    let mut conn = conn;
    backfill_minutes(&mut conn)?;
    if format < FORMAT {
        conn.pragma_update(None, "user_version", FORMAT)?;
    }
    Ok(conn)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// At most this many closed ids leave the disk per prune (one per sweep, every second): more
/// than any request rate the daemon sustains, so the table does not grow behind the pruning.
const PRUNE_CHUNK: i64 = 50_000;

/// The checkpoint thread copies the WAL into the database once the WAL holds this much.
const CHECKPOINT_WAL_BYTES: u64 = 4 << 20;

impl Store {
    /// Opens (creating if needed) the database, loads its state and starts the writer.
    pub fn open(path: &Path, options: StoreOptions) -> Result<(Store, Loaded), StoreError> {
        let conn = open_connection(path)?;
        let loaded = load(&conn)?;
        let reader = Arc::new(Mutex::new(open_connection(path)?));
        // Checkpoint work (copying WAL frames into the database, fsync) happens on its own thread,
        // so commits the request path waits on rarely pay for it. The writer keeps a large
        // autocheckpoint as the backstop that resets the WAL (only the single writer, between its
        // own transactions, can complete a checkpoint under sustained load), keeping it bounded.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        let checkpointer = open_connection(path)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        thread::Builder::new()
            .name("aex-db-checkpoint".into())
            .spawn(move || loop {
                thread::sleep(std::time::Duration::from_millis(500));
                // Only once the log has grown: a completed checkpoint makes the next commit
                // restart the log, which a lone request's commit would then wait for on disk.
                let grown =
                    std::fs::metadata(&wal).map_or(true, |m| m.len() >= CHECKPOINT_WAL_BYTES);
                if !grown {
                    continue;
                }
                if let Err(e) =
                    checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!("WAL checkpoint: {e}");
                }
            })
            .map_err(|e| StoreError::Corrupt("checkpointer".into(), e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Batch>();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        thread::Builder::new()
            .name("aex-db-writer".into())
            .spawn(move || writer(conn, rx, &flag, options))
            .map_err(|e| StoreError::Corrupt("writer".into(), e.to_string()))?;
        Ok((
            Store {
                tx,
                failing,
                reader,
            },
            loaded,
        ))
    }

    /// Queues ops (call while holding the ledger lock, so queue order = ledger order) and returns
    /// a receiver that resolves once they, and every op queued before them, are committed. With
    /// no ops it still waits for those before it: an answer that depends on the ledger's state
    /// (a duplicate settlement) must not go out before that state is on disk. The receiver
    /// fails only if the writer has stopped.
    pub fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<()> {
        let (ack, rx) = oneshot::channel();
        // A send fails only when the writer has stopped: dropping the ack tells the caller.
        let _ = self.tx.send(Batch { ops, ack });
        rx
    }

    /// Whether the writer is retrying a batch the database refused (nothing new should be
    /// applied to memory meanwhile).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Which of `ids` are closed on disk (blocking: call off the async runtime).
    pub fn closed_among(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt =
            conn.prepare_cached("SELECT 1 FROM closed_requests WHERE request_id = ?1")?;
        let mut found = Vec::new();
        for id in ids {
            if stmt.exists(params![id])? {
                found.push(id.clone());
            }
        }
        Ok(found)
    }
}

fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Batch>,
    failing: &AtomicBool,
    options: StoreOptions,
) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        while batches.len() < 512 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        if batches.iter().any(|b| !b.ops.is_empty()) {
            commit_or_exit(&mut conn, &batches, failing, options);
        }
        for b in batches {
            let _ = b.ack.send(());
        }
    }
}

/// A lock held by another connection (or SQLite's own contention) can pass; anything else —
/// disk full, I/O error, corruption — will not by waiting.
fn transient(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Sql(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Commits the batches, retrying the same ones while the database is locked. Never returns
/// without having committed them: the ledger already applied them in memory, so dropping them
/// would leave memory ahead of disk (a gap in the audit chain, `spent` off the sum of the logged
/// charges). When they cannot be committed the process exits and its successor reloads the
/// ledger from the disk; callers still waiting get no answer, which the filter treats as "may
/// have reserved" (it releases) or "not reported" (it sends the report again).
fn commit_or_exit(
    conn: &mut Connection,
    batches: &[Batch],
    failing: &AtomicBool,
    options: StoreOptions,
) {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        let err = match commit(conn, batches) {
            Ok(()) => {
                if attempts > 0 {
                    failing.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        "database commit succeeded after {attempts} failed attempt(s) in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return;
            }
            Err(e) => e,
        };
        attempts += 1;
        failing.store(true, Ordering::Relaxed);
        let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
        if !transient(&err) || started.elapsed() >= options.give_up {
            tracing::error!(
                "FATAL: the database refused a commit of {ops} ledger change(s) for {:.1} s \
                 ({attempts} attempt(s)), last error: {err}. Exiting with status \
                 {EXIT_COMMIT_FAILED} so that a restart reloads the ledger from the database; \
                 requests are refused (503) until the control plane is back.",
                started.elapsed().as_secs_f64()
            );
            std::process::exit(EXIT_COMMIT_FAILED);
        }
        tracing::error!(
            "database commit of {ops} ledger change(s) failed (attempt {attempts}), retrying; \
             new requests are refused meanwhile: {err}"
        );
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn commit(conn: &mut Connection, batches: &[Batch]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let mut head = None;
    let mut minutes: HashMap<MinuteKey<'_>, (i64, i64)> = HashMap::new();
    // Rows written several times in one commit (an agent's totals, a lease's amount, once per
    // settlement of a batch) are written once, with their last value.
    let mut last: HashMap<(bool, &str), usize> = HashMap::new();
    for (i, op) in batches.iter().flat_map(|b| &b.ops).enumerate() {
        match op {
            Op::PutAgent(a) => {
                last.insert((true, a.id.as_str()), i);
            }
            Op::PutReservation(r) => {
                last.insert((false, r.request_id.as_str()), i);
            }
            _ => {}
        }
    }
    for (i, op) in batches.iter().flat_map(|b| &b.ops).enumerate() {
        let superseded = match op {
            Op::PutAgent(a) => last.get(&(true, a.id.as_str())) != Some(&i),
            Op::PutReservation(r) => last.get(&(false, r.request_id.as_str())) != Some(&i),
            _ => false,
        };
        if superseded {
            continue;
        }
        apply(&tx, op)?;
        if let Op::Audit(e) = op {
            head = Some(format!("{}:{}", e.seq, e.hash));
            if let Some((minute, code, charge)) = minute_of(e.ts_ms, &e.kind, &e.payload) {
                let key = (minute, e.agent_id.as_str(), e.kind.as_str(), code);
                let m = minutes.entry(key).or_insert((0, 0));
                *m = (m.0 + 1, m.1.saturating_add(charge));
            }
        }
    }
    for ((minute, agent, kind, code), (n, charge)) in &minutes {
        tx.prepare_cached(
            "INSERT INTO audit_minutes(minute_ms, agent_id, kind, code, n, charge) VALUES(?1,?2,?3,?4,?5,?6)
             ON CONFLICT(minute_ms, agent_id, kind, code) DO UPDATE SET n = n + excluded.n, charge = charge + excluded.charge",
        )?
        .execute(params![minute, agent, kind, code, n, charge])?;
    }
    if let Some(h) = head {
        tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES('audit_head', ?1)")?
            .execute(params![h])?;
        // The counts cover the log up to the same head (see `has_minute_counts`).
        tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES('audit_minutes', ?1)")?
            .execute(params![h])?;
    }
    tx.commit()?;
    Ok(())
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::PutAgent(a) => {
            let policy = serde_json::to_string(&a.policy)
                .map_err(|e| StoreError::Corrupt(a.id.clone(), e.to_string()))?;
            tx.prepare_cached(
                "INSERT INTO agents(id,name,budget,spent,reserved,rpm,policy,token_sha256,token_expires_at,ttl_secs,created_at,blocked_overrun)
                 VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)
                 ON CONFLICT(id) DO UPDATE SET name=excluded.name, budget=excluded.budget, spent=excluded.spent,
                   reserved=excluded.reserved, rpm=excluded.rpm, policy=excluded.policy, token_sha256=excluded.token_sha256,
                   token_expires_at=excluded.token_expires_at, ttl_secs=excluded.ttl_secs, blocked_overrun=excluded.blocked_overrun",
            )?
            .execute(params![
                a.id, a.name, to_i64(a.budget), to_i64(a.spent), to_i64(a.reserved), a.rpm, policy,
                a.token_sha256, a.token_expires_at, to_i64(a.ttl_secs), a.created_at, a.blocked_overrun
            ])?;
        }
        Op::DeleteAgent(id) => {
            tx.prepare_cached("DELETE FROM agents WHERE id=?1")?
                .execute(params![id])?;
        }
        Op::PutReservation(r) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO reservations(request_id,agent_id,model,amount,input_bound,output_cap,created_ms,expires_ms,input_price,output_price,cached_input_price,lease_granted,lease_charged,lease_requests)
                 VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)",
            )?
            .execute(params![
                r.request_id, r.agent_id, r.model, to_i64(r.amount), to_i64(r.input_bound), to_i64(r.output_cap),
                r.created_ms, r.expires_ms, to_i64(r.prices.input), to_i64(r.prices.output),
                r.prices.cached_input.map(to_i64), to_i64(r.lease_counts.granted),
                to_i64(r.lease_counts.charged), to_i64(r.lease_counts.requests)
            ])?;
        }
        Op::CloseReservation {
            request_id,
            closed_ms,
            had_row,
        } => {
            if *had_row {
                tx.prepare_cached("DELETE FROM reservations WHERE request_id=?1")?
                    .execute(params![request_id])?;
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO closed_requests(request_id,closed_ms) VALUES(?1,?2)",
            )?
            .execute(params![request_id, closed_ms])?;
        }
        Op::PruneClosed { before_ms } => {
            // In bounded chunks, oldest first (the closed_ms index finds them): after a quiet
            // spell the backlog drains over several sweeps instead of stalling one commit.
            tx.prepare_cached(
                "DELETE FROM closed_requests WHERE request_id IN
                   (SELECT request_id FROM closed_requests WHERE closed_ms <= ?1 ORDER BY closed_ms LIMIT ?2)",
            )?
            .execute(params![before_ms, PRUNE_CHUNK])?;
        }
        Op::PruneAudit { through_seq } => crate::archive::prune_chunk(tx, *through_seq)?,
        Op::PutPriceList(list) => {
            tx.prepare_cached("INSERT OR IGNORE INTO price_lists(id, prices) VALUES(?1, ?2)")?
                .execute(params![list.id, list.json])?;
            // The lists no open lease names are of no further use (settlements are charged at
            // the prices of their lease's list): stored again if their prices come back.
            tx.prepare_cached(
                "DELETE FROM price_lists WHERE id <> ?1 AND id NOT IN (SELECT model FROM reservations)",
            )?
            .execute(params![list.id])?;
        }
        Op::Audit(e) => {
            tx.prepare_cached(
                "INSERT INTO audit(seq,ts_ms,kind,agent_id,request_id,payload,prev_hash,hash) VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
            )?
            .execute(params![to_i64(e.seq), e.ts_ms, e.kind, e.agent_id, e.request_id, e.payload, e.prev_hash, e.hash])?;
        }
    }
    Ok(())
}

pub fn load_agents(conn: &Connection) -> Result<Vec<Agent>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id,name,budget,spent,reserved,rpm,policy,token_sha256,token_expires_at,ttl_secs,created_at,blocked_overrun FROM agents",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            Agent {
                id: r.get(0)?,
                name: r.get(1)?,
                budget: to_u64(r.get(2)?),
                spent: to_u64(r.get(3)?),
                reserved: to_u64(r.get(4)?),
                rpm: r.get(5)?,
                policy: Policy::default(),
                token_sha256: r.get(7)?,
                token_expires_at: r.get(8)?,
                ttl_secs: to_u64(r.get(9)?),
                created_at: r.get(10)?,
                blocked_overrun: r.get(11)?,
                lease_epoch: 0,
            },
            r.get::<_, String>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut a, policy) = row?;
        a.policy = serde_json::from_str(&policy)
            .map_err(|e| StoreError::Corrupt(format!("agents/{}", a.id), e.to_string()))?;
        out.push(a);
    }
    Ok(out)
}

pub fn load_reservations(conn: &Connection) -> Result<Vec<Reservation>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT request_id,agent_id,model,amount,input_bound,output_cap,created_ms,expires_ms,input_price,output_price,cached_input_price,lease_granted,lease_charged,lease_requests FROM reservations",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Reservation {
            request_id: r.get(0)?,
            agent_id: r.get(1)?,
            model: r.get(2)?,
            amount: to_u64(r.get(3)?),
            input_bound: to_u64(r.get(4)?),
            output_cap: to_u64(r.get(5)?),
            created_ms: r.get(6)?,
            expires_ms: r.get(7)?,
            prices: crate::money::Prices {
                input: to_u64(r.get(8)?),
                output: to_u64(r.get(9)?),
                cached_input: r.get::<_, Option<i64>>(10)?.map(to_u64),
            },
            lease_counts: crate::ledger::LeaseCounts {
                granted: to_u64(r.get(11)?),
                charged: to_u64(r.get(12)?),
                requests: to_u64(r.get(13)?),
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Audit events with seq > `after`, oldest first, optionally for one agent.
pub fn load_audit(
    conn: &Connection,
    after: u64,
    limit: u32,
    agent_id: Option<&str>,
) -> Result<Vec<Event>, StoreError> {
    let map = |r: &rusqlite::Row<'_>| {
        Ok(Event {
            seq: to_u64(r.get(0)?),
            ts_ms: r.get(1)?,
            kind: r.get(2)?,
            agent_id: r.get(3)?,
            request_id: r.get(4)?,
            payload: r.get(5)?,
            prev_hash: r.get(6)?,
            hash: r.get(7)?,
        })
    };
    let cols = "SELECT seq,ts_ms,kind,agent_id,request_id,payload,prev_hash,hash FROM audit";
    let rows: Vec<Event> = match agent_id {
        Some(a) => conn
            .prepare(&format!(
                "{cols} WHERE seq > ?1 AND agent_id = ?2 ORDER BY seq LIMIT ?3"
            ))?
            .query_map(params![to_i64(after), a, limit], map)?
            .collect::<Result<_, _>>()?,
        None => conn
            .prepare(&format!("{cols} WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?
            .query_map(params![to_i64(after), limit], map)?
            .collect::<Result<_, _>>()?,
    };
    Ok(rows)
}

/// One audit event of the last minute: agent id, time, request id, payload text.
struct RecentEvent {
    agent_id: String,
    ts_ms: i64,
    request_id: String,
    payload: String,
}

/// The events of `kind` since `since_ms`, oldest first (the audit_ts index finds them).
fn events_since(
    conn: &Connection,
    kind: &str,
    since_ms: i64,
) -> Result<Vec<RecentEvent>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT agent_id, ts_ms, request_id, payload FROM audit WHERE ts_ms > ?1 AND kind = ?2 ORDER BY ts_ms, seq",
    )?;
    let rows = stmt.query_map(params![since_ms, kind], |r| {
        Ok(RecentEvent {
            agent_id: r.get(0)?,
            ts_ms: r.get(1)?,
            request_id: r.get(2)?,
            payload: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn payload_count(p: &serde_json::Value, key: &str) -> u64 {
    p.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// Admissions of the last minute, to rebuild the rate windows. Those of agents with a TPM limit
/// carry the tokens they used if they have settled, else their worst case; the payloads of the
/// others are not read (a busy minute holds millions of events).
fn recent_admissions(
    conn: &Connection,
    minute_ago: i64,
    tpm_agents: &HashSet<&str>,
) -> Result<Vec<RecentAdmission>, StoreError> {
    let mut used: HashMap<String, u64> = HashMap::new();
    for e in events_since(conn, "request.settled", minute_ago)? {
        if !tpm_agents.contains(e.agent_id.as_str()) {
            continue;
        }
        let p: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
        let released = p.get("released").and_then(serde_json::Value::as_bool) == Some(true);
        let tokens = if released {
            0
        } else {
            payload_count(&p, "input_tokens").saturating_add(payload_count(&p, "output_tokens"))
        };
        used.insert(e.request_id, tokens);
    }
    let admissions = events_since(conn, "request.allowed", minute_ago)?;
    Ok(admissions
        .into_iter()
        .map(|e| {
            let settled = if tpm_agents.contains(e.agent_id.as_str()) {
                used.get(&e.request_id).copied()
            } else {
                Some(0)
            };
            let tokens = settled.unwrap_or_else(|| {
                let p: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
                payload_count(&p, "input_token_bound")
                    .saturating_add(payload_count(&p, "output_token_bound"))
            });
            RecentAdmission {
                agent_id: e.agent_id,
                at_ms: e.ts_ms,
                request_id: e.request_id,
                tokens,
                settled: settled.is_some(),
            }
        })
        .collect())
}

/// The last minute's updates that set a TPM limit on an agent that had none (`"tpm": [0, n]`).
fn tpm_enabled(conn: &Connection, minute_ago: i64) -> Result<Vec<(String, i64)>, StoreError> {
    let mut out = Vec::new();
    for e in events_since(conn, "agent.updated", minute_ago)? {
        let p: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
        let tpm = |i: usize| {
            p.get("tpm")
                .and_then(|t| t.get(i))
                .and_then(serde_json::Value::as_u64)
        };
        if tpm(0) == Some(0) && tpm(1).is_some_and(|n| n > 0) {
            out.push((e.agent_id, e.ts_ms));
        }
    }
    Ok(out)
}

/// Ids of the `kind` events (admissions: only those under a lease) of the last
/// [`crate::ledger::CLOSED_MEMORY_MS`] before `last` (the newest event's time, however long ago
/// that was): what a filter may re-send.
fn last_moments(
    conn: &Connection,
    last: Option<i64>,
    kind: &str,
    leased: bool,
) -> Result<Vec<String>, StoreError> {
    let Some(last) = last else {
        return Ok(Vec::new());
    };
    let ids = conn
        .prepare(
            "SELECT request_id FROM audit WHERE ts_ms > ?1 AND kind = ?2 AND request_id <> ''
               AND (?3 = 0 OR payload LIKE '%\"lease\":%')",
        )?
        .query_map(
            params![last - crate::ledger::CLOSED_MEMORY_MS, kind, leased],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    Ok(ids)
}

/// The price lists that open leases name.
fn load_price_lists(conn: &Connection) -> Result<HashMap<String, String>, StoreError> {
    let rows = conn
        .prepare("SELECT id, prices FROM price_lists WHERE id IN (SELECT model FROM reservations)")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

fn load(conn: &Connection) -> Result<Loaded, StoreError> {
    let head: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let now_ms = crate::core::now_ms();
    // Memory keeps the ids closed in the last moments of the previous run, however long ago it
    // stopped: those are what its filters re-send (the answers died with it). Older ones stay on
    // disk, looked up only by a settlement that matches nothing in memory. Ids closed by expiry
    // carry a time ahead of the clock and are all kept.
    let last_close: Option<i64> = conn.query_row(
        "SELECT MAX(closed_ms) FROM closed_requests WHERE closed_ms <= ?1",
        params![now_ms],
        |r| r.get(0),
    )?;
    let since = last_close.map_or(i64::MIN, |t| t - crate::ledger::CLOSED_MEMORY_MS);
    let closed = conn
        .prepare("SELECT request_id, closed_ms FROM closed_requests WHERE closed_ms > ?1")?
        .query_map(params![since], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let agents = load_agents(conn)?;
    let tpm_agents: HashSet<&str> = agents
        .iter()
        .filter(|a| a.policy.tpm > 0)
        .map(|a| a.id.as_str())
        .collect();
    let minute_ago = now_ms.saturating_sub(60_000);
    let recent_admissions = recent_admissions(conn, minute_ago, &tpm_agents)?;
    let last_event_ms: Option<i64> =
        conn.query_row("SELECT MAX(ts_ms) FROM audit", [], |r| r.get(0))?;
    let tpm_enabled = tpm_enabled(conn, minute_ago)?;
    let archived = crate::archive::newest(conn)?.map(|(_, a)| a);
    Ok(Loaded {
        agents,
        reservations: load_reservations(conn)?,
        closed,
        recent_admissions,
        tpm_enabled,
        price_lists: load_price_lists(conn)?,
        leased_admissions: last_moments(conn, last_event_ms, "request.allowed", true)?,
        recent_denials: last_moments(conn, last_event_ms, "request.denied", false)?,
        archive_pending: match &archived {
            Some(a) => crate::archive::pending(conn, a)?,
            None => 0,
        },
        archived: archived.unwrap_or_default(),
        last_seq: head.as_ref().map_or(0, |h| to_u64(h.0)),
        last_hash: head.map(|h| h.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counted_kinds_are_spelled_alike_in_sql() {
        let sql = format!("('{}')", COUNTED.join("','"));
        assert_eq!(sql, COUNTED_KINDS);
    }

    #[test]
    fn members_of_payloads_are_read_as_written() {
        let p = serde_json::json!({
            "message": "says \"code\":\"fake\" and \\", "code": "model_not_allowed",
            "path": "/v1/x\"y", "charge_micros": 1234,
        })
        .to_string();
        assert_eq!(member(&p, "code"), Some("\"model_not_allowed\""));
        assert_eq!(member(&p, "charge_micros"), Some("1234"));
        assert_eq!(
            member(&p, "message"),
            Some(r#""says \"code\":\"fake\" and \\""#)
        );
        assert_eq!(member(&p, "path"), Some(r#""/v1/x\"y""#));
        assert_eq!(member(&p, "model"), None);
        assert_eq!(member(r#"{"code":"unterminated"#, "code"), None);
        assert_eq!(member(r#"{"charge_micros":7}"#, "charge_micros"), Some("7"));
    }

    #[test]
    fn a_database_of_an_older_daemon_gets_the_new_columns_and_counts() {
        let dir = std::env::temp_dir().join(format!("aex-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("aex.db");
        {
            // The reservations table as daemons before the lease totals wrote it, one row in it,
            // and a settled request in the log.
            let c = Connection::open(&db).unwrap();
            c.execute_batch(
                "CREATE TABLE reservations(
                   request_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, model TEXT NOT NULL,
                   amount INTEGER NOT NULL, input_bound INTEGER NOT NULL, output_cap INTEGER NOT NULL,
                   created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
                   input_price INTEGER NOT NULL DEFAULT 0, output_price INTEGER NOT NULL DEFAULT 0, cached_input_price INTEGER);
                 INSERT INTO reservations(request_id,agent_id,model,amount,input_bound,output_cap,created_ms,expires_ms)
                   VALUES('lease_old','a1','list',500,0,0,1,2);
                 CREATE TABLE audit(
                   seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, kind TEXT NOT NULL,
                   agent_id TEXT NOT NULL, request_id TEXT NOT NULL, payload TEXT NOT NULL,
                   prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
                 INSERT INTO audit VALUES(1, 61000, 'request.settled', 'a1', 'r1', '{\"charge_micros\":42}', '', '');",
            )
            .unwrap();
        }
        let conn = open_connection(&db).unwrap();
        let rows = load_reservations(&conn).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].lease_counts, crate::ledger::LeaseCounts::default());
        let minutes: (i64, i64, i64) = conn
            .query_row("SELECT minute_ms, n, charge FROM audit_minutes", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(minutes, (60_000, 1, 42));
        drop(conn);
        // Opening again changes nothing.
        let conn = open_connection(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT SUM(n) FROM audit_minutes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert!(has_minute_counts(&conn));
        // A downgrade: an older daemon appends an event (and moves the head) without counting
        // it. The counts no longer cover the log: readers fall back to it, and the next open
        // rebuilds them (they stayed short for good, and `aex audit` failed).
        conn.execute_batch(
            "INSERT INTO audit VALUES(2, 62000, 'request.settled', 'a1', 'r2', '{\"charge_micros\":8}', '', 'h2');
             INSERT OR REPLACE INTO meta(key, value) VALUES('audit_head', '2:h2');",
        )
        .unwrap();
        assert!(!has_minute_counts(&conn));
        drop(conn);
        let conn = open_connection(&db).unwrap();
        assert!(has_minute_counts(&conn));
        let minutes: (i64, i64) = conn
            .query_row("SELECT SUM(n), SUM(charge) FROM audit_minutes", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(minutes, (2, 50));
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_database_records_its_format_and_a_newer_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("aex-format-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("aex.db");
        let version = |c: &Connection| -> i64 {
            c.query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        // A database from before formats were recorded reads 0 and is brought up to date.
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);")
            .unwrap();
        let conn = open_connection(&db).unwrap();
        assert_eq!(version(&conn), FORMAT);
        // One written by a newer daemon is refused, by the daemon and by read-only readers,
        // and left as it was.
        conn.pragma_update(None, "user_version", FORMAT + 1)
            .unwrap();
        drop(conn);
        let err = open_connection(&db).unwrap_err();
        assert!(
            matches!(err, StoreError::Newer { found } if found == FORMAT + 1),
            "{err}"
        );
        assert!(err.to_string().contains("newer AEX"), "{err}");
        let ro =
            Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        assert!(check_format(&ro).is_err());
        assert_eq!(version(&ro), FORMAT + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
