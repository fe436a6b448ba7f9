"""Every operator command's error paths with the real `aex` binary: daemon down, unknown agent,
bad flags. Each must fail with a non-zero exit and a clear message on stderr."""

import json
import os
import subprocess
import time

from harness import aex_binary


def run(home, *args):
    env = dict(os.environ, AEX_HOME=str(home))
    return subprocess.run([str(aex_binary()), *args], env=env, capture_output=True, text=True, timeout=60)


def test_commands_fail_clearly_with_the_daemon_down(tmp_path):
    home = tmp_path / "home"
    assert run(home, "init").returncode == 0
    # Ports nobody listens on.
    (home / "config.toml").write_text("[ports]\nenvoy = 1\ngrpc = 2\nhttp = 3\nenvoy_admin = 4\n")
    for args in (["agent", "list"], ["models", "reload"], ["doctor"]):
        r = run(home, *args)
        assert r.returncode != 0, args
        assert "aex daemon start" in (r.stderr + r.stdout), (args, r.stderr, r.stdout)
    # Version still answers for the CLI and says the daemon is not running.
    v = run(home, "version")
    assert v.returncode == 0 and "not running" in v.stdout
    # Status, metrics and audit read the database; without one they say how to get one.
    for args in (["status"], ["metrics"], ["audit"]):
        r = run(home, *args)
        assert r.returncode != 0 and "aex daemon start" in r.stderr, (args, r.stderr)


def test_bad_flags_and_unknown_agents(stack):
    cases = [
        (["run", "--agent", "ghost", "--", "true"], "ghost"),
        (["run", "--agent"], "--agent"),
        (["metrics", "--window", "soon"], "soon"),
        # A bare number was taken as hours (60 → a 2.5-day window).
        (["metrics", "--window", "60"], "no unit"),
        # --ttl belongs to rotate-token; the hint named clap's `-- --ttl` instead.
        (["agent", "update", "ghost", "--ttl", "5"], "rotate-token ghost --ttl"),
        (["doctor", "--compat"], "--token"),
        (["models", "reload", "--bogus"], "--bogus"),
        (["audit", "--fix"], "--fix"),
        (["agent", "update", "ghost", "--rpm", "5"], "ghost"),
        (["agent", "rotate-token", "ghost"], "ghost"),
        (["agent", "update", "x", "--budget", "1.0000001"], "6 decimal"),
        (["agent", "create", "bad name!", "1.00", "10"], "invalid agent name"),
        (["agent", "create", "glob", "1.00", "10", "--allowed-models", "gpt-[4"], "gpt-[4"),
        (["agent", "create", "ttl", "1.00", "10", "--ttl", "forever"], "forever"),
        (["agent", "create", "ttl2", "1.00", "10", "--ttl=-1"], "number of hours"),
        # It was accepted, printing an expiry in the year 2104396604.
        (["agent", "create", "ttl3", "1.00", "10", "--ttl", "18446744073709.551615"], "100 years"),
        # Above 2^53 - 1 µUSD: refused (it used to be stored cut down to i64::MAX).
        (["agent", "create", "huge", "18446744073709.551615", "10"], "too large"),
        (["agent", "create", "huge2", "9007199254.740992", "10"], "too large"),
        # Negative numbers were taken for flags ("unexpected argument '-1'").
        (["agent", "create", "neg", "-1", "10"], "not a decimal amount"),
        (["agent", "update", "ghost", "--budget", "-1"], "not a decimal amount"),
        (["agent", "create", "neg", "1", "-5"], "-5"),
        # An empty id listed every event recorded without one.
        (["audit", "--request", ""], "needs a request id"),
    ]
    for args, needle in cases:
        r = stack.aex(*args, check=False)
        assert r.returncode != 0, args
        assert needle in r.stderr, (args, r.stderr)


