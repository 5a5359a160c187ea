"""Self-attention over the paged KV cache, for mixed batches of decodes and prefill chunks.

Legend: T tokens in the step, Hq/Hk query/kv heads, D head dim, Bd decode sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from titanserve.core.config import ModelConfig
from titanserve.core.model.kv_cache import key_pages, value_pages
from titanserve.kernels import ops
from titanserve.kernels.paged_decode import gather_pages
from titanserve.kernels.paged_decode_rows import DecodeRows, paged_decode_attn_rows
from titanserve.kernels.rotary import rotary_pairs_


@dataclass
class PrefillChunk:
    """A sequence computing more than one token this step."""

    token_start: int  # first row of this chunk in the step's token batch
    num_tokens: int  # query length
    context_len: int  # tokens in the cache after this step's write (cached + new)
    block_ids: torch.Tensor  # (num_blocks,) int64 covering context_len


@dataclass
class AttentionMetadata:
    """Built by the model runner from a StepPlan. NOTE: decode rows come first."""

    positions: torch.Tensor  # (T,) int64
    slot_blocks: torch.Tensor  # (T,) int64: the cache block each token's k/v goes to
    slot_offsets: torch.Tensor  # (T,) int64: its offset in that block
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # (Bd, max_blocks) int32
    decode_context_lens: torch.Tensor  # (Bd,) int32
    prefills: list[PrefillChunk]
    decode_rows: DecodeRows | None = None  # set where decode reads the cache in place (CPU)


class Attention(nn.Module):
    LINEAR_WEIGHTS = ("qkv_weight", "o_weight")  # see kernels.cpu_linear.pack_linear_weights

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_weight = nn.Parameter(
            torch.empty(self.q_size + 2 * self.kv_size, cfg.hidden_size), requires_grad=False
        )
        self.qkv_bias = (
            nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size), requires_grad=False)
            if cfg.qkv_bias
            else None
        )
        self.o_weight = nn.Parameter(torch.empty(cfg.hidden_size, self.q_size), requires_grad=False)
        self.o_bias = (
            nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False) if cfg.o_bias else None
        )
        self.eps = cfg.rms_norm_eps
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim), requires_grad=False)
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim), requires_grad=False)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # (T, H)
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # (num_blocks, block_size, Hk, D), see core.model.kv_cache
        v_cache: torch.Tensor,  # (num_blocks, block_size, Hk, D)
        rope: torch.Tensor,  # (max_pos, R) fp32 cos | sin, or (max_pos, R/2) complex64 rotations
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias)  # (T, Hq*D + 2*Hk*D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        v = v.view(T, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, self.eps)
            k = ops.rms_norm(k, self.k_norm, self.eps)
        if rope.is_complex():  # q/k rows hold rotary pairs side by side (CPU, rotary_layout)
            rotary_pairs_(q, k, meta.positions, rope)
        else:
            ops.rotary(q, k, meta.positions, rope)

        if k_cache.dtype != x.dtype:  # attention runs in the cache's dtype (fp32 on CPU)
            q, k, v = q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype)
        slots = (meta.slot_blocks, meta.slot_offsets)
        k_cache.index_put_(slots, k)  # in place whatever the memory order
        v_cache.index_put_(slots, v)

        out = torch.empty_like(q)  # (T, Hq, D)
        nd = meta.num_decode_tokens
        if nd and meta.decode_rows is not None:
            paged_decode_attn_rows(
                q[:nd], key_pages(k_cache), value_pages(v_cache), meta.decode_rows, self.scale,
                with_lse=False, out=out[:nd],
            )
        elif nd:
            out[:nd] = ops.paged_decode_attn(
                q[:nd],
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                scale=self.scale,
            )[0]
        for chunk in meta.prefills:
            rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            if chunk.context_len == chunk.num_tokens:  # nothing cached before: use k, v as is
                keys, values = k[rows], v[rows]
            else:
                table = chunk.block_ids[None]  # (1, num_blocks)
                keys = gather_pages(k_cache, table)[:, 0, : chunk.context_len].transpose(0, 1)
                values = gather_pages(v_cache, table)[:, 0, : chunk.context_len].transpose(0, 1)
            out[rows] = ops.flash_attn_fwd(
                q[rows],
                keys,
                values,
                causal=True,
                q_offset=chunk.context_len - chunk.num_tokens,
                scale=self.scale,
            )[0]
        out = out.view(T, self.q_size).to(x.dtype)
        return ops.linear(out, self.o_weight, self.o_bias)  # (T, H)
