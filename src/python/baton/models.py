"""Task models: what a user submits (TaskSpec), what the store returns (Task), and the scheduler's results.

Rules that live here because they are about a single task, not the graph:
- the allowed state transitions (``TRANSITIONS``) and which states are terminal;
- payload validation: anything a user submits is kept exactly as submitted or rejected with a clear error.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple

import msgpack
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from baton.scheduler_errors import InvalidTransition, TaskValidationError

__all__ = [
    "Status",
    "Source",
    "Risk",
    "DependentPolicy",
    "TERMINAL",
    "TRANSITIONS",
    "check_transition",
    "AcceptanceCriterion",
    "TaskSpec",
    "PriorityBreakdown",
    "AttemptRecord",
    "Task",
    "EnqueueResult",
    "Claim",
    "CancelResult",
    "FailOutcome",
    "BatchOutcome",
    "ExecutionPlan",
    "encode_payload",
    "decode_payload",
    "unpack",
    "parse_spec",
    "parse_specs",
    "summarize_details",
]


class Status(enum.StrEnum):
    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"


TERMINAL: Final[frozenset[Status]] = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.DEAD_LETTERED}
)

# The whole state machine.  running -> ready is a retry or an expired lease; ready -> pending happens when a
# prerequisite is added to a ready task; blocked -> pending/ready when the blocking prerequisite is replaced by
# a requeued copy.  Terminal states have no way out: dead letters are requeued as a *new* task.
TRANSITIONS: Final[dict[Status, frozenset[Status]]] = {
    Status.PENDING: frozenset({Status.READY, Status.BLOCKED, Status.CANCELLED}),
    Status.READY: frozenset({Status.RUNNING, Status.PENDING, Status.BLOCKED, Status.CANCELLED}),
    Status.RUNNING: frozenset(
        {Status.COMPLETED, Status.FAILED, Status.DEAD_LETTERED, Status.READY, Status.CANCELLED}
    ),
    Status.BLOCKED: frozenset({Status.PENDING, Status.READY, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.DEAD_LETTERED: frozenset(),
}


def check_transition(task_id: str, current: Status, target: Status) -> None:
    if target not in TRANSITIONS[current]:
        if current in TERMINAL:
            raise InvalidTransition(f"task {task_id} is {current.value}; terminal states never change")
        raise InvalidTransition(f"task {task_id}: {current.value} -> {target.value} is not allowed")


class Source(enum.StrEnum):
    """Well-known task sources; any other non-empty string is accepted as a custom source."""

    HUMAN = "human"
    AGENT_REQUIREMENTS = "agent_requirements"
    AGENT_PLANNER = "agent_planner"
    AGENT_IMPLEMENTATION = "agent_implementation"


class Risk(enum.StrEnum):
    HIGH = "High"
    MEDIUM = "Medium"
    LOW = "Low"


RISK_RANK: Final[dict[str, int]] = {"High": 0, "Medium": 1, "Low": 2}


def normalize_risk(v: Any) -> Any:
    """Manifests write "high"/"HIGH"; the canonical spelling is the enum's.  Anything else is left for the
    field's own validation to reject."""
    if isinstance(v, str) and v.capitalize() in RISK_RANK:
        return v.capitalize()
    return v


class DependentPolicy(enum.StrEnum):
    """What happens to a task when one of its prerequisites fails, is dead-lettered or is cancelled."""

    CANCEL = "cancel"  # cancel it too (and, through their own policies, its dependents)
    BLOCK = "block"  # park it as blocked with a stated reason until an operator acts (the default)
    PROCEED = "proceed"  # treat the prerequisite as satisfied and run anyway


# --- payloads ----------------------------------------------------------------------------------------------

# One tag byte in front of the stored blob says how to give it back: raw bytes are returned byte for byte,
# values are msgpack-encoded with strict types so that nothing is silently converted (a tuple would come back
# as a list; strict_types rejects it instead).
_RAW: Final = b"\x01"
_PACKED: Final = b"\x02"
# One reusable Packer: msgpack.packb builds a Packer per call (several times the cost of a pack), and payloads
# are packed several times per task.  Safe to share: packing these exact types runs no Python code, so it
# holds the GIL throughout, and msgpack (>= 1.0) resets the buffer when a value is refused.
_STRICT_PACK: Final = msgpack.Packer(use_bin_type=True, strict_types=True).pack


