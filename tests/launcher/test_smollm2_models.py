"""The demo model builders: SmolLM2 as a Llama checkpoint, and upcycled to Mixtral."""

from __future__ import annotations

import json

import pytest
import torch

from titanserve.launcher.smollm2_models import make_smollm2, make_smollm2_moe


@pytest.mark.slow
def test_make_smollm2_and_moe(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    dense_dir = make_smollm2(tmp_path / "smollm2", dtype="float32")
    moe_dir = make_smollm2_moe(tmp_path / "moe", experts=2, top_k=2, noise=0.0, seed=0,
                               dtype="float32")
    noisy_dir = make_smollm2_moe(tmp_path / "noisy", experts=2, top_k=1, noise=0.05, seed=1,
                                 dtype="bfloat16")
    assert json.loads((noisy_dir / "config.json").read_text())["num_experts_per_tok"] == 1
    for folder in (dense_dir, moe_dir, noisy_dir):
        assert (folder / "tokenizer.json").is_file()
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = MixtralForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    noisy = MixtralForCausalLM.from_pretrained(noisy_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 198, 6004, 2]])  # (1, S)
    with torch.no_grad():
        expected = dense(ids).logits  # (1, S, V)
        assert (moe(ids).logits - expected).abs().max().item() <= 1e-4
        assert (noisy(ids).logits - expected).abs().max().item() > 1e-3
