"""An agent process for the end-to-end tests: ``python e2e_agent.py --type T --socket S --log FILE [--wip N]``.

For every task it appends ``start <id> <ns>`` and, after the handler, ``end <id> <ns>`` (CLOCK_MONOTONIC,
shared by every process on the machine) to FILE, so a test can check that no task started before all of its
prerequisites had ended.  A task whose input is ``{"block": PATH}`` waits until PATH exists (up to 60 s):
the test can then SIGKILL the agent while it holds the task; ``{"sleep": SECONDS}`` keeps the agent busy that
long (work in flight across a mode switch); ``{"fail": true}`` makes it fail.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

from baton.agent import Agent, AgentTask


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--type", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--wip", type=int, default=1)
    args = p.parse_args()
    agent = Agent(args.type, wip=args.wip, socket=args.socket, name=f"e2e-{os.getpid()}", retry_first_connect=True)
    lock = threading.Lock()

    def log(what: str, tid: str) -> None:
        with lock, open(args.log, "a") as f:
            f.write(f"{what} {tid} {time.monotonic_ns()} {os.getpid()}\n")

    def handle(task: AgentTask) -> Any:
        log("start", task.id)
        block = task.input.get("block") if isinstance(task.input, dict) else None
        pause = task.input.get("sleep") if isinstance(task.input, dict) else None
        if pause:
            time.sleep(float(pause))
        if isinstance(task.input, dict) and task.input.get("fail"):
            log("end", task.id)
            raise RuntimeError("asked to fail")
        if block:
            deadline = time.monotonic() + 60
            while not os.path.exists(block) and time.monotonic() < deadline:
                time.sleep(0.01)
        log("end", task.id)
        return {"by": os.getpid()}

    agent.run(handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
