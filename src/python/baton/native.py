"""The only module that touches libbaton (``baton._native``, built by cffi).

Everything here turns C's ``-errno`` returns into baton.errors exceptions through one ``check``, owns native
handles explicitly (``close()`` and context managers; ``__del__`` is only a leak guard) and moves data in as
few boundary crossings as possible: one call writes or reads a whole batch into a caller-reused buffer.

If the extension cannot be imported, ``AVAILABLE`` is False and ``LOAD_ERROR`` says why; the daemon then
runs PYTHON_ONLY.  Nothing else in baton imports ``baton._native``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from baton.errors import BatonError, error_from_errno

try:
    from baton._native import ffi, lib  # type: ignore[import-not-found,unused-ignore]

    AVAILABLE = True
    LOAD_ERROR = ""
except ImportError as exc:  # pragma: no cover - exercised by the PYTHON_ONLY tests
    ffi = lib = None
    AVAILABLE = False
    LOAD_ERROR = f"libbaton is not built or failed to load ({exc}); reinstall with `pip install .`"

PRODUCER = 1
CONSUMER = 2
IO_AUTO, IO_EPOLL, IO_URING = 0, 1, 2
IO_BACKEND_NAMES = {IO_EPOLL: "epoll", IO_URING: "io_uring"}
EV_READABLE, EV_SENT, EV_ERROR = 1, 2, 3
WAIT_FOREVER = (1 << 64) - 1
_EAGAIN, _EINTR, _ENOBUFS, _ETIMEDOUT = errno.EAGAIN, errno.EINTR, errno.ENOBUFS, errno.ETIMEDOUT


def _require() -> None:
    if not AVAILABLE:
        raise BatonError(LOAD_ERROR)


def check(rc: int, context: str = "") -> int:
    """Return rc when it is >= 0; otherwise raise the baton.errors class for -rc."""
    if rc < 0:
        raise error_from_errno(-rc, context)
    return rc


def _timeout_ns(timeout: float | None) -> int:
    """Seconds to the C wait argument; None waits for ever.  Per-message callers test None themselves
    first: a function call costs more than the comparison."""
    return WAIT_FOREVER if timeout is None else max(0, int(timeout * 1e9))


def _nothing_or_raise(rc: int, context: str) -> int:
    """A failed batch read: nothing arrived (empty ring, timeout) is 0 records, anything else raises."""
    if rc in (-_EAGAIN, -_ETIMEDOUT):
        return 0
    raise error_from_errno(-rc, context)


def _split(view: Any, lens: Any, n: int) -> list[bytes]:
    """The n records a batch call packed back to back into view, as separate bytes objects."""
    out = []
    off = 0
    for i in range(n):
        ln = lens[i]
        out.append(view[off : off + ln])
        off += ln
    return out


def version() -> str:
    _require()
    return str(ffi.string(lib.bt_version()).decode())


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock of every timestamp libbaton writes."""
    _require()
    return int(lib.bt_now_ns())


# --- frames ------------------------------------------------------------------------------------------------

FrameFields = tuple[int, int, int, int, int, int, int, int, int, int]


def crc32c(data: bytes, crc: int = 0) -> int:
    _require()
    return int(lib.bt_crc32c(crc, bytes(data), len(data)))


def frame_encode(
    type: int,
    priority: int,
    flags: int,
    source: int,
    destination: int,
    correlation_id: int,
    send_ts_ns: int,
    payload: bytes,
) -> bytes:
    """Encode one frame with the C codec (twin of wire.encode)."""
    _require()
    hdr = ffi.new("bt_frame_hdr *")
    hdr.type, hdr.priority, hdr.flags = type, priority, flags
    hdr.source, hdr.destination = source, destination
    hdr.correlation_id, hdr.send_ts_ns = correlation_id, send_ts_ns
    payload = bytes(payload)
    cap = lib.BT_FRAME_HEADER_SIZE + len(payload)
    buf = ffi.new("char[]", cap)
    size = check(lib.bt_frame_encode(buf, cap, hdr, payload, len(payload)), "frame encode")
    return bytes(ffi.buffer(buf, size))


def frame_decode(buf: bytes, max_payload: int = 0) -> FrameFields:
    """Validate and decode the frame at the start of buf with the C codec.

    Returns (type, priority, flags, source, destination, correlation_id, send_ts_ns, crc32c, payload_len,
    frame size); the payload is buf[48:size]."""
    _require()
    data = bytes(buf)
    hdr = ffi.new("bt_frame_hdr *")
    size = check(lib.bt_frame_decode(data, len(data), max_payload, hdr), "frame decode")
    return (
        hdr.type,
        hdr.priority,
        hdr.flags,
        hdr.source,
        hdr.destination,
        hdr.correlation_id,
        hdr.send_ts_ns,
        hdr.crc32c,
        hdr.payload_len,
        size,
    )


