"""Small building blocks: RMSNorm and a SwiGLU MLP with fused gate/up weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanserve.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


# On CPU, a step with many tokens (prefill) runs the MLP this many rows at a time: a piece's
# (rows, 2I) gate/up activations stay in cache for silu and the product, instead of making
# three round trips through memory (a tiny Llama's 8192-token prefill step: median of 6 runs
# 0.52 s vs 0.60 s in one piece).
CPU_MLP_ROWS_PER_PIECE = 1024


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one (2I, H) matrix."""

    LINEAR_WEIGHTS = ("gate_up_proj", "down_proj")  # see kernels.cpu_linear.pack_linear_weights

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(hidden_size, intermediate_size), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        piece = CPU_MLP_ROWS_PER_PIECE
        if not x.is_cpu or x.shape[0] <= 2 * piece:
            return self._mlp(x)
        out = x.new_empty(x.shape[0], self.down_proj.shape[0])  # (T, H)
        for start in range(0, x.shape[0], piece):
            out[start : start + piece] = self._mlp(x[start : start + piece])
        return out

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = ops.linear(x, self.gate_up_proj)  # (T, 2I)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return ops.linear(F.silu(gate) * up, self.down_proj)  # (T, H)
