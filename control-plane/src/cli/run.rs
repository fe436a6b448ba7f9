//! `aex run --agent NAME -- CMD…`: runs a command as an agent, with `OPENAI_BASE_URL` and
//! `OPENAI_API_KEY` pointing at the gateway. The command's exit code becomes aex's; SIGTERM and
//! SIGHUP sent to aex are passed on to it, and Ctrl-C reaches it from the terminal while aex
//! waits for it to finish.

use std::process::{Command, ExitCode, ExitStatus};

use anyhow::Context;

use crate::cli::{report_error, runtime, Ctx};
use crate::config::{Catalog, Config, DEFAULT_MODELS_TOML};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent whose credential (from `$AEX_HOME/credentials/NAME`) the command uses.
    #[arg(long)]
    agent: String,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The environment variables that hold provider keys: each provider's `api_key_env` in
/// models.toml (the default catalog's too, for a file that cannot be read), and what the home's
/// `.env` sets.
fn provider_key_vars(home: &crate::home::Home) -> std::collections::BTreeSet<String> {
    let mut vars: std::collections::BTreeSet<String> =
        crate::providers::read_env_file(&home.env_file())
            .into_keys()
            .collect();
    let catalogs = [
        Catalog::load(&home.models()).ok(),
        Catalog::parse(DEFAULT_MODELS_TOML, "models.toml").ok(),
    ];
    for c in catalogs.iter().flatten() {
        vars.extend(c.providers.values().filter_map(|p| p.api_key_env.clone()));
    }
    vars
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    // The name becomes a path under credentials/: never `../admin.token` or an absolute path.
    crate::ledger::validate_name(&a.agent).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = Config::load(&ctx.home.config())?;
    let cred = ctx.home.credential(&a.agent);
    let token = std::fs::read_to_string(&cred)
        .with_context(|| format!("no credential for agent '{}' at {} (create it with `aex agent create` or rotate its token)", a.agent, cred.display()))?;
    let (program, args) = a.command.split_first().context("no command given")?;
    let base = format!("http://127.0.0.1:{}/v1", config.envoy_port);
    let mut cmd = Command::new(program);
    // The agent gets its token, never the providers' keys this shell may hold for the daemon.
    for var in provider_key_vars(&ctx.home) {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .env("OPENAI_BASE_URL", &base)
        .env("OPENAI_API_BASE", &base)
        .env("OPENAI_API_KEY", token.trim())
        .env("AEX_AGENT", &a.agent);
    // The OpenAI Agents SDK uploads traces (prompts, tool calls) to api.openai.com by default,
    // authenticated with OPENAI_API_KEY: the agent's AEX token and its data would leave the
    // gateway. Off unless the user chose otherwise.
    if std::env::var_os("OPENAI_AGENTS_DISABLE_TRACING").is_none() {
        cmd.env("OPENAI_AGENTS_DISABLE_TRACING", "1");
    }
    let status = match runtime()?.block_on(supervise(cmd)) {
        Ok(s) => s,
        Err(e) => {
            // The shell's codes for a command that cannot run, so a script can tell them from
            // the command's own failures.
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            report_error(ctx.json, &format!("cannot run '{program}': {e}"));
            return Ok(ExitCode::from(code));
        }
    };
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        // Killed by a signal: the shell convention 128 + signal.
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(u8::try_from(128 + status.signal().unwrap_or(0)).unwrap_or(1))
        }
    })
}

/// Runs the command to its end, passing SIGTERM and SIGHUP on to it. SIGINT and SIGQUIT are
/// ignored here: the terminal sends them to the whole foreground group, the command included,
/// which decides what they mean; aex keeps waiting for it and returns its status.
async fn supervise(cmd: Command) -> std::io::Result<ExitStatus> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    // Not reaped while we wait for it, so the pid cannot have been reused.
    let pid = child.id();
    let forward = |sig: i32| {
        if let Some(pid) = pid {
            crate::procs::signal(pid, sig);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => return status,
            _ = term.recv() => forward(libc::SIGTERM),
            _ = hup.recv() => forward(libc::SIGHUP),
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
    }
}
