"""A real Prometheus server scraping a real daemon (docs/metrics.md, monitoring/).

The daemon (`python -m baton.daemon`, each router) runs a few dozen tasks through agent processes
(tests/python/e2e_agent.py) and a client; `prometheus` (Debian package, installed by scripts/install-deps)
scrapes its /metrics every second with monitoring/alerts.yml loaded.  The test reads what Prometheus stored,
through its HTTP API, as a dashboard or an alert would: the scrape is up, the counters match the work done,
every alert rule evaluates without error on real data, and every dashboard query is accepted.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, wait_for
from daemon_harness import Agents, Daemon, running_daemon

from baton import Client

ALERTS = REPO / "monitoring" / "alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "baton.json"
N_TASKS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """`prometheus` on a free port with its storage in a temporary directory, scraping one daemon every second."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run scripts/install-deps (Debian package prometheus); "
                        "CI installs it, so this test does not skip")
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: baton\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        self.log_path = self.dir / "prometheus.log"
        self.target = f"127.0.0.1:{target_port}"
        for _ in range(3):  # a free port can be taken between free_port() and prometheus binding it: try another
            self.port = free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
            if wait_for(self._ready_or_exited, 30, 0.05, "Prometheus to be ready") == "ready":
                return
            if "address already in use" not in self.log:
                break
        pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready_or_exited(self) -> str | None:
        if self.proc.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return "ready" if r.status == 200 else None
        except (urllib.error.URLError, OSError):
            return None

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.load(exc)
        assert body.get("status") == "success", f"GET {url}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(params=["native", "python"])
def daemon(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Daemon]:
    with running_daemon(short_tmp, request.param) as d:
        yield d


@pytest.fixture
def prometheus(daemon: Daemon, short_tmp: Path) -> Iterator[Prometheus]:
    p = Prometheus(short_tmp, daemon.metrics_port())
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def agents(daemon: Daemon, short_tmp: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    a = Agents(daemon, short_tmp / "agents.log")
    try:
        for _ in range(2):
            a.start("work", wip=2)
        yield a.procs
    finally:
        a.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    out = []

    def walk(node: Any, title: str) -> None:
        if isinstance(node, dict):
            title = node.get("title", title)
            if isinstance(node.get("expr"), str):
                out.append((title, node["expr"]))
            for v in node.values():
                walk(v, title)
        elif isinstance(node, list):
            for v in node:
                walk(v, title)

    walk(json.loads(DASHBOARD.read_text())["panels"], "")
    return out


def test_prometheus_scrapes_the_work_done(daemon: Daemon, prometheus: Prometheus,
                                          agents: list[subprocess.Popen[bytes]]) -> None:
    p = prometheus
    with Client(daemon.socket_path) as c:
        wait_for(lambda: len(c.agents()) == len(agents), timeout=30, what="the agents to connect")
        ids = [f"t{i}" for i in range(N_TASKS)]
        c.enqueue([{"id": i, "summary": f"task {i}", "agent_type": "work", "input": {}} for i in ids])
        res = c.wait(ids, timeout=60)
        assert not res.timed_out and set(res.statuses.values()) == {"completed"}, res

    def scraped_all() -> bool:
        return p.value("baton_tasks_completed_total") == N_TASKS

    try:
        wait_for(scraped_all, 30, 0.1, f"Prometheus to scrape baton_tasks_completed_total == {N_TASKS}")
    except BaseException:
        print(f"targets: {p.api('targets')}\nprometheus log:\n{p.log}\ndaemon log:\n{daemon.log}")
        raise

    # the scrape itself
    assert p.value('up{job="baton"}') == 1
    target = p.api("targets")["activeTargets"]
    assert [(t["scrapeUrl"], t["health"]) for t in target] == [(f"http://{p.target}/metrics", "up")], target
    # the work: every task submitted once, dispatched once (one queue wait and one run each), completed
    assert p.value("baton_tasks_submitted_total") == N_TASKS
    assert p.value('baton_tasks{state="completed"}') == N_TASKS
    assert p.value("sum(baton_tasks) - sum(baton_tasks{state=\"completed\"})") == 0
    assert p.value("baton_queue_wait_seconds_count") == N_TASKS
    assert p.value('baton_queue_wait_seconds_bucket{le="+Inf"}') == N_TASKS
    assert p.value("baton_task_run_seconds_count") == N_TASKS
    assert p.value("baton_tasks_failed_total") == 0
    assert p.value("baton_tasks_dead_lettered_total") == 0
    run_sum = p.value("baton_task_run_seconds_sum")
    assert run_sum is not None and 0 < run_sum < 60 * N_TASKS
    # the router and the build
    assert p.value("baton_router_up") == 1
    frames = p.value('sum(baton_router_frames_total{pattern="task"})')
    assert frames is not None and frames >= N_TASKS, "every task went to an agent as a TASK frame"
    build = p.query("baton_build_info")
    assert len(build) == 1 and float(build[0]["value"][1]) == 1, build
    assert build[0]["metric"]["router"] == daemon.env["BATON_ROUTER"], build
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", build[0]["metric"]["version"]), build
    # the agents, idle now
    assert p.value('sum(baton_agents{agent_type="work"})') == len(agents)
    assert p.value('sum(baton_agents{state="busy"}) or vector(0)') == 0  # no series when none is busy
    assert p.value('sum(baton_ready_tasks{agent_type="work"}) or vector(0)') == 0

    # every alert rule of monitoring/alerts.yml evaluated on this data without an error, and none fires
    def all_evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in p.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(not r["lastEvaluation"].startswith("0001-") for r in rules) else None

    rules = wait_for(all_evaluated, 20, 0.1, "Prometheus to evaluate every alert rule")
    assert sorted(r["name"] for r in rules) == sorted(
        ["BatonRouterDown", "BatonDegradedMode", "BatonQueueWaitHigh", "BatonDeadLettersGrowing",
         "BatonReadyTasksWithoutAgent"])
    for r in rules:
        assert r["health"] == "ok", f"alert {r['name']} does not evaluate: {r.get('lastError')}"
    active = {(r["name"], a["state"]) for r in rules for a in r["alerts"]}
    if daemon.env["BATON_ROUTER"] == "python":
        active.discard(("BatonDegradedMode", "pending"))  # PYTHON_ONLY for less than its 5 minutes
    assert not active, f"alerts active on a healthy daemon: {active}"

    # every dashboard query is accepted by a real Prometheus ($__ variables as Grafana would expand them)
    for title, expr in dashboard_queries():
        q = re.sub(r"\$__(rate_interval|interval)", "1m", expr).replace("$__range", "1h")
        try:
            p.query(q)
        except AssertionError as exc:
            raise AssertionError(f"dashboard panel {title!r}: {expr}: {exc}") from None
    assert p.value('sum(baton_tasks{state="completed"})') == N_TASKS, "the Tasks by state panel sees the work"
