"""One task's state in memory (``TaskRecord``) and its durable image.

The scheduler keeps every task as a ``TaskRecord`` and decides in memory; the store keeps *images* of
records (a msgpack list in ``IMAGE_FIELDS`` order) in its snapshot table and in the journal.  An image holds
only what cannot be derived: the priority terms that depend on the weights (``static``, ``rank``) and the
scheduler's index bookkeeping (``qver``) are rebuilt after loading.

The submission itself (``spec``) is a msgpack map of the fields the submitter gave (a ``Submission``),
minus ``input`` (kept in its own tagged blob, see models.encode_payload) -- what was submitted, exactly, in
the smallest form that gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Final

import msgpack
import ormsgpack

from baton.models import SPEC_DEFAULTS, Submission, encode_payload

__all__ = [
    "TaskRecord", "IMAGE_FIELDS", "pack_image", "pack_values", "unpack_image", "unpack_values",
    "pack_spec", "unpack_spec", "spec_fields", "given_fields",
]

# Durable fields, in image order.  Never reorder: add new fields at the end (older images are shorter and
# get the defaults of ``TaskRecord``).
IMAGE_FIELDS: Final = (
    "seq", "id", "status", "agent_type", "source", "base_priority", "risk", "policy", "deadline", "estimate",
    "depth", "unmet", "attempts", "max_attempts", "timeout", "idem", "created", "updated", "ready_at",
    "started", "finished", "not_before", "holder", "expires", "token", "blocked_reason", "spec", "input",
    "result", "error", "history", "criteria_done", "requeued_from", "requeued_as", "manifest_id", "prereqs",
)


@dataclass(slots=True, eq=False)
class TaskRecord:
    """A task as the scheduler holds it.  Times are unix seconds; payload fields are tagged blobs.

    A slotted dataclass: its generated ``__init__`` builds a record in one call (positionally from an image),
    several times faster than setting 39 slots one by one.  ``eq=False``: records are compared by identity.
    """

    seq: int
    id: str
    status: str
    agent_type: str
    source: str
    base_priority: int
    risk: str
    policy: str
    deadline: float | None = None
    estimate: float = 0.0
    depth: int = 0  # longest chain of dependents below this task
    unmet: int = 0  # prerequisites not yet satisfied
    attempts: int = 0
    max_attempts: int = 3
    timeout: float | None = None
    idem: str | None = None
    created: float = 0.0
    updated: float = 0.0
    ready_at: float | None = None
    started: float | None = None
    finished: float | None = None
    not_before: float = 0.0  # retry backoff: not claimable before this
    holder: str | None = None
    expires: float | None = None
    token: int = 0
    blocked_reason: str | None = None
    spec: bytes = b""
    input: bytes | None = None
    result: bytes | None = None
    error: str | None = None
    # Tuples, not lists: an empty tuple is a shared constant the cyclic GC never tracks, and a full
    # collection walks every tracked object (records live long; 3 lists each quadrupled the tracked objects).
    history: tuple[dict[str, Any], ...] = ()
    criteria_done: tuple[str, ...] = ()
    requeued_from: str | None = None
    requeued_as: str | None = None
    manifest_id: str | None = None
    prereqs: tuple[str, ...] = ()  # live edges (a requeued dead letter's dependents point at the copy)
    # Derived, never stored:
    static: float = 0.0
    rank: float = 0.0
    qver: int = 0  # bumped whenever the record is (re)queued: older queue entries are stale
    img: bytes | None = None  # the packed image while it is current (set by the scheduler, None = stale)
    journaled: bool = False  # changed since the last compaction (the scheduler's bookkeeping)


assert tuple(f.name for f in fields(TaskRecord))[: len(IMAGE_FIELDS)] == IMAGE_FIELDS

# Images and journal entries are the scheduler's own values (None, bool, int, float, str, bytes, tuples,
# dicts with str keys), packed for every change: ormsgpack writes the same bytes as msgpack's Packer in half
# the time (a 36-field image: `python bench/sched_floor.py pack`).  Payloads keep msgpack's strict_types
# check (models.encode_payload), which ormsgpack has no equivalent of; reading stays with msgpack.
pack_values: Final[Callable[[Any], bytes]] = ormsgpack.packb
_PACK = msgpack.Packer(use_bin_type=True).pack
_STRICT_PACK = msgpack.Packer(use_bin_type=True, strict_types=True).pack  # see models.encode_payload
# One C-level call instead of a getattr loop: an image is packed for every journaled change.
_image_of: Final = attrgetter(*IMAGE_FIELDS)


def pack_image(rec: TaskRecord) -> bytes:
    return pack_values(_image_of(rec))


def unpack_values(blob: bytes) -> Any:
    """An image or journal entry as stored: arrays become tuples (see TaskRecord.history)."""
    return msgpack.unpackb(blob, raw=False, strict_map_key=False, use_list=False)


def unpack_image(img: bytes | Sequence[Any], into: TaskRecord | None = None) -> TaskRecord:
    """A record from its image; ``into`` updates an existing record in place (the scheduler's indexes hold
    references to it)."""
    values = unpack_values(img) if isinstance(img, bytes) else img
    if into is None:
        return TaskRecord(*values)
    for k, v in zip(IMAGE_FIELDS, values):
        setattr(into, k, v)
    return into


# --- the submission ----------------------------------------------------------------------------------------


def _enum_value(v: Any) -> Any:
    return None if v is None else v.value


# Fields whose validated value is not already a plain msgpack type; every other field is stored as is.
_TO_PLAIN: Final[dict[str, Callable[[Any], Any]]] = {
    "deadline": lambda v: None if v is None else v.isoformat(),
    "acceptance_criteria": lambda v: [[a.id, a.text] for a in v],
    "risk": _enum_value,
    "on_prerequisite_failure": _enum_value,
}


_NOT_STORED: Final = ("id", "input")
_NEEDS_PLAIN: Final = frozenset(_TO_PLAIN)


def spec_fields(s: Submission) -> dict[str, Any]:
    """The fields the submitter gave, minus id and input, in plain msgpack types (enums as values, datetimes
    as ISO); the others are the defaults and are filled in on unpacking."""
    out: dict[str, Any] = dict(s)  # C-level copy and pops: most submissions need no conversion at all
    for name in _NOT_STORED:
        out.pop(name, None)
    if not _NEEDS_PLAIN.isdisjoint(out):
        for name, conv in _TO_PLAIN.items():
            if name in out:
                out[name] = conv(out[name])
    return out


def pack_spec(s: Submission) -> bytes:
    """The spec blob.  Raises ValueError if ``metadata`` holds a value that would not come back exactly (a
    tuple would come back as a list): strict packing checks that in the same pass that packs it."""
    given = spec_fields(s)
    try:
        packed: bytes = _STRICT_PACK(given)
        return packed
    except (TypeError, ValueError, OverflowError):
        pass
    if "metadata" in given:
        encode_payload(given["metadata"])  # raises the ValueError that names the problem
    # Not reached with validated fields (pydantic returns exact types), kept so nothing valid is refused.
    loose: bytes = _PACK(given)
    return loose


def given_fields(blob: bytes) -> dict[str, Any]:
    """The spec blob as the submission it came from (minus id and input): the fields given, acceptance
    criteria as ``[{"id", "text"}]``; valid input for ``parse_specs`` and ``TaskSpec``."""
    d: dict[str, Any] = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    if "acceptance_criteria" in d:
        d["acceptance_criteria"] = [{"id": a, "text": b} for a, b in d["acceptance_criteria"]]
    return d


def unpack_spec(blob: bytes) -> dict[str, Any]:
    """given_fields with the defaults of the others filled in (what ``Task`` is built from)."""
    d = given_fields(blob)
    return {name: d[name] if name in d else _fresh(default) for name, default in _SPEC_DEFAULTS}


_SPEC_DEFAULTS: Final = tuple((k, v) for k, v in SPEC_DEFAULTS.items() if k not in _NOT_STORED)


def _fresh(default: Any) -> Any:
    return type(default)() if isinstance(default, (list, dict)) else default
