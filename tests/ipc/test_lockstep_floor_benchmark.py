"""benchmarks/lockstep_floor.py runs end to end (real processes meeting at mesh barriers) and
refuses bad flags with a one-line error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lockstep_floor.py"


def test_lockstep_floor_prints_each_round_in_parts() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--meetings", "5", "--segment-ms", "1",
         "--repeat", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = re.findall(
        r"round (\d): step ([\d.]+) ms, outside compute ([\d.]+)% \(waiting ([\d.]+)%, "
        r"barrier work ([\d.]+)%\), run-queue wait ([\d.]+)%, compute apart ([\d.]+)%",
        run.stdout,
    )
    assert [r[0] for r in rows] == ["1", "2"], run.stdout
    for _, step_ms, outside, waiting, work, queued, apart in rows:
        # 5 segments of about 1 ms; the parts add up to the share (to rounding)
        assert float(step_ms) >= 4
        assert 0 <= float(waiting) <= float(outside) < 100
        assert abs(float(waiting) + float(work) - float(outside)) <= 0.15
        assert 0 <= float(queued) < 100
        assert 0 <= float(apart) < 100


def test_lockstep_floor_refuses_bad_flags() -> None:
    for flags, message in (
        (["--workers", "1"], "--workers must be at least 2"),
        (["--meetings", "0"], "--meetings must be at least 1"),
        (["--segment-ms", "0"], "--segment-ms must be positive"),
    ):
        run = subprocess.run(
            [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 2 and message in run.stderr, (flags, run.stderr)
        assert "Traceback" not in run.stderr
