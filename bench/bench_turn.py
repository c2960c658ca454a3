"""CPU cost of one coordinator turn on the handoff path, without processes or wakeups.

    python bench/bench_turn.py [--tasks 6000] [--runs 3] [--batch] [--mode REDUNDANT]

A Coordinator over the daemon's own store (``daemon._open_scheduler``: exclusive SQLite, synchronous=NORMAL)
and a link that only collects frames.  Two agents (types a and b) say HELLO; a chain of tasks alternating
between the types, each the prerequisite of the next, is enqueued; then, per task, the agent's RESULT is fed
to ``Coordinator._turn`` -- which completes it, releases the dependent, claims it and sends its TASK frame.
Per turn it records the time until the TASK frame was handed to the link ("pre-push": what a handoff waits
for) and until the turn returned ("turn": what the next RESULT may wait for).  Prints medians per run and the
median of those.  ``_turn`` is internal: this measures the coordinator's share of `baton bench handoff`'s
handoff latency, the rest being the wakeups between processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from baton import protocol, wire
from baton.coordinator import Coordinator
from baton.daemon import _open_scheduler
from baton.daemon_config import DaemonConfig
from baton.protocol import MsgType

_T_TASK = int(MsgType.TASK)
_TYPES = ("a", "b")


class CollectingLink:
    """A RouterLink that keeps what the coordinator sends and notes when the first TASK frame left."""

    alive = True

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.first_task_ns = 0

    def send(self, frames: list[bytes]) -> None:
        if not self.first_task_ns and any(f[5] == _T_TASK for f in frames):
            self.first_task_ns = time.perf_counter_ns()
        self.sent.extend(frames)

    def take_tasks(self) -> list[tuple[int, Any]]:
        """The TASK frames sent since the last call, as (dispatch id, decoded payload); forgets the rest."""
        tasks = [(h.correlation_id, msgpack.unpackb(payload))
                 for h, payload, _ in (wire.decode(f) for f in self.sent if f[5] == _T_TASK)]
        self.sent.clear()
        return tasks


def frame(typ: int, src: int, corr: int, body: Any, dst: int = protocol.EP_COORDINATOR) -> bytes:
    payload = msgpack.packb(body)
    hdr = wire.FrameHeader(type=typ, priority=wire.Priority.NORMAL, source=src, destination=dst, correlation_id=corr)
    return wire.encode(hdr, payload)


def batch_run(n: int, wip: int = 64, mode: str = "INTELLIGENT") -> float:
    """Throughput shape: n independent tasks of one type, one agent with credit ``wip``; each turn brings the
    router's DISPATCHED notice for every task pushed and the agent's RESULT for each.  Returns microseconds
    of coordinator work per task (the figure to compare under callgrind: instructions per task)."""
    with tempfile.TemporaryDirectory(prefix="baton-turn-") as tmp:
        cfg = DaemonConfig(state_dir=Path(tmp) / "state", socket_path=Path(tmp) / "b.sock",
                           wip_per_agent_type=wip)
        link = CollectingLink()
        co = Coordinator(_open_scheduler(cfg), link, cfg)
        ep = (1 << 32) | 5
        co._turn([frame(int(MsgType.EP_OPEN), ep, 0, [os.getpid(), os.getuid(), os.getgid()], 0)])
        co._turn([frame(int(MsgType.HELLO), ep, 1, {"v": protocol.PROTOCOL_VERSION, "name": "a", "pid": 1,
                                                     "agent_type": "a", "capabilities": [], "wip": wip})])
        co.set_mode(mode)
        for i in range(0, n, 5000):
            co.scheduler.enqueue_many([{"summary": "noop", "agent_type": "a"} for _ in range(min(5000, n - i))])
        co._pump_now()
        done = 0
        t0 = time.perf_counter_ns()
        while True:
            tasks = link.take_tasks()
            if not tasks:
                break
            flat = [x for corr, _ in tasks for x in (ep, corr)]
            turn = [frame(int(MsgType.DISPATCHED), 0, 0, flat)]
            turn += [frame(int(MsgType.RESULT), ep, corr, {"id": t["id"], "token": t["token"], "ok": True,
                                                           "result": None}) for corr, t in tasks]
            co._turn(turn)
            done += len(tasks)
        elapsed = time.perf_counter_ns() - t0
        co.scheduler.close()
        if done != n:
            raise SystemExit(f"only {done} of {n} tasks went through")
        return elapsed / n / 1000


def one_run(n: int, mode: str = "INTELLIGENT") -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="baton-turn-") as tmp:
        cfg = DaemonConfig(state_dir=Path(tmp) / "state", socket_path=Path(tmp) / "b.sock")
        link = CollectingLink()
        co = Coordinator(_open_scheduler(cfg), link, cfg)
        endpoints = {t: (1 << 32) | (5 + i) for i, t in enumerate(_TYPES)}
        for t, ep in endpoints.items():
            co._turn([frame(int(MsgType.EP_OPEN), ep, 0, [os.getpid(), os.getuid(), os.getgid()], 0)])
            co._turn([frame(int(MsgType.HELLO), ep, 1, {"v": protocol.PROTOCOL_VERSION, "name": t, "pid": 1,
                                                         "agent_type": t, "capabilities": [], "wip": 1})])
        co.set_mode(mode)
        co.scheduler.enqueue_many([
            {"id": f"t{k}", "summary": "step", "agent_type": _TYPES[k % 2], "input": {"k": k},
             "prerequisites": [f"t{k - 1}"] if k else []}
            for k in range(n)
        ])
        co._pump_now()
        pre: list[int] = []
        whole: list[int] = []
        while True:
            tasks = link.take_tasks()
            if not tasks:
                break
            corr, task = tasks[0]
            result = frame(int(MsgType.RESULT), endpoints[task["agent_type"]], corr,
                           {"id": task["id"], "token": task["token"], "ok": True, "result": None})
            link.first_task_ns = 0
            t0 = time.perf_counter_ns()
            co._turn([result])
            whole.append(time.perf_counter_ns() - t0)
            if link.first_task_ns:
                pre.append(link.first_task_ns - t0)
        co.scheduler.close()
        if len(whole) != n:
            raise SystemExit(f"the chain stopped after {len(whole)} of {n} tasks")
        return statistics.median(pre) / 1000, statistics.median(whole) / 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    p.add_argument("--tasks", type=int, default=6000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", action="store_true", help="the throughput shape instead of the handoff chain")
    p.add_argument("--mode", default="INTELLIGENT", help="the coordinator's execution mode (REDUNDANT: its shadow "
                                                         "checks every dispatch; SPEED_CRITICAL: continuations)")
    a = p.parse_args()
    if a.batch:
        per_task = [batch_run(a.tasks, mode=a.mode) for _ in range(a.runs)]
        print(f"batch: {', '.join(f'{x:.2f}' for x in per_task)} us per task; median "
              f"{statistics.median(per_task):.2f}")
        return 0
    runs = [one_run(a.tasks, a.mode) for _ in range(a.runs)]
    for i, (pre, whole) in enumerate(runs):
        print(f"run {i + 1}: pre-push p50 {pre:6.1f} us   turn p50 {whole:6.1f} us")
    print(f"median of {a.runs}: pre-push {statistics.median(r[0] for r in runs):.1f} us, "
          f"turn {statistics.median(r[1] for r in runs):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
