"""Injected faults of the native layer, for tests and benchmarks (docs/modes.md, "Fault injection").

Off unless configured (the ``fault_*`` settings, or their ``BATON_FAULT_*`` variables).  They act on the
coordinator's link to the native router, where a broken or slow native layer shows itself to the daemon:

- ``slow_ms``: every batch the router hands the coordinator arrives that much later (probes see it);
- ``fail_rate``: that fraction of the link's send operations fail (the frames stay queued in order and go in
  a later attempt, as after a full ring: nothing is lost; the failure is counted as an error);
- ``kill_after_s``: the router process is SIGKILLed that long after it started (the others start
  ``after_s`` after it started: a layer that was healthy, then fails);
- ``misroute_rate``: that fraction of the batches holding two TASK frames for one work queue have the two
  swapped, so the router dispatches them out of the coordinator's order (what REDUNDANT's shadow catches).

The outcomes are drawn from a seeded generator: a run is reproducible up to timing.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from baton import protocol, wire

# The frame header's type byte and destination field (wire.py's layout).
_TYPE_OFF: Final = 5
_DST: Final = struct.Struct("<Q")
_DST_OFF: Final = 24
_TASK: Final = int(protocol.MsgType.TASK)


@dataclass(frozen=True)
class Faults:
    slow_ms: float = 0.0
    fail_rate: float = 0.0
    kill_after_s: float = 0.0
    misroute_rate: float = 0.0
    after_s: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Faults | None:
        """The faults a DaemonConfig asks for, or None when it asks for none."""
        f = cls(slow_ms=cfg.fault_slow_ms, fail_rate=cfg.fault_fail_rate, kill_after_s=cfg.fault_kill_router_s,
                misroute_rate=cfg.fault_misroute_rate, after_s=cfg.fault_after_s, seed=cfg.fault_seed)
        return f if f.any else None

    @property
    def any(self) -> bool:
        return bool(self.slow_ms or self.fail_rate or self.kill_after_s or self.misroute_rate)


class FaultDice:
    """The draws of one link's faults."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._from = time.monotonic() + faults.after_s
        self._rng = random.Random(faults.seed)
        self.failed = 0
        self.misrouted = 0

    @property
    def active(self) -> bool:
        return time.monotonic() >= self._from

    @property
    def slow_s(self) -> float:
        return self.faults.slow_ms / 1000 if self.faults.slow_ms and self.active else 0.0

    def fail_send(self) -> bool:
        if self.faults.fail_rate and self.active and self._rng.random() < self.faults.fail_rate:
            self.failed += 1
            return True
        return False

    def misroute(self, frames: Sequence[bytes]) -> Sequence[bytes]:
        """The batch, with two TASK frames of one work queue swapped when the dice say so."""
        if not self.faults.misroute_rate or not self.active or self._rng.random() >= self.faults.misroute_rate:
            return frames
        first: dict[int, int] = {}
        for i, f in enumerate(frames):
            if len(f) >= wire.HEADER_SIZE and f[_TYPE_OFF] == _TASK:
                queue = _DST.unpack_from(f, _DST_OFF)[0]
                j = first.setdefault(queue, i)
                if j != i:
                    out = list(frames)
                    out[i], out[j] = out[j], out[i]
                    self.misrouted += 1
                    return out
        return frames