def test_operator_edges_found_by_exploratory_testing(stack, agent_name):
    # The largest budget is accepted and shown exactly.
    big = stack.aex_json("agent", "create", agent_name + "-max", "9007199254.740991", "10")
    assert stack.agent(agent_name + "-max")["budget_micros"] == 2**53 - 1, big
    # Brace alternatives (documented glob syntax) survive the comma-separated list.
    stack.aex("agent", "create", agent_name + "-alt", "1.00", "10", "--allowed-models", "{test-model,test-mini},x-*")
    assert stack.agent(agent_name + "-alt")["policy"]["allowed_models"] == ["{test-model,test-mini}", "x-*"]
    # A budget below what the agent already spent is refused with the figures.
    a = stack.create_agent(agent_name, "1.00", 10)
    stack.client(a["token"]).chat.completions.create(model="test-model", messages=[{"role": "user", "content": "spend"}])
    spent = stack.wait_settled(agent_name)["spent_micros"]
    r = stack.aex("agent", "update", agent_name, "--budget", "0.000001", check=False)
    assert r.returncode != 0 and "cannot go below" in r.stderr, r.stderr
    assert stack.agent(agent_name)["budget_micros"] == 1_000_000
    stack.aex("agent", "update", agent_name, "--budget", f"0.{spent:06d}")
    stack.aex("audit")
    # Output piped into `head` ends quietly (no "failed printing to stdout" panic).
    for cmd in ("agent list", "metrics"):
        r = subprocess.run(f"'{aex_binary()}' {cmd} | head -1", shell=True, env=stack.env, capture_output=True, text=True, timeout=60)
        assert r.stdout and "panicked" not in r.stderr, (cmd, r.stderr)


def test_models_reload_refuses_a_broken_file_and_keeps_serving(fresh_stack, agent_name):
    s = fresh_stack
    a = s.create_agent(agent_name, "1.00", 100)
    models = s.home / "models.toml"
    good = models.read_text()
    models.write_text(good + '\n[models."broken"]\nprovider = "nowhere"\n')
    r = s.aex("models", "reload", check=False)
    assert r.returncode != 0 and 'models."broken".provider' in r.stderr
    models.write_text("this is not toml [")
    r = s.aex("models", "reload", check=False)
    assert r.returncode != 0 and "models.toml" in r.stderr
    ok = s.client(a["token"]).chat.completions.create(model="test-model", messages=[{"role": "user", "content": "still up"}])
    assert ok.choices[0].message.content


def test_credential_files_of_dotted_names_do_not_collide(stack, agent_name):
    # The copy of `<name>.b`'s token was written through `<name>.tmp` and renamed: creating it
    # deleted the credentials of an agent called `<name>.tmp`.
    first = stack.create_agent(agent_name + ".tmp", "1.00", 10)
    second = stack.create_agent(agent_name + ".b", "1.00", 10)
    creds = stack.home / "credentials"
    assert (creds / (agent_name + ".tmp")).read_text().strip() == first["token"]
    assert (creds / (agent_name + ".b")).read_text().strip() == second["token"]
    assert not [p.name for p in creds.iterdir() if p.name.endswith(".tmp") and p.name.startswith(".")]


