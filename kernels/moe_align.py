"""MoE token alignment: group (token, slot) pairs by expert, each expert's run padded to a
multiple of the GEMM block so that every block of rows belongs to one expert.

Legend: T tokens, K top-k, E experts (global), P padded pair slots.
"""

from __future__ import annotations

import torch


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound P on the padded length: every expert may waste up to block_m - 1 slots."""
    return -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m


def moe_align_torch(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sort the flat pair indices `t*K + k` by expert; returns `(sorted_ids (P,) int32,
    block_expert_ids (P // block_m,) int32, num_tokens_post_pad)`.

    Within an expert, pairs keep ascending order. Each expert's run is padded to a multiple of
    `block_m` with the value T*K. `block_expert_ids[b]` is the local index of block b's expert
    (`expert_map[e]`, or e without a map), -1 for experts that are not local and for the
    unused blocks past `num_tokens_post_pad`.
    """
    num_pairs = topk_ids.numel()
    P = max_padded_pairs(num_pairs, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # (T*K,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    ends = padded.cumsum(0)  # (E,)
    starts = ends - padded  # (E,)
    order = torch.argsort(flat, stable=True)  # (T*K,) pairs grouped by expert
    sorted_expert = flat[order]  # (T*K,)
    first_in_sorted = counts.cumsum(0) - counts  # (E,) where each expert's pairs begin
    rank = torch.arange(num_pairs, device=device) - first_in_sorted[sorted_expert]  # (T*K,)
    sorted_ids = torch.full((P,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[starts[sorted_expert] + rank] = order.to(torch.int32)

    num_tokens_post_pad = int(ends[-1]) if num_experts > 0 else 0
    block_starts = torch.arange(0, num_tokens_post_pad, block_m, device=device)  # (used blocks,)
    block_experts = torch.searchsorted(ends, block_starts, right=True)  # (used blocks,)
    if expert_map is not None:
        block_experts = expert_map.to(device).long()[block_experts]
    block_expert_ids = torch.full((P // block_m,), -1, dtype=torch.int32, device=device)
    block_expert_ids[: block_experts.numel()] = block_experts.to(torch.int32)
    return sorted_ids, block_expert_ids, num_tokens_post_pad


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
moe_align_triton = moe_align_torch
