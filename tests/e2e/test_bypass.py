"""No way around governance: tools, images and disallowed models are refused on *every* endpoint
that can carry them, however they are spelled, and every path outside the governed endpoints is
refused — while the provider receives nothing at all.

The agent here may use only `test-model`, no tools and no images (`--no-tools --no-vision
--allowed-models test-model`). Each probe is sent with raw HTTP (http.client sends the path
verbatim, so path tricks reach Envoy untouched) and the mock provider's request log is compared
before and after: a refusal that still reached the provider is a bypass.

Two more agents check what the first cannot: a strict agent (refused media the classifier cannot
bound), and one whose tool allow-list admits only `get_weather`.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
from pathlib import Path

import pytest

HELLO = [{"role": "user", "content": "hello"}]
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
FN = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
RFN = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def js(v) -> bytes:
    return json.dumps(v).encode()


@pytest.fixture(scope="module")
def agent(stack):
    a = stack.create_agent("bypass-agent", "100.00", 100000, "--no-tools", "--no-vision", "--allowed-models", "test-model")
    # Control: the same agent gets a plain request through, so "nothing reached the provider"
    # below means "refused", not "the route is broken".
    before = len(stack.mock_requests())
    s, _, b = send(stack, "POST", "/v1/chat/completions", js({"model": "test-model", "messages": HELLO}), a["token"])
    assert s == 200, b[:300]
    assert len(stack.mock_requests()) == before + 1
    return a


def send(stack, method: str, path: str, body, token: str | None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports["envoy"], timeout=30)
    try:
        h = {"content-type": "application/json"}
        if token:
            h["authorization"] = f"Bearer {token}"
        h.update(headers or {})
        chunked = not isinstance(body, (bytes, type(None)))
        conn.request(method, path, body=body, headers=h, encode_chunked=chunked)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def refused(stack, agent, method, path, body, headers=None):
    """Sends the probe; asserts the provider saw nothing. Returns (status, error code or None)."""
    before = stack.mock_requests()
    status, hs, raw = send(stack, method, path, body, agent["token"], headers)
    time.sleep(0.05)  # a forwarded request is recorded before its response; this is only slack
    after = stack.mock_requests()
    assert after == before, f"{method} {path} reached the provider: {after[len(before):]}"
    assert 400 <= status < 500, f"{method} {path} was not refused: {status} {raw[:300]!r}"
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return status, None
    return status, err.get("code")


def chat(**kw):
    return {"model": "test-model", "messages": HELLO, **kw}


def resp(**kw):
    return {"model": "test-model", "input": "hello", **kw}


BODY_CASES = [
    # chat/completions: tools in every form, images in every part type, models
    ("chat_tools", "/v1/chat/completions", js(chat(tools=[FN])), 403, "tools_not_allowed"),
    ("chat_tools_required", "/v1/chat/completions", js(chat(tools=[FN], tool_choice="required")), 403, "tools_not_allowed"),
    ("chat_tools_stream", "/v1/chat/completions", js(chat(tools=[FN], stream=True)), 403, "tools_not_allowed"),
    ("chat_functions_legacy", "/v1/chat/completions", js(chat(functions=[{"name": "f", "parameters": {}}], function_call="auto")), 403, "tools_not_allowed"),
    ("chat_custom_tool", "/v1/chat/completions", js(chat(tools=[{"type": "custom", "custom": {"name": "shell"}}])), 403, "tools_not_allowed"),
    ("chat_tools_escaped_key", "/v1/chat/completions", b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"\\u0074ools":' + js([FN]) + b"}", 403, "tools_not_allowed"),
    # Duplicate keys: the provider's JSON parser (like serde_json and Python's) keeps the last.
    ("chat_tools_duplicate_key", "/v1/chat/completions", b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"tools":null,"tools":' + js([FN]) + b"}", 403, "tools_not_allowed"),
    ("chat_image_url", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": PNG}}]}])), 403, "vision_not_allowed"),
    ("chat_image_url_stream", "/v1/chat/completions", js(chat(stream=True, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])), 403, "vision_not_allowed"),
    ("chat_image_in_system", "/v1/chat/completions", js(chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}, *HELLO])), 403, "vision_not_allowed"),
    ("chat_input_image_part", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "input_image", "image_url": PNG}]}])), 403, "vision_not_allowed"),
    # Parts a provider reads as media by their members, whatever their type (vLLM reads a part
    # without a type, or with a uuid, by its image_url / video_url / image_embeds member).
    ("chat_typeless_image_url", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, {"image_url": PNG}]}])), 403, "vision_not_allowed"),
    ("chat_typeless_image_url_object", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"image_url": {"url": PNG}}]}])), 403, "vision_not_allowed"),
    ("chat_text_part_with_uuid_and_image_url", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "uuid": "img-1", "image_url": PNG}]}])), 403, "vision_not_allowed"),
    ("chat_video_url_part", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}]}])), 403, "vision_not_allowed"),
    ("chat_image_embeds_part", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "AAAA"}]}])), 403, "vision_not_allowed"),
    # A PDF's pages reach the model as images: files are visual input.
    ("chat_file_part", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}])), 403, "vision_not_allowed"),
    ("chat_text_part_with_file", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]}])), 403, "vision_not_allowed"),
    ("responses_input_file", "/v1/responses", js(resp(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}])), 403, "vision_not_allowed"),
    ("chat_content_one_part_object", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": {"type": "image_url", "image_url": {"url": PNG}}}])), 403, "vision_not_allowed"),
    ("chat_model_test_mini", "/v1/chat/completions", js(chat(model="test-mini")), 403, "model_not_allowed"),
    ("chat_model_unpriced", "/v1/chat/completions", js(chat(model="unpriced-model")), 403, "model_not_allowed"),
    ("chat_model_upstream_name", "/v1/chat/completions", js(chat(model="mock/mini-2024")), 403, "model_not_allowed"),
    ("chat_model_unknown", "/v1/chat/completions", js(chat(model="gpt-4o")), 403, "model_not_allowed"),
    ("chat_model_duplicate_key", "/v1/chat/completions", b'{"model":"test-model","messages":[{"role":"user","content":"x"}],"model":"test-mini"}', 403, "model_not_allowed"),
    ("chat_tools_trailing_slash", "/v1/chat/completions/", js(chat(tools=[FN])), 403, "tools_not_allowed"),
    ("chat_image_with_query", "/v1/chat/completions?api-version=2024-01-01", js(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}])), 403, "vision_not_allowed"),
    # Responses: function and built-in tools, images as parts and as items, models
    ("responses_function_tool", "/v1/responses", js(resp(tools=[RFN])), 403, "tools_not_allowed"),
    ("responses_web_search", "/v1/responses", js(resp(tools=[{"type": "web_search"}])), 403, "tools_not_allowed"),
    ("responses_web_search_preview", "/v1/responses", js(resp(tools=[{"type": "web_search_preview"}])), 403, "tools_not_allowed"),
    ("responses_file_search", "/v1/responses", js(resp(tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}])), 403, "tools_not_allowed"),
    ("responses_code_interpreter", "/v1/responses", js(resp(tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])), 403, "tools_not_allowed"),
    ("responses_image_generation", "/v1/responses", js(resp(tools=[{"type": "image_generation"}])), 403, "tools_not_allowed"),
    ("responses_mcp", "/v1/responses", js(resp(tools=[{"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"}])), 403, "tools_not_allowed"),
    ("responses_computer_use", "/v1/responses", js(resp(tools=[{"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "browser"}])), 403, "tools_not_allowed"),
    ("responses_web_search_stream", "/v1/responses", js(resp(tools=[{"type": "web_search"}], stream=True)), 403, "tools_not_allowed"),
    ("responses_input_image_part", "/v1/responses", js(resp(input=[{"role": "user", "content": [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": PNG}]}])), 403, "vision_not_allowed"),
    ("responses_input_image_message", "/v1/responses", js(resp(input=[{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}])), 403, "vision_not_allowed"),
    ("responses_input_image_item", "/v1/responses", js(resp(input=[{"type": "input_image", "image_url": PNG}])), 403, "vision_not_allowed"),
    ("responses_input_image_stream", "/v1/responses", js(resp(stream=True, input=[{"role": "user", "content": [{"type": "input_image", "image_url": PNG}]}])), 403, "vision_not_allowed"),
    ("responses_typeless_image_url_part", "/v1/responses", js(resp(input=[{"role": "user", "content": [{"image_url": PNG}]}])), 403, "vision_not_allowed"),
    ("responses_content_one_part_object", "/v1/responses", js(resp(input=[{"role": "user", "content": {"type": "input_image", "image_url": PNG}}])), 403, "vision_not_allowed"),
    ("responses_model_test_mini", "/v1/responses", js(resp(model="test-mini")), 403, "model_not_allowed"),
    ("responses_model_unpriced", "/v1/responses", js(resp(model="unpriced-model")), 403, "model_not_allowed"),
    # Embeddings and legacy completions: models (and tools, should anyone try)
    ("embeddings_model_test_embed", "/v1/embeddings", js({"model": "test-embed", "input": "x"}), 403, "model_not_allowed"),
    ("embeddings_model_test_mini", "/v1/embeddings", js({"model": "test-mini", "input": ["x", "y"]}), 403, "model_not_allowed"),
    ("embeddings_model_unknown", "/v1/embeddings", js({"model": "text-embedding-3-large", "input": "x"}), 403, "model_not_allowed"),
    ("completions_model_test_mini", "/v1/completions", js({"model": "test-mini", "prompt": "x"}), 403, "model_not_allowed"),
    ("completions_model_unpriced", "/v1/completions", js({"model": "unpriced-model", "prompt": "x", "stream": True}), 403, "model_not_allowed"),
    ("completions_tools", "/v1/completions", js({"model": "test-model", "prompt": "x", "tools": [FN]}), 403, "tools_not_allowed"),
]


def denied(stack, agent, case):
    """Sends a BODY_CASES-shaped probe: refused with the expected code, audited, never forwarded."""
    name, path, body, want_status, want_code = case
    n = len(stack.audit(agent["id"], "request.denied"))
    status, code = refused(stack, agent, "POST", path, body)
    assert (status, code) == (want_status, want_code), name
    deadline = time.monotonic() + 5
    while True:
        ev = stack.audit(agent["id"], "request.denied")
        if len(ev) > n:
            assert ev[-1]["payload"]["code"] == want_code, ev[-1]
            break
        assert time.monotonic() < deadline, f"{name}: denial not audited"
        time.sleep(0.05)


@pytest.mark.parametrize("case", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_policy_is_enforced_on_every_endpoint_and_nothing_reaches_the_provider(stack, agent, case):
    denied(stack, agent, case)


def allowed_agent(stack, name: str, *flags: str):
    """An agent whose plain request (and `control` probes) reach the provider, so a refusal below
    is the policy, not a broken route."""
    a = stack.create_agent(name, "100.00", 100000, "--allowed-models", "test-model", *flags)
    before = len(stack.mock_requests())
    s, _, b = send(stack, "POST", "/v1/chat/completions", js(chat()), a["token"])
    assert s == 200, b[:300]
    assert len(stack.mock_requests()) == before + 1
    return a


@pytest.fixture(scope="module")
def strict_agent(stack):
    return allowed_agent(stack, "bypass-strict-agent", "--strict")


# A strict agent (vision allowed) is refused media the classifier cannot bound, wherever it sits.
STRICT_CASES = [
    ("chat_content_one_part_object_audio", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}}])), 403, "strict_violation"),
    ("chat_text_part_with_input_audio", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "input_audio": {"data": "AAAA", "format": "wav"}}]}])), 403, "strict_violation"),
    ("chat_text_part_with_file", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "file": {"file_id": "file-abc"}}]}])), 403, "strict_violation"),
    ("chat_text_part_with_uuid_and_video_url", "/v1/chat/completions", js(chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "uuid": "v-1", "video_url": {"url": "https://example.com/a.mp4"}}]}])), 403, "strict_violation"),
]


@pytest.mark.parametrize("case", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_strict_agents_are_refused_media_hidden_in_text_parts_or_object_content(stack, strict_agent, case):
    denied(stack, strict_agent, case)


@pytest.fixture(scope="module")
def tool_list_agent(stack):
    a = allowed_agent(stack, "bypass-tool-list-agent", "--allowed-tools", "get_weather")
    # Control: the allowed tool itself passes, as chat and as Responses name it.
    for path, body in (("/v1/chat/completions", chat(tools=[FN])), ("/v1/responses", resp(tools=[RFN]))):
        before = len(stack.mock_requests())
        s, _, b = send(stack, "POST", path, js(body), a["token"])
        assert s == 200, (path, b[:300])
        assert len(stack.mock_requests()) == before + 1
    return a


# A tool entry carrying several names: each one must be on the allow-list, since providers differ
# in which they read (Responses the top-level `name`, chat `function.name`, a custom tool `custom.name`).
TOOL_NAME_CASES = [
    ("responses_function_name_vs_nested_function_name", "/v1/responses", js(resp(tools=[{**RFN, "name": "delete_files", "function": {"name": "get_weather"}}])), 403, "tool_not_allowed"),
    ("chat_custom_tool_name_vs_custom_name", "/v1/chat/completions", js(chat(tools=[{"type": "custom", "name": "get_weather", "custom": {"name": "shell"}}])), 403, "tool_not_allowed"),
    ("chat_legacy_function_name_vs_nested_function_name", "/v1/chat/completions", js(chat(functions=[{"name": "delete_files", "function": {"name": "get_weather"}, "parameters": {}}])), 403, "tool_not_allowed"),
    ("chat_function_name_vs_top_level_name", "/v1/chat/completions", js(chat(tools=[{**FN, "name": "delete_files"}])), 403, "tool_not_allowed"),
]


@pytest.mark.parametrize("case", TOOL_NAME_CASES, ids=[c[0] for c in TOOL_NAME_CASES])
def test_every_name_a_tool_carries_must_be_allowed(stack, tool_list_agent, case):
    denied(stack, tool_list_agent, case)


def test_chunked_and_compressed_bodies_cannot_smuggle_tools(stack, agent):
    body = js(chat(tools=[FN]))
    # Chunked transfer encoding, split inside the "tools" key.
    i = body.index(b"tools") + 2
    assert refused(stack, agent, "POST", "/v1/chat/completions", iter([body[:i], body[i:]])) == (403, "tools_not_allowed")
    # A gzip-encoded body cannot be classified: refused, never forwarded unread.
    status, _ = refused(stack, agent, "POST", "/v1/chat/completions", gzip.compress(body), {"content-encoding": "gzip"})
    assert status in (400, 403, 415)
    status, _ = refused(stack, agent, "POST", "/v1/responses", gzip.compress(js(resp(tools=[{"type": "web_search"}]))), {"content-encoding": "gzip"})
    assert status in (400, 403, 415)


UNKNOWN = [
    ("POST", "/v1/files"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/batches"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/moderations"),
    ("POST", "/v1/assistants"),
    ("GET", "/v1/assistants"),
    ("POST", "/v1/threads/runs"),
    ("POST", "/v1/vector_stores"),
    ("POST", "/v1/uploads"),
    ("POST", "/v1/realtime/sessions"),
    ("GET", "/v1/files"),
    ("GET", "/v1/responses/resp_123"),
    ("DELETE", "/v1/responses/resp_123"),
    ("POST", "/v1/responses/resp_123/cancel"),
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("DELETE", "/v1/models/test-model"),
    ("POST", "/v1/models"),
    ("POST", "/v1"),
    ("POST", "/v1/"),
    # path tricks
    ("POST", "/v1/chat/completions/../files"),
    ("POST", "/v1/chat/completions/../../v1/files"),
    ("POST", "/v1//chat/completions"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1/./chat/completions"),
    ("POST", "/V1/chat/completions"),
    ("POST", "/v1/Chat/Completions"),
    ("POST", "/v1/chat/completions/%2e%2e/files"),
    ("POST", "/v1/chat/completions/%2E%2E/%2E%2E/v1/files"),
    ("POST", "/v1/%2e%2e/v1/files"),
    ("POST", "/v1/chat%2fcompletions"),
    ("POST", "/v1/chat/completions%2f..%2ffiles"),
    ("POST", "/%76%31/chat/completions"),
    ("POST", "/v1/chat/completions;/files"),
    ("POST", "/v1/chat/completions%00"),
    ("POST", "/v1/files#/../chat/completions"),
    ("POST", "/dashboard/../v1/files"),
    ("POST", "/dashboard/../v1/chat/completions"),
    ("POST", "/dashboard/../mock/v1/chat/completions"),
    ("POST", "/v1/chat/completions/x"),
    ("POST", "/v1/chat/completionsx"),
    ("POST", "/v10/chat/completions"),
    ("POST", "/chat/completions"),
]


def _body_for(method: str):
    # A body that would be a perfectly good chat request if it reached the provider.
    return js(chat()) if method in ("POST", "PUT") else None


@pytest.mark.parametrize("method,path", UNKNOWN, ids=[f"{m} {p}" for m, p in UNKNOWN])
def test_unknown_paths_are_refused_and_never_forwarded(stack, agent, method, path):
    status, code = refused(stack, agent, method, path, _body_for(method))
    plain_unknown = path.startswith("/v1/") and ".." not in path and "%" not in path and "//" not in path
    if plain_unknown:
        assert (status, code) == (404, "unknown_endpoint"), (method, path)
    elif path.startswith("/dashboard/"):
        # Envoy does not normalise paths, so this is a dashboard path: the dashboard's own 404.
        assert status == 404, (method, path, status, code)
    else:
        assert status == 404 and code == "unknown_endpoint" or status in (400, 403), (method, path, status, code)


def test_the_upstream_selector_header_cannot_be_spoofed(stack, agent):
    """`x-aex-upstream` picks the provider cluster in Envoy; a client sending it must not reach
    the provider on an ungoverned path."""
    cds = (stack.home / "envoy" / "cds").glob("*.yaml")
    clusters = {line.split('"')[1] for p in cds for line in Path(p).read_text().splitlines() if line.strip().startswith("name:")}
    assert clusters, "no provider cluster found"
    for cluster in sorted(clusters) + ["aex_http"]:
        for method, path in (("POST", "/v1/files"), ("POST", "/V1/chat/completions"), ("POST", "/chat/completions"),
                             ("POST", "/v2/chat/completions"), ("GET", "/v1/assistants"), ("POST", "/dashboard/../v1/chat/completions")):
            refused(stack, agent, method, path, _body_for(method), {"x-aex-upstream": cluster})
        # On a governed path the header is ignored and policy still applies.
        assert refused(stack, agent, "POST", "/v1/chat/completions", js(chat(tools=[FN])), {"x-aex-upstream": cluster}) == (403, "tools_not_allowed")


def test_absolute_form_request_target_is_governed_too(stack, agent):
    """`POST http://host/v1/files HTTP/1.1` (absolute-form) is the same request as /v1/files."""
    import socket

    port = stack.ports["envoy"]
    before = stack.mock_requests()
    for target, body in ((f"http://127.0.0.1:{port}/v1/files", js(chat())), (f"http://127.0.0.1:{port}/v1/chat/completions", js(chat(tools=[FN])))):
        req = (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {agent['token']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(req)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert 400 <= status < 500, (target, data[:300])
    time.sleep(0.05)
    assert stack.mock_requests() == before


def h2c_request(port: int, headers: list, body: bytes, trailers: list | None = None):
    """One HTTP/2 cleartext (prior knowledge) request; returns (status, body)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        conn.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)
        s.sendall(conn.data_to_send())
        status, out = None, b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            ended = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    out += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    ended = True
            s.sendall(conn.data_to_send())
            if ended:
                break
    return status, out