def test_a_token_that_cannot_be_saved_is_still_shown(stack, agent_name):
    # The agent exists once the daemon answers: a failed local copy must not hide its only token.
    (stack.home / "credentials" / agent_name).mkdir(parents=True)
    r = stack.aex("agent", "create", agent_name, "1.00", "10")
    token = next(line for line in r.stdout.splitlines() if line.startswith("aex_"))
    assert "NOT saved" in r.stdout and "could not save" in r.stderr, (r.stdout, r.stderr)
    status, _, _ = stack.post("/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, token=token)
    assert status == 200
    r = stack.aex("agent", "rotate-token", agent_name, "--json")
    j = __import__("json").loads(r.stdout)
    assert j["token"].startswith("aex_") and j["credential_file"] is None, j


def test_a_model_added_by_reload_is_served_at_once(fresh_stack, agent_name):
    # `aex models reload` returns when the control plane has the new catalogue; a worker that
    # has not synced yet fetches it on the unknown model instead of refusing (as for a token).
    s = fresh_stack
    a = s.create_agent(agent_name, "1.00", 100)
    for i in range(3):
        (s.home / "models.toml").write_text((s.home / "models.toml").read_text() + f"""
[models."fresh-{i}"]
provider = "mock"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
""")
        s.aex("models", "reload")
        status, _, raw = s.post("/v1/chat/completions", {"model": f"fresh-{i}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, a["token"])
        assert status == 200, (i, raw[:300])
    # A model that does not exist is still refused, named in the audit log.
    status, _, raw = s.post("/v1/chat/completions", {"model": "no-such-model", "messages": []}, a["token"])
    assert status == 403 and b"model_not_allowed" in raw, raw
    s.wait_settled(agent_name)
    # Denials reach the log with the worker's next report (within ~70 ms).
    deadline = time.time() + 5
    while not s.audit(a["id"], "request.denied") and time.time() < deadline:
        time.sleep(0.05)
    denied = [e["payload"] for e in s.audit(a["id"], "request.denied")]
    assert denied and denied[-1]["model"] == "no-such-model", denied
    # With the control plane down a typo'd model is still a 403, not a retryable 503.
    s.kill("control-plane")
    status, _, raw = s.post("/v1/chat/completions", {"model": "no-such-model-2", "messages": []}, a["token"])
    assert status == 403 and b"model_not_allowed" in raw, raw


def test_update_without_changes_is_refused_and_records_nothing(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 10)
    before = stack.audit(a["id"], "agent.updated")
    r = stack.aex("agent", "update", agent_name, check=False)
    assert r.returncode != 0 and "nothing to update: pass at least one of --budget, --rpm" in r.stderr, r.stderr
    assert stack.audit(a["id"], "agent.updated") == before
    stack.aex("agent", "update", agent_name, "--no-vision")
    assert len(stack.audit(a["id"], "agent.updated")) == len(before) + 1


def test_inspect_shows_the_token_expiry_as_a_utc_date(stack, agent_name):
    import datetime

    a = stack.create_agent(agent_name, "1.00", 10, "--ttl", "24")
    unix = stack.agent(agent_name)["token_expires_at"]
    assert isinstance(unix, int) and unix == a["token_expires_at"]
    date = datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = stack.aex("agent", "inspect", agent_name).stdout
    assert f"token      expires {date} (ttl 24h)" in out, out
    assert str(unix) not in out
    never = stack.create_agent(agent_name + "-n", "1.00", 10)
    assert never["token_expires_at"] is None
    assert "token      never expires" in stack.aex("agent", "inspect", agent_name + "-n").stdout


def test_allowed_models_that_match_no_model_are_warned_about_and_an_empty_list_is_refused(stack, agent_name):
    r = stack.aex("agent", "create", agent_name, "1.00", "10", "--allowed-models", "test-model,gpt-5,claude-*,unpriced-model")
    created = stack.agent(agent_name)
    assert created["policy"]["allowed_models"] == ["test-model", "gpt-5", "claude-*", "unpriced-model"]
    warning = r.stderr.strip()
    assert warning.startswith("warning: --allowed-models: gpt-5, claude-* match no configured model"), r.stderr
    assert "; unpriced-model matches only unpriced models" in warning, r.stderr
    assert warning.endswith("the agent cannot use them. Priced models: test-embed, test-mini, test-model (`aex models list`)"), r.stderr
    # Every pattern known: no warning.
    quiet = stack.aex("agent", "create", agent_name + "-ok", "1.00", "10", "--allowed-models", "test-*")
    assert quiet.stderr == "", quiet.stderr
    # Updates are checked the same way.
    upd = stack.aex("agent", "update", agent_name, "--allowed-models", "nomatch-*")
    assert "nomatch-* matches no configured model" in upd.stderr, upd.stderr
    # With --json, stderr stays JSON lines (a warning object), stdout the agent.
    upd = stack.aex("agent", "update", agent_name + "-ok", "--allowed-models", "nomatch2-*", "--json")
    assert json.loads(upd.stdout)["policy"]["allowed_models"] == ["nomatch2-*"], upd.stdout
    lines = [json.loads(line) for line in upd.stderr.splitlines()]
    assert len(lines) == 1 and "nomatch2-* matches no configured model" in lines[0]["warning"]["message"], upd.stderr
    # An empty list would silently mean "every model": refused, '*' says so.
    for args in (["agent", "create", agent_name + "-e", "1.00", "10", "--allowed-models", ""],
                 ["agent", "create", agent_name + "-e", "1.00", "10", "--allowed-tools", " , "],
                 ["agent", "update", agent_name, "--allowed-models", ""]):
        r = stack.aex(*args, check=False)
        assert r.returncode != 0 and "is empty" in r.stderr and "'*'" in r.stderr, (args, r.stderr)
    assert stack.agent(agent_name)["policy"]["allowed_models"] == ["nomatch-*"]
    stack.aex("agent", "update", agent_name, "--allowed-models", "*")
    assert stack.agent(agent_name)["policy"]["allowed_models"] == []
    models = {m["name"]: m for m in stack.aex_json("models", "list")}
    assert models["test-model"]["priced"] and models["test-model"]["input_usd_per_1m"] == "1.000000"
    assert models["unpriced-model"]["priced"] is False and models["unpriced-model"]["input_usd_per_1m"] is None
    assert "unpriced" in stack.aex("models", "list").stdout


def test_json_errors_are_json_on_stderr(stack):
    import json

    r = stack.aex("agent", "inspect", "ghost", "--json", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert "ghost" in json.loads(r.stderr.strip().splitlines()[-1])["error"]["message"], r.stderr
    # A usage error too (clap's exit code 2).
    r = stack.aex("agent", "create", "--json", check=False)
    assert r.returncode == 2
    assert "required" in json.loads(r.stderr.strip().splitlines()[-1])["error"]["message"], r.stderr
    # Without --json, plain text.
    r = stack.aex("agent", "inspect", "ghost", check=False)
    assert r.stderr.startswith("error: ") and "ghost" in r.stderr


def test_models_reload_returns_once_the_workers_have_the_change(fresh_stack, agent_name):
    # A changed key (or base_url, or price) is not a new name the filter would fetch on demand:
    # the reload answers only after every worker's periodic sync has picked it up.
    s = fresh_stack
    a = s.create_agent(agent_name, "1.00", 1000)
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for i in range(3):
        key = f"sk-rotated-{i}"
        (s.home / ".env").write_text(f"ROTATED_KEY={key}\n")
        models = (s.home / "models.toml").read_text()
        models = models.replace('api_key_env = "AEX_TEST_PROVIDER_KEY"', 'api_key_env = "ROTATED_KEY"')
        (s.home / "models.toml").write_text(models)
        s.aex("models", "reload")
        for _ in range(4):  # new connections: both workers
            status, _, raw = s.post("/v1/chat/completions", body, a["token"])
            assert status == 200, raw[:200]
            assert s.mock_requests()[-1]["headers"]["authorization"] == f"Bearer {key}", (i, s.mock_requests()[-1]["headers"])


def test_tables_stay_aligned_with_the_longest_agent_name(stack, agent_name):
    long = (agent_name + "-" + "x" * 64)[:64]
    stack.create_agent(long, "1.00", 10)
    for args, head in ((["agent", "list"], "NAME"), (["metrics"], "AGENT")):
        lines = stack.aex(*args).stdout.splitlines()
        header = next(l for l in lines if l.startswith(head))
        row = next(l for l in lines if l.startswith(long + " "))
        # The budget column ends at the same place in the header and in the long name's row.
        end = header.index("BUDGET") + len("BUDGET")
        assert row[end - 1] != " " and row[end] == " ", (header, row)
