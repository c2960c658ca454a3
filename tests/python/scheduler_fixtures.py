"""Helpers shared by the scheduler test modules (imported explicitly; not a conftest)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from baton.scheduler import Scheduler, SchedulerConfig


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


PYTHON = sys.executable
