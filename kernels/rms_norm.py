"""RMSNorm with an optional fused residual add (HF semantics).

Legend: T tokens (all leading dims flattened), H hidden.
"""

from __future__ import annotations

import torch


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * (x * rsqrt(mean(x^2) + eps))`, the norm computed in fp32 and cast to x.dtype.

    With `residual`, first `s = x + residual` (in x.dtype) and return `(rms_norm(s), s)`.
    """
    if residual is not None:
        s = x + residual  # (..., H)
        return rms_norm_torch(s, weight, eps), s
    xf = x.float()  # (..., H)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)  # (..., H)


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
rms_norm_triton = rms_norm_torch
