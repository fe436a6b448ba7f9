"""Policy enforcement through real Envoy: rate limits, every policy denial with its exact
status / type / code (via the OpenAI SDK and raw HTTP), token lifecycle (TTL, rotation, deletion,
live updates), passthrough and provider-key secrecy, and malformed input. Every denial must reach
nothing upstream, charge nothing and be audited as `request.denied` with its code."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import time
from pathlib import Path

import openai
import pytest

from harness import error_code, http

HELLO = [{"role": "user", "content": "hello"}]
TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def fn_tool(name: str) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": name, "parameters": {"type": "object", "properties": {}}},
    }


def chat(model: str = "test-model", **kw) -> dict:
    return {"model": model, "messages": kw.pop("messages", HELLO), **kw}


def auth(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def poll(fn, ok, deadline: float, interval: float = 0.02):
    """Calls fn until ok(result) or the absolute deadline (time.monotonic()) passes. Returns the last
    result; fails if the first ok result came back after the deadline."""
    while True:
        r = fn()
        done = time.monotonic()
        if ok(r):
            assert done <= deadline, f"condition reached {done - deadline:.3f} s after the deadline"
            return r
        if done >= deadline:
            return r
        time.sleep(interval)


def settled_by(fn, ok, deadline: float, repeat: int = 8):
    """The change must show within the deadline and hold on every Envoy worker once it has passed:
    poll until the first ok result (before the deadline), wait out the deadline, then every one of
    `repeat` fresh connections (spread over the workers) must be ok. Returns the last result."""
    r = poll(fn, ok, deadline)
    assert ok(r), f"not in effect within the deadline: {r[0]} {r[2][:300]!r}"
    time.sleep(max(0.0, deadline - time.monotonic()))
    for _ in range(repeat):
        r = fn()
        assert ok(r), f"still not in effect on some worker after the deadline: {r[0]} {r[2][:300]!r}"
    return r


def denials(stack, agent_id: str, code: str) -> list[dict]:
    return [e for e in stack.audit(agent_id, "request.denied") if e["payload"].get("code") == code]


def wait_denials(stack, agent_id: str, code: str, at_least: int = 1, timeout: float = 5) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        ev = denials(stack, agent_id, code)
        if len(ev) >= at_least or time.monotonic() > deadline:
            return ev
        time.sleep(0.05)


def assert_error(status, headers, body, want_status: int, want_type: str, want_code: str):
    assert status == want_status, f"expected {want_status} {want_code}, got {status}: {body[:500]!r}"
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert (err["type"], err["code"]) == (want_type, want_code), err
    assert isinstance(err["message"], str) and err["message"], err
    assert "param" in err and err["param"] is None, err
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("application/json"), headers


# ---------------------------------------------------------------------------------------- 1. RPM


def test_tpm_limit_lowers_the_cap_then_refuses_with_token_headers_until_requests_settle(stack, agent_name):
    """Tokens per minute count each request's worst case (input bound + output cap) until it
    settles, then what it used. A request that does not fit gets its output cap lowered to what
    the minute has left; when nothing is left it is a 429 naming the tokens, and it frees up as
    requests in flight settle."""
    import threading

    tpm = 2000
    a = stack.create_agent(agent_name, "5.00", 1000, "--tpm", str(tpm))
    assert stack.aex_json("agent", "inspect", agent_name)["tpm"] == tpm
    tok = a["token"]
    c = stack.client(tok)
    first = c.chat.completions.create(model="test-model", messages=HELLO, max_tokens=500)
    stack.wait_settled(agent_name)
    # A cap above what the minute has left is lowered to fit.
    c.chat.completions.create(model="test-model", messages=HELLO, max_tokens=4000)
    sent = json.loads(stack.mock_requests()[-1]["body"])
    allowed = stack.audit(a["id"], "request.allowed")[-1]["payload"]
    assert 0 < sent["max_tokens"] == allowed["clamp_output_tokens"] < tpm - first.usage.total_tokens
    stack.wait_settled(agent_name)
    # A slow request takes whatever is left as its worst case while it runs ...
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=stack.post(
        "/v1/chat/completions", chat(max_tokens=4000), tok, {"x-mock-latency-ms": "2500"})))
    t.start()
    deadline = time.time() + 5
    while stack.agent(agent_name)["open_reservations"] == 0:
        assert time.time() < deadline, "the slow request was never admitted"
        time.sleep(0.02)
    # ... so the next one is refused on tokens, with OpenAI's token headers, and sent nowhere.
    refused = [{"role": "user", "content": f"refused {agent_name}"}]
    status, headers, body = stack.post("/v1/chat/completions", chat(max_tokens=100, messages=refused), tok)
    assert_error(status, headers, body, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "tokens per minute" in json.loads(body)["error"]["message"]
    h = {k.lower(): v for k, v in headers.items()}
    assert h["x-ratelimit-limit-tokens"] == str(tpm), h
    assert int(h["x-ratelimit-remaining-tokens"]) < 200, h
    assert 1 <= int(h["retry-after"]) <= 60, h
    assert "x-ratelimit-remaining-requests" not in h
    assert not [m for m in stack.mock_requests() if f"refused {agent_name}" in m["body"]]
    # Once the slow request settles at the few tokens it used, the minute has room again.
    t.join()
    assert slow["r"][0] == 200, slow["r"][2][:300]
    stack.wait_settled(agent_name)
    r = c.chat.completions.create(model="test-model", messages=HELLO, max_tokens=100)
    assert r.choices
    # Removing the limit removes the clamp.
    stack.aex("agent", "update", agent_name, "--tpm", "0")
    assert stack.aex_json("agent", "inspect", agent_name)["tpm"] is None
    deadline = time.time() + 5
    while True:
        c.chat.completions.create(model="test-model", messages=HELLO, max_tokens=4000)
        if json.loads(stack.mock_requests()[-1]["body"])["max_tokens"] == 4000:
            break
        assert time.time() < deadline, "the update never took effect"
        time.sleep(0.05)


def test_a_tpm_refusal_behind_a_slow_request_says_when_it_will_have_settled(stack, agent_name):
    """A request refused because requests in flight hold the minute's tokens was told to retry
    after 1 s whatever they were: the openai SDK spent its two retries in two seconds and failed
    while a 4-second request ran. Retry-After now goes by how long the agent's requests take."""
    import threading

    # Strict: a request that does not fit is refused rather than given a lower output cap.
    a = stack.create_agent(agent_name, "5.00", 1000, "--tpm", "2000", "--strict")
    tok = a["token"]
    slow = lambda: stack.post("/v1/chat/completions", chat(max_tokens=1500), tok, {"x-mock-latency-ms": "4000"})  # noqa: E731
    assert slow()[0] == 200
    stack.wait_settled(agent_name)
    running = threading.Thread(target=slow)
    running.start()
    try:
        deadline = time.time() + 5
        while stack.agent(agent_name)["open_reservations"] == 0:
            assert time.time() < deadline, "the slow request was never admitted"
            time.sleep(0.02)
        status, headers, _ = stack.post("/v1/chat/completions", chat(max_tokens=1000), tok)
        h = {k.lower(): v for k, v in headers.items()}
        assert status == 429 and 3 <= int(h["retry-after"]) <= 5, h
        # The SDK as agents use it (two retries, honouring Retry-After) now gets through.
        t0 = time.time()
        sdk = openai.OpenAI(base_url=stack.base_url, api_key=tok, max_retries=2, timeout=30)
        r = sdk.chat.completions.create(model="test-model", messages=HELLO, max_tokens=1000)
        assert r.choices and time.time() - t0 >= 2
    finally:
        running.join()


