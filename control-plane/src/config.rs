//! Configuration in two stages: raw serde input from `config.toml` / `models.toml`, then a
//! validated [`Config`] / [`Catalog`] where every value is checked and a bad file is an error
//! naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::money::{self, Prices};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The parser's message, not its error as a `source`: an error chain would print it twice.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        path: String,
        key: String,
        reason: String,
    },
}

fn invalid(path: &str, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        key: key.into(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

// ------------------------------------------------------------------ config.toml

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    ports: RawPorts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    envoy: RawEnvoy,
    #[serde(default)]
    mock: RawMock,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    envoy: Option<u16>,
    grpc: Option<u16>,
    http: Option<u16>,
    envoy_admin: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<u64>,
    image_token_bound: Option<u64>,
    message_token_overhead: Option<u64>,
    reservation_ttl_secs: Option<u64>,
    min_output_tokens: Option<u64>,
    commit_retry_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvoy {
    concurrency: Option<u32>,
    binary: Option<String>,
    log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMock {
    fallback: Option<bool>,
}

/// Validated `config.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Agents' entry point (`http://127.0.0.1:{envoy}/v1`).
    pub envoy_port: u16,
    /// Control-plane gRPC (filter and CLI).
    pub grpc_port: u16,
    /// Control-plane HTTP (dashboard, metrics, built-in mock provider).
    pub http_port: u16,
    pub envoy_admin_port: u16,
    /// Largest request body accepted (bytes); larger → 413.
    pub max_body_bytes: u64,
    /// Input tokens assumed per image part when bounding a request's cost.
    pub image_token_bound: u64,
    /// Input tokens added per message (chat template markers) when bounding a request's cost.
    pub message_token_overhead: u64,
    /// A reservation not settled within this time is charged in full (the proxy is presumed dead).
    pub reservation_ttl_secs: u64,
    /// The smallest output cap a budget clamp may leave; below it the request is refused (402).
    pub min_output_tokens: u64,
    /// How long the daemon retries a commit the database refuses because it is locked (another
    /// process holds its write lock) before it exits, so that a restart reloads the ledger from
    /// the disk; requests are refused (503) meanwhile.
    pub commit_retry_secs: u64,
    /// Envoy worker threads.
    pub envoy_concurrency: u32,
    pub envoy_binary: Option<String>,
    pub envoy_log_level: String,
    /// Route providers with no API key to the built-in mock provider (offline quick start).
    pub mock_fallback: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Self::parse("", &path.display().to_string());
        }
        Self::parse(&read(path)?, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let port = |v: Option<u16>, key: &str, default: u16| -> Result<u16, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(path, key, "port must be 1-65535")),
                p => Ok(p),
            }
        };
        let cfg = Config {
            envoy_port: port(raw.ports.envoy, "ports.envoy", 9000)?,
            grpc_port: port(raw.ports.grpc, "ports.grpc", 9001)?,
            http_port: port(raw.ports.http, "ports.http", 9002)?,
            envoy_admin_port: port(raw.ports.envoy_admin, "ports.envoy_admin", 9901)?,
            max_body_bytes: raw.limits.max_body_bytes.unwrap_or(8 << 20),
            image_token_bound: raw.limits.image_token_bound.unwrap_or(6_000),
            message_token_overhead: raw.limits.message_token_overhead.unwrap_or(8),
            reservation_ttl_secs: raw.limits.reservation_ttl_secs.unwrap_or(3_600),
            min_output_tokens: raw.limits.min_output_tokens.unwrap_or(16),
            commit_retry_secs: raw.limits.commit_retry_secs.unwrap_or(60),
            envoy_concurrency: raw.envoy.concurrency.unwrap_or(2),
            envoy_binary: raw.envoy.binary.filter(|b| !b.is_empty()),
            envoy_log_level: raw.envoy.log_level.unwrap_or_else(|| "warning".into()),
            mock_fallback: raw.mock.fallback.unwrap_or(true),
        };
        if !(1024..=256 << 20).contains(&cfg.max_body_bytes) {
            return Err(invalid(
                path,
                "limits.max_body_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        if cfg.reservation_ttl_secs < 10 {
            return Err(invalid(
                path,
                "limits.reservation_ttl_secs",
                "must be at least 10",
            ));
        }
        if cfg.min_output_tokens == 0 {
            return Err(invalid(
                path,
                "limits.min_output_tokens",
                "must be at least 1",
            ));
        }
        if !(1..=3_600).contains(&cfg.commit_retry_secs) {
            return Err(invalid(
                path,
                "limits.commit_retry_secs",
                "must be between 1 and 3600",
            ));
        }
        if cfg.envoy_concurrency == 0 || cfg.envoy_concurrency > 256 {
            return Err(invalid(path, "envoy.concurrency", "must be 1-256"));
        }
        match cfg.envoy_log_level.as_str() {
            "info" | "warning" | "warn" | "error" | "critical" | "off" => {}
            // Envoy's debug log prints every request's headers: the provider key the filter
            // sets and the agent's token (SPEC §6: keys never reach a log line).
            "debug" | "trace" => return Err(invalid(
                path,
                "envoy.log_level",
                "debug and trace are refused: at those levels Envoy logs every request's headers, provider API keys and agent tokens included; use info at most",
            )),
            _ => {
                return Err(invalid(
                    path,
                    "envoy.log_level",
                    "must be one of info, warning, error, critical, off",
                ))
            }
        }
        let ports = [
            cfg.envoy_port,
            cfg.grpc_port,
            cfg.http_port,
            cfg.envoy_admin_port,
        ];
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].contains(p) {
                return Err(invalid(path, "ports", format!("port {p} is used twice")));
            }
        }
        Ok(cfg)
    }
}

