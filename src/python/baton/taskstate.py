"""One task's state in memory (``TaskRecord``) and its durable image.

The scheduler keeps every task as a ``TaskRecord`` and decides in memory; the store keeps *images* of
records (a msgpack list in ``IMAGE_FIELDS`` order) in its snapshot table and in the journal.  An image holds
only what cannot be derived: the priority terms that depend on the weights (``static``, ``rank``) and the
scheduler's index bookkeeping (``qver``) are rebuilt after loading.

The submission itself (``spec``) is a msgpack map of the TaskSpec fields that differ from their defaults,
minus ``input`` (kept in its own tagged blob, see models.encode_payload) -- what was submitted, exactly, in
the smallest form that gives it back.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Final

import msgpack

from baton.models import TaskSpec

__all__ = ["TaskRecord", "IMAGE_FIELDS", "new_record", "pack_image", "unpack_image", "pack_spec", "unpack_spec",
           "spec_fields"]

# Durable fields, in image order.  Never reorder: add new fields at the end (older images are shorter and
# get the defaults of ``TaskRecord``).
IMAGE_FIELDS: Final = (
    "seq", "id", "status", "agent_type", "source", "base_priority", "risk", "policy", "deadline", "estimate",
    "depth", "unmet", "attempts", "max_attempts", "timeout", "idem", "created", "updated", "ready_at",
    "started", "finished", "not_before", "holder", "expires", "token", "blocked_reason", "spec", "input",
    "result", "error", "history", "criteria_done", "requeued_from", "requeued_as", "manifest_id", "prereqs",
)
# Rebuilt after loading, never stored.
_DERIVED: Final = ("static", "rank", "qver")


class TaskRecord:
    """A task as the scheduler holds it.  Times are unix seconds; payload fields are tagged blobs."""

    __slots__ = (*IMAGE_FIELDS, *_DERIVED)

    seq: int
    id: str
    status: str
    agent_type: str
    source: str
    base_priority: int
    risk: str
    policy: str
    deadline: float | None
    estimate: float
    depth: int  # longest chain of dependents below this task
    unmet: int  # prerequisites not yet satisfied
    attempts: int
    max_attempts: int
    timeout: float | None
    idem: str | None
    created: float
    updated: float
    ready_at: float | None
    started: float | None
    finished: float | None
    not_before: float  # retry backoff: not claimable before this
    holder: str | None
    expires: float | None
    token: int
    blocked_reason: str | None
    spec: bytes
    input: bytes | None
    result: bytes | None
    error: str | None
    history: list[dict[str, Any]]
    criteria_done: list[str]
    requeued_from: str | None
    requeued_as: str | None
    manifest_id: str | None
    prereqs: list[str]  # live edges (a requeued dead letter's dependents point at the copy)
    static: float
    rank: float
    qver: int  # bumped whenever the record is (re)queued: older queue entries are stale


_DEFAULTS: Final[dict[str, Any]] = {
    "deadline": None, "depth": 0, "unmet": 0, "attempts": 0, "timeout": None, "idem": None, "ready_at": None,
    "started": None, "finished": None, "not_before": 0.0, "holder": None, "expires": None, "token": 0,
    "blocked_reason": None, "input": None, "result": None, "error": None, "requeued_from": None,
    "requeued_as": None, "manifest_id": None, "static": 0.0, "rank": 0.0, "qver": 0,
}
_LIST_DEFAULTS: Final = ("history", "criteria_done", "prereqs")

_PACK = msgpack.Packer(use_bin_type=True).pack
# One C-level call instead of a getattr loop: an image is packed for every journaled change.
_image_of: Final = attrgetter(*IMAGE_FIELDS)


def pack_image(rec: TaskRecord) -> bytes:
    return _PACK(_image_of(rec))


def unpack_image(img: bytes | list[Any], into: TaskRecord | None = None) -> TaskRecord:
    """A record from its image; ``into`` updates an existing record in place (the scheduler's indexes hold
    references to it)."""
    values = msgpack.unpackb(img, raw=False, strict_map_key=False) if isinstance(img, bytes) else img
    rec = into if into is not None else TaskRecord.__new__(TaskRecord)
    if into is None:
        for k, v in _DEFAULTS.items():
            setattr(rec, k, v)
        for k in _LIST_DEFAULTS:
            setattr(rec, k, [])
    for k, v in zip(IMAGE_FIELDS, values):
        setattr(rec, k, v)
    return rec


def new_record() -> TaskRecord:
    rec = TaskRecord.__new__(TaskRecord)
    for k, v in _DEFAULTS.items():
        setattr(rec, k, v)
    return rec


# --- the submission ----------------------------------------------------------------------------------------

# (field, default) for every TaskSpec field kept in the spec blob, in a stable order.
_SPEC_DEFAULTS: Final = tuple(
    (name, f.get_default(call_default_factory=True))
    for name, f in TaskSpec.model_fields.items()
    if name not in ("id", "input")
)


def spec_fields(s: TaskSpec) -> dict[str, Any]:
    """The submission's non-default fields in plain msgpack types (enums as values, datetimes as ISO)."""
    out: dict[str, Any] = {}
    for name, default in _SPEC_DEFAULTS:
        v = getattr(s, name)
        if v == default:
            continue
        if name == "deadline":
            v = v.isoformat()
        elif name == "acceptance_criteria":
            v = [(a.id, a.text) for a in v]
        elif hasattr(v, "value"):  # enums
            v = v.value
        out[name] = v
    return out


def pack_spec(s: TaskSpec) -> bytes:
    return _PACK(spec_fields(s))


def _fresh(default: Any) -> Any:
    return type(default)() if isinstance(default, (list, dict)) else default


def unpack_spec(blob: bytes) -> dict[str, Any]:
    """The spec blob as a dict with every field present (defaults filled in), acceptance criteria as
    ``[{"id", "text"}]``: ready for ``TaskSpec.model_validate`` once ``id`` and ``input`` are added."""
    d = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    out = {name: d[name] if name in d else _fresh(default) for name, default in _SPEC_DEFAULTS}
    out["acceptance_criteria"] = [{"id": a, "text": b} for a, b in out["acceptance_criteria"]]
    return out
