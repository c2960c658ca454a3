"""Store: WAL, schema versions and migrations, transactions, durability of what was committed."""

from __future__ import annotations

import sqlite3

import pytest

from baton.scheduler import Scheduler
from baton.scheduler_errors import SchemaError, TaskValidationError, UnknownPrerequisite
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
    # A v1 store written by the v1 code path (same INSERT the scheduler uses minus later columns).
    s1 = Scheduler(TaskStore(path, migrate_to=1), clock=ManualClock())
    with s1.store.write() as c:
        c.execute(
            "INSERT INTO tasks (id, status, agent_type, source, base_priority, risk, policy, deadline_sort,"
            " estimate, static_score, max_attempts, created_at, updated_at, spec)"
            " VALUES ('old', 'pending', 'impl', 'human', 5, 'Medium', 'block', 1e18, 0, 30, 3, 1, 1, ?)",
            (b"\x80",),
        )
    s1.close()
    with TaskStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION
        assert st.conn.execute("SELECT id FROM tasks").fetchall() == [("old",)]
        assert st.conn.execute("SELECT count(*) FROM manifests").fetchone()[0] == 0


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


def test_insert_many_writes_all_null_columns_as_null(tmp_path):
    from baton.store import insert_many

    c = sqlite3.connect(tmp_path / "i.db", isolation_level=None)
    c.execute("CREATE TABLE t (a TEXT, b INTEGER DEFAULT 7, c BLOB, d REAL)")
    insert_many(c, "t", ("a", "b", "c", "d"), [("x", None, b"\x00", None), ("y", None, None, 1.5)])
    insert_many(c, "t", ("a", "b", "c", "d"), [])
    insert_many(c, "t", ("a", "b", "c", "d"), [("z", 1, b"", 0.0)])
    assert c.execute("SELECT a, b, c, d FROM t ORDER BY a").fetchall() == [
        ("x", None, b"\x00", None), ("y", None, None, 1.5), ("z", 1, b"", 0.0),
    ]
    c.close()


def test_migration_from_v2_keeps_data_and_running_claims(tmp_path):
    """v3 drops an index only; a v2 store with a running claim opens, and the claim completes."""
    path = tmp_path / "v2.db"
    clock = ManualClock()
    s2 = Scheduler(TaskStore(path, migrate_to=2), clock=clock)
    s2.enqueue_many([spec("a"), spec("b", prerequisites=["a"])])
    claim = s2.claim("impl", "w1")
    assert claim is not None and claim.task_id == "a"
    s2.close()
    s3 = Scheduler(TaskStore(path), clock=clock)
    assert s3.store.schema_version == SCHEMA_VERSION >= 3
    names = {r[0] for r in s3.store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "tasks_running_type" not in names and "tasks_running_lease" in names
    assert s3.complete("a", claim.fencing_token, {"ok": 1}) == ["b"]
    assert s3.get("a").result == {"ok": 1} and s3.status_of("b").value == "ready"
    assert s3.store.integrity_check() == "ok"
    s3.close()
