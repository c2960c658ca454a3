"""baton.Agent against the real coordinator + router (in-process, both routers) and ``python -m baton.daemon``
(killed and restarted under a running agent).

FakeDaemon (client_harness.py) stays only for a scripted frame order a correct daemon never sends (a RESULT
acknowledgement that never comes) and for the raw frames the agent writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from baton import protocol, wire
from baton.agent import Agent, AgentTask, TaskFailed
from baton.client import Client
from baton.client_errors import DaemonNotRunning
from baton.models import Status
from baton.protocol import MsgType
from client_fixtures import daemon, fake, router  # noqa: F401 - pytest fixtures
from client_harness import FakeDaemon
from conftest import REPO, child_env, wait_for
from daemon_harness import Daemon, InProcess, daemon_env, in_process

HARNESS = str(REPO / "tests/python/client_harness.py")


class Running:
    """An Agent serving in a background thread (its event loop in ``loop`` once it runs)."""

    def __init__(self, agent: Agent, handler: Any) -> None:
        self.agent = agent
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler: Any) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.agent.serve(handler)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the agent did not stop"
        assert self.error is None, self.error


def _agents(c: Client, n: int = 1) -> list[dict[str, Any]]:
    """Wait until the daemon lists n agents; return them."""
    seen: list[list[dict[str, Any]]] = []

    def ready() -> bool:
        seen[:] = [c.agents()]
        return len(seen[0]) == n

    wait_for(ready, timeout=20, what=f"{n} agent(s)")
    return seen[0]


def _task(tid: str, token: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": tid, "token": token, "agent_type": "w", "attempt": 1, "input": {"n": tid}, "metadata": {},
            "lease_s": 30.0, "timeout_s": None, **extra}


# --- the real coordinator ----------------------------------------------------------------------------------------


def test_agent_hello_tasks_and_results(daemon: InProcess) -> None:
    def handler(task: AgentTask) -> Any:
        if task.id == "bad":
            raise ValueError("no good")
        if task.id == "explicit":
            raise TaskFailed("exactly this")
        return {"got": task.input, "attempt": task.attempt, "meta": task.metadata}

    r = Running(Agent("w", capabilities=["py"], wip=2, socket=daemon.socket_path, name="a1"), handler)
    with Client(daemon.socket_path) as c:
        (me,) = _agents(c)
        assert me["name"] == "a1" and me["agent_type"] == "w" and me["wip"] == 2 and me["pid"] == os.getpid()
        # The daemon lists the agent once it has sent WELCOME; the agent knows its endpoint once it has read it.
        assert me["capabilities"] == ["py"] and me["endpoint"] == wait_for(lambda: r.agent.endpoint)
        c.enqueue([{"id": "ok", "summary": "s", "agent_type": "w", "input": b"\x00raw", "metadata": {"m": 1}},
                   {"id": "bad", "summary": "s", "agent_type": "w", "max_attempts": 1},
                   {"id": "explicit", "summary": "s", "agent_type": "w", "max_attempts": 1}])
        res = c.wait(["ok", "bad", "explicit"], timeout=30)
        assert res.statuses["ok"] == "completed" and not res.timed_out
        assert c.get("ok").result == {"got": b"\x00raw", "attempt": 1, "meta": {"m": 1}}  # bytes stay bytes
        # The attempt failed with the exception's text (TaskFailed: exactly its text).
        assert [a.error for a in c.get("bad").attempt_history] == ["ValueError: no good"]
        assert [a.error for a in c.get("explicit").attempt_history] == ["exactly this"]
        wait_for(lambda: r.agent.accepted == 3, what="the acknowledgements")
    assert r.agent.unacked == 0 and r.agent.completed == 1 and r.agent.failed == 2 and r.agent.rejected == 0
    r.stop()


def test_heartbeats_extend_the_lease(router: str, short_tmp: Path) -> None:
    """A task running for several leases completes in its first attempt: the heartbeats renew its lease."""
    lease = 1.0
    runs: list[int] = []

    def handler(task: AgentTask) -> Any:
        runs.append(task.attempt)
        time.sleep(2.5 * lease)  # the work itself: outlives the lease
        return "slow but done"

    with in_process(short_tmp, router=router, lease_s=lease) as h:
        r = Running(Agent("w", wip=2, socket=h.socket_path), handler)  # room for a re-dispatch, were there one
        with Client(h.socket_path) as c:
            _agents(c)
            c.enqueue({"id": "slow", "summary": "s", "agent_type": "w"})
            assert c.wait(["slow"], timeout=30).statuses == {"slow": "completed"}
            t = c.get("slow")
            assert t.result == "slow but done" and t.attempts == 1, t.attempt_history
            assert runs == [1], "the task was handed out again: its lease expired"
        wait_for(lambda: r.agent.accepted == 1, what="the acknowledgement")
        assert r.agent.rejected == 0
        r.stop()


def test_daemon_hands_the_agent_exactly_wip_tasks_at_once(daemon: InProcess) -> None:
    wip = 3
    active = 0
    peak = 0
    started: list[str] = []
    permits: list[asyncio.Semaphore] = []

    async def handler(task: AgentTask) -> Any:
        nonlocal active, peak
        if not permits:
            permits.append(asyncio.Semaphore(0))
        active += 1
        peak = max(peak, active)
        started.append(task.id)
        await permits[0].acquire()
        active -= 1
        return task.id

    def release(n: int) -> None:
        assert r.loop is not None
        for _ in range(n):
            r.loop.call_soon_threadsafe(permits[0].release)

    r = Running(Agent("w", wip=wip, socket=daemon.socket_path), handler)
    ids = [f"t{i}" for i in range(2 * wip)]
    with Client(daemon.socket_path) as c:
        _agents(c)
        c.enqueue([{"id": i, "summary": "s", "agent_type": "w"} for i in ids])
        wait_for(lambda: active >= wip, what=f"{wip} tasks running at once")
        # The daemon holds the rest back: the router dispatched wip tasks, no more.
        assert c.stats()["router"]["dispatched"] == wip and c.agents()[0]["held"] == wip
        assert r.agent.running == wip and len(started) == wip and active == wip
        release(1)  # one finishes: exactly one more comes
        wait_for(lambda: len(started) == wip + 1, what="the next task")
        assert c.stats()["router"]["dispatched"] == wip + 1 and r.agent.running == wip
        release(2 * wip)
        res = c.wait(ids, timeout=30)
        assert set(res.statuses.values()) == {"completed"}
    assert peak == wip and sorted(started) == sorted(ids)
    r.stop()


def test_stop_waits_for_running_tasks_and_their_acks(daemon: InProcess) -> None:
    started = threading.Event()
    gate = threading.Event()
    runs: list[str] = []

    def handler(task: AgentTask) -> Any:
        runs.append(task.id)
        started.set()
        gate.wait(10)
        return "finished"

    r = Running(Agent("w", socket=daemon.socket_path), handler)
    with Client(daemon.socket_path) as c:
        _agents(c)
        c.enqueue([{"id": "t1", "summary": "s", "agent_type": "w"}, {"id": "t2", "summary": "s", "agent_type": "w"}])
        assert started.wait(10)
        r.agent.stop()
        r.thread.join(0.2)
        assert r.thread.is_alive(), "stop() must wait for the running task"
        gate.set()
        r.thread.join(15)
        assert not r.thread.is_alive() and r.error is None
        # Stopped only once its result was acknowledged: the daemon has it.
        assert r.agent.accepted == 1 and r.agent.unacked == 0
        assert c.get("t1").status == Status.COMPLETED and c.get("t1").result == "finished"
        # No new task was started; the one the router handed over meanwhile went back to ready.
        wait_for(lambda: c.get("t2").status == Status.READY, what="t2 back in the ready queue")
        assert runs == ["t1"] and c.agents() == []


def test_agent_process_stops_cleanly_on_sigint(short_tmp: Path) -> None:
    out = short_tmp / "seen.txt"
    with in_process(short_tmp, router="python") as h:
        proc = subprocess.Popen([sys.executable, HARNESS, "agent", "--type", "w", "--socket", str(h.socket_path),
                                 "--out", str(out)], env=child_env())
        try:
            with Client(h.socket_path) as c:
                _agents(c)
                c.enqueue({"id": "p1", "summary": "s", "agent_type": "w"})
                assert c.wait(["p1"], timeout=30).statuses == {"p1": "completed"}
                proc.send_signal(signal.SIGINT)
                assert proc.wait(15) == 0
                assert c.get("p1").result == {"done": "p1"}
                wait_for(lambda: c.agents() == [], what="the agent to disconnect")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert out.read_text().split()[0] == "p1"


def test_first_connection_failure_is_reported(sock_path: str) -> None:
    with pytest.raises(DaemonNotRunning, match="baton serve"):
        asyncio.run(Agent("w", socket=sock_path).serve(lambda t: None))


def test_agent_reconnects_with_backoff_and_finishes_the_work_after_a_daemon_restart(
        router: str, short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL the daemon while the agent runs a task; its result is made while no daemon runs; a new daemon on
    the same state and socket gets it (same token, still running there), and new work."""
    caplog.set_level(logging.INFO, logger="baton.agent")
    env = daemon_env(short_tmp)
    env["BATON_ROUTER"] = router
    gate = threading.Event()
    runs: list[str] = []

    def handler(task: AgentTask) -> Any:
        runs.append(task.id)
        if task.id == "held":
            gate.wait(30)
        return f"{task.id} done"

    d1 = Daemon(short_tmp, env)
    d2: Daemon | None = None
    r: Running | None = None
    try:
        d1.wait_ready()
        r = Running(Agent("w", socket=d1.socket_path, backoff_initial_s=0.02, backoff_max_s=0.2), handler)
        with Client(d1.socket_path) as c:
            _agents(c)
            c.enqueue({"id": "held", "summary": "s", "agent_type": "w"})
            wait_for(lambda: runs, what="the task to start")
        d1.kill()
        # The agent notices and retries with backoff while nothing listens.
        wait_for(lambda: sum("retrying in" in rec.getMessage() for rec in caplog.records) >= 2, what="retries")
        gate.set()
        wait_for(lambda: r is not None and r.agent.completed == 1, what="the result, made while no daemon runs")
        assert r.agent.unacked == 1 and r.agent.connections == 1
        d2 = Daemon(short_tmp, env)
        d2.wait_ready()
        wait_for(lambda: r is not None and r.agent.connections == 2, what="the reconnect")
        with Client(d2.socket_path) as c:
            assert c.wait(["held"], timeout=30).statuses == {"held": "completed"}
            assert c.get("held").result == "held done" and c.get("held").attempts == 1
            c.enqueue({"id": "after", "summary": "s", "agent_type": "w"})
            assert c.wait(["after"], timeout=30).statuses == {"after": "completed"}
        wait_for(lambda: r is not None and r.agent.accepted == 2, what="both results acknowledged")
        assert runs == ["held", "after"] and r.agent.unacked == 0 and r.agent.rejected == 0
        r.stop()
    finally:
        gate.set()
        if r is not None:
            r.agent.stop()
        for d in (d1, d2):
            if d is not None:
                d.kill()


