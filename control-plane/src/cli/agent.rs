//! `aex agent …`: the agent registry. Tokens are printed once and kept client-side in
//! `$AEX_HOME/credentials/<agent>` (0600) for `aex run` and the Python helper.

use std::process::ExitCode;

use aex_proto::v1 as pb;
use serde_json::{json, Value};

use crate::cli::{admin, print_json, runtime, status_error, utc, write_private, Ctx};
use crate::money::{format_usd, parse_usd};
use crate::policy::{parse_list, Policy, Scope};
use aex_proto::glob::Glob;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create an agent and print its token (shown once).
    Create(CreateArgs),
    /// List agents with their budgets.
    List,
    /// Show an agent's policy, budget, spend and token expiry.
    Inspect {
        /// The agent's name.
        name: String,
    },
    /// Delete an agent; its token is refused within a second (every Envoy worker syncs in 200 ms).
    Delete {
        /// The agent's name.
        name: String,
    },
    /// Issue a new token; the old one is refused within a second (every Envoy worker syncs in 200 ms).
    RotateToken {
        /// The agent's name.
        name: String,
        /// New TTL in hours (decimals allowed; 0 = none); default keeps the agent's TTL setting.
        #[arg(long, value_parser = parse_ttl_hours)]
        ttl: Option<u64>,
    },
    /// Change limits and policy live (pass at least one change).
    Update(UpdateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Agent name: 1-64 characters of A-Z a-z 0-9 . _ -
    name: String,
    /// Budget in USD, e.g. 5.00 (up to 6 decimals).
    #[arg(allow_negative_numbers = true)]
    budget_usd: String,
    /// Requests per minute (at least 1).
    #[arg(allow_negative_numbers = true)]
    rpm: u32,
    /// Comma-separated model names or globs (default: every priced model; '*' says so explicitly).
    #[arg(long, value_name = "LIST")]
    allowed_models: Option<String>,
    /// Comma-separated tool names or globs the agent may declare (default: any).
    #[arg(long, value_name = "LIST")]
    allowed_tools: Option<String>,
    /// Refuse streaming requests (403 streaming_not_allowed).
    #[arg(long)]
    no_streaming: bool,
    /// Refuse requests that declare tools (403 tools_not_allowed).
    #[arg(long)]
    no_tools: bool,
    /// Refuse requests with image, video or file parts (403 vision_not_allowed).
    #[arg(long)]
    no_vision: bool,
    /// Never modify this agent's requests: deny instead of clamping or injecting.
    #[arg(long)]
    strict: bool,
    /// Token lifetime in hours (decimals allowed, e.g. 0.5; 0 = no expiry).
    #[arg(long, value_name = "HOURS", value_parser = parse_ttl_hours, allow_negative_numbers = true)]
    ttl: Option<u64>,
    /// execution (model endpoints) or read-only (list models, own usage).
    #[arg(long, default_value = "execution")]
    scope: String,
    /// Let the agent send its own provider key in x-aex-provider-key.
    #[arg(long)]
    allow_passthrough: bool,
    /// Largest output cap per request (0 = the model's).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_output_tokens: Option<u64>,
    /// Tokens per minute, input + output (default: no limit).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    tpm: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The agent's name.
    name: String,
    /// New budget in USD (not below what is spent and reserved).
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    budget: Option<String>,
    /// New limit of requests per minute (at least 1).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    rpm: Option<u32>,
    /// Not an update: a token's lifetime changes with `rotate-token --ttl` (accepted here only
    /// to say so).
    #[arg(long, value_name = "H", hide = true)]
    ttl: Option<String>,
    /// Replace the allowed models: comma-separated names or globs ('*' = every priced model).
    #[arg(long, value_name = "LIST")]
    allowed_models: Option<String>,
    /// Replace the allowed tool names: comma-separated names or globs ('*' = any).
    #[arg(long, value_name = "LIST")]
    allowed_tools: Option<String>,
    /// Allow streaming requests again.
    #[arg(long, conflicts_with = "no_streaming")]
    streaming: bool,
    /// Refuse streaming requests.
    #[arg(long)]
    no_streaming: bool,
    /// Allow requests that declare tools again.
    #[arg(long, conflicts_with = "no_tools")]
    tools: bool,
    /// Refuse requests that declare tools.
    #[arg(long)]
    no_tools: bool,
    /// Allow image, video and file parts again.
    #[arg(long, conflicts_with = "no_vision")]
    vision: bool,
    /// Refuse requests with image, video or file parts.
    #[arg(long)]
    no_vision: bool,
    /// Never modify this agent's requests: deny instead of clamping or injecting.
    #[arg(long, conflicts_with = "no_strict")]
    strict: bool,
    /// Let AEX clamp output caps and inject stream usage again.
    #[arg(long)]
    no_strict: bool,
    /// Let the agent send its own provider key in x-aex-provider-key.
    #[arg(long, conflicts_with = "no_passthrough")]
    allow_passthrough: bool,
    /// Refuse x-aex-provider-key again.
    #[arg(long)]
    no_passthrough: bool,
    /// execution (model endpoints) or read-only (list models, own usage).
    #[arg(long)]
    scope: Option<String>,
    /// Largest output cap per request (0 = the model's).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_output_tokens: Option<u64>,
    /// Tokens per minute, input + output (0 = no limit).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    tpm: Option<u64>,
}

