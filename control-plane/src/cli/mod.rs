//! The `aex` command line: one file per subcommand, clap derive with doc comments as help.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aex_proto::v1::admin_service_client::AdminServiceClient;
use clap::{Parser, Subcommand};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::home::Home;

mod agent;
mod archive;
pub mod audit;
pub(crate) mod daemon;
mod doctor;
mod init;
mod mock;
mod models;
mod run;
mod status;
mod version;

/// AEX — governance gateway for AI agents: budgets, policies and audit on every LLM call.
///
/// Every command acts on one AEX home: --home DIR, else $AEX_HOME, else ~/.aex.
#[derive(Debug, Parser)]
#[command(name = "aex", version)]
pub struct Cli {
    /// AEX home directory; overrides $AEX_HOME (default: ~/.aex).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Machine-readable JSON output (an error is one JSON line on stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the AEX home with default config, models and an admin token.
    Init(init::Args),
    /// Start, stop or inspect the control plane and Envoy.
    #[command(subcommand)]
    Daemon(daemon::Cmd),
    /// Create, inspect, change and delete agents.
    #[command(subcommand)]
    Agent(agent::Cmd),
    /// Run a command as an agent (OPENAI_BASE_URL and OPENAI_API_KEY set); its exit code is aex's.
    Run(run::Args),
    /// Versions of the CLI, the daemon and the filter.
    Version(version::Args),
    /// Check the environment (or, with --compat --token T, protocol fidelity through the gateway).
    Doctor(doctor::Args),
    /// Enforcement summary: requests, denials by reason, spend over the last hour and day.
    Status(status::StatusArgs),
    /// Per-agent financials: spent, reserved, remaining, burn rate, time to exhaustion.
    Metrics(status::MetricsArgs),
    /// Verify the ledger and audit-log invariants; non-zero exit on any breach.
    Audit(audit::Args),
    /// The model catalogue: list it, or hot-reload models.toml live.
    #[command(subcommand)]
    Models(models::Cmd),
    /// Run the mock OpenAI-compatible provider (tests, offline demos).
    Mock(mock::Args),
}

/// What every command gets.
pub struct Ctx {
    pub home: Home,
    pub json: bool,
}

/// Output piped into `head` closes early: `println!` then panics with "failed printing to
/// stdout: Broken pipe". End quietly instead, as any Unix tool does (exit status 141, as if
/// killed by SIGPIPE). SIGPIPE itself stays ignored: the CLI's gRPC and HTTP sockets must see
/// a closed peer as an error, not die of it.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    quiet_on_closed_stdout();
    let ctx = Ctx {
        home: Home::resolve(cli.home.as_deref())?,
        json: cli.json,
    };
    match cli.command {
        Command::Init(a) => init::run(&ctx, a),
        Command::Daemon(c) => daemon::run(&ctx, c),
        Command::Agent(c) => agent::run(&ctx, c),
        Command::Audit(a) => audit::run(&ctx, a),
        Command::Run(a) => run::run(&ctx, a),
        Command::Doctor(a) => doctor::run(&ctx, a),
        Command::Status(a) => status::status(&ctx, a),
        Command::Metrics(a) => status::metrics(&ctx, a),
        Command::Version(a) => version::run(&ctx, a),
        Command::Models(c) => models::run(&ctx, c),
        Command::Mock(a) => mock::run(a),
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Writes a file readable by the owner only (tokens, keys).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // A name no other file can have: not `<agent>.tmp` (agent names may contain '.', so that
    // could be another agent's credentials file), unique per process and write.
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    // A write that failed (a full disk) leaves no half-written file behind.
    written.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[derive(Clone)]
pub struct AdminAuth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminServiceClient<InterceptedService<Channel, AdminAuth>>;

/// A client for the daemon's admin API, authenticated with `$AEX_HOME/admin.token`.
pub async fn admin(home: &Home) -> anyhow::Result<Admin> {
    let config = crate::config::Config::load(&home.config())?;
    let token = crate::daemon::read_secret(&home.admin_token())?;
    let addr = format!("http://127.0.0.1:{}", config.grpc_port);
    let channel = Channel::from_shared(addr.clone())?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the AEX daemon is not reachable at {addr} (start it with `aex daemon start`)"
            )
        })?;
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| anyhow::anyhow!("admin token is not valid ASCII"))?;
    Ok(AdminServiceClient::with_interceptor(
        channel,
        AdminAuth(value),
    ))
}

/// The home's database, read-only (`aex status`, `metrics`, `audit` work with the daemon
/// stopped).
pub fn open_db(ctx: &Ctx) -> anyhow::Result<rusqlite::Connection> {
    let path = ctx.home.db();
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no database at {} (run `aex init` and `aex daemon start`)",
            path.display()
        ),
        Err(e) => anyhow::bail!("cannot read the database at {}: {e}", path.display()),
    }
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    crate::store::check_format(&conn)?;
    Ok(conn)
}

/// Turns a gRPC status from the daemon into a plain error message.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable if s.message().contains("transport") => {
            anyhow::anyhow!("the AEX daemon is not reachable (start it with `aex daemon start`)")
        }
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "the daemon refused the admin token in $AEX_HOME/admin.token: {}",
            s.message()
        ),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

/// An error on stderr: `error: …`, or with --json one line `{"error":{"message":"…"}}`.
pub fn report_error(json: bool, msg: &str) {
    if json {
        eprintln!("{}", serde_json::json!({ "error": { "message": msg } }));
    } else {
        eprintln!("error: {msg}");
    }
}

/// A warning (or, with `kind` "note", information) on stderr: plain text, or with --json one
/// line `{"warning":{"message":…}}`, so a script reading stderr as JSON lines keeps working.
pub fn report_note(json: bool, kind: &str, msg: &str) {
    if json {
        eprintln!("{}", serde_json::json!({ kind: { "message": msg } }));
    } else if kind == "warning" {
        eprintln!("warning: {msg}");
    } else {
        eprintln!("{msg}");
    }
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Unix seconds as an RFC 3339 UTC timestamp, e.g. `2026-11-28T10:40:00Z`.
pub fn utc(unix_secs: i64) -> String {
    let (days, secs) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_869_155), "2026-11-28T12:32:35Z");
        assert_eq!(utc(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }
}
