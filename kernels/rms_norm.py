"""RMSNorm with an optional fused residual add (HF semantics).

Legend: T tokens (all leading dims flattened), H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from titanserve.kernels.launch import next_pow2, require, require_launchable


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
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, same math
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()  # (..., H)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)  # (..., H)



@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    H, stride_x, stride_r, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + r
        tl.store(sum_ptr + row * H + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `rms_norm_torch`: one program per row, the residual add fused."""
    require_launchable("rms_norm", x, weight, residual)
    H = x.shape[-1]
    require(x.stride(-1) == 1 and weight.is_contiguous(),
            "rms_norm: x's last dim and weight must be contiguous")
    x2 = x.reshape(-1, H)  # (T, H)
    r2 = residual.reshape(-1, H) if residual is not None else x2  # (T, H)
    require(r2.stride(-1) == 1, "rms_norm: residual's last dim must be contiguous")
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x2) if residual is not None else out  # (T, H)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, s, H, x2.stride(0), r2.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK_H=next_pow2(H),
            num_warps=min(16, max(4, next_pow2(H) // 1024)),
        )
    out = out.view(x.shape)
    return (out, s.view(x.shape)) if residual is not None else out
