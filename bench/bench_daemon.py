"""Daemon start-up and footprint: time from exec to READY=1, and idle memory with its router.

    python bench/bench_daemon.py [--runs 7] [--routers native,python] [--bytecode compiled,none] [--json]
                                 [--baseline OLD/src/python/baton]

For each run, router and bytecode mode: start `python -m baton.daemon` in a fresh state/runtime directory with
NOTIFY_SOCKET pointing at a datagram socket of ours, time exec -> READY=1 (sd_notify), let it idle for a
moment, read the memory of the daemon and its children (the router process), then SIGTERM it and require
exit 0.  The runs of all combinations are interleaved (run 1 of each, then run 2 of each, ...) so that the
host's slow phases hit them alike.  Medians over the runs; targets (issue 4): ready <= 300 ms, idle RSS
<= 60 MB.

Memory, two columns: "RSS" sums VmRSS over the processes -- the stricter figure (pages the daemon and the
router share, libpython and libc above all, are counted once per process) and the one the target is judged
on; "PSS" sums the proportional set size (/proc/PID/smaps_rollup), where a shared page is split between the
processes mapping it.

Bytecode modes: the baton package is copied (without __pycache__) into a temporary directory that goes first
on PYTHONPATH, and the daemon runs with PYTHONDONTWRITEBYTECODE=1 so nothing is written back.
  compiled  the copy is byte-compiled first (compileall), as `pip install` does: an installed daemon;
  none      no bytecode for baton's own modules, compiled on every start: a source checkout in an environment
            that sets PYTHONDONTWRITEBYTECODE (third-party packages keep the bytecode pip wrote).
Only "compiled" is what users run; "none" shows what a checkout without __pycache__ costs.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

def _tree(pid: int) -> list[int]:
    """pid and, recursively, its children."""
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    out += _tree(int(c))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """Summed VmRSS and Pss (kB) of pid and its descendants, and the VmRSS of each process."""
    rss = pss = 0
    each = {}
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                r = next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss += next((int(ln.split()[1]) for ln in f if ln.startswith("Pss:")), 0)
        except (FileNotFoundError, ProcessLookupError):
            continue
        rss += r
        each[str(p)] = r
    return {"rss": rss, "pss": pss, **each}


def prepare(mode: str, root: str, src: Path, label: str) -> str:
    """A copy of the baton package ``src`` for one bytecode mode; returns the directory to put on PYTHONPATH."""
    dest = Path(root) / label / mode
    shutil.copytree(src, dest / "baton", ignore=shutil.ignore_patterns("__pycache__"))
    if mode == "compiled":
        if not compileall.compile_dir(str(dest / "baton"), quiet=1):
            raise SystemExit("compileall failed")
    elif mode != "none":
        raise SystemExit(f"unknown bytecode mode {mode!r}")
    return str(dest)


def one_run(router: str, pythonpath: str, idle_s: float) -> tuple[float, dict[str, int], int]:
    with tempfile.TemporaryDirectory(prefix="baton-bench-daemon-") as tmp:
        notify_path = os.path.join(tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(10.0)
        env = dict(os.environ, XDG_RUNTIME_DIR=os.path.join(tmp, "run"), XDG_STATE_HOME=os.path.join(tmp, "state"),
                   XDG_CONFIG_HOME=os.path.join(tmp, "config"), NOTIFY_SOCKET=notify_path, BATON_ROUTER=router,
                   PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p))
        env.pop("BATON_SOCKET", None)
        os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "baton.daemon"], env=env, stderr=subprocess.DEVNULL)
        try:
            while True:
                msg = notify.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    break
            ready_ms = (time.perf_counter() - t0) * 1000
            time.sleep(idle_s)  # idle means idle: nothing to poll for, we want the settled footprint
            mem = memory_kib(proc.pid)
            proc.send_signal(signal.SIGTERM)
            if proc.wait(30) != 0:
                raise SystemExit(f"daemon ({router}) exited {proc.returncode} on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
            notify.close()
    return ready_ms, mem, proc.pid


def commit_of(repo: str) -> str:
    """The git commit of the checkout holding ``repo`` (a package directory), "+" changes not committed."""
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, object]:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 1), "range": [round(min(xs), 1), round(max(xs), 1)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--routers", default="native,python")
    ap.add_argument("--bytecode", default="compiled,none", help="compiled, none, or both (comma-separated)")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds of idling before reading memory")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure the baton package in DIR (e.g. a git worktree's src/python/baton of an older "
                         "commit, with _native*.so copied in), interleaved run by run with the current one")
    args = ap.parse_args()
    import baton

    packages = {"current": Path(baton.__file__).resolve().parent}
    if args.baseline:
        packages = {"baseline": Path(args.baseline).resolve(), **packages}
    routers, modes = args.routers.split(","), args.bytecode.split(",")
    Run = tuple[float, dict[str, int], int]  # ready ms, memory (kB), daemon pid
    combos = [(p, m, r) for p in packages for m in modes for r in routers]
    results: dict[tuple[str, str, str], list[Run]] = {c: [] for c in combos}
    with tempfile.TemporaryDirectory(prefix="baton-bench-pkg-") as pkgs:
        paths = {(p, m): prepare(m, pkgs, src, p) for p, src in packages.items() for m in modes}
        for _ in range(args.runs):
            for p, m, r in combos:
                results[(p, m, r)].append(one_run(r, paths[(p, m)], args.idle))
    rows: list[dict[str, Any]] = [
        {"package": p, "commit": commit_of(str(packages[p])), "bytecode": m, "router": r,
         "ready_ms": _stats([x[0] for x in runs]),
         "idle_rss_mb": _stats([x[1]["rss"] / 1024 for x in runs]),
         "idle_pss_mb": _stats([x[1]["pss"] / 1024 for x in runs]),
         "daemon_rss_mb": _stats([x[1][str(x[2])] / 1024 for x in runs]),
         "processes": len(runs[0][1]) - 2}
        for (p, m, r), runs in results.items()
    ]
    mach = machine()
    if args.json:
        print(json.dumps({"machine": mach, "runs": args.runs, "results": rows}, indent=2))
        return 0
    print(f"{mach['cpu']}, {mach['cores']} cores, Linux {mach['kernel']}, Python {mach['python']}; "
          f"medians of {args.runs} runs (range); commit + = with uncommitted changes")
    print(f"{'commit':12} {'bytecode':9} {'router':7} {'ready ms':>22} {'idle RSS MB (summed)':>24} "
          f"{'idle PSS MB':>22} {'daemon RSS MB':>22}")

    def cell(s: dict[str, Any]) -> str:
        return f"{s['median']} ({s['range'][0]}-{s['range'][1]})"

    for row in rows:
        print(f"{row['commit']:12} {row['bytecode']:9} "
              f"{row['router']:7} {cell(row['ready_ms']):>22} {cell(row['idle_rss_mb']):>24} "
              f"{cell(row['idle_pss_mb']):>22} {cell(row['daemon_rss_mb']):>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
