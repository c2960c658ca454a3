#!/usr/bin/env python3
"""Reference measurements behind the scheduler's storage design and hot path (bench/RESULTS.md, issue 3).

    python bench/sched_floor.py sql                   # the SQL floor of the first design (v3 tables)
    python bench/sched_floor.py callgrind [N]         # instructions per task, per step, under callgrind
    python bench/sched_floor.py pack                  # packing one record image: msgpack vs ormsgpack
    python bench/sched_floor.py workload N [STAGE] [--no-gc]   # the workload callgrind runs

``sql``: only the three statements the SQL-per-transition store ran per task (executemany insert, the claim
``UPDATE ... RETURNING``, the completion update; one commit per 1000), no scheduler code: what that design
could never go below.  ``callgrind``: runs ``workload`` under ``valgrind --tool=callgrind`` for every stage
(nothing, validation only, enqueue, + claim, + complete) with N tasks (default 5000) and once more without
the cyclic GC, and prints the differences divided by N: the instructions each step costs per task (counts
are immune to a noisy host).  Stages are cumulative except that ``enqueue`` does not run the separate
validation (enqueue_many validates itself), so "enqueue" below is enqueue minus its validation.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src" / "python"))

import msgpack  # noqa: E402

from baton.models import parse_specs  # noqa: E402
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


STAGES = ("none", "validate", "enqueue", "claim", "complete")


def workload(n: int, stage: str = "complete") -> None:
    upto = STAGES.index(stage)
    with tempfile.TemporaryDirectory() as d:
        sch = Scheduler(TaskStore(Path(d) / "w.db", synchronous="NORMAL"),
                        config=SchedulerConfig(wip_per_agent_type=None))
        specs = [{"summary": "bench task", "agent_type": "x", "input": {"i": i}} for i in range(n)]
        for off in range(0, n, B):
            part = specs[off: off + B]
            if upto == 1:
                parse_specs(part)
            if upto >= 2:
                sch.enqueue_many(part)
            if upto >= 3:
                claims = sch.claim_many("x", "w", B)
            if upto >= 4:
                sch.complete_many([(c.task_id, c.fencing_token, {"ok": True}) for c in claims])
        sch.close()


def _instructions(n: int, stage: str, gc_on: bool = True) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
               "workload", str(n), stage] + ([] if gc_on else ["--no-gc"])
        subprocess.run(cmd, check=True, capture_output=True)
        for line in out.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def callgrind(n: int) -> None:
    runs = [(stage, True) for stage in STAGES] + [("none", False), ("complete", False)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(runs, pool.map(lambda r: _instructions(n, *r), runs)))
    base = counts[("none", True)]
    steps = {
        "validation (parse_specs)": counts[("validate", True)] - base,
        "enqueue (without its validation)": counts[("enqueue", True)] - counts[("validate", True)],
        "claim": counts[("claim", True)] - counts[("enqueue", True)],
        "complete": counts[("complete", True)] - counts[("claim", True)],
    }
    total = counts[("complete", True)] - base
    no_gc = counts[("complete", False)] - counts[("none", False)]
    print(f"instructions per task, {n} tasks, batches of {B} (python {sys.version.split()[0]}):")
    for name, v in steps.items():
        print(f"  {name:34} {v / n:10,.0f}")
    print(f"  {'total':34} {total / n:10,.0f}")
    print(f"  {'total with the cyclic GC disabled':34} {no_gc / n:10,.0f}   (GC: {(total - no_gc) / n:,.0f})")


def pack() -> None:
    """One 36-field record image, packed as the scheduler journals it: msgpack's Packer vs ormsgpack."""
    import ormsgpack

    img = (5, "0194abcdef12abcdef1234567890abcdef12", "ready", "x", "human", 5, "Medium", "block", None, 0.0, 0, 0,
           0, 3, None, None, 1.7e9, 1.7e9, 1.7e9, None, None, 0.0, None, None, 0, None,
           msgpack.packb({"summary": "bench task", "agent_type": "x"}), b"\x02\x81\xa1i\x01", None, None, (), (),
           None, None, None, ())
    packer = msgpack.Packer(use_bin_type=True).pack
    assert packer(img) == ormsgpack.packb(img)
    for name, fn in (("msgpack Packer.pack", packer), ("ormsgpack.packb", ormsgpack.packb)):
        best = min(timeit.repeat(lambda: fn(img), number=100_000, repeat=7)) / 100_000
        print(f"  {name:22} {best * 1e9:6.0f} ns per image (best of 7 x 100k)")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["workload"]:
        if "--no-gc" in args:
            gc.disable()
        rest = [a for a in args[1:] if a != "--no-gc"]
        workload(int(rest[0]), *rest[1:2])
        return
    if args[:1] == ["callgrind"]:
        callgrind(int(args[1]) if len(args) > 1 else 5000)
        return
    if args[:1] == ["pack"]:
        pack()
        return
    with tempfile.TemporaryDirectory() as d:
        for k in range(3):
            i, c, k2 = sql_floor(str(Path(d) / f"floor{k}.db"))
            print(f"v3 SQL only: insert {i:.1f} + claim {c:.1f} + complete {k2:.1f} = {i + c + k2:.1f} us/task")


if __name__ == "__main__":
    main()
