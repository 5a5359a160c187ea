"""Model building blocks beyond what the transformers oracle reaches: the CPU MLP that runs a
long step's rows piece by piece gives the rows of running them all at once; the CPU runner
packs the linear weights big enough to gain for oneDNN (`test_hf_oracle` checks a fully packed
model's logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titanserve import LLM, SamplingParams
from titanserve.core.config import ModelConfig
from titanserve.core.model import layers
from titanserve.core.model_runner import ModelRunner
from titanserve.kernels.cpu_experts import PackedExperts
from titanserve.kernels.weight_layout import listed_weights
from titanserve.moe.placement import ExpertPlacement


def test_mlp_in_pieces_equals_the_whole_batch(monkeypatch):
    torch.manual_seed(0)
    mlp = layers.GatedMLP(hidden_size=32, intermediate_size=48)
    torch.nn.init.normal_(mlp.gate_up_proj, std=0.2)
    torch.nn.init.normal_(mlp.down_proj, std=0.2)
    monkeypatch.setattr(layers, "CPU_MLP_ROWS_PER_PIECE", 16)
    x = torch.randn(16 * 5 + 7, 32)  # 5 whole pieces and a partial one
    torch.testing.assert_close(mlp(x), mlp._mlp(x), rtol=0, atol=1e-5)  # GEMM blocking
    small = x[:32]  # up to two pieces: one call
    assert torch.equal(mlp(small), mlp._mlp(small))


def test_prefill_logits_do_not_depend_on_the_mlp_piece_size(tiny_model, monkeypatch):
    prompt = list(range(3, 103))  # 100 tokens: 12 pieces of 8 and a partial one
    results = []
    for piece in (1 << 20, 8):
        monkeypatch.setattr(layers, "CPU_MLP_ROWS_PER_PIECE", piece)
        with LLM(tiny_model("llama"), progress=False) as llm:
            logits = llm.prompt_logits([prompt])[0]  # (100, V)
            out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]
        results.append((logits, out.token_ids))
    (whole, whole_tokens), (pieces, piece_tokens) = results
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)
    assert piece_tokens == whole_tokens


@pytest.mark.parametrize("forced", [False, True], ids=["tiny-stays-dense", "forced"])
@pytest.mark.parametrize("family", ["qwen2", "mixtral"])  # tied embeddings; MoE with a router
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_the_cpu_runner_packs_its_model(tiny_model, family, forced, request):
    """A tiny model's weights are all below the packing thresholds and stay dense (experts
    input-major); with the thresholds lifted every listed weight is packed."""
    if forced:
        request.getfixturevalue("pack_every_weight")
    path = tiny_model(family)
    cfg = ModelConfig.from_hf(path)
    runner = ModelRunner(
        path, cfg, torch.float32, block_size=16, num_blocks=8, max_model_len=128,
        placement=ExpertPlacement.contiguous(cfg.num_experts), progress=False,
    )
    model = runner.model
    listed = [w for _, _, w in listed_weights(model, "LINEAR_WEIGHTS")]
    assert listed and all(w.is_mkldnn == forced for w in listed)
    experts = [w for _, _, w in listed_weights(model, "EXPERT_WEIGHTS")]
    assert bool(experts) == bool(cfg.num_experts)
    if forced:
        assert all(isinstance(w, PackedExperts) for w in experts)
    else:  # stored input-major for the torch path's matmuls (kernels.fused_moe)
        assert all(w.dim() == 3 and w[0].t().is_contiguous() for w in experts)
    assert not model.embed_tokens.is_mkldnn  # the embedding lookup needs the dense table
    if cfg.tie_word_embeddings:
        hidden = torch.randn(3, cfg.hidden_size)
        with torch.inference_mode():
            torch.testing.assert_close(
                model.logits(hidden), F.linear(hidden, model.embed_tokens), rtol=1e-5, atol=1e-5
            )
