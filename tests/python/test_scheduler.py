"""Scheduler rules: DAG, leases and fencing, terminal states, policies, cancel, retries, WIP, idempotency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from baton.models import DependentPolicy, Status
from baton.scheduler import Scheduler, SchedulerConfig
from baton.scheduler_errors import (
    DependencyCycle,
    DuplicateTask,
    InvalidTransition,
    StaleLease,
    TaskValidationError,
    UnknownPrerequisite,
    UnknownTask,
)
from scheduler_fixtures import ManualClock, make, spec


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def s(tmp_path, clock):
    sch = make(tmp_path, clock, wip_per_agent_type=None)
    yield sch
    sch.close()


def run(s: Scheduler, tid: str, result=None):
    """Claim exactly ``tid`` (it must be the best ready task of its type) and complete it."""
    agent = s.get(tid).agent_type
    c = s.claim(agent, "w")
    assert c is not None and c.task_id == tid, (c, tid)
    return s.complete(c.task_id, c.fencing_token, result)


# --- prerequisites -----------------------------------------------------------------------------------------


def test_independent_task_is_ready_and_dependent_pending(s):
    assert s.enqueue(spec("a")).status is Status.READY
    assert s.enqueue(spec("b", prerequisites=["a"])).status is Status.PENDING


def test_unknown_prerequisite_rejected_with_details(s):
    with pytest.raises(UnknownPrerequisite) as ei:
        s.enqueue(spec("b", prerequisites=["ghost"]))
    assert ei.value.details[0]["prerequisite"] == "ghost"
    with pytest.raises(UnknownTask):
        s.get("b")


def test_payload_that_cannot_be_kept_exactly_rejects_the_batch(s):
    # A tuple would come back as a list: refused, naming each such task by its index; nothing is stored.
    with pytest.raises(TaskValidationError) as ei:
        s.enqueue_many([spec("a"), spec("b", input=(1, 2)), spec("c", input={"k": {1, 2}}),
                        spec("d", metadata={"m": (1,)}), spec("e", metadata={"ok": [1]}, input=b"raw")])
    assert [(d["index"], d["field"]) for d in ei.value.details] == [(1, "input"), (2, "input"), (3, "metadata")]
    assert "kept exactly" in str(ei.value) and str(ei.value).startswith("invalid task at index 1: ")
    assert s.tasks() == []
    assert s.enqueue(spec("a", input=[1, 2])).created
    assert s.enqueue(spec("e", metadata={"ok": [1]}, input=b"raw")).created
    assert s.get("e").metadata == {"ok": [1]} and s.get("e").input == b"raw"


def test_completed_prerequisite_is_satisfied_at_enqueue(s):
    s.enqueue(spec("a"))
    run(s, "a")
    assert s.enqueue(spec("b", prerequisites=["a"])).status is Status.READY


def test_dependent_ready_only_after_last_prerequisite(s):
    s.enqueue_many([spec("a"), spec("b"), spec("c", prerequisites=["a", "b"])])
    assert run(s, "a") == []
    assert s.status_of("c") is Status.PENDING
    assert run(s, "b") == ["c"]
    assert s.status_of("c") is Status.READY


def test_batch_may_reference_later_items(s):
    res = s.enqueue_many([spec("c", prerequisites=["b"]), spec("b", prerequisites=["a"]), spec("a")])
    assert [r.status for r in res] == [Status.PENDING, Status.PENDING, Status.READY]


def test_cycle_inside_batch_rejected_and_nothing_stored(s):
    with pytest.raises(DependencyCycle) as ei:
        s.enqueue_many([spec("a", prerequisites=["c"]), spec("b", prerequisites=["a"]),
                        spec("c", prerequisites=["b"]), spec("d")])
    assert {d["task_id"] for d in ei.value.details} == {"a", "b", "c"}
    assert s.tasks() == []


def test_add_prerequisite_rejects_cycles(s):
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"]), spec("c", prerequisites=["b"])])
    with pytest.raises(DependencyCycle):
        s.add_prerequisite("a", "c")
    with pytest.raises(DependencyCycle):
        s.add_prerequisite("a", "a")
    assert s.prerequisites_of("a") == []


def test_add_prerequisite_moves_ready_back_to_pending(s):
    s.enqueue_many([spec("a"), spec("x")])
    assert s.add_prerequisite("x", "a") is Status.PENDING
    assert run(s, "a") == ["x"]


def test_duplicate_ids_rejected(s):
    s.enqueue(spec("a"))
    with pytest.raises(DuplicateTask):
        s.enqueue(spec("a"))
    with pytest.raises(DuplicateTask):
        s.enqueue_many([spec("x"), spec("x")])


def test_generated_ids_are_unique(s):
    res = s.enqueue_many([{"summary": "n", "agent_type": "impl"} for _ in range(50)])
    assert len({r.task_id for r in res}) == 50


# --- claims, leases, fencing -------------------------------------------------------------------------------


def test_claim_sets_lease_and_token(s, clock):
    s.enqueue(spec("a"))
    c = s.claim("impl", "w1", lease_s=10)
    t = s.get("a")
    assert t.status is Status.RUNNING and t.lease_holder == "w1" and t.fencing_token == c.fencing_token
    assert t.lease_expires_at.timestamp() == pytest.approx(clock.now + 10)
    assert t.attempts == 1
    assert s.claim("impl", "w2") is None  # nothing else ready


def test_claim_only_matching_agent_type(s):
    s.enqueue(spec("a", agent_type="review"))
    assert s.claim("impl", "w") is None
    assert s.claim("review", "w").task_id == "a"


def test_expired_lease_returns_to_ready_and_old_token_is_stale(s, clock):
    s.enqueue(spec("a"))
    c1 = s.claim("impl", "w1", lease_s=5)
    clock.advance(6)
    assert s.expire_leases() == ["a"]
    t = s.get("a")
    assert t.status is Status.READY and t.attempt_history[-1].outcome == "lease_expired"
    c2 = s.claim("impl", "w2", lease_s=5)
    assert c2.task_id == "a" and c2.fencing_token > c1.fencing_token
    with pytest.raises(StaleLease):
        s.complete("a", c1.fencing_token, "late")
    with pytest.raises(StaleLease):
        s.heartbeat("a", c1.fencing_token)
    s.complete("a", c2.fencing_token, "ok")
    assert s.get("a").result == "ok"


def test_claim_itself_reclaims_expired_leases(s, clock):
    s.enqueue(spec("a"))
    s.claim("impl", "w1", lease_s=5)
    clock.advance(5)
    assert s.claim("impl", "w2").task_id == "a"


def test_heartbeat_extends_lease(s, clock):
    s.enqueue(spec("a"))
    c = s.claim("impl", "w", lease_s=5)
    clock.advance(4)
    assert s.heartbeat("a", c.fencing_token, lease_s=5) == pytest.approx(clock.now + 5)
    clock.advance(4)
    assert s.expire_leases() == []
    s.complete("a", c.fencing_token)


def test_timeout_bounds_the_lease(s, clock):
    s.enqueue(spec("a", timeout_s=3))
    c = s.claim("impl", "w", lease_s=100)
    assert c.lease_expires_at == pytest.approx(clock.now + 3)
    clock.advance(2)
    assert s.heartbeat("a", c.fencing_token, lease_s=100) == pytest.approx(clock.now + 1)
    clock.advance(1)
    assert s.expire_leases() == ["a"]
    assert s.get("a").error == "timed out"


def test_lease_expiry_with_attempts_exhausted_dead_letters(s, clock):
    s.enqueue(spec("a", max_attempts=1))
    s.claim("impl", "w", lease_s=1)
    clock.advance(2)
    s.expire_leases()
    assert s.status_of("a") is Status.DEAD_LETTERED


def test_threads_never_claim_the_same_task(tmp_path):
    path = tmp_path / "t.db"
    setup = Scheduler(path, config=SchedulerConfig(wip_per_agent_type=None))
    setup.enqueue_many([spec(f"t{i}") for i in range(200)])
    setup.close()
    got: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            sch = Scheduler(path, config=SchedulerConfig(wip_per_agent_type=None))
            while True:
                cs = sch.claim_many("impl", f"w{k}", 3)
                if not cs:
                    break
                got[k].extend(c.task_id for c in cs)
            sch.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a claimer thread hung"
    assert not errors
    flat = [x for g in got for x in g]
    assert len(flat) == len(set(flat)) == 200


# --- terminal states ---------------------------------------------------------------------------------------


def test_terminal_never_changes(s):
    s.enqueue(spec("a"))
    c = s.claim("impl", "w")
    s.complete("a", c.fencing_token, 1)
    with pytest.raises(InvalidTransition, match="terminal"):
        s.complete("a", c.fencing_token, 2)
    with pytest.raises(InvalidTransition):
        s.fail("a", c.fencing_token, "x")
    res = s.cancel("a")
    assert res.changed is False and res.total_cancelled == 0 and "already completed" in res.message
    t = s.get("a")
    assert t.status is Status.COMPLETED and t.result == 1


def test_cancelled_running_task_rejects_completion(s):
    s.enqueue(spec("a"))
    c = s.claim("impl", "w")
    assert s.cancel("a").changed
    with pytest.raises(InvalidTransition):
        s.complete("a", c.fencing_token)
    assert s.status_of("a") is Status.CANCELLED


def test_complete_many_reports_per_item(s):
    s.enqueue_many([spec("a"), spec("b"), spec("c")])
    cs = {c.task_id: c for c in s.claim_many("impl", "w", 3)}
    out = s.complete_many([("a", cs["a"].fencing_token, 1), ("b", cs["b"].fencing_token + 99, 2),
                           ("zz", 1, 3), ("a", cs["a"].fencing_token, 4)])
    assert out.applied == ["a"]
    assert set(out.rejected) == {"b", "zz", "a"} and "twice" in out.rejected["a"]
    assert "stale" in out.rejected["b"]
    assert s.get("a").result == 1 and s.status_of("b") is Status.RUNNING


# --- cancellation ------------------------------------------------------------------------------------------


def _diamond(s):
    # a -> b, a -> c, b,c -> d; e independent
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"]), spec("c", prerequisites=["a"]),
                    spec("d", prerequisites=["b", "c"]), spec("e")])


def test_cancel_cascades_to_transitive_dependents(s):
    _diamond(s)
    res = s.cancel("a")
    assert res.cancelled_task_id == "a"
    assert sorted(res.cascaded_task_ids) == ["b", "c", "d"]
    assert res.total_cancelled == 4
    assert {t.id for t in s.tasks(Status.CANCELLED)} == {"a", "b", "c", "d"}
    assert s.status_of("e") is Status.READY


def test_cancel_dry_run_changes_nothing(s):
    _diamond(s)
    before = {t.id: t.status for t in s.tasks()}
    res = s.cancel("b", dry_run=True)
    assert res.dry_run and res.cascaded_task_ids == ["d"] and res.total_cancelled == 2 and not res.changed
    assert {t.id: t.status for t in s.tasks()} == before
    real = s.cancel("b")
    assert real.cascaded_task_ids == res.cascaded_task_ids and real.total_cancelled == res.total_cancelled


def test_cancel_skips_terminal_dependents(s):
    s.enqueue_many([spec("a"), spec("b")])
    run(s, "a")
    s.enqueue(spec("c", prerequisites=["a", "b"]))
    res = s.cancel("b")
    assert res.cascaded_task_ids == ["c"]
    assert s.status_of("a") is Status.COMPLETED


def test_cancel_unknown_task(s):
    with pytest.raises(UnknownTask):
        s.cancel("ghost")


# --- dependents' policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fail", "cancel"])
def test_policy_block_is_default(s, how):
    s.enqueue_many([spec("a", max_attempts=1), spec("b", prerequisites=["a"])])
    if how == "fail":
        c = s.claim("impl", "w")
        s.fail("a", c.fencing_token, "boom", transient=False)
    else:
        s.cancel("a", cascade=False)
    t = s.get("b")
    assert t.status is Status.BLOCKED and "prerequisite a" in t.blocked_reason
    assert s.waiting_reasons()["b"].startswith("blocked: prerequisite a")


def test_policy_cancel_chains(s):
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"], on_prerequisite_failure="cancel"),
                    spec("c", prerequisites=["b"], on_prerequisite_failure="cancel"),
                    spec("d", prerequisites=["c"])])
    res = s.cancel("a", cascade=False, dry_run=True)
    assert res.cascaded_task_ids == ["b", "c"]
    res = s.cancel("a", cascade=False)
    assert res.cascaded_task_ids == ["b", "c"] and res.total_cancelled == 3
    assert s.status_of("d") is Status.BLOCKED


def test_policy_proceed_runs_anyway(s):
    s.enqueue_many([spec("a"), spec("z"), spec("b", prerequisites=["a", "z"], on_prerequisite_failure="proceed")])
    c = s.claim_many("impl", "w", 2)
    ta = next(x for x in c if x.task_id == "a")
    tz = next(x for x in c if x.task_id == "z")
    s.fail("a", ta.fencing_token, "boom", transient=False)
    assert s.status_of("b") is Status.PENDING
    s.complete("z", tz.fencing_token)
    assert s.status_of("b") is Status.READY


def test_policy_applies_at_enqueue_when_prereq_already_failed(s):
    s.enqueue(spec("a"))
    s.cancel("a")
    assert s.enqueue(spec("b", prerequisites=["a"])).status is Status.BLOCKED
    assert s.enqueue(spec("c", prerequisites=["a"], on_prerequisite_failure="proceed")).status is Status.READY
    assert s.enqueue(spec("d", prerequisites=["a"], on_prerequisite_failure="cancel")).status is Status.CANCELLED


def test_configured_default_policy(tmp_path):
    sch = make(tmp_path, default_policy=DependentPolicy.CANCEL)
    sch.enqueue_many([spec("a"), spec("b", prerequisites=["a"])])
    sch.cancel("a", cascade=False)
    assert sch.status_of("b") is Status.CANCELLED


# --- retries and dead letters ------------------------------------------------------------------------------


def test_transient_failure_retries_after_backoff(s, clock):
    s.enqueue(spec("a", max_attempts=3))
    c = s.claim("impl", "w")
    out = s.fail("a", c.fencing_token, "flaky")
    assert out.status is Status.READY and out.retry_at > clock.now
    assert s.claim("impl", "w") is None  # still backing off
    assert "retry backoff" in s.waiting_reasons()["a"]
    clock.now = out.retry_at
    c2 = s.claim("impl", "w")
    assert c2.task_id == "a" and c2.attempt == 2


def test_exhausted_transient_goes_to_dead_letters_with_history(s, clock):
    s.enqueue(spec("a", max_attempts=2))
    for _ in range(2):
        c = s.claim("impl", "w")
        out = s.fail("a", c.fencing_token, f"err{c.attempt}")
        if out.retry_at:
            clock.now = out.retry_at
    t = s.get("a")
    assert t.status is Status.DEAD_LETTERED
    assert [h.outcome for h in t.attempt_history] == ["failed_transient", "failed_transient"]
    assert [h.error for h in t.attempt_history] == ["err1", "err2"]
    assert [x.id for x in s.dead_letters()] == ["a"]


def test_permanent_failure_dead_letters_immediately(s):
    s.enqueue(spec("a", max_attempts=5))
    c = s.claim("impl", "w")
    out = s.fail("a", c.fencing_token, "bad input", transient=False)
    assert out.status is Status.DEAD_LETTERED and out.attempts == 1


def test_permanent_failure_without_dead_letter_is_failed(s):
    s.enqueue(spec("a"))
    c = s.claim("impl", "w")
    assert s.fail("a", c.fencing_token, "no", transient=False, dead_letter=False).status is Status.FAILED
    with pytest.raises(InvalidTransition):
        s.requeue_dead_letter("a")


def test_requeue_dead_letter_creates_copy_and_unblocks_dependents(s):
    s.enqueue_many([spec("a", input={"k": [1]}), spec("b", prerequisites=["a"])])
    c = s.claim("impl", "w")
    s.fail("a", c.fencing_token, "boom", transient=False)
    assert s.status_of("b") is Status.BLOCKED
    res = s.requeue_dead_letter("a")
    assert res.created and res.status is Status.READY
    new = s.get(res.task_id)
    assert new.input == {"k": [1]} and new.requeued_from == "a"
    assert s.get("a").status is Status.DEAD_LETTERED and s.get("a").requeued_as == res.task_id
    assert s.status_of("b") is Status.PENDING and s.prerequisites_of("b") == [res.task_id]
    assert s.requeue_dead_letter("a").task_id == res.task_id  # idempotent
    assert s.dead_letters() == []
    assert run(s, res.task_id) == ["b"]


def test_backoff_grows_with_cap_and_jitter(tmp_path):
    sch = make(tmp_path, backoff_base_s=1.0, backoff_cap_s=10.0)
    for attempt, nominal in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        for _ in range(20):
            d = sch.backoff_delay(attempt)
            assert nominal / 2 <= d <= nominal
    assert len({round(sch.backoff_delay(3), 9) for _ in range(20)}) > 1  # jittered


# --- limits and idempotency --------------------------------------------------------------------------------


def test_default_wip_limit_is_three_per_agent_type(tmp_path):
    sch = make(tmp_path)
    sch.enqueue_many([spec(f"i{k}") for k in range(5)] + [spec(f"r{k}", agent_type="review") for k in range(5)])
    assert len(sch.claim_many("impl", "w", 10)) == 3
    assert sch.claim("impl", "w") is None
    assert len(sch.claim_many("review", "w", 10)) == 3
    assert "WIP limit" in sch.waiting_reasons()["i3"]


def test_wip_per_type_override_and_global(tmp_path):
    sch = make(tmp_path, wip_limits={"impl": 1}, wip_global=2)
    sch.enqueue_many([spec("i1"), spec("i2"), spec("r1", agent_type="review"), spec("r2", agent_type="review")])
    assert len(sch.claim_many("impl", "w", 5)) == 1
    assert len(sch.claim_many("review", "w", 5)) == 1  # global limit 2 reached
    assert "global WIP" in sch.waiting_reasons()["r2"]


def test_wip_slot_freed_by_completion(tmp_path):
    sch = make(tmp_path, wip_per_agent_type=1)
    sch.enqueue_many([spec("a"), spec("b")])
    c = sch.claim("impl", "w")
    assert sch.claim("impl", "w") is None
    sch.complete(c.task_id, c.fencing_token)
    assert sch.claim("impl", "w") is not None


def test_idempotency_key_returns_existing(s):
    first = s.enqueue(spec("a", idempotency_key="k1"))
    again = s.enqueue({"summary": "other", "agent_type": "impl", "idempotency_key": "k1"})
    assert again.task_id == "a" and not again.created and first.created
    batch = s.enqueue_many([{"summary": "x", "agent_type": "impl", "idempotency_key": "k2"},
                            {"summary": "y", "agent_type": "impl", "idempotency_key": "k2"}])
    assert batch[0].task_id == batch[1].task_id and batch[0].created and not batch[1].created
    assert len(s.tasks()) == 2


# --- reasons and criteria ----------------------------------------------------------------------------------


def test_every_waiting_task_has_a_reason(s):
    _diamond(s)
    reasons = s.waiting_reasons()
    assert set(reasons) == {"a", "b", "c", "d", "e"}
    assert reasons["d"] == "waiting on prerequisites: b (pending), c (pending)"
    assert reasons["a"].startswith("ready")


def test_mark_criteria_done(s):
    s.enqueue(spec("a", acceptance_criteria=[{"id": "1", "text": "x"}, {"id": "2", "text": "y"}]))
    c = s.claim("impl", "w")
    assert s.mark_criteria_done("a", c.fencing_token, ["2"]) == ["2"]
    with pytest.raises(TaskValidationError):
        s.mark_criteria_done("a", c.fencing_token, ["9"])
    with pytest.raises(StaleLease):
        s.mark_criteria_done("a", c.fencing_token + 1, ["1"])
    assert s.get("a").criteria_done == ["2"]


# --- SPEED_CRITICAL's continuations (docs/modes.md) --------------------------------------------------------------


def test_continuation_is_a_dependent_waiting_for_that_task_alone(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.enqueue_many([spec("a"), spec("b"), spec("solo", prerequisites=["a"]), spec("both", prerequisites=["a", "b"])])
    assert s.continuation_of("a").id == "solo"  # "both" also waits for b
    assert s.continuation_of("b") is None
    assert s.continuation_of("solo") is None  # no dependents


def test_claim_reserved_claims_under_the_reserved_token_once_ready(tmp_path: Path) -> None:
    s = make(tmp_path)
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"])])
    (a,) = s.claim_records("impl", "router", 1)
    token = s.reserve_fence()
    assert token > a.token
    claimed, refused = s.claim_reserved([("b", token)], "router")
    assert not claimed and "not ready" in refused["b"]  # its prerequisite is still running
    s.complete("a", a.token)
    claimed, refused = s.claim_reserved([("b", token)], "router")
    assert [r.id for r in claimed] == ["b"] and not refused
    task = s.get("b")
    assert task.status == "running" and task.fencing_token == token and task.attempts == 1
    s.complete("b", token)  # the agent's result under the reserved token is accepted
    assert s.get("b").status == "completed"
    s.close()
    again = make(tmp_path)  # and the claim is durable like any other
    assert again.get("b").status == "completed" and again.get("b").fencing_token == token


def test_claim_reserved_respects_the_wip_limit(tmp_path: Path) -> None:
    s = make(tmp_path, wip_per_agent_type=1)
    s.enqueue_many([spec("a"), spec("other"), spec("b", prerequisites=["a"])])
    (a,) = s.claim_records("impl", "router", 1)
    token = s.reserve_fence()
    s.complete("a", a.token)
    (other,) = s.claim_records("impl", "router", 1)  # the freed slot went to another task meanwhile
    claimed, refused = s.claim_reserved([("b", token)], "router")
    assert not claimed and "WIP limit" in refused["b"]
    assert s.get("b").status == "ready"  # left for an ordinary claim
