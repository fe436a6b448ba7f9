#!/usr/bin/env python3
"""AEX benchmark (`make bench`): what governance adds to a request, measured honestly.

Arms, all against the same zero-latency mock provider (`aex mock`) with the same request:
  A0  client -> mock directly
  A1  client -> plain Envoy (listener -> router -> cluster: the mock), 1 worker
  W1  client -> Envoy + a floor Wasm filter (tests/bench/floor-filter: reads the request and
      response headers and bodies, nothing else) -> mock, 1 worker: what Envoy's Wasm host costs
      before any AEX logic
  A2  client -> Envoy + the AEX filter -> mock, with the control plane: auth, policy,
      reservation, settlement and audit on every request, 1 worker

Scenarios: a 1 KB non-streaming chat completion and a 64-chunk SSE stream, each in closed loop at
concurrency 1 and 8, plus the non-streaming request in open loop at a fixed rate. Each scenario
runs in rounds; every round runs every arm once (order rotated per round) so drift of the machine
hits all arms alike. Histograms of all rounds are merged per arm.

Then: the budget invariant of the A2 agent, Envoy RSS (plain vs with the filter), the
control-plane RSS with 10,000 agents and as many audit events as the time allows, and the
control-plane microbenchmarks (examples/ledger_bench.rs). Every target is printed MET or MISSED.

Output: a table on stdout and target/bench/results.json. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import harness  # noqa: E402
from harness import Stack, free_port, http  # noqa: E402

OUT = REPO / "target" / "bench"
LOADGEN = REPO / "target" / "release" / "aex-loadgen"
SEED = REPO / "target" / "release" / "aex-bench-seed"
LEDGER_BENCH = REPO / "target" / "release" / "examples" / "ledger_bench"
ARMS = ("A0", "A1", "W1", "A2")
FLOOR_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "aex_bench_floor_filter.wasm"
STREAM_TOKENS = 64

TARGETS = {
    "added_p50_us": 150.0,
    "added_p99_us": 500.0,
    "throughput_ratio": 0.70,
    "ttfb_added_ms": 1.0,
    "cp_pairs_per_s": 20_000,
    "cp_rss_mb": 64.0,
    "envoy_rss_growth_mb": 30.0,
}


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- build


def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"head": git("rev-parse", "HEAD"), "dirty_files": dirty.splitlines() if dirty else []}


def build():
    steps = [
        ["cargo", "build", "--release", "-p", "aex-loadgen", "-p", "aex-control-plane"],
        ["cargo", "build", "--release", "-p", "aex-filter", "-p", "aex-bench-floor-filter", "--target", "wasm32-wasip1"],
        ["cargo", "build", "--release", "-p", "aex-control-plane", "--example", "ledger_bench"],
    ]
    for cmd in steps:
        log(" ".join(cmd))
        t = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        log(f"  done in {time.time() - t:.0f}s")


# ---------------------------------------------------------------------------------------- request


def chat_body(stream: bool) -> bytes:
    """A chat completion of exactly 1024 bytes."""
    def make(pad: int) -> bytes:
        msg = {
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Summarise: " + ("lorem ipsum " * 200)[:pad]},
            ],
            "max_tokens": 128,
            "temperature": 0,
        }
        if stream:
            msg["stream"] = True
        return json.dumps(msg, separators=(",", ":")).encode()

    base = len(make(0))
    body = make(1024 - base)
    assert len(body) == 1024, len(body)
    return body


# ---------------------------------------------------------------------------------------- A1: plain Envoy

# The same listener, HTTP connection manager, router and allocator settings as envoy/bootstrap.yaml.tmpl (no
# request-id generation, server header passed through, no x-envoy-* headers), without the AEX filter.
PLAIN_ENVOY = """
node: {{ id: bench-plain, cluster: bench }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
memory_allocator_manager: {{ bytes_to_release: 1073741824, memory_release_interval: 1s }}
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 50000
static_resources:
  listeners:
  - name: plain
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    per_connection_buffer_limit_bytes: 8388608
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          codec_type: AUTO
          generate_request_id: false
          server_header_transformation: PASS_THROUGH
          http_protocol_options: {{ override_stream_error_on_invalid_http_message: true }}
          request_timeout: 0s
          stream_idle_timeout: 600s
          route_config:
            name: plain
            virtual_hosts:
            - name: plain
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: mock, timeout: 0s }}
                request_headers_to_remove: [x-forwarded-proto]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
  clusters:
  - name: mock
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: mock
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {mock} }} }} }}
"""


# W1: the same Envoy with the floor filter in front of the router.
FLOOR_FILTER = """          - name: floor
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: floor
                root_id: floor
                vm_config:
                  vm_id: floor
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{wasm}" }} }}
                allow_on_headers_stop_iteration: true
