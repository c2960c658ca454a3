"""The README's main-job command, run as a user would: `baton selftest` in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

from baton import __version__
from conftest import child_env


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
