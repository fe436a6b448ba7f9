"""The budget guarantee end to end (SPEC §3, §4, §7): exhaustion ends in 402 `budget_exceeded`,
`spent + reserved ≤ budget` holds under concurrency, the output cap is clamped to what the budget
affords (strict agents are refused instead), a provider overrun is charged honestly and blocks the
agent, and budgets are exact decimals.

test-model costs 1 µUSD per input token and 2 µUSD per output token; max_output_tokens 4096.
The control plane reserves input_bound + 2 × output_cap, where input_bound = body bytes + 8 per
message + 16 (no images here)."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from harness import error_code

MODEL = "test-model"
MODEL_MAX_OUTPUT = 4096
MIN_CLAMP = 16  # [limits] min_output_tokens default


def cost(prompt, completion):
    return prompt * 1 + completion * 2


def input_bound(body: bytes, messages: int = 1) -> int:
    return len(body) + 8 * messages + 16


def chat_body(content: str, **extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}).encode()


def seen_by_provider(stack, marker: str) -> list[dict]:
    """The provider requests whose body carries `marker` (the shared mock serves every test)."""
    return [r for r in stack.mock_requests() if marker in (r.get("body") or "")]


def effective_cap(provider_body: dict) -> int:
    """The output cap the provider enforces for one forwarded chat request."""
    for field in ("max_tokens", "max_completion_tokens"):
        if field in provider_body:
            return provider_body[field]
    return MODEL_MAX_OUTPUT


def assert_is_budget_exceeded(status: int, body: bytes):
    assert status == 402, body
    assert error_code(body) == ("insufficient_quota", "budget_exceeded"), body
    err = json.loads(body)["error"]
    assert err["param"] is None and err["message"], err


def sdk_error(e: openai.APIStatusError) -> dict:
    body = e.body if isinstance(e.body, dict) else json.loads(e.response.text)
    return body.get("error", body)


def assert_ledger_consistent(stack, name: str, agent_id: str) -> dict:
    a = stack.wait_settled(name)
    assert a["reserved_micros"] == 0 and a["open_reservations"] == 0, a
    assert a["spent_micros"] + a["reserved_micros"] <= a["budget_micros"], a
    assert a["spent_micros"] == stack.settled_total(agent_id), a
    return a


class InvariantMonitor:
    """Samples the agent from another thread while traffic runs: spent + reserved ≤ budget at every
    observed instant, not only at the end."""

    def __init__(self, stack, name: str):
        self.stack, self.name = stack, name
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(self.stack.agent(self.name))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=30)
        bad = [s for s in self.samples if s["spent_micros"] + s["reserved_micros"] > s["budget_micros"]]
        assert not bad, f"invariant broken while in flight: {bad[:3]}"


# ---------------------------------------------------------------------------------- 1. exhaustion


def test_sequential_requests_exhaust_the_budget_then_402_and_nothing_reaches_the_provider(stack, agent_name):
    a = stack.create_agent(agent_name, "0.001", 1000)
    budget = a["budget_micros"]
    assert budget == 1000
    marker = f"exhaust-{agent_name}"
    sent: list[bytes] = []
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda req: sent.append(req.read())]})
    client = stack.client(a["token"], http_client=http_client)
    headers = {"x-mock-output-tokens": "50"}

    successes = 0
    denial = None
    for i in range(40):
        before = stack.agent(agent_name)
        n_provider = len(seen_by_provider(stack, marker))
        try:
            r = client.chat.completions.create(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": f"{marker} request {i:02d}"}], extra_headers=headers
            )
        except openai.APIStatusError as e:
            denial = (e, before, sent[-1])
            assert len(seen_by_provider(stack, marker)) == n_provider, "a denied request reached the provider"
            break
        successes += 1
        assert r.choices[0].message.content.startswith("word1")
        after = stack.wait_settled(agent_name)
        assert after["spent_micros"] == before["spent_micros"] + cost(r.usage.prompt_tokens, r.usage.completion_tokens)
        assert after["spent_micros"] <= budget
    assert denial is not None, "a 1000 µUSD budget must run out within 40 requests of ~100 µUSD"
    assert successes >= 5, f"denied too early, after only {successes} requests"

    e, before, body = denial
    assert e.status_code == 402
    err = sdk_error(e)
    assert err["type"] == "insufficient_quota" and err["code"] == "budget_exceeded", err
    # The 402 was due: not even the minimal clamped cap fitted what remained.
    remaining = before["budget_micros"] - before["spent_micros"]
    assert before["reserved_micros"] == 0
    assert remaining < input_bound(body) + 2 * MIN_CLAMP, (remaining, len(body))

    # The same through raw HTTP, and again nothing is forwarded.
    raw = chat_body(f"{marker} raw request after exhaustion", max_tokens=50)
    n_provider = len(seen_by_provider(stack, marker))
    status, _, resp = stack.post("/v1/chat/completions", raw, a["token"], headers)
    assert_is_budget_exceeded(status, resp)
    assert len(seen_by_provider(stack, marker)) == n_provider

    final = assert_ledger_consistent(stack, agent_name, a["id"])
    assert final["spent_micros"] == before["spent_micros"], "denials cost nothing"
    assert final["spent_micros"] <= budget
    assert len(seen_by_provider(stack, marker)) == successes
    denied = [ev for ev in stack.audit(a["id"], "request.denied") if ev["payload"]["code"] == "budget_exceeded"]
    assert len(denied) == 2


# ---------------------------------------------------------------------------------- 2. concurrency


def _run_one(client, marker: str, i: int, stream: bool, max_tokens, headers: dict):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": f"{marker} #{i:03d}"}], extra_headers=headers)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    try:
        if stream:
            text, finish = "", None
            for c in client.chat.completions.create(stream=True, **kw):
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
            return 200, text, finish
        r = client.chat.completions.create(**kw)
        return 200, r.choices[0].message.content, r.choices[0].finish_reason
    except openai.APIStatusError as e:
        return e.status_code, sdk_error(e), None


def _hammer(stack, name: str, token: str, marker: str, max_tokens, headers: dict, n: int = 100):
    client = stack.client(token)
    with InvariantMonitor(stack, name) as mon, ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(_run_one, client, marker, i, i % 2 == 0, max_tokens, headers) for i in range(n)]
        results = [f.result() for f in futures]
    assert len(mon.samples) >= 2, "the monitor never sampled the agent in flight"
    return results


def _check_outcomes(stack, name: str, agent_id: str, marker: str, results, max_tokens):
    ok = [r for r in results if r[0] == 200]
    budget_denied = [r for r in results if r[0] == 402]
    rate_limited = [r for r in results if r[0] == 429]
    assert len(ok) + len(budget_denied) + len(rate_limited) == len(results), [r for r in results if r[0] not in (200, 402, 429)]
    assert ok, "at least one request succeeds"
    assert budget_denied, "at least one request is denied for budget"
    for _, err, _ in budget_denied:
        assert (err["type"], err["code"]) == ("insufficient_quota", "budget_exceeded"), err
    for _, err, _ in rate_limited:
        assert err["code"] == "rate_limit_exceeded", err
    for _, text, finish in ok:
        words = text.split()
        assert words and words[0] == "word1", text
        if max_tokens is not None:
            assert len(words) <= max_tokens
        assert finish in ("stop", "length")

    a = assert_ledger_consistent(stack, name, agent_id)

    # Exactly the allowed requests reached the provider, each with the cap it was reserved for.
    seen = seen_by_provider(stack, marker)
    allowed = stack.audit(agent_id, "request.allowed")
    settled = stack.audit(agent_id, "request.settled")
    assert len(seen) == len(allowed) == len(ok) == len(settled), (len(seen), len(allowed), len(ok), len(settled))
    provider_caps = sorted(effective_cap(json.loads(r["body"])) for r in seen)
    reserved_caps = []
    for ev in allowed:
        p = ev["payload"]
        clamp = p["clamp_output_tokens"]
        requested = max_tokens if max_tokens is not None else MODEL_MAX_OUTPUT
        cap = clamp if clamp > 0 else requested
        assert MIN_CLAMP <= cap <= requested, p
        # What the provider may generate is covered by the reservation, which fitted the budget.
        assert p["input_token_bound"] + 2 * cap <= p["reserved_micros"] <= a["budget_micros"], p
        reserved_caps.append(cap)
    assert provider_caps == sorted(reserved_caps), "the provider saw exactly the caps that were reserved"
    for r in seen:
        body = json.loads(r["body"])
        # Even alone, each forwarded request's cap must fit the whole budget.
        assert 2 * effective_cap(body) < a["budget_micros"], body
        if max_tokens is None and "max_tokens" in body:
            assert MIN_CLAMP <= body["max_tokens"] < MODEL_MAX_OUTPUT
    for ev in settled:
        assert ev["payload"]["charge_micros"] <= ev["payload"]["reserved_micros"], ev
        assert ev["payload"]["estimated"] is False, ev
        assert ev["payload"]["charge_micros"] == cost(ev["payload"]["input_tokens"], ev["payload"]["output_tokens"]), ev
    # Metered from what the clients actually received (one word per completion token).
    assert sorted(len(text.split()) for _, text, _ in ok) == sorted(ev["payload"]["output_tokens"] for ev in settled)
    return ok, budget_denied, rate_limited, provider_caps


def test_concurrent_requests_with_max_tokens_never_break_the_budget(stack, agent_name):
    # Worst case of each: ~150 bytes of input bound + 100 × 2 µUSD ≈ 350 µUSD; 3500 covers ~10.
    a = stack.create_agent(agent_name, "0.0035", 1000)
    marker = f"conc-{agent_name}"
    headers = {"x-mock-output-tokens": "100", "x-mock-latency-ms": "30"}
    results = _hammer(stack, agent_name, a["token"], marker, 100, headers)
    ok, denied, limited, _ = _check_outcomes(stack, agent_name, a["id"], marker, results, 100)
    assert not limited, "1000 RPM is not reached by 100 requests"
    assert any(r[1] for r in ok)
    print(f"max_tokens=100: {len(ok)} ok, {len(denied)} x 402")


def test_concurrent_requests_without_max_tokens_are_clamped_and_never_break_the_budget(stack, agent_name):
    # Worst case of each: ~8350 µUSD (4096 output tokens): two fit 20000, a third only clamped.
    a = stack.create_agent(agent_name, "0.02", 1000)
    marker = f"conc-nocap-{agent_name}"
    headers = {"x-mock-output-tokens": "300", "x-mock-latency-ms": "40"}
    results = _hammer(stack, agent_name, a["token"], marker, None, headers)
    ok, denied, limited, caps = _check_outcomes(stack, agent_name, a["id"], marker, results, None)
    assert not limited
    clamped = [c for c in caps if c < MODEL_MAX_OUTPUT]
    assert clamped, f"some concurrent requests must have been clamped: {caps}"
    for _, text, finish in ok:
        n = len(text.split())
        assert n == 300 or (n < 300 and finish == "length"), (n, finish)
    print(f"no max_tokens: {len(ok)} ok ({len(clamped)} clamped), {len(denied)} x 402")


# ---------------------------------------------------------------------------------- 3. clamp


def test_request_without_max_tokens_is_clamped_to_what_the_budget_affords(stack, agent_name):
    a = stack.create_agent(agent_name, "0.002", 100)
    remaining = a["budget_micros"]
    marker = f"clamp-{agent_name}"
    body = chat_body(f"{marker} tell me everything")
    ib = input_bound(body)
    assert ib + 2 * MODEL_MAX_OUTPUT > remaining, "the test needs a budget below the model's worst case"
    affordable = (remaining - ib) // 2

    status, _, resp = stack.post("/v1/chat/completions", body, a["token"], {"x-mock-output-tokens": "5000"})
    assert status == 200, resp
    r = json.loads(resp)
    seen = seen_by_provider(stack, marker)
    assert len(seen) == 1
    cap = json.loads(seen[0]["body"])["max_tokens"]
    assert ib * 1 + cap * 2 <= remaining
    assert cap == affordable, "the clamp leaves the largest cap the budget affords"
    assert r["choices"][0]["finish_reason"] == "length"
    assert len(r["choices"][0]["message"]["content"].split()) == cap
    assert r["usage"]["completion_tokens"] == cap

    after = assert_ledger_consistent(stack, agent_name, a["id"])
    assert after["spent_micros"] == cost(r["usage"]["prompt_tokens"], cap)
    assert after["spent_micros"] <= after["budget_micros"]
    allowed = stack.audit(a["id"], "request.allowed")[-1]["payload"]
    assert allowed["clamp_output_tokens"] == cap and allowed["input_token_bound"] == ib


def test_streamed_request_without_max_tokens_is_clamped_too(stack, agent_name):
    a = stack.create_agent(agent_name, "0.002", 100)
    marker = f"clamp-stream-{agent_name}"
    stream = stack.client(a["token"]).chat.completions.create(
        model=MODEL, stream=True, messages=[{"role": "user", "content": f"{marker} stream it all"}],
        extra_headers={"x-mock-output-tokens": "5000"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    seen = seen_by_provider(stack, marker)
    assert len(seen) == 1
    cap = json.loads(seen[0]["body"])["max_tokens"]
    assert MIN_CLAMP <= cap < MODEL_MAX_OUTPUT
    assert len(text.split()) == cap and finish == ["length"]
    after = assert_ledger_consistent(stack, agent_name, a["id"])
    assert after["spent_micros"] <= after["budget_micros"]
    ev = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert ev["output_tokens"] == cap and ev["estimated"] is False
    assert ev["input_tokens"] + 2 * cap <= a["budget_micros"]


def test_strict_agent_is_refused_instead_of_clamped(stack, agent_name):
    a = stack.create_agent(agent_name, "0.002", 100, "--strict")
    marker = f"strict-{agent_name}"
    for body in (chat_body(f"{marker} no cap"), chat_body(f"{marker} big cap", max_tokens=3000)):
        status, _, resp = stack.post("/v1/chat/completions", body, a["token"], {"x-mock-output-tokens": "5000"})
        assert_is_budget_exceeded(status, resp)
    assert seen_by_provider(stack, marker) == [], "the provider saw nothing"
    after = assert_ledger_consistent(stack, agent_name, a["id"])
    assert after["spent_micros"] == 0


def test_explicit_max_tokens_above_what_fits_is_clamped(stack, agent_name):
    a = stack.create_agent(agent_name, "0.002", 100)
    marker = f"clamp-explicit-{agent_name}"
    body = chat_body(f"{marker} explicit", max_tokens=3000)
    ib = input_bound(body)
    assert ib + 2 * 3000 > a["budget_micros"]
    status, _, resp = stack.post("/v1/chat/completions", body, a["token"], {"x-mock-output-tokens": "5000"})
    assert status == 200, resp
    seen = seen_by_provider(stack, marker)
    assert len(seen) == 1
    cap = json.loads(seen[0]["body"])["max_tokens"]
    assert cap < 3000 and ib + 2 * cap <= a["budget_micros"]
    assert cap == (a["budget_micros"] - ib) // 2
    r = json.loads(resp)
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == cap
    after = assert_ledger_consistent(stack, agent_name, a["id"])
    assert after["spent_micros"] == cost(r["usage"]["prompt_tokens"], cap) <= after["budget_micros"]


def test_strict_agent_with_a_cap_that_fits_is_forwarded_byte_for_byte(stack, agent_name):
    a = stack.create_agent(agent_name, "0.002", 100, "--strict")
    marker = f"strict-fits-{agent_name}"
    # Odd spacing, key order and an unknown field: any re-serialization would show.
    raw = (
        '{ "messages" : [ {"content": "' + marker + ' exact bytes", "role":"user"} ],\n'
        '  "max_tokens":20, "model":"test-model", "temperature": 0.50, "x_vendor_ext": {"k": [1, 2.0, null]} }'
    ).encode()
    assert input_bound(raw) + 2 * 20 <= a["budget_micros"]
    status, _, resp = stack.post("/v1/chat/completions", raw, a["token"])
    assert status == 200, resp
    seen = seen_by_provider(stack, marker)
    assert len(seen) == 1
    assert seen[0]["body"].encode() == raw, "a strict agent's request is never modified"
    after = assert_ledger_consistent(stack, agent_name, a["id"])
    r = json.loads(resp)
    assert after["spent_micros"] == cost(r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])
    # test-mini is served upstream as mock/mini-2024: forwarding it would rewrite `model`.
    mapped = raw.replace(b'"model":"test-model"', b'"model":"test-mini"')
    status, _, resp = stack.post("/v1/chat/completions", mapped, a["token"])
    err = json.loads(resp)["error"]
    assert (status, err["code"]) == (403, "strict_violation"), resp
    assert "mock/mini-2024" in err["message"], err
    assert not seen_by_provider(stack, marker)[1:], "nothing more was forwarded"


# ---------------------------------------------------------------------------------- 4. overrun


def test_usage_above_the_reserved_cap_is_charged_in_full_and_blocks_the_agent(stack, agent_name):
    a = stack.create_agent(agent_name, "0.001", 100)
    marker = f"overrun-{agent_name}"
    client = stack.client(a["token"])
    r = client.chat.completions.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": f"{marker} lie about usage"}],
        extra_headers={"x-mock-usage-completion-tokens": "5000"},
    )
    assert r.usage.completion_tokens == 5000
    true_cost = cost(r.usage.prompt_tokens, 5000)
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == true_cost, "honesty beats the bound: the reported usage is charged"
    assert after["spent_micros"] > after["budget_micros"]
    assert after["spent_micros"] == stack.settled_total(a["id"])
    assert after["blocked_overrun"] is True

    settled = stack.audit(a["id"], "request.settled")[-1]
    overruns = stack.audit(a["id"], "overrun")
    assert len(overruns) == 1
    ov = overruns[0]
    assert ov["request_id"] == settled["request_id"]
    reserved = settled["payload"]["reserved_micros"]
    assert reserved < 1000
    assert ov["payload"]["charge_micros"] == true_cost
    assert ov["payload"]["excess_micros"] == true_cost - reserved

    # Blocked: the next request is refused and never forwarded.
    n = len(seen_by_provider(stack, marker))
    status, _, resp = stack.post("/v1/chat/completions", chat_body(f"{marker} next", max_tokens=5), a["token"])
    assert_is_budget_exceeded(status, resp)
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": f"{marker} sdk"}])
    assert ei.value.status_code == 402 and sdk_error(ei.value)["code"] == "budget_exceeded"
    assert len(seen_by_provider(stack, marker)) == n

    # A raise that still leaves spend above budget does not unblock.
    stack.aex("agent", "update", agent_name, "--budget", "0.005")
    assert stack.agent(agent_name)["blocked_overrun"] is True
    status, _, resp = stack.post("/v1/chat/completions", chat_body(f"{marker} still", max_tokens=5), a["token"])
    assert_is_budget_exceeded(status, resp)

    # An operator raises the budget above spend: requests work again.
    stack.aex("agent", "update", agent_name, "--budget", "0.05")
    assert stack.agent(agent_name)["blocked_overrun"] is False
    # The ledger decides, so the change is live at once.
    status, _, resp = stack.post("/v1/chat/completions", chat_body(f"{marker} again", max_tokens=5), a["token"])
    assert status == 200, resp
    final = assert_ledger_consistent(stack, agent_name, a["id"])
    r2 = json.loads(resp)
    assert final["spent_micros"] == true_cost + cost(r2["usage"]["prompt_tokens"], r2["usage"]["completion_tokens"])
    assert len(stack.audit(a["id"], "overrun")) == 1


MAX_TOKENS = 1 << 40  # filter/src/usage.rs: the largest token count taken from a provider


@pytest.mark.parametrize("reported", [str(2**63 - 1), str(2**64 - 1)])
def test_an_absurd_token_count_is_an_overrun_that_keeps_the_ledger_and_tools_working(stack, agent_name, reported):
    """A provider reporting an absurd count (found by exploratory testing: a count that made the
    charge exceed 64-bit signed range left `spent` and the audit log disagreeing for good, and
    `aex status` failing) is read as the largest believable count: charged in full, an overrun,
    the agent blocked, and every invariant and operator command intact."""
    name = f"{agent_name}-{len(reported)}"
    a = stack.create_agent(name, "0.001", 100)
    r = stack.client(a["token"]).chat.completions.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "lie hugely about usage"}],
        extra_headers={"x-mock-usage-completion-tokens": reported},
    )
    assert str(r.usage.completion_tokens) == reported  # the client sees what the provider said
    after = stack.wait_settled(name)
    assert after["spent_micros"] == cost(r.usage.prompt_tokens, MAX_TOKENS)
    assert after["spent_micros"] == stack.settled_total(a["id"])
    assert after["blocked_overrun"] is True
    assert len(stack.audit(a["id"], "overrun")) == 1
    stack.aex("audit")  # exits non-zero on any breach
    stack.aex("status")
    stack.aex("agent", "inspect", name)


# ---------------------------------------------------------------------------------- 5. exact decimals


@pytest.mark.parametrize(
    "usd,micros",
    [("0.0005", 500), ("0.000001", 1), ("5", 5_000_000), ("1.234560", 1_234_560), ("0.075", 75_000)],
)
def test_budgets_are_exact_decimals(stack, agent_name, usd, micros):
    a = stack.create_agent(agent_name, usd, 10)
    assert a["budget_micros"] == micros
    assert stack.agent(agent_name)["budget_micros"] == micros


@pytest.mark.parametrize("bad", ["-1", "1.0000001", "1.0000000", "abc", "1e3", "NaN", "1,5", "99999999999999999999"])
def test_invalid_budgets_are_refused_with_a_clear_message(stack, agent_name, bad):
    r = stack.aex("agent", "create", agent_name, bad, "10", check=False)
    assert r.returncode != 0
    assert bad in r.stderr, r.stderr
    assert "panicked" not in r.stderr and "Traceback" not in r.stderr
    assert "token" not in r.stdout.lower(), "no agent (and no token) is created"
    assert stack.aex("agent", "inspect", agent_name, check=False).returncode != 0


def test_negative_budget_after_double_dash_is_refused_by_the_money_parser(stack, agent_name):
    r = stack.aex("agent", "create", agent_name, "--", "-1", "10", check=False)
    assert r.returncode != 0
    assert "-1" in r.stderr and "BUDGET" in r.stderr.upper(), r.stderr
    assert stack.aex("agent", "inspect", agent_name, check=False).returncode != 0