"""


class PlainEnvoy:
    """A1 (no filter) or, with `wasm`, W1 (the floor filter)."""

    def __init__(self, tmp: Path, mock_port: int, concurrency: int = 1, wasm: Path | None = None):
        self.port, self.admin = free_port(), free_port()
        name = "floor-envoy" if wasm else "plain-envoy"
        cfg = tmp / f"{name}.yaml"
        template = PLAIN_ENVOY
        if wasm:
            template = template.replace("          http_filters:\n",
                                        "          http_filters:\n" + FLOOR_FILTER.replace("{wasm}", str(wasm)))
        cfg.write_text(template.format(admin=self.admin, port=self.port, mock=mock_port))
        self.log = open(tmp / f"{name}.log", "ab")
        self.proc = subprocess.Popen(
            [str(harness.envoy_binary()), "-c", str(cfg), "--concurrency", str(concurrency),
             "--use-dynamic-base-id", "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {tmp / (name + '.log')}")
            try:
                if b"LIVE" in http("GET", f"http://127.0.0.1:{self.admin}/ready", timeout=1)[2]:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{name} not ready in 30 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------- /proc


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_detail(pid: int) -> dict:
    """VmRSS and its parts (anonymous, file-backed, shared memory such as SQLite's -shm), MB."""
    return {f: rss_mb(pid, f) for f in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")}


def cpu_ticks(pid: int) -> int | None:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])


