"""Governed chat through real Envoy with the official OpenAI SDK: the client sees what the
provider sent, and the ledger charges the exact cost of the provider's usage."""

import json
import socket
import time

import pytest

from harness import http


def cost(prompt, completion):
    # test-model: 1 µUSD per input token, 2 µUSD per output token.
    return prompt * 1 + completion * 2


def test_non_streaming_chat_is_forwarded_and_charged_exactly(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    stack.clear_mock()
    r = stack.client(a["token"]).chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hello there"}])
    assert r.choices[0].message.content.startswith("word1 word2")
    assert r.model == "test-model"
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == cost(r.usage.prompt_tokens, r.usage.completion_tokens)
    # The provider got the daemon's key, never the agent's token, and an uncompressed response.
    seen = stack.mock_requests()[-1]
    assert seen["headers"]["authorization"] == f"Bearer {stack.provider_key}"
    assert seen["headers"]["accept-encoding"] == "identity"  # the SDK asked for gzip
    assert "x-aex-upstream" not in seen["headers"]
    assert json.loads(seen["body"])["messages"][0]["content"] == "hello there"


def test_client_credentials_and_billing_selectors_never_reach_the_provider(stack, agent_name):
    """A provider that authenticates with `api-key` (Azure) or `x-api-key`, or an OpenAI key's
    organization/project selectors, must not let an agent bring its own credential or choose
    what the operator's key bills: those headers are removed, the daemon's key is the only one."""
    a = stack.create_agent(agent_name, "1.00", 100)
    extra = {"api-key": "sk-agent-own", "x-api-key": "sk-agent-own", "x-goog-api-key": "g-own",
             "openai-organization": "org-agent", "openai-project": "proj-agent", "x-other": "kept"}
    r = stack.client(a["token"]).chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "hi"}], extra_headers=extra)
    assert r.choices[0].message.content
    seen = stack.mock_requests()[-1]["headers"]
    for name in ("api-key", "x-api-key", "x-goog-api-key", "openai-organization", "openai-project"):
        assert name not in seen, (name, seen)
    assert seen["authorization"] == f"Bearer {stack.provider_key}"
    assert seen["x-other"] == "kept"


def test_a_provider_that_takes_its_key_in_api_key_gets_it_there(fresh_stack, agent_name):
    """Azure OpenAI authenticates with `api-key: KEY`, not `Authorization: Bearer`."""
    s = fresh_stack
    (s.home / "models.toml").write_text((s.home / "models.toml").read_text() + f"""
[providers.azure]
base_url = "http://127.0.0.1:{s.mock_port}/v1"
api_key_env = "AEX_TEST_PROVIDER_KEY"
api_key_header = "api-key"

[models."azure-model"]
provider = "azure"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
""")
    s.aex("models", "reload")
    a = s.create_agent(agent_name, "1.00", 100)
    extra = {"api-key": "sk-agent-own"}  # the agent's own is replaced, not forwarded
    r = s.client(a["token"]).chat.completions.create(
        model="azure-model", messages=[{"role": "user", "content": "hi"}], extra_headers=extra)
    assert r.choices[0].message.content
    seen = s.mock_requests()[-1]["headers"]
    assert seen["api-key"] == s.provider_key, seen
    assert "authorization" not in seen, seen


