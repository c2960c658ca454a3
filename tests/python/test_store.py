"""Store: WAL, schema versions and migrations, transactions, durability of what was committed."""

from __future__ import annotations

import sqlite3

import msgpack
import pytest

from baton.scheduler import Scheduler
from baton.scheduler_errors import SchemaError, StoreBusy, TaskValidationError, UnknownPrerequisite
from baton.store import MIGRATIONS, SCHEMA_VERSION, TaskStore
from scheduler_fixtures import ManualClock, make, spec


def test_fresh_store_is_wal_and_current(tmp_path):
    with TaskStore(tmp_path / "t.db") as st:
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert st.schema_version == SCHEMA_VERSION >= 2
        assert st.integrity_check() == "ok"


def test_migration_from_v1_keeps_data(tmp_path):
    path = tmp_path / "old.db"
    with TaskStore(path, migrate_to=1) as st:
        assert st.schema_version == 1
        cols = {r[1] for r in st.conn.execute("PRAGMA table_info(tasks)")}
        assert "manifest_id" not in cols
        # A v1 row as the v1 scheduler wrote it (the spec blob held every TaskSpec field but id and input).
        spec_v1 = msgpack.packb({
            "summary": "from v1", "description": "", "agent_type": "impl", "source": "human", "base_priority": 5,
            "prerequisites": [], "deadline": None, "estimated_duration_s": None, "max_attempts": 3,
            "timeout_s": None, "idempotency_key": None, "risk": "Medium", "acceptance_criteria": [["ac", "ok"]],
            "file_scope": [], "conflicts_with": [], "on_prerequisite_failure": None, "metadata": {"k": 1},
        })
        with st.write() as c:
            c.execute(
                "INSERT INTO tasks (id, status, agent_type, source, base_priority, risk, policy, deadline_sort,"
                " estimate, static_score, max_attempts, created_at, updated_at, ready_at, spec, input)"
                " VALUES ('old', 'ready', 'impl', 'human', 5, 'Medium', 'block', 1e18, 0, 30, 3, 1, 1, 1, ?, ?)",
                (spec_v1, b"\x01raw"),
            )
    s = Scheduler(path, clock=ManualClock())
    assert s.store.schema_version == SCHEMA_VERSION
    tables = {r[0] for r in s.store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"snapshot", "journal", "manifests"} <= tables and "tasks" not in tables
    t = s.get("old")
    assert (t.summary, t.status.value, t.input, t.metadata) == ("from v1", "ready", b"raw", {"k": 1})
    assert t.acceptance_criteria[0].text == "ok"
    claim = s.claim("impl", "w")
    assert claim is not None and claim.task_id == "old"
    s.close()


