"""Execution plans: batches, critical path, makespan under WIP, external prerequisites, conflicts."""

from __future__ import annotations

import pytest

from baton.models import Status
from baton.planner import build_plan, scopes_overlap, split_conflicts, topological_batches
from baton.scheduler_errors import DependencyCycle, UnknownTask
from scheduler_fixtures import make, spec


def test_batches_are_levels_without_empties():
    est = {"a": 1, "b": 2, "c": 3, "d": 1}
    pre = {"b": ["a"], "c": ["a"], "d": ["b", "c"]}
    p = build_plan(est, pre)
    assert p.batches == [["a"], ["b", "c"], ["d"]]
    assert p.total_batches == 3 and p.max_parallelism == 2
    assert p.critical_path == ["a", "c", "d"] and p.critical_path_s == 5
    assert p.estimated_makespan_s == 5


def test_makespan_under_wip_limit():
    est = {f"t{i}": 1.0 for i in range(6)}
    assert build_plan(est, {}, wip_limit=1).estimated_makespan_s == 6
    assert build_plan(est, {}, wip_limit=4).estimated_makespan_s == 2
    assert build_plan(est, {}).estimated_makespan_s == 1
    # A chain is never faster than its critical path, whatever the WIP.
    chain = build_plan({"a": 2, "b": 3, "c": 1}, {"b": ["a"], "c": ["b"]}, wip_limit=8)
    assert chain.estimated_makespan_s == 6
    with pytest.raises(ValueError):
        build_plan(est, {}, wip_limit=0)


def test_makespan_prefers_critical_path():
    # With 2 workers: long chain x1->x2 (5+5) and four 1s: HLF starts x1 first, makespan 10 not 12.
    est = {"s1": 1, "s2": 1, "s3": 1, "s4": 1, "x1": 5, "x2": 5}
    p = build_plan(est, {"x2": ["x1"]}, wip_limit=2)
    assert p.estimated_makespan_s == 10


def test_external_prerequisites_reported():
    p = build_plan({"b": 1, "c": 1}, {"b": ["a"], "c": ["z"]}, external_done={"a"})
    assert p.external_satisfied == ["a"] and p.external_unsatisfied == {"c": ["z"]}


def test_empty_plan():
    p = build_plan({}, {})
    assert p.batches == [] and p.total_batches == 0 and p.max_parallelism == 0 and p.critical_path == []


def test_cycle_detected():
    with pytest.raises(DependencyCycle):
        topological_batches(["a", "b"], {"a": ["b"], "b": ["a"]})


def test_scheduler_plan_uses_store(tmp_path):
    s = make(tmp_path)
    s.enqueue_many([spec("a", estimated_duration_s=10), spec("b", prerequisites=["a"]),
                    spec("c", prerequisites=["a"], estimated_duration_s=30), spec("x")])
    c = s.claim("impl", "w")
    assert c.task_id in {"a", "x"}
    while c.task_id != "a":
        s.complete(c.task_id, c.fencing_token)
        c = s.claim("impl", "w")
    s.complete("a", c.fencing_token)
    p = s.plan(["a", "b", "c"], wip_limit=1, default_estimate_s=5)
    assert p.batches == [["b", "c"]] and p.skipped_terminal == {"a": Status.COMPLETED}
    assert p.external_satisfied == ["a"] and p.estimated_makespan_s == 35
    p2 = s.plan(["b", "c"])
    assert p2.external_satisfied == ["a"]
    with pytest.raises(UnknownTask):
        s.plan(["nope"])


def test_scheduler_plan_reports_unsatisfied_outside_prereqs(tmp_path):
    s = make(tmp_path)
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"]), spec("c", prerequisites=["b"])])
    p = s.plan(["b", "c"])
    assert p.batches == [["b"], ["c"]] and p.external_unsatisfied == {"b": ["a"]}


@pytest.mark.parametrize(
    "a, b, overlap",
    [
        (["src/a.py"], ["src/a.py"], True),
        (["src/"], ["src/a.py"], True),
        (["./src/a"], ["src/a/b.py"], True),
        (["src/a.py"], ["src/ab.py"], False),
        (["src/*.py"], ["src/x.py"], True),
        (["docs/x.md"], ["src/*.py"], False),
        ([], ["src/x.py"], False),
    ],
)
def test_scopes_overlap(a, b, overlap):
    assert scopes_overlap(a, b) is overlap
    assert scopes_overlap(b, a) is overlap


