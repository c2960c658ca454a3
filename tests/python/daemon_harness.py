"""Helpers for the coordinator and daemon tests: raw-socket protocol clients (baton.wire only, no baton.Client),
an in-process coordinator + router running on a background event loop, and daemon subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from baton import wire
from baton.protocol import MsgType
from conftest import child_env
from conftest import wait_for as wait_until

T = TypeVar("T")


class CallFailed(Exception):
    def __init__(self, code: str, message: str, payload: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.payload = payload


class Frame:
    __slots__ = ("header", "payload")

    def __init__(self, header: wire.FrameHeader, payload: bytes) -> None:
        self.header = header
        self.payload = payload

    @property
    def type(self) -> int:
        return self.header.type

    @property
    def corr(self) -> int:
        return self.header.correlation_id

    @property
    def is_error(self) -> bool:
        return bool(self.header.flags & wire.F_ERROR)

    @property
    def is_reply(self) -> bool:
        return bool(self.header.flags & wire.F_REPLY)

    def body(self) -> Any:
        return msgpack.unpackb(self.payload, raw=False, strict_map_key=False) if self.payload else None

    def __repr__(self) -> str:
        return f"Frame({self.header!r}, {self.payload[:80]!r})"


class RawClient:
    """A blocking protocol client over a plain unix socket.  Frames that arrive while waiting for another one
    are kept in ``inbox`` (TASK frames for agents, for instance)."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.stream = wire.FrameStream()
        self.inbox: list[Frame] = []
        self._corr = 0
        self.endpoint = 0
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_corr(self) -> int:
        self._corr += 1
        return self._corr

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, typ: int, payload: Any = None, *, corr: int = 0, dst: int = 1, flags: int = 0,
             prio: int = wire.Priority.NORMAL, raw: bytes | None = None) -> int:
        body = raw if raw is not None else (b"" if payload is None else msgpack.packb(payload, use_bin_type=True))
        h = wire.FrameHeader(type=typ, priority=prio, flags=flags, destination=dst, correlation_id=corr)
        self.sock.sendall(wire.encode(h, body))
        return corr

    def _read_more(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        if not data:
            raise ConnectionError("the daemon closed the connection")
        for h, p in self.stream.feed(data):
            self.inbox.append(Frame(h, p))
        return True

    def recv(self, pred: Callable[[Frame], bool] = lambda f: True, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, f in enumerate(self.inbox):
                if pred(f):
                    del self.inbox[i]
                    return f
            if not self._read_more(deadline):
                raise TimeoutError(f"no matching frame within the timeout; inbox: {self.inbox[:5]!r}")

    def recv_none(self, pred: Callable[[Frame], bool], timeout: float = 0.3) -> None:
        """Assert that no matching frame arrives within ``timeout`` (used for 'never more than credit')."""
        try:
            f = self.recv(pred, timeout)
        except (TimeoutError, ConnectionError):  # closed (a daemon that finished draining) counts as "none"
            return
        raise AssertionError(f"unexpected frame {f!r}")

    def reply_to(self, typ: int, corr: int, timeout: float | None = None) -> Frame:
        return self.recv(lambda f: f.type == typ and f.corr == corr and f.is_reply, timeout)

    def hello(self, name: str = "test", agent_type: str | None = None, wip: int = 1,
              capabilities: list[str] | None = None) -> dict[str, Any]:
        corr = self.send(MsgType.HELLO, {"v": 1, "name": name, "pid": os.getpid(), "agent_type": agent_type,
                                         "capabilities": capabilities or [], "wip": wip}, corr=self.next_corr())
        f = self.reply_to(MsgType.WELCOME, corr)
        body = f.body()
        self.endpoint = body["endpoint"]
        return body  # type: ignore[no-any-return]

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        corr = self.send(MsgType.CALL, {"op": op, "args": args}, corr=self.next_corr())
        f = self.recv(lambda f: f.type in (MsgType.CALL,) and f.corr == corr and f.is_reply, timeout)
        if f.is_error:
            b = f.body()
            raise CallFailed(b["code"], b["message"], b)
        return f.body()

    # agent side
    def next_task(self, timeout: float | None = None) -> tuple[Frame, dict[str, Any]]:
        f = self.recv(lambda f: f.type == MsgType.TASK, timeout)
        return f, f.body()

    def result(self, task_frame: Frame, task: dict[str, Any], ok: bool = True, result: Any = None,
               error: str = "boom", wait: bool = True, token: int | None = None) -> dict[str, Any] | None:
        body: dict[str, Any] = {"id": task["id"], "token": task["token"] if token is None else token, "ok": ok}
        if ok:
            body["result"] = result
        else:
            body["error"] = error
        self.send(MsgType.RESULT, body, corr=task_frame.corr)
        if not wait:
            return None
        f = self.reply_to(MsgType.RESULT, task_frame.corr)
        assert not f.is_error, f.body()
        return f.body()  # type: ignore[no-any-return]


def daemon_env(tmp: Path) -> dict[str, str]:
    """Environment for a daemon under ``tmp``: its own runtime, state and config directories."""
    env = {k: v for k, v in child_env().items() if not k.startswith("BATON_") and k != "NOTIFY_SOCKET"}
    (tmp / "run").mkdir(exist_ok=True)
    env.update(
        XDG_RUNTIME_DIR=str(tmp / "run"),
        XDG_STATE_HOME=str(tmp / "state"),
        XDG_CONFIG_HOME=str(tmp / "config"),
        BATON_SOCKET=str(tmp / "run" / "baton" / "b.sock"),
        BATON_METRICS_PORT="0",  # any free port: test daemons run side by side (the log names the port)
    )
    return env


# --- in-process coordinator -----------------------------------------------------------------------------------


class InProcess:
    """A coordinator + router (python or native) with its own event loop on a background thread.

    The scheduler lives on that thread (SQLite connections belong to their thread): inspect it with ``run``.
    """

    def __init__(self, tmp: Path, *, router: str = "python", **config: Any) -> None:
        from baton.daemon_config import load_config

        self.tmp = tmp
        self.socket_path = tmp / "c.sock"
        env = {"HOME": str(tmp), "XDG_STATE_HOME": str(tmp / "state"), "XDG_RUNTIME_DIR": str(tmp)}
        self.config = load_config(None, env, {"socket_path": str(self.socket_path), "router": router, **config})
        self.router = router
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.coordinator: Any = None
        self.scheduler: Any = None
        self.link: Any = None
        self.task: Any = None
        self.clients: list[RawClient] = []

    def start(self, **coordinator_kwargs: Any) -> InProcess:
        self.thread.start()
        self.listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listen.bind(str(self.socket_path))
        self.listen.listen(128)
        self.call_soon(self._start(coordinator_kwargs))
        return self

    async def _start(self, kwargs: dict[str, Any]) -> None:
        from baton.coordinator import Coordinator
        from baton.daemon import _Daemon, _open_scheduler
        from baton.router import RouterOptions

        cfg = self.config
        self.scheduler = _open_scheduler(cfg)
        opts = RouterOptions(listen_fd=self.listen.fileno(), allowed_uid=os.getuid(), allowed_gid=None,
                             max_payload=cfg.max_frame_bytes, generation=1)
        daemon = _Daemon(cfg, None, {})
        daemon.options = opts
        self.link = await daemon.modes.start()
        # the daemon falls back to the Python router when the native one cannot start: a test must not
        assert daemon.modes.router_kind == self.router, f"the {self.router} router did not start (see the log)"
        self.coordinator = Coordinator(self.scheduler, self.link, cfg, **kwargs)
        self.task = asyncio.get_running_loop().create_task(self.coordinator.run())

    def call_soon(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def go() -> T:
            return fn()

        return self.call_soon(go(), timeout)  # type: ignore[no-any-return]

    def client(self) -> RawClient:
        c = RawClient(self.socket_path)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()

        async def down() -> None:
            if self.task is not None:
                self.task.cancel()
                try:
                    await self.task
                except BaseException:
                    pass
            if self.link is not None:
                await self.link.stop()
            if self.scheduler is not None:
                self.scheduler.close()

        try:
            self.call_soon(down(), 15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.listen.close()


@contextmanager
def in_process(tmp: Path, *, router: str = "python", coordinator: dict[str, Any] | None = None,
               **config: Any) -> Iterator[InProcess]:
    h = InProcess(tmp, router=router, **config).start(**(coordinator or {}))
    try:
        yield h
    finally:
        h.stop()


# --- daemon subprocesses ----------------------------------------------------------------------------------------


class Daemon:
    """``python -m baton.daemon`` in a subprocess, its stderr (JSON logs) collected to a file."""

    def __init__(self, tmp: Path, env: dict[str, str], args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.env = env
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "baton.daemon", *(args or [])], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=str(tmp))
        self.socket_path = Path(env["BATON_SOCKET"])

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log}")
            try:
                with RawClient(self.socket_path, timeout=2) as c:
                    c.hello("probe")
                return True
            except (OSError, TimeoutError):
                return False

        wait_until(up, timeout, 0.02, "the daemon to answer HELLO")

    def client(self) -> RawClient:
        return RawClient(self.socket_path)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def children(self) -> list[int]:
        """The daemon's child processes (the native router's, when it runs one)."""
        out: list[int] = []
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        return out

    def metrics_port(self) -> int:
        """The port the daemon serves /metrics on: daemon_env asks for any free one (BATON_METRICS_PORT=0, no
        race with another process taking it) and the daemon logs the one it got."""

        def logged() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log}")
            for line in self.log.splitlines():
                if line.startswith("{") and '"metrics_port"' in line:
                    return int(json.loads(line)["metrics_port"])
            return None

        return int(wait_until(logged, 20, 0.02, "the daemon to log its metrics port"))


@contextmanager
def running_daemon(tmp: Path, router: str, **env: str) -> Iterator[Daemon]:
    """A ready daemon process with that router (and these extra environment variables), killed afterwards."""
    e = daemon_env(tmp)
    e["BATON_ROUTER"] = router
    e.update(env)
    d = Daemon(tmp, e)
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


E2E_AGENT = Path(__file__).parent / "e2e_agent.py"


class Agents:
    """Agent processes of one daemon, all logging to one file."""

    def __init__(self, daemon: Daemon, log: Path) -> None:
        self.daemon, self.log, self.procs = daemon, log, list[subprocess.Popen[bytes]]()

    def start(self, agent_type: str, wip: int = 1) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, str(E2E_AGENT), "--type", agent_type, "--socket", str(self.daemon.socket_path),
               "--log", str(self.log), "--wip", str(wip)]
        p = subprocess.Popen(cmd, env=self.daemon.env)
        self.procs.append(p)
        return p

    def entries(self) -> list[tuple[str, str, int, int]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            what, tid, ns, pid = line.split()
            out.append((what, tid, int(ns), int(pid)))
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
