"""Fixtures shared by test_client.py and test_agent.py (imported explicitly; not a conftest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client_harness import FakeDaemon
from daemon_harness import InProcess, in_process

ROUTERS = ["native", "python"]


@pytest.fixture(params=ROUTERS)
def router(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(router: str, short_tmp: Path) -> Iterator[InProcess]:
    """The real coordinator (SQLite store) and router, serving a unix socket."""
    with in_process(short_tmp, router=router) as h:
        yield h


@pytest.fixture
def fake(sock_path: str) -> Iterator[FakeDaemon]:
    """The scripted stand-in daemon (client_harness.py), for what a correct daemon never does."""
    with FakeDaemon(sock_path) as d:
        yield d
