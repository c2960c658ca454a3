"""Daemon start-up and footprint: time from exec to READY=1, and idle RSS with its router.

    python bench/bench_daemon.py [--runs 7] [--routers native,python] [--json]

For each router and run: start `python -m baton.daemon` in a fresh state/runtime directory with
NOTIFY_SOCKET pointing at a datagram socket of ours, time exec -> READY=1 (sd_notify), let it idle for a
moment, sum VmRSS of the daemon and its children (the router process), then SIGTERM it and require exit 0.
Medians over the runs; targets (issue 4): ready <= 300 ms, idle RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def rss_kib(pid: int) -> int:
    """VmRSS of pid and, recursively, its children."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")), 0)
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(rss_kib(int(c)) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def one_run(router: str, idle_s: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="baton-bench-daemon-") as tmp:
        notify_path = os.path.join(tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(10.0)
        env = dict(os.environ, XDG_RUNTIME_DIR=os.path.join(tmp, "run"), XDG_STATE_HOME=os.path.join(tmp, "state"),
                   XDG_CONFIG_HOME=os.path.join(tmp, "config"), NOTIFY_SOCKET=notify_path, BATON_ROUTER=router)
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
            rss_mb = rss_kib(proc.pid) / 1024
            proc.send_signal(signal.SIGTERM)
            if proc.wait(30) != 0:
                raise SystemExit(f"daemon ({router}) exited {proc.returncode} on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
            notify.close()
    return ready_ms, rss_mb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--routers", default="native,python")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds of idling before reading RSS")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict[str, object] = {"machine": {"kernel": platform.release(), "cores": os.cpu_count()}, "routers": {}}
    for router in args.routers.split(","):
        runs = [one_run(router, args.idle) for _ in range(args.runs)]
        ready = [r[0] for r in runs]
        rss = [r[1] for r in runs]
        report["routers"][router] = {  # type: ignore[index]
            "ready_ms_median": round(statistics.median(ready), 1), "ready_ms_range": [round(min(ready), 1),
                                                                                       round(max(ready), 1)],
            "idle_rss_mb_median": round(statistics.median(rss), 1), "idle_rss_mb_range": [round(min(rss), 1),
                                                                                          round(max(rss), 1)],
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for router, r in report["routers"].items():  # type: ignore[attr-defined]
            print(f"{router:8} ready {r['ready_ms_median']} ms (range {r['ready_ms_range']}), "
                  f"idle RSS {r['idle_rss_mb_median']} MB (range {r['idle_rss_mb_range']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
