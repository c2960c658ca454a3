"""``baton.Agent``: run a handler for every task of one agent type (docs/protocol.md, "Tasks").

    def handle(task):                       # or: async def handle(task)
        return {"echo": task.input}

    baton.Agent("reviewer", wip=2).run(handle)

- Up to ``wip`` tasks run at once: plain handlers in a thread pool of that size, async ones as tasks on the
  agent's loop.  A handler's return value is the result; an exception makes the attempt fail with its text.
- Heartbeats every ``heartbeat_s`` (from WELCOME) carry the ``[id, token]`` of the tasks running, so their
  leases do not expire while the work is slow.
- The connection may drop (daemon restart, router switch): the agent reconnects with exponential backoff and
  jitter, and keeps every result until the coordinator acknowledges it (RESULT ``F_REPLY``), sending the
  unacknowledged ones again after a reconnect.  The coordinator accepts a resent result once: a completion
  already recorded under the same fencing token is acknowledged as accepted.
- ``stop()`` (or SIGINT/SIGTERM under ``run``) stops taking tasks, lets the running ones finish (up to
  ``stop_timeout``), waits briefly for their acknowledgements, then disconnects; tasks the router had queued
  for this agent but not delivered are requeued by the coordinator when the connection closes.  A second
  signal stops at once.
- ``ring=True``: after HELLO the agent negotiates the shared-memory ring pair (RING_SETUP; docs/client.md,
  "Agent").  The router then sends it CRITICAL/HIGH frames (TASKs of ``base_priority`` >= 8) through the r2c
  ring, read on its doorbell eventfd in the agent's loop, and the agent sends its CRITICAL/HIGH frames (the
  results of those tasks) through the c2r ring; the rest stays on the socket.  Without libbaton, or when the
  daemon answers ``ring_unavailable``, it logs once and uses the socket only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import msgpack

from baton import wire
from baton.client import _AsyncConnection, hello_payload, pack, resolve_socket_path, unpack
from baton.client_errors import ConnectionLost, DaemonNotRunning, Refused, RemoteError, RequestTimeout
from baton.errors import BatonError, FrameError
from baton.protocol import MsgType

__all__ = ["Agent", "AgentTask", "Handler", "TaskFailed"]

log = logging.getLogger("baton.agent")

_ACK_WAIT_S: Final = 5.0  # at stop, how long to wait for the acknowledgements of the last results


class TaskFailed(Exception):
    """Raise from a handler to fail the attempt with exactly this text as the error (any other exception
    fails it with ``<type>: <message>``)."""


class AgentTask:
    """One task handed to this agent.  ``token`` is the fencing token of this attempt (the result carries it
    back); ``dispatch_id`` the router's id of this hand-over."""

    __slots__ = ("id", "token", "agent_type", "attempt", "input", "metadata", "lease_s", "timeout_s", "dispatch_id",
                 "priority")

    def __init__(self, payload: Mapping[str, Any], dispatch_id: int, priority: int = wire.Priority.NORMAL) -> None:
        self.id: str = str(payload["id"])
        self.token: int = int(payload["token"])
        self.agent_type: str = str(payload.get("agent_type") or "")
        self.attempt: int = int(payload.get("attempt") or 1)
        self.input: Any = payload.get("input")
        metadata = payload.get("metadata")
        self.metadata: dict[str, Any] = dict(metadata) if isinstance(metadata, Mapping) else {}
        self.lease_s: float | None = payload.get("lease_s")
        self.timeout_s: float | None = payload.get("timeout_s")
        self.dispatch_id = dispatch_id
        self.priority = priority  # of the TASK frame; the RESULT travels at the same priority (NORMAL at most)

    def as_dict(self) -> dict[str, Any]:
        """The task as ``baton worker`` hands it to a program (JSON on stdin)."""
        return {
            "id": self.id,
            "token": self.token,
            "agent_type": self.agent_type,
            "attempt": self.attempt,
            "input": self.input,
            "metadata": self.metadata,
            "timeout_s": self.timeout_s,
        }

    def __repr__(self) -> str:
        return f"AgentTask(id={self.id!r}, token={self.token}, attempt={self.attempt})"


Handler = Callable[[AgentTask], Any] | Callable[[AgentTask], Awaitable[Any]]