class _Handle:
    """Explicit ownership of one native handle: ``close()`` (idempotent), ``with`` blocks, and ``__del__``
    only as a leak guard for owners that forgot."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if lib is not None:
            try:
                self.close()
            except AttributeError:  # __init__ failed before the handle existed
                pass


_H = TypeVar("_H", bound=_Handle)


# --- shared-memory rings -----------------------------------------------------------------------------------

if AVAILABLE:  # bound once: module globals are cheaper than two attribute lookups per message
    _ring_write = lib.bt_ring_write
    _ring_read_batch = lib.bt_ring_read_batch
    _ring_read_wait = lib.bt_ring_read_wait
    _ring_exchange = lib.bt_ring_exchange


class Ring(_Handle):
    """One end of a shared-memory SPSC ring.

    The producer never blocks: ``write`` raises RingFull when the consumer is behind.  The consumer reads
    batches into a buffer it reuses, so one call moves up to ``max_batch`` records.
    """

    __slots__ = ("_r", "role", "_buf", "_buf_len", "_lens", "_max_batch", "_view", "_batch", "_batch_timeout")

    def __init__(self, handle: Any, role: int, max_batch: int = 256) -> None:
        self._r = handle
        self.role = role
        stats = ffi.new("bt_ring_stats *")
        lib.bt_ring_stats_get(handle, stats)
        # Room for a full batch of maximum records would be wasteful; one max record plus slack is enough
        # because read_batch stops at the first record that does not fit and returns what it has.
        self._buf_len = int(max(stats.max_record, 64 * 1024))
        self._buf = ffi.new("char[]", self._buf_len)
        self._view = ffi.buffer(self._buf)
        self._lens = ffi.new("uint32_t[]", max_batch)
        self._max_batch = max_batch
        self._batch = ffi.new("bt_ring_batch *")  # the same destination, described once for exchange()
        self._batch.buf, self._batch.cap, self._batch.lens = self._buf, self._buf_len, self._lens
        self._batch.max_n, self._batch.timeout_ns = max_batch, WAIT_FOREVER
        self._batch_timeout: float | None = None

    @classmethod
    def create(cls, capacity: int = 1 << 20, role: int = PRODUCER, generation: int = 0) -> Ring:
        """Create a sealed memfd segment and return our end of it; pass ``fd`` to the peer."""
        _require()
        out = ffi.new("bt_ring **")
        check(lib.bt_ring_create(capacity, role, generation, out), "ring create")
        return cls(out[0], role)

    @classmethod
    def attach(cls, fd: int, role: int) -> Ring:
        """Attach to a segment received from a peer; the fd may be closed afterwards."""
        _require()
        out = ffi.new("bt_ring **")
        check(lib.bt_ring_attach(fd, role, out), "ring attach")
        return cls(out[0], role)

    @property
    def fd(self) -> int:
        return check(lib.bt_ring_fd(self._handle()), "ring fd")

    def _handle(self) -> Any:
        if self._r is None:
            raise BatonError("ring is closed")
        return self._r

    def set_spin(self, spin_ns: int) -> None:
        lib.bt_ring_set_spin(self._handle(), spin_ns)

    def set_doorbell(self, eventfd: int) -> None:
        """Producer end: ring this eventfd (instead of a futex wake) when the consumer armed; -1 undoes it.
        The eventfd stays the caller's and must outlive this end."""
        lib.bt_ring_set_doorbell(self._handle(), eventfd)

    def arm(self) -> bool:
        """Consumer end, before sleeping on the doorbell: True when armed (the next publish rings it), False
        when a record is already here (read it instead of sleeping).  PeerClosed when the producer closed
        the ring and everything was read."""
        rc = int(lib.bt_ring_arm(self._handle()))
        if rc < 0:
            raise error_from_errno(-rc, "ring arm")
        return rc == 0

    def disarm(self) -> None:
        """Consumer end, awake again: the producer stops ringing until the next arm."""
        lib.bt_ring_disarm(self._handle())

    def producer_gone(self) -> bool:
        """Consumer end: has the producer closed the ring or died (records may remain to be read)?"""
        return check(lib.bt_ring_producer_gone(self._handle()), "ring producer") == 1

    def stats(self) -> dict[str, int]:
        s = ffi.new("bt_ring_stats *")
        lib.bt_ring_stats_get(self._handle(), s)
        return {
            "capacity": s.capacity,
            "generation": s.generation,
            "used": s.used,
            "full_events": s.full_events,
            "max_record": s.max_record,
            "role": s.role,
        }

    # write and read_into are the per-message path: no helper calls, one attribute load for the handle (a
    # closed ring has None there, which must never reach C as NULL).

    def write(self, data: bytes) -> None:
        """Write and publish one record; RingFull when there is no room, FrameTooLarge when it never fits."""
        r = self._r
        if r is None:
            raise BatonError("ring is closed")
        rc = _ring_write(r, data, len(data))
        if rc < 0:
            raise error_from_errno(-rc, "ring write")

    def write_batch(self, payloads: Sequence[bytes]) -> int:
        """Write as many of payloads as fit, publishing once; returns how many were written."""
        n = len(payloads)
        if n == 0:
            return 0
        return self.write_packed(b"".join(payloads), ffi.new("uint32_t[]", [len(p) for p in payloads]), n)

    def write_packed(self, packed: bytes, lens: Any, n: int) -> int:
        """Low-level batch write: payloads back to back in ``packed``, lengths in a cffi uint32_t array."""
        return check(lib.bt_ring_write_batch(self._handle(), packed, lens, n), "ring write")

    def read_batch(self, timeout: float | None = 0.0, max_n: int | None = None) -> list[bytes]:
        """Read up to max_n records.  timeout 0 returns at once, None waits for ever; [] when nothing came.

        Raises PeerClosed once the producer has closed or died and the ring is drained."""
        return _split(self._view, self._lens, self.read_into(timeout, max_n))

    def read_into(self, timeout: float | None = 0.0, max_n: int | None = None) -> int:
        """Read a batch into the reused buffer and return the count; ``buffer``/``lengths`` hold the data
        until the next read.  This is the zero-allocation path for callers that parse in place."""
        r = self._r
        if r is None:
            raise BatonError("ring is closed")
        max_n = self._max_batch if max_n is None else min(max_n, self._max_batch)
        if timeout == 0:
            rc = _ring_read_batch(r, self._buf, self._buf_len, self._lens, max_n)
        else:
            wait_ns = WAIT_FOREVER if timeout is None else _timeout_ns(timeout)
            rc = _ring_read_wait(r, self._buf, self._buf_len, self._lens, max_n, wait_ns)
        return rc if rc >= 0 else _nothing_or_raise(rc, "ring read")

    def exchange(self, out: Ring, data: bytes, timeout: float | None = None) -> int:
        """Write data to ``out``, then wait on this (consumer) ring and read a batch into ``buffer``: one
        native call per round trip.  Returns the count read (0 on timeout); RingFull or FrameTooLarge when the
        write cannot happen, and then nothing is read."""
        r, o = self._r, out._r
        if r is None or o is None:
            raise BatonError("ring is closed")
        if timeout != self._batch_timeout:  # reading the cdata field back would cost more than the call
            self._batch.timeout_ns = _timeout_ns(timeout)
            self._batch_timeout = timeout
        rc: int = _ring_exchange(o, data, len(data), r, self._batch)
        return rc if rc >= 0 else _nothing_or_raise(rc, "ring exchange")

    @property
    def buffer(self) -> Any:
        return self._view

    @property
    def lengths(self) -> Any:
        return self._lens

    def close(self) -> None:
        if self._r is not None:
            lib.bt_ring_close(self._r)
            self._r = None


