"""Requests whose cost or content hid from the classifier, through the real stack: completions
batches (n choices per prompt), images and files inside Responses tool outputs, background
responses, built-in tools and priced service tiers for strict agents, and embeddings under an
output-token limit. A refusal must not reach the provider; an admitted request must be bounded.
"""

from __future__ import annotations

import json
import threading
import time

from harness import error_code

HELLO = [{"role": "user", "content": "hello"}]
IMG = {"type": "input_image", "image_url": "https://example.com/cat.png"}


def refused(stack, token, path, body):
    """Sends `body`; asserts the provider saw nothing. Returns (status, (type, code))."""
    before = stack.mock_requests()
    status, _, raw = stack.post(path, body, token=token)
    time.sleep(0.05)
    assert stack.mock_requests() == before, f"{path} reached the provider: {body}"
    return status, error_code(raw)


def allowed(stack, token, path, body, headers=None):
    """Sends `body`; asserts it was answered 200. Returns the body the provider received."""
    stack.clear_mock()
    status, _, raw = stack.post(path, body, token=token, headers=headers)
    assert status == 200, raw[:300]
    got = stack.mock_requests()
    assert got, "nothing reached the provider"
    b = got[-1]["body"]
    return json.loads(b) if isinstance(b, str) else b


def test_completions_batch_reserves_every_prompts_choices(stack, agent_name):
    # 5000 µUSD. 20 prompts, no max_tokens: each prompt gets its own choice, so the clamp must
    # fit 20 choices (2 µUSD per output token), not one.
    a = stack.create_agent(agent_name, "0.005000", 100)
    body = {"model": "test-model", "prompt": [f"p{i}" for i in range(20)]}
    sent = allowed(stack, a["token"], "/v1/completions", body, {"x-mock-output-tokens": "2000"})
    clamp = sent["max_tokens"]
    assert 0 < clamp * 20 * 2 <= 5000, clamp
    after = stack.wait_settled(agent_name)
    assert after["spent_micros"] <= after["budget_micros"], after
    ev = [e["payload"] for e in stack.audit(a["id"], "request.allowed")][-1]
    assert ev["clamp_output_tokens"] == clamp
    assert ev["reserved_micros"] >= clamp * 20 * 2
    # Token-id arrays: [[...],[...]] is two prompts.
    a2 = stack.create_agent(agent_name + "-ids", "0.005000", 100)
    sent = allowed(stack, a2["token"], "/v1/completions", {"model": "test-model", "prompt": [[1, 2], [3, 4]], "n": 3})
    assert sent["max_tokens"] * 2 * 3 * 2 <= 5000, sent["max_tokens"]


def test_one_token_id_prompt_is_one_message(stack, agent_name):
    # 20,000 token ids, one prompt (~60 KB): the template overhead is per prompt, not per id.
    a = stack.create_agent(agent_name, "0.100000", 100)
    sent = allowed(stack, a["token"], "/v1/completions", {"model": "test-model", "prompt": [1] * 20000, "max_tokens": 10})
    assert len(sent["prompt"]) == 20000
    stack.wait_settled(agent_name)


