"""A provider whose bytes a test controls exactly: framing, line endings, where a body stops.

`RawUpstream` accepts connections on a free loopback port and, per request, runs the scenario
named by the request's `x-scenario` header: a list of actions, each bytes (one write), a float
(sleep seconds) or "rst" (abortive close). The connection is closed after the last action, so a
body framed by neither length nor chunking ends there (RFC 9112 §6.3).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Callable

from harness import free_port

Action = bytes | float | str


class RawUpstream:
    def __init__(self):
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.scenarios: dict[str, Callable[[dict], list[Action]]] = {}
        self.requests: list[dict] = []
        self._stopped = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self):
        self._stopped = True
        for s in [self.sock, *self._conns]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            req = read_request(c)
            if req is None:
                return
            self.requests.append(req)
            scenario = self.scenarios.get(req["headers"].get("x-scenario", ""))
            actions = scenario(req) if scenario else [response(404, b'{"error":{"message":"no such scenario"}}')]
            for a in actions:
                if isinstance(a, (bytes, bytearray)):
                    c.sendall(a)
                elif isinstance(a, (int, float)):
                    time.sleep(a)
                elif a == "rst":
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
            c.shutdown(socket.SHUT_WR)
            time.sleep(0.2)
        except OSError:
            pass
        finally:
            c.close()


def read_request(c: socket.socket) -> dict | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            return None
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            d = c.recv(65536)
            if not d:
                break
            rest += d
        body = rest[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += c.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += c.recv(65536)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                break
    else:
        body = b""
    return dict(method=method, path=path, headers=headers, body=body)


def status_line(status: int = 200, headers: list[tuple[str, str]] = ()) -> bytes:
    return (f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return status_line(status, [("content-type", content_type), ("content-length", str(len(body))), ("connection", "close")]) + body


def chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


LAST_CHUNK = b"0\r\n\r\n"


def chunked(parts: list[bytes], content_type: str | None = "text/event-stream", end: bool = True) -> list[Action]:
    """Each part its own HTTP chunk and TCP write, 20 ms apart; `end`: the terminating chunk."""
    hs = ([("content-type", content_type)] if content_type else []) + [("transfer-encoding", "chunked"), ("connection", "close")]
    out: list[Action] = [status_line(200, hs)]
    for p in parts:
        out += [chunk(p), 0.02]
    return out + ([LAST_CHUNK] if end else [])


def close_delimited(parts: list[bytes], content_type: str = "text/event-stream") -> list[Action]:
    """A body with neither length nor chunking: it ends when the connection closes."""
    out: list[Action] = [status_line(200, [("content-type", content_type), ("connection", "close")])]
    for p in parts:
        out += [p, 0.02]
    return out


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def content_chunk(text: str, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw-model",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], **extra}


def usage_chunk(prompt: int, completion: int) -> dict:
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw-model", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
