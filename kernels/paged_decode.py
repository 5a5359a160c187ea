"""Decode attention over the paged KV cache: one query token per sequence.

Legend: B sequences, Hq query heads, Hk kv heads, G = Hq // Hk, D head dim,
L = max_blocks * block_size key slots.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from titanserve.kernels.launch import cdiv, next_pow2, require, require_launchable
from titanserve.kernels.lse_merge import lse_merge_triton


def paged_decode_attn_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's query over its first `context_lens[b]` cached keys;
    returns `(out (B, Hq, D) in q.dtype, lse (B, Hq) fp32)`.

    `k_cache`/`v_cache` are (num_blocks, block_size, Hk, D), `block_tables` (B, max_blocks)
    maps a sequence's logical blocks to cache blocks. A sequence with context 0 gets out = 0,
    lse = -inf. `num_splits` only matters to the Triton kernel.
    """
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    flat = block_tables.long().flatten()  # index_select: several times faster than k_cache[t]
    L = block_tables.shape[1] * k_cache.shape[1]
    k = k_cache.index_select(0, flat).view(B, L, Hk, D)  # (B, L, Hk, D)
    v = v_cache.index_select(0, flat).view(B, L, Hk, D)  # (B, L, Hk, D)
    if q.device.type == "cpu" and B > 0 and k.shape[1] > 0:
        return _cpu_flash_decode(q, k, v, context_lens, scale)
    qg = q.reshape(B, Hk, Hq // Hk, D).float()  # (B, Hk, G, D)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale  # (B, Hk, G, L)
    slots = torch.arange(k.shape[1], device=q.device)  # (L,)
    masked = slots[None, :] >= context_lens.to(q.device).long()[:, None]  # (B, L)
    s = s.masked_fill(masked[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hk, G), -inf for empty contexts
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhgl,blhd->bhgd", p, v.float())  # (B, Hk, G, D)
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)



def _cpu_flash_decode(q, k, v, context_lens, scale):
    """The CPU path: torch's flash kernel (native GQA, strided K/V, lse) with a length mask."""
    B, Hq, D = q.shape
    lens = context_lens.to(q.device).long()  # (B,)
    slots = torch.arange(k.shape[1], device=q.device)  # (L,)
    # a row with no context would be all -inf: give it one key, then zero it below
    visible = slots[None, :] < lens.clamp(min=1)[:, None]  # (B, L)
    bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=bias[:, None, None, :], scale=scale,
    )  # (B, Hq, 1, D), (B, Hq, 1)
    out, lse = out.squeeze(2), lse.squeeze(2).float()
    empty = lens == 0
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    B, Hq, D, group, block_size, keys_per_split, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (sequence, kv head, split): the G query heads of the kv head over the split's keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * keys_per_split
    end = tl.minimum(context_len, start + keys_per_split)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    g_ok = offs_g < group
    d_ok = offs_d < D
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for first in range(start, end, BLOCK_N):
        keys = first + offs_n
        key_ok = keys < end
        page = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + keys // block_size,
                       mask=key_ok, other=0).to(tl.int64)
        slot = (keys % block_size).to(tl.int64)
        k_off = page * stride_kb + slot * stride_ks + kv_head * stride_kh  # (BLOCK_N,)
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None],
                    mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # m_new is finite: every tile has a valid key
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page * stride_vb + slot * stride_vs + kv_head * stride_vh  # (BLOCK_N,)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), lse2 * 0.6931471805599453)  # log2 -> natural log
    rows = (split * B + seq).to(tl.int64) * Hq + heads  # partials are (splits, B, Hq)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out,
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows, lse, mask=g_ok)


def choose_num_splits(B: int, Hk: int, max_keys: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, none shorter than 256 keys."""
    sms = 4
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(2 * sms, max(1, B * Hk)), cdiv(max_keys, 256)))


def paged_decode_attn_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int = 0,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `paged_decode_attn_torch`: split-K over the context (num_splits 0 = choose),
    each split's partial result merged with `lse_merge_triton`."""
    require_launchable("paged_decode_attn", q, k_cache, v_cache, block_tables, context_lens)
    require(q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1,
            "paged_decode_attn: q and the caches need a contiguous head dim")
    require(q.dtype == k_cache.dtype == v_cache.dtype,
            "paged_decode_attn: q and the caches must share a dtype")
    B, Hq, D = q.shape
    _, block_size, Hk, _ = k_cache.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    max_keys = block_tables.shape[1] * block_size
    splits = num_splits or choose_num_splits(B, Hk, max_keys, q.device)
    keys_per_split = cdiv(cdiv(max_keys, splits), block_n) * block_n
    part_out = torch.empty(splits, B, Hq, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(splits, B, Hq, dtype=torch.float32, device=q.device)
    if B > 0:
        group = Hq // Hk
        _paged_decode_kernel[(B, Hk, splits)](
            q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse,
            B, Hq, D, group, block_size, keys_per_split, scale * LOG2E,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_tables.stride(0), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        )
    if splits == 1:
        return part_out[0].to(q.dtype), part_lse[0]
    out, lse = lse_merge_triton(part_out, part_lse)
    return out.to(q.dtype), lse
