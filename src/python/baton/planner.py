"""Execution plans over an in-memory DAG: topological batches, critical path, makespan under a WIP limit.

Pure functions over plain dicts so that the scheduler (tasks from the store) and the manifest importer (tasks
from a file) share them, and so that the benchmark measures the algorithm itself.  All passes are linear
except the WIP simulation, which is O(n log n).
"""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from baton.models import ExecutionPlan, Status
from baton.scheduler_errors import DependencyCycle

__all__ = ["build_plan", "topological_batches", "split_conflicts", "scopes_overlap"]


def topological_batches(
    ids: Sequence[str], prereqs: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Kahn's algorithm by levels: batch k holds the tasks whose in-set prerequisites are all in batches < k.

    Prerequisites outside ``ids`` are ignored here.  Never yields an empty batch.  Within a batch, tasks keep
    the order of ``ids``.  Returns (batches, children).
    """
    inset = dict.fromkeys(ids, 0)
    children: dict[str, list[str]] = {t: [] for t in ids}
    for t in ids:
        k = 0
        for p in prereqs.get(t, ()):
            if p in inset:
                children[p].append(t)
                k += 1
        inset[t] = k
    indeg = inset
    level = [t for t in ids if indeg[t] == 0]
    batches: list[list[str]] = []
    pos = {t: i for i, t in enumerate(ids)}
    placed = 0
    while level:
        batches.append(level)
        placed += len(level)
        nxt: list[str] = []
        for t in level:
            for ch in children[t]:
                k = indeg[ch] - 1
                indeg[ch] = k
                if k == 0:
                    nxt.append(ch)
        if len(nxt) > 1:
            nxt.sort(key=pos.__getitem__)
        level = nxt
    if placed != len(ids):
        stuck = sorted(t for t, k in indeg.items() if k > 0)
        raise DependencyCycle(
            f"prerequisites form a cycle among {stuck[:10]}",
            details=[{"task_id": t, "code": "DEPENDENCY_CYCLE"} for t in stuck],
        )
    return batches, children


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
    ids = list(estimates)
    levels, children = topological_batches(ids, prereqs)
    if batches is None:
        batches = levels
    ext_sat: set[str] = set()
    ext_unsat: dict[str, list[str]] = {}
    for t in ids:
        for p in prereqs.get(t, ()):
            if p not in estimates:
                if p in external_done:
                    ext_sat.add(p)
                else:
                    ext_unsat.setdefault(t, []).append(p)

    # Longest path (by estimate) ending at each task -> the critical path.
    finish: dict[str, float] = {}
    best_pred: dict[str, str | None] = {}
    for level in levels:
        for t in level:
            f0 = 0.0
            bp: str | None = None
            for p in prereqs.get(t, ()):
                fp = finish.get(p)
                if fp is not None and fp > f0:
                    f0, bp = fp, p
            finish[t] = f0 + estimates[t]
            best_pred[t] = bp
    path: list[str] = []
    cp_len = 0.0
    if finish:
        end = max(finish, key=finish.__getitem__)
        cp_len = finish[end]
        cur: str | None = end
        while cur is not None:
            path.append(cur)
            cur = best_pred[cur]
        path.reverse()

    makespan = cp_len if wip_limit is None else _simulate(ids, estimates, prereqs, children, levels, wip_limit)
    return ExecutionPlan(
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
    ids: Sequence[str],
    est: Mapping[str, float],
    prereqs: Mapping[str, Sequence[str]],
    children: Mapping[str, list[str]],
    levels: list[list[str]],
    workers: int,
) -> float:
    """List scheduling with ``workers`` slots, longest-remaining-path first (the classic HLF heuristic)."""
    # Bottom level: longest path from the task to any sink, including itself.
    bottom: dict[str, float] = {}
    for level in reversed(levels):
        for t in level:
            m = 0.0
            for ch in children[t]:
                b = bottom[ch]
                if b > m:
                    m = b
            bottom[t] = m + est[t]
    indeg = {t: 0 for t in ids}
    for t in ids:
        for p in prereqs.get(t, ()):
            if p in indeg:
                indeg[t] += 1
    ready = [(-bottom[t], i, t) for i, t in enumerate(ids) if indeg[t] == 0]
    heapq.heapify(ready)
    index = {t: i for i, t in enumerate(ids)}
    running: list[tuple[float, int, str]] = []
    now = 0.0
    push, pop = heapq.heappush, heapq.heappop
    while ready or running:
        while ready and len(running) < workers:
            _, i, t = pop(ready)
            push(running, (now + est[t], i, t))
        now, _, t = pop(running)
        done = [t]
        while running and running[0][0] <= now:
            done.append(pop(running)[2])
        for d in done:
            for ch in children[d]:
                k = indeg[ch] - 1
                indeg[ch] = k
                if k == 0:
                    push(ready, (-bottom[ch], index[ch], ch))
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


def _is_glob(p: str) -> bool:
    return any(ch in p for ch in "*?[")


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
