//! Shared daemon state behind the gRPC and HTTP servers: the ledger under one mutex, the store
//! writer, and the resolved providers. Every ledger mutation goes through [`Core::mutate`] so the
//! durable ops are queued in ledger order, and callers wait for their commit outside the lock.
//! While the database refuses commits nothing new is applied: memory is never further ahead of
//! the disk than the batch the writer is retrying.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use aex_proto::v1 as pb;

use crate::config::Config;
use crate::ledger::Ledger;
use crate::providers::Upstream;
use crate::store::Store;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("the ledger database cannot commit at the moment (locked or failing); retry")]
    StoreFailing,
    #[error("the ledger database writer has stopped")]
    WriterGone,
    #[error("reading the ledger database: {0}")]
    Read(String),
}

pub struct Core {
    ledger: Mutex<Ledger>,
    store: Store,
    pub config: Config,
    pub upstreams: RwLock<Arc<Vec<Upstream>>>,
    pub filter_key: String,
    pub admin_token_sha256: String,
    pub db_path: std::path::PathBuf,
    pub home: crate::home::Home,
    /// Serialises `models reload` (file reads, CDS write, snapshot swap).
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Unix ms of the last Sync from any filter.
    pub last_filter_sync: AtomicI64,
    pub filter_version: RwLock<String>,
    pub authorize_latency: crate::metrics::Histogram,
    /// Dashboard sessions (random ids set as HttpOnly cookies) → expiry unix ms.
    pub sessions: Mutex<std::collections::HashMap<String, i64>>,
}

/// What a worker knows of an agent.
fn agent_policy(a: &crate::ledger::Agent) -> pb::AgentPolicy {
    pb::AgentPolicy {
        agent_id: a.id.clone(),
        name: a.name.clone(),
        token_sha256: a.token_sha256.clone(),
        token_expires_at: a.token_expires_at,
        scope: a.policy.scope.to_pb() as i32,
        allowed_models: a.policy.allowed_models.clone(),
        allow_streaming: a.policy.allow_streaming,
        allow_tools: a.policy.allow_tools,
        allowed_tools: a.policy.allowed_tools.clone(),
        allow_vision: a.policy.allow_vision,
        allow_passthrough: a.policy.allow_passthrough,
        strict: a.policy.strict,
        max_output_tokens: a.policy.max_output_tokens,
        lease_epoch: a.lease_epoch,
    }
}

impl Core {
    pub fn new(
        ledger: Ledger,
        store: Store,
        config: Config,
        upstreams: Vec<Upstream>,
        filter_key: String,
        admin_token_sha256: String,
        home: crate::home::Home,
    ) -> Self {
        Self {
            ledger: Mutex::new(ledger),
            store,
            config,
            upstreams: RwLock::new(Arc::new(upstreams)),
            filter_key,
            admin_token_sha256,
            db_path: home.db(),
            home,
            reload_lock: tokio::sync::Mutex::new(()),
            last_filter_sync: AtomicI64::new(0),
            filter_version: RwLock::new(String::new()),
            authorize_latency: Default::default(),
            sessions: Mutex::new(Default::default()),
        }
    }

    /// Read-only access; never held across an await.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the ledger and waits until the changes it made, and every change before
    /// them, are committed to disk. Refused without running `f` while the writer is retrying a
    /// batch the database refused (a request gets 503 at once instead of a reservation the disk
    /// may never see).
    pub async fn mutate<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> Result<R, CoreError> {
        if self.store.failing() {
            return Err(CoreError::StoreFailing);
        }
        let (r, ack) = {
            let mut l = self.ledger();
            let r = f(&mut l);
            let ops = l.take_ops();
            (r, self.store.submit(ops))
        };
        ack.await.map_err(|_| CoreError::WriterGone)?;
        Ok(r)
    }

    /// Waits until everything applied so far is committed (at shutdown), even while the writer
    /// is retrying.
    pub async fn flush(&self) -> Result<(), CoreError> {
        let ack = {
            let _l = self.ledger();
            self.store.submit(Vec::new())
        };
        ack.await.map_err(|_| CoreError::WriterGone)
    }

    /// Whether the database is refusing commits (health checks report it).
    pub fn store_failing(&self) -> bool {
        self.store.failing()
    }

