"""Fixtures shared by the Python tests: where the repository is, and unique names per test."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path: unix socket paths must fit in 108 bytes, pytest's tmp_path
    often does not."""
    with tempfile.TemporaryDirectory(prefix="bt-") as d:
        yield Path(d)


@pytest.fixture
def sock_path(short_tmp: Path) -> str:
    return str(short_tmp / f"{uuid.uuid4().hex[:8]}.sock")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.005, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll predicate until it returns a truthy value or the timeout passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def child_env() -> dict[str, str]:
    """Environment for a child Python process that must import this checkout's baton."""
    path = os.pathsep.join(p for p in (str(REPO / "src" / "python"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)