def test_agent_survives_a_cut_connection_and_each_task_completes_once(router: str, short_tmp: Path) -> None:
    """The socket is cut under a running task: the coordinator hands it out again (a new token) on the new
    connection; the new attempt completes it, the first attempt's late result is refused, nothing counts twice."""
    gate = threading.Event()
    runs: list[int] = []

    def handler(task: AgentTask) -> Any:
        runs.append(task.attempt)
        if task.attempt == 1:
            gate.wait(10)
        return f"attempt {task.attempt}"

    with in_process(short_tmp, router=router) as h:
        agent = Agent("w", wip=2, socket=h.socket_path, backoff_initial_s=0.01)
        r = Running(agent, handler)
        with Client(h.socket_path) as c:
            _agents(c)
            c.enqueue({"id": "held", "summary": "s", "agent_type": "w"})
            wait_for(lambda: runs, what="the task to start")
            conn = agent._conn
            assert conn is not None and conn._writer is not None and r.loop is not None
            # Cut the socket under the agent (as a router switch would).
            r.loop.call_soon_threadsafe(conn._writer.transport.abort)
            wait_for(lambda: agent.connections == 2, what="the reconnect")
            res = c.wait(["held"], timeout=30)
            assert res.statuses == {"held": "completed"} and runs == [1, 2]
            task = c.get("held")
            assert task.result == "attempt 2" and task.attempts == 2
            gate.set()  # now the first attempt reports, too late
            wait_for(lambda: agent.unacked == 0 and agent.completed == 2, what="every result acknowledged")
            assert agent.accepted == 1 and agent.rejected == 1
            assert c.get("held").result == "attempt 2"
        r.stop()


