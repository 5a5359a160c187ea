"""Log-sum-exp merge of partial attention results (split-K chunks, ring steps, KV shards).

Legend: N partial results, T tokens, H heads, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanserve.kernels.launch import cdiv, next_pow2, require_launchable


def lse_merge_torch(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial attentions over disjoint key sets into one; returns `(out (T, H, D),
    lse (T, H) fp32)`.

    A partial with lse = -inf (all its keys masked) has weight 0; when all are -inf the result
    is out = 0, lse = -inf.
    """
    lses = lses.float()  # (N, T, H)
    lse_max = lses.amax(dim=0)  # (T, H)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - lse_max)  # (N, T, H), 0 for masked partials
    w_sum = w.sum(dim=0)  # (T, H)
    lse = lse_max + torch.log(w_sum)  # (T, H), -inf where every partial is masked
    w = w / torch.where(w_sum == 0, torch.ones_like(w_sum), w_sum)  # (N, T, H)
    out = (outs.float() * w[..., None]).sum(dim=0)  # (T, H, D)
    return out.to(outs.dtype), lse



@triton.jit(do_not_specialize=["N", "num_rows"])  # see core.warmup
def _lse_merge_kernel(
    outs_ptr, lses_ptr, out_ptr, lse_ptr, N, num_rows, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    weight_sum = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    lse_ptrs = lses_ptr + rows
    o_ptrs = outs_ptr + rows[:, None] * D + offs_d[None, :]
    for _ in range(N):  # online: rescale what was merged so far to the running max lse
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf")).to(tl.float32)
        o = tl.load(o_ptrs, mask=mask, other=0.0)
        lse_ptrs += num_rows
        o_ptrs += num_rows * D
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        weight_sum = weight_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o.to(tl.float32)
        m = m_new
    empty = weight_sum == 0.0
    out = acc / tl.where(empty, 1.0, weight_sum)[:, None]
    lse_out = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, weight_sum)))
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(lse_ptr + rows, lse_out, mask=row_ok)


def lse_merge_triton(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `lse_merge_torch`: each program merges BLOCK_R (token, head) rows over the N
    partials in one pass."""
    require_launchable("lse_merge", outs, lses)
    N, T, H, D = outs.shape
    outs = outs.contiguous()
    lses = lses.contiguous()
    out = torch.empty(T, H, D, dtype=outs.dtype, device=outs.device)  # (T, H, D)
    lse = torch.empty(T, H, dtype=torch.float32, device=outs.device)  # (T, H)
    num_rows = T * H
    if num_rows == 0 or D == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_d = next_pow2(D)
    block_r = max(1, min(64, 4096 // block_d))  # not from num_rows: one compile per D
    _lse_merge_kernel[(cdiv(num_rows, block_r),)](
        outs, lses, out, lse, N, num_rows, D, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out, lse
