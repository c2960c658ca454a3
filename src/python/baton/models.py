"""Task models: what a user submits (TaskSpec), what the store returns (Task), and the scheduler's results.

Rules that live here because they are about a single task, not the graph:
- the allowed state transitions (``TRANSITIONS``) and which states are terminal;
- payload validation: anything a user submits is kept exactly as submitted or rejected with a clear error.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgpack
from pydantic import (
    AfterValidator,
    BeforeValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from typing_extensions import Required, TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

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
    "Submission",
    "SPEC_DEFAULTS",
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
    # A view avoids copying a large payload; for a small one, making the view costs more than the copy.
    body = blob[1:] if len(blob) <= 4096 else memoryview(blob)[1:]
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


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


# Field types, shared by TaskSpec (the public model) and Submission (the batch fast path): one definition of
# every rule.  Validators are attached per field, so a submission pays only for the fields it gives.


def _check_id(v: str | None) -> str | None:
    if v is not None and not _ID_RE.match(v):
        raise ValueError("id must be 1-128 chars of letters, digits and ._:@/- starting with a letter or digit")
    return v


def _check_source(v: str) -> str:
    if not v or len(v) > 64 or _SPACE(v):
        raise ValueError("source must be a known source or a custom string of 1-64 non-space chars")
    return v


def _check_prerequisites(v: list[str], info: ValidationInfo) -> list[str]:
    # A cross-field rule in the later field's validator (info.data holds the earlier fields), not in a
    # model-level validator: that would cost every task a Python call; this one runs only when given.
    if len(set(v)) != len(v):
        raise ValueError("prerequisites contain duplicates")
    for p in v:
        if not _ID_RE.match(p):
            raise ValueError(f"prerequisite id {p!r} is not a valid task id")
    if info.data.get("id") in v:
        raise ValueError("a task cannot be its own prerequisite")
    return v


def _check_criteria(v: list[AcceptanceCriterion]) -> list[AcceptanceCriterion]:
    if len({c.id for c in v}) != len(v):
        raise ValueError("acceptance criteria ids must be unique")
    return v


def _check_encodable(v: Any) -> Any:
    encode_payload(v)  # raises ValueError with the reason
    return v


_TaskId = Annotated[str | None, AfterValidator(_check_id)]
_Summary = Annotated[str, Field(min_length=1, max_length=1_000)]
_Description = Annotated[str, Field(max_length=200_000)]
# A pattern (checked in pydantic-core, no Python call per task); _message() words its error.
_AgentType = Annotated[str, Field(pattern=_AGENT_PATTERN)]
_SourceName = Annotated[str, AfterValidator(_check_source)]
_BasePriority = Annotated[StrictInt, Field(ge=0, le=10)]
_Prerequisites = Annotated[list[str], AfterValidator(_check_prerequisites)]
_Estimate = Annotated[float | None, Field(ge=0, allow_inf_nan=False)]
_MaxAttempts = Annotated[StrictInt, Field(ge=1, le=100)]
_Timeout = Annotated[float | None, Field(gt=0, allow_inf_nan=False)]
_IdempotencyKey = Annotated[str | None, Field(min_length=1, max_length=256)]
_RiskLevel = Annotated[Risk, BeforeValidator(normalize_risk)]
_Criteria = Annotated[list[AcceptanceCriterion], AfterValidator(_check_criteria)]
_Metadata = Annotated[dict[str, Any], AfterValidator(_check_encodable)]


class TaskSpec(BaseModel):
    """A task as submitted.  Every field is kept as given; the store adds state around it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: _TaskId = Field(default=None, description="caller-chosen id; generated when absent")
    summary: _Summary
    description: _Description = ""
    agent_type: _AgentType
    source: _SourceName = Source.HUMAN.value
    base_priority: _BasePriority = 5
    prerequisites: _Prerequisites = Field(default_factory=list)
    deadline: AwareDatetime | None = None
    estimated_duration_s: _Estimate = None
    input: Annotated[Any, AfterValidator(_check_encodable)] = None
    max_attempts: _MaxAttempts = 3
    timeout_s: _Timeout = None
    idempotency_key: _IdempotencyKey = None
    risk: _RiskLevel = Risk.MEDIUM
    acceptance_criteria: _Criteria = Field(default_factory=list)
    file_scope: list[str] = Field(default_factory=list)
    conflicts_with: list[str] = Field(default_factory=list)
    on_prerequisite_failure: DependentPolicy | None = None
    metadata: _Metadata = Field(default_factory=dict)


class Submission(TypedDict, total=False):
    """A validated submission as the scheduler takes it in batches: a dict of only the fields given (the
    others are TaskSpec's defaults, ``SPEC_DEFAULTS``).  Same field rules as TaskSpec; validating into a
    dict instead of a 20-field model is ~4x cheaper, and the dict is what the journal stores.  ``input`` and
    ``metadata`` are not checked for exactness here: the scheduler packs both anyway (once) and reports a
    value it cannot keep exactly."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    id: _TaskId
    summary: Required[_Summary]
    description: _Description
    agent_type: Required[_AgentType]
    source: _SourceName
    base_priority: _BasePriority
    prerequisites: _Prerequisites
    deadline: AwareDatetime | None
    estimated_duration_s: _Estimate
    input: Any
    max_attempts: _MaxAttempts
    timeout_s: _Timeout
    idempotency_key: _IdempotencyKey
    risk: _RiskLevel
    acceptance_criteria: _Criteria
    file_scope: list[str]
    conflicts_with: list[str]
    on_prerequisite_failure: DependentPolicy | None
    metadata: dict[str, Any]


assert list(Submission.__annotations__) == list(TaskSpec.model_fields), "Submission and TaskSpec must match"

# Every TaskSpec field's default (a fresh one for list/dict fields is not needed: submissions never mutate).
SPEC_DEFAULTS: Final[dict[str, Any]] = {
    name: f.get_default(call_default_factory=True) for name, f in TaskSpec.model_fields.items()
}


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


def parse_specs(items: Sequence[TaskSpec | Mapping[str, Any]]) -> list[Submission]:
    """Validate a batch into Submissions; all problems of all items are reported together and nothing is
    accepted.

    One ``TypeAdapter(list[Submission])`` call validates the whole batch in pydantic-core's loop.  A TaskSpec
    is taken as the fields it was given (revalidated with the rest: it is valid already).  Error locations
    start with the item's index, which becomes ``details[k]["index"]``.
    """
    batch = [
        {k: s.__dict__[k] for k in s.model_fields_set} if isinstance(s, TaskSpec) else s for s in items
    ]
    try:
        return _SUBMISSIONS.validate_python(batch)
    except ValidationError as exc:
        details = _validation_details(exc, indexed=True)
    raise TaskValidationError(
        summarize_details(f"invalid task at index {details[0]['index']}: ", details), details=details
    )


_SUBMISSIONS: Final = TypeAdapter(list[Submission])


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


class BatchOutcome(NamedTuple):
    """Per-item result of a batch completion: which items were applied and why the others were refused.
    A plain named tuple: built on the coordinator's handoff path, from the scheduler's own data."""

    applied: list[str]
    rejected: dict[str, str]
    released: list[str]  # dependents that became ready


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