@pytest.mark.parametrize("limits", [("0.009", "--strict"), ("0.009",), ("5.00", "--tpm", "10000")], ids=["strict-budget", "small-budget", "tpm"])
def test_an_agent_loop_is_not_refused_by_the_worst_case_of_the_call_it_just_finished(stack, agent_name, limits):
    """An agent loop sends its next call milliseconds after the last one's answer. Each call's
    worst case (~$0.0083 here, or ~4,200 tokens) fits the agent's limit once, not twice, so the
    finished call's settlement must reach the control plane before the next call is decided
    (it used to wait for the next 20-50 ms report: refused with 402 / 429, or its cap cut)."""
    a = stack.create_agent(agent_name, limits[0], 1000, *limits[1:])
    c = stack.client(a["token"])  # no retries: a refusal fails the test
    for i in range(8):
        r = c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": f"step {i}"}])
        assert r.choices[0].message.content
    allowed = stack.audit(a["id"], "request.allowed")
    assert len(allowed) == 8 and all(e["payload"]["clamp_output_tokens"] == 0 for e in allowed), allowed


def test_rpm_limit_429_with_headers_and_denied_requests_do_not_consume_the_allowance(stack, agent_name):
    rpm = 3
    # A budget far too small for any request: every request is a 402 at first.
    a = stack.create_agent(agent_name, "0.000001", rpm, "--allowed-models", "test-model")
    tok = a["token"]
    stack.clear_mock()

    # 2 × 403 (model not allowed) and 2 × 402 (budget) before the limit: none may count.
    for _ in range(2):
        assert_error(*stack.post("/v1/chat/completions", chat("test-mini"), tok), 403, "permission_error", "model_not_allowed")
    for _ in range(2):
        assert_error(*stack.post("/v1/chat/completions", chat(), tok), 402, "insufficient_quota", "budget_exceeded")
    assert stack.mock_requests() == []

    stack.aex("agent", "update", agent_name, "--budget", "5.00")
    c = stack.client(tok)
    # The update propagates live; until it has, the request is a 402 (which must not count either).
    deadline = time.monotonic() + 2
    while True:
        try:
            c.chat.completions.create(model="test-model", messages=HELLO)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 402 and e.code == "budget_exceeded", (e.status_code, e.body)
            assert time.monotonic() < deadline, "budget update not applied within 2 s"
            time.sleep(0.05)
    # Requests 2..N of the allowance.
    for _ in range(rpm - 1):
        r = c.chat.completions.create(model="test-model", messages=HELLO)
        assert r.choices
    assert len(stack.mock_requests()) == rpm

    # N+1: raw HTTP for the headers.
    status, headers, body = stack.post("/v1/chat/completions", chat(), tok)
    assert_error(status, headers, body, 429, "rate_limit_error", "rate_limit_exceeded")
    h = {k.lower(): v for k, v in headers.items()}
    assert "retry-after" in h, headers
    assert h["retry-after"].isdigit() and int(h["retry-after"]) >= 1, h["retry-after"]
    assert int(h["retry-after"]) <= 60, h["retry-after"]
    assert h.get("x-ratelimit-limit-requests") == str(rpm), headers
    assert h.get("x-ratelimit-remaining-requests") == "0", headers

    # N+2 through the SDK.
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="test-model", messages=HELLO)
    assert ei.value.status_code == 429
    assert ei.value.code == "rate_limit_exceeded"
    assert ei.value.body["type"] == "rate_limit_error"
    assert ei.value.response.headers.get("retry-after", "").isdigit()

    assert len(stack.mock_requests()) == rpm, "rate-limited requests are not forwarded"
    assert len(wait_denials(stack, a["id"], "rate_limit_exceeded", 2)) >= 2
    assert len(wait_denials(stack, a["id"], "model_not_allowed", 2)) == 2
    assert len(wait_denials(stack, a["id"], "budget_exceeded", 2)) >= 2
    stack.wait_settled(agent_name)


# ------------------------------------------------------------------------------ 2. policy denials

# (id, create flags, request body, extra headers, status, type, code)
DENIALS = [
    ("model_not_allowed", ["--allowed-models", "test-mini"], chat("test-model"), {}, 403, "permission_error", "model_not_allowed"),
    ("model_unknown", [], chat("no-such-model"), {}, 403, "permission_error", "model_not_allowed"),
    ("model_not_priced", [], chat("unpriced-model"), {}, 403, "permission_error", "model_not_priced"),
    ("streaming_not_allowed", ["--no-streaming"], chat(stream=True), {}, 403, "permission_error", "streaming_not_allowed"),
    ("tools_not_allowed", ["--no-tools"], chat(tools=[fn_tool("get_weather")]), {}, 403, "permission_error", "tools_not_allowed"),
    ("tool_not_allowed", ["--allowed-tools", "get_weather"], chat(tools=[fn_tool("delete_files")]), {}, 403, "permission_error", "tool_not_allowed"),
    (
        "tool_not_allowed_mixed",
        ["--allowed-tools", "get_weather"],
        chat(tools=[fn_tool("get_weather"), fn_tool("delete_files")]),
        {},
        403,
        "permission_error",
        "tool_not_allowed",
    ),
    (
        "vision_not_allowed",
        ["--no-vision"],
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": TINY_PNG}}]}]),
        {},
        403,
        "permission_error",
        "vision_not_allowed",
    ),
    ("scope_denied", ["--scope", "read-only"], chat(), {}, 403, "permission_error", "scope_denied"),
    ("passthrough_not_allowed", [], chat(), {"x-aex-provider-key": "sk-agent-own"}, 403, "permission_error", "passthrough_not_allowed"),
    ("strict_stream_without_usage", ["--strict"], chat(stream=True), {}, 403, "permission_error", "strict_violation"),
    (
        "strict_file_part",
        ["--strict"],
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "summarise"},
                        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}},
                    ],
                }
            ]
        ),
        {},
        403,
        "permission_error",
        "strict_violation",
    ),
]

