//! `aex init`: creates `$AEX_HOME` with defaults, an admin token and the filter key. Existing
//! files are kept, so running it twice is safe.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{print_json, write_private, Ctx};
use crate::config::{Catalog, Config, DEFAULT_CONFIG_TOML, DEFAULT_MODELS_TOML};

#[derive(Debug, clap::Args)]
pub struct Args {}

fn random_secret(prefix: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

pub fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let h = &ctx.home;
    // `--home ~` or `AEX_HOME=/tmp` by mistake: never adopt (and lock to 0700) a directory of
    // other files.
    if let Ok(mut entries) = std::fs::read_dir(h.root()) {
        let markers = [
            h.config(),
            h.models(),
            h.admin_token(),
            h.filter_key(),
            h.db(),
        ];
        if entries.next().is_some() && !markers.iter().any(|m| m.exists()) {
            anyhow::bail!(
                "{} is not empty and is not an AEX home (no config.toml, models.toml, admin.token or aex.db): \
                 choose a new or empty directory with --home DIR or AEX_HOME",
                h.root().display()
            );
        }
    }
    for d in [
        h.root().to_path_buf(),
        h.credentials(),
        h.envoy_dir(),
        h.logs(),
        h.run_dir(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.root(), std::fs::Permissions::from_mode(0o700))?;
    std::fs::set_permissions(h.credentials(), std::fs::Permissions::from_mode(0o700))?;
    let mut created = Vec::new();
    let mut kept = Vec::new();
    let files: [(std::path::PathBuf, String, bool); 4] = [
        (h.config(), DEFAULT_CONFIG_TOML.to_string(), false),
        (h.models(), DEFAULT_MODELS_TOML.to_string(), false),
        (h.admin_token(), random_secret("aex_admin_") + "\n", true),
        (h.filter_key(), random_secret("") + "\n", true),
    ];
    for (path, content, private) in files {
        // A secret file left empty or cut short is replaced: it would lock nothing.
        let unusable = private && path.exists() && crate::daemon::read_secret(&path).is_err();
        if path.exists() && !unusable {
            kept.push(path.display().to_string());
            continue;
        }
        if private {
            write_private(&path, content.as_bytes())?;
        } else {
            std::fs::write(&path, content)?;
        }
        created.push(path.display().to_string());
    }
    // A kept file must be one the daemon can start with.
    Config::load(&h.config())
        .map(drop)
        .and_then(|()| Catalog::load(&h.models()).map(drop))
        .map_err(|e| {
            anyhow::anyhow!(
                "{}\nThe home is otherwise ready: fix the file, or move it away and run `aex init` again for the default.",
                e.to_string().trim_end()
            )
        })?;
    if ctx.json {
        print_json(&serde_json::json!({ "home": h.root(), "created": created, "kept": kept }));
    } else {
        println!("AEX home: {}", h.root().display());
        for c in &created {
            println!("  created {c}");
        }
        for k in &kept {
            println!("  kept    {k}");
        }
        println!(
            "Provider keys go in the environment or {} (OPENAI_API_KEY, GROQ_API_KEY).",
            h.env_file().display()
        );
        println!("Next: aex daemon start");
    }
    Ok(ExitCode::SUCCESS)
}
