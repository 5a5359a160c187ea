"""Top-k expert gating for MoE routers: softmax (Mixtral, Qwen-MoE, OLMoE, GPT-OSS) and
sigmoid with a correction bias and group-limited selection (DeepSeek-V3).

Legend: T tokens, E experts, G expert groups, K top-k.
"""

from __future__ import annotations

import torch

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


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
topk_gating_triton = topk_gating_torch
