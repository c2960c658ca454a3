"""What a crossing of the Python/C boundary costs, and the Python parked-reader comparison (issue 2).

    python bench/bench_binding.py [--repeat R] [--json FILE]

Part 1, one process: ns per call of cffi calls with 1 and 5 arguments, of raw bt_ring_exchange (5 arguments,
one record each way) and of the Ring methods the per-message path uses.  Part 2, two processes on two CPUs:
round trip of a 64-byte frame when the reader sleeps (ring with spin 0 vs a socketpair), alternated R times
so both see the same machine.  Medians over R runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src", "python"))

from baton import native  # noqa: E402
from baton.native import lib  # noqa: E402

FRAME = b"x" * 64
CALLS = 20_000
ROUND_TRIPS = 3_000


def per_call_ns(body: Callable[[int], None], refill: Callable[[], None] = lambda: None) -> float:
    """ns per call of body(k), which makes k calls; refill() runs untimed between chunks."""
    total, chunk = 0, 1000
    for _ in range(CALLS // chunk):
        refill()
        t0 = time.perf_counter_ns()
        body(chunk)
        total += time.perf_counter_ns() - t0
    return total / CALLS


def call_costs() -> dict[str, float]:
    prod = native.Ring.create(1 << 22, native.PRODUCER)
    cons = native.Ring.attach(prod.fd, native.CONSUMER)
    back_p = native.Ring.create(1 << 22, native.PRODUCER)
    back_c = native.Ring.attach(back_p.fd, native.CONSUMER)
    back_c._batch.max_n = 1  # one record per exchange, as in a ping-pong
    r, rb, lens, buf, fd = cons._r, lib.bt_ring_read_batch, cons._lens, cons._buf, lib.bt_ring_fd
    ex, out_r, in_r, batch = lib.bt_ring_exchange, prod._r, back_c._r, back_c._batch

    def drain() -> None:
        while cons.read_into(0):
            pass

    def refill_back() -> None:
        drain()
        for _ in range(1000):
            back_p.write(FRAME)

    def one_arg(k: int) -> None:
        for _ in range(k):
            fd(r)

    def five_args(k: int) -> None:
        for _ in range(k):
            rb(r, buf, 65536, lens, 256)  # empty ring: the call and nothing else

    def raw_exchange(k: int) -> None:
        for _ in range(k):
            ex(out_r, FRAME, 64, in_r, batch)

    def method_write(k: int) -> None:
        w = prod.write
        for _ in range(k):
            w(FRAME)

    def method_exchange(k: int) -> None:
        x = back_c.exchange
        for _ in range(k):
            x(prod, FRAME)

    out = {
        "cffi call, 1 argument (bt_ring_fd)": per_call_ns(one_arg),
        "cffi call, 5 arguments (empty bt_ring_read_batch)": per_call_ns(five_args),
        "raw bt_ring_exchange, 5 arguments": per_call_ns(raw_exchange, refill_back),
        "Ring.write (method)": per_call_ns(method_write, drain),
        "Ring.exchange (method)": per_call_ns(method_exchange, refill_back),
    }
    for ring in (cons, prod, back_c, back_p):
        ring.close()
    return out


def parked_ring_rt() -> float:
    a = native.Ring.create(1 << 16, native.PRODUCER)
    b = native.Ring.create(1 << 16, native.CONSUMER)
    b.set_spin(0)
    pid = os.fork()
    if pid == 0:  # echo: sleeps on the futex between requests
        os.sched_setaffinity(0, {1})
        inbound, outbound = native.Ring.attach(a.fd, native.CONSUMER), native.Ring.attach(b.fd, native.PRODUCER)
        inbound.set_spin(0)
        try:
            n = inbound.read_into(None)
            while n:
                n = inbound.exchange(outbound, FRAME)
        except native.BatonError:
            pass
        os._exit(0)
    os.sched_setaffinity(0, {0})
    samples = []
    for _ in range(ROUND_TRIPS):
        t0 = time.perf_counter_ns()
        b.exchange(a, FRAME)
        samples.append(time.perf_counter_ns() - t0)
    a.close()
    os.waitpid(pid, 0)
    b.close()
    return statistics.median(samples) / 1000


def socketpair_rt() -> float:
    x, y = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {1})
        x.close()
        while y.recv(4096):
            y.sendall(FRAME)
        os._exit(0)
    y.close()
    os.sched_setaffinity(0, {0})
    samples = []
    for _ in range(ROUND_TRIPS):
        t0 = time.perf_counter_ns()
        x.sendall(FRAME)
        x.recv(4096)
        samples.append(time.perf_counter_ns() - t0)
    x.close()
    os.waitpid(pid, 0)
    return statistics.median(samples) / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not native.AVAILABLE:
        print(native.LOAD_ERROR, file=sys.stderr)
        return 2
    runs = [call_costs() for _ in range(args.repeat)]
    costs = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    parked, sockp = [], []
    for _ in range(args.repeat):
        parked.append(parked_ring_rt())
        sockp.append(socketpair_rt())
    print(f"per call, one process, median of {args.repeat} runs")
    for name, ns in costs.items():
        print(f"  {name:52} {ns:8.0f} ns")
    print(f"\nreader asleep, 64-byte round trip p50, Python, {args.repeat} alternating runs")
    print(f"  ring, spin 0        median {statistics.median(parked):7.1f} us   runs {[round(v, 1) for v in parked]}")
    print(f"  socketpair          median {statistics.median(sockp):7.1f} us   runs {[round(v, 1) for v in sockp]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"call_ns": costs, "parked_ring_us": parked, "socketpair_us": sockp}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
