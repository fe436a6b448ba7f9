//! `aex status` (enforcement summary) and `aex metrics` (per-agent financials), read straight
//! from the database so they work whether or not the daemon runs.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::{print_json, Ctx};
use crate::core::now_ms;
use crate::money::format_usd;
use crate::stats;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

pub fn status(ctx: &Ctx, _a: StatusArgs) -> anyhow::Result<ExitCode> {
    let conn = crate::cli::open_db(ctx)?;
    let now = now_ms();
    let hour = stats::window_counts(&conn, now, 3_600_000)?;
    let day = stats::window_counts(&conn, now, 86_400_000)?;
    let agents = stats::agent_metrics(&conn, now, 3_600_000)?;
    let stats::Totals {
        spent_micros: spent,
        budget_micros: budget,
        ..
    } = stats::totals(&agents);
    let blocked: Vec<&str> = agents
        .iter()
        .filter(|a| a.blocked_overrun)
        .map(|a| a.name.as_str())
        .collect();
    let exhausted: Vec<&str> = agents
        .iter()
        .filter(|a| a.remaining_micros == 0)
        .map(|a| a.name.as_str())
        .collect();
    if ctx.json {
        print_json(&json!({
            "agents": agents.len(), "spent_micros": spent, "budget_micros": budget,
            "last_hour": hour, "last_day": day, "blocked_overrun": blocked, "exhausted": exhausted,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "agents      {}   spent ${} of ${} budgeted",
        agents.len(),
        format_usd(spent),
        format_usd(budget)
    );
    for (label, w) in [("last hour", &hour), ("last day", &day)] {
        println!(
            "{label:<11} {} requests, {} allowed, {} denied, ${} charged",
            w.allowed + w.denied,
            w.allowed,
            w.denied,
            format_usd(w.spent_micros)
        );
        for (code, n) in &w.denied_by_code {
            println!("              {n:>6} {code}");
        }
    }
    if !exhausted.is_empty() {
        println!("exhausted   {}", exhausted.join(", "));
    }
    if !blocked.is_empty() {
        println!(
            "blocked     {} (usage overran a reservation; raise the budget)",
            blocked.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Trailing window for the burn rate, e.g. 15m, 1h, 6h, 1d.
    #[arg(long, default_value = "1h", value_parser = parse_window)]
    window: i64,
}

/// "90s", "15m", "1h", "2d" → milliseconds.
fn parse_window(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 15m, 1h or 1d"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("'{s}' has no unit: give s, m, h or d (e.g. {s}m)")),
        "d" => 86_400_000,
        _ => return Err(format!("'{s}': unit must be s, m, h or d")),
    };
    if n <= 0 {
        return Err("the window must be positive".into());
    }
    n.checked_mul(ms).ok_or_else(|| "window too large".into())
}

fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{:.1}h", s as f64 / 3600.0),
        _ => format!("{:.1}d", s as f64 / 86400.0),
    }
}

pub fn metrics(ctx: &Ctx, a: MetricsArgs) -> anyhow::Result<ExitCode> {
    let conn = crate::cli::open_db(ctx)?;
    let agents = stats::agent_metrics(&conn, now_ms(), a.window)?;
    if ctx.json {
        print_json(&json!({ "window_secs": a.window / 1000, "agents": agents }));
        return Ok(ExitCode::SUCCESS);
    }
    if agents.is_empty() {
        println!("No agents. Create one with: aex agent create NAME BUDGET_USD RPM");
        return Ok(ExitCode::SUCCESS);
    }
    let w = agents
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(20);
    println!(
        "{:<w$} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "AGENT", "BUDGET", "SPENT", "RESERVED", "REMAINING", "BURN/HOUR", "EXHAUSTED"
    );
    for m in &agents {
        let tte = match (m.remaining_micros, m.time_to_exhaustion_secs) {
            (0, _) => "now".to_string(),
            (_, Some(s)) => format!("in {}", human_secs(s)),
            (_, None) => "—".to_string(),
        };
        println!(
            "{:<w$} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
            m.name,
            format_usd(m.budget_micros),
            format_usd(m.spent_micros),
            format_usd(m.reserved_micros),
            format_usd(m.remaining_micros),
            format_usd(m.burn_micros_per_hour),
            tte
        );
    }
    println!(
        "(burn rate over the last {})",
        human_secs(u64::try_from(a.window / 1000).unwrap_or(0))
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("15m"), Ok(900_000));
        assert_eq!(parse_window("1h"), Ok(3_600_000));
        assert_eq!(parse_window("2d"), Ok(172_800_000));
        assert!(parse_window("0m").is_err());
        assert!(
            parse_window("60").is_err(),
            "a bare number was taken as hours"
        );
        assert!(parse_window("1w").is_err());
        assert!(parse_window("abc").is_err());
    }
}
