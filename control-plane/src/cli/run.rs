//! `aex run --agent NAME -- CMD…`: runs a command as an agent, with `OPENAI_BASE_URL` and
//! `OPENAI_API_KEY` pointing at the gateway. The command's exit code becomes aex's.

use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::cli::Ctx;
use crate::config::Config;

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

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ctx.home.config())?;
    let cred = ctx.home.credential(&a.agent);
    let token = std::fs::read_to_string(&cred)
        .with_context(|| format!("no credential for agent '{}' at {} (create it with `aex agent create` or rotate its token)", a.agent, cred.display()))?;
    let (program, args) = a.command.split_first().context("no command given")?;
    let base = format!("http://127.0.0.1:{}/v1", config.envoy_port);
    let status = Command::new(program)
        .args(args)
        .env("OPENAI_BASE_URL", &base)
        .env("OPENAI_API_BASE", &base)
        .env("OPENAI_API_KEY", token.trim())
        .env("AEX_AGENT", &a.agent)
        .status()
        .with_context(|| format!("cannot run '{program}'"))?;
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        // Killed by a signal: the shell convention 128 + signal.
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(u8::try_from(128 + status.signal().unwrap_or(0)).unwrap_or(1))
        }
    })
}
