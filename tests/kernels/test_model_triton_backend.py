"""The whole decoder with every op on the Triton backend (interpreted on CPU) matches torch."""

from __future__ import annotations

import torch

from titanserve import LLM, SamplingParams
from titanserve.kernels.backend import forced_backend
from titanserve.launcher.tiny_models import make_tiny
from titanserve.moe.layer import MoELayer


def run(llm: LLM, prompts: list[list[int]]):
    logits = llm.prompt_logits(prompts)
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                return_logits=True))
    return logits, outs


def test_tiny_mixtral_triton_backend_matches_torch(tmp_path):
    path = make_tiny("mixtral", tmp_path, num_hidden_layers=2)
    prompts = [[5, 9, 33, 70, 101, 7, 250], [17, 18]]  # a prefill chunk and a short one
    with LLM(path, progress=False, block_size=4) as llm:
        ref_logits, ref_outs = run(llm, prompts)
    # Loaded under the forced backend: the experts stay dense stacks for the Triton kernel
    # (on the torch backend they are packed for oneDNN, kernels.cpu_experts).
    with forced_backend("triton"), LLM(path, progress=False, block_size=4,
                                          worker_processes=False) as llm:  # runner read
        model = llm.engine.executor.runner.model
        assert all(isinstance(m.w_gate_up, torch.Tensor) for m in model.modules()
                   if isinstance(m, MoELayer))
        tri_logits, tri_outs = run(llm, prompts)
    for a, b in zip(tri_logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(tri_outs, ref_outs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
