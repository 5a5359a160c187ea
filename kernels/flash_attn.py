"""Flash-attention forward with a log-sum-exp output and causal offsets (prefill chunks over
a cached context, ring-attention steps).

Legend: Tq queries, Tk keys, Hq query heads, Hk kv heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from titanserve.kernels.launch import cdiv, next_pow2, require, require_launchable
from titanserve.kernels.lse_merge import lse_merge_torch

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def dense_attention_with_lse(q, k, v, causal: bool, scale: float):
    """Attention with lse by plain math (for the torch backend on GPU, where SDPA returns no
    lse); q (Tq, Hq, D), k/v (Tk, Hk, D), causal top-left aligned (j <= i)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (Tk, Hq, D)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # (Hq, Tq, Tk)
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Tq)
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), v.float())  # (Tq, Hq, D)
    return out.to(q.dtype), lse.t()


def _sdpa_with_lse(q, k, v, causal: bool, scale: float):
    """Attention with lse, causal top-left aligned: torch's CPU flash kernel (GQA included)."""
    if q.is_cuda:
        return dense_attention_with_lse(q, k, v, causal, scale)
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    out, lse = _cpu_flash(qt, kt, vt, 0.0, causal, scale=scale)  # (1, Hq, Tq, D), (1, Hq, Tq)
    return out[0].transpose(0, 1), lse[0].t()  # (Tq, Hq, D), (Tq, Hq)


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


LOG2E = 1.4426950408889634


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, offs_m, offs_n, offs_d,
    start, stop, Tk, D, q_offset, scale_log2, stride_kt, stride_vt,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of the query block over the key blocks [start, stop). Without MASKED
    every (query, key) pair is seen and no block crosses Tk: no -inf can appear."""
    d_ok = offs_d < D
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kt + k_offs  # (BLOCK_D, BLOCK_N)
        v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vt + v_offs  # (BLOCK_N, BLOCK_D)
        if MASKED:
            col_ok = cols < Tk
            k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + q_offset)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay 0
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = m_new
        p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])  # see core.warmup
def _flash_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    Tq, Tk, Hq, D, group, q_offset, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    # NOTE: pointers are rebuilt per key block from these: pointer tiles carried through both
    # loops made Triton 3.6 spill registers and double the shared memory for sm_90
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    k_offs = offs_n[None, :] * stride_kt + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # keys [0, full) are seen by every query of the block; [full, end) need a mask: the
    # causal diagonal (the block's last query sees keys up to its row + q_offset), Tk's end
    full = Tk
    end = Tk
    if CAUSAL:
        full = tl.maximum(tl.minimum(Tk, pid_m * BLOCK_M + q_offset + 1), 0)
        end = tl.minimum(Tk, tl.minimum(Tq, (pid_m + 1) * BLOCK_M) + q_offset)
    full = full // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, offs_m, offs_n, offs_d, 0, full, Tk, D,
        q_offset, scale_log2, stride_kt, stride_vt, CAUSAL, False, EVEN_D, PRECISION, BLOCK_N)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, offs_m, offs_n, offs_d, full, end, Tk,
        D, q_offset, scale_log2, stride_kt, stride_vt, CAUSAL, True, EVEN_D, PRECISION, BLOCK_N)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), lse2 * 0.6931471805599453)  # log2 -> natural log
    rows = offs_m.to(tl.int64) * Hq + head
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows, lse, mask=m_ok)


def _launch_config(Tq: int, block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper. Short Tq (chunks, ring steps)
    gets query blocks of its size, not 128 rows of padding. At 16-bit and D <= 128, three
    K/V stages fit shared memory (D=128: Q 32 KiB + 2 x 3 x 16 KiB, of 227 KiB); fp32 and
    larger head dims take two stages, fp32 half-height key blocks (its dot runs on FMAs)."""
    block_m = 128 if Tq >= 128 else min(64, max(16, next_pow2(Tq)))
    if elem_bytes == 2 and block_d <= 128:
        return block_m, 64, 8 if block_m == 128 and block_d > 64 else 4, 3
    return min(block_m, 64), 32 if elem_bytes == 4 else 64, 8 if block_d >= 128 else 4, 2


def flash_attn_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `flash_attn_fwd_torch`: one program per (BLOCK_M queries, query head), online
    softmax over the key blocks every query sees (unmasked), then over the masked ones (the
    causal diagonal, the end of Tk). `block_m`/`block_n` override the launch config."""
    require_launchable("flash_attn_fwd", q, k, v)
    require(q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1,
            "flash_attn_fwd: q, k and v need a contiguous head dim")
    require(q.dtype == k.dtype == v.dtype, "flash_attn_fwd: q, k and v must share a dtype")
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(Tq, Hq, D, dtype=q.dtype, device=q.device)  # (Tq, Hq, D)
    lse = torch.empty(Tq, Hq, dtype=torch.float32, device=q.device)  # (Tq, Hq)
    if Tq == 0:
        return out, lse
    block_d = max(16, next_pow2(D))
    config_m, config_n, num_warps, num_stages = _launch_config(Tq, block_d, q.element_size())
    block_m, block_n = block_m or config_m, block_n or config_n
    _flash_attn_kernel[(cdiv(Tq, block_m), Hq)](
        q, k, v, out, lse, Tq, Tk, Hq, D, Hq // Hk, q_offset, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        EVEN_D=D == block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
