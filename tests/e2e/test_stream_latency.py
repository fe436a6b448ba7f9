"""Streaming latency: the gateway adds no delay to a stream.

A 64-event chat stream (`x-mock-output-tokens: 61` → role chunk + 61 word chunks + finish chunk +
`[DONE]`) with `x-mock-chunk-delay-ms: 20` is read over a raw socket, directly from the mock and
through the gateway, interleaved round by round so both see the same machine load. Every recv is
timestamped; each SSE event is stamped with the recv that completed it. Measured:

- TTFB: from the request being sent (taken just before the send: taken after it, a fast server
  can answer before the client reads its clock) to the first response byte received;
- TTFE: to the first complete SSE event;
- gaps: between consecutive events (each ~20 ms by construction).

The issue's targets are 1 ms at the median for both. Every stream is a full 64-event stream,
measured in two orders:

- back to back: blocks of streams through the gateway, through a plain Envoy (the bench's A1:
  same listener and router, no filter) and directly, in turn, each block over one keep-alive
  connection (as the OpenAI SDK pools them) — the agent streams continuously, as an agent loop
  does. From its second request within 3 s the Envoy worker serving the connection holds a lease
  for the agent, so its requests are admitted with no round trip. Medians are taken over each
  block's streams after its first two (which start the loop and, through the gateway, are decided
  by a round trip: printed as "TTFB 1st2").
- idle between: one gateway stream, one direct stream, alternately, each over a fresh connection,
  so the gateway sits idle for 1.3 s before each of its streams (and a fresh connection may land
  on another Envoy worker, which holds no lease for the agent: a round trip decides it).

What is asserted, and why. Asserted: the inter-chunk gap target (median within 1 ms of direct;
measured +0.00 to +0.03 ms), and that every back-to-back gateway stream past a block's start was
admitted under a lease — no round trip on that path. The TTFB target is printed, not asserted,
because on this 2-vCPU host it measures the host's phase more than AEX: the same test measured
plain Envoy's back-to-back TTFB at 0.9 ms in one phase and 2.0–4.1 ms in another (direct 0.35 vs
0.7–1.4 ms), gateway − plain Envoy from −0.4 to +2.3 ms, gateway − direct from +0.46 to +3.9 ms,
and after an idle spell up to +13 ms. The issue's TTFB target is therefore not met reliably here
(see the issue notes). `make idle-penalty` shows why: this VM charges a process for memory it has
not touched for tens of milliseconds (a plain Envoy's first byte after 0.5 s idle: ~5 ms, ~1 ms
with its memory touched from outside every 20 ms), and a stream's first byte follows 1.3 s in
which the request path sat idle.

The gaps are asserted over every stream. Two variants: the SDK default (client did not ask for usage: the gateway injects it and removes the usage event,
holding partial events) and a client that asks for usage (pure pass-through). Run with `-s` to see
the table. In the usage-injected variant one gap per stream is ~40 ms (p99/max +20 ms): the
usage-only event the client did not ask for is removed, so the finish event and `[DONE]` arrive
two provider intervals apart — nothing is held.
"""

from __future__ import annotations

GAP_TARGET_MS = 1.0

import json
import socket
import statistics
import sys
import time

import pytest

from harness import REPO

sys.path.insert(0, str(REPO / "tests" / "bench"))
from run import PlainEnvoy  # noqa: E402  (the bench's A1: same listener and router, no filter)

# Idle between: gateway and direct streams alternate.
ROUNDS = 4
# Back to back: blocks of this many streams per path, alternating, BLOCKS times each. The first
# WARM of a block start the agent's loop (on the gateway they are decided by a round trip: the
# worker asks for a lease at the agent's second request); they are printed, not in the median.
BLOCK = 5
BLOCKS = 2
WARM = 2
WORDS = 61  # role + 61 words + finish + [DONE] = 64 events
EVENTS = WORDS + 3
DELAY_MS = 20


