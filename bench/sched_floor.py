#!/usr/bin/env python3
"""Two reference measurements behind the scheduler's storage design (bench/RESULTS.md, issue 3).

    python bench/sched_floor.py sql            # the SQL floor of the first design (v3 tables)
    python bench/sched_floor.py workload N     # N tasks through enqueue+claim+complete (for callgrind)

``sql``: only the three statements the SQL-per-transition store ran per task (executemany insert, the claim
``UPDATE ... RETURNING``, the completion update; one commit per 1000), no scheduler code: what that design
could never go below.  ``workload``: run it under ``valgrind --tool=callgrind`` with N and with 0 and divide
the difference of the instruction counts by N (the python binary itself, not a shim, must be the target).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src" / "python"))

import msgpack  # noqa: E402

from baton.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from baton.store import TaskStore  # noqa: E402

N, B = 20_000, 1000


def sql_floor(path: str) -> tuple[float, float, float]:
    st = TaskStore(path, synchronous="NORMAL", migrate_to=3)  # the v3 tables of the first design
    c = st.conn
    spec = msgpack.packb({"summary": "bench task", "agent_type": "x"})
    cols = ("id", "status", "agent_type", "source", "base_priority", "risk", "policy", "deadline_sort",
            "estimate", "static_score", "rank", "unmet", "max_attempts", "created_at", "updated_at", "ready_at",
            "spec", "input")
    ins = f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    ti = tc = tk = 0.0
    for off in range(0, N, B):
        now = time.time()
        rows = [(f"id{off + i}", "ready", "x", "human", 5, "Medium", "block", 1e18, 0.0, 5.0, 5.0, 0, 3, now, now,
                 now, spec, b"\x02\x81\xa1i\x01") for i in range(B)]
        a = time.perf_counter()
        with st.write():
            c.executemany(ins, rows)
        b = time.perf_counter()
        with st.write():
            got = c.execute(
                "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_holder = 'w',"
                " lease_expires_at = :now + 30, fencing_token = 1, started_at = :now, updated_at = :now"
                " WHERE seq IN (SELECT seq FROM tasks WHERE status = 'ready' AND agent_type = 'x'"
                " AND not_before <= :now ORDER BY rank DESC, deadline_sort, seq LIMIT 1000) RETURNING seq",
                {"now": now}).fetchall()
        d = time.perf_counter()
        with st.write():
            c.executemany("UPDATE tasks SET status = 'completed', result = ?1, finished_at = ?2, updated_at = ?2,"
                          " lease_holder = NULL, lease_expires_at = NULL WHERE seq = ?3",
                          [(b"\x02\xc3", now, r[0]) for r in got])
        e = time.perf_counter()
        ti, tc, tk = ti + b - a, tc + d - b, tk + e - d
    st.close()
    return ti / N * 1e6, tc / N * 1e6, tk / N * 1e6


def workload(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        sch = Scheduler(TaskStore(Path(d) / "w.db", synchronous="NORMAL"),
                        config=SchedulerConfig(wip_per_agent_type=None))
        specs = [{"summary": "bench task", "agent_type": "x", "input": {"i": i}} for i in range(n)]
        for off in range(0, n, B):
            sch.enqueue_many(specs[off: off + B])
            claims = sch.claim_many("x", "w", B)
            sch.complete_many([(c.task_id, c.fencing_token, {"ok": True}) for c in claims])
        sch.close()


def main() -> None:
    if sys.argv[1:2] == ["workload"]:
        workload(int(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory() as d:
        for k in range(3):
            i, c, k2 = sql_floor(str(Path(d) / f"floor{k}.db"))
            print(f"v3 SQL only: insert {i:.1f} + claim {c:.1f} + complete {k2:.1f} = {i + c + k2:.1f} us/task")


if __name__ == "__main__":
    main()
