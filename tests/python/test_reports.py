"""Reports: queue status, progress pulse (text and JSON), anomaly flags."""

from __future__ import annotations

import json

import msgpack
import pytest

from baton.reports import pulse, queue_status, render_pulse
from baton.store import TaskStore
from baton.taskstate import IMAGE_FIELDS, pack_image
from scheduler_fixtures import ManualClock, make, spec


@pytest.fixture
def clock():
    return ManualClock()


def test_queue_status(tmp_path, clock):
    s = make(tmp_path, clock)
    assert queue_status(s).total == 0 and queue_status(s).average_priority is None
    s.enqueue_many([spec("a", base_priority=10), spec("b", prerequisites=["a"], base_priority=0), spec("c")])
    clock.advance(30)
    s.enqueue(spec("d"))
    q = queue_status(s)
    assert q.total == 4 and q.by_status["ready"] == 3 and q.by_status["pending"] == 1
    assert q.by_status["completed"] == 0
    expected = sum(s.get(t).calculated_priority for t in "abcd") / 4
    assert q.average_priority == pytest.approx(expected)
    assert q.oldest_pending.task_id == "b" and q.oldest_pending.age_s == pytest.approx(30)
    assert q.oldest_waiting.task_id == "a"


def test_pulse_contents(tmp_path, clock):
    s = make(tmp_path, clock, wip_per_agent_type=None)
    ac = [{"id": "1", "text": "x"}, {"id": "2", "text": "y"}]
    s.enqueue_many([
        spec("h1", risk="High", base_priority=9), spec("h2", risk="High", base_priority=8, acceptance_criteria=ac),
        spec("m1", prerequisites=["h1"]), spec("l1", risk="Low", base_priority=0), spec("x1", base_priority=0),
        spec("dep", prerequisites=["x1"]),
    ])
    c = s.claim("impl", "w1")
    assert c.task_id == "h1"
    s.complete("h1", c.fencing_token)
    clock.advance(10)
    c2 = s.claim("impl", "w2")
    assert c2.task_id == "h2"
    s.mark_criteria_done("h2", c2.fencing_token, ["1"])
    clock.advance(5)
    s.cancel("l1")
    c3 = s.claim_many("impl", "w3", 5)
    x1 = next(c for c in c3 if c.task_id == "x1")
    s.fail("x1", x1.fencing_token, "broken", transient=False)
    p = pulse(s)
    assert p.counts["completed"] == 1 and p.counts["cancelled"] == 1 and p.counts["dead_lettered"] == 1
    assert p.progress_pct == pytest.approx(100 * 1 / 5)
    assert p.high_risk_done == 1 and p.high_risk_remaining == 1
    assert p.latest_completed.task_id == "h1"
    ip = {i.task_id: i for i in p.in_progress}
    assert ip["h2"].criteria_done == ["1"] and ip["h2"].criteria_remaining == ["2"]
    assert p.oldest_in_progress.task_id == "h2" and p.oldest_in_progress.age_s == pytest.approx(5)
    assert {b.task_id for b in p.blockers} == {"dep", "x1"}
    assert p.anomalies == []
    j = json.loads(p.model_dump_json())
    assert j["counts"]["running"] == p.counts["running"] and "next_eligible" in j and "blockers" in j
    text = render_pulse(p)
    for needle in ("progress: 20.0%", "High risk: 1 done, 1 remaining", "h2", "criteria 1/2", "dep:"):
        assert needle in text


def test_next_eligible_in_pulse(tmp_path, clock):
    s = make(tmp_path, clock)
    s.enqueue_many([spec("low", risk="Low", base_priority=10), spec("high", risk="High", base_priority=0)])
    assert pulse(s).next_eligible == ["high", "low"]


def test_anomaly_stale_in_progress(tmp_path, clock):
    s = make(tmp_path, clock)
    s.enqueue(spec("a"))
    c = s.claim("impl", "w", lease_s=10_000)
    clock.advance(100)
    assert pulse(s, stale_after_s=200).anomalies == []
    clock.advance(200)
    s.heartbeat("a", c.fencing_token, lease_s=10_000)
    an = pulse(s, stale_after_s=200).anomalies
    assert [(a.code, a.task_id) for a in an] == [("STALE_IN_PROGRESS", "a")]


def test_anomaly_wip_exceeded(tmp_path, clock):
    s = make(tmp_path, clock, wip_per_agent_type=3)
    s.enqueue_many([spec(f"t{i}") for i in range(3)])
    assert len(s.claim_many("impl", "w", 3)) == 3
    assert pulse(s).anomalies == []
    stricter = make(tmp_path, clock, wip_per_agent_type=1)  # the limit was lowered while tasks ran
    codes = [a.code for a in pulse(stricter).anomalies]
    assert codes == ["WIP_EXCEEDED"]
    stricter.close()


def test_anomaly_completed_without_running(tmp_path, clock):
    s = make(tmp_path, clock)
    s.enqueue_many([spec("a"), spec("b")])
    # Another writer (an older tool, a manual fix) marked a task completed without a claim: a journal entry
    # written through a second connection, which the scheduler picks up before reporting.
    rec = s.record("b")
    img = msgpack.unpackb(pack_image(rec))
    img[IMAGE_FIELDS.index("status")] = "completed"
    img[IMAGE_FIELDS.index("finished")] = 1.0
    with TaskStore(s.store.path) as other, other.write() as c:
        other.append(c, msgpack.packb([[], [img]]))
    an = pulse(s).anomalies
    assert [(a.code, a.task_id) for a in an] == [("COMPLETED_WITHOUT_RUN", "b")]