def test_streaming_chat_meters_usage_and_hides_the_injected_usage_chunk(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    stack.clear_mock()
    stream = stack.client(a["token"]).chat.completions.create(
        model="test-model", stream=True, messages=[{"role": "user", "content": "stream please"}]
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"word{i}" for i in range(1, 13))
    assert all(c.choices for c in chunks), "the usage-only chunk the client did not ask for is removed"
    body = json.loads(stack.mock_requests()[-1]["body"])
    assert body["stream_options"] == {"include_usage": True}, "AEX asks the provider for usage"
    after = stack.wait_settled(agent_name)
    ev = [e for e in stack.audit(a["id"], "request.settled")][-1]["payload"]
    assert ev["estimated"] is False
    assert after["spent_micros"] == cost(ev["input_tokens"], ev["output_tokens"]) == ev["charge_micros"]
    assert ev["output_tokens"] == 12


def test_usage_on_every_chunk_that_the_client_did_not_ask_for_reaches_it_as_null(stack, agent_name):
    """Servers that report usage on every chunk (vLLM's continuous usage stats) or on the
    finishing one do so because AEX asked for usage: the client, which did not, sees `"usage":
    null` there like on every other chunk (it used to get a usage object on each), and the
    charge is the final count, exact."""
    a = stack.create_agent(agent_name, "1.00", 100)
    stream = stack.client(a["token"]).chat.completions.create(
        model="test-model", stream=True, messages=[{"role": "user", "content": "count"}],
        extra_headers={"x-mock-running-usage": "1", "x-mock-output-tokens": "6"})
    chunks = list(stream)
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " ".join(f"word{i}" for i in range(1, 7))
    after = stack.wait_settled(agent_name)
    ev = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert (ev["estimated"], ev["output_tokens"], ev["outcome"]) == (False, 6, "complete")
    assert after["spent_micros"] == cost(ev["input_tokens"], 6)
    # Asked for: passed on as the provider sent it.
    stream = stack.client(a["token"]).chat.completions.create(
        model="test-model", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count"}],
        extra_headers={"x-mock-running-usage": "1", "x-mock-output-tokens": "6"})
    running = [c.usage.completion_tokens for c in stream if c.usage]
    assert running[:6] == [1, 2, 3, 4, 5, 6] and running[-1] == 6


def test_streaming_with_usage_requested_keeps_the_usage_chunk(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    stream = stack.client(a["token"]).chat.completions.create(
        model="test-model", stream=True, stream_options={"include_usage": True}, messages=[{"role": "user", "content": "x"}]
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == cost(usage[0].prompt_tokens, usage[0].completion_tokens)


def test_upstream_model_name_is_rewritten_and_response_model_is_the_providers(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    stack.clear_mock()
    r = stack.client(a["token"]).chat.completions.create(model="test-mini", messages=[{"role": "user", "content": "hi"}])
    assert json.loads(stack.mock_requests()[-1]["body"])["model"] == "mock/mini-2024"
    assert r.model == "mock/mini-2024"
    after = stack.wait_settled(agent_name)
    # 0.15 and 0.60 USD per 1M tokens, rounded up to the micro-dollar.
    exact = -(-(r.usage.prompt_tokens * 150_000 + r.usage.completion_tokens * 600_000) // 1_000_000)
    assert after["spent_micros"] == exact


def test_upstream_errors_pass_through_and_release_the_reservation(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    status, headers, body = stack.post(
        "/v1/chat/completions", {"model": "test-model", "messages": []}, a["token"], {"x-mock-error": "500"}
    )
    assert status == 500
    assert json.loads(body)["error"]["code"] == "mock_error"
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] == 0
    settled = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert settled["released"] is True and settled["upstream_status"] == 500


def test_models_list_is_filtered_to_allowed_priced_models(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100, "--allowed-models", "test-*")
    ids = sorted(m.id for m in stack.client(a["token"]).models.list())
    assert ids == ["test-embed", "test-mini", "test-model"], "unpriced models are never listed"
    status, _, _ = http("GET", stack.url("/v1/models/unpriced-model"), headers={"authorization": f"Bearer {a['token']}"})
    assert status == 403


def test_model_ids_in_the_path_are_percent_decoded(stack, agent_name):
    """openai-python escapes a model id in the path (`models.retrieve("openai/gpt-oss-20b")` sends
    `/v1/models/openai%2Fgpt-oss-20b`): the gateway decodes it before looking the model up."""
    a = stack.create_agent(agent_name, "1.00", 100)
    auth = {"authorization": f"Bearer {a['token']}"}
    status, _, body = http("GET", stack.url("/v1/models/test%2Dmodel"), headers=auth)
    assert status == 200 and json.loads(body)["id"] == "test-model", body
    status, _, body = http("GET", stack.url("/v1/models/org%2Fno-such-model"), headers=auth)
    assert status == 403 and "'org/no-such-model'" in json.loads(body)["error"]["message"], body


def raw_chat(stack, token: str, extra_headers: list[str]) -> tuple[int, dict]:
    """A chat request over a raw socket, so the test, not an HTTP library, decides which
    accept-encoding headers are sent (http.client and httpx always add their own)."""
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "compress me"}]}).encode()
    head = "".join(
        [f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n",
         "Content-Type: application/json\r\nConnection: close\r\n",
         *(h + "\r\n" for h in extra_headers),
         f"Content-Length: {len(body)}\r\n\r\n"])
    data = b""
    with socket.create_connection(("127.0.0.1", stack.ports["envoy"]), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def test_the_provider_is_always_asked_for_an_uncompressed_response(stack, agent_name):
    """Usage is read from the response body, so the provider must not compress it. A request
    without accept-encoding accepts any coding (RFC 9110), so AEX sends `identity` whatever the
    client asked for, and the charge stays exact."""
    a = stack.create_agent(agent_name, "1.00", 100)
    cases = {
        "none": [],
        "gzip": ["Accept-Encoding: gzip, br"],
        "two headers": ["Accept-Encoding: gzip", "Accept-Encoding: identity"],
        "identity": ["Accept-Encoding: identity"],
    }
    expected = 0
    for name, headers in cases.items():
        stack.clear_mock()
        status, body = raw_chat(stack, a["token"], headers)
        assert status == 200, (name, body)
        expected += cost(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        seen = stack.mock_requests()[-1]
        assert seen["headers"].get("accept-encoding") == "identity", (name, seen["headers"])
    assert stack.wait_settled(agent_name)["spent_micros"] == expected


def test_a_provider_that_compresses_anyway_is_charged_the_whole_cap(stack, agent_name):
    """A provider may gzip its answer although AEX asked for identity: the client still gets the
    provider's bytes (the SDK inflates them), but the usage inside is unreadable to the gateway
    and the compressed byte count says nothing about the tokens, so the charge is the
    conservative estimate at the full output cap (it used to be the compressed byte count)."""
    a = stack.create_agent(agent_name, "1.00", 100)
    c = stack.client(a["token"])
    r = c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "squeeze"}],
                                  max_tokens=300, extra_headers={"x-mock-gzip": "1"})
    assert r.choices[0].message.content.startswith("word1 word2")
    assert stack.mock_requests()[-1]["headers"]["accept-encoding"] == "identity"
    after = stack.wait_settled(agent_name)
    settled = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert settled["estimated"] is True and settled["output_tokens"] == 300, settled
    assert after["spent_micros"] == cost(settled["input_tokens"], 300) > cost(r.usage.prompt_tokens, r.usage.completion_tokens)


