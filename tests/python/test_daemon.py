"""``python -m baton.daemon`` as a real subprocess: readiness, the instance lock, drain, reload, crash safety."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.protocol import MsgType
from daemon_harness import CallFailed, Daemon, RawClient, daemon_env, wait_until

ROUTERS = ["python"]
if importlib.util.find_spec("baton.router.native") is not None and os.environ.get("BATON_TEST_NATIVE", "1") != "0":
    ROUTERS.append("native")


@pytest.fixture(params=ROUTERS)
def env(request: pytest.FixtureRequest, short_tmp: Path) -> dict[str, str]:
    e = daemon_env(short_tmp)
    e["BATON_ROUTER"] = str(request.param)
    return e


@pytest.fixture
def daemons(short_tmp: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(daemons: list[Daemon], tmp: Path, env: dict[str, str], *args: str, ready: bool = True) -> Daemon:
    d = Daemon(tmp, env, list(args))
    daemons.append(d)
    if ready:
        d.wait_ready()
    return d


def notify_socket(tmp: Path, abstract: bool = False) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"baton-test-{uuid.uuid4().hex}"
        s.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp / "notify")
        s.bind(addr)
    s.settimeout(20)
    return s, addr


def notifications(s: socket.socket, until: str) -> list[str]:
    seen: list[str] = []
    while until not in seen:
        seen.extend(s.recv(4096).decode().split("\n"))
    return seen


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_and_stopping_notifications(env: dict[str, str], short_tmp: Path, daemons: list[Daemon],
                                          abstract: bool) -> None:
    s, addr = notify_socket(short_tmp, abstract)
    with s:
        env["NOTIFY_SOCKET"] = addr
        d = start(daemons, short_tmp, env, ready=False)
        msgs = notifications(s, "READY=1")
        assert f"MAINPID={d.proc.pid}" in msgs
        # ready means the socket accepts: no retry needed
        with RawClient(d.socket_path) as c:
            assert c.hello()["server"].startswith("baton")
        assert os.stat(d.socket_path).st_mode & 0o777 == 0o600
        d.signal(signal.SIGTERM)
        notifications(s, "STOPPING=1")
        assert d.wait() == 0, d.log
    assert not d.socket_path.exists()


def test_second_daemon_is_refused(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    first = start(daemons, short_tmp, env)
    second = start(daemons, short_tmp, env, ready=False)
    assert second.wait(20) == 1
    out = second.log
    assert "already" in out and str(first.proc.pid) in out, out
    with first.client() as c:  # the first one is untouched
        c.hello()
        assert c.call("queue_status")["total"] == 0


def test_second_daemon_on_the_same_state_is_refused(env: dict[str, str], short_tmp: Path,
                                                    daemons: list[Daemon]) -> None:
    """Another socket but the same state directory: the task store is the first daemon's alone (it holds
    SQLite's lock for good), so the second exits 1 at once, saying why, and the first keeps working."""
    first = start(daemons, short_tmp, env)
    with first.client() as c:
        c.hello()
        c.call("enqueue", tasks=[{"id": "kept", "summary": "s", "agent_type": "t"}])
    other = dict(env, BATON_SOCKET=str(short_tmp / "run" / "baton" / "other.sock"))
    second = start(daemons, short_tmp, other, ready=False)
    assert second.wait(20) == 1
    assert "in use by another process" in second.log and "state" in second.log, second.log
    with first.client() as c:
        c.hello()
        assert c.call("get", id="kept")["status"] == "ready"


def test_mode_says_which_router_serves_and_why(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    import json
    import subprocess
    import sys

    d = start(daemons, short_tmp, env)
    router = env["BATON_ROUTER"]
    mode = "INTELLIGENT" if router == "native" else "PYTHON_ONLY"

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "baton.cli", "mode", *args], env=d.env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    report = json.loads(cli("--json"))
    assert (report["mode"], report["router"], report["reason"]) == (mode, router, f"configured: {mode} (router {router})")
    assert len(report["history"]) == 1 and report["switches"] == {}
    table = cli()
    assert table.startswith(f"mode {mode} (router {router}) since ") and "configured: " in table, table


