"""Test helpers for the client library: a scripted stand-in daemon on a real unix socket, and agent processes.

Everything a correct daemon does is tested against the real one (daemon_harness.in_process, ``python -m
baton.daemon``).  ``FakeDaemon`` is only for what a correct daemon never does, scripted frame by frame with
baton.wire on a real listening socket (one thread per connection): HELLO -> WELCOME, CALL -> whatever
``on_call`` returns or a ``Fail`` error reply (any code, or no reply until it returns), TASK pushes, RESULT
acknowledgements that can be withheld (``ack_results``), connections closed at any point; every frame received
is recorded in ``frames``.

Run as a script, ``python client_harness.py agent --type T --socket S [--wip N] [--out FILE]`` is an agent
process whose handler appends ``<task id> <endpoint> <time>`` to FILE and returns ``{"done": id}``.
"""

from __future__ import annotations

import itertools
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from baton import wire
from baton.protocol import MsgType

Call = Callable[[str, dict[str, Any]], Any]
HEARTBEAT_S = 0.05  # what WELCOME tells agents


class Fail(Exception):
    """Raise from a CALL script to send an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Conn:
    def __init__(self, sock: socket.socket, endpoint: int) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.hello: dict[str, Any] | None = None
        self.lock = threading.Lock()
        self.closed = False

    def send(self, mtype: int, payload: Any, *, corr: int = 0, flags: int = 0) -> None:
        body = b"" if payload is None else msgpack.packb(payload, use_bin_type=True)
        data = wire.encode(wire.FrameHeader(mtype, wire.Priority.NORMAL, flags, 1, self.endpoint, corr), body)
        with self.lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakeDaemon:
    def __init__(self, path: str, *, on_call: Call | None = None) -> None:
        self.path = path
        self.on_call: Call = on_call or (lambda op, args: None)
        self.ack_results = True
        self.frames: list[tuple[int, wire.FrameHeader, Any]] = []  # (endpoint, header, decoded payload)
        self.conns: dict[int, Conn] = {}
        self.results: list[Any] = []
        self.cond = threading.Condition()
        self._ids = itertools.count(2)
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lsock.bind(path)
        self._lsock.listen(16)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        for c in list(self.conns.values()):
            c.close()

    def __enter__(self) -> FakeDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for tests --

    def wait(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        with self.cond:
            ok = self.cond.wait_for(predicate, timeout)
        assert ok, "timed out waiting on the fake daemon"
        return ok

    def agents(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.hello and c.hello.get("agent_type") and not c.closed]

    def of_type(self, mtype: int) -> list[tuple[int, wire.FrameHeader, Any]]:
        return [f for f in self.frames if f[1].type == mtype]

    def push_task(self, conn: Conn, task: dict[str, Any], dispatch_id: int) -> None:
        conn.send(MsgType.TASK, task, corr=dispatch_id)

    # -- server --

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self._lsock.accept()
            except OSError:
                return
            conn = Conn(sock, next(self._ids))
            with self.cond:
                self.conns[conn.endpoint] = conn
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Conn) -> None:
        stream = wire.FrameStream()
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    break
                for header, payload in stream.feed(data):
                    self._handle(conn, header, payload)
        except OSError:
            pass
        finally:
            conn.closed = True
            with self.cond:
                self.cond.notify_all()

    def _handle(self, conn: Conn, h: wire.FrameHeader, payload: bytes) -> None:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False) if payload else None
        h.source = conn.endpoint
        with self.cond:
            self.frames.append((conn.endpoint, h, value))
            self.cond.notify_all()
        t = h.type
        if t == MsgType.HELLO:
            conn.hello = value
            conn.send(MsgType.WELCOME, {"endpoint": conn.endpoint, "server": "fake", "max_payload": 1 << 20,
                                        "lease_s": 30.0, "heartbeat_s": HEARTBEAT_S},
                      corr=h.correlation_id, flags=wire.F_REPLY)
        elif t == MsgType.CALL:
            assert isinstance(value, dict)
            try:
                result = self.on_call(value["op"], value["args"])
            except Fail as f:
                conn.send(t, {"code": f.code, "message": f.message}, corr=h.correlation_id,
                          flags=wire.F_REPLY | wire.F_ERROR)
            else:
                conn.send(t, result, corr=h.correlation_id, flags=wire.F_REPLY)
        elif t == MsgType.RESULT:
            with self.cond:
                self.results.append(value)
                self.cond.notify_all()
            if self.ack_results:
                conn.send(t, {"accepted": True, "reason": None}, corr=h.correlation_id, flags=wire.F_REPLY)


def _agent_main(argv: list[str]) -> int:
    import argparse
    import time

    from baton.agent import Agent, AgentTask

    p = argparse.ArgumentParser()
    p.add_argument("--type", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--wip", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    agent = Agent(args.type, wip=args.wip, socket=args.socket, retry_first_connect=True)
    lock = threading.Lock()

    def handle(task: AgentTask) -> Any:
        with lock, open(args.out, "a") as f:
            f.write(f"{task.id} {agent.endpoint} {time.monotonic()}\n")
        return {"done": task.id}

    agent.run(handle)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        raise SystemExit(_agent_main(sys.argv[2:]))
    raise SystemExit("usage: client_harness.py agent --type T --socket S --out FILE [--wip N]")
