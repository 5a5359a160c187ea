"""Model building blocks beyond what the transformers oracle reaches: the CPU MLP that runs a
long step's rows piece by piece gives the rows of running them all at once."""

from __future__ import annotations

import torch

from titanserve import LLM, SamplingParams
from titanserve.core.model import layers


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
