"""Execution plans over an in-memory DAG: topological batches, critical path, makespan under a WIP limit.

Pure functions over plain dicts so that the scheduler (tasks from the store) and the manifest importer (tasks
from a file) share them, and so that the benchmark measures the algorithm itself.  All passes are linear
except the WIP simulation, which is O(n log n).  Estimates are finite numbers, as TaskSpec enforces: with a
NaN, "longest" has no meaning and the plan is unspecified.

Per-task work is plain Python over int positions and lists, so what pays is fewer bytecodes (each a few dozen
machine instructions) and fewer small objects per task, and walking the lists front to back (at 100k tasks
they no longer fit in the caches).  C-level helpers such as max(map(...)) only pay on long sequences: over a
task's one or two prerequisites or children, setting them up costs more than a plain loop.
"""

from __future__ import annotations

import fnmatch
import gc
import heapq
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain, repeat
from operator import add
from typing import Any, NamedTuple

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


class _Graph(NamedTuple):
    """The string-keyed graph translated to list positions once (dict lookups by string dominated the
    planner's profile), every list indexed by position in ``ids``.  No per-task prerequisite lists: nothing
    below needs them, and 100k small lists cost more to build than the passes that would read them."""

    pos: dict[str, int]
    children: list[list[int]]
    indeg: list[int]  # in-set prerequisites
    outside: list[int]  # positions of tasks with prerequisites outside ``ids``
    levels: list[list[int]]  # Kahn's levels; input order within a level
    finish: list[float]  # longest chain of estimates ending with the task (unlimited WIP)
    topo: Sequence[int]  # every position, prerequisites first


def _graph(ids: Sequence[str], prereqs: Mapping[str, Sequence[str]], est: Sequence[float]) -> _Graph:
    return _graph_in_order(ids, prereqs, est) or _graph_kahn(ids, prereqs, est)


def _graph_in_order(
    ids: Sequence[str], prereqs: Mapping[str, Sequence[str]], est: Sequence[float]
) -> _Graph | None:
    """The usual case, every task listed after its in-set prerequisites (manifests and the store list them
    first): one front-to-back pass does what ``_graph_kahn`` does in two, with no queue (a 100k plan is
    visibly faster than through ``_graph_kahn``).  A task's level is one more than its deepest
    prerequisite's, which is the level Kahn's algorithm gives it, and appending in input order gives each
    level in input order, as Kahn's sorted levels are.  None as soon as a prerequisite comes at or after its
    task (or is the task itself)."""
    n = len(ids)
    idx = list(range(n))
    pos = dict(zip(ids, idx))
    children: list[list[int]] = [[] for _ in idx]
    indeg = [0] * n
    depth = [0] * n
    finish = [0.0] * n
    levels: list[list[int]] = [[]] if n else []  # the first task can't have an in-set prerequisite
    outside: list[int] = []
    for i, g, x in zip(idx, map(prereqs.get, ids, repeat(())), est):
        if not g:
            levels[0].append(i)
            finish[i] = 0.0 + x
            continue
        k, d, s = len(g), 0, 0.0
        for p in g:
            try:
                j = pos[p]
            except KeyError:
                k -= 1
                continue
            if j >= i:
                return None
            children[j].append(i)
            dj = depth[j]
            if dj >= d:
                d = dj + 1
            f = finish[j]
            if f > s:
                s = f
        if k != len(g):
            outside.append(i)
        indeg[i], depth[i], finish[i] = k, d, s + x
        if d == len(levels):
            levels.append([])
        levels[d].append(i)
    return _Graph(pos, children, indeg, outside, levels, finish, range(n))


def _graph_kahn(ids: Sequence[str], prereqs: Mapping[str, Sequence[str]], est: Sequence[float]) -> _Graph:
    """Any order: index the edges, then Kahn's algorithm by levels, pushing each task's finish time to its
    children while it walks them anyway.  Sorting the next level by position keeps the input order within a
    batch.  Raises DependencyCycle."""
    n = len(ids)
    idx = list(range(n))
    pos = dict(zip(ids, idx))
    children: list[list[int]] = [[] for _ in idx]
    indeg = [0] * n
    outside: list[int] = []
    for i, g in zip(idx, map(prereqs.get, ids, repeat(()))):
        if not g:
            continue
        k = len(g)
        for p in g:
            try:
                children[pos[p]].append(i)
            except KeyError:
                k -= 1
        if k != len(g):
            outside.append(i)
        indeg[i] = k

    left = indeg.copy()
    start = [0.0] * n
    level = [i for i in idx if not left[i]]
    levels: list[list[int]] = []
    while level:
        levels.append(level)
        nxt: list[int] = []
        for i in level:
            f = start[i] + est[i]
            for ch in children[i]:
                if f > start[ch]:
                    start[ch] = f
                k = left[ch] - 1
                left[ch] = k
                if not k:
                    nxt.append(ch)
        nxt.sort()
        level = nxt
    topo = list(chain.from_iterable(levels))
    if len(topo) != n:  # positions left > 0 are on or behind a cycle
        stuck = sorted(ids[i] for i, k in enumerate(left) if k > 0)
        raise DependencyCycle(
            f"prerequisites form a cycle among {stuck[:10]}",
            details=[{"task_id": t, "code": "DEPENDENCY_CYCLE"} for t in stuck],
        )
    return _Graph(pos, children, indeg, outside, levels, list(map(add, start, est)), topo)


