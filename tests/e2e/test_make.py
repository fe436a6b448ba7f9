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
