"""Exceptions the client library raises: one class per protocol error code, plus the connection failures.

An error reply from the daemon (docs/protocol.md, "Error codes") becomes the class registered for its
``code``; a code this version does not know becomes ``RemoteError`` with that code, so a newer daemon never
makes the client crash on an unknown error.  Each class also inherits the builtin a caller would naturally
catch (``NotFound`` is a ``LookupError``, ``InvalidTask`` a ``ValueError``), like the rest of baton.errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from baton.errors import BatonError, BatonTimeout
from baton.protocol import ErrorCode

__all__ = [
    "ClientError",
    "DaemonNotRunning",
    "ConnectionLost",
    "RequestTimeout",
    "RemoteError",
    "BadFrame",
    "TooLarge",
    "UnknownType",
    "NoSuchEndpoint",
    "Forbidden",
    "Refused",
    "RingUnavailable",
    "InvalidRequest",
    "UnknownOp",
    "InvalidTask",
    "NotFound",
    "Conflict",
    "Draining",
    "Internal",
    "error_for",
]


class ClientError(BatonError):
    """Base of the errors raised by baton.Client, baton.AsyncClient and baton.Agent."""

    code = "client_error"


class DaemonNotRunning(ClientError, ConnectionRefusedError):
    """Nothing is listening on the socket: the daemon is not running (or listens elsewhere)."""

    code = "daemon_not_running"

    def __init__(self, socket_path: str | Path, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"no baton daemon is running at {socket_path}{why}: start one with `baton serve`, "
            "or point BATON_SOCKET/--socket at the socket of a running daemon"
        )
        self.socket_path = str(socket_path)


class ConnectionLost(ClientError, ConnectionError):
    """The connection to the daemon closed while a reply was awaited, or before the call could be sent."""

    code = "connection_lost"


class RequestTimeout(ClientError, BatonTimeout):
    """No reply arrived in time.  The request may still be carried out; the reply, if any, is dropped."""

    code = "timeout"


class RemoteError(ClientError):
    """An error reply from the daemon, the router or a peer: ``code`` is the protocol's code, ``message``
    the peer's explanation (it says what went wrong; the class says what kind of problem it is)."""

    code: str = "remote_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class BadFrame(RemoteError, ValueError):
    pass


class TooLarge(RemoteError, ValueError):
    pass


class UnknownType(RemoteError, ValueError):
    pass


class NoSuchEndpoint(RemoteError, LookupError):
    pass


class Forbidden(RemoteError, PermissionError):
    pass


class Refused(RemoteError, PermissionError):
    """The daemon refused the connection (the peer uid is not allowed): run as the daemon's user or join its
    ``allowed_gid`` group."""


class RingUnavailable(RemoteError):
    pass


class InvalidRequest(RemoteError, ValueError):
    pass


class UnknownOp(RemoteError, ValueError):
    pass


class InvalidTask(RemoteError, ValueError):
    pass


class NotFound(RemoteError, LookupError):
    pass


class Conflict(RemoteError):
    pass


class Draining(RemoteError):
    """The daemon is shutting down and accepts no new work: retry against the next daemon."""


class Internal(RemoteError):
    """A bug on the other side (the daemon logged a traceback) or an exception in a peer's request handler."""


_BY_CODE: Final[dict[str, type[RemoteError]]] = {
    ErrorCode.BAD_FRAME: BadFrame,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.UNKNOWN_TYPE: UnknownType,
    ErrorCode.NO_SUCH_ENDPOINT: NoSuchEndpoint,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.REFUSED: Refused,
    ErrorCode.RING_UNAVAILABLE: RingUnavailable,
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.UNKNOWN_OP: UnknownOp,
    ErrorCode.INVALID_TASK: InvalidTask,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.DRAINING: Draining,
    ErrorCode.INTERNAL: Internal,
}


def error_for(code: object, message: object) -> RemoteError:
    """The exception for an error reply's ``{"code", "message"}`` (tolerant of a malformed payload)."""
    code_s = code if isinstance(code, str) and code else "internal"
    msg_s = message if isinstance(message, str) else repr(message)
    return _BY_CODE.get(code_s, RemoteError)(code_s, msg_s)