def test_images_and_files_in_responses_tool_outputs(stack, agent_name):
    nv = stack.create_agent(agent_name, "1.00", 1000, "--no-vision")
    sv = stack.create_agent(agent_name + "-strict", "1.00", 1000, "--strict")
    call = {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"}
    image = {"model": "test-model", "max_output_tokens": 50, "input": [
        {"role": "user", "content": "what is in the picture the tool returned?"}, call,
        {"type": "function_call_output", "call_id": "c1", "output": [IMG]}]}
    assert refused(stack, nv["token"], "/v1/responses", image) == (403, ("permission_error", "vision_not_allowed"))
    screenshot = {"model": "test-model", "max_output_tokens": 50, "input": [
        {"type": "computer_call_output", "call_id": "c1",
         "output": {"type": "computer_screenshot", "image_url": "https://example.com/s.png"}}]}
    assert refused(stack, nv["token"], "/v1/responses", screenshot) == (403, ("permission_error", "vision_not_allowed"))
    file = {"model": "test-model", "max_output_tokens": 20, "input": [
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "file-abc"}]}]}
    assert refused(stack, sv["token"], "/v1/responses", file) == (403, ("permission_error", "strict_violation"))
    # A string output is text: fine for both.
    text = {"model": "test-model", "max_output_tokens": 20, "input": [
        call, {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}
    allowed(stack, nv["token"], "/v1/responses", text)
    allowed(stack, sv["token"], "/v1/responses", text)
    # A generated image handed back as input is an image the model sees.
    generated = {"model": "test-model", "max_output_tokens": 20, "input": [
        {"role": "user", "content": "make it bluer"},
        {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "iVBORw0KGgoAAAANSUhEUg=="}]}
    assert refused(stack, nv["token"], "/v1/responses", generated) == (403, ("permission_error", "vision_not_allowed"))
    allowed(stack, sv["token"], "/v1/responses", generated)


def test_background_responses_are_refused(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 1000)
    status, (etype, code) = refused(stack, a["token"], "/v1/responses",
                                    {"model": "test-model", "input": "hi", "max_output_tokens": 20, "background": True})
    assert (status, etype, code) == (400, "invalid_request_error", "invalid_request")
    allowed(stack, a["token"], "/v1/responses", {"model": "test-model", "input": "hi", "max_output_tokens": 20, "background": False})


def test_strict_refuses_built_in_tools_and_priced_tiers(stack, agent_name):
    s = stack.create_agent(agent_name, "1.00", 1000, "--strict")
    strict_violation = (403, ("permission_error", "strict_violation"))
    resp = {"model": "test-model", "input": "hi", "max_output_tokens": 20}
    chat = {"model": "test-model", "messages": HELLO, "max_tokens": 20}
    for tool in ({"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
                 {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "mcp", "server_label": "x"}):
        assert refused(stack, s["token"], "/v1/responses", {**resp, "tools": [tool]}) == strict_violation, tool
    assert refused(stack, s["token"], "/v1/chat/completions", {**chat, "web_search_options": {}}) == strict_violation
    assert refused(stack, s["token"], "/v1/chat/completions", {**chat, "service_tier": "priority"}) == strict_violation
    assert refused(stack, s["token"], "/v1/responses", {**resp, "service_tier": "flex"}) == strict_violation
    allowed(stack, s["token"], "/v1/chat/completions", {**chat, "service_tier": "auto"})
    allowed(stack, s["token"], "/v1/responses", {**resp, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]})

    no_tools = stack.create_agent(agent_name + "-nt", "1.00", 1000, "--no-tools")
    assert refused(stack, no_tools["token"], "/v1/chat/completions", {**chat, "web_search_options": {}}) == (
        403, ("permission_error", "tools_not_allowed"))
    # A built-in tool has no name: an allow-list (even one spelling its type) does not admit it.
    listed = stack.create_agent(agent_name + "-al", "1.00", 1000, "--allowed-tools", "get_weather,web_search")
    assert refused(stack, listed["token"], "/v1/responses", {**resp, "tools": [{"type": "web_search"}]}) == (
        403, ("permission_error", "tool_not_allowed"))


def test_what_the_token_prices_cannot_charge_is_refused_to_every_agent(stack, agent_name):
    # SPEC §3-§4: never charged below what the provider bills. Per-call built-in tools, premium
    # service tiers and audio are billed above the models.toml token prices: an agent with every
    # permission is refused them, and the provider never sees the request.
    a = stack.create_agent(agent_name, "1.00", 1000)
    not_priced = (403, ("permission_error", "model_not_priced"))
    resp = {"model": "test-model", "input": "hi", "max_output_tokens": 20}
    chat = {"model": "test-model", "messages": HELLO, "max_tokens": 20}
    for tool in ({"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
                 {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "image_generation"}):
        assert refused(stack, a["token"], "/v1/responses", {**resp, "tools": [tool]}) == not_priced, tool
        assert refused(stack, a["token"], "/v1/responses", {**resp, "tools": [tool], "stream": True}) == not_priced, tool
    assert refused(stack, a["token"], "/v1/chat/completions", {**chat, "web_search_options": {}}) == not_priced
    for tier in ("priority", "scale"):
        assert refused(stack, a["token"], "/v1/chat/completions", {**chat, "service_tier": tier}) == not_priced, tier
        assert refused(stack, a["token"], "/v1/responses", {**resp, "service_tier": tier}) == not_priced, tier
    audio_in = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    assert refused(stack, a["token"], "/v1/chat/completions", {**chat, "messages": audio_in}) == not_priced
    assert refused(stack, a["token"], "/v1/chat/completions",
                   {**chat, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}) == not_priced
    # The message says what and why.
    _, _, raw = stack.post("/v1/responses", {**resp, "tools": [{"type": "web_search"}]}, token=a["token"])
    assert "'web_search'" in json.loads(raw)["error"]["message"]
    # Billed by tokens alone, or cheaper than the standard tier: forwarded unchanged.
    sent = allowed(stack, a["token"], "/v1/responses", {**resp, "tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]})
    assert sent["tools"] == [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]
    assert allowed(stack, a["token"], "/v1/chat/completions", {**chat, "service_tier": "flex"})["service_tier"] == "flex"


def test_embeddings_get_no_output_cap(stack, agent_name):
    # test-model's output limit (4096) exceeds the agents' (256): chat would be clamped (or, for
    # the strict agent, refused); embeddings produce no output and are neither.
    for suffix, flags in (("", ()), ("-strict", ("--strict",))):
        a = stack.create_agent(agent_name + suffix, "1.00", 1000, "--max-output-tokens", "256", *flags)
        sent = allowed(stack, a["token"], "/v1/embeddings", {"model": "test-model", "input": "hello"})
        assert "max_tokens" not in sent, sent
        stack.wait_settled(agent_name + suffix)
        ev = [e["payload"] for e in stack.audit(a["id"], "request.allowed")][-1]
        assert ev["clamp_output_tokens"] == 0, ev


def test_input_the_body_only_refers_to_is_reserved_at_the_context_window(fresh_stack, agent_name):
    """A `previous_response_id` or a stored file is a few bytes here and any number of tokens at
    the provider: reserved at the model's context window, never by its bytes."""
    s = fresh_stack
    models = (s.home / "models.toml").read_text()
    models = models.replace('[models."test-model"]\n', '[models."test-model"]\ncontext_window = 50000\n', 1)
    (s.home / "models.toml").write_text(models)
    s.aex("models", "reload")
    # 60,000 µUSD: one window (50,000 input tokens at 1 µUSD) and a small answer fit, two do not.
    a = s.create_agent(agent_name, "0.060000", 100)
    follow_up = {"model": "test-model", "previous_response_id": "resp_abc", "input": "and then?", "max_output_tokens": 20}
    deadline = time.time() + 5
    while True:
        sent = allowed(s, a["token"], "/v1/responses", follow_up)
        s.wait_settled(agent_name)
        ev = [e["payload"] for e in s.audit(a["id"], "request.allowed")][-1]
        if ev["input_token_bound"] == 50000 or time.time() > deadline:  # the reload reached this worker
            break
    assert ev["input_token_bound"] == 50000, ev
    assert ev["reserved_micros"] == 50000 + 2 * 20, ev
    assert sent["previous_response_id"] == "resp_abc"
    # A plain request is still bounded by its bytes.
    allowed(s, a["token"], "/v1/responses", {"model": "test-model", "input": "hi", "max_output_tokens": 20})
    s.wait_settled(agent_name)
    ev = [e["payload"] for e in s.audit(a["id"], "request.allowed")][-1]
    assert ev["input_token_bound"] < 200, ev
    # Held in flight, two windows do not fit the budget: the second is refused, not overrun.
    slow = {"x-mock-latency-ms": "1500"}
    held = []
    t = threading.Thread(target=lambda: held.append(s.post("/v1/responses", follow_up, token=a["token"], headers=slow)))
    t.start()
    time.sleep(0.5)
    status, _, raw = s.post("/v1/responses", follow_up, token=a["token"])
    t.join()
    assert held[0][0] == 200
    assert (status, error_code(raw)[1]) == (402, "budget_exceeded"), raw[:300]
    after = s.wait_settled(agent_name)
    assert after["spent_micros"] + after["reserved_micros"] <= after["budget_micros"], after
