"""baton.Client and baton.AsyncClient against the real coordinator + router (in-process, both routers), and
``python -m baton.daemon`` end to end.

FakeDaemon (client_harness.py) stays only for what a correct daemon never does: an unknown error code, a reply
that never comes (call timeout, then a late reply), the connection closed in the middle of a call, and the raw
frames the client writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import baton
from baton import wire
from baton.client import AsyncClient, Client, Message, resolve_socket_path
from baton.client_errors import (
    ConnectionLost,
    Conflict,
    DaemonNotRunning,
    Draining,
    InvalidRequest,
    InvalidTask,
    NoSuchEndpoint,
    NotFound,
    Refused,
    RemoteError,
    RequestTimeout,
    UnknownOp,
)
from baton.errors import FrameTooLarge
from baton.manifest import ImportResult, ValidationReport
from baton.models import Status, TaskSpec
from baton.protocol import EP_COORDINATOR, MsgType, topic_id
from client_fixtures import daemon, fake, router  # noqa: F401 - pytest fixtures
from client_harness import FakeDaemon, Fail
from conftest import child_env, wait_for
from daemon_harness import InProcess, in_process

def _sock(h: InProcess) -> str:
    return str(h.socket_path)


def _mtask(tid: str, deps: list[str] | None = None) -> dict[str, Any]:
    return {"task_id": tid, "title": f"title {tid}", "description": "d", "phase": 1, "slice": "s1",
            "capability_id": "cap", "acceptance_criteria": [{"id": "AC1", "text": "it works"}],
            "depends_on_tasks": deps or [], "risk": "Medium", "est": {"size": "S"}, "related_specs": [],
            "related_adrs": [], "related_guides": [], "test_verification": "pytest", "gap_codes": [],
            "provisional": False, "parallel": True, "conflicts_with": [], "file_scope": []}


# --- no daemon -------------------------------------------------------------------------------------------------


def test_no_daemon_raises_daemon_not_running_with_how_to_start(sock_path: str) -> None:
    with pytest.raises(DaemonNotRunning) as ei:
        Client(sock_path)
    msg = str(ei.value)
    assert sock_path in msg and "baton serve" in msg and "\n" not in msg
    assert isinstance(ei.value, ConnectionRefusedError)

    # A socket file with nobody listening (a crashed daemon) is the same situation.
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()
    with pytest.raises(DaemonNotRunning):
        Client(sock_path)


def test_socket_path_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATON_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resolve_socket_path() == tmp_path / "baton" / "baton.sock"
    monkeypatch.setenv("BATON_SOCKET", "/x/y.sock")
    assert resolve_socket_path() == Path("/x/y.sock")
    assert resolve_socket_path("/explicit.sock") == Path("/explicit.sock")


def test_async_no_daemon(sock_path: str) -> None:
    async def main() -> None:
        with pytest.raises(DaemonNotRunning, match="baton serve"):
            await AsyncClient.connect(sock_path)

    asyncio.run(main())


def test_package_exports_are_lazy() -> None:
    code = "import sys, baton; assert 'baton.client' not in sys.modules; baton.Client; baton.Agent; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    assert baton.AsyncClient is AsyncClient


# --- the real coordinator ----------------------------------------------------------------------------------------


def test_handshake_reads_welcome(daemon: InProcess) -> None:
    with Client(_sock(daemon), name="tester") as a, Client(_sock(daemon)) as b:
        w = a.welcome
        assert w["server"].startswith("baton ") and w["endpoint"] == a.endpoint
        assert w["max_payload"] == daemon.config.max_frame_bytes
        assert w["lease_s"] == daemon.config.lease_s and w["heartbeat_s"] == pytest.approx(w["lease_s"] / 3)
        # Endpoint ids: (router generation << 32) | n, never the coordinator's, one per connection.
        assert a.endpoint >> 32 == 1 and a.endpoint != EP_COORDINATOR and b.endpoint not in (0, a.endpoint)
        assert a.ping() > 0
        assert a.agents() == []  # a plain client is not an agent


def test_calls_and_models(daemon: InProcess) -> None:
    with Client(_sock(daemon)) as c:
        one = c.enqueue(TaskSpec(summary="s", agent_type="impl", id="t1", input=b"\x01bytes",
                                 metadata={"k": [1, 2]}))
        assert one.task_id == "t1" and one.status == Status.READY and one.created
        many = c.enqueue([{"id": "t2", "summary": "b", "agent_type": "impl", "prerequisites": ["t1"]},
                          {"summary": "gen", "agent_type": "other"}])
        assert [r.status for r in many] == [Status.PENDING, Status.READY] and many[1].task_id
        t = c.get("t1")
        # Only the fields given travel and come back as submitted: bytes stay bytes.
        assert t.id == "t1" and t.status == Status.READY and t.input == b"\x01bytes" and t.metadata == {"k": [1, 2]}
        assert [x.id for x in c.list()] == ["t1", "t2", many[1].task_id]  # creation order
        assert [x.id for x in c.list(status="pending")] == ["t2"]
        assert [x.id for x in c.list(agent_type="other")] == [many[1].task_id]
        assert len(c.list(limit=1)) == 1
        qs = c.queue_status()
        assert qs.total == 3 and qs.by_status["ready"] == 2 and qs.by_status["pending"] == 1
        plan = c.execution_plan(agent_type="impl")
        assert plan.batches == [["t1"], ["t2"]] and plan.critical_path == ["t1", "t2"]

        dry = c.cancel("t1", dry_run=True)
        assert dry.dry_run and not dry.changed and dry.cascaded_task_ids == ["t2"]
        assert c.get("t1").status == Status.READY, "a dry run changes nothing"
        w = c.wait(["t1", "t2"], timeout=0.05)
        assert w.timed_out and w.statuses == {"t1": "ready", "t2": "pending"} and not w.done
        real = c.cancel("t1", reason="not needed")
        assert real.changed and not real.dry_run and real.total_cancelled == 2
        w = c.wait(["t1", "t2"], timeout=5)
        assert not w.timed_out and w.done and w.statuses == {"t1": "cancelled", "t2": "cancelled"}

        # A manifest as one line of JSON (longer than a file name may be) and from a file.
        text = json.dumps({"manifest_id": "m1", "tasks": [_mtask("A"), _mtask("B", ["A"])]})
        report = c.import_manifest(text, dry_run=True)
        assert isinstance(report, ValidationReport) and report.ok and report.task_count == 2
        assert c.list(agent_type="implementation") == [], "a dry run imports nothing"
        path = daemon.tmp / "m.json"
        path.write_text(text)
        imported = c.import_manifest(path)
        assert isinstance(imported, ImportResult) and imported.status == "imported" and imported.created == ["A", "B"]
        again = c.import_manifest(str(path))
        assert isinstance(again, ImportResult) and again.status == "unchanged" and again.created == []

        p = c.pulse()
        assert p.total == 5 and p.counts["cancelled"] == 2 and "A" in p.next_eligible
        st = c.stats()
        assert st["daemon"]["tasks"]["cancelled"] == 2 and st["daemon"]["enqueued"] >= 3
        assert st["router"] is not None and st["router"]["accepted"] >= 1
        assert c.agents() == []
        assert c.call("get", id="A")["id"] == "A"  # the raw reply


def test_error_replies_map_to_exception_classes(daemon: InProcess) -> None:
    with Client(_sock(daemon)) as c:
        c.enqueue({"id": "keep", "summary": "s", "agent_type": "impl"})
        with pytest.raises(NotFound) as nf:
            c.get("missing")
        assert nf.value.code == "not_found" and "missing" in nf.value.message and isinstance(nf.value, LookupError)
        with pytest.raises(InvalidTask) as it:
            c.enqueue([{"id": "ok", "summary": "s", "agent_type": "impl"},
                       {"summary": "s", "agent_type": "impl", "base_priority": 99}])
        assert it.value.code == "invalid_task" and isinstance(it.value, ValueError)
        assert "tasks[1].base_priority" in it.value.message  # names the field
        with pytest.raises(Conflict, match="cycle"):
            c.enqueue([{"id": "x", "summary": "s", "agent_type": "impl", "prerequisites": ["y"]},
                       {"id": "y", "summary": "s", "agent_type": "impl", "prerequisites": ["x"]}])
        with pytest.raises(InvalidRequest, match=r"args\.id must be str"):
            c.call("get", id=5)
        with pytest.raises(UnknownOp, match="nope"):
            c.call("nope")
        with pytest.raises(NoSuchEndpoint):
            c.request(c.endpoint + 999, "anyone?", timeout=5)
        # Nothing of a refused batch is stored, and the connection survives error replies.
        assert [t.id for t in c.list()] == ["keep"]

        daemon.run(daemon.coordinator.begin_drain)
        with pytest.raises(Draining) as dr:
            c.enqueue({"id": "late", "summary": "s", "agent_type": "impl"})
        assert dr.value.code == "draining"
        report = c.import_manifest(json.dumps({"manifest_id": "m", "tasks": [_mtask("A")]}), dry_run=True)
        assert isinstance(report, ValidationReport), "a dry run is still answered while draining"
        assert c.get("keep").status == Status.READY


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_refused_connection_raises_refused(short_tmp: Path) -> None:
    # The real router refuses a peer of another uid.  Open the directories so that its peer check is what refuses.
    with in_process(short_tmp, router="python") as h:
        os.chmod(short_tmp, 0o755)
        os.chmod(h.socket_path, 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody, try a Client, report the outcome
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                Client(h.socket_path, connect_timeout=10).close()
                os.write(w, b"connected")
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                os.write(w, f"{type(exc).__name__}|{exc}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            outcome = f.read().decode()
        os.waitpid(pid, 0)
        kind, _, text = outcome.partition("|")
        assert kind == Refused.__name__ and issubclass(Refused, PermissionError), outcome
        assert "uid" in text
        with Client(h.socket_path) as c:  # the owner is still served
            assert c.agents() == []


def test_blocking_pubsub_direct_request_reply(daemon: InProcess) -> None:
    with Client(_sock(daemon)) as a, Client(_sock(daemon)) as b:
        b.subscribe("news")
        b.join("team")
        a.publish("news", {"n": 1})
        a.multicast("team", "hello team")
        a.broadcast([1, 2])
        a.send(b.endpoint, "direct")
        got = [b.receive(5) for _ in range(4)]
        assert all(isinstance(m, Message) for m in got)
        m0, m1, m2, m3 = got
        assert m0 is not None and m0.type == MsgType.PUBLISH and m0.topic == "news" and m0.payload == {"n": 1}
        assert m0.source == a.endpoint
        assert m1 is not None and m1.type == MsgType.MULTICAST and m1.group == "team" and m1.payload == "hello team"
        assert m2 is not None and m2.type == MsgType.BROADCAST and m2.payload == [1, 2]
        assert m3 is not None and m3.type == MsgType.DIRECT and m3.source == a.endpoint and not m3.is_request
        assert m3.payload == "direct"

        # After unsubscribe/leave nothing more arrives from news/team: the marker sent after them (same sender,
        # same priority, so in order) is the next message.
        b.unsubscribe("news")
        b.leave("team")
        a.publish("news", "gone")
        a.multicast("team", "gone")
        a.send(b.endpoint, "marker")
        nxt = b.receive(5)
        assert nxt is not None and nxt.payload == "marker"

        # request/reply between two blocking clients: b serves in a thread.
        served = threading.Thread(target=b.serve_requests, args=(lambda m: {"twice": m.payload * 2}, 1.0))
        served.start()
        assert a.request(b.endpoint, 21, timeout=5) == {"twice": 42}
        served.join(10)
        assert not served.is_alive()
        with pytest.raises(RemoteError) as ei:
            a.request(b.endpoint + 999, "x", timeout=5)
        assert ei.value.code == "no_such_endpoint"


def test_payload_above_max_is_refused_before_sending(router: str, short_tmp: Path) -> None:
    limit = 64 * 1024
    with in_process(short_tmp, router=router, max_frame_bytes=limit) as h, \
            Client(h.socket_path) as c, Client(h.socket_path) as sub:
        assert c.welcome["max_payload"] == limit
        sub.subscribe("t")
        with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
            c.publish("t", b"x" * limit)
        # Had it been sent, the router would have closed the connection (too_large): it is still up, and the
        # biggest payload that fits goes through.
        fits = b"y" * (limit - 16)
        c.publish("t", fits)
        got = sub.receive(5)
        assert got is not None and got.payload == fits
        assert c.list() == []  # the connection still works
        stats = c.stats()["router"]
        assert stats.get("bad_frames", 0) == 0


def test_async_client_calls_subscriptions_and_requests(daemon: InProcess) -> None:
    async def main() -> None:
        async with AsyncClient(_sock(daemon)) as a, AsyncClient(_sock(daemon)) as b:
            # Concurrent calls on one connection are matched by correlation id.
            await a.enqueue([{"id": f"t{i}", "summary": f"s{i}", "agent_type": "impl"} for i in range(20)])
            got = await asyncio.gather(*(a.get(f"t{i}") for i in range(20)))
            assert [(t.id, t.summary) for t in got] == [(f"t{i}", f"s{i}") for i in range(20)]
            with pytest.raises(NotFound):
                await a.get("missing")
            assert (await a.queue_status()).total == 20
            assert (await a.wait(["t0"], timeout=0.01)).timed_out

            sub = await b.subscribe("news")
            seen: list[Any] = []
            await b.subscribe("alerts", lambda m: seen.append(m.payload))
            await a.publish("news", "n1")
            await a.publish("alerts", "a1")
            msg = await asyncio.wait_for(sub.__anext__(), 5)
            assert msg.topic == "news" and msg.payload == "n1" and msg.source == a.endpoint
            for _ in range(500):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == ["a1"]

            async def handler(m: Message) -> Any:
                if m.payload == "boom":
                    raise ValueError("bad input")
                return m.payload.upper()

            b.serve_requests(handler)
            assert await a.request(b.endpoint, "hi", timeout=5) == "HI"
            with pytest.raises(RemoteError, match="ValueError: bad input") as ei:
                await a.request(b.endpoint, "boom", timeout=5)
            assert ei.value.code == "internal"
            await a.send(b.endpoint, "one-way")
            one_way = await b.receive(5)
            assert one_way is not None and one_way.payload == "one-way"

            # Closing the subscription unsubscribes at the router: what a publishes to news afterwards never
            # arrives, the marker sent after it does.
            await sub.close()
            b.serve_requests(None)
            await a.publish("news", "n2")
            await a.send(b.endpoint, "marker")
            nxt = await b.receive(5)
            assert nxt is not None and nxt.payload == "marker"
            assert await a.ping() > 0

    asyncio.run(main())


# --- a scripted daemon: what a correct daemon never does ---------------------------------------------------------


def test_unknown_error_code_is_a_remote_error(fake: FakeDaemon) -> None:
    def newer(op: str, args: dict[str, Any]) -> Any:
        raise Fail("brand_new", "from a newer daemon")

    fake.on_call = newer
    with Client(fake.path) as c, pytest.raises(RemoteError) as ei:
        c.call("x")
    assert type(ei.value) is RemoteError and ei.value.code == "brand_new" and ei.value.message == "from a newer daemon"


def test_call_timeout_then_the_late_reply_is_dropped(fake: FakeDaemon) -> None:
    gate = threading.Event()

    def slow_then_echo(op: str, args: dict[str, Any]) -> Any:
        if op == "slow":
            gate.wait(5)
            return "late"
        return args

    fake.on_call = slow_then_echo
    with Client(fake.path, timeout=0.2) as c:
        with pytest.raises(RequestTimeout, match="within 0.2s"):
            c.call("slow")
        gate.set()
        # The late reply to the timed-out call is dropped, not mistaken for the next one.
        assert c.call("echo", n=2) == {"n": 2}


def test_daemon_closing_mid_call_raises_connection_lost(fake: FakeDaemon) -> None:
    def die(op: str, args: dict[str, Any]) -> Any:
        for conn in list(fake.conns.values()):
            conn.close()
        return None

    fake.on_call = die
    with Client(fake.path) as c, pytest.raises(ConnectionLost):
        c.call("x")


def test_frames_are_well_formed(fake: FakeDaemon) -> None:
    with Client(fake.path, name="tester") as c:
        c.publish("x", 1, priority=wire.Priority.HIGH)
        fake.wait(lambda: fake.of_type(MsgType.PUBLISH))
    _, h, hello = fake.of_type(MsgType.HELLO)[0]
    assert h.correlation_id != 0 and h.destination == EP_COORDINATOR
    assert hello == {"v": 1, "name": "tester", "pid": os.getpid(), "agent_type": None, "capabilities": [], "wip": 0}
    _, h, v = fake.of_type(MsgType.PUBLISH)[0]
    assert h.destination == topic_id("x") and h.priority == wire.Priority.HIGH and h.correlation_id == 0
    assert h.send_ts_ns > 0 and v == 1


# --- end to end: `python -m baton.daemon` in its own process -----------------------------------------------------


def test_real_daemon_client_agent_and_cli(short_tmp: Path) -> None:
    from baton.agent import Agent
    from daemon_harness import running_daemon

    with running_daemon(short_tmp, "python") as d:
        sock = str(d.socket_path)
        agent = Agent("e2e", wip=2, socket=sock)
        th = threading.Thread(target=lambda: asyncio.run(agent.serve(lambda t: {"sq": t.input * t.input})),
                              daemon=True)
        th.start()
        with Client(sock) as c:
            wait_for(lambda: c.agents(), timeout=20, what="the agent")
            c.enqueue([{"id": f"n{i}", "summary": "square", "agent_type": "e2e", "input": i,
                        "prerequisites": [f"n{i - 1}"] if i else []} for i in range(20)])
            res = c.wait([f"n{i}" for i in range(20)], timeout=60)
            assert not res.timed_out and set(res.statuses.values()) == {"completed"}
            assert c.get("n7").result == {"sq": 49}
        proc = subprocess.run([sys.executable, "-m", "baton.cli", "list", "--json", "--socket", sock], env=d.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == 20
        agent.stop()
        th.join(20)
        assert agent.accepted == 20
