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


# ---------------------------------------------------------------------- settlements re-sent late
#
# A filter that lost the answer to a Report sends the same Report again, and keeps sending it
# while the control plane is down. These tests play that filter over gRPC (h2c, hand-encoded
# protobuf: field numbers from proto/proto/aex/v1/control.proto).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb(*fields) -> bytes:
    """A protobuf message from (field number, value): int → varint, str/bytes → length-delimited."""
    out = bytearray()
    for num, v in fields:
        if isinstance(v, bool) or isinstance(v, int):
            out += _varint(num << 3) + _varint(int(v))
        else:
            b = v.encode() if isinstance(v, str) else v
            out += _varint(num << 3 | 2) + _varint(len(b)) + b
    return bytes(out)


def pb_fields(data: bytes) -> dict:
    """Top-level varint and length-delimited fields of a message (last value wins)."""
    out, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num], i = _read_varint(data, i)
        elif wire == 2:
            n, i = _read_varint(data, i)
            out[num], i = data[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def filter_call(stack, method: str, message: bytes) -> dict:
    """One unary FilterService call as the filter makes it (its key in the metadata)."""
    import httpx

    key = (stack.home / "filter.key").read_text().strip()
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        r = c.post(
            f"http://127.0.0.1:{stack.ports['grpc']}/aex.v1.FilterService/{method}",
            content=b"\0" + len(message).to_bytes(4, "big") + message,
            headers={"content-type": "application/grpc", "te": "trailers", "x-aex-filter-key": key},
        )
    assert r.status_code == 200 and r.headers.get("grpc-status", "0") == "0", (r.headers, r.content)
    return pb_fields(r.content[5:])


def settlement(request_id, agent_id, input_tokens, output_tokens, model="test-model", lease_id="", reserved=0) -> bytes:
    return pb((1, request_id), (2, agent_id), (3, input_tokens), (4, output_tokens), (9, 200), (10, model),
              (11, "complete"), (12, lease_id), (13, reserved))


def report(stack, settlements=(), admissions=()) -> dict:
    msg = b"".join(pb((1, s)) for s in settlements) + b"".join(pb((3, a)) for a in admissions)
    r = filter_call(stack, "Report", msg)
    return {"settled": r.get(1, 0), "duplicates": r.get(2, 0)}


def age_closed_ids(stack, ms: int):
    """As if the daemon (stopped) had been down `ms` longer: ids closed and leases granted that
    much earlier (ids closed by expiry, dated ahead of the clock, are left alone)."""
    now = int(time.time() * 1000)
    with sqlite3.connect(stack.home / "aex.db") as c:
        c.execute("UPDATE closed_requests SET closed_ms = closed_ms - ? WHERE closed_ms <= ?", (ms, now))
        c.execute("UPDATE reservations SET created_ms = created_ms - ? WHERE request_id LIKE 'lease_%'", (ms,))


def test_a_settlement_re_sent_long_after_a_crash_is_not_charged_again(fresh_stack, agent_name):
    """SPEC §4: settled exactly once, idempotent by request id. Found by an audit: closed ids were
    forgotten two minutes after they closed, and the first sweep after a restart forgot them at
    once, so a Report committed just before a `kill -9` and re-sent by the filter after a restart
    more than two minutes later was charged again — an ordinary request at catalog prices (an
    overrun, the agent blocked), a leased one a second time from its still-open lease."""
    import hashlib

    s = fresh_stack
    a = s.create_agent(agent_name, "1.00", 1000)
    # An ordinary request, through Envoy: reserved by Authorize, settled by the filter.
    assert s.post(CHAT, chat("ordinary"), a["token"])[0] == 200
    s.wait_settled(agent_name)
    ordinary = s.audit(a["id"], "request.settled")[-1]
    p = ordinary["payload"]
    resend_ordinary = settlement(ordinary["request_id"], a["id"], p["input_tokens"], p["output_tokens"])
    # A request admitted and settled under a lease, as a worker does it; the lease stays open.
    token_sha256 = hashlib.sha256(a["token"].encode()).hexdigest()
    lease = filter_call(s, "Lease", pb((1, a["id"]), (2, token_sha256), (3, pb((1, 1000), (2, 16))),
                                       (4, "lease_e2e_resend")))
    assert 1 in lease, "lease granted"
    admission = pb((1, "req_e2e_leased"), (2, a["id"]), (3, "lease_e2e_resend"), (4, "test-model"),
                   (6, 100), (7, 1000), (8, 450))
    leased = settlement("req_e2e_leased", a["id"], 100, 50, lease_id="lease_e2e_resend", reserved=1000)
    assert report(s, [leased], [admission]) == {"settled": 1, "duplicates": 0}
    charged = s.agent(agent_name)
    assert charged["spent_micros"] == p["charge_micros"] + 200 and charged["reserved_micros"] > 0, charged

    def resend_after_restart():
        s.start_control_plane()
        r = report(s, [resend_ordinary, leased], [admission])
        assert r == {"settled": 0, "duplicates": 2}, r
        after = s.agent(agent_name)
        assert (after["spent_micros"], after["reserved_micros"], after["blocked_overrun"]) == (
            before["spent_micros"], before["reserved_micros"], False), (before, after)

    # 1. The control plane dies right after committing and comes back ten minutes later; the
    #    filters re-send what it never answered at once.
    before = charged
    s.kill("control-plane")
    age_closed_ids(s, 10 * 60_000)
    resend_after_restart()
    # 2. A copy that comes after newer traffic, when memory no longer holds the id: found on disk.
    assert s.post(CHAT, chat("later"), a["token"])[0] == 200
    deadline = time.time() + 10
    while (before := s.agent(agent_name))["open_reservations"] > 1 and time.time() < deadline:
        time.sleep(0.05)  # settled; only the lease stays open
    assert before["open_reservations"] == 1 and before["spent_micros"] > charged["spent_micros"], before
    s.kill("control-plane")
    resend_after_restart()

    # Nothing was recorded for the copies: one admission and one settlement each, no overrun.
    settled = [e["request_id"] for e in s.audit(a["id"], "request.settled")]
    assert settled.count(ordinary["request_id"]) == 1 and settled.count("req_e2e_leased") == 1, settled
    allowed = [e["request_id"] for e in s.audit(a["id"], "request.allowed")]
    assert allowed.count("req_e2e_leased") == 1, allowed
    assert not s.audit(a["id"], "overrun")
    r = s.aex("audit", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