/// The flags of `aex agent update` that change something, for its "nothing to update" error.
const UPDATE_FLAGS: &str = "--budget, --rpm, --tpm, --allowed-models, --allowed-tools, \
--[no-]streaming, --[no-]tools, --[no-]vision, --[no-]strict, --allow-passthrough, \
--no-passthrough, --scope, --max-output-tokens";

impl UpdateArgs {
    fn changes_nothing(&self) -> bool {
        self.budget.is_none()
            && self.rpm.is_none()
            && self.allowed_models.is_none()
            && self.allowed_tools.is_none()
            && !(self.streaming || self.no_streaming)
            && !(self.tools || self.no_tools)
            && !(self.vision || self.no_vision)
            && !(self.strict || self.no_strict)
            && !(self.allow_passthrough || self.no_passthrough)
            && self.scope.is_none()
            && self.max_output_tokens.is_none()
            && self.tpm.is_none()
    }
}

/// A `--allowed-models` / `--allowed-tools` list. An empty one is refused: it would silently
/// mean "no restriction", the opposite of what an empty allow-list suggests; `*` says so.
fn allow_list(flag: &str, raw: &str, what: &str) -> anyhow::Result<Vec<String>> {
    let items = parse_list(raw);
    let star = raw.split(',').any(|x| x.trim() == "*");
    anyhow::ensure!(
        !items.is_empty() || star,
        "{flag} is empty: list {what} names or globs, or pass '*' for no restriction"
    );
    Ok(items)
}

/// The patterns of `allowed` that match no priced model of the daemon's catalogue, as one
/// warning (None when each matches one). Such a pattern lets the agent use nothing.
fn unmatched_models(allowed: &[String], models: &[pb::Model]) -> Option<String> {
    let mut none = Vec::new();
    let mut unpriced = Vec::new();
    for pattern in allowed {
        let Ok(glob) = Glob::new(pattern) else {
            continue;
        };
        let mut hits = models.iter().filter(|m| glob.is_match(&m.name));
        match hits.clone().find(|m| m.priced) {
            Some(_) => {}
            None if hits.next().is_some() => unpriced.push(pattern.as_str()),
            None => none.push(pattern.as_str()),
        }
    }
    if none.is_empty() && unpriced.is_empty() {
        return None;
    }
    // "a matches" / "a, b match".
    let subject = |v: &[&str]| match v {
        [one] => format!("{one} matches"),
        _ => format!("{} match", v.join(", ")),
    };
    let mut parts = Vec::new();
    if !none.is_empty() {
        parts.push(format!("{} no configured model", subject(&none)));
    }
    if !unpriced.is_empty() {
        parts.push(format!(
            "{} only unpriced models (model_not_priced)",
            subject(&unpriced)
        ));
    }
    let priced: Vec<&str> = models
        .iter()
        .filter(|m| m.priced)
        .map(|m| m.name.as_str())
        .collect();
    Some(format!(
        "--allowed-models: {}; the agent cannot use them. Priced models: {} (`aex models list`)",
        parts.join("; "),
        if priced.is_empty() {
            "none".to_string()
        } else {
            priced.join(", ")
        }
    ))
}

