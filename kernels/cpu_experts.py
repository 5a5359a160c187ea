"""MoE expert weights on CPU, each expert's matrix packed once for oneDNN.

A stack of expert weights (E, N, K) multiplied per expert through BLAS is repacked into BLAS's
panel layout on every call, as a dense linear is (see `kernels.cpu_linear`). Packed per expert,
a loop of `cpu_linear.linear` calls reads each expert in oneDNN's layout. On the development
machine (AMD EPYC, 2 threads), the demo's SmolLM2-MoE (bf16, 30 layers of 8 experts, H 576,
I 1536) decoded 3 requests at 53 ms a step instead of 67 ms (dense stacks), prefilled 16
prompts 1.2x faster and decoded them 1.14x faster; a tiny fp32 Mixtral (H 256, I 384) ran the
throughput benchmark as fast either way (its decode steps used padded batched matmuls).
Small experts stay dense (`MIN_PACKED_EXPERT_ELEMENTS`).
"""

from __future__ import annotations

import torch
from torch import nn

from titanserve.kernels.backend import backend
from titanserve.kernels.cpu_linear import can_pack, pack
from titanserve.kernels.weight_layout import listed_weights, relayout_listed_weights

# A layer whose experts each have fewer elements (all their matrices together) keeps dense
# stacks: the per-expert loop pays oneDNN's fixed cost per call (`cpu_linear`) twice per
# expert, where dense stacks run every expert in two padded batched matmuls.
# `benchmarks/cpu_linear.py --experts` (8 experts top-2, cold; dense / packed time at 32, 64
# decode tokens and a 1024-token prefill): H 64 I 48 (9k elements an expert) 0.28-0.62,
# H 256 I 192 (147k) 0.64-0.93, H 256 I 384 (295k) 0.71-1.04, H 384 I 512 (590k)
# 1.07-1.18, H 576 I 768 (1.3M) 1.15-1.31. The tiny zoo's Mixtral ran 1.6x faster dense; at
# 295k (the throughput benchmark's Mixtral, packed) whole runs timed the same either way.
MIN_PACKED_EXPERT_ELEMENTS = 1 << 18


class PackedExperts:
    """An (E, N, K) expert weight stack held as E oneDNN-packed (N, K) matrices: expert e's
    projection is `cpu_linear.linear(x, stack[e])`. It answers what `fused_moe` asks of a
    dense stack (shape, dtype, device, dim, numel); it has no dense storage to index."""

    def __init__(self, stacked: torch.Tensor) -> None:  # (E, N, K)
        if stacked.dim() != 3 or not can_pack(stacked[0]):
            raise ValueError(
                f"PackedExperts: cannot pack a {stacked.dtype} {tuple(stacked.shape)} stack on "
                f"{stacked.device} (needs (E, N, K) fp32/bf16 in host memory and oneDNN)"
            )
        self.shape, self.dtype, self.device = stacked.shape, stacked.dtype, stacked.device
        self.experts = [pack(weight) for weight in stacked.unbind(0)]  # E x (N, K)

    def dim(self) -> int:
        return 3

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, expert: int) -> torch.Tensor:  # (N, K), packed
        return self.experts[expert]

    def replace(self, expert: int, weight: torch.Tensor) -> None:
        """Hold `weight` (N, K), dense, packed, as expert `expert` from now on."""
        assert tuple(weight.shape) == tuple(self.shape[1:]) and weight.dtype == self.dtype
        self.experts[expert] = pack(weight)


def is_packed(*stacks) -> bool:
    """Whether any of these expert stacks is a `PackedExperts` (then only the torch path's
    per-expert loop runs them)."""
    return any(isinstance(stack, PackedExperts) for stack in stacks)


def pack_expert_weights(model: nn.Module) -> int:
    """Replace, in place, every expert stack a module lists in its `EXPERT_WEIGHTS` class
    attribute by a `PackedExperts` where the torch backend runs it, oneDNN takes it, and the
    module's experts are big enough (`MIN_PACKED_EXPERT_ELEMENTS`: all of a module's stacks
    or none); returns how many. The dense stacks are dropped (memory does not grow)."""
    stacks_of: dict[nn.Module, list[torch.Tensor]] = {}
    for module, _, weight in listed_weights(model, "EXPERT_WEIGHTS"):
        if isinstance(weight, torch.Tensor) and weight.dim() == 3:
            stacks_of.setdefault(module, []).append(weight)
    big = {  # ids of the stacks of modules with big experts
        id(w)
        for stacks in stacks_of.values()
        if sum(w.shape[1] * w.shape[2] for w in stacks) >= MIN_PACKED_EXPERT_ELEMENTS
        for w in stacks
    }

    def takes(weight: torch.Tensor) -> bool:
        return (id(weight) in big and weight.shape[0] > 0 and backend(weight) == "torch"
                and can_pack(weight[0]))

    return relayout_listed_weights(model, "EXPERT_WEIGHTS", takes, PackedExperts)


def packed_expert_matrices(model: nn.Module) -> list[torch.Tensor]:
    """One packed matrix of each `PackedExperts` in `model` (the shapes its experts have)."""
    return [
        stack[0]
        for _, _, stack in listed_weights(model, "EXPERT_WEIGHTS")
        if isinstance(stack, PackedExperts) and len(stack)
    ]