    /// Of a report's settlements, the ids closed on disk among those that match nothing in
    /// memory (re-sent copies of settlements closed longer ago than memory keeps), read off the
    /// async runtime. Pass them to [`Ledger::remember_closed`] in the `mutate` that applies the
    /// report: a copy is then a duplicate however late it comes, within the disk's retention
    /// ([`Ledger::closed_disk_ms`]).
    pub async fn closed_on_disk(
        &self,
        settlements: &[pb::Settlement],
    ) -> Result<Vec<String>, CoreError> {
        // Ids memory already has closed are returned too: the sweeper may drop them from memory
        // between this check and the report's apply, which must still see them closed.
        let (mut closed, unmatched) = self.ledger().sort_settlements(settlements, now_ms());
        if unmatched.is_empty() {
            return Ok(closed);
        }
        let store = self.store.clone();
        let on_disk = tokio::task::spawn_blocking(move || store.closed_among(&unmatched))
            .await
            .map_err(|e| CoreError::Read(e.to_string()))?
            .map_err(|e| CoreError::Read(e.to_string()))?;
        closed.extend(on_disk);
        Ok(closed)
    }

    pub fn upstreams(&self) -> Arc<Vec<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> (u64, pb::Snapshot) {
        let l = self.ledger();
        let agents = l.agents().map(agent_policy).collect();
        let models = l
            .catalog()
            .models
            .values()
            .map(|m| pb::Model {
                name: m.name.clone(),
                provider: m.provider.clone(),
                upstream_model: m.upstream_model.clone(),
                max_output_tokens: m.max_output_tokens,
                priced: m.prices.is_some(),
                chat_cap_field: m.chat_cap_field.clone(),
                input_micros_per_1m: m.prices.map_or(0, |p| p.input),
                output_micros_per_1m: m.prices.map_or(0, |p| p.output),
                cached_input_micros_per_1m: m.prices.and_then(|p| p.cached_input),
                context_window: m.context_window,
            })
            .collect();
        let providers = self
            .upstreams()
            .iter()
            .map(|u| pb::Provider {
                name: u.name.clone(),
                cluster: u.cluster.clone(),
                authority: u.authority.clone(),
                base_path: u.base_path.clone(),
                api_key: u.api_key.clone(),
                // The built-in mock takes stream_options whatever the real provider would.
                no_usage_injection: u.def.as_ref().is_some_and(|d| !d.inject_stream_usage),
                // The built-in mock reads `authorization` like OpenAI.
                api_key_header: u
                    .def
                    .as_ref()
                    .filter(|_| !u.mocked)
                    .map_or_else(String::new, |d| d.api_key_header.clone()),
            })
            .collect();
        let snap = pb::Snapshot {
            agents,
            models,
            providers,
            image_token_bound: self.config.image_token_bound,
            message_token_overhead: self.config.message_token_overhead,
            max_body_bytes: self.config.max_body_bytes,
        };
        (l.version(), snap)
    }

    /// The answer to a worker's `Sync`: nothing when it is current, what changed when only agents
    /// did since its version of this run, else the whole state.
    pub fn sync_answer(&self, known: u64, known_instance: u64) -> pb::SyncResponse {
        {
            let l = self.ledger();
            let (version, instance) = (l.version(), l.instance());
            if known == version {
                return pb::SyncResponse {
                    version,
                    instance,
                    ..Default::default()
                };
            }
            if known_instance == instance {
                if let Some((agents, deleted)) = l.delta_since(known) {
                    return pb::SyncResponse {
                        version,
                        instance,
                        delta: Some(pb::SyncDelta {
                            base_version: known,
                            agents: agents.into_iter().map(agent_policy).collect(),
                            deleted_agent_ids: deleted,
                        }),
                        ..Default::default()
                    };
                }
            }
        }
        let (version, snapshot) = self.snapshot();
        pb::SyncResponse {
            version,
            snapshot: Some(snapshot),
            instance: self.ledger().instance(),
            delta: None,
        }
    }

