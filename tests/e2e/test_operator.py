"""Operator commands against a real stack: `aex run`, `aex version`, and the Python helper."""

import subprocess
import sys

from harness import REPO


def test_aex_run_sets_the_agent_environment_and_propagates_the_exit_code(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 100)
    code = (
        "import openai, sys; c = openai.OpenAI(max_retries=0);"
        "r = c.chat.completions.create(model='test-model', messages=[{'role':'user','content':'via aex run'}]);"
        "print(r.choices[0].message.content); sys.exit(7)"
    )
    r = stack.aex("run", "--agent", agent_name, "--", sys.executable, "-c", code, check=False)
    assert r.returncode == 7, r.stderr
    assert r.stdout.startswith("word1")
    assert stack.wait_settled(agent_name)["spent_micros"] > 0


def test_aex_run_without_credential_is_a_clear_error(stack):
    r = stack.aex("run", "--agent", "nobody-here", "--", "true", check=False)
    assert r.returncode != 0
    assert "nobody-here" in r.stderr and "credential" in r.stderr


def test_python_helper_returns_a_governed_openai_client(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 100)
    code = (
        "from aex.integrations import get_openai_client;"
        f"c = get_openai_client({agent_name!r}, max_retries=0);"
        "print(c.base_url);"
        "print(c.chat.completions.create(model='test-model', messages=[{'role':'user','content':'hi'}]).usage.completion_tokens)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=stack.env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    base, tokens = r.stdout.split()
    assert base.rstrip("/") == stack.base_url
    assert int(tokens) == 12
    missing = subprocess.run([sys.executable, "-c", "from aex.integrations import get_openai_client; get_openai_client('ghost')"],
                             env=stack.env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "aex agent create ghost" in missing.stderr


def test_version_reports_cli_daemon_and_filter(stack):
    v = stack.aex_json("version")
    assert v["cli"] and v["daemon"] == v["cli"]
    assert v["filter"] == v["cli"], "the filter reports its version on every sync"
