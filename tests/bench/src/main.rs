//! `aex-loadgen`: an HTTP/1.1 load generator for the AEX benchmark (`make bench`).
//!
//! Closed loop (`--concurrency N`): N virtual users, one keep-alive connection each, each sending
//! its next request as soon as the previous one is answered. Open loop (`--rate R`): requests are
//! scheduled at fixed intervals of 1/R from a connection pool that grows as needed, and latency
//! is measured from the *scheduled* send time, so a slow server cannot hide its queueing delay
//! (no coordinated omission).
//!
//! Latency is recorded in nanoseconds in HDR histograms (3 significant digits). With `--stream`
//! the time to the first body byte (TTFB) is recorded too, and a response must end with
//! `data: [DONE]`. `--pids name=PID,...` reads utime+stime from /proc/PID/stat at the start and
//! the end of the measured window and reports CPU µs per completed request for each process (the
//! generator's own CPU is reported as `loadgen`).

mod http;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::http::{Conn, Failure};

#[derive(Debug, Parser)]
#[command(
    name = "aex-loadgen",
    about = "HTTP/1.1 load generator (closed and open loop) with HDR latency histograms"
)]
struct Args {
    /// Target, e.g. http://127.0.0.1:9000/v1/chat/completions
    #[arg(long)]
    url: String,
    /// Request body (sent as POST).
    #[arg(long)]
    body_file: PathBuf,
    /// Extra request header "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Closed loop: number of virtual users (one connection each).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second, scheduled at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: largest number of connections in the pool.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (connections opened, caches warm).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The response is an SSE stream: record TTFB and require `data: [DONE]` at the end.
    #[arg(long)]
    stream: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Processes whose CPU time to attribute per request: name=PID,name=PID
    #[arg(long, default_value = "")]
    pids: String,
    /// Write the result (with the histograms) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A label copied into the JSON.
    #[arg(long, default_value = "")]
    label: String,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

/// Results of one worker (or the open-loop collector).
struct Tally {
    total: Histogram<u64>,
    ttfb: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            total: new_hist(),
            ttfb: new_hist(),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }
    fn ok(&mut self, start: Instant, ex: &http::Exchange) {
        self.ok += 1;
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .total
            .record(ns(ex.done.saturating_duration_since(start)));
        if let Some(f) = ex.first_body_byte {
            let _ = self.ttfb.record(ns(f.saturating_duration_since(start)));
        }
    }
    fn err(&mut self, f: &Failure) {
        *self.errors.entry(f.key()).or_default() += 1;
    }
    fn merge(&mut self, o: &Tally) {
        let _ = self.total.add(&o.total);
        let _ = self.ttfb.add(&o.ttfb);
        self.ok += o.ok;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

struct Target {
    addr: String,
    request: Vec<u8>,
    stream: bool,
    timeout: Duration,
}

fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((addr, path.to_string()))
}

// ------------------------------------------------------------------ CPU from /proc

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of the whole process (all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of stat(5); index 0 here is field 3 (state)
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_pids(s: &str) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = vec![("loadgen".to_string(), std::process::id())];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, pid) = part
            .split_once('=')
            .with_context(|| format!("--pids: '{part}' is not name=PID"))?;
        out.push((name.trim().to_string(), pid.trim().parse()?));
    }
    Ok(out)
}

fn read_all(pids: &[(String, u32)]) -> Vec<Option<u64>> {
    pids.iter().map(|(_, p)| cpu_ticks(*p)).collect()
}

// ------------------------------------------------------------------ loops

