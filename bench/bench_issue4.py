"""Issue 4 targets (a), (b), (c): `baton bench handoff` against a fresh daemon, medians over several runs.

    python bench/bench_issue4.py [--runs 3] [--routers native,python] [--what rt,handoff,throughput]
                                 [--bench-args "--chain 2000"] [--env KEY=VALUE ...] [--json out.json]

For each router: start `python -m baton.daemon --router R` with XDG_STATE_HOME / XDG_RUNTIME_DIR in a fresh
temporary directory, wait for its socket, run `python -m baton.bench_handoff <what> --json` --runs times
(a fresh daemon per run, so no run inherits another's journal), and print the median of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def fresh_daemon(router: str, env_extra: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """A daemon with its own XDG directories in a temporary directory; yields (socket path, its environment).
    Stopped with SIGTERM on the way out."""
    with tempfile.TemporaryDirectory(prefix="baton-i4-") as tmp:
        env = dict(os.environ, XDG_STATE_HOME=f"{tmp}/state", XDG_RUNTIME_DIR=f"{tmp}/run",
                   XDG_CONFIG_HOME=f"{tmp}/config", **env_extra)
        os.makedirs(f"{tmp}/run", mode=0o700)
        sock = f"{tmp}/run/baton/baton.sock"
        env.pop("BATON_SOCKET", None)
        daemon = subprocess.Popen([sys.executable, "-m", "baton.daemon", "--router", router, "--log-level", "warning"],
                                  env=env, stderr=open(f"{tmp}/daemon.log", "w"))
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not start: {open(f'{tmp}/daemon.log').read()}")
                time.sleep(0.02)
            yield sock, env
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def one_run(router: str, what: list[str], bench_args: list[str], env_extra: dict[str, str]) -> list[dict[str, Any]]:
    with fresh_daemon(router, env_extra) as (sock, env), tempfile.TemporaryDirectory(prefix="baton-i4o-") as tmp:
        out = f"{tmp}/out.json"
        subprocess.run([sys.executable, "-m", "baton.bench_handoff", *what, "--socket", sock, "--out", out,
                        *bench_args], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            results: list[dict[str, Any]] = json.load(f)["results"]
        return results


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement over several runs: the median of each percentile, each run's figures, and the
    throughput's when there is one."""
    line: dict[str, Any] = {k: statistics.median(r[k] for r in rows) for k in ("p50", "p99", "p999", "max")}
    line["runs"] = [[r["p50"], r["p99"], r["p999"]] for r in rows]
    if "tasks_per_s" in rows[0]["extra"]:
        line["tasks_per_s"] = statistics.median(r["extra"]["tasks_per_s"] for r in rows)
        line["tasks_per_s_runs"] = [r["extra"]["tasks_per_s"] for r in rows]
    return line


def describe(line: dict[str, Any]) -> str:
    extra = f" tasks/s={line['tasks_per_s']:.0f} {line['tasks_per_s_runs']}" if "tasks_per_s" in line else ""
    return (f"p50={line['p50']:8.1f} p99={line['p99']:8.1f} p99.9={line['p999']:8.1f} "
            f"(p50 of each run: {[r[0] for r in line['runs']]}){extra}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--routers", default="native")
    p.add_argument("--what", default="handoff,throughput")
    p.add_argument("--bench-args", default="")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--json")
    a = p.parse_args()
    env_extra = dict(kv.split("=", 1) for kv in a.env)
    summary = []
    for router in a.routers.split(","):
        runs = [one_run(router, a.what.split(","), shlex.split(a.bench_args), env_extra) for _ in range(a.runs)]
        for i, first in enumerate(runs[0]):
            line = {"router": router, "name": first["name"], **medians([r[i] for r in runs])}
            summary.append(line)
            print(f"{router:6} {first['name'][:44]:44} {describe(line)}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