def test_split_conflicts_keeps_order_and_separates():
    batches = [["a", "b", "c", "d"], ["e"]]
    scope = {"a": ["src/x.py"], "b": ["src/x.py"], "c": ["docs/"], "d": ["src/y.py"]}
    conflicts = {"c": ["d"]}
    out = split_conflicts(batches, scope, conflicts, solo={"e"})
    assert out == [["a", "c"], ["b", "d"], ["e"]]
    for g in out:
        for i, x in enumerate(g):
            for y in g[i + 1:]:
                assert not scopes_overlap(scope.get(x, []), scope.get(y, []))
                assert y not in conflicts.get(x, []) and x not in conflicts.get(y, [])


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_paths = st.sampled_from(["src", "src/a.py", "src/b.py", "src/sub/c.py", "src/sub", "docs/x.md", "docs",
                          "src/*.py", "tests/t.py", "./src/a.py", "src/sub/", ""])


@settings(max_examples=150, deadline=None)
@given(scopes=st.lists(st.lists(_paths, max_size=3), min_size=1, max_size=12),
       links=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=6),
       solo=st.sets(st.integers(0, 11), max_size=2))
def test_split_conflicts_never_pairs_overlaps(scopes, links, solo):
    ids = [f"t{i}" for i in range(len(scopes))]
    fs = dict(zip(ids, scopes))
    cw: dict[str, list[str]] = {}
    for a, b in links:
        if a < len(ids) and b < len(ids) and a != b:
            cw.setdefault(ids[a], []).append(ids[b])
    solo_ids = {ids[i] for i in solo if i < len(ids)}
    out = split_conflicts([ids], fs, cw, solo=solo_ids)
    assert sorted(x for g in out for x in g) == sorted(ids) and all(out)
    for g in out:
        if any(x in solo_ids for x in g):
            assert len(g) == 1
        for i, x in enumerate(g):
            for y in g[i + 1:]:
                assert not scopes_overlap(fs[x], fs[y]), (x, fs[x], y, fs[y])
                assert y not in cw.get(x, []) and x not in cw.get(y, [])


@pytest.mark.parametrize("seed", range(30))
def test_wip_simulation_matches_reference_including_ties(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 40)
    ids = [f"t{i}" for i in range(n)]
    est = {t: float(rng.randint(1, 4)) for t in ids}  # small integers: many tasks finish at the same instant
    pre = {ids[i]: sorted({ids[rng.randrange(i)] for _ in range(rng.randint(0, 2))}) if i else [] for i in range(n)}
    for wip in (1, 2, 3, 8):
        assert build_plan(est, pre, wip_limit=wip).estimated_makespan_s == _reference_plan(est, pre, wip)[
            "estimated_makespan_s"]