    pub fn note_sync(&self, filter_version: &str) {
        self.last_filter_sync.store(now_ms(), Ordering::Relaxed);
        let mut v = self
            .filter_version
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if *v != filter_version {
            *v = filter_version.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Catalog;
    use crate::ledger::tests::MODELS;
    use crate::ledger::{LedgerLimits, CLOSED_MEMORY_MS};
    use crate::policy::Policy;
    use crate::store::{Store, StoreOptions};

    struct TempHome(std::path::PathBuf);

    impl TempHome {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "aex-core-test-{}-{tag}-{}",
                std::process::id(),
                now_ms()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempHome(p)
        }
    }

    impl Drop for TempHome {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The daemon's state loaded from the database in `home`, as at a start.
    fn start(home: &TempHome) -> Core {
        start_with(home, MODELS)
    }

    /// [`start`] with another models.toml.
    fn start_with(home: &TempHome, models: &str) -> Core {
        let home = crate::home::Home::resolve(Some(&home.0)).unwrap();
        let (store, loaded) = Store::open(&home.db(), StoreOptions::default()).unwrap();
        let limits = LedgerLimits {
            reservation_ttl_ms: 3_600_000,
            min_output_tokens: 16,
        };
        let catalog = Arc::new(Catalog::parse(models, "m").unwrap());
        let config = Config::parse("", "config.toml").unwrap();
        let ledger = Ledger::new(loaded, catalog, limits);
        Core::new(
            ledger,
            store,
            config,
            Vec::new(),
            String::new(),
            String::new(),
            home,
        )
    }

    fn authorize(id: &str) -> pb::AuthorizeRequest {
        pb::AuthorizeRequest {
            request_id: id.into(),
            agent_id: "a1".into(),
            token_sha256: "h".into(),
            model: "m".into(),
            input_token_bound: 100,
            requested_output_cap: 50,
            choices: 1,
            ..Default::default()
        }
    }

    fn settlement(id: &str, lease_id: &str) -> pb::Settlement {
        pb::Settlement {
            request_id: id.into(),
            agent_id: "a1".into(),
            input_tokens: 10,
            output_tokens: 20,
            model: "m".into(),
            lease_id: lease_id.into(),
            reserved_micros: if lease_id.is_empty() { 0 } else { 200 },
            ..Default::default()
        }
    }

    fn admission() -> pb::LeasedAdmission {
        pb::LeasedAdmission {
            request_id: "leased".into(),
            agent_id: "a1".into(),
            lease_id: "lease_1".into(),
            model: "m".into(),
            reserved_micros: 200,
            ..Default::default()
        }
    }

    /// Creates agent `a1` ("atlas", token hash "h": 1 USD, 1,000 RPM) at `at`.
    fn create_atlas(l: &mut Ledger, at: i64) {
        l.create_agent(
            "a1".into(),
            "atlas",
            1_000_000,
            1_000,
            Policy::default(),
            0,
            "h".into(),
            at,
        )
        .unwrap();
    }

    /// A first run of the daemon in `home`: agent `atlas` with a lease that admitted one request,
    /// still open when the daemon stops.
    async fn open_a_lease_and_stop(home: &TempHome) {
        let core = start(home);
        core.mutate(|l| {
            let now = now_ms();
            create_atlas(l, now);
            lease_and_admit(l, now);
        })
        .await
        .unwrap();
    }

    /// Grants `lease_1` to `a1` at `at` and admits the request "leased" under it.
    fn lease_and_admit(l: &mut Ledger, at: i64) {
        let lease = pb::LeaseRequest {
            lease_id: "lease_1".into(),
            agent_id: "a1".into(),
            token_sha256: "h".into(),
            want: Some(pb::LeaseWant {
                unit_micros: 1_000,
                slots: 16,
            }),
        };
        assert!(l.lease(&lease, at).lease.is_some());
        l.admit(&admission(), at);
    }

    /// Settles `request_id` under `lease_1` and returns the lease, at `now`.
    fn settle_and_return(l: &mut Ledger, request_id: &str, now: i64) {
        l.settle(&settlement(request_id, "lease_1"), now);
        let r = pb::LeaseReturn {
            lease_id: "lease_1".into(),
            agent_id: "a1".into(),
        };
        l.return_lease(&r, now);
    }

    /// `kind` events on disk (of `request_id` only, if given).
    fn events(core: &Core, kind: &str, request_id: Option<&str>) -> i64 {
        let conn = crate::store::open_connection(&core.db_path).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM audit WHERE kind = ?1 AND (?2 IS NULL OR request_id = ?2)",
            rusqlite::params![kind, request_id],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// A first run: an ordinary request and one under a lease (left open), both settled at `at`;
    /// then, if `later`, another request settled now.
    async fn first_run(home: &TempHome, at: i64, later: bool) {
        let core = start(home);
        core.mutate(|l| {
            create_atlas(l, at);
            assert_eq!(l.authorize(&authorize("ordinary"), at).decision, 1);
            assert!(l.settle(&settlement("ordinary", ""), at));
            lease_and_admit(l, at);
            assert!(l.settle(&settlement("leased", "lease_1"), at));
            if later {
                let now = now_ms();
                assert_eq!(l.authorize(&authorize("later"), now).decision, 1);
                assert!(l.settle(&settlement("later", ""), now));
            }
        })
        .await
        .unwrap();
    }

    /// What the Report handler does with a re-sent report: (settled, duplicates).
    async fn resend(core: &Core) -> (u32, u32) {
        let settlements = [settlement("ordinary", ""), settlement("leased", "lease_1")];
        let closed = core.closed_on_disk(&settlements).await.unwrap();
        core.mutate(|l| {
            let now = now_ms();
            l.remember_closed(&closed, now);
            l.admit(&admission(), now);
            let settled = settlements.iter().filter(|s| l.settle(s, now)).count();
            (settled as u32, (settlements.len() - settled) as u32)
        })
        .await
        .unwrap()
    }

    /// spent, reserved, what is left of the lease, request.settled events on disk.
    fn state(core: &Core) -> (u64, u64, u64, i64) {
        let l = core.ledger();
        let a = l.agent("a1").unwrap();
        let lease = l
            .leases()
            .find(|x| x.id == "lease_1")
            .map_or(0, |x| x.amount);
        (
            a.spent,
            a.reserved,
            lease,
            events(core, "request.settled", None),
        )
    }

    #[tokio::test]
    async fn a_report_re_sent_after_a_restart_minutes_later_settles_nothing_again() {
        // Found by an audit: committed, answer lost in a `kill -9`, restarted more than two
        // minutes later; the first sweep forgot the closed ids and the filter's copy charged the
        // ordinary request again at catalog prices and the leased one again from its open lease.
        let home = TempHome::new("restart");
        first_run(&home, now_ms() - 10 * 60_000, false).await;
        let core = start(&home);
        let before = state(&core);
        assert_eq!((before.0, before.3), (50 + 50, 2));
        // The first sweeps after the start forget nothing the filters may still re-send: memory
        // knows both copies (no lookup on disk).
        core.mutate(|l| l.expire(now_ms())).await.unwrap();
        let copies = [settlement("ordinary", ""), settlement("leased", "lease_1")];
        assert!(core
            .ledger()
            .unmatched_settlements(&copies, now_ms())
            .is_empty());
        assert_eq!(resend(&core).await, (0, 2));
        assert_eq!(state(&core), before);
    }

    #[tokio::test]
    async fn a_lease_open_across_a_restart_is_charged_at_the_prices_it_was_granted_under() {
        // Found by a black-box probe: prices raised in models.toml, then a restart while streams
        // ran under a lease; each was charged at the new prices (10x) and recorded as an overrun.
        let home = TempHome::new("prices");
        open_a_lease_and_stop(&home).await;
        let dearer = MODELS
            .replace(r#"input_usd_per_1m = "1""#, r#"input_usd_per_1m = "10""#)
            .replace(r#"output_usd_per_1m = "2""#, r#"output_usd_per_1m = "20""#);
        let core = start_with(&home, &dearer);
        // 10 input and 20 output tokens at the grant's 1 and 2 µUSD per token.
        assert!(core
            .mutate(|l| l.settle(&settlement("leased", "lease_1"), now_ms()))
            .await
            .unwrap());
        let a = core.ledger().agent("a1").unwrap().clone();
        assert_eq!(a.spent, 50);
        assert!(!a.blocked_overrun);
        // The prices in force are stored too, for the leases granted from now on.
        drop(core);
        let core = start_with(&home, &dearer);
        let list = crate::ledger::PriceList::of(&Catalog::parse(&dearer, "m").unwrap());
        let conn = crate::store::open_connection(&core.db_path).unwrap();
        let stored: String = conn
            .query_row(
                "SELECT prices FROM price_lists WHERE id = ?1",
                [&list.id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, list.json);
    }

    #[tokio::test]
    async fn a_price_list_is_kept_while_a_lease_names_it_and_pruned_after() {
        let home = TempHome::new("prune");
        let list_ids = |core: &Core| -> Vec<String> {
            let conn = crate::store::open_connection(&core.db_path).unwrap();
            let mut q = conn
                .prepare("SELECT id FROM price_lists ORDER BY id")
                .unwrap();
            q.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let list_of =
            |toml: &str| crate::ledger::PriceList::of(&Catalog::parse(toml, "m").unwrap()).id;
        let priced = |usd: &str| {
            MODELS.replace(
                r#"input_usd_per_1m = "1""#,
                &format!(r#"input_usd_per_1m = "{usd}""#),
            )
        };
        open_a_lease_and_stop(&home).await;
        // Two restarts with other prices: the first list stays (the open lease names it), the
        // second goes as the third takes over.
        // (A start's list is written with its first change.)
        let c = start_with(&home, &priced("3"));
        c.mutate(|_| ()).await.unwrap();
        drop(c);
        let core = start_with(&home, &priced("4"));
        core.mutate(|_| ()).await.unwrap();
        let mut want = vec![list_of(MODELS), list_of(&priced("4"))];
        want.sort();
        assert_eq!(list_ids(&core), want);
        // Once the lease is settled and returned, its list is pruned at the next start.
        core.mutate(|l| settle_and_return(l, "leased", now_ms()))
            .await
            .unwrap();
        drop(core);
        let core = start_with(&home, &priced("5"));
        core.mutate(|_| ()).await.unwrap();
        assert_eq!(list_ids(&core), vec![list_of(&priced("5"))]);
    }

    #[tokio::test]
    async fn a_worker_gets_a_delta_only_for_a_version_of_this_run() {
        let home = TempHome::new("sync");
        let core = start(&home);
        core.mutate(|l| create_atlas(l, now_ms())).await.unwrap();
        let (version, instance) = {
            let l = core.ledger();
            (l.version(), l.instance())
        };
        let current = core.sync_answer(version, instance);
        assert!(current.snapshot.is_none() && current.delta.is_none());
        core.mutate(|l| {
            l.rotate_token("atlas", "h2".into(), None, now_ms())
                .map(|_| ())
        })
        .await
        .unwrap()
        .unwrap();
        let delta = core.sync_answer(version, instance);
        assert!(delta.snapshot.is_none());
        let d = delta.delta.unwrap();
        assert_eq!(d.base_version, version);
        assert_eq!(d.agents.len(), 1);
        assert_eq!(d.agents[0].token_sha256, "h2");
        // The same version number from another run of the daemon: the whole state.
        let other = core.sync_answer(version, instance + 1);
        assert!(other.delta.is_none());
        assert_eq!(other.snapshot.unwrap().agents.len(), 1);
        assert_eq!(other.instance, instance);
    }

    #[tokio::test]
    async fn a_lease_returned_after_a_restart_reports_the_whole_lease() {
        // Its grant, its charges and its requests from before the restart as well as after.
        let home = TempHome::new("lease-totals");
        let core = start(&home);
        let granted = core
            .mutate(|l| {
                let now = now_ms();
                create_atlas(l, now);
                lease_and_admit(l, now);
                l.settle(&settlement("leased", "lease_1"), now);
                l.leases().next().unwrap().granted_micros
            })
            .await
            .unwrap();
        drop(core);
        let core = start(&home);
        core.mutate(|l| {
            let now = now_ms();
            let second = pb::LeasedAdmission {
                request_id: "leased-2".into(),
                ..admission()
            };
            l.admit(&second, now);
            settle_and_return(l, "leased-2", now);
        })
        .await
        .unwrap();
        let conn = crate::store::open_connection(&core.db_path).unwrap();
        let payload: String = conn
            .query_row(
                "SELECT payload FROM audit WHERE kind = 'lease.returned'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let p: serde_json::Value = serde_json::from_str(&payload).unwrap();
        // 10 input and 20 output tokens at 1 and 2 µUSD: 50 µUSD per request.
        assert_eq!(p["requests"], 2, "{p}");
        assert_eq!(p["charged_micros"], 100, "{p}");
        assert_eq!(p["granted_micros"], granted, "{p}");
        assert_eq!(p["released_micros"], granted - 100, "{p}");
    }

    #[tokio::test]
    async fn an_admission_or_denial_re_sent_after_a_restart_is_recorded_once() {
        // The report was committed, its answer died with the daemon: the filter re-sends it.
        let home = TempHome::new("admitted");
        open_a_lease_and_stop(&home).await;
        let core = start(&home);
        core.mutate(|l| l.admit(&admission(), now_ms()))
            .await
            .unwrap();
        assert_eq!(events(&core, "request.allowed", Some("leased")), 1);
        // A denial in a report re-sent after the restart is recorded once too.
        let denial = pb::Denial {
            request_id: "refused".into(),
            code: "invalid_api_key".into(),
            ..Default::default()
        };
        let d = denial.clone();
        core.mutate(move |l| l.record_denial(&d, now_ms()))
            .await
            .unwrap();
        drop(core);
        let core = start(&home);
        core.mutate(move |l| l.record_denial(&denial, now_ms()))
            .await
            .unwrap();
        assert_eq!(events(&core, "request.denied", Some("refused")), 1);
        // It still settles, once.
        assert!(core
            .mutate(|l| l.settle(&settlement("leased", "lease_1"), now_ms()))
            .await
            .unwrap());
        assert!(!core
            .mutate(|l| l.settle(&settlement("leased", "lease_1"), now_ms()))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_copy_arriving_after_memory_forgot_the_id_is_found_on_disk() {
        let home = TempHome::new("disk");
        first_run(&home, now_ms() - 5 * 60_000, true).await;
        let core = start(&home);
        let before = state(&core);
        // Memory keeps the ids closed in the previous run's last two minutes ("later"), not
        // these: both are looked up on disk, the leased one because its lease is older than that.
        let copies = [settlement("ordinary", ""), settlement("leased", "lease_1")];
        let unmatched = core.ledger().unmatched_settlements(&copies, now_ms());
        assert_eq!(unmatched, ["ordinary", "leased"]);
        assert!(
            core.ledger().leases().any(|x| x.id == "lease_1"),
            "still open"
        );
        assert_eq!(resend(&core).await, (0, 2));
        assert_eq!(state(&core), before);
        // Pruning keeps them on disk as long as a reservation or lease can stay open.
        let t = now_ms() + CLOSED_MEMORY_MS + 1_000;
        core.mutate(|l| l.expire(t)).await.unwrap();
        let closed = core.closed_on_disk(&copies).await.unwrap();
        assert_eq!(closed, ["ordinary", "leased"]);
    }

    #[tokio::test]
    async fn a_batch_the_database_refuses_while_locked_is_retried_until_it_commits() {
        // Found by an audit: the writer dropped a batch it could not commit (another connection
        // held the write lock past the busy timeout) while memory kept it: a gap in the chain.
        let home = TempHome::new("locked");
        let core = Arc::new(start(&home));
        let lock = crate::store::open_connection(&core.db_path).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let c = core.clone();
        let create = tokio::spawn(async move {
            c.mutate(|l| {
                l.create_agent(
                    "a1".into(),
                    "atlas",
                    1,
                    1,
                    Policy::default(),
                    0,
                    "h".into(),
                    0,
                )
                .map(|_| ())
            })
            .await
        });
        // The busy timeout (5 s) passes: the writer retries, and refuses anything new meanwhile.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !core.store_failing() {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit should fail"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(matches!(
            core.mutate(|_| ()).await,
            Err(CoreError::StoreFailing)
        ));
        assert!(!create.is_finished());
        lock.execute_batch("ROLLBACK").unwrap();
        create.await.unwrap().unwrap().unwrap();
        assert!(!core.store_failing());
        core.mutate(|l| l.rotate_token("atlas", "h2".into(), None, 1).map(|_| ()))
            .await
            .unwrap()
            .unwrap();
        let conn = crate::store::open_connection(&core.db_path).unwrap();
        let seqs: Vec<i64> = conn
            .prepare("SELECT seq FROM audit ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
        assert_eq!(
            core.ledger().agent_by_name("atlas").unwrap().token_sha256,
            "h2"
        );
    }
}