SDK_CLASSES = {403: openai.PermissionDeniedError, 401: openai.AuthenticationError, 429: openai.RateLimitError}


@pytest.mark.parametrize("case", DENIALS, ids=[d[0] for d in DENIALS])
def test_policy_denial_exact_error_nothing_forwarded_and_audited(stack, agent_name, case):
    _, flags, body, extra, want_status, want_type, want_code = case
    a = stack.create_agent(agent_name, "1.00", 1000, *flags)
    before = len(stack.mock_requests())

    # Raw HTTP.
    status, headers, raw = stack.post("/v1/chat/completions", body, a["token"], extra)
    assert_error(status, headers, raw, want_status, want_type, want_code)
    raw_id = {k.lower(): v for k, v in headers.items()}.get("x-request-id", "")
    assert raw_id.startswith("req_"), headers

    # The OpenAI SDK.
    c = stack.client(a["token"], default_headers=extra or None)
    kw = {k: v for k, v in body.items()}
    with pytest.raises(openai.APIStatusError) as ei:
        r = c.chat.completions.create(**kw)
        if kw.get("stream"):
            list(r)
    e = ei.value
    assert isinstance(e, SDK_CLASSES[want_status]), type(e)
    assert e.status_code == want_status
    assert e.code == want_code, e.body
    assert e.body["type"] == want_type, e.body
    assert e.request_id and e.request_id != raw_id, e.request_id

    assert len(stack.mock_requests()) == before, "a denied request reached the provider"
    ev = wait_denials(stack, a["id"], want_code, 2)
    assert len(ev) >= 2, f"no request.denied/{want_code} audit events for {a['id']}: {stack.audit(a['id'])}"
    # The id a client sees on the refusal is the one its audit event carries.
    assert {raw_id, e.request_id} <= {x["request_id"] for x in ev}, ev
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == 0


RESP_FN = {"type": "function", "name": "delete_files", "parameters": {"type": "object", "properties": {}}}

