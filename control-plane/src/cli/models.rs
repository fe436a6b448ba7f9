//! `aex models list|reload`: the model catalogue the gateway enforces, and applying an edited
//! `models.toml` (prices, models, providers and Envoy clusters) to the running gateway without
//! dropping traffic; a bad file is refused.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::{admin, print_json, runtime, status_error, Ctx};
use crate::money::format_usd;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// The models the running daemon serves, with prices (USD per 1M tokens) and providers.
    List,
    /// Re-read models.toml and provider keys and apply them live.
    Reload,
}

pub fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::List => list(ctx),
        Cmd::Reload => reload(ctx),
    }
}

fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let r = runtime()?.block_on(async {
        let mut c = admin(&ctx.home).await?;
        c.list_models(aex_proto::v1::ListModelsRequest {})
            .await
            .map_err(status_error)
    })?;
    let r = r.into_inner();
    let price = |priced: bool, micros: u64| priced.then(|| format_usd(micros));
    if ctx.json {
        let models: Vec<_> = r
            .models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "provider": m.provider, "upstream_model": m.upstream_model,
                    "priced": m.priced,
                    "input_usd_per_1m": price(m.priced, m.input_micros_per_1m),
                    "output_usd_per_1m": price(m.priced, m.output_micros_per_1m),
                    "cached_input_usd_per_1m": m.cached_input_micros_per_1m.filter(|_| m.priced).map(format_usd),
                    "max_output_tokens": m.max_output_tokens,
                    "mocked": r.mocked_providers.contains(&m.provider),
                })
            })
            .collect();
        print_json(&json!(models));
        return Ok(ExitCode::SUCCESS);
    }
    if r.models.is_empty() {
        println!("No models. Add some to {}", ctx.home.models().display());
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 6]> = r
        .models
        .iter()
        .map(|m| {
            let provider = if r.mocked_providers.contains(&m.provider) {
                format!("{} (mock)", m.provider)
            } else {
                m.provider.clone()
            };
            let unpriced = || "unpriced".to_string();
            [
                m.name.clone(),
                provider,
                price(m.priced, m.input_micros_per_1m).unwrap_or_else(unpriced),
                price(m.priced, m.output_micros_per_1m).unwrap_or_else(unpriced),
                m.max_output_tokens.to_string(),
                m.upstream_model.clone(),
            ]
        })
        .collect();
    let header = [
        "MODEL",
        "PROVIDER",
        "INPUT $/1M",
        "OUTPUT $/1M",
        "MAX OUT",
        "UPSTREAM",
    ];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..6).map(width).collect();
    let line = |c: [&str; 6]| {
        println!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    Ok(ExitCode::SUCCESS)
}

fn reload(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    // Validate locally first for an immediate, precise error.
    crate::config::Catalog::load(&ctx.home.models())
        .map_err(|e| anyhow::anyhow!("{}\nNothing was reloaded.", e.to_string().trim_end()))?;
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
