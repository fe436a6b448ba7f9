"""Providers whose answers end or are framed in ways the mock never produces, driven byte for byte
by a raw upstream (raw_upstream.py): what the client receives, and what the ledger charges.

Found by a black-box probe of the gateway against such upstreams; each case failed before its fix.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from harness import Stack
from raw_upstream import RawUpstream, chunked, close_delimited, content_chunk, response, sse, status_line, usage_chunk

CHAT = "/v1/chat/completions"

RAW_PROVIDER = """
[providers.raw]
base_url = "http://127.0.0.1:{port}/v1"
api_key_env = "AEX_TEST_PROVIDER_KEY"

[models."raw-model"]
provider = "raw"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
max_output_tokens = 1000
"""


def cost(input_tokens: int, output_tokens: int) -> int:
    return input_tokens + 2 * output_tokens


class Env:
    def __init__(self, tmp):
        self.up = RawUpstream()
        try:
            self.stack = Stack(tmp)
        except BaseException:
            self.up.stop()
            raise
        s = self.stack
        models = s.home / "models.toml"
        models.write_text(models.read_text() + RAW_PROVIDER.format(port=self.up.port))
        s.aex("models", "reload")

    def stop(self):
        self.stack.stop()
        self.up.stop()

    def call(self, name: str, body: dict, scenario) -> tuple[dict, bytes, dict]:
        """One request of a new agent `name`, answered by `scenario`: the agent after it settled,
        the bytes the client received, and the settlement's audit payload."""
        s = self.stack
        a = s.create_agent(name, "10.00", 100000)
        self.up.scenarios[name] = scenario
        conn = http.client.HTTPConnection("127.0.0.1", s.ports["envoy"], timeout=30)
        try:
            conn.request("POST", CHAT, json.dumps(body).encode(), {"authorization": f"Bearer {a['token']}", "content-type": "application/json", "x-scenario": name})
            r = conn.getresponse()
            assert r.status == 200, r.read()
            got = b""
            try:
                while chunk := r.read1(65536):
                    got += chunk
            except http.client.IncompleteRead as e:
                got += e.partial
        finally:
            conn.close()
        after = s.wait_settled(name, timeout=20)
        deadline = time.time() + 10
        while not (ev := s.audit(a["id"], "request.settled")):
            assert time.time() < deadline, "no settlement recorded"
            time.sleep(0.05)
        payload = ev[-1]["payload"]
        assert after["spent_micros"] == payload["charge_micros"] == cost(payload["input_tokens"], payload["output_tokens"])
        return after, got, payload


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("raw"))
    yield e
    rc = e.stack.aex("audit", check=False)
    e.stop()
    assert rc.returncode == 0, rc.stdout + rc.stderr


def chat(stream: bool = False, **extra) -> dict:
    body = {"model": "raw-model", "messages": [{"role": "user", "content": "hello there"}], **extra}
    if stream:
        body["stream"] = True
    return body


CONTENT = [sse(content_chunk("héllo ")), sse(content_chunk("world")), sse(content_chunk("!", "stop"))]
FINAL_USAGE = sse(usage_chunk(11, 7))
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_a_running_count_from_a_stream_that_ends_before_its_final_report_is_an_estimate(env, agent_name, framing):
    """A server reporting a running usage count on every chunk (vLLM's continuous usage stats)
    whose stream ends cleanly after 3 tokens: no finish reason, no usage-only chunk, no [DONE]
    (the body closed by the connection, or a proxy ending the chunked body when its backend died).
    The last count is a lower bound, as for a stream cut by a reset: estimated, at least the bytes
    that came. It was charged as exact at the lower bound."""
    events = [sse(content_chunk(f"w{i} ", usage={"prompt_tokens": 20, "completion_tokens": i, "total_tokens": 20 + i})) for i in (1, 2, 3)]
    scenario = (lambda req: close_delimited(events)) if framing == "close" else (lambda req: chunked(events))
    _, got, ev = env.call(agent_name, chat(stream=True, stream_options={"include_usage": True}), scenario)
    assert got == b"".join(events), "the client asked for usage: every byte passes"
    assert (ev["outcome"], ev["estimated"], ev["input_tokens"]) == ("cut_with_running_usage", True, 20), ev
    assert ev["output_tokens"] >= len(got) > 3, ev


