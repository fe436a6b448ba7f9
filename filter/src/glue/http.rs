//! The per-request context: holds the request while the body is classified and the control plane
//! reserves its cost, applies the governance edits, meters the response and queues the
//! settlement when the stream ends, however it ends.

use std::rc::Rc;

use aex_proto::v1 as pb;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use super::{log, now_ms, now_s, Shared};
use crate::body_usage::BodyUsage;
use crate::classify::{self, Endpoint, Route};
use crate::decide::{self, Outcome, Plan};
use crate::errors::{self, Code, Denial, RateLimited};
use crate::headers::{RequestHeaders, ResponseHeaders};
use crate::sse::{Output, SseMeter};

enum Stage {
    /// Not a governed request, or already answered.
    Idle,
    /// Waiting for the whole request body.
    AwaitBody {
        endpoint: Endpoint,
        agent_id: String,
        token_sha256: String,
    },
    /// Authorize sent to the control plane.
    Authorizing {
        token: u32,
        plan: Box<Plan>,
        body_len: usize,
    },
    /// Usage sent to the control plane for `GET /v1/aex/usage`.
    Usage { token: u32 },
    /// The token is unknown here: fetching the newest policy once before refusing, so an agent
    /// created a moment ago works at once on every worker.
    /// `unreachable`: the answer if the control plane cannot be asked (None: 503). A model the
    /// worker does not know stays a 403 then: retrying a typo'd model is no use.
    Resync {
        token: u32,
        end_of_stream: bool,
        unreachable: Option<Box<Denial>>,
    },
    /// Forwarded upstream with a reservation, or under a lease (its id and the worst case held
    /// against it); settle at the end.
    Forwarded {
        plan: Box<Plan>,
        clamp: u64,
        lease: Option<(String, u64)>,
    },
    /// Refused before the request body ended: the answer waits until the body has been read,
    /// because Envoy closes an HTTP/1.1 connection whose request it answered before reading it
    /// whole, and the client would lose its keep-alive connection to every refusal.
    Refusing {
        status: u32,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Settlement queued.
    Done,
}

pub struct Http {
    shared: Rc<Shared>,
    stage: Stage,
    /// The request's headers as the client sent them (read once).
    req: RequestHeaders,
    /// The whole request body arrived while the filter was busy (resync): its size.
    body_ready: Option<usize>,
    /// The client has sent the whole request (end of stream seen, headers or body or trailers).
    request_ended: bool,
    resynced: bool,
    request_id: String,
    meter: Option<SseMeter>,
    /// A streaming request's response not labelled `text/event-stream`: whether it is an event
    /// stream after all is told from its first bytes. The value: whether the meter may remove
    /// the usage chunk (the gateway asked for it and the body's length is not fixed).
    sniff: Option<bool>,
    /// A JSON response body's usage, read as the body passes.
    body: BodyUsage,
    outcome: Outcome,
}

/// The response header naming the id the audit log records the request under, on every answer
/// to a governed request (the provider's own `x-request-id` passes unchanged).
const AUDIT_ID_HEADER: &str = "x-aex-request-id";

fn set_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
        log(
            LogLevel::Error,
            &format!("aex: cannot set header {name}: {e:?}"),
        );
    }
}