/// The `config.toml` that `aex init` writes.
pub const DEFAULT_CONFIG_TOML: &str = r#"# AEX configuration. Every value shown is the default.

[ports]
envoy = 9000        # agents use http://127.0.0.1:9000/v1
grpc = 9001         # control plane gRPC (filter, CLI)
http = 9002         # control plane HTTP (dashboard, /metrics)
envoy_admin = 9901

[limits]
max_body_bytes = 8388608        # larger requests get 413
image_token_bound = 6000        # input tokens assumed per image when reserving
message_token_overhead = 8      # input tokens added per message when reserving
reservation_ttl_secs = 3600     # unsettled reservations are charged in full after this
min_output_tokens = 16          # smallest output cap a budget clamp may leave
commit_retry_secs = 60          # a database locked this long makes the daemon exit (status 74)

[envoy]
concurrency = 2
# binary = "/usr/local/bin/envoy"   # else --envoy, $AEX_ENVOY or PATH
log_level = "warning"   # info, warning, error, critical or off (logs/envoy.log)

[mock]
fallback = true     # providers without an API key go to the built-in mock provider
"#;

// ------------------------------------------------------------------ models.toml

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    base_url: String,
    api_key_env: Option<String>,
    /// false: never add `stream_options.include_usage` (for providers that reject it).
    inject_stream_usage: Option<bool>,
    /// The header that carries the key: `authorization` (default, `Bearer KEY`) or another
    /// header that takes the bare key (`api-key` for Azure OpenAI).
    api_key_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: String,
    upstream_model: Option<String>,
    input_usd_per_1m: Option<String>,
    output_usd_per_1m: Option<String>,
    cached_input_usd_per_1m: Option<String>,
    max_output_tokens: Option<u64>,
    /// Tokens; bounds the input of requests whose content AEX cannot measure.
    context_window: Option<u64>,
    /// "max_tokens" (default) or "max_completion_tokens": the field AEX adds to chat requests.
    chat_cap_field: Option<String>,
}

/// An OpenAI-compatible upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDef {
    pub name: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the API, e.g. `/openai/v1` (no trailing slash).
    pub base_path: String,
    pub api_key_env: Option<String>,
    /// AEX may add `stream_options.include_usage` to streaming requests (default); false for
    /// providers that reject the field and report stream usage on their own.
    pub inject_stream_usage: bool,
    /// Lowercase header name for the key: `authorization` sends `Bearer KEY`, any other the key.
    pub api_key_header: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDef {
    pub name: String,
    pub provider: String,
    pub upstream_model: String,
    /// `None` = unpriced: requests for it are refused (403 model_not_priced), never charged $0.
    pub prices: Option<Prices>,
    pub max_output_tokens: u64,
    /// 0 = not configured.
    pub context_window: u64,
    pub chat_cap_field: String,
}

