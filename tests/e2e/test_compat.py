"""SDK compatibility: the official `openai` SDK (sync `OpenAI`, async `AsyncOpenAI`) and
`langchain-openai` see exactly the same results through the gateway as they do talking to the
provider directly, for every governed endpoint, streaming and not; and the ledger charges exactly
the cost of the usage the provider reported.

Each case runs the same call twice: through AEX with the agent's token, and straight at the mock
provider with the provider key (and the *upstream* model name where the gateway maps it). The
client-visible results (parsed SDK objects, dumped to JSON) must be equal once per-call values
are normalised: mock ids carrying the mock's request counter (`chatcmpl-mock-7`, `call_mock_7`,
...), `created`/`created_at` timestamps, and LangChain's client-side run ids.

Charging: after `wait_settled`, the spend delta equals the cost computed from the usage the SDK
returned. For streams whose client did not ask for usage (so the SDK has none), the cost comes from
the `request.settled` audit event's tokens, which must equal the usage the provider reports for the
very request the gateway forwarded (the same request with `include_usage`, fetched directly).
"""

from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest
from langchain_openai import ChatOpenAI

HELLO = [{"role": "user", "content": "Hello from the compatibility suite"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
RESP_TOOL = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}

# µUSD per 1M tokens (= USD per 1M tokens × 10^6): input, output, cached input. From the harness.
PRICES = {
    "test-model": (1_000_000, 2_000_000, None),
    "test-mini": (150_000, 600_000, 75_000),
    "test-embed": (20_000, 0, None),
}
UPSTREAM = {"test-model": "test-model", "test-mini": "mock/mini-2024", "test-embed": "test-embed"}


def cost(model: str, inp: int, out: int, cached: int = 0) -> int:
    """Exact cost in µUSD, rounded up to the micro-dollar once per request (money.rs)."""
    pin, pout, pcached = PRICES[model]
    cached = min(cached, inp)
    n = (inp - cached) * pin + cached * (pcached if pcached is not None else pin) + out * pout
    return -(-n // 1_000_000)


_NORM = [
    (re.compile(r"\b(chatcmpl|cmpl)-mock-\d+"), r"\1-mock-N"),
    (re.compile(r"\b(resp|msg|fc|call|req)_mock_\d+"), r"\1_mock_N"),
    (re.compile(r'"(created|created_at)": \d+(\.\d+)?'), r'"\1": 0'),
    (re.compile(r"lc_run--[0-9a-f-]+"), "lc_run--ID"),
]


def norm(obj) -> str:
    """A client-visible result as canonical JSON with per-call values normalised."""
    if isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    s = json.dumps(obj, sort_keys=True)
    for rx, rep in _NORM:
        s = rx.sub(rep, s)
    return s


# ------------------------------------------------------------------------------------ fixtures


class Ctx:
    def __init__(self, stack, name: str):
        self.stack = stack
        self.name = name
        # A big budget so the output cap is never clamped (a clamp is a documented edit).
        self.agent = stack.create_agent(name, "100.00", 100000)
        self.token = self.agent["token"]
        self.gw = stack.client(self.token)
        self.dr = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.mock_port}/v1", api_key=stack.provider_key, max_retries=0, timeout=30)
        self.spent = 0

    def direct_base(self) -> str:
        return f"http://127.0.0.1:{self.stack.mock_port}/v1"

    def charged(self) -> int:
        """Spend since the previous call, once every reservation is settled."""
        a = self.stack.wait_settled(self.name)
        delta, self.spent = a["spent_micros"] - self.spent, a["spent_micros"]
        return delta

    def settled(self) -> dict:
        return self.stack.audit(self.agent["id"], "request.settled")[-1]["payload"]

    def allowed(self) -> dict:
        return self.stack.audit(self.agent["id"], "request.allowed")[-1]["payload"]

    def close(self):
        self.gw.close()
        self.dr.close()


@pytest.fixture
def ctx(stack, agent_name):
    c = Ctx(stack, agent_name)
    yield c
    c.close()


def assert_exact_charge(ctx: Ctx, model: str, inp: int, out: int, cached: int = 0):
    delta = ctx.charged()
    ev = ctx.settled()
    assert ev["estimated"] is False and ev["released"] is False, ev
    assert (ev["input_tokens"], ev["output_tokens"], ev["cached_input_tokens"]) == (inp, out, cached), ev
    assert delta == ev["charge_micros"] == cost(model, inp, out, cached), (delta, ev)
    assert delta > 0


def chat_usage_of(ctx: Ctx, model: str, **kw):
    """Usage the provider reports for the request the gateway forwards for a stream whose client
    did not ask for usage: the same request with include_usage, sent directly."""
    chunks = list(ctx.dr.chat.completions.create(model=UPSTREAM[model], stream=True, stream_options={"include_usage": True}, **kw))
    u = [c.usage for c in chunks if c.usage]
    assert len(u) == 1
    return u[0]


# ------------------------------------------------------------------------- chat/completions


@pytest.mark.parametrize("model", ["test-model", "test-mini"])
def test_chat_non_streaming(ctx, model):
    kw = dict(messages=HELLO, temperature=0.3, max_tokens=50)
    g = ctx.gw.chat.completions.create(model=model, **kw)
    d = ctx.dr.chat.completions.create(model=UPSTREAM[model], **kw)
    assert norm(g) == norm(d)
    assert g.choices[0].message.content.startswith("word1 word2")
    assert_exact_charge(ctx, model, g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.prompt_tokens_details.cached_tokens)


@pytest.mark.parametrize("model", ["test-model", "test-mini"])
def test_chat_streaming_without_client_usage(ctx, model):
    kw = dict(messages=HELLO, max_completion_tokens=200)
    g = list(ctx.gw.chat.completions.create(model=model, stream=True, **kw))
    d = list(ctx.dr.chat.completions.create(model=UPSTREAM[model], stream=True, **kw))
    assert norm(g) == norm(d)
    assert len(g) == len(d) == 14 and all(c.usage is None for c in g)
    assert "".join(c.choices[0].delta.content or "" for c in g) == " ".join(f"word{i}" for i in range(1, 13))
    # No usage in the client's hands: the audit event carries what the provider reported for the
    # forwarded request (with include_usage), which must be what the provider says directly.
    delta = ctx.charged()
    ev = ctx.settled()
    u = chat_usage_of(ctx, model, **kw)
    assert (ev["input_tokens"], ev["output_tokens"]) == (u.prompt_tokens, u.completion_tokens), ev
    assert ev["estimated"] is False
    assert delta == ev["charge_micros"] == cost(model, u.prompt_tokens, u.completion_tokens)


def test_chat_streaming_with_client_usage(ctx):
    kw = dict(messages=HELLO, stream_options={"include_usage": True})
    g = list(ctx.gw.chat.completions.create(model="test-model", stream=True, **kw))
    d = list(ctx.dr.chat.completions.create(model="test-model", stream=True, **kw))
    assert norm(g) == norm(d)
    usage = [c.usage for c in g if c.usage]
    assert len(usage) == 1 and g[-1].choices == []
    assert_exact_charge(ctx, "test-model", usage[0].prompt_tokens, usage[0].completion_tokens)


def test_chat_with_tools_non_streaming_and_streaming(ctx):
    kw = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[TOOL], tool_choice="auto")
    g = ctx.gw.chat.completions.create(model="test-model", **kw)
    d = ctx.dr.chat.completions.create(model="test-model", **kw)
    assert norm(g) == norm(d)
    call = g.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments, g.choices[0].finish_reason) == ("get_weather", "{}", "tool_calls")
    assert_exact_charge(ctx, "test-model", g.usage.prompt_tokens, g.usage.completion_tokens)

    gs = list(ctx.gw.chat.completions.create(model="test-model", stream=True, stream_options={"include_usage": True}, **kw))
    ds = list(ctx.dr.chat.completions.create(model="test-model", stream=True, stream_options={"include_usage": True}, **kw))
    assert norm(gs) == norm(ds)
    assert gs[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
    u = gs[-1].usage
    assert_exact_charge(ctx, "test-model", u.prompt_tokens, u.completion_tokens)

    # A tool result round trip: the assistant's tool call and the tool's answer go back in.
    follow = kw["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    g2 = ctx.gw.chat.completions.create(model="test-model", messages=follow, tools=[TOOL], tool_choice="none")
    d2 = ctx.dr.chat.completions.create(model="test-model", messages=follow, tools=[TOOL], tool_choice="none")
    assert norm(g2) == norm(d2) and g2.choices[0].message.content
    assert_exact_charge(ctx, "test-model", g2.usage.prompt_tokens, g2.usage.completion_tokens)


def test_chat_groq_style_usage_in_x_groq(ctx):
    """Groq reports stream usage in `x_groq.usage` of the final chunk; the SDK keeps the unknown
    field, and the gateway meters it."""
    hdr = {"x-mock-groq": "1"}
    g = list(ctx.gw.chat.completions.create(model="test-model", stream=True, messages=HELLO, extra_headers=hdr))
    d = list(ctx.dr.chat.completions.create(model="test-model", stream=True, messages=HELLO, extra_headers=hdr))
    assert norm(g) == norm(d)
    xg = g[-1].model_extra["x_groq"]
    assert re.fullmatch(r"req_mock_\d+", xg["id"])
    u = xg["usage"]
    assert u["completion_tokens"] == 12
    assert_exact_charge(ctx, "test-model", u["prompt_tokens"], u["completion_tokens"])


def test_no_usage_reported_is_charged_as_a_flagged_estimate(ctx):
    """A provider that reports no usage: the client sees what the provider sent, and the charge is
    a conservative estimate, flagged `estimated`, never below the true cost."""
    hdr = {"x-mock-no-usage": "1"}
    true = ctx.dr.chat.completions.create(model="test-model", messages=HELLO).usage
    for stream in (True, False):
        if stream:
            g = list(ctx.gw.chat.completions.create(model="test-model", stream=True, messages=HELLO, extra_headers=hdr))
            d = list(ctx.dr.chat.completions.create(model="test-model", stream=True, messages=HELLO, extra_headers=hdr))
        else:
            g = ctx.gw.chat.completions.create(model="test-model", messages=HELLO, extra_headers=hdr)
            d = ctx.dr.chat.completions.create(model="test-model", messages=HELLO, extra_headers=hdr)
            assert g.usage is None
        assert norm(g) == norm(d)
        delta = ctx.charged()
        ev = ctx.settled()
        assert ev["estimated"] is True and ev["outcome"] == "no_usage_reported", ev
        assert ev["input_tokens"] == ctx.allowed()["input_token_bound"]
        assert delta == ev["charge_micros"] == cost("test-model", ev["input_tokens"], ev["output_tokens"])
        assert delta >= cost("test-model", true.prompt_tokens, true.completion_tokens)


def test_async_client_chat_responses_embeddings(ctx):
    direct_base = ctx.direct_base()

    async def run(base: str, key: str, model_of):
        async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=30) as c:
            plain = await c.chat.completions.create(model=model_of("test-mini"), messages=HELLO)
            stream = [x async for x in await c.chat.completions.create(model=model_of("test-model"), stream=True, messages=HELLO)]
            ustream = [x async for x in await c.chat.completions.create(
                model=model_of("test-model"), stream=True, messages=HELLO, stream_options={"include_usage": True})]
            resp = await c.responses.create(model=model_of("test-model"), input="async hello")
            rstream = [x async for x in await c.responses.create(model=model_of("test-model"), input="async hello", stream=True)]
            emb = await c.embeddings.create(model=model_of("test-embed"), input=["a", "bb"])
            legacy = await c.completions.create(model=model_of("test-mini"), prompt="async legacy", max_tokens=3)
            return plain, stream, ustream, resp, rstream, emb, legacy

    g = asyncio.run(run(ctx.stack.base_url, ctx.token, lambda m: m))
    d = asyncio.run(run(direct_base, ctx.stack.provider_key, lambda m: UPSTREAM[m]))
    for gi, di in zip(g, d):
        assert norm(gi) == norm(di)
    plain, stream, ustream, resp, rstream, emb, legacy = g
    hidden = chat_usage_of(ctx, "test-model", messages=HELLO)  # the stream without client usage
    want = (
        cost("test-mini", plain.usage.prompt_tokens, plain.usage.completion_tokens)
        + cost("test-model", hidden.prompt_tokens, hidden.completion_tokens)
        + cost("test-model", ustream[-1].usage.prompt_tokens, ustream[-1].usage.completion_tokens)
        + cost("test-model", resp.usage.input_tokens, resp.usage.output_tokens)
        + cost("test-model", rstream[-1].response.usage.input_tokens, rstream[-1].response.usage.output_tokens)
        + cost("test-embed", emb.usage.prompt_tokens, 0)
        + cost("test-mini", legacy.usage.prompt_tokens, legacy.usage.completion_tokens)
    )
    assert ctx.charged() == want
    evs = ctx.stack.audit(ctx.agent["id"], "request.settled")
    assert len(evs) == 7 and not any(e["payload"]["estimated"] for e in evs)


# ------------------------------------------------------------------------ legacy completions


def test_legacy_completions(ctx):
    kw = dict(prompt=["first prompt", "second"], max_tokens=7, n=2)
    g = ctx.gw.completions.create(model="test-model", **kw)
    d = ctx.dr.completions.create(model="test-model", **kw)
    assert norm(g) == norm(d)
    assert len(g.choices) == 4 and g.choices[0].finish_reason == "length"
    assert_exact_charge(ctx, "test-model", g.usage.prompt_tokens, g.usage.completion_tokens)

    gs = list(ctx.gw.completions.create(model="test-model", prompt="stream me", stream=True))
    ds = list(ctx.dr.completions.create(model="test-model", prompt="stream me", stream=True))
    assert norm(gs) == norm(ds)
    assert all(c.usage is None for c in gs), "the injected usage chunk is hidden"
    delta = ctx.charged()
    ev = ctx.settled()
    up = [c for c in ctx.dr.completions.create(model="test-model", prompt="stream me", stream=True, stream_options={"include_usage": True}) if c.usage]
    assert len(up) == 1
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (up[0].usage.prompt_tokens, up[0].usage.completion_tokens, False)
    assert delta == cost("test-model", ev["input_tokens"], ev["output_tokens"])

    gu = list(ctx.gw.completions.create(model="test-mini", prompt="stream me", stream=True, stream_options={"include_usage": True}))
    du = list(ctx.dr.completions.create(model="mock/mini-2024", prompt="stream me", stream=True, stream_options={"include_usage": True}))
    assert norm(gu) == norm(du)
    assert_exact_charge(ctx, "test-mini", gu[-1].usage.prompt_tokens, gu[-1].usage.completion_tokens)


# -------------------------------------------------------------------------------- embeddings


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic: explicit base64 keeps strings in a float-typed field
def test_embeddings_default_base64_and_float(ctx):
    # The SDK asks for base64 by default and decodes it to floats.
    g = ctx.gw.embeddings.create(model="test-embed", input=["alpha", "beta gamma"])
    d = ctx.dr.embeddings.create(model="test-embed", input=["alpha", "beta gamma"])
    assert json.loads(ctx.stack.mock_requests()[-2]["body"])["encoding_format"] == "base64"
    assert norm(g) == norm(d)
    assert len(g.data) == 2 and len(g.data[0].embedding) == 8 and isinstance(g.data[0].embedding[0], float)
    assert_exact_charge(ctx, "test-embed", g.usage.prompt_tokens, 0)

    gf = ctx.gw.embeddings.create(model="test-embed", input="alpha", encoding_format="float")
    df = ctx.dr.embeddings.create(model="test-embed", input="alpha", encoding_format="float")
    assert norm(gf) == norm(df)
    # The same vector whichever encoding carried it (to f32 precision).
    assert gf.data[0].embedding == pytest.approx(g.data[0].embedding, abs=1e-6)
    assert_exact_charge(ctx, "test-embed", gf.usage.prompt_tokens, 0)

    gd = ctx.gw.embeddings.create(model="test-embed", input="alpha", dimensions=32)
    dd = ctx.dr.embeddings.create(model="test-embed", input="alpha", dimensions=32)
    assert norm(gd) == norm(dd)
    assert len(gd.data[0].embedding) == 32
    assert_exact_charge(ctx, "test-embed", gd.usage.prompt_tokens, 0)

    gb = ctx.gw.embeddings.create(model="test-embed", input=[[1, 2, 3], [4, 5]], encoding_format="base64")
    db = ctx.dr.embeddings.create(model="test-embed", input=[[1, 2, 3], [4, 5]], encoding_format="base64")
    assert norm(gb) == norm(db)
    assert_exact_charge(ctx, "test-embed", gb.usage.prompt_tokens, 0)


# --------------------------------------------------------------------------------- responses


def test_responses_non_streaming_and_streaming(ctx):
    kw = dict(input="Hello responses", instructions="Be brief", metadata={"case": "compat"})
    g = ctx.gw.responses.create(model="test-model", **kw)
    d = ctx.dr.responses.create(model="test-model", **kw)
    assert norm(g) == norm(d)
    assert g.output_text.startswith("word1 word2") and g.status == "completed"
    assert_exact_charge(ctx, "test-model", g.usage.input_tokens, g.usage.output_tokens)

    gs = list(ctx.gw.responses.create(model="test-mini", stream=True, **kw))
    ds = list(ctx.dr.responses.create(model="mock/mini-2024", stream=True, **kw))
    assert norm(gs) == norm(ds)
    assert gs[-1].type == "response.completed"
    u = gs[-1].response.usage
    assert_exact_charge(ctx, "test-mini", u.input_tokens, u.output_tokens, u.input_tokens_details.cached_tokens)

    # Truncated by max_output_tokens: status incomplete, response.incomplete terminal event.
    gt = list(ctx.gw.responses.create(model="test-model", input="cut me", max_output_tokens=5, stream=True))
    dt = list(ctx.dr.responses.create(model="test-model", input="cut me", max_output_tokens=5, stream=True))
    assert norm(gt) == norm(dt)
    assert gt[-1].type == "response.incomplete" and gt[-1].response.incomplete_details.reason == "max_output_tokens"
    u = gt[-1].response.usage
    assert u.output_tokens == 5
    assert_exact_charge(ctx, "test-model", u.input_tokens, u.output_tokens)

    # With the stream helper the SDK assembles the final response the same way.
    with ctx.gw.responses.stream(model="test-model", input="helper") as s:
        gf = s.get_final_response()
    with ctx.dr.responses.stream(model="test-model", input="helper") as s:
        df = s.get_final_response()
    assert norm(gf) == norm(df)
    assert_exact_charge(ctx, "test-model", gf.usage.input_tokens, gf.usage.output_tokens)


def test_responses_with_function_tool(ctx):
    kw = dict(input=[{"role": "user", "content": "weather?"}], tools=[RESP_TOOL])
    g = ctx.gw.responses.create(model="test-model", **kw)
    d = ctx.dr.responses.create(model="test-model", **kw)
    assert norm(g) == norm(d)
    item = g.output[0]
    assert (item.type, item.name, item.arguments) == ("function_call", "get_weather", "{}")
    assert_exact_charge(ctx, "test-model", g.usage.input_tokens, g.usage.output_tokens)

    follow = kw["input"] + [
        {"type": "function_call", "call_id": item.call_id, "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"},
    ]
    gs = list(ctx.gw.responses.create(model="test-model", input=follow, tools=[RESP_TOOL], tool_choice="none", stream=True))
    ds = list(ctx.dr.responses.create(model="test-model", input=follow, tools=[RESP_TOOL], tool_choice="none", stream=True))
    assert norm(gs) == norm(ds)
    u = gs[-1].response.usage
    assert_exact_charge(ctx, "test-model", u.input_tokens, u.output_tokens)


# ------------------------------------------------------------------------------------ models


def test_models_list_is_answered_by_the_gateway_in_the_providers_shape(ctx):
    """`GET /v1/models` is documented (SPEC §7) as answered by AEX, filtered to the agent's
    models, so its content differs from the provider's by design; the shape must be identical so
    SDKs parse it the same, and the provider is not asked."""
    before = len(ctx.stack.mock_requests())
    g = ctx.gw.models.list()
    assert len(ctx.stack.mock_requests()) == before, "models.list must not reach the provider"
    d = ctx.dr.models.list()
    assert sorted(m.id for m in g) == ["test-embed", "test-mini", "test-model"], "priced models only"
    assert g.object == d.object == "list"

    def shape(m):
        return json.dumps({k: type(v).__name__ for k, v in m.model_dump().items()}, sort_keys=True)

    assert {shape(m) for m in g.data} == {shape(m) for m in d.data}, "same fields and types as the provider's entries"
    assert all(m.object == "model" and m.owned_by == "mock" for m in g.data)
    one = ctx.gw.models.retrieve("test-mini")
    assert (one.id, one.object) == ("test-mini", "model")
    with pytest.raises(openai.PermissionDeniedError):
        ctx.gw.models.retrieve("unpriced-model")
    assert len(ctx.stack.mock_requests()) == before + 1  # only the direct list above


# --------------------------------------------------------------------------------- langchain


def lc_pair(ctx: Ctx, **kw):
    g = ChatOpenAI(base_url=ctx.stack.base_url, api_key=ctx.token, model="test-model", max_retries=0, timeout=30, **kw)
    d = ChatOpenAI(base_url=ctx.direct_base(), api_key=ctx.stack.provider_key, model="test-model", max_retries=0, timeout=30, **kw)
    return g, d


def test_langchain_invoke_stream_and_tools(ctx):
    g, d = lc_pair(ctx)
    gm, dm = g.invoke("Hello LangChain"), d.invoke("Hello LangChain")
    assert norm(gm) == norm(dm)
    assert gm.content.startswith("word1") and gm.response_metadata["model_name"] == "test-model"
    u = gm.usage_metadata
    assert_exact_charge(ctx, "test-model", u["input_tokens"], u["output_tokens"])

    gs, ds = list(g.stream("Stream LangChain")), list(d.stream("Stream LangChain"))
    assert norm(gs) == norm(ds)
    assert "".join(c.content for c in gs) == " ".join(f"word{i}" for i in range(1, 13))
    assert all(c.usage_metadata is None for c in gs), "LangChain did not ask for usage; none is shown"
    delta = ctx.charged()
    ev = ctx.settled()
    up = chat_usage_of(ctx, "test-model", messages=[{"role": "user", "content": "Stream LangChain"}])
    assert (ev["input_tokens"], ev["output_tokens"], ev["estimated"]) == (up.prompt_tokens, up.completion_tokens, False)
    assert delta == cost("test-model", up.prompt_tokens, up.completion_tokens)

    gu, du = lc_pair(ctx, stream_usage=True)
    gs, ds = list(gu.stream("Stream with usage")), list(du.stream("Stream with usage"))
    assert norm(gs) == norm(ds)
    total = [c.usage_metadata for c in gs if c.usage_metadata]
    assert len(total) == 1
    assert_exact_charge(ctx, "test-model", total[0]["input_tokens"], total[0]["output_tokens"])

    gt, dt = g.bind_tools([TOOL]), d.bind_tools([TOOL])
    gm, dm = gt.invoke("What is the weather in Paris?"), dt.invoke("What is the weather in Paris?")
    assert norm(gm) == norm(dm)
    assert [(c["name"], c["args"]) for c in gm.tool_calls] == [("get_weather", {})]
    assert re.fullmatch(r"call_mock_\d+", gm.tool_calls[0]["id"])
    u = gm.usage_metadata
    assert_exact_charge(ctx, "test-model", u["input_tokens"], u["output_tokens"])

    gs = list(gt.stream("Weather, streamed?"))
    ds = list(dt.stream("Weather, streamed?"))
    assert norm(gs) == norm(ds)
    merged = gs[0]
    for c in gs[1:]:
        merged = merged + c
    assert [tc["name"] for tc in merged.tool_calls] == ["get_weather"]
    ctx.charged()
    assert ctx.settled()["estimated"] is False


def run_tool_loop(client, model: str, messages: list, stream: bool, turns: int = 4):
    """An agent's loop as frameworks run it: call the model with tools (the model chooses),
    run each tool it asks for, send the results back, until it answers in text. Returns every
    turn's client-visible result and usage (prompt, completion)."""
    seen, usages = [], []
    for _ in range(turns):
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=messages, tools=[TOOL], stream=True, stream_options={"include_usage": True}))
            seen.append(chunks)
            usages.append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.id]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [{"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": "{}"}} for tc in calls]
        else:
            r = client.chat.completions.create(model=model, messages=messages, tools=[TOOL])
            seen.append(r)
            usages.append((r.usage.prompt_tokens, r.usage.completion_tokens))
            msg = r.choices[0].message
            text = msg.content or ""
            calls = [tc.model_dump(mode="json") for tc in (msg.tool_calls or [])]
        if not calls:
            return seen, usages, text
        messages = messages + [{"role": "assistant", "content": None, "tool_calls": calls}] + [
            {"role": "tool", "tool_call_id": c["id"], "content": "sunny, 21 C"} for c in calls
        ]
    raise AssertionError(f"no final answer in {turns} turns")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_tool_using_agent_loop_runs_to_its_answer_and_every_turn_is_charged(ctx, stream):
    start = [{"role": "user", "content": "What should I wear in Paris today?"}]
    g, gu, gtext = run_tool_loop(ctx.gw, "test-model", start, stream)
    d, du, dtext = run_tool_loop(ctx.dr, "test-model", start, stream)
    for turn_g, turn_d in zip(g, d):
        assert norm(turn_g) == norm(turn_d)
    assert len(g) == 2 and gtext.startswith("word1") and gtext == dtext, (len(g), gtext)
    # Both turns charged, each exactly its usage; the second carries the whole conversation.
    assert gu == du and gu[1][0] > gu[0][0]
    delta = ctx.charged()
    charges = [e["payload"]["charge_micros"] for e in ctx.stack.audit(ctx.agent["id"], "request.settled")][-2:]
    assert charges == [cost("test-model", i, o) for i, o in gu] and delta == sum(charges), (charges, gu, delta)
