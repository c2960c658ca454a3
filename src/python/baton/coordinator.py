"""The coordinator: the daemon's half of docs/protocol.md, between the router and the scheduler.

It consumes the router's frame batches (``RouterLink.recv``) and answers them, and it feeds the router's work
queues with ready tasks.  One batch is one *turn*, handled synchronously (no await per frame):

1. every frame is decoded and either answered at once (HELLO, most CALLs) or collected (RESULT, HEARTBEAT,
   lost agents' tasks);
2. the collected work is applied in **one** scheduler transaction (one journal entry, one commit): results
   are completed or failed, leases renewed, lost tasks released, and the freed room in each work queue is
   filled by claiming ready tasks (dependents released by those results included);
3. the TASK frames of the turn's claims are sent before that commit when their fencing tokens come from a
   block whose reservation is durable (docs/daemon.md, "Push before commit"), after it otherwise; the
   RESULT acknowledgements are sent only after the commit.

So the handoff path (a RESULT in -> the dependent's TASK out) is one turn and one commit, and the TASK leaves
before the SQLite work of the commit.

Ranking stays in the scheduler: the coordinator pushes a work queue only as many tasks as its connected
agents can hold (their total credit) plus a small prefetch, so the router always has the next task queued for
its immediate handoff while the order of the rest is still decided here.

Leases.  Tasks are claimed with holder ``"router"``.  A task queued in the router but not dispatched yet is
renewed by the coordinator's tick; once dispatched, the agent's HEARTBEATs renew it.  A silent agent loses its
tasks when the lease expires (the scheduler returns them to ready; its late RESULT carries a stale token and is
refused).  A lost agent (EP_CLOSED) has its tasks released at once, the attempt counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import struct
import time
import tomllib
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgpack
import ormsgpack

from baton import protocol, wire
from baton.daemon_config import DaemonConfig
from baton.metrics import BUCKETS_S as _BUCKETS_S
from baton.metrics import Histogram
from baton.models import TERMINAL, Status
from baton.protocol import ErrorCode, MsgType
from baton.router import RouterGone, RouterLink
from baton.scheduler import Scheduler
from baton.scheduler_errors import (
    DependencyCycle,
    InvalidTransition,
    ManifestError,
    SchedulerError,
    StaleLease,
    TaskValidationError,
    UnknownTask,
)
from baton.shadow import RoutingShadow
from baton.taskstate import TaskRecord

__all__ = ["Coordinator", "SERVER_NAME", "ROUTER_HOLDER", "SYSTEM_TOPIC"]

log = logging.getLogger("baton.coordinator")
router_log = logging.getLogger("baton.router")

SERVER_NAME: Final = "baton 0.1.0"
# The topic the daemon announces mode switches on (docs/modes.md, "Switches").
SYSTEM_TOPIC: Final = "baton.system"
ROUTER_HOLDER: Final = "router"  # the lease holder of every task the coordinator pushes
# SPEED_CRITICAL registers this many links of a chain ahead of the task running (docs/modes.md).
CHAIN_AHEAD: Final = 3
# The router reserves room for an agent's whole credit when it is set (so a dispatch never allocates); a wip
# above this is more than any per-type WIP limit would hand out, and is granted as this much credit.
MAX_CREDIT: Final = 4096

# The frame header (wire.py's layout): magic, version, type, priority, flags, payload_len, crc32c, source,
# destination, correlation_id, send_ts_ns.  Packed and unpacked here directly: the router validated every
# frame already, and a FrameHeader object per frame would cost more than the rest of a RESULT's handling.
_HDR: Final = struct.Struct("<IBBBBIIQQQQ")
_HSIZE: Final = wire.HEADER_SIZE
_MAGIC: Final = wire.MAGIC
_VERSION: Final = wire.VERSION
_F_REPLY: Final = wire.F_REPLY
_F_ERROR: Final = wire.F_ERROR
_EP: Final = protocol.EP_COORDINATOR
_HIGH: Final = int(wire.Priority.HIGH)
_NORMAL: Final = int(wire.Priority.NORMAL)
# TASK frames go out HIGH for tasks with base_priority >= this, NORMAL otherwise (docs/daemon.md): the router
# drains HIGH first, and sends HIGH frames through the ring pair of an agent that negotiated one.
_HIGH_FROM: Final = 8

_T_HELLO: Final = int(MsgType.HELLO)
_T_WELCOME: Final = int(MsgType.WELCOME)
_T_CALL: Final = int(MsgType.CALL)
_T_TASK: Final = int(MsgType.TASK)
_T_RESULT: Final = int(MsgType.RESULT)
_T_HEARTBEAT: Final = int(MsgType.HEARTBEAT)
_T_EP_OPEN: Final = int(MsgType.EP_OPEN)
_T_EP_CLOSED: Final = int(MsgType.EP_CLOSED)
_T_DISPATCHED: Final = int(MsgType.DISPATCHED)
_T_ROUTER_LOG: Final = int(MsgType.ROUTER_LOG)
_T_ROUTER_STATS: Final = int(MsgType.ROUTER_STATS)
_T_CTL_AGENT: Final = int(MsgType.CTL_AGENT)
_T_CTL_REVOKE: Final = int(MsgType.CTL_REVOKE)
_T_CTL_PAUSE: Final = int(MsgType.CTL_PAUSE)
_T_CTL_STATS: Final = int(MsgType.CTL_STATS)
_T_PUBLISH: Final = int(MsgType.PUBLISH)
_T_CONTINUED: Final = int(MsgType.CONTINUED)
_T_CTL_CONTINUE: Final = int(MsgType.CTL_CONTINUE)

_TERMINAL_VALUES: Final = frozenset(s.value for s in TERMINAL)
_STATUS_VALUES: Final = frozenset(s.value for s in Status)
_RUNNING: Final = Status.RUNNING.value
_COMPLETED: Final = Status.COMPLETED.value
_AGENT_TYPE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")
_RAW_TAG: Final = 1  # models.encode_payload's tag bytes: raw bytes / msgpack
_NIL: Final = b"\xc0"
_EMPTY_MAP: Final = b"\x80"
_META_KEY: Final = b"\xa8metadata"  # "metadata" as a msgpack fixstr: present in a spec blob only if given
_STATS_TIMEOUT_S: Final = 1.0
_DEFER: Final = object()  # a CALL handler that answers later (wait, stats)
_PACK_OPTS: Final = ormsgpack.OPT_NON_STR_KEYS


def _pack(obj: Any) -> bytes:
    try:
        return ormsgpack.packb(obj, option=_PACK_OPTS)
    except (TypeError, ormsgpack.MsgpackEncodeError):
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed


def _unpack(data: bytes | memoryview) -> Any:
    # ormsgpack is the fast path; msgpack takes what it refuses (maps with non-str keys, extension types).
    try:
        return ormsgpack.unpackb(data)
    except (ValueError, TypeError):
        return msgpack.unpackb(data, raw=False, strict_map_key=False)


class CallError(Exception):
    """A CALL (or another request) answered with an error reply."""

    def __init__(self, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class _Peer:
    """One endpoint the router accepted."""

    __slots__ = ("endpoint", "pid", "uid", "gid", "name", "agent_type", "capabilities", "wip", "credit",
                 "hello", "connected", "held")

    def __init__(self, endpoint: int, pid: int = -1, uid: int = -1, gid: int = -1) -> None:
        self.endpoint = endpoint
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.name = ""
        self.agent_type: str | None = None
        self.capabilities: list[str] = []
        self.wip = 0
        self.credit = 0
        self.hello = False
        self.connected = time.monotonic()
        self.held: set[int] = set()  # dispatch ids the router says this endpoint holds


class _Dispatch:
    """A task claimed by the coordinator and pushed to the router (queued there, or held by an agent)."""

    __slots__ = ("id", "task_id", "token", "agent_type", "endpoint", "expires", "ready_at", "released_at",
                 "dispatched_at")

    def __init__(self, did: int, task_id: str, token: int, agent_type: str, expires: float, ready_at: float,
                 released_at: float) -> None:
        self.id = did
        self.task_id = task_id
        self.token = token
        self.agent_type = agent_type
        self.endpoint = 0  # 0 while queued in the router
        self.expires = expires  # the lease's end (scheduler clock)
        # For the metrics (docs/metrics.md): when the task became ready (scheduler clock), when the RESULT that
        # released it reached the coordinator (monotonic; 0: not released by a result in the turn that pushed
        # it), when the router reported it dispatched (monotonic; 0: not yet).
        self.ready_at = ready_at
        self.released_at = released_at
        self.dispatched_at = 0.0


class _Waiter:
    """A ``wait`` CALL not answered yet."""

    __slots__ = ("endpoint", "corr", "prio", "ids", "remaining", "timer")

    def __init__(self, endpoint: int, corr: int, prio: int, ids: list[str], remaining: set[str]) -> None:
        self.endpoint = endpoint
        self.corr = corr
        self.prio = prio
        self.ids = ids
        self.remaining = remaining
        self.timer: asyncio.TimerHandle | None = None


def _frame(typ: int, prio: int, flags: int, dst: int, corr: int, payload: bytes) -> bytes:
    return _HDR.pack(_MAGIC, _VERSION, typ, prio, flags, len(payload), 0, _EP, dst, corr, 0) + payload


class Coordinator:
    """Runs the protocol's coordinator side over one ``RouterLink`` and one ``Scheduler``.

    ``run()`` is the main task; ``drain()`` is the ordered shutdown of the work (the daemon calls it on
    SIGTERM, then stops the link).  Not thread-safe: everything runs on the event loop's thread.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        link: RouterLink,
        config: DaemonConfig,
        *,
        prefetch_per_agent: int = 2,
        tick_s: float | None = None,
        push_before_commit: bool = True,
    ) -> None:
        self.scheduler = scheduler
        self.link = link
        self.config = config
        self.mode = "INTELLIGENT"  # the daemon's execution mode (set_mode); WELCOME tells it to every client
        self.wip_factor = 1.0  # < 1 while degraded: the WIP limits are lowered (docs/modes.md)
        self.shadow: RoutingShadow | None = None  # REDUNDANT: the Python routing decision, compared (shadow.py)
        self._apply_wip_limit(config)
        self.prefetch_per_agent = prefetch_per_agent
        self.push_before_commit = push_before_commit
        self._tick_override = tick_s
        self._lease_s = config.lease_s
        self._peers: dict[int, _Peer] = {}
        self._dispatches: dict[int, _Dispatch] = {}
        # Dispatch ids only need to be unique per push, but an agent may send a RESULT for a dispatch of a
        # previous daemon after a restart: starting from the clock keeps the ids of two lives apart.
        self._next_did = time.time_ns()
        self._credit: Counter[str] = Counter()  # per agent_type: total credit of connected agents
        self._agents_n: Counter[str] = Counter()  # per agent_type: connected agents
        self._outstanding: Counter[str] = Counter()  # per agent_type: pushed dispatches not resolved
        self._queue_ids: dict[str, int] = {}
        # Collected during a turn, applied in one transaction by _flush:
        self._done: list[tuple[str, int, Any, int, int, int]] = []  # id, token, result, src, corr, prio
        self._failed: list[tuple[str, int, str, bool, int, int, int]] = []  # id, token, error, transient, ...
        self._beats: list[tuple[str, int]] = []
        self._beat_replies: list[tuple[int, int, int, list[tuple[str, int]]]] = []  # src, corr, prio, items
        self._lost: list[tuple[str, int]] = []  # released with the attempt counted (agent lost)
        self._unsent: list[tuple[str, int]] = []  # released without counting (never reached an agent)
        self._out: list[bytes] = []
        # SPEED_CRITICAL: parent dispatch id -> (child dispatch id, task id, reserved token, agent type), and
        # the continuations the router released this turn (task id, token, dispatch id), claimed by _flush.
        self._continuations: dict[int, tuple[int, str, int, str]] = {}
        self._released_conts: list[tuple[str, int, int]] = []
        self._waiters: list[_Waiter] = []
        self._wait_index: dict[str, list[_Waiter]] = {}
        self._waits_dirty = False
        self._stats_pending: dict[int, asyncio.Future[Any]] = {}  # CTL_STATS corr -> its answer
        self._background: set[asyncio.Task[None]] = set()
        self._next_ctl = 1
        self.draining = False
        self._paused = False
        self._changed = asyncio.Event()
        self.counters: Counter[str] = Counter()
        self.started = time.monotonic()
        self.handoff_latency = Histogram()
        self.queue_wait = Histogram()
        self.run_time = Histogram()
        self._turn_t0 = 0.0  # time.monotonic() at the start of the current turn
        # The daemon's execution mode for the "mode" and "mode_set" CALLs (`baton mode`); None outside a daemon.
        self.mode_report: Callable[[], dict[str, Any]] | None = None
        self.mode_request: Callable[[str], dict[str, Any]] | None = None  # raises ValueError for a bad mode

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def tick_s(self) -> float:
        if self._tick_override is not None:
            return self._tick_override
        return min(1.0, self._lease_s / 8)

    async def run(self) -> None:
        """Handle the router's batches until the link goes away (RouterGone propagates to the caller)."""
        ticker = asyncio.create_task(self._ticker(), name="baton-coordinator-tick")
        try:
            self._pump_now()
            recv = self.link.recv
            while True:
                frames = await recv()
                self._turn(frames)
        finally:
            ticker.cancel()
            for w in self._waiters:
                if w.timer is not None:
                    w.timer.cancel()
            self._no_stats()
            for task in list(self._background):
                task.cancel()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick()
            except RouterGone:
                return
            except Exception:
                log.exception("coordinator tick failed")

    def reconfigure(self, config: DaemonConfig) -> None:
        """Apply the settings that can change while running (SIGHUP): wip_per_agent_type (the scheduler's
        limit, from the next claim on), lease_s (for claims and renewals from now on), drain_timeout_s."""
        old = self.config
        self.config = config
        self._lease_s = config.lease_s
        if config.wip_per_agent_type != old.wip_per_agent_type:
            self._apply_wip_limit(config)
            self._pump_now()

    def _apply_wip_limit(self, config: DaemonConfig) -> None:
        """``wip_per_agent_type`` is the scheduler's WIP limit (docs/scheduler.md): tasks of one agent_type in
        progress at once, over all its agents; tasks pushed to the router count, since they are claimed.  Each
        agent's credit is the wip it declared: the limit decides how many tasks exist to hand out, the credit
        how they are spread.  While degraded the limit is lowered by ``wip_factor`` (at least one task)."""
        sch = self.scheduler
        limit = max(1, int(config.wip_per_agent_type * self.wip_factor))
        sch.config = dataclasses.replace(sch.config, wip_per_agent_type=limit)

    def set_wip_factor(self, factor: float) -> None:
        """Lower (or restore) parallelism: tasks already running keep running, claims follow the new limit."""
        if factor != self.wip_factor:
            self.wip_factor = factor
            self._apply_wip_limit(self.config)
            self._pump_now()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode != "REDUNDANT":
            self.shadow = None
        elif self.shadow is None:
            self._start_shadow()

    def _start_shadow(self) -> None:
        """The shadow of the router's present state: the agents and credits granted, the tasks they hold, the
        tasks queued (in an order the shadow cannot know, so never counted as skipped)."""
        shadow = self.shadow = RoutingShadow()
        for peer in self._peers.values():
            if peer.agent_type is not None and peer.credit:
                shadow.agent(peer.endpoint, self._queue_id(peer.agent_type), peer.credit)
        for d in self._dispatches.values():
            if d.endpoint:
                shadow.holding(d.endpoint, d.id)
            else:
                shadow.pushed(self._queue_id(d.agent_type), d.id, 0, ordered=False)

    def publish_system(self, event: dict[str, Any]) -> None:
        """Tell every subscriber of SYSTEM_TOPIC (a mode switch, a recovery step); best effort."""
        frame = _frame(_T_PUBLISH, _HIGH, 0, protocol.topic_id(SYSTEM_TOPIC), 0, _pack(event))
        try:
            self._send_now([frame])
        except RouterGone:
            self._out.clear()

    def adopt_link(self, link: RouterLink) -> None:
        """Carry on through another router after the old one died (the daemon's switch to PYTHON_ONLY,
        docs/daemon.md "Router failure").  Every connection died with the old router, so everything that
        lived only there is rebuilt from the coordinator's side, without losing or repeating a task:

        - tasks queued in the dead router, never dispatched, go back to ready without an attempt;
        - tasks an agent holds stay running under their lease: the agent reconnects and resends its RESULT
          (kept until acknowledged) or HEARTBEATs, accepted under the same fencing token; an agent that does
          not come back loses them when the lease expires, as any silent agent;
        - agents, credits, waits and statistics requests of the old connections are forgotten (clients see a
          lost connection and call again)."""
        self.link = link
        if self.shadow is not None:
            self.shadow = RoutingShadow()  # the new router starts empty too
        self._peers.clear()
        self._continuations.clear()  # the new router holds none
        self._credit.clear()
        self._agents_n.clear()
        self._outstanding.clear()
        for d in self._dispatches.values():
            if d.endpoint == 0:
                self._unsent.append((d.task_id, d.token))
        self._dispatches.clear()
        for w in list(self._waiters):
            self._drop_waiter(w)
        self._no_stats()
        if self._paused:
            self._out.append(_frame(_T_CTL_PAUSE, _HIGH, 0, 0, 0, protocol.CTL_PAUSE.pack(1)))
        self._flush()
        self._send()

    def begin_drain(self) -> None:
        """Stop taking work: enqueue and import answer ``draining``, the router dispatches no new task."""
        if self.draining:
            return
        self.draining = True
        self._paused = True
        self._send_now([_frame(_T_CTL_PAUSE, _HIGH, 0, 0, 0, protocol.CTL_PAUSE.pack(1))])

    def running_dispatched(self) -> int:
        """Tasks held by agents right now (dispatched, no RESULT yet)."""
        return sum(1 for d in self._dispatches.values() if d.endpoint)

    async def drain(self, timeout_s: float) -> int:
        """The ordered end of the work: pause dispatch, wait up to ``timeout_s`` for the tasks agents hold,
        then give every task still pushed back to ready without counting an attempt (it was either never
        started or is being abandoned by the daemon, not by its agent) and persist.  Returns how many tasks
        were given back."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # A barrier: the router answers this after the DISPATCHED notices of every task it handed out before the
        # pause, so a task an agent has just received counts as running (waited for), not as still queued.
        await self.router_stats(min(timeout_s, _STATS_TIMEOUT_S))
        while self.running_dispatched():
            left = deadline - loop.time()
            if left <= 0 or not self.link.alive:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        held = self.running_dispatched()
        if held:
            log.warning("drain timeout: giving %d running task(s) back to ready", held)
        for d in list(self._dispatches.values()):
            self._resolve(d)
            self._unsent.append((d.task_id, d.token))
        n = len(self._unsent)
        self._flush()
        self._send()
        return n

    # --- the turn ----------------------------------------------------------------------------------------

    def _turn(self, frames: Sequence[bytes]) -> None:
        self._turn_t0 = time.monotonic()
        self.counters["turns"] += 1
        self.counters["frames_in"] += len(frames)
        unpack_from = _HDR.unpack_from
        for f in frames:
            typ = flags = src = corr = prio = 0
            try:
                _, _, typ, prio, flags, plen, _, src, _, corr, _ = unpack_from(f)
                payload = f[_HSIZE : _HSIZE + plen]
                if typ == _T_RESULT:
                    self._on_result(src, corr, prio, flags, payload)
                elif typ == _T_DISPATCHED:
                    self._on_dispatched(payload)
                elif typ == _T_HEARTBEAT:
                    self._on_heartbeat(src, corr, prio, flags, payload)
                elif typ == _T_CALL:
                    if not flags & _F_REPLY:
                        self._flush()  # a CALL sees every result that arrived before it
                        self._on_call(src, corr, prio, payload)
                elif typ == _T_HELLO:
                    if not flags & _F_REPLY:
                        self._on_hello(src, corr, prio, payload)
                elif typ == _T_EP_OPEN:
                    self._on_open(src, payload)
                elif typ == _T_EP_CLOSED:
                    self._on_closed(src, payload)
                elif typ == _T_ROUTER_LOG:
                    self._on_router_log(payload)
                elif typ == _T_CONTINUED:
                    # Applied at once: the parents' RESULTs before it complete first (so each released child
                    # is ready when it is claimed), and a child's own RESULT later in this batch finds it running.
                    self._on_continued(payload)
                    self._flush()
                elif typ == _T_ROUTER_STATS:
                    self._on_router_stats(corr, payload)
                elif typ == _T_CTL_REVOKE:
                    log.debug("revoke answered: %r", _unpack(payload) if payload else None)
                elif not flags & _F_REPLY and src != 0:
                    self._error(typ, src, corr, prio, ErrorCode.UNKNOWN_TYPE,
                                f"the coordinator does not take frames of type {typ}")
            except Exception:
                log.exception("failed to handle a frame")
                if not flags & _F_REPLY and src:
                    self._error(typ, src, corr, prio, ErrorCode.INTERNAL, "internal error (logged)")
        self._flush()
        self._send()
        self._changed.set()

    def _send(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.link.send(out)

    def _send_now(self, frames: list[bytes]) -> None:
        self._out.extend(frames)
        self._send()

    def _pump_now(self) -> None:
        """A turn with no frames: fill the work queues (after start, a reload, an enqueue outside a turn)."""
        self._flush(force=True)
        self._send()

    def _reply(self, typ: int, dst: int, corr: int, prio: int, result: Any) -> None:
        self._out.append(_frame(typ, prio, _F_REPLY, dst, corr, _pack(result)))

    def _error(
        self, typ: int, dst: int, corr: int, prio: int, code: str, message: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        body: dict[str, Any] = {"code": code, "message": message}
        if details:
            body["details"] = details
        self.counters["errors_sent"] += 1
        self._out.append(_frame(typ, prio, _F_REPLY | _F_ERROR, dst, corr, _pack(body)))

    # --- connections -------------------------------------------------------------------------------------

    def _on_open(self, src: int, payload: bytes) -> None:
        try:
            pid, uid, gid = _unpack(payload)
        except (ValueError, TypeError):
            pid = uid = gid = -1
        self._peers[src] = _Peer(src, int(pid), int(uid), int(gid))
        log.debug("endpoint %d connected (pid %s uid %s)", src, pid, uid)

    def _on_hello(self, src: int, corr: int, prio: int, payload: bytes) -> None:
        try:
            hello = _unpack(payload)
        except (ValueError, TypeError):
            hello = None
        problems: list[str] = []
        if not isinstance(hello, dict):
            self._error(_T_HELLO, src, corr, prio, ErrorCode.INVALID_REQUEST, "HELLO payload must be a msgpack map")
            return
        if hello.get("v") != protocol.PROTOCOL_VERSION:
            problems.append(f"v: protocol version {hello.get('v')!r} is not supported (this daemon speaks 1)")
        name = hello.get("name", "")
        if not isinstance(name, str):
            problems.append("name: expected a string")
        pid = hello.get("pid", -1)
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append("pid: expected an integer")
        agent_type = hello.get("agent_type")
        if agent_type is not None and (not isinstance(agent_type, str) or not _AGENT_TYPE_RE.match(agent_type)):
            problems.append("agent_type: must be nil or 1-64 chars of letters, digits and _.:- ")
        caps = hello.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            problems.append("capabilities: expected a list of strings")
        wip = hello.get("wip", 1)
        if not isinstance(wip, int) or isinstance(wip, bool) or (agent_type is not None and wip < 1):
            problems.append("wip: expected an integer >= 1")
        if problems:
            self._error(_T_HELLO, src, corr, prio, ErrorCode.INVALID_REQUEST, "invalid HELLO: " + "; ".join(problems))
            return
        peer = self._peers.get(src)
        if peer is None:  # no EP_OPEN seen (a router that does not send it): credentials unknown
            peer = self._peers[src] = _Peer(src)
        if peer.agent_type is not None and peer.credit:
            self._set_credit(peer, 0)  # a second HELLO replaces the first
        peer.hello = True
        peer.name = name
        if pid >= 0 and peer.pid < 0:
            peer.pid = pid
        peer.capabilities = caps
        peer.agent_type = agent_type
        peer.wip = wip
        lease = self._lease_s
        self._reply(_T_WELCOME, src, corr, prio, {
            "endpoint": src, "server": SERVER_NAME, "max_payload": self.config.max_frame_bytes,
            "lease_s": lease, "heartbeat_s": lease / 3, "mode": self.mode,
        })
        if agent_type is not None:
            self._agents_n[agent_type] += 1
            self._set_credit(peer, min(wip, MAX_CREDIT))
            log.info("agent %d (%s, pid %s) serves %s with credit %d", src, name, peer.pid, agent_type, peer.credit)

    def _set_credit(self, peer: _Peer, credit: int) -> None:
        assert peer.agent_type is not None
        t = peer.agent_type
        self._credit[t] += credit - peer.credit
        peer.credit = credit
        q = self._queue_id(t) if credit else 0
        if self.shadow is not None:
            self.shadow.agent(peer.endpoint, q, credit)
        self._out.append(_frame(_T_CTL_AGENT, _HIGH, 0, 0, 0, protocol.CTL_AGENT.pack(peer.endpoint, q, credit)))

    def _queue_id(self, agent_type: str) -> int:
        q = self._queue_ids.get(agent_type)
        if q is None:
            q = self._queue_ids[agent_type] = protocol.queue_id(agent_type)
        return q

    def _on_closed(self, src: int, payload: bytes) -> None:
        try:
            dids = _unpack(payload) if payload else []
        except (ValueError, TypeError):
            dids = []
        peer = self._peers.pop(src, None)
        if self.shadow is not None:
            self.shadow.closed(src)
        held = set(dids if isinstance(dids, list) else [])
        if peer is not None:
            held |= peer.held
            if peer.agent_type is not None and peer.hello:
                self._agents_n[peer.agent_type] -= 1
                self._credit[peer.agent_type] -= peer.credit
        lost = 0
        for did in held:
            d = self._dispatches.get(did) if isinstance(did, int) else None
            if d is not None:
                self._resolve(d)
                self._lost.append((d.task_id, d.token))
                lost += 1
        for w in [w for w in self._waiters if w.endpoint == src]:
            self._drop_waiter(w)
        if lost and peer is not None and peer.agent_type is not None:
            self.counters["agent_comm_failures"] += 1  # an agent cut off mid-work: a health trigger counts these
        log.info("endpoint %d disconnected; %d running task(s) go back to ready", src, lost,
                 extra={"endpoint": src, "agent_type": peer.agent_type if peer else None})

    def _on_router_log(self, payload: bytes) -> None:
        try:
            level, message = _unpack(payload)
        except (ValueError, TypeError):
            level, message = "warning", f"unreadable router log line {bytes(payload)!r}"
        router_log.log(logging.getLevelName(str(level).upper()) if isinstance(level, str) else logging.WARNING,
                       "%s", message)

    # --- task flow ---------------------------------------------------------------------------------------

    def _on_dispatched(self, payload: bytes) -> None:
        flat = _unpack(payload)
        dispatches, peers = self._dispatches, self._peers
        now = self.scheduler.clock()
        renew_before = now + self._lease_s / 2
        mono = time.monotonic()
        # Histogram.observe spelled out for the queue wait: this loop runs once per task dispatched.
        wait_counts, waited = self.queue_wait.counts, 0.0
        fenced = self._diverged(self.shadow.check(flat)) if self.shadow is not None else ()
        for i in range(0, len(flat) - 1, 2):
            if fenced and flat[i + 1] in fenced:
                continue
            d = dispatches.get(flat[i + 1])
            if d is None:
                continue
            ep = flat[i]
            d.endpoint = ep
            d.dispatched_at = mono
            w = now - d.ready_at
            if w < 0.0:
                w = 0.0
            wait_counts[bisect_left(_BUCKETS_S, w)] += 1
            waited += w
            if d.released_at:
                self.handoff_latency.observe(mono - d.released_at)
            peer = peers.get(ep)
            if peer is not None:
                peer.held.add(d.id)
            if d.expires < renew_before:  # waited long in the queue: give the agent a whole lease to start
                self._beats.append((d.task_id, d.token))
        self.queue_wait.sum += waited
        self.counters["dispatched"] += len(flat) // 2

    def _diverged(self, problems: list[tuple[int, str]]) -> set[int]:
        """REDUNDANT: the native dispatches the shadow disagrees with.  The Python decision wins: each is fenced
        off (the task goes back to ready under a new token, without an attempt counted; the agent's RESULT for
        it will be refused as stale) and the task is pushed again, in order.  Returns their dispatch ids."""
        for did, problem in problems:
            self.counters["redundant_divergences"] += 1
            log.warning("REDUNDANT: the native router diverged from the Python decision: %s; the Python decision "
                        "wins (task fenced and pushed again)", problem, extra={"divergence": problem})
            d = self._dispatches.get(did)
            if d is not None:
                self._resolve(d)
                self._unsent.append((d.task_id, d.token))
        return {did for did, _ in problems}

    def _on_result(self, src: int, corr: int, prio: int, flags: int, payload: bytes) -> None:
        if flags & _F_REPLY:
            return
        if self.shadow is not None:
            self.shadow.result(src, corr)
        peer = self._peers.get(src)
        if peer is None or not peer.hello:
            self._error(_T_RESULT, src, corr, prio, ErrorCode.FORBIDDEN, "RESULT before HELLO was answered")
            return
        try:
            r = _unpack(payload)
            tid = r["id"]
            token = r["token"]
            ok = r["ok"]
            if not isinstance(tid, str) or type(token) is not int or type(ok) is not bool:
                raise TypeError
        except (ValueError, TypeError, KeyError):
            self._error(_T_RESULT, src, corr, prio, ErrorCode.INVALID_REQUEST,
                        'RESULT payload must be {"id": str, "token": int, "ok": bool, "result"/"error": ...}')
            return
        d = self._dispatches.get(corr)
        if d is not None and d.task_id == tid and d.token == token:
            if d.dispatched_at:
                ran = self._turn_t0 - d.dispatched_at
                self.run_time.counts[bisect_left(_BUCKETS_S, ran)] += 1  # Histogram.observe, spelled out
                self.run_time.sum += ran
            self._resolve(d)
        if ok:
            self._done.append((tid, token, r.get("result"), src, corr, prio))
        else:
            err = r.get("error")
            self._failed.append((tid, token, err if isinstance(err, str) else repr(err),
                                 r.get("transient", True) is not False, src, corr, prio))

    def _resolve(self, d: _Dispatch) -> None:
        """Forget a dispatch (result in, agent lost, revoked, lease gone): the room is free again."""
        if self._dispatches.pop(d.id, None) is None:
            return
        self._outstanding[d.agent_type] -= 1
        if d.endpoint:
            peer = self._peers.get(d.endpoint)
            if peer is not None:
                peer.held.discard(d.id)

    def _on_heartbeat(self, src: int, corr: int, prio: int, flags: int, payload: bytes) -> None:
        if flags & _F_REPLY:
            return
        peer = self._peers.get(src)
        if peer is None or not peer.hello:
            self._error(_T_HEARTBEAT, src, corr, prio, ErrorCode.FORBIDDEN, "HEARTBEAT before HELLO was answered")
            return
        try:
            held = _unpack(payload)["held"]
            items = [(str(t), int(k)) for t, k in held]
        except (ValueError, TypeError, KeyError):
            self._error(_T_HEARTBEAT, src, corr, prio, ErrorCode.INVALID_REQUEST,
                        'HEARTBEAT payload must be {"held": [[task_id, fencing_token], ...]}')
            return
        self._beats.extend(items)
        if corr:
            self._beat_replies.append((src, corr, prio, items))

    def _flush(self, *, force: bool = False) -> None:
        """Apply what the turn collected in one transaction and fill the work queues.  TASK frames go out before
        the commit when their tokens are durable (see the module docstring), replies only after it."""
        done, failed, beats, lost, unsent = self._done, self._failed, self._beats, self._lost, self._unsent
        conts = self._released_conts
        if not (done or failed or beats or lost or unsent or conts or force or self._can_pump()):
            if self._waits_dirty and self._waiters:
                self._recheck_waits()
            return
        self._done, self._failed, self._beats, self._lost, self._unsent = [], [], [], [], []
        self._released_conts = []
        beat_replies, self._beat_replies = self._beat_replies, []
        sch = self.scheduler
        acks: list[tuple[int, int, int, bool, str | None]] = []
        claims: list[TaskRecord] = []
        released: frozenset[str] = frozenset()  # dependents this turn's results made ready
        refused: dict[str, str] = {}
        renewed: dict[str, float] = {}
        completed: list[str] = []
        pushed_early = False
        try:
            with sch.transaction(deferred=True):
                if lost:
                    sch.release_many(lost, reason="agent disconnected", count_attempt=True)
                if unsent:
                    sch.release_many(unsent, reason="never dispatched", count_attempt=False)
                if done:
                    judged = self._one_result_per_task(done)
                    outcome = sch.complete_many(list(judged.values()))
                    completed = outcome.applied
                    rejected = outcome.rejected
                    if outcome.released:
                        released = frozenset(outcome.released)
                    for tid, token, _, src, corr, prio in done:
                        if self._is_recorded(tid, token, _COMPLETED):
                            acks.append((src, corr, prio, True, None))
                        elif judged[tid][1] != token:
                            acks.append((src, corr, prio, False, self._stale(tid, token)))
                        elif tid in rejected:
                            acks.append((src, corr, prio, False, rejected[tid]))
                        else:
                            acks.append((src, corr, prio, True, None))
                for tid, token, error, transient, src, corr, prio in failed:
                    acks.append(self._fail_one(tid, token, error, transient, src, corr, prio))
                if conts:
                    self._claim_continuations(conts)
                if beats:
                    renewed, refused = sch.heartbeat_many(beats, lease_s=self._lease_s)
                if not self._paused:
                    claims = self._claim()
                if claims and self.push_before_commit and sch.store.fence_durable(claims[-1].token):
                    # Push before the commit (docs/daemon.md, "Push before commit"): the tokens come from a
                    # fence block that is already durable, so no restart can hand them out again.  Everything
                    # else in _out describes committed state; the RESULT acks are queued after the commit.
                    self._push(claims, released)
                    claims = []
                    pushed_early = True
                    self._send()
        except Exception:
            log.exception("applying a batch failed; the scheduler rolled it back")
            if pushed_early:
                self._sweep()  # the pushed claims were rolled back: revoke those still queued
            for tid, token, _, src, corr, prio in done:
                self._error(_T_RESULT, src, corr, prio, ErrorCode.INTERNAL, "the result could not be stored")
            for tid, token, _, _, src, corr, prio in failed:
                self._error(_T_RESULT, src, corr, prio, ErrorCode.INTERNAL, "the result could not be stored")
            return
        for src, corr, prio, accepted, reason in acks:
            self.counters["results_accepted" if accepted else "results_refused"] += 1
            if corr or not accepted:
                self._reply(_T_RESULT, src, corr, prio, {"accepted": accepted, "reason": reason})
        for src, corr, prio, items in beat_replies:
            self._reply(_T_HEARTBEAT, src, corr, prio,
                        {"renewed": sum(1 for t, _ in items if t in renewed),
                         "stale": {t: refused[t] for t, _ in items if t in refused}})
        if renewed:
            by_task = {(d.task_id, d.token): d for d in self._dispatches.values()}
            for tid, exp in renewed.items():
                rec = sch.record(tid)
                d = by_task.get((tid, rec.token)) if rec is not None else None
                if d is not None:
                    d.expires = exp
        if claims:
            self._push(claims, released)
        if self._waiters:
            if failed or lost or unsent or self._waits_dirty:
                self._recheck_waits()
            elif completed:
                self._note_terminal(completed)

    def _one_result_per_task(self, done: Sequence[tuple[str, int, Any, int, int, int]]
                             ) -> dict[str, tuple[str, int, Any]]:
        """The result the scheduler judges for each task of this turn.  Results of two attempts of one task can
        arrive in the same turn (an agent resends the first attempt's result after a reconnect while the second
        attempt finishes); the scheduler takes one result per task, so give it the one under the current token
        (the others are stale by definition)."""
        judged: dict[str, tuple[str, int, Any]] = {}
        for tid, token, result, *_ in done:
            first = judged.get(tid)
            if first is None or (first[1] != token and self._current_token(tid) == token):
                judged[tid] = (tid, token, result)
        return judged

    def _current_token(self, tid: str) -> int | None:
        rec = self.scheduler.record(tid)
        return None if rec is None else rec.token

    def _stale(self, tid: str, token: int) -> str:
        return f"task {tid}: fencing token {token} is stale (current {self._current_token(tid)})"

    def _is_recorded(self, tid: str, token: int, status: str) -> bool:
        """A RESULT for an outcome already recorded under the same token (a resend after a reconnect)."""
        rec = self.scheduler.record(tid)
        return rec is not None and rec.token == token and rec.status == status

    def _fail_one(
        self, tid: str, token: int, error: str, transient: bool, src: int, corr: int, prio: int
    ) -> tuple[int, int, int, bool, str | None]:
        try:
            self.scheduler.fail(tid, token, error, transient=transient)
        except (StaleLease, InvalidTransition, UnknownTask) as exc:
            rec = self.scheduler.record(tid)
            if rec is not None and rec.token == token and rec.status != _RUNNING and rec.history and \
                    rec.history[-1].get("fencing_token") == token and rec.history[-1].get("outcome", "").startswith(
                        "failed"):
                return (src, corr, prio, True, None)  # this failure is recorded already
            return (src, corr, prio, False, str(exc))
        return (src, corr, prio, True, None)

    def _can_pump(self) -> bool:
        if self._paused:
            return False
        sch = self.scheduler
        for t, credit in self._credit.items():
            if credit > 0 and credit + self._prefetch(t) > self._outstanding[t] and sch.has_ready(t):
                return True
        return False

    def _prefetch(self, agent_type: str) -> int:
        return self.prefetch_per_agent * self._agents_n[agent_type]

    def _claim(self) -> list[TaskRecord]:
        """Claim ready tasks into the room each work queue has (inside the turn's transaction)."""
        sch = self.scheduler
        out: list[TaskRecord] = []
        for t, credit in self._credit.items():
            if credit <= 0:
                continue
            room = credit + self._prefetch(t) - self._outstanding[t]
            if room > 0 and sch.has_ready(t):
                out += sch.claim_records(t, ROUTER_HOLDER, room, lease_s=self._lease_s)
        return out

    def _push(self, claims: list[TaskRecord], released: frozenset[str] = frozenset()) -> None:
        """TASK frames for claimed tasks (and, in SPEED_CRITICAL, their continuations)."""
        out = self._out
        dispatches = self._dispatches
        outstanding = self._outstanding
        did = self._next_did
        ts = time.monotonic_ns()
        shadow = self.shadow
        speed = self.mode == "SPEED_CRITICAL"
        for rec in claims:
            tid, t, token = rec.id, rec.agent_type, rec.token
            did += 1
            prio = _HIGH if rec.base_priority >= _HIGH_FROM else _NORMAL
            qid = self._queue_id(t)
            out.append(self._task_frame(rec, token, rec.attempts, qid, did, prio, ts))
            if shadow is not None:
                shadow.pushed(qid, did, prio)
            dispatches[did] = _Dispatch(did, tid, token, t, rec.expires or 0.0,  # a claim always sets expires
                                        rec.ready_at or rec.updated, self._turn_t0 if tid in released else 0.0)
            outstanding[t] += 1
            if speed:
                self._next_did = did
                self._extend_chain(rec, did, ts)
                did = self._next_did
        self._next_did = did
        self.counters["tasks_pushed"] += len(claims)

    def _task_frame(self, rec: TaskRecord, token: int, attempt: int, qid: int, did: int, prio: int,
                    ts: int) -> bytes:
        """A TASK frame.  The stored input blob is already msgpack: it is spliced into the payload as is instead
        of being decoded and encoded again."""
        packb = ormsgpack.packb
        blob = rec.input
        if blob is None:
            inp = _NIL
        elif blob[0] == _RAW_TAG:
            inp = packb(blob[1:])
        else:
            inp = blob[1:]
        spec = rec.spec
        meta = _pack(msgpack.unpackb(spec, raw=False, strict_map_key=False).get("metadata", {})) \
            if _META_KEY in spec else _EMPTY_MAP
        head = packb({"id": rec.id, "token": token, "agent_type": rec.agent_type, "attempt": attempt,
                      "lease_s": self._lease_s, "timeout_s": rec.timeout})
        # head is a fixmap of 6 entries (0x86): make it 8 and append the two spliced ones.
        payload = b"".join((b"\x88", head[1:], b"\xa5input", inp, b"\xa8metadata", meta))
        return _HDR.pack(_MAGIC, _VERSION, _T_TASK, prio, 0, len(payload), 0, _EP, qid, did, ts) + payload

    # --- SPEED_CRITICAL: continuations (docs/modes.md) -----------------------------------------------------

    def _extend_chain(self, rec: TaskRecord, did: int, ts: int) -> None:
        """Keep CHAIN_AHEAD continuations registered after a task just pushed or released (rec, dispatch did):
        each link's own continuation is registered before the link runs, so a fast agent's RESULT finds it
        in the router (registered one at a time, the next link often came after that RESULT and took the
        ordinary path)."""
        conts = self._continuations
        depth = 0
        tail: TaskRecord | None = rec
        if did in conts:  # follow the links registered already to the chain's end
            while did in conts and depth < CHAIN_AHEAD:
                did, tid = conts[did][0], conts[did][1]
                depth += 1
            tail = self.scheduler.record(tid)
        while tail is not None and depth < CHAIN_AHEAD:
            link = self._continue(tail, did, ts)
            if link is None:
                return
            tail, did = link
            depth += 1

    def _continue(self, parent: TaskRecord, parent_did: int, ts: int) -> tuple[TaskRecord, int] | None:
        """Hand the router the parent's continuation, if it has one: the dependent's TASK frame under a token
        reserved now, which the router pushes into its work queue itself when the parent's agent reports
        success (CTL_CONTINUE, after the parent's TASK or continuation: the router refuses a continuation of a
        dispatch it does not know).  The coordinator claims it when the router says it did (CONTINUED).
        Returns the continuation and its dispatch id."""
        sch = self.scheduler
        child = sch.continuation_of(parent.id)
        if child is None:
            return None
        token = sch.reserve_fence()
        if not sch.store.fence_durable(token):
            return None  # this frame may leave before the commit; such a token could be handed out again
        self._next_did += 1
        did = self._next_did
        prio = _HIGH if child.base_priority >= _HIGH_FROM else _NORMAL
        frame = self._task_frame(child, token, child.attempts + 1, self._queue_id(child.agent_type), did, prio, ts)
        self._out.append(_frame(_T_CTL_CONTINUE, _HIGH, 0, 0, 0, protocol.ctl_continue_payload(parent_did, frame)))
        self._continuations[parent_did] = (did, child.id, token, child.agent_type)
        self.counters["continuations"] += 1
        return child, did

    def _on_continued(self, payload: bytes) -> None:
        """The router released (1) or discarded (0) parents' continuations.  A released one is a dispatch from
        now on (DISPATCHED may follow in this very batch); the flush that follows claims it under its token."""
        flat = _unpack(payload)
        conts = self._continuations
        now = self.scheduler.clock()
        for i in range(0, len(flat) - 1, 2):
            c = conts.pop(flat[i], None)
            if c is None or not flat[i + 1]:
                continue
            self.counters["continuations_released"] += 1
            did, tid, token, agent_type = c
            self._dispatches[did] = _Dispatch(did, tid, token, agent_type, now + self._lease_s, now, self._turn_t0)
            self._outstanding[agent_type] += 1
            self._released_conts.append((tid, token, did))

    def _claim_continuations(self, items: list[tuple[str, int, int]]) -> None:
        """Record the continuations the router released (after this turn's results are applied, so that each
        is ready).  One that cannot be claimed (its parent's success was refused as stale, it was cancelled,
        its type is at the WIP limit) is taken back: revoked while still queued, else fenced (its agent's
        RESULT will be refused as stale)."""
        sch = self.scheduler
        claimed, refused = sch.claim_reserved([(tid, token) for tid, token, _ in items], ROUTER_HOLDER,
                                              lease_s=self._lease_s)
        speed = self.mode == "SPEED_CRITICAL"
        ts = time.monotonic_ns()
        by_id = {rec.id: rec for rec in claimed}
        for tid, _, did in items:
            d = self._dispatches.get(did)
            rec = by_id.get(tid)
            if rec is not None:
                if d is not None:
                    d.expires = rec.expires or d.expires
                if speed:
                    self._extend_chain(rec, did, ts)  # the links after it
            elif d is not None:
                log.info("continuation %s not recorded (%s): taken back", tid, refused.get(tid))
                self._resolve(d)
                if d.endpoint == 0:
                    self._revoke(d)

    # --- periodic work -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Renew the leases of tasks still queued in the router, expire the leases of silent agents, forget
        dispatches whose task is no longer running under their token (revoking the queued ones), refill."""
        sch = self.scheduler
        now = sch.clock()
        threshold = now + self._lease_s * 0.75
        for d in self._dispatches.values():
            if d.endpoint == 0 and d.expires < threshold:
                self._beats.append((d.task_id, d.token))
        try:
            with sch.transaction(deferred=True):
                expired = sch.expire_leases()
                if expired:
                    log.info("%d lease(s) expired: %s", len(expired), expired[:10])
                    self._waits_dirty = True
        except Exception:
            log.exception("expiring leases failed")
        self._sweep()
        self._flush()
        self._send()

    def _sweep(self) -> None:
        """Forget dispatches whose task left ``running`` under their token (lease expired, cancelled).  A
        queued one is revoked so no agent runs it; a held one is left to its agent, whose RESULT will be
        refused as stale."""
        record = self.scheduler.record_map().get
        for d in list(self._dispatches.values()):
            rec = record(d.task_id)
            if rec is not None and rec.status == _RUNNING and rec.token == d.token:
                continue
            self._resolve(d)
            if d.endpoint == 0:
                self._revoke(d)

    def _revoke(self, d: _Dispatch) -> None:
        """Take a pushed task out of the router's work queue (if no agent got it yet)."""
        if self.shadow is not None:
            self.shadow.revoked(d.id)
        self._out.append(_frame(_T_CTL_REVOKE, _HIGH, 0, 0, self._ctl_corr(),
                                protocol.CTL_REVOKE.pack(self._queue_id(d.agent_type), d.id)))

    def _ctl_corr(self) -> int:
        self._next_ctl += 1
        return self._next_ctl

    # --- waits -------------------------------------------------------------------------------------------

    def _note_terminal(self, ids: list[str]) -> None:
        index = self._wait_index
        for tid in ids:
            ws = index.get(tid)
            if ws is None:
                continue
            for w in ws:
                w.remaining.discard(tid)
                if not w.remaining:
                    self._answer_wait(w, timed_out=False)

    def _recheck_waits(self) -> None:
        self._waits_dirty = False
        rec_of = self.scheduler.record_map().get
        for w in list(self._waiters):
            w.remaining = {t for t in w.remaining if (r := rec_of(t)) is not None and r.status not in _TERMINAL_VALUES}
            if not w.remaining:
                self._answer_wait(w, timed_out=False)

    def _answer_wait(self, w: _Waiter, *, timed_out: bool) -> None:
        if w not in self._waiters:
            return
        self._drop_waiter(w)
        rec_of = self.scheduler.record_map().get
        statuses = {t: (r.status if (r := rec_of(t)) is not None else None) for t in w.ids}
        self._reply(_T_CALL, w.endpoint, w.corr, w.prio, {"statuses": statuses, "timed_out": timed_out})

    def _drop_waiter(self, w: _Waiter) -> None:
        self._waiters.remove(w)
        if w.timer is not None:
            w.timer.cancel()
        for t in w.ids:
            ws = self._wait_index.get(t)
            if ws is not None:
                if w in ws:
                    ws.remove(w)
                if not ws:
                    del self._wait_index[t]

    def _wait_timeout(self, w: _Waiter) -> None:
        self._answer_wait(w, timed_out=True)
        self._send()

    # --- CALLs -------------------------------------------------------------------------------------------

    def _on_call(self, src: int, corr: int, prio: int, payload: bytes) -> None:
        self.counters["calls"] += 1
        try:
            call = _unpack(payload)
        except (ValueError, TypeError):
            call = None
        if not isinstance(call, dict) or not isinstance(call.get("op"), str) or not isinstance(
            call.get("args", {}), dict
        ) or set(call) - {"op", "args"}:
            self._error(_T_CALL, src, corr, prio, ErrorCode.INVALID_REQUEST,
                        'a CALL payload must be a msgpack map {"op": str, "args": map}')
            return
        op: str = call["op"]
        handler = self._ops.get(op)
        if handler is None:
            self._error(_T_CALL, src, corr, prio, ErrorCode.UNKNOWN_OP,
                        f"unknown op {op!r}; known ops: {', '.join(sorted(self._ops))}")
            return
        args: dict[str, Any] = call.get("args", {})
        try:
            result = handler(self, _Args(op, args), src, corr, prio)
        except CallError as exc:
            self._error(_T_CALL, src, corr, prio, exc.code, exc.message, exc.details)
            return
        except DependencyCycle as exc:
            self._error(_T_CALL, src, corr, prio, ErrorCode.CONFLICT, exc.message, exc.details)
            return
        except (TaskValidationError, ManifestError) as exc:
            self._error(_T_CALL, src, corr, prio, ErrorCode.INVALID_TASK, _describe(exc), exc.details)
            return
        except UnknownTask as exc:
            self._error(_T_CALL, src, corr, prio, ErrorCode.NOT_FOUND, exc.message, exc.details)
            return
        except (StaleLease, InvalidTransition) as exc:
            self._error(_T_CALL, src, corr, prio, ErrorCode.CONFLICT, exc.message, exc.details)
            return
        except SchedulerError as exc:
            self._error(_T_CALL, src, corr, prio, ErrorCode.INTERNAL, exc.message, exc.details)
            return
        except Exception:
            log.exception("CALL %s failed", op)
            self._error(_T_CALL, src, corr, prio, ErrorCode.INTERNAL, f"internal error in {op} (logged)")
            return
        if result is not _DEFER:
            self._reply(_T_CALL, src, corr, prio, result)

    def _op_enqueue(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        tasks = a.get("tasks", list)
        a.done()
        if self.draining:
            raise CallError(ErrorCode.DRAINING,
                            "the daemon is draining and accepts no new work; retry after it restarts")
        if not all(isinstance(t, dict) for t in tasks):
            bad = [i for i, t in enumerate(tasks) if not isinstance(t, dict)]
            raise CallError(ErrorCode.INVALID_TASK, f"tasks{bad[:10]}: each task must be a map of TaskSpec fields")
        res = self.scheduler.enqueue_many(tasks)
        self.counters["enqueued"] += len(res)
        return [{"id": r.task_id, "status": r.status.value, "created": r.created} for r in res]

    def _op_get(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        tid = a.get("id", str)
        a.done()
        return _task_dict(self.scheduler.get(tid))

    def _op_list(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        status = a.get("status", str, None)
        agent_type = a.get("agent_type", str, None)
        limit = a.get("limit", int, 100)
        a.done()
        if status is not None and status not in _STATUS_VALUES:
            raise CallError(ErrorCode.INVALID_REQUEST, f"args.status: unknown status {status!r}; "
                            f"one of {', '.join(sorted(_STATUS_VALUES))}")
        if limit < 0:
            raise CallError(ErrorCode.INVALID_REQUEST, "args.limit: must be >= 0")
        sch = self.scheduler
        ids = []
        for r in sch.records(status):
            if agent_type is None or r.agent_type == agent_type:
                ids.append(r.id)
                if len(ids) >= limit:
                    break
        return [_task_dict(sch.get(t)) for t in ids]

    def _op_queue_status(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        a.done()
        from baton import reports  # lazily: reports and manifests cost ~30 ms of start-up for a rare call
        return reports.queue_status(self.scheduler).model_dump(mode="json")

    def _op_pulse(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        manifest_id = a.get("manifest_id", str, None)
        a.done()
        from baton import reports

        return reports.pulse(self.scheduler, manifest_id=manifest_id).model_dump(mode="json")

    def _op_cancel(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        tid = a.get("id", str)
        cascade = a.get("cascade", bool, True)
        dry_run = a.get("dry_run", bool, False)
        reason = a.get("reason", str, None)
        a.done()
        res = self.scheduler.cancel(tid, cascade=cascade, dry_run=dry_run, reason=reason)
        if res.changed:
            self._sweep()
            self._waits_dirty = True
        return res.model_dump(mode="json")

    def _op_plan(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        agent_type = a.get("agent_type", str, None)
        wip = a.get("wip", int, None)
        ids = a.get("ids", list, None)
        a.done()
        sch = self.scheduler
        if ids is None:
            ids = [r.id for r in sch.records() if r.status not in _TERMINAL_VALUES
                   and (agent_type is None or r.agent_type == agent_type)]
        elif not all(isinstance(t, str) for t in ids):
            raise CallError(ErrorCode.INVALID_REQUEST, "args.ids: expected a list of task ids")
        if wip is not None and wip < 1:
            raise CallError(ErrorCode.INVALID_REQUEST, "args.wip: must be >= 1")
        return sch.plan(ids, wip_limit=wip).model_dump(mode="json")

    def _op_wait(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        ids = a.get("ids", list)
        timeout = a.get("timeout_s", (int, float), None)
        a.done()
        if not all(isinstance(t, str) for t in ids):
            raise CallError(ErrorCode.INVALID_REQUEST, "args.ids: expected a list of task ids")
        if timeout is not None and not timeout >= 0:
            raise CallError(ErrorCode.INVALID_REQUEST, "args.timeout_s: must be >= 0")
        rec_of = self.scheduler.record_map().get
        unknown = [t for t in ids if rec_of(t) is None]
        if unknown:
            raise CallError(ErrorCode.NOT_FOUND, f"no task(s) {unknown[:10]}", [{"task_id": t} for t in unknown])
        ids = list(dict.fromkeys(ids))
        remaining = {t for t in ids if rec_of(t).status not in _TERMINAL_VALUES}  # type: ignore[union-attr]
        if not remaining or timeout == 0:
            return {"statuses": {t: rec_of(t).status for t in ids},  # type: ignore[union-attr]
                    "timed_out": bool(remaining)}
        w = _Waiter(src, corr, prio, ids, remaining)
        self._waiters.append(w)
        for t in remaining:
            self._wait_index.setdefault(t, []).append(w)
        if timeout is not None:
            w.timer = asyncio.get_running_loop().call_later(timeout, self._wait_timeout, w)
        return _DEFER

    def _op_import_manifest(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        text = a.get("text", str)
        dry_run = a.get("dry_run", bool, False)
        base_dir = a.get("base_dir", str, None)
        manifest_id = a.get("manifest_id", str, None)
        agent_type = a.get("agent_type", str, "implementation")
        a.done()
        if self.draining and not dry_run:
            raise CallError(ErrorCode.DRAINING, "the daemon is draining and accepts no new work")
        from baton import manifest as manifest_mod

        doc = _parse_manifest_text(text)
        base = Path(base_dir) if base_dir else None
        if dry_run:
            rep = manifest_mod.validate_manifest(doc, base_dir=base, scheduler=self.scheduler,
                                                 manifest_id=manifest_id, wip_limit=self.config.wip_per_agent_type)
            return {**rep.model_dump(mode="json"), "ok": rep.ok, "dry_run": True}
        res = manifest_mod.import_manifest(self.scheduler, doc, base_dir=base, manifest_id=manifest_id,
                                           agent_type=agent_type, wip_limit=self.config.wip_per_agent_type)
        return res.model_dump(mode="json")

    def _op_agents(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        a.done()
        now = time.monotonic()
        return [
            {"endpoint": p.endpoint, "name": p.name, "agent_type": p.agent_type, "wip": p.credit,
             "held": len(p.held), "pid": p.pid, "uid": p.uid, "connected_s": now - p.connected,
             "capabilities": p.capabilities}
            for p in self._peers.values() if p.hello and p.agent_type is not None
        ]

    def daemon_stats(self) -> dict[str, Any]:
        sch = self.scheduler
        return {
            **self.counters,
            "uptime_s": time.monotonic() - self.started,
            "endpoints": len(self._peers),
            "agents": sum(self._agents_n.values()),
            "dispatches_outstanding": len(self._dispatches),
            "dispatches_held": self.running_dispatched(),
            "waiters": len(self._waiters),
            "draining": self.draining,
            "tasks": {s: sch.count(s) for s in sorted(_STATUS_VALUES)},
        }

    def agents_by_state(self) -> dict[tuple[str, str], int]:
        """Connected agents per (agent_type, "idle" | "busy"): busy ones hold at least one task."""
        out: Counter[tuple[str, str]] = Counter()
        for peer in self._peers.values():
            if peer.hello and peer.agent_type is not None:
                out[(peer.agent_type, "busy" if peer.held else "idle")] += 1
        return dict(out)

    def _op_mode(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        a.done()
        return _need_daemon(self.mode_report)()

    def _op_mode_set(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        mode = a.get("mode", str)
        a.done()
        try:
            return _need_daemon(self.mode_request)(mode)
        except ValueError as exc:
            raise CallError(ErrorCode.INVALID_REQUEST, str(exc)) from None

    def _op_stats(self, a: _Args, src: int, corr: int, prio: int) -> Any:
        a.done()

        async def answer() -> None:
            router = await self.router_stats()
            if src in self._peers:  # the caller may have gone meanwhile
                self._reply(_T_CALL, src, corr, prio, {"daemon": self.daemon_stats(), "router": router})
                self._send()

        task = asyncio.get_running_loop().create_task(answer())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return _DEFER

    async def router_stats(self, timeout_s: float = _STATS_TIMEOUT_S) -> dict[str, Any] | None:
        """The router's counters (its ROUTER_STATS map), or None when it does not answer within timeout_s."""
        ctl = self._ctl_corr()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stats_pending[ctl] = fut
        try:
            self._send_now([_frame(_T_CTL_STATS, _HIGH, 0, 0, ctl, b"")])
            stats = await asyncio.wait_for(fut, timeout_s)
        except (TimeoutError, RouterGone):
            return None
        finally:
            self._stats_pending.pop(ctl, None)
        return stats if isinstance(stats, dict) else None

    def _no_stats(self) -> None:
        """The router went away: pending statistics requests get no answer (None), not a cancellation (which
        would end the task waiting for them: the health monitor, a scrape)."""
        for fut in list(self._stats_pending.values()):
            if not fut.done():
                fut.set_result(None)

    def _on_router_stats(self, ctl: int, payload: bytes) -> None:
        fut = self._stats_pending.pop(ctl, None)
        if fut is None or fut.done():
            return
        try:
            fut.set_result(_unpack(payload))
        except (ValueError, TypeError):
            fut.set_result(None)

    _ops: Final[dict[str, Callable[[Coordinator, _Args, int, int, int], Any]]] = {
        "enqueue": _op_enqueue,
        "get": _op_get,
        "list": _op_list,
        "queue_status": _op_queue_status,
        "cancel": _op_cancel,
        "plan": _op_plan,
        "wait": _op_wait,
        "import_manifest": _op_import_manifest,
        "pulse": _op_pulse,
        "mode": _op_mode,
        "mode_set": _op_mode_set,
        "agents": _op_agents,
        "stats": _op_stats,
    }


_REQUIRED: Final = object()


class _Args:
    """A CALL's args, read with type checks; ``done()`` refuses names the op does not know (typos)."""

    __slots__ = ("op", "args", "seen")

    def __init__(self, op: str, args: dict[str, Any]) -> None:
        self.op = op
        self.args = args
        self.seen: set[str] = set()

    def get(self, name: str, typ: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.seen.add(name)
        if name not in self.args or (self.args[name] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise CallError(ErrorCode.INVALID_REQUEST, f"{self.op}: args.{name} is required")
            return default
        v = self.args[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise CallError(ErrorCode.INVALID_REQUEST,
                            f"{self.op}: args.{name} must be {want}, got {type(v).__name__}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.args) - self.seen)
        if extra:
            raise CallError(ErrorCode.INVALID_REQUEST, f"{self.op}: unknown args {extra}; "
                            f"known: {sorted(self.seen)}")


def _need_daemon(hook: Callable[..., Any] | None) -> Callable[..., Any]:
    """A mode hook the daemon installs; a coordinator run without one (tests) answers not_found."""
    if hook is None:
        raise CallError(ErrorCode.NOT_FOUND, "no execution mode here: this coordinator runs outside a daemon")
    return hook


def _describe(exc: SchedulerError) -> str:
    """Every problem of a rejected submission in one message (the details carry them too)."""
    if not exc.details:
        return exc.message
    parts = []
    for d in exc.details:
        where = f"tasks[{d['index']}]." if "index" in d else ""
        field = d.get("field") or d.get("task_id") or ""
        parts.append(f"{where}{field}: {d.get('message', '')}")
    return f"{len(parts)} problem(s): " + "; ".join(parts)


def _task_dict(task: Any) -> dict[str, Any]:
    # JSON mode for dates and enums, but payloads as they were submitted (bytes stay bytes).
    d: dict[str, Any] = task.model_dump(mode="json", exclude={"input", "result"})
    d["input"] = task.input
    d["result"] = task.result
    return d


def _parse_manifest_text(text: str) -> Any:
    s = text.lstrip()
    if s.startswith(("{", "[")):
        return text  # JSON: manifest.parse_manifest reads it (and rejects NaN)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CallError(ErrorCode.INVALID_TASK, f"manifest text is neither JSON nor valid TOML: {exc}") from None