def test_migrations_are_consecutive():
    assert [v for v, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "new.db"
    TaskStore(path).close()
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(SchemaError, match="schema version"):
        TaskStore(path)


def test_foreign_database_refused(tmp_path):
    path = tmp_path / "other.db"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE something (x)")
    c.commit()
    c.close()
    with pytest.raises(SchemaError, match="not a baton task store"):
        TaskStore(path)


def test_failed_transaction_leaves_nothing(tmp_path):
    with TaskStore(tmp_path / "t.db") as st:
        with pytest.raises(RuntimeError):
            with st.write() as c:
                c.execute("UPDATE meta SET value = 99 WHERE key = 'fence'")
                raise RuntimeError("boom")
        assert st.conn.execute("SELECT value FROM meta WHERE key = 'fence'").fetchone()[0] == 0
        assert not st.conn.in_transaction


def test_rejected_batch_stores_nothing(tmp_path):
    s = make(tmp_path)
    s.enqueue(spec("a"))
    with pytest.raises(UnknownPrerequisite):
        s.enqueue_many([spec("b"), spec("c", prerequisites=["nope"])])
    with pytest.raises(TaskValidationError):
        s.enqueue_many([spec("d"), {"summary": "x"}])
    assert [t.id for t in s.tasks()] == ["a"]


def test_committed_state_survives_reopen_exactly(tmp_path):
    clock = ManualClock()
    payload = {"b": [1, 2.25, {"k": b"\x00\x01"}], "a": "\u00fc", "n": None}
    s = make(tmp_path, clock)
    s.enqueue(spec("a", input=payload, acceptance_criteria=[{"id": "ac1", "text": "works"}],
                   file_scope=["src/x.py"], metadata={"phase": 2}))
    c = s.claim("impl", "w")
    s.complete(c.task_id, c.fencing_token, result=b"\xffraw")
    s.close()
    s2 = make(tmp_path, clock)
    t = s2.get("a")
    assert t.input == payload and list(t.input) == ["b", "a", "n"]
    assert t.result == b"\xffraw" and type(t.result) is bytes
    assert t.status.value == "completed" and t.attempts == 1
    assert t.acceptance_criteria[0].text == "works" and t.file_scope == ["src/x.py"]
    assert t.metadata == {"phase": 2}
    s2.close()


def test_fencing_tokens_grow_across_connections(tmp_path):
    s1 = make(tmp_path)
    s2 = make(tmp_path)
    s1.enqueue_many([spec("a"), spec("b")])
    c1 = s1.claim("impl", "w1")
    c2 = s2.claim("impl", "w2")
    assert c1 and c2 and c2.fencing_token > c1.fencing_token
    s1.close()
    s2.close()


def test_closed_store_raises(tmp_path):
    st = TaskStore(tmp_path / "t.db")
    st.close()
    with pytest.raises(RuntimeError, match="closed"):
        st.conn


def test_migration_from_v2_keeps_data_and_running_claims(tmp_path):
    """A v2 store with a running claim is rewritten as a snapshot (v4); the claim still completes."""
    path = tmp_path / "v2.db"
    clock = ManualClock()
    spec_v2 = msgpack.packb({"summary": "s", "agent_type": "impl", "prerequisites": [], "acceptance_criteria": []})
    with TaskStore(path, migrate_to=2) as st, st.write() as c:
        # What the v2 scheduler left behind: 'a' claimed by w1 under token 1, 'b' waiting on it.
        c.execute("UPDATE meta SET value = 1 WHERE key = 'fence'")
        c.execute(
            "INSERT INTO tasks (id, status, agent_type, source, base_priority, risk, policy, deadline_sort,"
            " estimate, static_score, max_attempts, created_at, updated_at, ready_at, started_at, attempts,"
            " lease_holder, lease_expires_at, fencing_token, unmet, spec) VALUES"
            " ('a', 'running', 'impl', 'human', 5, 'Medium', 'block', 1e18, 0, 30, 3, 1, 1, 1, ?1, 1, 'w1', ?2, 1, 0, ?3),"
            " ('b', 'pending', 'impl', 'human', 5, 'Medium', 'block', 1e18, 0, 30, 3, 1, 1, NULL, NULL, 0, NULL, NULL,"
            "  0, 1, ?3)",
            (clock(), clock() + 60, spec_v2),
        )
        c.execute("INSERT INTO deps (task_id, prereq_id) VALUES ('b', 'a')")
    s3 = Scheduler(TaskStore(path), clock=clock)
    assert s3.store.schema_version == SCHEMA_VERSION >= 4
    assert s3.get("a").lease_holder == "w1" and s3.get("b").status.value == "pending"
    assert s3.complete("a", 1, {"ok": 1}) == ["b"]
    assert s3.get("a").result == {"ok": 1} and s3.status_of("b").value == "ready"
    assert s3.store.integrity_check() == "ok"
    s3.close()


def _snapshot(s: Scheduler) -> list[dict]:
    return [t.model_dump() for t in s.tasks()]


def _churn(s: Scheduler, clock: ManualClock) -> None:
    """A bit of everything: dependents, claims, completions, a retry, a dead letter, a cascade."""
    s.enqueue_many([spec(f"t{i}", prerequisites=[f"t{i - 3}"] if i >= 3 else []) for i in range(12)])
    for _ in range(3):
        cs = s.claim_many("impl", "w", 2)
        s.complete_many([(c.task_id, c.fencing_token, {"by": c.task_id}) for c in cs[:1]])
        for c in cs[1:]:
            s.fail(c.task_id, c.fencing_token, "flaky")
        clock.advance(5)
    s.cancel("t11")
    c = s.claim("impl", "w")
    assert c is not None
    s.fail(c.task_id, c.fencing_token, "broken", transient=False)


@pytest.mark.parametrize("compacting", [True, False], ids=["snapshot+journal", "journal-only"])
def test_reopen_rebuilds_every_task_exactly(tmp_path, compacting):
    clock = ManualClock()
    cfg = {"compact_min_bytes": 0, "compact_ratio": 1.0} if compacting else {}
    s = make(tmp_path, clock, wip_per_agent_type=None, **cfg)
    _churn(s, clock)
    before = _snapshot(s)
    floor = s.store.journal_floor(s.store.conn)
    left = s.store.conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    if compacting:
        assert floor > 0 and left < floor  # compactions happened and truncated the journal
    else:
        assert floor == 0 and s.store.conn.execute("SELECT count(*) FROM snapshot").fetchone()[0] == 0
    s.close()
    s2 = make(tmp_path, clock, wip_per_agent_type=None)
    assert _snapshot(s2) == before
    s2.close()


def test_two_schedulers_on_one_store_see_each_other(tmp_path):
    clock = ManualClock()
    s1 = make(tmp_path, clock, wip_per_agent_type=None)
    s2 = make(tmp_path, clock, wip_per_agent_type=None)
    s1.enqueue_many([spec("a"), spec("b"), spec("c", prerequisites=["a"])])
    assert s2.status_of("a").value == "ready"  # a read catches up
    ca = s2.claim("impl", "w2")
    assert ca is not None and ca.task_id == "a"
    cb = s1.claim("impl", "w1")  # s1 learns of s2's claim before deciding
    assert cb is not None and cb.task_id == "b"
    assert s1.complete("a", ca.fencing_token, "done by s1") == ["c"]
    # s1 has compacted past what s2 has seen: s2 reloads from the snapshot instead of missing entries.
    s1.enqueue_many([spec(f"x{i}") for i in range(10)])
    s1.compact()
    assert s1.store.journal_floor(s1.store.conn) > s2._applied
    assert s2.get("a").result == "done by s1" and s2.status_of("c").value == "ready"
    assert _snapshot(s2) == _snapshot(s1)
    s1.close()
    s2.close()


def test_failed_transaction_leaves_memory_and_store_unchanged(tmp_path):
    s = make(tmp_path)
    s.enqueue(spec("a"))
    with pytest.raises(RuntimeError, match="boom"):
        with s.transaction():
            s.enqueue(spec("b"))
            claim = s.claim("impl", "w")
            assert claim is not None
            raise RuntimeError("boom")
    assert [t.id for t in s.tasks()] == ["a"] and s.status_of("a").value == "ready"
    s.close()
    s2 = make(tmp_path)
    assert [t.id for t in s2.tasks()] == ["a"] and s2.status_of("a").value == "ready"
    s2.close()


def test_normal_task_flow_never_compacts_but_churn_does(tmp_path):
    """Enqueue -> claim -> complete writes each task once (image + two deltas): no compaction however many
    tasks go through.  Heartbeats rewrite the same records: their superseded images trigger compaction."""
    clock = ManualClock()
    s = make(tmp_path, clock, wip_per_agent_type=None, compact_min_bytes=0, compact_ratio=2.0)
    floor = lambda: s.store.journal_floor(s.store.conn)  # noqa: E731
    for k in range(20):
        s.enqueue_many([spec(f"t{k}-{i}") for i in range(10)])
        cs = s.claim_many("impl", "w", 10)
        s.complete_many([(c.task_id, c.fencing_token, k) for c in cs])
    assert floor() == 0
    s.enqueue_many([spec("long1"), spec("long2")])
    claims = s.claim_many("impl", "w", 2)
    for _ in range(400):
        for c in claims:
            s.heartbeat(c.task_id, c.fencing_token)
        clock.advance(1)
        if floor():
            break
    assert floor() > 0 and s.store.conn.execute("SELECT count(*) FROM snapshot").fetchone()[0] == 1
    before = _snapshot(s)
    s.close()
    s2 = make(tmp_path, clock, wip_per_agent_type=None)
    assert _snapshot(s2) == before
    s2.close()


# --- fencing tokens from reserved blocks (store.next_fence, FENCE_BLOCK) ------------------------------------


def test_fence_block_one_update_per_block_and_durability(tmp_path):
    from baton.store import FENCE_BLOCK

    with TaskStore(tmp_path / "f.db") as st:
        with st.write() as c:
            t1 = st.next_fence(c)
            t2 = st.next_fence(c)
            assert t2 == t1 + 1
            assert not st.fence_durable(t1)  # its block's reservation is not committed yet
        assert st.fence_durable(t2)
        assert st.conn.execute("SELECT value FROM meta WHERE key = 'fence'").fetchone()[0] == FENCE_BLOCK
        with st.write() as c:
            t3 = st.next_fence(c)
            assert t3 == t2 + 1 and st.fence_durable(t3)  # same block: no statement, already durable
        # a rolled-back reservation is never used again
        with pytest.raises(RuntimeError):
            with st.write() as c:
                for _ in range(FENCE_BLOCK):
                    last = st.next_fence(c)
                assert not st.fence_durable(last)
                raise RuntimeError("boom")
        with st.write() as c:
            t4 = st.next_fence(c)
        assert t4 > t3 and t4 == FENCE_BLOCK + 1  # the rolled-back block was reserved again, none of it issued


def test_fence_tokens_grow_in_commit_order_across_connections(tmp_path):
    a = TaskStore(tmp_path / "f.db")
    b = TaskStore(tmp_path / "f.db")
    seen = []
    for i in range(50):
        st = a if i % 3 else b
        with st.write() as c:
            st.data_version()
            seen.append(st.next_fence(c))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    a.close()
    b.close()


CRASH_CLAIMER = """
import os, sys
from baton.scheduler import Scheduler, SchedulerConfig
sch = Scheduler(sys.argv[1], config=SchedulerConfig(wip_per_agent_type=None))
sch.enqueue_many([{"id": f"t{i}", "summary": "s", "agent_type": "x"} for i in range(200)])
for i in range(150):  # committed claims: each prints its token
    c = sch.claim("x", "w")
    print(c.fencing_token, flush=True)
with sch.transaction():  # a claim whose token is announced before its commit, then the process dies
    c = sch.claim("x", "w")
    print(c.fencing_token, "durable" if sch.store.fence_durable(c.fencing_token) else "pending", flush=True)
    os.kill(os.getpid(), 9)
"""


def test_restart_never_reissues_a_token_announced_before_a_crash(tmp_path):
    """Push before commit (docs/daemon.md): a token handed out (and maybe pushed) inside a transaction that
    never committed is still below every token a restarted store issues."""
    import subprocess
    import sys

    db = tmp_path / "c.db"
    proc = subprocess.run([sys.executable, "-c", CRASH_CLAIMER, str(db)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    lines = proc.stdout.split("\n")
    tokens = [int(ln.split()[0]) for ln in lines if ln.strip()]
    assert lines[-2].endswith("durable")  # the coordinator would have pushed it before the commit
    from baton.scheduler import SchedulerConfig

    sch = Scheduler(db, config=SchedulerConfig(wip_per_agent_type=None))
    assert sch.count("running") == 150  # the last claim was lost with its transaction
    fresh = [sch.claim("x", "w2") for _ in range(3)]
    assert all(c is not None and c.fencing_token > max(tokens) for c in fresh)
    sch.close()


def test_exclusive_store_is_refused_to_a_second_user(tmp_path):
    """An exclusive store (the daemon's) keeps SQLite's lock while open: another exclusive open fails at once
    with StoreBusy rather than after its busy timeout; closing releases the file."""
    path = tmp_path / "x.db"
    first = TaskStore(path, exclusive=True)
    with pytest.raises(StoreBusy, match="in use by another process"):
        TaskStore(path, exclusive=True, busy_timeout_s=600)  # would hang for 10 minutes if it waited
    first.close()
    TaskStore(path, exclusive=True).close()


def test_deferred_transaction_runs_its_sql_last(tmp_path):
    """write(deferred=True) on an exclusive store: the scheduler's changes happen in memory first (the
    coordinator sends the claimed tasks then) and the transaction's statements run at its end."""
    st = TaskStore(tmp_path / "d.db", exclusive=True)
    s = Scheduler(st, clock=ManualClock())
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"])])
    first = s.claim("impl", "w")  # reserves a fence block, committed with this claim
    assert first is not None and st.fence_durable(first.fencing_token)
    with s.transaction(deferred=True):
        s.complete(first.task_id, first.fencing_token, result=1)
        picked = s.claim_records("impl", "w", 5)
        assert [r.id for r in picked] == ["b"] and picked[0].token > first.fencing_token
        assert not st.conn.in_transaction  # nothing has touched SQLite yet
        assert st.fence_durable(picked[0].token)  # so the task could be announced already
    assert not st.conn.in_transaction
    with s.transaction(deferred=True):  # changes nothing: no statement at all
        assert s.status_of("b").value == "running"
    with pytest.raises(RuntimeError, match="boom"):
        with s.transaction(deferred=True):
            s.enqueue(spec("c"))
            raise RuntimeError("boom")
    assert [t.id for t in s.tasks()] == ["a", "b"]  # memory reloaded from the store
    s.close()
    again = Scheduler(TaskStore(tmp_path / "d.db", exclusive=True), clock=ManualClock())
    assert again.status_of("a").value == "completed" and again.get("a").result == 1
    b = again.get("b")
    assert b.status.value == "running" and b.fencing_token == picked[0].token
    assert [t.id for t in again.tasks()] == ["a", "b"]
    again.close()


def test_deferred_is_ignored_on_a_shared_store(tmp_path):
    """Without exclusive, other connections may commit: the transaction must begin (and catch up) first."""
    s = make(tmp_path)
    with s.transaction(deferred=True):
        assert s.store.conn.in_transaction
    s.close()