def test_an_http2_request_ended_by_trailers_is_refused_and_audited(stack, agent):
    """Over HTTP/2 a request may end with a trailers frame instead of an end-of-stream body: the
    body then never arrives "complete", so it must be refused (and audited), not released
    unclassified into Envoy's routing (it used to fall to the catch-all 404 with no audit event)."""
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1"), (":path", "/v1/chat/completions"),
               ("content-type", "application/json"), ("authorization", f"Bearer {agent['token']}")]
    body = js(chat())
    status, raw = h2c_request(stack.ports["envoy"], headers, body)
    assert status == 200, raw[:300]  # control: HTTP/2 itself is governed and forwarded
    before = stack.mock_requests()
    denied = len(stack.audit(agent["id"], "request.denied"))
    status, raw = h2c_request(stack.ports["envoy"], headers, body, trailers=[("x-checksum", "abc")])
    assert status == 400, raw[:300]
    err = json.loads(raw)["error"]
    assert err["code"] == "invalid_request" and "trailers" in err["message"], err
    time.sleep(0.3)
    assert stack.mock_requests() == before
    deadline = time.time() + 5
    while len(stack.audit(agent["id"], "request.denied")) == denied and time.time() < deadline:
        time.sleep(0.05)
    assert stack.audit(agent["id"], "request.denied")[-1]["payload"]["code"] == "invalid_request"
