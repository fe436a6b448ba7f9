"""Client-supplied text — request paths, model names, the denial messages that quote them —
reaches the append-only audit log bounded, without query strings and with anything token-like
redacted: a token or a megabyte stored there could never be taken back, and `aex audit` would
fail for good."""

import hashlib
import json
import secrets
import time

import pytest

from harness import error_code, http

MAX_NAME = 256
MAX_MESSAGE = 1024


def raw_token() -> str:
    """Shaped like a real one: `aex_` + 43 base64url characters."""
    return "aex_" + secrets.token_urlsafe(32)


def redacted(token: str) -> str:
    return f"aex_[redacted:sha256:{hashlib.sha256(token.encode()).hexdigest()[:12]}]"


def last_seq(stack) -> int:
    with stack.db() as c:
        return c.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]


def denial_after(stack, seq: int, code: str, timeout: float = 10) -> tuple[dict, str]:
    """The first `request.denied` event with `code` after `seq` (the filter reports denials in
    batches), parsed and as stored."""
    deadline = time.time() + timeout
    while True:
        with stack.db() as c:
            row = c.execute(
                "SELECT payload FROM audit WHERE seq > ? AND kind = 'request.denied' AND json_extract(payload, '$.code') = ? ORDER BY seq LIMIT 1",
                (seq, code),
            ).fetchone()
        if row:
            return json.loads(row[0]), row[0]
        if time.time() > deadline:
            raise AssertionError(f"no {code} denial recorded after event {seq}")
        time.sleep(0.05)


def assert_audit_clean(stack):
    r = stack.aex("audit", "--json", check=False)
    report = json.loads(r.stdout)
    assert r.returncode == 0, [c for c in report["checks"] if not c["ok"]]


@pytest.mark.parametrize(
    "method, path, status, code, stored",
    [
        ("GET", "/v1/nothing?key={t}", 404, "unknown_endpoint", "/v1/nothing"),
        ("GET", "/v1/{t}", 404, "unknown_endpoint", "/v1/{r}"),
        ("POST", "/v1/chat/completions?api_key={t}", 401, "missing_api_key", "/v1/chat/completions"),
    ],
    ids=["token_in_query", "token_as_path", "token_in_query_of_a_governed_path"],
)
def test_unauthenticated_requests_carrying_a_token_leave_the_audit_clean(fresh_stack, method, path, status, code, stored):
    token = raw_token()
    since = last_seq(fresh_stack)
    got, _, body = http(method, fresh_stack.url(path.format(t=token)), b"{}" if method == "POST" else None)
    assert got == status and error_code(body)[1] == code, body
    payload, text = denial_after(fresh_stack, since, code)
    assert payload["path"] == stored.format(r=redacted(token))
    assert "?" not in payload["path"]
    assert token[4:] not in text and token[4:24] not in text
    assert_audit_clean(fresh_stack)


def test_a_huge_model_name_is_refused_and_stored_bounded(fresh_stack, agent_name):
    a = fresh_stack.create_agent(agent_name, "1.00", 1000)
    model = "m" * 100_000
    since = last_seq(fresh_stack)
    status, _, body = fresh_stack.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}, a["token"])
    assert status == 403 and error_code(body) == ("permission_error", "model_not_allowed"), body[:300]
    # The client is told the name it sent, cut.
    message = json.loads(body)["error"]["message"]
    assert len(message) <= MAX_MESSAGE and "m" * (MAX_NAME - 1) + "…" in message, message
    payload, text = denial_after(fresh_stack, since, "model_not_allowed")
    assert len(payload["model"]) == MAX_NAME and payload["model"].endswith("…")
    assert len(payload["message"]) <= MAX_MESSAGE
    assert len(text.encode()) < 4 * 1024, len(text)
    assert_audit_clean(fresh_stack)


def test_a_token_sent_as_the_model_name_is_redacted(fresh_stack, agent_name):
    a = fresh_stack.create_agent(agent_name, "1.00", 1000)
    token = raw_token()
    since = last_seq(fresh_stack)
    status, _, body = fresh_stack.post("/v1/chat/completions", {"model": token, "messages": []}, a["token"])
    assert status == 403 and error_code(body)[1] == "model_not_allowed"
    payload, text = denial_after(fresh_stack, since, "model_not_allowed")
    assert payload["model"] == redacted(token)
    assert redacted(token) in payload["message"]
    assert token[4:24] not in text
    assert_audit_clean(fresh_stack)
