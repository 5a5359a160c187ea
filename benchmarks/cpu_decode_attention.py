"""CPU decode attention of a bf16 model: a bf16 KV cache against the fp32 one (the default).

    python benchmarks/cpu_decode_attention.py [--batch 8 32 64] [--context 150 600]
                                              [--heads 9 3] [--repeat 5]

One layer's decode attention for `--batch` sequences of `--context` cached tokens each
(head dim 64, 16-token pages, SmolLM2's 9 query / 3 kv heads by default), on one thread, as
`core.model.attention` runs it for each cache dtype (`--kv-cache-dtype`):

* bf16 cache: `kernels.paged_decode` gathers every page the batch reads, widens it to fp32
  and runs two batched matmuls;
* fp32 cache (what `auto` picks on CPU): the query is widened, and `kernels.paged_decode_rows`
  reads the page-transposed cache in place (its per-step row index built once, outside).

Both on the same random cache contents, alternately; prints the median µs of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from titanserve.core.model.kv_cache import allocate_kv_caches, key_pages, value_pages
from titanserve.kernels import ops
from titanserve.kernels.paged_decode_rows import decode_rows, paged_decode_attn_rows

HEAD_DIM, BLOCK_SIZE = 64, 16


def median_us(fn, calls: int = 20) -> float:
    fn()  # warm
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def bench(
    batch: int, context: int, q_heads: int, kv_heads: int, repeat: int
) -> tuple[float, float]:
    """(µs of the bf16 cache's path, µs of the fp32 cache's path), medians over rounds."""
    pages = -(-context // BLOCK_SIZE)
    num_blocks = batch * pages
    tables = torch.arange(num_blocks, dtype=torch.int32).view(batch, pages)  # (B, P)
    lens = torch.full((batch,), context, dtype=torch.int32)
    cpu = torch.device("cpu")
    k16, v16 = allocate_kv_caches(1, kv_heads, num_blocks, BLOCK_SIZE, HEAD_DIM,
                                  torch.bfloat16, cpu)  # fmt: skip
    k32, v32 = allocate_kv_caches(1, kv_heads, num_blocks, BLOCK_SIZE, HEAD_DIM, torch.float32,
                                  cpu)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    k32[0].copy_(torch.randn(k32[0].shape, generator=g))
    v32[0].copy_(torch.randn(v32[0].shape, generator=g))
    k16[0].copy_(k32[0])
    v16[0].copy_(v32[0])
    q = torch.randn(batch, q_heads, HEAD_DIM, generator=g).bfloat16()  # (B, Hq, D)
    rows = decode_rows(tables, lens, kv_heads, q_heads // kv_heads, num_blocks, BLOCK_SIZE,
                       HEAD_DIM)  # fmt: skip
    assert rows is not None
    scale = HEAD_DIM**-0.5

    def gathered() -> torch.Tensor:
        return ops.paged_decode_attn(q, k16[0], v16[0], tables, lens, scale=scale)[0]

    def in_place() -> torch.Tensor:
        out, _ = paged_decode_attn_rows(q.float(), key_pages(k32[0]), value_pages(v32[0]), rows,
                                        scale, with_lse=False)  # fmt: skip
        return out.bfloat16()

    assert (gathered().float() - in_place().float()).abs().max().item() < 0.05  # same attention
    rounds = [(median_us(gathered), median_us(in_place)) for _ in range(repeat)]
    return tuple(statistics.median(side) for side in zip(*rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--context", nargs="+", type=int, default=[150, 600])
    parser.add_argument("--heads", nargs=2, type=int, default=[9, 3], metavar=("Q", "KV"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    q_heads, kv_heads = args.heads
    if min(*args.batch, *args.context, args.repeat, kv_heads) < 1 or q_heads % kv_heads:
        parser.error("sizes must be >= 1 and query heads a multiple of kv heads")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {q_heads} query / {kv_heads} kv heads, "
          f"head dim {HEAD_DIM}, one layer")
    for batch in args.batch:
        for context in args.context:
            bf16_us, fp32_us = bench(batch, context, q_heads, kv_heads, args.repeat)
            print(f"  batch {batch:>3}, context {context:>5}:  bf16 cache gathered "
                  f"{bf16_us:8.0f} us   fp32 cache in place {fp32_us:8.0f} us   "
                  f"x{bf16_us / fp32_us:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
