"""scripts/check-monitoring: monitoring/ passes it (promtool config, rules and rule tests; every metric the rules
and the dashboard query is one baton exports), and a rule or a panel querying an unknown metric fails it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CHECK = REPO / "scripts" / "check-monitoring"


def require_promtool() -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run scripts/install-deps (Debian package prometheus); "
                    "CI installs it, so this test does not skip")


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    require_promtool()
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def copy_monitoring(tmp_path: Path) -> Path:
    dst = tmp_path / "monitoring"
    shutil.copytree(REPO / "monitoring", dst)
    return dst


def failing_check(mon: Path) -> subprocess.CompletedProcess[str]:
    """Run the check on an edited copy of monitoring/, which must fail it."""
    r = run_check("--dir", str(mon))
    assert r.returncode == 1, f"expected the check to fail:\n{r.stdout}\n{r.stderr}"
    return r


def set_panel_query(mon: Path, title: str, expr: str) -> None:
    """Give the dashboard panel with that title another first query."""
    path = mon / "grafana" / "baton.json"
    dash = json.loads(path.read_text())
    panel = next(p for p in dash["panels"] if p["title"] == title)
    panel["targets"][0]["expr"] = expr
    path.write_text(json.dumps(dash))


def test_monitoring_directory_passes_the_check() -> None:
    r = run_check()
    assert r.returncode == 0, f"scripts/check-monitoring failed:\n{r.stdout}\n{r.stderr}"
    assert "SUCCESS" in r.stdout and "check-monitoring: OK" in r.stdout


def test_rule_with_an_unknown_metric_fails_naming_it_and_the_file(tmp_path: Path) -> None:
    mon = copy_monitoring(tmp_path)
    rules = mon / "alerts.yml"
    # valid PromQL (promtool accepts it): only the metric check can catch it
    rules.write_text(rules.read_text() + "\n      - alert: Misspelt\n"
                     "        expr: rate(baton_tasks_complete_total[5m]) == 0\n        for: 1m\n")
    r = failing_check(mon)
    assert "unknown metric 'baton_tasks_complete_total'" in r.stderr
    assert "monitoring/alerts.yml: rule Misspelt" in r.stderr
    assert r.stdout.count("unknown metric") == 1, "only the bad name is reported"


def test_counter_without_total_suffix_is_unknown(tmp_path: Path) -> None:
    mon = copy_monitoring(tmp_path)
    rules = mon / "alerts.yml"
    rules.write_text(rules.read_text().replace("increase(baton_tasks_dead_lettered_total[10m])",
                                               "increase(baton_tasks_dead_lettered[10m])"))
    r = failing_check(mon)
    assert "unknown metric 'baton_tasks_dead_lettered' (baton exports baton_tasks_dead_lettered_total)" in r.stderr


def test_dashboard_panel_with_an_unknown_metric_fails_naming_it_and_the_file(tmp_path: Path) -> None:
    mon = copy_monitoring(tmp_path)
    set_panel_query(mon, "Tasks by state", 'sum by (state) (baton_task_states{state!="x"})')
    r = failing_check(mon)
    assert "monitoring/grafana/baton.json: panel 'Tasks by state': unknown metric 'baton_task_states'" in r.stderr


def test_dashboard_query_that_is_not_promql_fails(tmp_path: Path) -> None:
    mon = copy_monitoring(tmp_path)
    set_panel_query(mon, "Throughput", "sum(rate(baton_tasks_submitted_total[$__rate_interval])")
    r = failing_check(mon)
    assert "a dashboard query is not valid PromQL" in r.stderr
    assert "panel 'Throughput'" in r.stdout


def test_failing_alert_unit_test_fails_the_check(tmp_path: Path) -> None:
    mon = copy_monitoring(tmp_path)
    rules = mon / "alerts.yml"
    text = rules.read_text()
    assert ") > 5\n" in text
    rules.write_text(text.replace(") > 5\n", ") > 50\n"))  # the queue-wait alert no longer fires in its test
    r = failing_check(mon)
    assert "promtool test rules alerts_test.yml exited with 1" in r.stderr
    assert "BatonQueueWaitHigh" in r.stdout
