"""shadow.RoutingShadow: the Python routing rules REDUNDANT holds the native router's dispatches to
(docs/modes.md, "REDUNDANT")."""

from __future__ import annotations

from baton.shadow import RoutingShadow

Q, OTHER_Q = 7, 8
HIGH, NORMAL = 1, 2


def shadow_with_agents(*credits: int) -> RoutingShadow:
    s = RoutingShadow()
    for ep, credit in enumerate(credits, start=100):
        s.agent(ep, Q, credit)
    return s


def test_in_order_dispatches_within_credit_agree() -> None:
    s = shadow_with_agents(2, 1)
    for did in (1, 2, 3):
        s.pushed(Q, did, NORMAL)
    assert s.dispatched(100, 1) is None
    assert s.dispatched(101, 2) is None
    assert s.dispatched(100, 3) is None
    s.result(101, 2)  # a credit back
    s.pushed(Q, 4, NORMAL)
    assert s.dispatched(101, 4) is None
    assert s.checked == 4 and not s.divergences


def test_a_task_skipping_an_earlier_one_of_equal_or_higher_priority_diverges() -> None:
    s = shadow_with_agents(4)
    s.pushed(Q, 1, NORMAL)
    s.pushed(Q, 2, NORMAL)
    problem = s.dispatched(100, 2)
    assert problem is not None and "went before 1" in problem and s.divergences["order"] == 1
    s2 = shadow_with_agents(4)
    s2.pushed(Q, 1, HIGH)
    s2.pushed(Q, 2, NORMAL)
    assert s2.dispatched(100, 2) is not None  # a more urgent task pushed earlier was waiting


def test_a_later_more_urgent_task_may_overtake_and_a_lower_priority_one_may_wait() -> None:
    s = shadow_with_agents(4)
    s.pushed(Q, 1, NORMAL)
    s.pushed(Q, 2, HIGH)  # pushed later but more urgent: going first is the router's rule
    assert s.dispatched(100, 2) is None
    assert s.dispatched(100, 1) is None
    s.pushed(Q, 3, NORMAL)
    s.pushed(Q, 4, HIGH)
    # 3 before 4: the router may have dispatched 3 before it read 4 (timing the coordinator cannot see)
    assert s.dispatched(100, 3) is None and not s.divergences


def test_agent_rules() -> None:
    s = shadow_with_agents(1)
    s.agent(200, OTHER_Q, 5)
    for did in (1, 2, 3):
        s.pushed(Q, did, NORMAL)
    assert s.dispatched(100, 1) is None
    over = s.dispatched(100, 2)
    assert over is not None and "holds 1 of 1" in over
    wrong = s.dispatched(200, 3)
    assert wrong is not None and "does not serve work queue" in wrong
    assert s.divergences["agent"] == 2


def test_unknown_repeated_and_revoked_tasks_diverge() -> None:
    s = shadow_with_agents(5)
    s.pushed(Q, 1, NORMAL)
    s.pushed(Q, 2, NORMAL)
    assert s.dispatched(100, 1) is None
    assert s.dispatched(100, 1) is not None  # handed out twice
    s.revoked(2)
    assert s.dispatched(100, 2) is not None  # revoked, yet dispatched
    assert s.dispatched(100, 99) is not None  # never pushed
    assert s.divergences["task"] == 3


def test_closed_agents_and_tasks_from_before_the_shadow() -> None:
    s = shadow_with_agents(1)
    s.pushed(Q, 1, NORMAL, ordered=False)  # queued before the shadow started: order unknown
    s.pushed(Q, 2, NORMAL, ordered=False)
    s.holding(100, 0)  # held before the shadow started: counts against the credit
    assert s.dispatched(100, 2) is not None  # over credit
    s.result(100, 0)
    s.result(100, 2)
    assert s.dispatched(100, 1) is None  # 2 went first, yet 1 does not count as skipped
    s.closed(100)
    s.pushed(Q, 3, NORMAL)
    assert s.dispatched(100, 3) is not None  # a closed endpoint
