"""The durable task store: SQLite in WAL mode, a versioned schema with migrations, explicit transactions.

This module owns the connection, the schema and the two tables the scheduler persists through: ``journal``
(one entry appended per change) and ``snapshot`` (record images as of the journal floor).  What the entries
mean is the scheduler's business (scheduler.py, taskstate.py); it runs every change inside one ``write()``.

Concurrency model.  One ``TaskStore`` per thread or process (a sqlite3 connection must not be shared across
threads).  Writers take SQLite's RESERVED lock up front with ``BEGIN IMMEDIATE``, so read-modify-write
sequences ("apply the others' entries, pick the best ready task, append a claim") are serialised between every
connection on the file, threads and processes alike, which is what makes claims atomic.  Readers never block
writers (WAL).

Durability.  ``synchronous=FULL`` in WAL mode fsyncs the log on every commit, so a committed transaction
survives SIGKILL and power loss; NORMAL survives SIGKILL.  Group commit is explicit: the batch APIs
(enqueue_many, claim_many, complete_many) commit once per batch.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from baton.scheduler_errors import SchemaError, StoreBusy
from baton.taskstate import IMAGE_FIELDS, pack_values, unpack_values

__all__ = ["TaskStore", "TaskRepository", "SCHEMA_VERSION", "MIGRATIONS"]

log = logging.getLogger("baton.store")

# Each entry upgrades the schema from (version - 1) to version.  Never edit a released entry: add a new one.
# A migration is an SQL script, or the name of a function in _PYTHON_MIGRATIONS when rows must be rewritten.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO meta(key, value) VALUES ('fence', 0);

        CREATE TABLE tasks (
            seq              INTEGER PRIMARY KEY,      -- insertion order, the last tie-break of dispatch order
            id               TEXT NOT NULL UNIQUE,
            status           TEXT NOT NULL,
            agent_type       TEXT NOT NULL,
            source           TEXT NOT NULL,
            base_priority    INTEGER NOT NULL,
            risk             TEXT NOT NULL,
            policy           TEXT NOT NULL,            -- what to do when a prerequisite fails/cancels
            deadline         REAL,                     -- unix seconds
            deadline_sort    REAL NOT NULL,            -- deadline, or a huge value: tie-break in the index
            estimate         REAL NOT NULL,            -- seconds (0 when not given)
            depth            INTEGER NOT NULL DEFAULT 0,  -- longest chain of dependents below this task
            static_score     REAL NOT NULL,            -- time-independent part of the priority
            rank             REAL NOT NULL DEFAULT 0,  -- dispatch key, see priority.py
            unmet            INTEGER NOT NULL DEFAULT 0,  -- prerequisites not yet satisfied
            attempts         INTEGER NOT NULL DEFAULT 0,
            max_attempts     INTEGER NOT NULL,
            timeout          REAL,
            idempotency_key  TEXT UNIQUE,
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL,
            ready_at         REAL,
            started_at       REAL,
            finished_at      REAL,
            not_before       REAL NOT NULL DEFAULT 0,  -- retry backoff: not claimable before this
            lease_holder     TEXT,
            lease_expires_at REAL,
            fencing_token    INTEGER NOT NULL DEFAULT 0,
            blocked_reason   TEXT,
            spec             BLOB NOT NULL,            -- the submission, msgpack, as given
            input            BLOB,                     -- payload blobs: see models.encode_payload
            result           BLOB,
            error            TEXT,
            history          BLOB,                     -- msgpack list of attempt records
            criteria_done    BLOB,
            requeued_from    TEXT,
            requeued_as      TEXT
        );
        -- Dispatch order: the claim query walks this index from the top.
        CREATE INDEX tasks_ready ON tasks(agent_type, rank DESC, deadline_sort, seq) WHERE status = 'ready';
        CREATE INDEX tasks_ready_deadline ON tasks(seq) WHERE status = 'ready' AND deadline IS NOT NULL;
        CREATE INDEX tasks_running_type ON tasks(agent_type) WHERE status = 'running';
        CREATE INDEX tasks_running_lease ON tasks(lease_expires_at) WHERE status = 'running';

        CREATE TABLE deps (
            task_id   TEXT NOT NULL,   -- the dependent
            prereq_id TEXT NOT NULL,   -- must be satisfied before task_id may run
            PRIMARY KEY (task_id, prereq_id)
        ) WITHOUT ROWID;
        CREATE INDEX deps_prereq ON deps(prereq_id, task_id);
        """,
    ),
    (
        2,
        """
        CREATE TABLE manifests (
            manifest_id TEXT PRIMARY KEY,
            hash        TEXT NOT NULL,
            imported_at REAL NOT NULL,
            task_ids    BLOB NOT NULL,     -- msgpack list, in manifest order
            document    BLOB NOT NULL      -- the manifest bytes as given
        ) WITHOUT ROWID;
        ALTER TABLE tasks ADD COLUMN manifest_id TEXT;
        """,
    ),
    (
        3,
        # Every claim and completion paid for this index (an entry added, then removed).  Running tasks are
        # few (WIP limits), so counting them per agent_type over tasks_running_lease is just as fast.
        """
        DROP INDEX tasks_running_type;
        """,
    ),
    (4, "snapshot_and_journal"),  # a Python step: see _to_snapshot_and_journal
)

SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

# Fencing tokens reserved per meta update (TaskStore.next_fence).  Gaps are harmless: tokens only need to
# grow; 2**63 / 1024 blocks is more than any daemon will ever reserve.
FENCE_BLOCK: Final = 1024

class TaskRepository(Protocol):
    """What the scheduler needs from storage: transactions, the fence counter, the snapshot and the journal."""

    path: str

    def write(self, *, deferred: bool = False) -> AbstractContextManager[sqlite3.Connection]: ...

    def read(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def next_fence(self, c: sqlite3.Connection) -> int: ...

    def fence_durable(self, token: int) -> bool: ...

    def data_version(self) -> int: ...

    def snapshot(self, c: sqlite3.Connection) -> Iterator[Any]: ...

    def journal_floor(self, c: sqlite3.Connection) -> int: ...

    def journal_after(self, c: sqlite3.Connection, seq: int) -> list[tuple[int, bytes]]: ...

    def append(self, c: sqlite3.Connection, entry: bytes) -> int: ...

    def checkpoint(self, c: sqlite3.Connection, chunks: Sequence[bytes], upto: int) -> None: ...

    def close(self) -> None: ...


Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


class TaskStore:
    """One connection to a task database file (``":memory:"`` works for single-connection tests)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 30.0,
        migrate_to: int = SCHEMA_VERSION,
        exclusive: bool = False,
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.path = str(path)
        # exclusive: this connection is the file's only user for as long as it is open (the daemon owns its
        # state).  SQLite then keeps its lock and the WAL index in this process instead of taking file locks
        # on every transaction (a BEGIN..COMMIT costs about a quarter less), nobody else can commit
        # (data_version is constant), and write(deferred=True) may issue its BEGIN when the first statement
        # needs it.
        self.exclusive = exclusive
        self._begin_pending = False
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; the sqlite3 module's implicit transactions
        # would otherwise start DEFERRED transactions that can deadlock on lock upgrade between processes.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=True
        )
        self._depth = 0
        # Fencing tokens come from a block reserved in meta (see next_fence).  _fence_next.._fence_end is the
        # block in use; _fence_committed the end of the last block whose reservation committed; _fence_dv the
        # data_version the block was reserved under; _dv the last data_version read in this transaction.
        self._fence_next = 1
        self._fence_end = 0
        self._fence_committed = 0
        self._fence_pending = 0  # a reservation made by the open transaction (0: none)
        self._fence_dv = -1
        self._dv = -2
        self._dv_read = False
        try:
            self._setup(synchronous, busy_timeout_s, migrate_to)
        except sqlite3.OperationalError as exc:
            self.close()
            if exclusive and "locked" in str(exc):
                raise StoreBusy(
                    f"the task store {self.path} is in use by another process ({exc}); stop the other baton "
                    "daemon that uses this state directory, or give this one its own (--state-dir)"
                ) from exc
            raise

    def _setup(self, synchronous: Synchronous, busy_timeout_s: float, migrate_to: int) -> None:
        c = self.conn
        if self.exclusive:
            # No waiting: whoever holds the file holds it until it closes.  Then, before journal_mode: a WAL
            # entered in exclusive mode keeps its index in heap memory, not in a -shm file.
            c.execute("PRAGMA busy_timeout = 0")
            c.execute("PRAGMA locking_mode = EXCLUSIVE")
        else:
            c.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:":
            raise SchemaError(f"could not enable WAL on {self.path} (journal_mode={mode})")
        c.execute(f"PRAGMA synchronous = {synchronous}")
        c.execute("PRAGMA foreign_keys = OFF")  # integrity is enforced by the scheduler inside transactions
        c.execute("PRAGMA temp_store = MEMORY")
        self._migrate(migrate_to)
        if self.exclusive:
            # A write now, so the lock is taken (and kept) at open rather than at the first transaction.
            with self.write() as w:
                w.execute("UPDATE meta SET value = value WHERE key = 'fence'")

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("task store is closed")
        return self._conn

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # leak guard only; close() is the API
        if getattr(self, "_conn", None) is not None:
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    # --- transactions ------------------------------------------------------------------------------------

    @contextmanager
    def write(self, *, deferred: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE).  Re-entrant: nested uses join the outer transaction.

        ``deferred`` (exclusive stores only, else ignored): BEGIN is issued when the first of this store's own
        statements needs it (next_fence, append, checkpoint), and a transaction that wrote nothing issues
        none.  Nothing else may run statements on the yielded connection: they would autocommit on their
        own.  The caller does its work in memory first and its SQL last (the coordinator's turn sends its
        TASK frames before any SQL)."""
        with self._transaction("BEGIN IMMEDIATE", rollback_on_error=True, deferred=deferred and self.exclusive) as c:
            yield c

    def _begin(self, c: sqlite3.Connection) -> None:
        """Issue a deferred transaction's BEGIN before its first statement."""
        if self._begin_pending:
            self._begin_pending = False
            c.execute("BEGIN IMMEDIATE")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several SELECTs."""
        with self._transaction("BEGIN", rollback_on_error=False) as c:
            yield c

    @contextmanager
    def _transaction(self, begin: str, rollback_on_error: bool, deferred: bool = False
                     ) -> Iterator[sqlite3.Connection]:
        c = self.conn
        if self._depth:  # nested: the outer transaction commits or rolls back for both
            self._depth += 1
            try:
                yield c
            finally:
                self._depth -= 1
            return
        if deferred:
            self._begin_pending = True  # _begin issues it before the first statement
        else:
            c.execute(begin)
        self._depth = 1
        self._dv_read = False
        try:
            yield c
        except BaseException:
            self._depth = 0
            if self._begin_pending:  # no statement ran: nothing to end
                self._begin_pending = False
            else:
                c.execute("ROLLBACK" if rollback_on_error else "COMMIT")
                self._end_fence_txn(committed=not rollback_on_error)
            raise
        self._depth = 0
        if self._begin_pending:
            self._begin_pending = False
            return
        try:
            c.execute("COMMIT")
        except BaseException:
            self._end_fence_txn(committed=False)
            raise
        self._end_fence_txn(committed=True)

    def _end_fence_txn(self, *, committed: bool) -> None:
        if not self._fence_pending:
            return
        if committed:
            self._fence_committed = max(self._fence_committed, self._fence_pending)
        else:  # the reservation was rolled back: never hand out more of that block
            self._fence_next = self._fence_end + 1
        self._fence_pending = 0

    # --- schema ------------------------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, target: int) -> None:
        c = self.conn
        if c.execute("PRAGMA user_version").fetchone()[0] >= target:
            self._check_version()
            return
        # IMMEDIATE (write()): two processes opening a fresh file at once must not both run the migrations.
        with self.write():
            current = int(c.execute("PRAGMA user_version").fetchone()[0])
            if current == 0 and c.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]:
                raise SchemaError(f"{self.path} is not a baton task store (it has tables but no schema version)")
            for version, script in MIGRATIONS:
                if current < version <= target:
                    log.info("migrating %s to schema version %d", self.path, version)
                    if script in _PYTHON_MIGRATIONS:
                        _PYTHON_MIGRATIONS[script](c)
                    else:
                        for stmt in _statements(script):
                            c.execute(stmt)
                    c.execute(f"PRAGMA user_version = {version}")
                    current = version
        self._check_version()

    def _check_version(self) -> None:
        v = self.schema_version
        if v > SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has schema version {v}; this baton supports up to {SCHEMA_VERSION}")

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    def next_fence(self, c: sqlite3.Connection) -> int:
        """A fencing token strictly greater than every token handed out before, by this connection or any
        other, even across a crash (call inside write()).

        Tokens come from a block of FENCE_BLOCK numbers reserved with one ``UPDATE meta ... RETURNING``:
        meta's ``fence`` holds the end of the last block reserved, so a restart resumes above it and never
        reissues a token.  The block is used only while no other connection has committed since it was
        reserved (data_version unchanged); otherwise a fresh block is reserved, above whatever the other
        connection took, so tokens grow in commit order across connections too."""
        if not self._dv_read:
            self.data_version()
        if self._fence_next > self._fence_end or self._fence_dv != self._dv:
            self._begin(c)
            row = c.execute(
                "UPDATE meta SET value = value + ? WHERE key = 'fence' RETURNING value", (FENCE_BLOCK,)
            ).fetchone()
            self._fence_end = int(row[0])
            self._fence_next = self._fence_end - FENCE_BLOCK + 1
            self._fence_pending = self._fence_end
            self._fence_dv = self._dv
        token = self._fence_next
        self._fence_next += 1
        return token

    def fence_durable(self, token: int) -> bool:
        """Was ``token`` taken from a block whose reservation is committed?  Then no restart can hand it out
        again, whatever happens to the transaction that issued it: it may be announced before that commits."""
        return token <= self._fence_committed

    # --- snapshot + journal --------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever *another* connection commits (PRAGMA data_version): a cheap "anything new?"."""
        if self.exclusive:
            return 0  # no other connection can commit
        dv = int(self.conn.execute("PRAGMA data_version").fetchone()[0])
        if self._depth:
            self._dv = dv
            self._dv_read = True
        return dv

    def snapshot(self, c: sqlite3.Connection) -> Iterator[Any]:
        """Every record image of the snapshot, chunk by chunk (a later image of a record supersedes an
        earlier one)."""
        for (blob,) in c.execute("SELECT images FROM snapshot ORDER BY chunk"):
            yield from unpack_values(blob)

    def journal_floor(self, c: sqlite3.Connection) -> int:
        """Journal entries up to this seq are folded into the snapshot (and deleted)."""
        return int(c.execute("SELECT value FROM meta WHERE key = 'journal_floor'").fetchone()[0])

    def journal_after(self, c: sqlite3.Connection, seq: int) -> list[tuple[int, bytes]]:
        return c.execute("SELECT seq, entry FROM journal WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    def append(self, c: sqlite3.Connection, entry: bytes) -> int:
        """Append one journal entry (call inside write()); returns its seq."""
        self._begin(c)
        return int(c.execute("INSERT INTO journal (entry) VALUES (?) RETURNING seq", (entry,)).fetchone()[0])

    def checkpoint(self, c: sqlite3.Connection, chunks: Sequence[bytes], upto: int) -> None:
        """Replace the snapshot with ``chunks`` (msgpack arrays of record images) that reflect the journal up
        to ``upto``, and drop those entries (call inside write())."""
        self._begin(c)
        c.execute("DELETE FROM snapshot")
        c.executemany("INSERT INTO snapshot (images) VALUES (?)", [(b,) for b in chunks])
        # Usually every entry goes: without a WHERE clause SQLite frees the table's pages in bulk instead of
        # visiting each row's overflow chain.
        last = c.execute("SELECT max(seq) FROM journal").fetchone()[0]
        c.execute("DELETE FROM journal" if last == upto else f"DELETE FROM journal WHERE seq <= {int(upto)}")
        c.execute("UPDATE meta SET value = ? WHERE key = 'journal_floor'", (upto,))


def _to_snapshot_and_journal(c: sqlite3.Connection) -> None:
    """v4: the scheduler keeps its state in memory and the store keeps record images (the snapshot, in
    chunks) plus an append-only journal of the changes since.  Rewrites every v3 row as an image."""
    c.execute("CREATE TABLE snapshot (chunk INTEGER PRIMARY KEY, images BLOB NOT NULL)")
    # AUTOINCREMENT: a seq is never reused after a checkpoint empties the table (readers track the last seq).
    c.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry BLOB NOT NULL)")
    c.execute("INSERT INTO meta (key, value) VALUES ('journal_floor', 0)")
    prereqs: dict[str, list[str]] = {}
    for tid, p in c.execute("SELECT task_id, prereq_id FROM deps"):
        prereqs.setdefault(tid, []).append(p)
    rows = c.execute(
        "SELECT seq, id, status, agent_type, source, base_priority, risk, policy, deadline, estimate, depth,"
        " unmet, attempts, max_attempts, timeout, idempotency_key, created_at, updated_at, ready_at, started_at,"
        " finished_at, not_before, lease_holder, lease_expires_at, fencing_token, blocked_reason, spec, input,"
        " result, error, history, criteria_done, requeued_from, requeued_as, manifest_id FROM tasks"
    ).fetchall()
    images = []
    blobs = (IMAGE_FIELDS.index("history"), IMAGE_FIELDS.index("criteria_done"))  # msgpack columns in v3
    for r in rows:  # the columns above are IMAGE_FIELDS in order, prerequisites last
        img = list(r)
        for k in blobs:
            img[k] = unpack_values(r[k]) if r[k] is not None else ()
        img.append(tuple(sorted(prereqs.get(r[1], []))))
        images.append(img)
    if images:
        c.execute("INSERT INTO snapshot (images) VALUES (?)", (pack_values(images),))
    c.execute("DROP TABLE tasks")
    c.execute("DROP TABLE deps")


_PYTHON_MIGRATIONS: Final[dict[str, Callable[[sqlite3.Connection], None]]] = {
    "snapshot_and_journal": _to_snapshot_and_journal,
}


def _statements(script: str) -> Iterable[str]:
    # executescript() would COMMIT our transaction; split instead (the scripts hold no ';' inside literals).
    for part in script.split(";"):
        lines = [ln for ln in part.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        if lines:
            yield "\n".join(lines)
