"""The scheduler: task graph rules on top of the store.

Every public method that changes anything runs in exactly one write transaction, so a crash leaves either the
whole change or none of it.  Batch methods (enqueue_many, claim_many, complete_many) are the group commit: one
transaction and one fsync per batch.

Time comes from an injectable ``clock`` (unix seconds) so that leases, backoff, deadlines and aging are
testable without sleeping; jitter comes from an injectable ``random.Random``.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import msgpack
from pydantic import TypeAdapter

from baton import priority as prio
from baton.models import (
    TERMINAL,
    AttemptRecord,
    BatchOutcome,
    CancelResult,
    Claim,
    DependentPolicy,
    EnqueueResult,
    ExecutionPlan,
    FailOutcome,
    PriorityBreakdown,
    Status,
    Task,
    TaskSpec,
    check_transition,
    decode_payload,
    encode_payload,
    parse_specs,
    unpack,
)
from baton.planner import build_plan
from baton.scheduler_errors import (
    DependencyCycle,
    DuplicateTask,
    InvalidTransition,
    StaleLease,
    TaskValidationError,
    UnknownPrerequisite,
    UnknownTask,
)
from baton.store import SQL_MAX_VARS, TaskStore, chunked, insert_many

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger("baton.scheduler")

_TERMINAL_VALUES: Final = frozenset(s.value for s in TERMINAL)
_FAILED_VALUES: Final = frozenset({Status.FAILED.value, Status.CANCELLED.value, Status.DEAD_LETTERED.value})
# Status values as plain str constants: Status.X.value goes through the enum descriptor (~0.5 us) and these
# are compared in per-task loops.
_PENDING: Final = Status.PENDING.value
_READY: Final = Status.READY.value
_RUNNING: Final = Status.RUNNING.value
_BLOCKED: Final = Status.BLOCKED.value
_COMPLETED: Final = Status.COMPLETED.value
_CANCELLED: Final = Status.CANCELLED.value
_DEAD_LETTERED: Final = Status.DEAD_LETTERED.value
_FAILED: Final = Status.FAILED.value
_STATUS: Final = {s.value: s for s in Status}  # value -> member without Status(value)'s lookup machinery
_PACK = msgpack.Packer(use_bin_type=True).pack


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    # WIP limits: running tasks per agent_type (``wip_limits`` overrides per type) and in total (None = no cap).
    wip_per_agent_type: int | None = 3
    wip_limits: Mapping[str, int] = field(default_factory=dict)
    wip_global: int | None = None
    lease_s: float = 60.0
    # Retry backoff: min(cap, base * 2**(attempt-1)), with "equal jitter" (half fixed, half random) so the
    # delay still grows with every attempt while concurrent retries spread out.
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    default_policy: DependentPolicy = DependentPolicy.BLOCK
    weights: prio.PriorityWeights = prio.DEFAULT_WEIGHTS
    # Deadline urgency changes with time: claims refresh the ranks of ready deadline tasks at most this often.
    priority_refresh_s: float = 1.0

    def wip_limit_for(self, agent_type: str) -> int | None:
        return self.wip_limits.get(agent_type, self.wip_per_agent_type)


def _new_id() -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: 48 bits of unix milliseconds, then random bits, version 7 and
    the RFC variant.  Time-ordered on purpose: ids generated together land next to each other in the
    ``tasks.id`` index, so a batch insert touches (and commits) a few index pages instead of one page per
    task, as random uuid4 ids did.  Built from os.urandom without a UUID object (about 1 us)."""
    b = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


