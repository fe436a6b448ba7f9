"""The Makefile's split, read from `make -nB` (what would run on a fresh machine, nothing run):
`make run` installs only what running needs (no sudo, no browser, no test packages); `make test`
installs everything the tests need, as CI runs it."""

import subprocess

from harness import REPO


def make_plan(target: str) -> str:
    """What `make TARGET` would run on a fresh machine (-B: as if nothing were installed yet)."""
    r = subprocess.run(["make", "-nB", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_run_installs_only_what_running_needs_and_make_test_the_rest():
    run = make_plan("run")
    assert "envoy/requirements.txt" in run and "wasm32-wasip1" in run and "scripts/quickstart.sh" in run
    for test_only in ("apt-get", "chromium", "tests/requirements.txt"):
        assert test_only not in run, f"`make run` would install {test_only}:\n{run}"
    test = make_plan("test")
    for needed in ("envoy/requirements.txt", "tests/requirements.txt", "apt-get install -y -qq chromium", "pytest"):
        assert needed in test, f"`make test` would not run {needed}:\n{test}"


def run_quickstart(tmp_path, extra_env: dict) -> subprocess.CompletedProcess:
    """`scripts/quickstart.sh` as `make run` runs it, in a home of its own on free ports."""
    import os

    from harness import aex_binary, envoy_binary, filter_wasm, free_port

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "GROQ_API_KEY")}
    env.update(AEX_HOME=str(home), AEX_ENVOY=str(envoy_binary()), AEX_FILTER=str(filter_wasm()),
               PATH=f"{aex_binary().parent}:{env['PATH']}", **extra_env)
    subprocess.run([str(aex_binary()), "init"], env=env, check=True, capture_output=True, timeout=60)
    cfg = home / "config.toml"
    text = cfg.read_text()
    for name, default in (("envoy", 9000), ("grpc", 9001), ("http", 9002), ("envoy_admin", 9901)):
        text = text.replace(f"{name} = {default}", f"{name} = {free_port()}", 1)
    cfg.write_text(text.replace("concurrency = 2", "concurrency = 1"))
    try:
        return subprocess.run(["bash", str(REPO / "scripts/quickstart.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        subprocess.run([str(aex_binary()), "daemon", "stop"], env=env, capture_output=True, timeout=60)


def test_the_quick_start_answers_offline_through_the_mock(tmp_path):
    r = run_quickstart(tmp_path, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(model gpt-4o-mini)" in r.stdout and '"choices"' in r.stdout, r.stdout


def test_the_quick_start_asks_the_provider_that_has_a_key(tmp_path):
    # With only a Groq key, the demo request goes to a Groq model: the real provider is what the
    # quick start must prove works (unreachable from this machine, so the request fails loudly),
    # not the mock that stands in for OpenAI.
    r = run_quickstart(tmp_path, {"GROQ_API_KEY": "gsk-test-not-a-real-key"})
    assert "(model gpt-oss-20b)" in r.stdout, r.stdout + r.stderr


def test_the_envoy_examples_are_a_config_envoy_accepts(tmp_path):
    # envoy/examples/ is what the daemon renders for the default config (a unit test keeps it
    # current); placed in a home of its own, Envoy validates it as is.
    import shutil

    from harness import envoy_binary, filter_wasm

    home = tmp_path / "home"
    (home / "envoy" / "cds").mkdir(parents=True)
    shutil.copy(filter_wasm(), home / "aex_filter.wasm")
    shutil.copy(REPO / "envoy/examples/clusters.yaml", home / "envoy/cds/clusters.yaml")
    cfg = home / "envoy" / "envoy.yaml"
    cfg.write_text((REPO / "envoy/examples/envoy.yaml").read_text().replace("/home/you/.aex", str(home)))
    r = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=120, env={"AEX_FILTER_KEY": "k" * 32, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
