"""Errors raised by the task store, the scheduler and the manifest importer.

Every class carries a stable ``code`` clients can match on and inherits the builtin a caller would naturally
catch (an unknown task is a ``KeyError``, an invalid spec a ``ValueError``), following baton.errors.
"""

from __future__ import annotations

from typing import Any

from baton.errors import BatonError

__all__ = [
    "SchedulerError",
    "TaskValidationError",
    "UnknownTask",
    "UnknownPrerequisite",
    "DuplicateTask",
    "DependencyCycle",
    "InvalidTransition",
    "StaleLease",
    "SchemaError",
    "StoreBusy",
    "ManifestError",
]


class SchedulerError(BatonError):
    """Base of the scheduler's errors."""

    code = "SCHEDULER_ERROR"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Machine-readable specifics (one entry per offending field or task) so a client can show all problems
        # at once instead of fixing them one round-trip at a time.
        self.details: list[dict[str, Any]] = details or []

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class TaskValidationError(SchedulerError, ValueError):
    """A submitted task (or a batch containing it) is invalid; nothing was stored."""

    code = "INVALID_TASK"


class UnknownTask(SchedulerError, KeyError):
    code = "UNKNOWN_TASK"

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class UnknownPrerequisite(TaskValidationError):
    code = "UNKNOWN_PREREQUISITE"


class DuplicateTask(TaskValidationError):
    code = "DUPLICATE_TASK"


class DependencyCycle(TaskValidationError):
    code = "DEPENDENCY_CYCLE"


class InvalidTransition(SchedulerError, ValueError):
    """The requested state change is not allowed from the task's current state (e.g. a terminal task)."""

    code = "INVALID_TRANSITION"


class StaleLease(SchedulerError, PermissionError):
    """A completion, failure or heartbeat carried a fencing token that no longer holds the task."""

    code = "STALE_FENCING_TOKEN"


class SchemaError(SchedulerError, RuntimeError):
    """The database was written by a newer baton or is not a baton store."""

    code = "SCHEMA_ERROR"


class StoreBusy(SchedulerError, RuntimeError):
    """Another process holds the task store that was to be opened exclusively (a second daemon on it)."""

    code = "STORE_BUSY"


class ManifestError(SchedulerError, ValueError):
    """A manifest could not be parsed or has the wrong shape; nothing was imported."""

    code = "INVALID_MANIFEST"
