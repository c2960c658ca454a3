"""The README's main-job command, run as a user would: `baton selftest` in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from baton import __version__
from conftest import child_env
from daemon_harness import in_process


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton.cli", *args], env=child_env(), capture_output=True, text=True, timeout=120
    )


def test_selftest_json_reports_every_check_ok() -> None:
    proc = run_cli("selftest", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    names = [c["name"] for c in report["checks"]]
    assert names == ["native library", "frame codec C == Python", "socket I/O engine", "ring round trip + fd passing"]
    assert report["ok"] and all(c["ok"] for c in report["checks"]), report


def test_selftest_prints_a_table_for_people() -> None:
    proc = run_cli("selftest")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, rule, *rows = proc.stdout.splitlines()
    assert header.split() == ["check", "result", "detail"] and set(rule) <= {"-", " "}
    assert len(rows) == 4 and all(" ok " in row for row in rows)
    assert "selftest: ring round trip + fd passing ..." in proc.stderr  # progress goes to stderr


def test_version_and_no_command() -> None:
    assert run_cli("--version").stdout.strip() == f"baton {__version__}"
    proc = run_cli()
    assert proc.returncode == 2 and "selftest" in proc.stdout


# --- commands over the client ------------------------------------------------------------------------------------

CLIENT_COMMANDS = [
    ["enqueue", "--type", "t", "--summary", "s"], ["get", "x"], ["list"], ["status"], ["cancel", "x"], ["plan"],
    ["import", "/dev/null"], ["wait", "x"], ["pulse"], ["agents"], ["stats"], ["list", "--json"],
    ["worker", "--type", "t", "--", "true"],
]


def run_cli_env(*args: str, socket: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = child_env()
    env["BATON_SOCKET"] = socket
    return subprocess.run([sys.executable, "-m", "baton.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_no_daemon_one_line_and_exit_2(argv: list[str], sock_path: str) -> None:
    proc = run_cli_env(*argv, socket=sock_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no baton daemon is running at " + sock_path in lines[0] and "baton serve" in lines[0]


def test_socket_flag_overrides_environment(sock_path: str) -> None:
    proc = run_cli_env("list", "--socket", sock_path + ".other", socket=sock_path)
    assert proc.returncode == 2 and sock_path + ".other" in proc.stderr


def test_worker_needs_a_command(sock_path: str) -> None:
    proc = run_cli_env("worker", "--type", "t", socket=sock_path)
    assert proc.returncode == 2 and "-- CMD ARGS" in proc.stderr


def test_serve_offers_every_daemon_flag() -> None:
    from baton.daemon_config import FLAG_NAMES

    out = run_cli("serve", "--help").stdout
    assert "--config" in out
    for flag in FLAG_NAMES.values():
        assert flag in out


def test_serve_passes_flags_to_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from baton import cli

    seen: dict[str, object] = {}

    def serve(config_path: object, overrides: dict[str, object]) -> int:
        seen.update(config=config_path, overrides=overrides)
        return 0

    monkeypatch.setitem(sys.modules, "baton.daemon", types.SimpleNamespace(serve=serve))
    import baton

    monkeypatch.setattr(baton, "daemon", sys.modules["baton.daemon"], raising=False)
    assert cli.main(["serve", "--socket", "/tmp/x.sock", "--metrics-port", "9100", "--config", "c.toml"]) == 0
    overrides = seen["overrides"]
    assert isinstance(overrides, dict)
    assert seen["config"] == Path("c.toml")
    assert overrides["socket_path"] == "/tmp/x.sock" and overrides["metrics_port"] == "9100"
    assert overrides["state_dir"] is None  # not given: the daemon's other sources decide


def test_bench_handoff_is_registered() -> None:
    proc = run_cli("bench", "handoff", "--help")
    assert proc.returncode == 0 and "baton bench handoff" in proc.stdout


def test_json_outputs_parse_against_a_real_coordinator(short_tmp: Path) -> None:
    with in_process(short_tmp) as h:
        sock = str(h.socket_path)

        def j(*argv: str) -> object:
            proc = run_cli_env(*argv, "--json", socket=sock)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        enq = j("enqueue", "--type", "t", "--summary", "first", "--id", "c1", "--input", '{"k": [1, 2]}')
        assert enq == [{"id": "c1", "status": "ready", "created": True}]
        j("enqueue", "--type", "t", "--summary", "second", "--id", "c2", "--after", "c1")
        task = j("get", "c1")
        assert isinstance(task, dict) and task["input"] == {"k": [1, 2]} and task["status"] == "ready"
        listed = j("list")
        assert isinstance(listed, list) and {t["id"] for t in listed} == {"c1", "c2"}
        status = j("status")
        assert isinstance(status, dict) and status["total"] == 2
        plan = j("plan")
        assert isinstance(plan, dict) and plan["batches"] == [["c1"], ["c2"]]
        assert isinstance(j("pulse"), dict) and j("agents") == []
        assert isinstance(j("stats"), dict)
        dry = j("cancel", "c1", "--dry-run")
        assert isinstance(dry, dict) and dry["dry_run"] and dry["total_cancelled"] == 2
        done = j("cancel", "c1")
        assert isinstance(done, dict) and done["total_cancelled"] == 2
        waited = run_cli_env("wait", "c1", "c2", "--json", socket=sock)
        assert waited.returncode == 0 and json.loads(waited.stdout)["statuses"] == {"c1": "cancelled",
                                                                                   "c2": "cancelled"}
        assert "waiting: 2/2 task(s) finished" in waited.stderr  # progress on stderr
        # Tables for people: a header row and a rule.
        table = run_cli_env("list", socket=sock)
        header, rule, *rows = table.stdout.splitlines()
        assert header.split()[:2] == ["id", "status"] and set(rule) <= {"-", " "} and len(rows) == 2
        missing = run_cli_env("get", "nope", socket=sock)
        assert missing.returncode == 1 and "not_found" in missing.stderr
