"""The baton protocol's constants: frame types, endpoint ids, name ids, error codes (docs/protocol.md).

include/baton.h carries the C twins (``BT_MSG_*``, ``BT_EP_*``); tests/python/test_protocol.py checks they agree.
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum
from typing import Final, Literal

__all__ = [
    "MsgType",
    "EP_NONE",
    "EP_COORDINATOR",
    "name_id",
    "topic_id",
    "group_id",
    "queue_id",
    "ErrorCode",
    "CTL_AGENT",
    "CTL_CLOSE",
    "CTL_REVOKE",
    "CTL_PAUSE",
    "CTL_CONTINUE_PARENT",
    "ctl_continue_payload",
    "DEFAULT_RING_CAPACITY",
    "PROTOCOL_VERSION",
    "REPLY_TYPE",
]

PROTOCOL_VERSION: Final = 1
EP_NONE: Final = 0
EP_COORDINATOR: Final = 1
DEFAULT_RING_CAPACITY: Final = 1 << 20


class MsgType(IntEnum):
    """Frame header ``type`` values."""

    HELLO = 1
    WELCOME = 2
    CALL = 3
    DIRECT = 10
    PUBLISH = 11
    SUBSCRIBE = 12
    UNSUBSCRIBE = 13
    JOIN = 14
    LEAVE = 15
    MULTICAST = 16
    BROADCAST = 17
    TASK = 20
    RESULT = 21
    HEARTBEAT = 22
    RING_SETUP = 30
    RING_READY = 31
    PING = 32
    # router -> coordinator notifications
    EP_OPEN = 40
    EP_CLOSED = 41
    DISPATCHED = 42
    ROUTER_LOG = 43
    ROUTER_STATS = 44
    CONTINUED = 45
    # coordinator -> router controls (binary payloads)
    CTL_AGENT = 50
    CTL_CLOSE = 51
    CTL_REVOKE = 52
    CTL_PAUSE = 54
    CTL_STATS = 55
    CTL_SHUTDOWN = 56
    CTL_CONTINUE = 57


class ErrorCode:
    """The ``code`` strings of error replies."""

    BAD_FRAME: Final = "bad_frame"
    TOO_LARGE: Final = "too_large"
    UNKNOWN_TYPE: Final = "unknown_type"
    NO_SUCH_ENDPOINT: Final = "no_such_endpoint"
    FORBIDDEN: Final = "forbidden"
    REFUSED: Final = "refused"
    RING_UNAVAILABLE: Final = "ring_unavailable"
    INVALID_REQUEST: Final = "invalid_request"
    UNKNOWN_OP: Final = "unknown_op"
    INVALID_TASK: Final = "invalid_task"
    NOT_FOUND: Final = "not_found"
    CONFLICT: Final = "conflict"
    DRAINING: Final = "draining"
    INTERNAL: Final = "internal"


# Requests answered by a frame of another type (an error reply keeps the request's type).
REPLY_TYPE: Final[dict[int, int]] = {MsgType.HELLO: MsgType.WELCOME, MsgType.RING_SETUP: MsgType.RING_READY}

# Binary payloads of the coordinator's controls.
CTL_AGENT: Final = struct.Struct("<QQI")  # endpoint, queue id, credit
CTL_CLOSE: Final = struct.Struct("<Q")  # endpoint
CTL_REVOKE: Final = struct.Struct("<QQ")  # queue id, dispatch id
CTL_PAUSE: Final = struct.Struct("<I")  # 1 pause dispatch, 0 resume
CTL_CONTINUE_PARENT: Final = struct.Struct("<Q")  # parent dispatch id; one whole encoded TASK frame follows


def ctl_continue_payload(parent_dispatch_id: int, task_frame: bytes) -> bytes:
    """The CTL_CONTINUE payload: keep ``task_frame`` (a whole encoded TASK frame, exactly as the coordinator
    would push it: destination = the work queue id, correlation id = the dependent's own dispatch id) and push
    it when the agent holding ``parent_dispatch_id`` reports ``"ok": true`` (docs/protocol.md, Continuations)."""
    return CTL_CONTINUE_PARENT.pack(parent_dispatch_id) + bytes(task_frame)

NameKind = Literal["topic", "group", "queue"]


def name_id(kind: NameKind, name: str) -> int:
    """The 64-bit wire id of a topic, group or work queue name (never 0)."""
    digest = hashlib.blake2b(f"{kind}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def topic_id(name: str) -> int:
    return name_id("topic", name)


def group_id(name: str) -> int:
    return name_id("group", name)


def queue_id(agent_type: str) -> int:
    return name_id("queue", agent_type)
