"""What the machine charges below baton: waking a parked process, and a SQLite write transaction.

    python bench/bench_floors.py [--n 5000]

- socketpair ping-pong between two Python processes (each blocks in recv): round trip p50/p99, once on
  whatever CPUs the scheduler picks and once with both pinned to CPU 0 (a same-CPU switch, no cross-CPU wake);
- eventfd write that wakes a process blocked in read: what the *writer* pays (p50), against a write with no
  sleeper;
- one write transaction as the store runs it (BEGIN IMMEDIATE, PRAGMA data_version, INSERT ... RETURNING,
  COMMIT; WAL, synchronous=NORMAL), with SQLite's normal and exclusive locking modes: p50 per step.
bench/RESULTS.md quotes these as the floor under the handoff latency (issue 4) and the cost the exclusive store
saves.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import tempfile
import time


def pingpong(n: int, cpu: int | None) -> tuple[float, float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        a.close()
        for _ in range(n):
            b.send(b.recv(64))
        os._exit(0)
    b.close()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ts = []
    for _ in range(n):
        t = time.perf_counter_ns()
        a.send(b"x" * 32)
        a.recv(64)
        ts.append(time.perf_counter_ns() - t)
    os.waitpid(pid, 0)
    if cpu is not None:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    ts.sort()
    return ts[n // 2] / 1000, ts[int(n * 0.99)] / 1000


def eventfd_wake(n: int) -> tuple[float, float]:
    efd, back = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:
        for _ in range(n):
            os.eventfd_read(efd)
            os.eventfd_write(back, 1)
        os._exit(0)
    woke = []
    for _ in range(n):
        time.sleep(0.0002)  # let the reader block in read() again: the point is to measure waking a sleeper
        t = time.perf_counter_ns()
        os.eventfd_write(efd, 1)
        woke.append(time.perf_counter_ns() - t)
        os.eventfd_read(back)
    os.waitpid(pid, 0)
    idle = []
    for _ in range(n):
        t = time.perf_counter_ns()
        os.eventfd_write(back, 1)
        idle.append(time.perf_counter_ns() - t)
    return statistics.median(woke) / 1000, statistics.median(idle) / 1000


def sqlite_txn(n: int, exclusive: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        c = sqlite3.connect(f"{d}/x.db", isolation_level=None)
        if exclusive:
            c.execute("PRAGMA locking_mode = EXCLUSIVE")
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry BLOB NOT NULL)")
        steps: dict[str, list[int]] = {"begin": [], "data_version": [], "insert": [], "commit": []}
        blob = os.urandom(300)
        for _ in range(n):
            t0 = time.perf_counter_ns()
            c.execute("BEGIN IMMEDIATE")
            t1 = time.perf_counter_ns()
            c.execute("PRAGMA data_version").fetchone()
            t2 = time.perf_counter_ns()
            c.execute("INSERT INTO journal (entry) VALUES (?) RETURNING seq", (blob,)).fetchone()
            t3 = time.perf_counter_ns()
            c.execute("COMMIT")
            t4 = time.perf_counter_ns()
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[k].append(v)
        c.close()
        return {k: statistics.median(v) / 1000 for k, v in steps.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    p.add_argument("--n", type=int, default=5000)
    a = p.parse_args()
    p50, p99 = pingpong(a.n * 4, None)
    print(f"socketpair ping-pong, two processes:      rt p50 {p50:6.1f} us  p99 {p99:6.1f} us")
    p50, p99 = pingpong(a.n * 4, 0)
    print(f"socketpair ping-pong, both on CPU 0:      rt p50 {p50:6.1f} us  p99 {p99:6.1f} us")
    woke, idle = eventfd_wake(a.n)
    print(f"eventfd write waking a sleeper (writer):  p50 {woke:6.2f} us  (no sleeper: {idle:.2f} us)")
    for exclusive in (False, True):
        s = sqlite_txn(a.n, exclusive)
        print(f"sqlite txn, {'exclusive' if exclusive else 'normal   '} locking:           "
              + "  ".join(f"{k} {v:5.1f}" for k, v in s.items()) + f"  total {sum(s.values()):5.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
