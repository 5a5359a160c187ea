"""Decode attention on CPU that reads the paged KV cache in place, through `embedding_bag`.

Gathering a decode batch's pages (`gather_pages`) writes a copy of every key and value the
batch attends to and reads it back; on CPU that copy costs more than the attention itself.
Both products of decode attention are weighted sums of cache rows, which is what
`embedding_bag(mode="sum", per_sample_weights=...)` computes straight from the cache:

* scores: q . k over a page's keys is the sum over d of q[d] * (row d of the page's K^T), so
  keys are stored page-transposed, one row of `block_size` keys per (kv head, page, d);
* output: the sum over keys of p[key] * v[key], so values stay one row of D per key.

Legend: B sequences, Hq query heads, Hk kv heads, G = Hq // Hk, D head dim, bs block size,
N pages the batch's contexts use in all (no padding: every op is one call whatever the mix of
lengths, and a short sequence never reads a long one's padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanserve.kernels.paged_decode import EXP_FLOOR

# Scores are computed in base 2 (log2(e) folded into the query scale): torch's exp2 runs ~3x
# faster than its exp on this CPU (31 vs 90 µs for a decode batch's 106k scores), and
# 2^(s*log2 e) = e^s to within |s| * 6e-8 relative.
LOG2E = math.log2(math.e)
EXP2_FLOOR = EXP_FLOOR * LOG2E

# Past this many row indices (Hq * (D + bs) per page in use) a step's index, and each layer's
# per-index weights, would cost more memory than gathering pages does: `decode_rows` declines.
MAX_INDEX_ENTRIES = 1 << 24  # 64 MiB of int32


@dataclass(frozen=True)
class DecodeRows:
    """The cache rows one decode batch reads, built once per step and used by every layer.
    Pages are listed sequence by sequence; bags are ordered (kv head, query head in group, ...)."""

    seq_of_page: torch.Tensor  # (N,) int64: the sequence each page belongs to
    # (Hk*G*K,) int64: the slots past their sequence's context (K of them per query head), as
    # flat indices into the (Hk*G, N, bs) scores. index_fill_ with them is ~7x faster than
    # masked_fill_ with a broadcast (N, bs) mask, and like it, it overwrites whatever garbage
    # such a slot's score holds.
    hidden: torch.Tensor
    key_rows: torch.Tensor  # (Hk*G*N, D) int32: rows of the keys' (Hk*blocks*D, bs) view
    value_rows: torch.Tensor  # (Hk*G*N*bs,) int32: rows of the values' (Hk*blocks*bs, D) view
    value_offsets: torch.Tensor  # (Hk*G*B,) int32: where each (head, sequence) bag starts


def decode_rows(
    block_tables: torch.Tensor,  # (B, P) int; entries past a context are ignored
    context_lens: torch.Tensor,  # (B,) int
    num_kv_heads: int,
    group: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
) -> DecodeRows | None:
    """Index the rows `paged_decode_attn_rows` reads for this batch (layer independent), or
    None when it would pass MAX_INDEX_ENTRIES (long contexts, many query heads per kv head) or
    int32 rows: then gather the pages instead."""
    B, P = block_tables.shape
    Hk, G, D, bs = num_kv_heads, group, head_dim, block_size
    lens = context_lens.long()
    num_pages = (lens + bs - 1) // bs  # (B,)
    N = int(num_pages.sum())
    if Hk * G * N * (D + bs) > MAX_INDEX_ENTRIES or Hk * num_blocks * max(D, bs) >= 2**31:
        return None
    used = torch.arange(P) < num_pages[:, None]  # (B, P)
    pages = block_tables.int()[used]  # (N,)
    seq_of_page = torch.arange(B).repeat_interleave(num_pages, output_size=N)  # (N,)
    first_page = torch.cumsum(num_pages, 0) - num_pages  # (B,) each sequence's first page
    first_slot = first_page * bs  # (B,) and its first flat slot (where its value bag starts)
    # Hidden slots: the last page's slots past the context, [end, end + pad) for a sequence
    # whose context ends at flat slot `end`; laid out back to back, slot k of the K is
    # end + (k - where its sequence's run starts).
    pad = (-lens) % bs  # (B,)
    K = int(pad.sum())
    run_starts = torch.cumsum(pad, 0) - pad  # (B,)
    hidden_slots = (first_slot + lens - run_starts).repeat_interleave(pad, output_size=K)
    hidden_slots += torch.arange(K)  # (K,) into the (N*bs) slots
    hidden = (torch.arange(Hk * G)[:, None] * (N * bs) + hidden_slots).view(-1)  # (Hk*G*K,)
    # Rows are built in int32 directly (the bound above keeps them in range): the index is
    # Hk*G*N*(D + bs) entries, and converting it from int64 cost more than building it.
    i32 = torch.int32
    head_pages = torch.arange(0, Hk * num_blocks, num_blocks, dtype=i32)[:, None] + pages
    head_pages = head_pages[:, None, :, None].expand(Hk, G, N, 1)
    # each made in one pass, contiguous: (Hk, G, N, D) and (Hk, G, N, bs)
    key_rows = head_pages * D + torch.arange(D, dtype=i32)
    value_rows = head_pages * bs + torch.arange(bs, dtype=i32)
    value_offsets = torch.arange(Hk * G, dtype=i32)[:, None] * (N * bs) + first_slot.int()
    return DecodeRows(
        seq_of_page=seq_of_page,
        hidden=hidden,
        key_rows=key_rows.view(-1, D),
        value_rows=value_rows.view(-1),
        value_offsets=value_offsets.reshape(-1),
    )


# Softmax without each sequence's max subtracted (`_probs_unshifted`) when every sequence's
# denominator is at most e^30: every exp() is then at most e^30 too, and the weighted sums of
# values cannot overflow (e^30 * 2^31 keys * |v| < 1e16 stays below fp32's max). Checking the
# (HG, B) sums instead of the max score saves a pass over every score.
UNSHIFTED_MAX_DENOM = 1.0e13  # ~e^30
# ... and when every sequence's denominator is at least e^-60: keys whose exp() underflows
# (scores below -87) would each weigh < e^-27 of it, as the exact path's flooring at EXP_FLOOR
# (e^-87) makes them weigh.
UNSHIFTED_MIN_DENOM = 8.7e-27


def paged_decode_attn_rows(
    q: torch.Tensor,  # (B, Hq, D)
    key_pages: torch.Tensor,  # (Hk, num_blocks, D, bs) contiguous: page-transposed keys
    value_pages: torch.Tensor,  # (Hk, num_blocks, bs, D) contiguous
    rows: DecodeRows,
    scale: float,
    with_lse: bool = True,
    out: torch.Tensor | None = None,  # (B, Hq, D), any strides: written in place
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention over the cache in place; returns `(out (B, Hq, D), lse (B, Hq) fp32)`,
    the same as `paged_decode_attn_torch` (fp32 caches; context 0 gives out 0, lse -inf).
    `with_lse=False` returns None for lse (and skips computing it)."""
    B, Hq, D = q.shape
    Hk, _, _, bs = key_pages.shape
    HG, N = Hq, rows.seq_of_page.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if N == 0:
        return out.zero_(), torch.full((B, Hq), float("-inf")) if with_lse else None
    # contiguous before the gather: index_select on the permuted view took twice as long
    queries = torch.mul(q.transpose(0, 1), scale * LOG2E, out=q.new_empty(Hq, B, D))  # (Hk, G)
    weights = queries.index_select(1, rows.seq_of_page).view(-1, D)  # (Hk*G*N, D)
    s = F.embedding_bag(
        rows.key_rows, key_pages.view(-1, bs), mode="sum", per_sample_weights=weights
    ).view(HG, N, bs)  # scaled base-2 scores of every page's slots; hidden ones: garbage
    seqs = rows.seq_of_page.expand(HG, N)
    m = None  # (HG, B) the max subtracted from each sequence's scores; None: 0
    p_denom = _probs_unshifted(s, seqs, rows.hidden, B)
    if p_denom is None:
        s.view(-1).index_fill_(0, rows.hidden, float("-inf"))  # out of the maxima
        m = s.new_full((HG, B), float("-inf")).scatter_reduce_(1, seqs, s.amax(dim=2), "amax")
        shifted = s.sub_(m.gather(1, seqs)[..., None])  # (HG, N, bs); m is finite where used
        p, denom = _exp_and_sums(shifted.clamp_(min=EXP2_FLOOR).exp2_(), seqs, rows.hidden, B)
    else:
        p, denom = p_denom
    weighted = F.embedding_bag(
        rows.value_rows,
        value_pages.view(-1, D),
        rows.value_offsets,
        mode="sum",
        per_sample_weights=p.view(-1),
    ).view(HG, B, D)  # 0 for an empty bag
    torch.div(weighted, denom.clamp(min=UNSHIFTED_MIN_DENOM)[..., None], out=out.transpose(0, 1))
    if not with_lse:
        return out, None
    lse = denom.log() if m is None else m / LOG2E + denom.log()  # (HG, B), -inf: no context
    return out, lse.t().contiguous()


