"""``baton bench handoff``: latency and throughput of a running daemon, measured from real agent processes.

Three measurements, each with its own agent processes (``python -m baton.bench_handoff peer ...``):

- ``rt``: message round trip agent -> router -> agent.  One peer negotiates the shared-memory ring pair, spins,
  and sends a CRITICAL DIRECT frame to its own endpoint: the frame goes through the router and comes back on
  the peer's inbound ring.  ``rt-pair`` does the same between two peers (request, then the reply: two
  traversals of the router per sample).  Closed loop, or constant rate with ``--rate`` (latency is then
  measured from each message's *intended* send time, which corrects for coordinated omission).
- ``handoff``: a chain of tasks alternating between agent types ``bench-a`` and ``bench-b``, each the
  prerequisite of the next, so exactly one task is ready at a time.  Each agent logs when it received a task
  and when it sent the result; handoff k = (agent Y received task k+1) - (agent X sent the result of task k):
  agent A reports done -> coordinator persists and releases -> router -> agent B holds the dependent task.
- ``throughput``: N no-op agents of type ``bench-noop`` (WIP credit each); M tasks are enqueued first, then
  the rate is M / (last result sent - first task received).

With ``--modes INTELLIGENT,REDUNDANT,...`` every measurement runs once per execution mode: the daemon is
switched (``baton mode set``) before each, the results are labelled with the mode, and the daemon is left in
the mode it was in (docs/modes.md).

The peers speak the wire protocol directly (docs/protocol.md) instead of going through ``baton.Agent``, so
the figures are the daemon's, not the client library's.  Latencies are recorded in HDR histograms
(``hdrhistogram``): p50, p99, p99.9 and max; a table on screen and everything as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from baton import wire
from baton.protocol import EP_COORDINATOR, PROTOCOL_VERSION, REPLY_TYPE, MsgType

_NS = 1_000_000_000
_TYPES = ("bench-a", "bench-b")
_CORR = struct.Struct("<Q")
_MEASUREMENTS = ("rt", "handoff", "throughput")


def now_ns() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC, the clock of every timestamp libbaton writes


class BenchError(RuntimeError):
    """The daemon answered with an error or not at all; the message says what to check."""


class Peer:
    """One blocking connection to the daemon, speaking frames; optionally with the shared-memory ring pair."""

    def __init__(self, path: str, name: str, *, agent_type: str | None = None, wip: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as exc:
            raise BenchError(f"no baton daemon at {path} ({exc.strerror}); start one with `baton serve`") from exc
        self.stream = wire.FrameStream()
        self.inbox: list[tuple[wire.FrameHeader, bytes]] = []
        self._corr = 0
        self.c2r: Any = None
        self.r2c: Any = None
        self._fds: list[int] = []
        self._bell = -1
        hello = {"v": PROTOCOL_VERSION, "name": name, "pid": os.getpid(), "agent_type": agent_type,
                 "capabilities": [], "wip": wip}
        _, welcome = self.call(MsgType.HELLO, hello, EP_COORDINATOR)
        self.endpoint: int = welcome["endpoint"]

    def next_corr(self) -> int:
        self._corr += 1
        return self._corr

    def send(self, mtype: int, body: Any, dest: int, *, corr: int = 0, flags: int = 0,
             prio: int = wire.Priority.NORMAL) -> None:
        payload = body if isinstance(body, bytes) else msgpack.packb(body)
        hdr = wire.FrameHeader(type=mtype, priority=prio, flags=flags, destination=dest, correlation_id=corr,
                               send_ts_ns=now_ns())
        self.sock.sendall(wire.encode(hdr, payload))

    def receive(self) -> list[tuple[wire.FrameHeader, bytes]]:
        """Block until at least one frame arrives on the socket (fds passed with it are kept in ``_fds``)."""
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 4)
            self._fds.extend(fds)
            if not data:
                raise BenchError("the daemon closed the connection")
            frames = self.stream.feed(data)
            if frames:
                return frames

    def call(self, mtype: int, body: Any, dest: int) -> tuple[wire.FrameHeader, Any]:
        """Send a request and wait for its reply; other frames that arrive meanwhile go to ``inbox``."""
        corr = self.next_corr()
        self.send(mtype, body, dest, corr=corr)
        answers = (mtype, REPLY_TYPE.get(mtype, mtype))
        while True:
            got = None
            for hdr, payload in self.receive():
                if got is None and hdr.correlation_id == corr and hdr.flags & wire.F_REPLY and hdr.type in answers:
                    got = hdr, payload
                else:
                    self.inbox.append((hdr, payload))  # frames after the reply in the same read too (TASKs)
            if got is not None:
                hdr, payload = got
                value = msgpack.unpackb(payload) if payload else None
                if hdr.flags & wire.F_ERROR:
                    raise BenchError(f"{MsgType(mtype).name} failed: {value}")
                return hdr, value

    def api(self, op: str, **args: Any) -> Any:
        return self.call(MsgType.CALL, {"op": op, "args": args}, EP_COORDINATOR)[1]

    def setup_ring(self, spin_ns: int) -> None:
        """Negotiate the ring pair; both ends spin for spin_ns before parking."""
        from baton import native

        self.call(MsgType.RING_SETUP, b"", 0)
        if len(self._fds) < 4:
            raise BenchError(f"RING_READY carried {len(self._fds)} fds, expected 4")
        c2r_fd, r2c_fd, c2r_bell, r2c_bell = self._fds[:4]
        self.c2r = native.Ring.attach(c2r_fd, native.PRODUCER)
        self.r2c = native.Ring.attach(r2c_fd, native.CONSUMER)
        self.r2c.set_spin(spin_ns)
        # Our publishes ring the router's doorbell when it sleeps; we never arm ours (we park on the futex).
        self.c2r.set_doorbell(c2r_bell)
        self._bell = c2r_bell
        for fd in (c2r_fd, r2c_fd, r2c_bell):
            os.close(fd)  # attach keeps its own mapping

    def close(self) -> None:
        for ring in (self.c2r, self.r2c):
            if ring is not None:
                ring.close()
        if self._bell >= 0:
            os.close(self._bell)
        self.sock.close()


# --- peer processes -------------------------------------------------------------------------------------


def _peer_echo(path: str, ready: str, mode: str = "ring") -> None:
    """rt-pair: answer every DIRECT request from the ring, on the ring, until the requester hangs up.  mode
    ``socket``: requests and replies by the socket, the echo parked in recv() in between."""
    peer = Peer(path, "bench-echo")
    if mode == "ring":
        peer.setup_ring(spin_ns=_NS)
    with open(ready, "w") as f:
        f.write(str(peer.endpoint))
    if mode == "socket":
        while True:
            try:
                frames = peer.receive()
            except (BenchError, OSError):  # the requester hung up, the benchmark is over
                return
            peer.sock.sendall(b"".join(
                wire.encode(wire.FrameHeader(type=MsgType.DIRECT, flags=wire.F_REPLY, destination=hdr.source,
                                             correlation_id=hdr.correlation_id), payload)
                for hdr, payload in frames if hdr.type == MsgType.DIRECT and not hdr.flags & wire.F_REPLY))
    r2c, c2r = peer.r2c, peer.c2r
    while True:
        try:
            records = r2c.read_batch(timeout=None)
        except Exception:  # the router closed the ring: the benchmark is over
            return
        for rec in records:
            hdr, payload, _ = wire.decode(rec)
            if hdr.type == MsgType.DIRECT and not hdr.flags & wire.F_REPLY:
                reply = wire.FrameHeader(type=MsgType.DIRECT, priority=wire.Priority.CRITICAL, flags=wire.F_REPLY,
                                         destination=hdr.source, correlation_id=hdr.correlation_id)
                c2r.write(wire.encode(reply, payload))


_HDR = wire._HDR  # the frame header's layout: the agents pack and parse it directly
_HSIZE = wire.HEADER_SIZE
_T_TASK = int(MsgType.TASK)
_T_RESULT = int(MsgType.RESULT)
_RESULT_TAIL = b"\xa2ok\xc3\xa6result\xc0"  # "ok": true, "result": nil


def _peer_agent(path: str, agent_type: str, wip: int, log: str, mode: str = "socket", spin_us: int = 0) -> None:
    """A no-op agent: answers every TASK at once, logs (task input k, received ns, result sent ns, the TASK's
    send_ts_ns = when the coordinator pushed it) to ``log`` when the benchmark stops it with SIGTERM.

    mode ``socket``: TASKs and RESULTs over the socket, the agent parked in recv() between tasks.  mode
    ``ring``: the agent negotiates the ring pair, so the router sends it CRITICAL/HIGH TASKs through its
    inbound ring; it polls that ring for spin_us before parking on the ring's futex, and sends its RESULTs
    (HIGH) through its outbound ring.  Frames are parsed and built with struct (no FrameHeader objects): the
    agents share the machine's cores with the daemon, so their own cost per task is part of the figure."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    peer = Peer(path, f"bench-{agent_type}-{os.getpid()}", agent_type=agent_type, wip=wip)
    entries: list[tuple[int, int, int, int]] = []
    ring = mode == "ring"
    prio = wire.Priority.HIGH if ring else wire.Priority.NORMAL
    hpack, unpackb, packb, clock = _HDR.pack, msgpack.unpackb, msgpack.packb, now_ns
    magic, version, coord = wire.MAGIC, wire.VERSION, EP_COORDINATOR

    def answer(buf: Any, off: int, plen: int, corr: int, ts: int, out: list[bytes]) -> None:
        got = clock()
        task = unpackb(buf[off : off + plen])
        body = b"".join((b"\x84\xa2id", packb(task["id"]), b"\xa5token", packb(task["token"]), _RESULT_TAIL))
        out.append(hpack(magic, version, _T_RESULT, prio, 0, len(body), 0, 0, coord, corr, 0) + body)
        entries.append((task["input"]["k"], got, clock(), ts))

    try:
        out: list[bytes] = []
        if ring:
            peer.setup_ring(spin_ns=spin_us * 1000)
        for hdr, payload in peer.inbox:  # TASKs that came with the replies to HELLO and RING_SETUP
            if hdr.type == _T_TASK:
                answer(payload, 0, len(payload), hdr.correlation_id, hdr.send_ts_ns, out)
        pending = bytearray(peer.stream._buf)  # a partial frame received with them
        if ring:
            _ring_agent_loop(peer, answer, out, pending)
        else:
            if out:
                peer.sock.sendall(b"".join(out))
            sock = peer.sock
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    return
                pending += data
                out = []
                _answer_tasks(pending, answer, out)
                if out:
                    sock.sendall(b"".join(out))
    finally:
        with open(log, "w") as f:
            json.dump(entries, f)
        peer.close()