def sse_payloads(raw: bytes) -> list:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]


def test_an_event_stream_labelled_as_plain_text_is_still_metered_and_cleaned(stack, agent_name):
    """Some servers stream events as text/plain (or application/json). The gateway tells an
    event stream from a JSON body by its first bytes, so usage is still read exactly and the
    usage chunk it asked for is still removed from a client that did not ask for it."""
    a = stack.create_agent(agent_name, "1.00", 100)
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "label me wrong"}], "stream": True}).encode()
    headers = {"x-mock-content-type": "text/plain; charset=utf-8"}
    ds, _, direct = http("POST", f"http://127.0.0.1:{stack.mock_port}/v1/chat/completions", body,
                         {"content-type": "application/json", **headers})
    gs, gh, through = stack.post("/v1/chat/completions", body, a["token"], headers=headers)
    assert ds == gs == 200 and gh["content-type"] == "text/plain; charset=utf-8"
    text = lambda events: "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    got, want = sse_payloads(through), sse_payloads(direct)
    assert text(got) == text(want) and len(got) == len(want)
    assert all(e.get("usage") is None for e in got), "the injected usage chunk reached the client"
    assert through.rstrip().endswith(b"data: [DONE]")
    after = stack.wait_settled(agent_name)
    settled = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert settled["estimated"] is False, settled
    assert after["spent_micros"] == cost(settled["input_tokens"], settled["output_tokens"])