# --- the shared-memory ring pair (ring=True) ---------------------------------------------------------------------


def _close_from_daemon(h: InProcess, endpoint: int) -> None:
    """The coordinator tells the router to close the agent's connection (CTL_CLOSE)."""
    hdr = wire.FrameHeader(type=MsgType.CTL_CLOSE, source=protocol.EP_COORDINATOR)
    frame = wire.encode(hdr, protocol.CTL_CLOSE.pack(endpoint))
    h.run(lambda: h.link.send([frame]))


def _high_and_normal(c: Client, tag: str, n: int) -> list[str]:
    """n tasks pushed HIGH (base_priority >= 8) and n NORMAL ones; their ids."""
    specs: list[dict[str, Any]] = [
        {"id": f"{tag}-h{i}", "summary": "s", "agent_type": "w", "base_priority": 9, "input": i} for i in range(n)
    ]
    specs += [{"id": f"{tag}-n{i}", "summary": "s", "agent_type": "w", "base_priority": 3, "input": i}
              for i in range(n)]
    c.enqueue(specs)
    return [s["id"] for s in specs]


def test_ring_agent_takes_high_tasks_by_ring_and_renegotiates_after_a_close(daemon: InProcess) -> None:
    """HIGH TASKs (and the acknowledgements of their HIGH results) arrive on the r2c ring, the results leave on
    c2r; NORMAL ones stay on the socket.  After the daemon closes the connection, the agent reconnects and gets
    a new ring pair."""
    seen: dict[str, int] = {}

    def handler(task: AgentTask) -> Any:
        seen[task.id] = task.priority
        return task.input

    n = 5
    agent = Agent("w", wip=4, socket=daemon.socket_path, ring=True, backoff_initial_s=0.01)
    r = Running(agent, handler)
    with Client(daemon.socket_path) as c:
        _agents(c)
        wait_for(lambda: agent.rings == 1, what="the ring pair")
        ids = _high_and_normal(c, "one", n)
        assert c.wait(ids, timeout=30).statuses == {i: "completed" for i in ids}
        wait_for(lambda: agent.accepted == 2 * n, what="the acknowledgements")
        assert {i: p for i, p in seen.items() if "-h" in i} == {f"one-h{i}": wire.Priority.HIGH for i in range(n)}
        assert {i: p for i, p in seen.items() if "-n" in i} == {f"one-n{i}": wire.Priority.NORMAL for i in range(n)}
        # Exactly the HIGH tasks and their acknowledgements came through the ring, nothing NORMAL did.
        assert agent.ring_frames_in == 2 * n and agent.ring_frames_out == n
        assert agent.rejected == 0 and agent.unacked == 0

        _close_from_daemon(daemon, agent.endpoint)
        wait_for(lambda: agent.connections == 2 and agent.rings == 2, what="the reconnect and its ring pair")
        _agents(c)
        ids = _high_and_normal(c, "two", n)
        assert c.wait(ids, timeout=30).statuses == {i: "completed" for i in ids}
        wait_for(lambda: agent.accepted == 4 * n, what="the acknowledgements")
        assert agent.ring_frames_in == 4 * n and agent.ring_frames_out == 2 * n
        assert agent.rejected == 0 and agent.unacked == 0
    r.stop()
    assert agent._rings is None


