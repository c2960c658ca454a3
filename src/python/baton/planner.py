"""Execution plans over an in-memory DAG: topological batches, critical path, makespan under a WIP limit.

Pure functions over plain dicts so that the scheduler (tasks from the store) and the manifest importer (tasks
from a file) share them, and so that the benchmark measures the algorithm itself.  All passes are linear
except the WIP simulation, which is O(n log n).
"""

from __future__ import annotations

import fnmatch
import gc
import heapq
import re
from collections import deque
from itertools import chain
from contextlib import contextmanager
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from baton.models import ExecutionPlan, Status
from baton.scheduler_errors import DependencyCycle

__all__ = ["build_plan", "topological_batches", "split_conflicts", "scopes_overlap", "gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Bulk passes (planning, manifest import) allocate a few containers per task and free none of them until
    they return; CPython's cyclic collector would rescan that growing heap many times for nothing (measured:
    ~15% of a 100k plan, ~40% of a 10k manifest import).  Garbage made meanwhile is collected afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _index_graph(
    ids: Sequence[str], prereqs: Mapping[str, Sequence[str]]
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Translate the string-keyed graph to list positions once, so every later pass works on ints and lists
    (dict lookups by string dominated the planner's profile).  Returns (in-set prerequisites, children,
    in-degree, positions of tasks with prerequisites outside ``ids``), indexed by position in ``ids``."""
    pos = dict(zip(ids, range(len(ids))))
    given = list(map(prereqs.get, ids))
    outside: list[int] = []
    try:  # the common case, every prerequisite in the set: one C-level map per task
        getp = pos.__getitem__
        pre = [list(map(getp, g)) if g else [] for g in given]
    except KeyError:
        get = pos.get
        pre = []
        for i, g in enumerate(given):
            mine = [j for j in map(get, g or ()) if j is not None]
            if len(mine) != len(g or ()):
                outside.append(i)
            pre.append(mine)
    children: list[list[int]] = [[] for _ in ids]
    for i, mine in enumerate(pre):
        for j in mine:
            children[j].append(i)
    indeg = list(map(len, pre))
    return pre, children, indeg, outside


def _levels(children: list[list[int]], indeg: list[int]) -> list[list[int]]:
    """Kahn's algorithm by levels over positions.  Consumes ``indeg``; positions left > 0 are on or behind a
    cycle.  Sorting the next level by position keeps the input order within a batch."""
    level = [i for i, k in enumerate(indeg) if k == 0]
    levels: list[list[int]] = []
    while level:
        levels.append(level)
        nxt: list[int] = []
        for i in level:
            for ch in children[i]:
                k = indeg[ch] - 1
                indeg[ch] = k
                if k == 0:
                    nxt.append(ch)
        nxt.sort()
        level = nxt
    return levels


def _check_acyclic(ids: Sequence[str], levels: list[list[int]], indeg: list[int]) -> None:
    if sum(map(len, levels)) != len(ids):
        stuck = sorted(ids[i] for i, k in enumerate(indeg) if k > 0)
        raise DependencyCycle(
            f"prerequisites form a cycle among {stuck[:10]}",
            details=[{"task_id": t, "code": "DEPENDENCY_CYCLE"} for t in stuck],
        )


def topological_batches(
    ids: Sequence[str], prereqs: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Kahn's algorithm by levels: batch k holds the tasks whose in-set prerequisites are all in batches < k.

    Prerequisites outside ``ids`` are ignored here.  Never yields an empty batch.  Within a batch, tasks keep
    the order of ``ids``.  Returns (batches, children).
    """
    ids = list(ids)
    _, children, indeg, _ = _index_graph(ids, prereqs)
    levels = _levels(children, indeg)
    _check_acyclic(ids, levels, indeg)
    return (
        [[ids[i] for i in level] for level in levels],
        {t: [ids[j] for j in children[i]] for i, t in enumerate(ids)},
    )


def build_plan(
    estimates: Mapping[str, float],
    prereqs: Mapping[str, Sequence[str]],
    *,
    wip_limit: int | None = None,
    external_done: Collection[str] = frozenset(),
    skipped_terminal: Mapping[str, Status] | None = None,
    batches: list[list[str]] | None = None,
) -> ExecutionPlan:
    """Plan the tasks in ``estimates`` (id -> estimated seconds).

    ``prereqs`` may name tasks outside the set: those in ``external_done`` are satisfied, the others are
    reported in ``external_unsatisfied``.  ``batches`` may be supplied pre-split (e.g. by split_conflicts);
    otherwise plain topological levels are used.
    """
    if wip_limit is not None and wip_limit < 1:
        raise ValueError("wip_limit must be >= 1")
    with gc_paused():
        return _build_plan(estimates, prereqs, wip_limit, external_done, skipped_terminal, batches)


def _build_plan(
    estimates: Mapping[str, float],
    prereqs: Mapping[str, Sequence[str]],
    wip_limit: int | None,
    external_done: Collection[str],
    skipped_terminal: Mapping[str, Status] | None,
    batches: list[list[str]] | None,
) -> ExecutionPlan:
    ids = list(estimates)
    est = list(estimates.values())
    pre, children, indeg, outside = _index_graph(ids, prereqs)
    levels = _levels(children, indeg)
    _check_acyclic(ids, levels, indeg)
    if batches is None:
        batches = [[ids[i] for i in level] for level in levels]

    ext_sat: set[str] = set()
    ext_unsat: dict[str, list[str]] = {}
    for i in outside:
        t = ids[i]
        for p in prereqs[t]:
            if p not in estimates:
                if p in external_done:
                    ext_sat.add(p)
                else:
                    ext_unsat.setdefault(t, []).append(p)

    # Longest path (by estimate) ending at each task -> the critical path.  max() over map() keeps the
    # per-task work in C; the floor of 0.0 matches "no prerequisite finishes later than time 0".
    n = len(ids)
    finish = [0.0] * n
    fget = finish.__getitem__
    # (``max(..., default=)`` is avoided: parsing the keyword costs more than the max itself.)
    for level in levels:
        for i in level:
            mine = pre[i]
            f0 = max(map(fget, mine)) if mine else 0.0
            finish[i] = (f0 if f0 > 0.0 else 0.0) + est[i]
    path: list[str] = []
    cp_len = 0.0
    if n:
        # The first task (in level order) with the longest finish; then, walking back, the first prerequisite
        # (in the task's own order) that finishes last, as long as it finishes after time 0.
        end = max(chain.from_iterable(levels), key=fget)
        cp_len = finish[end]
        while end >= 0:
            path.append(ids[end])
            bp, f0 = -1, 0.0
            for j in pre[end]:
                if finish[j] > f0:
                    bp, f0 = j, finish[j]
            end = bp
        path.reverse()

    makespan = cp_len if wip_limit is None else _simulate(est, pre, children, levels, wip_limit)
    # model_construct: every field is built right here with the declared types; validating 100k ids again
    # would cost more than planning them.
    return ExecutionPlan.model_construct(
        batches=batches,
        total_batches=len(batches),
        max_parallelism=max((len(b) for b in batches), default=0),
        critical_path=path,
        critical_path_s=cp_len,
        estimated_makespan_s=makespan,
        wip_limit=wip_limit,
        external_satisfied=sorted(ext_sat),
        external_unsatisfied=ext_unsat,
        skipped_terminal=dict(skipped_terminal or {}),
    )


def _simulate(
    est: list[float],
    pre: list[list[int]],
    children: list[list[int]],
    levels: list[list[int]],
    workers: int,
) -> float:
    """List scheduling with ``workers`` slots, longest-remaining-path first (the classic HLF heuristic)."""
    # Bottom level: longest path from the task to any sink, including itself.
    n = len(est)
    bottom = [0.0] * n
    bget = bottom.__getitem__
    for level in reversed(levels):
        for i in level:
            kids = children[i]
            m = max(map(bget, kids)) if kids else 0.0
            bottom[i] = (m if m > 0.0 else 0.0) + est[i]
    # Ready tasks are picked by (highest bottom level, then input position).  Ranking every task once by that
    # key lets the ready heap hold plain ints, which heapq compares far faster than tuples.  sorted() is
    # stable with reverse=True, so equal bottom levels keep input order.
    order = sorted(range(n), key=bottom.__getitem__, reverse=True)
    rank = [0] * n
    deque(map(rank.__setitem__, order, range(n)), maxlen=0)  # rank[order[r]] = r, looped in C
    indeg = list(map(len, pre))
    ready = sorted(rank[i] for i in (levels[0] if levels else ()))  # a sorted list is a heap
    running: list[tuple[float, int]] = []  # (finish time, position), at most ``workers`` entries
    now = 0.0
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    while ready and len(running) < workers:
        i = order[pop(ready)]
        push(running, (now + est[i], i))
    while running:
        now, i = running[0]
        for ch in children[i]:  # release the dependents of the task finishing first
            k = indeg[ch] - 1
            indeg[ch] = k
            if not k:
                push(ready, rank[ch])
        # Fast path (the common case): every slot was busy and no other task finishes at the same instant
        # (the heap's second smallest is running[1] or running[2]), so the freed slot goes straight to the
        # best ready task: one heapreplace instead of a pop and a push.
        r = len(running)
        if r == workers and ready and (r < 2 or running[1][0] > now) and (r < 3 or running[2][0] > now):
            j = order[pop(ready)]
            replace(running, (now + est[j], j))
            continue
        pop(running)
        while running and running[0][0] <= now:  # every other task finishing now, before picking
            for ch in children[pop(running)[1]]:
                k = indeg[ch] - 1
                indeg[ch] = k
                if not k:
                    push(ready, rank[ch])
        while ready and len(running) < workers:
            j = order[pop(ready)]
            push(running, (now + est[j], j))
    return now


# --- conflicts ---------------------------------------------------------------------------------------------


def _norm(p: str) -> str:
    p = p.replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


def scopes_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Do two file scopes touch the same files?  Entries are paths, directories (prefixes) or glob patterns."""
    for x in a:
        nx = _norm(x)
        for y in b:
            ny = _norm(y)
            if nx == ny or nx == "" or ny == "":
                return True
            if ny.startswith(nx + "/") or nx.startswith(ny + "/"):
                return True
            if any(ch in nx for ch in "*?[") and fnmatch.fnmatchcase(ny, nx):
                return True
            if any(ch in ny for ch in "*?[") and fnmatch.fnmatchcase(nx, ny):
                return True
    return False


_GLOB_CHAR = re.compile(r"[*?\[]").search


def _is_glob(p: str) -> bool:
    return _GLOB_CHAR(p) is not None


def _ancestors(p: str) -> list[str]:
    parts = p.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Group:
    """One conflict-free sub-batch, indexed so that testing a candidate costs O(its own scope), not O(group)."""

    __slots__ = ("members", "paths", "prefixes", "globs", "conflicts", "solo", "everything")

    def __init__(self) -> None:
        self.members: list[str] = []
        self.paths: set[str] = set()  # exact (normalised) paths and directories
        self.prefixes: set[str] = set()  # every ancestor directory of those
        self.globs: list[str] = []
        self.conflicts: set[str] = set()  # ids that members declared conflicts with
        self.solo = False
        self.everything = False  # a member's scope is the whole tree ("" or ".")

    def clashes(self, t: str, scope: list[str], mine: set[str]) -> bool:
        if self.solo or t in self.conflicts or (mine and not mine.isdisjoint(self.members)):
            return True
        if not scope:
            return False
        if self.everything:
            return True
        for p in scope:
            if p == "":
                if self.paths or self.globs:
                    return True
                continue
            if _is_glob(p):
                if (
                    self.globs
                    or any(fnmatch.fnmatchcase(q, p) for q in self.paths)
                    or any(a in self.paths for a in _ancestors(p))
                ):
                    # Two globs are treated as overlapping: deciding pattern intersection is not worth it.
                    return True
                continue
            if p in self.paths or p in self.prefixes:
                return True
            if any(a in self.paths for a in _ancestors(p)):
                return True
            if any(fnmatch.fnmatchcase(p, g) for g in self.globs):
                return True
        return False

    def add(self, t: str, scope: list[str], mine: set[str]) -> None:
        self.members.append(t)
        self.conflicts |= mine
        for p in scope:
            if p == "":
                self.everything = True
            elif _is_glob(p):
                self.globs.append(p)
                self.prefixes.update(_ancestors(p))
            else:
                self.paths.add(p)
                self.prefixes.update(_ancestors(p))


def split_conflicts(
    batches: list[list[str]],
    file_scope: Mapping[str, Sequence[str]],
    conflicts_with: Mapping[str, Sequence[str]],
    *,
    solo: Collection[str] = frozenset(),
    order_key: Callable[[str], Any] | None = None,
) -> list[list[str]]:
    """Split each batch so no two tasks in one batch have overlapping file scopes or a conflicts_with link
    (in either direction), and tasks in ``solo`` (not parallel-safe) run alone.

    Splitting a level into consecutive sub-batches keeps the topological order valid.  Greedy first-fit in
    ``order_key`` order (e.g. risk, then priority), so the most important tasks land in the earliest batch.
    """
    out: list[list[str]] = []
    for batch in batches:
        items = sorted(batch, key=order_key) if order_key else list(batch)
        groups: list[_Group] = []
        for t in items:
            scope = [_norm(x) for x in file_scope.get(t, ())]
            mine = set(conflicts_with.get(t, ()))
            if t in solo:
                g = _Group()
                g.add(t, scope, mine)
                g.solo = True
                groups.append(g)
                continue
            for g in groups:
                if not g.clashes(t, scope, mine):
                    g.add(t, scope, mine)
                    break
            else:
                g = _Group()
                g.add(t, scope, mine)
                groups.append(g)
        out.extend(g.members for g in groups)
    return out