def _reference_plan(est, pre, wip, done=frozenset()):
    """The plan spelled out from its definition, slowly (quadratic): any input order, prerequisites outside the
    set, repeated prerequisites.  Both ways the planner builds its graph (one pass when every task comes after
    its prerequisites, Kahn's algorithm otherwise) must give exactly this."""
    from itertools import chain

    ids = list(est)
    inset = {t: [p for p in (pre.get(t) or ()) if p in est] for t in ids}
    level = {}
    while len(level) < len(ids):  # a task's level: one more than its deepest in-set prerequisite's
        for t in ids:
            if t not in level and all(p in level for p in inset[t]):
                level[t] = 1 + max((level[p] for p in inset[t]), default=-1)
    batches = [[t for t in ids if level[t] == k] for k in range(max(level.values(), default=-1) + 1)]
    finish = {}
    for t in chain.from_iterable(batches):
        finish[t] = max([0.0] + [finish[p] for p in inset[t]]) + est[t]
    path = []
    if ids:  # the first task in batch order finishing last, then each one's first prerequisite finishing last
        longest = max(finish.values())
        t = next(t for t in chain.from_iterable(batches) if finish[t] == longest)
        while t:
            path.append(t)
            best, t = 0.0, ""
            for p in inset[path[-1]]:
                if finish[p] > best:
                    best, t = finish[p], p
        path.reverse()
    makespan = max(finish.values(), default=0.0)
    if wip is not None:  # highest bottom level first, then input order; everything finishing at once first
        children = {t: [c for c in ids for p in inset[c] if p == t] for t in ids}
        bottom = {}
        for t in reversed(list(chain.from_iterable(batches))):
            bottom[t] = est[t] + max([0.0] + [bottom[c] for c in children[t]])
        left = {t: len(inset[t]) for t in ids}
        ready = [t for t in ids if not left[t]]
        running, now = [], 0.0
        while ready or running:
            ready.sort(key=lambda t: (-bottom[t], ids.index(t)))
            while ready and len(running) < wip:
                t = ready.pop(0)
                running.append((now + est[t], t))
            now = min(f for f, _ in running)
            for f, t in [r for r in running if r[0] == now]:
                running.remove((f, t))
                for c in children[t]:
                    left[c] -= 1
                    if not left[c]:
                        ready.append(c)
        makespan = now
    outside = {t: [p for p in (pre.get(t) or ()) if p not in est] for t in ids}
    return {
        "batches": batches,
        "critical_path": path,
        "critical_path_s": max(finish.values(), default=0.0),
        "estimated_makespan_s": makespan,
        "external_satisfied": sorted({p for ps in outside.values() for p in ps if p in done}),
        "external_unsatisfied": {t: [p for p in ps if p not in done] for t, ps in outside.items()
                                 if any(p not in done for p in ps)},
    }


def _random_graph(seed, in_order):
    import random

    rng = random.Random(seed)
    n = rng.randint(0, 40)
    ids = [f"t{i}" for i in range(n)]
    pre = {}
    for i, t in enumerate(ids):
        ps = [ids[rng.randrange(i)] for _ in range(rng.randint(0, 3))] if i else []  # repeats happen
        if rng.random() < 0.2:
            ps.insert(rng.randint(0, len(ps)), f"x{rng.randrange(3)}")  # outside the set
        if ps or rng.random() < 0.5:
            pre[t] = ps
        elif rng.random() < 0.5:
            pre[t] = None
    if not in_order:
        rng.shuffle(ids)
    # Small integers, zeros included: many tasks finish at the same instant, some take no time at all.
    return {t: float(rng.randint(0, 4)) for t in ids}, pre


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "shuffled"])
def test_plan_matches_reference_in_any_order(seed, in_order):
    from baton import planner

    est, pre = _random_graph(seed, in_order)
    ids = list(est)
    if in_order:
        assert planner._graph_in_order(ids, pre, list(est.values())) is not None
    for wip in (None, 1, 2, 3, 8):
        p = build_plan(est, pre, wip_limit=wip, external_done={"x0"})
        ref = _reference_plan(est, pre, wip, done={"x0"})
        assert {k: getattr(p, k) for k in ref} == ref, wip
    batches, children = topological_batches(ids, pre)
    assert batches == p.batches
    assert children == {t: [c for c in ids for q in (pre.get(c) or ()) if q == t] for t in ids}


@pytest.mark.parametrize("seed", range(20))
def test_in_order_pass_and_kahn_agree(seed, monkeypatch):
    from baton import planner

    est, pre = _random_graph(seed, in_order=True)
    ids = list(est)
    fast = [build_plan(est, pre, wip_limit=w, external_done={"x1"}) for w in (None, 2, 3, 8)]
    fast_batches = topological_batches(ids, pre)
    monkeypatch.setattr(planner, "_graph_in_order", lambda *a: None)
    assert [build_plan(est, pre, wip_limit=w, external_done={"x1"}) for w in (None, 2, 3, 8)] == fast
    assert topological_batches(ids, pre) == fast_batches


def test_in_order_pass_declines_later_or_own_prerequisites():
    from baton import planner

    assert planner._graph_in_order(["a", "b"], {"a": ["b"]}, [1.0, 1.0]) is None
    assert planner._graph_in_order(["a"], {"a": ["a"]}, [1.0]) is None
    with pytest.raises(DependencyCycle):
        build_plan({"a": 1.0}, {"a": ["a"]})
    p = build_plan({"b": 1.0, "a": 2.0}, {"b": ["a"]}, wip_limit=1)
    assert p.batches == [["a"], ["b"]] and p.critical_path == ["a", "b"] and p.estimated_makespan_s == 3