class Scheduler:
    """Rules of the task graph over one TaskStore connection (one Scheduler per thread or process)."""

    def __init__(
        self,
        store: TaskStore | str | Path,
        *,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store if isinstance(store, TaskStore) else TaskStore(store)
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.rng = rng or random.Random()
        self._w = self.config.weights
        self._last_refresh = float("-inf")
        uw = repr(float(self._w.urgency))
        rate = repr(float(self._w.aging_rate))
        # The rank expression (see priority.py), used whenever a task becomes ready or is refreshed.
        self._rank_sql = f"static_score + {uw} * {self._w.urgency_sql(':now')} - {rate} * ready_at"

    def _rank_at(self, param: int) -> str:
        """The rank expression with ``now`` bound to the numbered SQL parameter ``?param``."""
        return self._rank_sql.replace(":now", f"?{param}")

    def _rank_fresh(self, param: int) -> str:
        """The rank of a task becoming ready in this very UPDATE (SET sees the old, NULL, ready_at)."""
        return self._rank_at(param).replace("ready_at", f"?{param}")

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- enqueue -----------------------------------------------------------------------------------------

    def enqueue(self, spec: TaskSpec | dict[str, Any]) -> EnqueueResult:
        return self.enqueue_many([spec])[0]

    def enqueue_many(
        self, specs: Sequence[TaskSpec | dict[str, Any]], *, manifest_id: str | None = None
    ) -> list[EnqueueResult]:
        """Validate and store a batch atomically: either every task is accepted or none is.

        Prerequisites may name tasks already stored or tasks of the same batch (in any order).  A task whose
        idempotency key is already known is not created again: its result points at the existing task.
        """
        parsed = parse_specs(list(specs))
        now = self.clock()
        with self.store.write() as c:
            return self._enqueue(c, parsed, now, manifest_id=manifest_id)

    def _enqueue_in(
        self, c: sqlite3.Connection, specs: Sequence[TaskSpec | dict[str, Any]], *, manifest_id: str | None = None
    ) -> list[EnqueueResult]:
        """enqueue_many inside a transaction the caller already holds (the manifest importer's)."""
        return self._enqueue(c, parse_specs(list(specs)), self.clock(), manifest_id=manifest_id)

    def _enqueue(
        self,
        c: sqlite3.Connection,
        specs: list[TaskSpec],
        now: float,
        *,
        manifest_id: str | None = None,
        requeued_from: Mapping[str, str] | None = None,
    ) -> list[EnqueueResult]:
        n = len(specs)
        results: list[EnqueueResult | None] = [None] * n

        # Idempotency: a known key returns the existing task, and so does a repeat of a key inside the batch.
        keys = [s.idempotency_key for s in specs if s.idempotency_key is not None]
        known: dict[str, tuple[str, str]] = {}
        if keys:
            for part in chunked(keys):
                q = ",".join("?" * len(part))
                for tid, st, key in c.execute(
                    f"SELECT id, status, idempotency_key FROM tasks WHERE idempotency_key IN ({q})", part
                ):
                    known[key] = (tid, st)
        batch_keys: dict[str, int] = {}
        new: list[tuple[int, TaskSpec, str]] = []  # (index, spec, id)
        for i, s in enumerate(specs):
            k = s.idempotency_key
            if k is not None:
                if k in known:
                    tid, st = known[k]
                    results[i] = EnqueueResult(task_id=tid, created=False, status=_STATUS[st])
                    continue
                if k in batch_keys:
                    continue  # resolved once the first holder of the key has an id
                batch_keys[k] = i
            new.append((i, s, s.id if s.id is not None else _new_id()))

        ids = [tid for _, _, tid in new]
        details: list[dict[str, Any]] = []
        index_of: dict[str, int] = {}
        for i, _, tid in new:
            if tid in index_of:
                details.append({"index": i, "task_id": tid, "code": "DUPLICATE_ID", "message": "id repeated in batch"})
            index_of[tid] = i
        for part in chunked(ids):
            q = ",".join("?" * len(part))
            for (tid,) in c.execute(f"SELECT id FROM tasks WHERE id IN ({q})", part):
                details.append(
                    {"index": index_of[tid], "task_id": tid, "code": "DUPLICATE_ID", "message": "id already exists"}
                )
        if details:
            raise DuplicateTask(f"task id {details[0]['task_id']!r} is not unique", details=details)

        # Prerequisites outside the batch must exist.
        in_batch = set(ids)
        external = sorted({p for _, s, _ in new for p in s.prerequisites if p not in in_batch})
        ext: dict[str, tuple[str, int]] = {}  # id -> (status, depth)
        for part in chunked(external):
            q = ",".join("?" * len(part))
            for tid, st, depth in c.execute(f"SELECT id, status, depth FROM tasks WHERE id IN ({q})", part):
                ext[tid] = (st, depth)
        missing = [
            {"index": i, "task_id": tid, "prerequisite": p, "code": "UNKNOWN_PREREQUISITE",
             "message": f"prerequisite {p!r} does not exist"}
            for i, s, tid in new for p in s.prerequisites if p not in in_batch and p not in ext
        ]
        if missing:
            m = missing[0]
            raise UnknownPrerequisite(
                f"task {m['task_id']!r}: prerequisite {m['prerequisite']!r} does not exist", details=missing
            )

        # Cycles can only form inside the batch (stored tasks cannot depend on tasks that did not exist yet).
        spec_of = {tid: s for _, s, tid in new}
        order = self._topo_order(spec_of, in_batch)

        # Per-task state at creation, in topological order so a prerequisite's fate is known first.
        policy_default = self.config.default_policy
        w = self._w
        status: dict[str, str] = {}
        unmet: dict[str, int] = {}
        reason: dict[str, str | None] = {}
        for tid in order:
            s = spec_of[tid]
            pol = s.on_prerequisite_failure or policy_default
            u = 0
            st = _PENDING
            why: str | None = None
            for p in s.prerequisites:
                pst = status[p] if p in in_batch else ext[p][0]
                if pst == _COMPLETED:
                    continue
                if pst in _FAILED_VALUES:
                    if pol is DependentPolicy.PROCEED:
                        continue
                    if pol is DependentPolicy.CANCEL:
                        st, why = _CANCELLED, f"prerequisite {p} is {pst}"
                        break
                    st = _BLOCKED
                    why = why or f"prerequisite {p} is {pst}"
                u += 1
            if st == _PENDING and u == 0:
                st = _READY
            status[tid], unmet[tid], reason[tid] = st, u, why

        # Downstream depth inside the batch (reverse topological order).
        depth: dict[str, int] = dict.fromkeys(order, 0)
        for tid in reversed(order):
            d1 = depth[tid] + 1
            for p in spec_of[tid].prerequisites:
                if p in in_batch and depth[p] < d1:
                    depth[p] = d1

        rows = []
        rate = w.aging_rate
        for i, s, tid in new:
            st = status[tid]
            deadline = _ts(s.deadline)
            est = s.estimated_duration_s or 0.0
            static = prio.static_score(w, s.base_priority, depth[tid], s.source)
            ready = st == _READY
            rank = (
                static + w.urgency * prio.urgency(w, deadline, est, now) - rate * now if ready else 0.0
            )
            terminal = st == _CANCELLED
            rows.append(
                (
                    tid, st, s.agent_type, s.source, s.base_priority, s.risk.value,
                    (s.on_prerequisite_failure or policy_default).value,
                    deadline, prio.NO_DEADLINE if deadline is None else deadline, est,
                    depth[tid], static, rank, unmet[tid], s.max_attempts, s.timeout_s, s.idempotency_key,
                    now, now, now if ready else None, now if terminal else None,
                    reason[tid] if st == _BLOCKED else None,
                    reason[tid] if terminal else None,
                    _pack_spec(s), encode_payload(s.input),
                    requeued_from.get(tid) if requeued_from else None, manifest_id,
                )
            )
        insert_many(c, "tasks", _INSERT_COLS, rows)
        edges = [(tid, p) for _, s, tid in new for p in s.prerequisites]
        if edges:
            c.executemany("INSERT INTO deps (task_id, prereq_id) VALUES (?, ?)", edges)
            # Stored prerequisites now have longer chains below them.
            bumps: dict[str, int] = {}
            for _, s, tid in new:
                for p in s.prerequisites:
                    if p not in in_batch and ext[p][0] not in _TERMINAL_VALUES:
                        bumps[p] = max(bumps.get(p, 0), depth[tid] + 1)
            if bumps:
                self._raise_depths(c, bumps, now)

        # One validation call for the batch's results (half the cost of one EnqueueResult(...) per task).
        made = _RESULT_LIST.validate_python(
            [{"task_id": tid, "created": True, "status": _STATUS[status[tid]]} for _, _, tid in new]
        )
        for (i, _, _), r in zip(new, made):
            results[i] = r
        for i, s in enumerate(specs):
            if results[i] is None:  # repeated idempotency key inside the batch
                first = results[batch_keys[s.idempotency_key]]  # type: ignore[index]
                assert first is not None
                results[i] = EnqueueResult(task_id=first.task_id, created=False, status=first.status)
        return [r for r in results if r is not None]

    @staticmethod
    def _topo_order(spec_of: Mapping[str, TaskSpec], in_batch: set[str]) -> list[str]:
        indeg: dict[str, int] = {}
        children: dict[str, list[str]] = {}
        for tid, s in spec_of.items():
            k = 0
            for p in s.prerequisites:
                if p in in_batch:
                    k += 1
                    children.setdefault(p, []).append(tid)
            indeg[tid] = k
        queue = deque(t for t, k in indeg.items() if k == 0)
        order: list[str] = []
        while queue:
            t = queue.popleft()
            order.append(t)
            for ch in children.get(t, ()):
                indeg[ch] -= 1
                if indeg[ch] == 0:
                    queue.append(ch)
        if len(order) != len(spec_of):
            stuck = sorted(t for t, k in indeg.items() if k > 0)
            raise DependencyCycle(
                f"prerequisites form a cycle among {stuck[:10]}",
                details=[{"task_id": t, "code": "DEPENDENCY_CYCLE", "message": "on or behind a cycle"} for t in stuck],
            )
        return order

    def _raise_depths(self, c: sqlite3.Connection, bumps: dict[str, int], now: float) -> None:
        """Propagate a longer dependent chain up through non-terminal ancestors (depth only ever grows here)."""
        w = self._w
        work = deque(bumps.items())
        while work:
            tid, d = work.popleft()
            row = c.execute(
                "SELECT depth, status, base_priority, source, deadline, estimate, ready_at FROM tasks WHERE id = ?",
                (tid,),
            ).fetchone()
            if row is None or row[0] >= d or row[1] in _TERMINAL_VALUES:
                continue
            _, st, base, source, deadline, est, ready_at = row
            static = prio.static_score(w, base, d, source)
            if st == _READY:
                rank = prio.rank_key(w, static, deadline, est, ready_at, now)
                c.execute("UPDATE tasks SET depth = ?, static_score = ?, rank = ? WHERE id = ?", (d, static, rank, tid))
            else:
                c.execute("UPDATE tasks SET depth = ?, static_score = ? WHERE id = ?", (d, static, tid))
            for (p,) in c.execute("SELECT prereq_id FROM deps WHERE task_id = ?", (tid,)).fetchall():
                work.append((p, d + 1))

    def add_prerequisite(self, task_id: str, prereq_id: str) -> Status:
        """Make ``task_id`` wait for ``prereq_id``; rejected if it would create a cycle.  Returns the status."""
        now = self.clock()
        with self.store.write() as c:
            row = c.execute("SELECT status, policy, depth FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"no task {task_id!r}")
            st, pol, depth = Status(row[0]), DependentPolicy(row[1]), row[2]
            if st in TERMINAL or st is Status.RUNNING:
                raise InvalidTransition(f"task {task_id} is {st.value}; prerequisites can no longer be added")
            prow = c.execute("SELECT status FROM tasks WHERE id = ?", (prereq_id,)).fetchone()
            if prow is None:
                raise UnknownPrerequisite(f"prerequisite {prereq_id!r} does not exist")
            if c.execute(
                "SELECT 1 FROM deps WHERE task_id = ? AND prereq_id = ?", (task_id, prereq_id)
            ).fetchone():
                return st
            if task_id == prereq_id or self._is_ancestor(c, task_id, prereq_id):
                raise DependencyCycle(
                    f"{task_id} -> {prereq_id} would create a cycle",
                    details=[{"task_id": task_id, "prerequisite": prereq_id, "code": "DEPENDENCY_CYCLE",
                              "message": "the prerequisite already depends on this task"}],
                )
            c.execute("INSERT INTO deps (task_id, prereq_id) VALUES (?, ?)", (task_id, prereq_id))
            pst = prow[0]
            if pst not in _TERMINAL_VALUES:
                c.execute("UPDATE tasks SET unmet = unmet + 1, updated_at = ? WHERE id = ?", (now, task_id))
                if st is Status.READY:
                    check_transition(task_id, st, Status.PENDING)
                    c.execute("UPDATE tasks SET status = 'pending', ready_at = NULL WHERE id = ?", (task_id,))
                    st = Status.PENDING
                self._raise_depths(c, {prereq_id: depth + 1}, now)
            elif pst != _COMPLETED:
                c.execute("UPDATE tasks SET unmet = unmet + 1 WHERE id = ?", (task_id,))
                # A 'cancel' policy cancels task_id, which is then a cancelled prerequisite for its own
                # dependents: the chain goes on through _apply_policies, as for any other cancellation.
                chained: deque[tuple[str, str]] = deque()
                self._apply_policy_one(c, task_id, st, pol, prereq_id, pst, now, chained)
                if chained:
                    self._apply_policies(c, chained, now)
                st = Status(c.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0])
            return st

    @staticmethod
    def _is_ancestor(c: sqlite3.Connection, ancestor: str, of: str) -> bool:
        """Does ``of`` (transitively) depend on ``ancestor``?  Walk prerequisites upward from ``of``."""
        seen = {of}
        frontier = [of]
        while frontier:
            nxt: list[str] = []
            for part in chunked(frontier):
                q = ",".join("?" * len(part))
                for (p,) in c.execute(f"SELECT prereq_id FROM deps WHERE task_id IN ({q})", part):
                    if p == ancestor:
                        return True
                    if p not in seen:
                        seen.add(p)
                        nxt.append(p)
            frontier = nxt
        return False

    # --- claims and leases -------------------------------------------------------------------------------

    def claim(self, agent_type: str, holder: str, *, lease_s: float | None = None) -> Claim | None:
        got = self.claim_many(agent_type, holder, 1, lease_s=lease_s)
        return got[0] if got else None

    def claim_many(
        self, agent_type: str, holder: str, n: int, *, lease_s: float | None = None
    ) -> list[Claim]:
        """Atomically claim up to ``n`` ready tasks of ``agent_type`` in priority order, within WIP limits.

        Every claimed task gets a lease and the same fresh fencing token (tokens only ever grow); a task
        with a timeout gets a lease no longer than its remaining timeout.
        """
        if n <= 0:
            return []
        lease = self.config.lease_s if lease_s is None else lease_s
        if lease <= 0:
            raise ValueError("lease_s must be > 0")
        now = self.clock()
        with self.store.write() as c:
            self._expire(c, now)
            self._maybe_refresh(c, now)
            allowed = self._wip_room(c, agent_type, n)
            if allowed <= 0:
                return []
            fence = self.store.next_fence(c)
            rows = c.execute(
                "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_holder = :holder,"
                " lease_expires_at = CASE WHEN timeout IS NULL OR timeout > :lease THEN :now + :lease"
                "   ELSE :now + timeout END,"
                " fencing_token = :fence, started_at = :now, updated_at = :now"
                " WHERE seq IN (SELECT seq FROM tasks WHERE status = 'ready' AND agent_type = :at"
                "   AND not_before <= :now ORDER BY rank DESC, deadline_sort, seq LIMIT :n)"
                " RETURNING id, attempts, lease_expires_at, input, rank, deadline_sort, seq",
                {"holder": holder, "lease": lease, "now": now, "fence": fence, "at": agent_type, "n": allowed},
            ).fetchall()
        # RETURNING order is unspecified; hand tasks over in dispatch order.
        rows.sort(key=lambda r: (-r[4], r[5], r[6]))
        rate_now = self._w.aging_rate * now
        return [
            Claim(r[0], agent_type, fence, r[2], r[1], decode_payload(r[3]), r[4] + rate_now) for r in rows
        ]

    def _wip_room(self, c: sqlite3.Connection, agent_type: str, n: int) -> int:
        limit = self.config.wip_limit_for(agent_type)
        if limit is not None:
            running = c.execute(
                "SELECT count(*) FROM tasks WHERE status = 'running' AND agent_type = ?", (agent_type,)
            ).fetchone()[0]
            n = min(n, limit - running)
        g = self.config.wip_global
        if g is not None:
            total = c.execute("SELECT count(*) FROM tasks WHERE status = 'running'").fetchone()[0]
            n = min(n, g - total)
        return n

    def heartbeat(self, task_id: str, fencing_token: int, *, lease_s: float | None = None) -> float:
        """Extend a lease; returns the new expiry.  A stale token (the task was reclaimed) is rejected."""
        lease = self.config.lease_s if lease_s is None else lease_s
        now = self.clock()
        with self.store.write() as c:
            self._expire(c, now)
            self._check_holder(c, task_id, fencing_token)
            row = c.execute(
                "UPDATE tasks SET lease_expires_at = CASE WHEN timeout IS NULL THEN :now + :lease"
                " ELSE min(:now + :lease, started_at + timeout) END, updated_at = :now"
                " WHERE id = :id RETURNING lease_expires_at",
                {"now": now, "lease": lease, "id": task_id},
            ).fetchone()
            return float(row[0])

    def _check_holder(self, c: sqlite3.Connection, task_id: str, token: int) -> sqlite3.Row | tuple[Any, ...]:
        row = c.execute(
            "SELECT status, fencing_token, attempts, max_attempts, lease_holder, started_at, history"
            " FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            raise UnknownTask(f"no task {task_id!r}")
        if row[0] != _RUNNING:
            if row[0] in _TERMINAL_VALUES:
                raise InvalidTransition(f"task {task_id} is {row[0]}; terminal states never change")
            raise StaleLease(f"task {task_id} is {row[0]}, not running under token {token}")
        if row[1] != token:
            raise StaleLease(f"task {task_id}: fencing token {token} is stale (current {row[1]})")
        return row  # type: ignore[no-any-return]

    def expire_leases(self) -> list[str]:
        """Return tasks whose lease has expired to ready (or dead letters when out of attempts)."""
        now = self.clock()
        with self.store.write() as c:
            return self._expire(c, now)

    def _expire(self, c: sqlite3.Connection, now: float) -> list[str]:
        rows = c.execute(
            "SELECT id, attempts, max_attempts, lease_holder, fencing_token, started_at, history, timeout"
            " FROM tasks WHERE status = 'running' AND lease_expires_at <= ?",
            (now,),
        ).fetchall()
        out = []
        for tid, attempts, max_attempts, holder, token, started, hist, timeout in rows:
            timed_out = timeout is not None and now >= started + timeout
            err = "timed out" if timed_out else "lease expired"
            history = unpack(hist) or []
            history.append(_attempt(attempts, holder, token, started, now, "lease_expired", err))
            if attempts >= max_attempts:
                self._to_dead(c, tid, Status.DEAD_LETTERED, f"{err}; attempts exhausted", history, now)
            else:
                c.execute(
                    "UPDATE tasks SET status = 'ready', lease_holder = NULL, lease_expires_at = NULL,"
                    f" error = ?2, history = ?3, updated_at = ?1, rank = {self._rank_at(1)} WHERE id = ?4",
                    (now, err, _PACK(history), tid),
                )
            log.info("lease of %s expired (holder %s, token %d)", tid, holder, token)
            out.append(tid)
        return out

    # --- priorities --------------------------------------------------------------------------------------

    def refresh_priorities(self) -> int:
        """Recompute the deadline-dependent ranks of ready tasks now; returns how many were updated."""
        now = self.clock()
        with self.store.write() as c:
            return self._refresh(c, now)

    def _maybe_refresh(self, c: sqlite3.Connection, now: float) -> None:
        if now - self._last_refresh >= self.config.priority_refresh_s:
            self._refresh(c, now)

    def _refresh(self, c: sqlite3.Connection, now: float) -> int:
        self._last_refresh = now
        cur = c.execute(
            f"UPDATE tasks SET rank = {self._rank_sql} WHERE status = 'ready' AND deadline IS NOT NULL",
            {"now": now},
        )
        return cur.rowcount

    def explain_priority(self, task_id: str) -> PriorityBreakdown:
        return self.get(task_id).priority_breakdown

    def ready_queue(self, agent_type: str | None = None, limit: int = 100) -> list[tuple[str, float]]:
        """Ready tasks in dispatch order with their calculated priority (refreshing deadline ranks first)."""
        now = self.clock()
        with self.store.write() as c:
            self._refresh(c, now)
            where = "status = 'ready'" + (" AND agent_type = ?" if agent_type is not None else "")
            args: tuple[Any, ...] = (agent_type,) if agent_type is not None else ()
            rows = c.execute(
                f"SELECT id, rank FROM tasks WHERE {where} ORDER BY rank DESC, deadline_sort, seq LIMIT ?",
                (*args, limit),
            ).fetchall()
        rate_now = self._w.aging_rate * now
        return [(tid, rank + rate_now) for tid, rank in rows]

    # --- completion, failure, retries --------------------------------------------------------------------

    def complete(self, task_id: str, fencing_token: int, result: Any = None) -> list[str]:
        """Record success; returns the dependents that became ready.  Stale tokens raise StaleLease."""
        out, kinds = self._complete_many([(task_id, fencing_token, result)])
        if out.rejected:
            raise kinds[task_id](out.rejected[task_id])
        return out.released

    def complete_many(self, items: Sequence[tuple[str, int, Any]]) -> BatchOutcome:
        """Complete a batch in one transaction.  Items with a stale token or a non-running task are refused
        individually (listed in ``rejected``); the others are applied."""
        return self._complete_many(items)[0]

    def _complete_many(
        self, items: Sequence[tuple[str, int, Any]]
    ) -> tuple[BatchOutcome, dict[str, type[Exception]]]:
        """complete_many, plus the exception class each refusal maps to (what ``complete`` raises)."""
        now = self.clock()
        rejected: dict[str, str] = {}
        kinds: dict[str, type[Exception]] = {}
        blobs: dict[str, tuple[int, bytes | None]] = {}
        for tid, token, result in items:
            if tid in blobs or tid in rejected:
                rejected[tid] = "task appears twice in the batch"
                kinds[tid] = TaskValidationError
                continue
            try:
                blobs[tid] = (token, encode_payload(result))
            except ValueError as exc:
                rejected[tid] = str(exc)
                kinds[tid] = TaskValidationError
        with self.store.write() as c:
            self._expire(c, now)
            ids = list(blobs)
            state: dict[str, tuple[str, int, int]] = {}
            for part in chunked(ids):
                q = ",".join("?" * len(part))
                for tid, st, tok, seq in c.execute(
                    f"SELECT id, status, fencing_token, seq FROM tasks WHERE id IN ({q})", part
                ):
                    state[tid] = (st, tok, seq)
            ok: list[tuple[bytes | None, float, int]] = []
            applied: list[str] = []
            for tid, (token, blob) in blobs.items():
                cur = state.get(tid)
                if cur is None:
                    rejected[tid] = f"no task {tid!r}"
                    kinds[tid] = UnknownTask
                elif cur[0] != _RUNNING:
                    term = cur[0] in _TERMINAL_VALUES
                    rejected[tid] = (
                        f"task {tid} is {cur[0]}" + ("; terminal states never change" if term else ", not running")
                    )
                    kinds[tid] = InvalidTransition if term else StaleLease
                elif cur[1] != token:
                    rejected[tid] = f"task {tid}: fencing token {token} is stale (current {cur[1]})"
                    kinds[tid] = StaleLease
                else:
                    ok.append((blob, now, cur[2]))
                    applied.append(tid)
            if ok:
                # By rowid (seq): the row is found without a second walk of the id index.
                c.executemany(
                    "UPDATE tasks SET status = 'completed', result = ?1, finished_at = ?2, updated_at = ?2,"
                    " lease_holder = NULL, lease_expires_at = NULL, error = NULL WHERE seq = ?3",
                    ok,
                )
            released = self._release(c, applied, now) if applied else []
        # model_construct: built right here from our own rows (lists of str ids); validation would only cost.
        return BatchOutcome.model_construct(applied=applied, rejected=rejected, released=released), kinds

    def _release(self, c: sqlite3.Connection, satisfied: Sequence[str], now: float) -> list[str]:
        """Count ``satisfied`` prerequisites off their dependents; the ones left with none become ready."""
        dec: Counter[str] = Counter()
        for part in chunked(satisfied):
            q = ",".join("?" * len(part))
            for (dep,) in c.execute(f"SELECT task_id FROM deps WHERE prereq_id IN ({q})", part):
                dec[dep] += 1
        if not dec:
            return []
        c.executemany("UPDATE tasks SET unmet = unmet - ? WHERE id = ?", [(k, t) for t, k in dec.items()])
        released: list[str] = []
        deps = list(dec)
        for part in chunked(deps, SQL_VARS_WITH_NOW):
            q = ",".join("?" * len(part))
            released.extend(
                r[0]
                for r in c.execute(
                    f"UPDATE tasks SET status = 'ready', ready_at = ?1, updated_at = ?1,"
                    f" rank = {self._rank_fresh(1)}"
                    f" WHERE id IN ({','.join('?' + str(i + 2) for i in range(len(part)))})"
                    " AND status = 'pending' AND unmet = 0 RETURNING id",
                    (now, *part),
                )
            )
        return released

    def fail(
        self,
        task_id: str,
        fencing_token: int,
        error: str,
        *,
        transient: bool = True,
        dead_letter: bool = True,
    ) -> FailOutcome:
        """Record a failed attempt.

        Transient with attempts left -> ready again after an exponential backoff with jitter.  Permanent, or
        out of attempts -> dead_lettered (requeue-able) or, with ``dead_letter=False``, failed.  Either way
        the dependents' policy is applied.
        """
        now = self.clock()
        with self.store.write() as c:
            self._expire(c, now)
            row = self._check_holder(c, task_id, fencing_token)
            _, token, attempts, max_attempts, holder, started, hist = row
            outcome = "failed_transient" if transient else "failed_permanent"
            history = unpack(hist) or []
            history.append(_attempt(attempts, holder, token, started, now, outcome, error))
            if transient and attempts < max_attempts:
                delay = self.backoff_delay(attempts)
                c.execute(
                    f"UPDATE tasks SET status = 'ready', not_before = ?2, lease_holder = NULL,"
                    f" lease_expires_at = NULL, error = ?3, history = ?4, updated_at = ?1,"
                    f" rank = {self._rank_at(1)} WHERE id = ?5",
                    (now, now + delay, error, _PACK(history), task_id),
                )
                return FailOutcome(
                    task_id=task_id, status=Status.READY, retry_at=now + delay, attempts=attempts,
                    message=f"attempt {attempts}/{max_attempts} failed; retry in {delay:.3f}s",
                )
            target = Status.DEAD_LETTERED if dead_letter else Status.FAILED
            why = "permanent failure" if not transient else f"attempts exhausted ({attempts}/{max_attempts})"
            self._to_dead(c, task_id, target, f"{error} ({why})", history, now)
            return FailOutcome(task_id=task_id, status=target, attempts=attempts, message=f"{target.value}: {why}")

    def backoff_delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): equal jitter over a capped exponential."""
        cfg = self.config
        d = min(cfg.backoff_cap_s, cfg.backoff_base_s * (2.0 ** max(0, attempt - 1)))
        return d / 2 + self.rng.uniform(0, d / 2)

    def _to_dead(
        self, c: sqlite3.Connection, task_id: str, target: Status, error: str, history: list[Any], now: float
    ) -> None:
        c.execute(
            "UPDATE tasks SET status = ?, error = ?, history = ?, finished_at = ?, updated_at = ?,"
            " lease_holder = NULL, lease_expires_at = NULL WHERE id = ?",
            (target.value, error, _PACK(history), now, now, task_id),
        )
        self._apply_policies(c, [(task_id, target.value)], now)

    def _apply_policies(self, c: sqlite3.Connection, failed: Iterable[tuple[str, str]], now: float) -> list[str]:
        """Apply each dependent's policy to a prerequisite that failed/dead-lettered/was cancelled.

        Cancellations chain (a cancelled dependent is itself a cancelled prerequisite for its dependents);
        returns the ids cancelled on the way.
        """
        work: deque[tuple[str, str]] = deque(failed)
        cancelled: list[str] = []
        while work:
            pid, pst = work.popleft()
            for dep, st, pol in c.execute(
                "SELECT t.id, t.status, t.policy FROM deps d JOIN tasks t ON t.id = d.task_id WHERE d.prereq_id = ?",
                (pid,),
            ).fetchall():
                if st in _TERMINAL_VALUES or st == _RUNNING:
                    continue  # finished, or already running (it was released by an earlier 'proceed')
                if self._apply_policy_one(c, dep, Status(st), DependentPolicy(pol), pid, pst, now, work):
                    cancelled.append(dep)
        return cancelled

    def _apply_policy_one(
        self,
        c: sqlite3.Connection,
        dep: str,
        st: Status,
        pol: DependentPolicy,
        pid: str,
        pst: str,
        now: float,
        work: deque[tuple[str, str]],
    ) -> bool:
        if pol is DependentPolicy.PROCEED:
            c.execute("UPDATE tasks SET unmet = unmet - 1, updated_at = ? WHERE id = ?", (now, dep))
            if st is Status.PENDING:
                c.execute(
                    f"UPDATE tasks SET status = 'ready', ready_at = ?1, rank = {self._rank_fresh(1)}"
                    " WHERE id = ?2 AND unmet = 0",
                    (now, dep),
                )
            return False
        if pol is DependentPolicy.CANCEL:
            check_transition(dep, st, Status.CANCELLED)
            c.execute(
                "UPDATE tasks SET status = 'cancelled', error = ?, finished_at = ?, updated_at = ?,"
                " blocked_reason = NULL WHERE id = ?",
                (f"prerequisite {pid} is {pst}", now, now, dep),
            )
            work.append((dep, _CANCELLED))
            return True
        if st is not Status.BLOCKED:
            check_transition(dep, st, Status.BLOCKED)
        c.execute(
            "UPDATE tasks SET status = 'blocked', ready_at = NULL, updated_at = ?,"
            " blocked_reason = coalesce(blocked_reason, ?) WHERE id = ?",
            (now, f"prerequisite {pid} is {pst}", dep),
        )
        return False

    # --- dead letters ------------------------------------------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[Task]:
        now = self.clock()
        with self.store.read() as c:
            rows = c.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE status = 'dead_lettered' AND requeued_as IS NULL"
                " ORDER BY finished_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._row_to_task(r, now) for r in rows]

    def requeue_dead_letter(self, task_id: str, *, new_id: str | None = None) -> EnqueueResult:
        """Requeue a dead letter as a new task with the same submission (terminal states never change, so the
        dead letter stays as the record of what happened).  Dependents blocked on it now wait for the copy."""
        now = self.clock()
        with self.store.write() as c:
            row = c.execute(
                "SELECT status, spec, input, requeued_as FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise UnknownTask(f"no task {task_id!r}")
            st, spec_blob, input_blob, already = row
            if st != _DEAD_LETTERED:
                raise InvalidTransition(f"task {task_id} is {st}, not dead_lettered")
            if already is not None:
                cur = c.execute("SELECT status FROM tasks WHERE id = ?", (already,)).fetchone()
                return EnqueueResult(task_id=already, created=False, status=Status(cur[0]))
            spec = _unpack_spec(spec_blob, decode_payload(input_blob))
            nid = new_id or f"{task_id}.r{c.execute('SELECT count(*) FROM tasks WHERE requeued_from = ?', (task_id,)).fetchone()[0] + 1}"
            spec = spec.model_copy(update={"id": nid, "idempotency_key": None})
            res = self._enqueue(c, [spec], now, requeued_from={nid: task_id})[0]
            c.execute("UPDATE tasks SET requeued_as = ? WHERE id = ?", (nid, task_id))
            # Rewire the dependents that were parked because of this dead letter.
            blocked = [r[0] for r in c.execute(
                "SELECT t.id FROM deps d JOIN tasks t ON t.id = d.task_id"
                " WHERE d.prereq_id = ? AND t.status = 'blocked'",
                (task_id,),
            ).fetchall()]
            max_depth = 0
            for dep in blocked:
                c.execute("UPDATE deps SET prereq_id = ? WHERE task_id = ? AND prereq_id = ?", (nid, dep, task_id))
                still_bad = c.execute(
                    "SELECT d.prereq_id, t.status FROM deps d JOIN tasks t ON t.id = d.prereq_id"
                    " WHERE d.task_id = ? AND t.status IN ('failed', 'cancelled', 'dead_lettered')",
                    (dep,),
                ).fetchone()
                if still_bad is None:
                    check_transition(dep, Status.BLOCKED, Status.PENDING)
                    c.execute(
                        "UPDATE tasks SET status = 'pending', blocked_reason = NULL, updated_at = ? WHERE id = ?",
                        (now, dep),
                    )
                else:
                    c.execute(
                        "UPDATE tasks SET blocked_reason = ? WHERE id = ?",
                        (f"prerequisite {still_bad[0]} is {still_bad[1]}", dep),
                    )
                max_depth = max(max_depth, c.execute("SELECT depth FROM tasks WHERE id = ?", (dep,)).fetchone()[0] + 1)
            if max_depth:
                self._raise_depths(c, {nid: max_depth}, now)
            return res

    # --- cancellation ------------------------------------------------------------------------------------

    def cancel(
        self, task_id: str, *, cascade: bool = True, dry_run: bool = False, reason: str | None = None
    ) -> CancelResult:
        """Cancel a task and (with ``cascade``) every transitive dependent that is not terminal.

        A terminal task is left alone and the result says so.  Without ``cascade``, dependents get their own
        policy (cancel, block or proceed).  ``dry_run`` computes the same answer without changing anything.
        """
        now = self.clock()
        ctx = self.store.read() if dry_run else self.store.write()
        with ctx as c:
            row = c.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"no task {task_id!r}")
            st = Status(row[0])
            if st in TERMINAL:
                return CancelResult(
                    cancelled_task_id=task_id, cascaded_task_ids=[], total_cancelled=0, dry_run=dry_run,
                    changed=False, message=f"task {task_id} is already {st.value}; nothing changed",
                )
            cascaded = self._descendants(c, task_id) if cascade else []
            if dry_run:
                if not cascade:
                    cascaded = self._policy_cancel_preview(c, task_id)
                return CancelResult(
                    cancelled_task_id=task_id, cascaded_task_ids=cascaded, total_cancelled=1 + len(cascaded),
                    dry_run=True, changed=False,
                    message=f"would cancel {task_id} and {len(cascaded)} dependent(s)",
                )
            why = reason or "cancelled"
            c.execute(
                "UPDATE tasks SET status = 'cancelled', error = ?, finished_at = ?, updated_at = ?,"
                " lease_holder = NULL, lease_expires_at = NULL, blocked_reason = NULL WHERE id = ?",
                (why, now, now, task_id),
            )
            if cascade:
                for part in chunked(cascaded, SQL_VARS_WITH_NOW):
                    q = ",".join("?" * len(part))
                    c.execute(
                        "UPDATE tasks SET status = 'cancelled', finished_at = ?, updated_at = ?,"
                        " lease_holder = NULL, lease_expires_at = NULL, blocked_reason = NULL,"
                        f" error = ? WHERE id IN ({q})",
                        (now, now, f"cancelled with prerequisite {task_id}", *part),
                    )
            else:
                cascaded = self._apply_policies(c, [(task_id, _CANCELLED)], now)
            return CancelResult(
                cancelled_task_id=task_id, cascaded_task_ids=cascaded, total_cancelled=1 + len(cascaded),
                dry_run=False, changed=True, message=f"cancelled {task_id} and {len(cascaded)} dependent(s)",
            )

    @staticmethod
    def _descendants(c: sqlite3.Connection, root: str) -> list[str]:
        """Non-terminal transitive dependents, breadth-first (terminal ones end the walk on their branch)."""
        seen = {root}
        out: list[str] = []
        frontier = [root]
        while frontier:
            nxt: list[str] = []
            for part in chunked(frontier):
                q = ",".join("?" * len(part))
                for dep, st in c.execute(
                    f"SELECT d.task_id, t.status FROM deps d JOIN tasks t ON t.id = d.task_id"
                    f" WHERE d.prereq_id IN ({q})",
                    part,
                ):
                    if dep in seen or st in _TERMINAL_VALUES:
                        continue
                    seen.add(dep)
                    out.append(dep)
                    nxt.append(dep)
            frontier = nxt
        return out

    @staticmethod
    def _policy_cancel_preview(c: sqlite3.Connection, root: str) -> list[str]:
        """Dry run of a non-cascading cancel: who would the 'cancel' policies take along."""
        out: list[str] = []
        seen = {root}
        work = deque([root])
        while work:
            pid = work.popleft()
            for dep, st, pol in c.execute(
                "SELECT t.id, t.status, t.policy FROM deps d JOIN tasks t ON t.id = d.task_id WHERE d.prereq_id = ?",
                (pid,),
            ).fetchall():
                if dep in seen or st in _TERMINAL_VALUES or st == _RUNNING:
                    continue
                if pol == DependentPolicy.CANCEL.value:
                    seen.add(dep)
                    out.append(dep)
                    work.append(dep)
        return out

    # --- progress of acceptance criteria -----------------------------------------------------------------

    def mark_criteria_done(self, task_id: str, fencing_token: int, criterion_ids: Iterable[str]) -> list[str]:
        """A worker reports acceptance criteria met (used by the progress pulse).  Returns all done so far."""
        now = self.clock()
        with self.store.write() as c:
            self._check_holder(c, task_id, fencing_token)
            spec_blob, done_blob = c.execute(
                "SELECT spec, criteria_done FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            known = [a[0] for a in unpack(spec_blob)["acceptance_criteria"]]
            wanted = list(criterion_ids)
            bad = [x for x in wanted if x not in known]
            if bad:
                raise TaskValidationError(f"task {task_id} has no acceptance criteria {bad}")
            done = list(unpack(done_blob) or [])
            done.extend(x for x in wanted if x not in done)
            c.execute("UPDATE tasks SET criteria_done = ?, updated_at = ? WHERE id = ?", (_PACK(done), now, task_id))
            return done

    # --- reading -----------------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        now = self.clock()
        row = self.store.conn.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise UnknownTask(f"no task {task_id!r}")
        return self._row_to_task(row, now)

    def tasks(self, status: Status | None = None) -> list[Task]:
        now = self.clock()
        with self.store.read() as c:
            if status is None:
                rows = c.execute(f"SELECT {_TASK_COLS} FROM tasks ORDER BY seq").fetchall()
            else:
                rows = c.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE status = ? ORDER BY seq", (status.value,)).fetchall()
        return [self._row_to_task(r, now) for r in rows]

    def status_of(self, task_id: str) -> Status:
        row = self.store.conn.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise UnknownTask(f"no task {task_id!r}")
        return Status(row[0])

    def prerequisites_of(self, task_id: str) -> list[str]:
        return [r[0] for r in self.store.conn.execute("SELECT prereq_id FROM deps WHERE task_id = ? ORDER BY prereq_id", (task_id,))]

    def dependents_of(self, task_id: str) -> list[str]:
        return [r[0] for r in self.store.conn.execute("SELECT task_id FROM deps WHERE prereq_id = ? ORDER BY task_id", (task_id,))]

    def _row_to_task(self, row: tuple[Any, ...], now: float) -> Task:
        (tid, st, base, source, deadline, est, depth, ready_at, attempts, created, updated, started, finished,
         not_before, holder, expires, token, blocked, spec_blob, input_blob, result_blob, error, hist, done,
         rq_from, rq_as, manifest_id) = row
        d = unpack(spec_blob)
        d["id"] = tid
        d["input"] = decode_payload(input_blob)
        d["acceptance_criteria"] = [{"id": a, "text": b} for a, b in d["acceptance_criteria"]]
        aging_from = ready_at if st == _READY else None
        bd = prio.explain(
            self._w, base_priority=base, depth=depth, source=source, deadline=deadline, estimate=est,
            ready_at=aging_from, now=now,
        )
        d.update(
            status=st, calculated_priority=bd.total, priority_breakdown=bd, downstream_depth=depth,
            result=decode_payload(result_blob), error=error, attempts=attempts,
            attempt_history=unpack(hist) or [], created_at=_dt(created), updated_at=_dt(updated),
            ready_at=_dt(ready_at), started_at=_dt(started), finished_at=_dt(finished),
            not_before=_dt(not_before) if not_before else None, lease_holder=holder,
            lease_expires_at=_dt(expires), fencing_token=token, blocked_reason=blocked,
            criteria_done=unpack(done) or [], requeued_from=rq_from, requeued_as=rq_as, manifest_id=manifest_id,
        )
        # model_validate re-checks stored data; input/result are Any, so payloads pass through untouched.
        return Task.model_validate(d)

    def waiting_reasons(self) -> dict[str, str]:
        """For every non-terminal task that is not running: why it is not running right now."""
        now = self.clock()
        out: dict[str, str] = {}
        with self.store.read() as c:
            running: Counter[str] = Counter(
                dict(c.execute("SELECT agent_type, count(*) FROM tasks WHERE status = 'running' GROUP BY agent_type").fetchall())
            )
            total_running = sum(running.values())
            waiting_on: dict[str, list[str]] = {}
            for tid, p, pst in c.execute(
                "SELECT d.task_id, d.prereq_id, p.status FROM deps d JOIN tasks t ON t.id = d.task_id"
                " JOIN tasks p ON p.id = d.prereq_id WHERE t.status IN ('pending', 'blocked')"
            ):
                if pst != _COMPLETED:
                    waiting_on.setdefault(tid, []).append(f"{p} ({pst})")
            for tid, st, at, nb, blocked in c.execute(
                "SELECT id, status, agent_type, not_before, blocked_reason FROM tasks"
                " WHERE status IN ('pending', 'ready', 'blocked')"
            ):
                if st == _PENDING:
                    w = waiting_on.get(tid)
                    out[tid] = "waiting on prerequisites: " + ", ".join(sorted(w)) if w else "pending release"
                elif st == _BLOCKED:
                    out[tid] = f"blocked: {blocked}"
                elif nb > now:
                    out[tid] = f"retry backoff until {_dt(nb).isoformat()}"  # type: ignore[union-attr]
                else:
                    lim = self.config.wip_limit_for(at)
                    g = self.config.wip_global
                    if lim is not None and running[at] >= lim:
                        out[tid] = f"ready; WIP limit for {at} reached ({running[at]}/{lim} running)"
                    elif g is not None and total_running >= g:
                        out[tid] = f"ready; global WIP limit reached ({total_running}/{g} running)"
                    else:
                        out[tid] = "ready; waiting for a claim"
        return out

    # --- planning ----------------------------------------------------------------------------------------

    def plan(self, task_ids: Iterable[str], *, wip_limit: int | None = None, default_estimate_s: float = 1.0) -> ExecutionPlan:
        """An execution plan for ``task_ids`` (see planner.build_plan).  Terminal tasks are not planned."""
        ids = list(dict.fromkeys(task_ids))
        with self.store.read() as c:
            est: dict[str, float] = {}
            status: dict[str, str] = {}
            for part in chunked(ids):
                q = ",".join("?" * len(part))
                for tid, st, e in c.execute(f"SELECT id, status, estimate FROM tasks WHERE id IN ({q})", part):
                    status[tid] = st
                    est[tid] = e
            unknown = [t for t in ids if t not in status]
            if unknown:
                raise UnknownTask(f"no task(s) {unknown[:10]}", details=[{"task_id": t} for t in unknown])
            skipped = {t: Status(s) for t, s in status.items() if s in _TERMINAL_VALUES}
            live = [t for t in ids if t not in skipped]
            prereqs: dict[str, list[str]] = {t: [] for t in live}
            for part in chunked(live):
                q = ",".join("?" * len(part))
                for tid, p in c.execute(f"SELECT task_id, prereq_id FROM deps WHERE task_id IN ({q})", part):
                    prereqs[tid].append(p)
            outside = sorted({p for ps in prereqs.values() for p in ps if p not in prereqs})
            ext_status: dict[str, str] = {}
            for part in chunked(outside):
                q = ",".join("?" * len(part))
                ext_status.update(c.execute(f"SELECT id, status FROM tasks WHERE id IN ({q})", part).fetchall())
        estimates = {t: (est[t] if est[t] > 0 else default_estimate_s) for t in live}
        return build_plan(
            estimates, prereqs, wip_limit=wip_limit,
            external_done={p for p, s in ext_status.items() if s == _COMPLETED},
            skipped_terminal=skipped,
        )


# Chunk size for IN lists in statements that bind a few parameters of their own besides the ids.
SQL_VARS_WITH_NOW: Final = SQL_MAX_VARS - 8

_RESULT_LIST: Final = TypeAdapter(list[EnqueueResult])

# Column order of the rows _enqueue builds.
_INSERT_COLS: Final = (
    "id", "status", "agent_type", "source", "base_priority", "risk", "policy", "deadline", "deadline_sort",
    "estimate", "depth", "static_score", "rank", "unmet", "max_attempts", "timeout", "idempotency_key",
    "created_at", "updated_at", "ready_at", "finished_at", "blocked_reason", "error", "spec", "input",
    "requeued_from", "manifest_id",
)

_TASK_COLS: Final = (
    "id, status, base_priority, source, deadline, estimate, depth, ready_at, attempts, created_at, updated_at,"
    " started_at, finished_at, not_before, lease_holder, lease_expires_at, fencing_token, blocked_reason, spec,"
    " input, result, error, history, criteria_done, requeued_from, requeued_as, manifest_id"
)


def _attempt(
    attempt: int, holder: str | None, token: int, started: float, ended: float, outcome: str, error: str | None
) -> dict[str, Any]:
    # Validated shape (AttemptRecord) but stored as a plain dict to keep the blob small and schema-free.
    AttemptRecord(attempt=attempt, holder=holder, fencing_token=token, started_at=started, ended_at=ended,
                  outcome=outcome, error=error)  # type: ignore[arg-type]
    return {"attempt": attempt, "holder": holder, "fencing_token": token, "started_at": started,
            "ended_at": ended, "outcome": outcome, "error": error}


def _pack_spec(s: TaskSpec) -> bytes:
    """The submission minus the input payload (stored in its own column), exactly as given."""
    return _PACK(
        {
            "summary": s.summary,
            "description": s.description,
            "agent_type": s.agent_type,
            "source": s.source,
            "base_priority": s.base_priority,
            "prerequisites": s.prerequisites,
            "deadline": None if s.deadline is None else s.deadline.isoformat(),
            "estimated_duration_s": s.estimated_duration_s,
            "max_attempts": s.max_attempts,
            "timeout_s": s.timeout_s,
            "idempotency_key": s.idempotency_key,
            "risk": s.risk.value,
            "acceptance_criteria": [(a.id, a.text) for a in s.acceptance_criteria],
            "file_scope": s.file_scope,
            "conflicts_with": s.conflicts_with,
            "on_prerequisite_failure": None if s.on_prerequisite_failure is None else s.on_prerequisite_failure.value,
            "metadata": s.metadata,
        }
    )


def _unpack_spec(blob: bytes, input_value: Any) -> TaskSpec:
    d = unpack(blob)
    d["acceptance_criteria"] = [{"id": a, "text": b} for a, b in d["acceptance_criteria"]]
    d["input"] = input_value
    return TaskSpec.model_validate(d)
