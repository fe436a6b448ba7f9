//! proxy-wasm glue: the root context (configuration, policy sync, report batching) and the HTTP
//! context ([`http`]). Only this module touches Envoy; every decision is made in the host-tested
//! modules of the crate.

mod http;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

use aex_proto::v1 as pb;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::lease::Book;
use crate::state::Index;

#[allow(unsafe_code)]
mod entry {
    // The SDK's entry point: `_initialize` registers the root context factory.
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(super::Root::new()));
    }}
}

/// The one raw host call the SDK has no panic-free wrapper for.
#[allow(unsafe_code)]
mod abi {
    use proxy_wasm::types::{MapType, Status};

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(
            map_type: MapType,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> Status;
    }

    /// A header map, serialized as the ABI hands it over (decoded by [`crate::headers`]).
    pub fn header_map(map_type: MapType) -> Vec<u8> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: on success the host fills `data` with a buffer of `size` bytes it allocated
        // through this module's `proxy_on_memory_allocate` (a boxed byte slice of exactly that
        // length, as the SDK's own getters assume); ownership passes to us.
        unsafe {
            match proxy_get_header_map_pairs(map_type, &mut data, &mut size) {
                Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
                _ => Vec::new(),
            }
        }
    }
}

/// A request or response header map, read in one host call as bytes (never panicking on them);
/// decoded by [`crate::headers`].
pub use abi::header_map;

pub const SERVICE: &str = "aex.v1.FilterService";
pub const FILTER_KEY_HEADER: &str = "x-aex-filter-key";
/// Sync polling, lease returns and reports: a finished request's settlement goes out on the next
/// tick (requests do not wake the root for it: Envoy would run the report before writing the
/// response to the client).
const TICK: Duration = Duration::from_millis(20);
/// Reports go out at most this often per worker (one call carries every admission, settlement
/// and denial queued since), unless a full batch is waiting: an idle agent's request is settled
/// within a tick, a busy one's in batches, never one call per request.
const REPORT_INTERVAL_MS: u64 = 50;
const MAX_QUEUED_SETTLEMENTS: usize = 200_000;
const MAX_QUEUED_DENIALS: usize = 20_000;
const REPORT_BATCH: usize = 500;
/// Settlements an Authorize carries at most (an agent loop has one or two unreported).
const CARRIED_SETTLEMENTS: usize = 16;
/// Requests are admitted under leases only while the control plane answered within this long
/// (the policy sync runs every 200 ms) and the last call to it did not fail.
const CP_FRESH_MS: u64 = 1_000;
/// Unsent admissions beyond this: stop admitting under leases until the backlog drains.
const MAX_QUEUED_ADMISSIONS: usize = 50_000;

/// The plugin configuration rendered by the control plane.
#[derive(Debug, Clone)]
pub struct FilterConfig {
    pub cluster: String,
    pub filter_key: String,
    pub sync_interval_ms: u64,
    pub grpc_timeout: Duration,
    pub max_body_bytes: u64,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            cluster: "aex_control_plane".into(),
            filter_key: String::new(),
            sync_interval_ms: 200,
            grpc_timeout: Duration::from_secs(5),
            max_body_bytes: 8 << 20,
        }
    }
}

impl FilterConfig {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let d = FilterConfig::default();
        Some(FilterConfig {
            cluster: v
                .get("control_plane_cluster")
                .and_then(|x| x.as_str())
                .map_or(d.cluster, str::to_string),
            // From Envoy's environment (see `aex_proto::FILTER_KEY_ENV`); a config rendered by an
            // older control plane still carries it.
            filter_key: std::env::var(aex_proto::FILTER_KEY_ENV)
                .ok()
                .or_else(|| Some(v.get("filter_key")?.as_str()?.to_string()))
                .filter(|k| !k.is_empty())?,
            sync_interval_ms: v
                .get("sync_interval_ms")
                .and_then(|x| x.as_u64())
                .unwrap_or(d.sync_interval_ms)
                .max(50),
            grpc_timeout: Duration::from_millis(
                v.get("grpc_timeout_ms")
                    .and_then(|x| x.as_u64())
                    .unwrap_or(5000),
            ),
            max_body_bytes: v
                .get("max_body_bytes")
                .and_then(|x| x.as_u64())
                .unwrap_or(d.max_body_bytes),
        })
    }
}

