#!/usr/bin/env python3
"""What this host charges a process for having been idle (`make idle-penalty`).

The stream-latency test (tests/e2e/test_stream_latency.py) measures time to first byte after a
1.3 s stream, and on the 2-vCPU build VM its numbers swing by milliseconds with no change to AEX.
This script shows where that comes from, with no AEX code on the path: the mock provider alone
(A0) and a plain Envoy in front of it (A1, the bench's router-only Envoy) answer one small
non-streaming chat completion after the client has slept for a while, over a fresh connection.

Each gap is measured twice:
- as is;
- with the memory of the mock, Envoy and this client touched every 20 ms by a helper thread (one
  byte per resident page, through `process_vm_readv`, so nothing of theirs runs).

If touching memory from outside makes the penalty go away, it is the host (the hypervisor
reclaiming or demoting guest pages that were not used for tens of milliseconds), not the CPU
scheduler and not the code on the path: the idle penalty then grows with the memory a request
touches, so every hop a gateway adds pays it too. Loopback only; everything started is stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "tests" / "bench"))

import harness  # noqa: E402
from run import PlainEnvoy  # noqa: E402

GAPS_S = (0.0, 0.05, 0.5)
REPEAT = 15
TOUCH_EVERY_S = 0.02
PAGE = 4096


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def resident_ranges(pid: int) -> list[tuple[int, int]]:
    """Readable mappings of `pid` that hold resident pages (from /proc/PID/smaps), up to 1 GiB each
    (V8 reserves far larger regions it never touches)."""
    out, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                cur = (lo, hi, fields[1])
            elif fields[0] == "Rss:" and cur and int(fields[1]) > 0 and "r" in cur[2] and cur[1] - cur[0] <= 1 << 30:
                out.append((cur[0], cur[1]))
    return out


class Toucher:
    """Reads one byte of every resident page of the given processes every TOUCH_EVERY_S."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.stop_flag = threading.Event()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.buf = ctypes.create_string_buffer(1024)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def plan(self) -> list[tuple[int, ctypes.Array]]:
        batches = []
        for pid in self.pids:
            pages = [p for lo, hi in resident_ranges(pid) for p in range(lo, hi, PAGE)]
            for i in range(0, len(pages), 1024):
                chunk = pages[i : i + 1024]
                batches.append((pid, (_Iovec * len(chunk))(*[_Iovec(p, 1) for p in chunk])))
        return batches

    def run(self):
        local = _Iovec(ctypes.cast(self.buf, ctypes.c_void_p), len(self.buf))
        batches, planned = self.plan(), time.monotonic()
        while not self.stop_flag.is_set():
            if time.monotonic() - planned > 1:
                batches, planned = self.plan(), time.monotonic()
            for pid, iov in batches:
                self.libc.process_vm_readv(pid, ctypes.byref(local), 1, iov, len(iov), 0)
            self.stop_flag.wait(TOUCH_EVERY_S)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join()


def request(port: int) -> bytes:
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "idle"}]}).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def ttfb_ms(port: int, gap: float) -> float:
    """Median time to first byte after sleeping `gap` before each request."""
    req, xs = request(port), []
    for _ in range(REPEAT):
        time.sleep(gap)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            s.sendall(req)
            first = s.recv(65536)
            xs.append((time.perf_counter() - t0) * 1000)
            while first and s.recv(65536):
                pass
    return statistics.median(xs)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="aex-idle-"))
    mock = subprocess.Popen([str(harness.aex_binary()), "mock", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    envoy = None
    try:
        mock_port = int(mock.stdout.readline().decode().rsplit(":", 1)[1])
        envoy = PlainEnvoy(tmp, mock_port)
        ports = {"A0 mock": mock_port, "A1 Envoy": envoy.port}
        for port in ports.values():  # connection pools, first-use paths
            ttfb_ms(port, 0)
        rows = {}
        for touched in (False, True):
            with Toucher([mock.pid, envoy.proc.pid, os.getpid()]) if touched else contextlib.nullcontext():
                for name, port in ports.items():
                    rows[(name, touched)] = [ttfb_ms(port, gap) for gap in GAPS_S]
        print(f"\nTTFB (ms, median of {REPEAT}) of a small chat completion after the client slept "
              f"before each request; fresh connection each time")
        print(f"{'':28}" + "".join(f"{f'idle {g:g} s':>12}" for g in GAPS_S))
        for (name, touched), vals in rows.items():
            label = f"{name}, {'memory touched' if touched else 'as is'}"
            print(f"{label:28}" + "".join(f"{v:12.2f}" for v in vals))
        return 0
    finally:
        if envoy:
            envoy.stop()
        mock.kill()
        mock.wait()


if __name__ == "__main__":
    sys.exit(main())
