"""Decode attention over the paged KV cache: one query token per sequence.

Legend: B sequences, Hq query heads, Hk kv heads, G = Hq // Hk, D head dim,
L = max_blocks * block_size key slots.
"""

from __future__ import annotations

import math

import torch


def paged_decode_attn_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query over its first `context_lens[b]` cached keys;
    returns `(out (B, Hq, D) in q.dtype, lse (B, Hq) fp32)`.

    `k_cache`/`v_cache` are (num_blocks, block_size, Hk, D), `block_tables` (B, max_blocks)
    maps a sequence's logical blocks to cache blocks. A sequence with context 0 gets out = 0,
    lse = -inf. `num_splits` only matters to the Triton kernel.
    """
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tables = block_tables.long()
    k = k_cache[tables].flatten(1, 2)  # (B, L, Hk, D)
    v = v_cache[tables].flatten(1, 2)  # (B, L, Hk, D)
    qg = q.reshape(B, Hk, Hq // Hk, D).float()  # (B, Hk, G, D)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale  # (B, Hk, G, L)
    slots = torch.arange(k.shape[1], device=q.device)  # (L,)
    masked = slots[None, :] >= context_lens.to(q.device).long()[:, None]  # (B, L)
    s = s.masked_fill(masked[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hk, G), -inf for empty contexts
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhgl,blhd->bhgd", p, v.float())  # (B, Hk, G, D)
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
paged_decode_attn_triton = paged_decode_attn_torch