/// Reports waiting to reach the control plane. Settlements outlive the request that made them:
/// the root context sends them, so a finished request never cancels its own accounting.
#[derive(Default)]
pub struct Reports {
    admissions: VecDeque<pb::LeasedAdmission>,
    settlements: VecDeque<pb::Settlement>,
    denials: VecDeque<pb::Denial>,
    returns: VecDeque<pb::LeaseReturn>,
}

impl Reports {
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        self.admissions.len() + self.settlements.len() + self.denials.len() + self.returns.len()
    }

    /// The next batch. The control plane applies admissions, settlements, denials and returns in
    /// that order, so a kind is only taken once every earlier kind is drained into the batch: a
    /// settlement never reaches it before its admission, nor a return before its settlements.
    fn take_batch(&mut self) -> pb::ReportRequest {
        let mut b = pb::ReportRequest::default();
        let n = self.admissions.len().min(REPORT_BATCH);
        b.admissions = self.admissions.drain(..n).collect();
        if self.admissions.is_empty() {
            let n = self.settlements.len().min(REPORT_BATCH);
            b.settlements = self.settlements.drain(..n).collect();
        }
        let n = self.denials.len().min(REPORT_BATCH);
        b.denials = self.denials.drain(..n).collect();
        if self.admissions.is_empty() && self.settlements.is_empty() {
            b.returns = self.returns.drain(..).collect();
        }
        b
    }
}

/// State shared by the root context and every HTTP context of this VM (one per worker).
pub struct Shared {
    pub config: RefCell<FilterConfig>,
    pub index: RefCell<Option<Rc<Index>>>,
    pub reports: RefCell<Reports>,
    seed: u64,
    counter: Cell<u64>,
    /// This worker's wake-up queue: a request that queued a settlement pokes it, and the root
    /// context (which alone sends reports, so no report dies with its request) flushes at once.
    wakeup_queue: Cell<Option<u32>>,
    /// The Report call in flight (at most one per worker) and its batch, re-queued on failure.
    report_call: RefCell<Option<(u32, pb::ReportRequest)>>,
    /// When the last Report was sent (unix ms).
    last_report_ms: Cell<u64>,
    /// A settlement of a reservation the control plane holds is queued: report it now, not at
    /// the next interval, since until then the agent's budget (and token minute) still count
    /// the request's worst case and its next request, a moment later, could be refused.
    urgent: Cell<bool>,
    pub leases: RefCell<Book>,
    /// Lease top-ups for the root context to request: (agent id, token hash, want).
    lease_wants: RefCell<Vec<(String, String, pb::LeaseWant)>>,
    /// Lease calls in flight: token → (agent id, lease id).
    lease_calls: RefCell<std::collections::HashMap<u32, (String, String)>>,
    /// Unix ms of the last answer from the control plane, and whether a call failed since.
    cp_ok_ms: Cell<u64>,
    cp_failed: Cell<bool>,
}

impl Shared {
    pub fn index(&self) -> Option<Rc<Index>> {
        self.index.borrow().clone()
    }

    /// A request id unique across workers and restarts: random VM seed + counter.
    pub fn next_request_id(&self) -> String {
        self.next_id("req_")
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        format!("{prefix}{:016x}{:x}", self.seed, n)
    }

    pub fn settle(&self, s: pb::Settlement) {
        let mut r = self.reports.borrow_mut();
        if r.settlements.len() >= MAX_QUEUED_SETTLEMENTS {
            // Unreported reservations are charged in full on expiry; never silently lost. A
            // lease is too, provided it is never returned (a return would release this cost).
            if !s.lease_id.is_empty() {
                self.leases.borrow_mut().forfeit(&s.agent_id, &s.lease_id);
            }
            log(
                LogLevel::Error,
                "settlement queue full: control plane unreachable for too long",
            );
            return;
        }
        // Under a lease the worker refunded the credit itself; a reservation is freed only
        // when the control plane hears of it.
        let urgent = s.lease_id.is_empty();
        r.settlements.push_back(s);
        drop(r);
        if urgent {
            self.urgent.set(true);
            self.wake_root();
        }
    }

