"""MoE token alignment: group (token, slot) pairs by expert, each expert's run padded to a
multiple of the GEMM block so that every block of rows belongs to one expert.

Legend: T tokens, K top-k, E experts (global), P padded pair slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanserve.kernels.launch import next_pow2, require_launchable


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



@triton.jit(do_not_specialize=["num_pairs"])  # see core.warmup
def _count_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    hits = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        hits += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(hits, axis=0))


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(
    ids_ptr, counts_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ids_ptr,
    num_pairs, num_experts, block_m,
    HAS_MAP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    expert = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)
    padded = (counts + block_m - 1) // block_m * block_m
    start = tl.sum(tl.where(offs_e < expert, padded, 0), axis=0)
    num_blocks = tl.sum(tl.where(offs_e == expert, padded, 0), axis=0) // block_m
    local = expert
    if HAS_MAP:
        local = tl.load(expert_map_ptr + expert).to(tl.int32)
    for b in range(0, num_blocks, BLOCK):
        offs_b = b + tl.arange(0, BLOCK)
        tl.store(block_expert_ids_ptr + start // block_m + offs_b,
                 tl.zeros((BLOCK,), tl.int32) + local, mask=offs_b < num_blocks)
    seen = tl.zeros((), tl.int32)
    for base in range(0, num_pairs, BLOCK):  # keeps pairs in ascending order within the expert
        offs = base + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)
        rank = seen + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ids_ptr + start + rank, offs, mask=hit > 0)
        seen += tl.sum(hit, axis=0)


def align_blocks(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton alignment without a host sync: `(sorted_ids, block_expert_ids, padded_counts
    (E,) int32)`, where padded_counts[e] is expert e's run length."""
    require_launchable("moe_align", topk_ids, expert_map)
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    P = max_padded_pairs(num_pairs, num_experts, block_m)
    ids = topk_ids.reshape(-1).to(torch.int32)  # (T*K,)
    sorted_ids = torch.full((P,), num_pairs, dtype=torch.int32, device=device)
    block_expert_ids = torch.full((P // block_m,), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)  # (E,)
    if num_pairs > 0:
        block = 1024  # not from num_pairs: one compile whatever the batch (see core.warmup)
        _count_kernel[(num_experts,)](ids, counts, num_pairs, BLOCK=block)
        _scatter_kernel[(num_experts,)](
            ids, counts, expert_map if expert_map is not None else ids, sorted_ids,
            block_expert_ids, num_pairs, num_experts, block_m,
            HAS_MAP=expert_map is not None, BLOCK=block, BLOCK_E=next_pow2(num_experts),
        )
    return sorted_ids, block_expert_ids, (counts + block_m - 1) // block_m * block_m


def moe_align_triton(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Triton `moe_align_torch`: a counting pass and a stable scatter pass, one program per
    expert."""
    sorted_ids, block_expert_ids, padded = align_blocks(topk_ids, num_experts, block_m, expert_map)
    return sorted_ids, block_expert_ids, int(padded.sum())
