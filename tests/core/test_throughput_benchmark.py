"""benchmarks/throughput.py runs end to end: interleaved rounds, every configuration's row, and
titanserve's ratio to each round's fastest transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def test_throughput_benchmark_interleaves_rounds() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "tiny-llama", "--workers", "1",
         "--num-requests", "2", "--hf-batch-sizes", "1", "2", "--repeat", "2", "--zoo-size",
         "--device", "cpu", "--process-ab"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.count("round ") == 2, out
    assert out.index("round 1/2") < out.index("round 2/2") < out.index("transformers (batch 1)")
    hf_rates = [float(m) for m in re.findall(r"transformers \(batch \d\).* ([\d.]+) tok/s", out)]
    assert len(hf_rates) == 2 and min(hf_rates) > 0, out
    line = next(row for row in out.splitlines() if "titanserve (1 worker)" in row)
    best, rounds = _ratios(line)
    assert best > 0 and len(rounds) == 2 and all(r > 0 for r in rounds), line
    assert re.search(r"agree \d+%  outside compute \d+%", line), line
    # --process-ab: on CPU one worker runs in the engine's process by default; the other way too
    other = next(row for row in out.splitlines() if "titanserve (1 worker, own process)" in row)
    assert len(_ratios(other)[1]) == 2 and re.search(r"agree \d+%", other), other


def test_throughput_benchmark_splits_the_all_to_all_share() -> None:
    """Two MoE workers: the share outside compute names the slowest worker's all-to-all time,
    waiting for the other and the rest."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "tiny-mixtral", "--workers", "2",
         "--num-requests", "4", "--hf-batch-sizes", "4", "--big-batch", "2", "--zoo-size",
         "--device", "cpu", "--redundant-experts", "1", "--expert-rebalance-steps", "2",
         "--two-batch-overlap", "--kv-cache-dtype-too", "bfloat16", "--recorded-expert-loads"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    variants = ["", ", 1 redundant expert", ", rebalanced every 2",
                ", 1 redundant expert, rebalanced every 2", ", placed by recorded loads",
                ", 1 redundant expert, placed by recorded loads", ", two-batch overlap",
                ", bfloat16 KV cache"]
    for label in [f"titanserve (2 workers{variant})" for variant in variants]:
        line = next(row for row in run.stdout.splitlines() if label + " " in row)
        assert re.search(r"\(batch >= 2: \d+\.\d%; all-to-all wait \d+%, work \d+%; "
                         r"workers' compute apart \d+%\)", line), line
        assert re.search(r"run-queue wait \d+\.\d%", line), line
        assert re.search(r"agree \d+%", line), line


@pytest.mark.slow
def test_throughput_benchmark_times_the_demo_moe_alone() -> None:
    """`--smollm2-moe` with no tiny model: each worker count against 1 worker, copies too."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "--smollm2-moe", "--workers", "1", "2",
         "--num-requests", "4", "--big-batch", "2", "--redundant-experts", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [row for row in run.stdout.splitlines() if row.startswith("  titanserve")]
    assert len(rows) == 3 and "transformers" not in run.stdout, run.stdout
    assert "x1.00 vs titanserve (1 worker)" in rows[0]
    assert "(2 workers, 1 redundant expert)" in rows[2]
    for row in rows[1:]:
        assert re.search(r"\(batch >= 2: \d+\.\d%; all-to-all wait \d+%, work \d+%; workers' "
                         r"compute apart \d+%\)  run-queue wait [\d.]+%$", row), row
    # the host floor of 2 processes meeting at both all-to-alls of the 30 layers, one round
    floor = (r"host floor, 2 processes meeting 60 times a step .*: outside compute "
             r"\d+% \(waiting \d+%, run-queue wait [\d.]+%, compute apart \d+%\)$")
    assert re.search(floor, run.stdout, re.M), run.stdout


def _ratios(line: str) -> tuple[float, list[float]]:
    """(ratio to the best transformers run, [ratio to each round's fastest transformers])."""
    best = float(re.search(r"x([\d.]+) vs best HF", line).group(1))
    rounds = re.search(r"\(rounds ([^)]*)\)", line).group(1)
    return best, [float(r.lstrip("x")) for r in rounds.split(" / ")]


@pytest.mark.parametrize("flag", ["--repeat", "--big-batch"])
def test_throughput_benchmark_rejects_zero_rounds_or_batch(flag: str) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), flag, "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--big-batch must be >= 1" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("flags", [["--redundant-experts", "0"],
                                   ["--expert-rebalance-steps", "-1"]])
def test_throughput_benchmark_rejects_bad_expert_options(flags: list[str]) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--redundant-experts takes counts >= 1" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_failing_configuration_does_not_stop_the_others(tmp_path) -> None:
    """`run_rounds`: the configuration that fails is reported once and not run again; the
    others run every round, each after the baseline's round."""
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import titanserve_runs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from titanserve.launcher.tiny_models import make_tiny

    path = make_tiny("llama", tmp_path / "llama")
    args = argparse.Namespace(repeat=2, device="cpu", big_batch=1)
    configs = [("copies on a dense model", 2, {"num_redundant_experts": 1}),
               ("one worker", 1, {})]
    baseline_rounds = []
    rounds, failed = titanserve_runs.run_rounds(
        path, [([5, 6, 7], 3)], configs, "float32", args, lambda: baseline_rounds.append(1)
    )
    assert baseline_rounds == [1, 1]
    assert list(failed) == ["copies on a dense model"]
    assert "FAILED: ConfigError" in failed["copies on a dense model"]
    assert rounds["copies on a dense model"] == []
    assert [r["tokens"] for r in rounds["one worker"]] == [3, 3]


def test_run_queue_wait_counts_time_kept_off_the_core() -> None:
    """`run_queue_wait_s` (the benchmark's per-row host check) reads how long a thread sat
    ready while another task ran on its core: two busy processes on one core wait ~half."""
    probe = f"""
import os, subprocess, sys, time
sys.path.insert(0, {str(SCRIPT.parent)!r})
from run_queue import run_queue_wait_s
core = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {{core}})  # the busy child inherits it: both share one core
hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    time.sleep(0.3)
    before, end = run_queue_wait_s(os.getpid()), time.perf_counter() + 1.0
    while time.perf_counter() < end:
        pass
    shared = run_queue_wait_s(os.getpid()) - before
finally:
    hog.kill()
    hog.wait()
before, end = run_queue_wait_s(os.getpid()), time.perf_counter() + 1.0
while time.perf_counter() < end:  # the core to itself now
    pass
print(shared, run_queue_wait_s(os.getpid()) - before)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    shared, alone = map(float, run.stdout.split())
    assert shared > 0.2 and alone < 0.15, run.stdout  # ~0.5 s of the 1 s, then ~0