def _is_async(handler: Handler) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's async __call__ counts too
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class _Rings:
    """One connection's ring pair (docs/protocol.md, "Shared-memory rings"): the agent produces on c2r (its
    publishes ring the router's c2r doorbell when the router sleeps) and consumes r2c (woken by the r2c
    doorbell after arming).  Owns both ring ends and both eventfds."""

    def __init__(self, fds: list[int]) -> None:
        from baton import native

        c2r_fd, r2c_fd, self.c2r_bell, self.r2c_bell = fds
        self.c2r: Any = None
        self.r2c: Any = None
        try:
            self.c2r = native.Ring.attach(c2r_fd, native.PRODUCER)
            self.r2c = native.Ring.attach(r2c_fd, native.CONSUMER)
            self.c2r.set_doorbell(self.c2r_bell)
            os.set_blocking(self.r2c_bell, False)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in (c2r_fd, r2c_fd):  # attach keeps its own mapping
                os.close(fd)

    def close(self) -> None:
        for ring in (self.c2r, self.r2c):
            if ring is not None:
                ring.close()  # closing the producer end rings c2r_bell one last time: close the fds after
        self.c2r = self.r2c = None
        for fd in (self.c2r_bell, self.r2c_bell):
            if fd >= 0:
                os.close(fd)
        self.c2r_bell = self.r2c_bell = -1


