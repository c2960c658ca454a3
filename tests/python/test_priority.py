"""Priority: the formula's factors, monotonicity, aging (no starvation), recomputation, dispatch order."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton import priority as prio
from baton.models import Status
from scheduler_fixtures import ManualClock, make, spec

W = prio.DEFAULT_WEIGHTS


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def order(s, agent="impl"):
    return [t for t, _ in s.ready_queue(agent)]


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def s(tmp_path, clock):
    sch = make(tmp_path, clock, wip_per_agent_type=None, priority_refresh_s=0.0)
    yield sch
    sch.close()


def test_breakdown_sums_and_names_inputs(s, clock):
    s.enqueue(spec("a", base_priority=7, source="agent_planner", deadline=iso(clock.now + 7200),
                   estimated_duration_s=600))
    clock.advance(60)
    b = s.explain_priority("a")
    assert b.total == pytest.approx(b.base + b.urgency + b.unblock + b.source + b.aging)
    assert b.base == pytest.approx(W.base * 0.7) and b.source == pytest.approx(W.source * 0.5)
    assert b.waited_s == pytest.approx(60) and b.aging == pytest.approx(W.aging_rate * 60)
    assert b.seconds_to_deadline == pytest.approx(7140) and b.base_priority == 7
    assert s.get("a").calculated_priority == pytest.approx(b.total)


def test_urgency_max_when_overdue_or_slack_below_estimate():
    now = 1000.0
    assert prio.urgency(W, None, 0, now) == 0
    assert prio.urgency(W, now - 5, 0, now) == 1.0  # overdue
    assert prio.urgency(W, now + 100, 200, now) == 1.0  # time left < estimate
    assert 0 < prio.urgency(W, now + 10_000, 0, now) < prio.urgency(W, now + 100, 0, now) < 1


@settings(max_examples=200, deadline=None)
@given(
    b1=st.integers(0, 10), b2=st.integers(0, 10), depth=st.integers(0, 50),
    src=st.sampled_from(["human", "agent_planner", "custom"]),
    d1=st.one_of(st.none(), st.floats(-1e6, 1e7)), d2=st.one_of(st.none(), st.floats(-1e6, 1e7)),
    est=st.floats(0, 1e5), waited=st.floats(0, 1e6),
)
def test_monotonic_in_base_and_deadline(b1, b2, depth, src, d1, d2, est, waited):
    now = 1e9

    def total(base, dl):
        return prio.explain(W, base_priority=base, depth=depth, source=src,
                            deadline=None if dl is None else now + dl, estimate=est,
                            ready_at=now - waited, now=now).total

    if b1 <= b2:
        assert total(b1, d1) <= total(b2, d1)
    # Nearer deadline (no deadline = infinitely far) never lowers the priority.
    near, far = (d1, d2) if (d2 is None or (d1 is not None and d1 <= d2)) else (d2, d1)
    if near is not None:
        assert total(b1, near) >= total(b1, far)


def test_dispatch_follows_base_priority(s):
    s.enqueue_many([spec("low", base_priority=1), spec("high", base_priority=9), spec("mid", base_priority=5)])
    assert order(s) == ["high", "mid", "low"]
    assert [s.claim("impl", "w").task_id for _ in range(3)] == ["high", "mid", "low"]


def test_nearer_deadline_first_even_when_both_overdue(s, clock):
    s.enqueue_many([spec("later", deadline=iso(clock.now - 10)), spec("sooner", deadline=iso(clock.now - 100)),
                    spec("none")])
    assert order(s) == ["sooner", "later", "none"]


def test_source_factor(s):
    s.enqueue_many([spec("impl", source="agent_implementation"), spec("human", source="human")])
    assert order(s) == ["human", "impl"]


def test_unblocking_work_ranks_higher(s):
    s.enqueue_many([spec("leaf"), spec("root"), spec("c1", prerequisites=["root"]),
                    spec("c2", prerequisites=["c1"])])
    assert s.get("root").downstream_depth == 2 and s.get("leaf").downstream_depth == 0
    assert order(s) == ["root", "leaf"]
    # Depth grows when a dependent is added later, and the rank follows.
    s.enqueue(spec("c3", prerequisites=["leaf"]))
    s.enqueue(spec("c4", prerequisites=["c3"]))
    s.enqueue(spec("c5", prerequisites=["c4"]))
    assert s.get("leaf").downstream_depth == 3
    assert order(s) == ["leaf", "root"]


def test_priority_recomputed_as_deadline_nears(s, clock):
    s.enqueue_many([spec("dl", base_priority=4, deadline=iso(clock.now + 100_000)), spec("plain", base_priority=5)])
    assert order(s) == ["plain", "dl"]
    p0 = s.get("dl").priority_breakdown.urgency
    clock.advance(99_000)
    assert s.get("dl").priority_breakdown.urgency > p0
    assert order(s) == ["dl", "plain"]
    assert s.claim("impl", "w").task_id == "dl"


def test_claim_refreshes_deadline_ranks(tmp_path, clock):
    sch = make(tmp_path, clock, wip_per_agent_type=None, priority_refresh_s=1.0)
    sch.enqueue_many([spec("dl", base_priority=4, deadline=iso(clock.now + 100_000)), spec("plain", base_priority=5)])
    clock.advance(99_000)
    assert sch.claim("impl", "w").task_id == "dl"


def test_aging_prevents_starvation(s, clock):
    s.enqueue(spec("old", base_priority=0, source="agent_implementation"))
    bound = (W.base + W.urgency + W.unblock + W.source) / W.aging_rate
    clock.advance(bound + 1)
    s.enqueue(spec("fresh", base_priority=10, source="human", deadline=iso(clock.now - 1)))
    assert order(s) == ["old", "fresh"]


def test_stored_rank_matches_python_formula(s, clock):
    s.enqueue_many([spec("a", base_priority=3, deadline=iso(clock.now + 5000), estimated_duration_s=100),
                    spec("b", base_priority=8), spec("c", prerequisites=["a"])])
    clock.advance(1234)
    q = dict(s.ready_queue())
    for tid in ("a", "b"):
        assert q[tid] == pytest.approx(s.get(tid).calculated_priority, rel=1e-9, abs=1e-6)


def test_pending_tasks_do_not_age(s, clock):
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"])])
    clock.advance(1000)
    assert s.get("b").priority_breakdown.aging == 0
    assert s.get("b").status is Status.PENDING


def test_weights_validated():
    with pytest.raises(ValueError):
        prio.PriorityWeights(base=-1)
    with pytest.raises(ValueError):
        prio.PriorityWeights(urgency_horizon_s=0)
