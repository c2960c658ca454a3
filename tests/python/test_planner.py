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


def _reference_makespan(est, pre, wip):
    """Textbook list scheduling (highest bottom level first, then input order), written for clarity."""
    ids = list(est)
    children = {t: [c for c in ids if t in pre.get(c, ())] for t in ids}
    bottom = {}
    for t in reversed(topological_batches(ids, pre)[0]):
        for x in t:
            bottom[x] = est[x] + max((bottom[c] for c in children[x]), default=0.0)
    left = {t: len(pre.get(t, ())) for t in ids}
    ready = [t for t in ids if left[t] == 0]
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
                if left[c] == 0:
                    ready.append(c)
    return now


@pytest.mark.parametrize("seed", range(30))
def test_wip_simulation_matches_reference_including_ties(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 40)
    ids = [f"t{i}" for i in range(n)]
    est = {t: float(rng.randint(1, 4)) for t in ids}  # small integers: many tasks finish at the same instant
    pre = {ids[i]: sorted({ids[rng.randrange(i)] for _ in range(rng.randint(0, 2))}) if i else [] for i in range(n)}
    for wip in (1, 2, 3, 8):
        assert build_plan(est, pre, wip_limit=wip).estimated_makespan_s == _reference_makespan(est, pre, wip)
