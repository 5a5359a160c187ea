"""benchmarks/sampler.py runs end to end and prints both samplers' figures for every setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sampler.py"


def test_sampler_benchmark_prints_every_setting() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "3", "--vocab", "700", "--repeat", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if "transformers" in line]
    assert len(rows) == 5
    for row in rows:
        hf, ours, ratio = float(row[-4]), float(row[-2]), row[-1]
        assert hf > 0 and ours > 0 and ratio.startswith("x")
