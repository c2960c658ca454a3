"""The coordinator's link to libbaton's C router, which runs in a child process (docs/router.md).

``NativeRouterLink.start`` creates the coordinator's ring pair (coordinator -> router, router -> coordinator)
and one eventfd doorbell per ring, then hands those and the listening socket to a router child
(``native_child``) over its socketpair (SCM_RIGHTS).  The child is either one the daemon spawned at the very
start of its life (``child=``, so its interpreter start-up overlapped the daemon's imports) or one spawned
here.  From then on:

- ``send`` writes a batch of frames into the coordinator -> router ring with one call (the ring's publish
  rings the router's doorbell only when the router armed it before sleeping);
- ``recv`` reads a batch from the router -> coordinator ring; when it is empty it arms the ring and waits for
  the doorbell through the running loop's ``add_reader`` -- no thread, no polling;
- the child's exit is watched through a pidfd on the same loop: ``recv`` then hands over what the router
  committed before dying and raises RouterGone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from baton import native, protocol, wire
from baton.errors import FrameTooLarge, PeerClosed, RingFull
from baton.router import RouterGone, RouterOptions, native_child
from baton.router.faults import FaultDice, Faults

log = logging.getLogger("baton.router.native")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# How soon a send that found the ring full tries again (the router drains it every loop turn).
RETRY_S = 0.0005
# With recv_spin_ns, recv passes through the event loop at least this often even when batches keep coming.
_YIELD_NS = 1_000_000
MIN_RING = 4 << 20
MAX_RING = 128 << 20


def ring_capacity(max_payload: int) -> int:
    """A ring whose records (capacity / 4) hold the largest frame, within [4 MiB, 128 MiB].  max_payload 0
    means the codec's default, as it does for both routers."""
    need = 4 * ((max_payload or wire.MAX_PAYLOAD_DEFAULT) + wire.HEADER_SIZE + 64)
    cap = MIN_RING
    while cap < need and cap < MAX_RING:
        cap *= 2
    return cap


def _shutdown_frame() -> bytes:
    hdr = wire.FrameHeader(
        type=protocol.MsgType.CTL_SHUTDOWN,
        priority=wire.Priority.HIGH,
        source=protocol.EP_COORDINATOR,
    )
    return wire.encode(hdr)