    /// This worker's settlements of `agent_id`'s reservations that no Report has delivered yet
    /// (queued, or in the Report in flight), for its next Authorize to carry: the control plane
    /// applies them before deciding (at most [`CARRIED_SETTLEMENTS`]; the rest follow by Report).
    pub fn unreported_settlements(&self, agent_id: &str) -> Vec<pb::Settlement> {
        let in_flight = self.report_call.borrow();
        let reports = self.reports.borrow();
        in_flight
            .iter()
            .flat_map(|(_, batch)| batch.settlements.iter())
            .chain(reports.settlements.iter())
            .filter(|s| s.lease_id.is_empty() && s.agent_id == agent_id)
            .take(CARRIED_SETTLEMENTS)
            .cloned()
            .collect()
    }

    /// Records how the last call to the control plane went.
    pub fn cp_answered(&self, ok: bool) {
        if ok {
            self.cp_ok_ms.set(now_ms());
        }
        self.cp_failed.set(!ok);
    }

    /// Whether requests may be admitted under leases now: the control plane is reachable, so the
    /// admissions reach its rate window promptly.
    pub fn leases_usable(&self, now: u64) -> bool {
        !self.cp_failed.get()
            && now.saturating_sub(self.cp_ok_ms.get()) <= CP_FRESH_MS
            && self.reports.borrow().admissions.len() < MAX_QUEUED_ADMISSIONS
    }

    pub fn admitted(&self, a: pb::LeasedAdmission) {
        self.reports.borrow_mut().admissions.push_back(a);
    }

    /// Queues a lease top-up for the root context to request.
    pub fn want_lease(&self, agent_id: &str, token_sha256: &str, want: pb::LeaseWant) {
        self.lease_wants
            .borrow_mut()
            .push((agent_id.to_string(), token_sha256.to_string(), want));
        self.wake_root();
    }

    /// Asks the root context to request a lease at once (and flush the reports if one is due).
    fn wake_root(&self) {
        let lease = !self.lease_wants.borrow().is_empty();
        if !lease && !self.report_due() {
            return;
        }
        if let Some(q) = self.wakeup_queue.get() {
            let _ = hostcalls::enqueue_shared_queue(q, Some(b"!"));
        }
    }

    /// Whether a Report should go out now: something is queued, none is in flight, and either
    /// the interval passed or a full batch waits.
    fn report_due(&self) -> bool {
        if self.report_call.borrow().is_some() {
            return false;
        }
        let queued = self.reports.borrow().len();
        queued > 0
            && (self.urgent.get()
                || queued >= REPORT_BATCH
                || now_ms().saturating_sub(self.last_report_ms.get()) >= REPORT_INTERVAL_MS)
    }

    /// Sends queued reports when due (else the tick or the in-flight call's completion will).
    /// Only the root context calls this.
    fn flush(&self) {
        if !self.report_due() {
            return;
        }
        self.last_report_ms.set(now_ms());
        self.urgent.set(false);
        // The request itself is kept (not a copy) to re-queue if the call fails.
        let req = {
            let mut r = self.reports.borrow_mut();
            if r.is_empty() {
                return;
            }
            r.take_batch()
        };
        match self.grpc("Report", &req.encode_to_vec()) {
            Some(t) => *self.report_call.borrow_mut() = Some((t, req)),
            None => self.requeue(req),
        }
    }

    fn requeue(&self, batch: pb::ReportRequest) {
        let mut r = self.reports.borrow_mut();
        for a in batch.admissions.into_iter().rev() {
            r.admissions.push_front(a);
        }
        for l in batch.returns.into_iter().rev() {
            r.returns.push_front(l);
        }
        for s in batch.settlements.into_iter().rev() {
            r.settlements.push_front(s);
        }
        for d in batch.denials.into_iter().rev() {
            r.denials.push_front(d);
        }
    }

