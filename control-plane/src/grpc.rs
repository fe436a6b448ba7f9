//! The gRPC surface: `FilterService` for Envoy's filter, `AdminService` for the CLI. Both sit
//! behind an interceptor that checks their secret. Errors become `tonic::Status` in one place.

use std::sync::Arc;

use aex_proto::v1 as pb;
use aex_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use aex_proto::v1::filter_service_server::{FilterService, FilterServiceServer};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::core::{now_ms, Core, CoreError};
use crate::ledger::LedgerError;
use crate::policy::{self, Policy, Scope};
use crate::tokens;

pub const FILTER_KEY_HEADER: &str = "x-aex-filter-key";

/// How long `aex agent update --budget` waits for a busy agent's workers to return their leases
/// when the new budget is below what the agent holds.
const UPDATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The changes an update request names, applied to the agent.
fn apply_update(u: &pb::UpdateAgentRequest, a: &mut crate::ledger::Agent) {
    if let Some(b) = u.budget_micros {
        a.budget = b;
    }
    if let Some(r) = u.rpm {
        a.rpm = r;
    }
    let p = &mut a.policy;
    if let Some(m) = &u.allowed_models {
        p.allowed_models = policy::parse_list(m);
    }
    if let Some(v) = u.allow_streaming {
        p.allow_streaming = v;
    }
    if let Some(v) = u.allow_tools {
        p.allow_tools = v;
    }
    if let Some(t) = &u.allowed_tools {
        p.allowed_tools = policy::parse_list(t);
    }
    if let Some(v) = u.allow_vision {
        p.allow_vision = v;
    }
    if let Some(v) = u.allow_passthrough {
        p.allow_passthrough = v;
    }
    if let Some(v) = u.strict {
        p.strict = v;
    }
    if let Some(v) = u.max_output_tokens {
        p.max_output_tokens = v;
    }
    if let Some(t) = u.tpm {
        p.tpm = t;
    }
    if let Some(s) = u.scope {
        p.scope = Scope::from_pb(s);
    }
}

impl From<LedgerError> for Status {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::AgentExists(_) => Status::already_exists(e.to_string()),
            LedgerError::NoSuchAgent(_) => Status::not_found(e.to_string()),
            LedgerError::Invalid(_) | LedgerError::BelowCommitted(_) => {
                Status::invalid_argument(e.to_string())
            }
        }
    }
}

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Self {
        Status::unavailable(e.to_string())
    }
}

/// Checks one secret in the request metadata: the filter key verbatim, or a bearer token whose
/// SHA-256 must match (the daemon keeps only the admin token's hash).
#[derive(Clone)]
pub struct RequireSecret {
    header: &'static str,
    expected: Arc<str>,
    bearer: bool,
}

impl tonic::service::Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let got = req
            .metadata()
            .get(self.header)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ok = if self.bearer {
            let got = got.strip_prefix("Bearer ").unwrap_or("");
            tokens::constant_time_eq(tokens::sha256_hex(got).as_bytes(), self.expected.as_bytes())
        } else {
            tokens::constant_time_eq(got.as_bytes(), self.expected.as_bytes())
        };
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(format!(
                "missing or wrong {}",
                self.header
            )))
        }
    }
}

pub fn filter_server(
    core: Arc<Core>,
) -> InterceptedService<FilterServiceServer<FilterApi>, RequireSecret> {
    let expected = core.filter_key.as_str().into();
    InterceptedService::new(
        FilterServiceServer::new(FilterApi { core }),
        RequireSecret {
            header: FILTER_KEY_HEADER,
            expected,
            bearer: false,
        },
    )
}

pub fn admin_server(
    core: Arc<Core>,
) -> InterceptedService<AdminServiceServer<AdminApi>, RequireSecret> {
    let expected = core.admin_token_sha256.as_str().into();
    InterceptedService::new(
        AdminServiceServer::new(AdminApi { core }),
        RequireSecret {
            header: "authorization",
            expected,
            bearer: true,
        },
    )
}

pub struct FilterApi {
    core: Arc<Core>,
}

