//! Control-plane microbenchmark: Authorize + Settle pairs per second.
//!
//!   cargo build --release -p aex-control-plane --example ledger_bench
//!   taskset -c 0 target/release/examples/ledger_bench --json target/bench/ledger.json
//!
//! Three layers, each for `--seconds`:
//!   * `ledger`: `Ledger::authorize` + `Ledger::settle` on one thread, ops discarded (the
//!     in-memory decision cost alone);
//!   * `in_process`: the daemon's real path without the network: `Core::mutate` (ledger mutex,
//!     ops handed to the SQLite writer thread, answer after commit) on a current-thread runtime,
//!     with C concurrent requests so the writer can group-commit;
//!   * `grpc`: the tonic `FilterService` served in process on 127.0.0.1:0 as `daemon::run` serves
//!     it, called through the generated client with `x-aex-filter-key`: one `Authorize` and one
//!     `Report` (one settlement) per pair, C requests in flight; accepted sockets get TCP_NODELAY;
//!   * `grpc_nagle`: the same without TCP_NODELAY on the accepted sockets (what a
//!     `TcpListenerStream` yields, whatever the builder's `tcp_nodelay` says): see `bench_grpc`.
//!
//! Pin it with `taskset -c 0` for "one core": every thread (runtime, SQLite writer, gRPC client)
//! then shares that core. The CPUs the process may use are printed (`cpus_allowed`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aex_control_plane::config::{Catalog, Config};
use aex_control_plane::core::{now_ms, Core};
use aex_control_plane::grpc;
use aex_control_plane::home::Home;
use aex_control_plane::ledger::{Ledger, LedgerLimits, Loaded};
use aex_control_plane::policy::Policy;
use aex_control_plane::store::{Store, StoreOptions};
use aex_proto::v1 as pb;
use aex_proto::v1::filter_service_client::FilterServiceClient;
use clap::Parser;
use serde_json::{json, Value};

const MODELS: &str = r#"
[providers.p]
base_url = "http://127.0.0.1:1/v1"
[models.m]
provider = "p"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
max_output_tokens = 4096
"#;
const AGENT: &str = "agt_bench";
const TOKEN_SHA: &str = "7f83b1657ff1fc53b92dc18148a1d65dfc2d4b1fa3d677284addd200126d9069";
const FILTER_KEY: &str = "bench-filter-key";

#[derive(Debug, Parser)]
#[command(name = "ledger_bench")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrency levels for the in-process and gRPC layers.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Which layers: ledger,in_process,grpc,grpc_nagle
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ledger,in_process,grpc,grpc_nagle"
    )]
    only: Vec<String>,
    /// Worker threads of the gRPC runtime (the daemon uses 2).
    #[arg(long, default_value_t = 2)]
    grpc_workers: usize,
    /// Directory for the temporary SQLite databases (the filesystem matters: checkpoints fsync).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::parse(MODELS, "bench-models.toml").expect("models"))
}

fn limits() -> LedgerLimits {
    LedgerLimits {
        reservation_ttl_ms: 3_600_000,
        min_output_tokens: 16,
    }
}

/// The one agent every scenario charges: a budget and RPM that never run out.
fn add_bench_agent(l: &mut Ledger) -> Result<(), aex_control_plane::ledger::LedgerError> {
    l.create_agent(
        AGENT.into(),
        "bench",
        aex_control_plane::ledger::MAX_BUDGET_MICROS,
        u32::MAX,
        Policy::default(),
        0,
        TOKEN_SHA.into(),
        now_ms(),
    )
    .map(|_| ())
}

fn new_ledger() -> Ledger {
    let mut l = Ledger::new(Loaded::default(), catalog(), limits());
    add_bench_agent(&mut l).expect("agent");
    l
}

fn authorize_req(id: String) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        request_id: id,
        agent_id: AGENT.into(),
        token_sha256: TOKEN_SHA.into(),
        model: "m".into(),
        endpoint: pb::Endpoint::ChatCompletions as i32,
        stream: false,
        input_token_bound: 300,
        requested_output_cap: 16,
        choices: 1,
        settlements: Vec::new(),
    }
}

