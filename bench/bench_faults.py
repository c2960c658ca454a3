"""Issue 5 targets: injected faults during a running workflow lose and duplicate nothing; the traffic pause of
each switch-over.

    python bench/bench_faults.py [--tasks 10000] [--faults 100] [--agents 3] [--json out.json]

One daemon (native router, REDUNDANT off) with fault injection for every native router it starts
(``fault_native_starts`` = --faults + 10): each router is SIGKILLed ``--kill-after`` s after it starts, and from
``--after`` s on a fraction ``--fail-rate`` of its sends fail and every batch it hands over is ``--slow-ms``
late, so whichever trigger comes first (router_disconnected, error_rate, probe_latency) degrades the daemon to
PYTHON_ONLY; recovery brings the next native router in after ``--recovery`` s, and so on.  The workflow:
``--tasks`` tasks in chains of 10 (each waits for the previous), run by ``--agents`` agent processes
(tests/python/e2e_agent.py: baton.Agent, each task sleeping ``--task-ms``).  Tasks keep running until
--faults degradations have happened and every task has finished.

Reported:
- lost: tasks not completed at the end (0 wanted); completed twice: running->completed transitions in the
  daemon's metrics minus the number of tasks (0 wanted); re-runs: tasks an agent started more than once (a
  dispatch cut off by a switch and fenced: allowed, the second run's result is the one recorded);
- the daemon's pause per router switch (from the switch's start until the new router serves and the
  coordinator has adopted it: `baton mode`'s pause_ms), and the agents' view: for each switch, the gap
  between the last task event before it began and the first task start after it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from baton import Client

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "tests/python/e2e_agent.py"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--task-ms", type=float, default=5.0)
    p.add_argument("--kill-after", type=float, default=0.6)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--after", type=float, default=0.3)
    p.add_argument("--recovery", type=float, default=0.3)
    p.add_argument("--json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-faults-") as tmp:
        os.makedirs(f"{tmp}/run", mode=0o700)
        env = dict(os.environ, XDG_STATE_HOME=f"{tmp}/state", XDG_RUNTIME_DIR=f"{tmp}/run",
                   XDG_CONFIG_HOME=f"{tmp}/config", BATON_METRICS_PORT="0", BATON_WIP_PER_AGENT_TYPE="8",
                   BATON_PROBE_INTERVAL_S="0.05", BATON_RECOVERY_INTERVAL_S=str(a.recovery),
                   BATON_RECOVERY_STEP_S="0.1", BATON_FAULT_KILL_ROUTER_S=str(a.kill_after),
                   BATON_FAULT_FAIL_RATE=str(a.fail_rate), BATON_FAULT_SLOW_MS=str(a.slow_ms),
                   BATON_FAULT_AFTER_S=str(a.after), BATON_FAULT_NATIVE_STARTS=str(a.faults + 10),
                   BATON_LEASE_S="5")
        env.pop("BATON_SOCKET", None)
        sock = f"{tmp}/run/baton/baton.sock"
        log_path = f"{tmp}/daemon.log"
        daemon = subprocess.Popen([sys.executable, "-m", "baton.daemon", "--router", "native"], env=env,
                                  stderr=open(log_path, "w"))
        agents: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 30
            while "metrics_port" not in open(log_path).read() or not os.path.exists(sock):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not start: {open(log_path).read()}")
                time.sleep(0.02)
            port = int(next(json.loads(ln)["metrics_port"] for ln in open(log_path) if '"metrics_port"' in ln))
            alog = f"{tmp}/agents.log"
            for _ in range(a.agents):
                agents.append(subprocess.Popen([sys.executable, str(AGENT), "--type", "w", "--socket", sock,
                                                "--log", alog, "--wip", "4"], env=env))
            # idempotency keys: an enqueue whose reply a switch cut off is sent again, and must not fail
            specs = [{"id": f"t{i}", "summary": "s", "agent_type": "w", "input": {"sleep": a.task_ms / 1000},
                      "idempotency_key": f"t{i}", "prerequisites": [f"t{i - 1}"] if i % 10 else []}
                     for i in range(a.tasks)]
            ids = [s["id"] for s in specs]
            t0 = time.monotonic()
            for i in range(0, len(specs), 500):
                call(sock, lambda c, i=i: c.enqueue(specs[i:i + 500]))
            # the daemon degrades and recovers by itself; we watch until enough faults and all tasks are done
            faults = 0
            while True:
                m = call(sock, lambda c: c.mode())
                faults = sum(n for r, n in m["switches"].items() if r not in ("forced", "recovery"))
                by = call(sock, lambda c: c.queue_status()).by_status
                left = sum(by.get(s, 0) for s in ("pending", "ready", "running", "blocked"))
                print(f"\r{time.monotonic() - t0:6.1f} s  faults {faults:4d}  mode {m['mode']:14s}  "
                      f"tasks left {left}   ", end="", file=sys.stderr, flush=True)
                if faults >= a.faults and left == 0:
                    break
                if time.monotonic() - t0 > 1800:
                    raise SystemExit("gave up after 30 minutes")
                time.sleep(0.5)  # a progress line twice a second
            elapsed = time.monotonic() - t0
            res = call(sock, lambda c: c.wait(ids, timeout=60))
            history = call(sock, lambda c: c.mode())["history"]
            completed = metric(port, "baton_task_transitions_total", 'from_state="running",to_state="completed"')
        finally:
            for ag in agents:
                ag.send_signal(signal.SIGTERM)
            for ag in agents:
                try:
                    ag.wait(20)
                except subprocess.TimeoutExpired:
                    ag.kill()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        events = []
        for line in open(alog):
            what, tid, ns, _ = line.split()
            events.append((int(ns), what, tid))
        events.sort()
    lost = sum(1 for s in res.statuses.values() if s != "completed")
    starts: dict[str, int] = {}
    for _, what, tid in events:
        if what == "start":
            starts[tid] = starts.get(tid, 0) + 1
    reruns = sum(1 for n in starts.values() if n > 1)
    pauses = [h["pause_ms"] for h in history if h.get("pause_ms") is not None]
    seen = []  # the agents' view: the traffic gap around each router switch
    times = [ns for ns, _, _ in events]
    start_times = [ns for ns, what, _ in events if what == "start"]
    for h in history:
        if h.get("pause_ms") is None or "mono_ns" not in h:
            continue
        began = h["mono_ns"] - int(h["pause_ms"] * 1e6)
        i = bisect.bisect_left(times, began)
        j = bisect.bisect_left(start_times, began)
        if i == 0 or j >= len(start_times):
            continue
        seen.append((start_times[j] - times[i - 1]) / 1e6)
    report = {
        "tasks": a.tasks, "faults": faults, "switches": len(pauses), "elapsed_s": round(elapsed, 1),
        "lost": lost, "completed_twice": int(completed) - a.tasks, "reruns": reruns,
        "daemon_pause_ms": {"p50": statistics.median(pauses), "p99": percentile(pauses, 0.99), "max": max(pauses)},
        "agent_gap_ms": {"p50": statistics.median(seen), "p99": percentile(seen, 0.99), "max": max(seen)}
        if seen else None,
        "pause_by_target": {
            mode: {k: statistics.median(h[k] for h in history if h.get("pause_ms") is not None and h["mode"] == mode)
                   for k in ("pause_ms", "stop_ms", "start_ms")}
            for mode in {h["mode"] for h in history if h.get("pause_ms") is not None}},
        "reasons": {},
    }
    for h in history:
        r = h["reason"].split(":")[0]
        report["reasons"][r] = report["reasons"].get(r, 0) + 1
    print(file=sys.stderr)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if lost == 0 and report["completed_twice"] == 0 else 1


def call(sock: str, fn: Any, tries: int = 200) -> Any:
    """fn(client) on a fresh connection, again when a switch closed it (a switch is at most a few hundred ms)."""
    for _ in range(tries):
        try:
            with Client(sock, timeout=30) as c:
                return fn(c)
        except Exception as exc:  # noqa: BLE001 - a closed connection, a router not accepting yet
            last = exc
            time.sleep(0.05)
    raise SystemExit(f"the daemon stopped answering: {last}")


if __name__ == "__main__":
    raise SystemExit(main())
