"""Real processes on real SQLite files: SIGKILL mid-transitions, and concurrent claimers."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time

import pytest

from baton.models import TERMINAL, Status
from baton.scheduler import Scheduler, SchedulerConfig
from conftest import child_env
from conftest import wait_for as poll
from scheduler_fixtures import PYTHON

CHURN = textwrap.dedent(
    """
    import sys
    from baton.scheduler import Scheduler, SchedulerConfig
    sch = Scheduler(sys.argv[1], config=SchedulerConfig(wip_per_agent_type=None, backoff_base_s=0.0001,
                                                        backoff_cap_s=0.0001))
    i = 0
    out = sys.stdout
    while True:
        ids = [f"c{i}-{k}" for k in range(4)]
        # a chain plus a side task, so completions release dependents
        sch.enqueue_many([
            {"id": ids[0], "summary": "s", "agent_type": "x", "input": {"i": i}},
            {"id": ids[1], "summary": "s", "agent_type": "x", "prerequisites": [ids[0]]},
            {"id": ids[2], "summary": "s", "agent_type": "x", "prerequisites": [ids[1]]},
            {"id": ids[3], "summary": "s", "agent_type": "x"},
        ])
        out.write("enq " + " ".join(ids) + "\\n"); out.flush()
        claims = sch.claim_many("x", "churn", 8)
        done = [c for c in claims if not c.task_id.endswith("-3")]
        res = sch.complete_many([(c.task_id, c.fencing_token, {"r": c.task_id}) for c in done])
        out.write("done " + " ".join(res.applied) + "\\n"); out.flush()
        for c in claims:
            if c.task_id.endswith("-3"):
                if i % 3 == 0:
                    sch.fail(c.task_id, c.fencing_token, "boom", transient=False)
                    out.write("dead " + c.task_id + "\\n"); out.flush()
                else:
                    sch.cancel(c.task_id)
                    out.write("cancel " + c.task_id + "\\n"); out.flush()
        i += 1
    """
)


def _check_consistent(sch: Scheduler) -> None:
    tasks = {t.id: t for t in sch.tasks()}
    for t in tasks.values():
        pre = sch.prerequisites_of(t.id)
        unmet = sum(1 for p in pre if tasks[p].status is not Status.COMPLETED)
        if t.status in (Status.PENDING, Status.READY):
            stored = sch.record(t.id).unmet
            assert stored == unmet, (t.id, stored, unmet)
            assert (t.status is Status.READY) == (unmet == 0), t.id
        if t.status is Status.RUNNING:
            assert t.lease_holder == "churn" and t.fencing_token > 0
        if t.status in TERMINAL:
            assert t.finished_at is not None and t.lease_holder is None


@pytest.mark.parametrize("acks", [5, 40, 120])
def test_sigkill_mid_transitions_leaves_store_intact(tmp_path, acks):
    db = tmp_path / "crash.db"
    Scheduler(db).close()  # schema exists before the child starts
    proc = subprocess.Popen([PYTHON, "-c", CHURN, str(db)], stdout=subprocess.PIPE, text=True, env=child_env())
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        poll(lambda: len(lines) >= acks or proc.poll() is not None, timeout=60, what=f"{acks} acks")
        assert proc.poll() is None, "child died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    th.join(10)
    assert proc.returncode == -signal.SIGKILL
    acked = list(lines)  # everything the child reported before it died was committed
    sch = Scheduler(db, config=SchedulerConfig(wip_per_agent_type=None))
    assert sch.store.integrity_check() == "ok"
    for kind, *ids in acked:
        for tid in ids:
            t = sch.get(tid)
            if kind == "done":
                assert t.status is Status.COMPLETED and t.result == {"r": tid}
            elif kind == "dead":
                assert t.status is Status.DEAD_LETTERED
            elif kind == "cancel":
                assert t.status is Status.CANCELLED
    _check_consistent(sch)
    # The store keeps working: expire the dead child's leases, then drain everything.
    later = time.time() + 10 * 3600.0  # past every lease the child took
    sch.clock = lambda: later
    sch.expire_leases()
    while True:
        cs = sch.claim_many("x", "after", 50)
        if not cs:
            break
        sch.complete_many([(c.task_id, c.fencing_token, None) for c in cs])
    left = [t.id for t in sch.tasks() if t.status not in TERMINAL and t.status is not Status.BLOCKED]
    assert left == []
    sch.close()


CLAIMER = textwrap.dedent(
    """
    import os, sys, time
    from baton.scheduler import Scheduler, SchedulerConfig
    sch = Scheduler(sys.argv[1], config=SchedulerConfig(wip_per_agent_type=None))
    total = int(sys.argv[2])
    # Start line: report ready, then wait for the parent's go, so every process competes from the start.
    open(sys.argv[1] + ".ready-" + sys.argv[3], "w").close()
    while not os.path.exists(sys.argv[1] + ".go"):
        time.sleep(0.001)
    got = []
    # A quota below the total guarantees several processes take part even when the OS lets one process win
    # the write lock over and over (2 shared cores); 4 quotas exceed the total, so nothing is left behind.
    quota = total // 4 + 10
    while len(got) < quota:
        cs = sch.claim_many("x", sys.argv[3], 2)
        if not cs:
            if sch.count("completed") == total:
                break
            continue
        got.extend(c.task_id for c in cs)
        sch.complete_many([(c.task_id, c.fencing_token, sys.argv[3]) for c in cs])
    print(" ".join(got))
    """
)


def test_concurrent_claimers_in_separate_processes(tmp_path):
    db = tmp_path / "claims.db"
    sch = Scheduler(db, config=SchedulerConfig(wip_per_agent_type=None))
    n = 300
    # Fan-out layers so that completions by one process release work for the others.
    specs = []
    for i in range(n):
        pre = [f"t{i - 50}"] if i >= 50 else []
        specs.append({"id": f"t{i}", "summary": "s", "agent_type": "x", "prerequisites": pre})
    sch.enqueue_many(specs)
    procs = [
        subprocess.Popen([PYTHON, "-c", CLAIMER, str(db), str(n), f"p{k}"], stdout=subprocess.PIPE,
                         text=True, env=child_env())
        for k in range(4)
    ]
    poll(lambda: all(os.path.exists(f"{db}.ready-p{k}") for k in range(4)) or any(p.poll() is not None for p in procs),
         timeout=60, what="claimers to start")
    open(f"{db}.go", "w").close()
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=90)
        assert p.returncode == 0
        outs.append(out.split())
    flat = [t for o in outs for t in o]
    assert len(flat) == len(set(flat)) == n, "a task was claimed twice or lost"
    assert sum(1 for o in outs if o) >= 2, "expected several processes to take part"
    assert {t.status for t in sch.tasks()} == {Status.COMPLETED}
    results = {t.id: t.result for t in sch.tasks()}
    for k, o in enumerate(outs):
        for t in o:
            assert results[t] == f"p{k}"  # the claimer that completed it is the one that claimed it
    sch.close()
