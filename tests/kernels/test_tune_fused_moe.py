"""The fused-MoE tuner and the kernel benchmark: exit 0 with a message on CPU; on GPU the
tuner writes a table that the launcher reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import titanserve.kernels.fused_moe as fused_moe_mod
from titanserve.kernels.tune_fused_moe import candidate_configs, main

REPO = Path(__file__).resolve().parents[2]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on GPU these would really run")


@cpu_only
def test_tuner_needs_a_gpu_and_exits_0(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "-m", "titanserve.kernels.tune_fused_moe", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert not out.exists()


@cpu_only
def test_benchmark_needs_a_gpu_and_exits_0():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout


def test_candidates_skip_blocks_far_taller_than_the_rows_per_expert():
    assert {c["BLOCK_M"] for c in candidate_configs(1, 2, 8)} == {16}
    assert {c["BLOCK_M"] for c in candidate_configs(4096, 2, 8)} == {16, 32, 64, 128}


@gpu
@pytest.mark.gpu
def test_tuned_table_is_used_by_the_launcher(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    assert main(["--num-experts", "4", "--hidden", "256", "--intermediate", "128",
                 "--top-k", "2", "--batch-sizes", "1,64", "--rep-ms", "5", "--small",
                 "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table) == {"1", "64"}
    name = fused_moe_mod.config_file_name(4, 128, 256, torch.bfloat16, torch.cuda.get_device_name())
    (tmp_path / name).write_text(out.read_text())
    monkeypatch.setattr(fused_moe_mod, "MOE_CONFIG_DIR", tmp_path)
    fused_moe_mod._tuned_table.cache_clear()
    x = torch.zeros(60, 256, dtype=torch.bfloat16, device="cuda")
    assert fused_moe_mod.get_config(60, 4, 128, 256, 2, x) == table["64"]
    fused_moe_mod._tuned_table.cache_clear()