def test_a_json_answer_cut_short_by_a_clean_end_is_charged_its_whole_cap(env, agent_name):
    """A non-streaming answer whose body stops after 80 bytes, ended by the connection closing
    (no length to tell it short). The provider generated and bills the answer whole: the cap,
    as when a declared length is not reached. It was charged the 80 bytes that came."""
    whole = json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 200}, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 1000, "total_tokens": 1012}}).encode()
    _, got, ev = env.call(agent_name, chat(max_tokens=1000), lambda req: close_delimited([whole[:80]], "application/json"))
    assert got == whole[:80]
    assert (ev["outcome"], ev["estimated"], ev["output_tokens"]) == ("stream_cut", True, 1000), ev


SHAPES = {
    # An event stream sent with a length and no content type (a buffering proxy), or labelled JSON.
    "unlabelled-with-length": lambda body: [status_line(200, [("content-length", str(len(body))), ("connection", "close")]), body],
    "json-with-length": lambda body: [response(200, body, "application/json")],
    # The usage-only chunk is the last event, its blank line (or both newlines) missing, no [DONE].
    "last-event-unterminated": None,
    "last-event-one-newline": None,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_usage_chunk_the_gateway_asked_for_never_reaches_the_client(env, agent_name, shape):
    """The client did not ask for usage, so the usage-only chunk the gateway asked for is removed
    (SPEC §7) whatever the framing; the charge is the provider's exact count."""
    if SHAPES[shape]:
        body = b"".join(CONTENT) + FINAL_USAGE + DONE
        want = b"".join(CONTENT) + DONE
        scenario = lambda req: SHAPES[shape](body)  # noqa: E731
    else:
        last = FINAL_USAGE.rstrip(b"\n") + (b"\n" if shape == "last-event-one-newline" else b"")
        want = b"".join(CONTENT)
        scenario = lambda req: chunked(CONTENT + [last])  # noqa: E731
    _, got, ev = env.call(agent_name, chat(stream=True), scenario)
    assert got == want, f"client got: {got!r}"
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (11, 7, False), ev


def test_usage_on_a_content_chunk_split_over_data_lines_is_nulled(env, agent_name):
    """A usage object on the finishing content chunk, its JSON split over two `data:` lines (SSE
    joins them with a line feed): the client, which did not ask for usage, gets `"usage":null`
    there as on a one-line chunk, its lines still apart."""
    head = b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],\n'
    split = head + b'data: "usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n'
    _, got, ev = env.call(agent_name, chat(stream=True), lambda req: chunked(CONTENT[:2] + [split, DONE]))
    assert got == b"".join(CONTENT[:2]) + head + b'data: "usage":null}\n\n' + DONE, f"client got: {got!r}"
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (11, 7, False), ev


def test_openrouter_s_usage_after_the_finishing_chunk_is_charged_exactly(env, agent_name):
    """OpenRouter sends its usage after the finishing chunk, on a chunk whose one choice has an
    empty delta and no finish reason. Every OpenRouter stream was charged an estimate (the output
    at the bytes or the cap: 3,697 µUSD for 2,097 in the probe)."""
    usage = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw-model",
             "choices": [{"index": 0, "delta": {}, "finish_reason": None}], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
    _, got, ev = env.call(agent_name, chat(stream=True, max_tokens=1000), lambda req: chunked([b": OPENROUTER PROCESSING\n\n", *CONTENT, sse(usage), DONE]))
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"], ev["outcome"]) == (11, 7, False, "complete"), ev
    # The client did not ask for usage: it gets the chunk with `"usage":null`.
    assert b'"usage":null' in got and b"prompt_tokens" not in got, got