def encode_payload(value: Any) -> bytes | None:
    if value is None:
        return None
    if type(value) is bytes:
        return _RAW + value
    try:
        packed: bytes = _STRICT_PACK(value)
        return _PACKED + packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            "payload must be bytes or a JSON/msgpack value (dict, list, str, int, float, bool, None, bytes) "
            f"that can be kept exactly: {exc}"
        ) from None


def decode_payload(blob: bytes | None) -> Any:
    if blob is None:
        return None
    if blob[0] == _RAW[0]:
        return blob[1:]
    return msgpack.unpackb(memoryview(blob)[1:], raw=False, strict_map_key=False)  # a view: no copy


def unpack(blob: bytes | None) -> Any:
    """A msgpack column as the scheduler stores it (spec, history, criteria_done, a manifest's task ids)."""
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


# --- submitted task ----------------------------------------------------------------------------------------

_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/\-]{0,127}$")
_AGENT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
# Friendlier words for pattern mismatches than pydantic's "String should match pattern '...'".
_PATTERN_MESSAGES: Final = {"agent_type": "agent_type must be 1-64 chars of letters, digits and _.:- "}
# re's \s for str patterns is exactly str.isspace() (both are Py_UNICODE_ISSPACE), in one C call.
_SPACE: Final = re.compile(r"\s").search


class AcceptanceCriterion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=10_000)


class TaskSpec(BaseModel):
    """A task as submitted.  Every field is kept as given; the store adds state around it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(default=None, description="caller-chosen id; generated when absent")
    summary: str = Field(min_length=1, max_length=1_000)
    description: str = Field(default="", max_length=200_000)
    # A pattern (checked in pydantic-core, no Python call per task); _message() words its error.
    agent_type: str = Field(pattern=_AGENT_PATTERN)
    source: str = Source.HUMAN.value
    base_priority: StrictInt = Field(default=5, ge=0, le=10)
    prerequisites: list[str] = Field(default_factory=list)
    deadline: AwareDatetime | None = None
    estimated_duration_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    input: Any = None
    max_attempts: StrictInt = Field(default=3, ge=1, le=100)
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)
    risk: Risk = Risk.MEDIUM
    acceptance_criteria: list[AcceptanceCriterion] = Field(default_factory=list)
    file_scope: list[str] = Field(default_factory=list)
    conflicts_with: list[str] = Field(default_factory=list)
    on_prerequisite_failure: DependentPolicy | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str | None) -> str | None:
        if v is not None and not _ID_RE.match(v):
            raise ValueError("id must be 1-128 chars of letters, digits and ._:@/- starting with a letter or digit")
        return v

    @field_validator("source")
    @classmethod
    def _source_shape(cls, v: str) -> str:
        if not v or len(v) > 64 or _SPACE(v):
            raise ValueError("source must be a known source or a custom string of 1-64 non-space chars")
        return v

    @field_validator("risk", mode="before")
    @classmethod
    def _risk_case(cls, v: Any) -> Any:
        return normalize_risk(v)

    # Cross-field rules live in the validator of the later field (info.data holds the earlier ones), not in
    # a model validator: field validators run only for fields that were given, so a typical submission pays
    # for none of these checks (a model validator costs every task a Python call).
    @field_validator("prerequisites")
    @classmethod
    def _prereqs_unique(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("prerequisites contain duplicates")
        for p in v:
            if not _ID_RE.match(p):
                raise ValueError(f"prerequisite id {p!r} is not a valid task id")
        if info.data.get("id") in v:
            raise ValueError("a task cannot be its own prerequisite")
        return v

    @field_validator("acceptance_criteria")
    @classmethod
    def _criteria_unique(cls, v: list[AcceptanceCriterion]) -> list[AcceptanceCriterion]:
        if len({c.id for c in v}) != len(v):
            raise ValueError("acceptance criteria ids must be unique")
        return v

    @field_validator("input")
    @classmethod
    def _input_encodable(cls, v: Any) -> Any:
        encode_payload(v)  # raises ValueError with the reason
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_encodable(cls, v: dict[str, Any]) -> dict[str, Any]:
        encode_payload(v)
        return v


def _message(err: Any, field: str) -> str:
    if err["type"] == "string_pattern_mismatch" and field in _PATTERN_MESSAGES:
        return _PATTERN_MESSAGES[field]
    return str(err["msg"])


def _validation_details(exc: ValidationError, *, indexed: bool) -> list[dict[str, Any]]:
    """pydantic's errors as ``{field, code, message}``; ``indexed``: the first location element is the item's
    index in a batch, reported as ``index``."""
    out: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        index = loc.pop(0) if indexed and loc else None
        field = ".".join(str(p) for p in loc) or "<task>"
        d: dict[str, Any] = {"field": field, "code": err["type"], "message": _message(err, field)}
        if indexed:
            d["index"] = index
        out.append(d)
    return out


def summarize_details(prefix: str, details: list[dict[str, Any]]) -> str:
    """One line for a person: the first problem, and how many more there are (all are in ``details``)."""
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{prefix}{first['field']}: {first['message']}{more}"


def parse_spec(data: TaskSpec | dict[str, Any]) -> TaskSpec:
    """Validate one submission, turning pydantic's error into a TaskValidationError with every problem."""
    if isinstance(data, TaskSpec):
        return data
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        details = _validation_details(exc, indexed=False)
    raise TaskValidationError(summarize_details("invalid task: ", details), details=details)