@pytest.mark.parametrize("n,encoding", [(100, "float"), (2048, "base64")])  # 6 MB and 34 MB of JSON
def test_a_large_embeddings_batch_is_charged_exactly(stack, agent_name, n, encoding):
    """An embeddings batch answer runs to megabytes with its usage at the very end. Past 4 MiB the
    filter stops keeping the body and scans it as it passes (the Wasm VM's memory never shrinks
    back), keeping only the top-level usage: the charge stays exact, not an estimate (past 32 MiB
    it used to be one: the usage had been cut off with the rest of the body)."""
    a = stack.create_agent(agent_name, "1.00", 100)
    inputs = [f"document number {i} about the budget guarantee" for i in range(n)]
    body = json.dumps({"model": "test-embed", "input": inputs, "dimensions": 3072, "encoding_format": encoding}).encode()
    status, _, raw = http("POST", f"http://127.0.0.1:{stack.mock_port}/v1/embeddings", body, {"content-type": "application/json"})
    assert status == 200 and len(raw) > 4 << 20, len(raw)  # past the full-parse size
    # The SDK asks for base64 by default (and decodes it); the large case is that default.
    fmt = {"encoding_format": "float"} if encoding == "float" else {}
    r = stack.client(a["token"]).embeddings.create(model="test-embed", input=inputs, dimensions=3072, **fmt)
    assert len(r.data) == n and len(r.data[0].embedding) == 3072
    after = stack.wait_settled(agent_name)
    settled = stack.audit(a["id"], "request.settled")[-1]["payload"]
    assert settled["estimated"] is False and settled["input_tokens"] == r.usage.prompt_tokens, settled
    assert after["spent_micros"] == -(-r.usage.prompt_tokens * 20_000 // 1_000_000)  # 0.02 $/1M, rounded up


def test_a_provider_that_refuses_stream_options_gets_none_and_its_streams_are_still_metered(fresh_stack, agent_name):
    """Mistral's API refuses `stream_options` (422 extra_forbidden), so AEX's include_usage edit
    would break every stream to it. `inject_stream_usage = false` on the provider turns the edit
    off: the request goes out as the client sent it, usage the provider sends on its own is
    metered exactly, a stream without usage is estimated, and a strict agent (whose requests
    AEX may not edit) may stream there."""
    s = fresh_stack
    models = (s.home / "models.toml").read_text()
    models += f"""
[providers.mistral]
base_url = "http://127.0.0.1:{s.mock_port}/v1"
api_key_env = "AEX_TEST_PROVIDER_KEY"
inject_stream_usage = false

[models."mistral-small"]
provider = "mistral"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
max_output_tokens = 4096
"""
    (s.home / "models.toml").write_text(models)
    s.aex("models", "reload")
    a = s.create_agent(agent_name, "1.00", 100)
    strict = s.create_agent(agent_name + "-strict", "1.00", 100, "--strict")
    body = {"model": "mistral-small", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.time() + 10
    while True:
        status, _, raw = s.post("/v1/chat/completions", body, a["token"])
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, raw[:300]
    sent = json.loads(s.mock_requests()[-1]["body"])
    assert "stream_options" not in sent, sent
    assert not [p for p in sse_payloads(raw) if p.get("usage")], "the mock sends no usage unasked"
    s.wait_settled(agent_name)
    settled = s.audit(a["id"], "request.settled")[-1]["payload"]
    assert settled["estimated"] is True and settled["outcome"] == "no_usage_reported", settled
    # A strict agent's stream needs no edit here: forwarded as sent, and the usage it asked for
    # is metered exactly.
    body["stream_options"] = {"include_usage": True}
    status, _, raw = s.post("/v1/chat/completions", body, strict["token"])
    assert status == 200, raw[:300]
    usage = [p["usage"] for p in sse_payloads(raw) if p.get("usage")][-1]
    after = s.wait_settled(agent_name + "-strict")
    assert after["spent_micros"] == cost(usage["prompt_tokens"], usage["completion_tokens"])
    del body["stream_options"]
    status, _, raw = s.post("/v1/chat/completions", body, strict["token"])
    assert status == 200, raw[:300]
    assert "stream_options" not in json.loads(s.mock_requests()[-1]["body"])


def test_every_answer_names_the_audit_id_of_its_request(stack, agent_name):
    """The provider's own `x-request-id` reaches the client unchanged, so AEX names the id its
    audit log records the request under in `x-aex-request-id`: on answers from the provider
    (streamed or not) and on AEX's own refusals (where `x-request-id` is that id too)."""
    a = stack.create_agent(agent_name, "1.00", 100, "--allowed-models", "test-model")
    c = stack.client(a["token"])
    raw = c.chat.completions.with_raw_response.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    plain = raw.headers["x-aex-request-id"]
    assert raw.headers["x-request-id"] != plain, "the provider's id passes unchanged"
    with c.chat.completions.with_streaming_response.create(
            model="test-model", stream=True, messages=[{"role": "user", "content": "hi"}]) as r:
        streamed = r.headers["x-aex-request-id"]
        for _ in r.iter_lines():
            pass
    status, headers, _ = stack.post("/v1/chat/completions", {"model": "test-mini", "messages": [{"role": "user", "content": "x"}]}, a["token"])
    assert status == 403
    refused = headers["x-aex-request-id"]
    assert headers["x-request-id"] == refused
    stack.wait_settled(agent_name)
    ids = lambda kind: {e["request_id"] for e in stack.audit(a["id"], kind)}
    assert {plain, streamed} <= ids("request.allowed") & ids("request.settled")
    assert refused in ids("request.denied")
    assert len({plain, streamed, refused}) == 3
    # `aex audit --request ID` shows them.
    shown = json.loads(stack.aex("--json", "audit", "--request", plain).stdout)
    assert [e["kind"] for e in shown["events"]] == ["request.allowed", "request.settled"], shown
    assert {e["agent"] for e in shown["events"]} == {agent_name}
    text = stack.aex("audit", "--request", refused).stdout
    assert "request.denied" in text and "model_not_allowed" in text, text
    missing = stack.aex("audit", "--request", "req_nothing", check=False)
    assert missing.returncode == 1 and "no audit events" in missing.stderr