def test_one_finished_choice_of_two_does_not_end_a_running_count(env, agent_name):
    """n=2 with usage on every chunk (vLLM's continuous usage stats): the first choice finishes,
    then the connection is reset while the second still generates. The running count was taken
    as final (30 µUSD, not estimated); it is a lower bound."""
    def chunk_of(index, finish, out):
        c = content_chunk("w" * 40, finish, usage={"prompt_tokens": 20, "completion_tokens": out, "total_tokens": 20 + out})
        c["choices"][0]["index"] = index
        return sse(c)
    events = [chunk_of(0, None, 1), chunk_of(1, None, 2), chunk_of(1, None, 3), chunk_of(0, "stop", 4)]
    _, got, ev = env.call(agent_name, chat(stream=True, n=2, stream_options={"include_usage": True}), lambda req: chunked(events, end=False) + ["rst"])
    assert (ev["estimated"], ev["outcome"], ev["input_tokens"]) == (True, "cut_with_running_usage", 20), ev
    assert ev["output_tokens"] >= len(got) > 4, ev


def test_half_an_emoji_in_the_text_does_not_hide_the_usage_beside_it(env, agent_name):
    """Gemini puts the usage on its last content chunk. Its text was a lone surrogate (half an
    emoji, escaped): the meter's JSON parse refused the chunk, so the usage went unread (charged
    881 µUSD for 25) and the usage the gateway asked for reached the client."""
    last = (b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":1,"model":"raw-model",'
            b'"choices":[{"index":0,"delta":{"content":"\\ud83d"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n')
    _, got, ev = env.call(agent_name, chat(stream=True), lambda req: chunked(CONTENT[:2] + [last, DONE]))
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (11, 7, False), ev
    assert got == b"".join(CONTENT[:2]) + last.replace(b'"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}', b'"usage":null') + DONE, got


def test_an_in_stream_error_reaches_the_client_and_a_stream_of_only_errors_is_released(env, agent_name):
    """An error event with `choices: []` and usage was removed as the usage chunk, so a failed
    request looked like an empty success; and a stream that reported only an error (vLLM, at
    status 200) was charged an estimate, where an error body is released."""
    error = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw-model", "choices": [],
             "error": {"code": 502, "message": "upstream model failed"}, "usage": {"prompt_tokens": 11, "completion_tokens": 0, "total_tokens": 11}}
    _, got, ev = env.call(agent_name + "-1", chat(stream=True), lambda req: chunked([sse(error), DONE]))
    assert b"upstream model failed" in got and b'"usage":null' in got, got
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (11, 0, False), ev

    only = b'data: {"error":{"object":"error","message":"CUDA out of memory","code":500}}\n\n'
    after, got, ev = env.call(agent_name + "-2", chat(stream=True), lambda req: chunked([only, DONE]))
    assert got == only + DONE
    assert (ev["outcome"], after["spent_micros"], after["reserved_micros"]) == ("upstream_error", 0, 0), ev


def test_an_error_labelled_as_a_stream_keeps_its_length(env, agent_name):
    """A 429 sent as text/event-stream with a Content-Length reached the client chunked."""
    body = b'{"error":{"message":"slow down","type":"rate_limit_error"}}'
    s = env.stack
    a = s.create_agent(agent_name, "10.00", 100000)
    env.up.scenarios[agent_name] = lambda req: [status_line(429, [("content-type", "text/event-stream"), ("content-length", str(len(body))), ("retry-after", "2"), ("connection", "close")]) + body]
    conn = http.client.HTTPConnection("127.0.0.1", s.ports["envoy"], timeout=30)
    try:
        conn.request("POST", CHAT, json.dumps(chat(stream=True)).encode(), {"authorization": f"Bearer {a['token']}", "content-type": "application/json", "x-scenario": agent_name})
        r = conn.getresponse()
        assert (r.status, r.getheader("content-length"), r.getheader("transfer-encoding"), r.getheader("retry-after")) == (429, str(len(body)), None, "2")
        assert r.read() == body
    finally:
        conn.close()
    after = s.wait_settled(agent_name)
    assert (after["spent_micros"], after["reserved_micros"]) == (0, 0)


def test_a_usage_without_an_output_count_is_an_estimate(env, agent_name):
    """A usage object naming the input but no output count (no completion, output or total
    tokens) was charged as exact at 0 output tokens, however long the answer."""
    body = json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 300}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 12}}).encode()
    _, got, ev = env.call(agent_name, chat(max_tokens=1000), lambda req: [response(200, body)])
    assert got == body
    assert (ev["input_tokens"], ev["estimated"], ev["outcome"]) == (12, True, "usage_without_output"), ev
    assert ev["output_tokens"] >= 300, ev
