//! Resolves configured providers into upstreams the filter can route to: the Envoy cluster, the
//! authority and path prefix, and the daemon's API key (from the environment or `$AEX_HOME/.env`).
//! A provider without a key is served by the built-in mock when `[mock] fallback` is on.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{Catalog, Config, ProviderDef};

/// Envoy cluster of the control plane's HTTP server (dashboard, metrics, built-in mock).
pub const HTTP_CLUSTER: &str = "aex_http";
/// Path prefix under which the control plane serves the built-in mock provider.
pub const MOCK_PREFIX: &str = "/mock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub cluster: String,
    pub authority: String,
    pub base_path: String,
    pub api_key: String,
    /// Served by the built-in mock because no key is configured.
    pub mocked: bool,
    /// The real endpoint, for the Envoy cluster (None when mocked).
    pub def: Option<ProviderDef>,
}

/// Reads `KEY=VALUE` lines (with optional `export ` and quotes) from a `.env` file.
pub fn read_env_file(path: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

pub fn cluster_name(provider: &str) -> String {
    format!("provider_{provider}")
}

pub fn resolve(
    catalog: &Catalog,
    config: &Config,
    env_file: &BTreeMap<String, String>,
) -> Vec<Upstream> {
    catalog
        .providers
        .values()
        .map(|p| {
            let key = p
                .api_key_env
                .as_deref()
                .and_then(|k| {
                    std::env::var(k)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .or_else(|| env_file.get(k).cloned())
                })
                .unwrap_or_default();
            let needs_key = p.api_key_env.is_some();
            if needs_key && key.is_empty() && config.mock_fallback {
                Upstream {
                    name: p.name.clone(),
                    cluster: HTTP_CLUSTER.to_string(),
                    authority: format!("127.0.0.1:{}", config.http_port),
                    base_path: format!("{MOCK_PREFIX}/v1"),
                    api_key: "aex-mock-key".into(),
                    mocked: true,
                    def: None,
                }
            } else {
                let default_port = if p.tls { 443 } else { 80 };
                let authority = if p.port == default_port {
                    p.host.clone()
                } else {
                    format!("{}:{}", p.host, p.port)
                };
                Upstream {
                    name: p.name.clone(),
                    cluster: cluster_name(&p.name),
                    authority,
                    base_path: p.base_path.clone(),
                    api_key: key,
                    mocked: false,
                    def: Some(p.clone()),
                }
            }
        })
        .collect()
}
