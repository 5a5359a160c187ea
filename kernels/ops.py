"""The public kernel ops. Each checks its arguments, then runs the Triton kernel or the torch
implementation, whichever `backend()` picks for its input; callers never branch on it.

Legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, D head dim,
B sequences, N partial results.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from titanserve.kernels.backend import backend
from titanserve.kernels.cpu_experts import is_packed
from titanserve.kernels.cpu_linear import linear  # noqa: F401 (F.linear, or packed on CPU)
from titanserve.kernels.flash_attn import flash_attn_fwd_torch, flash_attn_fwd_triton
from titanserve.kernels.fused_moe import ACTIVATIONS, fused_moe_torch, fused_moe_triton
from titanserve.kernels.lse_merge import lse_merge_torch, lse_merge_triton
from titanserve.kernels.moe_align import moe_align_torch, moe_align_triton
from titanserve.kernels.paged_decode import paged_decode_attn_torch, paged_decode_attn_triton
from titanserve.kernels.rms_norm import rms_norm_torch, rms_norm_triton
from titanserve.kernels.rotary import rotary_torch, rotary_triton
from titanserve.kernels.topk_gating import SCORINGS, topk_gating_torch, topk_gating_triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require(ok: bool, message: str | Callable[[], str]) -> None:
    """Raise ValueError(message) unless ok. A message that formats shapes is passed as a
    lambda: formatting it on every call cost ~60 µs per fused_moe in a model step (cold
    caches), though it is read only on failure."""
    if not ok:
        raise ValueError(message() if callable(message) else message)


def _triton(t: torch.Tensor) -> bool:
    return backend(t) == "triton"


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., H) (HF semantics). With `residual`: `s = x + residual`, returns
    `(rms_norm(s), s)`."""
    _require(x.dim() >= 1 and weight.shape == x.shape[-1:],
             lambda: f"rms_norm: weight {tuple(weight.shape)} must be (H,) for x {tuple(x.shape)}")
    _require(residual is None or residual.shape == x.shape,
             lambda: f"rms_norm: residual {tuple(residual.shape) if residual is not None else ()} "
             f"must have x's shape {tuple(x.shape)}")
    impl = rms_norm_triton if _triton(x) else rms_norm_torch
    return impl(x, weight, eps, residual)


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Apply rotary embeddings in place to q (T, Hq, D) and k (T, Hk, D) (views allowed)."""
    _require(q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] == positions.shape[0]
             and q.shape[2] == k.shape[2],
             lambda: f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, positions "
             f"{tuple(positions.shape)} must be (T, Hq, D), (T, Hk, D), (T,)")
    _require(not positions.is_floating_point(), "rotary: positions must be an integer tensor")
    R = cos_sin_cache.shape[-1]
    _require(cos_sin_cache.dim() == 2 and R % 2 == 0 and R <= q.shape[2],
             lambda: f"rotary: cos_sin_cache {tuple(cos_sin_cache.shape)} must be (max_pos, R) "
             f"with an even R <= head dim {q.shape[2]}")
    impl = rotary_triton if _triton(q) else rotary_torch
    impl(q, k, positions, cos_sin_cache, is_neox)


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts; returns `(topk_weights (T, K) fp32, topk_ids (T, K) int32)`.
    See `topk_gating_torch` for the exact semantics."""
    _require(router_logits.dim() == 2,
             lambda: f"topk_gating: router_logits {tuple(router_logits.shape)} must be (T, E)")
    E = router_logits.shape[1]
    _require(scoring in SCORINGS,
             lambda: f"topk_gating: scoring {scoring!r} must be one of {SCORINGS}")
    _require(num_groups >= 1 and E % num_groups == 0 and 1 <= topk_groups <= num_groups,
             lambda: f"topk_gating: need num_groups dividing E={E} and 1 <= topk_groups <= "
             f"num_groups, got num_groups={num_groups}, topk_groups={topk_groups}")
    _require(1 <= top_k <= topk_groups * (E // num_groups),
             lambda: f"topk_gating: top_k={top_k} must be in "
             f"[1, {topk_groups * (E // num_groups)}] (experts in the kept groups)")
    _require(correction_bias is None or correction_bias.shape == (E,),
             lambda: f"topk_gating: correction_bias must be ({E},)")
    impl = topk_gating_triton if _triton(router_logits) else topk_gating_torch
    return impl(router_logits, top_k, scoring, renormalize, correction_bias, num_groups,
                topk_groups, routed_scaling_factor)


def moe_align(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group (token, slot) pairs by expert, padded per expert to `block_m`; returns
    `(sorted_ids (P,) int32, block_expert_ids (P // block_m,) int32, num_tokens_post_pad)`."""
    _require(topk_ids.dim() == 2 and not topk_ids.is_floating_point(),
             lambda: f"moe_align: topk_ids {tuple(topk_ids.shape)} must be an integer (T, K) "
             "tensor")
    _require(num_experts >= 1 and block_m >= 1,
             lambda: f"moe_align: need num_experts >= 1 and block_m >= 1, got {num_experts}, "
             f"{block_m}")
    _require(expert_map is None or expert_map.shape == (num_experts,),
             lambda: f"moe_align: expert_map must be ({num_experts},)")
    impl = moe_align_triton if _triton(topk_ids) else moe_align_torch
    return impl(topk_ids, num_experts, block_m, expert_map)


def fused_moe(
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
    """Routed expert MLPs summed with the router weights; returns (T, H) in x.dtype.
    See `fused_moe_torch` for the exact semantics."""
    _require(x.dim() == 2 and w_gate_up.dim() == 3 and w_down.dim() == 3,
             "fused_moe: x must be (T, H), w_gate_up (E, 2I, H), w_down (E, H, I)")
    T, H = x.shape
    E_local, two_i, _ = w_gate_up.shape
    _require(w_gate_up.shape[2] == H and two_i % 2 == 0
             and w_down.shape == (E_local, H, two_i // 2),
             lambda: f"fused_moe: w_gate_up {tuple(w_gate_up.shape)} and w_down "
             f"{tuple(w_down.shape)} must be (E, 2I, {H}) and (E, {H}, I)")
    _require(topk_ids.dim() == 2 and topk_ids.shape[0] == T
             and topk_weights.shape == topk_ids.shape and not topk_ids.is_floating_point(),
             lambda: f"fused_moe: topk_weights {tuple(topk_weights.shape)} and integer topk_ids "
             f"{tuple(topk_ids.shape)} must both be ({T}, K)")
    _require(x.dtype in FLOAT_DTYPES and w_gate_up.dtype == x.dtype == w_down.dtype,
             lambda: f"fused_moe: x and weights must share one of {FLOAT_DTYPES}, got {x.dtype}, "
             f"{w_gate_up.dtype}, {w_down.dtype}")
    _require(activation in ACTIVATIONS,
             lambda: f"fused_moe: activation {activation!r} must be one of {ACTIVATIONS}")
    _require(gate_up_bias is None or gate_up_bias.shape == (E_local, two_i),
             lambda: f"fused_moe: gate_up_bias must be ({E_local}, {two_i})")
    _require(down_bias is None or down_bias.shape == (E_local, H),
             lambda: f"fused_moe: down_bias must be ({E_local}, {H})")
    _require(expert_map is None or expert_map.dim() == 1,
             "fused_moe: expert_map must be (E_global,) global -> local index or -1")
    # Experts packed for oneDNN (kernels.cpu_experts) only run on the torch path.
    impl = fused_moe_triton if _triton(x) and not is_packed(w_gate_up, w_down) else fused_moe_torch
    return impl(x, w_gate_up, w_down, topk_weights, topk_ids, expert_map, activation,
                gate_up_bias, down_bias, swiglu_limit, swiglu_alpha)


def _check_attn_heads(op: str, q: torch.Tensor, Hk: int, D: int) -> None:
    _require(q.shape[-2] % Hk == 0 and q.shape[-1] == D,
             lambda: f"{op}: q {tuple(q.shape)} needs a multiple of Hk={Hk} heads and head dim {D}")


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with lse: q (Tq, Hq, D), k/v (Tk, Hk, D); returns `(out (Tq, Hq, D),
    lse (Tq, Hq) fp32)`. Causal: query i sees key j iff `j <= i + q_offset`."""
    _require(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape,
             lambda: f"flash_attn_fwd: q {tuple(q.shape)} must be (Tq, Hq, D) and k "
             f"{tuple(k.shape)}, v {tuple(v.shape)} both (Tk, Hk, D)")
    _check_attn_heads("flash_attn_fwd", q, k.shape[1], k.shape[2])
    impl = flash_attn_fwd_triton if _triton(q) else flash_attn_fwd_torch
    return impl(q, k, v, causal, q_offset, scale)


def paged_decode_attn(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the paged KV cache; returns `(out (B, Hq, D), lse (B, Hq) fp32)`.
    See `paged_decode_attn_torch` for the layouts."""
    _require(q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
             lambda: f"paged_decode_attn: q {tuple(q.shape)} must be (B, Hq, D), caches "
             f"{tuple(k_cache.shape)} both (num_blocks, block_size, Hk, D)")
    _check_attn_heads("paged_decode_attn", q, k_cache.shape[2], k_cache.shape[3])
    B = q.shape[0]
    _require(block_tables.dim() == 2 and block_tables.shape[0] == B
             and context_lens.shape == (B,),
             lambda: f"paged_decode_attn: block_tables {tuple(block_tables.shape)} and "
             f"context_lens {tuple(context_lens.shape)} must be ({B}, max_blocks) and ({B},)")
    _require(num_splits >= 0, lambda: f"paged_decode_attn: num_splits={num_splits} must be >= 0")
    impl = paged_decode_attn_triton if _triton(q) else paged_decode_attn_torch
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)


def lse_merge(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial attentions: outs (N, T, H, D), lses (N, T, H); returns
    `(out (T, H, D), lse (T, H) fp32)`."""
    _require(outs.dim() == 4 and lses.shape == outs.shape[:3],
             lambda: f"lse_merge: outs {tuple(outs.shape)} and lses {tuple(lses.shape)} must be "
             "(N, T, H, D) and (N, T, H)")
    impl = lse_merge_triton if _triton(outs) else lse_merge_torch
    return impl(outs, lses)
