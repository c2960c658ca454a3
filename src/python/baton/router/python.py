"""The pure-Python router: docs/protocol.md served from inside the daemon's event loop.

This is the PYTHON_ONLY data plane and the reference the conformance suite (tests/python/
test_router_conformance.py) holds the C router to, so it favours plain code over tricks; it still avoids
per-frame tasks and futures.  The shape of one loop turn:

- readiness callbacks (``add_reader``) read what a socket has, cut it into frames and route each frame at
  once: routing only appends encoded frames to per-connection, per-priority output lists;
- the first callback that queues output schedules one ``_flush`` (``call_soon``); it runs after every callback
  already ready in this turn, so each connection gets one ``send`` per turn with every frame routed to it,
  higher priorities first, and DISPATCHED goes to the coordinator as one frame per turn.

Nothing here imports ``baton.native`` except shared-memory rings (RING_SETUP), which need libbaton; without
it RING_SETUP is answered ``ring_unavailable`` and everything else works.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import msgpack

from baton.errors import FrameError, FrameTooLarge, Truncated
from baton.protocol import (
    CTL_AGENT,
    CTL_CLOSE,
    CTL_CONTINUE_PARENT,
    CTL_PAUSE,
    CTL_REVOKE,
    DEFAULT_RING_CAPACITY,
    EP_COORDINATOR,
    EP_NONE,
    ErrorCode,
    MsgType,
)
from baton.router import RouterGone, RouterOptions
from baton.wire import (
    F_CRC,
    F_ERROR,
    F_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_DEFAULT,
    MAX_PAYLOAD_LIMIT,
    FrameHeader,
    Priority,
    decode,
    encode,
)

__all__ = ["PythonRouterLink"]

log = logging.getLogger("baton.router.python")

_N_PRIO: Final = len(Priority)
_CRITICAL: Final = int(Priority.CRITICAL)
_HIGH: Final = int(Priority.HIGH)
_NORMAL: Final = int(Priority.NORMAL)
_BATCH: Final = int(Priority.BATCH)
_SRC_OFF: Final = 16  # header offsets (include/baton.h): source, then destination
_U64: Final = struct.Struct("<Q")
_U64X2: Final = struct.Struct("<QQ")
_CREDS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_READ_CHUNK: Final = 256 * 1024
_ACCEPT_BURST: Final = 64  # connections accepted per readiness event: keeps one turn bounded
_RING_BATCH: Final = 256
_RING_POLL_S: Final = 0.002  # fallback poll of c2r rings for clients that never ring the doorbell
_RING_RETRY_S: Final = 0.001  # retry a full r2c ring this soon
_CLOSE_FLUSH_S: Final = 5.0  # a closing connection gets this long to take what was queued for it
_SHUTDOWN_FLUSH_S: Final = 2.0
_REPLY_ERR: Final = F_REPLY | F_ERROR
# Continuations (CTL_CONTINUE) kept at most over every parent, as RT_CONT_MAX in the C router: beyond it the
# parent is refused (CONTINUED [parent, 0]).
CONT_MAX: Final = 1 << 20
_STR_HEADS: Final = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}  # fixstr, str8/16/32
_MSGPACK_TRUE: Final = 0xC3

# Types only the coordinator (or the router itself) may send; a client sending one is answered forbidden.
# The notifications 40..44 are here too: a client forging EP_CLOSED or DISPATCHED would corrupt the
# coordinator's view of who holds what.
_PRIVILEGED: Final = frozenset(
    {
        MsgType.WELCOME,
        MsgType.TASK,
        MsgType.RING_READY,
        MsgType.EP_OPEN,
        MsgType.EP_CLOSED,
        MsgType.DISPATCHED,
        MsgType.ROUTER_LOG,
        MsgType.ROUTER_STATS,
        MsgType.CTL_AGENT,
        MsgType.CTL_CLOSE,
        MsgType.CTL_REVOKE,
        MsgType.CTL_PAUSE,
        MsgType.CTL_STATS,
        MsgType.CTL_SHUTDOWN,
        MsgType.CONTINUED,
        MsgType.CTL_CONTINUE,
    }
)
_TO_COORDINATOR: Final = frozenset({MsgType.HELLO, MsgType.CALL, MsgType.RESULT, MsgType.HEARTBEAT})

# ROUTER_STATS "by_pattern" (docs/protocol.md): every frame taken in is counted under a routing pattern and its
# priority.  The pattern follows the type; DIRECT splits into direct (corr 0), request and reply (F_REPLY);
# every type not named here is control.  Same names and rules as the C router (rt_count_in).
_PATTERNS: Final = ("control", "direct", "request", "reply", "publish", "multicast", "broadcast", "task", "result")
_PAT_DIRECT: Final = _PATTERNS.index("direct")
_PAT_REQUEST: Final = _PATTERNS.index("request")
_PAT_REPLY: Final = _PATTERNS.index("reply")
_PRIO_NAMES: Final = ("critical", "high", "normal", "low", "batch")
_NAMED_PATTERNS: Final = {
    int(MsgType.DIRECT): "direct",
    int(MsgType.PUBLISH): "publish",
    int(MsgType.MULTICAST): "multicast",
    int(MsgType.BROADCAST): "broadcast",
    int(MsgType.TASK): "task",
    int(MsgType.RESULT): "result",
}
_PATTERN_OF: Final = tuple(_PATTERNS.index(_NAMED_PATTERNS.get(t, "control")) for t in range(256))  # type -> index

try:  # rings are optional: the Python router must run where libbaton is missing (PYTHON_ONLY)
    from baton import native as _native

    _RINGS = bool(_native.AVAILABLE)
except Exception:  # pragma: no cover - an import failure of any kind only disables rings
    _native = None  # type: ignore[assignment]
    _RINGS = False


def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _frame(
    type: int,
    priority: int = _NORMAL,
    flags: int = 0,
    source: int = EP_NONE,
    destination: int = EP_NONE,
    corr: int = 0,
    payload: bytes = b"",
    send_ts_ns: int = 0,
) -> bytes:
    return encode(FrameHeader(type, priority, flags, source, destination, corr, send_ts_ns), payload)


def _error(type: int, corr: int, priority: int, destination: int, code: str, message: str) -> bytes:
    """An error reply: same type as the frame it answers, F_REPLY|F_ERROR, same correlation id."""
    return _frame(type, priority, _REPLY_ERR, EP_NONE, destination, corr, _pack({"code": code, "message": message}))


def _result_ok(payload: bytes | memoryview) -> bool:
    """Does a RESULT payload release its continuations?  The twin of the C router's bt_result_ok (result_ok.c):

    exactly one msgpack object, a map; keys and values of any type are skipped (Unpacker.skip builds nothing,
    so no UTF-8 or timestamp check can refuse a value); the key "ok" is a str (a bin "ok" is not); the last "ok"
    decides (a dict keeps the last); only msgpack true (0xc3) releases.  Anything msgpack cannot read -- cut,
    0xc1, trailing bytes, nesting beyond its stack (1024 open containers per key or value) -- does not.
    max_buffer_size = the payload's size: no count or length limit of the Unpacker bites before the end of the
    data would, so the limits are the data's, as in C.
    """
    data = bytes(payload)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, unicode_errors="surrogateescape",
                                max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    ok = False
    try:
        for _ in range(unpacker.read_map_header()):
            if data[unpacker.tell()] in _STR_HEADS:
                is_ok = unpacker.unpack() == "ok"  # surrogateescape: a str key never fails to decode
            else:
                is_ok = False
                unpacker.skip()
            value_at = unpacker.tell()
            unpacker.skip()
            if is_ok:
                ok = data[value_at] == _MSGPACK_TRUE
    except (ValueError, IndexError, msgpack.OutOfData):  # FormatError, StackError, BufferFull are ValueErrors
        return False
    return ok and unpacker.tell() == len(data)


def _restamp(raw: memoryview, hdr: FrameHeader, source: int, destination: int | None = None) -> bytes:
    """The frame ``raw`` with ``source`` (and optionally ``destination``) overwritten.

    Patching the header bytes copies the frame once; a frame with F_CRC must be re-encoded instead because
    its checksum covers the header we change.
    """
    if hdr.flags & F_CRC:
        h = FrameHeader(hdr.type, hdr.priority, hdr.flags, source, hdr.destination, hdr.correlation_id,
                        hdr.send_ts_ns)
        if destination is not None:
            h.destination = destination
        return encode(h, raw[HEADER_SIZE:])
    if destination is None:
        return b"".join((raw[:_SRC_OFF], _U64.pack(source), raw[_SRC_OFF + 8 :]))
    return b"".join((raw[:_SRC_OFF], _U64X2.pack(source, destination), raw[_SRC_OFF + 16 :]))


class _Task:
    """One TASK pushed by the coordinator, waiting in a work queue."""

    __slots__ = ("dispatch_id", "priority", "frame", "hdr", "revoked")

    def __init__(self, dispatch_id: int, priority: int, frame: memoryview, hdr: FrameHeader) -> None:
        self.dispatch_id = dispatch_id
        self.priority = priority
        self.frame = frame  # the coordinator's frame as sent; source and destination are set at dispatch
        self.hdr = hdr
        self.revoked = False  # revocation is lazy: the FIFO entry is skipped when it reaches the front


class _Queue:
    """A work queue: per-priority FIFOs of tasks and the agents serving it."""

    __slots__ = ("fifos", "index", "agents", "rr")

    def __init__(self) -> None:
        self.fifos: list[deque[_Task]] = [deque() for _ in range(_N_PRIO)]
        self.index: dict[int, _Task] = {}  # dispatch id -> queued task (revoked ones removed)
        self.agents: list[_Conn] = []
        self.rr = 0  # round-robin cursor into agents

    def pop(self) -> _Task | None:
        """The next task, CRITICAL first, FIFO within a priority."""
        for fifo in self.fifos:
            while fifo:
                task = fifo.popleft()
                if not task.revoked:
                    del self.index[task.dispatch_id]
                    return task
        return None


class _Ring:
    """The router's ends of a client's shared-memory ring pair and their doorbells."""

    __slots__ = ("c2r", "r2c", "c2r_bell", "r2c_bell", "backlog", "carried", "max_record")

    def __init__(self, c2r: Any, r2c: Any, c2r_bell: int, r2c_bell: int) -> None:
        self.c2r = c2r
        self.r2c = r2c
        self.c2r_bell = c2r_bell
        self.r2c_bell = r2c_bell
        # Doorbells as in the C router (docs/router.md): our publishes on r2c ring the client's eventfd when it
        # armed (a client parked on the futex gets the futex wake instead); c2r is armed whenever we go idle
        # (_drain_c2r), so the client's next publish rings ours.
        r2c.set_doorbell(r2c_bell)
        c2r.arm()
        self.backlog: deque[bytes] = deque()  # CRITICAL/HIGH frames waiting for room in r2c, in order
        self.carried = 0  # frames the last write left in backlog (already counted in ring_backlog_events)
        self.max_record = int(r2c.stats()["max_record"])

    def close(self) -> None:
        self.c2r.close()
        self.r2c.close()
        for fd in (self.c2r_bell, self.r2c_bell):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Conn:
    """One accepted client connection (an endpoint)."""

    __slots__ = (
        "ep",
        "sock",
        "fd",
        "chunks",
        "chunks_len",
        "need",
        "out",
        "out_len",
        "partial",
        "fd_msgs",
        "writing",
        "reading",
        "closing",
        "topics",
        "groups",
        "queue",
        "credit",
        "held",
        "ring",
        "close_timer",
    )

    def __init__(self, ep: int, sock: socket.socket) -> None:
        self.ep = ep
        self.sock = sock
        self.fd = sock.fileno()
        # Input: chunks are kept in a list until they can hold the next frame, so a large frame arriving in
        # many reads is joined once (not once per read).
        self.chunks: list[bytes] = []
        self.chunks_len = 0
        self.need = HEADER_SIZE
        # Output: frames routed this turn, per priority; ``partial`` is the unsent tail of the last send
        # (already committed to the byte stream, so it goes first).
        self.out: list[list[bytes]] = [[] for _ in range(_N_PRIO)]
        self.out_len = 0
        self.partial = b""
        self.fd_msgs: deque[tuple[bytes, list[int]]] = deque()  # RING_READY replies carrying descriptors
        self.writing = False
        self.reading = False
        self.closing = False
        self.topics: set[int] = set()
        self.groups: set[int] = set()
        self.queue = 0
        self.credit = 0
        self.held: dict[int, None] = {}  # dispatch ids without a RESULT, in dispatch order
        self.ring: _Ring | None = None
        self.close_timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        backlog = sum(len(f) for f in self.ring.backlog) if self.ring is not None else 0
        return self.out_len + len(self.partial) + backlog


class PythonRouterLink:
    """A pure-Python router inside the current event loop, seen by the coordinator as a RouterLink."""

    def __init__(self, options: RouterOptions, *, max_output: int | None = None) -> None:
        self.options = options
        limit = options.max_payload or MAX_PAYLOAD_DEFAULT
        self._limit = min(limit, MAX_PAYLOAD_LIMIT)
        # A client that lets this much pile up for it is too slow to keep: it is closed (and reported),
        # so one stuck reader cannot grow the daemon without bound.  Room for a few maximal frames.
        self._max_output = max_output if max_output is not None else max(8 << 20, 4 * (self._limit + HEADER_SIZE))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._next_n = 2
        self._topics: dict[int, set[int]] = {}
        self._groups: dict[int, set[int]] = {}
        self._queues: dict[int, _Queue] = {}
        self._paused = False
        self._dispatched: list[int] = []
        # Continuations (CTL_CONTINUE): parent dispatch id -> its TASK frames (header, whole frame), in arrival
        # order; _nconts counts them over every parent, so a RESULT with none stored anywhere skips all of it.
        self._conts: dict[int, list[tuple[FrameHeader, memoryview]]] = {}
        self._nconts = 0
        self._continued: list[int] = []  # this turn's CONTINUED pairs [parent, released, ...]
        self._dirty: set[_Conn] = set()
        self._doomed: list[tuple[_Conn, str]] = []  # closed at the end of the turn (not mid-iteration)
        self._flush_scheduled = False
        self._to_coord: list[list[bytes]] = [[] for _ in range(_N_PRIO)]
        self._to_coord_len = 0
        # The coordinator runs in this process: when it falls behind, the router stops reading clients
        # rather than buffering without bound.
        self._coord_limit = max(32 << 20, 2 * self._max_output)
        self._reads_paused = False
        self._closing: set[_Conn] = set()  # closed endpoints whose sockets still flush their last frames
        self._shutdown_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = False
        self._stopped_event: asyncio.Event | None = None
        self._ring_poll: asyncio.TimerHandle | None = None
        self._ring_retry: asyncio.TimerHandle | None = None
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "accepted",
                "refused",
                "closed",
                "slow_closed",
                "frames_in",
                "bytes_in",
                "frames_out",
                "bytes_out",
                "errors_sent",
                "bad_frames",
                "tasks_queued",
                "dispatched",
                "results",
                "revoked",
                "dropped",
                "rings",
                "ring_backlog_events",
                "coord_ring_full",  # stays 0: the coordinator takes frames in-process, there is no ring to fill
                "continued",
                "continuations_discarded",
            ),
            0,
        )
        # Frames taken in by pattern and priority: [frames, bytes] at _PATTERNS index * _N_PRIO + priority.
        self._by_pattern: list[list[int]] = [[0, 0] for _ in range(len(_PATTERNS) * _N_PRIO)]

    # --- RouterLink ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped_event = asyncio.Event()
        # A duplicate of the daemon's descriptor: closing ours at stop leaves the daemon's open.  O_NONBLOCK
        # lives on the shared file description, so the daemon's socket becomes non-blocking too, which an
        # event-loop daemon wants anyway.
        self._listen = socket.socket(fileno=os.dup(self.options.listen_fd))
        self._listen.setblocking(False)
        self._loop.add_reader(self._listen.fileno(), self._on_accept)
        self._started = True

    def send(self, frames: Sequence[bytes]) -> None:
        if not self.alive:
            raise RouterGone("the Python router has stopped")
        for raw in frames:
            try:
                self._from_coordinator(raw)
            except Exception as exc:  # a router bug must not lose the rest of the coordinator's batch
                log.exception("routing a coordinator frame")
                self._log("error", f"internal error routing a coordinator frame: {exc!r}")
        self._schedule_flush()

    async def recv(self) -> list[bytes]:
        while True:
            if self._to_coord_len:  # every frame counts at least its header
                out: list[bytes] = []
                for lst in self._to_coord:
                    out += lst
                    lst.clear()
                self._to_coord_len = 0
                if self._reads_paused:
                    self._resume_reads()
                return out
            if self._stopped or not self._started:
                raise RouterGone("the Python router has stopped")
            loop = self._loop
            assert loop is not None
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def stop(self) -> None:
        if not self._started:
            return
        if not self._stopped:
            if not self._stopping:
                self._from_coordinator(_frame(MsgType.CTL_SHUTDOWN, source=EP_COORDINATOR))
                self._schedule_flush()
            assert self._stopped_event is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped_event.wait(), _SHUTDOWN_FLUSH_S + 1.0)
            if not self._stopped:
                self._finish()

    @property
    def alive(self) -> bool:
        return self._started and not self._stopped

    def stats(self) -> dict[str, int | dict[str, dict[str, list[int]]]]:
        """Counter name -> value, and "by_pattern" (what ROUTER_STATS carries; docs/protocol.md)."""
        s: dict[str, int | dict[str, dict[str, list[int]]]] = dict(self._stats)
        s["endpoints"] = s["connections"] = len(self._conns)
        s["queued_tasks"] = sum(len(q.index) for q in self._queues.values())
        s["held_tasks"] = sum(len(c.held) for c in self._conns.values())
        s["paused"] = int(self._paused)
        s["continuations"] = self._nconts
        by_pattern: dict[str, dict[str, list[int]]] = {}
        for i, cell in enumerate(self._by_pattern):
            if cell[0]:
                pattern, prio = divmod(i, _N_PRIO)
                by_pattern.setdefault(_PATTERNS[pattern], {})[_PRIO_NAMES[prio]] = list(cell)
        s["by_pattern"] = by_pattern
        return s

    def _count_in(self, hdr: FrameHeader, size: int) -> None:
        """Count one frame taken in (by_pattern) under its pattern and priority, with its full size."""
        pattern = _PATTERN_OF[hdr.type]
        if pattern == _PAT_DIRECT:
            pattern = _PAT_REPLY if hdr.flags & F_REPLY else _PAT_REQUEST if hdr.correlation_id else _PAT_DIRECT
        cell = self._by_pattern[pattern * _N_PRIO + hdr.priority]
        cell[0] += 1
        cell[1] += size

    # --- accepting ----------------------------------------------------------------------------------------

    def _on_accept(self) -> None:
        lsock = self._listen
        if lsock is None or self._stopping:
            return
        for _ in range(_ACCEPT_BURST):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and friends: report, keep serving who we have
                self._log("error", f"accept failed: {exc}")
                break
            self._admit(sock)
        self._schedule_flush()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        except OSError as exc:
            self._log("warning", f"peer credentials unavailable ({exc}); connection dropped")
            sock.close()
            return
        opts = self.options
        if uid != opts.allowed_uid and (opts.allowed_gid is None or gid != opts.allowed_gid):
            self._stats["refused"] += 1
            frame = _error(MsgType.HELLO, 0, _NORMAL, EP_NONE, ErrorCode.REFUSED,
                           f"uid {uid} (gid {gid}) may not use this daemon")
            with contextlib.suppress(OSError):  # a fresh socket has room for one small frame
                sock.send(frame)
            sock.close()
            self._log("warning", f"refused pid {pid} uid {uid} gid {gid}")
            return
        ep = (self.options.generation << 32) | self._next_n
        self._next_n += 1
        conn = _Conn(ep, sock)
        self._conns[ep] = conn
        self._stats["accepted"] += 1
        # CRITICAL so that, within a coordinator batch, it precedes every frame of this endpoint.
        self._coord(_CRITICAL, _frame(MsgType.EP_OPEN, _CRITICAL, 0, ep, EP_COORDINATOR, 0, _pack([pid, uid, gid])))
        self._start_reading(conn)

    # --- input --------------------------------------------------------------------------------------------

    def _start_reading(self, conn: _Conn) -> None:
        if not conn.reading and not conn.closing and not self._reads_paused:
            assert self._loop is not None
            self._loop.add_reader(conn.fd, self._on_readable, conn)
            if conn.ring is not None:
                self._loop.add_reader(conn.ring.c2r_bell, self._on_doorbell, conn)
            conn.reading = True

    def _stop_reading(self, conn: _Conn) -> None:
        if conn.reading:
            assert self._loop is not None
            self._loop.remove_reader(conn.fd)
            if conn.ring is not None:
                self._loop.remove_reader(conn.ring.c2r_bell)
            conn.reading = False

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"read error: {exc}")
            self._schedule_flush()
            return
        if not data:
            self._close(conn, "end of stream")
            self._schedule_flush()
            return
        self._stats["bytes_in"] += len(data)
        conn.chunks.append(data)
        conn.chunks_len += len(data)
        if conn.chunks_len >= conn.need:
            self._parse(conn)
        self._schedule_flush()

    def _parse(self, conn: _Conn) -> None:
        buf = conn.chunks[0] if len(conn.chunks) == 1 else b"".join(conn.chunks)
        mv = memoryview(buf)
        end = len(buf)
        pos = 0
        limit = self._limit
        need = HEADER_SIZE
        while pos < end and not conn.closing:
            try:
                hdr, _payload, size = decode(mv[pos:], limit)
            except Truncated:
                avail = end - pos
                if avail >= HEADER_SIZE:  # the header is good: wait for the whole frame
                    need = HEADER_SIZE + int.from_bytes(mv[pos + 8 : pos + 12], "little")
                break
            except FrameError as exc:
                self._reject(conn, mv[pos:], exc)
                return
            self._route_guarded(conn, hdr, mv[pos : pos + size])
            pos += size
        if conn.closing:
            return
        rest = buf[pos:] if pos else buf
        conn.chunks = [rest] if rest else []
        conn.chunks_len = len(rest)
        conn.need = need

    def _reject(self, conn: _Conn, raw: memoryview, exc: FrameError) -> None:
        """A frame the stream cannot get past: error reply, then close once the reply is flushed.

        too_large answers with the frame's type, priority and correlation id (its header is valid: the codec
        checks the length last); bad_frame has no header to trust, so it answers type 0, corr 0, NORMAL.
        """
        self._stats["bad_frames"] += 1
        if isinstance(exc, FrameTooLarge):
            code, typ, prio, corr = ErrorCode.TOO_LARGE, raw[5], raw[6], _U64.unpack_from(raw, 32)[0]
        else:
            code, typ, prio, corr = ErrorCode.BAD_FRAME, 0, _NORMAL, 0
        self._send_error(conn.ep, typ, corr, prio, code, str(exc))
        self._close(conn, f"{code}: {exc}", flush=True)

    def _on_doorbell(self, conn: _Conn) -> None:
        ring = conn.ring
        if ring is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_read(ring.c2r_bell)
        ring.c2r.disarm()
        self._drain_c2r(conn)
        self._schedule_flush()

    def _drain_c2r(self, conn: _Conn) -> None:
        ring = conn.ring
        while ring is not None and not conn.closing:
            try:
                records = ring.c2r.read_batch(0, _RING_BATCH)
                if not records and ring.c2r.arm():
                    return  # empty and armed: the client's next publish rings the doorbell
            except Exception as exc:  # PeerClosed at the end, CorruptSegment from a hostile client
                self._close(conn, f"c2r ring: {exc}")
                return
            for rec in records:
                mv = memoryview(rec)
                try:
                    hdr, _payload, size = decode(mv, self._limit)
                    if size != len(mv):
                        raise FrameError("a ring record must hold exactly one frame")
                except FrameError as exc:
                    self._reject(conn, mv, exc)
                    return
                self._stats["bytes_in"] += size
                self._route_guarded(conn, hdr, mv)
                if conn.closing:
                    return

    def _poll_rings(self) -> None:
        self._ring_poll = None
        any_ring = False
        for conn in list(self._conns.values()):
            if conn.ring is not None and conn.reading:
                any_ring = True
                self._drain_c2r(conn)
        if any_ring and not self._stopping:
            assert self._loop is not None
            self._ring_poll = self._loop.call_later(_RING_POLL_S, self._poll_rings)
        self._schedule_flush()

    # --- routing ------------------------------------------------------------------------------------------

    def _route_guarded(self, conn: _Conn, hdr: FrameHeader, raw: memoryview) -> None:
        """Route one client frame; a bug while routing it costs that frame (``internal``), not the stream."""
        try:
            self._from_client(conn, hdr, raw)
        except Exception as exc:  # a try block is free in 3.11 until something raises
            log.exception("routing frame type %d from %#x", hdr.type, conn.ep)
            self._log("error", f"internal error routing frame type {hdr.type} from {conn.ep:#x}: {exc!r}")
            self._answer_error(conn.ep, hdr, ErrorCode.INTERNAL, f"router bug: {exc!r}")

    def _from_client(self, conn: _Conn, hdr: FrameHeader, raw: memoryview) -> None:
        self._stats["frames_in"] += 1
        self._count_in(hdr, len(raw))
        t = hdr.type
        ep = conn.ep
        if t in _TO_COORDINATOR:
            prio = hdr.priority
            result = t == MsgType.RESULT and not hdr.flags & F_REPLY
            if result and self._nconts and hdr.correlation_id in self._conts and hdr.correlation_id in conn.held:
                # It settles continuations: CONTINUED (and the DISPATCHED of a released child) go out in the
                # CRITICAL batch at the end of the turn, and the coordinator must see this RESULT before them.
                prio = _CRITICAL
            self._coord(prio, _restamp(raw, hdr, ep))
            if result:
                self._result(conn, hdr.correlation_id, raw[HEADER_SIZE:])
        elif t == MsgType.DIRECT:
            self._direct(ep, hdr, raw)
        elif t in (MsgType.PUBLISH, MsgType.MULTICAST, MsgType.BROADCAST):
            self._fanout(ep, hdr, raw)
        elif MsgType.SUBSCRIBE <= t <= MsgType.LEAVE:
            self._membership(ep, conn, hdr)
        elif t == MsgType.PING:
            self._ping(ep, hdr, raw)
        elif t == MsgType.RING_SETUP:
            self._ring_setup(conn, hdr)
        elif t in _PRIVILEGED:
            self._answer_error(ep, hdr, ErrorCode.FORBIDDEN, f"frame type {t} may only come from the coordinator")
        else:
            self._answer_error(ep, hdr, ErrorCode.UNKNOWN_TYPE, f"frame type {t} is not part of the protocol")

    def _from_coordinator(self, frame: bytes) -> None:
        mv = memoryview(frame)
        try:
            hdr, _payload, size = decode(mv, MAX_PAYLOAD_LIMIT)
            if size != len(mv):
                raise FrameError(f"{len(mv) - size} bytes after the frame")
        except FrameError as exc:
            # The coordinator is trusted; a bad frame from it is a bug to report, not a peer to drop.
            self._log("error", f"bad frame from the coordinator dropped: {exc}")
            return
        self._stats["frames_in"] += 1
        self._count_in(hdr, size)
        t = hdr.type
        ep = EP_COORDINATOR
        if t == MsgType.TASK:
            self._push_task(hdr, mv)
        elif MsgType.CTL_AGENT <= t <= MsgType.CTL_CONTINUE:
            self._control(hdr, mv[HEADER_SIZE:])
        elif t in (MsgType.PUBLISH, MsgType.MULTICAST, MsgType.BROADCAST):
            self._fanout(ep, hdr, mv)
        elif MsgType.SUBSCRIBE <= t <= MsgType.LEAVE:
            self._membership(ep, None, hdr)
        elif t == MsgType.PING:
            self._ping(ep, hdr, mv)
        elif t == MsgType.RING_SETUP:
            self._answer_error(ep, hdr, ErrorCode.RING_UNAVAILABLE, "the coordinator's rings are not the router's")
        elif t == MsgType.DIRECT:
            self._direct(ep, hdr, mv)
        else:
            # WELCOME, CALL and RESULT replies, HELLO errors...: addressed to one endpoint.  A reply to an
            # endpoint that has gone is dropped: there is nobody to tell but the coordinator, which learns
            # of the close from EP_CLOSED anyway.
            if not self._deliver(hdr.destination, hdr.priority, _restamp(mv, hdr, ep)):
                self._stats["dropped"] += 1

    def _direct(self, ep: int, hdr: FrameHeader, raw: memoryview) -> None:
        dst = hdr.destination
        if not self._deliver(dst, hdr.priority, _restamp(raw, hdr, ep)):
            self._answer_error(ep, hdr, ErrorCode.NO_SUCH_ENDPOINT, f"no endpoint {dst}")

    def _fanout(self, ep: int, hdr: FrameHeader, raw: memoryview) -> None:
        t = hdr.type
        frame = _restamp(raw, hdr, ep)
        prio = hdr.priority
        if t == MsgType.PUBLISH:
            for member in self._topics.get(hdr.destination, ()):
                self._deliver(member, prio, frame)
        elif t == MsgType.MULTICAST:
            for member in self._groups.get(hdr.destination, ()):
                if member != ep:
                    self._deliver(member, prio, frame)
        else:  # BROADCAST: every client but the sender; never the coordinator
            for member in self._conns:
                if member != ep:
                    self._deliver(member, prio, frame)

    def _membership(self, ep: int, conn: _Conn | None, hdr: FrameHeader) -> None:
        t = hdr.type
        name = hdr.destination
        table = self._topics if t in (MsgType.SUBSCRIBE, MsgType.UNSUBSCRIBE) else self._groups
        if t in (MsgType.SUBSCRIBE, MsgType.JOIN):
            table.setdefault(name, set()).add(ep)
            if conn is not None:
                (conn.topics if t == MsgType.SUBSCRIBE else conn.groups).add(name)
        else:
            self._drop_member(table, name, ep)
            if conn is not None:
                (conn.topics if t == MsgType.UNSUBSCRIBE else conn.groups).discard(name)
        if hdr.correlation_id and not hdr.flags & F_REPLY:
            # The change is in effect as of this frame: everything routed after it sees it.
            self._deliver(ep, hdr.priority, _frame(t, hdr.priority, F_REPLY, EP_NONE, ep, hdr.correlation_id))

    def _ping(self, ep: int, hdr: FrameHeader, raw: memoryview) -> None:
        if hdr.flags & F_REPLY:  # a PING reply sent to the router: nothing to echo
            return
        self._deliver(
            ep,
            hdr.priority,
            _frame(MsgType.PING, hdr.priority, F_REPLY, EP_NONE, ep, hdr.correlation_id, bytes(raw[HEADER_SIZE:]),
                   hdr.send_ts_ns),
        )

    def _answer_error(self, ep: int, hdr: FrameHeader, code: str, message: str) -> None:
        if hdr.flags & F_ERROR:  # never answer an error with an error: two peers could loop for ever
            self._stats["dropped"] += 1
            return
        self._send_error(ep, hdr.type, hdr.correlation_id, hdr.priority, code, message)

    def _send_error(self, ep: int, type: int, corr: int, priority: int, code: str, message: str) -> None:
        self._stats["errors_sent"] += 1
        self._deliver(ep, priority, _error(type, corr, priority, ep, code, message))

    # --- work queues --------------------------------------------------------------------------------------

    def _push_task(self, hdr: FrameHeader, raw: memoryview) -> None:
        q = self._queue(hdr.destination)
        task = _Task(hdr.correlation_id, hdr.priority, raw, hdr)
        old = q.index.get(task.dispatch_id)
        if old is not None:  # a dispatch id is unique per push; a repeat replaces the queued one
            old.revoked = True
        q.index[task.dispatch_id] = task
        q.fifos[hdr.priority].append(task)
        self._stats["tasks_queued"] += 1
        self._dispatch(q)

    def _dispatch(self, q: _Queue) -> None:
        """Hand out queued tasks while some agent of q has free credit: fewest held first, then round robin."""
        if self._paused:
            return
        agents = q.agents
        while q.index and agents:
            n = len(agents)
            best: _Conn | None = None
            best_i = 0
            for i in range(n):
                j = (q.rr + i) % n
                a = agents[j]
                if len(a.held) < a.credit and (best is None or len(a.held) < len(best.held)):
                    best, best_i = a, j
            if best is None:
                return
            task = q.pop()
            if task is None:
                return
            q.rr = (best_i + 1) % n
            self._hand(best, task)

    def _hand(self, agent: _Conn, task: _Task) -> None:
        agent.held[task.dispatch_id] = None
        self._dispatched += (agent.ep, task.dispatch_id)
        self._stats["dispatched"] += 1
        self._deliver(agent.ep, task.priority, _restamp(task.frame, task.hdr, EP_COORDINATOR, agent.ep))

    def _result(self, conn: _Conn, dispatch_id: int, payload: memoryview) -> None:
        """A RESULT returns its credit and, in the same turn, the agent gets its queue's next task."""
        if dispatch_id not in conn.held:
            return  # not a dispatch of this endpoint (e.g. a result resent after a reconnect): no credit
        del conn.held[dispatch_id]
        self._stats["results"] += 1
        if self._nconts:  # none stored anywhere (the common case): this test is all it costs
            conts = self._conts.pop(dispatch_id, None)
            if conts is not None:
                # First, so a released child can go to this agent (or another with credit) in this turn.
                self._settle(dispatch_id, conts, _result_ok(payload))
        q = self._queues.get(conn.queue) if conn.queue else None
        if q is None or self._paused:
            return
        while len(conn.held) < conn.credit:
            task = q.pop()
            if task is None:
                break
            self._hand(conn, task)

    # --- continuations (CTL_CONTINUE; docs/protocol.md "Continuations") ----------------------------------

    def _report(self, parent: int, released: bool) -> None:
        self._continued += (parent, int(released))
        self._stats["continued" if released else "continuations_discarded"] += 1

    def _settle(self, parent: int, conts: list[tuple[FrameHeader, memoryview]], ok: bool) -> None:
        """parent's continuations (already out of the store): pushed like coordinator TASKs, or dropped --
        and with each dropped one, the continuations registered for it in turn (a chain registered ahead)."""
        self._nconts -= len(conts)
        self._report(parent, ok)
        if ok:
            for hdr, frame in conts:
                self._push_task(hdr, frame)
            return
        dropped = [hdr.correlation_id for hdr, _ in conts]
        while dropped and self._nconts:  # a worklist, not recursion: a chain may be long
            child = dropped.pop()
            more = self._conts.pop(child, None)
            if more is not None:
                self._nconts -= len(more)
                self._report(child, False)
                dropped += (hdr.correlation_id for hdr, _ in more)

    def _discard(self, parent: int) -> None:
        """parent will never report (revoked, its holder gone): drop its continuations, if any, and say so."""
        if self._nconts:
            conts = self._conts.pop(parent, None)
            if conts is not None:
                self._settle(parent, conts, False)

    def _refuse(self, parent: int, why: str) -> None:
        self._log("warning", f"CTL_CONTINUE for dispatch {parent} refused: {why}")
        conts = self._conts.pop(parent, None)
        self._settle(parent, conts or [], False)

    def _known(self, dispatch_id: int) -> bool:
        """Is the dispatch held by an agent, waiting in a queue, or itself a stored continuation (a chain
        registered ahead: it reports once it is released and run, or is discarded with its parent)?"""
        return (any(dispatch_id in c.held for c in self._conns.values())
                or any(dispatch_id in q.index for q in self._queues.values())
                or any(h.correlation_id == dispatch_id for conts in self._conts.values() for h, _ in conts))

    def _continue(self, payload: memoryview) -> None:
        if len(payload) < CTL_CONTINUE_PARENT.size:
            self._log("warning", f"CTL_CONTINUE with a {len(payload)}-byte payload (no parent dispatch id); ignored")
            return
        (parent,) = CTL_CONTINUE_PARENT.unpack_from(payload)
        embedded = payload[CTL_CONTINUE_PARENT.size :]
        try:
            hdr, _body, size = decode(embedded, self._limit)
        except FrameError as exc:
            self._refuse(parent, f"the embedded frame is malformed ({exc})")
            return
        if size != len(embedded):
            self._refuse(parent, "bytes after the embedded frame")
        elif hdr.type != MsgType.TASK:
            self._refuse(parent, "the embedded frame is not a TASK")
        elif self._nconts >= CONT_MAX:
            self._refuse(parent, "too many continuations stored")
        else:
            conts = self._conts.get(parent)
            if conts is None:
                if not self._known(parent):  # it can never report: say so at once
                    self._report(parent, False)
                    return
                conts = self._conts[parent] = []
            # A copy: the coordinator's frame buffer is not ours to keep.
            conts.append((hdr, memoryview(bytes(embedded))))
            self._nconts += 1

    def _queue(self, qid: int) -> _Queue:
        q = self._queues.get(qid)
        if q is None:
            q = self._queues[qid] = _Queue()
        return q

    def _leave_queue(self, conn: _Conn) -> None:
        q = self._queues.get(conn.queue) if conn.queue else None
        if q is not None and conn in q.agents:
            q.agents.remove(conn)

    def _set_agent(self, conn: _Conn, qid: int, credit: int) -> None:
        if conn.queue != qid:
            self._leave_queue(conn)
            conn.queue = qid
            if qid:
                self._queue(qid).agents.append(conn)
        conn.credit = credit if qid else 0
        if qid:
            self._dispatch(self._queues[qid])

    # --- controls -----------------------------------------------------------------------------------------

    def _control(self, hdr: FrameHeader, payload: memoryview) -> None:
        t = hdr.type
        try:
            if t == MsgType.CTL_AGENT:
                ep, qid, credit = CTL_AGENT.unpack(payload)
                conn = self._conns.get(ep)
                if conn is None or conn.closing:
                    self._log("debug", f"CTL_AGENT for endpoint {ep}, which is gone")
                else:
                    self._set_agent(conn, qid, credit)
            elif t == MsgType.CTL_CLOSE:
                (ep,) = CTL_CLOSE.unpack(payload)
                conn = self._conns.get(ep)
                if conn is not None:
                    self._close(conn, "closed by the coordinator", flush=True)
            elif t == MsgType.CTL_REVOKE:
                qid, did = CTL_REVOKE.unpack(payload)
                q = self._queues.get(qid)
                task = q.index.pop(did, None) if q is not None else None
                if task is not None:
                    task.revoked = True
                    self._stats["revoked"] += 1
                    self._discard(did)  # a revoked parent never reports: its continuations go too
                self._coord(hdr.priority, _frame(MsgType.CTL_REVOKE, hdr.priority, F_REPLY, EP_NONE, EP_COORDINATOR,
                                                 hdr.correlation_id, _pack([did, int(task is not None)])))
            elif t == MsgType.CTL_PAUSE:
                (pause,) = CTL_PAUSE.unpack(payload)
                self._paused = bool(pause)
                if not self._paused:
                    for q in self._queues.values():
                        self._dispatch(q)
            elif t == MsgType.CTL_STATS:
                self._coord(hdr.priority, _frame(MsgType.ROUTER_STATS, hdr.priority, F_REPLY, EP_NONE,
                                                 EP_COORDINATOR, hdr.correlation_id, _pack(self.stats())))
            elif t == MsgType.CTL_SHUTDOWN:
                self._shutdown()
            elif t == MsgType.CTL_CONTINUE:
                self._continue(payload)
            else:
                self._answer_error(EP_COORDINATOR, hdr, ErrorCode.UNKNOWN_TYPE, f"no control of type {t}")
        except struct.error as exc:
            self._answer_error(EP_COORDINATOR, hdr, ErrorCode.INVALID_REQUEST, f"control {t}: bad payload ({exc})")

    # --- output -------------------------------------------------------------------------------------------

    def _coord(self, priority: int, frame: bytes) -> None:
        self._to_coord[priority].append(frame)
        self._to_coord_len += len(frame)
        if self._to_coord_len > self._coord_limit and not self._reads_paused:
            self._pause_reads()

    def _deliver(self, ep: int, priority: int, frame: bytes) -> bool:
        """Queue frame for endpoint ep; False when there is no such endpoint (or it is closing)."""
        if ep == EP_COORDINATOR:
            self._coord(priority, frame)
            return True
        conn = self._conns.get(ep)
        if conn is None or conn.closing:
            return False
        ring = conn.ring
        # A frame larger than one ring record can never enter the ring: it takes the socket (the one case
        # where a CRITICAL/HIGH frame may overtake an earlier one of its priority) rather than end the client.
        if ring is not None and priority <= _HIGH and len(frame) <= ring.max_record:
            ring.backlog.append(frame)
        else:
            conn.out[priority].append(frame)
            conn.out_len += len(frame)
        self._dirty.add(conn)
        return True

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _emit_continued(self) -> None:
        """CONTINUED [parent, released, ...] gathered so far: CRITICAL, like DISPATCHED, and before it."""
        if self._continued:
            self._coord(_CRITICAL, _frame(MsgType.CONTINUED, _CRITICAL, 0, EP_NONE, EP_COORDINATOR, 0,
                                          _pack(self._continued)))
            self._continued = []

    def _flush(self) -> None:
        """End of a loop turn: one send per connection, CONTINUED, DISPATCHED and a wake-up for the coordinator."""
        self._flush_scheduled = False
        self._emit_continued()  # before DISPATCHED, which may hand out the children it released
        if self._dispatched:
            self._coord(_CRITICAL, _frame(MsgType.DISPATCHED, _CRITICAL, 0, EP_NONE, EP_COORDINATOR, 0,
                                          _pack(self._dispatched)))
            self._dispatched = []
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            for conn in dirty:
                if conn.sock.fileno() >= 0:
                    self._write(conn)
        while self._doomed:
            doomed, self._doomed = self._doomed, []
            for conn, why in doomed:
                self._stats["slow_closed"] += 1
                self._log("warning", f"endpoint {conn.ep} closed: {why}")
                self._close(conn, why)
        if self._dispatched or self._continued:  # a close above may not dispatch, but never strand a batch
            self._schedule_flush()
        if self._stopping:
            self._maybe_finish()
        if self._to_coord_len and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _write(self, conn: _Conn) -> None:
        if conn.ring is not None and conn.ring.backlog:
            self._write_ring(conn, conn.ring)
        sock = conn.sock
        while True:
            if conn.partial:
                data = conn.partial
            elif conn.fd_msgs:
                frame, fds = conn.fd_msgs[0]
                try:
                    n = socket.send_fds(sock, [frame], fds)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._close(conn, f"write error: {exc}")
                    return
                conn.fd_msgs.popleft()
                conn.partial = frame[n:]
                self._stats["frames_out"] += 1
                self._stats["bytes_out"] += n
                continue
            elif conn.out_len:
                chunks: list[bytes] = []
                for lst in conn.out:  # higher priorities first
                    if lst:
                        self._stats["frames_out"] += len(lst)
                        chunks += lst
                        lst.clear()
                conn.out_len = 0
                data = b"".join(chunks)
            else:
                break
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._close(conn, f"write error: {exc}")
                return
            self._stats["bytes_out"] += n
            conn.partial = data[n:]
            if conn.partial:
                break
        assert self._loop is not None
        blocked = bool(conn.partial or conn.fd_msgs or conn.out_len)
        if blocked and not conn.writing:
            self._loop.add_writer(conn.fd, self._on_writable, conn)
            conn.writing = True
        elif not blocked and conn.writing:
            self._loop.remove_writer(conn.fd)
            conn.writing = False
        if not blocked and conn.closing and not (conn.ring is not None and conn.ring.backlog):
            self._release(conn)
        elif not conn.closing and conn.pending > self._max_output:
            self._doomed.append((conn, f"slow consumer: {conn.pending} bytes waiting"))
            conn.closing = True  # nothing more is routed to it

    def _on_writable(self, conn: _Conn) -> None:
        self._write(conn)
        self._schedule_flush()

    def _write_ring(self, conn: _Conn, ring: _Ring) -> None:
        backlog = ring.backlog
        written = 0
        while backlog:
            batch = list(itertools.islice(backlog, _RING_BATCH))
            try:
                n = ring.r2c.write_batch(batch)
            except BlockingIOError:  # RingFull: keep the order, retry soon; never fall back to the socket
                n = 0
            except Exception as exc:  # FrameTooLarge (a frame bigger than a ring record) or a closed ring
                self._close(conn, f"r2c ring: {exc}")
                return
            for _ in range(n):
                backlog.popleft()
            self._stats["frames_out"] += n
            written += n
            if n < len(batch):
                break
        # ring_backlog_events, as in the C router: a write that left frames sent since the last one waiting
        # (the ring was full); retrying frames already counted is not a new event.
        if len(backlog) > max(ring.carried - written, 0):
            self._stats["ring_backlog_events"] += 1
        ring.carried = len(backlog)
        if backlog and self._ring_retry is None and self._loop is not None:
            self._ring_retry = self._loop.call_later(_RING_RETRY_S, self._retry_rings)

    def _retry_rings(self) -> None:
        self._ring_retry = None
        for conn in list(self._conns.values()):
            if conn.ring is not None and conn.ring.backlog:
                self._dirty.add(conn)
        self._schedule_flush()

    def _pause_reads(self) -> None:
        self._reads_paused = True
        for conn in self._conns.values():
            self._stop_reading(conn)

    def _resume_reads(self) -> None:
        self._reads_paused = False
        for conn in list(self._conns.values()):
            self._start_reading(conn)

    # --- rings --------------------------------------------------------------------------------------------

    def _ring_setup(self, conn: _Conn, hdr: FrameHeader) -> None:
        ep = conn.ep
        if not _RINGS or _native is None:
            self._answer_error(ep, hdr, ErrorCode.RING_UNAVAILABLE, "shared-memory rings need libbaton")
            return
        if conn.ring is not None:
            self._answer_error(ep, hdr, ErrorCode.RING_UNAVAILABLE, "this connection already has its rings")
            return
        cap = hdr.destination or DEFAULT_RING_CAPACITY
        if cap & (cap - 1) or not 4096 <= cap <= 1 << 30:
            self._answer_error(ep, hdr, ErrorCode.RING_UNAVAILABLE,
                               f"ring capacity {cap} must be a power of two in [4096, 2**30]")
            return
        c2r = r2c = None
        bells: list[int] = []
        try:
            c2r = _native.Ring.create(cap, _native.CONSUMER, ep)
            r2c = _native.Ring.create(cap, _native.PRODUCER, ep)
            bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
            ring = _Ring(c2r, r2c, bells[0], bells[1])
        except Exception as exc:
            for r in (c2r, r2c):
                if r is not None:
                    r.close()
            for fd in bells:
                os.close(fd)
            self._answer_error(ep, hdr, ErrorCode.RING_UNAVAILABLE, f"cannot create rings: {exc}")
            return
        conn.ring = ring
        self._stats["rings"] += 1
        reply = _frame(MsgType.RING_READY, hdr.priority, F_REPLY, EP_NONE, ep, hdr.correlation_id)
        # The memfds stay ours (the Ring handles own them); the fds list is only borrowed by sendmsg.
        conn.fd_msgs.append((reply, [c2r.fd, r2c.fd, ring.c2r_bell, ring.r2c_bell]))
        self._dirty.add(conn)
        if conn.reading:
            assert self._loop is not None
            self._loop.add_reader(ring.c2r_bell, self._on_doorbell, conn)
        if self._ring_poll is None and self._loop is not None:
            self._ring_poll = self._loop.call_later(_RING_POLL_S, self._poll_rings)

    # --- closing ------------------------------------------------------------------------------------------

    def _close(self, conn: _Conn, why: str, flush: bool = False) -> None:
        """Forget an endpoint: out of every table, EP_CLOSED to the coordinator; the socket goes now, or once
        what is queued for it is sent when ``flush``."""
        if conn.ep not in self._conns or self._conns[conn.ep] is not conn:
            return
        del self._conns[conn.ep]
        self._stop_reading(conn)
        conn.closing = True
        for tid in conn.topics:
            self._drop_member(self._topics, tid, conn.ep)
        for gid in conn.groups:
            self._drop_member(self._groups, gid, conn.ep)
        self._leave_queue(conn)
        held = list(conn.held)
        conn.held.clear()
        if self._nconts:
            # Its held parents will never report: [parent, 0] for each, ahead of the EP_CLOSED naming them.
            for did in held:
                self._discard(did)
            self._emit_continued()
        self._stats["closed"] += 1
        # BATCH: within a coordinator batch it follows every frame this endpoint sent before closing.
        self._coord(_BATCH, _frame(MsgType.EP_CLOSED, _BATCH, 0, conn.ep, EP_COORDINATOR, 0, _pack(held)))
        log.debug("endpoint %#x closed: %s", conn.ep, why)
        if flush and (conn.pending or conn.fd_msgs) and self._loop is not None:
            # Closing stays in this table only for the flush: _write releases it when the output is empty.
            self._closing.add(conn)
            self._dirty.add(conn)
            conn.close_timer = self._loop.call_later(_CLOSE_FLUSH_S, self._release, conn)
        else:
            self._release(conn)

    def _release(self, conn: _Conn) -> None:
        if conn.close_timer is not None:
            conn.close_timer.cancel()
            conn.close_timer = None
        if conn.sock.fileno() < 0:
            return
        loop = self._loop
        if loop is not None:
            if conn.writing:
                loop.remove_writer(conn.fd)
                conn.writing = False
            self._stop_reading(conn)
        conn.fd_msgs.clear()  # the descriptors belong to conn.ring, closed below
        if conn.ring is not None:  # _stop_reading above took its doorbell off the loop
            conn.ring.close()
            conn.ring = None
        conn.sock.close()
        self._dirty.discard(conn)
        self._closing.discard(conn)

    @staticmethod
    def _drop_member(table: dict[int, set[int]], name: int, ep: int) -> None:
        members = table.get(name)
        if members is not None:
            members.discard(ep)
            if not members:
                del table[name]

    def _shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        loop = self._loop
        assert loop is not None
        if self._listen is not None:
            loop.remove_reader(self._listen.fileno())
        self._conts.clear()  # dropped unreported: the coordinator is stopping
        self._nconts = 0
        for conn in list(self._conns.values()):
            self._close(conn, "router shutting down", flush=True)
        self._shutdown_timer = loop.call_later(_SHUTDOWN_FLUSH_S, self._finish)
        self._schedule_flush()

    def _maybe_finish(self) -> None:
        """After a flush while stopping: done once every closing connection has sent its last frames."""
        if not self._stopped and not self._closing and not self._dirty:
            self._finish()

    def _finish(self) -> None:
        if self._stopped:
            return
        self._stopping = True
        self._stopped = True
        loop = self._loop
        if loop is not None and self._listen is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._listen.fileno())
        for conn in list(self._conns.values()):
            self._close(conn, "router stopped")
        for conn in list(self._closing):  # out of time to flush
            self._release(conn)
        for h in (self._ring_poll, self._ring_retry, self._shutdown_timer):
            if h is not None:
                h.cancel()
        if self._listen is not None:
            self._listen.close()  # our duplicate only; the daemon's descriptor stays open
            self._listen = None
        if self._stopped_event is not None:
            self._stopped_event.set()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _log(self, level: str, message: str) -> None:
        self._coord(_NORMAL, _frame(MsgType.ROUTER_LOG, _NORMAL, 0, EP_NONE, EP_COORDINATOR, 0,
                                    _pack([level, message])))
        self._schedule_flush()
