"""The client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for the daemon's socket.

Both speak docs/protocol.md over the unix socket with the pure-Python codec (baton.wire): HELLO/WELCOME, then
CALL operations (enqueue, get, list, ...) and messaging (publish/subscribe, request/reply, direct, groups,
broadcast).  ``_Core`` is the sans-I/O part the two share (frame building, name ids, reply decoding); the
blocking client reads its socket only while a caller waits, the async one runs a reader task that routes
every frame as it arrives.  ``baton.agent.Agent`` builds on ``_AsyncConnection``.

Incoming messages nobody asked for yet (a PUBLISH, a DIRECT request...) wait in a bounded inbox.  When a
consumer falls that far behind, the oldest message is dropped and counted (``dropped``), rather than
stopping the reader: a blocked reader would also stop the replies a caller is waiting for.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import inspect
import itertools
import logging
import os
import socket as _socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

import msgpack
from pydantic import BaseModel, ValidationError

from baton import wire
from baton.client_errors import (
    ConnectionLost,
    DaemonNotRunning,
    RemoteError,
    RequestTimeout,
    error_for,
)
from baton.errors import FrameError, FrameTooLarge
from baton.models import CancelResult, EnqueueResult, ExecutionPlan, Status, Task, TaskSpec
from baton.protocol import EP_COORDINATOR, PROTOCOL_VERSION, REPLY_TYPE, ErrorCode, MsgType, group_id, topic_id

if TYPE_CHECKING:
    from baton.manifest import ImportResult, ValidationReport
    from baton.reports import Pulse, QueueStatus

__all__ = [
    "Client",
    "AsyncClient",
    "Message",
    "WaitResult",
    "resolve_socket_path",
    "Priority",
]

log = logging.getLogger("baton.client")

Priority = wire.Priority
SpecLike = TaskSpec | Mapping[str, Any]
M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT: Final = 30.0  # seconds for one CALL; wait() adds its own timeout to this
INBOX_LIMIT: Final = 10_000
_READ_SIZE: Final = 256 * 1024
_HEADER_HELLO: Final = int(MsgType.HELLO)
_TO_COORDINATOR: Final = frozenset({MsgType.HELLO, MsgType.CALL, MsgType.RESULT, MsgType.HEARTBEAT})
# Requests answered by a frame of another type; their error replies keep the request's type.
_MESSAGE_TYPES: Final = frozenset({MsgType.DIRECT, MsgType.PUBLISH, MsgType.MULTICAST, MsgType.BROADCAST})


def resolve_socket_path(socket: str | os.PathLike[str] | None = None) -> Path:
    """The socket to connect to: the explicit argument, else ``BATON_SOCKET``, else where the daemon listens
    by default (daemon_config.default_socket_path, the same function the daemon uses)."""
    if socket is not None and str(socket):
        return Path(socket).expanduser()
    env = os.environ.get("BATON_SOCKET", "")
    if env:
        return Path(env).expanduser().absolute()
    from baton.daemon_config import default_socket_path

    return default_socket_path(os.environ)


# --- payloads --------------------------------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    # Values msgpack has no type for, as the daemon's JSON-mode models would send them.
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire: use JSON/msgpack values or bytes")


def pack(obj: Any) -> bytes:
    """msgpack-encode a payload (bytes stay bytes; datetimes, enums and models become their JSON form)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, default=_pack_default)
    return data


def unpack(data: bytes) -> Any:
    if not data:
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _spec_dict(spec: SpecLike) -> dict[str, Any]:
    """One TaskSpec as the CALL sends it: only the fields given (the daemon fills the defaults).  ``input``
    and ``metadata`` go as Python values, not JSON mode, so bytes arrive as bytes: a payload is kept exactly
    as submitted."""
    if isinstance(spec, TaskSpec):
        out = spec.model_dump(mode="json", exclude_unset=True)
        for key in ("input", "metadata"):
            if key in spec.model_fields_set:
                out[key] = getattr(spec, key)
        return out
    if isinstance(spec, Mapping):
        return dict(spec)
    raise TypeError(f"a task spec must be a TaskSpec or a mapping of its fields, got {type(spec).__name__}")


def _spec_items(specs: SpecLike | Sequence[SpecLike]) -> tuple[bool, list[SpecLike]]:
    """(whether one spec was given, the specs as a list)."""
    if isinstance(specs, (TaskSpec, Mapping)):
        return True, [specs]
    if isinstance(specs, (str, bytes)):
        raise TypeError("enqueue takes a TaskSpec, a mapping of its fields, or a list of them; got a string")
    return False, list(specs)


def _model(cls: type[M], data: Any) -> M:
    """Validate a reply into its model.  Fields a newer daemon added are dropped (logged), so an older client
    keeps working; anything else that does not fit is a protocol mismatch worth a clear error."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        if isinstance(data, Mapping):
            extra = [k for k in data if k not in cls.model_fields]
            if extra:
                log.debug("ignoring fields %s of %s this client does not know", extra, cls.__name__)
                try:
                    return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})
                except ValidationError:
                    pass
        raise RemoteError(
            ErrorCode.INTERNAL,
            f"the daemon's reply does not fit {cls.__name__}: {exc.errors(include_url=False)[:3]}; "
            "the client and daemon versions probably differ",
        ) from None


class WaitResult:
    """What ``wait`` returns: each task's status, and whether the timeout passed before all were terminal."""

    __slots__ = ("statuses", "timed_out")

    def __init__(self, statuses: dict[str, str], timed_out: bool) -> None:
        self.statuses = statuses
        self.timed_out = timed_out

    @property
    def done(self) -> bool:
        return not self.timed_out

    def __repr__(self) -> str:
        return f"WaitResult(statuses={self.statuses!r}, timed_out={self.timed_out})"

    @classmethod
    def from_reply(cls, ids: Sequence[str], reply: Any) -> WaitResult:
        # docs/protocol.md: "{id: status} once all are terminal, or at timeout (then timed_out: true)".  The
        # statuses may come flat or under "statuses"; "timed_out" is a flag beside them unless it is one of
        # the ids asked for.
        if not isinstance(reply, Mapping):
            raise RemoteError(ErrorCode.INTERNAL, f"wait: expected a map of id -> status, got {reply!r}")
        flat = dict(reply)
        timed_out = False
        if "timed_out" not in ids and "timed_out" in flat:
            timed_out = bool(flat.pop("timed_out"))
        if isinstance(flat.get("statuses"), Mapping) and "statuses" not in ids:
            flat = dict(flat["statuses"])
        return cls({str(k): str(v) for k, v in flat.items()}, timed_out)