def idle_cpu(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """Background CPU of each process with no traffic, µs per second (sync polls, timers)."""
    hz = os.sysconf("SC_CLK_TCK")
    before = {k: cpu_ticks(p) for k, p in pids.items()}
    time.sleep(seconds)
    after = {k: cpu_ticks(p) for k, p in pids.items()}
    return {k: round((after[k] - before[k]) * 1e6 / hz / seconds, 1) for k in pids
            if before[k] is not None and after[k] is not None}


# ---------------------------------------------------------------------------------------- load


def loadgen(url: str, body_file: Path, headers: list[str], *, label: str, seconds: float, warmup: float,
            concurrency: int | None = None, rate: float | None = None, stream: bool = False,
            pids: dict[str, int] | None = None) -> dict:
    out = Path(tempfile.mkstemp(prefix="aex-loadgen-", suffix=".json", dir=OUT)[1])
    cmd = [str(LOADGEN), "--url", url, "--body-file", str(body_file), "--duration", str(seconds),
           "--warmup", str(warmup), "--json", str(out), "--label", label]
    for h in headers:
        cmd += ["--header", h]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    else:
        cmd += ["--rate", str(rate)]
    if stream:
        cmd.append("--stream")
    if pids:
        cmd += ["--pids", ",".join(f"{k}={v}" for k, v in pids.items())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if r.returncode != 0:
        raise RuntimeError(f"aex-loadgen failed ({r.returncode}): {r.stderr}")
    res = json.loads(out.read_text())
    out.unlink()
    return res


def quantile(buckets: list, q: float) -> float | None:
    """HDR-style value at quantile over merged [[value_ns, count], ...] buckets, in µs."""
    total = sum(c for _, c in buckets)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    acc = 0
    for v, c in sorted(buckets):
        acc += c
        if acc >= rank:
            return v / 1000.0
    return sorted(buckets)[-1][0] / 1000.0


def merge(buckets_lists: list) -> list:
    m: dict[int, int] = {}
    for bl in buckets_lists:
        for v, c in bl or []:
            m[v] = m.get(v, 0) + c
    return sorted(m.items())


QS = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


def aggregate(runs: list[dict], idle: dict[str, float] | None = None) -> dict:
    reqs = sum(r["requests"] for r in runs)
    secs = sum(r["measured_s"] for r in runs)
    hist = merge([r["hist_ns"] for r in runs])
    ttfb = merge([r.get("ttfb_hist_ns") for r in runs if r.get("ttfb_hist_ns")])
    errors = sum(r["errors"] for r in runs)
    kinds: dict[str, int] = {}
    for r in runs:
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    cpu = {}
    for name in sorted({k for r in runs for k in r["cpu_us"]}):
        vals = [r["cpu_us"].get(name) for r in runs]
        if any(v is None for v in vals) or reqs == 0:
            cpu[name] = None
        else:
            cpu[name] = round(sum(vals) / reqs, 1)
    agg = {
        "rounds": len(runs),
        "requests": reqs,
        "measured_s": round(secs, 3),
        "rps": round(reqs / secs, 1) if secs else 0.0,
        "errors": errors,
        "error_kinds": kinds,
        "latency_us": {k: quantile(hist, q) for k, q in QS},
        "ttfb_us": {k: quantile(ttfb, q) for k, q in QS} if ttfb else None,
        "cpu_us_per_req": cpu,
        # CPU per request less what the process burns with no traffic (measured before the runs).
        "cpu_us_per_req_net": {k: (None if v is None or reqs == 0 else
                                   round(max(0.0, v - (idle or {}).get(k, 0.0) * secs / reqs), 1))
                               for k, v in cpu.items()},
        "per_round_p50_us": [r["latency_us"]["p50"] if r["latency_us"] else None for r in runs],
        "per_round_rps": [r["rps"] for r in runs],
    }
    lags = [r.get("send_lag_us") for r in runs if r.get("send_lag_us")]
    if lags:
        # Open loop: time from the scheduled send to the write (part of the latency above).
        agg["send_lag_us_max_over_rounds"] = {"p50": max(l["p50"] for l in lags), "p99": max(l["p99"] for l in lags)}
    return agg


# ---------------------------------------------------------------------------------------- report


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def signed(v):
    if v is None:
        return "-"
    return f"{v:+,.0f}"


def print_table(results: dict):
    hdr = (f"{'scenario':<24} {'arm':<3} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'rps':>8} {'err':>5} "
           f"{'envoy':>7} {'cp':>7} {'mock':>7} | {'+p50':>6} {'+p90':>6} {'+p99':>6} {'+p99.9':>7}")
    print()
    print("Latency in µs (full response; for streams the last byte); CPU in µs per request; +pXX = arm − A1")
    print(hdr)
    print("-" * len(hdr))
    for sc, data in results.items():
        a1 = data["arms"].get("A1")
        for arm in ARMS:
            a = data["arms"].get(arm)
            if a is None:
                continue
            lat, cpu = a["latency_us"], a["cpu_us_per_req"]
            added = a.get("added_latency_us") or {}
            print(f"{sc:<24} {arm:<3} {fmt(lat['p50']):>8} {fmt(lat['p90']):>8} {fmt(lat['p99']):>8} "
                  f"{fmt(lat['p99.9']):>8} {fmt(a['rps']):>8} {a['errors']:>5} "
                  f"{fmt(cpu.get('envoy'), 1):>7} {fmt(cpu.get('cp'), 1):>7} {fmt(cpu.get('mock'), 1):>7} | "
                  f"{signed(added.get('p50')) if arm != 'A1' else '':>6} {signed(added.get('p90')) if arm != 'A1' else '':>6} "
                  f"{signed(added.get('p99')) if arm != 'A1' else '':>6} {signed(added.get('p99.9')) if arm != 'A1' else '':>7}")
        lags = {arm: a["send_lag_us_max_over_rounds"] for arm, a in data["arms"].items() if a.get("send_lag_us_max_over_rounds")}
        if lags:
            print("  (open loop: latency counts from the scheduled send; the generator's own send lag, worst round: "
                  + ", ".join(f"{arm} p50 {v['p50']:.0f} p99 {v['p99']:.0f} µs" for arm, v in lags.items()) + ")")
        print()
    print("CPU µs per request net of idle background (sync polls, timers): envoy / cp")
    for sc, data in results.items():
        cells = []
        for arm in ("A1", "W1", "A2"):
            a = data["arms"].get(arm)
            if a:
                n = a["cpu_us_per_req_net"]
                cells.append(f"{arm} {fmt(n.get('envoy'), 1)} / {fmt(n.get('cp'), 1)}")
        print(f"  {sc:<24} " + "   ".join(cells))
    print()
    streams = {k: v for k, v in results.items() if v["stream"]}
    if streams:
        print("Streams: time to first body byte (TTFB), µs; +pXX = arm − A1")
        hdr2 = f"{'scenario':<24} {'arm':<3} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} | {'+p50':>6} {'+p99':>6}"
        print(hdr2)
        print("-" * len(hdr2))
        for sc, data in streams.items():
            for arm in ARMS:
                a = data["arms"].get(arm)
                if a is None or not a["ttfb_us"]:
                    continue
                t = a["ttfb_us"]
                added = a.get("added_ttfb_us") or {}
                print(f"{sc:<24} {arm:<3} {fmt(t['p50']):>8} {fmt(t['p90']):>8} {fmt(t['p99']):>8} {fmt(t['p99.9']):>8} | "
                      f"{signed(added.get('p50')) if arm != 'A1' else '':>6} {signed(added.get('p99')) if arm != 'A1' else '':>6}")
            print()


# ---------------------------------------------------------------------------------------- phases


def scenarios(args) -> list[dict]:
    s = [
        {"name": "chat c=1", "stream": False, "concurrency": 1},
        {"name": "chat c=8", "stream": False, "concurrency": 8},
        {"name": f"stream{STREAM_TOKENS} c=1", "stream": True, "concurrency": 1},
        {"name": f"stream{STREAM_TOKENS} c=8", "stream": True, "concurrency": 8},
    ]
    if args.rate > 0:
        s.append({"name": f"chat open {args.rate:g}/s", "stream": False, "rate": args.rate,
                  "rounds": max(1, min(args.rounds, args.open_rounds))})
    return s


def latency_phase(args, tmp: Path, results_json: dict) -> tuple[dict, Stack, PlainEnvoy]:
    (tmp / "stack").mkdir()
    stack = Stack(tmp / "stack", concurrency=1)
    plain = floor = None
    try:
        plain = PlainEnvoy(tmp, stack.mock_port, concurrency=1)
        floor = PlainEnvoy(tmp, stack.mock_port, concurrency=1, wasm=FLOOR_WASM)
        agent = stack.create_agent("bench", "100000.00", 100_000_000)
        token = agent["token"]
        results_json["agent_id"] = agent["id"]
        bodies = {False: tmp / "chat.json", True: tmp / "stream.json"}
        bodies[False].write_bytes(chat_body(False))
        bodies[True].write_bytes(chat_body(True))
        path = "/v1/chat/completions"
        urls = {
            "A0": f"http://127.0.0.1:{stack.mock_port}{path}",
            "A1": f"http://127.0.0.1:{plain.port}{path}",
            "W1": f"http://127.0.0.1:{floor.port}{path}",
            "A2": stack.url(path),
        }
        mock_pid = stack.procs["mock"].pid
        pids = {
            "A0": {"mock": mock_pid},
            "A1": {"envoy": plain.proc.pid, "mock": mock_pid},
            "W1": {"envoy": floor.proc.pid, "mock": mock_pid},
            "A2": {"envoy": stack.procs["envoy"].pid, "cp": stack.procs["control-plane"].pid, "mock": mock_pid},
        }
        time.sleep(1.0)
        idle = idle_cpu({"envoy_A1": plain.proc.pid, "envoy_W1": floor.proc.pid, "envoy_A2": stack.procs["envoy"].pid,
                         "cp": stack.procs["control-plane"].pid, "mock": mock_pid})
        results_json["idle_cpu_us_per_s"] = idle
        log("idle background CPU (µs per second): " + ", ".join(f"{k} {v:,.0f}" for k, v in idle.items()))
        idle_rate = {"A0": {"mock": idle["mock"]},
                     "A1": {"envoy": idle["envoy_A1"], "mock": idle["mock"]},
                     "W1": {"envoy": idle["envoy_W1"], "mock": idle["mock"]},
                     "A2": {"envoy": idle["envoy_A2"], "cp": idle["cp"], "mock": idle["mock"]}}
        # One sanity request per arm, streaming and not: must be 200.
        for stream in (False, True):
            hdrs = {"authorization": f"Bearer {token}", "content-type": "application/json",
                    "x-mock-output-tokens": str(STREAM_TOKENS if stream else 12)}
            for arm in ARMS:
                st, _, b = http("POST", urls[arm], bodies[stream].read_bytes(), hdrs)
                if st != 200:
                    raise RuntimeError(f"{arm} sanity request failed: {st} {b[:300]!r}")
        results: dict = {}
        for sc in scenarios(args):
            rounds = sc.get("rounds", args.rounds)
            runs: dict[str, list] = {a: [] for a in ARMS}
            log(f"scenario {sc['name']}: {rounds} rounds x {len(ARMS)} arms x {args.seconds:g}s")
            for r in range(rounds):
                order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]
                for arm in order:
                    headers = [f"Authorization: Bearer {token}"]
                    if sc["stream"]:
                        headers.append(f"x-mock-output-tokens: {STREAM_TOKENS}")
                    res = loadgen(urls[arm], bodies[sc["stream"]], headers, label=f"{sc['name']} {arm} r{r + 1}",
                                  seconds=args.seconds, warmup=args.warmup, concurrency=sc.get("concurrency"),
                                  rate=sc.get("rate"), stream=sc["stream"], pids=pids[arm])
                    runs[arm].append(res)
                    lat = res["latency_us"] or {}
                    log(f"  r{r + 1} {arm}: {res['requests']} ok {res['errors']} err {res['rps']:.0f} rps "
                        f"p50 {lat.get('p50')} p99 {lat.get('p99')} us")
            arms = {a: aggregate(v, idle_rate[a]) for a, v in runs.items()}
            base = arms["A1"]
            for a in ARMS:
                arms[a]["added_latency_us"] = {
                    k: (None if arms[a]["latency_us"][k] is None or base["latency_us"][k] is None
                        else round(arms[a]["latency_us"][k] - base["latency_us"][k], 1)) for k, _ in QS}
                if sc["stream"] and arms[a]["ttfb_us"] and base["ttfb_us"]:
                    arms[a]["added_ttfb_us"] = {k: round(arms[a]["ttfb_us"][k] - base["ttfb_us"][k], 1) for k, _ in QS}
            results[sc["name"]] = {"stream": sc["stream"], "concurrency": sc.get("concurrency"),
                                   "rate": sc.get("rate"), "arms": arms}
        floor.stop()
        return results, stack, plain
    except BaseException:
        for envoy in (plain, floor):
            if envoy:
                envoy.stop()
        stack.stop()
        raise


def invariant_phase(stack: Stack) -> dict:
    log("budget invariant of the A2 agent (waiting for every settlement)")
    a = stack.wait_settled("bench", timeout=60)
    settled = stack.settled_total(a["id"])
    ok = (a["spent_micros"] + a["reserved_micros"] <= a["budget_micros"] and a["reserved_micros"] == 0
          and a["spent_micros"] == settled)
    return {"budget_micros": a["budget_micros"], "spent_micros": a["spent_micros"],
            "reserved_micros": a["reserved_micros"], "open_reservations": a["open_reservations"],
            "settled_charges_micros": settled, "ok": ok}


def memory_phase(args, tmp: Path) -> dict:
    """Control-plane RSS with 10,000 agents and N audit events (filled through its gRPC API)."""
    (tmp / "mem").mkdir()
    log(f"memory: fresh stack, {args.agents} agents, up to {args.events:,} audit events or {args.events_seconds:g}s")
    stack = Stack(tmp / "mem", concurrency=1)
    try:
        cp, envoy = stack.procs["control-plane"].pid, stack.procs["envoy"].pid
        out = {"cp_rss_mb_start": rss_mb(cp), "envoy_rss_mb_start": rss_mb(envoy),
               "cp_rss_detail_start": rss_detail(cp)}
        grpc = f"127.0.0.1:{stack.ports['grpc']}"
        agents_file = tmp / "mem" / "agents.tsv"
        t = time.time()
        r = subprocess.run([str(SEED), "agents", "--grpc", grpc, "--admin-token-file", str(stack.home / "admin.token"),
                            "--count", str(args.agents), "--out", str(agents_file)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"seeding agents failed: {r.stderr}")
        out["agents_created"] = json.loads(r.stdout)["agents"]
        out["agents_seconds"] = round(time.time() - t, 1)
        time.sleep(1.5)  # let the filter sync the 10k-agent snapshot
        out["cp_rss_mb_agents"] = rss_mb(cp)
        out["envoy_rss_mb_agents"] = rss_mb(envoy)
        r = subprocess.run([str(SEED), "events", "--grpc", grpc, "--filter-key-file", str(stack.home / "filter.key"),
                            "--agents", str(agents_file), "--max-events", str(args.events),
                            "--seconds", str(args.events_seconds)],
                           capture_output=True, text=True, timeout=args.events_seconds + 300)
        if r.returncode != 0:
            raise RuntimeError(f"generating events failed: {r.stderr}")
        gen = json.loads(r.stdout)
        out["generated"] = gen
        time.sleep(0.5)
        out["cp_rss_mb_events"] = rss_mb(cp)
        out["cp_rss_detail_events"] = rss_detail(cp)
        out["envoy_rss_mb_events"] = rss_mb(envoy)
        with stack.db() as c:
            out["audit_events"] = c.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            out["agents_in_db"] = c.execute("SELECT COUNT(*) FROM agents").fetchone()[0]
            out["closed_request_ids_in_db"] = c.execute("SELECT COUNT(*) FROM closed_requests").fetchone()[0]
        out["db_files_mb"] = {f.name: round(f.stat().st_size / 2**20, 1) for f in sorted(stack.home.glob("aex.db*"))}
        out["db_mb"] = round(sum(out["db_files_mb"].values()), 1)
        log(f"  {out['agents_created']} agents in {out['agents_seconds']}s, {out['audit_events']:,} audit events "
            f"({gen['pairs']:,} pairs in {gen['seconds']:.0f}s): CP RSS {out['cp_rss_mb_events']:.1f} MB")
        return out
    finally:
        stack.stop()


def ledger_phase(args) -> dict:
    out = {}
    db_dir = OUT / "db"
    db_dir.mkdir(parents=True, exist_ok=True)
    taskset = shutil.which("taskset")
    pin = [taskset, "-c", "0"] if taskset else []
    runs = [
        ("one_core_disk", pin + [str(LEDGER_BENCH), "--seconds", str(args.micro_seconds), "--concurrency", "1,64",
                                 "--dir", str(db_dir)]),
        ("one_core_tmpfs", pin + [str(LEDGER_BENCH), "--seconds", str(args.micro_seconds), "--concurrency", "64",
                                  "--only", "in_process,grpc", "--dir", "/dev/shm"]),
        ("two_cores_disk", [str(LEDGER_BENCH), "--seconds", str(args.micro_seconds), "--concurrency", "64",
                            "--only", "in_process,grpc", "--dir", str(db_dir)]),
    ]
    for name, cmd in runs:
        if "/dev/shm" in cmd and not Path("/dev/shm").is_dir():
            continue
        log(f"control-plane microbenchmark: {name}")
        jf = OUT / f"ledger-{name}.json"
        r = subprocess.run(cmd + ["--json", str(jf)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"ledger_bench failed: {r.stderr}")
        for line in r.stderr.splitlines():
            log("  " + line)
        out[name] = json.loads(jf.read_text())
    out["pinned"] = bool(pin)
    return out


# ---------------------------------------------------------------------------------------- targets


def evaluate(res: dict) -> list[dict]:
    t = []

    def add(name, value, target, ok, unit="", cmp="<="):
        t.append({"target": name, "value": value, "limit": target, "unit": unit, "cmp": cmp,
                  "status": "N/A" if ok is None else ("MET" if ok else "MISSED")})

    lat = res.get("latency", {})
    c1 = lat.get("chat c=1")
    if c1:
        d = c1["arms"]["A2"]["added_latency_us"]
        add("A2-A1 chat c=1 p50 added latency", d["p50"], TARGETS["added_p50_us"], d["p50"] <= TARGETS["added_p50_us"], "µs")
        add("A2-A1 chat c=1 p99 added latency", d["p99"], TARGETS["added_p99_us"], d["p99"] <= TARGETS["added_p99_us"], "µs")
        w = c1["arms"].get("W1", {}).get("added_latency_us")
        if w:
            add("  (context) W1-A1 chat c=1, the floor Wasm filter alone: p50 / p99", f"{w['p50']:+,.0f} / {w['p99']:+,.0f}",
                None, None, "µs", cmp="info")
    c8 = lat.get("chat c=8")
    if c8:
        a1, a2 = c8["arms"]["A1"], c8["arms"]["A2"]
        ratio = a2["rps"] / a1["rps"] if a1["rps"] else 0.0
        inv = res.get("invariant", {}).get("ok")
        add("A2/A1 throughput chat c=8", round(ratio, 3), TARGETS["throughput_ratio"], ratio >= TARGETS["throughput_ratio"], cmp=">=")
        w1 = c8["arms"].get("W1")
        if w1 and a1["rps"]:
            add("  (context) W1/A1 throughput chat c=8, the floor Wasm filter alone", round(w1["rps"] / a1["rps"], 3),
                None, None, cmp="info")
        add("A2 errors chat c=8 (all rounds)", a2["errors"], 0, a2["errors"] == 0, cmp="==")
        add("budget invariant after A2 (spent+reserved<=budget, reserved=0, spent=sum settled)",
            "spent " + str(res.get("invariant", {}).get("spent_micros")), "holds", inv, cmp="must")
    for sc in (f"stream{STREAM_TOKENS} c=1", f"stream{STREAM_TOKENS} c=8"):
        s = lat.get(sc)
        if s and s["arms"]["A2"].get("added_ttfb_us"):
            d = s["arms"]["A2"]["added_ttfb_us"]["p50"] / 1000.0
            add(f"A2-A1 TTFB p50 {sc}", round(d, 3), TARGETS["ttfb_added_ms"], d <= TARGETS["ttfb_added_ms"], "ms")
    lb = res.get("ledger", {}).get("one_core_disk")
    if lb:
        best = max(x["pairs_per_s"] for x in lb["in_process"])
        add("control plane Authorize+Settle pairs/s, one core, in process (SQLite on disk, best C)", best,
            TARGETS["cp_pairs_per_s"], best >= TARGETS["cp_pairs_per_s"], "/s", cmp=">=")
    lt = res.get("ledger", {}).get("one_core_tmpfs")
    if lt:
        best = max(x["pairs_per_s"] for x in lt["in_process"])
        add("  same, SQLite on tmpfs (no fsync at checkpoints)", best, TARGETS["cp_pairs_per_s"],
            best >= TARGETS["cp_pairs_per_s"], "/s", cmp=">=")
    mem = res.get("memory")
    if mem:
        v = mem["cp_rss_mb_events"]
        add(f"control-plane RSS, {mem['agents_created']:,} agents + {mem['audit_events']:,} audit events", round(v, 1),
            TARGETS["cp_rss_mb"], v <= TARGETS["cp_rss_mb"], "MB")
    er = res.get("envoy_rss")
    if er:
        g = er["growth_mb"]
        add("Envoy RSS growth with the filter vs plain Envoy (after the load)", round(g, 1),
            TARGETS["envoy_rss_growth_mb"], g <= TARGETS["envoy_rss_growth_mb"], "MB")
    return t


def print_targets(targets: list[dict]):
    print()
    print("Targets")
    for x in targets:
        v = x["value"]
        vs = f"{v:,}" if isinstance(v, (int, float)) else str(v)
        if x["cmp"] == "info":
            print(f"  {'':<7} {x['target']}: {vs} {x['unit']}".rstrip())
            continue
        want = "must hold" if x["cmp"] == "must" else f"target {x['cmp']} {x['limit']:,} {x['unit']}".rstrip()
        print(f"  {x['status']:<7} {x['target']}: {vs} {x['unit']} ({want})")


# ---------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per arm per round")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop rate (0 = skip the open-loop scenario)")
    ap.add_argument("--open-rounds", type=int, default=3)
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--events-seconds", type=float, default=100.0, help="time budget for generating audit events")
    ap.add_argument("--micro-seconds", type=float, default=3.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: latency,memory,ledger")
    ap.add_argument("--json", type=Path, default=OUT / "results.json")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        build()
    res: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "git": git_state(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"json": str(args.json)},
        "request": {"body_bytes": 1024, "stream_chunks": STREAM_TOKENS, "envoy_workers": 1},
    }
    tmp = Path(tempfile.mkdtemp(prefix="aex-bench-"))
    try:
        if "latency" not in skip:
            lat, stack, plain = latency_phase(args, tmp, res)
            res["latency"] = lat
            try:
                res["invariant"] = invariant_phase(stack)
                a1, a2 = rss_mb(plain.proc.pid), rss_mb(stack.procs["envoy"].pid)
                res["envoy_rss"] = {"plain_mb": a1, "aex_mb": a2, "growth_mb": a2 - a1,
                                    "cp_mb_after_load": rss_mb(stack.procs["control-plane"].pid)}
            finally:
                plain.stop()
                stack.stop()
            print_table(lat)
            inv = res["invariant"]
            print(f"Budget invariant after A2: spent {inv['spent_micros']} + reserved {inv['reserved_micros']} "
                  f"<= budget {inv['budget_micros']}; Σ settled charges {inv['settled_charges_micros']}: "
                  f"{'OK' if inv['ok'] else 'BROKEN'}")
            er = res["envoy_rss"]
            print(f"Envoy RSS after the load: plain {er['plain_mb']:.1f} MB, with the filter {er['aex_mb']:.1f} MB "
                  f"(+{er['growth_mb']:.1f} MB); control plane {er['cp_mb_after_load']:.1f} MB")
        if "memory" not in skip:
            res["memory"] = memory_phase(args, tmp)
        if "ledger" not in skip:
            res["ledger"] = ledger_phase(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["targets"] = evaluate(res)
    res["elapsed_s"] = round(time.time() - started, 1)
    if "memory" in res:
        m = res["memory"]
        print(f"\nControl-plane memory: start {m['cp_rss_mb_start']:.1f} MB, {m['agents_created']:,} agents "
              f"{m['cp_rss_mb_agents']:.1f} MB, + {m['audit_events']:,} audit events ({m['generated']['pairs']:,} "
              f"Authorize+Report pairs) {m['cp_rss_mb_events']:.1f} MB; Envoy with those agents "
              f"{m['envoy_rss_mb_agents']:.1f} MB (start {m['envoy_rss_mb_start']:.1f} MB)")
        d = m["cp_rss_detail_events"]
        print(f"  control-plane RSS parts at the end: anon {d['RssAnon']:.1f} MB, file {d['RssFile']:.1f} MB, "
              f"shmem {d['RssShmem']:.1f} MB; peak (VmHWM) {d['VmHWM']:.1f} MB; database files "
              + ", ".join(f"{k} {v:,.1f} MB" for k, v in m["db_files_mb"].items()))
    if "ledger" in res:
        print("\nControl-plane microbenchmark (Authorize+Settle pairs/s):")
        for name in ("one_core_disk", "one_core_tmpfs", "two_cores_disk"):
            lb = res["ledger"].get(name)
            if not lb:
                continue
            parts = []
            if "ledger" in lb:
                parts.append(f"ledger only {lb['ledger']['pairs_per_s']:,.0f}")
            for x in lb.get("in_process", []):
                parts.append(f"in process C={x['concurrency']} {x['pairs_per_s']:,.0f}")
            for x in lb.get("grpc", []):
                parts.append(f"gRPC C={x['concurrency']} {x['pairs_per_s']:,.0f}")
            for x in lb.get("grpc_nagle", []):
                parts.append(f"gRPC without TCP_NODELAY C={x['concurrency']} {x['pairs_per_s']:,.0f}")
            print(f"  {name:<15} (cpus {lb['cpus_allowed']}): " + ", ".join(parts))
    print_targets(res["targets"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(f"\nWrote {args.json} ({res['elapsed_s']:.0f}s)")
    # Performance targets are reported, not enforced; a broken money invariant is a failure.
    if res.get("invariant", {}).get("ok") is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