# Checks read the actual body on every endpoint that can carry it: (id, budget, flags, path, body, status, type, code)
OTHER_ENDPOINTS = [
    ("embeddings_model", "1.00", ["--allowed-models", "test-model"], "/v1/embeddings", {"model": "test-embed", "input": "x"}, 403, "permission_error", "model_not_allowed"),
    ("completions_stream", "1.00", ["--no-streaming"], "/v1/completions", {"model": "test-model", "prompt": "x", "stream": True}, 403, "permission_error", "streaming_not_allowed"),
    ("responses_stream", "1.00", ["--no-streaming"], "/v1/responses", {"model": "test-model", "input": "x", "stream": True}, 403, "permission_error", "streaming_not_allowed"),
    ("responses_tools", "1.00", ["--no-tools"], "/v1/responses", {"model": "test-model", "input": "x", "tools": [RESP_FN]}, 403, "permission_error", "tools_not_allowed"),
    ("responses_tool", "1.00", ["--allowed-tools", "get_weather"], "/v1/responses", {"model": "test-model", "input": "x", "tools": [RESP_FN]}, 403, "permission_error", "tool_not_allowed"),
    (
        "responses_vision",
        "1.00",
        ["--no-vision"],
        "/v1/responses",
        {"model": "test-model", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": TINY_PNG}]}]},
        403,
        "permission_error",
        "vision_not_allowed",
    ),
    (
        "chat_legacy_functions",
        "1.00",
        ["--no-tools"],
        "/v1/chat/completions",
        chat(functions=[{"name": "delete_files", "parameters": {"type": "object", "properties": {}}}]),
        403,
        "permission_error",
        "tools_not_allowed",
    ),
    ("completions_strict_stream", "1.00", ["--strict"], "/v1/completions", {"model": "test-model", "prompt": "x", "stream": True}, 403, "permission_error", "strict_violation"),
    # A strict agent's output cap is never clamped: where a non-strict request would be, it is refused.
    ("strict_no_budget_clamp", "0.001", ["--strict"], "/v1/chat/completions", chat(), 402, "insufficient_quota", "budget_exceeded"),
    ("strict_no_cap_clamp", "1.00", ["--strict", "--max-output-tokens", "50"], "/v1/chat/completions", chat(max_tokens=500), 403, "permission_error", "strict_violation"),
]


@pytest.mark.parametrize("case", OTHER_ENDPOINTS, ids=[c[0] for c in OTHER_ENDPOINTS])
def test_policy_is_enforced_on_every_endpoint_and_for_strict_agents(stack, agent_name, case):
    _, budget, flags, path, body, want_status, want_type, want_code = case
    a = stack.create_agent(agent_name, budget, 1000, *flags)
    before = len(stack.mock_requests())
    assert_error(*stack.post(path, body, a["token"]), want_status, want_type, want_code)
    assert len(stack.mock_requests()) == before, "a denied request reached the provider"
    assert wait_denials(stack, a["id"], want_code), f"no request.denied/{want_code} for {a['id']}"
    assert stack.wait_settled(agent_name)["spent_micros"] == 0


def test_non_strict_agent_is_clamped_where_strict_is_refused(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--max-output-tokens", "50")
    stack.clear_mock()
    status, _, body = stack.post("/v1/chat/completions", chat(max_tokens=500), a["token"])
    assert status == 200, body[:300]
    assert json.loads(stack.mock_requests()[-1]["body"])["max_tokens"] == 50


def test_two_cap_fields_cannot_outrun_the_policy_or_the_budget(stack, agent_name):
    """A chat request may carry both max_completion_tokens and max_tokens, and providers differ
    in which one they obey (the mock obeys max_completion_tokens). The request is bounded by the
    larger, so a small max_tokens next to a large max_completion_tokens gets past neither the
    agent's output limit nor its budget (found by exploratory testing: it used to reserve for
    the smaller and forward both unchanged)."""
    big = {"x-mock-output-tokens": "1000"}
    a = stack.create_agent(agent_name, "1.00", 1000, "--max-output-tokens", "10")
    stack.clear_mock()
    r = stack.client(a["token"]).chat.completions.create(
        model="test-model", messages=HELLO, max_completion_tokens=4000, max_tokens=1, extra_headers=big)
    sent = json.loads(stack.mock_requests()[-1]["body"])
    assert (sent["max_completion_tokens"], sent["max_tokens"]) == (10, 10)
    assert r.usage.completion_tokens <= 10

    # 300 µUSD: the worst case at 4000 output tokens does not fit, so both fields are clamped to
    # what the budget affords and the provider cannot overrun it.
    name = agent_name + "-budget"
    b = stack.create_agent(name, "0.000300", 1000)
    r = stack.client(b["token"]).chat.completions.create(
        model="test-model", messages=HELLO, max_completion_tokens=4000, max_tokens=1, extra_headers=big)
    sent = json.loads(stack.mock_requests()[-1]["body"])
    assert sent["max_completion_tokens"] == sent["max_tokens"] < 150
    after = stack.wait_settled(name)
    assert after["spent_micros"] <= 300
    assert stack.audit(b["id"], "overrun") == []


def test_allowed_tool_passes_and_tool_list_is_forwarded(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--allowed-tools", "get_weather")
    stack.clear_mock()
    r = stack.client(a["token"]).chat.completions.create(model="test-model", messages=HELLO, tools=[fn_tool("get_weather")])
    assert r.choices
    seen = stack.mock_requests()
    assert len(seen) == 1
    assert json.loads(seen[0]["body"])["tools"][0]["function"]["name"] == "get_weather"
    assert denials(stack, a["id"], "tool_not_allowed") == []


def test_strict_agent_stream_with_include_usage_is_forwarded_unmodified(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--strict")
    stack.clear_mock()
    body = chat(stream=True, stream_options={"include_usage": True})
    raw = json.dumps(body, separators=(",", ":")).encode()
    status, _, out = stack.post("/v1/chat/completions", raw, a["token"])
    assert status == 200, out[:300]
    assert b"data: [DONE]" in out
    seen = stack.mock_requests()
    assert len(seen) == 1
    assert seen[0]["body"].encode() == raw, "a strict agent's request is never modified"


def test_read_only_scope_can_list_models_and_read_usage_but_not_call_models(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--scope", "read-only")
    before = len(stack.mock_requests())
    ids = [m.id for m in stack.client(a["token"]).models.list()]
    assert "test-model" in ids and "unpriced-model" not in ids
    status, _, body = http("GET", stack.url("/v1/aex/usage"), headers=auth(a["token"]))
    assert status == 200, body
    usage = json.loads(body)
    assert usage["agent"] == agent_name, usage
    assert (usage["budget_micros"], usage["spent_micros"], usage["reserved_micros"]) == (1_000_000, 0, 0), usage
    for path, payload in (
        ("/v1/chat/completions", chat()),
        ("/v1/completions", {"model": "test-model", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "test-embed", "input": "hi"}),
        ("/v1/responses", {"model": "test-model", "input": "hi"}),
    ):
        assert_error(*stack.post(path, payload, a["token"]), 403, "permission_error", "scope_denied")
    with pytest.raises(openai.PermissionDeniedError) as ei:
        stack.client(a["token"]).embeddings.create(model="test-embed", input="hi")
    assert ei.value.code == "scope_denied"
    assert len(stack.mock_requests()) == before
    assert len(wait_denials(stack, a["id"], "scope_denied", 5)) >= 5


# ------------------------------------------------------------------------- 3. token lifecycle


def test_ttl_token_works_then_expires(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--ttl", "0.0005")
    created = time.monotonic()
    assert a.get("ttl_secs", stack.agent(agent_name)["ttl_secs"]) == 2, "1.8 s rounds up to whole seconds"
    status, _, body = stack.post("/v1/chat/completions", chat(), a["token"])
    assert status == 200, body
    time.sleep(max(0.0, 2.5 - (time.monotonic() - created)))
    before = len(stack.mock_requests())
    assert_error(*stack.post("/v1/chat/completions", chat(), a["token"]), 401, "authentication_error", "token_expired")
    with pytest.raises(openai.AuthenticationError) as ei:
        stack.client(a["token"]).models.list()
    assert ei.value.code == "token_expired"
    assert len(stack.mock_requests()) == before
    # The token still names a known agent: the expiry denial belongs in that agent's audit trail
    # (only denials before any agent is known — missing/unknown token, unknown path — carry "").
    ev = wait_denials(stack, a["id"], "token_expired", 2, timeout=3)
    anon = [e for e in denials(stack, "", "token_expired") if e["payload"].get("path") == "/v1/chat/completions"]
    assert len(ev) >= 2, f"token_expired denials not attributed to {a['id']}; recorded as: {anon[-2:]}"


def test_rotation_refuses_old_token_within_one_second_and_keeps_ttl(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--ttl", "1")
    old = a["token"]
    info = stack.agent(agent_name)
    assert info["ttl_secs"] == 3600
    assert abs(info["token_expires_at"] - (time.time() + 3600)) < 10
    assert stack.post("/v1/chat/completions", chat(), old)[0] == 200

    rot = stack.aex_json("agent", "rotate-token", agent_name)
    deadline = time.monotonic() + 1.0
    new = rot["token"]
    assert new != old and new.startswith("aex_")
    r = settled_by(lambda: stack.post("/v1/chat/completions", chat(), old), lambda r: r[0] == 401, deadline)
    assert_error(*r, 401, "authentication_error", "invalid_api_key")
    settled_by(lambda: stack.post("/v1/chat/completions", chat(), new), lambda r: r[0] == 200, time.monotonic() + 1.0)

    info = stack.agent(agent_name)
    assert info["ttl_secs"] == 3600, "rotation keeps the TTL setting"
    assert info["token_expires_at"] != 0 and abs(info["token_expires_at"] - (time.time() + 3600)) < 10

    rot2 = stack.aex_json("agent", "rotate-token", agent_name, "--ttl", "2")
    info = stack.agent(agent_name)
    assert info["ttl_secs"] == 7200
    assert abs(info["token_expires_at"] - (time.time() + 7200)) < 10
    r = settled_by(lambda: stack.post("/v1/chat/completions", chat(), new), lambda r: r[0] == 401, time.monotonic() + 1.0)
    assert_error(*r, 401, "authentication_error", "invalid_api_key")
    settled_by(lambda: stack.post("/v1/chat/completions", chat(), rot2["token"]), lambda r: r[0] == 200, time.monotonic() + 1.0)


def test_rotation_of_agent_without_ttl_keeps_no_expiry(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 1000)
    rot = stack.aex_json("agent", "rotate-token", agent_name)
    info = stack.agent(agent_name)
    assert info["ttl_secs"] == 0 and info["token_expires_at"] in (0, None), info
    settled_by(lambda: stack.post("/v1/chat/completions", chat(), rot["token"]), lambda r: r[0] == 200, time.monotonic() + 1.0)


def test_deleted_agent_token_refused_within_one_second(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000)
    assert stack.post("/v1/chat/completions", chat(), a["token"])[0] == 200
    stack.wait_settled(agent_name)
    stack.aex("agent", "delete", agent_name)
    deadline = time.monotonic() + 1.0
    r = poll(lambda: stack.post("/v1/chat/completions", chat(), a["token"]), lambda r: r[0] == 401, deadline)
    assert_error(*r, 401, "authentication_error", "invalid_api_key")
    # After the second has passed, refused on every worker (Envoy runs 2) and nothing forwarded.
    time.sleep(max(0.0, deadline - time.monotonic()))
    mark = len(stack.mock_requests())
    for _ in range(8):
        assert_error(*stack.post("/v1/chat/completions", chat(), a["token"]), 401, "authentication_error", "invalid_api_key")
    assert len(stack.mock_requests()) == mark


def test_update_no_streaming_takes_effect_within_one_second(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000)
    s = chat(stream=True)
    status, _, body = stack.post("/v1/chat/completions", s, a["token"])
    assert status == 200 and b"[DONE]" in body
    stack.aex("agent", "update", agent_name, "--no-streaming")
    deadline = time.monotonic() + 1.0
    r = settled_by(lambda: stack.post("/v1/chat/completions", s, a["token"]), lambda r: r[0] == 403, deadline)
    assert_error(*r, 403, "permission_error", "streaming_not_allowed")
    # Non-streaming still works.
    assert stack.post("/v1/chat/completions", chat(), a["token"])[0] == 200
    stack.aex("agent", "update", agent_name, "--streaming")
    settled_by(lambda: stack.post("/v1/chat/completions", s, a["token"]), lambda r: r[0] == 200, time.monotonic() + 1.0)


# ---------------------------------------------------------------------------- 4. passthrough


def test_passthrough_uses_agents_key_and_strips_header(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000, "--allow-passthrough")
    stack.clear_mock()
    c = stack.client(a["token"], default_headers={"x-aex-provider-key": "sk-agent-own"})
    r = c.chat.completions.create(model="test-model", messages=HELLO)
    assert r.choices
    seen = stack.mock_requests()
    assert len(seen) == 1
    assert seen[0]["headers"]["authorization"] == "Bearer sk-agent-own"
    assert "x-aex-provider-key" not in seen[0]["headers"]
    assert stack.provider_key not in json.dumps(seen[0])

    # Still governed: a disallowed model is denied with the agent's own key too.
    assert_error(
        *stack.post("/v1/chat/completions", chat("unpriced-model"), a["token"], {"x-aex-provider-key": "sk-agent-own"}),
        403,
        "permission_error",
        "model_not_priced",
    )
    # With its own key, the agent's organization and project selectors go with it (they pick
    # what its key bills); other providers' key headers are still removed.
    selectors = {"openai-organization": "org-agent", "openai-project": "proj-agent", "x-api-key": "other"}
    stack.clear_mock()
    c.chat.completions.create(model="test-model", messages=HELLO, extra_headers=selectors)
    seen = stack.mock_requests()[-1]["headers"]
    assert (seen["openai-organization"], seen["openai-project"]) == ("org-agent", "proj-agent"), seen
    assert "x-api-key" not in seen and seen["authorization"] == "Bearer sk-agent-own"
    # Without the header, the daemon's key is used, and the selectors never choose what it bills.
    stack.clear_mock()
    stack.client(a["token"]).chat.completions.create(model="test-model", messages=HELLO, extra_headers=selectors)
    seen = stack.mock_requests()
    assert len(seen) == 1 and seen[0]["headers"]["authorization"] == f"Bearer {stack.provider_key}"
    assert not {"openai-organization", "openai-project", "x-api-key"} & set(seen[0]["headers"]), seen[0]["headers"]
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] > 0, "passthrough requests are still metered"


def test_provider_key_never_reaches_clients_audit_or_logs(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 2, "--allowed-models", "test-model,test-mini")
    ro = stack.create_agent(agent_name + "-ro", "1.00", 1000, "--scope", "read-only")
    tok = a["token"]
    key = stack.provider_key.encode()
    responses = [
        stack.post("/v1/chat/completions", chat(), tok),
        stack.post("/v1/chat/completions", chat(stream=True), tok),
        stack.post("/v1/chat/completions", chat(), tok),  # 429 (rpm 2)
        stack.post("/v1/chat/completions", chat("unpriced-model"), tok),
        stack.post("/v1/chat/completions", chat(), tok, {"x-aex-provider-key": "sk-x"}),
        stack.post("/v1/chat/completions", chat(), "aex_wrong"),
        stack.post("/v1/chat/completions", b"{not json", tok),
        stack.post("/v1/files", {}, tok),
        http("GET", stack.url("/v1/models"), headers=auth(ro["token"])),
        http("GET", stack.url("/v1/aex/usage"), headers=auth(ro["token"])),
        http("GET", stack.url("/v1/models")),
        http("GET", stack.url("/")),
    ]
    b = stack.create_agent(agent_name + "-b", "1.00", 1000)
    responses += [
        stack.post("/v1/chat/completions", chat(), b["token"], {"x-mock-error": "500"}),
        stack.post("/v1/chat/completions", chat(), b["token"], {"x-mock-error": "401"}),
        stack.post("/v1/embeddings", {"model": "test-embed", "input": "x"}, b["token"]),
        stack.post("/v1/responses", {"model": "test-model", "input": "x"}, b["token"]),
    ]
    statuses = [r[0] for r in responses]
    assert 200 in statuses and 429 in statuses and 403 in statuses and 401 in statuses and 400 in statuses and 404 in statuses, statuses
    for status, headers, body in responses:
        assert key not in body, (status, body[:300])
        assert key.decode() not in json.dumps(headers), (status, headers)
    stack.wait_settled(agent_name + "-b")
    audit = json.dumps(stack.audit())
    assert stack.provider_key not in audit
    logs = list(stack.tmp.rglob("*.log"))
    assert logs, "the stack writes log files"
    for p in logs:
        assert key not in p.read_bytes(), f"provider key leaked into {p}"


# ---------------------------------------------------------------------------- 5. bad input


BAD_BODIES = [
    ("invalid_json", b'{"model": "test-model", "messages": [', 400, "invalid_request_error", {"invalid_json"}),
    ("empty_body", b"", 400, "invalid_request_error", {"invalid_json"}),
    # Valid JSON, but not an object: the contract allows either reading.
    ("json_array", b'[{"model": "test-model"}]', 400, "invalid_request_error", {"invalid_json", "invalid_request"}),
    ("missing_model", json.dumps({"messages": HELLO}).encode(), 400, "invalid_request_error", {"missing_model"}),
    ("messages_not_array", json.dumps({"model": "test-model", "messages": "hello"}).encode(), 400, "invalid_request_error", {"invalid_request"}),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_is_refused_clearly_and_charges_nothing(stack, agent_name, case):
    _, raw, want_status, want_type, codes = case
    a = stack.create_agent(agent_name, "1.00", 1000)
    before = len(stack.mock_requests())
    status, headers, body = stack.post("/v1/chat/completions", raw, a["token"])
    assert status == want_status, (status, body[:300])
    t, code = error_code(body)
    assert t == want_type and code in codes, (t, code)
    assert_error(status, headers, body, want_status, want_type, code)
    assert len(stack.mock_requests()) == before
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == 0 and after["reserved_micros"] == 0
    assert wait_denials(stack, a["id"], code), f"no request.denied/{code} for {a['id']}"


def test_missing_model_via_sdk(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000)
    before = len(stack.mock_requests())
    with pytest.raises(openai.BadRequestError) as ei:
        stack.client(a["token"]).chat.completions.create(model="", messages=HELLO)
    assert ei.value.status_code == 400 and ei.value.code == "missing_model", ei.value.body
    assert len(stack.mock_requests()) == before
    assert stack.wait_settled(agent_name)["spent_micros"] == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413_request_too_large(stack, agent_name, chunked):
    a = stack.create_agent(agent_name, "1000.00", 1000)
    before = len(stack.mock_requests())
    prefix = b'{"model":"test-model","messages":[{"role":"user","content":"'
    suffix = b'"}]}'
    raw = prefix + b"a" * (8 * 1024 * 1024 + 1 - len(prefix) - len(suffix)) + suffix
    assert len(raw) == 8388609
    status, headers, body = post_early_reply(stack, "/v1/chat/completions", raw, a["token"], chunked)
    assert_error(status, headers, body, 413, "invalid_request_error", "request_too_large")
    assert len(stack.mock_requests()) == before
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == 0 and after["reserved_micros"] == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_while_the_token_is_looked_up_is_the_json_413_and_audited(fresh_stack, chunked):
    """A token the worker does not know makes it fetch the newest policy before deciding; the body
    keeps arriving meanwhile. Past the limit the answer is AEX's JSON 413 and it is audited — not
    Envoy's plain-text 413 from its buffer limit (max_body_bytes + 1 MiB), which no one records.
    The control plane is paused so the lookup is still pending when the body is through.

    A declared Content-Length is refused by the filter at once. A chunked body is refused by the
    filter if it sees the body pass the limit, else by Envoy at its buffer limit (its reply is
    rewritten to the same error and the filter records the denial when the stream ends): tried
    until Envoy has answered once, so both paths are checked."""
    s = fresh_stack
    prefix = b'{"model":"test-model","messages":[{"role":"user","content":"'
    raw = prefix + b"a" * (10 * 1024 * 1024) + b'"}]}'
    cp = s.procs["control-plane"]
    answered_by = []  # "filter" (its replies carry x-request-id) or "envoy"
    while len(answered_by) < 8 and (not answered_by or chunked and "envoy" not in answered_by):
        cp.send_signal(signal.SIGSTOP)
        # A group stop reaches each thread when it next runs: wait until none can answer any more.
        deadline = time.time() + 5
        while any(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[0] != "T"
                  for t in Path(f"/proc/{cp.pid}/task").iterdir()):
            assert time.time() < deadline, "the control plane did not stop"
            time.sleep(0.01)
        try:
            unknown = "aex_" + secrets.token_urlsafe(32)
            status, headers, body = post_early_reply(s, "/v1/chat/completions", raw, unknown, chunked)
        finally:
            cp.send_signal(signal.SIGCONT)
        assert_error(status, headers, body, 413, "invalid_request_error", "request_too_large")
        answered_by.append("filter" if {k.lower() for k in headers} & {"x-request-id"} else "envoy")
    if chunked:
        assert "envoy" in answered_by, f"Envoy's own 413 never came in 8 tries: {answered_by}"
    else:
        assert answered_by == ["filter"], answered_by
    assert s.mock_requests() == []
    deadline = time.time() + 10
    while len(denied := [e for e in s.audit(None, "request.denied") if e["payload"].get("code") == "request_too_large"]) < len(answered_by):
        assert time.time() < deadline, f"{len(denied)} of {len(answered_by)} refusals reached the audit log"
        time.sleep(0.1)
    time.sleep(0.5)  # a second record of any of them would come with the same reports
    denied = [e for e in s.audit(None, "request.denied") if e["payload"].get("code") == "request_too_large"]
    assert len(denied) == len(answered_by) and all(e["agent_id"] == "" for e in denied), (answered_by, denied)


def test_a_chunk_that_jumps_past_envoy_s_buffer_limit_is_the_json_413_and_audited(stack, agent_name):
    """A chunked upload whose last chunk carries the body from under max_body_bytes to past Envoy's
    buffer limit (max_body_bytes + 1 MiB). Whoever refuses it — the filter as it sees the body pass
    the limit, or Envoy if a read carries it past the buffer limit first — the client gets AEX's
    JSON 413, and the agent's denial is recorded once."""
    a = stack.create_agent(agent_name, "1.00", 1000)
    prefix = b'{"model":"test-model","messages":[{"role":"user","content":"'
    head = prefix + b"a" * (7 * 1024 * 1024 - len(prefix))
    jump = b"b" * (3 * 1024 * 1024) + b'"}]}'
    before = len(stack.mock_requests())
    port = stack.ports["envoy"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {a['token']}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for i in range(0, len(head), 65536):
                part = head[i : i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.2)  # the filter has seen (and held) all of that
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(jump), jump))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    hdr, _, body = data.partition(b"\r\n\r\n")
    status = int(hdr.split(b" ", 2)[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in hdr.decode("latin-1").split("\r\n")[1:])}
    assert_error(status, headers, body, 413, "invalid_request_error", "request_too_large")
    assert len(stack.mock_requests()) == before
    deadline = time.time() + 10
    while not (denied := [e for e in stack.audit(a["id"], "request.denied") if e["payload"].get("code") == "request_too_large"]):
        assert time.time() < deadline, "the 413 never reached the audit log"
        time.sleep(0.1)
    assert len(denied) == 1, denied
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == 0 and after["reserved_micros"] == 0


def post_early_reply(stack, path: str, body: bytes, token: str, chunked: bool = False):
    """POST with Content-Length over a raw socket, the way a careful HTTP client does it: the
    gateway may answer before the body is through (and close), so a failed send is not the end —
    the response is read all the same."""
    port = stack.ports["envoy"]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        + ("Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n")
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head)
            for i in range(0, len(body), 65536):
                part = body[i : i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                hdr, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    lines = hdr.decode("latin-1").split("\r\n")
                    hs = dict(line.split(": ", 1) for line in lines[1:])
                    n = int({k.lower(): v for k, v in hs.items()}.get("content-length", -1))
                    if n >= 0 and len(rest) >= n:
                        break
        except ConnectionResetError:
            pass
    hdr, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no HTTP response before the connection closed: {data[:300]!r}"
    lines = hdr.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hs = dict(line.split(": ", 1) for line in lines[1:])
    return status, hs, rest


UNKNOWN = [("POST", "/v1/files"), ("GET", "/v1/assistants"), ("POST", "/v1/audio/speech"), ("GET", "/v1/chat/completions/x/../../files"), ("GET", "/v1/chat/completions")]


@pytest.mark.parametrize("method,path", UNKNOWN, ids=[f"{m} {p}" for m, p in UNKNOWN])
def test_unknown_v1_endpoint_is_404_unknown_endpoint(stack, agent_name, method, path):
    a = stack.create_agent(agent_name, "1.00", 1000)
    before = len(stack.mock_requests())
    n_audit = len(denials(stack, "", "unknown_endpoint")) + len(denials(stack, a["id"], "unknown_endpoint"))
    data = json.dumps({"model": "tts-1", "input": "hi", "voice": "alloy"}).encode() if method == "POST" else None
    h = {"content-type": "application/json", **auth(a["token"])} if data else auth(a["token"])
    status, headers, body = http(method, stack.url(path), data, h)
    assert_error(status, headers, body, 404, "invalid_request_error", "unknown_endpoint")
    message = json.loads(body)["error"]["message"]
    assert "POST /v1/chat/completions" in message and "GET /v1/aex/usage" in message, message
    assert len(stack.mock_requests()) == before
    assert stack.wait_settled(agent_name)["spent_micros"] == 0
    deadline = time.monotonic() + 5
    while len(denials(stack, "", "unknown_endpoint")) + len(denials(stack, a["id"], "unknown_endpoint")) <= n_audit:
        assert time.monotonic() < deadline, "unknown_endpoint denial not audited"
        time.sleep(0.05)


def test_unknown_endpoint_via_sdk(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000)
    before = len(stack.mock_requests())
    with pytest.raises(openai.NotFoundError) as ei:
        stack.client(a["token"]).audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert ei.value.code == "unknown_endpoint"
    with pytest.raises(openai.NotFoundError) as ei:
        stack.client(a["token"]).files.list()
    assert ei.value.code == "unknown_endpoint"
    assert len(stack.mock_requests()) == before


AUTH_CASES = [
    ("missing", None, "missing_api_key"),
    ("basic", "Basic eHh4Onl5eQ==", "invalid_api_key"),
    ("bearer_alone", "Bearer", "invalid_api_key"),
    ("bearer_space", "Bearer ", "invalid_api_key"),
    ("wrong_token", "Bearer aex_" + "A" * 43, "invalid_api_key"),
]


@pytest.mark.parametrize("case", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_authorization_errors_are_401(stack, case):
    _, header, code = case
    before = len(stack.mock_requests())
    n = len(denials(stack, "", code))
    h = {"content-type": "application/json"}
    if header is not None:
        h["authorization"] = header
    for method, path, data in (
        ("POST", "/v1/chat/completions", json.dumps(chat()).encode()),
        ("GET", "/v1/models", None),
    ):
        status, headers, body = http(method, stack.url(path), data, h)
        assert_error(status, headers, body, 401, "authentication_error", code)
    assert len(stack.mock_requests()) == before
    assert len(wait_denials(stack, "", code, n + 2)) >= n + 2, f"401 {code} not audited with agent_id ''"


def test_wrong_token_via_sdk(stack):
    before = len(stack.mock_requests())
    with pytest.raises(openai.AuthenticationError) as ei:
        stack.client("aex_not-a-real-token").chat.completions.create(model="test-model", messages=HELLO)
    assert ei.value.code == "invalid_api_key" and ei.value.body["type"] == "authentication_error"
    assert len(stack.mock_requests()) == before


@pytest.mark.parametrize("path", ["/", "/v2/chat/completions", "/chat/completions"])
def test_non_v1_paths_are_404_and_not_forwarded(stack, agent_name, path):
    a = stack.create_agent(agent_name, "1.00", 1000)
    before = len(stack.mock_requests())
    for method, data in (("GET", None), ("POST", json.dumps(chat()).encode())):
        h = {"content-type": "application/json", **auth(a["token"])}
        status, _, body = http(method, stack.url(path), data, h)
        assert status == 404, (method, path, status, body[:300])
    assert len(stack.mock_requests()) == before
    assert stack.wait_settled(agent_name)["spent_micros"] == 0


def raw_request(port: int, headers: bytes, body: bytes) -> tuple[int, bytes, bytes]:
    """One request written byte for byte (no client library re-encoding its headers); returns the
    status, the raw response head and the body."""
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(req)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, rest = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


def test_header_bytes_that_are_not_utf8_never_take_the_filter_down(stack, agent_name):
    """Header values may carry bytes that are not UTF-8 (obs-text). The filter must read them
    without failing (a Wasm panic would stop the filter on that worker for every later request):
    an API key that is not UTF-8 is an unknown key; other request headers pass untouched; a
    provider's Latin-1 response header reaches the client byte for byte and the request is
    charged. After each, the gateway still serves. Every case is sent REPEAT times on fresh
    connections, so it reaches each Envoy worker (each has its own VM) with near certainty."""
    a = stack.create_agent(agent_name, "1.00", 1000)
    port = stack.ports["envoy"]
    body = json.dumps(chat()).encode()
    good = b"Authorization: Bearer " + a["token"].encode() + b"\r\n"

    repeat = 3 * stack.concurrency

    def still_serves():
        for _ in range(repeat):
            status, _, resp = raw_request(port, good, body)
            assert status == 200, resp[:300]

    for _ in range(repeat):
        status, _, resp = raw_request(port, b"Authorization: Bearer \xff\xfe\xe9\r\n", body)
        assert status == 401 and error_code(resp) == ("authentication_error", "invalid_api_key"), resp[:300]
    still_serves()

    before = len(stack.mock_requests())
    for _ in range(repeat):
        status, _, resp = raw_request(port, good + b"X-Note: caf\xe9\r\n", body)
        assert status == 200, resp[:300]
    assert len(stack.mock_requests()) == before + repeat
    # A provider key header is read too (this agent may not send one).
    for _ in range(repeat):
        status, _, resp = raw_request(port, good + b"X-Aex-Provider-Key: \xff\r\n", body)
        assert status == 403 and error_code(resp) == ("permission_error", "passthrough_not_allowed"), resp[:300]
    still_serves()

    for _ in range(repeat):
        status, head, resp = raw_request(port, good + b"x-mock-latin1-header: 1\r\n", body)
        assert status == 200, resp[:300]
        assert b"\r\nx-provider-note: caf\xe9\r\n" in head + b"\r\n", head
        assert json.loads(resp)["usage"]["total_tokens"] > 0
    still_serves()
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] > 0 and after["spent_micros"] == stack.settled_total(a["id"])


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data[:300]!r}"
        data += chunk
    hdr, _, rest = data.partition(b"\r\n\r\n")
    lines = hdr.decode("latin-1").split("\r\n")
    hs = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    n = int(hs["content-length"])
    while len(rest) < n:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        rest += chunk
    assert len(rest) == n, "bytes after the response: the connection is out of step"
    return int(lines[0].split()[1]), hs, rest


KEEP_ALIVE_REFUSALS = [
    ("missing key", "/v1/chat/completions", None, chat(), 401, "authentication_error", "missing_api_key"),
    ("unknown key", "/v1/chat/completions", "sk-aex-unknown-" + "0" * 32, chat(), 401, "authentication_error", "invalid_api_key"),
    ("unknown endpoint", "/v1/files", "AGENT", chat(), 404, "invalid_request_error", "unknown_endpoint"),
    ("model not allowed", "/v1/chat/completions", "AGENT", chat("test-mini"), 403, "permission_error", "model_not_allowed"),
    ("rpm", "/v1/chat/completions", "AGENT", chat(), 429, "rate_limit_error", "rate_limit_exceeded"),
    ("invalid json", "/v1/chat/completions", "AGENT", b'{"model":"test-model",', 400, "invalid_request_error", "invalid_json"),
    ("missing model", "/v1/chat/completions", "AGENT", {"messages": HELLO}, 400, "invalid_request_error", "missing_model"),
]


@pytest.mark.parametrize("case", KEEP_ALIVE_REFUSALS, ids=[c[0] for c in KEEP_ALIVE_REFUSALS])
def test_a_refusal_keeps_the_client_s_connection(stack, agent_name, case):
    """A refusal decided before the request body has arrived (at the headers: no key, unknown
    path; or once a token lookup returns) must not cost the client its keep-alive connection:
    Envoy closes an HTTP/1.1 connection whose request it answered before reading it whole, so the
    filter reads the body first. The client sends the headers, pauses, then the body, and the same
    connection then serves an allowed request."""
    _, path, token, body, want_status, want_type, want_code = case
    a = stack.create_agent(agent_name, "1.00", 1 if want_code == "rate_limit_exceeded" else 1000, "--allowed-models", "test-model")
    if want_code == "rate_limit_exceeded":
        assert stack.post("/v1/chat/completions", chat(), a["token"])[0] == 200
    token = a["token"] if token == "AGENT" else token
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    port = stack.ports["envoy"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
             + (f"Authorization: Bearer {token}\r\n" if token else "")
             + f"Content-Length: {len(payload)}\r\n\r\n").encode()
        )
        time.sleep(0.3)  # the filter decides what it can from the headers meanwhile
        sock.sendall(payload)
        status, headers, raw = read_response(sock)
        assert_error(status, headers, raw, want_status, want_type, want_code)
        assert headers.get("connection", "").lower() != "close", headers
        # The same connection carries the next request.
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {a['token']}\r\n\r\n".encode())
        status, _, raw = read_response(sock)
        assert status == 200, raw


def test_a_change_to_one_agent_sends_workers_only_that_agent(fresh_stack, agent_name):
    """Policy sync sends what changed since a worker's version, not every agent again: with
    300 agents, an update moves a few hundred bytes per worker where the whole state is tens of
    kilobytes. The change still takes effect at once."""
    from concurrent.futures import ThreadPoolExecutor

    s = fresh_stack
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: s.create_agent(f"{agent_name}-{i}", "1.00", 100), range(300)))
    a = s.create_agent(agent_name, "1.00", 100)
    assert s.post("/v1/chat/completions", chat(), a["token"])[0] == 200

    def received() -> int:
        stats = http("GET", f"http://127.0.0.1:{s.ports['admin']}/stats?filter=cluster.aex_control_plane.upstream_cx_rx_bytes_total")[2]
        return int(stats.decode().split(":")[1])

    time.sleep(0.5)  # every worker holds the newest version
    before = received()
    s.aex("agent", "update", agent_name, "--allowed-models", "test-mini")
    time.sleep(0.8)  # several sync intervals: both workers fetch the change
    moved = received() - before
    assert moved < 8_000, f"{moved} bytes of sync traffic for one agent's change"

    def answers(token, model="test-model", want=None, within=2.0):
        deadline = time.time() + within
        while True:
            status, _, body = s.post("/v1/chat/completions", chat(model), token)
            if status == want or time.time() > deadline:
                return status, body
            time.sleep(0.05)

    status, body = answers(a["token"], want=403)
    assert status == 403 and error_code(body) == ("permission_error", "model_not_allowed"), body[:300]
    # A token rotated the same way: the old one is refused, the new one works.
    new = s.aex_json("agent", "rotate-token", agent_name)["token"]
    assert answers(a["token"], want=401)[0] == 401
    assert s.post("/v1/chat/completions", chat("test-mini"), new)[0] == 200