#[tonic::async_trait]
impl FilterService for FilterApi {
    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        self.core.note_sync(&req.get_ref().filter_version);
        let r = req.get_ref();
        Ok(Response::new(
            self.core.sync_answer(r.known_version, r.known_instance),
        ))
    }

    async fn authorize(
        &self,
        req: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let started = std::time::Instant::now();
        let req = req.into_inner();
        let closed = if req.settlements.is_empty() {
            Vec::new()
        } else {
            self.core.closed_on_disk(&req.settlements).await?
        };
        let resp = self
            .core
            .mutate(|l| {
                let now = now_ms();
                l.remember_closed(&closed, now);
                l.authorize(&req, now)
            })
            .await?;
        self.core.authorize_latency.observe(started.elapsed());
        Ok(Response::new(resp))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let req = req.into_inner();
        let closed = self.core.closed_on_disk(&req.settlements).await?;
        let resp = self
            .core
            .mutate(|l| {
                let now = now_ms();
                l.remember_closed(&closed, now);
                let mut r = pb::ReportResponse::default();
                for a in &req.admissions {
                    l.admit(a, now);
                }
                for s in &req.settlements {
                    if l.settle(s, now) {
                        r.settled += 1;
                    } else {
                        r.duplicates += 1;
                    }
                }
                for d in &req.denials {
                    l.record_denial(d, now);
                }
                for ret in &req.returns {
                    l.return_lease(ret, now);
                }
                r.version = l.version();
                r
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let req = req.into_inner();
        let resp = self.core.mutate(|l| l.lease(&req, now_ms())).await?;
        Ok(Response::new(resp))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let req = req.into_inner();
        let l = self.core.ledger();
        let agent = l
            .agent(&req.agent_id)
            .filter(|a| {
                tokens::constant_time_eq(a.token_sha256.as_bytes(), req.token_sha256.as_bytes())
            })
            .ok_or_else(|| Status::unauthenticated("unknown agent"))?;
        Ok(Response::new(pb::UsageResponse {
            agent: Some(l.state(agent)),
        }))
    }
}

pub struct AdminApi {
    core: Arc<Core>,
}

fn new_agent_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("agt_{}", hex::encode(b))
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let l = self.core.ledger();
        Ok(Response::new(pb::HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            snapshot_version: l.version(),
            agents: l.agents().count() as u64,
            last_filter_sync: self
                .core
                .last_filter_sync
                .load(std::sync::atomic::Ordering::Relaxed)
                / 1000,
            filter_version: self
                .core
                .filter_version
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            providers: self
                .core
                .upstreams()
                .iter()
                .map(|u| pb::ProviderHealth {
                    name: u.name.clone(),
                    mocked: u.mocked,
                    host: u.def.as_ref().map_or_else(String::new, |d| d.host.clone()),
                    port: u.def.as_ref().map_or(0, |d| u32::from(d.port)),
                })
                .collect(),
        }))
    }

    async fn create_agent(
        &self,
        req: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::AgentWithToken>, Status> {
        let req = req.into_inner();
        let policy = req.policy.as_ref().map(Policy::from_pb).unwrap_or_default();
        let token = tokens::generate();
        let hash = tokens::sha256_hex(&token);
        let state = self
            .core
            .mutate(|l| {
                let a = l.create_agent(
                    new_agent_id(),
                    &req.name,
                    req.budget_micros,
                    req.rpm,
                    policy,
                    req.ttl_secs,
                    hash,
                    now_ms(),
                )?;
                let a = a.clone();
                Ok::<_, LedgerError>(l.state(&a))
            })
            .await??;
        Ok(Response::new(pb::AgentWithToken {
            agent: Some(state),
            token,
        }))
    }

    async fn update_agent(
        &self,
        req: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::AgentState>, Status> {
        let u = req.into_inner();
        // An update that changes nothing would still be recorded as `agent.updated`.
        let changes_something = u.budget_micros.is_some()
            || u.rpm.is_some()
            || u.allowed_models.is_some()
            || u.allow_streaming.is_some()
            || u.allow_tools.is_some()
            || u.allowed_tools.is_some()
            || u.allow_vision.is_some()
            || u.allow_passthrough.is_some()
            || u.strict.is_some()
            || u.max_output_tokens.is_some()
            || u.scope.is_some()
            || u.tpm.is_some();
        if !changes_something {
            return Err(Status::invalid_argument(
                "nothing to update: the request changes no limit or policy field",
            ));
        }
        // Credit the agent's leases hold counts as held until its workers hand them back: a
        // budget below it is retried (for up to UPDATE_WAIT) while they are recalled.
        let deadline = std::time::Instant::now() + UPDATE_WAIT;
        loop {
            let updated = self
                .core
                .mutate(|l| {
                    let a = l.update_agent(&u.name, now_ms(), |a| {
                        apply_update(&u, a);
                        Ok(())
                    })?;
                    let a = a.clone();
                    Ok::<_, LedgerError>(l.state(&a))
                })
                .await?;
            match updated {
                Err(LedgerError::BelowCommitted(_)) if std::time::Instant::now() < deadline => {
                    self.core
                        .mutate(|l| {
                            let id = l.agent_by_name(&u.name).map(|a| a.id.clone());
                            id.map(|id| l.recall_agent_leases(&id, now_ms()))
                        })
                        .await?;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return Ok(Response::new(other?)),
            }
        }
    }

    async fn get_agent(
        &self,
        req: Request<pb::AgentRef>,
    ) -> Result<Response<pb::AgentState>, Status> {
        let name = req.into_inner().name;
        let l = self.core.ledger();
        let a = l
            .agent_by_name(&name)
            .ok_or_else(|| Status::from(LedgerError::NoSuchAgent(name.clone())))?;
        Ok(Response::new(l.state(a)))
    }

    async fn list_agents(
        &self,
        _: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let l = self.core.ledger();
        let mut agents: Vec<pb::AgentState> = l.agents().map(|a| l.state(a)).collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn delete_agent(
        &self,
        req: Request<pb::AgentRef>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        let name = req.into_inner().name;
        self.core
            .mutate(|l| l.delete_agent(&name, now_ms()))
            .await??;
        Ok(Response::new(pb::DeleteAgentResponse {}))
    }

    async fn rotate_token(
        &self,
        req: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::AgentWithToken>, Status> {
        let req = req.into_inner();
        let token = tokens::generate();
        let hash = tokens::sha256_hex(&token);
        let state = self
            .core
            .mutate(|l| {
                let a = l
                    .rotate_token(&req.name, hash, req.ttl_secs, now_ms())?
                    .clone();
                Ok::<_, LedgerError>(l.state(&a))
            })
            .await??;
        Ok(Response::new(pb::AgentWithToken {
            agent: Some(state),
            token,
        }))
    }

    async fn reload_models(
        &self,
        _: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        let _guard = self.core.reload_lock.lock().await;
        let home = self.core.home.clone();
        let catalog = crate::config::Catalog::load(&home.models()).map_err(|e| {
            Status::invalid_argument(format!("{e}; the previous configuration stays in force"))
        })?;
        let env = crate::providers::read_env_file(&home.env_file());
        let upstreams = crate::providers::resolve(&catalog, &self.core.config, &env);
        // Clusters first, old ones kept, so no request is ever routed to a cluster Envoy lacks
        // and requests in flight on a removed provider finish.
        let old = self.core.upstreams();
        let mut union = upstreams.clone();
        union.extend(
            old.iter()
                .filter(|o| !upstreams.iter().any(|u| u.cluster == o.cluster))
                .cloned(),
        );
        crate::daemon::write_clusters(&home, &union)
            .map_err(|e| Status::internal(format!("writing Envoy clusters: {e}")))?;
        let new_clusters: Vec<String> = upstreams
            .iter()
            .filter(|u| u.def.is_some())
            .map(|u| u.cluster.clone())
            .collect();
        crate::daemon::wait_for_envoy_clusters(self.core.config.envoy_admin_port, &new_clusters)
            .await;
        let mocked = upstreams
            .iter()
            .filter(|u| u.mocked)
            .map(|u| u.name.clone())
            .collect();
        let (models, providers) = (catalog.models.len() as u32, catalog.providers.len() as u32);
        *self
            .core
            .upstreams
            .write()
            .unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(upstreams);
        let version = self
            .core
            .mutate(|l| {
                l.set_catalog(std::sync::Arc::new(catalog), now_ms());
                l.version()
            })
            .await?;
        // Answer once every worker's periodic sync has fetched the new snapshot, so a script's
        // next request already sees new prices, keys and routes (a new model's name would also
        // be fetched on demand, but a changed one would not).
        tokio::time::sleep(std::time::Duration::from_millis(
            crate::envoy::FILTER_SYNC_INTERVAL_MS + 100,
        ))
        .await;
        Ok(Response::new(pb::ReloadModelsResponse {
            models,
            providers,
            mocked_providers: mocked,
            snapshot_version: version,
        }))
    }

    async fn archive_audit(
        &self,
        req: Request<pb::ArchiveAuditRequest>,
    ) -> Result<Response<pb::ArchiveAuditResponse>, Status> {
        let req = req.into_inner();
        let prev = self.core.ledger().archived().clone();
        if prev.through_seq != req.after_seq {
            return Err(Status::failed_precondition(format!(
                "another archive (up to event {}) was made while this one was written; run the command again",
                prev.through_seq
            )));
        }
        let path = self.core.db_path.clone();
        // Reads the archived part's totals (a scan of it) off the async runtime.
        let next = tokio::task::spawn_blocking(move || {
            let conn = crate::store::open_connection(&path)?;
            crate::archive::next(
                &conn,
                &prev,
                req.through_seq,
                &req.through_hash,
                &req.file,
                now_ms(),
            )
            .map(|n| (n, prev.through_seq))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| match e {
            crate::archive::ArchiveError::Refused(m) => Status::failed_precondition(m),
            crate::archive::ArchiveError::Store(e) => Status::internal(e.to_string()),
        })?;
        let (next, prev_through) = next;
        let (events, seq) = self
            .core
            .mutate(|l| l.archive(next, prev_through, now_ms()))
            .await??;
        Ok(Response::new(pb::ArchiveAuditResponse {
            events,
            archived_event_seq: seq,
        }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = req.into_inner();
        let path = self.core.db_path.clone();
        let events = tokio::task::spawn_blocking(
            move || -> Result<Vec<pb::AuditEvent>, crate::store::StoreError> {
                let conn = crate::store::open_connection(&path)?;
                let agent_id = if req.agent.is_empty() {
                    None
                } else {
                    let id: Option<String> = conn
                        .query_row("SELECT id FROM agents WHERE name=?1", [&req.agent], |r| {
                            r.get(0)
                        })
                        .ok();
                    Some(id.unwrap_or_else(|| req.agent.clone()))
                };
                let limit = if req.limit == 0 {
                    1000
                } else {
                    req.limit.min(100_000)
                };
                let evs =
                    crate::store::load_audit(&conn, req.after_seq, limit, agent_id.as_deref())?;
                Ok(evs
                    .into_iter()
                    .map(|e| pb::AuditEvent {
                        seq: e.seq,
                        ts_ms: e.ts_ms,
                        kind: e.kind,
                        agent_id: e.agent_id,
                        request_id: e.request_id,
                        payload_json: e.payload,
                        prev_hash: e.prev_hash,
                        hash: e.hash,
                    })
                    .collect())
            },
        )
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListAuditResponse { events }))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        // The models as the filter is told them, so the CLI sees what requests are judged by.
        let (_, snapshot) = self.core.snapshot();
        let mocked_providers = self
            .core
            .upstreams()
            .iter()
            .filter(|u| u.mocked)
            .map(|u| u.name.clone())
            .collect();
        Ok(Response::new(pb::ListModelsResponse {
            models: snapshot.models,
            mocked_providers,
        }))
    }
}
