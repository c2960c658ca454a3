"""The ``baton`` command line.  Tables for people, ``--json`` for machines; errors say what to do next."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from baton import __version__


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    """Print rows as a left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Local coordination daemon for multi-agent work.")
    parser.add_argument("--version", action="version", version=f"baton {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("selftest", help="exercise the native core end to end and print what it measured")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
