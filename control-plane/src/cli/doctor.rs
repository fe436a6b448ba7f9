//! `aex doctor`: environment health, one line per check, non-zero exit if any fails.
//! `aex doctor --compat --token T`: protocol-fidelity checks through the gateway with an agent's
//! token, on the cheapest model it may use; reports what the checks spent.

use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{admin, print_json, runtime, Ctx};
use crate::config::{Catalog, Config};
use crate::procs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the protocol checks through the gateway instead of the environment checks.
    #[arg(long, requires = "token")]
    compat: bool,
    /// The agent token used by --compat.
    #[arg(long, requires = "compat")]
    token: Option<String>,
}

struct Check {
    name: String,
    ok: bool,
    detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail: detail.into(),
    }
}

fn report(ctx: &Ctx, checks: &[Check], extra: Value) -> ExitCode {
    let ok = checks.iter().all(|c| c.ok);
    if ctx.json {
        let mut v = json!({
            "ok": ok,
            "checks": checks.iter().map(|c| json!({ "check": c.name, "ok": c.ok, "detail": c.detail })).collect::<Vec<_>>(),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        print_json(&v);
    } else {
        for c in checks {
            println!(
                "{} {:<28} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    if a.compat {
        let token = a.token.as_deref().unwrap_or_default().trim();
        if token.is_empty() {
            anyhow::bail!(
                "--compat needs an agent's token: --token \"$(cat {})\"",
                ctx.home.credential("NAME").display()
            );
        }
        return compat(ctx, token);
    }
    let h = &ctx.home;
    let mut checks = vec![check(
        "home",
        h.root().is_dir(),
        h.root().display().to_string(),
    )];
    // A home never initialised has no config.toml (its defaults would load all the same).
    let config = if h.config().is_file() {
        Config::load(&h.config()).map_err(|e| e.to_string())
    } else {
        Err(format!("{} missing (run `aex init`)", h.config().display()))
    };
    checks.push(match &config {
        Ok(_) => check("config.toml", true, h.config().display().to_string()),
        Err(e) => check("config.toml", false, e.clone()),
    });
    let catalog = Catalog::load(&h.models());
    checks.push(match &catalog {
        Ok(c) => check(
            "models.toml",
            true,
            format!("{} models, {} providers", c.models.len(), c.providers.len()),
        ),
        Err(e) => check("models.toml", false, e.to_string()),
    });
    for (name, path) in [
        ("admin token", h.admin_token()),
        ("filter key", h.filter_key()),
    ] {
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        checks.push(match mode {
            Ok(0o600) => check(name, true, format!("{} (0600)", path.display())),
            Ok(m) => check(
                name,
                false,
                format!("{} has mode {m:o}; expected 0600", path.display()),
            ),
            Err(_) => check(
                name,
                false,
                format!("{} missing (run `aex init`)", path.display()),
            ),
        });
    }
    checks.push(database(ctx));
    let Ok(config) = config else {
        return Ok(report(ctx, &checks, json!({})));
    };
    let health = runtime()?.block_on(async {
        let mut c = admin(h).await?;
        Ok::<_, anyhow::Error>(
            c.health(aex_proto::v1::HealthRequest {})
                .await?
                .into_inner(),
        )
    });
    checks.push(match &health {
        Ok(hl) => check(
            "daemon",
            true,
            format!(
                "version {}, {} agents, gRPC :{}",
                hl.version, hl.agents, config.grpc_port
            ),
        ),
        Err(e) => check("daemon", false, format!("{e:#}")),
    });
    if health.is_err() {
        // Nothing of this home answers; whatever listens on its ports is another's.
        if let Some((note, _)) = crate::cli::daemon::ports_taken_note(h, &config) {
            checks.push(check("envoy", false, note.clone()));
            checks.push(check("filter", false, note));
            return Ok(report(ctx, &checks, json!({})));
        }
    }
    let ready = procs::http_get(config.envoy_admin_port, "/ready", Duration::from_secs(1));
    checks.push(match ready {
        Ok((200, b)) if b.contains("LIVE") => check(
            "envoy",
            true,
            format!("live, gateway http://127.0.0.1:{}/v1", config.envoy_port),
        ),
        Ok((s, b)) => check(
            "envoy",
            false,
            format!("admin /ready answered {s}: {}", b.trim()),
        ),
        Err(e) => check(
            "envoy",
            false,
            format!("admin :{} unreachable: {e}", config.envoy_admin_port),
        ),
    });
    let stats = procs::http_get(
        config.envoy_admin_port,
        "/stats?filter=wasm",
        Duration::from_secs(1),
    );
    let vms = stats.as_ref().ok().and_then(|(_, b)| {
        b.lines()
            .find(|l| l.contains("wasm.envoy.wasm.runtime.v8.active"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    let synced = health
        .as_ref()
        .ok()
        .map(|hl| crate::core::now_ms() / 1000 - hl.last_filter_sync);
    checks.push(match (vms, synced) {
        (Some(n), Some(age)) if n > 0 && age <= 5 => check(
            "filter",
            true,
            format!("{n} wasm VMs active, last policy sync {age}s ago"),
        ),
        (Some(n), _) if n > 0 => check(
            "filter",
            false,
            format!("{n} wasm VMs active but no recent policy sync with the control plane"),
        ),
        _ => check(
            "filter",
            false,
            "the AEX filter is not loaded in Envoy (no active wasm VM)",
        ),
    });
    if let Ok(hl) = &health {
        // The daemon's view: its environment and .env decide, not this shell's.
        let mut seen = std::collections::BTreeSet::new();
        for p in hl.providers.iter().filter(|p| seen.insert(p.name.clone())) {
            checks.push(provider_check(p, config.mock_fallback));
        }
    } else if let Ok(cat) = &catalog {
        let env_file = crate::providers::read_env_file(&h.env_file());
        for p in cat.providers.values() {
            let name = format!("provider {}", p.name);
            let Some(var) = &p.api_key_env else {
                checks.push(check(&name, true, "no key needed"));
                continue;
            };
            let set = std::env::var(var).is_ok_and(|v| !v.is_empty())
                || env_file.get(var).is_some_and(|v| !v.is_empty());
            checks.push(match (set, config.mock_fallback) {
                (true, _) => check(&name, true, format!("{var} is set")),
                (false, true) => check(
                    &name,
                    true,
                    format!("{var} not set: served by the built-in mock provider"),
                ),
                (false, false) => check(
                    &name,
                    false,
                    format!("{var} not set (environment or {})", h.env_file().display()),
                ),
            });
        }
    }
    Ok(report(ctx, &checks, json!({})))
}

/// A provider as the running daemon serves it: mocked, or keyed and reachable over TCP.
fn provider_check(p: &aex_proto::v1::ProviderHealth, mock_fallback: bool) -> Check {
    let name = format!("provider {}", p.name);
    if p.mocked {
        return if mock_fallback {
            check(
                &name,
                true,
                "the daemon has no API key for it: served by the built-in mock provider",
            )
        } else {
            check(
                &name,
                false,
                "the daemon has no API key for it (set it in its environment or .env, then `aex models reload`)",
            )
        };
    }
    let addr = format!("{}:{}", p.host, p.port);
    let reached = std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
        .map_err(|e| e.to_string())
        .and_then(|mut addrs| {
            let a = addrs.next().ok_or("no address")?;
            std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3))
                .map_err(|e| e.to_string())
        });
    match reached {
        Ok(_) => check(
            &name,
            true,
            format!("key set in the daemon, {addr} reachable"),
        ),
        Err(e) => check(
            &name,
            false,
            format!("key set in the daemon, but {addr} cannot be reached: {e}"),
        ),
    }
}

fn database(ctx: &Ctx) -> Check {
    let path = ctx.home.db();
    if !path.exists() {
        return check(
            "database",
            false,
            format!("{} missing (start the daemon once)", path.display()),
        );
    }
    let result = (|| -> anyhow::Result<String> {
        let conn = crate::cli::open_db(ctx)?;
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        anyhow::ensure!(integrity == "ok", "integrity_check: {integrity}");
        let audit = crate::cli::audit::verify(&conn, &[])?;
        anyhow::ensure!(audit.ok(), "ledger invariants broken: run `aex audit`");
        Ok(format!(
            "{} (integrity ok, invariants hold)",
            path.display()
        ))
    })();
    match result {
        Ok(d) => check("database", true, d),
        Err(e) => check("database", false, format!("{e:#}")),
    }
}

// ------------------------------------------------------------------------ compat

struct Gateway {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Gateway {
    fn request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, String, String) {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("authorization", &format!("Bearer {token}"));
        let resp = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        match resp {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                let status = r.status();
                let ctype = r.content_type().to_string();
                (status, ctype, r.into_string().unwrap_or_default())
            }
            Err(e) => (0, String::new(), e.to_string()),
        }
    }

    fn post(&self, body: Value) -> (u16, String, String) {
        self.request("POST", "/chat/completions", &self.token, Some(&body))
    }

    fn spent(&self) -> Option<u64> {
        let (s, _, b) = self.request("GET", "/aex/usage", &self.token, None);
        (s == 200)
            .then(|| {
                serde_json::from_str::<Value>(&b)
                    .ok()?
                    .get("spent_micros")?
                    .as_u64()
            })
            .flatten()
    }
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(String::from))
        .unwrap_or_default()
}

/// What a failed call came to: the gateway unreachable, or the status with AEX's (or the
/// provider's) error code and message, so a FAIL line says why.
fn failure(base: &str, status: u16, body: &str) -> String {
    if status == 0 {
        return format!(
            "the gateway at {base} is not reachable ({}): is the daemon running? (`aex daemon status`)",
            body.trim()
        );
    }
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or("");
    let message: String = v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(160)
        .collect();
    let hint = match code {
        "scope_denied" => " (protocol checks need a token of an execution-scope agent)",
        "invalid_api_key" | "missing_api_key" | "token_expired" => {
            " (pass an agent's token from $AEX_HOME/credentials/NAME)"
        }
        _ => "",
    };
    format!("HTTP {status} {code}: {message}{hint}")
}

fn compat(ctx: &Ctx, token: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ctx.home.config())?;
    let catalog = Catalog::load(&ctx.home.models())?;
    let gw = Gateway {
        base: format!("http://127.0.0.1:{}/v1", config.envoy_port),
        token: token.to_string(),
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build(),
    };
    let mut checks = Vec::new();
    let (s, _, body) = gw.request("GET", "/models", token, None);
    let listed: Vec<String> = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| {
            v["data"].as_array().map(|d| {
                d.iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default();
    if s != 200 {
        // Nothing else can work: say why once.
        checks.push(check("models list", false, failure(&gw.base, s, &body)));
        return Ok(report(ctx, &checks, json!({})));
    }
    checks.push(check(
        "models list",
        !listed.is_empty(),
        format!("HTTP {s}, {} models", listed.len()),
    ));
    // Cheapest by output price, then input price.
    let model = listed
        .iter()
        .filter_map(|m| {
            catalog
                .models
                .get(m)
                .and_then(|d| d.prices.map(|p| (p.output, p.input, m.clone())))
        })
        .filter(|(_, _, m)| !m.contains("embed"))
        .min()
        .map(|(_, _, m)| m);
    let Some(model) = model else {
        checks.push(check("model", false, "no chat model this token may use"));
        return Ok(report(ctx, &checks, json!({})));
    };
    checks.push(check("model", true, format!("{model} (cheapest allowed)")));
    let before = gw.spent();
    let msg = |text: &str| json!([{ "role": "user", "content": text }]);

    let (s, _, b) = gw
        .post(json!({ "model": model, "messages": msg("Reply with one word."), "max_tokens": 16 }));
    let v: Value = serde_json::from_str(&b).unwrap_or_default();
    let ok = s == 200
        && v["choices"][0]["message"].is_object()
        && v["usage"]["prompt_tokens"].is_u64()
        && v["id"].is_string();
    checks.push(check(
        "chat completion",
        ok,
        if s == 200 {
            format!("HTTP {s}")
        } else {
            failure(&gw.base, s, &b)
        },
    ));

    let (s, ctype, b) = gw.post(json!({ "model": model, "messages": msg("Count to three."), "max_tokens": 16, "stream": true }));
    let events: Vec<&str> = b
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let framed = events.iter().all(|e| {
        e.lines()
            .all(|l| l.starts_with("data: ") || l.starts_with(':') || l.starts_with("event:"))
    });
    let done = events.last().is_some_and(|e| e.trim() == "data: [DONE]");
    let chunks_json = events.iter().filter(|e| **e != "data: [DONE]").all(|e| {
        e.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .all(|d| serde_json::from_str::<Value>(d).is_ok())
    });
    let no_usage_chunk = !b.contains("\"choices\":[]");
    // An agent whose policy forbids streaming is refused as documented: that is not a fault.
    let stream_denied = s == 403 && error_code(&b) == "streaming_not_allowed";
    checks.push(check(
        "streaming SSE",
        stream_denied
            || (s == 200
                && ctype.starts_with("text/event-stream")
                && framed
                && done
                && chunks_json
                && no_usage_chunk),
        if stream_denied {
            "denied by the agent's policy (403)".to_string()
        } else if s != 200 {
            failure(&gw.base, s, &b)
        } else {
            format!(
                "HTTP {s}, {} events, [DONE] {}, content-type {ctype}",
                events.len(),
                if done { "present" } else { "MISSING" }
            )
        },
    ));

    let tool = json!([{ "type": "function", "function": { "name": "get_time", "description": "Current time", "parameters": { "type": "object", "properties": {} } } }]);
    let (s, _, b) = gw.post(json!({ "model": model, "messages": msg("What time is it? Use the tool."), "tools": tool, "tool_choice": "required", "max_tokens": 64 }));
    let v: Value = serde_json::from_str(&b).unwrap_or_default();
    let called = v["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time";
    let denied = s == 403 && error_code(&b).starts_with("tool");
    checks.push(check(
        "tool calls",
        called || denied,
        if denied {
            "denied by the agent's policy (403)".to_string()
        } else if s != 200 {
            failure(&gw.base, s, &b)
        } else {
            format!(
                "HTTP {s}, tool call {}",
                if called { "returned" } else { "MISSING" }
            )
        },
    ));

    let (s, _, b) = gw.post(json!({ "model": model, "messages": msg("Return a JSON object with a key \"ok\"."), "response_format": { "type": "json_object" }, "max_tokens": 64 }));
    let v: Value = serde_json::from_str(&b).unwrap_or_default();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    let parsed = serde_json::from_str::<Value>(content).is_ok_and(|c| c.is_object());
    checks.push(check(
        "JSON mode",
        s == 200 && parsed,
        if s != 200 {
            failure(&gw.base, s, &b)
        } else {
            format!(
                "HTTP {s}, content {}",
                if parsed {
                    "is a JSON object"
                } else {
                    "is NOT JSON"
                }
            )
        },
    ));

    let (s, _, b) = gw.request(
        "POST",
        "/chat/completions",
        "aex_not_a_real_token",
        Some(&json!({ "model": model, "messages": msg("x") })),
    );
    checks.push(check(
        "error parity: bad token",
        s == 401 && error_code(&b) == "invalid_api_key",
        format!("HTTP {s} {}", error_code(&b)),
    ));
    let (s, _, b) = gw.post(json!({ "model": "aex-no-such-model", "messages": msg("x") }));
    checks.push(check(
        "error parity: unknown model",
        s == 403 && error_code(&b) == "model_not_allowed",
        format!("HTTP {s} {}", error_code(&b)),
    ));

    std::thread::sleep(Duration::from_millis(500));
    let spent = match (before, gw.spent()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let code = report(
        ctx,
        &checks,
        json!({ "model": model, "spent_micros": spent }),
    );
    if !ctx.json {
        match spent {
            Some(m) => println!(
                "the checks used {model} and spent ${}",
                crate::money::format_usd(m)
            ),
            None => println!("the checks used {model}; spend unknown (/v1/aex/usage unavailable)"),
        }
    }
    Ok(code)
}