/// Validated `models.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub providers: BTreeMap<String, ProviderDef>,
    pub models: BTreeMap<String, ModelDef>,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let raw: RawModels = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut cat = Catalog::default();
        for (name, p) in raw.providers {
            let key = format!("providers.{name}.base_url");
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    path,
                    format!("providers.{name}"),
                    "provider names use [A-Za-z0-9_-]",
                ));
            }
            let def = parse_base_url(&name, &p.base_url).map_err(|r| invalid(path, key, r))?;
            let api_key_header = p
                .api_key_header
                .unwrap_or_else(|| "authorization".into())
                .to_ascii_lowercase();
            let header_ok = !api_key_header.is_empty()
                && api_key_header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !matches!(
                    api_key_header.as_str(),
                    "host" | "content-length" | "content-type" | "accept-encoding"
                )
                // AEX's own routing and passthrough headers.
                && !api_key_header.starts_with("x-aex-");
            if !header_ok {
                return Err(invalid(
                    path,
                    format!("providers.{name}.api_key_header"),
                    "must be a header name such as authorization or api-key",
                ));
            }
            cat.providers.insert(
                name,
                ProviderDef {
                    api_key_env: p.api_key_env,
                    inject_stream_usage: p.inject_stream_usage.unwrap_or(true),
                    api_key_header,
                    ..def
                },
            );
        }
        for (name, m) in raw.models {
            let k = |f: &str| format!("models.\"{name}\".{f}");
            if !cat.providers.contains_key(&m.provider) {
                return Err(invalid(
                    path,
                    k("provider"),
                    format!("no provider named '{}'", m.provider),
                ));
            }
            let price = |v: &Option<String>, f: &str| -> Result<Option<u64>, ConfigError> {
                v.as_deref()
                    .map(money::parse_price)
                    .transpose()
                    .map_err(|e| invalid(path, k(f), e.to_string()))
            };
            let input = price(&m.input_usd_per_1m, "input_usd_per_1m")?;
            let output = price(&m.output_usd_per_1m, "output_usd_per_1m")?;
            let cached_input = price(&m.cached_input_usd_per_1m, "cached_input_usd_per_1m")?;
            let prices = match (input, output) {
                (Some(input), Some(output)) => Some(Prices {
                    input,
                    output,
                    cached_input,
                }),
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(invalid(
                        path,
                        k("input_usd_per_1m"),
                        "missing (output price is set)",
                    ))
                }
                (Some(_), None) => {
                    return Err(invalid(
                        path,
                        k("output_usd_per_1m"),
                        "missing (input price is set)",
                    ))
                }
            };
            let max_output_tokens = m.max_output_tokens.unwrap_or(4096);
            if max_output_tokens == 0 {
                return Err(invalid(path, k("max_output_tokens"), "must be at least 1"));
            }
            if m.context_window == Some(0) {
                return Err(invalid(
                    path,
                    k("context_window"),
                    "must be at least 1 (leave it out if unknown)",
                ));
            }
            let chat_cap_field = m.chat_cap_field.unwrap_or_else(|| "max_tokens".into());
            if chat_cap_field != "max_tokens" && chat_cap_field != "max_completion_tokens" {
                return Err(invalid(
                    path,
                    k("chat_cap_field"),
                    "must be max_tokens or max_completion_tokens",
                ));
            }
            let upstream_model = m.upstream_model.unwrap_or_else(|| name.clone());
            cat.models.insert(
                name.clone(),
                ModelDef {
                    name,
                    provider: m.provider,
                    upstream_model,
                    prices,
                    max_output_tokens,
                    context_window: m.context_window.unwrap_or(0),
                    chat_cap_field,
                },
            );
        }
        // An empty or truncated file would leave a gateway that refuses every request.
        if cat.models.is_empty() {
            return Err(invalid(
                path,
                "models",
                "no model is defined: every request would be refused (an empty or truncated file?)",
            ));
        }
        Ok(cat)
    }
}

