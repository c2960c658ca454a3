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
        groups: list[list[str]] = []
        for t in items:
            if t in solo:
                groups.append([t])
                continue
            scope = file_scope.get(t, ())
            mine = set(conflicts_with.get(t, ()))
            for g in groups:
                if g[0] in solo:
                    continue
                if any(
                    o in mine or t in conflicts_with.get(o, ()) or (scope and scopes_overlap(scope, file_scope.get(o, ())))
                    for o in g
                ):
                    continue
                g.append(t)
                break
            else:
                groups.append([t])
        out.extend(g for g in groups if g)
    return out