fn settlement(id: String) -> pb::Settlement {
    pb::Settlement {
        request_id: id,
        agent_id: AGENT.into(),
        input_tokens: 250,
        output_tokens: 12,
        upstream_status: 200,
        model: "m".into(),
        outcome: "complete".into(),
        ..Default::default()
    }
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}

/// utime+stime of this process in µs (all threads).
fn cpu_us() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s[s.rfind(')')? + 2..].to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 * 10_000.0 // USER_HZ is 100 on Linux
}

fn rate(pairs: u64, secs: f64, cpu: f64) -> Value {
    json!({
        "pairs": pairs,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "pairs_per_s": (pairs as f64 / secs).round(),
        "cpu_us_per_pair": if pairs > 0 { (cpu / pairs as f64 * 100.0).round() / 100.0 } else { 0.0 },
    })
}

/// Pure ledger: authorize + settle on this thread, ops dropped.
fn bench_ledger(seconds: f64) -> Value {
    let mut l = new_ledger();
    l.take_ops();
    let (t0, c0) = (Instant::now(), cpu_us());
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..256 {
            let id = format!("r{n}");
            let now = now_ms();
            let r = l.authorize(&authorize_req(id.clone()), now);
            assert!(allowed(&r), "denied: {}", r.deny_code);
            assert!(l.settle(&settlement(id), now));
            l.take_ops();
            n += 1;
        }
    }
    rate(n, t0.elapsed().as_secs_f64(), cpu_us() - c0)
}

struct TempHome(PathBuf);