fn parse_base_url(name: &str, url: &str) -> Result<ProviderDef, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("'{url}' must start with http:// or https://"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if hostport.is_empty() || hostport.contains('@') {
        return Err(format!("'{url}' has no host"));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p.parse().map_err(|_| format!("'{url}' has a bad port"))?;
            (h.to_string(), port)
        }
        None => (hostport.to_string(), if tls { 443 } else { 80 }),
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(format!("'{url}' has a bad host"));
    }
    if path.contains(['?', '#']) {
        return Err(format!("'{url}' must not have a query or fragment"));
    }
    Ok(ProviderDef {
        name: name.to_string(),
        tls,
        host,
        port,
        base_path: path.trim_end_matches('/').to_string(),
        api_key_env: None,
        inject_stream_usage: true,
        api_key_header: "authorization".into(),
    })
}

/// The `models.toml` that `aex init` writes.
pub const DEFAULT_MODELS_TOML: &str = r#"# Providers and model prices (USD per 1M tokens, decimal strings). context_window (tokens)
# bounds the input AEX reserves for a request whose content it cannot measure (stored files,
# previous_response_id, audio); without it such requests are reserved by their bytes and may
# overrun their reservation.
# A provider whose api_key_env is not set (environment or $AEX_HOME/.env) is served by the
# built-in mock provider while [mock] fallback = true in config.toml.

[providers.openai]
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[providers.groq]
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ_API_KEY"

[models."gpt-4o-mini"]
provider = "openai"
upstream_model = "gpt-4o-mini"
input_usd_per_1m = "0.15"
cached_input_usd_per_1m = "0.075"
output_usd_per_1m = "0.60"
max_output_tokens = 16384
context_window = 128000

[models."gpt-4.1-mini"]
provider = "openai"
input_usd_per_1m = "0.40"
cached_input_usd_per_1m = "0.10"
output_usd_per_1m = "1.60"
max_output_tokens = 32768
context_window = 1047576

[models."text-embedding-3-small"]
provider = "openai"
input_usd_per_1m = "0.02"
output_usd_per_1m = "0"
max_output_tokens = 1
context_window = 8192

[models."gpt-oss-20b"]
provider = "groq"
upstream_model = "openai/gpt-oss-20b"
input_usd_per_1m = "0.075"
output_usd_per_1m = "0.30"
max_output_tokens = 65536
context_window = 131072

