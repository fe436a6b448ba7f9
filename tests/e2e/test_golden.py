"""Golden wire-format tests: what the provider sends is what the client gets, byte for byte.

For every governed endpoint (chat/completions, legacy completions, embeddings, responses; plain
and streamed; tools; Groq-style usage; upstream errors) the test

1. fetches the upstream response directly from the mock provider with raw HTTP and checks it is
   still byte-identical to the recorded golden file in `tests/e2e/golden/` (modulo ids and
   timestamps, normalised by `normalise`), so a change in the mock cannot silently weaken the
   comparison;
2. sends the same request through the gateway with raw HTTP (http.client, reading the de-chunked
   body as sent) and checks the body is byte-identical to the direct one after the same
   normalisation, SSE event for SSE event, and that the provider's headers reach the client;
3. checks the body the provider received from the gateway is the client's bytes, except for the
   documented governance edits (README, "Governance edits"), which are asserted explicitly.

The one documented response edit: a chat (or legacy completions) stream whose client did not ask
for usage is forwarded with `stream_options.include_usage=true` so it can be metered, and the
usage-only event is removed from what the client sees. Because the provider was asked for usage,
it marks every other chunk with `"usage":null` (OpenAI does the same), so the client's stream is
*the provider's answer to the request with include_usage, minus exactly the usage-only event* —
not the provider's answer to the request as sent. `test_chat_stream_without_client_usage_*`
asserts both facts.

Regenerate the golden files (only when the mock deliberately changes) with
`AEX_UPDATE_GOLDEN=1 pytest tests/e2e/test_golden.py`.
"""

from __future__ import annotations

import http.client
import json
import os
import re
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("AEX_UPDATE_GOLDEN") == "1"

# Per-call values: mock ids carry the mock's request counter, timestamps the clock.
_NORMALISE = [
    (re.compile(rb"\b(chatcmpl|cmpl)-mock-\d+"), rb"\1-mock-N"),
    (re.compile(rb"\b(resp|msg|fc|call|req)_mock_\d+"), rb"\1_mock_N"),
    (re.compile(rb'"(created|created_at)":\d+'), rb'"\1":0'),
]


def normalise(body: bytes) -> bytes:
    for rx, rep in _NORMALISE:
        body = rx.sub(rep, body)
    return body