/// Warns on stderr about allowed-model patterns that match no priced model. The catalogue comes
/// from the daemon (what requests are judged by); if it cannot say, nothing is printed.
async fn warn_unmatched_models(json: bool, admin: &mut crate::cli::Admin, allowed: &[String]) {
    if allowed.is_empty() {
        return;
    }
    if let Ok(r) = admin.list_models(pb::ListModelsRequest {}).await {
        if let Some(w) = unmatched_models(allowed, &r.into_inner().models) {
            crate::cli::report_note(json, "warning", &w);
        }
    }
}

/// `--ttl` in hours as a decimal (exact, up to 6 places) → whole seconds, rounded up.
fn parse_ttl_hours(s: &str) -> Result<u64, String> {
    let micro_hours = parse_usd(s).map_err(|e| match e {
        crate::money::MoneyError::TooPrecise(_) => {
            format!("TTL in hours: '{s}' has more than 6 decimal places")
        }
        crate::money::MoneyError::Overflow(_) => format!("TTL in hours: '{s}' is too large"),
        _ => format!(
            "TTL in hours: '{s}' is not a non-negative decimal number of hours (e.g. 24 or 0.5)"
        ),
    })?;
    // 100 years: more is a typo, and would print as an expiry in the year 2104396604.
    const MAX_HOURS: u64 = 100 * 8_766;
    if micro_hours > MAX_HOURS * 1_000_000 {
        return Err(format!(
            "TTL in hours: '{s}' is more than {MAX_HOURS} hours (100 years); 0 means no expiry"
        ));
    }
    Ok((u128::from(micro_hours) * 3600)
        .div_ceil(1_000_000)
        .try_into()
        .unwrap_or(u64::MAX))
}

