"""Drive a router through RouterLink from synchronous tests: the test plays the coordinator and the clients.

- ``LinkDriver`` runs the link in its own event loop on a background thread (the link must live in a loop,
  the tests want blocking sockets and plain asserts); ``send`` hops onto that loop, a pump task moves every
  batch ``recv`` returns into ``inbox``.
- ``Client`` is a raw unix socket speaking frames with baton.wire; it reads with ``recv_fds`` so descriptors
  passed by RING_READY are kept (a plain recv would drop them).
- Everything waits with a deadline for a predicate to hold (``recv_until``); nothing sleeps and hopes.

Reusable by any test that needs a router, a fake coordinator or raw clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from baton import protocol, wire
from baton.protocol import MsgType
from baton.router import RouterGone, RouterLink, RouterOptions

DEFAULT_TIMEOUT = 5.0
F_REPLY, F_ERROR = wire.F_REPLY, wire.F_ERROR
NORMAL, CRITICAL, HIGH = wire.Priority.NORMAL, wire.Priority.CRITICAL, wire.Priority.HIGH


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


class Frame:
    """One received frame: the header fields, the payload bytes, and the payload unpacked on demand."""

    __slots__ = ("hdr", "payload")

    def __init__(self, hdr: wire.FrameHeader, payload: bytes) -> None:
        self.hdr = hdr
        self.payload = payload

    type = property(lambda self: self.hdr.type)
    priority = property(lambda self: self.hdr.priority)
    flags = property(lambda self: self.hdr.flags)
    source = property(lambda self: self.hdr.source)
    destination = property(lambda self: self.hdr.destination)
    corr = property(lambda self: self.hdr.correlation_id)

    def obj(self) -> Any:
        return msgpack.unpackb(self.payload, raw=False, strict_map_key=False)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & F_ERROR)

    @property
    def code(self) -> str | None:
        """The error code of an error reply, else None."""
        return str(self.obj()["code"]) if self.is_error else None

    def __repr__(self) -> str:
        try:
            name = MsgType(self.type).name
        except ValueError:
            name = str(self.type)
        body = self.payload[:60]
        return (f"<Frame {name} flags={self.flags:#x} src={self.source:#x} dst={self.destination:#x} "
                f"corr={self.corr} {body!r}>")


def frame(
    type: int,
    *,
    priority: int = NORMAL,
    flags: int = 0,
    source: int = 0,
    destination: int = 0,
    corr: int = 0,
    payload: bytes = b"",
) -> bytes:
    """Encode one frame (pure-Python codec)."""
    return wire.encode(wire.FrameHeader(type, priority, flags, source, destination, corr, 0), payload)


def coord_frame(type: int, **kw: Any) -> bytes:
    """A frame as the coordinator sends it (source = EP_COORDINATOR)."""
    return frame(type, source=protocol.EP_COORDINATOR, **kw)


def parse(raw: bytes) -> Frame:
    hdr, payload, size = wire.decode(raw)
    assert size == len(raw), f"{len(raw) - size} stray bytes after a frame from the router"
    return Frame(hdr, bytes(payload))


class _Inbox:
    """Frames received but not yet claimed by a predicate, plus the wait-until-match loop."""

    def __init__(self) -> None:
        self.pending: list[Frame] = []

    def _take(self, pred: Callable[[Frame], bool]) -> Frame | None:
        for i, f in enumerate(self.pending):
            if pred(f):
                return self.pending.pop(i)
        return None

    def _read(self, timeout: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def recv_until(self, pred: Callable[[Frame], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "") -> Frame:
        """The first frame (held or arriving) matching pred; frames it passes over stay held."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._take(pred)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or 'a frame'}; held: {self.pending}"
                )
            self._read(left)

    def poll(self, pred: Callable[[Frame], bool], timeout: float) -> Frame | None:
        """Like recv_until, but None (not a failure) when nothing matched within timeout."""
        got = self._take(pred)
        if got is None:
            self._read(timeout)
            got = self._take(pred)
        return got

    def next(self, timeout: float = DEFAULT_TIMEOUT) -> Frame:
        """The oldest frame not yet claimed."""
        return self.recv_until(lambda f: True, timeout, "any frame")

    def drain_until(
        self, pred: Callable[[Frame], bool], timeout: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> list[Frame]:
        """Every frame up to and including the first matching pred, in arrival order (all claimed)."""
        out: list[Frame] = []
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                f = self.pending.pop(0)
                out.append(f)
                if pred(f):
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or 'a frame'}; got: {out}")
            self._read(left)


