"""Flash-attention forward with a log-sum-exp output and causal offsets (prefill chunks over
a cached context, ring-attention steps).

Legend: Tq queries, Tk keys, Hq query heads, Hk kv heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from titanserve.kernels.lse_merge import lse_merge_torch

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_with_lse(q, k, v, causal: bool, scale: float):
    """torch's flash kernel with lse; q (Tq, Hq, D), k/v (Tk, Hq, D), causal top-left aligned."""
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    if q.is_cuda:  # only when the torch backend is forced on GPU: no lse from SDPA there
        s = torch.einsum("hqd,hkd->hqk", qt[0].float(), kt[0].float()) * scale  # (H, Tq, Tk)
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (H, Tq)
        out = torch.einsum("hqk,hkd->qhd", torch.exp(s - lse[..., None]), vt[0].float())
        return out.to(q.dtype), lse.t()
    out, lse = _cpu_flash(qt, kt, vt, 0.0, causal, scale=scale)  # (1, H, Tq, D), (1, H, Tq)
    return out[0].transpose(0, 1), lse[0].t()  # (Tq, H, D), (Tq, H)


def flash_attn_fwd_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v; returns `(out (Tq, Hq, D) in q.dtype, lse (Tq, Hq) fp32)`.

    GQA: query head h reads kv head `h // (Hq // Hk)`. With `causal`, query i sees key j iff
    `j <= i + q_offset`. A query that sees no key gets out = 0 and lse = -inf.
    """
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = q.new_zeros(Tq, Hq, D)  # (Tq, Hq, D)
    lse = torch.full((Tq, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    first = max(0, -q_offset) if causal else 0  # queries before `first` see no key
    if Tk == 0 or first >= Tq:
        return out, lse
    if Hk != Hq:
        k = k.repeat_interleave(Hq // Hk, dim=1)  # (Tk, Hq, D)
        v = v.repeat_interleave(Hq // Hk, dim=1)  # (Tk, Hq, D)
    qs = q[first:]  # (Tq', Hq, D), query i' = i - first sees keys j <= i' + max(q_offset, 0)
    offset = max(q_offset, 0)
    if not causal or offset >= Tk:
        o, lse_part = _sdpa_with_lse(qs, k, v, False, scale)
    elif offset == 0:
        o, lse_part = _sdpa_with_lse(qs, k, v, True, scale)
    else:  # keys [0, offset) are seen by every query; the rest is causal top-left
        o1, l1 = _sdpa_with_lse(qs, k[:offset], v[:offset], False, scale)
        o2, l2 = _sdpa_with_lse(qs, k[offset:], v[offset:], True, scale)
        o, lse_part = lse_merge_torch(torch.stack((o1, o2)), torch.stack((l1, l2)))
    out[first:] = o
    lse[first:] = lse_part
    return out, lse


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
flash_attn_fwd_triton = flash_attn_fwd_torch