fn flag(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

pub fn agent_json(a: &pb::AgentState) -> Value {
    let p = a.policy.as_ref().map(Policy::from_pb).unwrap_or_default();
    let remaining = a
        .budget_micros
        .saturating_sub(a.spent_micros.saturating_add(a.reserved_micros));
    json!({
        "id": a.agent_id, "name": a.name,
        "budget_usd": format_usd(a.budget_micros), "spent_usd": format_usd(a.spent_micros),
        "reserved_usd": format_usd(a.reserved_micros), "remaining_usd": format_usd(remaining),
        "budget_micros": a.budget_micros, "spent_micros": a.spent_micros, "reserved_micros": a.reserved_micros,
        "remaining_micros": remaining, "rpm": a.rpm, "tpm": if p.tpm == 0 { Value::Null } else { json!(p.tpm) },
        "open_reservations": a.open_reservations,
        "blocked_overrun": a.blocked_overrun, "ttl_secs": a.ttl_secs,
        "token_expires_at": if a.token_expires_at == 0 { Value::Null } else { json!(a.token_expires_at) },
        "created_at": a.created_at,
        "policy": {
            "allowed_models": p.allowed_models, "allow_streaming": p.allow_streaming, "allow_tools": p.allow_tools,
            "allowed_tools": p.allowed_tools, "allow_vision": p.allow_vision, "allow_passthrough": p.allow_passthrough,
            "strict": p.strict, "max_output_tokens": p.max_output_tokens, "scope": p.scope.as_str(),
        },
    })
}

fn print_agent(a: &pb::AgentState) {
    let j = agent_json(a);
    let p = &j["policy"];
    let list = |v: &Value| {
        let items: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if items.is_empty() {
            "all".to_string()
        } else {
            items.join(", ")
        }
    };
    println!("agent      {} ({})", a.name, a.agent_id);
    println!(
        "budget     ${}   spent ${}   reserved ${}   remaining ${}",
        j["budget_usd"].as_str().unwrap_or(""),
        j["spent_usd"].as_str().unwrap_or(""),
        j["reserved_usd"].as_str().unwrap_or(""),
        j["remaining_usd"].as_str().unwrap_or("")
    );
    match a.policy.as_ref().map_or(0, |p| p.tpm) {
        0 => println!("rate       {} requests/minute", a.rpm),
        tpm => println!("rate       {} requests/minute   {tpm} tokens/minute", a.rpm),
    }
    println!("models     {}", list(&p["allowed_models"]));
    println!(
        "streaming  {}   tools {} ({})   vision {}   passthrough {}   strict {}",
        p["allow_streaming"],
        p["allow_tools"],
        list(&p["allowed_tools"]),
        p["allow_vision"],
        p["allow_passthrough"],
        p["strict"]
    );
    println!(
        "scope      {}   max output tokens {}",
        p["scope"].as_str().unwrap_or(""),
        if a.policy.as_ref().map_or(0, |p| p.max_output_tokens) == 0 {
            "model limit".to_string()
        } else {
            p["max_output_tokens"].to_string()
        }
    );
    let ttl = |secs: u64| match secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    };
    if a.token_expires_at == 0 {
        println!("token      never expires");
    } else if a.token_expires_at <= crate::core::now_ms() / 1000 {
        println!(
            "token      EXPIRED {} (ttl {}); `aex agent rotate-token {}` issues a new one",
            utc(a.token_expires_at),
            ttl(a.ttl_secs),
            a.name
        );
    } else {
        println!(
            "token      expires {} (ttl {})",
            utc(a.token_expires_at),
            ttl(a.ttl_secs)
        );
    }
    if a.blocked_overrun {
        println!("BLOCKED    usage overran a reservation; raise the budget to unblock");
    }
}

/// Keeps the CLI's copy of a new token. The agent already exists and the token is shown only
/// now, so a failed save is a warning, never an error that would hide the token.
fn save_credential(ctx: &Ctx, name: &str, token: &str) -> Option<std::path::PathBuf> {
    let path = ctx.home.credential(name);
    let saved = std::fs::create_dir_all(ctx.home.credentials())
        .and_then(|()| {
            // Tokens: the directory is the owner's alone, however it came to exist.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                ctx.home.credentials(),
                std::fs::Permissions::from_mode(0o700),
            )
        })
        .and_then(|()| write_private(&path, format!("{token}\n").as_bytes()));
    match saved {
        Ok(()) => Some(path),
        Err(e) => {
            crate::cli::report_note(ctx.json, "warning", &format!(
                "could not save a copy of the token to {}: {e}. Keep the token printed below: it is shown only once (`aex run --agent {name}` needs that file).",
                path.display()
            ));
            None
        }
    }
}

/// Where the token's copy is, for the line that shows the token.
fn copy_note(cred: Option<&std::path::Path>) -> String {
    match cred {
        Some(p) => format!("shown once; a copy is in {}", p.display()),
        None => "shown once; NOT saved".to_string(),
    }
}