# --- unix sockets ------------------------------------------------------------------------------------------


def listen(path: str, backlog: int = 128) -> int:
    _require()
    return check(lib.bt_sock_listen(os.fsencode(path), backlog), f"listen on {path}")


def connect(path: str) -> int:
    _require()
    return check(lib.bt_sock_connect(os.fsencode(path)), f"connect to {path}")


def accept(listen_fd: int) -> int | None:
    """A new non-blocking connection, or None when none is pending."""
    rc = lib.bt_sock_accept(listen_fd)
    if rc == -_EAGAIN:
        return None
    return check(rc, "accept")


def send_all(fd: int, data: bytes) -> None:
    check(lib.bt_sock_send_all(fd, bytes(data), len(data)), "send")


def send_fds(sock: int, data: bytes, fds: Iterable[int]) -> int:
    """Send data (at least one byte) with descriptors attached (SCM_RIGHTS); they stay ours."""
    fd_list = list(fds)
    arr = ffi.new("int[]", fd_list or [0])
    return check(lib.bt_sock_send_fds(sock, bytes(data), len(data), arr, len(fd_list)), "send fds")


def recv_fds(sock: int, cap: int = 4096, max_fds: int = 8) -> tuple[bytes, list[int]]:
    """Receive bytes and descriptors; the caller owns (and must close) the descriptors."""
    buf = ffi.new("char[]", cap)
    fds = ffi.new("int[]", max_fds)
    nfds = ffi.new("int *")
    n = check(lib.bt_sock_recv_fds(sock, buf, cap, fds, max_fds, nfds), "receive fds")
    return bytes(ffi.buffer(buf, n)), [fds[i] for i in range(nfds[0])]


