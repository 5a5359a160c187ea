"""Fused MoE expert computation: per routed (token, expert) pair, gate_up GEMM -> activation
-> down GEMM, scaled by the router weight and summed over the top-k.

Legend: T tokens, H hidden, I expert intermediate size, E experts (E_local on this worker),
K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "swiglu_oai")


def activate(
    gate: torch.Tensor, up: torch.Tensor, activation: str, limit: float, alpha: float
) -> torch.Tensor:
    """`silu(gate) * up`, or GPT-OSS's clamped SwiGLU `g * sigmoid(alpha * g) * (u + 1)`."""
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def fused_moe_torch(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """`out[t] = sum_k w[t,k] * down_e(act(gate_e(x_t), up_e(x_t)))`, e = local(topk_ids[t,k]).

    Pairs routed to experts that `expert_map` marks non-local (-1) contribute 0. Accumulates in
    fp32; the result is in x.dtype.
    """
    T, H = x.shape
    E_local, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    K = topk_ids.shape[1]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)  # (T, H)
    local = topk_ids.reshape(-1).long()  # (T*K,)
    if expert_map is not None:
        local = expert_map.to(x.device).long()[local]
    pairs = torch.nonzero(local >= 0).squeeze(1)  # (P,) pair indices t*K + k on this worker
    order = torch.argsort(local[pairs], stable=True)
    pairs = pairs[order]  # (P,) grouped by local expert
    counts = torch.bincount(local[pairs], minlength=E_local).tolist()
    tokens = pairs // K  # (P,)
    weights = topk_weights.reshape(-1)[pairs].float()  # (P,)
    xs = x[tokens]  # (P, H)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        h = (xs[rows] @ w_gate_up[e].t()).float()  # (n, 2I)
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        a = activate(h[:, :inter], h[:, inter:], activation, swiglu_limit, swiglu_alpha)
        y = (a.to(x.dtype) @ w_down[e].t()).float()  # (n, H)
        if down_bias is not None:
            y = y + down_bias[e].float()
        out.index_add_(0, tokens[rows], y * weights[rows, None])
    return out.to(x.dtype)


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
fused_moe_triton = fused_moe_torch
