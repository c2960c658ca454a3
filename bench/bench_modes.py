"""Issue 5: the four execution modes side by side on `baton bench handoff`, medians over several runs.

    python bench/bench_modes.py [--runs 3] [--what handoff,throughput] [--bench-args "--chain 2000"]
                                [--modes INTELLIGENT,REDUNDANT] [--env KEY=VALUE ...] [--json out.json]

Each run measures every mode on a fresh daemon of its own started in that mode (bench_issue4.fresh_daemon with
BATON_MODE; its own XDG directories, an empty store): `python -m baton.bench_handoff <what>`.  The order of the
modes rotates from run to run, so that no mode always runs first.

Why not one daemon switched between modes (`baton bench handoff --modes`, which does that)?  Each measurement
leaves its tasks in the store, and the later ones in a sequence measured up to 25% slower whatever their mode
(INTELLIGENT 47k, 41k, 35k tasks/s in positions 1, 3 and 6 of one such sequence): fine to look at, not to
state a mode's cost with.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from typing import Any

from bench_issue4 import describe, fresh_daemon, medians

MODES = ["INTELLIGENT", "PYTHON_ONLY", "REDUNDANT", "SPEED_CRITICAL"]


def one_run(mode: str, what: list[str], bench_args: list[str], env_extra: dict[str, str]) -> list[Any]:
    router = "python" if mode == "PYTHON_ONLY" else "native"
    with fresh_daemon(router, {**env_extra, "BATON_MODE": mode}) as (sock, env), \
            tempfile.TemporaryDirectory(prefix="baton-modes-") as tmp:
        out = f"{tmp}/out.json"
        subprocess.run([sys.executable, "-m", "baton.bench_handoff", *what, "--socket", sock, "--out", out,
                        *bench_args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            results: list[Any] = json.load(f)["results"]
            return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--what", default="handoff,throughput")
    p.add_argument("--bench-args", default="")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--modes", default=",".join(MODES), help="which modes (default: all four)")
    p.add_argument("--json")
    a = p.parse_args()
    modes = [m.strip().upper() for m in a.modes.split(",")]
    env_extra = dict(kv.split("=", 1) for kv in a.env)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in range(a.runs):
        order = modes[run % len(modes):] + modes[:run % len(modes)]
        print(f"run {run + 1}/{a.runs}: {' '.join(order)}", file=sys.stderr, flush=True)
        for mode in order:
            for r in one_run(mode, a.what.split(","), shlex.split(a.bench_args), env_extra):
                rows.setdefault((r["name"], mode), []).append(r)
    summary = []
    for (name, mode), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        line = {"name": name, "mode": mode, **medians(rs)}
        summary.append(line)
        print(f"{name[:40]:40} {mode:14} {describe(line)}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