def peercred(fd: int) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    cred = ffi.new("bt_peercred *")
    check(lib.bt_sock_peercred(fd, cred), "peer credentials")
    return cred.pid, cred.uid, cred.gid


class FrameReader(_Handle):
    """Validated frames from a byte stream (C reader).  After a stream error every call raises it again:
    the connection cannot be resynchronised and must be closed."""

    __slots__ = ("_rd", "_buf", "_buf_len", "_lens", "_view", "_limit")

    def __init__(self, max_payload: int = 0, batch: int = 256) -> None:
        _require()
        out = ffi.new("bt_frame_reader **")
        check(lib.bt_frame_reader_open(max_payload, out), "frame reader")
        self._rd = out[0]
        self._limit = int((max_payload or lib.BT_FRAME_MAX_PAYLOAD_DEFAULT) + lib.BT_FRAME_HEADER_SIZE)
        self._buf_len = min(self._limit, 64 * 1024)
        self._buf = ffi.new("char[]", self._buf_len)
        self._view = ffi.buffer(self._buf)
        self._lens = ffi.new("uint32_t[]", batch)

    def fill(self, fd: int) -> int:
        """read() once from fd; bytes read (0 when it would block).  PeerClosed at end of stream."""
        rc = lib.bt_frame_reader_fill(self._rd, fd)
        if rc == -_EAGAIN:
            return 0
        return check(rc, "read frames")

    def feed(self, data: bytes) -> None:
        check(lib.bt_frame_reader_feed(self._rd, bytes(data), len(data)), "buffer frames")

    def drain(self) -> list[bytes]:
        """Every complete frame (header and payload as on the wire) buffered so far."""
        out: list[bytes] = []
        while True:
            n = lib.bt_frame_reader_drain(self._rd, self._buf, self._buf_len, self._lens, len(self._lens))
            if n == -_ENOBUFS and self._buf_len < self._limit:
                # A frame larger than the buffer: grow once to the largest frame the reader can hold.
                self._buf_len = self._limit
                self._buf = ffi.new("char[]", self._buf_len)
                self._view = ffi.buffer(self._buf)
                continue
            if check(n, "decode frames") == 0:
                return out
            out += _split(self._view, self._lens, n)

    def close(self) -> None:
        if self._rd is not None:
            lib.bt_frame_reader_close(self._rd)
            self._rd = None


class IoEngine(_Handle):
    """The socket-plane engine: io_uring or epoll, chosen at run time (``backend_name`` says which)."""

    __slots__ = ("_io", "_events", "_inflight")

    def __init__(self, backend: int = IO_AUTO, entries: int = 256, max_events: int = 256) -> None:
        _require()
        out = ffi.new("bt_io **")
        check(lib.bt_io_open(backend, entries, out), "open I/O engine")
        self._io = out[0]
        self._events = ffi.new("bt_io_event[]", max_events)
        # Send buffers must outlive the kernel's use of them: keep each until its SENT event arrives.
        self._inflight: dict[int, bytes] = {}

    @property
    def backend(self) -> int:
        return int(lib.bt_io_backend(self._io))

    @property
    def backend_name(self) -> str:
        return IO_BACKEND_NAMES[self.backend]

    def watch(self, fd: int, tag: int) -> None:
        check(lib.bt_io_watch(self._io, fd, tag), "watch fd")

    def unwatch(self, fd: int, tag: int) -> None:
        check(lib.bt_io_unwatch(self._io, fd, tag), "unwatch fd")

    def send(self, fd: int, data: bytes, tag: int) -> None:
        """Queue a send; its result arrives as (tag, EV_SENT, bytes or -errno) from wait()."""
        if tag in self._inflight:
            raise BatonError(f"tag {tag} already has a send in flight; use one tag per outstanding send")
        data = bytes(data)
        check(lib.bt_io_send(self._io, fd, data, len(data), tag), "queue send")
        self._inflight[tag] = data

    def wait(self, timeout_ms: int = -1) -> list[tuple[int, int, int]]:
        """Submit queued work and wait for events: a list of (tag, kind, result)."""
        n = lib.bt_io_wait(self._io, self._events, len(self._events), timeout_ms)
        if n == -_EINTR:  # a signal (or epoll's spurious wake after io_uring use): nothing happened
            return []
        check(n, "wait for I/O")
        out = []
        for i in range(n):
            ev = self._events[i]
            if ev.kind == EV_SENT:
                self._inflight.pop(ev.tag, None)
            out.append((int(ev.tag), int(ev.kind), int(ev.result)))
        return out

    def close(self) -> None:
        if self._io is not None:
            lib.bt_io_close(self._io)
            self._io = None
            self._inflight.clear()



