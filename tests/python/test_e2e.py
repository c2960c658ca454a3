"""End to end: `python -m baton.daemon` with each router, agent processes (baton.Agent) and a client.

Everything is real: the daemon process (and the native router's child process), unix sockets, SQLite, agent
processes that are SIGKILLed.  Orders are checked from the agents' own logs (tests/python/e2e_agent.py),
whose timestamps share CLOCK_MONOTONIC with each other.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import wait_for
from daemon_harness import Agents, Daemon, running_daemon
from router_harness import read_as_nobody

from baton import Client, wire
from baton.protocol import ErrorCode, MsgType

@pytest.fixture(params=["native", "python"])
def daemon(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Daemon]:
    with running_daemon(short_tmp, request.param) as d:
        yield d


def random_dag(n: int, seed: int) -> list[dict[str, Any]]:
    """n tasks; each depends on up to 3 random earlier ones (so the graph is acyclic); two agent types."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        pre = sorted({f"t{rng.randrange(i)}" for _ in range(rng.randint(0, 3))}) if i else []
        specs.append({"id": f"t{i}", "summary": f"task {i}", "agent_type": ("build", "test")[i % 2],
                      "prerequisites": pre, "input": {"i": i}})
    return specs


def test_thousand_task_dag_completes_in_a_valid_order(daemon: Daemon, short_tmp: Path) -> None:
    specs = random_dag(1000, seed=4)
    agents = Agents(daemon, short_tmp / "agents.log")
    try:
        for agent_type in ("build", "build", "test", "test"):
            agents.start(agent_type, wip=2)
        with Client(daemon.socket_path) as c:
            wait_for(lambda: len(c.agents()) == 4, timeout=30, what="four agents")
            for i in range(0, len(specs), 250):
                c.enqueue(specs[i : i + 250])
            res = c.wait([s["id"] for s in specs], timeout=120)
            assert not res.timed_out
            assert set(res.statuses.values()) == {"completed"}
            assert c.get("t999").result["by"] in {p.pid for p in agents.procs}
    finally:
        agents.stop()
    entries = agents.entries()
    starts = {tid: ns for what, tid, ns, _ in entries if what == "start"}
    ends = {tid: ns for what, tid, ns, _ in entries if what == "end"}
    assert sorted(starts) == sorted(s["id"] for s in specs)
    assert len([e for e in entries if e[0] == "start"]) == len(specs), "a task ran more than once"
    for s in specs:
        for pre in s["prerequisites"]:
            assert ends[pre] <= starts[s["id"]], f"{s['id']} started before its prerequisite {pre} ended"
    assert len({pid for *_, pid in entries}) == 4, "every agent took part"


def test_agent_killed_mid_task_has_it_requeued_and_completed_once(daemon: Daemon, short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    agents = Agents(daemon, short_tmp / "agents.log")
    try:
        victim = agents.start("work")
        with Client(daemon.socket_path) as c:
            wait_for(lambda: len(c.agents()) == 1, timeout=30, what="the first agent")
            c.enqueue({"id": "held", "summary": "s", "agent_type": "work", "input": {"block": str(gate)}})
            wait_for(lambda: [e for e in agents.entries() if e[0] == "start"], timeout=30, what="the task to start")
            victim.kill()  # SIGKILL while it holds the task: no goodbye, the socket just closes
            victim.wait(10)
            wait_for(lambda: c.get("held").status == "ready", timeout=10, what="the task back in the ready queue")
            gate.touch()
            survivor = agents.start("work")
            res = c.wait(["held"], timeout=30)
            assert res.statuses == {"held": "completed"}
            task = c.get("held")
            assert task.result == {"by": survivor.pid}
            assert task.attempts == 2
            lost = task.attempt_history[0]
            assert lost.outcome == "lease_expired" and lost.error is not None
    finally:
        agents.stop()
    ends = [e for e in agents.entries() if e[0] == "end"]
    assert [(tid, pid) for _, tid, _, pid in ends] == [("held", survivor.pid)], "completed exactly once"


def test_connection_from_another_uid_is_refused(daemon: Daemon) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    # The socket's 0700 directory already keeps other users out; open it up so that the daemon's own peer
    # check is what refuses them.
    for d in (daemon.tmp, *daemon.socket_path.relative_to(daemon.tmp).parents):
        os.chmod(daemon.tmp / d, 0o755)
    os.chmod(daemon.socket_path, 0o666)
    data = read_as_nobody(str(daemon.socket_path))
    frames = wire.FrameStream().feed(data)
    assert frames, "the daemon closed the connection without saying why"
    hdr, payload = frames[0]
    assert hdr.flags & wire.F_ERROR and msgpack.unpackb(payload)["code"] == ErrorCode.REFUSED
    # ...and the daemon carries on serving its own user.
    with Client(daemon.socket_path) as c:
        assert c.pulse() is not None


def test_bad_input_never_costs_accepted_work(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as c:
        c.enqueue([{"id": f"keep{i}", "summary": "s", "agent_type": "x"} for i in range(3)])
        with daemon.client() as raw:
            raw.hello("garbage")
            raw.send_raw(b"\x00" * 64)  # not a frame: bad magic
            err = raw.recv(lambda f: f.is_error)
            assert err.body()["code"] == ErrorCode.BAD_FRAME
        with daemon.client() as raw:
            raw.hello("typo")
            raw.send(99, {"x": 1}, corr=raw.next_corr())
            assert raw.recv(lambda f: f.is_error).body()["code"] == ErrorCode.UNKNOWN_TYPE
            bad = {"op": "enqueue", "args": {"tasks": [{"summary": "s", "agent_type": "x", "base_priority": 99}]}}
            raw.send(MsgType.CALL, bad, corr=raw.next_corr())
            err = raw.recv(lambda f: f.is_error)
            assert err.body()["code"] == ErrorCode.INVALID_TASK and "base_priority" in err.body()["message"]
        assert sorted(t.id for t in c.list()) == ["keep0", "keep1", "keep2"]


def test_bench_handoff_measures_a_running_daemon(daemon: Daemon, short_tmp: Path) -> None:
    """`baton bench handoff` end to end, briefly: every measurement's JSON row has a histogram of real samples
    (the handoff run needs the whole chain completed, the throughput run every task)."""
    import json

    out = short_tmp / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "baton.cli", "bench", "handoff", "rt", "handoff", "throughput", "--seconds", "0.3",
         "--chain", "40", "--tasks", "300", "--socket", str(daemon.socket_path), "--out", str(out)],
        env=daemon.env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"].split(" (")[0]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"rt", "rt-pair", "rt-pair parked", "handoff", "throughput"}, rows.keys()
    for name, r in rows.items():
        assert 0 < r["p50"] <= r["p99"] <= r["p999"] <= r["max"], (name, r)
    assert rows["handoff"]["extra"]["tasks"] == 40
    assert rows["throughput"]["extra"]["tasks_per_s"] > 0