def _enqueue_results(reply: Any) -> list[EnqueueResult]:
    if not isinstance(reply, list):
        raise RemoteError(ErrorCode.INTERNAL, f"enqueue: expected a list of results, got {reply!r}")
    return [EnqueueResult(r["id"], bool(r.get("created", True)), Status(r["status"])) for r in reply]


def _import_result(reply: Any) -> ImportResult | ValidationReport | Any:
    from baton.manifest import ImportResult, ValidationReport

    if isinstance(reply, Mapping):
        if "status" in reply and "report" in reply:
            return _model(ImportResult, reply)
        if "issues" in reply:
            return _model(ValidationReport, reply)
    return reply


# --- messages --------------------------------------------------------------------------------------------------


class Message:
    """One frame addressed to this client: a PUBLISH, DIRECT (one-way or request), MULTICAST or BROADCAST.

    ``payload`` is the decoded msgpack value; ``topic``/``group`` are the names this client subscribed or
    joined with (the wire only carries their ids), None when the client does not know the name.  Answer a
    request (``is_request``) with ``client.reply(message, value)``.
    """

    __slots__ = ("type", "source", "destination", "correlation_id", "flags", "priority", "send_ts_ns", "payload",
                 "topic", "group")

    def __init__(self, header: wire.FrameHeader, payload: Any, topic: str | None = None,
                 group: str | None = None) -> None:
        self.type = MsgType(header.type) if header.type in MsgType._value2member_map_ else header.type
        self.source = header.source
        self.destination = header.destination
        self.correlation_id = header.correlation_id
        self.flags = header.flags
        self.priority = header.priority
        self.send_ts_ns = header.send_ts_ns
        self.payload = payload
        self.topic = topic
        self.group = group

    @property
    def is_request(self) -> bool:
        return self.type == MsgType.DIRECT and self.correlation_id != 0 and not self.flags & wire.F_REPLY

    def __repr__(self) -> str:
        name = self.type.name if isinstance(self.type, MsgType) else str(self.type)
        where = f", topic={self.topic!r}" if self.topic else f", group={self.group!r}" if self.group else ""
        return f"Message({name}, source={self.source}{where}, corr={self.correlation_id}, payload={self.payload!r})"


# --- the sans-I/O core -----------------------------------------------------------------------------------------


def hello_payload(name: str | None, agent_type: str | None = None, capabilities: Iterable[str] = (),
                  wip: int = 0) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "name": name or f"baton-client-{os.getpid()}",
        "pid": os.getpid(),
        "agent_type": agent_type,
        "capabilities": list(capabilities),
        "wip": wip,
    }


class _Core:
    """Frame building and reply decoding shared by the blocking and the async transports."""

    __slots__ = ("stream", "max_payload", "endpoint", "welcome", "topics", "groups", "_corr")

    def __init__(self) -> None:
        self.stream = wire.FrameStream(wire.MAX_PAYLOAD_LIMIT)
        # Until WELCOME says otherwise, the daemon's default limit: a larger frame would close the connection.
        self.max_payload = wire.MAX_PAYLOAD_DEFAULT
        self.endpoint = 0
        self.welcome: dict[str, Any] = {}
        self.topics: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        self._corr = itertools.count(1)

    def next_corr(self) -> int:
        return next(self._corr)

    def frame(self, mtype: int, payload: bytes, *, dest: int = 0, corr: int = 0, flags: int = 0,
              priority: int = Priority.NORMAL) -> bytes:
        if len(payload) > self.max_payload:
            raise FrameTooLarge(
                f"a {MsgType(mtype).name} payload of {len(payload)} bytes exceeds the daemon's limit of "
                f"{self.max_payload} (max_frame_bytes): send less per message or raise the limit"
            )
        if not dest and mtype in _TO_COORDINATOR:
            dest = EP_COORDINATOR  # the table's "client -> coordinator"; the router may route by type alone
        # send_ts_ns on CLOCK_MONOTONIC: one clock for every process on the machine, so latencies can be read
        # off frames from other processes.
        header = wire.FrameHeader(mtype, priority, flags, 0, dest, corr, time.monotonic_ns())
        return wire.encode(header, payload)

    def accept_welcome(self, payload: Any) -> None:
        if not isinstance(payload, Mapping) or "endpoint" not in payload:
            raise RemoteError(ErrorCode.BAD_FRAME, f"WELCOME without an endpoint: {payload!r}")
        self.welcome = dict(payload)
        self.endpoint = int(payload["endpoint"])
        limit = payload.get("max_payload")
        if isinstance(limit, int) and limit > 0:
            self.max_payload = limit

    def message(self, header: wire.FrameHeader, payload: bytes) -> Message:
        t = header.type
        return Message(
            header,
            unpack(payload),
            topic=self.topics.get(header.destination) if t == MsgType.PUBLISH else None,
            group=self.groups.get(header.destination) if t == MsgType.MULTICAST else None,
        )


def reply_value(header: wire.FrameHeader, payload: bytes) -> Any:
    """A reply's value, or raise the error it carries."""
    value = unpack(payload)
    if header.flags & wire.F_ERROR:
        if isinstance(value, Mapping):
            raise error_for(value.get("code"), value.get("message"))
        raise error_for(ErrorCode.INTERNAL, f"malformed error reply {value!r}")
    return value


