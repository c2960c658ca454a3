"""The native router dies under a running daemon: it switches to PYTHON_ONLY on the same socket and nothing is
lost or run twice; the triggers, recovery, REDUNDANT and SPEED_CRITICAL (docs/modes.md)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from daemon_harness import Agents, Daemon, running_daemon
from prometheus_client.parser import text_string_to_metric_families

from baton import Client
from baton.client_errors import ClientError


def metric(port: int, name: str, **labels: str) -> float | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_router_killed_mid_work_switches_to_python_and_loses_nothing(short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    with running_daemon(short_tmp, "native", BATON_RECOVERY_INTERVAL_S="0") as d:
        port = d.metrics_port()
        router = d.children()
        assert len(router) == 1, router
        agents = Agents(d, short_tmp / "agents.log")
        try:
            agents.start("w", wip=2)
            agents.start("w", wip=2)
            with Client(d.socket_path) as c:
                wait_for(lambda: len(c.agents()) == 2, timeout=30, what="two agents")
                # two tasks held by the agents when the router dies, the rest queued behind them
                c.enqueue([{"id": f"held{i}", "summary": "s", "agent_type": "w", "input": {"block": str(gate)}}
                           for i in range(2)])
                wait_for(lambda: sum(1 for e in agents.entries() if e[0] == "start") == 2, timeout=30,
                         what="both held tasks started")
                c.enqueue([{"id": f"t{i}", "summary": "s", "agent_type": "w"} for i in range(40)])
            os.kill(router[0], signal.SIGKILL)
            wait_for(lambda: "switching from INTELLIGENT to PYTHON_ONLY" in d.log, timeout=20, what="the switch")
            gate.touch()  # the held tasks finish now, their agents reconnected or reconnecting
            with Client(d.socket_path) as c:
                more = [{"id": f"after{i}", "summary": "s", "agent_type": "w"} for i in range(20)]
                c.enqueue(more)
                ids = [f"held{i}" for i in range(2)] + [f"t{i}" for i in range(40)] + [m["id"] for m in more]
                res = c.wait(ids, timeout=90)
                assert not res.timed_out, res
                assert set(res.statuses.values()) == {"completed"}, res.statuses
                assert all(c.get(f"held{i}").attempts == 1 for i in range(2))  # finished, not re-run
                mode = c.mode()  # what `baton mode` shows
                assert mode["mode"] == "PYTHON_ONLY" and mode["router"] == "python"
                assert mode["reason"].startswith("router_disconnected: "), mode
                assert [h["mode"] for h in mode["history"]] == ["INTELLIGENT", "PYTHON_ONLY"]
                assert mode["switches"] == {"router_disconnected": 1}
        finally:
            agents.stop()
        ends = Counter(tid for what, tid, _, _ in agents.entries() if what == "end")
        assert ends["held0"] == ends["held1"] == 1, ends
        assert all(ends[t] >= 1 for t in ids), "every task ran"
        twice = [t for t, n in ends.items() if n > 1]
        # Only a task the dying router had handed out without the coordinator hearing of it can run again
        # (it is released as never dispatched); it is then completed once, under the newer token.
        assert len(twice) <= 4, twice
        assert d.proc.poll() is None, "the daemon kept running"
        assert metric(port, "baton_mode", mode="PYTHON_ONLY") == 1
        assert metric(port, "baton_mode_switches_total", reason="router_disconnected") == 1
        assert metric(port, "baton_router_up") == 1


def test_mode_set_switches_router_both_ways_and_work_continues(short_tmp: Path) -> None:
    """`baton mode set`: INTELLIGENT -> PYTHON_ONLY -> INTELLIGENT on a working daemon; agents follow by
    reconnecting, every task runs once, unknown and unavailable modes are refused with a message."""
    with running_daemon(short_tmp, "native") as d:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "baton.cli", "mode", *args], env=d.env, capture_output=True,
                                  text=True, timeout=60)

        def mode_is(want: str) -> bool:
            try:
                with Client(d.socket_path) as c:
                    return bool(c.mode()["mode"] == want)
            except (ClientError, OSError):
                return False  # the switch closed the connection, or the new router is not accepting yet

        def run(batch: str, n: int = 10) -> None:
            ids = [f"{batch}{i}" for i in range(n)]

            def done() -> bool:
                try:
                    with Client(d.socket_path) as c:
                        if batch not in enqueued:
                            c.enqueue([{"id": t, "summary": "s", "agent_type": "w"} for t in ids])
                            enqueued.add(batch)
                        res = c.wait(ids, timeout=30)
                        return not res.timed_out and set(res.statuses.values()) == {"completed"}
                except (ClientError, OSError):
                    return False

            wait_for(done, timeout=60, what=f"batch {batch} completed")

        enqueued: set[str] = set()
        agents = Agents(d, short_tmp / "agents.log")
        try:
            agents.start("w")
            agents.start("w")
            run("a")
            proc = cli("set", "PYTHON_ONLY")
            assert proc.returncode == 0 and "switching from INTELLIGENT to PYTHON_ONLY" in proc.stdout, proc
            wait_for(lambda: mode_is("PYTHON_ONLY"), timeout=30, what="PYTHON_ONLY")
            wait_for(lambda: not d.children(), timeout=30, what="the native router child gone")
            run("b")
            assert cli("set", "PYTHON_ONLY").stdout.startswith("already PYTHON_ONLY")
            assert cli("set", "INTELLIGENT").returncode == 0
            wait_for(lambda: mode_is("INTELLIGENT"), timeout=30, what="INTELLIGENT again")
            assert len(d.children()) == 1  # a native router child again
            run("c")
            router = d.children()
            proc = cli("set", "REDUNDANT")  # between native modes: the router and the connections stay
            assert proc.returncode == 0 and "reconnect" not in proc.stdout, proc
            wait_for(lambda: mode_is("REDUNDANT"), timeout=30, what="REDUNDANT")
            assert d.children() == router
            run("d")
            assert "diverged" not in d.log  # switched into REDUNDANT live: the shadow agrees with the router
            bad = cli("set", "FAST")
            assert bad.returncode == 1 and "unknown mode 'FAST'" in bad.stderr, bad
            with Client(d.socket_path) as c:
                m = c.mode()
            assert [h["mode"] for h in m["history"]] == ["INTELLIGENT", "PYTHON_ONLY", "INTELLIGENT", "REDUNDANT"]
            assert m["switches"] == {"forced": 3} and m["reason"] == "forced: baton mode set"
            assert [h.get("pause_ms") is not None for h in m["history"]] == [False, True, True, False]
        finally:
            agents.stop()
        ends = Counter(tid for what, tid, _, _ in agents.entries() if what == "end")
        assert sorted(ends) == sorted(f"{b}{i}" for b in "abcd" for i in range(10)) and set(ends.values()) == {1}


# --- triggers, fault injection and recovery (docs/modes.md) ----------------------------------------------------

# Probes every 0.1 s, recovery tried 1 s after a degradation, its steps 0.3 s apart; faults begin 1.5 s after
# the router started (the test connects its subscriber first).
FAST_HEALTH = {"BATON_PROBE_INTERVAL_S": "0.1", "BATON_RECOVERY_INTERVAL_S": "1", "BATON_RECOVERY_STEP_S": "0.3",
               "BATON_FAULT_AFTER_S": "1.5"}


def mode_report(d: Daemon) -> dict[str, Any] | None:
    try:
        with Client(d.socket_path, timeout=5) as c:
            return c.mode()
    except (ClientError, OSError):
        return None  # a switch closed the connection, or the new router is not accepting yet


def reasons(d: Daemon) -> list[tuple[str, str]]:
    m = mode_report(d)
    return [] if m is None else [(h["mode"], h["reason"]) for h in m["history"]]


def run_through(d: Daemon, prefix: str, n: int, until: Callable[[], bool], sleep: float = 0.02) -> list[str]:
    """Enqueue tasks in batches of 10 (each takes ``sleep`` s on an agent) until ``until()`` holds and at least
    ``n`` were enqueued, then wait for all of them: work in flight through whatever the daemon does."""
    ids: list[str] = []
    deadline = time.monotonic() + 60
    while len(ids) < n or not until():
        assert time.monotonic() < deadline, f"timed out: {reasons(d)}"
        batch = [f"{prefix}{len(ids) + i}" for i in range(10)]
        try:
            with Client(d.socket_path, timeout=10) as c:
                c.enqueue([{"id": t, "summary": "s", "agent_type": "w", "input": {"sleep": sleep}} for t in batch])
            ids += batch
        except (ClientError, OSError):
            pass  # a switch closed the connection: the next batch goes to the new router
        time.sleep(0.05)  # pacing the load, not waiting for a state: the loop's condition is polled
    def all_done() -> bool:
        try:
            with Client(d.socket_path, timeout=10) as c:
                res = c.wait(ids, timeout=5)
                return not res.timed_out and set(res.statuses.values()) == {"completed"}
        except (ClientError, OSError):
            return False
    wait_for(all_done, timeout=90, what=f"every {prefix} task completed")
    return ids


def all_completed(d: Daemon, ids: list[str]) -> None:
    """Nothing lost: every task ended completed.  (A second completion the store refuses by its state machine;
    bench/bench_faults.py counts the running->completed transitions to show none happened.)"""
    with Client(d.socket_path) as c:
        for t in ids:
            task = c.get(t)
            assert task.status == "completed", task


@pytest.mark.parametrize("fault, trigger", [
    ({"BATON_FAULT_SLOW_MS": "700"}, "probe_latency"),
    ({"BATON_FAULT_FAIL_RATE": "0.3"}, "error_rate"),
    ({"BATON_FAULT_KILL_ROUTER_S": "1.5"}, "router_disconnected"),
])
def test_each_trigger_degrades_then_recovery_brings_native_back(short_tmp: Path, fault: dict[str, str],
                                                                trigger: str) -> None:
    with running_daemon(short_tmp, "native", **FAST_HEALTH, **fault) as d:
        port = d.metrics_port()
        first_router = d.children()
        agents = Agents(d, short_tmp / "agents.log")
        try:
            with Client(d.socket_path) as sub:
                sub.subscribe("baton.system")
                agents.start("w", wip=2)
                agents.start("w", wip=2)

                def recovered() -> bool:
                    r = reasons(d)
                    return any(m == "PYTHON_ONLY" for m, _ in r) and r[-1][1].startswith("recovery: WIP limits at 100%")

                ids = run_through(d, "t", 60, recovered)
                # subscribed before the trigger: told on the system topic before its connection was closed
                # (the router's death gives no chance to: then only the WELCOME of the reconnect says it)
                if trigger != "router_disconnected":
                    msg = sub.receive(timeout=10)
                    assert msg is not None and msg.topic == "baton.system", msg
                    assert msg.payload["mode"] == "PYTHON_ONLY" and msg.payload["reason"] == trigger, msg.payload
                    assert msg.payload["state"] == "switching"
        finally:
            agents.stop()
        m = mode_report(d)
        assert m is not None and m["mode"] == "INTELLIGENT" and not m["degraded"] and m["wip_factor"] == 1.0, m
        hist = [(h["mode"], h["reason"].split(":")[0]) for h in m["history"]]
        degrade_at = hist.index(("PYTHON_ONLY", trigger))
        assert hist[:degrade_at] == [("INTELLIGENT", "configured")], hist
        back = hist.index(("INTELLIGENT", "recovery"), degrade_at)
        assert hist[back - 1] == ("PYTHON_ONLY", "recovery")  # the self-test step
        assert [r for _, r in hist[back + 1:]][-2:] == ["recovery", "recovery"]  # the WIP steps
        assert m["switches"][trigger] == 1 and m["switches"]["recovery"] == 1, m["switches"]
        assert d.children() and d.children() != first_router  # a new native router serves
        all_completed(d, ids)
        assert "native router (pid" in d.log and "Traceback" not in d.log
        assert metric(port, "baton_mode_switches_total", reason=trigger) == 1
        assert metric(port, "baton_mode", mode="INTELLIGENT") == 1


def test_agent_failures_trigger_and_degraded_parallelism(short_tmp: Path) -> None:
    """More than degrade_agent_failures agents lost holding work in the window -> PYTHON_ONLY, with every WIP
    limit at degraded_wip_factor (4 -> 2) until the daemon recovers (here: never, recovery is off)."""
    gate = short_tmp / "gate"
    env = {**FAST_HEALTH, "BATON_DEGRADE_AGENT_FAILURES": "2", "BATON_RECOVERY_INTERVAL_S": "0",
           "BATON_WIP_PER_AGENT_TYPE": "4"}
    with running_daemon(short_tmp, "native", **env) as d:
        port = d.metrics_port()
        agents = Agents(d, short_tmp / "agents.log")
        try:
            with Client(d.socket_path) as c:
                c.enqueue([{"id": f"b{i}", "summary": "s", "agent_type": "w", "input": {"block": str(gate)}}
                           for i in range(3)])
                for i in range(3):  # three agents in turn die holding a task
                    p = agents.start("w")
                    wait_for(lambda: sum(1 for e in agents.entries() if e[0] == "start") > i, timeout=30,
                             what=f"agent {i} started a task")
                    p.kill()
                    p.wait()
            wait_for(lambda: ("PYTHON_ONLY", "agent_failures") in [(m, r.split(":")[0]) for m, r in reasons(d)],
                     timeout=30, what="the agent_failures trigger")
            assert metric(port, "baton_wip_limit", agent_type="w") == 2
            m = mode_report(d)
            assert m is not None and m["degraded"] and m["wip_factor"] == 0.5, m
            assert "3 agent connections lost" in m["reason"], m["reason"]
            gate.touch()
            agents.start("w", wip=4)
            ids = run_through(d, "t", 20, lambda: True)
            all_completed(d, ids + [f"b{i}" for i in range(3)])
        finally:
            agents.stop()


def test_redundant_agrees_with_native_and_wins_when_it_diverges(short_tmp: Path) -> None:
    """REDUNDANT: on a healthy native router the Python decision never differs; with TASK frames swapped on
    their way to the router (fault_misroute_rate) every divergence is counted, the Python decision wins (the
    dispatch is fenced and pushed again) and every task still completes once."""
    for rate, expect in (("0", 0), ("0.5", None)):
        tmp = short_tmp / f"r{rate}"
        tmp.mkdir()
        with running_daemon(tmp, "native", BATON_MODE="REDUNDANT", BATON_FAULT_MISROUTE_RATE=rate,
                            BATON_WIP_PER_AGENT_TYPE="8", BATON_RECOVERY_INTERVAL_S="0") as d:
            port = d.metrics_port()
            agents = Agents(d, tmp / "agents.log")
            try:
                agents.start("w", wip=1)
                agents.start("w", wip=1)
                ids = run_through(d, "t", 200, lambda: True, sleep=0)
                all_completed(d, ids)
            finally:
                agents.stop()
            n = metric(port, "baton_redundant_divergences_total")
            assert n is not None
            if expect is not None:
                assert n == expect
            else:
                assert n > 0 and "the Python decision wins" in d.log
            m = mode_report(d)
            assert m is not None and m["mode"] == "REDUNDANT", m


def test_speed_critical_router_releases_chains_and_the_coordinator_records_them(short_tmp: Path) -> None:
    """SPEED_CRITICAL: the router hands each link of a chain to an agent as soon as the previous one reports
    success; every task runs once, never before its prerequisite ended, and is recorded completed.  A failed
    parent releases nothing: its dependent never starts."""
    with running_daemon(short_tmp, "native", BATON_MODE="SPEED_CRITICAL", BATON_WIP_PER_AGENT_TYPE="4",
                        BATON_RECOVERY_INTERVAL_S="0") as d:
        agents = Agents(d, short_tmp / "agents.log")
        try:
            agents.start("w", wip=2)
            agents.start("w", wip=2)
            tasks: list[dict[str, Any]] = []
            for chain in range(6):
                for link in range(15):
                    tasks.append({"id": f"c{chain}-{link}", "summary": "s", "agent_type": "w",
                                  "prerequisites": [f"c{chain}-{link - 1}"] if link else []})
            tasks.append({"id": "bad", "summary": "s", "agent_type": "w", "input": {"fail": True},
                          "max_attempts": 1})
            tasks.append({"id": "after-bad", "summary": "s", "agent_type": "w", "prerequisites": ["bad"]})
            with Client(d.socket_path) as c:
                c.enqueue(tasks)
                chain_ids = [t["id"] for t in tasks if t["id"].startswith("c")]
                res = c.wait(chain_ids + ["bad"], timeout=60)
                assert not res.timed_out, res
                assert set(res.statuses[t] for t in chain_ids) == {"completed"}, res.statuses
                assert res.statuses["bad"] == "dead_lettered"
                assert all(c.get(t).attempts == 1 for t in chain_ids)
                assert c.get("after-bad").status != "completed"
                stats = c.stats()["daemon"]
                assert c.mode()["mode"] == "SPEED_CRITICAL"
        finally:
            agents.stop()
        # the router released most links itself (the first of each chain, and any whose CTL_CONTINUE came after
        # its parent finished, went the ordinary way)
        assert stats["continuations_released"] >= 6 * 14 // 2, stats
        entries = agents.entries()
        started = {tid: ns for what, tid, ns, _ in entries if what == "start"}
        ended = {tid: ns for what, tid, ns, _ in entries if what == "end"}
        assert Counter(tid for what, tid, _, _ in entries if what == "start" and tid.startswith("c")) == \
            Counter(chain_ids) and "after-bad" not in started
        for t in tasks:
            for p in t.get("prerequisites", []):
                if t["id"] in started:
                    assert ended[p] <= started[t["id"]], (p, t["id"])
