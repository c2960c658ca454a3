"""Property tests over random DAGs and random operation sequences."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from baton.models import TERMINAL, Status
from baton.planner import build_plan
from baton.scheduler import Scheduler, SchedulerConfig
from baton.scheduler_errors import (
    DependencyCycle,
    InvalidTransition,
    StaleLease,
)
from scheduler_fixtures import ManualClock


@st.composite
def dags(draw, max_n=40):
    n = draw(st.integers(0, max_n))
    ids = [f"t{i}" for i in range(n)]
    prereqs = {}
    for i in range(n):
        if i:
            prereqs[ids[i]] = sorted(set(draw(st.lists(st.sampled_from(ids[:i]), max_size=4))))
    est = {t: draw(st.floats(0.1, 100)) for t in ids}
    perm = draw(st.permutations(ids))
    return {t: est[t] for t in perm}, prereqs


@settings(max_examples=150, deadline=None)
@given(dag=dags(), wip=st.one_of(st.none(), st.integers(1, 6)))
def test_plan_is_valid_topological_order(dag, wip):
    est, prereqs = dag
    p = build_plan(est, prereqs, wip_limit=wip)
    seen: dict[str, int] = {}
    for k, batch in enumerate(p.batches):
        assert batch, "empty batch"
        for t in batch:
            assert t not in seen
            seen[t] = k
    assert set(seen) == set(est)
    for t, ps in prereqs.items():
        for q in ps:
            assert seen[q] < seen[t]
    assert p.total_batches == len(p.batches)
    assert p.max_parallelism == max((len(b) for b in p.batches), default=0)
    # Critical path: a real chain, and nothing finishes later.
    cp = p.critical_path
    for a, b in zip(cp, cp[1:]):
        assert a in prereqs.get(b, [])
    assert abs(sum(est[t] for t in cp) - p.critical_path_s) < 1e-6
    total = sum(est.values())
    assert p.estimated_makespan_s >= p.critical_path_s - 1e-6
    if wip is not None:
        assert p.estimated_makespan_s >= total / wip - 1e-6
        assert p.estimated_makespan_s <= total + 1e-6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=dags(max_n=25), seed=st.integers(0, 2**32 - 1))
def test_random_dag_dispatch_respects_prerequisites(dag, seed):
    est, prereqs = dag
    rng = random.Random(seed)
    sch = Scheduler(":memory:", config=SchedulerConfig(wip_per_agent_type=None), clock=ManualClock())
    sch.enqueue_many([{"id": t, "summary": t, "agent_type": "x", "prerequisites": prereqs.get(t, []),
                       "base_priority": rng.randint(0, 10)} for t in est])
    done: set[str] = set()
    while len(done) < len(est):
        claims = sch.claim_many("x", "w", rng.randint(1, 4))
        assert claims, "ready work must exist while tasks remain"
        for c in claims:
            assert set(prereqs.get(c.task_id, [])) <= done
        rng.shuffle(claims)
        for c in claims:
            sch.complete(c.task_id, c.fencing_token)
            done.add(c.task_id)
    sch.close()


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of every operation; the invariants are the user-facing rules."""

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.clock = ManualClock()
        self.sch = Scheduler(
            ":memory:",
            config=SchedulerConfig(wip_per_agent_type=2, backoff_base_s=1, backoff_cap_s=4, lease_s=10),
            clock=self.clock,
            rng=random.Random(seed),
        )
        self.n = 0
        self.terminal: dict[str, Status] = {}
        self.claims: list[tuple[str, int]] = []  # (task, token) handed out, possibly stale by now
        self.live: dict[str, tuple[int, float]] = {}  # task -> (token, lease expiry) of the latest claim
        self.last_token = 0

    def ids(self):
        return [f"t{i}" for i in range(self.n)]

    @rule(data=st.data(), k=st.integers(1, 4))
    def enqueue(self, data, k):
        existing = self.ids()
        batch = []
        for j in range(k):
            tid = f"t{self.n + j}"
            pool = existing + [f"t{self.n + i}" for i in range(j)]
            pre = data.draw(st.lists(st.sampled_from(pool), max_size=3, unique=True)) if pool else []
            batch.append({
                "id": tid, "summary": tid, "agent_type": data.draw(st.sampled_from(["a", "b"])),
                "prerequisites": pre, "max_attempts": data.draw(st.integers(1, 3)),
                "base_priority": data.draw(st.integers(0, 10)),
                "on_prerequisite_failure": data.draw(st.sampled_from([None, "cancel", "block", "proceed"])),
            })
        self.sch.enqueue_many(batch)
        self.n += k

    @rule(agent=st.sampled_from(["a", "b"]), k=st.integers(1, 3))
    def claim(self, agent, k):
        for c in self.sch.claim_many(agent, "w", k):
            assert c.fencing_token > self.last_token
            prev = self.live.get(c.task_id)
            # No double claim: the previous claim of this task must have ended or its lease expired.
            assert prev is None or prev[1] <= self.clock.now, (c.task_id, prev, self.clock.now)
            self.live[c.task_id] = (c.fencing_token, c.lease_expires_at)
            self.claims.append((c.task_id, c.fencing_token))
        if self.claims:
            self.last_token = max(self.last_token, max(t for _, t in self.claims))

    def _end(self, tid):
        self.live.pop(tid, None)

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def complete(self, data):
        tid, tok = data.draw(st.sampled_from(self.claims))
        try:
            self.sch.complete(tid, tok, {"by": tok})
            self._end(tid)
        except (StaleLease, InvalidTransition):
            pass

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), transient=st.booleans())
    def fail(self, data, transient):
        tid, tok = data.draw(st.sampled_from(self.claims))
        try:
            self.sch.fail(tid, tok, "err", transient=transient)
            self._end(tid)
        except (StaleLease, InvalidTransition):
            pass

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def heartbeat(self, data):
        tid, tok = data.draw(st.sampled_from(self.claims))
        try:
            exp = self.sch.heartbeat(tid, tok)
            self.live[tid] = (tok, exp)
        except (StaleLease, InvalidTransition):
            pass

    @precondition(lambda self: self.n)
    @rule(data=st.data(), cascade=st.booleans(), dry=st.booleans())
    def cancel(self, data, cascade, dry):
        tid = data.draw(st.sampled_from(self.ids()))
        before = self.sch.status_of(tid)
        res = self.sch.cancel(tid, cascade=cascade, dry_run=dry)
        assert res.total_cancelled == (0 if before in TERMINAL else 1 + len(res.cascaded_task_ids))
        if not dry:
            for t in [tid, *res.cascaded_task_ids]:
                self._end(t)

    @precondition(lambda self: self.n > 1)
    @rule(data=st.data())
    def add_prereq(self, data):
        a = data.draw(st.sampled_from(self.ids()))
        b = data.draw(st.sampled_from(self.ids()))
        try:
            self.sch.add_prerequisite(a, b)
        except (DependencyCycle, InvalidTransition):
            pass

    @rule(dt=st.sampled_from([0.5, 3, 11, 30]))
    def tick(self, dt):
        self.clock.advance(dt)

    @rule()
    def requeue(self):
        dl = self.sch.dead_letters(limit=1)
        if dl:
            self.sch.requeue_dead_letter(dl[0].id)
            self.n_requeued = getattr(self, "n_requeued", 0) + 1

    @invariant()
    def terminal_never_changes(self):
        if not hasattr(self, "sch"):
            return
        for t in self.sch.tasks():
            if t.id in self.terminal:
                assert t.status is self.terminal[t.id], (t.id, self.terminal[t.id], t.status)
            elif t.status in TERMINAL:
                self.terminal[t.id] = t.status

    @invariant()
    def every_waiting_task_has_a_reason_and_states_are_consistent(self):
        if not hasattr(self, "sch"):
            return
        reasons = self.sch.waiting_reasons()
        tasks = {t.id: t for t in self.sch.tasks()}
        running = {}
        for t in tasks.values():
            if t.status in TERMINAL:
                assert t.id not in reasons and t.lease_holder is None
            elif t.status is Status.RUNNING:
                assert t.lease_holder and t.lease_expires_at is not None
                running[t.agent_type] = running.get(t.agent_type, 0) + 1
            else:
                assert reasons.get(t.id), t.id
            pre = [tasks[p] for p in self.sch.prerequisites_of(t.id)]
            if t.status is Status.READY:
                assert all(p.status is Status.COMPLETED or (p.status in TERMINAL and t.on_prerequisite_failure
                           and t.on_prerequisite_failure.value == "proceed") for p in pre), t.id
            if t.status is Status.PENDING:
                assert any(p.status not in TERMINAL for p in pre), t.id
            if t.status is Status.BLOCKED:
                assert any(p.status in TERMINAL and p.status is not Status.COMPLETED for p in pre), t.id
        assert all(v <= 2 for v in running.values())

    @invariant()
    def plan_of_live_tasks_is_valid(self):
        if not hasattr(self, "sch"):
            return
        live = [t.id for t in self.sch.tasks() if t.status not in TERMINAL]
        p = self.sch.plan(live)
        pos = {t: k for k, b in enumerate(p.batches) for t in b}
        assert all(p.batches) and set(pos) == set(live)
        for t in live:
            for q in self.sch.prerequisites_of(t):
                if q in pos:
                    assert pos[q] < pos[t]

    def teardown(self):
        if hasattr(self, "sch"):
            self.sch.close()


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