def topological_batches(
    ids: Sequence[str], prereqs: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Kahn's algorithm by levels: batch k holds the tasks whose in-set prerequisites are all in batches < k.

    Prerequisites outside ``ids`` are ignored here.  Never yields an empty batch.  Within a batch, tasks keep
    the order of ``ids``.  Returns (batches, children).
    """
    ids = list(ids)
    g = _graph(ids, prereqs, [0.0] * len(ids))  # (finish times unused here)
    get = ids.__getitem__
    return (
        [list(map(get, level)) for level in g.levels],
        {t: list(map(get, kids)) for t, kids in zip(ids, g.children)},
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
    g = _graph(ids, prereqs, est)
    if batches is None:
        get = ids.__getitem__
        batches = [list(map(get, level)) for level in g.levels]

    ext_sat: set[str] = set()
    ext_unsat: dict[str, list[str]] = {}
    for i in g.outside:
        t = ids[i]
        for p in prereqs[t]:
            if p not in estimates:
                if p in external_done:
                    ext_sat.add(p)
                else:
                    ext_unsat.setdefault(t, []).append(p)

    finish = g.finish
    path: list[str] = []
    cp_len = 0.0
    if finish:
        # The first task (in level order) with the longest finish; then, walking back, the first prerequisite
        # (in the task's own order) that finishes last, as long as it finishes after time 0.  A unique longest
        # finish (nearly always) is found without walking the levels.
        cp_len = max(finish)
        if finish.count(cp_len) == 1:
            end = finish.index(cp_len)
        else:
            end = max(chain.from_iterable(g.levels), key=finish.__getitem__)
        while end >= 0:
            t = ids[end]
            path.append(t)
            bp, f0 = -1, 0.0
            if g.indeg[end]:
                for j in map(g.pos.get, prereqs[t]):
                    if j is not None and finish[j] > f0:
                        bp, f0 = j, finish[j]
            end = bp
        path.reverse()

    makespan = cp_len if wip_limit is None else _simulate(est, g, wip_limit)
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


def _simulate(est: list[float], g: _Graph, workers: int) -> float:
    """List scheduling with ``workers`` slots, longest-remaining-path first (the classic HLF heuristic)."""
    children = g.children
    # Bottom level: longest path from the task to any sink, including itself.
    n = len(est)
    bottom = [0.0] * n
    for i in reversed(g.topo):
        b = 0.0
        for ch in children[i]:
            x = bottom[ch]
            if x > b:
                b = x
        bottom[i] = b + est[i]
    # Ready tasks are picked by (highest bottom level, then input position): rank every task once by that key
    # (sorted() is stable with reverse=True, so equal bottom levels keep input order), then the ready set is a
    # priority queue of ranks in two parts split at ``hi``.  Ranks >= hi are flags in ``ready``, found with
    # list.index (a C loop); ``hi`` only moves forward, past each one taken, so the flags are scanned once in
    # all.  Ranks < hi (a task released after a worse-ranked one was started: rare) go to the heap ``early``;
    # they all rank before every flagged task, so ``early`` is served first.  With no heap over the whole ready
    # set there are no ~2 log2(n) int comparisons per task (fewer instructions in this loop under callgrind).
    order = sorted(range(n), key=bottom.__getitem__, reverse=True)
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    ready = [0] * n + [1]  # the trailing 1 ends every search: index n means no flagged task is ready
    for i in g.levels[0] if n else ():
        ready[rank[i]] = 1
    find = ready.index
    early: list[int] = []
    hi = 0
    left = g.indeg.copy()
    running: list[tuple[float, int]] = []  # (finish time, position), at most ``workers`` entries
    now = 0.0
    push, pop, replace = heapq.heappush, heapq.heappop, heapq.heapreplace
    while True:
        while len(running) < workers:  # fill the free slots, best ready task first
            if early:
                j = order[pop(early)]
            else:
                r = find(1, hi)
                if r == n:
                    hi = n  # (so later releases go to ``early`` and this search is never repeated)
                    break
                hi = r + 1
                j = order[r]
            push(running, (now + est[j], j))
        if not running:
            return now
        full = workers >= 3 and len(running) == workers
        while True:  # one task finishing per iteration
            now, i = running[0]
            for ch in children[i]:
                k = left[ch] - 1
                left[ch] = k
                if not k:
                    r = rank[ch]
                    if r < hi:
                        push(early, r)
                    else:
                        ready[r] = 1
            # Fast path (the common case): every slot is busy and no other task finishes at this instant (the
            # heap's second smallest is running[1] or running[2]), so the freed slot goes straight to the best
            # ready task: one heapreplace instead of a pop and a push.  With < 3 slots, always the slow path.
            if full and running[1][0] > now and running[2][0] > now:
                if early:
                    j = order[pop(early)]
                    replace(running, (now + est[j], j))
                    continue
                r = find(1, hi)
                if r < n:
                    hi = r + 1
                    j = order[r]
                    replace(running, (now + est[j], j))
                    continue
                hi = n
            # Slow path: free the slot, release every other task finishing now too, then refill.
            pop(running)
            if not running or running[0][0] > now:
                break
            full = False


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


class _Scope(NamedTuple):
    """One task's file scope, normalised and split once (not once per group it is tested against)."""

    paths: frozenset[str]  # exact paths and directories
    globs: tuple[str, ...]
    everything: bool  # "" or ".": the whole tree
    path_ancestors: frozenset[str]  # every ancestor directory of ``paths``
    glob_ancestors: frozenset[str]  # every ancestor directory of ``globs``

    @classmethod
    def of(cls, entries: Sequence[str]) -> _Scope:
        paths: set[str] = set()
        globs: list[str] = []
        path_anc: set[str] = set()
        glob_anc: set[str] = set()
        everything = False
        for x in entries:
            p = _norm(x)
            if not p:
                everything = True
            elif _is_glob(p):
                globs.append(p)
                glob_anc.update(_ancestors(p))
            else:
                paths.add(p)
                path_anc.update(_ancestors(p))
        return cls(frozenset(paths), tuple(globs), everything, frozenset(path_anc), frozenset(glob_anc))

    def __bool__(self) -> bool:
        return bool(self.paths or self.globs or self.everything)


class _Group:
    """One conflict-free sub-batch, indexed so that testing a candidate costs O(its own scope), not O(group)."""

    __slots__ = ("members", "member_set", "paths", "prefixes", "globs", "conflicts", "solo", "everything")

    def __init__(self) -> None:
        self.members: list[str] = []
        self.member_set: set[str] = set()
        self.paths: set[str] = set()  # exact (normalised) paths and directories
        self.prefixes: set[str] = set()  # every ancestor directory of those and of the globs
        self.globs: list[str] = []
        self.conflicts: set[str] = set()  # ids that members declared conflicts with
        self.solo = False
        self.everything = False  # a member's scope is the whole tree ("" or ".")

    def clashes(self, t: str, sc: _Scope, mine: set[str]) -> bool:
        if self.solo or t in self.conflicts or (mine and not mine.isdisjoint(self.member_set)):
            return True
        if not sc:
            return False
        if self.everything or (sc.everything and (self.paths or self.globs)):
            return True
        paths = self.paths
        if sc.globs and (
            # Two globs are treated as overlapping: deciding pattern intersection is not worth it.
            self.globs
            or any(fnmatch.fnmatchcase(q, p) for p in sc.globs for q in paths)
            or not paths.isdisjoint(sc.glob_ancestors)
        ):
            return True
        return (
            not paths.isdisjoint(sc.paths)
            or not self.prefixes.isdisjoint(sc.paths)
            or not paths.isdisjoint(sc.path_ancestors)
            or bool(self.globs and any(fnmatch.fnmatchcase(p, g) for p in sc.paths for g in self.globs))
        )

    def add(self, t: str, sc: _Scope, mine: set[str]) -> None:
        self.members.append(t)
        self.member_set.add(t)
        self.conflicts |= mine
        self.everything = self.everything or sc.everything
        self.globs.extend(sc.globs)
        self.paths |= sc.paths
        self.prefixes |= sc.path_ancestors
        self.prefixes |= sc.glob_ancestors


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
            scope = _Scope.of(file_scope.get(t, ()))
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