    /// Dispatches a FilterService call as the current (effective) context.
    pub fn grpc(&self, method: &str, msg: &[u8]) -> Option<u32> {
        let cfg = self.config.borrow();
        let md = vec![(FILTER_KEY_HEADER, cfg.filter_key.as_bytes())];
        match hostcalls::dispatch_grpc_call(
            &cfg.cluster,
            SERVICE,
            method,
            md,
            Some(msg),
            cfg.grpc_timeout,
        ) {
            Ok(t) => Some(t),
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("aex: dispatching {method} failed: {e:?}"),
                );
                None
            }
        }
    }

    pub fn deny(&self, d: pb::Denial) {
        let mut r = self.reports.borrow_mut();
        if r.denials.len() >= MAX_QUEUED_DENIALS {
            r.denials.pop_front();
        }
        r.denials.push_back(d);
    }
}

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

impl Shared {
    /// Sends the queued lease requests (root context only: a call made from a request context
    /// would die with its request).
    fn request_leases(&self) {
        let wants = std::mem::take(&mut *self.lease_wants.borrow_mut());
        for (agent_id, token_sha256, want) in wants {
            let req = pb::LeaseRequest {
                agent_id: agent_id.clone(),
                token_sha256,
                want: Some(want),
                lease_id: self.next_id("lease_"),
            };
            match self.grpc("Lease", &req.encode_to_vec()) {
                Some(t) => {
                    self.lease_calls
                        .borrow_mut()
                        .insert(t, (agent_id, req.lease_id));
                }
                None => self.leases.borrow_mut().failed(&agent_id),
            }
        }
    }

    /// Queues the leases this worker is done with and drops void ones after a policy change.
    fn return_leases(&self) {
        let returns = self.leases.borrow_mut().take_returns(now_ms());
        if !returns.is_empty() {
            self.reports.borrow_mut().returns.extend(returns);
        }
    }

    /// A new policy snapshot: leases of changed or deleted agents are void at once.
    pub fn set_index(&self, index: Index) {
        self.leases
            .borrow_mut()
            .void_stale(|id| index.lease_epoch(id));
        *self.index.borrow_mut() = Some(Rc::new(index));
    }