impl TempHome {
    fn new(dir: &Option<PathBuf>, tag: &str) -> Self {
        let base = dir.clone().unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!(
            "aex-ledger-bench-{}-{tag}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempHome(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon's state (ledger behind its mutex, SQLite writer) in a temporary home.
async fn new_core(home: &TempHome) -> Arc<Core> {
    let home = Home::resolve(Some(home.path())).expect("home");
    let (store, loaded) = Store::open(&home.db(), StoreOptions::default()).expect("store");
    let ledger = Ledger::new(loaded, catalog(), limits());
    let config = Config::parse("", "bench-config.toml").expect("config");
    let core = Arc::new(Core::new(
        ledger,
        store,
        config,
        Vec::new(),
        FILTER_KEY.into(),
        String::new(),
        home,
    ));
    core.mutate(add_bench_agent)
        .await
        .expect("commit")
        .expect("agent");
    core
}

/// `Core::mutate` authorize then settle, `conc` requests in flight, on a current-thread runtime.
fn bench_in_process(dir: &Option<PathBuf>, seconds: f64, conc: usize) -> Value {
    let tmp = TempHome::new(dir, "inproc");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let core = new_core(&tmp).await;
        let next = Arc::new(AtomicU64::new(0));
        let pairs = Arc::new(AtomicU64::new(0));
        let (t0, c0) = (Instant::now(), cpu_us());
        let deadline = t0 + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let (core, next, pairs) = (core.clone(), next.clone(), pairs.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let id = format!("r{}", next.fetch_add(1, Ordering::Relaxed));
                    let req = authorize_req(id.clone());
                    let r = core
                        .mutate(|l| l.authorize(&req, now_ms()))
                        .await
                        .expect("commit");
                    assert!(allowed(&r), "denied: {}", r.deny_code);
                    let s = settlement(id);
                    let ok = core
                        .mutate(|l| l.settle(&s, now_ms()))
                        .await
                        .expect("commit");
                    assert!(ok);
                    pairs.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let mut v = rate(
            pairs.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
            cpu_us() - c0,
        );
        v["concurrency"] = json!(conc);
        let l = core.ledger();
        let a = l.agent(AGENT).expect("agent");
        v["invariant_ok"] =
            json!(a.reserved == 0 && a.spent.saturating_add(a.reserved) <= a.budget);
        v
    })
}

/// FilterService over loopback gRPC, served in process as `daemon::run` serves it
/// (`serve_with_incoming_shutdown` on a listener bound to 127.0.0.1:0). With `nodelay` the accepted
/// sockets get TCP_NODELAY (`TcpIncoming::from_listener(listener, true, None)`); without it they
/// are used as `TcpListenerStream` yields them, where the builder's `tcp_nodelay(true)` does not
/// apply and small replies can wait ~40 ms for a delayed ACK (Nagle).
fn bench_grpc(
    dir: &Option<PathBuf>,
    seconds: f64,
    conc: usize,
    workers: usize,
    nodelay: bool,
) -> Value {
    let tmp = TempHome::new(dir, "grpc");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let core = new_core(&tmp).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = if nodelay {
            let incoming =
                tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
                    .expect("incoming");
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(grpc::filter_server(core.clone()))
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop_rx.wait_for(|v| *v).await;
                    }),
            )
        } else {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(grpc::filter_server(core.clone()))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async move {
                            let _ = stop_rx.wait_for(|v| *v).await;
                        },
                    ),
            )
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect");
        let key: tonic::metadata::MetadataValue<_> = FILTER_KEY.parse().expect("key");
        let next = Arc::new(AtomicU64::new(0));
        let pairs = Arc::new(AtomicU64::new(0));
        let (t0, c0) = (Instant::now(), cpu_us());
        let deadline = t0 + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let (channel, key, next, pairs) =
                (channel.clone(), key.clone(), next.clone(), pairs.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = FilterServiceClient::new(channel);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let id = format!("r{}", next.fetch_add(1, Ordering::Relaxed));
                    let mut req = tonic::Request::new(authorize_req(id.clone()));
                    req.metadata_mut().insert("x-aex-filter-key", key.clone());
                    let r = c.authorize(req).await.expect("authorize").into_inner();
                    assert!(allowed(&r), "denied: {}", r.deny_code);
                    let mut req = tonic::Request::new(pb::ReportRequest {
                        settlements: vec![settlement(id)],
                        ..Default::default()
                    });
                    req.metadata_mut().insert("x-aex-filter-key", key.clone());
                    let r = c.report(req).await.expect("report").into_inner();
                    assert_eq!(r.settled, 1);
                    pairs.fetch_add(1, Ordering::Relaxed);
                    lat.push(started.elapsed().as_micros() as u64);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        lat.sort_unstable();
        let mut v = rate(
            pairs.load(Ordering::Relaxed),
            t0.elapsed().as_secs_f64(),
            cpu_us() - c0,
        );
        v["concurrency"] = json!(conc);
        v["runtime_workers"] = json!(workers);
        v["tcp_nodelay"] = json!(nodelay);
        let q = |f: f64| {
            lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
                .copied()
        };
        v["pair_latency_us"] = json!({ "p50": q(0.5), "p99": q(0.99), "max": lat.last() });
        let _ = stop_tx.send(true);
        let _ = server.await;
        v
    })
}

fn main() {
    let args = Args::parse();
    let want = |k: &str| args.only.iter().any(|o| o == k);
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut out = json!({
        "cpus_allowed": cpus_allowed(),
        "seconds": args.seconds,
        "db_dir": dir.display().to_string(),
    });
    if want("ledger") {
        let v = bench_ledger(args.seconds);
        eprintln!("ledger only (no store):        {v}");
        out["ledger"] = v;
    }
    if want("in_process") {
        let mut all = Vec::new();
        for &c in &args.concurrency {
            let v = bench_in_process(&args.dir, args.seconds, c);
            eprintln!("in process + SQLite, C={c:<4}    {v}");
            all.push(v);
        }
        out["in_process"] = Value::Array(all);
    }
    for (layer, nodelay) in [("grpc", true), ("grpc_nagle", false)] {
        if !want(layer) {
            continue;
        }
        let mut all = Vec::new();
        for &c in &args.concurrency {
            let v = bench_grpc(&args.dir, args.seconds, c, args.grpc_workers, nodelay);
            eprintln!(
                "loopback gRPC{}, C={c:<4} {v}",
                if nodelay { "        " } else { " (Nagle)" }
            );
            all.push(v);
        }
        out[layer] = Value::Array(all);
    }
    let text = serde_json::to_string_pretty(&out).expect("json");
    match &args.json {
        Some(p) => std::fs::write(p, text).expect("write json"),
        None => println!("{text}"),
    }
}