def _ring_agent_loop(peer: Peer, answer: Any, out: list[bytes], pending: bytearray) -> None:
    r2c, c2r, sock = peer.r2c, peer.c2r, peer.sock
    buf, lens = r2c.buffer, r2c.lengths
    unpack_from = _HDR.unpack_from
    sock.setblocking(False)
    wait = 0.002  # parked on the ring's futex at most this long between looks at the socket
    while True:
        if out:
            c2r.write_batch(out)
            out = []
        try:
            n = r2c.read_into(wait)
        except Exception:  # the router closed the ring: the benchmark is over
            return
        off = 0
        for i in range(n):
            ln = lens[i]
            _, _, typ, _, _, plen, _, _, _, corr, ts = unpack_from(buf, off)
            if typ == _T_TASK:
                answer(buf, off + _HSIZE, plen, corr, ts, out)
            off += ln
        if n:
            continue
        try:  # NORMAL frames (acks of resent results, TASKs below HIGH) still come by the socket
            data = sock.recv(1 << 18)
        except BlockingIOError:
            continue
        if not data:
            return
        pending += data
        _answer_tasks(pending, answer, out)


def _answer_tasks(pending: bytearray, answer: Any, out: list[bytes]) -> None:
    """Answer every whole TASK frame at the front of ``pending`` (other frames are skipped) and drop what was
    read; a partial frame stays for the next read."""
    off, n = 0, len(pending)
    while n - off >= _HSIZE:
        _, _, typ, _, _, plen, _, _, _, corr, ts = _HDR.unpack_from(pending, off)
        end = off + _HSIZE + plen
        if end > n:
            break
        if typ == _T_TASK:
            answer(pending, off + _HSIZE, plen, corr, ts, out)
        off = end
    del pending[:off]