def _probs_unshifted(
    s: torch.Tensor,  # (HG, N, bs) scores; hidden slots: anything (nan, inf), zeroed after exp
    seqs: torch.Tensor,  # (HG, N) the sequence of each page
    hidden: torch.Tensor,
    B: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(exp(s), per-sequence sums (HG, B))` when that equals softmax with each sequence's max
    subtracted up to rounding (see UNSHIFTED_MAX_DENOM); else None, s left as it was. It
    replaces the per-page maxima, their scatter to sequences and the subtraction. The scores
    are not floored first (one pass less): a key whose 2^s underflows weighs 0, not 2^-126,
    and UNSHIFTED_MIN_DENOM makes either negligible."""
    p, denom = _exp_and_sums(torch.exp2(s), seqs, hidden, B)  # s kept for the exact path
    low, high = torch.aminmax(denom)
    if not (UNSHIFTED_MIN_DENOM <= float(low) and float(high) <= UNSHIFTED_MAX_DENOM):
        return None  # a score past e^30 (or nan), or a sequence with tiny scores (or none)
    return p, denom


def _exp_and_sums(
    p: torch.Tensor,  # (HG, N, bs) 2^scores, overwritten: hidden slots anything (nan, inf)
    seqs: torch.Tensor,  # (HG, N) the sequence of each page
    hidden: torch.Tensor,
    B: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(p with hidden slots 0, its per-sequence sums (HG, B))`; 0: no context."""
    p.view(-1).index_fill_(0, hidden, 0.0)
    return p, p.new_zeros(p.shape[0], B).scatter_add_(1, seqs, p.sum(dim=2))