def _error_payload(code: str, message: str) -> bytes:
    return pack({"code": code, "message": message})


def _is_refusal(header: wire.FrameHeader) -> bool:
    """The router's ``refused`` error: type HELLO, correlation id 0, sent before it closes the connection."""
    return header.type == _HEADER_HELLO and header.correlation_id == 0 and bool(header.flags & wire.F_ERROR)


def _log_unsolicited_error(header: wire.FrameHeader, payload: bytes) -> None:
    try:
        value = unpack(payload)
    except Exception:  # noqa: BLE001 - only for the log line
        value = payload[:200]
    name = MsgType(header.type).name if header.type in MsgType._value2member_map_ else str(header.type)
    log.warning("error about a %s frame sent without a correlation id: %r", name, value)


# --- blocking client -------------------------------------------------------------------------------------------


class Client:
    """A blocking connection to the daemon.

    ``Client()`` connects at once (``DaemonNotRunning`` if nothing listens).  Calls are serialised by a lock,
    so one Client may be shared by threads, one call at a time.  Messages (subscriptions, direct messages,
    requests to serve) are read while a call waits and handed out by ``receive``.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, name: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, connect_timeout: float = 5.0) -> None:
        import threading

        self.socket_path = resolve_socket_path(socket)
        self.timeout = timeout
        self._core = _Core()
        self._lock = threading.RLock()
        self._inbox: collections.deque[Message] = collections.deque()
        self._replies: dict[tuple[int, int], tuple[wire.FrameHeader, bytes]] = {}
        self._waiting: set[tuple[int, int]] = set()
        self._refused: tuple[wire.FrameHeader, bytes] | None = None  # the router's "refused", until raised
        self.dropped = 0
        self._sock: _socket.socket | None = _connect_blocking(self.socket_path, connect_timeout)
        try:
            welcome = self._roundtrip(MsgType.HELLO, pack(hello_payload(name)), timeout=connect_timeout)
            self._core.accept_welcome(welcome)
        except BaseException:
            self.close()
            raise

    # -- connection --

    @property
    def endpoint(self) -> int:
        """This connection's endpoint id (others send DIRECT messages and requests to it)."""
        return self._core.endpoint

    @property
    def welcome(self) -> dict[str, Any]:
        return self._core.welcome

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self.close()

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionLost(f"the connection to {self.socket_path} is closed")
        try:
            self._sock.settimeout(None)
            self._sock.sendall(data)
        except OSError as exc:
            self._read_leftovers()
            self.close()
            self._raise_if_refused()
            raise ConnectionLost(f"the daemon at {self.socket_path} closed the connection ({exc})") from None

    def _read_leftovers(self) -> None:
        """Route what the peer sent before it closed (a ``refused`` error, typically); never blocks."""
        sock = self._sock
        if sock is None:
            return
        try:
            sock.setblocking(False)
            while data := sock.recv(_READ_SIZE):
                for header, payload in self._core.stream.feed(data):
                    self._route(header, payload)
        except (OSError, FrameError):
            pass

    def _read_some(self, deadline: float | None) -> None:
        """Read one chunk (waiting at most until deadline) and route the frames it completes."""
        sock = self._sock
        if sock is None:
            raise ConnectionLost(f"the connection to {self.socket_path} is closed")
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            data = sock.recv(_READ_SIZE)
        except TimeoutError:
            raise
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"the connection to the daemon at {self.socket_path} failed ({exc})") from None
        if not data:
            self.close()
            raise ConnectionLost(
                f"the daemon at {self.socket_path} closed the connection (it stopped, or refused a frame)"
            )
        try:
            frames = self._core.stream.feed(data)
        except FrameError as exc:
            self.close()
            raise ConnectionLost(f"the daemon sent a malformed frame ({exc}); connection closed") from None
        for header, payload in frames:
            self._route(header, payload)

    def _route(self, header: wire.FrameHeader, payload: bytes) -> None:
        if header.flags & (wire.F_REPLY | wire.F_ERROR):
            key = (header.type, header.correlation_id)
            if key in self._waiting:
                self._replies[key] = (header, payload)
            elif _is_refusal(header):
                # The router's "refused" greeting: it closes right after, so surface it to the waiting call.
                self._refused = (header, payload)
            elif header.flags & wire.F_ERROR:
                _log_unsolicited_error(header, payload)
            else:
                log.debug("dropping a late %s reply (corr %d)", header.type, header.correlation_id)
        elif header.type in _MESSAGE_TYPES:
            try:
                msg = self._core.message(header, payload)
            except (ValueError, msgpack.UnpackException) as exc:
                log.warning("dropping a message with an undecodable payload from endpoint %d: %s",
                            header.source, exc)
                return
            if len(self._inbox) >= INBOX_LIMIT:
                self._inbox.popleft()
                self.dropped += 1
            self._inbox.append(msg)
        else:
            log.debug("ignoring an unexpected %s frame", header.type)

    def _wait_reply(self, mtype: int, corr: int, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = {(mtype, corr), (REPLY_TYPE.get(mtype, mtype), corr)}
        self._waiting |= keys
        try:
            return self._wait_reply_loop(keys, deadline, timeout)
        finally:
            self._waiting -= keys
            for key in keys:
                self._replies.pop(key, None)

    def _wait_reply_loop(self, keys: set[tuple[int, int]], deadline: float | None, timeout: float | None) -> Any:
        while True:
            for key in keys:
                got = self._replies.pop(key, None)
                if got is not None:
                    return reply_value(*got)
            self._raise_if_refused()
            try:
                self._read_some(deadline)
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply from the daemon at {self.socket_path} within {timeout}s; it may be overloaded "
                    "or stuck (check its log), or pass a longer timeout"
                ) from None
            except ConnectionLost:
                self._raise_if_refused()
                raise

    def _raise_if_refused(self) -> None:
        """Raise the router's ``refused`` error if it sent one: it says why it closes the connection."""
        refused, self._refused = self._refused, None
        if refused is not None:
            reply_value(*refused)

    def _roundtrip(self, mtype: int, payload: bytes, *, dest: int = 0, timeout: float | None = None,
                   priority: int = Priority.NORMAL) -> Any:
        with self._lock:
            corr = self._core.next_corr()
            self._send(self._core.frame(mtype, payload, dest=dest, corr=corr, priority=priority))
            return self._wait_reply(mtype, corr, timeout)

    def call(self, op: str, timeout: float | None = -1.0, **args: Any) -> Any:
        """Send one CALL and return its result (plain msgpack); raise the error it carries."""
        t = self.timeout if timeout == -1.0 else timeout
        return self._roundtrip(MsgType.CALL, pack({"op": op, "args": args}), timeout=t)

    # -- CALL operations --

    @overload
    def enqueue(self, specs: SpecLike) -> EnqueueResult: ...
    @overload
    def enqueue(self, specs: Sequence[SpecLike]) -> builtins.list[EnqueueResult]: ...

    def enqueue(self, specs: SpecLike | Sequence[SpecLike]) -> EnqueueResult | builtins.list[EnqueueResult]:
        """Submit one task (returns its EnqueueResult) or a batch (a list, in order; all or nothing)."""
        one, items = _spec_items(specs)
        results = _enqueue_results(self.call("enqueue", tasks=[_spec_dict(s) for s in items]))
        return results[0] if one else results

    def get(self, task_id: str) -> Task:
        return _model(Task, self.call("get", id=task_id))

    def list(self, status: str | None = None, agent_type: str | None = None, limit: int = 100) -> builtins.list[Task]:
        reply = self.call("list", **_opt(status=status, agent_type=agent_type), limit=limit)
        return [_model(Task, t) for t in reply]

    def queue_status(self) -> QueueStatus:
        from baton.reports import QueueStatus

        return _model(QueueStatus, self.call("queue_status"))

    def cancel(self, task_id: str, *, cascade: bool = True, dry_run: bool = False,
               reason: str | None = None) -> CancelResult:
        reply = self.call("cancel", id=task_id, cascade=cascade, dry_run=dry_run, **_opt(reason=reason))
        return _model(CancelResult, reply)

    def execution_plan(self, agent_type: str | None = None, wip: int | None = None) -> ExecutionPlan:
        return _model(ExecutionPlan, self.call("plan", **_opt(agent_type=agent_type, wip=wip)))

    def wait(self, ids: str | Sequence[str], timeout: float | None = None) -> WaitResult:
        """Block until every task is terminal, or timeout seconds pass (``timed_out`` then says so)."""
        id_list = [ids] if isinstance(ids, str) else list(ids)
        call_timeout = None if timeout is None else timeout + (self.timeout or DEFAULT_TIMEOUT)
        reply = self.call("wait", timeout=call_timeout, ids=id_list, **_opt(timeout_s=timeout))
        return WaitResult.from_reply(id_list, reply)

    def import_manifest(self, source: str | os.PathLike[str], *, dry_run: bool = False) -> Any:
        """Import a manifest from a path or from its text; returns the ImportResult (ValidationReport for a
        dry run, when the daemon sends one)."""
        return _import_result(self.call("import_manifest", text=_manifest_text(source), dry_run=dry_run))

    def pulse(self) -> Pulse:
        from baton.reports import Pulse

        return _model(Pulse, self.call("pulse"))

    def agents(self) -> builtins.list[dict[str, Any]]:
        return list(self.call("agents"))

    def stats(self) -> dict[str, Any]:
        return dict(self.call("stats"))

    def mode(self) -> dict[str, Any]:
        """The daemon's execution mode: {"mode", "reason", "router", "since", "switches", "history"}."""
        return dict(self.call("mode"))

    def set_mode(self, mode: str) -> dict[str, Any]:
        """Force INTELLIGENT or PYTHON_ONLY: {"mode": current, "switching_to": mode or None}.  The switch
        follows the reply and closes every connection (clients and agents reconnect)."""
        return dict(self.call("mode_set", mode=mode))

    # -- messaging --

    def _fire(self, mtype: int, dest: int, payload: bytes, priority: int = Priority.NORMAL, corr: int = 0,
              flags: int = 0) -> None:
        with self._lock:
            self._send(self._core.frame(mtype, payload, dest=dest, corr=corr, flags=flags, priority=priority))

    def publish(self, topic: str, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        self._fire(MsgType.PUBLISH, topic_id(topic), pack(msg), priority)

    def subscribe(self, topic: str) -> None:
        """Subscribe (returns once the router has it in effect); messages then come from ``receive``."""
        tid = topic_id(topic)
        self._core.topics[tid] = topic
        self._roundtrip(MsgType.SUBSCRIBE, b"", dest=tid, timeout=self.timeout)

    def unsubscribe(self, topic: str) -> None:
        tid = topic_id(topic)
        self._roundtrip(MsgType.UNSUBSCRIBE, b"", dest=tid, timeout=self.timeout)
        self._core.topics.pop(tid, None)

    def join(self, group: str) -> None:
        gid = group_id(group)
        self._core.groups[gid] = group
        self._roundtrip(MsgType.JOIN, b"", dest=gid, timeout=self.timeout)

    def leave(self, group: str) -> None:
        gid = group_id(group)
        self._roundtrip(MsgType.LEAVE, b"", dest=gid, timeout=self.timeout)
        self._core.groups.pop(gid, None)

    def multicast(self, group: str, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        self._fire(MsgType.MULTICAST, group_id(group), pack(msg), priority)

    def broadcast(self, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        self._fire(MsgType.BROADCAST, 0, pack(msg), priority)

    def send(self, endpoint: int, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        """A one-way DIRECT message to another endpoint."""
        self._fire(MsgType.DIRECT, endpoint, pack(msg), priority)

    def request(self, endpoint: int, msg: Any, timeout: float | None = -1.0, *,
                priority: int = Priority.NORMAL) -> Any:
        """Send a DIRECT request and return the peer's reply value (raise the error it replied with)."""
        t = self.timeout if timeout == -1.0 else timeout
        return self._roundtrip(MsgType.DIRECT, pack(msg), dest=endpoint, timeout=t, priority=priority)

    def reply(self, request: Message, msg: Any) -> None:
        self._fire(MsgType.DIRECT, request.source, pack(msg), request.priority, request.correlation_id,
                   wire.F_REPLY)

    def reply_error(self, request: Message, code: str, message: str) -> None:
        self._fire(MsgType.DIRECT, request.source, _error_payload(code, message), request.priority,
                   request.correlation_id, wire.F_REPLY | wire.F_ERROR)

    def ping(self, payload: bytes = b"", timeout: float | None = -1.0) -> float:
        """Round trip to the router; returns the seconds it took."""
        t0 = time.perf_counter()
        self._roundtrip(MsgType.PING, payload, timeout=self.timeout if timeout == -1.0 else timeout)
        return time.perf_counter() - t0

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message for this client (publish, direct, request, multicast, broadcast), or None when
        none arrives within timeout seconds (None waits for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._inbox:
                try:
                    self._read_some(deadline)
                except TimeoutError:
                    return None
            return self._inbox.popleft()

    def serve_requests(self, handler: Callable[[Message], Any], timeout: float | None = None) -> int:
        """Answer DIRECT requests with handler(message) until ``timeout`` seconds pass without a message (None:
        for ever).  An exception in the handler is sent back as an ``internal`` error.  Other messages are
        dropped.  Returns how many requests were answered."""
        n = 0
        while (msg := self.receive(timeout)) is not None:
            if not msg.is_request:
                continue
            try:
                value = handler(msg)
            except Exception as exc:  # noqa: BLE001 - the peer gets the error text
                self.reply_error(msg, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            else:
                self.reply(msg, value)
            n += 1
        return n


def _opt(**kwargs: Any) -> dict[str, Any]:
    """The optional arguments that were given (None means 'not given', so the daemon applies its default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _manifest_text(source: str | os.PathLike[str]) -> str:
    """A manifest argument is a path when it names an existing file, else the manifest text itself."""
    if isinstance(source, os.PathLike):
        return Path(source).read_text(encoding="utf-8")
    if "\n" not in source and len(source) < 4096:
        p = Path(source).expanduser()
        try:
            is_file = p.is_file()
        except OSError:  # not a usable path (a name longer than NAME_MAX, say): it is the text itself
            is_file = False
        if is_file:
            return p.read_text(encoding="utf-8")
    return source


def _connect_blocking(path: Path, timeout: float) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise _connect_error(path, exc) from None
    return sock


def _connect_error(path: Path, exc: OSError) -> DaemonNotRunning | ConnectionLost:
    """What a failed connect() to the daemon's socket means for the caller."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return DaemonNotRunning(path, exc.strerror or "")
    return ConnectionLost(f"cannot connect to {path}: {exc.strerror or exc}; check the path and its "
                          "permissions (the socket is 0600, owned by the daemon's user)")


# --- asyncio ---------------------------------------------------------------------------------------------------

FrameHandler = Callable[[wire.FrameHeader, bytes], None]


class _AsyncConnection:
    """One asyncio connection: HELLO/WELCOME, replies matched to waiting futures by (type, correlation id),
    everything else handed to ``on_frame``.  The reader task only decodes and routes; domain work happens in
    the tasks of whoever consumes the frames."""

    def __init__(self, path: Path, on_frame: FrameHandler, on_lost: Callable[[BaseException], None] | None = None
                 ) -> None:
        self.path = path
        self.core = _Core()
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._pending: dict[tuple[int, int], asyncio.Future[tuple[wire.FrameHeader, bytes]]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        self.closed = asyncio.Event()
        self._refused: tuple[wire.FrameHeader, bytes] | None = None
        # open(ring=True): RING_READY's descriptors [c2r memfd, r2c memfd, c2r bell, r2c bell], now the caller's
        # to close; or ring_error, why RING_SETUP was answered with an error.
        self.ring_fds: list[int] = []
        self.ring_error: RemoteError | None = None

    async def open(self, hello: dict[str, Any], timeout: float, *, ring: bool = False) -> None:
        """HELLO/WELCOME; with ``ring`` also RING_SETUP (docs/protocol.md, "Shared-memory rings")."""
        if ring:
            await self._open_with_ring(hello, timeout)
            return
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(os.fspath(self.path), limit=_READ_SIZE), timeout
            )
        except TimeoutError:  # an OSError too: it must come first
            raise RequestTimeout(f"connecting to {self.path} took more than {timeout}s") from None
        except OSError as exc:
            raise _connect_error(self.path, exc) from None
        self._task = asyncio.create_task(self._read_loop(), name=f"baton-reader-{self.path.name}")
        try:
            welcome = await self.roundtrip(MsgType.HELLO, pack(hello), timeout=timeout)
            self.core.accept_welcome(welcome)
        except BaseException:
            await self.close()
            raise

    async def _open_with_ring(self, hello: dict[str, Any], timeout: float) -> None:
        """The handshake on the bare socket, read with recvmsg: RING_READY's descriptors ride on its bytes
        (SCM_RIGHTS), and a stream transport's plain reads would drop them.  Frames that arrive meanwhile (TASKs
        pushed after WELCOME) are routed once the transport takes over the socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.setblocking(False)
        early: list[tuple[wire.FrameHeader, bytes]] = []
        try:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, os.fspath(self.path)), timeout)
            except TimeoutError:  # an OSError too: it must come first
                raise RequestTimeout(f"connecting to {self.path} took more than {timeout}s") from None
            except OSError as exc:
                raise _connect_error(self.path, exc) from None
            welcome = await self._raw_roundtrip(sock, MsgType.HELLO, pack(hello), deadline, early)
            self.core.accept_welcome(welcome)
            try:
                await self._raw_roundtrip(sock, MsgType.RING_SETUP, b"", deadline, early)
            except RemoteError as exc:
                self.ring_error = exc
            else:
                if len(self.ring_fds) != 4:
                    raise ConnectionLost(f"RING_READY carried {len(self.ring_fds)} descriptors, expected 4")
            self._reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=_READ_SIZE)
        except BaseException:
            sock.close()
            self.close_ring_fds()
            self._fail_all(ConnectionLost(f"the connection to {self.path} was closed"))
            raise
        self._task = asyncio.create_task(self._read_loop(), name=f"baton-reader-{self.path.name}")
        for header, payload in early:
            self._route(header, payload)

    async def _raw_roundtrip(self, sock: _socket.socket, mtype: int, payload: bytes, deadline: float,
                             early: list[tuple[wire.FrameHeader, bytes]]) -> Any:
        try:
            return await self._raw_exchange(sock, mtype, payload, deadline, early)
        except TimeoutError:
            raise  # the caller's RequestTimeout
        except (FrameError, OSError) as exc:  # a garbled stream or a broken socket: the connection is gone
            raise ConnectionLost(f"the connection to {self.path} failed during the handshake: {exc}") from exc

    async def _raw_exchange(self, sock: _socket.socket, mtype: int, payload: bytes, deadline: float,
                            early: list[tuple[wire.FrameHeader, bytes]]) -> Any:
        loop = asyncio.get_running_loop()
        corr = self.core.next_corr()
        await loop.sock_sendall(sock, self.core.frame(mtype, payload, corr=corr))
        answers = (mtype, REPLY_TYPE.get(mtype, mtype))
        while True:
            data = await self._recv_fds(sock, deadline)
            if not data:
                raise ConnectionLost(f"the daemon at {self.path} closed the connection during the handshake")
            got = None
            for header, body in self.core.stream.feed(data):
                if _is_refusal(header):
                    reply_value(header, body)  # raises Refused
                if (got is None and header.correlation_id == corr and header.type in answers
                        and header.flags & (wire.F_REPLY | wire.F_ERROR)):
                    got = header, body
                else:
                    early.append((header, body))  # in order, the frames after the reply too
            if got is not None:
                return reply_value(*got)

    async def _recv_fds(self, sock: _socket.socket, deadline: float) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, _, _ = _socket.recv_fds(sock, _READ_SIZE, 8)
            except BlockingIOError:
                readable: asyncio.Future[None] = loop.create_future()

                def wake(fut: asyncio.Future[None] = readable) -> None:
                    if not fut.done():
                        fut.set_result(None)

                loop.add_reader(sock.fileno(), wake)
                try:
                    await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise RequestTimeout(f"no handshake reply from the daemon at {self.path} in time") from None
                finally:
                    loop.remove_reader(sock.fileno())
                continue
            except OSError as exc:
                raise ConnectionLost(f"the connection to the daemon at {self.path} failed ({exc})") from None
            for fd in fds:
                os.set_inheritable(fd, False)
            self.ring_fds.extend(fds)
            return data

    def close_ring_fds(self) -> None:
        fds, self.ring_fds = self.ring_fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def is_open(self) -> bool:
        return self._writer is not None and self._lost is None

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, RuntimeError):
                pass  # already broken: closing is all that was wanted
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_all(ConnectionLost(f"the connection to {self.path} was closed"))

    def _fail_all(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._lost_error())
        if not self.closed.is_set():
            self.closed.set()
            if self._on_lost is not None:
                self._on_lost(exc)

    def _lost_error(self) -> BaseException:
        if self._refused is not None:
            try:
                reply_value(*self._refused)
            except RemoteError as exc:
                return exc
        lost = self._lost
        if isinstance(lost, ConnectionLost):
            return ConnectionLost(str(lost))
        return ConnectionLost(f"the connection to the daemon at {self.path} was lost ({lost})")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reader = self._reader
        stream = self.core.stream
        exc: BaseException = ConnectionLost(
            f"the daemon at {self.path} closed the connection (it stopped, or refused a frame)"
        )
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                for header, payload in stream.feed(data):
                    self._route(header, payload)
        except FrameError as err:
            exc = ConnectionLost(f"the daemon sent a malformed frame ({err}); connection closed")
        except OSError as err:
            exc = ConnectionLost(f"the connection to the daemon at {self.path} failed ({err})")
        except asyncio.CancelledError:
            exc = ConnectionLost(f"the connection to {self.path} was closed")
            raise
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._fail_all(exc)

    def _route(self, header: wire.FrameHeader, payload: bytes) -> None:
        if header.flags & (wire.F_REPLY | wire.F_ERROR):
            fut = self._pending.pop((header.type, header.correlation_id), None)
            if fut is not None:
                if not fut.done():
                    fut.set_result((header, payload))
                return
            if _is_refusal(header):
                self._refused = (header, payload)  # the router closes next; _lost_error reports this
                return
            if header.correlation_id == 0 and header.flags & wire.F_ERROR:
                _log_unsolicited_error(header, payload)
                return
        # Everything else, replies nobody here waits for included (an agent's RESULT acknowledgements).
        self._on_frame(header, payload)

    def write(self, data: bytes) -> None:
        if self._writer is None or self._lost is not None:
            raise self._lost_error() if self._lost is not None else ConnectionLost(f"not connected to {self.path}")
        self._writer.write(data)

    async def drain(self) -> None:
        if self._writer is not None:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                if self._refused is not None:
                    raise self._lost_error() from None
                raise ConnectionLost(f"the daemon at {self.path} closed the connection ({exc})") from None

    async def send(self, mtype: int, payload: bytes, *, dest: int = 0, corr: int = 0, flags: int = 0,
                   priority: int = Priority.NORMAL) -> None:
        self.write(self.core.frame(mtype, payload, dest=dest, corr=corr, flags=flags, priority=priority))
        await self.drain()

    def expect(self, mtype: int, corr: int) -> asyncio.Future[tuple[wire.FrameHeader, bytes]]:
        """A future for the reply of type mtype with this correlation id (register before sending)."""
        if self._lost is not None:
            raise self._lost_error()
        fut: asyncio.Future[tuple[wire.FrameHeader, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[(mtype, corr)] = fut
        return fut

    def forget(self, mtype: int, corr: int) -> None:
        self._pending.pop((mtype, corr), None)

    async def roundtrip(self, mtype: int, payload: bytes, *, dest: int = 0, timeout: float | None = None,
                        priority: int = Priority.NORMAL) -> Any:
        corr = self.core.next_corr()
        fut = self.expect(mtype, corr)
        reply_type = REPLY_TYPE.get(mtype)
        if reply_type is not None:
            self._pending[(reply_type, corr)] = fut  # success comes as WELCOME/RING_READY, errors as mtype
        try:
            await self.send(mtype, payload, dest=dest, corr=corr, priority=priority)
            header, body = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from the daemon at {self.path} within {timeout}s; it may be overloaded or stuck "
                "(check its log), or pass a longer timeout"
            ) from None
        finally:
            self.forget(mtype, corr)
            if reply_type is not None:
                self.forget(reply_type, corr)
        return reply_value(header, body)


MessageHandler = Callable[[Message], Any]


class Subscription:
    """Messages of one topic: ``async for msg in sub`` (or ``await sub.get()``); ``await sub.close()``
    unsubscribes."""

    __slots__ = ("topic", "_client", "_queue", "dropped")

    def __init__(self, client: AsyncClient, topic: str) -> None:
        self.topic = topic
        self._client = client
        self._queue: asyncio.Queue[Message] = asyncio.Queue(INBOX_LIMIT)
        self.dropped = 0

    def _put(self, msg: Message) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(msg)

    async def get(self, timeout: float | None = None) -> Message:
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self._queue.get()

    async def close(self) -> None:
        await self._client.unsubscribe(self.topic)


class AsyncClient:
    """An asyncio connection to the daemon: ``client = await AsyncClient.connect()`` or
    ``async with AsyncClient() as client``.  Calls may run concurrently; replies are matched by id."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, name: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, connect_timeout: float = 5.0) -> None:
        self.socket_path = resolve_socket_path(socket)
        self.timeout = timeout
        self._name = name
        self._connect_timeout = connect_timeout
        self._conn = _AsyncConnection(self.socket_path, self._on_frame)
        self._inbox: asyncio.Queue[Message] | None = None
        self._subs: dict[int, Subscription | MessageHandler] = {}
        self._request_handler: MessageHandler | None = None
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    @classmethod
    async def connect(cls, socket: str | os.PathLike[str] | None = None, **kwargs: Any) -> AsyncClient:
        client = cls(socket, **kwargs)
        await client.open()
        return client

    async def open(self) -> None:
        self._inbox = asyncio.Queue(INBOX_LIMIT)
        await self._conn.open(hello_payload(self._name), self._connect_timeout)

    async def close(self) -> None:
        await self._conn.close()
        for t in list(self._handler_tasks):
            t.cancel()

    async def __aenter__(self) -> AsyncClient:
        if not self._conn.is_open:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoint(self) -> int:
        return self._conn.core.endpoint

    @property
    def welcome(self) -> dict[str, Any]:
        return self._conn.core.welcome

    # -- incoming --

    def _on_frame(self, header: wire.FrameHeader, payload: bytes) -> None:
        t = header.type
        if header.flags & wire.F_REPLY or t not in _MESSAGE_TYPES:
            log.debug("ignoring an unexpected %s frame (flags %#x; a late reply?)", t, header.flags)
            return
        try:
            msg = self._conn.core.message(header, payload)
        except (ValueError, msgpack.UnpackException) as exc:
            log.warning("dropping a message with an undecodable payload from endpoint %d: %s", header.source, exc)
            return
        if t == MsgType.PUBLISH:
            target = self._subs.get(header.destination)
            if isinstance(target, Subscription):
                target._put(msg)
                return
            if target is not None:
                self._spawn(target, msg)
                return
        elif msg.is_request and self._request_handler is not None:
            self._spawn(self._answer, msg)
            return
        inbox = self._inbox
        if inbox is None:
            return
        if inbox.full():
            inbox.get_nowait()
            self.dropped += 1
        inbox.put_nowait(msg)

    def _spawn(self, fn: MessageHandler, msg: Message) -> None:
        async def run() -> None:
            try:
                result = fn(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("message handler %r failed on %r", fn, msg)

        task = asyncio.get_running_loop().create_task(run())
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    async def _answer(self, msg: Message) -> None:
        handler = self._request_handler
        assert handler is not None
        try:
            value = handler(msg)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # noqa: BLE001 - the requester gets the error text
            await self.reply_error(msg, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            await self.reply(msg, value)

    async def receive(self, timeout: float | None = None) -> Message | None:
        """The next message not taken by a subscription or the request handler; None at timeout."""
        if self._inbox is None:
            raise ConnectionLost("the client is not connected: call open() or use `async with`")
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return None

    async def messages(self) -> AsyncIterator[Message]:
        while (msg := await self.receive()) is not None:
            yield msg

    # -- CALL operations --

    async def call(self, op: str, timeout: float | None = -1.0, **args: Any) -> Any:
        t = self.timeout if timeout == -1.0 else timeout
        return await self._conn.roundtrip(MsgType.CALL, pack({"op": op, "args": args}), timeout=t)

    @overload
    async def enqueue(self, specs: SpecLike) -> EnqueueResult: ...
    @overload
    async def enqueue(self, specs: Sequence[SpecLike]) -> builtins.list[EnqueueResult]: ...

    async def enqueue(self, specs: SpecLike | Sequence[SpecLike]) -> EnqueueResult | builtins.list[EnqueueResult]:
        one, items = _spec_items(specs)
        results = _enqueue_results(await self.call("enqueue", tasks=[_spec_dict(s) for s in items]))
        return results[0] if one else results

    async def get(self, task_id: str) -> Task:
        return _model(Task, await self.call("get", id=task_id))

    async def list(self, status: str | None = None, agent_type: str | None = None, limit: int = 100
                   ) -> builtins.list[Task]:
        reply = await self.call("list", **_opt(status=status, agent_type=agent_type), limit=limit)
        return [_model(Task, t) for t in reply]

    async def queue_status(self) -> QueueStatus:
        from baton.reports import QueueStatus

        return _model(QueueStatus, await self.call("queue_status"))

    async def cancel(self, task_id: str, *, cascade: bool = True, dry_run: bool = False,
                     reason: str | None = None) -> CancelResult:
        reply = await self.call("cancel", id=task_id, cascade=cascade, dry_run=dry_run, **_opt(reason=reason))
        return _model(CancelResult, reply)

    async def execution_plan(self, agent_type: str | None = None, wip: int | None = None) -> ExecutionPlan:
        return _model(ExecutionPlan, await self.call("plan", **_opt(agent_type=agent_type, wip=wip)))

    async def wait(self, ids: str | Sequence[str], timeout: float | None = None) -> WaitResult:
        id_list = [ids] if isinstance(ids, str) else list(ids)
        call_timeout = None if timeout is None else timeout + (self.timeout or DEFAULT_TIMEOUT)
        reply = await self.call("wait", timeout=call_timeout, ids=id_list, **_opt(timeout_s=timeout))
        return WaitResult.from_reply(id_list, reply)

    async def import_manifest(self, source: str | os.PathLike[str], *, dry_run: bool = False) -> Any:
        text = await asyncio.to_thread(_manifest_text, source)
        return _import_result(await self.call("import_manifest", text=text, dry_run=dry_run))

    async def pulse(self) -> Pulse:
        from baton.reports import Pulse

        return _model(Pulse, await self.call("pulse"))

    async def agents(self) -> builtins.list[dict[str, Any]]:
        return list(await self.call("agents"))

    async def stats(self) -> dict[str, Any]:
        return dict(await self.call("stats"))

    async def mode(self) -> dict[str, Any]:
        """The daemon's execution mode: {"mode", "reason", "router", "since", "switches", "history"}."""
        return dict(await self.call("mode"))

    async def set_mode(self, mode: str) -> dict[str, Any]:
        """Force INTELLIGENT or PYTHON_ONLY (see Client.set_mode)."""
        return dict(await self.call("mode_set", mode=mode))

    # -- messaging --

    async def publish(self, topic: str, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        await self._conn.send(MsgType.PUBLISH, pack(msg), dest=topic_id(topic), priority=priority)

    @overload
    async def subscribe(self, topic: str) -> Subscription: ...
    @overload
    async def subscribe(self, topic: str, callback: MessageHandler) -> None: ...

    async def subscribe(self, topic: str, callback: MessageHandler | None = None) -> Subscription | None:
        """Subscribe to a topic; returns once the router has it in effect.  Without a callback, returns a
        Subscription to iterate; with one, each message is passed to it (plain or async function)."""
        tid = topic_id(topic)
        self._conn.core.topics[tid] = topic
        sub = Subscription(self, topic) if callback is None else None
        self._subs[tid] = sub if sub is not None else callback  # type: ignore[assignment]
        try:
            await self._conn.roundtrip(MsgType.SUBSCRIBE, b"", dest=tid, timeout=self.timeout)
        except BaseException:
            self._subs.pop(tid, None)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        tid = topic_id(topic)
        await self._conn.roundtrip(MsgType.UNSUBSCRIBE, b"", dest=tid, timeout=self.timeout)
        self._subs.pop(tid, None)

    async def join(self, group: str) -> None:
        gid = group_id(group)
        self._conn.core.groups[gid] = group
        await self._conn.roundtrip(MsgType.JOIN, b"", dest=gid, timeout=self.timeout)

    async def leave(self, group: str) -> None:
        await self._conn.roundtrip(MsgType.LEAVE, b"", dest=group_id(group), timeout=self.timeout)

    async def multicast(self, group: str, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        await self._conn.send(MsgType.MULTICAST, pack(msg), dest=group_id(group), priority=priority)

    async def broadcast(self, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        await self._conn.send(MsgType.BROADCAST, pack(msg), priority=priority)

    async def send(self, endpoint: int, msg: Any, *, priority: int = Priority.NORMAL) -> None:
        await self._conn.send(MsgType.DIRECT, pack(msg), dest=endpoint, priority=priority)

    async def request(self, endpoint: int, msg: Any, timeout: float | None = -1.0, *,
                      priority: int = Priority.NORMAL) -> Any:
        t = self.timeout if timeout == -1.0 else timeout
        return await self._conn.roundtrip(MsgType.DIRECT, pack(msg), dest=endpoint, timeout=t, priority=priority)

    async def reply(self, request: Message, msg: Any) -> None:
        await self._conn.send(MsgType.DIRECT, pack(msg), dest=request.source, corr=request.correlation_id,
                              flags=wire.F_REPLY, priority=request.priority)

    async def reply_error(self, request: Message, code: str, message: str) -> None:
        await self._conn.send(MsgType.DIRECT, _error_payload(code, message), dest=request.source,
                              corr=request.correlation_id, flags=wire.F_REPLY | wire.F_ERROR,
                              priority=request.priority)

    def serve_requests(self, handler: Callable[[Message], Any | Awaitable[Any]] | None) -> None:
        """Answer every DIRECT request with handler(message) (plain or async; an exception becomes an
        ``internal`` error reply), from now on; None hands requests to ``receive`` again."""
        self._request_handler = handler

    async def ping(self, payload: bytes = b"", timeout: float | None = -1.0) -> float:
        t0 = time.perf_counter()
        await self._conn.roundtrip(MsgType.PING, payload, timeout=self.timeout if timeout == -1.0 else timeout)
        return time.perf_counter() - t0
