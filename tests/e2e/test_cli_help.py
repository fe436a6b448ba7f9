"""`aex --help` and every subcommand's `--help`, walked through the real binary: every argument
and option has a one-line description (a newcomer found ~20 bare flags)."""

import re
import subprocess

from harness import aex_binary

# clap's entries are indented 2 (positionals, short flags) to 6 (long-only flags) spaces; a
# description on the lines below an entry (clap's long layout) is indented further.
ENTRY = re.compile(r"^ {2,6}[-<\[]")
SECTION = re.compile(r"^([A-Z][A-Za-z ]*):$")


def help_text(*path: str) -> str:
    r = subprocess.run([str(aex_binary()), *path, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (path, r.stderr)
    return r.stdout


def undescribed(text: str) -> list[str]:
    """The argument / option entries of a help text that have no description."""
    lines = text.splitlines()
    missing, section = [], None
    for i, line in enumerate(lines):
        if m := SECTION.match(line):
            section = m.group(1)
            continue
        if section not in ("Arguments", "Options") or not ENTRY.match(line):
            continue
        m = re.match(r"^\s+(\S.*?)(?:\s{2,}(\S.*))?$", line.rstrip())
        spec, desc = m.group(1), m.group(2)
        if desc is None:
            below = lines[i + 1] if i + 1 < len(lines) else ""
            desc = below.strip() if below.startswith(" " * 8) and not ENTRY.match(below) else None
        # "[default: …]" alone is not a description.
        if not desc or desc.startswith("["):
            missing.append(spec)
    return missing


def subcommands(text: str) -> list[str]:
    out, section = [], None
    for line in text.splitlines():
        if m := SECTION.match(line):
            section = m.group(1)
        elif section == "Commands" and (m := re.match(r"^  (\S+)(\s{2,}|$)", line)) and m.group(1) != "help":
            out.append(m.group(1))
    return out


def test_the_checker_finds_bare_entries_in_both_layouts():
    same_line = "Arguments:\n  <NAME>        \n  <RPM>         Requests per minute\n\nOptions:\n      --rpm <RPM>    \n      --tpm <N>      [default: 0]\n  -h, --help     Print help\n"
    assert undescribed(same_line) == ["<NAME>", "--rpm <RPM>", "--tpm <N>"]
    next_line = "Options:\n      --home <DIR>\n          AEX home\n\n      --json\n\n  -h, --help\n          Print help\n"
    assert undescribed(next_line) == ["--json"]


def test_every_argument_of_every_command_has_a_description():
    seen, missing = [], {}
    todo = [()] + [("daemon", "run")]  # `daemon run` is hidden from the list, not from --help
    while todo:
        path = todo.pop()
        text = help_text(*path)
        seen.append(" ".join(path) or "aex")
        if bare := undescribed(text):
            missing[" ".join(path) or "aex"] = bare
        todo.extend(path + (c,) for c in subcommands(text))
    assert len(seen) >= 20, seen
    for expected in ("agent update", "agent create", "daemon start", "models list", "mock"):
        assert expected in seen, seen
    assert not missing, f"arguments without a description: {missing}"
