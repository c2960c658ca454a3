"""The native router as the daemon runs it: a real child process behind NativeRouterLink, this test playing
the coordinator through the link, clients on raw unix sockets (baton.wire).  The protocol itself is covered
for both routers by test_router_conformance.py; this file covers what only the native link does: the child
process (start, shutdown, death, the daemon's death), ring negotiation end to end from Python, and peer
refusal under both I/O backends."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from baton import native, protocol, wire
from baton.protocol import MsgType
from baton.router import RouterLink, RouterOptions

from conftest import child_env, wait_for
from router_harness import CRITICAL, F_REPLY, HIGH, Frame, Harness, frame, parse

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="libbaton is not built")

GEN = 9
BACKENDS = {"auto": native.IO_AUTO, "epoll": native.IO_EPOLL}


def _maker(backend: int, spin_ns: int = 20_000) -> Callable[[RouterOptions], RouterLink]:
    from baton.router.native import NativeRouterLink

    return lambda options: NativeRouterLink(options, backend=backend, spin_ns=spin_ns)


@pytest.fixture(params=sorted(BACKENDS))
def h(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(str(short_tmp), _maker(BACKENDS[request.param]), generation=GEN).start()
    try:
        yield harness
    finally:
        harness.close()


def _link_pid(h: Harness) -> int:
    link = h.coord.link
    pid = getattr(link, "pid", None)
    assert isinstance(pid, int)
    return pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_router_is_a_child_process_that_routes(h: Harness) -> None:
    pid = _link_pid(h)
    assert pid != os.getpid() and _alive(pid)
    agent = h.agent("build", 1)
    h.push("build", 1)
    h.push("build", 2)
    assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 1
    h.result(agent, 1)
    # The handoff happens in the router: the next task arrives with no coordinator action in between.
    assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 2
    assert h.coord.recv_until(lambda f: f.type == MsgType.RESULT).corr == 1
    log = h.coord.recv_until(lambda f: f.type == MsgType.ROUTER_LOG, what="the router's start line").obj()
    assert log[0] == "info" and "router started" in log[1]


def test_shutdown_stops_the_child_and_leaves_the_socket_to_the_daemon(h: Harness) -> None:
    pid = _link_pid(h)
    a = h.connect()
    h.coord.ctl(MsgType.CTL_SHUTDOWN)
    a.wait_eof()
    h.coord.wait_gone()
    wait_for(lambda: not _alive(pid), what="the router process to exit")
    assert not h.coord.alive()
    os.fstat(h.listener.fileno())  # still the daemon's


def test_a_killed_router_is_reported_as_gone(h: Harness) -> None:
    pid = _link_pid(h)
    a = h.connect()
    os.kill(pid, signal.SIGKILL)
    h.coord.wait_gone(10.0)
    assert not h.coord.alive()
    a.wait_eof()


def _ring_client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(5.0)
    return s


def _read_ring_frame(ring: native.Ring, bell: int, timeout: float = 5.0) -> Frame:
    """One frame from an r2c ring, sleeping on its doorbell between looks (arm / poll / disarm)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = ring.read_batch(0, max_n=1)
        if recs:
            return parse(bytes(recs[0]))
        assert time.monotonic() < deadline, "nothing arrived on the ring"
        if ring.arm():
            select.select([bell], [], [], 0.2)
            try:
                os.eventfd_read(bell)
            except BlockingIOError:
                pass
            ring.disarm()


def test_ring_negotiation_end_to_end(h: Harness) -> None:
    other = h.connect()
    s = _ring_client(h.path)
    me = h.coord.recv_until(lambda f: f.type == MsgType.EP_OPEN, what="EP_OPEN").source
    s.sendall(frame(MsgType.RING_SETUP, corr=5, destination=1 << 16))
    assert select.select([s], [], [], 5.0)[0], "no RING_READY"
    data, fds = native.recv_fds(s.fileno())
    try:
        ready = parse(data)
        assert (ready.type, ready.corr, ready.flags, ready.payload) == (MsgType.RING_READY, 5, F_REPLY, b"")
        assert len(fds) == 4
        c2r_fd, r2c_fd, c2r_bell, r2c_bell = fds
        with native.Ring.attach(c2r_fd, native.PRODUCER) as c2r, native.Ring.attach(r2c_fd, native.CONSUMER) as r2c:
            c2r.set_doorbell(c2r_bell)  # ring the router's bell when it armed before sleeping
            for i in range(50):
                c2r.write(frame(MsgType.PING, priority=CRITICAL, corr=100 + i, payload=b"ring %d" % i))
                got = _read_ring_frame(r2c, r2c_bell)
                assert (got.type, got.corr, got.flags, got.payload) == (MsgType.PING, 100 + i, F_REPLY, b"ring %d" % i)
            # A HIGH frame for us from another client comes through r2c, source overwritten.
            other.send(MsgType.DIRECT, priority=HIGH, destination=me, corr=7, payload=b"hi")
            got = _read_ring_frame(r2c, r2c_bell)
            assert (got.type, got.source, got.payload) == (MsgType.DIRECT, other.ep, b"hi")
            # Frames sent through the ring reach the coordinator like socket frames.
            c2r.write(frame(MsgType.CALL, priority=HIGH, destination=protocol.EP_COORDINATOR, corr=8, payload=b"\x80"))
            call = h.coord.recv_until(lambda f: f.type == MsgType.CALL, what="CALL via the ring")
            assert (call.source, call.corr) == (me, 8)
            # NORMAL replies still use the socket.
            s.sendall(frame(MsgType.PING, corr=9, payload=b"sock"))
            stream = wire.FrameStream(0)
            got_frames: list[tuple[wire.FrameHeader, bytes]] = []
            while not got_frames:
                got_frames = stream.feed(s.recv(65536))
            assert got_frames[0][0].correlation_id == 9
    finally:
        for fd in fds:
            os.close(fd)
        s.close()


