"""The daemon's execution mode (docs/modes.md): which router serves, why, the history of switches, the health
monitor that degrades to PYTHON_ONLY and the recovery that brings the native router back.

``ModeController.serve`` runs the coordinator until the daemon is asked to stop, through every switch:

- a switch between routers stops the old one (flushing what it holds, closing its connections: agents
  reconnect to the same socket), starts the new one and lets the coordinator rebuild what lived only in the
  old one (``Coordinator.adopt_link``: never-dispatched tasks back to ready, held ones under their lease and
  fencing token).  The time traffic stood still is measured and kept in the history (``pause_ms``);
- a switch between the native modes (INTELLIGENT, REDUNDANT, SPEED_CRITICAL) keeps the router and changes
  what the coordinator does;
- every switch is announced on ``baton.system`` (before it, through the old router when that still works, and
  after it, through the new one) and recorded with its reason.

Degradation: while a native router serves, the monitor probes it every ``probe_interval_s`` (a statistics
round trip) and feeds ``health.NativeHealth``; a trigger, or the router's death, switches to PYTHON_ONLY with
the trigger as the reason and lowers the WIP limits to ``degraded_wip_factor``.

Recovery (while degraded, every ``recovery_interval_s``): 1. the native self-test (library, codec, I/O
engine); 2. the native router takes the socket back; 3. the WIP limits go back up in steps, each held for
``recovery_step_s`` with every probe healthy.  A failed step goes back to PYTHON_ONLY (reason
``recovery_failed``) and the next attempt waits another interval.  Each step is in the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

from baton.health import NativeHealth, Triggers
from baton.router import RouterGone, RouterLink

__all__ = ["ModeController", "MODES", "NATIVE_MODES"]

log = logging.getLogger("baton.modes")

MODES: Final = ("INTELLIGENT", "PYTHON_ONLY", "REDUNDANT", "SPEED_CRITICAL")
NATIVE_MODES: Final = ("INTELLIGENT", "REDUNDANT", "SPEED_CRITICAL")  # the native router serves these
_HISTORY: Final = 1000  # entries kept for `baton mode --json` (the table shows the last ones)


def router_of(mode: str) -> str:
    return "python" if mode == "PYTHON_ONLY" else "native"


class _Switch(NamedTuple):
    mode: str
    reason: str
    why: str


OpenRouter = Callable[[str], Awaitable[tuple[RouterLink, str | None]]]


class ModeController:
    """Owns the mode; ``open_router(kind)`` starts a router of that kind ("native" falls back to "python" when
    the native one cannot start, returning the reason as the second value)."""

    def __init__(self, config: Any, open_router: OpenRouter, *, quick_selftest: Callable[[], str | None],
                 prepare_native: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self._open_router = open_router
        # Starts the native router's process ahead of a switch to it, so that its interpreter start-up (~60 ms)
        # is not part of the pause (the daemon does the same at start).
        self._prepare_native = prepare_native
        self._quick_selftest = quick_selftest  # None when the native layer passes, else why not
        self.native_mode = config.mode if config.mode != "PYTHON_ONLY" else "INTELLIGENT"
        self.mode = "PYTHON_ONLY" if config.router == "python" else config.mode
        self.reason = ""
        self.history: list[dict[str, Any]] = []
        self.switches: dict[str, int] = {}
        self.degraded = False  # PYTHON_ONLY because the native layer failed: recovery runs
        self.health = NativeHealth(Triggers.from_config(config))
        self.coordinator: Any = None
        self.link: RouterLink | None = None
        self._requests: asyncio.Queue[_Switch] | None = None
        self._degraded_at = 0.0
        self._ramp: list[float] = []  # WIP factors still to step through after a recovery
        self._ramp_at = 0.0
        self._run_task: asyncio.Task[None] | None = None

    @property
    def router_kind(self) -> str:
        return router_of(self.mode)

    # --- what `baton mode` shows ---------------------------------------------------------------------------

    def record(self, reason: str, **extra: Any) -> None:
        self.reason = reason
        self.history.append({"at": time.time(), "mono_ns": time.monotonic_ns(), "mode": self.mode, "reason": reason,
                             **extra})
        del self.history[:-_HISTORY]

    def report(self) -> dict[str, Any]:
        co = self.coordinator
        return {"mode": self.mode, "reason": self.reason, "router": self.router_kind, "degraded": self.degraded,
                "wip_factor": co.wip_factor if co is not None else 1.0,
                "since": self.history[-1]["at"] if self.history else None,
                "probe_ms": self.health.last_probe_ms, "switches": dict(self.switches),
                "history": list(self.history)}

    def request(self, mode: str) -> dict[str, Any]:
        """`baton mode set MODE`: the switch follows the reply; raises ValueError for an unknown mode."""
        mode = mode.upper()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == self.mode:
            return {"mode": mode, "switching_to": None}
        assert self._requests is not None
        if router_of(mode) == "native" and self.router_kind == "python":
            self._prepare_native()
        self._requests.put_nowait(_Switch(mode, "forced", "baton mode set"))
        return {"mode": self.mode, "switching_to": mode}

    # --- start ----------------------------------------------------------------------------------------------

    async def start(self) -> RouterLink:
        """The first router: the configured mode's, or PYTHON_ONLY when the native layer fails its self-test or
        does not start."""
        failed = self._quick_selftest() if self.router_kind == "native" else None
        if failed:
            log.warning("the native layer failed its self-test (%s); serving with the Python router", failed)
            link, _ = await self._open_router("python")
            why: str | None = f"native self-test failed: {failed}"
        else:
            link, why = await self._open_router(self.router_kind)  # why: the native router's fallback
        if why:
            self.mode = "PYTHON_ONLY"
            self._degrade()
        self.record(why or f"configured: {self.mode} (router {self.router_kind})")
        self.link = link
        return link

    def _degrade(self) -> None:
        """PYTHON_ONLY because the native layer failed: recovery tries it again after recovery_interval_s."""
        self.degraded = True
        self._degraded_at = time.monotonic()

    # --- running ---------------------------------------------------------------------------------------------

    async def serve(self, coordinator: Any, stop: asyncio.Event) -> bool:
        """Run the coordinator until ``stop`` is set (True) or it fails for good (False, logged)."""
        self.coordinator = coordinator
        coordinator.set_mode(self.mode)
        if self.degraded:
            coordinator.set_wip_factor(self.config.degraded_wip_factor)
        self._requests = asyncio.Queue()
        run_task = self._run_task = asyncio.create_task(coordinator.run(), name="baton-coordinator")
        stop_wait = asyncio.create_task(stop.wait())
        switch_wait = asyncio.create_task(self._requests.get())
        monitor = asyncio.create_task(self._monitor(), name="baton-health")
        try:
            while True:
                done, _ = await asyncio.wait({run_task, stop_wait, switch_wait}, return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    return True
                if switch_wait in done:
                    sw = switch_wait.result()
                    switch_wait = asyncio.create_task(self._requests.get())
                    if sw.mode != self.mode and not run_task.done():
                        run_task = self._run_task = await self._switch(run_task, sw)
                    continue
                err = run_task.exception()
                if isinstance(err, RouterGone) and self.router_kind == "native":
                    sw = _Switch("PYTHON_ONLY", "router_disconnected", str(err))
                    run_task = self._run_task = await self._switch(run_task, sw)
                    continue
                if isinstance(err, RouterGone):
                    log.error("the router stopped unexpectedly: %s; the daemon exits", err)
                else:
                    log.error("the coordinator stopped unexpectedly", exc_info=err)
                return False
        finally:
            for t in (stop_wait, switch_wait, monitor):
                t.cancel()

    async def finish(self) -> None:
        """After the drain: stop the coordinator's task."""
        run_task, self._run_task = self._run_task, None
        if run_task is not None:
            run_task.cancel()
            with contextlib.suppress(BaseException):
                await run_task

    async def _switch(self, run_task: asyncio.Task[None], sw: _Switch) -> asyncio.Task[None]:
        co, old = self.coordinator, self.link
        assert old is not None
        previous = self.mode
        degrade = sw.reason not in ("forced", "recovery")
        if sw.reason == "forced" and sw.mode in NATIVE_MODES:
            self.native_mode = sw.mode  # where a later recovery returns
        t0 = time.monotonic()
        announce = {"event": "mode", "mode": sw.mode, "previous": previous, "reason": sw.reason, "detail": sw.why}
        if old.alive:
            co.publish_system({**announce, "state": "switching"})
        if router_of(sw.mode) == self.router_kind:  # between native modes: the router stays
            self.mode = sw.mode
            co.set_mode(self.mode)
            self._count(sw)
            self.record(f"{sw.reason}: {sw.why}")
            co.publish_system({**announce, "state": "switched"})
            log.warning("now in %s (%s: %s)", self.mode, sw.reason, sw.why, extra={"mode": self.mode})
            return run_task
        log.log(logging.WARNING if sw.reason in ("forced", "recovery") else logging.ERROR,
                "switching from %s to %s (%s: %s); agents reconnect", previous, sw.mode, sw.reason, sw.why,
                extra={"reason": sw.reason})
        run_task.cancel()
        with contextlib.suppress(BaseException):
            await run_task
        with contextlib.suppress(Exception):
            await old.stop()
        t_stopped = time.monotonic()
        link, fallback = await self._open_router(router_of(sw.mode))
        t_started = time.monotonic()
        self.link = link
        self.mode = sw.mode if fallback is None else "PYTHON_ONLY"
        factor = co.wip_factor  # a recovery keeps the lowered limits: the ramp raises them
        if self.mode == "PYTHON_ONLY":
            self.degraded = False
            self._ramp = []
            factor = 1.0
            if degrade or fallback is not None:
                self._degrade()
                factor = self.config.degraded_wip_factor
                if self.config.recovery_interval_s:
                    self._prepare_native()  # ready and waiting by the time recovery needs it
        else:
            self.degraded = False
            if sw.reason != "recovery":
                factor = 1.0
        self.health.reset()
        co.set_mode(self.mode)
        co.adopt_link(link)  # first: what the coordinator sends from now on goes to the new router
        co.set_wip_factor(factor)
        pause_ms = round((time.monotonic() - t0) * 1000, 1)
        self._count(sw)
        # Where the pause went: stopping the old router, starting the new one, the coordinator's rebuild.
        phases = {"stop_ms": round((t_stopped - t0) * 1000, 1), "start_ms": round((t_started - t_stopped) * 1000, 1)}
        self.record(f"{sw.reason}: {sw.why}" + (f"; {fallback}" if fallback else ""), pause_ms=pause_ms, **phases)
        log.warning("now in %s after a %.1f ms pause", self.mode, pause_ms,
                    extra={"mode": self.mode, "pause_ms": pause_ms})
        co.publish_system({**announce, "mode": self.mode, "state": "switched", "pause_ms": pause_ms})
        return asyncio.create_task(co.run(), name="baton-coordinator")

    def _count(self, sw: _Switch) -> None:
        self.switches[sw.reason] = self.switches.get(sw.reason, 0) + 1

    # --- health and recovery ----------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.probe_interval_s)
            co = self.coordinator
            if co is None or co.draining or not self._requests or not self._requests.empty():
                continue
            try:
                if self.router_kind == "native":
                    await self._probe_native()
                elif self.degraded and cfg.recovery_interval_s and \
                        time.monotonic() - self._degraded_at >= cfg.recovery_interval_s:
                    self._try_recovery()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in one probe
                log.exception("health probe failed")

    async def _probe_native(self) -> None:
        co, link = self.coordinator, self.link
        limit_ms = self.health.triggers.probe_ms or 1000.0
        t0 = time.monotonic()
        answer = await co.router_stats(limit_ms / 1000)
        if link is not self.link or self.router_kind != "native":
            return  # switched while probing
        probe_ms = None if answer is None else (time.monotonic() - t0) * 1000
        verdict = self.health.observe(probe_ms, getattr(link, "ops", 0), getattr(link, "errors", 0),
                                      co.counters["agent_comm_failures"])
        assert self._requests is not None
        if verdict is not None:
            reason = verdict.trigger if not self._ramp else "recovery_failed"
            why = verdict.detail if not self._ramp else f"{verdict.trigger}: {verdict.detail}"
            self._ramp = []
            self._requests.put_nowait(_Switch("PYTHON_ONLY", reason, why))
        elif self._ramp and time.monotonic() - self._ramp_at >= self.config.recovery_step_s:
            factor = self._ramp.pop(0)
            co.set_wip_factor(factor)
            self._ramp_at = time.monotonic()
            step = f"recovery: WIP limits at {factor:.0%}" + (" (recovered)" if not self._ramp else "")
            self.record(step)
            co.publish_system({"event": "recovery", "mode": self.mode, "state": step, "wip_factor": factor})
            log.info("%s", step)

    def _try_recovery(self) -> None:
        """Step 1 (self-test) here; step 2 is the switch; step 3, the ramp, runs in _probe_native."""
        self._degraded_at = time.monotonic()  # the next attempt waits a whole interval
        failed = self._quick_selftest()
        if failed:
            self.record(f"recovery: self-test failed ({failed}); next attempt in "
                        f"{self.config.recovery_interval_s:.0f} s")
            return
        self.record("recovery: self-test passed")
        self._prepare_native()
        low = self.config.degraded_wip_factor
        self._ramp = [f for f in ((low + 1) / 2, 1.0) if f > low]
        self._ramp_at = time.monotonic()
        assert self._requests is not None
        self._requests.put_nowait(_Switch(self.native_mode, "recovery", "the native layer passed its self-test"))
