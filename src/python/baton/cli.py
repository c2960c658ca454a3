"""The ``baton`` command line.  Tables for people, ``--json`` for machines; errors say what to do next.

Every command but ``serve``, ``selftest`` and ``bench`` talks to the daemon through baton.Client.  With no
daemon running they print one line (which socket, how to start a daemon) and exit 2; an error reply from the
daemon prints ``baton <command>: <code>: <message>`` and exits 1.  Long operations (``import --wait``,
``wait``) report progress on stderr, so stdout stays parseable.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from baton import __version__

if TYPE_CHECKING:
    from baton.client import Client

EXIT_NO_DAEMON = 2


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    """Print rows as a left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def jsonable(obj: Any) -> Any:
    """A value json.dumps accepts: models as their fields, bytes as base64 text, datetimes as ISO 8601."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        return jsonable(obj.model_dump(mode="python"))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        if hasattr(obj, "_asdict"):  # NamedTuple (EnqueueResult)
            return jsonable(obj._asdict())
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2))


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(text: object, width: int = 60) -> str:
    s = "" if text is None else str(text)
    s = s.replace("\n", " ")
    return s if len(s) <= width else s[: width - 1] + "…"


def _read_arg(path: str) -> str:
    """The text of a file argument ('-': stdin)."""
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _client(args: argparse.Namespace) -> Client:
    from baton.client import Client

    return Client(args.socket, timeout=args.timeout)


# --- commands over the client ---------------------------------------------------------------------------------


def _cmd_enqueue(args: argparse.Namespace) -> int:
    specs: list[dict[str, Any]]
    if args.file:
        text = _read_arg(args.file)
        data = json.loads(text)
        specs = data if isinstance(data, list) else [data]
    else:
        if not args.summary or not args.type:
            raise SystemExit("baton enqueue: give --type and --summary (or --file with JSON task specs)")
        spec: dict[str, Any] = {"summary": args.summary, "agent_type": args.type}
        for key, value in (("id", args.id), ("description", args.description), ("base_priority", args.priority),
                           ("max_attempts", args.max_attempts), ("timeout_s", args.task_timeout)):
            if value is not None:
                spec[key] = value
        if args.after:
            spec["prerequisites"] = args.after
        if args.input is not None:
            spec["input"] = _json_arg(args.input)
        if args.metadata is not None:
            spec["metadata"] = _json_arg(args.metadata)
        specs = [spec]
    with _client(args) as c:
        results = c.enqueue(specs)
    if args.json:
        print_json([{"id": r.task_id, "status": r.status, "created": r.created} for r in results])
    else:
        print_table([(r.task_id, r.status.value, "yes" if r.created else "no (existing)") for r in results],
                    ["id", "status", "created"])
    return 0


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # plain text is a string input; JSON is kept as its value


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        task = c.get(args.id)
    if args.json:
        print_json(task)
        return 0
    rows: list[tuple[str, object]] = [
        ("id", task.id), ("summary", task.summary), ("status", task.status.value),
        ("agent_type", task.agent_type), ("priority", f"{task.calculated_priority:.2f}"),
        ("attempts", f"{task.attempts}/{task.max_attempts}"),
        ("prerequisites", ", ".join(task.prerequisites) or "-"),
        ("created_at", task.created_at.isoformat()),
        ("finished_at", task.finished_at.isoformat() if task.finished_at else "-"),
        ("lease_holder", task.lease_holder or "-"),
        ("input", _short(json.dumps(jsonable(task.input)), 100)),
        ("result", _short(json.dumps(jsonable(task.result)), 100)),
    ]
    if task.error:
        rows.append(("error", _short(task.error, 100)))
    if task.blocked_reason:
        rows.append(("blocked_reason", _short(task.blocked_reason, 100)))
    print_table(rows, ["field", "value"])
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        tasks = c.list(status=args.status, agent_type=args.type, limit=args.limit)
    if args.json:
        print_json(tasks)
    else:
        print_table([(t.id, t.status.value, t.agent_type, f"{t.calculated_priority:.2f}", t.attempts,
                      _short(t.summary, 50)) for t in tasks],
                    ["id", "status", "agent_type", "priority", "attempts", "summary"])
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        qs = c.queue_status()
    if args.json:
        print_json(qs)
        return 0
    rows: list[tuple[str, object]] = [(k, v) for k, v in sorted(qs.by_status.items())]
    rows.append(("total", qs.total))
    print_table(rows, ["status", "tasks"])
    if qs.average_priority is not None:
        print(f"\naverage priority (open tasks): {qs.average_priority:.2f}")
    for label, age in (("oldest pending", qs.oldest_pending), ("oldest waiting", qs.oldest_waiting)):
        if age is not None:
            print(f"{label}: {age.task_id} ({_short(age.summary, 40)}), {age.age_s:.0f}s")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.cancel(args.id, cascade=not args.no_cascade, dry_run=args.dry_run, reason=args.reason)
    if args.json:
        print_json(res)
    else:
        print(("would cancel" if res.dry_run else "cancelled") + f" {res.total_cancelled} task(s): {res.message}")
        if res.cascaded_task_ids:
            print("cascaded: " + ", ".join(res.cascaded_task_ids))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    with _client(args) as c:
        plan = c.execution_plan(agent_type=args.type, wip=args.wip)
    if args.json:
        print_json(plan)
        return 0
    print_table([(n + 1, len(b), _short(", ".join(b), 80)) for n, b in enumerate(plan.batches)],
                ["batch", "tasks", "ids"])
    print(f"\n{plan.total_batches} batch(es), max parallelism {plan.max_parallelism}, "
          f"critical path {len(plan.critical_path)} task(s) / {plan.critical_path_s:.0f}s, "
          f"estimated makespan {plan.estimated_makespan_s:.0f}s")
    for tid, missing in plan.external_unsatisfied.items():
        print(f"{tid} waits on unfinished tasks outside the plan: {', '.join(missing)}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from baton.manifest import ImportResult, ValidationReport

    text = _read_arg(args.path)
    with _client(args) as c:
        _progress(f"importing {args.path} ({len(text)} bytes)" + (" (dry run)" if args.dry_run else "") + " ...")
        res = c.import_manifest(text, dry_run=args.dry_run)
        created = res.created if isinstance(res, ImportResult) else []
        _progress(f"imported: {getattr(res, 'status', 'checked')}, {len(created)} task(s) created")
        waited = _wait_with_progress(c, created, args.wait_timeout) if args.wait and created else None
    report = res.report if isinstance(res, ImportResult) else res if isinstance(res, ValidationReport) else None
    if args.json:
        out = jsonable(res)
        if waited is not None:
            out = {"import": out, "wait": {"statuses": waited[0], "timed_out": waited[1]}}
        print(json.dumps(out, indent=2))
    else:
        if isinstance(res, ImportResult):
            print(f"manifest {res.manifest_id}: {res.status}, {len(res.created)} created, "
                  f"{len(res.changed_task_ids)} changed, {len(res.removed_task_ids)} removed")
        if report is not None and report.issues:
            print_table([(i.severity, i.kind, i.task_id or "-", _short(i.message, 70)) for i in report.issues],
                        ["severity", "kind", "task", "message"])
        elif report is None:
            print_json(res)
        if waited is not None:
            _print_statuses(waited[0])
    rejected = isinstance(res, ImportResult) and res.status == "rejected"
    return 1 if rejected or (waited is not None and waited[1]) else 0


def _wait_with_progress(c: Client, ids: Sequence[str], timeout: float | None) -> tuple[dict[str, str], bool]:
    """Wait for ids in short slices so that progress can be shown; (statuses, timed_out)."""
    from baton.models import TERMINAL

    terminal = {s.value for s in TERMINAL}
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        res = c.wait(ids, timeout=1.0 if left is None else min(1.0, left))
        done = sum(1 for s in res.statuses.values() if s in terminal)
        line = f"waiting: {done}/{len(ids)} task(s) finished"
        if line != last:
            _progress(line)
            last = line
        if not res.timed_out:
            return res.statuses, False
        if left is not None and left <= 0:
            return res.statuses, True


def _print_statuses(statuses: dict[str, str]) -> None:
    print_table(sorted(statuses.items()), ["id", "status"])


def _cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as c:
        statuses, timed_out = _wait_with_progress(c, args.ids, args.wait_timeout)
    if args.json:
        print_json({"statuses": statuses, "timed_out": timed_out})
    else:
        _print_statuses(statuses)
        if timed_out:
            print("timed out before every task finished")
    return 1 if timed_out else 0


def _cmd_pulse(args: argparse.Namespace) -> int:
    with _client(args) as c:
        p = c.pulse()
    if args.json:
        print_json(p)
    else:
        from baton.reports import render_pulse

        print(render_pulse(p))
    return 0


def _cmd_agents(args: argparse.Namespace) -> int:
    with _client(args) as c:
        agents = c.agents()
    if args.json:
        print_json(agents)
    else:
        print_table([(a.get("endpoint"), a.get("name"), a.get("agent_type") or "-", a.get("wip"), a.get("held"),
                      a.get("pid"), f"{float(a.get('connected_s') or 0):.0f}s") for a in agents],
                    ["endpoint", "name", "agent_type", "wip", "held", "pid", "connected"])
    return 0


_MODE_ROWS = 20  # history rows `baton mode` prints


def _cmd_mode(args: argparse.Namespace) -> int:
    if args.action == "set":
        if not args.mode:
            print("baton mode set: which mode? INTELLIGENT, PYTHON_ONLY, REDUNDANT or SPEED_CRITICAL", file=sys.stderr)
            return 2
        with _client(args) as c:
            r = c.set_mode(args.mode.upper())
        if args.json:
            print_json(r)
        elif r["switching_to"]:
            router_change = "PYTHON_ONLY" in (r["mode"], r["switching_to"])
            print(f"switching from {r['mode']} to {r['switching_to']}"
                  + (": connections are closed and reconnect" if router_change else "")
                  + "; `baton mode` shows when it is done")
        else:
            print(f"already {r['mode']}")
        return 0
    with _client(args) as c:
        m = c.mode()
    if args.json:
        print_json(m)
        return 0
    print(f"mode {m['mode']} (router {m['router']}) since {_clock(m['since'])}: {m['reason']}")
    if m.get("degraded"):
        print(f"degraded: WIP limits at {m['wip_factor']:.0%}; the native router is retried automatically")
    if m["switches"]:
        print("switches: " + ", ".join(f"{r} {n}" for r, n in sorted(m["switches"].items())))
    shown = m["history"][-_MODE_ROWS:]
    if len(shown) < len(m["history"]):
        print(f"history: the last {len(shown)} of {len(m['history'])} entries (--json has them all)")
    print_table([(_clock(h["at"]), h["mode"], h["reason"], "" if h.get("pause_ms") is None else f"{h['pause_ms']} ms")
                 for h in shown], ["at", "mode", "reason", "pause"])
    return 0


def _clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        stats = c.stats()
    if args.json:
        print_json(stats)
    else:
        flat: list[tuple[str, object]] = []
        for k, v in sorted(stats.items()):
            if isinstance(v, dict):
                flat.extend((f"{k}.{k2}", v2) for k2, v2 in sorted(v.items()))
            else:
                flat.append((k, v))
        print_table(flat, ["counter", "value"])
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from baton.worker import run_worker

    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("baton worker: give the command to run after --: baton worker --type T -- CMD ARGS...",
              file=sys.stderr)
        return 2
    from baton.jsonlog import configure_logging

    configure_logging(args.log_level)
    run_worker(args.type, argv, wip=args.wip, socket=args.socket, name=args.name, capabilities=args.capability)
    return 0


# --- commands without the client -------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from baton.daemon_config import FLAG_NAMES

    overrides = {field: getattr(args, field) for field in FLAG_NAMES}
    try:
        from baton import daemon
    except ImportError as exc:
        print(f"baton serve: the daemon module is not available in this build ({exc})", file=sys.stderr)
        return 1
    return int(daemon.serve(args.config, overrides))  # type: ignore[attr-defined,unused-ignore]


def _cmd_bench_handoff(args: argparse.Namespace) -> int:
    try:
        from baton import bench_handoff
    except ImportError as exc:
        print(f"baton bench handoff: the benchmark module is not available in this build ({exc})", file=sys.stderr)
        return 1
    return int(bench_handoff.main(list(args.rest)))


def _cmd_selftest(args: argparse.Namespace) -> int:
    from baton import selftest

    report = selftest.run(progress=None if args.json else lambda msg: print(msg, file=sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(
            [(c["name"], "ok" if c["ok"] else "FAILED", c["detail"]) for c in report["checks"]],
            ["check", "result", "detail"],
        )
        if not report["ok"]:
            print("\nselftest failed: the native layer is not usable here; baton would run PYTHON_ONLY.")
            print("Rebuild it with `pip install .` (needs gcc and the Python headers) and run this again.")
    return 0 if report["ok"] else 1


# --- parser ----------------------------------------------------------------------------------------------------


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--socket", help="the daemon's socket (default: BATON_SOCKET, else where `baton serve` listens)")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default 30)")
    return p


def _serve_flags(p: argparse.ArgumentParser) -> None:
    from baton.daemon_config import FLAG_NAMES

    p.add_argument("--config", type=_path, default=None,
                   help="TOML configuration file (default: $XDG_CONFIG_HOME/baton/baton.toml if it exists)")
    for field, flag in FLAG_NAMES.items():
        # Values stay text: load_config parses them and names the flag in its errors.
        p.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=f"the {field} setting")


def _path(text: str) -> Any:
    from pathlib import Path

    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Local coordination daemon for multi-agent work.")
    parser.add_argument("--version", action="version", version=f"baton {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cp = _client_parent()

    p = sub.add_parser("serve", help="run the daemon in the foreground (JSON-line logs on stderr)")
    _serve_flags(p)
    p.set_defaults(func=_cmd_serve, needs_daemon=False)

    p = sub.add_parser("enqueue", parents=[cp], help="submit a task (flags) or tasks (--file JSON)")
    p.add_argument("--type", help="agent_type that runs the task")
    p.add_argument("--summary", help="one line saying what the task is")
    p.add_argument("--id", help="task id (default: generated)")
    p.add_argument("--description")
    p.add_argument("--input", help="task input: JSON, or plain text")
    p.add_argument("--metadata", help="JSON object")
    p.add_argument("--priority", type=int, help="base priority 0-10 (default 5)")
    p.add_argument("--after", nargs="+", metavar="ID", help="prerequisite task ids")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--task-timeout", type=float, help="seconds an attempt may take")
    p.add_argument("--file", help="a JSON task spec or list of specs ('-': stdin); replaces the other flags")
    p.set_defaults(func=_cmd_enqueue)

    p = sub.add_parser("get", parents=[cp], help="show one task")
    p.add_argument("id")
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("list", parents=[cp], help="list tasks")
    p.add_argument("--status", help="only tasks in this status")
    p.add_argument("--type", help="only tasks of this agent_type")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("status", parents=[cp], help="queue status: tasks per status, oldest waiting")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", parents=[cp], help="cancel a task (and, by default, its dependents)")
    p.add_argument("id")
    p.add_argument("--dry-run", action="store_true", help="say what would be cancelled, change nothing")
    p.add_argument("--no-cascade", action="store_true", help="leave dependents to their own policy")
    p.add_argument("--reason")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("plan", parents=[cp], help="execution plan: batches of tasks that can run together")
    p.add_argument("--type", help="only tasks of this agent_type")
    p.add_argument("--wip", type=int, help="at most this many tasks per batch")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("import", parents=[cp], help="import a JSON or TOML manifest ('-': stdin)")
    p.add_argument("path")
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.add_argument("--wait", action="store_true", help="then wait for the created tasks, with progress")
    p.add_argument("--wait-timeout", type=float, default=None, help="seconds to wait (default: no limit)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("wait", parents=[cp], help="wait until tasks finish, with progress on stderr")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--wait-timeout", type=float, default=None, help="seconds to wait (default: no limit)")
    p.set_defaults(func=_cmd_wait)

    p = sub.add_parser("pulse", parents=[cp], help="progress pulse: counts, in progress, blockers, anomalies")
    p.set_defaults(func=_cmd_pulse)

    p = sub.add_parser("agents", parents=[cp], help="connected agents and the tasks they hold")
    p.set_defaults(func=_cmd_agents)

    p = sub.add_parser("mode", parents=[cp], help="the execution mode, why, and its history; `mode set MODE`")
    p.add_argument("action", nargs="?", choices=["show", "set"], default="show")
    p.add_argument("mode", nargs="?", help="with set: INTELLIGENT, PYTHON_ONLY, REDUNDANT or SPEED_CRITICAL")
    p.set_defaults(func=_cmd_mode)

    p = sub.add_parser("stats", parents=[cp], help="daemon and router counters")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("worker", parents=[cp], help="run CMD once per task: baton worker --type T -- CMD ARGS...")
    p.add_argument("--type", required=True, help="agent_type to serve")
    p.add_argument("--wip", type=int, default=1, help="tasks run at once (default 1)")
    p.add_argument("--name", help="agent name shown by `baton agents`")
    p.add_argument("--capability", action="append", default=[], help="a capability (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("bench", help="benchmarks against a running daemon")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    b = bsub.add_parser("handoff", help="message round trip, task handoff latency, no-op throughput",
                        add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of baton.bench_handoff (--help for them)")
    b.set_defaults(func=_cmd_bench_handoff, needs_daemon=False)

    p = sub.add_parser("selftest", help="exercise the native core end to end and print what it measured")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_selftest, needs_daemon=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "handoff"]:
        # Everything after "handoff" belongs to the benchmark's own parser (argparse.REMAINDER would refuse a
        # leading option such as --help).
        return _cmd_bench_handoff(argparse.Namespace(rest=argv[2:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from baton.client_errors import ClientError, DaemonNotRunning

    try:
        return int(func(args))
    except DaemonNotRunning as exc:
        print(f"baton: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except (ClientError, OSError, ValueError) as exc:  # RemoteError prints as "<code>: <message>"
        print(f"baton {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