pub fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        // Arguments are validated before the daemon is contacted, so a typo is reported as such.
        match cmd {
            Cmd::Create(a) => {
                let budget =
                    parse_usd(&a.budget_usd).map_err(|e| anyhow::anyhow!("BUDGET_USD: {e}"))?;
                anyhow::ensure!(a.rpm > 0, "RPM must be at least 1");
                let policy = Policy {
                    allowed_models: a
                        .allowed_models
                        .as_deref()
                        .map(|l| allow_list("--allowed-models", l, "model"))
                        .transpose()?
                        .unwrap_or_default(),
                    allow_streaming: !a.no_streaming,
                    allow_tools: !a.no_tools,
                    allowed_tools: a
                        .allowed_tools
                        .as_deref()
                        .map(|l| allow_list("--allowed-tools", l, "tool"))
                        .transpose()?
                        .unwrap_or_default(),
                    allow_vision: !a.no_vision,
                    allow_passthrough: a.allow_passthrough,
                    strict: a.strict,
                    max_output_tokens: a.max_output_tokens.unwrap_or(0),
                    scope: Scope::parse(&a.scope).map_err(|e| anyhow::anyhow!(e))?,
                    tpm: a.tpm.unwrap_or(0),
                };
                policy.validate().map_err(|e| anyhow::anyhow!(e))?;
                let mut admin = admin(&ctx.home).await?;
                let r = admin
                    .create_agent(pb::CreateAgentRequest {
                        name: a.name.clone(),
                        budget_micros: budget,
                        rpm: a.rpm,
                        policy: Some(policy.to_pb()),
                        ttl_secs: a.ttl.unwrap_or(0),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let cred = save_credential(ctx, &a.name, &r.token);
                warn_unmatched_models(ctx.json, &mut admin, &policy.allowed_models).await;
                let agent = r.agent.unwrap_or_default();
                if ctx.json {
                    let mut j = agent_json(&agent);
                    j["token"] = json!(r.token);
                    j["credential_file"] = json!(cred);
                    print_json(&j);
                } else {
                    print_agent(&agent);
                    println!("\nToken ({}):\n{}", copy_note(cred.as_deref()), r.token);
                }
            }
            Cmd::List => {
                let r = admin(&ctx.home)
                    .await?
                    .list_agents(pb::ListAgentsRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if ctx.json {
                    print_json(&Value::Array(r.agents.iter().map(agent_json).collect()));
                } else if r.agents.is_empty() {
                    println!("No agents. Create one with: aex agent create NAME BUDGET_USD RPM");
                } else {
                    // As wide as the longest name (up to 64), so the columns stay aligned.
                    let w = r.agents.iter().map(|a| a.name.len()).max().unwrap_or(0).max(20);
                    println!(
                        "{:<w$} {:>14} {:>14} {:>14} {:>14} {:>6}",
                        "NAME", "BUDGET", "SPENT", "RESERVED", "REMAINING", "RPM"
                    );
                    for a in &r.agents {
                        let j = agent_json(a);
                        println!(
                            "{:<w$} {:>14} {:>14} {:>14} {:>14} {:>6}",
                            a.name,
                            j["budget_usd"].as_str().unwrap_or(""),
                            j["spent_usd"].as_str().unwrap_or(""),
                            j["reserved_usd"].as_str().unwrap_or(""),
                            j["remaining_usd"].as_str().unwrap_or(""),
                            a.rpm
                        );
                    }
                }
            }
            Cmd::Inspect { name } => {
                let a = admin(&ctx.home)
                    .await?
                    .get_agent(pb::AgentRef { name })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if ctx.json {
                    print_json(&agent_json(&a))
                } else {
                    print_agent(&a)
                }
            }
            Cmd::Delete { name } => {
                admin(&ctx.home)
                    .await?
                    .delete_agent(pb::AgentRef { name: name.clone() })
                    .await
                    .map_err(status_error)?;
                let _ = std::fs::remove_file(ctx.home.credential(&name));
                if ctx.json {
                    print_json(&json!({ "deleted": name }))
                } else {
                    println!("deleted agent {name}")
                }
            }
            Cmd::RotateToken { name, ttl } => {
                let r = admin(&ctx.home)
                    .await?
                    .rotate_token(pb::RotateTokenRequest {
                        name: name.clone(),
                        ttl_secs: ttl,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let cred = save_credential(ctx, &name, &r.token);
                if ctx.json {
                    let mut j = agent_json(&r.agent.unwrap_or_default());
                    j["token"] = json!(r.token);
                    j["credential_file"] = json!(cred);
                    print_json(&j);
                } else {
                    println!(
                        "New token for {name} ({}):\n{}",
                        copy_note(cred.as_deref()),
                        r.token
                    );
                }
            }
            Cmd::Update(u) => {
                anyhow::ensure!(
                    u.ttl.is_none(),
                    "a token's lifetime is not updated: issue a new token with it, `aex agent rotate-token {} --ttl H`",
                    u.name
                );
                anyhow::ensure!(
                    !u.changes_nothing(),
                    "nothing to update: pass at least one of {UPDATE_FLAGS}"
                );
                let budget = u
                    .budget
                    .as_deref()
                    .map(parse_usd)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--budget: {e}"))?;
                let scope = u
                    .scope
                    .as_deref()
                    .map(Scope::parse)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!(e))?;
                let models = u
                    .allowed_models
                    .as_deref()
                    .map(|l| allow_list("--allowed-models", l, "model"))
                    .transpose()?;
                let tools = u
                    .allowed_tools
                    .as_deref()
                    .map(|l| allow_list("--allowed-tools", l, "tool"))
                    .transpose()?;
                Policy {
                    allowed_models: models.clone().unwrap_or_default(),
                    allowed_tools: tools.unwrap_or_default(),
                    ..Policy::default()
                }
                .validate()
                .map_err(|e| anyhow::anyhow!(e))?;
                let req = pb::UpdateAgentRequest {
                    name: u.name,
                    budget_micros: budget,
                    rpm: u.rpm,
                    allowed_models: u.allowed_models,
                    allow_streaming: flag(u.streaming, u.no_streaming),
                    allow_tools: flag(u.tools, u.no_tools),
                    allowed_tools: u.allowed_tools,
                    allow_vision: flag(u.vision, u.no_vision),
                    allow_passthrough: flag(u.allow_passthrough, u.no_passthrough),
                    strict: flag(u.strict, u.no_strict),
                    max_output_tokens: u.max_output_tokens,
                    scope: scope.map(|s| s.to_pb() as i32),
                    tpm: u.tpm,
                };
                let mut admin = admin(&ctx.home).await?;
                let a = admin
                    .update_agent(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                warn_unmatched_models(ctx.json, &mut admin, models.as_deref().unwrap_or_default())
                    .await;
                if ctx.json {
                    print_json(&agent_json(&a))
                } else {
                    print_agent(&a)
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, priced: bool) -> pb::Model {
        pb::Model {
            name: name.into(),
            priced,
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_allow_list_is_refused_and_star_means_all() {
        assert!(allow_list("--allowed-models", "", "model").is_err());
        assert!(allow_list("--allowed-models", " , ", "model").is_err());
        assert_eq!(
            allow_list("--allowed-models", "*", "model").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            allow_list("--allowed-models", "a, b", "model").unwrap(),
            ["a", "b"]
        );
    }

    #[test]
    fn patterns_that_match_no_priced_model_are_named() {
        let models = [
            model("gpt-4o-mini", true),
            model("gpt-oss-20b", true),
            model("free", false),
        ];
        let allowed = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unmatched_models(&allowed(&["gpt-4o-mini", "gpt-oss-*"]), &models),
            None
        );
        let w = unmatched_models(
            &allowed(&["gpt-5", "gpt-4o-mini", "claude*", "free"]),
            &models,
        )
        .unwrap();
        assert!(
            w.contains("gpt-5, claude* match no configured model"),
            "{w}"
        );
        assert!(w.contains("free matches only unpriced models"), "{w}");
        assert!(w.contains("Priced models: gpt-4o-mini, gpt-oss-20b"), "{w}");
    }
}