/// The status of the response sent to the client (Envoy's `response.code` property: an integer
/// in 8 little-endian bytes), once there is one.
fn response_code() -> Option<u64> {
    let bytes = hostcalls::get_property(vec!["response", "code"]).ok()??;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn too_large(max: u64) -> Denial {
    Denial::new(
        Code::RequestTooLarge,
        format!("The request body exceeds the limit of {max} bytes."),
    )
}

/// Whether the response came from the upstream (not a reply Envoy made itself).
fn from_upstream() -> bool {
    hostcalls::get_property(vec!["response", "code_details"])
        .ok()
        .flatten()
        .is_some_and(|d| d == b"via_upstream")
}

fn unavailable() -> Denial {
    Denial::new(
        Code::GovernanceUnavailable,
        "AEX governance is unavailable (control plane unreachable); the request was not forwarded.",
    )
}

impl Http {
    pub fn new(shared: Rc<Shared>, _context_id: u32) -> Self {
        Http {
            shared,
            stage: Stage::Idle,
            req: RequestHeaders::default(),
            body_ready: None,
            request_ended: false,
            resynced: false,
            request_id: String::new(),
            meter: None,
            sniff: None,
            body: BodyUsage::default(),
            outcome: Outcome::default(),
        }
    }

    /// Answers locally: now, or once the request body has ended (see [`Stage::Refusing`]). A
    /// body refused as too large is not waited for.
    fn respond(
        &mut self,
        status: u32,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Action {
        if self.request_ended || status == 413 {
            return self.send_now(status, &headers, &body);
        }
        self.stage = Stage::Refusing {
            status,
            headers,
            body,
        };
        Action::Pause
    }

    /// Sends a [`Stage::Refusing`] answer when the body has ended, or grown past the body limit
    /// (then Envoy may close the connection: reading an oversized body to keep it is not worth it).
    fn on_refusing_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream && (body_size as u64) <= self.max_body_bytes() {
            return Action::Pause;
        }
        match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::Refusing {
                status,
                headers,
                body,
            } => self.send_now(status, &headers, &body),
            other => {
                self.stage = other;
                Action::Pause
            }
        }
    }

    fn send_now(&mut self, status: u32, headers: &[(&str, String)], body: &[u8]) -> Action {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(e) = hostcalls::send_http_response(status, hs, Some(body)) {
            log(
                LogLevel::Error,
                &format!("aex: cannot send local response: {e:?}"),
            );
        }
        self.stage = Stage::Idle;
        Action::Pause
    }

    /// Refuses the request; `report` = the denial is not yet in the audit log.
    fn deny(&mut self, d: Denial, agent_id: &str, model: &str, report: bool) -> Action {
        if report {
            self.report_denial(&d, agent_id, model);
        }
        let mut headers = d.headers();
        // The id the audit log records the refusal under; SDKs show it as the error's request id.
        if !self.request_id.is_empty() {
            headers.push(("x-request-id", self.request_id.clone()));
            headers.push((AUDIT_ID_HEADER, self.request_id.clone()));
        }
        self.respond(d.code.status(), headers, d.body())
    }

    /// Queues the denial for the audit log.
    fn report_denial(&self, d: &Denial, agent_id: &str, model: &str) {
        // Client text: bounded here to keep reports small; the control plane bounds and
        // redacts it again before it reaches the audit log.
        self.shared.deny(pb::Denial {
            request_id: self.request_id.clone(),
            agent_id: agent_id.to_string(),
            code: d.code.as_str().to_string(),
            message: errors::clip(&d.message, errors::MAX_MESSAGE).into_owned(),
            model: errors::quoted(model).into_owned(),
            path: errors::reported_path(&self.req.path).into_owned(),
        });
    }

    /// [`Self::deny`] for a denial that names its own agent and model.
    fn deny_named(&mut self, d: Denial, report: bool) -> Action {
        let (agent_id, model) = (d.agent_id.clone(), d.model.clone());
        self.deny(d, &agent_id, &model, report)
    }

    fn json_response(&mut self, v: serde_json::Value) -> Action {
        self.respond(
            200,
            vec![("content-type", "application/json".into())],
            v.to_string().into_bytes(),
        )
    }

    fn models_response(
        &mut self,
        index: &crate::state::Index,
        agent: &crate::state::AgentEntry,
        only: Option<&str>,
    ) -> Action {
        let model_json = |m: &pb::Model| serde_json::json!({ "id": m.name, "object": "model", "created": 0, "owned_by": m.provider });
        let models = index.visible_models(agent);
        match only {
            None => {
                let data: Vec<_> = models.iter().map(|m| model_json(m)).collect();
                self.json_response(serde_json::json!({ "object": "list", "data": data }))
            }
            Some(id) => match models.iter().find(|m| m.name == id) {
                Some(m) => self.json_response(model_json(m)),
                None => {
                    let d = Denial::new(
                        Code::ModelNotAllowed,
                        format!(
                            "The model '{}' does not exist or is not allowed for this agent.",
                            errors::quoted(id)
                        ),
                    );
                    let mut d = d;
                    d.code = Code::ModelNotAllowed;
                    self.deny(d, &agent.policy.agent_id, id, true)
                }
            },
        }
    }

    fn on_body_complete(
        &mut self,
        endpoint: Endpoint,
        agent_id: String,
        token_sha256: String,
        body_size: usize,
    ) -> Action {
        let Some(index) = self.shared.index() else {
            return self.deny(
                Denial::new(
                    Code::GovernanceUnavailable,
                    "AEX governance is not available (no policy from the control plane).",
                ),
                &agent_id,
                "",
                true,
            );
        };
        let Some(agent) = index.agent_by_token_hash(&token_sha256) else {
            // Rotated or deleted while the body was in flight.
            return self.deny(
                Denial::new(Code::InvalidApiKey, "Incorrect API key provided."),
                &agent_id,
                "",
                true,
            );
        };
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let plan = match decide::plan(
            &index,
            agent,
            &token_sha256,
            endpoint,
            &body,
            self.req.passthrough_key.is_some(),
        ) {
            Ok(p) => p,
            Err(d) => {
                let model = d.model.clone();
                if d.code == Code::ModelNotAllowed && !index.models.contains_key(&model) {
                    // Perhaps added by `aex models reload` a moment ago: fetch the newest
                    // policy once, then decide this body again.
                    self.body_ready = Some(body_size);
                    let d = Denial { agent_id, ..d };
                    let unreachable = Some(Box::new(d.clone()));
                    return self.resync(false, d, true, unreachable);
                }
                return self.deny(d, &agent_id, &model, true);
            }
        };
        let now = now_ms();
        let epoch = index.lease_epoch(&plan.agent_id).unwrap_or(0);
        let bound = decide::lease_bound(&plan, agent);
        self.shared
            .leases
            .borrow_mut()
            .note_request(&plan.agent_id, now);
        if let Some(worst) = bound.filter(|_| self.shared.leases_usable(now)) {
            let admitted = self
                .shared
                .leases
                .borrow_mut()
                .admit(&plan.agent_id, epoch, worst, now);
            if let Some(lease_id) = admitted {
                return self.admit_leased(Box::new(plan), &body, lease_id, worst, epoch, now);
            }
        }
        if let Some(worst) = bound {
            self.top_up_leases(&plan, epoch, worst, now);
        }
        let carried = self.shared.unreported_settlements(&plan.agent_id);
        let req = decide::authorize_request(&plan, &self.request_id, carried);
        match self.shared.grpc("Authorize", &req.encode_to_vec()) {
            Some(token) => {
                self.stage = Stage::Authorizing {
                    token,
                    plan: Box::new(plan),
                    body_len: body.len(),
                };
                Action::Pause
            }
            None => self.deny(unavailable(), &agent_id, &plan.classified.model, true),
        }
    }

    /// Asks the root context for a lease when the agent's run low (or it has none), so its next
    /// requests need no round trip. Only the root asks: its call cannot die with this request
    /// and lose a granted lease.
    fn top_up_leases(&self, plan: &Plan, epoch: u64, worst: u64, now: u64) {
        let want = self
            .shared
            .leases
            .borrow_mut()
            .want(&plan.agent_id, epoch, worst, now);
        if let Some(w) = want {
            self.shared
                .want_lease(&plan.agent_id, &plan.token_sha256, w);
        }
    }

    /// Forwards a request admitted under a lease, with no round trip; reports the admission and
    /// asks the root context for a top-up when the agent's leases run low.
    fn admit_leased(
        &mut self,
        plan: Box<Plan>,
        body: &[u8],
        lease_id: String,
        worst: u64,
        epoch: u64,
        now: u64,
    ) -> Action {
        self.shared.admitted(pb::LeasedAdmission {
            request_id: self.request_id.clone(),
            agent_id: plan.agent_id.clone(),
            lease_id: lease_id.clone(),
            model: plan.classified.model.clone(),
            stream: plan.classified.stream,
            input_token_bound: plan.input_bound,
            reserved_micros: worst,
            output_cap_total: decide::output_cap_total(&plan, 0),
        });
        self.top_up_leases(&plan, epoch, worst, now);
        if self.forward(plan, body, 0, Some((lease_id, worst))) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_authorized(&mut self, plan: Box<Plan>, body_len: usize, resp: pb::AuthorizeResponse) {
        if resp.decision != pb::Decision::Allow as i32 {
            let mut d = Denial::new(Code::parse(&resp.deny_code), resp.deny_message.clone());
            if d.code == Code::RateLimitExceeded {
                let on_tokens = resp.rpm_limit == 0 && resp.tpm_limit > 0;
                d.rate_limit = Some(RateLimited {
                    retry_after_secs: resp.retry_after_secs.max(1),
                    limit: if on_tokens {
                        resp.tpm_limit
                    } else {
                        resp.rpm_limit
                    },
                    tokens_remaining: on_tokens.then_some(resp.tpm_remaining),
                });
            }
            // The control plane has already audited its own denials.
            self.deny(d, &plan.agent_id, &plan.classified.model, false);
            return;
        }
        let clamp = resp.clamp_output_tokens;
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_len)
            .ok()
            .flatten()
            .unwrap_or_default();
        if self.forward(plan, &body, clamp, None) {
            if let Err(e) = hostcalls::resume_http_request() {
                log(
                    LogLevel::Error,
                    &format!("aex: cannot resume request: {e:?}"),
                );
            }
        }
    }

    /// Releases what was held for a request that will not be forwarded after all.
    fn release(&mut self, plan: &Plan, lease: Option<(String, u64)>, outcome: &str) {
        let mut s = pb::Settlement {
            request_id: self.request_id.clone(),
            agent_id: plan.agent_id.clone(),
            release: true,
            outcome: outcome.into(),
            model: plan.classified.model.clone(),
            ..Default::default()
        };
        if let Some((lease_id, worst)) = lease {
            self.shared
                .leases
                .borrow_mut()
                .settle(&plan.agent_id, &lease_id, worst, 0, now_ms());
            s.lease_id = lease_id;
            s.reserved_micros = worst;
        }
        self.shared.settle(s);
    }

    /// Applies the governance edits and routes the request upstream; false if it was refused
    /// instead (a body edit failed). The caller resumes or continues the request.
    fn forward(
        &mut self,
        plan: Box<Plan>,
        body: &[u8],
        clamp: u64,
        lease: Option<(String, u64)>,
    ) -> bool {
        match decide::rewrite_body(&plan, body, clamp) {
            Ok(Some(new_body)) => {
                if let Err(e) =
                    hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body.len(), &new_body)
                {
                    log(LogLevel::Error, &format!("aex: cannot rewrite body: {e:?}"));
                }
                set_header("content-length", Some(&new_body.len().to_string()));
            }
            Ok(None) => {}
            Err(d) => {
                self.release(&plan, lease, "not_forwarded");
                self.deny(d, &plan.agent_id, &plan.classified.model, true);
                return false;
            }
        }
        let key = self
            .req
            .passthrough_key
            .clone()
            .unwrap_or_else(|| plan.provider.api_key.clone());
        let key_header = match plan.provider.api_key_header.as_str() {
            "" | "authorization" => None,
            other => Some(other),
        };
        if key.is_empty() || key_header.is_some() {
            set_header("authorization", None);
        } else {
            set_header("authorization", Some(&format!("Bearer {key}")));
        }
        // Only edits that change something: each one is a host call, and a request-header edit
        // makes Envoy pick the route again.
        if self.req.has_passthrough {
            set_header(RequestHeaders::PASSTHROUGH, None);
        }
        for name in self.req.credentials_to_remove() {
            set_header(name, None);
        }
        // After the client's credentials are gone: the provider's header may be one of them. It
        // is set, or without a key removed: never a value the client sent.
        if let Some(h) = key_header {
            set_header(h, (!key.is_empty()).then_some(key.as_str()));
        }
        // Usage must be readable: never let the provider compress. A request without
        // accept-encoding accepts any coding (RFC 9110 §12.5.3), so ask for identity explicitly.
        match (self.req.accept_encodings, self.req.accepts_identity) {
            (1, true) => {}
            (0 | 1, _) => set_header("accept-encoding", Some("identity")),
            _ => {
                set_header("accept-encoding", None);
                set_header("accept-encoding", Some("identity"));
            }
        }
        let path = decide::upstream_path(&plan.provider, plan.endpoint, &self.req.path);
        if path != self.req.path {
            set_header(":path", Some(&path));
        }
        if !plan.provider.authority.is_empty() && plan.provider.authority != self.req.authority {
            set_header(":authority", Some(&plan.provider.authority));
        }
        // Route choice last: setting request headers makes Envoy re-pick the route.
        set_header(RequestHeaders::UPSTREAM, Some(&plan.provider.cluster));
        self.stage = Stage::Forwarded { plan, clamp, lease };
        true
    }

    fn finish(&mut self) {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Forwarded { plan, clamp, lease } => {
                let mut s = decide::settlement(&plan, &self.request_id, clamp, &self.outcome);
                if let Some((lease_id, worst)) = lease {
                    let cost = decide::settlement_cost(&plan, &s);
                    self.shared.leases.borrow_mut().settle(
                        &plan.agent_id,
                        &lease_id,
                        worst,
                        cost,
                        now_ms(),
                    );
                    s.lease_id = lease_id;
                    s.reserved_micros = worst;
                }
                self.shared.settle(s);
            }
            // Envoy answered while the filter held the body: past its buffer limit
            // (max_body_bytes + 1 MiB) it refuses with 413 itself, before the filter saw the
            // chunk that crossed the limit (a large chunk of a chunked upload, or any body while
            // the token is looked up). The refusal is still AEX's to record.
            stage @ (Stage::AwaitBody { .. } | Stage::Resync { .. })
                if response_code() == Some(413) =>
            {
                let agent_id = match &stage {
                    Stage::AwaitBody { agent_id, .. } => agent_id.clone(),
                    _ => String::new(),
                };
                self.report_denial(&too_large(self.max_body_bytes()), &agent_id, "");
            }
            Stage::Authorizing { plan, .. } => {
                // The client left while the control plane was reserving: release whatever it reserved.
                self.shared.settle(pb::Settlement {
                    request_id: self.request_id.clone(),
                    agent_id: plan.agent_id.clone(),
                    release: true,
                    outcome: "client_gone_before_forward".into(),
                    ..Default::default()
                });
            }
            _ => {}
        }
    }
    /// Fetches the newest policy once and re-runs the header checks; `fallback` is the answer if
    /// that already happened or the call cannot be made, `unreachable` if the call fails (None:
    /// 503, the request may be fine).
    fn resync(
        &mut self,
        end_of_stream: bool,
        fallback: Denial,
        report: bool,
        unreachable: Option<Box<Denial>>,
    ) -> Action {
        if self.resynced {
            return self.deny_named(fallback, report);
        }
        self.resynced = true;
        let req = self.shared.sync_request();
        match self.shared.grpc("Sync", &req.encode_to_vec()) {
            Some(token) => {
                self.stage = Stage::Resync {
                    token,
                    end_of_stream,
                    unreachable,
                };
                Action::Pause
            }
            None => self.deny_named(fallback, report),
        }
    }

    /// [`Self::resync`] for a token this worker does not know (or before its first policy).
    /// While the policy is fetched Envoy holds the body without showing it to the filter, and
    /// past its buffer limit answers with its own plain-text 413: a body declared too large is
    /// refused now. Its agent is not known yet (its token is what would be looked up), so the
    /// denial names none.
    fn resync_token(&mut self, route: &Route, end_of_stream: bool, fallback: Denial) -> Action {
        if let Some(max) = self.declared_too_large(route) {
            return self.deny(too_large(max), "", "", true);
        }
        self.resync(end_of_stream, fallback, true, None)
    }

    /// Headers of a `/v1/` request: refuse unknown paths, authenticate, then answer locally,
    /// or hold the request for its body.
    fn on_headers(&mut self, end_of_stream: bool) -> Action {
        let route = classify::route(&self.req.method, &self.req.path);
        if route == Route::Unknown {
            let method = &self.req.method;
            let d = Denial::new(Code::UnknownEndpoint, format!("Unknown endpoint: {} {}. AEX serves POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, POST /v1/responses, GET /v1/models and GET /v1/aex/usage.", errors::quoted(method), errors::reported_path(&self.req.path)));
            return self.deny(d, "", "", true);
        }
        let Some(index) = self.shared.index() else {
            // This worker has not received its first policy yet (Envoy just started): fetch it
            // now rather than refuse.
            let d = Denial::new(
                Code::GovernanceUnavailable,
                "AEX governance is not available yet (no policy from the control plane).",
            );
            return self.resync_token(&route, end_of_stream, d);
        };
        let (agent, token_sha256) =
            match decide::authenticate(&index, self.req.authorization.as_deref(), now_s()) {
                Ok(a) => a,
                Err(d) if d.code == Code::InvalidApiKey => {
                    return self.resync_token(&route, end_of_stream, d)
                }
                Err(d) => {
                    let who = d.agent_id.clone();
                    return self.deny(d, &who, "", true);
                }
            };
        let agent_id = agent.policy.agent_id.clone();
        match route {
            Route::ListModels => self.models_response(&index, agent, None),
            Route::GetModel(id) => self.models_response(&index, agent, Some(&id)),
            Route::Usage => {
                let req = pb::UsageRequest {
                    agent_id,
                    token_sha256,
                };
                match self.shared.grpc("Usage", &req.encode_to_vec()) {
                    Some(token) => {
                        self.stage = Stage::Usage { token };
                        Action::Pause
                    }
                    None => self.deny(unavailable(), "", "", true),
                }
            }
            Route::Governed(endpoint) => {
                if let Some(max) = self.declared_too_large(&route) {
                    return self.deny(too_large(max), &agent_id, "", true);
                }
                if end_of_stream {
                    return self.deny(
                        Denial::new(
                            Code::InvalidJson,
                            "The request body is empty; expected a JSON object.",
                        ),
                        &agent_id,
                        "",
                        true,
                    );
                }
                self.stage = Stage::AwaitBody {
                    endpoint,
                    agent_id,
                    token_sha256,
                };
                Action::Pause
            }
            Route::Unknown | Route::NotGoverned => Action::Continue,
        }
    }

    /// The number of choices a forwarded request asked for.
    fn choices(&self) -> u64 {
        match &self.stage {
            Stage::Forwarded { plan, .. } => plan.classified.choices,
            _ => 1,
        }
    }

    /// The limit, when a governed request declares a body (Content-Length) above it.
    fn declared_too_large(&self, route: &Route) -> Option<u64> {
        if !matches!(route, Route::Governed(_)) {
            return None;
        }
        let max = self.max_body_bytes();
        let declared = self
            .req
            .content_length
            .as_deref()?
            .trim()
            .parse::<u64>()
            .ok()?;
        (declared > max).then_some(max)
    }

    /// The body size limit: the filter's configuration, lowered by the control plane's policy.
    fn max_body_bytes(&self) -> u64 {
        let config = self.shared.config.borrow().max_body_bytes;
        match self.shared.index() {
            Some(index) if index.max_body_bytes > 0 => config.min(index.max_body_bytes),
            _ => config,
        }
    }

    fn on_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Stage::AwaitBody { agent_id, .. } = &self.stage else {
            return Action::Continue;
        };
        let max = self.max_body_bytes();
        if body_size as u64 > max {
            let agent_id = agent_id.clone();
            return self.deny(too_large(max), &agent_id, "", true);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::AwaitBody {
                endpoint,
                agent_id,
                token_sha256,
            } => self.on_body_complete(endpoint, agent_id, token_sha256, body_size),
            other => {
                self.stage = other;
                Action::Continue
            }
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let body = || {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::Authorizing {
                token,
                plan,
                body_len,
            } if token == token_id => {
                let decoded = if status_code == 0 {
                    pb::AuthorizeResponse::decode(body().as_slice()).ok()
                } else {
                    None
                };
                self.shared.cp_answered(decoded.is_some());
                match decoded {
                    Some(resp) => self.on_authorized(plan, body_len, resp),
                    None => {
                        // The control plane may have reserved before failing to answer.
                        self.shared.settle(pb::Settlement {
                            request_id: self.request_id.clone(),
                            agent_id: plan.agent_id.clone(),
                            release: true,
                            outcome: "authorize_failed".into(),
                            ..Default::default()
                        });
                        let d = unavailable();
                        self.deny(d, &plan.agent_id, &plan.classified.model, true);
                    }
                }
            }
            Stage::Usage { token } if token == token_id => {
                let decoded = if status_code == 0 {
                    pb::UsageResponse::decode(body().as_slice()).ok()
                } else {
                    None
                };
                match decoded.and_then(|r| r.agent) {
                    Some(a) => {
                        let remaining = a
                            .budget_micros
                            .saturating_sub(a.spent_micros.saturating_add(a.reserved_micros));
                        let _ = self.json_response(serde_json::json!({
                            "object": "aex.usage", "agent": a.name,
                            "budget_micros": a.budget_micros, "spent_micros": a.spent_micros,
                            "reserved_micros": a.reserved_micros, "remaining_micros": remaining,
                            "rpm": a.rpm, "token_expires_at": if a.token_expires_at == 0 { serde_json::Value::Null } else { a.token_expires_at.into() },
                        }));
                    }
                    None => {
                        let _ = self.deny(unavailable(), "", "", true);
                    }
                }
            }
            Stage::Resync {
                token,
                end_of_stream,
                unreachable,
            } if token == token_id => {
                let fresh = if status_code == 0 {
                    pb::SyncResponse::decode(body().as_slice()).ok()
                } else {
                    None
                };
                let Some(resp) = fresh else {
                    // Neither allowed nor refused: the control plane could not be asked.
                    let _ = self.deny_named(unreachable.map_or_else(unavailable, |d| *d), true);
                    return;
                };
                self.shared.apply_sync(resp);
                let action = self.on_headers(end_of_stream);
                let action = match (action, self.body_ready.take()) {
                    (Action::Pause, Some(size))
                        if matches!(self.stage, Stage::AwaitBody { .. }) =>
                    {
                        self.on_body(size, true)
                    }
                    (a, _) => a,
                };
                if matches!(action, Action::Continue) {
                    let _ = hostcalls::resume_http_request();
                }
            }
            other => self.stage = other,
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.request_ended = end_of_stream;
        // One host call for every header the filter reads.
        self.req = RequestHeaders::from_map(&super::header_map(MapType::HttpRequestHeaders));
        // Only the filter chooses upstreams.
        if self.req.has_upstream {
            set_header(RequestHeaders::UPSTREAM, None);
        }
        if classify::route(&self.req.method, &self.req.path) == Route::NotGoverned {
            return Action::Continue;
        }
        self.request_id = self.shared.next_request_id();
        self.on_headers(end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_ended |= end_of_stream;
        if let Stage::Refusing { .. } = &self.stage {
            return self.on_refusing_body(body_size, end_of_stream);
        }
        if let Stage::Resync { .. } = &self.stage {
            // Envoy keeps buffering while the policy is fetched, and past its buffer limit would
            // answer with its own plain-text 413 that no one audits. The agent is not known yet
            // (its token is what is being looked up), so the denial names none.
            let max = self.max_body_bytes();
            if body_size as u64 > max {
                return self.deny(too_large(max), "", "", true);
            }
            if end_of_stream {
                self.body_ready = Some(body_size);
            }
            return Action::Pause;
        }
        self.on_body(body_size, end_of_stream)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.request_ended = true;
        if let Stage::Refusing { .. } = &self.stage {
            return self.on_refusing_body(0, true);
        }
        // Trailers end a request whose body never came with end-of-stream: the body was not
        // classified, so nothing may be forwarded. No OpenAI client sends request trailers.
        let agent_id = match &self.stage {
            Stage::AwaitBody { agent_id, .. } => agent_id.clone(),
            Stage::Resync { .. } => String::new(),
            _ => return Action::Continue,
        };
        let d = Denial::new(
            Code::InvalidRequest,
            "Request trailers are not supported: send the JSON body without trailers.",
        );
        self.deny(d, &agent_id, "", true)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Stage::Forwarded { plan, .. } = &self.stage else {
            return Action::Continue;
        };
        let h = ResponseHeaders::from_map(&super::header_map(MapType::HttpResponseHeaders));
        // The provider's `x-request-id` passes unchanged: the client finds the request in the
        // audit log by this one.
        let _ = hostcalls::set_map_value(
            MapType::HttpResponseHeaders,
            AUDIT_ID_HEADER,
            Some(&self.request_id),
        );
        if h.status == Some(503) && !h.request_id && !from_upstream() {
            // Envoy's own answer (the provider could not be reached): the id the settlement is
            // recorded under, as on the filter's refusals. A provider's answers pass unchanged.
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "x-request-id",
                Some(&self.request_id),
            );
        }
        self.outcome.upstream_status = h.status;
        self.outcome.encoded = h.encoded;
        // The usage chunk the gateway asked for can only be removed from a body of no fixed
        // length, so a success's length goes (Envoy frames the body instead); an error keeps
        // its length and its body as they came.
        let success = h.status.is_some_and(|s| (200..300).contains(&s));
        let choices = plan.classified.choices;
        if h.is_event_stream() {
            let drop = plan.inject_usage && success;
            self.meter = Some(SseMeter::new(drop).with_choices(choices));
            if drop && h.content_length {
                let _ =
                    hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
            }
        } else if plan.classified.stream {
            // Some servers stream events as text/plain, application/json or unlabelled: the
            // first bytes tell.
            if plan.inject_usage && h.content_length && success {
                let _ =
                    hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
            }
            self.sniff = Some(plan.inject_usage && (success || !h.content_length));
        }
        if end_of_stream {
            self.outcome.complete = true;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.stage, Stage::Forwarded { .. }) {
            return Action::Continue;
        }
        let chunk = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.outcome.response_bytes = self
            .outcome
            .response_bytes
            .saturating_add(chunk.len() as u64);
        if let Some(may_drop) = self.sniff {
            match crate::sse::first_significant_byte(&chunk) {
                None => {}
                Some(b'{' | b'[') => self.sniff = None,
                Some(_) => {
                    self.sniff = None;
                    self.meter = Some(SseMeter::new(may_drop).with_choices(self.choices()));
                }
            }
        }
        if let Some(meter) = self.meter.as_mut() {
            if let Output::Replace(out) = meter.feed(&chunk, end_of_stream) {
                if let Err(e) =
                    hostcalls::set_buffer(BufferType::HttpResponseBody, 0, chunk.len(), &out)
                {
                    log(
                        LogLevel::Error,
                        &format!("aex: cannot rewrite stream chunk: {e:?}"),
                    );
                }
            }
            self.outcome.usage = meter.usage();
            self.outcome.usage_final = meter.usage_is_final();
            self.outcome.error_body = meter.only_errors();
            if end_of_stream {
                self.outcome.complete = true;
            }
        } else {
            self.body.feed(&chunk);
            if end_of_stream {
                let report = std::mem::take(&mut self.body).finish();
                self.outcome.usage = report.usage;
                self.outcome.usage_final = true;
                self.outcome.error_body = report.error;
                // A body cut short ended the HTTP stream all the same (a provider that closed
                // the connection, with no length to tell): the answer did not arrive.
                self.outcome.complete = report.whole;
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // A leased request's settlement goes out with the root context's next report (its tick
        // comes every 20 ms): waking the root from here makes Envoy dispatch that report before
        // it writes this response to the client (measured: +90 µs on a lone request). A
        // reservation's settlement wakes it all the same (`Shared::settle`): until the control
        // plane hears of it, the agent's next request — an agent loop sends it milliseconds
        // later — would find its budget still holding this one's worst case.
        self.finish();
    }
}