def request_bytes(port: int, token: str, include_usage: bool, words: int = WORDS, delay: int = DELAY_MS,
                  keep_alive: bool = False) -> bytes:
    body = {"model": "test-model", "messages": [{"role": "user", "content": "latency"}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        f"x-mock-output-tokens: {words}\r\nx-mock-chunk-delay-ms: {delay}\r\n\r\n"
    ).encode()
    return head + data


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def measure(port: int, req: bytes, events: int, conn: socket.socket | None = None) -> dict:
    """One stream: TTFB, time to first event, per-event timestamps. Over a fresh connection, read
    to its close; over `conn` (a keep-alive connection, as SDK clients pool them), read to the
    end of the chunked body."""
    if conn is None:
        with connect(port) as s:
            return read_stream(s, port, req, events, keep_alive=False)
    return read_stream(conn, port, req, events, keep_alive=True)


def read_stream(s: socket.socket, port: int, req: bytes, events: int, keep_alive: bool) -> dict:
    t0 = time.perf_counter()
    s.sendall(req)
    buf = b""
    first_byte = None
    stamps: list[float] = []
    body_start = None
    while True:
        if keep_alive and body_start is not None and chunked_done(buf[body_start:]):
            break
        chunk = s.recv(65536)
        now = time.perf_counter()
        if not chunk:
            break
        if first_byte is None:
            first_byte = now
        buf += chunk
        if body_start is None:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                continue
            body_start = i + 4
        # Count SSE event terminators in the body so far (chunked framing lines never
        # contain a blank line of their own within the event data).
        n = dechunk(buf[body_start:]).count(b"\n\n")
        stamps.extend([now] * (n - len(stamps)))
    status = int(buf.split(b" ", 2)[1])
    assert status == 200, buf[:500]
    body = dechunk(buf[body_start:])
    assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
    assert len(stamps) == events, f"port {port}: {len(stamps)} events, expected {events}"
    return {
        "ttfb": (first_byte - t0) * 1000,
        "ttfe": (stamps[0] - t0) * 1000,
        "gaps": [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])],
    }


