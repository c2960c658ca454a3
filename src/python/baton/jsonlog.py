"""JSON-lines logging for the daemon: one JSON object per line on stderr, so that journald, docker or any log
shipper can parse the output without a grammar.

Standard library only: log lines are written at human rates, and the formatter must keep working even if
an optional dependency is what failed to import.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "configure_logging", "LEVELS"]

LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted as a field.
# Computed from a real record so that attributes added by newer Pythons (taskName in 3.12) are not mistaken
# for extras.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fallback(value: Any) -> str:
    # Extras are whatever callers pass (paths, enums, exceptions): a log line must never fail to be written.
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields, "exc"?, "stack"?}`` on one line.

    ``ts`` is ISO-8601 in UTC with microseconds; ``level`` is lower case, as the configuration spells it.  An
    extra field whose name collides with one of the fixed keys is kept as ``extra_<name>`` rather than
    overwriting it.  Newlines (tracebacks) are escaped by JSON, so a record is always exactly one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                obj[f"extra_{key}" if key in obj else key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=_fallback)


def configure_logging(level: str | int = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records (baton's, asyncio's, libraries') to ``stream`` as JSON lines and return the
    handler.

    ``stream`` None means the ``sys.stderr`` of the moment of the call (a default bound at import time would
    miss a later redirection).  Calling again replaces the handler installed before instead of adding a
    second one, so lines are never duplicated.
    """
    if isinstance(level, str):
        try:
            level = LEVELS[level.lower()]
        except KeyError:
            raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}") from None
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
