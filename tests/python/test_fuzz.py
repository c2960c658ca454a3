"""Run every libFuzzer harness (tests/fuzz/fuzz_*.c) for a bounded time: BATON_FUZZ_SECONDS (default 5)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO

HARNESSES = sorted(p.stem for p in (REPO / "tests" / "fuzz").glob("fuzz_*.c"))
SECONDS = int(os.environ.get("BATON_FUZZ_SECONDS", "5"))


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang (libFuzzer) is not installed: scripts/install-deps")
@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz_harness(harness: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    binary = f"build/c/fuzz/{harness}"
    build = subprocess.run(["make", "-s", binary], cwd=REPO, capture_output=True, text=True)
    assert build.returncode == 0, f"building {harness} failed:\n{build.stdout}{build.stderr}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = REPO / "tests" / "fuzz" / "seeds" / harness
    args = [str(REPO / binary), f"-max_total_time={SECONDS}", "-print_final_stats=1", str(corpus)]
    if seeds.is_dir():
        args.append(str(seeds))
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 120)
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0, f"{harness} found a crash (exit {proc.returncode}):\n{tail}"
    assert "Done " in proc.stderr, f"{harness} did not run to completion:\n{tail}"