# --- the router ----------------------------------------------------------------------------------------------

MSG_NAMES = (
    "HELLO", "WELCOME", "CALL", "DIRECT", "PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE", "JOIN", "LEAVE", "MULTICAST",
    "BROADCAST", "TASK", "RESULT", "HEARTBEAT", "RING_SETUP", "RING_READY", "PING", "EP_OPEN", "EP_CLOSED",
    "DISPATCHED", "ROUTER_LOG", "ROUTER_STATS", "CTL_AGENT", "CTL_CLOSE", "CTL_REVOKE", "CTL_PAUSE", "CTL_STATS",
    "CTL_SHUTDOWN", "CONTINUED", "CTL_CONTINUE",
)


def protocol_constants() -> dict[str, int]:
    """The C twins of baton.protocol: ``BT_MSG_*`` by name (HELLO, ...), plus EP_NONE and EP_COORDINATOR."""
    _require()
    out = {name: int(getattr(lib, f"BT_MSG_{name}")) for name in MSG_NAMES}
    out["EP_NONE"] = int(lib.BT_EP_NONE)
    out["EP_COORDINATOR"] = int(lib.BT_EP_COORDINATOR)
    return out


def ctl_payload_size(name: str) -> int:
    """BT_CTL_<name>_SIZE: the binary payload size of a coordinator control (AGENT, CLOSE, REVOKE, PAUSE,
    CONTINUE_PARENT: the fixed head of CTL_CONTINUE)."""
    _require()
    return int(getattr(lib, f"BT_CTL_{name}_SIZE"))


def result_ok(payload: bytes) -> bool:
    """The C router's verdict on a RESULT payload (bt_result_ok): a msgpack map whose last "ok" is true.  For
    tests that hold the Python router's twin (router/python.py) to the same answers."""
    _require()
    return bool(lib.bt_result_ok(payload, len(payload)))


class Router(_Handle):
    """libbaton's router (bt_router_*): ``run()`` routes until CTL_SHUTDOWN or until the coordinator's ring
    ends, without entering Python per frame (the GIL is released for the whole call).  Every descriptor
    stays the caller's and must stay open until ``close()``."""

    __slots__ = ("_r",)

    def __init__(
        self,
        *,
        listen_fd: int,
        coord_in_ring_fd: int,
        coord_out_ring_fd: int,
        coord_in_bell: int,
        coord_out_bell: int,
        allowed_uid: int,
        allowed_gid: int | None,
        max_payload: int,
        generation: int,
        backend: int = IO_AUTO,
        spin_ns: int = 50_000,
        out_limit: int = 0,
    ) -> None:
        _require()
        cfg = ffi.new("bt_router_config *")
        cfg.listen_fd, cfg.coord_in_ring_fd, cfg.coord_out_ring_fd = listen_fd, coord_in_ring_fd, coord_out_ring_fd
        cfg.coord_in_bell, cfg.coord_out_bell = coord_in_bell, coord_out_bell
        cfg.allowed_uid = allowed_uid
        cfg.allowed_gid = -1 if allowed_gid is None else allowed_gid
        cfg.max_payload, cfg.generation = max_payload, generation
        cfg.io_backend, cfg.spin_ns, cfg.out_limit = backend, spin_ns, out_limit
        out = ffi.new("bt_router **")
        check(lib.bt_router_open(cfg, out), "router open")
        self._r = out[0]

    @property
    def backend_name(self) -> str:
        return IO_BACKEND_NAMES[int(lib.bt_router_backend(self._handle()))]

    def _handle(self) -> Any:
        if self._r is None:
            raise BatonError("router is closed")
        return self._r

    def run(self) -> int:
        """Route until stopped: 0 after CTL_SHUTDOWN, -EPIPE when the coordinator's ring closed or its process
        died, -EPROTO when that ring is corrupt."""
        return int(lib.bt_router_run(self._handle()))

    def close(self) -> None:
        if self._r is not None:
            lib.bt_router_close(self._r)
            self._r = None
