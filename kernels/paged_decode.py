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

# exp() below this gives a subnormal or 0, which torch's vectorised CPU exp computes ~20x
# slower; a key e^87 times less likely than the best one counts as e^-87 instead of less.
EXP_FLOOR = -87.0


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The pages of `block_tables` (B, max_blocks) out of a (num_blocks, block_size, Hk, D)
    cache, as one (Hk, B, L, D) tensor, L = max_blocks * block_size.

    Fast when the cache is head-major in memory (a (Hk, num_blocks, block_size, D) tensor, or
    the page-transposed (Hk, num_blocks, D, block_size) one, seen through a permute, as the KV
    cache allocates them): one row copy per (head, page). Any other layout gives the same
    values through a strided copy.
    """
    num_blocks, block_size, Hk, D = cache.shape
    B, max_blocks = block_tables.shape
    flat = block_tables.reshape(-1).long()  # (B * max_blocks,)
    heads = torch.arange(Hk, device=cache.device) * num_blocks  # (Hk,)
    rows = (heads[:, None] + flat[None, :]).reshape(-1)  # (Hk * B * max_blocks,)
    pages = cache.permute(2, 0, 1, 3)  # (Hk, num_blocks, block_size, D)
    transposed = cache.permute(2, 0, 3, 1)  # (Hk, num_blocks, D, block_size)
    if pages.is_contiguous():
        out = pages.reshape(Hk * num_blocks, block_size * D).index_select(0, rows)
    elif transposed.is_contiguous():
        out = transposed.reshape(Hk * num_blocks, D * block_size).index_select(0, rows)
        out = out.view(Hk, B * max_blocks, D, block_size).transpose(-1, -2).contiguous()
    else:
        out = pages.index_select(1, flat)
    return out.view(Hk, B, max_blocks * block_size, D)


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

    `k_cache`/`v_cache` are (num_blocks, block_size, Hk, D) (any strides), `block_tables`
    (B, max_blocks) maps a sequence's logical blocks to cache blocks. A sequence with context 0
    gets out = 0, lse = -inf. `num_splits` only matters to the Triton kernel. Computed in fp32
    as two batched matmuls over the gathered pages (on CPU several times faster than SDPA's
    flash kernel on one query row); sequences of very different lengths are done in groups of
    similar length so that short ones do not gather the long ones' padding.
    """
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    groups = _length_groups(context_lens, k_cache.shape[1])
    if groups is None:
        return _decode_group(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(q)  # (B, Hq, D)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # (B, Hq)
    for rows, width in groups:
        group_out, group_lse = _decode_group(
            q[rows], k_cache, v_cache, block_tables[rows, :width], context_lens[rows], scale
        )
        out[rows], lse[rows] = group_out, group_lse
    return out, lse


MIN_GROUP = 16  # sequences per length group
MAX_GROUPS = 4


def _length_groups(context_lens: torch.Tensor, block_size: int):
    """[(rows, blocks needed)] for up to MAX_GROUPS groups of sequences sorted by length, or
    None when one padded batch wastes little (under a quarter of the keys it reads)."""
    B = context_lens.shape[0]
    num_groups = min(MAX_GROUPS, B // MIN_GROUP)
    if num_groups < 2:
        return None
    lens = context_lens.long().cpu()
    longest = int(lens.max())
    if longest * B * 3 <= int(lens.sum()) * 4:
        return None
    order = torch.argsort(lens)
    groups = []
    for rows in order.chunk(num_groups):
        width = max(1, -(-int(lens[rows].max()) // block_size))
        groups.append((rows.to(context_lens.device), width))
    return groups


def _decode_group(q, k_cache, v_cache, block_tables, context_lens, scale):
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    keys = gather_pages(k_cache, block_tables).float()  # (Hk, B, L, D)
    values = gather_pages(v_cache, block_tables).float()  # (Hk, B, L, D)
    qg = q.reshape(B, Hk, Hq // Hk, D).transpose(0, 1).float()  # (Hk, B, G, D)
    s = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale)  # (Hk, B, G, L)
    slots = torch.arange(keys.shape[2], device=q.device)  # (L,)
    hidden = slots[None, :] >= context_lens.to(q.device).long()[:, None]  # (B, L)
    s.masked_fill_(hidden[None, :, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (Hk, B, G, 1), -inf for empty contexts
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = s.sub_(m).clamp_(min=EXP_FLOOR).exp_()  # (Hk, B, G, L)
    p.masked_fill_(hidden[None, :, None, :], 0.0)
    denom = p.sum(dim=-1, keepdim=True)  # (Hk, B, G, 1), 0 for empty contexts
    out = torch.matmul(p, values).div_(denom.masked_fill(denom == 0, 1.0))  # (Hk, B, G, D)
    lse = (m + denom.log()).squeeze(-1)  # (Hk, B, G)
    return (
        out.transpose(0, 1).reshape(B, Hq, D).to(q.dtype),
        lse.transpose(0, 1).reshape(B, Hq),
    )


LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["B", "stride_bt"])  # see core.warmup
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
    B, Hq, D, group, block_size, keys_per_split, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
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
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # m_new is finite: every tile has a valid key
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page * stride_vb + slot * stride_vs + kv_head * stride_vh  # (BLOCK_N,)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :] * stride_vd,
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
    require(q.stride(2) == 1, "paged_decode_attn: q needs a contiguous head dim")
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
            q.stride(0), q.stride(1), *k_cache.stride(), *v_cache.stride(),
            block_tables.stride(0), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        )
    if splits == 1:
        return part_out[0].to(q.dtype), part_lse[0]
    out, lse = lse_merge_triton(part_out, part_lse)
    return out.to(q.dtype), lse
