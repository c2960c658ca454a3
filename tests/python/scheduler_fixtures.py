"""Helpers shared by the scheduler test modules (imported explicitly; not a conftest)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baton.scheduler import Scheduler, SchedulerConfig

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = str(REPO / "src" / "python")


class ManualClock:
    """A clock the test moves by hand: leases, backoff, deadlines and aging without sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(tmp_path: Path, clock: ManualClock | None = None, name: str = "tasks.db", **cfg: Any) -> Scheduler:
    return Scheduler(tmp_path / name, config=SchedulerConfig(**cfg), clock=clock or ManualClock())


def spec(tid: str, agent_type: str = "impl", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"id": tid, "summary": f"task {tid}", "agent_type": agent_type}
    d.update(kw)
    return d


def poll(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait for ``cond`` without fixed sleeps: short naps, bounded by a timeout that fails the test."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
