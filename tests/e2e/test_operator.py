"""Operator commands against a real stack: `aex run`, `aex version`, and the Python helper."""

import os
import signal
import subprocess
import sys

from harness import REPO


def test_aex_run_sets_the_agent_environment_and_propagates_the_exit_code(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 100)
    code = (
        "import openai, sys; c = openai.OpenAI(max_retries=0);"
        "r = c.chat.completions.create(model='test-model', messages=[{'role':'user','content':'via aex run'}]);"
        "print(r.choices[0].message.content);"
        # The Agents SDK would upload traces, with the agent's token, to api.openai.com.
        "import os; assert os.environ['OPENAI_AGENTS_DISABLE_TRACING'] == '1'; sys.exit(7)"
    )
    r = stack.aex("run", "--agent", agent_name, "--", sys.executable, "-c", code, check=False)
    assert r.returncode == 7, r.stderr
    assert r.stdout.startswith("word1")
    assert stack.wait_settled(agent_name)["spent_micros"] > 0


def test_aex_run_without_credential_is_a_clear_error(stack):
    r = stack.aex("run", "--agent", "nobody-here", "--", "true", check=False)
    assert r.returncode != 0
    assert "nobody-here" in r.stderr and "credential" in r.stderr


# Exits with a code naming the signal it got, after a moment of cleanup.
TRAPS = "import signal, sys, time\n" + "".join(
    f"signal.signal(signal.{s}, lambda *_: (time.sleep(0.3), print('{s}', flush=True), sys.exit({c})))\n"
    for s, c in (("SIGTERM", 43), ("SIGINT", 44), ("SIGHUP", 45))
) + "print('ready', flush=True)\ntime.sleep(30)\nsys.exit(0)\n"


def test_aex_run_hands_signals_to_the_command_and_returns_its_code(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 100)
    # kill -TERM / -HUP aex: the command gets it (it used to keep running, orphaned, with the
    # agent's token, while aex exited 143). Ctrl-C (SIGINT to the whole group): aex waits for
    # the command and returns its code (aex used to die at once, losing it).
    for sig, group, code in ((signal.SIGTERM, False, 43), (signal.SIGHUP, False, 45), (signal.SIGINT, True, 44)):
        p = subprocess.Popen([str(stack.aex_bin), "--home", str(stack.home), "run", "--agent", agent_name, "--", sys.executable, "-c", TRAPS],
                             env=stack.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout.readline().strip() == "ready"
        if group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out = p.communicate(timeout=20)[0]
        assert (p.returncode, out.strip()) == (code, sig.name), (sig, p.returncode, out)


def test_aex_run_refuses_a_name_that_is_not_an_agent_s_and_commands_that_cannot_run(stack, agent_name):
    stack.create_agent(agent_name, "1.00", 100)
    # A path as the name read another file of the home as the token: the admin token.
    for name in ("../admin.token", str(stack.home / "filter.key"), "credentials/../../admin.token"):
        r = stack.aex("run", "--agent", name, "--", "sh", "-c", "echo $OPENAI_API_KEY", check=False)
        assert r.returncode == 1 and "invalid agent name" in r.stderr and r.stdout == "", (name, r.stdout, r.stderr)
    # The shell's codes for a command not found / not executable, not aex's own 1.
    r = stack.aex("run", "--agent", agent_name, "--", str(stack.home / "no-such-program"), check=False)
    assert r.returncode == 127 and "cannot run" in r.stderr, r.stderr
    r = stack.aex("run", "--agent", agent_name, "--", str(stack.home / "config.toml"), check=False)
    assert r.returncode == 126 and "cannot run" in r.stderr, r.stderr


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


def test_python_helper_refuses_a_name_that_is_not_an_agent_s(stack):
    code = (
        "from aex.integrations import get_openai_client\n"
        "for n in ('../admin.token', '/etc/passwd', '.hidden'):\n"
        "    try:\n"
        "        get_openai_client(n)\n"
        "        print('accepted', n)\n"
        "    except ValueError as e:\n"
        "        assert 'invalid agent name' in str(e), e\n"
        "print('done')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=stack.env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (r.returncode, r.stdout.strip()) == (0, "done"), (r.stdout, r.stderr)
