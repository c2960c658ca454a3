"""Routers: the data plane between agents (docs/protocol.md).

Two implementations serve the same protocol and the same link to the coordinator:

- ``baton.router.native``: libbaton's C router running in a child process, linked to the coordinator by a
  shared-memory ring pair with eventfd doorbells (the default);
- ``baton.router.python``: a pure-Python asyncio router inside the daemon (PYTHON_ONLY, and the reference the
  conformance tests hold the C router to).

The coordinator sees either through ``RouterLink``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class RouterGone(ConnectionError):
    """The router stopped (its process died or it was shut down); the link is unusable."""


@dataclass(frozen=True)
class RouterOptions:
    """What every router needs from the daemon."""

    listen_fd: int  # a listening unix socket, owned by the daemon; the router accepts on it (never closes it)
    allowed_uid: int  # peers with this uid may connect
    allowed_gid: int | None  # ... and peers in this group, when set
    max_payload: int  # frames above this are answered too_large and the connection closed
    generation: int  # high 32 bits of the endpoint ids this router hands out


class RouterLink(Protocol):
    """The coordinator's side of a router: frames in, frames out, in batches, in order."""

    async def start(self) -> None:
        """Start routing; returns once the router accepts connections."""

    def send(self, frames: Sequence[bytes]) -> None:
        """Queue encoded frames (TASK, replies, controls...) for the router, in order; never blocks."""

    async def recv(self) -> list[bytes]:
        """The next batch (at least one) of encoded frames for the coordinator; raises RouterGone."""

    async def stop(self) -> None:
        """Send CTL_SHUTDOWN, wait for the router to finish (bounded), release its resources."""

    @property
    def alive(self) -> bool:
        """False once the router has stopped or died."""