def test_config_error_exits_2_with_a_message(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    env["BATON_METRICS_PORT"] = "abc"
    d = start(daemons, short_tmp, env, ready=False)
    assert d.wait(20) == 2
    assert "BATON_METRICS_PORT" in d.log and "whole number" in d.log
    d2 = start(daemons, short_tmp, dict(env, BATON_METRICS_PORT="9002"), "--config", str(short_tmp / "nope.toml"),
               ready=False)
    assert d2.wait(20) == 2
    assert "does not exist" in d2.log


def test_sigterm_drains_a_running_task(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    d = start(daemons, short_tmp, env)
    c = d.client()
    c.hello()
    agent = d.client()
    agent.hello("a", agent_type="w", wip=1)
    c.call("enqueue", tasks=[{"id": "run", "summary": "r", "agent_type": "w"},
                             {"id": "wait", "summary": "w", "agent_type": "w"}])
    f, t = agent.next_task()
    d.signal(signal.SIGTERM)
    # no new work while draining...
    def refused() -> bool:
        try:
            c.call("enqueue", tasks=[{"summary": "late", "agent_type": "w"}])
        except CallFailed as e:
            assert e.code == "draining"
            return True
        return False

    wait_until(refused, 10, 0.05, "enqueue to be refused")
    # ... but the running task may finish, and the daemon then exits 0
    assert agent.result(f, t, result="done") == {"accepted": True, "reason": None}
    agent.recv_none(lambda fr: fr.type == MsgType.TASK, 0.2)  # paused: the queued task is not dispatched
    assert d.wait(30) == 0, d.log
    c.close()
    agent.close()
    d2 = start(daemons, short_tmp, env)
    with d2.client() as c2:
        c2.hello()
        assert c2.call("get", id="run")["status"] == "completed"
        w = c2.call("get", id="wait")
        assert w["status"] == "ready" and w["attempts"] == 0


def test_drain_timeout_gives_tasks_back(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    env["BATON_DRAIN_TIMEOUT_S"] = "0.5"
    d = start(daemons, short_tmp, env)
    with d.client() as c, d.client() as agent:
        c.hello()
        agent.hello("a", agent_type="w", wip=1)
        c.call("enqueue", tasks=[{"id": "slow", "summary": "s", "agent_type": "w"}])
        agent.next_task()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log
    d2 = start(daemons, short_tmp, env)
    with d2.client() as c2:
        c2.hello()
        t = c2.call("get", id="slow")
        assert t["status"] == "ready" and t["attempts"] == 0


def test_sighup_reloads_live_settings(env: dict[str, str], short_tmp: Path, daemons: list[Daemon]) -> None:
    conf = short_tmp / "baton.toml"
    conf.write_text("wip_per_agent_type = 1\n")
    d = start(daemons, short_tmp, env, "--config", str(conf))
    with d.client() as c, d.client() as agent:
        c.hello()
        agent.hello("a", agent_type="w", wip=3)
        c.call("enqueue", tasks=[{"summary": str(i), "agent_type": "w"} for i in range(5)])
        agent.next_task()
        agent.recv_none(lambda f: f.type == MsgType.TASK, 0.3)  # the type's limit, not the agent's wip 3
        assert c.call("agents")[0]["wip"] == 3
        conf.write_text('wip_per_agent_type = 3\nmetrics_host = "127.0.0.2"\n')  # (the env sets metrics_port)
        d.signal(signal.SIGHUP)
        agent.next_task()
        agent.next_task()
        wait_until(lambda: c.call("agents")[0]["held"] == 3, 10, what="three tasks held")
        wait_until(lambda: "metrics_host changed but only take effect after a restart" in d.log, 10,
                   what="the needs-restart log line")
        # an invalid file is refused and the running configuration kept
        conf.write_text("wip_per_agent_type = 0\n")
        d.signal(signal.SIGHUP)
        wait_until(lambda: "keeping the running one" in d.log, 10, what="the invalid-reload log line")
        assert c.call("agents")[0]["held"] == 3


def test_sigkill_then_restart_loses_no_accepted_task(env: dict[str, str], short_tmp: Path,
                                                    daemons: list[Daemon]) -> None:
    env["BATON_LEASE_S"] = "1"
    d = start(daemons, short_tmp, env)
    c = d.client()
    c.hello()
    agent = d.client()
    agent.hello("a", agent_type="w", wip=2)
    ids = [r["id"] for r in c.call("enqueue", tasks=[{"summary": str(i), "agent_type": "w"} for i in range(40)])]
    done = set()
    for _ in range(10):
        f, t = agent.next_task()
        agent.result(f, t, result=t["id"])
        done.add(t["id"])
    held = agent.next_task()  # running when the daemon dies
    d.kill()
    c.close()
    agent.close()
    d2 = start(daemons, short_tmp, env)
    with d2.client() as c2, d2.client() as agent2:
        c2.hello()
        tasks = {t["id"]: t for t in c2.call("list", limit=1000)}
        assert set(tasks) == set(ids)
        assert all(tasks[i]["status"] == "completed" and tasks[i]["result"] == i for i in done)
        agent2.hello("b", agent_type="w", wip=2)
        # the task that was running comes back when its lease ends; everything completes exactly once
        seen: list[str] = []
        while len(seen) < 30:
            f, t = agent2.next_task(timeout=20)
            ack = agent2.result(f, t)
            assert ack is not None and ack["accepted"], ack
            seen.append(t["id"])
        assert len(set(seen)) == 30 and held[1]["id"] in seen
        assert c2.call("queue_status")["by_status"]["completed"] == 40


@pytest.mark.skipif("native" not in ROUTERS, reason="libbaton is not built")
def test_router_child_started_early_serves_or_is_dismissed(short_tmp: Path, daemons: list[Daemon]) -> None:
    """main() starts the native router's child before it reads the configuration; the router setting from the
    file is only known later: native hands the child its descriptors, python dismisses it."""
    env = daemon_env(short_tmp)  # no BATON_ROUTER: the default (native) until the file says otherwise
    conf = short_tmp / "config" / "baton" / "baton.toml"
    conf.parent.mkdir(parents=True)
    for router, n_children in (("native", 1), ("python", 0)):
        conf.write_text(f'router = "{router}"\n')
        d = start(daemons, short_tmp, env)
        assert len(d.children()) == n_children, router
        with d.client() as c:
            assert c.hello()["server"].startswith("baton")
            assert c.call("queue_status")["total"] == 0
        assert f"router {router}" in d.log
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.log
        assert "unavailable" not in d.log, d.log