def _run_peer(argv: Sequence[str]) -> int:
    role, path, *rest = argv
    if role == "echo":
        _peer_echo(path, *rest)
    elif role == "agent":
        mode = rest[3] if len(rest) > 3 else "socket"
        _peer_agent(path, rest[0], int(rest[1]), rest[2], mode, int(rest[4]) if len(rest) > 4 else 0)
    else:
        raise SystemExit(f"unknown peer role {role!r}")
    return 0


# --- measurements -------------------------------------------------------------------------------------


def _histogram() -> Any:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, 60 * _NS, 3)  # 1 ns .. 60 s at 3 significant digits


@dataclass
class Result:
    name: str
    unit: str = "us"
    samples: int = 0
    p50: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    max: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_histogram(cls, name: str, h: Any, **extra: Any) -> Result:
        us = 1000.0
        return cls(name, "us", h.get_total_count(), h.get_value_at_percentile(50) / us,
                   h.get_value_at_percentile(99) / us, h.get_value_at_percentile(99.9) / us,
                   h.get_max_value() / us, dict(extra))


class _Procs:
    """Peer processes started for one measurement; all are stopped on exit."""

    def __init__(self, path: str, tmp: str) -> None:
        self.path, self.tmp, self.procs = path, tmp, list[subprocess.Popen[bytes]]()

    def start(self, role: str, *args: object) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "baton.bench_handoff", "peer", role, self.path, *map(str, args)]
        proc = subprocess.Popen(cmd)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> _Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_file(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                return f.read()
        if proc.poll() is not None:
            raise BenchError(f"peer process exited with status {proc.returncode} before it was ready")
        time.sleep(0.01)
    raise BenchError(f"peer not ready after {timeout:.0f} s")


def _round_trips(peer: Peer, dest: int, seconds: float, rate: float | None, name: str, **extra: Any) -> Result:
    """Send CRITICAL DIRECT frames to dest through the ring and time each reply."""
    h = _histogram()
    c2r, r2c = peer.c2r, peer.r2c
    buf = r2c.buffer
    hdr = wire.FrameHeader(type=MsgType.DIRECT, priority=wire.Priority.CRITICAL, destination=dest)
    interval = int(_NS / rate) if rate else 0
    warm_end = now_ns() + min(_NS, int(seconds * _NS) // 5)
    end = warm_end + int(seconds * _NS)
    corr = 0
    next_send = now_ns()
    while True:
        corr += 1
        hdr.correlation_id = corr
        frame = wire.encode(hdr, b"")
        if interval:
            while now_ns() < next_send:
                pass  # constant rate: spin to the intended send time
        start = next_send if interval else now_ns()
        n = r2c.exchange(c2r, frame, timeout=5.0)
        if n == 0:
            raise BenchError("no reply within 5 s: is the router routing CRITICAL frames through rings?")
        got = now_ns()
        if _CORR.unpack_from(buf, 32)[0] != corr:  # correlation_id sits at byte 32 of the header
            raise BenchError("reply out of order")
        if got >= warm_end:
            h.record_value(max(1, got - start))
        if got >= end:
            break
        next_send = next_send + interval if interval else got
    return Result.from_histogram(name, h, seconds=seconds, rate=rate, **extra)


def _socket_round_trips(peer: Peer, dest: int, seconds: float, name: str) -> Result:
    """Closed loop of DIRECT requests by the socket, the requester parked in recv() until each reply."""
    h = _histogram()
    end = now_ns() + int(seconds * _NS)
    corr = 0
    while True:
        corr += 1
        start = now_ns()
        peer.send(MsgType.DIRECT, b"", dest, corr=corr)
        if not any(hdr.correlation_id == corr for hdr, _ in peer.receive()):
            raise BenchError("reply out of order")
        got = now_ns()
        h.record_value(max(1, got - start))
        if got >= end:
            return Result.from_histogram(name, h, seconds=seconds)


def measure_rt(path: str, seconds: float, rate: float | None, tmp: str) -> list[Result]:
    out = []
    peer = Peer(path, "bench-rt")
    try:
        peer.setup_ring(spin_ns=_NS)
        out.append(_round_trips(peer, peer.endpoint, seconds, rate, "rt (agent -> router -> same agent, ring)"))
        with _Procs(path, tmp) as procs:
            ready = os.path.join(tmp, "echo.ready")
            echo = procs.start("echo", ready)
            dest = int(_wait_file(ready, echo))
            out.append(_round_trips(peer, dest, seconds, rate, "rt-pair (request -> other agent -> reply, ring)"))
    finally:
        peer.close()
    # Two router traversals, each ending in the wakeup of a parked process: the shape of a task handoff
    # (agent -> router -> coordinator, coordinator -> router -> agent) without the coordinator's own work.
    peer = Peer(path, "bench-rt-socket")
    try:
        with _Procs(path, tmp) as procs:
            ready = os.path.join(tmp, "echo-socket.ready")
            echo = procs.start("echo", ready, "socket")
            dest = int(_wait_file(ready, echo))
            out.append(_socket_round_trips(peer, dest, seconds,
                                           "rt-pair parked (request -> other agent -> reply, socket)"))
    finally:
        peer.close()
    return out


def _enqueue(client: Peer, specs: list[dict[str, Any]], batch: int = 1000) -> None:
    for i in range(0, len(specs), batch):
        client.api("enqueue", tasks=specs[i : i + batch])


def _wait_done(client: Peer, ids: list[str], timeout: float) -> None:
    """Long-poll the daemon until every task is terminal."""
    res = client.api("wait", ids=ids, timeout_s=timeout)
    if res["timed_out"]:
        raise BenchError(f"tasks not finished within {timeout:.0f} s; see `baton status`")
    if bad := {s for s in res["statuses"].values() if s != "completed"}:
        raise BenchError(f"benchmark tasks ended {', '.join(sorted(bad))}; see `baton list`")


def _agents_logs(procs: _Procs, logs: list[str]) -> list[list[tuple[int, int, int, int]]]:
    """Stop the agent processes (SIGTERM) and read the logs they write on the way out."""
    for p in procs.procs:
        p.terminate()
    for p in procs.procs:
        if p.wait(30) != 0:
            raise BenchError(f"an agent process exited with status {p.returncode}")
    out = []
    for log in logs:
        with open(log) as f:
            out.append([(k, recv, sent, pushed) for k, recv, sent, pushed in json.load(f)])
    return out


@dataclass
class AgentMode:
    """How the bench agents wait for work (``--agents-mode``, ``--agent-spin-us``, ``--base-priority``)."""

    mode: str = "socket"  # socket | ring
    spin_us: int = 0
    base_priority: int = 5  # of the bench's tasks; >= 8 makes the coordinator push them HIGH (docs/daemon.md)

    def args(self) -> list[str]:
        return [self.mode, str(self.spin_us)]

    def label(self) -> str:
        return "socket, parked" if self.mode == "socket" else (
            f"ring, spin {self.spin_us} us" if self.spin_us else "ring, parked on futex")


def measure_handoff(path: str, n: int, tmp: str, timeout: float, am: AgentMode | None = None) -> Result:
    am = am or AgentMode()
    tag = f"h{os.getpid()}x{now_ns()}"
    specs: list[dict[str, Any]] = [
        {"id": f"{tag}-{k}", "summary": f"handoff bench step {k}", "agent_type": _TYPES[k % 2], "input": {"k": k},
         "prerequisites": [f"{tag}-{k - 1}"] if k else [], "base_priority": am.base_priority}
        for k in range(n)
    ]
    logs = [os.path.join(tmp, f"{t}.log") for t in _TYPES]
    client = Peer(path, "bench-handoff")
    try:
        with _Procs(path, tmp) as procs:
            for agent_type, log in zip(_TYPES, logs):
                procs.start("agent", agent_type, 1, log, *am.args())
            _wait_agents(client, {t: 1 for t in _TYPES})
            _enqueue(client, specs)
            _wait_done(client, [specs[-1]["id"]], timeout)
            a_log, b_log = _agents_logs(procs, logs)
    finally:
        client.close()
    got = {k: (recv, sent, pushed) for k, recv, sent, pushed in a_log + b_log}
    h = _histogram()
    # The split: A's result sent -> the coordinator pushes the TASK (its send_ts_ns), and push -> B holds it.
    to_push, from_push = [], []
    for k in range(1, n):
        h.record_value(max(1, got[k][0] - got[k - 1][1]))
        to_push.append(got[k][2] - got[k - 1][1])
        from_push.append(got[k][0] - got[k][2])
    to_push.sort()
    from_push.sort()
    return Result.from_histogram("handoff (A done -> B holds dependent)", h, tasks=n, agents=am.label(),
                                 p50_done_to_push_us=round(to_push[len(to_push) // 2] / 1000, 1),
                                 p50_push_to_held_us=round(from_push[len(from_push) // 2] / 1000, 1))


def _wait_agents(client: Peer, want: dict[str, int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have: dict[str, int] = {}
        for a in client.api("agents"):
            if a.get("agent_type"):
                have[a["agent_type"]] = have.get(a["agent_type"], 0) + 1
        if all(have.get(t, 0) >= c for t, c in want.items()):
            return
        time.sleep(0.02)
    raise BenchError(f"agents {want} did not connect within {timeout:.0f} s")


def measure_throughput(path: str, n: int, agents: int, wip: int, tmp: str, timeout: float,
                       am: AgentMode | None = None) -> Result:
    am = am or AgentMode()
    tag = f"t{os.getpid()}x{now_ns()}"
    specs: list[dict[str, Any]] = [
        {"id": f"{tag}-{k}", "summary": "no-op", "agent_type": "bench-noop", "input": {"k": k},
         "base_priority": am.base_priority}
        for k in range(n)
    ]
    client = Peer(path, "bench-throughput")
    try:
        client.api("pulse")  # fail early with the daemon's error if it cannot serve
        t0 = time.perf_counter()
        _enqueue(client, specs)
        enqueue_s = time.perf_counter() - t0
        logs = [os.path.join(tmp, f"noop{i}.log") for i in range(agents)]
        with _Procs(path, tmp) as procs:
            for log in logs:
                procs.start("agent", "bench-noop", wip, log, *am.args())
            # Every agent up before the end is awaited: with few tasks the first one can finish them all while
            # another is still starting, and would then be stopped before it can write its log.
            _wait_agents(client, {"bench-noop": agents})
            _wait_done(client, [s["id"] for s in specs], timeout)
            per_agent = _agents_logs(procs, logs)
    finally:
        client.close()
    entries = [e for log in per_agent for e in log]
    first = min(e[1] for e in entries)
    last = max(e[2] for e in entries)
    rate = len(entries) / ((last - first) / _NS)
    h = _histogram()
    for _, recv, sent, _ in entries:
        h.record_value(max(1, sent - recv))
    res = Result.from_histogram("throughput (no-op tasks)", h, tasks=len(entries), agents=agents, wip=wip,
                                agent_mode=am.label(),
                                tasks_per_s=round(rate), enqueue_tasks_per_s=round(n / enqueue_s))
    res.unit = "us in agent"
    return res


# --- execution modes -------------------------------------------------------------------------------------


def current_mode(path: str) -> str:
    peer = Peer(path, "bench-mode")
    try:
        mode: str = peer.api("mode")["mode"]
        return mode
    finally:
        peer.close()


def set_mode(path: str, mode: str, timeout: float) -> None:
    """Switch the daemon to ``mode`` and wait until it serves in it (a router switch closes connections: poll
    with new ones)."""
    peer = Peer(path, "bench-mode")
    try:
        peer.api("mode_set", mode=mode)
    finally:
        peer.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if current_mode(path) == mode:
                return
        except (BenchError, OSError):
            pass  # the new router is not accepting yet
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon did not switch to {mode} within {timeout:.0f} s: see `baton mode`")
        time.sleep(0.05)


# --- command line ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def _print(results: Sequence[Result]) -> None:
    from baton.cli import print_table

    print_table([(r.name, r.samples, f"{r.p50:.1f}", f"{r.p99:.1f}", f"{r.p999:.1f}", f"{r.max:.1f}",
                  " ".join(f"{k}={v}" for k, v in r.extra.items() if v is not None)) for r in results],
                ["measurement", "samples", "p50 us", "p99 us", "p99.9 us", "max us", ""])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="*", metavar="rt|handoff|throughput", help="measurements to run (default: all)")
    p.add_argument("--socket", help="daemon socket (default: as `baton serve` chooses it; BATON_SOCKET)")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each round-trip run")
    p.add_argument("--rate", type=float, help="constant send rate for rt (per second); default closed loop")
    p.add_argument("--chain", type=int, default=2000, help="tasks in the handoff chain")
    p.add_argument("--tasks", type=int, default=20000, help="no-op tasks for the throughput run")
    p.add_argument("--agents", type=int, default=2, help="agents for the throughput run")
    p.add_argument("--wip", type=int, default=32, help="WIP credit each throughput agent asks for")
    p.add_argument("--agents-mode", choices=("socket", "ring"), default="socket",
                   help="bench agents wait on the socket, or negotiate the ring pair (handoff, throughput)")
    p.add_argument("--agent-spin-us", type=int, default=0,
                   help="ring mode: how long an idle agent polls its ring before parking (0 = park at once)")
    p.add_argument("--base-priority", type=int,
                   help="base_priority of the bench tasks (default 9 in ring mode, so they travel HIGH, else 5)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up a task run after this many seconds")
    p.add_argument("--out", default="bench-handoff.json", help="where to save the JSON results")
    p.add_argument("--json", action="store_true", help="print the JSON instead of a table")
    p.add_argument("--modes", help="comma-separated execution modes to run every measurement in, side by side "
                                   "(INTELLIGENT, PYTHON_ONLY, REDUNDANT, SPEED_CRITICAL); default: the current one")


def run(args: argparse.Namespace) -> int:
    from tempfile import TemporaryDirectory

    from baton.client import resolve_socket_path

    path = str(resolve_socket_path(args.socket))
    what = args.what or list(_MEASUREMENTS)
    if unknown := set(what) - set(_MEASUREMENTS):
        print(f"baton bench handoff: unknown measurement {', '.join(sorted(unknown))}; choose from "
              f"{', '.join(_MEASUREMENTS)}", file=sys.stderr)
        return 2
    results: list[Result] = []
    bp = args.base_priority if args.base_priority is not None else (9 if args.agents_mode == "ring" else 5)
    am = AgentMode(args.agents_mode, args.agent_spin_us, bp)
    modes = [m.strip().upper() for m in args.modes.split(",")] if args.modes else [None]
    try:
        original = current_mode(path) if args.modes else None
        with TemporaryDirectory(prefix="baton-bench-") as tmp:
            for mode in modes:
                if mode is not None:
                    print(f"bench: mode {mode} ...", file=sys.stderr)
                    set_mode(path, mode, args.timeout)
                for item in what:
                    print(f"bench: {item} ...", file=sys.stderr)
                    if item == "rt":
                        got = measure_rt(path, args.seconds, args.rate, tmp)
                    elif item == "handoff":
                        got = [measure_handoff(path, args.chain, tmp, args.timeout, am)]
                    else:
                        got = [measure_throughput(path, args.tasks, args.agents, args.wip, tmp, args.timeout, am)]
                    for r in got:
                        if mode is not None:
                            r.name = f"[{mode}] {r.name}"
                            r.extra["mode"] = mode
                    results += got
            if original is not None:
                set_mode(path, original, args.timeout)
    except BenchError as exc:
        print(f"baton bench: {exc}", file=sys.stderr)
        return 2
    report = {"machine": machine(), "socket": path, "results": [r.__dict__ for r in results]}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(results)
        print(f"\nsaved {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["peer"]:
        return _run_peer(argv[1:])
    p = argparse.ArgumentParser(prog="baton bench handoff", description=__doc__.split("\n")[0] if __doc__ else "")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