def parse_specs(items: list[TaskSpec | dict[str, Any]]) -> list[TaskSpec]:
    """Validate a batch; all problems of all items are reported together and nothing is accepted.

    One ``TypeAdapter(list[TaskSpec])`` call validates the whole batch in pydantic-core's loop (instead of a
    Python loop calling model_validate per item); TaskSpec instances pass through unchanged.  Error
    locations start with the item's index, which becomes ``details[k]["index"]``.
    """
    try:
        return _SPEC_LIST.validate_python(items)
    except ValidationError as exc:
        details = _validation_details(exc, indexed=True)
    raise TaskValidationError(
        summarize_details(f"invalid task at index {details[0]['index']}: ", details), details=details
    )


_SPEC_LIST: Final = TypeAdapter(list[TaskSpec])


# --- stored task -------------------------------------------------------------------------------------------


class PriorityBreakdown(BaseModel):
    """Why a task has the calculated priority it has: one term per factor; ``total`` is their sum."""

    model_config = ConfigDict(frozen=True)

    base: float
    urgency: float
    unblock: float
    source: float
    aging: float
    total: float
    # The raw inputs, so the explanation can be read without the weights at hand.
    base_priority: int
    seconds_to_deadline: float | None
    downstream_depth: int
    waited_s: float


class AttemptRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempt: int
    holder: str | None
    fencing_token: int
    started_at: float
    ended_at: float
    outcome: Literal["failed_transient", "failed_permanent", "lease_expired", "cancelled"]
    error: str | None = None


class Task(TaskSpec):
    """A stored task: the submission plus its state.  ``id`` is always set."""

    id: str
    status: Status
    calculated_priority: float
    priority_breakdown: PriorityBreakdown
    downstream_depth: int = 0
    result: Any = None
    error: str | None = None
    attempts: int = 0
    attempt_history: list[AttemptRecord] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    ready_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = None
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None
    fencing_token: int = 0
    blocked_reason: str | None = None
    criteria_done: list[str] = Field(default_factory=list)
    requeued_from: str | None = None
    requeued_as: str | None = None
    manifest_id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


# --- operation results -------------------------------------------------------------------------------------


class EnqueueResult(NamedTuple):
    """One per submitted task, so a plain named tuple (no pydantic model per task)."""

    task_id: str
    created: bool  # False when the idempotency key matched an existing task
    status: Status


class Claim(NamedTuple):
    """A task handed to a worker.  One per claimed task, so a plain named tuple (no validation)."""

    task_id: str
    agent_type: str
    fencing_token: int
    lease_expires_at: float
    attempt: int
    input: Any
    priority: float


class CancelResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    cancelled_task_id: str
    cascaded_task_ids: list[str]
    total_cancelled: int
    dry_run: bool = False
    changed: bool
    message: str


class FailOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    status: Status  # ready (will retry), dead_lettered or failed
    retry_at: float | None = None
    attempts: int
    message: str


class BatchOutcome(BaseModel):
    """Per-item result of a batch completion: which items were applied and why the others were refused."""

    model_config = ConfigDict(frozen=True)

    applied: list[str]
    rejected: dict[str, str]
    released: list[str] = Field(default_factory=list)  # dependents that became ready


class ExecutionPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    batches: list[list[str]]
    total_batches: int
    max_parallelism: int
    critical_path: list[str]
    critical_path_s: float
    estimated_makespan_s: float
    wip_limit: int | None
    # Prerequisites outside the planned set: satisfied (completed) ones are just listed; the others are
    # reported per task so the caller knows which batches can't start yet.
    external_satisfied: list[str] = Field(default_factory=list)
    external_unsatisfied: dict[str, list[str]] = Field(default_factory=dict)
    skipped_terminal: dict[str, Status] = Field(default_factory=dict)

