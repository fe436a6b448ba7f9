"""Memory never runs ahead of disk: the control plane answers only once SQLite has committed, and
when the database refuses a commit (another process holds its write lock longer than the busy
timeout, disk full, I/O error) the batch is retried, never dropped; if it still cannot commit
the daemon exits so that a restart reloads the ledger from disk. Either way `aex audit` passes
afterwards: an intact chain with no gap, `spent == Σ charges`, `reserved == Σ open reservations`.

test-model costs 1 µUSD per input token and 2 µUSD per output token."""

import json
import sqlite3
import time

from harness import Stack, error_code, verify_chain

CHAT = "/v1/chat/completions"
BUSY_TIMEOUT_S = 5  # the daemon's SQLite busy timeout (control-plane/src/store.rs)


def chat(text: str) -> dict:
    return {"model": "test-model", "messages": [{"role": "user", "content": text}], "max_tokens": 20}


def lock_database(stack) -> sqlite3.Connection:
    """Another connection takes the database's write lock (BEGIN IMMEDIATE) and keeps it."""
    c = sqlite3.connect(stack.home / "aex.db", timeout=10, isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    return c


def assert_consistent(stack, name: str) -> dict:
    """`aex audit` passes and the agent's ledger matches its events and open reservations."""
    r = stack.aex("audit", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    a = stack.agent(name)
    assert a["spent_micros"] == stack.settled_total(a["id"]), a
    with stack.db() as c:
        open_sum = c.execute("SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE agent_id = ?", (a["id"],)).fetchone()[0]
        assert verify_chain(c) == []
    assert a["reserved_micros"] == open_sum, (a, open_sum)
    # No event lost: every admission of the agent has its settlement.
    allowed = {e["request_id"] for e in stack.audit(a["id"], "request.allowed")}
    settled = {e["request_id"] for e in stack.audit(a["id"], "request.settled")}
    assert allowed <= settled, allowed - settled
    return a


def wait_idle(stack, name: str, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while True:
        a = stack.agent(name)
        if a["reserved_micros"] == 0 and a["open_reservations"] == 0:
            return a
        assert time.time() < deadline, f"still reserved: {a}"
        time.sleep(0.1)


def test_a_commit_blocked_by_a_lock_held_elsewhere_is_retried_not_dropped(fresh_stack, agent_name):
    """Found by an audit: with another connection holding `BEGIN IMMEDIATE` for longer than the
    busy timeout, the writer dropped the batch it could not commit while memory kept it (the
    reservation, its audit event, the chain head); the next commit then left a gap in the chain
    (`aex audit`: "sequence gap") and could leave `spent` off the sum of the logged charges."""
    s = fresh_stack
    a = s.create_agent(agent_name, "1.00", 1000)
    assert s.post(CHAT, chat("warm up"), a["token"])[0] == 200
    s.wait_settled(agent_name)
    time.sleep(3.5)  # the next request is a lone one again: decided by Authorize, not a lease
    s.clear_mock()

    lock = lock_database(s)
    locked_at = time.time()
    during = []
    try:
        # Requests while nothing can commit: refused (503, fail closed), never forwarded.
        while time.time() - locked_at < BUSY_TIMEOUT_S + 1:
            status, _, body = s.post(CHAT, chat(f"locked {len(during)}"), a["token"])
            during.append((status, error_code(body) if status != 200 else None))
        time.sleep(max(0.0, BUSY_TIMEOUT_S + 3 - (time.time() - locked_at)))
    finally:
        lock.rollback()
        lock.close()
    assert during and all(d == (503, ("api_error", "governance_unavailable")) for d in during), during
    assert s.mock_requests() == [], "nothing reaches the provider while the ledger cannot commit"

    # The daemon rode it out (no restart) and traffic resumes.
    deadline = time.time() + 15
    while (status := s.post(CHAT, chat("after the lock"), a["token"])[0]) != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert status == 200
    assert s.procs["control-plane"].poll() is None, s.log("control-plane")
    assert len(s.audit(kind="daemon.started")) == 1

    after = wait_idle(s, agent_name)
    assert after["spent_micros"] > 0
    assert_consistent(s, agent_name)
    # The refused requests cost nothing; the warm-up and the request after the lock were charged.
    charged = [e for e in s.audit(a["id"], "request.settled") if e["payload"]["charge_micros"] > 0]
    assert len(charged) == 2, charged


def test_a_database_that_stays_locked_makes_the_daemon_exit_and_a_restart_recovers(tmp_path, agent_name):
    """Past `commit_retry_secs` the daemon gives up on a batch it cannot commit and exits
    (status 74) rather than answer from memory the disk does not hold; Envoy fails closed while it
    is down, and the restarted daemon reloads a consistent ledger from the disk."""
    s = Stack(tmp_path, config_extra="[limits]\ncommit_retry_secs = 1\n")
    try:
        a = s.create_agent(agent_name, "1.00", 1000)
        assert s.post(CHAT, chat("warm up"), a["token"])[0] == 200
        s.wait_settled(agent_name)
        time.sleep(3.5)  # a lone request again: decided by Authorize
        s.clear_mock()
        lock = lock_database(s)
        try:
            status, _, body = s.post(CHAT, chat("locked"), a["token"])
            assert (status, error_code(body)) == (503, ("api_error", "governance_unavailable")), body
            # The first attempt waits out the busy timeout; past commit_retry_secs the daemon exits.
            assert s.procs["control-plane"].wait(timeout=BUSY_TIMEOUT_S + 10) == 74, s.log("control-plane")
            assert "FATAL: the database refused a commit" in s.log("control-plane")
            t0 = time.time()
            status, _, body = s.post(CHAT, chat("while down"), a["token"])
            assert (status, error_code(body)) == (503, ("api_error", "governance_unavailable")), body
            assert time.time() - t0 < 6
        finally:
            lock.rollback()
            lock.close()
        assert s.mock_requests() == [], "nothing reaches the provider while governance is down"

        s.start_control_plane()
        deadline = time.time() + 15
        while (status := s.post(CHAT, chat("after the restart"), a["token"])[0]) != 200 and time.time() < deadline:
            time.sleep(0.2)
        assert status == 200
        wait_idle(s, agent_name)
        assert len(s.audit(kind="daemon.started")) == 2
        assert_consistent(s, agent_name)
        charged = [e for e in s.audit(a["id"], "request.settled") if e["payload"]["charge_micros"] > 0]
        assert len(charged) == 2, charged
    finally:
        s.stop()