DAEMON = r"""
import asyncio, os, socket, sys
from baton.router import RouterOptions
from baton.router.native import NativeRouterLink

async def main():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen()
    link = NativeRouterLink(RouterOptions(s.fileno(), os.getuid(), None, 65536, 1))
    await link.start()
    print(link.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_the_router_exits_when_the_daemon_dies(short_tmp: Path) -> None:
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(short_tmp / "d.sock")], env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        router_pid = int(daemon.stdout.readline())
        assert _alive(router_pid)
        daemon.kill()
        daemon.wait(10)
        wait_for(lambda: not _alive(router_pid), what="the orphaned router to exit")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# --- the early child (the daemon spawns it before its own imports) ---------------------------------------------


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_an_early_child_is_lean_and_routes_once_handed_its_descriptors(short_tmp: Path) -> None:
    from baton.router.native import NativeRouterLink
    from baton.router.native_child import spawn

    child = spawn()
    pid = child.proc.pid

    def argv() -> list[bytes]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")

    # No site (no .pth imports), no user site, no PYTHON* variables.
    wait_for(lambda: b"-I" in argv() and b"-S" in argv(), what="the child's command line")
    # It loads libbaton while waiting for its orders, and nothing of the daemon's (pydantic, uvloop, sqlite).
    wait_for(lambda: "_native" in _maps(pid), what="the child to load libbaton")
    assert not any(lib in _maps(pid) for lib in ("pydantic_core", "uvloop", "sqlite")), _maps(pid)
    assert child.proc.poll() is None and child.pending  # waiting for its orders (the start below needs it alive)
    h = Harness(str(short_tmp), lambda options: NativeRouterLink(options, child=child), generation=GEN).start()
    try:
        assert _link_pid(h) == pid and not child.pending
        agent = h.agent("build", 1)
        h.push("build", 1)
        assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 1
    finally:
        h.close()
    assert child.proc.wait(10) == 0


def test_a_dismissed_child_exits_0() -> None:
    from baton.router.native_child import spawn

    child = spawn()
    child.dismiss()
    assert child.proc.returncode == 0 and not child.pending


def test_a_child_that_died_before_its_orders_fails_the_start(short_tmp: Path) -> None:
    import asyncio

    from baton.router import RouterGone
    from baton.router.native import NativeRouterLink
    from baton.router.native_child import spawn

    child = spawn()
    child.proc.kill()  # not reaped: the link's pidfd reports the exit
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(short_tmp / "e.sock"))
    s.listen()

    async def go() -> None:
        link = NativeRouterLink(RouterOptions(s.fileno(), os.getuid(), None, 65536, 1), child=child)
        with pytest.raises(RouterGone, match="did not start"):
            await link.start()
        assert not link.alive

    try:
        asyncio.run(asyncio.wait_for(go(), 20))
    finally:
        s.close()


# --- the RESULT check of continuations: C (bt_result_ok) and Python (router/python.py) agree ----------------


def _result_ok_cases() -> list[bytes]:
    import random

    import msgpack

    cases = [b"", b"\x81\xa2ok\xc3", b"\x81\xa2ok\xc2", b"\x81\xa2ok\x01", b"\x91\xc3", b"\x81\xa2ok",
             b"\x82\xa2ok\xc3\xa2ok\xc2", b"\x82\xa2ok\xc2\xa2ok\xc3", b"\x81\xc4\x02ok\xc3", b"\x81\xd9\x02ok\xc3",
             b"\x81\xa2ok\xc3\xc0", b"\x82\xa2ok\xc3\xa1x\xd4\xff\x00", b"\x82\xa2ok\xc3\xa1x\xa1\xff",
             b"\x82\xa2ok\xc3\xa1x\xc1", b"\xdf\xff\xff\xff\xff\xa2ok\xc3"]
    for depth in (1023, 1024, 1025):  # msgpack's own stack limit: 1024 open containers per key or value
        cases.append(b"\x82\xa1x" + b"\x91" * depth + b"\xc0\xa2ok\xc3")
        cases.append(b"\x82\xa1x" + b"\x91" * (depth - 1) + b"\x90\xa2ok\xc3")
        cases.append(b"\x82" + b"\x81\xc0" * depth + b"\xc0\xc0\xa2ok\xc3")
    rng = random.Random(4)
    objs: list[object] = [None, True, False, 1, -1, 2**40, 1.5, "ok", "x", b"ok", [], {}, [1, [2]], {"ok": True},
                          msgpack.ExtType(5, b"ab")]
    for _ in range(20_000):
        d = {rng.choice(["ok", "ok", "id", 7, None]): rng.choice(objs) for _ in range(rng.randint(0, 4))}
        data = bytearray(msgpack.packb(d, use_bin_type=True))
        for _ in range(rng.randint(0, 3)):  # mutate: overwrite, cut, insert
            op = rng.random()
            if op < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.7 and data:
                del data[rng.randrange(len(data)) :]
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        cases.append(bytes(data))
    return cases


def test_the_c_and_python_result_checks_agree() -> None:
    from baton.router.python import _result_ok

    cases = _result_ok_cases()
    differ = [c for c in cases if native.result_ok(c) != _result_ok(c)]
    assert not differ, [(c[:40], native.result_ok(c), _result_ok(c)) for c in differ[:5]]
    released = sum(native.result_ok(c) for c in cases)
    assert 0 < released < len(cases)  # both answers are exercised
