"""Operator commands against a real stack: doctor (environment and --compat), status, metrics,
and models reload under load."""

import json
import socket
import subprocess
import threading
import time

from harness import MODELS_TOML


def test_doctor_passes_on_a_healthy_stack_and_names_failures(fresh_stack):
    r = fresh_stack.aex("doctor", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in ("home", "config.toml", "models.toml", "admin token", "database", "daemon", "envoy", "filter", "provider mock"):
        assert any(l.startswith("ok") and name in l for l in lines), (name, r.stdout)
    report = fresh_stack.aex_json("doctor")
    assert report["ok"] is True
    # The daemon's keys count, not this shell's: a CLI without the provider key still sees it
    # set, and a keyed provider that cannot be reached fails.
    env = {k: v for k, v in fresh_stack.env.items() if k != "AEX_TEST_PROVIDER_KEY"}
    r = subprocess.run([str(fresh_stack.aex_bin), "--home", str(fresh_stack.home), "doctor"], env=env, capture_output=True, text=True, timeout=60)
    mock_line = next(l for l in r.stdout.splitlines() if "provider mock" in l)
    assert r.returncode == 0 and mock_line.startswith("ok") and "reachable" in mock_line, r.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    (fresh_stack.home / "models.toml").write_text(MODELS_TOML.format(mock_port=fresh_stack.mock_port) + f"""
[providers.dead]
base_url = "http://127.0.0.1:{dead}/v1"
api_key_env = "AEX_TEST_PROVIDER_KEY"
""")
    fresh_stack.aex("models", "reload")
    r = fresh_stack.aex("doctor", check=False)
    dead_line = next(l for l in r.stdout.splitlines() if "provider dead" in l)
    assert r.returncode != 0 and dead_line.startswith("FAIL") and "cannot be reached" in dead_line, r.stdout
    fresh_stack.kill("envoy")
    r = fresh_stack.aex("doctor", check=False)
    assert r.returncode != 0
    assert any(l.startswith("FAIL") and "envoy" in l for l in r.stdout.splitlines()), r.stdout


def test_doctor_of_a_home_not_running_does_not_report_another_home_s_stack(stack, tmp_path):
    """A newcomer's shell without AEX_HOME while a stack of another home runs on the default
    ports: doctor said `ok config.toml` for a file that did not exist and `ok envoy` for the other
    home's Envoy. Found by a README walkthrough."""
    def doctor(home):
        r = subprocess.run([str(stack.aex_bin), "--home", str(home), "doctor"], env=stack.env, capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout.splitlines()

    rc, lines = doctor(tmp_path / "never-initialised")
    assert rc != 0
    config = next(l for l in lines if "config.toml" in l)
    assert config.startswith("FAIL") and "aex init" in config, lines
    assert not any(l.startswith("ok") and ("envoy" in l or "daemon" in l) for l in lines), lines
    # Initialised with the running stack's ports, but not started: the ports are named with the
    # home that holds them.
    other = tmp_path / "other"
    subprocess.run([str(stack.aex_bin), "--home", str(other), "init"], env=stack.env, capture_output=True, check=True, timeout=60)
    (other / "config.toml").write_text((stack.home / "config.toml").read_text())
    rc, lines = doctor(other)
    assert rc != 0
    envoy = next(l for l in lines if l.split()[1:2] == ["envoy"])
    assert envoy.startswith("FAIL") and str(stack.home) in envoy, lines


def test_doctor_compat_without_a_token_says_so(stack):
    r = stack.aex("doctor", "--compat", "--token", "", check=False)
    assert r.returncode != 0
    assert "--token" in r.stderr and "credentials" in r.stderr, r.stdout + r.stderr


def test_doctor_compat_runs_protocol_checks_and_reports_spend(stack, agent_name):
    a = stack.create_agent(agent_name, "1.00", 100)
    r = stack.aex("doctor", "--compat", "--token", a["token"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for check in ("chat completion", "streaming SSE", "tool calls", "JSON mode", "error parity: bad token", "error parity: unknown model"):
        assert any(l.startswith("ok") and check in l for l in r.stdout.splitlines()), (check, r.stdout)
    assert "test-mini" in r.stdout, "the cheapest allowed model is used"
    report = stack.aex_json("doctor", "--compat", "--token", a["token"])
    assert report["ok"] and report["spent_micros"] > 0
    # A failure says why: the code, the message and what to do (it said "HTTP 401, 0 models").
    bad = stack.aex("doctor", "--compat", "--token", "aex_wrong", check=False)
    assert bad.returncode != 0 and "invalid_api_key" in bad.stdout and "credentials" in bad.stdout, bad.stdout
    ro = stack.create_agent(agent_name + "-ro", "1.00", 100, "--scope", "read-only")
    r = stack.aex("doctor", "--compat", "--token", ro["token"], check=False)
    line = next(l for l in r.stdout.splitlines() if "chat completion" in l)
    assert r.returncode != 0 and line.startswith("FAIL") and "scope_denied" in line and "execution-scope" in line, r.stdout
    # --token alone used to run the environment checks and ignore the token.
    r = stack.aex("doctor", "--token", a["token"], check=False)
    assert r.returncode == 2 and "--compat" in r.stderr, r.stderr
    # An agent whose own policy refuses streams and tools: those checks are documented denials,
    # not faults (streaming used to FAIL and fail the command).
    b = stack.create_agent(agent_name + "-plain", "1.00", 100, "--no-streaming", "--no-tools")
    r = stack.aex("doctor", "--compat", "--token", b["token"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for check in ("streaming SSE", "tool calls"):
        line = next(l for l in r.stdout.splitlines() if check in l)
        assert line.startswith("ok") and "denied by the agent's policy" in line, line


def test_status_and_metrics_summarise_the_ledger(stack, agent_name):
    a = stack.create_agent(agent_name, "0.10", 100)
    c = stack.client(a["token"])
    for _ in range(3):
        c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    stack.post("/v1/chat/completions", {"model": "unpriced-model", "messages": [{"role": "user", "content": "x"}]}, a["token"])
    after = stack.wait_settled(agent_name)
    # Filter-side denials reach the audit log asynchronously (batched with settlements).
    deadline = time.time() + 5
    while not stack.audit(a["id"], "request.denied") and time.time() < deadline:
        time.sleep(0.02)
    st = stack.aex_json("status")
    assert st["last_hour"]["allowed"] >= 3 and st["last_hour"]["denied_by_code"].get("model_not_priced", 0) >= 1
    m = {x["name"]: x for x in stack.aex_json("metrics", "--window", "15m")["agents"]}[agent_name]
    assert m["spent_micros"] == after["spent_micros"] == m["window_spent_micros"]
    assert m["remaining_micros"] == after["budget_micros"] - after["spent_micros"]
    assert m["burn_micros_per_hour"] == m["window_spent_micros"] * 4
    assert m["time_to_exhaustion_secs"] == m["remaining_micros"] * 3600 // m["burn_micros_per_hour"]
    assert m["requests_in_window"] == 4 and m["denials_in_window"] == 1
    text = stack.aex("metrics").stdout
    assert agent_name in text and "BURN/HOUR" in text
    assert stack.aex("metrics", "--window", "1w", check=False).returncode != 0


def test_prometheus_metrics(stack, agent_name):
    from harness import http

    a = stack.create_agent(agent_name, "1.00", 100)
    stack.client(a["token"]).chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
    stack.post("/v1/chat/completions", {"model": "nope", "messages": []}, a["token"])
    stack.wait_settled(agent_name)
    deadline = time.time() + 5
    while not stack.audit(a["id"], "request.denied") and time.time() < deadline:
        time.sleep(0.02)
    status, headers, body = http("GET", f"http://127.0.0.1:{stack.ports['http']}/metrics")
    text = body.decode()
    assert status == 200
    assert f'aex_requests_total{{agent="{agent_name}",model="test-model",outcome="allowed"}} 1' in text
    # A model name the catalog does not know is labelled "other": clients cannot mint series.
    assert f'aex_denials_total{{agent="{agent_name}",model="other",reason="model_not_allowed"}} 1' in text
    assert 'model="nope"' not in text
    spent = stack.agent(agent_name)["spent_micros"]
    assert f'aex_spent_micros{{agent="{agent_name}"}} {spent}' in text
    assert "aex_reservations_open" in text and "aex_authorize_duration_seconds_bucket" in text


def test_models_reload_under_load_applies_prices_without_failures(fresh_stack, agent_name):
    s = fresh_stack
    a = s.create_agent(agent_name, "100.00", 100000)
    c = s.client(a["token"])
    failures, done, stop = [], [0], threading.Event()

    def load():
        while not stop.is_set():
            try:
                if done[0] % 2:
                    list(c.chat.completions.create(model="test-model", stream=True, messages=[{"role": "user", "content": "x"}],
                                                   extra_headers={"x-mock-chunk-delay-ms": "5"}))
                else:
                    c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x"}])
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is recorded
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    # Double the output price of test-model and add a provider with a new model.
    models = s.home / "models.toml"
    new = models.read_text().replace('output_usd_per_1m = "2.00"', 'output_usd_per_1m = "4.00"')
    new += f'\n[providers.second]\nbase_url = "http://127.0.0.1:{s.mock_port}/v1"\n\n[models."second-model"]\nprovider = "second"\ninput_usd_per_1m = "1"\noutput_usd_per_1m = "1"\n'
    models.write_text(new)
    r = s.aex("models", "reload", "--json")
    assert json.loads(r.stdout)["models"] == 5
    time.sleep(1)
    # A broken file is refused with the key named, and the old config stays.
    models.write_text(new.replace('input_usd_per_1m = "1"', 'input_usd_per_1m = "one"'))
    bad = s.aex("models", "reload", check=False)
    assert bad.returncode != 0 and 'models."second-model".input_usd_per_1m' in bad.stderr
    # So is an emptied one (it was taken as a catalog of no models, refusing every request).
    for text in ("", "# nothing yet\n"):
        models.write_text(text)
        bad = s.aex("models", "reload", check=False)
        assert bad.returncode != 0 and "no model is defined" in bad.stderr, bad.stderr
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures[:3]
    assert done[0] > 20
    s.wait_settled(agent_name)
    # New prices apply to the next request; the new provider routes through its new cluster.
    before = s.agent(agent_name)["spent_micros"]
    r = c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x"}])
    after = s.wait_settled(agent_name)["spent_micros"]
    assert after - before == r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 4
    r2 = c.chat.completions.create(model="second-model", messages=[{"role": "user", "content": "x"}])
    assert r2.choices[0].message.content
    assert [e for e in s.audit(kind="config.loaded")][-1]["payload"]["models"] == ["second-model", "test-embed", "test-mini", "test-model", "unpriced-model"]
