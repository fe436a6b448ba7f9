//! `aex daemon run`: the control-plane process. Loads the home, opens the ledger, renders the
//! Envoy bootstrap, and serves gRPC (filter + CLI) and HTTP until SIGTERM / SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::audit::kind;
use crate::config::{Catalog, Config};
use crate::core::{now_ms, Core, CoreError};
use crate::home::Home;
use crate::ledger::{Ledger, LedgerLimits};
use crate::store::{Store, StoreOptions};
use crate::{envoy, grpc, http, providers, tokens};

/// Shortest secret accepted (`aex init` writes 43 random characters): an empty or short one would
/// let a caller without the secret in (an absent header matches an empty secret).
pub const MIN_SECRET_CHARS: usize = 16;

/// Reads a secret file, trimmed; a clear error if missing, empty or too short.
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (run `aex init` first)", path.display()))?;
    let s = s.trim();
    anyhow::ensure!(
        s.chars().count() >= MIN_SECRET_CHARS,
        "{} holds no usable secret (empty or under {MIN_SECRET_CHARS} characters): delete it and run `aex init` to write a new one",
        path.display()
    );
    Ok(s.to_string())
}

/// Where the compiled filter is: `--filter`, `$AEX_FILTER`, `$AEX_HOME/aex_filter.wasm`, beside
/// the `aex` binary, or the cargo target dir the binary was built in.
pub fn find_filter(home: &Home, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "filter {} does not exist", p.display());
        return Ok(std::fs::canonicalize(p)?);
    }
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("AEX_FILTER").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(home.installed_filter());
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("aex_filter.wasm"));
            // target/{debug,release}/aex → target/wasm32-wasip1/release/aex_filter.wasm
            if let Some(target) = dir.parent() {
                candidates.push(target.join("wasm32-wasip1/release/aex_filter.wasm"));
            }
        }
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(std::fs::canonicalize(c)?);
        }
    }
    anyhow::bail!(
        "cannot find the AEX filter (aex_filter.wasm); looked in: {}. Build it with `make build` or pass --filter PATH",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

pub struct Loaded {
    pub config: Config,
    pub catalog: Catalog,
    pub upstreams: Vec<providers::Upstream>,
}

pub fn load_home(home: &Home) -> anyhow::Result<Loaded> {
    anyhow::ensure!(
        home.root().is_dir(),
        "{} does not exist: run `aex init` first",
        home.root().display()
    );
    let config = Config::load(&home.config())?;
    let catalog = Catalog::load(&home.models())?;
    let env = providers::read_env_file(&home.env_file());
    let upstreams = providers::resolve(&catalog, &config, &env);
    Ok(Loaded {
        config,
        catalog,
        upstreams,
    })
}

/// Writes the rendered Envoy config (mode 0600, though it holds no secret: Envoy is given the
/// filter key in its environment, see [`envoy_env`]) and returns its path.
pub fn write_envoy_config(home: &Home, loaded: &Loaded, filter: &Path) -> anyhow::Result<PathBuf> {
    write_clusters(home, &loaded.upstreams)?;
    let yaml = envoy::render(&loaded.config, filter, &home.envoy_cds());
    std::fs::create_dir_all(home.envoy_dir())?;
    let path = home.envoy_config();
    crate::cli::write_private(&path, yaml.as_bytes())?;
    Ok(path)
}

/// What Envoy must find in its environment: the filter's key to the control plane
/// ([`aex_proto::FILTER_KEY_ENV`]).
pub fn envoy_env(home: &Home) -> anyhow::Result<(&'static str, String)> {
    Ok((aex_proto::FILTER_KEY_ENV, read_secret(&home.filter_key())?))
}

/// Writes the provider clusters atomically (rename), which is what Envoy's directory watch picks up.
pub fn write_clusters(home: &Home, upstreams: &[providers::Upstream]) -> anyhow::Result<()> {
    let path = home.envoy_cds();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::cli::write_private(&path, envoy::render_clusters(upstreams).as_bytes())?;
    Ok(())
}

/// Waits (bounded) until Envoy's admin lists every named cluster, so the filter is only told
/// about a provider once Envoy can route to it.
pub async fn wait_for_envoy_clusters(admin_port: u16, clusters: &[String]) {
    if clusters.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let names = clusters.to_vec();
    while tokio::time::Instant::now() < deadline {
        let names = names.clone();
        let ok = tokio::task::spawn_blocking(move || {
            crate::procs::http_get(admin_port, "/clusters", Duration::from_millis(500))
                .map(|(_, body)| names.iter().all(|c| body.contains(&format!("{c}::"))))
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!("Envoy did not report clusters {clusters:?} within 5 s");
}

/// Listens on 127.0.0.1:`port`; a port in use is an error naming its `[ports]` key.
async fn listen(home: &Home, key: &str, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "{addr} is already in use: change [ports] {key} in {} or stop what listens there",
                home.config().display()
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr} ([ports] {key}): {e}")
        }
    })
}

