"""benchmarks/collectives.py runs end to end in both timing modes and prints a row per size
with every backend's figure (real processes: slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "collectives.py"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--cold"]], ids=["warm", "cold"])
def test_collectives_benchmark_prints_every_backend(mode: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes-kib", "4", "--worlds", "2", *mode],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    header, row = run.stdout.strip().splitlines()[-2:]
    assert ("cold" in run.stdout) == bool(mode)
    assert header.split()[:3] == ["W", "per", "peer"]
    world, size, unit, zmq_us, plain_us, gloo_us, *_ = row.split()
    assert (world, size, unit) == ("2", "4", "KiB")
    assert min(float(zmq_us), float(plain_us), float(gloo_us)) > 0