def test_ring_agent_without_libbaton_uses_the_socket(
    daemon: InProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from baton import native

    monkeypatch.setattr(native, "AVAILABLE", False)
    agent = Agent("w", wip=2, socket=daemon.socket_path, ring=True)
    with caplog.at_level(logging.WARNING, logger="baton.agent"):
        r = Running(agent, lambda task: task.input)
        with Client(daemon.socket_path) as c:
            _agents(c)
            ids = _high_and_normal(c, "s", 3)
            assert c.wait(ids, timeout=30).statuses == {i: "completed" for i in ids}
            wait_for(lambda: agent.accepted == 6, what="the acknowledgements")
        r.stop()
    assert agent.rings == 0 and agent.ring_frames_in == 0 and agent.ring_frames_out == 0
    assert sum("uses the socket only" in rec.getMessage() for rec in caplog.records) == 1


def test_ring_agent_when_the_daemon_refuses_rings(
    daemon: InProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """RING_SETUP answered with an error (here: a capacity the router refuses): logged once, socket only."""
    from baton.client import _Core

    original = _Core.frame

    def bad_capacity(self: _Core, mtype: int, payload: bytes, **kw: Any) -> bytes:
        if mtype == MsgType.RING_SETUP:  # destination = ring capacity; 3 is not a power of two >= 4096
            kw["dest"] = 3
        return original(self, mtype, payload, **kw)

    monkeypatch.setattr(_Core, "frame", bad_capacity)
    agent = Agent("w", wip=2, socket=daemon.socket_path, ring=True, backoff_initial_s=0.01)
    with caplog.at_level(logging.WARNING, logger="baton.agent"):
        r = Running(agent, lambda task: task.input)
        with Client(daemon.socket_path) as c:
            _agents(c)
            ids = _high_and_normal(c, "r", 3)
            assert c.wait(ids, timeout=30).statuses == {i: "completed" for i in ids}
            wait_for(lambda: agent.accepted == 6, what="the acknowledgements")
            _close_from_daemon(daemon, agent.endpoint)
            wait_for(lambda: agent.connections == 2, what="the reconnect")
        r.stop()
    assert agent.rings == 0 and agent.ring_frames_in == 0
    assert sum("refused the shared-memory ring" in rec.getMessage() for rec in caplog.records) == 1


# --- a scripted daemon: frame orders a correct daemon never sends ------------------------------------------------


def test_unacked_result_is_resent_after_reconnect_and_accepted_once(fake: FakeDaemon) -> None:
    fake.ack_results = False  # the acknowledgement never comes: the agent must keep the result
    r = Running(Agent("w", socket=fake.path, backoff_initial_s=0.01, backoff_max_s=0.1), lambda t: "done")
    first = fake.wait(lambda: next(iter(fake.agents()), None))
    fake.push_task(first, _task("x", token=3), 300)
    fake.wait(lambda: len(fake.results) == 1)
    assert r.agent.unacked == 1
    fake.ack_results = True
    first.close()
    second = fake.wait(lambda: next((c for c in fake.agents() if c.endpoint != first.endpoint), None))
    fake.wait(lambda: len(fake.results) == 2)
    resent = [(ep, h.correlation_id, v) for ep, h, v in fake.of_type(MsgType.RESULT)]
    # Sent again from the new endpoint, with the dispatch id it answers as the correlation id.
    assert resent[1] == (second.endpoint, 300, {"id": "x", "token": 3, "ok": True, "result": "done"})
    wait_for(lambda: r.agent.accepted == 1, what="the acknowledgement after the reconnect")
    assert r.agent.unacked == 0 and r.agent.connections == 2 and r.agent.completed == 1
    r.stop()


def test_frame_header_of_results_and_heartbeats(fake: FakeDaemon) -> None:
    gate = threading.Event()

    def handler(task: AgentTask) -> Any:
        gate.wait(10)

    r = Running(Agent("w", capabilities=["py"], wip=2, socket=fake.path, name="a1"), handler)
    conn = fake.wait(lambda: next(iter(fake.agents()), None))
    assert conn.hello == {"v": 1, "name": "a1", "pid": os.getpid(), "agent_type": "w", "capabilities": ["py"],
                          "wip": 2}
    fake.push_task(conn, _task("h", token=7), 77)
    # While it runs, heartbeats (every heartbeat_s of WELCOME) carry its [id, token].
    fake.wait(lambda: any(v == {"held": [["h", 7]]} for _, _, v in fake.of_type(MsgType.HEARTBEAT)))
    gate.set()
    fake.wait(lambda: fake.of_type(MsgType.RESULT))
    _, h, v = fake.of_type(MsgType.RESULT)[0]
    assert h.destination == 1 and h.correlation_id == 77 and not h.flags & wire.F_REPLY
    assert v == {"id": "h", "token": 7, "ok": True, "result": None}
    r.stop()


# --- agent processes and the worker command on the real coordinator ----------------------------------------------


def test_dag_completes_in_valid_order_with_two_agent_processes(short_tmp: Path) -> None:
    # A diamond per group plus a chain: a -> {b, c} -> d, for 10 groups; the last group's d after the first's.
    specs: list[dict[str, Any]] = []
    for g in range(10):
        specs += [
            {"id": f"a{g}", "summary": "a", "agent_type": "w"},
            {"id": f"b{g}", "summary": "b", "agent_type": "w", "prerequisites": [f"a{g}"]},
            {"id": f"c{g}", "summary": "c", "agent_type": "w", "prerequisites": [f"a{g}"]},
            {"id": f"d{g}", "summary": "d", "agent_type": "w", "prerequisites": [f"b{g}", f"c{g}"]},
        ]
    deps = {s["id"]: s.get("prerequisites", []) for s in specs}
    out = short_tmp / "order.txt"
    with in_process(short_tmp) as h:
        procs = [subprocess.Popen([sys.executable, HARNESS, "agent", "--type", "w", "--wip", "2", "--socket",
                                   str(h.socket_path), "--out", str(out)], env=child_env()) for _ in range(2)]
        try:
            with Client(h.socket_path) as c:
                wait_for(lambda: len(c.agents()) == 2, timeout=30, what="two agents")
                c.enqueue(specs)
                res = c.wait([s["id"] for s in specs], timeout=60)
                assert not res.timed_out and set(res.statuses.values()) == {"completed"}
                assert c.get("d9").result == {"done": "d9"}
        finally:
            for p in procs:
                p.send_signal(2)
            for p in procs:
                assert p.wait(20) == 0
    lines = [ln.split() for ln in out.read_text().splitlines()]
    order = [ln[0] for ln in lines]
    assert sorted(order) == sorted(deps), "every task ran exactly once"
    pos = {tid: i for i, tid in enumerate(order)}
    for tid, pre in deps.items():
        assert all(pos[p] < pos[tid] for p in pre), f"{tid} ran before one of {pre}"
    assert len({ln[1] for ln in lines}) == 2, "both agents took part"


def test_worker_command_completes_tasks(short_tmp: Path) -> None:
    script = ("import json,sys; t=json.load(sys.stdin); "
              "sys.exit(3) if t['input']=='fail' else print(json.dumps({'twice': t['input']*2}))")
    with in_process(short_tmp) as h:
        env = child_env()
        env["BATON_SOCKET"] = str(h.socket_path)
        proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "worker", "--type", "sh", "--wip", "2", "--",
                                 sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
        try:
            with Client(h.socket_path) as c:
                wait_for(lambda: c.agents(), timeout=30, what="the worker")
                c.enqueue([{"id": "w1", "summary": "s", "agent_type": "sh", "input": 21},
                           {"id": "w2", "summary": "s", "agent_type": "sh", "input": "fail", "max_attempts": 1}])
                res = c.wait(["w1", "w2"], timeout=30)
                assert res.statuses["w1"] == "completed" and res.statuses["w2"] in ("failed", "dead_lettered")
                assert c.get("w1").result == {"twice": 42}
                err = c.get("w2").error or ""
                assert "exit status 3" in err
        finally:
            proc.send_signal(2)
            assert proc.wait(20) == 0


def test_worker_command_handler_units() -> None:
    from baton.worker import CommandHandler, parse_output

    assert parse_output(b'{"a": 1}\n') == {"a": 1}
    assert parse_output(b"plain text\n") == "plain text\n"
    assert parse_output(b"") is None
    with pytest.raises(ValueError, match="CMD ARGS"):
        CommandHandler([])
    task = AgentTask(_task("u1", input=b"\x00\x01"), 1)
    ok = CommandHandler([sys.executable, "-c", "import sys,json; t=json.load(sys.stdin); print(json.dumps(t))"])
    got = asyncio.run(ok(task))
    assert got["id"] == "u1" and got["input"] == "AAE=" and got["token"] == 1  # bytes arrive as base64
    bad = CommandHandler([sys.executable, "-c", "import sys; sys.stderr.write('x'*5000 + 'TAIL'); sys.exit(4)"])
    with pytest.raises(TaskFailed) as ei:
        asyncio.run(bad(task))
    assert "exit status 4" in str(ei.value) and str(ei.value).endswith("TAIL") and len(str(ei.value)) < 2200
    missing = CommandHandler(["/nonexistent/program"])
    with pytest.raises(TaskFailed, match="cannot run"):
        asyncio.run(missing(task))