/// Closed loop: `n` users, each on its own connection.
async fn closed_loop(target: Arc<Target>, n: usize, measure_from: Instant, end: Instant) -> Tally {
    let mut handles = Vec::new();
    for _ in 0..n {
        let t = target.clone();
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut conn: Option<Conn> = None;
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                if conn.is_none() {
                    match Conn::connect(&t.addr).await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            if start >= measure_from {
                                tally.err(&Failure::Connect);
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let r = c.exchange(&t.request, t.stream, t.timeout).await;
                let measured = start >= measure_from;
                match r {
                    Ok(ex) => {
                        if measured {
                            tally.ok(start, &ex);
                        }
                        if c.closed {
                            conn = None;
                        }
                    }
                    Err(f) => {
                        if measured {
                            tally.err(&f);
                        }
                        // A non-2xx with a complete body leaves the connection usable, but be
                        // conservative: start over on a fresh one.
                        conn = None;
                    }
                }
            }
            tally
        }));
    }
    let mut all = Tally::new();
    for h in handles {
        if let Ok(t) = h.await {
            all.merge(&t);
        }
    }
    all
}

/// Open loop: one request every 1/rate seconds, latency from the scheduled time.
///
/// Tokio's timer has millisecond granularity, so the schedule is kept by a plain thread
/// (nanosleep, tens of µs of slack) that hands each due request to the runtime. The time from the
/// scheduled instant to the moment the request is written is part of the measured latency (that
/// is the point of measuring from the schedule) and is also reported on its own as `send_lag`.
async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    max_conns: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> (Tally, u64, Histogram<u64>) {
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    let permits = Arc::new(Semaphore::new(max_conns));
    let tally = Arc::new(Mutex::new(Tally::new()));
    let lag = Arc::new(Mutex::new(new_hist()));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let ticker = std::thread::spawn(move || {
        let mut i: u32 = 0;
        loop {
            let at = start + interval * i;
            i += 1;
            if at >= end {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                break;
            }
        }
    });
    let mut handles = Vec::new();
    let mut scheduled: u64 = 0;
    while let Some(at) = rx.recv().await {
        let measured = at >= measure_from;
        if measured {
            scheduled += 1;
        }
        let (t, pool, permits, tally, lag) = (
            target.clone(),
            pool.clone(),
            permits.clone(),
            tally.clone(),
            lag.clone(),
        );
        handles.push(tokio::spawn(async move {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let idle = pool.lock().ok().and_then(|mut p| p.pop());
            let mut conn = match idle {
                Some(c) => c,
                None => match Conn::connect(&t.addr).await {
                    Ok(c) => c,
                    Err(_) => {
                        if measured {
                            if let Ok(mut tl) = tally.lock() {
                                tl.err(&Failure::Connect);
                            }
                        }
                        return;
                    }
                },
            };
            if measured {
                let l = Instant::now().saturating_duration_since(at);
                if let Ok(mut h) = lag.lock() {
                    let _ = h.record(u64::try_from(l.as_nanos()).unwrap_or(u64::MAX).max(1));
                }
            }
            let r = conn.exchange(&t.request, t.stream, t.timeout).await;
            let keep = r.is_ok() && !conn.closed;
            if measured {
                if let Ok(mut tl) = tally.lock() {
                    match &r {
                        Ok(ex) => tl.ok(at, ex),
                        Err(f) => tl.err(f),
                    }
                }
            }
            if keep {
                if let Ok(mut p) = pool.lock() {
                    p.push(conn);
                }
            }
        }));
        // Reap finished handles now and then so the vector stays small.
        if handles.len() > 4096 {
            handles.retain(|h| !h.is_finished());
        }
    }
    let _ = ticker.join();
    for h in handles {
        let _ = h.await;
    }
    let t = std::mem::replace(&mut *tally.lock().expect("tally"), Tally::new());
    let l = std::mem::replace(&mut *lag.lock().expect("lag"), new_hist());
    (t, scheduled, l)
}

// ------------------------------------------------------------------ report

fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 10.0).round() / 10.0
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p99.9": us(h.value_at_quantile(0.999)),
        "min": us(h.min()),
        "max": us(h.max()),
        "mean": (h.mean() / 100.0).round() / 10.0,
    })
}

