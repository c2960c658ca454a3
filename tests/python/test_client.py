"""baton.Client and baton.AsyncClient against a real socket: the scripted FakeDaemon (frame by frame) and,
when the daemon is available, the real one (tests/python/test_client_e2e in test_agent.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

import baton
from baton import wire
from baton.client import AsyncClient, Client, Message, resolve_socket_path
from baton.client_errors import (
    DaemonNotRunning,
    InvalidTask,
    NotFound,
    Refused,
    RemoteError,
    RequestTimeout,
    UnknownOp,
)
from baton.models import Status, TaskSpec
from baton.protocol import EP_COORDINATOR, MsgType, topic_id
from client_harness import FakeDaemon, Fail

NOW = "2025-01-01T00:00:00+00:00"


def _task(tid: str, status: str = "ready") -> dict[str, Any]:
    return {
        "id": tid, "summary": f"task {tid}", "agent_type": "impl", "status": status, "calculated_priority": 5.0,
        "priority_breakdown": {"base": 5, "urgency": 0, "unblock": 0, "source": 0, "aging": 0, "total": 5,
                               "base_priority": 5, "seconds_to_deadline": None, "downstream_depth": 0,
                               "waited_s": 0},
        "created_at": NOW, "updated_at": NOW, "input": b"\x00raw",
    }


def script(op: str, args: dict[str, Any]) -> Any:
    if op == "enqueue":
        return [{"id": t.get("id") or f"gen-{i}", "status": "ready", "created": True} for i, t in
                enumerate(args["tasks"])]
    if op == "get":
        if args["id"] == "missing":
            raise Fail("not_found", "no task 'missing'; list tasks with `baton list`")
        return _task(args["id"])
    if op == "list":
        return [_task("a"), _task("b", "completed")]
    if op == "cancel":
        return {"cancelled_task_id": args["id"], "cascaded_task_ids": [], "total_cancelled": 1,
                "dry_run": args["dry_run"], "changed": not args["dry_run"], "message": "ok"}
    if op == "wait":
        return {i: "completed" for i in args["ids"]} | ({"timed_out": True} if args.get("timeout_s") else {})
    if op == "bad_task":
        raise Fail("invalid_task", "summary: field required")
    if op == "echo":
        return args
    raise Fail("unknown_op", f"unknown op {op!r}")


@pytest.fixture
def fake(sock_path: str) -> Any:
    with FakeDaemon(sock_path, on_call=script) as d:
        yield d


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


def test_handshake_sends_hello_and_reads_welcome(fake: FakeDaemon) -> None:
    with Client(fake.path, name="tester") as c:
        assert c.endpoint == 2 and c.welcome["heartbeat_s"] == 0.2
    _, h, hello = fake.of_type(MsgType.HELLO)[0]
    assert h.correlation_id != 0 and h.destination == EP_COORDINATOR
    assert hello["v"] == 1 and hello["name"] == "tester" and hello["pid"] == os.getpid()
    assert hello["agent_type"] is None and hello["capabilities"] == [] and hello["wip"] == 0


def test_refused_connection_raises_refused(sock_path: str) -> None:
    with FakeDaemon(sock_path, refuse=True):
        with pytest.raises(Refused, match="may not connect"):
            Client(sock_path)


def test_calls_and_models(fake: FakeDaemon) -> None:
    with Client(fake.path) as c:
        one = c.enqueue(TaskSpec(summary="s", agent_type="impl", id="t1", input=b"\x01bytes"))
        assert one.task_id == "t1" and one.status == Status.READY and one.created
        many = c.enqueue([{"summary": "a", "agent_type": "impl"}, {"summary": "b", "agent_type": "impl"}])
        assert [r.task_id for r in many] == ["gen-0", "gen-1"]
        t = c.get("x")
        assert t.id == "x" and t.status == Status.READY and t.input == b"\x00raw"
        assert [t.status for t in c.list(status="ready")] == [Status.READY, Status.COMPLETED]
        cr = c.cancel("x", dry_run=True)
        assert cr.dry_run and not cr.changed
        w = c.wait(["a", "b"], timeout=1.0)
        assert w.timed_out and w.statuses == {"a": "completed", "b": "completed"}
        assert c.wait("a").done
    calls = [v for _, _, v in fake.of_type(MsgType.CALL)]
    sent = calls[0]["args"]["tasks"][0]
    # Only the fields given travel, bytes stay bytes: the payload is kept exactly as submitted.
    assert sent == {"summary": "s", "agent_type": "impl", "id": "t1", "input": b"\x01bytes"}
    assert calls[3]["args"] == {"status": "ready", "limit": 100}
    assert calls[4]["args"] == {"id": "x", "cascade": True, "dry_run": True}
    assert calls[5]["args"] == {"ids": ["a", "b"], "timeout_s": 1.0}


def test_error_replies_map_to_exception_classes(fake: FakeDaemon) -> None:
    with Client(fake.path) as c:
        with pytest.raises(NotFound) as ei:
            c.get("missing")
        assert ei.value.code == "not_found" and "baton list" in ei.value.message
        assert isinstance(ei.value, LookupError)
        with pytest.raises(InvalidTask, match="summary"):
            c.call("bad_task")
        with pytest.raises(UnknownOp):
            c.call("nope")
        # The connection survives error replies.
        assert c.call("echo", x=1) == {"x": 1}


def test_unknown_error_code_is_a_remote_error(fake: FakeDaemon) -> None:
    fake.on_call = lambda op, args: (_ for _ in ()).throw(Fail("brand_new", "from a newer daemon"))
    with Client(fake.path) as c, pytest.raises(RemoteError) as ei:
        c.call("x")
    assert ei.value.code == "brand_new"


def test_call_timeout(fake: FakeDaemon) -> None:
    import threading

    gate = threading.Event()
    fake.on_call = lambda op, args: gate.wait(5)
    with Client(fake.path, timeout=0.2) as c:
        with pytest.raises(RequestTimeout, match="within 0.2s"):
            c.call("slow")
        gate.set()
        fake.on_call = script
        # The late reply to the timed-out call is dropped, not mistaken for the next one.
        assert c.call("echo", n=2) == {"n": 2}


def test_daemon_closing_mid_call_raises_connection_lost(fake: FakeDaemon) -> None:
    from baton.client_errors import ConnectionLost

    def die(op: str, args: dict[str, Any]) -> Any:
        for conn in list(fake.conns.values()):
            conn.close()
        return None

    fake.on_call = die
    with Client(fake.path) as c, pytest.raises(ConnectionLost):
        c.call("x")


def test_blocking_pubsub_direct_request_reply(fake: FakeDaemon) -> None:
    with Client(fake.path) as a, Client(fake.path) as b:
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
        assert m1 is not None and m1.group == "team" and m1.payload == "hello team"
        assert m2 is not None and m2.type == MsgType.BROADCAST and m2.payload == [1, 2]
        assert m3 is not None and m3.source == a.endpoint and not m3.is_request
        assert b.receive(0.05) is None

        # request/reply between two blocking clients: b serves in a thread.
        import threading

        served = threading.Thread(target=b.serve_requests, args=(lambda m: {"twice": m.payload * 2}, 1.0))
        served.start()
        assert a.request(b.endpoint, 21, timeout=5) == {"twice": 42}
        served.join()
        with pytest.raises(RemoteError) as ei:
            a.request(999, "x", timeout=5)
        assert ei.value.code == "no_such_endpoint"
        assert a.ping() > 0


def test_payload_above_max_is_refused_before_sending(fake: FakeDaemon) -> None:
    from baton.errors import FrameTooLarge

    with Client(fake.path) as c:  # the fake says max_payload = 1 MiB
        with pytest.raises(FrameTooLarge, match="max_frame_bytes"):
            c.publish("t", b"x" * (2 << 20))
        assert c.call("echo", ok=True) == {"ok": True}


def test_async_client_calls_subscriptions_and_requests(fake: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(fake.path) as a, AsyncClient(fake.path) as b:
            # Concurrent calls on one connection are matched by correlation id.
            results = await asyncio.gather(*(a.call("echo", i=i) for i in range(20)))
            assert results == [{"i": i} for i in range(20)]
            assert (await a.get("t")).id == "t"
            with pytest.raises(NotFound):
                await a.get("missing")

            sub = await b.subscribe("news")
            seen: list[Any] = []
            await b.subscribe("alerts", lambda m: seen.append(m.payload))
            await a.publish("news", "n1")
            await a.publish("alerts", "a1")
            msg = await asyncio.wait_for(sub.__anext__(), 5)
            assert msg.topic == "news" and msg.payload == "n1"
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
            with pytest.raises(RemoteError, match="ValueError: bad input"):
                await a.request(b.endpoint, "boom", timeout=5)
            await a.send(b.endpoint, "one-way")
            got = await b.receive(5)
            assert got is not None and got.payload == "one-way"
            await sub.close()
            assert topic_id("news") not in next(c for c in fake.conns.values() if c.endpoint == b.endpoint).topics

    asyncio.run(main())


def test_async_no_daemon(sock_path: str) -> None:
    async def main() -> None:
        with pytest.raises(DaemonNotRunning, match="baton serve"):
            await AsyncClient.connect(sock_path)

    asyncio.run(main())


def test_package_exports_are_lazy() -> None:
    import subprocess
    import sys

    from conftest import child_env

    code = "import sys, baton; assert 'baton.client' not in sys.modules; baton.Client; baton.Agent; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    assert baton.AsyncClient is AsyncClient


def test_frames_are_well_formed(fake: FakeDaemon) -> None:
    with Client(fake.path) as c:
        c.publish("x", 1, priority=wire.Priority.HIGH)
        fake.wait(lambda: fake.of_type(MsgType.PUBLISH))
    _, h, v = fake.of_type(MsgType.PUBLISH)[0]
    assert h.destination == topic_id("x") and h.priority == wire.Priority.HIGH and h.correlation_id == 0
    assert h.send_ts_ns > 0 and v == 1


# --- end to end: `python -m baton.daemon` in its own process -------------------------------------------------------


def _have_daemon() -> bool:
    try:
        import baton.daemon  # noqa: F401
        import daemon_harness  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_daemon(), reason="baton.daemon is not there yet")
def test_real_daemon_client_agent_and_cli(short_tmp: Path) -> None:
    import subprocess
    import sys
    import threading

    from daemon_harness import Daemon, daemon_env

    from baton.agent import Agent
    from conftest import wait_for

    env = daemon_env(short_tmp)
    env["BATON_ROUTER"] = "python"
    d = Daemon(short_tmp, env)
    try:
        d.wait_ready()
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
            with pytest.raises(NotFound):
                c.get("nope")
            with pytest.raises(InvalidTask):
                c.enqueue({"summary": "", "agent_type": "e2e"})
        proc = subprocess.run([sys.executable, "-m", "baton.cli", "list", "--json", "--socket", sock], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        import json

        assert len(json.loads(proc.stdout)) == 20
        agent.stop()
        th.join(20)
        assert agent.accepted == 20
    finally:
        d.signal(15)
        try:
            d.wait(30)
        except Exception:
            d.kill()
