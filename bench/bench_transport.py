"""Python-side transport benchmarks (issue 2): baton rings through the binding against the alternatives a
Python programmer would reach for, all in the same run.

    python bench/bench_transport.py [--round-trips N] [--repeat R] [--json FILE]

Round trips: 64-byte frames ping-ponged between two processes pinned to different CPUs (both spinning unless
"parked").  "exchange" is bt_ring_exchange: the reply and the wait for the next message in one native call on
each side; "write+read" is the same with two calls.  Throughput: one-way 64-byte frames, unbatched (one call per frame) and batched (one call per 256
frames).  Each figure is the median over --repeat runs; percentiles are from the run with the median p50.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src", "python"))

from baton import native  # noqa: E402

FRAME = native.frame_encode(1, 0, 0, 1, 2, 0, 0, b"x" * 16) if native.AVAILABLE else b"x" * 64
assert len(FRAME) == 64
BATCH = 256


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


def percentiles(samples: list[int]) -> dict[str, float]:
    s = sorted(samples)
    n = len(s)
    return {
        "p50_us": s[n // 2] / 1000,
        "p99_us": s[min(n - 1, int(n * 0.99))] / 1000,
        "p999_us": s[min(n - 1, int(n * 0.999))] / 1000,
    }


def timed_round_trips(n: int, send: Callable[[], None], recv: Callable[[], None]) -> list[int]:
    clock = time.perf_counter_ns
    for _ in range(min(n // 10, 2000)):  # warm-up
        send()
        recv()
    out = [0] * n
    for i in range(n):
        t0 = clock()
        send()
        recv()
        out[i] = clock() - t0
    return out


# --- echo peers (run in a child process) -------------------------------------------------------------------


def ring_echo(fd_in: int, fd_out: int, spin_ns: int, exchange: bool, ready: Any) -> None:
    """Answer every 64-byte request with a 64-byte reply.  With exchange, sending the reply and waiting for
    the next request are one native call, as an agent reporting a result and waiting for its next task."""
    pin(1)
    inbound = native.Ring.attach(fd_in, native.CONSUMER)
    outbound = native.Ring.attach(fd_out, native.PRODUCER)
    inbound.set_spin(spin_ns)
    ready.set()
    read, write, swap = inbound.read_into, outbound.write, inbound.exchange
    try:
        n = read(None)
        while True:
            for _ in range(n - 1):  # ping-pong never batches, but a reply per request whatever happens
                write(FRAME)
            if exchange:
                n = swap(outbound, FRAME)
            else:
                write(FRAME)
                n = read(None)
    except native.BatonError:
        pass


def pipe_echo(conn: Any) -> None:
    pin(1)
    while True:
        data = conn.recv_bytes()
        if not data:
            return
        conn.send_bytes(data)


def sock_echo(fd: int) -> None:
    pin(1)
    s = socket.socket(fileno=fd)
    while True:
        data = s.recv(4096)
        if not data:
            return
        s.sendall(data)


def zmq_echo(addr: str) -> None:
    import zmq

    pin(1)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(addr)
    while True:
        data = s.recv()
        if data == b"":
            break
        s.send(data)
    s.close(linger=0)
    ctx.term()


# --- round-trip benchmarks ---------------------------------------------------------------------------------


def rt_ring(n: int, spin_ns: int = 50_000, exchange: bool = True) -> list[int]:
    """Round trips through two rings; exchange=False pays two native calls per side instead of one."""
    to_child = native.Ring.create(1 << 16, native.PRODUCER)
    from_child = native.Ring.create(1 << 16, native.CONSUMER)
    from_child.set_spin(spin_ns)
    ready = mp.Event()
    proc = mp.Process(target=ring_echo, args=(to_child.fd, from_child.fd, spin_ns, exchange, ready))
    proc.start()
    ready.wait(30)
    write, read, swap = to_child.write, from_child.read_into, from_child.exchange

    def recv() -> None:
        while not read(None):
            pass

    try:
        if not exchange:
            return timed_round_trips(n, lambda: write(FRAME), recv)
        # The loop is written out so that the harness adds only the two clock reads to each sample.
        clock = time.perf_counter_ns
        for _ in range(min(n // 10, 2000)):
            swap(to_child, FRAME)
        out = [0] * n
        for i in range(n):
            t0 = clock()
            swap(to_child, FRAME)
            out[i] = clock() - t0
        return out
    finally:
        to_child.close()
        proc.join(30)
        from_child.close()


def rt_pipe(n: int) -> list[int]:
    a, b = mp.Pipe()
    proc = mp.Process(target=pipe_echo, args=(b,))
    proc.start()
    try:
        return timed_round_trips(n, lambda: a.send_bytes(FRAME), a.recv_bytes)  # type: ignore[arg-type]
    finally:
        a.send_bytes(b"")
        proc.join(30)


def rt_socketpair(n: int) -> list[int]:
    a, b = socket.socketpair()
    proc = mp.Process(target=sock_echo, args=(b.fileno(),))
    proc.start()
    b.close()

    def recv() -> None:
        got = 0
        while got < 64:
            got += len(a.recv(4096))

    try:
        return timed_round_trips(n, lambda: a.sendall(FRAME), recv)
    finally:
        a.close()
        proc.join(30)


def rt_zmq(n: int) -> list[int] | None:
    try:
        import zmq
    except ImportError:
        return None
    addr = f"ipc:///tmp/bt-bench-{os.getpid()}.ipc"
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.bind(addr)
    proc = mp.Process(target=zmq_echo, args=(addr,))
    proc.start()
    try:
        return timed_round_trips(n, lambda: s.send(FRAME), s.recv)  # type: ignore[arg-type]
    finally:
        s.send(b"")
        proc.join(30)
        s.close(linger=0)
        ctx.term()


# --- throughput --------------------------------------------------------------------------------------------


def ring_sink(fd: int, total: int, result: Any) -> None:
    pin(1)
    ring = native.Ring.attach(fd, native.CONSUMER)
    read = ring.read_into
    got = 0
    t0 = 0
    while got < total:
        n = read(None)
        if n and not t0:
            t0 = time.perf_counter_ns()
        got += n
    result.value = time.perf_counter_ns() - t0
    ring.close()


def tp_ring(total: int, batched: bool) -> float:
    """Frames per second, one way, measured at the consumer from its first frame to its last."""
    ring = native.Ring.create(1 << 20, native.PRODUCER)
    result = mp.Value("q", 0)
    proc = mp.Process(target=ring_sink, args=(ring.fd, total, result))
    proc.start()
    pin(0)
    sent = 0
    if batched:
        packed = FRAME * BATCH
        lens = native.ffi.new("uint32_t[]", [64] * BATCH)
        write_packed = ring.write_packed
        while sent < total:
            try:
                sent += write_packed(packed, lens, min(BATCH, total - sent))
            except BlockingIOError:
                pass
    else:
        write = ring.write
        while sent < total:
            try:
                write(FRAME)
                sent += 1
            except BlockingIOError:
                pass
    proc.join(120)
    ring.close()
    return total / (result.value / 1e9)


# --- driver ------------------------------------------------------------------------------------------------


def median_run(fn: Callable[[], list[int] | None], repeat: int) -> dict[str, float] | None:
    runs = []
    for _ in range(repeat):
        samples = fn()
        if samples is None:
            return None
        runs.append(percentiles(samples))
    runs.sort(key=lambda r: r["p50_us"])
    mid = dict(runs[len(runs) // 2])
    mid["p50_us_runs"] = [r["p50_us"] for r in runs]  # type: ignore[assignment]
    return mid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=50_000)
    ap.add_argument("--frames", type=int, default=5_000_000, help="frames per throughput run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if not native.AVAILABLE:
        print(native.LOAD_ERROR, file=sys.stderr)
        return 2
    mp.set_start_method("fork")
    pin(0)
    n, r = args.round_trips, args.repeat
    rt: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], list[int] | None]]] = [
        ("baton ring exchange (spinning)", lambda: rt_ring(n)),
        ("baton ring write+read (spinning)", lambda: rt_ring(n, exchange=False)),
        ("baton ring exchange (parked)", lambda: rt_ring(n // 5, spin_ns=0)),
        ("socketpair", lambda: rt_socketpair(n // 5)),
        ("multiprocessing.Pipe", lambda: rt_pipe(n // 5)),
        ("pyzmq PAIR ipc", lambda: rt_zmq(n // 5)),
    ]
    for name, fn in cases:
        print(f"round trip: {name} ...", file=sys.stderr, flush=True)
        rt[name] = median_run(fn, r)
    tp: dict[str, float] = {}
    for name, batched in (("baton ring unbatched", False), ("baton ring batched x256", True)):
        print(f"throughput: {name} ...", file=sys.stderr, flush=True)
        frames = args.frames if batched else args.frames // 5
        tp[name] = statistics.median(tp_ring(frames, batched) for _ in range(r))

    print(f"\n64-byte round trip, Python to Python, median of {r} runs")
    print(f"{'transport':32} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9}")
    for name, res in rt.items():
        if res is None:
            print(f"{name:32} {'(not installed)':>29}")
        else:
            print(f"{name:32} {res['p50_us']:9.2f} {res['p99_us']:9.2f} {res['p999_us']:9.2f}")
    print(f"\n64-byte one-way throughput, Python to Python, median of {r} runs")
    for name, fps in tp.items():
        print(f"{name:32} {fps / 1e6:9.2f} M frames/s")
    zmq_p50 = (rt.get("pyzmq PAIR ipc") or {}).get("p50_us")
    ring_p50 = rt["baton ring exchange (spinning)"]["p50_us"]  # type: ignore[index]
    if zmq_p50:
        print(f"\npyzmq p50 / ring p50 = {zmq_p50 / ring_p50:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"round_trip": rt, "throughput_fps": tp}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