/// The recorded buckets as [[highest equivalent value in ns, count], ...], so runs can be merged
/// exactly by whoever reads the JSON.
fn buckets(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency.is_none() && args.rate.is_none() {
        bail!("give --concurrency N (closed loop) or --rate R (open loop)");
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let (addr, path) = parse_url(&args.url)?;
    let body = std::fs::read(&args.body_file)
        .with_context(|| format!("reading {}", args.body_file.display()))?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header '{h}' is not 'Name: value'"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let request = http::build_request(&addr, &path, &headers, &body);
    let target = Arc::new(Target {
        addr,
        request,
        stream: args.stream,
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let pids = parse_pids(&args.pids)?;
    let ticks_per_s = clock_ticks();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4),
        )
        .enable_all()
        .build()?;
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);

    let (tally, scheduled, send_lag, measured_s, cpu) = rt.block_on(async {
        let start = Instant::now();
        let measure_from = start + warmup;
        let end = measure_from + duration;
        // CPU snapshots at the window's edges, taken by a separate task.
        let pids2 = pids.clone();
        let sampler = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let t0 = Instant::now();
            let before = read_all(&pids2);
            tokio::time::sleep_until(end.into()).await;
            let after = read_all(&pids2);
            (before, after, t0.elapsed())
        });
        let (tally, scheduled, send_lag) = if let Some(n) = args.concurrency {
            (
                closed_loop(target.clone(), n, measure_from, end).await,
                None,
                None,
            )
        } else {
            let rate = args.rate.unwrap_or(1.0);
            let (t, s, l) = open_loop(
                target.clone(),
                rate,
                args.max_connections,
                start,
                measure_from,
                end,
            )
            .await;
            (t, Some(s), Some(l))
        };
        let (before, after, window) = sampler.await.expect("sampler");
        (
            tally,
            scheduled,
            send_lag,
            window.as_secs_f64(),
            (before, after),
        )
    });

    let ok = tally.ok;
    let errors: u64 = tally.errors.values().sum();
    let rps = ok as f64 / measured_s;
    let mut cpu_us = serde_json::Map::new();
    let mut cpu_per_req = serde_json::Map::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        if let (Some(b), Some(a)) = (cpu.0[i], cpu.1[i]) {
            let total_us = (a.saturating_sub(b)) as f64 * 1e6 / ticks_per_s as f64;
            cpu_us.insert(name.clone(), json!(total_us));
            let per = if ok > 0 { total_us / ok as f64 } else { 0.0 };
            cpu_per_req.insert(name.clone(), json!((per * 10.0).round() / 10.0));
        } else {
            cpu_us.insert(name.clone(), Value::Null);
            cpu_per_req.insert(name.clone(), Value::Null);
        }
    }
    let out = json!({
        "label": args.label,
        "url": args.url,
        "mode": if args.concurrency.is_some() { "closed" } else { "open" },
        "concurrency": args.concurrency,
        "rate": args.rate,
        "stream": args.stream,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "measured_s": measured_s,
        "requests": ok,
        "scheduled": scheduled,
        "errors": errors,
        "error_kinds": tally.errors,
        "rps": (rps * 10.0).round() / 10.0,
        "latency_us": summary(&tally.total),
        "ttfb_us": if args.stream { summary(&tally.ttfb) } else { Value::Null },
        "send_lag_us": send_lag.as_ref().map(summary).unwrap_or(Value::Null),
        "cpu_us": cpu_us,
        "cpu_us_per_req": cpu_per_req,
        "clock_ticks_per_s": ticks_per_s,
        "hist_ns": buckets(&tally.total),
        "ttfb_hist_ns": if args.stream { buckets(&tally.ttfb) } else { Value::Null },
    });
    let lat = &out["latency_us"];
    eprintln!(
        "{} {} {}: {} ok, {} errors, {:.0} rps, p50 {} p90 {} p99 {} p99.9 {} us{}",
        args.label,
        out["mode"].as_str().unwrap_or(""),
        args.concurrency
            .map(|c| format!("c={c}"))
            .unwrap_or_else(|| format!("rate={}", args.rate.unwrap_or(0.0))),
        ok,
        errors,
        rps,
        lat["p50"],
        lat["p90"],
        lat["p99"],
        lat["p99.9"],
        if args.stream {
            format!(", ttfb p50 {} us", out["ttfb_us"]["p50"])
        } else {
            String::new()
        }
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
