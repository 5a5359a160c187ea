"""Linear layers on CPU through oneDNN, with each weight packed once after loading.

`F.linear` on CPU calls BLAS, which repacks the weight into its blocked panel layout on every
call; on a step of a few dozen rows that packing is a large share of the GEMM, and the weights
of a whole model do not stay in cache between steps. oneDNN keeps a weight in its blocked
layout for good (`mkldnn._reorder_linear_weight`), and its JIT kernels use AVX-512 on any x86
vendor. On the development machine (AMD EPYC, 2 threads) `benchmarks/cpu_linear.py` runs a
tiny Llama's 17 step GEMMs 1.4-1.5x faster packed at 64 rows in fp32 (1.3-2.0x at 8 rows,
1.1-1.2x at 8192; 0.84x at 1 row) and 1.0-1.8x faster in bf16.

A packed weight is an opaque oneDNN tensor with the dense weight's shape and dtype: only
`linear` below can use it, so the dense copy is dropped and memory does not grow.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from titanserve.kernels.weight_layout import relayout_listed_weights

# The row count oneDNN tunes the packed layout for; any row count works with any layout.
# Measured 1 / 64 / 1024 at 1, 64 and 1024 rows: 1024 was best or within noise everywhere.
PACK_ROWS_HINT = 1024


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `pack` takes this weight: a dense 2-D fp32 (or bf16, where the CPU has it)
    weight in host memory, with a oneDNN build whose packed linear works here."""
    if weight.device.type != "cpu" or weight.layout != torch.strided or weight.dim() != 2:
        return False
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    return _packed_linear_works(weight.dtype)


@functools.cache
def _packed_linear_works(dtype: torch.dtype) -> bool:
    """Probe once per dtype: oneDNN is built in, supports the dtype on this CPU, and a packed
    linear gives F.linear's result (else every weight stays dense: F.linear)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, generator=g).to(dtype)
    x = torch.randn(3, 8, generator=g).to(dtype)
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        return False
    return torch.allclose(out.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) dense weight -> the same (N, K) weight in oneDNN's blocked layout."""
    if not can_pack(weight):
        raise ValueError(
            f"cpu_linear.pack: cannot pack a {weight.dtype} {tuple(weight.shape)} weight on "
            f"{weight.device} (needs 2-D fp32/bf16 in host memory and oneDNN)"
        )
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)


def linear(
    x: torch.Tensor,  # (..., K)
    weight: torch.Tensor,  # (N, K), dense or packed
    bias: torch.Tensor | None = None,  # (N,)
) -> torch.Tensor:  # (..., N)
    """`F.linear`, also for a weight made by `pack`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack, in place, every weight a module lists in its `LINEAR_WEIGHTS` class attribute
    (the parameters it only ever passes to `linear`) that `can_pack` takes. Returns how many
    were packed. A parameter shared by two names (tied embeddings) is packed as a copy for
    the `linear` name and stays dense under the other."""
    return relayout_listed_weights(model, "LINEAR_WEIGHTS", can_pack, pack)