class Agent:
    """A worker process's connection to the daemon for one agent type (see the module docstring)."""

    def __init__(
        self,
        agent_type: str,
        capabilities: Iterable[str] = (),
        wip: int = 1,
        socket: str | os.PathLike[str] | None = None,
        name: str | None = None,
        *,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        connect_timeout: float = 5.0,
        stop_timeout: float = 30.0,
        retry_first_connect: bool = False,
        ring: bool = False,
    ) -> None:
        if wip < 1:
            raise ValueError(f"wip must be at least 1 (tasks this agent runs at once), got {wip}")
        self.agent_type = agent_type
        self.capabilities = list(capabilities)
        self.wip = wip
        self.socket_path = resolve_socket_path(socket)
        self.name = name or f"{agent_type}-{os.getpid()}"
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        # A worker started before its daemon would otherwise exit at once; by default the first failure is
        # reported (DaemonNotRunning) so that a mistyped socket is not retried for ever.
        self.retry_first_connect = retry_first_connect
        self.ring = ring  # negotiate the shared-memory ring pair on every connection (see the module docstring)
        # Counters, for people and tests.
        self.completed = 0  # handler returned
        self.failed = 0  # handler raised
        self.accepted = 0  # results the coordinator acknowledged as accepted
        self.rejected = 0  # ... as not accepted (stale token, task cancelled meanwhile)
        self.connections = 0  # successful handshakes (1 + reconnects)
        self.rings = 0  # connections that got their ring pair
        self.ring_frames_in = 0  # frames read from the r2c ring
        self.ring_frames_out = 0  # frames written to the c2r ring
        self._rings: _Rings | None = None
        self._ring_off = False  # the ring cannot work here (no libbaton, attach failed): socket only from now on
        self._ring_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._force = False
        self._conn: _AsyncConnection | None = None
        self._handler: Handler | None = None
        self._is_async = False
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[int, tuple[AgentTask, asyncio.Task[None]]] = {}  # dispatch id -> task
        self._unacked: dict[int, tuple[bytes, int]] = {}  # dispatch id -> RESULT (payload, priority) until acked
        self._acked = asyncio.Event()
        self._connected_event = threading.Event()

    # -- public --

    @property
    def endpoint(self) -> int:
        conn = self._conn
        return conn.core.endpoint if conn is not None and conn.is_open else 0

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    @property
    def running(self) -> int:
        return len(self._running)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block (from another thread) until the agent has completed a handshake."""
        return self._connected_event.wait(timeout)

    def run(self, handler: Handler) -> None:
        """Serve until stop() or SIGINT/SIGTERM (a second signal stops without waiting for running tasks)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_signal)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread: stop() is the way out
            await self.serve(handler)

        try:
            import uvloop

            uvloop.run(main())
        except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
            asyncio.run(main())

    def stop(self, force: bool = False) -> None:
        """Stop serving (thread-safe): finish the running tasks first unless force."""
        loop, stop = self._loop, self._stop
        if force:
            self._force = True
        if loop is None or stop is None:
            return
        if force:
            loop.call_soon_threadsafe(self._cancel_running)
        loop.call_soon_threadsafe(stop.set)

    def _on_signal(self) -> None:
        if self._stop is not None and self._stop.is_set():
            log.warning("second signal: stopping without waiting for %d running task(s)", len(self._running))
            self.stop(force=True)
        else:
            log.info("stopping: finishing %d running task(s) (signal again to stop at once)", len(self._running))
            self.stop()

    async def serve(self, handler: Handler) -> None:
        """Serve tasks until stop(); raises DaemonNotRunning if the first connection fails (unless
        ``retry_first_connect``) and Refused if the daemon refuses this user."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._acked = asyncio.Event()
        self._handler = handler
        self._is_async = _is_async(handler)
        if not self._is_async:
            self._pool = ThreadPoolExecutor(max_workers=self.wip, thread_name_prefix=f"baton-{self.agent_type}")
        if self._force:
            self._stop.set()
        try:
            await self._connection_loop()
            await self._drain()
        finally:
            self._cancel_running()
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            self._detach_rings()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            self._loop = None

    # -- connection --

    async def _connection_loop(self) -> None:
        assert self._stop is not None
        stop = self._stop
        delay = self.backoff_initial_s
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                conn = _AsyncConnection(self.socket_path, self._on_frame)
                hello = hello_payload(self.name, self.agent_type, self.capabilities, self.wip)
                ring = self._want_ring()
                try:
                    await conn.open(hello, self.connect_timeout, ring=ring)
                except Refused:
                    raise
                except (DaemonNotRunning, ConnectionLost, RequestTimeout, RemoteError) as exc:
                    if self.connections == 0 and not self.retry_first_connect:
                        raise
                    # Full jitter: agents cut off together (a daemon restart) do not reconnect in lockstep.
                    pause = random.uniform(delay / 2, delay)
                    log.info("connecting to %s failed (%s); retrying in %.2fs", self.socket_path, exc, pause)
                    delay = min(delay * 2, self.backoff_max_s)
                    await asyncio.wait({stop_wait}, timeout=pause)
                    continue
                delay = self.backoff_initial_s
                if ring and not self._attach_rings(conn):
                    await conn.close()
                    continue  # at once, without the ring
                self._conn = conn
                self.connections += 1
                self._connected_event.set()
                log.info("agent %s (%s) connected as endpoint %d", self.name, self.agent_type, conn.core.endpoint)
                self._resend_unacked()
                beat = asyncio.create_task(self._heartbeats(conn))
                lost = asyncio.ensure_future(conn.closed.wait())
                try:
                    await asyncio.wait({stop_wait, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    beat.cancel()
                    lost.cancel()
                if not conn.closed.is_set():
                    break  # stopping with the connection up: _drain uses it (and its rings)
                self._detach_rings()
                self._connected_event.clear()
                log.warning("lost the connection to %s; %d running, %d unacknowledged result(s) kept; reconnecting",
                            self.socket_path, len(self._running), len(self._unacked))
        finally:
            stop_wait.cancel()

    # -- rings --

    def _want_ring(self) -> bool:
        if not self.ring or self._ring_off:
            return False
        from baton import native

        if not native.AVAILABLE:
            self._ring_off = True
            log.warning("ring=True but %s; the agent uses the socket only", native.LOAD_ERROR)
            return False
        return True

    def _attach_rings(self, conn: _AsyncConnection) -> bool:
        """Take the ring pair RING_READY handed over; False when it cannot be used (the caller reconnects
        without it: the router would send HIGH frames to a ring nobody reads).  Refused is not an error."""
        if conn.ring_error is not None:
            if not self._ring_logged:
                self._ring_logged = True
                log.warning("the daemon refused the shared-memory ring (%s); the agent uses the socket",
                            conn.ring_error)
            return True
        fds, conn.ring_fds = conn.ring_fds, []
        try:
            rings = _Rings(fds)
        except (BatonError, OSError) as exc:
            self._ring_off = True
            log.error("cannot attach the shared-memory rings (%s); reconnecting without them", exc)
            return False
        self._rings = rings
        self.rings += 1
        assert self._loop is not None
        self._loop.add_reader(rings.r2c_bell, self._on_bell)
        log.debug("ring pair attached (connection %d)", self.connections + 1)
        self._pump_ring()  # anything published before the doorbell was watched, then arm
        return True

    def _detach_rings(self) -> None:
        rings, self._rings = self._rings, None
        if rings is None:
            return
        if self._loop is not None and rings.r2c_bell >= 0:
            self._loop.remove_reader(rings.r2c_bell)
        rings.close()

    def _on_bell(self) -> None:
        rings = self._rings
        if rings is None:
            return
        try:
            os.eventfd_read(rings.r2c_bell)
        except (BlockingIOError, OSError):
            pass  # a stale or already-consumed ring: harmless
        rings.r2c.disarm()
        self._pump_ring()

    def _pump_ring(self) -> None:
        """Read r2c until it is empty and armed: the agent never sleeps with records in the ring."""
        rings = self._rings
        while rings is not None and rings is self._rings:
            try:
                records = rings.r2c.read_batch(0)
                if not records:
                    if rings.r2c.arm():
                        return  # empty and armed: the router's next publish rings r2c_bell
                    continue
            except BatonError as exc:  # PeerClosed: the router ended the ring; the socket's end follows
                log.debug("r2c ring ended (%s)", exc)
                if self._loop is not None:
                    self._loop.remove_reader(rings.r2c_bell)
                return
            for rec in records:
                try:
                    header, payload, _ = wire.decode(rec, wire.MAX_PAYLOAD_LIMIT)
                except FrameError as exc:
                    log.error("dropping a malformed frame from the r2c ring: %s", exc)
                    continue
                self.ring_frames_in += 1
                self._on_frame(header, bytes(payload))

    async def _heartbeats(self, conn: _AsyncConnection) -> None:
        period = conn.core.welcome.get("heartbeat_s")
        if not isinstance(period, (int, float)) or period <= 0:
            lease = conn.core.welcome.get("lease_s")
            period = float(lease) / 3 if isinstance(lease, (int, float)) and lease > 0 else 10.0
        while True:
            await asyncio.sleep(float(period))
            held = [[t.id, t.token] for t, _ in self._running.values()]
            try:
                await conn.send(MsgType.HEARTBEAT, pack({"held": held}))
            except (ConnectionLost, OSError):
                return  # the connection loop notices and reconnects

    def _resend_unacked(self) -> None:
        if self._unacked:
            log.info("sending %d unacknowledged result(s) again", len(self._unacked))
        for dispatch_id in list(self._unacked):
            self._send_result(dispatch_id)

    def _send_result(self, dispatch_id: int) -> None:
        conn = self._conn
        entry = self._unacked.get(dispatch_id)
        if conn is None or entry is None or not conn.is_open:
            return  # kept in _unacked: sent again after the reconnect
        payload, priority = entry
        frame = conn.core.frame(MsgType.RESULT, payload, corr=dispatch_id, priority=priority)
        rings = self._rings
        if rings is not None and priority <= wire.Priority.HIGH:
            try:
                rings.c2r.write(frame)
                self.ring_frames_out += 1
                return
            except BatonError as exc:  # RingFull, FrameTooLarge: the socket takes it
                log.debug("c2r ring write failed (%s); result of dispatch %d goes by socket", exc, dispatch_id)
        try:
            conn.write(frame)
        except ConnectionLost:
            return
        # Result frames are small and the socket rarely pushes back; drain in the background so a handler's
        # completion never waits on the socket.
        asyncio.ensure_future(self._quiet_drain(conn))

    @staticmethod
    async def _quiet_drain(conn: _AsyncConnection) -> None:
        try:
            await conn.drain()
        except ConnectionLost:
            pass

    # -- frames --

    def _on_frame(self, header: wire.FrameHeader, payload: bytes) -> None:
        t = header.type
        if t == MsgType.RESULT and header.flags & wire.F_REPLY:
            self._on_ack(header, payload)
        elif t == MsgType.TASK and not header.flags & wire.F_REPLY:
            self._on_task(header, payload)
        else:
            log.debug("agent ignores a %s frame (flags %#x)", t, header.flags)

    def _on_ack(self, header: wire.FrameHeader, payload: bytes) -> None:
        dispatch_id = header.correlation_id
        if self._unacked.pop(dispatch_id, None) is None:
            log.debug("acknowledgement for unknown dispatch %d (already acknowledged)", dispatch_id)
            return
        try:
            value = unpack(payload)
        except (ValueError, msgpack.UnpackException):
            value = None
        if header.flags & wire.F_ERROR:
            self.rejected += 1
            log.error("the coordinator refused the result of dispatch %d: %r", dispatch_id, value)
        elif isinstance(value, Mapping) and value.get("accepted"):
            self.accepted += 1
        else:
            self.rejected += 1
            reason = value.get("reason") if isinstance(value, Mapping) else value
            log.warning("result of dispatch %d not accepted: %s", dispatch_id, reason)
        if not self._unacked:
            self._acked.set()

    def _on_task(self, header: wire.FrameHeader, payload: bytes) -> None:
        dispatch_id = header.correlation_id
        try:
            task = AgentTask(unpack(payload), dispatch_id, header.priority)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            log.error("dropping a malformed TASK frame (dispatch %d): %s", dispatch_id, exc)
            return
        if self._stop is not None and self._stop.is_set():
            # Not started: when the connection closes the coordinator requeues it for another agent.
            log.info("stopping: not starting task %s", task.id)
            return
        if dispatch_id in self._running or dispatch_id in self._unacked:
            log.debug("task %s (dispatch %d) is already here; ignoring the repeat", task.id, dispatch_id)
            return
        run = asyncio.get_running_loop().create_task(self._run(task), name=f"baton-task-{task.id}")
        self._running[dispatch_id] = (task, run)

    async def _run(self, task: AgentTask) -> None:
        handler = self._handler
        assert handler is not None
        try:
            if self._is_async:
                coro = handler(task)
                assert inspect.isawaitable(coro)
                value = await asyncio.wait_for(coro, task.timeout_s) if task.timeout_s else await coro
            else:
                loop = asyncio.get_running_loop()
                value = await loop.run_in_executor(self._pool, handler, task)
            body: dict[str, Any] = {"id": task.id, "token": task.token, "ok": True, "result": value}
            try:
                payload = pack(body)
            except (TypeError, ValueError, OverflowError) as exc:
                raise TypeError(f"the handler's result cannot be sent (use JSON/msgpack values or bytes): {exc}"
                                ) from None
            self.completed += 1
        except asyncio.CancelledError:
            self._running.pop(task.dispatch_id, None)
            raise
        except Exception as exc:  # noqa: BLE001 - any handler failure is the task's failure
            if isinstance(exc, TimeoutError) and task.timeout_s:
                text = f"timed out after {task.timeout_s}s"
            elif isinstance(exc, TaskFailed):
                text = str(exc)
            else:
                text = f"{type(exc).__name__}: {exc}"
            log.info("task %s failed: %s", task.id, text)
            payload = pack({"id": task.id, "token": task.token, "ok": False, "error": text})
            self.failed += 1
        self._running.pop(task.dispatch_id, None)
        self._unacked[task.dispatch_id] = (payload, min(task.priority, wire.Priority.NORMAL))
        self._acked.clear()
        self._send_result(task.dispatch_id)

    # -- stopping --

    def _cancel_running(self) -> None:
        for _, run in list(self._running.values()):
            run.cancel()

    async def _drain(self) -> None:
        """At stop: let running tasks finish (bounded), then wait a little for their acknowledgements."""
        runs = [r for _, r in self._running.values()]
        if runs and not self._force:
            done, pending = await asyncio.wait(runs, timeout=self.stop_timeout)
            if pending:
                log.warning("%d task(s) still running after %.0fs; leaving them to be requeued", len(pending),
                            self.stop_timeout)
        self._cancel_running()
        if self._unacked and self._conn is not None and self._conn.is_open and not self._force:
            try:
                await asyncio.wait_for(self._acked.wait(), _ACK_WAIT_S)
            except TimeoutError:
                log.warning("%d result(s) not acknowledged at stop", len(self._unacked))