def raw(port: int, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
    """One request on a fresh connection; headers lower-cased, body as the server sent it (after
    HTTP/1.1 de-chunking, which is framing, not content)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        hs: dict[str, str] = {}
        for k, v in r.getheaders():
            hs[k.lower()] = v if k.lower() not in hs else hs[k.lower()] + ", " + v
        return r.status, hs, r.read()
    finally:
        conn.close()


def sse_events(body: bytes) -> list[bytes]:
    """The events of an SSE body, each with its terminating blank line; the whole body must be
    events (nothing left over)."""
    events = re.findall(rb".*?\n\n", body, re.S)
    assert b"".join(events) == body, f"trailing bytes after the last event: {body[len(b''.join(events)):]!r}"
    return events


def is_usage_only(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            v = json.loads(line[6:])
            return v.get("choices") == [] and isinstance(v.get("usage"), dict)
    return False


# ---------------------------------------------------------------------------------- the cases

HELLO = [{"role": "user", "content": "Say hello to the golden file"}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
RESP_TOOL = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}


def js(v) -> bytes:
    """Compact JSON, key order kept: what the tests send and what golden names refer to."""
    return json.dumps(v, separators=(",", ":")).encode()


# name -> (path, client body, extra headers, expected status, streamed)
CASES: dict[str, tuple[str, bytes, dict, int, bool]] = {
    # Odd spacing, an unknown field and number formats the gateway must not re-serialise.
    "chat": ("/v1/chat/completions",
             b'{"model": "test-model",  "messages":[{"role":"user","content":"Say hello \\u00e9\xc3\xa9"}],'
             b' "temperature": 0.70, "x_unknown_field": {"a": [1, 2.50, 1e3]}}', {}, 200, False),
    "chat_json_mode": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "response_format": {"type": "json_object"}}), {}, 200, False),
    "chat_tools": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "tools": [TOOL]}), {}, 200, False),
    "chat_n2": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "n": 2, "max_tokens": 5}), {}, 200, False),
    "chat_stream_usage": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}), {}, 200, True),
    "chat_stream_tools_usage": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}, "tools": [TOOL]}), {}, 200, True),
    "chat_stream_n2_usage": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True, "n": 2, "max_completion_tokens": 4, "stream_options": {"include_usage": True}}), {}, 200, True),
    # Groq reports usage in x_groq.usage of the last chunk and never sends a usage chunk.
    "chat_stream_groq": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True}), {"x-mock-groq": "1"}, 200, True),
    "completions": ("/v1/completions", js({"model": "test-model", "prompt": ["one prompt", "two"], "max_tokens": 6}), {}, 200, False),
    "completions_stream_usage": ("/v1/completions", js({"model": "test-model", "prompt": "a prompt", "stream": True, "stream_options": {"include_usage": True}}), {}, 200, True),
    "embeddings": ("/v1/embeddings", js({"model": "test-embed", "input": ["alpha", "beta"]}), {}, 200, False),
    "embeddings_base64": ("/v1/embeddings", js({"model": "test-embed", "input": "alpha", "encoding_format": "base64", "dimensions": 16}), {}, 200, False),
    "responses": ("/v1/responses", js({"model": "test-model", "input": "Say hello", "instructions": "Be brief", "metadata": {"k": "v"}}), {}, 200, False),
    "responses_tools": ("/v1/responses", js({"model": "test-model", "input": [{"role": "user", "content": "weather?"}], "tools": [RESP_TOOL]}), {}, 200, False),
    "responses_stream": ("/v1/responses", js({"model": "test-model", "input": "Say hello", "stream": True}), {}, 200, True),
    "responses_stream_incomplete": ("/v1/responses", js({"model": "test-model", "input": "Say hello", "stream": True, "max_output_tokens": 5}), {}, 200, True),
    "responses_stream_tools": ("/v1/responses", js({"model": "test-model", "input": "weather?", "stream": True, "tools": [RESP_TOOL]}), {}, 200, True),
    # Upstream errors: status, body and headers (retry-after) pass through unchanged.
    "error_429": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO}), {"x-mock-error": "429"}, 429, False),
    "error_500": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}), {"x-mock-error": "500"}, 500, False),
    "error_429_stream_injected": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "stream": True}), {"x-mock-error": "429"}, 429, False),
    "error_400": ("/v1/responses", js({"model": "test-model", "input": "x"}), {"x-mock-error": "400"}, 400, False),
    # A genuine provider validation error (the gateway has no reason to refuse it).
    "error_400_invalid_n": ("/v1/chat/completions", js({"model": "test-model", "messages": HELLO, "n": 500}), {}, 400, False),
    "error_400_empty_messages": ("/v1/chat/completions", js({"model": "test-model", "messages": []}), {}, 400, False),
}


def golden_path(name: str, streamed: bool) -> Path:
    return GOLDEN / f"{name}.{'sse' if streamed else 'json'}"


def check_golden(name: str, streamed: bool, direct_norm: bytes):
    p = golden_path(name, streamed)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        p.write_bytes(direct_norm)
    assert p.is_file(), f"golden file {p} missing (regenerate with AEX_UPDATE_GOLDEN=1)"
    assert direct_norm == p.read_bytes(), f"the mock's output for {name!r} no longer matches {p.name}"


@pytest.fixture(scope="module")
def agent(stack):
    # A big budget: no output-cap clamp may ever apply here.
    return stack.create_agent("golden-agent", "100.00", 100000)


def direct(stack, path: str, body: bytes, extra: dict) -> tuple[int, dict, bytes]:
    h = {"content-type": "application/json", "authorization": f"Bearer {stack.provider_key}", **extra}
    return raw(stack.mock_port, "POST", path, body, h)


def gateway(stack, token: str, path: str, body: bytes, extra: dict) -> tuple[int, dict, bytes]:
    h = {"content-type": "application/json", "authorization": f"Bearer {token}", **extra}
    return raw(stack.ports["envoy"], "POST", path, body, h)


def last_forwarded(stack) -> dict:
    reqs = stack.mock_requests()
    assert reqs, "the provider received nothing"
    return reqs[-1]


def assert_headers_preserved(name: str, dh: dict, gh: dict, gbody: bytes, streamed: bool):
    """The provider's headers reach the client: content type, request id (of this very call),
    processing time, rate-limit headers, retry-after."""
    assert gh.get("content-type") == dh.get("content-type"), (name, dh, gh)
    m = re.fullmatch(r"req_mock_(\d+)", gh.get("x-request-id", ""))
    assert m, f"{name}: the provider's x-request-id did not reach the client: {gh}"
    ids = set(re.findall(rb"(?:chatcmpl|cmpl)-mock-(\d+)|(?:resp|msg|fc|call)_mock_(\d+)", gbody))
    nums = {a or b for a, b in ids}
    if nums:
        assert nums == {m.group(1).encode()}, f"{name}: x-request-id {gh['x-request-id']} is not this response's ({nums})"
    assert gh.get("openai-processing-ms", "").isdigit(), (name, gh)
    for k in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "retry-after", "cache-control"):
        assert gh.get(k) == dh.get(k), f"{name}: header {k}: direct {dh.get(k)!r}, gateway {gh.get(k)!r}"
    if not streamed:
        assert gh.get("content-length") == str(len(gbody)), (name, gh)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", list(CASES))
def test_gateway_body_is_byte_identical_to_the_providers(stack, agent, name):
    path, body, extra, status, streamed = CASES[name]
    ds, dh, dbody = direct(stack, path, body, extra)
    assert ds == status, (name, ds, dbody[:300])
    check_golden(name, streamed, normalise(dbody))

    gs, gh, gbody = gateway(stack, agent["token"], path, body, extra)
    fwd = last_forwarded(stack)
    assert gs == ds, f"{name}: status direct {ds}, gateway {gs}: {gbody[:300]!r}"
    assert normalise(gbody) == normalise(dbody), f"{name}: gateway body differs from the provider's"
    if streamed:
        de, ge = sse_events(normalise(dbody)), sse_events(normalise(gbody))
        assert len(ge) == len(de) and ge == de, f"{name}: SSE events differ ({len(de)} direct, {len(ge)} gateway)"
    assert_headers_preserved(name, dh, gh, gbody, streamed)

    # The provider received the client's bytes exactly, but for the documented usage injection
    # (chat streams whose client did not ask for usage: the Groq case and one error case here).
    assert fwd["path"] == path and fwd["query"] is None
    req = json.loads(body)
    injected = req.get("stream") is True and path != "/v1/responses" and "stream_options" not in req
    assert injected == (name in ("chat_stream_groq", "error_429_stream_injected"))
    want = _inject_usage_expected(body) if injected else body
    assert fwd["body"] == want.decode(), f"{name}: request body altered:\n{fwd['body']!r}\n{want!r}"
    assert fwd["headers"]["authorization"] == f"Bearer {stack.provider_key}"
    for k, v in extra.items():
        assert fwd["headers"].get(k) == v


def _inject_usage_expected(body: bytes) -> bytes:
    """The documented edit: `"stream_options":{"include_usage":true}` inserted as the first member
    of a body that had none; every other byte kept."""
    assert body.startswith(b"{") and b"stream_options" not in body
    return b'{"stream_options":{"include_usage":true},' + body[1:]


@pytest.mark.parametrize("path,req", [
    ("/v1/chat/completions", {"model": "test-model", "messages": HELLO, "stream": True}),
    ("/v1/chat/completions", {"model": "test-model", "messages": HELLO, "stream": True, "tools": [TOOL]}),
    ("/v1/completions", {"model": "test-model", "prompt": "a prompt", "stream": True}),
], ids=["chat", "chat_tools", "completions"])
def test_stream_without_client_usage_is_direct_with_usage_minus_the_usage_event(stack, agent, path, req):
    name = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}[path] + ("_tools" if "tools" in req else "")
    body = js(req)
    with_usage = js({**req, "stream_options": {"include_usage": True}})

    s1, _, plain = direct(stack, path, body, {})
    s2, dh, asked = direct(stack, path, with_usage, {})
    assert s1 == s2 == 200
    plain_n, asked_n = normalise(plain), normalise(asked)
    check_golden(f"{name}_stream", True, plain_n)
    check_golden(f"{name}_stream_with_usage", True, asked_n)

    gs, gh, gbody = gateway(stack, agent["token"], path, body, {})
    assert gs == 200
    fwd = last_forwarded(stack)
    # Request edit: exactly the include_usage injection.
    assert fwd["body"] == _inject_usage_expected(body).decode(), fwd["body"]

    g_events = sse_events(normalise(gbody))
    asked_events = sse_events(asked_n)
    usage_events = [e for e in asked_events if is_usage_only(e)]
    assert len(usage_events) == 1, "the provider sends one usage-only event when asked"
    expected = [e for e in asked_events if not is_usage_only(e)]
    assert g_events == expected, "client stream = provider's stream for the forwarded request minus the usage-only event"
    assert not any(is_usage_only(e) for e in g_events)
    assert g_events[-1] == b"data: [DONE]\n\n"
    # Documented consequence: every chunk carries `"usage":null` because the provider was asked
    # for usage; apart from that the stream equals what the client would have had directly.
    data_chunks = [e for e in g_events if e != b"data: [DONE]\n\n"]
    assert data_chunks and all(b',"usage":null}' in e for e in data_chunks)
    assert b"".join(e.replace(b',"usage":null}', b"}") for e in g_events) == plain_n
    assert len(g_events) == len(sse_events(plain_n)), "same number and order of events as the direct stream"
    assert_headers_preserved(name, dh, gh, gbody, True)


def test_stream_options_of_the_client_are_kept_when_usage_is_injected(stack, agent):
    """`include_usage: false` is overridden (metering needs it); other stream_options members
    are kept; the client sees no usage event."""
    req = {"model": "test-model", "messages": HELLO, "stream": True, "stream_options": {"include_usage": False}}
    body = js(req)
    s, _, asked = direct(stack, "/v1/chat/completions", js({**req, "stream_options": {"include_usage": True}}), {})
    assert s == 200
    gs, _, gbody = gateway(stack, agent["token"], "/v1/chat/completions", body, {})
    assert gs == 200
    fwd = json.loads(last_forwarded(stack)["body"])
    assert fwd["stream_options"] == {"include_usage": True}
    assert fwd == {**req, "stream_options": {"include_usage": True}}
    assert sse_events(normalise(gbody)) == [e for e in sse_events(normalise(asked)) if not is_usage_only(e)]


def test_upstream_model_is_the_only_edit_for_a_mapped_model(stack, agent):
    """test-mini maps to upstream `mock/mini-2024`: the provider gets the client's bytes with the
    model value replaced in place, and the client gets the provider's body unchanged (which
    names the upstream model, as the provider does)."""
    for stream in (False, True):
        req = {"model": "test-mini", "messages": HELLO, "temperature": 0.5}
        if stream:
            req.update(stream=True, stream_options={"include_usage": True})
        body = js(req)
        up = body.replace(b'"model":"test-mini"', b'"model":"mock/mini-2024"')
        ds, _, dbody = direct(stack, "/v1/chat/completions", up, {})
        assert ds == 200
        check_golden(f"chat_mini{'_stream_usage' if stream else ''}", stream, normalise(dbody))
        gs, _, gbody = gateway(stack, agent["token"], "/v1/chat/completions", body, {})
        assert gs == 200
        assert last_forwarded(stack)["body"] == up.decode()
        assert normalise(gbody) == normalise(dbody)
        assert b'"model":"mock/mini-2024"' in gbody


def test_query_string_and_unusual_bytes_reach_the_provider_unchanged(stack, agent):
    """The client's query string is kept on the upstream path; a body with escapes, raw UTF-8,
    odd spacing and unknown members is forwarded byte for byte."""
    body = (b'{ "model" : "test-model" ,\n\t"messages": [ {"role":"user", "content":"caf\xc3\xa9 \\u00e9 \\ud83d\\ude80 \\"q\\""} ],'
            b'\r\n "seed": 42, "logit_bias": {"50256": -100}, "metadata": {"nested": [null, true, 1.0e-3]} }\n')
    path = "/v1/chat/completions?api-version=2024-10-21&x=%2F%20y"
    gs, _, gbody = gateway(stack, agent["token"], path, body, {})
    fwd = last_forwarded(stack)
    assert gs == 200, gbody[:300]
    assert fwd["path"] == "/v1/chat/completions" and fwd["query"] == "api-version=2024-10-21&x=%2F%20y"
    assert fwd["body"].encode() == body
    ds, _, dbody = direct(stack, path, body, {})
    assert ds == 200 and normalise(gbody) == normalise(dbody)


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def test_no_undocumented_header_edits(stack, agent):
    """Headers pass through too. Request: the provider gets the client's headers except the
    documented edits (Authorization replaced by the provider key, accept-encoding: identity,
    client credential and billing-selector headers removed; Host points at the provider).
    Response: the client gets the provider's headers (per-call values aside) and only AEX's
    documented `x-aex-request-id` added. Hop-by-hop framing headers are the proxy's business."""
    body = js({"model": "test-model", "messages": HELLO})
    extra = {"x-client-trace": "abc-123", "openai-organization": "org-x", "user-agent": "golden/1.0", "accept": "application/json"}
    ds, dh, _ = direct(stack, "/v1/chat/completions", body, extra)
    gs, gh, _ = gateway(stack, agent["token"], "/v1/chat/completions", body, extra)
    assert ds == gs == 200
    fwd = last_forwarded(stack)["headers"]
    sent = {"content-type": "application/json", "authorization": f"Bearer {agent['token']}", "content-length": str(len(body)),
            "accept-encoding": "identity", **extra}  # http.client adds accept-encoding: identity
    want = dict(sent)  # the client's accept-encoding is identity already: no edit
    want["authorization"] = f"Bearer {stack.provider_key}"
    del want["openai-organization"]  # documented: an agent does not pick what the key bills
    got = {k: v for k, v in fwd.items() if k not in HOP_BY_HOP and k != "host"}
    problems = []
    if got != want:
        problems.append(f"request headers at the provider: added {sorted(set(got) - set(want))} "
                        f"{ {k: got[k] for k in set(got) - set(want)} }, missing {sorted(set(want) - set(got))}, "
                        f"changed { {k: (want[k], got[k]) for k in set(got) & set(want) if got[k] != want[k]} }")
    per_call = {"date", "openai-processing-ms", "x-request-id"}
    dkeys = {k for k in dh if k not in HOP_BY_HOP}
    gkeys = {k for k in gh if k not in HOP_BY_HOP}
    # Documented: the id AEX's audit log records the request under.
    if not gh.get("x-aex-request-id", "").startswith("req_"):
        problems.append(f"x-aex-request-id missing: {gh}")
    gkeys.discard("x-aex-request-id")
    if gkeys != dkeys:
        problems.append(f"response headers at the client: added { {k: gh[k] for k in gkeys - dkeys} }, missing {sorted(dkeys - gkeys)}")
    changed = {k: (dh[k], gh[k]) for k in dkeys & gkeys - per_call if dh[k] != gh[k]}
    if changed:
        problems.append(f"response headers changed: {changed}")
    assert not problems, "\n".join(problems)


