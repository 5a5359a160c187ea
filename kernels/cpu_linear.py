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

oneDNN builds (JIT-compiles) a kernel for every row count it meets, ~0.55 ms each here, and
keeps the last 1024 in a process-wide cache. Decode batches shrink one by one as requests end
and prefill steps take any size, so unbounded row counts would build kernels all the time (a
tiny Llama's 64 batch sizes x 5 weight shapes: 201 ms the first time, 26 ms cached). `linear`
rounds a packed weight's rows up to a few buckets (`padded_rows`), at most 1/8 more rows, and
`warm_up_packed` builds a model's decode buckets before it serves.

A small weight stays dense (`MIN_PACKED_ELEMENTS`): each oneDNN call has a fixed cost that
BLAS's does not, and the repacking it saves is small.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from titanserve.kernels.weight_layout import relayout_listed_weights

# The row count oneDNN tunes the packed layout for; any row count works with any layout.
# Measured 1 / 64 / 1024 at 1, 64 and 1024 rows: 1024 was best or within noise everywhere.
PACK_ROWS_HINT = 1024

# Weights with fewer elements stay dense (F.linear). oneDNN's packed call costs ~20 µs even
# hot and ~60-90 µs with a model step's caches cold, where BLAS's costs ~5 and ~25-40 µs:
# `benchmarks/cpu_linear.py --shapes`, cold, F.linear / packed time at 64 | 256 rows: 64x64
# 0.35 | 0.48, 256x256 0.60 | 0.91, 512x256 0.86 | 1.06, 768x256 0.93 | 1.09, 1536x256
# 1.17 | 1.31 (bf16 alike). Between 128k and ~400k elements the two stay within ~15% either
# way, and whole runs of the throughput benchmark's Llama (its o_proj and lm_head under the
# line) timed the same; the tiny zoo's models (every weight under it) ran 1.2x faster.
MIN_PACKED_ELEMENTS = 1 << 17


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


def worth_packing(weight: torch.Tensor) -> bool:
    """`can_pack`, and big enough to run faster packed (`MIN_PACKED_ELEMENTS`)."""
    return weight.numel() >= MIN_PACKED_ELEMENTS and can_pack(weight)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) dense weight -> the same (N, K) weight in oneDNN's blocked layout."""
    if not can_pack(weight):
        raise ValueError(
            f"cpu_linear.pack: cannot pack a {weight.dtype} {tuple(weight.shape)} weight on "
            f"{weight.device} (needs 2-D fp32/bf16 in host memory and oneDNN)"
        )
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)


def padded_rows(rows: int) -> int:
    """The row bucket a packed linear of `rows` rows runs at: 1, 2, 4, 8, 16, then 8 buckets
    per doubling (17-18 -> 18, ..., 33-36 -> 36, ...). Up to 16 rows a GEMM costs what
    streaming its weight costs, whatever the rows; past that at most 1/8 of them is padding."""
    if rows <= 16:
        return 1 << (rows - 1).bit_length() if rows else 0
    step = 1 << (rows.bit_length() - 4)  # an eighth of the power of two below rows
    return -(-rows // step) * step


def linear(
    x: torch.Tensor,  # (..., K)
    weight: torch.Tensor,  # (N, K), dense or packed
    bias: torch.Tensor | None = None,  # (N,)
) -> torch.Tensor:  # (..., N)
    """`F.linear`, also for a weight made by `pack` (its rows padded to `padded_rows`)."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    rows = x.numel() // K if K else 0
    bucket = padded_rows(rows)
    if bucket == rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    padded = x.new_empty(bucket, K)  # (bucket, K)
    padded[:rows] = x.reshape(rows, K)
    padded[rows:].zero_()  # garbage could be denormals, which some CPUs multiply slowly
    out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")
    return out[:rows].view(*lead, out.shape[-1])  # (..., N)


def warm_up_packed(weights: Iterable[torch.Tensor], max_rows: int) -> int:
    """Build oneDNN's kernels for every row bucket up to `max_rows` (a step's decode rows)
    of every packed weight shape among `weights` (others are skipped), so that serving does
    not; returns how many it built."""
    by_shape = {(tuple(w.shape), w.dtype): w for w in weights if w.is_mkldnn and w.dim() == 2}
    buckets = sorted({padded_rows(rows) for rows in range(1, max_rows + 1)})
    with torch.inference_mode():
        for weight in by_shape.values():
            for bucket in buckets:
                linear(torch.zeros(bucket, weight.shape[1], dtype=weight.dtype), weight)
    return len(by_shape) * len(buckets)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack, in place, every weight a module lists in its `LINEAR_WEIGHTS` class attribute
    (the parameters it only ever passes to `linear`) that is `worth_packing`. Returns how many
    were packed. A parameter shared by two names (tied embeddings) is packed as a copy for
    the `linear` name and stays dense under the other."""
    return relayout_listed_weights(model, "LINEAR_WEIGHTS", worth_packing, pack)
