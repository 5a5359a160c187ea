"""Expert stacks packed per expert for oneDNN (kernels.cpu_experts): the same expert outputs
as the dense stack on every routing case, what the model runner packs, and what it leaves."""

import pytest
import torch
from torch import nn

from tests.kernels.test_fused_moe import CASES, fused_moe_loop, make_moe
from titanserve import LLM
from titanserve.kernels import cpu_experts
from titanserve.kernels.backend import forced_backend
from titanserve.kernels.cpu_experts import (
    PackedExperts,
    pack_expert_weights,
    packed_expert_matrices,
)
from titanserve.kernels.cpu_linear import can_pack
from titanserve.kernels.fused_moe import fused_moe_torch
from titanserve.launcher.tiny_models import make_tiny
from titanserve.moe.layer import MoELayer

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2)), reason="needs oneDNN")


def packed(args: dict) -> dict:
    return dict(args, w_gate_up=PackedExperts(args["w_gate_up"]),
                w_down=PackedExperts(args["w_down"]))


@pytest.mark.parametrize("T,K,E,H,N,routing,mapped", CASES)
def test_packed_experts_match_loop(T, K, E, H, N, routing, mapped):
    args = make_moe(T, K, E, H, N, routing, mapped)
    torch.testing.assert_close(fused_moe_torch(**packed(args)), fused_moe_loop(**args))


@pytest.mark.parametrize("mapped", [False, True])
def test_packed_experts_swiglu_oai_with_biases(mapped):
    args = make_moe(7, 2, 4, 32, 24, mapped=mapped, biases=True)
    args["x"] = args["x"] * 4  # reach the clamp
    got = fused_moe_torch(**packed(args), activation="swiglu_oai", swiglu_limit=2.0)
    torch.testing.assert_close(got, fused_moe_loop(**args, activation="swiglu_oai", limit=2.0))


def test_packed_experts_answer_like_the_stack():
    stack = torch.randn(3, 8, 4)
    experts = PackedExperts(stack)
    assert (experts.shape, experts.dtype, experts.device) == (stack.shape, stack.dtype,
                                                              stack.device)
    assert experts.dim() == 3 and len(experts) == 3 and experts.numel() == stack.numel()
    assert experts[1].is_mkldnn and experts[1].shape == (8, 4)


@pytest.mark.parametrize("bad", [torch.zeros(8, 4), torch.zeros(2, 8, 4, dtype=torch.float16)])
def test_unpackable_stacks_are_refused(bad):
    with pytest.raises(ValueError, match="cannot pack"):
        PackedExperts(bad)


class Experts(nn.Module):
    EXPERT_WEIGHTS = ("w",)

    def __init__(self, num_experts: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_experts, 8, 4), requires_grad=False)


def test_only_the_torch_backend_packs_and_empty_stacks_stay(pack_every_weight):
    module = Experts()
    with forced_backend("triton"):  # the Triton kernels read the dense stacks
        assert pack_expert_weights(module) == 0
    assert isinstance(module.w, torch.Tensor) and packed_expert_matrices(module) == []
    assert pack_expert_weights(Experts(num_experts=0)) == 0  # a worker without local experts
    assert pack_expert_weights(module) == 1 and isinstance(module.w, PackedExperts)
    assert [m.shape for m in packed_expert_matrices(module)] == [(8, 4)]
    assert "w" not in dict(module.named_parameters())  # no dense copy kept
    assert pack_expert_weights(module) == 0  # nothing left to pack


class TwoStacks(nn.Module):
    EXPERT_WEIGHTS = ("up", "down")

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(2, 8, 4), requires_grad=False)  # 32 per expert
        self.down = nn.Parameter(torch.randn(2, 4, 4), requires_grad=False)  # 16 per expert


@pytest.mark.parametrize("threshold, packs", [(48, True), (40, True), (49, False)])
def test_a_module_packs_all_its_stacks_or_none(monkeypatch, threshold, packs):
    """The size rule counts an expert's elements over all its matrices (32 + 16 here), and
    never leaves a module with one stack packed and one dense."""
    monkeypatch.setattr(cpu_experts, "MIN_PACKED_EXPERT_ELEMENTS", threshold)
    module = TwoStacks()
    assert pack_expert_weights(module) == (2 if packs else 0)
    assert isinstance(module.up, PackedExperts) == packs
    assert isinstance(module.down, PackedExperts) == packs


@pytest.mark.parametrize("forced", [False, True], ids=["tiny-stays-dense", "forced"])
def test_what_the_cpu_runner_packs(tmp_path, request, forced):
    """A tiny Mixtral's experts are far below MIN_PACKED_EXPERT_ELEMENTS: dense stacks;
    with the size rule lifted every stack is packed."""
    if forced:
        request.getfixturevalue("pack_every_weight")
    path = make_tiny("mixtral", tmp_path, num_hidden_layers=2)
    with LLM(path, progress=False, worker_processes=False) as llm:  # runner read
        layers = [m for m in llm.engine.executor.runner.model.modules()
                  if isinstance(m, MoELayer)]
        assert len(layers) == 2
        for layer in layers:
            assert isinstance(layer.w_gate_up, PackedExperts) == forced
            assert isinstance(layer.w_down, PackedExperts) == forced


def test_rows_are_padded_to_buckets_only_where_a_count_is_not_one(monkeypatch):
    """Per-expert counts that are already row buckets (a single token) skip the padded gather;
    others take it. Both give the loop's answer, empty input included."""
    import titanserve.kernels.fused_moe as fused_moe_mod

    calls = []
    real = fused_moe_mod._experts_packed
    monkeypatch.setattr(fused_moe_mod, "_experts_packed",
                        lambda *a: calls.append(len(a[1])) or real(*a))
    for T in (0, 1, 33):
        args = make_moe(T, 2, 8, 32, 24)
        torch.testing.assert_close(fused_moe_torch(**packed(args)), fused_moe_loop(**args))
    assert calls == [66]  # only the 33-token batch (~8 rows per expert, not all buckets)
