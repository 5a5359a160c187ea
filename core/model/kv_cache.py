"""The paged KV cache: per layer, keys and values seen as (num_blocks, block_size, Hk, D).

That logical shape is the design's; the memory order under it is chosen for the kernels that
read it. Both are head-major (kv head outermost), so one kv head's pages are the rows of one
matrix. On CPU with fp32, keys are also page-transposed, (Hk, num_blocks, D, block_size): a
page's score against a query is then a weighted sum of its D rows, which lets decode
attention read the cache in place (`kernels.paged_decode_rows`); so on CPU the cache is fp32
by default for bf16 and fp16 models too (`kv_cache_dtype`). Every other reader works through
the logical view's strides.
"""

from __future__ import annotations

import torch

from titanserve.core.config import parse_dtype


def kv_cache_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype for `--kv-cache-dtype name`. "auto": fp32 on CPU whatever the model's
    dtype, where decode attention then reads the cache in place (`kernels.paged_decode_rows`:
    2.2-3.2x faster than gathering bf16 pages, `benchmarks/cpu_decode_attention.py`) and
    computes in fp32, for twice a bf16 cache's memory a token; else the model's dtype."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else model_dtype
    return parse_dtype(name)


def keys_transposed(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether keys are stored page-transposed (the in-place CPU decode path needs fp32)."""
    return device.type == "cpu" and dtype == torch.float32


def allocate_kv_caches(
    num_layers: int,
    num_kv_heads: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value caches, each a (L, num_blocks, block_size, Hk, D) view."""
    L, Hk, nb, bs, D = num_layers, num_kv_heads, num_blocks, block_size, head_dim
    values = torch.zeros(L, Hk, nb, bs, D, dtype=dtype, device=device).permute(0, 2, 3, 1, 4)
    if keys_transposed(device, dtype):
        keys = torch.zeros(L, Hk, nb, D, bs, dtype=dtype, device=device).permute(0, 2, 4, 1, 3)
    else:
        keys = torch.zeros(L, Hk, nb, bs, D, dtype=dtype, device=device).permute(0, 2, 3, 1, 4)
    return keys, values


def key_pages(k_cache: torch.Tensor) -> torch.Tensor | None:
    """A layer's page-transposed key memory, (Hk, num_blocks, D, block_size), or None when the
    keys are stored another way."""
    pages = k_cache.permute(2, 0, 3, 1)
    return pages if pages.is_contiguous() else None


def value_pages(v_cache: torch.Tensor) -> torch.Tensor:
    """A layer's value memory, (Hk, num_blocks, block_size, D)."""
    return v_cache.permute(2, 0, 1, 3)