pub async fn run(home: Home, filter: Option<PathBuf>) -> anyhow::Result<()> {
    run_until(home, filter, std::future::pending()).await
}

/// How long a clean shutdown waits for what runs to finish (`aex daemon stop` allows 10 s more
/// before it kills).
pub const DRAIN_MS: u64 = 20_000;

/// How long the servers get to close their connections once the drain is over.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A clean shutdown: no request is admitted any more (503 `governance_unavailable`, which
/// clients retry), every lease is voided, and the daemon waits (up to [`DRAIN_MS`]) until the
/// requests running finish and are reported and the workers have returned their leases. Envoy is
/// stopped after the daemon: stopping it first cut every stream, whose reservations and leases
/// were then charged in full when they expired after the restart.
async fn drain(core: &Core) {
    let leases = match core.mutate(Ledger::recall_leases).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("recalling leases: {e}");
            return;
        }
    };
    let running = |core: &Core| core.ledger().open_this_run();
    let (_, requests) = running(core);
    if leases == 0 && requests == 0 {
        return;
    }
    tracing::info!(
        "stopping: waiting up to {} s for {requests} request(s) in flight and {leases} lease(s)",
        DRAIN_MS / 1000
    );
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(DRAIN_MS) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if running(core) == (0, 0) {
            tracing::info!(
                "every request finished and every lease was returned in {} ms",
                started.elapsed().as_millis()
            );
            return;
        }
    }
    let (leases, requests) = running(core);
    // A lease still out keeps only the worst case of what runs under it.
    if let Err(e) = core
        .mutate(|l| l.shrink_leases_to_running(l.started_ms()))
        .await
    {
        tracing::warn!("releasing the unused credit of leases still out: {e}");
    }
    tracing::warn!(
        "{requests} request(s) and {leases} lease(s) still open after {DRAIN_MS} ms (long streams): \
         they expire after the restart and are charged in full (a lease only the worst case of \
         the requests still running under it), as the SPEC requires of a reservation never settled"
    );
}