def test_golden_directory_has_no_stale_files():
    """Every golden file belongs to a case, so a renamed case cannot leave an unchecked file."""
    expected = {golden_path(n, c[4]).name for n, c in CASES.items()}
    expected |= {f"{n}_stream.sse" for n in ("chat", "chat_tools", "completions")}
    expected |= {f"{n}_stream_with_usage.sse" for n in ("chat", "chat_tools", "completions")}
    expected |= {"chat_mini.json", "chat_mini_stream_usage.sse"}
    present = {p.name for p in GOLDEN.iterdir()}
    assert present == expected, f"unexpected: {present - expected}, missing: {expected - present}"


def read_until_cut(port: int, path: str, body: bytes, headers: dict) -> tuple[int, bytes, bool]:
    """Reads a stream that the provider cuts: (status, body bytes that arrived, ended cleanly)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        got = b""
        try:
            while chunk := r.read1(65536):
                got += chunk
            return r.status, got, True
        except (http.client.IncompleteRead, ConnectionError) as e:
            return r.status, got + getattr(e, "partial", b""), False
    finally:
        conn.close()


@pytest.mark.parametrize("usage", [True, False], ids=["client-usage", "injected-usage"])
def test_cut_stream_delivers_the_same_events_before_the_cut(stack, agent, usage):
    """A provider that drops the connection mid-stream: the client gets exactly the events the
    provider sent before the cut, and no clean end (no terminating chunk)."""
    req = {"model": "test-model", "messages": HELLO, "stream": True}
    if usage:
        req["stream_options"] = {"include_usage": True}
    body = js(req)
    extra = {"x-mock-cut-after": "5", "content-type": "application/json"}
    ds, dbody, dclean = read_until_cut(stack.mock_port, "/v1/chat/completions", js({**req, "stream_options": {"include_usage": True}}),
                                       {**extra, "authorization": f"Bearer {stack.provider_key}"})
    gs, gbody, gclean = read_until_cut(stack.ports["envoy"], "/v1/chat/completions", body, {**extra, "authorization": f"Bearer {agent['token']}"})
    assert ds == gs == 200
    assert not dclean and not gclean, "a cut stream must not look complete to the client"
    de = sse_events(normalise(dbody))
    assert len(de) == 5
    assert sse_events(normalise(gbody)) == de
