//! `aex init`: creates `$AEX_HOME` with defaults, an admin token and the filter key. Existing
//! files are kept, so running it twice is safe.

use std::process::ExitCode;

use crate::cli::{print_json, write_private, Ctx};
use crate::config::{DEFAULT_CONFIG_TOML, DEFAULT_MODELS_TOML};

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
    for d in [
        h.root().to_path_buf(),
        h.credentials(),
        h.envoy_dir(),
        h.logs(),
        h.run_dir(),
    ] {
        std::fs::create_dir_all(&d)?;
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