def parse_chunked(raw: bytes) -> tuple[bytes, bool]:
    """The payload of a (possibly incomplete) chunked body — an incomplete last chunk yields what
    has arrived of it — and whether the body is complete (its zero-size chunk and final CRLF)."""
    out, i = b"", 0
    while True:
        j = raw.find(b"\r\n", i)
        if j < 0:
            return out, False
        size = int(raw[i:j].split(b";")[0] or b"0", 16)
        if size == 0:
            return out, raw.endswith(b"\r\n\r\n", j)
        out += raw[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
        if i > len(raw):
            return out, False


def chunked_done(raw: bytes) -> bool:
    return parse_chunked(raw)[1]


def dechunk(raw: bytes) -> bytes:
    return parse_chunked(raw)[0]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


@pytest.fixture
def plain(stack, tmp_path):
    p = PlainEnvoy(tmp_path, stack.mock_port, concurrency=stack.concurrency)
    yield p
    p.stop()


@pytest.mark.parametrize("include_usage", [False, True], ids=["usage-injected", "usage-asked"])
def test_stream_gaps_within_1ms_and_ttfb_measured(stack, plain, agent_name, include_usage):
    a = stack.create_agent(agent_name, "100.00", 100000)
    gw_req = request_bytes(stack.ports["envoy"], a["token"], include_usage)
    dr_req = request_bytes(stack.mock_port, stack.provider_key, include_usage)
    gw_keep = request_bytes(stack.ports["envoy"], a["token"], include_usage, keep_alive=True)
    dr_keep = request_bytes(stack.mock_port, stack.provider_key, include_usage, keep_alive=True)
    pl_keep = request_bytes(plain.port, stack.provider_key, include_usage, keep_alive=True)
    # With usage asked for, the client also gets the usage-only event.
    n = EVENTS + (1 if include_usage else 0)
    # Warm both paths (connection pools, wasm JIT).
    measure(stack.mock_port, dr_req, n)
    measure(stack.ports["envoy"], gw_req, n)

    ports = {"direct": (stack.mock_port, dr_req), "gateway": (stack.ports["envoy"], gw_req)}
    idle = {"direct": [], "gateway": []}
    for _ in range(ROUNDS):
        for k, (port, req) in ports.items():
            idle[k].append(measure(port, req, n))
    # Back to back over one keep-alive connection per block, as an SDK client sends an agent's calls.
    keep = {"direct": dr_keep, "gateway": gw_keep, "envoy": pl_keep}
    block_ports = {"direct": stack.mock_port, "gateway": stack.ports["envoy"], "envoy": plain.port}
    busy = {"direct": [], "gateway": [], "envoy": []}
    first = {"direct": [], "gateway": [], "envoy": []}
    gateway_blocks_ms = []
    for _ in range(BLOCKS):
        for k in ("gateway", "envoy", "direct"):
            if k == "gateway":
                gateway_blocks_ms.append(time.time() * 1000)
            port = block_ports[k]
            with connect(port) as conn:
                block = [measure(port, keep[k], n, conn) for _ in range(BLOCK)]
            first[k].extend(block[:WARM])
            busy[k].extend(block[WARM:])

    rows = {}
    for k in ("direct", "envoy", "gateway"):
        runs = idle.get(k, []) + first[k] + busy[k]
        gaps = [g for r in runs for g in r["gaps"]]
        rows[k] = dict(busy=statistics.median(r["ttfb"] for r in busy[k]),
                       idle=statistics.median(r["ttfb"] for r in idle[k]) if k in idle else float("nan"),
                       first=statistics.median(r["ttfb"] for r in first[k]),
                       ttfe=statistics.median(r["ttfe"] for r in busy[k]), gap=statistics.median(gaps),
                       p90=pct(gaps, 90), p99=pct(gaps, 99), max=max(gaps))
    print(f"\nstream latency, {EVENTS} events, {DELAY_MS} ms apart; TTFB back to back ({BLOCKS} blocks of {BLOCK} "
          f"per path, median after the first {WARM} of each) and idle between ({ROUNDS} alternating rounds); "
          f"{'client asked for usage' if include_usage else 'usage injected by the gateway'} (ms); aex binary {stack.aex_bin}")
    print(f"{'':10}{'TTFB busy':>10}{'TTFB 1st2':>10}{'TTFB idle':>10}{'1st event':>11}{'gap med':>10}{'gap p90':>10}{'gap p99':>10}{'gap max':>10}")
    for k, r in rows.items():
        print(f"{k:10}{r['busy']:10.3f}{r['first']:10.3f}{r['idle']:10.3f}{r['ttfe']:11.3f}{r['gap']:10.3f}{r['p90']:10.3f}{r['p99']:10.3f}{r['max']:10.3f}")
    d, e, g = rows["direct"], rows["envoy"], rows["gateway"]
    print(f"{'delta':10}{g['busy'] - d['busy']:10.3f}{g['first'] - d['first']:10.3f}{g['idle'] - d['idle']:10.3f}{g['ttfe'] - d['ttfe']:11.3f}{g['gap'] - d['gap']:10.3f}"
          f"{g['p90'] - d['p90']:10.3f}{g['p99'] - d['p99']:10.3f}{g['max'] - d['max']:10.3f}")

    print(f"{'gw-envoy':10}{g['busy'] - e['busy']:10.3f}{g['first'] - e['first']:10.3f}")

    # The back-to-back gateway streams past each block's start were admitted under a lease: no
    # round trip on the path the timing below measures. (Admissions are audited when reported,
    # after the request: each gateway block's window runs to the next one's start.)
    stack.wait_settled(agent_name)
    allowed = stack.audit(a["id"], "request.allowed")
    bounds = gateway_blocks_ms + [float("inf")]
    leased = [sum(1 for ev in allowed if lo <= ev["ts_ms"] < hi and ev["payload"].get("lease"))
              for lo, hi in zip(bounds, bounds[1:])]
    print(f"gateway streams admitted under a lease, per block of {BLOCK}: {leased}")
    assert all(n >= BLOCK - WARM for n in leased), leased

    assert abs(g["gap"] - d["gap"]) <= GAP_TARGET_MS, f"median inter-chunk gap: gateway {g['gap']:.3f} ms vs direct {d['gap']:.3f} ms"
