"""``baton worker --type T -- CMD ARGS...``: any program becomes an agent.

CMD runs once per task with the task as JSON on stdin (``id``, ``token``, ``agent_type``, ``attempt``,
``input``, ``metadata``, ``timeout_s``; bytes in ``input`` arrive as base64 text, JSON has no bytes), the
task id in ``BATON_TASK_ID`` and the attempt in ``BATON_TASK_ATTEMPT``.  Exit status 0 means success and
stdout is the result: the JSON value when stdout parses as JSON, else the text (empty stdout: no result).
Any other exit status fails the attempt with the exit status and the tail of stderr as the error.  A task with
``timeout_s`` kills CMD when it is over.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Sequence
from typing import Any, Final

from baton.agent import Agent, AgentTask, TaskFailed

__all__ = ["CommandHandler", "run_worker", "task_json", "parse_output"]

STDERR_TAIL: Final = 2000  # characters of stderr kept in a failure's error text


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def task_json(task: AgentTask) -> bytes:
    return json.dumps(task.as_dict(), default=_json_default).encode()


def parse_output(stdout: bytes) -> Any:
    """A successful run's result: JSON if stdout parses as JSON, else the text; None for empty output."""
    text = stdout.decode("utf-8", errors="replace")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


class CommandHandler:
    """The async handler that runs ``argv`` for each task."""

    __slots__ = ("argv",)

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("baton worker needs a command to run: baton worker --type T -- CMD ARGS...")
        self.argv = list(argv)

    async def __call__(self, task: AgentTask) -> Any:
        env = dict(os.environ, BATON_TASK_ID=task.id, BATON_TASK_ATTEMPT=str(task.attempt))
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env,
            )
        except OSError as exc:
            raise TaskFailed(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        try:
            out, err = await proc.communicate(task_json(task))
        except BaseException:
            # Cancelled (timeout or a forced stop): the task is given up, so its program must not linger.
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode == 0:
            return parse_output(out)
        tail = err.decode("utf-8", errors="replace")[-STDERR_TAIL:].strip()
        status = proc.returncode or 0
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        raise TaskFailed(f"{self.argv[0]} failed ({how})" + (f": {tail}" if tail else ""))


def run_worker(agent_type: str, argv: Sequence[str], *, wip: int = 1, socket: str | None = None,
               name: str | None = None, capabilities: Sequence[str] = ()) -> None:
    """Serve tasks of agent_type by running argv for each, until SIGINT/SIGTERM."""
    handler = CommandHandler(argv)
    Agent(agent_type, capabilities=capabilities, wip=wip, socket=socket, name=name).run(handler)
