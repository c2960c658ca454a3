"""Median over repeated runs of the C benchmarks: reads bench/out/<bench>-<i>.json written by bench/run and
prints one table per benchmark (median of each figure, and the range of p50 / throughput across runs)."""

from __future__ import annotations

import glob
import json
import statistics
import sys
from collections import defaultdict


def main(out_dir: str = "bench/out") -> None:
    runs: dict[str, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
    for path in sorted(glob.glob(f"{out_dir}/bench_*-[0-9]*.json")):
        with open(path) as f:
            doc = json.load(f)
        runs[doc["bench"]].append(doc)
    for bench, docs in runs.items():
        print(f"\n{bench}: median of {len(docs)} runs (commit {docs[0].get('commit', '?')})")
        lat: dict[str, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
        tput: dict[str, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
        for d in docs:
            for row in d.get("latency_ns", []):
                lat[row["name"]].append(row)
            for row in d.get("throughput", []):
                tput[row["name"]].append(row)
        for name, rows in lat.items():
            med = {k: statistics.median(r[k] for r in rows) for k in ("p50", "p99", "p99_9")}
            lo, hi = min(r["p50"] for r in rows), max(r["p50"] for r in rows)
            print(f"  {name:40} p50 {med['p50']:>10.1f} ns  p99 {med['p99']:>10.1f} ns  "
                  f"p99.9 {med['p99_9']:>10.1f} ns   (p50 range {lo:.0f}-{hi:.0f})")
        for name, rows in tput.items():
            vals = [r["mframes_per_s"] for r in rows]
            print(f"  {name:40} {statistics.median(vals):8.1f} M frames/s   (range {min(vals):.1f}-{max(vals):.1f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
