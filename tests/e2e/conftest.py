"""Fixtures: one shared stack per test session for tests that only add agents, and a fresh
stack for tests that kill or reconfigure processes."""

import itertools

import pytest

from harness import Stack

_names = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("shared"))
    yield s
    s.stop()


@pytest.fixture
def fresh_stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def agent_name(request):
    """A unique agent name per test, readable in audit logs."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"{base}-{next(_names)}"