/// The gRPC port's connections, with TCP_NODELAY (without it small replies wait ~40 ms for
/// delayed ACKs). An accept that fails (out of file descriptors: EMFILE, ENFILE; or any other
/// error) is logged and retried after a pause: tonic's own listener stream ends at the first
/// one, and the gRPC server then stopped for good while the daemon lived on (a probe with 60
/// idle connections against a limit of 64 descriptors: every request 503 from then on).
fn accepted(
    listener: tokio::net::TcpListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if tx.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!("gRPC port: cannot accept a connection ({e}); retrying");
                        last_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// [`run`], stopping cleanly also when `stop` completes (the foreground mode's Envoy exited).
pub async fn run_until(
    home: Home,
    filter: Option<PathBuf>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let loaded = load_home(&home)?;
    // Ports first: a start that cannot listen must fail before it writes anything.
    let grpc_listener = listen(&home, "grpc", loaded.config.grpc_port).await?;
    let http_listener = listen(&home, "http", loaded.config.http_port).await?;
    let (grpc_addr, http_addr) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
    tracing::info!("control plane: gRPC {grpc_addr}, HTTP {http_addr}");
    let filter = find_filter(&home, filter.as_deref())?;
    write_envoy_config(&home, &loaded, &filter)?;
    for u in loaded.upstreams.iter().filter(|u| u.mocked) {
        tracing::warn!(
            "provider '{}' has no API key: served by the built-in mock provider",
            u.name
        );
    }

    let admin_hash = tokens::sha256_hex(&read_secret(&home.admin_token())?);
    let filter_key = read_secret(&home.filter_key())?;
    let store_options = StoreOptions {
        give_up: Duration::from_secs(loaded.config.commit_retry_secs),
    };
    let (store, on_disk) = Store::open(&home.db(), store_options)
        .with_context(|| format!("opening {}", home.db().display()))?;
    let limits = LedgerLimits {
        reservation_ttl_ms: i64::try_from(loaded.config.reservation_ttl_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        min_output_tokens: loaded.config.min_output_tokens,
    };
    let catalog = Arc::new(loaded.catalog.clone());
    let mut ledger = Ledger::new(on_disk, catalog.clone(), limits);
    ledger.set_catalog(catalog, now_ms());
    ledger.event(
        now_ms(),
        kind::DAEMON_STARTED,
        "",
        "",
        json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }),
    );
    let core = Arc::new(Core::new(
        ledger,
        store,
        loaded.config.clone(),
        loaded.upstreams.clone(),
        filter_key,
        admin_hash,
        home.clone(),
    ));
    core.mutate(|_| ()).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let sweeper = {
        let core = core.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match core.mutate(|l| l.expire(now_ms())).await {
                            // The writer logs its retries; expiry runs again next tick.
                            Ok(_) | Err(CoreError::StoreFailing) => {}
                            Err(e) => tracing::error!("reservation expiry: {e}"),
                        }
                    }
                    _ = rx.changed() => break,
                }
            }
        })
    };

    let grpc_srv = tonic::transport::Server::builder()
        .add_service(grpc::filter_server(core.clone()))
        .add_service(grpc::admin_server(core.clone()))
        .serve_with_incoming_shutdown(accepted(grpc_listener), shutdown(stop_rx.clone()));
    let http_srv = axum::serve(http_listener, http::router(core.clone()))
        .tcp_nodelay(true)
        .with_graceful_shutdown(shutdown(stop_rx.clone()));
    // A server that ends before a stop was asked for leaves a daemon that cannot serve: it is
    // stopped, and exits with an error (the supervisor starts it again).
    let stopping = std::sync::atomic::AtomicBool::new(false);
    let must_run = |what: &'static str, ended: Result<(), anyhow::Error>| {
        let asked = stopping.load(std::sync::atomic::Ordering::SeqCst);
        let result = match ended {
            Err(e) => Err(e.context(format!("the {what} server failed"))),
            Ok(()) if !asked => Err(anyhow::anyhow!("the {what} server stopped unexpectedly")),
            Ok(()) => Ok(()),
        };
        if result.is_err() {
            let _ = stop_tx.send(true);
        }
        result
    };
    // Once stopping, a server gets SHUTDOWN_GRACE to finish what it serves, then is dropped: a
    // request to the built-in mock (served here) that outlasted the drain held the HTTP server's
    // graceful shutdown until `aex daemon stop` killed the process, with nothing flushed.
    let grace = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let grpc_srv = async {
        tokio::select! {
            r = grpc_srv => must_run("gRPC", r.map_err(anyhow::Error::from)),
            () = grace(stop_rx.clone()) => Ok(()),
        }
    };
    let http_srv = async {
        tokio::select! {
            r = http_srv => must_run("HTTP", r.map_err(anyhow::Error::from)),
            () = grace(stop_rx.clone()) => Ok(()),
        }
    };

    let signals = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let signalled =
            tokio::select! { _ = term.recv() => true, _ = int.recv() => true, () = stop => false };
        tracing::info!("shutting down");
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        if signalled {
            // Envoy is still up: let what runs finish and report first.
            drain(&core).await;
        }
        let _ = stop_tx.send(true);
        Ok::<_, std::io::Error>(())
    };
    let signals = async {
        let mut stopped = stop_rx.clone();
        tokio::select! {
            r = signals => r,
            // A server failed and stopped the rest.
            _ = stopped.wait_for(|v| *v) => Ok(()),
        }
    };
    let (g, h, s) = tokio::join!(grpc_srv, http_srv, signals);
    g?;
    h?;
    s?;
    let _ = sweeper.await;
    // Flush: every queued op is committed before exit.
    core.flush().await?;
    // Then copy the write-ahead log into the database file and empty it: the daemon's
    // connections are never closed (their threads end with the process), so the log was left
    // holding everything, and a backup of `aex.db` alone after a clean stop could be empty.
    match crate::store::open_connection(&home.db()).and_then(|c| {
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(Into::into)
    }) {
        Ok(()) => {}
        Err(e) => tracing::warn!("checkpointing the database at shutdown: {e}"),
    }
    Ok(())
}
