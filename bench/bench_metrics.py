"""Issue 6 targets: a scrape with 100k tasks in the store, and what metrics cost in no-op task throughput.

    python bench/bench_metrics.py scrape [--tasks 100000] [--scrapes 50]
    python bench/bench_metrics.py overhead --baseline /path/to/old/src/python [--runs 3] [--tasks 40000]

scrape: a fresh daemon (bench_issue4.fresh_daemon), GET /metrics --scrapes times with an empty store, then
enqueue --tasks tasks (no agents: they stay ready) and scrape again; prints median / p95 / max milliseconds
per scrape (the whole HTTP request, measured by the client) and the size of the answer.

overhead: no-op throughput (`baton bench handoff throughput`, two agents, wip_per_agent_type 64) of this
code with Prometheus-style scraping every --interval seconds, against the code at --baseline (a checkout from
before the metrics, no scraping: it has no endpoint), interleaved run by run (each pair in the other order
than the last); prints tasks/s per run, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_issue4 import fresh_daemon, one_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_ms(port: int, n: int) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read()
        times.append((time.perf_counter() - t0) * 1000)
        if r.status != 200:
            raise SystemExit(f"/metrics answered {r.status}: {body[:200]!r}")
        size = len(body)
    conn.close()
    return times, size


def summary(times: list[float]) -> str:
    times = sorted(times)
    return (f"median {statistics.median(times):6.2f} ms  p95 {times[int(len(times) * 0.95)]:6.2f} ms  "
            f"max {times[-1]:6.2f} ms")


def wait_http(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no metrics endpoint on port {port}") from None
            time.sleep(0.05)


def cmd_scrape(a: argparse.Namespace) -> None:
    from baton import Client

    port = free_port()
    with fresh_daemon(a.router, {"BATON_METRICS_PORT": str(port)}) as (sock, _):
        wait_http(port)
        scrape_ms(port, 3)  # the first scrape imports prometheus_client
        times, size = scrape_ms(port, a.scrapes)
        print(f"empty store:      {summary(times)}  ({size} bytes)", flush=True)
        with Client(sock) as c:
            for i in range(0, a.tasks, 5000):
                c.enqueue([{"summary": "s", "agent_type": f"t{(i + k) % 4}"} for k in range(min(5000, a.tasks - i))])
                print(f"enqueued {min(i + 5000, a.tasks)}/{a.tasks}", end="\r", file=sys.stderr, flush=True)
            assert c.queue_status().total >= a.tasks
        times, size = scrape_ms(port, a.scrapes)
        print(f"{a.tasks} tasks:     {summary(times)}  ({size} bytes)", flush=True)


def cmd_overhead(a: argparse.Namespace) -> None:
    bench_args = ["--tasks", str(a.tasks)]
    env = {"BATON_WIP_PER_AGENT_TYPE": "64"}
    rates: dict[str, list[float]] = {"baseline": [], "metrics": []}
    scrapes = 0
    for i in range(a.runs):
        # Alternate which goes first: the second run of a pair was measured slower whatever it ran.
        for label in ("baseline", "metrics") if i % 2 == 0 else ("metrics", "baseline"):
            if label == "baseline":
                os.environ["PYTHONPATH"] = a.baseline
                res = one_run("native", ["throughput"], bench_args, env)
                os.environ.pop("PYTHONPATH")
            else:
                port = free_port()
                stop = threading.Event()

                def scraper() -> None:
                    nonlocal scrapes
                    wait_http(port)
                    while not stop.wait(a.interval):
                        try:
                            scrape_ms(port, 1)
                        except OSError:
                            return  # the run ended and its daemon is gone
                        scrapes += 1

                t = threading.Thread(target=scraper, daemon=True)
                t.start()
                try:
                    res = one_run("native", ["throughput"], bench_args, {**env, "BATON_METRICS_PORT": str(port)})
                finally:
                    stop.set()
                    t.join()
            rate = res[0]["extra"]["tasks_per_s"]
            rates[label].append(rate)
            print(f"run {i + 1} {label:8}: {rate:8.0f} tasks/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median baseline {med['baseline']:.0f}/s, with metrics {med['metrics']:.0f}/s: "
          f"{(1 - med['metrics'] / med['baseline']) * 100:+.1f}% cost ({scrapes} scrapes during the runs)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scrape")
    s.add_argument("--tasks", type=int, default=100_000)
    s.add_argument("--scrapes", type=int, default=50)
    s.add_argument("--router", default="native")
    o = sub.add_parser("overhead")
    o.add_argument("--baseline", required=True, help="src/python of a checkout from before the metrics")
    o.add_argument("--runs", type=int, default=3)
    o.add_argument("--tasks", type=int, default=40_000)
    o.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    a = p.parse_args()
    print(f"# {shlex.join(sys.argv)}", flush=True)
    cmd_scrape(a) if a.cmd == "scrape" else cmd_overhead(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
