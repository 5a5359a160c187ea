"""Decode attention on CPU that reads the paged KV cache in place, through `embedding_bag`.

Gathering a decode batch's pages (`gather_pages`) writes a copy of every key and value the
batch attends to and reads it back; on CPU that copy costs more than the attention itself.
Both products of decode attention are weighted sums of cache rows, which is what
`embedding_bag(mode="sum", per_sample_weights=...)` computes straight from the cache:

* scores: q . k over a page's keys is the sum over d of q[d] * (row d of the page's K^T), so
  keys are stored page-transposed, one row of `block_size` keys per (kv head, page, d);
* output: the sum over keys of p[key] * v[key], so values stay one row of D per key.

Legend: B sequences, Hq query heads, Hk kv heads, G = Hq // Hk, D head dim, P pages per
sequence (padded), bs block size, L = P * bs key slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanserve.kernels.paged_decode import length_groups


@dataclass(frozen=True)
class RowGroup:
    """The cache rows a group of similar-length decode sequences reads."""

    seqs: torch.Tensor | None  # (b,) int64 rows of the batch, None for the whole batch
    key_rows: torch.Tensor  # (Hk * b * G * P, D) int32: rows of the keys' (Hk*blocks*D, bs) view
    value_rows: torch.Tensor  # (Hk * b * G, L) int32: rows of the values' (Hk*blocks*bs, D) view
    hidden: torch.Tensor  # (b, L) bool: slots past each sequence's context


@dataclass(frozen=True)
class DecodeRows:
    """The cache rows one decode batch reads, built once per step and used by every layer."""

    groups: list[RowGroup]
    group: int  # G query heads per kv head


def decode_rows(
    block_tables: torch.Tensor,  # (B, P) int, pages past a context may hold any valid block
    context_lens: torch.Tensor,  # (B,) int
    num_kv_heads: int,
    group: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
) -> DecodeRows:
    """Index the rows `paged_decode_attn_rows` reads for this batch (layer independent).
    Sequences of very different lengths are split into groups of similar length, so that
    short ones do not read the long ones' padding."""
    layout = (num_kv_heads, group, num_blocks, block_size, head_dim)
    split = length_groups(context_lens, block_size)
    if split is None:
        return DecodeRows([_row_group(None, block_tables, context_lens, *layout)], group)
    return DecodeRows(
        [
            _row_group(seqs, block_tables[seqs, :width], context_lens[seqs], *layout)
            for seqs, width in split
        ],
        group,
    )


def _row_group(seqs, block_tables, context_lens, Hk, G, num_blocks, bs, D) -> RowGroup:
    B, P = block_tables.shape
    pages = torch.arange(Hk)[:, None, None] * num_blocks + block_tables.long()[None]  # (Hk,B,P)
    key_rows = (pages[:, :, None, :, None] * D + torch.arange(D)).expand(Hk, B, G, P, D)
    slots = torch.arange(P * bs)  # (L,)
    value_rows = pages[:, :, slots // bs] * bs + slots % bs  # (Hk, B, L)
    value_rows = value_rows[:, :, None, :].expand(Hk, B, G, P * bs)
    return RowGroup(
        seqs=seqs,
        key_rows=key_rows.reshape(-1, D).int(),
        value_rows=value_rows.reshape(-1, P * bs).int(),
        hidden=slots[None, :] >= context_lens.long()[:, None],
    )


def paged_decode_attn_rows(
    q: torch.Tensor,  # (B, Hq, D)
    key_pages: torch.Tensor,  # (Hk, num_blocks, D, bs) contiguous: page-transposed keys
    value_pages: torch.Tensor,  # (Hk, num_blocks, bs, D) contiguous
    rows: DecodeRows,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the cache in place; returns `(out (B, Hq, D), lse (B, Hq) fp32)`,
    the same as `paged_decode_attn_torch` (fp32 caches; context 0 gives out 0, lse -inf)."""
    if len(rows.groups) == 1:
        return _attend(q, key_pages, value_pages, rows.groups[0], rows.group, scale)
    out = torch.empty_like(q)  # (B, Hq, D)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)  # (B, Hq)
    for group in rows.groups:
        out[group.seqs], lse[group.seqs] = _attend(
            q[group.seqs], key_pages, value_pages, group, rows.group, scale
        )
    return out, lse


def _attend(q, key_pages, value_pages, rows: RowGroup, G: int, scale: float):
    B, Hq, D = q.shape
    Hk, _, _, bs = key_pages.shape
    L = rows.hidden.shape[1]
    weights = (q * scale).view(B, Hk, G, 1, D).transpose(0, 1).expand(Hk, B, G, L // bs, D)
    s = F.embedding_bag(
        rows.key_rows, key_pages.view(-1, bs), mode="sum", per_sample_weights=weights.reshape(-1, D)
    ).view(Hk, B, G, L)  # scaled scores
    s.masked_fill_(rows.hidden[None, :, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (Hk, B, G, 1), -inf for empty contexts
    m.masked_fill_(m == float("-inf"), 0.0)
    p = s.sub_(m).exp_()  # (Hk, B, G, L)
    denom = p.sum(dim=-1, keepdim=True)  # (Hk, B, G, 1), 0 for empty contexts
    out = F.embedding_bag(
        rows.value_rows, value_pages.view(-1, D), mode="sum", per_sample_weights=p.view(-1, L)
    )  # (Hk * B * G, D)
    out = out.view(Hk, B, G, D).div_(denom.masked_fill(denom == 0, 1.0))
    lse = (m + denom.log()).squeeze(-1)  # (Hk, B, G)
    return out.transpose(0, 1).reshape(B, Hq, D), lse.transpose(0, 1).reshape(B, Hq)