[models."gpt-oss-120b"]
provider = "groq"
upstream_model = "openai/gpt-oss-120b"
input_usd_per_1m = "0.15"
output_usd_per_1m = "0.60"
max_output_tokens = 65536
context_window = 131072
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::parse(DEFAULT_CONFIG_TOML, "config.toml").unwrap();
        assert_eq!(
            (c.envoy_port, c.grpc_port, c.http_port, c.envoy_admin_port),
            (9000, 9001, 9002, 9901)
        );
        let m = Catalog::parse(DEFAULT_MODELS_TOML, "models.toml").unwrap();
        let g = &m.models["gpt-oss-20b"];
        assert_eq!(g.upstream_model, "openai/gpt-oss-20b");
        assert_eq!(
            g.prices,
            Some(Prices {
                input: 75_000,
                output: 300_000,
                cached_input: None
            })
        );
        let groq = &m.providers["groq"];
        assert_eq!(
            (
                groq.tls,
                groq.host.as_str(),
                groq.port,
                groq.base_path.as_str()
            ),
            (true, "api.groq.com", 443, "/openai/v1")
        );
        assert!(groq.inject_stream_usage, "usage injection is on by default");
        let mistral = Catalog::parse(
            "[providers.mistral]\nbase_url='https://api.mistral.ai/v1'\ninject_stream_usage=false\n[models.m]\nprovider='mistral'\n",
            "m.toml",
        )
        .unwrap();
        assert!(!mistral.providers["mistral"].inject_stream_usage);
        assert_eq!(mistral.providers["mistral"].api_key_header, "authorization");
        let azure = Catalog::parse(
            "[providers.azure]\nbase_url='https://r.openai.azure.com/openai/v1'\napi_key_header='Api-Key'\n[models.m]\nprovider='azure'\n",
            "m.toml",
        )
        .unwrap();
        assert_eq!(azure.providers["azure"].api_key_header, "api-key");
        for bad in [
            "''",
            "'content-length'",
            "'a b'",
            "'x:y'",
            "'x-aex-upstream'",
            "'X-AEX-provider-key'",
        ] {
            let e = Catalog::parse(
                &format!("[providers.a]\nbase_url='https://x/v1'\napi_key_header={bad}\n"),
                "m.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("api_key_header"), "{bad}: {e}");
        }
        let e = Catalog::parse(
            "[providers.m]\nbase_url='https://x/v1'\ninject_stream_usage='no'\n",
            "m.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("inject_stream_usage"), "{e}");
        assert_eq!(g.context_window, 131_072);
        assert!(
            m.models.values().all(|m| m.context_window > 0),
            "every shipped model bounds unmeasured input"
        );
        let base = "[providers.p]\nbase_url='https://x/v1'\n[models.m]\nprovider='p'\n";
        let m = Catalog::parse(base, "m.toml").unwrap();
        assert_eq!(m.models["m"].context_window, 0, "not configured");
        let e = Catalog::parse(&format!("{base}context_window=0\n"), "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("context_window"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("[ports]\nenvoy = 0\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ports.envoy"), "{e}");
        let e = Config::parse("[ports]\nenvoy = 9001\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
        let e = Config::parse("[limitz]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("limitz"), "{e}");
        let bad_price = "[providers.p]\nbase_url='http://x/v1'\n[models.m]\nprovider='p'\ninput_usd_per_1m='-1'\noutput_usd_per_1m='1'\n";
        let e = Catalog::parse(bad_price, "m.toml").unwrap_err().to_string();
        assert!(e.contains("models.\"m\".input_usd_per_1m"), "{e}");
        let e = Catalog::parse("[models.m]\nprovider='nope'\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("models.\"m\".provider"), "{e}");
        let e = Catalog::parse("[providers.p]\nbase_url='ftp://x'\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("providers.p.base_url"), "{e}");
    }

    #[test]
    fn envoy_log_levels_that_print_request_headers_are_refused() {
        let level = |l: &str| Config::parse(&format!("[envoy]\nlog_level = '{l}'\n"), "c.toml");
        for l in ["debug", "trace"] {
            let e = level(l).unwrap_err().to_string();
            assert!(
                e.contains("envoy.log_level") && e.contains("API keys"),
                "{e}"
            );
        }
        let e = level("verbose").unwrap_err().to_string();
        assert!(e.contains("envoy.log_level"), "{e}");
        for l in ["info", "warning", "error", "critical", "off"] {
            assert_eq!(level(l).unwrap().envoy_log_level, l);
        }
        assert_eq!(
            Config::parse("", "c.toml").unwrap().envoy_log_level,
            "warning"
        );
    }

    #[test]
    fn unpriced_models_are_kept_but_flagged() {
        let t =
            "[providers.p]\nbase_url='http://127.0.0.1:8080/v1/'\n[models.free]\nprovider='p'\n";
        let m = Catalog::parse(t, "m.toml").unwrap();
        assert_eq!(m.models["free"].prices, None);
        let p = &m.providers["p"];
        assert_eq!(
            (p.tls, p.host.as_str(), p.port, p.base_path.as_str()),
            (false, "127.0.0.1", 8080, "/v1")
        );
    }

    #[test]
    fn a_catalog_without_models_is_refused() {
        for text in [
            "",
            "# nothing\n",
            "[providers.p]\nbase_url='https://x.example/v1'\n",
        ] {
            let e = Catalog::parse(text, "models.toml").unwrap_err().to_string();
            assert!(e.contains("no model is defined"), "{text:?}: {e}");
        }
    }
}
