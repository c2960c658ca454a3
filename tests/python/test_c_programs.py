"""Run every C test program (tests/c/test_*.c), plain and under ASan+UBSan: exit 0 pass, 1 fail, 77 skip."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO

PROGRAMS = sorted(p.stem for p in (REPO / "tests" / "c").glob("test_*.c"))
VARIANTS = ("release", "asan")
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


@pytest.fixture(scope="session")
def built() -> dict[str, str]:
    """Build both variants once; a build failure is reported on every program's test."""
    results = {}
    for variant in VARIANTS:
        targets = [f"build/c/{variant}/{name}" for name in PROGRAMS]
        proc = subprocess.run(
            ["make", "-s", f"-j{os.cpu_count() or 2}", *targets], cwd=REPO, capture_output=True, text=True
        )
        results[variant] = "" if proc.returncode == 0 else proc.stdout + proc.stderr
    return results


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("program", PROGRAMS)
def test_c_program(program: str, variant: str, built: dict[str, str]) -> None:
    assert not built[variant], f"building the {variant} C tests failed:\n{built[variant]}"
    env = dict(os.environ, **(SANITIZER_ENV if variant == "asan" else {}))
    proc = subprocess.run(
        [str(REPO / "build" / "c" / variant / program)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode == 77:
        pytest.skip(f"{program} skipped itself: {proc.stderr.strip() or proc.stdout.strip()}")
    assert proc.returncode == 0, f"{program} ({variant}) exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
