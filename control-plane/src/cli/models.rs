//! `aex models reload`: applies an edited `models.toml` (prices, models, providers and Envoy
//! clusters) to the running gateway without dropping traffic; a bad file is refused.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::{admin, print_json, runtime, status_error, Ctx};

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Re-read models.toml and provider keys and apply them live.
    Reload,
}

pub fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Reload => {
            // Validate locally first for an immediate, precise error.
            crate::config::Catalog::load(&ctx.home.models())
                .map_err(|e| anyhow::anyhow!("{e}; nothing was reloaded"))?;
            let r = runtime()?.block_on(async {
                let mut c = admin(&ctx.home).await?;
                c.reload_models(aex_proto::v1::ReloadModelsRequest {})
                    .await
                    .map_err(status_error)
            })?;
            let r = r.into_inner();
            if ctx.json {
                print_json(
                    &json!({ "models": r.models, "providers": r.providers, "mocked_providers": r.mocked_providers, "snapshot_version": r.snapshot_version }),
                );
            } else {
                println!(
                    "reloaded {} models from {} providers",
                    r.models, r.providers
                );
                for m in &r.mocked_providers {
                    println!("  provider {m} → built-in mock (no API key set)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
