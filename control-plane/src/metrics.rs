//! Prometheus exposition for `/metrics`: requests and denials by agent, model and reason; spend,
//! reserved and remaining budget by agent; open reservations; the Authorize latency histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::core::Core;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A lock-free fixed-bucket histogram.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {name} Time to decide and durably reserve one request in the control plane."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(core: &Core) -> String {
    let mut out = String::new();
    let l = core.ledger();
    let _ = writeln!(out, "# HELP aex_requests_total Requests seen by the gateway, by agent, model and outcome (allowed or the denial code).");
    let _ = writeln!(out, "# TYPE aex_requests_total counter");
    let mut rows: Vec<_> = l.counters().iter().collect();
    rows.sort();
    for ((agent, model, outcome), n) in &rows {
        let _ = writeln!(
            out,
            "aex_requests_total{{agent=\"{}\",model=\"{}\",outcome=\"{}\"}} {n}",
            label(agent),
            label(model),
            label(outcome)
        );
    }
    let _ = writeln!(
        out,
        "# HELP aex_denials_total Denied requests by agent, model and reason."
    );
    let _ = writeln!(out, "# TYPE aex_denials_total counter");
    for ((agent, model, outcome), n) in rows.iter().filter(|r| r.0 .2 != "allowed") {
        let _ = writeln!(
            out,
            "aex_denials_total{{agent=\"{}\",model=\"{}\",reason=\"{}\"}} {n}",
            label(agent),
            label(model),
            label(outcome)
        );
    }
    let mut agents: Vec<_> = l.agents().collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    for (metric, help, f) in [
        (
            "aex_budget_micros",
            "Budget in micro-USD.",
            (|a: &crate::ledger::Agent| a.budget) as fn(&crate::ledger::Agent) -> u64,
        ),
        ("aex_spent_micros", "Spend settled in micro-USD.", |a| {
            a.spent
        }),
        (
            "aex_reserved_micros",
            "Budget reserved by requests in flight, micro-USD.",
            |a| a.reserved,
        ),
        (
            "aex_remaining_micros",
            "Budget left after spend and reservations, micro-USD.",
            |a| a.remaining(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} gauge");
        for a in &agents {
            let _ = writeln!(out, "{metric}{{agent=\"{}\"}} {}", label(&a.name), f(a));
        }
    }
    let _ = writeln!(
        out,
        "# HELP aex_reservations_open Reservations not yet settled."
    );
    let _ = writeln!(out, "# TYPE aex_reservations_open gauge");
    let _ = writeln!(out, "aex_reservations_open {}", l.reservations().count());
    let _ = writeln!(out, "# HELP aex_agents Agents registered.");
    let _ = writeln!(out, "# TYPE aex_agents gauge");
    let _ = writeln!(out, "aex_agents {}", agents.len());
    drop(l);
    core.authorize_latency
        .render("aex_authorize_duration_seconds", &mut out);
    out
}
