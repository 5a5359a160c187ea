"""Log-sum-exp merge of partial attention results (split-K chunks, ring steps, KV shards).

Legend: N partial results, T tokens, H heads, D head dim.
"""

from __future__ import annotations

import torch


def lse_merge_torch(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial attentions over disjoint key sets into one; returns `(out (T, H, D),
    lse (T, H) fp32)`.

    A partial with lse = -inf (all its keys masked) has weight 0; when all are -inf the result
    is out = 0, lse = -inf.
    """
    lses = lses.float()  # (N, T, H)
    lse_max = lses.amax(dim=0)  # (T, H)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - lse_max)  # (N, T, H), 0 for masked partials
    w_sum = w.sum(dim=0)  # (T, H)
    lse = lse_max + torch.log(w_sum)  # (T, H), -inf where every partial is masked
    w = w / torch.where(w_sum == 0, torch.ones_like(w_sum), w_sum)  # (N, T, H)
    out = (outs.float() * w[..., None]).sum(dim=0)  # (T, H, D)
    return out.to(outs.dtype), lse


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
lse_merge_triton = lse_merge_torch
