"""``baton selftest``: exercise the native core end to end and report what was measured.

It is the README's main job until `baton serve` exists; the daemon (issue 4) is to run the same checks
before it trusts libbaton, a failure meaning PYTHON_ONLY.  Each
check returns a short detail string; any exception is a failed check with its message.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any, Final

from baton import native, wire
from baton.errors import BatonError

ROUND_TRIPS = 20_000


def _check_library() -> str:
    return f"libbaton {native.version()}"


def _check_codec_twins() -> str:
    """The C codec and the Python codec must produce and accept the same bytes."""
    cases = [
        (1, wire.Priority.CRITICAL, 0, 1, 2, 3, 4, b""),
        (7, wire.Priority.BATCH, wire.F_CRC | wire.F_REPLY, 2**64 - 1, 5, 6, 2**63, b"\x81\xa1k\xa1v" * 50),
    ]
    for type_, prio, flags, src, dst, corr, ts, payload in cases:
        c_bytes = native.frame_encode(type_, prio, flags, src, dst, corr, ts, payload)
        hdr = wire.FrameHeader(type_, prio, flags, src, dst, corr, ts)
        py_bytes = wire.encode(hdr, payload)
        if c_bytes != py_bytes:
            raise AssertionError("C and Python codecs encode differently")
        if native.frame_decode(py_bytes)[-1] != len(py_bytes) or wire.decode(c_bytes)[2] != len(c_bytes):
            raise AssertionError("C and Python codecs do not accept each other's frames")
    return f"{len(cases)} frames byte-identical"


def _check_io_engine() -> str:
    """One frame out and back through the socket-plane engine on a socketpair."""
    a, b = socket.socketpair()
    try:
        with native.IoEngine() as io:
            frame = native.frame_encode(1, 2, 0, 1, 2, 0, 0, b"ping")
            io.watch(b.fileno(), 2)
            io.send(a.fileno(), frame, 1)
            seen: set[tuple[int, int]] = set()
            deadline = time.monotonic() + 5
            while len(seen) < 2 and time.monotonic() < deadline:
                for tag, kind, result in io.wait(100):
                    if kind == native.EV_SENT and result != len(frame):
                        raise AssertionError(f"send completed with {result}")
                    seen.add((tag, kind))
            if seen != {(1, native.EV_SENT), (2, native.EV_READABLE)}:
                raise AssertionError(f"engine events missing: {sorted(seen)}")
            if b.recv(4096) != frame:
                raise AssertionError("frame changed in transit")
            return f"backend {io.backend_name}"
    finally:
        a.close()
        b.close()


def _echo_child(sock: socket.socket) -> None:
    """Runs in the forked child: receive the two ring fds, echo every record until the parent closes."""
    _, fds = native.recv_fds(sock.fileno(), 16, 2)
    inbound = native.Ring.attach(fds[0], native.CONSUMER)
    outbound = native.Ring.attach(fds[1], native.PRODUCER)
    for fd in fds:
        os.close(fd)
    sock.sendall(b"R")
    try:
        # Ping-pong: one record in flight, so the reply always fits; exchange sends it and waits for the next.
        n = inbound.read_into(None)
        while n:
            n = inbound.exchange(outbound, bytes(inbound.buffer[: inbound.lengths[0]]))
    except BatonError:
        pass  # the parent closed its producer end: we are done
    outbound.close()
    inbound.close()


def _check_ring_round_trip() -> str:
    """Ping-pong 64-byte frames with a forked echo process through two rings whose memfds travel over
    SCM_RIGHTS; reports round-trip percentiles (both sides spin)."""
    parent_sock, child_sock = socket.socketpair()
    to_child = native.Ring.create(1 << 16, native.PRODUCER)
    from_child = native.Ring.create(1 << 16, native.CONSUMER)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            parent_sock.close()
            _echo_child(child_sock)
        finally:
            os._exit(0)
    try:
        child_sock.close()
        native.send_fds(parent_sock.fileno(), b"rings", [to_child.fd, from_child.fd])
        if parent_sock.recv(1) != b"R":
            raise AssertionError("echo process did not start")
        frame = native.frame_encode(1, 0, 0, 1, 2, 0, 0, b"x" * 16)  # 64 bytes on the wire
        samples = []
        clock = time.perf_counter_ns
        exchange = from_child.exchange
        for _ in range(ROUND_TRIPS):
            t0 = clock()
            exchange(to_child, frame)
            samples.append(clock() - t0)
        if bytes(from_child.buffer[:64]) != frame:
            raise AssertionError("echoed frame differs")
        samples.sort()
        p50 = statistics.median(samples) / 1000
        p99 = samples[int(len(samples) * 0.99)] / 1000
        return f"{ROUND_TRIPS} round trips, p50 {p50:.2f} us, p99 {p99:.2f} us (Python to Python)"
    finally:
        to_child.close()
        os.waitpid(pid, 0)
        from_child.close()
        parent_sock.close()


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("native library", _check_library),
    ("frame codec C == Python", _check_codec_twins),
    ("socket I/O engine", _check_io_engine),
    ("ring round trip + fd passing", _check_ring_round_trip),
]


def run(progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every check; ``ok`` is true only when all passed."""
    results = []
    if not native.AVAILABLE:
        results.append({"name": "native library", "ok": False, "detail": native.LOAD_ERROR})
    else:
        for name, fn in CHECKS:
            if progress:
                progress(f"selftest: {name} ...")
            try:
                results.append({"name": name, "ok": True, "detail": fn()})
            except Exception as exc:  # a failed check is a result, not a crash
                results.append({"name": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"})
    return {"ok": all(r["ok"] for r in results), "checks": results}


QUICK_CHECKS: Final = ("native library", "frame codec C == Python", "socket I/O engine")


def quick() -> str | None:
    """The checks cheap enough for the daemon (at start and before a recovery, docs/modes.md): None when the
    native layer passes, else what failed.  The ring round trip is left out: it forks."""
    if not native.AVAILABLE:
        return f"native library: {native.LOAD_ERROR}"
    for name, fn in CHECKS:
        if name in QUICK_CHECKS:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a failed check is an answer
                return f"{name}: {type(exc).__name__}: {exc}"
    return None
