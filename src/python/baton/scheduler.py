"""The scheduler: the rules of the task graph, decided in memory, made durable through the store's journal.

State.  Every task is a ``TaskRecord`` in memory with the indexes the rules need: ready queues per
agent_type (heaps in dispatch order), a lease heap, a retry-backoff heap, dependents, idempotency keys and
counters.  Decisions (which task to hand out, what a completion releases, what a cancel reaches) are made
there, without SQL.

Durability.  Every public method that changes anything runs in exactly one store transaction and appends one
journal entry describing the change: compact deltas for the hot transitions (a batch of claims, a batch of
completions) and full record images for everything else.  A crash therefore leaves the whole change or none
of it.  The journal is the store's main record: a task that is enqueued, claimed and completed costs one
image and two small deltas, written once.  Only when the journal holds mostly superseded data (records
changed again and again: heartbeats, retries) is it compacted: the images of every record become the new
snapshot and the journal is emptied, so compaction work is paid for by churn, not by throughput.  Opening a
store loads the snapshot and replays the journal.

Several processes (or threads, one Scheduler each) may share a store: every write transaction takes SQLite's
write lock first and then applies the journal entries other writers committed since (``PRAGMA data_version``
says when there are any), so a claim is decided on the latest state and two claimers never get the same
task.  Reads catch up the same way.

Time comes from an injectable ``clock`` (unix seconds) so that leases, backoff, deadlines and aging are
testable without sleeping; jitter comes from an injectable ``random.Random``.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

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
    Risk,
    Status,
    SPEC_DEFAULTS,
    Submission,
    Task,
    TaskSpec,
    check_transition,
    decode_payload,
    encode_payload,
    parse_specs,
    summarize_details,
)
from baton.planner import build_plan, gc_paused
from baton.scheduler_errors import (
    DependencyCycle,
    DuplicateTask,
    InvalidTransition,
    StaleLease,
    TaskValidationError,
    UnknownPrerequisite,
    UnknownTask,
)
from baton.store import TaskStore
from baton.taskstate import (
    TaskRecord,
    given_fields,
    pack_image,
    pack_spec,
    pack_values,
    unpack_image,
    unpack_spec,
    unpack_values,
)

__all__ = ["Scheduler", "SchedulerConfig", "dispatch_key"]

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
_STATUS: Final = {s.value: s for s in Status}  # value -> member without Status(value)'s lookup machinery
# A Submission holds only the fields given; these are the stored values of the defaults read per task.
_HUMAN: Final = SPEC_DEFAULTS["source"]
_DEFAULT_PRIORITY: Final = SPEC_DEFAULTS["base_priority"]
_DEFAULT_ATTEMPTS: Final = SPEC_DEFAULTS["max_attempts"]
_RISK_VALUE: Final[dict[Risk | None, str]] = {None: SPEC_DEFAULTS["risk"].value, **{r: r.value for r in Risk}}
# NamedTuple constructors run a Python-level __new__; tuple.__new__ builds the same object in C (one per task).
_new_result: Final[Callable[[tuple[str, bool, Status]], EnqueueResult]] = partial(tuple.__new__, EnqueueResult)
_new_claim: Final[Callable[[tuple[Any, ...]], Claim]] = partial(tuple.__new__, Claim)

# Journal entry: [ops, images].  ops are deltas for the hot paths, replayed by the same code that applied
# them live; images are the final state of every other record the change touched, applied after the ops.
_OP_CLAIM: Final = 0  # [0, now, holder, fence, [[id, lease_expires_at], ...]]
_OP_DONE: Final = 1  # [1, now, [[id, result_blob], ...]]
_CHUNK: Final = 65_536  # images per snapshot row


@dataclass(slots=True)
class Activity:
    """What this scheduler did since it was opened (the daemon's metrics).  Counted as it happens, never
    while loading or replaying the store; a transaction that fails after counting keeps its counts."""

    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (from, to) -> changes
    submitted: int = 0  # records created (enqueue, manifest import, requeue)
    attempts_failed: int = 0  # reported failures, expired leases, lost agents
    retried: int = 0  # ... of which made the task ready for another try


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
    # Compact the journal into a fresh snapshot once it is at least compact_min_bytes long and more than
    # compact_ratio times what one image of each record it touches would take.
    compact_min_bytes: int = 64 << 20
    compact_ratio: float = 2.0

    def wip_limit_for(self, agent_type: str) -> int | None:
        return self.wip_limits.get(agent_type, self.wip_per_agent_type)


def _new_ids(n: int) -> Iterator[str]:
    """``n`` fresh task ids: 12 hex digits of unix milliseconds, then 20 random hex digits (80 bits).
    Time-ordered, so ids generated together sort together; one os.urandom call per batch (no UUID object per
    id)."""
    ms = f"{time.time_ns() // 1_000_000:012x}"
    rnd = os.urandom(10 * n).hex()
    return (ms + rnd[k : k + 20] for k in range(0, 20 * n, 20))


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
        self._aging_rate = self._w.aging_rate
        self._static_memo: dict[tuple[int, int, str], float] = {}
        self._in_txn = False
        self.activity = Activity()
        self._counting = False  # count transitions only live, never while loading or replaying
        self._load()
        self._counting = True

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- memory: loading, indexes, journal -----------------------------------------------------------------

    def _reset(self) -> None:
        self._by_id: dict[str, TaskRecord] = {}
        self._children: dict[str, list[str]] = {}  # prerequisite -> dependents (live edges)
        self._idem: dict[str, str] = {}  # idempotency key -> task id
        # Queue entries name their task by id, not by record: a tuple of plain values is dropped from the
        # cyclic GC's tracking at its first collection, a tuple holding a record is rescanned in every full
        # collection for as long as it is queued (a backlog, or leases kept until they expire).
        self._ready: dict[str, list[tuple[float, float, int, int, str]]] = {}  # per agent_type (dispatch_key)
        self._delayed: list[tuple[float, int, int, str]] = []  # in retry backoff: (not_before, seq, qver, id)
        self._leases: list[tuple[float, int, int, str]] = []  # (expires, seq, token, id)
        self._ready_deadline: dict[str, TaskRecord] = {}  # ready tasks whose rank changes with time
        self._counts: Counter[str] = Counter()  # tasks per status
        self._running_n: Counter[str] = Counter()  # running tasks per agent_type
        self._ready_n: Counter[str] = Counter()  # ready tasks per agent_type (delayed retries included)
        self._requeues: Counter[str] = Counter()  # dead letter id -> copies made
        self._next_seq = 1
        self._last_refresh = float("-inf")
        self._applied = 0  # last journal seq reflected in memory
        # Compaction bookkeeping (see compact_ratio): journal bytes since the snapshot, distinct records they
        # touch (TaskRecord.journaled), and the bytes of the images packed so far (for the average).
        self._journal_bytes = 0
        self._journaled = 0
        self._image_bytes = 0
        self._images = 0
        self._ops: list[list[Any]] = []  # this transaction's deltas (and the records they changed) ...
        self._delta_recs: list[TaskRecord] = []
        self._puts: dict[str, TaskRecord] = {}  # ... and the records it changed otherwise
        self._mutated = False

    def _load(self) -> None:
        """Snapshot + journal -> memory (at open, and after a failed transaction)."""
        counting, self._counting = self._counting, False
        try:
            self._reset()
            with self.store.read() as c:
                self._dv = self.store.data_version()
                self._load_snapshot(c)
                self._replay(c, self.clock())
        finally:
            self._counting = counting

    def _load_snapshot(self, c: sqlite3.Connection) -> None:
        now = self.clock()
        for img in self.store.snapshot(c):
            self._apply_image(img, now)
        self._applied = self.store.journal_floor(c)

    def _replay(self, c: sqlite3.Connection, now: float) -> None:
        for seq, entry in self.store.journal_after(c, self._applied):
            ops, images = unpack_values(entry)
            touched = [rec for op in ops for rec in self._apply_op(op)]
            touched.extend(self._apply_image(img, now) for img in images)
            self._account(len(entry), touched)
            self._applied = seq

    def _catch_up(self, c: sqlite3.Connection) -> None:
        """Apply what other connections committed since we last looked (call inside a transaction)."""
        dv = self.store.data_version()
        if dv == self._dv:
            return
        self._dv = dv
        if self.store.journal_floor(c) > self._applied:
            # Another writer folded entries we never saw into the snapshot: start over from it.
            self._reset()
            self._load_snapshot(c)
        self._replay(c, self.clock())

    def _sync(self) -> None:
        """Catch up before a read (outside of a write transaction)."""
        if self._in_txn or self.store.data_version() == self._dv:
            return
        with self.store.read() as c:
            self._catch_up(c)

    def transaction(self, *, deferred: bool = False) -> AbstractContextManager[sqlite3.Connection]:
        """One atomic change: the store's write transaction, caught up with other writers, ending with one
        journal entry.  Re-entrant.  If anything fails, the store rolls back and memory is reloaded.

        ``deferred``: on an exclusive store, the SQL waits for the end (TaskStore.write), so the caller can
        act on the changed memory (send the claimed tasks) before any statement runs.  Only the scheduler's
        own methods may be called inside; the yielded connection must not be used.  Ignored otherwise."""
        if self._in_txn:
            # Joining the open transaction (every public method does): a plain object, not a generator.
            return nullcontext(self.store.conn)
        return self._transaction(deferred)

    @contextmanager
    def _transaction(self, deferred: bool) -> Iterator[sqlite3.Connection]:
        self._in_txn = True
        self._mutated = False
        try:
            # A batch allocates a few objects per task and frees few until it returns; letting the cyclic
            # GC run meanwhile rescans every long-lived record again and again (visible under callgrind).
            # Garbage made meanwhile is collected afterwards.
            with gc_paused(), self.store.write(deferred=deferred) as c:
                self._catch_up(c)
                yield c
                self._flush(c)
        except BaseException:
            if self._mutated:
                log.warning("transaction failed after changing memory; reloading from the store")
                self._load()
            raise
        finally:
            self._in_txn = False
            self._ops = []
            self._puts = {}
            self._delta_recs = []

    def _flush(self, c: sqlite3.Connection) -> None:
        """Append this transaction's journal entry; compact when the journal is mostly superseded data."""
        if not self._ops and not self._puts:
            return
        # The images are already msgpack: the entry is assembled from them rather than packed again.
        images = [r.img or _cache_image(r) for r in self._puts.values()]
        self._image_bytes += sum(map(len, images))
        self._images += len(images)
        entry = b"\x92" + pack_values(self._ops) + _array_header(len(images)) + b"".join(images)  # [ops, images]
        self._applied = self.store.append(c, entry)
        self._account(len(entry), self._puts.values())
        self._account(0, self._delta_recs)
        cfg = self.config
        if self._journal_bytes >= cfg.compact_min_bytes and self._journal_bytes > (
            cfg.compact_ratio * self._journaled * self._image_bytes / max(1, self._images)
        ):
            self._compact(c)

    def _account(self, nbytes: int, touched: Iterable[TaskRecord]) -> None:
        self._journal_bytes += nbytes
        for r in touched:
            if not r.journaled:
                r.journaled = True
                self._journaled += 1

    def compact(self) -> None:
        """Write every record's image as the new snapshot and empty the journal (also done automatically,
        see SchedulerConfig.compact_ratio; a daemon can call this when idle)."""
        with self.transaction() as c:
            self._compact(c)

    def _compact(self, c: sqlite3.Connection) -> None:
        recs = list(self._by_id.values())
        chunks = [
            _array_header(len(part)) + b"".join([r.img or pack_image(r) for r in part])
            for part in (recs[i : i + _CHUNK] for i in range(0, len(recs), _CHUNK))
        ]
        self.store.checkpoint(c, chunks, self._applied)
        log.info("compacted %d journal bytes into a snapshot of %d records", self._journal_bytes, len(recs))
        for r in recs:
            r.journaled = False
            r.img = None  # cached only until the snapshot has it
        self._journal_bytes = self._journaled = 0

    def _static(self, base_priority: int, depth: int, source: str) -> float:
        """priority.static_score, memoised: few distinct inputs, computed for every task created."""
        key = (base_priority, depth, source)
        v = self._static_memo.get(key)
        if v is None:
            if len(self._static_memo) > 4096:
                self._static_memo.clear()
            v = self._static_memo[key] = prio.static_score(self._w, base_priority, depth, source)
        return v

    def _touch(self, rec: TaskRecord) -> None:
        rec.img = None
        self._puts[rec.id] = rec
        self._mutated = True

    def _apply_image(self, img: bytes | Sequence[Any], now: float) -> TaskRecord:
        """Install a record image (snapshot, replay, or another writer's change) and index it."""
        values: Sequence[Any] = unpack_values(img) if isinstance(img, bytes) else img
        tid: str = values[1]
        rec = self._by_id.get(tid)
        old_status: str | None = None
        old_prereqs: tuple[str, ...] = ()
        if rec is None:
            rec = unpack_image(values)
            self._by_id[tid] = rec
            if rec.seq >= self._next_seq:
                self._next_seq = rec.seq + 1
        else:
            old_status, old_prereqs = rec.status, rec.prereqs
            unpack_image(values, into=rec)
            rec.img = None
        rec.static = self._static(rec.base_priority, rec.depth, rec.source)
        if old_prereqs != rec.prereqs:
            for p in old_prereqs:
                self._children.get(p, []).remove(tid)
            for p in rec.prereqs:
                self._children.setdefault(p, []).append(tid)
        if rec.idem is not None:
            self._idem[rec.idem] = tid
        if rec.requeued_from is not None and old_status is None:
            self._requeues[rec.requeued_from] += 1
        self._index(rec, old_status, now)
        return rec

    def _index(self, rec: TaskRecord, old: str | None, now: float) -> None:
        """Keep counters and queues in step with ``rec.status`` (which was ``old``; None for a new record)."""
        new = rec.status
        if self._counting:
            act = self.activity
            if old is None:
                act.submitted += 1
            elif old != new:
                act.transitions[(old, new)] += 1
        if old is not None:
            self._counts[old] -= 1
            if old == _RUNNING:
                self._running_n[rec.agent_type] -= 1
            elif old == _READY:
                self._ready_deadline.pop(rec.id, None)
                self._ready_n[rec.agent_type] -= 1
        self._counts[new] += 1
        if new == _READY:
            self._ready_n[rec.agent_type] += 1
            self._queue(rec, now)
        elif new == _RUNNING:
            self._running_n[rec.agent_type] += 1
            if rec.expires is not None:
                heapq.heappush(self._leases, (rec.expires, rec.seq, rec.token, rec.id))

    def _set(self, rec: TaskRecord, status: str, now: float) -> None:
        """A validated state transition with index upkeep; the record goes into this transaction's entry."""
        old = rec.status
        check_transition(rec.id, _STATUS[old], _STATUS[status])
        rec.status = status
        rec.updated = now
        self._touch(rec)
        self._index(rec, old, now)

    def _queue(self, rec: TaskRecord, now: float) -> None:
        """(Re)queue a ready record with its current rank; older queue entries become stale (qver)."""
        rec.qver += 1
        if rec.deadline is None:  # the common case, inlined: rank = static - aging_rate * ready_at
            rec.rank = rec.static - self._aging_rate * (rec.ready_at or now)
        else:
            rec.rank = prio.rank_key(self._w, rec.static, rec.deadline, rec.estimate, rec.ready_at or now, now)
            self._ready_deadline[rec.id] = rec
        if rec.not_before > now:
            heapq.heappush(self._delayed, (rec.not_before, rec.seq, rec.qver, rec.id))
        else:
            self._push_ready(rec)

    def _push_ready(self, rec: TaskRecord) -> None:
        """Onto its agent_type's heap, in dispatch_key order (spelled out: this runs for every new task)."""
        heap = self._ready.get(rec.agent_type)
        if heap is None:
            heap = self._ready[rec.agent_type] = []
        key = prio.NO_DEADLINE if rec.deadline is None else rec.deadline
        heapq.heappush(heap, (-rec.rank, key, rec.seq, rec.qver, rec.id))

    def _promote_delayed(self, now: float) -> None:
        d = self._delayed
        while d and d[0][0] <= now:
            _, _, qv, tid = heapq.heappop(d)
            rec = self._by_id[tid]
            if rec.qver == qv and rec.status == _READY:
                self._push_ready(rec)

    def _apply_op(self, op: list[Any]) -> list[TaskRecord]:
        """Apply one delta (live and at replay): the records it changed."""
        out = []
        if op[0] == _OP_CLAIM:
            _, now, holder, fence, items = op
            by_id, leases, push = self._by_id, self._leases, heapq.heappush
            for tid, expires in items:
                rec = by_id[tid]  # ready (checked by the claimer): _index inlined for that case
                rec.img = None
                rec.status = _RUNNING
                rec.attempts += 1
                rec.holder = holder
                rec.expires = expires
                rec.token = fence
                rec.started = rec.updated = now
                if rec.deadline is not None:
                    self._ready_deadline.pop(tid, None)
                push(leases, (expires, rec.seq, fence, tid))
                out.append(rec)
            n = len(items)
            self._counts[_READY] -= n
            self._counts[_RUNNING] += n
            agent_type = by_id[items[0][0]].agent_type
            self._running_n[agent_type] += n
            self._ready_n[agent_type] -= n
            if self._counting:
                self.activity.transitions[(_READY, _RUNNING)] += n
        elif op[0] == _OP_DONE:
            _, now, items = op
            by_id, running_n = self._by_id, self._running_n
            for tid, blob in items:
                rec = by_id[tid]  # running (checked by the completer): _index inlined for that case
                rec.img = None
                rec.status = _COMPLETED
                rec.result = blob
                rec.finished = rec.updated = now
                rec.holder = rec.expires = rec.error = None
                running_n[rec.agent_type] -= 1
                out.append(rec)
            self._counts[_RUNNING] -= len(items)
            self._counts[_COMPLETED] += len(items)
            if self._counting:
                self.activity.transitions[(_RUNNING, _COMPLETED)] += len(items)
        else:  # pragma: no cover - a journal written by a newer baton
            raise ValueError(f"unknown journal op {op[0]!r}")
        return out

    def _delta(self, op: list[Any]) -> None:
        self._mutated = True
        self._delta_recs.extend(self._apply_op(op))
        self._ops.append(op)

    def _get(self, task_id: str) -> TaskRecord:
        rec = self._by_id.get(task_id)
        if rec is None:
            raise UnknownTask(f"no task {task_id!r}")
        return rec

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
        with gc_paused():
            parsed = parse_specs(specs)
            with self.transaction():
                return self._enqueue(parsed, self.clock(), manifest_id=manifest_id)

    def _enqueue(
        self,
        specs: list[Submission],
        now: float,
        *,
        manifest_id: str | None = None,
        requeued_from: Mapping[str, str] | None = None,
    ) -> list[EnqueueResult]:
        by_id = self._by_id
        results: list[EnqueueResult | None] = [None] * len(specs)

        # Ids, idempotency and duplicates in one pass.  A known key returns the existing task, and so does a
        # repeat of a key inside the batch (resolved at the end, once the first holder has its id).
        batch_keys: dict[str, int] = {}
        new: dict[str, tuple[int, Submission]] = {}  # id -> (index, spec), in submission order
        details: list[dict[str, Any]] = []
        fresh_ids = _new_ids(sum(1 for s in specs if s.get("id") is None))
        has_prereqs = False
        for i, s in enumerate(specs):
            k = s.get("idempotency_key")
            if k is not None:
                known = self._idem.get(k)
                if known is not None:
                    results[i] = EnqueueResult(known, False, _STATUS[by_id[known].status])
                    continue
                if k in batch_keys:
                    continue
                batch_keys[k] = i
            tid = s.get("id") or next(fresh_ids)
            if tid in new or tid in by_id:
                details.append({"index": i, "task_id": tid, "code": "DUPLICATE_ID",
                                "message": "id repeated in batch" if tid in new else "id already exists"})
            new[tid] = (i, s)
            has_prereqs = has_prereqs or "prerequisites" in s
        if details:
            raise DuplicateTask(f"task id {details[0]['task_id']!r} is not unique", details=details)
        spec_blobs, inputs = _encode_blobs(specs, new.values())

        if has_prereqs:
            missing = [
                {"index": i, "task_id": tid, "prerequisite": p, "code": "UNKNOWN_PREREQUISITE",
                 "message": f"prerequisite {p!r} does not exist"}
                for tid, (i, s) in new.items() for p in s.get("prerequisites", ()) if p not in new and p not in by_id
            ]
            if missing:
                m = missing[0]
                raise UnknownPrerequisite(
                    f"task {m['task_id']!r}: prerequisite {m['prerequisite']!r} does not exist", details=missing
                )
            # Cycles can only form inside the batch (stored tasks cannot depend on tasks not yet created).
            order = _topo_order(new)
            # Downstream depth inside the batch (reverse topological order).
            depth: dict[str, int] = dict.fromkeys(order, 0)
            for tid in reversed(order):
                d1 = depth[tid] + 1
                for p in new[tid][1].get("prerequisites", ()):
                    if p in new and depth[p] < d1:
                        depth[p] = d1
        else:
            order = list(new)
            depth = {}

        # Create each record and decide its state, in topological order so a prerequisite's fate is known.
        policy_default = self.config.default_policy.value
        seq = self._next_seq
        children = self._children
        counts, aging_rate, ready_n = self._counts, self._aging_rate, self._ready_n
        fast = 0  # records created without _index, which counts the others
        static_memo = self._static_memo
        for tid in order:
            i, s = new[tid]
            g: Callable[..., Any] = s.get  # the fields given; defaults spelled out below
            pol = g("on_prerequisite_failure")
            policy = policy_default if pol is None else pol.value
            prereqs = tuple(g("prerequisites", ()))
            d = depth.get(tid, 0)
            if prereqs:
                status, unmet, ready_at, finished, error, blocked = self._initial_state(prereqs, policy, now)
            else:
                status, unmet, ready_at, finished, error, blocked = _READY, 0, now, None, None, None
            # The image first (IMAGE_FIELDS order): it builds the record positionally (faster than
            # keywords) and is packed for the journal as is.
            source, base_priority, deadline = g("source", _HUMAN), g("base_priority", _DEFAULT_PRIORITY), g("deadline")
            if deadline is not None:
                deadline = deadline.timestamp()
            static = static_memo.get((base_priority, d, source))
            if static is None:
                static = self._static(base_priority, d, source)
            img = (
                seq, tid, status, s["agent_type"], source, base_priority, _RISK_VALUE[g("risk")], policy,
                deadline, g("estimated_duration_s") or 0.0, d, unmet, 0, g("max_attempts", _DEFAULT_ATTEMPTS),
                g("timeout_s"), g("idempotency_key"), now, now, ready_at, None, finished, 0.0, None, None, 0,
                blocked, spec_blobs[i], inputs[i], None, error, (), (),
                requeued_from.get(tid) if requeued_from else None, None, manifest_id, prereqs,
            )
            r = TaskRecord(*img, static)
            r.img = pack_values(img)
            seq += 1
            by_id[tid] = r
            if r.idem is not None:
                self._idem[r.idem] = tid
            if r.requeued_from is not None:
                self._requeues[r.requeued_from] += 1
            for p in prereqs:
                children.setdefault(p, []).append(tid)
            if status == _READY and deadline is None:  # _index's common case, without its calls (callgrind)
                counts[_READY] += 1
                ready_n[r.agent_type] += 1
                r.qver = 1
                r.rank = static - aging_rate * now
                self._push_ready(r)
                fast += 1
            else:
                self._index(r, None, now)
            self._puts[tid] = r
            results[i] = _new_result((tid, True, _STATUS[status]))
        self._next_seq = seq
        self._mutated = True
        if self._counting:
            self.activity.submitted += fast

        if has_prereqs:  # stored prerequisites now have longer chains below them
            bumps: dict[str, int] = {}
            for tid, (_, s) in new.items():
                for p in s.get("prerequisites", ()):
                    if p not in new:
                        bumps[p] = max(bumps.get(p, 0), depth[tid] + 1)
            if bumps:
                self._raise_depths(bumps, now)

        for i, s in enumerate(specs):
            if results[i] is None:  # repeated idempotency key inside the batch
                first = results[batch_keys[s["idempotency_key"]]]  # type: ignore[index]  # set: see the first loop
                assert first is not None
                results[i] = EnqueueResult(first.task_id, False, first.status)
        return results  # type: ignore[return-value]

    def _initial_state(
        self, prereqs: Sequence[str], policy: str, now: float
    ) -> tuple[str, int, float | None, float | None, str | None, str | None]:
        """(status, unmet, ready_at, finished, error, blocked_reason) of a new task from its prerequisites'
        states (all known by now) and its policy."""
        u = 0
        blocked: str | None = None
        for p in prereqs:
            pst = self._by_id[p].status
            if pst == _COMPLETED:
                continue
            if pst in _FAILED_VALUES:
                if policy == "proceed":
                    continue
                if policy == "cancel":
                    return _CANCELLED, u, None, now, f"prerequisite {p} is {pst}", None
                blocked = blocked or f"prerequisite {p} is {pst}"
            u += 1
        if blocked is not None:
            return _BLOCKED, u, None, None, None, blocked
        if u == 0:
            return _READY, 0, now, None, None, None
        return _PENDING, u, None, None, None, None

    def _raise_depths(self, bumps: dict[str, int], now: float) -> None:
        """Propagate a longer dependent chain up through non-terminal ancestors (depth only ever grows here)."""
        work = deque(bumps.items())
        while work:
            tid, d = work.popleft()
            rec = self._by_id.get(tid)
            if rec is None or rec.depth >= d or rec.status in _TERMINAL_VALUES:
                continue
            rec.depth = d
            rec.static = self._static(rec.base_priority, d, rec.source)
            self._touch(rec)
            if rec.status == _READY:
                self._queue(rec, now)
            for p in rec.prereqs:
                work.append((p, d + 1))

    def add_prerequisite(self, task_id: str, prereq_id: str) -> Status:
        """Make ``task_id`` wait for ``prereq_id``; rejected if it would create a cycle.  Returns the status."""
        with self.transaction():
            now = self.clock()
            rec = self._get(task_id)
            st = rec.status
            if st in _TERMINAL_VALUES or st == _RUNNING:
                raise InvalidTransition(f"task {task_id} is {st}; prerequisites can no longer be added")
            pre = self._by_id.get(prereq_id)
            if pre is None:
                raise UnknownPrerequisite(f"prerequisite {prereq_id!r} does not exist")
            if prereq_id in rec.prereqs:
                return _STATUS[st]
            if task_id == prereq_id or self._is_ancestor(task_id, prereq_id):
                raise DependencyCycle(
                    f"{task_id} -> {prereq_id} would create a cycle",
                    details=[{"task_id": task_id, "prerequisite": prereq_id, "code": "DEPENDENCY_CYCLE",
                              "message": "the prerequisite already depends on this task"}],
                )
            rec.prereqs = (*rec.prereqs, prereq_id)
            self._children.setdefault(prereq_id, []).append(task_id)
            self._touch(rec)
            pst = pre.status
            if pst == _COMPLETED:
                return _STATUS[rec.status]
            rec.unmet += 1
            rec.updated = now
            if pst not in _TERMINAL_VALUES:
                if st == _READY:
                    rec.ready_at = None
                    self._set(rec, _PENDING, now)
                self._raise_depths({prereq_id: rec.depth + 1}, now)
            else:
                # A 'cancel' policy cancels task_id, which is then a cancelled prerequisite for its own
                # dependents: the chain goes on through _apply_policies, as for any other cancellation.
                chained: deque[tuple[str, str]] = deque()
                self._apply_policy_one(rec, prereq_id, pst, now, chained)
                if chained:
                    self._apply_policies(chained, now)
            return _STATUS[rec.status]

    def _is_ancestor(self, ancestor: str, of: str) -> bool:
        """Does ``of`` (transitively) depend on ``ancestor``?  Walk prerequisites upward from ``of``."""
        seen = {of}
        frontier = [of]
        while frontier:
            nxt: list[str] = []
            for t in frontier:
                for p in self._by_id[t].prereqs:
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
        picked = self.claim_records(agent_type, holder, n, lease_s=lease_s)
        if not picked:
            return []
        rate_now = self._w.aging_rate * picked[0].started  # type: ignore[operator]  # started: the claim's now
        return [
            _new_claim((r.id, agent_type, r.token, r.expires, r.attempts, decode_payload(r.input), r.rank + rate_now))
            for r in picked
        ]

    def claim_records(
        self, agent_type: str, holder: str, n: int, *, lease_s: float | None = None
    ) -> list[TaskRecord]:
        """``claim_many`` for the coordinator, which sends each task's stored blobs as they are: the claimed
        records themselves (token, expires, attempts, input blob), no Claim tuples, no decoded inputs.  The
        records are the scheduler's own: read them, never change them."""
        if n <= 0:
            return []
        lease = self.config.lease_s if lease_s is None else lease_s
        if lease <= 0:
            raise ValueError("lease_s must be > 0")
        with self.transaction() as c:
            now = self.clock()
            self._expire(now)
            self._maybe_refresh(now)
            allowed = self._wip_room(agent_type, n)
            if allowed <= 0:
                return []
            self._promote_delayed(now)
            heap = self._ready.get(agent_type)
            picked: list[TaskRecord] = []
            by_id = self._by_id
            if heap and allowed >= len(heap):
                # Taking the whole queue (a batch claim draining it): one sort costs fewer comparisons than a
                # pop each (a heap built from tasks queued in order is sorted already), and the emptied list
                # is still a heap.
                heap.sort()
                for _, _, _, qv, tid in heap:
                    rec = by_id[tid]
                    if rec.qver == qv and rec.status == _READY:
                        picked.append(rec)
                heap.clear()
            pop = heapq.heappop
            while heap and len(picked) < allowed:
                _, _, _, qv, tid = pop(heap)
                rec = by_id[tid]
                if rec.qver == qv and rec.status == _READY:
                    picked.append(rec)
            if not picked:
                return []
            fence = self.store.next_fence(c)
            items = [
                [r.id, now + (lease if r.timeout is None or r.timeout > lease else r.timeout)] for r in picked
            ]
            self._delta([_OP_CLAIM, now, holder, fence, items])
        return picked

    def reserve_fence(self) -> int:
        """A fencing token for a claim made later (``claim_reserved``): SPEED_CRITICAL hands a dependent's TASK
        to the router before the dependent is ready, so its token must exist first."""
        with self.transaction() as c:
            return self.store.next_fence(c)

    def continuation_of(self, task_id: str) -> TaskRecord | None:
        """SPEED_CRITICAL's continuation of ``task_id``: a dependent that completing it alone makes claimable at
        once (it waits for that one prerequisite and has no retry backoff pending); the first by id when several
        qualify (one per task: it takes the WIP slot its prerequisite frees when both are of one type)."""
        now = self.clock()
        by_id = self._by_id
        for dep in sorted(self._children.get(task_id, ())):
            rec = by_id[dep]
            if rec.status == _PENDING and rec.unmet == 1 and rec.not_before <= now:
                return rec
        return None

    def claim_reserved(
        self, items: Sequence[tuple[str, int]], holder: str, *, lease_s: float | None = None
    ) -> tuple[list[TaskRecord], dict[str, str]]:
        """Claim each task under the token reserved for it (``reserve_fence``), as claim_records would: it must be
        ready now and within its type's WIP limit.  Returns the records claimed and, for the others, why not."""
        lease = self.config.lease_s if lease_s is None else lease_s
        picked: list[TaskRecord] = []
        refused: dict[str, str] = {}
        with self.transaction():
            now = self.clock()
            for tid, token in items:
                rec = self._by_id.get(tid)
                if rec is None or rec.status != _READY:
                    refused[tid] = f"task {tid} is {rec.status if rec else 'unknown'}, not ready"
                elif rec.not_before > now:
                    refused[tid] = f"task {tid} is in retry backoff"
                elif self._wip_room(rec.agent_type, 1) < 1:
                    refused[tid] = f"agent type {rec.agent_type} is at its WIP limit"
                else:
                    expires = now + (lease if rec.timeout is None or rec.timeout > lease else rec.timeout)
                    self._delta([_OP_CLAIM, now, holder, token, [[tid, expires]]])
                    picked.append(rec)
        return picked, refused

    def _wip_room(self, agent_type: str, n: int) -> int:
        limit = self.config.wip_limit_for(agent_type)
        if limit is not None:
            n = min(n, limit - self._running_n[agent_type])
        g = self.config.wip_global
        if g is not None:
            n = min(n, g - self._counts[_RUNNING])
        return n

    def heartbeat(self, task_id: str, fencing_token: int, *, lease_s: float | None = None) -> float:
        """Extend a lease; returns the new expiry.  A stale token (the task was reclaimed) is rejected."""
        lease = self.config.lease_s if lease_s is None else lease_s
        with self.transaction():
            now = self.clock()
            self._expire(now)
            return self._renew(self._check_holder(task_id, fencing_token), now, lease)

    def heartbeat_many(
        self, items: Iterable[tuple[str, int]], *, lease_s: float | None = None
    ) -> tuple[dict[str, float], dict[str, str]]:
        """``heartbeat`` for a batch in one transaction (an agent reports every task it holds at once).

        Returns (new expiry per renewed task, reason per refused task); a refusal leaves the others renewed.
        """
        lease = self.config.lease_s if lease_s is None else lease_s
        renewed: dict[str, float] = {}
        refused: dict[str, str] = {}
        with self.transaction():
            now = self.clock()
            self._expire(now)
            for task_id, token in items:
                try:
                    rec = self._check_holder(task_id, token)
                except (UnknownTask, InvalidTransition, StaleLease) as exc:
                    refused[task_id] = str(exc)
                    continue
                renewed[task_id] = self._renew(rec, now, lease)
        return renewed, refused

    def _renew(self, rec: TaskRecord, now: float, lease: float) -> float:
        """Extend a running task's lease to now + lease (never past its timeout); returns the new expiry."""
        exp = now + lease
        if rec.timeout is not None:
            exp = min(exp, rec.started + rec.timeout)  # type: ignore[operator]
        rec.expires = exp
        rec.updated = now
        self._touch(rec)
        heapq.heappush(self._leases, (exp, rec.seq, rec.token, rec.id))
        return exp

    def release(self, task_id: str, fencing_token: int, *, reason: str, count_attempt: bool) -> Status:
        """Give a running task back to ready before its lease ends; see ``release_many``.  Returns the task's
        new status (ready, or dead_lettered when a counted attempt was its last).  Stale tokens raise."""
        with self.transaction():
            self._expire(self.clock())
            self._check_holder(task_id, fencing_token)
            self.release_many([(task_id, fencing_token)], reason=reason, count_attempt=count_attempt)
            return _STATUS[self._by_id[task_id].status]

    def release_many(
        self, items: Iterable[tuple[str, int]], *, reason: str, count_attempt: bool
    ) -> dict[str, str]:
        """Return running tasks to ready at once, in one transaction (the holder is gone or never started).

        ``count_attempt=True`` (the agent holding it was lost): the attempt counts like an expired lease, is
        recorded in the history with outcome ``lease_expired`` and ``reason`` as the error, and a task out of
        attempts is dead-lettered.  ``count_attempt=False`` (the task never reached a worker: queued in a
        router, or a drain): the claim is undone as if it never happened (attempts back down, no history)
        and the task keeps its place in the queue (its original ready time).  Items whose task is not running
        under that token are skipped.  Returns the new status of each task released.
        """
        out: dict[str, str] = {}
        with self.transaction():
            now = self.clock()
            self._expire(now)
            by_id = self._by_id
            for task_id, token in items:
                rec = by_id.get(task_id)
                if rec is None or rec.status != _RUNNING or rec.token != token:
                    continue
                if count_attempt:
                    log.info("released %s (holder %s, token %d): %s", task_id, rec.holder, token, reason)
                    rec.history = (*rec.history, _attempt(rec, now, "lease_expired", reason))
                    self.activity.attempts_failed += 1
                    if rec.attempts >= rec.max_attempts:
                        self._to_dead(rec, Status.DEAD_LETTERED, f"{reason}; attempts exhausted", now)
                        out[task_id] = rec.status
                        continue
                    rec.error = reason
                    self.activity.retried += 1
                else:
                    rec.attempts -= 1
                rec.holder = rec.expires = None
                self._set(rec, _READY, now)
                out[task_id] = rec.status
        return out

    def has_ready(self, agent_type: str) -> bool:
        """A cheap hint for dispatchers (no transaction): False means ``claim_many(agent_type, ...)`` would
        find nothing now; True means it may (queue entries can be stale, and delayed retries of any type
        count)."""
        if self._ready.get(agent_type):
            return True
        d = self._delayed
        return bool(d) and d[0][0] <= self.clock()

    def _check_holder(self, task_id: str, token: int) -> TaskRecord:
        rec = self._get(task_id)
        if rec.status != _RUNNING:
            if rec.status in _TERMINAL_VALUES:
                raise InvalidTransition(f"task {task_id} is {rec.status}; terminal states never change")
            raise StaleLease(f"task {task_id} is {rec.status}, not running under token {token}")
        if rec.token != token:
            raise StaleLease(f"task {task_id}: fencing token {token} is stale (current {rec.token})")
        return rec

    def expire_leases(self) -> list[str]:
        """Return tasks whose lease has expired to ready (or dead letters when out of attempts)."""
        with self.transaction():
            return self._expire(self.clock())

    def _expire(self, now: float) -> list[str]:
        out = []
        leases = self._leases
        while leases and leases[0][0] <= now:
            exp, _, token, tid = heapq.heappop(leases)
            rec = self._by_id[tid]
            if rec.status != _RUNNING or rec.token != token or rec.expires != exp:
                continue  # stale entry: completed, reclaimed or extended since
            timed_out = rec.timeout is not None and now >= rec.started + rec.timeout  # type: ignore[operator]
            err = "timed out" if timed_out else "lease expired"
            log.info("lease of %s expired (holder %s, token %d)", rec.id, rec.holder, token)
            rec.history = (*rec.history, _attempt(rec, now, "lease_expired", err))
            self.activity.attempts_failed += 1
            if rec.attempts >= rec.max_attempts:
                self._to_dead(rec, Status.DEAD_LETTERED, f"{err}; attempts exhausted", now)
            else:
                self.activity.retried += 1
                rec.holder = rec.expires = None
                rec.error = err
                self._set(rec, _READY, now)
            out.append(rec.id)
        return out

    # --- priorities --------------------------------------------------------------------------------------

    def refresh_priorities(self) -> int:
        """Recompute the deadline-dependent ranks of ready tasks now; returns how many were updated."""
        self._sync()
        return self._refresh(self.clock())

    def _maybe_refresh(self, now: float) -> None:
        if now - self._last_refresh >= self.config.priority_refresh_s:
            self._refresh(now)

    def _refresh(self, now: float) -> int:
        """Requeue ready deadline tasks with their rank at ``now`` (memory only: ranks are derived)."""
        self._last_refresh = now
        recs = list(self._ready_deadline.values())
        for rec in recs:
            self._queue(rec, now)
        return len(recs)

    def explain_priority(self, task_id: str) -> PriorityBreakdown:
        return self.get(task_id).priority_breakdown

    def ready_queue(self, agent_type: str | None = None, limit: int = 100) -> list[tuple[str, float]]:
        """Ready tasks in dispatch order with their calculated priority (refreshing deadline ranks first)."""
        self._sync()
        now = self.clock()
        self._refresh(now)
        recs = [
            r for r in self.records(_READY) if agent_type is None or r.agent_type == agent_type
        ]
        recs.sort(key=dispatch_key)
        rate_now = self._w.aging_rate * now
        return [(r.id, r.rank + rate_now) for r in recs[:limit]]

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
        with self.transaction():
            now = self.clock()
            self._expire(now)
            ok: list[list[Any]] = []
            applied: list[str] = []
            by_id = self._by_id
            for tid, (token, blob) in blobs.items():
                rec = by_id.get(tid)
                if rec is None:
                    rejected[tid] = f"no task {tid!r}"
                    kinds[tid] = UnknownTask
                elif rec.status != _RUNNING:
                    term = rec.status in _TERMINAL_VALUES
                    rejected[tid] = (
                        f"task {tid} is {rec.status}" + ("; terminal states never change" if term else ", not running")
                    )
                    kinds[tid] = InvalidTransition if term else StaleLease
                elif rec.token != token:
                    rejected[tid] = f"task {tid}: fencing token {token} is stale (current {rec.token})"
                    kinds[tid] = StaleLease
                else:
                    ok.append([tid, blob])
                    applied.append(tid)
            released: list[str] = []
            if ok:
                self._delta([_OP_DONE, now, ok])
                released = self._release(applied, now)
        return BatchOutcome(applied, rejected, released), kinds

    def _release(self, satisfied: Sequence[str], now: float) -> list[str]:
        """Count ``satisfied`` prerequisites off their dependents; the ones left with none become ready."""
        released: list[str] = []
        children = self._children
        by_id = self._by_id
        for pid in satisfied:
            for dep in children.get(pid, ()):
                rec = by_id[dep]
                if rec.status in _TERMINAL_VALUES:
                    continue  # a cancelled dependent waits for nothing: no image to journal
                rec.unmet -= 1
                self._touch(rec)
                if rec.unmet == 0 and rec.status == _PENDING:
                    rec.ready_at = now
                    self._set(rec, _READY, now)
                    released.append(dep)
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
        with self.transaction():
            now = self.clock()
            self._expire(now)
            rec = self._check_holder(task_id, fencing_token)
            outcome = "failed_transient" if transient else "failed_permanent"
            rec.history = (*rec.history, _attempt(rec, now, outcome, error))
            self.activity.attempts_failed += 1
            attempts, max_attempts = rec.attempts, rec.max_attempts
            if transient and attempts < max_attempts:
                self.activity.retried += 1
                delay = self.backoff_delay(attempts)
                rec.not_before = now + delay
                rec.holder = rec.expires = None
                rec.error = error
                self._set(rec, _READY, now)
                return FailOutcome(
                    task_id=task_id, status=Status.READY, retry_at=now + delay, attempts=attempts,
                    message=f"attempt {attempts}/{max_attempts} failed; retry in {delay:.3f}s",
                )
            target = Status.DEAD_LETTERED if dead_letter else Status.FAILED
            why = "permanent failure" if not transient else f"attempts exhausted ({attempts}/{max_attempts})"
            self._to_dead(rec, target, f"{error} ({why})", now)
            return FailOutcome(task_id=task_id, status=target, attempts=attempts, message=f"{target.value}: {why}")

    def backoff_delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): equal jitter over a capped exponential."""
        cfg = self.config
        d = min(cfg.backoff_cap_s, cfg.backoff_base_s * (2.0 ** max(0, attempt - 1)))
        return d / 2 + self.rng.uniform(0, d / 2)

    def _to_dead(self, rec: TaskRecord, target: Status, error: str, now: float) -> None:
        rec.error = error
        rec.finished = now
        rec.holder = rec.expires = None
        self._set(rec, target.value, now)
        self._apply_policies([(rec.id, target.value)], now)

    def _apply_policies(self, failed: Iterable[tuple[str, str]], now: float) -> list[str]:
        """Apply each dependent's policy to a prerequisite that failed/dead-lettered/was cancelled.

        Cancellations chain (a cancelled dependent is itself a cancelled prerequisite for its dependents);
        returns the ids cancelled on the way.
        """
        work: deque[tuple[str, str]] = deque(failed)
        cancelled: list[str] = []
        while work:
            pid, pst = work.popleft()
            for dep in list(self._children.get(pid, ())):
                rec = self._by_id[dep]
                if rec.status in _TERMINAL_VALUES or rec.status == _RUNNING:
                    continue  # finished, or already running (it was released by an earlier 'proceed')
                if self._apply_policy_one(rec, pid, pst, now, work):
                    cancelled.append(dep)
        return cancelled

    def _apply_policy_one(
        self, rec: TaskRecord, pid: str, pst: str, now: float, work: deque[tuple[str, str]]
    ) -> bool:
        self._touch(rec)
        rec.updated = now
        if rec.policy == "proceed":
            rec.unmet -= 1
            if rec.status == _PENDING and rec.unmet == 0:
                rec.ready_at = now
                self._set(rec, _READY, now)
            return False
        if rec.policy == "cancel":
            rec.error = f"prerequisite {pid} is {pst}"
            rec.finished = now
            rec.blocked_reason = None
            self._set(rec, _CANCELLED, now)
            work.append((rec.id, _CANCELLED))
            return True
        if rec.blocked_reason is None:
            rec.blocked_reason = f"prerequisite {pid} is {pst}"
        if rec.status != _BLOCKED:
            rec.ready_at = None
            self._set(rec, _BLOCKED, now)
        return False

    # --- dead letters ------------------------------------------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[Task]:
        self._sync()
        now = self.clock()
        recs = [r for r in self.records(_DEAD_LETTERED) if r.requeued_as is None]
        recs.sort(key=lambda r: (r.finished, r.seq))
        return [self._to_task(r, now) for r in recs[:limit]]

    def requeue_dead_letter(self, task_id: str, *, new_id: str | None = None) -> EnqueueResult:
        """Requeue a dead letter as a new task with the same submission (terminal states never change, so the
        dead letter stays as the record of what happened).  Dependents blocked on it now wait for the copy."""
        with self.transaction():
            now = self.clock()
            rec = self._get(task_id)
            if rec.status != _DEAD_LETTERED:
                raise InvalidTransition(f"task {task_id} is {rec.status}, not dead_lettered")
            if rec.requeued_as is not None:
                return EnqueueResult(task_id=rec.requeued_as, created=False,
                                     status=_STATUS[self._by_id[rec.requeued_as].status])
            nid = new_id or f"{task_id}.r{self._requeues[task_id] + 1}"
            given = given_fields(rec.spec)
            given.pop("idempotency_key", None)
            given.update(id=nid, input=decode_payload(rec.input))
            res = self._enqueue(parse_specs([given]), now, requeued_from={nid: task_id})[0]
            rec.requeued_as = nid
            self._touch(rec)
            # Rewire the dependents that were parked because of this dead letter.
            max_depth = 0
            for dep in list(self._children.get(task_id, ())):
                d = self._by_id[dep]
                if d.status != _BLOCKED:
                    continue
                d.prereqs = tuple(nid if p == task_id else p for p in d.prereqs)
                self._children[task_id].remove(dep)
                self._children.setdefault(nid, []).append(dep)
                self._touch(d)
                still_bad = next(
                    ((p, self._by_id[p].status) for p in d.prereqs if self._by_id[p].status in _FAILED_VALUES), None
                )
                if still_bad is None:
                    d.blocked_reason = None
                    self._set(d, _PENDING, now)
                else:
                    d.blocked_reason = f"prerequisite {still_bad[0]} is {still_bad[1]}"
                max_depth = max(max_depth, d.depth + 1)
            if max_depth:
                self._raise_depths({nid: max_depth}, now)
            return res

    # --- cancellation ------------------------------------------------------------------------------------

    def cancel(
        self, task_id: str, *, cascade: bool = True, dry_run: bool = False, reason: str | None = None
    ) -> CancelResult:
        """Cancel a task and (with ``cascade``) every transitive dependent that is not terminal.

        A terminal task is left alone and the result says so.  Without ``cascade``, dependents get their own
        policy (cancel, block or proceed).  ``dry_run`` computes the same answer without changing anything.
        """
        if dry_run:
            self._sync()
            rec = self._get(task_id)
            if rec.status in _TERMINAL_VALUES:
                return self._already_terminal(rec, dry_run=True)
            cascaded = self._descendants(task_id) if cascade else self._policy_cancel_preview(task_id)
            return CancelResult(
                cancelled_task_id=task_id, cascaded_task_ids=cascaded, total_cancelled=1 + len(cascaded),
                dry_run=True, changed=False, message=f"would cancel {task_id} and {len(cascaded)} dependent(s)",
            )
        with self.transaction():
            now = self.clock()
            rec = self._get(task_id)
            if rec.status in _TERMINAL_VALUES:
                return self._already_terminal(rec, dry_run=False)
            cascaded = self._descendants(task_id) if cascade else []
            self._cancel_one(rec, reason or "cancelled", now)
            if cascade:
                for dep in cascaded:
                    self._cancel_one(self._by_id[dep], f"cancelled with prerequisite {task_id}", now)
            else:
                cascaded = self._apply_policies([(task_id, _CANCELLED)], now)
            return CancelResult(
                cancelled_task_id=task_id, cascaded_task_ids=cascaded, total_cancelled=1 + len(cascaded),
                dry_run=False, changed=True, message=f"cancelled {task_id} and {len(cascaded)} dependent(s)",
            )

    @staticmethod
    def _already_terminal(rec: TaskRecord, *, dry_run: bool) -> CancelResult:
        return CancelResult(
            cancelled_task_id=rec.id, cascaded_task_ids=[], total_cancelled=0, dry_run=dry_run, changed=False,
            message=f"task {rec.id} is already {rec.status}; nothing changed",
        )

    def _cancel_one(self, rec: TaskRecord, why: str, now: float) -> None:
        rec.error = why
        rec.finished = now
        rec.holder = rec.expires = rec.blocked_reason = None
        self._set(rec, _CANCELLED, now)

    def _descendants(self, root: str) -> list[str]:
        """Non-terminal transitive dependents, breadth-first (terminal ones end the walk on their branch)."""
        seen = {root}
        out: list[str] = []
        frontier = [root]
        while frontier:
            nxt: list[str] = []
            for t in frontier:
                for dep in self._children.get(t, ()):
                    if dep in seen or self._by_id[dep].status in _TERMINAL_VALUES:
                        continue
                    seen.add(dep)
                    out.append(dep)
                    nxt.append(dep)
            frontier = nxt
        return out

    def _policy_cancel_preview(self, root: str) -> list[str]:
        """Dry run of a non-cascading cancel: who would the 'cancel' policies take along."""
        out: list[str] = []
        seen = {root}
        work = deque([root])
        while work:
            pid = work.popleft()
            for dep in self._children.get(pid, ()):
                rec = self._by_id[dep]
                if dep in seen or rec.status in _TERMINAL_VALUES or rec.status == _RUNNING:
                    continue
                if rec.policy == DependentPolicy.CANCEL.value:
                    seen.add(dep)
                    out.append(dep)
                    work.append(dep)
        return out

    # --- progress of acceptance criteria -----------------------------------------------------------------

    def mark_criteria_done(self, task_id: str, fencing_token: int, criterion_ids: Iterable[str]) -> list[str]:
        """A worker reports acceptance criteria met (used by the progress pulse).  Returns all done so far."""
        with self.transaction():
            now = self.clock()
            rec = self._check_holder(task_id, fencing_token)
            known = [a["id"] for a in unpack_spec(rec.spec)["acceptance_criteria"]]
            wanted = list(criterion_ids)
            bad = [x for x in wanted if x not in known]
            if bad:
                raise TaskValidationError(f"task {task_id} has no acceptance criteria {bad}")
            rec.criteria_done = (*rec.criteria_done, *(x for x in dict.fromkeys(wanted) if x not in rec.criteria_done))
            rec.updated = now
            self._touch(rec)
            return list(rec.criteria_done)

    # --- reading -----------------------------------------------------------------------------------------

    def records(self, status: str | None = None) -> Iterator[TaskRecord]:
        """The records in memory (read-only!), optionally of one status, in task order.  For reports."""
        self._sync()
        recs = self._by_id.values()
        if status is None:
            return iter(recs)
        return (r for r in recs if r.status == status)

    def record(self, task_id: str) -> TaskRecord | None:
        self._sync()
        return self._by_id.get(task_id)

    def record_map(self) -> Mapping[str, TaskRecord]:
        """Every record by id (read-only!), caught up with other writers once: for callers that look up many
        records in a row (``record`` checks for other writers on every call)."""
        self._sync()
        return MappingProxyType(self._by_id)

    def count(self, status: str) -> int:
        self._sync()
        return self._counts[status]

    def running_by_type(self) -> dict[str, int]:
        self._sync()
        return {k: v for k, v in self._running_n.items() if v}

    def ready_by_type(self) -> dict[str, int]:
        """Ready tasks per agent_type (those in retry backoff included), from a counter kept up to date; every
        agent_type that had a ready task since the scheduler was opened is listed, with 0 if it has none."""
        self._sync()
        return dict(self._ready_n)

    def get(self, task_id: str) -> Task:
        self._sync()
        return self._to_task(self._get(task_id), self.clock())

    def tasks(self, status: Status | None = None) -> list[Task]:
        now = self.clock()
        return [self._to_task(r, now) for r in self.records(None if status is None else status.value)]

    def status_of(self, task_id: str) -> Status:
        self._sync()
        return _STATUS[self._get(task_id).status]

    def prerequisites_of(self, task_id: str) -> list[str]:
        self._sync()
        return sorted(self._get(task_id).prereqs)

    def dependents_of(self, task_id: str) -> list[str]:
        self._sync()
        return sorted(self._children.get(task_id, ()))

    def _to_task(self, rec: TaskRecord, now: float) -> Task:
        d = unpack_spec(rec.spec)
        d["id"] = rec.id
        d["input"] = decode_payload(rec.input)
        bd = prio.explain(
            self._w, base_priority=rec.base_priority, depth=rec.depth, source=rec.source, deadline=rec.deadline,
            estimate=rec.estimate, ready_at=rec.ready_at if rec.status == _READY else None, now=now,
        )
        d.update(
            status=rec.status, calculated_priority=bd.total, priority_breakdown=bd, downstream_depth=rec.depth,
            result=decode_payload(rec.result), error=rec.error, attempts=rec.attempts,
            attempt_history=list(rec.history), created_at=_dt(rec.created), updated_at=_dt(rec.updated),
            ready_at=_dt(rec.ready_at), started_at=_dt(rec.started), finished_at=_dt(rec.finished),
            not_before=_dt(rec.not_before) if rec.not_before else None, lease_holder=rec.holder,
            lease_expires_at=_dt(rec.expires), fencing_token=rec.token, blocked_reason=rec.blocked_reason,
            criteria_done=list(rec.criteria_done), requeued_from=rec.requeued_from, requeued_as=rec.requeued_as,
            manifest_id=rec.manifest_id,
        )
        # model_validate re-checks stored data; input/result are Any, so payloads pass through untouched.
        return Task.model_validate(d)

    def waiting_reasons(self) -> dict[str, str]:
        """For every non-terminal task that is not running: why it is not running right now."""
        self._sync()
        now = self.clock()
        out: dict[str, str] = {}
        running = self._running_n
        total_running = self._counts[_RUNNING]
        for rec in self._by_id.values():
            st = rec.status
            if st == _PENDING:
                w = [f"{p} ({self._by_id[p].status})" for p in rec.prereqs if self._by_id[p].status != _COMPLETED]
                out[rec.id] = "waiting on prerequisites: " + ", ".join(sorted(w)) if w else "pending release"
            elif st == _BLOCKED:
                out[rec.id] = f"blocked: {rec.blocked_reason}"
            elif st == _READY:
                at = rec.agent_type
                lim = self.config.wip_limit_for(at)
                g = self.config.wip_global
                if rec.not_before > now:
                    out[rec.id] = f"retry backoff until {_dt(rec.not_before).isoformat()}"  # type: ignore[union-attr]
                elif lim is not None and running[at] >= lim:
                    out[rec.id] = f"ready; WIP limit for {at} reached ({running[at]}/{lim} running)"
                elif g is not None and total_running >= g:
                    out[rec.id] = f"ready; global WIP limit reached ({total_running}/{g} running)"
                else:
                    out[rec.id] = "ready; waiting for a claim"
        return out

    # --- planning ----------------------------------------------------------------------------------------

    def plan(
        self, task_ids: Iterable[str], *, wip_limit: int | None = None, default_estimate_s: float = 1.0
    ) -> ExecutionPlan:
        """An execution plan for ``task_ids`` (see planner.build_plan).  Terminal tasks are not planned."""
        self._sync()
        ids = list(dict.fromkeys(task_ids))
        by_id = self._by_id
        unknown = [t for t in ids if t not in by_id]
        if unknown:
            raise UnknownTask(f"no task(s) {unknown[:10]}", details=[{"task_id": t} for t in unknown])
        skipped = {t: _STATUS[by_id[t].status] for t in ids if by_id[t].status in _TERMINAL_VALUES}
        live = [t for t in ids if t not in skipped]
        prereqs = {t: by_id[t].prereqs for t in live}
        estimates = {t: (e if (e := by_id[t].estimate) > 0 else default_estimate_s) for t in live}
        done = {p for ps in prereqs.values() for p in ps if p not in prereqs and by_id[p].status == _COMPLETED}
        return build_plan(estimates, prereqs, wip_limit=wip_limit, external_done=done, skipped_terminal=skipped)


def _cache_image(r: TaskRecord) -> bytes:
    img = r.img = pack_image(r)
    return img


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (the items follow, already packed)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def dispatch_key(r: TaskRecord) -> tuple[float, float, int]:
    """Dispatch order of ready tasks: higher rank first, then the nearer deadline, then the older task."""
    return (-r.rank, prio.NO_DEADLINE if r.deadline is None else r.deadline, r.seq)


def _encode_blobs(
    specs: Sequence[Submission], new: Iterable[tuple[int, Submission]]
) -> tuple[list[bytes], list[bytes | None]]:
    """Each new task's spec and input blobs (by batch index), made before anything changes: a value that
    cannot be kept exactly rejects the batch, naming every such task and field."""
    spec_blobs: list[bytes] = [b""] * len(specs)
    inputs: list[bytes | None] = [None] * len(specs)
    details = []
    for i, s in new:
        try:
            spec_blobs[i] = pack_spec(s)
        except ValueError as exc:
            details.append({"index": i, "field": "metadata", "code": "value_error", "message": str(exc)})
        try:
            inputs[i] = encode_payload(s.get("input"))
        except ValueError as exc:
            details.append({"index": i, "field": "input", "code": "value_error", "message": str(exc)})
    if details:
        raise TaskValidationError(summarize_details(f"invalid task at index {details[0]['index']}: ", details),
                                  details=details)
    return spec_blobs, inputs


def _topo_order(new: Mapping[str, tuple[int, Submission]]) -> list[str]:
    """Kahn's algorithm over the batch's own edges; a cycle is rejected with every task on or behind it."""
    indeg: dict[str, int] = {}
    children: dict[str, list[str]] = {}
    for tid, (_, s) in new.items():
        k = 0
        for p in s.get("prerequisites", ()):
            if p in new:
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
    if len(order) != len(new):
        stuck = sorted(t for t, k in indeg.items() if k > 0)
        raise DependencyCycle(
            f"prerequisites form a cycle among {stuck[:10]}",
            details=[{"task_id": t, "code": "DEPENDENCY_CYCLE", "message": "on or behind a cycle"} for t in stuck],
        )
    return order


def _attempt(rec: TaskRecord, ended: float, outcome: str, error: str | None) -> dict[str, Any]:
    # Validated shape (AttemptRecord) but stored as a plain dict to keep the image small and schema-free.
    d = {"attempt": rec.attempts, "holder": rec.holder, "fencing_token": rec.token, "started_at": rec.started,
         "ended_at": ended, "outcome": outcome, "error": error}
    AttemptRecord.model_validate(d)
    return d