class NativeRouterLink:
    """RouterLink to the C router in a child process."""

    def __init__(
        self,
        options: RouterOptions,
        *,
        spin_ns: int = 50_000,
        recv_spin_ns: int = 0,
        backend: int = native.IO_AUTO,
        out_limit: int = 0,
        python: str | None = None,
        child: native_child.Spawned | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.options = options
        self.spin_ns = spin_ns
        self.recv_spin_ns = recv_spin_ns  # recv polls an empty ring this long before it sleeps
        self._last_yield = 0
        self.backend = backend
        self.out_limit = out_limit
        self._python = python or sys.executable
        # A child the daemon started early (native_child.spawn), else start() spawns one.
        self._child = child
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._c2r: native.Ring | None = None  # coordinator -> router (we produce)
        self._r2c: native.Ring | None = None  # router -> coordinator (we consume)
        self._c2r_bell = -1
        self._r2c_bell = -1
        self._waiter: asyncio.Future[None] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._early: list[bytes] = []
        self._backlog: collections.deque[bytes] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None
        self._dead = False
        self._closed = False
        # Operations on the native layer and how many failed: the daemon's health monitor reads the error rate.
        self.ops = 0
        self.errors = 0
        self.dice = FaultDice(faults) if faults is not None else None  # injected faults (router/faults.py)

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("NativeRouterLink.start called twice")
        loop = self._loop = asyncio.get_running_loop()
        opts = self.options
        cap = ring_capacity(opts.max_payload)
        child, self._child = self._child, None
        try:
            self._c2r = native.Ring.create(cap, native.PRODUCER, opts.generation)
            self._r2c = native.Ring.create(cap, native.CONSUMER, opts.generation)
            self._c2r_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._r2c_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._c2r.set_doorbell(self._c2r_bell)
            if child is None:
                child = native_child.spawn(self._python)
            self._proc = child.proc
            try:
                self._pidfd = os.pidfd_open(self._proc.pid)
            except ProcessLookupError:  # an early child someone already reaped
                raise RouterGone(f"the native router exited before it started (status {self._proc.poll()})") from None
            self._exited = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)
            loop.add_reader(self._r2c_bell, self._on_bell)
            settings = {
                "allowed_uid": opts.allowed_uid,
                "allowed_gid": opts.allowed_gid,
                "max_payload": opts.max_payload,
                "generation": opts.generation,
                "backend": self.backend,
                "spin_ns": self.spin_ns,
                "out_limit": self.out_limit,
            }
            fds = {
                "listen_fd": opts.listen_fd,
                "coord_in_ring_fd": self._c2r.fd,
                "coord_out_ring_fd": self._r2c.fd,
                "coord_in_bell": self._c2r_bell,
                "coord_out_bell": self._r2c_bell,
            }
            try:
                child.handoff(settings, fds)
            except OSError as exc:
                # The child died before its orders (no libbaton, a bad interpreter): the wait below reports it.
                log.debug("could not hand the router its descriptors: %s", exc)
        except BaseException:
            if child is not None and child.pending:
                child.dismiss()
            self._release()
            raise
        # The router's first frame (its "started" log line) says it attached the rings and accepts.
        try:
            self._early = await asyncio.wait_for(self._recv(), START_TIMEOUT_S)
        except (RouterGone, asyncio.TimeoutError) as exc:
            await self.stop()
            raise RouterGone(f"the native router did not start: {exc!r}") from exc
        log.info("native router started (pid %d)", self._proc.pid)
        if self.dice is not None and self.dice.faults.kill_after_s:
            loop.call_later(self.dice.faults.kill_after_s, self._inject_kill)

    def _inject_kill(self) -> None:
        if self._proc is not None and not self._dead:
            log.warning("fault injection: killing the native router (pid %d)", self._proc.pid)
            self._proc.kill()

    async def stop(self) -> None:
        if self._child is not None:  # never started: let the early child go
            self._child.dismiss()
            self._child = None
        if self._proc is None or self._closed:
            return
        if not self._dead:
            try:
                self._backlog.clear()
                self._send_now([_shutdown_frame()])
            except Exception:  # noqa: BLE001 - a full or broken ring: the kill below still stops it
                log.warning("could not send CTL_SHUTDOWN to the native router", exc_info=True)
            assert self._exited is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("native router (pid %d) did not stop in %.0fs: killing it", self._proc.pid, STOP_TIMEOUT_S)
                self._proc.kill()
                try:
                    await asyncio.wait_for(asyncio.shield(self._exited), STOP_TIMEOUT_S)
                except asyncio.TimeoutError:
                    pass
        self._release()

    def _release(self) -> None:
        """Free everything; wakes a pending recv, which raises RouterGone."""
        self._closed = True
        self._dead = True
        loop = self._loop
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if loop is not None:
            for fd in (self._pidfd, self._r2c_bell):
                if fd >= 0:
                    loop.remove_reader(fd)
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        for fd in (self._pidfd, self._c2r_bell, self._r2c_bell):
            if fd >= 0:
                os.close(fd)
        self._pidfd = self._c2r_bell = self._r2c_bell = -1
        for ring in (self._c2r, self._r2c):
            if ring is not None:
                ring.close()
        self._c2r = self._r2c = None
        self._wake()

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._dead

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- loop callbacks --------------------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_bell(self) -> None:
        try:
            os.eventfd_read(self._r2c_bell)
        except BlockingIOError:
            pass
        self._wake()

    def _on_exit(self) -> None:
        assert self._loop is not None and self._proc is not None
        self._loop.remove_reader(self._pidfd)
        code = self._proc.wait()
        if not self._closed:
            level = logging.INFO if code == 0 else logging.ERROR
            log.log(level, "native router (pid %d) exited with status %d", self._proc.pid, code)
        self._dead = True
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)
        self._wake()

    # --- frames ----------------------------------------------------------------------------------------------

    def send(self, frames: Sequence[bytes]) -> None:
        if self._dead:
            raise RouterGone("the native router is not running")
        self.ops += 1
        dice = self.dice
        if dice is not None:
            frames = dice.misroute(frames)
            if dice.fail_send():  # an injected failure: the frames wait, in order, for the retry
                self.errors += 1
                self._backlog.extend(frames)
                self._schedule_retry()
                return
        if self._backlog:
            self._backlog.extend(frames)
            return
        self._send_now(frames)

    def _send_now(self, frames: Sequence[bytes]) -> None:
        ring = self._c2r
        if ring is None:
            raise RouterGone("the native router is not running")
        todo = list(frames)
        while todo:
            try:
                n = ring.write_batch(todo)
            except RingFull:
                n = 0
            except FrameTooLarge:
                self.errors += 1
                log.error("dropped a %d-byte frame for the router: larger than a ring record", len(todo[0]))
                todo.pop(0)
                continue
            if n == len(todo):
                return
            if n == 0:
                break
            todo = todo[n:]
        # Full: keep the rest in order and retry soon, never block the coordinator.
        self._backlog.extend(todo)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(RETRY_S, self._flush_backlog)

    def _flush_backlog(self) -> None:
        self._retry = None
        if self._dead or not self._backlog:
            self._backlog.clear()
            return
        pending = list(self._backlog)
        self._backlog.clear()
        self._send_now(pending)

    async def recv(self) -> list[bytes]:
        if self.dice is not None and self.dice.faults.slow_ms:
            frames = await self._recv()
            await asyncio.sleep(self.dice.slow_s)  # an injected slow native layer
            return frames
        return await self._recv()

    async def _recv(self) -> list[bytes]:
        if self._early:
            out, self._early = self._early, []
            return out
        loop = self._loop
        if loop is None:
            raise RouterGone("the native router was never started")
        if self.recv_spin_ns and time.monotonic_ns() - self._last_yield > _YIELD_NS:
            # A busy ring (or the spin below) would return batches for ever without passing through the event
            # loop: let timers and other callbacks run now and then.
            self._last_yield = time.monotonic_ns()
            await asyncio.sleep(0)
        while True:
            ring = self._r2c
            if ring is None or self._closed:
                raise RouterGone("the native router stopped")
            frames = ring.read_batch(0)
            if frames:
                return frames
            if self.recv_spin_ns and not self._dead:
                # Poll before sleeping: a reply that comes within the budget costs no wakeup (the doorbell's
                # eventfd, the event loop's epoll) on either side, since an unarmed ring is never rung.
                read, clock = ring.read_batch, time.monotonic_ns
                end = clock() + self.recv_spin_ns
                while clock() < end:
                    frames = read(0)
                    if frames:
                        return frames
            if self._dead:
                raise RouterGone(f"the native router exited (status {self._proc.returncode if self._proc else None})")
            try:
                if not ring.arm():
                    continue  # a record arrived between the read and the arm
            except PeerClosed:
                pass  # the router closed its end and everything was read: wait for the pidfd to report the exit
            self._waiter = loop.create_future()
            self._last_yield = time.monotonic_ns()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if self._r2c is not None:
                    self._r2c.disarm()