class Client(_Inbox):
    """A raw client connection: frames out with ``send``, frames in with ``recv_until``/``next``."""

    def __init__(self, path: str, ep: int = 0) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ep = ep  # filled by Harness.connect from the EP_OPEN the coordinator sees
        self.stream = wire.FrameStream(0)
        self.fds: list[int] = []
        self.eof = False

    def send(self, type: int, **kw: Any) -> None:
        if "obj" in kw:
            kw["payload"] = pack(kw.pop("obj"))
        self.sock.sendall(frame(type, **kw))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, timeout: float) -> None:
        if self.eof:
            raise AssertionError(f"connection {self.ep:#x} closed by the router; held: {self.pending}")
        self.sock.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 8)
        except TimeoutError:
            return
        except ConnectionResetError:
            data, fds = b"", []
        self.fds += fds
        if not data:
            self.eof = True
            return
        for hdr, payload in self.stream.feed(data):
            self.pending.append(Frame(hdr, payload))

    def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """Read until the router closes the connection; returns the frames that came first."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection {self.ep:#x} still open after {timeout}s; held: {self.pending}")
            self._read(left)
        out, self.pending = self.pending, []
        return out

    def ping(self, corr: int, priority: int = NORMAL) -> Frame:
        """A round trip through the router: every frame routed to us before the PING reply is held."""
        self.send(MsgType.PING, corr=corr, priority=priority, payload=b"barrier")
        return self.recv_until(lambda f: f.type == MsgType.PING and f.corr == corr, what=f"PING reply {corr}")

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


class LinkDriver(_Inbox):
    """The test's coordinator: a RouterLink started in a private event loop on a background thread."""

    def __init__(self, make_link: Callable[[], RouterLink], use_uvloop: bool | None = None) -> None:
        super().__init__()
        self._make = make_link
        loop: asyncio.AbstractEventLoop | None = None
        if use_uvloop is None:  # BATON_TEST_LOOP=asyncio runs the link on the stdlib loop instead
            use_uvloop = os.environ.get("BATON_TEST_LOOP", "uvloop") != "asyncio"
        if use_uvloop:
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover
                loop = None
        self.loop = loop or asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-link", daemon=True)
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue()
        self.link: RouterLink | None = None
        self.gone = False
        self._pump: concurrent.futures.Future[None] | None = None

    def _call(self, coro: Any, timeout: float = DEFAULT_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()

        async def _start() -> None:
            self.link = self._make()
            await self.link.start()

        self._call(_start(), 30.0)
        self._pump = asyncio.run_coroutine_threadsafe(self._run_pump(), self.loop)

    async def _run_pump(self) -> None:
        assert self.link is not None
        try:
            while True:
                for raw in await self.link.recv():
                    self._q.put(raw)
        except RouterGone:
            self._q.put(None)
        except BaseException as exc:  # surfaces in the test thread rather than dying silently
            self._q.put(exc)
            raise

    def send(self, frames: Sequence[bytes]) -> None:
        """link.send on the loop thread; returns once the link has taken the frames."""
        assert self.link is not None
        link = self.link

        async def _send() -> None:
            link.send(list(frames))

        self._call(_send())

    def ctl(self, type: int, payload: bytes = b"", corr: int = 0, priority: int = NORMAL) -> None:
        self.send([coord_frame(type, priority=priority, corr=corr, payload=payload)])

    def alive(self) -> bool:
        assert self.link is not None
        link = self.link

        async def _alive() -> bool:
            return link.alive

        return bool(self._call(_alive()))

    def _read(self, timeout: float) -> None:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if item is None:
                self.gone = True
            elif isinstance(item, BaseException):
                raise AssertionError(f"link.recv failed: {item!r}") from item
            else:
                self.pending.append(parse(item))
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return

    def wait_gone(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.gone:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("link.recv never raised RouterGone")
            self._read(left)

    def close(self) -> None:
        if self.link is not None:
            try:
                self._call(self.link.stop(), 30.0)
            except Exception:
                pass
        if self._pump is not None:
            self._pump.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()


class Harness:
    """A listening socket, a router behind a LinkDriver, and helpers to connect clients and push tasks."""

    def __init__(self, directory: str, make_link: Callable[[RouterOptions], RouterLink], *, generation: int = 7,
                 max_payload: int = 64 * 1024, allowed_gid: int | None = None) -> None:
        self.path = os.path.join(directory, f"r{os.getpid()}-{id(self) & 0xFFFFFF:x}.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.options = RouterOptions(
            listen_fd=self.listener.fileno(),
            allowed_uid=os.getuid(),
            allowed_gid=allowed_gid,
            max_payload=max_payload,
            generation=generation,
        )
        self.coord = LinkDriver(lambda: make_link(self.options))
        self.clients: list[Client] = []
        self._corr = 1000

    def start(self) -> Harness:
        self.coord.start()
        return self

    def corr(self) -> int:
        self._corr += 1
        return self._corr

    def connect(self) -> Client:
        """A new client, once the coordinator has seen its EP_OPEN (which gives its endpoint id)."""
        c = Client(self.path)
        self.clients.append(c)
        opened = self.coord.recv_until(lambda f: f.type == MsgType.EP_OPEN, what="EP_OPEN")
        c.ep = opened.source
        c.ep_open = opened  # type: ignore[attr-defined]
        return c

    def agent(self, queue_name: str, credit: int) -> Client:
        c = self.connect()
        self.set_agent(c, queue_name, credit)
        return c

    def set_agent(self, c: Client, queue_name: str | None, credit: int) -> None:
        qid = protocol.queue_id(queue_name) if queue_name else 0
        self.coord.ctl(MsgType.CTL_AGENT, protocol.CTL_AGENT.pack(c.ep, qid, credit))

    def push(self, queue_name: str, dispatch_id: int, priority: int = NORMAL, body: object = None) -> None:
        self.coord.send([task_frame(queue_name, dispatch_id, priority, body)])

    def continue_(self, parent: int, queue_name: str, dispatch_id: int, priority: int = NORMAL) -> None:
        """CTL_CONTINUE: push TASK dispatch_id into queue_name when the holder of parent reports ok."""
        payload = protocol.ctl_continue_payload(parent, task_frame(queue_name, dispatch_id, priority))
        self.coord.ctl(MsgType.CTL_CONTINUE, payload)

    def marker(self, c: Client, corr: int) -> None:
        """A DIRECT from the coordinator to c: arrives after every frame the coordinator caused for c before."""
        self.coord.send([coord_frame(MsgType.DIRECT, destination=c.ep, corr=corr, payload=b"marker")])

    def tasks_before_marker(self, c: Client, corr: int) -> list[Frame]:
        """Send a marker to c and return the TASK frames c receives before it."""
        self.marker(c, corr)
        got = c.drain_until(lambda f: f.type == MsgType.DIRECT and f.corr == corr, what=f"marker {corr}")
        tasks = [f for f in got if f.type == MsgType.TASK]
        c.pending[:0] = [f for f in got[:-1] if f.type != MsgType.TASK]
        return tasks

    def result(self, c: Client, dispatch_id: int, ok: bool = True) -> None:
        c.send(MsgType.RESULT, corr=dispatch_id, destination=protocol.EP_COORDINATOR,
               obj={"id": f"t{dispatch_id}", "token": 1, "ok": ok, "result": None})

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.coord.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def task_frame(queue_name: str, dispatch_id: int, priority: int = NORMAL, body: object = None) -> bytes:
    """A TASK as the coordinator pushes it: destination = the queue id, corr = the dispatch id."""
    payload = pack({"id": f"t{dispatch_id}", "token": 1, "agent_type": queue_name, "attempt": 1,
                    "input": body, "metadata": {}, "lease_s": 30.0, "timeout_s": None})
    return coord_frame(MsgType.TASK, priority=priority, destination=protocol.queue_id(queue_name), corr=dispatch_id,
                       payload=payload)


def dispatched_pairs(frames: Sequence[Frame]) -> list[tuple[int, int]]:
    """(endpoint, dispatch id) pairs from DISPATCHED notifications."""
    out: list[tuple[int, int]] = []
    for f in frames:
        flat = f.obj()
        out += list(zip(flat[0::2], flat[1::2]))
    return out


def too_large_header(type: int, corr: int, payload_len: int) -> bytes:
    """A valid 48-byte header announcing payload_len bytes (the payload is never sent)."""
    hdr = bytearray(frame(type, corr=corr))
    struct.pack_into("<I", hdr, 8, payload_len)
    return bytes(hdr)


# --- peer credentials ---------------------------------------------------------------------------------


def as_nobody(path: str) -> tuple[int, int]:
    """Fork a child that drops to uid/gid 65534, connects to path and copies what it reads (until EOF) to a
    pipe.  Returns (pid, read end).  fork, not exec: the interpreter under /root is not readable by nobody."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(path)
            while chunk := s.recv(65536):
                os.write(wfd, chunk)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    return pid, rfd


def collect_as_nobody(pid: int, rfd: int, timeout: float = 20.0) -> bytes:
    """Everything the child read, once it exited 0 (fails on a timeout or another exit status)."""
    data = b""
    deadline = time.monotonic() + timeout
    reaped = False
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the child never saw the router close its connection"
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                data += chunk
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                assert os.waitstatus_to_exitcode(status) == 0
                return data
            assert time.monotonic() < deadline, "the child did not exit"
            select.select([], [], [], 0.01)
    finally:
        os.close(rfd)
        if not reaped and not os.waitpid(pid, os.WNOHANG)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def read_as_nobody(path: str, timeout: float = 20.0) -> bytes:
    """Everything a client running as uid/gid 65534 reads from the socket at path until it is closed."""
    return collect_as_nobody(*as_nobody(path), timeout)
