"""benchmarks/cpu_decode_attention.py runs end to end and prints both caches' figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_decode_attention.py"


def test_decode_attention_benchmark_prints_both_caches_for_every_shape() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch", "2", "5", "--context", "20", "--heads", "4",
         "2", "--repeat", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if "in place" in line]
    assert len(rows) == 2
    for row in rows:
        assert re.search(r"gathered +\d+ us +fp32 cache in place +\d+ us +x\d+\.\d\d$", row), row


def test_decode_attention_benchmark_refuses_bad_heads() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--heads", "9", "4"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2 and "multiple of kv heads" in run.stderr
