"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET`` (READY=1, STOPPING=1, STATUS=...).

systemd (Type=notify) and other supervisors set NOTIFY_SOCKET to a unix datagram socket: a path, or a name
in the abstract namespace written with a leading '@'.  Nothing happens when it is unset.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify"]

log = logging.getLogger("baton.daemon")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to the supervisor; True if it was sent.

    Failures are logged and swallowed: a supervisor that went away must not stop the daemon.
    """
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    elif addr[0] != "/":
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %r to %r failed: %s", state, addr, exc)
        return False
    return True
