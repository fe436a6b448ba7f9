//! `aex version`: versions of the CLI, the running daemon and the filter loaded in Envoy.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::{admin, print_json, runtime, Ctx};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _a: Args) -> anyhow::Result<ExitCode> {
    let cli = env!("CARGO_PKG_VERSION");
    let health = runtime()?.block_on(async {
        let mut c = admin(&ctx.home).await.ok()?;
        c.health(aex_proto::v1::HealthRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    });
    let daemon = health.as_ref().map(|h| h.version.clone());
    let filter = health
        .as_ref()
        .map(|h| h.filter_version.clone())
        .filter(|v| !v.is_empty());
    if ctx.json {
        print_json(&json!({ "cli": cli, "daemon": daemon, "filter": filter }));
    } else {
        println!("aex cli     {cli}");
        println!("aex daemon  {}", daemon.as_deref().unwrap_or("not running"));
        println!(
            "aex filter  {}",
            filter
                .as_deref()
                .unwrap_or("not loaded (no Envoy has synced)")
        );
    }
    Ok(ExitCode::SUCCESS)
}
