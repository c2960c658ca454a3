"""Metrics and health endpoints (docs/metrics.md) of a real daemon process, and the counters behind them."""

from __future__ import annotations

import http.client
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from daemon_harness import Daemon, daemon_env, running_daemon
from prometheus_client.parser import text_string_to_metric_families
from scheduler_fixtures import ManualClock, make, spec

from baton.metrics import BUCKETS_S, METRICS, Histogram


class Metrics:
    """One daemon's HTTP endpoints."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type") or "", r.read().decode()
        finally:
            conn.close()

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, text = self.get("/metrics")
        assert status == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), float("nan"))


@pytest.fixture(params=["native", "python"])
def daemon(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[tuple[Daemon, Metrics]]:
    with running_daemon(short_tmp, request.param) as d:
        yield d, Metrics(d.metrics_port())


def run_tasks(d: Daemon, n: int, agent_type: str = "m") -> None:
    """n tasks through a real agent connection, each reported done."""
    with d.client() as client, d.client() as agent:
        agent.hello(name="agent", agent_type=agent_type, wip=2)
        client.hello()
        client.call("enqueue", tasks=[{"id": f"{agent_type}{i}", "summary": "s", "agent_type": agent_type}
                                      for i in range(n)])
        for _ in range(n):
            frame, task = agent.next_task(timeout=20)
            agent.result(frame, task, result=task["id"])


def test_health_and_metrics_after_real_work(daemon: tuple[Daemon, Metrics]) -> None:
    d, m = daemon
    assert m.get("/health/live")[:2] == (200, "application/json")
    status, _, body = m.get("/health/ready")
    assert status == 200 and '"ready": true' in body and '"router": true' in body, body
    run_tasks(d, 25)
    wait_for(lambda: m.value("baton_task_run_seconds_count") == 25, timeout=20, what="25 run times")
    s = m.samples()
    assert s[("baton_tasks_completed_total", ())] == 25
    assert s[("baton_tasks", (("state", "completed"),))] == 25
    assert s[("baton_tasks_submitted_total", ())] == 25
    assert s[("baton_task_transitions_total", (("from_state", "ready"), ("to_state", "running")))] == 25
    assert s[("baton_queue_wait_seconds_count", ())] == 25
    assert s[("baton_ready_tasks", (("agent_type", "m"),))] == 0
    assert s[("baton_router_up", ())] == 1
    # the agent's RESULTs and the coordinator's TASK pushes, counted by the router itself (RESULT acks too)
    assert s[("baton_router_frames_total", (("pattern", "task"), ("priority", "normal")))] >= 25
    assert s[("baton_router_frames_total", (("pattern", "result"), ("priority", "normal")))] >= 25
    assert s[("baton_router_bytes_total", (("pattern", "task"), ("priority", "normal")))] > 25 * 48
    assert s[("baton_router_connections", ())] >= 0
    mode = "INTELLIGENT" if d.env["BATON_ROUTER"] == "native" else "PYTHON_ONLY"
    assert s[("baton_mode", (("mode", mode),))] == 1
    assert sum(v for (name, _), v in s.items() if name == "baton_mode") == 1
    build = [labels for (name, labels), v in s.items() if name == "baton_build_info" and v == 1]
    assert build and dict(build[0])["router"] == d.env["BATON_ROUTER"]
    # the histogram is cumulative and ends with every observation
    buckets = sorted((float(dict(lbl)["le"]), v) for (name, lbl), v in s.items()
                     if name == "baton_task_run_seconds_bucket")
    assert [b for b, _ in buckets] == [*BUCKETS_S, float("inf")]
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])) and buckets[-1][1] == 25
    # every metric of the list is in the exposition (labelled ones once they have a value)
    names = {name for name, _ in s}
    for metric in METRICS:
        suffix = {"counter": "_total", "histogram": "_count", "gauge": ""}[metric.kind]
        if metric.name in ("baton_mode_switches", "baton_router_frames", "baton_router_bytes",
                           "baton_agents", "baton_task_transitions", "baton_wip_in_use", "baton_wip_limit"):
            continue  # labelled families without a sample yet, or checked above
        assert metric.name + suffix in names, metric.name


def test_agents_and_wip_while_a_task_is_held(daemon: tuple[Daemon, Metrics]) -> None:
    d, m = daemon
    with d.client() as client, d.client() as agent, d.client() as idle:
        agent.hello(name="a", agent_type="w", wip=1)
        idle.hello(name="b", agent_type="w", wip=1)
        client.hello()
        client.call("enqueue", tasks=[{"id": "held", "summary": "s", "agent_type": "w"},
                                      {"id": "lonely", "summary": "s", "agent_type": "nobody"}])
        agent.next_task(timeout=20)
        wait_for(lambda: m.value("baton_agents", agent_type="w", state="busy") == 1, timeout=20, what="busy agent")
        s = m.samples()
        assert s[("baton_agents", (("agent_type", "w"), ("state", "idle")))] == 1
        assert s[("baton_wip_in_use", (("agent_type", "w"),))] == 1
        assert s[("baton_wip_limit", (("agent_type", "w"),))] == 3
        assert s[("baton_ready_tasks", (("agent_type", "nobody"),))] == 1  # what the no-agent alert watches


def test_openmetrics_on_request(daemon: tuple[Daemon, Metrics]) -> None:
    _, m = daemon
    status, ctype, body = m.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
    assert body.rstrip().endswith("# EOF") and "baton_tasks_completed_total 0" in body
    status, ctype, body = m.get("/metrics")
    assert ctype.startswith("text/plain") and "# EOF" not in body


def test_bad_requests_get_errors_and_the_daemon_keeps_serving(daemon: tuple[Daemon, Metrics]) -> None:
    d, m = daemon
    assert m.get("/nope")[0] == 404
    assert m.get("/metrics", method="POST")[0] == 405
    assert m.get("/metrics", method="HEAD")[:2] == (200, "text/plain; version=0.0.4; charset=utf-8")
    for raw in (b"GARBAGE\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n", b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
                b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n", b"\x00\xff" * 100 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
            s.sendall(raw)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 "), (raw[:30], reply[:80])
    # two requests on one keep-alive connection
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
    for _ in range(2):
        conn.request("GET", "/health/live")
        assert conn.getresponse().read() == b'{"status": "live"}\n'
    conn.close()
    run_tasks(d, 3)  # the daemon itself is untouched
    wait_for(lambda: m.value("baton_tasks_completed_total") == 3, timeout=20, what="3 completions")


def test_ready_turns_503_while_draining(daemon: tuple[Daemon, Metrics]) -> None:
    d, m = daemon
    with d.client() as client, d.client() as agent:
        agent.hello(name="a", agent_type="w", wip=1)
        client.hello()
        client.call("enqueue", tasks=[{"id": "long", "summary": "s", "agent_type": "w"}])
        frame, task = agent.next_task(timeout=20)
        d.signal(signal.SIGTERM)  # drains: waits for the held task (drain timeout 30 s)

        def not_ready() -> Any:
            status, _, body = m.get("/health/ready")
            return status == 503 and '"not_draining": false' in body and '"store": true' in body

        wait_for(not_ready, timeout=20, what="/health/ready 503 while draining")
        assert m.get("/health/live")[0] == 200
        agent.result(frame, task, wait=False)
    assert d.wait(30) == 0


def test_metrics_port_in_use_is_a_clear_start_error(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = daemon_env(short_tmp)
        env["BATON_METRICS_PORT"] = str(taken.getsockname()[1])
        d = Daemon(short_tmp, env)
        try:
            assert d.wait(20) == 1
            assert "cannot serve metrics on 127.0.0.1:" in d.log and "metrics_port" in d.log, d.log
        finally:
            d.kill()


# --- the counters behind the metrics ------------------------------------------------------------------------


def test_scheduler_activity_counts_live_changes_only(tmp_path: Path) -> None:
    clock = ManualClock()
    s = make(tmp_path, clock)
    s.enqueue_many([spec("a"), spec("b", prerequisites=["a"]), spec("c", max_attempts=2), spec("d", max_attempts=1)])
    act = s.activity
    assert act.submitted == 4 and not act.transitions
    assert s.ready_by_type() == {"impl": 3}
    a = s.claim("impl", "w")
    assert a is not None
    s.complete(a.task_id, a.fencing_token)
    assert act.transitions[("ready", "running")] == 1 and act.transitions[("running", "completed")] == 1
    assert act.transitions[("pending", "ready")] == 1  # b released
    claims = {c.task_id: c for c in s.claim_many("impl", "w", 3)}
    assert s.ready_by_type() == {"impl": 0}
    s.fail("c", claims["c"].fencing_token, "flaky", transient=True)  # retried
    s.fail("d", claims["d"].fencing_token, "broken", transient=False)  # dead-lettered
    assert (act.attempts_failed, act.retried) == (2, 1)
    assert act.transitions[("running", "dead_lettered")] == 1
    clock.advance(3600)  # b's lease expires: a failed attempt, retried
    s.expire_leases()
    assert (act.attempts_failed, act.retried) == (3, 2)
    assert s.ready_by_type() == {"impl": 2}
    assert s.ready_by_type()["impl"] == sum(1 for t in s.tasks() if t.status.value == "ready")
    s.close()
    again = make(tmp_path, clock)  # loading the store counts nothing
    assert again.activity.submitted == 0 and not again.activity.transitions
    assert again.ready_by_type() == {"impl": 2}
    again.close()


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram()
    for v in (5e-6, 10e-6, 11e-6, 0.3, 99.0):
        h.observe(v)
    b = dict(h.buckets())
    assert b["1e-05"] == 2  # 10 us is inside the 10 us bucket (le)
    assert b["2.5e-05"] == 3 and b["0.5"] == 4 and b["10.0"] == 4 and b["+Inf"] == 5
    assert h.sum == pytest.approx(5e-6 + 10e-6 + 11e-6 + 0.3 + 99.0)
