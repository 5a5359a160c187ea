"""Top-k expert gating for MoE routers: softmax (Mixtral, Qwen-MoE, OLMoE, GPT-OSS) and
sigmoid with a correction bias and group-limited selection (DeepSeek-V3).

Legend: T tokens, E experts, G expert groups, K top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanserve.kernels.launch import next_pow2, require_launchable

SCORINGS = ("softmax", "sigmoid")


def _group_mask(choice: torch.Tensor, num_groups: int, topk_groups: int, top2: bool):
    """Bool (T, E): experts in the `topk_groups` best groups of each token."""
    T, E = choice.shape
    grouped = choice.view(T, num_groups, E // num_groups)  # (T, G, E/G)
    if top2:  # DeepSeek-V3: a group scores the sum of its two best experts
        group_scores = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(-1)  # (T, G)
    else:  # DeepSeek-V2 group_limited_greedy: a group scores its best expert
        group_scores = grouped.amax(dim=-1)  # (T, G)
    kept = group_scores.topk(topk_groups, dim=-1).indices  # (T, topk_groups)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return group_mask.repeat_interleave(E // num_groups, dim=1)  # (T, E)


def topk_gating_torch(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `top_k` experts per token; returns `(topk_weights (T, K) fp32, topk_ids (T, K) int32)`.

    Scores are softmax or sigmoid of the fp32 logits. Experts are chosen by `scores +
    correction_bias` among the `topk_groups` best of `num_groups` groups (group score: sum of
    the top-2 choice scores for sigmoid, the best one for softmax); the weights are the scores
    (not the choice values) of the chosen experts, optionally renormalised to sum to 1, then
    multiplied by `routed_scaling_factor`. Ids come in descending order of choice value.
    """
    logits = router_logits.float()  # (T, E)
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()  # (T, E)
    choice = scores if correction_bias is None else scores + correction_bias.float()  # (T, E)
    if num_groups > 1:
        keep = _group_mask(choice, num_groups, topk_groups, top2=scoring == "sigmoid")
        choice = choice.masked_fill(~keep, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices  # (T, K)
    topk_weights = scores.gather(1, topk_ids)  # (T, K)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)



@triton.jit
def _topk_gating_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    E, stride_t, group_size, routed_scaling_factor,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + row * stride_t + offs, mask=valid, other=float("-inf"))
    x = x.to(tl.float32)
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(x), 0.0)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        scores = e / tl.sum(e, axis=0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))

    if NUM_GROUPS > 1:  # keep the TOPK_GROUPS best groups (ties: lowest group index)
        group = offs // group_size
        offs_g = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where(group == g, choice, float("-inf"))
            best = tl.max(in_group, axis=0)
            score = best
            if SIGMOID:  # plus the second best (when the group has one)
                first = tl.min(tl.where(in_group == best, offs, BLOCK_E), axis=0)
                second = tl.max(tl.where(offs == first, float("-inf"), in_group), axis=0)
                score += tl.where(second > float("-inf"), second, 0.0)
            group_scores = tl.where(offs_g == g, score, group_scores)
        kept = offs_g < 0
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.max(tl.where(kept, float("-inf"), group_scores), axis=0)
            first = tl.min(tl.where((group_scores == best) & ~kept, offs_g, BLOCK_G), axis=0)
            kept = kept | (offs_g == first)
        keep = offs < 0
        for g in tl.static_range(NUM_GROUPS):
            keep = keep | ((group == g) & (tl.sum(tl.where(kept & (offs_g == g), 1, 0)) > 0))
        choice = tl.where(keep, choice, float("-inf"))

    offs_k = tl.arange(0, BLOCK_K)
    topk_w = tl.zeros((BLOCK_K,), tl.float32)
    topk_i = tl.zeros((BLOCK_K,), tl.int32)
    for k in tl.static_range(TOP_K):  # ties: lowest expert index first
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, offs, BLOCK_E), axis=0)
        w = tl.sum(tl.where(offs == idx, scores, 0.0), axis=0)
        topk_w = tl.where(offs_k == k, w, topk_w)
        topk_i = tl.where(offs_k == k, idx, topk_i)
        choice = tl.where(offs == idx, float("-inf"), choice)
    if RENORMALIZE:
        topk_w = topk_w / tl.sum(topk_w, axis=0)
    topk_w = topk_w * routed_scaling_factor
    tl.store(weights_ptr + row * TOP_K + offs_k, topk_w, mask=offs_k < TOP_K)
    tl.store(ids_ptr + row * TOP_K + offs_k, topk_i, mask=offs_k < TOP_K)


def topk_gating_triton(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `topk_gating_torch`: one program per token. Unlike torch.topk (whose tie order
    is unspecified), ties go to the lowest expert index."""
    require_launchable("topk_gating", router_logits, correction_bias)
    T, E = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)  # (T, K)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)  # (T, K)
    if T == 0:
        return weights, ids
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    _topk_gating_kernel[(T,)](
        logits, bias, weights, ids, E, logits.stride(0), E // num_groups,
        float(routed_scaling_factor), TOP_K=top_k, SIGMOID=scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize,
        NUM_GROUPS=num_groups, TOPK_GROUPS=topk_groups, BLOCK_E=next_pow2(E),
        BLOCK_G=next_pow2(num_groups), BLOCK_K=next_pow2(top_k),
    )
    return weights, ids
