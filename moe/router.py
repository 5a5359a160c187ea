"""Routers: one function per gating kind. Each returns (weights (T, K) fp32, ids (T, K) int32)."""

from __future__ import annotations

import torch

from titanserve.core.config import ModelConfig
from titanserve.kernels import ops


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Mixtral (renormalised), Qwen2-MoE (`norm_topk_prob`), Qwen3-MoE, OLMoE."""
    return ops.topk_gating(router_logits, top_k, scoring="softmax", renormalize=renormalize)


def sigmoid_group_topk(
    router_logits: torch.Tensor,
    top_k: int,
    correction_bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    routed_scaling_factor: float,
):
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited selection."""
    return ops.topk_gating(
        router_logits,
        top_k,
        scoring="sigmoid",
        renormalize=renormalize,
        correction_bias=correction_bias,
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
    )


def route(cfg: ModelConfig, router_logits: torch.Tensor):
    """Dispatch on the model's router kind."""
    if cfg.router_scoring == "softmax":
        return softmax_topk(router_logits, cfg.top_k, cfg.norm_topk_prob)
    raise ValueError(f"router scoring {cfg.router_scoring!r} is not wired to a model family yet")
