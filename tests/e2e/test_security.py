"""The secrets an operator's stack holds stay out of reach of what else runs on the machine: the
filter's key (which unlocks the provider keys through FilterService/Sync), the admin token, the
providers' keys, and agents' traffic. Found by a black-box probe of the operator surfaces; each
case failed before its fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness import Stack, http


def test_envoy_s_admin_port_does_not_serve_the_filter_key(stack):
    """Envoy's admin port answers anyone on the machine, and /config_dump printed the plugin
    configuration with the filter key in it. The key now reaches the filter through Envoy's
    environment; the rendered file names only the variable."""
    key = (stack.home / "filter.key").read_text().strip()
    status, _, dump = http("GET", f"http://127.0.0.1:{stack.ports['admin']}/config_dump")
    assert status == 200
    assert key.encode() not in dump
    assert b"AEX_FILTER_KEY" in dump, "the filter's key variable is configured"
    assert key not in (stack.home / "envoy/envoy.yaml").read_text()
    # And the filter has it: governed requests work.
    a = stack.create_agent("sec-env-key", "1.00", 100)
    assert stack.client(a["token"]).models.list().data


def test_an_empty_or_short_secret_is_refused_at_start_and_replaced_by_init(tmp_path):
    """An empty admin.token or filter.key (a truncated file, a `: > admin.token` "reset") matched
    a caller that sent no secret at all: the admin API, FilterService/Sync and the dashboard
    opened to anyone. The daemon now refuses to start with one, and `aex init` replaces it."""
    s = Stack(tmp_path)
    try:
        s.kill("envoy")
        s.kill("control-plane")
        for name, content in (("admin.token", "\n"), ("filter.key", "short\n")):
            path = s.home / name
            path.write_text(content)
            try:
                s.start_control_plane()
                raise AssertionError(f"the daemon started with {name} = {content!r}")
            except RuntimeError as e:
                assert name in str(e) and "aex init" in str(e), e
            before = path.read_text()
            out = s.aex("init").stdout
            fresh = path.read_text().strip()
            assert fresh != before.strip() and len(fresh) >= 16 and "created" in out and name in out, out
            assert oct(path.stat().st_mode & 0o777) == "0o600"
        s.start_control_plane()
        s.start_envoy()
        a = s.create_agent("after-repair", "1.00", 100)
        assert s.client(a["token"]).models.list().data
    finally:
        s.stop()


def test_aex_run_gives_the_agent_its_token_but_not_the_provider_keys(stack, tmp_path):
    """The README has operators export provider keys in the shell that starts the daemon; `aex
    run` handed that whole environment to the agent, provider keys included."""
    a = stack.create_agent("sec-run-env", "1.00", 100)
    (stack.home / ".env").write_text("GROQ_API_KEY=gsk_from_dotenv\n")
    try:
        env = dict(stack.env, OPENAI_API_KEY="sk-operator", GROQ_API_KEY="gsk-operator", UNRELATED="kept")
        r = subprocess.run([str(stack.aex_bin), "--home", str(stack.home), "run", "--agent", "sec-run-env", "--", "env"],
                           env=env, capture_output=True, text=True, timeout=60)
    finally:
        os.remove(stack.home / ".env")
    assert r.returncode == 0, r.stderr
    child = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert child["OPENAI_API_KEY"] == a["token"]
    # The test provider's api_key_env, a default provider's, and a variable the home's .env sets.
    for var in ("AEX_TEST_PROVIDER_KEY", "GROQ_API_KEY"):
        assert var not in child, (var, child.get(var))
    assert child["UNRELATED"] == "kept"


def test_the_built_in_mock_provider_records_nothing(tmp_path):
    """A provider without a key is served by the mock built into the daemon (under /mock on its
    HTTP port). It kept the test recorder: every agent's prompts and headers, a passthrough
    agent's own provider key included, for anyone to read at /mock/_mock/requests."""
    s = Stack(tmp_path)
    try:
        cfg = s.home / "config.toml"
        cfg.write_text(cfg.read_text().replace("fallback = false", "fallback = true"))
        models = s.home / "models.toml"
        models.write_text(models.read_text() + '\n[providers.keyless]\nbase_url = "https://keyless.invalid/v1"\napi_key_env = "AEX_NO_SUCH_KEY"\n\n'
                          '[models."keyless-model"]\nprovider = "keyless"\ninput_usd_per_1m = "1"\noutput_usd_per_1m = "2"\nmax_output_tokens = 100\n')
        s.kill("envoy")
        s.kill("control-plane")
        s.start_control_plane()
        s.start_envoy()
        a = s.create_agent("sec-mock", "1.00", 100)
        r = s.client(a["token"]).chat.completions.create(model="keyless-model", messages=[{"role": "user", "content": "a secret prompt"}])
        assert r.choices[0].message.content, "served by the built-in mock"
        status, _, body = http("GET", f"http://127.0.0.1:{s.ports['http']}/mock/_mock/requests")
        assert status == 404 and b"secret prompt" not in body, (status, body[:300])
    finally:
        s.stop()


def test_the_compose_agent_container_gets_its_token_not_the_aex_home():
    """deploy/docker-compose.yml mounted the whole AEX home into the agent container (read-only is
    still readable, and the image runs as root): admin token, filter key, .env, every agent's
    credential. The agent now gets its own token in its environment. (No Docker engine here: a
    check of the shipped file.)"""
    import yaml

    doc = yaml.safe_load((Path(__file__).parents[2] / "deploy/docker-compose.yml").read_text())
    home_volumes = {v.split(":")[0] for v in doc["services"]["aex"]["volumes"]}
    agent = doc["services"]["agent"]
    assert not [v for v in agent.get("volumes", []) if v.split(":")[0] in home_volumes], agent
    assert agent["environment"]["OPENAI_API_KEY"] == "${AEX_AGENT_TOKEN:-}"


def test_the_control_plane_s_http_port_answers_only_loopback_host_names(stack):
    """A web page an operator opens can point its own host name at 127.0.0.1 (DNS rebinding) and
    then read the control plane's HTTP port from the browser: /metrics names every agent and its
    spend. Only requests addressed to a loopback name are answered (directly, or through Envoy's
    /dashboard route, which passes the client's Host on)."""
    port = stack.ports["http"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
        status, _, body = http("GET", f"http://127.0.0.1:{port}/metrics", headers={"host": host})
        assert status == 200, (host, status, body[:200])
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost.evil.example:{port}"):
        status, _, body = http("GET", f"http://127.0.0.1:{port}/metrics", headers={"host": host})
        assert status == 421 and b"aex_" not in body, (host, status, body[:200])
    status, _, _ = http("GET", stack.url("/dashboard"), headers={"host": "evil.example:9000"})
    assert status == 421
    status, _, _ = http("GET", stack.url("/dashboard"))
    assert status in (200, 401)
