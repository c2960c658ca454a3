"""Health of the native layer: probes, the triggers that degrade to PYTHON_ONLY, and the steps back
(docs/modes.md, "Degradation" and "Recovery").

``NativeHealth`` is the decision, kept free of I/O so that it can be tested on its own: it is fed one sample
per probe (the probe's round-trip time, or None when the router did not answer in time, and the running
totals of native operations, failed operations and agent communication failures) and answers which trigger,
if any, fires.  The daemon's monitor (daemon.py) takes the samples and carries out the switches.

Triggers (each configurable, 0 disables it):

- ``probe_latency``: one probe slower than ``degrade_probe_ms`` (a probe that gets no answer within that time
  counts as slower);
- ``error_rate``: failed native operations above ``degrade_error_rate`` of all of them within the last
  ``degrade_window_s`` (judged only once the window holds ``MIN_OPS`` operations: three failures in the first
  ten sends of a quiet daemon are not a rate);
- ``agent_failures``: more than ``degrade_agent_failures`` agent connections lost while holding work within
  the window;
- ``router_disconnected``: the router process died (the coordinator's link reports it; no sample needed).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

# An error rate is judged over at least this many operations in the window.
MIN_OPS: Final = 50

TRIGGERS: Final = ("probe_latency", "error_rate", "agent_failures", "router_disconnected")


@dataclass(frozen=True)
class Triggers:
    probe_ms: float = 500.0
    error_rate: float = 0.03
    agent_failures: int = 5
    window_s: float = 30.0

    @classmethod
    def from_config(cls, cfg: Any) -> Triggers:
        return cls(probe_ms=cfg.degrade_probe_ms, error_rate=cfg.degrade_error_rate,
                   agent_failures=cfg.degrade_agent_failures, window_s=cfg.degrade_window_s)


class Verdict(NamedTuple):
    trigger: str  # one of TRIGGERS
    detail: str  # what was measured, for the log and `baton mode`


class _Sample(NamedTuple):
    at: float
    ops: int
    errors: int
    agent_failures: int


class NativeHealth:
    """The degradation decision over a sliding window of samples (cumulative totals, so that a sample lost
    between probes loses nothing)."""

    def __init__(self, triggers: Triggers, clock: Callable[[], float] = time.monotonic) -> None:
        self.triggers = triggers
        self.clock = clock
        self._window: deque[_Sample] = deque()
        self.probes = 0
        self.last_probe_ms: float | None = None

    def reset(self) -> None:
        """Forget the window (a new router: its totals start again)."""
        self._window.clear()

    def observe(self, probe_ms: float | None, ops: int, errors: int, agent_failures: int) -> Verdict | None:
        t = self.triggers
        now = self.clock()
        self.probes += 1
        self.last_probe_ms = probe_ms
        window = self._window
        window.append(_Sample(now, ops, errors, agent_failures))
        while len(window) > 1 and window[1].at <= now - t.window_s:
            window.popleft()  # keep one sample at or before the window's start: the baseline
        if t.probe_ms and (probe_ms is None or probe_ms > t.probe_ms):
            got = "no answer" if probe_ms is None else f"{probe_ms:.0f} ms"
            return Verdict("probe_latency", f"probe round trip {got} (limit {t.probe_ms:.0f} ms)")
        first = window[0]
        n_ops, n_err = ops - first.ops, errors - first.errors
        if t.error_rate and n_ops >= MIN_OPS and n_err > t.error_rate * n_ops:
            return Verdict("error_rate", f"{n_err} of {n_ops} native operations failed in {t.window_s:.0f} s "
                                         f"({100 * n_err / n_ops:.1f}%, limit {100 * t.error_rate:.1f}%)")
        n_fail = agent_failures - first.agent_failures
        if t.agent_failures and n_fail > t.agent_failures:
            return Verdict("agent_failures", f"{n_fail} agent connections lost holding work in "
                                             f"{t.window_s:.0f} s (limit {t.agent_failures})")
        return None