    /// The `Sync` request for the policy this worker holds.
    pub fn sync_request(&self) -> pb::SyncRequest {
        let index = self.index.borrow();
        pb::SyncRequest {
            known_version: index.as_ref().map_or(0, |i| i.version),
            known_instance: index.as_ref().map_or(0, |i| i.instance),
            filter_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Applies a `Sync` answer: a snapshot newer than what this worker holds replaces it; a
    /// delta updates it when it covers every change since the version held (else the next sync
    /// asks again). Leases of changed or deleted agents are void at once either way.
    pub fn apply_sync(&self, resp: pb::SyncResponse) {
        if let Some(snap) = resp.snapshot {
            let newer = self
                .index()
                .is_none_or(|i| i.instance != resp.instance || i.version < resp.version);
            if newer {
                let mut index = Index::from_snapshot(resp.version, snap);
                index.instance = resp.instance;
                self.set_index(index);
            }
            return;
        }
        let Some(delta) = resp.delta else {
            return;
        };
        let mut slot = self.index.borrow_mut();
        let Some(index) = slot.as_mut() else {
            return;
        };
        if !index.takes_delta(resp.instance, delta.base_version, resp.version) {
            return;
        }
        // No request holds the index between callbacks, so this is no copy in practice.
        let index = Rc::make_mut(index);
        index.apply_delta(resp.version, delta);
        self.leases
            .borrow_mut()
            .void_stale(|id| index.lease_epoch(id));
    }
}

pub fn now_s() -> i64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub struct Root {
    shared: Rc<Shared>,
    sync_call: Option<u32>,
    last_sync_ms: u64,
}

impl Root {
    fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Root {
            shared: Rc::new(Shared {
                config: RefCell::new(FilterConfig::default()),
                index: RefCell::new(None),
                reports: RefCell::new(Reports::default()),
                seed,
                counter: Cell::new(0),
                wakeup_queue: Cell::new(None),
                report_call: RefCell::new(None),
                last_report_ms: Cell::new(0),
                urgent: Cell::new(false),
                leases: RefCell::new(Book::default()),
                lease_wants: RefCell::new(Vec::new()),
                lease_calls: RefCell::new(Default::default()),
                cp_ok_ms: Cell::new(0),
                cp_failed: Cell::new(false),
            }),
            sync_call: None,
            last_sync_ms: 0,
        }
    }

    fn sync(&mut self) {
        let req = self.shared.sync_request();
        self.sync_call = self.shared.grpc("Sync", &req.encode_to_vec());
        self.last_sync_ms = now_ms();
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let lease_for = self.shared.lease_calls.borrow_mut().remove(&token_id);
        if let Some((agent_id, lease_id)) = lease_for {
            self.shared.cp_answered(status_code == 0);
            let lease = (status_code == 0)
                .then(|| hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size))
                .and_then(|b| b.ok().flatten())
                .and_then(|b| pb::LeaseResponse::decode(b.as_slice()).ok());
            let mut book = self.shared.leases.borrow_mut();
            match lease {
                Some(pb::LeaseResponse { lease: Some(l) }) => book.granted(&agent_id, l, now_ms()),
                Some(_) => book.declined(&agent_id, now_ms()),
                None => {
                    // The control plane may have granted it before the answer was lost: give it
                    // back by id (a return that arrives first voids the id).
                    book.failed(&agent_id);
                    self.shared
                        .reports
                        .borrow_mut()
                        .returns
                        .push_back(pb::LeaseReturn { lease_id, agent_id });
                }
            }
            return;
        }
        if self.sync_call == Some(token_id) {
            self.sync_call = None;
            self.shared.cp_answered(status_code == 0);
            if status_code != 0 {
                log(
                    LogLevel::Warn,
                    &format!("aex: policy sync failed (grpc status {status_code})"),
                );
                return;
            }
            let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            match pb::SyncResponse::decode(body.as_slice()) {
                Ok(resp) => {
                    self.shared.apply_sync(resp);
                }
                Err(e) => log(LogLevel::Error, &format!("aex: bad sync response: {e}")),
            }
        } else {
            let done = self
                .shared
                .report_call
                .borrow()
                .as_ref()
                .is_some_and(|(t, _)| *t == token_id);
            if done {
                self.shared.cp_answered(status_code == 0);
                if let Some((_, batch)) = self.shared.report_call.borrow_mut().take() {
                    if status_code != 0 {
                        self.shared.requeue(batch);
                        return;
                    }
                }
                // A newer policy than this worker holds: fetch it now rather than at the next
                // sync interval (a busy worker reports every 20-50 ms).
                let version =
                    hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                        .ok()
                        .flatten()
                        .and_then(|b| pb::ReportResponse::decode(b.as_slice()).ok())
                        .map_or(0, |r| r.version);
                let known = self.shared.index.borrow().as_ref().map_or(0, |i| i.version);
                if version != 0 && version != known && self.sync_call.is_none() {
                    self.sync();
                }
                // Send on if due: a full batch waits (after an outage) or the interval passed.
                self.shared.flush();
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let Some(cfg) = FilterConfig::parse(&bytes) else {
            log(
                LogLevel::Critical,
                "aex: invalid plugin configuration (needs a JSON object, and the filter key in Envoy's AEX_FILTER_KEY environment variable)",
            );
            return false;
        };
        *self.shared.config.borrow_mut() = cfg;
        match hostcalls::register_shared_queue(&format!("aex_wakeup_{:016x}", self.shared.seed)) {
            Ok(q) => self.shared.wakeup_queue.set(Some(q)),
            Err(e) => log(
                LogLevel::Warn,
                &format!("aex: no wake-up queue ({e:?}); reports go out on the tick"),
            ),
        }
        let _ = hostcalls::set_tick_period(TICK);
        self.sync();
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.shared.request_leases();
        self.shared.flush();
    }

    fn on_tick(&mut self) {
        let interval = self.shared.config.borrow().sync_interval_ms;
        if self.sync_call.is_none() && now_ms().saturating_sub(self.last_sync_ms) >= interval {
            self.sync();
        }
        self.shared.request_leases();
        self.shared.return_leases();
        self.shared.flush();
    }

    fn create_http_context(
        &self,
        context_id: u32,
    ) -> Option<Box<dyn proxy_wasm::traits::HttpContext>> {
        Some(Box::new(http::Http::new(self.shared.clone(), context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
