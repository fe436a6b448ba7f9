//! The `$AEX_HOME` layout: every path the daemon and the CLI read or write.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home` if given, else `$AEX_HOME`, else `~/.aex`.
    pub fn resolve(explicit: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(p) = explicit {
            return Ok(Self {
                root: p.to_path_buf(),
            });
        }
        if let Some(p) = std::env::var_os("AEX_HOME").filter(|p| !p.is_empty()) {
            return Ok(Self {
                root: PathBuf::from(p),
            });
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| anyhow::anyhow!("neither AEX_HOME nor HOME is set"))?;
        Ok(Self {
            root: PathBuf::from(home).join(".aex"),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn models(&self) -> PathBuf {
        self.root.join("models.toml")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("aex.db")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    /// Secret the filter presents to the control plane (rendered into the Envoy config).
    pub fn filter_key(&self) -> PathBuf {
        self.root.join("filter.key")
    }
    pub fn env_file(&self) -> PathBuf {
        self.root.join(".env")
    }
    pub fn credentials(&self) -> PathBuf {
        self.root.join("credentials")
    }
    pub fn credential(&self, agent: &str) -> PathBuf {
        self.credentials().join(agent)
    }
    pub fn envoy_dir(&self) -> PathBuf {
        self.root.join("envoy")
    }
    pub fn envoy_config(&self) -> PathBuf {
        self.envoy_dir().join("envoy.yaml")
    }
    /// Provider clusters for Envoy (CDS), in their own directory so Envoy can watch it.
    pub fn envoy_cds(&self) -> PathBuf {
        self.envoy_dir().join("cds").join("clusters.yaml")
    }
    pub fn installed_filter(&self) -> PathBuf {
        self.root.join("aex_filter.wasm")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pid_file(&self, what: &str) -> PathBuf {
        self.run_dir().join(format!("{what}.pid"))
    }
}
