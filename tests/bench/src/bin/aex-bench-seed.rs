//! `aex-bench-seed`: fills a running control plane for the memory benchmark, over its own gRPC API.
//!
//!   aex-bench-seed agents --grpc 127.0.0.1:P --admin-token-file F --count 10000 --out agents.tsv
//!       creates agents through AdminService/CreateAgent (what `aex agent create` calls);
//!       writes "agent_id<TAB>token_sha256" lines.
//!   aex-bench-seed events --grpc 127.0.0.1:P --filter-key-file F --agents agents.tsv
//!       --max-events N --seconds T
//!       drives FilterService/Authorize + Report (settlements batched as the filter batches them)
//!       round-robin over the agents, i.e. the request path without Envoy: each allowed request
//!       appends two audit events (request.allowed, request.settled).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aex_proto::v1 as pb;
use aex_proto::v1::admin_service_client::AdminServiceClient;
use aex_proto::v1::filter_service_client::FilterServiceClient;
use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "aex-bench-seed")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create agents via AdminService/CreateAgent.
    Agents {
        #[arg(long)]
        grpc: String,
        #[arg(long)]
        admin_token_file: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: u64,
        #[arg(long, default_value = "bench")]
        prefix: String,
        #[arg(long, default_value_t = 10_000_000)]
        budget_micros: u64,
        #[arg(long, default_value_t = 1000)]
        rpm: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Authorize + Report pairs over gRPC until --max-events or --seconds.
    Events {
        #[arg(long)]
        grpc: String,
        #[arg(long)]
        filter_key_file: PathBuf,
        #[arg(long)]
        agents: PathBuf,
        #[arg(long, default_value = "test-model")]
        model: String,
        #[arg(long, default_value_t = 1_000_000)]
        max_events: u64,
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        concurrency: u64,
        /// Settlements per Report call.
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

fn secret(path: &PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Agents {
            grpc,
            admin_token_file,
            count,
            concurrency,
            prefix,
            budget_micros,
            rpm,
            out,
        } => {
            let auth: MetadataValue<_> =
                format!("Bearer {}", secret(&admin_token_file)?).parse()?;
            let ch = channel(&grpc).await?;
            let next = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (ch, next, auth, prefix) =
                    (ch.clone(), next.clone(), auth.clone(), prefix.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = AdminServiceClient::new(ch);
                    let mut lines = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let mut req = tonic::Request::new(pb::CreateAgentRequest {
                            name: format!("{prefix}-{i:06}"),
                            budget_micros,
                            rpm,
                            policy: None,
                            ttl_secs: 0,
                        });
                        req.metadata_mut().insert("authorization", auth.clone());
                        let r = c.create_agent(req).await?.into_inner();
                        let id = r.agent.map(|a| a.agent_id).unwrap_or_default();
                        let sha = hex::encode(Sha256::digest(r.token.as_bytes()));
                        lines.push(format!("{id}\t{sha}"));
                    }
                    Ok::<_, anyhow::Error>(lines)
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            std::fs::write(&out, all.join("\n") + "\n")?;
            println!(
                "{}",
                json!({ "agents": all.len(), "seconds": started.elapsed().as_secs_f64() })
            );
        }
        Cmd::Events {
            grpc,
            filter_key_file,
            agents,
            model,
            max_events,
            seconds,
            concurrency,
            batch,
        } => {
            let key: MetadataValue<_> = secret(&filter_key_file)?.parse()?;
            let agents: Arc<Vec<(String, String)>> = Arc::new(
                std::fs::read_to_string(&agents)?
                    .lines()
                    .filter_map(|l| l.split_once('\t'))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            );
            anyhow::ensure!(!agents.is_empty(), "no agents");
            let ch = channel(&grpc).await?;
            let events = Arc::new(AtomicU64::new(0));
            let pairs = Arc::new(AtomicU64::new(0));
            let denied = Arc::new(AtomicU64::new(0));
            let next = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let deadline = started + Duration::from_secs_f64(seconds);
            let run_id = std::process::id();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (ch, key, agents, events, pairs, denied, next, model) = (
                    ch.clone(),
                    key.clone(),
                    agents.clone(),
                    events.clone(),
                    pairs.clone(),
                    denied.clone(),
                    next.clone(),
                    model.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut c = FilterServiceClient::new(ch);
                    let mut pending: Vec<pb::Settlement> = Vec::new();
                    loop {
                        let stop = Instant::now() >= deadline
                            || events.load(Ordering::Relaxed) >= max_events;
                        if pending.len() >= batch || (stop && !pending.is_empty()) {
                            let n = pending.len() as u64;
                            let mut req = tonic::Request::new(pb::ReportRequest {
                                settlements: std::mem::take(&mut pending),
                                ..Default::default()
                            });
                            req.metadata_mut().insert("x-aex-filter-key", key.clone());
                            c.report(req).await?;
                            events.fetch_add(n, Ordering::Relaxed);
                            pairs.fetch_add(n, Ordering::Relaxed);
                        }
                        if stop {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let (agent_id, sha) = &agents[(i % agents.len() as u64) as usize];
                        let request_id = format!("seed-{run_id}-{i}");
                        let mut req = tonic::Request::new(pb::AuthorizeRequest {
                            request_id: request_id.clone(),
                            agent_id: agent_id.clone(),
                            token_sha256: sha.clone(),
                            model: model.clone(),
                            endpoint: pb::Endpoint::ChatCompletions as i32,
                            stream: false,
                            input_token_bound: 300,
                            requested_output_cap: 16,
                            choices: 1,
                            settlements: Vec::new(),
                        });
                        req.metadata_mut().insert("x-aex-filter-key", key.clone());
                        let r = c.authorize(req).await?.into_inner();
                        events.fetch_add(1, Ordering::Relaxed);
                        if r.decision == pb::Decision::Allow as i32 {
                            pending.push(pb::Settlement {
                                request_id,
                                agent_id: agent_id.clone(),
                                input_tokens: 250,
                                output_tokens: 12,
                                upstream_status: 200,
                                model: model.clone(),
                                outcome: "complete".into(),
                                ..Default::default()
                            });
                        } else {
                            denied.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({
                    "events": events.load(Ordering::Relaxed),
                    "pairs": pairs.load(Ordering::Relaxed),
                    "denied": denied.load(Ordering::Relaxed),
                    "seconds": secs,
                })
            );
        }
    }
    Ok(())
}
